//! The dirty bitmap used once the journal is full, and the persisted state file
//! (`journal.state`) that holds it together with the trim point.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::format::{le16, le32, le64};
use crate::{io_err, JournalError};

/// One bit per `granularity` bytes of the disk.
#[derive(Clone, Debug)]
pub struct DirtyBitmap {
    granularity: u64,
    disk_size: u64,
    bits: u64,
    words: Vec<u64>,
    set: u64,
}

impl DirtyBitmap {
    pub fn new(disk_size: u64, granularity: u64) -> Self {
        let bits = disk_size.div_ceil(granularity);
        DirtyBitmap {
            granularity,
            disk_size,
            bits,
            words: vec![0; bits.div_ceil(64) as usize],
            set: 0,
        }
    }

    /// Marks every block touched by `[offset, offset+len)` (already bounds-checked).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.granularity;
        let last = ((offset + len - 1) / self.granularity).min(self.bits - 1);
        let mut b = first;
        while b <= last {
            let w = (b / 64) as usize;
            let lo = b % 64;
            let hi = if last / 64 == b / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let before = self.words[w];
            self.words[w] |= mask;
            self.set += u64::from((self.words[w] ^ before).count_ones());
            b = (b / 64 + 1) * 64;
        }
    }

    /// The disk grew to `disk_size` (not smaller than now): the new blocks are clean.
    pub fn grow(&mut self, disk_size: u64) {
        debug_assert!(disk_size >= self.disk_size);
        self.disk_size = disk_size;
        self.bits = disk_size.div_ceil(self.granularity);
        self.words.resize(self.bits.div_ceil(64) as usize, 0);
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.set = 0;
    }

    fn is_set(&self, b: u64) -> bool {
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Dirty regions as (offset, len), merged, clamped to the disk size.
    pub fn extents(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut b = 0;
        while b < self.bits {
            if self.words[(b / 64) as usize] == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            if !self.is_set(b) {
                b += 1;
                continue;
            }
            let start = b;
            while b < self.bits && self.is_set(b) {
                b += 1;
            }
            let off = start * self.granularity;
            let end = (b * self.granularity).min(self.disk_size);
            out.push((off, end - off));
        }
        out
    }

    /// Bytes covered by dirty blocks (the last block clamped to the disk size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut n = self.set * self.granularity;
        if self.bits > 0 && self.is_set(self.bits - 1) {
            n -= self.bits * self.granularity - self.disk_size;
        }
        n
    }
}

pub const STATE_FILE: &str = "journal.state";
const STATE_TMP: &str = "journal.state.tmp";
const STATE_MAGIC: [u8; 4] = *b"FJST";
const STATE_VERSION: u16 = 1;
const STATE_HEADER_LEN: usize = 40;
const FLAG_RESYNC: u16 = 1;

/// Everything persisted in `journal.state`.
#[derive(Clone, Debug)]
pub struct PersistState {
    pub trim_seq: u64,
    pub resync: bool,
    pub bitmap: DirtyBitmap,
}

impl PersistState {
    pub fn encode(&self) -> Vec<u8> {
        let bm = &self.bitmap;
        let mut v = Vec::with_capacity(STATE_HEADER_LEN + bm.words.len() * 8 + 4);
        v.extend_from_slice(&STATE_MAGIC);
        v.extend_from_slice(&STATE_VERSION.to_le_bytes());
        let flags = if self.resync { FLAG_RESYNC } else { 0 };
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&self.trim_seq.to_le_bytes());
        v.extend_from_slice(&bm.disk_size.to_le_bytes());
        v.extend_from_slice(&bm.granularity.to_le_bytes());
        v.extend_from_slice(&bm.bits.to_le_bytes());
        for w in &bm.words {
            v.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Decodes a state file for the disk size it records (which the caller compares with the
    /// configured one); the granularity must be the configured one.
    pub fn decode(b: &[u8], granularity: u64) -> Result<Self, String> {
        if b.len() < STATE_HEADER_LEN + 4 || b[0..4] != STATE_MAGIC {
            return Err("bad state file magic or length".into());
        }
        let body = b.len() - 4;
        if crc32c::crc32c(&b[..body]) != le32(&b[body..]) {
            return Err("bad state file crc".into());
        }
        if le16(&b[4..6]) != STATE_VERSION {
            return Err("unsupported state file version".into());
        }
        let flags = le16(&b[6..8]);
        let trim_seq = le64(&b[8..16]);
        let (ds, gran, bits) = (le64(&b[16..24]), le64(&b[24..32]), le64(&b[32..40]));
        if gran != granularity {
            return Err(format!(
                "state file is for bitmap granularity {gran}, configured {granularity}"
            ));
        }
        let mut bitmap = DirtyBitmap::new(ds, granularity);
        if bits != bitmap.bits || body - STATE_HEADER_LEN != bitmap.words.len() * 8 {
            return Err("state file bitmap size mismatch".into());
        }
        for (i, w) in bitmap.words.iter_mut().enumerate() {
            *w = le64(&b[STATE_HEADER_LEN + i * 8..]);
        }
        if bits % 64 != 0 {
            if let Some(last) = bitmap.words.last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
        bitmap.set = bitmap.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(PersistState {
            trim_seq,
            resync: flags & FLAG_RESYNC != 0,
            bitmap,
        })
    }

    /// Loads the state file; `None` if it does not exist. A state file written for a smaller
    /// disk is valid for a larger one (returned as written: [`DirtyBitmap::grow`] pads it); for
    /// a larger disk it is [`JournalError::Shrunk`].
    pub fn load(
        dir: &Path,
        disk_size: u64,
        granularity: u64,
    ) -> Result<Option<Self>, JournalError> {
        let _ = fs::remove_file(dir.join(STATE_TMP));
        let path = dir.join(STATE_FILE);
        match fs::read(&path) {
            Ok(b) => {
                let st = PersistState::decode(&b, granularity).map_err(|reason| {
                    JournalError::Corrupt {
                        path,
                        offset: 0,
                        reason,
                    }
                })?;
                let written = st.bitmap.disk_size();
                if written > disk_size {
                    return Err(JournalError::Shrunk {
                        dir: dir.to_path_buf(),
                        written,
                        configured: disk_size,
                    });
                }
                Ok(Some(st))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    /// Writes the state atomically: temp file, fdatasync, rename, directory fsync.
    pub fn store(&self, dir: &Path, dir_file: &File) -> Result<(), JournalError> {
        let tmp = dir.join(STATE_TMP);
        let bytes = self.encode();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(&bytes).map_err(|e| io_err(&tmp, e))?;
        rustix::fs::fdatasync(&f).map_err(|e| io_err(&tmp, e.into()))?;
        drop(f);
        let path = dir.join(STATE_FILE);
        fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
        rustix::fs::fsync(dir_file).map_err(|e| io_err(dir, e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_and_extents() {
        let mut b = DirtyBitmap::new(1000 * 64 + 10, 64);
        b.mark(0, 1);
        b.mark(64 * 3 + 5, 64); // blocks 3,4
        b.mark(64 * 60, 64 * 200); // blocks 60..259, crosses words
        b.mark(1000 * 64 + 3, 7); // last partial block
        assert_eq!(
            b.extents(),
            vec![(0, 64), (192, 128), (64 * 60, 64 * 200), (64000, 10)]
        );
        assert_eq!(b.dirty_bytes(), 64 + 128 + 64 * 200 + 10);
        b.mark(0, 64 * 2); // adds block 1 only
        assert_eq!(b.extents()[0], (0, 128));
        assert_eq!(b.dirty_bytes(), 128 + 128 + 64 * 200 + 10);
        b.clear();
        assert!(b.extents().is_empty());
        assert_eq!(b.dirty_bytes(), 0);
    }

    #[test]
    fn state_roundtrip() {
        let mut bm = DirtyBitmap::new(1 << 20, 4096);
        bm.mark(8192, 10000);
        let st = PersistState {
            trim_seq: 77,
            resync: true,
            bitmap: bm,
        };
        let enc = st.encode();
        let d = PersistState::decode(&enc, 4096).unwrap();
        assert_eq!(d.trim_seq, 77);
        assert!(d.resync);
        assert_eq!(d.bitmap.disk_size(), 1 << 20);
        assert_eq!(d.bitmap.extents(), st.bitmap.extents());
        assert!(PersistState::decode(&enc, 512).is_err());
        let mut bad = enc.clone();
        bad[45] ^= 4;
        assert!(PersistState::decode(&bad, 4096).is_err());
    }

    #[test]
    fn a_state_file_of_a_smaller_disk_is_padded_and_of_a_larger_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dir_file = File::open(dir.path()).unwrap();
        let mut bm = DirtyBitmap::new(100 * 4096 + 5, 4096);
        bm.mark(100 * 4096, 5); // the old last, partial block
        let st = PersistState {
            trim_seq: 9,
            resync: true,
            bitmap: bm,
        };
        st.store(dir.path(), &dir_file).unwrap();
        let mut grown = PersistState::load(dir.path(), 300 * 4096, 4096)
            .unwrap()
            .unwrap();
        assert_eq!(grown.bitmap.disk_size(), 100 * 4096 + 5);
        grown.bitmap.grow(300 * 4096);
        assert_eq!(grown.bitmap.disk_size(), 300 * 4096);
        assert_eq!(grown.trim_seq, 9);
        // The old last block is now a whole one; blocks past the old end are clean.
        assert_eq!(grown.bitmap.extents(), vec![(100 * 4096, 4096)]);
        let mut g = grown.bitmap.clone();
        g.mark(299 * 4096, 4096);
        assert_eq!(g.extents().last(), Some(&(299 * 4096, 4096)));
        let err = PersistState::load(dir.path(), 100 * 4096, 4096).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, JournalError::Shrunk { written, configured, .. }
                if written == 100 * 4096 + 5 && configured == 100 * 4096),
            "{msg}"
        );
        assert!(
            msg.contains("shrinking a protected disk is refused"),
            "{msg}"
        );
    }
}
