//! The master target: the recovery site's end of replication.
//!
//! Each TLS connection (client certificate from the site CA required) carries one disk. A
//! checkpoint's blocks are applied as they stream in (authenticating every chunk, merging
//! patches) by a blocking thread that holds the disk's lock, fed through a bounded queue
//! ([`APPLY_QUEUE`]), so memory stays bounded for a seed or resync of any size. The point is
//! committed durably and becomes visible only when its `End` arrived; a connection that dies
//! half-way drops the writer and leaves nothing visible (the chunks it stored are collected).
//! [`instant`] serves any recovery point read-only over NBD without copying it.

pub mod instant;

use anyhow::{bail, Context};
use ferry_chunk::{ChunkId, TenantKey};
use ferry_repository::{CheckpointMeta, Consistency, RepoError, Repository};
use ferry_wire::{
    patch_context, read_msg, BlockBody, Checkpoint, Msg, Patch, RejectReason, WireError, VERSION,
};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Blocks received but not yet applied (each at most one frame): the memory bound per session.
pub const APPLY_QUEUE: usize = 64;
/// A connection that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Config {
    pub listen: SocketAddr,
    pub tls: Arc<rustls::ServerConfig>,
    pub repo: Arc<Repository>,
    /// The tenant key (patches are decrypted and merged here; chunks are authenticated).
    pub key: Arc<TenantKey>,
    /// Thin out old points by these tiers and collect unreferenced chunks every `interval`.
    pub retention: Option<(ferry_repository::RetentionPolicy, Duration)>,
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

/// Apply the retention tiers to every disk, then collect what no kept point references.
pub fn retention_pass(
    repo: &Repository,
    policy: &ferry_repository::RetentionPolicy,
) -> Result<(), RepoError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let (mut removed, mut held) = (0, 0);
    for d in repo.disks() {
        let r = repo.apply_retention(&d.name, policy, now)?;
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
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, repo, key, locks) = (
            acceptor.clone(),
            cfg.repo.clone(),
            cfg.key.clone(),
            locks.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = session(tcp, acceptor, repo, key, locks).await {
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
) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake")?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = tokio::time::timeout(Duration::from_secs(15), read_msg(&mut rd))
        .await
        .context("no hello")??;
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
        let m = Msg::Rejected {
            seq: 0,
            reason: RejectReason::Protocol,
            chunk: None,
            message: format!(
                "protocol version {version} not supported (this side speaks {VERSION})"
            ),
        };
        wr.write_all(&m.encode()).await?;
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
    while let Some(item) = rx.blocking_recv() {
        let (index, body) = match item {
            Item::End(at) => {
                if let Some(at) = at {
                    w.rebase_journal_end(at);
                }
                w.commit().map_err(refusal)?;
                return Ok(());
            }
            Item::Block(index, body) => (index, body),
        };
        match body {
            BlockBody::Zero => w.put_zero(index).map_err(refusal)?,
            BlockBody::Chunk { id, blob } => {
                w.put_chunk(index, id, blob.as_deref()).map_err(refusal)?
            }
            BlockBody::Patch { sealed } => {
                let bad = |e: String| {
                    (
                        RejectReason::BadData,
                        None,
                        format!("patch of block {index}: {e}"),
                    )
                };
                let plain = key
                    .open(&sealed, &patch_context(disk, c.seq, index))
                    .map_err(|e| bad(e.to_string()))?;
                let start = index * u64::from(c.block_size);
                let block_len = u64::from(c.block_size).min(c.disk_size - start) as u32;
                let patch = Patch::decode(&plain, block_len).map_err(|e| bad(e.to_string()))?;
                w.put_patch(index, &patch.extents).map_err(refusal)?;
            }
        }
    }
    // The connection ended inside the checkpoint: the writer is dropped, nothing is visible.
    Err((
        RejectReason::Protocol,
        None,
        format!("checkpoint {} ended before its End", c.seq),
    ))
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
