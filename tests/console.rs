//! The local console end to end (issue 6): the real `ferry console` in a real tmux pane of
//! 80x24, driven with `send-keys` and read with `capture-pane`, against a real configuration
//! server. Network changes happen inside network namespaces each test makes (a veth pair whose
//! far end is the "gateway"), and are checked with `ip`; hooks that would reboot or reset the
//! appliance append to a file instead, so the tests see what would have happened.

#[path = "support/config_server.rs"]
mod harness;

use ferry_api::{AuditEntry, AuditResult};
use ferry_config_server::client::{Client, Method};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every test ends within this, waits included.
const TEST_BUDGET: Duration = Duration::from_secs(120);

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "fc{}{tag}{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace with a unique name and loopback up; deleted when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = unique(tag);
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }
    fn ip(&self, args: &[&str]) -> String {
        sh(Command::new("ip").args(["-n", &self.0]).args(args))
    }
    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Whether this kernel makes 802.1Q VLAN interfaces (module 8021q). Some test machines have
/// neither the module nor VLAN-filtering bridges; there the tests check that a VLAN is
/// refused clearly and undone, and say that the VLAN itself was not tried.
fn kernel_has_vlans() -> bool {
    let ns = Netns::new("v");
    ns.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    let ok = Command::new("ip")
        .args(["-n", &ns.0, "link", "add", "link", "va", "name", "va.5"])
        .args(["type", "vlan", "id", "5"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!("this kernel has no 802.1Q VLAN support: VLANs are checked as refusals only");
    }
    ok
}

/// The appliance's namespace (`eth-t`, 10.77.0.5/24, default via 10.77.0.1) and the gateway's
/// (`gw0`: 10.77.0.1/24, and, when the kernel has VLANs, 10.77.100.1/24 on VLAN 100;
/// 2001:db8:77::1/64 on VLAN 100 when there is one, else on `gw0`).
struct Lan {
    appliance: Netns,
    _gateway: Netns,
    vlans: bool,
}

fn lan() -> Lan {
    let vlans = kernel_has_vlans();
    let appliance = Netns::new("a");
    let gateway = Netns::new("g");
    sh(Command::new("ip").args([
        "link",
        "add",
        "eth-t",
        "netns",
        &appliance.0,
        "type",
        "veth",
        "peer",
        "name",
        "gw0",
        "netns",
        &gateway.0,
    ]));
    gateway.ip(&["addr", "add", "10.77.0.1/24", "dev", "gw0"]);
    let gw_v6_dev = if vlans { "gw0.100" } else { "gw0" };
    gateway.ip(&["link", "set", "gw0", "up"]);
    if vlans {
        gateway.ip(&[
            "link", "add", "link", "gw0", "name", "gw0.100", "type", "vlan", "id", "100",
        ]);
        gateway.ip(&["addr", "add", "10.77.100.1/24", "dev", "gw0.100"]);
        gateway.ip(&["link", "set", "gw0.100", "up"]);
    }
    gateway.ip(&[
        "addr",
        "add",
        "2001:db8:77::1/64",
        "dev",
        gw_v6_dev,
        "nodad",
    ]);
    appliance.ip(&["addr", "add", "10.77.0.5/24", "dev", "eth-t"]);
    appliance.ip(&["link", "set", "eth-t", "up"]);
    appliance.ip(&["route", "add", "default", "via", "10.77.0.1"]);
    Lan {
        appliance,
        _gateway: gateway,
        vlans,
    }
}

/// What "nothing changed" compares: each link's name, MTU and global addresses, and the IPv4
/// routes.
fn net_state(ns: &Netns) -> String {
    let mut out = String::new();
    for l in ns.ip(&["-o", "link", "show"]).lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        let mtu = w.iter().position(|x| *x == "mtu").map_or("", |i| w[i + 1]);
        out.push_str(&format!("link {} mtu {mtu}\n", w[1]));
    }
    for l in ns.ip(&["-o", "addr", "show"]).lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if w[3].starts_with("fe80") || w[1] == "lo" {
            continue;
        }
        out.push_str(&format!("addr {} {} {}\n", w[1], w[2], w[3]));
    }
    out.push_str(&ns.ip(&["-4", "route", "show"]));
    out
}

/// A running `ferry config-server` (in a namespace, or on the host's loopback); killed when
/// dropped. Its hooks append `NAME args` lines to `actions`.
struct Server {
    child: Child,
    state: PathBuf,
    url: String,
    actions: PathBuf,
}

impl Server {
    fn start(dir: &Path, ns: Option<&Netns>, extra: &[String]) -> Server {
        let state = dir.join("state");
        let actions = dir.join("actions");
        // A restarted server writes its new address here.
        let _ = std::fs::remove_file(state.join("listening"));
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = ns.exec();
                c.arg(harness::exe());
                c
            }
            None => Command::new(harness::exe()),
        };
        let hook = |name: &str, args: &str| {
            format!(
                "--hook={name}=echo \"{name} {args}\" >> {}",
                actions.display()
            )
        };
        cmd.arg("config-server")
            .arg("--state")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0"])
            .args([
                hook("reboot", ""),
                hook("factory-reset", ""),
                hook("update-slot", "$FERRY_SLOT"),
                hook("hostname", "$FERRY_HOSTNAME"),
                hook("proxy", "$FERRY_PROXY"),
                hook("dns", "$FERRY_DNS"),
            ])
            .args(extra)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        let start = Instant::now();
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(state.join("listening")) {
                break a;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!(
                    "config-server exited early: {st}: {}",
                    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no config-server"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Server {
            child,
            state,
            url: format!("https://{addr}"),
            actions,
        }
    }

    fn actions(&self) -> String {
        std::fs::read_to_string(&self.actions).unwrap_or_default()
    }

    /// `ferry ctl --json ...` as the server's first administrator, from inside `ns`.
    fn ctl(&self, ns: Option<&Netns>, args: &[&str]) -> Value {
        let mut c = match ns {
            Some(ns) => {
                let mut c = ns.exec();
                c.arg(harness::exe());
                c
            }
            None => Command::new(harness::exe()),
        };
        c.args(["ctl", "--json", "--server", &self.url, "--cert-dir"])
            .arg(self.state.join("admin"))
            .args(args);
        serde_json::from_str(&sh(&mut c)).unwrap_or(Value::Null)
    }

    fn admin(&self) -> Client {
        Client::from_cert_dir(&self.url, &self.state.join("admin")).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ferry console` in a detached tmux session of its own (own server, its socket in a
/// temporary directory), 80x24.
struct Tmux {
    socket: String,
    _dir: tempfile::TempDir,
    started: Instant,
}

impl Tmux {
    fn start(server: &Server, ns: Option<&Netns>, idle_lock_secs: u64, args: &str) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("tmux").display().to_string();
        let mut cmd = String::new();
        if let Some(ns) = ns {
            cmd.push_str(&format!("ip netns exec {} ", ns.0));
        }
        cmd.push_str(&format!(
            "{} console --server {} --cert-dir {} --idle-lock-secs {idle_lock_secs} {args}",
            harness::exe().display(),
            server.url,
            server.state.join("admin").display()
        ));
        sh(Command::new("tmux")
            .args(["-u", "-S", &socket, "-f", "/dev/null", "new-session", "-d"])
            .args(["-s", "c", "-x", "80", "-y", "24", &cmd]));
        let t = Tmux {
            socket,
            _dir: dir,
            started: Instant::now(),
        };
        t.tmux(&["set-option", "-t", "c", "remain-on-exit", "on"]);
        t
    }

    fn tmux(&self, args: &[&str]) -> String {
        sh(Command::new("tmux")
            .args(["-u", "-S", &self.socket])
            .args(args))
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", "c"])
    }

    /// Wait until the pane shows `needle`; the screen is returned for more checks.
    fn wait_for(&self, needle: &str, secs: u64) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            // A long message wraps over two lines.
            let flat = s.split_whitespace().collect::<Vec<_>>().join(" ");
            if (s.contains(needle) || flat.contains(needle)) && drawn(&s) {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(secs) && self.started.elapsed() < TEST_BUDGET,
                "the console did not show {needle:?} within {secs} s; it shows:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn key(&self, k: &str) {
        self.tmux(&["send-keys", "-t", "c", k]);
        // The console reads keys every 200 ms at most; let each one land in order.
        std::thread::sleep(Duration::from_millis(60));
    }

    fn text(&self, s: &str) {
        if !s.is_empty() {
            self.tmux(&["send-keys", "-t", "c", "-l", s]);
        }
        std::thread::sleep(Duration::from_millis(60));
    }

    /// Fill a form from its focused field down: clear each field, type, move on.
    fn fill(&self, values: &[&str]) {
        for v in values {
            self.key("C-u");
            self.text(v);
            self.key("Down");
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-S", &self.socket, "kill-server"])
            .status();
    }
}

/// Whether a whole frame is on the screen (a capture can catch one half drawn).
fn drawn(screen: &str) -> bool {
    screen.lines().any(|l| {
        (l.starts_with('└') && l.ends_with('┘')) || (l.starts_with("+-") && l.ends_with("-+"))
    })
}

/// The pane is 80x24 and the screen's frame is whole: header, box, message, key line.
fn fits(screen: &str) {
    let lines: Vec<&str> = screen.lines().collect();
    assert!(lines.len() <= 24, "{} lines:\n{screen}", lines.len());
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(lines[0].contains("Ferry appliance console"), "{screen}");
    assert!(drawn(screen), "the box is not closed:\n{screen}");
}

const PASSWORD: &str = "correct-horse-1";

fn set_password(t: &Tmux) {
    fits(&t.wait_for("Setup 1/4", 20));
    t.fill(&[PASSWORD, PASSWORD]);
    t.key("Enter");
}

#[test]
fn wizard_configures_the_appliance_vlan_mtu_and_registration() {
    let dir = tempfile::tempdir().unwrap();
    let lan = lan();
    let ns = &lan.appliance;
    let s = Server::start(
        &dir.path().join("appliance").tap_mkdir(),
        Some(ns),
        &["--network-confirm-secs=8".into()],
    );
    // The provider: another configuration server, with a registration key for this appliance.
    let provider = Server::start(&dir.path().join("provider").tap_mkdir(), Some(ns), &[]);
    provider.ctl(Some(ns), &["tenant", "acme"]);
    let key = provider.ctl(
        Some(ns),
        &[
            "token",
            "--name",
            "site-a",
            "--role",
            "operator",
            "--tenant",
            "acme",
            "--appliance",
            "configuration-server",
        ],
    );
    let t = Tmux::start(&s, Some(ns), 600, "");
    set_password(&t);

    let screen = t.wait_for("Setup 2/4: network", 10);
    fits(&screen);
    let (dev, addr, gw) = if lan.vlans {
        ("eth-t.100", "10.77.100.2/24", "10.77.100.1")
    } else {
        // No VLANs here: asking for one is refused, says why, and changes nothing (not even
        // the MTU, which is set first); then the same without the VLAN.
        let before = net_state(ns);
        t.fill(&[
            "eth-t",
            "static",
            "10.77.0.2/24",
            "10.77.0.1",
            "",
            "",
            "",
            "100",
            "1400",
        ]);
        t.key("Enter");
        let screen = t.wait_for("cannot make VLAN interfaces", 15);
        fits(&screen);
        assert!(screen.contains("Refused:"), "{screen}");
        assert_eq!(net_state(ns), before);
        ("eth-t", "10.77.0.2/24", "10.77.0.1")
    };
    let vlan_field = if lan.vlans { "100" } else { "" };
    t.fill(&[
        "eth-t",
        "static",
        addr,
        gw,
        "2001:db8:77::2/64",
        "2001:db8:77::1",
        gw,
        vlan_field,
        "1400",
    ]);
    t.key("Enter");
    let screen = t.wait_for("Keep this network configuration?", 15);
    fits(&screen);
    assert!(
        screen.contains(&format!("gateway {gw} answers")),
        "{screen}"
    );
    assert!(
        screen.contains("gateway 2001:db8:77::1 answers"),
        "{screen}"
    );
    let shown6 = ns.ip(&["-6", "addr", "show", "dev", dev]);
    assert!(shown6.contains("inet6 2001:db8:77::2/64"), "{shown6}");
    let route6 = ns.ip(&["-6", "route", "show", "default"]);
    assert!(
        route6.starts_with(&format!("default via 2001:db8:77::1 dev {dev} ")),
        "{route6}"
    );
    if lan.vlans {
        let vlan = ns.ip(&["-d", "link", "show", "eth-t.100"]);
        assert!(
            vlan.contains("vlan protocol 802.1Q id 100") && vlan.contains("mtu 1400"),
            "{vlan}"
        );
    }
    assert!(ns.ip(&["link", "show", "eth-t"]).contains("mtu 1400"));
    let shown = ns.ip(&["-4", "addr", "show", "dev", dev]);
    assert!(shown.contains(&format!("inet {addr}")), "{shown}");
    assert!(
        !shown.contains("10.77.0.5/"),
        "the old address is replaced: {shown}"
    );
    let route = ns.ip(&["route", "show", "default"]);
    assert!(
        route.starts_with(&format!("default via {gw} dev {dev} ")) && route.lines().count() == 1,
        "the old default route is replaced: {route}"
    );
    t.key("Enter");

    fits(&t.wait_for("Setup 3/4", 10));
    t.fill(&["ferry-dr-01", gw, "http://bob:hunter2@proxy.example:3128"]);
    t.key("Enter");
    fits(&t.wait_for("Setup 4/4: registration", 10));
    let provider_url = provider.url.clone();
    t.fill(&[
        &provider_url,
        key["token"].as_str().unwrap(),
        key["ca_sha256"].as_str().unwrap(),
    ]);
    t.key("Enter");
    let screen = t.wait_for("Main menu", 15);
    fits(&screen);
    assert!(
        screen.contains("Registered with") && screen.contains("as site-a"),
        "{screen}"
    );
    assert!(
        screen.contains("ferry-dr-01"),
        "the header names the host:\n{screen}"
    );
    let appliances = provider.ctl(Some(ns), &["appliances"]);
    assert_eq!(appliances[0]["name"], "site-a", "{appliances}");
    let actions = s.actions();
    assert!(actions.contains("hostname ferry-dr-01\n"), "{actions}");
    assert!(actions.contains(&format!("dns {gw}\n")), "{actions}");
    assert!(
        actions.contains("proxy http://bob:hunter2@proxy.example:3128\n"),
        "{actions}"
    );

    // Confirmed: still there after the confirmation time has passed.
    std::thread::sleep(Duration::from_secs(9));
    assert!(ns
        .ip(&["-4", "addr", "show", "dev", dev])
        .contains(&format!("inet {addr}")));
    let setup = s.ctl(Some(ns), &["call", "GET", "/v1/system/setup"]);
    assert_eq!(setup["wizard_done"], true, "{setup}");
    assert_eq!(setup["network"]["mtu"], 1400, "{setup}");
    assert_eq!(
        setup["settings"]["proxy"], "http://***@proxy.example:3128",
        "the API does not show the proxy's password: {setup}"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn bad_network_input_is_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let lan = lan();
    let ns = &lan.appliance;
    let s = Server::start(dir.path(), Some(ns), &[]);
    let t = Tmux::start(&s, Some(ns), 600, "");
    set_password(&t);
    t.wait_for("Setup 2/4: network", 10);
    let before = net_state(ns);

    let attempts: &[(&[&str], &str)] = &[
        (
            &["eth-t", "static", "10.77.0.300/24", "10.77.0.1"],
            "is not an IP address",
        ),
        (
            &["eth-t", "static", "10.77.0.7/24", "10.88.0.1"],
            "10.88.0.1 is unreachable: it is outside 10.77.0.7/24",
        ),
        (
            &["eth-nope", "static", "10.77.0.7/24", "10.77.0.1"],
            "no interface eth-nope here",
        ),
    ];
    // Well-formed, applied (with an MTU, and a VLAN where the kernel has them), but nobody
    // answers at the gateway: everything is taken back.
    let vlan = if lan.vlans { "200" } else { "" };
    let unanswered = [
        "eth-t",
        "static",
        "10.77.0.7/24",
        "10.77.0.99",
        "",
        "",
        "",
        vlan,
        "1300",
    ];
    let dev = if lan.vlans { "eth-t.200" } else { "eth-t" };
    let says = format!("gateway 10.77.0.99 did not answer on {dev}");
    let mut attempts = attempts.to_vec();
    attempts.push((&unanswered, &says));
    for (values, says) in &attempts {
        // Back to the form's first field, then fill every field.
        // Every fill covers all nine fields, so the focus is back on the first one.
        let mut all: Vec<&str> = values.to_vec();
        all.resize(9, "");
        t.fill(&all);
        t.key("Enter");
        let screen = t.wait_for(says, 20);
        fits(&screen);
        assert!(screen.contains("Refused:"), "{screen}");
        assert_eq!(net_state(ns), before, "after {values:?}");
    }
    t.wait_for("within 5 s; nothing was changed", 1);
    // Each refusal is in the audit log.
    let audit = s.ctl(Some(ns), &["audit", "--limit", "100"]);
    let refused = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "PUT /v1/system/network" && e["result"] == "refused")
        .count();
    assert_eq!(refused, 4, "{audit}");
}

#[test]
fn an_unconfirmed_network_change_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let lan = lan();
    let ns = &lan.appliance;
    let s = Server::start(dir.path(), Some(ns), &["--network-confirm-secs=4".into()]);
    let t = Tmux::start(&s, Some(ns), 600, "");
    set_password(&t);
    t.wait_for("Setup 2/4: network", 10);
    let before = net_state(ns);
    let (dev, addr, gw, vlan) = if lan.vlans {
        ("eth-t.100", "10.77.100.9/24", "10.77.100.1", "100")
    } else {
        ("eth-t", "10.77.0.9/24", "10.77.0.1", "")
    };
    t.fill(&["eth-t", "static", addr, gw, "", "", "", vlan, "1400"]);
    t.key("Enter");
    let screen = t.wait_for("Rolled back automatically in", 15);
    fits(&screen);
    assert!(ns
        .ip(&["-4", "addr", "show", "dev", dev])
        .contains(&format!("inet {addr}")));
    assert!(ns.ip(&["link", "show", "eth-t"]).contains("mtu 1400"));
    // Nobody confirms.
    let screen = t.wait_for("was rolled back (not confirmed within 4 s)", 15);
    fits(&screen);
    assert!(screen.contains("Setup 2/4: network"), "{screen}");
    assert_eq!(net_state(ns), before);
    let route = ns.ip(&["route", "show", "default"]);
    assert!(route.contains("default via 10.77.0.1 dev eth-t"), "{route}");
}

#[test]
fn a_change_pending_when_the_server_dies_is_rolled_back_when_it_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let lan = lan();
    let ns = &lan.appliance;
    let before = net_state(ns);
    let confirm = ["--network-confirm-secs=3".to_string()];
    let s = Server::start(dir.path(), Some(ns), &confirm);
    let body = dir.path().join("network.json");
    std::fs::write(
        &body,
        json!({"interface": "eth-t", "mode": "static", "ipv4": "10.77.0.9/24",
               "gateway4": "10.77.0.1", "mtu": 1400})
        .to_string(),
    )
    .unwrap();
    let path = body.display().to_string();
    let pending = s.ctl(
        Some(ns),
        &["call", "PUT", "/v1/system/network", "--file", &path],
    );
    assert_eq!(pending["confirm_secs"], 3, "{pending}");
    let changed = net_state(ns);
    assert!(
        changed.contains("10.77.0.9/24") && changed.contains("mtu 1400"),
        "{changed}"
    );
    // SIGKILL, and the deadline passes while nothing runs.
    drop(s);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        net_state(ns),
        changed,
        "nothing runs while the server is down"
    );
    let s = Server::start(dir.path(), Some(ns), &confirm);
    let start = Instant::now();
    while net_state(ns) != before {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "not rolled back after the restart: {}",
            net_state(ns)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let state = s.ctl(Some(ns), &["call", "GET", "/v1/system/network"]);
    assert!(state["pending"].is_null(), "{state}");
    assert!(
        state["last_rollback"]
            .as_str()
            .is_some_and(|m| m.contains("not confirmed within 3 s")),
        "{state}"
    );
}

#[test]
fn screens_fit_80x24_and_maintenance_runs_the_configured_commands() {
    let dir = tempfile::tempdir().unwrap();
    // A recovery site that accepts TCP but speaks no TLS.
    let site = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let site_addr = site.local_addr().unwrap();
    let s = Server::start(
        dir.path(),
        None,
        &[
            format!("--recovery-site={site_addr}"),
            format!("--cache-dir={}", dir.path().display()),
        ],
    );
    harness::run(async {
        let admin = s.admin();
        harness::inventory(&admin).await;
        harness::ok(
            &admin,
            Method::PUT,
            "/v1/tenants/acme/machines/web/disks/d0/report",
            Some(json!({"state": "protected", "rpo_seconds": 45.0,
                        "throughput_bytes_per_sec": 3.2e6})),
        )
        .await;
    });
    // The serial console's frames: + - | instead of line-drawing characters.
    let t = Tmux::start(&s, None, 600, "--ascii");
    set_password(&t);
    t.wait_for("Setup 2/4: network", 10);
    t.key("Escape");
    t.wait_for("Setup 3/4", 10);
    t.fill(&["ferry-dr-02", "", "http://ann:s3cret-pw@proxy.example:3128"]);
    t.key("Enter");
    t.wait_for("Setup 4/4", 10);
    t.key("Escape");
    let menu = t.wait_for("Main menu", 10);
    fits(&menu);
    for item in [
        "1  Dashboard",
        "5  Diagnostics",
        "6  Maintenance",
        "8  Lock the console",
    ] {
        assert!(menu.contains(item), "{menu}");
    }

    t.key("1");
    let dash = t.wait_for("Protected disk", 10);
    fits(&dash);
    for want in [
        "acme/web/d0",
        "protected",
        "45 s",
        "3.2 MB/s",
        "Cache: ",
        &format!("Recovery site {site_addr}: REACHABLE"),
        "Alerts: 1 active",
        "RPO 45.0 s is over the threshold of 30 s",
    ] {
        assert!(dash.contains(want), "{want:?} missing:\n{dash}");
    }
    t.key("Escape");
    t.wait_for("Main menu", 5);

    t.key("5");
    let diag = t.wait_for("[ OK ] recovery site reachable", 15);
    fits(&diag);
    assert!(diag.contains("[FAIL] recovery site TLS"), "{diag}");
    assert!(diag.contains("[FAIL] provider"), "{diag}");
    t.key("b");
    let diag = t.wait_for("Support bundle written:", 10);
    fits(&diag);
    let bundle = std::fs::read_dir(s.state.join("support"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(bundle).unwrap();
    assert!(
        text.contains("proxy.example:3128"),
        "the bundle has the settings"
    );
    assert!(!text.contains("s3cret-pw"), "the proxy's password leaked");
    assert!(!text.contains(PASSWORD) && !text.contains("PRIVATE KEY"));
    t.key("l");
    fits(&t.wait_for("Recent logs (newest last):", 10));
    t.key("Escape");
    t.wait_for("Main menu", 5);

    t.key("6");
    fits(&t.wait_for("Factory reset", 5));
    t.key("Down");
    t.key("Enter");
    t.wait_for("Type yes and Enter", 5);
    t.text("yes");
    t.key("Enter");
    fits(&t.wait_for("Done: Reboot.", 10));
    // A factory reset wants its own word; "yes" is not enough.
    t.key("Down");
    t.key("Down");
    t.key("Enter");
    t.wait_for("Type factory-reset and Enter", 5);
    t.text("yes");
    t.key("Enter");
    t.wait_for("Not confirmed: type factory-reset", 5);
    assert!(!s.actions().contains("factory-reset"));
    t.key("Down");
    t.key("Down");
    t.key("Enter");
    t.text("yes");
    t.key("Enter");
    t.wait_for("Done: Boot update slot B next.", 10);
    let actions = s.actions();
    assert!(actions.contains("reboot \n"), "{actions}");
    assert!(actions.contains("update-slot b\n"), "{actions}");

    // A new password: the current one is checked (and counted) first; then the console
    // locks on request and opens with the new one only.
    t.key("Escape");
    t.wait_for("Main menu", 5);
    t.key("7");
    fits(&t.wait_for("Current password", 5));
    t.fill(&["not-the-password", "another-pass-2", "another-pass-2"]);
    t.key("Enter");
    t.wait_for("wrong password (1 of 3 attempts", 10);
    t.fill(&[PASSWORD, "another-pass-2", "another-pass-2"]);
    t.key("Enter");
    t.wait_for("Password changed.", 10);
    t.key("8");
    t.wait_for("This console is locked.", 5);
    t.text(PASSWORD);
    t.key("Enter");
    t.wait_for("wrong password (1 of 3 attempts", 10);
    t.text("another-pass-2");
    t.key("Enter");
    t.wait_for("Unlocked. 1 wrong password(s) were tried before.", 10);
    drop(site);
}

#[test]
fn wrong_passwords_lock_the_console_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(
        dir.path(),
        None,
        &["--login-attempts=3".into(), "--lockout-secs=6".into()],
    );
    let t = Tmux::start(&s, None, 2, "");
    set_password(&t);
    // Idle: the console locks itself.
    fits(&t.wait_for("This console is locked.", 10));
    for (i, says) in [
        "wrong password (1 of 3 attempts",
        "wrong password (2 of 3 attempts",
        "3 wrong passwords in a row: locked for 6 s",
    ]
    .iter()
    .enumerate()
    {
        t.text(&format!("guess-{i}-wrong"));
        t.key("Enter");
        fits(&t.wait_for(says, 10));
    }
    // Locked: even the right password is refused until the time is up.
    let locked_at = Instant::now();
    t.text(PASSWORD);
    t.key("Enter");
    t.wait_for("too many wrong passwords: locked for another", 10);
    std::thread::sleep(Duration::from_secs(6).saturating_sub(locked_at.elapsed()));
    t.text(PASSWORD);
    t.key("Enter");
    fits(&t.wait_for("3 wrong password(s) were tried before", 10));

    let mut audit: Vec<AuditEntry> = Vec::new();
    harness::run(async {
        audit = s.admin().get("/v1/audit?limit=1000").await.unwrap();
    });
    let logins: Vec<_> = audit
        .iter()
        .filter(|e| e.what == "POST /v1/system/login")
        .collect();
    let statuses: Vec<u16> = logins.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [401, 401, 429, 429, 200], "{logins:?}");
    assert!(logins[..4].iter().all(|e| e.result == AuditResult::Refused));
    assert!(
        logins[0].detail.contains("wrong password"),
        "{:?}",
        logins[0]
    );
    assert!(logins[3].detail.contains("locked"), "{:?}", logins[3]);
    assert!(logins
        .iter()
        .all(|e| e.who == "admin" && !e.detail.contains(PASSWORD)));
}
