//! The configuration server test harness: the real `ferry config-server` in a temporary
//! state directory on loopback, clients for its identities, and the inventory the tests share.
#![allow(dead_code)]

use ferry_api::{AuditEntry, EnrollRequest, Enrolled, TokenCreated};
use ferry_config_server::client::{Client, ClientError, Method};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every test's whole run, server starts included.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// A running `ferry config-server`; killed when dropped.
pub struct Server {
    child: Child,
    pub state: PathBuf,
    pub url: String,
}

impl Server {
    pub fn start(state: &Path) -> Server {
        Self::start_with(state, &[])
    }

    /// Start with extra arguments (a recovery site for failover jobs, for instance).
    pub fn start_with(state: &Path, extra: &[String]) -> Server {
        let addr_file = state.join("listening");
        let _ = std::fs::remove_file(&addr_file);
        // Appending: a restarted server's log follows the crashed one's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state.with_extension("log"))
            .unwrap();
        // Any free port, unless `extra` names one (roles that must find it after a restart).
        let listen: &[&str] = if extra.iter().any(|a| a == "--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(exe())
            .arg("config-server")
            .arg("--state")
            .arg(state)
            .args(listen)
            .args(extra)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let start = Instant::now();
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file) {
                break a;
            }
            if let Some(st) = child.try_wait().unwrap() {
                panic!("config-server exited early: {st}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "config-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Server {
            child,
            state: state.to_path_buf(),
            url: format!("https://{addr}"),
        }
    }

    pub fn admin(&self) -> Client {
        Client::from_cert_dir(&self.url, &self.state.join("admin")).unwrap()
    }

    pub fn ca(&self) -> String {
        std::fs::read_to_string(self.state.join("pki/ca-cert.pem")).unwrap()
    }

    pub fn anonymous(&self) -> Client {
        Client::anonymous(&self.url, &self.ca()).unwrap()
    }

    /// SIGKILL: no chance to flush anything that was not flushed before answering.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            tokio::time::timeout(TEST_DEADLINE, f)
                .await
                .expect("test took too long")
        })
}

pub async fn call(
    c: &Client,
    m: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, ClientError> {
    c.call::<Value, Value>(m, path, body.as_ref()).await
}

pub async fn ok(c: &Client, m: Method, path: &str, body: Option<Value>) -> Value {
    match call(c, m.clone(), path, body).await {
        Ok(v) => v,
        Err(e) => panic!("{m} {path}: {e}"),
    }
}

/// The refusal's status and code, and the message, which must be non-empty.
pub async fn refused(
    c: &Client,
    m: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, String, String) {
    match call(c, m.clone(), path, body).await {
        Err(ClientError::Api {
            status,
            code,
            message,
        }) => {
            assert!(!message.is_empty(), "{m} {path}: an empty error message");
            (status, code, message)
        }
        other => panic!("{m} {path}: expected a refusal, got {other:?}"),
    }
}

/// The newest audit entry for `what` (`METHOD /path`).
pub async fn audited(admin: &Client, what: &str) -> AuditEntry {
    let v: Vec<AuditEntry> = admin.get("/v1/audit?limit=1000").await.unwrap();
    v.into_iter()
        .rev()
        .find(|e| e.what == what)
        .unwrap_or_else(|| panic!("no audit entry for {what}"))
}

pub async fn token(
    admin: &Client,
    name: &str,
    role: &str,
    tenant: Option<&str>,
    ttl: u64,
) -> TokenCreated {
    let body = json!({"name": name, "role": role, "tenant": tenant, "ttl_secs": ttl,
                      "appliance": (role == "operator").then_some("process-server")});
    serde_json::from_value(ok(admin, Method::POST, "/v1/tokens", Some(body)).await).unwrap()
}

/// Enroll through the library client (server-made key), writing a certificate directory.
pub async fn enroll(s: &Server, tok: &str, dir: &Path) -> Client {
    let req = EnrollRequest {
        token: tok.into(),
        csr_pem: None,
    };
    let e: Enrolled = s
        .anonymous()
        .call(Method::POST, "/v1/enroll", Some(&req))
        .await
        .unwrap();
    ferry_config_server::serve::write_identity(
        dir,
        &e.ca_cert_pem,
        &e.certificate_pem,
        &e.private_key_pem.unwrap(),
    )
    .unwrap();
    Client::from_cert_dir(&s.url, dir).unwrap()
}

/// Tenant acme with a site, a policy, a machine with a disk, and a plan.
pub async fn inventory(admin: &Client) {
    ok(
        admin,
        Method::POST,
        "/v1/tenants",
        Some(json!({"name": "acme"})),
    )
    .await;
    ok(
        admin,
        Method::POST,
        "/v1/tenants",
        Some(json!({"name": "globex"})),
    )
    .await;
    ok(
        admin,
        Method::POST,
        "/v1/tenants/acme/sites",
        Some(json!({"name": "hq", "kind": "protected"})),
    )
    .await;
    ok(
        admin,
        Method::POST,
        "/v1/tenants/acme/policies",
        Some(policy(30)),
    )
    .await;
    ok(
        admin,
        Method::POST,
        "/v1/tenants/acme/machines",
        Some(json!({"name": "web", "site": "hq", "policy": "gold"})),
    )
    .await;
    ok(
        admin,
        Method::POST,
        "/v1/tenants/acme/machines/web/disks",
        Some(json!({"name": "d0", "size_bytes": 1u64 << 30})),
    )
    .await;
    ok(
        admin,
        Method::POST,
        "/v1/tenants/acme/plans",
        Some(json!({"name": "dr",
        "groups": [{"priority": 1, "machines": [{"machine": "web", "boot_order": 1}]}]})),
    )
    .await;
}

pub fn policy(rpo: u32) -> Value {
    json!({"name": "gold", "mode": "continuous", "checkpoint_interval_secs": 1, "rpo_alert_secs": rpo,
           "retention": [{"every_secs": 1, "keep_secs": 3600}],
           "bandwidth": {"limit_mbit": 10000, "schedule": [{"days": ["mon", "fri"], "start_minute": 480, "end_minute": 1080, "limit_mbit": 5000}]}})
}
