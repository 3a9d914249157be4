//! The appliance's network, applied through rtnetlink: an interface's MTU, an optional VLAN on
//! it, static IPv4/IPv6 addresses and default routes (or a DHCP client, run by its hook).
//!
//! A change that could cut the administrator off is never final at once. Each step is
//! recorded in an [`Undo`] before the next one; after applying, the gateway must answer
//! (its neighbour entry resolves, i.e. it answered ARP or neighbour discovery), or everything is
//! undone at once and the change is refused. A change that passed stays pending until it is
//! confirmed; when the confirmation does not come in time (the administrator lost the
//! console, say), the undo runs on its own. The undo is stored with the pending change, so a
//! server restarted meanwhile rolls it back too.

mod kernel;

use crate::app::{now_unix, Caller, Shared};
use crate::error::{ApiError, Body};
use crate::store::trees;
use crate::system::{self, event, get, keys, put};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_api::{Action, NetworkConfig, NetworkState, PendingNetwork, Severity};
use kernel::{apply, rollback, Net, Undo, GATEWAY_WAIT};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::Duration;

#[derive(Serialize, Deserialize)]
struct PendingRecord {
    pending: PendingNetwork,
    undo: Undo,
}

fn refusal(code: &'static str, msg: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, msg)
}

fn rolled_back(errors: &[String]) -> String {
    if errors.is_empty() {
        "nothing was changed".into()
    } else {
        format!("undoing it failed in part: {}", errors.join("; "))
    }
}

pub async fn state(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<NetworkState>, ApiError> {
    p.may(Action::System, None)?;
    current(&app).map(Json)
}

fn current(app: &Shared) -> Result<NetworkState, ApiError> {
    Ok(NetworkState {
        confirmed: get(app, keys::NETWORK)?,
        pending: get::<PendingRecord>(app, keys::NETWORK_PENDING)?.map(|r| r.pending),
        last_rollback: get(app, keys::LAST_ROLLBACK)?,
    })
}

pub async fn change(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(cfg): Body<NetworkConfig>,
) -> Result<Json<PendingNetwork>, ApiError> {
    p.may(Action::System, None)?;
    let plan = cfg.plan()?;
    let _n = app.system.network.lock().await;
    if let Some(r) = get::<PendingRecord>(&app, keys::NETWORK_PENDING)? {
        return Err(ApiError::conflict(format!(
            "the change to {} waits for confirmation: confirm or revert it first",
            r.pending.config.interface
        )));
    }
    if plan.dhcp && !app.system.config.hooks.contains_key("dhcp") {
        return Err(refusal(
            "invalid",
            "mode: no DHCP client is configured on this appliance (--hook dhcp=COMMAND)".into(),
        ));
    }
    let net = Net::open()?;
    let links = net.links().await.map_err(ApiError::internal)?;
    if !links.iter().any(|l| l.name == plan.interface) {
        let mut have: Vec<_> = links.iter().map(|l| l.name.as_str()).collect();
        have.sort_unstable();
        return Err(refusal(
            "invalid",
            format!(
                "interface: no interface {} here (there are: {})",
                plan.interface,
                have.join(", ")
            ),
        ));
    }
    let mut undo = Undo::default();
    let target = match apply(&app, &net, &plan, &mut undo).await {
        Ok(t) => t,
        Err(e) => {
            let errs = rollback(&net, &undo).await;
            return Err(refusal(
                "not-applied",
                format!("{e}; {}", rolled_back(&errs)),
            ));
        }
    };
    let mut checks = vec![format!("{} is up", plan.target())];
    let gateways = [
        plan.ipv4.and_then(|(_, g)| g).map(IpAddr::V4),
        plan.ipv6.and_then(|(_, g)| g).map(IpAddr::V6),
    ];
    for gw in gateways.into_iter().flatten() {
        match net.gateway_answers(target, gw).await {
            Ok(true) => checks.push(format!("gateway {gw} answers")),
            Ok(false) | Err(_) => {
                let errs = rollback(&net, &undo).await;
                return Err(refusal(
                    "unreachable-gateway",
                    format!(
                        "gateway {gw} did not answer on {} within {} s; {}",
                        plan.target(),
                        GATEWAY_WAIT.as_secs(),
                        rolled_back(&errs)
                    ),
                ));
            }
        }
    }
    let secs = app.system.config.network_confirm_secs;
    let pending = PendingNetwork {
        id: random_id()?,
        config: cfg,
        deadline_unix: now_unix() + secs,
        confirm_secs: secs,
        checks,
    };
    put(
        &app,
        keys::NETWORK_PENDING,
        &PendingRecord {
            pending: pending.clone(),
            undo,
        },
    )?;
    app.store.flush().await?;
    arm(app.clone(), pending.id, Duration::from_secs(secs));
    tracing::info!(interface = %pending.config.interface, secs, "network change applied; waiting for confirmation");
    Ok(Json(pending))
}

/// Pending changes are told apart by a random id, so that a timer armed for an earlier change
/// never rolls back a later one.
fn random_id() -> Result<u64, ApiError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::internal("no randomness from the system"))?;
    Ok(u64::from_le_bytes(b))
}

/// Roll the pending change `id` back after `after`, unless it was confirmed or reverted.
fn arm(app: Shared, id: u64, after: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(after).await;
        let _n = app.system.network.lock().await;
        let still = matches!(
            get::<PendingRecord>(&app, keys::NETWORK_PENDING),
            Ok(Some(r)) if r.pending.id == id
        );
        if still {
            let why = format!(
                "not confirmed within {} s",
                app.system.config.network_confirm_secs
            );
            if let Err(e) = undo_pending(&app, &why).await {
                tracing::error!(error = e.message, "rolling back the network change");
            }
        }
    });
}

/// Undo the pending change and say why in the state and the events.
async fn undo_pending(app: &Shared, why: &str) -> Result<NetworkState, ApiError> {
    let rec: PendingRecord = get(app, keys::NETWORK_PENDING)?
        .ok_or_else(|| ApiError::conflict("no network change is waiting for confirmation"))?;
    let net = Net::open()?;
    let errs = rollback(&net, &rec.undo).await;
    let msg = format!(
        "the change to {} was rolled back ({why}); {}",
        rec.pending.config.interface,
        if errs.is_empty() {
            "the previous configuration is back".to_string()
        } else {
            rolled_back(&errs)
        }
    );
    app.store.remove(trees::SYSTEM, keys::NETWORK_PENDING)?;
    put(app, keys::LAST_ROLLBACK, &msg)?;
    event(app, Severity::Warning, "system/network", msg.clone());
    app.store.flush().await?;
    tracing::warn!("{msg}");
    current(app)
}

pub async fn confirm(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<NetworkState>, ApiError> {
    p.may(Action::System, None)?;
    let _n = app.system.network.lock().await;
    let rec: PendingRecord = get(&app, keys::NETWORK_PENDING)?.ok_or_else(|| {
        ApiError::conflict("no network change is waiting for confirmation (rolled back already?)")
    })?;
    let dns: Vec<String> = rec.pending.config.dns.clone();
    system::hook(&app, "dns", &[("FERRY_DNS", dns.join(" "))]).await?;
    put(&app, keys::NETWORK, &rec.pending.config)?;
    app.store.remove(trees::SYSTEM, keys::NETWORK_PENDING)?;
    app.store.remove(trees::SYSTEM, keys::LAST_ROLLBACK)?;
    event(
        &app,
        Severity::Info,
        "system/network",
        format!(
            "the change to {} was confirmed",
            rec.pending.config.interface
        ),
    );
    app.store.flush().await?;
    current(&app).map(Json)
}

pub async fn revert(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<NetworkState>, ApiError> {
    p.may(Action::System, None)?;
    let _n = app.system.network.lock().await;
    undo_pending(&app, "reverted by the administrator")
        .await
        .map(Json)
}

/// At start: a change still pending from before a restart gets the rest of its time.
pub async fn resume(app: &Shared) {
    let Ok(Some(rec)) = get::<PendingRecord>(app, keys::NETWORK_PENDING) else {
        return;
    };
    let left = rec.pending.deadline_unix.saturating_sub(now_unix());
    arm(app.clone(), rec.pending.id, Duration::from_secs(left));
}
