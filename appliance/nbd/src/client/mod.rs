//! An asynchronous NBD client for servers Ferry does not control (QEMU's NBD exports,
//! `qemu-nbd`, qemu-storage-daemon) and for our own server.
//!
//! Why: periodic replication reads the blocks a QEMU dirty bitmap marks as changed, so the
//! client needs structured replies (sparse reads), metadata contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`) and `NBD_CMD_BLOCK_STATUS`. The end-to-end tests also drive a
//! guest's writes with it, and the benchmarks pipeline writes through it.
//!
//! How: [`Client::handshake_with`] runs the fixed-newstyle handshake (`handshake` module):
//! optional STARTTLS, `OPT_STRUCTURED_REPLY`, `OPT_SET_META_CONTEXT`, then `OPT_GO` asking for
//! `NBD_INFO_BLOCK_SIZE`. In transmission, requests are sent one at a time and their replies
//! (simple or structured, `reply` module) are checked against the request, except for the
//! pipelined write API ([`Client::submit_write`], [`Client::complete`],
//! [`Client::write_pipelined`]) which keeps up to a queue depth of writes in flight.
//!
//! The server is untrusted: every length is bounded before anything is allocated, replies must
//! carry the right magic and cookie and stay inside the request, and every read and write on the
//! socket has a timeout ([`ClientOptions::timeout`], 30 s by default). Any such failure is a
//! [`ClientError`]; after one (other than a server's error answer, [`ClientError::Errno`]) the
//! connection is out of step with the server and every later call fails with
//! [`ClientError::Broken`].

mod handshake;
mod pipeline;
mod reply;

use crate::proto::*;
use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Default for [`ClientOptions::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest range one [`Client::block_status_all`] request asks about.
pub const BLOCK_STATUS_STEP: u32 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("server is not an NBD fixed-newstyle server")]
    NotNbd,
    #[error("server refused option {option}: reply type {reply:#x}")]
    Refused { option: u32, reply: u32 },
    #[error("server reply is malformed: {0}")]
    Protocol(&'static str),
    #[error("server answered the request with error {0}")]
    Errno(u32),
    #[error("server reply has bad magic {0:#x}")]
    BadMagic(u32),
    #[error("server replied to unknown cookie {0}")]
    UnexpectedCookie(u64),
    #[error("server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("server closed the connection")]
    Closed,
    #[error("connection unusable after an earlier error")]
    Broken,
    #[error("invalid use of the client: {0}")]
    Usage(&'static str),
}

impl ClientError {
    /// Errors after which the connection is no longer in step with the server.
    fn is_fatal(&self) -> bool {
        !matches!(self, ClientError::Errno(_) | ClientError::Usage(_))
    }
}

type Result<T> = std::result::Result<T, ClientError>;

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Export name for `OPT_GO`.
    pub export: String,
    /// Ask for structured replies (sparse reads, block status). A server that refuses leaves
    /// the client on simple replies with no metadata contexts; see [`Client::structured`].
    pub structured: bool,
    /// Metadata contexts for `OPT_SET_META_CONTEXT` (needs structured replies), e.g.
    /// `base:allocation` or `qemu:dirty-bitmap:NAME`.
    pub meta_contexts: Vec<String>,
    /// Limit for every socket read or write, and for the whole handshake.
    pub timeout: Duration,
}

impl ClientOptions {
    /// Structured replies, no metadata contexts, [`DEFAULT_TIMEOUT`].
    pub fn new(export: impl Into<String>) -> Self {
        ClientOptions {
            export: export.into(),
            structured: true,
            meta_contexts: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Add a metadata context to negotiate.
    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        self.meta_contexts.push(name.into());
        self
    }

    /// Set the timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions::new("")
    }
}

/// One block status extent: `[offset, offset+len)` has `flags` (for `base:allocation`:
/// [`STATE_HOLE`], [`STATE_ZERO`]; for `qemu:dirty-bitmap:*`: [`STATE_DIRTY`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A pipelined request the server has answered successfully.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub cookie: u64,
    /// From just before the request was sent to its reply.
    pub latency: Duration,
}

/// A pipelined request still waiting for its reply.
#[derive(Debug)]
struct Pending {
    start: Instant,
    /// First error chunk seen for it (structured replies only).
    error: Option<u32>,
}

pub struct Client<S> {
    stream: S,
    size: u64,
    flags: u16,
    structured: bool,
    contexts: Vec<(String, u32)>,
    max_request: u32,
    timeout: Duration,
    cookie: u64,
    inflight: HashMap<u64, Pending>,
    broken: bool,
}

impl<S> std::fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("structured", &self.structured)
            .field("contexts", &self.contexts)
            .field("max_request", &self.max_request)
            .field("in_flight", &self.inflight.len())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

/// Options the pre-existing `connect_*`/`handshake` helpers use: simple replies only.
fn legacy(export: &str) -> ClientOptions {
    ClientOptions {
        structured: false,
        ..ClientOptions::new(export)
    }
}

async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, f).await {
        Err(_) => Err(ClientError::Timeout(timeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(ClientError::Closed),
        Ok(Err(e)) => Err(ClientError::Io(e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Read exactly `buf.len()` bytes within `timeout`.
async fn recv<S: AsyncRead + Unpin>(s: &mut S, buf: &mut [u8], timeout: Duration) -> Result<()> {
    bounded(timeout, s.read_exact(buf)).await.map(|_| ())
}

/// Write every part and flush, within `timeout`.
async fn send<S: AsyncWrite + Unpin>(s: &mut S, parts: &[&[u8]], timeout: Duration) -> Result<()> {
    bounded(timeout, async {
        for p in parts {
            s.write_all(p).await?;
        }
        s.flush().await
    })
    .await
}

impl Client<tokio::net::TcpStream> {
    pub async fn connect_tcp(addr: &str, export: &str) -> Result<Self> {
        Self::connect_tcp_with(addr, legacy(export)).await
    }

    pub async fn connect_tcp_with(addr: &str, opts: ClientOptions) -> Result<Self> {
        let s = bounded(opts.timeout, tokio::net::TcpStream::connect(addr)).await?;
        s.set_nodelay(true)?;
        Client::handshake_with(s, opts).await
    }
}

impl Client<tokio::net::UnixStream> {
    pub async fn connect_unix(path: &std::path::Path, export: &str) -> Result<Self> {
        Self::connect_unix_with(path, legacy(export)).await
    }

    pub async fn connect_unix_with(path: &std::path::Path, opts: ClientOptions) -> Result<Self> {
        let s = bounded(opts.timeout, tokio::net::UnixStream::connect(path)).await?;
        Client::handshake_with(s, opts).await
    }
}

impl Client<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    /// Connect over TCP and upgrade with `NBD_OPT_STARTTLS` before negotiating.
    pub async fn connect_tcp_tls(
        addr: &str,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
        opts: ClientOptions,
    ) -> Result<Self> {
        let s = bounded(opts.timeout, tokio::net::TcpStream::connect(addr)).await?;
        s.set_nodelay(true)?;
        Client::handshake_tls(s, config, server_name, opts).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<tokio_rustls::client::TlsStream<S>> {
    /// Handshake on `stream`, upgrading to TLS with STARTTLS first; a server that refuses
    /// STARTTLS is an error ([`ClientError::Refused`]), never a silent plaintext fallback.
    pub async fn handshake_tls(
        mut stream: S,
        config: Arc<rustls::ClientConfig>,
        server_name: rustls::pki_types::ServerName<'static>,
        opts: ClientOptions,
    ) -> Result<Self> {
        let t = opts.timeout;
        let tls = tokio::time::timeout(t, async {
            handshake::greet(&mut stream, t).await?;
            handshake::starttls(&mut stream, t).await?;
            let connector = tokio_rustls::TlsConnector::from(config);
            Ok::<_, ClientError>(connector.connect(server_name, stream).await?)
        })
        .await
        .map_err(|_| ClientError::Timeout(t))??;
        Client::negotiate(tls, opts).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// Negotiate `export` with `OPT_GO`, simple replies only (the original client behaviour).
    pub async fn handshake(stream: S, export: &str) -> Result<Self> {
        Self::handshake_with(stream, legacy(export)).await
    }

    /// Run the handshake on an open stream with `opts`.
    pub async fn handshake_with(mut stream: S, opts: ClientOptions) -> Result<Self> {
        let t = opts.timeout;
        tokio::time::timeout(t, handshake::greet(&mut stream, t))
            .await
            .map_err(|_| ClientError::Timeout(t))??;
        Client::negotiate(stream, opts).await
    }

    async fn negotiate(mut stream: S, opts: ClientOptions) -> Result<Self> {
        let t = opts.timeout;
        let n = tokio::time::timeout(t, handshake::negotiate(&mut stream, &opts))
            .await
            .map_err(|_| ClientError::Timeout(t))??;
        Ok(Client {
            stream,
            size: n.size,
            flags: n.flags,
            structured: n.structured,
            contexts: n.contexts,
            max_request: n.max_request,
            timeout: t,
            cookie: 0,
            inflight: HashMap::new(),
            broken: false,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The id the server gave metadata context `name`, if it accepted it.
    pub fn meta_context_id(&self, name: &str) -> Option<u32> {
        self.contexts
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, id)| id)
    }

    /// Every negotiated metadata context with its id.
    pub fn meta_contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// Largest payload sent or asked for in one request: the server's maximum block size,
    /// capped at 32 MiB. Larger reads and writes are split.
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Number of pipelined requests without a reply yet.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Record a fatal error so later calls fail fast instead of misreading the stream.
    fn note<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if e.is_fatal() {
                self.broken = true;
            }
        }
        r
    }

    /// Before a one-at-a-time request: refuse on a broken connection, finish pipelined ones.
    async fn ready(&mut self) -> Result<()> {
        if self.broken {
            return Err(ClientError::Broken);
        }
        while !self.inflight.is_empty() {
            self.complete().await?;
        }
        Ok(())
    }

    async fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64> {
        self.cookie += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        if data.len() <= 64 * 1024 {
            // One segment for small writes: header and payload in one packet.
            let mut buf = Vec::with_capacity(28 + data.len());
            buf.extend_from_slice(&h);
            buf.extend_from_slice(data);
            send(&mut self.stream, &[&buf], self.timeout).await?;
        } else {
            send(&mut self.stream, &[&h, data], self.timeout).await?;
        }
        Ok(self.cookie)
    }

    /// A request whose reply carries no data.
    async fn plain(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<()> {
        self.ready().await?;
        let r = async {
            let c = self.request(cmd, flags, offset, len, data).await?;
            self.finish_plain(c).await
        }
        .await;
        self.note(r)
    }

    /// Write `data` at `offset` (split into requests of at most [`Client::max_request`]).
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        end_of(offset, data.len())?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let mut pos = offset;
        for piece in data.chunks(self.max_request as usize) {
            self.plain(CMD_WRITE, flags, pos, piece.len() as u32, piece)
                .await?;
            pos += piece.len() as u64;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.plain(CMD_FLUSH, 0, 0, 0, &[]).await
    }

    pub async fn write_zeroes(&mut self, offset: u64, len: u32) -> Result<()> {
        self.plain(CMD_WRITE_ZEROES, 0, offset, len, &[]).await
    }

    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        self.plain(CMD_TRIM, 0, offset, len, &[]).await
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        end_of(offset, len as usize)?;
        let mut buf = vec![0u8; len as usize];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Fill `buf` from `offset`, in requests of at most [`Client::max_request`] bytes. Holes
    /// the server reports (`OFFSET_HOLE`) are written as zeroes.
    pub async fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        end_of(offset, buf.len())?;
        let mut pos = offset;
        for piece in buf.chunks_mut(self.max_request as usize) {
            self.ready().await?;
            let r = async {
                let c = self
                    .request(CMD_READ, 0, pos, piece.len() as u32, &[])
                    .await?;
                self.finish_read(c, pos, piece).await
            }
            .await;
            self.note(r)?;
            pos += piece.len() as u64;
        }
        Ok(())
    }

    /// `NBD_CMD_BLOCK_STATUS` for `[offset, offset+len)`: the extents of context `context_id`,
    /// in order from `offset`. They may cover less than `len` (servers answer a prefix) but
    /// never more; replies for other negotiated contexts are checked and dropped.
    pub async fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        context_id: u32,
    ) -> Result<Vec<Extent>> {
        if !self.contexts.iter().any(|&(_, id)| id == context_id) {
            return Err(ClientError::Usage("metadata context was not negotiated"));
        }
        let all = self.block_status_contexts(offset, len).await?;
        let r = all
            .into_iter()
            .find(|(id, _)| *id == context_id)
            .map(|(_, e)| e)
            .ok_or(ClientError::Protocol(
                "no block status for the requested context",
            ));
        self.note(r)
    }

    /// `NBD_CMD_BLOCK_STATUS` for every negotiated context: `(context id, extents)` per chunk
    /// the server sent.
    pub async fn block_status_contexts(
        &mut self,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, Vec<Extent>)>> {
        if !self.structured || self.contexts.is_empty() {
            return Err(ClientError::Usage("no metadata context negotiated"));
        }
        if len == 0 {
            return Err(ClientError::Usage("zero-length block status"));
        }
        end_of(offset, len as usize)?;
        self.ready().await?;
        let r = async {
            let c = self.request(CMD_BLOCK_STATUS, 0, offset, len, &[]).await?;
            self.finish_block_status(c, offset, len).await
        }
        .await;
        self.note(r)
    }

    /// Block status of context `context_id` over the whole export, in requests of at most
    /// [`BLOCK_STATUS_STEP`] bytes; neighbouring extents with equal flags are merged.
    pub async fn block_status_all(&mut self, context_id: u32) -> Result<Vec<Extent>> {
        let size = self.size;
        self.block_status_range(context_id, 0, size).await
    }

    /// Block status of context `context_id` over `[offset, offset + len)` (clipped to the
    /// export), in requests of at most [`BLOCK_STATUS_STEP`] bytes; neighbouring extents with
    /// equal flags are merged and the last one ends at the range's end. A caller that walks a
    /// large disk window by window holds one window's extents at a time.
    pub async fn block_status_range(
        &mut self,
        context_id: u32,
        offset: u64,
        len: u64,
    ) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let step = (end - pos).min(BLOCK_STATUS_STEP as u64) as u32;
            let ext = self.block_status(pos, step, context_id).await?;
            for mut e in ext {
                if e.offset >= end {
                    break;
                }
                e.len = e.len.min(end - e.offset);
                match out.last_mut() {
                    Some(last) if last.flags == e.flags && last.end() == e.offset => {
                        last.len += e.len
                    }
                    _ => out.push(e),
                }
            }
            // Non-empty and starting at `pos`: the reply checks guarantee progress.
            pos = out.last().map_or(pos, Extent::end);
        }
        Ok(out)
    }

    /// Complete pipelined requests, then say goodbye (`NBD_CMD_DISC`); the server closes
    /// without a reply.
    pub async fn disconnect(mut self) -> Result<()> {
        self.ready().await?;
        self.request(CMD_DISC, 0, 0, 0, &[]).await?;
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
        Ok(())
    }
}

/// `offset + len`, refusing ranges past the 64-bit offset space.
fn end_of(offset: u64, len: usize) -> Result<u64> {
    offset
        .checked_add(len as u64)
        .ok_or(ClientError::Usage("range past the end of the offset space"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MemExport, ServerConfig};
    use std::collections::HashMap;
    use std::sync::Arc;

    #[tokio::test]
    async fn client_talks_to_our_server() {
        let mem = Arc::new(MemExport::new(1 << 20));
        let mut exports: HashMap<String, Arc<dyn crate::Export>> = HashMap::new();
        exports.insert("m".into(), mem.clone());
        let cfg = Arc::new(ServerConfig {
            exports,
            tls: None,
            require_tls: false,
        });
        let (a, b) = tokio::io::duplex(1 << 20);
        tokio::spawn(crate::serve_connection(a, cfg));
        let mut c = Client::handshake(b, "m").await.unwrap();
        assert_eq!(c.size(), 1 << 20);
        c.write(4096, &[7; 5000], false).await.unwrap();
        c.write(100, &[1; 3], true).await.unwrap();
        c.flush().await.unwrap();
        c.write_zeroes(4096, 1000).await.unwrap();
        assert_eq!(
            c.read(4096, 5000).await.unwrap()[..1001],
            [[0u8; 1000].as_slice(), &[7]].concat()
        );
        assert!(matches!(
            c.write((1 << 20) - 1, &[1, 2], false).await,
            Err(ClientError::Errno(_))
        ));
        assert_eq!(c.read(100, 3).await.unwrap(), vec![1; 3]);
        c.disconnect().await.unwrap();
        assert_eq!(mem.contents()[100..103], [1, 1, 1]);
    }
}
