//! Carrying out a plan and undoing it, through a state file that records every change with its
//! previous value, the identity of the device it touched and the boot it was made in.
//!
//! The state file is rewritten (atomically) after every change, so a crash half-way leaves a
//! file that `--revert` can still use — in the same boot. Runtime tunables (sysfs, /proc/sys,
//! ethtool) return to the kernel's and the drivers' defaults at every reboot and ifindexes are
//! handed out afresh, so a record from another boot (the machine crashed or lost power, and
//! `ExecStop=` never reverted) describes nothing on this one: its "before" values and guards
//! are stale. Such a file is set aside (renamed to `FILE.previous-boot`, and reported), never
//! reverted and never merged into.
//!
//! Order matters where one write resets another setting: switching a disk's I/O scheduler makes
//! the kernel reset the queue's `nr_requests`, so a scheduler is written before the other queue
//! settings of its disk, when applying and when reverting.

use super::{Change, Guard, Plan, Setting, Skip, TuneError};
use crate::host::Host;
use crate::probe::disk_identity;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The kernel's random id of the running boot, relative to the probe's root.
pub const BOOT_ID: &str = "proc/sys/kernel/random/boot_id";

/// Version 2 records the boot id and may hold disk guards.
const STATE_VERSION: u32 = 2;

/// The id of the boot `host` is in (None where the root has no such file: a recorded tree).
pub fn boot_id(host: &Host) -> Option<String> {
    host.read(BOOT_ID)
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The record of applied changes (what `--revert` undoes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub root: String,
    /// The boot the changes were made in; a file without one (version 1) counts as another boot
    /// wherever the current boot id can be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    pub changes: Vec<Change>,
}

impl State {
    pub fn load(path: &Path) -> Result<Option<State>, TuneError> {
        let show = path.display().to_string();
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| TuneError::BadState(show, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TuneError::State(show, e)),
        }
    }

    fn save(&self, path: &Path) -> Result<(), TuneError> {
        let show = path.display().to_string();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| TuneError::State(show.clone(), e))?;
        }
        let tmp = path.with_extension("tmp");
        let text =
            serde_json::to_vec_pretty(self).map_err(|e| TuneError::BadState(show.clone(), e))?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| TuneError::State(show, e))
    }
}

/// A state file from another boot, moved out of the way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAside {
    pub from: String,
    pub to: String,
    /// The boot it was written in (None: a version 1 file, which did not say).
    pub boot_id: Option<String>,
    pub this_boot: Option<String>,
    /// How many changes it recorded (undone by the reboot, not by Ferry).
    pub changes: usize,
}

/// What happened to each planned (or recorded) change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub applied: Vec<Change>,
    pub failed: Vec<Skip>,
    pub skipped: Vec<Skip>,
    /// A state file from another boot that was renamed instead of used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<SetAside>,
    /// Revert only: changes that could not be undone and stay in the state file.
    #[serde(default)]
    pub kept: usize,
}

/// Where a state file from another boot goes; one is kept (an older one is replaced: the
/// values it records were reset by a reboot before it).
fn set_aside_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".previous-boot");
    path.with_file_name(name)
}

/// The state file when it was written in this boot; one from another boot is renamed and
/// reported instead.
fn load_this_boot(
    host: &Host,
    path: &Path,
) -> Result<(Option<State>, Option<SetAside>), TuneError> {
    let Some(state) = State::load(path)? else {
        return Ok((None, None));
    };
    let now = boot_id(host);
    if state.boot_id == now {
        return Ok((Some(state), None));
    }
    let to = set_aside_path(path);
    std::fs::rename(path, &to).map_err(|e| TuneError::State(path.display().to_string(), e))?;
    tracing::warn!(
        state = %path.display(),
        set_aside = %to.display(),
        recorded_boot = state.boot_id.as_deref().unwrap_or("unrecorded"),
        this_boot = now.as_deref().unwrap_or("unknown"),
        "tuning record from another boot set aside (the reboot reset what it records)"
    );
    Ok((
        None,
        Some(SetAside {
            from: path.display().to_string(),
            to: to.display().to_string(),
            boot_id: state.boot_id,
            this_boot: now,
            changes: state.changes.len(),
        }),
    ))
}

/// Err(why) when the device a change was planned for is gone or is now another device.
fn identity_ok(host: &Host, guard: &Option<Guard>) -> Result<(), String> {
    match guard {
        None => Ok(()),
        Some(Guard::Interface { iface, ifindex }) => {
            match host.read_num::<u32>(&format!("sys/class/net/{iface}/ifindex")) {
                Some(i) if i == *ifindex => Ok(()),
                Some(i) => Err(format!(
                    "{iface} is now ifindex {i}, was {ifindex}: not touched"
                )),
                None => Err(format!("{iface} is gone: not touched")),
            }
        }
        Some(Guard::Disk { disk, identity }) => match disk_identity(host, disk) {
            Some(now) if now == *identity => Ok(()),
            Some(now) => Err(format!(
                "{disk} is now another disk ({now}; was {identity}): not touched"
            )),
            None => Err(format!("{disk} is gone: not touched")),
        },
    }
}

fn write_setting(host: &Host, s: &Setting, value: &str) -> std::io::Result<()> {
    match s {
        Setting::File { path } => host.write(path, value),
        Setting::Ethtool { iface, knob } => {
            let v: u32 = value
                .parse()
                .map_err(|_| std::io::Error::other(format!("bad value {value:?}")))?;
            host.ethtool.set(iface, knob, v)
        }
    }
}

/// The disk of a `sys/block/DISK/queue/ATTR` setting, and whether ATTR is the scheduler.
fn queue_of(s: &Setting) -> Option<(&str, bool)> {
    let Setting::File { path } = s else {
        return None;
    };
    let (disk, attr) = path.strip_prefix("sys/block/")?.split_once("/queue/")?;
    Some((disk, attr == "scheduler"))
}

/// Indices of `changes` in the order given, except that a disk's scheduler goes before any of
/// that disk's other queue settings (the switch resets them).
fn scheduler_first<'a>(changes: impl IntoIterator<Item = (usize, &'a Change)>) -> Vec<usize> {
    let mut out: Vec<(usize, &Change)> = Vec::new();
    for (i, c) in changes {
        let before = match queue_of(&c.setting) {
            Some((disk, true)) => out
                .iter()
                .position(|(_, o)| queue_of(&o.setting) == Some((disk, false))),
            _ => None,
        };
        match before {
            Some(at) => out.insert(at, (i, c)),
            None => out.push((i, c)),
        }
    }
    out.into_iter().map(|(i, _)| i).collect()
}

/// Apply a plan, recording each change (with its first `before`) in the state file. A state
/// file from another boot is set aside first.
pub fn apply(host: &Host, plan: &Plan, state_file: &Path) -> Result<Outcome, TuneError> {
    let (state, set_aside) = load_this_boot(host, state_file)?;
    let mut state = state.unwrap_or_else(|| State {
        version: STATE_VERSION,
        root: host.root.display().to_string(),
        boot_id: boot_id(host),
        changes: Vec::new(),
    });
    state.version = STATE_VERSION;
    let mut out = Outcome {
        skipped: plan.skipped.clone(),
        set_aside,
        ..Default::default()
    };
    for i in scheduler_first(plan.changes.iter().enumerate()) {
        let c = &plan.changes[i];
        if let Err(why) = identity_ok(host, &c.guard) {
            out.failed.push(Skip {
                what: c.what.clone(),
                reason: why,
            });
            continue;
        }
        match write_setting(host, &c.setting, &c.after) {
            Ok(()) => {
                tracing::info!(what = %c.what, before = %c.before, after = %c.after, reason = %c.reason, "changed");
                // A setting tuned before keeps its original value: --revert goes back to it.
                match state.changes.iter_mut().find(|r| r.setting == c.setting) {
                    Some(r) => r.after = c.after.clone(),
                    None => state.changes.push(c.clone()),
                }
                state.save(state_file)?;
                out.applied.push(c.clone());
            }
            Err(e) => {
                tracing::warn!(what = %c.what, error = %e, "not changed");
                let host_wide = matches!(&c.setting, Setting::File { path } if path.starts_with("proc/sys/net/core/"));
                let reason = if host_wide && e.kind() == std::io::ErrorKind::PermissionDenied {
                    format!("{e}: a host-wide key, read-only inside a network namespace")
                } else {
                    e.to_string()
                };
                out.failed.push(Skip {
                    what: c.what.clone(),
                    reason,
                });
            }
        }
    }
    Ok(out)
}

/// Undo every recorded change, newest first (a disk's scheduler before its other queue
/// settings). The state file is removed when all were restored, else rewritten with the ones
/// that could not be (a device that is gone or is now another device, a refused write), for a
/// later `--revert`. A state file from another boot is set aside and nothing is written.
pub fn revert(host: &Host, state_file: &Path) -> Result<Outcome, TuneError> {
    let (state, set_aside) = load_this_boot(host, state_file)?;
    let Some(state) = state else {
        return Ok(Outcome {
            set_aside,
            ..Default::default()
        });
    };
    let mut out = Outcome::default();
    let mut left = Vec::new();
    let kept = |why: String| format!("{why}; kept in {}", state_file.display());
    for i in scheduler_first(state.changes.iter().enumerate().rev()) {
        let c = &state.changes[i];
        if let Err(why) = identity_ok(host, &c.guard) {
            out.failed.push(Skip {
                what: c.what.clone(),
                reason: kept(why),
            });
            left.push(i);
            continue;
        }
        match write_setting(host, &c.setting, &c.before) {
            Ok(()) => {
                tracing::info!(what = %c.what, restored = %c.before, "reverted");
                out.applied.push(Change {
                    before: c.after.clone(),
                    after: c.before.clone(),
                    reason: "revert".into(),
                    ..c.clone()
                });
            }
            Err(e) => {
                tracing::warn!(what = %c.what, error = %e, "not reverted");
                out.failed.push(Skip {
                    what: c.what.clone(),
                    reason: kept(e.to_string()),
                });
                left.push(i);
            }
        }
    }
    out.kept = left.len();
    if left.is_empty() {
        std::fs::remove_file(state_file)
            .map_err(|e| TuneError::State(state_file.display().to_string(), e))?;
    } else {
        left.sort_unstable();
        let changes = left.into_iter().map(|i| state.changes[i].clone()).collect();
        State { changes, ..state }.save(state_file)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::probe;
    use crate::tune::{plan, Options};
    use crate::Profiles;
    use std::path::Path;

    const BOOT_A: &str = "3d7c6a52-0c1e-4a8e-9f65-0a4c1b2d3e4f";
    const BOOT_B: &str = "8e1f0b9a-7d6c-4b5a-8e2f-1c3d5e7f9a0b";

    /// A recorded machine with one NVMe disk (mq-deadline, nr_requests 255) and the TCP sysctls.
    fn machine(nr_requests: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let files = [
            (BOOT_ID, BOOT_A),
            ("sys/block/nvme0n1/size", "7501476528"),
            ("sys/block/nvme0n1/wwid", "eui.0025385b21b0c5a1"),
            (
                "sys/block/nvme0n1/device/model",
                "SAMSUNG MZQL23T8HCLS-00A07",
            ),
            (
                "sys/block/nvme0n1/queue/scheduler",
                "[mq-deadline] kyber none",
            ),
            ("sys/block/nvme0n1/queue/nr_requests", nr_requests),
            ("proc/sys/net/ipv4/tcp_mtu_probing", "0"),
        ];
        for (p, v) in files {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{v}\n")).unwrap();
        }
        let drv = d.path().join("sys/block/nvme0n1/device/device");
        std::fs::create_dir_all(&drv).unwrap();
        std::os::unix::fs::symlink("../../../../bus/pci/drivers/nvme", drv.join("driver")).unwrap();
        d
    }

    fn disk_plan(host: &Host) -> Plan {
        let profiles = Profiles::builtin().unwrap();
        let report = probe(host, &profiles);
        let opts = Options {
            disks: vec!["nvme0n1".into()],
            skip_net: true,
            ..Default::default()
        };
        plan(host, &report, &profiles, &opts)
    }

    fn read(root: &Path, rel: &str) -> String {
        std::fs::read_to_string(root.join(rel))
            .unwrap()
            .trim()
            .to_string()
    }

    fn whats(changes: &[Change]) -> Vec<&str> {
        changes
            .iter()
            .map(|c| c.what.as_str())
            .filter(|w| w.starts_with("nvme0n1"))
            .collect()
    }

    #[test]
    fn a_disks_scheduler_is_written_before_its_nr_requests_at_apply_and_at_revert() {
        let d = machine("255");
        let host = Host::new(d.path());
        let mut p = disk_plan(&host);
        assert_eq!(
            whats(&p.changes),
            ["nvme0n1 scheduler", "nvme0n1 nr_requests"]
        );
        // Whatever order the plan lists them in.
        p.changes.reverse();
        let state = d.path().join("state.json");
        let out = apply(&host, &p, &state).unwrap();
        assert_eq!(
            whats(&out.applied),
            ["nvme0n1 scheduler", "nvme0n1 nr_requests"]
        );
        assert_eq!(
            read(d.path(), "sys/block/nvme0n1/queue/nr_requests"),
            "1023"
        );
        let out = revert(&host, &state).unwrap();
        assert_eq!(
            whats(&out.applied),
            ["nvme0n1 scheduler", "nvme0n1 nr_requests"]
        );
        // In the other order, the scheduler switch would have reset nr_requests to 128.
        assert_eq!(read(d.path(), "sys/block/nvme0n1/queue/nr_requests"), "255");
        assert_eq!(
            read(d.path(), "sys/block/nvme0n1/queue/scheduler"),
            "[mq-deadline] kyber none"
        );
        assert!(!state.exists());
    }

    #[test]
    fn nr_requests_is_set_again_after_a_scheduler_switch_even_when_it_had_the_value() {
        let d = machine("1023");
        let host = Host::new(d.path());
        let p = disk_plan(&host);
        assert_eq!(
            whats(&p.changes),
            ["nvme0n1 scheduler", "nvme0n1 nr_requests"]
        );
        let state = d.path().join("state.json");
        apply(&host, &p, &state).unwrap();
        assert_eq!(
            read(d.path(), "sys/block/nvme0n1/queue/nr_requests"),
            "1023"
        );
        revert(&host, &state).unwrap();
        assert_eq!(
            read(d.path(), "sys/block/nvme0n1/queue/nr_requests"),
            "1023"
        );
    }

    #[test]
    fn another_disk_under_the_name_is_not_touched_and_its_changes_are_kept() {
        let d = machine("255");
        let host = Host::new(d.path());
        let p = disk_plan(&host);
        let scheduler = p.changes.iter().find(|c| c.what == "nvme0n1 scheduler");
        assert!(matches!(
            &scheduler.unwrap().guard,
            Some(Guard::Disk { disk, identity }) if disk == "nvme0n1" && identity == "wwid eui.0025385b21b0c5a1"
        ));
        let wwid = d.path().join("sys/block/nvme0n1/wwid");
        // At apply: a disk swapped in since the plan is refused.
        std::fs::write(&wwid, "eui.00000000000000ff\n").unwrap();
        let state = d.path().join("state.json");
        let out = apply(&host, &p, &state).unwrap();
        assert!(whats(&out.applied).is_empty(), "{out:?}");
        let refused: Vec<&Skip> = out
            .failed
            .iter()
            .filter(|f| f.what.starts_with("nvme0n1"))
            .collect();
        assert_eq!(refused.len(), 2, "{out:?}");
        assert!(refused[0].reason.contains("is now another disk"), "{out:?}");
        assert_eq!(read(d.path(), "sys/block/nvme0n1/queue/nr_requests"), "255");

        // At revert: the disk changes wait in the state file; the rest is reverted.
        std::fs::write(&wwid, "eui.0025385b21b0c5a1\n").unwrap();
        apply(&host, &p, &state).unwrap();
        std::fs::write(&wwid, "eui.00000000000000ff\n").unwrap();
        let out = revert(&host, &state).unwrap();
        assert_eq!(out.kept, 2, "{out:?}");
        assert!(
            out.failed.iter().all(|f| f.reason.contains("kept in")),
            "{out:?}"
        );
        assert!(out.applied.iter().any(|c| c.what.starts_with("sysctl ")));
        assert_eq!(read(d.path(), "proc/sys/net/ipv4/tcp_mtu_probing"), "0");
        let left = State::load(&state).unwrap().expect("state kept");
        assert_eq!(
            whats(&left.changes),
            ["nvme0n1 scheduler", "nvme0n1 nr_requests"]
        );
        // The disk is back: a second revert finishes the job.
        std::fs::write(&wwid, "eui.0025385b21b0c5a1\n").unwrap();
        let out = revert(&host, &state).unwrap();
        assert_eq!((out.kept, out.failed.len()), (0, 0), "{out:?}");
        assert_eq!(read(d.path(), "sys/block/nvme0n1/queue/nr_requests"), "255");
        assert!(!state.exists());
    }

    #[test]
    fn a_state_file_from_another_boot_is_set_aside_not_reverted_or_merged() {
        let d = machine("255");
        let host = Host::new(d.path());
        let state = d.path().join("state.json");
        apply(&host, &disk_plan(&host), &state).unwrap();
        let recorded = State::load(&state).unwrap().unwrap();
        assert_eq!(recorded.boot_id.as_deref(), Some(BOOT_A));
        assert_eq!(recorded.version, STATE_VERSION);

        // A reboot without ExecStop; this tree keeps its tuned values so that a revert would show.
        std::fs::write(d.path().join(BOOT_ID), format!("{BOOT_B}\n")).unwrap();
        let tuned = read(d.path(), "sys/block/nvme0n1/queue/scheduler");
        let out = revert(&host, &state).unwrap();
        let aside = out.set_aside.expect("set aside");
        assert_eq!(aside.boot_id.as_deref(), Some(BOOT_A));
        assert_eq!(aside.this_boot.as_deref(), Some(BOOT_B));
        assert_eq!(aside.changes, recorded.changes.len());
        assert!(out.applied.is_empty() && out.failed.is_empty());
        assert_eq!(read(d.path(), "sys/block/nvme0n1/queue/scheduler"), tuned);
        assert!(!state.exists());
        let moved = d.path().join("state.json.previous-boot");
        assert_eq!(aside.to, moved.display().to_string());
        assert_eq!(
            State::load(&moved).unwrap().unwrap().changes,
            recorded.changes
        );

        // Apply in the new boot over a stale file: a fresh record with this boot's values.
        std::fs::rename(&moved, &state).unwrap();
        std::fs::write(d.path().join("proc/sys/net/ipv4/tcp_mtu_probing"), "0\n").unwrap();
        let out = apply(&host, &disk_plan(&host), &state).unwrap();
        assert!(out.set_aside.is_some());
        let fresh = State::load(&state).unwrap().unwrap();
        assert_eq!(fresh.boot_id.as_deref(), Some(BOOT_B));
        let names: Vec<&str> = fresh.changes.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(names, ["sysctl net.ipv4.tcp_mtu_probing"], "{fresh:?}");
    }

    #[test]
    fn a_version_1_state_file_is_read_and_set_aside_where_the_boot_is_known() {
        let d = machine("255");
        let host = Host::new(d.path());
        let state = d.path().join("state.json");
        let v1 = r#"{"version":1,"root":"/","changes":[{"what":"eth0 mtu",
            "setting":{"kind":"file","path":"sys/class/net/eth0/mtu"},
            "guard":{"iface":"eth0","ifindex":2},"before":"1500","after":"9000","reason":"--mtu"}]}"#;
        std::fs::write(&state, v1).unwrap();
        let old = State::load(&state).unwrap().unwrap();
        assert_eq!(
            old.changes[0].guard,
            Some(Guard::Interface {
                iface: "eth0".into(),
                ifindex: 2
            })
        );
        let out = revert(&host, &state).unwrap();
        let aside = out.set_aside.expect("set aside");
        assert_eq!((aside.boot_id, aside.changes), (None, 1));
    }
}
