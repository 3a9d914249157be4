//! `ferry plan`: from the bench figures, what this appliance can carry, in the terms of ASR's
//! Deployment Planner: churn per day, protected disks, and the RPO at a WAN bandwidth. The model
//! and its assumptions are written out in `hardware/README.md`; keep the two in step.

use crate::bench::Figures;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct Inputs {
    /// WAN bandwidth to the recovery site in Mbit/s (0: not a limit, e.g. a LAN or loopback).
    pub wan_mbps: f64,
    pub rtt_ms: f64,
    /// Average churn of one protected disk, GB (10^9) per day.
    pub disk_churn_gb_per_day: f64,
    /// Peak write rate over the average write rate (sizing is for the peak).
    pub peak_to_average: f64,
    /// Checkpoint interval (the process server's --interval-ms).
    pub interval_ms: u64,
    /// Stored bytes per written byte; None: the bench's measured ratio.
    pub reduction: Option<f64>,
    /// Share of the CPU the reduction pipeline may use (the rest: NBD ingest, TLS, journal).
    pub cpu_share: f64,
    /// Write rates (MB/s) at which to estimate the RPO.
    pub rpo_rates_mbs: Vec<f64>,
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs {
            wan_mbps: 1000.0,
            rtt_ms: 20.0,
            disk_churn_gb_per_day: 20.0,
            peak_to_average: 3.0,
            interval_ms: 1000,
            reduction: None,
            cpu_share: 0.7,
            rpo_rates_mbs: vec![10.0, 50.0, 100.0],
        }
    }
}

/// TCP + TLS + framing overhead on the WAN: payload is about 90% of the line rate.
const WAN_EFFICIENCY: f64 = 0.9;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpoRow {
    pub write_mbs: f64,
    /// None: this rate is above what the appliance sustains, so the backlog (and RPO) grows.
    pub rpo_s: Option<f64>,
    pub reduce_s: f64,
    pub ship_s: f64,
    pub commit_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sizing {
    pub reduction_ratio: f64,
    /// Peak write rates (MB/s) each stage can absorb.
    pub reduce_capacity_mbs: f64,
    pub journal_capacity_mbs: f64,
    /// Infinity is reported as null (no WAN limit).
    pub wan_capacity_mbs: Option<f64>,
    pub sustainable_peak_mbs: f64,
    pub bottleneck: String,
    /// The most one disk can churn: its checkpoints are reduced on one core.
    pub per_disk_max_mbs: f64,
    pub churn_per_day_tb: f64,
    pub protected_disks: u64,
    pub rpo: Vec<RpoRow>,
    pub inputs: Vec<(String, String)>,
}

pub fn plan(f: &Figures, i: &Inputs) -> Sizing {
    let ratio = i.reduction.unwrap_or(f.reduction_ratio).clamp(0.01, 1.5);
    let reduce = f.pipeline_mbps_all_cores * i.cpu_share;
    let journal = f.cache_write_mbps;
    let wan_payload = i.wan_mbps / 8.0 * WAN_EFFICIENCY;
    let wan = (i.wan_mbps > 0.0).then(|| wan_payload / ratio);
    let mut stages = vec![
        ("reduction (CPU)", reduce),
        ("cache journal writes", journal),
    ];
    if let Some(w) = wan {
        stages.push(("WAN bandwidth", w));
    }
    let (bottleneck, sustainable) = stages
        .iter()
        .copied()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("reduction (CPU)", reduce));
    let average = sustainable / i.peak_to_average.max(1.0);
    let churn_per_day_mb = average * 86_400.0;
    let protected_disks = if i.disk_churn_gb_per_day > 0.0 {
        (churn_per_day_mb / 1000.0 / i.disk_churn_gb_per_day).floor() as u64
    } else {
        0
    };
    let per_disk_max = f.pipeline_mbps_one_core.min(sustainable);
    let interval = i.interval_ms as f64 / 1000.0;
    let rpo = i
        .rpo_rates_mbs
        .iter()
        .map(|&r| {
            let bytes = r * interval;
            let reduce_s = bytes / f.pipeline_mbps_one_core.max(1e-9);
            let ship_s = if i.wan_mbps > 0.0 {
                bytes * ratio / wan_payload + i.rtt_ms / 1000.0
            } else {
                i.rtt_ms / 1000.0
            };
            let commit_s = f.fsync_p99_ms / 1000.0;
            RpoRow {
                write_mbs: r,
                rpo_s: (r < per_disk_max).then_some(interval + reduce_s + ship_s + commit_s),
                reduce_s,
                ship_s,
                commit_s,
            }
        })
        .collect();
    Sizing {
        reduction_ratio: ratio,
        reduce_capacity_mbs: reduce,
        journal_capacity_mbs: journal,
        wan_capacity_mbs: wan,
        sustainable_peak_mbs: sustainable,
        bottleneck: bottleneck.to_string(),
        per_disk_max_mbs: per_disk_max,
        churn_per_day_tb: churn_per_day_mb / 1e6,
        protected_disks,
        rpo,
        inputs: vec![
            ("wan_mbps".into(), format!("{}", i.wan_mbps)),
            ("rtt_ms".into(), format!("{}", i.rtt_ms)),
            (
                "disk_churn_gb_per_day".into(),
                format!("{}", i.disk_churn_gb_per_day),
            ),
            ("peak_to_average".into(), format!("{}", i.peak_to_average)),
            ("interval_ms".into(), format!("{}", i.interval_ms)),
            ("cpu_share".into(), format!("{}", i.cpu_share)),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures() -> Figures {
        Figures {
            cpus: 2,
            block_size: 65536,
            hash_mbps: 2000.0,
            zstd_mbps: 900.0,
            aes_gcm_mbps: 3000.0,
            pipeline_mbps_one_core: 600.0,
            pipeline_mbps_all_cores: 1000.0,
            reduction_ratio: 0.5,
            cache_dir: "/x".into(),
            cache_write_mbps: 1500.0,
            fsync_p50_ms: 1.0,
            fsync_p99_ms: 4.0,
            fsync_max_ms: 9.0,
            wan: None,
            lz4: Some(crate::bench::CodecFigures {
                compress_mbps: 1800.0,
                pipeline_mbps_one_core: 900.0,
                pipeline_mbps_all_cores: 1600.0,
                reduction_ratio: 0.6,
            }),
        }
    }

    #[test]
    fn lz4_sizes_with_its_own_speed_and_ratio() {
        use ferry_chunk::Compression;
        let f = figures();
        let i = Inputs {
            wan_mbps: 0.0,
            ..Default::default()
        };
        let zstd = plan(&f.with_compression(Compression::Zstd).unwrap(), &i);
        let lz4 = plan(&f.with_compression(Compression::Lz4).unwrap(), &i);
        assert_eq!(zstd.reduce_capacity_mbs, 1000.0 * i.cpu_share);
        assert_eq!(lz4.reduce_capacity_mbs, 1600.0 * i.cpu_share);
        assert_eq!(lz4.reduction_ratio, 0.6);
        assert_eq!(lz4.per_disk_max_mbs, 900.0f64.min(lz4.sustainable_peak_mbs));
        // Figures saved before LZ4 was measured, and `off`, say so rather than guess.
        let old = Figures {
            lz4: None,
            ..f.clone()
        };
        assert!(old
            .with_compression(Compression::Lz4)
            .unwrap_err()
            .contains("ferry bench"));
        assert!(f.with_compression(Compression::Off).is_err());
        let json = serde_json::to_string(&old).unwrap();
        assert!(!json.contains("lz4"));
        let back: Figures = serde_json::from_str(&json).unwrap();
        assert_eq!(back.lz4, None);
    }

    #[test]
    fn the_slowest_stage_bounds_the_appliance() {
        let f = figures();
        // 100 Mbit/s WAN: 11.25 MB/s payload / 0.5 ratio = 22.5 MB/s of churn.
        let s = plan(
            &f,
            &Inputs {
                wan_mbps: 100.0,
                ..Default::default()
            },
        );
        assert_eq!(s.bottleneck, "WAN bandwidth");
        assert!((s.sustainable_peak_mbs - 22.5).abs() < 1e-9);
        // Average = peak / 3 = 7.5 MB/s = 648 GB/day = 32 disks at 20 GB/day.
        assert!((s.churn_per_day_tb - 0.648).abs() < 1e-9);
        assert_eq!(s.protected_disks, 32);
        // No WAN limit: CPU (1000 x 0.7) is the bound.
        let s = plan(
            &f,
            &Inputs {
                wan_mbps: 0.0,
                ..Default::default()
            },
        );
        assert_eq!(s.bottleneck, "reduction (CPU)");
        assert!((s.sustainable_peak_mbs - 700.0).abs() < 1e-9);
    }

    #[test]
    fn rpo_is_interval_plus_reduce_ship_commit_and_none_when_overloaded() {
        let f = figures();
        let s = plan(
            &f,
            &Inputs {
                wan_mbps: 0.0,
                rtt_ms: 0.0,
                rpo_rates_mbs: vec![60.0, 650.0],
                ..Default::default()
            },
        );
        // 1 s + 60 MB / 600 MB/s + 0 + 4 ms.
        assert!((s.rpo[0].rpo_s.unwrap() - 1.104).abs() < 1e-9);
        assert!(s.rpo[1].rpo_s.is_none());
    }
}
