//! Progress of a continuous disk's first full copy.
//!
//! Why: before a continuous disk's first recovery point, QEMU's mirror job copies the whole disk
//! into the process server (`sync=full`), which on a large disk takes hours; an operator needs
//! bytes done and total, rate and ETA, as a seed shows them. The process server cannot tell the
//! mirror's copy from the guest's writes (both arrive as NBD writes), but the host knows: its
//! mirror job reports `offset` of `len` until it is `ready`.
//!
//! How: for a disk whose host is known (`--disk NAME=SIZE,qmp=,node=,nbd=`), a thread asks the
//! host's QMP `query-block-jobs` every second (a short connection each time: the socket serves
//! one client at a time) and publishes `progress` (operation `first copy`) while the disk's
//! mirror is not ready; the rate is measured from what this thread saw, so a
//! process server started in the middle of a copy does not claim the whole copy as its rate.
//! The job is the mirror named after the disk's node, or else the host's only mirror job. Other
//! operations' progress (a resync) is never overwritten. The thread connects for each question
//! and leaves at once: a QMP socket serves one client at a time, and a resync or a growth of the
//! disk needs the same socket for long stretches.

use crate::status::{now_unix_ns, Progress};
use crate::Disk;
use ferry_qemu::Qmp;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The `operation` of a first copy's progress.
pub const OPERATION: &str = "first copy";

/// A mirror job as the host reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorJob {
    /// The job's id (`device` in `query-block-jobs`).
    pub id: String,
    pub offset: u64,
    pub len: u64,
    pub ready: bool,
}

/// The disk's mirror among the host's block jobs: the one named after `node`, else the only one.
pub fn find_mirror(jobs: &Value, node: &str) -> Option<MirrorJob> {
    let mirrors: Vec<&Value> = jobs
        .as_array()?
        .iter()
        .filter(|j| j["type"] == "mirror")
        .collect();
    let job = mirrors
        .iter()
        .find(|j| j["device"] == node)
        .or(if mirrors.len() == 1 {
            mirrors.first()
        } else {
            None
        })?;
    Some(MirrorJob {
        id: job["device"].as_str()?.to_string(),
        offset: job["offset"].as_u64()?,
        len: job["len"].as_u64()?,
        ready: job["ready"].as_bool().unwrap_or(false),
    })
}

/// Watch the disk's mirror until its first copy is done.
///
/// A host's QMP socket serves one client at a time (a resync, a periodic cut, the hypervisor's
/// own management need it too), so each look is a short connection, and the watch ends once the
/// copy is done: when the mirror is seen ready, or when there is no copy under way and the disk
/// has a recovery point already (a process server restarted after its disk was protected).
pub fn spawn(disk: Arc<Disk>) {
    let Some(host) = disk.host.clone() else {
        return;
    };
    std::thread::Builder::new()
        .name(format!("first-copy-{}", disk.name))
        .spawn(move || {
            // (offset, unix ns) when this thread first saw the copy under way.
            let mut start: Option<(u64, u64)> = None;
            loop {
                let jobs = Qmp::connect(&host.qmp, Duration::from_secs(5))
                    .and_then(|mut q| q.execute("query-block-jobs", json!({})));
                let job = match jobs {
                    Ok(jobs) => find_mirror(&jobs, &host.node),
                    Err(e) => {
                        tracing::debug!(disk = %disk.name, error = %e, "host QMP");
                        None
                    }
                };
                publish(&disk, job.as_ref(), &mut start);
                let done = match &job {
                    Some(j) => j.ready,
                    None => disk.status().acked_seq > 0,
                };
                if done {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
        .expect("spawning a thread");
}

fn publish(disk: &Disk, job: Option<&MirrorJob>, start: &mut Option<(u64, u64)>) {
    let now = now_unix_ns();
    let copying = job.filter(|j| !j.ready && j.len > 0);
    let Some(j) = copying else {
        *start = None;
        if disk
            .status()
            .progress
            .as_ref()
            .is_some_and(|p| p.operation == OPERATION)
        {
            disk.update(|s| s.progress = None);
        }
        return;
    };
    let (off0, t0) = *start.get_or_insert((j.offset, now));
    let done = j.offset.min(j.len);
    let secs = now.saturating_sub(t0) as f64 / 1e9;
    let rate = if secs > 0.5 {
        done.saturating_sub(off0) as f64 / secs
    } else {
        0.0
    };
    let p = Progress {
        operation: OPERATION.to_string(),
        done_bytes: done,
        total_bytes: j.len,
        bytes_per_sec: rate,
        eta_secs: (rate > 0.0).then(|| (j.len - done) as f64 / rate),
        started_unix_ns: t0,
    };
    disk.update(|s| {
        if s.progress.as_ref().is_none_or(|q| q.operation == OPERATION) {
            s.progress = Some(p);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disks_mirror_is_found_by_node_or_as_the_only_one() {
        let one = json!([{"type": "mirror", "device": "ferry-mirror", "offset": 5, "len": 10, "ready": false}]);
        assert_eq!(
            find_mirror(&one, "disk0"),
            Some(MirrorJob {
                id: "ferry-mirror".into(),
                offset: 5,
                len: 10,
                ready: false
            })
        );
        let two = json!([
            {"type": "mirror", "device": "a", "offset": 1, "len": 10, "ready": false},
            {"type": "backup", "device": "disk0", "offset": 2, "len": 10, "ready": false},
            {"type": "mirror", "device": "disk0", "offset": 3, "len": 10, "ready": true}
        ]);
        assert_eq!(
            find_mirror(&two, "disk0"),
            Some(MirrorJob {
                id: "disk0".into(),
                offset: 3,
                len: 10,
                ready: true
            })
        );
        // Two mirrors, neither named after the node: not guessed.
        assert_eq!(find_mirror(&two, "disk9"), None);
        assert_eq!(find_mirror(&json!([]), "disk0"), None);
    }
}
