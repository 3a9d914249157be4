//! Tuning: turn a probe report and the profiles into a list of changes (each with the value it
//! replaces and why); [`apply`] and [`revert`] (in `tune/apply.rs`) carry them out through a
//! state file.
//!
//! Only identified devices are touched: a NIC or disk without a known driver is skipped with the
//! reason; one whose driver has no profile gets the `default` profile, which changes nothing.
//! Every device change carries a [`Guard`] (an interface's ifindex, a disk's wwid or serial, else
//! its model and size) and is refused if the name now belongs to another device.

mod apply;

pub use apply::{apply, boot_id, revert, Outcome, SetAside, State, BOOT_ID};

use crate::ethtool::Knob;
use crate::host::{bracketed, parse_cpu_list, Host};
use crate::probe::{Nic, Report};
use crate::profile::Profiles;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the operator asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only these interfaces (empty: every identified physical NIC).
    pub interfaces: Vec<String>,
    /// Disks to tune as cache devices (kernel names, e.g. nvme0n1).
    pub disks: Vec<String>,
    /// The cache directory; its disk is tuned too (live machine only).
    pub cache_dir: Option<PathBuf>,
    /// MTU for the selected interfaces (never changed without it).
    pub mtu: Option<u32>,
    pub wan_mbps: Option<u64>,
    pub wan_rtt_ms: Option<u64>,
    pub skip_net: bool,
    pub skip_tcp: bool,
    pub skip_disks: bool,
}

/// One setting, addressed so that it can be read back and restored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Setting {
    /// A sysfs/procfs attribute, path relative to the root.
    File {
        path: String,
    },
    Ethtool {
        iface: String,
        knob: Knob,
    },
}

/// A device's identity at planning time, checked again before every write (apply and revert).
/// Untagged: state files written before disks had guards hold only the interface form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Guard {
    /// The interface name still has this ifindex (a re-created or renamed NIC gets another).
    Interface { iface: String, ifindex: u32 },
    /// The disk name still names a device with this identity ([`crate::probe::disk_identity`]).
    Disk { disk: String, identity: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Human name: `eth0 mtu`, `sysctl net.ipv4.tcp_rmem`, `nvme0n1 scheduler`.
    pub what: String,
    pub setting: Setting,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<Guard>,
    pub before: String,
    pub after: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skip {
    pub what: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub skipped: Vec<Skip>,
}

impl Plan {
    fn skip(&mut self, what: impl Into<String>, reason: impl Into<String>) {
        self.skipped.push(Skip {
            what: what.into(),
            reason: reason.into(),
        });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("state file {0}: {1}")]
    State(String, std::io::Error),
    #[error("state file {0} is not a Ferry tuning record: {1}")]
    BadState(String, serde_json::Error),
}

/// Work out what to change.
pub fn plan(host: &Host, report: &Report, profiles: &Profiles, opts: &Options) -> Plan {
    let mut plan = Plan::default();
    if !opts.skip_net {
        plan_nics(host, report, profiles, opts, &mut plan);
    }
    if !opts.skip_tcp {
        plan_tcp(host, profiles, opts, &mut plan);
    }
    if !opts.skip_disks {
        plan_disks(host, report, profiles, opts, &mut plan);
    }
    plan
}

fn file_change(
    host: &Host,
    plan: &mut Plan,
    what: String,
    path: &str,
    after: String,
    reason: &str,
    guard: Option<Guard>,
) {
    match host.read(path) {
        None => plan.skip(what, format!("{path} is not present or not readable")),
        Some(cur) => {
            let current = if cur.contains('[') {
                bracketed(&cur)
            } else {
                cur.trim().to_string()
            };
            if norm(&current) != norm(&after) {
                plan.changes.push(Change {
                    what,
                    setting: Setting::File {
                        path: path.to_string(),
                    },
                    guard,
                    before: if cur.contains('[') { current } else { cur },
                    after,
                    reason: reason.to_string(),
                });
            }
        }
    }
}

/// Why an ethtool read failed, in words an operator can act on.
fn why(e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
        "not changed: the device does not support it (a software device has no such setting)".into()
    } else {
        format!("not changed: {e}")
    }
}

fn norm(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn plan_nics(host: &Host, report: &Report, profiles: &Profiles, opts: &Options, plan: &mut Plan) {
    let targets: Vec<&Nic> = if opts.interfaces.is_empty() {
        report.nics.iter().filter(|n| n.physical).collect()
    } else {
        for want in &opts.interfaces {
            if !report.nics.iter().any(|n| &n.name == want) {
                plan.skip(want.clone(), "no such interface");
            }
        }
        report
            .nics
            .iter()
            .filter(|n| opts.interfaces.contains(&n.name))
            .collect()
    };
    let hv_irq = profiles
        .hypervisor_named(&report.hypervisor.name)
        .is_some_and(|h| h.irq_affinity);
    for n in targets {
        let (Some(driver), Some(ifindex)) = (n.driver.as_deref(), n.ifindex) else {
            plan.skip(
                &n.name,
                "cannot identify the interface (no driver, no ifindex): not touched",
            );
            continue;
        };
        if n.name == "lo" {
            plan.skip(&n.name, "loopback: not touched");
            continue;
        }
        let (p, matched) = profiles.nic_for(Some(driver));
        if !matched {
            plan.skip(
                &n.name,
                format!("no profile for driver {driver}: conservative defaults, nothing changed"),
            );
            continue;
        }
        let guard = Some(Guard::Interface {
            iface: n.name.clone(),
            ifindex,
        });
        let label = |s: &str| format!("{} {s}", n.name);
        if let Some(mtu) = opts.mtu {
            match p.max_mtu {
                Some(max) if mtu > max => plan.skip(
                    label("mtu"),
                    format!(
                        "--mtu {mtu} is above {max}, the most profile {} allows",
                        p.name
                    ),
                ),
                None => plan.skip(
                    label("mtu"),
                    format!("profile {} allows no MTU change", p.name),
                ),
                _ => file_change(
                    host,
                    plan,
                    label("mtu"),
                    &format!("sys/class/net/{}/mtu", n.name),
                    mtu.to_string(),
                    "--mtu",
                    guard.clone(),
                ),
            }
        }
        let knob = |plan: &mut Plan, k: Knob, cur: u32, want: u32, reason: String| {
            if cur != want {
                plan.changes.push(Change {
                    what: label(&k.to_string()),
                    setting: Setting::Ethtool {
                        iface: n.name.clone(),
                        knob: k,
                    },
                    guard: guard.clone(),
                    before: cur.to_string(),
                    after: want.to_string(),
                    reason,
                });
            }
        };
        if let Some(want) = p.ring {
            match host.ethtool.ring(&n.name) {
                Err(e) => plan.skip(label("ring"), why(&e)),
                Ok(r) => {
                    let why = format!(
                        "profile {}: ring {want} (capped at the device maximum)",
                        p.name
                    );
                    knob(plan, Knob::RingRx, r.rx, want.min(r.rx_max), why.clone());
                    knob(plan, Knob::RingTx, r.tx, want.min(r.tx_max), why);
                }
            }
        }
        let node_cpus = cpus_for(host, n.numa_node, report.cpu.cpus);
        if let Some(q) = p.rss_queues {
            let want = if q == 0 { node_cpus.len() as u32 } else { q };
            match host.ethtool.channels(&n.name) {
                Err(e) => plan.skip(label("channels"), why(&e)),
                Ok(c) => {
                    let why = format!(
                        "profile {}: {want} queues (one per CPU of the NIC's node)",
                        p.name
                    );
                    if c.max_combined > 0 {
                        knob(
                            plan,
                            Knob::ChannelsCombined,
                            c.combined,
                            want.min(c.max_combined),
                            why,
                        );
                    } else if c.max_rx > 0 && c.max_tx > 0 {
                        knob(
                            plan,
                            Knob::ChannelsRx,
                            c.rx,
                            want.min(c.max_rx),
                            why.clone(),
                        );
                        knob(plan, Knob::ChannelsTx, c.tx, want.min(c.max_tx), why);
                    } else {
                        plan.skip(label("channels"), "the device reports no adjustable queues");
                    }
                }
            }
        }
        for (o, want) in &p.offloads {
            match host.ethtool.offload(&n.name, o) {
                Err(e) => plan.skip(label(&format!("offload {o}")), why(&e)),
                Ok(cur) => knob(
                    plan,
                    Knob::Offload(o.clone()),
                    u32::from(cur),
                    u32::from(*want),
                    format!("profile {}", p.name),
                ),
            }
        }
        if p.irq_affinity {
            if !hv_irq {
                plan.skip(
                    label("irq affinity"),
                    format!("not pinned on {}", report.hypervisor.name),
                );
            } else if n.irqs.is_empty() {
                plan.skip(label("irq affinity"), "the device lists no MSI interrupts");
            } else if node_cpus.is_empty() {
                plan.skip(label("irq affinity"), "no CPU list for the NIC's node");
            } else {
                for (i, irq) in n.irqs.iter().enumerate() {
                    let cpu = node_cpus[i % node_cpus.len()];
                    file_change(
                        host,
                        plan,
                        label(&format!("irq {irq}")),
                        &format!("proc/irq/{irq}/smp_affinity_list"),
                        cpu.to_string(),
                        &format!("profile {}: spread interrupts over the NIC's node", p.name),
                        guard.clone(),
                    );
                }
            }
        }
    }
}

/// The CPUs of a NUMA node, else every online CPU.
fn cpus_for(host: &Host, node: Option<u32>, fallback: u32) -> Vec<u32> {
    if let Some(n) = node {
        if let Some(l) = host.read(&format!("sys/devices/system/node/node{n}/cpulist")) {
            let v = parse_cpu_list(&l);
            if !v.is_empty() {
                return v;
            }
        }
    }
    host.read("sys/devices/system/cpu/online")
        .map(|l| parse_cpu_list(&l))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| (0..fallback.max(1)).collect())
}

fn sysctl_path(key: &str) -> String {
    format!("proc/sys/{}", key.replace('.', "/"))
}

fn plan_tcp(host: &Host, profiles: &Profiles, opts: &Options, plan: &mut Plan) {
    let t = &profiles.tcp;
    let mbps = opts.wan_mbps.unwrap_or(t.default_wan_mbps);
    let rtt = opts.wan_rtt_ms.unwrap_or(t.default_rtt_ms);
    let bdp = mbps.saturating_mul(1_000_000) / 8 * rtt / 1000;
    let want = bdp
        .saturating_mul(2)
        .clamp(t.buffer_floor_bytes, t.buffer_cap_bytes);
    let why = format!("2 x BDP of {mbps} Mbit/s x {rtt} ms = {want} bytes (only raised)");
    for key in ["net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"] {
        let path = sysctl_path(key);
        let Some(cur) = host.read(&path) else {
            plan.skip(format!("sysctl {key}"), "not present");
            continue;
        };
        let f: Vec<&str> = cur.split_whitespace().collect();
        match f.get(2).and_then(|m| m.parse::<u64>().ok()) {
            Some(max) if f.len() == 3 && max < want => {
                let after = format!("{}\t{}\t{want}", f[0], f[1]);
                file_change(
                    host,
                    plan,
                    format!("sysctl {key}"),
                    &path,
                    after,
                    &why,
                    None,
                );
            }
            Some(_) if f.len() == 3 => {}
            _ => plan.skip(format!("sysctl {key}"), format!("unexpected value {cur:?}")),
        }
    }
    for key in ["net.core.rmem_max", "net.core.wmem_max"] {
        let path = sysctl_path(key);
        match host.read_num::<u64>(&path) {
            None => plan.skip(format!("sysctl {key}"), "not present (network namespace?)"),
            Some(cur) if cur < want => file_change(
                host,
                plan,
                format!("sysctl {key}"),
                &path,
                want.to_string(),
                &why,
                None,
            ),
            Some(_) => {}
        }
    }
    let avail = host
        .read(&sysctl_path("net.ipv4.tcp_available_congestion_control"))
        .unwrap_or_default();
    match t
        .congestion_control
        .iter()
        .find(|c| avail.split_whitespace().any(|a| a == c.as_str()))
    {
        Some(cc) => file_change(
            host,
            plan,
            "sysctl net.ipv4.tcp_congestion_control".into(),
            &sysctl_path("net.ipv4.tcp_congestion_control"),
            cc.clone(),
            "first preferred algorithm the kernel offers",
            None,
        ),
        None => plan.skip(
            "sysctl net.ipv4.tcp_congestion_control",
            format!(
                "none of {:?} available (have: {avail})",
                t.congestion_control
            ),
        ),
    }
    for (k, v) in &t.sysctls {
        file_change(
            host,
            plan,
            format!("sysctl {k}"),
            &sysctl_path(k),
            v.clone(),
            "tcp profile",
            None,
        );
    }
}

/// The whole-disk name holding `dir` (live machine only).
pub(crate) fn disk_of_dir(host: &Host, dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let link = std::fs::canonicalize(host.path(&format!("sys/dev/block/{major}:{minor}"))).ok()?;
    // A partition's directory sits inside its disk's and has a `partition` attribute.
    let disk = if link.join("partition").exists() {
        link.parent()?
    } else {
        &link
    };
    Some(disk.file_name()?.to_string_lossy().into_owned())
}

fn plan_disks(host: &Host, report: &Report, profiles: &Profiles, opts: &Options, plan: &mut Plan) {
    let mut names = opts.disks.clone();
    if let Some(dir) = &opts.cache_dir {
        if !host.live {
            plan.skip(
                dir.display().to_string(),
                "--cache-dir is only resolved on the live machine",
            );
        } else {
            match disk_of_dir(host, dir) {
                Some(d) if !names.contains(&d) => names.push(d),
                Some(_) => {}
                None => plan.skip(
                    dir.display().to_string(),
                    "cannot tell which disk holds the cache directory: no disk tuned for it",
                ),
            }
        }
    }
    for name in names {
        let Some(d) = report.disks.iter().find(|d| d.name == name) else {
            plan.skip(name, "no such disk (or not one Ferry tunes)");
            continue;
        };
        if d.driver.is_none() && d.vendor.is_none() {
            plan.skip(
                name,
                "cannot identify the disk (no driver, no vendor): not touched",
            );
            continue;
        }
        let (p, matched) = profiles.disk_for(d.driver.as_deref(), d.vendor.as_deref());
        if !matched {
            plan.skip(
                name,
                format!(
                    "no profile for driver {}: conservative defaults, nothing changed",
                    d.driver.as_deref().unwrap_or("?")
                ),
            );
            continue;
        }
        let Some(identity) = d.identity.clone() else {
            plan.skip(
                name,
                "cannot identify the disk (no wwid, serial or size): not touched",
            );
            continue;
        };
        let guard = Some(Guard::Disk {
            disk: name.clone(),
            identity,
        });
        let planned = plan.changes.len();
        if !p.schedulers.is_empty() {
            match p.schedulers.iter().find(|s| d.schedulers.contains(s)) {
                Some(s) => file_change(
                    host,
                    plan,
                    format!("{name} scheduler"),
                    &format!("sys/block/{name}/queue/scheduler"),
                    s.clone(),
                    &format!("profile {}", p.name),
                    guard.clone(),
                ),
                None => plan.skip(
                    format!("{name} scheduler"),
                    format!(
                        "none of {:?} offered (have {:?})",
                        p.schedulers, d.schedulers
                    ),
                ),
            }
        }
        if let Some(nr) = p.nr_requests {
            let path = format!("sys/block/{name}/queue/nr_requests");
            let what = format!("{name} nr_requests");
            let reason = format!("profile {}", p.name);
            let cur = host.read(&path).map(|c| c.trim().to_string());
            let switching = plan.changes.len() > planned;
            match cur {
                // The scheduler switch resets nr_requests: set it again even where it already
                // has the wanted value (and restore this value after the scheduler at revert).
                Some(cur) if switching && cur == nr.to_string() => plan.changes.push(Change {
                    what,
                    setting: Setting::File { path },
                    guard,
                    before: cur,
                    after: nr.to_string(),
                    reason: format!("{reason} (again after the scheduler switch resets it)"),
                }),
                _ => file_change(host, plan, what, &path, nr.to_string(), &reason, guard),
            }
        }
    }
}
