//! The record of bundles installed on this appliance (`/var/lib/ferry-update/installed`), by
//! update media or by `ferry update apply` alike. One line per install, fields separated by one
//! space:
//!
//! ```text
//! <roothash> <version> <slot> <unix seconds> <source...>
//! ```
//!
//! `source` (the rest of the line) says where the bundle came from: `media NAME (DEVICE@OFFSET)`
//! or `apply PATH`. Lines written before the last three fields existed (`<roothash> <version>`)
//! are read as installs of unknown slot, time and source. Update media is read at every boot
//! and may stay attached: a bundle recorded here is never installed from media again, whether its
//! slot booted or fell back.

use std::io::{self, Write};
use std::path::PathBuf;

pub struct InstalledRecord {
    pub path: PathBuf,
}

/// One recorded install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    pub roothash: String,
    pub version: String,
    pub slot: Option<char>,
    /// Seconds since the Unix epoch, by the appliance's clock at the time.
    pub at: Option<u64>,
    pub source: Option<String>,
}

impl Install {
    fn parse(line: &str) -> Option<Install> {
        let mut f = line.splitn(5, ' ');
        let roothash = f.next().filter(|h| !h.is_empty())?.to_string();
        let version = f.next()?.to_string();
        let slot = f
            .next()
            .and_then(|s| s.chars().next())
            .filter(|c| matches!(c, 'a' | 'b'));
        let at = f.next().and_then(|t| t.parse().ok());
        let source = f.next().map(str::to_string);
        Some(Install {
            roothash,
            version,
            slot,
            at,
            source,
        })
    }
}

impl InstalledRecord {
    /// Every recorded install, oldest first; a missing record is an empty one.
    pub fn installs(&self) -> io::Result<Vec<Install>> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => Ok(text.lines().filter_map(Install::parse).collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// The newest install of this root hash.
    pub fn find(&self, roothash: &str) -> io::Result<Option<Install>> {
        Ok(self
            .installs()?
            .into_iter()
            .rev()
            .find(|i| i.roothash == roothash))
    }

    pub fn contains(&self, roothash: &str) -> io::Result<bool> {
        Ok(self.find(roothash)?.is_some())
    }

    pub fn last(&self) -> io::Result<Option<Install>> {
        Ok(self.installs()?.pop())
    }

    /// Append an install, now, and make it durable.
    pub fn add(&self, roothash: &str, version: &str, slot: char, source: &str) -> io::Result<()> {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // One line per install, whatever a path holds.
        let source: String = source
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(f, "{roothash} {version} {slot} {at} {source}")?;
        f.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210";

    #[test]
    fn the_installed_record_remembers_root_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let r = InstalledRecord {
            path: dir.path().join("sub/installed"),
        };
        assert!(!r.contains(H).unwrap());
        assert_eq!(r.last().unwrap(), None);
        r.add(H, "1.0", 'b', "media FERRY.BUN (/dev/sr0@34816)")
            .unwrap();
        r.add(&H.replace('0', "1"), "1.1", 'a', "apply /tmp/a\nb.bundle")
            .unwrap();
        assert!(r.contains(H).unwrap());
        assert!(!r.contains(&H[..60]).unwrap());
        let first = r.find(H).unwrap().unwrap();
        assert_eq!(first.version, "1.0");
        assert_eq!(first.slot, Some('b'));
        assert_eq!(
            first.source.as_deref(),
            Some("media FERRY.BUN (/dev/sr0@34816)")
        );
        assert!(first.at.unwrap() > 1_700_000_000);
        let last = r.last().unwrap().unwrap();
        assert_eq!(
            (last.version.as_str(), last.source.as_deref()),
            ("1.1", Some("apply /tmp/a b.bundle"))
        );
        assert_eq!(std::fs::read_to_string(&r.path).unwrap().lines().count(), 2);
    }

    #[test]
    fn lines_of_the_first_format_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let r = InstalledRecord {
            path: dir.path().join("installed"),
        };
        std::fs::write(&r.path, format!("{H} 2026.11.30.1\n\n")).unwrap();
        let i = r.find(H).unwrap().unwrap();
        assert_eq!(
            i,
            Install {
                roothash: H.into(),
                version: "2026.11.30.1".into(),
                slot: None,
                at: None,
                source: None
            }
        );
    }
}
