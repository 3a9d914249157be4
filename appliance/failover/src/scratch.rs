//! A test failover's copy-on-write scratch layer.
//!
//! Each disk's chosen point is served read-only over NBD from the repository (nothing is
//! copied, whatever the disk's size), and a qcow2 overlay whose backing file is that export
//! takes every write of the test machine. The export refuses writes (EPERM) and the overlay
//! never writes its backing file, so scratch writes cannot reach the replica; replication
//! keeps committing new points beside it. Cleanup stops the server and deletes the overlays.

use crate::{io, parent_dir, FailoverError, Result, Site};
use ferry_master_target::instant::PointExport;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

/// One disk served for a test: its NBD export name, the repository disk and the point.
#[derive(Debug, Clone)]
pub struct Served {
    pub export: String,
    pub disk: String,
    pub seq: u64,
}

/// The NBD export name of a machine's disk (names cannot hold dots, so this is unambiguous).
pub fn export_name(machine: &str, disk: &str) -> String {
    format!("{machine}.{disk}")
}

pub fn uri(port: u16, export: &str) -> String {
    format!("nbd://127.0.0.1:{port}/{export}")
}

/// Serve the points on loopback, on `port` (0: any free port, e.g. the first time; the same
/// port again after a restart, as the overlays name it). Returns the port and the server task.
pub async fn serve(
    site: &Site,
    disks: &[Served],
    port: u16,
) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let repo = site.repository()?;
    let mut exports: HashMap<String, Arc<dyn ferry_nbd::Export>> = HashMap::new();
    for d in disks {
        let reader = Arc::new(repo.reader(&d.disk, d.seq)?);
        exports.insert(d.export.clone(), Arc::new(PointExport { reader }));
    }
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(io(format!(
            "listening on 127.0.0.1:{port} for instant access"
        )))?;
    let port = listener
        .local_addr()
        .map_err(io("reading the bound address"))?
        .port();
    let cfg = Arc::new(ferry_nbd::ServerConfig {
        exports,
        tls: None,
        require_tls: false,
    });
    let task = tokio::spawn(async move {
        if let Err(e) = ferry_nbd::serve_tcp(listener, cfg).await {
            tracing::warn!(error = %e, "instant-access server for a test failover ended");
        }
    });
    Ok((port, task))
}

/// Create (or create again) the overlay at `path` over `backing` (an NBD URI), `size` bytes.
pub fn create_overlay(path: &Path, backing: &str, size: u64) -> Result<()> {
    parent_dir(path)?;
    let _ = std::fs::remove_file(path);
    // -u: the size is given, so the backing need not be opened now.
    let out = Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-F", "raw", "-u", "-b", backing,
        ])
        .arg(path)
        .arg(size.to_string())
        .output()
        .map_err(io("running qemu-img"))?;
    if !out.status.success() {
        return Err(FailoverError::Command {
            program: "qemu-img create".into(),
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Delete a test failover's scratch directory; returns how many files it held.
pub fn discard(dir: &Path) -> Result<u64> {
    if !dir.exists() {
        return Ok(0);
    }
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(io(format!("reading {}", d.display())))? {
            let e = e.map_err(io(format!("reading {}", d.display())))?;
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    std::fs::remove_dir_all(dir).map_err(io(format!("removing {}", dir.display())))?;
    Ok(n)
}
