mod common;

use std::fs::{self, OpenOptions};

use common::*;
use ferry_journal::{Appended, Journal, JournalError, Op, OwnedOp};

/// Appends `ops`, returning the model indexed by seq-1.
fn append_all(j: &Journal, ops: &[OwnedOp]) {
    for op in ops {
        assert!(matches!(
            j.append(as_op(op)).unwrap(),
            Appended::Journaled(_)
        ));
    }
}

#[test]
fn crash_loses_only_unsynced_tail() {
    crash_case(false);
}

/// The same crashes with O_DIRECT segment writes (aligned blocks, zero padding after the last
/// record, the tail block rewritten by every batch).
#[test]
fn crash_loses_only_unsynced_tail_with_direct_io() {
    crash_case(true);
}

/// The end of the record with seq `upto` in a segment's bytes (the format of `docs/formats.md`:
/// a 32-byte segment header; records of a 32-byte header, a write's data, a 4-byte crc).
fn records_end(bytes: &[u8], upto: u64) -> u64 {
    let le = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let mut pos = 32usize;
    while pos + 36 <= bytes.len() {
        let kind = bytes[pos + 4];
        let seq = le(&bytes[pos + 8..pos + 16]);
        let len = le(&bytes[pos + 24..pos + 32]) as usize;
        let total = 36 + if kind == 1 { len } else { 0 };
        pos += total;
        if seq >= upto {
            break;
        }
    }
    pos as u64
}

fn crash_case(direct: bool) {
    let disk = 64 * MIB;
    for seed in 1..=24u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path(), disk);
        c.segment_bytes = 512 << 10;
        c.direct_io = direct;
        let mut r = Rng(seed * 7919);
        let j = Journal::open(c.clone()).unwrap();
        assert_eq!(j.stats().direct_io, direct);
        let n1 = 20 + r.below(200) as usize;
        let mut model: Vec<OwnedOp> = (0..n1).map(|_| random_op(&mut r, disk, 16_000)).collect();
        append_all(&j, &model);
        let synced = j.sync().unwrap();
        assert_eq!(synced, n1 as u64);
        assert_eq!(j.stats().direct_io, direct);
        let files = seg_files(dir.path());
        let synced_file = files.last().unwrap().clone();
        let synced_len = fs::metadata(&synced_file).unwrap().len();
        // More, unsynced; enough that some of it is written to files (1 MiB batches)
        // and possibly crosses into new segments.
        let n2 = r.below(400) as usize;
        let more: Vec<OwnedOp> = (0..n2).map(|_| random_op(&mut r, disk, 16_000)).collect();
        append_all(&j, &more);
        model.extend(more);
        drop(j); // crash: no sync

        // The tail file: the last segment holding records (later ones may be
        // header-only segments created ahead of their buffered records).
        let files = seg_files(dir.path());
        let last = files
            .iter()
            .rev()
            .find(|f| fs::metadata(f).unwrap().len() > 32)
            .unwrap_or(files.last().unwrap())
            .clone();
        let len = fs::metadata(&last).unwrap().len();
        // What must survive ends at the last synced record: with O_DIRECT the file was longer
        // (zero padding to a block), and the block holding that end was rewritten by the next
        // batch, so cuts and flips reach down to the record end, not the synced file length.
        let floor = if last == synced_file {
            if direct {
                records_end(&fs::read(&last).unwrap(), synced)
            } else {
                synced_len
            }
        } else {
            0
        };
        let mode = r.below(4);
        if len > floor && (mode == 1 || mode == 3) {
            // Torn write: cut at a random offset beyond what was synced.
            let cut = floor + r.below(len - floor + 1);
            OpenOptions::new()
                .write(true)
                .open(&last)
                .unwrap()
                .set_len(cut)
                .unwrap();
        }
        let len = fs::metadata(&last).unwrap().len();
        if (mode == 2 || mode == 3) && len > floor.max(32) {
            // Flip bytes inside the last record of the file (never in synced data).
            let lo = floor.max(32).max(len.saturating_sub(32));
            let mut bytes = fs::read(&last).unwrap();
            for _ in 0..1 + r.below(3) {
                let p = (lo + r.below(len - lo)) as usize;
                bytes[p] ^= 1 << r.below(8);
            }
            fs::write(&last, bytes).unwrap();
        }

        let j = Journal::open(c.clone()).unwrap_or_else(|e| panic!("seed {seed} mode {mode}: {e}"));
        eprintln!(
            "seed {seed} mode {mode} synced {synced} total {} recovered {}",
            model.len(),
            j.stats().last_seq
        );
        let recs = read_all(&j, 0, 1 << 20);
        assert!(
            recs.len() as u64 >= synced,
            "seed {seed}: lost synced records"
        );
        for (i, rec) in recs.iter().enumerate() {
            assert_eq!(rec.seq, i as u64 + 1, "seed {seed}");
            assert_eq!(&rec.op, &model[i], "seed {seed} seq {}", rec.seq);
        }
        let st = j.stats();
        assert_eq!(st.durable_seq, recs.len() as u64);
        let Appended::Journaled(next) = j
            .append(Op::Zero {
                offset: 0,
                len: 512,
            })
            .unwrap()
        else {
            panic!()
        };
        assert!(next > synced);
        assert_eq!(next, recs.len() as u64 + 1);
        // The journal keeps working after recovery.
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(c).unwrap();
        assert_eq!(read_all(&j, 0, 1 << 20).len() as u64, next);
    }
}

#[test]
fn torn_segment_header_of_new_segment_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 16 * MIB);
    c.segment_bytes = 8192;
    let j = Journal::open(c.clone()).unwrap();
    for i in 0..10u64 {
        j.append(Op::Write {
            offset: i * 4096,
            data: &pattern(i, 3000),
        })
        .unwrap();
    }
    let synced = j.sync().unwrap();
    drop(j);
    // Simulate a crash right after creating the next segment: a file with a partial header.
    let name = dir.path().join(format!("seg-{:020}.fj", synced + 1));
    fs::write(&name, [b'F', b'J', b'S']).unwrap();
    let j = Journal::open(c).unwrap();
    assert!(!name.exists());
    assert_eq!(read_all(&j, 0, 1 << 20).len() as u64, synced);
    assert_eq!(
        j.append(Op::Zero { offset: 0, len: 1 }).unwrap(),
        Appended::Journaled(synced + 1)
    );
    j.sync().unwrap();
}

#[test]
fn corruption_before_valid_records_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), 16 * MIB);
    let j = Journal::open(c.clone()).unwrap();
    for i in 0..100u64 {
        j.append(Op::Write {
            offset: i * 4096,
            data: &pattern(i, 4096),
        })
        .unwrap();
    }
    j.sync().unwrap();
    drop(j);
    let f = seg_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&f).unwrap();
    bytes[32 + 10 * (36 + 4096) + 500] ^= 0x40; // inside record 11's data
    fs::write(&f, &bytes).unwrap();
    match Journal::open(c.clone()) {
        Err(JournalError::Corrupt { offset, .. }) => assert_eq!(offset, 32 + 10 * (36 + 4096)),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("corruption went unnoticed"),
    }
    // Nothing was truncated by the failed open.
    assert_eq!(fs::metadata(&f).unwrap().len(), bytes.len() as u64);
}

#[test]
fn corruption_in_an_earlier_segment_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 16 * MIB);
    c.segment_bytes = 16 << 10;
    let j = Journal::open(c.clone()).unwrap();
    for i in 0..20u64 {
        j.append(Op::Write {
            offset: i * 4096,
            data: &pattern(i, 4096),
        })
        .unwrap();
    }
    j.sync().unwrap();
    drop(j);
    let files = seg_files(dir.path());
    assert!(files.len() >= 3);
    // Truncate the first segment: a record is missing before valid later segments.
    let len = fs::metadata(&files[0]).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    assert!(matches!(
        Journal::open(c.clone()),
        Err(JournalError::Corrupt { .. })
    ));
    // A deleted middle segment is noticed too.
    let _ = fs::remove_file(&files[0]);
    assert!(matches!(
        Journal::open(c),
        Err(JournalError::Corrupt { .. })
    ));
}
