//! The transmission phase: requests in, replies out.
//!
//! Why it is strictly sequential: the process server journals writes in the order they hit the
//! wire, and that order is what makes every recovery point crash-consistent. So each request is
//! read, handed to the [`Export`], *awaited*, and answered before the next request is even
//! parsed. QEMU keeps several requests in flight; they simply queue in the socket buffer.
//!
//! Why it is defensive: the client is untrusted. The 28-byte header is fixed-size; the only
//! length that drives an allocation is a WRITE payload or a READ reply, both capped at
//! [`MAX_PAYLOAD`]. A request that is merely wrong (out of range, unknown command, bad flags) gets
//! an error reply and the connection lives on; a WRITE whose payload exceeds the cap cannot be
//! answered without reading gigabytes, so the connection is closed instead.
//!
//! How replies are shaped: simple replies unless structured replies were negotiated, in which
//! case READ answers with a single `OFFSET_DATA` chunk (or `OFFSET_HOLE` when the data is all
//! zeroes) and BLOCK_STATUS with a `BLOCK_STATUS` chunk; errors for those two are `ERROR`
//! chunks. Writes are batched in a buffer and flushed whenever no further request is already
//! waiting in the read buffer.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tracing::{debug, trace};

use crate::error::NbdError;
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::{Errno, Export};

/// Upper bound on block-status descriptors in one reply (1 MiB of descriptors).
const MAX_EXTENTS: usize = 128 * 1024;
const BUF_SIZE: usize = 256 * 1024;

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Serve requests until the client disconnects (DISC or EOF).
pub(crate) async fn transmit<S>(stream: S, neg: Negotiated) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut conn = Conn {
        rd: BufReader::with_capacity(BUF_SIZE, rd),
        wr: BufWriter::with_capacity(BUF_SIZE, wr),
        export: neg.export.clone(),
        neg,
    };
    debug!(export = %conn.neg.name, flags = conn.neg.flags, structured = conn.neg.structured,
        base_allocation = conn.neg.base_allocation, "transmission phase");
    let result = conn.run().await;
    // Best effort: flush what we have and close our side (TLS close_notify, TCP FIN).
    let _ = conn.wr.flush().await;
    let _ = conn.wr.shutdown().await;
    result
}

struct Conn<R, W> {
    rd: BufReader<R>,
    wr: BufWriter<W>,
    export: Arc<dyn Export>,
    neg: Negotiated,
}

fn out_of_range(offset: u64, len: u32, size: u64) -> bool {
    !matches!(offset.checked_add(u64::from(len)), Some(end) if end <= size)
}

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(&mut self) -> Result<(), NbdError> {
        loop {
            let mut hdr = [0u8; 28];
            // A clean EOF between requests is a client that went away without DISC.
            match self.rd.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            let be32 = |i: usize| u32::from_be_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
            let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
            let magic = be32(0);
            if magic != REQUEST_MAGIC {
                return Err(NbdError::BadMagic(magic.into()));
            }
            let req = Request {
                flags: u16::from_be_bytes([hdr[4], hdr[5]]),
                kind: u16::from_be_bytes([hdr[6], hdr[7]]),
                cookie: be64(8),
                offset: be64(16),
                len: be32(24),
            };
            trace!(
                kind = req.kind,
                flags = req.flags,
                offset = req.offset,
                len = req.len,
                "request"
            );
            if req.kind == CMD_DISC {
                debug!(export = %self.neg.name, "client disconnect request");
                return Ok(());
            }
            self.handle(&req).await?;
            if self.rd.buffer().is_empty() {
                self.wr.flush().await?;
            }
        }
    }

    async fn handle(&mut self, req: &Request) -> Result<(), NbdError> {
        let size = self.export.size();
        let read_only = self.export.read_only();
        let fua = req.flags & CMD_FLAG_FUA != 0;
        match req.kind {
            CMD_READ => {
                let mut allowed = CMD_FLAG_FUA;
                if self.neg.structured {
                    allowed |= CMD_FLAG_DF;
                }
                let result = if req.flags & !allowed != 0
                    || req.len == 0
                    || req.len > MAX_PAYLOAD
                    || out_of_range(req.offset, req.len, size)
                {
                    Err(Errno::Inval)
                } else {
                    match self.export.read(req.offset, req.len).await {
                        Ok(data) if data.len() == req.len as usize => Ok(data),
                        Ok(data) => {
                            tracing::warn!(
                                want = req.len,
                                got = data.len(),
                                "export returned short read"
                            );
                            Err(Errno::Io)
                        }
                        Err(e) => Err(e),
                    }
                };
                self.read_reply(req, result).await
            }
            CMD_WRITE => {
                if req.len > MAX_PAYLOAD {
                    return Err(NbdError::PayloadTooLarge(req.len.into()));
                }
                let mut data = vec![0u8; req.len as usize];
                self.rd.read_exact(&mut data).await?;
                let result = if req.flags & !CMD_FLAG_FUA != 0 || req.len == 0 {
                    Err(Errno::Inval)
                } else if read_only {
                    Err(Errno::Perm)
                } else if out_of_range(req.offset, req.len, size) {
                    Err(Errno::NoSpc)
                } else {
                    self.export.write(req.offset, data, fua).await
                };
                self.simple_reply(req, result).await
            }
            CMD_FLUSH => {
                let result = if req.flags & !CMD_FLAG_FUA != 0 {
                    Err(Errno::Inval)
                } else {
                    self.export.flush().await
                };
                self.simple_reply(req, result).await
            }
            CMD_TRIM => {
                let result = if req.flags & !CMD_FLAG_FUA != 0 || req.len == 0 {
                    Err(Errno::Inval)
                } else if read_only {
                    Err(Errno::Perm)
                } else if out_of_range(req.offset, req.len, size) {
                    Err(Errno::Inval)
                } else {
                    self.export.trim(req.offset, req.len, fua).await
                };
                self.simple_reply(req, result).await
            }
            CMD_WRITE_ZEROES => {
                let result = if req.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE) != 0 || req.len == 0
                {
                    Err(Errno::Inval)
                } else if read_only {
                    Err(Errno::Perm)
                } else if out_of_range(req.offset, req.len, size) {
                    Err(Errno::NoSpc)
                } else {
                    self.export.write_zeroes(req.offset, req.len, fua).await
                };
                self.simple_reply(req, result).await
            }
            CMD_BLOCK_STATUS => {
                let result = if !self.neg.base_allocation
                    || req.flags & !(CMD_FLAG_FUA | CMD_FLAG_REQ_ONE) != 0
                    || req.len == 0
                    || out_of_range(req.offset, req.len, size)
                {
                    Err(Errno::Inval)
                } else {
                    self.export
                        .block_status(req.offset, req.len)
                        .await
                        .and_then(|ext| {
                            sanitize_extents(ext, req.len, req.flags & CMD_FLAG_REQ_ONE != 0)
                        })
                };
                self.block_status_reply(req, result).await
            }
            _ => {
                debug!(kind = req.kind, "unknown command");
                if self.neg.structured {
                    self.error_chunk(req, Errno::Inval).await
                } else {
                    self.simple_reply(req, Err(Errno::Inval)).await
                }
            }
        }
    }

    async fn simple_reply(
        &mut self,
        req: &Request,
        result: Result<(), Errno>,
    ) -> Result<(), NbdError> {
        let err = match result {
            Ok(()) => 0,
            Err(e) => {
                debug!(kind = req.kind, offset = req.offset, len = req.len, error = ?e, "request failed");
                e.code()
            }
        };
        let mut buf = [0u8; 16];
        buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        buf[4..8].copy_from_slice(&err.to_be_bytes());
        buf[8..16].copy_from_slice(&req.cookie.to_be_bytes());
        self.wr.write_all(&buf).await?;
        Ok(())
    }

    async fn chunk_header(
        &mut self,
        req: &Request,
        flags: u16,
        kind: u16,
        len: u32,
    ) -> Result<(), NbdError> {
        let mut buf = [0u8; 20];
        buf[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        buf[4..6].copy_from_slice(&flags.to_be_bytes());
        buf[6..8].copy_from_slice(&kind.to_be_bytes());
        buf[8..16].copy_from_slice(&req.cookie.to_be_bytes());
        buf[16..20].copy_from_slice(&len.to_be_bytes());
        self.wr.write_all(&buf).await?;
        Ok(())
    }

    async fn error_chunk(&mut self, req: &Request, e: Errno) -> Result<(), NbdError> {
        debug!(kind = req.kind, offset = req.offset, len = req.len, error = ?e, "request failed");
        self.chunk_header(req, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6)
            .await?;
        let mut buf = [0u8; 6];
        buf[0..4].copy_from_slice(&e.code().to_be_bytes());
        // buf[4..6]: empty message
        self.wr.write_all(&buf).await?;
        Ok(())
    }

    async fn read_reply(
        &mut self,
        req: &Request,
        result: Result<Vec<u8>, Errno>,
    ) -> Result<(), NbdError> {
        match (self.neg.structured, result) {
            (false, Ok(data)) => {
                self.simple_reply(req, Ok(())).await?;
                self.wr.write_all(&data).await?;
            }
            (false, Err(e)) => self.simple_reply(req, Err(e)).await?,
            (true, Ok(data)) => {
                if data.iter().all(|&b| b == 0) {
                    self.chunk_header(req, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 12)
                        .await?;
                    self.wr.write_all(&req.offset.to_be_bytes()).await?;
                    self.wr.write_all(&req.len.to_be_bytes()).await?;
                } else {
                    self.chunk_header(req, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, req.len + 8)
                        .await?;
                    self.wr.write_all(&req.offset.to_be_bytes()).await?;
                    self.wr.write_all(&data).await?;
                }
            }
            (true, Err(e)) => self.error_chunk(req, e).await?,
        }
        Ok(())
    }

    async fn block_status_reply(
        &mut self,
        req: &Request,
        result: Result<Vec<(u32, u32)>, Errno>,
    ) -> Result<(), NbdError> {
        let extents = match result {
            Ok(x) => x,
            Err(e) if self.neg.structured => return self.error_chunk(req, e).await,
            Err(e) => return self.simple_reply(req, Err(e)).await,
        };
        let mut buf = Vec::with_capacity(4 + 8 * extents.len());
        buf.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (len, flags) in extents {
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(&flags.to_be_bytes());
        }
        // Bounded by MAX_EXTENTS, so the length fits in u32.
        self.chunk_header(
            req,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            buf.len() as u32,
        )
        .await?;
        self.wr.write_all(&buf).await?;
        Ok(())
    }
}

/// Make an export's extent list safe to send: no zero-length extents, nothing past the request,
/// only known flags, a bounded count, and at least one extent.
fn sanitize_extents(
    ext: Vec<(u32, u32)>,
    len: u32,
    req_one: bool,
) -> Result<Vec<(u32, u32)>, Errno> {
    let limit = if req_one { 1 } else { MAX_EXTENTS };
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(ext.len().min(limit));
    let mut remaining = len;
    for (l, f) in ext {
        if remaining == 0 || out.len() == limit {
            break;
        }
        if l == 0 {
            continue;
        }
        let l = l.min(remaining);
        let f = f & (STATE_HOLE | STATE_ZERO);
        remaining -= l;
        match out.last_mut() {
            Some(last) if last.1 == f => last.0 += l,
            _ => out.push((l, f)),
        }
    }
    if out.is_empty() {
        return Err(Errno::Io);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_clamped_and_merged() {
        let e = sanitize_extents(vec![(0, 0), (10, 0), (10, 0), (100, 3 | 8)], 50, false).unwrap();
        assert_eq!(e, vec![(20, 0), (30, 3)]);
        let e = sanitize_extents(vec![(10, 1), (10, 0)], 50, true).unwrap();
        assert_eq!(e, vec![(10, 1)]);
        assert_eq!(sanitize_extents(vec![], 50, false), Err(Errno::Io));
        assert_eq!(sanitize_extents(vec![(0, 0)], 50, false), Err(Errno::Io));
    }

    #[test]
    fn range_checks() {
        assert!(!out_of_range(0, 10, 10));
        assert!(out_of_range(1, 10, 10));
        assert!(out_of_range(u64::MAX, 1, u64::MAX));
        assert!(out_of_range(11, 0, 10));
    }
}
