//! The process server: the protected site's data ingest.
//!
//! QEMU mirrors every guest write to an NBD export here ([`export`]); each write lands in the
//! disk's journal on the cache device, in order, and FLUSH/FUA are answered once it is durable.
//! Per disk, a shipper ([`shipper`]) cuts the journal into checkpoints ([`checkpoint`]), reduces
//! them (zero blocks to holes, keyed names, zstd, AES-256-GCM) and streams them to the master
//! target over mutual TLS, trimming the journal only after the master target says a checkpoint is
//! durable. Status per disk goes to `<cache>/<disk>/status.json` ([`status`]).

pub mod app_consistent;
pub mod bulk;
pub mod checkpoint;
pub mod export;
pub mod first_copy;
pub mod group;
pub mod grow;
pub mod memory;
pub mod periodic;
pub mod resync;
pub mod shipper;
pub mod status;
pub mod throttle;
pub mod uplink;

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
    pub block_size: u32,
    pub journal: Arc<Journal>,
    status: Mutex<DiskStatus>,
    status_path: PathBuf,
    /// Where the disk lives on its host, for checksum resyncs.
    pub host: Option<resync::HostDisk>,
    /// QEMU must use TLS to reach our NBD export (a mirror target re-added by a growth too).
    pub nbd_tls: bool,
    request_path: PathBuf,
    /// Written by `ferry grow` (the new size), removed once the growth is done or refused.
    grow_path: PathBuf,
    /// Exists while the journal may not continue what the recovery site holds: it was created
    /// empty (a new or lost cache) and no resync has reconciled it yet.
    unreconciled_path: PathBuf,
    /// The journal position of an application-consistent moment not yet committed as a point
    /// ([`app_consistent`]); the shipper holds this lock while it reads the journal.
    app_mark: Mutex<Option<u64>>,
    /// The consistency group (the protected machine) the disk is cut with, if any.
    pub group: Option<Arc<group::Group>>,
    /// How chunks are compressed (when it helps): the machine's policy, zstd by default.
    pub compress: ferry_chunk::Compression,
    /// Its checkpoint interval, when its policy sets one (else the process server's).
    pub interval: Option<std::time::Duration>,
}

impl Disk {
    /// The disk's size now (the journal's, which grows with the disk).
    pub fn size(&self) -> u64 {
        self.journal.disk_size()
    }

    /// The size `ferry grow` asked for, if it did (and the disk's host is known).
    pub fn grow_requested(&self) -> Option<u64> {
        self.host.as_ref()?;
        grow::read_request(&self.grow_path)
    }

    pub fn clear_grow_request(&self) {
        let _ = std::fs::remove_file(&self.grow_path);
    }

    /// Ask for a checksum resync through the disk's host, durably (as `ferry resync` does).
    pub fn request_resync(&self) -> std::io::Result<()> {
        let dir = self
            .request_path
            .parent()
            .expect("a request file has a directory");
        resync::request(dir, None)
    }

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

    /// A checksum resync was asked for (`ferry resync`, or failback's `protect` step) and there
    /// is a host to read the disk through.
    pub fn resync_requested(&self) -> bool {
        self.request_path.exists() && self.resync_host().is_some()
    }

    /// Where a checksum resync reads the disk: its configured host, else the host the
    /// request names for this resync ([`resync::request`]).
    pub fn resync_host(&self) -> Option<resync::HostDisk> {
        self.host
            .clone()
            .or_else(|| resync::requested_host(&self.request_path))
    }

    pub fn clear_resync_request(&self) {
        let _ = std::fs::remove_file(&self.request_path);
    }

    /// The journal was created empty and has not been reconciled with the recovery site.
    pub fn unreconciled(&self) -> bool {
        self.unreconciled_path.exists()
    }

    /// The recovery site now follows this journal.
    pub fn reconciled(&self) {
        let _ = std::fs::remove_file(&self.unreconciled_path);
    }

    pub fn app_mark(&self) -> Option<u64> {
        *self.app_mark.lock().expect("mark lock")
    }

    /// Make every write journaled so far durable and mark the newest as an
    /// application-consistent moment (called while the guest is frozen).
    pub fn set_app_mark(&self) -> Result<u64, String> {
        let mut mark = self.app_mark.lock().expect("mark lock");
        let seq = self
            .journal
            .sync()
            .map_err(|e| format!("journal sync: {e}"))?;
        *mark = Some(seq);
        Ok(seq)
    }

    /// The mark was committed as a point (or can no longer be): forget it if it is still `seq`.
    pub fn clear_app_mark(&self, seq: u64) {
        let mut mark = self.app_mark.lock().expect("mark lock");
        if *mark == Some(seq) {
            *mark = None;
        }
    }

    fn fill_journal(&self, s: &mut DiskStatus) {
        let st = self.journal.stats();
        s.journal_first_seq = st.first_seq;
        s.journal_last_seq = st.last_seq;
        s.journal_durable_seq = st.durable_seq;
        s.journal_used_bytes = st.used_bytes;
        s.journal_capacity_bytes = st.capacity_bytes;
        s.journal_direct_io = st.direct_io;
        s.disk_size = self.journal.disk_size();
        s.group_cut_pending = self.group.as_ref().is_some_and(|g| g.pending(&self.name));
        match st.state {
            JournalState::ResyncRequired { dirty_bytes } => {
                if s.state != State::Resyncing {
                    s.state = State::ResyncRequired;
                }
                s.dirty_bytes = dirty_bytes;
            }
            JournalState::Replicating => s.dirty_bytes = 0,
        }
        s.updated_unix_ns = status::now_unix_ns();
    }
}

#[derive(Clone, Debug)]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
    /// Where it lives on its host (optional): needed to resync it by checksums.
    pub host: Option<resync::HostDisk>,
    /// The consistency group (the protected machine): disks of one group are cut at one
    /// instant, so their points together are one crash-consistent state of the machine.
    pub group: Option<String>,
    /// How its chunks are compressed (the policy's `compression`).
    pub compress: ferry_chunk::Compression,
    /// Its own checkpoint interval (the policy's), instead of the process server's.
    pub interval: Option<std::time::Duration>,
    /// Its machine's weight in the appliance's uplink (the policy's `priority`).
    pub priority: uplink::Priority,
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
    /// Write journal segments with O_DIRECT (the cache device's hardware profile decides).
    pub journal_direct_io: bool,
    pub link: Link,
    pub tuning: Tuning,
    pub key: ferry_chunk::TenantKey,
    /// Guest freeze/thaw hooks for application-consistent points of continuous disks.
    pub app_hooks: Option<app_consistent::Hooks>,
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
        cfg.journal_direct_io,
        cfg.app_hooks.is_some(),
        cfg.nbd_tls.is_some(),
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
                group: d.group.clone(),
            }),
        );
        first_copy::spawn(d.clone());
        tokio::spawn(shipper::replicate(
            d.clone(),
            link.clone(),
            cfg.tuning.clone(),
            shared.clone(),
        ));
        if let Some(h) = &cfg.app_hooks {
            let request = cfg.cache_dir.join(&d.name).join(app_consistent::REQUEST);
            // A request left from before a restart would freeze the guest unasked-for now.
            let _ = std::fs::remove_file(&request);
            tokio::spawn(app_consistent::run(d.clone(), h.clone(), request));
        }
    }
    if link.throttles.values().any(|t| t.share().is_some()) {
        tokio::spawn(show_shares(disks.clone(), link.clone()));
    }
    // The periodic disks of one machine on one host are cut together; the others alone.
    let mut groups: Vec<Vec<periodic::PeriodicSpec>> = Vec::new();
    for p in cfg.periodic {
        anyhow::ensure!(
            ferry_wire::valid_disk_name(&p.name),
            "invalid disk name {:?}: use 1-64 characters of A-Z a-z 0-9 . _ -",
            p.name
        );
        let dir = cfg.cache_dir.join(&p.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let together = groups
            .iter_mut()
            .find(|g| p.group.is_some() && g[0].group == p.group && g[0].qmp == p.qmp);
        match together {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    for g in groups {
        let paths = g
            .iter()
            .map(|p| cfg.cache_dir.join(&p.name).join("status.json"))
            .collect();
        tokio::spawn(periodic::protect(
            g,
            cfg.block_size,
            link.clone(),
            shared.clone(),
            paths,
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

/// Every second, each continuous disk's status says its machine's place in the uplink now
/// (periodic disks say it at every cut).
async fn show_shares(disks: Vec<Arc<Disk>>, link: Arc<Link>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for d in &disks {
            let share = link.share(&d.name);
            d.update(|s| s.uplink = share);
        }
    }
}

fn open_disks(
    cache: &Path,
    specs: &[DiskSpec],
    block_size: u32,
    capacity: u64,
    direct_io: bool,
    app_hooks: bool,
    nbd_tls: bool,
) -> anyhow::Result<Vec<Arc<Disk>>> {
    let mut out = Vec::new();
    let mut groups: HashMap<String, Arc<group::Group>> = HashMap::new();
    for spec in specs {
        anyhow::ensure!(
            ferry_wire::valid_disk_name(&spec.name),
            "invalid disk name {:?}: use 1-64 characters of A-Z a-z 0-9 . _ -",
            spec.name
        );
        anyhow::ensure!(spec.size > 0, "disk {} has size 0", spec.name);
        let dir = cache.join(&spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let unreconciled_path = dir.join("journal-unreconciled");
        if !dir.join("journal").exists() {
            // A journal that starts empty cannot tell whether the recovery site already holds
            // points made from a journal that is gone: say so durably before it takes writes.
            std::fs::write(&unreconciled_path, b"")
                .and_then(|()| std::fs::File::open(&dir)?.sync_all())
                .with_context(|| format!("writing {}", unreconciled_path.display()))?;
        }
        let mut jc = JournalConfig::new(dir.join("journal"), spec.size);
        jc.capacity_bytes = capacity;
        jc.direct_io = direct_io;
        let journal = Journal::open(jc)
            .with_context(|| format!("opening the journal of disk {}", spec.name))?;
        let status_path = dir.join("status.json");
        let journal = Arc::new(journal);
        let group = spec.group.as_ref().map(|g| {
            let g = groups
                .entry(g.clone())
                .or_insert_with(|| group::Group::new(g))
                .clone();
            g.join(&spec.name, journal.clone());
            g
        });
        let disk = Arc::new(Disk {
            name: spec.name.clone(),
            block_size,
            journal,
            status: Mutex::new(DiskStatus {
                disk: spec.name.clone(),
                group: spec.group.clone(),
                app_hooks,
                host_access: spec.host.is_some(),
                compression: spec.compress.to_string(),
                priority: spec.priority,
                ..Default::default()
            }),
            status_path,
            host: spec.host.clone(),
            nbd_tls,
            request_path: dir.join(resync::REQUEST),
            grow_path: dir.join(grow::REQUEST),
            unreconciled_path,
            app_mark: Mutex::new(None),
            group,
            compress: spec.compress,
            interval: spec.interval,
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
