//! Periodic protection versus restic and borg, in one run on the same mixed disk image.
//!
//! 1. Builds a mixed raw image (default 8 GiB) in 1 MiB extents cycling through system binaries
//!    (ELF files of /usr/bin and /usr/lib), text (documentation, headers, sources under /usr),
//!    zeros (left as holes) and random bytes, streamed to disk (bounded memory). When /usr holds
//!    less than a quarter of the image of one kind, later passes over its files are XORed with a
//!    per-pass byte: the same compressibility, but no free deduplication. Then
//!    `qemu-img convert -O qcow2` gives the host disk for Ferry.
//! 2. Seed: Ferry's periodic mode (qemu-storage-daemon on the qcow2 with a unix NBD export,
//!    `ferry master-target` + `ferry process-server --periodic ...,interval-ms=3600000` on
//!    loopback; done when `acked_seq >= 1` in `<cache>/<disk>/status.json`) versus
//!    `restic backup` and `borg create --chunker-params fixed,4194304` of the raw image into
//!    fresh local repositories.
//! 3. Incremental: 1% of the 64 KiB blocks, chosen at random, get new random bytes, written
//!    through the guest's NBD export of qemu-storage-daemon (so the dirty bitmap sees them) and
//!    the identical bytes into the raw image. The process server (killed after the seed, while
//!    it slept) is started again: its first cut is the next point, an incremental from the
//!    bitmap; done when `acked_seq` advances. Versus `restic backup` and `borg create` again.
//!
//! Figures: wall time, CPU time (user+sys: for Ferry the process server, master target and
//! qemu-storage-daemon from /proc/<pid>/stat before and after; for the peers the children's
//! rusage from bash's `times`), and bytes stored (`du -sB1` of the repositories; growth for the
//! incremental). Each input file is read once before each tool runs, so every tool starts with
//! a warm page cache, and `sync` runs then, so no tool pays for the writeback of another. As
//! root, each tool's repository (Ferry's whole lab) is on a fresh filesystem of its own
//! (`OwnFs`), so none pays for what another left on a shared one.
//!
//! Environment: FERRY_BENCH_PERIODIC_GIB (image size, default 8), FERRY_BENCH_PERIODIC_VERIFY
//! (default 1: export Ferry's last point and `qemu-img compare` it with the raw image),
//! FERRY_BENCH_PERIODIC_PEERS (default 1; 0: Ferry alone), FERRY_BENCH_PERIODIC_FRESH_FS
//! (default 1; 0: every repository on the one scratch filesystem), FERRY_BENCH_TMP (scratch
//! parent, default /tmp).
//! Run: `cargo run --release -p ferry-bench --bin periodic` or `bash bench/periodic.sh`.

use anyhow::{bail, ensure, Context};
use ferry::lab::{sh, Lab};
use ferry_bench::{env_num, ferry_exe, mbps, scratch, verdict, walk, Rng};
use ferry_chunk::is_zero;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BS: u64 = 64 << 10;
const EXTENT: usize = 1 << 20;
const DISK: &str = "bench";
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// The mixed image, streamed.

fn head(p: &Path, n: usize) -> Option<Vec<u8>> {
    let mut f = std::fs::File::open(p).ok()?;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(_) => return None,
        }
    }
    buf.truncate(got);
    Some(buf)
}

fn is_text(p: &Path, d: &[u8]) -> bool {
    let compressed = matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("gz" | "xz" | "bz2" | "zst" | "png" | "jpg" | "svgz")
    );
    !compressed
        && !d.contains(&0)
        && std::str::from_utf8(d).map_or_else(|e| e.error_len().is_none(), |_| true)
}

/// Bytes from a list of files, read in order, cycling; pass k > 0 XORs every byte with a
/// per-pass constant (same compressibility, different content).
struct FileSource {
    files: Vec<PathBuf>,
    next: usize,
    pass: u64,
    cur: Option<std::fs::File>,
    bytes_first_pass: u64,
}

impl FileSource {
    fn new(roots: &[&str], keep: impl Fn(&Path, &[u8]) -> bool) -> FileSource {
        let mut all = Vec::new();
        for r in roots {
            walk(Path::new(r), &mut all, 0);
        }
        let mut files = Vec::new();
        let mut bytes = 0;
        for f in all {
            if let Some(h) = head(&f, 8192) {
                if keep(&f, &h) {
                    bytes += std::fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
                    files.push(f);
                }
            }
        }
        FileSource {
            files,
            next: 0,
            pass: 0,
            cur: None,
            bytes_first_pass: bytes,
        }
    }

    fn fill(&mut self, buf: &mut [u8], fallback: &mut Rng) {
        if self.files.is_empty() {
            fallback.fill(buf);
            return;
        }
        let mut got = 0;
        let mut empty_opens = 0;
        while got < buf.len() {
            if self.cur.is_none() {
                if self.next == self.files.len() {
                    self.next = 0;
                    self.pass += 1;
                }
                self.cur = std::fs::File::open(&self.files[self.next]).ok();
                self.next += 1;
                empty_opens += 1;
                if empty_opens > 2 * self.files.len() + 2 {
                    // Nothing readable any more: top up with generated bytes.
                    fallback.fill(&mut buf[got..]);
                    return;
                }
                continue;
            }
            let f = self.cur.as_mut().expect("file");
            match f.read(&mut buf[got..]) {
                Ok(0) | Err(_) => self.cur = None,
                Ok(n) => {
                    let x = (self.pass as u8).wrapping_mul(0x9d);
                    if x != 0 {
                        buf[got..got + n].iter_mut().for_each(|b| *b ^= x);
                    }
                    got += n;
                    empty_opens = 0;
                }
            }
        }
    }
}

struct ImageInfo {
    nonzero_blocks: u64,
    system_files_mib: u64,
    text_files_mib: u64,
}

/// Write the mixed raw image to `path` (zero extents are holes).
fn build_image(path: &Path, size: u64) -> anyhow::Result<ImageInfo> {
    let mut system = FileSource::new(&["/usr/bin", "/usr/lib"], |_, d| d.starts_with(b"\x7fELF"));
    let mut text = FileSource::new(
        &[
            "/usr/share/doc",
            "/usr/include",
            "/usr/share/perl",
            "/usr/lib/python3",
        ],
        is_text,
    );
    let mut rng = Rng::new(0x1a2b_3c4d);
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let mut buf = vec![0u8; EXTENT];
    let mut nonzero_blocks = 0;
    let mut off = 0u64;
    let mut kind = 0;
    while off < size {
        let len = (size - off).min(EXTENT as u64) as usize;
        let b = &mut buf[..len];
        match kind % 4 {
            0 => system.fill(b, &mut rng),
            1 => text.fill(b, &mut rng),
            2 => b.fill(0),
            _ => rng.fill(b),
        }
        if kind % 4 != 2 {
            f.write_all_at(b, off)?;
            nonzero_blocks += b.chunks(BS as usize).filter(|c| !is_zero(c)).count() as u64;
        }
        off += len as u64;
        kind += 1;
    }
    f.sync_all()?;
    Ok(ImageInfo {
        nonzero_blocks,
        system_files_mib: system.bytes_first_pass >> 20,
        text_files_mib: text.bytes_first_pass >> 20,
    })
}

/// Read a file once (warms the page cache so every tool starts alike).
/// Ready the machine for the next timed step: `path` in the page cache (every tool starts warm),
/// and no writeback pending from an earlier step (a tool that syncs its repository would
/// otherwise also pay for flushing what the tool before it wrote).
fn warm(path: &Path) -> anyhow::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 8 << 20];
    while f.read(&mut buf)? > 0 {}
    let synced = std::process::Command::new("sync").status()?;
    anyhow::ensure!(synced.success(), "sync failed");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking NBD client over a unix socket (the guest's writes).

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

struct Guest {
    sock: UnixStream,
    size: u64,
    handle: u64,
}

impl Guest {
    fn connect(path: &Path, export: &str) -> anyhow::Result<Guest> {
        let mut sock =
            UnixStream::connect(path).with_context(|| format!("connecting {}", path.display()))?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hello = [0u8; 18];
        sock.read_exact(&mut hello)?;
        ensure!(
            u64::from_be_bytes(hello[0..8].try_into()?) == NBDMAGIC
                && u64::from_be_bytes(hello[8..16].try_into()?) == IHAVEOPT,
            "not a newstyle NBD server"
        );
        // fixed newstyle + no zeroes
        sock.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        sock.write_all(&opt)?;
        let mut info = [0u8; 10];
        sock.read_exact(&mut info)?;
        let size = u64::from_be_bytes(info[0..8].try_into()?);
        Ok(Guest {
            sock,
            size,
            handle: 1,
        })
    }

    fn request(&mut self, typ: u16, offset: u64, data: &[u8], len: u32) -> anyhow::Result<()> {
        let mut req = Vec::with_capacity(28 + data.len());
        req.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&typ.to_be_bytes());
        req.extend_from_slice(&self.handle.to_be_bytes());
        req.extend_from_slice(&offset.to_be_bytes());
        req.extend_from_slice(&len.to_be_bytes());
        req.extend_from_slice(data);
        self.sock.write_all(&req)?;
        if typ == 2 {
            return Ok(());
        }
        let mut rep = [0u8; 16];
        self.sock.read_exact(&mut rep)?;
        ensure!(
            u32::from_be_bytes(rep[0..4].try_into()?) == SIMPLE_REPLY_MAGIC,
            "unexpected NBD reply"
        );
        let err = u32::from_be_bytes(rep[4..8].try_into()?);
        ensure!(
            u64::from_be_bytes(rep[8..16].try_into()?) == self.handle,
            "NBD reply for another request"
        );
        ensure!(err == 0, "NBD request failed with error {err}");
        self.handle += 1;
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.request(1, offset, data, data.len() as u32)
    }

    fn flush_and_close(mut self) -> anyhow::Result<()> {
        self.request(3, 0, &[], 0)?;
        self.request(2, 0, &[], 0)
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and their CPU time.

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The fields of /proc/<pid>/stat after the command name (index 0 = state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// [user, sys] clock ticks of a process (all its threads); zeros when it is gone.
fn user_sys_ticks(pid: u32) -> [u64; 2] {
    stat_fields(pid)
        .and_then(|f| Some([f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?]))
        .unwrap_or([0, 0])
}

/// A direct child of this process whose command line contains `needle`.
fn child_pid(needle: &str) -> Option<u32> {
    let me = std::process::id().to_string();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Some(f) = stat_fields(pid) else { continue };
        if f.get(1) != Some(&me) || f.first().map(String::as_str) == Some("Z") {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) {
            return Some(pid);
        }
    }
    None
}

/// qemu-storage-daemon on the qcow2 image with a second QMP socket for Ferry and the guest's
/// writable NBD export on a unix socket (the NBD server Ferry's views are exported on, too).
struct Qsd {
    child: Child,
}

impl Qsd {
    fn start(image: &Path, dir: &Path, sock: &Path) -> anyhow::Result<Qsd> {
        let log = std::fs::File::create(dir.join("qsd.log"))?;
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=qcow2,node-name=disk0,file=file0")
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp1,path={},server=on,wait=off",
                dir.join("qsd-mgmt.sock").display()
            ))
            .arg("--monitor")
            .arg("chardev=qmp1")
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", sock.display()))
            .arg("--export")
            .arg("type=nbd,id=guest,node-name=disk0,name=guest,writable=on")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting qemu-storage-daemon")?;
        let mut q = Qsd { child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(sock).is_err()
            || UnixStream::connect(dir.join("qsd-mgmt.sock")).is_err()
        {
            if let Ok(Some(st)) = q.child.try_wait() {
                bail!(
                    "qemu-storage-daemon exited ({st}); see {}",
                    dir.join("qsd.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("qemu-storage-daemon did not open its sockets within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(q)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wall time, CPU seconds, and what a measured step did.
#[derive(Clone, Copy, Default)]
struct Figures {
    wall: Duration,
    cpu: f64,
    stored: u64,
}

/// Run a peer command under `timeout`, returning wall time and the CPU time (user+sys) of
/// all its descendants, as bash's `times` reports it (getrusage of waited-for children).
fn run_peer(
    dir: &Path,
    label: &str,
    timeout_s: u64,
    envs: &[(&str, String)],
    cmd: &[String],
) -> anyhow::Result<(Duration, f64)> {
    let times = dir.join(format!("{label}.times"));
    let log = dir.join(format!("{label}.log"));
    let logf = std::fs::File::create(&log)?;
    let mut c = Command::new("bash");
    c.arg("-c")
        .arg(r#"t=$1; out=$2; shift 2; timeout -k 10 "$t" "$@"; rc=$?; times > "$out"; exit $rc"#)
        .arg("bash")
        .arg(timeout_s.to_string())
        .arg(&times)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf);
    for (k, v) in envs {
        c.env(k, v);
    }
    let t = Instant::now();
    let st = c.status().with_context(|| format!("running {label}"))?;
    let wall = t.elapsed();
    if !st.success() {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: String = tail.lines().rev().take(15).collect::<Vec<_>>().join("\n");
        bail!("{label} failed ({st}): {:?}\n{tail}", cmd);
    }
    let t = std::fs::read_to_string(&times)?;
    let line = t.lines().nth(1).context("no children's times")?;
    let secs = |s: &str| -> f64 {
        let s = s.trim_end_matches('s');
        match s.split_once('m') {
            Some((m, sec)) => {
                m.parse::<f64>().unwrap_or(0.0) * 60.0 + sec.parse::<f64>().unwrap_or(0.0)
            }
            None => s.parse().unwrap_or(0.0),
        }
    };
    let cpu: f64 = line.split_whitespace().map(secs).sum();
    Ok((wall, cpu))
}

/// Bytes allocated under a directory (`du -sB1`).
fn du(path: &Path) -> anyhow::Result<u64> {
    let out = sh(Command::new("du").arg("-sB1").arg(path))?;
    out.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("parsing du")
}

/// Wait until the disk's status shows a point after `after`, printing the seed's progress.
fn wait_point(
    lab: &Lab,
    after: u64,
    timeout: Duration,
) -> anyhow::Result<ferry_process_server::DiskStatus> {
    let deadline = Instant::now() + timeout;
    let mut shown = Instant::now();
    loop {
        let st = lab.status(DISK).ok();
        if let Some(s) = &st {
            if s.acked_seq > after {
                return Ok(s.clone());
            }
            if shown.elapsed() >= Duration::from_secs(15) {
                shown = Instant::now();
                if let Some(p) = &s.progress {
                    eprintln!(
                        "  ferry {}: {} of {} ({:.0} MB/s)",
                        p.operation,
                        mib(p.done_bytes),
                        mib(p.total_bytes),
                        p.bytes_per_sec / 1e6
                    );
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "no recovery point after {after} within {timeout:?} (logs in {}): {st:?}",
                lab.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ferry's [user, sys] CPU clock ticks: process server, master target, qemu-storage-daemon.
fn ferry_ticks(qsd: &Qsd) -> [[u64; 2]; 3] {
    let t = |n: &str| child_pid(n).map(user_sys_ticks).unwrap_or([0, 0]);
    [
        t("process-server"),
        t("master-target"),
        user_sys_ticks(qsd.pid()),
    ]
}

/// Total CPU seconds, and per process with the kernel's share (sys: the file system, sockets
/// and page faults), which says whether a role spends its time computing or in the kernel.
fn ferry_cpu(before: [[u64; 2]; 3], after: [[u64; 2]; 3], tck: f64) -> (f64, String) {
    let d = |i: usize, k: usize| after[i][k].saturating_sub(before[i][k]) as f64 / tck;
    let total: f64 = (0..3).map(|i| d(i, 0) + d(i, 1)).sum();
    let names = ["process server", "master target", "qemu-storage-daemon"];
    let parts: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n} {:.1} s, sys {:.1}", d(i, 0) + d(i, 1), d(i, 1)))
        .collect();
    (total, parts.join("; "))
}

/// Seed `qcow2` (served by a qemu-storage-daemon started here, in `dir`) into a new master
/// target with a new periodic process server in `dir/ferry`, `disk_opts` appended to the disk's
/// `--periodic` spec; prints and returns the figures, and the lab and daemon, still running.
/// A filesystem of a tool's own for its repository (or Ferry's lab), made fresh for it:
/// `mkfs.ext4` defaults (with a journal, as the scratch filesystem and the appliance's) on a loop
/// device, when this runs as root with mkfs.ext4 and `FERRY_BENCH_PERIODIC_FRESH_FS` is not 0.
/// Why: a store's speed depends on what its filesystem held before (measured here: the master
/// target's system time doubled when restic and borg had written to the same filesystem before
/// it), so no tool pays for another's leftovers, whichever runs first. Otherwise a directory of
/// the shared scratch. Unmounted and removed when dropped.
struct OwnFs {
    mounted: Option<(PathBuf, PathBuf)>,
}

impl OwnFs {
    /// `dir/<name>-fs/<name>`, on a fresh filesystem of `bytes` (sparse) when it can be made.
    fn new(dir: &Path, name: &str, bytes: u64) -> anyhow::Result<(PathBuf, OwnFs)> {
        let mnt = dir.join(format!("{name}-fs"));
        std::fs::create_dir_all(&mnt)?;
        let path = mnt.join(name);
        let root = sh(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0");
        if !root || env_num("FERRY_BENCH_PERIODIC_FRESH_FS", 1) == 0 {
            return Ok((path, OwnFs { mounted: None }));
        }
        let img = std::env::temp_dir().join(format!(
            "ferry-bench-periodic-{name}-{}.img",
            std::process::id()
        ));
        let made = sh(Command::new("truncate")
            .arg("-s")
            .arg(bytes.to_string())
            .arg(&img))
        .and_then(|_| sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)))
        .and_then(|_| {
            sh(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
        });
        if let Err(e) = made {
            let _ = std::fs::remove_file(&img);
            println!("({name}: no filesystem of its own, sharing the scratch: {e})");
            return Ok((path, OwnFs { mounted: None }));
        }
        Ok((
            path,
            OwnFs {
                mounted: Some((mnt, img)),
            },
        ))
    }
}

impl Drop for OwnFs {
    fn drop(&mut self) {
        if let Some((mnt, img)) = self.mounted.take() {
            let lazy = || Command::new("umount").arg("-l").arg(&mnt).status();
            if !Command::new("umount")
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success())
            {
                let _ = lazy();
            }
            let _ = std::fs::remove_file(img);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn ferry_seed(
    label: &str,
    exe: &Path,
    dir: &Path,
    qcow2: &Path,
    ferry_dir: &Path,
    size: u64,
    limit: Duration,
    tck: f64,
    disk_opts: &str,
) -> anyhow::Result<(Figures, Lab, Qsd)> {
    let sock = dir.join("host-nbd.sock");
    let qsd = Qsd::start(qcow2, dir, &sock)?;
    std::fs::create_dir_all(ferry_dir)?;
    let mut lab = Lab::new(exe, ferry_dir, &[])?;
    lab.nbd_tls = false;
    lab.periodic = vec![format!(
        "{DISK}={size},qmp={},node=disk0,nbd={},fleece={},interval-ms=3600000{disk_opts}",
        dir.join("qsd-mgmt.sock").display(),
        sock.display(),
        dir.join("fleece.qcow2").display()
    )];
    lab.start_master().context("starting the master target")?;
    warm(qcow2)?;
    let before = ferry_ticks(&qsd);
    let t = Instant::now();
    lab.start_process().context("starting the process server")?;
    let st = wait_point(&lab, 0, limit)?;
    let wall = t.elapsed();
    let after = ferry_ticks(&qsd);
    let (cpu, split) = ferry_cpu(before, after, tck);
    let figures = Figures {
        wall,
        cpu,
        stored: du(&lab.repo)?,
    };
    ensure!(
        st.periodic_mode.as_deref() == Some("seed"),
        "the first point is not a seed: {st:?}"
    );
    println!(
        "  {label}: {:.1} s wall ({:.0} MB/s of image), {cpu:.1} s CPU ({split}), {} stored; point {} read {} blocks, {} on the wire",
        wall.as_secs_f64(),
        mbps(size, wall),
        mib(figures.stored),
        st.acked_seq,
        st.last_cut_blocks,
        mib(st.last_cut_bytes)
    );
    Ok((figures, lab, qsd))
}

fn main() -> anyhow::Result<()> {
    let size_gib = env_num("FERRY_BENCH_PERIODIC_GIB", 8).max(1);
    let size = size_gib * GIB;
    let verify = env_num("FERRY_BENCH_PERIODIC_VERIFY", 1) != 0;
    // 0: Ferry alone (for working on Ferry's own figures; no targets are judged).
    let peers = env_num("FERRY_BENCH_PERIODIC_PEERS", 1) != 0;
    let limit = Duration::from_secs(300 + 120 * size_gib);
    let tck = clk_tck();
    let exe = ferry_exe()?;
    let tmp = scratch("ferry-bench-periodic-")?;
    let dir = tmp.path();
    let tools: &[&str] = match peers {
        true => &["restic", "borg", "qemu-img", "qemu-storage-daemon"],
        false => &["qemu-img", "qemu-storage-daemon"],
    };
    for &tool in tools {
        ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is not installed (bench/periodic.sh installs restic and borgbackup)"
        );
    }
    let version = |t: &str| {
        let arg = if t == "restic" {
            "version"
        } else {
            "--version"
        };
        sh(Command::new(t).arg(arg))
            .map(|v| v.lines().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    println!(
        "periodic: {size_gib} GiB mixed image; Ferry periodic mode vs {} and {}, scratch {}",
        version("restic"),
        version("borg"),
        dir.display()
    );

    // The image.
    let raw = dir.join("disk.raw");
    let qcow2 = dir.join("host.qcow2");
    let t = Instant::now();
    let info = build_image(&raw, size)?;
    println!(
        "image: {} raw, 1 MiB extents cycling ELF binaries ({} MiB of them in /usr) / text ({} MiB of files) / zeros (holes) / random; {} non-zero 64 KiB blocks of {}; written in {:.1} s",
        gib(size),
        info.system_files_mib,
        info.text_files_mib,
        info.nonzero_blocks,
        size / BS,
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    sh(Command::new("timeout")
        .arg(limit.as_secs().to_string())
        .args(["qemu-img", "convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2))?;
    println!(
        "qcow2 for the host: {} allocated, converted in {:.1} s",
        gib(du(&qcow2)?),
        t.elapsed().as_secs_f64()
    );

    // Peers' repositories, each on a filesystem of its own (`OwnFs`; so are Ferry's below).
    let fs_bytes = size + 2 * GIB;
    let (restic_repo, _restic_fs) = OwnFs::new(dir, "restic-repo", fs_bytes)?;
    let (borg_repo, _borg_fs) = OwnFs::new(dir, "borg-repo", fs_bytes)?;
    // borg's default compressor is lz4; a second borg repository with zstd level 1 (Ferry's)
    // shows how much of a difference is the compressor (informative: the target is against
    // the peers as they come).
    let (borg_zstd_repo, _borg_zstd_fs) = OwnFs::new(dir, "borg-zstd-repo", fs_bytes)?;
    let restic_env = vec![("RESTIC_PASSWORD", "ferry-bench".to_string())];
    let borg_env = vec![
        ("BORG_PASSPHRASE", "ferry-bench".to_string()),
        ("BORG_BASE_DIR", dir.join("borg-home").display().to_string()),
        ("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes".to_string()),
    ];
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let p = |x: &Path| x.display().to_string();
    let init = |label: &str, env: &[(&str, String)], cmd: &[String]| -> anyhow::Result<()> {
        if peers {
            run_peer(dir, label, 120, env, cmd)?;
        }
        Ok(())
    };
    init(
        "restic-init",
        &restic_env,
        &s(&["restic", "init", "--repo", &p(&restic_repo)]),
    )?;
    init(
        "borg-init",
        &borg_env,
        &s(&["borg", "init", "-e", "repokey", &p(&borg_repo)]),
    )?;
    init(
        "borg-zstd-init",
        &borg_env,
        &s(&["borg", "init", "-e", "repokey", &p(&borg_zstd_repo)]),
    )?;
    let restic_backup = s(&[
        "restic",
        "backup",
        "--no-cache",
        "--host",
        "bench",
        "--repo",
        &p(&restic_repo),
        &p(&raw),
    ]);
    let borg_create = |archive: &str| {
        s(&[
            "borg",
            "create",
            "--chunker-params",
            "fixed,4194304",
            &format!("{}::{archive}", p(&borg_repo)),
            &p(&raw),
        ])
    };
    let borg_zstd_seed = s(&[
        "borg",
        "create",
        "--chunker-params",
        "fixed,4194304",
        "--compression",
        "zstd,1",
        &format!("{}::seed", p(&borg_zstd_repo)),
        &p(&raw),
    ]);
    let peer = |label: &str,
                env: &[(&str, String)],
                cmd: &[String],
                repo: &Path|
     -> anyhow::Result<Figures> {
        if !peers {
            println!("  {label}: skipped (FERRY_BENCH_PERIODIC_PEERS=0)");
            return Ok(Figures::default());
        }
        warm(&raw)?;
        let before = du(repo)?;
        let (wall, cpu) = run_peer(dir, label, limit.as_secs(), env, cmd)?;
        let stored = du(repo)?.saturating_sub(before);
        println!(
            "  {label}: {:.1} s wall ({:.0} MB/s of image), {cpu:.1} s CPU, {} stored",
            wall.as_secs_f64(),
            mbps(size, wall),
            mib(stored)
        );
        Ok(Figures { wall, cpu, stored })
    };

    // 1. Seed.
    println!("seed:");
    let restic_seed = peer("restic seed", &restic_env, &restic_backup, &restic_repo)?;
    let borg_seed = peer("borg seed", &borg_env, &borg_create("seed"), &borg_repo)?;
    let borg_zstd = peer(
        "borg seed, zstd level 1 (not the default)",
        &borg_env,
        &borg_zstd_seed,
        &borg_zstd_repo,
    )?;

    // Ferry with the policy's other compressor, LZ4 (borg's default compressor too), on a copy
    // of the host's image (so the run below starts from a disk no process server has seen),
    // removed with its repository afterwards.
    let lz4_dir = dir.join("lz4");
    std::fs::create_dir_all(&lz4_dir)?;
    let lz4_qcow2 = lz4_dir.join("host.qcow2");
    std::fs::copy(&qcow2, &lz4_qcow2)?;
    let (lz4_ferry, lz4_fs) = OwnFs::new(&lz4_dir, "ferry", fs_bytes)?;
    let (ferry_lz4, lz4_lab, lz4_qsd) = ferry_seed(
        "ferry seed, compression lz4 (a policy's choice)",
        &exe,
        &lz4_dir,
        &lz4_qcow2,
        &lz4_ferry,
        size,
        limit,
        tck,
        ",compress=lz4",
    )?;
    drop(lz4_lab);
    drop(lz4_qsd);
    drop(lz4_fs);
    std::fs::remove_dir_all(&lz4_dir)?;

    let sock = dir.join("host-nbd.sock");
    let (ferry_dir, _ferry_fs) = OwnFs::new(dir, "ferry", fs_bytes)?;
    let (ferry_seed, mut lab, qsd) = self::ferry_seed(
        "ferry seed",
        &exe,
        dir,
        &qcow2,
        &ferry_dir,
        size,
        limit,
        tck,
        "",
    )?;
    let seed_seq = lab.status(DISK)?.acked_seq;
    // The process server now sleeps for its hour-long interval: stop it; the bitmap records on.
    lab.kill_process();

    // 2. Change 1% of the blocks, through the guest's NBD export and into the raw image.
    let nblocks = size / BS;
    let want = (nblocks / 100).max(1);
    let mut rng = Rng::new(0xc0ff_ee11);
    let mut picked = BTreeSet::new();
    while (picked.len() as u64) < want {
        picked.insert(rng.below(nblocks));
    }
    let mut guest = Guest::connect(&sock, "guest")?;
    ensure!(
        guest.size == size,
        "the guest export is {} bytes",
        guest.size
    );
    let rawf = std::fs::OpenOptions::new().write(true).open(&raw)?;
    let mut buf = vec![0u8; BS as usize];
    let t = Instant::now();
    for &b in &picked {
        rng.fill(&mut buf);
        guest.write(b * BS, &buf)?;
        rawf.write_all_at(&buf, b * BS)?;
    }
    guest.flush_and_close()?;
    rawf.sync_all()?;
    drop(rawf);
    println!(
        "changed {} random 64 KiB blocks ({} of new random data, 1% of {}) through the guest's NBD export and in the raw image in {:.1} s",
        picked.len(),
        mib(want * BS),
        nblocks,
        t.elapsed().as_secs_f64()
    );

    // 3. Incremental.
    println!("incremental (1% of blocks changed):");
    let restic_incr = peer(
        "restic incremental",
        &restic_env,
        &restic_backup,
        &restic_repo,
    )?;
    let borg_incr = peer(
        "borg incremental",
        &borg_env,
        &borg_create("incr"),
        &borg_repo,
    )?;
    warm(&qcow2)?;
    let repo_before = du(&lab.repo)?;
    let before = ferry_ticks(&qsd);
    let t = Instant::now();
    lab.start_process()
        .context("restarting the process server")?;
    let st = wait_point(&lab, seed_seq, limit)?;
    let wall = t.elapsed();
    let after = ferry_ticks(&qsd);
    let (cpu, split) = ferry_cpu(before, after, tck);
    let ferry_incr = Figures {
        wall,
        cpu,
        stored: du(&lab.repo)?.saturating_sub(repo_before),
    };
    println!(
        "  ferry incremental: {:.1} s wall (process server start included), {cpu:.1} s CPU ({split}), {} stored; point {} is {:?}, read {} blocks, {} on the wire",
        wall.as_secs_f64(),
        mib(ferry_incr.stored),
        st.acked_seq,
        st.periodic_mode.as_deref().unwrap_or("?"),
        st.last_cut_blocks,
        mib(st.last_cut_bytes)
    );
    let mode_ok = st.periodic_mode.as_deref() == Some("incremental");
    if !mode_ok || st.last_cut_blocks != picked.len() as u64 {
        println!(
            "  note: expected an incremental of {} blocks, got {:?} of {}",
            picked.len(),
            st.periodic_mode,
            st.last_cut_blocks
        );
    }
    lab.kill_process();
    let verified = if verify {
        let out = dir.join("ferry-point.raw");
        let o = lab.ferry(&[
            "export",
            "--disk",
            DISK,
            "--point",
            &st.acked_seq.to_string(),
            "--output",
            &p(&out),
        ])?;
        ensure!(
            o.status.success(),
            "ferry export failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let same = Command::new("qemu-img")
            .args(["compare", "-q", "-f", "raw", "-F", "raw"])
            .arg(&raw)
            .arg(&out)
            .status()?
            .success();
        let _ = std::fs::remove_file(&out);
        println!(
            "verify: Ferry's point {} {} the changed raw image (qemu-img compare)",
            st.acked_seq,
            if same { "equals" } else { "DIFFERS FROM" }
        );
        Some(same)
    } else {
        None
    };
    drop(lab);
    drop(qsd);

    // 4. The table.
    println!();
    println!(
        "{:<22} {:>10} {:>10} {:>14}",
        "step / tool", "wall s", "CPU s", "stored MiB"
    );
    let rows = [
        ("seed: ferry", ferry_seed),
        ("seed: restic", restic_seed),
        ("seed: borg", borg_seed),
        ("seed: borg zstd,1", borg_zstd),
        ("seed: ferry lz4", ferry_lz4),
        ("1% incr: ferry", ferry_incr),
        ("1% incr: restic", restic_incr),
        ("1% incr: borg", borg_incr),
    ];
    for (name, f) in rows {
        println!(
            "{:<22} {:>10.2} {:>10.2} {:>14.1}",
            name,
            f.wall.as_secs_f64(),
            f.cpu,
            f.stored as f64 / (1 << 20) as f64
        );
    }
    let ratio = |ferry: &Figures, a: &Figures, b: &Figures| {
        a.wall.min(b.wall).as_secs_f64() / ferry.wall.as_secs_f64().max(1e-9)
    };
    let seed_x = ratio(&ferry_seed, &restic_seed, &borg_seed);
    let incr_x = ratio(&ferry_incr, &restic_incr, &borg_incr);
    let lz4_x = ratio(&ferry_lz4, &restic_seed, &borg_seed);
    println!();
    if !peers {
        println!("(peers skipped: no targets judged)");
        if verified == Some(false) {
            bail!("Ferry's recovery point differs from the image");
        }
        return Ok(());
    }
    println!(
        "target: seed >= 1.5x faster than the faster peer (wall): {seed_x:.2}x  {}",
        verdict(seed_x >= 1.5)
    );
    println!(
        "target: seed >= 1.5x faster than the faster peer (wall), Ferry with the lz4 policy: {lz4_x:.2}x  {}",
        verdict(lz4_x >= 1.5)
    );
    println!(
        "target: 1% incremental >= 20x faster than the faster peer (wall): {incr_x:.2}x  {}",
        verdict(incr_x >= 20.0)
    );
    println!(
        "(seed versus borg with Ferry's compressor, zstd level 1: {:.2}x the wall time, {:.2}x the CPU)",
        borg_zstd.wall.as_secs_f64() / ferry_seed.wall.as_secs_f64().max(1e-9),
        borg_zstd.cpu / ferry_seed.cpu.max(1e-9)
    );
    if verified == Some(false) {
        bail!("Ferry's recovery point differs from the image");
    }
    Ok(())
}

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / GIB as f64)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}
