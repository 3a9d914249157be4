//! The object store: sealed chunks and sealed map pages, each a file named by its 32-byte id.
//!
//! Why: content addressing makes dedup a file-existence test and makes every object
//! self-checking (the name is a keyed hash of the plaintext, and the blob's AEAD binds the name),
//! so the store itself never has to be trusted. Objects are immutable: a write goes to a temp file
//! in `tmp/` and is renamed into place, so a crash leaves either nothing or a whole object, and
//! an object that already exists is never rewritten.
//!
//! How: `chunks/<first byte hex>/<64 hex>` and `maps/<first byte hex>/<64 hex>`. Durability is
//! not per object: a checkpoint commit calls `syncfs` once on the repository filesystem before
//! writing its root (see `root.rs`), which covers every object and directory entry written before.
//! A chunk's writeback is started as soon as it is written (`POSIX_FADV_DONTNEED`: write back
//! without waiting, drop the clean pages), so that flush is spread over the checkpoint rather
//! than paid at its commit.

use crate::RepoError;
use ferry_chunk::ChunkId;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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

pub(crate) struct Store {
    root: PathBuf,
    tmp_seq: AtomicU64,
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
        Ok(Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
        })
    }

    /// Open the store of an existing repository without touching it (read-only handles).
    pub(crate) fn open_existing(root: &Path) -> Store {
        Store {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn path(&self, kind: Kind, id: &ChunkId) -> PathBuf {
        let h = id.to_hex();
        self.root.join(kind.dir()).join(&h[..2]).join(h)
    }

    pub(crate) fn exists(&self, kind: Kind, id: &ChunkId) -> bool {
        self.path(kind, id).is_file()
    }

    /// A fresh temp path in `tmp/` (same filesystem as every destination, so rename is atomic).
    pub(crate) fn tmp_path(&self, tag: &str) -> PathBuf {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{tag}-{}-{n}", std::process::id()))
    }

    /// Store a blob unless an object of that name exists. Returns true when it was written.
    pub(crate) fn put(&self, kind: Kind, id: &ChunkId, blob: &[u8]) -> Result<bool, RepoError> {
        let dest = self.path(kind, id);
        if dest.is_file() {
            return Ok(false);
        }
        let tmp = self.tmp_path("obj");
        let res = (|| -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(blob)?;
            if kind == Kind::Chunk {
                // Start writing the chunk back now (without waiting), so the commit's `syncfs`
                // finds most of a checkpoint's data on disk already instead of flushing it all
                // at once; the clean pages are dropped (a chunk is rarely read back soon).
                let _ = rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed);
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
        Ok(true)
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
