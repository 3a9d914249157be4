//! Journal micro-benchmark (no criterion): `cargo bench -p ferry-journal`.
//! Set FERRY_BENCH_DIR to benchmark on a specific file system (default: the temp dir).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_journal::{Journal, JournalConfig, Op};

const DISK: u64 = 64 << 30;

fn open(dir: &std::path::Path) -> Journal {
    let mut c = JournalConfig::new(dir.to_path_buf(), DISK);
    c.capacity_bytes = 4 << 30;
    Journal::open(c).unwrap()
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("FERRY_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    let data = vec![0xA5u8; 4096];

    // 0. Burst: CPU cost of an append (stays below the writer backpressure limit).
    let dir = tempdir();
    let j = open(dir.path());
    let mut best = f64::MAX;
    for round in 0..5u64 {
        let t = Instant::now();
        for i in 0..2048u64 {
            j.append(Op::Write {
                offset: (round * 2048 + i) * 4096,
                data: &data,
            })
            .unwrap();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / 2048.0);
        j.sync().unwrap();
    }
    println!("burst of 2048 x 4 KiB appends: {best:.0} ns/append (best of 5)");
    drop(j);

    // 1. Streaming 4 KiB appends, one sync at the end (bounded by the device).
    let dir = tempdir();
    let j = open(dir.path());
    let n = 65_536u64; // 256 MiB
    let t = Instant::now();
    for i in 0..n {
        j.append(Op::Write {
            offset: (i * 4096) % DISK,
            data: &data,
        })
        .unwrap();
    }
    let appended = t.elapsed();
    j.sync().unwrap();
    let total = t.elapsed();
    let mb = (n * 4096) as f64 / 1e6;
    println!(
        "append 4 KiB x {n}: {:.0} ns/append, {:.0} MB/s appending, {:.0} MB/s including final sync ({:.1} ms)",
        appended.as_nanos() as f64 / n as f64,
        mb / appended.as_secs_f64(),
        mb / total.as_secs_f64(),
        (total - appended).as_secs_f64() * 1e3
    );

    // 2. Read back (drainer path).
    let t = Instant::now();
    let (mut pos, mut bytes) = (0u64, 0usize);
    loop {
        let b = j.read_durable(pos, 8 << 20).unwrap();
        let Some(last) = b.last() else { break };
        pos = last.seq;
        bytes += b.len() * 4096;
    }
    println!(
        "read_durable: {:.0} MB/s",
        bytes as f64 / 1e6 / t.elapsed().as_secs_f64()
    );
    drop(j);

    // 3. Sync latency: one 4 KiB append + sync, single thread.
    let dir = tempdir();
    let j = open(dir.path());
    let mut lat = Vec::new();
    for i in 0..2000u64 {
        j.append(Op::Write {
            offset: i * 4096,
            data: &data,
        })
        .unwrap();
        let t = Instant::now();
        j.sync().unwrap();
        lat.push(t.elapsed());
    }
    let t = Instant::now();
    for _ in 0..100_000 {
        j.sync().unwrap();
    }
    let idle = t.elapsed() / 100_000;
    println!(
        "sync after one 4 KiB append: p50 {:?}, p99 {:?}; sync with nothing new: {:?}",
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99),
        idle
    );
    drop(j);

    // 4. Group commit: 8 threads doing append + sync (like FUA writes).
    let dir = tempdir();
    let j = Arc::new(open(dir.path()));
    let t = Instant::now();
    let hs: Vec<_> = (0..8u64)
        .map(|th| {
            let j = j.clone();
            std::thread::spawn(move || {
                let data = vec![th as u8; 4096];
                let mut lat = Vec::new();
                for i in 0..500u64 {
                    let s = Instant::now();
                    j.append(Op::Write {
                        offset: (th * 500 + i) * 4096,
                        data: &data,
                    })
                    .unwrap();
                    j.sync().unwrap();
                    lat.push(s.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut lat: Vec<Duration> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let el = t.elapsed();
    let st = j.stats();
    println!(
        "8 threads append+sync: {:.0} writes/s, {} syncs -> {} fdatasyncs, latency p50 {:?} p99 {:?}",
        4000.0 / el.as_secs_f64(),
        st.sync_calls,
        st.fdatasyncs,
        pct(&mut lat, 0.5),
        pct(&mut lat, 0.99)
    );
}
