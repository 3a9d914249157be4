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
//! Memory stays bounded whatever the disk's size: one read run, its names, and the ids of the
//! chunks sent (cleared when the known-chunk cache would outgrow its limit).

use crate::shipper::{SessionReader, SessionWriter, Shared, KNOWN_LIMIT};
use anyhow::bail;
use ferry_chunk::{is_zero, ChunkId};
use ferry_nbd::client::Client;
use ferry_wire::{read_msg, BlockBody, Msg, DAMAGED, MAX_IDS};
use std::collections::HashSet;
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
}

/// Read the block ranges `runs` (`[first, end)`) and send them, as `Options` says. Calls
/// `progress` with the bytes examined so far, at most four times a second. Returns what was
/// sent and the chunks it named (for the known-chunk cache once the point is committed).
#[allow(clippy::too_many_arguments)]
pub async fn send_runs<S>(
    nbd: &mut Client<S>,
    runs: &[(u64, u64)],
    opts: Options,
    shared: &Shared,
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
    for &(first, end) in runs {
        let mut b = first;
        while b < end {
            let n = (end - b).min(READ_RUN);
            let off = b * bs;
            let len = (n * bs).min(opts.disk_size - off);
            let data = nbd.read(off, len as u32).await?;
            let theirs = if opts.compare {
                report.hash_bytes += 32 * n;
                Some(remote_ids(rd, wr, b, n as u32).await?)
            } else {
                None
            };
            // The blocks to send, each named once.
            let mut picked: Vec<(u64, &[u8], Option<ChunkId>)> = Vec::new();
            for (i, block) in data.chunks(bs as usize).enumerate() {
                let id = (!is_zero(block)).then(|| shared.key.chunk_id(block));
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
                picked.push((b + i as u64, block, id));
            }
            let mut have: HashSet<ChunkId> = HashSet::new();
            if opts.dedupe {
                let ask: Vec<ChunkId> = {
                    let known = shared.known.lock().expect("known lock");
                    picked
                        .iter()
                        .filter_map(|p| p.2)
                        .filter(|id| !known.contains(id))
                        .collect()
                };
                if !ask.is_empty() {
                    have = remote_have(rd, wr, ask).await?;
                }
            }
            for (index, block, id) in picked {
                let body = match id {
                    None => BlockBody::Zero,
                    Some(id) => {
                        let by_ref = have.contains(&id)
                            || shared.known.lock().expect("known lock").contains(&id);
                        if chunks.len() < KNOWN_LIMIT {
                            chunks.push(id);
                        }
                        BlockBody::Chunk {
                            id,
                            blob: (!by_ref).then(|| shared.key.seal_chunk(&id, block)),
                        }
                    }
                };
                let frame = Msg::Block { index, body }.encode();
                wr.write_all(&frame).await?;
                report.blocks += 1;
                report.bytes += frame.len() as u64;
            }
            b += n;
            done += len;
            if shown.elapsed() >= Duration::from_millis(250) {
                shown = Instant::now();
                progress(done);
            }
        }
    }
    Ok((report, chunks))
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
