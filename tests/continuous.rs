//! Continuous replication end to end: qemu-storage-daemon mirrors a qcow2 disk to the process
//! server (NBD over TLS), the master target keeps recovery points, and each point equals the
//! source under `qemu-img compare`; under load every point is a prefix of the write stream.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const MIB: u64 = 1 << 20;
const MARKER: &[u8] = b"FERRY-PLAINTEXT-MARKER-7d1c";

fn marker_block(len: usize, salt: u8) -> Vec<u8> {
    let mut v: Vec<u8> = MARKER.iter().cycle().take(len).copied().collect();
    v[len - 1] = salt;
    v
}

#[test]
fn each_phase_becomes_a_matching_recovery_point() {
    let site = Site::start("vm1-disk0", 64 * MIB, &["write -P 0x11 40M 4M"], |_| {});
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut phases: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut rng = Rng(0x5eed_1234);

    // Phase 1: sequential 1 MiB writes carrying the plaintext marker.
    rt.block_on(async {
        let mut g = site.guest().await;
        for i in 0..8u64 {
            g.write(i * MIB, &marker_block(MIB as usize, i as u8), false)
                .await
                .unwrap();
        }
        g.flush().await.unwrap();
    });
    let seq = site.caught_up();
    site.assert_point_equals_guest(seq);
    phases.push((seq, site.guest_image()));

    // Phase 2: random 4 KiB writes (some land on the same block twice).
    rt.block_on(async {
        let mut g = site.guest().await;
        for i in 0..300u64 {
            let off = rng.below(64 * MIB / 4096) * 4096;
            g.write(off, &vec![(i % 251) as u8 + 1; 4096], false)
                .await
                .unwrap();
        }
        g.flush().await.unwrap();
    });
    let seq = site.caught_up();
    site.assert_point_equals_guest(seq);
    phases.push((seq, site.guest_image()));

    // Phase 3: overwrites, unaligned writes, zeroes and trims (qemu-io through QEMU's export).
    site.qemu_io(&[
        "write -P 0x22 2M 1M".into(),
        "write -P 0x33 12345 77777".into(),
        "write -P 0x44 65535 3".into(),
        "write -z 4M 3M".into(),
        "discard 40M 2M".into(),
        "write -z 63M 12288".into(),
        "write -P 0x55 66060288 1M".into(),
    ]);
    let seq = site.caught_up();
    site.assert_point_equals_guest(seq);
    phases.push((seq, site.guest_image()));

    // Every earlier phase's point is still intact after later ones.
    for (seq, image) in &phases {
        assert!(
            site.point_image(*seq) == *image,
            "point {seq} changed after later phases"
        );
    }
    // The recovery site holds no plaintext.
    assert_no_plaintext(&site.lab.repo, MARKER);
    // Instant access: serve the phase-2 point over NBD and compare with its recorded image.
    let (mut serve, port) = serve_point(&site, phases[1].0);
    let recorded = site.dir.path().join("phase2.raw");
    std::fs::write(&recorded, &phases[1].1).unwrap();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(format!("nbd://127.0.0.1:{port}/vm1-disk0"))
        .arg(&recorded)
        .output()
        .unwrap();
    // While served, the point is held (the master target's retention keeps it); stopped, the
    // server releases it.
    let holds = |site: &Site| -> serde_json::Value {
        let o = site.lab.ferry(&["holds", "--json"]).unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let h = holds(&site);
    assert_eq!(h[0]["holder"], format!("serve.{}", serve.id()), "{h}");
    assert_eq!(h[0]["points"][0]["seq"], phases[1].0, "{h}");
    Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    let stopped = serve.wait().unwrap();
    assert!(stopped.success(), "{stopped:?}");
    assert_eq!(holds(&site), serde_json::json!([]));
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // And the repository verifies clean.
    let v = site.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let listing = site.lab.ferry(&["points", "--json"]).unwrap();
    let points: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    assert!(points.as_array().unwrap().len() >= 3);
}

#[test]
fn under_load_every_recovery_point_is_a_prefix_of_the_writes() {
    let size = 32 * MIB;
    let site = Site::start("vm2-disk0", size, &["write -P 0x5a 0 32M"], |lab| {
        lab.interval_ms = 150;
    });
    let s0 = site.caught_up();
    let base = site.guest_image();
    assert!(
        site.point_image(s0) == base,
        "the seeded point differs from the source"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let writer = TaggedWriter::start(&rt, &site.guest_sock, site.size, 0xfeed_beef, 50);

    let started = Instant::now();
    let mut checked = Vec::new();
    let mut seen = s0;
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(300));
        let Some(&latest) = points_after(&site, seen).last() else {
            continue;
        };
        seen = latest;
        let image = site.point_image(latest);
        let snapshot = writer.snapshot();
        let n = check_prefix(&image, &base, &snapshot)
            .unwrap_or_else(|e| panic!("point {latest}: {e}"));
        checked.push((latest, n));
    }
    let (all, _) = writer.finish(&rt);
    let last = site.caught_up();
    let n = check_prefix(&site.point_image(last), &base, &all).unwrap();
    assert_eq!(n as usize, all.len(), "the final point misses writes");
    site.assert_point_equals_guest(last);
    eprintln!(
        "checked {} points while writing: {checked:?}; {} writes in all",
        checked.len(),
        all.len()
    );
    assert!(
        checked.len() >= 5,
        "too few points sampled under load: {checked:?}"
    );
    assert!(
        checked.windows(2).all(|w| w[0].1 <= w[1].1),
        "prefixes went backwards"
    );
}

#[test]
fn retention_thins_old_points_and_kept_points_stay_intact() {
    let site = Site::start("keep-disk", 8 * MIB, &[], |lab| {
        lab.interval_ms = 100;
        lab.master_args = [
            "--keep-all-secs",
            "2",
            "--tier",
            "3:3600",
            "--retention-interval-secs",
            "1",
        ]
        .map(String::from)
        .to_vec();
    });
    let mut recorded = Vec::new();
    for i in 0..10u64 {
        site.qemu_io(&[format!("write -P {} {}M 64k", i + 1, i % 8)]);
        recorded.push((site.caught_up(), site.guest_image()));
        std::thread::sleep(Duration::from_millis(600));
    }
    std::thread::sleep(Duration::from_secs(3));
    let kept = points_after(&site, 0);
    let newest = recorded.last().unwrap().0;
    assert!(
        kept.contains(&newest),
        "the newest point was removed: {kept:?}"
    );
    assert!(
        kept.len() < recorded.len(),
        "retention removed nothing: {kept:?}"
    );
    let mut still = 0;
    for (seq, image) in &recorded {
        if kept.contains(seq) {
            assert!(site.point_image(*seq) == *image, "kept point {seq} changed");
            still += 1;
        }
    }
    assert!(still >= 2, "kept {kept:?}");
    let v = site.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn a_full_journal_keeps_acknowledging_writes_and_says_resync_required() {
    let mut site = Site::start("full-disk", 16 * MIB, &[], |lab| {
        lab.journal_capacity = Some(2 * MIB);
    });
    site.caught_up();
    // The recovery site goes away; the guest keeps writing more than the journal holds.
    site.lab.kill_master();
    site.qemu_io(&["write -P 0x21 0 3M".into(), "write -P 0x22 8M 1M".into()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let st = loop {
        let st = site.lab.status("full-disk").unwrap();
        if st.state == ferry_process_server::State::ResyncRequired || Instant::now() > deadline {
            break st;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        st.state,
        ferry_process_server::State::ResyncRequired,
        "{st:?}"
    );
    assert!(
        st.dirty_bytes >= MIB,
        "the dirty bitmap missed writes: {st:?}"
    );
    let out = Command::new(exe())
        .args(["status", "--cache"])
        .arg(&site.lab.cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("resync-required"),
        "{text}"
    );
    // The guest's disk took every write.
    let image = site.guest_image();
    assert!(image[..3 * MIB as usize].iter().all(|&b| b == 0x21));
    assert!(image[8 * MIB as usize..9 * MIB as usize]
        .iter()
        .all(|&b| b == 0x22));
}

/// A guest that behaves as fsfreeze makes it: while `frozen` exists it flushes, says so by
/// creating `paused`, and issues no write until `frozen` is gone. Returns the log and, for each
/// freeze, how many writes had completed before it.
fn freezable_writer(
    rt: &tokio::runtime::Runtime,
    site: &Site,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Log, Vec<u64>)> {
    let (frozen, paused) = (site.lab.dir.join("frozen"), site.lab.dir.join("paused"));
    let (sock, size) = (site.guest_sock.clone(), site.size);
    rt.spawn(async move {
        let mut g = ferry_nbd::client::Client::connect_unix(&sock, "guest")
            .await
            .unwrap();
        let (mut rng, mut log, mut freezes) = (Rng(0xf2ee_2e00), Log::new(), Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if frozen.exists() {
                g.flush().await.unwrap();
                freezes.push(log.len() as u64);
                std::fs::write(&paused, b"").unwrap();
                while frozen.exists() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            let (off, len) = random_extent(&mut rng, size);
            log.push((off, len));
            let n = log.len() as u64;
            g.write(off, &tagged(n, off, len), false).await.unwrap();
        }
        g.flush().await.unwrap();
        (log, freezes)
    })
}

fn app_point(site: &Site) -> std::process::Output {
    Command::new(exe())
        .args([
            "app-point",
            "--wait-secs",
            "60",
            "--json",
            "--disk",
            &site.disk,
        ])
        .arg("--cache")
        .arg(&site.lab.cache)
        .output()
        .unwrap()
}

#[test]
fn an_application_consistent_point_holds_exactly_the_writes_before_the_freeze() {
    let size = 16 * MIB;
    let mut site = Site::start("app-disk", size, &["write -P 0x6b 0 16M"], |lab| {
        let (f, p) = (lab.dir.join("frozen"), lab.dir.join("paused"));
        let freeze = format!(
            "touch {f}; i=0; until [ -e {p} ]; do sleep 0.01; i=$((i+1)); [ $i -lt 2000 ] || exit 9; done",
            f = f.display(),
            p = p.display()
        );
        let thaw = format!("rm -f {} {}", f.display(), p.display());
        lab.process_args = vec!["--freeze-hook".into(), freeze, "--thaw-hook".into(), thaw];
        lab.interval_ms = 100;
    });
    site.caught_up();
    let base = site.guest_image();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = freezable_writer(&rt, &site, stop.clone());
    std::thread::sleep(Duration::from_millis(700));

    // While the guest keeps writing: the point ends exactly where the guest froze.
    let out = app_point(&site);
    assert!(
        out.status.success(),
        "app-point: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seq = said["point"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (log, freezes) = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(60), writer).await })
        .expect("the guest's writes stalled")
        .unwrap();
    assert_eq!(freezes.len(), 1, "one freeze asked for, {freezes:?} seen");
    let n = check_prefix(&site.point_image(seq), &base, &log).unwrap();
    assert_eq!(
        n, freezes[0],
        "point {seq} holds {n} writes; the guest froze after {}",
        freezes[0]
    );
    assert!(n > 0 && (n as usize) < log.len(), "{n} of {}", log.len());
    assert_eq!(
        application_points(&site),
        vec![seq],
        "only the frozen moment is tagged"
    );

    // An idle guest: the newest point already holds everything, and becomes tagged as it is.
    // Its agent answers the freeze at once (nothing to flush).
    let last = site.caught_up();
    let (frozen, paused) = (site.lab.dir.join("frozen"), site.lab.dir.join("paused"));
    let agent = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !frozen.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::write(paused, b"").unwrap();
    });
    let out = app_point(&site);
    agent.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let idle: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let idle = idle["point"].as_u64().unwrap();
    assert!(idle > last);
    site.assert_point_equals_guest(idle);

    // A guest agent that does not answer: the thaw hook still runs, the operator reads why,
    // no point is tagged, and replication goes on.
    site.lab.kill_process();
    let thawed = site.lab.dir.join("thawed");
    site.lab.process_args = vec![
        "--freeze-hook".into(),
        "echo 'guest agent is not responding' >&2; exit 3".into(),
        "--thaw-hook".into(),
        format!("touch {}", thawed.display()),
    ];
    site.lab.start_process().unwrap();
    site.caught_up();
    let out = app_point(&site);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("guest agent is not responding"),
        "{err}"
    );
    assert!(
        thawed.exists(),
        "the thaw hook did not run after a failed freeze"
    );
    site.qemu_io(&["write -P 0x7c 1M 64k".into()]);
    let after = site.caught_up();
    site.assert_point_equals_guest(after);
    assert_eq!(application_points(&site), vec![seq, idle]);
}

/// The points `ferry points` lists as application-consistent.
fn application_points(site: &Site) -> Vec<u64> {
    let listing = site
        .lab
        .ferry(&["points", "--json", "--disk", &site.disk])
        .unwrap();
    let points: serde_json::Value = serde_json::from_slice(&listing.stdout).unwrap();
    points
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["meta"]["consistency"] == "application")
        .map(|p| p["meta"]["seq"].as_u64().unwrap())
        .collect()
}

/// Whether `dir`'s filesystem accepts O_DIRECT (tmpfs does not).
fn o_direct_supported(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("o-direct-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .is_ok();
    let _ = std::fs::remove_file(&p);
    ok
}

/// The journal segments a process opened with O_DIRECT, as its open file flags say.
fn direct_segments(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.display().to_string();
        if !t.contains("/journal/seg-") {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if flags & libc::O_DIRECT as u32 != 0 {
            out.push(t);
        }
    }
    out
}

/// With `--cache-io direct` the journal's segments are written with O_DIRECT (the process
/// server's open file flags show it), unaligned guest writes still become matching points, and
/// a SIGKILLed process server recovers segments that end in a direct writer's padding.
#[test]
fn a_journal_written_with_o_direct_replicates_and_recovers_after_a_kill() {
    let mut site = Site::start("direct", 32 * MIB, &["write -P 0x11 0 8M"], |lab| {
        lab.process_args = vec!["--cache-io".into(), "direct".into()];
    });
    site.qemu_io(&[
        "write -P 0x33 12345 77777".into(),
        "write -P 0x44 65535 3".into(),
        "write -P 0x55 1M 3M".into(),
    ]);
    let seq = site.caught_up();
    site.assert_point_equals_guest(seq);
    let st = site.lab.status(&site.disk).unwrap();
    if o_direct_supported(&site.lab.cache) {
        assert!(st.journal_direct_io, "{st:?}");
        let pid = site.lab.process_pid().unwrap();
        assert!(
            !direct_segments(pid).is_empty(),
            "no journal segment is open with O_DIRECT"
        );
    } else {
        eprintln!("this filesystem has no O_DIRECT: the journal fell back to buffered writes");
        assert!(!st.journal_direct_io, "{st:?}");
    }
    // Writes the process server acknowledged, then SIGKILL: it recovers its padded segments.
    site.qemu_io(&[
        "write -P 0x66 7777 5000".into(),
        "write -P 0x77 20M 1M".into(),
    ]);
    site.lab.kill_process();
    site.lab.start_process().unwrap();
    site.qemu_io(&["write -P 0x88 30M 4097".into()]);
    let seq = site.caught_up();
    site.assert_point_equals_guest(seq);
}
