//! `ferry config-server` (the control plane's server) and `ferry ctl` (a client over its API).
//! The logic is in `ferry-config-server`; here are arguments, tables and `--json`.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use ferry_api::{
    Appliance, AuditEntry, CreateToken, Disk, EnrollRequest, Enrolled, Event, Machine, Plan,
    Policy, Principal, Site, Tenant, TokenCreated,
};
use ferry_config_server::client::Method;
use ferry_config_server::client::{Client, ClientError};
use serde::{de::DeserializeOwned, Serialize};
use std::net::SocketAddr;

pub(crate) mod identity;
mod operate;
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
    /// Seconds to confirm a network change before it is rolled back.
    #[arg(long, default_value_t = 60)]
    network_confirm_secs: u64,
    /// Wrong console passwords in a row before the console locks.
    #[arg(long, default_value_t = 3)]
    login_attempts: u32,
    /// How long the console stays locked after too many wrong passwords.
    #[arg(long, default_value_t = 300)]
    lockout_secs: u64,
    /// The command for an appliance action, NAME=COMMAND (run with sh -c; arguments in FERRY_*
    /// variables): restart-services, reboot, shutdown, factory-reset, update-slot, hostname,
    /// ntp, proxy, dns, dhcp, logs.
    #[arg(long = "hook", value_name = "NAME=COMMAND")]
    hooks: Vec<String>,
    /// The cache device's mount point (the dashboard shows its use).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// The recovery site's replication endpoint, HOST:PORT (dashboard and diagnostics).
    #[arg(long)]
    recovery_site: Option<String>,
    /// Only when this server runs beside the recovery site: the recovery repository failover
    /// jobs use (the master target's, read beside it). Without it (the usual case) the
    /// tenant's enrolled master target and process server run the jobs' site steps, ordered
    /// over the API, and this server needs neither the repository nor the tenant key.
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
    /// How long a master target or process server may take to fetch a job's step order (and
    /// be silent while it runs one) before the step fails.
    #[arg(long, default_value_t = 60)]
    order_timeout_secs: u64,
    /// An appliance that has not reported for this many seconds raises an "unreachable" alert.
    #[arg(long, default_value_t = 300)]
    unreachable_secs: u64,
    /// Run the recovery plans' hooks and start commands as this account (a name or uid of
    /// /etc/passwd): its uid and gid, no supplementary groups, its home as working directory.
    /// Without it they run as the server (always with a clean environment and their own
    /// process group).
    #[arg(long)]
    plan_hook_user: Option<String>,
    /// Refused requests (401, 403) a client (a certificate, or an address without one) may get
    /// within --refusal-window-secs; past this it is answered 429 too-many-refusals until that
    /// window ends (0: no limit).
    #[arg(long, default_value_t = ferry_config_server::refusals::DEFAULT_PER_WINDOW)]
    refusal_limit: u32,
    /// The window refusals are counted in (and summed up in the audit log).
    #[arg(long, default_value_t = ferry_config_server::refusals::WINDOW.as_secs())]
    refusal_window_secs: u64,
    /// For testing the roles' own renewal: appliances' certificates live this many seconds
    /// instead of a year.
    #[arg(long, hide = true)]
    appliance_cert_secs: Option<u64>,
}

const HOOKS: &[&str] = &[
    "restart-services",
    "reboot",
    "shutdown",
    "factory-reset",
    "update-slot",
    "hostname",
    "ntp",
    "proxy",
    "dns",
    "dhcp",
    "logs",
];

pub fn server(a: ServerArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut hooks = std::collections::BTreeMap::new();
    for h in &a.hooks {
        let (name, cmd) = h
            .split_once('=')
            .with_context(|| format!("--hook {h:?}: expected NAME=COMMAND"))?;
        if !HOOKS.contains(&name) {
            bail!("--hook {name}: not an action (one of {})", HOOKS.join(", "));
        }
        hooks.insert(name.to_string(), cmd.to_string());
    }
    let system = ferry_config_server::system::SystemConfig {
        network_confirm_secs: a.network_confirm_secs,
        login_attempts: a.login_attempts.max(1),
        lockout_secs: a.lockout_secs,
        hooks,
        cache_dir: a.cache_dir.clone(),
        recovery_site: a.recovery_site.clone(),
        hooks_as: ferry_failover::hooks::Confine {
            user: match &a.plan_hook_user {
                Some(u) => Some(
                    ferry_failover::hooks::Account::lookup(u)
                        .with_context(|| format!("--plan-hook-user {u}"))?,
                ),
                None => None,
            },
        },
    };
    rt.block_on(async {
        let cfg = ferry_config_server::Config {
            state: a.state.clone(),
            listen: a.listen,
            server_names: a.names,
            system,
            site: match (a.recovery_repo, a.recovery_key, a.recovery_work) {
                (Some(repo), Some(key), Some(work)) => Some(ferry_failover::Site {
                    repo,
                    key,
                    work,
                    process_cache: a.process_cache,
                }),
                _ => None,
            },
            order_timeout: std::time::Duration::from_secs(a.order_timeout_secs.max(1)),
            unreachable_after: std::time::Duration::from_secs(a.unreachable_secs.max(1)),
            refusals: ferry_config_server::refusals::Limits {
                per_window: a.refusal_limit,
                window: std::time::Duration::from_secs(a.refusal_window_secs.max(1)),
                ..Default::default()
            },
            appliance_cert_validity: a.appliance_cert_secs.map(std::time::Duration::from_secs),
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
    #[command(flatten)]
    Operate(operate::OperateCmd),
    #[command(flatten)]
    Identity(identity::IdentityCmd),
    /// Any API call: `ctl call POST /v1/tenants/acme/sites --file site.json`.
    Call {
        method: String,
        path: String,
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn parse_name<T: DeserializeOwned>(what: &str, s: &str) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(s.into()))
        .with_context(|| format!("{s:?} is not a {what}"))
}

fn read_json<T: DeserializeOwned>(p: &PathBuf) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
}

/// Columns padded to their widest cell. Printed in one write: a line at a time was a system
/// call per row, which a status of 10,000 disks felt.
fn table(head: &[&str], rows: Vec<Vec<String>>) {
    use std::fmt::Write as _;
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let start = out.len();
        for (i, c) in cells.iter().enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let _ = write!(out, "{c:<0$}", w[i]); // writing to a String cannot fail
        }
        out.truncate(start + out[start..].trim_end().len());
        out.push('\n');
    };
    line(head.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r);
    }
    print!("{out}");
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

/// Trade a one-time token for a certificate in `cert_dir` (the key is made here and never
/// leaves): the server's CA is checked against `ca_sha256` (or is `ca_cert`) before the token
/// is sent.
pub(crate) async fn enroll(
    server: &str,
    token: &str,
    ca_sha256: Option<&str>,
    ca_cert: Option<&std::path::Path>,
    cert_dir: &std::path::Path,
) -> anyhow::Result<Principal> {
    let (c, pinned_ca) = match (ca_sha256, ca_cert) {
        (Some(h), _) => (Client::pinned(server, h)?, None),
        (None, Some(f)) => {
            let ca =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            (Client::anonymous(server, &ca)?, Some(ca))
        }
        (None, None) => bail!("give --ca-sha256 or --ca-cert"),
    };
    let (key, csr) = ferry_config_server::ca::key_and_csr("enrolling")?;
    let req = EnrollRequest {
        token: token.to_string(),
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
    ferry_config_server::serve::write_identity(cert_dir, &ca, &e.certificate_pem, &key)
        .with_context(|| format!("writing {}", cert_dir.display()))?;
    Ok(e.principal)
}

async fn ctl_async(a: CtlArgs) -> anyhow::Result<()> {
    let json = a.json;
    if let CtlCmd::Enroll {
        token,
        ca_sha256,
        ca_cert,
    } = &a.cmd
    {
        let principal = enroll(
            &a.server,
            token,
            ca_sha256.as_deref(),
            ca_cert.as_deref(),
            &a.cert_dir,
        )
        .await?;
        return show(json, &principal, |p| {
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
            let appliance_role = appliance.clone();
            let server = a.server.clone();
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
                if let Some(role) = &appliance_role {
                    println!(
                        "start the appliance with: ferry {role} --config-server {server} --token {} --ca-sha256 {}",
                        t.token, t.ca_sha256
                    );
                }
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
                        "priority",
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
                                p.priority.as_str().into(),
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
        CtlCmd::Operate(cmd) => operate::run(&c, json, cmd).await,
        CtlCmd::Identity(cmd) => identity::run(&c, json, cmd, &a.server, &a.cert_dir).await,
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
