//! Holds: recovery points that someone outside the master target is using, which retention
//! must keep (and so gc keeps their chunks) until the holder releases them.
//!
//! Why: a test failover serves a point over instant access for as long as the test runs, and a
//! failover materializes a point; the jobs that do this run in the configuration server, which
//! reaches the repository through a read-only handle while the master target (the one process
//! with the exclusive handle) keeps applying retention. A live [`crate::PointReader`] keeps its
//! point only inside its own process, and not across restarts. A hold is a file, so it works
//! across processes, survives crashes and restarts of either side, and can be listed and
//! released by an operator when its holder is gone.
//!
//! How: one file per holder, `holds/<holder>.json`, naming the points it holds (see
//! docs/formats.md). Every change of `holds/` and every retention decision happens under an
//! exclusive `flock` of `holds/.lock`, and a hold is only written after its points were found
//! (authenticated) on disk under that lock; so a point is either held before retention looks
//! at it, or already deleted and the hold refused. Files are written atomically (temp file in
//! `holds/`, fsync, rename, fsync of `holds/`); a release unlinks and fsyncs `holds/`.
//! Each file carries a keyed MAC, so a file that was not written with the tenant key (or was
//! damaged) holds nothing; it is reported and ignored.

use crate::root::{read_root, valid_disk_name};
use crate::store::sync_dir;
use crate::{RepoError, Repository};
use ferry_chunk::TenantKey;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAC_CONTEXT: &str = "ferry point hold v1";
const HOLD_VERSION: u32 = 1;
/// Longest reason: a sentence for an operator, not a document.
pub const REASON_MAX: usize = 1024;

/// One held point.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeldPoint {
    pub disk: String,
    pub seq: u64,
}

/// A holder's hold: the points it keeps from retention, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// Who holds: `[A-Za-z0-9._-]{1,128}`, not starting with `.` (it names the file).
    pub holder: String,
    /// Why, for the operator (e.g. "test failover job 7 of plan dr").
    pub reason: String,
    pub created_unix_ns: u64,
    pub points: Vec<HeldPoint>,
}

/// The authenticated body of a hold file.
#[derive(Serialize, Deserialize)]
struct HoldBody {
    version: u32,
    #[serde(flatten)]
    hold: Hold,
}

#[derive(Serialize, Deserialize)]
struct HoldFile {
    #[serde(flatten)]
    body: HoldBody,
    mac: String,
}

fn mac_of(key: &TenantKey, body: &HoldBody) -> String {
    let bytes = serde_json::to_vec(body).expect("hold body serializes");
    hex::encode(key.mac(MAC_CONTEXT, &bytes))
}

pub(crate) fn holds_dir(root: &Path) -> PathBuf {
    root.join("holds")
}

fn hold_path(root: &Path, holder: &str) -> PathBuf {
    holds_dir(root).join(format!("{holder}.json"))
}

/// The exclusive lock of `holds/`, held while the guard lives. Retention and every writer of
/// `holds/` take it; readers of the list do not need it (files appear and vanish atomically).
pub(crate) struct HoldsLock {
    _file: File,
    dir: PathBuf,
}

pub(crate) fn lock(root: &Path) -> Result<HoldsLock, RepoError> {
    let dir = holds_dir(root);
    fs::create_dir_all(&dir)?;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(io::Error::from)?;
    // Temp files are only written under this lock: any left now were left by a crash.
    for e in fs::read_dir(&dir)? {
        let e = e?;
        if e.file_name().to_str().is_some_and(|n| n.ends_with(".tmp")) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(HoldsLock { _file: file, dir })
}

/// Every authenticated hold, by holder. Files that do not authenticate are logged and ignored.
pub(crate) fn read_all(key: &TenantKey, root: &Path) -> Result<Vec<Hold>, RepoError> {
    let dir = holds_dir(root);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e?;
        let name = e.file_name();
        let Some(holder) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if !valid_disk_name(holder) {
            continue;
        }
        match read_one(key, &e.path(), holder) {
            Ok(Some(h)) => out.push(h),
            Ok(None) => {}
            Err(why) => {
                tracing::warn!(file = %e.path().display(), "ignoring a hold file: {why}");
            }
        }
    }
    out.sort_by(|a, b| a.holder.cmp(&b.holder));
    Ok(out)
}

/// `Ok(None)`: the file went away meanwhile (released).
fn read_one(key: &TenantKey, path: &Path, holder: &str) -> Result<Option<Hold>, String> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read it: {e}")),
    };
    let f: HoldFile = serde_json::from_slice(&bytes).map_err(|e| format!("malformed: {e}"))?;
    if mac_of(key, &f.body) != f.mac {
        return Err("its MAC does not check".into());
    }
    if f.body.version != HOLD_VERSION {
        return Err(format!("unsupported version {}", f.body.version));
    }
    if f.body.hold.holder != holder {
        return Err("it names another holder than its file".into());
    }
    Ok(Some(f.body.hold))
}

/// Per seq of `disk`, the holders that hold it.
pub(crate) fn held_on(holds: &[Hold], disk: &str) -> BTreeMap<u64, Vec<String>> {
    let mut m: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for h in holds {
        for p in h.points.iter().filter(|p| p.disk == disk) {
            let v = m.entry(p.seq).or_default();
            if !v.contains(&h.holder) {
                v.push(h.holder.clone());
            }
        }
    }
    m
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl HoldsLock {
    fn write(&self, key: &TenantKey, root: &Path, hold: Hold) -> Result<(), RepoError> {
        let dest = hold_path(root, &hold.holder);
        let tmp = self
            .dir
            .join(format!(".{}.{}.tmp", hold.holder, std::process::id()));
        let body = HoldBody {
            version: HOLD_VERSION,
            hold,
        };
        let file = HoldFile {
            mac: mac_of(key, &body),
            body,
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("hold serializes");
        let res = (|| -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &dest)?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(e.into());
        }
        Ok(())
    }
}

fn check_holder(holder: &str) -> Result<(), RepoError> {
    if valid_disk_name(holder) {
        Ok(())
    } else {
        Err(RepoError::Invalid(format!(
            "bad holder {holder:?}: 1 to 128 of A-Z, a-z, 0-9, '.', '_', '-', not starting with '.'"
        )))
    }
}

impl Repository {
    /// Hold `points` for `holder` (replacing what it held before): from now on retention keeps
    /// them, and gc their chunks, until [`Repository::release`]. Each point must still exist
    /// on disk (`NotFound` otherwise, and nothing changes). Works on a read-only handle too:
    /// this is how a failover beside a running master target keeps what it uses. Durable when
    /// it returns.
    pub fn hold(
        &self,
        holder: &str,
        reason: &str,
        points: &[HeldPoint],
    ) -> Result<Hold, RepoError> {
        check_holder(holder)?;
        if reason.len() > REASON_MAX || reason.chars().any(char::is_control) {
            return Err(RepoError::Invalid(format!(
                "a hold's reason is at most {REASON_MAX} bytes without control characters"
            )));
        }
        if points.is_empty() {
            return Err(RepoError::Invalid("a hold names at least one point".into()));
        }
        let mut pts = points.to_vec();
        pts.sort();
        pts.dedup();
        for p in &pts {
            if !valid_disk_name(&p.disk) {
                return Err(RepoError::Invalid(format!("bad disk name {:?}", p.disk)));
            }
        }
        let root = self.inner().store.root().to_path_buf();
        let key = &self.inner().key;
        let lock = lock(&root)?;
        for p in &pts {
            // On disk, not this handle's list: a read-only handle's list is as of its opening.
            read_root(key, &root, &p.disk, p.seq).map_err(|(why, _)| {
                RepoError::NotFound(format!("point {}@{} ({why})", p.disk, p.seq))
            })?;
        }
        let hold = Hold {
            holder: holder.to_string(),
            reason: reason.to_string(),
            created_unix_ns: now_unix_ns(),
            points: pts,
        };
        lock.write(key, &root, hold.clone())?;
        tracing::info!(holder, points = hold.points.len(), "points held");
        Ok(hold)
    }

    /// Release everything `holder` holds; false when it held nothing. Durable when it returns.
    /// Works on a read-only handle too.
    pub fn release(&self, holder: &str) -> Result<bool, RepoError> {
        check_holder(holder)?;
        let root = self.inner().store.root();
        let path = hold_path(root, holder);
        if !path.exists() {
            return Ok(false);
        }
        let lock = lock(root)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&lock.dir)?;
                tracing::info!(holder, "hold released");
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every hold, by holder. A file that does not authenticate is ignored (and logged).
    pub fn holds(&self) -> Result<Vec<Hold>, RepoError> {
        read_all(&self.inner().key, self.inner().store.root())
    }

    /// Per point of `disk` (seq), the holders that keep it.
    pub fn holders(&self, disk: &str) -> Result<BTreeMap<u64, Vec<String>>, RepoError> {
        Ok(held_on(&self.holds()?, disk))
    }
}
