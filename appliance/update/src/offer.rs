//! Whether a bundle offered to the appliance (on update media, or to `ferry update apply`) is
//! worth installing, decided from its signed manifest alone, before any part is hashed and before
//! anything is written.
//!
//! In order: a bundle whose root is the running one is running; one recorded as installed before
//! is not installed again; then its version is compared with the running image's `IMAGE_VERSION`
//! ([`crate::version::compare`], systemd-boot's own order). Only a newer version is an update.
//! An older one is a downgrade, refused unless the operator asks for it (`ferry update apply
//! --allow-downgrade`; update media never downgrade), as Chrome OS and Bottlerocket refuse
//! rollbacks: an old image may carry the very flaw an update fixed. An equal version is the
//! running one, whatever its root hash.

use crate::record::{Install, InstalledRecord};
use crate::version;
use std::cmp::Ordering;

/// The running image, as far as an offer is concerned.
#[derive(Clone, Debug)]
pub struct Running {
    pub roothash: String,
    /// `IMAGE_VERSION` of the running root; `None` when it cannot be read.
    pub version: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Its root is the running root.
    Running,
    /// Recorded as installed before (it runs, waits in the other slot, or failed).
    InstalledBefore(Install),
    /// Another root of the running version.
    SameVersion,
    /// Older than the running version: a downgrade.
    Older { running: String },
    /// The running version is unknown: newer or older cannot be told.
    UnknownRunningVersion,
    /// Newer than the running version: an update.
    Newer,
}

/// Judge an offered bundle's (version, root hash) against the running image and the record.
pub fn judge(
    version: &str,
    roothash: &str,
    running: &Running,
    record: &InstalledRecord,
) -> std::io::Result<Verdict> {
    if roothash == running.roothash {
        return Ok(Verdict::Running);
    }
    if let Some(i) = record.find(roothash)? {
        return Ok(Verdict::InstalledBefore(i));
    }
    let Some(current) = &running.version else {
        return Ok(Verdict::UnknownRunningVersion);
    };
    Ok(match version::compare(version, current) {
        Ordering::Greater => Verdict::Newer,
        Ordering::Equal => Verdict::SameVersion,
        Ordering::Less => Verdict::Older {
            running: current.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "0123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210";
    const NEW: &str = "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd";

    #[test]
    fn verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let record = InstalledRecord {
            path: dir.path().join("installed"),
        };
        let running = Running {
            roothash: RUN.into(),
            version: Some("2.9".into()),
        };
        let v = |version: &str, hash: &str| judge(version, hash, &running, &record).unwrap();
        assert_eq!(v("3.0", RUN), Verdict::Running);
        assert_eq!(v("2.10", NEW), Verdict::Newer);
        assert_eq!(v("2.09", NEW), Verdict::SameVersion);
        assert_eq!(
            v("2.8.99", NEW),
            Verdict::Older {
                running: "2.9".into()
            }
        );
        record.add(NEW, "2.10", 'b', "apply x").unwrap();
        assert!(matches!(v("2.10", NEW), Verdict::InstalledBefore(i) if i.version == "2.10"));
        let unknown = Running {
            roothash: RUN.into(),
            version: None,
        };
        let other = NEW.replace('a', "e");
        assert_eq!(
            judge("9", &other, &unknown, &record).unwrap(),
            Verdict::UnknownRunningVersion
        );
    }
}
