//! Cutting the write stream into checkpoints.
//!
//! A checkpoint is the journal records `(start, end]`: a prefix of the write stream, so the point
//! it makes at the master target is crash-consistent. Inside a checkpoint overwrites coalesce:
//! each touched block keeps one buffer and the byte ranges written to it. A block whose ranges
//! cover it entirely becomes a whole chunk (or a hole when it is all zeros); a partly written block
//! becomes a patch the master target applies to the block's previous content.

use ferry_chunk::{is_zero, ChunkId, TenantKey};
use ferry_journal::{OwnedOp, Record};
use ferry_wire::{patch_context, BlockBody, Patch};
use std::collections::{BTreeMap, HashSet};

enum Delta {
    /// The whole block was zeroed or trimmed.
    Zero,
    /// `ranges` (sorted, disjoint, `[start, end)`) of `buf` were written.
    Partial {
        buf: Vec<u8>,
        ranges: Vec<(u32, u32)>,
    },
}

/// Accumulates records of one checkpoint; memory grows with the blocks touched, which the caller
/// bounds with [`Builder::touched`].
pub struct Builder {
    block_size: u64,
    disk_size: u64,
    blocks: BTreeMap<u64, Delta>,
    records: u64,
}

/// One block of a finished checkpoint, and the chunk it names when it carried data.
pub struct BuiltBlock {
    pub index: u64,
    pub body: BlockBody,
    pub chunk: Option<ChunkId>,
}

impl Builder {
    pub fn new(disk_size: u64, block_size: u32) -> Self {
        Builder {
            block_size: u64::from(block_size),
            disk_size,
            blocks: BTreeMap::new(),
            records: 0,
        }
    }

    pub fn touched(&self) -> usize {
        self.blocks.len()
    }

    pub fn records(&self) -> u64 {
        self.records
    }

    fn block_len(&self, index: u64) -> u64 {
        self.block_size
            .min(self.disk_size - index * self.block_size)
    }

    /// Apply one record. Records past the end of the disk cannot be in the journal (it checks on
    /// append); a range is clipped to the disk all the same.
    pub fn apply(&mut self, rec: &Record) {
        self.records += 1;
        match &rec.op {
            OwnedOp::Write { offset, data } => self.write(*offset, data),
            OwnedOp::Zero { offset, len } | OwnedOp::Trim { offset, len } => {
                self.zero(*offset, *len)
            }
        }
    }

    fn spans(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        // (block index, start within block, end within block)
        let end = offset.saturating_add(len).min(self.disk_size);
        let bs = self.block_size;
        let first = offset / bs;
        let last = if end > offset { (end - 1) / bs } else { 0 };
        (first..=last).filter(move |_| end > offset).map(move |b| {
            let base = b * bs;
            (b, offset.max(base) - base, end.min(base + bs) - base)
        })
    }

    fn partial(&mut self, index: u64) -> (&mut Vec<u8>, &mut Vec<(u32, u32)>) {
        let blen = self.block_len(index) as usize;
        let entry = self.blocks.entry(index).or_insert_with(|| Delta::Partial {
            buf: vec![0; blen],
            ranges: Vec::new(),
        });
        if matches!(entry, Delta::Zero) {
            *entry = Delta::Partial {
                buf: vec![0; blen],
                ranges: vec![(0, blen as u32)],
            };
        }
        match entry {
            Delta::Partial { buf, ranges } => (buf, ranges),
            Delta::Zero => unreachable!("converted above"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let spans: Vec<_> = self.spans(offset, data.len() as u64).collect();
        for (b, s, e) in spans {
            let src = (b * self.block_size + s - offset) as usize;
            let (buf, ranges) = self.partial(b);
            buf[s as usize..e as usize].copy_from_slice(&data[src..src + (e - s) as usize]);
            add_range(ranges, s as u32, e as u32);
        }
    }

    fn zero(&mut self, offset: u64, len: u64) {
        let spans: Vec<_> = self.spans(offset, len).collect();
        for (b, s, e) in spans {
            if s == 0 && e == self.block_len(b) {
                self.blocks.insert(b, Delta::Zero);
            } else {
                let (buf, ranges) = self.partial(b);
                buf[s as usize..e as usize].fill(0);
                add_range(ranges, s as u32, e as u32);
            }
        }
    }

    /// Turn the touched blocks into wire bodies: zeros become holes, whole blocks become chunks
    /// (sent by reference when `known` says the master target holds them), partial blocks become
    /// sealed patches bound to `(disk, seq, block)`.
    pub fn finish(
        self,
        key: &TenantKey,
        disk: &str,
        seq: u64,
        known: &HashSet<ChunkId>,
        compress: ferry_chunk::Compression,
    ) -> Vec<BuiltBlock> {
        let mut out = Vec::with_capacity(self.blocks.len());
        for (index, delta) in self.blocks {
            let block = match delta {
                Delta::Zero => BuiltBlock {
                    index,
                    body: BlockBody::Zero,
                    chunk: None,
                },
                Delta::Partial { buf, ranges }
                    if ranges.len() == 1 && ranges[0] == (0, buf.len() as u32) =>
                {
                    let (body, chunk) = whole_block(key, known, &buf, compress);
                    BuiltBlock { index, body, chunk }
                }
                Delta::Partial { buf, ranges } => {
                    let patch = Patch {
                        extents: ranges
                            .iter()
                            .map(|&(s, e)| (s, buf[s as usize..e as usize].to_vec()))
                            .collect(),
                    };
                    let sealed = key.seal(&patch.encode(), &patch_context(disk, seq, index));
                    BuiltBlock {
                        index,
                        body: BlockBody::Patch { sealed },
                        chunk: None,
                    }
                }
            };
            out.push(block);
        }
        out
    }
}

/// The wire body of a whole block: a hole when it is all zeros, otherwise its chunk, sent by
/// reference when `known` says the master target holds it already.
pub fn whole_block(
    key: &TenantKey,
    known: &HashSet<ChunkId>,
    data: &[u8],
    compress: ferry_chunk::Compression,
) -> (BlockBody, Option<ChunkId>) {
    if is_zero(data) {
        return (BlockBody::Zero, None);
    }
    let id = key.chunk_id(data);
    let blob = (!known.contains(&id)).then(|| key.seal_chunk_as(&id, data, compress));
    (BlockBody::Chunk { id, blob }, Some(id))
}

/// Insert `[s, e)` into sorted disjoint ranges, merging neighbours.
fn add_range(ranges: &mut Vec<(u32, u32)>, s: u32, e: u32) {
    let mut s = s;
    let mut e = e;
    let mut out = Vec::with_capacity(ranges.len() + 1);
    let mut placed = false;
    for &(a, b) in ranges.iter() {
        if b < s {
            out.push((a, b));
        } else if a > e {
            if !placed {
                out.push((s, e));
                placed = true;
            }
            out.push((a, b));
        } else {
            s = s.min(a);
            e = e.max(b);
        }
    }
    if !placed {
        out.push((s, e));
    }
    *ranges = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, op: OwnedOp) -> Record {
        Record { seq, op }
    }

    fn key() -> TenantKey {
        TenantKey::from_secret(&[1; 32])
    }

    #[test]
    fn ranges_merge() {
        let mut r = vec![];
        add_range(&mut r, 10, 20);
        add_range(&mut r, 30, 40);
        add_range(&mut r, 0, 5);
        assert_eq!(r, vec![(0, 5), (10, 20), (30, 40)]);
        add_range(&mut r, 20, 30);
        assert_eq!(r, vec![(0, 5), (10, 40)]);
        add_range(&mut r, 3, 12);
        assert_eq!(r, vec![(0, 40)]);
    }

    /// Rebuild the block images the bodies describe on top of `base` and compare with a model
    /// that applies the records byte by byte.
    #[test]
    fn coalesced_blocks_match_a_byte_model() {
        let k = key();
        let bs = 4096u32;
        let size = 5 * 4096 + 100; // a short last block
        let mut model = vec![0xEEu8; size as usize];
        let base = model.clone();
        let records = vec![
            rec(
                1,
                OwnedOp::Write {
                    offset: 100,
                    data: vec![1; 5000],
                },
            ),
            rec(
                2,
                OwnedOp::Write {
                    offset: 4096,
                    data: vec![2; 4096],
                },
            ),
            rec(
                3,
                OwnedOp::Zero {
                    offset: 8192,
                    len: 4096,
                },
            ),
            rec(
                4,
                OwnedOp::Write {
                    offset: 8200,
                    data: vec![3; 10],
                },
            ),
            rec(
                5,
                OwnedOp::Trim {
                    offset: 12288,
                    len: 8192 + 100,
                },
            ),
            rec(
                6,
                OwnedOp::Write {
                    offset: size - 50,
                    data: vec![4; 50],
                },
            ),
            rec(
                7,
                OwnedOp::Write {
                    offset: 4096,
                    data: vec![0; 4096],
                },
            ),
        ];
        let mut b = Builder::new(size, bs);
        for r in &records {
            b.apply(r);
            match &r.op {
                OwnedOp::Write { offset, data } => {
                    model[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                OwnedOp::Zero { offset, len } | OwnedOp::Trim { offset, len } => {
                    model[*offset as usize..(*offset + *len) as usize].fill(0)
                }
            }
        }
        let mut image = base;
        for blk in b.finish(&k, "d", 1, &HashSet::new(), ferry_chunk::Compression::Zstd) {
            let start = (blk.index * bs as u64) as usize;
            let end = (start + bs as usize).min(size as usize);
            match blk.body {
                BlockBody::Zero => image[start..end].fill(0),
                BlockBody::Chunk { id, blob } => {
                    let plain = k.open_chunk(&id, &blob.unwrap()).unwrap();
                    image[start..end].copy_from_slice(&plain);
                }
                BlockBody::Patch { sealed } => {
                    let plain = k.open(&sealed, &patch_context("d", 1, blk.index)).unwrap();
                    let p = Patch::decode(&plain, (end - start) as u32).unwrap();
                    for (off, d) in p.extents {
                        image[start + off as usize..start + off as usize + d.len()]
                            .copy_from_slice(&d);
                    }
                }
            }
        }
        assert_eq!(image, model);
    }

    #[test]
    fn known_chunks_go_by_reference() {
        let k = key();
        let mut b = Builder::new(8192, 4096);
        b.apply(&rec(
            1,
            OwnedOp::Write {
                offset: 0,
                data: vec![7; 8192],
            },
        ));
        let id = k.chunk_id(&[7; 4096]);
        let known: HashSet<_> = [id].into_iter().collect();
        let out = b.finish(&k, "d", 1, &known, ferry_chunk::Compression::Zstd);
        assert_eq!(out.len(), 2);
        assert!(out
            .iter()
            .all(|x| matches!(&x.body, BlockBody::Chunk { blob: None, id: i } if *i == id)));
    }
}
