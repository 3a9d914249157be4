//! The writer side of [`Shared`]: draining sealed record buffers to segment files
//! (in order, under the io lock), fdatasync accounting and failure poisoning.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::{lock, Chunk, Io, Shared, FLUSH_BYTES};
use crate::direct;
use crate::{io_err, JournalError};

impl Shared {
    /// Writes all sealed chunks in order (caller holds `io`).
    pub(super) fn drain(&self, io: &mut Io) -> Result<(), JournalError> {
        let mut spares = Vec::new();
        loop {
            let chunks = {
                let mut m = lock(&self.mem);
                if let Some(e) = &m.failed {
                    return Err(JournalError::Failed(e.clone()));
                }
                for s in spares.drain(..) {
                    if m.spare.len() < 4 {
                        m.spare.push(s);
                    }
                }
                m.sealed_bytes = 0;
                std::mem::take(&mut m.sealed)
            };
            if chunks.is_empty() {
                return Ok(());
            }
            for c in chunks {
                if io.cur_seg != c.seg_first {
                    // The previous segment must be durable before the next one gets records.
                    if io.unsynced {
                        let (f, p) = io.cur.as_ref().expect("unsynced implies a current file");
                        self.fdatasync(f, p)?;
                    }
                    io.cur_seg = c.seg_first;
                    io.cur = Some((c.file.clone(), c.path.clone()));
                    io.unsynced = false;
                }
                if self.direct.load(Ordering::Relaxed) {
                    self.write_direct(io, &c)?;
                } else {
                    c.file
                        .write_all_at(&c.data, c.file_off)
                        .map_err(|e| self.fail(io_err(&c.path, e)))?;
                }
                io.unsynced = true;
                io.written_seq = c.last_seq;
                let mut d = c.data;
                if d.capacity() <= 2 * FLUSH_BYTES {
                    d.clear();
                    spares.push(d);
                }
            }
        }
    }

    /// Write a chunk with O_DIRECT (see `direct.rs`), opening the segment's direct writer
    /// when the chunk does not continue the current one; falls back to buffered writes for
    /// good when the filesystem has no O_DIRECT.
    fn write_direct(&self, io: &mut Io, c: &Chunk) -> Result<(), JournalError> {
        let fresh = io
            .tail
            .as_ref()
            .is_none_or(|t| !t.is_for(&c.file) || t.end() != c.file_off);
        if fresh {
            io.tail = None;
            match direct::open(&c.path).map_err(|e| self.fail(io_err(&c.path, e)))? {
                Some(f) => {
                    let t = direct::Tail::open(f, c.file.clone(), c.file_off)
                        .map_err(|e| self.fail(io_err(&c.path, e)))?;
                    io.tail = Some(t);
                }
                None => {
                    tracing::warn!(path = %c.path.display(),
                        "journal: the filesystem does not support O_DIRECT; writing through the page cache");
                    self.direct.store(false, Ordering::Relaxed);
                    return c
                        .file
                        .write_all_at(&c.data, c.file_off)
                        .map_err(|e| self.fail(io_err(&c.path, e)));
                }
            }
        }
        let t = io.tail.as_mut().expect("opened above");
        t.append(&c.data).map_err(|e| {
            io.tail = None;
            self.fail(io_err(&c.path, e))
        })
    }

    pub(super) fn fdatasync(&self, f: &File, path: &Path) -> Result<(), JournalError> {
        self.fdatasyncs.fetch_add(1, Ordering::Relaxed);
        rustix::fs::fdatasync(f).map_err(|e| self.fail(io_err(path, e.into())))
    }

    /// Marks the journal failed after an I/O error on the write path: the state of
    /// the files is unknown, so no later write may be acknowledged.
    pub(super) fn fail(&self, e: JournalError) -> JournalError {
        let mut m = lock(&self.mem);
        tracing::error!(error = %e, "journal failed");
        if m.failed.is_none() {
            m.failed = Some(e.to_string());
        }
        self.cv.notify_all();
        e
    }
}
