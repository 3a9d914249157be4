//! Checksum resync of a continuously protected disk.
//!
//! A continuous disk's recovery site follows its journal. When the journal cannot say what
//! changed any more (it filled up and only a dirty bitmap tracked writes since; the cache was
//! lost; the recovery site's replica was damaged and the operator asked), the process server
//! reads the disk itself on its host and sends only the blocks whose names differ from the
//! recovery site's. It never copies the disk blindly, and the last good recovery point stays
//! usable until the resynced one is complete.
//!
//! The guest keeps writing throughout, and the disk is read live (a QEMU mirror job forbids a
//! second block job such as fleecing on the same node), so what is read is no single instant.
//! The journal makes it one: it restarts before the read (position `s0`), so every write from
//! then on is journaled; after the read an empty QMP transaction drains the host's requests, so
//! every write the read can have seen is journaled too (the mirror writes the source before it
//! sends to us), up to position `s2`. Replaying `(s0, s2]` over what was read gives the disk as
//! of `s2`: a byte that a replayed record writes ends with that record's bytes, and any other
//! byte was not written between the restart and the drain, so the read saw its value at `s2`.
//! See `docs/formats.md` (EndAt) for the wire side.

use crate::bulk::{self, Report};
use crate::checkpoint::Builder;
use crate::shipper::{SessionReader, SessionWriter, Shared, Tuning};
use crate::status::{now_unix_ns, Progress, State};
use crate::Disk;
use anyhow::{bail, Context};
use ferry_nbd::client::{Client, ClientOptions};
use ferry_qemu::Qmp;
use ferry_wire::{Checkpoint, Consistency, Msg};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Where a continuous disk lives on its host, for reading it in a resync.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostDisk {
    /// A QMP socket of the host's QEMU.
    pub qmp: PathBuf,
    /// The disk's block node (below the mirror's filter).
    pub node: String,
    /// A unix socket for the host's NBD server (started when not running).
    pub nbd_socket: PathBuf,
}

impl HostDisk {
    /// A disk's `source` (the inventory's) as its host, when it is in the host form
    /// (`qmp=PATH,node=NODE,nbd=PATH[,fleece=PATH]`; `fleece=` is periodic protection's, not
    /// the host's); none when it is not (an image path). The host form with a key missing, or
    /// one it does not know, is an error saying so.
    pub fn from_source(source: &str) -> Result<Option<HostDisk>, String> {
        if !source.split(',').any(|part| part.starts_with("qmp=")) {
            return Ok(None);
        }
        let (mut qmp, mut node, mut nbd) = (None, None, None);
        for part in source.split(',') {
            match part.split_once('=') {
                Some(("qmp", v)) => qmp = Some(v),
                Some(("node", v)) => node = Some(v),
                Some(("nbd", v)) => nbd = Some(v),
                Some(("fleece", _)) => {}
                _ => {
                    return Err(format!(
                        "source {source:?}: {part:?} is not one of qmp=, node=, nbd=, fleece="
                    ))
                }
            }
        }
        match (qmp, node, nbd) {
            (Some(q), Some(n), Some(s)) if !q.is_empty() && !n.is_empty() && !s.is_empty() => {
                Ok(Some(HostDisk {
                    qmp: q.into(),
                    node: n.to_string(),
                    nbd_socket: s.into(),
                }))
            }
            _ => Err(format!(
                "source {source:?} names a host but not all of qmp=, node= and nbd="
            )),
        }
    }
}

/// The request file `ferry resync` writes into the disk's cache directory.
pub use crate::periodic::RESYNC_REQUEST as REQUEST;

/// Ask for a checksum resync of the disk whose cache directory is `dir`, durably (the file and
/// its directory entry are synced). Empty, it asks for one through the disk's configured host
/// (`ferry resync`); naming `host` (as JSON), through that host for this resync only: failback's
/// `protect` step opens an original disk that has no configured host with a daemon of its own
/// (`ferry_failover::protect`). The resync removes the file once its point is committed.
pub fn request(dir: &Path, host: Option<&HostDisk>) -> std::io::Result<()> {
    let path = dir.join(REQUEST);
    let body = match host {
        Some(h) => serde_json::to_vec(h)?,
        None => Vec::new(),
    };
    std::fs::write(&path, body)?;
    std::fs::File::open(&path)?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()
}

/// The host a request file at `path` names for its resync ([`request`]); none when there is no
/// request, or it names none.
pub fn requested_host(path: &Path) -> Option<HostDisk> {
    let body = std::fs::read(path).ok()?;
    serde_json::from_slice(&body).ok()
}

/// One resync: what it works on and the checkpoint it makes.
pub struct Resync<'a> {
    pub disk: &'a Arc<Disk>,
    pub host: &'a HostDisk,
    pub tuning: &'a Tuning,
    pub shared: &'a Arc<Shared>,
    /// The checkpoint's sequence number.
    pub seq: u64,
    /// The master target's journal position (its newest point's end).
    pub journal_start: u64,
}

impl Resync<'_> {
    /// Resynchronize the disk inside one checkpoint; returns the journal position the new
    /// point holds the disk at.
    pub async fn run(&self, rd: &mut SessionReader, wr: &mut SessionWriter) -> anyhow::Result<u64> {
        let disk = self.disk;
        let j = disk.journal.clone();
        let s0 = tokio::task::spawn_blocking(move || j.restart_for_resync())
            .await?
            .context("restarting the journal")?;
        tracing::warn!(disk = %disk.name, seq = self.seq, s0, "checksum resync: reading the disk on its host");
        let export = format!("ferry-live-{}", disk.name);
        let mut qmp = {
            let (h, e) = (self.host.clone(), export.clone());
            tokio::task::spawn_blocking(move || export_live(&h, &e))
                .await?
                .context("exporting the disk on its host")?
        };
        let result = self.transfer(rd, wr, s0, &export, &mut qmp).await;
        let _ = tokio::task::spawn_blocking(move || {
            let _ = qmp.execute("block-export-del", json!({"id": export}));
        })
        .await;
        let (s2, report) = result?;
        tracing::info!(disk = %disk.name, seq = self.seq, s2, blocks = report.blocks, bytes = report.bytes, hash_bytes = report.hash_bytes, "checksum resync committed");
        disk.update(|s| {
            s.resyncs += 1;
            // Committed: said before the request is cleared, so that whoever waits for the
            // request to go finds the point and what it sent here.
            s.acked_seq = self.seq;
            s.acked_journal_seq = s2;
            s.last_cut_blocks = report.blocks;
            s.last_cut_bytes = report.bytes;
            s.last_cut_hash_bytes = report.hash_bytes;
            s.bytes_sent += report.bytes;
            s.progress = None;
        });
        Ok(s2)
    }
    async fn transfer(
        &self,
        rd: &mut SessionReader,
        wr: &mut SessionWriter,
        s0: u64,
        export: &str,
        qmp: &mut Qmp,
    ) -> anyhow::Result<(u64, Report)> {
        let (disk, host, tuning, shared, seq, journal_start) = (
            self.disk,
            self.host,
            self.tuning,
            self.shared,
            self.seq,
            self.journal_start,
        );
        // Fixed for the session: a growth runs between sessions (see `crate::grow`).
        let size = disk.size();
        let mut nbd = Client::connect_unix_with(&host.nbd_socket, ClientOptions::new(export))
            .await
            .context("reading the disk over the host's NBD server")?;
        if nbd.size() != size {
            bail!(
                "the host's disk is {} bytes, protected as {size}{}",
                nbd.size(),
                if nbd.size() > size {
                    " (grow its protection with `ferry grow`)"
                } else {
                    ""
                }
            );
        }
        let bs = u64::from(disk.block_size);
        wr.write_all(
            &Msg::Begin(Checkpoint {
                seq,
                created_unix_ns: now_unix_ns(),
                journal_start,
                journal_end: journal_start,
                disk_size: size,
                block_size: disk.block_size,
                consistency: Consistency::Crash,
                group_cut: None,
            })
            .encode(),
        )
        .await?;
        let mut progress = Progress::new("resync", size);
        disk.update(|s| {
            s.state = State::Resyncing;
            s.progress = Some(progress.clone());
        });
        let mut on_progress = |done: u64| {
            progress.advance(done);
            disk.update(|s| s.progress = Some(progress.clone()));
        };
        let (mut report, chunks) = bulk::send_runs(
            &mut nbd,
            &[(0, size.div_ceil(bs))],
            bulk::Options {
                disk_size: size,
                block_size: bs,
                compare: true,
                dedupe: true,
                compress: disk.compress,
            },
            shared,
            rd,
            wr,
            &mut on_progress,
        )
        .await?;
        let _ = nbd.disconnect().await;

        // Drain the host: every write the read can have seen is journaled after this.
        let drained =
            tokio::task::block_in_place(|| qmp.execute("transaction", json!({"actions": []})));
        drained.context("draining the host's requests")?;
        let j = disk.journal.clone();
        let s2 = tokio::task::spawn_blocking(move || j.sync())
            .await?
            .context("journal sync")?;
        // A journal that filled up again during the read kept some writes only in its bitmap: the
        // replay would miss them. Start over (the full journal says so to the shipper too).
        if let ferry_journal::JournalState::ResyncRequired { dirty_bytes } = disk.journal.state() {
            bail!(
            "the journal filled up during the resync ({dirty_bytes} bytes written since only in its bitmap): \
             starting over; a larger --journal-capacity lets a resync finish under this write load"
        );
        }

        // Replay (s0, s2] over what was read, in bounded batches.
        let mut pos = s0;
        while pos < s2 {
            let (j, max) = (disk.journal.clone(), tuning.max_checkpoint_bytes);
            let records = tokio::task::spawn_blocking(move || j.read_durable(pos, max))
                .await?
                .context("reading the journal")?;
            if records.is_empty() {
                bail!("the journal holds no records after {pos} although {s2} is durable");
            }
            let mut builder = Builder::new(size, disk.block_size);
            for r in records.iter().take_while(|r| r.seq <= s2) {
                builder.apply(r);
                pos = r.seq;
                if builder.touched() >= tuning.max_checkpoint_blocks {
                    break;
                }
            }
            let blocks = {
                let known = shared.known.lock().expect("known lock");
                builder.finish(&shared.key, &disk.name, seq, &known, disk.compress)
            };
            for b in blocks {
                let frame = Msg::Block {
                    index: b.index,
                    body: b.body,
                }
                .encode();
                wr.write_all(&frame).await?;
                report.blocks += 1;
                report.bytes += frame.len() as u64;
            }
        }
        wr.write_all(
            &Msg::EndAt {
                seq,
                blocks: report.blocks,
                journal_end: s2,
            }
            .encode(),
        )
        .await?;
        wr.flush().await?;
        bulk::await_commit(rd, seq, shared, chunks).await?;
        Ok((s2, report))
    }
}

fn export_live(host: &HostDisk, export: &str) -> anyhow::Result<Qmp> {
    let mut qmp = Qmp::connect(&host.qmp, Duration::from_secs(10))?;
    // One left by an interrupted resync is replaced.
    ferry_qemu::fleece::add_export(&mut qmp, &host.nbd_socket, &host.node, export, false)?;
    Ok(qmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_in_the_host_form_is_its_host() {
        let h = HostDisk::from_source("qmp=/h/q.sock,node=drive0,nbd=/h/nbd.sock,fleece=/h/f")
            .unwrap()
            .unwrap();
        assert_eq!(
            h,
            HostDisk {
                qmp: "/h/q.sock".into(),
                node: "drive0".into(),
                nbd_socket: "/h/nbd.sock".into(),
            }
        );
        assert_eq!(HostDisk::from_source("/srv/d0.qcow2"), Ok(None));
        assert!(HostDisk::from_source("qmp=/q,node=n").is_err());
        assert!(HostDisk::from_source("qmp=/q,node=n,nbd=/s,/srv/d0.qcow2").is_err());
    }

    #[test]
    fn a_request_names_a_host_for_its_resync_or_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(REQUEST);
        assert_eq!(requested_host(&path), None);
        // `ferry resync`: through the disk's configured host.
        request(dir.path(), None).unwrap();
        assert!(path.exists());
        assert_eq!(requested_host(&path), None);
        // Failback's `protect`: through the daemon it started, for this resync only.
        let host = HostDisk {
            qmp: "/run/p/qsd-mgmt.sock".into(),
            node: "disk0".into(),
            nbd_socket: "/run/p/nbd.sock".into(),
        };
        request(dir.path(), Some(&host)).unwrap();
        assert_eq!(requested_host(&path), Some(host));
    }
}
