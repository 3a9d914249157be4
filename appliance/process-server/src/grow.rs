//! Growing a continuously protected disk (`ferry grow`).
//!
//! A continuous disk is mirrored by its host's QEMU (`blockdev-mirror` into our NBD export),
//! and neither end of that mirror can change size while it runs: QEMU refuses to resize a node a
//! mirror job uses, and an NBD node learns its size only when it connects. So the process
//! server, which knows the disk's host (`--disk NAME=SIZE,qmp=,node=,nbd=`), does it itself,
//! between two replication sessions of the disk (the shipper ends its session when it sees the
//! request, so no checkpoint is cut while the size changes):
//! 1. note how the mirror is set up (job id, filter node, target node and how it connects),
//!    durably in `grow-mirror.json` beside the request, then end the mirror (cancel, finalize,
//!    dismiss);
//! 2. `block_resize` the disk's node to the new size;
//! 3. grow the journal (persisted), and with it the NBD export and the status;
//! 4. delete and re-add the target node with the same connection parameters, so it connects
//!    again and sees the larger export, and start the mirror again (`sync=none`,
//!    `copy-mode=write-blocking`, same job id and filter node name);
//! 5. ask for a checksum resync, which the next session runs before anything else at the new
//!    size (every checkpoint after the growth carries it).
//!
//! The resync sends what the guest wrote while no mirror ran. It is a checksum resync (the disk
//! read whole on its host, only blocks whose names differ sent), not a read of a dirty bitmap's
//! extents, because it is the one mechanism that is also right after a crash anywhere in the
//! procedure (a bitmap on the host would have to survive the crash and be merged with the
//! journal's unshipped records), and it is already proven: the resynced point is a prefix of the
//! write stream (see `crate::resync`). Its cost is a local read of the whole disk and 32 bytes of
//! block name per block on the WAN; the data sent is what differs (the gap's writes; the new
//! area is zeros, which cross as holes).
//!
//! On any failure after the mirror ended, the mirror is started again at whatever size the disk
//! has now and a resync is asked for; the error goes to the status (`last_error`). If even that
//! fails, the status says the disk is not protected and the growth is tried again.

use crate::status::State;
use crate::Disk;
use anyhow::{anyhow, bail, Context};
use ferry_qemu::mirror::{self, MirrorSetup};
use ferry_qemu::Qmp;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The request file `ferry grow` writes into the disk's cache directory: the new size in bytes.
pub const REQUEST: &str = "grow-requested";
/// How the mirror was set up, kept while a growth has ended it.
pub const SETUP: &str = "grow-mirror.json";

const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// The size a request file asks for.
pub fn read_request(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Write a request for growing the disk whose cache directory is `dir` (atomically).
pub fn write_request(dir: &Path, size: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{REQUEST}.tmp"));
    std::fs::write(&tmp, format!("{size}\n"))?;
    std::fs::rename(&tmp, dir.join(REQUEST))
}

/// Grow the disk to `size` as asked; reports the outcome in the disk's status.
pub async fn run(disk: &Arc<Disk>, size: u64) {
    let d = disk.clone();
    let from = disk.size();
    let outcome = tokio::task::spawn_blocking(move || grow(&d, size))
        .await
        .unwrap_or_else(|e| Outcome::Refused(anyhow!("the growth task failed: {e}")));
    match outcome {
        Outcome::Grown => {
            tracing::info!(disk = %disk.name, from, to = size, "disk grown; a checksum resync sends what changed meanwhile");
            disk.clear_grow_request();
            disk.update(|s| {
                s.grows += 1;
                s.last_error = None;
                s.grow_error = None;
            });
        }
        Outcome::Refused(e) => {
            let msg = format!("growing disk {} to {size} bytes: {e:#}", disk.name);
            tracing::error!(disk = %disk.name, error = %msg, "growth refused; nothing changed");
            disk.clear_grow_request();
            disk.update(|s| {
                s.last_error = Some(msg.clone());
                s.grow_error = Some(msg);
            });
        }
        Outcome::Restored(e) => {
            let msg = format!(
                "growing disk {} to {size} bytes failed: {e:#}; its mirror was restarted at {} bytes \
                 and a checksum resync sends what changed meanwhile",
                disk.name,
                disk.size()
            );
            tracing::error!(disk = %disk.name, error = %msg, "growth failed; protection restored");
            disk.clear_grow_request();
            disk.update(|s| {
                s.last_error = Some(msg.clone());
                s.grow_error = Some(msg);
            });
        }
        Outcome::Unprotected(e) => {
            let msg = format!(
                "growing disk {} to {size} bytes failed and its mirror could not be restarted: {e:#}; \
                 THE DISK IS NOT PROTECTED; retrying",
                disk.name
            );
            tracing::error!(disk = %disk.name, error = %msg, "disk unprotected");
            disk.update(|s| {
                s.state = State::ResyncRequired;
                s.last_error = Some(msg.clone());
                s.grow_error = Some(msg);
            });
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }
}

enum Outcome {
    Grown,
    /// Nothing changed (the mirror never stopped).
    Refused(anyhow::Error),
    /// The growth failed after the mirror ended; the mirror runs again.
    Restored(anyhow::Error),
    /// The mirror could not be started again.
    Unprotected(anyhow::Error),
}

fn grow(disk: &Disk, size: u64) -> Outcome {
    let setup_path = disk.grow_path.with_file_name(SETUP);
    let (mut qmp, setup) = match stop_mirror(disk, size, &setup_path) {
        Ok(x) => x,
        Err(Stop::Unchanged(e)) => return Outcome::Refused(e),
        // The mirror may have ended (a cancel sent, or an earlier attempt's saved setup): the
        // request stays, the status says the disk may be unprotected, and it is tried again.
        Err(Stop::Unknown(e)) => return Outcome::Unprotected(e),
        Err(Stop::Ended(b, e)) => {
            let (mut qmp, setup) = *b;
            return match mirror::restart(&mut qmp, &setup, JOB_TIMEOUT) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&setup_path);
                    Outcome::Restored(e)
                }
                Err(e2) => Outcome::Unprotected(anyhow!("{e:#}; restarting the mirror: {e2}")),
            };
        }
    };
    // From here the guest's writes reach only the disk, not the journal: whatever happens, the
    // mirror runs again and a resync (asked for durably before the mirror ended) sends what it
    // missed.
    let result = resize_and_restart(&mut qmp, disk, &setup, size);
    let result = match result {
        Ok(()) => Ok(Outcome::Grown),
        Err(e) => match mirror::restart(&mut qmp, &setup, JOB_TIMEOUT) {
            Ok(()) => Ok(Outcome::Restored(e)),
            Err(e2) => Err(anyhow!("{e:#}; restarting the mirror: {e2}")),
        },
    };
    match result {
        Ok(outcome) => {
            let _ = std::fs::remove_file(&setup_path);
            outcome
        }
        Err(e) => Outcome::Unprotected(e),
    }
}

/// Why the mirror was not (known to be) stopped.
enum Stop {
    /// Checked before anything was done: the mirror runs as before.
    Unchanged(anyhow::Error),
    /// The mirror may be ended and its setup is not at hand (the host did not answer while an
    /// earlier attempt's setup is saved): try again.
    Unknown(anyhow::Error),
    /// The mirror may be ended: start it again from this setup.
    Ended(Box<(Qmp, MirrorSetup)>, anyhow::Error),
}

/// Check the request, note the mirror's setup and end the mirror; or find it ended already by
/// an earlier attempt that was interrupted (its setup saved, which is trusted before anything
/// the host says: the host's only mirror may then be another disk's).
fn stop_mirror(disk: &Disk, size: u64, setup_path: &Path) -> Result<(Qmp, MirrorSetup), Stop> {
    let saved = std::fs::read(setup_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<MirrorSetup>(&b).ok());
    let unchanged = |e: anyhow::Error| Stop::Unchanged(e);
    let host = disk
        .host
        .as_ref()
        .context("the disk's host is not known")
        .map_err(unchanged)?;
    let now = disk.size();
    if size < now {
        return Err(unchanged(anyhow!(
            "shrinking a protected disk is refused: it is {now} bytes, asked for {size}"
        )));
    }
    if !size.is_multiple_of(512) {
        return Err(unchanged(anyhow!("{size} bytes is not a multiple of 512")));
    }
    let mut qmp = match Qmp::connect(&host.qmp, Duration::from_secs(10))
        .context("connecting to the host's QMP socket")
    {
        Ok(q) => q,
        Err(e) if saved.is_some() => return Err(Stop::Unknown(e)),
        Err(e) => return Err(unchanged(e)),
    };
    if let Some(setup) = saved {
        // An earlier attempt ended the mirror (or was about to): end it if it runs, then go on.
        let running = qmp
            .execute("query-block-jobs", json!({}))
            .map(|jobs| {
                jobs.as_array()
                    .is_some_and(|a| a.iter().any(|j| j["device"] == setup.job_id.as_str()))
            })
            .unwrap_or(false);
        if running {
            if let Err(e) = mirror::cancel(&mut qmp, &setup.job_id, JOB_TIMEOUT) {
                return Err(Stop::Ended(
                    Box::new((qmp, setup)),
                    anyhow::Error::from(e).context("ending the mirror job"),
                ));
            }
        }
        // The attempt asked for the resync before it ended the mirror; ask again all the same
        // (a setup saved by an older version, or by hand, comes without one).
        if let Err(e) = disk.request_resync() {
            return Err(Stop::Unknown(anyhow!("asking for a resync: {e}")));
        }
        tracing::warn!(disk = %disk.name, "the growth an interrupted attempt began goes on");
        return Ok((qmp, setup));
    }
    let jobs = qmp
        .execute("query-block-jobs", json!({}))
        .map_err(|e| unchanged(e.into()))?;
    let Some(job) = crate::first_copy::find_mirror(&jobs, &host.node) else {
        return Err(unchanged(anyhow!(
            "no mirror job of node {} runs on the disk's host: the disk is not mirrored to this \
             process server",
            host.node
        )));
    };
    if !job.ready {
        return Err(unchanged(anyhow!(
            "the mirror's first full copy is still running ({} of {} bytes): grow the disk once it is done",
            job.offset,
            job.len
        )));
    }
    let mut setup = mirror::setup(&mut qmp, &job.id)
        .context("reading the mirror's setup")
        .map_err(unchanged)?;
    if disk.nbd_tls && setup.target_options.get("tls-creds").is_none() {
        // QEMU's description of an NBD node leaves its TLS credentials out; our export requires
        // them, so they are the host's (only) TLS client credentials.
        let creds = mirror::client_tls_creds(&mut qmp).map_err(|e| unchanged(e.into()))?;
        let [id] = creds.as_slice() else {
            return Err(unchanged(anyhow!(
                "cannot tell which of the host's TLS client credentials ({creds:?}) the mirror's \
                 target node {} uses",
                setup.target
            )));
        };
        setup.target_options["tls-creds"] = json!(id);
    }
    if setup.source != host.node {
        return Err(unchanged(anyhow!(
            "mirror job {} copies node {}, not the disk's node {}",
            job.id,
            setup.source,
            host.node
        )));
    }
    // Durable before the mirror ends: how to start it again, and the resync that sends what the
    // guest writes while it does not run (a power loss anywhere after this finds both).
    let saved = serde_json::to_vec_pretty(&setup)
        .map_err(anyhow::Error::from)
        .and_then(|b| {
            std::fs::write(setup_path, b)
                .and_then(|()| std::fs::File::open(setup_path)?.sync_all())
                .with_context(|| format!("writing {}", setup_path.display()))
        })
        .and_then(|()| disk.request_resync().context("asking for a resync"));
    if let Err(e) = saved {
        let _ = std::fs::remove_file(setup_path);
        return Err(unchanged(e));
    }
    if let Err(e) = mirror::cancel(&mut qmp, &job.id, JOB_TIMEOUT) {
        return Err(Stop::Ended(
            Box::new((qmp, setup)),
            anyhow::Error::from(e).context("ending the mirror job"),
        ));
    }
    tracing::info!(disk = %disk.name, job = %job.id, "mirror ended for the growth");
    Ok((qmp, setup))
}

fn resize_and_restart(
    qmp: &mut Qmp,
    disk: &Disk,
    setup: &MirrorSetup,
    size: u64,
) -> anyhow::Result<()> {
    let node = &setup.source;
    let on_host = ferry_qemu::fleece::node_size(qmp, node)?;
    if on_host < size {
        qmp.execute("block_resize", json!({"node-name": node, "size": size}))
            .with_context(|| format!("resizing node {node} on the host"))?;
    } else if on_host > size {
        bail!(
            "the disk is {on_host} bytes on its host already, more than {size}: ask for {on_host}"
        );
    }
    disk.journal.grow(size).context("growing the journal")?;
    disk.refresh_journal_stats();
    mirror::restart(qmp, setup, JOB_TIMEOUT).context("restarting the mirror")
}
