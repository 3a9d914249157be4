//! Executing a job's steps, one at a time, recording each before and after it runs.

use super::{holder, holder_job, job_key, plan_disks, plan_key, plan_status, Runtime};
use crate::app::{now_unix, Shared};
use crate::store::{trees, StoreError};
use ferry_api::{DiskOutcome, Event, Job, JobKind, JobState, Plan, PlanPhase, Severity, StepState};
use ferry_failover::{drain, hooks, live, points, resync, scratch, Site};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

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
        let r = step(app, key, &mut job, i).await;
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
    app.store.flush().await?;
    tracing::info!(job = job.id, state = ?job.state, error = ?job.error, "job ended");
    // A failover has read its points by now (or failed and may be run again, choosing again).
    // A test failover's points stay held while its scratch layers exist: cleanup releases them.
    // Should this fail, the next start-up releases them (see `super::reconcile_holds`).
    if job.kind != JobKind::TestFailover {
        if let Some(site) = app.jobs.site.clone() {
            let h = holder(&job.tenant, job.id);
            match blocking(move || points::release(&site, &h)).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(job = job.id, error = %e, "cannot release the job's points")
                }
            }
        }
    }
    Ok(())
}

/// Release the points held by the test failovers of a plan; the holders released.
pub async fn release_test_holds(
    app: &Shared,
    site: &Site,
    tenant: &str,
    plan: &str,
) -> Result<Vec<String>, String> {
    let s = site.clone();
    let all = blocking(move || points::holds(&s)).await?;
    let mut out = Vec::new();
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
            let (s, holder) = (site.clone(), h.holder.clone());
            blocking(move || points::release(&s, &holder)).await?;
            out.push(h.holder);
        }
    }
    Ok(out)
}

fn site(rt: &Runtime) -> Result<Site, String> {
    rt.site
        .clone()
        .ok_or_else(|| "this configuration server drives no recovery site".to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ferry_failover::Result<T> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the step's worker died: {e}")),
    }
}

/// Serve a test failover's points over NBD again (after a restart, or when `points` runs).
pub async fn serve_test(
    app: &Shared,
    plan_key: &str,
    disks: &[DiskOutcome],
    port: u16,
) -> Result<u16, String> {
    let site = site(&app.jobs)?;
    let served: Vec<scratch::Served> = disks
        .iter()
        .filter_map(|d| {
            Some(scratch::Served {
                export: scratch::export_name(&d.machine, &d.disk),
                disk: d.disk.clone(),
                seq: d.point_seq?,
            })
        })
        .collect();
    app.jobs.stop_server(plan_key);
    let (port, task) = scratch::serve(&site, &served, port)
        .await
        .map_err(|e| e.to_string())?;
    app.jobs.set_server(plan_key, task);
    Ok(port)
}

/// Execute step `i` of `job`; the answer is the step's detail.
async fn step(app: &Shared, key: &str, job: &mut Job, i: usize) -> Result<String, String> {
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
    let site = site(&app.jobs)?;
    let pkey = plan_key(&job.tenant, &job.plan);
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
                out.push(blocking(move || hooks::run(&argv, &env, t)).await?);
                job.steps[i].done += 1;
            }
            Ok(format!("{} hooks ran {}", hs.len(), out.join(" | "))
                .trim()
                .to_string())
        }
        ("points", _) => {
            let machines = plan_disks(&app.store, &job.tenant, &plan).map_err(|e| e.message)?;
            // Each machine's disks are one consistency group: they get points of one cut.
            let names: Vec<Vec<String>> = machines
                .iter()
                .map(|(_, ds)| ds.iter().map(|d| d.name.clone()).collect())
                .collect();
            // Held from before anything serves or reads them until the job (a test: its
            // cleanup) releases them, so retention at the master target cannot take them.
            let (s, holder, reason, at) = (
                site.clone(),
                holder(&job.tenant, job.id),
                format!(
                    "{} job {} of plan {} (tenant {})",
                    job.kind.as_str(),
                    job.id,
                    job.plan,
                    job.tenant
                ),
                job.point_unix,
            );
            let held =
                blocking(move || points::choose_and_hold(&s, &holder, &reason, &names, at)).await?;
            job.disks.clear();
            let mut chosen = Vec::new();
            let mut torn = Vec::new();
            for ((m, disks), mp) in machines.iter().zip(held) {
                if !mp.consistent {
                    tracing::warn!(machine = %m.name, "the machine's disks have no cut in common: each disk's newest point, not crash-consistent across its disks");
                    torn.push(m.name.clone());
                }
                let mut mpoints = mp.points.into_iter();
                for d in disks {
                    let p = mpoints.next().ok_or("a disk without a chosen point")?;
                    let path = if job.kind == JobKind::TestFailover {
                        site.scratch_path(&job.tenant, &job.plan, &m.name, &d.name)
                    } else {
                        site.live_path(&job.tenant, &job.plan, &m.name, &d.name)
                    };
                    chosen.push(format!("{}/{}@{}", m.name, d.name, p.meta.seq));
                    job.disks.push(DiskOutcome {
                        machine: m.name.clone(),
                        disk: d.name.clone(),
                        point_seq: Some(p.meta.seq),
                        point_created_unix_ns: Some(p.meta.created_unix_ns),
                        path: path.display().to_string(),
                        resync: None,
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
            if job.kind == JobKind::TestFailover {
                let _w = app.write.lock().await;
                let mut st =
                    plan_status(&app.store, &job.tenant, &job.plan).map_err(|e| e.to_string())?;
                let port =
                    serve_test(app, &pkey, &job.disks, st.test_nbd_port.unwrap_or(0)).await?;
                st.test_nbd_port = Some(port);
                st.disks = job.disks.clone();
                app.store
                    .put(trees::PLAN_STATUS, &pkey, &st)
                    .map_err(|e| e.to_string())?;
                return Ok(format!(
                    "{}, held; served read-only at nbd://127.0.0.1:{port}",
                    chosen.join(", ")
                ));
            }
            Ok(format!("{}, held", chosen.join(", ")))
        }
        ("scratch", Some(m)) => {
            let port = plan_status(&app.store, &job.tenant, &job.plan)
                .map_err(|e| e.to_string())?
                .test_nbd_port
                .ok_or("the test's instant-access server has no port")?;
            let repo = site.repository().map_err(|e| e.to_string())?;
            let mine = machine_disks(job, &m);
            job.steps[i].total = mine.len() as u64;
            for d in &mine {
                let seq = d.point_seq.ok_or("a scratch disk without a point")?;
                let size = repo
                    .points(&d.disk)
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .find(|p| p.meta.seq == seq)
                    .map(|p| p.meta.disk_size)
                    .ok_or_else(|| format!("point {seq} of disk {} is gone", d.disk))?;
                let (path, uri) = (
                    std::path::PathBuf::from(&d.path),
                    scratch::uri(port, &scratch::export_name(m.as_str(), &d.disk)),
                );
                blocking(move || scratch::create_overlay(&path, &uri, size)).await?;
                job.steps[i].done += 1;
            }
            Ok(format!("{} copy-on-write overlays", mine.len()))
        }
        ("live", Some(m)) => {
            let mine = machine_disks(job, &m);
            job.steps[i].total = mine.len() as u64;
            for d in &mine {
                let seq = d.point_seq.ok_or("a live disk without a point")?;
                let (s, disk, path) = (
                    site.clone(),
                    d.disk.clone(),
                    std::path::PathBuf::from(&d.path),
                );
                blocking(move || live::materialize(&s, &disk, seq, &path)).await?;
                job.steps[i].done += 1;
            }
            Ok(format!("{} disks live", mine.len()))
        }
        ("drain", Some(m)) => {
            let cache = site
                .process_cache
                .clone()
                .ok_or("a planned failover checks the journal drained: start the configuration server with --process-cache")?;
            let machines = plan_disks(&app.store, &job.tenant, &plan).map_err(|e| e.message)?;
            let disks: Vec<String> = machines
                .iter()
                .filter(|(mm, _)| mm.name == m)
                .flat_map(|(_, ds)| ds.iter().map(|d| d.name.clone()))
                .collect();
            job.steps[i].total = disks.len() as u64;
            let since = ferry_process_server::status::now_unix_ns();
            let mut out = Vec::new();
            for d in disks {
                let c = cache.clone();
                let dd = d.clone();
                let s = blocking(move || drain::wait(&c, &dd, since, DRAIN_TIMEOUT)).await?;
                out.push(format!(
                    "{d}: journal {} at the recovery site",
                    s.acked_journal_seq
                ));
                job.steps[i].done += 1;
            }
            Ok(out.join(", "))
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
            let out = blocking(move || hooks::run(&argv, &env, t)).await?;
            job.steps[i].done = 1;
            Ok(format!("started {out}").trim().to_string())
        }
        ("resync", Some(m)) => {
            let st = plan_status(&app.store, &job.tenant, &job.plan).map_err(|e| e.to_string())?;
            let machines = plan_disks(&app.store, &job.tenant, &plan).map_err(|e| e.message)?;
            let disks: Vec<ferry_api::Disk> = machines
                .into_iter()
                .filter(|(mm, _)| mm.name == m)
                .flat_map(|(_, ds)| ds)
                .collect();
            let total: u64 = disks.iter().map(|d| d.size_bytes).sum();
            job.steps[i].total = total;
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
                let target = d.source.clone();
                let scratch_dir = site
                    .plan_dir(&job.tenant, &job.plan)
                    .join("resync")
                    .join(format!("{m}.{}", d.name));
                let (store, jkey, base, s) = (
                    app.store.clone(),
                    key.to_string(),
                    job.steps[i].done,
                    site.clone(),
                );
                let (src, dst) = (live.clone(), target.clone());
                let report = blocking(move || {
                    let k = s.key()?;
                    let mut last = Instant::now();
                    let mut progress = |done: u64, _total: u64| {
                        if last.elapsed() >= Duration::from_secs(1) {
                            last = Instant::now();
                            if let Ok(Some(mut j)) = store.get::<Job>(trees::JOBS, &jkey) {
                                j.steps[i].done = base + done;
                                let _ = store.put(trees::JOBS, &jkey, &j);
                            }
                        }
                    };
                    resync::run(
                        std::path::Path::new(&src),
                        std::path::Path::new(&dst),
                        &k,
                        &scratch_dir,
                        &mut progress,
                    )
                })
                .await?;
                job.steps[i].done += d.size_bytes;
                sent += report.bytes_sent;
                job.disks.push(DiskOutcome {
                    machine: m.clone(),
                    disk: d.name.clone(),
                    point_seq: None,
                    point_created_unix_ns: None,
                    // After failback the machine runs on its original disk again.
                    path: if job.kind == JobKind::Failback {
                        target
                    } else {
                        live
                    },
                    resync: Some(report),
                });
            }
            Ok(format!(
                "sent {sent} bytes of {total} (only blocks whose names differ)"
            ))
        }
        ("commit", _) => {
            job.disks = plan_status(&app.store, &job.tenant, &job.plan)
                .map_err(|e| e.to_string())?
                .disks;
            Ok("the recovery site's disks are the machines' disks now".into())
        }
        ("stop-exports", _) => Ok(if app.jobs.stop_server(&pkey) {
            "stopped the instant-access server".into()
        } else {
            "no instant-access server was running".into()
        }),
        ("discard-scratch", _) => {
            let dir = site.plan_dir(&job.tenant, &job.plan).join("test");
            let n = blocking(move || scratch::discard(&dir)).await?;
            Ok(format!("removed {n} scratch files"))
        }
        ("release-points", _) => {
            // Nothing serves or names the test's points any more: retention may take them.
            let released = release_test_holds(app, &site, &job.tenant, &job.plan).await?;
            Ok(if released.is_empty() {
                "no points were held".into()
            } else {
                format!("released the points held by {}", released.join(", "))
            })
        }
        _ => Err(format!("unknown step {name}")),
    }
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
