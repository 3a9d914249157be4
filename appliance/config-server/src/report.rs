//! Reports from appliances: a disk's state and RPO. They feed the metrics, and an RPO crossing
//! the policy's threshold raises (or clears) an alert, as ASR's "RPO over threshold".

use crate::app::{Caller, Shared};
use crate::error::{ApiError, Body};
use crate::objects::Segs;
use crate::store::trees;
use axum::extract::State;
use axum::Json;
use ferry_api::{Action, Disk, DiskReport, Machine, Policy, Severity};

pub async fn disk(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(r): Body<DiskReport>,
) -> Result<Json<Disk>, ApiError> {
    let _w = app.write.lock().await;
    let [tenant, machine, name] = s.as_slice() else {
        return Err(ApiError::not_found(
            "a report names a tenant, a machine and a disk",
        ));
    };
    p.may(Action::Report, Some(tenant))?;
    r.validate()?;
    let key = format!("{tenant}/{machine}/{name}");
    let mut d: Disk = app
        .store
        .get(trees::DISKS, &key)?
        .ok_or_else(|| ApiError::not_found(format!("no disk {name} on machine {machine}")))?;
    let m: Option<Machine> = app
        .store
        .get(trees::MACHINES, &format!("{tenant}/{machine}"))?;
    let threshold = match m {
        Some(m) => app
            .store
            .get::<Policy>(trees::POLICIES, &format!("{tenant}/{}", m.policy))?
            .map(|p| f64::from(p.rpo_alert_secs)),
        None => None,
    };
    d.state = r.state;
    d.rpo_seconds = r.rpo_seconds;
    d.throughput_bytes_per_sec = r.throughput_bytes_per_sec;
    d.journal_bytes = r.journal_bytes;
    d.backlog_records = r.backlog_records;
    d.bytes_sent = r.bytes_sent;
    d.uplink_share = r.uplink_share;
    app.store.put(trees::DISKS, &key, &d)?;
    let want = match (r.rpo_seconds, threshold) {
        (Some(rpo), Some(t)) if rpo > t => Some((
            Severity::Warning,
            format!("RPO {rpo:.1} s is over the threshold of {t} s"),
        )),
        _ => None,
    };
    crate::alerts::set(
        &app.store,
        Some(tenant),
        &format!("disks/{machine}/{name}"),
        want,
    )?;
    app.store.flush().await?;
    Ok(Json(d))
}
