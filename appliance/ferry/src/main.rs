//! `ferry`: one program, a subcommand per role. The roles live in their crates; this file reads
//! arguments, sets up logging, and reports errors with context.

mod app_point;
mod bootstrap;
mod console;
mod control;
mod demo;
mod hw;
mod orders;
mod update;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use ferry::{load_key, parse_size};
use ferry_repository::{ExportFormat, Repository, RetentionPolicy, RetentionTier};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry disaster-recovery replication gateway"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct RepoArgs {
    /// The recovery repository directory (master target).
    #[arg(long, default_value = "/var/lib/ferry/repository")]
    repo: PathBuf,
    /// The tenant key file (64 hex digits).
    #[arg(long, default_value = "/etc/ferry/tenant.key")]
    key: PathBuf,
}

impl RepoArgs {
    fn open(&self) -> anyhow::Result<Repository> {
        if !self.repo.exists() {
            bail!("no repository at {}", self.repo.display());
        }
        Repository::open_read_only(&self.repo, load_key(&self.key)?)
            .with_context(|| format!("opening the repository {}", self.repo.display()))
    }

    /// The exclusive handle, for changes (retention); refused while a master target runs.
    fn open_writable(&self) -> anyhow::Result<Repository> {
        if !self.repo.exists() {
            bail!("no repository at {}", self.repo.display());
        }
        Repository::open(&self.repo, load_key(&self.key)?).with_context(|| {
            format!(
                "opening the repository {} for changes (is a master target running on it?)",
                self.repo.display()
            )
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the configuration server: inventory, policies, enrollment, audit (mutual-TLS API).
    ConfigServer(control::ServerArgs),
    /// Talk to the configuration server's API.
    Ctl(control::CtlArgs),
    /// The local text console (tty1, serial): first-boot wizard, dashboard, diagnostics,
    /// maintenance; talks only to the configuration server's API.
    Console(console::ConsoleArgs),
    /// Run the demo: protect a disk, replicate it, recover it, prove it matches.
    Demo(demo::DemoArgs),
    /// Apply or verify a signed appliance update; make and sign bundles (provider side).
    Update(update::UpdateArgs),
    /// Create a tenant key file.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a site CA and server and client certificates in a directory.
    PkiInit {
        #[arg(long)]
        dir: PathBuf,
        /// Extra DNS names or IP addresses for the server certificate.
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// Run the process server: NBD target for the hypervisor's mirror, journal, shipping.
    ProcessServer(ProcessServerArgs),
    /// Run the master target: receive replication into the recovery repository.
    MasterTarget {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: SocketAddr,
        /// PKI directory (ca-cert.pem, server-cert.pem, server-key.pem).
        #[arg(long, default_value = "/etc/ferry/pki")]
        pki: PathBuf,
        #[command(flatten)]
        retention: RetentionArgs,
        /// How often retention and chunk collection run (0: never).
        #[arg(long, default_value_t = 300)]
        retention_interval_secs: u64,
        #[command(flatten)]
        bootstrap: bootstrap::BootstrapArgs,
        /// With --config-server: the address process servers dial, HOST:PORT (default: --listen;
        /// its certificate is issued for this host).
        #[arg(long, requires = "config_server")]
        advertise: Option<String>,
    },
    /// List protected disks and their recovery points.
    Points {
        #[command(flatten)]
        repo: RepoArgs,
        /// Only this disk.
        #[arg(long)]
        disk: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the holds on recovery points: who keeps which points from retention, and why
    /// (test failovers until their cleanup, failovers while they read their points).
    Holds {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Release a hold whose holder is gone (e.g. a job the configuration server no longer
    /// knows): retention may then remove its points. Its job's test or failover must not be
    /// using them any more.
    ReleaseHold {
        #[command(flatten)]
        repo: RepoArgs,
        /// The holder, as `ferry holds` lists it (e.g. `job.acme.17`).
        #[arg(long)]
        holder: String,
    },
    /// Write a recovery point to a raw or qcow2 file.
    Export {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        disk: String,
        /// A point's sequence number, or `latest`.
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long)]
        output: PathBuf,
        #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2"])]
        format: String,
    },
    /// Serve a recovery point read-only over NBD at once (instant access); export name = disk.
    Serve {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        disk: String,
        #[arg(long, default_value = "latest")]
        point: String,
        #[arg(long, default_value = "127.0.0.1:10810")]
        listen: SocketAddr,
    },
    /// Check that every chunk decrypts and matches its name, and every point is intact.
    Verify {
        #[command(flatten)]
        repo: RepoArgs,
        #[arg(long)]
        json: bool,
    },
    /// Thin out old recovery points by the retention tiers, then collect unreferenced chunks.
    Retention {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        retention: RetentionArgs,
    },
    /// Take an application-consistent recovery point of a continuous disk now: the process
    /// server freezes the guest with its --freeze-hook, marks the journal, thaws, and the
    /// checkpoint ending at the mark is tagged `application`.
    AppPoint(app_point::AppPointArgs),
    /// Ask the process server for a checksum resync of a periodically protected disk at its next
    /// cut: every block is compared by name with the recovery site (which checks each stored
    /// chunk as it answers) and only what differs or is damaged is sent.
    Resync {
        #[arg(long, default_value = "/var/cache/ferry")]
        cache: PathBuf,
        #[arg(long)]
        disk: String,
    },
    /// Grow a continuously protected disk whose host is known: the process server ends the
    /// host's mirror, resizes the disk's node on the host (block_resize), grows its journal and
    /// export, starts the mirror again and resyncs by checksums what changed meanwhile; later
    /// recovery points have the new size, older ones keep theirs. A disk never shrinks.
    Grow {
        #[arg(long, default_value = "/var/cache/ferry")]
        cache: PathBuf,
        #[arg(long)]
        disk: String,
        /// The new size in bytes (K, M, G, T suffixes); a multiple of 512, larger than now.
        #[arg(long)]
        size: String,
    },
    /// Show each protected disk's replication state at this process server.
    Status {
        #[arg(long, default_value = "/var/cache/ferry")]
        cache: PathBuf,
        #[arg(long)]
        json: bool,
        /// Redraw every second while a seed or resync runs (Ctrl-C to stop).
        #[arg(long)]
        watch: bool,
    },
    /// Hardware: probe NICs, disks, CPU and hypervisor; tune them by profile (reversibly).
    Hw {
        #[command(subcommand)]
        cmd: hw::HwCmd,
    },
    /// Measure this box: hashing, compression, encryption, cache bandwidth and fsync latency.
    Bench(hw::BenchArgs),
    /// Size this appliance from benchmark figures: churn per day, protected disks, RPO.
    Plan(hw::PlanArgs),
}

#[derive(Args, Clone)]
struct RetentionArgs {
    /// Keep every point younger than this many seconds.
    #[arg(long, default_value_t = 3600)]
    keep_all_secs: u64,
    /// Coarser tiers as EVERY:FOR in seconds, e.g. 300:86400 3600:1209600.
    #[arg(long = "tier", default_values_t = ["300:86400".to_string(), "3600:1209600".to_string()])]
    tiers: Vec<String>,
}

impl RetentionArgs {
    fn policy(&self) -> anyhow::Result<RetentionPolicy> {
        let mut policy = RetentionPolicy {
            keep_all_secs: self.keep_all_secs,
            tiers: Vec::new(),
        };
        for t in &self.tiers {
            let (e, f) = t
                .split_once(':')
                .with_context(|| format!("tier {t:?} must be EVERY:FOR in seconds"))?;
            let tier = RetentionTier {
                every_secs: e.parse().with_context(|| format!("tier {t:?}: EVERY"))?,
                for_secs: f.parse().with_context(|| format!("tier {t:?}: FOR"))?,
            };
            if tier.every_secs == 0 {
                bail!("tier {t:?}: EVERY must be above zero");
            }
            policy.tiers.push(tier);
        }
        Ok(policy)
    }
}

#[derive(Args)]
struct ProcessServerArgs {
    /// Cache directory on the NVMe device (journals, status).
    #[arg(long, default_value = "/var/cache/ferry")]
    cache: PathBuf,
    #[arg(long, default_value = "0.0.0.0:10809")]
    nbd_listen: SocketAddr,
    /// A continuously protected disk (QEMU mirrors to our NBD export) as NAME=SIZE; SIZE must
    /// equal the source disk's size (after `ferry grow`, the new size: a size smaller than the
    /// disk's journal was written for is refused, a larger one is taken as a growth). With `,qmp=HOST_QMP_SOCKET,node=BLOCK_NODE,nbd=NBD_SOCKET`
    /// the process server can read the disk on its host and resynchronizes it by checksums when
    /// its journal overflowed or was lost, or on `ferry resync`. With `,group=MACHINE` the
    /// disk is cut together with the other disks of that group (one protected machine), so
    /// their points at each cut are one crash-consistent state of the machine.
    /// `,interval-ms=N` gives it its own checkpoint interval (else --interval-ms);
    /// `,compress=lz4` or `,compress=off` seals its chunks with LZ4 or uncompressed (default zstd); `,priority=high|medium|low` is its
    /// machine's weight in the uplink (see --uplink-mbit; default medium). Repeatable.
    #[arg(long = "disk", required_unless_present_any = ["periodic", "config_server"])]
    disks: Vec<String>,
    /// A periodically protected disk, read from its host's dirty bitmaps:
    /// NAME=SIZE,qmp=HOST_QMP_SOCKET,node=BLOCK_NODE,nbd=NBD_SOCKET,fleece=HOST_FILE[,interval-ms=N][,compress=zstd|lz4|off][,group=MACHINE][,priority=P].
    /// The disks of one group on one host (the same qmp=) are cut in one QMP transaction, so
    /// their points at each cut are one crash-consistent state of the machine.
    /// Repeatable.
    #[arg(long = "periodic")]
    periodic: Vec<String>,
    /// The master target, HOST:PORT.
    #[arg(long, required_unless_present = "config_server")]
    master: Option<String>,
    #[command(flatten)]
    bootstrap: bootstrap::BootstrapArgs,
    #[arg(long, default_value = "/etc/ferry/pki")]
    pki: PathBuf,
    #[arg(long, default_value = "/etc/ferry/tenant.key")]
    key: PathBuf,
    /// Require TLS on NBD connections (QEMU tls-creds-x509 with this PKI's ca-cert.pem).
    #[arg(long)]
    nbd_tls: bool,
    /// Checkpoint interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Journal capacity per disk in bytes (K/M/G suffixes allowed).
    #[arg(long, default_value = "1G")]
    journal_capacity: String,
    /// How the journal writes to the cache: `direct` (O_DIRECT, aligned), `buffered` (page
    /// cache), or `auto`: what the hardware profile of the disk holding --cache advises
    /// (`ferry hw probe` shows it; NVMe and virtual disks: direct).
    #[arg(long, value_enum, default_value_t = CacheIo::Auto)]
    cache_io: CacheIo,
    /// Block size of the recovery repository's block map.
    #[arg(long, default_value_t = ferry_chunk::DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Command that freezes a continuous disk's guest for an application-consistent point
    /// (run as `sh -c CMD` with FERRY_DISK set), e.g. `virsh domfsfreeze "$FERRY_DISK"`.
    #[arg(long, requires = "thaw_hook")]
    freeze_hook: Option<String>,
    /// Command that thaws the guest again; it runs whatever happened after the freeze.
    #[arg(long, requires = "freeze_hook")]
    thaw_hook: Option<String>,
    /// Kill a freeze or thaw hook still running after this many seconds.
    #[arg(long, default_value_t = 30)]
    hook_timeout_secs: u64,
    /// Also take an application-consistent point every this many seconds (0: only on request).
    #[arg(long, default_value_t = 0, requires = "freeze_hook")]
    app_consistent_every: u64,
    /// The appliance's uplink budget: what this process server sends to the master target,
    /// all machines together, in megabits per second. The machines with data waiting share it
    /// by priority (weights 4, 2, 1 for high, medium, low; a share left unused goes to the
    /// others), each within its own policy's limit. Set it a little below the WAN link's rate
    /// so the queue forms here, where priority applies, rather than in the network.
    #[arg(long, alias = "bandwidth-mbit")]
    uplink_mbit: Option<u32>,
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let daemon = matches!(
        cli.cmd,
        Cmd::ConfigServer(_)
            | Cmd::ProcessServer(_)
            | Cmd::MasterTarget { .. }
            | Cmd::Serve { .. }
            | Cmd::Demo(_)
            | Cmd::Console(_)
            | Cmd::Update(_)
    );
    if matches!(
        cli.cmd,
        Cmd::ProcessServer(_) | Cmd::MasterTarget { .. } | Cmd::Serve { .. } | Cmd::Demo(_)
    ) {
        ferry_process_server::memory::keep_freed_memory();
    }
    if !daemon {
        // A command piped into `head` or `grep -q` ends quietly when the reader goes away, as
        // Unix tools do, instead of panicking on the broken pipe (Rust ignores SIGPIPE). The
        // roles keep ignoring it: a peer that hangs up is an error they handle, not a reason
        // to die, and neither does the console or an update half-way through.
        // SAFETY: no other thread exists yet (logging is set up, no runtime started), and
        // SIG_DFL is a valid disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("ferry: {e:#}");
        std::process::exit(1);
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn point_seq(repo: &Repository, disk: &str, point: &str) -> anyhow::Result<u64> {
    if point == "latest" {
        return repo
            .latest(disk)
            .map(|p| p.meta.seq)
            .with_context(|| format!("disk {disk} has no recovery point"));
    }
    point
        .parse()
        .with_context(|| format!("--point must be a sequence number or `latest`, not {point:?}"))
}

/// A point held for this process while it reads it (`ferry serve`, `ferry export`), released
/// when dropped. A process killed outright leaves its hold: `ferry holds` lists it (the holder
/// names the command and the process id) and `ferry release-hold` drops it.
struct PointHold<'a> {
    repo: &'a Repository,
    holder: String,
}

impl<'a> PointHold<'a> {
    fn take(
        repo: &'a Repository,
        what: &str,
        disk: &str,
        seq: u64,
        target: &str,
    ) -> anyhow::Result<PointHold<'a>> {
        let holder = format!("{what}.{}", std::process::id());
        repo.hold(
            &holder,
            &format!("ferry {what} of {disk} point {seq} to {target}"),
            &[ferry_repository::HeldPoint {
                disk: disk.to_string(),
                seq,
            }],
        )
        .with_context(|| format!("holding {disk} point {seq} while it is read"))?;
        Ok(PointHold { repo, holder })
    }
}

impl Drop for PointHold<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.repo.release(&self.holder) {
            eprintln!("ferry: releasing hold {}: {e}", self.holder);
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::ConfigServer(a) => control::server(a),
        Cmd::Ctl(a) => control::ctl(a),
        Cmd::Console(a) => console::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Update(a) => update::run(a),
        Cmd::Keygen { out } => {
            ferry::write_new_key(&out)?;
            println!("wrote a new tenant key to {}", out.display());
            Ok(())
        }
        Cmd::PkiInit { dir, names } => {
            ferry_pki::init(&dir, &names)?;
            println!("created a site CA and certificates in {}", dir.display());
            Ok(())
        }
        Cmd::ProcessServer(a) => process_server(a),
        Cmd::MasterTarget {
            mut repo,
            listen,
            mut pki,
            retention,
            retention_interval_secs,
            bootstrap,
            advertise,
        } => {
            let mut retention = ferry_repository::Retention {
                default: retention.policy()?,
                disks: Default::default(),
            };
            let mut configured = None;
            let mut revoked = Vec::new();
            let address = advertise.unwrap_or_else(|| listen.to_string());
            if bootstrap.config_server.is_some()
                && listen.ip().is_unspecified()
                && address == listen.to_string()
            {
                bail!("--listen {listen} is every address: give --advertise HOST:PORT, the address process servers dial (its certificate is issued for that host)");
            }
            if bootstrap.config_server.is_some() {
                let cfg = bootstrap.fetch(Some(address.clone()))?;
                let ferry_api::RoleConfig::MasterTarget(c) = &cfg else {
                    bail!("this identity is not a master target's (the configuration server sent another role's configuration)");
                };
                // Each machine's policy: its tiers are consecutive age ranges, finest first.
                for d in &c.retention {
                    let tiers = d.tiers.iter().map(|t| RetentionTier {
                        every_secs: t.every_secs,
                        for_secs: t.keep_secs,
                    });
                    retention.disks.insert(
                        d.disk.clone(),
                        RetentionPolicy {
                            keep_all_secs: 0,
                            tiers: tiers.collect(),
                        },
                    );
                }
                revoked.clone_from(&c.revoked_client_sha256);
                let l = bootstrap.layout();
                pki = l.pki;
                repo.key = l.key;
                tracing::info!(%address, "configured by the configuration server");
                configured = Some(cfg);
            }
            std::fs::create_dir_all(&repo.repo)
                .with_context(|| format!("creating {}", repo.repo.display()))?;
            let r = Repository::open(&repo.repo, load_key(&repo.key)?)
                .with_context(|| format!("opening the repository {}", repo.repo.display()))?;
            let cfg = ferry_master_target::Config {
                listen,
                // A revoked process server's certificate is refused from the answer that
                // lists it on: a changed list restarts this role (bootstrap's watch).
                tls: ferry_pki::server_config_refusing(&pki, &revoked)?,
                repo: Arc::new(r),
                key: Arc::new(load_key(&repo.key)?),
                retention: (retention_interval_secs > 0)
                    .then(|| (retention, Duration::from_secs(retention_interval_secs))),
                // A configured master target runs failovers: their live disks are below its
                // state directory, and resync connections from the protected site read them.
                work: configured.is_some().then(|| bootstrap.state.join("work")),
                tenant: configured.as_ref().and_then(|c| match c {
                    ferry_api::RoleConfig::MasterTarget(c) => Some(c.tenant.clone()),
                    _ => None,
                }),
            };
            if let Some(c) = configured {
                bootstrap.watch(c, Some(address), None);
                // The recovery-site steps of failover jobs run here, on this repository with
                // this key; scratch overlays and live disks go below the state directory.
                let site = ferry_failover::Site {
                    repo: repo.repo.clone(),
                    key: repo.key.clone(),
                    work: cfg.work.clone().unwrap_or_default(),
                    process_cache: None,
                };
                orders::take(
                    &bootstrap,
                    ferry_failover::agent::Agent::new(Some(site), None),
                );
            }
            runtime()?.block_on(ferry_master_target::run(cfg))
        }
        Cmd::Points { repo, disk, json } => {
            let r = repo.open()?;
            let disks: Vec<String> = match disk {
                Some(d) => vec![d],
                None => r.disks().into_iter().map(|d| d.name).collect(),
            };
            #[derive(serde::Serialize)]
            struct Listed {
                #[serde(flatten)]
                point: ferry_repository::RecoveryPoint,
                /// Holders that keep this point from retention.
                held_by: Vec<String>,
            }
            let mut all = Vec::new();
            for d in &disks {
                let held = r.holders(d)?;
                all.extend(r.points(d)?.into_iter().map(|p| Listed {
                    held_by: held.get(&p.meta.seq).cloned().unwrap_or_default(),
                    point: p,
                }));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
                return Ok(());
            }
            println!(
                "{:<16} {:>8} {:<24} {:>12} {:>12} {:<21} {:>10}  HELD BY",
                "DISK", "POINT", "TIME (UTC)", "JOURNAL", "SIZE", "CONSISTENCY", "CHANGED"
            );
            for l in &all {
                let p = &l.point;
                println!(
                    "{:<16} {:>8} {:<24} {:>12} {:>12} {:<21} {:>10}  {}",
                    p.disk,
                    p.meta.seq,
                    format_time(p.meta.created_unix_ns),
                    p.meta.journal_end,
                    human(p.meta.disk_size),
                    // "(machine)": at a cut of the disk's consistency group, which the
                    // machine's other disks have points at too.
                    format!(
                        "{}{}",
                        format!("{:?}", p.meta.consistency).to_lowercase(),
                        if p.meta.group_cut.is_some() {
                            " (machine)"
                        } else {
                            ""
                        }
                    ),
                    p.changed_blocks,
                    if l.held_by.is_empty() {
                        "-".to_string()
                    } else {
                        l.held_by.join(",")
                    }
                );
            }
            if all.is_empty() {
                println!("(no recovery points)");
            }
            Ok(())
        }
        Cmd::Holds { repo, json } => {
            let holds = repo.open()?.holds()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&holds)?);
                return Ok(());
            }
            println!(
                "{:<28} {:<24} {:<32} REASON",
                "HOLDER", "SINCE (UTC)", "POINTS"
            );
            for h in &holds {
                let pts: Vec<String> = h
                    .points
                    .iter()
                    .map(|p| format!("{}@{}", p.disk, p.seq))
                    .collect();
                println!(
                    "{:<28} {:<24} {:<32} {}",
                    h.holder,
                    format_time(h.created_unix_ns),
                    pts.join(","),
                    h.reason
                );
            }
            if holds.is_empty() {
                println!("(no holds)");
            }
            Ok(())
        }
        Cmd::ReleaseHold { repo, holder } => {
            if repo.open()?.release(&holder)? {
                println!("released the points held by {holder}");
                Ok(())
            } else {
                bail!("{holder} holds nothing (ferry holds lists the holds)")
            }
        }
        Cmd::Export {
            repo,
            disk,
            point,
            output,
            format,
        } => {
            let r = repo.open()?;
            let seq = point_seq(&r, &disk, &point)?;
            let fmt = if format == "qcow2" {
                ExportFormat::Qcow2
            } else {
                ExportFormat::Raw
            };
            let _held = PointHold::take(&r, "export", &disk, seq, &output.display().to_string())?;
            r.export(&disk, seq, &output, fmt)?;
            println!(
                "exported {disk} point {seq} to {} ({format})",
                output.display()
            );
            Ok(())
        }
        Cmd::Serve {
            repo,
            disk,
            point,
            listen,
        } => {
            let r = repo.open()?;
            let seq = point_seq(&r, &disk, &point)?;
            // Held while served: the master target's retention (another process) keeps the
            // point and its chunks until this server stops.
            let held = PointHold::take(&r, "serve", &disk, seq, &format!("nbd://{listen}"))?;
            let reader = Arc::new(r.reader(&disk, seq)?);
            let mut exports: std::collections::HashMap<String, Arc<dyn ferry_nbd::Export>> =
                Default::default();
            exports.insert(
                disk.clone(),
                Arc::new(ferry_master_target::instant::PointExport { reader }),
            );
            let cfg = Arc::new(ferry_nbd::ServerConfig {
                exports,
                tls: None,
                require_tls: false,
            });
            runtime()?.block_on(async move {
                let l = tokio::net::TcpListener::bind(listen)
                    .await
                    .with_context(|| format!("cannot listen on {listen}"))?;
                eprintln!("serving {disk} point {seq} read-only at nbd://{listen}/{disk}");
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    r = ferry_nbd::serve_tcp(l, cfg) => r.context("NBD server"),
                    _ = tokio::signal::ctrl_c() => Ok(()),
                    _ = term.recv() => Ok(()),
                }
            })?;
            drop(held);
            eprintln!("stopped serving point {seq}");
            Ok(())
        }
        Cmd::Verify { repo, json } => {
            let r = repo.open()?;
            let report = r.verify();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "checked {} points, {} pages, {} chunks: {} problems",
                    report.points_checked,
                    report.pages_checked,
                    report.chunks_checked,
                    report.bad.len()
                );
                for b in &report.bad {
                    let pts: Vec<String> =
                        b.points.iter().map(|(d, s)| format!("{d}@{s}")).collect();
                    println!(
                        "BAD {} {}: {} (used by {})",
                        b.kind,
                        b.id,
                        b.reason,
                        pts.join(", ")
                    );
                }
            }
            if !report.bad.is_empty() {
                bail!("the repository has {} damaged objects", report.bad.len());
            }
            Ok(())
        }
        Cmd::Retention { repo, retention } => {
            let r = repo.open_writable()?;
            let policy = retention.policy()?;
            let now = ferry_process_server::status::now_unix_ns();
            for d in r.disks() {
                let rep = r.apply_retention(&d.name, &policy, now)?;
                println!("{}: removed {} points", d.name, rep.deleted.len());
                for h in &rep.held {
                    println!(
                        "{}: kept point {} held by {}",
                        d.name,
                        h.seq,
                        h.holders.join(", ")
                    );
                }
            }
            let gc = r.gc()?;
            println!(
                "collected {} chunks and {} pages, {} freed",
                gc.chunks_removed,
                gc.pages_removed,
                human(gc.bytes_freed)
            );
            Ok(())
        }
        Cmd::Hw { cmd } => hw::run(cmd),
        Cmd::Bench(a) => hw::bench(a),
        Cmd::Plan(a) => hw::plan(a),
        Cmd::AppPoint(a) => app_point::run(a),
        Cmd::Resync { cache, disk } => {
            let dir = cache.join(&disk);
            let st = ferry_process_server::status::read(&dir.join("status.json"))
                .with_context(|| format!("no protected disk {disk} under {}", cache.display()))?;
            if st.periodic && st.acked_seq == 0 {
                bail!(
                    "disk {disk} has no recovery point yet: its seed is the first full comparison"
                );
            }
            if !st.periodic && !st.host_access {
                bail!(
                    "disk {disk} is protected continuously without its host: a checksum resync reads the disk \
                     on its host; give it to the process server as --disk {disk}=SIZE,qmp=SOCKET,node=NODE,nbd=SOCKET"
                );
            }
            ferry_process_server::resync::request(&dir, None).with_context(|| {
                format!(
                    "writing {}",
                    dir.join(ferry_process_server::resync::REQUEST).display()
                )
            })?;
            println!("resync of {disk} requested; it starts at the next cut (watch: ferry status --watch)");
            Ok(())
        }
        Cmd::Grow { cache, disk, size } => {
            let size = ferry::parse_size(&size)?;
            let dir = cache.join(&disk);
            let st = ferry_process_server::status::read(&dir.join("status.json"))
                .with_context(|| format!("no protected disk {disk} under {}", cache.display()))?;
            if st.periodic {
                bail!(
                    "disk {disk} is protected periodically: resize it on its host (block_resize) and its next recovery point has the new size by itself"
                );
            }
            if !st.host_access {
                bail!(
                    "disk {disk} is protected continuously without its host: growing it ends and restarts the host's mirror; give the host to the process server as --disk {disk}=SIZE,qmp=SOCKET,node=NODE,nbd=SOCKET"
                );
            }
            if size < st.disk_size {
                bail!(
                    "shrinking a protected disk is refused: disk {disk} is {} bytes, asked for {size}",
                    st.disk_size
                );
            }
            if size == st.disk_size {
                bail!("disk {disk} is {size} bytes already");
            }
            if !size.is_multiple_of(512) {
                bail!("the new size of disk {disk} must be a multiple of 512 bytes, not {size}");
            }
            ferry_process_server::grow::write_request(&dir, size)
                .with_context(|| format!("writing the request into {}", dir.display()))?;
            println!(
                "growth of {disk} from {} to {size} bytes requested; the process server does it between two checkpoints (watch: ferry status). Once ferry status shows the new size, start the process server with --disk {disk}={size} from then on.",
                st.disk_size
            );
            Ok(())
        }
        Cmd::Status { cache, json, watch } => loop {
            let st = ferry_process_server::read_statuses(&cache)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print_status(&st, watch)?;
            }
            if !watch || st.iter().all(|s| s.progress.is_none()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs(1));
        },
    }
}

fn print_status(st: &[ferry_process_server::DiskStatus], redraw: bool) -> anyhow::Result<()> {
    if redraw {
        // Clear the screen and home the cursor, so the table redraws in place.
        print!("\x1b[2J\x1b[H");
    }
    println!(
        "{:<16} {:<16} {:>9} {:>10} {:>10} {:>12}  LAST ERROR",
        "DISK", "STATE", "CONNECTED", "POINT", "BACKLOG", "JOURNAL"
    );
    for s in st {
        println!(
            "{:<16} {:<16} {:>9} {:>10} {:>10} {:>12}  {}",
            s.disk,
            serde_json::to_value(&s.state)?.as_str().unwrap_or("?"),
            s.connected,
            s.acked_seq,
            s.journal_durable_seq.saturating_sub(s.acked_journal_seq),
            human(s.journal_used_bytes),
            s.last_error.clone().unwrap_or_default()
        );
        if let Some(p) = &s.progress {
            println!("  {}", p.bar(30));
        }
        if let Some(g) = &s.group {
            // The group's RPO is its slowest disk's: say which disk a cut waits for.
            println!(
                "  machine {g}: newest cut {}{}",
                if s.group_cut_unix_ns == 0 {
                    "none yet".to_string()
                } else {
                    format_time(s.group_cut_unix_ns)
                },
                if s.group_cut_pending {
                    ", this disk's point at the next cut is due"
                } else {
                    ""
                }
            );
        }
        // What the machine's policy does to this disk's shipping, when it does anything.
        let mut policy = Vec::new();
        if let Some(u) = &s.uplink {
            policy.push(format!(
                "priority {}, {:.0}% of the {} Mbit/s uplink now (sending {:.1} Mbit/s)",
                s.priority,
                u.fraction * 100.0,
                u.uplink_mbit,
                u.rate_mbit
            ));
        } else if s.priority != Default::default() {
            policy.push(format!("priority {} (no uplink budget)", s.priority));
        }
        if let Some(m) = s.bandwidth_limit_mbit {
            policy.push(format!("bandwidth limited to {m} Mbit/s now"));
        }
        match s.compression.as_str() {
            "off" => policy.push("chunks sent without compression".to_string()),
            "lz4" => policy.push("chunks compressed with lz4".to_string()),
            _ => {}
        }
        if !policy.is_empty() {
            println!("  policy: {}", policy.join(", "));
        }
        if let Some(e) = s
            .grow_error
            .as_ref()
            .filter(|e| s.last_error.as_ref() != Some(*e))
        {
            println!("  grow: {e}");
        }
    }
    Ok(())
}

/// Structured logs: to journald (every event's fields as journal fields, `TARGET`, `CODE_FILE`,
/// `PRIORITY`) when the process runs under systemd with its stderr connected to the journal
/// (`JOURNAL_STREAM` names stderr's device and inode), else formatted lines on stderr. `FERRY_LOG`
/// filters (default `info`).
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journal = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(j) => registry.with(j).init(),
        None => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}

/// systemd's test: `JOURNAL_STREAM=DEV:INODE` equals stderr's.
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned();
    match stderr.map(std::fs::File::from).and_then(|f| f.metadata()) {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CacheIo {
    Auto,
    Direct,
    Buffered,
}

/// Whether the journal writes with O_DIRECT; `auto` asks the cache disk's hardware profile.
fn cache_direct_io(mode: CacheIo, cache: &std::path::Path) -> bool {
    match mode {
        CacheIo::Direct => true,
        CacheIo::Buffered => false,
        CacheIo::Auto => {
            let advice = ferry_hardware::Profiles::builtin()
                .ok()
                .and_then(|p| ferry_hardware::probe::cache_direct_io(cache, &p));
            match advice {
                Some((disk, direct)) => {
                    tracing::info!(%disk, direct, "cache I/O as the disk's hardware profile advises");
                    direct
                }
                None => {
                    tracing::info!(cache = %cache.display(),
                        "cache I/O: the cache's disk has no profile here; writing through the page cache");
                    false
                }
            }
        }
    }
}

fn process_server(mut a: ProcessServerArgs) -> anyhow::Result<()> {
    let mut configured = None;
    let mut schedules = std::collections::HashMap::new();
    if a.bootstrap.config_server.is_some() {
        if !a.disks.is_empty() || !a.periodic.is_empty() || a.master.is_some() {
            bail!("with --config-server, the disks and the master target come from the configuration server: leave out --disk, --periodic and --master");
        }
        let cfg = a.bootstrap.fetch(None)?;
        let ferry_api::RoleConfig::ProcessServer(c) = &cfg else {
            bail!("this identity is not a process server's (the configuration server sent another role's configuration)");
        };
        for d in &c.disks {
            let mut spec = format!("{}={}", d.name, d.size_bytes);
            // A source in the host form tells this server how to read the disk on its host; an
            // image path names the original disk that reprotect and failback write (this
            // server opens it then, for the resync), nothing it replicates from.
            if let Some(host) = host_source(&d.source) {
                spec = format!("{spec},{host}");
            }
            if d.compression != ferry_api::Compression::Zstd {
                spec = format!("{spec},compress={}", d.compression);
            }
            spec = format!("{spec},priority={}", d.priority.as_str());
            let ms = u64::from(d.interval_secs) * 1000;
            // A machine's disks are one consistency group.
            if d.periodic {
                a.periodic
                    .push(format!("{spec},group={},interval-ms={ms}", d.machine));
            } else {
                a.disks
                    .push(format!("{spec},group={},interval-ms={ms}", d.machine));
            }
        }
        schedules = machine_schedules(&c.disks);
        let l = a.bootstrap.layout();
        a.master = Some(c.master.clone());
        a.pki = l.pki;
        a.key = l.key;
        tracing::info!(disks = c.disks.len(), master = %c.master, "configured by the configuration server");
        configured = Some(cfg);
    }
    let mut disks = Vec::new();
    for d in &a.disks {
        disks.push(parse_disk(d).with_context(|| format!("disk {d:?}"))?);
    }
    let periodic = a
        .periodic
        .iter()
        .map(|p| parse_periodic(p, a.interval_ms).with_context(|| format!("disk {p:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !a.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&a.block_size) {
        bail!("--block-size must be a power of two from 4096 to 1048576");
    }
    let uplink = match a.uplink_mbit {
        Some(mbit) if !(1..=100_000).contains(&mbit) => {
            bail!("--uplink-mbit must be from 1 to 100000")
        }
        Some(mbit) => Some(ferry_process_server::uplink::Uplink::new(mbit)),
        None => None,
    };
    // A disk's machine is its group (a configured disk's group is its machine), else itself.
    let machines: Vec<_> = disks
        .iter()
        .map(|d| (&d.name, &d.group, d.priority))
        .chain(periodic.iter().map(|p| (&p.name, &p.group, p.priority)))
        .map(|(n, g, p)| (n.clone(), g.clone().unwrap_or_else(|| n.clone()), p))
        .collect();
    let throttles = ferry_process_server::throttle::by_disk(&machines, &schedules, uplink.as_ref())
        .map_err(anyhow::Error::msg)?;
    let master = a.master.clone().context("--master is required")?;
    let (host, _) = ferry_api::validate::host_port(&master)
        .with_context(|| format!("--master {master:?} must be HOST:PORT"))?;
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string())
        .with_context(|| format!("{host:?} is not a valid host name"))?;
    let journal_direct_io = cache_direct_io(a.cache_io, &a.cache);
    let cfg = ferry_process_server::Config {
        cache_dir: a.cache,
        nbd_listen: a.nbd_listen,
        nbd_tls: if a.nbd_tls {
            Some(ferry_pki::server_config(&a.pki, false)?)
        } else {
            None
        },
        disks,
        periodic,
        block_size: a.block_size,
        journal_capacity: parse_size(&a.journal_capacity)?,
        journal_direct_io,
        link: ferry_process_server::Link {
            addr: master.clone(),
            server_name,
            tls: ferry_pki::client_config(&a.pki)?,
            throttles,
        },
        tuning: ferry_process_server::Tuning {
            interval: Duration::from_millis(a.interval_ms.max(10)),
            ..Default::default()
        },
        key: load_key(&a.key)?,
        app_hooks: a
            .freeze_hook
            .map(|freeze| ferry_process_server::app_consistent::Hooks {
                freeze,
                thaw: a.thaw_hook.unwrap_or_default(),
                timeout: Duration::from_secs(a.hook_timeout_secs.max(1)),
                every: (a.app_consistent_every > 0)
                    .then(|| Duration::from_secs(a.app_consistent_every)),
            }),
    };
    if let Some(c) = configured {
        a.bootstrap.watch(c, None, Some(cfg.cache_dir.clone()));
        // The drain check of a planned failover runs here, on this server's journals; so does
        // the resync of reprotect and failback, beside the original disks, asking the master
        // target for the live disks' block names and only the blocks that differ. Its
        // connections draw from the same throttles as the replication's (the same objects:
        // one bucket per machine, one place in the uplink), so a machine's bandwidth limit
        // holds for its shipping and its resync together.
        let protected = ferry_failover::split::Protected {
            link: ferry_process_server::Link {
                addr: cfg.link.addr.clone(),
                server_name: cfg.link.server_name.clone(),
                tls: cfg.link.tls.clone(),
                throttles: cfg.link.throttles.clone(),
            },
            key: Arc::new(load_key(&a.key)?),
            work: a.bootstrap.state.join("resync"),
            // A lost connection to the master target is opened again for up to 5 minutes.
            retry: Default::default(),
        };
        // A resync that wrote an original disk through its host and died left a writable
        // export there: removed now (off the start: a host out of reach takes a while to say so).
        let work = protected.work.clone();
        std::thread::spawn(move || ferry_failover::split::remove_leftover_exports(&work));
        let agent = ferry_failover::agent::Agent::with_protected(
            None,
            Some(cfg.cache_dir.clone()),
            Some(protected),
        );
        orders::take(&a.bootstrap, agent);
    }
    runtime()?.block_on(ferry_process_server::run(cfg))
}

/// A disk's configured source when it is in the host form (`qmp=PATH,node=NODE,nbd=PATH
/// [,fleece=PATH]`), not an image path.
fn host_source(source: &str) -> Option<&str> {
    let host = !source.is_empty()
        && source.split(',').all(|p| {
            p.split_once('=')
                .is_some_and(|(k, _)| ["qmp", "node", "nbd", "fleece"].contains(&k))
        });
    host.then_some(source)
}

/// `NAME=SIZE[,KEY=VALUE...]` as `--disk` and `--periodic` take it, checked against the keys
/// the option knows.
fn parse_spec<'a>(
    option: &str,
    text: &'a str,
    known: &[&str],
) -> anyhow::Result<(&'a str, u64, std::collections::HashMap<&'a str, &'a str>)> {
    let mut parts = text.split(',');
    let head = parts.next().unwrap_or_default();
    let (name, size) = head
        .split_once('=')
        .with_context(|| format!("{option} {text:?} must start with NAME=SIZE"))?;
    let mut kv = std::collections::HashMap::new();
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("{option}: {p:?} is not KEY=VALUE"))?;
        if !known.contains(&k) {
            bail!(
                "{option} {name}: unknown key {k:?} (known: {})",
                known.join(", ")
            );
        }
        kv.insert(k, v);
    }
    Ok((name, parse_size(size)?, kv))
}

/// Each machine's bandwidth limit and weekly windows, from its policy.
fn machine_schedules(
    disks: &[ferry_api::AssignedDisk],
) -> std::collections::HashMap<String, ferry_process_server::throttle::Schedule> {
    use ferry_process_server::throttle::{Schedule, Window};
    let mut out = std::collections::HashMap::new();
    for d in disks {
        let schedule = Schedule {
            default_mbit: d.bandwidth.limit_mbit,
            windows: d
                .bandwidth
                .schedule
                .iter()
                .map(|w| {
                    let mut days = [false; 7];
                    for &day in &w.days {
                        days[day as usize] = true;
                    }
                    Window {
                        days,
                        start_minute: w.start_minute,
                        end_minute: w.end_minute,
                        limit_mbit: w.limit_mbit,
                    }
                })
                .collect(),
        };
        out.entry(d.machine.clone()).or_insert(schedule);
    }
    out
}

/// `group=MACHINE` of a disk spec: the consistency group, named like a disk.
fn parse_group(option: &str, name: &str, v: Option<&&str>) -> anyhow::Result<Option<String>> {
    match v.copied() {
        Some(g) if !ferry_wire::valid_disk_name(g) => {
            bail!("{option} {name}: group {g:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")
        }
        g => Ok(g.map(str::to_string)),
    }
}

/// `compress=zstd|lz4|off` of a disk spec (default zstd; `yes` and `no` mean zstd and off).
fn parse_compress(
    option: &str,
    name: &str,
    v: Option<&&str>,
) -> anyhow::Result<ferry_chunk::Compression> {
    match v.copied() {
        None | Some("yes") => Ok(ferry_chunk::Compression::Zstd),
        Some("no") => Ok(ferry_chunk::Compression::Off),
        Some(o) => o
            .parse()
            .map_err(|e| anyhow::anyhow!("{option} {name}: compress={o:?}: {e}")),
    }
}

/// `priority=high|medium|low` of a disk spec (default medium): its machine's weight in the
/// uplink.
fn parse_priority(
    option: &str,
    name: &str,
    v: Option<&&str>,
) -> anyhow::Result<ferry_process_server::uplink::Priority> {
    match v {
        None => Ok(Default::default()),
        Some(p) => p
            .parse()
            .map_err(|e| anyhow::anyhow!("{option} {name}: {e}")),
    }
}

/// `NAME=SIZE[,qmp=PATH,node=NODE,nbd=PATH][,group=MACHINE][,compress=zstd|lz4|off][,interval-ms=N]
/// [,priority=high|medium|low]`
fn parse_disk(text: &str) -> anyhow::Result<ferry_process_server::DiskSpec> {
    let (name, size, kv) = parse_spec(
        "--disk",
        text,
        &[
            "qmp",
            "node",
            "nbd",
            "group",
            "compress",
            "interval-ms",
            "priority",
        ],
    )?;
    let interval = match kv.get("interval-ms") {
        Some(v) => Some(Duration::from_millis(
            v.parse::<u64>().context("--disk: interval-ms")?.max(10),
        )),
        None => None,
    };
    let group = parse_group("--disk", name, kv.get("group"))?;
    let host = match (kv.get("qmp"), kv.get("node"), kv.get("nbd")) {
        (None, None, None) => None,
        (Some(q), Some(n), Some(s)) => Some(ferry_process_server::resync::HostDisk {
            qmp: q.into(),
            node: n.to_string(),
            nbd_socket: s.into(),
        }),
        _ => bail!("--disk {name}: give all of qmp=, node= and nbd= (the disk's host), or none"),
    };
    Ok(ferry_process_server::DiskSpec {
        name: name.to_string(),
        size,
        host,
        group,
        compress: parse_compress("--disk", name, kv.get("compress"))?,
        interval,
        priority: parse_priority("--disk", name, kv.get("priority"))?,
    })
}

/// `NAME=SIZE,qmp=PATH,node=NODE,nbd=PATH,fleece=PATH[,interval-ms=N][,compress=zstd|lz4|off]
/// [,group=MACHINE][,priority=high|medium|low]`
fn parse_periodic(
    text: &str,
    default_interval_ms: u64,
) -> anyhow::Result<ferry_process_server::periodic::PeriodicSpec> {
    let (name, size, kv) = parse_spec(
        "--periodic",
        text,
        &[
            "qmp",
            "node",
            "nbd",
            "fleece",
            "interval-ms",
            "compress",
            "group",
            "priority",
        ],
    )?;
    let get = |k: &str| {
        kv.get(k)
            .map(|v| v.to_string())
            .with_context(|| format!("--periodic {name}: {k}= is missing"))
    };
    let interval_ms = match kv.get("interval-ms") {
        Some(v) => v.parse().context("--periodic: interval-ms")?,
        None => default_interval_ms,
    };
    Ok(ferry_process_server::periodic::PeriodicSpec {
        name: name.to_string(),
        size,
        qmp: get("qmp")?.into(),
        node: get("node")?,
        nbd_socket: get("nbd")?.into(),
        fleece_file: get("fleece")?,
        interval: Duration::from_millis(interval_ms.max(100)),
        compress: parse_compress("--periodic", name, kv.get("compress"))?,
        group: parse_group("--periodic", name, kv.get("group"))?,
        priority: parse_priority("--periodic", name, kv.get("priority"))?,
    })
}

fn human(n: u64) -> String {
    ferry_process_server::status::human_bytes(n)
}

/// RFC 3339 UTC with milliseconds, without a date crate (civil-from-days, Howard Hinnant's
/// published algorithm).
fn format_time(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let ms = (unix_ns / 1_000_000) % 1000;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::host_source;

    #[test]
    fn only_a_host_form_source_reaches_the_process_servers_disk_spec() {
        let host = "qmp=/run/h/qmp.sock,node=drive0,nbd=/run/h/nbd.sock";
        assert_eq!(host_source(host), Some(host));
        let periodic = "qmp=/q,node=n,nbd=/s,fleece=/f.qcow2";
        assert_eq!(host_source(periodic), Some(periodic));
        // An image path (what reprotect writes), empty, or anything else: not the host's.
        assert_eq!(host_source("/srv/vm/web-d0.qcow2"), None);
        assert_eq!(host_source("/srv/a=b/d0.qcow2"), None);
        assert_eq!(host_source(""), None);
        assert_eq!(host_source("qmp=/q,/srv/d0.qcow2"), None);
    }
}
