//! Inventory: the control plane with 10,000 protected disks (issue 4). A real `ferry
//! config-server` on 127.0.0.1 gets a realistic inventory through its API, and then:
//!
//! - the status endpoints over mutual TLS, on one kept-alive connection and on a fresh
//!   connection per request: `/v1/tenants/{tenant}/status` (what `ferry ctl status` asks: a
//!   tenant's machines, disks, plans and alerts in one answer), `/v1/system/dashboard` (every
//!   disk of every tenant with state and RPO, and the alerts: the console's status screen),
//!   the finer routes a status used to be assembled from (a tenant's machines, one machine's
//!   disks, a plan's status, `/v1/alerts`), and `/metrics`; p50/p99/max over
//!   FERRY_BENCH_REQUESTS (default 50) requests each;
//! - `ferry ctl status --tenant T` and `ferry ctl --json status --tenant T` as whole processes,
//!   as an operator runs them: wall time p50/p99/max over FERRY_BENCH_CTL_RUNS (default 20);
//! - the server's memory (VmRSS, VmHWM from /proc) after the setup and after the
//!   measurements, and the size of its sled state on disk.
//!
//! The inventory: FERRY_BENCH_TENANTS tenants (default 10), each with a protected and a
//! recovery site, two policies, a process server enrolled with a token (its own identity, as
//! on an appliance), and machines of 4 disks each up to FERRY_BENCH_DISKS disks (default
//! 10,000), in plans of 50 machines. Each tenant's process server then reports every disk as
//! it would (mostly protected with an RPO of seconds; some seeding, paused, needing a resync,
//! or over the policy's RPO threshold, which raises an alert; a few never reported) and its
//! cache and backlog (the first tenant's cache is short of space). FERRY_BENCH_LANES (default 8)
//! requests are in flight during the setup. `ferry ctl status` is measured for the first
//! tenant; FERRY_BENCH_TENANTS=1 puts the whole inventory in it.
//!
//! Targets: every status answer and `ferry ctl status` p99 < 200 ms (`/metrics` is shown
//! without one: a scrape, not a status). A miss prints MISS; the benchmark does not fail on it.
//! Run: `cargo run --release -p ferry-bench --bin inventory`

use anyhow::{bail, Context};
use ferry_api::{EnrollRequest, Enrolled, TokenCreated};
use ferry_bench::{env_num, ferry_exe, ms, percentiles, scratch, verdict, Percentiles};
use ferry_config_server::client::{Client, Method};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DISKS_PER_MACHINE: u64 = 4;
const MACHINES_PER_PLAN: u64 = 50;
const TARGET: Duration = Duration::from_millis(200);
/// No single run of `ferry ctl` may take longer than this.
const CTL_DEADLINE: Duration = Duration::from_secs(60);

/// The running `ferry config-server`; killed when dropped, also when the benchmark fails.
struct ConfigServer {
    child: Child,
    state: PathBuf,
    url: String,
}

impl ConfigServer {
    fn start(exe: &Path, dir: &Path) -> anyhow::Result<ConfigServer> {
        let state = dir.join("state");
        let log = std::fs::File::create(dir.join("config-server.log"))?;
        let child = Command::new(exe)
            .arg("config-server")
            .arg("--state")
            .arg(&state)
            .args(["--listen", "127.0.0.1:0"])
            // The benchmark's appliances report once; they must not turn unreachable meanwhile.
            .args(["--unreachable-secs", "86400"])
            .env("FERRY_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting ferry config-server")?;
        let mut s = ConfigServer {
            child,
            state,
            url: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(a) = std::fs::read_to_string(s.state.join("listening")) {
                s.url = format!("https://{}", a.trim());
                return Ok(s);
            }
            if let Some(st) = s.child.try_wait()? {
                bail!(
                    "ferry config-server exited at start: {st} (log in {})",
                    dir.display()
                );
            }
            if Instant::now() > deadline {
                bail!("ferry config-server did not listen within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn admin_dir(&self) -> PathBuf {
        self.state.join("admin")
    }

    /// (VmRSS, VmHWM) in bytes.
    fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            let line = s
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            let kb: u64 = line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{line:?} is not a size"))?;
            Ok(kb * 1024)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for ConfigServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

/// One request; an error status is an error.
async fn send(c: &Client, m: Method, path: &str, body: Value) -> anyhow::Result<()> {
    c.call::<Value, Value>(m.clone(), path, Some(&body))
        .await
        .with_context(|| format!("{m} {path}"))?;
    Ok(())
}

/// Run `jobs` with `lanes` in flight at a time; the first failure ends the run.
async fn in_lanes<F>(lanes: usize, jobs: Vec<F>) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    for j in jobs {
        if set.len() >= lanes {
            set.join_next().await.context("a lane")???;
        }
        set.spawn(j);
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// The shape of the inventory.
struct Shape {
    tenants: u64,
    machines: u64,
    lanes: usize,
}

impl Shape {
    fn tenant(t: u64) -> String {
        format!("t{t:02}")
    }
    /// Machines are dealt to tenants in turn.
    fn machines_of(&self, t: u64) -> impl Iterator<Item = u64> + '_ {
        (t..self.machines).step_by(self.tenants as usize)
    }
    fn machine(m: u64) -> String {
        format!("m{m:05}")
    }
    fn disk(m: u64, d: u64) -> String {
        format!("m{m:05}-d{d}")
    }
}

/// What a process server reports for disk `i` (by its index over the whole inventory):
/// most are protected with an RPO of seconds; the rest are the cases an operator looks for.
fn report_of(i: u64, gold: bool) -> Option<Value> {
    let (normal, over) = if gold { (3.0, 45.0) } else { (400.0, 2400.0) };
    let jitter = (i % 7) as f64 * 0.5;
    // A multiplicative hash spreads the cases over machines and tenants alike.
    Some(match (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % 100 {
        0 => return None, // configured, never reported
        1 => json!({"state": "paused", "rpo_seconds": over * 4.0}),
        2 | 3 => json!({"state": "resync-required", "rpo_seconds": over * 2.0}),
        4..=6 => json!({"state": "seeding", "rpo_seconds": null, "throughput_bytes_per_sec": 80e6}),
        7..=9 => {
            json!({"state": "protected", "rpo_seconds": over + jitter, "throughput_bytes_per_sec": 2e6})
        }
        _ => {
            json!({"state": "protected", "rpo_seconds": normal + jitter, "throughput_bytes_per_sec": 1e6})
        }
    })
}

/// Tenants, sites, policies and an enrolled process server per tenant; returns the process
/// servers' clients.
async fn configure(s: &ConfigServer, admin: &Client, shape: &Shape) -> anyhow::Result<Vec<Client>> {
    let ca = std::fs::read_to_string(s.state.join("pki/ca-cert.pem"))?;
    let mut reporters = Vec::new();
    for t in 0..shape.tenants {
        let tn = Shape::tenant(t);
        let base = format!("/v1/tenants/{tn}");
        send(admin, Method::POST, "/v1/tenants", json!({"name": tn})).await?;
        send(
            admin,
            Method::POST,
            &format!("{base}/sites"),
            json!({"name": "hq", "kind": "protected", "location": "customer room"}),
        )
        .await?;
        send(
            admin,
            Method::POST,
            &format!("{base}/sites"),
            json!({"name": "dr", "kind": "recovery", "location": "provider"}),
        )
        .await?;
        send(admin, Method::POST, &format!("{base}/policies"), json!({"name": "gold", "mode": "continuous",
            "checkpoint_interval_secs": 1, "rpo_alert_secs": 30,
            "retention": [{"every_secs": 1, "keep_secs": 3600}, {"every_secs": 300, "keep_secs": 86400}]})).await?;
        send(
            admin,
            Method::POST,
            &format!("{base}/policies"),
            json!({"name": "silver", "mode": "periodic",
            "checkpoint_interval_secs": 900, "rpo_alert_secs": 1800,
            "retention": [{"every_secs": 3600, "keep_secs": 1_209_600}]}),
        )
        .await?;
        let tok: TokenCreated = admin
            .call(
                Method::POST,
                "/v1/tokens",
                Some(
                    &json!({"name": format!("ps-{tn}"), "role": "operator", "tenant": tn,
                             "appliance": "process-server", "ttl_secs": 600}),
                ),
            )
            .await
            .context("creating a token")?;
        let e: Enrolled = Client::anonymous(&s.url, &ca)?
            .call(
                Method::POST,
                "/v1/enroll",
                Some(&EnrollRequest {
                    token: tok.token,
                    csr_pem: None,
                }),
            )
            .await
            .context("enrolling a process server")?;
        let dir = s.state.with_file_name(format!("ps-{tn}"));
        ferry_config_server::serve::write_identity(
            &dir,
            &e.ca_cert_pem,
            &e.certificate_pem,
            e.private_key_pem.as_deref().unwrap_or_default(),
        )?;
        reporters.push(Client::from_cert_dir(&s.url, &dir)?);
    }
    Ok(reporters)
}

/// Machines with their disks, then plans.
async fn protect(admin: &Client, shape: &Shape) -> anyhow::Result<()> {
    let mut jobs = Vec::new();
    for m in 0..shape.machines {
        let (c, tn) = (admin.clone(), Shape::tenant(m % shape.tenants));
        jobs.push(async move {
            let base = format!("/v1/tenants/{tn}/machines");
            let policy = if m % 4 == 3 { "silver" } else { "gold" };
            let name = Shape::machine(m);
            send(
                &c,
                Method::POST,
                &base,
                json!({"name": name, "site": "hq", "policy": policy}),
            )
            .await?;
            for d in 0..DISKS_PER_MACHINE {
                let size = (40u64 + 60 * d) << 30;
                send(
                    &c,
                    Method::POST,
                    &format!("{base}/{name}/disks"),
                    json!({"name": Shape::disk(m, d), "size_bytes": size,
                           "source": format!("nbd://hv{}.example:10809/{name}-{d}", m % 16)}),
                )
                .await?;
            }
            Ok(())
        });
    }
    in_lanes(shape.lanes, jobs).await?;
    for t in 0..shape.tenants {
        let tn = Shape::tenant(t);
        let ms: Vec<u64> = shape.machines_of(t).collect();
        for (p, chunk) in ms.chunks(MACHINES_PER_PLAN as usize).enumerate() {
            let machines: Vec<Value> = chunk
                .iter()
                .enumerate()
                .map(|(i, m)| json!({"machine": Shape::machine(*m), "boot_order": i}))
                .collect();
            let groups: Vec<Value> = machines
                .chunks(10)
                .enumerate()
                .map(|(g, ms)| json!({"priority": (g % 5) + 1, "machines": ms}))
                .collect();
            send(
                admin,
                Method::POST,
                &format!("/v1/tenants/{tn}/plans"),
                json!({"name": format!("plan-{p}"), "groups": groups}),
            )
            .await?;
        }
    }
    Ok(())
}

/// Every tenant's process server reports its disks, its cache and its backlog.
async fn report(reporters: &[Client], shape: &Shape) -> anyhow::Result<()> {
    let mut jobs = Vec::new();
    for m in 0..shape.machines {
        let t = m % shape.tenants;
        let (c, tn) = (reporters[t as usize].clone(), Shape::tenant(t));
        jobs.push(async move {
            for d in 0..DISKS_PER_MACHINE {
                let Some(r) = report_of(m * DISKS_PER_MACHINE + d, m % 4 != 3) else {
                    continue;
                };
                let path = format!(
                    "/v1/tenants/{tn}/machines/{}/disks/{}/report",
                    Shape::machine(m),
                    Shape::disk(m, d)
                );
                send(&c, Method::PUT, &path, r).await?;
            }
            Ok(())
        });
    }
    in_lanes(shape.lanes, jobs).await?;
    for (t, c) in reporters.iter().enumerate() {
        let free = if t == 0 { 0.25 } else { 0.6 };
        send(
            c,
            Method::PUT,
            &format!("/v1/appliances/ps-{}/report", Shape::tenant(t as u64)),
            json!({"cache_free_ratio": free, "upload_backlog_secs": 4.0}),
        )
        .await?;
    }
    Ok(())
}

/// `n` GETs of `path`, on the client's connection (`fresh`: a new client, so a new TLS
/// connection, for each). Returns the timings and the answer's size.
async fn time_get(
    c: &Client,
    url: &str,
    dir: &Path,
    path: &str,
    n: usize,
    fresh: bool,
) -> anyhow::Result<(Vec<Duration>, usize)> {
    let mut v = Vec::with_capacity(n);
    let mut size = 0;
    // One untimed request first: the kept-alive case then measures a warm connection.
    c.raw(Method::GET, path, None).await?;
    for _ in 0..n {
        let fresh_client;
        let c = if fresh {
            fresh_client = Client::from_cert_dir(url, dir)?;
            &fresh_client
        } else {
            c
        };
        let t = Instant::now();
        let (status, body) = c.raw(Method::GET, path, None).await?;
        v.push(t.elapsed());
        if !status.is_success() {
            bail!("GET {path}: {status}");
        }
        size = body.len();
    }
    Ok((v, size))
}

/// One run of `ferry ctl ...`: its wall time and its standard output.
fn ctl(exe: &Path, url: &str, dir: &Path, args: &[&str]) -> anyhow::Result<(Duration, String)> {
    let t = Instant::now();
    let mut child = Command::new(exe)
        .arg("ctl")
        .args(["--server", url])
        .arg("--cert-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ferry ctl")?;
    let mut out = child.stdout.take().context("ctl stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).map(|_| s)
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > CTL_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ferry ctl {args:?} took longer than {CTL_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let took = t.elapsed();
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!("ferry ctl {args:?}: {status}: {err}");
    }
    Ok((took, out))
}

struct Row {
    what: String,
    detail: String,
    p: Percentiles,
    target: bool,
}

fn print_table(rows: &[Row]) {
    println!(
        "| {:<52} | {:>11} | {:>8} | {:>8} | {:>8} | {:>8} | {:>6} |",
        "what", "answer", "p50 ms", "p99 ms", "max ms", "target", "result"
    );
    println!(
        "|{:-<54}|{:->13}|{:->10}|{:->10}|{:->10}|{:->10}|{:->8}|",
        "", "", "", "", "", "", ""
    );
    for r in rows {
        println!(
            "| {:<52} | {:>11} | {:>8} | {:>8} | {:>8} | {:>8} | {:>6} |",
            r.what,
            r.detail,
            ms(r.p.p50),
            ms(r.p.p99),
            ms(r.p.max),
            if r.target { "p99<200" } else { "-" },
            if r.target {
                verdict(r.p.p99 < TARGET)
            } else {
                ""
            }
        );
    }
}

fn main() -> anyhow::Result<()> {
    let disks = env_num("FERRY_BENCH_DISKS", 10_000).max(DISKS_PER_MACHINE);
    let shape = Shape {
        tenants: env_num("FERRY_BENCH_TENANTS", 10).clamp(1, 99),
        machines: disks / DISKS_PER_MACHINE,
        lanes: env_num("FERRY_BENCH_LANES", 8).max(1) as usize,
    };
    let requests = env_num("FERRY_BENCH_REQUESTS", 50).max(1) as usize;
    let ctl_runs = env_num("FERRY_BENCH_CTL_RUNS", 20).max(1) as usize;
    let exe = ferry_exe()?;
    let tmp = scratch("ferry-bench-inventory-")?;
    let server = ConfigServer::start(&exe, tmp.path())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let admin_dir = server.admin_dir();
    let admin = Client::from_cert_dir(&server.url, &admin_dir)?;
    println!(
        "inventory: {} tenants, {} machines, {} disks ({} per machine), plans of {} machines; {} requests in flight during the setup",
        shape.tenants,
        shape.machines,
        shape.machines * DISKS_PER_MACHINE,
        DISKS_PER_MACHINE,
        MACHINES_PER_PLAN,
        shape.lanes
    );

    let t0 = Instant::now();
    let reporters = rt.block_on(configure(&server, &admin, &shape))?;
    let t_conf = t0.elapsed();
    let t = Instant::now();
    rt.block_on(protect(&admin, &shape))?;
    let t_protect = t.elapsed();
    let t = Instant::now();
    rt.block_on(report(&reporters, &shape))?;
    let t_report = t.elapsed();
    let setup = t0.elapsed();
    println!(
        "setup: {:.1} s (tenants, sites, policies, enrollment {:.1} s; machines, disks, plans {:.1} s = {:.0} objects/s; disk reports {:.1} s = {:.0}/s)",
        setup.as_secs_f64(),
        t_conf.as_secs_f64(),
        t_protect.as_secs_f64(),
        (shape.machines * (1 + DISKS_PER_MACHINE)) as f64 / t_protect.as_secs_f64(),
        t_report.as_secs_f64(),
        (shape.machines * DISKS_PER_MACHINE) as f64 / t_report.as_secs_f64(),
    );
    let mem_setup = server.memory()?;
    let db_setup = dir_bytes(&server.state.join("db"));

    let tn = Shape::tenant(0);
    let first_machine = Shape::machine(0);
    let endpoints = [
        format!("/v1/tenants/{tn}/status"),
        "/v1/system/dashboard".to_string(),
        format!("/v1/tenants/{tn}/machines"),
        format!("/v1/tenants/{tn}/machines/{first_machine}/disks"),
        format!("/v1/tenants/{tn}/plans/plan-0/status"),
        "/v1/alerts".to_string(),
        "/metrics".to_string(),
    ];
    let mut rows = Vec::new();
    for path in &endpoints {
        for fresh in [false, true] {
            let (v, size) = rt.block_on(time_get(
                &admin,
                &server.url,
                &admin_dir,
                path,
                requests,
                fresh,
            ))?;
            rows.push(Row {
                what: format!("GET {path} ({})", if fresh { "new conn" } else { "kept" }),
                detail: format!("{} KiB", size / 1024),
                p: percentiles(&v),
                // A Prometheus scrape, not a status: shown for scale (5 lines per disk).
                target: path != "/metrics",
            });
        }
    }
    let alerts: Vec<Value> = rt.block_on(admin.get("/v1/alerts"))?;
    let status_args = ["status", "--tenant", tn.as_str()];
    let json_args = ["--json", "status", "--tenant", tn.as_str()];
    let mut sample = String::new();
    for (args, what) in [
        (&status_args[..], "ferry ctl status (table)"),
        (&json_args[..], "ferry ctl --json status"),
    ] {
        let mut v = Vec::with_capacity(ctl_runs);
        let mut lines = 0;
        for _ in 0..ctl_runs {
            let (d, out) = ctl(&exe, &server.url, &admin_dir, args)?;
            v.push(d);
            lines = out.lines().count();
            if sample.is_empty() {
                sample = out;
            }
        }
        rows.push(Row {
            what: format!("{what} --tenant {tn}, whole process"),
            detail: format!("{lines} lines"),
            p: percentiles(&v),
            target: true,
        });
    }
    let mem_end = server.memory()?;
    let db_end = dir_bytes(&server.state.join("db"));

    println!();
    print_table(&rows);
    println!();
    println!(
        "config server memory: after setup VmRSS {} MiB (VmHWM {} MiB); after the measurements VmRSS {} MiB (VmHWM {} MiB)",
        mib(mem_setup.0), mib(mem_setup.1), mib(mem_end.0), mib(mem_end.1)
    );
    println!(
        "sled state on disk: {} MiB after setup, {} MiB at the end; {} active alerts",
        mib(db_setup),
        mib(db_end),
        alerts.len()
    );
    let lines: Vec<&str> = sample.lines().collect();
    let (head, tail) = (8.min(lines.len()), lines.len().saturating_sub(8).max(8));
    println!(
        "\n`ferry ctl status --tenant {tn}` ({} lines):\n{}\n...\n{}",
        lines.len(),
        lines[..head].join("\n"),
        lines[tail.min(lines.len())..].join("\n")
    );
    drop(server);
    Ok(())
}
