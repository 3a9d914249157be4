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
    // As last reported by the process server: (name, help, lines).
    let mut reported: Vec<(&str, &str, String)> = vec![
        ("ferry_disk_journal_bytes", "bytes the disk's journal holds on the cache (not yet at the recovery site)", String::new()),
        ("ferry_disk_backlog_records", "journal records durable at the process server and not yet at the recovery site", String::new()),
        ("ferry_disk_sent_bytes", "bytes sent to the master target since the process server started (after dedup, compression, encryption)", String::new()),
        ("ferry_disk_throughput_bytes_per_second", "bytes replicated per second between the process server's last two reports", String::new()),
        ("ferry_disk_uplink_share", "fraction of the process server's uplink budget the disk's machine is entitled to by its priority against the machines sending now", String::new()),
    ];
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
        let values = [
            d.journal_bytes.map(|v| v as f64),
            d.backlog_records.map(|v| v as f64),
            d.bytes_sent.map(|v| v as f64),
            d.throughput_bytes_per_sec,
            d.uplink_share,
        ];
        for ((name, _, lines), v) in reported.iter_mut().zip(values) {
            if let Some(v) = v {
                let _ = writeln!(lines, "{name}{{{labels}}} {v}");
            }
        }
    }
    out.push_str(&states);
    out.push_str("# HELP ferry_disk_rpo_seconds age of the newest recovery point, as last reported\n# TYPE ferry_disk_rpo_seconds gauge\n");
    out.push_str(&rpo);
    out.push_str(
        "# HELP ferry_disk_size_bytes configured disk size\n# TYPE ferry_disk_size_bytes gauge\n",
    );
    out.push_str(&size);
    for (name, help, lines) in &reported {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        out.push_str(lines);
    }
    appliance_metrics(&app, &p, &mut out)?;
    crate::alerts::metrics(&app.store, &p, &mut out)?;
    crate::jobs::metrics(&app.store, &p, &mut out)?;
    let r = &app.refusals;
    let _ = writeln!(
        out,
        "# HELP ferry_refusals_total requests refused (401, 403) since the server started\n\
         # TYPE ferry_refusals_total counter\nferry_refusals_total {}\n\
         # HELP ferry_refusals_limited_total requests answered 429 too-many-refusals since the server started\n\
         # TYPE ferry_refusals_limited_total counter\nferry_refusals_limited_total {}",
        r.refused_total.load(std::sync::atomic::Ordering::Relaxed),
        r.limited_total.load(std::sync::atomic::Ordering::Relaxed)
    );
    let proc = ferry_api::own_process_stats();
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

/// Per appliance, as it last reported: cache free, upload backlog, its own CPU and memory.
fn appliance_metrics(app: &Shared, p: &Principal, out: &mut String) -> Result<(), ApiError> {
    let seen: Vec<(String, crate::alerts::Seen)> =
        app.store.list_keyed(trees::APPLIANCE_SEEN, "")?;
    let appliances: Vec<Appliance> = app.store.list(trees::APPLIANCES, "")?;
    let mut series: Vec<(&str, &str, String)> = vec![
        (
            "ferry_appliance_cache_free_ratio",
            "free fraction of the process server's cache device",
            String::new(),
        ),
        (
            "ferry_appliance_upload_backlog_seconds",
            "age of the oldest write not yet at the recovery site",
            String::new(),
        ),
        (
            "ferry_appliance_cpu_seconds",
            "CPU time (user and system) of the role's process",
            String::new(),
        ),
        (
            "ferry_appliance_memory_bytes",
            "resident memory of the role's process",
            String::new(),
        ),
    ];
    for (name, s) in &seen {
        let Some(a) = appliances.iter().find(|a| &a.name == name) else {
            continue;
        };
        // An appliance of no tenant is the provider's: only people of no tenant see it.
        let visible = match &a.tenant {
            Some(t) => p.sees(t),
            None => p.tenant.is_none(),
        };
        if !visible {
            continue;
        }
        let labels = format!(
            "appliance=\"{}\",role=\"{}\",tenant=\"{}\"",
            a.name,
            a.role.as_str(),
            a.tenant.as_deref().unwrap_or_default()
        );
        let r = &s.report;
        let values = [
            r.cache_free_ratio,
            r.upload_backlog_secs,
            r.cpu_seconds,
            r.memory_bytes.map(|m| m as f64),
        ];
        for ((metric, _, lines), v) in series.iter_mut().zip(values) {
            if let Some(v) = v {
                let _ = writeln!(lines, "{metric}{{{labels}}} {v}");
            }
        }
    }
    for (metric, help, lines) in &series {
        let _ = writeln!(out, "# HELP {metric} {help}\n# TYPE {metric} gauge");
        out.push_str(lines);
    }
    Ok(())
}
