//! Shipping checkpoints to the master target, one TLS connection per disk.
//!
//! The master target's answer to `Hello` is the only resume state: it names the last journal
//! record it holds durably, and the journal still has everything after it because records are
//! trimmed only when a `Committed` arrives. So after any disconnect or crash of either side the
//! shipper reconnects (with backoff) and continues from there; nothing else needs to agree.

use crate::checkpoint::Builder;
use crate::status::{now_unix_ns, State};
use crate::throttle::{Throttle, Throttled};
use crate::Disk;
use anyhow::{anyhow, bail, Context};
use ferry_chunk::{ChunkId, TenantKey};
use ferry_wire::{read_msg, BlockBody, Checkpoint, Consistency, Msg, RejectReason, VERSION};
use rustls::pki_types::ServerName;
use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Where and how to reach the master target.
pub struct Link {
    pub addr: String,
    pub server_name: ServerName<'static>,
    pub tls: Arc<rustls::ClientConfig>,
    /// Bandwidth limits by disk name (the disks of one machine share one throttle).
    pub throttles: std::collections::HashMap<String, Arc<Throttle>>,
}

impl Link {
    /// The throttle `disk`'s connections draw from, if its machine has a limit.
    pub fn throttle(&self, disk: &str) -> Option<&Arc<Throttle>> {
        self.throttles.get(disk)
    }

    /// The bandwidth limit in force now for `disk`, megabits per second (None: unlimited).
    pub fn limit_mbit(&self, disk: &str) -> Option<u32> {
        self.throttle(disk).and_then(|t| t.limit_mbit())
    }

    /// `disk`'s machine's place in the appliance's uplink now, if there is an uplink budget.
    pub fn share(&self, disk: &str) -> Option<crate::uplink::Share> {
        self.throttle(disk).and_then(|t| t.share())
    }
}

#[derive(Clone, Debug)]
pub struct Tuning {
    /// How often a checkpoint is cut (the recovery point granularity).
    pub interval: Duration,
    /// A checkpoint holds at most this much written data; more is cut at once into the next.
    pub max_checkpoint_bytes: usize,
    /// A checkpoint touches at most this many blocks (bounds the builder's memory).
    pub max_checkpoint_blocks: usize,
    /// Checkpoints sent but not yet acknowledged.
    pub window: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            interval: Duration::from_secs(1),
            max_checkpoint_bytes: 64 << 20,
            max_checkpoint_blocks: 2048,
            window: 4,
        }
    }
}

/// State shared by every disk's shipper: the key and the chunks the master target holds.
pub struct Shared {
    pub key: TenantKey,
    /// Chunks the master target has acknowledged; bounded (cleared when it grows past
    /// [`KNOWN_LIMIT`]), and cleared when the master target reports one missing.
    pub known: Mutex<HashSet<ChunkId>>,
}

pub(crate) const KNOWN_LIMIT: usize = 1 << 20;

struct InFlight {
    seq: u64,
    journal_end: u64,
    /// Ends at the disk's application-consistent mark.
    app: bool,
    created_unix_ns: u64,
    chunks: Vec<ChunkId>,
    /// Ends at this consistency-group cut.
    group_cut: Option<u64>,
}

struct Cut {
    journal_end: u64,
    app: bool,
    frames: Vec<Vec<u8>>,
    chunks: Vec<ChunkId>,
    more: bool,
    created_unix_ns: u64,
    group_cut: Option<u64>,
}

/// The cut state a session keeps between checkpoints: the application-consistent mark and the
/// group cut that checkpoints in flight already end at (not to be cut again).
#[derive(Default)]
struct Sent {
    mark: Option<u64>,
    group_cut: Option<u64>,
}

/// Replicate one disk forever, reconnecting after any failure.
pub async fn replicate(disk: Arc<Disk>, link: Arc<Link>, tuning: Tuning, shared: Arc<Shared>) {
    let tuning = Tuning {
        interval: disk.interval.unwrap_or(tuning.interval),
        ..tuning
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        // `ferry grow` runs between sessions: none cuts a checkpoint while the size changes.
        if let Some(size) = disk.grow_requested() {
            crate::grow::run(&disk, size).await;
        }
        let mut welcomed = false;
        let result = session(&disk, &link, &tuning, &shared, &mut welcomed).await;
        let msg = match result {
            // The session ended for a growth: no failure, start over at once.
            Ok(()) => {
                disk.update(|s| {
                    s.connected = false;
                    if matches!(s.state, State::Replicating | State::Resyncing) {
                        s.state = State::Connecting;
                    }
                });
                continue;
            }
            Err(e) => format!("{e:#}"),
        };
        tracing::warn!(disk = %disk.name, error = %msg, "replication link down; reconnecting");
        disk.update(|s| {
            s.connected = false;
            s.reconnects += 1;
            s.last_error = Some(msg.clone());
            if matches!(s.state, State::Replicating | State::Resyncing) {
                s.state = State::Connecting;
            }
        });
        if welcomed {
            backoff = Duration::from_millis(100);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(
    disk: &Arc<Disk>,
    link: &Link,
    tuning: &Tuning,
    shared: &Arc<Shared>,
    welcomed: &mut bool,
) -> anyhow::Result<()> {
    let (mut rd, mut wr, mut last_seq, mut journal_end) =
        open_session(link, &disk.name, disk.size(), disk.block_size).await?;
    *welcomed = true;

    let stats = disk.journal.stats();
    // The journal cannot continue the recovery site's points: it lacks records they need, or
    // it is a new journal (the cache was lost) and its numbering means nothing to them.
    let gap = journal_end > stats.durable_seq
        || journal_end + 1 < stats.first_seq
        || (last_seq > 0 && disk.unreconciled());
    if last_seq == 0 {
        // Nothing to reconcile with: the recovery site starts from this journal.
        disk.reconciled();
    }
    let full = matches!(
        stats.state,
        ferry_journal::JournalState::ResyncRequired { .. }
    );
    let asked = disk.resync_requested();
    if gap || full || asked {
        let Some(host) = &disk.resync_host() else {
            disk.update(|s| s.state = State::ResyncRequired);
            bail!(
                "the recovery site holds journal position {journal_end} but this cache holds {}..={}: \
                 resync required (give the disk's host with --disk NAME=SIZE,qmp=,node=,nbd= to resync by checksums)",
                stats.first_seq,
                stats.durable_seq
            );
        };
        disk.update(|s| s.connected = true);
        journal_end = crate::resync::Resync {
            disk,
            host,
            tuning,
            shared,
            seq: last_seq + 1,
            journal_start: journal_end,
        }
        .run(&mut rd, &mut wr)
        .await?;
        last_seq += 1;
        disk.clear_resync_request();
        disk.reconciled();
        if let Some(g) = &disk.group {
            // Its journal was re-based: its position in the cut under way means nothing now.
            g.leave_cut(&disk.name);
        }
        disk.update(|s| s.state = State::Replicating);
    }
    trim(disk, journal_end).await?;
    let limit = link.limit_mbit(&disk.name);
    let share = link.share(&disk.name);
    disk.update(|s| {
        s.connected = true;
        s.last_error = None;
        s.bandwidth_limit_mbit = limit;
        s.uplink = share;
        s.acked_seq = last_seq;
        s.acked_journal_seq = journal_end;
        if s.state == State::Connecting {
            s.state = State::Replicating;
        }
    });
    tracing::info!(disk = %disk.name, last_seq, journal_end, "replication resumed");

    let (ack_tx, mut ack_rx) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let m = read_msg(&mut rd).await;
            let stop = m.is_err();
            if ack_tx.send(m).await.is_err() || stop {
                break;
            }
        }
    });
    let _reader = AbortOnDrop(reader);

    let mut pos = journal_end;
    let mut next_seq = last_seq + 1;
    let mut inflight: VecDeque<InFlight> = VecDeque::new();
    let mut tick = tokio::time::interval(tuning.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut more = false;
    let mut sent = Sent::default();
    loop {
        let can_send = inflight.len() < tuning.window;
        tokio::select! {
            m = ack_rx.recv() => {
                let m = m.ok_or_else(|| anyhow!("connection reader ended"))?;
                match m.context("reading from the master target")? {
                    Msg::Committed { seq, journal_end } => {
                        let f = inflight.pop_front().ok_or_else(|| anyhow!("acknowledgement of {seq} with nothing in flight"))?;
                        if f.seq != seq || f.journal_end != journal_end {
                            bail!("acknowledgement of {seq}/{journal_end}, expected {}/{}", f.seq, f.journal_end);
                        }
                        trim(disk, journal_end).await?;
                        {
                            let mut known = shared.known.lock().expect("known lock");
                            if known.len() + f.chunks.len() > KNOWN_LIMIT {
                                known.clear();
                            }
                            known.extend(f.chunks);
                        }
                        if f.app {
                            disk.clear_app_mark(journal_end);
                        }
                        if let (Some(g), Some(id)) = (&disk.group, f.group_cut) {
                            g.done(&disk.name, id);
                        }
                        let limit = link.limit_mbit(&disk.name);
                        disk.update(|s| {
                            s.acked_seq = seq;
                            s.bandwidth_limit_mbit = limit;
                            s.acked_journal_seq = journal_end;
                            s.acked_point_created_unix_ns = f.created_unix_ns;
                            if let Some(id) = f.group_cut {
                                s.group_cut_unix_ns = id;
                            }
                            if f.app {
                                s.app_points += 1;
                                s.last_app_point_seq = seq;
                            }
                        });
                    }
                    Msg::Rejected { seq, reason, chunk, message } => {
                        if reason == RejectReason::MissingChunk {
                            shared.known.lock().expect("known lock").clear();
                        }
                        bail!("checkpoint {seq} rejected ({reason:?}, chunk {chunk:?}): {message}");
                    }
                    other => bail!("unexpected message {other:?}"),
                }
            }
            _ = tick.tick(), if can_send && !more => {
                if disk.grow_requested().is_some() {
                    tracing::info!(disk = %disk.name, "ending the session for a growth");
                    return Ok(());
                }
                if disk.resync_requested() || (disk.host.is_some() && matches!(disk.journal.state(), ferry_journal::JournalState::ResyncRequired { .. })) {
                    bail!("a checksum resync is due; starting it on a fresh connection");
                }
                (pos, next_seq, more) = ship(disk, tuning, shared, &mut wr, &mut inflight, (pos, next_seq), &mut sent).await?;
            }
            _ = std::future::ready(()), if can_send && more => {
                (pos, next_seq, more) = ship(disk, tuning, shared, &mut wr, &mut inflight, (pos, next_seq), &mut sent).await?;
            }
        }
    }
}

/// The two halves of a replication connection.
pub type SessionReader = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<Wire>>;
pub type SessionWriter = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<Wire>>;
/// The TCP connection under a session's TLS, limited by its machine's bandwidth policy.
pub type Wire = Throttled<TcpStream>;

/// Connect to the master target for one disk: TCP, TLS, Hello; returns the halves and the
/// master target's `(last_seq, journal_end)`.
pub async fn open_session(
    link: &Link,
    disk: &str,
    disk_size: u64,
    block_size: u32,
) -> anyhow::Result<(SessionReader, SessionWriter, u64, u64)> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&link.addr))
        .await
        .context("connect timed out")?
        .with_context(|| format!("connect to {}", link.addr))?;
    tcp.set_nodelay(true)?;
    let tcp = Throttled::new(tcp, link.throttle(disk).cloned());
    let connector = tokio_rustls::TlsConnector::from(link.tls.clone());
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(link.server_name.clone(), tcp),
    )
    .await
    .context("TLS handshake timed out")?
    .context("TLS handshake")?;
    let (mut rd, mut wr) = tokio::io::split(tls);
    let hello = Msg::Hello {
        version: VERSION,
        disk: disk.to_string(),
        disk_size,
        block_size,
    };
    wr.write_all(&hello.encode()).await?;
    wr.flush().await?;
    let welcome = tokio::time::timeout(Duration::from_secs(15), read_msg(&mut rd))
        .await
        .context("no answer to hello")??;
    match welcome {
        Msg::Welcome {
            last_seq,
            journal_end,
            ..
        } => Ok((rd, wr, last_seq, journal_end)),
        Msg::Rejected { message, .. } => bail!("master target refused the disk: {message}"),
        other => bail!("unexpected answer to hello: {other:?}"),
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn trim(disk: &Arc<Disk>, upto: u64) -> anyhow::Result<()> {
    let j = disk.journal.clone();
    tokio::task::spawn_blocking(move || j.trim_upto(upto))
        .await?
        .context("trimming the journal")?;
    disk.refresh_journal_stats();
    Ok(())
}

/// Cut the next checkpoint (if anything was written) and send it.
async fn ship<W: tokio::io::AsyncWrite + Unpin>(
    disk: &Arc<Disk>,
    tuning: &Tuning,
    shared: &Arc<Shared>,
    wr: &mut W,
    inflight: &mut VecDeque<InFlight>,
    (pos, seq): (u64, u64),
    sent: &mut Sent,
) -> anyhow::Result<(u64, u64, bool)> {
    let (d, t, sh) = (disk.clone(), tuning.clone(), shared.clone());
    let skip = (sent.mark, sent.group_cut);
    let cut = tokio::task::spawn_blocking(move || build(&d, &t, &sh, pos, seq, skip)).await??;
    disk.refresh_journal_stats();
    let Some(cut) = cut else {
        return Ok((pos, seq, false));
    };
    let mut bytes = 0u64;
    for f in &cut.frames {
        wr.write_all(f).await?;
        bytes += f.len() as u64;
    }
    wr.flush().await?;
    if cut.app {
        sent.mark = Some(cut.journal_end);
    }
    if cut.group_cut.is_some() {
        sent.group_cut = cut.group_cut;
    }
    inflight.push_back(InFlight {
        seq,
        journal_end: cut.journal_end,
        app: cut.app,
        created_unix_ns: cut.created_unix_ns,
        chunks: cut.chunks,
        group_cut: cut.group_cut,
    });
    disk.update(|s| {
        s.checkpoints_sent += 1;
        s.bytes_sent += bytes;
    });
    Ok((cut.journal_end, seq + 1, cut.more))
}

fn build(
    disk: &Disk,
    tuning: &Tuning,
    shared: &Shared,
    pos: u64,
    seq: u64,
    (mark_sent, cut_sent): (Option<u64>, Option<u64>),
) -> anyhow::Result<Option<Cut>> {
    // A disk of a consistency group sends only checkpoints that end at (or, for a large one,
    // lead up to) the group's cut, asked for before the journal is read: the cut's position
    // is then at or before everything read below.
    let group_cut = match &disk.group {
        None => None,
        Some(g) => match g.cut_for(&disk.name, cut_sent) {
            None => return Ok(None),
            Some(c) if c.end < pos => {
                // Behind what the recovery site already holds (its journal was re-based).
                g.done(&disk.name, c.id);
                return Ok(None);
            }
            Some(c) => Some(c),
        },
    };
    // Read the journal under the mark's lock: a mark set later lies past everything read here.
    let (records, mark) = {
        let mark = disk.app_mark.lock().expect("mark lock");
        disk.journal.sync().context("journal sync")?;
        let records = disk
            .journal
            .read_durable(pos, tuning.max_checkpoint_bytes)
            .context("reading the journal")?;
        (records, mark.filter(|&m| Some(m) != mark_sent))
    };
    let mark = match mark {
        Some(m) if m < pos => {
            // Cannot happen while the mark is set before the thaw; never tag a wrong point.
            tracing::error!(disk = %disk.name, mark = m, pos, "application-consistent mark behind the shipper; dropped");
            disk.clear_app_mark(m);
            None
        }
        m => m,
    };
    // Nothing was written since the last point, which already ends at the mark (or the
    // group's cut): an empty checkpoint records that this moment is application-consistent
    // (or this disk's part of the machine's cut).
    let at_cut = |end: u64| group_cut.is_some_and(|c| c.end == end);
    if records.is_empty() && mark != Some(pos) && !at_cut(pos) {
        return Ok(None);
    }
    // A mark or a cut ends the checkpoint; whichever comes first.
    let limit = match (mark, group_cut.map(|c| c.end)) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    };
    // Read after the records: a record past an older size can only follow the growth that
    // allowed it. (A growth runs between sessions, so this is the session's size; were it not,
    // the master target would refuse the checkpoint rather than lose a write to a clamp.)
    let size = disk.size();
    let mut builder = Builder::new(size, disk.block_size);
    let mut end = pos;
    let mut bytes = 0usize;
    for r in &records {
        if limit.is_some_and(|l| r.seq > l) {
            break;
        }
        builder.apply(r);
        end = r.seq;
        if let ferry_journal::OwnedOp::Write { data, .. } = &r.op {
            bytes += data.len();
        }
        if builder.touched() >= tuning.max_checkpoint_blocks {
            break;
        }
    }
    let more =
        end < records.last().map(|r| r.seq).unwrap_or(end) || bytes >= tuning.max_checkpoint_bytes;
    let app = mark == Some(end);
    let cut_id = group_cut.filter(|c| c.end == end).map(|c| c.id);
    if end == pos && !app && cut_id.is_none() {
        return Ok(None);
    }
    let created_unix_ns = cut_id.unwrap_or_else(now_unix_ns);
    let blocks = {
        let known = shared.known.lock().expect("known lock");
        builder.finish(&shared.key, &disk.name, seq, &known, disk.compress)
    };
    let mut frames = Vec::with_capacity(blocks.len() + 2);
    frames.push(
        Msg::Begin(Checkpoint {
            seq,
            created_unix_ns,
            journal_start: pos,
            journal_end: end,
            disk_size: size,
            block_size: disk.block_size,
            consistency: if app {
                Consistency::Application
            } else {
                Consistency::Crash
            },
            group_cut: cut_id,
        })
        .encode(),
    );
    let mut chunks = Vec::new();
    let count = blocks.len() as u64;
    for b in blocks {
        if let (Some(id), BlockBody::Chunk { .. }) = (b.chunk, &b.body) {
            chunks.push(id);
        }
        frames.push(
            Msg::Block {
                index: b.index,
                body: b.body,
            }
            .encode(),
        );
    }
    frames.push(Msg::End { seq, blocks: count }.encode());
    Ok(Some(Cut {
        journal_end: end,
        app,
        frames,
        chunks,
        more,
        created_unix_ns,
        group_cut: cut_id,
    }))
}
