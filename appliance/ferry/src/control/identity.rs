//! `ferry ctl` for identities: the certificates the configuration server issued, revoking
//! them, and renewing the caller's own (`docs/api.md`, "Revocation and renewal").

use super::{opt, show, table, when};
use anyhow::{bail, Context};
use clap::Subcommand;
use ferry_api::{Enrolled, IssuedCertificate, Principal, RenewRequest, RevokeRequest};
use ferry_config_server::client::{Client, Method};
use std::path::Path;

#[derive(Subcommand)]
pub enum IdentityCmd {
    /// The certificates this server issued (in your scope): whom each stands for, its expiry,
    /// whether it was revoked.
    Certs,
    /// Revoke a certificate (by SHA-256, or a unique prefix of at least 8 hex digits), or
    /// every certificate of an identity (--name): its next call is refused.
    Revoke {
        #[arg(required_unless_present = "name", conflicts_with = "name")]
        sha256: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// With --name: the identity's tenant (default: your own).
        #[arg(long, requires = "name")]
        tenant: Option<String>,
        /// Why: recorded with the revocation and shown to the holder when refused.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Trade this identity's certificate (--cert-dir) for a fresh one, without a token: the
    /// new key is made here, the new certificate replaces the old in --cert-dir, and the old
    /// one is revoked as soon as the new one is used (done here, right after replacing it).
    Renew,
}

fn state(c: &IssuedCertificate) -> String {
    match (&c.revoked, &c.replaces) {
        (Some(r), _) => format!("revoked {} by {}", when(r.at_unix), r.by),
        (None, Some(_)) => "valid (new; not used yet)".into(),
        (None, None) => "valid".into(),
    }
}

pub async fn run(
    c: &Client,
    json: bool,
    cmd: IdentityCmd,
    server: &str,
    cert_dir: &Path,
) -> anyhow::Result<()> {
    match cmd {
        IdentityCmd::Certs => {
            let v: Vec<IssuedCertificate> = c.get("/v1/certificates").await?;
            show(json, &v, |v| {
                table(
                    &["sha256", "name", "role", "tenant", "expires", "state"],
                    v.iter()
                        .map(|c| {
                            vec![
                                c.sha256.chars().take(16).collect(),
                                c.principal.name.clone(),
                                c.principal.role.as_str().into(),
                                opt(&c.principal.tenant),
                                c.expires_unix.map_or("-".into(), when),
                                state(c),
                            ]
                        })
                        .collect(),
                )
            })
        }
        IdentityCmd::Revoke {
            sha256,
            name,
            tenant,
            reason,
        } => {
            let req = RevokeRequest {
                sha256,
                name,
                tenant,
                reason,
            };
            let v: Vec<IssuedCertificate> = c
                .call(Method::POST, "/v1/certificates/revoke", Some(&req))
                .await?;
            show(json, &v, |v| {
                for c in v {
                    println!(
                        "revoked certificate {} of {} ({})",
                        c.sha256,
                        c.principal.name,
                        c.principal.role.as_str()
                    );
                }
            })
        }
        IdentityCmd::Renew => {
            let e = renew(c, server, cert_dir).await?;
            show(json, &e, |e| {
                println!(
                    "renewed {} ({}): new certificate {} in {}; the old one is revoked",
                    e.principal.name,
                    e.principal.role.as_str(),
                    ferry_config_server::ca::pem_fingerprint(&e.certificate_pem)
                        .unwrap_or_default(),
                    cert_dir.display()
                )
            })
        }
    }
}

/// Renew the identity in `cert_dir` with the server: a new key made here, the new identity
/// swapped in for the old directory in one rename (so that `cert_dir` always holds a matching
/// key and certificate), then tried (its first use revokes the old one). Appliances renew
/// theirs with this too (`--cert-dir {state}/identity`): a running role reads its identity
/// again for every poll. Returns the answer, without the key.
pub(crate) async fn renew(c: &Client, server: &str, cert_dir: &Path) -> anyhow::Result<Enrolled> {
    let me: Principal = c.get("/v1/whoami").await?;
    let (key, csr) = ferry_config_server::ca::key_and_csr(&me.name)?;
    let req = RenewRequest { csr_pem: Some(csr) };
    let e: Enrolled = c.call(Method::POST, "/v1/self/renew", Some(&req)).await?;
    let dir = cert_dir
        .canonicalize()
        .with_context(|| format!("reading {}", cert_dir.display()))?;
    let Some(parent) = dir.parent() else {
        bail!("{} has no parent directory", dir.display());
    };
    let fresh = parent.join(format!(
        ".{}.renewed",
        dir.file_name().unwrap_or_default().to_string_lossy()
    ));
    ferry_config_server::serve::write_identity(&fresh, &e.ca_cert_pem, &e.certificate_pem, &key)
        .with_context(|| format!("writing {}", fresh.display()))?;
    // Swapped in before it is tried, so that a role using this directory never holds the old
    // certificate after the new one's first use revoked it; swapped back if it does not work.
    let swap = || {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &fresh,
            rustix::fs::CWD,
            &dir,
            rustix::fs::RenameFlags::EXCHANGE,
        )
        .with_context(|| format!("swapping {} and {}", dir.display(), fresh.display()))
    };
    swap()?;
    let works: Result<Principal, _> = Client::from_cert_dir(server, &dir)?.get("/v1/whoami").await;
    if let Err(err) = works {
        swap()?;
        bail!(
            "the renewed certificate (now in {}) was not accepted: {err}; {} holds the old one again",
            fresh.display(),
            dir.display()
        );
    }
    // `fresh` holds the old, now revoked, identity.
    std::fs::remove_dir_all(&fresh).with_context(|| format!("removing {}", fresh.display()))?;
    Ok(Enrolled {
        private_key_pem: None,
        ..e
    })
}
