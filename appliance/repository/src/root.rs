//! Checkpoint roots: the one small file whose appearance makes a recovery point exist.
//!
//! Why: a recovery point must never be visible before it is complete, and must never be
//! silently altered. So the root is written last (after `syncfs` made every chunk and page it
//! names durable), atomically (temp + fsync + rename + directory fsync), and carries a keyed MAC
//! over its contents; a root whose MAC fails, or whose file name or directory disagree with the
//! disk and sequence number inside it, is not a point.
//!
//! How: `disks/<disk>/points/<seq, 20 digits>.json`, a JSON object (see docs/formats.md) whose `mac`
//! field is `TenantKey::mac("ferry point root v1", canonical JSON of every other field)`.

use crate::map::Geometry;
use crate::store::{write_durable, Store};
use crate::{CheckpointMeta, RecoveryPoint, RepoError};
use ferry_chunk::{ChunkId, TenantKey};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

const MAC_CONTEXT: &str = "ferry point root v1";
pub(crate) const ROOT_VERSION: u32 = 1;

/// The authenticated body of a root file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RootBody {
    pub version: u32,
    pub disk: String,
    pub meta: CheckpointMeta,
    pub root_level: u8,
    pub root_page: String,
    pub changed_blocks: u64,
    pub stored_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct RootFile {
    #[serde(flatten)]
    body: RootBody,
    mac: String,
}

/// A loaded, authenticated point.
#[derive(Clone, Debug)]
pub(crate) struct PointRecord {
    pub point: RecoveryPoint,
    pub root_page: ChunkId,
    pub root_level: u8,
}

impl PointRecord {
    pub(crate) fn geometry(&self) -> Geometry {
        Geometry::new(self.point.meta.disk_size, self.point.meta.block_size)
    }

    fn body(&self) -> RootBody {
        RootBody {
            version: ROOT_VERSION,
            disk: self.point.disk.clone(),
            meta: self.point.meta.clone(),
            root_level: self.root_level,
            root_page: self.root_page.to_hex(),
            changed_blocks: self.point.changed_blocks,
            stored_bytes: self.point.stored_bytes,
        }
    }
}

fn mac_of(key: &TenantKey, body: &RootBody) -> String {
    let bytes = serde_json::to_vec(body).expect("root body serializes");
    hex::encode(key.mac(MAC_CONTEXT, &bytes))
}

pub(crate) fn points_dir(root: &Path, disk: &str) -> PathBuf {
    root.join("disks").join(disk).join("points")
}

pub(crate) fn root_path(root: &Path, disk: &str, seq: u64) -> PathBuf {
    points_dir(root, disk).join(format!("{seq:020}.json"))
}

/// Write a point's root durably; the caller has already synced its objects.
pub(crate) fn write_root(
    store: &Store,
    key: &TenantKey,
    rec: &PointRecord,
) -> Result<(), RepoError> {
    let body = rec.body();
    let file = RootFile {
        mac: mac_of(key, &body),
        body,
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("root serializes");
    let dest = root_path(store.root(), &rec.point.disk, rec.point.meta.seq);
    write_durable(store, &dest, &bytes)
}

/// Parse and authenticate a root file. The error string says why it is not a point.
/// On a MAC failure the parsed (unauthenticated) root page id is returned too, for reports.
pub(crate) fn read_root(
    key: &TenantKey,
    root: &Path,
    disk: &str,
    seq: u64,
) -> Result<PointRecord, (String, Option<ChunkId>)> {
    let path = root_path(root, disk, seq);
    let bytes = fs::read(&path).map_err(|e| (format!("cannot read root: {e}"), None))?;
    let file: RootFile =
        serde_json::from_slice(&bytes).map_err(|e| (format!("malformed root: {e}"), None))?;
    let page: Option<ChunkId> = file.body.root_page.parse().ok();
    let fail = |why: &str| (why.to_string(), page);
    if mac_of(key, &file.body) != file.mac {
        return Err(fail("root MAC does not check"));
    }
    let b = file.body;
    if b.version != ROOT_VERSION {
        return Err(fail("unsupported root version"));
    }
    if b.disk != disk || b.meta.seq != seq {
        return Err(fail("root names another disk or sequence than its file"));
    }
    if b.meta.block_size == 0 {
        return Err(fail("zero block size"));
    }
    let geo = Geometry::new(b.meta.disk_size, b.meta.block_size);
    if geo.root_level != b.root_level {
        return Err(fail("root level does not fit the disk size"));
    }
    let root_page = page.ok_or_else(|| fail("bad root page id"))?;
    Ok(PointRecord {
        point: RecoveryPoint {
            disk: b.disk,
            meta: b.meta,
            changed_blocks: b.changed_blocks,
            stored_bytes: b.stored_bytes,
        },
        root_page,
        root_level: b.root_level,
    })
}

/// The sequence numbers that have a root file (authenticated or not), ascending.
pub(crate) fn list_seqs(root: &Path, disk: &str) -> Result<Vec<u64>, RepoError> {
    let mut v = Vec::new();
    let dir = points_dir(root, disk);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(e.into()),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(s) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(seq) = s.parse() {
                v.push(seq);
            }
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Disk names that have a directory in the repository.
pub(crate) fn list_disks(root: &Path) -> Result<Vec<String>, RepoError> {
    let mut v = Vec::new();
    for e in fs::read_dir(root.join("disks"))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            if let Some(n) = e.file_name().to_str() {
                if valid_disk_name(n) {
                    v.push(n.to_string());
                }
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Disk names become directory names: a conservative character set, no dot-files.
pub(crate) fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
