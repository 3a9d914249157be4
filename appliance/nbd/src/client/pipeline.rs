//! Pipelined writes: up to a queue depth of `NBD_CMD_WRITE`/`NBD_CMD_FLUSH` requests in
//! flight, completed in whatever order the server answers (qemu-nbd answers in parallel).
//! The benchmarks measure per-request latency with [`Completion::latency`].

use super::{end_of, Client, ClientError, Completion, Pending, Result};
use crate::proto::*;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Send a write without waiting for its reply; returns its cookie. Payloads larger than
    /// [`Client::max_request`] are refused ([`ClientError::Usage`]).
    pub async fn submit_write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<u64> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        if data.is_empty() || data.len() > self.max_request as usize {
            return Err(ClientError::Usage("pipelined write size"));
        }
        end_of(offset, data.len())?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let start = Instant::now();
        let r = self
            .request(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await;
        let c = self.note(r)?;
        self.inflight.insert(c, Pending { start, error: None });
        Ok(c)
    }

    /// Send a flush without waiting for its reply (it covers writes already completed).
    pub async fn submit_flush(&mut self) -> Result<u64> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        let start = Instant::now();
        let r = self.request(CMD_FLUSH, 0, 0, 0, &[]).await;
        let c = self.note(r)?;
        self.inflight.insert(c, Pending { start, error: None });
        Ok(c)
    }

    /// Wait for the next reply to a pipelined request (replies may come in any order). A
    /// server error for that request is [`ClientError::Errno`] (the request is then done).
    pub async fn complete(&mut self) -> Result<Completion> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        if self.inflight.is_empty() {
            return Err(ClientError::Usage("no request in flight"));
        }
        let r = self.complete_one().await;
        self.note(r)
    }

    /// Queue a write, first completing replies until fewer than `depth` requests are in
    /// flight; data larger than [`Client::max_request`] becomes several requests. Returns the
    /// completions it reaped.
    pub async fn write_pipelined(
        &mut self,
        offset: u64,
        data: &[u8],
        fua: bool,
        depth: usize,
    ) -> Result<Vec<Completion>> {
        end_of(offset, data.len())?;
        let mut done = Vec::new();
        let mut pos = offset;
        for piece in data.chunks(self.max_request as usize) {
            while self.inflight.len() >= depth.max(1) {
                done.push(self.complete().await?);
            }
            self.submit_write(pos, piece, fua).await?;
            pos += piece.len() as u64;
        }
        Ok(done)
    }

    /// Complete every pipelined request still in flight.
    pub async fn drain(&mut self) -> Result<Vec<Completion>> {
        let mut done = Vec::with_capacity(self.inflight.len());
        while !self.inflight.is_empty() {
            done.push(self.complete().await?);
        }
        Ok(done)
    }
}
