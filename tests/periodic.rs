//! Periodic replication from QEMU dirty bitmaps: a sparse seed, then one consistent recovery
//! point per interval while the guest keeps writing, and after QEMU is killed with SIGKILL (its
//! bitmap is then inconsistent) a checksum resync that sends only what differs.

mod support;

use ferry::lab::{sh, Lab};
use ferry_qemu::StorageDaemon;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

const MIB: u64 = 1 << 20;
const DISK: &str = "pdisk";

struct Host {
    qsd: Option<StorageDaemon>,
    image: std::path::PathBuf,
    sock: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Host {
    fn start(dir: &Path, image: &Path) -> Host {
        let mut qsd = StorageDaemon::start(image, "qcow2", dir).unwrap();
        let sock = dir.join("host-nbd.sock");
        qsd.export("disk0", "guest", &sock).unwrap();
        Host {
            qsd: Some(qsd),
            image: image.to_path_buf(),
            sock,
            dir: dir.to_path_buf(),
        }
    }

    fn guest_uri(&self) -> String {
        format!("nbd+unix:///guest?socket={}", self.sock.display())
    }

    /// SIGKILL the host's QEMU and start it again on the same image.
    fn crash_and_restart(&mut self) {
        drop(self.qsd.take());
        *self = Host::start(&self.dir.clone(), &self.image.clone());
    }

    /// Resize the disk as a hypervisor does for a VM. QEMU's NBD export does not share the
    /// resize permission (a VM's device does), so the guest's export is re-added around it.
    fn resize(&mut self, size: u64) {
        let qmp = &mut self.qsd.as_mut().unwrap().qmp;
        qmp.execute("block-export-del", serde_json::json!({"id": "guest"}))
            .unwrap();
        let _ = qmp.wait_event("BLOCK_EXPORT_DELETED", Duration::from_secs(10));
        // A cut under way holds its own view of the disk: retry between cuts.
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = qmp.execute(
            "block_resize",
            serde_json::json!({"node-name": "disk0", "size": size}),
        ) {
            assert!(Instant::now() < deadline, "block_resize kept failing: {e}");
            std::thread::sleep(Duration::from_millis(20));
        }
        qmp.execute(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "guest", "node-name": "disk0", "name": "guest", "writable": true}),
        )
        .unwrap();
    }

    fn image_now(&self, scratch: &Path) -> Vec<u8> {
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.guest_uri())
            .arg(scratch))
        .unwrap();
        std::fs::read(scratch).unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(q) = self.qsd.take() {
            q.stop();
        }
    }
}

fn lab(dir: &Path, size: u64) -> Lab {
    let mut lab = Lab::new(&exe(), dir, &[]).unwrap();
    lab.periodic = vec![format!(
        "{DISK}={size},qmp={},node=disk0,nbd={},fleece={},interval-ms=300",
        dir.join(ferry_qemu::MGMT_QMP_SOCKET).display(),
        dir.join("host-nbd.sock").display(),
        dir.join("fleece.qcow2").display()
    )];
    lab
}

/// A host disk of `size` bytes (qcow2, with `prefill` qemu-io commands applied) on a fresh
/// qemu-storage-daemon, in a directory that also holds the lab.
fn host_disk(size: u64, prefill: &[&str]) -> (tempfile::TempDir, Host) {
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("host.qcow2");
    qcow2_image(&image, size, prefill);
    let host = Host::start(dir.path(), &image);
    (dir, host)
}

/// Write `regions` regions of 4 MiB of random bytes, `stride` apart, through the guest's disk,
/// so every 64 KiB block has content (and a chunk) of its own.
fn fill_random(host: &Host, seed: u64, regions: u64, stride: u64) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = ferry_nbd::client::Client::connect_unix(&host.sock, "guest")
            .await
            .unwrap();
        let mut rng = Rng(seed);
        for r in 0..regions {
            let mut buf = vec![0u8; (4 * MIB) as usize];
            for w in buf.chunks_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
            g.write(r * stride, &buf, false).await.unwrap();
        }
        g.flush().await.unwrap();
    });
}

/// The lab protecting `DISK` periodically on this host, both roles running.
fn started_lab(dir: &Path, size: u64) -> Lab {
    let mut lab = lab(dir, size);
    lab.start_master().unwrap();
    lab.start_process().unwrap();
    lab
}

fn wait_point(lab: &Lab, after: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = lab.status(DISK) {
            if s.acked_seq > after {
                return s.acked_seq;
            }
            assert!(
                Instant::now() < deadline,
                "no recovery point after {after}: {s:?}"
            );
        }
        assert!(Instant::now() < deadline, "no status for {DISK}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn point(lab: &Lab, seq: u64) -> Vec<u8> {
    let repo = lab.repository().unwrap();
    let r = repo.reader(DISK, seq).unwrap();
    let mut buf = vec![0u8; r.size() as usize];
    r.read_at(0, &mut buf).unwrap();
    buf
}

#[test]
fn seed_then_one_consistent_point_per_interval_while_writing() {
    let size = 32 * MIB;
    let (dir, host) = host_disk(size, &["write -P 0x5a 4M 6M"]);
    let lab = started_lab(dir.path(), size);

    // The seed reads only allocated data: 6 MiB = 96 blocks of the 512.
    let s0 = wait_point(&lab, 0, Duration::from_secs(60));
    let st = lab.status(DISK).unwrap();
    assert_eq!(st.periodic_mode.as_deref(), Some("seed"), "{st:?}");
    assert_eq!(
        st.last_cut_blocks, 96,
        "the seed read unallocated blocks: {st:?}"
    );
    let scratch = dir.path().join("now.raw");
    let base = host.image_now(&scratch);
    assert!(point(&lab, s0) == base, "the seed differs from the disk");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let writer = TaggedWriter::start(&rt, &host.sock, size, 0x9e37_79b9, 25);
    let started = Instant::now();
    let mut seen = s0;
    let mut checked = Vec::new();
    while started.elapsed() < Duration::from_secs(8) {
        let p = wait_point(&lab, seen, Duration::from_secs(30));
        seen = p;
        let n = check_prefix(&point(&lab, p), &base, &writer.snapshot())
            .unwrap_or_else(|e| panic!("point {p}: {e}"));
        checked.push((p, n));
    }
    let (all, _) = writer.finish(&rt);
    // Converge: a point holding every write, equal to the disk.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = wait_point(&lab, seen, Duration::from_secs(30));
        seen = p;
        let n = check_prefix(&point(&lab, p), &base, &all).unwrap();
        if n as usize == all.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never converged: {n} of {}",
            all.len()
        );
    }
    assert!(point(&lab, seen) == host.image_now(&scratch));
    let st = lab.status(DISK).unwrap();
    assert_eq!(st.periodic_mode.as_deref(), Some("incremental"), "{st:?}");
    eprintln!(
        "checked {} points under load: {checked:?}; {} writes",
        checked.len(),
        all.len()
    );
    assert!(checked.len() >= 4, "{checked:?}");
    assert!(checked.windows(2).all(|w| w[0].1 <= w[1].1));
}

/// Export point `seq` to qcow2 with `ferry export` and compare it with the host's disk.
fn assert_point_equals_host(lab: &Lab, dir: &Path, seq: u64, host: &Host) {
    assert_point_equals(lab, dir, DISK, seq, &host.guest_uri());
}

/// A disk larger than the window of block status a cut holds at once (1 GiB): the seed and an
/// incremental walk it window by window, and data straddling a window's edge is neither lost nor
/// read twice.
#[test]
fn a_seed_and_an_incremental_walk_a_large_disk_window_by_window() {
    let size = 2560 * MIB;
    let (dir, host) = host_disk(
        size,
        &[
            "write -P 0x11 1000M 4M",
            "write -P 0x22 1022M 4M",
            "write -P 0x33 2300M 1M",
        ],
    );
    let lab = started_lab(dir.path(), size);
    let s0 = wait_point(&lab, 0, Duration::from_secs(120));
    let st = lab.status(DISK).unwrap();
    assert_eq!(st.periodic_mode.as_deref(), Some("seed"), "{st:?}");
    // 64 + 64 (across the 1 GiB edge) + 16 blocks of 64 KiB.
    assert_eq!(st.last_cut_blocks, 144, "{st:?}");
    assert_point_equals_host(&lab, dir.path(), s0, &host);

    // Writes across the edge and in the second window: one incremental sends exactly them.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = ferry_nbd::client::Client::connect_unix(&host.sock, "guest")
            .await
            .unwrap();
        g.write(1023 * MIB, &vec![0x44; (2 * MIB) as usize], false)
            .await
            .unwrap();
        g.write(2500 * MIB, &vec![0x55; MIB as usize], false)
            .await
            .unwrap();
        g.flush().await.unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = s0;
    let s1 = loop {
        let p = wait_point(&lab, seen, Duration::from_secs(60));
        seen = p;
        let st = lab.status(DISK).unwrap();
        if st.last_cut_blocks > 0 {
            assert_eq!(st.periodic_mode.as_deref(), Some("incremental"), "{st:?}");
            assert_eq!(st.last_cut_blocks, 32 + 16, "{st:?}");
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the writes never reached a point"
        );
    };
    assert_point_equals_host(&lab, dir.path(), s1, &host);
}

#[test]
fn qemu_killed_mid_interval_resyncs_by_checksum_and_converges() {
    let size = 64 * MIB;
    let (dir, mut host) = host_disk(size, &["write -P 0x31 0 64M"]);
    let lab = started_lab(dir.path(), size);
    let s0 = wait_point(&lab, 0, Duration::from_secs(60));

    // Change 1% of the blocks, then kill QEMU before it can save its bitmap.
    let mut cmds = vec![];
    let mut rng = Rng(77);
    for _ in 0..10 {
        cmds.push(format!("write -P 0x99 {} 64k", rng.below(1024) * 65536));
    }
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).arg(host.guest_uri());
    for x in &cmds {
        c.arg("-c").arg(x);
    }
    sh(&mut c).unwrap();
    host.crash_and_restart();

    let scratch = dir.path().join("now.raw");
    let want = host.image_now(&scratch);
    let st = resynced_ten_blocks(&lab, s0, &want);
    eprintln!(
        "resync: {} blocks, {} bytes of data, {} bytes of block names, disk {} bytes",
        st.last_cut_blocks, st.last_cut_bytes, st.last_cut_hash_bytes, size
    );
    let v = lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn a_bitmap_left_in_use_by_a_killed_qemu_is_distrusted_and_resynced() {
    let size = 64 * MIB;
    let (dir, mut host) = host_disk(size, &["write -P 0x41 0 64M"]);
    let mut lab = started_lab(dir.path(), size);
    let seen = wait_point(&lab, 0, Duration::from_secs(60));

    // While the process server is down (no cut rotates the bitmap), the host restarts cleanly:
    // QEMU saves the persistent bitmap in the image, and the next QEMU loads it and marks it in
    // use there. Then that QEMU dies after the guest wrote: the image says "inconsistent".
    lab.kill_process();
    host.qsd.take().unwrap().stop();
    host = Host::start(&host.dir.clone(), &host.image.clone());
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).arg(host.guest_uri());
    let mut rng = Rng(4242);
    for _ in 0..10 {
        c.args([
            "-c",
            &format!("write -P 0x43 {} 64k", rng.below(1024) * 65536),
        ]);
    }
    sh(&mut c).unwrap();
    host.crash_and_restart();
    let bitmaps =
        ferry_qemu::fleece::bitmaps(&mut host.qsd.as_mut().unwrap().qmp, "disk0").unwrap();
    assert!(
        bitmaps.iter().any(|b| b.inconsistent),
        "QEMU does not report the bitmap inconsistent: {bitmaps:?}"
    );
    lab.start_process().unwrap();

    let want = host.image_now(&dir.path().join("now.raw"));
    resynced_ten_blocks(&lab, seen, &want);
}

/// Wait for a checksum resync after point `seen` and check it: the point equals `want`, at most
/// the 10 changed blocks (1% of a 64 MiB disk) crossed, plus 32 bytes of name a block.
fn resynced_ten_blocks(lab: &Lab, mut seen: u64, want: &[u8]) -> ferry_process_server::DiskStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    let st = loop {
        seen = wait_point(lab, seen, Duration::from_secs(60));
        let st = lab.status(DISK).unwrap();
        if st.periodic_mode.as_deref() == Some("resync") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "no resync after QEMU died: {st:?}"
        );
    };
    assert!(
        point(lab, st.acked_seq) == want,
        "the resynced point differs from the disk"
    );
    assert!(
        st.last_cut_blocks <= 10,
        "resync sent {} blocks",
        st.last_cut_blocks
    );
    assert_eq!(st.last_cut_hash_bytes, 32 * 1024);
    st
}

/// Mixed content for one 64 KiB block: text, random, structured binary or zeros.
fn mixed_block(rng: &mut Rng, kind: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "replication ",
        "checkpoint ",
        "journal ",
        "the ",
        "of ",
        "recovery ",
        "disk ",
        "point ",
        "and ",
        "master ",
        "target ",
        "process ",
    ];
    let mut v = Vec::with_capacity(65536);
    match kind % 4 {
        0 => {
            while v.len() < 65536 {
                v.extend_from_slice(WORDS[rng.below(12) as usize].as_bytes());
            }
        }
        1 => {
            while v.len() < 65536 {
                v.extend_from_slice(&rng.next().to_le_bytes());
            }
        }
        2 => {
            let mut i = 0u32;
            while v.len() < 65536 {
                v.extend_from_slice(&i.to_le_bytes());
                v.extend_from_slice(&(rng.below(16) as u32).to_le_bytes());
                i += 1;
            }
        }
        _ => v.resize(65536, 0),
    }
    v.truncate(65536);
    v
}

#[test]
fn a_thin_disk_seeds_only_its_data_with_progress() {
    let gib: u64 = std::env::var("FERRY_SEED_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let data_mib: u64 = std::env::var("FERRY_SEED_DATA_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = gib << 30;
    let (dir, host) = host_disk(size, &[]);

    // Scatter the data in 4 MiB regions across the disk; remember what it compresses to.
    let key = ferry_chunk::TenantKey::from_secret(&[9; 32]);
    let mut sealed_total = 0u64;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = ferry_nbd::client::Client::connect_unix(&host.sock, "guest")
            .await
            .unwrap();
        let mut rng = Rng(0x5eed);
        let regions = data_mib / 4;
        for r in 0..regions {
            let base = r * (size / regions) / 65536 * 65536;
            let mut region = Vec::with_capacity(4 << 20);
            for b in 0..64u64 {
                let block = mixed_block(&mut rng, r * 64 + b);
                if !ferry_chunk::is_zero(&block) {
                    sealed_total += key.seal(&block, b"").len() as u64;
                }
                region.extend_from_slice(&block);
            }
            g.write(base, &region, false).await.unwrap();
        }
        g.flush().await.unwrap();
    });

    let lab = started_lab(dir.path(), size);
    // While the seed runs, the status carries its progress.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut saw_progress = None;
    loop {
        if let Ok(s) = lab.status(DISK) {
            if let Some(p) = &s.progress {
                if p.done_bytes > 0 && p.done_bytes < p.total_bytes {
                    saw_progress.get_or_insert(p.clone());
                }
            }
            if s.acked_seq >= 1 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the seed did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = lab.status(DISK).unwrap();
    assert_eq!(st.periodic_mode.as_deref(), Some("seed"));
    let data = data_mib << 20;
    let ratio = st.last_cut_bytes as f64 / sealed_total as f64;
    eprintln!(
        "seed of a {gib} GiB thin disk holding {data_mib} MiB: {} bytes on the wire, data compresses to {sealed_total} ({ratio:.3}x); progress seen: {saw_progress:?}",
        st.last_cut_bytes
    );
    assert!(
        ratio <= 1.1,
        "the seed sent {ratio:.3} times the compressed data"
    );
    assert!(
        st.last_cut_blocks <= data / 65536,
        "the seed read unallocated blocks"
    );
    let p = saw_progress.expect("no progress was reported during the seed");
    assert_eq!(p.operation, "seed");
    assert_eq!(
        p.total_bytes, data,
        "progress total is the allocated data, not the disk"
    );
    // The point equals the disk (exported, compared by qemu-img).
    assert_point_equals_host(&lab, dir.path(), 1, &host);
}

#[test]
fn a_block_repeated_across_the_disk_crosses_the_wire_once_in_a_seed() {
    // One incompressible 64 KiB block written at 200 places spread over the disk (each its own
    // read run, so they are named and sent in different units of the seed).
    let size = 256 * MIB;
    let (dir, host) = host_disk(size, &[]);
    let mut rng = Rng(0xd0d0);
    let block: Vec<u8> = (0..65536 / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect();
    let places = 200u64;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut g = ferry_nbd::client::Client::connect_unix(&host.sock, "guest")
            .await
            .unwrap();
        for i in 0..places {
            g.write(i * (size / places) / 65536 * 65536, &block, false)
                .await
                .unwrap();
        }
        g.flush().await.unwrap();
    });
    let lab = started_lab(dir.path(), size);
    wait_point(&lab, 0, Duration::from_secs(120));
    let st = lab.status(DISK).unwrap();
    assert_eq!(st.periodic_mode.as_deref(), Some("seed"));
    assert_eq!(st.last_cut_blocks, places, "the seed read other blocks");
    eprintln!(
        "{places} copies of one 64 KiB block: {} bytes on the wire",
        st.last_cut_bytes
    );
    // Once with its data, then by reference (a frame of a few dozen bytes each).
    assert!(
        st.last_cut_bytes < 2 * 65536 + places * 256,
        "the seed sent {} bytes for one block repeated {places} times",
        st.last_cut_bytes
    );
    assert_point_equals_host(&lab, dir.path(), 1, &host);
}

#[test]
fn a_grown_disk_is_replicated_and_a_shrunk_one_refused() {
    let size = 16 * MIB;
    let (dir, mut host) = host_disk(size, &["write -P 0x44 0 16M"]);
    let lab = started_lab(dir.path(), size);
    let s0 = wait_point(&lab, 0, Duration::from_secs(60));

    host.resize(24 * MIB);
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"])
        .arg(host.guest_uri())
        .args(["-c", "write -P 0x45 20M 1M"]);
    sh(&mut c).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = s0;
    let grown = loop {
        seen = wait_point(&lab, seen, Duration::from_secs(60));
        let p = point(&lab, seen);
        if p.len() as u64 == 24 * MIB {
            break p;
        }
        assert!(Instant::now() < deadline, "no point of the grown size");
    };
    let scratch = dir.path().join("now.raw");
    assert!(
        grown == host.image_now(&scratch),
        "the grown point differs from the disk"
    );

    host.resize(8 * MIB);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = lab.status(DISK).unwrap();
        if st
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("shrinking a protected disk is refused"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "shrink not refused: {st:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The recovery points are untouched: the newest still has the grown size.
    let repo = lab.repository().unwrap();
    assert_eq!(repo.latest(DISK).unwrap().meta.disk_size, 24 * MIB);
}

#[test]
fn a_damaged_replica_is_repaired_by_an_operator_resync() {
    let size = 64 * MIB;
    let (dir, host) = host_disk(size, &[]);
    // Distinct content in every block, so each block has a chunk of its own.
    fill_random(&host, 0xda7a, size / (4 * MIB), 4 * MIB);
    let lab = started_lab(dir.path(), size);
    let s0 = wait_point(&lab, 0, Duration::from_secs(60));

    // Damage 1% of the recovery site's chunks (10 of 1024).
    let chunks = stored_chunks(&lab);
    assert_eq!(chunks.len(), 1024);
    for (id, blob) in chunks.iter().step_by(100).take(10) {
        damage_chunk(&lab, id, blob.len() as u64 / 3, 0x80);
    }
    assert!(!lab.ferry(&["verify"]).unwrap().status.success());
    let before = lab.status(DISK).unwrap();

    let out = ferry_resync(&lab.cache, DISK);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = s0;
    let st = loop {
        seen = wait_point(&lab, seen, Duration::from_secs(60));
        let st = lab.status(DISK).unwrap();
        if st.periodic_mode.as_deref() == Some("resync") {
            break st;
        }
        assert!(Instant::now() < deadline, "no resync: {st:?}");
    };
    eprintln!(
        "repair resync: {} blocks, {} bytes of data, {} bytes of block names, disk {size} bytes",
        st.last_cut_blocks, st.last_cut_bytes, st.last_cut_hash_bytes
    );
    assert!(
        st.last_cut_blocks >= 10,
        "damaged blocks were not resent: {st:?}"
    );
    assert!(
        st.last_cut_bytes <= size / 50,
        "resync sent more than 2% of the disk: {st:?}"
    );
    // In one pass: the damaged chunks' data went with the resync, not after a refusal.
    assert_eq!(st.reconnects, before.reconnects, "{st:?}");
    let scratch = dir.path().join("now.raw");
    assert!(point(&lab, st.acked_seq) == host.image_now(&scratch));
    // The fresh chunks repaired the older points that share them too.
    let v = lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    assert!(!lab.cache.join(DISK).join("resync-requested").exists());
}

#[test]
fn killing_either_side_during_a_seed_never_exposes_a_partial_point() {
    let size = 512 * MIB;
    let (dir, host) = host_disk(size, &[]);
    fill_random(&host, 0x005e_ed0f, 64, 8 * MIB);
    let scratch = dir.path().join("now.raw");
    let want = host.image_now(&scratch);
    let mut lab = started_lab(dir.path(), size);

    // Kill one side or the other while the 256 MiB seed runs; any point visible meanwhile must
    // be the whole disk.
    let mut rng = Rng(0xdead);
    let mut kills = 0;
    for k in 0..6 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(700)));
        if lab.status(DISK).map(|s| s.acked_seq > 0).unwrap_or(false) {
            break;
        }
        if k % 2 == 0 {
            lab.kill_process();
            lab.start_process().unwrap();
        } else {
            lab.kill_master();
            lab.start_master().unwrap();
        }
        kills += 1;
        if let Ok(repo) = lab.repository() {
            for p in repo.points(DISK).unwrap_or_default() {
                assert!(
                    point(&lab, p.meta.seq) == want,
                    "a partial seed became point {}",
                    p.meta.seq
                );
            }
        }
    }
    let s = wait_point(&lab, 0, Duration::from_secs(180));
    assert!(
        point(&lab, s) == want,
        "the seed differs from the disk after {kills} kills"
    );
    eprintln!("seed completed after {kills} kills");
    let v = lab.ferry(&["verify"]).unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

#[test]
fn an_interrupted_seed_resumes_without_resending_what_arrived() {
    let size = 512 * MIB;
    let data = 256 * MIB;
    let (dir, host) = host_disk(size, &[]);
    fill_random(&host, 0x0bad_5eed, data / (4 * MIB), 8 * MIB);
    let mut lab = started_lab(dir.path(), size);
    // Interrupt the seed past half way.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done_at_kill = loop {
        let st = lab.status(DISK).ok();
        if let Some(p) = st.as_ref().and_then(|s| s.progress.clone()) {
            if p.done_bytes * 2 >= p.total_bytes {
                lab.kill_process();
                break p.done_bytes;
            }
        }
        assert!(
            st.as_ref().map_or(0, |s| s.acked_seq) == 0,
            "the seed finished before it could be interrupted"
        );
        assert!(Instant::now() < deadline, "the seed never got half way");
        std::thread::sleep(Duration::from_millis(10));
    };
    lab.start_process().unwrap();
    let s = wait_point(&lab, 0, Duration::from_secs(120));
    let st = lab.status(DISK).unwrap();
    eprintln!(
        "interrupted at {done_at_kill} of {data} bytes; the resumed seed sent {} bytes",
        st.last_cut_bytes
    );
    assert!(
        st.last_cut_bytes < data - done_at_kill / 2,
        "the resumed seed sent {} bytes, as if nothing had arrived",
        st.last_cut_bytes
    );
    let scratch = dir.path().join("now.raw");
    assert!(point(&lab, s) == host.image_now(&scratch));
}

#[test]
fn changes_made_while_the_process_server_was_down_cost_only_what_changed() {
    let size = 64 * MIB;
    let (dir, host) = host_disk(size, &["write -P 0x61 0 64M"]);
    let mut lab = started_lab(dir.path(), size);
    let s0 = wait_point(&lab, 0, Duration::from_secs(60));
    lab.kill_process();

    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]).arg(host.guest_uri());
    let mut rng = Rng(0x0001_0000);
    for _ in 0..10 {
        c.arg("-c")
            .arg(format!("write -P 0x62 {} 64k", rng.below(1024) * 65536));
    }
    sh(&mut c).unwrap();
    lab.start_process().unwrap();
    let s = wait_point(&lab, s0, Duration::from_secs(60));
    let st = lab.status(DISK).unwrap();
    assert_eq!(st.periodic_mode.as_deref(), Some("incremental"), "{st:?}");
    assert!(
        st.last_cut_blocks <= 10,
        "sent {} blocks for 10 changed",
        st.last_cut_blocks
    );
    assert!(st.last_cut_bytes <= size / 50);
    let scratch = dir.path().join("now.raw");
    assert!(point(&lab, s) == host.image_now(&scratch));
}

/// The periodic disks of one machine on one host are cut in ONE transaction: while one guest
/// writes tagged extents to both disks in turn (each issued after the previous was
/// acknowledged), every cut both disks have a point at is one prefix of the guest's writes
/// across both disks (`check_machine_prefix`), and the cut after the guest stopped holds them
/// all. Points of disks cut one after the other fail this.
#[test]
fn a_machines_periodic_disks_are_cut_together() {
    let size = 16 * MIB;
    let dir = tempfile::Builder::new()
        .prefix("ferry-e2e-")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let images: Vec<std::path::PathBuf> = (0..2)
        .map(|i| {
            let image = d.join(format!("host{i}.qcow2"));
            qcow2_image(&image, size, &[&format!("write -P {} 0 2M", 0x30 + i)]);
            image
        })
        .collect();
    let mut qsd =
        StorageDaemon::start_disks(&[(&images[0], "qcow2"), (&images[1], "qcow2")], d).unwrap();
    let sock = d.join("host-nbd.sock");
    for i in 0..2 {
        qsd.export(&format!("disk{i}"), &format!("guest{i}"), &sock)
            .unwrap();
    }
    let uri = |i: usize| format!("nbd+unix:///guest{i}?socket={}", sock.display());
    let read = |i: usize| -> Vec<u8> {
        let out = d.join(format!("now{i}.raw"));
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &uri(i)])
            .arg(&out))
        .unwrap();
        std::fs::read(&out).unwrap()
    };
    let bases = [read(0), read(1)];
    let mut lab = Lab::new(&exe(), d, &[]).unwrap();
    lab.periodic = (0..2)
        .map(|i| {
            format!(
                "m{i}={size},qmp={},node=disk{i},nbd={},fleece={},interval-ms=300,group=vm",
                d.join(ferry_qemu::MGMT_QMP_SOCKET).display(),
                sock.display(),
                d.join(format!("fleece{i}.qcow2")).display()
            )
        })
        .collect();
    lab.start_master().unwrap();
    lab.start_process().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = |disk: &str| lab.status(disk).ok();
    while !["m0", "m1"]
        .iter()
        .all(|m| status(m).is_some_and(|s| s.acked_seq >= 1))
    {
        assert!(Instant::now() < deadline, "no seed: {:?}", status("m0"));
        std::thread::sleep(Duration::from_millis(50));
    }

    let began = ferry_process_server::status::now_unix_ns();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let log = rt.block_on(async {
        let mut guests = Vec::new();
        for i in 0..2 {
            guests.push(
                ferry_nbd::client::Client::connect_unix(&sock, &format!("guest{i}"))
                    .await
                    .unwrap(),
            );
        }
        let mut rng = Rng(31);
        let mut log = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let disk = rng.below(2) as usize;
            let (off, len) = random_extent(&mut rng, size);
            log.push((disk, off, len));
            let data = tagged(log.len() as u64, off, len);
            guests[disk].write(off, &data, false).await.unwrap();
        }
        for g in &mut guests {
            g.flush().await.unwrap();
        }
        log
    });
    let stopped = ferry_process_server::status::now_unix_ns();
    assert!(log.len() > 100, "the guest wrote {} times", log.len());
    // A cut made after the guest stopped, on both disks.
    let last = loop {
        let cuts: Vec<u64> = ["m0", "m1"]
            .iter()
            .map(|m| status(m).map_or(0, |s| s.group_cut_unix_ns))
            .collect();
        if cuts[0] > stopped && cuts[0] == cuts[1] {
            break cuts[0];
        }
        assert!(
            Instant::now() < deadline,
            "no cut after the writes: {cuts:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    let repo = lab.repository().unwrap();
    let cuts = |disk: &str| cuts_after(&repo, disk, began);
    let (c0, c1) = (cuts("m0"), cuts("m1"));
    assert_eq!(
        c0.keys().collect::<Vec<_>>(),
        c1.keys().collect::<Vec<_>>(),
        "the disks' points are not at the same cuts"
    );
    assert!(c0.len() >= 4, "{} cuts in 5 s at 300 ms", c0.len());
    assert!(c0.contains_key(&last));
    let point = |disk: &str, seq: u64| -> Vec<u8> {
        let r = repo.reader(disk, seq).unwrap();
        let mut buf = vec![0u8; r.size() as usize];
        r.read_at(0, &mut buf).unwrap();
        buf
    };
    let mut mid = 0;
    for (cut, s0) in &c0 {
        let (p0, p1) = (point("m0", *s0), point("m1", c1[cut]));
        let n = check_machine_prefix(&[&p0, &p1], &[&bases[0], &bases[1]], &log)
            .unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        if n > 0 && (n as usize) < log.len() {
            mid += 1;
        }
        if *cut == last {
            assert_eq!(n as usize, log.len(), "the last cut lacks writes");
            assert_eq!(p0, read(0));
            assert_eq!(p1, read(1));
        }
    }
    assert!(mid >= 2, "only {mid} cuts fell while the guest wrote");
    drop(lab);
    qsd.stop();
}
