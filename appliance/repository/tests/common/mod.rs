//! Test helpers: a plain `Vec<u8>` model of each disk, a sender-side key, and file scans.
#![allow(dead_code)]

use ferry_repository::{CheckpointMeta, CheckpointWriter, Consistency, Repository, TenantKey};
use std::path::{Path, PathBuf};

pub const SECRET: [u8; 32] = [42; 32];
pub const MARKER: &[u8] = b"FERRY-MARKER-9c1e5b";

pub fn key() -> TenantKey {
    TenantKey::from_secret(&SECRET)
}

pub fn open(dir: &Path) -> Repository {
    Repository::open(dir, key()).expect("open repository")
}

pub fn meta(seq: u64, disk_size: u64, block_size: u32) -> CheckpointMeta {
    CheckpointMeta {
        seq,
        created_unix_ns: seq * 1_000_000_000,
        journal_start: seq * 10,
        journal_end: seq * 10 + 10,
        disk_size,
        block_size,
        consistency: Consistency::Crash,
        group_cut: None,
    }
}

/// Distinct, non-zero block content that contains the marker.
pub fn block(tag: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        if v.len() % 512 == 0 {
            v.extend_from_slice(MARKER);
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.push(x as u8);
        }
    }
    v.truncate(len);
    v[0] = 1; // never all zero
    v
}

/// The expected bytes of a disk.
#[derive(Clone)]
pub struct Model {
    pub bs: usize,
    pub data: Vec<u8>,
}

impl Model {
    pub fn new(size: u64, bs: u32) -> Model {
        Model {
            bs: bs as usize,
            data: vec![0; size as usize],
        }
    }
    pub fn range(&self, index: u64) -> std::ops::Range<usize> {
        let s = index as usize * self.bs;
        s..(s + self.bs).min(self.data.len())
    }
    pub fn block_len(&self, index: u64) -> usize {
        self.range(index).len()
    }
}

/// Sender-side helper: seal and put a full block, mirroring it in the model.
pub fn put_full(w: &mut CheckpointWriter<'_>, m: &mut Model, index: u64, data: &[u8]) {
    let k = key();
    let id = k.chunk_id(data);
    let blob = k.seal_chunk(&id, data);
    w.put_chunk(index, id, Some(&blob)).expect("put_chunk");
    let r = m.range(index);
    m.data[r.clone()].fill(0);
    m.data[r.start..r.start + data.len()].copy_from_slice(data);
}

pub fn put_zero(w: &mut CheckpointWriter<'_>, m: &mut Model, index: u64) {
    w.put_zero(index).expect("put_zero");
    let r = m.range(index);
    m.data[r].fill(0);
}

pub fn put_patch(w: &mut CheckpointWriter<'_>, m: &mut Model, index: u64, ext: &[(u32, Vec<u8>)]) {
    w.put_patch(index, ext).expect("put_patch");
    let s = m.range(index).start;
    for (off, d) in ext {
        m.data[s + *off as usize..s + *off as usize + d.len()].copy_from_slice(d);
    }
}

/// Read a whole point in uneven pieces and compare with the model.
pub fn check_point(repo: &Repository, disk: &str, seq: u64, m: &Model) {
    let r = repo.reader(disk, seq).expect("reader");
    assert_eq!(r.size(), m.data.len() as u64, "{disk}@{seq} size");
    let mut got = vec![0u8; m.data.len()];
    let mut off = 0usize;
    let mut step = 1usize;
    while off < got.len() {
        let n = step.min(got.len() - off);
        r.read_at(off as u64, &mut got[off..off + n])
            .expect("read_at");
        off += n;
        step = step * 7 % 10007 + 333;
    }
    if got != m.data {
        let first = got.iter().zip(&m.data).position(|(a, b)| a != b).unwrap();
        panic!("{disk}@{seq}: content differs, first at byte {first}");
    }
    for b in 0..m.data.len().div_ceil(m.bs) as u64 {
        let zero = m.data[m.range(b)].iter().all(|&x| x == 0);
        assert_eq!(r.is_hole(b).unwrap(), zero, "{disk}@{seq} block {b} hole");
    }
}

pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out.sort();
    out
}

pub fn files_under(dir: &Path, sub: &str) -> Vec<PathBuf> {
    let d = dir.join(sub);
    if d.exists() {
        all_files(&d)
    } else {
        Vec::new()
    }
}
