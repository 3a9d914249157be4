//! The appliance itself, for the local console: the administrator's password (with lockout),
//! host name, time servers and proxy, registration with the provider, maintenance actions and
//! the update slot. The network lives in [`crate::network`], the views in [`crate::diagnose`].
//!
//! The server does not reboot or reconfigure the host by itself: each action runs a command the
//! appliance image configures (`--hook NAME=COMMAND`), with its arguments in `FERRY_*`
//! environment variables. That keeps the host's tools out of this crate, and lets tests watch
//! what would have happened without rebooting anything.

use crate::app::{now_unix, Caller, Shared};
use crate::error::{ApiError, Body};
use crate::store::trees;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_api::{
    Action, ActionDone, EnrollRequest, Enrolled, Event, LoggedIn, Login, Maintenance,
    MaintenanceAction, NetworkConfig, Registered, Registration, SetPassword, Settings, SetupStatus,
    Severity, UpdateSlot,
};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What the appliance image tells the server about the host.
#[derive(Clone, Debug)]
pub struct SystemConfig {
    /// Seconds the administrator has to confirm a network change before it is rolled back.
    pub network_confirm_secs: u64,
    /// Wrong passwords in a row before the console locks.
    pub login_attempts: u32,
    /// How long a lockout lasts.
    pub lockout_secs: u64,
    /// Commands by action: `restart-services`, `reboot`, `shutdown`, `factory-reset`,
    /// `update-slot`, `hostname`, `ntp`, `proxy`, `dns`, `dhcp`, `logs`.
    pub hooks: BTreeMap<String, String>,
    /// The cache device's mount point, for the dashboard.
    pub cache_dir: Option<PathBuf>,
    /// The recovery site's replication endpoint (HOST:PORT), for reachability and TLS checks.
    pub recovery_site: Option<String>,
    /// Who the recovery plans' hooks and start commands run as.
    pub hooks_as: ferry_failover::hooks::Confine,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            network_confirm_secs: 60,
            login_attempts: 3,
            lockout_secs: 300,
            hooks: BTreeMap::new(),
            cache_dir: None,
            recovery_site: None,
            hooks_as: Default::default(),
        }
    }
}

/// The server's view of the appliance, beside the store.
pub struct SystemState {
    pub config: SystemConfig,
    login: std::sync::Mutex<LoginState>,
    /// One network change at a time (applying, confirming, rolling back).
    pub network: tokio::sync::Mutex<()>,
}

impl SystemState {
    pub fn new(config: SystemConfig) -> Self {
        SystemState {
            config,
            login: Default::default(),
            network: Default::default(),
        }
    }
}

#[derive(Default)]
struct LoginState {
    /// Wrong passwords in a row, toward the lockout.
    failures: u32,
    /// Wrong passwords since the last right one, lockouts included (shown at the next login).
    since_success: u32,
    locked_until: Option<Instant>,
}

/// Keys of the `system` tree.
pub mod keys {
    pub const PASSWORD: &str = "password";
    pub const SETTINGS: &str = "settings";
    pub const NETWORK: &str = "network";
    pub const NETWORK_PENDING: &str = "network-pending";
    pub const LAST_ROLLBACK: &str = "network-last-rollback";
    pub const REGISTRATION: &str = "registration";
    pub const WIZARD_DONE: &str = "wizard-done";
    pub const UPDATE_SLOT: &str = "update-slot";
}

/// PBKDF2-HMAC-SHA256: slow enough to make a stolen database expensive to guess against,
/// fast enough (tens of milliseconds) for a console login.
const PBKDF2_ROUNDS: u32 = 100_000;

#[derive(Serialize, Deserialize)]
struct PasswordRecord {
    salt: String,
    rounds: u32,
    hash: String,
}

fn derive(password: &str, salt: &[u8], rounds: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    let rounds = NonZeroU32::new(rounds).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

fn verify(rec: &PasswordRecord, password: &str) -> bool {
    let (Ok(salt), Ok(hash), Some(rounds)) = (
        hex::decode(&rec.salt),
        hex::decode(&rec.hash),
        NonZeroU32::new(rec.rounds),
    ) else {
        return false;
    };
    ring::pbkdf2::verify(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        &salt,
        password.as_bytes(),
        &hash,
    )
    .is_ok()
}

pub fn get<T: serde::de::DeserializeOwned>(app: &Shared, key: &str) -> Result<Option<T>, ApiError> {
    Ok(app.store.get(trees::SYSTEM, key)?)
}

pub fn put<T: Serialize>(app: &Shared, key: &str, v: &T) -> Result<(), ApiError> {
    Ok(app.store.put(trees::SYSTEM, key, v)?)
}

pub fn event(app: &Shared, severity: Severity, subject: &str, message: String) {
    let r = app.store.append(trees::EVENTS, |seq| Event {
        seq,
        at_unix: now_unix(),
        severity,
        tenant: None,
        subject: subject.into(),
        message,
        active: false,
    });
    if let Err(e) = r {
        tracing::error!(error = %e, "cannot record an event");
    }
}

pub async fn setup(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<SetupStatus>, ApiError> {
    p.may(Action::System, None)?;
    let reg: Option<Registered> = get(&app, keys::REGISTRATION)?;
    let mut settings: Settings = get(&app, keys::SETTINGS)?.unwrap_or_default();
    settings.proxy = settings.proxy_redacted();
    Ok(Json(SetupStatus {
        password_set: app.store.contains(trees::SYSTEM, keys::PASSWORD)?,
        wizard_done: get::<bool>(&app, keys::WIZARD_DONE)?.unwrap_or(false),
        settings,
        network: get::<NetworkConfig>(&app, keys::NETWORK)?,
        registered_with: reg.map(|r| r.provider),
        update_slot: get(&app, keys::UPDATE_SLOT)?,
    }))
}

pub async fn wizard_done(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<StatusCode, ApiError> {
    p.may(Action::System, None)?;
    put(&app, keys::WIZARD_DONE, &true)?;
    app.store.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Counts a wrong password, and says whether this attempt may be checked at all.
fn attempt(app: &Shared) -> Result<(), ApiError> {
    let mut l = app.system.login.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(until) = l.locked_until {
        let now = Instant::now();
        if now < until {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "locked-out",
                format!(
                    "too many wrong passwords: locked for another {} s",
                    (until - now).as_secs() + 1
                ),
            ));
        }
        l.locked_until = None;
    }
    Ok(())
}

fn wrong(app: &Shared) -> ApiError {
    let cfg = &app.system.config;
    let mut l = app.system.login.lock().unwrap_or_else(|e| e.into_inner());
    l.failures += 1;
    l.since_success += 1;
    if l.failures >= cfg.login_attempts {
        l.failures = 0;
        l.locked_until = Some(Instant::now() + Duration::from_secs(cfg.lockout_secs));
        drop(l);
        event(
            app,
            Severity::Warning,
            "system/console",
            format!(
                "{} wrong passwords in a row: the console is locked for {} s",
                cfg.login_attempts, cfg.lockout_secs
            ),
        );
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "locked-out",
            format!(
                "wrong password; {} wrong passwords in a row: locked for {} s",
                cfg.login_attempts, cfg.lockout_secs
            ),
        );
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "bad-password",
        format!(
            "wrong password ({} of {} attempts before the console locks)",
            l.failures, cfg.login_attempts
        ),
    )
}

/// Check a password against the stored one, counting failures. Without a stored password
/// there is nothing to check against: the caller must set one first.
async fn check_password(app: &Shared, password: &str) -> Result<u32, ApiError> {
    attempt(app)?;
    let rec: PasswordRecord = get(app, keys::PASSWORD)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "no-password",
            "no administrator password is set yet: run the first-boot wizard",
        )
    })?;
    let pw = password.to_string();
    let ok = tokio::task::spawn_blocking(move || verify(&rec, &pw))
        .await
        .map_err(ApiError::internal)?;
    if !ok {
        return Err(wrong(app));
    }
    let mut l = app.system.login.lock().unwrap_or_else(|e| e.into_inner());
    l.failures = 0;
    Ok(std::mem::take(&mut l.since_success))
}

pub async fn login(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(req): Body<Login>,
) -> Result<Json<LoggedIn>, ApiError> {
    p.may(Action::System, None)?;
    let failed_before = check_password(&app, &req.password).await?;
    Ok(Json(LoggedIn { failed_before }))
}

pub async fn set_password(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(req): Body<SetPassword>,
) -> Result<StatusCode, ApiError> {
    p.may(Action::System, None)?;
    let _w = app.write.lock().await;
    if app.store.contains(trees::SYSTEM, keys::PASSWORD)? {
        let current = req.current.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "current: a password is set; give the current one to change it",
            )
        })?;
        check_password(&app, current).await?;
    }
    req.validate()?;
    let mut salt = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| ApiError::internal("no randomness from the system"))?;
    let pw = req.password.clone();
    let hash = tokio::task::spawn_blocking(move || derive(&pw, &salt, PBKDF2_ROUNDS))
        .await
        .map_err(ApiError::internal)?;
    let rec = PasswordRecord {
        salt: hex::encode(salt),
        rounds: PBKDF2_ROUNDS,
        hash: hex::encode(hash),
    };
    put(&app, keys::PASSWORD, &rec)?;
    event(
        &app,
        Severity::Info,
        "system/console",
        "the administrator password was set".into(),
    );
    app.store.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Run the command configured for `name`, with `env`. `Ok(None)`: none is configured.
pub async fn hook(
    app: &Shared,
    name: &str,
    env: &[(&str, String)],
) -> Result<Option<String>, ApiError> {
    let Some(cmd) = app.system.config.hooks.get(name) else {
        return Ok(None);
    };
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd).kill_on_drop(true);
    c.stdin(std::process::Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), c.output())
        .await
        .map_err(|_| ApiError::internal(format!("the {name} command did not finish in 60 s")))?
        .map_err(|e| ApiError::internal(format!("cannot run the {name} command: {e}")))?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    if text.len() > 64 * 1024 {
        let cut = text.len() - 64 * 1024;
        let cut = (cut..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(cut);
        text.drain(..cut);
    }
    if !out.status.success() {
        return Err(ApiError::internal(format!(
            "the {name} command failed ({}): {}",
            out.status,
            text.trim()
        )));
    }
    Ok(Some(text))
}

pub async fn put_settings(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(s): Body<Settings>,
) -> Result<Json<Settings>, ApiError> {
    p.may(Action::System, None)?;
    s.validate()?;
    let _w = app.write.lock().await;
    let old: Settings = get(&app, keys::SETTINGS)?.unwrap_or_default();
    if s.hostname != old.hostname && !s.hostname.is_empty() {
        hook(&app, "hostname", &[("FERRY_HOSTNAME", s.hostname.clone())]).await?;
    }
    if s.ntp != old.ntp {
        hook(&app, "ntp", &[("FERRY_NTP", s.ntp.join(" "))]).await?;
    }
    if s.proxy != old.proxy {
        hook(&app, "proxy", &[("FERRY_PROXY", s.proxy.clone())]).await?;
    }
    put(&app, keys::SETTINGS, &s)?;
    app.store.flush().await?;
    let mut shown = s.clone();
    shown.proxy = s.proxy_redacted();
    Ok(Json(shown))
}

pub async fn register(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(r): Body<Registration>,
) -> Result<Json<Registered>, ApiError> {
    p.may(Action::System, None)?;
    r.validate()?;
    let client = crate::client::Client::pinned(&r.provider, &r.ca_sha256).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("provider: {e}"),
        )
    })?;
    let req = EnrollRequest {
        token: r.key.trim().to_string(),
        csr_pem: None,
    };
    let e: Enrolled = client
        .call(crate::client::Method::POST, "/v1/enroll", Some(&req))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "registration-failed",
                format!(
                    "the provider at {} refused or could not be reached: {e}",
                    r.provider
                ),
            )
        })?;
    let dir = app.state_dir.join("provider");
    crate::serve::write_identity(
        &dir,
        &e.ca_cert_pem,
        &e.certificate_pem,
        e.private_key_pem.as_deref().unwrap_or_default(),
    )
    .map_err(|e| ApiError::internal(format!("writing {}: {e}", dir.display())))?;
    let done = Registered {
        provider: r.provider.clone(),
        name: e.principal.name.clone(),
    };
    put(&app, keys::REGISTRATION, &done)?;
    event(
        &app,
        Severity::Info,
        "system/registration",
        format!("registered with {} as {}", r.provider, done.name),
    );
    app.store.flush().await?;
    Ok(Json(done))
}

pub async fn maintenance(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(m): Body<Maintenance>,
) -> Result<Json<ActionDone>, ApiError> {
    p.may(Action::System, None)?;
    let name = m.action.as_str();
    if m.action == MaintenanceAction::FactoryReset && m.confirm.as_deref() != Some("factory-reset")
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            "confirm: a factory reset erases the appliance's configuration and cache; \
             confirm with \"factory-reset\"",
        ));
    }
    event(
        &app,
        Severity::Warning,
        "system/maintenance",
        format!("{name} requested by {}", p.name),
    );
    app.store.flush().await?;
    let output = hook(&app, name, &[("FERRY_ACTION", name.to_string())])
        .await?
        .ok_or_else(|| not_configured(name))?;
    Ok(Json(ActionDone {
        action: name.into(),
        output,
    }))
}

fn not_configured(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not-configured",
        format!("no command is configured for {name} on this appliance (--hook {name}=COMMAND)"),
    )
}

pub async fn update_slot(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(u): Body<UpdateSlot>,
) -> Result<Json<ActionDone>, ApiError> {
    p.may(Action::System, None)?;
    let slot = u.slot.trim().to_ascii_lowercase();
    if slot != "a" && slot != "b" {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("slot: must be a or b, not {:?}", u.slot),
        ));
    }
    let output = hook(&app, "update-slot", &[("FERRY_SLOT", slot.clone())])
        .await?
        .ok_or_else(|| not_configured("update-slot"))?;
    put(&app, keys::UPDATE_SLOT, &slot)?;
    event(
        &app,
        Severity::Info,
        "system/update",
        format!("the next boot uses slot {slot}"),
    );
    app.store.flush().await?;
    Ok(Json(ActionDone {
        action: "update-slot".into(),
        output,
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_verify() {
        let rec = super::PasswordRecord {
            salt: hex::encode([7u8; 16]),
            rounds: 1000,
            hash: hex::encode(super::derive("correct horse", &[7u8; 16], 1000)),
        };
        assert!(super::verify(&rec, "correct horse"));
        assert!(!super::verify(&rec, "correct horsf"));
    }
}
