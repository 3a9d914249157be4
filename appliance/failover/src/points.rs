//! Which recovery point a failover uses, and holding it while the failover uses it.
//!
//! The configuration server reaches the repository through read-only handles while the master
//! target keeps applying retention; a point a job uses is held (a durable file in the
//! repository, see `ferry_repository::Hold`) from before the job uses it until the job (or, for
//! a test failover, its cleanup) releases it.

use crate::{FailoverError, Result, Site};
use ferry_repository::{HeldPoint, Hold, RecoveryPoint, RepoError, Repository};

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

/// How many times a choice is made again when retention deleted a chosen point between the
/// choice and the hold (each time the newest point at or before the time is another one).
const HOLD_ATTEMPTS: usize = 5;

/// Choose the point of each of `disks` (as [`choose`]) and hold them all for `holder`, so that
/// the master target's retention keeps them (and their chunks) until [`release`]. Replaces
/// what `holder` held before, so running it again (a resumed job) leaks nothing. Durable when
/// it returns. Blocks while a retention pass decides (a short while).
pub fn choose_and_hold(
    site: &Site,
    holder: &str,
    reason: &str,
    disks: &[String],
    at_unix: Option<u64>,
) -> Result<Vec<RecoveryPoint>> {
    let mut last = None;
    for _ in 0..HOLD_ATTEMPTS {
        // A fresh handle each time: it lists the points committed (and not deleted) by now.
        let repo = site.repository()?;
        let chosen = disks
            .iter()
            .map(|d| choose(&repo, d, at_unix))
            .collect::<Result<Vec<_>>>()?;
        let held: Vec<HeldPoint> = chosen
            .iter()
            .map(|p| HeldPoint {
                disk: p.disk.clone(),
                seq: p.meta.seq,
            })
            .collect();
        match repo.hold(holder, reason, &held) {
            Ok(_) => return Ok(chosen),
            Err(e @ RepoError::NotFound(_)) => {
                tracing::info!(holder, error = %e, "a chosen point went meanwhile; choosing again");
                last = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(FailoverError::Repo(last.expect("attempted at least once")))
}

/// Release what `holder` holds; false when it held nothing.
pub fn release(site: &Site, holder: &str) -> Result<bool> {
    Ok(site.repository()?.release(holder)?)
}

/// Every hold on the site's repository.
pub fn holds(site: &Site) -> Result<Vec<Hold>> {
    Ok(site.repository()?.holds()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_repository::{CheckpointMeta, Consistency, RetentionPolicy};

    const S: u64 = 1_000_000_000;

    /// A site whose repository has points 1..=5 of disks a and b (created at t = seq s).
    fn site(dir: &std::path::Path) -> (Site, Repository) {
        let key = ferry_chunk::TenantKey::from_secret(&[5; 32]);
        let key_file = dir.join("tenant.key");
        std::fs::write(&key_file, hex(&[5; 32])).unwrap();
        let repo = Repository::open(&dir.join("repo"), key).unwrap();
        for disk in ["a", "b"] {
            for seq in 1..=5u64 {
                let meta = CheckpointMeta {
                    seq,
                    created_unix_ns: seq * S,
                    journal_start: seq - 1,
                    journal_end: seq,
                    disk_size: 65536,
                    block_size: 65536,
                    consistency: Consistency::Crash,
                };
                let mut w = repo.begin(disk, meta).unwrap();
                w.put_patch(0, &[(0, vec![seq as u8; 16])]).unwrap();
                w.commit().unwrap();
            }
        }
        let site = Site {
            repo: dir.join("repo"),
            key: key_file,
            work: dir.join("work"),
            process_cache: None,
        };
        (site, repo)
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn chosen_points_are_held_beside_the_master_target_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let (site, master) = site(dir.path());
        let disks = ["a".to_string(), "b".to_string()];
        let chosen = choose_and_hold(&site, "job.t.1", "test", &disks, Some(2)).unwrap();
        let seqs: Vec<(&str, u64)> = chosen
            .iter()
            .map(|p| (p.disk.as_str(), p.meta.seq))
            .collect();
        assert_eq!(seqs, [("a", 2), ("b", 2)]);
        let none = RetentionPolicy {
            keep_all_secs: 0,
            tiers: vec![],
        };
        for d in ["a", "b"] {
            let r = master.apply_retention(d, &none, 100 * S).unwrap();
            assert_eq!(
                (r.deleted.as_slice(), r.held.len()),
                ([1, 3, 4].as_slice(), 1)
            );
        }
        // Choosing again (a resumed job) replaces the hold: nothing leaks.
        choose_and_hold(&site, "job.t.1", "test", &disks[..1], None).unwrap();
        let h = holds(&site).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(
            h[0].points,
            [HeldPoint {
                disk: "a".into(),
                seq: 5
            }]
        );
        let r = master.apply_retention("b", &none, 100 * S).unwrap();
        assert_eq!(r.deleted, [2]);
        // Nothing of b at or before 2 s is left: refused clearly, nothing held.
        let e = choose_and_hold(&site, "job.t.2", "test", &disks[1..], Some(2)).unwrap_err();
        assert!(
            e.to_string().contains("no recovery point at or before 2"),
            "{e}"
        );
        assert_eq!(holds(&site).unwrap().len(), 1);
        assert!(release(&site, "job.t.1").unwrap());
        assert!(holds(&site).unwrap().is_empty());
        assert_eq!(
            master.apply_retention("a", &none, 100 * S).unwrap().deleted,
            [2]
        );
    }
}
