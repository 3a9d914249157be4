//! The recovery repository: where the master target keeps every recovery point of every disk.
//!
//! Why: the recovery site must be able to serve any checkpoint of any disk at once, keep
//! thousands of them cheaply, and never hand out data that is not exactly what the protected
//! disk held — while the storage underneath holds only ciphertext and names. So:
//! - chunks (sealed blocks, see `ferry-chunk`) are stored once, content-addressed, still
//!   encrypted; a chunk is authenticated against its name on every read ([`store`]);
//! - each point is a copy-on-write radix tree of authenticated map pages ([`map`]);
//! - a point becomes visible only when its MAC'd root file appears, after everything it names
//!   is durable ([`root`], [`writer`]);
//! - readers ([`PointReader`]) serve a point read-only with bounded caches;
//! - holds keep the points a failover uses, across processes and restarts ([`holds`]);
//! - retention thins old points, gc removes what no point names, verify audits everything
//!   ([`retention`], [`verify`]); export writes a point as a raw or qcow2 image ([`export`]).
//!
//! The on-disk layout is described byte by byte in `docs/formats.md`.

mod export;
mod holds;
mod map;
mod pack;
mod reader;
mod retention;
mod root;
mod store;
mod verify;
mod writer;

pub use export::ExportFormat;
pub use ferry_chunk::{ChunkId, TenantKey};
pub use holds::{HeldPoint, Hold};
pub use reader::PointReader;
pub use retention::{HeldBack, Retention, RetentionPolicy, RetentionReport, RetentionTier};
pub use verify::{BadObject, GcReport, VerifyReport};
pub use writer::{CheckpointWriter, VerifiedChunk};

use map::{Lru, Page};
use root::PointRecord;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use store::{Kind, Store};

/// How a point was made consistent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    Crash,
    Application,
}

/// What the sender says about a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub seq: u64,
    pub created_unix_ns: u64,
    pub journal_start: u64,
    pub journal_end: u64,
    pub disk_size: u64,
    pub block_size: u32,
    pub consistency: Consistency,
    /// The consistency-group cut this point ends at (see `ferry_wire::Checkpoint::group_cut`):
    /// the machine's other disks have points with the same value, and together they are one
    /// crash-consistent state of the machine. Absent from roots written without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_cut: Option<u64>,
}

/// A committed, authenticated recovery point.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryPoint {
    pub disk: String,
    pub meta: CheckpointMeta,
    /// Blocks written (data, zero or patch) by this checkpoint.
    pub changed_blocks: u64,
    /// Bytes of new chunk blobs this point added to the store.
    pub stored_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub disk_size: u64,
    pub block_size: u32,
    pub points: usize,
    pub latest: Option<RecoveryPoint>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("chunk {0} is not in the repository")]
    MissingChunk(ChunkId),
    #[error("chunk {id} is bad: {reason}")]
    BadChunk { id: ChunkId, reason: String },
    #[error("map page {id} is bad: {reason}")]
    BadPage { id: ChunkId, reason: String },
    #[error(
        "checkpoint out of order: expected seq > {expected_seq} continuing the journal, got {got}"
    )]
    OutOfOrder { expected_seq: u64, got: u64 },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("busy: {0}")]
    Busy(String),
    #[error("repository was created with a different tenant key")]
    WrongKey,
    #[error("repository metadata is corrupt: {0}")]
    Corrupt(String),
    #[error("export failed: {0}")]
    Export(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// State shared with readers (which own an `Arc` of it and outlive any borrow of the repository).
pub(crate) struct Inner {
    pub(crate) key: TenantKey,
    pub(crate) store: Store,
    /// Decrypted, authenticated pages by id (ids bind position, so the id alone is the key).
    pub(crate) pages: Mutex<Lru<ChunkId, Arc<Page>>>,
    /// Points with live readers (disk, seq) → count: retention does not delete them.
    pub(crate) pins: Mutex<HashMap<(String, u64), usize>>,
}

const PAGE_CACHE: usize = 256; // 256 * 32 KiB = 8 MiB

#[derive(Default)]
struct DiskState {
    points: BTreeMap<u64, PointRecord>,
    writing: bool,
}

/// Writers and gc exclude each other: writers count themselves in, gc waits for zero writers
/// while holding new writers back (so a stream of checkpoints cannot starve it).
#[derive(Default)]
pub(crate) struct Gate {
    writers: usize,
    gc: bool,
}

pub struct Repository {
    inner: Arc<Inner>,
    disks: Mutex<BTreeMap<String, DiskState>>,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    /// The exclusive lock of the one process that may change the repository; `None` for a
    /// read-only handle, which other processes (export, instant access, verify) may hold freely.
    _lock: Option<File>,
}

#[derive(Serialize, Deserialize)]
struct RepoFile {
    format: String,
    version: u32,
    key_check: String,
}

const REPO_FORMAT: &str = "ferry-repository";

impl Repository {
    /// Open (or create) the repository at `root`. Refuses a repository made with another key,
    /// and one already opened by another process.
    pub fn open(root: &Path, key: TenantKey) -> Result<Repository, RepoError> {
        fs::create_dir_all(root)?;
        let lock = File::create(root.join("repo.lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|_| RepoError::Busy("repository is open in another process".into()))?;
        Self::open_with(root, key, Some(lock))
    }

    /// Open an existing repository for reading only, beside the process that writes it (the
    /// master target): listing, export, instant access and verify. Objects are immutable and
    /// roots appear atomically, so a reader sees whole points only. `begin`, retention and gc
    /// are refused on such a handle.
    pub fn open_read_only(root: &Path, key: TenantKey) -> Result<Repository, RepoError> {
        if !root.join("repo.json").exists() {
            return Err(RepoError::NotFound(format!(
                "repository {}",
                root.display()
            )));
        }
        Self::open_with(root, key, None)
    }

    fn open_with(root: &Path, key: TenantKey, lock: Option<File>) -> Result<Repository, RepoError> {
        let check = hex::encode(key.mac("repo-check", b""));
        let meta_path = root.join("repo.json");
        let store = if lock.is_some() {
            Store::open(root)?
        } else {
            Store::open_existing(root)?
        };
        match fs::read(&meta_path) {
            Ok(bytes) => {
                let f: RepoFile = serde_json::from_slice(&bytes)
                    .map_err(|e| RepoError::Corrupt(format!("repo.json: {e}")))?;
                if f.format != REPO_FORMAT || f.version != 1 {
                    return Err(RepoError::Corrupt("repo.json: unknown format".into()));
                }
                if f.key_check != check {
                    return Err(RepoError::WrongKey);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let f = RepoFile {
                    format: REPO_FORMAT.into(),
                    version: 1,
                    key_check: check,
                };
                let bytes = serde_json::to_vec_pretty(&f).expect("repo.json serializes");
                store::write_durable(&store, &meta_path, &bytes)?;
            }
            Err(e) => return Err(e.into()),
        }
        let inner = Arc::new(Inner {
            key,
            store,
            pages: Mutex::new(Lru::new(PAGE_CACHE)),
            pins: Mutex::new(HashMap::new()),
        });
        let mut disks = BTreeMap::new();
        for name in root::list_disks(root)? {
            let mut st = DiskState::default();
            for seq in root::list_seqs(root, &name)? {
                match root::read_root(&inner.key, root, &name, seq) {
                    Ok(rec) => {
                        st.points.insert(seq, rec);
                    }
                    Err((why, _)) => {
                        tracing::warn!(disk = %name, seq, "ignoring root: {why}");
                    }
                }
            }
            disks.insert(name, st);
        }
        Ok(Repository {
            inner,
            disks: Mutex::new(disks),
            gate: Mutex::new(Gate::default()),
            gate_cv: Condvar::new(),
            _lock: lock,
        })
    }

    /// Every disk with a directory in the repository (including ones with no point yet).
    pub fn disks(&self) -> Vec<DiskInfo> {
        let disks = self.disks.lock().expect("disks");
        disks
            .iter()
            .map(|(name, st)| {
                let latest = st.points.values().next_back().map(|r| r.point.clone());
                DiskInfo {
                    name: name.clone(),
                    disk_size: latest.as_ref().map_or(0, |p| p.meta.disk_size),
                    block_size: latest.as_ref().map_or(0, |p| p.meta.block_size),
                    points: st.points.len(),
                    latest,
                }
            })
            .collect()
    }

    /// A disk's points, oldest first.
    pub fn points(&self, disk: &str) -> Result<Vec<RecoveryPoint>, RepoError> {
        let disks = self.disks.lock().expect("disks");
        let st = disks
            .get(disk)
            .ok_or_else(|| RepoError::NotFound(format!("disk {disk}")))?;
        Ok(st.points.values().map(|r| r.point.clone()).collect())
    }

    pub fn latest(&self, disk: &str) -> Option<RecoveryPoint> {
        self.latest_record(disk).map(|r| r.point)
    }

    /// Changes need the exclusive handle.
    pub(crate) fn writable(&self) -> Result<(), RepoError> {
        match self._lock {
            Some(_) => Ok(()),
            None => Err(RepoError::Invalid(
                "the repository was opened read-only (the master target owns it)".into(),
            )),
        }
    }

    pub(crate) fn latest_record(&self, disk: &str) -> Option<PointRecord> {
        let disks = self.disks.lock().expect("disks");
        disks
            .get(disk)
            .and_then(|st| st.points.values().next_back().cloned())
    }

    pub(crate) fn record(&self, disk: &str, seq: u64) -> Result<PointRecord, RepoError> {
        let disks = self.disks.lock().expect("disks");
        disks
            .get(disk)
            .and_then(|st| st.points.get(&seq).cloned())
            .ok_or_else(|| RepoError::NotFound(format!("point {disk}@{seq}")))
    }

    /// Start a checkpoint of `disk`. See [`CheckpointWriter`]. One writer per disk at a time
    /// (a second gets `Busy`); waits while a gc is running.
    pub fn begin(
        &self,
        disk: &str,
        meta: CheckpointMeta,
    ) -> Result<CheckpointWriter<'_>, RepoError> {
        self.writable()?;
        if !root::valid_disk_name(disk) {
            return Err(RepoError::Invalid(format!("bad disk name {disk:?}")));
        }
        if meta.block_size == 0 || meta.block_size as usize > ferry_chunk::MAX_PLAINTEXT {
            return Err(RepoError::Invalid(format!(
                "bad block size {}",
                meta.block_size
            )));
        }
        if meta.journal_end < meta.journal_start {
            return Err(RepoError::Invalid(
                "journal_end before journal_start".into(),
            ));
        }
        let prev = {
            let mut disks = self.disks.lock().expect("disks");
            let st = disks.entry(disk.to_string()).or_default();
            if st.writing {
                return Err(RepoError::Busy(format!("disk {disk} already has a writer")));
            }
            let prev = st.points.values().next_back().cloned();
            if let Some(p) = &prev {
                let pm = &p.point.meta;
                if meta.seq <= pm.seq || meta.journal_start != pm.journal_end {
                    tracing::warn!(
                        disk,
                        latest_seq = pm.seq,
                        latest_journal_end = pm.journal_end,
                        seq = meta.seq,
                        journal_start = meta.journal_start,
                        "checkpoint out of order"
                    );
                    return Err(RepoError::OutOfOrder {
                        expected_seq: pm.seq + 1,
                        got: meta.seq,
                    });
                }
                if meta.block_size != pm.block_size {
                    return Err(RepoError::Invalid(format!(
                        "block size of {disk} is {}, not {}",
                        pm.block_size, meta.block_size
                    )));
                }
                if meta.disk_size < pm.disk_size {
                    return Err(RepoError::Invalid(format!(
                        "disk {disk} cannot shrink from {} to {}",
                        pm.disk_size, meta.disk_size
                    )));
                }
            }
            st.writing = true;
            prev
        };
        let release = |this: &Self| this.end_write(disk, false);
        if let Err(e) = fs::create_dir_all(root::points_dir(self.inner.store.root(), disk)) {
            release(self);
            return Err(e.into());
        }
        self.enter_writer();
        Ok(CheckpointWriter::new(self, disk.to_string(), meta, prev))
    }

    /// Called by a writer when it ends (committed or dropped).
    pub(crate) fn end_write(&self, disk: &str, leave_gate: bool) {
        if let Some(st) = self.disks.lock().expect("disks").get_mut(disk) {
            st.writing = false;
        }
        if leave_gate {
            let mut g = self.gate.lock().expect("gate");
            g.writers -= 1;
            self.gate_cv.notify_all();
        }
    }

    fn enter_writer(&self) {
        let mut g = self.gate.lock().expect("gate");
        while g.gc {
            g = self.gate_cv.wait(g).expect("gate");
        }
        g.writers += 1;
    }

    pub(crate) fn publish(&self, rec: PointRecord) {
        let mut disks = self.disks.lock().expect("disks");
        let st = disks.entry(rec.point.disk.clone()).or_default();
        st.points.insert(rec.point.meta.seq, rec);
    }

    pub(crate) fn forget(&self, disk: &str, seq: u64) {
        if let Some(st) = self.disks.lock().expect("disks").get_mut(disk) {
            st.points.remove(&seq);
        }
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    pub(crate) fn gate(&self) -> (&Mutex<Gate>, &Condvar) {
        (&self.gate, &self.gate_cv)
    }

    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.inner.store.exists(Kind::Chunk, id)
    }

    /// Move a chunk that failed authentication out of the store, to `quarantine/<id>`, so that
    /// the next copy of it that arrives (a resync resends the block) is stored instead of being
    /// taken for a duplicate. Every point naming it is unreadable at that block either way until
    /// then; the damaged bytes are kept for inspection.
    pub fn quarantine_chunk(&self, id: &ChunkId) -> Result<(), RepoError> {
        self.writable()?;
        if self.inner.store.quarantine(id)? {
            tracing::warn!(chunk = %id, "damaged chunk quarantined");
        }
        Ok(())
    }

    /// Where a chunk's sealed blob lies on disk: (file, offset of the blob in it, length). For
    /// tests and tools that inspect or damage the stored bytes; the layout is the store's own.
    pub fn chunk_location(&self, id: &ChunkId) -> Result<Option<(PathBuf, u64, u32)>, RepoError> {
        self.inner.store.chunk_location(id)
    }

    /// How many chunks the store holds (tests and tools).
    pub fn chunk_count(&self) -> Result<usize, RepoError> {
        Ok(self.inner.store.list(Kind::Chunk)?.len())
    }

    /// The id of every chunk the store holds, in no order (tests and tools).
    pub fn chunk_ids(&self) -> Result<Vec<ChunkId>, RepoError> {
        Ok(self
            .inner
            .store
            .list(Kind::Chunk)?
            .into_iter()
            .map(|c| c.0)
            .collect())
    }

    /// A read-only view of one point; it owns what it needs and may outlive this borrow.
    /// The root file is re-read and re-authenticated. While the reader lives, retention keeps
    /// its point (so gc cannot pull chunks from under an NBD export).
    pub fn reader(&self, disk: &str, seq: u64) -> Result<PointReader, RepoError> {
        // Lock order: pins, then disks (as in retention), so a point is either pinned
        // before retention looks at it, or already forgotten.
        let mut pins = self.inner.pins.lock().expect("pins");
        self.record(disk, seq)?;
        let rec = root::read_root(&self.inner.key, self.inner.store.root(), disk, seq)
            .map_err(|(why, _)| RepoError::Corrupt(format!("root of {disk}@{seq}: {why}")))?;
        *pins.entry((disk.to_string(), seq)).or_insert(0) += 1;
        drop(pins);
        Ok(PointReader::new(self.inner.clone(), rec))
    }
}

impl Gate {
    pub(crate) fn gc(&self) -> bool {
        self.gc
    }
    pub(crate) fn writers(&self) -> usize {
        self.writers
    }
    pub(crate) fn set_gc(&mut self, on: bool) {
        self.gc = on;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_safety_contract() {
        fn send_sync<T: Send + Sync>() {}
        fn send_sync_static<T: Send + Sync + 'static>() {}
        fn send<T: Send>() {}
        send_sync::<super::Repository>();
        send_sync_static::<super::PointReader>();
        send::<super::CheckpointWriter<'static>>();
    }
}
