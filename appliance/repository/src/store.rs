//! The object store: sealed chunks in append-only pack files, sealed map pages one file each,
//! both named by their 32-byte id.
//!
//! Why: content addressing makes dedup an index lookup and makes every object self-checking
//! (the name is a keyed hash of the plaintext, and the blob's AEAD binds the name), so the store
//! itself never has to be trusted. Objects are immutable: a crash leaves either nothing or a
//! whole object that is checked before it is trusted, and a stored object is never rewritten.
//! Chunks are many (a seed stores ~12,000 per GiB of disk) and go to pack files ([`crate::pack`]):
//! as one file each, inode and directory-entry creation cost the master target more CPU than
//! the data itself. Map pages are few and stay one file each.
//!
//! How: `packs/<8 hex>.pack` + `.idx` for chunks (see `pack.rs`), `maps/<first byte hex>/<64 hex>`
//! for pages. Repositories written before packs keep their `chunks/<first byte hex>/<64 hex>`
//! files: they are still read (only when the store saw such files at open, so a new repository
//! never looks there), listed and removed by gc; new chunks always go to packs. A new page is
//! written as an unnamed file (`O_TMPFILE`) in its directory and linked to its name when
//! whole (so a crash leaves no temp file at all); where that is not available, through a temp
//! file in `tmp/` (removed at the next open after a crash) and a rename. Durability is
//! not per object: a checkpoint commit calls `syncfs` once on the repository filesystem before
//! writing its root (see `root.rs`), which covers every pack append, page and directory entry
//! written before; then the packs record how far they are synced (`packs/synced`).
//! So that this flush is spread over the checkpoint rather than paid at its commit, a flusher
//! thread calls `syncfs` whenever another [`FLUSH_EVERY`] bytes of chunks were written (the
//! writers never wait for it).

use crate::pack::{Packs, PACK_MAX};
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
    packs: Packs,
    /// Whether `chunks/` held files at open (a repository written before packs).
    legacy: bool,
}

fn has_legacy_chunks(root: &Path) -> bool {
    fs::read_dir(root.join("chunks")).is_ok_and(|mut d| d.next().is_some())
}

impl Store {
    /// Open the store under `root`, creating its directories and removing temp files left by a
    /// crash (the caller holds the repository's exclusive lock, so no one else is writing them).
    pub(crate) fn open(root: &Path) -> Result<Store, RepoError> {
        Self::open_sized(root, PACK_MAX)
    }

    /// [`Store::open`] with packs of at most about `pack_max` bytes (small in tests).
    pub(crate) fn open_sized(root: &Path, pack_max: u64) -> Result<Store, RepoError> {
        for d in ["maps", "disks", "tmp"] {
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
            packs: Packs::open(root, true, pack_max)?,
            legacy: has_legacy_chunks(root),
        })
    }

    /// Open the store of an existing repository without touching it (read-only handles).
    pub(crate) fn open_existing(root: &Path) -> Result<Store, RepoError> {
        Ok(Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            linked: AtomicBool::new(true),
            link_by_fd: AtomicBool::new(true),
            unflushed: AtomicU64::new(0),
            flush: None,
            packs: Packs::open(root, false, PACK_MAX)?,
            legacy: has_legacy_chunks(root),
        })
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

    /// Whether an object of that name is stored. A chunk: an index lookup (packs recover torn
    /// records at open, so an indexed chunk is whole). A page (or a chunk file of a repository
    /// written before packs): a file too short to be any blob (a power loss can leave an unsynced
    /// object empty: ext4 allocates a renamed file's blocks late) does not count, so it is asked
    /// for and written again. A file torn to some other length still counts here (the expected
    /// length is not known without the blob); `ferry verify` finds it, and `put` replaces it
    /// when the blob arrives again.
    pub(crate) fn exists(&self, kind: Kind, id: &ChunkId) -> bool {
        if kind == Kind::Chunk {
            if self.packs.contains(id).unwrap_or(false) {
                return true;
            }
            if !self.legacy {
                return false;
            }
        }
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
    ///
    /// Chunks go to packs (see [`Packs::put`] for the same rule there); a chunk of a
    /// repository written before packs that is stored as a file of the same length is kept.
    pub(crate) fn put(&self, kind: Kind, id: &ChunkId, blob: &[u8]) -> Result<bool, RepoError> {
        if kind == Kind::Chunk {
            if self.legacy
                && !self.packs.contains(id)?
                && fs::metadata(self.path(kind, id)).is_ok_and(|m| m.len() == blob.len() as u64)
            {
                return Ok(false);
            }
            let written = self.packs.put(id, blob)?;
            if written {
                self.written(kind, blob.len());
            }
            return Ok(written);
        }
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
        if kind == Kind::Chunk {
            if let Some(blob) = self.packs.get(id)? {
                return Ok(Some(blob));
            }
            if !self.legacy {
                return Ok(None);
            }
        }
        match fs::read(self.path(kind, id)) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every object of a kind: (id, size). Files whose names are not ids are ignored.
    pub(crate) fn list(&self, kind: Kind) -> Result<Vec<(ChunkId, u64)>, RepoError> {
        let mut out = Vec::new();
        if kind == Kind::Chunk {
            out = self.packs.list()?;
            if !self.legacy {
                return Ok(out);
            }
        }
        let packed: std::collections::HashSet<ChunkId> = out.iter().map(|c| c.0).collect();
        let dir = match fs::read_dir(self.root.join(kind.dir())) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for sub in dir {
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
                if !packed.contains(&id) {
                    out.push((id, e.metadata()?.len()));
                }
            }
        }
        Ok(out)
    }

    /// Remove objects (gc): pages' files; chunks' pack records (tombstoned, synced) and any
    /// file a repository written before packs holds for them.
    pub(crate) fn remove(&self, kind: Kind, ids: &[ChunkId]) -> Result<(), RepoError> {
        if kind == Kind::Chunk {
            self.packs.delete(ids)?;
            if !self.legacy {
                return Ok(());
            }
        }
        for id in ids {
            match fs::remove_file(self.path(kind, id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Rewrite packs that are mostly garbage after a gc. Returns (packs removed, bytes freed).
    pub(crate) fn compact(&self) -> Result<(u64, u64), RepoError> {
        self.packs.compact()
    }

    /// Move a chunk's bytes to `quarantine/<id hex>` and out of the store. False when the
    /// chunk was not stored.
    pub(crate) fn quarantine(&self, id: &ChunkId) -> Result<bool, RepoError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir)?;
        let dest = dir.join(id.to_hex());
        if let Some(blob) = self.packs.get(id)? {
            let mut f = File::create(&dest)?;
            f.write_all(&blob)?;
            f.sync_all()?;
            self.packs.delete(&[*id])?;
            return Ok(true);
        }
        if !self.legacy {
            return Ok(false);
        }
        match fs::rename(self.path(Kind::Chunk, id), &dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Where a chunk's blob lies on disk: (file, offset of the blob, length).
    pub(crate) fn chunk_location(
        &self,
        id: &ChunkId,
    ) -> Result<Option<(PathBuf, u64, u32)>, RepoError> {
        if let Some(l) = self.packs.lookup(id)? {
            return Ok(Some((self.packs.pack_file(l.pack), l.blob_offset(), l.len)));
        }
        if self.legacy {
            let p = self.path(Kind::Chunk, id);
            if let Ok(m) = fs::metadata(&p) {
                return Ok(Some((p, 0, m.len() as u32)));
            }
        }
        Ok(None)
    }

    /// Make everything written so far durable: one `syncfs` on the repository's filesystem.
    /// Then the packs record how far that covers them (`packs/synced`).
    pub(crate) fn sync_all(&self) -> Result<(), RepoError> {
        let point = self.packs.sync_point();
        let dir = File::open(&self.root)?;
        rustix::fs::syncfs(&dir).map_err(io::Error::from)?;
        if self.flush.is_some() {
            self.packs.mark_synced(point)?;
        }
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
mod tests;
