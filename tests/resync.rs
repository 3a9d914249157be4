//! Checksum resync of continuously protected disks: a journal that overflowed, a process server
//! that lost its journal, and an operator's request. The process server reads the disk on its
//! host (qemu-storage-daemon, while the mirror job keeps running and the guest keeps writing),
//! sends only blocks whose names differ, and the resynced point is a prefix of the write stream
//! like any other.

mod support;

use ferry_process_server::State;
use std::time::{Duration, Instant};
use support::*;

const MIB: u64 = 1 << 20;

fn wait_state(site: &Site, want: State, timeout: Duration) -> ferry_process_server::DiskStatus {
    let deadline = Instant::now() + timeout;
    loop {
        // A process server that just started may not have written its status yet.
        if let Ok(st) = site.lab.status(&site.disk) {
            if st.state == want {
                return st;
            }
            assert!(Instant::now() < deadline, "{st:?}");
        } else {
            assert!(Instant::now() < deadline, "no status for {}", site.disk);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the process server reports `n` committed resyncs.
fn wait_resyncs(site: &Site, n: u64) -> ferry_process_server::DiskStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = site.lab.status(&site.disk).unwrap();
        if st.resyncs >= n {
            return st;
        }
        assert!(Instant::now() < deadline, "no resync committed: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A protected site whose disk knows its host, each MiB filled with its own byte (so blocks of
/// different MiBs differ, and a block sent is a block that differed).
fn patterned_site(disk: &str, size: u64) -> Site {
    let prefill: Vec<String> = (0..size / MIB)
        .map(|i| format!("write -P {} {i}M 1M", 1 + i % 255))
        .collect();
    let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
    Site::start(disk, size, &prefill, |lab| {
        lab.host_access = true;
        lab.interval_ms = 100;
    })
}

#[test]
fn a_full_journal_is_resynchronized_from_the_host_while_the_guest_writes() {
    let size = 32 * MIB;
    let mut site = Site::start("full-rs", size, &["write -P 0x3a 0 32M"], |lab| {
        // Smaller than the disk: the first full copy overflows it too, and is resynced.
        lab.journal_capacity = Some(8 * MIB);
        lab.host_access = true;
        lab.interval_ms = 100;
    });
    let before = match site.lab.wait_caught_up(&site.disk, Duration::from_secs(60)) {
        Ok(s) => s.acked_seq,
        Err(e) => panic!(
            "{e:#}\n{}",
            std::fs::read_to_string(site.lab.dir.join("process-server.log")).unwrap_or_default()
        ),
    };
    // The first full copy overflowed the journal and was resynced already.
    let resyncs = site.lab.status(&site.disk).unwrap().resyncs;
    assert!(
        resyncs >= 1,
        "the first copy did not fit the journal, yet no resync ran"
    );
    // The recovery site goes away and the guest writes more than the journal holds.
    site.lab.kill_master();
    site.qemu_io(&["write -P 0x21 0 8M".into(), "write -P 0x22 16M 2M".into()]);
    wait_state(&site, State::ResyncRequired, Duration::from_secs(20));

    // The recovery site comes back while the guest keeps writing: the resync runs under load.
    let base = site.guest_image();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Paced so that what it writes during the resync fits the journal.
    let writer = TaggedWriter::start_paced(
        &rt,
        &site.guest_sock,
        site.size,
        0x5e5e_0001,
        16,
        Duration::from_millis(3),
    );
    site.lab.start_master().unwrap();
    let st = wait_resyncs(&site, resyncs + 1);
    std::thread::sleep(Duration::from_millis(800));
    let (all, acked) = writer.finish(&rt);
    let last = site.caught_up();
    let n = check_prefix(&site.point_image(last), &base, &all).unwrap();
    assert_eq!(n as usize, all.len(), "{acked} flushed");
    site.assert_point_equals_guest(last);
    // The resynced point and every later one are prefixes of the writes made during it.
    let points = points_after(&site, before);
    assert!(!points.is_empty());
    for seq in spread(&points, 12) {
        check_prefix(&site.point_image(seq), &base, &all)
            .unwrap_or_else(|e| panic!("point {seq} after the resync: {e}"));
    }
    // Only what differed crossed: the 10 MiB written while the site was away, plus the writes
    // made during the resync, not the 32 MiB disk.
    assert!(
        st.last_cut_bytes < 20 * MIB,
        "the resync sent {} bytes",
        st.last_cut_bytes
    );
    let now = site.lab.status(&site.disk).unwrap();
    assert_eq!(now.state, State::Replicating, "{now:?}");
    assert_eq!(now.dirty_bytes, 0);
    let v = site.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    eprintln!(
        "resync under load: {} blocks, {} bytes of blocks, {} bytes of names; {} writes during it",
        st.last_cut_blocks,
        st.last_cut_bytes,
        st.last_cut_hash_bytes,
        all.len()
    );
}

#[test]
fn a_process_server_that_lost_its_journal_resends_only_what_differs() {
    let size = 64 * MIB;
    let mut site = patterned_site("lost-rs", size);
    site.caught_up();
    // The cache is lost while the recovery site is away, and 1% of the disk changes meanwhile.
    site.lab.kill_master();
    site.lab.kill_process();
    std::fs::remove_dir_all(site.lab.cache.join("lost-rs")).unwrap();
    site.lab.start_process().unwrap();
    // 10 blocks of random bytes (incompressible, no two alike).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = site.guest().await;
        let mut rng = Rng(0x1057_0001);
        for b in [80u64, 81, 82, 83, 84, 640, 641, 642, 643, 644] {
            let data: Vec<u8> = (0..65536 / 8)
                .flat_map(|_| rng.next().to_le_bytes())
                .collect();
            g.write(b * 65536, &data, false).await.unwrap();
        }
        g.flush().await.unwrap();
    });
    site.lab.start_master().unwrap();
    let st = wait_resyncs(&site, 1);
    let last = site.caught_up();
    site.assert_point_equals_guest(last);
    // 10 of 1024 blocks changed: at most 2% of the disk crosses, plus 32 bytes of name a block.
    let blocks = size / 65536;
    assert_eq!(st.last_cut_hash_bytes, 32 * blocks);
    assert_eq!(st.last_cut_blocks, 10, "{st:?}");
    assert!(
        st.last_cut_bytes >= 10 * 65536 && st.last_cut_bytes <= size / 50,
        "the resync sent {} bytes for 640 KiB of changes",
        st.last_cut_bytes
    );
    eprintln!(
        "lost journal: {} blocks, {} bytes of blocks ({:.2}% of the disk), {} bytes of names",
        st.last_cut_blocks,
        st.last_cut_bytes,
        st.last_cut_bytes as f64 * 100.0 / size as f64,
        st.last_cut_hash_bytes
    );

    // The operator asks for one more (say, after restoring the replica's storage): nothing
    // differs, nothing but names crosses, and replication goes on.
    let out = ferry_resync(&site.lab.cache, "lost-rs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = wait_resyncs(&site, 2);
    assert_eq!(st.last_cut_blocks, 0, "{st:?}");
    site.qemu_io(&["write -P 0x77 1M 4k".into()]);
    let last = site.caught_up();
    site.assert_point_equals_guest(last);
}

#[test]
fn without_its_host_a_disk_needing_a_resync_says_how_to_give_it() {
    let mut site = Site::start("nohost-rs", 16 * MIB, &[], |lab| {
        lab.interval_ms = 100;
    });
    site.caught_up();
    site.lab.kill_process();
    std::fs::remove_dir_all(site.lab.cache.join("nohost-rs")).unwrap();
    site.lab.start_process().unwrap();
    wait_state(&site, State::ResyncRequired, Duration::from_secs(20));
    // The state is written first, then the reason the link stopped.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = site.lab.status(&site.disk).unwrap();
        let said = st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("resync required") && e.contains("qmp="));
        if said {
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = ferry_resync(&site.lab.cache, "nohost-rs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("without its host"),
        "{err}"
    );
}

#[test]
fn killing_either_side_during_a_resync_never_exposes_a_partial_point() {
    let size = 192 * MIB;
    let mut site = patterned_site("kill-rs", size);
    let before = site.caught_up();
    let old = site.guest_image();
    // The cache is lost while the recovery site is away, and 5% of the disk changes.
    site.lab.kill_master();
    site.lab.kill_process();
    std::fs::remove_dir_all(site.lab.cache.join("kill-rs")).unwrap();
    site.lab.start_process().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = site.guest().await;
        let mut rng = Rng(0x0c0f_fee5);
        for _ in 0..150 {
            let b = rng.below(size / 65536);
            let data: Vec<u8> = (0..65536 / 8)
                .flat_map(|_| rng.next().to_le_bytes())
                .collect();
            g.write(b * 65536, &data, false).await.unwrap();
        }
        g.flush().await.unwrap();
    });
    let new = site.guest_image();
    site.lab.start_master().unwrap();

    // The resync committed: its point is the first after `before` (`resyncs` counts from the
    // process server's start, so a kill just after the commit would hide it).
    let committed = |st: &ferry_process_server::DiskStatus| st.resyncs > 0 || st.acked_seq > before;
    // Kill one side or the other while the resync runs, four times.
    let mut rng = Rng(0x4b11_4b11);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while kills < 4 {
        assert!(Instant::now() < deadline, "no resync to interrupt");
        let st = site.lab.status(&site.disk).unwrap();
        if committed(&st) {
            break; // it finished before the last kill: fine, the rest is checked below
        }
        if st.state != State::Resyncing {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        if kills % 2 == 0 {
            site.lab.kill_process();
            site.lab.start_process().unwrap();
        } else {
            site.lab.kill_master();
            site.lab.start_master().unwrap();
        }
        kills += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = site.lab.status(&site.disk).unwrap();
        if committed(&st) {
            break;
        }
        assert!(Instant::now() < deadline, "no resync committed: {st:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = site.caught_up();
    site.assert_point_equals_guest(last);
    // Every point since is the disk before the changes or after them, never something between
    // (the point the changes were made on is `before`; the initial copy's points are older).
    let points = points_after(&site, before - 1);
    for &seq in &points {
        let img = site.point_image(seq);
        assert!(
            img == old || img == new,
            "point {seq} is neither the old nor the new disk"
        );
    }
    assert!(points.iter().any(|&seq| site.point_image(seq) == new));
    let v = site.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    eprintln!("{kills} kills during the resync; {} points", points.len());
}

/// A continuous disk's first full copy (QEMU's mirror, before it is ready) shows bytes done of
/// the total, rate and ETA in `ferry status`, like a seed; the progress goes away once the
/// mirror is ready, and the first point equals the disk.
#[test]
fn the_first_full_copy_of_a_continuous_disk_shows_its_progress() {
    let size = 64 * MIB;
    let mut site = Site::start_copying(
        "copying",
        size,
        &["write -P 0x6b 0 64M"],
        |lab| lab.host_access = true,
        8 * MIB,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let p = loop {
        if let Ok(st) = site.lab.status(&site.disk) {
            if let Some(p) = st.progress.filter(|p| p.operation == "first copy") {
                if p.done_bytes > 0 && p.eta_secs.is_some() {
                    break p;
                }
            }
        }
        assert!(Instant::now() < deadline, "no first-copy progress");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(p.total_bytes, size, "{p:?}");
    assert!(p.done_bytes < size, "{p:?}");
    assert!(p.bytes_per_sec > 0.0, "{p:?}");
    let out = std::process::Command::new(exe())
        .arg("status")
        .arg("--cache")
        .arg(&site.lab.cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("first copy [") && text.contains("/ 64.0 MiB") && text.contains("ETA "),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Let the copy finish: the progress goes, and the first point is the disk.
    let qmp = &mut site.qsd.as_mut().unwrap().qmp;
    qmp.execute(
        "block-job-set-speed",
        serde_json::json!({"device": ferry_qemu::MIRROR_JOB, "speed": 0}),
    )
    .unwrap();
    qmp.wait_event("BLOCK_JOB_READY", Duration::from_secs(60))
        .unwrap();
    let seq = site.caught_up();
    let deadline = Instant::now() + Duration::from_secs(10);
    while site.lab.status(&site.disk).unwrap().progress.is_some() {
        assert!(
            Instant::now() < deadline,
            "the progress stayed after the copy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    site.assert_point_equals_guest(seq);
}
