//! What a site does in a failover, without any policy about when: the configuration server's
//! jobs decide the order and keep the state; this crate does the work on disks.
//!
//! - [`points`]: which recovery point of a disk a failover uses (latest, or the newest at or
//!   before a time), held against retention while it is used.
//! - [`scratch`]: a test failover's copy-on-write layer: the point is served read-only over NBD
//!   (instant access, [`ferry_master_target::instant`]) and a qcow2 overlay on top takes the
//!   test machine's writes, so they can never reach the replica; cleanup deletes the overlays.
//! - [`live`]: a failover's disks, materialized from the chosen point.
//! - [`drain`]: a planned failover waits until the process server has shipped every write.
//! - [`hooks`]: pre/post hooks and machine start commands (argv, no shell, a timeout).
//! - [`agent`]: a job's site steps, run by the role that holds the data when the
//!   configuration server orders them (or by the configuration server beside the site).
//! - [`resync`]: reprotect and failback bring a disk up to date from another by comparing
//!   keyed block names and sending only the blocks that differ (both disks reachable here:
//!   a configuration server beside the recovery site).
//! - [`split`]: the same resync split between the sites, run by the protected site's role
//!   beside the original disk: the master target sends the live disk's names and only the
//!   blocks that differ, sealed.
//! - [`protect`]: failback's last word on a disk: the process server drops its pre-failover
//!   journal and protects the disk again towards the recovery site by its checksum resync.
//!
//! The site is reached through its directories ([`Site`]): the master target's repository
//! (opened read-only beside it), and the process server's cache (its status files).

pub mod agent;
pub mod drain;
pub mod hooks;
pub mod live;
pub mod points;
pub mod protect;
pub mod resync;
pub mod scratch;
pub mod split;

/// The fault-injecting TCP proxy of the end-to-end tests (one proxy, used by both), for the
/// split resync's tests of lost connections.
#[cfg(test)]
#[path = "../../../tests/support/proxy.rs"]
mod proxy;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("recovery repository: {0}")]
    Repo(#[from] ferry_repository::RepoError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
    /// The connection to the other site went away (a link down, the peer restarted, silence):
    /// connecting again may get through, unlike a refusal.
    #[error("{0}")]
    Lost(String),
    #[error("{program} failed: {why}")]
    Command { program: String, why: String },
    #[error("NBD: {0}")]
    Nbd(String),
    #[error("QEMU: {0}")]
    Qemu(#[from] ferry_qemu::QemuError),
    #[error("tenant key {path}: {why}")]
    Key { path: String, why: String },
}

pub type Result<T> = std::result::Result<T, FailoverError>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FailoverError {
    let what = what.into();
    move |source| FailoverError::Io { what, source }
}

/// Where a site's data lives, as the job runner reaches it.
#[derive(Debug, Clone)]
pub struct Site {
    /// The master target's recovery repository (opened read-only: the master target keeps
    /// writing it, and replication continues during a test failover).
    pub repo: PathBuf,
    /// The tenant key file (64 hex digits).
    pub key: PathBuf,
    /// Scratch overlays and live disks: `{work}/{tenant}/{plan}/test|live/{machine}/{disk}`.
    pub work: PathBuf,
    /// The process server's cache directory (`{disk}/status.json`), for drain checks.
    pub process_cache: Option<PathBuf>,
}

impl Site {
    pub fn key(&self) -> Result<ferry_chunk::TenantKey> {
        let text = std::fs::read_to_string(&self.key).map_err(|e| FailoverError::Key {
            path: self.key.display().to_string(),
            why: e.to_string(),
        })?;
        ferry_chunk::TenantKey::from_hex(&text).map_err(|e| FailoverError::Key {
            path: self.key.display().to_string(),
            why: e.to_string(),
        })
    }

    /// A fresh read-only handle: it sees the points committed up to now.
    pub fn repository(&self) -> Result<ferry_repository::Repository> {
        Ok(ferry_repository::Repository::open_read_only(
            &self.repo,
            self.key()?,
        )?)
    }

    pub fn plan_dir(&self, tenant: &str, plan: &str) -> PathBuf {
        self.work.join(tenant).join(plan)
    }

    /// Where a test failover's overlay of one disk lives.
    pub fn scratch_path(&self, tenant: &str, plan: &str, machine: &str, disk: &str) -> PathBuf {
        self.plan_dir(tenant, plan)
            .join("test")
            .join(machine)
            .join(format!("{disk}.qcow2"))
    }

    /// Where a failover's live disk lives.
    /// (The master target finds it there by the same rule when the protected site resyncs
    /// from it: [`ferry_master_target::resync::live_path`].)
    pub fn live_path(&self, tenant: &str, plan: &str, machine: &str, disk: &str) -> PathBuf {
        ferry_master_target::resync::live_path(&self.work, tenant, plan, machine, disk)
    }
}

pub(crate) fn parent_dir(p: &Path) -> Result<()> {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    Ok(())
}
