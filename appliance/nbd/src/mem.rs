//! An in-memory export.
//!
//! Why: tests (this crate's and others') need an export whose contents can be inspected after
//! a real QEMU client has written to it, with no files to clean up. It is also the reference for
//! what an [`Export`] is expected to do: bounds-checked, read-only aware, and block status that
//! reports all-zero 4 KiB blocks as holes so that `qemu-img convert` and mirrors stay sparse.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::{Errno, Export, NbdResult};

/// Granularity of [`MemExport`]'s zero detection in block status.
const ZERO_GRANULE: usize = 4096;

/// A `Vec<u8>` behind a mutex, optionally read-only.
pub struct MemExport {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: AtomicU64,
    writes: AtomicU64,
}

impl MemExport {
    /// A zero-filled, writable export of `size` bytes.
    pub fn new(size: usize) -> Self {
        Self::from_vec(vec![0u8; size])
    }

    /// A writable export holding `data`.
    pub fn from_vec(data: Vec<u8>) -> Self {
        MemExport {
            data: Mutex::new(data),
            read_only: false,
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// Make the export read-only (or writable again).
    pub fn with_read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// How many FLUSH requests were served.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// How many modifying requests (write, write zeroes, trim) were applied.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic elsewhere while holding the lock cannot leave bytes half-invalid; carry on.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, len_total: usize, offset: u64, len: u64) -> NbdResult<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| Errno::Inval)?;
        let len = usize::try_from(len).map_err(|_| Errno::Inval)?;
        let end = start.checked_add(len).ok_or(Errno::Inval)?;
        if end > len_total {
            return Err(Errno::Inval);
        }
        Ok(start..end)
    }

    fn modify(&self, offset: u64, len: u64, f: impl FnOnce(&mut [u8])) -> NbdResult<()> {
        if self.read_only {
            return Err(Errno::Perm);
        }
        let mut data = self.lock();
        let r = self
            .range(data.len(), offset, len)
            .map_err(|_| Errno::NoSpc)?;
        f(&mut data[r]);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait::async_trait]
impl Export for MemExport {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> NbdResult<Vec<u8>> {
        let data = self.lock();
        let r = self.range(data.len(), offset, len.into())?;
        Ok(data[r].to_vec())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> NbdResult<()> {
        self.modify(offset, data.len() as u64, |dst| dst.copy_from_slice(&data))
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> NbdResult<()> {
        self.modify(offset, len.into(), |dst| dst.fill(0))
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> NbdResult<()> {
        // Discarded blocks read back as zeroes, which keeps tests deterministic.
        self.modify(offset, len.into(), |dst| dst.fill(0))
    }

    async fn flush(&self) -> NbdResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> NbdResult<Vec<(u32, u32)>> {
        let data = self.lock();
        let r = self.range(data.len(), offset, len.into())?;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = r.start;
        while pos < r.end {
            // Walk granule boundaries so extents line up with 4 KiB blocks.
            let next = ((pos / ZERO_GRANULE + 1) * ZERO_GRANULE).min(r.end);
            let flags = if data[pos..next].iter().all(|&b| b == 0) {
                crate::proto::STATE_HOLE | crate::proto::STATE_ZERO
            } else {
                0
            };
            let l = (next - pos) as u32;
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += l,
                _ => out.push((l, flags)),
            }
            pos = next;
        }
        Ok(out)
    }
}
