//! Hooks: the plan's pre and post commands and each machine's start command. An argv, never a
//! shell line, so nothing from the inventory can be injected; a timeout, after which the
//! command and everything it started are killed and the step fails.
//!
//! Confinement: a hook gets a clean environment (a fixed `PATH`, `LANG`, the job's `FERRY_*`
//! variables; nothing of the server's), its own process group (so a timeout kills what it
//! started too), and, when the appliance names an account for hooks ([`Confine`]), that
//! account's uid and gid with no supplementary groups and its home as working directory. What
//! a hook leaves running in the background when it ends (a machine it started) keeps running;
//! its output is waited for only briefly after the hook ends.

use crate::{io, FailoverError, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `PATH` a hook gets.
pub const HOOK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long a hook's output is waited for once the hook has ended (a background process it
/// started may hold its output open for as long as it runs).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Who hooks run as.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Confine {
    /// This account; none: the server's own.
    pub user: Option<Account>,
}

/// An account of the system's user database.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

impl Account {
    /// The account named `user` (a name or a numeric uid) in `/etc/passwd`.
    pub fn lookup(user: &str) -> Result<Account> {
        let text = std::fs::read_to_string("/etc/passwd").map_err(io("reading /etc/passwd"))?;
        Self::find(&text, user)
    }

    fn find(passwd: &str, user: &str) -> Result<Account> {
        passwd
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                match f.as_slice() {
                    [name, _, uid, gid, _, home, ..] => Some(Account {
                        name: name.to_string(),
                        uid: uid.parse().ok()?,
                        gid: gid.parse().ok()?,
                        home: PathBuf::from(home),
                    }),
                    _ => None,
                }
            })
            .find(|a| a.name == user || a.uid.to_string() == user)
            .ok_or_else(|| {
                FailoverError::Refused(format!("no account {user:?} in /etc/passwd for hooks"))
            })
    }
}

/// Replace `{name}` placeholders whose name is in `vars`. A `{disk:...}` or `{network:...}`
/// placeholder that `vars` does not know is an error (a start command naming a disk the
/// machine does not have); any other brace text (QEMU's JSON options) is left alone.
pub fn expand(argv: &[String], vars: &BTreeMap<String, String>) -> Result<Vec<String>> {
    argv.iter()
        .map(|a| {
            let mut out = String::with_capacity(a.len());
            let mut rest = a.as_str();
            while let Some(open) = rest.find('{') {
                out.push_str(&rest[..open]);
                let after = &rest[open + 1..];
                match after.find('}') {
                    Some(close) => {
                        let name = &after[..close];
                        if let Some(v) = vars.get(name) {
                            out.push_str(v);
                        } else if name.starts_with("disk:") || name.starts_with("network:") {
                            return Err(FailoverError::Refused(format!(
                                "hook argument {a:?}: {{{name}}} names nothing this machine has"
                            )));
                        } else {
                            out.push('{');
                            out.push_str(name);
                            out.push('}');
                        }
                        rest = &after[close + 1..];
                    }
                    None => {
                        out.push_str(&rest[open..]);
                        rest = "";
                    }
                }
            }
            out.push_str(rest);
            Ok(out)
        })
        .collect()
}

/// Run a command to its end within `timeout`, confined as `confine` says; its output
/// (bounded) is the answer.
pub fn run(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
    confine: &Confine,
) -> Result<String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| FailoverError::Refused("a hook with no program".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", HOOK_PATH)
        .env("LANG", "C.UTF-8")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(a) = &confine.user {
        // std drops the supplementary groups when a root parent sets the uid.
        cmd.uid(a.uid)
            .gid(a.gid)
            .current_dir(&a.home)
            .env("HOME", &a.home)
            .env("USER", &a.name)
            .env("LOGNAME", &a.name);
    }
    let mut child = cmd.spawn().map_err(io(format!("starting {program}")))?;
    let group = rustix::process::Pid::from_child(&child);
    // Each pipe is read on its own thread to its end (the first 64 KiB kept, the rest read and
    // dropped), so a chatty hook never blocks on a full pipe whichever one it fills.
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut r) = r {
                let _ = (&mut r).take(64 << 10).read_to_end(&mut kept);
                let _ = std::io::copy(&mut r, &mut std::io::sink());
            }
            kept
        })
    }
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child
            .try_wait()
            .map_err(io(format!("waiting for {program}")))?
        {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                // The hook's whole process group: what it started dies with it.
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(FailoverError::Command {
                    program: program.clone(),
                    why: format!("still running after {timeout:?}; killed"),
                });
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    // A background process the hook left (a machine it started) may hold the pipes open: its
    // output is taken if it ends soon, else left to the reading threads, which end with it.
    let grace = Instant::now() + OUTPUT_GRACE;
    while !(out.is_finished() && err.is_finished()) && Instant::now() < grace {
        std::thread::sleep(Duration::from_millis(10));
    }
    let take = |h: std::thread::JoinHandle<Vec<u8>>| match h.is_finished() {
        true => h.join().unwrap_or_default(),
        false => Vec::new(),
    };
    let (o, e) = (take(out), take(err));
    if !status.success() {
        return Err(FailoverError::Command {
            program: program.clone(),
            why: format!("{status}: {}", tail(&e)),
        });
    }
    Ok(tail(&o))
}

/// The last few hundred bytes of an output, for a step's detail.
fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    match s.char_indices().rev().nth(300) {
        Some((i, _)) => format!("...{}", &s[i..]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders() {
        let vars: BTreeMap<String, String> = [("disk:d0", "/x/d0.qcow2"), ("machine", "web")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let argv: Vec<String> = ["q", "file={disk:d0},id={machine}", "{\"a\":1}", "{"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            expand(&argv, &vars).unwrap(),
            ["q", "file=/x/d0.qcow2,id=web", "{\"a\":1}", "{"]
        );
        assert!(expand(&["{disk:d9}".to_string()], &vars).is_err());
    }

    #[test]
    fn timeouts_and_failures() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            run(&s(&["echo", "hi"]), &[], Duration::from_secs(5), &free()).unwrap(),
            "hi"
        );
        assert!(run(&s(&["false"]), &[], Duration::from_secs(5), &free()).is_err());
        let e = run(
            &s(&["sleep", "5"]),
            &[],
            Duration::from_millis(200),
            &free(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        // A hook that writes far more than a pipe holds to both outputs still ends at once.
        let chatty = "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2; echo done";
        let out = run(
            &s(&["sh", "-c", chatty]),
            &[],
            Duration::from_secs(10),
            &free(),
        )
        .unwrap();
        assert!(out.ends_with("done") || out.contains("..."), "{out}");
    }

    fn free() -> Confine {
        Confine::default()
    }

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Whether process `pid` still exists (a zombie counts as gone).
    fn alive(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|st| !st.contains(") Z "))
            .unwrap_or(false)
    }

    #[test]
    fn a_timeout_kills_what_the_hook_started_too() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let e = run(
            &argv(&["sh", "-c", &script]),
            &[],
            Duration::from_millis(500),
            &free(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let pid = pid.trim();
        let began = Instant::now();
        while alive(pid) && began.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "the hook's child {pid} outlived the timeout");
    }

    #[test]
    fn a_hook_that_leaves_a_process_running_ends_and_the_process_lives() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The background process keeps the hook's output open (as a machine started with `&`).
        let script = format!("sleep 30 & echo $! > {}; echo started", pidfile.display());
        let began = Instant::now();
        let out = run(
            &argv(&["sh", "-c", &script]),
            &[],
            Duration::from_secs(20),
            &free(),
        )
        .unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        let pid = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .to_string();
        assert!(alive(&pid), "what the hook started was killed");
        let _ = Command::new("kill").arg(&pid).status();
        // Output that ended with the hook is there; held open, it is not waited for.
        assert!(out.is_empty() || out.contains("started"), "{out:?}");
    }

    #[test]
    fn a_hook_sees_a_clean_environment_and_its_job_variables() {
        // The test runner's environment has CARGO_* and HOME; a hook sees none of them.
        let env = vec![("FERRY_PLAN".to_string(), "dr".to_string())];
        let out = run(&argv(&["env"]), &env, Duration::from_secs(5), &free()).unwrap();
        let mut names: Vec<&str> = out.lines().filter_map(|l| l.split('=').next()).collect();
        names.sort();
        assert_eq!(names, ["FERRY_PLAN", "LANG", "PATH"], "{out}");
        assert!(out.contains(&format!("PATH={HOOK_PATH}")), "{out}");
        let pwd = run(&argv(&["pwd"]), &[], Duration::from_secs(5), &free()).unwrap();
        assert_eq!(pwd, "/");
    }

    #[test]
    fn accounts_are_found_by_name_or_uid_and_an_unknown_one_is_refused() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\nbad line\n";
        let a = Account::find(passwd, "nobody").unwrap();
        assert_eq!(
            (a.uid, a.gid, a.home.to_str()),
            (65534, 65534, Some("/nonexistent"))
        );
        assert_eq!(Account::find(passwd, "0").unwrap().name, "root");
        let e = Account::find(passwd, "ferry-hooks").unwrap_err();
        assert!(e.to_string().contains("no account \"ferry-hooks\""), "{e}");
    }

    #[test]
    fn a_confined_hook_runs_as_its_account_without_the_servers_groups() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: running as an account needs root");
            return;
        }
        let mut nobody = Account::lookup("nobody").unwrap();
        // Its home does not exist on Debian; a directory it may enter.
        nobody.home = PathBuf::from("/tmp");
        let confine = Confine { user: Some(nobody) };
        let id = run(&argv(&["id"]), &[], Duration::from_secs(5), &confine).unwrap();
        assert!(
            id.starts_with("uid=65534(nobody) gid=65534(nogroup)"),
            "{id}"
        );
        assert!(!id.contains("groups=0") && !id.contains("(root)"), "{id}");
        // Root's files are out of reach.
        let dir = tempfile::tempdir().unwrap(); // 0700, root's
        let target = dir.path().join("x");
        let e = run(
            &argv(&["touch", target.to_str().unwrap()]),
            &[],
            Duration::from_secs(5),
            &confine,
        )
        .unwrap_err();
        assert!(e.to_string().contains("Permission denied"), "{e}");
        assert!(!target.exists());
    }
}
