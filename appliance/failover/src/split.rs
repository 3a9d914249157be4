//! The protected site's side of a checksum resync split between the sites (reprotect,
//! failback): the role that has the original disk (the process server of its machine) runs it.
//!
//! The original disk is opened here, where it is, and written over NBD: an image path is
//! opened by a local qemu-storage-daemon, as [`crate::resync`] does; a disk given by its host
//! (`qmp=SOCKET,node=NODE,nbd=SOCKET`, the inventory's host form) is written through that host,
//! over a writable NBD export of its node that the resync adds on the host's NBD server and
//! removes at the end, whatever the end ([`HOST_EXPORT`] says how one left by a process that
//! died is removed). Either way the guest is stopped meanwhile (the jobs' pre-hooks). The live
//! disk stays at
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
//! A connection that is lost (a link flap, a NAT that forgot it, the master target restarted:
//! [`FailoverError::Lost`]) is opened again with a growing wait ([`Retry`]), and the resync
//! goes on from the first block it had not settled (compared, and written if it differed), not
//! from the start: the blocks before it are not asked about or fetched again. The step fails
//! when the master target stays out of reach for the retry budget, or at once for what another
//! connection would not change: TLS refusing either side's certificate, the master target
//! refusing the resync (no such live disk, another size), an answer that does not fit (another
//! block, a malformed or unauthentic one), the original disk failing. A resync whose process
//! dies leaves the step unfinished (the order runs again), a failed one runs again with its
//! job; either way only what still differs is sent. The job says the disk is resynced only
//! when a run reached its end.

use crate::resync::{format_of, nbd, quit_leftover, BLOCK};
use crate::{io, FailoverError, Result};
use ferry_api::ResyncReport;
use ferry_chunk::{ChunkId, TenantKey};
use ferry_master_target::resync::block_name;
use ferry_nbd::client::Client;
use ferry_process_server::resync::HostDisk;
use ferry_process_server::throttle::Throttled;
use ferry_wire::{read_msg, BlockBody, Msg, VERSION};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
/// only after each batch, so the step's detail keeps moving meanwhile. A master target silent
/// for this long (a link that drops everything) is taken for a lost connection.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// How a resync rides out losing its connection to the master target.
#[derive(Clone, Debug)]
pub struct Retry {
    /// How long the master target may stay out of reach before the step fails: counted from
    /// the loss of a connection, and from zero again once a new connection made progress.
    pub budget: Duration,
    /// The wait before the first attempt to connect again; it doubles after each attempt that
    /// fails, up to `longest_wait`.
    pub first_wait: Duration,
    pub longest_wait: Duration,
    /// While an answer is awaited and no request has gone out for this long, block 0's name is
    /// asked for (the answer is dropped): the master target closes a resync connection on
    /// which nothing arrives for 120 s (`ferry_master_target::IDLE_TIMEOUT`), and at a low
    /// bandwidth limit the blocks it has already written into the connection can take longer
    /// than that to come through.
    pub keepalive: Duration,
}

impl Default for Retry {
    /// Five minutes of trying, first after 1 s, then 2, 4, 8, 16 and every 30 s.
    fn default() -> Retry {
        Retry {
            budget: Duration::from_secs(300),
            first_wait: Duration::from_secs(1),
            longest_wait: Duration::from_secs(30),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// What the protected site's role needs to resync from the recovery site.
pub struct Protected {
    /// The master target, as this role replicates to it (address, TLS client identity).
    pub link: ferry_process_server::Link,
    /// The tenant key: names blocks, opens the sealed blocks the master target sends.
    pub key: Arc<TenantKey>,
    /// Where the daemons that open original disks keep their sockets while they run.
    pub work: std::path::PathBuf,
    /// How a lost connection to the master target is opened again.
    pub retry: Retry,
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

fn lost(m: impl Into<String>) -> FailoverError {
    FailoverError::Lost(m.into())
}

/// An I/O error on the resync connection, `what` doing: TLS refusing (a certificate either side
/// does not trust, an alert) is for good; anything else (reset, cut, closed) is a lost
/// connection.
fn link_error(what: String, e: std::io::Error) -> FailoverError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<tokio_rustls::rustls::Error>());
    match tls {
        Some(t) => refused(format!("{what}: TLS: {t}")),
        // (rustls's own words for it point at its manual.)
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => lost(format!(
            "{what}: the connection was closed (did the master target stop?)"
        )),
        None => lost(format!("{what}: {e}")),
    }
}

/// Bring the original disk `original` (an image path at this site, or the disk on its host in
/// the inventory's host form) up to date from `live` at
/// the recovery site. `progress` is told after each batch, as [`crate::resync::run`] tells it,
/// and after each block written (a limited resync fetches a batch's blocks slowly); while the
/// connection is being opened again, with what is being done (`reconnecting (attempt 3)
/// after: ...`). Blocking: call it off the runtime.
pub fn run(
    p: &Protected,
    live: &LiveDisk,
    original: &str,
    progress: &mut dyn FnMut(&ResyncReport, Option<&str>),
) -> Result<ResyncReport> {
    let host = HostDisk::from_source(original).map_err(|e| {
        refused(format!(
            "disk {}'s original cannot be written: {e}",
            live.disk
        ))
    })?;
    let scratch = scratch_dir(&p.work, live);
    std::fs::create_dir_all(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
    quit_leftover(&scratch);
    remove_leftover_export(&scratch);
    if let Some(host) = host {
        return run_on_host(p, live, &host, &scratch, progress);
    }
    let image = Path::new(original);
    let format = format_of(image)?;
    let mut qsd = ferry_qemu::StorageDaemon::start(image, &format, &scratch)?;
    let sock = scratch.join("target.sock");
    let r = qsd
        .export("disk0", "target", &sock)
        .map_err(FailoverError::from);
    let r = r.and_then(|()| resync_into(p, live, &sock, "target", progress));
    qsd.stop();
    r
}

/// Where the resync of `live` keeps what it runs with (a daemon's sockets, the note of its
/// export on a host), below the role's resync work directory `work`.
fn scratch_dir(work: &Path, live: &LiveDisk) -> PathBuf {
    work.join(&live.tenant)
        .join(&live.plan)
        .join(format!("{}.{}", live.machine, live.disk))
}

/// Resync the original disk served as NBD export `export` on the unix socket `sock`, and
/// flush it.
fn resync_into(
    p: &Protected,
    live: &LiveDisk,
    sock: &Path,
    export: &str,
    progress: &mut dyn FnMut(&ResyncReport, Option<&str>),
) -> Result<ResyncReport> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("starting a runtime"))?;
    rt.block_on(async {
        let mut c = Client::connect_unix(sock, export).await.map_err(nbd)?;
        let r = resync(p, live, &mut c, progress).await?;
        c.flush().await.map_err(nbd)?;
        let _ = c.disconnect().await;
        Ok(r)
    })
}

/// The file in a resync's scratch directory that names the writable export it added on the
/// original disk's host, while that export may exist (it is written before the export is
/// added and removed after the export is): a resync whose process died leaves it, and the
/// export is removed at the next start ([`remove_leftover_export`]).
pub const HOST_EXPORT: &str = "host-export.json";
/// How long the host's QMP socket may take to answer (it serves one client at a time).
const QMP_WAIT: Duration = Duration::from_secs(10);

/// The id (and NBD name) of the writable export a resync of `live` adds on the original
/// disk's host: one per tenant, plan, machine and disk, so that it meets no other export there
/// (the guest's, the process server's `ferry-live-*`), and a leftover one is replaced. QEMU
/// takes letters, digits, `-`, `.` and `_` in an id.
pub fn export_id(live: &LiveDisk) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!(
        "ferry-resync.{}.{}.{}.{}",
        clean(&live.tenant),
        clean(&live.plan),
        clean(&live.machine),
        clean(&live.disk)
    )
}

/// A writable export of the original disk's node on its host, removed when dropped (a failed
/// or panicking resync) or by [`HostExport::remove`], which says whether that worked.
struct HostExport {
    qmp: PathBuf,
    id: String,
    note: PathBuf,
    done: bool,
}

impl HostExport {
    /// Add the export `id` of `host`'s node, noted in `note` first.
    fn add(host: &HostDisk, id: &str, note: PathBuf) -> Result<HostExport> {
        let mut q = connect_host(&host.qmp)?;
        let body = serde_json::json!({"qmp": host.qmp, "id": id}).to_string();
        std::fs::write(&note, body).map_err(io(format!("writing {}", note.display())))?;
        let e = HostExport {
            qmp: host.qmp.clone(),
            id: id.to_string(),
            note,
            done: false,
        };
        let added = ferry_qemu::fleece::add_export(&mut q, &host.nbd_socket, &host.node, id, true);
        // (The socket serves one client at a time: free it before anything else asks.)
        drop(q);
        // Should that have failed, dropping `e` removes whatever was made.
        added?;
        Ok(e)
    }

    fn remove(mut self) -> Result<()> {
        self.done = true;
        remove_export(&self.qmp, &self.id, &self.note)
    }
}

impl Drop for HostExport {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = remove_export(&self.qmp, &self.id, &self.note) {
                tracing::warn!(export = %self.id, qmp = %self.qmp.display(), error = %e, "could not remove the resync's export from the host; the next resync of the disk (or the role's next start) removes it");
            }
        }
    }
}

/// Connect to the host's QMP socket `qmp`, saying what a socket that does not answer means.
fn connect_host(qmp: &Path) -> Result<ferry_qemu::Qmp> {
    ferry_qemu::Qmp::connect(qmp, QMP_WAIT).map_err(|e| match e {
        ferry_qemu::QemuError::Timeout(_) => refused(format!(
            "the host's QMP socket {} did not answer within {} s: another client holds it (a \
             QMP socket serves one at a time; a periodically protected disk's process server \
             holds its host's)",
            qmp.display(),
            QMP_WAIT.as_secs()
        )),
        e => e.into(),
    })
}

/// Remove export `id` from the host whose QMP socket is `qmp` (dropping its connections), then
/// its note `note`.
fn remove_export(qmp: &Path, id: &str, note: &Path) -> Result<()> {
    let mut q = connect_host(qmp)?;
    ferry_qemu::fleece::remove_export(&mut q, id)?;
    drop(q);
    let _ = std::fs::remove_file(note);
    Ok(())
}

/// Remove the export that an interrupted resync whose scratch directory is `scratch` left on
/// a host (its note says which, [`HOST_EXPORT`]). Best effort: a host out of reach keeps the
/// note for the next time.
pub fn remove_leftover_export(scratch: &Path) {
    let note = scratch.join(HOST_EXPORT);
    let Ok(body) = std::fs::read(&note) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let (Some(qmp), Some(id)) = (v["qmp"].as_str(), v["id"].as_str()) else {
        let _ = std::fs::remove_file(&note);
        return;
    };
    tracing::warn!(export = %id, qmp = %qmp, "removing an export an interrupted resync left on the host");
    if let Err(e) = remove_export(Path::new(qmp), id, &note) {
        tracing::warn!(export = %id, qmp = %qmp, error = %e, "could not remove the export an interrupted resync left on the host");
    }
}

/// At a role's start: remove the exports that the resyncs of a process that died left on
/// hosts, below the role's resync work directory `work` (`{tenant}/{plan}/{machine}.{disk}`).
pub fn remove_leftover_exports(work: &Path) {
    let dirs = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default()
    };
    for tenant in dirs(work) {
        for plan in dirs(&tenant) {
            for disk in dirs(&plan) {
                if disk.join(HOST_EXPORT).exists() {
                    remove_leftover_export(&disk);
                }
            }
        }
    }
}

/// The resync of an original disk given by its host (`qmp=...`): a writable NBD export of the
/// disk's node is added on the host's NBD server, the resync writes through it, and the export
/// is removed at the end, whatever the end (the guest must be stopped meanwhile, as for an
/// image: the jobs' pre-hooks do it).
fn run_on_host(
    p: &Protected,
    live: &LiveDisk,
    host: &HostDisk,
    scratch: &Path,
    progress: &mut dyn FnMut(&ResyncReport, Option<&str>),
) -> Result<ResyncReport> {
    let id = export_id(live);
    let export = HostExport::add(host, &id, scratch.join(HOST_EXPORT))?;
    tracing::info!(disk = %live.disk, export = %id, qmp = %host.qmp.display(), "resync: writing the original disk through its host");
    let r = resync_into(p, live, &host.nbd_socket, &id, progress);
    let removed = export.remove();
    let r = r?;
    removed.map_err(|e| {
        refused(format!(
            "the resync of {} ended, but its export {id} could not be removed from the host:              {e} (the next resync of the disk removes it)",
            live.disk
        ))
    })?;
    Ok(r)
}

/// How far a resync has come, over however many connections: every block before `from` was
/// compared and, if it differed, written; `report` counts what was done.
#[derive(Default)]
struct Resume {
    from: u64,
    report: ResyncReport,
}

/// The resync of the original disk `c` from `live`, over as many connections as it takes:
/// each lost one is opened again after a wait that grows ([`Retry`]), and the resync goes on
/// from where it was; an outage longer than the budget, or any other error, ends it.
async fn resync<S>(
    p: &Protected,
    live: &LiveDisk,
    c: &mut Client<S>,
    progress: &mut dyn FnMut(&ResyncReport, Option<&str>),
) -> Result<ResyncReport>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let retry = &p.retry;
    let mut at = Resume::default();
    // Since when the master target has been out of reach, and how many attempts were made.
    let mut outage: Option<(Instant, u64)> = None;
    let mut wait = retry.first_wait;
    loop {
        let before = (at.from, at.report.blocks_sent);
        let why = match session(p, live, c, &mut at, progress).await {
            Ok(()) => return Ok(at.report),
            Err(FailoverError::Lost(why)) => why,
            Err(e) => return Err(e),
        };
        if (at.from, at.report.blocks_sent) != before {
            // The connection got somewhere: a new outage begins, with the whole budget.
            outage = None;
            wait = retry.first_wait;
        }
        let (since, attempts) = outage.get_or_insert((Instant::now(), 0));
        let out_for = since.elapsed();
        if out_for >= retry.budget {
            return Err(refused(format!(
                "gave up on the master target {} after {attempts} attempts to reconnect \
                 in {} s (the retry budget): {why}",
                p.link.addr,
                out_for.as_secs()
            )));
        }
        *attempts += 1;
        at.report.reconnects += 1;
        let note = format!(
            "reconnecting (attempt {attempts}) after: {}",
            clip(&why, 300)
        );
        tracing::warn!(tenant = %live.tenant, plan = %live.plan, machine = %live.machine, disk = %live.disk, attempt = *attempts, error = %why, "resync connection lost; reconnecting");
        progress(&at.report, Some(&note));
        // The last attempt is made when the budget ends.
        tokio::time::sleep(wait.min(retry.budget - out_for)).await;
        wait = (wait * 2).min(retry.longest_wait);
    }
}

/// `s` cut to at most `n` characters.
fn clip(s: &str, n: usize) -> String {
    if s.chars().count() > n {
        format!("{}...", s.chars().take(n).collect::<String>())
    } else {
        s.to_string()
    }
}

/// One connection's part of the resync: connect, and compare and fetch from `at`.
async fn session<S>(
    p: &Protected,
    live: &LiveDisk,
    c: &mut Client<S>,
    at: &mut Resume,
    progress: &mut dyn FnMut(&ResyncReport, Option<&str>),
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut rd, mut wr) = connect(p, live, c.size()).await?;
    let r = compare_and_fetch(
        &mut rd,
        &mut wr,
        c,
        &p.key,
        p.retry.keepalive,
        at,
        &mut |r| progress(r, None),
    )
    .await;
    // Bounded: TLS's goodbye goes through the machine's throttle, and a master target that
    // stopped reading must not hold the resync's end (or its error) forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
    r.map(|_| ())
}

/// The TCP connection under the resync's TLS, limited both ways by the machine's bandwidth
/// policy (the blocks come from the master target, so its reads are what is limited).
type Wire = Throttled<tokio::net::TcpStream>;
type Reader = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<Wire>>;
type Writer = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<Wire>>;

/// Open a resync connection for `live`, whose original is `size` bytes.
async fn connect(p: &Protected, live: &LiveDisk, size: u64) -> Result<(Reader, Writer)> {
    let addr = &p.link.addr;
    let at = |what: &str| format!("master target {addr}: {what}");
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| lost(at("connecting timed out")))?
    .map_err(|e| lost(at(&format!("cannot connect: {e}"))))?;
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
    .map_err(|_| lost(at("TLS handshake timed out")))?
    .map_err(|e| link_error(at("TLS handshake"), e))?;
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
    match answer(&mut rd).await {
        Ok(Msg::ResyncWelcome {
            disk_size,
            block_size,
            ..
        }) if disk_size == size && u64::from(block_size) == BLOCK => Ok((rd, wr)),
        Ok(Msg::ResyncWelcome {
            disk_size,
            block_size,
            ..
        }) => Err(refused(format!(
            "the master target answered for a live disk of {disk_size} bytes in blocks of \
             {block_size}, but {}'s original is {size} bytes in blocks of {BLOCK}: not the same disk",
            live.disk
        ))),
        Ok(other) => Err(malformed(format!(
            "{} in answer to the resync's hello",
            brief(&other)
        ))),
        Err(e) => Err(e),
    }
}

/// A message in a few words (a block's blob is not worth printing).
fn brief(m: &Msg) -> String {
    clip(&format!("{m:?}"), 120)
}

fn malformed(what: String) -> FailoverError {
    refused(format!("the master target's answer makes no sense: {what}"))
}

/// Send a request. Bounded like an answer: a master target that stops reading (or a link that
/// stops taking anything) is taken for a lost connection instead of holding the resync forever.
async fn send<W: AsyncWrite + Unpin>(wr: &mut W, m: &Msg) -> Result<()> {
    let sent = tokio::time::timeout(ANSWER_TIMEOUT, async {
        wr.write_all(&m.encode()).await?;
        wr.flush().await
    })
    .await;
    match sent {
        Err(_) => Err(lost(format!(
            "the master target took no request for {} s",
            ANSWER_TIMEOUT.as_secs()
        ))),
        Ok(r) => r.map_err(|e| link_error("writing to the master target".into(), e)),
    }
}

async fn answer<R: AsyncRead + Unpin>(rd: &mut R) -> Result<Msg> {
    match tokio::time::timeout(ANSWER_TIMEOUT, read_msg(rd)).await {
        Err(_) => Err(lost(format!(
            "the master target did not answer within {} s",
            ANSWER_TIMEOUT.as_secs()
        ))),
        Ok(Err(ferry_wire::WireError::Closed)) => Err(lost(
            "the master target closed the resync connection (did it stop?)",
        )),
        Ok(Err(ferry_wire::WireError::Io(e))) => {
            Err(link_error("reading from the master target".into(), e))
        }
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
    /// The name of block 0 again, asked only so that the connection is not idle (the
    /// smallest request the master target answers); the answer is dropped.
    Alive,
}

/// The resync connection as this side drives it: what was asked and is not answered yet, in
/// the order asked (the order the master target answers in), and when a request last went out.
struct Peer<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    asked: VecDeque<Asked>,
    sent: Instant,
    keepalive: Duration,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Peer<'_, R, W> {
    /// Send `m`, whose answers will be `answers`.
    async fn ask(&mut self, m: &Msg, answers: impl IntoIterator<Item = Asked>) -> Result<()> {
        send(self.wr, m).await?;
        self.asked.extend(answers);
        self.sent = Instant::now();
        Ok(())
    }

    /// The next answer, with what it answers. While it is awaited, a request for block 0's
    /// name goes out whenever nothing else went out for [`Retry::keepalive`], so that the
    /// master target sees the connection alive while its earlier answers come through a slow
    /// link.
    async fn next(&mut self) -> Result<(Asked, Msg)> {
        let Some(want) = self.asked.pop_front() else {
            return Err(malformed("an answer to nothing asked".into()));
        };
        // (An answer to a keepalive is not worth keeping the connection alive for.)
        let keep = !matches!(want, Asked::Alive);
        let read = answer(self.rd);
        tokio::pin!(read);
        loop {
            let due = tokio::time::Instant::from_std(self.sent + self.keepalive);
            tokio::select! {
                m = &mut read => return Ok((want, m?)),
                () = tokio::time::sleep_until(due), if keep => {
                    send(self.wr, &Msg::IdsRequest { first: 0, count: 1 }).await?;
                    self.asked.push_back(Asked::Alive);
                    self.sent = Instant::now();
                }
            }
        }
    }

    /// The first block not settled when the next batch to compare begins at `first`: the
    /// first block asked for and not written yet, or `first`.
    fn settled(&self, first: u64) -> u64 {
        self.asked
            .iter()
            .find_map(|a| match a {
                Asked::Block { index, .. } => Some(*index),
                _ => None,
            })
            .map_or(first, |i| i.min(first))
    }
}

/// Compare the disk from block `at.from` batch by batch, fetching and writing the blocks that
/// differ, counting in `at.report`. The names of the next [`AHEAD`] batches are asked for
/// before a batch's blocks are fetched, so a long round trip costs once, not per batch; the
/// answers come in the order asked, and what is asked and not answered stays small (a few
/// requests), so neither side blocks the other. `at.from` follows the blocks settled, so that
/// after an error a new connection can go on from there.
async fn compare_and_fetch<R, W, S>(
    rd: &mut R,
    wr: &mut W,
    c: &mut Client<S>,
    key: &TenantKey,
    keepalive: Duration,
    at: &mut Resume,
    progress: &mut dyn FnMut(&ResyncReport),
) -> Result<ResyncReport>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let size = c.size();
    at.report.disk_bytes = size;
    let blocks = size.div_ceil(BLOCK);
    let mut peer = Peer {
        rd,
        wr,
        asked: VecDeque::new(),
        sent: Instant::now(),
        keepalive,
    };
    let mut names: VecDeque<(u64, Vec<ChunkId>)> = VecDeque::new();
    let (mut first, mut next) = (at.from, at.from);
    while first < blocks {
        // Ask ahead for the names of the next batches.
        while next < blocks && next - first < AHEAD * BATCH {
            let count = BATCH.min(blocks - next);
            let ids = Msg::IdsRequest {
                first: next,
                count: count as u32,
            };
            peer.ask(&ids, [Asked::Ids { first: next, count }]).await?;
            next += count;
        }
        // Take answers (writing the blocks of earlier batches) until this batch's names came.
        while names.front().is_none_or(|(f, _)| *f != first) {
            if take_answer(&mut peer, &mut names, c, key, &mut at.report).await? {
                at.from = peer.settled(first);
                progress(&at.report);
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
        // Blocks compared again after a reconnection are not counted twice.
        at.report.blocks_compared = at.report.blocks_compared.max(first + count);
        at.report.hash_bytes += 32 * count;
        if !differ.is_empty() {
            let fetch = Msg::FetchRequest {
                indices: differ.iter().map(|i| first + i).collect(),
            };
            let blocks = differ.iter().map(|&i| Asked::Block {
                index: first + i,
                len: block(i).len(),
            });
            peer.ask(&fetch, blocks).await?;
        }
        first += count;
        at.from = peer.settled(first);
        progress(&at.report);
    }
    while !peer.asked.is_empty() {
        if take_answer(&mut peer, &mut names, c, key, &mut at.report).await? {
            at.from = peer.settled(first);
            progress(&at.report);
        }
    }
    at.from = blocks;
    Ok(at.report)
}

/// Take the master target's next answer, checked against what it answers: names are kept in
/// `names`, a block is opened and written. True: a block was written.
async fn take_answer<R, W, S>(
    peer: &mut Peer<'_, R, W>,
    names: &mut VecDeque<(u64, Vec<ChunkId>)>,
    c: &mut Client<S>,
    key: &TenantKey,
    r: &mut ResyncReport,
) -> Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    match peer.next().await? {
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
        (Asked::Alive, Msg::Ids { first: 0, ids }) if ids.len() == 1 => Ok(false),
        (Asked::Alive, other) => Err(malformed(format!("{} for block 0's name", brief(&other)))),
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
mod tests;
