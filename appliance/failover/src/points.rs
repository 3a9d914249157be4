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

/// The points chosen for one machine's disks.
#[derive(Clone, Debug)]
pub struct MachinePoints {
    /// In the order of the machine's disks.
    pub points: Vec<RecoveryPoint>,
    /// The machine's disks were cut together (a consistency group) and every point is at the
    /// same cut: one crash-consistent state of the machine. Always true for a single disk.
    pub consistent: bool,
}

/// The points of one machine's `disks`: the newest consistency-group cut (at or before
/// `at_unix`) that every disk has a point at; when the disks have no such cut in common
/// (disks not cut as a group, or not yet), each disk's newest point ([`choose`]), said so.
pub fn choose_machine(
    repo: &Repository,
    disks: &[String],
    at_unix: Option<u64>,
) -> Result<MachinePoints> {
    if disks.len() > 1 {
        let limit = at_unix.map(|t| t.saturating_mul(1_000_000_000).saturating_add(999_999_999));
        let mut common: Option<std::collections::BTreeMap<u64, Vec<RecoveryPoint>>> = None;
        for d in disks {
            let mut cuts: std::collections::BTreeMap<u64, RecoveryPoint> = Default::default();
            for p in repo.points(d)? {
                if let Some(cut) = p.meta.group_cut {
                    if limit.is_none_or(|l| p.meta.created_unix_ns <= l) {
                        cuts.insert(cut, p);
                    }
                }
            }
            common = Some(match common {
                None => cuts.into_iter().map(|(c, p)| (c, vec![p])).collect(),
                Some(mut acc) => {
                    acc.retain(|c, _| cuts.contains_key(c));
                    for (c, v) in acc.iter_mut() {
                        v.push(cuts.remove(c).expect("retained cuts exist"));
                    }
                    acc
                }
            });
        }
        if let Some((_, points)) = common.and_then(|c| c.into_iter().next_back()) {
            return Ok(MachinePoints {
                points,
                consistent: true,
            });
        }
    }
    Ok(MachinePoints {
        points: disks
            .iter()
            .map(|d| choose(repo, d, at_unix))
            .collect::<Result<Vec<_>>>()?,
        consistent: disks.len() <= 1,
    })
}

/// Choose the points of each machine's disks (as [`choose_machine`]) and hold them all for
/// `holder`, so that the master target's retention keeps them (and their chunks) until
/// [`release`]. Replaces what `holder` held before, so running it again (a resumed job) leaks
/// nothing. Durable when it returns. Blocks while a retention pass decides (a short while).
pub fn choose_and_hold(
    site: &Site,
    holder: &str,
    reason: &str,
    machines: &[Vec<String>],
    at_unix: Option<u64>,
) -> Result<Vec<MachinePoints>> {
    let mut last = None;
    for _ in 0..HOLD_ATTEMPTS {
        // A fresh handle each time: it lists the points committed (and not deleted) by now.
        let repo = site.repository()?;
        let chosen = machines
            .iter()
            .map(|disks| choose_machine(&repo, disks, at_unix))
            .collect::<Result<Vec<_>>>()?;
        let held: Vec<HeldPoint> = chosen
            .iter()
            .flat_map(|m| &m.points)
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
                    group_cut: None,
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
        // Two machines of one disk each.
        let disks = [vec!["a".to_string()], vec!["b".to_string()]];
        let chosen = choose_and_hold(&site, "job.t.1", "test", &disks, Some(2)).unwrap();
        assert!(chosen.iter().all(|m| m.consistent));
        let seqs: Vec<(&str, u64)> = chosen
            .iter()
            .flat_map(|m| &m.points)
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
    #[test]
    fn a_machine_gets_the_newest_cut_every_disk_has() {
        let dir = tempfile::tempdir().unwrap();
        let key = ferry_chunk::TenantKey::from_secret(&[5; 32]);
        let repo = Repository::open(&dir.path().join("repo"), key).unwrap();
        // (seq, created s, group cut): b misses the cut at 30 s, a has a point of its own.
        type Points<'a> = &'a [(u64, u64, bool)];
        let plan: [(&str, Points); 3] = [
            (
                "a",
                &[(1, 10, true), (2, 15, false), (3, 20, true), (4, 30, true)],
            ),
            ("b", &[(1, 10, true), (2, 20, true), (3, 25, false)]),
            ("c", &[(1, 12, false)]),
        ];
        for (disk, pts) in plan {
            for &(seq, t, cut) in pts {
                let meta = CheckpointMeta {
                    seq,
                    created_unix_ns: t * S,
                    journal_start: seq - 1,
                    journal_end: seq,
                    disk_size: 65536,
                    block_size: 65536,
                    consistency: Consistency::Crash,
                    group_cut: cut.then_some(t * S),
                };
                let mut w = repo.begin(disk, meta).unwrap();
                w.put_patch(0, &[(0, vec![seq as u8; 16])]).unwrap();
                w.commit().unwrap();
            }
        }
        let ab = ["a".to_string(), "b".to_string()];
        let seqs = |m: &MachinePoints| m.points.iter().map(|p| p.meta.seq).collect::<Vec<_>>();
        let m = choose_machine(&repo, &ab, None).unwrap();
        assert!(m.consistent);
        assert_eq!(seqs(&m), [3, 2], "the cut at 20 s, not each disk's newest");
        let m = choose_machine(&repo, &ab, Some(19)).unwrap();
        assert_eq!((m.consistent, seqs(&m)), (true, vec![1, 1]));
        // No cut in common before 10 s: each disk's newest, and said so.
        let m = choose_machine(&repo, &ab, Some(9));
        assert!(m.is_err(), "nothing at or before 9 s");
        // c was never cut with a: each disk's newest, not consistent.
        let m = choose_machine(&repo, &["a".to_string(), "c".to_string()], None).unwrap();
        assert_eq!((m.consistent, seqs(&m)), (false, vec![4, 1]));
        let m = choose_machine(&repo, &["a".to_string(), "d".to_string()], None);
        assert!(m.is_err(), "d has no point");
        let one = choose_machine(&repo, &["b".to_string()], None).unwrap();
        assert_eq!((one.consistent, seqs(&one)), (true, vec![3]));
    }
}
