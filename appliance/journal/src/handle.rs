//! The public [`Journal`] handle over the shared state.

use std::sync::Arc;

use crate::journal::Shared;
use crate::{Appended, JournalConfig, JournalError, JournalState, Op, Record, Stats};

/// The per-disk write journal. `Send + Sync`: share it (e.g. in an `Arc`) between
/// the NBD handlers, the flush path and the drainer. Appends reach the segment files
/// at once; only [`Journal::sync`] makes them durable against power loss.
/// Dropping the journal does not sync: call [`Journal::sync`] first for a clean stop.
pub struct Journal {
    shared: Arc<Shared>,
}

impl Journal {
    /// Opens (creating if needed) the journal in `cfg.dir` and replays it. A torn
    /// tail (short record, bad crc) is truncated away and logged; corruption that is
    /// followed by valid records is [`JournalError::Corrupt`].
    pub fn open(cfg: JournalConfig) -> Result<Journal, JournalError> {
        Ok(Journal {
            shared: Arc::new(Shared::open(cfg)?),
        })
    }

    /// Appends one operation. The record is in the kernel (written to its segment file)
    /// when this returns, so a crash of the process loses nothing appended; it is durable
    /// against power loss after the next [`sync`](Self::sync). Out-of-range operations are rejected and change
    /// nothing. Once the journal is full this and every later write returns
    /// [`Appended::Dirty`] and is only recorded in the dirty bitmap.
    pub fn append(&self, op: Op<'_>) -> Result<Appended, JournalError> {
        self.shared.append(op)
    }

    /// Makes everything appended before the call durable and returns the durable
    /// seq. Concurrent callers share one fdatasync (group commit). Also persists the
    /// dirty bitmap if it changed. Returns at once if there is nothing new.
    pub fn sync(&self) -> Result<u64, JournalError> {
        self.shared.sync()
    }

    /// Durable records with `after_seq < seq <= durable_seq`, in order, stopping
    /// before their encoded size (36 bytes + data each) would exceed `max_bytes`;
    /// at least one record if any is available. [`JournalError::Trimmed`] if
    /// `after_seq + 1` was already trimmed away.
    pub fn read_durable(
        &self,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<Record>, JournalError> {
        self.shared.read_durable(after_seq, max_bytes)
    }

    /// The recovery site has made records `<= seq` durable: deletes whole segments
    /// whose records are all `<= seq`, persisting the trim point first so seq
    /// numbering continues after a restart. `seq` must not exceed the durable seq.
    pub fn trim_upto(&self, seq: u64) -> Result<(), JournalError> {
        self.shared.trim_upto(seq)
    }

    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    pub fn state(&self) -> JournalState {
        self.shared.state()
    }

    /// (offset, len) of the dirty bitmap regions (granularity-aligned, merged).
    pub fn dirty_extents(&self) -> Vec<(u64, u64)> {
        self.shared.dirty_extents()
    }

    /// Starts the journal over for a checksum resync: forgets every record journaled so far
    /// (they are trimmed, durably, even though the recovery site does not hold them), clears
    /// the dirty bitmap and leaves the resync state, all in one persisted step, and returns the
    /// new trim point. Records appended afterwards get seqs above it. The caller must then
    /// bring the recovery site up to the disk's content by other means (reading the disk
    /// itself); until a point at or past the returned seq is committed there, the gap between
    /// the recovery site's journal position and this journal's first record says so, also
    /// after a crash.
    pub fn restart_for_resync(&self) -> Result<u64, JournalError> {
        self.shared.restart_for_resync()
    }

    /// The disk's size: the configured one, or what [`grow`](Self::grow) made it.
    pub fn disk_size(&self) -> u64 {
        self.shared.disk_size()
    }

    /// The disk grew to `new_size` bytes: operations up to it are accepted from now on, the
    /// dirty bitmap covers it, and the state file records it before this returns (so a
    /// restart configured with the old size is refused as a shrink). Records and segments
    /// written for the smaller size stay valid. A smaller size is [`JournalError::Shrunk`];
    /// the same size changes nothing.
    pub fn grow(&self, new_size: u64) -> Result<(), JournalError> {
        self.shared.grow(new_size)
    }
}
