//! Replication policies: how a machine's disks are captured, checkpointed, kept and shipped.

use crate::validate::{self, Invalid};
use crate::Object;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationMode {
    /// The hypervisor mirrors every write (RPO: seconds).
    Continuous,
    /// The process server pulls dirty extents every checkpoint interval.
    Periodic,
}

/// Keep one recovery point per `every_secs` for `keep_secs` (e.g. every 300 s for a day).
/// Tiers are consecutive age ranges, finest first: the first covers points up to `keep_secs`
/// old, the next the `keep_secs` after that, and so on; older points are deleted (the newest
/// point of a disk never is). A policy without tiers keeps the master target's own
/// (every point for an hour, one per 5 minutes for a day, one per hour for 14 days).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionTier {
    pub every_secs: u64,
    pub keep_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

/// A weekly window with its own limit; outside every window the policy's default applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BandwidthWindow {
    pub days: Vec<Weekday>,
    /// Minutes after local midnight, 0..=1439.
    pub start_minute: u16,
    /// Minutes after local midnight, after `start_minute`, at most 1440.
    pub end_minute: u16,
    /// Megabits per second; none means unlimited in this window.
    pub limit_mbit: Option<u32>,
}

/// Which machines' replication goes first when the appliance's uplink (`ferry process-server
/// --uplink-mbit`) is the bottleneck: the machines with data waiting share it by weight, 4 for
/// `high`, 2 for `medium` and 1 for `low`, and a share one leaves unused goes to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Medium,
    Low,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

/// How a machine's chunks are compressed before they are encrypted and sent: `zstd` (level 1,
/// the default: the best ratio for the WAN), `lz4` (about 1.5 times the process server's
/// throughput per core, 10 to 40% more bytes on the wire) or `off`. A block is stored compressed only when that
/// makes it smaller, and dedup does not depend on the choice. `true` and `false` (what earlier
/// versions stored) are read as `zstd` and `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Lz4,
    Off,
}

impl Compression {
    pub const ALL: [Compression; 3] = [Compression::Zstd, Compression::Lz4, Compression::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::Off => "off",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown compression {s:?}: say zstd, lz4 or off"))
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Flag(bool),
            Word(String),
        }
        match Wire::deserialize(d).map_err(|_| {
            serde::de::Error::custom("compression must be \"zstd\", \"lz4\" or \"off\"")
        })? {
            Wire::Flag(true) => Ok(Compression::Zstd),
            Wire::Flag(false) => Ok(Compression::Off),
            Wire::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bandwidth {
    /// Megabits per second outside the windows; none means unlimited.
    #[serde(default)]
    pub limit_mbit: Option<u32>,
    #[serde(default)]
    pub schedule: Vec<BandwidthWindow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub mode: ReplicationMode,
    pub checkpoint_interval_secs: u32,
    /// Raise an alert when a disk's RPO exceeds this.
    pub rpo_alert_secs: u32,
    #[serde(default)]
    pub retention: Vec<RetentionTier>,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub bandwidth: Bandwidth,
    /// Share of the appliance's uplink against other machines' when it is the bottleneck.
    #[serde(default)]
    pub priority: Priority,
}

/// Limits: a checkpoint at most every second and at least daily; at most 10 tiers and 10 windows
/// so one policy stays a small object; 100 Gbit/s is above any WAN link we ship over.
const INTERVAL_MAX: u32 = 86_400;
const TIERS_MAX: usize = 10;
const WINDOWS_MAX: usize = 10;
const MBIT_MAX: u32 = 100_000;
const KEEP_MAX: u64 = 10 * 366 * 86_400;

impl Object for Policy {
    const KIND: &'static str = "policies";
    fn name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        validate::range(
            "checkpoint_interval_secs",
            self.checkpoint_interval_secs,
            1,
            INTERVAL_MAX,
        )?;
        validate::range(
            "rpo_alert_secs",
            self.rpo_alert_secs,
            self.checkpoint_interval_secs,
            7 * INTERVAL_MAX,
        )?;
        validate::range("retention", self.retention.len(), 0, TIERS_MAX)?;
        let mut last_every = 0;
        for (i, t) in self.retention.iter().enumerate() {
            let f = format!("retention[{i}]");
            validate::range(&format!("{f}.every_secs"), t.every_secs, 1, KEEP_MAX)?;
            validate::range(
                &format!("{f}.keep_secs"),
                t.keep_secs,
                t.every_secs,
                KEEP_MAX,
            )?;
            // Tiers go from fine to coarse, as consolidation walks them in that order.
            if t.every_secs <= last_every {
                return Err(Invalid::new(
                    f,
                    "tiers must be ordered by every_secs, strictly increasing",
                ));
            }
            last_every = t.every_secs;
        }
        if let Some(m) = self.bandwidth.limit_mbit {
            validate::range("bandwidth.limit_mbit", m, 1, MBIT_MAX)?;
        }
        validate::range(
            "bandwidth.schedule",
            self.bandwidth.schedule.len(),
            0,
            WINDOWS_MAX,
        )?;
        for (i, w) in self.bandwidth.schedule.iter().enumerate() {
            let f = format!("bandwidth.schedule[{i}]");
            if w.days.is_empty() {
                return Err(Invalid::new(format!("{f}.days"), "name at least one day"));
            }
            validate::range(&format!("{f}.start_minute"), w.start_minute, 0, 1439)?;
            validate::range(
                &format!("{f}.end_minute"),
                w.end_minute,
                w.start_minute + 1,
                1440,
            )?;
            if let Some(m) = w.limit_mbit {
                validate::range(&format!("{f}.limit_mbit"), m, 1, MBIT_MAX)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            name: "gold".into(),
            mode: ReplicationMode::Continuous,
            checkpoint_interval_secs: 1,
            rpo_alert_secs: 30,
            retention: vec![
                RetentionTier {
                    every_secs: 1,
                    keep_secs: 3600,
                },
                RetentionTier {
                    every_secs: 300,
                    keep_secs: 86_400,
                },
            ],
            compression: Compression::Zstd,
            bandwidth: Bandwidth {
                limit_mbit: Some(100),
                schedule: vec![BandwidthWindow {
                    days: vec![Weekday::Mon, Weekday::Tue],
                    start_minute: 8 * 60,
                    end_minute: 18 * 60,
                    limit_mbit: Some(20),
                }],
            },
            priority: Priority::High,
        }
    }

    #[test]
    fn good_policy_passes_and_bad_fields_are_named() {
        policy().validate().unwrap();
        let mut p = policy();
        p.checkpoint_interval_secs = 0;
        assert_eq!(p.validate().unwrap_err().field, "checkpoint_interval_secs");
        let mut p = policy();
        p.retention.swap(0, 1);
        assert_eq!(p.validate().unwrap_err().field, "retention[1]");
        let mut p = policy();
        p.bandwidth.schedule[0].end_minute = 10;
        assert_eq!(
            p.validate().unwrap_err().field,
            "bandwidth.schedule[0].end_minute"
        );
    }

    #[test]
    fn compression_defaults_on_and_unknown_fields_are_refused() {
        let p: Policy = serde_json::from_str(
            r#"{"name":"p","mode":"periodic","checkpoint_interval_secs":60,"rpo_alert_secs":900}"#,
        )
        .unwrap();
        assert_eq!(p.compression, Compression::Zstd);
        assert_eq!(p.priority, Priority::Medium);
        assert!(serde_json::from_str::<Policy>(
            r#"{"name":"p","mode":"periodic","checkpoint_interval_secs":60,"rpo_alert_secs":900,"x":1}"#
        )
        .is_err());
    }

    #[test]
    fn compression_is_a_word_and_the_old_booleans_still_read() {
        let with = |v: &str| {
            serde_json::from_str::<Policy>(&format!(
                r#"{{"name":"p","mode":"periodic","checkpoint_interval_secs":60,"rpo_alert_secs":900,"compression":{v}}}"#
            ))
        };
        for (v, want) in [
            (r#""lz4""#, Compression::Lz4),
            (r#""zstd""#, Compression::Zstd),
            (r#""off""#, Compression::Off),
            ("true", Compression::Zstd),
            ("false", Compression::Off),
        ] {
            assert_eq!(with(v).unwrap().compression, want, "{v}");
        }
        assert_eq!(serde_json::to_value(Compression::Lz4).unwrap(), "lz4");
        for bad in [r#""gzip""#, r#""LZ4""#, "1", "null"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("zstd") && e.contains("lz4"), "{bad}: {e}");
        }
    }

    #[test]
    fn priority_is_one_of_three_words() {
        let p: Policy = serde_json::from_str(
            r#"{"name":"p","mode":"periodic","checkpoint_interval_secs":60,"rpo_alert_secs":900,"priority":"low"}"#,
        )
        .unwrap();
        assert_eq!(p.priority, Priority::Low);
        assert_eq!(serde_json::to_value(p.priority).unwrap(), "low");
        for bad in [r#""urgent""#, r#""High""#, "4", "null"] {
            let e = serde_json::from_str::<Policy>(&format!(
                r#"{{"name":"p","mode":"periodic","checkpoint_interval_secs":60,"rpo_alert_secs":900,"priority":{bad}}}"#
            ))
            .unwrap_err();
            // A word says which words are known.
            assert!(
                !bad.starts_with('"') || e.to_string().contains("`high`, `medium`, `low`"),
                "{bad}: {e}"
            );
        }
    }
}
