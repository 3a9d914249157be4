//! Reduction pipeline throughput on ONE core (this program is single-threaded).
//!
//! Builds a mixed disk image in memory — 1/4 system binaries (ELF files of /usr/bin and
//! /usr/lib), 1/4 text (documentation, headers and sources under /usr, topped up with generated
//! words), 1/4 zeros, 1/4 random — interleaved in 1 MiB extents, cut into 64 KiB blocks, and
//! measures each stage of what the process server does per block, plus the whole pipeline
//! (`checkpoint::Builder::finish`: zero check -> keyed name -> zstd-if-smaller + AES-256-GCM),
//! and the same with the policy's other compressor, LZ4 (`"compression": "lz4"`). Peers: Debian's
//! `zstd -b1 -B64K` and `lz4 -b1 -B65536` on the same image (compression alone).
//!
//! Environment: FERRY_BENCH_IMAGE_MIB (default 256), FERRY_BENCH_MIN_SECS (per stage and round,
//! default 1), FERRY_BENCH_ROUNDS (default 5; each stage's figure is its median round),
//! FERRY_BENCH_GLIBC_DEFAULTS=1 (leave the allocator as glibc sets it, unlike the roles),
//! FERRY_BENCH_ONLY (comma-separated: run only the stages whose names contain one of these).
//! Run: `cargo run --release -p ferry-bench --bin pipeline`

use ferry_bench::{env_num, mbps, verdict, walk, Rng};
use ferry_chunk::{is_zero, Compression, TenantKey, DEFAULT_BLOCK_SIZE};
use ferry_journal::{OwnedOp, Record};
use ferry_process_server::checkpoint::Builder;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::collections::HashSet;
use std::hint::black_box;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

const BS: usize = DEFAULT_BLOCK_SIZE as usize;
const EXTENT: usize = 1 << 20;
/// The level `ferry_chunk` uses (its constant is private): zstd level 1.
const ZSTD_LEVEL: i32 = 1;
const KINDS: [&str; 4] = ["system", "text", "zero", "random"];

/// Concatenate files under `roots` accepted by `keep` (given their first bytes) up to `want`.
fn gather(roots: &[&str], want: usize, keep: impl Fn(&Path, &[u8]) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(want);
    for root in roots {
        let mut files = Vec::new();
        walk(Path::new(root), &mut files, 0);
        for f in files {
            if out.len() >= want {
                return out;
            }
            let Ok(mut fh) = std::fs::File::open(&f) else {
                continue;
            };
            let mut data = Vec::new();
            if fh.read_to_end(&mut data).is_err() || !keep(&f, &data) {
                continue;
            }
            let n = data.len().min(want - out.len());
            out.extend_from_slice(&data[..n]);
        }
    }
    out
}

fn is_text(p: &Path, d: &[u8]) -> bool {
    let compressed = matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("gz" | "xz" | "bz2" | "zst" | "png" | "jpg" | "svgz")
    );
    !compressed && !d.iter().take(8192).any(|&b| b == 0) && std::str::from_utf8(d).is_ok()
}

/// Top up text with generated words drawn from the text already gathered (or a fixed list).
fn words(seed_text: &[u8], out: &mut Vec<u8>, want: usize) {
    let mut vocab: Vec<&[u8]> = seed_text
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| (2..16).contains(&w.len()))
        .take(20_000)
        .collect();
    if vocab.len() < 100 {
        vocab = "the disk write journal block chunk recovery point site replication ferry data \
                 process server master target checkpoint compress encrypt network storage"
            .split(' ')
            .map(str::as_bytes)
            .collect();
    }
    let mut rng = Rng::new(42);
    while out.len() < want {
        out.extend_from_slice(vocab[rng.below(vocab.len() as u64) as usize]);
        out.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    out.truncate(want);
}

struct Image {
    data: Vec<u8>,
    /// kind (index into KINDS) of each 64 KiB block
    kinds: Vec<usize>,
    text_from_files: usize,
}

fn build_image(size: usize) -> Image {
    let q = size / 4;
    let system = gather(&["/usr/bin", "/usr/lib"], q, |_, d| {
        d.starts_with(b"\x7fELF")
    });
    let mut text = gather(
        &[
            "/usr/share/doc",
            "/usr/include",
            "/usr/share/perl",
            "/usr/lib/python3",
        ],
        q,
        is_text,
    );
    let text_from_files = text.len();
    let seed = text.clone();
    words(&seed, &mut text, q);
    let mut system = system;
    if system.len() < q {
        eprintln!(
            "note: only {} MiB of ELF files found; repeating them",
            system.len() >> 20
        );
        let base = if system.is_empty() {
            vec![0x90u8; 4096]
        } else {
            system.clone()
        };
        while system.len() < q {
            system.extend_from_slice(&base[..base.len().min(q - system.len())]);
        }
    }
    let mut random = vec![0u8; q];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .expect("system random source");
    let zeros = vec![0u8; q];
    let parts = [&system[..], &text[..], &zeros[..], &random[..]];
    let mut data = Vec::with_capacity(4 * q);
    let mut kinds = Vec::with_capacity(4 * q / BS);
    for off in (0..q).step_by(EXTENT) {
        for (k, p) in parts.iter().enumerate() {
            let e = &p[off..(off + EXTENT).min(q)];
            data.extend_from_slice(e);
            kinds.resize(kinds.len() + e.len().div_ceil(BS), k);
        }
    }
    Image {
        data,
        kinds,
        text_from_files,
    }
}

/// This thread's CPU time: a per-core figure is bytes per second of CPU, so a busy machine
/// (another process sharing the core) does not lower it the way wall-clock time would.
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Run `pass` (which returns the bytes it processed) until at least `min` of this thread's CPU
/// time has been spent; MB per CPU second.
fn measure(min: Duration, mut pass: impl FnMut() -> u64) -> f64 {
    let start = thread_cpu();
    let mut bytes = 0;
    loop {
        bytes += pass();
        let spent = thread_cpu() - start;
        if spent >= min {
            return mbps(bytes, spent);
        }
    }
}

fn main() -> anyhow::Result<()> {
    // As the roles do (`ferry process-server` and `master-target`): without it the checkpoint
    // rows measure the kernel faulting freed heap back in (FERRY_BENCH_GLIBC_DEFAULTS=1 shows it).
    if std::env::var("FERRY_BENCH_GLIBC_DEFAULTS").as_deref() != Ok("1") {
        ferry_process_server::memory::keep_freed_memory();
    }
    let size = (env_num("FERRY_BENCH_IMAGE_MIB", 256) as usize).max(4) << 20;
    let min = Duration::from_secs_f64(env_num("FERRY_BENCH_MIN_SECS", 1) as f64);
    let t = Instant::now();
    let img = build_image(size);
    println!(
        "pipeline: mixed image of {} MiB built in {:.1} s ({} MiB of text from files, rest generated words), {} blocks of {} KiB, one core",
        img.data.len() >> 20,
        t.elapsed().as_secs_f64(),
        img.text_from_files >> 20,
        img.kinds.len(),
        BS >> 10
    );
    let blocks: Vec<&[u8]> = img.data.chunks(BS).collect();
    let total = img.data.len() as u64;
    let key = TenantKey::from_secret(&[0x5a; 32]);

    // Reduction figures (one pass of the real pipeline, no timing).
    let mut stored = [0u64; 4];
    let mut stored_lz4 = [0u64; 4];
    let mut plain = [0u64; 4];
    let mut unique = HashSet::new();
    let (mut nonzero, mut stored_unique) = (0u64, 0u64);
    for (b, &k) in blocks.iter().zip(&img.kinds) {
        if is_zero(b) {
            continue;
        }
        nonzero += 1;
        let id = key.chunk_id(b);
        let blob = key.seal_chunk(&id, b);
        plain[k] += b.len() as u64;
        stored[k] += blob.len() as u64;
        stored_lz4[k] += key.seal_chunk_as(&id, b, Compression::Lz4).len() as u64;
        if unique.insert(id) {
            stored_unique += blob.len() as u64;
        }
    }

    let zero_blocks: Vec<&[u8]> = blocks
        .iter()
        .zip(&img.kinds)
        .filter(|(_, &k)| k == 2)
        .map(|(b, _)| *b)
        .collect();
    let random: Vec<&[u8]> = blocks
        .iter()
        .zip(&img.kinds)
        .filter(|(_, &k)| k == 3)
        .map(|(b, _)| *b)
        .collect();
    let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7; 32]).expect("key"));
    let mut buf = vec![0u8; BS];
    let mut n = 0u64;
    // The whole pipeline over one kind of content at a time (rows named "by content: KIND").
    let sels: Vec<Vec<&[u8]>> = (0..KINDS.len())
        .map(|k| {
            blocks
                .iter()
                .zip(&img.kinds)
                .filter(|(_, &x)| x == k)
                .map(|(b, _)| *b)
                .collect()
        })
        .collect();
    // The real code path: journal records of 1 MiB writes through checkpoint::Builder
    // (coalescing copy + finish), in checkpoints of 64 MiB like the shipper cuts them.
    let records: Vec<Record> = img
        .data
        .chunks(EXTENT)
        .enumerate()
        .map(|(i, d)| Record {
            seq: i as u64 + 1,
            op: OwnedOp::Write {
                offset: (i * EXTENT) as u64,
                data: d.to_vec(),
            },
        })
        .collect();
    let known = HashSet::new();
    type Pass<'a> = Box<dyn FnMut() -> u64 + 'a>;
    let mut stages: Vec<(String, Pass, Option<f64>)> = Vec::new();
    stages.push((
        "zero check (mixed image)".to_string(),
        Box::new(|| {
            blocks.iter().filter(|b| is_zero(black_box(b))).count();
            total
        }),
        None,
    ));
    stages.push((
        "zero check (zero blocks only)".to_string(),
        Box::new(|| {
            black_box(zero_blocks.iter().filter(|b| is_zero(black_box(b))).count());
            (zero_blocks.len() * BS) as u64
        }),
        None,
    ));
    stages.push((
        "keyed BLAKE3 chunk_id".to_string(),
        Box::new(|| {
            for b in &blocks {
                black_box(key.chunk_id(b));
            }
            total
        }),
        None,
    ));
    stages.push((
        "zstd level 1 compress".to_string(),
        Box::new(|| {
            for b in &blocks {
                black_box(zstd::bulk::compress(b, ZSTD_LEVEL).expect("zstd").len());
            }
            total
        }),
        None,
    ));
    stages.push((
        "lz4 compress".to_string(),
        Box::new(|| {
            for b in &blocks {
                black_box(lz4::block::compress(b, None, false).expect("lz4").len());
            }
            total
        }),
        None,
    ));
    stages.push((
        "AES-256-GCM (ring, random data)".to_string(),
        Box::new(|| {
            for b in &random {
                buf[..b.len()].copy_from_slice(b);
                n += 1;
                let mut nonce = [0u8; 12];
                nonce[..8].copy_from_slice(&n.to_le_bytes());
                let tag = aead
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from(&[0u8; 32]),
                        &mut buf[..b.len()],
                    )
                    .expect("seal");
                let _ = black_box(tag);
            }
            (random.len() * BS) as u64
        }),
        Some(2000.0),
    ));
    stages.push((
        "seal_chunk (zstd-if-smaller + AES)".to_string(),
        Box::new(|| {
            for b in blocks.iter().filter(|b| !is_zero(b)) {
                black_box(key.seal_chunk(&ferry_chunk::ChunkId::ZERO, b).len());
            }
            total - zero_blocks.len() as u64 * BS as u64
        }),
        None,
    ));
    for (codec, label) in [
        (Compression::Zstd, "zstd (default)"),
        (Compression::Lz4, "lz4 policy"),
    ] {
        let (key, blocks) = (&key, &blocks);
        stages.push((
            format!("whole pipeline, {label}"),
            Box::new(move || {
                for b in blocks {
                    if !is_zero(b) {
                        let id = key.chunk_id(b);
                        black_box(key.seal_chunk_as(&id, b, codec).len());
                    }
                }
                total
            }),
            Some(500.0),
        ));
        for (sel, kind) in sels.iter().zip(KINDS) {
            stages.push((
                format!("by content {codec}: {kind}"),
                Box::new(move || {
                    for b in sel {
                        if !is_zero(b) {
                            let id = key.chunk_id(b);
                            black_box(key.seal_chunk_as(&id, b, codec).len());
                        }
                    }
                    (sel.len() * BS) as u64
                }),
                None,
            ));
        }
    }
    stages.push((
        "checkpoint::Builder apply+finish".to_string(),
        Box::new(|| {
            for cp in records.chunks(64) {
                let mut b = Builder::new(total, DEFAULT_BLOCK_SIZE);
                cp.iter().for_each(|r| b.apply(r));
                black_box(b.finish(&key, "bench", 1, &known, Compression::Zstd).len());
            }
            total
        }),
        None,
    ));

    // Rounds interleave the stages, and each stage's figure is its median round: this host's
    // speed drifts by tens of percent from minute to minute (other tenants of the machine), and
    // a stage measured in one stretch would carry whatever the host did during that stretch.
    let rounds = env_num("FERRY_BENCH_ROUNDS", 5).max(1) as usize;
    if let Ok(only) = std::env::var("FERRY_BENCH_ONLY") {
        stages.retain(|(name, _, _)| only.split(',').any(|o| name.contains(o)));
    }
    let mut figures = vec![Vec::with_capacity(rounds); stages.len()];
    for _ in 0..rounds {
        for (i, (_, pass, _)) in stages.iter_mut().enumerate() {
            figures[i].push(measure(min, pass));
        }
    }
    let mut rows = Vec::new();
    let mut by_kind: Vec<(String, String, f64)> = Vec::new();
    for ((name, _, target), mut f) in stages.into_iter().zip(figures) {
        f.sort_by(f64::total_cmp);
        let (lo, median, hi) = (f[0], f[f.len() / 2], f[f.len() - 1]);
        match name
            .strip_prefix("by content ")
            .and_then(|r| r.split_once(": "))
        {
            Some((codec, kind)) => by_kind.push((codec.to_string(), kind.to_string(), median)),
            None => rows.push((name, median, lo, hi, target)),
        }
    }

    println!();
    println!(
        "median of {rounds} interleaved rounds of {:.1} CPU s per stage (lowest..highest round):",
        min.as_secs_f64()
    );
    println!(
        "| {:<36} | {:>10} | {:>13} | {:>10} | {:>6} |",
        "stage (64 KiB blocks)", "MB/s", "range", "target", "result"
    );
    println!(
        "|{:-<38}|{:->12}|{:->15}|{:->12}|{:->8}|",
        "", "", "", "", ""
    );
    for (name, v, lo, hi, target) in &rows {
        let (t, r) = match target {
            Some(t) => (format!(">= {t:.0}"), verdict(v >= t)),
            None => (String::new(), ""),
        };
        let range = format!("{lo:.0}..{hi:.0}");
        println!("| {name:<36} | {v:>10.0} | {range:>13} | {t:>10} | {r:>6} |");
    }
    // The reference: Debian's zstd program compressing the same image in the same blocks at
    // the same level on this machine (its own benchmark mode, one core), so a slow zstd row
    // can be told apart from a slow CPU.
    // Likewise LZ4's own program, for the lz4 rows.
    for (tool, args) in [
        ("zstd", &["-b1", "-e1", "-B64K"][..]),
        ("lz4", &["-b1", "-e1", "-B65536"][..]),
    ] {
        match cli_mbps(tool, args, &img.data, min) {
            Some((version, v)) => println!(
                "| {:<36} | {v:>10.0} | {:>13} | {:>10} | {:>6} |",
                format!(
                    "peer: {tool} {version} {} (wall)",
                    args.join(" ").replace(" -e1", "")
                ),
                "",
                "",
                ""
            ),
            None => println!("(peer row skipped: the {tool} program is not installed)"),
        }
    }
    for codec in [Compression::Zstd, Compression::Lz4] {
        let per: Vec<String> = by_kind
            .iter()
            .filter(|(c, _, _)| *c == codec.as_str())
            .map(|(_, k, v)| format!("{k} {v:.0}"))
            .collect();
        println!(
            "whole pipeline, {codec}, by content (MB/s): {}",
            per.join(", ")
        );
    }
    println!();
    println!(
        "| {:<8} | {:>10} | {:>15} | {:>10} | {:>15} | {:>10} |",
        "content", "plain MiB", "zstd sealed MiB", "zstd ratio", "lz4 sealed MiB", "lz4 ratio"
    );
    println!(
        "|{:-<10}|{:->12}|{:->17}|{:->12}|{:->17}|{:->12}|",
        "", "", "", "", "", ""
    );
    let row = |name: &str, p: u64, z: u64, l: u64| {
        println!(
            "| {:<8} | {:>10.1} | {:>15.1} | {:>9.2}x | {:>15.1} | {:>9.2}x |",
            name,
            p as f64 / 1048576.0,
            z as f64 / 1048576.0,
            p as f64 / z.max(1) as f64,
            l as f64 / 1048576.0,
            p as f64 / l.max(1) as f64
        );
    };
    for k in [0, 1, 3] {
        row(KINDS[k], plain[k], stored[k], stored_lz4[k]);
    }
    row(
        "non-zero",
        plain.iter().sum(),
        stored.iter().sum(),
        stored_lz4.iter().sum(),
    );
    println!();
    println!(
        "zero blocks: {} of {} ({:.1}%) become holes",
        blocks.len() as u64 - nonzero,
        blocks.len(),
        100.0 * (blocks.len() as u64 - nonzero) as f64 / blocks.len() as f64
    );
    println!(
        "dedup ratio: {} non-zero blocks / {} unique chunks = {:.3}x",
        nonzero,
        unique.len(),
        nonzero as f64 / unique.len().max(1) as f64
    );
    println!(
        "total reduction: {:.1} MiB image -> {:.1} MiB stored (holes + dedup + zstd + 40 B/blob) = {:.2}x",
        total as f64 / 1048576.0,
        stored_unique as f64 / 1048576.0,
        total as f64 / stored_unique.max(1) as f64
    );
    Ok(())
}

/// Compression MB/s of `zstd -b1 -B64K` or `lz4 -b1 -B65536` (their benchmark modes: level 1,
/// 64 KiB blocks, one thread) on `data`, and the program's version; None when the program is
/// missing or says nothing readable. The figure is the best of its iterations, as it reports it.
fn cli_mbps(tool: &str, args: &[&str], data: &[u8], min: Duration) -> Option<(String, f64)> {
    let dir = tempfile::tempdir().ok()?;
    let file = dir.path().join("mixed.img");
    std::fs::write(&file, data).ok()?;
    let secs = min.as_secs().max(1) * 3;
    let out = std::process::Command::new(tool)
        .args(args)
        .arg(format!("-i{secs}"))
        .arg(&file)
        .output()
        .ok()?;
    // Progress lines are separated by carriage returns; the last one holds the result:
    // zstd " 1#mixed.img : 268435456 -> 112... (x2.39), 431.2 MB/s, 1234.5 MB/s",
    // lz4 " 1#mixed.img : 268435456 -> 112... (2.299), 486.0 MB/s ,2144.2 MB/s".
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let last = text
        .split(['\r', '\n'])
        .rfind(|l| l.contains("MB/s"))?
        .to_string();
    let after = last.split("),").nth(1)?;
    let mbps: f64 = after.split_whitespace().next()?.parse().ok()?;
    let version = std::process::Command::new(tool)
        .arg("-V")
        .output()
        .ok()
        .and_then(|o| {
            (String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr))
                .split_whitespace()
                .find(|w| w.starts_with('v'))
                .map(|w| w.trim_end_matches(',').to_string())
        })
        .unwrap_or_default();
    Some((version, mbps))
}
