//! A role configured by the configuration server: `ferry process-server --config-server URL
//! --token T --ca-sha256 H` (and the same for `master-target`) enrolls once with the token,
//! then asks for its configuration (`POST /v1/self/config`): disks, master target, the tenant's
//! data key and certificates. It keeps the answer in its state directory, so that it also starts
//! while the configuration server is unreachable, and asks again every poll interval: a changed
//! answer restarts the role in place (the journal and repository are crash-safe; QEMU's NBD
//! client reconnects). A process server also reports each disk's state and RPO, its cache use and its upload
//! backlog on every poll. On every poll, too, a role whose certificate has less than a third
//! of its life left renews it ([`renewal_due`]; `docs/api.md`, "Revocation and renewal").

use anyhow::{bail, Context};
use clap::Args;
use ferry_api::{ConfigRequest, DiskReport, DiskState, RoleConfig};
use ferry_config_server::client::{Client, Method};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args, Clone, Debug)]
pub struct BootstrapArgs {
    /// The configuration server, https://HOST:PORT. With it, the role takes its configuration
    /// (disks, master target, data key, certificates) from there, not from the options.
    #[arg(long)]
    pub config_server: Option<String>,
    /// The one-time enrollment token (`ferry ctl token --appliance ...`), needed on the first
    /// start only.
    #[arg(long, requires = "config_server")]
    pub token: Option<String>,
    /// The SHA-256 of the configuration server's CA, printed with the token (first start only).
    #[arg(long, requires = "config_server")]
    pub ca_sha256: Option<String>,
    /// Where the role keeps its identity and the configuration it was given.
    #[arg(long, default_value = "/var/lib/ferry/role")]
    pub state: PathBuf,
    /// How often to ask for changes (and, on a process server, report the disks).
    #[arg(long, default_value_t = 15)]
    pub config_poll_secs: u64,
}

/// Where a configured role keeps its files, below `--state`.
pub struct Layout {
    pub identity: PathBuf,
    pub pki: PathBuf,
    /// The role's own data-link key (made here on first use; the server certifies it).
    pub data_key: PathBuf,
    pub key: PathBuf,
    pub config: PathBuf,
}

impl BootstrapArgs {
    pub fn layout(&self) -> Layout {
        Layout {
            identity: self.state.join("identity"),
            pki: self.state.join("pki"),
            data_key: self.state.join("data-key.pem"),
            key: self.state.join("tenant.key"),
            config: self.state.join("config.json"),
        }
    }

    fn server(&self) -> &str {
        self.config_server.as_deref().unwrap_or_default()
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        let l = self.layout();
        Client::from_cert_dir(self.server(), &l.identity)
            .with_context(|| format!("loading this role's identity in {}", l.identity.display()))
    }

    /// What identifies the identity's certificate file as it is now (inode, modification
    /// time): a long-lived client loads the identity again when this changes, as after
    /// `ferry ctl renew` swapped a renewed one in.
    pub fn identity_stamp(&self) -> Option<(u64, std::time::SystemTime)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(self.layout().identity.join("client-cert.pem")).ok()?;
        Some((m.ino(), m.modified().ok()?))
    }

    /// Enroll when there is no identity yet, then ask for the configuration (reporting
    /// `address`) and write what it holds to the state directory. When the server cannot be
    /// reached, the configuration kept from the last answer is used.
    pub fn fetch(&self, address: Option<String>) -> anyhow::Result<RoleConfig> {
        let l = self.layout();
        std::fs::create_dir_all(&self.state)
            .with_context(|| format!("creating {}", self.state.display()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        if !l.identity.join("client-cert.pem").exists() {
            let (Some(token), Some(pin)) = (&self.token, &self.ca_sha256) else {
                bail!(
                    "{} holds no identity yet: the first start needs --token and --ca-sha256 (from `ferry ctl token --appliance ...`)",
                    l.identity.display()
                );
            };
            let p = rt.block_on(crate::control::enroll(
                self.server(),
                token,
                Some(pin),
                None,
                &l.identity,
            ))?;
            tracing::info!(name = %p.name, tenant = ?p.tenant, "enrolled with the configuration server");
        }
        let asked = rt.block_on(ask(&self.client()?, self.request(address)?));
        let cfg = match asked {
            Ok(c) => c,
            Err(e) if l.config.exists() && !e.refused => {
                tracing::warn!(error = %e.error, "configuration server unreachable; using the configuration kept from its last answer");
                let text = std::fs::read_to_string(&l.config)?;
                serde_json::from_str(&text).with_context(|| {
                    format!("{} is not a role configuration", l.config.display())
                })?
            }
            Err(e) => return Err(e.error),
        };
        self.write(&cfg)?;
        Ok(cfg)
    }

    /// What the role says when it asks: its address and a signing request for its own
    /// data-link key (its private key never leaves this machine).
    fn request(&self, address: Option<String>) -> anyhow::Result<ConfigRequest> {
        let l = self.layout();
        let (_, csr) = ferry_pki::own_key_request(&l.data_key)
            .with_context(|| format!("this role's data-link key {}", l.data_key.display()))?;
        Ok(ConfigRequest {
            address,
            data_csr_pem: Some(csr),
        })
    }

    fn write(&self, cfg: &RoleConfig) -> anyhow::Result<()> {
        let l = self.layout();
        let (key, client, server) = match cfg {
            RoleConfig::ProcessServer(c) => (&c.tenant_key_hex, Some(&c.client), &c.server),
            RoleConfig::MasterTarget(c) => (&c.tenant_key_hex, None, &c.server),
        };
        // A certificate issued for this role's own key comes without a key.
        let own = std::fs::read_to_string(&l.data_key).unwrap_or_default();
        let key_of = |p: &'_ ferry_api::DataPki| -> String {
            if p.key_pem.is_empty() {
                own.clone()
            } else {
                p.key_pem.clone()
            }
        };
        let (server_key, client_key) = (key_of(server), client.map(key_of));
        let mut files = vec![
            ("server-cert.pem", server.cert_pem.as_str()),
            ("server-key.pem", server_key.as_str()),
            ("ca-cert.pem", server.ca_cert_pem.as_str()),
        ];
        if let (Some(c), Some(k)) = (client, &client_key) {
            files.push(("client-cert.pem", c.cert_pem.as_str()));
            files.push(("client-key.pem", k.as_str()));
        }
        ferry_pki::write_files(&l.pki, &files)?;
        write_secret(&l.key, &format!("{key}\n"))?;
        write_secret(&l.config, &serde_json::to_string_pretty(cfg)?)
    }

    /// Ask again every poll interval, on a thread of its own; when the answer differs from
    /// `current`, restart this process in place with the same arguments. `cache`: a process
    /// server's cache directory, whose disks are reported each time.
    pub fn watch(&self, current: RoleConfig, address: Option<String>, cache: Option<PathBuf>) {
        let me = self.clone();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "no runtime for the configuration watch");
                    return;
                }
            };
            // The first report goes out at once: the server counts an appliance that has not
            // reported since its enrollment as unreachable.
            let mut first = true;
            // This identity's name (for the appliance report's path), asked once.
            let mut name: Option<String> = None;
            // Each disk's bytes sent at the previous report, for its throughput.
            let mut sent = Sent::new();
            loop {
                if !first {
                    std::thread::sleep(Duration::from_secs(me.config_poll_secs.max(1)));
                }
                first = false;
                let mut client = match me.client() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "configuration watch");
                        continue;
                    }
                };
                if rt.block_on(me.renew_if_due(&client)) {
                    match me.client() {
                        Ok(c) => client = c,
                        Err(e) => {
                            tracing::warn!(error = %e, "configuration watch");
                            continue;
                        }
                    }
                }
                let disks = match (&cache, &current) {
                    (Some(cache), RoleConfig::ProcessServer(c)) => {
                        Some((c.tenant.as_str(), c.disks.as_slice(), cache.as_path()))
                    }
                    _ => None,
                };
                if name.is_none() {
                    name = rt
                        .block_on(client.get::<ferry_api::Principal>("/v1/whoami"))
                        .map(|p| p.name)
                        .ok();
                }
                if let Some(name) = &name {
                    rt.block_on(report(&client, name, disks, &mut sent));
                }
                let req = match me.request(address.clone()) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "configuration watch");
                        continue;
                    }
                };
                match rt.block_on(ask(&client, req)) {
                    Ok(new) if new != current => {
                        tracing::info!("the configuration server changed this role's configuration: restarting to apply it");
                        if let Err(e) = me.write(&new) {
                            tracing::error!(error = %e, "cannot keep the new configuration; not restarting");
                            continue;
                        }
                        restart();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e.error, "asking the configuration server for changes")
                    }
                }
            }
        });
    }
}

/// A role renews its certificate when less than this share of its life is left.
pub const RENEW_WHEN_LEFT: (u64, u64) = (1, 3);

/// Whether a certificate valid from `not_before` to `not_after` is due for renewal at `now`.
pub fn renewal_due(not_before: u64, not_after: u64, now: u64) -> bool {
    let (num, den) = RENEW_WHEN_LEFT;
    let life = not_after.saturating_sub(not_before);
    not_after.saturating_sub(now).saturating_mul(den) < life.saturating_mul(num)
}

impl BootstrapArgs {
    /// Renew this role's identity (`ferry ctl renew`'s way: a new key made here, swapped in
    /// atomically, tried) when less than [`RENEW_WHEN_LEFT`] of its certificate's life is
    /// left. A failure is logged and tried again at the next poll; the role keeps its
    /// identity meanwhile. Returns whether the identity was renewed.
    async fn renew_if_due(&self, client: &Client) -> bool {
        let dir = self.layout().identity;
        let pem = std::fs::read_to_string(dir.join("client-cert.pem")).unwrap_or_default();
        let Some((from, until)) = ferry_config_server::ca::pem_validity(&pem) else {
            return false;
        };
        let now = ferry_config_server::app::now_unix();
        if !renewal_due(from, until, now) {
            return false;
        }
        match crate::control::identity::renew(client, self.server(), &dir).await {
            Ok(e) => {
                let new = ferry_config_server::ca::pem_validity(&e.certificate_pem)
                    .map_or(0, |(_, until)| until);
                tracing::info!(
                    name = %e.principal.name,
                    old_expires_in_secs = until.saturating_sub(now),
                    new_expires = %ferry_config_server::app::format_time(new),
                    "renewed this role's certificate before it expires"
                );
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = %format!("{e:#}"),
                    expires_in_secs = until.saturating_sub(now),
                    "renewing this role's certificate failed; trying again at the next poll"
                );
                false
            }
        }
    }
}

struct AskError {
    error: anyhow::Error,
    /// The server answered and said no (as opposed to: could not be reached).
    refused: bool,
}

async fn ask(c: &Client, req: ConfigRequest) -> Result<RoleConfig, AskError> {
    c.call(Method::POST, "/v1/self/config", Some(&req))
        .await
        .map_err(|e| AskError {
            refused: matches!(e, ferry_config_server::client::ClientError::Api { .. }),
            error: anyhow::Error::new(e)
                .context("asking the configuration server for this role's configuration"),
        })
}

/// A process server's disks (each one's state and RPO, from its status file), its cache use and
/// upload backlog, to the configuration server, which raises and clears the alerts; a master
/// target reports only that it is there (no report for a while is the "unreachable" alert).
/// A disk's bytes sent to the master target when it was last reported, and when.
type Sent = std::collections::HashMap<String, (u64, std::time::Instant)>;

async fn report(
    c: &Client,
    me: &str,
    process: Option<(&str, &[ferry_api::AssignedDisk], &Path)>,
    sent: &mut Sent,
) {
    use ferry_process_server::status::State;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    // The oldest write not yet at the recovery site is at most as old as the newest point of a
    // disk that has not caught up (an upper bound: the status does not time journal records).
    let mut backlog: f64 = 0.0;
    let (tenant, disks, cache) = match process {
        Some((t, d, c)) => (t, d, Some(c)),
        None => ("", &[][..], None),
    };
    for d in disks {
        let Some(Ok(s)) =
            cache.map(|c| ferry_process_server::status::read(&c.join(&d.name).join("status.json")))
        else {
            continue;
        };
        let state = match s.state {
            State::ResyncRequired => DiskState::ResyncRequired,
            State::Resyncing => DiskState::Seeding,
            _ if s.acked_seq == 0 => DiskState::Seeding,
            _ => DiskState::Protected,
        };
        let rpo_seconds = (s.acked_point_created_unix_ns > 0)
            .then(|| now_ns.saturating_sub(s.acked_point_created_unix_ns) as f64 / 1e9);
        if !s.caught_up() {
            backlog = backlog.max(rpo_seconds.unwrap_or_default());
        }
        // Replicated bytes per second since the previous report (counted at each commit).
        let now = std::time::Instant::now();
        let throughput = sent
            .insert(d.name.clone(), (s.bytes_sent, now))
            .map(|(bytes, at)| {
                s.bytes_sent.saturating_sub(bytes) as f64
                    / now.duration_since(at).as_secs_f64().max(1e-3)
            });
        let r = DiskReport {
            state,
            rpo_seconds,
            throughput_bytes_per_sec: throughput,
            journal_bytes: Some(s.journal_used_bytes),
            backlog_records: Some(s.journal_durable_seq.saturating_sub(s.acked_journal_seq)),
            bytes_sent: Some(s.bytes_sent),
            uplink_share: s.uplink.as_ref().map(|u| u.fraction),
        };
        let path = format!(
            "/v1/tenants/{tenant}/machines/{}/disks/{}/report",
            d.machine, d.name
        );
        if let Err(e) = c
            .call::<_, ferry_api::Disk>(Method::PUT, &path, Some(&r))
            .await
        {
            tracing::warn!(disk = %d.name, error = %e, "reporting the disk to the configuration server");
        }
    }
    let cache_free_ratio = cache
        .and_then(|c| rustix::fs::statvfs(c).ok())
        .filter(|s| s.f_blocks > 0)
        .map(|s| s.f_bavail as f64 / s.f_blocks as f64);
    let (cpu, memory) = ferry_api::own_process_stats();
    let r = ferry_api::ApplianceReport {
        cache_free_ratio,
        upload_backlog_secs: cache.map(|_| backlog),
        cpu_seconds: Some(cpu),
        memory_bytes: Some(memory),
    };
    let path = format!("/v1/appliances/{me}/report");
    if let Err(e) = c
        .call::<_, ferry_api::ApplianceReport>(Method::PUT, &path, Some(&r))
        .await
    {
        tracing::warn!(error = %e, "reporting the appliance to the configuration server");
    }
}

/// Replace this process by a fresh run of the same command line.
fn restart() -> ! {
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .exec();
    tracing::error!(error = %err, "cannot restart; exiting so that the service manager does");
    std::process::exit(75);
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn renewal_is_due_in_the_last_third_of_the_life() {
        use super::renewal_due;
        assert!(!renewal_due(1000, 1300, 1000));
        assert!(!renewal_due(1000, 1300, 1200));
        assert!(renewal_due(1000, 1300, 1201));
        assert!(renewal_due(1000, 1300, 5000)); // expired: still tried (and refused)
        let year = 365 * 86400;
        assert!(!renewal_due(0, year, year / 2));
        assert!(renewal_due(0, year, year - 100 * 86400));
    }
}
