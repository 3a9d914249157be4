//! Shared pieces of the end-to-end tests: a protected site (qemu-storage-daemon mirroring to a
//! real process server, shipping to a real master target), a writer whose data names its own
//! sequence number, and the checker that proves a recovery point is a prefix of its log.
#![allow(dead_code)]

use ferry::lab::{sh, Lab};
use ferry_nbd::client::Client;
use ferry_qemu::{StorageDaemon, MIRROR_FILTER};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub mod proxy;

pub const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"FERRYSEQ";

pub fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferry"))
}

/// A protected site: the lab's two roles plus the "hypervisor" and a guest entry point.
pub struct Site {
    pub qsd: Option<StorageDaemon>,
    pub lab: Lab,
    pub image: PathBuf,
    pub guest_sock: PathBuf,
    pub disk: String,
    pub size: u64,
    pub dir: tempfile::TempDir,
}

impl Site {
    /// Create a qcow2 of `size` (with `prefill` qemu-io commands applied before protection),
    /// start master target and process server, mirror the disk to the process server and export
    /// the mirror's filter node as the guest's disk.
    pub fn start(disk: &str, size: u64, prefill: &[&str], tune: impl FnOnce(&mut Lab)) -> Site {
        Site::start_mirror(disk, size, prefill, tune, None)
    }

    /// [`Site::start`], but the mirror's first copy is limited to `speed` bytes per second and
    /// not waited for (the guest's disk is exported at once).
    pub fn start_copying(
        disk: &str,
        size: u64,
        prefill: &[&str],
        tune: impl FnOnce(&mut Lab),
        speed: u64,
    ) -> Site {
        Site::start_mirror(disk, size, prefill, tune, Some(speed))
    }

    fn start_mirror(
        disk: &str,
        size: u64,
        prefill: &[&str],
        tune: impl FnOnce(&mut Lab),
        copy_speed: Option<u64>,
    ) -> Site {
        let dir = tempfile::Builder::new()
            .prefix("ferry-e2e-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("protected.qcow2");
        sh(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg(size.to_string()))
        .unwrap();
        if !prefill.is_empty() {
            let mut c = Command::new("qemu-io");
            c.args(["-f", "qcow2"]).arg(&image);
            for p in prefill {
                c.arg("-c").arg(p);
            }
            sh(&mut c).unwrap();
        }
        let mut lab = Lab::new(&exe(), dir.path(), &[(disk, size)]).unwrap();
        lab.interval_ms = 200;
        tune(&mut lab);
        lab.start_master().unwrap();
        lab.start_process().unwrap();
        let mut qsd = StorageDaemon::start(&image, "qcow2", dir.path()).unwrap();
        let tls = lab.nbd_tls.then_some(lab.pki.as_path());
        match copy_speed {
            None => qsd
                .mirror_to_nbd(
                    "127.0.0.1",
                    lab.nbd_port,
                    disk,
                    tls,
                    Duration::from_secs(120),
                )
                .unwrap(),
            Some(speed) => qsd
                .start_mirror_to_nbd("127.0.0.1", lab.nbd_port, disk, tls, speed)
                .unwrap(),
        }
        let guest_sock = dir.path().join("guest.sock");
        qsd.export(MIRROR_FILTER, "guest", &guest_sock).unwrap();
        Site {
            qsd: Some(qsd),
            lab,
            image,
            guest_sock,
            disk: disk.to_string(),
            size,
            dir,
        }
    }

    pub fn guest_uri(&self) -> String {
        format!("nbd+unix:///guest?socket={}", self.guest_sock.display())
    }

    /// Run qemu-io commands against the guest's disk, then flush.
    pub fn qemu_io(&self, cmds: &[String]) {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]).arg(self.guest_uri());
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        c.args(["-c", "flush"]);
        sh(&mut c).unwrap();
    }

    pub async fn guest(&self) -> Client<tokio::net::UnixStream> {
        Client::connect_unix(&self.guest_sock, "guest")
            .await
            .unwrap()
    }

    /// Read the guest's whole disk as it is now.
    pub fn guest_image(&self) -> Vec<u8> {
        let out = self.dir.path().join("guest-now.raw");
        sh(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.guest_uri())
            .arg(&out))
        .unwrap();
        let v = std::fs::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        v
    }

    /// Wait for the newest writes to become a recovery point; returns that point's sequence.
    pub fn caught_up(&self) -> u64 {
        self.lab
            .wait_caught_up(&self.disk, Duration::from_secs(120))
            .unwrap()
            .acked_seq
    }

    /// Read a recovery point whole, from the repository (a read-only handle).
    pub fn point_image(&self, seq: u64) -> Vec<u8> {
        let repo = self.lab.repository().unwrap();
        let r = repo.reader(&self.disk, seq).unwrap();
        let mut buf = vec![0u8; r.size() as usize];
        r.read_at(0, &mut buf).unwrap();
        buf
    }

    /// Export a point with `ferry export` to qcow2 and compare it with the guest's disk.
    pub fn assert_point_equals_guest(&self, seq: u64) {
        assert_point_equals(
            &self.lab,
            self.dir.path(),
            &self.disk,
            seq,
            &self.guest_uri(),
        );
    }
}

/// Export point `seq` of `disk` to qcow2 with `ferry export` and compare it with the raw image
/// at `source_uri` (a file or an NBD URI) under `qemu-img compare`.
pub fn assert_point_equals(
    lab: &Lab,
    dir: &std::path::Path,
    disk: &str,
    seq: u64,
    source_uri: &str,
) {
    let out = dir.join(format!("point-{seq}.qcow2"));
    let o = lab
        .ferry(&[
            "export",
            "--disk",
            disk,
            "--point",
            &seq.to_string(),
            "--format",
            "qcow2",
            "--output",
            out.to_str().unwrap(),
        ])
        .unwrap();
    assert!(
        o.status.success(),
        "export: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(source_uri)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "point {seq} differs from the source: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    std::fs::remove_file(&out).unwrap();
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(q) = self.qsd.take() {
            q.stop();
        }
    }
}

/// A `ferry` process (a role), its output appended to `<dir>/<name>.log`, killed when the test
/// ends.
pub struct Kill(pub std::process::Child);

impl Kill {
    pub fn spawn(dir: &std::path::Path, name: &str, args: &[String]) -> Kill {
        Kill::spawn_wrapped(dir, name, &[], args)
    }

    /// [`Kill::spawn`], `ferry` started by `wrapper` (a program and its arguments, to which
    /// `ferry`'s path and `args` are added), which must exec it: the child is `ferry` then.
    pub fn spawn_wrapped(
        dir: &std::path::Path,
        name: &str,
        wrapper: &[String],
        args: &[String],
    ) -> Kill {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{name}.log")))
            .unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(exe());
                c
            }
            None => Command::new(exe()),
        };
        Kill(
            cmd.args(args)
                .env("FERRY_LOG", "info")
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A small deterministic PRNG (xorshift), so a failing run can be replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The writer's log: write `i` (sequence `i + 1`) covered `log[i] = (offset, len)`.
pub type Log = Vec<(u64, usize)>;

/// The data of write `seq` at `offset`: every sector starts with a tag naming the write.
pub fn tagged(seq: u64, offset: u64, len: usize) -> Vec<u8> {
    assert!(offset.is_multiple_of(SECTOR as u64) && len.is_multiple_of(SECTOR) && len > 0);
    let mut v = vec![0u8; len];
    for (i, s) in v.chunks_mut(SECTOR).enumerate() {
        s[..8].copy_from_slice(MAGIC);
        s[8..16].copy_from_slice(&seq.to_le_bytes());
        s[16..24].copy_from_slice(&(offset + (i * SECTOR) as u64).to_le_bytes());
        for (j, b) in s[24..].iter_mut().enumerate() {
            *b = (seq as usize * 31 + j) as u8;
        }
    }
    v
}

/// A random sector-aligned write inside a disk of `size` bytes: 512 B to 128 KiB.
pub fn random_extent(rng: &mut Rng, size: u64) -> (u64, usize) {
    let sectors = (1 + rng.below(256)) as usize;
    let len = sectors * SECTOR;
    let offset = rng.below((size - len as u64) / SECTOR as u64) * SECTOR as u64;
    (offset, len)
}

/// Prove `image == base + the first N writes of log` for some N, and return N. N is the largest
/// sequence number any sector carries: the last write of a prefix always shows in its sectors.
pub fn check_prefix(image: &[u8], base: &[u8], log: &Log) -> Result<u64, String> {
    let log: Vec<(usize, u64, usize)> = log.iter().map(|&(o, l)| (0, o, l)).collect();
    check_machine_prefix(&[image], &[base], &log)
}

/// The same over several disks of one machine written by one guest, whose log names the disk of
/// each write (`(disk index, offset, len)`, sequence numbers shared by all disks): prove that
/// for one N, every `images[d] == bases[d] + the writes of the first N that went to disk d`.
/// Points of the disks cut at different moments fail this: one disk holds a write that the
/// other disk's point lacks an earlier write for.
pub fn check_machine_prefix(
    images: &[&[u8]],
    bases: &[&[u8]],
    log: &[(usize, u64, usize)],
) -> Result<u64, String> {
    let mut n = 0u64;
    for image in images {
        for s in image.chunks(SECTOR) {
            if s.len() >= 16 && &s[..8] == MAGIC {
                n = n.max(u64::from_le_bytes(s[8..16].try_into().unwrap()));
            }
        }
    }
    if n as usize > log.len() {
        return Err(format!(
            "image holds write {n} but only {} were issued",
            log.len()
        ));
    }
    for (d, (image, base)) in images.iter().zip(bases).enumerate() {
        let mut model = base.to_vec();
        for (i, &(disk, off, len)) in log[..n as usize].iter().enumerate() {
            if disk == d {
                model[off as usize..off as usize + len].copy_from_slice(&tagged(
                    i as u64 + 1,
                    off,
                    len,
                ));
            }
        }
        if let Some(at) = model.iter().zip(image.iter()).position(|(a, b)| a != b) {
            let what = if images.len() > 1 {
                format!("disk {d}")
            } else {
                "image".to_string()
            };
            return Err(format!(
                "{what} is not base + its writes among the first {n}: first difference at byte {at}"
            ));
        }
    }
    Ok(n)
}

/// Every recovery point of `disk` newer than `after`.
pub fn points_after(site: &Site, after: u64) -> Vec<u64> {
    let repo = site.lab.repository().unwrap();
    repo.points(&site.disk)
        .unwrap()
        .into_iter()
        .map(|p| p.meta.seq)
        .filter(|&s| s > after)
        .collect()
}

/// Pick at most `k` of `v`, evenly spread, always keeping the last.
pub fn spread(v: &[u64], k: usize) -> Vec<u64> {
    if v.len() <= k {
        return v.to_vec();
    }
    let mut out: Vec<u64> = (0..k - 1).map(|i| v[i * v.len() / (k - 1)]).collect();
    out.push(*v.last().unwrap());
    out.dedup();
    out
}

/// Every file's bytes under `dir` contain `needle` nowhere.
pub fn assert_no_plaintext(dir: &std::path::Path, needle: &[u8]) {
    for e in walk(dir) {
        let bytes = std::fs::read(&e).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{} holds plaintext",
            e.display()
        );
    }
}

/// Every chunk the lab's repository stores, sorted by id: (id, sealed blob). Chunks live in pack
/// files; the repository says where each blob lies ([`ferry_repository::Repository::chunk_location`]).
pub fn stored_chunks(lab: &Lab) -> Vec<(ferry_repository::ChunkId, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let repo = lab.repository().unwrap();
    let mut ids = repo.chunk_ids().unwrap();
    ids.sort_by_key(|id| id.0);
    ids.into_iter()
        .map(|id| {
            let (file, off, len) = repo.chunk_location(&id).unwrap().expect("listed chunk");
            let mut blob = vec![0u8; len as usize];
            std::fs::File::open(file)
                .unwrap()
                .read_exact_at(&mut blob, off)
                .unwrap();
            (id, blob)
        })
        .collect()
}

/// Flip bits of one byte of a chunk's sealed blob where it lies on disk (storage rot).
pub fn damage_chunk(lab: &Lab, id: &ferry_repository::ChunkId, at: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let repo = lab.repository().unwrap();
    let (file, off, len) = repo.chunk_location(id).unwrap().expect("stored chunk");
    let at = off + at.min(len as u64 - 1);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ mask], at).unwrap();
}

/// Every file under `dir`, recursively.
pub fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// A guest writing tagged random extents through QEMU's export until told to stop, flushing
/// every `flush_every` writes. `log` grows before each write is issued, so any recovery point
/// that holds write `n` finds it in the log.
pub struct TaggedWriter {
    pub log: std::sync::Arc<std::sync::Mutex<Log>>,
    /// The newest write a FLUSH has acknowledged.
    pub flushed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl TaggedWriter {
    pub fn start(
        rt: &tokio::runtime::Runtime,
        sock: &std::path::Path,
        size: u64,
        seed: u64,
        flush_every: u64,
    ) -> Self {
        Self::start_paced(rt, sock, size, seed, flush_every, Duration::ZERO)
    }

    /// Like [`TaggedWriter::start`], pausing `pause` after each write.
    pub fn start_paced(
        rt: &tokio::runtime::Runtime,
        sock: &std::path::Path,
        size: u64,
        seed: u64,
        flush_every: u64,
        pause: Duration,
    ) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let log: std::sync::Arc<std::sync::Mutex<Log>> = Default::default();
        let flushed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, f, s) = (log.clone(), flushed.clone(), stop.clone());
        let sock = sock.to_path_buf();
        let task = rt.spawn(async move {
            let mut g = Client::connect_unix(&sock, "guest").await.unwrap();
            let mut rng = Rng(seed);
            let mut n = 0u64;
            while !s.load(Relaxed) {
                let (off, len) = random_extent(&mut rng, size);
                n += 1;
                l.lock().unwrap().push((off, len));
                g.write(off, &tagged(n, off, len), false).await.unwrap();
                if n.is_multiple_of(flush_every) {
                    g.flush().await.unwrap();
                    f.store(n, Relaxed);
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            g.flush().await.unwrap();
            f.store(n, Relaxed);
        });
        TaggedWriter {
            log,
            flushed,
            stop,
            task,
        }
    }

    pub fn snapshot(&self) -> Log {
        self.log.lock().unwrap().clone()
    }

    /// Stop, wait (bounded) for the last write and flush, and return the log and flushed count.
    pub fn finish(self, rt: &tokio::runtime::Runtime) -> (Log, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(120), self.task).await })
            .expect("the guest's writes stalled")
            .unwrap();
        let log = self.log.lock().unwrap().clone();
        (log, self.flushed.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Run `ferry resync --disk DISK --cache CACHE` to completion.
pub fn ferry_resync(cache: &std::path::Path, disk: &str) -> std::process::Output {
    Command::new(exe())
        .args(["resync", "--disk", disk, "--cache"])
        .arg(cache)
        .output()
        .unwrap()
}

/// Serve a recovery point over NBD with `ferry serve`; returns the child and its port.
pub fn serve_point(site: &Site, seq: u64) -> (std::process::Child, u16) {
    let port = ferry::lab::free_port().unwrap();
    let child = Command::new(exe())
        .args([
            "serve",
            "--disk",
            &site.disk,
            "--point",
            &seq.to_string(),
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--repo")
        .arg(&site.lab.repo)
        .arg("--key")
        .arg(&site.lab.key)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ferry::lab::wait_port(port, Duration::from_secs(20)).unwrap();
    (child, port)
}

/// A qcow2 image of `size` bytes at `path`, with the `prefill` qemu-io commands applied (e.g.
/// `write -P 0x5a 0 8M`).
pub fn qcow2_image(path: &std::path::Path, size: u64, prefill: &[&str]) {
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string()))
    .unwrap();
    for p in prefill {
        sh(Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(path)
            .args(["-c", p]))
        .unwrap();
    }
}

/// A disk's points at consistency-group cuts made after `after` (ns): cut -> point sequence.
pub fn cuts_after(
    repo: &ferry_repository::Repository,
    disk: &str,
    after: u64,
) -> std::collections::BTreeMap<u64, u64> {
    repo.points(disk)
        .unwrap()
        .into_iter()
        .filter_map(|p| p.meta.group_cut.map(|c| (c, p.meta.seq)))
        .filter(|&(c, _)| c > after)
        .collect()
}
