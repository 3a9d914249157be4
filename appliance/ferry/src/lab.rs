//! A replication lab on one machine: master target and process server as real `ferry`
//! processes on loopback, with their keys, certificates, cache and repository in one directory.
//! The demo runs one; the end-to-end tests run many and kill its processes at will.

use anyhow::{bail, Context};
use ferry_process_server::DiskStatus;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Lab {
    pub dir: PathBuf,
    pub exe: PathBuf,
    pub key: PathBuf,
    pub pki: PathBuf,
    pub repo: PathBuf,
    pub cache: PathBuf,
    pub master_port: u16,
    pub nbd_port: u16,
    /// Where the process server connects to reach the master target (a test may put a proxy here).
    pub master_connect: String,
    pub disks: Vec<(String, u64)>,
    pub interval_ms: u64,
    pub journal_capacity: Option<u64>,
    pub nbd_tls: bool,
    /// Extra arguments for `ferry master-target` (retention flags, for instance).
    pub master_args: Vec<String>,
    /// `--periodic` specifications for the process server.
    pub periodic: Vec<String>,
    /// Extra arguments for `ferry process-server` (guest hooks, for instance).
    pub process_args: Vec<String>,
    /// Give the process server each continuous disk's host (the qemu-storage-daemon started in
    /// this lab's directory, node `disk0`, whose NBD server already listens on `guest.sock`),
    /// so it can resync them by checksums.
    pub host_access: bool,
    /// Every disk is in this consistency group (`--disk ...,group=NAME`).
    pub disk_group: Option<String>,
    master: Option<Child>,
    process: Option<Child>,
}

/// A free TCP port on loopback for a server about to be started (checked by binding it, then
/// released). It is chosen at random below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), never from it: a port the kernel handed out for port 0
/// is soon handed out again, as the local end of some other process's outgoing connection or
/// to another test's port-0 bind, and a server starting on it meanwhile either fails to bind
/// or, worse, the caller finds someone else's server there. No port is handed out twice by
/// one process.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10000;
    let mut given = GIVEN.lock().expect("ports lock");
    if first_ephemeral > LOW + 1000 {
        for _ in 0..256 {
            // A fresh RandomState is randomly keyed: a random number without a dependency.
            let r = std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish();
            let port = LOW + (r % u64::from(first_ephemeral - LOW)) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return Ok(port);
            }
        }
    }
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    given.push(port);
    Ok(port)
}

impl Lab {
    /// Create keys and certificates in `dir` for the given disks (name, size).
    pub fn new(exe: &Path, dir: &Path, disks: &[(&str, u64)]) -> anyhow::Result<Lab> {
        let key = dir.join("tenant.key");
        crate::write_new_key(&key)?;
        let pki = dir.join("pki");
        ferry_pki::init(&pki, &[]).context("creating certificates")?;
        let master_port = free_port()?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            exe: exe.to_path_buf(),
            key,
            pki,
            repo: dir.join("repo"),
            cache: dir.join("cache"),
            master_port,
            nbd_port: free_port()?,
            master_connect: format!("127.0.0.1:{master_port}"),
            disks: disks.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            interval_ms: 500,
            journal_capacity: None,
            nbd_tls: true,
            master_args: Vec::new(),
            periodic: Vec::new(),
            process_args: Vec::new(),
            host_access: false,
            disk_group: None,
            master: None,
            process: None,
        })
    }

    fn spawn(&self, name: &str, args: &[String]) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))?;
        Command::new(&self.exe)
            .args(args)
            .env(
                "FERRY_LOG",
                std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} {name}", self.exe.display()))
    }

    pub fn start_master(&mut self) -> anyhow::Result<()> {
        let args = vec![
            "master-target".into(),
            "--repo".into(),
            self.repo.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.master_port),
            "--pki".into(),
            self.pki.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
        ];
        let args: Vec<String> = args.into_iter().chain(self.master_args.clone()).collect();
        self.master = Some(self.spawn("master-target", &args)?);
        wait_port(self.master_port, Duration::from_secs(20))
    }

    pub fn start_process(&mut self) -> anyhow::Result<()> {
        let mut args: Vec<String> = vec![
            "process-server".into(),
            "--cache".into(),
            self.cache.display().to_string(),
            "--nbd-listen".into(),
            format!("127.0.0.1:{}", self.nbd_port),
            "--master".into(),
            self.master_connect.clone(),
            "--pki".into(),
            self.pki.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
            "--interval-ms".into(),
            self.interval_ms.to_string(),
        ];
        if self.nbd_tls {
            args.push("--nbd-tls".into());
        }
        if let Some(c) = self.journal_capacity {
            args.push("--journal-capacity".into());
            args.push(c.to_string());
        }
        for (n, s) in &self.disks {
            args.push("--disk".into());
            let mut spec = format!("{n}={s}");
            if self.host_access {
                spec += &format!(
                    ",qmp={},node=disk0,nbd={}",
                    self.dir.join(ferry_qemu::MGMT_QMP_SOCKET).display(),
                    self.dir.join("guest.sock").display()
                );
            }
            if let Some(g) = &self.disk_group {
                spec += &format!(",group={g}");
            }
            args.push(spec);
        }
        for p in &self.periodic {
            args.push("--periodic".into());
            args.push(p.clone());
        }
        args.extend(self.process_args.iter().cloned());
        self.process = Some(self.spawn("process-server", &args)?);
        wait_port(self.nbd_port, Duration::from_secs(20))
    }

    /// The running process server's process id.
    pub fn process_pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// SIGKILL the master target (no chance to clean up).
    pub fn kill_master(&mut self) {
        kill(&mut self.master);
    }

    /// SIGKILL the process server (no chance to clean up).
    pub fn kill_process(&mut self) {
        kill(&mut self.process);
    }

    pub fn status(&self, disk: &str) -> anyhow::Result<DiskStatus> {
        let p = self.cache.join(disk).join("status.json");
        ferry_process_server::status::read(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// Wait until the master target holds, as a recovery point, every write that was journaled
    /// before this call. Only a status the process server wrote after the call began counts (it
    /// refreshes it at every checkpoint tick, after syncing the journal).
    pub fn wait_caught_up(&self, disk: &str, timeout: Duration) -> anyhow::Result<DiskStatus> {
        let deadline = Instant::now() + timeout;
        let since = ferry_process_server::status::now_unix_ns();
        loop {
            if let Ok(s) = self.status(disk) {
                if s.updated_unix_ns > since && s.caught_up() {
                    return Ok(s);
                }
                if Instant::now() > deadline {
                    bail!("disk {disk} did not catch up within {timeout:?}: {s:?}");
                }
            } else if Instant::now() > deadline {
                bail!("disk {disk} has no status after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn repository(&self) -> anyhow::Result<ferry_repository::Repository> {
        ferry_repository::Repository::open_read_only(&self.repo, crate::load_key(&self.key)?)
            .context("opening the repository")
    }

    /// Run `ferry ARGS` to completion with this lab's repository and key appended, returning stdout.
    pub fn ferry(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let out = Command::new(&self.exe)
            .args(args)
            .arg("--repo")
            .arg(&self.repo)
            .arg("--key")
            .arg(&self.key)
            .output()
            .context("running ferry")?;
        Ok(out)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        kill(&mut self.process);
        kill(&mut self.master);
        if std::thread::panicking() {
            // A failing test's report shows what its roles said last.
            for name in ["master-target", "process-server"] {
                let log = self.dir.join(format!("{name}.log"));
                if let Ok(text) = std::fs::read_to_string(&log) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(40)..];
                    eprintln!("--- last {} lines of {} ---", tail.len(), log.display());
                    for l in tail {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

fn kill(c: &mut Option<Child>) {
    if let Some(mut child) = c.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Wait until something accepts connections on a loopback port.
pub fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}")
}

/// Run a command, failing with its stderr when it fails.
pub fn sh(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
