//! Link faults: the connection between process server and master target is cut and restored
//! repeatedly while a guest writes; replication resumes by itself and converges, and every
//! recovery point is still a prefix of the write stream.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;
use support::proxy::Proxy;
use support::*;

const MIB: u64 = 1 << 20;

#[test]
fn replication_survives_repeated_link_cuts() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let master_port = ferry::lab::free_port().unwrap();
    let proxy = rt.block_on(Proxy::start(format!("127.0.0.1:{master_port}")));
    let size = 16 * MIB;
    let site = Site::start("wan-disk", size, &["write -P 0x77 0 16M"], |lab| {
        lab.master_port = master_port;
        lab.master_connect = format!("127.0.0.1:{}", proxy.port);
        lab.interval_ms = 100;
    });
    let s0 = site.caught_up();
    let base = site.guest_image();

    let writer = TaggedWriter::start(&rt, &site.guest_sock, site.size, 0xabcd_ef01, u64::MAX);
    let cuts = 15;
    let mut rng = Rng(0x00dd_ba11);
    for _ in 0..cuts {
        std::thread::sleep(Duration::from_millis(200 + rng.below(400)));
        rt.block_on(proxy.cut(Duration::from_millis(rng.below(400))));
    }
    let (all, _) = writer.finish(&rt);
    let last = site.caught_up();
    assert_eq!(
        check_prefix(&site.point_image(last), &base, &all).unwrap() as usize,
        all.len()
    );
    site.assert_point_equals_guest(last);
    for seq in spread(&points_after(&site, s0), 10) {
        check_prefix(&site.point_image(seq), &base, &all)
            .unwrap_or_else(|e| panic!("point {seq}: {e}"));
    }
    let st = site.lab.status("wan-disk").unwrap();
    assert!(st.reconnects >= 5, "the link cuts were not felt: {st:?}");
    eprintln!(
        "{cuts} cuts, {} connections through the proxy, {} reconnects, {} writes",
        proxy.accepted.load(Ordering::SeqCst),
        st.reconnects,
        all.len()
    );
}
