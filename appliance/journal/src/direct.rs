//! Segment writes with O_DIRECT: aligned blocks from an aligned buffer, bypassing the page cache.
//!
//! Why: on a device that benefits (NVMe, or a virtual disk whose host caches anyway; the hardware
//! profile says which), journal data that sits dirty in the page cache is written twice over
//! (once by the journal's fdatasync, and again in whatever writeback storm another flush on the
//! same filesystem starts), and it pushes the cache out of memory for nothing: the shipper reads
//! records back once. With O_DIRECT a record batch goes to the device when it is written and the
//! fdatasync only has the device cache and the file size left to flush.
//!
//! How: records are appended back to back at any offset, but O_DIRECT needs offsets, lengths and
//! memory aligned to the device's logical block size ([`ALIGN`] covers 512 and 4096). The writer
//! keeps the segment's last partial block (the *tail*: bytes from the last aligned offset to the
//! logical end) and writes `tail || batch`, zero-padded to a whole block, at the aligned offset.
//! The tail's bytes are rewritten unchanged, so a torn write of that block leaves every earlier
//! record intact (each sector is old or new, and both hold the same prefix). The padding past the
//! logical end is overwritten by the next batch; a segment that ends with fewer than [`ALIGN`]
//! zero bytes after its last record is complete (recovery knows; see `segment::scan`). Reads go
//! through the ordinary descriptor: the kernel keeps buffered reads coherent with direct writes.
//! A filesystem without O_DIRECT (tmpfs) makes the journal fall back to buffered writes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

/// Alignment of offsets, lengths and memory for direct writes.
pub const ALIGN: usize = 4096;

/// A zeroed heap buffer whose slice is aligned to [`ALIGN`] and a multiple of it long: a Vec
/// one block larger than needed, viewed from its first aligned byte (no `unsafe`; the Vec is
/// never resized, so the view stays aligned).
pub struct AlignedBuf {
    v: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let v = vec![0u8; len + ALIGN];
        let off = v.as_ptr().align_offset(ALIGN);
        assert!(off < ALIGN, "a byte pointer can always be aligned");
        AlignedBuf { v, off, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.v[self.off..self.off + self.len]
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.v[self.off..self.off + self.len]
    }
}

/// Open `path` for direct writes; `Ok(None)` when its filesystem does not support O_DIRECT.
pub fn open(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The direct writer of one segment: its descriptor and its tail.
pub struct Tail {
    /// The segment's buffered descriptor: identifies the segment (a segment deleted and created
    /// again under the same name is another file).
    reader: Arc<File>,
    file: File,
    /// Aligned offset where the tail starts.
    base: u64,
    /// Bytes from `base` to the logical end (fewer than ALIGN).
    tail: Vec<u8>,
    buf: AlignedBuf,
}

impl Tail {
    /// Start writing a segment at logical offset `end` through `file` (opened with O_DIRECT):
    /// the tail is read back through `reader` (the buffered descriptor of the same file).
    pub fn open(file: File, reader: Arc<File>, end: u64) -> io::Result<Tail> {
        let base = end - end % ALIGN as u64;
        let mut tail = vec![0u8; (end - base) as usize];
        reader.read_exact_at(&mut tail, base)?;
        Ok(Tail {
            reader,
            file,
            base,
            tail,
            buf: AlignedBuf::new(1 << 20),
        })
    }

    /// Whether this writer writes the segment `reader` reads.
    pub fn is_for(&self, reader: &Arc<File>) -> bool {
        Arc::ptr_eq(&self.reader, reader)
    }

    /// The logical end this tail continues from.
    pub fn end(&self) -> u64 {
        self.base + self.tail.len() as u64
    }

    /// Append `data` at the logical end: write `tail || data` padded to whole blocks.
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        let t = self.tail.len();
        let n = t + data.len();
        let padded = n.next_multiple_of(ALIGN);
        if self.buf.len() < padded {
            self.buf = AlignedBuf::new(padded);
        }
        let b = self.buf.as_mut_slice();
        b[..t].copy_from_slice(&self.tail);
        b[t..n].copy_from_slice(data);
        b[n..padded].fill(0);
        self.file.write_all_at(&b[..padded], self.base)?;
        let new_base = n - n % ALIGN;
        self.tail.clear();
        self.tail
            .extend_from_slice(&self.buf.as_slice()[new_base..n]);
        self.base += new_base as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_land_contiguously_and_the_padding_is_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("seg");
        std::fs::write(&p, b"HEADER").unwrap();
        let reader = Arc::new(File::open(&p).unwrap());
        let Some(f) = open(&p).unwrap() else {
            eprintln!("no O_DIRECT on this filesystem: skipped");
            return;
        };
        let mut t = Tail::open(f, reader.clone(), 6).unwrap();
        assert!(t.is_for(&reader));
        let mut expect = b"HEADER".to_vec();
        for i in 0..40u32 {
            let chunk: Vec<u8> = (0..(i * 397 % 9000) + 1).map(|k| (k ^ i) as u8).collect();
            t.append(&chunk).unwrap();
            expect.extend_from_slice(&chunk);
            assert_eq!(t.end(), expect.len() as u64);
        }
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len() % ALIGN, 0);
        assert_eq!(&got[..expect.len()], &expect[..]);
        assert!(got[expect.len()..].iter().all(|&b| b == 0));
    }
}
