//! The shared state of a running server, and the gate every request passes: it answers a
//! client over its limit of refusals `429` before anything else (`crate::refusals`), finds the
//! principal of the client certificate, refuses requests without one, counts refusals, and
//! writes the audit entry for every mutating call and every refusal (and one summary per
//! window for a limited client).

use crate::ca::Authority;
use crate::error::{ApiError, AuditDetail};
use crate::refusals::{Client, Summary, Verdict};
use crate::store::{trees, Store};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ferry_api::{AuditEntry, AuditResult, Principal};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

pub struct App {
    pub store: Store,
    pub ca: Authority,
    /// One writer at a time: a change checks references and then writes, and the check must
    /// still hold when the write lands. A control plane's write rate makes this cheap.
    pub write: tokio::sync::Mutex<()>,
    /// The appliance itself: hooks, login lockout, the network lock.
    pub system: crate::system::SystemState,
    /// The state directory (the provider identity and support bundles go below it).
    pub state_dir: std::path::PathBuf,
    /// The recovery site jobs drive, and the servers test failovers run.
    pub jobs: crate::jobs::Runtime,
    /// Refusals counted per client, and the `429`s past the limit (`crate::refusals`).
    pub refusals: crate::refusals::Refusals,
}

pub type Shared = Arc<App>;

/// What the TLS layer learned about a connection; put on every request of that connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// SHA-256 of the verified client certificate, if the client presented one.
    pub cert_sha256: Option<String>,
}

/// The authenticated principal of a request. Handlers that take it run only for callers with
/// a registered certificate.
#[derive(Clone, Debug)]
pub struct Caller(pub Principal);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::internal("handler without an authenticated caller"))
    }
}

/// Set by the enrollment handler: the audit entry names the identity that was enrolled.
#[derive(Clone)]
pub struct AuditWho(pub Principal);

/// The only route a client without a certificate may call.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Where a process server or master target asks for its configuration (`crate::roles`).
pub const SELF_CONFIG_PATH: &str = "/v1/self/config";

pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn gate(State(app): State<Shared>, mut req: Request, next: Next) -> Response {
    let conn = req.extensions().get::<ConnInfo>().cloned();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let fp = conn.as_ref().and_then(|c| c.cert_sha256.clone());
    // A client refused too often is answered before anything is looked at: the table only.
    let client = conn
        .as_ref()
        .map(|c| Client::of(c.cert_sha256.as_deref(), c.peer.ip()));
    if let Some(client) = &client {
        let (verdict, ended) = app.refusals.check(client, Instant::now());
        if let Err(e) = audit_summaries(&app, ended.into_iter().collect()).await {
            return e.into_response();
        }
        if let Verdict::Limited { retry_after_secs } = verdict {
            return too_many_refusals(client, retry_after_secs, app.refusals.limits());
        }
    }
    let cert = match fp
        .as_deref()
        .map(|fp| crate::identities::lookup(&app.store, fp))
    {
        Some(Ok(c)) => c,
        Some(Err(e)) => return ApiError::internal(e).into_response(),
        None => None,
    };
    // A revoked certificate's requests are audited under the identity it stood for.
    let principal = cert.as_ref().map(|c| c.principal.clone());
    let resp = match (&cert, fp.is_some()) {
        (Some(c), _) if !c.valid() => crate::identities::refusal(c).into_response(),
        (Some(c), _) => match crate::identities::first_use(&app, c).await {
            Ok(()) => {
                req.extensions_mut().insert(Caller(c.principal.clone()));
                next.run(req).await
            }
            Err(e) => e.into_response(),
        },
        (None, _) if path == ENROLL_PATH => next.run(req).await,
        (None, false) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "no-certificate",
            "a client certificate issued by this appliance's CA is required \
             (enroll with a token first: POST /v1/enroll)",
        )
        .into_response(),
        (None, true) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unknown-certificate",
            format!(
                "client certificate {} is not registered here (not issued by enrollment)",
                fp.as_deref().unwrap_or_default()
            ),
        )
        .into_response(),
    };
    let status = resp.status();
    if let (Some(client), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) = (&client, status) {
        let from = conn
            .as_ref()
            .map(|c| c.peer.to_string())
            .unwrap_or_default();
        let evicted = app
            .refusals
            .refused(client, &from, Instant::now(), now_unix());
        if let Err(e) = audit_summaries(&app, evicted).await {
            return e.into_response();
        }
    }
    let reads = method == Method::GET || method == Method::HEAD;
    // What a role sends by itself every poll interval (its configuration request, its disks'
    // state and RPO) is an observation, not a change someone made: audited only when refused,
    // or every role would push the operators' changes out of the audit log within days.
    let role_poll = principal.as_ref().is_some_and(|p| p.appliance.is_some())
        && (path == SELF_CONFIG_PATH || path.ends_with("/report"));
    if (!reads && !role_poll) || !status.is_success() {
        let who = resp
            .extensions()
            .get::<AuditWho>()
            .map(|w| w.0.clone())
            .or(principal);
        let detail = resp
            .extensions()
            .get::<AuditDetail>()
            .map(|d| d.0.clone())
            .unwrap_or_default();
        let (name, role, tenant) = audited_as(who.as_ref());
        let entry = |seq| AuditEntry {
            seq,
            at_unix: now_unix(),
            who: name,
            role,
            tenant,
            from: conn
                .as_ref()
                .map_or_else(|| "unknown".to_string(), |c| c.peer.to_string()),
            what: format!("{method} {path}"),
            target_tenant: target_tenant(&path),
            status: status.as_u16(),
            result: if status.is_success() {
                AuditResult::Ok
            } else if status.is_client_error() {
                AuditResult::Refused
            } else {
                AuditResult::Failed
            },
            detail,
        };
        // The answer waits for the audit entry to be durable, as it waits for the change.
        if let Err(e) = audit(&app, entry).await {
            tracing::error!(error = %e.message, %method, %path, "cannot write the audit entry");
            return e.into_response();
        }
        tracing::info!(%method, %path, status = status.as_u16(), "audited");
    }
    resp
}

/// Who an audit entry names: the principal's name, role and tenant, or `anonymous`.
fn audited_as(who: Option<&Principal>) -> (String, Option<ferry_api::Role>, Option<String>) {
    match who {
        Some(p) => (p.name.clone(), Some(p.role), p.tenant.clone()),
        None => ("anonymous".to_string(), None, None),
    }
}

/// Append an audit entry and flush it.
async fn audit(app: &App, entry: impl FnOnce(u64) -> AuditEntry) -> Result<(), ApiError> {
    let written = app.store.append(trees::AUDIT, entry);
    match written {
        Ok(_) => app.store.flush().await,
        Err(e) => Err(e),
    }
    .map_err(|e| ApiError::internal(format!("the audit log cannot be written: {e}")))
}

/// The answer to a client over its limit of refusals: nothing was looked at, nothing audited
/// (its window's summary is).
fn too_many_refusals(
    client: &Client,
    retry_after_secs: u64,
    limits: crate::refusals::Limits,
) -> Response {
    let mut r = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too-many-refusals",
        format!(
            "too many refused requests from {client} ({} within {} s): not looked at until that \
             window ends; try again in {retry_after_secs} s",
            limits.per_window,
            limits.window.as_secs()
        ),
    )
    .into_response();
    r.headers_mut().insert(
        axum::http::header::RETRY_AFTER,
        axum::http::HeaderValue::from(retry_after_secs),
    );
    r
}

/// One audit entry per client and window that got `429`s (`crate::refusals`). A client known
/// by its certificate is audited under the identity it was issued to.
pub async fn audit_summaries(app: &App, summaries: Vec<Summary>) -> Result<(), ApiError> {
    for s in summaries {
        let who = match &s.client {
            Client::Certificate(fp) => crate::identities::lookup(&app.store, fp)
                .ok()
                .flatten()
                .map(|c| c.principal),
            Client::Address(_) => None,
        };
        let message = s.message();
        tracing::warn!(client = %s.client, limited = s.limited, "{message}");
        let (name, role, tenant) = audited_as(who.as_ref());
        audit(app, |seq| AuditEntry {
            seq,
            at_unix: now_unix(),
            who: name,
            role,
            tenant,
            from: s.from.clone(),
            what: "too many refusals".into(),
            target_tenant: None,
            status: StatusCode::TOO_MANY_REQUESTS.as_u16(),
            result: AuditResult::Refused,
            detail: message,
        })
        .await?;
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), for logs and screens.
pub fn format_time(unix: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(i64::try_from(unix).unwrap_or(0)) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => unix.to_string(),
    }
}

/// The tenant a path touches: `/v1/tenants/{tenant}/...`.
pub fn target_tenant(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/tenants/")?;
    let t = rest.split('/').next()?;
    (!t.is_empty()).then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn target_tenant() {
        assert_eq!(
            super::target_tenant("/v1/tenants/acme/machines"),
            Some("acme".into())
        );
        assert_eq!(
            super::target_tenant("/v1/tenants/acme"),
            Some("acme".into())
        );
        assert_eq!(super::target_tenant("/v1/tenants"), None);
        assert_eq!(super::target_tenant("/v1/audit"), None);
    }

    #[test]
    fn too_many_refusals_says_when_to_come_back() {
        let client = crate::refusals::Client::of(None, [127, 0, 0, 1].into());
        let r = super::too_many_refusals(&client, 42, crate::refusals::Limits::default());
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "42");
    }
}
