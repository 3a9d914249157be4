//! The NBD client against QEMU's servers: `qemu-nbd` on raw and qcow2 images with holes
//! (structured reads equal the image, `base:allocation` matches `qemu-img map`), and
//! qemu-storage-daemon exporting a persistent dirty bitmap (`qemu:dirty-bitmap:b0` marks exactly
//! the written regions, rounded to the bitmap granularity).
//!
//! Unix sockets in a temporary directory only; every child process is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_nbd::client::{Client, ClientOptions, Extent};
use ferry_nbd::proto::*;
use serde_json::json;

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `qemu-nbd` serving one image on a unix socket; killed on drop.
struct QemuNbd {
    child: Child,
    sock: PathBuf,
}

impl QemuNbd {
    fn start(image: &Path, format: &str, read_only: bool) -> QemuNbd {
        let sock = image.with_extension("sock");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", format, "-x", "e", "-t", "-k"])
            .arg(&sock)
            .stdin(Stdio::null());
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd.arg(image).spawn().expect("qemu-nbd");
        let q = QemuNbd { child, sock };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&q.sock).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `qemu-img map` as base:allocation extents, neighbours with equal flags merged.
fn qemu_img_map(image: &Path, format: &str) -> Vec<Extent> {
    let out = run(
        "qemu-img",
        &[
            "map",
            "-U",
            "--output=json",
            "-f",
            format,
            image.to_str().unwrap(),
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ext = Vec::new();
    for e in v.as_array().unwrap() {
        let mut flags = 0;
        if !e["data"].as_bool().unwrap() {
            flags |= STATE_HOLE;
        }
        if e["zero"].as_bool().unwrap() {
            flags |= STATE_ZERO;
        }
        ext.push(Extent {
            offset: e["start"].as_u64().unwrap(),
            len: e["length"].as_u64().unwrap(),
            flags,
        });
    }
    merge(ext)
}

fn merge(ext: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for e in ext {
        match out.last_mut() {
            Some(l) if l.flags == e.flags && l.end() == e.offset => l.len += e.len,
            _ => out.push(e),
        }
    }
    out
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn opts() -> ClientOptions {
    ClientOptions::new("e").meta_context(BASE_ALLOCATION)
}

#[test]
fn qemu_nbd_qcow2_with_holes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    let p = img.to_str().unwrap();
    run("qemu-img", &["create", "-f", "qcow2", p, "72M"]);
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x22 20M 3M",
            "-c",
            "write -P 0x33 40M 24M",
            "-c",
            "write -P 0x44 71M 4k",
            p,
        ],
    );
    let raw = dir.path().join("disk.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            p,
            raw.to_str().unwrap(),
        ],
    );
    let expect = std::fs::read(&raw).unwrap();
    let map = qemu_img_map(&img, "qcow2");
    assert!(map.len() >= 5, "{map:?}");

    let srv = QemuNbd::start(&img, "qcow2", true);
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let mut c = Client::connect_unix_with(&srv.sock, opts()).await.unwrap();
            assert!(c.structured());
            assert_eq!(c.size(), 72 * MIB);
            let ctx = c.meta_context_id(BASE_ALLOCATION).expect("base:allocation");
            // One call, several bounded requests (qemu-nbd advertises a 32 MiB maximum).
            let data = c.read(0, c.size() as u32).await.unwrap();
            assert!(data == expect, "structured read differs from the image");
            // Unaligned small reads across a data/hole boundary.
            let r = c.read(MIB - 100, 300).await.unwrap();
            assert_eq!(r[..], expect[(MIB - 100) as usize..(MIB + 200) as usize]);
            let ext = c.block_status_all(ctx).await.unwrap();
            assert_eq!(ext, map);
            // Window by window (as a seed walks a large disk), odd-sized windows: each window
            // starts and ends where asked, and stitched together they are the same map.
            let step = 5 * MIB + 3;
            let mut stitched: Vec<ferry_nbd::client::Extent> = Vec::new();
            let mut pos = 0;
            while pos < c.size() {
                let w = c.block_status_range(ctx, pos, step).await.unwrap();
                assert_eq!(w.first().map(|e| e.offset), Some(pos));
                assert_eq!(w.last().unwrap().end(), (pos + step).min(c.size()));
                for e in w {
                    match stitched.last_mut() {
                        Some(l) if l.flags == e.flags && l.end() == e.offset => l.len += e.len,
                        _ => stitched.push(e),
                    }
                }
                pos += step;
            }
            assert_eq!(stitched, map);
            c.disconnect().await.unwrap();
        })
        .await
        .unwrap()
    });
}

#[test]
fn qemu_nbd_raw_writable() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(64 * MIB).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&vec![0xaa; MIB as usize], 4 * MIB).unwrap();
    }
    let srv = QemuNbd::start(&img, "raw", false);
    let mut expect = std::fs::read(&img).unwrap();
    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let mut c = Client::connect_unix_with(&srv.sock, opts()).await.unwrap();
            let ctx = c.meta_context_id(BASE_ALLOCATION).unwrap();
            let w: Vec<u8> = (0..3 * MIB as usize + 17)
                .map(|i| (i % 253) as u8)
                .collect();
            c.write(30 * MIB + 5, &w, false).await.unwrap();
            expect[(30 * MIB + 5) as usize..][..w.len()].copy_from_slice(&w);
            let done = c
                .write_pipelined(50 * MIB, &[0x5a; 65536 * 16][..], true, 4)
                .await
                .unwrap();
            assert!(done.len() <= 16);
            expect[50 * MIB as usize..][..65536 * 16].fill(0x5a);
            c.drain().await.unwrap();
            c.flush().await.unwrap();
            c.write_zeroes(4 * MIB, 4096).await.unwrap();
            expect[4 * MIB as usize..][..4096].fill(0);
            let all = c.read(0, 64 * MIB as u32).await.unwrap();
            assert!(all == expect);
            let ext = c.block_status_all(ctx).await.unwrap();
            assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 64 * MIB);
            assert!(ext
                .iter()
                .all(|e| e.len > 0 && e.flags & !(STATE_HOLE | STATE_ZERO) == 0));
            // Allocated regions read back as data, holes as zeroes.
            for e in &ext {
                if e.flags & STATE_ZERO != 0 {
                    assert!(expect[e.offset as usize..e.end() as usize]
                        .iter()
                        .all(|&b| b == 0));
                }
            }
            assert_eq!(ext, qemu_img_map(&img, "raw"));
            c.disconnect().await.unwrap();
        })
        .await
        .unwrap()
    });
    drop(srv);
    assert!(std::fs::read(&img).unwrap() == expect);
}

#[test]
fn dirty_bitmap_from_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", img.to_str().unwrap(), "64M"],
    );
    let mut qsd = ferry_qemu::StorageDaemon::start(&img, "qcow2", dir.path()).unwrap();
    qsd.qmp
        .execute(
            "block-dirty-bitmap-add",
            json!({"node": "disk0", "name": "b0", "persistent": true}),
        )
        .unwrap();
    let sock = dir.path().join("nbd.sock");
    qsd.qmp
        .execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        )
        .unwrap();
    qsd.qmp
        .execute(
            "block-export-add",
            json!({"type": "nbd", "id": "e", "node-name": "disk0", "name": "e",
                   "writable": true, "bitmaps": ["b0"]}),
        )
        .unwrap();
    const BITMAP: &str = "qemu:dirty-bitmap:b0";
    const G: u64 = 64 * 1024;
    // (offset, len) written, and the dirty ranges they must produce at 64 KiB granularity.
    let writes = [
        (100 * 1024, 10),
        (5 * MIB, 200 * 1024),
        (63 * MIB - 1, 2),
        (20 * MIB, 4 * MIB),
    ];
    let dirty = [
        (G, G),
        (5 * MIB, 4 * G),
        (20 * MIB, 4 * MIB),
        (63 * MIB - G, 2 * G),
    ];

    rt().block_on(async {
        tokio::time::timeout(LIMIT, async {
            let opts = ClientOptions::new("e")
                .meta_context(BASE_ALLOCATION)
                .meta_context(BITMAP);
            let mut c = Client::connect_unix_with(&sock, opts).await.unwrap();
            let bm = c.meta_context_id(BITMAP).expect("dirty bitmap context");
            let alloc = c.meta_context_id(BASE_ALLOCATION).expect("base:allocation");
            assert_ne!(bm, alloc);
            assert_eq!(
                c.block_status_all(bm).await.unwrap(),
                vec![Extent {
                    offset: 0,
                    len: 64 * MIB,
                    flags: 0
                }]
            );
            for (off, len) in writes {
                c.write(off, &vec![0x77; len as usize], false)
                    .await
                    .unwrap();
            }
            c.flush().await.unwrap();
            let ext = c.block_status_all(bm).await.unwrap();
            let got: Vec<(u64, u64)> = ext
                .iter()
                .filter(|e| e.flags & STATE_DIRTY != 0)
                .map(|e| (e.offset, e.len))
                .collect();
            assert_eq!(got, dirty);
            assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 64 * MIB);
            // One request answers both contexts; each is checked and returned.
            let both = c.block_status_contexts(0, (8 * MIB) as u32).await.unwrap();
            let mut ids: Vec<u32> = both.iter().map(|(id, _)| *id).collect();
            ids.sort();
            let mut want = vec![bm, alloc];
            want.sort();
            assert_eq!(ids, want);
            // The dirty regions read back as written.
            for (off, len) in writes {
                assert!(c
                    .read(off, len as u32)
                    .await
                    .unwrap()
                    .iter()
                    .all(|&b| b == 0x77));
            }
            c.disconnect().await.unwrap();
        })
        .await
        .unwrap()
    });
    qsd.stop();
}
