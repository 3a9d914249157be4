//! Executing a job's steps, one at a time, recording each before and after it runs.

use super::orders::{self, Target};
use super::{holder, holder_job, job_key, plan_disks, plan_key, plan_status};
use crate::app::{now_unix, Shared};
use crate::store::{trees, StoreError};
use ferry_api::{
    DiskAt, DiskOutcome, Event, Job, JobKind, JobState, MachineDisks, Plan, PlanPhase, Severity,
    SiteAnswer, SiteStep, StepState,
};
use ferry_failover::hooks;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long a planned failover waits for a disk's journal to drain.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Run the job stored under `key` from its first unfinished step to its end.
pub async fn run(app: Shared, key: String) {
    if let Err(e) = run_steps(&app, &key).await {
        tracing::error!(job = %key, error = %e, "a job's record cannot be written");
    }
}

async fn run_steps(app: &Shared, key: &str) -> Result<(), StoreError> {
    loop {
        let Some(mut job) = app.store.get::<Job>(trees::JOBS, key)? else {
            return Ok(());
        };
        if job.state != JobState::Running {
            return Ok(());
        }
        let Some(i) = job.steps.iter().position(|s| s.state != StepState::Done) else {
            return finish(app, key, job, Ok(())).await;
        };
        job.steps[i].state = StepState::Running;
        job.steps[i].started_unix = Some(now_unix());
        job.updated_unix = now_unix();
        app.store.put(trees::JOBS, key, &job)?;
        app.store.flush().await?;
        let name = job.steps[i].name.clone();
        tracing::info!(job = job.id, plan = %job.plan, step = %name, "job step");
        let r = step(app, &mut job, i).await;
        job.steps[i].ended_unix = Some(now_unix());
        job.updated_unix = now_unix();
        match r {
            Ok(detail) => {
                job.steps[i].state = StepState::Done;
                job.steps[i].detail = detail;
                app.store.put(trees::JOBS, key, &job)?;
                app.store.flush().await?;
            }
            Err(e) => {
                job.steps[i].state = StepState::Failed;
                job.steps[i].detail = e.clone();
                return finish(app, key, job, Err(format!("step '{name}' failed: {e}"))).await;
            }
        }
    }
}

/// End a job: its state, its plan's phase, an event.
pub async fn finish(
    app: &Shared,
    key: &str,
    mut job: Job,
    result: Result<(), String>,
) -> Result<(), StoreError> {
    // A failover has read its points by now (or failed and may be run again, choosing again).
    // A test failover's points stay held while its scratch layers exist: cleanup releases them.
    // Released before the job is said to end, so that an ended failover holds nothing; should
    // this fail, the next start-up releases them (see `super::reconcile_holds`). Only a job
    // that chose points holds any.
    let held = job.steps.iter().any(|s| s.name == "points");
    if held && job.kind != JobKind::TestFailover {
        let release = SiteStep::Release {
            holders: vec![holder(&job.tenant, job.id)],
        };
        let r = match orders::master_target(app, &job.tenant) {
            Ok(t) => orders::run(app, &t, &job.tenant, None, None, "release", release).await,
            Err(e) => Err(e),
        };
        if let Err(e) = r {
            tracing::warn!(job = job.id, error = %e, "cannot release the job's points");
        }
    }
    let _w = app.write.lock().await;
    let mut st = plan_status(&app.store, &job.tenant, &job.plan)?;
    st.running_job = None;
    st.last_job = Some(job.id);
    let (_, to) = job.kind.transition();
    match &result {
        Ok(()) => {
            job.state = JobState::Succeeded;
            st.phase = to;
            match job.kind {
                JobKind::Cleanup => {
                    st.disks.clear();
                    st.test_nbd_port = None;
                }
                JobKind::Commit => {}
                _ => st.disks = job.disks.clone(),
            }
        }
        Err(why) => {
            job.state = JobState::Failed;
            let done: Vec<&str> = job
                .steps
                .iter()
                .filter(|s| s.state == StepState::Done)
                .map(|s| s.name.as_str())
                .collect();
            let hint = match job.kind {
                // Whatever scratch layers were made stay until cleanup discards them.
                JobKind::TestFailover => {
                    st.phase = PlanPhase::TestRunning;
                    st.disks = job.disks.clone();
                    " The plan is test-running: run cleanup to discard what was made."
                }
                _ => " The plan keeps its phase; the job can be run again.",
            };
            job.error = Some(format!(
                "{why}. Steps done: {}.{hint}",
                if done.is_empty() {
                    "none".to_string()
                } else {
                    done.join(", ")
                }
            ));
        }
    }
    job.updated_unix = now_unix();
    app.store.put(trees::JOBS, key, &job)?;
    app.store
        .put(trees::PLAN_STATUS, &plan_key(&job.tenant, &job.plan), &st)?;
    app.store.append(trees::EVENTS, |seq| Event {
        seq,
        at_unix: now_unix(),
        severity: if result.is_ok() {
            Severity::Info
        } else {
            Severity::Warning
        },
        tenant: Some(job.tenant.clone()),
        subject: format!("plans/{}", job.plan),
        message: match &job.error {
            None => format!("job {} ({}) succeeded", job.id, job.kind.as_str()),
            Some(e) => format!("job {} ({}) failed: {e}", job.id, job.kind.as_str()),
        },
        active: false,
    })?;
    orders::forget_job(app, &job.tenant, job.id)?;
    app.store.flush().await?;
    tracing::info!(job = job.id, state = ?job.state, error = ?job.error, "job ended");
    Ok(())
}

/// Release the points held by the test failovers of a plan; the holders released.
pub async fn release_test_holds(
    app: &Shared,
    target: &Target,
    key: Option<String>,
    tenant: &str,
    plan: &str,
) -> Result<Vec<String>, String> {
    let all = match orders::run(app, target, tenant, None, None, "holds", SiteStep::Holds).await? {
        SiteAnswer::Holds { holds } => holds,
        other => return Err(unexpected(other)),
    };
    let mut mine = Vec::new();
    for h in all {
        let Some((t, id)) = holder_job(&h.holder) else {
            continue;
        };
        if t != tenant {
            continue;
        }
        let job: Option<Job> = app
            .store
            .get(trees::JOBS, &job_key(t, id))
            .map_err(|e| e.to_string())?;
        if job.is_some_and(|j| j.plan == plan && j.kind == JobKind::TestFailover) {
            mine.push(h.holder);
        }
    }
    if mine.is_empty() {
        return Ok(mine);
    }
    let step = SiteStep::Release { holders: mine };
    match orders::run(app, target, tenant, None, key, "release-points", step).await? {
        SiteAnswer::Released { holders } => Ok(holders),
        other => Err(unexpected(other)),
    }
}

fn unexpected(a: SiteAnswer) -> String {
    format!("the role answered something else than asked: {a:?}")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ferry_failover::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the step's worker died: {e}")),
    }
}

/// Serve a test failover's points over NBD again (after a restart, or when `points` runs), at
/// the master target (or here, beside the site). `key`: the job step's order key.
pub async fn serve_test(
    app: &Shared,
    plan_key: &str,
    disks: &[DiskOutcome],
    port: u16,
    key: Option<String>,
) -> Result<u16, String> {
    let (tenant, plan) = plan_key
        .split_once('/')
        .ok_or_else(|| format!("{plan_key} names no plan"))?;
    let target = orders::master_target(app, tenant)?;
    let step = SiteStep::Serve {
        tenant: tenant.to_string(),
        plan: plan.to_string(),
        disks: disks
            .iter()
            .filter_map(|d| {
                Some(DiskAt {
                    machine: d.machine.clone(),
                    disk: d.disk.clone(),
                    seq: d.point_seq?,
                    path: d.path.clone(),
                })
            })
            .collect(),
        port,
    };
    match orders::run(app, &target, tenant, None, key, "serve", step).await? {
        SiteAnswer::Served { port } => Ok(port),
        other => Err(unexpected(other)),
    }
}

/// Execute step `i` of `job`; the answer is the step's detail.
async fn step(app: &Shared, job: &mut Job, i: usize) -> Result<String, String> {
    let name = job.steps[i].name.clone();
    let (what, machine) = match name.split_once(' ') {
        Some((w, m)) => (w, Some(m.to_string())),
        None => (name.as_str(), None),
    };
    let plan: Plan = app
        .store
        .get(trees::PLANS, &plan_key(&job.tenant, &job.plan))
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("plan {} was deleted", job.plan))?;
    let pkey = plan_key(&job.tenant, &job.plan);
    // The same order when this step runs again (a resumed job): `part` tells apart the orders
    // of one step.
    let (jt, jid) = (job.tenant.clone(), job.id);
    let okey = move |part: &str| Some(orders::step_key(&jt, jid, i, part));
    let (tenant, plan_name) = (job.tenant.clone(), job.plan.clone());
    match (what, machine) {
        ("pre-hooks", _) | ("post-hooks", _) => {
            let hs = if what == "pre-hooks" {
                &plan.pre_hooks
            } else {
                &plan.post_hooks
            };
            job.steps[i].total = hs.len() as u64;
            let mut out = Vec::new();
            for h in hs {
                let (argv, env, t) = (
                    h.argv.clone(),
                    hook_env(job, None),
                    Duration::from_secs(h.timeout_secs.into()),
                );
                let confine = app.system.config.hooks_as.clone();
                out.push(blocking(move || hooks::run(&argv, &env, t, &confine)).await?);
                job.steps[i].done += 1;
            }
            Ok(format!("{} hooks ran {}", hs.len(), out.join(" | "))
                .trim()
                .to_string())
        }
        ("points", _) => {
            let target = orders::master_target(app, &tenant)?;
            let machines = plan_disks(&app.store, &tenant, &plan).map_err(|e| e.message)?;
            // Each machine's disks are one consistency group: they get points of one cut.
            // Held from before anything serves or reads them until the job (a test: its
            // cleanup) releases them, so retention at the master target cannot take them.
            let test = job.kind == JobKind::TestFailover;
            let order = SiteStep::ChoosePoints {
                tenant: tenant.clone(),
                plan: plan_name.clone(),
                holder: holder(&tenant, job.id),
                reason: format!(
                    "{} job {} of plan {} (tenant {})",
                    job.kind.as_str(),
                    job.id,
                    plan_name,
                    tenant
                ),
                machines: machines
                    .iter()
                    .map(|(m, ds)| MachineDisks {
                        machine: m.name.clone(),
                        disks: ds.iter().map(|d| d.name.clone()).collect(),
                    })
                    .collect(),
                at_unix: job.point_unix,
                test,
            };
            let chosen_machines = match orders::run(
                app,
                &target,
                &tenant,
                Some(job.id),
                okey("choose"),
                &name,
                order,
            )
            .await?
            {
                SiteAnswer::Points { machines } => machines,
                other => return Err(unexpected(other)),
            };
            job.disks.clear();
            let mut chosen = Vec::new();
            let mut torn = Vec::new();
            for m in chosen_machines {
                if !m.consistent {
                    tracing::warn!(machine = %m.machine, "the machine's disks have no cut in common: each disk's newest point, not crash-consistent across its disks");
                    torn.push(m.machine.clone());
                }
                for d in m.disks {
                    chosen.push(format!("{}/{}@{}", m.machine, d.disk, d.seq));
                    job.disks.push(DiskOutcome {
                        machine: m.machine.clone(),
                        disk: d.disk,
                        point_seq: Some(d.seq),
                        point_created_unix_ns: Some(d.created_unix_ns),
                        path: d.path,
                        resync: None,
                        protect: None,
                    });
                }
            }
            job.steps[i].total = job.disks.len() as u64;
            job.steps[i].done = job.disks.len() as u64;
            if !torn.is_empty() {
                chosen.push(format!(
                    "NOT crash-consistent across the disks of {} (no cut they all have: each disk's newest point)",
                    torn.join(", ")
                ));
            }
            if test {
                let old_port = plan_status(&app.store, &tenant, &plan_name)
                    .map_err(|e| e.to_string())?
                    .test_nbd_port;
                let port = serve_test(app, &pkey, &job.disks, old_port.unwrap_or(0), okey("serve"))
                    .await?;
                let _w = app.write.lock().await;
                let mut st =
                    plan_status(&app.store, &tenant, &plan_name).map_err(|e| e.to_string())?;
                st.test_nbd_port = Some(port);
                st.disks = job.disks.clone();
                app.store
                    .put(trees::PLAN_STATUS, &pkey, &st)
                    .map_err(|e| e.to_string())?;
                let at = match &target {
                    Target::Local => String::new(),
                    Target::Role { appliance, .. } => format!(" at master target {appliance}"),
                };
                return Ok(format!(
                    "{}, held; served read-only at nbd://127.0.0.1:{port}{at}",
                    chosen.join(", ")
                ));
            }
            Ok(format!("{}, held", chosen.join(", ")))
        }
        ("scratch", Some(m)) | ("live", Some(m)) => {
            let target = orders::master_target(app, &tenant)?;
            let disks: Vec<DiskAt> = machine_disks(job, &m)
                .into_iter()
                .map(|d| {
                    Ok(DiskAt {
                        machine: d.machine,
                        seq: d
                            .point_seq
                            .ok_or_else(|| format!("disk {} has no point", d.disk))?,
                        disk: d.disk,
                        path: d.path,
                    })
                })
                .collect::<Result<_, String>>()?;
            job.steps[i].total = disks.len() as u64;
            let order = if what == "scratch" {
                let port = plan_status(&app.store, &tenant, &plan_name)
                    .map_err(|e| e.to_string())?
                    .test_nbd_port
                    .ok_or("the test's instant-access server has no port")?;
                SiteStep::Scratch { port, disks }
            } else {
                SiteStep::Live { disks }
            };
            let n = match orders::run(
                app,
                &target,
                &tenant,
                Some(job.id),
                okey(what),
                &name,
                order,
            )
            .await?
            {
                SiteAnswer::Count { n } => n,
                other => return Err(unexpected(other)),
            };
            job.steps[i].done = n;
            Ok(if what == "scratch" {
                format!("{n} copy-on-write overlays")
            } else {
                format!("{n} disks live")
            })
        }
        ("drain", Some(m)) => {
            let target = orders::process_server(app, &tenant, &m)?;
            let machines = plan_disks(&app.store, &tenant, &plan).map_err(|e| e.message)?;
            let disks: Vec<String> = machines
                .iter()
                .filter(|(mm, _)| mm.name == m)
                .flat_map(|(_, ds)| ds.iter().map(|d| d.name.clone()))
                .collect();
            job.steps[i].total = disks.len() as u64;
            if matches!(target, Target::Local)
                && app
                    .jobs
                    .local
                    .as_ref()
                    .is_some_and(|a| a.process_cache.is_none())
            {
                return Err("a planned failover checks the journal drained: start the configuration server with --process-cache".into());
            }
            let order = SiteStep::Drain {
                disks,
                timeout_secs: DRAIN_TIMEOUT.as_secs(),
            };
            let drained = match orders::run(
                app,
                &target,
                &tenant,
                Some(job.id),
                okey("drain"),
                &name,
                order,
            )
            .await?
            {
                SiteAnswer::Drained { disks } => disks,
                other => return Err(unexpected(other)),
            };
            job.steps[i].done = drained.len() as u64;
            Ok(drained
                .iter()
                .map(|(d, seq)| format!("{d}: journal {seq} at the recovery site"))
                .collect::<Vec<_>>()
                .join(", "))
        }
        ("start", Some(m)) => {
            let pm = plan
                .start_order()
                .find(|p| p.machine == m)
                .ok_or_else(|| format!("machine {m} left the plan"))?;
            let Some(h) = &pm.start else {
                return Ok("no start command".into());
            };
            // The disks as this job left them: scratch overlays, live disks, or (failback)
            // the original disks.
            let mut vars = BTreeMap::new();
            for d in job.disks.iter().filter(|d| d.machine == m) {
                vars.insert(format!("disk:{}", d.disk), d.path.clone());
            }
            let (site_name, maps) = match job.kind {
                JobKind::TestFailover => ("test", &plan.networks.test),
                JobKind::Failback => ("protected", &plan.networks.real),
                _ => ("recovery", &plan.networks.real),
            };
            for n in maps {
                vars.insert(format!("network:{}", n.source), n.target.clone());
            }
            vars.insert("machine".into(), m.clone());
            vars.insert("site".into(), site_name.into());
            let argv = hooks::expand(&h.argv, &vars).map_err(|e| e.to_string())?;
            let (env, t) = (
                hook_env(job, Some(&m)),
                Duration::from_secs(h.timeout_secs.into()),
            );
            job.steps[i].total = 1;
            let confine = app.system.config.hooks_as.clone();
            let out = blocking(move || hooks::run(&argv, &env, t, &confine)).await?;
            job.steps[i].done = 1;
            Ok(format!("started {out}").trim().to_string())
        }
        ("resync", Some(m)) => {
            // Run beside the original disks, by the machine's process server, which asks the
            // master target for the live disks' block names and the blocks that differ.
            let target = orders::process_server(app, &tenant, &m)?;
            let st = plan_status(&app.store, &tenant, &plan_name).map_err(|e| e.to_string())?;
            let (disks, total) = machine_step_disks(app, job, i, &plan, &m)?;
            let mut sent = 0;
            job.disks.retain(|d| d.machine != m);
            for d in disks {
                let live = st
                    .disks
                    .iter()
                    .find(|o| o.machine == m && o.disk == d.name)
                    .map(|o| o.path.clone())
                    .ok_or_else(|| {
                        format!("disk {} has no live disk at the recovery site", d.name)
                    })?;
                let target_disk = d.source.clone();
                let order = SiteStep::Resync {
                    tenant: tenant.clone(),
                    plan: plan_name.clone(),
                    machine: m.clone(),
                    disk: d.name.clone(),
                    live: live.clone(),
                    target: target_disk.clone(),
                };
                let key = okey(&format!("resync-{}", d.name));
                let report = match order_disk(app, job, i, &target, key, &d, order).await? {
                    SiteAnswer::Resync { report } => report,
                    other => return Err(unexpected(other)),
                };
                sent += report.bytes_sent;
                job.disks.push(DiskOutcome {
                    machine: m.clone(),
                    disk: d.name.clone(),
                    point_seq: None,
                    point_created_unix_ns: None,
                    // After failback the machine runs on its original disk again.
                    path: if job.kind == JobKind::Failback {
                        target_disk
                    } else {
                        live
                    },
                    resync: Some(report),
                    protect: None,
                });
            }
            Ok(format!(
                "sent {sent} bytes of {total} (only blocks whose names differ)"
            ))
        }
        ("protect", Some(m)) => {
            // Failback's original disks protected again towards the recovery site: the
            // machine's process server drops each disk's pre-failover journal and brings the
            // recovery site up to date by its checksum resync, committing a new point.
            let target = orders::process_server(app, &tenant, &m)?;
            let (disks, total) = machine_step_disks(app, job, i, &plan, &m)?;
            let (mut sent, mut points) = (0, Vec::new());
            for d in disks {
                let order = SiteStep::Protect {
                    tenant: tenant.clone(),
                    plan: plan_name.clone(),
                    machine: m.clone(),
                    disk: d.name.clone(),
                    source: d.source.clone(),
                };
                let key = okey(&format!("protect-{}", d.name));
                let (report, seq) = match order_disk(app, job, i, &target, key, &d, order).await? {
                    SiteAnswer::Protected { report, point_seq } => (report, point_seq),
                    other => return Err(unexpected(other)),
                };
                sent += report.bytes_sent;
                points.push(format!("{}@{seq}", d.name));
                match job
                    .disks
                    .iter_mut()
                    .find(|o| o.machine == m && o.disk == d.name)
                {
                    Some(o) => {
                        o.point_seq = Some(seq);
                        o.protect = Some(report);
                    }
                    None => job.disks.push(DiskOutcome {
                        machine: m.clone(),
                        disk: d.name.clone(),
                        point_seq: Some(seq),
                        point_created_unix_ns: None,
                        path: d.source.clone(),
                        resync: None,
                        protect: Some(report),
                    }),
                }
            }
            Ok(format!(
                "protected again: sent {sent} bytes for {total} bytes of disks to the recovery \
                 site (only blocks whose names differ), new points {}",
                points.join(", ")
            ))
        }
        ("commit", _) => {
            job.disks = plan_status(&app.store, &tenant, &plan_name)
                .map_err(|e| e.to_string())?
                .disks;
            Ok("the recovery site's disks are the machines' disks now".into())
        }
        ("stop-exports", _) => {
            let target = orders::master_target(app, &tenant)?;
            let order = SiteStep::StopServing {
                tenant: tenant.clone(),
                plan: plan_name.clone(),
            };
            match orders::run(
                app,
                &target,
                &tenant,
                Some(job.id),
                okey("stop"),
                &name,
                order,
            )
            .await?
            {
                SiteAnswer::Count { n: 0 } => Ok("no instant-access server was running".into()),
                SiteAnswer::Count { .. } => Ok("stopped the instant-access server".into()),
                other => Err(unexpected(other)),
            }
        }
        ("discard-scratch", _) => {
            let target = orders::master_target(app, &tenant)?;
            let order = SiteStep::DiscardScratch {
                tenant: tenant.clone(),
                plan: plan_name.clone(),
            };
            match orders::run(
                app,
                &target,
                &tenant,
                Some(job.id),
                okey("discard"),
                &name,
                order,
            )
            .await?
            {
                SiteAnswer::Count { n } => Ok(format!("removed {n} scratch files")),
                other => Err(unexpected(other)),
            }
        }
        ("release-points", _) => {
            // Nothing serves or names the test's points any more: retention may take them.
            let target = orders::master_target(app, &tenant)?;
            let released =
                release_test_holds(app, &target, okey("release"), &tenant, &plan_name).await?;
            Ok(if released.is_empty() {
                "no points were held".into()
            } else {
                format!("released the points held by {}", released.join(", "))
            })
        }
        _ => Err(format!("unknown step {name}")),
    }
}

/// The inventory disks of machine `m` for step `i`, whose total is their bytes (recorded at
/// once: nothing of them is done yet), and that total.
fn machine_step_disks(
    app: &Shared,
    job: &mut Job,
    i: usize,
    plan: &Plan,
    m: &str,
) -> Result<(Vec<ferry_api::Disk>, u64), String> {
    let machines = plan_disks(&app.store, &job.tenant, plan).map_err(|e| e.message)?;
    let disks: Vec<ferry_api::Disk> = machines
        .into_iter()
        .filter(|(mm, _)| mm.name == m)
        .flat_map(|(_, ds)| ds)
        .collect();
    let total: u64 = disks.iter().map(|d| d.size_bytes).sum();
    // (A step resumed after a restart starts counting again: its orders answer again.)
    (job.steps[i].done, job.steps[i].total) = (0, total);
    app.store
        .put(trees::JOBS, &job_key(&job.tenant, job.id), &*job)
        .map_err(|e| e.to_string())?;
    Ok((disks, total))
}

/// Send `order` about disk `d` to `target` for step `i` (a step of a machine's disks, counted
/// in bytes) and wait for the answer. While the role reports its progress, the step shows
/// it: `done` moves on from what the machine's disks before this one made it, by the bytes of
/// this disk compared; `detail` names the disk.
#[allow(clippy::too_many_arguments)]
async fn order_disk(
    app: &Shared,
    job: &mut Job,
    i: usize,
    target: &Target,
    key: Option<String>,
    d: &ferry_api::Disk,
    order: SiteStep,
) -> Result<SiteAnswer, String> {
    let (tenant, name) = (job.tenant.clone(), job.steps[i].name.clone());
    let (base, jid) = (job.steps[i].done, job.id);
    let jkey = job_key(&tenant, jid);
    let mut shown = |p: &ferry_api::OrderProgress| {
        job.steps[i].done = base + p.done.min(d.size_bytes);
        job.steps[i].detail = format!("{}: {}", d.name, p.detail);
        job.updated_unix = now_unix();
        if let Err(e) = app.store.put(trees::JOBS, &jkey, &*job) {
            tracing::warn!(job = jid, error = %e, "cannot record a step's progress");
        }
    };
    let answer = orders::run_reporting(
        app,
        target,
        &tenant,
        Some(jid),
        key,
        &name,
        order,
        &mut shown,
    )
    .await?;
    job.steps[i].done = base + d.size_bytes;
    Ok(answer)
}

/// The job's disks of machine `m`.
fn machine_disks(job: &Job, m: &str) -> Vec<DiskOutcome> {
    job.disks
        .iter()
        .filter(|d| d.machine == m)
        .cloned()
        .collect()
}

fn hook_env(job: &Job, machine: Option<&str>) -> Vec<(String, String)> {
    let mut v = vec![
        ("FERRY_JOB_ID".to_string(), job.id.to_string()),
        ("FERRY_JOB_KIND".to_string(), job.kind.as_str().to_string()),
        ("FERRY_TENANT".to_string(), job.tenant.clone()),
        ("FERRY_PLAN".to_string(), job.plan.clone()),
    ];
    if let Some(m) = machine {
        v.push(("FERRY_MACHINE".to_string(), m.to_string()));
    }
    v
}
