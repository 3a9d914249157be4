//! The jobs' routes, added to the server's route table (and so to its OpenAPI document).

use crate::app::{Caller, Shared};
use crate::error::{ApiError, Body};
use crate::objects::Segs;
use crate::routes::{Api, Op};
use crate::store::trees;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::Json;
use ferry_api::{
    Action, Disk, Job, Order, OrderProgress, OrderResult, PlanStatus, PointInfo, StartJob,
};

pub fn add(api: Api) -> Api {
    api.add(
        Op::new(
            Method::POST,
            "/v1/tenants/{tenant}/plans/{plan}/jobs",
            "Start a job on a plan: test-failover, cleanup, planned-failover, \
             unplanned-failover, commit, reprotect, failback",
        )
        .body::<StartJob>()
        .answers::<Job>()
        .ok(202)
        .who("operator, tenant-admin of the tenant, provider-admin")
        .errors(&[403, 404, 409]),
        start,
    )
    .add(
        Op::new(
            Method::GET,
            "/v1/tenants/{tenant}/plans/{plan}/status",
            "Where a plan stands: its phase, its running job, its disks",
        )
        .answers::<PlanStatus>()
        .errors(&[403, 404]),
        status,
    )
    .add(
        Op::new(
            Method::GET,
            "/v1/tenants/{tenant}/machines/{machine}/points",
            "The recovery points of a machine's disks at the recovery site (asked of the \
             tenant's master target)",
        )
        .answers::<Vec<PointInfo>>()
        .errors(&[403, 404, 409, 502]),
        points,
    )
    .add(
        Op::new(
            Method::GET,
            "/v1/roles/orders",
            "The step orders addressed to the calling role that await its answer (a role \
             polls this about every second)",
        )
        .answers::<Vec<Order>>()
        .who("the master target or process server the orders are addressed to")
        .errors(&[403]),
        super::orders::fetch,
    )
    .add(
        Op::new(
            Method::POST,
            "/v1/roles/orders/{order}/result",
            "A role's answer to an order addressed to it: what the step did, or why it failed",
        )
        .body::<OrderResult>()
        .answers::<Order>()
        .who("the master target or process server the order is addressed to")
        .errors(&[403, 404]),
        super::orders::result,
    )
    .add(
        Op::new(
            Method::POST,
            "/v1/roles/orders/{order}/progress",
            "How far a role has come with an order addressed to it that it runs (a resync: \
             bytes compared of the disk, blocks compared, bytes sent); the job shows it on the \
             order's step",
        )
        .body::<OrderProgress>()
        .answers::<Order>()
        .who("the master target or process server the order is addressed to")
        .errors(&[403, 404]),
        super::orders::progress,
    )
    .add(
        Op::new(
            Method::GET,
            "/v1/roles/orders/{order}",
            "An order this server still keeps, answered or not (404 once it was withdrawn or \
             its job ended: the role may forget its answer)",
        )
        .answers::<Order>()
        .who("the master target or process server the order is addressed to")
        .errors(&[403, 404]),
        super::orders::one,
    )
    .add(
        Op::new(
            Method::GET,
            "/v1/tenants/{tenant}/jobs",
            "A tenant's jobs, newest last",
        )
        .answers::<Vec<Job>>()
        .errors(&[403, 404]),
        list,
    )
    .add(
        Op::new(
            Method::GET,
            "/v1/tenants/{tenant}/jobs/{job}",
            "A job, with each step's state and progress",
        )
        .answers::<Job>()
        .errors(&[403, 404]),
        one,
    )
}

fn tenant_exists(app: &Shared, tenant: &str) -> Result<(), ApiError> {
    if app.store.contains(trees::TENANTS, tenant)? {
        Ok(())
    } else {
        Err(ApiError::not_found(format!("no tenant {tenant}")))
    }
}

async fn start(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
    Body(req): Body<StartJob>,
) -> Result<(StatusCode, Json<Job>), ApiError> {
    let [tenant, plan] = s.as_slice() else {
        return Err(ApiError::not_found("a job names a tenant and a plan"));
    };
    let _w = app.write.lock().await;
    p.may(Action::Operate, Some(tenant))?;
    tenant_exists(&app, tenant)?;
    let job = super::start(&app, tenant, plan, req, &p.name).await?;
    Ok((StatusCode::ACCEPTED, Json(job)))
}

async fn status(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<PlanStatus>, ApiError> {
    let [tenant, plan] = s.as_slice() else {
        return Err(ApiError::not_found(
            "a plan's status names a tenant and a plan",
        ));
    };
    p.may(Action::Read, Some(tenant))?;
    if !app
        .store
        .contains(trees::PLANS, &super::plan_key(tenant, plan))?
    {
        return Err(ApiError::not_found(format!("no plan {plan}")));
    }
    Ok(Json(super::plan_status(&app.store, tenant, plan)?))
}

async fn list(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<Vec<Job>>, ApiError> {
    let [tenant] = s.as_slice() else {
        return Err(ApiError::not_found("jobs are listed per tenant"));
    };
    p.may(Action::Read, Some(tenant))?;
    tenant_exists(&app, tenant)?;
    Ok(Json(app.store.list(trees::JOBS, &format!("{tenant}/"))?))
}

async fn one(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<Job>, ApiError> {
    let [tenant, id] = s.as_slice() else {
        return Err(ApiError::not_found("a job names a tenant and an id"));
    };
    p.may(Action::Read, Some(tenant))?;
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::not_found(format!("no job {id} (jobs are numbered)")))?;
    app.store
        .get(trees::JOBS, &super::job_key(tenant, id))?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

async fn points(
    State(app): State<Shared>,
    Caller(p): Caller,
    Segs(s): Segs,
) -> Result<Json<Vec<PointInfo>>, ApiError> {
    let [tenant, machine] = s.as_slice() else {
        return Err(ApiError::not_found("points name a tenant and a machine"));
    };
    p.may(Action::Read, Some(tenant))?;
    if !app
        .store
        .contains(trees::MACHINES, &format!("{tenant}/{machine}"))?
    {
        return Err(ApiError::not_found(format!("no machine {machine}")));
    }
    let target = super::orders::master_target(&app, tenant)
        .map_err(|why| ApiError::new(StatusCode::CONFLICT, "no-recovery-site", why))?;
    let disks: Vec<Disk> = app
        .store
        .list(trees::DISKS, &format!("{tenant}/{machine}/"))?;
    let step = ferry_api::SiteStep::ListPoints {
        disks: disks.into_iter().map(|d| d.name).collect(),
    };
    let out = match super::orders::run(&app, &target, tenant, None, None, "points", step).await {
        Ok(ferry_api::SiteAnswer::PointList { points }) => points,
        Ok(other) => return Err(ApiError::internal(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(ApiError::new(StatusCode::BAD_GATEWAY, "recovery-site", e)),
    };
    Ok(Json(out))
}
