//! Retention: thin a disk's points as they age (e.g. every second for an hour, every 5 minutes
//! for a day, hourly for two weeks).
//!
//! Why this rule: a point's fate must not flip-flop as time passes, or a point kept today could
//! have been the only survivor deleted yesterday. Points are bucketed by absolute time
//! (`created / every`), and in each bucket the NEWEST point of the bucket survives — counting
//! younger points in the same bucket that are still in a finer tier. So when the younger points
//! age into the tier, the survivor is the same one, and with nested intervals (300 s inside
//! 3600 s) the survivor of a coarse bucket is also the survivor of its fine bucket.
//! Application-consistent points are worth more than crash-consistent ones (a database starts
//! from them without recovery), so a bucket's survivor is its newest application-consistent
//! point when it has one. The rule stays stable and nested: a bucket's points are all known once
//! it is in the past, and the newest application-consistent point of a coarse bucket is also the
//! newest one of the fine bucket that holds it.
//! A point at a consistency-group cut is worth more still: the disks of one machine have points
//! at the same cuts (same `created_unix_ns`), and a disk's other points (a large checkpoint sent
//! in pieces, an application-consistent mark of one disk) would otherwise win a bucket on one
//! disk and not on the next, leaving no cut that every disk of the machine kept.
//! A cut that every disk of the group has a point at is worth more than one some disk lacks (a
//! process server that died while sending a cut delivers it to some disks only): otherwise the
//! disks that have the incomplete cut keep it as their bucket's newest, the others keep an older
//! cut, and the bucket holds no cut of the whole machine. A disk's group is every disk whose
//! points share a cut with it.
//! Points older than every tier are deleted. The latest point is never deleted.
//!
//! A point that someone holds (a test failover serving it, a failover materializing it; see
//! [`crate::holds`]) is kept whatever its age, until released.
//!
//! Deleting a point removes only its root; `gc` later frees what no point names.

use crate::holds;
use crate::root::root_path;
use crate::store::sync_dir;
use crate::{RepoError, Repository};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Every point younger than this is kept.
    pub keep_all_secs: u64,
    /// Consecutive age ranges after `keep_all_secs`: one point per `every_secs` for `for_secs`.
    pub tiers: Vec<RetentionTier>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RetentionTier {
    pub every_secs: u64,
    pub for_secs: u64,
}

impl Default for RetentionPolicy {
    /// Keep all for an hour, then one per 5 minutes for a day, then one per hour for 14 days.
    fn default() -> Self {
        RetentionPolicy {
            keep_all_secs: 3600,
            tiers: vec![
                RetentionTier {
                    every_secs: 300,
                    for_secs: 86_400,
                },
                RetentionTier {
                    every_secs: 3600,
                    for_secs: 14 * 86_400,
                },
            ],
        }
    }
}

const NS: u64 = 1_000_000_000;

/// The tiers of every disk of a repository: each machine's policy may name its own.
#[derive(Clone, Debug, Default)]
pub struct Retention {
    /// For disks `disks` does not name.
    pub default: RetentionPolicy,
    pub disks: HashMap<String, RetentionPolicy>,
}

impl Retention {
    pub fn for_disk(&self, disk: &str) -> &RetentionPolicy {
        self.disks.get(disk).unwrap_or(&self.default)
    }
}

impl RetentionPolicy {
    /// Which of `points` (seq, created_unix_ns, worth: [`worth`]) to delete at `now_unix_ns`.
    /// The point with the highest seq is always kept.
    pub fn select_deletions(&self, points: &[(u64, u64, u8)], now_unix_ns: u64) -> Vec<u64> {
        let Some(latest) = points.iter().map(|p| p.0).max() else {
            return Vec::new();
        };
        // The survivor per (tier, bucket) over ALL points, so younger ones count: the greatest
        // (worth, created, seq).
        let mut best: HashMap<(usize, u64), (u8, u64, u64)> = HashMap::new();
        for &(seq, created, app) in points {
            for (t, tier) in self.tiers.iter().enumerate() {
                if tier.every_secs == 0 {
                    continue;
                }
                let b = created / (tier.every_secs.saturating_mul(NS));
                let e = best.entry((t, b)).or_insert((app, created, seq));
                if (app, created, seq) > *e {
                    *e = (app, created, seq);
                }
            }
        }
        let mut out = Vec::new();
        for &(seq, created, _) in points {
            if seq == latest {
                continue;
            }
            let age = now_unix_ns.saturating_sub(created);
            if age <= self.keep_all_secs.saturating_mul(NS) {
                continue;
            }
            let mut upper = self.keep_all_secs.saturating_mul(NS);
            let mut keep = false;
            for (t, tier) in self.tiers.iter().enumerate() {
                upper = upper.saturating_add(tier.for_secs.saturating_mul(NS));
                if age <= upper {
                    keep = tier.every_secs == 0 || {
                        let b = created / (tier.every_secs.saturating_mul(NS));
                        best.get(&(t, b)).map(|e| e.2) == Some(seq)
                    };
                    break;
                }
            }
            if !keep {
                out.push(seq);
            }
        }
        out.sort_unstable();
        out
    }
}

/// How much a point is worth keeping in its bucket: at a cut every disk of its group has (4 + 2)
/// over at a cut some disk lacks (2) over application-consistent (1) over neither (0); the
/// bits add up. `complete`: the point's cut is in [`Repository::complete_cuts`] of its disk.
pub fn worth(meta: &crate::CheckpointMeta, complete: bool) -> u8 {
    let cut = meta.group_cut.is_some();
    (u8::from(cut && complete) << 2)
        | (u8::from(cut) << 1)
        | u8::from(meta.consistency == crate::Consistency::Application)
}

/// What a retention pass did to one disk.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Points deleted (their space is reclaimed by [`Repository::gc`]).
    pub deleted: Vec<u64>,
    /// Points the tiers would delete that a hold keeps, with their holders.
    pub held: Vec<HeldBack>,
    /// Points the tiers would delete that a live reader of this process is serving.
    pub reading: Vec<u64>,
}

/// A point kept because it is held.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldBack {
    pub seq: u64,
    pub holders: Vec<String>,
}

impl Repository {
    /// The consistency-group cuts of `disk` at which every disk of its group has a point. Its
    /// group: the disks with a point at any of its cuts (the disks of one machine share every
    /// cut; a disk never shares one with another machine's).
    pub fn complete_cuts(&self, disk: &str) -> HashSet<u64> {
        let disks = self.disks.lock().expect("disks");
        let cuts_of = |st: &crate::DiskState| -> HashSet<u64> {
            st.points
                .values()
                .filter_map(|r| r.point.meta.group_cut)
                .collect()
        };
        let Some(mine) = disks.get(disk).map(cuts_of) else {
            return HashSet::new();
        };
        let mut complete = mine.clone();
        for (name, st) in disks.iter() {
            if name == disk {
                continue;
            }
            let theirs = cuts_of(st);
            if theirs.is_disjoint(&mine) {
                continue;
            }
            complete.retain(|c| theirs.contains(c));
        }
        complete
    }

    /// Delete the points of `disk` that `policy` no longer keeps at `now_unix_ns`. Never
    /// deletes the latest point, a held point ([`Repository::hold`]) nor a point with a live
    /// [`crate::PointReader`]; the report says which points were kept for those reasons.
    /// Space is reclaimed by [`Repository::gc`].
    pub fn apply_retention(
        &self,
        disk: &str,
        policy: &RetentionPolicy,
        now_unix_ns: u64,
    ) -> Result<RetentionReport, RepoError> {
        self.writable()?;
        let complete = self.complete_cuts(disk);
        let points: Vec<(u64, u64, u8)> = self
            .points(disk)?
            .iter()
            .map(|p| {
                let whole = p.meta.group_cut.is_some_and(|c| complete.contains(&c));
                (p.meta.seq, p.meta.created_unix_ns, worth(&p.meta, whole))
            })
            .collect();
        let doomed = policy.select_deletions(&points, now_unix_ns);
        let mut report = RetentionReport::default();
        if doomed.is_empty() {
            return Ok(report);
        }
        let root = self.inner().store.root().to_path_buf();
        // Under the holds lock until the deletions are durable: a hold written after we read
        // the holds finds its point already gone (and is refused), never deleted under it.
        let _holds = holds::lock(&root)?;
        let held = holds::held_on(&holds::read_all(&self.inner().key, &root)?, disk);
        for &seq in &doomed {
            if let Some(holders) = held.get(&seq) {
                tracing::info!(disk, seq, ?holders, "retention keeps a held point");
                report.held.push(HeldBack {
                    seq,
                    holders: holders.clone(),
                });
                continue;
            }
            // A point being served (a live PointReader) is kept. Forget before deleting the
            // file: from here on no new reader is handed this point.
            {
                let pins = self.inner().pins.lock().expect("pins");
                if pins.contains_key(&(disk.to_string(), seq)) {
                    tracing::info!(disk, seq, "retention keeps a point that is being read");
                    report.reading.push(seq);
                    continue;
                }
                self.forget(disk, seq);
            }
            match std::fs::remove_file(root_path(&root, disk, seq)) {
                Ok(()) => report.deleted.push(seq),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.deleted.push(seq),
                Err(e) => return Err(e.into()),
            }
        }
        if !report.deleted.is_empty() {
            sync_dir(&crate::root::points_dir(&root, disk))?;
            tracing::info!(
                disk,
                deleted = report.deleted.len(),
                "retention deleted points"
            );
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The creation seconds of the points `del` leaves.
    fn kept_secs(pts: &[(u64, u64, u8)], del: &[u64]) -> Vec<u64> {
        pts.iter()
            .filter(|x| !del.contains(&x.0))
            .map(|x| x.1 / NS)
            .collect()
    }

    /// Keep all for 10 s, then one per 10 s for 100 s, then one per 100 s for 1000 s.
    fn policy() -> RetentionPolicy {
        RetentionPolicy {
            keep_all_secs: 10,
            tiers: vec![
                RetentionTier {
                    every_secs: 10,
                    for_secs: 100,
                },
                RetentionTier {
                    every_secs: 100,
                    for_secs: 1000,
                },
            ],
        }
    }

    #[test]
    fn tiers_keep_newest_per_bucket() {
        let p = policy();
        // One point per second from t=0 to t=2000 s; now = 2000 s.
        let pts: Vec<(u64, u64, u8)> = (0..=2000).map(|s| (s + 1, s * NS, 0)).collect();
        let del = p.select_deletions(&pts, 2000 * NS);
        let kept = kept_secs(&pts, &del);
        // Keep-all: ages 0..=10 → t 1990..=2000.
        for t in 1990..=2000 {
            assert!(kept.contains(&t), "{t}");
        }
        // Tier 1: ages (10, 110] → t 1890..1990: newest of each 10-s bucket, i.e. t%10==9.
        for t in 1890..1990 {
            assert_eq!(kept.contains(&t), t % 10 == 9, "{t}");
        }
        // Tier 2: ages (110, 1110] → t 890..1890: newest per 100-s bucket (t%100==99).
        for t in 890..1890 {
            assert_eq!(kept.contains(&t), t % 100 == 99, "{t}");
        }
        // Older than every tier: gone.
        assert!(kept.iter().all(|&t| t >= 890));
        // Stable: applying again later to the survivors never deletes a tier-2 survivor early.
        let pts2: Vec<(u64, u64, u8)> = pts
            .iter()
            .copied()
            .filter(|x| !del.contains(&x.0))
            .collect();
        let del2 = p.select_deletions(&pts2, 2000 * NS);
        assert!(del2.is_empty());
        // The latest point is kept even when ancient.
        assert!(p.select_deletions(&[(7, 0, 0)], u64::MAX).is_empty());
    }

    #[test]
    fn an_application_consistent_point_survives_its_bucket() {
        let p = policy();
        // One point per second; application-consistent at t = 1234 and 1503 (and t % 10 == 3
        // in 1900..2000, inside tier 1).
        let app = |t: u64| t == 1234 || t == 1503 || ((1900..2000).contains(&t) && t % 10 == 3);
        let pts: Vec<(u64, u64, u8)> = (0..=2000)
            .map(|s| (s + 1, s * NS, u8::from(app(s))))
            .collect();
        let del = p.select_deletions(&pts, 2000 * NS);
        let kept = kept_secs(&pts, &del);
        for t in 1900..1990 {
            assert_eq!(kept.contains(&t), t % 10 == 3, "tier 1, t {t}");
        }
        for t in 890..1890 {
            let survivor = match t / 100 {
                12 => t == 1234,
                15 => t == 1503,
                _ => t % 100 == 99,
            };
            assert_eq!(kept.contains(&t), survivor, "tier 2, t {t}");
        }
        // Stable: the survivors of today are the survivors of a later pass.
        let pts2: Vec<(u64, u64, u8)> = pts
            .iter()
            .copied()
            .filter(|x| !del.contains(&x.0))
            .collect();
        assert!(p.select_deletions(&pts2, 2000 * NS).is_empty());
    }
    #[test]
    fn two_disks_of_a_machine_keep_the_same_group_cuts() {
        let p = policy();
        // Group cuts every 7 s on both disks (same times). Disk a also has points of its own
        // in between (a big checkpoint sent in pieces), some application-consistent; disk b
        // has none. Each disk's survivors among the cuts must be the same cuts.
        let cuts: Vec<u64> = (0..=2000).filter(|t| t % 7 == 0).collect();
        let mut a: Vec<(u64, u64, u8)> = Vec::new();
        let mut b: Vec<(u64, u64, u8)> = Vec::new();
        for t in 0..=2000u64 {
            if t % 7 == 0 {
                a.push((a.len() as u64 + 1, t * NS, 2));
                b.push((b.len() as u64 + 1, t * NS, 2));
            } else if t % 3 == 0 {
                a.push((a.len() as u64 + 1, t * NS, u8::from(t % 2 == 0)));
            }
        }
        let kept_cuts = |pts: &[(u64, u64, u8)]| {
            let del = p.select_deletions(pts, 2000 * NS);
            let mut k: Vec<u64> = kept_secs(pts, &del)
                .into_iter()
                .filter(|t| cuts.contains(t))
                .collect();
            k.sort_unstable();
            k
        };
        let (ka, kb) = (kept_cuts(&a), kept_cuts(&b));
        assert_eq!(ka, kb, "both disks keep the same cuts");
        // Every tier-2 bucket (100 s) in the past still has a cut both disks kept.
        for bucket in 9..18u64 {
            assert!(
                ka.iter().any(|t| t / 100 == bucket),
                "no common cut kept in bucket {bucket}"
            );
        }
    }

    #[test]
    fn a_cut_one_disk_lacks_does_not_win_its_bucket() {
        let p = policy();
        // Cuts every 7 s on disk a; disk b lacks the last cut of every 100-s bucket (a process
        // server died while sending it). Worth as `apply_retention` gives it: 6 for a cut both
        // disks have, 2 for one that b lacks.
        let lacks = |t: u64| t % 100 >= 93;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for t in (0..=2000u64).filter(|t| t % 7 == 0) {
            let whole = !lacks(t);
            a.push((a.len() as u64 + 1, t * NS, if whole { 6 } else { 2 }));
            if whole {
                b.push((b.len() as u64 + 1, t * NS, 6));
            }
        }
        let kept = |pts: &[(u64, u64, u8)]| kept_secs(pts, &p.select_deletions(pts, 2000 * NS));
        let (ka, kb) = (kept(&a), kept(&b));
        for bucket in 9..18u64 {
            let common = ka.iter().any(|t| t / 100 == bucket && kb.contains(t));
            assert!(
                common,
                "no cut of the whole machine kept in bucket {bucket}"
            );
        }
        // Without the completeness bit, the same points leave buckets with no common cut.
        let flat: Vec<(u64, u64, u8)> = a.iter().map(|&(q, c, _)| (q, c, 2)).collect();
        let kf = kept(&flat);
        assert!((9..18u64).any(|bk| !kf.iter().any(|t| t / 100 == bk && kb.contains(t))));
    }
}
