//! Sending a disk's blocks read from its host: seeds, incrementals and checksum resyncs.
//!
//! One loop serves every capture mode that reads the disk itself rather than its journal. It
//! reads runs of blocks over NBD, in bounded requests, names each block with the tenant key, and
//! sends it inside the checkpoint the caller began:
//! - `compare`: the master target's names of the same blocks are fetched first (32 bytes per
//!   block, in batches) and only blocks whose names differ cross the WAN (checksum resync);
//! - `dedupe`: chunks not known to be at the master target are asked about first and sent by
//!   reference when it has them (a seed or resync resumed after an interruption).
//!
//! Memory stays bounded whatever the disk's size: two read runs (the one being sent and the next,
//! read meanwhile), their names and frames, and the ids of the chunks sent (cleared when the
//! known-chunk cache would outgrow its limit).

use crate::shipper::{SessionReader, SessionWriter, Shared, KNOWN_LIMIT};
use anyhow::bail;
use ferry_chunk::{is_zero, ChunkId};
use ferry_nbd::client::Client;
use ferry_wire::{read_msg, BlockBody, Msg, DAMAGED, MAX_IDS};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Blocks read per NBD request when they are contiguous.
const READ_RUN: u64 = 64;

/// What a cut sent.
#[derive(Default, Debug, Clone, Copy)]
pub struct Report {
    pub blocks: u64,
    /// Bytes of block frames sent.
    pub bytes: u64,
    /// Bytes of block names fetched (checksum resync).
    pub hash_bytes: u64,
}

impl Report {
    pub fn add(&mut self, o: Report) {
        self.blocks += o.blocks;
        self.bytes += o.bytes;
        self.hash_bytes += o.hash_bytes;
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub disk_size: u64,
    pub block_size: u64,
    pub compare: bool,
    pub dedupe: bool,
    /// How the chunks are compressed (the policy's `compression`).
    pub compress: ferry_chunk::Compression,
}

/// Read the block ranges `runs` (`[first, end)`) and send them, as `Options` says. Calls
/// `progress` with the bytes examined so far, at most four times a second. Returns what was
/// sent and the chunks it named (for the known-chunk cache once the point is committed).
///
/// The next read run is read from the host while the current one is named, sealed and sent
/// (at most two runs in memory), and naming and sealing are spread over the cores
/// ([`parallel_blocks`]). While most chunks asked about turn out to be new (a seed), they are
/// sealed during the question's round trip, and the seals of those the master target holds
/// after all are dropped.
#[allow(clippy::too_many_arguments)]
pub async fn send_runs<S>(
    nbd: &mut Client<S>,
    runs: &[(u64, u64)],
    opts: Options,
    shared: &Arc<Shared>,
    rd: &mut SessionReader,
    wr: &mut SessionWriter,
    progress: &mut (dyn FnMut(u64) + Send),
) -> anyhow::Result<(Report, Vec<ChunkId>)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let bs = opts.block_size;
    let mut report = Report::default();
    let mut chunks = Vec::new();
    let mut done = 0u64;
    let mut shown = Instant::now();
    // Seal blocks while the master target is asked whether it holds them (see `send_run`).
    let mut speculate = true;
    // Every read request, in order: (first block, blocks, byte offset, bytes).
    let mut reads = runs.iter().flat_map(|&(first, end)| {
        (first..end).step_by(READ_RUN as usize).map(move |b| {
            let n = (end - b).min(READ_RUN);
            let off = b * bs;
            (b, n, off, (n * bs).min(opts.disk_size - off))
        })
    });
    let Some(mut cur) = reads.next() else {
        return Ok((report, chunks));
    };
    let mut data = nbd.read(cur.2, cur.3 as u32).await?;
    loop {
        let next = reads.next();
        let read_next = async {
            match next {
                Some((_, _, off, len)) => nbd.read(off, len as u32).await.map(Some),
                None => Ok(None),
            }
        };
        let (b, n, _, len) = cur;
        let send = send_run(
            b,
            n,
            std::mem::take(&mut data),
            opts,
            shared,
            rd,
            wr,
            &mut report,
            &mut chunks,
            &mut speculate,
        );
        let (read, sent) = tokio::join!(read_next, send);
        sent?;
        done += len;
        if shown.elapsed() >= Duration::from_millis(250) {
            shown = Instant::now();
            progress(done);
        }
        match (next, read?) {
            (Some(r), Some(d)) => (cur, data) = (r, d),
            _ => return Ok((report, chunks)),
        }
    }
}

/// Name, compare and send one read run: blocks `b..b + n`, whose bytes are `data`.
#[allow(clippy::too_many_arguments)]
async fn send_run(
    b: u64,
    n: u64,
    data: Vec<u8>,
    opts: Options,
    shared: &Arc<Shared>,
    rd: &mut SessionReader,
    wr: &mut SessionWriter,
    report: &mut Report,
    chunks: &mut Vec<ChunkId>,
    speculate: &mut bool,
) -> anyhow::Result<()> {
    let bs = opts.block_size as usize;
    let data = Arc::new(data);
    // Name every block (a zero block has no name) while the master target's names of the same
    // blocks are fetched.
    let naming = {
        let (data, sh) = (data.clone(), shared.clone());
        parallel_blocks(data.len().div_ceil(bs), move |i| {
            let block = &data[i * bs..((i + 1) * bs).min(data.len())];
            (!is_zero(block)).then(|| sh.key.chunk_id(block))
        })
    };
    let (ids, theirs) = if opts.compare {
        report.hash_bytes += 32 * n;
        let (ids, theirs) = tokio::join!(naming, remote_ids(rd, wr, b, n as u32));
        (ids?, Some(theirs?))
    } else {
        (naming.await?, None)
    };
    // The blocks to send, each named once.
    let mut picked: Vec<(u64, usize, Option<ChunkId>)> = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        if let Some(ids) = &theirs {
            match ids.get(i) {
                Some(t) if *t == id.unwrap_or(ChunkId::ZERO) => continue,
                // Their copy was quarantined: whatever was sent before, send the data.
                Some(t) if *t == DAMAGED => {
                    if let Some(id) = id {
                        shared.known.lock().expect("known lock").remove(&id);
                    }
                }
                _ => {}
            }
        }
        picked.push((b + i as u64, i, id));
    }
    let picked = Arc::new(picked);
    let seal = {
        let (picked, sh, data) = (picked.clone(), shared.clone(), data.clone());
        let compress = opts.compress;
        move |k: usize| {
            let (_, i, id) = picked[k];
            let block = &data[i * bs..((i + 1) * bs).min(data.len())];
            sh.key
                .seal_chunk_as(&id.expect("a named block"), block, compress)
        }
    };
    let seal = Arc::new(seal);
    // Blocks sealed ahead of knowing whether they go by reference (None: not sealed yet).
    let mut blobs: Vec<Option<Vec<u8>>> = Vec::new();
    let mut have: HashSet<ChunkId> = HashSet::new();
    if opts.dedupe {
        let (ask, unknown): (Vec<ChunkId>, Vec<bool>) = {
            let known = shared.known.lock().expect("known lock");
            let unknown: Vec<bool> = picked
                .iter()
                .map(|p| p.2.is_some_and(|id| !known.contains(&id)))
                .collect();
            let ask = picked
                .iter()
                .zip(&unknown)
                .filter(|(_, u)| **u)
                .filter_map(|(p, _)| p.2)
                .collect();
            (ask, unknown)
        };
        if !ask.is_empty() {
            let asked = ask.len();
            if *speculate {
                // While the master target is asked, seal what it is asked about: when it holds
                // a block after all, the block goes by reference and its seal is dropped.
                let seal = seal.clone();
                let ahead = parallel_blocks(picked.len(), move |k| unknown[k].then(|| seal(k)));
                let (h, ahead) = tokio::join!(remote_have(rd, wr, ask), ahead);
                (have, blobs) = (h?, ahead?);
            } else {
                have = remote_have(rd, wr, ask).await?;
            }
            // Seal ahead again while most of what is asked about is new (a seed), not while
            // most is already there (a seed or resync resumed after an interruption).
            *speculate = have.len() * 2 < asked;
        }
    }
    blobs.resize_with(picked.len(), || None);
    // Which chunks go by reference, decided in block order as they are sent.
    let mut by_ref = Vec::with_capacity(picked.len());
    {
        let known = shared.known.lock().expect("known lock");
        for &(_, _, id) in picked.iter() {
            by_ref.push(id.is_some_and(|id| have.contains(&id) || known.contains(&id)));
            if let Some(id) = id {
                if chunks.len() < KNOWN_LIMIT {
                    chunks.push(id);
                }
            }
        }
    }
    // Seal, on every core, what is sent with its data and was not sealed ahead.
    let late: Vec<usize> = (0..picked.len())
        .filter(|&k| picked[k].2.is_some() && !by_ref[k] && blobs[k].is_none())
        .collect();
    if !late.is_empty() {
        let late = Arc::new(late);
        let sealed = {
            let (late, seal) = (late.clone(), seal.clone());
            parallel_blocks(late.len(), move |j| seal(late[j])).await?
        };
        for (&k, blob) in late.iter().zip(sealed) {
            blobs[k] = Some(blob);
        }
    }
    drop((seal, data));
    for (k, blob) in blobs.into_iter().enumerate() {
        let (index, _, id) = picked[k];
        let body = match id {
            None => BlockBody::Zero,
            Some(id) => BlockBody::Chunk {
                id,
                blob: if by_ref[k] { None } else { blob },
            },
        };
        let frame = Msg::Block { index, body }.encode();
        wr.write_all(&frame).await?;
        report.blocks += 1;
        report.bytes += frame.len() as u64;
    }
    Ok(())
}

/// Threads that name and seal one run's blocks (at most; no more than the cores).
const SEAL_THREADS: usize = 4;

/// `f(0..count)` in order, computed on up to [`SEAL_THREADS`] blocking threads of the runtime
/// (its pool keeps them, and with them each thread's compression context and nonce supply).
/// Each thread takes the next index until none is left.
async fn parallel_blocks<T, F>(count: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(SEAL_THREADS)
        .min(count)
        .max(1);
    let (f, next) = (Arc::new(f), Arc::new(AtomicUsize::new(0)));
    let tasks: Vec<_> = (0..threads)
        .map(|_| {
            let (f, next) = (f.clone(), next.clone());
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return out;
                    }
                    out.push((i, f(i)));
                }
            })
        })
        .collect();
    let mut slots: Vec<Option<T>> = (0..count).map(|_| None).collect();
    for t in tasks {
        for (i, v) in t.await? {
            slots[i] = Some(v);
        }
    }
    Ok(slots
        .into_iter()
        .map(|v| v.expect("every index computed"))
        .collect())
}

/// Wait for the master target's answer to checkpoint `seq`; on commit, remember its chunks.
pub async fn await_commit(
    rd: &mut SessionReader,
    seq: u64,
    shared: &Shared,
    chunks: Vec<ChunkId>,
) -> anyhow::Result<()> {
    match tokio::time::timeout(Duration::from_secs(300), read_msg(rd)).await?? {
        Msg::Committed { seq: s, .. } if s == seq => {
            let mut known = shared.known.lock().expect("known lock");
            if known.len() + chunks.len() > KNOWN_LIMIT {
                known.clear();
            }
            known.extend(chunks);
            Ok(())
        }
        Msg::Rejected {
            message, reason, ..
        } => {
            if reason == ferry_wire::RejectReason::MissingChunk {
                shared.known.lock().expect("known lock").clear();
            }
            bail!("checkpoint {seq} rejected: {message}")
        }
        other => bail!("unexpected answer to checkpoint {seq}: {other:?}"),
    }
}

/// Which of `ids` the master target holds already.
async fn remote_have(
    rd: &mut SessionReader,
    wr: &mut SessionWriter,
    ids: Vec<ChunkId>,
) -> anyhow::Result<HashSet<ChunkId>> {
    let mut out = HashSet::new();
    for part in ids.chunks(MAX_IDS as usize) {
        wr.write_all(&Msg::HaveRequest { ids: part.to_vec() }.encode())
            .await?;
        wr.flush().await?;
        match tokio::time::timeout(Duration::from_secs(60), read_msg(rd)).await?? {
            Msg::Have { present } if present.len() == part.len() => {
                out.extend(
                    part.iter()
                        .zip(present)
                        .filter(|(_, p)| *p)
                        .map(|(id, _)| *id),
                );
            }
            other => bail!("unexpected answer to a chunk presence request: {other:?}"),
        }
    }
    Ok(out)
}

/// The master target's names of blocks `first..first+count`.
async fn remote_ids(
    rd: &mut SessionReader,
    wr: &mut SessionWriter,
    first: u64,
    count: u32,
) -> anyhow::Result<Vec<ChunkId>> {
    let mut out = Vec::with_capacity(count as usize);
    let mut b = first;
    let end = first + u64::from(count);
    while b < end {
        let n = ((end - b) as u32).min(MAX_IDS);
        wr.write_all(&Msg::IdsRequest { first: b, count: n }.encode())
            .await?;
        wr.flush().await?;
        match tokio::time::timeout(Duration::from_secs(60), read_msg(rd)).await?? {
            Msg::Ids { first: f, ids } if f == b && ids.len() <= n as usize => {
                b += n as u64;
                out.extend(ids);
            }
            other => bail!("unexpected answer to a block name request: {other:?}"),
        }
    }
    Ok(out)
}
