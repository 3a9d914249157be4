//! What the process server says about each disk: kept in memory, written to
//! `<cache>/<disk>/status.json` (atomically) for `ferry status` and for monitoring.

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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DiskStatus {
    pub disk: String,
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
    pub dirty_bytes: u64,
    pub checkpoints_sent: u64,
    pub bytes_sent: u64,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// Periodic disks: what the last committed cut was (`seed`, `incremental`, `resync`),
    /// how many blocks and bytes it sent, and the block-name traffic of a resync.
    pub periodic_mode: Option<String>,
    pub last_cut_blocks: u64,
    pub last_cut_bytes: u64,
    pub last_cut_hash_bytes: u64,
    pub updated_unix_ns: u64,
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
