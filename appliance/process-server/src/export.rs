//! The NBD export of one protected disk: QEMU's mirror job writes here, the journal keeps it.
//!
//! Writes, zeroes and trims are appended to the journal in arrival order (the NBD server calls us
//! in that order) and acknowledged at once; FLUSH and FUA wait for the journal's group commit.
//! When the journal is full the journal itself falls back to its dirty bitmap and the write is
//! still acknowledged: a full cache never blocks the guest. The export's size is the journal's:
//! after a growth ([`crate::grow`]) a new connection sees the larger size.

use ferry_journal::{Journal, Op};
use ferry_nbd::{Errno, Export, NbdResult};
use std::sync::Arc;

pub struct JournalExport {
    pub disk: String,
    pub journal: Arc<Journal>,
    /// The disk's consistency group: appends hold its gate, so a cut of the group sees each
    /// write wholly before or wholly after it ([`crate::group`]).
    pub group: Option<Arc<crate::group::Group>>,
}

impl JournalExport {
    /// Journal one operation; with FUA, answer only once it is durable.
    async fn append(&self, offset: u64, len: u64, op: Op<'_>, fua: bool) -> NbdResult<()> {
        self.in_range(offset, len)?;
        let gate = self.group.as_ref().map(|g| g.gate());
        let appended = self.journal.append(op);
        drop(gate);
        if let Err(e) = appended {
            tracing::error!(disk = %self.disk, error = %e, "journal append failed");
            return Err(Errno::Io);
        }
        if fua {
            self.durable().await?;
        }
        Ok(())
    }

    async fn durable(&self) -> NbdResult<()> {
        let j = self.journal.clone();
        match tokio::task::spawn_blocking(move || j.sync()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                tracing::error!(disk = %self.disk, error = %e, "journal sync failed");
                Err(Errno::Io)
            }
            Err(_) => Err(Errno::Io),
        }
    }

    fn in_range(&self, offset: u64, len: u64) -> NbdResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.journal.disk_size() => Ok(()),
            _ => Err(Errno::Inval),
        }
    }
}

#[async_trait::async_trait]
impl Export for JournalExport {
    fn size(&self) -> u64 {
        self.journal.disk_size()
    }

    /// The process server keeps no copy of the disk, only the writes not yet shipped; a mirror
    /// target is never read by QEMU. Reads of a protected disk are served by the master target's
    /// instant access instead, so here they are refused rather than answered with a guess.
    async fn read(&self, offset: u64, len: u32) -> NbdResult<Vec<u8>> {
        self.in_range(offset, u64::from(len))?;
        tracing::warn!(disk = %self.disk, offset, len, "read refused: the process server holds no copy of the disk");
        Err(Errno::Io)
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> NbdResult<()> {
        let op = Op::Write {
            offset,
            data: &data,
        };
        self.append(offset, data.len() as u64, op, fua).await
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> NbdResult<()> {
        let len = u64::from(len);
        self.append(offset, len, Op::Zero { offset, len }, fua)
            .await
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> NbdResult<()> {
        let len = u64::from(len);
        self.append(offset, len, Op::Trim { offset, len }, fua)
            .await
    }

    async fn flush(&self) -> NbdResult<()> {
        self.durable().await
    }
}
