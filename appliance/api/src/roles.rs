//! What a process server or a master target is told by the configuration server: everything it
//! needs to run, so that bootstrapping one takes only the server's address and an enrollment
//! token (`docs/api.md`, "Role configuration").
//!
//! A role asks with its enrolled certificate (`POST /v1/self/config`), at start and then every
//! poll interval; a changed answer makes it restart its data path with the new configuration.

use crate::validate::{self, Invalid};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Sent by the role when it asks for its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigRequest {
    /// Where the role takes replication connections, `HOST:PORT` as process servers should dial
    /// it (a master target's address; a process server sends none).
    #[serde(default)]
    pub address: Option<String>,
    /// A certificate signing request (PEM) for the role's own data-link key: its certificates
    /// are issued for that key, and the answer carries no private key. Without one (a role of
    /// an older version), the server makes the key and sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_csr_pem: Option<String>,
}

impl ConfigRequest {
    pub fn validate(&self) -> Result<(), Invalid> {
        if let Some(a) = &self.address {
            validate::text("address", a)?;
            if validate::host_port(a).is_none() {
                return Err(Invalid::new("address", "must be HOST:PORT"));
            }
        }
        if let Some(csr) = &self.data_csr_pem {
            if csr.len() > CSR_MAX || !csr.trim_start().starts_with(CSR_HEADER) {
                return Err(Invalid::new(
                    "data_csr_pem",
                    format!("must be a PEM certificate signing request of at most {CSR_MAX} bytes"),
                ));
            }
        }
        Ok(())
    }
}

/// Certificates for the replication link (and the NBD link from the hypervisor), issued by the
/// site's data CA; the key is made by the configuration server and sent once per request over
/// the mutual-TLS API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DataPki {
    pub ca_cert_pem: String,
    pub cert_pem: String,
    /// Empty when the certificate is for the role's own key (it sent a signing request).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_pem: String,
}

const CSR_MAX: usize = 8192;
const CSR_HEADER: &str = "-----BEGIN CERTIFICATE REQUEST-----";

/// One disk a process server protects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AssignedDisk {
    pub machine: String,
    pub name: String,
    pub size_bytes: u64,
    /// The disk's `source` as configured: empty for a disk the hypervisor mirrors to the
    /// process server, `qmp=PATH,node=NODE,nbd=PATH[,fleece=PATH]` for one the process
    /// server can read on its host (resync; periodic protection needs `fleece=`), or the path
    /// of the disk's image at the protected site (what reprotect and failback write), which
    /// the process server leaves alone.
    pub source: String,
    pub periodic: bool,
    /// The machine's policy: checkpoint (continuous) or cycle (periodic) interval.
    pub interval_secs: u32,
    /// The machine's policy: how the disk's chunks are compressed.
    #[serde(default)]
    pub compression: crate::policy::Compression,
    /// The machine's policy: the limit on what its disks send to the master target, together.
    #[serde(default)]
    pub bandwidth: crate::policy::Bandwidth,
    /// The machine's policy: its weight in the process server's uplink against other machines.
    #[serde(default)]
    pub priority: crate::policy::Priority,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessServerConfig {
    pub tenant: String,
    /// The master target to ship to, `HOST:PORT`.
    pub master: String,
    /// The tenant's data key, hex (the key chunks are named and sealed with).
    pub tenant_key_hex: String,
    /// Client certificate for the replication link; also the NBD server's certificate.
    pub client: DataPki,
    pub server: DataPki,
    pub disks: Vec<AssignedDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MasterTargetConfig {
    pub tenant: String,
    pub tenant_key_hex: String,
    /// Server certificate for the replication link (valid for the address it reported).
    pub server: DataPki,
    /// The retention tiers of each disk whose machine's policy names some (the others keep
    /// the master target's own tiers).
    #[serde(default)]
    pub retention: Vec<DiskRetention>,
    /// SHA-256 (DER, hex) of the replication client certificates of the tenant's process
    /// servers whose identity was revoked: refused at the handshake although the tenant's data
    /// CA signed them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub revoked_client_sha256: Vec<String>,
}

/// The retention tiers a disk's points are thinned by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskRetention {
    pub disk: String,
    pub tiers: Vec<crate::policy::RetentionTier>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "role")]
pub enum RoleConfig {
    ProcessServer(ProcessServerConfig),
    MasterTarget(MasterTargetConfig),
}
