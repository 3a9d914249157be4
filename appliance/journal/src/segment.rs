//! Segment files: naming, creation, recovery scan at open, and positional reads.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::{self, RecHeader, REC_HEADER_LEN, REC_MAGIC, SEG_HEADER_LEN};
use crate::{io_err, JournalError};

/// A sparse index entry is added every this many bytes of a segment.
const INDEX_STRIDE: u64 = 256 << 10;
/// Read window for sequential record reads.
const READ_WINDOW: usize = 1 << 20;

/// In-memory description of one segment file.
#[derive(Debug)]
pub struct SegMeta {
    pub first_seq: u64,
    /// Seq of the last record, `first_seq - 1` if the segment holds none.
    pub last_seq: u64,
    /// Logical size in bytes (header + records, including records still buffered).
    pub size: u64,
    pub path: PathBuf,
    pub file: Arc<File>,
    /// Sparse (seq, byte offset) index of record starts.
    index: Vec<(u64, u64)>,
}

impl SegMeta {
    /// Notes that a record with `seq` starts at the current end and is `len` bytes long.
    pub fn push_record(&mut self, seq: u64, len: u64) {
        if due(&self.index, self.size) {
            self.index.push((seq, self.size));
        }
        self.last_seq = seq;
        self.size += len;
    }

    pub fn is_empty(&self) -> bool {
        self.last_seq < self.first_seq
    }

    /// A byte offset at or before the start of record `seq` (which must be in this segment).
    pub fn seek_hint(&self, seq: u64) -> u64 {
        let i = self.index.partition_point(|&(s, _)| s <= seq);
        if i == 0 {
            SEG_HEADER_LEN as u64
        } else {
            self.index[i - 1].1
        }
    }
}

fn due(index: &[(u64, u64)], at: u64) -> bool {
    match index.last() {
        None => true,
        Some(&(_, off)) => at >= off + INDEX_STRIDE,
    }
}

pub fn seg_name(first_seq: u64) -> String {
    format!("seg-{first_seq:020}.fj")
}

fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".fj")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Creates a new segment file holding only its header (not yet synced).
pub fn create(dir: &Path, first_seq: u64, disk_size: u64) -> Result<SegMeta, JournalError> {
    let path = dir.join(seg_name(first_seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    file.write_all_at(&format::encode_seg_header(first_seq, disk_size), 0)
        .map_err(|e| io_err(&path, e))?;
    Ok(SegMeta {
        first_seq,
        last_seq: first_seq - 1,
        size: SEG_HEADER_LEN as u64,
        path,
        file: Arc::new(file),
        index: Vec::new(),
    })
}

struct Scan {
    header_ok: bool,
    valid_end: u64,
    last_seq: u64,
    index: Vec<(u64, u64)>,
    bad: Option<(u64, &'static str)>,
    /// The highest disk byte a valid record reaches.
    max_end: u64,
}

fn scan(bytes: &[u8], first_seq: u64, disk_size: u64) -> Scan {
    let mut s = Scan {
        header_ok: false,
        valid_end: 0,
        last_seq: first_seq - 1,
        index: Vec::new(),
        bad: None,
        max_end: 0,
    };
    match format::decode_seg_header(bytes) {
        // A segment written before the disk grew holds records inside the smaller size, which
        // are inside the larger one too. A larger size is refused by `recover` before the scan.
        Ok(h) if h.first_seq == first_seq && h.disk_size <= disk_size => {}
        Ok(h) if h.first_seq != first_seq => {
            s.bad = Some((0, "segment header seq does not match file name"));
            return s;
        }
        Ok(_) => {
            s.bad = Some((0, "segment was written for a larger disk"));
            return s;
        }
        Err(reason) => {
            s.bad = Some((0, reason));
            return s;
        }
    }
    s.header_ok = true;
    let mut meta_size = SEG_HEADER_LEN as u64;
    let mut pos = SEG_HEADER_LEN;
    while pos < bytes.len() {
        match format::decode_record(&bytes[pos..]) {
            Ok((h, _)) if h.seq == s.last_seq + 1 => {
                if due(&s.index, meta_size) {
                    s.index.push((h.seq, meta_size));
                }
                s.last_seq = h.seq;
                s.max_end = s.max_end.max(h.offset + h.len);
                pos += h.total_len();
                meta_size = pos as u64;
            }
            Ok(_) => {
                s.bad = Some((pos as u64, "record out of sequence"));
                break;
            }
            Err(_) if is_padding(&bytes[pos..]) => break,
            Err(reason) => {
                s.bad = Some((pos as u64, reason));
                break;
            }
        }
    }
    s.valid_end = pos as u64;
    s
}

/// The zeros a direct writer leaves after a segment's last record (fewer than one aligned
/// block; see `direct.rs`): the end of the segment, not a torn record.
fn is_padding(rest: &[u8]) -> bool {
    rest.len() < crate::direct::ALIGN && rest.iter().all(|&b| b == 0)
}

/// True if a well-formed record with seq > `min_seq` starts anywhere at or after `from`.
fn valid_record_after(bytes: &[u8], from: usize, min_seq: u64) -> bool {
    let magic = REC_MAGIC.to_le_bytes();
    let mut pos = from;
    while pos + REC_HEADER_LEN <= bytes.len() {
        if bytes[pos..pos + 4] == magic {
            if let Ok((h, _)) = format::decode_record(&bytes[pos..]) {
                if h.seq > min_seq {
                    return true;
                }
            }
        }
        pos += 1;
    }
    false
}

fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    for ent in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let ent = ent.map_err(|e| io_err(dir, e))?;
        let name = ent.file_name();
        match name.to_str().and_then(parse_name) {
            Some(first) if first > 0 => out.push((first, ent.path())),
            _ => {
                let n = name.to_string_lossy();
                if n.starts_with("seg-") {
                    tracing::warn!(file = %n, "ignoring unrecognised file in journal directory");
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Scans every segment in `dir`, truncates a torn tail, removes torn (empty or
/// headerless) trailing segments, and returns the valid segments in order.
/// Corruption followed by a valid record (in the same or a later segment) is an error.
pub fn recover(dir: &Path, disk_size: u64) -> Result<Vec<SegMeta>, JournalError> {
    let files = list(dir)?;
    let mut out: Vec<SegMeta> = Vec::new();
    for (i, (first, path)) in files.iter().enumerate() {
        let bytes = fs::read(path).map_err(|e| io_err(path, e))?;
        if let Ok(h) = format::decode_seg_header(&bytes) {
            if h.disk_size > disk_size {
                return Err(JournalError::Shrunk {
                    dir: dir.to_path_buf(),
                    written: h.disk_size,
                    configured: disk_size,
                });
            }
        }
        let mut s = scan(&bytes, *first, disk_size);
        // A record past the end was written after the disk grew (in a segment begun before).
        if s.max_end > disk_size {
            return Err(JournalError::Shrunk {
                dir: dir.to_path_buf(),
                written: s.max_end,
                configured: disk_size,
            });
        }
        let mut min_seq = s.last_seq;
        if let Some(prev) = out.last() {
            if s.header_ok && *first != prev.last_seq + 1 {
                // Acceptable only as a leftover of segments created ahead of their
                // records (no valid record anywhere in it or later).
                s.header_ok = false;
                s.valid_end = 0;
                s.bad = Some((0, "segment out of sequence"));
                min_seq = prev.last_seq;
            }
        }
        let Some((bad_off, reason)) = s.bad else {
            out.push(open_meta(path, *first, &s)?);
            continue;
        };
        // Torn or corrupt: only acceptable if nothing valid follows.
        if valid_record_after(&bytes, bad_off as usize + 1, min_seq) {
            return Err(corrupt(
                path,
                bad_off,
                format!("{reason}, followed by valid records"),
            ));
        }
        for (_, later) in &files[i + 1..] {
            let lb = fs::read(later).map_err(|e| io_err(later, e))?;
            if valid_record_after(&lb, 0, min_seq) {
                return Err(corrupt(
                    path,
                    bad_off,
                    format!("{reason}, followed by valid records in {}", later.display()),
                ));
            }
        }
        tracing::warn!(
            path = %path.display(), offset = bad_off, reason,
            dropped_bytes = bytes.len() as u64 - s.valid_end,
            "journal: truncating torn tail"
        );
        if s.header_ok {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io_err(path, e))?;
            f.set_len(s.valid_end).map_err(|e| io_err(path, e))?;
            rustix::fs::fdatasync(&f).map_err(|e| io_err(path, e.into()))?;
            out.push(open_meta(path, *first, &s)?);
        } else {
            fs::remove_file(path).map_err(|e| io_err(path, e))?;
        }
        for (_, later) in &files[i + 1..] {
            tracing::warn!(path = %later.display(), "journal: removing segment after torn tail");
            fs::remove_file(later).map_err(|e| io_err(later, e))?;
        }
        break;
    }
    Ok(out)
}

fn open_meta(path: &Path, first_seq: u64, s: &Scan) -> Result<SegMeta, JournalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    Ok(SegMeta {
        first_seq,
        last_seq: s.last_seq,
        size: s.valid_end,
        path: path.to_path_buf(),
        file: Arc::new(file),
        index: s.index.clone(),
    })
}

/// Sequential record reader over one segment file using positional reads.
pub struct SegReader<'a> {
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    start: u64,
    pub pos: u64,
}

impl<'a> SegReader<'a> {
    pub fn new(file: &'a File, path: &'a Path, pos: u64) -> Self {
        SegReader {
            file,
            path,
            buf: Vec::new(),
            start: 0,
            pos,
        }
    }

    fn window(&mut self, need: usize) -> Result<&[u8], JournalError> {
        let have = self.start + self.buf.len() as u64;
        if self.pos < self.start || self.pos + need as u64 > have {
            self.buf.resize(need.max(READ_WINDOW), 0);
            let mut n = 0;
            while n < self.buf.len() {
                match self.file.read_at(&mut self.buf[n..], self.pos + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_err(self.path, e)),
                }
            }
            self.buf.truncate(n);
            self.start = self.pos;
            if n < need {
                return Err(corrupt(self.path, self.pos, "durable record is short"));
            }
        }
        let off = (self.pos - self.start) as usize;
        Ok(&self.buf[off..off + need])
    }

    /// Reads and verifies the next record, advancing past it.
    pub fn next_record(&mut self) -> Result<(RecHeader, &[u8]), JournalError> {
        let (pos, path) = (self.pos, self.path);
        let h = format::decode_rec_header(self.window(REC_HEADER_LEN)?)
            .map_err(|r| corrupt(path, pos, r))?;
        let total = h.total_len();
        self.window(total)?;
        let off = (pos - self.start) as usize;
        self.pos = pos + total as u64;
        format::decode_record(&self.buf[off..off + total]).map_err(|r| corrupt(path, pos, r))
    }
}
