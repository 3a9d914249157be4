//! Pack files: chunks appended to a few large files instead of one file each.
//!
//! Why: a seed stores tens of thousands of ~37 KB chunks per GiB of disk. As one file each, the
//! master target spent most of its CPU in the kernel creating inodes and directory entries and
//! journaling them (10.5 machine-CPU-s for 60,000 chunks against 4.3 for one append-only file).
//! Packs turn that into sequential appends, as borg's segments and restic's packs do.
//!
//! How (byte layout in `docs/formats.md` §4): `packs/<8 hex>.pack` holds records
//! (header || blob), `packs/<8 hex>.idx` one fixed-size entry per record, appended after the
//! record's data, and tombstones for records deleted by gc or quarantined. Neither is synced per
//! chunk: the commit's `syncfs` covers them, after which `packs/synced` durably names the
//! active pack and its length at that sync. Everything below that mark is trusted at open;
//! above it, each record is checked (header CRC, blob CRC) and the first bad or torn one cuts
//! its pack and idx there, so its chunks are asked for and sent again. The index of every chunk
//! lives in memory (a `HashMap`, about 56 bytes a chunk), built from the idx files at open.
//! A read-only handle (another process beside the writer) reads the new tails of the idx files
//! when it misses: an entry is written after its data, so an entry seen means readable data.

mod format;

use crate::RepoError;
use ferry_chunk::ChunkId;
use format::*;
pub(crate) use format::{encode_entry, ENTRY_LEN, ENTRY_RECORD, HEADER_LEN};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// A new pack is started once the active one holds this many bytes.
pub(crate) const PACK_MAX: u64 = 1 << 30;

/// Where a chunk's record is: its pack, the record's offset (its header's), the blob's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    pub(crate) pack: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

impl Loc {
    pub(crate) fn blob_offset(&self) -> u64 {
        self.offset + HEADER_LEN as u64
    }
    fn end(&self) -> u64 {
        self.blob_offset() + self.len as u64
    }
}

/// Apply one idx entry: a record is the newest copy of its chunk (later entries and later packs
/// are newer); a tombstone removes its chunk only while the index still names that very record.
fn apply(
    index: &mut HashMap<ChunkId, Loc>,
    pack: u32,
    kind: u8,
    id: ChunkId,
    offset: u64,
    len: u32,
) {
    let loc = Loc { pack, offset, len };
    if kind == ENTRY_RECORD {
        index.insert(id, loc);
    } else if index.get(&id) == Some(&loc) {
        index.remove(&id);
    }
}

/// The pack being appended to (writable stores only).
struct Active {
    pack: u32,
    file: File,
    idx: File,
    len: u64,
    idx_len: u64,
}

pub(crate) struct Packs {
    dir: PathBuf,
    max: u64,
    writable: bool,
    index: RwLock<HashMap<ChunkId, Loc>>,
    /// The pack being appended to; every idx write happens under this lock.
    active: Mutex<Option<Active>>,
    /// Open read handles by pack.
    files: Mutex<HashMap<u32, Arc<File>>>,
    /// Read-only stores: how far each idx has been read.
    read_to: Mutex<HashMap<u32, u64>>,
    /// The last mark written to `packs/synced`.
    synced: Mutex<(u32, u64)>,
}

fn pack_numbers(dir: &Path, ext: &str) -> io::Result<Vec<u32>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(ext) {
            if stem.len() == 8 {
                if let Ok(n) = u32::from_str_radix(stem, 16) {
                    out.push(n);
                }
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

impl Packs {
    fn pack_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{n:08x}.pack"))
    }

    fn idx_path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("{n:08x}.idx"))
    }

    /// Open the packs of the repository under `root`. A writable open (the caller holds the
    /// repository's exclusive lock) recovers what a crash left above the `synced` mark.
    pub(crate) fn open(root: &Path, writable: bool, max: u64) -> Result<Packs, RepoError> {
        let dir = root.join("packs");
        if writable {
            fs::create_dir_all(&dir)?;
        }
        let packs = Packs {
            dir,
            max,
            writable,
            index: RwLock::new(HashMap::new()),
            active: Mutex::new(None),
            files: Mutex::new(HashMap::new()),
            read_to: Mutex::new(HashMap::new()),
            synced: Mutex::new((0, 0)),
        };
        if writable {
            packs.recover()?;
        } else {
            packs.reload()?;
        }
        Ok(packs)
    }

    fn read_synced(&self) -> (u32, u64) {
        match fs::read(self.dir.join("synced")) {
            Ok(b)
                if b.len() == 20
                    && b[..4] == SYNCED_MAGIC
                    && crc32c::crc32c(&b[..16]) == le32(&b[16..]) =>
            {
                (le32(&b[4..]), le64(&b[8..]))
            }
            // Absent (nothing committed yet) or unreadable: check every record.
            _ => (0, 0),
        }
    }

    fn recover(&self) -> Result<(), RepoError> {
        let (sp, sl) = self.read_synced();
        *self.synced.lock().expect("synced") = (sp, sl);
        let packs = pack_numbers(&self.dir, ".pack")?;
        // An idx whose pack is gone: compaction removed the pack and crashed before the idx.
        for n in pack_numbers(&self.dir, ".idx")? {
            if packs.binary_search(&n).is_err() {
                fs::remove_file(self.idx_path(n))?;
            }
        }
        let mut index = HashMap::new();
        for &n in &packs {
            let check_from = match n.cmp(&sp) {
                std::cmp::Ordering::Less => u64::MAX,
                std::cmp::Ordering::Equal => sl,
                std::cmp::Ordering::Greater => 0,
            };
            self.recover_pack(n, check_from, &mut index)?;
        }
        *self.index.write().expect("index") = index;
        if let Some(&n) = packs.last() {
            *self.active.lock().expect("active") = Some(self.open_active(n)?);
        }
        Ok(())
    }

    /// Load one pack's idx into `index`, checking every record that ends above `check_from`.
    /// The idx ends at its first torn entry or bad record; records the pack holds beyond the
    /// last indexed one are scanned (each checked) and indexed, and the pack is cut at the
    /// first that does not hold, so its chunks are asked for and sent again.
    fn recover_pack(
        &self,
        n: u32,
        check_from: u64,
        index: &mut HashMap<ChunkId, Loc>,
    ) -> Result<(), RepoError> {
        let pack = OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.pack_path(n))?;
        let idx = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.idx_path(n))?;
        let bytes = fs::read(self.idx_path(n))?;
        let mut pos = 0usize;
        let mut indexed_end = 0u64;
        while pos + ENTRY_LEN <= bytes.len() {
            let Some((kind, id, offset, len)) = decode_entry(&bytes[pos..pos + ENTRY_LEN]) else {
                break;
            };
            if kind == ENTRY_RECORD {
                let loc = Loc {
                    pack: n,
                    offset,
                    len,
                };
                // A bad record ends the idx here; the scan below then cuts the pack at the
                // first record that does not hold (this one, unless it lies past the end).
                if loc.end() > check_from && check_record(&pack, offset)? != Some((id, len)) {
                    break;
                }
                indexed_end = indexed_end.max(loc.end());
            }
            apply(index, n, kind, id, offset, len);
            pos += ENTRY_LEN;
        }
        if pos as u64 != bytes.len() as u64 {
            tracing::warn!(pack = n, at = pos, len = bytes.len(), "torn idx cut");
            idx.set_len(pos as u64)?;
        }
        // Records written before a crash whose idx entries were not: index them from the pack.
        let pack_len = pack.metadata()?.len();
        let mut off = indexed_end;
        let mut idx_len = pos as u64;
        while off < pack_len {
            let Some((id, len)) = check_record(&pack, off)? else {
                break;
            };
            idx.write_all_at(&encode_entry(ENTRY_RECORD, &id, off, len), idx_len)?;
            idx_len += ENTRY_LEN as u64;
            apply(index, n, ENTRY_RECORD, id, off, len);
            off = Loc {
                pack: n,
                offset: off,
                len,
            }
            .end();
        }
        if off < pack_len {
            tracing::warn!(
                pack = n,
                at = off,
                len = pack_len,
                "torn pack tail cut (its chunks will be sent again)"
            );
            pack.set_len(off)?;
        }
        Ok(())
    }

    fn open_active(&self, n: u32) -> io::Result<Active> {
        let open = |p: PathBuf| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
        };
        let file = open(self.pack_path(n))?;
        let idx = open(self.idx_path(n))?;
        let len = file.metadata()?.len();
        let idx_len = idx.metadata()?.len() / ENTRY_LEN as u64 * ENTRY_LEN as u64;
        Ok(Active {
            pack: n,
            file,
            idx,
            len,
            idx_len,
        })
    }

    /// Read-only stores: read what was appended to each idx since the last look, and drop
    /// packs that compaction removed.
    pub(crate) fn reload(&self) -> Result<(), RepoError> {
        let mut read_to = self.read_to.lock().expect("read_to");
        let packs = pack_numbers(&self.dir, ".idx")?;
        let gone: Vec<u32> = read_to
            .keys()
            .copied()
            .filter(|n| packs.binary_search(n).is_err())
            .collect();
        let mut new = Vec::new();
        for n in packs {
            let from = read_to.get(&n).copied().unwrap_or(0);
            let f = match File::open(self.idx_path(n)) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let len = f.metadata()?.len();
            if len <= from {
                continue;
            }
            let bytes = read_upto(&f, from, (len - from) as usize)?;
            let mut pos = 0;
            while pos + ENTRY_LEN <= bytes.len() {
                // An entry being written (or torn): stop, look again next time.
                let Some(e) = decode_entry(&bytes[pos..pos + ENTRY_LEN]) else {
                    break;
                };
                new.push((n, e));
                pos += ENTRY_LEN;
            }
            read_to.insert(n, from + pos as u64);
        }
        if gone.is_empty() && new.is_empty() {
            return Ok(());
        }
        let mut index = self.index.write().expect("index");
        if !gone.is_empty() {
            index.retain(|_, l| !gone.contains(&l.pack));
            let mut files = self.files.lock().expect("files");
            for n in &gone {
                read_to.remove(n);
                files.remove(n);
            }
        }
        for (n, (kind, id, offset, len)) in new {
            apply(&mut index, n, kind, id, offset, len);
        }
        Ok(())
    }

    /// Where a chunk is; a read-only store looks for new idx entries on a miss.
    pub(crate) fn lookup(&self, id: &ChunkId) -> Result<Option<Loc>, RepoError> {
        if let Some(l) = self.index.read().expect("index").get(id) {
            return Ok(Some(*l));
        }
        if self.writable {
            return Ok(None);
        }
        self.reload()?;
        Ok(self.index.read().expect("index").get(id).copied())
    }

    pub(crate) fn pack_file(&self, n: u32) -> PathBuf {
        self.pack_path(n)
    }

    fn file(&self, n: u32) -> io::Result<Arc<File>> {
        let mut files = self.files.lock().expect("files");
        if let Some(f) = files.get(&n) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.pack_path(n))?);
        files.insert(n, f.clone());
        Ok(f)
    }

    /// A chunk's blob; `Ok(None)` when it is not stored. A blob cut short (the pack was damaged
    /// under a read-only reader) is returned short, so authentication reports it.
    pub(crate) fn get(&self, id: &ChunkId) -> Result<Option<Vec<u8>>, RepoError> {
        for attempt in 0..2 {
            let Some(loc) = self.lookup(id)? else {
                return Ok(None);
            };
            let f = match self.file(loc.pack) {
                Ok(f) => f,
                // Compaction removed the pack after the lookup: its chunks are elsewhere now.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempt == 0 => {
                    if !self.writable {
                        self.reload()?;
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            return Ok(Some(read_upto(&f, loc.blob_offset(), loc.len as usize)?));
        }
        Ok(None)
    }

    /// The active pack, started anew when it is full (or when there is none yet).
    fn active<'a>(&self, g: &'a mut Option<Active>) -> io::Result<&'a mut Active> {
        let next = match g {
            None => Some(0),
            Some(a) if a.len >= self.max => Some(a.pack + 1),
            Some(_) => None,
        };
        if let Some(n) = next {
            *g = Some(self.open_active(n)?);
        }
        Ok(g.as_mut().expect("active pack"))
    }

    /// Append a record (see [`record`]) and its idx entry; the caller holds the active lock.
    fn append(&self, g: &mut Option<Active>, id: &ChunkId, rec: &[u8]) -> Result<Loc, RepoError> {
        let a = self.active(g)?;
        let offset = a.len;
        // Header and blob in one write: a crash leaves the record whole, torn or absent.
        a.file.write_all_at(rec, offset)?;
        let len = (rec.len() - HEADER_LEN) as u32;
        a.idx
            .write_all_at(&encode_entry(ENTRY_RECORD, id, offset, len), a.idx_len)?;
        a.len += rec.len() as u64;
        a.idx_len += ENTRY_LEN as u64;
        Ok(Loc {
            pack: a.pack,
            offset,
            len,
        })
    }

    /// Store a blob unless a blob of that id and length is stored. Returns true when written.
    /// One of another length (another compressor version, or one a crash left short) is
    /// replaced by a new record made durable before the index names it.
    pub(crate) fn put(&self, id: &ChunkId, blob: &[u8]) -> Result<bool, RepoError> {
        if !self.writable {
            return Err(RepoError::Invalid("the store is read-only".into()));
        }
        let known = |l: Option<&Loc>| l.is_some_and(|l| l.len as usize == blob.len());
        if known(self.index.read().expect("index").get(id)) {
            return Ok(false);
        }
        // Built before the lock: writers of several disks only queue for the write itself.
        let rec = record(id, blob);
        let mut g = self.active.lock().expect("active");
        let replace = match self.index.read().expect("index").get(id) {
            Some(l) if l.len as usize == blob.len() => return Ok(false),
            Some(l) => {
                tracing::warn!(chunk = %id, len = l.len, want = blob.len(),
                    "chunk of another length stored: replacing it durably");
                true
            }
            None => false,
        };
        let loc = self.append(&mut g, id, &rec)?;
        if replace {
            let a = g.as_ref().expect("active pack");
            a.file.sync_data()?;
            a.idx.sync_data()?;
        }
        self.index.write().expect("index").insert(*id, loc);
        Ok(true)
    }

    pub(crate) fn contains(&self, id: &ChunkId) -> Result<bool, RepoError> {
        Ok(self.lookup(id)?.is_some())
    }

    /// Every stored chunk: (id, blob length).
    pub(crate) fn list(&self) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        if !self.writable {
            self.reload()?;
        }
        let index = self.index.read().expect("index");
        Ok(index.iter().map(|(id, l)| (*id, l.len as u64)).collect())
    }

    /// Remove chunks: a tombstone in the idx of each one's pack (synced before returning),
    /// and out of the index. Returns the blob bytes removed.
    pub(crate) fn delete(&self, ids: &[ChunkId]) -> Result<u64, RepoError> {
        let mut g = self.active.lock().expect("active");
        let mut by_pack: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut bytes = 0;
        {
            let mut index = self.index.write().expect("index");
            for id in ids {
                if let Some(l) = index.remove(id) {
                    bytes += l.len as u64;
                    let e = encode_entry(ENTRY_TOMBSTONE, id, l.offset, l.len);
                    by_pack.entry(l.pack).or_default().extend_from_slice(&e);
                }
            }
        }
        for (n, entries) in by_pack {
            match g.as_mut() {
                Some(a) if a.pack == n => {
                    a.idx.write_all_at(&entries, a.idx_len)?;
                    a.idx_len += entries.len() as u64;
                    a.idx.sync_data()?;
                }
                _ => {
                    let mut f = OpenOptions::new().append(true).open(self.idx_path(n))?;
                    f.write_all(&entries)?;
                    f.sync_data()?;
                }
            }
        }
        Ok(bytes)
    }

    /// Rewrite every pack but the active one whose live records fill less than half of it:
    /// live records are appended to the active pack and synced, then the old pack and its idx
    /// are removed. Returns (packs removed, bytes reclaimed).
    pub(crate) fn compact(&self) -> Result<(u64, u64), RepoError> {
        let mut g = self.active.lock().expect("active");
        let Some(active) = g.as_ref().map(|a| a.pack) else {
            return Ok((0, 0));
        };
        let mut live: HashMap<u32, Vec<(ChunkId, Loc)>> = HashMap::new();
        for (id, l) in self.index.read().expect("index").iter() {
            live.entry(l.pack).or_default().push((*id, *l));
        }
        let mut victims = Vec::new();
        for n in pack_numbers(&self.dir, ".pack")? {
            if n >= active {
                continue;
            }
            let size = fs::metadata(self.pack_path(n))?.len();
            let recs = live.remove(&n).unwrap_or_default();
            let live_bytes: u64 = recs.iter().map(|(_, l)| l.end() - l.offset).sum();
            if live_bytes * 2 < size {
                victims.push((n, size - live_bytes, recs));
            }
        }
        if victims.is_empty() {
            return Ok((0, 0));
        }
        let mut moved = Vec::new();
        for (n, _, recs) in &victims {
            let f = self.file(*n)?;
            for (id, l) in recs {
                let mut blob = vec![0u8; l.len as usize];
                f.read_exact_at(&mut blob, l.blob_offset())?;
                moved.push((*id, self.append(&mut g, id, &record(id, &blob))?));
            }
        }
        if let Some(a) = g.as_ref() {
            a.file.sync_data()?;
            a.idx.sync_data()?;
        }
        // The copies may have started new packs: every pack above the old active one is synced.
        for n in pack_numbers(&self.dir, ".pack")?
            .into_iter()
            .filter(|&n| n > active)
        {
            File::open(self.pack_path(n))?.sync_data()?;
            File::open(self.idx_path(n))?.sync_data()?;
        }
        {
            let mut index = self.index.write().expect("index");
            for (id, loc) in moved {
                index.insert(id, loc);
            }
        }
        let mut reclaimed = 0;
        for (n, garbage, _) in &victims {
            self.files.lock().expect("files").remove(n);
            // Pack first: an idx left without its pack is removed at the next open.
            fs::remove_file(self.pack_path(*n))?;
            fs::remove_file(self.idx_path(*n))?;
            reclaimed += garbage;
        }
        crate::store::sync_dir(&self.dir)?;
        tracing::info!(packs = victims.len(), bytes = reclaimed, "packs compacted");
        Ok((victims.len() as u64, reclaimed))
    }

    /// The active pack and its length now: after a `syncfs`, everything below it is durable.
    pub(crate) fn sync_point(&self) -> (u32, u64) {
        let g = self.active.lock().expect("active");
        g.as_ref().map_or((0, 0), |a| (a.pack, a.len))
    }

    /// Record durably (temp, fsync, rename) that everything below `(pack, len)` is synced.
    pub(crate) fn mark_synced(&self, point: (u32, u64)) -> Result<(), RepoError> {
        let mut s = self.synced.lock().expect("synced");
        if point <= *s {
            return Ok(());
        }
        let mut b = Vec::with_capacity(20);
        b.extend_from_slice(&SYNCED_MAGIC);
        b.extend_from_slice(&point.0.to_le_bytes());
        b.extend_from_slice(&point.1.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        let tmp = self.dir.join("synced.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&b)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, self.dir.join("synced"))?;
        crate::store::sync_dir(&self.dir)?;
        *s = point;
        Ok(())
    }
}
