//! `ferry-nbd`: an asynchronous NBD server library.
//!
//! Why it exists: Ferry's process server captures guest writes by being the *target* of a
//! QEMU `blockdev-mirror` job (`copy-mode=write-blocking`), and the master target serves recovery
//! points to QEMU over NBD. Both need an NBD server that QEMU accepts, that keeps write order,
//! that answers FLUSH/FUA only when the backing store says the data is durable, and that treats
//! everything arriving from the network as untrusted.
//!
//! How it is used: implement [`Export`] for a backing store, put exports in a [`ServerConfig`],
//! and hand accepted connections to [`serve_connection`] (or let [`serve_tcp`] /
//! [`serve_unix`] run the accept loop). Each connection negotiates with the fixed-newstyle
//! handshake (`handshake` module), optionally upgrades to TLS via
//! STARTTLS ([`tls`]), then serves requests strictly one at a time in arrival order
//! (`transmission` module). [`MemExport`] is an in-memory export for tests.
//!
//! [`client`] is the other side: an NBD client with structured replies, metadata contexts and
//! block status (for reading QEMU dirty bitmaps) that treats the server as untrusted.
//!
//! Not implemented on purpose: `NBD_FLAG_CAN_MULTI_CONN` (one connection per writer keeps the
//! order story simple), extended headers, `NBD_CMD_CACHE`, resize and fast-zero.

pub mod client;
mod error;
mod handshake;
mod mem;
pub mod proto;
pub mod tls;
mod transmission;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

pub use error::NbdError;
pub use mem::MemExport;

use handshake::Outcome;

/// How long a client may take from connecting to choosing an export (TLS handshake included).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Error answers an export can give; each maps to an NBD error code on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Errno {
    Perm,
    Io,
    NoMem,
    Inval,
    NoSpc,
    Overflow,
    NotSup,
    Shutdown,
}

impl Errno {
    /// The NBD error code sent on the wire.
    pub fn code(self) -> u32 {
        use proto::*;
        match self {
            Errno::Perm => EPERM,
            Errno::Io => EIO,
            Errno::NoMem => ENOMEM,
            Errno::Inval => EINVAL,
            Errno::NoSpc => ENOSPC,
            Errno::Overflow => EOVERFLOW,
            Errno::NotSup => ENOTSUP,
            Errno::Shutdown => ESHUTDOWN,
        }
    }
}

/// Result of an export operation.
pub type NbdResult<T> = Result<T, Errno>;

/// A block device served over NBD.
///
/// The server has already checked that every range lies inside `[0, size())`, that writes do
/// not target a read-only export, and that lengths are non-zero; reads and writes are at most
/// [`proto::MAX_PAYLOAD`] bytes. Calls on one connection are made one at a time, in the order
/// the requests arrived. `flush` and `fua` writes must only return once the data is durable.
#[async_trait::async_trait]
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether the export refuses modifications (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool {
        false
    }
    /// Read exactly `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: u32) -> NbdResult<Vec<u8>>;
    /// Write `data` at `offset`; with `fua`, only return once it is durable.
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> NbdResult<()>;
    /// Make `[offset, offset+len)` read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> NbdResult<()>;
    /// Discard `[offset, offset+len)` (contents afterwards are unspecified for NBD clients).
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> NbdResult<()>;
    /// Make every completed write durable.
    async fn flush(&self) -> NbdResult<()>;
    /// base:allocation extents covering [offset, offset+len): (length, flags) with
    /// NBD_STATE_HOLE=1, NBD_STATE_ZERO=2. Default: one data extent.
    async fn block_status(&self, offset: u64, len: u32) -> NbdResult<Vec<(u32, u32)>> {
        let _ = offset;
        Ok(vec![(len, 0)])
    }
}

/// What a server offers: named exports and TLS policy.
pub struct ServerConfig {
    pub exports: HashMap<String, Arc<dyn Export>>,
    /// Enables STARTTLS when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Refuse everything but STARTTLS and ABORT until TLS is up.
    pub require_tls: bool,
}

/// Serve one accepted connection (TCP or Unix or anything) until the client disconnects.
///
/// A client that disconnects (cleanly or not) ends the connection with `Ok(())`; protocol
/// violations that force the server to close return an error of kind `InvalidData`.
pub async fn serve_connection<S>(stream: S, config: Arc<ServerConfig>) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match run(stream, &config).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_disconnect() => {
            debug!(error = %e, "client went away");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn run<S>(mut stream: S, config: &ServerConfig) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let flags = within(deadline, handshake::greet(&mut stream)).await?;
    let outcome = within(
        deadline,
        handshake::haggle(&mut stream, config, false, flags),
    )
    .await?;
    match outcome {
        Outcome::Abort => {
            let _ = stream.shutdown().await;
            Ok(())
        }
        Outcome::Transmit(neg) => transmission::transmit(stream, neg).await,
        Outcome::StartTls => {
            let acceptor = config
                .tls
                .as_ref()
                .ok_or(NbdError::State("STARTTLS accepted without an acceptor"))?;
            let mut tls = within(deadline, tls::upgrade(acceptor, stream)).await?;
            debug!("TLS established");
            let outcome =
                within(deadline, handshake::haggle(&mut tls, config, true, flags)).await?;
            match outcome {
                Outcome::Abort => {
                    let _ = tls.shutdown().await;
                    Ok(())
                }
                Outcome::Transmit(neg) => transmission::transmit(tls, neg).await,
                Outcome::StartTls => Err(NbdError::State("second STARTTLS accepted")),
            }
        }
    }
}

/// Run a handshake step with the connection's handshake deadline.
async fn within<T>(
    deadline: tokio::time::Instant,
    step: impl std::future::Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout_at(deadline, step)
        .await
        .map_err(|_| NbdError::HandshakeTimeout)?
}

/// Accept loop on a TCP listener; spawns serve_connection per client; logs (tracing) and
/// survives per-connection errors.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    config: Arc<ServerConfig>,
) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Typically EMFILE or a connection reset before accept; back off and go on.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        info!(%peer, "NBD client connected");
        let config = config.clone();
        tokio::spawn(async move {
            match serve_connection(stream, config).await {
                Ok(()) => info!(%peer, "NBD client finished"),
                Err(e) => warn!(%peer, error = %e, "NBD connection closed with error"),
            }
        });
    }
}

/// Accept loop on a Unix listener; same behaviour as [`serve_tcp`].
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    config: Arc<ServerConfig>,
) -> io::Result<()> {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        info!("NBD client connected on unix socket");
        let config = config.clone();
        tokio::spawn(async move {
            match serve_connection(stream, config).await {
                Ok(()) => info!("NBD unix client finished"),
                Err(e) => warn!(error = %e, "NBD unix connection closed with error"),
            }
        });
    }
}
