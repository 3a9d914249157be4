//! Export: write a recovery point out as a disk image (for failover to a hypervisor that wants
//! a file, or to hand a disk to someone).
//!
//! Why this way: the export goes through a [`PointReader`], so every byte written was
//! authenticated, and a bad chunk aborts the export instead of producing a silently wrong image.
//! Holes stay holes (a sparse raw file), so exporting a mostly empty 2 TB disk is cheap. The image
//! appears at its final path only when complete (written as `<path>.part`, fsynced, renamed).
//! qcow2 is produced by `qemu-img convert` from a temporary raw file next to the destination.

use crate::{PointReader, RepoError, Repository};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    Qcow2,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Write the point as a sparse raw file of exactly its size.
fn write_raw(reader: &PointReader, dest: &Path) -> Result<(), RepoError> {
    let f: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dest)?;
    f.set_len(reader.size())?;
    let bs = reader.block_size() as u64;
    let blocks = reader.size().div_ceil(bs);
    for b in 0..blocks {
        if let Some(data) = reader.read_block(b)? {
            f.write_all_at(&data, b * bs)?;
        }
    }
    f.sync_all()?;
    Ok(())
}

impl Repository {
    /// Export point `seq` of `disk` to `path` (replaced atomically when complete).
    pub fn export(
        &self,
        disk: &str,
        seq: u64,
        path: &Path,
        format: ExportFormat,
    ) -> Result<(), RepoError> {
        let reader = self.reader(disk, seq)?;
        let part = with_suffix(path, ".part");
        let result = match format {
            ExportFormat::Raw => write_raw(&reader, &part),
            ExportFormat::Qcow2 => {
                let raw = with_suffix(path, ".raw.part");
                let r = write_raw(&reader, &raw).and_then(|()| {
                    let out = Command::new("qemu-img")
                        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                        .arg(&raw)
                        .arg(&part)
                        .output()
                        .map_err(|e| RepoError::Export(format!("cannot run qemu-img: {e}")))?;
                    if !out.status.success() {
                        return Err(RepoError::Export(format!(
                            "qemu-img convert failed: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )));
                    }
                    File::open(&part)?.sync_all()?;
                    Ok(())
                });
                let _ = fs::remove_file(&raw);
                r
            }
        };
        if let Err(e) = result {
            let _ = fs::remove_file(&part);
            return Err(e);
        }
        fs::rename(&part, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::store::sync_dir(dir)?;
        }
        Ok(())
    }
}
