//! What the console shows: the dashboard (disks with state, RPO and throughput, cache use,
//! active alerts, whether the recovery site answers), diagnostics (reachability and TLS
//! handshakes to the recovery site and the provider), recent logs, and a support bundle with
//! the secrets taken out.

use crate::app::{now_unix, Caller, Shared};
use crate::error::ApiError;
use crate::store::trees;
use crate::system::{get, hook, keys};
use axum::extract::State;
use axum::Json;
use ferry_api::{
    Action, AuditEntry, CacheUse, Check, Dashboard, Diagnostics, Disk, DiskStatus, Event, Logs,
    NetworkConfig, Registered, Settings, SupportBundle,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// The dashboard refreshes every few seconds and waits for its answer: its reachability check
/// is shorter than a diagnostic's.
const GLANCE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn dashboard(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<Dashboard>, ApiError> {
    p.may(Action::System, None)?;
    let disks: Vec<(String, Disk)> = app.store.list_keyed(trees::DISKS, "")?;
    let disks = disks
        .into_iter()
        .map(|(k, d)| {
            let mut parts = k.splitn(3, '/');
            DiskStatus {
                tenant: parts.next().unwrap_or_default().into(),
                machine: parts.next().unwrap_or_default().into(),
                disk: d.name.clone(),
                state: d.state.as_str().into(),
                rpo_seconds: d.rpo_seconds,
                throughput_bytes_per_sec: d.throughput_bytes_per_sec,
            }
        })
        .collect();
    // The alerts that hold now (a raise stays in the event log after its clear).
    let alerts = crate::alerts::active(&app.store, &p)?;
    let cache = app.system.config.cache_dir.as_ref().and_then(|d| {
        let s = rustix::fs::statvfs(d).ok()?;
        let total = s.f_blocks.saturating_mul(s.f_frsize);
        let free = s.f_bavail.saturating_mul(s.f_frsize);
        Some(CacheUse {
            path: d.display().to_string(),
            total_bytes: total,
            used_bytes: total.saturating_sub(free),
        })
    });
    let recovery_site = match &app.system.config.recovery_site {
        Some(t) => Some(reach("recovery site", t, GLANCE_TIMEOUT).await),
        None => None,
    };
    let settings: Settings = get(&app, keys::SETTINGS)?.unwrap_or_default();
    Ok(Json(Dashboard {
        hostname: settings.hostname,
        disks,
        cache,
        alerts,
        recovery_site,
    }))
}

/// A TCP connection within `within`.
async fn reach(name: &str, target: &str, within: Duration) -> Check {
    let r = tokio::time::timeout(within, tokio::net::TcpStream::connect(target)).await;
    let (ok, detail) = match r {
        Ok(Ok(_)) => (true, "reachable (TCP connection made)".to_string()),
        Ok(Err(e)) => (false, format!("unreachable: {e}")),
        Err(_) => (false, format!("no answer within {} s", within.as_secs())),
    };
    Check {
        name: format!("{name} reachable"),
        target: target.into(),
        ok,
        detail,
    }
}

/// Records the server's chain and checks the handshake's signature; the chain itself is
/// judged afterwards against the CA this appliance expects there (if it knows one).
#[derive(Debug)]
struct Recorder {
    chain: Mutex<Vec<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Recorder {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut c = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        c.push(crate::ca::fingerprint(end_entity));
        c.extend(intermediates.iter().map(|i| crate::ca::fingerprint(i)));
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS handshake with `target` (HOST:PORT); with `ca_sha256`, the chain must carry that CA.
async fn tls(name: &str, target: &str, ca_sha256: Option<&str>) -> Check {
    let check = |ok, detail: String| Check {
        name: format!("{name} TLS"),
        target: target.into(),
        ok,
        detail,
    };
    let host = target
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(target);
    let Ok(sni) = ServerName::try_from(host.to_string()) else {
        return check(false, format!("{host:?} is not a host name or address"));
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rec = Arc::new(Recorder {
        chain: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let cfg = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b
            .dangerous() // the chain is judged below, against the CA expected there
            .with_custom_certificate_verifier(rec.clone())
            .with_no_client_auth(),
        Err(e) => return check(false, format!("TLS setup: {e}")),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let r = tokio::time::timeout(CHECK_TIMEOUT, async {
        let tcp = tokio::net::TcpStream::connect(target).await?;
        connector.connect(sni, tcp).await
    })
    .await;
    match r {
        Err(_) => check(
            false,
            format!("no handshake within {} s", CHECK_TIMEOUT.as_secs()),
        ),
        Ok(Err(e)) => check(false, format!("handshake failed: {e}")),
        Ok(Ok(s)) => {
            let version = s
                .get_ref()
                .1
                .protocol_version()
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            let chain = rec.chain.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let leaf = chain.first().map(|c| &c[..16.min(c.len())]).unwrap_or("");
            match ca_sha256 {
                Some(ca) if chain.iter().any(|c| c == ca) => check(
                    true,
                    format!("handshake ok ({version}); the chain carries the expected CA"),
                ),
                Some(_) => check(
                    false,
                    format!(
                        "handshake ok ({version}) but the chain does not carry the expected \
                         CA (certificate {leaf}...)"
                    ),
                ),
                None => check(
                    true,
                    format!("handshake ok ({version}); certificate {leaf}... (no CA pinned)"),
                ),
            }
        }
    }
}

pub async fn diagnostics(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<Diagnostics>, ApiError> {
    p.may(Action::System, None)?;
    let mut checks = Vec::new();
    match &app.system.config.recovery_site {
        Some(t) => {
            checks.push(reach("recovery site", t, CHECK_TIMEOUT).await);
            checks.push(tls("recovery site", t, None).await);
        }
        None => checks.push(Check {
            name: "recovery site".into(),
            target: "-".into(),
            ok: false,
            detail: "no recovery site is configured".into(),
        }),
    }
    match get::<Registered>(&app, keys::REGISTRATION)? {
        Some(r) => {
            let target = r
                .provider
                .trim_start_matches("https://")
                .trim_end_matches('/');
            let ca = std::fs::read_to_string(app.state_dir.join("provider/ca-cert.pem"))
                .ok()
                .and_then(|pem| ca_pem_sha256(&pem));
            checks.push(reach("provider", target, CHECK_TIMEOUT).await);
            checks.push(tls("provider", target, ca.as_deref()).await);
        }
        None => checks.push(Check {
            name: "provider".into(),
            target: "-".into(),
            ok: false,
            detail: "not registered with a provider yet".into(),
        }),
    }
    Ok(Json(Diagnostics { checks }))
}

fn ca_pem_sha256(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    Some(crate::ca::fingerprint(&der))
}

/// Recent log lines: the `logs` command's output (the journal on the appliance), or else
/// the newest events.
async fn recent_lines(app: &Shared, limit: usize) -> Result<Vec<String>, ApiError> {
    let lines: Vec<String> = match hook(app, "logs", &[("FERRY_LINES", limit.to_string())]).await? {
        Some(out) => out.lines().map(str::to_string).collect(),
        None => {
            let ev: Vec<Event> = app.store.tail(trees::EVENTS, limit)?;
            ev.iter()
                .map(|e| {
                    format!(
                        "{} {:?} {}: {}",
                        crate::app::format_time(e.at_unix),
                        e.severity,
                        e.subject,
                        e.message
                    )
                })
                .collect()
        }
    };
    let skip = lines.len().saturating_sub(limit);
    Ok(lines.into_iter().skip(skip).map(|l| redact(&l).0).collect())
}

pub async fn logs(State(app): State<Shared>, Caller(p): Caller) -> Result<Json<Logs>, ApiError> {
    p.may(Action::System, None)?;
    Ok(Json(Logs {
        lines: recent_lines(&app, 200).await?,
    }))
}

/// Take secrets out of a line: URL credentials, `password=`/`token=`/`key=` values, PEM
/// private keys. Returns the line and how many it removed.
pub fn redact(line: &str) -> (String, u32) {
    let mut n = 0;
    let mut out = Vec::new();
    for word in line.split(' ') {
        let lower = word.to_ascii_lowercase();
        let w = if let Some(i) = ["password=", "passwd=", "secret=", "token=", "key="]
            .iter()
            .find_map(|k| lower.find(k).map(|i| i + k.len()))
        {
            n += 1;
            format!("{}***", &word[..i])
        } else if word.contains("://") && word.contains('@') {
            n += 1;
            ferry_api::system::redact_url(word)
        } else {
            word.to_string()
        };
        out.push(w);
    }
    let mut s = out.join(" ");
    if s.contains("PRIVATE KEY") {
        n += 1;
        s = "*** a private key was removed ***".into();
    }
    (s, n)
}

/// Redact every string inside a JSON value; how many secrets were removed.
fn scrub(v: &mut serde_json::Value) -> u32 {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            let mut n = 0;
            let out: Vec<String> = s
                .lines()
                .map(|l| {
                    let (l, k) = redact(l);
                    n += k;
                    l
                })
                .collect();
            if n > 0 {
                *s = out.join("\n");
            }
            n
        }
        Value::Array(a) => a.iter_mut().map(scrub).sum(),
        Value::Object(o) => o.values_mut().map(scrub).sum(),
        _ => 0,
    }
}

pub async fn support_bundle(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<SupportBundle>, ApiError> {
    p.may(Action::System, None)?;
    let mut redacted = 0u32;
    let mut settings: Settings = get(&app, keys::SETTINGS)?.unwrap_or_default();
    if settings.proxy.contains('@') {
        redacted += 1;
    }
    settings.proxy = settings.proxy_redacted();
    let network: Option<NetworkConfig> = get(&app, keys::NETWORK)?;
    let reg: Option<Registered> = get(&app, keys::REGISTRATION)?;
    let mut lines = Vec::new();
    let raw = recent_lines(&app, 1000).await?;
    let mut in_key = false;
    for l in raw {
        // A private key spans lines: everything from its BEGIN line to its END line goes.
        if l.contains("-----BEGIN") && l.contains("PRIVATE KEY") {
            in_key = !l.contains("-----END");
            redacted += 1;
            lines.push("*** a private key was removed ***".to_string());
            continue;
        }
        if in_key {
            in_key = !l.contains("-----END");
            continue;
        }
        let (l, n) = redact(&l);
        redacted += n;
        lines.push(l);
    }
    let audit: Vec<AuditEntry> = app.store.tail(trees::AUDIT, 1000)?;
    let mut audit = serde_json::to_value(audit).map_err(ApiError::internal)?;
    let mut events = serde_json::to_value(app.store.tail::<Event>(trees::EVENTS, 1000)?)
        .map_err(ApiError::internal)?;
    // Events and audit entries carry what people and appliances sent: scrub them too.
    redacted += scrub(&mut audit) + scrub(&mut events);
    let disks: Vec<(String, Disk)> = app.store.list_keyed(trees::DISKS, "")?;
    // The password hash, the CA and identity keys and registration keys are never read into
    // the bundle; what is read is scrubbed above.
    let bundle = serde_json::json!({
        "made_unix": now_unix(),
        "version": env!("CARGO_PKG_VERSION"),
        "settings": settings,
        "network": network,
        "registration": reg,
        "update_slot": get::<String>(&app, keys::UPDATE_SLOT)?,
        "disks": disks,
        "events": events,
        "audit": audit,
        "logs": lines,
    });
    let dir = app.state_dir.join("support");
    std::fs::create_dir_all(&dir)
        .map_err(|e| ApiError::internal(format!("creating {}: {e}", dir.display())))?;
    let path = dir.join(format!("ferry-support-{}.json", now_unix()));
    let text = serde_json::to_vec_pretty(&bundle).map_err(ApiError::internal)?;
    std::fs::write(&path, &text)
        .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))?;
    Ok(Json(SupportBundle {
        path: path.display().to_string(),
        bytes: text.len() as u64,
        redacted,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn redaction() {
        let (s, n) = super::redact("proxy http://bob:hunter2@p:3128 password=hunter2 ok");
        assert_eq!(s, "proxy http://***@p:3128 password=*** ok");
        assert_eq!(n, 2);
        assert_eq!(super::redact("-----BEGIN PRIVATE KEY-----").1, 1);
        let mut v =
            serde_json::json!([{"detail": "set proxy http://a:pw@h:1"}, 3, {"x": ["key=abc"]}]);
        assert_eq!(super::scrub(&mut v), 2);
        assert!(!v.to_string().contains("pw@") && !v.to_string().contains("abc"));
    }
}
