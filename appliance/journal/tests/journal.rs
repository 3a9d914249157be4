mod common;

use std::sync::Arc;

use common::*;
use ferry_journal::{Appended, Journal, JournalError, JournalState, Op, OwnedOp};

#[test]
fn round_trip_writes_zeroes_trims() {
    round_trip(false);
}

#[test]
fn round_trip_with_direct_io_and_switching_modes_across_restarts() {
    round_trip(true);
}

fn round_trip(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let disk = 64 * MIB;
    let mut c = cfg(dir.path(), disk);
    c.segment_bytes = 64 << 10; // many segments
    c.direct_io = direct;
    let j = Journal::open(c.clone()).unwrap();
    assert_eq!(j.stats().direct_io, direct);
    let mut r = Rng(7);
    let model: Vec<OwnedOp> = (0..400).map(|_| random_op(&mut r, disk, 20_000)).collect();
    for (i, op) in model.iter().enumerate() {
        assert_eq!(
            j.append(as_op(op)).unwrap(),
            Appended::Journaled(i as u64 + 1)
        );
    }
    // Nothing is durable before sync.
    assert!(j.read_durable(0, usize::MAX).unwrap().is_empty());
    assert_eq!(j.stats().durable_seq, 0);
    assert_eq!(j.sync().unwrap(), 400);
    // Still direct after writing: this filesystem (the test's temp dir) has O_DIRECT.
    assert_eq!(j.stats().direct_io, direct);
    // Paged reads with a byte budget.
    let mut pos = 0;
    let mut got = Vec::new();
    loop {
        let b = j.read_durable(pos, 30_000).unwrap();
        if b.is_empty() {
            break;
        }
        let enc: usize = b
            .iter()
            .map(|r| match &r.op {
                OwnedOp::Write { data, .. } => 36 + data.len(),
                _ => 36,
            })
            .sum();
        assert!(b.len() == 1 || enc <= 30_000, "batch of {enc} bytes");
        pos = b.last().unwrap().seq;
        got.extend(b);
    }
    assert_eq!(got.len(), 400);
    for (i, rec) in got.iter().enumerate() {
        assert_eq!(rec.seq, i as u64 + 1);
        assert_eq!(rec.op, model[i]);
    }
    // Random starting points.
    for after in [0u64, 1, 57, 199, 398, 399] {
        let b = j.read_durable(after, 1).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].seq, after + 1);
        assert_eq!(b[0].op, model[after as usize]);
    }
    assert!(j.read_durable(400, usize::MAX).unwrap().is_empty());
    assert!(seg_files(dir.path()).len() > 10);
    let st = j.stats();
    assert_eq!((st.first_seq, st.last_seq, st.durable_seq), (1, 400, 400));
    assert_eq!(st.state, JournalState::Replicating);
    drop(j);

    // Reopened in the other mode (a hardware profile changed its advice): everything reads
    // back, and appending continues the same segment.
    c.direct_io = !direct;
    let j = Journal::open(c.clone()).unwrap();
    let again = read_all(&j, 0, 1 << 20);
    assert_eq!(again.len(), 400);
    assert!(again.iter().zip(&model).all(|(r, m)| &r.op == m));
    assert_eq!(
        j.append(Op::Zero { offset: 0, len: 1 }).unwrap(),
        Appended::Journaled(401)
    );
    let w = pattern(5, 5000);
    assert_eq!(
        j.append(Op::Write {
            offset: 4096,
            data: &w
        })
        .unwrap(),
        Appended::Journaled(402)
    );
    j.sync().unwrap();
    drop(j);
    c.direct_io = direct;
    let j = Journal::open(c).unwrap();
    let again = read_all(&j, 0, 1 << 20);
    assert_eq!(again.len(), 402);
    assert_eq!(
        again[401].op,
        OwnedOp::Write {
            offset: 4096,
            data: w
        }
    );
}

#[test]
fn read_from_the_middle_of_a_large_segment() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(cfg(dir.path(), 64 * MIB)).unwrap();
    for i in 0..3000u64 {
        let data = pattern(i, 4096);
        j.append(Op::Write {
            offset: (i % 1000) * 4096,
            data: &data,
        })
        .unwrap();
    }
    j.sync().unwrap();
    for after in [0u64, 1, 63, 64, 1000, 2047, 2999] {
        let b = j.read_durable(after, 3 * 4200).unwrap();
        assert_eq!(b.len() as u64, 3.min(3000 - after));
        for (k, rec) in b.iter().enumerate() {
            let seq = after + 1 + k as u64;
            assert_eq!(rec.seq, seq);
            let expect = OwnedOp::Write {
                offset: ((seq - 1) % 1000) * 4096,
                data: pattern(seq - 1, 4096),
            };
            assert_eq!(rec.op, expect);
        }
    }
}

#[test]
fn sync_with_nothing_new_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open(cfg(dir.path(), MIB)).unwrap();
    assert_eq!(j.sync().unwrap(), 0);
    j.append(Op::Write {
        offset: 0,
        data: &[1; 512],
    })
    .unwrap();
    assert_eq!(j.sync().unwrap(), 1);
    let n = j.stats().fdatasyncs;
    for _ in 0..100 {
        assert_eq!(j.sync().unwrap(), 1);
    }
    assert_eq!(j.stats().fdatasyncs, n);
}

#[test]
fn group_commit_shares_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(cfg(dir.path(), 256 * MIB)).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let j = j.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..150u64 {
                    let data = pattern(t * 1000 + i, 4096);
                    let Appended::Journaled(seq) = j
                        .append(Op::Write {
                            offset: (t * 1000 + i) * 4096,
                            data: &data,
                        })
                        .unwrap()
                    else {
                        panic!("journal unexpectedly full");
                    };
                    let durable = j.sync().unwrap();
                    assert!(durable >= seq, "sync returned {durable} < {seq}");
                    mine.push((seq, t * 1000 + i));
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<(u64, u64)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    let st = j.stats();
    println!("sync calls {}, fdatasyncs {}", st.sync_calls, st.fdatasyncs);
    assert_eq!(st.sync_calls, 1200);
    assert!(
        st.fdatasyncs < st.sync_calls,
        "{} fdatasyncs for {} syncs",
        st.fdatasyncs,
        st.sync_calls
    );
    let recs = read_all(&j, 0, 1 << 20);
    assert_eq!(recs.len(), 1200);
    for (rec, (seq, id)) in recs.iter().zip(&all) {
        assert_eq!(rec.seq, *seq);
        assert_eq!(
            rec.op,
            OwnedOp::Write {
                offset: id * 4096,
                data: pattern(*id, 4096)
            }
        );
    }
}

#[test]
fn trim_deletes_segments_and_seq_continues() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 16 * MIB);
    c.segment_bytes = 16 << 10;
    let j = Journal::open(c.clone()).unwrap();
    for i in 0..200u64 {
        j.append(Op::Write {
            offset: i * 1024,
            data: &pattern(i, 1024),
        })
        .unwrap();
    }
    assert!(matches!(
        j.trim_upto(1),
        Err(JournalError::TrimBeyondDurable { .. })
    ));
    assert_eq!(j.sync().unwrap(), 200);
    let before = seg_files(dir.path()).len();
    let used_before = j.stats().used_bytes;
    j.trim_upto(50).unwrap();
    let st = j.stats();
    assert!(seg_files(dir.path()).len() < before);
    assert!(st.used_bytes < used_before);
    assert!(
        st.first_seq > 1 && st.first_seq <= 51,
        "first_seq {}",
        st.first_seq
    );
    assert!(matches!(
        j.read_durable(0, 1),
        Err(JournalError::Trimmed { .. })
    ));
    let b = j.read_durable(st.first_seq - 1, 1).unwrap();
    assert_eq!(b[0].seq, st.first_seq);
    assert!(matches!(
        j.trim_upto(201),
        Err(JournalError::TrimBeyondDurable { .. })
    ));
    j.trim_upto(30).unwrap(); // going backwards is a no-op
    j.trim_upto(200).unwrap();
    assert!(seg_files(dir.path()).is_empty());
    let st = j.stats();
    assert_eq!((st.first_seq, st.last_seq, st.used_bytes), (201, 200, 0));
    drop(j);

    let j = Journal::open(c.clone()).unwrap();
    let st = j.stats();
    assert_eq!((st.first_seq, st.last_seq, st.durable_seq), (201, 200, 200));
    assert!(matches!(
        j.read_durable(100, 1),
        Err(JournalError::Trimmed { .. })
    ));
    assert!(j.read_durable(200, 1).unwrap().is_empty());
    assert_eq!(
        j.append(Op::Trim {
            offset: 0,
            len: 4096
        })
        .unwrap(),
        Appended::Journaled(201)
    );
    j.sync().unwrap();
    drop(j);
    let j = Journal::open(c).unwrap();
    let recs = read_all(&j, 200, 1024);
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].op,
        OwnedOp::Trim {
            offset: 0,
            len: 4096
        }
    );
    assert_eq!(
        j.append(Op::Zero { offset: 0, len: 1 }).unwrap(),
        Appended::Journaled(202)
    );
}

#[test]
fn full_journal_degrades_to_dirty_bitmap() {
    let dir = tempfile::tempdir().unwrap();
    let disk = 16 * MIB;
    let gran = 64 << 10;
    let mut c = cfg(dir.path(), disk);
    c.capacity_bytes = 64 << 10;
    c.segment_bytes = 32 << 10;
    c.bitmap_granularity = gran;
    let j = Journal::open(c.clone()).unwrap();
    let mut journaled = 0u64;
    let mut dirty = vec![false; (disk / gran) as usize];
    let mark = |d: &mut Vec<bool>, off: u64, len: u64| {
        for b in off / gran..=(off + len - 1) / gran {
            d[b as usize] = true;
        }
    };
    // Fill: journaled writes until the first Dirty.
    let mut i = 0u64;
    loop {
        let off = i * 4096;
        match j
            .append(Op::Write {
                offset: off,
                data: &pattern(i, 4096),
            })
            .unwrap()
        {
            Appended::Journaled(s) => journaled = s,
            Appended::Dirty => {
                mark(&mut dirty, off, 4096);
                break;
            }
        }
        i += 1;
    }
    assert!(journaled >= 10, "only {journaled} records fit");
    assert!(matches!(j.state(), JournalState::ResyncRequired { .. }));
    let later: [(u8, u64, u64); 5] = [
        (0, MIB, 4096),
        (0, 3 * MIB + (60 << 10), 8192), // crosses a granule boundary
        (1, 8 * MIB, 200 << 10),
        (2, 15 * MIB, MIB), // up to the end of the disk
        (0, 0, 1),
    ];
    for (k, off, len) in later {
        let op = match k {
            0 => Op::Write {
                offset: off,
                data: &vec![9u8; len as usize],
            },
            1 => Op::Zero { offset: off, len },
            _ => Op::Trim { offset: off, len },
        };
        assert_eq!(j.append(op).unwrap(), Appended::Dirty);
        mark(&mut dirty, off, len);
    }
    let mut expect = Vec::new();
    for (b, d) in dirty.iter().enumerate() {
        if *d {
            match expect.last_mut() {
                Some((o, l)) if *o + *l == b as u64 * gran => *l += gran,
                _ => expect.push((b as u64 * gran, gran)),
            }
        }
    }
    assert_eq!(j.dirty_extents(), expect);
    let dirty_bytes = dirty.iter().filter(|d| **d).count() as u64 * gran;
    assert_eq!(j.state(), JournalState::ResyncRequired { dirty_bytes });
    // The journaled prefix is still intact and drains; trimming frees space but
    // later writes still go to the bitmap only (order would break otherwise).
    assert_eq!(j.sync().unwrap(), journaled);
    let recs = read_all(&j, 0, 1 << 20);
    assert_eq!(recs.len() as u64, journaled);
    j.trim_upto(journaled).unwrap();
    assert_eq!(
        j.append(Op::Write {
            offset: 0,
            data: &[1; 10]
        })
        .unwrap(),
        Appended::Dirty
    );
    j.sync().unwrap();
    assert_eq!(
        j.stats().state,
        JournalState::ResyncRequired { dirty_bytes }
    );
    drop(j);

    let j = Journal::open(c.clone()).unwrap();
    assert_eq!(j.state(), JournalState::ResyncRequired { dirty_bytes });
    assert_eq!(j.dirty_extents(), expect);
    assert_eq!(
        j.append(Op::Zero { offset: 0, len: 1 }).unwrap(),
        Appended::Dirty
    );
    let restart = j.restart_for_resync().unwrap();
    assert_eq!(restart, journaled);
    assert_eq!(j.state(), JournalState::Replicating);
    assert!(j.dirty_extents().is_empty());
    // The old records are gone for readers: the gap says the journal no longer holds them.
    assert_eq!(j.stats().first_seq, journaled + 1);
    assert!(j.read_durable(0, 1 << 20).is_err());
    assert_eq!(
        j.append(Op::Zero { offset: 0, len: 1 }).unwrap(),
        Appended::Journaled(journaled + 1)
    );
    j.sync().unwrap();
    drop(j);
    let j = Journal::open(c).unwrap();
    assert_eq!(j.state(), JournalState::Replicating);
    assert_eq!(j.stats().last_seq, journaled + 1);
    assert_eq!(j.stats().first_seq, journaled + 1);
    let recs = j.read_durable(journaled, 1 << 20).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].seq, journaled + 1);
}

#[test]
fn resync_state_persisted_on_entry_without_sync() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(dir.path(), 4 * MIB);
    c.capacity_bytes = 8 << 10;
    c.segment_bytes = 4096;
    c.bitmap_granularity = 4096;
    let j = Journal::open(c.clone()).unwrap();
    let mut n = 0;
    while let Appended::Journaled(_) = j
        .append(Op::Write {
            offset: MIB,
            data: &[3; 1000],
        })
        .unwrap()
    {
        n += 1;
    }
    assert!(n > 0);
    drop(j); // crash: no sync at all
    let j = Journal::open(c).unwrap();
    assert_eq!(
        j.state(),
        JournalState::ResyncRequired { dirty_bytes: 4096 }
    );
    assert_eq!(j.dirty_extents(), vec![(MIB, 4096)]);
}

#[test]
fn bad_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = MIB;
    let j = Journal::open(cfg(dir.path(), disk)).unwrap();
    let before = j.stats();
    let bad = [
        Op::Write {
            offset: disk - 10,
            data: &[0; 11],
        },
        Op::Write {
            offset: disk,
            data: &[0; 1],
        },
        Op::Zero {
            offset: u64::MAX,
            len: 2,
        },
        Op::Trim {
            offset: 1,
            len: u64::MAX,
        },
        Op::Zero {
            offset: 0,
            len: disk + 1,
        },
    ];
    for op in bad {
        assert!(
            matches!(j.append(op), Err(JournalError::OutOfRange { .. })),
            "{op:?}"
        );
    }
    let big = vec![0u8; (ferry_journal::MAX_WRITE_LEN + 1) as usize];
    assert!(matches!(
        j.append(Op::Write {
            offset: 0,
            data: &big
        }),
        Err(JournalError::TooLarge { .. })
    ));
    let after = j.stats();
    assert_eq!(
        (after.last_seq, after.used_bytes, after.durable_seq),
        (before.last_seq, before.used_bytes, 0)
    );
    assert!(seg_files(dir.path()).is_empty());
    // Exactly at the end is fine.
    assert_eq!(
        j.append(Op::Write {
            offset: disk - 10,
            data: &[0; 10]
        })
        .unwrap(),
        Appended::Journaled(1)
    );
    assert_eq!(
        j.append(Op::Zero {
            offset: 0,
            len: disk
        })
        .unwrap(),
        Appended::Journaled(2)
    );
    let mut c = cfg(dir.path(), disk);
    c.bitmap_granularity = 0;
    assert!(matches!(
        Journal::open(c),
        Err(JournalError::InvalidConfig(_))
    ));
}

/// A disk that grows: records and segments written for the smaller size stay valid, writes past
/// the old end are accepted once grown (in process, or by reopening with a larger size), the
/// bitmap covers the new blocks, and a smaller size is refused with both sizes named, whether
/// the journal learnt the larger size from `grow`, from its segments or from its state file.
#[test]
fn a_disk_grows_and_never_shrinks() {
    grows_and_never_shrinks(false);
    grows_and_never_shrinks(true);
}

fn grows_and_never_shrinks(direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = |dir: &std::path::Path, size: u64| {
        let mut c = cfg(dir, size);
        c.direct_io = direct;
        c
    };
    let (small, big, bigger) = (4 * MIB, 6 * MIB, 9 * MIB);
    let mut c = cfg(dir.path(), small);
    c.segment_bytes = 64 << 10;
    let j = Journal::open(c.clone()).unwrap();
    assert_eq!(j.stats().direct_io, direct);
    let data = pattern(1, 8192);
    assert_eq!(
        j.append(Op::Write {
            offset: small - 8192,
            data: &data
        })
        .unwrap(),
        Appended::Journaled(1)
    );
    // Past the end: refused before the growth.
    assert!(matches!(
        j.append(Op::Write {
            offset: small,
            data: &data
        }),
        Err(JournalError::OutOfRange { .. })
    ));
    j.grow(big).unwrap();
    assert_eq!(j.disk_size(), big);
    let e = j.grow(small).unwrap_err();
    assert!(
        matches!(e, JournalError::Shrunk { written, configured, .. } if written == big && configured == small),
        "{e}"
    );
    j.grow(big).unwrap(); // the same size: nothing to do
    assert_eq!(
        j.append(Op::Write {
            offset: big - 8192,
            data: &data
        })
        .unwrap(),
        Appended::Journaled(2)
    );
    j.sync().unwrap();
    drop(j);

    // The old size is refused (the state file and the new segment both say `big`)...
    let err = Journal::open(cfg(dir.path(), small)).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("shrinking a protected disk is refused")
            && msg.contains(&big.to_string())
            && msg.contains(&small.to_string()),
        "{msg}"
    );
    // ...and so is it when only the records say so (no state file; the segment began small).
    std::fs::remove_file(dir.path().join("journal.state")).unwrap();
    let err = Journal::open(cfg(dir.path(), small)).err().unwrap();
    assert!(
        matches!(err, JournalError::Shrunk { written, configured, .. } if written == big && configured == small),
        "{err}"
    );

    // Reopened larger still: both records replay, and the bitmap covers the new end.
    let mut c = cfg(dir.path(), bigger);
    c.capacity_bytes = 200 << 10; // fills up below
    let j = Journal::open(c).unwrap();
    let recs = read_all(&j, 0, usize::MAX);
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[1].op,
        OwnedOp::Write {
            offset: big - 8192,
            data: data.clone()
        }
    );
    let big_write = pattern(2, 256 << 10);
    assert_eq!(
        j.append(Op::Write {
            offset: bigger - (256 << 10),
            data: &big_write
        })
        .unwrap(),
        Appended::Dirty
    );
    j.sync().unwrap();
    assert_eq!(j.dirty_extents(), vec![(bigger - (256 << 10), 256 << 10)]);
    drop(j);
    // The state file now records the larger size: the middle one is a shrink too.
    let err = Journal::open(cfg(dir.path(), big)).err().unwrap();
    assert!(
        matches!(err, JournalError::Shrunk { written, .. } if written == bigger),
        "{err}"
    );
    let j = Journal::open(cfg(dir.path(), bigger)).unwrap();
    assert!(matches!(j.state(), JournalState::ResyncRequired { .. }));
    assert_eq!(j.dirty_extents(), vec![(bigger - (256 << 10), 256 << 10)]);
}
