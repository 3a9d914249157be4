//! Tampering is detected and never served; retention and gc keep every kept point intact.

mod common;

use common::*;
use ferry_chunk::ChunkId;
use ferry_repository::{RepoError, Repository, RetentionPolicy, RetentionTier};
use std::os::unix::fs::FileExt;
use std::time::Duration;

const BS: u32 = 4096;

/// Overwrite a chunk's stored bytes from `at` (as far as the blob goes), where they lie on disk.
fn overwrite(repo: &Repository, id: &ChunkId, at: u64, bytes: &[u8]) {
    let (file, off, len) = repo.chunk_location(id).unwrap().expect("chunk stored");
    let n = bytes.len().min(len as usize - at as usize);
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(&bytes[..n], off + at).unwrap();
}

fn flip_file(path: &std::path::Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

fn flip(repo: &Repository, id: &ChunkId, at: u64) {
    let (file, off, len) = repo.chunk_location(id).unwrap().expect("chunk stored");
    let at = at.min(len as u64 - 1);
    let mut b = [0u8];
    std::fs::File::open(file)
        .unwrap()
        .read_exact_at(&mut b, off + at)
        .unwrap();
    overwrite(repo, id, at, &[b[0] ^ 0x20]);
}

#[test]
fn flipped_and_swapped_chunks_are_reported_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 6 * BS as u64;
    let mut m = Model::new(size, BS);
    let (a, b) = (block(1, BS as usize), block(2, BS as usize));
    let mut w = repo.begin("d", meta(1, size, BS)).unwrap();
    put_full(&mut w, &mut m, 0, &a);
    put_full(&mut w, &mut m, 1, &b);
    put_full(&mut w, &mut m, 2, &block(3, BS as usize));
    w.commit().unwrap();
    let mut w = repo.begin("d", meta(2, size, BS)).unwrap();
    put_full(&mut w, &mut m, 3, &block(4, BS as usize));
    w.commit().unwrap();
    let mut w = repo.begin("d", meta(3, size, BS)).unwrap();
    put_full(&mut w, &mut m, 0, &block(5, BS as usize)); // a no longer used by point 3
    w.commit().unwrap();
    assert!(repo.verify().is_clean());

    let k = key();
    let (ida, idb) = (k.chunk_id(&a), k.chunk_id(&b));
    // Flip one byte of chunk a: used by points 1 and 2.
    flip(&repo, &ida, 40);
    // Put a's (intact, older) sealed content under b's name: a swap.
    let sealed_a = k.seal_chunk(&ida, &a);
    overwrite(&repo, &idb, 0, &sealed_a);

    let rep = repo.verify();
    assert_eq!(rep.bad.len(), 2, "{rep:?}");
    let bad_a = rep.bad.iter().find(|x| x.id == ida).expect("a reported");
    assert_eq!(bad_a.kind, "chunk");
    assert_eq!(
        bad_a.points,
        vec![("d".to_string(), 1), ("d".to_string(), 2)]
    );
    let bad_b = rep.bad.iter().find(|x| x.id == idb).expect("b reported");
    assert_eq!(bad_b.points.len(), 3);
    let json = serde_json::to_string(&rep).unwrap();
    assert!(json.contains(&ida.to_hex()));

    for seq in [1, 2] {
        let r = repo.reader("d", seq).unwrap();
        let mut buf = vec![0u8; BS as usize];
        assert!(matches!(r.read_at(0, &mut buf), Err(RepoError::BadChunk { id, .. }) if id == ida));
        // A read spanning a good and a bad block fails as a whole.
        let mut two = vec![0u8; 2 * BS as usize];
        assert!(r.read_at(BS as u64, &mut two).is_err());
        r.read_at(2 * BS as u64, &mut buf).unwrap();
        assert_eq!(buf, m.data[2 * BS as usize..3 * BS as usize]);
    }
    // Point 3 does not use a, but uses b.
    let r = repo.reader("d", 3).unwrap();
    let mut buf = vec![0u8; BS as usize];
    r.read_at(0, &mut buf).unwrap();
    assert!(r.read_at(BS as u64, &mut buf).is_err());
    // A writer patching over a bad chunk is refused too.
    let mut w = repo.begin("d", meta(4, size, BS)).unwrap();
    assert!(matches!(
        w.put_patch(1, &[(0, vec![1])]),
        Err(RepoError::BadChunk { .. })
    ));
    drop(w);
    // Missing chunk.
    repo.quarantine_chunk(&idb).unwrap();
    let rep = repo.verify();
    assert!(rep.bad.iter().any(|x| x.id == idb && x.reason == "missing"));
    assert!(matches!(
        r.read_at(BS as u64, &mut buf),
        Err(RepoError::MissingChunk(_))
    ));
}

#[test]
fn tampered_roots_and_pages_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * BS as u64;
    let mut m = Model::new(size, BS);
    let (pages_a, pages_b);
    {
        let repo = open(dir.path());
        let mut w = repo.begin("a", meta(1, size, BS)).unwrap();
        put_full(&mut w, &mut m, 0, &block(1, BS as usize));
        w.commit().unwrap();
        let mut w = repo.begin("a", meta(2, size, BS)).unwrap();
        put_full(&mut w, &mut m, 1, &block(2, BS as usize));
        w.commit().unwrap();
        pages_a = files_under(dir.path(), "maps");
        // Disk b: the same content at the same positions; its pages still differ from a's.
        let mut mb = Model::new(size, BS);
        let mut w = repo.begin("b", meta(1, size, BS)).unwrap();
        put_full(&mut w, &mut mb, 0, &block(1, BS as usize));
        put_full(&mut w, &mut mb, 1, &block(2, BS as usize));
        w.commit().unwrap();
        pages_b = files_under(dir.path(), "maps")
            .into_iter()
            .filter(|p| !pages_a.contains(p))
            .collect::<Vec<_>>();
        assert_eq!((pages_a.len(), pages_b.len()), (2, 1));
        assert!(repo.verify().is_clean());

        // Tamper with a root while open: the reader re-authenticates it.
        let root = dir.path().join("disks/a/points/00000000000000000001.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&root).unwrap()).unwrap();
        v["meta"]["journal_end"] = serde_json::json!(999);
        std::fs::write(&root, serde_json::to_vec(&v).unwrap()).unwrap();
        assert!(matches!(repo.reader("a", 1), Err(RepoError::Corrupt(_))));
        let rep = repo.verify();
        assert_eq!(rep.bad.len(), 1);
        assert_eq!(rep.bad[0].kind, "root");
        assert_eq!(rep.bad[0].points, vec![("a".to_string(), 1)]);
    }
    // Put one of a's leaf pages in place of b's (same position, other disk).
    std::fs::copy(&pages_a[1], &pages_b[0]).unwrap();
    let repo = open(dir.path());
    // The tampered root is no longer a point.
    assert_eq!(repo.points("a").unwrap().len(), 1);
    check_point(&repo, "a", 2, &m);
    let r = repo.reader("b", 1).unwrap();
    let mut buf = vec![0u8; 16];
    assert!(matches!(
        r.read_at(0, &mut buf),
        Err(RepoError::BadPage { .. })
    ));
    let rep = repo.verify();
    let page = rep
        .bad
        .iter()
        .find(|x| x.kind == "page")
        .expect("page reported");
    assert_eq!(page.points, vec![("b".to_string(), 1)]);

    // A flipped byte in a page of a.
    for p in &pages_a {
        flip_file(p, 30);
    }
    let repo2 = {
        drop(repo);
        open(dir.path())
    };
    let r = repo2.reader("a", 2).unwrap();
    assert!(r.read_at(0, &mut buf).is_err());
    assert!(repo2
        .verify()
        .bad
        .iter()
        .any(|x| x.kind == "page" && x.points == [("a".to_string(), 2)]));
}

#[test]
fn retention_keeps_the_expected_points_and_gc_keeps_them_readable() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 4 * BS as u64;
    let mut m = Model::new(size, BS);
    let mut models = Vec::new();
    let s = 1_000_000_000u64;
    // 20 points, t = 0, 100, ..., 1900 s; each rewrites one of 4 blocks.
    for i in 0..20u64 {
        let mut mt = meta(i + 1, size, BS);
        mt.created_unix_ns = i * 100 * s;
        let mut w = repo.begin("d", mt).unwrap();
        put_full(&mut w, &mut m, i % 4, &block(1000 + i, BS as usize));
        w.commit().unwrap();
        models.push(m.clone());
    }
    let policy = RetentionPolicy {
        keep_all_secs: 300,
        tiers: vec![RetentionTier {
            every_secs: 500,
            for_secs: 1000,
        }],
    };
    let deleted = repo
        .apply_retention("d", &policy, 2000 * s)
        .unwrap()
        .deleted;
    let kept: Vec<u64> = repo
        .points("d")
        .unwrap()
        .iter()
        .map(|p| p.meta.created_unix_ns / s)
        .collect();
    // keep-all: 1700..1900; tier (ages 300..1300] newest per 500-s bucket: 900 and 1400
    // (1500, 1600 lose to 1900 in their bucket); everything older is gone.
    assert_eq!(kept, [900, 1400, 1700, 1800, 1900]);
    assert_eq!(deleted.len(), 15);
    // The latest point survives even a policy that keeps nothing.
    let none = RetentionPolicy {
        keep_all_secs: 0,
        tiers: vec![],
    };
    // A point being served (live reader) is kept until the reader is dropped.
    let served = repo.reader("d", 10).unwrap();
    let del = repo.apply_retention("d", &none, 1_000_000 * s).unwrap();
    assert_eq!(del.deleted.len(), 3);
    assert_eq!(del.reading, [10]);
    assert_eq!(repo.points("d").unwrap().len(), 2);
    check_point(&repo, "d", 10, &models[9]);
    drop(served);
    let del = repo.apply_retention("d", &none, 1_000_000 * s).unwrap();
    assert_eq!(del.deleted, [10]);
    assert_eq!(repo.points("d").unwrap().len(), 1);
    let chunks_before = repo.chunk_count().unwrap();
    let g = repo.gc().unwrap();
    assert_eq!(g.points_marked, 1);
    assert_eq!(g.chunks_kept, 4);
    assert_eq!(g.chunks_removed as usize, chunks_before - 4);
    assert!(g.pages_removed > 0 && g.bytes_freed > 0);
    check_point(&repo, "d", 20, &models[19]);
    assert!(repo.verify().is_clean());
    assert!(matches!(repo.reader("d", 1), Err(RepoError::NotFound(_))));
    let _ = RetentionPolicy::default();
}

#[test]
fn gc_waits_for_an_open_writer_and_keeps_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 4 * BS as u64;
    let mut m = Model::new(size, BS);
    let mut w = repo.begin("d", meta(1, size, BS)).unwrap();
    put_full(&mut w, &mut m, 0, &block(1, BS as usize));
    w.commit().unwrap();
    let mut w = repo.begin("d", meta(2, size, BS)).unwrap();
    put_full(&mut w, &mut m, 1, &block(2, BS as usize)); // referenced by no root yet
    std::thread::scope(|sc| {
        let gc = sc.spawn(|| repo.gc());
        std::thread::sleep(Duration::from_millis(300));
        assert!(!gc.is_finished(), "gc must wait for the open writer");
        // The writer still works and commits; only then may gc run.
        put_full(&mut w, &mut m, 2, &block(3, BS as usize));
        w.commit().unwrap();
        let g = gc.join().unwrap().unwrap();
        assert_eq!(g.chunks_removed, 0);
        assert_eq!(g.points_marked, 2);
    });
    check_point(&repo, "d", 2, &m);
    // Once a gc holds the gate, a new writer waits for it rather than racing it.
    let mut w = repo.begin("d", meta(3, size, BS)).unwrap();
    put_full(&mut w, &mut m, 3, &block(4, BS as usize));
    w.commit().unwrap();
    check_point(&repo, "d", 3, &m);
    assert!(repo.verify().is_clean());
}

#[test]
fn retention_keeps_a_cut_of_the_whole_machine_when_a_disk_lacks_the_newest() {
    // Two disks of one machine, cuts at t = 0, 100, ..., 1900 s on both, except that disk b
    // lacks the cut at 1400 (the process server died while sending it). Tier: one point per
    // 500 s. In the bucket [1000, 1500) disk a's newest cut is 1400 and disk b's is 1300: both
    // must keep 1300, the newest cut both have, so that the machine can fail over to that time.
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 4 * BS as u64;
    let s = 1_000_000_000u64;
    for disk in ["a", "b"] {
        let mut m = Model::new(size, BS);
        let mut seq = 0;
        for i in 0..20u64 {
            if disk == "b" && i == 14 {
                continue;
            }
            seq += 1;
            let mut mt = meta(seq, size, BS);
            mt.created_unix_ns = i * 100 * s;
            mt.group_cut = Some(i * 100 * s);
            let mut w = repo.begin(disk, mt).unwrap();
            put_full(&mut w, &mut m, i % 4, &block(1000 + i, BS as usize));
            w.commit().unwrap();
        }
    }
    assert!(!repo.complete_cuts("a").contains(&(1400 * s)));
    assert!(repo.complete_cuts("b").contains(&(1300 * s)));
    let policy = RetentionPolicy {
        keep_all_secs: 300,
        tiers: vec![RetentionTier {
            every_secs: 500,
            for_secs: 1000,
        }],
    };
    let cuts = |disk: &str| -> Vec<u64> {
        repo.points(disk)
            .unwrap()
            .iter()
            .map(|p| p.meta.group_cut.unwrap() / s)
            .collect()
    };
    for disk in ["a", "b"] {
        repo.apply_retention(disk, &policy, 2000 * s).unwrap();
    }
    assert_eq!(cuts("b"), [900, 1300, 1700, 1800, 1900]);
    assert_eq!(
        cuts("a"),
        [900, 1300, 1700, 1800, 1900],
        "disk a kept its own 1400"
    );
    // Again, in the other order and later: still the same cuts on both.
    for disk in ["b", "a"] {
        repo.apply_retention(disk, &policy, 2000 * s).unwrap();
    }
    assert_eq!(cuts("a"), cuts("b"));
}
