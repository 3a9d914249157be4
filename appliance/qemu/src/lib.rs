//! The hypervisor side: a QMP client and a qemu-storage-daemon that owns a disk.
//!
//! qemu-storage-daemon does to a disk what a KVM host does (mirror jobs, dirty bitmaps, NBD
//! exports) without a VM, so the demo and the tests use it as the protected host. The mirror that
//! feeds the process server is `blockdev-mirror sync=full copy-mode=write-blocking` onto an NBD
//! node; a guest's writes must enter above the mirror's filter node, so [`StorageDaemon::export`]
//! exports that node (a real VM's device sits there on its own).

pub mod fleece;
pub mod mirror;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

type Result<T> = std::result::Result<T, QemuError>;

/// A QMP connection; events that arrive while waiting for a reply are kept for [`Qmp::wait_event`]
/// (the newest [`KEPT_EVENTS`]: a long-lived connection sees events nobody waits for, such as
/// the job status changes of every periodic cut, and must not grow with them).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: std::collections::VecDeque<Value>,
}

/// Events a [`Qmp`] keeps for [`Qmp::wait_event`]; older ones are dropped first.
pub const KEPT_EVENTS: usize = 256;

impl Qmp {
    /// Connect (retrying while the socket appears), read the greeting, leave negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(QemuError::Io(format!("connect {}", path.display()), e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| QemuError::Io("socket".into(), e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| QemuError::Io("socket".into(), e))?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: std::collections::VecDeque::new(),
        };
        let greeting = q.read_line(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QemuError::Protocol(format!("no greeting: {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_line(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => return Err(QemuError::Protocol("QMP socket closed".into())),
                Ok(_) if line.ends_with('\n') => {
                    return serde_json::from_str(&line)
                        .map_err(|e| QemuError::Protocol(format!("bad JSON {line:?}: {e}")))
                }
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    if Instant::now() > deadline {
                        return Err(QemuError::Timeout("a QMP message".into()));
                    }
                }
                Err(e) => return Err(QemuError::Io("QMP read".into(), e)),
            }
        }
    }

    /// Run a command and return its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = json!({"execute": command, "arguments": arguments});
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| QemuError::Io("QMP write".into(), e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.read_line(deadline)?;
            if v.get("event").is_some() {
                self.keep_event(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = v.get("error") {
                return Err(QemuError::Command {
                    command: command.into(),
                    class: e["class"].as_str().unwrap_or("?").into(),
                    desc: e["desc"].as_str().unwrap_or("?").into(),
                });
            }
        }
    }

    fn keep_event(&mut self, v: Value) {
        if self.events.len() == KEPT_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(v);
    }

    /// Wait for an event by name (one that already arrived counts), returning it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i).expect("found"));
            }
            match self.read_line(deadline) {
                Ok(v) => self.keep_event(v),
                Err(QemuError::Timeout(_)) => return Err(QemuError::Timeout(name.into())),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A qemu-storage-daemon that owns a qcow2 or raw image as node `disk0` (or several).
pub struct StorageDaemon {
    child: Child,
    pub qmp: Qmp,
    pub dir: PathBuf,
}

/// The node a guest's writes must enter through once a mirror runs.
pub const MIRROR_FILTER: &str = "mirror-top";
pub const MIRROR_JOB: &str = "ferry-mirror";
/// The file name of the daemon's second QMP socket (in its directory), for other clients.
pub const MGMT_QMP_SOCKET: &str = "qsd-mgmt.sock";

impl StorageDaemon {
    /// Start the daemon on `image` with its QMP socket in `dir`.
    pub fn start(image: &Path, format: &str, dir: &Path) -> Result<StorageDaemon> {
        StorageDaemon::start_disks(&[(image, format)], dir)
    }

    /// The daemon of a machine with several disks: image `i` is node `disk{i}` (the mirror
    /// helpers work on `disk0`).
    pub fn start_disks(images: &[(&Path, &str)], dir: &Path) -> Result<StorageDaemon> {
        let qmp_path = dir.join("qsd-qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let log = std::fs::File::create(dir.join("qsd.log"))
            .map_err(|e| QemuError::Io("qsd.log".into(), e))?;
        let mut cmd = Command::new("qemu-storage-daemon");
        for (i, (image, format)) in images.iter().enumerate() {
            cmd.arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=file{i},filename={},cache.direct=off",
                    image.display()
                ))
                .arg("--blockdev")
                .arg(format!("driver={format},node-name=disk{i},file=file{i}"));
        }
        let child = cmd
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp_path.display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp0")
            // A second monitor for another management client (Ferry's periodic protection),
            // as a host gives one to each tool: a QMP socket serves one client at a time.
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp1,path={},server=on,wait=off",
                dir.join(MGMT_QMP_SOCKET).display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp1")
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .map_err(|e| QemuError::Io("log".into(), e))?,
            )
            .stderr(log)
            .spawn()
            .map_err(|e| QemuError::Io("starting qemu-storage-daemon".into(), e))?;
        let mut child = child;
        match Qmp::connect(&qmp_path, Duration::from_secs(10)) {
            Ok(qmp) => Ok(StorageDaemon {
                child,
                qmp,
                dir: dir.to_path_buf(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Mirror `disk0` to an NBD export (the process server), every write synchronously, and wait
    /// until the first full copy is done (`BLOCK_JOB_READY`). `tls_dir` is a QEMU x509 directory
    /// (ca-cert.pem) when the process server requires TLS.
    pub fn mirror_to_nbd(
        &mut self,
        host: &str,
        port: u16,
        export: &str,
        tls_dir: Option<&Path>,
        timeout: Duration,
    ) -> Result<()> {
        self.start_mirror_to_nbd(host, port, export, tls_dir, 0)?;
        self.qmp.wait_event("BLOCK_JOB_READY", timeout)?;
        Ok(())
    }

    /// Start the mirror of [`StorageDaemon::mirror_to_nbd`] without waiting for its first copy;
    /// `speed` limits the copy in bytes per second (0: unlimited).
    pub fn start_mirror_to_nbd(
        &mut self,
        host: &str,
        port: u16,
        export: &str,
        tls_dir: Option<&Path>,
        speed: u64,
    ) -> Result<()> {
        let mut target = json!({
            "driver": "nbd",
            "node-name": "ferry-target",
            "server": {"type": "inet", "host": host, "port": port.to_string()},
            "export": export,
            "reconnect-delay": 30,
        });
        if let Some(dir) = tls_dir {
            self.qmp.execute(
                "object-add",
                json!({"qom-type": "tls-creds-x509", "id": "ferry-tls", "dir": dir, "endpoint": "client", "verify-peer": true}),
            )?;
            target["tls-creds"] = json!("ferry-tls");
        }
        self.qmp.execute("blockdev-add", target)?;
        self.qmp.execute(
            "blockdev-mirror",
            mirror::mirror_arguments(
                MIRROR_JOB,
                "disk0",
                "ferry-target",
                "full",
                MIRROR_FILTER,
                speed,
            ),
        )?;
        Ok(())
    }

    /// Export a node writable over NBD on a unix socket (the "guest" writes through it).
    /// The NBD server may be running already (another management client, such as Ferry's
    /// resync, may have started it on the same socket).
    pub fn export(&mut self, node: &str, name: &str, socket: &Path) -> Result<()> {
        fleece::add_export(&mut self.qmp, socket, node, name, true)
    }

    /// The state of the mirror job as QEMU reports it (`ready`, `running`, `concluded`, ...).
    pub fn mirror_status(&mut self) -> Result<String> {
        let jobs = self.qmp.execute("query-block-jobs", json!({}))?;
        Ok(jobs
            .as_array()
            .and_then(|a| a.iter().find(|j| j["device"] == MIRROR_JOB))
            .and_then(|j| j["status"].as_str())
            .unwrap_or("absent")
            .to_string())
    }

    /// Stop the daemon (quit over QMP, then kill if it lingers).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A qemu-storage-daemon on a fresh 1 MiB qcow2 in a temporary directory.
    fn daemon() -> (tempfile::TempDir, StorageDaemon) {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.qcow2");
        let ok = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1M")
            .status()
            .unwrap();
        assert!(ok.success());
        let qsd = StorageDaemon::start(&img, "qcow2", d.path()).unwrap();
        (d, qsd)
    }

    #[test]
    fn storage_daemon_answers_qmp_and_reports_errors() {
        let (_dir, mut qsd) = daemon();
        let nodes = qsd
            .qmp
            .execute("query-named-block-nodes", json!({}))
            .unwrap();
        assert!(nodes.to_string().contains("disk0"));
        let err = qsd.qmp.execute("no-such-command", json!({})).unwrap_err();
        assert!(matches!(err, QemuError::Command { .. }), "{err}");
        assert_eq!(qsd.mirror_status().unwrap(), "absent");
        qsd.stop();
    }

    /// Events nobody waits for (here: one BLOCK_EXPORT_DELETED per export removed) do not pile
    /// up on a long-lived connection, and the newest can still be waited for.
    #[test]
    fn unclaimed_events_are_bounded() {
        let (d, mut qsd) = daemon();
        let sock = d.path().join("nbd.sock");
        fleece::ensure_nbd_server(&mut qsd.qmp, &sock).unwrap();
        for i in 0..KEPT_EVENTS + 64 {
            let id = format!("e{i}");
            qsd.qmp
                .execute(
                    "block-export-add",
                    json!({"type": "nbd", "id": id, "node-name": "disk0", "name": id}),
                )
                .unwrap();
            qsd.qmp
                .execute("block-export-del", json!({"id": id}))
                .unwrap();
        }
        // Let the last deletions' events arrive, then count what is kept.
        let _ = qsd.qmp.execute("query-block-exports", json!({})).unwrap();
        assert!(
            qsd.qmp.events.len() <= KEPT_EVENTS,
            "{} kept",
            qsd.qmp.events.len()
        );
        qsd.qmp
            .wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(5))
            .unwrap();
        qsd.stop();
    }
}
