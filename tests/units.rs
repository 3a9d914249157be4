//! Every unit file in `systemd/` is hardened: `systemd-analyze security --offline=yes` scores
//! each service at 2.0 or lower ("OK"), and the files the image installs beside them
//! (sysusers.d, tmpfiles.d) are present. Skips, saying why, where `systemd-analyze` is absent.

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
