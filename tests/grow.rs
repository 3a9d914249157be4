//! Growing a continuously protected disk with `ferry grow`: the process server ends the host's
//! mirror, resizes the disk on its host, grows its journal and export, restarts the mirror and
//! resyncs by checksums what changed meanwhile. Later recovery points have the new size and equal
//! the guest's disk; older ones keep their size and content; a shrink is refused, by `ferry grow`
//! and by a process server restarted with a smaller size.

mod support;

use ferry_process_server::DiskStatus;
use serde_json::json;
use std::time::{Duration, Instant};
use support::*;

const MIB: u64 = 1 << 20;

fn ferry_grow(site: &Site, size: u64) -> std::process::Output {
    std::process::Command::new(exe())
        .args([
            "grow",
            "--disk",
            &site.disk,
            "--size",
            &size.to_string(),
            "--cache",
        ])
        .arg(&site.lab.cache)
        .output()
        .unwrap()
}

fn wait_status(site: &Site, what: &str, ok: impl Fn(&DiskStatus) -> bool) -> DiskStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(st) = site.lab.status(&site.disk) {
            if ok(&st) {
                return st;
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(site.lab.dir.join("process-server.log"))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!("{what}: {st:?}\n{}", tail.join("\n"));
            }
        }
        assert!(Instant::now() < deadline, "{what}: no status");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The recovery point `seq`'s disk size at the recovery site.
fn point_size(site: &Site, seq: u64) -> u64 {
    let repo = site.lab.repository().unwrap();
    let p = repo.points(&site.disk).unwrap();
    p.iter().find(|p| p.meta.seq == seq).unwrap().meta.disk_size
}

#[test]
fn a_continuous_disk_grows_by_ferry_grow_and_never_shrinks() {
    let (size, grown) = (32 * MIB, 48 * MIB);
    // Each MiB its own byte, so a block sent is a block that differed.
    let prefill: Vec<String> = (0..size / MIB)
        .map(|i| format!("write -P {} {i}M 1M", 1 + i))
        .collect();
    let prefill: Vec<&str> = prefill.iter().map(String::as_str).collect();
    let mut site = Site::start("grow-c", size, &prefill, |lab| {
        lab.host_access = true;
        lab.interval_ms = 100;
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    site.qemu_io(&["write -P 0x3c 5M 3M".into(), "write -P 0x3d 20M 64k".into()]);
    let old_seq = site.caught_up();
    let old_image = site.guest_image();
    assert_eq!(site.point_image(old_seq), old_image);

    // A shrink is refused at once, with both sizes, and changes nothing.
    let out = ferry_grow(&site, 16 * MIB);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("shrinking a protected disk is refused")
            && err.contains(&size.to_string())
            && err.contains(&(16 * MIB).to_string()),
        "{err}"
    );
    assert!(!site
        .lab
        .cache
        .join(&site.disk)
        .join(ferry_process_server::grow::REQUEST)
        .exists());
    site.qemu_io(&["write -P 0x5c 3M 64k".into()]);
    let seq = site.caught_up();
    assert_eq!(point_size(&site, seq), size);
    site.assert_point_equals_guest(seq);
    let before = site.lab.status(&site.disk).unwrap();
    assert_eq!((before.disk_size, before.grows), (size, 0), "{before:?}");

    // A growth that fails after the mirror ended: the guest's export still sits on the disk and
    // QEMU refuses the resize. The guest writes all along, also while no mirror runs; the
    // mirror comes back at the old size, the failure is reported, and a resync sends what the
    // guest wrote meanwhile, so the next point is still a prefix of the guest's writes.
    let base = site.guest_image();
    let writer = TaggedWriter::start_paced(
        &rt,
        &site.guest_sock,
        size,
        0x6a0f_0003,
        8,
        Duration::from_millis(2),
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = ferry_grow(&site, grown);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = wait_status(&site, "the failed growth and its resync", |s| {
        s.grow_error.is_some() && s.resyncs == before.resyncs + 1
    });
    let said = failed.grow_error.clone().unwrap();
    assert!(
        said.contains("failed") && said.contains("mirror was restarted at 33554432 bytes"),
        "{said}"
    );
    assert_eq!((failed.disk_size, failed.grows), (size, 0), "{failed:?}");
    std::thread::sleep(Duration::from_millis(300));
    let (log, _) = writer.finish(&rt);
    assert_eq!(site.qsd.as_mut().unwrap().mirror_status().unwrap(), "ready");
    let seq = site.caught_up();
    assert_eq!(point_size(&site, seq), size);
    let n = check_prefix(&site.point_image(seq), &base, &log).unwrap();
    assert_eq!(n as usize, log.len());
    site.assert_point_equals_guest(seq);
    eprintln!(
        "failed growth: {} writes by the guest meanwhile; its resync sent {} blocks, {} bytes",
        log.len(),
        failed.last_cut_blocks,
        failed.last_cut_bytes
    );
    let before = site.lab.status(&site.disk).unwrap();

    // QEMU's NBD export (the guest here) does not share the resize permission a VM's device
    // shares: it steps aside around the growth and comes back on the new mirror's filter.
    let qmp = &mut site.qsd.as_mut().unwrap().qmp;
    qmp.execute("block-export-del", json!({"id": "guest"}))
        .unwrap();
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10))
        .unwrap();
    let out = ferry_grow(&site, grown);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = wait_status(&site, "the growth and its resync", |s| {
        s.grows == 1 && s.resyncs == before.resyncs + 1 && s.disk_size == grown
    });
    assert!(st.last_error.is_none() && st.grow_error.is_none(), "{st:?}");
    let growth_bytes = st.last_cut_bytes;
    let qsd = site.qsd.as_mut().unwrap();
    assert_eq!(qsd.mirror_status().unwrap(), "ready");
    assert_eq!(
        ferry_qemu::fleece::node_size(&mut qsd.qmp, "disk0").unwrap(),
        grown
    );
    qsd.export(ferry_qemu::MIRROR_FILTER, "guest", &site.guest_sock)
        .unwrap();
    site.size = grown;

    // The guest writes across the old end and into the new area, through the new mirror.
    site.qemu_io(&[
        "write -P 0xa1 40M 1M".into(),
        format!("write -P 0xa2 {} 128k", size - 64 * 1024),
        format!("write -P 0xa3 {} 64k", grown - 64 * 1024),
    ]);
    let writer = TaggedWriter::start(&rt, &site.guest_sock, grown, 0x6a0f_0002, 8);
    std::thread::sleep(Duration::from_millis(700));
    writer.finish(&rt);
    let last = site.caught_up();
    assert_eq!(point_size(&site, last), grown);
    site.assert_point_equals_guest(last);
    // The older points keep their size and their content.
    assert_eq!(point_size(&site, old_seq), size);
    assert_eq!(site.point_image(old_seq), old_image);

    // Little crossed for the growth: no block differed (the mirror's gap saw no writes), the new
    // 16 MiB are holes; plus 32 bytes of name per block.
    assert_eq!(st.last_cut_hash_bytes, 32 * (grown / 65536), "{st:?}");
    assert!(
        growth_bytes < 64 * 1024,
        "the growth sent {growth_bytes} bytes"
    );

    // A process server restarted with the old size refuses to start, saying why; with the
    // new size it replicates on.
    site.lab.kill_process();
    site.lab.disks = vec![(site.disk.clone(), size)];
    assert!(site.lab.start_process().is_err());
    let log = std::fs::read_to_string(site.lab.dir.join("process-server.log")).unwrap();
    assert!(
        log.contains("shrinking a protected disk is refused")
            && log.contains(&grown.to_string())
            && log.contains(&size.to_string()),
        "{log}"
    );
    site.lab.kill_process();
    site.lab.disks = vec![(site.disk.clone(), grown)];
    site.lab.start_process().unwrap();
    site.qemu_io(&[format!("write -P 0xa4 {} 4k", grown - 4096)]);
    let after = site.caught_up();
    site.assert_point_equals_guest(after);
    let v = site.lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    eprintln!(
        "growth from {size} to {grown} bytes: {} blocks, {growth_bytes} bytes of blocks, {} bytes of names",
        st.last_cut_blocks, st.last_cut_hash_bytes
    );
}

/// `ferry grow` refuses at once, saying why and what to do, a periodic disk (it follows its host
/// by itself), a continuous disk without its host, a size that is not larger, and an unaligned
/// one; nothing is requested.
#[test]
fn ferry_grow_refuses_what_it_cannot_do_at_once() {
    let cache = tempfile::tempdir().unwrap();
    let grow = |disk: &str, size: &str| {
        std::process::Command::new(exe())
            .args(["grow", "--disk", disk, "--size", size, "--cache"])
            .arg(cache.path())
            .output()
            .unwrap()
    };
    let status = |disk: &str, f: &dyn Fn(&mut DiskStatus)| {
        let dir = cache.path().join(disk);
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = DiskStatus {
            disk: disk.into(),
            disk_size: 32 * MIB,
            ..Default::default()
        };
        f(&mut s);
        ferry_process_server::status::write(&dir.join("status.json"), &s).unwrap();
    };
    status("per", &|s| s.periodic = true);
    status("nohost", &|_| {});
    status("host", &|s| s.host_access = true);
    for (disk, size, says) in [
        ("per", "64M", "resize it on its host"),
        (
            "nohost",
            "64M",
            "--disk nohost=SIZE,qmp=SOCKET,node=NODE,nbd=SOCKET",
        ),
        ("host", "16M", "shrinking a protected disk is refused"),
        ("host", "32M", "already"),
        ("host", "33554433", "multiple of 512"),
        ("absent", "64M", "no protected disk absent"),
    ] {
        let out = grow(disk, size);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{disk} {size}: {err}"
        );
        assert!(!cache
            .path()
            .join(disk)
            .join(ferry_process_server::grow::REQUEST)
            .exists());
    }
    let out = grow("host", "64M");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let req = cache
        .path()
        .join("host")
        .join(ferry_process_server::grow::REQUEST);
    assert_eq!(
        ferry_process_server::grow::read_request(&req),
        Some(64 * MIB)
    );
}

/// A process server killed in the middle of a growth, after it ended the mirror (its setup
/// saved), is restarted with the new size: it finds no mirror, starts it again from the saved
/// setup at the new size, and its resync sends what the guest wrote while no mirror ran.
#[test]
fn an_interrupted_growth_is_finished_after_a_restart() {
    let (size, grown) = (16 * MIB, 24 * MIB);
    let mut site = Site::start("grow-i", size, &["write -P 0x11 0 16M"], |lab| {
        lab.host_access = true;
        lab.interval_ms = 100;
        // QEMU's description of a plain NBD node is its URI (`nbd://HOST:PORT/EXPORT`).
        lab.nbd_tls = false;
    });
    site.qemu_io(&["write -P 0x12 1M 64k".into()]);
    site.caught_up();
    // Where the killed growth got to: the setup saved, the mirror ended (while the process
    // server ran: a mirror whose target is gone waits for it to come back), the request still
    // there.
    let dir = site.lab.cache.join(&site.disk);
    let qmp = &mut site.qsd.as_mut().unwrap().qmp;
    let setup = ferry_qemu::mirror::setup(qmp, ferry_qemu::MIRROR_JOB).unwrap();
    assert_eq!(setup.target_options["server"]["type"], "inet");
    std::fs::write(
        dir.join(ferry_process_server::grow::SETUP),
        serde_json::to_vec(&setup).unwrap(),
    )
    .unwrap();
    ferry_qemu::mirror::cancel(qmp, ferry_qemu::MIRROR_JOB, Duration::from_secs(20)).unwrap();
    site.lab.kill_process();
    ferry_process_server::grow::write_request(&dir, grown).unwrap();
    // The guest writes while no mirror runs (its export now sits on the disk itself), then its
    // export steps aside for the resize.
    site.qemu_io(&[
        "write -P 0x13 2M 128k".into(),
        "write -P 0x14 15M 1M".into(),
    ]);
    let qmp = &mut site.qsd.as_mut().unwrap().qmp;
    qmp.execute("block-export-del", json!({"id": "guest"}))
        .unwrap();
    qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10))
        .unwrap();

    site.lab.disks = vec![(site.disk.clone(), grown)];
    site.lab.start_process().unwrap();
    let st = wait_status(&site, "the finished growth and its resync", |s| {
        s.grows == 1 && s.resyncs == 1 && s.disk_size == grown
    });
    assert!(st.grow_error.is_none(), "{st:?}");
    assert!(!dir.join(ferry_process_server::grow::SETUP).exists());
    let qsd = site.qsd.as_mut().unwrap();
    assert_eq!(qsd.mirror_status().unwrap(), "ready");
    qsd.export(ferry_qemu::MIRROR_FILTER, "guest", &site.guest_sock)
        .unwrap();
    site.qemu_io(&[format!("write -P 0x15 {} 64k", grown - 64 * 1024)]);
    let last = site.caught_up();
    assert_eq!(point_size(&site, last), grown);
    site.assert_point_equals_guest(last);
    eprintln!(
        "interrupted growth finished: its resync sent {} blocks, {} bytes",
        st.last_cut_blocks, st.last_cut_bytes
    );
}
