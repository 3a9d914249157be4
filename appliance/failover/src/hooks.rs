//! Hooks: the plan's pre and post commands and each machine's start command. An argv, never a
//! shell line, so nothing from the inventory can be injected; a timeout, after which the
//! command is killed and the step fails.

use crate::{io, FailoverError, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Run a command to its end within `timeout`; its output (bounded) is the answer.
pub fn run(argv: &[String], env: &[(String, String)], timeout: Duration) -> Result<String> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| FailoverError::Refused("a hook with no program".into()))?;
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {program}")))?;
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
    let (o, e) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
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
            run(&s(&["echo", "hi"]), &[], Duration::from_secs(5)).unwrap(),
            "hi"
        );
        assert!(run(&s(&["false"]), &[], Duration::from_secs(5)).is_err());
        let e = run(&s(&["sleep", "5"]), &[], Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        // A hook that writes far more than a pipe holds to both outputs still ends at once.
        let chatty = "head -c 1000000 /dev/zero; head -c 1000000 /dev/zero >&2; echo done";
        let out = run(&s(&["sh", "-c", chatty]), &[], Duration::from_secs(10)).unwrap();
        assert!(out.ends_with("done") || out.contains("..."), "{out}");
    }
}
