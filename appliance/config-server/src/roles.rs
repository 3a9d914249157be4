//! Role configuration: what a process server or a master target needs to run, answered to its
//! enrolled certificate (`POST /v1/self/config`, `ferry_api::roles`).
//!
//! The server keeps, besides the inventory: a data CA per tenant (`<state>/data-pki/<tenant>`,
//! created on first use, in the layout `ferry pki-init` makes; a master target trusts only its
//! tenant's CA, so another tenant's process server cannot open its replication link), the certificates it issued from it per
//! appliance (reissued only when the names they must hold change, so that a role polling its
//! configuration sees the same answer until something really changed), and one data key per
//! tenant (made on first use; the key chunks are named and sealed with). Both trees are secrets
//! at rest; only the configuration server's own user reads its state directory.

use crate::app::{Caller, Shared};
use crate::error::{ApiError, Body};
use crate::store::trees;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use ferry_api::{
    Appliance, ApplianceRole, AssignedDisk, ConfigRequest, DataPki, Disk, DiskRetention, Machine,
    MasterTargetConfig, Policy, ProcessServerConfig, ReplicationMode, RoleConfig,
};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

/// A certificate issued from the data CA, and the names it was issued for.
#[derive(Serialize, Deserialize)]
struct IssuedCert {
    names: Vec<String>,
    cert_pem: String,
    /// Empty when issued for the role's own key ([`ConfigRequest::data_csr_pem`]).
    key_pem: String,
    /// SHA-256 of the role's public key it was issued for (empty: a key made here).
    #[serde(default)]
    public_key_sha256: String,
}

fn refuse(code: &'static str, msg: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, msg)
}

pub async fn config(
    State(app): State<Shared>,
    Caller(p): Caller,
    Body(req): Body<ConfigRequest>,
) -> Result<Json<RoleConfig>, ApiError> {
    let _w = app.write.lock().await;
    let Some(role) = p.appliance else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} is a person, not an appliance: only an enrolled process server or master target asks for a role configuration",
                p.name
            ),
        ));
    };
    req.validate()?;
    let Some(tenant) = p.tenant.clone() else {
        return Err(refuse(
            "no-tenant",
            format!(
                "appliance {} was enrolled without a tenant; a process server or master target serves one tenant: enroll it with a token made with --tenant",
                p.name
            ),
        ));
    };
    let mut me: Appliance = app
        .store
        .get(trees::APPLIANCES, &p.name)?
        .ok_or_else(|| ApiError::not_found(format!("no appliance {}", p.name)))?;
    if role == ApplianceRole::MasterTarget && req.address.is_some() && me.address != req.address {
        tracing::info!(appliance = %p.name, address = ?req.address, "master target reported its address");
        me.address = req.address.clone();
        app.store.put(trees::APPLIANCES, &p.name, &me)?;
    }
    let key = tenant_key(&app, &tenant)?;
    let cfg = match role {
        ApplianceRole::MasterTarget => {
            let Some(addr) = me.address.clone() else {
                return Err(refuse(
                    "no-address",
                    "a master target reports the address process servers dial (HOST:PORT) when it asks for its configuration".into(),
                ));
            };
            // Validated when it was reported.
            let host =
                ferry_api::validate::host_port(&addr).map_or(addr.clone(), |(h, _)| h.to_string());
            RoleConfig::MasterTarget(MasterTargetConfig {
                server: data_cert(
                    &app,
                    &tenant,
                    &p.name,
                    "replication-server",
                    &[host],
                    true,
                    req.data_csr_pem.as_deref(),
                )?,
                retention: retention(&app, &tenant)?,
                revoked_client_sha256: crate::identities::revoked_data_certs(&app.store, &tenant)?,
                tenant,
                tenant_key_hex: key,
            })
        }
        ApplianceRole::ProcessServer => {
            process_server(&app, &p.name, tenant, key, req.data_csr_pem.as_deref())?
        }
        ApplianceRole::ConfigurationServer => {
            return Err(refuse(
                "no-role-config",
                "a configuration server has no role configuration".into(),
            ))
        }
    };
    app.store.flush().await?;
    Ok(Json(cfg))
}

/// The retention tiers of every disk of the tenant whose machine's policy names some.
fn retention(app: &Shared, tenant: &str) -> Result<Vec<DiskRetention>, ApiError> {
    let mut out = Vec::new();
    let machines: Vec<Machine> = app.store.list(trees::MACHINES, &format!("{tenant}/"))?;
    for m in machines {
        let policy: Option<Policy> = app
            .store
            .get(trees::POLICIES, &format!("{tenant}/{}", m.policy))?;
        let Some(policy) = policy.filter(|p| !p.retention.is_empty()) else {
            continue;
        };
        let ds: Vec<Disk> = app
            .store
            .list(trees::DISKS, &format!("{tenant}/{}/", m.name))?;
        out.extend(ds.into_iter().map(|d| DiskRetention {
            disk: d.name,
            tiers: policy.retention.clone(),
        }));
    }
    out.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(out)
}

fn process_server(
    app: &Shared,
    me: &str,
    tenant: String,
    key: String,
    csr: Option<&str>,
) -> Result<RoleConfig, ApiError> {
    let appliances: Vec<Appliance> = app.store.list(trees::APPLIANCES, "")?;
    let t = tenant.as_str();
    let of_tenant = |r: ApplianceRole| {
        appliances
            .iter()
            .filter(move |a| a.role == r && a.tenant.as_deref() == Some(t))
    };
    let masters: Vec<&Appliance> = of_tenant(ApplianceRole::MasterTarget).collect();
    let master = match masters.as_slice() {
        [] => {
            return Err(refuse(
                "no-master-target",
                format!("tenant {tenant} has no master target enrolled yet"),
            ))
        }
        [m] => m
            .address
            .clone()
            .ok_or_else(|| {
                refuse(
                    "no-master-target",
                    format!(
                        "master target {} of tenant {tenant} has not reported its address yet (it does when it starts with --config-server)",
                        m.name
                    ),
                )
            })?,
        _ => {
            return Err(refuse(
                "several-master-targets",
                format!(
                    "tenant {tenant} has {} master targets; a process server ships to one (not supported yet)",
                    masters.len()
                ),
            ))
        }
    };
    let only_one = of_tenant(ApplianceRole::ProcessServer).count() == 1;
    let mut disks = Vec::new();
    let machines: Vec<Machine> = app.store.list(trees::MACHINES, &format!("{tenant}/"))?;
    for m in machines {
        let mine = match &m.process_server {
            Some(ps) => ps == me,
            None => only_one,
        };
        if !mine {
            continue;
        }
        let policy: Policy = app
            .store
            .get(trees::POLICIES, &format!("{tenant}/{}", m.policy))?
            .ok_or_else(|| {
                refuse(
                    "no-policy",
                    format!(
                        "machine {} names policy {}, which does not exist",
                        m.name, m.policy
                    ),
                )
            })?;
        let ds: Vec<Disk> = app
            .store
            .list(trees::DISKS, &format!("{tenant}/{}/", m.name))?;
        for d in ds {
            disks.push(AssignedDisk {
                machine: m.name.clone(),
                name: d.name,
                size_bytes: d.size_bytes,
                source: d.source,
                periodic: policy.mode == ReplicationMode::Periodic,
                interval_secs: policy.checkpoint_interval_secs,
                compression: policy.compression,
                bandwidth: policy.bandwidth.clone(),
                priority: policy.priority,
            });
        }
    }
    Ok(RoleConfig::ProcessServer(ProcessServerConfig {
        client: data_cert(
            app,
            &tenant,
            me,
            "replication-client",
            &[me.to_string()],
            false,
            csr,
        )?,
        server: data_cert(app, &tenant, me, "nbd-server", &[me.to_string()], true, csr)?,
        tenant,
        master,
        tenant_key_hex: key,
        disks,
    }))
}

/// The tenant's data key, hex; made on first use.
fn tenant_key(app: &Shared, tenant: &str) -> Result<String, ApiError> {
    if let Some(k) = app.store.get::<String>(trees::TENANT_KEYS, tenant)? {
        return Ok(k);
    }
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ApiError::internal("no randomness from the system"))?;
    let k = hex::encode(b);
    app.store.put(trees::TENANT_KEYS, tenant, &k)?;
    Ok(k)
}

/// Every data-link certificate issued to `appliance`: (its key in `DATA_CERTS`, its PEM).
pub fn data_certs_of(
    store: &crate::store::Store,
    appliance: &str,
) -> Result<Vec<(String, String)>, crate::store::StoreError> {
    Ok(store
        .list_keyed::<IssuedCert>(trees::DATA_CERTS, &format!("{appliance}/"))?
        .into_iter()
        .map(|(k, c)| (k, c.cert_pem))
        .collect())
}

/// The appliance's certificate of `kind` from its tenant's data CA, for the key of its signing
/// request `csr` (else for a key made here), issued again only when `names` or that key changed.
fn data_cert(
    app: &Shared,
    tenant: &str,
    appliance: &str,
    kind: &str,
    names: &[String],
    server: bool,
    csr: Option<&str>,
) -> Result<DataPki, ApiError> {
    // One CA per tenant: a tenant's master target trusts only its own tenant's process servers,
    // so another tenant's certificate fails the replication link's handshake.
    let dir = app.state_dir.join("data-pki").join(tenant);
    if !dir.join("ca-cert.pem").exists() {
        ferry_pki::init(&dir, &[]).map_err(ApiError::internal)?;
    }
    let ca_cert_pem =
        std::fs::read_to_string(dir.join("ca-cert.pem")).map_err(ApiError::internal)?;
    let k = format!("{appliance}/{kind}");
    let bad_csr = |e: ferry_pki::PkiError| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("data_csr_pem: not a usable certificate signing request: {e}"),
        )
    };
    let want_key = match csr {
        Some(csr) => ferry_pki::public_key_sha256(csr).map_err(bad_csr)?,
        None => String::new(),
    };
    let c = match app.store.get::<IssuedCert>(trees::DATA_CERTS, &k)? {
        Some(c) if c.names == names && c.public_key_sha256 == want_key => c,
        _ => {
            let (cert_pem, key_pem, public_key_sha256) = match csr {
                Some(csr) => {
                    let (cert, fp) =
                        ferry_pki::issue_for_request(&dir, names, server, csr).map_err(bad_csr)?;
                    (cert, String::new(), fp)
                }
                None => {
                    let (cert, key) =
                        ferry_pki::issue(&dir, names, server).map_err(ApiError::internal)?;
                    (cert, key, String::new())
                }
            };
            let c = IssuedCert {
                names: names.to_vec(),
                cert_pem,
                key_pem,
                public_key_sha256,
            };
            app.store.put(trees::DATA_CERTS, &k, &c)?;
            c
        }
    };
    Ok(DataPki {
        ca_cert_pem,
        cert_pem: c.cert_pem,
        key_pem: c.key_pem,
    })
}
