//! Enrollment: an administrator creates a one-time token that expires; the enrolling party (an
//! appliance, a CLI user, the provider) trades it once for a client certificate that names its
//! principal. The token's secret is kept only as a SHA-256, so a copy of the state database
//! does not hold usable tokens.

use crate::app::{now_unix, AuditWho, Caller, ConnInfo, Shared};
use crate::error::{ApiError, Body};
use crate::store::trees;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ferry_api::{Action, Appliance, CreateToken, EnrollRequest, Enrolled, Principal, TokenCreated};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    secret_sha256: String,
    request: CreateToken,
    created_by: String,
    expires_unix: u64,
    used: Option<Used>,
}

#[derive(Serialize, Deserialize)]
struct Used {
    at_unix: u64,
    from: String,
    cert_sha256: String,
}

fn random_hex(n: usize) -> Result<String, ApiError> {
    let mut b = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::internal("no randomness from the system"))?;
    Ok(hex::encode(b))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()))
}

pub async fn create_token(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(req): Body<CreateToken>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let _w = app.write.lock().await;
    p.may(Action::Enroll(req.role), req.tenant.as_deref())?;
    req.validate()?;
    if let Some(t) = &req.tenant {
        if !app.store.contains(trees::TENANTS, t)? {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("tenant: no tenant {t}"),
            ));
        }
    }
    let id = random_hex(8)?;
    let secret = random_hex(32)?;
    let expires_unix = now_unix() + req.ttl_secs;
    let rec = TokenRecord {
        id: id.clone(),
        secret_sha256: sha256_hex(&secret),
        request: req,
        created_by: p.name.clone(),
        expires_unix,
        used: None,
    };
    app.store.put(trees::TOKENS, &id, &rec)?;
    app.store.flush().await?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            token: format!("{id}.{secret}"),
            id,
            expires_unix,
            ca_cert_pem: app.ca.ca_pem().to_string(),
            ca_sha256: app.ca.ca_sha256().to_string(),
        }),
    ))
}

fn refused(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, code, message)
}

pub async fn enroll(
    State(app): State<Shared>,
    Extension(conn): Extension<ConnInfo>,
    Body(req): Body<EnrollRequest>,
) -> Result<Response, ApiError> {
    let _w = app.write.lock().await;
    let unknown = || {
        refused(
            "bad-token",
            "this enrollment token is not known here".into(),
        )
    };
    let (id, secret) = req.token.trim().split_once('.').ok_or_else(unknown)?;
    // Ids are hex: anything else cannot name a token, and must not reach the key space.
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unknown());
    }
    let mut rec: TokenRecord = app.store.get(trees::TOKENS, id)?.ok_or_else(unknown)?;
    // Comparing hashes, not secrets: how long the comparison takes tells an attacker about a
    // SHA-256 of their guess, which does not lead to the secret.
    if sha256_hex(secret) != rec.secret_sha256 {
        return Err(unknown());
    }
    if let Some(u) = &rec.used {
        return Err(refused(
            "token-used",
            format!(
                "enrollment token {id} was already used (at {} from {}); tokens work once: ask \
                 an administrator for a new one",
                u.at_unix, u.from
            ),
        ));
    }
    let now = now_unix();
    if now >= rec.expires_unix {
        return Err(refused(
            "token-expired",
            format!(
                "enrollment token {id} expired {} s ago; ask an administrator for a new one",
                now - rec.expires_unix
            ),
        ));
    }
    let principal = Principal {
        name: rec.request.name.clone(),
        role: rec.request.role,
        tenant: rec.request.tenant.clone(),
        appliance: rec.request.appliance,
    };
    let issued = app.ca.issue(&principal, req.csr_pem.as_deref())?;
    crate::identities::record(&app.store, &issued, &principal, None)?;
    rec.used = Some(Used {
        at_unix: now,
        from: conn.peer.to_string(),
        cert_sha256: issued.sha256.clone(),
    });
    app.store.put(trees::TOKENS, id, &rec)?;
    if let Some(role) = principal.appliance {
        let a = Appliance {
            name: principal.name.clone(),
            role,
            tenant: principal.tenant.clone(),
            enrolled_unix: now,
            cert_sha256: issued.sha256.clone(),
            address: None,
        };
        app.store.put(trees::APPLIANCES, &principal.name, &a)?;
    }
    crate::identities::event(
        &app.store,
        &principal,
        now,
        format!(
            "{} enrolled as {} from {}",
            principal.name,
            principal.role.as_str(),
            conn.peer
        ),
    )?;
    app.store.flush().await?;
    tracing::info!(name = %principal.name, role = principal.role.as_str(), "enrolled");
    let body = Enrolled {
        principal: principal.clone(),
        certificate_pem: issued.certificate_pem,
        private_key_pem: issued.private_key_pem,
        ca_cert_pem: app.ca.ca_pem().to_string(),
    };
    let mut r = (StatusCode::CREATED, Json(body)).into_response();
    r.extensions_mut().insert(AuditWho(principal));
    Ok(r)
}
