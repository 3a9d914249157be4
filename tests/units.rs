//! Every unit file in `systemd/` is hardened: `systemd-analyze security --offline=yes` scores
//! each service at 2.0 or lower ("OK"), and the files the image installs beside them
//! (sysusers.d, tmpfiles.d) are present. Skips, saying why, where `systemd-analyze` is absent.
//! The image build (`image/build.sh`, read, not run) enables every unit that has an `[Install]`
//! section and installs what each unit's `Documentation=file://` names; the image loads the
//! congestion control module the TCP profile prefers.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The highest exposure a unit may have, as `systemd-analyze --threshold=` counts it (tenths).
const MAX_EXPOSURE_TENTHS: u32 = 20;

fn systemd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../systemd")
}

fn service_units() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(systemd_dir())
        .expect("systemd/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    units.sort();
    units
}

fn have_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The "Overall exposure level" figure, for the failure message.
fn overall(stdout: &str) -> String {
    stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no overall line)")
        .to_string()
}

#[test]
fn every_service_scores_ok_offline() {
    if !have_systemd_analyze() {
        println!("skipped: systemd-analyze is not installed (Debian package `systemd`)");
        return;
    }
    let units = service_units();
    assert!(units.len() >= 2, "expected the role units in systemd/");
    let mut failures = Vec::new();
    for unit in &units {
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--threshold={MAX_EXPOSURE_TENTHS}"))
            .arg(unit)
            .current_dir(systemd_dir())
            .output()
            .expect("run systemd-analyze");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = overall(&stdout);
        println!("{}: {line}", unit.display());
        if !out.status.success() {
            let gaps: Vec<&str> = stdout.lines().filter(|l| l.starts_with('✗')).collect();
            failures.push(format!(
                "{}: {line}\n{}\n{}",
                unit.display(),
                gaps.join("\n"),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "units above exposure 2.0:\n{}",
        failures.join("\n")
    );
}

#[test]
fn roles_are_notify_units_with_a_watchdog() {
    for name in [
        "ferry-process-server.service",
        "ferry-master-target.service",
    ] {
        let text = std::fs::read_to_string(systemd_dir().join(name)).expect("unit exists");
        for want in [
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=",
            "User=ferry",
        ] {
            assert!(text.contains(want), "{name} lacks {want}");
        }
    }
}

#[test]
fn sysusers_and_tmpfiles_entries_exist() {
    let sysusers = std::fs::read_to_string(systemd_dir().join("sysusers.d/ferry.conf"))
        .expect("sysusers.d/ferry.conf");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(3).eq(["u", "ferry", "850"])),
        "the ferry account has a pinned uid"
    );
    let tmpfiles = std::fs::read_to_string(systemd_dir().join("tmpfiles.d/ferry.conf"))
        .expect("tmpfiles.d/ferry.conf");
    for dir in ["/var/lib/ferry", "/var/lib/ferry/etc", "/var/cache/ferry"] {
        assert!(
            tmpfiles
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(dir)),
            "tmpfiles.d creates {dir}"
        );
    }
}

fn repo_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// build.sh as logical lines (backslash continuations joined).
fn build_sh_lines() -> Vec<String> {
    repo_file("image/build.sh")
        .replace("\\\n", " ")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_image_enables_every_installable_unit() {
    let enabled: Vec<String> = build_sh_lines()
        .iter()
        .filter(|l| {
            l.trim_start()
                .starts_with("systemctl --root=\"$root\" enable ")
        })
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect();
    assert!(
        !enabled.is_empty(),
        "no `systemctl --root=\"$root\" enable` in build.sh"
    );
    for unit in service_units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        if text.lines().any(|l| l.starts_with("WantedBy=")) {
            assert!(
                enabled.contains(&name),
                "{name} has [Install] WantedBy= but image/build.sh does not enable it"
            );
        }
    }
}

#[test]
fn unit_documentation_links_name_files_the_image_installs() {
    let lines = build_sh_lines();
    let rootfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../image/rootfs");
    for unit in service_units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let docs = text
            .lines()
            .filter_map(|l| l.strip_prefix("Documentation="))
            .flat_map(str::split_whitespace);
        for path in docs.filter_map(|d| d.strip_prefix("file://")) {
            let installed = lines
                .iter()
                .any(|l| l.starts_with("install ") && l.contains(&format!("\"$root{path}\"")));
            let in_rootfs = rootfs.join(path.trim_start_matches('/')).is_file();
            assert!(
                installed || in_rootfs,
                "{}: Documentation=file://{path} is neither installed by build.sh nor in image/rootfs",
                unit.display()
            );
        }
    }
}

#[test]
fn the_image_loads_the_preferred_congestion_control_before_tuning() {
    let profiles = ferry_hardware::Profiles::builtin().expect("built-in profiles");
    // Debian's kernel builds cubic and reno in; every other algorithm is a module, which the
    // tuning unit (ProtectKernelModules=yes) cannot load and so never finds available.
    let modules: Vec<String> = profiles
        .tcp
        .congestion_control
        .iter()
        .filter(|c| !["cubic", "reno"].contains(&c.as_str()))
        .map(|c| format!("tcp_{c}"))
        .collect();
    assert!(modules.contains(&"tcp_bbr".to_string()), "{modules:?}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../image/rootfs/etc/modules-load.d");
    let listed: Vec<String> = std::fs::read_dir(&dir)
        .expect("image/rootfs/etc/modules-load.d")
        .flat_map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    for m in &modules {
        assert!(
            listed.contains(m),
            "{m} is not in image/rootfs/etc/modules-load.d"
        );
    }
    let unit = std::fs::read_to_string(systemd_dir().join("ferry-hw-tune.service")).unwrap();
    assert!(unit.contains("ProtectKernelModules=yes"));
    let after: Vec<&str> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("After="))
        .flat_map(str::split_whitespace)
        .collect();
    assert!(
        after.contains(&"systemd-modules-load.service"),
        "ferry-hw-tune.service (DefaultDependencies=no) must run after modules-load.d: {after:?}"
    );
}
