//! The object store: sealed chunks and sealed map pages, each a file named by its 32-byte id.
//!
//! Why: content addressing makes dedup a file-existence test and makes every object
//! self-checking (the name is a keyed hash of the plaintext, and the blob's AEAD binds the name),
//! so the store itself never has to be trusted. Objects are immutable: a write goes to a temp file
//! in `tmp/` and is renamed into place, so a crash leaves either nothing or a whole object, and
//! an object that already exists is never rewritten.
//!
//! How: `chunks/<first byte hex>/<64 hex>` and `maps/<first byte hex>/<64 hex>`. A new object
//! is written as an unnamed file (`O_TMPFILE`) in its directory and linked to its name when
//! whole (so a crash leaves no temp file at all); where that is not available, through a temp
//! file in `tmp/` (removed at the next open after a crash) and a rename. Durability is
//! not per object: a checkpoint commit calls `syncfs` once on the repository filesystem before
//! writing its root (see `root.rs`), which covers every object and directory entry written before.
//! So that this flush is spread over the checkpoint rather than paid at its commit, a flusher
//! thread calls `syncfs` whenever another [`FLUSH_EVERY`] bytes of chunks were written (the
//! writers never wait for it). One filesystem-wide flush per 64 MiB costs the machine much less
//! than starting each chunk's writeback on its own (`POSIX_FADV_DONTNEED` per chunk, as before:
//! about a quarter more CPU over 60,000 chunk files, in small writes).

use crate::RepoError;
use ferry_chunk::ChunkId;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Which object namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Chunk,
    Page,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Chunk => "chunks",
            Kind::Page => "maps",
        }
    }
}

/// Chunk bytes written between two background flushes.
const FLUSH_EVERY: u64 = 64 << 20;

pub(crate) struct Store {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// New objects are written as unnamed files linked into place ([`Store::put_linked`]) until
    /// the filesystem or the process's view of `/proc` shows it cannot do that.
    linked: AtomicBool,
    /// Whether linking an unnamed file by its descriptor (`AT_EMPTY_PATH`) works here; when it
    /// does not (before Linux 6.10 it needs `CAP_DAC_READ_SEARCH`), by its `/proc` path.
    link_by_fd: AtomicBool,
    /// Chunk bytes written since the flusher was last woken.
    unflushed: AtomicU64,
    /// Wakes the flusher thread (writable stores only); it ends when the store is dropped.
    flush: Option<std::sync::mpsc::SyncSender<()>>,
}

impl Store {
    /// Open the store under `root`, creating its directories and removing temp files left by a
    /// crash (the caller holds the repository's exclusive lock, so no one else is writing them).
    pub(crate) fn open(root: &Path) -> Result<Store, RepoError> {
        for d in ["chunks", "maps", "disks", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        for e in fs::read_dir(root.join("tmp"))? {
            let e = e?;
            if e.file_type()?.is_file() {
                let _ = fs::remove_file(e.path());
            }
        }
        let (flush, wake) = std::sync::mpsc::sync_channel::<()>(1);
        let dir = File::open(root)?;
        std::thread::Builder::new()
            .name("repo-flush".into())
            .spawn(move || {
                while wake.recv().is_ok() {
                    if let Err(e) = rustix::fs::syncfs(&dir) {
                        tracing::warn!(error = %e, "flushing the repository in the background");
                    }
                }
            })?;
        Ok(Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            linked: AtomicBool::new(true),
            link_by_fd: AtomicBool::new(true),
            unflushed: AtomicU64::new(0),
            flush: Some(flush),
        })
    }

    /// Open the store of an existing repository without touching it (read-only handles).
    pub(crate) fn open_existing(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            linked: AtomicBool::new(true),
            link_by_fd: AtomicBool::new(true),
            unflushed: AtomicU64::new(0),
            flush: None,
        }
    }

    /// Count a chunk's bytes toward the next background flush, and wake the flusher when
    /// another [`FLUSH_EVERY`] are written (if it is still flushing, that flush covers them).
    fn written(&self, kind: Kind, len: usize) {
        if kind != Kind::Chunk {
            return;
        }
        let before = self.unflushed.fetch_add(len as u64, Ordering::Relaxed);
        if before + len as u64 >= FLUSH_EVERY
            && self
                .unflushed
                .compare_exchange(before + len as u64, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            if let Some(f) = &self.flush {
                let _ = f.try_send(());
            }
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn path(&self, kind: Kind, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.root.join(kind.dir()).join(&h[..2]).join(h)
    }

    /// Whether an object of that name is stored. A file too short to be any blob (a power loss
    /// can leave an unsynced object empty: ext4 allocates a renamed file's blocks late) does not
    /// count, so it is asked for and written again. A file torn to some other length still
    /// counts here (the expected length is not known without the blob); `ferry verify` finds
    /// it, and `put` replaces it when the blob arrives again.
    pub(crate) fn exists(&self, kind: Kind, id: &ChunkId) -> bool {
        fs::metadata(self.path(kind, id))
            .is_ok_and(|m| m.is_file() && m.len() >= ferry_chunk::MIN_BLOB_LEN as u64)
    }

    /// A fresh temp path in `tmp/` (same filesystem as every destination, so rename is atomic).
    pub(crate) fn tmp_path(&self, tag: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{tag}-{}-{n}", std::process::id()))
    }

    /// Store a blob unless an object of that name exists. Returns true when it was written.
    ///
    /// An existing object of another length is replaced: after a power loss, an object renamed
    /// into place by a checkpoint that never committed (so never synced) can be left empty or
    /// short, and dedup must not build a new point on it. Blobs of one name normally have one
    /// length (the same plaintext compressed the same way, a fixed header and tag), but another
    /// zstd version may compress differently, so the existing object may also be a committed,
    /// good one: the replacement is made durable (fsync) before it is renamed over it, so a
    /// power loss leaves one whole object or the other, never an empty one.
    pub(crate) fn put(&self, kind: Kind, id: &ChunkId, blob: &[u8]) -> Result<bool, RepoError> {
        let dest = self.path(kind, id);
        let mut replace = false;
        if let Ok(m) = fs::metadata(&dest) {
            if m.is_file() && m.len() == blob.len() as u64 {
                return Ok(false);
            }
            tracing::warn!(path = %dest.display(), len = m.len(), want = blob.len(),
                "object of another length (left short by a crash?): replacing it durably");
            replace = true;
        }
        if !replace {
            if let Some(written) = self.put_linked(kind, &dest, blob)? {
                return Ok(written);
            }
        }
        let tmp = self.tmp_path("obj");
        let res = (|| -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(blob)?;
            if replace {
                f.sync_all()?;
            }
            drop(f);
            match fs::rename(&tmp, &dest) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(dest.parent().expect("object path has a parent"))?;
                    fs::rename(&tmp, &dest)
                }
                r => r,
            }
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        self.written(kind, blob.len());
        Ok(true)
    }

    /// Store a new object as an unnamed file (`O_TMPFILE`) in its own directory, linked to its
    /// name once written: a crash before the link leaves nothing (the filesystem frees the
    /// orphan), and writers storing objects in parallel do not queue on one temp directory and
    /// on cross-directory renames. Durability is as for a renamed temp file: the commit's
    /// `syncfs`. `Ok(None)` when the filesystem or `/proc` does not allow it (then, and for the
    /// rest of this store's life, the caller writes a temp file and renames it).
    /// `Ok(Some(false))` when the name appeared meanwhile (another session stored the same
    /// object: content-addressed, so it is the same object).
    fn put_linked(&self, kind: Kind, dest: &Path, blob: &[u8]) -> Result<Option<bool>, RepoError> {
        use rustix::fs::{AtFlags, Mode, OFlags, CWD};
        use rustix::io::Errno;
        if !self.linked.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let dir = dest.parent().expect("object path has a parent");
        let flags = OFlags::WRONLY | OFlags::TMPFILE | OFlags::CLOEXEC;
        let mode = Mode::from_raw_mode(0o666);
        let fd = match rustix::fs::open(dir, flags, mode) {
            Err(Errno::NOENT) => {
                fs::create_dir_all(dir)?;
                rustix::fs::open(dir, flags, mode)
            }
            r => r,
        };
        let fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                tracing::info!(error = %e, "unnamed temp files not available: objects are written by rename");
                self.linked.store(false, Ordering::Relaxed);
                return Ok(None);
            }
        };
        let mut f = File::from(fd);
        f.write_all(blob)?;
        let mut linked = Err(Errno::NOENT);
        if self.link_by_fd.load(Ordering::Relaxed) {
            // By the descriptor itself: no walk through /proc (a third of the cost of storing
            // a small object that way).
            linked = rustix::fs::linkat(&f, "", CWD, dest, AtFlags::EMPTY_PATH);
            if matches!(linked, Err(Errno::NOENT | Errno::PERM | Errno::INVAL)) {
                self.link_by_fd.store(false, Ordering::Relaxed);
            }
        }
        if !self.link_by_fd.load(Ordering::Relaxed) {
            let proc_path = format!("/proc/self/fd/{}", f.as_raw_fd());
            linked = rustix::fs::linkat(CWD, &proc_path, CWD, dest, AtFlags::SYMLINK_FOLLOW);
        }
        match linked {
            Ok(()) => {
                self.written(kind, blob.len());
                Ok(Some(true))
            }
            Err(Errno::EXIST) => Ok(Some(false)),
            Err(e) => {
                tracing::info!(error = %e, "linking an unnamed temp file failed: objects are written by rename");
                self.linked.store(false, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Read an object; `Ok(None)` when it does not exist.
    pub(crate) fn get(&self, kind: Kind, id: &ChunkId) -> Result<Option<Vec<u8>>, RepoError> {
        match fs::read(self.path(kind, id)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object of a kind: (id, path, size). Files whose names are not ids are ignored.
    pub(crate) fn list(&self, kind: Kind) -> Result<Vec<(ChunkId, PathBuf, u64)>, RepoError> {
        let mut out = Vec::new();
        for sub in fs::read_dir(self.root.join(kind.dir()))? {
            let sub = sub?;
            if !sub.file_type()?.is_dir() {
                continue;
            }
            for e in fs::read_dir(sub.path())? {
                let e = e?;
                let name = e.file_name();
                let Some(id) = name.to_str().and_then(|s| s.parse::<ChunkId>().ok()) else {
                    continue;
                };
                out.push((id, e.path(), e.metadata()?.len()));
            }
        }
        Ok(out)
    }

    /// Make everything written so far durable: one `syncfs` on the repository's filesystem.
    pub(crate) fn sync_all(&self) -> Result<(), RepoError> {
        let dir = File::open(&self.root)?;
        rustix::fs::syncfs(&dir).map_err(io::Error::from)?;
        Ok(())
    }
}

/// Replace `dest` atomically and durably: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_durable(store: &Store, dest: &Path, bytes: &[u8]) -> Result<(), RepoError> {
    let tmp = store.tmp_path("file");
    let res = (|| -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dest)?;
        sync_dir(dest.parent().expect("file has a parent"))
    })();
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_left_short_by_a_crash_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = ChunkId([7; 32]);
        let blob = vec![0x5a; 1000];
        assert!(store.put(Kind::Chunk, &id, &blob).unwrap());
        assert!(!store.put(Kind::Chunk, &id, &blob).unwrap(), "deduplicated");
        // Power loss after the rename, before any sync: an empty file under the name.
        std::fs::write(store.path(Kind::Chunk, &id), b"").unwrap();
        assert!(
            !store.exists(Kind::Chunk, &id),
            "an empty object counts as stored"
        );
        assert!(
            store.put(Kind::Chunk, &id, &blob).unwrap(),
            "the empty object was trusted"
        );
        assert_eq!(store.get(Kind::Chunk, &id).unwrap().unwrap(), blob);
    }

    #[test]
    fn new_objects_leave_no_temp_files_and_a_name_taken_meanwhile_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..20u8 {
            let blob = vec![i; 100 + i as usize];
            assert!(store.put(Kind::Chunk, &ChunkId([i; 32]), &blob).unwrap());
            assert!(store.put(Kind::Page, &ChunkId([i; 32]), &blob).unwrap());
            assert_eq!(
                store.get(Kind::Chunk, &ChunkId([i; 32])).unwrap().unwrap(),
                blob
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(store.list(Kind::Chunk).unwrap().len(), 20);
        // Where a descriptor cannot be linked by itself, through /proc: the same objects.
        store.link_by_fd.store(false, Ordering::Relaxed);
        for i in 20..24u8 {
            let blob = vec![i; 100 + i as usize];
            assert!(store.put(Kind::Chunk, &ChunkId([i; 32]), &blob).unwrap());
            assert_eq!(
                store.get(Kind::Chunk, &ChunkId([i; 32])).unwrap().unwrap(),
                blob
            );
        }
        assert_eq!(store.list(Kind::Chunk).unwrap().len(), 24);
        // Another writer stored the object between the check and the link: its copy stays.
        let id = ChunkId([99; 32]);
        let dest = store.path(Kind::Chunk, &id);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::write(&dest, vec![1u8; 64]).unwrap();
        if let Some(written) = store.put_linked(Kind::Chunk, &dest, &[2u8; 64]).unwrap() {
            assert!(!written);
        }
        assert_eq!(std::fs::read(&dest).unwrap(), vec![1u8; 64]);
    }
}
