//! The configuration server end to end: the real `ferry config-server` on loopback, enrolled
//! identities of several roles and tenants, and every refusal the control plane promises
//! (issue 4): refused with a clear error, an audit entry, and nothing changed. Bad bodies get
//! 4xx answers while the server keeps serving; the OpenAPI document matches the routes; state
//! survives a crash of the server. Certificates are revoked (refused at once, audited, across
//! a restart, only by who may) and renewed without a token.

#[path = "support/config_server.rs"]
mod harness;

use ferry_api::{AuditEntry, AuditResult, EnrollRequest, Enrolled, Principal};
use ferry_config_server::client::{Client, ClientError, Method, StatusCode};
use harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

#[test]
fn refusals_are_clear_audited_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("state"));
    run(async {
        let admin = s.admin();
        inventory(&admin).await;
        let machine = "/v1/tenants/acme/machines/web";
        let before = ok(&admin, Method::GET, machine, None).await;

        // No client certificate: nothing but enrollment, and it is said why.
        let anon = s.anonymous();
        let (st, code, msg) = refused(&anon, Method::GET, "/v1/tenants", None).await;
        assert_eq!((st, code.as_str()), (401, "no-certificate"), "{msg}");
        let (st, _, _) = refused(
            &anon,
            Method::POST,
            "/v1/tenants",
            Some(json!({"name": "evil"})),
        )
        .await;
        assert_eq!(st, 401);
        let e = audited(&admin, "POST /v1/tenants").await;
        assert_eq!(
            (e.who.as_str(), e.status, e.result),
            ("anonymous", 401, AuditResult::Refused)
        );
        assert!(
            e.detail.contains("client certificate") && e.from.starts_with("127.0.0.1:"),
            "{e:?}"
        );
        let tenants: Vec<Value> = admin.get("/v1/tenants").await.unwrap();
        assert_eq!(tenants.len(), 2, "{tenants:?}");

        // An operator (a process server), a viewer (enrolled by the CLI with its own key) and
        // another tenant's administrator.
        let t_ps = token(&admin, "ps1", "operator", Some("acme"), 600).await;
        let ps = enroll(&s, &t_ps.token, &dir.path().join("ps1")).await;
        let t_viewer = token(&admin, "alice", "viewer", Some("acme"), 600).await;
        let viewer_dir = dir.path().join("alice");
        // Only the address and the token's CA hash: a server with another CA gets no token.
        let ctl_enroll = |pin: &str| {
            Command::new(exe())
                .args(["ctl", "--server", &s.url, "--cert-dir"])
                .arg(&viewer_dir)
                .args(["enroll", "--token", &t_viewer.token, "--ca-sha256", pin])
                .output()
                .unwrap()
        };
        let out = ctl_enroll(&"ab".repeat(32));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not sending the token"),
            "{err}"
        );
        let out = ctl_enroll(&t_viewer.ca_sha256);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let viewer = Client::from_cert_dir(&s.url, &viewer_dir).unwrap();
        let me: Principal = viewer.get("/v1/whoami").await.unwrap();
        assert_eq!(
            (me.name.as_str(), me.tenant.as_deref()),
            ("alice", Some("acme"))
        );
        let t_globex = token(&admin, "bob", "tenant-admin", Some("globex"), 600).await;
        let globex = enroll(&s, &t_globex.token, &dir.path().join("bob")).await;

        // A reused token.
        let reuse = EnrollRequest {
            token: t_ps.token.clone(),
            csr_pem: None,
        };
        match anon
            .call::<_, Value>(Method::POST, "/v1/enroll", Some(&reuse))
            .await
        {
            Err(ClientError::Api {
                status: 401,
                code,
                message,
            }) => {
                assert_eq!(code, "token-used");
                assert!(message.contains("already used"), "{message}");
            }
            other => panic!("reused token: {other:?}"),
        }
        let e = audited(&admin, "POST /v1/enroll").await;
        assert_eq!((e.status, e.result), (401, AuditResult::Refused));
        assert!(e.detail.contains(&t_ps.id), "{e:?}");

        // An expired token.
        let t_old = token(&admin, "late", "viewer", Some("acme"), 1).await;
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let late = EnrollRequest {
            token: t_old.token.clone(),
            csr_pem: None,
        };
        match anon
            .call::<_, Value>(Method::POST, "/v1/enroll", Some(&late))
            .await
        {
            Err(ClientError::Api {
                status: 401, code, ..
            }) => assert_eq!(code, "token-expired"),
            other => panic!("expired token: {other:?}"),
        }
        assert!(audited(&admin, "POST /v1/enroll")
            .await
            .detail
            .contains("expired"));
        // A forged secret for a real token id is as unknown as no token.
        let forged = EnrollRequest {
            token: format!("{}.{}", t_old.id, "00".repeat(32)),
            csr_pem: None,
        };
        match anon
            .call::<_, Value>(Method::POST, "/v1/enroll", Some(&forged))
            .await
        {
            Err(ClientError::Api {
                status: 401, code, ..
            }) => assert_eq!(code, "bad-token"),
            other => panic!("forged token: {other:?}"),
        }
        let appliances: Vec<Value> = admin.get("/v1/appliances").await.unwrap();
        assert_eq!(
            appliances.len(),
            1,
            "only ps1 enrolled as an appliance: {appliances:?}"
        );

        // Another tenant's certificate: reading, changing, deleting acme's machine.
        let mut changed = before.clone();
        changed["description"] = json!("owned");
        for (m, body) in [
            (Method::GET, None),
            (Method::PUT, Some(changed.clone())),
            (Method::DELETE, None),
        ] {
            let (st, code, msg) = refused(&globex, m.clone(), machine, body).await;
            assert_eq!((st, code.as_str()), (403, "forbidden"), "{m}: {msg}");
            assert!(msg.contains("globex") && msg.contains("acme"), "{msg}");
            let e = audited(&admin, &format!("{m} {machine}")).await;
            assert_eq!(
                (e.who.as_str(), e.status, e.target_tenant.as_deref()),
                ("bob", 403, Some("acme"))
            );
        }
        let seen: Vec<Value> = globex.get("/v1/tenants").await.unwrap();
        assert_eq!(seen, vec![json!({"name": "globex", "description": ""})]);
        let (st, _, _) = refused(&globex, Method::GET, "/v1/tenants/acme/machines", None).await;
        assert_eq!(st, 403);
        // Another tenant's disk of the same name would share acme's recovery points (the roles
        // name a disk by its name alone): refused, without saying whose it is.
        for (path, body) in [
            (
                "/v1/tenants/globex/sites",
                json!({"name": "hq", "kind": "protected"}),
            ),
            ("/v1/tenants/globex/policies", policy(30)),
            (
                "/v1/tenants/globex/machines",
                json!({"name": "db", "site": "hq", "policy": "gold"}),
            ),
        ] {
            ok(&globex, Method::POST, path, Some(body)).await;
        }
        let disk = json!({"name": "d0", "size_bytes": 4096});
        let (st, _, msg) = refused(
            &globex,
            Method::POST,
            "/v1/tenants/globex/machines/db/disks",
            Some(disk),
        )
        .await;
        assert_eq!(st, 409, "{msg}");
        assert!(
            msg.contains("exists already on this appliance") && !msg.contains("acme"),
            "{msg}"
        );
        ok(
            &globex,
            Method::POST,
            "/v1/tenants/globex/machines/db/disks",
            Some(json!({"name": "globex-d0", "size_bytes": 4096})),
        )
        .await;

        // A viewer trying to change anything.
        let (st, _, msg) = refused(&viewer, Method::PUT, machine, Some(changed.clone())).await;
        assert_eq!(st, 403);
        assert!(msg.contains("viewer"), "{msg}");
        let (st, _, _) = refused(
            &viewer,
            Method::POST,
            "/v1/tenants/acme/sites",
            Some(json!({"name": "x", "kind": "recovery"})),
        )
        .await;
        assert_eq!(st, 403);
        assert_eq!(
            audited(&admin, &format!("PUT {machine}")).await.who,
            "alice"
        );

        // An operator changing a policy.
        let (st, _, msg) = refused(
            &ps,
            Method::PUT,
            "/v1/tenants/acme/policies/gold",
            Some(policy(3600)),
        )
        .await;
        assert_eq!(st, 403);
        assert!(msg.contains("operator"), "{msg}");
        let e = audited(&admin, "PUT /v1/tenants/acme/policies/gold").await;
        assert_eq!(
            (e.who.as_str(), e.role.map(|r| r.as_str())),
            ("ps1", Some("operator"))
        );

        // A tenant-admin may not hand out more than it holds.
        let (st, _, _) = refused(
            &globex,
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "x", "role": "provider-admin", "tenant": null, "ttl_secs": 60})),
        )
        .await;
        assert_eq!(st, 403);

        // Nothing changed.
        assert_eq!(ok(&admin, Method::GET, machine, None).await, before);
        assert_eq!(
            ok(&admin, Method::GET, "/v1/tenants/acme/policies/gold", None).await["rpo_alert_secs"],
            30
        );
        let sites: Vec<Value> = admin.get("/v1/tenants/acme/sites").await.unwrap();
        assert_eq!(sites.len(), 1);
        // But readers read: the viewer and the operator see their tenant.
        let machines: Vec<Value> = viewer.get("/v1/tenants/acme/machines").await.unwrap();
        assert_eq!(machines.len(), 1);
        ok(&ps, Method::GET, "/v1/tenants/acme/policies/gold", None).await;

        // The process server reports its disk; people of the tenant and other tenants may not.
        let report = "/v1/tenants/acme/machines/web/disks/d0/report";
        let r = |rpo: f64| Some(json!({"state": "protected", "rpo_seconds": rpo}));
        ok(&ps, Method::PUT, report, r(2.5)).await;
        for who in [&viewer, &globex] {
            let (st, _, _) = refused(who, Method::PUT, report, r(0.0)).await;
            assert_eq!(st, 403);
        }
        ok(&ps, Method::PUT, report, r(45.0)).await;
        let events: Vec<Value> = viewer.get("/v1/events").await.unwrap();
        let alert = events
            .iter()
            .find(|e| e["active"] == true)
            .expect("an RPO alert");
        assert!(
            alert["message"]
                .as_str()
                .unwrap()
                .contains("over the threshold of 30"),
            "{alert}"
        );
        let metrics = |c: &Client| {
            let c = c.clone();
            async move {
                let (_, b) = c.raw(Method::GET, "/metrics", None).await.unwrap();
                String::from_utf8_lossy(&b).into_owned()
            }
        };
        let m = metrics(&viewer).await;
        let labels = r#"tenant="acme",machine="web",disk="d0""#;
        assert!(
            m.contains(&format!("ferry_disk_rpo_seconds{{{labels}}} 45\n")),
            "{m}"
        );
        assert!(
            m.contains(&format!(
                "ferry_disk_state{{{labels},state=\"protected\"}} 1\n"
            )),
            "{m}"
        );
        assert!(!metrics(&globex).await.contains("acme"));
        // The viewer's CLI prints a table of what it may see.
        let out = Command::new(exe())
            .args(["ctl", "--server", &s.url, "--cert-dir"])
            .arg(&viewer_dir)
            .args(["machines", "--tenant", "acme"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("NAME") && text.contains("web"),
            "{text}"
        );
        // `ctl status` lists the disks that need attention first, not every disk: d0 is over
        // its RPO threshold, d1 is protected and quiet.
        ok(
            &admin,
            Method::POST,
            "/v1/tenants/acme/machines/web/disks",
            Some(json!({"name": "d1", "size_bytes": 4096})),
        )
        .await;
        ok(
            &ps,
            Method::PUT,
            "/v1/tenants/acme/machines/web/disks/d1/report",
            r(1.0),
        )
        .await;
        let status = |extra: &[&str]| {
            let out = Command::new(exe())
                .args(["ctl", "--server", &s.url, "--cert-dir"])
                .arg(&viewer_dir)
                .args(["status", "--tenant", "acme"])
                .args(extra)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let text = status(&[]);
        let listed =
            |text: &str, d: &str| text.lines().any(|l| l.split_whitespace().nth(1) == Some(d));
        assert!(listed(&text, "d0") && !listed(&text, "d1"), "{text}");
        // Each disk's row names its machine's policy.
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().take(3).eq(["web", "d0", "gold"])),
            "{text}"
        );
        assert!(text.contains("over the threshold of 30"), "{text}");
        assert!(
            text.contains("2 disks on 1 machines: 2 protected"),
            "{text}"
        );
        assert!(text.contains("1 need attention"), "{text}");
        let text = status(&["--all"]);
        assert!(listed(&text, "d0") && listed(&text, "d1"), "{text}");
    });
}

#[test]
fn bad_bodies_get_4xx_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("state"));
    run(async {
        let admin = s.admin();
        let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
            (
                "application/json",
                b"{\"name\": \"acme\"".to_vec(),
                400,
                "malformed-json",
            ),
            (
                "application/json",
                b"\xff\xfe garbage".to_vec(),
                400,
                "malformed-json",
            ),
            (
                "application/json",
                br#"{"name": 42}"#.to_vec(),
                422,
                "wrong-type",
            ),
            (
                "application/json",
                br#"{"name": "acme", "extra": true}"#.to_vec(),
                422,
                "wrong-type",
            ),
            (
                "application/json",
                br#"{"name": "Not A Name"}"#.to_vec(),
                422,
                "invalid",
            ),
            (
                "text/plain",
                br#"{"name": "acme"}"#.to_vec(),
                415,
                "not-json",
            ),
            (
                "application/json",
                format!(r#"{{"name": "{}"}}"#, "a".repeat(300 * 1024)).into_bytes(),
                413,
                "too-large",
            ),
        ];
        for (ct, body, want, code) in cases {
            let (st, bytes) = admin
                .raw(Method::POST, "/v1/tenants", Some((ct, body)))
                .await
                .unwrap();
            let v: Value =
                serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {bytes:?}"));
            assert_eq!((st.as_u16(), v["code"].as_str()), (want, Some(code)), "{v}");
            let (st, _) = admin.raw(Method::GET, "/healthz", None).await.unwrap();
            assert_eq!(st, StatusCode::OK);
        }
        // Wrong types deep inside a nested object, and an out-of-range value.
        ok(
            &admin,
            Method::POST,
            "/v1/tenants",
            Some(json!({"name": "acme"})),
        )
        .await;
        let mut p = policy(30);
        p["bandwidth"]["schedule"][0]["days"] = json!(["someday"]);
        let (st, code, _) =
            refused(&admin, Method::POST, "/v1/tenants/acme/policies", Some(p)).await;
        assert_eq!((st, code.as_str()), (422, "wrong-type"));
        let (st, code, msg) = refused(
            &admin,
            Method::POST,
            "/v1/tenants/acme/policies",
            Some(policy(0)),
        )
        .await;
        assert_eq!((st, code.as_str()), (422, "invalid"));
        assert!(msg.contains("rpo_alert_secs"), "{msg}");

        // References must resolve, and what is referred to cannot be deleted.
        ok(
            &admin,
            Method::POST,
            "/v1/tenants/acme/sites",
            Some(json!({"name": "hq", "kind": "protected"})),
        )
        .await;
        let web = json!({"name": "web", "site": "hq", "policy": "gold"});
        let (st, _, msg) = refused(
            &admin,
            Method::POST,
            "/v1/tenants/acme/machines",
            Some(web.clone()),
        )
        .await;
        assert_eq!(st, 422);
        assert!(msg.contains("policy gold does not exist"), "{msg}");
        ok(
            &admin,
            Method::POST,
            "/v1/tenants/acme/policies",
            Some(policy(30)),
        )
        .await;
        ok(
            &admin,
            Method::POST,
            "/v1/tenants/acme/machines",
            Some(web.clone()),
        )
        .await;
        let (st, code, msg) = refused(
            &admin,
            Method::DELETE,
            "/v1/tenants/acme/policies/gold",
            None,
        )
        .await;
        assert_eq!((st, code.as_str()), (409, "conflict"));
        assert!(msg.contains("machine web uses this policy"), "{msg}");
        let (st, _, _) =
            refused(&admin, Method::POST, "/v1/tenants/acme/machines", Some(web)).await;
        assert_eq!(st, 409);
        let renamed = json!({"name": "other", "site": "hq", "policy": "gold"});
        let (st, _, _) = refused(
            &admin,
            Method::PUT,
            "/v1/tenants/acme/machines/web",
            Some(renamed),
        )
        .await;
        assert_eq!(st, 422);
        let (st, _, _) = refused(&admin, Method::GET, "/v1/tenants/acme/machines/nope", None).await;
        assert_eq!(st, 404);
        let (st, _, msg) =
            refused(&admin, Method::GET, "/v1/tenants/Bad_Name/machines", None).await;
        assert_eq!(st, 404);
        assert!(msg.contains("tenant"), "{msg}");

        // Not TLS at all, and a TLS client that hangs up: the server does not notice.
        let addr = s.url.trim_start_matches("https://").to_string();
        let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut raw, b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        drop(raw);
        let tenants: Vec<Value> = admin.get("/v1/tenants").await.unwrap();
        assert_eq!(tenants.len(), 1);
        // Every refusal was audited.
        let log: Vec<AuditEntry> = admin.get("/v1/audit?limit=1000").await.unwrap();
        let refusals = log
            .iter()
            .filter(|e| e.result == AuditResult::Refused)
            .count();
        assert_eq!(refusals, 15, "{log:#?}");
        assert!(
            log.iter()
                .any(|e| e.status == 413 && e.detail.to_lowercase().contains("length limit")),
            "{log:#?}"
        );
    });
}

/// A valid body for each route that takes one, so that each answers as for a real caller.
fn example_body(method: &Method, path: &str) -> Value {
    let put = *method == Method::PUT;
    match path.rsplit('/').next().unwrap_or_default() {
        "tokens" => json!({"name": "ps2", "role": "viewer", "tenant": "acme", "ttl_secs": 60}),
        "enroll" => json!({"token": "0011.2233"}),
        "tenants" | "acme" if path.matches('/').count() <= 3 => {
            json!({"name": if put { "acme" } else { "initech" }})
        }
        "sites" | "hq" => json!({"name": "hq", "kind": "protected"}),
        "policies" | "gold" => policy(30),
        "machines" | "web" => json!({"name": "web", "site": "hq", "policy": "gold"}),
        "disks" | "d0" => json!({"name": "d0", "size_bytes": 4096}),
        "plans" | "dr" => json!({"name": "dr", "groups": []}),
        "report" if path.starts_with("/v1/appliances/") => json!({"cache_free_ratio": 0.5}),
        "report" => json!({"state": "seeding", "rpo_seconds": null}),
        // The appliance's own routes, with bodies that change nothing on this machine: no such
        // interface, no hooks configured, no provider listening.
        "password" | "login" => json!({"password": "example-password"}),
        "network" => json!({"interface": "ferry-none0", "mode": "static", "ipv4": "192.0.2.10/24"}),
        "settings" => json!({"hostname": "example"}),
        "registration" => json!({"provider": "https://127.0.0.1:1", "key": "00.11",
                                 "ca_sha256": "00".repeat(32)}),
        "maintenance" => json!({"action": "reboot"}),
        "update-slot" => json!({"slot": "a"}),
        // Asked by a person (the test's caller): refused, 403, as documented.
        "config" => json!({"address": "127.0.0.1:7443"}),
        // Without a master target enrolled the server refuses jobs (409), as documented.
        "jobs" => json!({"kind": "test-failover"}),
        // A person is not the role an order is addressed to: refused, 403, as documented.
        "result" => json!({"error": "no such step"}),
        "progress" => json!({"done": 1, "total": 2, "detail": "compared 1 of 2 blocks"}),
        // No such identity: 404, as documented (the caller's own certificate stays valid).
        "revoke" => json!({"name": "nobody", "tenant": "acme"}),
        // The caller's renewal: the old certificate stays valid until the new one is used.
        "renew" => json!({}),
        other => panic!("no example body for {other} ({path})"),
    }
}

#[test]
fn openapi_document_parses_and_every_route_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("state"));
    run(async {
        let admin = s.admin();
        inventory(&admin).await;
        let doc: Value = admin.get("/openapi.json").await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        // Every reference resolves inside the document.
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"").skip(1) {
            let target = &r[..r.find('"').unwrap()];
            let pointer = target
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external ref {target}"));
            assert!(doc.pointer(pointer).is_some(), "unresolved $ref {target}");
        }
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses: Vec<u16> = op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .map(|k| k.parse().unwrap())
                    .collect();
                assert!(
                    !responses.is_empty() && op["operationId"].is_string(),
                    "{method} {path}"
                );
                ops.push((
                    method.to_uppercase().parse::<Method>().unwrap(),
                    path.clone(),
                    responses,
                    op.clone(),
                ));
            }
        }
        assert!(ops.len() >= 38, "{} operations", ops.len());
        // Deletes last, deepest first, so that each finds what it deletes.
        ops.sort_by_key(|(m, p, _, _)| {
            (
                *m == Method::DELETE,
                std::cmp::Reverse(p.matches('/').count()),
            )
        });
        for (method, path, documented, op) in &ops {
            let concrete = path
                .replace("{tenant}", "acme")
                .replace("{site}", "hq")
                .replace("{policy}", "gold")
                .replace("{machine}", "web")
                .replace("{disk}", "d0")
                .replace("{plan}", "dr")
                .replace("{job}", "1")
                .replace("{order}", "1")
                .replace("{appliance}", "ps1");
            let body = op.get("requestBody").map(|_| {
                (
                    "application/json",
                    serde_json::to_vec(&example_body(method, &concrete)).unwrap(),
                )
            });
            let (st, bytes) = admin.raw(method.clone(), &concrete, body).await.unwrap();
            assert!(
                documented.contains(&st.as_u16()),
                "{method} {concrete}: {st} not in {documented:?}: {}",
                String::from_utf8_lossy(&bytes)
            );
            let content = &op["responses"][st.as_u16().to_string()]["content"];
            if content.get("application/json").is_some() {
                serde_json::from_slice::<Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{method} {concrete}: {e}"));
            }
        }
        // Routes that are not in the document do not exist.
        let (st, _) = admin.raw(Method::GET, "/v1/nothing", None).await.unwrap();
        assert_eq!(st, StatusCode::NOT_FOUND);
        let (st, _) = admin.raw(Method::PATCH, "/v1/tenants", None).await.unwrap();
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
        // Metrics: per-disk gauges and the process' own.
        let (_, m) = admin.raw(Method::GET, "/metrics", None).await.unwrap();
        let m = String::from_utf8_lossy(&m);
        assert!(
            m.contains("process_resident_memory_bytes") && m.contains("process_cpu_seconds_total"),
            "{m}"
        );
    });
}

#[test]
fn state_survives_a_crash_of_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = Server::start(&state);
    let (t_used, viewer_dir) = (
        std::cell::RefCell::new(String::new()),
        dir.path().join("viewer"),
    );
    run(async {
        let admin = s.admin();
        inventory(&admin).await;
        let t = token(&admin, "carol", "viewer", Some("acme"), 600).await;
        enroll(&s, &t.token, &viewer_dir).await;
        *t_used.borrow_mut() = t.token;
    });
    let ca_before = s.ca();
    s.crash();
    let s = Server::start(&state);
    run(async {
        assert_eq!(s.ca(), ca_before, "the CA was replaced");
        let admin = s.admin();
        let m = ok(&admin, Method::GET, "/v1/tenants/acme/machines/web", None).await;
        assert_eq!(m["policy"], "gold");
        let disks: Vec<Value> = admin
            .get("/v1/tenants/acme/machines/web/disks")
            .await
            .unwrap();
        assert_eq!(disks.len(), 1);
        let viewer = Client::from_cert_dir(&s.url, &viewer_dir).unwrap();
        let me: Principal = viewer.get("/v1/whoami").await.unwrap();
        assert_eq!(me.name, "carol");
        let again = EnrollRequest {
            token: t_used.borrow().clone(),
            csr_pem: None,
        };
        match s
            .anonymous()
            .call::<_, Value>(Method::POST, "/v1/enroll", Some(&again))
            .await
        {
            Err(ClientError::Api { code, .. }) => assert_eq!(code, "token-used"),
            other => panic!("{other:?}"),
        }
        let log: Vec<AuditEntry> = admin.get("/v1/audit?limit=1000").await.unwrap();
        assert!(log
            .iter()
            .any(|e| e.what == "POST /v1/tenants/acme/plans" && e.result == AuditResult::Ok));
    });
}

/// `ferry ctl` as the identity in `dir`, JSON out; the output, or the error it printed.
fn ctl(s: &Server, dir: &std::path::Path, args: &[&str]) -> Result<Value, String> {
    let out = Command::new(exe())
        .args(["ctl", "--json", "--server", &s.url, "--cert-dir"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn certificates_are_revoked_and_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let s = Server::start(&state);
    let d = dir.path();
    let (alice_dir, old_alice) = (d.join("alice"), d.join("alice-old"));
    run(async {
        let admin = s.admin();
        inventory(&admin).await;
        let ta = token(&admin, "tara", "tenant-admin", Some("acme"), 600).await;
        let tara = enroll(&s, &ta.token, &d.join("tara")).await;
        let t = token(&admin, "gus", "tenant-admin", Some("globex"), 600).await;
        let gus = enroll(&s, &t.token, &d.join("gus")).await;
        let t = token(&admin, "vic", "viewer", Some("acme"), 600).await;
        let vic = enroll(&s, &t.token, &d.join("vic")).await;
        let t = token(&admin, "ps1", "operator", Some("acme"), 600).await;
        let ps1 = enroll(&s, &t.token, &d.join("ps1")).await;
        // Alice, a CLI user of acme who may change its configuration.
        let t = token(&admin, "alice", "tenant-admin", Some("acme"), 600).await;
        ctl(
            &s,
            &alice_dir,
            &["enroll", "--token", &t.token, "--ca-sha256", &t.ca_sha256],
        )
        .unwrap();

        // Tenant admins list their tenant's identities only.
        let listed = ctl(&s, &d.join("tara"), &["certs"]).unwrap();
        let names: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["alice", "ps1", "tara", "vic"], "{listed}");
        let alice_sha = listed[0]["sha256"].as_str().unwrap().to_string();
        assert!(listed[0]["expires_unix"].as_u64().unwrap() > 300 * 86_400);

        // A viewer and an operator may not revoke, nor list; another tenant's admin may not
        // revoke acme's identities, by certificate or by name; each refusal is audited and
        // alice keeps working.
        let by_sha = json!({"sha256": &alice_sha[..12], "reason": "test"});
        for (who, c) in [("vic", &vic), ("ps1", &ps1)] {
            let (st, code, msg) = refused(
                c,
                Method::POST,
                "/v1/certificates/revoke",
                Some(by_sha.clone()),
            )
            .await;
            assert_eq!((st, code.as_str()), (403, "forbidden"), "{who}: {msg}");
            assert!(msg.contains("may not revoke"), "{msg}");
            let (st, _, _) = refused(c, Method::GET, "/v1/certificates", None).await;
            assert_eq!(st, 403);
        }
        let (st, _, msg) = refused(
            &gus,
            Method::POST,
            "/v1/certificates/revoke",
            Some(by_sha.clone()),
        )
        .await;
        assert!(
            st == 403 && msg.contains("globex") && msg.contains("acme"),
            "{msg}"
        );
        let by_name = json!({"name": "alice", "tenant": "acme"});
        let (st, _, msg) =
            refused(&gus, Method::POST, "/v1/certificates/revoke", Some(by_name)).await;
        assert!(st == 403 && msg.contains("globex"), "{msg}");
        let e = audited(&admin, "POST /v1/certificates/revoke").await;
        assert_eq!(
            (e.who.as_str(), e.status, e.result),
            ("gus", 403, AuditResult::Refused)
        );
        let gus_sees: Vec<Value> = gus.get("/v1/certificates").await.unwrap();
        assert_eq!(gus_sees.len(), 1, "{gus_sees:?}");
        // Nobody revokes the certificate they are calling with.
        let tara_sha = listed[2]["sha256"].as_str().unwrap();
        let (st, _, msg) = refused(
            &tara,
            Method::POST,
            "/v1/certificates/revoke",
            Some(json!({"sha256": tara_sha})),
        )
        .await;
        assert!(st == 409 && msg.contains("this request came with"), "{msg}");
        ctl(&s, &alice_dir, &["whoami"]).unwrap();

        // Renewal: a fresh certificate without a token; the old one is refused once the new
        // one has been used (the CLI tries it before it swaps it in).
        copy_dir(&alice_dir, &old_alice);
        let renewed = ctl(&s, &alice_dir, &["renew"]).unwrap();
        assert_eq!(renewed["principal"]["name"], "alice", "{renewed}");
        assert!(renewed["private_key_pem"].is_null(), "{renewed}");
        let me = ctl(&s, &alice_dir, &["whoami"]).unwrap();
        assert_eq!(me["role"], "tenant-admin", "{me}");
        let old = Client::from_cert_dir(&s.url, &old_alice).unwrap();
        let (st, code, msg) = refused(&old, Method::GET, "/v1/whoami", None).await;
        assert_eq!((st, code.as_str()), (401, "revoked-certificate"), "{msg}");
        assert!(msg.contains("renewal") && msg.contains(&alice_sha), "{msg}");
        assert!(!d.join(".alice.renewed").exists());

        // Tara revokes alice (a lost laptop): alice's next call is refused, says why, changes
        // nothing, and is audited under alice's name.
        let r = ctl(
            &s,
            &d.join("tara"),
            &["revoke", "--name", "alice", "--reason", "lost laptop"],
        )
        .unwrap();
        assert_eq!(r.as_array().unwrap().len(), 1, "{r}");
        let err = ctl(&s, &alice_dir, &["tenant", "initech"]).unwrap_err();
        assert!(
            err.contains("revoked") && err.contains("lost laptop") && err.contains("tara"),
            "{err}"
        );
        let alice = Client::from_cert_dir(&s.url, &alice_dir).unwrap();
        let (st, code, _) = refused(
            &alice,
            Method::POST,
            "/v1/tenants/acme/sites",
            Some(json!({"name": "dr", "kind": "recovery"})),
        )
        .await;
        assert_eq!((st, code.as_str()), (401, "revoked-certificate"));
        let e = audited(&admin, "POST /v1/tenants/acme/sites").await;
        assert_eq!(
            (e.who.as_str(), e.status, e.result),
            ("alice", 401, AuditResult::Refused)
        );
        assert!(e.detail.contains("lost laptop"), "{e:?}");
        let sites: Vec<Value> = admin.get("/v1/tenants/acme/sites").await.unwrap();
        assert_eq!(sites.len(), 1, "{sites:?}");
        let e = audited(&admin, "POST /v1/certificates/revoke").await;
        assert_eq!((e.who.as_str(), e.status), ("tara", 200));
        // A renewal does not outlive the certificate it came from: vic renews (the server
        // makes the key) but has not used the new one when its old one is revoked.
        let vic_sha = listed[3]["sha256"].as_str().unwrap();
        let fresh: ferry_api::Enrolled = vic
            .call(Method::POST, "/v1/self/renew", Some(&json!({})))
            .await
            .unwrap();
        ferry_config_server::serve::write_identity(
            &d.join("vic2"),
            &fresh.ca_cert_pem,
            &fresh.certificate_pem,
            &fresh.private_key_pem.unwrap(),
        )
        .unwrap();
        let r: Vec<ferry_api::IssuedCertificate> = tara
            .call(
                Method::POST,
                "/v1/certificates/revoke",
                Some(&json!({"sha256": vic_sha})),
            )
            .await
            .unwrap();
        assert_eq!(r.len(), 2, "{r:?}");
        let vic2 = Client::from_cert_dir(&s.url, &d.join("vic2")).unwrap();
        let (st, _, _) = refused(&vic2, Method::GET, "/v1/whoami", None).await;
        assert_eq!(st, 401);
        // Again: nothing left to revoke.
        let (st, _, _) = refused(
            &tara,
            Method::POST,
            "/v1/certificates/revoke",
            Some(json!({"name": "alice"})),
        )
        .await;
        assert_eq!(st, 409);
    });
    // A restart keeps the revocations.
    s.crash();
    let s = Server::start(&state);
    run(async {
        let alice = Client::from_cert_dir(&s.url, &alice_dir).unwrap();
        let (st, code, _) = refused(&alice, Method::GET, "/v1/whoami", None).await;
        assert_eq!((st, code.as_str()), (401, "revoked-certificate"));
        let old = Client::from_cert_dir(&s.url, &old_alice).unwrap();
        let (st, _, _) = refused(&old, Method::GET, "/v1/whoami", None).await;
        assert_eq!(st, 401);
        let tara = Client::from_cert_dir(&s.url, &d.join("tara")).unwrap();
        let me: Principal = tara.get("/v1/whoami").await.unwrap();
        assert_eq!(me.name, "tara");
        let all: Vec<ferry_api::IssuedCertificate> =
            s.admin().get("/v1/certificates").await.unwrap();
        let alices: Vec<_> = all.iter().filter(|c| c.principal.name == "alice").collect();
        assert!(
            alices.len() == 2 && alices.iter().all(|c| c.revoked.is_some()),
            "{alices:?}"
        );
    });
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The newest audit entries (up to 1000).
async fn audit_log(admin: &Client) -> Vec<AuditEntry> {
    admin.get("/v1/audit?limit=1000").await.unwrap()
}

#[test]
fn refused_clients_are_answered_429_and_summed_up_in_the_audit_log() {
    const LIMIT: usize = ferry_config_server::refusals::DEFAULT_PER_WINDOW as usize;
    const WINDOW: Duration = Duration::from_secs(15);
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("state"),
        &["--refusal-window-secs".into(), WINDOW.as_secs().to_string()],
    );
    run(async {
        let admin = s.admin();
        inventory(&admin).await;
        let t = token(&admin, "carol", "viewer", Some("acme"), 600).await;
        let viewer = enroll(&s, &t.token, &dir.path().join("viewer")).await;
        let good = token(&admin, "dave", "viewer", Some("acme"), 600).await;
        let before = audit_log(&admin).await.last().unwrap().seq;
        let started = std::time::Instant::now();

        // Guessing enrollment tokens (no certificate: counted by address, 127.0.0.1).
        let anon = s.anonymous();
        let guess = |i: usize| Some(json!({"token": format!("{:016x}.{i:064x}", i)}));
        for i in 0..LIMIT {
            let (st, code, _) = refused(&anon, Method::POST, "/v1/enroll", guess(i)).await;
            assert_eq!((st, code.as_str()), (401, "bad-token"), "guess {i}");
        }
        let (st, code, msg) = refused(&anon, Method::POST, "/v1/enroll", guess(LIMIT)).await;
        assert_eq!((st, code.as_str()), (429, "too-many-refusals"), "{msg}");
        assert!(
            msg.contains("127.0.0.1") && msg.contains("try again in"),
            "{msg}"
        );
        // Even a right token waits for the window's end: nothing is looked at.
        let right = Some(json!({"token": good.token}));
        let (st, _, _) = refused(&anon, Method::POST, "/v1/enroll", right.clone()).await;
        assert_eq!(st, 429);

        // Hammering the API without a certificate: 429s, while an enrolled administrator on the
        // same loopback address (counted by its certificate) is served throughout.
        for i in 0..300 {
            let (st, code, _) = refused(&anon, Method::GET, "/v1/tenants", None).await;
            assert_eq!(
                (st, code.as_str()),
                (429, "too-many-refusals"),
                "request {i}"
            );
            if i % 50 == 0 {
                let me: Principal = admin.get("/v1/whoami").await.unwrap();
                assert_eq!(me.name, "admin");
            }
        }
        // An enrolled identity that keeps being refused (another tenant's objects) is limited
        // by its certificate: the others are not.
        let viewer_started = std::time::Instant::now();
        for i in 0..LIMIT {
            let (st, _, _) =
                refused(&viewer, Method::GET, "/v1/tenants/globex/machines", None).await;
            assert_eq!(st, 403, "request {i}");
        }
        let (st, code, _) = refused(&viewer, Method::GET, "/v1/whoami", None).await;
        assert_eq!((st, code.as_str()), (429, "too-many-refusals"));
        ok(&admin, Method::GET, "/v1/tenants/acme/machines", None).await;
        assert!(
            started.elapsed() < WINDOW,
            "the refusals took longer than the window ({:?}); the test cannot tell",
            started.elapsed()
        );

        // Each refusal up to the limit was audited; the 429s were not, one by one.
        let log = audit_log(&admin).await;
        let new: Vec<&AuditEntry> = log.iter().filter(|e| e.seq > before).collect();
        assert!(new.iter().all(|e| e.status != 429), "{new:?}");
        let count = |who: &str, status: u16| {
            new.iter()
                .filter(|e| e.who == who && e.status == status)
                .count()
        };
        assert_eq!(count("anonymous", 401), LIMIT);
        assert_eq!(count("carol", 403), LIMIT);

        // The window ends: each limited client gets one summary entry, and is served again.
        // (The viewer's window began last.)
        tokio::time::sleep(
            WINDOW.saturating_sub(viewer_started.elapsed()) + Duration::from_secs(1),
        )
        .await;
        let e: Enrolled = anon
            .call(Method::POST, "/v1/enroll", right.as_ref())
            .await
            .unwrap();
        assert_eq!(e.principal.name, "dave");
        let me: Principal = viewer.get("/v1/whoami").await.unwrap();
        assert_eq!(me.name, "carol");
        let log = audit_log(&admin).await;
        let new: Vec<&AuditEntry> = log.iter().filter(|e| e.seq > before).collect();
        assert!(new.len() < 3 * LIMIT, "{} audit entries", new.len());
        let summaries: Vec<&&AuditEntry> = new.iter().filter(|e| e.status == 429).collect();
        assert_eq!(summaries.len(), 2, "{summaries:?}");
        let anon_sum = summaries.iter().find(|e| e.who == "anonymous").unwrap();
        assert_eq!(anon_sum.what, "too many refusals");
        assert_eq!(anon_sum.result, AuditResult::Refused);
        let n = LIMIT + 2 + 300;
        assert!(
            anon_sum
                .detail
                .starts_with(&format!("{n} requests refused from 127.0.0.1 since ")),
            "{}",
            anon_sum.detail
        );
        let carol = summaries.iter().find(|e| e.who == "carol").unwrap();
        assert_eq!(carol.tenant.as_deref(), Some("acme"));
        assert!(
            carol
                .detail
                .starts_with(&format!("{} requests refused from certificate ", LIMIT + 1)),
            "{}",
            carol.detail
        );

        // Metrics: refusals and 429s counted.
        let (_, m) = admin.raw(Method::GET, "/metrics", None).await.unwrap();
        let m = String::from_utf8_lossy(&m);
        let value = |name: &str| -> u64 {
            m.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name} in {m}"))
                .parse()
                .unwrap()
        };
        assert!(value("ferry_refusals_total") >= 2 * LIMIT as u64, "{m}");
        assert_eq!(value("ferry_refusals_limited_total"), 303, "{m}");
    });
}
