//! `ferry hw probe|tune`, `ferry bench`, `ferry plan`: arguments and output; the work is in
//! `ferry_hardware`.

use anyhow::Context;
use clap::{Args, Subcommand};
use ferry_hardware::tune::{self, Options, Outcome, Plan};
use ferry_hardware::{bench, probe, sizing, wan, Host, Profiles, Report};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Clone)]
pub struct Common {
    /// Root of the machine to read: `/`, or a recorded sysfs/procfs tree.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// A directory of profile files to use instead of the built-in ones.
    #[arg(long)]
    profiles: Option<PathBuf>,
}

impl Common {
    fn load(&self) -> anyhow::Result<(Host, Profiles)> {
        let profiles = match &self.profiles {
            Some(d) => Profiles::load_dir(d)?,
            None => Profiles::builtin()?,
        };
        if !self.root.is_dir() {
            anyhow::bail!("--root {} is not a directory", self.root.display());
        }
        Ok((Host::new(&self.root), profiles))
    }
}

#[derive(Subcommand)]
pub enum HwCmd {
    /// Report CPU features, NICs, disks and the hypervisor, and what tuning would change.
    Probe {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        json: bool,
    },
    /// Apply the hardware profiles (every change recorded for --revert).
    Tune {
        #[command(flatten)]
        common: Common,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Restore every value recorded in the state file.
        #[arg(long, conflicts_with = "dry_run")]
        revert: bool,
        #[arg(long, default_value = "/var/lib/ferry/hw-tune.json")]
        state_file: PathBuf,
        /// Only this interface (repeatable; default: every identified physical NIC).
        #[arg(long = "interface")]
        interfaces: Vec<String>,
        /// Tune this disk as a cache device (repeatable), e.g. nvme0n1.
        #[arg(long = "disk")]
        disks: Vec<String>,
        /// Tune the disk holding this cache directory.
        #[arg(long)]
        cache_dir: Option<PathBuf>,
        /// Set this MTU on the selected interfaces (jumbo frames: only if the network carries them).
        #[arg(long)]
        mtu: Option<u32>,
        /// WAN bandwidth (Mbit/s) and round trip (ms) for the TCP buffer sizes.
        #[arg(long)]
        wan_mbps: Option<u64>,
        #[arg(long)]
        wan_rtt_ms: Option<u64>,
        /// Leave NICs alone.
        #[arg(long)]
        no_net: bool,
        /// Leave the TCP sysctls alone.
        #[arg(long)]
        no_tcp: bool,
        /// Leave disks alone.
        #[arg(long)]
        no_disks: bool,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: HwCmd) -> anyhow::Result<()> {
    match cmd {
        HwCmd::Probe { common, json } => {
            let (host, profiles) = common.load()?;
            let report = probe(&host, &profiles);
            // Every identified disk is shown as a cache candidate; tune only touches the ones named.
            let opts = Options {
                disks: report.disks.iter().map(|d| d.name.clone()).collect(),
                ..Default::default()
            };
            let plan = tune::plan(&host, &report, &profiles, &opts);
            if json {
                let v = serde_json::json!({ "report": report, "plan": plan });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_report(&report);
                print_plan(&plan, "would change");
            }
            Ok(())
        }
        HwCmd::Tune {
            common,
            dry_run,
            revert,
            state_file,
            interfaces,
            disks,
            cache_dir,
            mtu,
            wan_mbps,
            wan_rtt_ms,
            no_net,
            no_tcp,
            no_disks,
            json,
        } => {
            let (host, profiles) = common.load()?;
            if revert {
                let out = tune::revert(&host, &state_file)?;
                print_outcome(&out, json, "reverted")?;
                if !json && out.kept > 0 {
                    println!(
                        "kept in {}: {} change(s) not reverted (ferry hw tune --revert again once the device is back)",
                        state_file.display(),
                        out.kept
                    );
                }
                return Ok(());
            }
            let report = probe(&host, &profiles);
            let opts = Options {
                interfaces,
                disks,
                cache_dir,
                mtu,
                wan_mbps,
                wan_rtt_ms,
                skip_net: no_net,
                skip_tcp: no_tcp,
                skip_disks: no_disks,
            };
            let plan = tune::plan(&host, &report, &profiles, &opts);
            if dry_run {
                if json {
                    println!("{}", serde_json::to_string_pretty(&plan)?);
                } else {
                    print_plan(&plan, "would change");
                }
                return Ok(());
            }
            let out = tune::apply(&host, &plan, &state_file)?;
            print_outcome(&out, json, "changed")?;
            if !json && !out.applied.is_empty() {
                println!(
                    "recorded in {} (undo: ferry hw tune --revert)",
                    state_file.display()
                );
            }
            Ok(())
        }
    }
}

fn yn(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |v| v.to_string())
}

fn print_report(r: &Report) {
    let c = &r.cpu;
    println!(
        "CPU        {} ({} CPUs, from {})",
        c.model, c.cpus, c.source
    );
    println!(
        "           AES-NI {}  VAES {}  SHA-NI {}  AVX2 {}  AVX-512F {}",
        yn(c.aes),
        yn(c.vaes),
        yn(c.sha_ni),
        yn(c.avx2),
        yn(c.avx512f)
    );
    if let Some(m) = r.memory_bytes {
        println!("MEMORY     {:.1} GiB", m as f64 / (1u64 << 30) as f64);
    }
    let h = &r.hypervisor;
    println!("PLATFORM   {} — {} ({})", h.name, h.description, h.evidence);
    println!();
    println!(
        "{:<12} {:<11} {:<8} {:>7} {:>6} {:>7} {:>4} {:>11} {:>9} {:<14} PROFILE",
        "NIC",
        "DRIVER",
        "DEVICE",
        "SPEED",
        "MTU",
        "QUEUES",
        "NUMA",
        "RING RX/TX",
        "CHANNELS",
        "OFFLOADS ON"
    );
    for n in &r.nics {
        let ring = n.ring.map_or("-".into(), |r| format!("{}/{}", r.rx, r.tx));
        let ch = n.channels.map_or("-".into(), |c| {
            if c.combined > 0 {
                c.combined.to_string()
            } else {
                format!("{}/{}", c.rx, c.tx)
            }
        });
        let on: Vec<&str> = n
            .offloads
            .iter()
            .filter(|(_, v)| **v)
            .map(|(k, _)| k.as_str())
            .collect();
        println!(
            "{:<12} {:<11} {:<8} {:>7} {:>6} {:>7} {:>4} {:>11} {:>9} {:<14} {}{}",
            n.name,
            opt(&n.driver),
            yn(n.physical),
            n.speed_mbps.map_or("-".into(), |s| format!("{s}M")),
            opt(&n.mtu),
            format!("{}/{}", n.rx_queues, n.tx_queues),
            opt(&n.numa_node),
            ring,
            ch,
            if on.is_empty() {
                "-".into()
            } else {
                on.join(",")
            },
            n.profile,
            if n.profile_matched { "" } else { " (no match)" }
        );
    }
    println!();
    println!(
        "{:<10} {:<11} {:<5} {:>10} {:<4} {:<12} {:>6} {:<13} {:<4} {:>5} PROFILE",
        "DISK",
        "DRIVER",
        "NVME",
        "SIZE",
        "ROT",
        "SCHEDULER",
        "NR_REQ",
        "WRITE CACHE",
        "TRIM",
        "LBS"
    );
    for d in &r.disks {
        println!(
            "{:<10} {:<11} {:<5} {:>10} {:<4} {:<12} {:>6} {:<13} {:<4} {:>5} {}{}",
            d.name,
            opt(&d.driver),
            yn(d.nvme),
            d.size_bytes
                .map_or("-".into(), |s| format!("{:.1}G", s as f64 / 1e9)),
            d.rotational.map_or("-", yn),
            opt(&d.scheduler),
            opt(&d.nr_requests),
            opt(&d.write_cache),
            yn(d.trim),
            opt(&d.logical_block_size),
            d.profile,
            if d.profile_matched { "" } else { " (no match)" }
        );
    }
    if !r.notes.is_empty() {
        println!();
        for n in &r.notes {
            println!("note: {n}");
        }
    }
}

fn print_plan(p: &Plan, verb: &str) {
    println!();
    if p.changes.is_empty() {
        println!("nothing to change");
    }
    for c in &p.changes {
        println!(
            "{verb}: {}: {} -> {} ({})",
            c.what,
            c.before.replace('\t', " "),
            c.after.replace('\t', " "),
            c.reason
        );
    }
    for s in &p.skipped {
        println!("skipped: {}: {}", s.what, s.reason);
    }
}

fn print_outcome(o: &Outcome, json: bool, verb: &str) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(o)?);
        return Ok(());
    }
    if let Some(s) = &o.set_aside {
        println!(
            "set aside: {} is from another boot ({}; this boot {}): the reboot reset its {} change(s), so it is neither reverted nor added to; kept as {}",
            s.from,
            s.boot_id.as_deref().unwrap_or("boot not recorded"),
            s.this_boot.as_deref().unwrap_or("unknown"),
            s.changes,
            s.to
        );
    }
    if o.applied.is_empty() {
        println!("nothing {verb}");
    }
    for c in &o.applied {
        println!(
            "{verb}: {}: {} -> {}",
            c.what,
            c.before.replace('\t', " "),
            c.after.replace('\t', " ")
        );
    }
    for s in &o.failed {
        println!("failed: {}: {}", s.what, s.reason);
    }
    for s in &o.skipped {
        println!("skipped: {}: {}", s.what, s.reason);
    }
    Ok(())
}

/// What `ferry bench` measures (also what `ferry plan` runs when it has no `--bench` file).
#[derive(Args)]
pub struct RunArgs {
    /// The cache directory to measure (write bandwidth, fdatasync latency).
    #[arg(long, default_value = "/var/cache/ferry")]
    dir: PathBuf,
    /// Seconds per CPU stage.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// MiB written for the cache bandwidth test.
    #[arg(long, default_value_t = 256)]
    cache_mib: u64,
    /// Also measure the WAN link to a peer running `ferry bench --serve` (plain TCP): RTT,
    /// upstream throughput, bandwidth-delay product.
    #[arg(long, value_name = "HOST:PORT")]
    peer: Option<String>,
    /// Seconds of the upstream throughput run (at most 60).
    #[arg(long, default_value_t = 5.0)]
    wan_secs: f64,
    /// Round trips timed for the RTT.
    #[arg(long, default_value_t = 50)]
    wan_pings: u32,
    /// Also write the figures as JSON to this file (input for `ferry plan --bench`).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Measure nothing: answer `ferry bench --peer` clients on this address (plain TCP, one
    /// client at a time) until --serve-secs have passed.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "peer")]
    serve: Option<String>,
    /// How long the responder listens; afterwards connections are refused.
    #[arg(long, default_value_t = 600)]
    serve_secs: u64,
    /// Most GiB one client may send in its throughput run.
    #[arg(long, default_value_t = 64)]
    serve_max_gib: u64,
}

impl RunArgs {
    fn options(&self) -> anyhow::Result<bench::Options> {
        if !(self.seconds > 0.0 && self.seconds <= 600.0) {
            anyhow::bail!("--seconds must be above 0 and at most 600");
        }
        let max = wan::MAX_SINK.as_secs_f64();
        if !(self.wan_secs > 0.0 && self.wan_secs <= max) {
            anyhow::bail!("--wan-secs must be above 0 and at most {max}");
        }
        if !(1..wan::MAX_PINGS).contains(&self.wan_pings) {
            anyhow::bail!("--wan-pings must be 1 to {}", wan::MAX_PINGS - 1);
        }
        Ok(bench::Options {
            dir: self.dir.clone(),
            stage: Duration::from_secs_f64(self.seconds),
            cache_bytes: self.cache_mib.clamp(1, 1 << 20) << 20,
            peer: self.peer.clone(),
            wan: wan::ClientOptions {
                pings: self.wan_pings,
                upstream: Duration::from_secs_f64(self.wan_secs),
                ..Default::default()
            },
            ..Default::default()
        })
    }
}

fn serve(addr: &str, a: &BenchArgs) -> anyhow::Result<()> {
    if !(1..=86_400).contains(&a.serve_secs) {
        anyhow::bail!("--serve-secs must be 1 to 86400");
    }
    let o = wan::ServeOptions {
        lifetime: Duration::from_secs(a.serve_secs),
        max_bytes: a.serve_max_gib.clamp(1, 1 << 20) << 30,
        ..Default::default()
    };
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let at = l.local_addr()?;
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say(format!(
        "ferry bench: serving WAN measurements on {at} (plain TCP, one client at a time, for {} s)",
        a.serve_secs
    ));
    let n = wan::serve(l, &o, say)?;
    println!(
        "ferry bench: {n} session(s); stopped after {} s",
        a.serve_secs
    );
    Ok(())
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    if let Some(addr) = &a.serve {
        return serve(addr, &a);
    }
    let a = a.run;
    let f = bench::run(&a.options()?)?;
    if let Some(p) = &a.out {
        std::fs::write(p, serde_json::to_vec_pretty(&f)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&f)?);
    } else {
        print_figures(&f);
    }
    Ok(())
}

fn print_figures(f: &bench::Figures) {
    println!("{:<44} {:>12}", "MEASURE", "RESULT");
    let rows = [
        (
            "keyed BLAKE3 (chunk names)",
            format!("{:.0} MB/s", f.hash_mbps),
        ),
        ("zstd level 1", format!("{:.0} MB/s", f.zstd_mbps)),
        ("AES-256-GCM", format!("{:.0} MB/s", f.aes_gcm_mbps)),
        (
            "reduction pipeline, one core",
            format!("{:.0} MB/s", f.pipeline_mbps_one_core),
        ),
        (
            &*format!("reduction pipeline, {} cores", f.cpus),
            format!("{:.0} MB/s", f.pipeline_mbps_all_cores),
        ),
        (
            "stored / written (mixed data)",
            format!("{:.3}", f.reduction_ratio),
        ),
        (
            "lz4 (a policy's choice)",
            f.lz4
                .as_ref()
                .map_or("-".into(), |l| format!("{:.0} MB/s", l.compress_mbps)),
        ),
        (
            "reduction pipeline with lz4, one core",
            f.lz4.as_ref().map_or("-".into(), |l| {
                format!("{:.0} MB/s", l.pipeline_mbps_one_core)
            }),
        ),
        (
            &*format!("reduction pipeline with lz4, {} cores", f.cpus),
            f.lz4.as_ref().map_or("-".into(), |l| {
                format!("{:.0} MB/s", l.pipeline_mbps_all_cores)
            }),
        ),
        (
            "stored / written with lz4",
            f.lz4
                .as_ref()
                .map_or("-".into(), |l| format!("{:.3}", l.reduction_ratio)),
        ),
        (
            "cache sequential write + fdatasync",
            format!("{:.0} MB/s", f.cache_write_mbps),
        ),
        (
            "4 KiB write + fdatasync p50",
            format!("{:.3} ms", f.fsync_p50_ms),
        ),
        (
            "4 KiB write + fdatasync p99",
            format!("{:.3} ms", f.fsync_p99_ms),
        ),
        (
            "4 KiB write + fdatasync max",
            format!("{:.3} ms", f.fsync_max_ms),
        ),
    ];
    for (k, v) in rows {
        println!("{k:<44} {v:>12}");
    }
    if let Some(w) = &f.wan {
        let rows = [
            ("WAN RTT p50", format!("{:.3} ms", w.rtt_p50_ms)),
            ("WAN RTT p99", format!("{:.3} ms", w.rtt_p99_ms)),
            (
                "WAN upstream TCP throughput",
                format!("{:.1} Mbit/s", w.upstream_mbps),
            ),
            (
                "WAN bandwidth-delay product",
                format!("{:.0} KiB", w.bdp_bytes as f64 / 1024.0),
            ),
        ];
        for (k, v) in rows {
            println!("{k:<44} {v:>12}");
        }
    }
    println!("(cache: {})", f.cache_dir);
    if let Some(w) = &f.wan {
        println!(
            "(WAN: {}, {} pings, {:.1} MB in {:.2} s; TCP buffers: ferry hw tune --wan-mbps {:.0} --wan-rtt-ms {:.0})",
            w.peer,
            w.pings,
            w.upstream_bytes as f64 / 1e6,
            w.upstream_secs,
            w.upstream_mbps.ceil(),
            w.rtt_p50_ms.ceil()
        );
    }
}

#[derive(Args)]
pub struct PlanArgs {
    /// Figures from `ferry bench --out FILE` (default: run the benchmark now).
    #[arg(long)]
    bench: Option<PathBuf>,
    #[command(flatten)]
    run: RunArgs,
    /// WAN bandwidth to the recovery site, Mbit/s (0: no WAN limit). Default: the bench's
    /// measured upstream throughput (`ferry bench --peer`), else 1000.
    #[arg(long)]
    wan_mbps: Option<f64>,
    /// Round trip to the recovery site, ms. Default: the bench's measured RTT p50, else 20.
    #[arg(long)]
    rtt_ms: Option<f64>,
    /// Average churn of one protected disk, GB per day.
    #[arg(long, default_value_t = 20.0)]
    disk_churn_gb: f64,
    /// Peak write rate over average write rate.
    #[arg(long, default_value_t = 3.0)]
    peak_to_average: f64,
    /// Checkpoint interval (the process server's --interval-ms).
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Stored bytes per written byte (default: the benchmark's mixed-data figure).
    #[arg(long)]
    reduction: Option<f64>,
    /// The policies' compressor to size for: zstd (the default) or lz4 (faster per core, more
    /// bytes on the WAN), with the bench's figures for it.
    #[arg(long, default_value = "zstd", value_parser = ["zstd", "lz4"])]
    compression: String,
    /// Write rates (MB/s) to estimate the RPO at (repeatable).
    #[arg(long = "rate", default_values_t = [10.0, 50.0, 100.0])]
    rates: Vec<f64>,
}

pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let f: bench::Figures = match &a.bench {
        Some(p) => {
            let b = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_slice(&b)
                .with_context(|| format!("{} is not `ferry bench` JSON", p.display()))?
        }
        None => bench::run(&a.run.options()?)?,
    };
    let compression: ferry_chunk::Compression =
        a.compression.parse().map_err(anyhow::Error::msg)?;
    let sized = f
        .with_compression(compression)
        .map_err(|e| anyhow::anyhow!("--compression {compression}: {e}"))?;
    // An explicit flag wins over the measurement (e.g. sizing for a link not yet bought).
    let (wan_mbps, wan_from) = match (a.wan_mbps, &f.wan) {
        (Some(v), _) => (v, "flag"),
        (None, Some(w)) => (w.upstream_mbps, "measured"),
        (None, None) => (1000.0, "default"),
    };
    let (rtt_ms, rtt_from) = match (a.rtt_ms, &f.wan) {
        (Some(v), _) => (v, "flag"),
        (None, Some(w)) => (w.rtt_p50_ms, "measured"),
        (None, None) => (20.0, "default"),
    };
    for (name, v) in [
        ("--wan-mbps", wan_mbps),
        ("--rtt-ms", rtt_ms),
        ("--disk-churn-gb", a.disk_churn_gb),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            anyhow::bail!("{name} must be a number at least 0");
        }
    }
    if !(a.peak_to_average.is_finite() && a.peak_to_average >= 1.0) {
        anyhow::bail!("--peak-to-average must be at least 1");
    }
    let inputs = sizing::Inputs {
        wan_mbps,
        rtt_ms,
        disk_churn_gb_per_day: a.disk_churn_gb,
        peak_to_average: a.peak_to_average,
        interval_ms: a.interval_ms.max(10),
        reduction: a.reduction,
        rpo_rates_mbs: a
            .rates
            .iter()
            .copied()
            .filter(|r| r.is_finite() && *r > 0.0)
            .collect(),
        ..Default::default()
    };
    let mut s = sizing::plan(&sized, &inputs);
    s.inputs.push(("wan_mbps_from".into(), wan_from.into()));
    s.inputs
        .push(("compression".into(), compression.to_string()));
    s.inputs.push(("rtt_ms_from".into(), rtt_from.into()));
    if a.run.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "figures": f, "sizing": s }))?
        );
        return Ok(());
    }
    print_figures(&f);
    println!();
    println!("SIZING with {compression} compression (model: hardware/README.md)");
    let wan = s
        .wan_capacity_mbs
        .map_or("no limit".into(), |w| format!("{w:.0} MB/s of writes"));
    println!(
        "  reduction (CPU, {:.0}% of {} cores)      {:.0} MB/s",
        inputs.cpu_share * 100.0,
        f.cpus,
        s.reduce_capacity_mbs
    );
    println!(
        "  cache journal writes                   {:.0} MB/s",
        s.journal_capacity_mbs
    );
    println!(
        "  WAN {:>7.1} Mbit/s at ratio {:.2}       {wan} ({wan_from})",
        wan_mbps, s.reduction_ratio
    );
    println!(
        "  sustainable peak write rate            {:.0} MB/s (bound: {})",
        s.sustainable_peak_mbs, s.bottleneck
    );
    println!(
        "  most one disk can churn                {:.0} MB/s",
        s.per_disk_max_mbs
    );
    println!(
        "  churn per day (peak/average {:.1})       {:.2} TB",
        a.peak_to_average, s.churn_per_day_tb
    );
    println!(
        "  protected disks at {:.0} GB/day each     {}",
        a.disk_churn_gb, s.protected_disks
    );
    println!();
    println!(
        "  {:>10} {:>10} {:>10} {:>10} {:>10}   (interval {} ms, RTT {:.3} ms)",
        "WRITES", "RPO", "REDUCE", "SHIP", "COMMIT", inputs.interval_ms, rtt_ms
    );
    for r in &s.rpo {
        println!(
            "  {:>6.0} MB/s {:>10} {:>8.3} s {:>8.3} s {:>8.3} s",
            r.write_mbs,
            r.rpo_s.map_or("grows".into(), |v| format!("{v:.2} s")),
            r.reduce_s,
            r.ship_s,
            r.commit_s
        );
    }
    Ok(())
}
