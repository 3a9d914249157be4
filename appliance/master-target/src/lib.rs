//! The master target: the recovery site's end of replication.
//!
//! Each TLS connection (client certificate from the site CA required) carries one disk. A
//! checkpoint's blocks are applied as they stream in (authenticating every chunk, merging
//! patches) by a blocking thread that holds the disk's lock, fed through a bounded queue
//! ([`APPLY_QUEUE`]), so memory stays bounded for a seed or resync of any size. What has
//! queued up is taken as a batch ([`APPLY_BATCH`]) whose chunks are authenticated and stored on
//! a few threads at once, and then put into the map in arrival order. The point is
//! committed durably and becomes visible only when its `End` arrived; a connection that dies
//! half-way drops the writer and leaves nothing visible (the chunks it stored are collected).
//! [`instant`] serves any recovery point read-only over NBD without copying it. A connection
//! that opens with `ResyncHello` is the protected site's side of a reprotect or failback resync:
//! [`resync`] answers it from a failover's live disk.

pub mod instant;
pub mod resync;

use anyhow::{bail, Context};
use ferry_chunk::{ChunkId, TenantKey};
use ferry_repository::{
    CheckpointMeta, CheckpointWriter, Consistency, RepoError, Repository, VerifiedChunk,
};
use ferry_wire::{
    patch_context, read_msg, BlockBody, Checkpoint, Msg, Patch, RejectReason, WireError, VERSION,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Blocks received and queued for the applier (each at most one frame); with the batch it is
/// applying ([`APPLY_BATCH`]), the memory bound per session.
pub const APPLY_QUEUE: usize = 64;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Config {
    pub listen: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    pub repo: Arc<Repository>,
    /// The tenant key (patches are decrypted and merged here; chunks are authenticated).
    pub key: Arc<TenantKey>,
    /// Thin out old points by each disk's tiers and collect unreferenced chunks every
    /// `interval`.
    pub retention: Option<(ferry_repository::Retention, Duration)>,
    /// Where failovers keep their live disks (`{work}/{tenant}/{plan}/live/...`), which
    /// resync connections read ([`resync`]); none: this master target refuses them.
    pub work: Option<std::path::PathBuf>,
    /// The tenant this master target serves (a configured one knows it): a resync hello
    /// naming another is refused, whatever its work directory holds.
    pub tenant: Option<String>,
}

#[derive(Default)]
struct Locks(Mutex<HashMap<String, Arc<Mutex<()>>>>);

impl Locks {
    fn get(&self, disk: &str) -> Arc<Mutex<()>> {
        self.0
            .lock()
            .expect("locks")
            .entry(disk.to_string())
            .or_default()
            .clone()
    }
}

/// Accept replication connections forever.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    tracing::info!(listen = %cfg.listen, "master target ready");
    // Under systemd (Type=notify): ready now; then keep the watchdog fed while the runtime lives.
    let _ = ferry_sdnotify::ready();
    tokio::spawn(ferry_sdnotify::watchdog_loop());
    if let Some((policy, every)) = cfg.retention.clone() {
        let repo = cfg.repo.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (r, p) = (repo.clone(), policy.clone());
                match tokio::task::spawn_blocking(move || retention_pass(&r, &p)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "retention pass failed"),
                    Err(e) => tracing::warn!(error = %e, "retention pass panicked"),
                }
            }
        });
    }
    serve(listener, cfg).await
}

/// Apply each disk's retention tiers, then collect what no kept point references.
pub fn retention_pass(
    repo: &Repository,
    retention: &ferry_repository::Retention,
) -> Result<(), RepoError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let (mut removed, mut held) = (0, 0);
    for d in repo.disks() {
        let r = repo.apply_retention(&d.name, retention.for_disk(&d.name), now)?;
        removed += r.deleted.len();
        held += r.held.len();
    }
    let gc = repo.gc()?;
    tracing::info!(
        points_removed = removed,
        points_held = held,
        chunks_removed = gc.chunks_removed,
        bytes_freed = gc.bytes_freed,
        "retention pass"
    );
    Ok(())
}

pub async fn serve(listener: tokio::net::TcpListener, cfg: Config) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg.tls.clone());
    let locks = Arc::new(Locks::default());
    let work = cfg.work.clone().map(|w| Arc::new((w, cfg.tenant.clone())));
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, repo, key, locks, work) = (
            acceptor.clone(),
            cfg.repo.clone(),
            cfg.key.clone(),
            locks.clone(),
            work.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = session(tcp, acceptor, repo, key, locks, work).await {
                tracing::warn!(%peer, error = format!("{e:#}"), "replication session ended");
            }
        });
    }
}

async fn session(
    tcp: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    repo: Arc<Repository>,
    key: Arc<TenantKey>,
    locks: Arc<Locks>,
    work: Option<Arc<(std::path::PathBuf, Option<String>)>>,
) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = tokio::time::timeout(Duration::from_secs(15), read_msg(&mut rd))
        .await
        .context("no hello")??;
    if let Msg::ResyncHello {
        version,
        tenant,
        plan,
        machine,
        disk,
        disk_size,
        block_size,
    } = hello
    {
        if version != VERSION {
            refuse_version(&mut wr, version).await?;
            bail!("peer speaks protocol version {version}");
        }
        let h = resync::Hello {
            tenant,
            plan,
            machine,
            disk,
            disk_size,
            block_size,
        };
        return resync::serve(
            &mut rd,
            &mut wr,
            h,
            work.as_deref().map(|(p, t)| (p.as_path(), t.as_deref())),
            key,
            IDLE_TIMEOUT,
        )
        .await;
    }
    let Msg::Hello {
        version,
        disk,
        disk_size,
        block_size,
    } = hello
    else {
        bail!("expected hello, got {hello:?}");
    };
    if version != VERSION {
        refuse_version(&mut wr, version).await?;
        bail!("peer speaks protocol version {version}");
    }
    let latest = repo.latest(&disk);
    let (last_seq, journal_end) = latest
        .as_ref()
        .map(|p| (p.meta.seq, p.meta.journal_end))
        .unwrap_or((0, 0));
    wr.write_all(
        &Msg::Welcome {
            version: VERSION,
            last_seq,
            journal_end,
        }
        .encode(),
    )
    .await?;
    wr.flush().await?;
    tracing::info!(%disk, disk_size, block_size, last_seq, journal_end, "replication session started");
    let lock = locks.get(&disk);

    loop {
        let first = match tokio::time::timeout(IDLE_TIMEOUT, read_msg(&mut rd)).await {
            Err(_) => bail!("idle for {IDLE_TIMEOUT:?}"),
            Ok(Err(WireError::Closed)) => return Ok(()),
            Ok(r) => r?,
        };
        let c = match first {
            Msg::Begin(c) => c,
            Msg::IdsRequest { first, count } => {
                let (r, d) = (repo.clone(), disk.clone());
                let ids =
                    tokio::task::spawn_blocking(move || block_ids(&r, &d, first, count)).await??;
                wr.write_all(&Msg::Ids { first, ids }.encode()).await?;
                wr.flush().await?;
                continue;
            }
            other => bail!("expected a checkpoint, got {other:?}"),
        };
        let seq = c.seq;
        // Blocks are applied as they arrive, on a blocking thread fed through a bounded
        // channel: memory stays bounded whatever the checkpoint's size (a seed or a resync of a
        // large disk), and the point is committed only when its `End` arrived.
        let (tx, rx) = tokio::sync::mpsc::channel(APPLY_QUEUE);
        let (r, k, l, d, cc) = (
            repo.clone(),
            key.clone(),
            lock.clone(),
            disk.clone(),
            c.clone(),
        );
        let applier = tokio::task::spawn_blocking(move || apply(&r, &k, &l, &d, cc, rx));
        let received = receive(
            &mut rd, &mut wr, &repo, &disk, &c, disk_size, block_size, tx,
        )
        .await;
        let outcome = applier.await?;
        let journal_end = match &received {
            Ok(Some(at)) => *at,
            _ => c.journal_end,
        };
        if let Err(e) = received {
            let m = Msg::Rejected {
                seq,
                reason: RejectReason::Protocol,
                chunk: None,
                message: format!("{e:#}"),
            };
            wr.write_all(&m.encode()).await?;
            wr.flush().await?;
            return Err(e);
        }
        let reply = match outcome {
            Ok(()) => Msg::Committed { seq, journal_end },
            Err((reason, chunk, message)) => Msg::Rejected {
                seq,
                reason,
                chunk,
                message,
            },
        };
        wr.write_all(&reply.encode()).await?;
        wr.flush().await?;
        if let Msg::Rejected { message, .. } = reply {
            bail!("rejected checkpoint {seq} of {disk}: {message}");
        }
    }
}

async fn refuse_version<W: tokio::io::AsyncWrite + Unpin>(
    wr: &mut W,
    version: u16,
) -> anyhow::Result<()> {
    let m = Msg::Rejected {
        seq: 0,
        reason: RejectReason::Protocol,
        chunk: None,
        message: format!("protocol version {version} not supported (this side speaks {VERSION})"),
    };
    wr.write_all(&m.encode()).await?;
    wr.flush().await?;
    Ok(())
}

pub use ferry_wire::DAMAGED;

/// The names of blocks `first..first+count` in the disk's newest point (all holes when the disk
/// has no point yet; blocks past the end are not named). Each named chunk is read and checked
/// against its name first: a resync is also a scrub, and a damaged chunk is quarantined and
/// named [`DAMAGED`], so the block is sent again and the fresh copy repairs every point using it.
fn block_ids(
    repo: &Repository,
    disk: &str,
    first: u64,
    count: u32,
) -> anyhow::Result<Vec<ChunkId>> {
    let Some(p) = repo.latest(disk) else {
        return Ok(vec![ChunkId::ZERO; count as usize]);
    };
    let reader = repo.reader(disk, p.meta.seq)?;
    let blocks = p.meta.disk_size.div_ceil(u64::from(p.meta.block_size));
    let end = first.saturating_add(u64::from(count)).min(blocks);
    let mut ids = Vec::with_capacity((end - first.min(end)) as usize);
    for b in first.min(end)..end {
        let id = reader.block_id(b)?;
        if !id.is_zero() {
            // Damaged, or already quarantined for another block that shares it.
            if reader.read_block(b).is_err() {
                repo.quarantine_chunk(&id)?;
                ids.push(DAMAGED);
                continue;
            }
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Read a checkpoint's blocks up to its `End`, checking every index and the total size. Block
/// name requests inside a checkpoint (a checksum resync streaming its comparison) are answered
/// from the newest committed point, which the checkpoint under way does not change.
#[allow(clippy::too_many_arguments)]
async fn receive<R, W>(
    rd: &mut R,
    wr: &mut W,
    repo: &Arc<Repository>,
    disk: &str,
    c: &Checkpoint,
    disk_size: u64,
    block_size: u32,
    tx: tokio::sync::mpsc::Sender<Item>,
) -> anyhow::Result<Option<u64>>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    if c.block_size != block_size || c.disk_size != disk_size || block_size == 0 {
        bail!("checkpoint geometry differs from the session's");
    }
    let nblocks = disk_size.div_ceil(u64::from(block_size));
    let mut count = 0u64;
    loop {
        let m = tokio::time::timeout(IDLE_TIMEOUT, read_msg(rd))
            .await
            .context("idle inside a checkpoint")??;
        match m {
            Msg::Block { index, body } => {
                if index >= nblocks {
                    bail!("block {index} is past the end of the disk ({nblocks} blocks)");
                }
                count += 1;
                // A block may come more than once (a resync's replay writes over what it read),
                // but a stream that never ends is refused.
                if count > nblocks.saturating_mul(4).saturating_add(MAX_REPLAY_BLOCKS) {
                    bail!(
                        "checkpoint {} names more blocks than four times the disk's",
                        c.seq
                    );
                }
                // A refused checkpoint stops its applier; the rest is read and dropped so the
                // stream stays in step until its `End`.
                let _ = tx.send(Item::Block(index, body)).await;
            }
            Msg::IdsRequest { first, count } => {
                let (r, d) = (repo.clone(), disk.to_string());
                let ids =
                    tokio::task::spawn_blocking(move || block_ids(&r, &d, first, count)).await??;
                wr.write_all(&Msg::Ids { first, ids }.encode()).await?;
                wr.flush().await?;
            }
            Msg::HaveRequest { ids } => {
                let present = ids.iter().map(|id| repo.has_chunk(id)).collect();
                wr.write_all(&Msg::Have { present }.encode()).await?;
                wr.flush().await?;
            }
            Msg::End { seq, blocks: n } => {
                end_checks(c, seq, n, count)?;
                let _ = tx.send(Item::End(None)).await;
                return Ok(None);
            }
            Msg::EndAt {
                seq,
                blocks: n,
                journal_end,
            } => {
                end_checks(c, seq, n, count)?;
                let _ = tx.send(Item::End(Some(journal_end))).await;
                return Ok(Some(journal_end));
            }
            other => bail!("unexpected message inside checkpoint {}: {other:?}", c.seq),
        }
    }
}

fn end_checks(c: &Checkpoint, seq: u64, n: u64, count: u64) -> anyhow::Result<()> {
    if seq != c.seq || n != count {
        bail!(
            "checkpoint {} ended as {seq} with {n} blocks, {count} received",
            c.seq
        );
    }
    Ok(())
}

/// Blocks a checkpoint may name beyond four times the disk's (a small disk's resync replay).
const MAX_REPLAY_BLOCKS: u64 = 1 << 16;

/// What the receiving side hands the applier.
pub enum Item {
    Block(u64, BlockBody),
    /// The checkpoint arrived whole: commit it (at this journal position, when its `EndAt`
    /// named one).
    End(Option<u64>),
}

type Refusal = (RejectReason, Option<ChunkId>, String);

fn apply(
    repo: &Repository,
    key: &TenantKey,
    lock: &Mutex<()>,
    disk: &str,
    c: Checkpoint,
    mut rx: tokio::sync::mpsc::Receiver<Item>,
) -> Result<(), Refusal> {
    let _guard = lock.lock().expect("disk lock");
    let meta = CheckpointMeta {
        seq: c.seq,
        created_unix_ns: c.created_unix_ns,
        journal_start: c.journal_start,
        journal_end: c.journal_end,
        disk_size: c.disk_size,
        block_size: c.block_size,
        consistency: match c.consistency {
            ferry_wire::Consistency::Crash => Consistency::Crash,
            ferry_wire::Consistency::Application => Consistency::Application,
        },
        group_cut: c.group_cut,
    };
    let mut w = repo.begin(disk, meta).map_err(refusal)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(APPLY_THREADS);
    let mut batch: Vec<(u64, BlockBody)> = Vec::with_capacity(APPLY_BATCH);
    // The connection ending inside the checkpoint ends the loop: the writer is dropped and
    // nothing is visible.
    while let Some(item) = rx.blocking_recv() {
        // Whatever else has arrived (up to a batch) is verified and stored in parallel, then
        // applied in arrival order.
        let mut end = None;
        match item {
            Item::End(at) => end = Some(at),
            Item::Block(index, body) => batch.push((index, body)),
        }
        while end.is_none() && batch.len() < APPLY_BATCH {
            match rx.try_recv() {
                Ok(Item::Block(index, body)) => batch.push((index, body)),
                Ok(Item::End(at)) => end = Some(at),
                Err(_) => break,
            }
        }
        apply_batch(&mut w, key, disk, &c, &mut batch, threads)?;
        if let Some(at) = end {
            if let Some(at) = at {
                w.rebase_journal_end(at);
            }
            w.commit().map_err(refusal)?;
            return Ok(());
        }
    }
    Err((
        RejectReason::Protocol,
        None,
        format!("checkpoint {} ended before its End", c.seq),
    ))
}

/// Blocks the applier takes from its queue at once (beside the [`APPLY_QUEUE`] still queued):
/// with the queue, at most `APPLY_QUEUE + APPLY_BATCH` frames of a session are in memory.
pub const APPLY_BATCH: usize = 64;
/// Threads that verify and store one session's chunks (at most; no more than the cores).
pub const APPLY_THREADS: usize = 4;

/// A block's work that does not depend on the blocks before it, done in parallel.
enum Ready {
    Chunk(Result<VerifiedChunk, RepoError>),
    Patch(Result<Patch, String>),
}

/// Apply a batch of blocks, in arrival order, as if one by one: first the work of each block
/// that does not change the map (authenticating and storing chunks, opening patches) is done
/// on up to `threads` threads, then the map is changed in arrival order, and the first block
/// that fails in that order is the refusal. Blocks naming the same chunk are verified by one
/// thread in arrival order, so each sees the stores of those before it exactly as in a
/// one-by-one application (a chunk sent by reference before its data arrived is still missing).
/// Later blocks of a refused batch may have stored their chunks: authenticated, unreferenced
/// objects, as a dropped checkpoint leaves, which gc collects. `batch` is left empty.
fn apply_batch(
    w: &mut CheckpointWriter<'_>,
    key: &TenantKey,
    disk: &str,
    c: &Checkpoint,
    batch: &mut Vec<(u64, BlockBody)>,
    threads: usize,
) -> Result<(), Refusal> {
    // Work units: the blocks of each chunk (by first arrival), and each patch.
    let mut units: Vec<Vec<usize>> = Vec::new();
    let mut by_id: HashMap<ChunkId, usize> = HashMap::new();
    for (pos, (_, body)) in batch.iter().enumerate() {
        match body {
            BlockBody::Chunk { id, .. } if !id.is_zero() => {
                let u = *by_id.entry(*id).or_insert_with(|| {
                    units.push(Vec::new());
                    units.len() - 1
                });
                units[u].push(pos);
            }
            BlockBody::Patch { .. } => units.push(vec![pos]),
            _ => {}
        }
    }
    let mut ready: Vec<Option<Ready>> = (0..batch.len()).map(|_| None).collect();
    {
        let (w, items): (&CheckpointWriter<'_>, &[(u64, BlockBody)]) = (w, batch);
        let work = |unit: &[usize], out: &mut Vec<(usize, Ready)>| {
            for &pos in unit {
                let (index, body) = &items[pos];
                let r = match body {
                    BlockBody::Chunk { id, blob } => {
                        Ready::Chunk(w.verify_chunk(*index, *id, blob.as_deref()))
                    }
                    BlockBody::Patch { sealed } => {
                        Ready::Patch(open_patch(key, disk, c, *index, sealed))
                    }
                    BlockBody::Zero => continue,
                };
                let failed = matches!(r, Ready::Chunk(Err(_)));
                out.push((pos, r));
                if failed {
                    // The rest of this chunk's blocks come after the refusal.
                    break;
                }
            }
        };
        let threads = threads.min(units.len()).max(1);
        let next = AtomicUsize::new(0);
        let run = || {
            let mut out = Vec::new();
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                let Some(unit) = units.get(u) else {
                    return out;
                };
                work(unit, &mut out);
            }
        };
        let done: Vec<Vec<(usize, Ready)>> = if threads == 1 {
            vec![run()]
        } else {
            std::thread::scope(|s| {
                let helpers: Vec<_> = (1..threads).map(|_| s.spawn(run)).collect();
                let mut all = vec![run()];
                all.extend(
                    helpers
                        .into_iter()
                        .map(|h| h.join().expect("chunk verification thread")),
                );
                all
            })
        };
        for (pos, r) in done.into_iter().flatten() {
            ready[pos] = Some(r);
        }
    }
    for (pos, (index, body)) in batch.drain(..).enumerate() {
        match body {
            BlockBody::Zero => w.put_zero(index).map_err(refusal)?,
            BlockBody::Chunk { id, blob } if id.is_zero() => {
                w.put_chunk(index, id, blob.as_deref()).map_err(refusal)?
            }
            BlockBody::Chunk { .. } => match ready[pos].take() {
                Some(Ready::Chunk(v)) => w.put_verified(v.map_err(refusal)?).map_err(refusal)?,
                _ => return Err(not_ready(index)),
            },
            BlockBody::Patch { .. } => match ready[pos].take() {
                Some(Ready::Patch(p)) => {
                    let patch = p.map_err(|e| {
                        (
                            RejectReason::BadData,
                            None,
                            format!("patch of block {index}: {e}"),
                        )
                    })?;
                    w.put_patch(index, &patch.extents).map_err(refusal)?;
                }
                _ => return Err(not_ready(index)),
            },
        }
    }
    Ok(())
}

/// A block left without its parallel result (cannot happen: every block before the first
/// failure in arrival order has one); refused rather than trusted.
fn not_ready(index: u64) -> Refusal {
    (
        RejectReason::Storage,
        None,
        format!("block {index} was not verified"),
    )
}

/// Decrypt and decode a patch of block `index` (sealed with the checkpoint's patch context).
fn open_patch(
    key: &TenantKey,
    disk: &str,
    c: &Checkpoint,
    index: u64,
    sealed: &[u8],
) -> Result<Patch, String> {
    let plain = key
        .open(sealed, &patch_context(disk, c.seq, index))
        .map_err(|e| e.to_string())?;
    let start = index * u64::from(c.block_size);
    let block_len = u64::from(c.block_size).min(c.disk_size - start) as u32;
    Patch::decode(&plain, block_len).map_err(|e| e.to_string())
}

fn refusal(e: RepoError) -> Refusal {
    let reason = match &e {
        RepoError::MissingChunk(id) => {
            return (RejectReason::MissingChunk, Some(*id), e.to_string())
        }
        RepoError::OutOfOrder { .. } => RejectReason::OutOfOrder,
        RepoError::BadChunk { .. } => RejectReason::BadData,
        _ => RejectReason::Storage,
    };
    tracing::warn!(error = %e, "checkpoint refused");
    (reason, None, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 4096;
    const BLOCKS: u64 = 300;

    fn checkpoint(seq: u64) -> Checkpoint {
        Checkpoint {
            seq,
            created_unix_ns: seq,
            journal_start: seq - 1,
            journal_end: seq,
            disk_size: BLOCKS * u64::from(BS),
            block_size: BS,
            consistency: ferry_wire::Consistency::Crash,
            group_cut: None,
        }
    }

    /// Apply `items` as one checkpoint, everything queued at once (so batches are full).
    fn run(
        repo: &Repository,
        key: &TenantKey,
        c: Checkpoint,
        items: Vec<Item>,
    ) -> Result<(), Refusal> {
        let (tx, rx) = tokio::sync::mpsc::channel(items.len() + 1);
        for it in items {
            assert!(tx.try_send(it).is_ok(), "queue has room");
        }
        drop(tx);
        apply(repo, key, &Mutex::new(()), "d", c, rx)
    }

    fn block(n: u64) -> Vec<u8> {
        let mut b = format!("block {n} ").repeat(600).into_bytes();
        b.truncate(BS as usize);
        b
    }

    fn chunk(key: &TenantKey, data: &[u8], blob: bool) -> BlockBody {
        let id = key.chunk_id(data);
        BlockBody::Chunk {
            id,
            blob: blob.then(|| key.seal_chunk(&id, data)),
        }
    }

    fn open() -> (tempfile::TempDir, Repository, TenantKey) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(dir.path(), TenantKey::from_secret(&[3; 32])).unwrap();
        (dir, repo, TenantKey::from_secret(&[3; 32]))
    }

    #[test]
    fn parallel_batches_apply_in_arrival_order() {
        let (_dir, repo, key) = open();
        let mut want: Vec<Option<Vec<u8>>> = vec![None; BLOCKS as usize];
        let mut items = Vec::new();
        let mut unique_bytes = 0u64;
        let mut seen = std::collections::HashSet::new();
        for b in 0..BLOCKS {
            // Every 7th block repeats the content of block 1 (sometimes with its data again,
            // sometimes by reference once it was sent), every 11th is a hole, block 5 is
            // written twice.
            let (data, body) = if b % 11 == 0 {
                (None, BlockBody::Zero)
            } else if b % 7 == 0 && b > 1 {
                let d = block(1);
                (Some(d.clone()), chunk(&key, &d, b % 2 == 0))
            } else {
                let d = block(b);
                (Some(d.clone()), chunk(&key, &d, true))
            };
            if let BlockBody::Chunk {
                id,
                blob: Some(blob),
            } = &body
            {
                if seen.insert(*id) {
                    unique_bytes += blob.len() as u64;
                }
            }
            want[b as usize] = data;
            items.push(Item::Block(b, body));
        }
        // Block 5 again, then a patch over it: the patch applies to the later content.
        let d = block(1000);
        unique_bytes += key.seal_chunk(&key.chunk_id(&d), &d).len() as u64;
        items.push(Item::Block(5, chunk(&key, &d, true)));
        let mut patched = d.clone();
        patched[10..14].copy_from_slice(b"PtCh");
        let patch = Patch {
            extents: vec![(10, b"PtCh".to_vec())],
        };
        items.push(Item::Block(
            5,
            BlockBody::Patch {
                sealed: key.seal(&patch.encode(), &patch_context("d", 1, 5)),
            },
        ));
        want[5] = Some(patched);
        items.push(Item::End(None));
        run(&repo, &key, checkpoint(1), items).unwrap();
        let p = repo.latest("d").unwrap();
        // The patched block is a new chunk too (sealed here, so its length is not known above).
        assert!(
            p.stored_bytes > unique_bytes,
            "{} {unique_bytes}",
            p.stored_bytes
        );
        let r = repo.reader("d", 1).unwrap();
        for (b, want) in want.iter().enumerate() {
            let got = r.read_block(b as u64).unwrap();
            match want {
                None => assert!(got.is_none_or(|g| ferry_chunk::is_zero(&g)), "block {b}"),
                Some(w) => assert_eq!(got.unwrap().as_slice(), w.as_slice(), "block {b}"),
            }
        }
    }

    #[test]
    fn a_reference_before_its_data_in_one_batch_is_missing() {
        let (_dir, repo, key) = open();
        let d = block(42);
        let items = vec![
            Item::Block(0, chunk(&key, &block(0), true)),
            Item::Block(1, chunk(&key, &d, false)),
            Item::Block(2, chunk(&key, &d, true)),
            Item::End(None),
        ];
        let (reason, id, _) = run(&repo, &key, checkpoint(1), items).unwrap_err();
        assert_eq!(reason, RejectReason::MissingChunk);
        assert_eq!(id, Some(key.chunk_id(&d)));
        assert!(repo.latest("d").is_none());
    }

    #[test]
    fn the_first_bad_block_in_arrival_order_is_the_refusal() {
        let (_dir, repo, key) = open();
        let mut items: Vec<Item> = (0..200)
            .map(|b| Item::Block(b, chunk(&key, &block(b), true)))
            .collect();
        let mut bad = |b: usize| {
            let Item::Block(
                _,
                BlockBody::Chunk {
                    blob: Some(blob), ..
                },
            ) = &mut items[b]
            else {
                unreachable!()
            };
            blob[30] ^= 1;
        };
        bad(150);
        bad(70);
        items.push(Item::End(None));
        let (reason, _, message) = run(&repo, &key, checkpoint(1), items).unwrap_err();
        assert_eq!(reason, RejectReason::BadData);
        assert!(
            message.contains(&key.chunk_id(&block(70)).to_hex()),
            "{message}"
        );
        assert!(repo.latest("d").is_none());
        // A stream cut before its End commits nothing either.
        let items = (0..100)
            .map(|b| Item::Block(b, chunk(&key, &block(b), true)))
            .collect();
        let (reason, _, _) = run(&repo, &key, checkpoint(1), items).unwrap_err();
        assert_eq!(reason, RejectReason::Protocol);
        assert!(repo.latest("d").is_none());
    }
}
