//! Point-in-time views of a running disk and the dirty bitmaps that say what changed.
//!
//! Periodic protection works like this on the host's QEMU, all over QMP: the disk carries a
//! persistent dirty bitmap that records every write. At each interval one `transaction`
//! atomically (a) adds a fresh recording bitmap, (b) disables the old one, and (c) starts a
//! `blockdev-backup sync=none` job into a temporary qcow2 whose backing is the disk, which copies
//! old data aside before the guest overwrites it (copy-before-write). The temporary node is then
//! a frozen image of the disk at that instant ("fleecing"); it is exported over NBD together with
//! the old bitmap, so the process server reads exactly the blocks that changed, as they were at
//! the instant of the cut, while the guest keeps writing. Afterwards the job is cancelled and the
//! nodes removed. The fleece file lives on the host (QMP `blockdev-create` makes it there).

use crate::{QemuError, Qmp};
use serde_json::{json, Value};
use std::time::Duration;

type Result<T> = std::result::Result<T, QemuError>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    pub recording: bool,
    pub persistent: bool,
    /// Left in use by a QEMU that died: its content cannot be trusted.
    pub inconsistent: bool,
    pub granularity: u64,
    pub count: u64,
}

/// The dirty bitmaps on `node`.
pub fn bitmaps(qmp: &mut Qmp, node: &str) -> Result<Vec<Bitmap>> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let n = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .ok_or_else(|| QemuError::Protocol(format!("no block node named {node}")))?;
    let list = n["dirty-bitmaps"].as_array().cloned().unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|b| {
            Some(Bitmap {
                name: b["name"].as_str()?.to_string(),
                recording: b["recording"].as_bool().unwrap_or(false),
                persistent: b["persistent"].as_bool().unwrap_or(false),
                inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                granularity: b["granularity"].as_u64().unwrap_or(0),
                count: b["count"].as_u64().unwrap_or(0),
            })
        })
        .collect())
}

/// The virtual size of the disk on `node`, as QEMU sees it now.
pub fn node_size(qmp: &mut Qmp, node: &str) -> Result<u64> {
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == node))
        .and_then(|n| n["image"]["virtual-size"].as_u64())
        .ok_or_else(|| QemuError::Protocol(format!("no size for block node {node}")))
}

/// Start QEMU's NBD server on a unix socket; an already running one is fine.
pub fn ensure_nbd_server(qmp: &mut Qmp, socket: &std::path::Path) -> Result<()> {
    match qmp.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket}}}),
    ) {
        Ok(_) => Ok(()),
        Err(QemuError::Command { desc, .. }) if desc.contains("already running") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Export `node` over the host's NBD server as `id` (its NBD export name too), writable or
/// not, starting the server on the unix socket `socket` when it is not running. An export of
/// that id left by an interrupted user (a resync whose process died) is replaced.
pub fn add_export(
    qmp: &mut Qmp,
    socket: &std::path::Path,
    node: &str,
    id: &str,
    writable: bool,
) -> Result<()> {
    ensure_nbd_server(qmp, socket)?;
    remove_export(qmp, id)?;
    qmp.execute(
        "block-export-add",
        json!({"type": "nbd", "id": id, "node-name": node, "name": id, "writable": writable}),
    )?;
    Ok(())
}

/// Remove the export `id`, dropping its clients' connections (`mode: hard`), and wait (10 s at
/// most) until QEMU says it is gone. False: there was no such export.
pub fn remove_export(qmp: &mut Qmp, id: &str) -> Result<bool> {
    if !export_ids(qmp)?.iter().any(|e| e == id) {
        return Ok(false);
    }
    qmp.execute("block-export-del", json!({"id": id, "mode": "hard"}))?;
    // Deleted once its last connection is gone: asynchronously, so ask until it is.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while export_ids(qmp)?.iter().any(|e| e == id) {
        if std::time::Instant::now() > deadline {
            return Err(QemuError::Timeout(format!("the removal of export {id}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// The ids of the host's block exports (`query-block-exports`).
pub fn export_ids(qmp: &mut Qmp) -> Result<Vec<String>> {
    let v = qmp.execute("query-block-exports", json!({}))?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn run_job(qmp: &mut Qmp, job: &str, command: &str, args: Value) -> Result<()> {
    qmp.execute(command, args)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = qmp.execute("query-jobs", json!({}))?;
        let j = jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["id"] == job).cloned());
        match j {
            Some(j) if j["status"] == "concluded" => {
                qmp.execute("job-dismiss", json!({"id": job}))?;
                if let Some(e) = j["error"].as_str() {
                    return Err(QemuError::Protocol(format!("{command}: {e}")));
                }
                return Ok(());
            }
            Some(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Some(_) => return Err(QemuError::Timeout(format!("job {job}"))),
            None => return Ok(()),
        }
    }
}

/// A frozen view of a disk, exported over NBD.
#[derive(Clone, Debug)]
pub struct Fleece {
    pub node: String,
    pub file_node: String,
    pub job: String,
    /// The NBD export name of the view.
    pub export: String,
}

/// What one cut does to the bitmaps, atomically with freezing the view.
pub struct Cut<'a> {
    /// The disk's node.
    pub node: &'a str,
    pub size: u64,
    /// Where the host keeps the temporary qcow2 of old data.
    pub fleece_file: &'a str,
    /// A new recording bitmap to add (persistent).
    pub add: Option<&'a str>,
    /// The recording bitmap to freeze.
    pub disable: Option<&'a str>,
    /// Bitmap to export with the view (`qemu:dirty-bitmap:NAME`).
    pub export_bitmap: Option<&'a str>,
    pub export: &'a str,
}

/// Freeze a view of the disk and rotate bitmaps in one transaction, then export the view.
pub fn cut(qmp: &mut Qmp, c: &Cut<'_>) -> Result<Fleece> {
    let mut views = cut_many(qmp, std::slice::from_ref(c))?;
    Ok(views.remove(0))
}

/// Freeze views of several disks of one host at one instant: every disk's bitmap rotation and
/// copy-before-write start are actions of ONE transaction, which QEMU applies with the guest's
/// requests drained, so the views together are one crash-consistent state of the disks (what a
/// multi-disk machine needs). Then export each view. On failure nothing is left behind.
pub fn cut_many(qmp: &mut Qmp, cuts: &[Cut<'_>]) -> Result<Vec<Fleece>> {
    let mut views: Vec<Fleece> = Vec::new();
    let undo = |qmp: &mut Qmp, views: &[Fleece]| {
        for f in views {
            let _ = qmp.execute("blockdev-del", json!({"node-name": f.node}));
            let _ = qmp.execute("blockdev-del", json!({"node-name": f.file_node}));
        }
    };
    let mut actions = Vec::new();
    for c in cuts {
        let f = Fleece {
            node: c.export.to_string(),
            file_node: format!("{}-file", c.export),
            job: c.export.to_string(),
            export: c.export.to_string(),
        };
        if let Err(e) = scratch(qmp, c, &f) {
            undo(qmp, &views);
            let _ = qmp.execute("blockdev-del", json!({"node-name": f.file_node}));
            return Err(e);
        }
        views.push(f);
        if let Some(b) = c.add {
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {"node": c.node, "name": b, "persistent": true}}));
        }
        if let Some(b) = c.disable {
            actions.push(
                json!({"type": "block-dirty-bitmap-disable", "data": {"node": c.node, "name": b}}),
            );
        }
        actions.push(json!({"type": "blockdev-backup", "data": {"job-id": c.export, "device": c.node, "target": c.export, "sync": "none", "auto-dismiss": true}}));
    }
    if let Err(e) = qmp.execute("transaction", json!({"actions": actions})) {
        undo(qmp, &views);
        return Err(e);
    }
    for (i, c) in cuts.iter().enumerate() {
        let mut export =
            json!({"type": "nbd", "id": c.export, "node-name": c.export, "name": c.export});
        if let Some(b) = c.export_bitmap {
            export["bitmaps"] = json!([b]);
        }
        if let Err(e) = qmp.execute("block-export-add", export) {
            for (j, f) in views.iter().enumerate() {
                if j < i {
                    release(qmp, f);
                } else {
                    // Not exported: cancel its job and drop its nodes.
                    let _ =
                        qmp.execute("block-job-cancel", json!({"device": f.job, "force": true}));
                    let _ = qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(10));
                    let _ = qmp.execute("blockdev-del", json!({"node-name": f.node}));
                    let _ = qmp.execute("blockdev-del", json!({"node-name": f.file_node}));
                }
            }
            return Err(e);
        }
    }
    Ok(views)
}

/// The view's scratch image: a qcow2 in `fleece_file` backed by the disk, added as a node.
fn scratch(qmp: &mut Qmp, c: &Cut<'_>, f: &Fleece) -> Result<()> {
    run_job(
        qmp,
        &format!("{}-mkfile", f.job),
        "blockdev-create",
        json!({"job-id": format!("{}-mkfile", f.job), "options": {"driver": "file", "filename": c.fleece_file, "size": 0}}),
    )?;
    qmp.execute(
        "blockdev-add",
        json!({"driver": "file", "node-name": f.file_node, "filename": c.fleece_file}),
    )?;
    run_job(
        qmp,
        &format!("{}-mkqcow2", f.job),
        "blockdev-create",
        json!({"job-id": format!("{}-mkqcow2", f.job), "options": {"driver": "qcow2", "file": f.file_node, "size": c.size}}),
    )?;
    qmp.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": f.node, "file": f.file_node, "backing": c.node}),
    )?;
    Ok(())
}

/// Tear a view down: export, copy-before-write job, nodes. Best effort, each step bounded.
pub fn release(qmp: &mut Qmp, f: &Fleece) {
    if qmp
        .execute("block-export-del", json!({"id": f.export}))
        .is_ok()
    {
        let _ = qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
    }
    if qmp
        .execute("block-job-cancel", json!({"device": f.job, "force": true}))
        .is_ok()
    {
        let _ = qmp.wait_event("BLOCK_JOB_CANCELLED", Duration::from_secs(10));
    }
    let _ = qmp.execute("blockdev-del", json!({"node-name": f.node}));
    let _ = qmp.execute("blockdev-del", json!({"node-name": f.file_node}));
}

/// Merge `from` into `into` and drop `from` (a failed interval's changes go back into the pool).
pub fn merge_into(qmp: &mut Qmp, node: &str, into: &str, from: &str) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-merge",
        json!({"node": node, "target": into, "bitmaps": [from]}),
    )?;
    remove(qmp, node, from)
}

pub fn remove(qmp: &mut Qmp, node: &str, name: &str) -> Result<()> {
    qmp.execute(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": name}),
    )
    .map(|_| ())
}
