//! RPO under load: recovery point lag while writes flow at a steady, paced rate through the
//! process server's NBD export (real `ferry process-server` + `ferry master-target` on loopback).
//!
//! Every 100 ms the benchmark reads `<cache>/<disk>/status.json` and computes two lags:
//! - exact: the age of the oldest acknowledged write that no acknowledged recovery point covers
//!   yet (0 when every acknowledged write is covered) — what a disaster at that instant would
//!   lose. Writes are matched to journal records by count: one writer, one record per write, so
//!   write n is journal record base+n, and `acked_journal_seq` says how many are covered.
//! - proxy: now - max(acked_point_created_unix_ns, start of the writes).
//!
//! Environment: FERRY_BENCH_RPO_SECS (default 30), FERRY_BENCH_RPO_MBPS (default 50),
//! FERRY_BENCH_INTERVAL_MS (checkpoint interval, default 1000), FERRY_BENCH_TMP.
//! Run: `cargo run --release -p ferry-bench --bin rpo`

use ferry_bench::nbd::Client;
use ferry_bench::{env_num, mbps, ms, percentiles, scratch, start_lab, verdict, Rng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const DISK: u64 = 1 << 30;
const WRITE: usize = 256 << 10;
const POOL: usize = 64 << 20;

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Paced sequential writes at `rate` bytes/s until `stop`; pushes each write's ack time (unix ns).
fn writer(
    addr: String,
    rate: f64,
    until: Instant,
    acks: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(u64, Duration, Vec<Duration>)> {
    let mut c = Client::connect(&addr, "bench")?;
    let mut pool = vec![0u8; POOL];
    let mut rng = Rng::new(99);
    rng.fill(&mut pool);
    let mut buf = vec![0u8; WRITE];
    let period = Duration::from_secs_f64(WRITE as f64 / rate);
    let start = Instant::now();
    let mut n = 0u64;
    let mut lat = Vec::new();
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        let due = start + period * n as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let at = rng.below((POOL - WRITE) as u64) as usize;
        buf.copy_from_slice(&pool[at..at + WRITE]);
        for s in buf.chunks_mut(4096) {
            s[..8].copy_from_slice(&n.to_le_bytes());
        }
        let off = (n * WRITE as u64) % DISK;
        c.write(off, &buf, 1, &mut lat)?;
        c.drain(&mut lat)?;
        acks.lock().expect("acks").push(unix_ns());
        n += 1;
    }
    let elapsed = start.elapsed();
    c.disconnect()?;
    Ok((n * WRITE as u64, elapsed, lat))
}

fn main() -> anyhow::Result<()> {
    let secs = env_num("FERRY_BENCH_RPO_SECS", 30);
    let rate = env_num("FERRY_BENCH_RPO_MBPS", 50) as f64 * 1e6;
    let interval = env_num("FERRY_BENCH_INTERVAL_MS", 1000);
    let tmp = scratch("ferry-bench-rpo-")?;
    let lab = start_lab(tmp.path(), "bench", DISK, interval, None)?;
    let base = lab.status("bench")?.journal_last_seq;
    println!(
        "rpo: {} MB/s paced sequential {} KiB writes for {} s through the process server's NBD export, checkpoint interval {} ms, sampling status.json every 100 ms",
        rate / 1e6,
        WRITE >> 10,
        secs,
        interval
    );
    let acks = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let until = Instant::now() + Duration::from_secs(secs);
    let start_ns = unix_ns();
    let w = {
        let (addr, acks, stop) = (
            format!("127.0.0.1:{}", lab.nbd_port),
            acks.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || writer(addr, rate, until, acks, stop))
    };
    let (mut exact, mut proxy) = (Vec::new(), Vec::new());
    let mut tick = Instant::now();
    while Instant::now() < until && !w.is_finished() {
        tick += Duration::from_millis(100);
        if let Some(d) = tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let Ok(s) = lab.status("bench") else { continue };
        let now = unix_ns();
        let covered = s.acked_journal_seq.saturating_sub(base) as usize;
        let first_uncovered = acks.lock().expect("acks").get(covered).copied();
        exact.push(Duration::from_nanos(
            first_uncovered.map_or(0, |t| now.saturating_sub(t)),
        ));
        let since = s.acked_point_created_unix_ns.max(start_ns);
        proxy.push(Duration::from_nanos(now.saturating_sub(since)));
    }
    stop.store(true, Ordering::Relaxed);
    let (bytes, elapsed, lat) = w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let t = Instant::now();
    let caught = lab.wait_caught_up("bench", Duration::from_secs(60));
    let drain = t.elapsed();
    let writes = acks.lock().expect("acks").len() as u64;
    let st = lab.status("bench")?;

    let e = percentiles(&exact);
    let p = percentiles(&proxy);
    println!(
        "written: {:.0} MB in {:.1} s = {:.1} MB/s ({} writes); {} samples",
        bytes as f64 / 1e6,
        elapsed.as_secs_f64(),
        mbps(bytes, elapsed),
        writes,
        e.count
    );
    let l = percentiles(&lat);
    println!(
        "write latency (qd 1, {} KiB): p50 {} ms, p99 {} ms, max {} ms",
        WRITE >> 10,
        ms(l.p50),
        ms(l.p99),
        ms(l.max)
    );
    println!();
    println!(
        "| {:<58} | {:>8} | {:>8} | {:>8} | {:>9} | {:>6} |",
        "RPO lag (checkpoint interval ms)", "p50 ms", "p99 ms", "max ms", "target", "result"
    );
    println!(
        "|{:-<60}|{:->10}|{:->10}|{:->10}|{:->11}|{:->8}|",
        "", "", "", "", "", ""
    );
    for (name, v) in [
        ("exact: age of oldest uncovered acknowledged write", e),
        ("proxy: now - newest acked point's creation time", p),
    ] {
        println!(
            "| {:<58} | {:>8} | {:>8} | {:>8} | {:>9} | {:>6} |",
            format!("{name} ({interval})"),
            ms(v.p50),
            ms(v.p99),
            ms(v.max),
            "p99<=2000",
            verdict(v.p99 <= Duration::from_secs(2))
        );
    }
    println!();
    match caught {
        Ok(_) => println!(
            "after the writes stopped, shipping caught up in {:.2} s",
            drain.as_secs_f64()
        ),
        Err(e) => {
            println!("after the writes stopped, shipping did NOT catch up within 60 s: {e:#}")
        }
    }
    let covered = st.acked_journal_seq.saturating_sub(base);
    println!(
        "check: {} journal records acknowledged by the master target for {} writes{}; state {:?}, {} checkpoints, {:.0} MB shipped, {} reconnects",
        covered,
        writes,
        if covered == writes { "" } else { " (MISMATCH: the exact lag is unreliable)" },
        st.state,
        st.checkpoints_sent,
        st.bytes_sent as f64 / 1e6,
        st.reconnects
    );
    drop(lab);
    Ok(())
}
