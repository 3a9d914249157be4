//! The fixed-newstyle handshake ("option haggling").
//!
//! Why it is shaped like this: the handshake is where an untrusted client talks to us before it
//! has proven anything, so every length is bounded before anything is allocated, every option
//! gets an explicit answer (unknown ones get `NBD_REP_ERR_UNSUP`), and when the configuration
//! requires TLS, nothing but STARTTLS and ABORT is honoured on the plaintext stream.
//!
//! How: [`greet`] sends the server greeting and reads the client flags. [`haggle`] then loops
//! over options until the client picks an export (`OPT_GO` / `OPT_EXPORT_NAME`), aborts, or
//! asks for STARTTLS. STARTTLS is returned to the caller, which wraps the stream in TLS and
//! calls [`haggle`] again on the encrypted stream with fresh state, as the spec demands
//! (nothing negotiated in plaintext survives the upgrade).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use crate::error::NbdError;
use crate::proto::*;
use crate::{Export, ServerConfig};

/// How many options a client may send before choosing an export.
const MAX_OPTIONS: u32 = 1024;

/// What the transmission phase needs to know about the negotiation.
pub(crate) struct Negotiated {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub structured: bool,
    pub base_allocation: bool,
    pub flags: u16,
}

/// How one round of haggling ended.
pub(crate) enum Outcome {
    Transmit(Negotiated),
    StartTls,
    Abort,
}

/// Send the greeting, read and validate the client flags. Returns the client flags.
pub(crate) async fn greet<S>(s: &mut S) -> Result<u32, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;
    let flags = s.read_u32().await?;
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(NbdError::ClientFlags(flags));
    }
    Ok(flags)
}

/// Per-round negotiation state (reset by STARTTLS).
struct Haggle<'a, S> {
    s: &'a mut S,
    config: &'a ServerConfig,
    tls_active: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export name of the last SET_META_CONTEXT and whether base:allocation was selected.
    meta: Option<(String, bool)>,
}

/// Run option haggling until an export is chosen, the client aborts, or STARTTLS is accepted.
pub(crate) async fn haggle<S>(
    s: &mut S,
    config: &ServerConfig,
    tls_active: bool,
    client_flags: u32,
) -> Result<Outcome, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = Haggle {
        s,
        config,
        tls_active,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
    for _ in 0..MAX_OPTIONS {
        if let Some(outcome) = h.one_option().await? {
            return Ok(outcome);
        }
    }
    Err(NbdError::TooManyOptions)
}

/// Bounded little cursor over option data.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A u32-length-prefixed UTF-8 string of at most [`MAX_STRING_LEN`] bytes.
    fn string(&mut self) -> Option<String> {
        let len = self.u32()?;
        if len > MAX_STRING_LEN {
            return None;
        }
        let bytes = self.take(len as usize)?;
        String::from_utf8(bytes.to_vec()).ok()
    }
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// Find an export by name. An empty name selects the only export when there is exactly one.
fn find_export(config: &ServerConfig, name: &str) -> Option<(String, Arc<dyn Export>)> {
    if let Some(e) = config.exports.get(name) {
        return Some((name.to_string(), e.clone()));
    }
    if name.is_empty() && config.exports.len() == 1 {
        return config
            .exports
            .iter()
            .next()
            .map(|(n, e)| (n.clone(), e.clone()));
    }
    None
}

/// Transmission flags for an export, given what was negotiated.
fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.read_only() {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

impl<S> Haggle<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    async fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut buf = Vec::with_capacity(20 + data.len());
        buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        buf.extend_from_slice(&opt.to_be_bytes());
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
        buf.extend_from_slice(data);
        self.s.write_all(&buf).await?;
        self.s.flush().await?;
        Ok(())
    }

    async fn error(&mut self, opt: u32, kind: u32, msg: &str) -> Result<(), NbdError> {
        debug!(opt, kind = format_args!("{kind:#x}"), msg, "option refused");
        self.reply(opt, kind, msg.as_bytes()).await
    }

    /// Handle one option. `Some` ends haggling.
    async fn one_option(&mut self) -> Result<Option<Outcome>, NbdError> {
        let magic = self.s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic(magic));
        }
        let opt = self.s.read_u32().await?;
        let len = self.s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            if opt == OPT_EXPORT_NAME {
                return Err(NbdError::PayloadTooLarge(len.into()));
            }
            // Skip the payload without buffering it, then refuse the option.
            let skipped =
                tokio::io::copy(&mut (&mut *self.s).take(len.into()), &mut tokio::io::sink())
                    .await?;
            if skipped != u64::from(len) {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
            self.error(opt, REP_ERR_TOO_BIG, "option data too large")
                .await?;
            return Ok(None);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).await?;
        debug!(opt, len, tls = self.tls_active, "option");

        if self.config.require_tls && !self.tls_active && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(NbdError::TlsRequired);
            }
            self.error(opt, REP_ERR_TLS_REQD, "TLS required").await?;
            return Ok(None);
        }

        match opt {
            OPT_EXPORT_NAME => self.export_name(&data).await.map(Some),
            OPT_ABORT => {
                // The client may already have closed; an ACK is a courtesy.
                let _ = self.reply(opt, REP_ACK, &[]).await;
                Ok(Some(Outcome::Abort))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "OPT_LIST takes no data")
                        .await?;
                    return Ok(None);
                }
                let mut names: Vec<&String> = self.config.exports.keys().collect();
                names.sort();
                for name in names {
                    let mut d = Vec::with_capacity(4 + name.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    self.reply(opt, REP_SERVER, &d).await?;
                }
                self.reply(opt, REP_ACK, &[]).await?;
                Ok(None)
            }
            OPT_STARTTLS => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "STARTTLS takes no data")
                        .await?;
                } else if self.tls_active {
                    self.error(opt, REP_ERR_INVALID, "TLS already active")
                        .await?;
                } else if self.config.tls.is_none() {
                    self.error(opt, REP_ERR_UNSUP, "TLS not configured").await?;
                } else {
                    self.reply(opt, REP_ACK, &[]).await?;
                    return Ok(Some(Outcome::StartTls));
                }
                Ok(None)
            }
            OPT_INFO | OPT_GO => self.info_or_go(opt, &data).await,
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                        .await?;
                } else {
                    self.structured = true;
                    self.reply(opt, REP_ACK, &[]).await?;
                }
                Ok(None)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(opt, &data).await?;
                Ok(None)
            }
            _ => {
                self.error(opt, REP_ERR_UNSUP, "unsupported option").await?;
                Ok(None)
            }
        }
    }

    async fn export_name(&mut self, data: &[u8]) -> Result<Outcome, NbdError> {
        let name = String::from_utf8(data.to_vec())
            .map_err(|_| NbdError::UnknownExport(String::from_utf8_lossy(data).into_owned()))?;
        let Some((name, export)) = find_export(self.config, &name) else {
            return Err(NbdError::UnknownExport(name));
        };
        let flags = transmission_flags(export.as_ref(), self.structured);
        let mut buf = Vec::with_capacity(10 + 124);
        buf.extend_from_slice(&export.size().to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            buf.extend_from_slice(&[0u8; 124]);
        }
        self.s.write_all(&buf).await?;
        self.s.flush().await?;
        Ok(Outcome::Transmit(self.negotiated(name, export, flags)))
    }

    fn negotiated(&self, name: String, export: Arc<dyn Export>, flags: u16) -> Negotiated {
        let base_allocation = matches!(&self.meta, Some((n, true)) if *n == name);
        Negotiated {
            name,
            export,
            structured: self.structured,
            base_allocation: base_allocation && self.structured,
            flags,
        }
    }

    async fn info_or_go(&mut self, opt: u32, data: &[u8]) -> Result<Option<Outcome>, NbdError> {
        let mut c = Cursor { data };
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut infos = Vec::with_capacity(usize::from(n).min(64));
            for _ in 0..n {
                infos.push(c.u16()?);
            }
            c.is_empty().then_some((name, infos))
        })();
        let Some((name, infos)) = parsed else {
            self.error(opt, REP_ERR_INVALID, "malformed INFO/GO request")
                .await?;
            return Ok(None);
        };
        let Some((name, export)) = find_export(self.config, &name) else {
            self.error(opt, REP_ERR_UNKNOWN, "unknown export").await?;
            return Ok(None);
        };
        let flags = transmission_flags(export.as_ref(), self.structured);

        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        d.extend_from_slice(&export.size().to_be_bytes());
        d.extend_from_slice(&flags.to_be_bytes());
        self.reply(opt, REP_INFO, &d).await?;
        if infos.contains(&INFO_NAME) {
            let mut d = Vec::with_capacity(2 + name.len());
            d.extend_from_slice(&INFO_NAME.to_be_bytes());
            d.extend_from_slice(name.as_bytes());
            self.reply(opt, REP_INFO, &d).await?;
        }
        if infos.contains(&INFO_BLOCK_SIZE) {
            let mut d = Vec::with_capacity(14);
            d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
            d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
            self.reply(opt, REP_INFO, &d).await?;
        }
        self.reply(opt, REP_ACK, &[]).await?;
        if opt == OPT_GO {
            Ok(Some(Outcome::Transmit(
                self.negotiated(name, export, flags),
            )))
        } else {
            Ok(None)
        }
    }

    async fn meta_context(&mut self, opt: u32, data: &[u8]) -> Result<(), NbdError> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set && !self.structured {
            return self
                .error(opt, REP_ERR_INVALID, "structured replies not negotiated")
                .await;
        }
        let mut c = Cursor { data };
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            // Each query needs at least its 4-byte length, so `n` is bounded by the data.
            if u64::from(n) * 4 > c.data.len() as u64 {
                return None;
            }
            let mut queries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                queries.push(c.string()?);
            }
            c.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self
                .error(opt, REP_ERR_INVALID, "malformed meta context request")
                .await;
        };
        let Some((name, _)) = find_export(self.config, &name) else {
            return self.error(opt, REP_ERR_UNKNOWN, "unknown export").await;
        };
        let matches = if set {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        if matches {
            let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
            d.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
            d.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &d).await?;
        }
        if set {
            self.meta = Some((name, matches));
        }
        self.reply(opt, REP_ACK, &[]).await
    }
}
