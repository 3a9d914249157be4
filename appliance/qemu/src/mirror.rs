//! Stopping and restarting a running mirror job around a change QEMU refuses while it runs.
//!
//! QEMU cannot resize a node while a mirror job uses it ("Device is in use"), and an NBD target
//! node cannot grow at all: it learns its size when it connects. So growing a mirrored disk is:
//! note how the mirror is set up ([`setup`]), end it ([`cancel`]), resize the node, delete and
//! re-add the target node with the same connection parameters so it connects again and sees the
//! larger export, and start the mirror again with the same job id and filter node name
//! ([`restart`], `sync=none`: the target already holds the disk; what changed meanwhile must be
//! sent by other means).

use crate::{QemuError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

/// How a mirror job is set up, enough to start it again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MirrorSetup {
    pub job_id: String,
    /// The node the mirror copies (the disk).
    pub source: String,
    /// The mirror's filter node, where a guest's writes enter while the job runs.
    pub filter: String,
    /// The target node's name.
    pub target: String,
    /// `blockdev-add` arguments that connect the target again (from its filename).
    pub target_options: Value,
}

/// The arguments of `blockdev-mirror` for Ferry's continuous capture: every guest write is
/// copied synchronously (`copy-mode=write-blocking`); the job waits for `job-finalize` and
/// `job-dismiss`, so its end is seen and handled, not missed.
pub fn mirror_arguments(
    job_id: &str,
    device: &str,
    target: &str,
    sync: &str,
    filter: &str,
    speed: u64,
) -> Value {
    json!({
        "job-id": job_id, "device": device, "target": target,
        "sync": sync, "copy-mode": "write-blocking", "speed": speed,
        "filter-node-name": filter, "auto-finalize": false, "auto-dismiss": false,
    })
}

/// The mirror job `job_id`'s source, filter and target nodes, and how its target connects.
pub fn setup(qmp: &mut crate::Qmp, job_id: &str) -> Result<MirrorSetup> {
    let graph = qmp.execute("x-debug-query-block-graph", json!({}))?;
    let (source, filter, target) = job_nodes(&graph, job_id)
        .ok_or_else(|| QemuError::Protocol(format!("no nodes of mirror job {job_id}")))?;
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true}))?;
    let filename = nodes
        .as_array()
        .and_then(|a| a.iter().find(|n| n["node-name"] == target.as_str()))
        .and_then(|n| n["file"].as_str())
        .ok_or_else(|| QemuError::Protocol(format!("no filename for target node {target}")))?;
    let target_options = target_options(filename, &target).ok_or_else(|| {
        QemuError::Protocol(format!(
            "cannot tell how target node {target} connects from {filename:?}"
        ))
    })?;
    Ok(MirrorSetup {
        job_id: job_id.to_string(),
        source,
        filter,
        target,
        target_options,
    })
}

/// The host's TLS client credentials objects (`tls-creds-*` with `endpoint=client`), by id.
pub fn client_tls_creds(qmp: &mut crate::Qmp) -> Result<Vec<String>> {
    let objects = qmp.execute("qom-list", json!({"path": "/objects"}))?;
    let mut out = Vec::new();
    for o in objects.as_array().into_iter().flatten() {
        let (Some(name), Some(ty)) = (o["name"].as_str(), o["type"].as_str()) else {
            continue;
        };
        if !ty.starts_with("child<tls-creds") {
            continue;
        }
        let endpoint = qmp.execute(
            "qom-get",
            json!({"path": format!("/objects/{name}"), "property": "endpoint"}),
        )?;
        if endpoint == "client" {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// (source, filter, target) node names of a block job in `x-debug-query-block-graph`'s answer:
/// the job's edges are named `source`, `main node` (the filter) and `target`.
pub fn job_nodes(graph: &Value, job_id: &str) -> Option<(String, String, String)> {
    let nodes = graph["nodes"].as_array()?;
    let job = nodes
        .iter()
        .find(|n| n["type"] == "block-job" && n["name"] == job_id)?["id"]
        .as_u64()?;
    let child = |edge: &str| -> Option<String> {
        let id = graph["edges"]
            .as_array()?
            .iter()
            .find(|e| e["parent"].as_u64() == Some(job) && e["name"] == edge)?["child"]
            .as_u64()?;
        let name = nodes.iter().find(|n| n["id"].as_u64() == Some(id))?["name"].as_str()?;
        (!name.is_empty()).then(|| name.to_string())
    };
    Some((child("source")?, child("main node")?, child("target")?))
}

/// `blockdev-add` arguments for an NBD node named `node` from its filename as QEMU shows it:
/// `nbd+unix:///EXPORT?socket=PATH`, `nbd://HOST:PORT/EXPORT` (`nbd+tcp://` too) or
/// `json:{...}` (QEMU's description when options such as `tls-creds` matter).
pub fn target_options(filename: &str, node: &str) -> Option<Value> {
    let mut opts = if let Some(j) = filename.strip_prefix("json:") {
        let v: Value = serde_json::from_str(j).ok()?;
        unflatten(v.as_object()?)
    } else if let Some(rest) = filename.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once("?socket=")?;
        let export = path.strip_prefix('/').unwrap_or(path);
        let mut o = Map::new();
        o.insert("server".into(), json!({"type": "unix", "path": query}));
        if !export.is_empty() {
            o.insert("export".into(), json!(export));
        }
        o
    } else {
        let rest = filename
            .strip_prefix("nbd://")
            .or_else(|| filename.strip_prefix("nbd+tcp://"))?;
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.strip_prefix('[') {
            // [v6-address]:port
            Some(v6) => match v6.split_once(']') {
                Some((h, p)) => (h, p.strip_prefix(':').unwrap_or("")),
                None => (v6, ""),
            },
            None => hostport.rsplit_once(':').unwrap_or((hostport, "")),
        };
        let port = if port.is_empty() { "10809" } else { port };
        let mut o = Map::new();
        o.insert(
            "server".into(),
            json!({"type": "inet", "host": host, "port": port}),
        );
        if !export.is_empty() {
            o.insert("export".into(), json!(export));
        }
        o
    };
    if opts.get("driver").is_some_and(|d| d != "nbd") || opts.get("server").is_none() {
        return None;
    }
    opts.insert("driver".into(), json!("nbd"));
    opts.insert("node-name".into(), json!(node));
    // Not part of QEMU's description; the value Ferry's own mirrors use.
    opts.entry("reconnect-delay").or_insert(json!(30));
    Some(Value::Object(opts))
}

/// `{"server.type": "unix", ...}` to `{"server": {"type": "unix"}, ...}`.
fn unflatten(m: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in m {
        let v = match v {
            Value::Object(o) => Value::Object(unflatten(o)),
            v => v.clone(),
        };
        let mut parts: Vec<&str> = k.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut at = &mut out;
        for p in parts {
            at = at
                .entry(p.to_string())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("an object");
        }
        at.insert(last.to_string(), v);
    }
    out
}

/// The status of job `id` (`None` once it is gone).
fn job_status(qmp: &mut crate::Qmp, id: &str) -> Result<Option<String>> {
    Ok(job(qmp, id)?.and_then(|j| j["status"].as_str().map(str::to_string)))
}

fn job(qmp: &mut crate::Qmp, id: &str) -> Result<Option<Value>> {
    let jobs = qmp.execute("query-jobs", json!({}))?;
    Ok(jobs
        .as_array()
        .and_then(|a| a.iter().find(|j| j["id"] == id))
        .cloned())
}

/// End mirror job `id`: cancel it (a ready mirror's target is then consistent), finalize it
/// when it waits to be, and dismiss it, within `timeout`.
pub fn cancel(qmp: &mut crate::Qmp, id: &str, timeout: Duration) -> Result<()> {
    qmp.execute("block-job-cancel", json!({"device": id}))?;
    let deadline = Instant::now() + timeout;
    loop {
        match job_status(qmp, id)?.as_deref() {
            None => return Ok(()),
            Some("pending") => {
                qmp.execute("job-finalize", json!({"id": id}))?;
            }
            Some("concluded") => {
                qmp.execute("job-dismiss", json!({"id": id}))?;
            }
            Some(_) => {}
        }
        if Instant::now() > deadline {
            return Err(QemuError::Timeout(format!("the end of job {id}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Start the mirror `s` describes again, its target reconnected (a node of that name left
/// over is deleted first, so the new connection sees the export's size now); `sync=none`:
/// only writes from now on are copied. Waits until the job is ready.
pub fn restart(qmp: &mut crate::Qmp, s: &MirrorSetup, timeout: Duration) -> Result<()> {
    match qmp.execute("blockdev-del", json!({"node-name": s.target})) {
        Ok(_) => {}
        Err(QemuError::Command { desc, .. })
            if desc.contains("Failed to find") || desc.contains("Cannot find") => {}
        Err(e) => return Err(e),
    }
    qmp.execute("blockdev-add", s.target_options.clone())?;
    qmp.execute(
        "blockdev-mirror",
        mirror_arguments(&s.job_id, &s.source, &s.target, "none", &s.filter, 0),
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        match job_status(qmp, &s.job_id)?.as_deref() {
            Some("ready") => return Ok(()),
            Some("running" | "created" | "aborting") => {}
            other => {
                // A job that failed waits to be dismissed: it goes, so that a retry finds no
                // mirror rather than a dead one.
                let why = job(qmp, &s.job_id)?
                    .and_then(|j| j["error"].as_str().map(str::to_string))
                    .unwrap_or_default();
                if other == Some("concluded") {
                    let _ = qmp.execute("job-dismiss", json!({"id": s.job_id}));
                }
                return Err(QemuError::Protocol(format!(
                    "mirror job {} is {other:?} instead of ready: {why}",
                    s.job_id
                )));
            }
        }
        if Instant::now() > deadline {
            return Err(QemuError::Timeout(format!("mirror job {} ready", s.job_id)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_reconnects_as_its_filename_says() {
        assert_eq!(
            target_options("nbd+unix:///disk0?socket=/run/ps.sock", "t").unwrap(),
            json!({"driver": "nbd", "node-name": "t", "export": "disk0",
                   "server": {"type": "unix", "path": "/run/ps.sock"}, "reconnect-delay": 30})
        );
        assert_eq!(
            target_options("nbd://10.0.0.5:10809/vm1-d0", "t").unwrap(),
            json!({"driver": "nbd", "node-name": "t", "export": "vm1-d0",
                   "server": {"type": "inet", "host": "10.0.0.5", "port": "10809"}, "reconnect-delay": 30})
        );
        let tls = r#"json:{"driver": "nbd", "export": "d", "server.host": "127.0.0.1", "server.port": "4000", "server.type": "inet", "tls-creds": "ferry-tls"}"#;
        assert_eq!(
            target_options(tls, "ferry-target").unwrap(),
            json!({"driver": "nbd", "node-name": "ferry-target", "export": "d", "tls-creds": "ferry-tls",
                   "server": {"type": "inet", "host": "127.0.0.1", "port": "4000"}, "reconnect-delay": 30})
        );
        assert!(target_options("/var/lib/disk.qcow2", "t").is_none());
        assert!(target_options(r#"json:{"driver": "file", "filename": "x"}"#, "t").is_none());
    }

    #[test]
    fn a_jobs_nodes_are_found_in_the_block_graph() {
        let graph = json!({
            "nodes": [
                {"id": 5, "type": "block-driver", "name": "mirror-top"},
                {"id": 2, "type": "block-driver", "name": "ferry-target"},
                {"id": 4, "type": "block-driver", "name": "disk0"},
                {"id": 3, "type": "block-job", "name": "ferry-mirror"},
                {"id": 1, "type": "block-backend", "name": ""}
            ],
            "edges": [
                {"name": "backing", "parent": 5, "child": 4},
                {"name": "main node", "parent": 3, "child": 5},
                {"name": "source", "parent": 3, "child": 4},
                {"name": "target", "parent": 3, "child": 2},
                {"name": "root", "parent": 1, "child": 2}
            ]
        });
        assert_eq!(
            job_nodes(&graph, "ferry-mirror"),
            Some(("disk0".into(), "mirror-top".into(), "ferry-target".into()))
        );
        assert_eq!(job_nodes(&graph, "other"), None);
    }
}
