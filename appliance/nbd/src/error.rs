//! Typed errors of the NBD server.
//!
//! Two kinds of failure exist and must not be confused. An [`crate::Errno`] is an *answer*:
//! the request was understood and failed, the client gets an error reply and the connection
//! carries on. An [`NbdError`] ends the connection: the byte stream can no longer be trusted
//! (bad magic, an unskippable payload) or the peer went away. The connection task turns
//! peer-went-away errors into a quiet, successful end, because a client dropping its socket is
//! an ordinary event for a replication target, not something worth an alarm.

use std::io;

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket-level failure, including the client disconnecting.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A magic number did not match; the stream is out of sync.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE` or set unknown flags.
    #[error("unsupported client flags {0:#x}")]
    ClientFlags(u32),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (this option has no error reply).
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` before STARTTLS while TLS is required (no error reply is possible).
    #[error("TLS is required but the client selected an export without STARTTLS")]
    TlsRequired,
    /// A request carried a payload larger than the server is willing to read or skip.
    #[error("payload of {0} bytes exceeds the limit")]
    PayloadTooLarge(u64),
    /// The client kept haggling without ever choosing an export.
    #[error("too many options during the handshake")]
    TooManyOptions,
    /// The client did not finish the handshake in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// Internal state that the protocol should make impossible.
    #[error("protocol state error: {0}")]
    State(&'static str),
}

impl NbdError {
    /// True if the error only says that the peer went away.
    pub fn is_disconnect(&self) -> bool {
        match self {
            NbdError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

impl From<NbdError> for io::Error {
    fn from(e: NbdError) -> io::Error {
        match e {
            NbdError::Io(e) => e,
            NbdError::HandshakeTimeout => io::Error::new(io::ErrorKind::TimedOut, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}
