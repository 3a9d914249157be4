//! A failover's live disks: the chosen point written out whole at the recovery site.

use crate::{parent_dir, Result, Site};
use ferry_repository::ExportFormat;
use std::path::Path;

/// Write point `seq` of `disk` to `path` as a raw image. The repository writes a `.part` file
/// and renames it, so a crash leaves either no disk or a whole one, and running again is safe.
pub fn materialize(site: &Site, disk: &str, seq: u64, path: &Path) -> Result<()> {
    parent_dir(path)?;
    site.repository()?
        .export(disk, seq, path, ExportFormat::Raw)?;
    Ok(())
}
