//! NBD ingest: the process server's NBD export versus a plain `qemu-nbd` export of a raw file.
//!
//! Both sides are real processes on 127.0.0.1. The process server runs with its master target
//! (`ferry::lab::Lab`, plain-text NBD), so the journal and shipping are live during ingest;
//! between runs the benchmark waits until shipping has caught up and reports how long that took.
//! Workloads: sequential 1 MiB writes and random 4 KiB writes (no FUA), at queue depth 1
//! (latency: per-request timings) and 16 (throughput). Writes carry fresh pseudo-random data.
//!
//! Environment: FERRY_BENCH_SECS (time bound per run, default 6), FERRY_BENCH_SEQ_MIB (byte bound
//! of a sequential run, default 512), FERRY_BENCH_TMP (scratch directory parent).
//! Run: `cargo run --release -p ferry-bench --bin ingest`

use anyhow::{bail, Context};
use ferry_bench::nbd::Client;
use ferry_bench::{env_num, mbps, percentiles, scratch, start_lab, us, verdict, Percentiles, Rng};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISK: u64 = 1 << 30;
const POOL: usize = 64 << 20;

struct Workload {
    name: &'static str,
    len: usize,
    sequential: bool,
    depth: usize,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "seq 1 MiB",
        len: 1 << 20,
        sequential: true,
        depth: 1,
    },
    Workload {
        name: "seq 1 MiB",
        len: 1 << 20,
        sequential: true,
        depth: 16,
    },
    Workload {
        name: "rand 4 KiB",
        len: 4096,
        sequential: false,
        depth: 1,
    },
    Workload {
        name: "rand 4 KiB",
        len: 4096,
        sequential: false,
        depth: 16,
    },
];

struct Outcome {
    bytes: u64,
    ops: u64,
    elapsed: Duration,
    lat: Percentiles,
    flush: Duration,
}

/// Kills (SIGKILL) and reaps a child process when dropped.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qemu_nbd(dir: &Path) -> anyhow::Result<(Reaped, u16)> {
    let file = dir.join("plain.raw");
    // Preallocated, so the peer pays no block allocation during the runs (the journal does).
    let f = std::fs::File::create(&file)?;
    drop(f);
    let ok = Command::new("fallocate")
        .arg("-l")
        .arg(DISK.to_string())
        .arg(&file)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)?
            .set_len(DISK)?;
    }
    let port = ferry::lab::free_port()?;
    let log = std::fs::File::create(dir.join("qemu-nbd.log"))?;
    let child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "-x",
            "bench",
            "-b",
            "127.0.0.1",
            "--cache=writeback",
            "--persistent",
        ])
        .arg("-p")
        .arg(port.to_string())
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting qemu-nbd (Debian package qemu-utils)")?;
    let guard = Reaped(child);
    ferry::lab::wait_port(port, Duration::from_secs(10))?;
    Ok((guard, port))
}

fn run(addr: &str, w: &Workload, pool: &[u8], seed: u64) -> anyhow::Result<Outcome> {
    let secs = Duration::from_secs(env_num("FERRY_BENCH_SECS", 6));
    let max_bytes = if w.sequential {
        env_num("FERRY_BENCH_SEQ_MIB", 512) << 20
    } else {
        u64::MAX
    };
    let mut c = Client::connect(addr, "bench")?;
    let size = c.size().min(DISK);
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; w.len];
    let mut lat = Vec::with_capacity(1 << 20);
    let (mut bytes, mut ops) = (0u64, 0u64);
    let start = Instant::now();
    while bytes < max_bytes && start.elapsed() < secs {
        let offset = if w.sequential {
            (ops * w.len as u64) % (size - size % w.len as u64)
        } else {
            rng.below(size / 4096) * 4096
        };
        // fresh content: a pool slice stamped with the op number every 4 KiB
        let at = rng.below((POOL - w.len) as u64) as usize;
        buf.copy_from_slice(&pool[at..at + w.len]);
        for s in buf.chunks_mut(4096) {
            s[..8].copy_from_slice(&(ops ^ seed).to_le_bytes());
        }
        c.write(offset, &buf, w.depth, &mut lat)?;
        bytes += w.len as u64;
        ops += 1;
    }
    c.drain(&mut lat)?;
    let elapsed = start.elapsed();
    let flush = c.flush()?;
    c.disconnect()?;
    Ok(Outcome {
        bytes,
        ops,
        elapsed,
        lat: percentiles(&lat),
        flush,
    })
}

fn main() -> anyhow::Result<()> {
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        bail!("qemu-nbd not found: apt-get install qemu-utils (bench/run.sh does it)");
    }
    let tmp = scratch("ferry-bench-ingest-")?;
    let labdir = tmp.path().join("lab");
    std::fs::create_dir_all(&labdir)?;
    let lab = start_lab(&labdir, "bench", DISK, 1000, Some(4 << 30))?;
    let ferry_addr = format!("127.0.0.1:{}", lab.nbd_port);
    let (_qemu, qport) = start_qemu_nbd(tmp.path())?;
    let qemu_addr = format!("127.0.0.1:{qport}");
    let mut pool = vec![0u8; POOL];
    Rng::new(7).fill(&mut pool);
    println!(
        "ingest: 1 GiB export, no FUA, {} s or {} MiB per run; process server = ferry process-server + master-target (journal and shipping live, checkpoint 1000 ms); peer = qemu-nbd --cache=writeback on a preallocated raw file; scratch {}",
        env_num("FERRY_BENCH_SECS", 6),
        env_num("FERRY_BENCH_SEQ_MIB", 512),
        tmp.path().display()
    );
    println!();
    println!(
        "| {:<10} | {:>2} | {:<14} | {:>8} | {:>8} | {:>9} | {:>9} | {:>9} | {:>8} | {:>10} |",
        "workload",
        "qd",
        "server",
        "MB/s",
        "IOPS",
        "p50 us",
        "p99 us",
        "max us",
        "flush ms",
        "catch-up s"
    );
    println!(
        "|{:-<12}|{:->4}|{:-<16}|{:->10}|{:->10}|{:->11}|{:->11}|{:->11}|{:->10}|{:->12}|",
        "", "", "", "", "", "", "", "", "", ""
    );
    let mut results = Vec::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let mut pair = Vec::new();
        for (server, addr) in [("qemu-nbd", &qemu_addr), ("ferry process", &ferry_addr)] {
            let o = run(addr, w, &pool, 1000 + i as u64)
                .with_context(|| format!("{} qd {} against {server}", w.name, w.depth))?;
            let mut catch = String::from("-");
            if server.starts_with("ferry") {
                let t = Instant::now();
                match lab.wait_caught_up("bench", Duration::from_secs(120)) {
                    Ok(s) => {
                        catch = format!("{:.1}", t.elapsed().as_secs_f64());
                        if s.state != ferry_process_server::State::Replicating {
                            catch.push_str(&format!(" ({:?})", s.state));
                        }
                    }
                    Err(e) => catch = format!("not in 120 s: {e}"),
                }
            }
            println!(
                "| {:<10} | {:>2} | {:<14} | {:>8.1} | {:>8.0} | {:>9} | {:>9} | {:>9} | {:>8.1} | {:>10} |",
                w.name,
                w.depth,
                server,
                mbps(o.bytes, o.elapsed),
                o.ops as f64 / o.elapsed.as_secs_f64(),
                us(o.lat.p50),
                us(o.lat.p99),
                us(o.lat.max),
                o.flush.as_secs_f64() * 1e3,
                catch
            );
            pair.push(o);
        }
        results.push((w, pair));
    }
    println!();
    println!(
        "targets: ferry throughput >= 80% of qemu-nbd; added p99 latency <= 1 ms for 4 KiB (qd 1)"
    );
    for (w, p) in &results {
        let (q, f) = (&p[0], &p[1]);
        let ratio = mbps(f.bytes, f.elapsed) / mbps(q.bytes, q.elapsed).max(1e-9);
        let mut line = format!(
            "  {} qd {:>2}: throughput ferry/qemu-nbd = {:.0}% [{}]",
            w.name,
            w.depth,
            ratio * 100.0,
            verdict(ratio >= 0.8)
        );
        let added = f.lat.p99.as_secs_f64() - q.lat.p99.as_secs_f64();
        line.push_str(&format!("; p99 added latency = {:+.3} ms", added * 1e3));
        if w.len == 4096 && w.depth == 1 {
            line.push_str(&format!(" [{}]", verdict(added <= 1e-3)));
        }
        println!("{line}");
    }
    let st = lab.status("bench")?;
    println!(
        "ferry after the runs: state {:?}, {} checkpoints sent, {:.1} MB shipped, reconnects {}",
        st.state,
        st.checkpoints_sent,
        st.bytes_sent as f64 / 1e6,
        st.reconnects
    );
    drop(lab);
    Ok(())
}
