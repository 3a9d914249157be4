//! Reading replies in the transmission phase: simple replies and structured reply chunks
//! (`OFFSET_DATA`, `OFFSET_HOLE`, `BLOCK_STATUS`, `NONE`, error chunks) for one request at a
//! time, and completions of pipelined writes.
//!
//! Nothing the server says is trusted: the magic and cookie must match, chunk lengths are
//! checked against the request before any payload is read or allocated, data and holes must
//! lie inside the request and not overlap, a read's chunks must cover it exactly, and block
//! status extents must be non-empty and stay inside the request (the last one may run past the
//! request, as the protocol allows, and is clipped) and the export.

use super::{recv, Client, ClientError, Completion, Extent, Result};
use crate::proto::*;
use std::collections::BTreeMap;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// Largest `BLOCK_STATUS` chunk accepted: QEMU sends at most 2^17 extents (1 MiB) per chunk.
pub const MAX_BLOCK_STATUS_CHUNK: u32 = 2 << 20;
/// Largest error chunk: error, message length, a message of at most 4096 bytes, an offset.
const MAX_ERROR_CHUNK: u32 = 6 + MAX_STRING_LEN + 8;
/// Most chunks accepted in the reply to one request.
const MAX_CHUNKS: usize = 1 << 17;

enum Reply {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        len: u32,
    },
}

/// Byte ranges of a read already filled, to refuse overlaps and find gaps.
struct Coverage {
    /// start -> end, disjoint; touching ranges are merged.
    ranges: BTreeMap<u64, u64>,
    covered: u64,
}

impl Coverage {
    fn new() -> Self {
        Coverage {
            ranges: BTreeMap::new(),
            covered: 0,
        }
    }

    fn add(&mut self, start: u64, end: u64) -> Result<()> {
        let overlap = Err(ClientError::Protocol("overlapping chunks in a read reply"));
        let (mut s, mut e) = (start, end);
        if let Some((&ps, &pe)) = self.ranges.range(..=start).next_back() {
            if pe > start {
                return overlap;
            }
            if pe == start {
                self.ranges.remove(&ps);
                s = ps;
            }
        }
        if let Some((&ns, &ne)) = self.ranges.range(start..).next() {
            if ns < end {
                return overlap;
            }
            if ns == end {
                self.ranges.remove(&ns);
                e = ne;
            }
        }
        self.ranges.insert(s, e);
        self.covered += end - start;
        Ok(())
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn recv(&mut self, buf: &mut [u8]) -> Result<()> {
        recv(&mut self.stream, buf, self.timeout).await
    }

    async fn header(&mut self) -> Result<Reply> {
        let mut m = [0u8; 4];
        self.recv(&mut m).await?;
        match u32::from_be_bytes(m) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.recv(&mut h).await?;
                Ok(Reply::Simple {
                    error: be32(&h),
                    cookie: be64(&h[4..]),
                })
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                let mut h = [0u8; 16];
                self.recv(&mut h).await?;
                Ok(Reply::Chunk {
                    flags: u16::from_be_bytes([h[0], h[1]]),
                    kind: u16::from_be_bytes([h[2], h[3]]),
                    cookie: be64(&h[4..]),
                    len: be32(&h[12..]),
                })
            }
            STRUCTURED_REPLY_MAGIC => Err(ClientError::Protocol(
                "structured reply without structured replies negotiated",
            )),
            m => Err(ClientError::BadMagic(m)),
        }
    }

    /// Read an error chunk's payload (any type with the error bit); returns the error code.
    async fn error_chunk(&mut self, kind: u16, len: u32) -> Result<u32> {
        if !(6..=MAX_ERROR_CHUNK).contains(&len) {
            return Err(ClientError::Protocol("error chunk length"));
        }
        let mut p = vec![0u8; len as usize];
        self.recv(&mut p).await?;
        let code = be32(&p);
        let msg_len = u16::from_be_bytes([p[4], p[5]]) as u32;
        let tail = match kind {
            REPLY_TYPE_ERROR => Some(0),
            REPLY_TYPE_ERROR_OFFSET => Some(8),
            _ => None,
        };
        let fits = match tail {
            Some(tail) => 6 + msg_len + tail == len,
            None => 6 + msg_len <= len,
        };
        if !fits {
            return Err(ClientError::Protocol("error chunk message length"));
        }
        if code == 0 {
            return Err(ClientError::Protocol("error chunk without an error"));
        }
        let msg = String::from_utf8_lossy(&p[6..6 + msg_len as usize]);
        debug!(code, kind, message = %msg, "server error chunk");
        Ok(code)
    }

    fn check_cookie(&self, got: u64, want: u64) -> Result<()> {
        if got == want {
            Ok(())
        } else {
            Err(ClientError::UnexpectedCookie(got))
        }
    }

    /// Reply to a request that returns no data (write, flush, trim, write zeroes).
    pub(super) async fn finish_plain(&mut self, cookie: u64) -> Result<()> {
        let mut error = None;
        for _ in 0..MAX_CHUNKS {
            match self.header().await? {
                Reply::Simple {
                    error: e,
                    cookie: c,
                } => {
                    self.check_cookie(c, cookie)?;
                    return if e == 0 {
                        Ok(())
                    } else {
                        Err(ClientError::Errno(e))
                    };
                }
                Reply::Chunk {
                    flags,
                    kind,
                    cookie: c,
                    len,
                } => {
                    self.check_cookie(c, cookie)?;
                    match kind {
                        REPLY_TYPE_NONE if len == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let e = self.error_chunk(k, len).await?;
                            error.get_or_insert(e);
                        }
                        _ => return Err(ClientError::Protocol("unexpected reply chunk type")),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return error.map_or(Ok(()), |e| Err(ClientError::Errno(e)));
                    }
                }
            }
        }
        Err(ClientError::Protocol("too many reply chunks"))
    }

    /// Reply to a read of `buf.len()` bytes at `offset`, filling `buf`.
    pub(super) async fn finish_read(
        &mut self,
        cookie: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let want = buf.len() as u64;
        let mut cov = Coverage::new();
        let mut error = None;
        for _ in 0..MAX_CHUNKS {
            let (flags, kind, len) = match self.header().await? {
                Reply::Simple {
                    error: e,
                    cookie: c,
                } => {
                    self.check_cookie(c, cookie)?;
                    if e != 0 {
                        return Err(ClientError::Errno(e));
                    }
                    return self.recv(buf).await;
                }
                Reply::Chunk {
                    flags,
                    kind,
                    cookie: c,
                    len,
                } => {
                    self.check_cookie(c, cookie)?;
                    (flags, kind, len)
                }
            };
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    if len <= 8 || u64::from(len - 8) > want {
                        return Err(ClientError::Protocol("data chunk length"));
                    }
                    let mut o = [0u8; 8];
                    self.recv(&mut o).await?;
                    let (start, n) = place(be64(&o), u64::from(len - 8), offset, want)?;
                    cov.add(start, start + n)?;
                    self.recv(&mut buf[start as usize..(start + n) as usize])
                        .await?;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if len != 12 {
                        return Err(ClientError::Protocol("hole chunk length"));
                    }
                    let mut p = [0u8; 12];
                    self.recv(&mut p).await?;
                    let (start, n) = place(be64(&p), u64::from(be32(&p[8..])), offset, want)?;
                    cov.add(start, start + n)?;
                    buf[start as usize..(start + n) as usize].fill(0);
                }
                REPLY_TYPE_NONE if len == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.error_chunk(k, len).await?;
                    error.get_or_insert(e);
                }
                _ => return Err(ClientError::Protocol("unexpected reply chunk type")),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                if let Some(e) = error {
                    return Err(ClientError::Errno(e));
                }
                if cov.covered != want {
                    return Err(ClientError::Protocol(
                        "read reply does not cover the request",
                    ));
                }
                return Ok(());
            }
        }
        Err(ClientError::Protocol("too many reply chunks"))
    }

    /// Reply to `NBD_CMD_BLOCK_STATUS` for `[offset, offset+len)`.
    pub(super) async fn finish_block_status(
        &mut self,
        cookie: u64,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, Vec<Extent>)>> {
        let end = offset + u64::from(len);
        let mut out: Vec<(u32, Vec<Extent>)> = Vec::new();
        let mut error = None;
        for _ in 0..MAX_CHUNKS {
            let (flags, kind, clen) = match self.header().await? {
                Reply::Simple {
                    error: e,
                    cookie: c,
                } => {
                    self.check_cookie(c, cookie)?;
                    return Err(if e != 0 {
                        ClientError::Errno(e)
                    } else {
                        ClientError::Protocol("simple reply to BLOCK_STATUS")
                    });
                }
                Reply::Chunk {
                    flags,
                    kind,
                    cookie: c,
                    len,
                } => {
                    self.check_cookie(c, cookie)?;
                    (flags, kind, len)
                }
            };
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if clen < 12 || (clen - 4) % 8 != 0 || clen > MAX_BLOCK_STATUS_CHUNK {
                        return Err(ClientError::Protocol("block status chunk length"));
                    }
                    let mut p = vec![0u8; clen as usize];
                    self.recv(&mut p).await?;
                    let id = be32(&p);
                    if !self.contexts.iter().any(|&(_, i)| i == id) {
                        return Err(ClientError::Protocol("block status for an unknown context"));
                    }
                    if out.iter().any(|(i, _)| *i == id) {
                        return Err(ClientError::Protocol("block status for a context twice"));
                    }
                    let extents = parse_extents(&p[4..], offset, end, self.size)?;
                    out.push((id, extents));
                }
                REPLY_TYPE_NONE if clen == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                    let e = self.error_chunk(k, clen).await?;
                    error.get_or_insert(e);
                }
                _ => return Err(ClientError::Protocol("unexpected reply chunk type")),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return match error {
                    Some(e) => Err(ClientError::Errno(e)),
                    None => Ok(out),
                };
            }
        }
        Err(ClientError::Protocol("too many reply chunks"))
    }

    /// Next reply to any pipelined request (writes and flushes: no data).
    pub(super) async fn complete_one(&mut self) -> Result<Completion> {
        for _ in 0..MAX_CHUNKS {
            match self.header().await? {
                Reply::Simple { error, cookie } => {
                    let p = self
                        .inflight
                        .remove(&cookie)
                        .ok_or(ClientError::UnexpectedCookie(cookie))?;
                    if error != 0 {
                        return Err(ClientError::Errno(error));
                    }
                    return Ok(Completion {
                        cookie,
                        latency: p.start.elapsed(),
                    });
                }
                Reply::Chunk {
                    flags,
                    kind,
                    cookie,
                    len,
                } => {
                    if !self.inflight.contains_key(&cookie) {
                        return Err(ClientError::UnexpectedCookie(cookie));
                    }
                    match kind {
                        REPLY_TYPE_NONE if len == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                        k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                            let e = self.error_chunk(k, len).await?;
                            if let Some(p) = self.inflight.get_mut(&cookie) {
                                p.error.get_or_insert(e);
                            }
                        }
                        _ => return Err(ClientError::Protocol("unexpected reply chunk type")),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        let p = self
                            .inflight
                            .remove(&cookie)
                            .ok_or(ClientError::UnexpectedCookie(cookie))?;
                        if let Some(e) = p.error {
                            return Err(ClientError::Errno(e));
                        }
                        return Ok(Completion {
                            cookie,
                            latency: p.start.elapsed(),
                        });
                    }
                }
            }
        }
        Err(ClientError::Protocol("too many reply chunks"))
    }
}

/// Where a chunk for `[chunk_off, chunk_off+n)` lands in a read of `want` bytes at `offset`:
/// (start inside the buffer, length). Empty or outside the request is an error.
fn place(chunk_off: u64, n: u64, offset: u64, want: u64) -> Result<(u64, u64)> {
    let start = chunk_off
        .checked_sub(offset)
        .ok_or(ClientError::Protocol("chunk before the requested range"))?;
    if n == 0 {
        return Err(ClientError::Protocol("empty chunk"));
    }
    if start >= want || n > want - start {
        return Err(ClientError::Protocol("chunk past the requested range"));
    }
    Ok((start, n))
}

/// Parse `(length, flags)` descriptors starting at `offset` for a request ending at `end` on
/// an export of `size` bytes. The last extent may reach past `end` (the protocol allows it) and
/// is clipped; an extent starting at or after `end`, past the export, or empty is an error.
fn parse_extents(p: &[u8], offset: u64, end: u64, size: u64) -> Result<Vec<Extent>> {
    let mut out = Vec::with_capacity(p.len() / 8);
    let mut pos = offset;
    for d in p.chunks_exact(8) {
        let (len, flags) = (u64::from(be32(d)), be32(&d[4..]));
        if len == 0 {
            return Err(ClientError::Protocol("zero-length extent"));
        }
        if pos >= end {
            return Err(ClientError::Protocol("extent past the requested range"));
        }
        if pos + len > size {
            return Err(ClientError::Protocol("extent past the end of the export"));
        }
        out.push(Extent {
            offset: pos,
            len: len.min(end - pos),
            flags,
        });
        pos += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_merges_and_refuses_overlap() {
        let mut c = Coverage::new();
        c.add(10, 20).unwrap();
        c.add(0, 10).unwrap();
        c.add(30, 40).unwrap();
        assert!(c.add(15, 16).is_err());
        assert!(c.add(19, 31).is_err());
        c.add(20, 30).unwrap();
        assert_eq!(c.ranges.len(), 1);
        assert_eq!(c.covered, 40);
    }

    #[test]
    fn chunk_placement() {
        assert_eq!(place(100, 10, 100, 10).unwrap(), (0, 10));
        assert!(place(99, 1, 100, 10).is_err());
        assert!(place(105, 6, 100, 10).is_err());
        assert!(place(u64::MAX, u64::MAX, 100, 10).is_err());
        assert!(place(100, 0, 100, 10).is_err());
    }

    #[test]
    fn extents_are_checked() {
        let d = |v: &[(u32, u32)]| {
            v.iter()
                .flat_map(|&(l, f)| [l.to_be_bytes(), f.to_be_bytes()].concat())
                .collect::<Vec<u8>>()
        };
        let e = parse_extents(&d(&[(10, 1), (100, 0)]), 0, 50, 1000).unwrap();
        assert_eq!(
            e[1],
            Extent {
                offset: 10,
                len: 40,
                flags: 0
            }
        );
        assert!(parse_extents(&d(&[(50, 1), (1, 0)]), 0, 50, 1000).is_err());
        assert!(parse_extents(&d(&[(0, 1)]), 0, 50, 1000).is_err());
        assert!(parse_extents(&d(&[(2000, 1)]), 0, 50, 1000).is_err());
    }
}
