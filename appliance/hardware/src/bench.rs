//! `ferry bench`: what this box can do, measured with the code the process server runs.
//!
//! - keyed hashing: `TenantKey::chunk_id` (keyed BLAKE3) over non-zero blocks;
//! - compression: zstd level 1 (the level `ferry_chunk` uses) over the same blocks;
//! - encryption: AES-256-GCM (ring, the AEAD `ferry_chunk` uses) over random blocks;
//! - the whole per-block pipeline (zero check, name, `seal_chunk`: zstd-if-smaller + AES-GCM),
//!   on one core and on every core at once, with the stored/written ratio it achieved;
//! - the same with LZ4, the compressor a policy may choose instead (`"compression": "lz4"`), so
//!   `ferry plan --compression lz4` can size for it;
//! - the cache directory: sequential 1 MiB write bandwidth including the final fdatasync, and the
//!   latency of 4 KiB write + fdatasync (what a journal group commit costs);
//! - with a peer (`--peer`, a `ferry bench --serve` there): the WAN link's RTT, upstream TCP
//!   throughput and bandwidth-delay product ([`crate::wan`]).
//!
//! The test data mixes, like a typical VM disk, 1/4 zero blocks, 1/4 random (incompressible)
//! and 1/2 text-like blocks (compressible about 3:1). Real churn differs: `ferry plan
//! --reduction` overrides the ratio.

use ferry_chunk::{is_zero, Compression, TenantKey, DEFAULT_BLOCK_SIZE};
use serde::{Deserialize, Serialize};
use std::hint::black_box;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BS: usize = DEFAULT_BLOCK_SIZE as usize;

#[derive(Debug, Clone)]
pub struct Options {
    /// Where the cache write test writes its scratch file (the cache directory).
    pub dir: PathBuf,
    /// Time per CPU stage.
    pub stage: Duration,
    /// Bytes for the sequential cache write test.
    pub cache_bytes: u64,
    /// Most 4 KiB write + fdatasync rounds (also bounded by `stage`).
    pub fsync_rounds: u32,
    /// Size of the in-memory test data.
    pub data_bytes: usize,
    /// A `ferry bench --serve` responder to measure the WAN link to (HOST:PORT).
    pub peer: Option<String>,
    pub wan: crate::wan::ClientOptions,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            dir: PathBuf::from("/var/cache/ferry"),
            stage: Duration::from_secs(1),
            cache_bytes: 256 << 20,
            fsync_rounds: 1000,
            data_bytes: 32 << 20,
            peer: None,
            wan: Default::default(),
        }
    }
}

/// The figures `ferry plan` sizes from (MB = 10^6 bytes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Figures {
    pub cpus: u32,
    pub block_size: u32,
    pub hash_mbps: f64,
    pub zstd_mbps: f64,
    pub aes_gcm_mbps: f64,
    pub pipeline_mbps_one_core: f64,
    pub pipeline_mbps_all_cores: f64,
    /// Bytes stored (sealed blobs) per byte written, on the mixed data.
    pub reduction_ratio: f64,
    pub cache_dir: String,
    pub cache_write_mbps: f64,
    pub fsync_p50_ms: f64,
    pub fsync_p99_ms: f64,
    pub fsync_max_ms: f64,
    /// The WAN link, when measured (`ferry plan` then sizes from it instead of `--wan-mbps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wan: Option<crate::wan::WanFigures>,
    /// The same pipeline with LZ4 instead of zstd (none in figures saved by older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lz4: Option<CodecFigures>,
}

/// The reduction pipeline's figures with one compressor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CodecFigures {
    pub compress_mbps: f64,
    pub pipeline_mbps_one_core: f64,
    pub pipeline_mbps_all_cores: f64,
    pub reduction_ratio: f64,
}

impl Figures {
    /// These figures as they are with `compression` chosen: the pipeline's speed and reduction
    /// measured with that compressor. Zstd is what the main fields hold; LZ4 needs figures from
    /// a `ferry bench` that measured it; `off` was never measured.
    pub fn with_compression(&self, compression: Compression) -> Result<Figures, String> {
        match compression {
            Compression::Zstd => Ok(self.clone()),
            Compression::Lz4 => {
                let l = self.lz4.as_ref().ok_or(
                    "these figures have no LZ4 measurement: run `ferry bench` of this version again",
                )?;
                Ok(Figures {
                    pipeline_mbps_one_core: l.pipeline_mbps_one_core,
                    pipeline_mbps_all_cores: l.pipeline_mbps_all_cores,
                    reduction_ratio: l.reduction_ratio,
                    ..self.clone()
                })
            }
            Compression::Off => Err("sizing is measured for zstd and lz4 only".to_string()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cache directory {0}: {1}")]
    Cache(String, std::io::Error),
    #[error("WAN peer {0}: {1}")]
    Wan(String, std::io::Error),
}

/// xorshift64*: deterministic, fast, good enough for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

const WORDS: [&str; 24] = [
    "replication",
    "checkpoint",
    "journal",
    "the",
    "of",
    "block",
    "disk",
    "recovery",
    "point",
    "and",
    "write",
    "cache",
    "master",
    "target",
    "process",
    "server",
    "a",
    "to",
    "is",
    "chunk",
    "tenant",
    "key",
    "site",
    "failover",
];

/// Mixed test data in whole blocks: per 4 blocks one zero, one random, two text.
pub fn mixed_data(bytes: usize) -> Vec<u8> {
    let blocks = (bytes / BS).max(4);
    let mut out = vec![0u8; blocks * BS];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for (i, b) in out.chunks_mut(BS).enumerate() {
        match i % 4 {
            0 => {}
            1 => rng.fill(b),
            _ => {
                let mut pos = 0;
                while pos < b.len() {
                    let w = WORDS[(rng.next() % WORDS.len() as u64) as usize].as_bytes();
                    let n = w.len().min(b.len() - pos);
                    b[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                    if pos < b.len() {
                        b[pos] = if matches!(rng.next() % 12, 0) {
                            b'\n'
                        } else {
                            b' '
                        };
                        pos += 1;
                    }
                }
            }
        }
    }
    out
}

/// Run `f` over the data repeatedly for at least `min` (and at least once); MB/s of input.
fn rate(data: &[u8], min: Duration, mut f: impl FnMut(&[u8])) -> f64 {
    let t = Instant::now();
    let mut bytes = 0u64;
    loop {
        f(data);
        bytes += data.len() as u64;
        if t.elapsed() >= min {
            break;
        }
    }
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn pipeline(key: &TenantKey, data: &[u8], compression: Compression) -> u64 {
    let mut stored = 0u64;
    for b in data.chunks(BS) {
        if is_zero(b) {
            continue;
        }
        let id = key.chunk_id(b);
        stored += black_box(key.seal_chunk_as(&id, b, compression)).len() as u64;
    }
    stored
}

/// The whole pipeline's MB/s on one core, on every core at once, and its stored/written ratio.
fn pipeline_figures(
    key: &TenantKey,
    data: &[u8],
    compression: Compression,
    cpus: u32,
    stage: Duration,
) -> (f64, f64, f64) {
    let stored = pipeline(key, data, compression);
    let one = rate(data, stage, |d| {
        black_box(pipeline(key, d, compression));
    });
    let all = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cpus)
            .map(|_| {
                s.spawn(move || {
                    rate(data, stage, |d| {
                        black_box(pipeline(key, d, compression));
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum::<f64>()
    });
    (one, all, stored as f64 / data.len() as f64)
}

/// The CPU figures (no disk I/O).
pub fn cpu(opts: &Options) -> Figures {
    let key = TenantKey::from_secret(&[7; 32]);
    let data = mixed_data(opts.data_bytes);
    let nonzero: Vec<u8> = data
        .chunks(BS)
        .filter(|b| !is_zero(b))
        .flatten()
        .copied()
        .collect();
    let random: Vec<u8> = data
        .chunks(BS)
        .skip(1)
        .step_by(4)
        .flatten()
        .copied()
        .collect();
    let hash_mbps = rate(&nonzero, opts.stage, |d| {
        for b in d.chunks(BS) {
            black_box(key.chunk_id(b));
        }
    });
    let zstd_mbps = rate(&nonzero, opts.stage, |d| {
        for b in d.chunks(BS) {
            black_box(zstd::bulk::compress(b, 1).ok());
        }
    });
    let aead = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[3; 32]).expect("32-byte key"),
    );
    let mut buf = vec![0u8; BS];
    let mut n = 0u64;
    let aes_gcm_mbps = rate(&random, opts.stage, |d| {
        for b in d.chunks(BS) {
            buf[..b.len()].copy_from_slice(b);
            n += 1;
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&n.to_le_bytes());
            let tag = aead
                .seal_in_place_separate_tag(
                    ring::aead::Nonce::assume_unique_for_key(nonce),
                    ring::aead::Aad::empty(),
                    &mut buf[..b.len()],
                )
                .expect("AES-GCM of a bounded buffer");
            let _ = black_box(tag);
        }
    });
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    let (pipeline_mbps_one_core, pipeline_mbps_all_cores, reduction_ratio) =
        pipeline_figures(&key, &data, Compression::Zstd, cpus, opts.stage);
    let lz4_mbps = rate(&nonzero, opts.stage, |d| {
        for b in d.chunks(BS) {
            black_box(lz4::block::compress(b, None, false).ok());
        }
    });
    let (one, all, ratio) = pipeline_figures(&key, &data, Compression::Lz4, cpus, opts.stage);
    Figures {
        cpus,
        block_size: DEFAULT_BLOCK_SIZE,
        hash_mbps,
        zstd_mbps,
        aes_gcm_mbps,
        pipeline_mbps_one_core,
        pipeline_mbps_all_cores,
        reduction_ratio,
        cache_dir: String::new(),
        cache_write_mbps: 0.0,
        fsync_p50_ms: 0.0,
        fsync_p99_ms: 0.0,
        fsync_max_ms: 0.0,
        wan: None,
        lz4: Some(CodecFigures {
            compress_mbps: lz4_mbps,
            pipeline_mbps_one_core: one,
            pipeline_mbps_all_cores: all,
            reduction_ratio: ratio,
        }),
    }
}

/// Removes the scratch file however the measurement ends.
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Cache write bandwidth and fdatasync latency in `opts.dir`; fills those fields of `f`.
pub fn cache(opts: &Options, f: &mut Figures) -> Result<(), BenchError> {
    let show = opts.dir.display().to_string();
    let err = |e| BenchError::Cache(show.clone(), e);
    std::fs::create_dir_all(&opts.dir).map_err(err)?;
    let path = opts
        .dir
        .join(format!(".ferry-bench-{}", std::process::id()));
    let scratch = Scratch(path.clone());
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&scratch.0)
        .map_err(err)?;
    let mut block = vec![0u8; 1 << 20];
    Rng(42).fill(&mut block);
    let t = Instant::now();
    let mut written = 0u64;
    while written < opts.cache_bytes {
        file.write_all(&block).map_err(err)?;
        written += block.len() as u64;
    }
    file.sync_data().map_err(err)?;
    f.cache_write_mbps = written as f64 / t.elapsed().as_secs_f64() / 1e6;
    let page = vec![0x5au8; 4096];
    let mut lat = Vec::new();
    let t = Instant::now();
    for i in 0..opts.fsync_rounds.max(1) {
        let s = Instant::now();
        file.write_all_at(&page, u64::from(i) * 4096).map_err(err)?;
        file.sync_data().map_err(err)?;
        lat.push(s.elapsed().as_secs_f64() * 1e3);
        if t.elapsed() >= opts.stage && lat.len() >= 20 {
            break;
        }
    }
    drop(file);
    drop(scratch);
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    f.fsync_p50_ms = pct(0.50);
    f.fsync_p99_ms = pct(0.99);
    f.fsync_max_ms = *lat.last().unwrap_or(&0.0);
    f.cache_dir = path
        .parent()
        .map(Path::display)
        .map(|d| d.to_string())
        .unwrap_or(show);
    Ok(())
}

/// Everything: the WAN first (when there is a peer), so the CPU stages do not compete with it.
pub fn run(opts: &Options) -> Result<Figures, BenchError> {
    let wan = match &opts.peer {
        Some(p) => Some(crate::wan::measure(p, &opts.wan)?),
        None => None,
    };
    let mut f = cpu(opts);
    cache(opts, &mut f)?;
    f.wan = wan;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_bench_reports_plausible_figures() {
        let d = tempfile::tempdir().unwrap();
        let opts = Options {
            dir: d.path().to_path_buf(),
            stage: Duration::from_millis(20),
            cache_bytes: 4 << 20,
            fsync_rounds: 20,
            data_bytes: 1 << 20,
            ..Default::default()
        };
        let f = run(&opts).unwrap();
        for v in [
            f.hash_mbps,
            f.zstd_mbps,
            f.aes_gcm_mbps,
            f.pipeline_mbps_one_core,
            f.cache_write_mbps,
        ] {
            assert!(v > 1.0, "{f:?}");
        }
        // 1/4 zero, 1/4 random, 1/2 text at about 3:1 or better.
        assert!(f.reduction_ratio > 0.25 && f.reduction_ratio < 0.6, "{f:?}");
        assert!(f.fsync_p50_ms <= f.fsync_p99_ms && f.fsync_p99_ms <= f.fsync_max_ms);
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "scratch file left behind"
        );
    }
}
