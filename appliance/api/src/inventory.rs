//! The inventory: tenants, sites, appliances, protected machines and their disks.

use crate::validate::{self, Invalid};
use crate::Object;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A customer of the provider. Everything below it is invisible to other tenants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

impl Object for Tenant {
    const KIND: &'static str = "tenants";
    fn name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        validate::text("description", &self.description)
    }
}

/// Which side of the replication a site is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SiteKind {
    Protected,
    Recovery,
}

/// A place with hypervisors and appliances (the customer's room, the provider's data centre).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    pub kind: SiteKind,
    #[serde(default)]
    pub location: String,
}

impl Object for Site {
    const KIND: &'static str = "sites";
    fn name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        validate::text("location", &self.location)
    }
}

/// The role an appliance plays (DESIGN.md, "Roles").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ApplianceRole {
    ProcessServer,
    MasterTarget,
    ConfigurationServer,
}

impl ApplianceRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplianceRole::ProcessServer => "process-server",
            ApplianceRole::MasterTarget => "master-target",
            ApplianceRole::ConfigurationServer => "configuration-server",
        }
    }
}

/// An enrolled appliance. Created by enrollment, never by hand, so it has no create route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Appliance {
    pub name: String,
    pub role: ApplianceRole,
    pub tenant: Option<String>,
    pub enrolled_unix: u64,
    /// SHA-256 of the appliance's client certificate (DER), hex.
    pub cert_sha256: String,
    /// Where a master target takes replication connections (`HOST:PORT`), as it last reported
    /// when it asked for its configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// A protected virtual machine: a consistency group of disks that share one write order, so
/// that every recovery point of the machine is crash-consistent across all of its disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    /// The protected site the machine runs at.
    pub site: String,
    /// The replication policy (by name, in the same tenant).
    pub policy: String,
    #[serde(default)]
    pub description: String,
    /// The process server (an enrolled appliance of the tenant) that protects the machine's
    /// disks; none: the tenant's only process server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
}

impl Object for Machine {
    const KIND: &'static str = "machines";
    fn name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        validate::name("site", &self.site)?;
        validate::name("policy", &self.policy)?;
        if let Some(ps) = &self.process_server {
            validate::name("process_server", ps)?;
        }
        validate::text("description", &self.description)
    }
}

/// Where a disk stands in its protection life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// Configured, no data sent yet.
    #[default]
    New,
    Seeding,
    Protected,
    /// The cache overflowed or the replica was damaged: a checksum resync is needed.
    ResyncRequired,
    Paused,
}

impl DiskState {
    pub const ALL: [DiskState; 5] = [
        DiskState::New,
        DiskState::Seeding,
        DiskState::Protected,
        DiskState::ResyncRequired,
        DiskState::Paused,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::New => "new",
            DiskState::Seeding => "seeding",
            DiskState::Protected => "protected",
            DiskState::ResyncRequired => "resync-required",
            DiskState::Paused => "paused",
        }
    }
}

/// Largest disk we accept in configuration: 64 TiB, the largest the journal format plans for.
pub const DISK_SIZE_MAX: u64 = 64 << 40;

/// One disk of a protected machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    pub size_bytes: u64,
    /// Where the disk is on the hypervisor: how the process server reaches it
    /// (`qmp=PATH,node=NODE,nbd=PATH[,fleece=PATH]`), or its image's path, which reprotect
    /// and failback write.
    #[serde(default)]
    pub source: String,
    /// Reported by the process server; an administrator's write sets it only at creation.
    #[serde(default)]
    pub state: DiskState,
    /// The last reported recovery point objective (age of the newest recovery point), if known.
    #[serde(default)]
    pub rpo_seconds: Option<f64>,
    /// The last reported replication throughput (bytes per second), if known.
    #[serde(default)]
    pub throughput_bytes_per_sec: Option<f64>,
    /// The last reported journal use, backlog and bytes sent (see [`DiskReport`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backlog_records: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_sent: Option<u64>,
    /// The last reported fraction of the process server's uplink the disk's machine was
    /// entitled to by its priority (see [`DiskReport`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink_share: Option<f64>,
}

impl Object for Disk {
    const KIND: &'static str = "disks";
    fn name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        validate::range("size_bytes", self.size_bytes, 1, DISK_SIZE_MAX)?;
        validate::text("source", &self.source)?;
        if let Some(r) = self.rpo_seconds {
            if !r.is_finite() || r < 0.0 {
                return Err(Invalid::new("rpo_seconds", "must be a finite number >= 0"));
            }
        }
        Ok(())
    }
}

/// What a process server or master target reports about one disk it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskReport {
    pub state: DiskState,
    /// Age of the newest recovery point, in seconds; none while there is none.
    pub rpo_seconds: Option<f64>,
    /// Bytes per second replicated lately.
    #[serde(default)]
    pub throughput_bytes_per_sec: Option<f64>,
    /// Bytes the disk's journal holds on the cache (written, not yet acknowledged by the
    /// recovery site).
    #[serde(default)]
    pub journal_bytes: Option<u64>,
    /// Journal records durable at the process server and not yet at the recovery site.
    #[serde(default)]
    pub backlog_records: Option<u64>,
    /// Bytes sent to the master target since the process server started (on the wire, after
    /// dedup, compression and encryption).
    #[serde(default)]
    pub bytes_sent: Option<u64>,
    /// When the process server has an uplink budget (`--uplink-mbit`): the fraction of it,
    /// 0 to 1, the disk's machine's priority entitles it to against the machines sending now.
    #[serde(default)]
    pub uplink_share: Option<f64>,
}

impl DiskReport {
    pub fn validate(&self) -> Result<(), Invalid> {
        for (field, v) in [
            ("rpo_seconds", self.rpo_seconds),
            ("throughput_bytes_per_sec", self.throughput_bytes_per_sec),
        ] {
            if matches!(v, Some(r) if !r.is_finite() || r < 0.0) {
                return Err(Invalid::new(field, "must be a finite number >= 0"));
            }
        }
        if matches!(self.uplink_share, Some(s) if !(0.0..=1.0).contains(&s)) {
            return Err(Invalid::new("uplink_share", "must be from 0 to 1"));
        }
        Ok(())
    }
}

/// A disk with the machine it belongs to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MachineDisk {
    pub machine: String,
    pub disk: Disk,
}

/// `GET /v1/tenants/{tenant}/status`: a tenant at a glance in one answer (what `ferry ctl
/// status` shows), however many machines it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TenantStatus {
    pub machines: Vec<Machine>,
    /// Every disk of the tenant, machine by machine in the order of `machines`.
    pub disks: Vec<MachineDisk>,
    /// Where each plan stands, in name order.
    pub plans: Vec<crate::PlanStatus>,
    /// The tenant's active alerts (its disks and its appliances).
    pub alerts: Vec<crate::Event>,
}
