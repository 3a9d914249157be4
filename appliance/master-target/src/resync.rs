//! The recovery site's side of a split checksum resync (reprotect, failback).
//!
//! After a failover the machine runs on a live disk at the recovery site
//! ([`live_path`]); reprotect and failback bring its original disk, at the protected site, up
//! to date. The protected site's role opens the original disk there and drives the comparison
//! (`ferry_failover::split`); this side only answers, on a replication connection that opened
//! with `ResyncHello`: the names of the live disk's blocks (`IdsRequest`), and the blocks it
//! asks for (`FetchRequest`), each sealed with the tenant key as a stored chunk is. Only names
//! and differing blocks cross the WAN, and no block leaves in plaintext. The original disk is
//! never opened here.
//!
//! The live disk is found by the names in the hello below the work directory, never by a path
//! the peer gives. One block is read at a time: memory per connection is a block and a frame.

use anyhow::{bail, Context};
use ferry_chunk::{ChunkId, TenantKey};
use ferry_wire::{read_msg, BlockBody, Msg, RejectReason, WireError, MAX_IDS, VERSION};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Where failover `plan` of `tenant` keeps `machine`'s live `disk` below the work directory.
pub fn live_path(work: &Path, tenant: &str, plan: &str, machine: &str, disk: &str) -> PathBuf {
    work.join(tenant)
        .join(plan)
        .join("live")
        .join(machine)
        .join(format!("{disk}.raw"))
}

/// A block's name as a resync compares it: the keyed hash of its plaintext, all zero for a
/// block of zeros (both sides name blocks with this).
pub fn block_name(key: &TenantKey, data: &[u8]) -> ChunkId {
    if ferry_chunk::is_zero(data) {
        ChunkId::ZERO
    } else {
        key.chunk_id(data)
    }
}

/// What a `ResyncHello` asked for.
pub struct Hello {
    pub tenant: String,
    pub plan: String,
    pub machine: String,
    pub disk: String,
    pub disk_size: u64,
    pub block_size: u32,
}

/// Answer a resync connection until the peer closes it. `work`: where this master target keeps
/// live disks and, when it knows it, the one tenant it serves (none: it keeps none, and
/// refuses). A peer that sends no request for `idle` is gone: the connection is closed (the
/// protected side asks for something at least every 30 s while it waits for answers, however
/// slowly they come through its bandwidth limit).
pub async fn serve<R, W>(
    rd: &mut R,
    wr: &mut W,
    hello: Hello,
    work: Option<(&Path, Option<&str>)>,
    key: Arc<TenantKey>,
    idle: Duration,
) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let live = match open(&hello, work) {
        Ok(f) => f,
        Err(why) => {
            let m = Msg::Rejected {
                seq: 0,
                reason: RejectReason::Protocol,
                chunk: None,
                message: why.clone(),
            };
            wr.write_all(&m.encode()).await?;
            wr.flush().await?;
            bail!("resync of {}/{} refused: {why}", hello.machine, hello.disk);
        }
    };
    let (size, bs) = (hello.disk_size, u64::from(hello.block_size));
    let welcome = Msg::ResyncWelcome {
        version: VERSION,
        disk_size: size,
        block_size: hello.block_size,
    };
    wr.write_all(&welcome.encode()).await?;
    wr.flush().await?;
    tracing::info!(tenant = %hello.tenant, plan = %hello.plan, machine = %hello.machine, disk = %hello.disk, size, "resync connection: serving the live disk's names and blocks");
    let live = Arc::new(live);
    let blocks = size.div_ceil(bs);
    loop {
        let m = match tokio::time::timeout(idle, read_msg(rd)).await {
            Err(_) => bail!("idle for {idle:?}"),
            Ok(Err(WireError::Closed)) => return Ok(()),
            Ok(r) => r?,
        };
        match m {
            Msg::IdsRequest { first, count } => {
                let end = first
                    .saturating_add(u64::from(count.min(MAX_IDS)))
                    .min(blocks);
                let (f, k) = (live.clone(), key.clone());
                let ids = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; bs as usize];
                    (first.min(end)..end)
                        .map(|b| {
                            let data = read_block(&f, &mut buf, b, bs, size)?;
                            Ok(block_name(&k, data))
                        })
                        .collect::<std::io::Result<Vec<ChunkId>>>()
                })
                .await?
                .context("reading the live disk")?;
                wr.write_all(&Msg::Ids { first, ids }.encode()).await?;
                wr.flush().await?;
            }
            Msg::FetchRequest { indices } => {
                if let Some(b) = indices.iter().find(|&&b| b >= blocks) {
                    bail!("asked for block {b}, past the end of the disk ({blocks} blocks)");
                }
                for index in indices {
                    let (f, k) = (live.clone(), key.clone());
                    let body = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; bs as usize];
                        let data = read_block(&f, &mut buf, index, bs, size)?;
                        Ok::<_, std::io::Error>(match block_name(&k, data) {
                            id if id.is_zero() => BlockBody::Zero,
                            id => BlockBody::Chunk {
                                id,
                                blob: Some(k.seal_chunk(&id, data)),
                            },
                        })
                    })
                    .await?
                    .context("reading the live disk")?;
                    wr.write_all(&Msg::Block { index, body }.encode()).await?;
                }
                wr.flush().await?;
            }
            other => bail!("unexpected message on a resync connection: {other:?}"),
        }
    }
}

/// Open the live disk the hello names, checking what it asks.
fn open(h: &Hello, work: Option<(&Path, Option<&str>)>) -> Result<std::fs::File, String> {
    let (work, tenant) =
        work.ok_or("this master target keeps no live disks (it runs no failovers)")?;
    if let Some(t) = tenant.filter(|t| *t != h.tenant) {
        return Err(format!(
            "this master target serves tenant {t}, not {}",
            h.tenant
        ));
    }
    if !h.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&h.block_size) {
        return Err(format!(
            "block size {} is not a power of two from 4 KiB to 1 MiB",
            h.block_size
        ));
    }
    let path = live_path(work, &h.tenant, &h.plan, &h.machine, &h.disk);
    let f = std::fs::File::open(&path).map_err(|e| {
        format!(
            "no live disk {} of machine {} in plan {}/{} ({e}): has the plan failed over?",
            h.disk, h.machine, h.tenant, h.plan
        )
    })?;
    let size = f
        .metadata()
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .len();
    if size != h.disk_size {
        return Err(format!(
            "the live disk {} of machine {} is {size} bytes, the original {}: not the same disk",
            h.disk, h.machine, h.disk_size
        ));
    }
    Ok(f)
}

/// Block `b` of the live disk (the last one may be short).
fn read_block<'a>(
    f: &std::fs::File,
    buf: &'a mut [u8],
    b: u64,
    bs: u64,
    size: u64,
) -> std::io::Result<&'a [u8]> {
    let pos = b * bs;
    let len = bs.min(size - pos) as usize;
    f.read_exact_at(&mut buf[..len], pos)?;
    Ok(&buf[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The answer a resync hello for a disk of `size` bytes in blocks of `bs` gets from a master
    /// target keeping its live disks in `work`.
    async fn hello(
        work: Option<(&Path, Option<&str>)>,
        size: u64,
        bs: u32,
    ) -> (Msg, anyhow::Result<()>) {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (mut rd, mut wr) = tokio::io::split(theirs);
        let h = Hello {
            tenant: "acme".into(),
            plan: "dr".into(),
            machine: "web".into(),
            disk: "d0".into(),
            disk_size: size,
            block_size: bs,
        };
        let key = Arc::new(TenantKey::from_secret(&[1; 32]));
        let (mut ord, owr) = tokio::io::split(ours);
        let work = work.map(|(w, t)| (w.to_path_buf(), t.map(str::to_string)));
        let served = tokio::spawn(async move {
            let work = work.as_ref().map(|(w, t)| (w.as_path(), t.as_deref()));
            let r = serve(&mut rd, &mut wr, h, work, key, crate::IDLE_TIMEOUT).await;
            (r, rd, wr)
        });
        let first = read_msg(&mut ord).await.unwrap();
        // The peer goes away.
        drop((ord, owr));
        let (r, _, _) = served.await.unwrap();
        (first, r)
    }

    fn refusal(m: &Msg) -> &str {
        match m {
            Msg::Rejected {
                seq: 0, message, ..
            } => message,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_hello_for_a_live_disk_that_is_not_there_or_not_the_same_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().to_path_buf();
        let (m, r) = hello(None, 1 << 20, 65536).await;
        assert!(refusal(&m).contains("keeps no live disks") && r.is_err());
        let (m, _) = hello(Some((&work, None)), 1 << 20, 65536).await;
        assert!(
            refusal(&m).contains("no live disk d0 of machine web"),
            "{m:?}"
        );
        let path = live_path(&work, "acme", "dr", "web", "d0");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let (m, _) = hello(Some((&work, None)), 2 << 20, 65536).await;
        assert!(refusal(&m).contains("not the same disk"), "{m:?}");
        let (m, _) = hello(Some((&work, None)), 1 << 20, 1000).await;
        assert!(refusal(&m).contains("block size 1000"), "{m:?}");
        // Another tenant's hello, though its live disk is there, gets nothing.
        let (m, r) = hello(Some((&work, Some("other"))), 1 << 20, 65536).await;
        assert!(
            refusal(&m).contains("serves tenant other, not acme") && r.is_err(),
            "{m:?}"
        );
        let (m, r) = hello(Some((&work, Some("acme"))), 1 << 20, 65536).await;
        assert!(matches!(m, Msg::ResyncWelcome { disk_size, .. } if disk_size == 1 << 20));
        r.unwrap();
    }
}
