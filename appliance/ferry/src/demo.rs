//! `ferry demo`: the whole data path on one machine, on an embedded default.
//!
//! qemu-storage-daemon owns a qcow2 disk (the protected VM's disk) and mirrors every write to the
//! process server over NBD with TLS; the process server journals, reduces, encrypts and ships to
//! the master target; the demo writes three phases of data as a guest would, and after each one
//! exports the newest recovery point and proves with `qemu-img compare` that it equals the disk.
//! Last, it serves a recovery point over NBD at once (instant access) and verifies the repository.

use anyhow::{bail, Context};
use clap::Args;
use ferry::lab::{free_port, sh, wait_port, Lab};
use ferry_qemu::{StorageDaemon, MIRROR_FILTER};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct DemoArgs {
    /// Keep everything here instead of a temporary directory that is removed afterwards.
    #[arg(long)]
    workdir: Option<PathBuf>,
    /// Size of the protected disk.
    #[arg(long, default_value = "256M")]
    size: String,
}

const DISK: &str = "demo-disk";

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    for tool in ["qemu-img", "qemu-io", "qemu-storage-daemon"] {
        if which(tool).is_none() {
            bail!(
                "{tool} is not installed: install Debian's qemu-utils (apt-get install qemu-utils)"
            );
        }
    }
    let size = ferry::parse_size(&args.size)?;
    if size < 64 << 20 {
        bail!("--size must be at least 64M");
    }
    let tmp;
    let dir: &Path = match &args.workdir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            if std::fs::read_dir(d)?.next().is_some() {
                bail!("{} is not empty", d.display());
            }
            d
        }
        None => {
            tmp = tempfile::Builder::new().prefix("ferry-demo-").tempdir()?;
            tmp.path()
        }
    };
    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let mut lab = Lab::new(&exe, dir, &[(DISK, size)])?;
    say(&format!("work directory {}", dir.display()));

    let image = dir.join("protected.qcow2");
    sh(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(size.to_string()))?;
    // Data that exists before protection starts: the mirror's first full copy seeds it.
    sh(Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&image)
        .args(["-c", "write -P 0x11 32M 8M"]))?;

    lab.start_master()?;
    lab.start_process()?;
    say(&format!(
        "master target on 127.0.0.1:{}, process server NBD on 127.0.0.1:{} (TLS)",
        lab.master_port, lab.nbd_port
    ));

    let mut qsd = StorageDaemon::start(&image, "qcow2", dir)?;
    qsd.mirror_to_nbd(
        "127.0.0.1",
        lab.nbd_port,
        DISK,
        Some(&lab.pki),
        Duration::from_secs(120),
    )
    .context("starting the mirror job")?;
    let guest_sock = dir.join("guest.sock");
    qsd.export(MIRROR_FILTER, "guest", &guest_sock)?;
    let guest = format!("nbd+unix:///guest?socket={}", guest_sock.display());
    say(
        "qemu-storage-daemon mirrors every write to the process server (sync=full, write-blocking)",
    );

    let phases: Vec<(&str, Vec<String>)> = vec![
        ("sequential 16 MiB", vec!["write -P 0x5a 0 16M".into()]),
        ("random 4 KiB writes", random_writes(size, 400)),
        (
            "unaligned writes, zeroes, trims",
            vec![
                "write -P 0x77 12345 100000".into(),
                "write -z 20M 3M".into(),
                "discard 40M 2M".into(),
                "write -P 0x33 65535 3".into(),
            ],
        ),
    ];
    for (i, (name, cmds)) in phases.iter().enumerate() {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]).arg(&guest);
        for cmd in cmds {
            c.arg("-c").arg(cmd);
        }
        c.args(["-c", "flush"]);
        sh(&mut c).with_context(|| format!("phase {name}"))?;
        let st = lab.wait_caught_up(DISK, Duration::from_secs(120))?;
        let out = dir.join(format!("phase{}.raw", i + 1));
        let repo = lab.repository()?;
        repo.export(
            DISK,
            st.acked_seq,
            &out,
            ferry_repository::ExportFormat::Raw,
        )?;
        sh(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&guest)
            .arg(&out))
        .with_context(|| format!("recovery point {} differs from the source", st.acked_seq))?;
        say(&format!(
            "phase {}: {name}: recovery point {} == source disk (qemu-img compare)",
            i + 1,
            st.acked_seq
        ));
        std::fs::remove_file(&out)?;
    }

    let port = free_port()?;
    let t = Instant::now();
    let mut serve = Command::new(&exe)
        .args(["serve", "--disk", DISK, "--point", "latest", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--repo")
        .arg(&lab.repo)
        .arg("--key")
        .arg(&lab.key)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let served = wait_port(port, Duration::from_secs(20)).and_then(|_| {
        let ready = t.elapsed();
        sh(Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(format!("nbd://127.0.0.1:{port}/{DISK}"))
            .arg(&guest))?;
        Ok(ready)
    });
    let _ = serve.kill();
    let _ = serve.wait();
    let ready = served.context("instant access")?;
    say(&format!(
        "instant access: the newest point was served over NBD after {} ms and equals the source",
        ready.as_millis()
    ));

    println!();
    print!(
        "{}",
        String::from_utf8_lossy(&lab.ferry(&["points"])?.stdout)
    );
    let v = lab.ferry(&["verify"])?;
    print!("{}", String::from_utf8_lossy(&v.stdout));
    if !v.status.success() {
        bail!("verify failed: {}", String::from_utf8_lossy(&v.stderr));
    }
    qsd.stop();
    drop(lab);
    println!(
        "\nDemo passed in {:.1} s: every recovery point matched the protected disk byte for byte.",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn say(s: &str) {
    println!("ferry demo: {s}");
}

/// Deterministic pseudo-random 4 KiB writes (an LCG: the same disk content every run).
fn random_writes(size: u64, n: usize) -> Vec<String> {
    let blocks = size / 4096;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            format!(
                "write -P {} {} 4k",
                (i % 250) + 1,
                (x >> 11) % blocks * 4096
            )
        })
        .collect()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}
