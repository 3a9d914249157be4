//! Roles configured by the configuration server (issue 4, item 4): a master target and a process
//! server are started with nothing but the server's address, a one-time token and the CA's
//! hash. They enroll, take their configuration (disks from the inventory, the master target's
//! address, the tenant's data key, data-link certificates) and replicate; the process server
//! reports its disks' state and RPO back; a disk added to the machine in the inventory is
//! picked up without anyone touching the process server; a used token, a person asking for a
//! role configuration, and a process server given both the server and local disks are refused;
//! another tenant's process server pointed at the master target never gets a link (a data CA
//! per tenant).

#[path = "support/config_server.rs"]
mod harness;
mod support;

use ferry::lab::{free_port, sh, wait_port, Lab};
use ferry_api::{AuditEntry, Disk, DiskState, TokenCreated};
use ferry_config_server::client::Method;
use ferry_qemu::{StorageDaemon, MIRROR_FILTER};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

fn appliance_token(
    admin: &ferry_config_server::client::Client,
    rt: &tokio::runtime::Runtime,
    tenant: &str,
    name: &str,
    role: &str,
) -> TokenCreated {
    let body = json!({"name": name, "role": "operator", "tenant": tenant, "appliance": role, "ttl_secs": 600});
    serde_json::from_value(rt.block_on(harness::ok(admin, Method::POST, "/v1/tokens", Some(body))))
        .unwrap()
}

/// A master target enrolled with `token` at the configuration server `url`, on the lab's repository
/// and port (state in `d/mt-state`, polling every second), listening when this returns.
fn master_target(d: &Path, lab: &Lab, url: &str, token: &TokenCreated) -> support::Kill {
    let s = |v: &str| v.to_string();
    let mt = support::Kill::spawn(
        d,
        "master-target",
        &[
            s("master-target"),
            s("--repo"),
            lab.repo.display().to_string(),
            s("--listen"),
            format!("127.0.0.1:{}", lab.master_port),
            s("--config-server"),
            s(url),
            s("--token"),
            token.token.clone(),
            s("--ca-sha256"),
            token.ca_sha256.clone(),
            s("--state"),
            d.join("mt-state").display().to_string(),
            s("--config-poll-secs"),
            s("1"),
        ],
    );
    wait_port(lab.master_port, Duration::from_secs(20)).unwrap();
    mt
}

/// A scratch directory named `prefix...` and a runtime for the test's API calls.
fn scratch(prefix: &str) -> (tempfile::TempDir, tokio::runtime::Runtime) {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (dir, rt)
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether acme's master target keeps a replication link open for a client presenting the
/// certificate in `client_pki` (and trusting `ca`).
fn link_accepted(port: u16, ca: &Path, client_pki: &Path, scratch: &Path) -> bool {
    try_link(port, ca, client_pki, scratch).expect("the master target is not listening")
}

/// [`link_accepted`], or none when nothing listens on `port` (a master target restarting).
fn try_link(port: u16, ca: &Path, client_pki: &Path, scratch: &Path) -> Option<bool> {
    use std::io::Read;
    let owner = client_pki.parent().unwrap().file_name().unwrap();
    let dir = scratch.join("link").join(owner);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(ca, dir.join("ca-cert.pem")).unwrap();
    for f in ["client-cert.pem", "client-key.pem"] {
        std::fs::copy(client_pki.join(f), dir.join(f)).unwrap();
    }
    let cfg = ferry_pki::client_config(&dir).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, "127.0.0.1".try_into().unwrap()).unwrap();
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut b = [0u8; 1];
    Some(match tls.read(&mut b) {
        Ok(n) => n > 0,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    })
}

#[test]
fn roles_take_their_configuration_from_the_configuration_server() {
    let began = Instant::now();
    let (dir, rt) = scratch("ferry-bootstrap-");
    let d = dir.path();
    // Appliances silent for 6 s are "unreachable": the roles' polls must keep them off that list.
    let server =
        harness::Server::start_with(&d.join("cs"), &["--unreachable-secs".into(), "6".into()]);
    let admin = server.admin();
    let ok = |m: Method, path: &str, body: serde_json::Value| {
        rt.block_on(harness::ok(&admin, m, path, Some(body)))
    };
    ok(Method::POST, "/v1/tenants", json!({"name": "acme"}));
    ok(Method::POST, "/v1/tenants", json!({"name": "globex"}));
    // An appliance that never reports (of another tenant, so acme's assignment is unchanged).
    let idle = rt.block_on(harness::token(
        &admin,
        "idle",
        "operator",
        Some("globex"),
        600,
    ));
    rt.block_on(harness::enroll(&server, &idle.token, &d.join("idle")));
    ok(
        Method::POST,
        "/v1/tenants/acme/sites",
        json!({"name": "hq", "kind": "protected"}),
    );
    ok(
        Method::POST,
        "/v1/tenants/acme/policies",
        harness::policy(30),
    );
    ok(
        Method::POST,
        "/v1/tenants/acme/machines",
        json!({"name": "app", "site": "hq", "policy": "gold"}),
    );
    ok(
        Method::POST,
        "/v1/tenants/acme/machines/app/disks",
        json!({"name": "boot", "size_bytes": SIZE}),
    );

    // A person is not a role: refused, with the reason.
    let e = rt
        .block_on(admin.call::<_, serde_json::Value>(
            Method::POST,
            "/v1/self/config",
            Some(&json!({})),
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("403") && e.contains("not an appliance"), "{e}");

    // The lab gives ports and paths only: its own key and certificates are not used.
    let lab = Lab::new(&support::exe(), d, &[]).unwrap();
    let mt_token = appliance_token(&admin, &rt, "acme", "mt1", "master-target");
    let ps_token = appliance_token(&admin, &rt, "acme", "ps1", "process-server");
    let _mt = master_target(d, &lab, &server.url, &mt_token);
    let s = |v: &str| v.to_string();

    let ps_args = |extra: &[String]| {
        let mut v = vec![
            s("process-server"),
            s("--cache"),
            lab.cache.display().to_string(),
            s("--nbd-listen"),
            format!("127.0.0.1:{}", lab.nbd_port),
            s("--interval-ms"),
            s("200"),
            s("--config-server"),
            server.url.clone(),
            s("--token"),
            ps_token.token.clone(),
            s("--ca-sha256"),
            ps_token.ca_sha256.clone(),
            s("--state"),
            d.join("ps-state").display().to_string(),
            s("--config-poll-secs"),
            s("1"),
        ];
        v.extend_from_slice(extra);
        v
    };
    // Local disks beside the configuration server: refused before anything starts.
    let o = Command::new(support::exe())
        .args(ps_args(&[s("--disk"), s("x=1M")]))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("leave out --disk"), "{err}");
    assert!(
        !d.join("ps-state/identity").exists(),
        "refused, yet enrolled"
    );

    let _ps = support::Kill::spawn(d, "process-server", &ps_args(&[]));
    wait_port(lab.nbd_port, Duration::from_secs(30)).unwrap();

    // The hypervisor mirrors the disk to the export the configuration named.
    let host = d.join("host");
    std::fs::create_dir_all(&host).unwrap();
    let image = host.join("boot.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(SIZE.to_string()))
    .unwrap();
    let mut q = StorageDaemon::start(&image, "qcow2", &host).unwrap();
    q.mirror_to_nbd(
        "127.0.0.1",
        lab.nbd_port,
        "boot",
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    let sock = host.join("guest.sock");
    q.export(MIRROR_FILTER, "guest", &sock).unwrap();
    let guest = format!("nbd+unix:///guest?socket={}", sock.display());
    sh(Command::new("qemu-io").args([
        "-f",
        "raw",
        &guest,
        "-c",
        "write -P 0x5c 1M 3M",
        "-c",
        "write -P 0x7d 17M 64k",
        "-c",
        "flush",
    ]))
    .unwrap();

    // Written to the state directory: the data key and certificates it was given.
    let mut lab = lab;
    lab.key = d.join("mt-state/tenant.key");
    assert_eq!(
        std::fs::read_to_string(&lab.key).unwrap(),
        std::fs::read_to_string(d.join("ps-state/tenant.key")).unwrap(),
        "both roles hold the tenant's one data key"
    );
    let st = lab.wait_caught_up("boot", Duration::from_secs(60)).unwrap();
    support::assert_point_equals(&lab, d, "boot", st.acked_seq, &guest);
    // A configured disk is cut with the other disks of its machine.
    assert_eq!(st.group.as_deref(), Some("app"));
    assert!(st.group_cut_unix_ns > 0, "no cut of machine app committed");

    // The data-link keys are the roles' own: made on the role, certified by the server from a
    // signing request, never sent by it, and the server's state holds none of them.
    for role in ["ps-state", "mt-state"] {
        let own = std::fs::read_to_string(d.join(role).join("data-key.pem")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.join(role).join("pki/server-key.pem")).unwrap(),
            own,
            "{role} serves with its own key"
        );
        let kept = std::fs::read_to_string(d.join(role).join("config.json")).unwrap();
        assert!(
            !kept.contains("PRIVATE KEY"),
            "{role} was sent a private key"
        );
        let body = own.lines().nth(1).unwrap().as_bytes().to_vec();
        support::assert_no_plaintext(&d.join("cs"), &body);
    }
    assert_eq!(
        std::fs::read_to_string(d.join("ps-state/pki/client-key.pem")).unwrap(),
        std::fs::read_to_string(d.join("ps-state/data-key.pem")).unwrap()
    );

    // The process server reports the disk: state and RPO reach the inventory.
    let disk = wait_for("the disk's report", Duration::from_secs(30), || {
        let v: Disk = rt
            .block_on(admin.get("/v1/tenants/acme/machines/app/disks/boot"))
            .unwrap();
        (v.state == DiskState::Protected && v.rpo_seconds.is_some()).then_some(v)
    });
    assert!(disk.rpo_seconds.unwrap() < 30.0, "{disk:?}");
    // Polls and reports are observations: only the person's refused request is audited.
    let audit: Vec<AuditEntry> = rt.block_on(admin.get("/v1/audit?limit=1000")).unwrap();
    let polls: Vec<&AuditEntry> = audit
        .iter()
        .filter(|e| e.what.contains("/v1/self/config") || e.what.ends_with("/report"))
        .collect();
    assert!(
        polls.len() == 1 && polls[0].status == 403 && polls[0].who == "admin",
        "{polls:#?}"
    );
    // A signing request that is not one: a clear refusal (audited, as refusals are).
    let ps = ferry_config_server::client::Client::from_cert_dir(
        &server.url,
        &d.join("ps-state/identity"),
    )
    .unwrap();
    let junk = json!({"data_csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"});
    let (code, _, msg) = rt.block_on(harness::refused(
        &ps,
        Method::POST,
        "/v1/self/config",
        Some(junk),
    ));
    assert!(
        code == 422 && msg.contains("certificate signing request"),
        "{code} {msg}"
    );
    let audit: Vec<AuditEntry> = rt.block_on(admin.get("/v1/audit?limit=1000")).unwrap();
    assert!(
        audit
            .iter()
            .any(|e| e.what.contains("/v1/self/config") && e.status == 422 && e.who == "ps1"),
        "{audit:#?}"
    );

    // A disk added in the inventory: the process server restarts itself with it and serves
    // its export, and the first disk keeps replicating.
    let before = std::fs::read_to_string(d.join("ps-state/config.json")).unwrap();
    ok(
        Method::POST,
        "/v1/tenants/acme/machines/app/disks",
        json!({"name": "data", "size_bytes": SIZE}),
    );
    wait_for("the new disk's journal", Duration::from_secs(30), || {
        lab.cache.join("data/status.json").exists().then_some(())
    });
    let now = std::fs::read_to_string(d.join("ps-state/config.json")).unwrap();
    assert_ne!(before, now);
    assert!(now.contains("\"data\""));
    sh(Command::new("qemu-io").args([
        "-f",
        "raw",
        &guest,
        "-c",
        "write -P 0x3e 9M 1M",
        "-c",
        "flush",
    ]))
    .unwrap();
    let st2 = wait_for("a point after the restart", Duration::from_secs(90), || {
        lab.wait_caught_up("boot", Duration::from_secs(5))
            .ok()
            .filter(|s| s.acked_seq > st.acked_seq)
    });
    support::assert_point_equals(&lab, d, "boot", st2.acked_seq, &guest);

    // The roles report by themselves: the idle appliance is unreachable, they are not.
    let alerts = wait_for(
        "the idle appliance's alert",
        Duration::from_secs(30),
        || {
            let v: Vec<ferry_api::Event> = rt.block_on(admin.get("/v1/alerts")).unwrap();
            v.iter()
                .any(|e| e.subject.contains("idle") && e.message.contains("has not reported"))
                .then_some(v)
        },
    );
    let silent: Vec<_> = alerts
        .iter()
        .filter(|e| e.message.contains("has not reported") && !e.subject.contains("idle"))
        .collect();
    assert!(silent.is_empty(), "{silent:#?}");

    // Another tenant's process server, told (by a master target of its own tenant that
    // reports acme's address) to ship to acme's master target, never gets a link: each tenant
    // has its own data CA, and acme's master target trusts only acme's.
    ok(
        Method::POST,
        "/v1/tenants/globex/sites",
        json!({"name": "hq", "kind": "protected"}),
    );
    ok(
        Method::POST,
        "/v1/tenants/globex/policies",
        harness::policy(30),
    );
    ok(
        Method::POST,
        "/v1/tenants/globex/machines",
        json!({"name": "crm", "site": "hq", "policy": "gold", "process_server": "psg"}),
    );
    ok(
        Method::POST,
        "/v1/tenants/globex/machines/crm/disks",
        json!({"name": "db", "size_bytes": SIZE}),
    );
    let mtg = appliance_token(&admin, &rt, "globex", "mtg", "master-target");
    let mtg = rt.block_on(harness::enroll(&server, &mtg.token, &d.join("mtg")));
    let _: serde_json::Value = rt
        .block_on(mtg.call(
            Method::POST,
            "/v1/self/config",
            Some(&json!({"address": format!("127.0.0.1:{}", lab.master_port)})),
        ))
        .unwrap();
    let psg = appliance_token(&admin, &rt, "globex", "psg", "process-server");
    let psg_nbd = free_port().unwrap();
    let _psg = support::Kill::spawn(
        d,
        "process-server-globex",
        &[
            s("process-server"),
            s("--cache"),
            d.join("cache-g").display().to_string(),
            s("--nbd-listen"),
            format!("127.0.0.1:{psg_nbd}"),
            s("--config-server"),
            server.url.clone(),
            s("--token"),
            psg.token.clone(),
            s("--ca-sha256"),
            psg.ca_sha256.clone(),
            s("--state"),
            d.join("psg-state").display().to_string(),
        ],
    );
    wait_port(psg_nbd, Duration::from_secs(30)).unwrap();
    let gs = wait_for("globex's link attempt", Duration::from_secs(30), || {
        ferry_process_server::status::read(&d.join("cache-g/db/status.json"))
            .ok()
            .filter(|s| s.last_error.is_some())
    });
    assert!(!gs.connected, "{gs:?}");
    // The master target's own check, apart from the client's: globex's client certificate,
    // presented by a client that trusts acme's CA, is refused; acme's is let in.
    let acme_ca = d.join("mt-state/pki/ca-cert.pem");
    assert!(!link_accepted(
        lab.master_port,
        &acme_ca,
        &d.join("psg-state/pki"),
        d
    ));
    assert!(link_accepted(
        lab.master_port,
        &acme_ca,
        &d.join("ps-state/pki"),
        d
    ));
    let names: Vec<String> = lab
        .repository()
        .unwrap()
        .disks()
        .into_iter()
        .map(|x| x.name)
        .collect();
    assert!(!names.iter().any(|n| n == "db"), "{names:?}");

    // The token worked once: a second appliance with it is refused, and says so.
    let o = Command::new(support::exe())
        .args([
            "process-server",
            "--cache",
            &d.join("cache2").display().to_string(),
            "--nbd-listen",
            &format!("127.0.0.1:{}", free_port().unwrap()),
            "--config-server",
            &server.url,
            "--token",
            &ps_token.token,
            "--ca-sha256",
            &ps_token.ca_sha256,
            "--state",
            &d.join("ps2-state").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("token"), "{err}");
    q.stop();
    assert!(began.elapsed() < Duration::from_secs(240));
}

/// A revoked process server loses its replication link (docs/api.md, "Revocation and
/// renewal"): its data-link client certificate, which the tenant's data CA signed, goes to the
/// master target's configuration, and the master target refuses it at the handshake within a
/// poll interval; a process server that was not revoked keeps its link.
#[test]
fn a_revoked_process_server_is_refused_by_the_master_target() {
    let began = Instant::now();
    let (dir, rt) = scratch("ferry-revoke-");
    let d = dir.path();
    let server = harness::Server::start(&d.join("cs"));
    let admin = server.admin();
    rt.block_on(harness::ok(
        &admin,
        Method::POST,
        "/v1/tenants",
        Some(json!({"name": "acme"})),
    ));
    let lab = Lab::new(&support::exe(), d, &[]).unwrap();
    let mt_token = appliance_token(&admin, &rt, "acme", "mt1", "master-target");
    let _mt = master_target(d, &lab, &server.url, &mt_token);

    // Two process servers of acme, each with its data-link client certificate for its own key,
    // as a process server asks for it.
    let data_pki = |name: &str| {
        let t = appliance_token(&admin, &rt, "acme", name, "process-server");
        let c = rt.block_on(harness::enroll(&server, &t.token, &d.join(name)));
        let pki = d.join(format!("{name}-state")).join("pki");
        std::fs::create_dir_all(&pki).unwrap();
        let key = pki.join("client-key.pem");
        let (_, csr) = ferry_pki::own_key_request(&key).unwrap();
        let cfg: ferry_api::RoleConfig = rt
            .block_on(c.call(
                Method::POST,
                "/v1/self/config",
                Some(&json!({"data_csr_pem": csr})),
            ))
            .unwrap();
        let ferry_api::RoleConfig::ProcessServer(cfg) = cfg else {
            panic!("not a process server's configuration");
        };
        std::fs::write(pki.join("client-cert.pem"), &cfg.client.cert_pem).unwrap();
        (c, pki)
    };
    let (ps1, ps1_pki) = data_pki("ps1");
    let (_, ps2_pki) = data_pki("ps2");
    let acme_ca = d.join("mt-state/pki/ca-cert.pem");
    assert!(link_accepted(lab.master_port, &acme_ca, &ps1_pki, d));

    let revoked: Vec<ferry_api::IssuedCertificate> =
        serde_json::from_value(rt.block_on(harness::ok(
            &admin,
            Method::POST,
            "/v1/certificates/revoke",
            Some(json!({"name": "ps1", "tenant": "acme", "reason": "decommissioned"})),
        )))
        .unwrap();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    // Its API calls are refused at once; its replication link within the master target's poll
    // interval (1 s here) and its restart.
    let (st, code, _) = rt.block_on(harness::refused(&ps1, Method::GET, "/v1/whoami", None));
    assert_eq!((st, code.as_str()), (401, "revoked-certificate"));
    // It has left the tenant's appliances.
    let left: Vec<ferry_api::Appliance> = rt.block_on(admin.get("/v1/appliances")).unwrap();
    let names: Vec<&str> = left.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["mt1", "ps2"], "{left:?}");
    // Refused while the master target serves: ps2 let in by the same process.
    wait_for(
        "the master target to refuse ps1",
        Duration::from_secs(30),
        || {
            let ps1 = try_link(lab.master_port, &acme_ca, &ps1_pki, d);
            let ps2 = try_link(lab.master_port, &acme_ca, &ps2_pki, d);
            (ps1 == Some(false) && ps2 == Some(true)).then_some(())
        },
    );
    let kept = std::fs::read_to_string(d.join("mt-state/config.json")).unwrap();
    assert!(kept.contains("revoked_client_sha256"), "{kept}");
    assert!(!link_accepted(lab.master_port, &acme_ca, &ps1_pki, d));
    assert!(link_accepted(lab.master_port, &acme_ca, &ps2_pki, d));

    // An appliance renews its identity with `ferry ctl renew` while it runs: its next poll
    // uses the new certificate (which revokes the old one), and nothing is refused.
    let out = Command::new(support::exe())
        .args(["ctl", "--json", "--server", &server.url, "--cert-dir"])
        .arg(d.join("mt-state/identity"))
        .arg("renew")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let certs = wait_for("mt1's next poll", Duration::from_secs(20), || {
        let v: Vec<ferry_api::IssuedCertificate> =
            rt.block_on(admin.get("/v1/certificates")).unwrap();
        let mt1: Vec<_> = v
            .into_iter()
            .filter(|c| c.principal.name == "mt1")
            .collect();
        (mt1.len() == 2 && mt1.iter().all(|c| c.replaces.is_none())).then_some(mt1)
    });
    assert_eq!(
        certs.iter().filter(|c| c.revoked.is_some()).count(),
        1,
        "{certs:?}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let audit: Vec<AuditEntry> = rt.block_on(admin.get("/v1/audit?limit=1000")).unwrap();
    let refused: Vec<_> = audit
        .iter()
        .filter(|e| e.who == "mt1" && e.status >= 400)
        .collect();
    assert!(refused.is_empty(), "{refused:#?}");
    assert!(began.elapsed() < Duration::from_secs(90));
}

#[test]
fn a_role_renews_its_own_certificate_before_it_expires() {
    // Appliances' certificates live 20 s here: the master target renews its own when less than
    // a third of that is left, from its configuration poll, and keeps working past the first
    // certificate's expiry.
    let began = Instant::now();
    let (dir, rt) = scratch("ferry-renew-");
    let d = dir.path();
    let server = harness::Server::start_with(
        &d.join("cs"),
        &["--appliance-cert-secs".into(), "20".into()],
    );
    let admin = server.admin();
    rt.block_on(harness::ok(
        &admin,
        Method::POST,
        "/v1/tenants",
        Some(json!({"name": "acme"})),
    ));
    let lab = Lab::new(&support::exe(), d, &[]).unwrap();
    let mt_token = appliance_token(&admin, &rt, "acme", "mt1", "master-target");
    let _mt = master_target(d, &lab, &server.url, &mt_token);
    let certs = || -> Vec<ferry_api::IssuedCertificate> {
        let v: Vec<ferry_api::IssuedCertificate> =
            rt.block_on(admin.get("/v1/certificates")).unwrap();
        let mut v: Vec<_> = v
            .into_iter()
            .filter(|c| c.principal.name == "mt1")
            .collect();
        v.sort_by_key(|c| c.issued_unix);
        v
    };
    let first = certs().into_iter().next().expect("mt1 enrolled");
    let expires = first.expires_unix.unwrap();
    assert!(expires <= first.issued_unix.unwrap() + 20, "{first:?}");
    // Past the first certificate's expiry: renewed (twice, the second time with the renewed
    // certificate), the old ones revoked by their renewals.
    let now = || ferry_config_server::app::now_unix();
    let v = wait_for("mt1 to renew twice", Duration::from_secs(60), || {
        let v = certs();
        (now() > expires + 1 && v.len() >= 3).then_some(v)
    });
    let valid: Vec<_> = v.iter().filter(|c| c.revoked.is_none()).collect();
    assert_eq!(valid.len(), 1, "{v:#?}");
    for c in v.iter().filter(|c| c.revoked.is_some()) {
        assert_eq!(c.revoked.as_ref().unwrap().by, "renewal", "{c:?}");
    }
    // Its identity works, and nothing of it was refused.
    let c = ferry_config_server::client::Client::from_cert_dir(
        &server.url,
        &d.join("mt-state/identity"),
    )
    .unwrap();
    let me: ferry_api::Principal = rt.block_on(c.get("/v1/whoami")).unwrap();
    assert_eq!(me.name, "mt1");
    let audit: Vec<AuditEntry> = rt.block_on(admin.get("/v1/audit?limit=1000")).unwrap();
    let mine: Vec<_> = audit.iter().filter(|e| e.who == "mt1").collect();
    assert!(mine.iter().all(|e| e.status < 400), "{mine:#?}");
    assert!(
        mine.iter()
            .filter(|e| e.what == "POST /v1/self/renew" && e.status == 201)
            .count()
            >= 2,
        "{mine:#?}"
    );
    let events: Vec<ferry_api::Event> = rt.block_on(admin.get("/v1/events?limit=1000")).unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.subject == "identities/mt1" && e.message.contains("renewed certificate")),
        "{events:#?}"
    );
    let log = std::fs::read_to_string(d.join("master-target.log")).unwrap();
    assert!(
        log.contains("renewed this role's certificate before it expires"),
        "{log}"
    );
    assert!(began.elapsed() < Duration::from_secs(90));
}
