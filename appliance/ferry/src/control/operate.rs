//! `ferry ctl` for operating: a tenant's status, protecting machines, recovery points, plans,
//! failover jobs and alerts. Tables and `--json` as in the rest of `ctl`.

use super::{opt, read_json, show, table, when};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_api::{
    ApplianceReport, Disk, DiskOutcome, DiskState, Event, Job, JobKind, JobState, Machine,
    MachineDisk, Plan, PlanStatus, PointInfo, StartJob, StepState, TenantStatus,
};
use ferry_config_server::client::{Client, ClientError, Method};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum OperateCmd {
    /// A tenant at a glance: machines, disks (state, RPO), plans (phase), active alerts.
    Status {
        #[arg(long)]
        tenant: String,
        /// List every disk; by default only those that need attention (not protected, or
        /// with an active alert) are listed, after the counts.
        #[arg(long)]
        all: bool,
    },
    /// Protect a machine: create it (if new) and its disks, NAME=SIZE[,source=IMAGE].
    Protect {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        machine: String,
        #[arg(long)]
        site: String,
        #[arg(long)]
        policy: String,
        /// NAME=SIZE (bytes, K/M/G/T suffixes), with `,source=...` (everything after it: an
        /// image for reprotect, or `qmp=..,node=..,nbd=..[,fleece=..]`, the disk on its host, for
        /// a process server configured by this server, which reprotect also writes through).
        /// Repeatable.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// The process server (an enrolled appliance of the tenant) that protects the machine;
        /// by default the tenant's only one.
        #[arg(long)]
        process_server: Option<String>,
    },
    /// Stop protecting a machine: delete its disks and the machine (refused while a plan
    /// names it).
    Unprotect {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        machine: String,
    },
    /// The recovery points of a machine's disks at the recovery site (`ferry points` reads a
    /// repository directly).
    Points {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        machine: String,
    },
    /// Show a recovery plan and where it stands, or create or replace it from a JSON file.
    Plan {
        #[arg(long)]
        tenant: String,
        name: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Fail a plan over: a test beside replication, a planned one (nothing lost), or an
    /// unplanned one (the source is gone).
    Failover {
        #[command(flatten)]
        job: JobArgs,
        #[arg(long, group = "how", required = true)]
        test: bool,
        #[arg(long, group = "how")]
        planned: bool,
        #[arg(long, group = "how")]
        unplanned: bool,
        /// The newest point at or before this time (RFC 3339 or Unix seconds); default latest.
        #[arg(long, conflicts_with = "planned")]
        point: Option<String>,
    },
    /// Discard a test failover's scratch layers.
    Cleanup {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Accept a failover.
    Commit {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Bring the original site's disks up to date from the recovery site (checksum resync).
    Reprotect {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Fail back to the original site (a planned failover back).
    Failback {
        #[command(flatten)]
        job: JobArgs,
    },
    /// A tenant's jobs, or one job's steps.
    Jobs {
        #[arg(long)]
        tenant: String,
        id: Option<u64>,
    },
    /// Active alerts: RPO over threshold, cache free below 30%/20%, upload backlog over 30
    /// minutes, an appliance unreachable.
    Alerts,
    /// Report this appliance's cache and backlog (what a process server sends).
    Report {
        /// The appliance's name (an appliance may report only for itself).
        name: String,
        /// Free fraction of the cache, 0 to 1.
        #[arg(long)]
        cache_free: Option<f64>,
        #[arg(long)]
        backlog_secs: Option<f64>,
    },
}

#[derive(Args)]
pub struct JobArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    plan: String,
    /// Wait for the job to end and show its steps (a failed job exits non-zero).
    #[arg(long)]
    wait: bool,
}

/// `--point`: RFC 3339 or Unix seconds.
fn parse_time(s: &str) -> anyhow::Result<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("--point {s:?} is neither RFC 3339 nor Unix seconds"))?;
    u64::try_from(t.unix_timestamp()).with_context(|| format!("--point {s:?} is before 1970"))
}

fn job_table(j: &Job) {
    println!(
        "job {} {} on plan {}: {}{}",
        j.id,
        j.kind.as_str(),
        j.plan,
        format!("{:?}", j.state).to_lowercase(),
        if j.resumed > 0 {
            format!(" (resumed {} times)", j.resumed)
        } else {
            String::new()
        }
    );
    table(
        &["step", "state", "progress", "detail"],
        j.steps
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    format!("{:?}", s.state).to_lowercase(),
                    if s.total > 0 {
                        format!("{}/{}", s.done, s.total)
                    } else {
                        "-".into()
                    },
                    s.detail.clone(),
                ]
            })
            .collect(),
    );
    for d in &j.disks {
        if let Some(r) = &d.resync {
            let again = if r.reconnects > 0 {
                format!(", {} attempts to reconnect", r.reconnects)
            } else {
                String::new()
            };
            println!(
                "{}/{}: sent {} of {} bytes ({} of {} blocks differed), {} bytes of block names{again}",
                d.machine,
                d.disk,
                r.bytes_sent,
                r.disk_bytes,
                r.blocks_sent,
                r.blocks_compared,
                r.hash_bytes
            );
        }
    }
    if let Some(e) = &j.error {
        println!("error: {e}");
    }
}

async fn start_job(
    c: &Client,
    json: bool,
    a: &JobArgs,
    kind: JobKind,
    point_unix: Option<u64>,
) -> anyhow::Result<()> {
    let req = StartJob { kind, point_unix };
    let mut j: Job = c
        .call(
            Method::POST,
            &format!("/v1/tenants/{}/plans/{}/jobs", a.tenant, a.plan),
            Some(&req),
        )
        .await?;
    if a.wait {
        while j.state == JobState::Running {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            j = c
                .get(&format!("/v1/tenants/{}/jobs/{}", a.tenant, j.id))
                .await?;
        }
    }
    show(json, &j, job_table)?;
    if j.state == JobState::Failed {
        bail!("job {} failed", j.id);
    }
    Ok(())
}

/// A tenant's status in one request; from a server older than that route, in a request per
/// machine and per plan.
async fn tenant_status(c: &Client, tenant: &str) -> anyhow::Result<TenantStatus> {
    match c.get(&format!("/v1/tenants/{tenant}/status")).await {
        Err(ClientError::Api { status: 404, .. }) => {}
        r => return Ok(r?),
    }
    // A missing tenant is refused again here, in the older server's words.
    let machines: Vec<Machine> = c.get(&format!("/v1/tenants/{tenant}/machines")).await?;
    let mut disks = Vec::new();
    for m in &machines {
        let ds: Vec<Disk> = c
            .get(&format!("/v1/tenants/{tenant}/machines/{}/disks", m.name))
            .await?;
        disks.extend(ds.into_iter().map(|disk| MachineDisk {
            machine: m.name.clone(),
            disk,
        }));
    }
    let mut plans = Vec::new();
    for p in c
        .get::<Vec<Plan>>(&format!("/v1/tenants/{tenant}/plans"))
        .await?
    {
        plans.push(
            c.get(&format!("/v1/tenants/{tenant}/plans/{}/status", p.name))
                .await?,
        );
    }
    let mut alerts: Vec<Event> = c.get("/v1/alerts").await?;
    alerts.retain(|e| e.tenant.as_deref() == Some(tenant));
    Ok(TenantStatus {
        machines,
        disks,
        plans,
        alerts,
    })
}

fn status_table(st: &TenantStatus, all: bool) {
    // Problems first: with thousands of disks, a table of every one hides the few that matter.
    let alert_of = |m: &str, d: &str| {
        let subject = format!("disks/{m}/{d}");
        st.alerts
            .iter()
            .find(|e| e.active && e.subject == subject)
            .map(|e| e.message.clone())
    };
    let mut attention = 0;
    let rows: Vec<Vec<String>> = st
        .disks
        .iter()
        .filter_map(|MachineDisk { machine, disk: d }| {
            let alert = alert_of(machine, &d.name);
            let needs = d.state != DiskState::Protected || alert.is_some();
            attention += usize::from(needs);
            (all || needs).then(|| {
                // The machine's replication policy: what an operator checks next about a disk
                // behind its RPO (interval, compression, bandwidth: `ferry ctl policy`).
                let policy = st
                    .machines
                    .iter()
                    .find(|m| &m.name == machine)
                    .map_or("-".into(), |m| m.policy.clone());
                vec![
                    machine.clone(),
                    d.name.clone(),
                    policy,
                    ferry_process_server::status::human_bytes(d.size_bytes),
                    d.state.as_str().into(),
                    d.rpo_seconds.map_or("-".into(), |r| format!("{r:.1}s")),
                    alert.unwrap_or_else(|| "-".into()),
                ]
            })
        })
        .collect();
    if !rows.is_empty() {
        table(
            &["machine", "disk", "policy", "size", "state", "rpo", "alert"],
            rows,
        );
    }
    let counts: Vec<String> = DiskState::ALL
        .iter()
        .filter_map(|s| {
            let n = st.disks.iter().filter(|d| d.disk.state == *s).count();
            (n > 0).then(|| format!("{n} {}", s.as_str()))
        })
        .collect();
    println!(
        "{} disks on {} machines: {}",
        st.disks.len(),
        st.machines.len(),
        if counts.is_empty() {
            "-".to_string()
        } else {
            counts.join(", ")
        }
    );
    match (attention, all) {
        (0, _) => println!("every disk is protected, none has an alert"),
        (n, false) => println!("{n} need attention (listed above; --all lists every disk)"),
        (n, true) => println!("{n} need attention"),
    }
    println!();
    table(
        &["plan", "phase", "running job", "last job"],
        st.plans
            .iter()
            .map(|s| {
                vec![
                    s.plan.clone(),
                    s.phase.as_str().into(),
                    s.running_job.map_or("-".into(), |j| j.to_string()),
                    s.last_job.map_or("-".into(), |j| j.to_string()),
                ]
            })
            .collect(),
    );
    println!("\n{} active alerts (ferry ctl alerts)", st.alerts.len());
}

pub async fn run(c: &Client, json: bool, cmd: OperateCmd) -> anyhow::Result<()> {
    match cmd {
        OperateCmd::Status { tenant, all } => {
            let st = tenant_status(c, &tenant).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            status_table(&st, all);
            Ok(())
        }
        OperateCmd::Protect {
            tenant,
            machine,
            site,
            policy,
            disks,
            process_server,
        } => {
            // Every disk is checked before anything is created.
            let mut ds = Vec::new();
            for spec in &disks {
                let (head, source) = match spec.split_once(",source=") {
                    Some((h, s)) => (h, s.to_string()),
                    None => (spec.as_str(), String::new()),
                };
                let (name, size) = head
                    .split_once('=')
                    .with_context(|| format!("--disk {spec:?} must be NAME=SIZE[,source=IMAGE]"))?;
                ds.push(Disk {
                    name: name.to_string(),
                    size_bytes: ferry::parse_size(size)?,
                    source,
                    state: Default::default(),
                    rpo_seconds: None,
                    throughput_bytes_per_sec: None,
                    journal_bytes: None,
                    backlog_records: None,
                    bytes_sent: None,
                    uplink_share: None,
                });
            }
            let mpath = format!("/v1/tenants/{tenant}/machines/{machine}");
            // Protecting more disks of a machine keeps what it has and the command does not
            // say: its description and its process server (unless --process-server is given).
            let existing = match c.get::<Machine>(&mpath).await {
                Ok(m) => Some(m),
                Err(ClientError::Api { status: 404, .. }) => None,
                Err(e) => return Err(e.into()),
            };
            let m = Machine {
                name: machine.clone(),
                site,
                policy,
                description: existing
                    .as_ref()
                    .map(|e| e.description.clone())
                    .unwrap_or_default(),
                process_server: process_server
                    .or_else(|| existing.as_ref().and_then(|e| e.process_server.clone())),
            };
            if existing.is_some() {
                c.call::<_, Machine>(Method::PUT, &mpath, Some(&m)).await?;
            } else {
                c.call::<_, Machine>(
                    Method::POST,
                    &format!("/v1/tenants/{tenant}/machines"),
                    Some(&m),
                )
                .await?;
            }
            let mut made = Vec::new();
            for d in &ds {
                let d: Disk = c
                    .call(Method::POST, &format!("{mpath}/disks"), Some(d))
                    .await?;
                made.push(d);
            }
            show(json, &made, |v| {
                println!(
                    "protecting machine {machine} ({} disks): {}",
                    v.len(),
                    v.iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        }
        OperateCmd::Unprotect { tenant, machine } => {
            let mpath = format!("/v1/tenants/{tenant}/machines/{machine}");
            // Refused before anything is deleted when a plan still starts the machine.
            let plans: Vec<Plan> = c.get(&format!("/v1/tenants/{tenant}/plans")).await?;
            if let Some(p) = plans.iter().find(|p| p.machines().any(|m| m == machine)) {
                bail!(
                    "plan {} starts machine {machine}: take it out of the plan first",
                    p.name
                );
            }
            let ds: Vec<Disk> = c.get(&format!("{mpath}/disks")).await?;
            for d in &ds {
                c.call::<(), ()>(Method::DELETE, &format!("{mpath}/disks/{}", d.name), None)
                    .await?;
            }
            c.call::<(), ()>(Method::DELETE, &mpath, None).await?;
            show(
                json,
                &serde_json::json!({"machine": machine, "disks": ds.len()}),
                |_| {
                    println!(
                        "machine {machine} and its {} disks are no longer protected",
                        ds.len()
                    )
                },
            )
        }
        OperateCmd::Points { tenant, machine } => {
            let v: Vec<PointInfo> = c
                .get(&format!("/v1/tenants/{tenant}/machines/{machine}/points"))
                .await?;
            show(json, &v, |v| {
                table(
                    &["disk", "point", "time (utc)", "consistency"],
                    v.iter()
                        .map(|p| {
                            vec![
                                p.disk.clone(),
                                p.seq.to_string(),
                                when(p.created_unix_ns / 1_000_000_000),
                                // "(machine)": one cut of every disk of the machine.
                                if p.machine_consistent {
                                    format!("{} (machine)", p.consistency)
                                } else {
                                    p.consistency.clone()
                                },
                            ]
                        })
                        .collect(),
                )
            })
        }
        OperateCmd::Plan { tenant, name, file } => {
            let path = format!("/v1/tenants/{tenant}/plans/{name}");
            let p: Plan = match file {
                None => c.get(&path).await?,
                Some(f) => {
                    let p: Plan = read_json(&f)?;
                    match c.call(Method::PUT, &path, Some(&p)).await {
                        Err(ClientError::Api { status: 404, .. }) => {
                            c.call(
                                Method::POST,
                                &format!("/v1/tenants/{tenant}/plans"),
                                Some(&p),
                            )
                            .await?
                        }
                        r => r?,
                    }
                }
            };
            let st: PlanStatus = c.get(&format!("{path}/status")).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"plan": p, "status": st}))?
                );
                return Ok(());
            }
            println!(
                "plan {}: {}{}",
                p.name,
                st.phase.as_str(),
                st.running_job
                    .map_or(String::new(), |j| format!(", job {j} running"))
            );
            table(
                &["machine", "start", "disk", "point", "path"],
                p.start_order()
                    .flat_map(|m| {
                        let disks: Vec<&DiskOutcome> =
                            st.disks.iter().filter(|d| d.machine == m.machine).collect();
                        let start = m
                            .start
                            .as_ref()
                            .map_or("-".to_string(), |h| h.argv.join(" "));
                        if disks.is_empty() {
                            return vec![vec![
                                m.machine.clone(),
                                start,
                                "-".into(),
                                "-".into(),
                                "-".into(),
                            ]];
                        }
                        disks
                            .into_iter()
                            .map(|d| {
                                vec![
                                    m.machine.clone(),
                                    start.clone(),
                                    d.disk.clone(),
                                    d.point_seq.map_or("-".into(), |s| s.to_string()),
                                    d.path.clone(),
                                ]
                            })
                            .collect()
                    })
                    .collect(),
            );
            Ok(())
        }
        OperateCmd::Failover {
            job,
            test,
            planned,
            unplanned: _,
            point,
        } => {
            let kind = if test {
                JobKind::TestFailover
            } else if planned {
                JobKind::PlannedFailover
            } else {
                JobKind::UnplannedFailover
            };
            let point = point.as_deref().map(parse_time).transpose()?;
            start_job(c, json, &job, kind, point).await
        }
        OperateCmd::Cleanup { job } => start_job(c, json, &job, JobKind::Cleanup, None).await,
        OperateCmd::Commit { job } => start_job(c, json, &job, JobKind::Commit, None).await,
        OperateCmd::Reprotect { job } => start_job(c, json, &job, JobKind::Reprotect, None).await,
        OperateCmd::Failback { job } => start_job(c, json, &job, JobKind::Failback, None).await,
        OperateCmd::Jobs {
            tenant,
            id: Some(id),
        } => {
            let j: Job = c.get(&format!("/v1/tenants/{tenant}/jobs/{id}")).await?;
            show(json, &j, job_table)
        }
        OperateCmd::Jobs { tenant, id: None } => {
            let v: Vec<Job> = c.get(&format!("/v1/tenants/{tenant}/jobs")).await?;
            show(json, &v, |v| {
                table(
                    &["id", "kind", "plan", "state", "by", "started", "steps done"],
                    v.iter()
                        .map(|j| {
                            vec![
                                j.id.to_string(),
                                j.kind.as_str().into(),
                                j.plan.clone(),
                                format!("{:?}", j.state).to_lowercase(),
                                j.by.clone(),
                                when(j.created_unix),
                                format!(
                                    "{}/{}",
                                    j.steps
                                        .iter()
                                        .filter(|s| s.state == StepState::Done)
                                        .count(),
                                    j.steps.len()
                                ),
                            ]
                        })
                        .collect(),
                )
            })
        }
        OperateCmd::Alerts => {
            let v: Vec<Event> = c.get("/v1/alerts").await?;
            show(json, &v, |v| {
                table(
                    &["since", "severity", "tenant", "subject", "message"],
                    v.iter()
                        .map(|e| {
                            vec![
                                when(e.at_unix),
                                format!("{:?}", e.severity).to_lowercase(),
                                opt(&e.tenant),
                                e.subject.clone(),
                                e.message.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        OperateCmd::Report {
            name,
            cache_free,
            backlog_secs,
        } => {
            let r = ApplianceReport {
                cache_free_ratio: cache_free,
                upload_backlog_secs: backlog_secs,
                ..Default::default()
            };
            let r: ApplianceReport = c
                .call(
                    Method::PUT,
                    &format!("/v1/appliances/{name}/report"),
                    Some(&r),
                )
                .await?;
            show(json, &r, |_| println!("reported for {name}"))
        }
    }
}
