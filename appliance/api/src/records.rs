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
