//! `ferry config-server` (the control plane's server) and `ferry ctl` (a client over its API).
//! The logic is in `ferry-config-server`; here are arguments, tables and `--json`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_api::{
    Appliance, ApplianceReport, AuditEntry, CreateToken, Disk, DiskOutcome, EnrollRequest,
    Enrolled, Event, Job, JobKind, JobState, Machine, Plan, PlanStatus, PointInfo, Policy,
    Principal, Site, StartJob, StepState, Tenant, TokenCreated,
};
use ferry_config_server::client::Method;
use ferry_config_server::client::{Client, ClientError};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServerArgs {
    /// State directory (CA, database, the first administrator's certificate).
    #[arg(long, default_value = "/var/lib/ferry/config-server")]
    state: PathBuf,
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Extra DNS names or addresses for the server certificate (used when the CA is created).
    #[arg(long = "name")]
    names: Vec<String>,
    /// The recovery repository failover jobs use (the master target's, read beside it).
    /// Without it the server refuses jobs.
    #[arg(long, requires_all = ["recovery_key", "recovery_work"])]
    recovery_repo: Option<PathBuf>,
    /// The tenant key of the recovery repository.
    #[arg(long, requires = "recovery_repo")]
    recovery_key: Option<PathBuf>,
    /// Where jobs keep scratch overlays and live disks.
    #[arg(long, requires = "recovery_repo")]
    recovery_work: Option<PathBuf>,
    /// The process server's cache directory (planned failover waits for its journals to drain).
    #[arg(long, requires = "recovery_repo")]
    process_cache: Option<PathBuf>,
    /// An appliance that has not reported for this many seconds raises an "unreachable" alert.
    #[arg(long, default_value_t = 300)]
    unreachable_secs: u64,
}

pub fn server(a: ServerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let cfg = ferry_config_server::Config {
            state: a.state.clone(),
            listen: a.listen,
            server_names: a.names,
            site: match (a.recovery_repo, a.recovery_key, a.recovery_work) {
                (Some(repo), Some(key), Some(work)) => Some(ferry_failover::Site {
                    repo,
                    key,
                    work,
                    process_cache: a.process_cache,
                }),
                _ => None,
            },
            unreachable_after: std::time::Duration::from_secs(a.unreachable_secs.max(1)),
        };
        let s = ferry_config_server::Server::bind(&cfg)
            .await
            .with_context(|| {
                format!("starting the configuration server in {}", a.state.display())
            })?;
        s.run().await.context("configuration server")
    })
}

#[derive(Args)]
pub struct CtlArgs {
    /// The configuration server, https://HOST:PORT.
    #[arg(long)]
    server: String,
    /// This identity's certificate directory (ca-cert.pem, client-cert.pem, client-key.pem).
    #[arg(long, default_value = "/etc/ferry/identity")]
    cert_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Trade a one-time token for a certificate in --cert-dir (the key is made here).
    Enroll {
        #[arg(long)]
        token: String,
        /// The SHA-256 of the CA certificate, as printed with the token: the server's CA is
        /// checked against it before the token is sent.
        #[arg(long, required_unless_present = "ca_cert")]
        ca_sha256: Option<String>,
        /// Or the CA certificate itself.
        #[arg(long, conflicts_with = "ca_sha256")]
        ca_cert: Option<PathBuf>,
    },
    /// Show this identity.
    Whoami,
    /// Create a one-time enrollment token.
    Token {
        #[arg(long)]
        name: String,
        /// viewer, operator, tenant-admin or provider-admin.
        #[arg(long)]
        role: String,
        #[arg(long)]
        tenant: Option<String>,
        /// For appliances: process-server, master-target.
        #[arg(long)]
        appliance: Option<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
    Tenants,
    /// Create a tenant.
    Tenant {
        name: String,
    },
    Sites {
        #[arg(long)]
        tenant: String,
    },
    Machines {
        #[arg(long)]
        tenant: String,
    },
    Disks {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        machine: String,
    },
    Policies {
        #[arg(long)]
        tenant: String,
    },
    /// Show a policy, or create or replace it from a JSON file.
    Policy {
        #[arg(long)]
        tenant: String,
        name: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    Plans {
        #[arg(long)]
        tenant: String,
    },
    Appliances,
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    Events {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// A tenant at a glance: machines, disks (state, RPO), plans (phase), active alerts.
    Status {
        #[arg(long)]
        tenant: String,
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
        /// NAME=SIZE (bytes, K/M/G/T suffixes), with `,source=IMAGE` for reprotect. Repeatable.
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
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
    /// Any API call: `ctl call POST /v1/tenants/acme/sites --file site.json`.
    Call {
        method: String,
        path: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

#[derive(Args)]
struct JobArgs {
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
            println!(
                "{}/{}: sent {} of {} bytes ({} of {} blocks differed), {} bytes of block names",
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

fn parse_name<T: DeserializeOwned>(what: &str, s: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .with_context(|| format!("{s:?} is not a {what}"))
}

fn read_json<T: DeserializeOwned>(p: &PathBuf) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
}

/// Columns padded to their widest cell.
fn table(head: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<0$}", w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
}

fn show<T: Serialize>(json: bool, v: &T, tab: impl FnOnce(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        tab(v);
    }
    Ok(())
}

fn opt(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".into())
}

fn when(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub fn ctl(a: CtlArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(ctl_async(a))
}

async fn ctl_async(a: CtlArgs) -> anyhow::Result<()> {
    let json = a.json;
    if let CtlCmd::Enroll {
        token,
        ca_sha256,
        ca_cert,
    } = &a.cmd
    {
        let (c, pinned_ca) = match (ca_sha256, ca_cert) {
            (Some(h), _) => (Client::pinned(&a.server, h)?, None),
            (None, Some(f)) => {
                let ca = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                (Client::anonymous(&a.server, &ca)?, Some(ca))
            }
            (None, None) => bail!("give --ca-sha256 or --ca-cert"),
        };
        let (key, csr) = ferry_config_server::ca::key_and_csr("enrolling")?;
        let req = EnrollRequest {
            token: token.clone(),
            csr_pem: Some(csr),
        };
        let e: Enrolled = c.call(Method::POST, "/v1/enroll", Some(&req)).await?;
        // The CA to trust from now on: the one given, or the pinned one the server sent.
        let ca = match (pinned_ca, ca_sha256) {
            (Some(ca), _) => ca,
            (None, Some(h)) => {
                let got = ferry_config_server::ca::pem_fingerprint(&e.ca_cert_pem);
                if got.as_deref() != Some(h.trim().to_ascii_lowercase().as_str()) {
                    bail!("the server answered with another CA than the one pinned ({h})");
                }
                e.ca_cert_pem.clone()
            }
            (None, None) => unreachable!("checked above"),
        };
        ferry_config_server::serve::write_identity(&a.cert_dir, &ca, &e.certificate_pem, &key)
            .with_context(|| format!("writing {}", a.cert_dir.display()))?;
        return show(json, &e.principal, |p| {
            println!(
                "enrolled {} as {} (tenant {}); identity in {}",
                p.name,
                p.role.as_str(),
                opt(&p.tenant),
                a.cert_dir.display()
            )
        });
    }
    let c = Client::from_cert_dir(&a.server, &a.cert_dir)
        .with_context(|| format!("loading the identity in {}", a.cert_dir.display()))?;
    match a.cmd {
        CtlCmd::Enroll { .. } => unreachable!("handled above"),
        CtlCmd::Whoami => {
            let p: Principal = c.get("/v1/whoami").await?;
            show(json, &p, |p| {
                table(
                    &["name", "role", "tenant"],
                    vec![vec![p.name.clone(), p.role.as_str().into(), opt(&p.tenant)]],
                )
            })
        }
        CtlCmd::Token {
            name,
            role,
            tenant,
            appliance,
            ttl_secs,
        } => {
            let req = CreateToken {
                name,
                role: parse_name("role", &role)?,
                tenant,
                appliance: appliance
                    .map(|s| parse_name("appliance role", &s))
                    .transpose()?,
                ttl_secs,
            };
            let t: TokenCreated = c.call(Method::POST, "/v1/tokens", Some(&req)).await?;
            show(json, &t, |t| {
                println!(
                    "token {} (expires {}; works once)",
                    t.token,
                    when(t.expires_unix)
                );
                println!("CA certificate SHA-256: {}", t.ca_sha256);
            })
        }
        CtlCmd::Tenants => {
            let v: Vec<Tenant> = c.get("/v1/tenants").await?;
            show(json, &v, |v| {
                table(
                    &["name", "description"],
                    v.iter()
                        .map(|t| vec![t.name.clone(), t.description.clone()])
                        .collect(),
                )
            })
        }
        CtlCmd::Tenant { name } => {
            let t = Tenant {
                name,
                description: String::new(),
            };
            let t: Tenant = c.call(Method::POST, "/v1/tenants", Some(&t)).await?;
            show(json, &t, |t| println!("created tenant {}", t.name))
        }
        CtlCmd::Sites { tenant } => {
            let v: Vec<Site> = c.get(&format!("/v1/tenants/{tenant}/sites")).await?;
            show(json, &v, |v| {
                table(
                    &["name", "kind", "location"],
                    v.iter()
                        .map(|s| {
                            vec![
                                s.name.clone(),
                                format!("{:?}", s.kind).to_lowercase(),
                                s.location.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Machines { tenant } => {
            let v: Vec<Machine> = c.get(&format!("/v1/tenants/{tenant}/machines")).await?;
            show(json, &v, |v| {
                table(
                    &["name", "site", "policy"],
                    v.iter()
                        .map(|m| vec![m.name.clone(), m.site.clone(), m.policy.clone()])
                        .collect(),
                )
            })
        }
        CtlCmd::Disks { tenant, machine } => {
            let v: Vec<Disk> = c
                .get(&format!("/v1/tenants/{tenant}/machines/{machine}/disks"))
                .await?;
            show(json, &v, |v| {
                table(
                    &["name", "size", "state", "rpo"],
                    v.iter()
                        .map(|d| {
                            vec![
                                d.name.clone(),
                                d.size_bytes.to_string(),
                                d.state.as_str().into(),
                                d.rpo_seconds.map_or("-".into(), |r| format!("{r:.1}s")),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Policies { tenant } => {
            let v: Vec<Policy> = c.get(&format!("/v1/tenants/{tenant}/policies")).await?;
            show(json, &v, |v| {
                table(
                    &[
                        "name",
                        "mode",
                        "checkpoint",
                        "rpo alert",
                        "compression",
                        "limit",
                    ],
                    v.iter()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                format!("{:?}", p.mode).to_lowercase(),
                                format!("{}s", p.checkpoint_interval_secs),
                                format!("{}s", p.rpo_alert_secs),
                                p.compression.to_string(),
                                p.bandwidth
                                    .limit_mbit
                                    .map_or("none".into(), |m| format!("{m} Mbit/s")),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Policy { tenant, name, file } => {
            let path = format!("/v1/tenants/{tenant}/policies/{name}");
            let p: Policy = match file {
                None => c.get(&path).await?,
                Some(f) => {
                    let p: Policy = read_json(&f)?;
                    match c.call(Method::PUT, &path, Some(&p)).await {
                        Err(ClientError::Api { status: 404, .. }) => {
                            c.call(
                                Method::POST,
                                &format!("/v1/tenants/{tenant}/policies"),
                                Some(&p),
                            )
                            .await?
                        }
                        r => r?,
                    }
                }
            };
            // A policy has nested parts: JSON is its readable form too.
            println!("{}", serde_json::to_string_pretty(&p)?);
            Ok(())
        }
        CtlCmd::Plans { tenant } => {
            let v: Vec<Plan> = c.get(&format!("/v1/tenants/{tenant}/plans")).await?;
            show(json, &v, |v| {
                table(
                    &["name", "groups", "machines"],
                    v.iter()
                        .map(|p| {
                            vec![
                                p.name.clone(),
                                p.groups.len().to_string(),
                                p.machines().collect::<Vec<_>>().join(","),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Appliances => {
            let v: Vec<Appliance> = c.get("/v1/appliances").await?;
            show(json, &v, |v| {
                table(
                    &["name", "role", "tenant", "enrolled"],
                    v.iter()
                        .map(|a| {
                            vec![
                                a.name.clone(),
                                a.role.as_str().into(),
                                opt(&a.tenant),
                                when(a.enrolled_unix),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Audit { limit } => {
            let v: Vec<AuditEntry> = c.get(&format!("/v1/audit?limit={limit}")).await?;
            show(json, &v, |v| {
                table(
                    &["when", "who", "from", "what", "status", "detail"],
                    v.iter()
                        .map(|e| {
                            vec![
                                when(e.at_unix),
                                e.who.clone(),
                                e.from.clone(),
                                e.what.clone(),
                                e.status.to_string(),
                                e.detail.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Events { limit } => {
            let v: Vec<Event> = c.get(&format!("/v1/events?limit={limit}")).await?;
            show(json, &v, |v| {
                table(
                    &["when", "severity", "subject", "message"],
                    v.iter()
                        .map(|e| {
                            vec![
                                when(e.at_unix),
                                format!("{:?}", e.severity).to_lowercase(),
                                e.subject.clone(),
                                e.message.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Status { tenant } => {
            let machines: Vec<Machine> = c.get(&format!("/v1/tenants/{tenant}/machines")).await?;
            let mut disks = Vec::new();
            for m in &machines {
                let ds: Vec<Disk> = c
                    .get(&format!("/v1/tenants/{tenant}/machines/{}/disks", m.name))
                    .await?;
                disks.extend(ds.into_iter().map(|d| (m.name.clone(), d)));
            }
            let plans: Vec<Plan> = c.get(&format!("/v1/tenants/{tenant}/plans")).await?;
            let mut phases = Vec::new();
            for p in &plans {
                let st: PlanStatus = c
                    .get(&format!("/v1/tenants/{tenant}/plans/{}/status", p.name))
                    .await?;
                phases.push(st);
            }
            let alerts: Vec<Event> = c.get("/v1/alerts").await?;
            if json {
                let disks: Vec<Value> = disks
                    .iter()
                    .map(|(m, d)| serde_json::json!({"machine": m, "disk": d}))
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "machines": machines, "disks": disks, "plans": phases, "alerts": alerts
                    }))?
                );
                return Ok(());
            }
            table(
                &["machine", "disk", "size", "state", "rpo"],
                disks
                    .iter()
                    .map(|(m, d)| {
                        vec![
                            m.clone(),
                            d.name.clone(),
                            ferry_process_server::status::human_bytes(d.size_bytes),
                            d.state.as_str().into(),
                            d.rpo_seconds.map_or("-".into(), |r| format!("{r:.1}s")),
                        ]
                    })
                    .collect(),
            );
            println!();
            table(
                &["plan", "phase", "running job", "last job"],
                phases
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
            println!("\n{} active alerts (ferry ctl alerts)", alerts.len());
            Ok(())
        }
        CtlCmd::Protect {
            tenant,
            machine,
            site,
            policy,
            disks,
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
                });
            }
            let m = Machine {
                name: machine.clone(),
                site,
                policy,
                description: String::new(),
            };
            let mpath = format!("/v1/tenants/{tenant}/machines/{machine}");
            match c.call::<_, Machine>(Method::PUT, &mpath, Some(&m)).await {
                Err(ClientError::Api { status: 404, .. }) => {
                    c.call::<_, Machine>(
                        Method::POST,
                        &format!("/v1/tenants/{tenant}/machines"),
                        Some(&m),
                    )
                    .await?;
                }
                r => {
                    r?;
                }
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
        CtlCmd::Unprotect { tenant, machine } => {
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
        CtlCmd::Points { tenant, machine } => {
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
                                p.consistency.clone(),
                            ]
                        })
                        .collect(),
                )
            })
        }
        CtlCmd::Plan { tenant, name, file } => {
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
        CtlCmd::Failover {
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
            start_job(&c, json, &job, kind, point).await
        }
        CtlCmd::Cleanup { job } => start_job(&c, json, &job, JobKind::Cleanup, None).await,
        CtlCmd::Commit { job } => start_job(&c, json, &job, JobKind::Commit, None).await,
        CtlCmd::Reprotect { job } => start_job(&c, json, &job, JobKind::Reprotect, None).await,
        CtlCmd::Failback { job } => start_job(&c, json, &job, JobKind::Failback, None).await,
        CtlCmd::Jobs {
            tenant,
            id: Some(id),
        } => {
            let j: Job = c.get(&format!("/v1/tenants/{tenant}/jobs/{id}")).await?;
            show(json, &j, job_table)
        }
        CtlCmd::Jobs { tenant, id: None } => {
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
        CtlCmd::Alerts => {
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
        CtlCmd::Report {
            name,
            cache_free,
            backlog_secs,
        } => {
            let r = ApplianceReport {
                cache_free_ratio: cache_free,
                upload_backlog_secs: backlog_secs,
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
        CtlCmd::Call { method, path, file } => {
            let m: Method = method.to_uppercase().parse().context("bad method")?;
            let body = file
                .map(|f| std::fs::read(&f).with_context(|| format!("reading {}", f.display())))
                .transpose()?;
            let (status, bytes) = c
                .raw(m, &path, body.map(|b| ("application/json", b)))
                .await?;
            println!("{}", String::from_utf8_lossy(&bytes));
            if !status.is_success() {
                bail!("the server answered {status}");
            }
            Ok(())
        }
    }
}
