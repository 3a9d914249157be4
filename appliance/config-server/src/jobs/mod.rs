//! Failover jobs: starting one (permission, the plan's phase, the inventory it needs), the
//! steps each kind runs, and picking jobs up again after a restart.
//!
//! State in sled: `jobs` (`{tenant}/{id:020}` → [`Job`]) and `plan-status` (`{tenant}/{plan}`
//! → [`PlanStatus`]). A job's record is written (and flushed) before and after every step, so
//! after a crash the record says exactly which steps were done and which one was running.
//! On start-up a running job resumes at that step if the step may run again
//! ([`retry_safe`]); otherwise it ends `failed`, naming the interrupted step and the steps
//! done, and the plan keeps the phase it had (a test failover's phase becomes `test-running`,
//! so that `cleanup` discards whatever scratch layers were made).
//!
//! Rooms: [`run`] (executing steps), [`routes`] (the API).

pub mod orders;
pub mod routes;
pub mod run;

use crate::app::{now_unix, Shared};
use crate::error::ApiError;
use crate::store::{trees, Store, StoreError};
use axum::http::StatusCode;
use ferry_api::{
    Disk, Event, Job, JobKind, JobState, Machine, Plan, PlanPhase, PlanStatus, Severity,
    SiteAnswer, SiteStep, StartJob, Step, StepState,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server needs at run time for jobs: the recovery site when it runs beside it (its
/// steps run here; none: they are ordered from the tenant's roles, [`orders`]), how long a role
/// may take to fetch an order, and when each role last fetched its orders.
pub struct Runtime {
    pub local: Option<Arc<ferry_failover::agent::Agent>>,
    pub order_timeout: Duration,
    seen: Mutex<HashMap<String, u64>>,
}

impl Runtime {
    pub fn new(site: Option<ferry_failover::Site>, order_timeout: Duration) -> Runtime {
        Runtime {
            local: site.map(|s| {
                let cache = s.process_cache.clone();
                ferry_failover::agent::Agent::new(Some(s), cache)
            }),
            order_timeout,
            seen: Mutex::default(),
        }
    }
}

pub fn job_key(tenant: &str, id: u64) -> String {
    format!("{tenant}/{id:020}")
}

pub fn plan_key(tenant: &str, plan: &str) -> String {
    format!("{tenant}/{plan}")
}

/// Who holds a job's recovery points in the repository: `job.<tenant>.<id>` (a tenant name has
/// no dot, so it parses back; see [`holder_job`]).
pub fn holder(tenant: &str, id: u64) -> String {
    format!("job.{tenant}.{id}")
}

/// The (tenant, job id) of a holder made by [`holder`]; none for other holders.
pub fn holder_job(holder: &str) -> Option<(&str, u64)> {
    let (tenant, id) = holder.strip_prefix("job.")?.split_once('.')?;
    if tenant.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((tenant, id.parse().ok()?))
}

pub fn plan_status(store: &Store, tenant: &str, plan: &str) -> Result<PlanStatus, StoreError> {
    Ok(store
        .get(trees::PLAN_STATUS, &plan_key(tenant, plan))?
        .unwrap_or_else(|| PlanStatus {
            plan: plan.to_string(),
            ..Default::default()
        }))
}

/// Whether a step may run again after it was interrupted: anything that starts or stops
/// something outside Ferry (hooks, machine starts) may not; Ferry's own steps are idempotent.
pub fn retry_safe(step: &str) -> bool {
    !(step == "pre-hooks" || step == "post-hooks" || step.starts_with("start "))
}

fn step(name: String) -> Step {
    Step {
        name,
        state: StepState::Pending,
        done: 0,
        total: 0,
        detail: String::new(),
        started_unix: None,
        ended_unix: None,
    }
}

/// The steps of a job of `kind` over `plan`, in order; machines in start order (priority
/// group 1 first).
pub fn steps(kind: JobKind, plan: &Plan) -> Vec<Step> {
    let ms: Vec<&str> = plan.machines().collect();
    let each = |what: &'static str| ms.iter().map(move |m| format!("{what} {m}"));
    let mut v: Vec<String> = Vec::new();
    match kind {
        JobKind::TestFailover => {
            v.push("pre-hooks".into());
            v.push("points".into());
            for m in &ms {
                v.push(format!("scratch {m}"));
                v.push(format!("start {m}"));
            }
            v.push("post-hooks".into());
        }
        JobKind::Cleanup => {
            v.push("stop-exports".into());
            v.push("discard-scratch".into());
            v.push("release-points".into());
        }
        JobKind::PlannedFailover | JobKind::UnplannedFailover => {
            v.push("pre-hooks".into());
            if kind == JobKind::PlannedFailover {
                v.extend(each("drain"));
            }
            v.push("points".into());
            for m in &ms {
                v.push(format!("live {m}"));
                v.push(format!("start {m}"));
            }
            v.push("post-hooks".into());
        }
        JobKind::Commit => v.push("commit".into()),
        JobKind::Reprotect => v.extend(each("resync")),
        JobKind::Failback => {
            v.push("pre-hooks".into());
            v.extend(each("resync"));
            // Before the machines start: their disks are quiescent, so each new recovery point
            // is the disk its machine starts from, and its journal takes what it writes next.
            v.extend(each("protect"));
            v.extend(each("start"));
            v.push("post-hooks".into());
        }
    }
    v.into_iter().map(step).collect()
}

fn conflict(code: &'static str, m: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, m)
}

fn invalid(m: String) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
}

/// The machines of a plan and their disks, from the inventory.
pub fn plan_disks(
    store: &Store,
    tenant: &str,
    plan: &Plan,
) -> Result<Vec<(Machine, Vec<Disk>)>, ApiError> {
    plan.machines()
        .map(|m| {
            let machine: Machine = store
                .get(trees::MACHINES, &format!("{tenant}/{m}"))?
                .ok_or_else(|| {
                    invalid(format!(
                        "plan {} names machine {m}, which is gone",
                        plan.name
                    ))
                })?;
            let disks: Vec<Disk> = store.list(trees::DISKS, &format!("{tenant}/{m}/"))?;
            if disks.is_empty() {
                return Err(invalid(format!("machine {m} has no disks to fail over")));
            }
            Ok((machine, disks))
        })
        .collect()
}

/// Check everything a job needs, record it and its plan's new status, and start it. Nothing
/// changes when any check fails. The caller holds the write lock and checked permission.
pub async fn start(
    app: &Shared,
    tenant: &str,
    plan_name: &str,
    req: StartJob,
    by: &str,
) -> Result<Job, ApiError> {
    req.validate()?;
    let plan: Plan = app
        .store
        .get(trees::PLANS, &plan_key(tenant, plan_name))?
        .ok_or_else(|| ApiError::not_found(format!("no plan {plan_name}")))?;
    if let Err(why) = orders::master_target(app, tenant) {
        return Err(conflict("no-recovery-site", why));
    }
    let mut status = plan_status(&app.store, tenant, plan_name)?;
    if let Some(id) = status.running_job {
        return Err(conflict(
            "conflict",
            format!("job {id} is still running on plan {plan_name}; one job at a time"),
        ));
    }
    let (from, _) = req.kind.transition();
    if !from.contains(&status.phase) {
        let want: Vec<&str> = from.iter().map(|p| p.as_str()).collect();
        return Err(conflict(
            "conflict",
            format!(
                "plan {plan_name} is {}; a {} needs it {}",
                status.phase.as_str(),
                req.kind.as_str(),
                want.join(" or ")
            ),
        ));
    }
    let machines = plan_disks(&app.store, tenant, &plan)?;
    if matches!(req.kind, JobKind::Reprotect | JobKind::Failback) {
        for (m, disks) in &machines {
            for d in disks {
                if d.source.is_empty() {
                    return Err(invalid(format!(
                        "disk {} of machine {} has no source: reprotect writes the original \
                         disk, so its source must name the disk's image at the protected site",
                        d.name, m.name
                    )));
                }
            }
        }
    }
    let id = app.store.append(trees::JOB_IDS, |seq| seq)?;
    let now = now_unix();
    let job = Job {
        id,
        tenant: tenant.to_string(),
        plan: plan_name.to_string(),
        kind: req.kind,
        point_unix: req.point_unix,
        state: JobState::Running,
        by: by.to_string(),
        created_unix: now,
        updated_unix: now,
        steps: steps(req.kind, &plan),
        error: None,
        resumed: 0,
        disks: Vec::new(),
    };
    app.store.put(trees::JOBS, &job_key(tenant, id), &job)?;
    status.running_job = Some(id);
    status.last_job = Some(id);
    app.store
        .put(trees::PLAN_STATUS, &plan_key(tenant, plan_name), &status)?;
    app.store.flush().await?;
    tokio::spawn(run::run(app.clone(), job_key(tenant, id)));
    Ok(job)
}

/// `ferry_plan_phase{tenant,plan,phase} 1` for each plan that has run a job, and
/// `ferry_plan_job_running{tenant,plan}` (0 or 1).
pub fn metrics(
    store: &Store,
    p: &ferry_api::Principal,
    out: &mut String,
) -> Result<(), StoreError> {
    use std::fmt::Write;
    out.push_str("# HELP ferry_plan_phase 1 for the phase a recovery plan is in\n# TYPE ferry_plan_phase gauge\n");
    let all: Vec<(String, PlanStatus)> = store.list_keyed(trees::PLAN_STATUS, "")?;
    let mut running = String::new();
    for (key, st) in &all {
        let Some((t, plan)) = key.split_once('/') else {
            continue;
        };
        if !p.sees(t) {
            continue;
        }
        let _ = writeln!(
            out,
            "ferry_plan_phase{{tenant=\"{t}\",plan=\"{plan}\",phase=\"{}\"}} 1",
            st.phase.as_str()
        );
        let _ = writeln!(
            running,
            "ferry_plan_job_running{{tenant=\"{t}\",plan=\"{plan}\"}} {}",
            u8::from(st.running_job.is_some())
        );
    }
    out.push_str("# HELP ferry_plan_job_running 1 while a job runs on the plan\n# TYPE ferry_plan_job_running gauge\n");
    out.push_str(&running);
    Ok(())
}

/// At start-up: serve the scratch layers of running tests again, and resume running jobs
/// (or end them failed when the interrupted step may not run again). Beside the site this is
/// done before any request is served; when the roles run the steps, it is done once serving
/// (the roles fetch their orders from this server).
pub async fn resume(app: &Shared) -> Result<(), StoreError> {
    // The jobs a restart interrupted, listed before any request is served: a job started
    // after that has its own runner.
    let mut jobs: Vec<(String, Job)> = app.store.list_keyed(trees::JOBS, "")?;
    jobs.retain(|(_, j)| j.state == JobState::Running);
    if app.jobs.local.is_some() {
        return resume_now(app, jobs).await;
    }
    let a = app.clone();
    tokio::spawn(async move {
        if let Err(e) = resume_now(&a, jobs).await {
            tracing::error!(error = %e, "cannot resume the jobs a restart interrupted");
        }
    });
    Ok(())
}

async fn resume_now(app: &Shared, jobs: Vec<(String, Job)>) -> Result<(), StoreError> {
    if let Err(e) = reconcile_holds(app).await {
        tracing::error!(error = %e, "cannot check the recovery points held by jobs");
    }
    let statuses: Vec<(String, PlanStatus)> = app.store.list_keyed(trees::PLAN_STATUS, "")?;
    for (key, st) in statuses {
        let testing = st.phase == PlanPhase::TestRunning
            || st.running_job.is_some_and(|id| {
                key.split_once('/')
                    .and_then(|(t, _)| app.store.get::<Job>(trees::JOBS, &job_key(t, id)).ok())
                    .flatten()
                    .is_some_and(|j| j.kind == JobKind::TestFailover)
            });
        if let (true, Some(port)) = (testing, st.test_nbd_port) {
            if let Err(e) = run::serve_test(app, &key, &st.disks, port, None).await {
                tracing::error!(plan = %key, error = %e, "cannot serve a test failover's points again");
            }
        }
    }
    for (key, _) in jobs {
        // As it is now (a step may have been recorded meanwhile).
        let Some(mut job) = app.store.get::<Job>(trees::JOBS, &key)? else {
            continue;
        };
        if job.state != JobState::Running {
            continue;
        }
        let interrupted = job.steps.iter().position(|s| s.state == StepState::Running);
        match interrupted {
            Some(i) if !retry_safe(&job.steps[i].name) => {
                let name = job.steps[i].name.clone();
                job.steps[i].state = StepState::Failed;
                job.steps[i].ended_unix = Some(now_unix());
                job.steps[i].detail =
                    "interrupted by a configuration server restart; it may have partly run".into();
                let why = format!(
                    "the configuration server stopped during step '{name}', which starts or \
                     stops things outside Ferry and is not run twice"
                );
                run::finish(app, &key, job, Err(why)).await?;
            }
            _ => {
                job.resumed += 1;
                job.updated_unix = now_unix();
                app.store.put(trees::JOBS, &key, &job)?;
                app.store.flush().await?;
                tracing::warn!(job = job.id, plan = %job.plan, "resuming a job after a restart");
                tokio::spawn(run::run(app.clone(), key));
            }
        }
    }
    Ok(())
}

/// Whether the points a job held are still in use: while the job runs, and for a test failover
/// while its plan's test runs (its scratch layers exist until cleanup).
fn still_holds(store: &Store, job: &Job) -> Result<bool, StoreError> {
    Ok(job.state == JobState::Running
        || (job.kind == JobKind::TestFailover
            && plan_status(store, &job.tenant, &job.plan)?.phase == PlanPhase::TestRunning))
}

/// At start-up, before jobs resume: release the holds of jobs that no longer use their points
/// (the server stopped between ending a job and releasing them), and report holds that name a
/// job this server does not know (an operator lists them with `ferry holds` and releases them
/// with `ferry release-hold`). Other holders are not ours and are left alone.
pub async fn reconcile_holds(app: &Shared) -> Result<(), String> {
    // Where holds are kept: this server's site, or each tenant's master target.
    let mut sites: Vec<(orders::Target, Option<String>)> = Vec::new();
    if app.jobs.local.is_some() {
        sites.push((orders::Target::Local, None));
    } else {
        let all: Vec<ferry_api::Appliance> = app
            .store
            .list(trees::APPLIANCES, "")
            .map_err(|e| e.to_string())?;
        for a in all {
            if let (ferry_api::ApplianceRole::MasterTarget, Some(t)) = (a.role, a.tenant) {
                let target = orders::Target::Role {
                    appliance: a.name,
                    role: a.role,
                };
                sites.push((target, Some(t)));
            }
        }
    }
    for (target, tenant) in sites {
        reconcile_site(app, &target, tenant.as_deref()).await?;
    }
    app.store.flush().await.map_err(|e| e.to_string())
}

async fn reconcile_site(
    app: &Shared,
    target: &orders::Target,
    only: Option<&str>,
) -> Result<(), String> {
    let t = only.unwrap_or_default();
    let holds = match orders::run(app, target, t, None, None, "holds", SiteStep::Holds).await? {
        SiteAnswer::Holds { holds } => holds,
        other => return Err(format!("listing holds: unexpected answer {other:?}")),
    };
    for h in holds {
        let Some((tenant, id)) = holder_job(&h.holder) else {
            continue;
        };
        if only.is_some_and(|t| t != tenant) {
            continue;
        }
        let job: Option<Job> = app
            .store
            .get(trees::JOBS, &job_key(tenant, id))
            .map_err(|e| e.to_string())?;
        match job {
            None => {
                let message = format!(
                    "recovery points are held by job {id} of tenant {tenant}, which this \
                     configuration server does not know ({}); release them with \
                     `ferry release-hold --holder {}` when nothing uses them",
                    h.reason, h.holder
                );
                tracing::warn!(holder = %h.holder, "{message}");
                app.store
                    .append(trees::EVENTS, |seq| Event {
                        seq,
                        at_unix: now_unix(),
                        severity: Severity::Warning,
                        tenant: Some(tenant.to_string()),
                        subject: format!("holds/{}", h.holder),
                        message,
                        active: false,
                    })
                    .map_err(|e| e.to_string())?;
            }
            Some(j) if still_holds(&app.store, &j).map_err(|e| e.to_string())? => {}
            Some(j) => {
                let release = SiteStep::Release {
                    holders: vec![h.holder.clone()],
                };
                orders::run(app, target, tenant, None, None, "release-points", release).await?;
                tracing::info!(holder = %h.holder, job = j.id, "released the points of an ended job");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::{PlanMachine, PriorityGroup};

    fn pm(m: &str, o: u32) -> PlanMachine {
        PlanMachine {
            machine: m.into(),
            boot_order: o,
            start: None,
        }
    }

    #[test]
    fn steps_follow_priority_groups_and_boot_order() {
        let plan = Plan {
            name: "dr".into(),
            groups: vec![
                PriorityGroup {
                    priority: 2,
                    machines: vec![pm("app", 2), pm("web", 1)],
                },
                PriorityGroup {
                    priority: 1,
                    machines: vec![pm("db", 1)],
                },
            ],
            pre_hooks: vec![],
            post_hooks: vec![],
            networks: Default::default(),
        };
        let names = |k| {
            steps(k, &plan)
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(JobKind::TestFailover),
            [
                "pre-hooks",
                "points",
                "scratch db",
                "start db",
                "scratch web",
                "start web",
                "scratch app",
                "start app",
                "post-hooks"
            ]
        );
        assert_eq!(
            names(JobKind::Failback),
            [
                "pre-hooks",
                "resync db",
                "resync web",
                "resync app",
                "protect db",
                "protect web",
                "protect app",
                "start db",
                "start web",
                "start app",
                "post-hooks"
            ]
        );
        assert!(names(JobKind::PlannedFailover)[1..4] == ["drain db", "drain web", "drain app"]);
        // What starts or stops things outside Ferry never runs twice.
        assert!(!retry_safe("start db") && !retry_safe("pre-hooks") && !retry_safe("post-hooks"));
        assert!(retry_safe("drain db") && retry_safe("resync db") && retry_safe("scratch db"));
        assert!(retry_safe("protect db"));
        assert!(retry_safe("release-points"));
        assert_eq!(
            names(JobKind::Cleanup),
            ["stop-exports", "discard-scratch", "release-points"]
        );
    }

    #[test]
    fn holders_name_their_job() {
        let h = holder("acme-2", 17);
        assert_eq!(h, "job.acme-2.17");
        assert_eq!(holder_job(&h), Some(("acme-2", 17)));
        for other in [
            "job.acme",
            "job..1",
            "job.acme.x1",
            "test.acme.1",
            "job.acme.1.2",
        ] {
            assert_eq!(holder_job(other), None, "{other}");
        }
    }
}
