//! The process server: the protected site's data ingest.
//!
//! QEMU mirrors every guest write to an NBD export here ([`export`]); each write lands in the
//! disk's journal on the cache device, in order, and FLUSH/FUA are answered once it is durable.
//! Per disk, a shipper ([`shipper`]) cuts the journal into checkpoints ([`checkpoint`]), reduces
//! them (zero blocks to holes, keyed names, zstd, AES-256-GCM) and streams them to the master
//! target over mutual TLS, trimming the journal only after the master target says a checkpoint is
//! durable. Status per disk goes to `<cache>/<disk>/status.json` ([`status`]).

pub mod checkpoint;
pub mod export;
pub mod periodic;
pub mod shipper;
pub mod status;

use anyhow::Context;
use ferry_journal::{Journal, JournalConfig, JournalState};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use shipper::{Link, Shared, Tuning};
pub use status::{DiskStatus, State};

/// One protected disk: its journal and what is known of its replication.
pub struct Disk {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub journal: Arc<Journal>,
    status: Mutex<DiskStatus>,
    status_path: PathBuf,
}

impl Disk {
    /// Change the status and write it out.
    pub fn update(&self, f: impl FnOnce(&mut DiskStatus)) {
        let mut s = self.status.lock().expect("status lock");
        f(&mut s);
        self.fill_journal(&mut s);
        if let Err(e) = status::write(&self.status_path, &s) {
            tracing::warn!(disk = %self.name, error = %e, "cannot write status file");
        }
    }

    pub fn refresh_journal_stats(&self) {
        self.update(|_| {});
    }

    pub fn status(&self) -> DiskStatus {
        self.status.lock().expect("status lock").clone()
    }

    fn fill_journal(&self, s: &mut DiskStatus) {
        let st = self.journal.stats();
        s.journal_first_seq = st.first_seq;
        s.journal_last_seq = st.last_seq;
        s.journal_durable_seq = st.durable_seq;
        s.journal_used_bytes = st.used_bytes;
        s.journal_capacity_bytes = st.capacity_bytes;
        if let JournalState::ResyncRequired { dirty_bytes } = st.state {
            s.state = State::ResyncRequired;
            s.dirty_bytes = dirty_bytes;
        }
        s.updated_unix_ns = status::now_unix_ns();
    }
}

#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
}

pub struct Config {
    pub cache_dir: PathBuf,
    pub nbd_listen: SocketAddr,
    /// When set, QEMU must use TLS (`OPT_STARTTLS`) on the NBD connection.
    pub nbd_tls: Option<Arc<rustls::ServerConfig>>,
    pub disks: Vec<DiskSpec>,
    /// Disks protected from their host's dirty bitmaps instead of a mirror.
    pub periodic: Vec<periodic::PeriodicSpec>,
    pub block_size: u32,
    pub journal_capacity: u64,
    pub link: Link,
    pub tuning: Tuning,
    pub key: ferry_chunk::TenantKey,
}

/// Open every disk's journal (replaying what a crash left), then serve NBD and ship forever.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.nbd_listen)
        .await
        .with_context(|| format!("cannot listen for NBD on {}", cfg.nbd_listen))?;
    let disks = open_disks(
        &cfg.cache_dir,
        &cfg.disks,
        cfg.block_size,
        cfg.journal_capacity,
    )?;
    let shared = Arc::new(Shared {
        key: cfg.key,
        known: Mutex::new(Default::default()),
    });
    let link = Arc::new(cfg.link);
    let mut exports: HashMap<String, Arc<dyn ferry_nbd::Export>> = HashMap::new();
    for d in &disks {
        exports.insert(
            d.name.clone(),
            Arc::new(export::JournalExport {
                disk: d.name.clone(),
                journal: d.journal.clone(),
                size: d.size,
            }),
        );
        tokio::spawn(shipper::replicate(
            d.clone(),
            link.clone(),
            cfg.tuning.clone(),
            shared.clone(),
        ));
    }
    for p in cfg.periodic {
        anyhow::ensure!(
            ferry_wire::valid_disk_name(&p.name),
            "invalid disk name {:?}: use 1-64 characters of A-Z a-z 0-9 . _ -",
            p.name
        );
        let dir = cfg.cache_dir.join(&p.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        tokio::spawn(periodic::protect(
            p,
            cfg.block_size,
            link.clone(),
            shared.clone(),
            dir.join("status.json"),
        ));
    }
    let nbd = Arc::new(ferry_nbd::ServerConfig {
        exports,
        require_tls: cfg.nbd_tls.is_some(),
        tls: cfg.nbd_tls.map(tokio_rustls::TlsAcceptor::from),
    });
    tracing::info!(listen = %cfg.nbd_listen, disks = disks.len(), "process server ready");
    // Under systemd (Type=notify): ready now; then keep the watchdog fed while the runtime lives.
    let _ = ferry_sdnotify::ready();
    tokio::spawn(ferry_sdnotify::watchdog_loop());
    ferry_nbd::serve_tcp(listener, nbd)
        .await
        .context("NBD server stopped")
}

fn open_disks(
    cache: &Path,
    specs: &[DiskSpec],
    block_size: u32,
    capacity: u64,
) -> anyhow::Result<Vec<Arc<Disk>>> {
    let mut out = Vec::new();
    for spec in specs {
        anyhow::ensure!(
            ferry_wire::valid_disk_name(&spec.name),
            "invalid disk name {:?}: use 1-64 characters of A-Z a-z 0-9 . _ -",
            spec.name
        );
        anyhow::ensure!(spec.size > 0, "disk {} has size 0", spec.name);
        let dir = cache.join(&spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut jc = JournalConfig::new(dir.join("journal"), spec.size);
        jc.capacity_bytes = capacity;
        let journal = Journal::open(jc)
            .with_context(|| format!("opening the journal of disk {}", spec.name))?;
        let status_path = dir.join("status.json");
        let disk = Arc::new(Disk {
            name: spec.name.clone(),
            size: spec.size,
            block_size,
            journal: Arc::new(journal),
            status: Mutex::new(DiskStatus {
                disk: spec.name.clone(),
                ..Default::default()
            }),
            status_path,
        });
        disk.refresh_journal_stats();
        out.push(disk);
    }
    Ok(out)
}

/// Read every disk's status file under a cache directory (for `ferry status`).
pub fn read_statuses(cache: &Path) -> anyhow::Result<Vec<DiskStatus>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(cache).with_context(|| format!("reading {}", cache.display()))?;
    for e in entries {
        let p = e?.path().join("status.json");
        if p.exists() {
            out.push(status::read(&p).with_context(|| format!("reading {}", p.display()))?);
        }
    }
    out.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(out)
}
