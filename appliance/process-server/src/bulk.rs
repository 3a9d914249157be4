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
//! Memory stays bounded whatever the disk's size: four read runs (see [`send_runs`]), their
//! names and seals, and the ids of the chunks sent (at most the known-chunk cache's limit).

use crate::shipper::{SessionReader, SessionWriter, Shared, KNOWN_LIMIT};
use anyhow::bail;
use ferry_chunk::{is_zero, ChunkId};
use ferry_nbd::client::Client;
use ferry_wire::{read_msg, BlockBody, Msg, DAMAGED, MAX_IDS};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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

/// A unit of work: one read run, or several short ones gathered (an incremental's scattered
/// blocks), named (and, when it will be sent with its data, sealed) ahead of sending.
struct Prepared {
    /// Bytes read.
    len: u64,
    data: Arc<Vec<u8>>,
    /// Each block: its index on the disk and its bytes in `data`.
    blocks: Arc<Vec<(u64, usize, usize)>>,
    /// Each block's name (`None`: a zero block).
    ids: Vec<Option<ChunkId>>,
    /// Each block's seal when it was sealed ahead.
    sealed: Vec<Option<Vec<u8>>>,
}

/// A prepared run whose presence question is on its way to the master target.
struct Asked {
    run: Prepared,
    /// The chunks asked about, in the order asked (answers come in that order).
    ids: Vec<ChunkId>,
}

/// Read the block ranges `runs` (`[first, end)`) and send them, as `Options` says. Calls
/// `progress` with the bytes examined so far, at most four times a second. Returns what was
/// sent and the chunks it named (for the known-chunk cache once the point is committed).
///
/// Two stages run at once. The first reads each run from the host (the next one while the
/// current one is worked on) and names its blocks on every core ([`parallel_blocks`]); while
/// most chunks turn out to be new (a seed, an incremental) it seals them in the same pass. The
/// second sends: without `compare`, the question which of a run's chunks the master target
/// holds goes out before the previous run's frames, so its answer is there when the run's turn
/// comes and the stream never waits for a round trip; the seals of chunks it holds after all
/// are dropped. With `compare` (a checksum resync, where most blocks are equal) the master
/// target's names are fetched first and only what differs is sealed. At most four runs are in
/// memory: one read, one queued between the stages, the one asked about, the one being sent.
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
    // The units, in order: reads (first block, byte offset, bytes) gathered up to a run's worth
    // of blocks; one read per unit when comparing, whose block names are fetched by range. (A
    // cut's runs come a window of the disk at a time, so this list stays small.)
    let mut units: Vec<Vec<(u64, u64, u64)>> = Vec::new();
    let mut blocks = 0;
    for &(first, end) in runs {
        for b in (first..end).step_by(READ_RUN as usize) {
            let n = (end - b).min(READ_RUN);
            let off = b * bs;
            let read = (b, off, (n * bs).min(opts.disk_size - off));
            match units.last_mut() {
                Some(u) if !opts.compare && blocks + n <= READ_RUN => u.push(read),
                _ => {
                    units.push(vec![read]);
                    blocks = 0;
                }
            }
            blocks += n;
        }
    }
    let mut units = units.into_iter();
    // Seal ahead while most chunks asked about are new (see `send_prepared`).
    let speculate = AtomicBool::new(true);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Prepared>(1);
    let produce = async {
        // Owned here: the sending stage sees the end when this stage ends.
        let tx = tx;
        let Some(mut cur) = units.next() else {
            return anyhow::Ok(());
        };
        let mut data = read_unit(nbd, &cur).await?;
        loop {
            let next = units.next();
            let read_next = async {
                match &next {
                    Some(u) => read_unit(nbd, u).await.map(Some),
                    None => Ok(None),
                }
            };
            let ahead = !opts.compare && (!opts.dedupe || speculate.load(Ordering::Relaxed));
            let prepare = prepare(&cur, std::mem::take(&mut data), opts, shared, ahead);
            let (read, prepared) = tokio::join!(read_next, prepare);
            if tx.send(prepared?).await.is_err() {
                return Ok(()); // the sending stage failed: its error is the one reported
            }
            match (next, read?) {
                (Some(u), Some(d)) => (cur, data) = (u, d),
                _ => return Ok(()),
            }
        }
    };
    let send = async {
        let mut report = Report::default();
        let mut chunks = Vec::new();
        // Chunks sent with their data in this call: later blocks naming them go by reference.
        let mut sent: HashSet<ChunkId> = HashSet::new();
        let mut done = 0u64;
        let mut shown = Instant::now();
        let mut asked: Option<Asked> = None;
        loop {
            let next = match rx.recv().await {
                Some(run) if opts.dedupe && !opts.compare => Some(ask(run, shared, wr).await?),
                Some(run) => Some(Asked {
                    run,
                    ids: Vec::new(),
                }),
                None => None,
            };
            if let Some(a) = asked.take() {
                let len = a.run.len;
                send_prepared(
                    a,
                    opts,
                    shared,
                    rd,
                    wr,
                    &mut report,
                    &mut chunks,
                    &mut sent,
                    &speculate,
                )
                .await?;
                done += len;
                if shown.elapsed() >= Duration::from_millis(250) {
                    shown = Instant::now();
                    progress(done);
                }
            }
            match next {
                Some(a) => asked = Some(a),
                None => return anyhow::Ok((report, chunks)),
            }
        }
    };
    let ((), out) = tokio::try_join!(produce, send)?;
    Ok(out)
}

/// The bytes of a unit's reads, one after the other.
async fn read_unit<S>(nbd: &mut Client<S>, reads: &[(u64, u64, u64)]) -> anyhow::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let mut data = vec![0u8; reads.iter().map(|r| r.2 as usize).sum()];
    let mut at = 0;
    for &(_, off, len) in reads {
        nbd.read_into(off, &mut data[at..at + len as usize]).await?;
        at += len as usize;
    }
    Ok(data)
}

/// Name a unit's blocks (a zero block has no name) and, when `ahead`, seal those not known to
/// be at the master target, on every core.
async fn prepare(
    reads: &[(u64, u64, u64)],
    data: Vec<u8>,
    opts: Options,
    shared: &Arc<Shared>,
    ahead: bool,
) -> anyhow::Result<Prepared> {
    let bs = opts.block_size as usize;
    let mut blocks = Vec::new();
    let mut at = 0;
    for &(first, _, len) in reads {
        let len = len as usize;
        for (k, start) in (0..len).step_by(bs).enumerate() {
            blocks.push((first + k as u64, at + start, at + (start + bs).min(len)));
        }
        at += len;
    }
    let (len, data, blocks) = (data.len() as u64, Arc::new(data), Arc::new(blocks));
    let done = {
        let (data, blocks, sh, compress) =
            (data.clone(), blocks.clone(), shared.clone(), opts.compress);
        parallel_blocks(blocks.len(), move |i| {
            let (_, a, b) = blocks[i];
            let block = &data[a..b];
            if is_zero(block) {
                return (None, None);
            }
            let id = sh.key.chunk_id(block);
            let seal = ahead && !sh.known.lock().expect("known lock").contains(&id);
            (
                Some(id),
                seal.then(|| sh.key.seal_chunk_as(&id, block, compress)),
            )
        })
        .await?
    };
    let (ids, sealed) = done.into_iter().unzip();
    Ok(Prepared {
        len,
        data,
        blocks,
        ids,
        sealed,
    })
}

/// Ask the master target which of a run's chunks, not known to be there, it holds; the answer
/// is read when the run is sent.
async fn ask(run: Prepared, shared: &Shared, wr: &mut SessionWriter) -> anyhow::Result<Asked> {
    let ids: Vec<ChunkId> = {
        let known = shared.known.lock().expect("known lock");
        run.ids
            .iter()
            .flatten()
            .filter(|id| !known.contains(id))
            .copied()
            .collect()
    };
    write_have(wr, &ids).await?;
    Ok(Asked { run, ids })
}

/// Ask which of `ids` the master target holds, in parts of at most [`MAX_IDS`]; the answers
/// are read by [`read_have`].
async fn write_have(wr: &mut SessionWriter, ids: &[ChunkId]) -> anyhow::Result<()> {
    for part in ids.chunks(MAX_IDS as usize) {
        wr.write_all(&Msg::HaveRequest { ids: part.to_vec() }.encode())
            .await?;
    }
    if !ids.is_empty() {
        wr.flush().await?;
    }
    Ok(())
}

/// Compare (with `compare`), decide what goes by reference, seal what was not sealed ahead and
/// send one run's frames.
#[allow(clippy::too_many_arguments)]
async fn send_prepared(
    asked: Asked,
    opts: Options,
    shared: &Arc<Shared>,
    rd: &mut SessionReader,
    wr: &mut SessionWriter,
    report: &mut Report,
    chunks: &mut Vec<ChunkId>,
    sent: &mut HashSet<ChunkId>,
    speculate: &AtomicBool,
) -> anyhow::Result<()> {
    let Asked { run, ids: asked } = asked;
    let Prepared {
        data,
        blocks,
        ids,
        mut sealed,
        ..
    } = run;
    let n = ids.len();
    let theirs = if opts.compare {
        // One read per unit when comparing: its blocks are consecutive.
        report.hash_bytes += 32 * n as u64;
        Some(remote_ids(rd, wr, blocks[0].0, n as u32).await?)
    } else {
        None
    };
    // The blocks to send: (position in the run, name).
    let mut picked: Vec<(usize, Option<ChunkId>)> = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        if let Some(t) = theirs.as_ref().and_then(|t| t.get(i)) {
            if *t == id.unwrap_or(ChunkId::ZERO) {
                continue;
            }
            // Their copy was quarantined: whatever was sent before, send the data.
            if *t == DAMAGED {
                if let Some(id) = id {
                    shared.known.lock().expect("known lock").remove(&id);
                    sent.remove(&id);
                }
            }
        }
        picked.push((i, id));
    }
    let have: HashSet<ChunkId> = if !opts.dedupe {
        HashSet::new()
    } else if opts.compare {
        // Asked now, about what differs and is not known to be there.
        let ask: Vec<ChunkId> = {
            let known = shared.known.lock().expect("known lock");
            picked
                .iter()
                .filter_map(|p| p.1)
                .filter(|id| !known.contains(id) && !sent.contains(id))
                .collect()
        };
        write_have(wr, &ask).await?;
        read_have(rd, &ask).await?
    } else {
        let have = read_have(rd, &asked).await?;
        // Seal ahead again while most of what is asked about is new (a seed), not while most
        // is already there (a seed or resync resumed after an interruption).
        if !asked.is_empty() {
            speculate.store(have.len() * 2 < asked.len(), Ordering::Relaxed);
        }
        have
    };
    // Which chunks go by reference, decided in block order as they are sent.
    let mut by_ref = Vec::with_capacity(picked.len());
    {
        let known = shared.known.lock().expect("known lock");
        for &(_, id) in &picked {
            let Some(id) = id else {
                by_ref.push(false);
                continue;
            };
            let r = have.contains(&id) || known.contains(&id) || sent.contains(&id);
            if !r && sent.len() < KNOWN_LIMIT {
                sent.insert(id);
            }
            by_ref.push(r);
            if chunks.len() < KNOWN_LIMIT {
                chunks.push(id);
            }
        }
    }
    // Seal, on every core, what is sent with its data and was not sealed ahead.
    let late: Vec<usize> = (0..picked.len())
        .filter(|&k| picked[k].1.is_some() && !by_ref[k] && sealed[picked[k].0].is_none())
        .collect();
    if !late.is_empty() {
        let work: Arc<Vec<(usize, ChunkId)>> = Arc::new(
            late.iter()
                .map(|&k| (picked[k].0, picked[k].1.expect("a named block")))
                .collect(),
        );
        let seals = {
            let (work, sh, data, blocks, compress) = (
                work.clone(),
                shared.clone(),
                data.clone(),
                blocks.clone(),
                opts.compress,
            );
            parallel_blocks(work.len(), move |j| {
                let (i, id) = work[j];
                let (_, a, b) = blocks[i];
                sh.key.seal_chunk_as(&id, &data[a..b], compress)
            })
            .await?
        };
        for (&(i, _), blob) in work.iter().zip(seals) {
            sealed[i] = Some(blob);
        }
    }
    drop(data);
    for (k, (i, id)) in picked.into_iter().enumerate() {
        let body = match id {
            None => BlockBody::Zero,
            Some(id) => BlockBody::Chunk {
                id,
                blob: if by_ref[k] { None } else { sealed[i].take() },
            },
        };
        let frame = Msg::Block {
            index: blocks[i].0,
            body,
        }
        .encode();
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

/// The master target's answers to the presence questions about `ids` (asked in parts of at
/// most [`MAX_IDS`]): which of them it holds.
async fn read_have(rd: &mut SessionReader, ids: &[ChunkId]) -> anyhow::Result<HashSet<ChunkId>> {
    let mut out = HashSet::new();
    for part in ids.chunks(MAX_IDS as usize) {
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
