//! Step orders: what the configuration server's failover jobs ask a recovery-site role to do,
//! and the role's answer (`docs/api.md`, "Step orders").
//!
//! The master target holds the recovery repository and the tenant key, so it executes the
//! recovery-site steps of a job (choosing and holding points, instant access, scratch overlays,
//! live disks, cleanup); a process server executes the drain check of a planned failover on
//! its own journal, and the resync of reprotect and failback beside the original disk (asking
//! the master target, over the replication connection, for the live disk's block names and the
//! blocks that differ). A role polls `GET /v1/roles/orders` with its enrolled
//! certificate, runs what it is given, and answers `POST /v1/roles/orders/{order}/result`.
//!
//! An order's id is fixed when the job first reaches the step, so sending it again (after a
//! configuration server restart) names the same order: a role that already answered it answers
//! the same again without running it twice.

use crate::jobs::ResyncReport;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The disks of one machine, in the machine's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MachineDisks {
    pub machine: String,
    pub disks: Vec<String>,
}

/// One disk's point, and where the role keeps (or will keep) the disk made from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DiskAt {
    pub machine: String,
    pub disk: String,
    pub seq: u64,
    /// The overlay or live disk at the role (its own file system).
    pub path: String,
}

/// What a role is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "step")]
pub enum SiteStep {
    /// Choose each machine's points (one crash-consistent cut when the disks have one), hold
    /// them for `holder`, and name where each disk's overlay (`test`) or live disk goes.
    ChoosePoints {
        tenant: String,
        plan: String,
        holder: String,
        reason: String,
        machines: Vec<MachineDisks>,
        /// The newest point at or before this time; none: the newest.
        #[serde(default)]
        at_unix: Option<u64>,
        test: bool,
    },
    /// Serve the points read-only over NBD on loopback (`port` 0: any free port).
    Serve {
        tenant: String,
        plan: String,
        disks: Vec<DiskAt>,
        port: u16,
    },
    /// Stop a plan's instant-access server.
    StopServing { tenant: String, plan: String },
    /// Create a copy-on-write overlay at each disk's path over its export on `port`.
    Scratch { port: u16, disks: Vec<DiskAt> },
    /// Write each disk's point whole at its path.
    Live { disks: Vec<DiskAt> },
    /// Delete a plan's scratch overlays.
    DiscardScratch { tenant: String, plan: String },
    /// Every hold on the repository.
    Holds,
    /// The recovery points of one machine's disks.
    ListPoints { disks: Vec<String> },
    /// Release what these holders hold.
    Release { holders: Vec<String> },
    /// Bring `target` (the original disk, as the inventory gives its source) up to date from
    /// the live disk by block names. Run by the machine's process server, which reaches the
    /// live disk through the master target by tenant, plan, machine and disk; `live` is its
    /// path at the recovery site, used only where that site's paths are at hand (a
    /// configuration server beside it).
    Resync {
        tenant: String,
        plan: String,
        machine: String,
        disk: String,
        live: String,
        target: String,
    },
    /// Protect `disk` again in the original direction once failback made its original disk
    /// (`source`, the image the inventory names) the machine's disk again: the machine's
    /// process server drops the disk's pre-failover journal and brings the recovery site up to
    /// date by its checksum resync (only blocks whose names differ cross), which commits a new
    /// recovery point; replication continues from there. `tenant`, `plan` and `machine` name
    /// where the role keeps the daemon that opens the image meanwhile.
    Protect {
        tenant: String,
        plan: String,
        machine: String,
        disk: String,
        source: String,
    },
    /// Wait until each disk's journal has reached the recovery site and stands still
    /// (process server).
    Drain {
        disks: Vec<String>,
        timeout_secs: u64,
    },
}

impl SiteStep {
    /// What the step is called in messages.
    pub fn what(&self) -> &'static str {
        match self {
            SiteStep::ChoosePoints { .. } => "choose-points",
            SiteStep::Serve { .. } => "serve",
            SiteStep::StopServing { .. } => "stop-serving",
            SiteStep::Scratch { .. } => "scratch",
            SiteStep::Live { .. } => "live",
            SiteStep::DiscardScratch { .. } => "discard-scratch",
            SiteStep::Holds => "holds",
            SiteStep::ListPoints { .. } => "list-points",
            SiteStep::Release { .. } => "release",
            SiteStep::Resync { .. } => "resync",
            SiteStep::Protect { .. } => "protect",
            SiteStep::Drain { .. } => "drain",
        }
    }
}

/// One machine's chosen points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChosenMachine {
    pub machine: String,
    /// Every point is at one cut of the machine's disks.
    pub consistent: bool,
    pub disks: Vec<ChosenDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChosenDisk {
    pub disk: String,
    pub seq: u64,
    pub created_unix_ns: u64,
    pub path: String,
}

/// A hold on recovery points, as listed by the master target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct HoldInfo {
    pub holder: String,
    pub reason: String,
}

/// What a step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case", tag = "answer")]
pub enum SiteAnswer {
    Points {
        machines: Vec<ChosenMachine>,
    },
    /// The loopback port the points are served on, at the role.
    Served {
        port: u16,
    },
    /// Whether something was stopped or released, how many files or disks were made.
    Count {
        n: u64,
    },
    Holds {
        holds: Vec<HoldInfo>,
    },
    PointList {
        points: Vec<crate::jobs::PointInfo>,
    },
    Released {
        holders: Vec<String>,
    },
    Resync {
        report: ResyncReport,
    },
    /// A disk protected again: what its checksum resync sent to the recovery site (bytes of
    /// block frames, compressed and sealed), and the recovery point it committed.
    Protected {
        report: ResyncReport,
        point_seq: u64,
    },
    /// Each disk's journal sequence the recovery site holds.
    Drained {
        disks: Vec<(String, u64)>,
    },
}

/// How far a role has come with an order it runs (`POST /v1/roles/orders/{order}/progress`):
/// the job shows it on the order's step while the step runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderProgress {
    /// Done of `total`, in the step's unit (a resync: bytes of the disk compared).
    pub done: u64,
    pub total: u64,
    /// What was done so far, in words (a resync: blocks compared, bytes sent).
    #[serde(default)]
    pub detail: String,
}

impl OrderProgress {
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        if self.done > self.total {
            return Err(crate::Invalid::new("done", "is more than total"));
        }
        if self.detail.len() > 1024 {
            return Err(crate::Invalid::new("detail", "is longer than 1024 bytes"));
        }
        Ok(())
    }
}

/// The error code of the answer about an order the configuration server no longer keeps (it
/// was withdrawn, or its job ended): the role that answered it may forget its answer.
pub const NO_SUCH_ORDER: &str = "no-such-order";

/// An order addressed to one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Order {
    /// Stable for the job's step: the same order when it is sent again.
    pub id: u64,
    /// The appliance it is addressed to.
    pub appliance: String,
    pub tenant: String,
    /// The job and its step it belongs to (none: the server's own housekeeping).
    #[serde(default)]
    pub job: Option<u64>,
    pub step_name: String,
    pub step: SiteStep,
    pub created_unix: u64,
}

/// A role's answer to an order: what it did, or why it could not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OrderResult {
    #[serde(default)]
    pub answer: Option<SiteAnswer>,
    /// Why the step failed, in words for the operator.
    #[serde(default)]
    pub error: Option<String>,
}

impl OrderResult {
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        match (&self.answer, &self.error) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(crate::Invalid::new(
                "answer",
                "exactly one of answer and error is given",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_results_read_as_written() {
        let step: SiteStep = serde_json::from_str(
            r#"{"step": "live", "disks": [{"machine": "web", "disk": "d0", "seq": 7,
                "path": "/w/acme/dr/live/web/d0.raw"}]}"#,
        )
        .unwrap();
        assert_eq!(step.what(), "live");
        let ok: OrderResult =
            serde_json::from_str(r#"{"answer": {"answer": "count", "n": 1}}"#).unwrap();
        assert_eq!(ok.answer, Some(SiteAnswer::Count { n: 1 }));
        assert!(ok.validate().is_ok());
        let failed: OrderResult = serde_json::from_str(r#"{"error": "disk full"}"#).unwrap();
        assert!(failed.validate().is_ok());
        // Neither, or both: refused.
        assert!(serde_json::from_str::<OrderResult>("{}")
            .unwrap()
            .validate()
            .is_err());
        let both = OrderResult {
            answer: ok.answer.clone(),
            error: Some("x".into()),
        };
        assert!(both.validate().is_err());
    }
}
