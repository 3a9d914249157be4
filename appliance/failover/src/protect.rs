//! Protecting a failed-back disk again in the original direction (failback's `protect M`).
//!
//! After failback's resync the original disk is the machine's disk again, and it holds what the
//! machine wrote at the recovery site; the recovery site's newest point, and the process
//! server's journal (it may still hold pre-failover writes it never shipped), know nothing of
//! that. Shipping that journal on would lay stale writes over a base that is not the disk's. So
//! the process server drops the journal and brings the recovery site up to date by its own
//! checksum resync (`ferry_process_server::resync`: the master target's block names against
//! the disk's, only the blocks that differ cross), committed as a new recovery point; its
//! journal continues from there, so the machine's writes once it starts reach new points.
//!
//! The step runs where the process server runs (its role takes the order), and only talks to
//! it through the disk's cache directory, as `ferry resync` does: it writes the resync request
//! and waits until the process server removes it, which it does once the point is committed,
//! reading the disk's status meanwhile for progress. A disk whose host the process server
//! knows is read through that host; an original disk given by its image path (the form
//! reprotect and failback write) is opened here by a qemu-storage-daemon, and the request
//! names that daemon as the host for this resync. The machine is stopped at both sites
//! meanwhile (failback stopped it at the recovery site and starts it after this step), so the
//! image is free and the point is the disk it starts from.
//!
//! Running it again (the order resent after a restart, the job run again) asks for a resync
//! again, which sends only what still differs.

use crate::resync::{format_of, quit_leftover};
use crate::{io, FailoverError, Result};
use ferry_api::{OrderProgress, ResyncReport};
use ferry_process_server::resync::{request, HostDisk, REQUEST};
use ferry_process_server::status::{self, State};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the resync may show no progress while the process server's sessions fail before
/// the step gives up, saying why (the process server retries a passing link failure by itself;
/// a lasting one, such as a disk of another size, fails every time). With no failure, five
/// times that (a process server that never takes the request up).
pub const STALL: Duration = Duration::from_secs(60);

/// What protecting a disk again did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Protected {
    pub report: ResyncReport,
    /// The recovery point the resync committed.
    pub point_seq: u64,
}

fn refused(m: impl Into<String>) -> FailoverError {
    FailoverError::Refused(m.into())
}

/// Protect `disk` (its cache directory under `cache`) again from its original disk `source`.
/// `scratch` holds the daemon's sockets while it runs. `progress` is told how far the resync
/// has come. Blocking: call it off the runtime.
pub fn run(
    cache: &Path,
    disk: &str,
    source: &str,
    scratch: &Path,
    progress: &mut dyn FnMut(OrderProgress),
) -> Result<Protected> {
    let dir = cache.join(disk);
    let status_path = dir.join("status.json");
    let before = status::read(&status_path).map_err(|e| {
        refused(format!(
            "the process server protects no disk {disk} (no status under {}: {e})",
            cache.display()
        ))
    })?;
    if before.periodic {
        return Err(refused(format!(
            "disk {disk} is protected periodically: its next cut reads the disk on its host \
             (`ferry resync` asks for a full comparison); protect sets up continuous disks"
        )));
    }
    // Through the host the process server knows; else through a daemon of our own on the image.
    let mut qsd = None;
    let host = if before.host_access {
        None
    } else {
        if !matches!(HostDisk::from_source(source), Ok(None)) {
            return Err(refused(format!(
                "disk {disk}'s source names its host ({source}) but the process server was not \
                 given it: nothing to read the disk through"
            )));
        }
        std::fs::create_dir_all(scratch).map_err(io(format!("creating {}", scratch.display())))?;
        quit_leftover(scratch);
        let image = Path::new(source);
        let q = ferry_qemu::StorageDaemon::start(image, &format_of(image)?, scratch)?;
        qsd = Some(q);
        // The process server's resync uses the daemon's second monitor (a QMP socket serves
        // one client at a time) and starts its NBD server on this socket.
        Some(HostDisk {
            qmp: scratch.join(ferry_qemu::MGMT_QMP_SOCKET),
            node: "disk0".into(),
            nbd_socket: scratch.join("nbd.sock"),
        })
    };
    let r = request(&dir, host.as_ref())
        .map_err(io(format!("writing {}", dir.join(REQUEST).display())))
        .and_then(|()| wait(&dir, disk, &before, progress));
    if let Some(q) = qsd {
        q.stop();
    }
    r
}

/// Wait until the process server has committed the requested resync (it removes the request),
/// telling `progress` what its status says meanwhile.
fn wait(
    dir: &Path,
    disk: &str,
    before: &status::DiskStatus,
    progress: &mut dyn FnMut(OrderProgress),
) -> Result<Protected> {
    let (status_path, req) = (dir.join("status.json"), dir.join(REQUEST));
    let mut told = None;
    let mut moved = Instant::now();
    loop {
        let st = status::read(&status_path)
            .map_err(|e| refused(format!("reading {}: {e}", status_path.display())))?;
        if !req.exists() {
            // Removed once the point was committed, after the status said so.
            let st = status::read(&status_path)
                .map_err(|e| refused(format!("reading {}: {e}", status_path.display())))?;
            let report = ResyncReport {
                disk_bytes: st.disk_size,
                blocks_compared: st.last_cut_hash_bytes / 32,
                blocks_sent: st.last_cut_blocks,
                bytes_sent: st.last_cut_bytes,
                hash_bytes: st.last_cut_hash_bytes,
                reconnects: 0,
            };
            progress(OrderProgress {
                done: st.disk_size,
                total: st.disk_size,
                detail: detail(&report),
            });
            return Ok(Protected {
                report,
                point_seq: st.acked_seq,
            });
        }
        if let Some(p) = st.progress.as_ref().filter(|p| {
            st.state == State::Resyncing && p.operation == "resync" && p.total_bytes > 0
        }) {
            let now = (p.done_bytes, p.total_bytes);
            if told != Some(now) {
                told = Some(now);
                moved = Instant::now();
                progress(OrderProgress {
                    done: p.done_bytes.min(p.total_bytes),
                    total: p.total_bytes,
                    detail: format!(
                        "resync to the recovery site: compared {} of {} bytes",
                        p.done_bytes, p.total_bytes
                    ),
                });
            }
        }
        // (The session under way when the request came ends for it: that one is no failure.)
        let failing = st.reconnects > before.reconnects + 1;
        let still = moved.elapsed();
        if (failing && still >= STALL) || still >= 5 * STALL {
            return Err(refused(format!(
                "the process server's resync of {disk} made no progress for {} s: {} (it tries \
                 again by itself; the disk is not protected until it succeeds: run the \
                 failback again to wait for it)",
                still.as_secs(),
                st.last_error.as_deref().unwrap_or("no error reported")
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The step's words for a finished resync.
pub fn detail(r: &ResyncReport) -> String {
    format!(
        "sent {} bytes ({} blocks) to the recovery site, compared {} blocks by name",
        r.bytes_sent, r.blocks_sent, r.blocks_compared
    )
}
