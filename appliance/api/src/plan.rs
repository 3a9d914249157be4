//! Recovery plans: which machines come up, in which order, with which hooks and networks.

use crate::validate::{self, Invalid};
use crate::Object;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// A command run before or after the plan (argv, no shell: nothing to quote or inject).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    pub argv: Vec<String>,
    pub timeout_secs: u32,
}

/// One machine of a priority group and its place in the group's boot order (lower first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanMachine {
    pub machine: String,
    pub boot_order: u32,
    /// Starts the machine over its disks in a failover (e.g. a QEMU command line). In the
    /// argv, `{disk:NAME}` becomes the path of disk NAME as the job left it (scratch overlay,
    /// live disk, or the original disk after failback), `{machine}` the machine's name,
    /// `{site}` `test`, `recovery` or `protected`, and `{network:SOURCE}` the network SOURCE
    /// is mapped to (the test mapping in a test failover, the real one otherwise).
    #[serde(default)]
    pub start: Option<Hook>,
}

/// Machines started together; group 1 starts first, group 5 last (as SRM's priority groups).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriorityGroup {
    pub priority: u8,
    pub machines: Vec<PlanMachine>,
}

/// Protected-site network name → recovery-site network name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkMap {
    pub source: String,
    pub target: String,
}

/// Test failovers use an isolated network; real failovers the production one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkMapping {
    #[serde(default)]
    pub test: Vec<NetworkMap>,
    #[serde(default)]
    pub real: Vec<NetworkMap>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<PriorityGroup>,
    #[serde(default)]
    pub pre_hooks: Vec<Hook>,
    #[serde(default)]
    pub post_hooks: Vec<Hook>,
    #[serde(default)]
    pub networks: NetworkMapping,
}

pub const PRIORITY_MIN: u8 = 1;
pub const PRIORITY_MAX: u8 = 5;
/// Bounds that keep one plan a small object.
const HOOKS_MAX: usize = 16;
const ARGV_MAX: usize = 64;
const MACHINES_MAX: usize = 1000;
const MAPS_MAX: usize = 64;

impl Plan {
    /// Every machine the plan names, in start order.
    pub fn machines(&self) -> impl Iterator<Item = &str> {
        self.start_order().map(|m| m.machine.as_str())
    }

    /// Whether the plan holds commands the appliance would run (hooks, start commands).
    pub fn has_commands(&self) -> bool {
        !self.pre_hooks.is_empty()
            || !self.post_hooks.is_empty()
            || self.start_order().any(|m| m.start.is_some())
    }

    /// The plan's machines in start order: priority group 1 first, by boot order inside one.
    pub fn start_order(&self) -> impl Iterator<Item = &PlanMachine> {
        let mut groups: Vec<&PriorityGroup> = self.groups.iter().collect();
        groups.sort_by_key(|g| g.priority);
        groups.into_iter().flat_map(|g| {
            let mut ms: Vec<&PlanMachine> = g.machines.iter().collect();
            ms.sort_by_key(|m| m.boot_order);
            ms
        })
    }
}

fn hooks(field: &str, hs: &[Hook]) -> Result<(), Invalid> {
    validate::range(field, hs.len(), 0, HOOKS_MAX)?;
    for (i, h) in hs.iter().enumerate() {
        hook(&format!("{field}[{i}]"), h)?;
    }
    Ok(())
}

fn hook(f: &str, h: &Hook) -> Result<(), Invalid> {
    validate::range(&format!("{f}.argv"), h.argv.len(), 1, ARGV_MAX)?;
    for a in &h.argv {
        validate::text(&format!("{f}.argv"), a)?;
    }
    if h.argv[0].is_empty() {
        return Err(Invalid::new(
            format!("{f}.argv"),
            "the program must not be empty",
        ));
    }
    validate::range(&format!("{f}.timeout_secs"), h.timeout_secs, 1, 3600)
}

fn maps(field: &str, ms: &[NetworkMap]) -> Result<(), Invalid> {
    validate::range(field, ms.len(), 0, MAPS_MAX)?;
    let mut seen = BTreeSet::new();
    for (i, m) in ms.iter().enumerate() {
        validate::name(&format!("{field}[{i}].source"), &m.source)?;
        validate::name(&format!("{field}[{i}].target"), &m.target)?;
        if !seen.insert(&m.source) {
            return Err(Invalid::new(
                format!("{field}[{i}].source"),
                format!("{} is mapped twice", m.source),
            ));
        }
    }
    Ok(())
}

impl Object for Plan {
    const KIND: &'static str = "plans";
    fn name(&self) -> &str {
        &self.name
    }
    fn validate(&self) -> Result<(), Invalid> {
        validate::name("name", &self.name)?;
        let mut priorities = BTreeSet::new();
        let mut machines = BTreeSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            let f = format!("groups[{i}]");
            validate::range(
                &format!("{f}.priority"),
                g.priority,
                PRIORITY_MIN,
                PRIORITY_MAX,
            )?;
            if !priorities.insert(g.priority) {
                return Err(Invalid::new(
                    format!("{f}.priority"),
                    format!("priority {} appears twice", g.priority),
                ));
            }
            for (j, m) in g.machines.iter().enumerate() {
                let mf = format!("{f}.machines[{j}].machine");
                validate::name(&mf, &m.machine)?;
                if let Some(h) = &m.start {
                    hook(&format!("{f}.machines[{j}].start"), h)?;
                }
                // A machine can start only once per failover.
                if !machines.insert(m.machine.as_str()) {
                    return Err(Invalid::new(mf, format!("{} appears twice", m.machine)));
                }
            }
        }
        validate::range("groups", machines.len(), 0, MACHINES_MAX)?;
        hooks("pre_hooks", &self.pre_hooks)?;
        hooks("post_hooks", &self.post_hooks)?;
        maps("networks.test", &self.networks.test)?;
        maps("networks.real", &self.networks.real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(m: &str, o: u32) -> PlanMachine {
        PlanMachine {
            machine: m.into(),
            boot_order: o,
            start: None,
        }
    }

    #[test]
    fn start_order_and_refusals() {
        let mut p = Plan {
            name: "dr".into(),
            groups: vec![
                PriorityGroup {
                    priority: 2,
                    machines: vec![pm("app", 2), pm("web", 1)],
                },
                PriorityGroup {
                    priority: 1,
                    machines: vec![pm("db", 1)],
                },
            ],
            pre_hooks: vec![Hook {
                argv: vec!["/bin/true".into()],
                timeout_secs: 10,
            }],
            post_hooks: vec![],
            networks: NetworkMapping::default(),
        };
        p.validate().unwrap();
        assert_eq!(p.machines().collect::<Vec<_>>(), ["db", "web", "app"]);
        p.groups[0].priority = 6;
        assert_eq!(p.validate().unwrap_err().field, "groups[0].priority");
        p.groups[0].priority = 1;
        assert!(p.validate().unwrap_err().reason.contains("twice"));
        p.groups[0].priority = 2;
        p.groups[1].machines.push(pm("web", 2));
        assert!(p
            .validate()
            .unwrap_err()
            .reason
            .contains("web appears twice"));
    }
}
