//! Checksum resync from one site's disk to the other's: reprotect and failback.
//!
//! After a failover the recovery site's live disk is the newer one. The original disk is read
//! where it is and named block by block with the tenant's keyed hash (32 bytes per block is what
//! crosses the WAN that way); the live disk is named likewise, and only blocks whose names
//! differ are sent and written. Running it again sends nothing more than what changed since,
//! so it is also failback's final pass and safe to repeat after an interruption.
//!
//! The original disk is opened by qemu-storage-daemon (whatever its format) and written over
//! NBD; the live disk is a raw file. This runs where both are reachable (a configuration server
//! started beside the recovery site); enrolled roles split it between the sites instead
//! ([`crate::split`]: the protected site's role opens the original disk, the master target
//! answers with the live disk's names and the blocks that differ).

use crate::{io, FailoverError, Result};
use ferry_api::ResyncReport;
use ferry_chunk::TenantKey;
use ferry_nbd::client::Client;
use ferry_process_server::resync::HostDisk;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The unit of comparison: the recovery repository's default block size.
pub const BLOCK: u64 = 64 * 1024;
/// Blocks compared per round trip.
const BATCH: u64 = 64;

/// The format of an image, as qemu-img sees it.
pub(crate) fn format_of(image: &Path) -> Result<String> {
    let out = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(image)
        .output()
        .map_err(io("running qemu-img info"))?;
    if !out.status.success() {
        return Err(FailoverError::Command {
            program: "qemu-img info".into(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| FailoverError::Refused(format!("qemu-img info: {e}")))?;
    v["format"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| FailoverError::Refused("qemu-img info names no format".into()))
}

pub(crate) fn nbd(e: impl std::fmt::Display) -> FailoverError {
    FailoverError::Nbd(e.to_string())
}

/// Bring `target` (an image at the other site) up to date from `source` (a raw file).
/// `scratch` holds the daemon's sockets while it runs. `progress` is told, after each batch of
/// blocks, what was compared and sent so far (`blocks_compared` of the disk's
/// `disk_bytes / BLOCK`, rounded up). Blocking: call it off the runtime.
pub fn run(
    source: &Path,
    target: &Path,
    key: &TenantKey,
    scratch: &Path,
    progress: &mut dyn FnMut(&ResyncReport),
) -> Result<ResyncReport> {
    let given = target.to_string_lossy();
    if !matches!(HostDisk::from_source(&given), Ok(None)) {
        return Err(FailoverError::Refused(format!(
            "the original disk is given by its host ({given}): a resync run beside the recovery \
             site writes an original disk given by its image path only (the process server of \
             its machine writes one through its host)"
        )));
    }
    let src = std::fs::File::open(source).map_err(io(format!("opening {}", source.display())))?;
    let size = src
        .metadata()
        .map_err(io(format!("reading {}", source.display())))?
        .len();
    let format = format_of(target)?;
    std::fs::create_dir_all(scratch).map_err(io(format!("creating {}", scratch.display())))?;
    quit_leftover(scratch);
    let mut qsd = ferry_qemu::StorageDaemon::start(target, &format, scratch)?;
    let sock = scratch.join("target.sock");
    qsd.export("disk0", "target", &sock)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting a runtime"))?;
    let r = rt.block_on(async {
        let mut c = Client::connect_unix(&sock, "target").await.map_err(nbd)?;
        if c.size() != size {
            return Err(FailoverError::Refused(format!(
                "{} is {} bytes, {} is {size}: not the same disk",
                target.display(),
                c.size(),
                source.display()
            )));
        }
        let r = compare_and_send(&src, &mut c, size, key, progress).await?;
        c.flush().await.map_err(nbd)?;
        let _ = c.disconnect().await;
        Ok(r)
    });
    qsd.stop();
    r
}

/// A resync interrupted by a crash of the process that ran it leaves its daemon running with
/// the target open (and locked): ask it to quit before opening the target again.
pub(crate) fn quit_leftover(scratch: &Path) {
    let sock = scratch.join("qsd-qmp.sock");
    if !sock.exists() {
        return;
    }
    if let Ok(mut q) = ferry_qemu::Qmp::connect(&sock, Duration::from_millis(500)) {
        tracing::warn!(dir = %scratch.display(), "stopping a daemon an interrupted resync left");
        let _ = q.execute("quit", serde_json::json!({}));
        // It has quit when its socket no longer answers.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && std::os::unix::net::UnixStream::connect(&sock).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn compare_and_send<S>(
    src: &std::fs::File,
    c: &mut Client<S>,
    size: u64,
    key: &TenantKey,
    progress: &mut dyn FnMut(&ResyncReport),
) -> Result<ResyncReport>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut r = ResyncReport {
        disk_bytes: size,
        ..Default::default()
    };
    let mut pos = 0u64;
    while pos < size {
        let len = (BATCH * BLOCK).min(size - pos);
        // The original site names its blocks; only the names travel.
        let theirs = c.read(pos, len as u32).await.map_err(nbd)?;
        let mut ours = vec![0u8; len as usize];
        src.read_exact_at(&mut ours, pos)
            .map_err(io("reading the live disk"))?;
        let mut off = 0usize;
        while off < len as usize {
            let end = (off + BLOCK as usize).min(len as usize);
            r.blocks_compared += 1;
            r.hash_bytes += 32;
            if key.chunk_id(&theirs[off..end]) != key.chunk_id(&ours[off..end]) {
                c.write(pos + off as u64, &ours[off..end], false)
                    .await
                    .map_err(nbd)?;
                r.blocks_sent += 1;
                r.bytes_sent += (end - off) as u64;
            }
            off = end;
        }
        pos += len;
        progress(&r);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Beside the recovery site, an original disk given by its host is refused, saying so
    /// (the process server of its machine writes one through its host).
    #[test]
    fn an_original_given_by_its_host_is_refused_beside_the_recovery_site() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.raw");
        std::fs::write(&live, vec![0u8; 4096]).unwrap();
        let key = TenantKey::from_secret(&[7; 32]);
        let host = Path::new("qmp=/nowhere/q.sock,node=disk0,nbd=/nowhere/nbd.sock");
        let e = run(&live, host, &key, &dir.path().join("s"), &mut |_| {}).unwrap_err();
        assert!(
            matches!(e, FailoverError::Refused(_)) && e.to_string().contains("image path only"),
            "{e}"
        );
    }
}
