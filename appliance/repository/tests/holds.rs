//! Holds keep points from retention (and their chunks from gc) across handles, processes'
//! views and reopening, until released; a hold is never placed on a point already deleted.

mod common;

use common::*;
use ferry_repository::{
    ExportFormat, HeldBack, HeldPoint, RepoError, Repository, RetentionPolicy, RetentionTier,
};
use std::path::Path;

const BS: u32 = 4096;
const S: u64 = 1_000_000_000;

/// Keeps nothing but the latest point (and held or served ones).
fn keep_nothing() -> RetentionPolicy {
    RetentionPolicy {
        keep_all_secs: 0,
        tiers: vec![],
    }
}

/// `n` points of disk `d`, t = 1..=n s, each rewriting all 4 blocks (so an old point's chunks
/// are named by no later point); the model of each.
fn write_points(repo: &Repository, n: u64) -> Vec<Model> {
    let size = 4 * BS as u64;
    let mut m = Model::new(size, BS);
    let mut models = Vec::new();
    for i in 1..=n {
        let mut w = repo.begin("d", meta(i, size, BS)).unwrap();
        for b in 0..4 {
            put_full(&mut w, &mut m, b, &block(i * 100 + b, BS as usize));
        }
        w.commit().unwrap();
        models.push(m.clone());
    }
    models
}

fn seqs(repo: &Repository) -> Vec<u64> {
    repo.points("d")
        .unwrap()
        .iter()
        .map(|p| p.meta.seq)
        .collect()
}

fn at(seq: u64) -> HeldPoint {
    HeldPoint {
        disk: "d".into(),
        seq,
    }
}

/// Export a point through `repo` and compare with the bytes written.
fn export_equals(repo: &Repository, seq: u64, m: &Model, out: &Path) {
    repo.export("d", seq, out, ExportFormat::Raw).unwrap();
    assert!(std::fs::read(out).unwrap() == m.data, "d@{seq} differs");
    std::fs::remove_file(out).unwrap();
}

#[test]
fn a_held_point_survives_retention_and_gc_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let img = out.path().join("p3.raw");
    let repo = open(dir.path());
    let models = write_points(&repo, 10);
    // The failover's view: a read-only handle beside the writer holds point 3.
    let ro = Repository::open_read_only(dir.path(), key()).unwrap();
    let h = ro
        .hold("job.acme.7", "test failover job 7 of plan dr", &[at(3)])
        .unwrap();
    assert_eq!(h.points, [at(3)]);
    let r = repo
        .apply_retention("d", &keep_nothing(), 1000 * S)
        .unwrap();
    assert_eq!(
        r.held,
        [HeldBack {
            seq: 3,
            holders: vec!["job.acme.7".into()]
        }]
    );
    assert_eq!(r.deleted, [1, 2, 4, 5, 6, 7, 8, 9]);
    assert_eq!(seqs(&repo), [3, 10]);
    let g = repo.gc().unwrap();
    assert!(g.chunks_removed >= 8 * 4, "{g:?}");
    // Its chunks survived collection: it exports byte for byte, through either handle.
    export_equals(&ro, 3, &models[2], &img);
    export_equals(&repo, 3, &models[2], &img);
    check_point(&repo, "d", 10, &models[9]);
    assert!(repo.verify().is_clean());
    assert_eq!(ro.holders("d").unwrap()[&3], ["job.acme.7"]);

    // Holds survive reopening (a restart of the master target and of the holder).
    drop((repo, ro));
    let repo = open(dir.path());
    let holds = repo.holds().unwrap();
    assert_eq!(holds.len(), 1);
    assert_eq!(holds[0].holder, "job.acme.7");
    assert_eq!(holds[0].reason, "test failover job 7 of plan dr");
    assert_eq!(holds[0].points, [at(3)]);
    let r = repo
        .apply_retention("d", &keep_nothing(), 2000 * S)
        .unwrap();
    assert!(r.deleted.is_empty() && r.held.len() == 1, "{r:?}");
    repo.gc().unwrap();
    export_equals(&repo, 3, &models[2], &img);

    // Released (by another read-only handle): the next retention removes it, gc its chunks.
    let ro = Repository::open_read_only(dir.path(), key()).unwrap();
    assert!(ro.release("job.acme.7").unwrap());
    assert!(!ro.release("job.acme.7").unwrap(), "released twice");
    assert!(repo.holds().unwrap().is_empty());
    let r = repo
        .apply_retention("d", &keep_nothing(), 3000 * S)
        .unwrap();
    assert_eq!((r.deleted.as_slice(), r.held.len()), ([3].as_slice(), 0));
    let g = repo.gc().unwrap();
    assert_eq!((g.points_marked, g.chunks_kept), (1, 4));
    assert!(matches!(repo.reader("d", 3), Err(RepoError::NotFound(_))));
    check_point(&repo, "d", 10, &models[9]);
}

#[test]
fn a_hold_names_existing_points_and_replaces_the_holders_last_one() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    write_points(&repo, 6);
    // The read-only handle is opened before point 2 goes: its list still shows it.
    let ro = Repository::open_read_only(dir.path(), key()).unwrap();
    let policy = RetentionPolicy {
        keep_all_secs: 0,
        tiers: vec![RetentionTier {
            every_secs: 2,
            for_secs: 100,
        }],
    };
    // Buckets of 2 s: 1 | 2,3 | 4,5 | 6: 2 and 4 lose to 3 and 5.
    let r = repo.apply_retention("d", &policy, 7 * S).unwrap();
    assert_eq!(r.deleted, [2, 4]);
    assert_eq!(
        ro.points("d").unwrap().len(),
        6,
        "the read-only view is older"
    );
    // A hold of a deleted point is refused whole: nothing is held.
    let e = ro
        .hold("job.acme.1", "unplanned", &[at(3), at(2)])
        .unwrap_err();
    assert!(matches!(e, RepoError::NotFound(_)), "{e}");
    assert!(ro.holds().unwrap().is_empty());
    // A holder's new hold replaces its old one; holders add up on one point.
    ro.hold("job.acme.1", "first", &[at(1), at(3)]).unwrap();
    ro.hold("job.acme.1", "second", &[at(5)]).unwrap();
    ro.hold("job.acme.2", "other", &[at(5), at(5)]).unwrap();
    let holds = repo.holds().unwrap();
    assert_eq!(holds.len(), 2);
    assert_eq!(
        (holds[0].reason.as_str(), &holds[0].points),
        ("second", &vec![at(5)])
    );
    assert_eq!(holds[1].points, [at(5)], "duplicates are merged");
    let r = repo.apply_retention("d", &keep_nothing(), 100 * S).unwrap();
    assert_eq!(r.deleted, [1, 3]);
    assert_eq!(
        r.held,
        [HeldBack {
            seq: 5,
            holders: vec!["job.acme.1".into(), "job.acme.2".into()]
        }]
    );
    // Bad input is refused, not written.
    for bad in ["", ".lock", "a/b", &"x".repeat(129)] {
        assert!(matches!(
            ro.hold(bad, "r", &[at(5)]),
            Err(RepoError::Invalid(_))
        ));
        assert!(ro.release(bad).is_err());
    }
    assert!(ro.hold("h", "line\nbreak", &[at(5)]).is_err());
    assert!(ro.hold("h", "none", &[]).is_err());
    assert_eq!(repo.holds().unwrap().len(), 2);
}

#[test]
fn a_hold_file_that_does_not_authenticate_holds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    write_points(&repo, 3);
    repo.hold("job.acme.3", "test", &[at(1)]).unwrap();
    let file = dir.path().join("holds").join("job.acme.3.json");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("\"seq\": 1"), "{text}");
    // Pointed at another point without the key: ignored, so it keeps neither.
    std::fs::write(&file, text.replace("\"seq\": 1", "\"seq\": 2")).unwrap();
    assert!(repo.holds().unwrap().is_empty());
    let r = repo.apply_retention("d", &keep_nothing(), 100 * S).unwrap();
    assert_eq!((r.deleted.as_slice(), r.held.len()), ([1, 2].as_slice(), 0));
}

/// Holders racing retention: every hold that succeeds keeps a point that still exists.
#[test]
fn holds_placed_while_retention_runs_never_lose_their_point() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let n = 60;
    write_points(&repo, n);
    let ro = Repository::open_read_only(dir.path(), key()).unwrap();
    let held: Vec<u64> = std::thread::scope(|sc| {
        // The holder tells when its first hold (the newest point but the latest) is placed, so
        // the race always has one hold in it however the two threads are scheduled.
        let (first, placed) = std::sync::mpsc::channel();
        let holder = sc.spawn(move || {
            (1..n)
                .rev()
                .filter(|&seq| {
                    let ok = ro
                        .hold(&format!("h{seq}"), "race", &[at(seq)])
                        .map(|_| true)
                        .unwrap_or_else(|e| {
                            assert!(matches!(e, RepoError::NotFound(_)), "{e}");
                            false
                        });
                    let _ = first.send(());
                    ok
                })
                .collect()
        });
        placed.recv().unwrap();
        // Retention a point at a time, oldest first, racing the holder coming down.
        for t in 2..=n {
            let policy = RetentionPolicy {
                keep_all_secs: n - t,
                tiers: vec![],
            };
            repo.apply_retention("d", &policy, n * S).unwrap();
        }
        holder.join().unwrap()
    });
    assert!(!held.is_empty());
    let left = seqs(&repo);
    for seq in &held {
        assert!(left.contains(seq), "held point {seq} was deleted");
        assert!(repo.reader("d", *seq).is_ok());
    }
    // Everything not held went (but the latest).
    assert_eq!(left.len(), held.len() + 1, "{left:?} {held:?}");
}
