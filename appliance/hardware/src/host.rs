//! The machine being probed or tuned, seen through a root directory: `/` is the live machine;
//! any other directory is a recorded tree (test fixtures, or a copy taken from a site) laid out
//! like `/` (`sys/`, `proc/`, plus `ferry-fixture/ethtool/IF.json` for what only ioctls show).

use crate::ethtool::Ethtool;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Host {
    pub root: PathBuf,
    pub live: bool,
    pub ethtool: Ethtool,
}

impl Host {
    pub fn new(root: &Path) -> Host {
        let live = root
            .canonicalize()
            .map(|p| p == Path::new("/"))
            .unwrap_or(false);
        let ethtool = if live {
            Ethtool::Live
        } else {
            Ethtool::Recorded(root.join("ferry-fixture/ethtool"))
        };
        Host {
            root: root.to_path_buf(),
            live,
            ethtool,
        }
    }

    /// A path under the root (`rel` is relative, e.g. `sys/class/net`).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// A file's contents without the trailing newline (None when absent or unreadable: many
    /// sysfs attributes refuse reads on devices that lack them, e.g. `speed` of a link that is down).
    pub fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_string())
    }

    pub fn read_num<T: std::str::FromStr>(&self, rel: &str) -> Option<T> {
        self.read(rel).and_then(|s| s.trim().parse().ok())
    }

    /// The last component of a symlink's target (a `driver` link names its driver this way).
    pub fn link_name(&self, rel: &str) -> Option<String> {
        std::fs::read_link(self.path(rel))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).exists()
    }

    /// Sorted names of the entries of a directory (empty when absent).
    pub fn list(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.path(rel))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Write a sysfs/procfs attribute. On a recorded tree, a file that lists choices with the
    /// current one in brackets (`none [mq-deadline] kyber`) keeps its list and moves the
    /// brackets, as the kernel's `queue/scheduler` does; and a scheduler switch resets the
    /// queue's `nr_requests`, as the kernel does (see [`RECORDED_QUEUE_DEPTH`]).
    pub fn write(&self, rel: &str, value: &str) -> io::Result<()> {
        let p = self.path(rel);
        if self.live {
            return std::fs::write(&p, value);
        }
        let old = std::fs::read_to_string(&p)?;
        if old.contains('[') {
            let choices: Vec<&str> = old
                .split_whitespace()
                .map(|w| w.trim_matches(|c| c == '[' || c == ']'))
                .collect();
            if !choices.contains(&value) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let line: Vec<String> = choices
                .iter()
                .map(|c| {
                    if *c == value {
                        format!("[{c}]")
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            std::fs::write(&p, format!("{} \n", line.join(" ")))?;
            if rel.ends_with("/queue/scheduler") && bracketed(&old) != value {
                let nr = p.with_file_name("nr_requests");
                if nr.exists() {
                    std::fs::write(nr, format!("{}\n", nr_requests_after_switch(value)))?;
                }
            }
            return Ok(());
        }
        std::fs::write(&p, format!("{value}\n"))
    }
}

/// The tag set depth a recorded disk is taken to have (a recorded tree does not say).
pub const RECORDED_QUEUE_DEPTH: u32 = 64;

/// What the kernel sets `nr_requests` to when a queue switches to `scheduler`: the tag set's
/// depth without a scheduler, twice the smaller of it and 128 (BLKDEV_DEFAULT_RQ) with one.
fn nr_requests_after_switch(scheduler: &str) -> u32 {
    if scheduler == "none" {
        RECORDED_QUEUE_DEPTH
    } else {
        2 * RECORDED_QUEUE_DEPTH.min(128)
    }
}

/// The current choice of a `a [b] c` attribute, or the whole trimmed value.
pub fn bracketed(s: &str) -> String {
    match (s.find('['), s.find(']')) {
        (Some(a), Some(b)) if a < b => s[a + 1..b].to_string(),
        _ => s.trim().to_string(),
    }
}

/// Parse a CPU list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    if b >= a && b - a < 4096 {
                        out.extend(a..=b);
                    }
                }
            }
            None => {
                if let Ok(a) = part.trim().parse() {
                    out.push(a);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_and_brackets() {
        assert_eq!(parse_cpu_list("0-3,8,10-11\n"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list(""), Vec::<u32>::new());
        assert_eq!(parse_cpu_list("5-2,x"), Vec::<u32>::new());
        assert_eq!(bracketed("none [mq-deadline] kyber bfq "), "mq-deadline");
        assert_eq!(bracketed("write back\n"), "write back");
    }

    #[test]
    fn recorded_trees_emulate_choice_attributes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("scheduler"), "none [mq-deadline] kyber\n").unwrap();
        let h = Host::new(d.path());
        assert!(!h.live);
        h.write("scheduler", "none").unwrap();
        assert_eq!(h.read("scheduler").unwrap(), "[none] mq-deadline kyber ");
        assert!(h.write("scheduler", "cfq").is_err());
    }

    #[test]
    fn recorded_trees_reset_nr_requests_on_a_scheduler_switch() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("sys/block/sda/queue");
        std::fs::create_dir_all(&q).unwrap();
        std::fs::write(q.join("scheduler"), "none [mq-deadline]\n").unwrap();
        std::fs::write(q.join("nr_requests"), "255\n").unwrap();
        let h = Host::new(d.path());
        h.write("sys/block/sda/queue/scheduler", "mq-deadline")
            .unwrap();
        assert_eq!(h.read("sys/block/sda/queue/nr_requests").unwrap(), "255");
        h.write("sys/block/sda/queue/scheduler", "none").unwrap();
        assert_eq!(h.read("sys/block/sda/queue/nr_requests").unwrap(), "64");
        h.write("sys/block/sda/queue/scheduler", "mq-deadline")
            .unwrap();
        assert_eq!(h.read("sys/block/sda/queue/nr_requests").unwrap(), "128");
    }
}
