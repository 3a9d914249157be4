//! Alerts: conditions that hold until they clear, as ASR raises them. Each alert has a subject
//! (`disks/web/d0/rpo`, `appliances/ps1/cache`, ...); the active ones are kept in the `alerts`
//! tree, and every raise, change of severity and clear is also an event. Sources: disk reports
//! (RPO over the policy's threshold), appliance reports (cache free, upload backlog) and the
//! watch below (an appliance that stopped reporting is unreachable).

use crate::app::{now_unix, Caller, Shared};
use crate::error::{ApiError, Body};
use crate::objects::Segs;
use crate::store::{trees, Store, StoreError};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_api::{Action, Appliance, ApplianceReport, Event, Principal, Severity};
use serde::{Deserialize, Serialize};
use std::fmt::Write;
use std::time::Duration;

fn key(tenant: Option<&str>, subject: &str) -> String {
    format!("{}/{subject}", tenant.unwrap_or("-"))
}

/// Make the alert on `subject` what `want` says: raise it, change its severity, or clear it.
/// Nothing is written when it already is so. The caller flushes.
pub fn set(
    store: &Store,
    tenant: Option<&str>,
    subject: &str,
    want: Option<(Severity, String)>,
) -> Result<(), StoreError> {
    let k = key(tenant, subject);
    let now: Option<Event> = store.get(trees::ALERTS, &k)?;
    let event = |severity, message, active| {
        move |seq| Event {
            seq,
            at_unix: now_unix(),
            severity,
            tenant: tenant.map(str::to_string),
            subject: subject.to_string(),
            message,
            active,
        }
    };
    match (now, want) {
        (None, None) => {}
        (Some(a), Some((s, _))) if a.severity == s => {}
        (_, Some((s, m))) => {
            let seq = store.append(trees::EVENTS, event(s, m.clone(), true))?;
            let e = event(s, m, true)(seq);
            store.put(trees::ALERTS, &k, &e)?;
        }
        (Some(a), None) => {
            store.append(
                trees::EVENTS,
                event(Severity::Info, format!("cleared: {}", a.message), false),
            )?;
            store.remove(trees::ALERTS, &k)?;
        }
    }
    Ok(())
}

/// The active alerts a principal may see.
pub fn active(store: &Store, p: &Principal) -> Result<Vec<Event>, StoreError> {
    match &p.tenant {
        Some(t) => of_tenant(store, t),
        None => store.list(trees::ALERTS, ""),
    }
}

/// The active alerts of one tenant (a prefix of the tree's keys).
pub fn of_tenant(store: &Store, tenant: &str) -> Result<Vec<Event>, StoreError> {
    store.list(trees::ALERTS, &format!("{tenant}/"))
}

pub async fn list(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<Vec<Event>>, ApiError> {
    Ok(Json(active(&app.store, &p)?))
}

/// `ferry_alert_active{tenant,subject,severity} 1` for each active alert.
pub fn metrics(store: &Store, p: &Principal, out: &mut String) -> Result<(), StoreError> {
    out.push_str(
        "# HELP ferry_alert_active 1 for each active alert\n# TYPE ferry_alert_active gauge\n",
    );
    for e in active(store, p)? {
        let _ = writeln!(
            out,
            "ferry_alert_active{{tenant=\"{}\",subject=\"{}\",severity=\"{}\"}} 1",
            e.tenant.as_deref().unwrap_or(""),
            e.subject,
            format!("{:?}", e.severity).to_lowercase()
        );
    }
    Ok(())
}

/// When an appliance last reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Seen {
    pub at_unix: u64,
    pub report: ApplianceReport,
}

fn subject(name: &str, what: &str) -> String {
    format!("appliances/{name}/{what}")
}

/// An appliance that left (its identity revoked): its alerts clear and it is no longer watched.
/// The caller flushes.
pub fn forget_appliance(store: &Store, tenant: Option<&str>, name: &str) -> Result<(), StoreError> {
    for what in ["cache", "backlog", "reachable"] {
        set(store, tenant, &subject(name, what), None)?;
    }
    store.remove(trees::APPLIANCE_SEEN, name)?;
    Ok(())
}

pub async fn report(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(r): Body<ApplianceReport>,
) -> Result<Json<ApplianceReport>, ApiError> {
    let [name] = s.as_slice() else {
        return Err(ApiError::not_found("a report names an appliance"));
    };
    let _w = app.write.lock().await;
    p.may(Action::Report, None)?;
    // An appliance reports for itself; a provider admin may correct any.
    if p.appliance.is_some() && &p.name != name {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} may report only for itself, not for {name}", p.name),
        ));
    }
    r.validate()?;
    let a: Appliance = app
        .store
        .get(trees::APPLIANCES, name)?
        .ok_or_else(|| ApiError::not_found(format!("no appliance {name}")))?;
    let t = a.tenant.as_deref();
    set(&app.store, t, &subject(name, "cache"), r.cache_alert())?;
    set(&app.store, t, &subject(name, "backlog"), r.backlog_alert())?;
    set(&app.store, t, &subject(name, "reachable"), None)?;
    app.store.put(
        trees::APPLIANCE_SEEN,
        name,
        &Seen {
            at_unix: now_unix(),
            report: r.clone(),
        },
    )?;
    app.store.flush().await?;
    Ok(Json(r))
}

/// Raise "unreachable" for every appliance that has not reported for `after` (counted from
/// its enrollment when it never did). Runs until the server stops.
pub async fn watch(app: Shared, after: Duration) {
    let every = (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = check(&app, after).await {
            tracing::warn!(error = %e, "cannot check whether appliances report");
        }
    }
}

async fn check(app: &Shared, after: Duration) -> Result<(), StoreError> {
    let _w = app.write.lock().await;
    let now = now_unix();
    let mut changed = false;
    for a in app.store.list::<Appliance>(trees::APPLIANCES, "")? {
        let seen = app
            .store
            .get::<Seen>(trees::APPLIANCE_SEEN, &a.name)?
            .map_or(a.enrolled_unix, |s| s.at_unix);
        let quiet = now.saturating_sub(seen);
        if quiet >= after.as_secs() {
            let sub = subject(&a.name, "reachable");
            let before: Option<Event> = app
                .store
                .get(trees::ALERTS, &key(a.tenant.as_deref(), &sub))?;
            if before.is_none() {
                set(
                    &app.store,
                    a.tenant.as_deref(),
                    &sub,
                    Some((
                        Severity::Critical,
                        format!(
                            "{} {} has not reported for {quiet} s",
                            a.role.as_str(),
                            a.name
                        ),
                    )),
                )?;
                changed = true;
            }
        }
    }
    if changed {
        app.store.flush().await?;
    }
    Ok(())
}
