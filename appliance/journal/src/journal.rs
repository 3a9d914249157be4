//! The journal: buffering, group commit, durable reads, trimming and the full state.
//!
//! Locking: `io` (the file writer) may be taken before `persist` (the state file
//! writer), which may be taken before `mem` (all in-memory state); never the other
//! way round. `mem` is only held for short in-memory work (plus a segment file
//! creation every `segment_bytes`); writes and fdatasyncs happen under `io` only.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::bitmap::{DirtyBitmap, PersistState};
use crate::format::{self, EncOp, SEG_HEADER_LEN};
use crate::segment::{self, SegMeta, SegReader};
mod writer;

use crate::{
    io_err, Appended, JournalConfig, JournalError, JournalState, Op, Record, Stats, MAX_WRITE_LEN,
};

/// Buffered records are handed to the writer once the buffer reaches this size.
const FLUSH_BYTES: usize = 1 << 20;

/// A run of encoded records ready to be written at `file_off` of a segment.
struct Chunk {
    seg_first: u64,
    file: Arc<File>,
    path: PathBuf,
    file_off: u64,
    data: Vec<u8>,
    last_seq: u64,
}

struct Mem {
    next_seq: u64,
    durable_seq: u64,
    trim_seq: u64,
    segments: VecDeque<SegMeta>,
    used_bytes: u64,
    /// Encoded records at the tail of the last segment, not yet sealed.
    buf: Vec<u8>,
    sealed: VecDeque<Chunk>,
    sealed_bytes: usize,
    spare: Vec<Vec<u8>>,
    syncing: bool,
    failed: Option<String>,
    dir_unsynced: bool,
    resync: bool,
    bitmap: DirtyBitmap,
    state_gen: u64,
    persisted_gen: u64,
}

struct Io {
    /// The direct writer of the current segment (direct I/O only).
    tail: Option<crate::direct::Tail>,
    cur_seg: u64,
    cur: Option<(Arc<File>, PathBuf)>,
    unsynced: bool,
    written_seq: u64,
}

/// State shared by every user of a [`crate::Journal`] handle.
pub(crate) struct Shared {
    cfg: JournalConfig,
    /// The disk's size now: `cfg.disk_size` at open, larger after [`Shared::grow`]. Changed
    /// under the `persist` and `mem` locks; read without them by `append`'s bounds check.
    disk_size: AtomicU64,
    dir_file: File,
    mem: Mutex<Mem>,
    cv: Condvar,
    io: Mutex<Io>,
    persist: Mutex<u64>,
    fdatasyncs: AtomicU64,
    sync_calls: AtomicU64,
    /// Segments are written with O_DIRECT (asked for, and the filesystem supports it).
    direct: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// See [`crate::Journal`].
    pub fn open(cfg: JournalConfig) -> Result<Shared, JournalError> {
        if cfg.bitmap_granularity == 0 || cfg.segment_bytes < 4096 || cfg.capacity_bytes == 0 {
            return Err(JournalError::InvalidConfig(format!(
                "granularity {} must be > 0, segment_bytes {} >= 4096, capacity {} > 0",
                cfg.bitmap_granularity, cfg.segment_bytes, cfg.capacity_bytes
            )));
        }
        let dir = &cfg.dir;
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let dir_file = File::open(dir).map_err(|e| io_err(dir, e))?;
        let mut st = PersistState::load(dir, cfg.disk_size, cfg.bitmap_granularity)?.unwrap_or(
            PersistState {
                trim_seq: 0,
                resync: false,
                bitmap: DirtyBitmap::new(cfg.disk_size, cfg.bitmap_granularity),
            },
        );
        let written_for = st.bitmap.disk_size();
        let mut segments: VecDeque<SegMeta> = segment::recover(dir, cfg.disk_size)?.into();
        if written_for < cfg.disk_size {
            // The disk grew while the process server was down: the state file says so at once,
            // so that a later start with the old size is refused as a shrink.
            st.bitmap.grow(cfg.disk_size);
            st.store(dir, &dir_file)?;
            tracing::info!(dir = %dir.display(), from = written_for, to = cfg.disk_size,
                "journal: the disk grew");
        }
        while segments.front().is_some_and(|s| s.last_seq <= st.trim_seq) {
            let s = segments.pop_front().expect("front exists");
            tracing::info!(path = %s.path.display(), "journal: removing trimmed segment");
            fs::remove_file(&s.path).map_err(|e| io_err(&s.path, e))?;
        }
        if let Some(f) = segments.front() {
            if f.first_seq > st.trim_seq + 1 {
                return Err(JournalError::Corrupt {
                    path: f.path.clone(),
                    offset: 0,
                    reason: format!(
                        "records {}..{} are missing (trimmed only up to {})",
                        st.trim_seq + 1,
                        f.first_seq - 1,
                        st.trim_seq
                    ),
                });
            }
        }
        // Whatever we replayed may only have been in the page cache: make it durable.
        if let Some(b) = segments.back() {
            rustix::fs::fdatasync(&*b.file).map_err(|e| io_err(&b.path, e.into()))?;
        }
        rustix::fs::fsync(&dir_file).map_err(|e| io_err(dir, e.into()))?;
        let last = segments.back().map_or(0, |s| s.last_seq).max(st.trim_seq);
        let used_bytes = segments.iter().map(|s| s.size).sum();
        if st.resync {
            tracing::warn!(dir = %dir.display(), dirty_bytes = st.bitmap.dirty_bytes(),
                "journal: resync required (journal was full)");
        }
        tracing::info!(dir = %dir.display(), next_seq = last + 1, segments = segments.len(),
            used_bytes, "journal: opened");
        Ok(Shared {
            mem: Mutex::new(Mem {
                next_seq: last + 1,
                durable_seq: last,
                trim_seq: st.trim_seq,
                segments,
                used_bytes,
                buf: Vec::with_capacity(FLUSH_BYTES + (64 << 10)),
                sealed: VecDeque::new(),
                sealed_bytes: 0,
                spare: Vec::new(),
                syncing: false,
                failed: None,
                dir_unsynced: false,
                resync: st.resync,
                bitmap: st.bitmap,
                state_gen: 0,
                persisted_gen: 0,
            }),
            cv: Condvar::new(),
            io: Mutex::new(Io {
                tail: None,
                cur_seg: 0,
                cur: None,
                unsynced: false,
                written_seq: last,
            }),
            persist: Mutex::new(0),
            fdatasyncs: AtomicU64::new(0),
            sync_calls: AtomicU64::new(0),
            direct: AtomicBool::new(cfg.direct_io),
            dir_file,
            disk_size: AtomicU64::new(cfg.disk_size),
            cfg,
        })
    }

    /// See [`crate::Journal`].
    pub fn append(&self, op: Op<'_>) -> Result<Appended, JournalError> {
        let enc = match op {
            Op::Write { offset, data } => EncOp {
                kind: format::KIND_WRITE,
                offset,
                len: data.len() as u64,
                data,
            },
            Op::Zero { offset, len } => EncOp {
                kind: format::KIND_ZERO,
                offset,
                len,
                data: &[],
            },
            Op::Trim { offset, len } => EncOp {
                kind: format::KIND_TRIM,
                offset,
                len,
                data: &[],
            },
        };
        if enc.data.len() as u64 > MAX_WRITE_LEN {
            return Err(JournalError::TooLarge {
                len: enc.len,
                max: MAX_WRITE_LEN,
            });
        }
        let disk_size = self.disk_size.load(Ordering::SeqCst);
        match enc.offset.checked_add(enc.len) {
            Some(end) if end <= disk_size => {}
            _ => {
                return Err(JournalError::OutOfRange {
                    offset: enc.offset,
                    len: enc.len,
                    disk_size,
                })
            }
        }
        let mut g = lock(&self.mem);
        let m = &mut *g;
        if let Some(e) = &m.failed {
            return Err(JournalError::Failed(e.clone()));
        }
        if m.resync {
            m.bitmap.mark(enc.offset, enc.len);
            m.state_gen += 1;
            return Ok(Appended::Dirty);
        }
        let rec_len = format::record_len(enc.data.len()) as u64;
        let roll = match m.segments.back() {
            None => true,
            Some(s) => !s.is_empty() && s.size + rec_len > self.cfg.segment_bytes,
        };
        let extra = if roll { SEG_HEADER_LEN as u64 } else { 0 };
        if m.used_bytes + rec_len + extra > self.cfg.capacity_bytes {
            m.resync = true;
            m.bitmap.mark(enc.offset, enc.len);
            m.state_gen += 1;
            tracing::warn!(dir = %self.cfg.dir.display(), used = m.used_bytes,
                capacity = self.cfg.capacity_bytes,
                "journal full: tracking writes in the dirty bitmap, resync required");
            let (snap, gen) = (self.snapshot(m), m.state_gen);
            drop(g);
            self.persist_state(snap, gen)?;
            return Ok(Appended::Dirty);
        }
        if roll {
            self.seal(m);
            let seg = segment::create(&self.cfg.dir, m.next_seq, self.disk_size())?;
            m.used_bytes += seg.size;
            m.segments.push_back(seg);
            m.dir_unsynced = true;
        }
        let seq = m.next_seq;
        m.next_seq += 1;
        format::encode_record(&mut m.buf, seq, &enc);
        m.segments
            .back_mut()
            .expect("active segment")
            .push_record(seq, rec_len);
        m.used_bytes += rec_len;
        // Hand the record to the kernel before acknowledging it. A crash of this process (as
        // opposed to the machine) must lose no write the guest was told is done: QEMU's mirror
        // never sends an acknowledged write again, so a lost one would silently fork the
        // replica from the source. Durability against power loss is still FLUSH/FUA's job.
        self.seal(m);
        drop(g);
        self.drain(&mut lock(&self.io))?;
        Ok(Appended::Journaled(seq))
    }

    /// See [`crate::Journal`].
    pub fn sync(&self) -> Result<u64, JournalError> {
        self.sync_calls.fetch_add(1, Ordering::Relaxed);
        let mut m = lock(&self.mem);
        let target = m.next_seq - 1;
        let want_gen = m.state_gen;
        loop {
            if let Some(e) = &m.failed {
                return Err(JournalError::Failed(e.clone()));
            }
            if m.durable_seq >= target && m.persisted_gen >= want_gen {
                return Ok(m.durable_seq);
            }
            if !m.syncing {
                break;
            }
            m = self.cv.wait(m).unwrap_or_else(PoisonError::into_inner);
        }
        // This caller leads the next group commit.
        m.syncing = true;
        self.seal(&mut m);
        let dir_sync = std::mem::take(&mut m.dir_unsynced);
        let snap = (m.state_gen > m.persisted_gen).then(|| (self.snapshot(&m), m.state_gen));
        drop(m);
        let res = self.commit(dir_sync, snap);
        let mut m = lock(&self.mem);
        m.syncing = false;
        self.cv.notify_all();
        let written = res?;
        m.durable_seq = m.durable_seq.max(written);
        Ok(m.durable_seq)
    }

    fn commit(
        &self,
        dir_sync: bool,
        snap: Option<(PersistState, u64)>,
    ) -> Result<u64, JournalError> {
        // Drain under the io lock, then fdatasync with it released: appends keep going into
        // the page cache while the disk flushes (they are simply not covered by this sync).
        let (written, to_sync) = {
            let mut io = lock(&self.io);
            self.drain(&mut io)?;
            let target = io.unsynced.then(|| io.cur.clone()).flatten();
            (io.written_seq, target.map(|t| (t, io.cur_seg)))
        };
        if let Some(((f, p), seg)) = to_sync {
            self.fdatasync(&f, &p)?;
            let mut io = lock(&self.io);
            // Clean only if nothing was written meanwhile; otherwise the next sync flushes again.
            if io.cur_seg == seg && io.written_seq == written {
                io.unsynced = false;
            }
        }
        if dir_sync {
            rustix::fs::fsync(&self.dir_file)
                .map_err(|e| self.fail(io_err(&self.cfg.dir, e.into())))?;
        }
        if let Some((st, gen)) = snap {
            self.persist_state(st, gen)?;
        }
        Ok(written)
    }

    /// See [`crate::Journal`].
    pub fn read_durable(
        &self,
        after_seq: u64,
        max_bytes: usize,
    ) -> Result<Vec<Record>, JournalError> {
        let want = after_seq.saturating_add(1);
        let (durable, plan) = {
            let m = lock(&self.mem);
            let first = Self::first_seq(&m);
            if want < first {
                return Err(JournalError::Trimmed {
                    after_seq,
                    first_seq: first,
                });
            }
            if after_seq >= m.durable_seq {
                return Ok(Vec::new());
            }
            let start = m
                .segments
                .partition_point(|s| s.first_seq <= want)
                .saturating_sub(1);
            let plan: Vec<_> = m
                .segments
                .range(start..)
                .take_while(|s| s.first_seq <= m.durable_seq)
                .map(|s| {
                    let pos = if s.first_seq <= want {
                        s.seek_hint(want)
                    } else {
                        SEG_HEADER_LEN as u64
                    };
                    (s.file.clone(), s.path.clone(), pos, s.last_seq)
                })
                .collect();
            (m.durable_seq, plan)
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (file, path, pos, last) in &plan {
            let end = (*last).min(durable);
            if end <= after_seq {
                continue; // empty segment, or nothing wanted in it
            }
            let mut r = SegReader::new(file, path, *pos);
            loop {
                let (h, data) = r.next_record()?;
                if h.seq > after_seq {
                    if !out.is_empty() && bytes + h.total_len() > max_bytes {
                        return Ok(out);
                    }
                    bytes += h.total_len();
                    out.push(Record {
                        seq: h.seq,
                        op: format::to_owned_op(&h, data),
                    });
                }
                if h.seq >= end {
                    break;
                }
            }
            if end >= durable {
                break;
            }
        }
        Ok(out)
    }

    /// See [`crate::Journal`].
    pub fn trim_upto(&self, seq: u64) -> Result<(), JournalError> {
        let mut io = lock(&self.io);
        let mut m = lock(&self.mem);
        if seq > m.durable_seq {
            return Err(JournalError::TrimBeyondDurable {
                seq,
                durable_seq: m.durable_seq,
            });
        }
        if seq <= m.trim_seq {
            return Ok(());
        }
        m.trim_seq = seq;
        let dropped = Self::drop_segments_upto(&mut io, &mut m, seq);
        if dropped.is_empty() {
            return Ok(());
        }
        m.state_gen += 1;
        let (snap, gen) = (self.snapshot(&m), m.state_gen);
        drop(m);
        drop(io);
        self.persist_state(snap, gen)?;
        self.remove_segments(&dropped)
    }

    /// See [`crate::Journal`].
    pub fn restart_for_resync(&self) -> Result<u64, JournalError> {
        let durable = self.sync()?;
        let mut io = lock(&self.io);
        let mut m = lock(&self.mem);
        let upto = durable.max(m.trim_seq);
        m.trim_seq = upto;
        let dropped = Self::drop_segments_upto(&mut io, &mut m, upto);
        m.resync = false;
        m.bitmap.clear();
        m.state_gen += 1;
        let (snap, gen) = (self.snapshot(&m), m.state_gen);
        drop(m);
        drop(io);
        // One state file carries the new trim point and the cleared bitmap together: a crash
        // leaves either the old state (resync still required) or the new one (a gap the
        // shipper sees as resync required), never a journal that looks whole but is not.
        self.persist_state(snap, gen)?;
        self.remove_segments(&dropped)?;
        tracing::info!(dir = %self.cfg.dir.display(), trimmed_to = upto, "journal: restarted for a resync");
        Ok(upto)
    }

    /// See [`crate::Journal`].
    pub fn disk_size(&self) -> u64 {
        self.disk_size.load(Ordering::SeqCst)
    }

    /// See [`crate::Journal`].
    pub fn grow(&self, new_size: u64) -> Result<(), JournalError> {
        let mut stored = lock(&self.persist);
        let mut m = lock(&self.mem);
        let now = self.disk_size();
        if new_size < now {
            return Err(JournalError::Shrunk {
                dir: self.cfg.dir.clone(),
                written: now,
                configured: new_size,
            });
        }
        if new_size == now {
            return Ok(());
        }
        if let Some(e) = &m.failed {
            return Err(JournalError::Failed(e.clone()));
        }
        m.bitmap.grow(new_size);
        m.state_gen += 1;
        let (snap, gen) = (self.snapshot(&m), m.state_gen);
        drop(m);
        // Persisted before the new size is used: a restart with the old size is then refused
        // as a shrink instead of meeting records past its end.
        snap.store(&self.cfg.dir, &self.dir_file)
            .map_err(|e| self.fail(e))?;
        *stored = gen;
        self.disk_size.store(new_size, Ordering::SeqCst);
        let mut m = lock(&self.mem);
        m.persisted_gen = m.persisted_gen.max(gen);
        tracing::info!(dir = %self.cfg.dir.display(), from = now, to = new_size, "journal: the disk grew");
        Ok(())
    }

    /// Forget the segments whose records are all `<= seq`; returns their paths to delete once
    /// the new trim point is persisted.
    fn drop_segments_upto(io: &mut Io, m: &mut Mem, seq: u64) -> Vec<std::path::PathBuf> {
        let mut dropped = Vec::new();
        while m.segments.front().is_some_and(|s| s.last_seq <= seq) {
            let s = m.segments.pop_front().expect("front exists");
            m.used_bytes -= s.size;
            if io.cur_seg == s.first_seq {
                io.cur = None;
                io.cur_seg = 0;
                io.unsynced = false;
            }
            dropped.push(s.path);
        }
        dropped
    }

    fn remove_segments(&self, dropped: &[std::path::PathBuf]) -> Result<(), JournalError> {
        for p in dropped {
            tracing::debug!(path = %p.display(), "journal: removing trimmed segment");
            fs::remove_file(p).map_err(|e| io_err(p, e))?;
        }
        rustix::fs::fsync(&self.dir_file).map_err(|e| io_err(&self.cfg.dir, e.into()))
    }

    pub fn stats(&self) -> Stats {
        let m = lock(&self.mem);
        Stats {
            first_seq: Self::first_seq(&m),
            last_seq: m.next_seq - 1,
            durable_seq: m.durable_seq,
            used_bytes: m.used_bytes,
            capacity_bytes: self.cfg.capacity_bytes,
            state: Self::state_of(&m),
            fdatasyncs: self.fdatasyncs.load(Ordering::Relaxed),
            sync_calls: self.sync_calls.load(Ordering::Relaxed),
            direct_io: self.direct.load(Ordering::Relaxed),
        }
    }

    pub fn state(&self) -> JournalState {
        Self::state_of(&lock(&self.mem))
    }

    /// (offset, len) of the dirty bitmap regions, merged and in order.
    pub fn dirty_extents(&self) -> Vec<(u64, u64)> {
        lock(&self.mem).bitmap.extents()
    }

    /// The oldest record still to be read: records up to the trim point are gone even while
    /// the segment holding them remains.
    fn first_seq(m: &Mem) -> u64 {
        m.segments
            .front()
            .map_or(m.next_seq, |s| s.first_seq)
            .max(m.trim_seq + 1)
    }

    fn state_of(m: &Mem) -> JournalState {
        if m.resync {
            JournalState::ResyncRequired {
                dirty_bytes: m.bitmap.dirty_bytes(),
            }
        } else {
            JournalState::Replicating
        }
    }

    fn snapshot(&self, m: &Mem) -> PersistState {
        PersistState {
            trim_seq: m.trim_seq,
            resync: m.resync,
            bitmap: m.bitmap.clone(),
        }
    }

    fn persist_state(&self, st: PersistState, gen: u64) -> Result<(), JournalError> {
        let mut stored = lock(&self.persist);
        if gen > *stored {
            st.store(&self.cfg.dir, &self.dir_file)
                .map_err(|e| self.fail(e))?;
            *stored = gen;
        }
        let mut m = lock(&self.mem);
        m.persisted_gen = m.persisted_gen.max(gen);
        Ok(())
    }

    /// Moves the record buffer to the queue of chunks waiting for the writer.
    fn seal(&self, m: &mut Mem) {
        if m.buf.is_empty() {
            return;
        }
        let fresh = m
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FLUSH_BYTES + (64 << 10)));
        let data = std::mem::replace(&mut m.buf, fresh);
        let seg = m
            .segments
            .back()
            .expect("buffered records belong to a segment");
        m.sealed_bytes += data.len();
        m.sealed.push_back(Chunk {
            seg_first: seg.first_seq,
            file: seg.file.clone(),
            path: seg.path.clone(),
            file_off: seg.size - data.len() as u64,
            data,
            last_seq: m.next_seq - 1,
        });
    }
}
