//! Step orders to the roles (`ferry_api::orders`): a job's site step is sent to the role that
//! holds the data (the tenant's master target; a machine's process server for the drain check
//! and for the resync of reprotect and failback, beside the original disks), which fetches it
//! (`GET /v1/roles/orders`), runs it and answers (`POST /v1/roles/orders/{order}/result`). A configuration server started beside the site
//! (`--recovery-repo ...`) runs the same steps itself instead ([`Runtime::local`]).
//!
//! State in sled: `orders` (`{id:020}` → [`Stored`]), and `order-keys` (`{tenant}/{job:020}/
//! {step:04}/{part}` → id), so that a job step resumed after a restart sends the same order
//! again: an answered order is not run again, one in flight is fetched again by the role,
//! which answers it once. A job's orders are removed when the job ends.
//!
//! The role must fetch an order, and keep polling while it runs it, within the order timeout
//! (`--order-timeout-secs`): else the step fails, naming the role that did not answer.
//!
//! While it runs a long order (a resync) the role posts its progress
//! (`POST /v1/roles/orders/{order}/progress`), kept on the order until the answer comes and
//! passed to the job step that waits ([`run_reporting`]). A role asks about an order it
//! answered (`GET /v1/roles/orders/{order}`) to learn whether it may forget its answer: `404
//! no-such-order` once the order is gone.

use super::Runtime;
use crate::app::{now_unix, Caller, Shared};
use crate::error::{ApiError, Body};
use crate::objects::Segs;
use crate::store::{trees, StoreError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_api::{
    Appliance, ApplianceRole, Machine, Order, OrderProgress, OrderResult, SiteAnswer, SiteStep,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An order as the server keeps it.
#[derive(Serialize, Deserialize)]
pub struct Stored {
    pub order: Order,
    #[serde(default)]
    pub result: Option<OrderResult>,
    /// The role's last word on how far it has come while it runs the order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<OrderProgress>,
}

/// Who runs a step: this server (beside the site), or a role by its appliance name.
#[derive(Clone, Debug)]
pub enum Target {
    Local,
    Role {
        appliance: String,
        role: ApplianceRole,
    },
}

fn role_words(r: ApplianceRole) -> &'static str {
    match r {
        ApplianceRole::MasterTarget => "master target",
        ApplianceRole::ProcessServer => "process server",
        ApplianceRole::ConfigurationServer => "configuration server",
    }
}

fn ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Runtime {
    /// When each role last fetched its orders (milliseconds), kept in memory: a poll is an
    /// observation, not a change, and a restarted server waits a whole timeout anyway.
    fn seen(&self, appliance: &str) -> Option<u64> {
        let s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        s.get(appliance).copied()
    }

    fn saw(&self, appliance: &str) {
        let mut s = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(appliance.to_string(), ms_now());
    }
}

/// The tenant's master target, which runs the recovery-site steps.
pub fn master_target(app: &Shared, tenant: &str) -> Result<Target, String> {
    if app.jobs.local.is_some() {
        return Ok(Target::Local);
    }
    let all: Vec<Appliance> = app
        .store
        .list(trees::APPLIANCES, "")
        .map_err(|e| e.to_string())?;
    let mts: Vec<&Appliance> = all
        .iter()
        .filter(|a| a.role == ApplianceRole::MasterTarget && a.tenant.as_deref() == Some(tenant))
        .collect();
    match mts.as_slice() {
        [m] => Ok(Target::Role {
            appliance: m.name.clone(),
            role: ApplianceRole::MasterTarget,
        }),
        [] => Err(format!(
            "tenant {tenant} has no master target enrolled: the recovery-site steps run on it \
             (or start this server beside the site with --recovery-repo, --recovery-key and \
             --recovery-work)"
        )),
        _ => Err(format!(
            "tenant {tenant} has {} master targets; a job drives one (not supported yet)",
            mts.len()
        )),
    }
}

/// The process server that journals machine `machine`'s writes.
pub fn process_server(app: &Shared, tenant: &str, machine: &str) -> Result<Target, String> {
    if app.jobs.local.is_some() {
        return Ok(Target::Local);
    }
    let m: Option<Machine> = app
        .store
        .get(trees::MACHINES, &format!("{tenant}/{machine}"))
        .map_err(|e| e.to_string())?;
    let all: Vec<Appliance> = app
        .store
        .list(trees::APPLIANCES, "")
        .map_err(|e| e.to_string())?;
    let pss: Vec<&Appliance> = all
        .iter()
        .filter(|a| a.role == ApplianceRole::ProcessServer && a.tenant.as_deref() == Some(tenant))
        .collect();
    let chosen = match m.and_then(|m| m.process_server) {
        Some(name) => pss.iter().find(|a| a.name == name).copied(),
        None if pss.len() == 1 => Some(pss[0]),
        None => None,
    };
    chosen
        .map(|a| Target::Role {
            appliance: a.name.clone(),
            role: ApplianceRole::ProcessServer,
        })
        .ok_or_else(|| {
            format!(
                "machine {machine} has no process server enrolled to check its journals or \
                 resync its disks (name one in the machine's process_server when the tenant \
                 has several)"
            )
        })
}

/// The key that makes an order the same one when its job step runs again.
pub fn step_key(tenant: &str, job: u64, step: usize, part: &str) -> String {
    format!("{tenant}/{job:020}/{step:04}/{part}")
}

/// Run `step` at `target` and wait for its answer. `key`: the job step's key ([`step_key`]),
/// none for the server's own housekeeping (a fresh order each time).
pub async fn run(
    app: &Shared,
    target: &Target,
    tenant: &str,
    job: Option<u64>,
    key: Option<String>,
    step_name: &str,
    step: SiteStep,
) -> Result<SiteAnswer, String> {
    let mut ignore = |_: &OrderProgress| {};
    run_reporting(app, target, tenant, job, key, step_name, step, &mut ignore).await
}

/// [`run`], telling `progress` each new progress the role reports while it runs the step.
#[allow(clippy::too_many_arguments)]
pub async fn run_reporting(
    app: &Shared,
    target: &Target,
    tenant: &str,
    job: Option<u64>,
    key: Option<String>,
    step_name: &str,
    step: SiteStep,
    progress: &mut (dyn FnMut(&OrderProgress) + Send),
) -> Result<SiteAnswer, String> {
    let (appliance, role) = match target {
        Target::Local => return run_here(app, &step, progress).await,
        Target::Role { appliance, role } => (appliance.clone(), *role),
    };
    let id = order_id(app, key.as_deref()).map_err(|e| e.to_string())?;
    let okey = format!("{id:020}");
    let existing: Option<Stored> = app
        .store
        .get(trees::ORDERS, &okey)
        .map_err(|e| e.to_string())?;
    match existing {
        Some(Stored {
            result: Some(r), ..
        }) => return answer(r, role, &appliance),
        Some(_) => {}
        None => {
            let s = Stored {
                order: Order {
                    id,
                    appliance: appliance.clone(),
                    tenant: tenant.to_string(),
                    job,
                    step_name: step_name.to_string(),
                    step,
                    created_unix: now_unix(),
                },
                result: None,
                progress: None,
            };
            app.store
                .put(trees::ORDERS, &okey, &s)
                .map_err(|e| e.to_string())?;
            app.store.flush().await.map_err(|e| e.to_string())?;
        }
    }
    tracing::info!(order = id, %appliance, step = step_name, "order sent");
    let timeout = app.jobs.order_timeout;
    let began = (Instant::now(), ms_now());
    let mut told: Option<OrderProgress> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        match app.store.get::<Stored>(trees::ORDERS, &okey) {
            Ok(Some(Stored {
                result: None,
                progress: Some(p),
                ..
            })) if told.as_ref() != Some(&p) => {
                progress(&p);
                told = Some(p);
            }
            Ok(Some(Stored {
                result: Some(r), ..
            })) => {
                // A job's answers stay until the job ends (a resumed step finds them there);
                // the server's own housekeeping needs them no longer.
                if key.is_none() {
                    app.store
                        .remove(trees::ORDERS, &okey)
                        .map_err(|e| e.to_string())?;
                }
                return answer(r, role, &appliance);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("order {id} was withdrawn")),
            Err(e) => return Err(e.to_string()),
        }
        let last = app.jobs.seen(&appliance).unwrap_or(0).max(began.1);
        if began.0.elapsed() >= timeout
            && ms_now().saturating_sub(last) >= timeout.as_millis() as u64
        {
            // Withdrawn, so that a role coming back later does not run a step the job gave up
            // on; a resumed job sends it again under the same id.
            let _ = app.store.remove(trees::ORDERS, &okey);
            let _ = app.store.flush().await;
            return Err(format!(
                "{} {appliance} did not answer within {} s (step {step_name}: is it running \
                 and connected to this configuration server?)",
                role_words(role),
                timeout.as_secs()
            ));
        }
    }
}

/// Run a step in this server's own process (started beside the site), passing on its progress.
async fn run_here(
    app: &Shared,
    step: &SiteStep,
    progress: &mut (dyn FnMut(&OrderProgress) + Send),
) -> Result<SiteAnswer, String> {
    let agent = app
        .jobs
        .local
        .clone()
        .ok_or("this configuration server drives no recovery site")?;
    let (tx, mut rx) = tokio::sync::watch::channel(None::<OrderProgress>);
    let report: ferry_failover::agent::Progress = Arc::new(move |p| {
        tx.send_replace(Some(p));
    });
    let step = step.clone();
    let mut work = tokio::spawn(async move { agent.execute_reporting(&step, report).await });
    loop {
        tokio::select! {
            r = &mut work => {
                return match r {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(format!("the step's worker died: {e}")),
                };
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    // The step is done with its progress; its answer follows.
                    return match work.await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("the step's worker died: {e}")),
                    };
                }
                let p = rx.borrow_and_update().clone();
                if let Some(p) = p {
                    progress(&p);
                }
            }
        }
    }
}

fn answer(r: OrderResult, role: ApplianceRole, appliance: &str) -> Result<SiteAnswer, String> {
    match (r.answer, r.error) {
        (Some(a), _) => Ok(a),
        (None, e) => Err(format!(
            "{} {appliance}: {}",
            role_words(role),
            e.unwrap_or_else(|| "failed without saying why".into())
        )),
    }
}

fn order_id(app: &Shared, key: Option<&str>) -> Result<u64, StoreError> {
    if let Some(k) = key {
        if let Some(id) = app.store.get::<u64>(trees::ORDER_KEYS, k)? {
            return Ok(id);
        }
    }
    let id = app.store.append(trees::ORDER_IDS, |seq| seq)?;
    if let Some(k) = key {
        app.store.put(trees::ORDER_KEYS, k, &id)?;
    }
    Ok(id)
}

/// Forget the orders of an ended job.
pub fn forget_job(app: &Shared, tenant: &str, job: u64) -> Result<(), StoreError> {
    let keys: Vec<(String, u64)> = app
        .store
        .list_keyed(trees::ORDER_KEYS, &format!("{tenant}/{job:020}/"))?;
    for (k, id) in keys {
        app.store.remove(trees::ORDERS, &format!("{id:020}"))?;
        app.store.remove(trees::ORDER_KEYS, &k)?;
    }
    Ok(())
}

fn not_a_role(p: &ferry_api::Principal) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "{} is not an appliance: only the master target or process server an order is \
             addressed to fetches or answers it",
            p.name
        ),
    )
}

/// `GET /v1/roles/orders`: the orders addressed to the calling role that await its answer.
pub async fn fetch(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<Vec<Order>>, ApiError> {
    if p.appliance.is_none() {
        return Err(not_a_role(&p));
    }
    app.jobs.saw(&p.name);
    let all: Vec<Stored> = app.store.list(trees::ORDERS, "")?;
    Ok(Json(
        all.into_iter()
            .filter(|s| s.result.is_none() && s.order.appliance == p.name)
            .map(|s| s.order)
            .collect(),
    ))
}

/// The error code of an order this server does not keep (`ferry_api::NO_SUCH_ORDER`).
use ferry_api::NO_SUCH_ORDER;

/// The order `segs` names, addressed to the calling role `p` (under the write lock).
fn addressed(
    app: &Shared,
    p: &ferry_api::Principal,
    segs: &[String],
) -> Result<(String, Stored), ApiError> {
    let [id] = segs else {
        return Err(ApiError::not_found("a route of an order names one order"));
    };
    let okey = id
        .parse::<u64>()
        .map(|n| format!("{n:020}"))
        .map_err(|_| ApiError::not_found(format!("no order {id}")))?;
    // Its own code: a role forgets its answer to an order this server no longer keeps, and
    // must not take a route this server lacks for that.
    let stored: Stored = app.store.get(trees::ORDERS, &okey)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            NO_SUCH_ORDER,
            format!("no order {id} (withdrawn, or its job ended)"),
        )
    })?;
    if stored.order.appliance != p.name {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("order {id} is not addressed to {}", p.name),
        ));
    }
    Ok((okey, stored))
}

/// `GET /v1/roles/orders/{order}`: an order this server still keeps (answered or not), for the
/// addressed role; 404 once it is withdrawn or its job ended, when the role may forget its
/// answer.
pub async fn one(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<Order>, ApiError> {
    if p.appliance.is_none() {
        return Err(not_a_role(&p));
    }
    let (_, stored) = addressed(&app, &p, &s)?;
    Ok(Json(stored.order))
}

/// `POST /v1/roles/orders/{order}/progress`: how far the addressed role has come with an order
/// it runs; kept until its answer comes, and shown on the job's step.
pub async fn progress(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(pr): Body<OrderProgress>,
) -> Result<Json<Order>, ApiError> {
    if p.appliance.is_none() {
        return Err(not_a_role(&p));
    }
    pr.validate()?;
    let _w = app.write.lock().await;
    let (okey, mut stored) = addressed(&app, &p, &s)?;
    app.jobs.saw(&p.name);
    if stored.result.is_none() {
        stored.progress = Some(pr);
        app.store.put(trees::ORDERS, &okey, &stored)?;
    }
    Ok(Json(stored.order))
}

/// `POST /v1/roles/orders/{order}/result`: the addressed role's answer.
pub async fn result(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(r): Body<OrderResult>,
) -> Result<Json<Order>, ApiError> {
    if p.appliance.is_none() {
        return Err(not_a_role(&p));
    }
    r.validate()?;
    let _w = app.write.lock().await;
    let (okey, mut stored) = addressed(&app, &p, &s)?;
    app.jobs.saw(&p.name);
    if stored.result.is_none() {
        stored.result = Some(r);
        app.store.put(trees::ORDERS, &okey, &stored)?;
        app.store.flush().await?;
    }
    Ok(Json(stored.order))
}
