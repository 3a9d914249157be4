//! What the server records and reports: audit entries, events and alerts, errors, health.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One audit entry: who, what, when, from where, and the result. Written for every mutating
/// call and for every refusal, before the answer leaves the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_unix: u64,
    /// The principal's name, or `anonymous` when no known certificate was presented.
    pub who: String,
    pub role: Option<crate::Role>,
    /// The caller's tenant (none: provider scope or unknown).
    pub tenant: Option<String>,
    /// The peer's socket address.
    pub from: String,
    /// `METHOD /path`.
    pub what: String,
    /// The tenant the request touched, read from its path.
    pub target_tenant: Option<String>,
    pub status: u16,
    pub result: AuditResult,
    /// The error message for refusals and failures.
    #[serde(default)]
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AuditResult {
    Ok,
    /// Refused: authentication, permission, validation, conflicts (4xx).
    Refused,
    /// The server failed (5xx).
    Failed,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// An event; an alert is an event with `active` set until it is cleared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    pub seq: u64,
    pub at_unix: u64,
    pub severity: Severity,
    pub tenant: Option<String>,
    /// What the event is about, e.g. `appliances/ps1`.
    pub subject: String,
    pub message: String,
    #[serde(default)]
    pub active: bool,
}

/// Every error answer has this body, whatever the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `forbidden`, `invalid`, `token-used`.
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// What an appliance reports about itself (`PUT /v1/appliances/{name}/report`). The server
/// raises and clears alerts from it as ASR does: cache free below 30% (warning) and 20%
/// (critical), upload backlog over 30 minutes; an appliance that stops reporting is
/// unreachable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApplianceReport {
    /// Free fraction of the cache device, 0 to 1 (process servers).
    #[serde(default)]
    pub cache_free_ratio: Option<f64>,
    /// Age of the oldest write not yet at the recovery site, in seconds (process servers).
    #[serde(default)]
    pub upload_backlog_secs: Option<f64>,
    /// The role's own CPU time (user and system, seconds) and resident memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Below these free fractions of the cache an alert is raised (warning, then critical).
pub const CACHE_FREE_WARNING: f64 = 0.30;
pub const CACHE_FREE_CRITICAL: f64 = 0.20;
/// An upload backlog older than this raises an alert.
pub const BACKLOG_ALERT_SECS: f64 = 30.0 * 60.0;

impl ApplianceReport {
    pub fn validate(&self) -> Result<(), crate::Invalid> {
        if let Some(r) = self.cache_free_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(crate::Invalid::new(
                    "cache_free_ratio",
                    "must be a number from 0 to 1",
                ));
            }
        }
        for (field, v) in [
            ("upload_backlog_secs", self.upload_backlog_secs),
            ("cpu_seconds", self.cpu_seconds),
        ] {
            if matches!(v, Some(b) if !b.is_finite() || b < 0.0) {
                return Err(crate::Invalid::new(field, "must be a finite number >= 0"));
            }
        }
        Ok(())
    }

    /// The cache alert this report calls for, if any.
    pub fn cache_alert(&self) -> Option<(Severity, String)> {
        let r = self.cache_free_ratio?;
        let pct = r * 100.0;
        if r < CACHE_FREE_CRITICAL {
            Some((
                Severity::Critical,
                format!("cache free {pct:.0}% is below 20%"),
            ))
        } else if r < CACHE_FREE_WARNING {
            Some((
                Severity::Warning,
                format!("cache free {pct:.0}% is below 30%"),
            ))
        } else {
            None
        }
    }

    /// The backlog alert this report calls for, if any.
    pub fn backlog_alert(&self) -> Option<(Severity, String)> {
        let b = self.upload_backlog_secs?;
        (b > BACKLOG_ALERT_SECS).then(|| {
            (
                Severity::Warning,
                format!("upload backlog {:.0} min is over 30 min", b / 60.0),
            )
        })
    }
}

/// This process's CPU time (user and system, seconds) and resident memory (bytes), from
/// `/proc/self` (zeros where it cannot be read): what a role reports about itself, and what the
/// configuration server's own metrics say.
pub fn own_process_stats() -> (f64, u64) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            // Linux reports these in USER_HZ, which is 100 on every architecture it exports.
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0);
    (cpu, rss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appliance_thresholds() {
        let r = |c: f64, b: f64| ApplianceReport {
            cache_free_ratio: Some(c),
            upload_backlog_secs: Some(b),
            ..Default::default()
        };
        assert_eq!(r(0.5, 0.0).cache_alert(), None);
        assert_eq!(r(0.25, 0.0).cache_alert().unwrap().0, Severity::Warning);
        assert_eq!(r(0.1, 0.0).cache_alert().unwrap().0, Severity::Critical);
        assert_eq!(r(0.5, 1800.0).backlog_alert(), None);
        assert!(r(0.5, 1801.0).backlog_alert().is_some());
        assert!(r(1.5, 0.0).validate().is_err() && r(0.5, -1.0).validate().is_err());
    }
}
