//! Crashes: SIGKILL the process server, and separately the master target, at random moments
//! while a guest writes. Replication resumes on its own, every recovery point is still a prefix
//! of the write stream, and nothing a FLUSH acknowledged is missing at the end.
//! `FERRY_CRASH_KILLS` (default 20) sets how many kills.

mod support;

use std::time::Duration;
use support::*;

const MIB: u64 = 1 << 20;

#[test]
fn sigkill_either_side_during_writes_loses_nothing_flushed() {
    let kills: usize = std::env::var("FERRY_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let size = 16 * MIB;
    let mut site = Site::start("crash-disk", size, &["write -P 0x3c 0 16M"], |lab| {
        lab.interval_ms = 100;
    });
    let s0 = site.caught_up();
    let base = site.guest_image();

    let rt = tokio::runtime::Runtime::new().unwrap();
    let writer = TaggedWriter::start(&rt, &site.guest_sock, site.size, 0xc0ff_ee11, 20);

    let mut rng = Rng(0x1234_5678 ^ kills as u64);
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(150 + rng.below(500)));
        if k % 2 == 0 {
            site.lab.kill_process();
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            site.lab.start_process().unwrap();
        } else {
            site.lab.kill_master();
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            site.lab.start_master().unwrap();
        }
    }
    let (all, acked) = writer.finish(&rt);
    let last = site.caught_up();
    let n = check_prefix(&site.point_image(last), &base, &all).unwrap();
    assert!(
        n >= acked,
        "final point holds {n} writes but {acked} were flushed"
    );
    assert_eq!(n as usize, all.len());
    site.assert_point_equals_guest(last);

    let points = points_after(&site, s0);
    let sample = spread(&points, 12);
    let mut prev = 0;
    for seq in &sample {
        let n = check_prefix(&site.point_image(*seq), &base, &all)
            .unwrap_or_else(|e| panic!("point {seq} after crashes: {e}"));
        assert!(
            n >= prev,
            "point {seq} holds fewer writes than an older one"
        );
        prev = n;
    }
    let v = site.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let st = site.lab.status("crash-disk").unwrap();
    eprintln!(
        "{kills} kills, {} writes ({acked} flushed), {} points, {} checked, {} reconnects",
        all.len(),
        points.len(),
        sample.len(),
        st.reconnects
    );
}
