#![allow(dead_code)]

use std::path::{Path, PathBuf};

use ferry_journal::{Journal, JournalConfig, Op, OwnedOp, Record};

pub const MIB: u64 = 1 << 20;

pub fn cfg(dir: &Path, disk: u64) -> JournalConfig {
    JournalConfig::new(dir.to_path_buf(), disk)
}

/// xorshift64* — deterministic, no dependencies.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..len).map(|_| r.next() as u8).collect()
}

/// A random operation inside a disk of `disk` bytes.
pub fn random_op(r: &mut Rng, disk: u64, max_len: u64) -> OwnedOp {
    let len = 1 + r.below(max_len);
    let offset = r.below(disk - len);
    match r.below(10) {
        0 => OwnedOp::Zero { offset, len },
        1 => OwnedOp::Trim { offset, len },
        _ => OwnedOp::Write {
            offset,
            data: pattern(r.next(), len as usize),
        },
    }
}

pub fn as_op(o: &OwnedOp) -> Op<'_> {
    match o {
        OwnedOp::Write { offset, data } => Op::Write {
            offset: *offset,
            data,
        },
        OwnedOp::Zero { offset, len } => Op::Zero {
            offset: *offset,
            len: *len,
        },
        OwnedOp::Trim { offset, len } => Op::Trim {
            offset: *offset,
            len: *len,
        },
    }
}

/// Reads every durable record after `after` in batches of `max_bytes`.
pub fn read_all(j: &Journal, after: u64, max_bytes: usize) -> Vec<Record> {
    let mut out: Vec<Record> = Vec::new();
    let mut pos = after;
    loop {
        let batch = j.read_durable(pos, max_bytes).unwrap();
        let Some(last) = batch.last() else {
            return out;
        };
        pos = last.seq;
        out.extend(batch);
    }
}

pub fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "fj"))
        .collect();
    v.sort();
    v
}
