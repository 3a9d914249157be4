//! Read-only endpoints: who am I, appliances, audit, events, a tenant's status, health and
//! metrics.

use crate::app::{Caller, Shared};
use crate::error::ApiError;
use crate::objects::Segs;
use crate::store::trees;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::{
    Action, Appliance, AuditEntry, Disk, DiskState, Event, Health, Machine, MachineDisk, Plan,
    Principal, TenantStatus,
};
use serde::Deserialize;
use std::fmt::Write;

pub async fn whoami(Caller(p): Caller) -> Json<Principal> {
    Json(p)
}

pub async fn healthz(Caller(_): Caller) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

pub async fn appliances(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<Json<Vec<Appliance>>, ApiError> {
    let mut all: Vec<Appliance> = app.store.list(trees::APPLIANCES, "")?;
    all.retain(|a| p.tenant.is_none() || a.tenant == p.tenant);
    Ok(Json(all))
}

#[derive(Deserialize)]
pub struct Tail {
    limit: Option<usize>,
}

/// At most this many entries per answer: answers stay small whatever the log's size.
pub const TAIL_MAX: usize = 1000;

fn limit(q: Result<Query<Tail>, QueryRejection>) -> Result<usize, ApiError> {
    let Query(t) =
        q.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad-query", e.body_text()))?;
    Ok(t.limit.unwrap_or(100).min(TAIL_MAX))
}

pub async fn audit(
    State(app): State<Shared>,
    Caller(p): Caller,
    q: Result<Query<Tail>, QueryRejection>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    p.may(Action::ReadAudit, p.tenant.as_deref())?;
    let limit = limit(q)?;
    let mut v: Vec<AuditEntry> = match &p.tenant {
        None => app.store.tail(trees::AUDIT, limit)?,
        // A tenant sees what its own principals did and what was done to it. Filtering after
        // the tail keeps the scan bounded; a tenant may get fewer than `limit` entries.
        Some(_) => app.store.tail(trees::AUDIT, TAIL_MAX)?,
    };
    if let Some(own) = &p.tenant {
        v.retain(|e| e.tenant.as_ref() == Some(own) || e.target_tenant.as_ref() == Some(own));
        let skip = v.len().saturating_sub(limit);
        v.drain(..skip);
    }
    Ok(Json(v))
}

pub async fn events(
    State(app): State<Shared>,
    Caller(p): Caller,
    q: Result<Query<Tail>, QueryRejection>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let limit = limit(q)?;
    let mut v: Vec<Event> = app.store.tail(trees::EVENTS, TAIL_MAX)?;
    v.retain(|e| p.tenant.is_none() || e.tenant == p.tenant);
    let skip = v.len().saturating_sub(limit);
    v.drain(..skip);
    Ok(Json(v))
}

/// A tenant at a glance. One answer instead of a request per machine and per plan: with
/// thousands of disks, `ferry ctl status` spent its time in TLS handshakes. Each part is one
/// prefix scan of its tree.
pub async fn tenant_status(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<TenantStatus>, ApiError> {
    let [tenant] = s.as_slice() else {
        return Err(ApiError::not_found("a status names a tenant"));
    };
    p.may(Action::Read, Some(tenant))?;
    if !app.store.contains(trees::TENANTS, tenant)? {
        return Err(ApiError::not_found(format!("no tenant {tenant}")));
    }
    let prefix = format!("{tenant}/");
    let machines: Vec<Machine> = app.store.list(trees::MACHINES, &prefix)?;
    let mut disks: Vec<MachineDisk> = app
        .store
        .list_keyed::<Disk>(trees::DISKS, &prefix)?
        .into_iter()
        .map(|(key, disk)| MachineDisk {
            // `{tenant}/{machine}/{disk}`
            machine: key[prefix.len()..]
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            disk,
        })
        .collect();
    // Keys sort `web-2/...` before `web/...`; machines come in name order (`web` first). A
    // stable sort keeps each machine's disks in their own order.
    disks.sort_by(|a, b| a.machine.cmp(&b.machine));
    let plans = app
        .store
        .list::<Plan>(trees::PLANS, &prefix)?
        .iter()
        .map(|plan| crate::jobs::plan_status(&app.store, tenant, &plan.name))
        .collect::<Result<_, _>>()?;
    Ok(Json(TenantStatus {
        machines,
        disks,
        plans,
        alerts: crate::alerts::of_tenant(&app.store, tenant)?,
    }))
}

/// Prometheus text format. Label values are object names, which hold only `a-z0-9-`, so they
/// need no escaping.
pub async fn metrics(
    State(app): State<Shared>,
    Caller(p): Caller,
) -> Result<impl IntoResponse, ApiError> {
    let disks: Vec<(String, Disk)> = app.store.list_keyed(trees::DISKS, "")?;
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    };
    gauge(
        "ferry_disk_state",
        "1 for the state a disk is in, 0 for the others",
    );
    let mut rpo = String::new();
    let mut size = String::new();
    let mut states = String::new();
    for (key, d) in &disks {
        let mut parts = key.splitn(3, '/');
        let (Some(t), Some(m), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !p.sees(t) {
            continue;
        }
        let labels = format!("tenant=\"{t}\",machine=\"{m}\",disk=\"{}\"", d.name);
        for s in DiskState::ALL {
            let v = u8::from(s == d.state);
            let _ = writeln!(
                states,
                "ferry_disk_state{{{labels},state=\"{}\"}} {v}",
                s.as_str()
            );
        }
        if let Some(r) = d.rpo_seconds {
            let _ = writeln!(rpo, "ferry_disk_rpo_seconds{{{labels}}} {r}");
        }
        let _ = writeln!(size, "ferry_disk_size_bytes{{{labels}}} {}", d.size_bytes);
    }
    out.push_str(&states);
    out.push_str("# HELP ferry_disk_rpo_seconds age of the newest recovery point, as last reported\n# TYPE ferry_disk_rpo_seconds gauge\n");
    out.push_str(&rpo);
    out.push_str(
        "# HELP ferry_disk_size_bytes configured disk size\n# TYPE ferry_disk_size_bytes gauge\n",
    );
    out.push_str(&size);
    crate::alerts::metrics(&app.store, &p, &mut out)?;
    crate::jobs::metrics(&app.store, &p, &mut out)?;
    let proc = process_stats();
    let _ = writeln!(
        out,
        "# HELP process_cpu_seconds_total user and system CPU time of the configuration server\n\
         # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n\
         # HELP process_resident_memory_bytes resident memory of the configuration server\n\
         # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
        proc.0, proc.1
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    ))
}

/// (CPU seconds, resident bytes) from /proc; zeros where /proc is not readable.
fn process_stats() -> (f64, u64) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            // Linux reports these in USER_HZ, which is 100 on every architecture it exports.
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}
