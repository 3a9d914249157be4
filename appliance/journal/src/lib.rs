//! `ferry-journal`: the per-disk write journal of the process server.
//!
//! Guest writes are appended in order as checksummed records to segment files in
//! the journal directory (on the NVMe cache). [`Journal::sync`] makes everything
//! appended so far durable with one `fdatasync` shared by all concurrent callers
//! (group commit). The drainer reads durable records with
//! [`Journal::read_durable`] and, once the recovery site has them, calls
//! [`Journal::trim_upto`], which deletes whole segments. When the journal is full,
//! writes are still accepted but only recorded in a persisted dirty bitmap and the
//! journal reports [`JournalState::ResyncRequired`].
//!
//! # On-disk format (version 1, all integers little endian)
//!
//! Directory contents: segment files `seg-<first seq, 20 decimal digits>.fj`
//! (e.g. `seg-00000000000000000001.fj`) and the state file `journal.state`
//! (written as `journal.state.tmp`, fdatasync, rename, directory fsync).
//!
//! Segment header (32 bytes, offset 0 of every segment file):
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"FJSG"` |
//! | 4 | 2 | version = 1 |
//! | 6 | 2 | header length = 32 |
//! | 8 | 8 | seq of the first record in this segment (= number in the file name) |
//! | 16 | 8 | disk size in bytes at creation (at most the configured size: disks only grow) |
//! | 24 | 4 | reserved, 0 |
//! | 28 | 4 | crc32c of bytes 0..28 |
//!
//! Records follow back to back, seqs strictly consecutive (+1). Record:
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"FJRC"` (u32 0x43524A46) |
//! | 4 | 1 | type: 1 = write, 2 = write zeroes, 3 = trim/discard |
//! | 5 | 1 | flags, 0 |
//! | 6 | 2 | reserved, 0 |
//! | 8 | 8 | seq |
//! | 16 | 8 | disk byte offset |
//! | 24 | 8 | length in bytes (for a write: the data length, at most 64 MiB) |
//! | 32 | n | data (writes only; n = length, 0 for zero/trim) |
//! | 32+n | 4 | crc32c of bytes 0..32+n |
//!
//! State file `journal.state`:
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `b"FJST"` |
//! | 4 | 2 | version = 1 |
//! | 6 | 2 | flags: bit 0 = resync required |
//! | 8 | 8 | trim seq: records <= it were made durable remotely (next seq is above it) |
//! | 16 | 8 | disk size |
//! | 24 | 8 | bitmap granularity in bytes |
//! | 32 | 8 | number of bitmap bits = ceil(disk size / granularity) |
//! | 40 | 8*ceil(bits/64) | bitmap as u64 words, bit i of word w = block 64w+i |
//! | end-4 | 4 | crc32c of all preceding bytes |
//!
//! Recovery at open: segments are scanned in seq order; the first record that is
//! short, fails its crc or is out of sequence ends the journal if no valid record
//! follows it (a torn tail: the file is truncated there, later segments removed,
//! logged). If a valid record does follow, the journal is corrupt and `open` fails.
//! Before a new segment receives records the previous one is fdatasynced, so only
//! the last segment can have a torn tail.
#![forbid(unsafe_code)]

mod bitmap;
mod direct;
mod format;
mod handle;
mod journal;
mod segment;

use std::path::{Path, PathBuf};

pub use format::MAX_WRITE_LEN;
pub use handle::Journal;

/// Configuration of one disk's journal.
#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// Directory holding the segment files and the state file (one per disk).
    pub dir: PathBuf,
    /// Size of the protected disk in bytes; operations must stay inside it.
    pub disk_size: u64,
    /// Maximum bytes of untrimmed segments (default 1 GiB).
    pub capacity_bytes: u64,
    /// Target size of one segment file (default 64 MiB).
    pub segment_bytes: u64,
    /// Dirty bitmap granularity in bytes (default 64 KiB).
    pub bitmap_granularity: u64,
    /// Write segments with O_DIRECT and aligned I/O (see `direct.rs`); falls back to buffered
    /// writes on a filesystem without O_DIRECT. Default off: the hardware profile decides.
    pub direct_io: bool,
}

impl JournalConfig {
    pub fn new(dir: PathBuf, disk_size: u64) -> Self {
        JournalConfig {
            dir,
            disk_size,
            capacity_bytes: 1 << 30,
            segment_bytes: 64 << 20,
            bitmap_granularity: 64 << 10,
            direct_io: false,
        }
    }
}

/// One guest operation to append (borrowed data).
#[derive(Clone, Copy, Debug)]
pub enum Op<'a> {
    Write { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
}

/// One journaled operation (owned data), as returned by [`Journal::read_durable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedOp {
    Write { offset: u64, data: Vec<u8> },
    Zero { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
}

/// A durable journal record.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u64,
    pub op: OwnedOp,
}

/// Result of [`Journal::append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Journaled with this seq (durable after the next [`Journal::sync`]).
    Journaled(u64),
    /// The journal is full: only the dirty bitmap recorded the write.
    Dirty,
}

/// Whether the journal still holds every write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JournalState {
    Replicating,
    ResyncRequired { dirty_bytes: u64 },
}

/// A snapshot of the journal's counters.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Lowest seq still stored (= `last_seq + 1` when empty).
    pub first_seq: u64,
    /// Highest seq appended (0 if none ever).
    pub last_seq: u64,
    /// Highest seq known durable.
    pub durable_seq: u64,
    /// Bytes of untrimmed segments, including buffered records.
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub state: JournalState,
    /// Number of fdatasync calls on segment files since open (group-commit metric).
    pub fdatasyncs: u64,
    /// Number of `sync` calls since open.
    pub sync_calls: u64,
    /// Segments are written with O_DIRECT (asked for and supported by the filesystem).
    pub direct_io: bool,
}

/// Journal errors.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal corrupt: {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "operation out of range: offset {offset} + length {len} exceeds disk size {disk_size}"
    )]
    OutOfRange {
        offset: u64,
        len: u64,
        disk_size: u64,
    },
    #[error("write of {len} bytes exceeds the maximum record size {max}")]
    TooLarge { len: u64, max: u64 },
    #[error(
        "records after seq {after_seq} were already trimmed (first stored seq is {first_seq})"
    )]
    Trimmed { after_seq: u64, first_seq: u64 },
    #[error("cannot trim up to seq {seq}: only up to {durable_seq} is durable")]
    TrimBeyondDurable { seq: u64, durable_seq: u64 },
    #[error(
        "shrinking a protected disk is refused: the journal in {dir} was written for a disk of \
         {written} bytes, configured {configured} bytes (a disk only grows; after `ferry grow` \
         give the new size)"
    )]
    Shrunk {
        dir: PathBuf,
        written: u64,
        configured: u64,
    },
    #[error("invalid journal configuration: {0}")]
    InvalidConfig(String),
    #[error("journal failed earlier and refuses further writes: {0}")]
    Failed(String),
}

pub(crate) fn io_err(path: &Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}
