//! Which recovery point a failover uses.

use crate::{FailoverError, Result};
use ferry_repository::{RecoveryPoint, Repository};

/// The newest point of `disk` created at or before `at_unix` (seconds), or the newest of all.
pub fn choose(repo: &Repository, disk: &str, at_unix: Option<u64>) -> Result<RecoveryPoint> {
    let points = repo.points(disk)?;
    let chosen = match at_unix {
        None => points.into_iter().max_by_key(|p| p.meta.seq),
        Some(t) => {
            let limit = t.saturating_mul(1_000_000_000).saturating_add(999_999_999);
            points
                .into_iter()
                .filter(|p| p.meta.created_unix_ns <= limit)
                .max_by_key(|p| p.meta.seq)
        }
    };
    chosen.ok_or_else(|| {
        FailoverError::Refused(match at_unix {
            None => format!("disk {disk} has no recovery point"),
            Some(t) => format!("disk {disk} has no recovery point at or before {t} (Unix seconds)"),
        })
    })
}
