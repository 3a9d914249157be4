//! Failover jobs end to end (issue 4): a real configuration server drives a real recovery site
//! (the master target's repository, the process server's journals) while qemu-storage-daemon
//! plays two disks of one protected machine and keeps writing.
//!
//! - A test failover gives each disk a copy-on-write scratch layer over its point's instant
//!   access export: scratch writes never reach the replica, replication keeps committing new
//!   points, and cleanup leaves nothing behind. A viewer may not start it, an operator may, and
//!   an operator may not change a policy; all of it is audited.
//! - With no access to the recovery site's paths, the configuration server orders the steps
//!   from the master target (and a planned failover's drain check from the process server);
//!   a stopped master target fails the step, naming it.
//! - A planned failover loses nothing; reprotect sends back only what the recovery site
//!   changed (split between the sites: the process server opens the original disk and fetches
//!   from the master target only the blocks whose names differ; the configuration server only
//!   orders it), and failback leaves the original disks equal to the recovery site's, then
//!   protects them again towards the recovery site: the process server drops the
//!   pre-failover journal and sends only what the machine wrote there (its checksum resync)
//!   into a new point equal to the original disk, and the machine's next writes at the
//!   protected site reach newer points.
//! - The resync runs at the protected site: with the original disks' directories hidden from
//!   the master target's process (a mount namespace of its own), reprotect and failback still
//!   bring them up to date; a live disk of another size fails the step saying so; over a slow
//!   link, the process server killed in the middle of a resync runs the order again when it
//!   comes back and sends only what still differs, and the master target killed in the middle
//!   fails the step (the plan keeps its phase) until the job is run again.
//! - The configuration server killed in the middle of a job (its roles enrolled, running the
//!   site steps): a step that may run again resumes; one that may not ends the job failed,
//!   saying which step and what was done. An order in flight is sent again and run once.
//! - Retention at the master target never takes a point a test failover serves (nor its
//!   chunks): the point is held until cleanup, then retention removes it. A master target
//!   started again serves the test's points again.
//! - A role forgets the answers of orders whose jobs ended, but for the one that serves a
//!   running test failover, from which it serves it again after a restart.
//! - The machine's two disks are one consistency group: one guest writes to both, each write
//!   issued after the one before was acknowledged, and at every cut the two disks' points
//!   together hold exactly the first N writes for one N; a failover uses such a cut.

#[path = "support/config_server.rs"]
mod harness;
mod support;

use ferry::lab::{sh, wait_port, Lab};
use ferry_api::{
    AuditResult, Job, JobState, PlanPhase, PlanStatus, ResyncReport, StepState, TokenCreated,
};
use ferry_config_server::client::{Client, Method};
use ferry_qemu::{StorageDaemon, MIRROR_FILTER, MIRROR_JOB};
use ferry_repository::HeldPoint;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;
const DISKS: [&str; 2] = ["d0", "d1"];
const JOBS: &str = "/v1/tenants/acme/plans/dr/jobs";
/// A step's progress as the job API shows it: done, total, detail.
type Progress = (u64, u64, String);
/// Every wait in these tests ends by this much after the test began.
const DEADLINE: Duration = Duration::from_secs(300);

/// A protected machine with two disks, its replication, and a configuration server that
/// drives the recovery site.
struct Dr {
    /// Roles enrolled with tokens and configured by the configuration server (`start_enrolled`),
    /// stopped when the test ends; empty when the lab started them with local configuration.
    roles: Vec<support::Kill>,
    hosts: Vec<Option<StorageDaemon>>,
    images: Vec<PathBuf>,
    socks: Vec<PathBuf>,
    lab: Lab,
    server: Option<harness::Server>,
    server_args: Vec<String>,
    rt: tokio::runtime::Runtime,
    began: Instant,
    dir: tempfile::TempDir,
    /// Where the recovery site keeps scratch overlays and live disks.
    work: PathBuf,
    /// The enrolled master target's and process server's command lines (`roles[0]` and
    /// `roles[1]`); empty for the lab's.
    mt_args: Vec<String>,
    ps_args: Vec<String>,
    /// Directories the master target's process cannot see (an empty tmpfs is laid over each
    /// in a mount namespace of its own); none: it sees what the test sees.
    hidden_from_master: Vec<PathBuf>,
    /// The link between the process server and the master target, when the master target
    /// advertises this proxy's address.
    link: Option<support::proxy::Proxy>,
}

impl Dr {
    /// A configuration server that drives the recovery site of `lab` through the enrolled
    /// roles, with no access to any of the site's paths. No guest disks yet.
    fn around(began: Instant, dir: tempfile::TempDir, lab: Lab, order_timeout_secs: u64) -> Dr {
        // A fixed port: the roles find a restarted server where they were told it is.
        let server_args: Vec<String> = vec![
            "--order-timeout-secs".into(),
            order_timeout_secs.to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", ferry::lab::free_port().unwrap()),
        ];
        // The master target keeps its work below its state directory.
        let work = dir.path().join("mt-state/work");
        let server = harness::Server::start_with(&dir.path().join("cs"), &server_args);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Dr {
            roles: Vec::new(),
            hosts: Vec::new(),
            images: Vec::new(),
            socks: Vec::new(),
            lab,
            server: Some(server),
            server_args,
            rt,
            began,
            dir,
            work,
            mt_args: Vec::new(),
            ps_args: Vec::new(),
            hidden_from_master: Vec::new(),
            link: None,
        }
    }

    /// The same machine, but its master target and process server are appliances enrolled
    /// with one-time tokens: started with only the configuration server's address, a token and
    /// the CA's hash, they take their disks, keys and certificates from it.
    fn start_enrolled() -> Dr {
        Dr::start_enrolled_with(None, &[])
    }

    /// [`Dr::start_enrolled`] with machine `web` on `policy` (instead of the harness's) and
    /// `master_args` added to the master target's command line.
    fn start_enrolled_with(policy: Option<Value>, master_args: &[&str]) -> Dr {
        Dr::start_enrolled_full(policy, master_args, 60)
    }

    /// [`Dr::start_enrolled_with`], the configuration server waiting `order_timeout_secs` for
    /// a role to fetch a step order.
    fn start_enrolled_full(
        policy: Option<Value>,
        master_args: &[&str],
        order_timeout_secs: u64,
    ) -> Dr {
        Dr::start_enrolled_opts(policy, master_args, order_timeout_secs, false, false)
    }

    /// [`Dr::start_enrolled`] with two sites apart: the master target's process cannot see the
    /// host's directories (where the original disks are), and the process server reaches it
    /// through a proxy the test can slow down ([`Dr::link`]).
    fn start_enrolled_apart() -> Dr {
        Dr::start_enrolled_opts(None, &[], 60, true, false)
    }

    /// [`Dr::start_enrolled`] with each disk's `source` in the host form ([`host_source`]):
    /// the process server is given the disk's host, and reprotect and failback write the
    /// original disk through it.
    fn start_enrolled_host_form() -> Dr {
        Dr::start_enrolled_opts(None, &[], 60, false, true)
    }

    fn start_enrolled_opts(
        policy: Option<Value>,
        master_args: &[&str],
        order_timeout_secs: u64,
        apart: bool,
        host_form: bool,
    ) -> Dr {
        let began = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("ferry-failover-")
            .tempdir()
            .unwrap();
        let d = dir.path().to_path_buf();
        // The lab only names ports and paths here.
        let mut lab = Lab::new(&support::exe(), &d, &[]).unwrap();
        lab.key = d.join("mt-state/tenant.key");
        let mut dr = Dr::around(began, dir, lab, order_timeout_secs);
        dr.inventory(host_form);
        if let Some(p) = policy {
            let a = dr.admin();
            dr.ok(&a, Method::PUT, "/v1/tenants/acme/policies/gold", Some(p));
        }
        let s = |v: &str| v.to_string();
        let token = |name: &str, role: &str| -> TokenCreated {
            serde_json::from_value(dr.ok(
                &dr.admin(),
                Method::POST,
                "/v1/tokens",
                Some(json!({"name": name, "role": "operator", "tenant": "acme",
                            "appliance": role, "ttl_secs": 600})),
            ))
            .unwrap()
        };
        let role = |t: &TokenCreated, state: &str| {
            vec![
                s("--config-server"),
                dr.server().url.clone(),
                s("--token"),
                t.token.clone(),
                s("--ca-sha256"),
                t.ca_sha256.clone(),
                s("--state"),
                d.join(state).display().to_string(),
                s("--config-poll-secs"),
                s("1"),
            ]
        };
        let (mt, ps) = (
            token("mt1", "master-target"),
            token("ps1", "process-server"),
        );
        let mut mt_args = vec![
            s("master-target"),
            s("--repo"),
            dr.lab.repo.display().to_string(),
            s("--listen"),
            format!("127.0.0.1:{}", dr.lab.master_port),
        ];
        mt_args.extend(master_args.iter().map(|a| s(a)));
        let (mut link, mut hidden) = (None, Vec::new());
        if apart {
            let proxy = dr.rt.block_on(support::proxy::Proxy::start(format!(
                "127.0.0.1:{}",
                dr.lab.master_port
            )));
            // Process servers dial what the master target advertises.
            mt_args.extend([s("--advertise"), format!("127.0.0.1:{}", proxy.port)]);
            link = Some(proxy);
            for disk in DISKS {
                let h = host_image(&d, disk).parent().unwrap().to_path_buf();
                std::fs::create_dir_all(&h).unwrap();
                hidden.push(h);
            }
        }
        mt_args.extend(role(&mt, "mt-state"));
        let mut ps_args = vec![
            s("process-server"),
            s("--cache"),
            dr.lab.cache.display().to_string(),
            s("--nbd-listen"),
            format!("127.0.0.1:{}", dr.lab.nbd_port),
            s("--interval-ms"),
            s("200"),
        ];
        ps_args.extend(role(&ps, "ps-state"));
        (dr.link, dr.hidden_from_master) = (link, hidden);
        dr.mt_args = mt_args;
        let master = dr.spawn_master();
        dr.roles.push(master);
        wait_port(dr.lab.master_port, Duration::from_secs(30)).unwrap();
        dr.roles
            .push(support::Kill::spawn(&d, "process-server", &ps_args));
        dr.ps_args = ps_args;
        wait_port(dr.lab.nbd_port, Duration::from_secs(30)).unwrap();
        dr.attach_hosts();
        dr
    }

    /// The machine's disks on their host, mirrored to the process server.
    fn attach_hosts(&mut self) {
        for (i, disk) in DISKS.iter().enumerate() {
            let (q, image, sock) = host_disk(self.dir.path(), disk, i, self.lab.nbd_port);
            self.hosts.push(Some(q));
            self.images.push(image);
            self.socks.push(sock);
        }
    }

    fn server(&self) -> &harness::Server {
        self.server.as_ref().unwrap()
    }

    fn admin(&self) -> Client {
        self.server().admin()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn ok(&self, c: &Client, m: Method, path: &str, body: Option<Value>) -> Value {
        self.rt.block_on(harness::ok(c, m, path, body))
    }

    /// Tenant acme's protected machine `web` (disks d0 and d1, each with its image on the host
    /// as its source: what reprotect and failback write; or, `host_form`, the disk on its host)
    /// and its plan `dr`.
    fn inventory(&self, host_form: bool) {
        let a = self.admin();
        let post = |path: &str, body: Value| self.ok(&a, Method::POST, path, Some(body));
        post("/v1/tenants", json!({"name": "acme"}));
        post(
            "/v1/tenants/acme/sites",
            json!({"name": "hq", "kind": "protected"}),
        );
        post("/v1/tenants/acme/policies", harness::policy(30));
        post(
            "/v1/tenants/acme/machines",
            json!({"name": "web", "site": "hq", "policy": "gold"}),
        );
        for d in DISKS {
            let source = if host_form {
                host_source(self.dir.path(), d)
            } else {
                host_image(self.dir.path(), d).display().to_string()
            };
            post(
                "/v1/tenants/acme/machines/web/disks",
                json!({"name": d, "size_bytes": SIZE, "source": source}),
            );
        }
        let log = |name: &str| self.path(name).display().to_string();
        // The machine's start command records its arguments; with a `slow` file beside it,
        // it takes a while (long enough to kill the configuration server during it).
        let start = format!(
            "echo \"$FERRY_JOB_KIND $*\" >> {}; if [ -e {} ]; then sleep 4; fi",
            log("starts.log"),
            log("slow")
        );
        let hook = |when: &str| {
            json!({"argv": ["sh", "-c", format!("echo {when} $FERRY_JOB_KIND >> {}", log("hooks.log"))],
                   "timeout_secs": 30})
        };
        post(
            "/v1/tenants/acme/plans",
            json!({
                "name": "dr",
                "groups": [{"priority": 1, "machines": [{"machine": "web", "boot_order": 1,
                    "start": {"argv": ["sh", "-c", start, "start", "{disk:d0}", "{disk:d1}",
                                       "{site}", "{network:prod}"],
                              "timeout_secs": 30}}]}],
                "pre_hooks": [hook("pre")],
                "post_hooks": [hook("post")],
                "networks": {"test": [{"source": "prod", "target": "bubble"}],
                             "real": [{"source": "prod", "target": "dr-net"}]}
            }),
        );
    }

    /// A person of tenant acme with `role`, enrolled with a token.
    fn person(&self, name: &str, role: &str) -> Client {
        let t: TokenCreated = serde_json::from_value(self.ok(
            &self.admin(),
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": name, "role": role, "tenant": "acme", "ttl_secs": 600})),
        ))
        .unwrap();
        self.rt
            .block_on(harness::enroll(self.server(), &t.token, &self.path(name)))
    }

    /// The same person's client after a restart (the server's address changes).
    fn again(&self, name: &str) -> Client {
        Client::from_cert_dir(&self.server().url, &self.path(name)).unwrap()
    }

    /// `ferry ctl ARGS` as `who` (`admin` or an enrolled person); stdout when it succeeds.
    fn ctl(&self, who: &str, args: &[&str]) -> Result<String, String> {
        let dir = if who == "admin" {
            self.path("cs/admin")
        } else {
            self.path(who)
        };
        let out = Command::new(support::exe())
            .args(["ctl", "--server", &self.server().url, "--cert-dir"])
            .arg(dir)
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn left(&self) -> Duration {
        DEADLINE
            .checked_sub(self.began.elapsed())
            .expect("the test ran out of time")
    }

    fn start_job(&self, c: &Client, body: Value) -> Job {
        serde_json::from_value(self.ok(c, Method::POST, JOBS, Some(body))).unwrap()
    }

    fn get_job(&self, c: &Client, id: u64) -> Job {
        serde_json::from_value(self.ok(
            c,
            Method::GET,
            &format!("/v1/tenants/acme/jobs/{id}"),
            None,
        ))
        .unwrap()
    }

    /// Wait until `pred` holds for the job (bounded by the test's deadline).
    fn wait_job(&self, c: &Client, id: u64, pred: impl Fn(&Job) -> bool) -> Job {
        loop {
            let j = self.get_job(c, id);
            if pred(&j) {
                return j;
            }
            self.left();
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start a job, wait for it to end, and require that it succeeded.
    fn run_job(&self, c: &Client, body: Value) -> Job {
        let j = self.start_job(c, body);
        let j = self.wait_job(c, j.id, |j| j.state != JobState::Running);
        assert_eq!(j.state, JobState::Succeeded, "{j:#?}");
        assert!(j.steps.iter().all(|s| s.state == StepState::Done), "{j:#?}");
        j
    }

    /// [`Dr::run_job`], recording each progress the job's step `step` showed while it ran:
    /// (done, total, detail), as often as the API is asked (every 20 ms).
    fn run_job_watching(&self, c: &Client, body: Value, step: &str) -> (Job, Vec<Progress>) {
        let j = self.start_job(c, body);
        let mut seen: Vec<Progress> = Vec::new();
        let j = loop {
            let j = self.get_job(c, j.id);
            if j.state != JobState::Running {
                break j;
            }
            if let Some(s) = j
                .steps
                .iter()
                .find(|s| s.name == step && s.state == StepState::Running)
            {
                let p = (s.done, s.total, s.detail.clone());
                if seen.last() != Some(&p) {
                    seen.push(p);
                }
            }
            self.left();
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(j.state, JobState::Succeeded, "{j:#?}");
        (j, seen)
    }

    fn status(&self) -> PlanStatus {
        serde_json::from_value(self.ok(
            &self.admin(),
            Method::GET,
            "/v1/tenants/acme/plans/dr/status",
            None,
        ))
        .unwrap()
    }

    fn caught_up(&self) -> Vec<u64> {
        DISKS
            .iter()
            .map(|d| self.lab.wait_caught_up(d, self.left()).unwrap().acked_seq)
            .collect()
    }

    /// Wait for a point of each disk newer than `base` (while the guest writes, the journal is
    /// never empty, so "caught up" would never come).
    fn newer_than(&self, base: &[u64]) -> Vec<u64> {
        DISKS
            .iter()
            .zip(base)
            .map(|(d, b)| loop {
                if let Ok(s) = self.lab.status(d) {
                    if s.acked_seq > *b {
                        break s.acked_seq;
                    }
                }
                self.left();
                std::thread::sleep(Duration::from_millis(50));
            })
            .collect()
    }

    /// Wait until both disks have committed their points at one cut of the machine newer than
    /// `after` (a cut id), and return it.
    fn common_cut(&self, after: u64) -> u64 {
        loop {
            let cuts: Vec<u64> = DISKS
                .iter()
                .map(|d| self.lab.status(d).map_or(0, |s| s.group_cut_unix_ns))
                .collect();
            if cuts[0] > after && cuts.iter().all(|&c| c == cuts[0]) {
                return cuts[0];
            }
            self.left();
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn point_image(&self, disk: &str, seq: u64) -> Vec<u8> {
        let repo = self.lab.repository().unwrap();
        let r = repo.reader(disk, seq).unwrap();
        let mut buf = vec![0u8; r.size() as usize];
        r.read_at(0, &mut buf).unwrap();
        buf
    }

    /// The guest's disk `i` as it is now, read through its host.
    fn guest_image(&self, i: usize) -> Vec<u8> {
        let out = self.path(&format!("guest-{i}.raw"));
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(format!(
                "nbd+unix:///guest?socket={}",
                self.socks[i].display()
            ))
            .arg(&out))
        .unwrap();
        let v = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        v
    }

    fn writers(&self) -> Vec<support::TaggedWriter> {
        self.socks
            .iter()
            .enumerate()
            .map(|(i, s)| {
                support::TaggedWriter::start_paced(
                    &self.rt,
                    s,
                    SIZE,
                    7 + i as u64,
                    8,
                    Duration::from_millis(2),
                )
            })
            .collect()
    }

    /// The machine started again on its original disks after failback: each disk's host
    /// mirrors only the writes from now on to the process server (`sync=none`: failback's
    /// `protect` step left the recovery site holding the disk).
    fn start_hosts_again(&mut self) {
        for (i, disk) in DISKS.iter().enumerate() {
            let image = host_image(self.dir.path(), disk);
            let h = image.parent().unwrap();
            let mut q = StorageDaemon::start(&image, "qcow2", h).unwrap();
            let target = json!({"driver": "nbd", "node-name": "ferry-target",
                "server": {"type": "inet", "host": "127.0.0.1",
                           "port": self.lab.nbd_port.to_string()},
                "export": disk});
            q.qmp.execute("blockdev-add", target).unwrap();
            let mirror = ferry_qemu::mirror::mirror_arguments(
                MIRROR_JOB,
                "disk0",
                "ferry-target",
                "none",
                MIRROR_FILTER,
                0,
            );
            q.qmp.execute("blockdev-mirror", mirror).unwrap();
            q.qmp
                .wait_event("BLOCK_JOB_READY", Duration::from_secs(30))
                .unwrap();
            let sock = h.join("guest.sock");
            q.export(MIRROR_FILTER, "guest", &sock).unwrap();
            self.hosts[i] = Some(q);
            self.socks[i] = sock;
        }
    }

    /// Stop the enrolled master target (`roles[0]`).
    fn stop_master(&mut self) {
        let mt = &mut self.roles[0].0;
        let _ = mt.kill();
        let _ = mt.wait();
    }

    /// Start the enrolled master target again, with its identity and state as it left them.
    fn start_master(&mut self) {
        self.roles[0] = self.spawn_master();
        wait_port(self.lab.master_port, self.left()).unwrap();
    }

    /// The enrolled master target's process; in a mount namespace of its own that lays an
    /// empty tmpfs over each of [`Dr::hidden_from_master`] when there are any.
    fn spawn_master(&self) -> support::Kill {
        let d = self.dir.path();
        if self.hidden_from_master.is_empty() {
            return support::Kill::spawn(d, "master-target", &self.mt_args);
        }
        let mounts: Vec<String> = self
            .hidden_from_master
            .iter()
            .map(|h| format!("mount -t tmpfs -o size=1m hidden '{}'", h.display()))
            .collect();
        let script = format!("set -e; {}; exec \"$@\"", mounts.join("; "));
        let wrapper: Vec<String> = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "hide-the-protected-site",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        support::Kill::spawn_wrapped(d, "master-target", &wrapper, &self.mt_args)
    }

    /// Stop the enrolled process server (`roles[1]`).
    fn stop_process(&mut self) {
        let ps = &mut self.roles[1].0;
        let _ = ps.kill();
        let _ = ps.wait();
    }

    fn start_process(&mut self) {
        self.roles[1] = support::Kill::spawn(self.dir.path(), "process-server", &self.ps_args);
        wait_port(self.lab.nbd_port, self.left()).unwrap();
    }

    /// Start a job and wait until its step `step` runs.
    fn start_job_until(&self, c: &Client, body: Value, step: &str) -> Job {
        let j = self.start_job(c, body);
        self.wait_job(c, j.id, |j| {
            j.steps
                .iter()
                .any(|s| s.name == step && s.state == StepState::Running)
        })
    }

    fn restart_server(&mut self) {
        self.server.take().unwrap().crash();
        self.server = Some(harness::Server::start_with(
            &self.path("cs"),
            &self.server_args,
        ));
    }
}

/// Where the host keeps guest disk `disk`'s image.
fn host_image(dir: &Path, disk: &str) -> PathBuf {
    dir.join(format!("host-{disk}"))
        .join(format!("{disk}.qcow2"))
}

/// Guest disk `disk`'s `source` in the host form: the daemon's second monitor ([`host_disk`]
/// starts it), its node, and the socket its NBD server listens on (the guest's export's).
fn host_source(dir: &Path, disk: &str) -> String {
    let h = host_image(dir, disk).parent().unwrap().to_path_buf();
    format!(
        "qmp={},node=disk0,nbd={}",
        h.join(ferry_qemu::MGMT_QMP_SOCKET).display(),
        h.join("guest.sock").display()
    )
}

/// Guest disk `i` of the machine on its host: a qcow2 image (its first 8 MiB written), a
/// qemu-storage-daemon mirroring it to the process server's export `disk`, and the guest's
/// NBD socket. Returns (daemon, image, socket).
fn host_disk(dir: &Path, disk: &str, i: usize, nbd_port: u16) -> (StorageDaemon, PathBuf, PathBuf) {
    let image = host_image(dir, disk);
    let h = image.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&h).unwrap();
    support::qcow2_image(&image, SIZE, &[&format!("write -P {} 0 8M", 0x10 + i)]);
    let mut q = StorageDaemon::start(&image, "qcow2", &h).unwrap();
    q.mirror_to_nbd("127.0.0.1", nbd_port, disk, None, Duration::from_secs(120))
        .unwrap();
    let sock = h.join("guest.sock");
    q.export(MIRROR_FILTER, "guest", &sock).unwrap();
    (q, image, sock)
}

fn read_log(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn qemu_io(format: &str, image: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", format, image]);
    for x in cmds {
        c.args(["-c", x]);
    }
    sh(&mut c).unwrap();
}

/// `qemu-img compare`: true when the guest-visible contents are equal (`-U`: an image its
/// host's daemon holds, idle, is read too).
fn same(a: &str, fa: &str, b: &str, fb: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-U", "-q", "-f", fa, "-F", fb, a, b])
        .status()
        .unwrap()
        .success()
}

#[test]
fn test_failover_scratch_never_reaches_the_replica_and_cleanup_leaves_nothing() {
    // The roles are appliances enrolled with tokens, configured by the configuration server.
    let dr = Dr::start_enrolled();
    let admin = dr.admin();
    let op = dr.person("olivia", "operator");
    let viewer = dr.person("victor", "viewer");

    // A viewer may not fail over; an operator may not change a policy. Refused, audited,
    // nothing changed.
    let test = json!({"kind": "test-failover"});
    let (st, code, msg) = dr.rt.block_on(harness::refused(
        &viewer,
        Method::POST,
        JOBS,
        Some(test.clone()),
    ));
    assert_eq!((st, code.as_str()), (403, "forbidden"), "{msg}");
    let a = dr
        .rt
        .block_on(harness::audited(&admin, &format!("POST {JOBS}")));
    assert_eq!((a.who.as_str(), a.result), ("victor", AuditResult::Refused));
    let gold = "/v1/tenants/acme/policies/gold";
    let (st, _, _) = dr.rt.block_on(harness::refused(
        &op,
        Method::PUT,
        gold,
        Some(harness::policy(60)),
    ));
    assert_eq!(st, 403);
    let a = dr
        .rt
        .block_on(harness::audited(&admin, &format!("PUT {gold}")));
    assert_eq!((a.who.as_str(), a.result), ("olivia", AuditResult::Refused));
    assert_eq!(dr.ok(&admin, Method::GET, gold, None)["rpo_alert_secs"], 30);
    // Hooks and start commands run on the appliance: only a provider admin sets them. A
    // tenant admin may write plans without them.
    let tara = dr.person("tara", "tenant-admin");
    let plan = dr.ok(&admin, Method::GET, "/v1/tenants/acme/plans/dr", None);
    let (st, _, msg) = dr.rt.block_on(harness::refused(
        &tara,
        Method::PUT,
        "/v1/tenants/acme/plans/dr",
        Some(plan.clone()),
    ));
    assert!(st == 403 && msg.contains("commands"), "{msg}");
    assert_eq!(
        dr.ok(&admin, Method::GET, "/v1/tenants/acme/plans/dr", None),
        plan
    );
    let quiet = json!({"name": "quiet",
        "groups": [{"priority": 1, "machines": [{"machine": "web", "boot_order": 1}]}]});
    dr.ok(&tara, Method::POST, "/v1/tenants/acme/plans", Some(quiet));
    dr.ok(&tara, Method::DELETE, "/v1/tenants/acme/plans/quiet", None);
    let jobs = dr.ok(&admin, Method::GET, "/v1/tenants/acme/jobs", None);
    assert_eq!(jobs, json!([]), "a refused job left a record");
    // Protecting and unprotecting machines is configuration: refused to the operator (nothing
    // made), done by the administrator.
    let protect = [
        "protect",
        "--tenant",
        "acme",
        "--machine",
        "db",
        "--site",
        "hq",
        "--policy",
        "gold",
        "--disk",
        "x0=1M",
    ];
    let e = dr.ctl("olivia", &protect).unwrap_err();
    assert!(e.contains("may not change configuration"), "{e}");
    let (st, _, _) = dr.rt.block_on(harness::refused(
        &admin,
        Method::GET,
        "/v1/tenants/acme/machines/db",
        None,
    ));
    assert_eq!(st, 404);
    dr.ctl("admin", &protect).unwrap();
    // Protecting another disk of it keeps what the command does not name: the machine's
    // description and process server.
    let db = "/v1/tenants/acme/machines/db";
    let mut m = dr.ok(&admin, Method::GET, db, None);
    m["description"] = json!("billing database");
    m["process_server"] = json!("ps-east");
    dr.ok(&admin, Method::PUT, db, Some(m.clone()));
    let mut more = protect;
    more[10] = "x1=1M";
    dr.ctl("admin", &more).unwrap();
    assert_eq!(dr.ok(&admin, Method::GET, db, None), m);
    let disks = dr.ok(&admin, Method::GET, &format!("{db}/disks"), None);
    assert_eq!(disks.as_array().map(Vec::len), Some(2), "{disks}");
    dr.ctl(
        "admin",
        &["unprotect", "--tenant", "acme", "--machine", "db"],
    )
    .unwrap();
    let e = dr
        .ctl(
            "admin",
            &["unprotect", "--tenant", "acme", "--machine", "web"],
        )
        .unwrap_err();
    assert!(e.contains("plan dr starts machine web"), "{e}");
    // Bad input: a point for a cleanup, an unknown kind. Refused, nothing started.
    for bad in [
        json!({"kind": "cleanup", "point_unix": 5}),
        json!({"kind": "explode"}),
    ] {
        let (st, _, _) = dr
            .rt
            .block_on(harness::refused(&op, Method::POST, JOBS, Some(bad)));
        assert_eq!(st, 422);
    }
    let (st, _, msg) = dr.rt.block_on(harness::refused(
        &op,
        Method::POST,
        JOBS,
        Some(json!({"kind": "cleanup"})),
    ));
    assert!(st == 409 && msg.contains("protected"), "{msg}");

    // The guest keeps writing to both disks throughout.
    let writers = dr.writers();
    let base = dr.common_cut(0);
    let job = dr.run_job(&op, test);
    let a = dr
        .rt
        .block_on(harness::audited(&admin, &format!("POST {JOBS}")));
    assert_eq!((a.who.as_str(), a.result), ("olivia", AuditResult::Ok));
    assert_eq!(job.by, "olivia");
    let names: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pre-hooks",
            "points",
            "scratch web",
            "start web",
            "post-hooks"
        ]
    );
    let st = dr.status();
    assert_eq!(st.phase, PlanPhase::TestRunning);
    let (_, m) = dr
        .rt
        .block_on(viewer.raw(Method::GET, "/metrics", None))
        .unwrap();
    let m = String::from_utf8_lossy(&m);
    assert!(
        m.contains("ferry_plan_phase{tenant=\"acme\",plan=\"dr\",phase=\"test-running\"} 1"),
        "{m}"
    );
    assert_eq!(st.disks.len(), 2);
    // The machine's disks are one consistency group: both points are of one cut.
    assert_eq!(
        st.disks[0].point_created_unix_ns, st.disks[1].point_created_unix_ns,
        "the test failover uses one cut of the machine"
    );
    let port = st.test_nbd_port.unwrap();
    let starts = read_log(&dr.path("starts.log"));
    let overlays: Vec<&str> = st.disks.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        starts.trim(),
        format!("test-failover {} {} test bubble", overlays[0], overlays[1]),
        "the machine starts over its scratch disks, on the test network"
    );
    assert_eq!(
        read_log(&dr.path("hooks.log")),
        "pre test-failover\npost test-failover\n"
    );

    for (i, d) in st.disks.iter().enumerate() {
        let seq = d.point_seq.unwrap();
        assert!(
            d.point_created_unix_ns.unwrap() >= base,
            "the test uses the newest cut of the machine"
        );
        let replica = dr.point_image(&d.disk, seq);
        // The test machine writes to its scratch disk, and reads its writes back.
        qemu_io(
            "qcow2",
            &d.path,
            &[
                "write -P 0xee 0 4M",
                "write -P 0xef 40M 1M",
                "read -P 0xee 0 4M",
            ],
        );
        // What it did not write comes from the point.
        let out = dr.path(&format!("overlay-{i}.raw"));
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw", &d.path])
            .arg(&out))
        .unwrap();
        let seen = std::fs::read(&out).unwrap();
        assert!(seen[..4 << 20].iter().all(|&b| b == 0xee));
        assert!(seen[(4 << 20)..(40 << 20)] == replica[(4 << 20)..(40 << 20)]);
        // The replica is untouched, byte for byte.
        assert!(
            dr.point_image(&d.disk, seq) == replica,
            "scratch writes reached the replica of {}",
            d.disk
        );
        assert!(!replica[..4 << 20].iter().all(|&b| b == 0xee));
    }

    // Replication went on during the test: newer points, caught up with the guest.
    let used: Vec<u64> = st.disks.iter().map(|d| d.point_seq.unwrap()).collect();
    let during = dr.newer_than(&used);
    for (i, d) in st.disks.iter().enumerate() {
        assert!(
            during[i] > d.point_seq.unwrap(),
            "no new point of {} during the test",
            d.disk
        );
        let s = dr.lab.status(DISKS[i]).unwrap();
        let rpo = ferry_process_server::status::now_unix_ns()
            .saturating_sub(s.acked_point_created_unix_ns) as f64
            / 1e9;
        assert!(rpo < 10.0, "RPO {rpo:.1} s during the test");
    }

    // Cleanup leaves nothing: no overlays, no export, the plan protected again.
    let c = dr.run_job(&op, json!({"kind": "cleanup"}));
    assert!(c.steps[1].detail.contains("removed 2"), "{c:#?}");
    assert!(!dr.work.join("acme/dr/test").exists());
    for d in &st.disks {
        assert!(!Path::new(&d.path).exists());
    }
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let after = dr.status();
    assert_eq!(after.phase, PlanPhase::Protected);
    assert!(after.disks.is_empty() && after.test_nbd_port.is_none());
    for w in writers {
        w.finish(&dr.rt);
    }
    dr.caught_up();
    // The viewer reads the jobs, and the listing shows both.
    let v: Vec<Job> = dr.rt.block_on(viewer.get("/v1/tenants/acme/jobs")).unwrap();
    assert_eq!(v.len(), 2);
}

/// The configuration server runs with its own state directory and none of the recovery site's
/// paths (no repository, key, work directory or process server cache): the master target runs
/// the recovery-site steps on its own repository with its own key, and the test failover's
/// scratch overlays equal the points chosen. With the master target stopped, the next job's
/// step fails within the order timeout, naming the role that did not answer.
#[test]
fn the_master_target_runs_the_site_steps_and_a_silent_one_fails_the_step_clearly() {
    let mut dr = Dr::start_enrolled_full(None, &[], 3);
    assert!(
        dr.server_args
            .iter()
            .all(|a| !a.starts_with("--recovery") && a != "--process-cache"),
        "{:?}",
        dr.server_args
    );
    let op = dr.person("olivia", "operator");
    dr.common_cut(0);
    let job = dr.run_job(&op, json!({"kind": "test-failover"}));
    assert!(
        job.steps[1].detail.contains("at master target mt1"),
        "{:#?}",
        job.steps[1]
    );
    let st = dr.status();
    assert_eq!(st.disks.len(), 2);
    for d in &st.disks {
        assert!(
            Path::new(&d.path).starts_with(&dr.work),
            "{} is not in the master target's work directory",
            d.path
        );
        let point = dr.path(&format!("point-{}.raw", d.disk));
        std::fs::write(&point, dr.point_image(&d.disk, d.point_seq.unwrap())).unwrap();
        assert!(
            same(&d.path, "qcow2", point.to_str().unwrap(), "raw"),
            "the scratch overlay of {} differs from its point",
            d.disk
        );
    }
    let c = dr.run_job(&op, json!({"kind": "cleanup"}));
    assert!(!dr.work.join("acme/dr/test").exists(), "{c:#?}");

    // Orders are the addressed role's alone: a person may not fetch or answer them, and a
    // role of another tenant sees none and may answer none. Refusals are audited.
    let admin = dr.admin();
    let viewer = dr.person("victor", "viewer");
    let (st, _, msg) = dr.rt.block_on(harness::refused(
        &viewer,
        Method::GET,
        "/v1/roles/orders",
        None,
    ));
    assert_eq!(st, 403, "{msg}");
    let a = dr
        .rt
        .block_on(harness::audited(&admin, "GET /v1/roles/orders"));
    assert_eq!((a.who.as_str(), a.result), ("victor", AuditResult::Refused));
    dr.ok(
        &admin,
        Method::POST,
        "/v1/tenants",
        Some(json!({"name": "globex"})),
    );
    let t: TokenCreated = serde_json::from_value(dr.ok(
        &admin,
        Method::POST,
        "/v1/tokens",
        Some(
            json!({"name": "mt9", "role": "operator", "tenant": "globex",
                    "appliance": "master-target", "ttl_secs": 600}),
        ),
    ))
    .unwrap();
    let other = dr
        .rt
        .block_on(harness::enroll(dr.server(), &t.token, &dr.path("mt9")));

    // The master target stops: the next job's first site step waits 3 s for it, then fails.
    dr.stop_master();
    let began = Instant::now();
    let j = dr.start_job(&op, json!({"kind": "test-failover"}));
    dr.wait_job(&op, j.id, |j| {
        j.steps
            .iter()
            .any(|s| s.name == "points" && s.state != StepState::Pending)
    });
    std::thread::sleep(Duration::from_millis(300));
    let seen: Vec<Value> = dr.rt.block_on(other.get("/v1/roles/orders")).unwrap();
    assert!(seen.is_empty(), "another tenant's role sees {seen:?}");
    let mut forbidden = Vec::new();
    for id in 1..=20 {
        let path = format!("/v1/roles/orders/{id}/result");
        let body = json!({"answer": {"answer": "count", "n": 0}});
        let (st, _, msg) =
            dr.rt
                .block_on(harness::refused(&other, Method::POST, &path, Some(body)));
        assert!(st == 403 || st == 404, "{path}: {st} {msg}");
        if st == 403 {
            forbidden.push(format!("{id}: {msg}"));
            let a = dr
                .rt
                .block_on(harness::audited(&admin, &format!("POST {path}")));
            assert_eq!((a.who.as_str(), a.result), ("mt9", AuditResult::Refused));
        }
    }
    assert_eq!(
        forbidden.len(),
        1,
        "only the pending order is there, and refused to another tenant's role: {forbidden:?}"
    );
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Failed, "{j:#?}");
    let err = j.error.clone().unwrap_or_default();
    assert!(
        err.contains("step 'points' failed: master target mt1 did not answer within 3 s"),
        "{err}"
    );
    assert!(
        began.elapsed() < Duration::from_secs(30),
        "{:?}",
        began.elapsed()
    );
    let points = j.steps.iter().find(|s| s.name == "points").unwrap();
    assert_eq!(points.state, StepState::Failed, "{j:#?}");
}

/// With no access to the recovery site's paths either, a planned failover checks the drain at
/// the process server (on its own journals) and materializes the live disks at the master
/// target: they hold every write the guest made.
#[test]
fn a_planned_failover_drains_at_the_process_server_and_goes_live_at_the_master_target() {
    let mut dr = Dr::start_enrolled_full(None, &[], 30);
    let op = dr.person("olivia", "operator");
    dr.common_cut(0);
    let source: Vec<Vec<u8>> = (0..2).map(|i| dr.guest_image(i)).collect();
    for h in &mut dr.hosts {
        h.take().unwrap().stop();
    }
    let job = dr.run_job(&op, json!({"kind": "planned-failover"}));
    let drain = job.steps.iter().find(|s| s.name == "drain web").unwrap();
    assert!(
        drain.detail.contains("d0: journal") && drain.detail.contains("d1: journal"),
        "{drain:#?}"
    );
    let st = dr.status();
    assert_eq!(st.phase, PlanPhase::FailedOver);
    for (i, d) in st.disks.iter().enumerate() {
        assert!(
            Path::new(&d.path).starts_with(dr.work.join("acme/dr/live")),
            "{} is not the master target's",
            d.path
        );
        assert!(
            std::fs::read(&d.path).unwrap() == source[i],
            "the live disk {} lacks acknowledged writes",
            d.disk
        );
    }
}

/// The configuration server restarts while a step order is in flight (the master target,
/// stopped, has not fetched it): the resumed job sends the same order again, and the master
/// target, running again, runs it once and the job succeeds.
#[test]
fn an_order_in_flight_across_a_configuration_server_restart_runs_once() {
    let mut dr = Dr::start_enrolled_full(None, &[], 30);
    let op = dr.person("olivia", "operator");
    dr.common_cut(0);
    let mt = dr.roles[0].0.id().to_string();
    let signal = |sig: &str| {
        sh(Command::new("kill").args([sig, mt.as_str()])).unwrap();
    };
    signal("-STOP");
    let j = dr.start_job_until(&op, json!({"kind": "test-failover"}), "points");
    std::thread::sleep(Duration::from_millis(500));
    dr.restart_server();
    signal("-CONT");
    let op = dr.again("olivia");
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Succeeded, "{j:#?}");
    assert_eq!(j.resumed, 1);
    assert!(j.steps[1].detail.contains("at master target mt1"), "{j:#?}");
    let log = read_log(&dr.path("master-target.log"));
    let chose = log
        .lines()
        .filter(|l| l.contains("running a step order") && l.contains("choose-points"))
        .count();
    assert_eq!(chose, 1, "{log}");
    for d in dr.status().disks {
        let point = dr.path(&format!("point-{}.raw", d.disk));
        std::fs::write(&point, dr.point_image(&d.disk, d.point_seq.unwrap())).unwrap();
        assert!(same(&d.path, "qcow2", point.to_str().unwrap(), "raw"));
    }
    dr.run_job(&op, json!({"kind": "cleanup"}));
}

#[test]
fn planned_failover_loses_nothing_then_reprotect_and_failback_send_only_changes() {
    let mut dr = Dr::start_enrolled();
    let op = dr.person("olivia", "operator");
    let writers = dr.writers();
    // A source that keeps writing (its pre-hooks did not stop it) fails the drain: nothing
    // goes live, the plan stays protected.
    let j = dr.start_job(&op, json!({"kind": "planned-failover"}));
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.unwrap();
    assert!(
        e.contains("still taking writes") && e.contains("Steps done: pre-hooks."),
        "{e}"
    );
    assert_eq!(dr.status().phase, PlanPhase::Protected);
    assert!(!dr.work.join("acme/dr/live").exists());
    for w in writers {
        let (_, flushed) = w.finish(&dr.rt);
        assert!(flushed > 0);
    }
    // The source as it stopped: every acknowledged write is in it. Then the guest shuts down.
    let source: Vec<Vec<u8>> = (0..2).map(|i| dr.guest_image(i)).collect();
    for h in &mut dr.hosts {
        h.take().unwrap().stop();
    }

    let job = dr.run_job(&op, json!({"kind": "planned-failover"}));
    let failover_points: Vec<u64> = job.disks.iter().map(|d| d.point_seq.unwrap()).collect();
    let names: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pre-hooks",
            "drain web",
            "points",
            "live web",
            "start web",
            "post-hooks"
        ]
    );
    let st = dr.status();
    assert_eq!(st.phase, PlanPhase::FailedOver);
    let live: Vec<String> = st.disks.iter().map(|d| d.path.clone()).collect();
    for i in 0..2 {
        assert!(
            std::fs::read(&live[i]).unwrap() == source[i],
            "the recovery-site disk {} lacks acknowledged writes",
            DISKS[i]
        );
        let orig = dr.images[i].display().to_string();
        assert!(same(&live[i], "raw", &orig, "qcow2"));
    }
    let starts = read_log(&dr.path("starts.log"));
    assert_eq!(
        starts.trim(),
        format!("planned-failover {} {} recovery dr-net", live[0], live[1])
    );

    // The machine runs at the recovery site and writes.
    qemu_io("raw", &live[0], &["write -P 0x5a 4M 2M"]);
    qemu_io("raw", &live[1], &["write -P 0x5b 20M 1M"]);
    let (st_, _, msg) = dr.rt.block_on(harness::refused(
        &op,
        Method::POST,
        JOBS,
        Some(json!({"kind": "reprotect"})),
    ));
    assert!(st_ == 409 && msg.contains("committed"), "{msg}");
    dr.run_job(&op, json!({"kind": "commit"}));
    assert_eq!(dr.status().phase, PlanPhase::Committed);

    // Reprotect: the original disks are brought up to date, sending only what differs. The
    // step shows how far the process server has come while it runs: bytes of the machine's
    // disks compared, and the disk's blocks compared and bytes sent so far.
    let (rp, seen) = dr.run_job_watching(&op, json!({"kind": "reprotect"}), "resync web");
    let total = 2 * SIZE;
    // (A step that has just begun has no total yet.)
    assert!(
        seen.iter()
            .all(|(d, t, _)| *t == total || (*t, *d) == (0, 0)),
        "{seen:#?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress went back: {seen:#?}"
    );
    // Not a matter of the machine's speed: after posting a disk's first batch a role waits
    // 250 ms before it posts again, so that progress stays shown at least that long (the API
    // is asked every 20 ms); and between the two disks' orders the first disk's end stays
    // shown until the second one's first batch is posted.
    let midway: Vec<&Progress> = seen
        .iter()
        .filter(|(done, _, detail)| *done > 0 && *done < total && detail.contains("compared"))
        .collect();
    assert!(
        !midway.is_empty(),
        "no progress while the resync ran: {seen:#?}"
    );
    eprintln!("reprotect progress seen while it ran: {midway:?}");
    let step = rp.steps.iter().find(|s| s.name == "resync web").unwrap();
    assert_eq!((step.done, step.total), (total, total), "{step:#?}");
    // The CLI's job view shows the step's progress and what was sent.
    let view = dr
        .ctl("olivia", &["jobs", "--tenant", "acme", &rp.id.to_string()])
        .unwrap();
    assert!(
        view.contains(&format!("{total}/{total}")) && view.contains("sent 2097152 of"),
        "{view}"
    );
    let sent: Vec<u64> = rp
        .disks
        .iter()
        .map(|d| d.resync.unwrap().bytes_sent)
        .collect();
    assert_eq!(sent, [2 * MIB, MIB], "{rp:#?}");
    for (i, d) in rp.disks.iter().enumerate() {
        let r = d.resync.unwrap();
        assert_eq!(r.blocks_compared, SIZE / ferry_failover::resync::BLOCK);
        assert!(r.bytes_sent * 16 < r.disk_bytes, "{r:?}");
        let orig = dr.images[i].display().to_string();
        assert!(same(&live[i], "raw", &orig, "qcow2"));
        eprintln!(
            "reprotect {}: sent {} of {} bytes, {} bytes of block names",
            d.disk, r.bytes_sent, r.disk_bytes, r.hash_bytes
        );
    }
    assert_eq!(dr.status().phase, PlanPhase::Reprotected);

    // More writes at the recovery site, then fail back: the final pass sends only those, and
    // the machine starts on its original disks at the protected site.
    qemu_io("raw", &live[0], &["write -P 0x77 30M 64k"]);
    let (fb, seen) = dr.run_job_watching(&op, json!({"kind": "failback"}), "protect web");
    // While `protect web` ran it showed bytes of the machine's disks compared, never going back.
    assert!(
        seen.iter()
            .all(|(d, t, _)| *t == total || (*t, *d) == (0, 0)),
        "{seen:#?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "progress went back: {seen:#?}"
    );
    eprintln!("protect progress seen while it ran: {seen:?}");
    let sent: Vec<u64> = fb
        .disks
        .iter()
        .map(|d| d.resync.unwrap().bytes_sent)
        .collect();
    assert_eq!(sent, [64 * 1024, 0], "{fb:#?}");
    for i in 0..2 {
        let orig = dr.images[i].display().to_string();
        assert!(
            same(&live[i], "raw", &orig, "qcow2"),
            "the original {} differs from the recovery site's",
            DISKS[i]
        );
    }
    let starts = read_log(&dr.path("starts.log"));
    assert_eq!(
        starts.lines().last().unwrap(),
        format!(
            "failback {} {} protected dr-net",
            dr.images[0].display(),
            dr.images[1].display()
        )
    );
    let st = dr.status();
    assert_eq!(st.phase, PlanPhase::Protected);
    assert_eq!(
        read_log(&dr.path("hooks.log")),
        "pre planned-failover\npre planned-failover\npost planned-failover\npre failback\npost failback\n"
    );

    // Failback protected the machine again towards the recovery site before starting it: the
    // process server dropped each disk's pre-failover journal and brought the recovery site
    // up to date by its checksum resync, sending only what the machine wrote there, into a new
    // point that is the original disk.
    let names: Vec<&str> = fb.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pre-hooks",
            "resync web",
            "protect web",
            "start web",
            "post-hooks"
        ]
    );
    let step = fb.steps.iter().find(|s| s.name == "protect web").unwrap();
    assert_eq!((step.done, step.total), (2 * SIZE, 2 * SIZE), "{step:#?}");
    assert!(
        step.detail.starts_with("protected again: sent "),
        "{step:#?}"
    );
    let block = u64::from(ferry_chunk::DEFAULT_BLOCK_SIZE);
    // What the machine wrote at the recovery site: 2 MiB and 64 KiB on d0, 1 MiB on d1.
    let changed = [2 * MIB + 64 * 1024, MIB];
    let mut protected = Vec::new();
    for (i, d) in fb.disks.iter().enumerate() {
        let (r, seq) = (d.protect.unwrap(), d.point_seq.unwrap());
        eprintln!(
            "protect {}: sent {} of {} bytes ({} blocks), {} bytes of block names, point {seq}",
            d.disk, r.bytes_sent, r.disk_bytes, r.blocks_sent, r.hash_bytes
        );
        assert_eq!(
            (r.disk_bytes, r.blocks_compared, r.blocks_sent),
            (SIZE, SIZE / block, changed[i] / block),
            "{r:?}"
        );
        assert!(
            r.bytes_sent > 0 && r.bytes_sent * 16 < r.disk_bytes,
            "{r:?}"
        );
        assert!(seq > failover_points[i], "{d:?}");
        let point = dr.path(&format!("point-{i}.raw"));
        std::fs::write(&point, dr.point_image(DISKS[i], seq)).unwrap();
        let orig = dr.images[i].display().to_string();
        assert!(
            same(&point.display().to_string(), "raw", &orig, "qcow2"),
            "the point protect made of {} is not the original disk",
            DISKS[i]
        );
        std::fs::remove_file(&point).unwrap();
        protected.push(seq);
    }

    // The machine runs on its original disks at the protected site, their hosts mirroring its
    // new writes: they reach new points at the recovery site, equal to the disks.
    dr.start_hosts_again();
    for (i, sock) in dr.socks.iter().enumerate() {
        let uri = format!("nbd+unix:///guest?socket={}", sock.display());
        let w = format!("write -P {} {}M 1M", 0x61 + i, 40 + 2 * i);
        qemu_io("raw", &uri, &[&w, "write -P 0x62 60M 64k"]);
    }
    let after = dr.caught_up();
    for i in 0..2 {
        assert!(after[i] > protected[i], "{after:?} {protected:?}");
        assert!(
            dr.point_image(DISKS[i], after[i]) == dr.guest_image(i),
            "the newest point of {} is not the original disk",
            DISKS[i]
        );
    }
}

/// The block exports on the host whose daemon is `q` (`query-block-exports`).
fn host_exports(q: &mut StorageDaemon) -> Vec<String> {
    ferry_qemu::fleece::export_ids(&mut q.qmp).unwrap()
}

/// A disk whose `source` is in the host form (`qmp=...,node=...,nbd=...`) is failed over,
/// changed at the recovery site, reprotected and failed back: the resync writes the original
/// disk through a writable NBD export of its node that it adds on the host and removes at the
/// end, sending only the blocks that differ; failback's `protect` reads the disk through the
/// same host (the process server's own read-only export, removed too). The original ends
/// equal to the recovery site's disk, and no export is left on the host.
#[test]
fn a_disk_given_by_its_host_is_reprotected_and_failed_back_through_the_host() {
    let mut dr = Dr::start_enrolled_host_form();
    let op = dr.person("olivia", "operator");
    let before = dr.caught_up();
    // The guest shuts down (what the jobs' pre-hooks do); its hosts keep serving the disks'
    // nodes (daemons without the guest's mirror and export, as a hypervisor's with the VM
    // stopped).
    for (i, disk) in DISKS.iter().enumerate() {
        dr.hosts[i].take().unwrap().stop();
        let image = host_image(dr.dir.path(), disk);
        dr.hosts[i] = Some(StorageDaemon::start(&image, "qcow2", image.parent().unwrap()).unwrap());
    }
    let job = dr.run_job(&op, json!({"kind": "planned-failover"}));
    for (i, d) in job.disks.iter().enumerate() {
        assert!(d.point_seq.unwrap() >= before[i], "{d:?}");
    }
    let live: Vec<String> = dr.status().disks.iter().map(|d| d.path.clone()).collect();
    for (l, image) in live.iter().zip(&dr.images) {
        assert!(same(l, "raw", &image.display().to_string(), "qcow2"));
    }
    // The machine runs at the recovery site and writes.
    qemu_io("raw", &live[0], &["write -P 0x5a 4M 2M"]);
    qemu_io("raw", &live[1], &["write -P 0x5b 20M 1M"]);
    dr.run_job(&op, json!({"kind": "commit"}));

    let rp = dr.run_job(&op, json!({"kind": "reprotect"}));
    let sent: Vec<u64> = rp
        .disks
        .iter()
        .map(|d| d.resync.unwrap().bytes_sent)
        .collect();
    assert_eq!(sent, [2 * MIB, MIB], "{rp:#?}");
    for (i, d) in rp.disks.iter().enumerate() {
        let r = d.resync.unwrap();
        eprintln!(
            "reprotect through the host {}: sent {} of {} bytes, {} bytes of block names",
            d.disk, r.bytes_sent, r.disk_bytes, r.hash_bytes
        );
        assert_eq!(r.blocks_compared, SIZE / ferry_failover::resync::BLOCK);
        let orig = dr.images[i].display().to_string();
        assert!(same(&live[i], "raw", &orig, "qcow2"), "{}", DISKS[i]);
        let q = dr.hosts[i].as_mut().unwrap();
        assert_eq!(host_exports(q), Vec::<String>::new(), "{}", DISKS[i]);
    }
    assert_eq!(dr.status().phase, PlanPhase::Reprotected);

    // More writes at the recovery site, then fail back.
    qemu_io("raw", &live[0], &["write -P 0x77 30M 64k"]);
    let fb = dr.run_job(&op, json!({"kind": "failback"}));
    let sent: Vec<u64> = fb
        .disks
        .iter()
        .map(|d| d.resync.unwrap().bytes_sent)
        .collect();
    assert_eq!(sent, [64 * 1024, 0], "{fb:#?}");
    let block = u64::from(ferry_chunk::DEFAULT_BLOCK_SIZE);
    // What the machine wrote at the recovery site: 2 MiB and 64 KiB on d0, 1 MiB on d1.
    let changed = [2 * MIB + 64 * 1024, MIB];
    let mut protected = Vec::new();
    for (i, d) in fb.disks.iter().enumerate() {
        let (r, seq) = (d.protect.unwrap(), d.point_seq.unwrap());
        eprintln!(
            "failback through the host {}: resync sent {} bytes; protect sent {} of {} bytes \
             ({} blocks), {} bytes of block names, point {seq}",
            d.disk,
            d.resync.unwrap().bytes_sent,
            r.bytes_sent,
            r.disk_bytes,
            r.blocks_sent,
            r.hash_bytes
        );
        assert_eq!(
            (r.disk_bytes, r.blocks_compared, r.blocks_sent),
            (SIZE, SIZE / block, changed[i] / block),
            "{r:?}"
        );
        let q = dr.hosts[i].as_mut().unwrap();
        assert_eq!(host_exports(q), Vec::<String>::new(), "{}", DISKS[i]);
        protected.push(seq);
    }
    assert_eq!(dr.status().phase, PlanPhase::Protected);
    // The hosts stopped: the original disks are the recovery site's, and so are the points
    // protect made.
    for i in 0..2 {
        dr.hosts[i].take().unwrap().stop();
        let orig = dr.images[i].display().to_string();
        assert!(
            same(&live[i], "raw", &orig, "qcow2"),
            "the original {} differs from the recovery site's",
            DISKS[i]
        );
        let point = dr.path(&format!("point-{i}.raw"));
        std::fs::write(&point, dr.point_image(DISKS[i], protected[i])).unwrap();
        assert!(same(&point.display().to_string(), "raw", &orig, "qcow2"));
        std::fs::remove_file(&point).unwrap();
    }
}

/// Bytes sent so far, as a resync step's detail says (`d0: compared .., sent N bytes (..)`).
fn sent_so_far(detail: &str) -> u64 {
    detail
        .split("sent ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Write `len` bytes that do not compress (a seeded random stream) at `offset` of a raw image.
fn scribble(path: &str, offset: u64, len: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let mut rng = support::Rng(seed);
    let data: Vec<u8> = (0..len / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&data, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn split_resync_never_opens_the_original_at_the_master_target_and_survives_either_side_killed() {
    // The sites apart: the master target's process cannot see the host's directories (where
    // the original disks are), and reaches the process server through a link the test slows.
    let mut dr = Dr::start_enrolled_apart();
    let op = dr.person("olivia", "operator");
    let mt = dr.roles[0].0.id();
    let orig: Vec<String> = dr.images.iter().map(|p| p.display().to_string()).collect();
    for o in &orig {
        assert!(Path::new(o).exists());
        let seen = PathBuf::from(format!("/proc/{mt}/root{o}"));
        assert!(!seen.exists(), "the master target sees {o}");
    }
    dr.caught_up();
    for h in &mut dr.hosts {
        h.take().unwrap().stop();
    }
    dr.run_job(&op, json!({"kind": "planned-failover"}));
    let live: Vec<String> = dr.status().disks.iter().map(|d| d.path.clone()).collect();
    // At the recovery site: 8 MiB that do not compress on d0, 1 MiB on d1.
    scribble(&live[0], 4 * MIB, 8 * MIB, 1);
    scribble(&live[1], 20 * MIB, MIB, 2);
    dr.run_job(&op, json!({"kind": "commit"}));

    // A live disk that is not the original's size: the step says so, and nothing is written.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&live[0])
        .unwrap();
    f.set_len(SIZE + 65536).unwrap();
    let j = dr.start_job(&op, json!({"kind": "reprotect"}));
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Failed, "{j:#?}");
    let e = j.error.unwrap();
    assert!(
        e.contains("'resync web'") && e.contains("not the same disk"),
        "{e}"
    );
    f.set_len(SIZE).unwrap();
    assert_eq!(dr.status().phase, PlanPhase::Committed);

    // Over a slow link, the process server is killed in the middle of d0's resync: the step
    // stays unfinished (the job runs on, nothing says the disk is resynced); started again, the
    // process server runs the order again and sends only what still differs.
    let link = dr.link.as_ref().unwrap();
    link.limit(2 * MIB);
    let resync = |j: &Job| j.steps.iter().find(|s| s.name == "resync web").cloned();
    let midway = |j: &Job| {
        resync(j).is_some_and(|s| {
            s.state == StepState::Running
                && s.detail.starts_with("d0:")
                && sent_so_far(&s.detail) > 0
        })
    };
    let j = dr.start_job(&op, json!({"kind": "reprotect"}));
    let at = dr.wait_job(&op, j.id, midway);
    let before = sent_so_far(&resync(&at).unwrap().detail);
    assert!(before < 8 * MIB, "{at:#?}");
    dr.stop_process();
    std::thread::sleep(Duration::from_secs(1));
    let j2 = dr.get_job(&op, j.id);
    assert_eq!(j2.state, JobState::Running, "{j2:#?}");
    assert_eq!(resync(&j2).unwrap().state, StepState::Running);
    dr.start_process();
    let rp = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(rp.state, JobState::Succeeded, "{rp:#?}");
    let sent: Vec<u64> = rp
        .disks
        .iter()
        .map(|d| d.resync.unwrap().bytes_sent)
        .collect();
    eprintln!("reprotect: {before} bytes of d0 sent before the kill, then {sent:?}");
    assert!(sent[0] > 0 && sent[0] + before <= 8 * MIB, "{sent:?}");
    assert_eq!(sent[1], MIB);
    for i in 0..2 {
        assert!(same(&live[i], "raw", &orig[i], "qcow2"), "{}", DISKS[i]);
    }
    assert_eq!(dr.status().phase, PlanPhase::Reprotected);

    // The master target killed in the middle of failback's resync (the recovery site goes
    // away, its link too: what the link still held is lost): the step says the process server
    // is reconnecting, and once the master target is back (within the retry budget) the same
    // job goes on from where it was and completes, fetching each block that differs once and
    // asking again only for the names of the blocks that were in flight.
    scribble(&live[0], 40 * MIB, 8 * MIB, 3);
    let j = dr.start_job(&op, json!({"kind": "failback"}));
    let at = dr.wait_job(&op, j.id, midway);
    let before = sent_so_far(&resync(&at).unwrap().detail);
    dr.stop_master();
    dr.rt
        .block_on(dr.link.as_ref().unwrap().cut(Duration::from_millis(100)));
    let away = dr.wait_job(&op, j.id, |j| {
        j.state != JobState::Running
            || resync(j).is_some_and(|s| s.detail.contains("reconnecting (attempt"))
    });
    assert_eq!(away.state, JobState::Running, "{away:#?}");
    let detail = resync(&away).unwrap().detail;
    assert!(detail.contains("master target"), "{detail}");
    eprintln!("failback while the master target was away: {detail}");
    std::thread::sleep(Duration::from_secs(2));
    dr.start_master();
    dr.link.as_ref().unwrap().limit(0);
    let fb = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(fb.state, JobState::Succeeded, "{fb:#?}");
    let r: Vec<ResyncReport> = fb.disks.iter().map(|d| d.resync.unwrap()).collect();
    eprintln!(
        "failback across the master target's restart ({before} bytes of d0 before it): {r:?}"
    );
    assert_eq!(r[0].bytes_sent, 8 * MIB, "{r:?}");
    assert!(r[0].reconnects >= 1, "{r:?}");
    let blocks = SIZE / ferry_failover::resync::BLOCK;
    let window = (ferry_failover::split::AHEAD + 1) * ferry_failover::split::BATCH;
    assert_eq!(r[0].blocks_compared, blocks, "{r:?}");
    assert!(r[0].hash_bytes <= 32 * (blocks + window), "{r:?}");
    assert_eq!((r[1].bytes_sent, r[1].reconnects), (0, 0), "{r:?}");
    for i in 0..2 {
        assert!(same(&live[i], "raw", &orig[i], "qcow2"), "{}", DISKS[i]);
    }
    assert_eq!(dr.status().phase, PlanPhase::Protected);
}

/// A machine's bandwidth limit holds for its resync as for its shipping: reprotect fetches the
/// blocks that differ from the master target no faster than the machine's policy allows (the
/// process server reads the resync connection through the machine's throttle), and the
/// originals end equal to the live disks.
#[test]
fn a_machines_bandwidth_limit_holds_for_the_resync_of_reprotect() {
    let policy = json!({"name": "gold", "mode": "continuous", "checkpoint_interval_secs": 1,
        "rpo_alert_secs": 60, "bandwidth": {"limit_mbit": 8, "schedule": []}});
    let mut dr = Dr::start_enrolled_with(Some(policy), &[]);
    let op = dr.person("olivia", "operator");
    let orig: Vec<String> = dr.images.iter().map(|p| p.display().to_string()).collect();
    dr.caught_up();
    for h in &mut dr.hosts {
        h.take().unwrap().stop();
    }
    dr.run_job(&op, json!({"kind": "planned-failover"}));
    let live: Vec<String> = dr.status().disks.iter().map(|d| d.path.clone()).collect();
    // At the recovery site: 6 MiB that do not compress on d0, 2 MiB on d1. At 8 Mbit/s
    // (1 MB/s) their blocks take 8.4 s to come; unlimited, a fraction of a second.
    scribble(&live[0], 4 * MIB, 6 * MIB, 1);
    scribble(&live[1], 20 * MIB, 2 * MIB, 2);
    dr.run_job(&op, json!({"kind": "commit"}));

    // The step's time as the API shows it, seen every 20 ms: from the first look that finds it
    // running to the first that finds it done. It holds the whole resync (and the roles'
    // order polling besides), so the rate measured is at most the resync's.
    let j = dr.start_job(&op, json!({"kind": "reprotect"}));
    let step = |j: &Job| {
        j.steps
            .iter()
            .find(|s| s.name == "resync web")
            .map(|s| s.state)
    };
    let mut began = None;
    let (j, took) = loop {
        let j = dr.get_job(&op, j.id);
        let now = Instant::now();
        if began.is_none() && step(&j) == Some(StepState::Running) {
            began = Some(now);
        }
        if step(&j) == Some(StepState::Done) || j.state != JobState::Running {
            let took = began.map(|b| now.duration_since(b)).unwrap_or_default();
            break (
                dr.wait_job(&op, j.id, |j| j.state != JobState::Running),
                took,
            );
        }
        dr.left();
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(j.state, JobState::Succeeded, "{j:#?}");
    let sent: Vec<u64> = j
        .disks
        .iter()
        .map(|d| d.resync.unwrap().bytes_sent)
        .collect();
    assert_eq!(sent, [6 * MIB, 2 * MIB]);
    let rate = sent.iter().sum::<u64>() as f64 / took.as_secs_f64();
    eprintln!(
        "reprotect's resync fetched {sent:?} bytes in {took:?}: {:.2} Mbit/s",
        rate * 8.0 / 1e6
    );
    // The limit (1 MB/s of TLS records, a little more than the blocks they carry), and 10% for
    // the bucket's burst (0.1 s) and the looks' 20 ms.
    assert!(
        rate <= 1.1e6,
        "the resync fetched at {:.2} Mbit/s under a limit of 8",
        rate * 8.0 / 1e6
    );
    for i in 0..2 {
        assert!(same(&live[i], "raw", &orig[i], "qcow2"), "{}", DISKS[i]);
    }
    assert_eq!(dr.status().phase, PlanPhase::Reprotected);
}

#[test]
fn config_server_killed_mid_job_resumes_or_fails_clearly() {
    // The roles run the site steps, and find the restarted server on its port.
    let mut dr = Dr::start_enrolled();
    let _op = dr.person("olivia", "operator");
    dr.caught_up();

    // A step that starts something outside Ferry is not run twice: killed during the
    // machine's start, the job ends failed, naming the step and what was done.
    std::fs::write(dr.path("slow"), b"").unwrap();
    let op = dr.again("olivia");
    let j = dr.start_job_until(&op, json!({"kind": "test-failover"}), "start web");
    dr.restart_server();
    let op = dr.again("olivia");
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Failed, "{j:#?}");
    let e = j.error.clone().unwrap();
    assert!(
        e.contains("'start web'") && e.contains("Steps done: pre-hooks, points, scratch web"),
        "{e}"
    );
    assert!(e.contains("cleanup"), "{e}");
    let st = dr.status();
    assert_eq!(st.phase, PlanPhase::TestRunning);
    // The scratch layers made before the crash are served again, their points still held,
    // and cleanup discards them and releases the points.
    let overlay = st.disks[0].path.clone();
    qemu_io("qcow2", &overlay, &["read 0 64k"]);
    assert_eq!(holders(&dr), [format!("job.acme.{}", j.id)]);
    // A hold whose job this configuration server does not know (another server's, or its
    // store lost) is reported at start-up and left for the operator.
    let stray = "job.acme.999";
    let seq = st.disks[0].point_seq.unwrap();
    dr.lab
        .repository()
        .unwrap()
        .hold(
            stray,
            "lost",
            &[HeldPoint {
                disk: "d0".into(),
                seq,
            }],
        )
        .unwrap();
    dr.restart_server();
    // Reported once the master target has listed its holds for the restarted server.
    loop {
        let events = dr
            .ok(&dr.admin(), Method::GET, "/v1/events", None)
            .to_string();
        if events.contains("ferry release-hold --holder job.acme.999") {
            break;
        }
        assert!(dr.left() > Duration::from_secs(1), "{events}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(holders(&dr), [format!("job.acme.{}", j.id), stray.into()]);
    let op = dr.again("olivia");
    std::fs::remove_file(dr.path("slow")).unwrap();
    dr.run_job(&op, json!({"kind": "cleanup"}));
    assert!(!Path::new(&overlay).exists());
    assert_eq!(holders(&dr), [stray]);
    assert!(ferry_ok(&dr, &["release-hold", "--holder", stray]).contains("released"));
    assert!(holders(&dr).is_empty());

    // A step that may run again resumes: the drain of a planned failover waits for a process
    // server that is down; the configuration server dies meanwhile; after both are back, the
    // job goes on from the drain and ends as if nothing had happened.
    dr.stop_process();
    let j = dr.start_job_until(&op, json!({"kind": "planned-failover"}), "drain web");
    dr.restart_server();
    dr.start_process();
    let op = dr.again("olivia");
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Succeeded, "{j:#?}");
    assert_eq!(j.resumed, 1);
    assert_eq!(dr.status().phase, PlanPhase::FailedOver);
    assert!(
        holders(&dr).is_empty(),
        "the failover's points are still held"
    );
    // The pre-hooks ran once for each job, never twice.
    assert_eq!(
        read_log(&dr.path("hooks.log")),
        "pre test-failover\npre planned-failover\npost planned-failover\n"
    );

    // Failback's protect resumes too: the configuration server dies while the process server
    // protects the disks again; the resumed step sends the same orders (each run once) and the
    // job ends with each disk protected at a new point, its machine started once.
    for h in &mut dr.hosts {
        h.take().unwrap().stop();
    }
    dr.run_job(&op, json!({"kind": "commit"}));
    dr.run_job(&op, json!({"kind": "reprotect"}));
    let j = dr.start_job_until(&op, json!({"kind": "failback"}), "protect web");
    dr.restart_server();
    let op = dr.again("olivia");
    let j = dr.wait_job(&op, j.id, |j| j.state != JobState::Running);
    assert_eq!(j.state, JobState::Succeeded, "{j:#?}");
    assert_eq!(j.resumed, 1);
    let step = j.steps.iter().find(|s| s.name == "protect web").unwrap();
    assert_eq!((step.done, step.total), (2 * SIZE, 2 * SIZE), "{step:#?}");
    for d in &j.disks {
        assert!(d.protect.is_some() && d.point_seq.is_some(), "{d:?}");
    }
    assert_eq!(dr.status().phase, PlanPhase::Protected);
    assert_eq!(
        read_log(&dr.path("starts.log")).lines().last().unwrap(),
        format!(
            "failback {} {} protected dr-net",
            dr.images[0].display(),
            dr.images[1].display()
        )
    );
    assert!(read_log(&dr.path("hooks.log")).ends_with("pre failback\npost failback\n"));
}

/// `ferry ARGS` on the lab's repository; stdout, or a panic with stderr.
fn ferry_ok(dr: &Dr, args: &[&str]) -> String {
    let o = dr.lab.ferry(args).unwrap();
    assert!(
        o.status.success(),
        "ferry {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The holders of points in the lab's repository.
fn holders(dr: &Dr) -> Vec<String> {
    let repo = dr.lab.repository().unwrap();
    repo.holds()
        .unwrap()
        .into_iter()
        .map(|h| h.holder)
        .collect()
}

/// Wait until retention at the master target has removed `seq` of `disk`.
fn wait_removed(dr: &Dr, disk: &str, seq: u64) {
    loop {
        let repo = dr.lab.repository().unwrap();
        if repo.points(disk).unwrap().iter().all(|p| p.meta.seq != seq) {
            return;
        }
        dr.left();
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn retention_keeps_the_points_a_test_failover_uses_until_cleanup() {
    // The master target's retention runs every second and keeps, besides the latest point,
    // only the newest of the last second: a point a second old is removed and its chunks
    // collected within seconds, unless it is held.
    // The machine's policy says so (the master target takes its tiers from the configuration
    // server), and the master target runs the test failover's steps.
    let policy = json!({"name": "gold", "mode": "continuous", "checkpoint_interval_secs": 1,
        "rpo_alert_secs": 60, "retention": [{"every_secs": 1, "keep_secs": 1}]});
    let mut dr = Dr::start_enrolled_with(Some(policy), &["--retention-interval-secs", "1"]);
    let op = dr.person("olivia", "operator");
    dr.caught_up();
    // The guest is idle: its disks now are what the test's points hold.
    let expected: Vec<PathBuf> = (0..2)
        .map(|i| {
            let p = dr.path(&format!("expected-{i}.raw"));
            std::fs::write(&p, dr.guest_image(i)).unwrap();
            p
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let job = dr.run_job(&op, json!({"kind": "test-failover", "point_unix": now}));
    let holder = format!("job.acme.{}", job.id);
    let st = dr.status();
    let held: Vec<u64> = st.disks.iter().map(|d| d.point_seq.unwrap()).collect();
    assert!(job.steps[1].detail.contains("held"), "{job:#?}");

    // The guest writes all over its disks: newer points, and the held point's blocks named by
    // none of them. Retention removes points newer than the held one — twice, so a whole pass
    // (retention, then gc) ran after the first removal — and keeps the held one.
    let writers = dr.writers();
    let n1 = dr.newer_than(&held);
    for (d, s) in DISKS.iter().zip(&n1) {
        wait_removed(&dr, d, *s);
    }
    let n2 = dr.newer_than(&n1);
    for (d, s) in DISKS.iter().zip(&n2) {
        wait_removed(&dr, d, *s);
    }
    let points = ferry_ok(&dr, &["points"]);
    for (d, s) in DISKS.iter().zip(&held) {
        let line = points
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([*d, &s.to_string()]))
            .unwrap_or_else(|| panic!("{d}@{s} is gone:\n{points}"));
        assert!(
            line.ends_with(&holder),
            "not shown held by {holder}: {line}"
        );
    }
    let holds = ferry_ok(&dr, &["holds"]);
    assert!(
        holds.contains(&holder) && holds.contains(&format!("test-failover job {}", job.id)),
        "{holds}"
    );

    // The test machine's disks read the points' exact bytes through the scratch layers, and
    // the points export whole.
    for (i, d) in st.disks.iter().enumerate() {
        let e = expected[i].display().to_string();
        assert!(
            same(&d.path, "qcow2", &e, "raw"),
            "the test machine's {} no longer reads its point",
            d.disk
        );
        support::assert_point_equals(&dr.lab, dr.dir.path(), &d.disk, held[i], &e);
    }

    // `ferry retention` (the master target stopped) says what it kept for the test.
    dr.stop_master();
    let out = ferry_ok(&dr, &["retention", "--keep-all-secs", "0", "--tier", "1:1"]);
    for (d, s) in DISKS.iter().zip(&held) {
        assert!(
            out.contains(&format!("{d}: kept point {s} held by {holder}")),
            "{out}"
        );
    }
    // The master target, started again, serves the test's points again on their port: the
    // test machine reads them through its scratch layers as before.
    dr.start_master();
    for (i, d) in st.disks.iter().enumerate() {
        let e = expected[i].display().to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !same(&d.path, "qcow2", &e, "raw") {
            assert!(
                Instant::now() < deadline,
                "the test machine's {} does not read its point after the master target restarted",
                d.disk
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Cleanup releases the points; retention then removes them.
    let c = dr.run_job(&op, json!({"kind": "cleanup"}));
    assert_eq!(
        c.steps[2].detail,
        format!("released the points held by {holder}"),
        "{c:#?}"
    );
    assert!(ferry_ok(&dr, &["holds"]).contains("(no holds)"));
    for (d, s) in DISKS.iter().zip(&held) {
        wait_removed(&dr, d, *s);
    }
    for w in writers {
        w.finish(&dr.rt);
    }
    dr.caught_up();
}

/// One guest writing random tagged extents to both disks in turn (a random disk each time),
/// each write issued only after the one before was acknowledged, for `time`; flushes at the
/// end. The log names each write's disk; sequence numbers run across both disks.
fn write_across(dr: &Dr, seed: u64, time: Duration) -> Vec<(usize, u64, usize)> {
    dr.rt.block_on(async {
        let mut guests = Vec::new();
        for s in &dr.socks {
            guests.push(
                ferry_nbd::client::Client::connect_unix(s, "guest")
                    .await
                    .unwrap(),
            );
        }
        let mut rng = support::Rng(seed);
        let mut log = Vec::new();
        let end = Instant::now() + time;
        while Instant::now() < end {
            let d = rng.below(guests.len() as u64) as usize;
            let (off, len) = support::random_extent(&mut rng, SIZE);
            log.push((d, off, len));
            let data = support::tagged(log.len() as u64, off, len);
            guests[d].write(off, &data, false).await.unwrap();
        }
        for g in &mut guests {
            g.flush().await.unwrap();
        }
        log
    })
}

/// A machine's policy is what its roles do: with compression off, a bandwidth limit in a
/// weekly window that covers the whole week, and one point per hour kept, the process server
/// (configured by the configuration server) seals chunks without zstd and sends no faster than
/// the window's limit, and the master target thins the disks' points to the hourly tier, the
/// newest still equal to the guest's disk.
#[test]
fn a_machines_policy_sets_compression_bandwidth_and_retention_at_its_roles() {
    let all_week = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let policy = json!({"name": "gold", "mode": "continuous", "checkpoint_interval_secs": 1,
        "rpo_alert_secs": 60, "compression": false,
        "retention": [{"every_secs": 3600, "keep_secs": 86_400}],
        "bandwidth": {"limit_mbit": null, "schedule": [
            {"days": all_week, "start_minute": 0, "end_minute": 1440, "limit_mbit": 8}]}});
    let dr = Dr::start_enrolled_with(Some(policy), &["--retention-interval-secs", "1"]);
    dr.caught_up();
    for d in DISKS {
        let s = dr.lab.status(d).unwrap();
        assert_eq!(s.bandwidth_limit_mbit, Some(8), "{d}: {s:?}");
        // `false`, as earlier versions stored the policy, still means off.
        assert_eq!(s.compression, "off", "{d}: {s:?}");
    }

    // 3 MiB of text (every 64 KiB block different), which zstd would shrink several times:
    // uncompressed at 8 Mbit/s (1 MB/s) it takes about 3 s to reach the master target.
    let mut text: Vec<u8> = (0..3 * MIB / 32)
        .flat_map(|i| format!("line {i:>10} of the policy test\n").into_bytes())
        .collect();
    text.truncate(3 * MIB as usize);
    let began = Instant::now();
    dr.rt.block_on(async {
        let mut g = ferry_nbd::client::Client::connect_unix(&dr.socks[0], "guest")
            .await
            .unwrap();
        g.write(16 * MIB, &text, false).await.unwrap();
        g.flush().await.unwrap();
    });
    let last = dr.caught_up();
    let took = began.elapsed();
    // One burst of 0.1 s aside, 3 MiB cannot cross an 8 Mbit/s link in under 3.1 s.
    assert!(
        took >= Duration::from_millis(2900),
        "3 MiB of text reached the master target in {took:?}: over 8 Mbit/s (or compressed)"
    );
    // The process server's report says it replicated: a throughput for the disk in the API.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let disk = dr.ok(
            &dr.admin(),
            Method::GET,
            "/v1/tenants/acme/machines/web/disks/d0",
            None,
        );
        if disk["throughput_bytes_per_sec"]
            .as_f64()
            .is_some_and(|t| t > 0.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "no throughput reported: {disk}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The metrics carry what the roles report: the disk's bytes sent, journal and backlog, and
    // each appliance's own CPU and memory.
    let (_, m) = dr
        .rt
        .block_on(dr.admin().raw(Method::GET, "/metrics", None))
        .unwrap();
    let m = String::from_utf8_lossy(&m);
    let value = |name: &str, labels: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{{labels}}} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}{{{labels}}} in the metrics:\n{m}"))
    };
    let d0 = r#"tenant="acme",machine="web",disk="d0""#;
    assert!(value("ferry_disk_sent_bytes", d0) >= (3 * MIB) as f64);
    value("ferry_disk_journal_bytes", d0);
    value("ferry_disk_backlog_records", d0);
    for role in [
        r#"appliance="ps1",role="process-server""#,
        r#"appliance="mt1",role="master-target""#,
    ] {
        let labels = format!("{role},tenant=\"acme\"");
        assert!(value("ferry_appliance_cpu_seconds", &labels) > 0.0);
        assert!(value("ferry_appliance_memory_bytes", &labels) > 1e6);
    }
    value(
        "ferry_appliance_cache_free_ratio",
        r#"appliance="ps1",role="process-server",tenant="acme""#,
    );

    // Every chunk the master target stores is sealed without zstd (blob header, flags byte:
    // docs/formats.md, "Chunk blob").
    let blobs = support::stored_chunks(&dr.lab);
    assert!(blobs.len() >= 48, "{} chunks stored", blobs.len());
    for (id, head) in &blobs {
        assert_eq!(&head[..4], b"FCB1", "{id}");
        assert_eq!(head[5] & 1, 0, "{id} is zstd-compressed");
    }

    // Hourly retention: of the points committed (five more, one small write each), the master
    // target keeps the newest and at most one per hour (two when the test straddles an hour).
    let mut last = last;
    for i in 0..5u64 {
        dr.rt.block_on(async {
            let mut g = ferry_nbd::client::Client::connect_unix(&dr.socks[0], "guest")
                .await
                .unwrap();
            g.write(24 * MIB + i * 4096, &[0xa5; 4096], false)
                .await
                .unwrap();
            g.flush().await.unwrap();
        });
        last = dr.caught_up();
    }
    let sent = dr.lab.status("d0").unwrap().checkpoints_sent;
    assert!(sent >= 7, "d0 committed {sent} checkpoints");
    let deadline = Instant::now() + Duration::from_secs(30);
    let kept = loop {
        let kept = dr.lab.repository().unwrap().points("d0").unwrap();
        if kept.len() <= 3 || Instant::now() > deadline {
            break kept;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        kept.len() <= 3,
        "d0 keeps {} points under an hourly tier",
        kept.len()
    );
    assert_eq!(kept.last().unwrap().meta.seq, last[0]);
    let e = format!("nbd+unix:///guest?socket={}", dr.socks[0].display());
    support::assert_point_equals(&dr.lab, dr.dir.path(), "d0", last[0], &e);
}

/// A machine whose policy says `"compression": "lz4"`: its process server (configured by the
/// configuration server) seals chunks with LZ4, the master target stores them as they are, and
/// the newest point, read back through LZ4, equals the guest's disk.
#[test]
fn a_machine_with_lz4_compression_stores_lz4_chunks_that_read_back_equal() {
    let policy = json!({"name": "gold", "mode": "continuous", "checkpoint_interval_secs": 1,
        "rpo_alert_secs": 60, "compression": "lz4"});
    let dr = Dr::start_enrolled_with(Some(policy), &[]);
    dr.caught_up();
    assert_eq!(dr.lab.status("d0").unwrap().compression, "lz4");
    // 2 MiB of text (each 64 KiB block different, all compressible) and 1 MiB of random bytes.
    let mut data: Vec<u8> = (0..2 * MIB / 32)
        .flat_map(|i| format!("line {i:>10} of the lz4 test\n").into_bytes())
        .collect();
    data.truncate(2 * MIB as usize);
    let mut rng = support::Rng(0x9e37_79b9_7f4a_7c15);
    data.extend((0..MIB / 8).flat_map(|_| rng.next().to_le_bytes()));
    dr.rt.block_on(async {
        let mut g = ferry_nbd::client::Client::connect_unix(&dr.socks[0], "guest")
            .await
            .unwrap();
        g.write(8 * MIB, &data, false).await.unwrap();
        g.flush().await.unwrap();
    });
    let last = dr.caught_up();
    // Blob header, flags byte (docs/formats.md, "Chunk blob"): 2 is LZ4, 0 stored plain; never
    // zstd. The text's 32 blocks are LZ4 blobs; the random ones stay plain.
    let blobs = support::stored_chunks(&dr.lab);
    let flags: Vec<u8> = blobs.iter().map(|(_, b)| b[5]).collect();
    assert!(flags.iter().all(|f| *f == 0 || *f == 2), "flags {flags:?}");
    let lz4 = flags.iter().filter(|f| **f == 2).count();
    assert!(lz4 >= 32, "{lz4} LZ4 chunks of {}", blobs.len());
    let e = format!("nbd+unix:///guest?socket={}", dr.socks[0].display());
    support::assert_point_equals(&dr.lab, dr.dir.path(), "d0", last[0], &e);
    let v = dr.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn a_machines_disks_are_cut_together_as_one_crash_consistent_state() {
    let dr = Dr::start_enrolled();
    dr.caught_up();
    let bases: Vec<Vec<u8>> = (0..DISKS.len()).map(|i| dr.guest_image(i)).collect();
    let began = ferry_process_server::status::now_unix_ns();
    let log = write_across(&dr, 23, Duration::from_secs(10));
    let last = dr.caught_up();
    assert!(log.len() > 200, "the guest wrote {} times", log.len());

    // The cuts made since the guest began writing, and each disk's point at them.
    let repo = dr.lab.repository().unwrap();
    let cuts = |disk: &str| support::cuts_after(&repo, disk, began);
    let (c0, c1) = (cuts("d0"), cuts("d1"));
    let common: Vec<(u64, u64, u64)> = c0
        .iter()
        .filter_map(|(c, s0)| c1.get(c).map(|s1| (*c, *s0, *s1)))
        .collect();
    assert!(
        common.len() >= 5,
        "only {} cuts of the machine in 10 s of writes at a 1 s interval (d0 {c0:?}, d1 {c1:?})",
        common.len()
    );
    // Every cut the process server made got a point on both disks (no disk skipped one).
    assert_eq!(c0.len(), common.len(), "d0 cuts {c0:?} vs d1 {c1:?}");
    assert_eq!(c1.len(), common.len(), "d1 cuts {c1:?} vs d0 {c0:?}");
    // Each cut (up to 8 of them, spread, always the last) is one prefix of the guest's writes
    // across both disks, and later cuts hold more.
    let idx: Vec<u64> = (0..common.len() as u64).collect();
    let mut prev = 0;
    let mut mid_stream = 0;
    for i in support::spread(&idx, 8) {
        let (cut, s0, s1) = common[i as usize];
        let (a, b) = (dr.point_image("d0", s0), dr.point_image("d1", s1));
        let n = support::check_machine_prefix(&[&a, &b], &[&bases[0], &bases[1]], &log)
            .unwrap_or_else(|e| panic!("cut {cut} (d0@{s0}, d1@{s1}): {e}"));
        assert!(
            n >= prev,
            "cut {cut} holds {n} writes, an earlier one {prev}"
        );
        if n > 0 && (n as usize) < log.len() {
            mid_stream += 1;
        }
        prev = n;
    }
    assert!(
        mid_stream >= 2,
        "too few cuts fell while the guest wrote ({mid_stream}): the check proved little"
    );
    // The newest cut holds every write, and is each disk's newest point.
    assert_eq!(prev as usize, log.len(), "the last cut lacks writes");
    let newest = common.last().unwrap();
    assert_eq!((newest.1, newest.2), (last[0], last[1]));
    // A failover of the machine picks that cut, said to be consistent.
    let m =
        ferry_failover::points::choose_machine(&repo, &["d0".to_string(), "d1".to_string()], None)
            .unwrap();
    assert!(m.consistent);
    assert_eq!(
        m.points.iter().map(|p| p.meta.seq).collect::<Vec<_>>(),
        [newest.1, newest.2]
    );
    // The API's machine points name the cut; both points of the newest are the machine's.
    let pts = dr.ok(
        &dr.admin(),
        Method::GET,
        "/v1/tenants/acme/machines/web/points",
        None,
    );
    let at_newest: Vec<&Value> = pts
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["group_cut"] == json!(newest.0))
        .collect();
    assert_eq!(at_newest.len(), 2, "{pts}");
    assert!(at_newest
        .iter()
        .all(|p| p["machine_consistent"] == json!(true)));
    // The points say so: "crash (machine)".
    let listed = dr.lab.ferry(&["points", "--disk", "d0"]).unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("crash (machine)"), "{text}");
    // The process server's status names each disk's machine and its newest cut.
    let out = Command::new(support::exe())
        .args(["status", "--cache"])
        .arg(&dr.lab.cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("machine web: newest cut 20").count(),
        2,
        "{text}"
    );
}

/// The answers the master target keeps in `{state}/orders/`: (order id, step).
fn kept_answers(dr: &Dr) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = std::fs::read_dir(dr.path("mt-state/orders"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
            let step = v["order"]["step"]["step"].as_str().unwrap().to_string();
            (v["order"]["id"].as_u64().unwrap(), step)
        })
        .collect();
    out.sort();
    out
}

/// Wait (bounded by the test's deadline) until the master target keeps only answers to
/// these steps, and return them.
fn wait_kept(dr: &Dr, steps: &[&str]) -> Vec<(u64, String)> {
    loop {
        let kept = kept_answers(dr);
        if kept
            .iter()
            .map(|(_, s)| s.as_str())
            .eq(steps.iter().copied())
        {
            return kept;
        }
        assert!(
            dr.began.elapsed() < DEADLINE,
            "the master target keeps {kept:?}, not only {steps:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A role keeps the answer of each order it ran (to answer it again, not run it twice, when
/// the order is sent again), but only as long as the configuration server keeps the order:
/// once a job ends, its answers go. The one that serves a running test failover stays: a
/// master target started again serves the test's points from it.
#[test]
fn a_roles_kept_answers_go_when_their_jobs_end_but_a_running_test_is_served_again() {
    let mut dr = Dr::start_enrolled();
    let op = dr.person("olivia", "operator");
    dr.common_cut(0);
    // Each round's answers (points, serve, scratch; stop, discard, holds, release) go, so
    // the directory does not grow with the number of jobs.
    let mut most = 0;
    for _ in 0..3 {
        dr.run_job(&op, json!({"kind": "test-failover"}));
        most = most.max(kept_answers(&dr).len());
        dr.run_job(&op, json!({"kind": "cleanup"}));
        most = most.max(kept_answers(&dr).len());
        wait_kept(&dr, &[]);
    }
    assert!(most > 0, "the master target kept no answers at all");

    // A test failover that runs on: of its answers only the one serving its points stays.
    let job = dr.run_job(&op, json!({"kind": "test-failover"}));
    let kept = wait_kept(&dr, &["serve"]);
    let st = dr.status();
    let expected: Vec<String> = st
        .disks
        .iter()
        .map(|d| {
            let p = dr.path(&format!("point-{}.raw", d.disk));
            std::fs::write(&p, dr.point_image(&d.disk, d.point_seq.unwrap())).unwrap();
            p.display().to_string()
        })
        .collect();
    for (d, e) in st.disks.iter().zip(&expected) {
        assert!(same(&d.path, "qcow2", e, "raw"), "{} before", d.disk);
    }
    // The master target restarts: it serves the test's points again from that answer, and
    // keeps it.
    dr.stop_master();
    dr.start_master();
    for (d, e) in st.disks.iter().zip(&expected) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !same(&d.path, "qcow2", e, "raw") {
            assert!(
                Instant::now() < deadline,
                "the test machine's {} does not read its point after the master target restarted",
                d.disk
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(kept_answers(&dr), kept, "test job {}", job.id);

    // Cleanup stops serving: then nothing is kept.
    dr.run_job(&op, json!({"kind": "cleanup"}));
    wait_kept(&dr, &[]);
}
