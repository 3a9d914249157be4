//! What the process server says about each disk: kept in memory, written to
//! `<cache>/<disk>/status.json` (atomically) for `ferry status` and for monitoring.

use crate::uplink::{Priority, Share};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    #[default]
    Connecting,
    Replicating,
    /// The journal overflowed (or the cache no longer holds what the recovery site needs):
    /// writes are tracked in the dirty bitmap and a resync must follow.
    ResyncRequired,
    /// A checksum resync runs (see `progress`).
    Resyncing,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStatus {
    pub disk: String,
    /// The consistency group (protected machine) the disk is cut with, and the newest cut of
    /// it committed for this disk (its id, a Unix time in ns).
    pub group: Option<String>,
    pub group_cut_unix_ns: u64,
    /// A point of this disk at a cut of its group is still to come (see
    /// `group::Group::pending`); the disk is not caught up meanwhile.
    pub group_cut_pending: bool,
    /// The machine's bandwidth limit in force when last looked at (megabits per second; none:
    /// unlimited), and how its chunks are compressed (`zstd`, `lz4` or `off`: the policy's).
    pub bandwidth_limit_mbit: Option<u32>,
    #[serde(default)]
    pub compression: String,
    /// The machine's priority in the appliance's uplink (its policy's), and, when the process
    /// server has an uplink budget (`--uplink-mbit`), the machine's share of it now: refreshed
    /// every second for a continuous disk, at every cut for a periodic one.
    pub priority: Priority,
    pub uplink: Option<Share>,
    pub state: State,
    pub connected: bool,
    /// Newest recovery point the master target acknowledged as durable.
    pub acked_seq: u64,
    pub acked_journal_seq: u64,
    pub acked_point_created_unix_ns: u64,
    pub journal_first_seq: u64,
    pub journal_last_seq: u64,
    pub journal_durable_seq: u64,
    pub journal_used_bytes: u64,
    pub journal_capacity_bytes: u64,
    /// The journal writes with O_DIRECT.
    pub journal_direct_io: bool,
    pub dirty_bytes: u64,
    /// Continuous disks: the disk's size now (it grows with `ferry grow`).
    pub disk_size: u64,
    /// Growths of the disk done since the process server started.
    pub grows: u64,
    /// Why the last `ferry grow` was refused or failed (also in `last_error` when it happened,
    /// which a reconnection clears); cleared by a growth that succeeds.
    pub grow_error: Option<String>,
    pub checkpoints_sent: u64,
    pub bytes_sent: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Periodic disks: what the last committed cut was (`seed`, `incremental`, `resync`),
    /// how many blocks and bytes it sent, and the block-name traffic of a resync.
    pub periodic_mode: Option<String>,
    /// Protected from its host's dirty bitmaps (periodic) rather than by a mirror.
    pub periodic: bool,
    /// A continuous disk whose host is known: it can be resynchronized by checksums.
    pub host_access: bool,
    /// Checksum resyncs of a continuous disk committed since the process server started.
    pub resyncs: u64,
    pub last_cut_blocks: u64,
    pub last_cut_bytes: u64,
    pub last_cut_hash_bytes: u64,
    /// A long operation under way (seed, resync, or a large incremental), for progress bars.
    pub progress: Option<Progress>,
    /// Continuous disks: whether freeze/thaw hooks are configured, how many
    /// application-consistent points were committed, the newest one, and the last failure.
    pub app_hooks: bool,
    pub app_points: u64,
    pub last_app_point_seq: u64,
    pub app_error: Option<String>,
    pub app_error_unix_ns: u64,
    pub updated_unix_ns: u64,
}

impl DiskStatus {
    /// The recovery site holds, as a recovery point, every write journaled when this status
    /// was written. Not while the journal overflowed or a resync runs: the journal may then be
    /// "drained" while the recovery site still lacks the writes a dirty bitmap tracked.
    /// For a disk of a consistency group, also its point at the group's newest cut: the
    /// machine's newest cut then holds every write of every disk.
    pub fn caught_up(&self) -> bool {
        self.connected
            && !self.group_cut_pending
            && self.state == State::Replicating
            && self.journal_last_seq == self.journal_durable_seq
            && self.acked_journal_seq == self.journal_durable_seq
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// `seed`, `resync` or `incremental`.
    pub operation: String,
    /// Bytes of the disk examined so far, and in all.
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_sec: f64,
    /// Seconds left at the current rate; `None` before a rate is known.
    pub eta_secs: Option<f64>,
    pub started_unix_ns: u64,
}

impl Progress {
    pub fn new(operation: &str, total_bytes: u64) -> Self {
        Progress {
            operation: operation.to_string(),
            total_bytes,
            started_unix_ns: now_unix_ns(),
            ..Default::default()
        }
    }

    /// Record `done` bytes and recompute rate and ETA.
    pub fn advance(&mut self, done: u64) {
        self.done_bytes = done.min(self.total_bytes);
        let secs = now_unix_ns().saturating_sub(self.started_unix_ns) as f64 / 1e9;
        if secs > 0.0 && self.done_bytes > 0 {
            self.bytes_per_sec = self.done_bytes as f64 / secs;
            self.eta_secs = Some((self.total_bytes - self.done_bytes) as f64 / self.bytes_per_sec);
        }
    }

    /// `seed [##########..........] 50%  512.0 MiB / 1.0 GiB  85.3 MiB/s  ETA 6 s`
    pub fn bar(&self, width: usize) -> String {
        let frac = if self.total_bytes == 0 {
            1.0
        } else {
            self.done_bytes as f64 / self.total_bytes as f64
        };
        let filled = ((frac * width as f64).round() as usize).min(width);
        let eta = match self.eta_secs {
            Some(s) => format!("ETA {}", human_secs(s)),
            None => "ETA -".to_string(),
        };
        format!(
            "{} [{}{}] {:>3.0}%  {} / {}  {}/s  {eta}",
            self.operation,
            "#".repeat(filled),
            ".".repeat(width - filled),
            frac * 100.0,
            human_bytes(self.done_bytes),
            human_bytes(self.total_bytes),
            human_bytes(self.bytes_per_sec as u64),
        )
    }
}

/// Bytes in binary units, one decimal (`1.5 GiB`).
pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn human_secs(s: f64) -> String {
    let s = s.round() as u64;
    match s {
        0..=99 => format!("{s} s"),
        100..=5999 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Write the status file via a temporary file and rename, so readers never see half of it.
pub fn write(path: &Path, status: &DiskStatus) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)?;
    std::fs::rename(&tmp, path)
}

pub fn read(path: &Path) -> std::io::Result<DiskStatus> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_reads_well() {
        let mut p = Progress::new("seed", 1 << 30);
        assert!(p.bar(20).starts_with("seed [....................]   0%"));
        p.started_unix_ns -= 2_000_000_000;
        p.advance(1 << 29);
        let bar = p.bar(20);
        assert!(
            bar.starts_with("seed [##########..........]  50%  512.0 MiB / 1.0 GiB"),
            "{bar}"
        );
        assert!(bar.contains("ETA 2 s"), "{bar}");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
