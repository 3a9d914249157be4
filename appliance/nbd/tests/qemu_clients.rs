//! Real QEMU clients (qemu-io, qemu-img) against `MemExport` over TCP and Unix sockets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use ferry_nbd::{Export, MemExport};

const MIB: usize = 1024 * 1024;
const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_flush_discard_zero() {
    tokio::time::timeout(LIMIT, async {
        let (mem, cfg) = mem_config("disk", 16 * MIB);
        let srv = start_server(cfg).await;
        let url = format!("nbd://127.0.0.1:{}/disk", srv.port);

        qemu_io(
            &url,
            &["write -P 0xab 0 64k", "read -P 0xab 0 64k", "flush"],
        )
        .await;
        let c = mem.contents();
        assert!(c[..65536].iter().all(|&b| b == 0xab));
        assert!(c[65536..].iter().all(|&b| b == 0));
        assert!(mem.flush_count() >= 1);

        // Discard, write-zeroes (with and without unmap), FUA writes.
        qemu_io(
            &url,
            &[
                "discard 0 4k",
                "read -P 0 0 4k",
                "read -P 0xab 4k 60k",
                "write -P 0xcd 1M 128k",
                "write -z 1M 64k",
                "write -z -u 1088k 4k",
                "read -P 0 1M 64k",
                "read -P 0 1088k 4k",
                "read -P 0xcd 1092k 60k",
                "write -f -P 0x77 2M 4k",
                "write -z -f 2M 512",
                "read -P 0 2M 512",
                "read -P 0x77 2097664 3584",
            ],
        )
        .await;
        let c = mem.contents();
        assert!(c[MIB..MIB + 68 * 1024].iter().all(|&b| b == 0));
        assert!(c[MIB + 68 * 1024..MIB + 128 * 1024]
            .iter()
            .all(|&b| b == 0xcd));

        // Unaligned writes land exactly where they should.
        qemu_io(
            &url,
            &[
                "write -P 0x11 1000 3333",
                "write -P 0x22 5000001 1",
                "read -P 0x11 1000 3333",
            ],
        )
        .await;
        let c = mem.contents();
        assert_eq!(c[999], 0); // inside the range discarded above
        assert!(c[1000..4333].iter().all(|&b| b == 0x11));
        assert_eq!(c[4333], 0xab);
        assert_eq!(&c[5_000_000..5_000_003], &[0, 0x22, 0]);

        // A large write is split by the client at our advertised maximum and still correct.
        qemu_io(&url, &["write -P 0x5a 4M 12M", "read -P 0x5a 4M 12M"]).await;
        assert!(mem.contents()[4 * MIB..].iter().all(|&b| b == 0x5a));

        // Writing past the end is refused by the client already (size is advertised).
        let out = run("qemu-io", &["-f", "raw", &url, "-c", "write 16M 4k"]).await;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            all.contains("Input/output error")
                || all.contains("out of range")
                || !out.status.success(),
            "{all}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_compare_map() {
    tokio::time::timeout(LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.raw");
        let out = dir.path().join("out.raw");
        let mut data = pattern(8 * MIB, 7);
        data[MIB..3 * MIB].fill(0); // a zero region, reported as a hole
        std::fs::write(&src, &data).unwrap();
        let (src_s, out_s) = (src.to_str().unwrap(), out.to_str().unwrap());

        let (mem, cfg) = mem_config("disk", 8 * MIB);
        let srv = start_server(cfg).await;
        let url = format!("nbd://127.0.0.1:{}/disk", srv.port);

        let info = run_ok("qemu-img", &["info", "--output=json", &url]).await;
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["virtual-size"], 8 * MIB as u64);

        run_ok(
            "qemu-img",
            &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &url],
        )
        .await;
        assert!(
            mem.contents() == data,
            "export differs from source after convert"
        );
        run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src_s, &url],
        )
        .await;

        run_ok(
            "qemu-img",
            &["convert", "-f", "raw", "-O", "raw", &url, out_s],
        )
        .await;
        assert!(
            std::fs::read(&out).unwrap() == data,
            "converted copy differs"
        );

        // Block status: the zero region is reported as zero, the rest as data.
        let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &url]).await;
        let map: serde_json::Value = serde_json::from_str(&map).unwrap();
        let zero_covers = map.as_array().unwrap().iter().any(|e| {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            e["zero"] == true && start <= MIB as u64 && start + len >= 3 * MIB as u64
        });
        assert!(zero_covers, "zero region not reported: {map}");
        let data_at_0 = map
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["start"] == 0 && e["data"] == true);
        assert!(data_at_0, "data not reported: {map}");

        // A change makes compare fail.
        qemu_io(&url, &["write -P 0x01 4M 512"]).await;
        let cmp = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", src_s, &url],
        )
        .await;
        assert_eq!(
            cmp.status.code(),
            Some(1),
            "compare should report a difference"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    tokio::time::timeout(LIMIT, async {
        let mem = Arc::new(MemExport::from_vec(vec![0x42; MIB]).with_read_only(true));
        let cfg = config_with(vec![("ro", mem.clone() as Arc<dyn Export>)]);
        let srv = start_server(cfg).await;
        let url = format!("nbd://127.0.0.1:{}/ro", srv.port);
        // Read-only open works.
        run_ok(
            "qemu-io",
            &["-r", "-f", "raw", &url, "-c", "read -P 0x42 0 1M"],
        )
        .await;
        // A read-write open or a write must not modify anything.
        let out = run("qemu-io", &["-f", "raw", &url, "-c", "write -P 1 0 4k"]).await;
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.status.success() || all.contains("ermission") || all.contains("read-only"),
            "{all}"
        );
        assert!(mem.contents().iter().all(|&b| b == 0x42));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_listener() {
    tokio::time::timeout(LIMIT, async {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let (mem, cfg) = mem_config("disk", 4 * MIB);
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let task = tokio::spawn(ferry_nbd::serve_unix(listener, cfg));
        let url = format!("nbd+unix:///disk?socket={}", sock.display());
        qemu_io(
            &url,
            &["write -P 0x3c 512 1M", "read -P 0x3c 512 1M", "flush"],
        )
        .await;
        assert!(mem.contents()[512..512 + MIB].iter().all(|&b| b == 0x3c));
        task.abort();
    })
    .await
    .expect("test timed out");
}
