//! Priority between protected machines (issue 4): a process server whose uplink budget is the
//! bottleneck lets a high-priority machine's backlog go first, while a low-priority one still
//! makes progress, and both end with recovery points equal to their disks.
//!
//! Everything is real: a configuration server with two policies (`high` and `low`), a master
//! target and a process server enrolled with tokens and configured by it (the priorities reach
//! the process server in its role configuration), qemu-storage-daemon mirroring each machine's
//! disk into the process server over NBD, and the process server's `--uplink-mbit` budget on
//! its TLS connections to the master target (on loopback, so the budget is the only bottleneck
//! and the figures do not depend on the machine's network).

#[path = "support/config_server.rs"]
mod harness;
mod support;

use ferry::lab::{wait_port, Lab};
use ferry_api::TokenCreated;
use ferry_config_server::client::Method;
use ferry_process_server::uplink::Share;
use ferry_process_server::DiskStatus;
use ferry_qemu::{StorageDaemon, MIRROR_FILTER};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
/// The uplink budget: 2 MB/s.
const UPLINK_MBIT: u32 = 16;
/// What each guest writes at once (random, so zstd cannot shrink it): 12 MiB to drain in all,
/// about 6.5 s at 2 MB/s.
const BACKLOG: usize = 6 * MIB as usize;
/// Every wait in the test ends by this much after it began.
const DEADLINE: Duration = Duration::from_secs(120);

/// (machine, policy, priority, disk)
const MACHINES: [(&str, &str, &str, &str); 2] = [
    ("web", "gold", "high", "web0"),
    ("db", "bronze", "low", "db0"),
];

struct Host {
    q: Option<StorageDaemon>,
    sock: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(q) = self.q.take() {
            q.stop();
        }
    }
}

#[test]
fn a_high_priority_machine_catches_up_first_and_a_low_one_still_progresses() {
    let began = Instant::now();
    let left = || {
        DEADLINE
            .checked_sub(began.elapsed())
            .expect("the test ran out of time")
    };
    let dir = tempfile::Builder::new()
        .prefix("ferry-priority-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    // The lab only names ports and paths here.
    let mut lab = Lab::new(&support::exe(), d, &[]).unwrap();
    lab.key = d.join("mt-state/tenant.key");
    let server = harness::Server::start(&d.join("cs"));
    let admin = server.admin();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ok = |m: Method, path: &str, body: Option<Value>| -> Value {
        rt.block_on(harness::ok(&admin, m, path, body))
    };

    // Tenant acme: machine web on policy gold (high), machine db on policy bronze (low).
    ok(Method::POST, "/v1/tenants", Some(json!({"name": "acme"})));
    ok(
        Method::POST,
        "/v1/tenants/acme/sites",
        Some(json!({"name": "hq", "kind": "protected"})),
    );
    for (machine, policy, priority, disk) in MACHINES {
        ok(
            Method::POST,
            "/v1/tenants/acme/policies",
            Some(
                json!({"name": policy, "mode": "continuous", "checkpoint_interval_secs": 1,
                        "rpo_alert_secs": 60, "priority": priority}),
            ),
        );
        ok(
            Method::POST,
            "/v1/tenants/acme/machines",
            Some(json!({"name": machine, "site": "hq", "policy": policy})),
        );
        ok(
            Method::POST,
            &format!("/v1/tenants/acme/machines/{machine}/disks"),
            Some(json!({"name": disk, "size_bytes": SIZE})),
        );
    }

    // An unknown priority is refused, saying what is known, and changes nothing.
    let gold = ok(Method::GET, "/v1/tenants/acme/policies/gold", None);
    assert_eq!(gold["priority"], "high");
    let mut bad = gold.clone();
    bad["priority"] = json!("urgent");
    let (http, code, message) = rt.block_on(harness::refused(
        &admin,
        Method::PUT,
        "/v1/tenants/acme/policies/gold",
        Some(bad),
    ));
    assert_eq!((http, code.as_str()), (422, "wrong-type"), "{message}");
    assert!(
        message.contains("urgent") && message.contains("high"),
        "{message}"
    );
    let mut bad = gold.clone();
    bad["name"] = json!("platinum");
    bad["priority"] = json!(1);
    // Not even a word: refused before the fields are looked at.
    let (http, code, message) = rt.block_on(harness::refused(
        &admin,
        Method::POST,
        "/v1/tenants/acme/policies",
        Some(bad),
    ));
    assert_eq!((http, code.as_str()), (400, "malformed-json"), "{message}");
    assert_eq!(
        ok(Method::GET, "/v1/tenants/acme/policies/gold", None),
        gold
    );
    let policies = ok(Method::GET, "/v1/tenants/acme/policies", None);
    assert_eq!(policies.as_array().unwrap().len(), 2, "{policies}");

    // The roles, enrolled with tokens; the process server's uplink budget is 16 Mbit/s.
    let s = |v: &str| v.to_string();
    let role = |name: &str, appliance: &str| -> Vec<String> {
        let t: TokenCreated = serde_json::from_value(ok(
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": name, "role": "operator", "tenant": "acme",
                        "appliance": appliance, "ttl_secs": 600})),
        ))
        .unwrap();
        vec![
            s("--config-server"),
            server.url.clone(),
            s("--token"),
            t.token,
            s("--ca-sha256"),
            t.ca_sha256,
            s("--state"),
            d.join(format!("{name}-state")).display().to_string(),
            s("--config-poll-secs"),
            s("1"),
        ]
    };
    let mut mt = vec![
        s("master-target"),
        s("--repo"),
        lab.repo.display().to_string(),
        s("--listen"),
        format!("127.0.0.1:{}", lab.master_port),
    ];
    mt.extend(role("mt", "master-target"));
    let mut ps = vec![
        s("process-server"),
        s("--cache"),
        lab.cache.display().to_string(),
        s("--nbd-listen"),
        format!("127.0.0.1:{}", lab.nbd_port),
        s("--uplink-mbit"),
        UPLINK_MBIT.to_string(),
    ];
    ps.extend(role("ps", "process-server"));
    let _mt = support::Kill::spawn(d, "master-target", &mt);
    wait_port(lab.master_port, left()).unwrap();
    let _ps = support::Kill::spawn(d, "process-server", &ps);
    wait_port(lab.nbd_port, left()).unwrap();
    let hosts: Vec<Host> = MACHINES
        .iter()
        .map(|m| host_disk(d, m.3, lab.nbd_port))
        .collect();
    for (_, _, priority, disk) in MACHINES {
        let st = lab.wait_caught_up(disk, left()).unwrap();
        assert_eq!(st.priority.as_str(), priority, "{disk}: {st:?}");
    }

    // Both guests write their backlog at once; the journal takes it at once, the uplink
    // drains it at 2 MB/s.
    let data: Vec<Vec<u8>> = (0..2u64)
        .map(|i| {
            let mut rng = support::Rng(0x5eed + i);
            (0..BACKLOG / 8)
                .flat_map(|_| rng.next().to_le_bytes())
                .collect()
        })
        .collect();
    let t0 = Instant::now();
    rt.block_on(async {
        tokio::join!(
            write_backlog(&hosts[0].sock, &data[0]),
            write_backlog(&hosts[1].sock, &data[1])
        )
    });
    let written = t0.elapsed();
    let written_ns = ferry_process_server::status::now_unix_ns();
    let shown = ferry_status(&lab.cache);

    // Until the high-priority machine has caught up, note the uplink figures both statuses
    // carry at each of the process server's one-second refreshes (one pass over every disk).
    // The window measured starts 1.5 s after the writes (each shipper cuts its first point
    // of the backlog at its next one-second tick, so before that one may be sending alone)
    // and ends at the last refresh before the high machine caught up.
    let from = t0 + Duration::from_millis(1500);
    let mut pairs: Vec<(Instant, Share, Share)> = Vec::new();
    let (web, high_took) = loop {
        let (web, db) = (status(&lab, "web0"), status(&lab, "db0"));
        if let (Some(a), Some(b)) = (&web.uplink, &db.uplink) {
            let same = a.at_unix_ns.abs_diff(b.at_unix_ns) < 200_000_000;
            if same && pairs.last().is_none_or(|p| p.1.at_unix_ns != a.at_unix_ns) {
                pairs.push((Instant::now(), a.clone(), b.clone()));
            }
        }
        // (A status written after the writes returned: they were journaled by then.)
        if web.updated_unix_ns > written_ns && web.caught_up() {
            break (web, t0.elapsed());
        }
        left();
        std::thread::sleep(Duration::from_millis(20));
    };
    let db = status(&lab, "db0");
    assert!(!db.caught_up(), "the low machine caught up first: {db:?}");
    let window: Vec<_> = pairs
        .iter()
        .filter(|p| p.0 >= from && p.0 + Duration::from_millis(300) < t0 + high_took)
        .collect();
    assert!(
        window.len() >= 2,
        "{} refreshes in the window",
        window.len()
    );
    let (first, last) = (window[0], window[window.len() - 1]);
    let web_bytes = last.1.sent_bytes - first.1.sent_bytes;
    let db_bytes = last.2.sent_bytes - first.2.sent_bytes;
    let secs = (last.1.at_unix_ns - first.1.at_unix_ns) as f64 / 1e9;
    drop(web);
    let low_done = {
        lab.wait_caught_up("db0", left()).unwrap();
        t0.elapsed()
    };
    eprintln!(
        "writes took {written:?}; in the {secs:.1} s measured, high sent {web_bytes} B and low \
         {db_bytes} B ({:.2}:1; entitled {:.2}/{:.2}); high caught up after {high_took:?}, \
         low after {low_done:?}",
        web_bytes as f64 / db_bytes.max(1) as f64,
        last.1.fraction,
        last.2.fraction
    );
    // Weights 4:1: the high machine gets about 4/5 of the uplink while both have data
    // waiting; at least twice the low one's bytes, a tolerant bound.
    assert!(
        web_bytes >= 2 * db_bytes,
        "in {secs:.1} s high sent {web_bytes} B, low {db_bytes} B"
    );
    // The low machine was not starved: it sent something while the high one drained (a fifth
    // of the uplink is 400 kB/s), and then finished after it.
    assert!(
        db_bytes as f64 >= 100_000.0 * secs,
        "in {secs:.1} s low sent only {db_bytes} B while high drained its backlog"
    );
    assert!(high_took < low_done);
    assert_eq!(last.1.uplink_mbit, UPLINK_MBIT);
    assert!((last.1.fraction - 0.8).abs() < 1e-6, "{:?}", last.1);
    assert!((last.2.fraction - 0.2).abs() < 1e-6, "{:?}", last.2);
    // At 2 MB/s, 12 MiB and TLS cannot drain in under about 6 s.
    assert!(
        low_done >= Duration::from_secs(5),
        "both backlogs drained in {low_done:?}: faster than the uplink budget"
    );

    // `ferry status` said each disk's priority and its machine's share.
    assert!(
        shown.contains("priority high, ") && shown.contains("priority low, "),
        "{shown}"
    );
    assert!(shown.contains("of the 16 Mbit/s uplink now"), "{shown}");

    // The process server reports the shares to the configuration server: a metric per disk.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = rt
            .block_on(admin.raw(Method::GET, "/metrics", None))
            .unwrap();
        let m = String::from_utf8_lossy(&m).into_owned();
        let share = |disk: &str, machine: &str| -> Option<f64> {
            let name = format!(
                r#"ferry_disk_uplink_share{{tenant="acme",machine="{machine}",disk="{disk}"}} "#
            );
            m.lines()
                .find_map(|l| l.strip_prefix(&name))
                .and_then(|v| v.parse().ok())
        };
        if let (Some(a), Some(b)) = (share("web0", "web"), share("db0", "db")) {
            assert!(a > 0.0 && a <= 1.0 && b > 0.0 && b <= 1.0, "{a} {b}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no uplink shares in the metrics:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Both recovery points equal their disks, byte for byte.
    for (i, (_, _, _, disk)) in MACHINES.iter().enumerate() {
        let st = lab.wait_caught_up(disk, left()).unwrap();
        let uri = format!("nbd+unix:///guest?socket={}", hosts[i].sock.display());
        support::assert_point_equals(&lab, d, disk, st.acked_seq, &uri);
    }
    drop(hosts);
}

fn status(lab: &Lab, disk: &str) -> DiskStatus {
    lab.status(disk).unwrap_or_default()
}

fn ferry_status(cache: &Path) -> String {
    let out = Command::new(support::exe())
        .args(["status", "--cache"])
        .arg(cache)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Write `data` at 4 MiB into the guest's disk and flush.
async fn write_backlog(sock: &Path, data: &[u8]) {
    let mut g = ferry_nbd::client::Client::connect_unix(sock, "guest")
        .await
        .unwrap();
    g.write(4 * MIB, data, false).await.unwrap();
    g.flush().await.unwrap();
}

/// Disk `disk` of a machine on its host: an empty qcow2 image, a qemu-storage-daemon mirroring
/// it to the process server's export of the same name, and the guest's NBD socket on the
/// mirror's filter.
fn host_disk(dir: &Path, disk: &str, nbd_port: u16) -> Host {
    let h = dir.join(format!("host-{disk}"));
    std::fs::create_dir_all(&h).unwrap();
    let image = h.join(format!("{disk}.qcow2"));
    support::qcow2_image(&image, SIZE, &[]);
    let mut q = StorageDaemon::start(&image, "qcow2", &h).unwrap();
    q.mirror_to_nbd("127.0.0.1", nbd_port, disk, None, Duration::from_secs(60))
        .unwrap();
    let sock = h.join("guest.sock");
    q.export(MIRROR_FILTER, "guest", &sock).unwrap();
    Host { q: Some(q), sock }
}

/// The process server refuses a priority it does not know, two priorities for one machine and
/// an uplink budget out of range, saying so, before it creates anything.
#[test]
fn the_process_server_refuses_bad_priorities_and_budgets() {
    let dir = tempfile::Builder::new()
        .prefix("ferry-priority-args-")
        .tempdir()
        .unwrap();
    let cache = dir.path().join("cache");
    let run = |args: &[&str]| -> String {
        let out = Command::new(support::exe())
            .args(["process-server", "--cache"])
            .arg(&cache)
            .args(["--master", "127.0.0.1:9", "--nbd-listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} was accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--disk", "a=1M,priority=urgent"]);
    assert!(
        e.contains(r#"unknown priority "urgent" (known: high, medium, low)"#),
        "{e}"
    );
    let e = run(&[
        "--periodic",
        "p=1M,qmp=/q,node=n,nbd=/s,fleece=/f,priority=1",
    ]);
    assert!(e.contains(r#"unknown priority "1""#), "{e}");
    let e = run(&[
        "--uplink-mbit",
        "10",
        "--disk",
        "a=1M,group=vm,priority=high",
        "--disk",
        "b=1M,group=vm,priority=low",
    ]);
    assert!(e.contains("a machine has one priority"), "{e}");
    let e = run(&["--uplink-mbit", "0", "--disk", "a=1M"]);
    assert!(e.contains("--uplink-mbit must be from 1 to 100000"), "{e}");
    assert!(!cache.exists(), "the refused process server made its cache");
}
