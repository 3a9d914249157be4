//! Failover jobs: test failover and its cleanup, planned and unplanned failover, commit,
//! reprotect and failback of a recovery plan, and where each plan stands between them.
//!
//! A job is a list of steps run in order; every step's state and progress is stored before and
//! after it runs, so a job survives a restart of the configuration server: it resumes at the
//! step that was running when that step may safely run again, and otherwise ends `failed`
//! saying which step was interrupted and which steps were done.

use crate::validate::Invalid;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// Every machine gets its recovery point through a copy-on-write scratch layer at the
    /// recovery site, on the test networks; replication continues.
    TestFailover,
    /// Discard a test failover's scratch layers.
    Cleanup,
    /// The source stops (pre-hooks), the journal drains, the final point goes live.
    PlannedFailover,
    /// The source is gone: the latest (or a chosen) point goes live.
    UnplannedFailover,
    /// Accept a failover: the recovery site is now where the machines run.
    Commit,
    /// Reverse the direction: bring the original site's disks up to date by checksum resync.
    Reprotect,
    /// A planned failover back to the original site.
    Failback,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::TestFailover => "test-failover",
            JobKind::Cleanup => "cleanup",
            JobKind::PlannedFailover => "planned-failover",
            JobKind::UnplannedFailover => "unplanned-failover",
            JobKind::Commit => "commit",
            JobKind::Reprotect => "reprotect",
            JobKind::Failback => "failback",
        }
    }

    /// The plan phase a job of this kind starts from, and the one it leaves on success.
    pub fn transition(self) -> (&'static [PlanPhase], PlanPhase) {
        use PlanPhase::*;
        match self {
            JobKind::TestFailover => (&[Protected], TestRunning),
            JobKind::Cleanup => (&[TestRunning], Protected),
            JobKind::PlannedFailover | JobKind::UnplannedFailover => (&[Protected], FailedOver),
            JobKind::Commit => (&[FailedOver], Committed),
            JobKind::Reprotect => (&[Committed, Reprotected], Reprotected),
            JobKind::Failback => (&[Reprotected], Protected),
        }
    }
}

/// Where a recovery plan stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PlanPhase {
    /// Running at the protected site and replicating to the recovery site.
    #[default]
    Protected,
    /// A test failover runs beside replication (scratch layers exist until `cleanup`).
    TestRunning,
    /// Running at the recovery site; not yet committed.
    FailedOver,
    /// Committed at the recovery site; the original site is stale until reprotect.
    Committed,
    /// The original site's disks were brought up to date from the recovery site.
    Reprotected,
}

impl PlanPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            PlanPhase::Protected => "protected",
            PlanPhase::TestRunning => "test-running",
            PlanPhase::FailedOver => "failed-over",
            PlanPhase::Committed => "committed",
            PlanPhase::Reprotected => "reprotected",
        }
    }
}

/// `POST /v1/tenants/{tenant}/plans/{plan}/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartJob {
    pub kind: JobKind,
    /// Test and unplanned failover: the newest point of each disk at or before this time
    /// (Unix seconds); none means the latest.
    #[serde(default)]
    pub point_unix: Option<u64>,
}

impl StartJob {
    pub fn validate(&self) -> Result<(), Invalid> {
        match (self.kind, self.point_unix) {
            (JobKind::TestFailover | JobKind::UnplannedFailover, _) | (_, None) => Ok(()),
            (k, Some(_)) => Err(Invalid::new(
                "point_unix",
                format!(
                    "a {} takes no point (only test and unplanned failovers choose one)",
                    k.as_str()
                ),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Pending,
    Running,
    Done,
    Failed,
}

/// One step of a job: what it does, how far it got, what it found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    /// E.g. `pre-hooks`, `scratch web`, `drain web`, `start web`.
    pub name: String,
    pub state: StepState,
    /// Work done and work to do, in the step's own unit (disks, hooks, bytes).
    pub done: u64,
    pub total: u64,
    /// What the step did or why it failed (e.g. the point chosen, the bytes sent).
    #[serde(default)]
    pub detail: String,
    pub started_unix: Option<u64>,
    pub ended_unix: Option<u64>,
}

/// What a job left behind for one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiskOutcome {
    pub machine: String,
    pub disk: String,
    /// The recovery point used (test, planned and unplanned failover), or the one failback's
    /// `protect` step committed.
    pub point_seq: Option<u64>,
    pub point_created_unix_ns: Option<u64>,
    /// Where the disk is now: a scratch overlay, a live disk, the original disk.
    pub path: String,
    /// Reprotect and failback: blocks compared, blocks and bytes sent, bytes of block names.
    #[serde(default)]
    pub resync: Option<ResyncReport>,
    /// Failback's `protect` step: what the process server's checksum resync sent to the
    /// recovery site to protect the disk again (bytes of block frames, compressed and
    /// sealed); `point_seq` is then the recovery point it committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect: Option<ResyncReport>,
}

/// A checksum resync: only blocks whose names differ are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct ResyncReport {
    pub disk_bytes: u64,
    pub blocks_compared: u64,
    pub blocks_sent: u64,
    pub bytes_sent: u64,
    /// Bytes of block names compared across the sites, 32 a block (in the split resync, the
    /// live disk's names the master target sent).
    pub hash_bytes: u64,
    /// Times the split resync tried to connect to the master target again after its
    /// connection was lost (each attempt, whether it got through or not).
    #[serde(default)]
    pub reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    pub id: u64,
    pub tenant: String,
    pub plan: String,
    pub kind: JobKind,
    pub point_unix: Option<u64>,
    pub state: JobState,
    /// Who started it (the principal's name).
    pub by: String,
    pub created_unix: u64,
    pub updated_unix: u64,
    pub steps: Vec<Step>,
    /// Why it failed, naming the steps that were done (so nothing is half-applied silently).
    pub error: Option<String>,
    /// Times the job was picked up again after a configuration server restart.
    #[serde(default)]
    pub resumed: u32,
    #[serde(default)]
    pub disks: Vec<DiskOutcome>,
}

/// `GET /v1/tenants/{tenant}/plans/{plan}/status`: where a plan stands.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct PlanStatus {
    pub plan: String,
    pub phase: PlanPhase,
    /// The job running on the plan, if one does (one at a time).
    pub running_job: Option<u64>,
    pub last_job: Option<u64>,
    /// The disks as the last successful job left them (scratch layers, live disks).
    #[serde(default)]
    pub disks: Vec<DiskOutcome>,
    /// A test failover's instant-access NBD server (loopback port), to serve again after a
    /// restart while the test runs.
    #[serde(default)]
    pub test_nbd_port: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_only_where_chosen() {
        let mut s = StartJob {
            kind: JobKind::UnplannedFailover,
            point_unix: Some(1),
        };
        s.validate().unwrap();
        s.kind = JobKind::PlannedFailover;
        assert_eq!(s.validate().unwrap_err().field, "point_unix");
        assert_eq!(
            JobKind::Cleanup.transition(),
            (&[PlanPhase::TestRunning][..], PlanPhase::Protected)
        );
    }
}

/// A recovery point of one of a machine's disks, as the recovery site holds it
/// (`GET /v1/tenants/{tenant}/machines/{machine}/points`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointInfo {
    pub disk: String,
    pub seq: u64,
    pub created_unix_ns: u64,
    /// `crash` or `application`.
    pub consistency: String,
    /// The consistency-group cut the point ends at, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_cut: Option<u64>,
    /// Every disk of the machine has a point at this point's cut: together they are one
    /// crash-consistent state of the machine, which a failover at this time uses.
    #[serde(default)]
    pub machine_consistent: bool,
}
