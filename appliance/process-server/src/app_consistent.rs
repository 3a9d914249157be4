//! Application-consistent recovery points for continuously protected disks.
//!
//! Every checkpoint is a prefix of the write stream, so every recovery point is crash-consistent:
//! what the disk would hold after a power cut. An application-consistent point is the prefix at a
//! moment when the guest's applications had flushed and frozen their state (fsfreeze through
//! qemu-guest-agent, VSS on Windows), so a database restarts from it without recovery. The process
//! server cannot freeze a guest itself; the operator gives it a freeze and a thaw hook (for
//! example `virsh domfsfreeze VM` / `virsh domfsthaw VM`). Then:
//!
//! 1. the freeze hook runs; when it returns, every write the frozen guest completed is in the
//!    journal, because the hypervisor's mirror is write-blocking (a guest write completes only
//!    once the process server has journaled it);
//! 2. the journal is synced and its last sequence number becomes the disk's *mark*;
//! 3. the thaw hook runs (always, also when something before it failed);
//! 4. the shipper ends a checkpoint exactly at the mark and tags it application-consistent.
//!
//! The mark is set before the thaw, while no write can arrive, and the shipper reads it under the
//! same lock as it reads the journal, so no checkpoint can run past the mark unnoticed.
//! A point is asked for with `ferry app-point` (a request file in the disk's cache directory) or
//! on a schedule (`--app-consistent-every`).

use crate::status::now_unix_ns;
use crate::Disk;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The request file `ferry app-point` writes into `<cache>/<disk>/`.
pub const REQUEST: &str = "app-point-requested";

/// The operator's guest hooks, shared by every continuous disk of a process server. Each runs as
/// `sh -c CMD` with `FERRY_DISK` naming the disk and `FERRY_HOOK` saying `freeze` or `thaw`.
#[derive(Clone, Debug)]
pub struct Hooks {
    pub freeze: String,
    pub thaw: String,
    /// A hook still running after this is killed and counts as failed.
    pub timeout: Duration,
    /// Take a point on this schedule as well as on request.
    pub every: Option<Duration>,
}

/// Watch one disk for requests (and its schedule) and take application-consistent points.
pub async fn run(disk: Arc<Disk>, hooks: Hooks, request: PathBuf) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let requested = request.exists();
        let scheduled = hooks.every.is_some_and(|e| last.elapsed() >= e);
        if !(requested || scheduled) || disk.app_mark().is_some() {
            continue;
        }
        // Taken before the hooks run: a request made while they run asks for a later point.
        if requested {
            let _ = std::fs::remove_file(&request);
        }
        last = Instant::now();
        match take(&disk, &hooks).await {
            Ok(mark) => {
                tracing::info!(disk = %disk.name, mark, "application-consistent mark set");
                disk.update(|s| s.app_error = None);
            }
            Err(e) => {
                tracing::warn!(disk = %disk.name, error = %e, "no application-consistent point");
                disk.update(|s| {
                    s.app_error = Some(e.clone());
                    s.app_error_unix_ns = now_unix_ns();
                });
            }
        }
    }
}

/// Freeze, mark, thaw. Returns the mark.
async fn take(disk: &Arc<Disk>, hooks: &Hooks) -> Result<u64, String> {
    if disk.status().state == crate::State::ResyncRequired {
        return Err("the disk needs a resync; its journal no longer holds every write".into());
    }
    let frozen = run_hook(&hooks.freeze, &disk.name, "freeze", hooks.timeout).await;
    let marked = match frozen {
        Ok(()) => {
            let d = disk.clone();
            tokio::task::spawn_blocking(move || d.set_app_mark())
                .await
                .map_err(|e| format!("marking the journal: {e}"))
                .and_then(|r| r)
        }
        Err(e) => Err(format!("freeze hook: {e}")),
    };
    // Thaw whatever happened: a guest left frozen is an outage.
    if let Err(e) = run_hook(&hooks.thaw, &disk.name, "thaw", hooks.timeout).await {
        tracing::error!(disk = %disk.name, error = %e, "thaw hook failed: the guest may still be frozen");
        let e = format!("thaw hook: {e} (the guest may still be frozen)");
        return Err(match marked {
            Ok(_) => e,
            Err(m) => format!("{m}; {e}"),
        });
    }
    marked
}

async fn run_hook(cmd: &str, disk: &str, which: &str, timeout: Duration) -> Result<(), String> {
    let child = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .env("FERRY_DISK", disk)
        .env("FERRY_HOOK", which)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `{cmd}`: {e}"))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("`{cmd}` did not finish within {timeout:?} and was killed"))?
        .map_err(|e| format!("`{cmd}`: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    // The end of stderr says why (an agent's message usually comes last); keep 300 characters.
    let err = String::from_utf8_lossy(&out.stderr);
    let err = err.trim();
    let start = err.char_indices().rev().nth(299).map_or(0, |(i, _)| i);
    let tail = &err[start..];
    Err(format!("`{cmd}` failed ({}): {tail}", out.status))
}
