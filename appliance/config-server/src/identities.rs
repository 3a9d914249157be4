//! Issued certificates: their records, revocation and renewal (`docs/api.md`, "Revocation and
//! renewal").
//!
//! Every client certificate the CA issues is recorded here ([`record`]) by SHA-256 with the
//! principal it stands for; the gate (`crate::app`) admits a certificate only while its record
//! is not revoked, so a revocation holds from the next request on, and across restarts (the
//! record is flushed before the answer). A record is never deleted: a revoked certificate is
//! refused by name, with who revoked it and why, not as an unknown one.
//!
//! Revoking a certificate also revokes the certificates renewed from it, so that a stolen
//! certificate cannot outlive its revocation by having been renewed. Revoking the last valid
//! certificate of an appliance removes it from the appliances and revokes its data-link
//! certificates (issued by the tenant's data CA): the tenant's master target gets their
//! fingerprints with its configuration and refuses them at the handshake.

use crate::app::{now_unix, Caller, ConnInfo, Shared};
use crate::ca::Issued;
use crate::error::{ApiError, Body};
use crate::store::{trees, Store, StoreError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use ferry_api::{
    Action, Appliance, Enrolled, Event, IssuedCertificate, Principal, RenewRequest, Revocation,
    RevokeRequest, Role, Severity,
};

/// An informational event about an identity (subject `identities/NAME`): enrolled, renewed,
/// revoked.
pub fn event(
    store: &Store,
    p: &Principal,
    at_unix: u64,
    message: String,
) -> Result<(), StoreError> {
    store.append(trees::EVENTS, |seq| Event {
        seq,
        at_unix,
        severity: Severity::Info,
        tenant: p.tenant.clone(),
        subject: format!("identities/{}", p.name),
        message,
        active: false,
    })?;
    Ok(())
}

/// Record a certificate the CA just issued for `principal` (`renewed_from`: the certificate
/// its holder renewed, which it replaces on first use). The caller flushes.
pub fn record(
    store: &Store,
    issued: &Issued,
    principal: &Principal,
    renewed_from: Option<&str>,
) -> Result<(), StoreError> {
    let rec = IssuedCertificate {
        sha256: issued.sha256.clone(),
        principal: principal.clone(),
        issued_unix: Some(issued.issued_unix),
        expires_unix: Some(issued.expires_unix),
        renewed_from: renewed_from.map(str::to_string),
        replaces: renewed_from.map(str::to_string),
        revoked: None,
    };
    store.put(trees::CERTS, &issued.sha256, &rec)
}

/// The record of certificate `sha256`, if the CA issued it.
pub fn lookup(store: &Store, sha256: &str) -> Result<Option<IssuedCertificate>, StoreError> {
    Ok(store
        .get::<IssuedCertificate>(trees::CERTS, sha256)?
        .map(|mut c| {
            // Records of earlier versions held the principal alone.
            c.sha256 = sha256.to_string();
            c
        }))
}

fn all(store: &Store) -> Result<Vec<IssuedCertificate>, StoreError> {
    Ok(store
        .list_keyed::<IssuedCertificate>(trees::CERTS, "")?
        .into_iter()
        .map(|(k, mut c)| {
            c.sha256 = k;
            c
        })
        .collect())
}

/// The refusal a revoked certificate gets, in words its holder can act on.
pub fn refusal(c: &IssuedCertificate) -> ApiError {
    let r = c.revoked.as_ref();
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "revoked-certificate",
        format!(
            "client certificate {} of {} was revoked at {} by {}{}; ask an administrator for a new \
             enrollment token",
            c.sha256,
            c.principal.name,
            r.map_or_else(String::new, |r| format!(
                "{} UTC",
                crate::app::format_time(r.at_unix)
            )),
            r.map_or("", |r| r.by.as_str()),
            r.map_or_else(String::new, |r| if r.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.reason)
            }),
        ),
    )
}

/// Revoke `roots` and every certificate renewed from a revoked one (except `keep`, the one a
/// request is using), recording who and why; appliances left without a valid certificate
/// leave ([`appliance_left`]). Returns what was revoked now. The caller holds the write lock
/// and flushes.
fn revoke(
    store: &Store,
    roots: &[String],
    keep: Option<&str>,
    by: &str,
    reason: &str,
) -> Result<Vec<IssuedCertificate>, ApiError> {
    let mut certs = all(store)?;
    let mut gone: std::collections::BTreeSet<String> = roots.iter().cloned().collect();
    // Renewals of renewals: repeat until nothing more descends from a revoked certificate.
    loop {
        let more: Vec<String> = certs
            .iter()
            .filter(|c| c.valid() && !gone.contains(&c.sha256) && Some(c.sha256.as_str()) != keep)
            .filter(|c| c.renewed_from.as_ref().is_some_and(|f| gone.contains(f)))
            .map(|c| c.sha256.clone())
            .collect();
        if more.is_empty() {
            break;
        }
        gone.extend(more);
    }
    let now = now_unix();
    let mut done = Vec::new();
    for c in certs
        .iter_mut()
        .filter(|c| c.valid() && gone.contains(&c.sha256))
    {
        c.revoked = Some(Revocation {
            at_unix: now,
            by: by.to_string(),
            reason: reason.to_string(),
        });
        c.replaces = None;
        store.put(trees::CERTS, &c.sha256, &*c)?;
        let p = &c.principal;
        event(
            store,
            p,
            now,
            format!(
                "certificate {} of {} revoked by {by}{}",
                c.sha256,
                p.name,
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            ),
        )?;
        done.push(c.clone());
    }
    for c in &done {
        let p = &c.principal;
        if p.appliance.is_some() && !certs.iter().any(|o| o.valid() && o.principal == *p) {
            appliance_left(store, p)?;
        }
    }
    Ok(done)
}

/// An appliance that holds no valid certificate any more has left: it is no longer enrolled
/// (`GET /v1/appliances`, a tenant's master target or process servers, alerts), and its
/// data-link certificates go to the tenant's revoked list (which its master target refuses) and
/// are forgotten, so that an appliance enrolled again under the name gets new ones.
fn appliance_left(store: &Store, p: &Principal) -> Result<(), StoreError> {
    if let Some(a) = store.get::<Appliance>(trees::APPLIANCES, &p.name)? {
        if a.tenant == p.tenant {
            store.remove(trees::APPLIANCES, &p.name)?;
            crate::alerts::forget_appliance(store, p.tenant.as_deref(), &p.name)?;
        }
    }
    let Some(tenant) = &p.tenant else {
        return Ok(());
    };
    for (k, pem) in crate::roles::data_certs_of(store, &p.name)? {
        if let Some(fp) = crate::ca::pem_fingerprint(&pem) {
            store.put(trees::REVOKED_DATA_CERTS, &format!("{tenant}/{fp}"), &k)?;
        }
        store.remove(trees::DATA_CERTS, &k)?;
    }
    Ok(())
}

/// SHA-256 of every revoked data-link certificate of `tenant`.
pub fn revoked_data_certs(store: &Store, tenant: &str) -> Result<Vec<String>, StoreError> {
    let prefix = format!("{tenant}/");
    Ok(store
        .list_keyed::<String>(trees::REVOKED_DATA_CERTS, &prefix)?
        .into_iter()
        .map(|(k, _)| k[prefix.len()..].to_string())
        .collect())
}

/// The gate's check of a certificate that renewed another: on its first use, the one it
/// replaces is revoked (and the other renewals of that one). Its holder has the new
/// certificate in hand now.
pub async fn first_use(app: &Shared, c: &IssuedCertificate) -> Result<(), ApiError> {
    let Some(old) = &c.replaces else {
        return Ok(());
    };
    let _w = app.write.lock().await;
    let Some(mut now) = lookup(&app.store, &c.sha256)? else {
        return Ok(());
    };
    if now.replaces.take().is_none() {
        return Ok(()); // another request of the same holder came first
    }
    revoke(
        &app.store,
        std::slice::from_ref(old),
        Some(&c.sha256),
        "renewal",
        &format!("replaced by the renewed certificate {}", c.sha256),
    )?;
    app.store.put(trees::CERTS, &c.sha256, &now)?;
    app.store.flush().await?;
    Ok(())
}

pub async fn list(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<Vec<IssuedCertificate>>, ApiError> {
    p.may(Action::ListIdentities, p.tenant.as_deref())?;
    let mut v = all(&app.store)?;
    // As appliances are listed: a tenant's principal sees its tenant's only.
    v.retain(|c| p.tenant.is_none() || c.principal.tenant == p.tenant);
    v.sort_by(|a, b| {
        (&a.principal.tenant, &a.principal.name, a.issued_unix).cmp(&(
            &b.principal.tenant,
            &b.principal.name,
            b.issued_unix,
        ))
    });
    Ok(Json(v))
}

pub async fn revoke_route(
    State(app): State<Shared>,
    Caller(p): Caller,
    Extension(conn): Extension<ConnInfo>,
    Body(req): Body<RevokeRequest>,
) -> Result<Json<Vec<IssuedCertificate>>, ApiError> {
    let _w = app.write.lock().await;
    req.validate()?;
    let certs = all(&app.store)?;
    let chosen: Vec<&IssuedCertificate> = match (&req.sha256, &req.name) {
        (Some(h), _) => {
            let h = h.to_ascii_lowercase();
            let found: Vec<&IssuedCertificate> =
                certs.iter().filter(|c| c.sha256.starts_with(&h)).collect();
            if found.len() > 1 {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    format!(
                        "sha256: {h} is the start of {} certificates' SHA-256; give more digits",
                        found.len()
                    ),
                ));
            }
            found
        }
        (None, Some(name)) => {
            let tenant = req.tenant.clone().or_else(|| p.tenant.clone());
            // The tenant is named: refused before anything is looked up, as on every route.
            p.may(Action::Revoke(Role::Viewer), tenant.as_deref())?;
            certs
                .iter()
                .filter(|c| c.principal.name == *name && c.principal.tenant == tenant)
                .collect()
        }
        (None, None) => unreachable!("validated"),
    };
    let Some(first) = chosen.first() else {
        return Err(ApiError::not_found(match (&req.sha256, &req.name) {
            (Some(h), _) => format!("no certificate whose SHA-256 starts with {h}"),
            (_, name) => format!(
                "no certificate of {}{}",
                name.as_deref().unwrap_or_default(),
                req.tenant
                    .as_ref()
                    .or(p.tenant.as_ref())
                    .map_or_else(String::new, |t| format!(" in tenant {t}"))
            ),
        }));
    };
    for c in &chosen {
        p.may(
            Action::Revoke(c.principal.role),
            c.principal.tenant.as_deref(),
        )?;
    }
    let valid: Vec<String> = chosen
        .iter()
        .filter(|c| c.valid())
        .map(|c| c.sha256.clone())
        .collect();
    if valid.is_empty() {
        return Err(ApiError::conflict(match &first.revoked {
            Some(r) if chosen.len() == 1 => format!(
                "certificate {} of {} was already revoked at {} UTC by {}",
                first.sha256,
                first.principal.name,
                crate::app::format_time(r.at_unix),
                r.by
            ),
            _ => format!("{} holds no valid certificate", first.principal.name),
        }));
    }
    if conn
        .cert_sha256
        .as_ref()
        .is_some_and(|me| valid.contains(me))
    {
        return Err(ApiError::conflict(
            "that is the certificate this request came with: revoke it with another \
             administrator's identity (or renew it: ferry ctl renew)",
        ));
    }
    let done = revoke(&app.store, &valid, None, &p.name, &req.reason)?;
    app.store.flush().await?;
    tracing::info!(by = %p.name, count = done.len(), "revoked certificates");
    Ok(Json(done))
}

pub async fn renew(
    State(app): State<Shared>,
    Caller(p): Caller,
    Extension(conn): Extension<ConnInfo>,
    Body(req): Body<RenewRequest>,
) -> Result<(StatusCode, Json<Enrolled>), ApiError> {
    let _w = app.write.lock().await;
    let Some(old) = conn.cert_sha256.as_deref() else {
        return Err(ApiError::internal("a caller without a certificate"));
    };
    let issued = app.ca.issue(&p, req.csr_pem.as_deref())?;
    record(&app.store, &issued, &p, Some(old))?;
    if p.appliance.is_some() {
        if let Some(mut a) = app.store.get::<Appliance>(trees::APPLIANCES, &p.name)? {
            a.cert_sha256 = issued.sha256.clone();
            app.store.put(trees::APPLIANCES, &p.name, &a)?;
        }
    }
    event(
        &app.store,
        &p,
        now_unix(),
        format!(
            "{} renewed certificate {old} as {} (valid until {} UTC)",
            p.name,
            issued.sha256,
            crate::app::format_time(issued.expires_unix)
        ),
    )?;
    app.store.flush().await?;
    tracing::info!(name = %p.name, old, new = %issued.sha256, "renewed a certificate");
    Ok((
        StatusCode::CREATED,
        Json(Enrolled {
            principal: p,
            certificate_pem: issued.certificate_pem,
            private_key_pem: issued.private_key_pem,
            ca_cert_pem: app.ca.ca_pem().to_string(),
        }),
    ))
}
