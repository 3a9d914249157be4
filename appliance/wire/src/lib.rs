//! The replication protocol between process server and master target (inside TLS).
//!
//! One TLS connection carries one disk. The process server opens with [`Msg::Hello`]; the master
//! target answers [`Msg::Welcome`] with the last recovery point it holds for that disk, which is
//! where the process server resumes (its journal still holds everything after that point, because
//! the journal is trimmed only on [`Msg::Committed`]). Then the process server streams checkpoints:
//! `Begin`, any number of `Block`s, `End`, several in flight at once; the master target answers
//! each with `Committed` once the point is durable and visible, or `Rejected`, after which the
//! connection is closed and resumed.
//!
//! A resync connection (reprotect, failback: the protected site brings an original disk up to
//! date from the recovery site's live disk) opens with [`Msg::ResyncHello`] instead, naming a
//! failover's live disk; the master target answers [`Msg::ResyncWelcome`] with its size. Then the
//! protected side asks for the live disk's block names ([`Msg::IdsRequest`], answered by
//! [`Msg::Ids`]) and fetches only the blocks whose names differ from its own
//! ([`Msg::FetchRequest`], answered by one [`Msg::Block`] per index, each a zero block or a sealed
//! chunk, never plaintext). A refusal is a [`Msg::Rejected`] with sequence 0.
//!
//! Every frame is `len: u32 LE` (of what follows) `| type: u8 | payload`, little endian
//! throughout, strings as `u16 len | UTF-8`, byte strings as `u32 len | bytes`. Lengths are checked
//! against [`MAX_FRAME`] before anything is allocated. Byte layout: `docs/formats.md`.

use ferry_chunk::ChunkId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version carried in Hello/Welcome.
pub const VERSION: u16 = 1;
/// The largest frame either side accepts (a block of at most 16 MiB plus headers).
pub const MAX_FRAME: u32 = 16 * 1024 * 1024 + 4096;
/// The largest disk name.
pub const MAX_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(u32),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("invalid disk name (1-64 characters of A-Z a-z 0-9 . _ -)")]
    BadName,
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consistency {
    Crash = 0,
    Application = 1,
}

/// What a checkpoint is: the journal records `(journal_start, journal_end]` applied to the
/// previous point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub created_unix_ns: u64,
    pub journal_start: u64,
    pub journal_end: u64,
    pub disk_size: u64,
    pub block_size: u32,
    pub consistency: Consistency,
    /// The checkpoint ends exactly at a consistency-group cut: every disk of the machine gets a
    /// point at this cut (its id, the cut's time in Unix ns, also the point's `created_unix_ns`),
    /// and those points together are one crash-consistent state of the machine.
    pub group_cut: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockBody {
    /// The whole block reads as zeros.
    Zero,
    /// The whole block is this chunk; `blob` is absent when the sender knows the master target
    /// already holds it (dedup across the WAN).
    Chunk { id: ChunkId, blob: Option<Vec<u8>> },
    /// Part of the block changed: a sealed [`Patch`] (context: [`patch_context`]).
    Patch { sealed: Vec<u8> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectReason {
    /// The checkpoint does not follow the master target's latest point.
    OutOfOrder = 1,
    /// A chunk was sent by reference but the master target does not hold it.
    MissingChunk = 2,
    /// A blob failed authentication or did not match its name.
    BadData = 3,
    /// The master target could not store the checkpoint.
    Storage = 4,
    /// The message made no sense here.
    Protocol = 5,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello {
        version: u16,
        disk: String,
        disk_size: u64,
        block_size: u32,
    },
    Welcome {
        version: u16,
        /// 0 when the master target holds no point of this disk.
        last_seq: u64,
        journal_end: u64,
    },
    Begin(Checkpoint),
    Block {
        index: u64,
        body: BlockBody,
    },
    End {
        seq: u64,
        blocks: u64,
    },
    /// Like `End`, but the point's journal position is only known now: a continuous disk's
    /// checksum resync reads the live disk and then replays the journal up to a position it
    /// learns last, and the point holds the disk as of that position.
    EndAt {
        seq: u64,
        blocks: u64,
        journal_end: u64,
    },
    Committed {
        seq: u64,
        journal_end: u64,
    },
    Rejected {
        seq: u64,
        reason: RejectReason,
        chunk: Option<ChunkId>,
        message: String,
    },
    /// Ask for the names of blocks `first..first+count` in the master target's newest point
    /// (checksum resync: a name is the keyed hash of the block's plaintext).
    IdsRequest {
        first: u64,
        count: u32,
    },
    /// The answer: one name per block, all-zero for a hole.
    Ids {
        first: u64,
        ids: Vec<ChunkId>,
    },
    /// Which of these chunks does the master target hold already? (A seed or resync that was
    /// interrupted resumes without sending again what already arrived.)
    HaveRequest {
        ids: Vec<ChunkId>,
    },
    /// One answer per asked chunk, in order.
    Have {
        present: Vec<bool>,
    },
    /// Open a resync connection: the protected site asks for the live disk of `machine`'s
    /// `disk` that failover `plan` of `tenant` made at the recovery site (reprotect, failback).
    ResyncHello {
        version: u16,
        tenant: String,
        plan: String,
        machine: String,
        disk: String,
        /// The original disk's size: the live disk must be as large.
        disk_size: u64,
        block_size: u32,
    },
    /// The live disk is there: its size and the block size its names are of.
    ResyncWelcome {
        version: u16,
        disk_size: u64,
        block_size: u32,
    },
    /// Send these blocks of the live disk (ascending, each at most once): the answer is one
    /// `Block` per index, in this order, each `Zero` or a sealed `Chunk` with its data.
    FetchRequest {
        indices: Vec<u64>,
    },
}

/// The most block names one `IdsRequest` may ask for (a 256 KiB answer).
pub const MAX_IDS: u32 = 8192;
/// The most blocks one `FetchRequest` may ask for (what is in flight stays bounded).
pub const MAX_FETCH: u32 = 256;

/// The name an `Ids` answer gives a block whose stored chunk failed authentication (it was
/// quarantined): it never equals a real name, so a resync sends the block again, with its data
/// even when the sender believes the master target holds that chunk.
pub const DAMAGED: ChunkId = ChunkId([0xff; 32]);

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_BEGIN: u8 = 3;
const T_BLOCK: u8 = 4;
const T_END: u8 = 5;
const T_COMMITTED: u8 = 6;
const T_REJECTED: u8 = 7;
const T_IDS_REQUEST: u8 = 8;
const T_IDS: u8 = 9;
const T_HAVE_REQUEST: u8 = 10;
const T_HAVE: u8 = 11;
const T_END_AT: u8 = 12;
const T_RESYNC_HELLO: u8 = 13;
const T_RESYNC_WELCOME: u8 = 14;
const T_FETCH_REQUEST: u8 = 15;

const B_ZERO: u8 = 0;
const B_CHUNK: u8 = 1;
const B_CHUNK_REF: u8 = 2;
const B_PATCH: u8 = 3;

/// A disk name is used as a directory name at the master target: keep it boring.
pub fn valid_disk_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// The associated data for a patch blob: binds it to the disk, the checkpoint and the block.
pub fn patch_context(disk: &str, seq: u64, index: u64) -> Vec<u8> {
    let mut c = b"ferry-patch-v1\0".to_vec();
    c.extend_from_slice(disk.as_bytes());
    c.push(0);
    c.extend_from_slice(&seq.to_le_bytes());
    c.extend_from_slice(&index.to_le_bytes());
    c
}

/// Byte extents of one block that a checkpoint changed: `(offset within block, bytes)`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Patch {
    pub extents: Vec<(u32, Vec<u8>)>,
}

impl Patch {
    /// `count: u32 | (offset: u32, len: u32, bytes)*`
    pub fn encode(&self) -> Vec<u8> {
        let total: usize = self.extents.iter().map(|(_, d)| d.len() + 8).sum();
        let mut out = Vec::with_capacity(4 + total);
        out.extend_from_slice(&(self.extents.len() as u32).to_le_bytes());
        for (off, data) in &self.extents {
            out.extend_from_slice(&off.to_le_bytes());
            out.extend_from_slice(&(data.len() as u32).to_le_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    /// Decode and check that every extent lies inside a block of `block_len` bytes.
    pub fn decode(bytes: &[u8], block_len: u32) -> Result<Patch, WireError> {
        let mut r = Reader::new(bytes, "patch");
        let n = r.u32()? as usize;
        if n > block_len as usize {
            return Err(WireError::Malformed("patch"));
        }
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            let off = r.u32()?;
            let len = r.u32()?;
            if u64::from(off) + u64::from(len) > u64::from(block_len) {
                return Err(WireError::Malformed("patch"));
            }
            extents.push((off, r.take(len as usize)?.to_vec()));
        }
        r.finish()?;
        Ok(Patch { extents })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed(self.what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn id(&mut self) -> Result<ChunkId, WireError> {
        Ok(ChunkId(self.take(32)?.try_into().expect("32")))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::Malformed(self.what))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, WireError> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed(self.what))
        }
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl Msg {
    /// The whole frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        match self {
            Msg::Hello {
                version,
                disk,
                disk_size,
                block_size,
            } => {
                out.push(T_HELLO);
                out.extend_from_slice(&version.to_le_bytes());
                put_string(&mut out, disk);
                out.extend_from_slice(&disk_size.to_le_bytes());
                out.extend_from_slice(&block_size.to_le_bytes());
            }
            Msg::Welcome {
                version,
                last_seq,
                journal_end,
            } => {
                out.push(T_WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&last_seq.to_le_bytes());
                out.extend_from_slice(&journal_end.to_le_bytes());
            }
            Msg::Begin(c) => {
                out.push(T_BEGIN);
                for v in [
                    c.seq,
                    c.created_unix_ns,
                    c.journal_start,
                    c.journal_end,
                    c.disk_size,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&c.block_size.to_le_bytes());
                // Bit 1: a group cut follows.
                out.push(c.consistency as u8 | if c.group_cut.is_some() { 2 } else { 0 });
                if let Some(cut) = c.group_cut {
                    out.extend_from_slice(&cut.to_le_bytes());
                }
            }
            Msg::Block { index, body } => {
                out.push(T_BLOCK);
                out.extend_from_slice(&index.to_le_bytes());
                match body {
                    BlockBody::Zero => out.push(B_ZERO),
                    BlockBody::Chunk { id, blob: Some(b) } => {
                        out.push(B_CHUNK);
                        out.extend_from_slice(&id.0);
                        put_bytes(&mut out, b);
                    }
                    BlockBody::Chunk { id, blob: None } => {
                        out.push(B_CHUNK_REF);
                        out.extend_from_slice(&id.0);
                    }
                    BlockBody::Patch { sealed } => {
                        out.push(B_PATCH);
                        put_bytes(&mut out, sealed);
                    }
                }
            }
            Msg::End { seq, blocks } => {
                out.push(T_END);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
            }
            Msg::EndAt {
                seq,
                blocks,
                journal_end,
            } => {
                out.push(T_END_AT);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&blocks.to_le_bytes());
                out.extend_from_slice(&journal_end.to_le_bytes());
            }
            Msg::Committed { seq, journal_end } => {
                out.push(T_COMMITTED);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&journal_end.to_le_bytes());
            }
            Msg::Rejected {
                seq,
                reason,
                chunk,
                message,
            } => {
                out.push(T_REJECTED);
                out.extend_from_slice(&seq.to_le_bytes());
                out.push(*reason as u8);
                match chunk {
                    Some(id) => {
                        out.push(1);
                        out.extend_from_slice(&id.0);
                    }
                    None => out.push(0),
                }
                put_string(&mut out, message);
            }
            Msg::IdsRequest { first, count } => {
                out.push(T_IDS_REQUEST);
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            Msg::Ids { first, ids } => {
                out.push(T_IDS);
                out.extend_from_slice(&first.to_le_bytes());
                out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                for id in ids {
                    out.extend_from_slice(&id.0);
                }
            }
            Msg::HaveRequest { ids } => {
                out.push(T_HAVE_REQUEST);
                out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                for id in ids {
                    out.extend_from_slice(&id.0);
                }
            }
            Msg::Have { present } => {
                out.push(T_HAVE);
                out.extend_from_slice(&(present.len() as u32).to_le_bytes());
                out.extend(present.iter().map(|&p| u8::from(p)));
            }
            Msg::ResyncHello {
                version,
                tenant,
                plan,
                machine,
                disk,
                disk_size,
                block_size,
            } => {
                out.push(T_RESYNC_HELLO);
                out.extend_from_slice(&version.to_le_bytes());
                for s in [tenant, plan, machine, disk] {
                    put_string(&mut out, s);
                }
                out.extend_from_slice(&disk_size.to_le_bytes());
                out.extend_from_slice(&block_size.to_le_bytes());
            }
            Msg::ResyncWelcome {
                version,
                disk_size,
                block_size,
            } => {
                out.push(T_RESYNC_WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&disk_size.to_le_bytes());
                out.extend_from_slice(&block_size.to_le_bytes());
            }
            Msg::FetchRequest { indices } => {
                out.push(T_FETCH_REQUEST);
                out.extend_from_slice(&(indices.len() as u32).to_le_bytes());
                for i in indices {
                    out.extend_from_slice(&i.to_le_bytes());
                }
            }
        }
        let len = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&len.to_le_bytes());
        out
    }

    /// Decode one frame body (type byte and payload, without the length prefix).
    pub fn decode(frame: &[u8]) -> Result<Msg, WireError> {
        let (&ty, payload) = frame.split_first().ok_or(WireError::Malformed("empty"))?;
        let msg = match ty {
            T_HELLO => {
                let mut r = Reader::new(payload, "hello");
                let m = Msg::Hello {
                    version: r.u16()?,
                    disk: r.string()?,
                    disk_size: r.u64()?,
                    block_size: r.u32()?,
                };
                r.finish()?;
                if let Msg::Hello { disk, .. } = &m {
                    if !valid_disk_name(disk) {
                        return Err(WireError::BadName);
                    }
                }
                m
            }
            T_WELCOME => {
                let mut r = Reader::new(payload, "welcome");
                let m = Msg::Welcome {
                    version: r.u16()?,
                    last_seq: r.u64()?,
                    journal_end: r.u64()?,
                };
                r.finish()?;
                m
            }
            T_BEGIN => {
                let mut r = Reader::new(payload, "begin");
                let mut c = Checkpoint {
                    seq: r.u64()?,
                    created_unix_ns: r.u64()?,
                    journal_start: r.u64()?,
                    journal_end: r.u64()?,
                    disk_size: r.u64()?,
                    block_size: r.u32()?,
                    consistency: Consistency::Crash,
                    group_cut: None,
                };
                let flags = r.u8()?;
                c.consistency = match flags & 1 {
                    0 => Consistency::Crash,
                    _ => Consistency::Application,
                };
                match flags & !1 {
                    0 => {}
                    2 => c.group_cut = Some(r.u64()?),
                    _ => return Err(WireError::Malformed("begin")),
                }
                r.finish()?;
                Msg::Begin(c)
            }
            T_BLOCK => {
                let mut r = Reader::new(payload, "block");
                let index = r.u64()?;
                let body = match r.u8()? {
                    B_ZERO => BlockBody::Zero,
                    B_CHUNK => BlockBody::Chunk {
                        id: r.id()?,
                        blob: Some(r.bytes()?),
                    },
                    B_CHUNK_REF => BlockBody::Chunk {
                        id: r.id()?,
                        blob: None,
                    },
                    B_PATCH => BlockBody::Patch { sealed: r.bytes()? },
                    _ => return Err(WireError::Malformed("block")),
                };
                r.finish()?;
                Msg::Block { index, body }
            }
            T_END => {
                let mut r = Reader::new(payload, "end");
                let m = Msg::End {
                    seq: r.u64()?,
                    blocks: r.u64()?,
                };
                r.finish()?;
                m
            }
            T_END_AT => {
                let mut r = Reader::new(payload, "end-at");
                let m = Msg::EndAt {
                    seq: r.u64()?,
                    blocks: r.u64()?,
                    journal_end: r.u64()?,
                };
                r.finish()?;
                m
            }
            T_COMMITTED => {
                let mut r = Reader::new(payload, "committed");
                let m = Msg::Committed {
                    seq: r.u64()?,
                    journal_end: r.u64()?,
                };
                r.finish()?;
                m
            }
            T_REJECTED => {
                let mut r = Reader::new(payload, "rejected");
                let seq = r.u64()?;
                let reason = match r.u8()? {
                    1 => RejectReason::OutOfOrder,
                    2 => RejectReason::MissingChunk,
                    3 => RejectReason::BadData,
                    4 => RejectReason::Storage,
                    5 => RejectReason::Protocol,
                    _ => return Err(WireError::Malformed("rejected")),
                };
                let chunk = match r.u8()? {
                    0 => None,
                    1 => Some(r.id()?),
                    _ => return Err(WireError::Malformed("rejected")),
                };
                let message = r.string()?;
                r.finish()?;
                Msg::Rejected {
                    seq,
                    reason,
                    chunk,
                    message,
                }
            }
            T_IDS_REQUEST => {
                let mut r = Reader::new(payload, "ids request");
                let m = Msg::IdsRequest {
                    first: r.u64()?,
                    count: r.u32()?,
                };
                r.finish()?;
                if let Msg::IdsRequest { count, .. } = m {
                    if count == 0 || count > MAX_IDS {
                        return Err(WireError::Malformed("ids request"));
                    }
                }
                m
            }
            T_IDS => {
                let mut r = Reader::new(payload, "ids");
                let first = r.u64()?;
                let n = r.u32()?;
                if n > MAX_IDS {
                    return Err(WireError::Malformed("ids"));
                }
                let ids = (0..n).map(|_| r.id()).collect::<Result<Vec<_>, _>>()?;
                r.finish()?;
                Msg::Ids { first, ids }
            }
            T_HAVE_REQUEST => {
                let mut r = Reader::new(payload, "have request");
                let n = r.u32()?;
                if n == 0 || n > MAX_IDS {
                    return Err(WireError::Malformed("have request"));
                }
                let ids = (0..n).map(|_| r.id()).collect::<Result<Vec<_>, _>>()?;
                r.finish()?;
                Msg::HaveRequest { ids }
            }
            T_HAVE => {
                let mut r = Reader::new(payload, "have");
                let n = r.u32()?;
                if n > MAX_IDS {
                    return Err(WireError::Malformed("have"));
                }
                let present = r
                    .take(n as usize)?
                    .iter()
                    .map(|&b| match b {
                        0 => Ok(false),
                        1 => Ok(true),
                        _ => Err(WireError::Malformed("have")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                r.finish()?;
                Msg::Have { present }
            }
            T_RESYNC_HELLO => {
                let mut r = Reader::new(payload, "resync hello");
                let version = r.u16()?;
                let mut names = Vec::with_capacity(4);
                for _ in 0..4 {
                    let n = r.string()?;
                    if !valid_disk_name(&n) {
                        return Err(WireError::BadName);
                    }
                    names.push(n);
                }
                let (disk_size, block_size) = (r.u64()?, r.u32()?);
                r.finish()?;
                let [tenant, plan, machine, disk]: [String; 4] = names
                    .try_into()
                    .map_err(|_| WireError::Malformed("resync hello"))?;
                Msg::ResyncHello {
                    version,
                    tenant,
                    plan,
                    machine,
                    disk,
                    disk_size,
                    block_size,
                }
            }
            T_RESYNC_WELCOME => {
                let mut r = Reader::new(payload, "resync welcome");
                let m = Msg::ResyncWelcome {
                    version: r.u16()?,
                    disk_size: r.u64()?,
                    block_size: r.u32()?,
                };
                r.finish()?;
                m
            }
            T_FETCH_REQUEST => {
                let mut r = Reader::new(payload, "fetch request");
                let n = r.u32()?;
                if n == 0 || n > MAX_FETCH {
                    return Err(WireError::Malformed("fetch request"));
                }
                let indices = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
                r.finish()?;
                if indices.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(WireError::Malformed("fetch request"));
                }
                Msg::FetchRequest { indices }
            }
            t => return Err(WireError::UnknownType(t)),
        };
        Ok(msg)
    }
}

/// Read one message; `Err(Closed)` on a clean end of stream between frames.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Msg, WireError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME {
        return Err(WireError::FrameTooLarge(len));
    }
    // Read into the Vec's spare capacity (not zeroed first: every chunk frame would be
    // written twice); a frame cut short is an early end of the stream, as with `read_exact`.
    let mut frame = Vec::with_capacity(len as usize);
    let got = r.take(u64::from(len)).read_to_end(&mut frame).await?;
    if got != len as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Msg::decode(&frame)
}

/// Write one message (not flushed).
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<(), WireError> {
    w.write_all(&m.encode()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        let id = ChunkId([9; 32]);
        vec![
            Msg::Hello {
                version: VERSION,
                disk: "vm1-disk0".into(),
                disk_size: 1 << 30,
                block_size: 65536,
            },
            Msg::Welcome {
                version: VERSION,
                last_seq: 7,
                journal_end: 99,
            },
            Msg::Begin(Checkpoint {
                seq: 8,
                created_unix_ns: 123,
                journal_start: 99,
                journal_end: 120,
                disk_size: 1 << 30,
                block_size: 65536,
                consistency: Consistency::Application,
                group_cut: None,
            }),
            Msg::Begin(Checkpoint {
                seq: 9,
                created_unix_ns: 456,
                journal_start: 120,
                journal_end: 130,
                disk_size: 1 << 30,
                block_size: 65536,
                consistency: Consistency::Crash,
                group_cut: Some(456),
            }),
            Msg::Block {
                index: 3,
                body: BlockBody::Zero,
            },
            Msg::Block {
                index: 4,
                body: BlockBody::Chunk {
                    id,
                    blob: Some(vec![1, 2, 3]),
                },
            },
            Msg::Block {
                index: 5,
                body: BlockBody::Chunk { id, blob: None },
            },
            Msg::Block {
                index: 6,
                body: BlockBody::Patch {
                    sealed: vec![4; 40],
                },
            },
            Msg::End { seq: 8, blocks: 4 },
            Msg::EndAt {
                seq: 8,
                blocks: 4,
                journal_end: 131,
            },
            Msg::Committed {
                seq: 8,
                journal_end: 120,
            },
            Msg::Rejected {
                seq: 8,
                reason: RejectReason::MissingChunk,
                chunk: Some(id),
                message: "no such chunk".into(),
            },
            Msg::IdsRequest { first: 5, count: 2 },
            Msg::Ids {
                first: 5,
                ids: vec![id, ChunkId::ZERO],
            },
            Msg::HaveRequest { ids: vec![id, id] },
            Msg::Have {
                present: vec![true, false],
            },
            Msg::ResyncHello {
                version: VERSION,
                tenant: "acme".into(),
                plan: "dr".into(),
                machine: "web".into(),
                disk: "d0".into(),
                disk_size: 1 << 30,
                block_size: 65536,
            },
            Msg::ResyncWelcome {
                version: VERSION,
                disk_size: 1 << 30,
                block_size: 65536,
            },
            Msg::FetchRequest {
                indices: vec![1, 7, 9],
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let f = m.encode();
            assert_eq!(
                u32::from_le_bytes(f[..4].try_into().unwrap()) as usize,
                f.len() - 4
            );
            assert_eq!(Msg::decode(&f[4..]).unwrap(), m);
        }
    }

    #[test]
    fn truncated_or_extended_frames_are_errors() {
        for m in samples() {
            let f = m.encode();
            for cut in 5..f.len() {
                assert!(Msg::decode(&f[4..cut]).is_err(), "{m:?} cut at {cut}");
            }
            let mut longer = f[4..].to_vec();
            longer.push(0);
            assert!(Msg::decode(&longer).is_err());
        }
        assert!(matches!(
            Msg::decode(&[99]),
            Err(WireError::UnknownType(99))
        ));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "../etc", ".hidden", "a/b", &"x".repeat(65)] {
            assert!(!valid_disk_name(bad), "{bad}");
            let f = Msg::Hello {
                version: 1,
                disk: bad.to_string(),
                disk_size: 1,
                block_size: 1,
            }
            .encode();
            assert!(Msg::decode(&f[4..]).is_err());
        }
    }

    #[test]
    fn resync_requests_are_checked() {
        let hello = |machine: &str| {
            Msg::ResyncHello {
                version: VERSION,
                tenant: "acme".into(),
                plan: "dr".into(),
                machine: machine.into(),
                disk: "d0".into(),
                disk_size: 1,
                block_size: 1,
            }
            .encode()
        };
        assert!(matches!(
            Msg::decode(&hello("../../etc")[4..]),
            Err(WireError::BadName)
        ));
        // Empty, too many, out of order or repeated indices.
        for indices in [
            vec![],
            (0..u64::from(MAX_FETCH) + 1).collect(),
            vec![3, 2],
            vec![2, 2],
        ] {
            let f = Msg::FetchRequest { indices }.encode();
            assert!(Msg::decode(&f[4..]).is_err());
        }
    }

    #[test]
    fn patches_round_trip_and_stay_inside_the_block() {
        let p = Patch {
            extents: vec![(0, vec![1; 10]), (4090, vec![2; 6])],
        };
        assert_eq!(Patch::decode(&p.encode(), 4096).unwrap(), p);
        assert!(Patch::decode(&p.encode(), 4095).is_err());
        let huge = [0xff; 4];
        assert!(Patch::decode(&huge, 65536).is_err());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_allocation() {
        let mut data: &[u8] = &[0xff, 0xff, 0xff, 0x7f, 1];
        assert!(matches!(
            read_msg(&mut data).await,
            Err(WireError::FrameTooLarge(_))
        ));
        let mut empty: &[u8] = &[];
        assert!(matches!(read_msg(&mut empty).await, Err(WireError::Closed)));
    }
}
