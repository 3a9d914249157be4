//! A read-only handle works beside the writer and refuses to change anything.

use ferry_chunk::TenantKey;
use ferry_repository::{CheckpointMeta, Consistency, RepoError, Repository};

fn key() -> TenantKey {
    TenantKey::from_secret(&[3; 32])
}

#[test]
fn read_only_handle_beside_the_writer() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        Repository::open_read_only(d.path(), key()),
        Err(RepoError::NotFound(_))
    ));
    let w = Repository::open(d.path(), key()).unwrap();
    let meta = CheckpointMeta {
        seq: 1,
        created_unix_ns: 1,
        journal_start: 0,
        journal_end: 5,
        disk_size: 65536 * 3,
        block_size: 65536,
        consistency: Consistency::Crash,
        group_cut: None,
    };
    let mut cw = w.begin("d", meta.clone()).unwrap();
    cw.put_patch(1, &[(10, b"hello".to_vec())]).unwrap();
    cw.commit().unwrap();
    // A second writer is refused, a reader is not.
    assert!(Repository::open(d.path(), key()).is_err());
    let r = Repository::open_read_only(d.path(), key()).unwrap();
    let mut buf = vec![0u8; 5];
    r.reader("d", 1)
        .unwrap()
        .read_at(65536 + 10, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"hello");
    assert!(r.verify().bad.is_empty());
    let mut m2 = meta;
    m2.seq = 2;
    m2.journal_start = 5;
    assert!(matches!(r.begin("d", m2), Err(RepoError::Invalid(_))));
    assert!(r.gc().is_err());
    assert!(Repository::open_read_only(d.path(), TenantKey::from_secret(&[4; 32])).is_err());
}
