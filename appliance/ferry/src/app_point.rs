//! `ferry app-point`: ask the process server for an application-consistent recovery point of a
//! continuous disk and wait for it (or for the reason there is none).

use anyhow::{bail, Context};
use clap::Args;
use ferry_process_server::app_consistent::REQUEST;
use ferry_process_server::status::{self, now_unix_ns};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct AppPointArgs {
    #[arg(long, default_value = "/var/cache/ferry")]
    cache: PathBuf,
    #[arg(long)]
    disk: String,
    /// Give up waiting for the point after this many seconds (0: do not wait).
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: AppPointArgs) -> anyhow::Result<()> {
    let dir = a.cache.join(&a.disk);
    let path = dir.join("status.json");
    let before = status::read(&path)
        .with_context(|| format!("no protected disk {} under {}", a.disk, a.cache.display()))?;
    if before.periodic {
        bail!(
            "disk {} is protected periodically; application-consistent points are for continuously protected disks",
            a.disk
        );
    }
    if !before.app_hooks {
        bail!("the process server has no guest hooks: start it with --freeze-hook and --thaw-hook");
    }
    let asked = now_unix_ns();
    let flag = dir.join(REQUEST);
    std::fs::write(&flag, b"").with_context(|| format!("writing {}", flag.display()))?;
    if a.wait_secs == 0 {
        println!("application-consistent point of {} requested", a.disk);
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(a.wait_secs);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let s = status::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if s.app_points > before.app_points {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"disk": a.disk, "point": s.last_app_point_seq, "consistency": "application"})
                );
            } else {
                println!(
                    "{}: application-consistent recovery point {}",
                    a.disk, s.last_app_point_seq
                );
            }
            return Ok(());
        }
        if s.app_error_unix_ns > asked {
            bail!(
                "no application-consistent point of {}: {}",
                a.disk,
                s.app_error.unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(&flag);
            bail!(
                "no application-consistent point of {} after {}s (state {:?}, connected {}); the request was withdrawn",
                a.disk,
                a.wait_secs,
                s.state,
                s.connected
            );
        }
    }
}
