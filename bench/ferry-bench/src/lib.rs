//! Ferry benchmarks (not tests): they print figures and targets, they do not assert.
//!
//! - `pipeline`: per-stage throughput of the reduction pipeline on one core over a mixed image.
//! - `ingest`: NBD write throughput and latency of the process server versus plain `qemu-nbd`.
//! - `rpo`: recovery point lag under a steady paced write load.
//! - `inventory`: the configuration server with 10,000 disks: status endpoints, `ferry ctl
//!   status`, memory.
//!
//! Every benchmark bounds its own time, talks only to 127.0.0.1, and removes what it created.
#![forbid(unsafe_code)]

pub mod nbd;

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `ferry` binary: `$FERRY_EXE`, else `ferry` next to this benchmark's own binary (same
/// cargo profile), else `target/release/ferry`; built with `cargo build --release -p ferry`
/// when none exists.
pub fn ferry_exe() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("FERRY_EXE") {
        return Ok(PathBuf::from(p));
    }
    let sibling = std::env::current_exe()?
        .parent()
        .map(|d| d.join("ferry"))
        .filter(|p| p.exists());
    if let Some(p) = sibling {
        return Ok(p);
    }
    let release = workspace_root().join("target/release/ferry");
    if !release.exists() {
        eprintln!("building the ferry binary (cargo build --release -p ferry) ...");
        let ok = Command::new("cargo")
            .args(["build", "--release", "-p", "ferry"])
            .current_dir(workspace_root())
            .status()
            .context("running cargo")?
            .success();
        if !ok {
            bail!("cargo build --release -p ferry failed");
        }
    }
    Ok(release)
}

/// A scratch directory for one benchmark run, under `$FERRY_BENCH_TMP` (default: the system
/// temporary directory); removed when dropped.
pub fn scratch(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let base = std::env::var_os("FERRY_BENCH_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base)?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&base)
        .with_context(|| format!("creating a scratch directory in {}", base.display()))
}

/// A number from the environment, or a default.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: a fast deterministic generator for offsets and filler bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Latency percentiles of a set of per-request timings.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn percentiles(samples: &[Duration]) -> Percentiles {
    if samples.is_empty() {
        return Percentiles::default();
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let at = |q: f64| v[(((v.len() as f64) * q).ceil() as usize).clamp(1, v.len()) - 1];
    Percentiles {
        count: v.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

/// Microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// MB/s (10^6 bytes per second).
pub fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// Start a replication lab (master target + process server as real processes on loopback,
/// plain-text NBD) with one disk `name` of `size` bytes; waits until the shipper is connected.
pub fn start_lab(
    dir: &Path,
    name: &str,
    size: u64,
    interval_ms: u64,
    journal_capacity: Option<u64>,
) -> anyhow::Result<ferry::lab::Lab> {
    let exe = ferry_exe()?;
    let mut lab = ferry::lab::Lab::new(&exe, dir, &[(name, size)])?;
    lab.nbd_tls = false;
    lab.interval_ms = interval_ms;
    lab.journal_capacity = journal_capacity;
    // How the journal writes to the cache (auto: the cache disk's hardware profile decides).
    let cache_io = std::env::var("FERRY_BENCH_CACHE_IO").unwrap_or_else(|_| "auto".into());
    lab.process_args = vec!["--cache-io".into(), cache_io];
    lab.start_master().context("starting the master target")?;
    lab.start_process().context("starting the process server")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if lab.status(name).map(|s| s.connected).unwrap_or(false) {
            let direct = lab
                .status(name)
                .map(|s| s.journal_direct_io)
                .unwrap_or(false);
            println!(
                "process server journal: {} (FERRY_BENCH_CACHE_IO=auto|direct|buffered)",
                if direct { "O_DIRECT" } else { "page cache" }
            );
            return Ok(lab);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the process server did not connect to the master target within 30 s (logs in {})",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Print `pass`/`MISS` for a figure against a target.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "MISS"
    }
}

/// Regular files under `dir` (sorted, symlinks not followed, at most 12 levels deep): the
/// "system files" part of the mixed images.
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() && depth < 12 {
            walk(&p, out, depth + 1);
        } else if md.is_file() && md.len() > 0 {
            out.push(p);
        }
    }
}
