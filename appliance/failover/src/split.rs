//! The protected site's side of a checksum resync split between the sites (reprotect,
//! failback): the role that has the original disk (the process server of its machine) runs it.
//!
//! The original disk is opened here, where it is (an image path, opened by a local
//! qemu-storage-daemon and written over NBD, as [`crate::resync`] does); the live disk stays at
//! the recovery site, and the master target answers for it on a replication connection
//! (`ferry_wire`, mutually authenticated TLS, opened with `ResyncHello`; its side is
//! `ferry_master_target::resync`). For each batch of [`BATCH`] blocks the live disk's names are
//! asked for (32 bytes a block cross the WAN), the original's blocks are read and named here,
//! and only the blocks whose names differ are fetched, as chunks sealed with the tenant key
//! (never plaintext beyond TLS), opened, checked against their names and written. Names are
//! asked for a few batches ahead ([`AHEAD`]), so a WAN round trip is paid once, not per batch.
//! Memory is a batch here and a block at the master target, whatever the disk's size. The
//! connection draws from the machine's bandwidth throttle, the one its replication draws from
//! (`ferry_process_server::throttle`), both ways: the blocks come from the master target, so
//! this side reads them no faster than the machine's limit and TCP slows the master target.
//!
//! Running it again sends only what still differs, so an interrupted resync (either side
//! killed) completes when the order or the job runs again; the job says the disk is resynced
//! only when a run reached its end. Any answer that does not fit (another size, another
//! block, a malformed or unauthentic block) ends the resync with an error that says so.

use crate::resync::{format_of, nbd, quit_leftover, BLOCK};
use crate::{io, FailoverError, Result};
use ferry_api::ResyncReport;
use ferry_chunk::{ChunkId, TenantKey};
use ferry_master_target::resync::block_name;
use ferry_nbd::client::Client;
use ferry_process_server::throttle::Throttled;
use ferry_wire::{read_msg, BlockBody, Msg, VERSION};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Blocks compared per batch (and at most fetched per request).
pub const BATCH: u64 = 64;
/// Batches whose names are asked for ahead of the one compared.
pub const AHEAD: u64 = 4;
/// How long an answer of the master target may take. It is one answer's, not a batch's: an
/// answer is one block at most (64 KiB and a seal's few bytes), which comes through the
/// machine's bandwidth limit in half a second at the lowest limit a policy sets (1 Mbit/s), so
/// a limited resync is not taken for a silent master target. A batch whose 64 blocks all
/// differ takes half a minute at that limit; progress is told after each block written, not
/// only after each batch, so the step's detail keeps moving meanwhile.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// What the protected site's role needs to resync from the recovery site.
pub struct Protected {
    /// The master target, as this role replicates to it (address, TLS client identity).
    pub link: ferry_process_server::Link,
    /// The tenant key: names blocks, opens the sealed blocks the master target sends.
    pub key: Arc<TenantKey>,
    /// Where the daemons that open original disks keep their sockets while they run.
    pub work: std::path::PathBuf,
}

/// Which live disk at the recovery site: failover `plan` of `tenant`, `machine`'s `disk`.
#[derive(Clone, Debug)]
pub struct LiveDisk {
    pub tenant: String,
    pub plan: String,
    pub machine: String,
    pub disk: String,
}

fn refused(m: impl Into<String>) -> FailoverError {
    FailoverError::Refused(m.into())
}

/// Bring the original disk `original` (an image path at this site) up to date from `live` at
/// the recovery site. `progress` is told after each batch, as [`crate::resync::run`] tells it,
/// and after each block written (a limited resync fetches a batch's blocks slowly).
/// Blocking: call it off the runtime.
pub fn run(
    p: &Protected,
    live: &LiveDisk,
    original: &str,
    progress: &mut dyn FnMut(&ResyncReport),
) -> Result<ResyncReport> {
    if original.split(',').any(|part| part.starts_with("qmp=")) {
        return Err(refused(format!(
            "disk {}'s source names its host ({original}): a resync writes an original disk \
             given by its image path (the host form is not supported for reprotect and failback yet)",
            live.disk
        )));
    }
    let image = Path::new(original);
    let scratch = p
        .work
        .join(&live.tenant)
        .join(&live.plan)
        .join(format!("{}.{}", live.machine, live.disk));
    std::fs::create_dir_all(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
    quit_leftover(&scratch);
    let format = format_of(image)?;
    let mut qsd = ferry_qemu::StorageDaemon::start(image, &format, &scratch)?;
    let sock = scratch.join("target.sock");
    let r = qsd
        .export("disk0", "target", &sock)
        .map_err(FailoverError::from);
    let r = r.and_then(|()| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io("starting a runtime"))?;
        rt.block_on(async {
            let mut c = Client::connect_unix(&sock, "target").await.map_err(nbd)?;
            let (mut rd, mut wr) = connect(p, live, c.size()).await?;
            let r = compare_and_fetch(&mut rd, &mut wr, &mut c, &p.key, progress).await;
            // Bounded: TLS's goodbye goes through the machine's throttle, and a master target
            // that stopped reading must not hold the resync's end (or its error) forever.
            let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
            let r = r?;
            c.flush().await.map_err(nbd)?;
            let _ = c.disconnect().await;
            Ok(r)
        })
    });
    qsd.stop();
    r
}

/// The TCP connection under the resync's TLS, limited both ways by the machine's bandwidth
/// policy (the blocks come from the master target, so its reads are what is limited).
type Wire = Throttled<tokio::net::TcpStream>;
type Reader = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<Wire>>;
type Writer = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<Wire>>;

/// Open a resync connection for `live`, whose original is `size` bytes.
async fn connect(p: &Protected, live: &LiveDisk, size: u64) -> Result<(Reader, Writer)> {
    let addr = &p.link.addr;
    let at = |what: String| refused(format!("master target {addr}: {what}"));
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| at("connecting timed out".into()))?
    .map_err(|e| at(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    // The machine's own throttle, the one its replication draws from (its disks share it), so
    // the limit (and the uplink's share) holds for shipping and resync together.
    let tcp = Throttled::both_ways(tcp, p.link.throttle(&live.disk).cloned());
    let connector = tokio_rustls::TlsConnector::from(p.link.tls.clone());
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(p.link.server_name.clone(), tcp),
    )
    .await
    .map_err(|_| at("TLS handshake timed out".into()))?
    .map_err(|e| at(format!("TLS handshake: {e}")))?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = Msg::ResyncHello {
        version: VERSION,
        tenant: live.tenant.clone(),
        plan: live.plan.clone(),
        machine: live.machine.clone(),
        disk: live.disk.clone(),
        disk_size: size,
        block_size: BLOCK as u32,
    };
    send(&mut wr, &hello).await?;
    match answer(&mut rd).await? {
        Msg::ResyncWelcome {
            disk_size,
            block_size,
            ..
        } if disk_size == size && u64::from(block_size) == BLOCK => Ok((rd, wr)),
        Msg::ResyncWelcome {
            disk_size,
            block_size,
            ..
        } => Err(refused(format!(
            "the master target answered for a live disk of {disk_size} bytes in blocks of \
             {block_size}, but {}'s original is {size} bytes in blocks of {BLOCK}: not the same disk",
            live.disk
        ))),
        Msg::Rejected { message, .. } => Err(at(format!("refused the resync: {message}"))),
        other => Err(malformed(format!(
            "{} in answer to the resync's hello",
            brief(&other)
        ))),
    }
}

/// A message in a few words (a block's blob is not worth printing).
fn brief(m: &Msg) -> String {
    let s = format!("{m:?}");
    if s.chars().count() > 120 {
        format!("{}...", s.chars().take(120).collect::<String>())
    } else {
        s
    }
}

fn malformed(what: String) -> FailoverError {
    refused(format!("the master target's answer makes no sense: {what}"))
}

/// Send a request. Bounded like an answer: a master target that stops reading (or a link that
/// stops taking anything) ends the resync with an error instead of holding it forever.
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, m: &Msg) -> Result<()> {
    let sent = tokio::time::timeout(ANSWER_TIMEOUT, async {
        wr.write_all(&m.encode()).await?;
        wr.flush().await
    })
    .await;
    match sent {
        Err(_) => Err(refused(format!(
            "the master target took no request for {} s",
            ANSWER_TIMEOUT.as_secs()
        ))),
        Ok(r) => r.map_err(io("writing to the master target")),
    }
}

async fn answer<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Msg> {
    match tokio::time::timeout(ANSWER_TIMEOUT, read_msg(rd)).await {
        Err(_) => Err(refused(format!(
            "the master target did not answer within {} s",
            ANSWER_TIMEOUT.as_secs()
        ))),
        Ok(Err(ferry_wire::WireError::Closed)) => Err(refused(
            "the master target closed the resync connection (did it stop?)",
        )),
        Ok(Err(e)) => Err(malformed(e.to_string())),
        Ok(Ok(Msg::Rejected { message, .. })) => Err(refused(format!(
            "the master target ended the resync: {message}"
        ))),
        Ok(Ok(m)) => Ok(m),
    }
}

/// What the master target answers next, in the order it was asked.
enum Asked {
    /// The names of blocks `first..first + count`.
    Ids { first: u64, count: u64 },
    /// Block `index`, of `len` bytes.
    Block { index: u64, len: usize },
}

/// Compare the whole disk batch by batch, fetching and writing the blocks that differ. The
/// names of the next [`AHEAD`] batches are asked for before a batch's blocks are fetched, so a
/// long round trip costs once, not per batch; the answers come in the order asked, and what is
/// asked and not answered stays small (a few requests), so neither side blocks the other.
async fn compare_and_fetch<R, W, S>(
    rd: &mut R,
    wr: &mut W,
    c: &mut Client<S>,
    key: &TenantKey,
    progress: &mut dyn FnMut(&ResyncReport),
) -> Result<ResyncReport>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let size = c.size();
    let mut r = ResyncReport {
        disk_bytes: size,
        ..Default::default()
    };
    let blocks = size.div_ceil(BLOCK);
    let mut asked: VecDeque<Asked> = VecDeque::new();
    let mut names: VecDeque<(u64, Vec<ChunkId>)> = VecDeque::new();
    let (mut first, mut next) = (0u64, 0u64);
    while first < blocks {
        // Ask ahead for the names of the next batches.
        while next < blocks && next - first < AHEAD * BATCH {
            let count = BATCH.min(blocks - next);
            send(
                wr,
                &Msg::IdsRequest {
                    first: next,
                    count: count as u32,
                },
            )
            .await?;
            asked.push_back(Asked::Ids { first: next, count });
            next += count;
        }
        // Take answers (writing the blocks of earlier batches) until this batch's names came.
        while names.front().is_none_or(|(f, _)| *f != first) {
            if take_answer(rd, &mut asked, &mut names, c, key, &mut r).await? {
                progress(&r);
            }
        }
        let Some((_, theirs)) = names.pop_front() else {
            return Err(malformed(format!("no names for block {first}")));
        };
        let count = theirs.len() as u64;
        let pos = first * BLOCK;
        let len = (count * BLOCK).min(size - pos);
        let ours = c.read(pos, len as u32).await.map_err(nbd)?;
        let block = |i: u64| {
            let off = (i * BLOCK) as usize;
            &ours[off..(off + BLOCK as usize).min(len as usize)]
        };
        let differ: Vec<u64> = (0..count)
            .filter(|&i| block_name(key, block(i)) != theirs[i as usize])
            .collect();
        r.blocks_compared += count;
        r.hash_bytes += 32 * count;
        if !differ.is_empty() {
            send(
                wr,
                &Msg::FetchRequest {
                    indices: differ.iter().map(|i| first + i).collect(),
                },
            )
            .await?;
            asked.extend(differ.iter().map(|&i| Asked::Block {
                index: first + i,
                len: block(i).len(),
            }));
        }
        first += count;
        progress(&r);
    }
    while !asked.is_empty() {
        if take_answer(rd, &mut asked, &mut names, c, key, &mut r).await? {
            progress(&r);
        }
    }
    Ok(r)
}

/// Take the master target's next answer, checked against what it answers (the front of
/// `asked`): names are kept in `names`, a block is opened and written. True: a block was
/// written.
async fn take_answer<R, S>(
    rd: &mut R,
    asked: &mut VecDeque<Asked>,
    names: &mut VecDeque<(u64, Vec<ChunkId>)>,
    c: &mut Client<S>,
    key: &TenantKey,
    r: &mut ResyncReport,
) -> Result<bool>
where
    R: AsyncRead + Unpin,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(want) = asked.pop_front() else {
        return Err(malformed("an answer to nothing asked".into()));
    };
    match (want, answer(rd).await?) {
        (Asked::Ids { first, count }, Msg::Ids { first: f, ids })
            if f == first && ids.len() as u64 == count =>
        {
            names.push_back((first, ids));
            Ok(false)
        }
        (Asked::Ids { first, count }, Msg::Ids { first: f, ids }) => Err(malformed(format!(
            "{} names from block {f} for {count} from block {first}",
            ids.len()
        ))),
        (Asked::Ids { .. }, other) => Err(malformed(format!("{} for block names", brief(&other)))),
        (Asked::Block { index, len }, Msg::Block { index: i, body }) if i == index => {
            let data = open_block(key, index, body)?.unwrap_or_else(|| vec![0; len]);
            if data.len() != len {
                return Err(malformed(format!(
                    "block {index} is {} bytes, not {len}",
                    data.len()
                )));
            }
            c.write(index * BLOCK, &data, false).await.map_err(nbd)?;
            r.blocks_sent += 1;
            r.bytes_sent += len as u64;
            Ok(true)
        }
        (Asked::Block { index, .. }, other) => {
            Err(malformed(format!("{} for block {index}", brief(&other))))
        }
    }
}

/// A fetched block's plaintext (none: zeros), opened with the tenant key and checked against
/// its name.
fn open_block(key: &TenantKey, index: u64, body: BlockBody) -> Result<Option<Vec<u8>>> {
    match body {
        BlockBody::Zero => Ok(None),
        BlockBody::Chunk {
            id,
            blob: Some(blob),
        } => key
            .open_chunk(&id, &blob)
            .map(Some)
            .map_err(|e| malformed(format!("block {index} does not open as its name: {e}"))),
        BlockBody::Chunk { blob: None, .. } => Err(malformed(format!(
            "block {index} came by reference, not as a sealed chunk"
        ))),
        BlockBody::Patch { .. } => Err(malformed(format!(
            "block {index} came as a patch, not as a sealed chunk"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_master_target::resync::{live_path, serve, Hello};
    use ferry_nbd::{MemExport, ServerConfig};
    use std::collections::HashMap;

    const SIZE: u64 = 100 * BLOCK + 4096;

    fn key() -> Arc<TenantKey> {
        Arc::new(TenantKey::from_secret(&[7; 32]))
    }

    /// An NBD client of an in-memory original disk holding `data`.
    async fn original(data: Vec<u8>) -> (Client<tokio::io::DuplexStream>, Arc<MemExport>) {
        let export = Arc::new(MemExport::from_vec(data));
        let mut exports: HashMap<String, Arc<dyn ferry_nbd::Export>> = HashMap::new();
        exports.insert("orig".into(), export.clone());
        let cfg = Arc::new(ServerConfig {
            exports,
            tls: None,
            require_tls: false,
        });
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move { ferry_nbd::serve_connection(b, cfg).await });
        (Client::handshake(a, "orig").await.unwrap(), export)
    }

    fn pattern(seed: u8) -> Vec<u8> {
        (0..SIZE).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// The master target's side of a resync of tenant acme's disk d0 (plan dr, machine web)
    /// below `work`, served on `rd`/`wr` as it would be after the hello.
    fn master_target<R, W>(
        mut rd: R,
        mut wr: W,
        work: &Path,
    ) -> tokio::task::JoinHandle<std::result::Result<(), String>>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let w = work.to_path_buf();
        tokio::spawn(async move {
            let h = Hello {
                tenant: "acme".into(),
                plan: "dr".into(),
                machine: "web".into(),
                disk: "d0".into(),
                disk_size: SIZE,
                block_size: BLOCK as u32,
            };
            serve(&mut rd, &mut wr, h, Some((&w, Some("acme"))), key())
                .await
                .map_err(|e| format!("{e:#}"))
        })
    }

    #[tokio::test]
    async fn only_the_blocks_whose_names_differ_come_and_the_original_ends_equal() {
        let dir = tempfile::tempdir().unwrap();
        let path = live_path(dir.path(), "acme", "dr", "web", "d0");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // The live disk: the original with three blocks changed (one of them now zeros, and
        // the short last block).
        let mut live = pattern(0);
        live[(3 * BLOCK) as usize..(4 * BLOCK) as usize].fill(0xaa);
        live[(50 * BLOCK) as usize..(51 * BLOCK) as usize].fill(0);
        let n = live.len();
        live[n - 10] ^= 1;
        std::fs::write(&path, &live).unwrap();
        let (mut c, export) = original(pattern(0)).await;
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (srd, swr) = tokio::io::split(theirs);
        let master = master_target(srd, swr, dir.path());
        let (mut rd, mut wr) = tokio::io::split(ours);
        match answer(&mut rd).await.unwrap() {
            Msg::ResyncWelcome { disk_size, .. } => assert_eq!(disk_size, SIZE),
            other => panic!("{other:?}"),
        }
        let mut seen = 0;
        let r = compare_and_fetch(&mut rd, &mut wr, &mut c, &key(), &mut |_| seen += 1)
            .await
            .unwrap();
        drop((rd, wr));
        master.await.unwrap().unwrap();
        assert_eq!(r.blocks_compared, SIZE.div_ceil(BLOCK));
        assert_eq!(r.blocks_sent, 3);
        assert_eq!(r.bytes_sent, 2 * BLOCK + 4096);
        // After each batch, and after each block written.
        assert_eq!(seen, SIZE.div_ceil(BLOCK).div_ceil(BATCH) + 3);
        assert!(export.contents() == live);
    }

    /// Over a connection limited by the machine's throttle (both ways, as [`connect`] makes
    /// it), the blocks come no faster than the limit, and the original still ends equal.
    #[tokio::test]
    async fn a_limited_resync_fetches_at_the_limit_and_the_original_ends_equal() {
        use ferry_process_server::throttle::{Schedule, Throttle, Throttled};
        let dir = tempfile::tempdir().unwrap();
        let path = live_path(dir.path(), "acme", "dr", "web", "d0");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        // Every block differs: 6.5 MB that do not compress much come, at 40 Mbit/s (5 MB/s).
        let live: Vec<u8> = {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            (0..SIZE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        std::fs::write(&path, &live).unwrap();
        let (mut c, export) = original(pattern(0)).await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        let (srd, swr) = tokio::io::split(theirs);
        let master = master_target(srd, swr, dir.path());
        let t = Throttle::new(
            "web",
            Schedule {
                default_mbit: Some(40),
                windows: Vec::new(),
            },
        );
        let ours = Throttled::both_ways(ours, Some(t));
        let (mut rd, mut wr) = tokio::io::split(ours);
        match answer(&mut rd).await.unwrap() {
            Msg::ResyncWelcome { disk_size, .. } => assert_eq!(disk_size, SIZE),
            other => panic!("{other:?}"),
        }
        let began = std::time::Instant::now();
        let mut seen = 0;
        let r = compare_and_fetch(&mut rd, &mut wr, &mut c, &key(), &mut |_| seen += 1)
            .await
            .unwrap();
        let took = began.elapsed().as_secs_f64();
        drop((rd, wr));
        master.await.unwrap().unwrap();
        assert_eq!(r.bytes_sent, SIZE);
        // 6.5 MB at 5 MB/s, less the bucket's burst (0.1 s).
        assert!(took >= 1.2, "{} bytes came in {took:.2} s", r.bytes_sent);
        assert_eq!(seen, SIZE.div_ceil(BLOCK).div_ceil(BATCH) + r.blocks_sent);
        assert!(export.contents() == live);
    }

    /// Resync an original of [`SIZE`] bytes against a peer that answers with `answers` (after
    /// the welcome); the error it ends with.
    async fn against(answers: Vec<Msg>) -> String {
        let (mut c, _) = original(pattern(0)).await;
        let (ours, theirs) = tokio::io::duplex(1 << 22);
        let peer = tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(theirs);
            for a in answers {
                // One answer per request, whatever was asked.
                if read_msg(&mut rd).await.is_err() {
                    return;
                }
                wr.write_all(&a.encode()).await.unwrap();
            }
            // Then it goes away after the next request.
            let _ = read_msg(&mut rd).await;
        });
        let (mut rd, mut wr) = tokio::io::split(ours);
        let e = compare_and_fetch(&mut rd, &mut wr, &mut c, &key(), &mut |_| {})
            .await
            .unwrap_err()
            .to_string();
        drop((rd, wr));
        let _ = peer.await;
        e
    }

    #[tokio::test]
    async fn answers_that_do_not_fit_are_errors_that_say_so() {
        let k = key();
        let names = |n: usize| vec![ferry_chunk::ChunkId([1; 32]); n];
        let data = vec![5u8; BLOCK as usize];
        let id = k.chunk_id(&data);
        let other = k.chunk_id(&[6u8; BLOCK as usize]);
        let cases: Vec<(Vec<Msg>, &str)> = vec![
            (
                vec![Msg::Ids {
                    first: 0,
                    ids: names(3),
                }],
                "3 names from block 0 for 64",
            ),
            (
                vec![Msg::Ids {
                    first: 9,
                    ids: names(64),
                }],
                "from block 9",
            ),
            (vec![Msg::Have { present: vec![] }], "for block names"),
            (
                vec![
                    Msg::Ids {
                        first: 0,
                        ids: names(64),
                    },
                    // The next batch's names are asked for before this one's blocks.
                    Msg::Ids {
                        first: 64,
                        ids: names(37),
                    },
                    Msg::Block {
                        index: 5,
                        body: BlockBody::Zero,
                    },
                ],
                "for block 0",
            ),
            (
                vec![
                    Msg::Ids {
                        first: 0,
                        ids: names(64),
                    },
                    // The next batch's names are asked for before this one's blocks.
                    Msg::Ids {
                        first: 64,
                        ids: names(37),
                    },
                    Msg::Block {
                        index: 0,
                        body: BlockBody::Chunk {
                            id: other,
                            blob: Some(k.seal_chunk(&id, &data)),
                        },
                    },
                ],
                "does not open as its name",
            ),
            (
                vec![
                    Msg::Ids {
                        first: 0,
                        ids: names(64),
                    },
                    // The next batch's names are asked for before this one's blocks.
                    Msg::Ids {
                        first: 64,
                        ids: names(37),
                    },
                    Msg::Block {
                        index: 0,
                        body: BlockBody::Chunk { id, blob: None },
                    },
                ],
                "by reference",
            ),
            (
                vec![
                    Msg::Ids {
                        first: 0,
                        ids: names(64),
                    },
                    // The next batch's names are asked for before this one's blocks.
                    Msg::Ids {
                        first: 64,
                        ids: names(37),
                    },
                    Msg::Block {
                        index: 0,
                        body: BlockBody::Chunk {
                            id: k.chunk_id(&data[..100]),
                            blob: Some(k.seal_chunk(&k.chunk_id(&data[..100]), &data[..100])),
                        },
                    },
                ],
                "is 100 bytes",
            ),
            (vec![], "closed the resync connection"),
        ];
        for (answers, want) in cases {
            let e = against(answers).await;
            assert!(e.contains(want), "{want:?}: {e}");
        }
    }
}
