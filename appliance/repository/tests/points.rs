//! Writing checkpoints and reading every point back byte for byte; dedup; export; ordering.

mod common;

use common::*;
use ferry_repository::{ExportFormat, RepoError, Repository, TenantKey};
use std::os::unix::fs::MetadataExt;
use std::process::Command;

const BS: u32 = 4096;

/// Several checkpoints with full, zero, patched and short blocks, disk growth across a tree
/// level, an empty checkpoint; every point reads back exactly, also after reopening.
#[test]
fn every_point_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size1 = 10 * BS as u64 + 1000; // short last block (index 10)
    let mut m = Model::new(size1, BS);
    let mut models = Vec::new();

    // 1: full blocks, a zero block, patches, the short last block.
    let mut w = repo.begin("vm1-disk0", meta(1, size1, BS)).unwrap();
    for i in 0..6 {
        put_full(&mut w, &mut m, i, &block(i, BS as usize));
    }
    put_zero(&mut w, &mut m, 6);
    put_patch(
        &mut w,
        &mut m,
        7,
        &[(3, MARKER.to_vec()), (4000, vec![0xAB; 96])],
    );
    put_full(&mut w, &mut m, 10, &block(100, 1000));
    let p = w.commit().unwrap();
    assert_eq!(p.changed_blocks, 9);
    assert!(p.stored_bytes > 0);
    models.push((1, m.clone()));

    // 2: overwrite, zero a data block, patch over the previous point, patch twice, patch the
    // short block, a chunk that is all zero (becomes a hole).
    let mut w = repo.begin("vm1-disk0", meta(2, size1, BS)).unwrap();
    put_full(&mut w, &mut m, 1, &block(11, BS as usize));
    put_zero(&mut w, &mut m, 2);
    put_patch(&mut w, &mut m, 3, &[(1, vec![9; 10]), (4095, vec![7])]);
    put_full(&mut w, &mut m, 8, &block(18, BS as usize));
    put_patch(&mut w, &mut m, 8, &[(100, vec![0; 50])]);
    put_patch(&mut w, &mut m, 8, &[(120, MARKER.to_vec())]);
    put_patch(&mut w, &mut m, 10, &[(990, vec![5; 10])]);
    put_full(&mut w, &mut m, 9, &vec![0u8; BS as usize]);
    // Zeroing every byte of a block by patch turns it into a hole.
    let z = vec![0u8; BS as usize];
    put_patch(&mut w, &mut m, 4, &[(0, z.clone())]);
    assert!(
        w.put_patch(10, &[(999, vec![1, 2])]).is_err(),
        "extent past the short block"
    );
    assert!(w.put_zero(11).is_err(), "block past the disk");
    w.commit().unwrap();
    models.push((2, m.clone()));

    // 3: grow the disk past one leaf page (tree gains a level); reuse a stored chunk by id.
    let size3 = 1100 * BS as u64;
    m.data.resize(size3 as usize, 0);
    let mut w = repo.begin("vm1-disk0", meta(3, size3, BS)).unwrap();
    let k = key();
    let reuse = block(0, BS as usize);
    w.put_chunk(1050, k.chunk_id(&reuse), None).unwrap();
    m.data[1050 * BS as usize..1051 * BS as usize].copy_from_slice(&reuse);
    put_full(&mut w, &mut m, 1099, &block(1099, BS as usize));
    put_patch(&mut w, &mut m, 0, &[(2, vec![3; 3])]);
    let p = w.commit().unwrap();
    assert!(p.stored_bytes > 0);
    assert_eq!(p.changed_blocks, 3);
    models.push((3, m.clone()));

    // 4: nothing changed. 5: only a block in the new region.
    repo.begin("vm1-disk0", meta(4, size3, BS))
        .unwrap()
        .commit()
        .unwrap();
    models.push((4, m.clone()));
    let mut w = repo.begin("vm1-disk0", meta(5, size3, BS)).unwrap();
    put_patch(&mut w, &mut m, 1024, &[(17, MARKER.to_vec())]);
    w.commit().unwrap();
    models.push((5, m.clone()));

    for (seq, model) in &models {
        check_point(&repo, "vm1-disk0", *seq, model);
    }
    let pts = repo.points("vm1-disk0").unwrap();
    assert_eq!(
        pts.iter().map(|p| p.meta.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert_eq!(repo.latest("vm1-disk0").unwrap().meta.seq, 5);
    let info = repo.disks();
    assert_eq!(info.len(), 1);
    assert_eq!((info[0].points, info[0].disk_size), (5, size3));

    // The marker (block data) never appears in any file of the repository.
    for f in all_files(dir.path()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "plaintext marker found in {}",
            f.display()
        );
    }
    let report = repo.verify();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.points_checked, 5);

    drop(repo);
    let repo = open(dir.path());
    for (seq, model) in &models {
        check_point(&repo, "vm1-disk0", *seq, model);
    }
    // A reader outlives the repository handle and moves to another thread.
    let r = repo.reader("vm1-disk0", 5).unwrap();
    drop(repo);
    let want = models[4].1.data[..8192].to_vec();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        r.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, want);
        assert!(r.read_at(r.size() - 1, &mut [0u8; 2]).is_err());
    })
    .join()
    .unwrap();
}

#[test]
fn identical_blocks_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 8 * BS as u64;
    let data = block(7, BS as usize);
    let mut ma = Model::new(size, BS);
    let mut mb = Model::new(size, BS);
    let mut w = repo.begin("a", meta(1, size, BS)).unwrap();
    for i in 0..4 {
        put_full(&mut w, &mut ma, i, &data);
    }
    let pa = w.commit().unwrap();
    let mut w = repo.begin("b", meta(1, size, BS)).unwrap();
    put_full(&mut w, &mut mb, 5, &data);
    let pb = w.commit().unwrap();
    let mut w = repo.begin("a", meta(2, size, BS)).unwrap();
    put_full(&mut w, &mut ma, 7, &data);
    let pa2 = w.commit().unwrap();
    assert!(pa.stored_bytes > 0);
    assert_eq!((pb.stored_bytes, pa2.stored_bytes), (0, 0));
    assert_eq!(repo.chunk_count().unwrap(), 1);
    assert!(repo.has_chunk(&key().chunk_id(&data)));
    check_point(&repo, "a", 2, &ma);
    check_point(&repo, "b", 1, &mb);
}

fn qemu_compare(a: &std::path::Path, fa: &str, b: &std::path::Path, fb: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-q", "-f", fa, "-F", fb])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img compare: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn export_raw_and_qcow2_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 300 * 65536 + 12345;
    let bs = 65536;
    let mut m = Model::new(size, bs);
    let mut w = repo.begin("d", meta(1, size, bs)).unwrap();
    for i in [0u64, 1, 50, 150, 299, 300] {
        let data = block(i, m.block_len(i));
        put_full(&mut w, &mut m, i, &data);
    }
    put_patch(&mut w, &mut m, 77, &[(100, vec![1; 1000])]);
    w.commit().unwrap();
    let model = out.path().join("model.raw");
    std::fs::write(&model, &m.data).unwrap();

    let raw = out.path().join("d.raw");
    repo.export("d", 1, &raw, ExportFormat::Raw).unwrap();
    assert_eq!(std::fs::read(&raw).unwrap(), m.data);
    let md = std::fs::metadata(&raw).unwrap();
    assert!(md.blocks() * 512 < size / 4, "raw export is sparse");
    qemu_compare(&model, "raw", &raw, "raw");

    let q = out.path().join("d.qcow2");
    repo.export("d", 1, &q, ExportFormat::Qcow2).unwrap();
    qemu_compare(&model, "raw", &q, "qcow2");
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(matches!(
        repo.export("d", 9, &q, ExportFormat::Raw),
        Err(RepoError::NotFound(_))
    ));
}

#[test]
fn ordering_sizes_and_keys_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let size = 4 * BS as u64;
    repo.begin("d", meta(5, size, BS))
        .unwrap()
        .commit()
        .unwrap();
    // seq must grow, and the journal must continue where the latest point ended.
    for bad in [meta(5, size, BS), meta(4, size, BS)] {
        assert!(matches!(
            repo.begin("d", bad),
            Err(RepoError::OutOfOrder {
                expected_seq: 6,
                ..
            })
        ));
    }
    let mut gap = meta(6, size, BS);
    gap.journal_start = 61; // latest ended at 60
    assert!(matches!(
        repo.begin("d", gap),
        Err(RepoError::OutOfOrder { .. })
    ));
    assert!(matches!(
        repo.begin("d", meta(6, size, 8192)),
        Err(RepoError::Invalid(_))
    ));
    assert!(matches!(
        repo.begin("d", meta(6, size - 1, BS)),
        Err(RepoError::Invalid(_))
    ));
    assert!(matches!(
        repo.begin("../x", meta(1, size, BS)),
        Err(RepoError::Invalid(_))
    ));
    let mut m6 = meta(6, size, BS);
    m6.journal_start = 60;
    let w = repo.begin("d", m6.clone()).unwrap();
    assert!(matches!(
        repo.begin("d", m6.clone()),
        Err(RepoError::Busy(_))
    ));
    drop(w);
    let w = repo.begin("d", m6).unwrap();
    w.commit().unwrap();

    // Chunks are authenticated on the way in.
    let mut w = repo.begin("d", meta(7, size, BS)).unwrap();
    let k = key();
    let data = block(1, BS as usize);
    let id = k.chunk_id(&data);
    let mut blob = k.seal_chunk(&id, &data);
    assert!(matches!(w.put_chunk(0, id, None), Err(RepoError::MissingChunk(x)) if x == id));
    let other = k.chunk_id(b"other");
    assert!(matches!(
        w.put_chunk(0, other, Some(&blob)),
        Err(RepoError::BadChunk { .. })
    ));
    let last = blob.len() - 1;
    blob[last] ^= 1;
    assert!(matches!(
        w.put_chunk(0, id, Some(&blob)),
        Err(RepoError::BadChunk { .. })
    ));
    let foreign = TenantKey::from_secret(&[1; 32]);
    let fid = foreign.chunk_id(&data);
    assert!(w
        .put_chunk(0, fid, Some(&foreign.seal_chunk(&fid, &data)))
        .is_err());
    let big = block(2, BS as usize + 1);
    let bid = k.chunk_id(&big);
    assert!(w
        .put_chunk(0, bid, Some(&k.seal_chunk(&bid, &big)))
        .is_err());
    drop(w);
    assert!(!repo.has_chunk(&bid));

    // The repository is bound to its key and to one opener.
    assert!(matches!(open_err(dir.path(), key()), RepoError::Busy(_)));
    drop(repo);
    assert!(matches!(
        open_err(dir.path(), TenantKey::from_secret(&[9; 32])),
        RepoError::WrongKey
    ));
    let repo = open(dir.path());
    assert_eq!(repo.latest("d").unwrap().meta.seq, 6);
}

fn open_err(dir: &std::path::Path, k: TenantKey) -> RepoError {
    match Repository::open(dir, k) {
        Ok(_) => panic!("open should fail"),
        Err(e) => e,
    }
}

/// A writer dropped without commit (a crash mid-checkpoint) leaves no point; reopening works,
/// leftover temp files are cleaned, and the same seq can be written again.
#[test]
fn abandoned_checkpoint_leaves_no_point() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * BS as u64;
    let mut m = Model::new(size, BS);
    {
        let repo = open(dir.path());
        let mut w = repo.begin("d", meta(1, size, BS)).unwrap();
        put_full(&mut w, &mut m, 0, &block(1, BS as usize));
        w.commit().unwrap();
        let mut scratch = m.clone();
        let mut w = repo.begin("d", meta(2, size, BS)).unwrap();
        put_full(&mut w, &mut scratch, 3, &block(3, BS as usize));
        drop(w);
        assert_eq!(repo.latest("d").unwrap().meta.seq, 1);
        assert_eq!(repo.points("d").unwrap().len(), 1);
    }
    std::fs::write(dir.path().join("tmp/obj-1-1"), b"half a chunk").unwrap();
    let repo = open(dir.path());
    assert!(files_under(dir.path(), "tmp").is_empty());
    assert_eq!(repo.points("d").unwrap().len(), 1);
    check_point(&repo, "d", 1, &m);
    let mut w = repo.begin("d", meta(2, size, BS)).unwrap();
    put_full(&mut w, &mut m, 5, &block(5, BS as usize));
    w.commit().unwrap();
    check_point(&repo, "d", 2, &m);
    // The abandoned checkpoint's chunk is garbage.
    let g = repo.gc().unwrap();
    assert_eq!(g.chunks_removed, 1);
    check_point(&repo, "d", 1, &m.clone_with_block_zero(5));
    check_point(&repo, "d", 2, &m);
}

trait ModelExt {
    fn clone_with_block_zero(&self, index: u64) -> Model;
}
impl ModelExt for Model {
    fn clone_with_block_zero(&self, index: u64) -> Model {
        let mut m = self.clone();
        let r = m.range(index);
        m.data[r].fill(0);
        m
    }
}

/// A checkpoint that changes more map pages than a writer keeps in memory writes leaves out
/// early and reads them back when touched again; every point still reads back exactly.
#[test]
fn a_checkpoint_larger_than_the_page_budget_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let bs = 4096u32;
    let per_leaf = 1024u64; // blocks one leaf page names
    let size = 40 * per_leaf * u64::from(bs) + 512; // 41 leaves, two levels
    let mut m = Model::new(size, bs);
    let leaves = size.div_ceil(u64::from(bs)).div_ceil(per_leaf);

    let mut w = repo.begin("big", meta(1, size, bs)).unwrap();
    w.set_max_dirty_pages(3);
    for l in 0..leaves {
        let b = (l * per_leaf + 7).min(size / u64::from(bs));
        let len = m.block_len(b);
        put_full(&mut w, &mut m, b, &block(b, len));
    }
    // Leaves written out early are touched again: a new block, an overwrite, a patch, a zero.
    put_full(&mut w, &mut m, 3, &block(1003, bs as usize));
    put_full(&mut w, &mut m, 5 * per_leaf + 7, &block(2007, bs as usize));
    put_patch(&mut w, &mut m, 9 * per_leaf + 7, &[(10, MARKER.to_vec())]);
    put_zero(&mut w, &mut m, 12 * per_leaf + 7);
    w.commit().unwrap();
    let first = m.clone();
    check_point(&repo, "big", 1, &m);

    let mut w = repo.begin("big", meta(2, size, bs)).unwrap();
    w.set_max_dirty_pages(2);
    for l in (0..leaves).rev().step_by(3) {
        let b = l * per_leaf + 100;
        if b < size / u64::from(bs) {
            put_full(&mut w, &mut m, b, &block(b + 5000, bs as usize));
        }
    }
    put_patch(&mut w, &mut m, 3, &[(0, vec![0xEE; 16])]);
    w.commit().unwrap();
    check_point(&repo, "big", 2, &m);
    check_point(&repo, "big", 1, &first);
    assert!(repo.verify().bad.is_empty());
}
