//! Periodic protection: replicate a disk on a QEMU host from its dirty bitmaps.
//!
//! Each interval, one QMP transaction freezes a point-in-time view of the disk and swaps its
//! recording dirty bitmap for a fresh one (see `ferry_qemu::fleece`). The view is read over NBD:
//! only the blocks the frozen bitmap marks dirty, as they were at the cut, while the guest keeps
//! writing. They become one checkpoint, so every recovery point is the disk at one instant.
//! The disks of one machine on one host (a `group`) are frozen in the SAME transaction, so
//! their points at a cut are the machine at one instant; they are read one after the other
//! over one QMP connection (a QMP socket serves one client at a time).
//!
//! What the bitmaps say decides what a cut sends:
//! - no recovery point yet: a **seed**: every allocated, non-zero block (`base:allocation`);
//! - a recording bitmap of ours: **incremental**: its dirty blocks (earlier bitmaps left by a
//!   failed interval are merged into it first, so nothing is lost by a failure);
//! - a bitmap QEMU marks inconsistent (it died without saving it), or none although the
//!   recovery site has points: a **checksum resync**: every block is read and named with the
//!   tenant key, the master target's names for the same blocks are fetched (32 bytes per
//!   block), and only blocks whose names differ cross the WAN. Never a blind full copy.
//!
//! The old bitmap is dropped only after the master target has committed the point.

use crate::bulk::{self, Report};
use crate::shipper::{open_session, Link, SessionReader, SessionWriter, Shared, KNOWN_LIMIT};
use crate::status::{self, now_unix_ns, DiskStatus, State};
use anyhow::{anyhow, bail, Context};
use ferry_nbd::client::{Client, ClientOptions, Extent};
use ferry_nbd::proto::{STATE_HOLE, STATE_ZERO};
use ferry_qemu::fleece::{self, Bitmap, Fleece};
use ferry_qemu::Qmp;
use ferry_wire::{Checkpoint, Consistency, Msg};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Where a periodically protected disk lives on its host.
#[derive(Clone, Debug)]
pub struct PeriodicSpec {
    pub name: String,
    pub size: u64,
    /// The host QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The disk's block node on the host.
    pub node: String,
    /// A unix socket where the host's NBD server serves the views.
    pub nbd_socket: PathBuf,
    /// A file on the host for the view's copied-aside data.
    pub fleece_file: String,
    pub interval: Duration,
    /// How its chunks are compressed (the policy's `compression`).
    pub compress: ferry_chunk::Compression,
    /// The protected machine: the disks of one machine on one host are cut together.
    pub group: Option<String>,
    /// Its machine's weight in the appliance's uplink (the policy's `priority`).
    pub priority: crate::uplink::Priority,
}

/// A periodic disk's status, kept in memory and written out on every change.
struct StatusFile {
    path: PathBuf,
    status: Mutex<DiskStatus>,
}

impl StatusFile {
    fn update(&self, f: impl FnOnce(&mut DiskStatus)) {
        let mut s = self.status.lock().expect("status");
        f(&mut s);
        s.updated_unix_ns = now_unix_ns();
        if let Err(e) = status::write(&self.path, &s) {
            tracing::warn!(disk = %s.disk, error = %e, "cannot write status file");
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Mode {
    Seed,
    Incremental(String),
    Resync,
}

impl Mode {
    fn label(&self) -> &'static str {
        match self {
            Mode::Seed => "seed",
            Mode::Incremental(_) => "incremental",
            Mode::Resync => "resync",
        }
    }
}

struct Plan {
    mode: Mode,
    new_bitmap: String,
    view: Fleece,
}

/// A file in the disk's cache directory that asks for a checksum resync at the next cut
/// (`ferry resync` writes it; it is removed once the resync is committed).
pub const RESYNC_REQUEST: &str = "resync-requested";

/// Protect a group of disks of one host forever, starting over after any failure: one disk,
/// or the disks of one machine (`group`), whose views are frozen in ONE transaction at every
/// cut, so their points at a cut are one crash-consistent state of the machine, tagged with the
/// cut (`group_cut`, the cut's time) like the continuous path's consistency groups.
pub async fn protect(
    mut specs: Vec<PeriodicSpec>,
    block_size: u32,
    link: Arc<Link>,
    shared: Arc<Shared>,
    status_paths: Vec<PathBuf>,
) {
    let statuses: Vec<StatusFile> = specs
        .iter()
        .zip(status_paths)
        .map(|(spec, path)| StatusFile {
            path,
            status: Mutex::new(DiskStatus {
                disk: spec.name.clone(),
                group: spec.group.clone(),
                periodic: true,
                compression: spec.compress.to_string(),
                priority: spec.priority,
                uplink: link.share(&spec.name),
                ..Default::default()
            }),
        })
        .collect();
    let mut backoff = Duration::from_millis(200);
    loop {
        let r = run(&mut specs, block_size, &link, &shared, &statuses).await;
        let msg = match r {
            Ok(()) => "stopped".to_string(),
            Err(e) => format!("{e:#}"),
        };
        for (spec, status) in specs.iter().zip(&statuses) {
            tracing::warn!(disk = %spec.name, error = %msg, "periodic protection interrupted; retrying");
            status.update(|s| {
                s.connected = false;
                s.progress = None;
                s.reconnects += 1;
                s.last_error = Some(msg.clone());
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A member disk's replication session.
struct Session {
    rd: SessionReader,
    wr: SessionWriter,
    last_seq: u64,
    /// Cuts committed (the journal position the master target keeps for a periodic disk).
    cuts: u64,
}

async fn run(
    specs: &mut [PeriodicSpec],
    block_size: u32,
    link: &Link,
    shared: &Arc<Shared>,
    statuses: &[StatusFile],
) -> anyhow::Result<()> {
    let mut sessions = Vec::new();
    for (spec, status) in specs.iter().zip(statuses) {
        let (rd, wr, last_seq, cuts) =
            open_session(link, &spec.name, spec.size, block_size).await?;
        status.update(|s| {
            s.connected = true;
            s.acked_seq = last_seq;
            s.acked_journal_seq = cuts;
            if s.state == State::Connecting {
                s.state = State::Replicating;
            }
        });
        sessions.push(Session {
            rd,
            wr,
            last_seq,
            cuts,
        });
    }
    let qmp_path = specs[0].qmp.clone();
    let mut qmp =
        tokio::task::spawn_blocking(move || Qmp::connect(&qmp_path, Duration::from_secs(10)))
            .await?
            .context("connecting to the host's QMP socket")?;
    let interval = specs.iter().map(|s| s.interval).min().unwrap_or_default();
    let grouped = specs.iter().any(|s| s.group.is_some());
    loop {
        let requested: Vec<PathBuf> = statuses
            .iter()
            .map(|st| st.path.with_file_name(RESYNC_REQUEST))
            .collect();
        let asks: Vec<(PeriodicSpec, u64, bool)> = specs
            .iter()
            .zip(&sessions)
            .zip(&requested)
            .map(|((spec, se), r)| (spec.clone(), se.last_seq, se.last_seq > 0 && r.exists()))
            .collect();
        // Each cut's phases are timed for its log line: where an interval's time goes.
        let began = std::time::Instant::now();
        let (q, p) = tokio::task::spawn_blocking(move || {
            let p = plan(&mut qmp, &asks);
            (qmp, p)
        })
        .await?;
        qmp = q;
        let (plans, created) = match p {
            Ok(p) => p,
            Err(e) => {
                if let Some(Grown { disk, size }) = e.downcast_ref::<Grown>() {
                    if let Some(spec) = specs.iter_mut().find(|s| &s.name == disk) {
                        tracing::info!(disk = %spec.name, from = spec.size, to = size, "the disk grew; the next point has the new size");
                        spec.size = *size;
                    }
                }
                return Err(e);
            }
        };
        let group_cut = grouped.then_some(created);
        let frozen = began.elapsed();
        // The views are one instant: read them one disk after the other.
        let mut outcomes = Vec::new();
        let mut took = Vec::new();
        for (((spec, status), se), plan) in
            specs.iter().zip(statuses).zip(&mut sessions).zip(&plans)
        {
            let cut = Cut {
                seq: se.last_seq + 1,
                cuts: se.cuts,
                created,
                group_cut,
            };
            let t = std::time::Instant::now();
            let o = transfer(
                spec, block_size, shared, plan, &mut se.rd, &mut se.wr, cut, status,
            )
            .await;
            outcomes.push(o);
            took.push(t.elapsed());
        }
        let released = std::time::Instant::now();
        let oks: Vec<bool> = outcomes.iter().map(|o| o.is_ok()).collect();
        let (q, fins) = tokio::task::spawn_blocking({
            let specs = specs.to_vec();
            move || {
                let fins: Vec<anyhow::Result<()>> = specs
                    .iter()
                    .zip(&plans)
                    .zip(&oks)
                    .map(|((spec, plan), &ok)| finish(&mut qmp, spec, plan, ok))
                    .collect();
                (qmp, (fins, plans))
            }
        })
        .await?;
        qmp = q;
        let released = released.elapsed();
        let (fins, plans) = fins;
        let mut failed = None;
        for (i, (outcome, fin)) in outcomes.into_iter().zip(fins).enumerate() {
            let (spec, status, se, plan) = (&specs[i], &statuses[i], &mut sessions[i], &plans[i]);
            let report = match outcome.and_then(|r| fin.map(|()| r)) {
                Ok(r) => r,
                Err(e) => {
                    failed.get_or_insert(e.context(format!("disk {}", spec.name)));
                    continue;
                }
            };
            let label = plan.mode.label();
            if label == "resync" {
                let _ = std::fs::remove_file(&requested[i]);
            }
            se.last_seq += 1;
            se.cuts += 1;
            // freeze: the QMP transaction and the views' setup; send: reading, sealing and
            // sending the disk's blocks until the master target committed the point; release:
            // the views taken down and the bitmaps settled.
            tracing::info!(disk = %spec.name, mode = label, seq = se.last_seq, blocks = report.blocks, bytes = report.bytes,
                freeze_ms = frozen.as_millis() as u64, send_ms = took[i].as_millis() as u64, release_ms = released.as_millis() as u64,
                "recovery point committed");
            let limit = link.limit_mbit(&spec.name);
            let share = link.share(&spec.name);
            status.update(|s| {
                s.acked_seq = se.last_seq;
                s.bandwidth_limit_mbit = limit;
                s.uplink = share;
                s.acked_journal_seq = se.cuts;
                s.acked_point_created_unix_ns = created;
                if let Some(c) = group_cut {
                    s.group_cut_unix_ns = c;
                }
                s.checkpoints_sent += 1;
                s.bytes_sent += report.bytes;
                s.periodic_mode = Some(label.to_string());
                s.last_cut_blocks = report.blocks;
                s.last_cut_bytes = report.bytes;
                s.last_cut_hash_bytes = report.hash_bytes;
                s.last_error = None;
                s.progress = None;
            });
        }
        if let Some(e) = failed {
            return Err(e);
        }
        tokio::time::sleep(interval).await;
    }
}

/// Where a point of a cut goes: its sequence and journal positions, its time, its group cut.
struct Cut {
    seq: u64,
    cuts: u64,
    created: u64,
    group_cut: Option<u64>,
}

fn bitmap_prefix(disk: &str) -> String {
    format!("ferry-{disk}-")
}

/// The host's disk is larger than protected so far: reconnect with the new geometry.
#[derive(Debug)]
struct Grown {
    disk: String,
    size: u64,
}

impl std::fmt::Display for Grown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "disk {} grew to {} bytes", self.disk, self.size)
    }
}

impl std::error::Error for Grown {}

/// What one disk's next cut does, decided before the cut.
struct Prepared {
    mode: Mode,
    new_bitmap: String,
    export: String,
}

/// Decide what each disk's cut sends and tidy its bitmaps accordingly (`asks`: the disk, its
/// newest point, whether a resync was asked for), then freeze every view in one transaction.
/// Returns the plans and the cut's time.
fn plan(qmp: &mut Qmp, asks: &[(PeriodicSpec, u64, bool)]) -> anyhow::Result<(Vec<Plan>, u64)> {
    let mut prepared = Vec::new();
    for (spec, last_seq, force) in asks {
        prepared.push(prepare(qmp, spec, *last_seq, *force)?);
    }
    let cuts: Vec<fleece::Cut> = asks
        .iter()
        .zip(&prepared)
        .map(|((spec, _, _), p)| {
            let old = match &p.mode {
                Mode::Incremental(b) => Some(b.as_str()),
                _ => None,
            };
            fleece::Cut {
                node: &spec.node,
                size: spec.size,
                fleece_file: &spec.fleece_file,
                add: Some(&p.new_bitmap),
                disable: old,
                export_bitmap: old,
                export: &p.export,
            }
        })
        .collect();
    let created = now_unix_ns();
    let views = fleece::cut_many(qmp, &cuts)?;
    let plans = prepared
        .into_iter()
        .zip(views)
        .map(|(p, view)| Plan {
            mode: p.mode,
            new_bitmap: p.new_bitmap,
            view,
        })
        .collect();
    Ok((plans, created))
}

fn prepare(
    qmp: &mut Qmp,
    spec: &PeriodicSpec,
    last_seq: u64,
    force_resync: bool,
) -> anyhow::Result<Prepared> {
    let actual = fleece::node_size(qmp, &spec.node)?;
    if actual > spec.size {
        return Err(Grown {
            disk: spec.name.clone(),
            size: actual,
        }
        .into());
    }
    if actual < spec.size {
        bail!(
            "the host's disk shrank from {} to {actual} bytes: shrinking a protected disk is refused, \
             because its recovery points would no longer fit it; grow it back, or protect it as a new disk",
            spec.size
        );
    }
    let prefix = bitmap_prefix(&spec.name);
    let ours: Vec<Bitmap> = fleece::bitmaps(qmp, &spec.node)?
        .into_iter()
        .filter(|b| b.name.starts_with(&prefix))
        .collect();
    let next = ours
        .iter()
        .filter_map(|b| b.name[prefix.len()..].parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let recording = ours.iter().find(|b| b.recording && !b.inconsistent);
    let trusted = !ours.iter().any(|b| b.inconsistent);
    let mode = match (last_seq, recording) {
        (0, _) => Mode::Seed,
        _ if force_resync => Mode::Resync,
        (_, Some(r)) if trusted => Mode::Incremental(r.name.clone()),
        _ => Mode::Resync,
    };
    match &mode {
        Mode::Incremental(keep) => {
            for b in ours.iter().filter(|b| &b.name != keep) {
                fleece::merge_into(qmp, &spec.node, keep, &b.name)?;
            }
        }
        Mode::Seed | Mode::Resync => {
            if mode == Mode::Resync {
                tracing::warn!(disk = %spec.name, bitmaps = ?ours, "dirty bitmap missing or inconsistent: resynchronizing by checksums");
            }
            for b in &ours {
                fleece::remove(qmp, &spec.node, &b.name)?;
            }
        }
    }
    fleece::ensure_nbd_server(qmp, &spec.nbd_socket)?;
    let export = format!("ferry-view-{}", spec.name);
    // A view left behind by a crash of this process is released first.
    fleece::release(
        qmp,
        &Fleece {
            node: export.clone(),
            file_node: format!("{export}-file"),
            job: export.clone(),
            export: export.clone(),
        },
    );
    Ok(Prepared {
        mode,
        new_bitmap: format!("{prefix}{next}"),
        export,
    })
}

/// Release the view; keep or return the bitmaps depending on whether the point was committed.
fn finish(qmp: &mut Qmp, spec: &PeriodicSpec, plan: &Plan, committed: bool) -> anyhow::Result<()> {
    fleece::release(qmp, &plan.view);
    match (&plan.mode, committed) {
        (Mode::Incremental(old), true) => fleece::remove(qmp, &spec.node, old)?,
        // The interval's changes go back into the recording bitmap: the next cut sends them.
        (Mode::Incremental(old), false) => {
            fleece::merge_into(qmp, &spec.node, &plan.new_bitmap, old)?
        }
        // Nothing to build on: the next cut seeds or resyncs again.
        (Mode::Seed | Mode::Resync, false) => fleece::remove(qmp, &spec.node, &plan.new_bitmap)?,
        (Mode::Seed | Mode::Resync, true) => {}
    }
    Ok(())
}

/// Disk bytes whose block status a cut holds at once.
const STATUS_WINDOW: u64 = 1 << 30;

/// Which blocks a cut reads.
#[derive(Clone, Copy)]
enum Select {
    /// Every block (a checksum resync).
    All,
    /// Allocated, non-zero blocks (`base:allocation` context id): a seed.
    Allocated(u32),
    /// Blocks the dirty bitmap marks (its context id): an incremental.
    Dirty(u32),
}

/// The block runs of `[first, end)` that `select` picks.
async fn window_runs(
    nbd: &mut Client<tokio::net::UnixStream>,
    select: Select,
    first: u64,
    end: u64,
    bs: u64,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let (ctx, pick): (u32, fn(u32) -> bool) = match select {
        Select::All => return Ok(vec![(first, end)]),
        Select::Allocated(c) => (c, |f| f & (STATE_HOLE | STATE_ZERO) == 0),
        Select::Dirty(c) => (c, |f| f & 1 != 0),
    };
    let ext = nbd
        .block_status_range(ctx, first * bs, (end - first) * bs)
        .await?;
    Ok(block_runs(&ext, bs, pick))
}

/// Block ranges `[first, end)` covered by extents that `pick` selects.
fn block_runs(extents: &[Extent], bs: u64, pick: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| pick(e.flags)) {
        let (a, b) = (e.offset / bs, e.end().div_ceil(bs));
        match runs.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => runs.push((a, b)),
        }
    }
    runs
}

#[allow(clippy::too_many_arguments)]
async fn transfer(
    spec: &PeriodicSpec,
    block_size: u32,
    shared: &Arc<Shared>,
    plan: &Plan,
    rd: &mut SessionReader,
    wr: &mut SessionWriter,
    cut: Cut,
    status: &StatusFile,
) -> anyhow::Result<Report> {
    let Cut {
        seq,
        cuts,
        created,
        group_cut,
    } = cut;
    let bs = u64::from(block_size);
    let nblocks = spec.size.div_ceil(bs);
    let mut opts = ClientOptions::new(plan.view.export.clone()).meta_context("base:allocation");
    let dirty_ctx = match &plan.mode {
        Mode::Incremental(b) => Some(format!("qemu:dirty-bitmap:{b}")),
        _ => None,
    };
    if let Some(c) = &dirty_ctx {
        opts = opts.meta_context(c.clone());
    }
    let mut nbd = Client::connect_unix_with(&spec.nbd_socket, opts)
        .await
        .context("reading the point-in-time view over NBD")?;
    if nbd.size() != spec.size {
        bail!(
            "the host's disk is {} bytes, protected as {}: {}",
            nbd.size(),
            spec.size,
            if nbd.size() < spec.size {
                "shrinking is refused"
            } else {
                "growth needs a resync"
            }
        );
    }
    // What a cut reads, window by window: a multi-terabyte disk's extents are never held at once.
    // The view is a point in time, so the counting pass and the sending pass see the same extents.
    let select = match (&plan.mode, &dirty_ctx) {
        (Mode::Incremental(_), Some(c)) => Select::Dirty(
            nbd.meta_context_id(c)
                .ok_or_else(|| anyhow!("{c} not offered"))?,
        ),
        (Mode::Seed, _) => Select::Allocated(
            nbd.meta_context_id("base:allocation")
                .ok_or_else(|| anyhow!("base:allocation not offered"))?,
        ),
        _ => Select::All,
    };
    let window = (STATUS_WINDOW / bs).max(1);
    let run_bytes = |runs: &[(u64, u64)]| -> u64 {
        runs.iter()
            .map(|&(a, b)| (b * bs).min(spec.size) - a * bs)
            .sum()
    };
    let mut total = 0u64;
    for first in (0..nblocks).step_by(window as usize) {
        let end = (first + window).min(nblocks);
        total += run_bytes(&window_runs(&mut nbd, select, first, end, bs).await?);
    }
    let mut progress = crate::status::Progress::new(plan.mode.label(), total);
    status.update(|s| s.progress = Some(progress.clone()));
    let begin = Msg::Begin(Checkpoint {
        seq,
        created_unix_ns: created,
        journal_start: cuts,
        journal_end: cuts + 1,
        disk_size: spec.size,
        block_size,
        consistency: Consistency::Crash,
        group_cut,
    });
    wr.write_all(&begin.encode()).await?;
    let resync = plan.mode == Mode::Resync;
    let dedupe = !matches!(plan.mode, Mode::Incremental(_));
    let mut report = Report::default();
    let mut chunks = Vec::new();
    let mut done = 0u64;
    for first in (0..nblocks).step_by(window as usize) {
        let end = (first + window).min(nblocks);
        let runs = window_runs(&mut nbd, select, first, end, bs).await?;
        let base = done;
        let mut on_progress = |d: u64| {
            progress.advance(base + d);
            status.update(|s| s.progress = Some(progress.clone()));
        };
        let (r, c) = bulk::send_runs(
            &mut nbd,
            &runs,
            bulk::Options {
                disk_size: spec.size,
                block_size: bs,
                compare: resync,
                dedupe,
                compress: spec.compress,
            },
            shared,
            rd,
            wr,
            &mut on_progress,
        )
        .await?;
        report.add(r);
        chunks.extend(c.into_iter().take(KNOWN_LIMIT.saturating_sub(chunks.len())));
        done += run_bytes(&runs);
        progress.advance(done);
        status.update(|s| s.progress = Some(progress.clone()));
    }
    wr.write_all(
        &Msg::End {
            seq,
            blocks: report.blocks,
        }
        .encode(),
    )
    .await?;
    wr.flush().await?;
    let _ = nbd.disconnect().await;
    bulk::await_commit(rd, seq, shared, chunks).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_dirty_extents_in_whole_blocks() {
        let e = |offset, len, flags| Extent { offset, len, flags };
        let ext = [
            e(0, 100, 0),
            e(100, 65536, 1),
            e(65636, 10, 0),
            e(200_000, 5, 1),
            e(200_005, 1, 1),
        ];
        assert_eq!(
            block_runs(&ext, 65536, |f| f & 1 != 0),
            vec![(0, 2), (3, 4)]
        );
        assert_eq!(block_runs(&ext, 65536, |f| f & 1 == 0), vec![(0, 2)]);
    }
}
