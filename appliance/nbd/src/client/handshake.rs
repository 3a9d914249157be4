//! Client side of the fixed-newstyle handshake: greeting, STARTTLS, `OPT_STRUCTURED_REPLY`,
//! `OPT_SET_META_CONTEXT` and `OPT_GO` with `NBD_INFO_BLOCK_SIZE`.
//!
//! Every option reply is checked for magic, for answering the option we sent, and for a
//! payload of at most [`MAX_OPTION_LEN`] before it is read; the number of replies to one option
//! is bounded so a server cannot keep the client looping.

use super::{recv, send, ClientError, ClientOptions, Result};
use crate::proto::*;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::debug;

/// Most replies accepted for one option (metadata context replies come one per context).
const MAX_REPLIES: usize = 1024;

pub(super) struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    pub contexts: Vec<(String, u32)>,
    pub max_request: u32,
}

/// Read the server greeting and send our client flags.
pub(super) async fn greet<S>(s: &mut S, t: Duration) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut b = [0u8; 18];
    recv(s, &mut b, t).await?;
    if b[0..8] != NBDMAGIC.to_be_bytes() || b[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(ClientError::NotNbd);
    }
    let server_flags = u16::from_be_bytes([b[16], b[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotNbd);
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if server_flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    send(s, &[&cflags.to_be_bytes()], t).await
}

async fn send_option<S>(s: &mut S, opt: u32, data: &[u8], t: Duration) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&(data.len() as u32).to_be_bytes());
    send(s, &[&h, data], t).await
}

/// Read one reply to option `opt`: (reply type, payload).
async fn option_reply<S>(s: &mut S, opt: u32, t: Duration) -> Result<(u32, Vec<u8>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut h = [0u8; 20];
    recv(s, &mut h, t).await?;
    if h[0..8] != OPT_REPLY_MAGIC.to_be_bytes() {
        return Err(ClientError::Protocol("option reply magic"));
    }
    let be32 = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if be32(8) != opt {
        return Err(ClientError::Protocol("reply to an option not sent"));
    }
    let (reply, len) = (be32(12), be32(16));
    if len > MAX_OPTION_LEN {
        return Err(ClientError::Protocol("option reply too long"));
    }
    let mut payload = vec![0u8; len as usize];
    recv(s, &mut payload, t).await?;
    Ok((reply, payload))
}

fn refused(option: u32, reply: u32, payload: &[u8]) -> ClientError {
    debug!(
        option,
        reply,
        message = %String::from_utf8_lossy(payload),
        "server refused option"
    );
    ClientError::Refused { option, reply }
}

/// `NBD_OPT_STARTTLS`; on success the caller runs the TLS handshake.
pub(super) async fn starttls<S>(s: &mut S, t: Duration) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    send_option(s, OPT_STARTTLS, &[], t).await?;
    match option_reply(s, OPT_STARTTLS, t).await? {
        (REP_ACK, p) if p.is_empty() => Ok(()),
        (r, p) if r & REP_ERR != 0 => Err(refused(OPT_STARTTLS, r, &p)),
        _ => Err(ClientError::Protocol("unexpected reply to STARTTLS")),
    }
}

fn put_string(buf: &mut Vec<u8>, s: &str) -> Result<()> {
    if s.len() > MAX_STRING_LEN as usize {
        return Err(ClientError::Usage("name longer than 4096 bytes"));
    }
    buf.extend_from_slice(&(s.len() as u32).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Everything after the greeting (and TLS): structured replies, metadata contexts, `OPT_GO`.
pub(super) async fn negotiate<S>(s: &mut S, opts: &ClientOptions) -> Result<Negotiated>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let t = opts.timeout;
    let mut structured = false;
    if opts.structured {
        send_option(s, OPT_STRUCTURED_REPLY, &[], t).await?;
        match option_reply(s, OPT_STRUCTURED_REPLY, t).await? {
            (REP_ACK, p) if p.is_empty() => structured = true,
            (r @ (REP_ERR_TLS_REQD | REP_ERR_UNKNOWN), p) => {
                return Err(refused(OPT_STRUCTURED_REPLY, r, &p))
            }
            // Unsupported or refused: carry on with simple replies.
            (r, p) if r & REP_ERR != 0 => {
                debug!(reply = r, message = %String::from_utf8_lossy(&p), "no structured replies")
            }
            _ => {
                return Err(ClientError::Protocol(
                    "unexpected reply to STRUCTURED_REPLY",
                ))
            }
        }
    }

    let mut contexts: Vec<(String, u32)> = Vec::new();
    if structured && !opts.meta_contexts.is_empty() {
        let mut data = Vec::new();
        put_string(&mut data, &opts.export)?;
        data.extend_from_slice(&(opts.meta_contexts.len() as u32).to_be_bytes());
        for name in &opts.meta_contexts {
            put_string(&mut data, name)?;
        }
        if data.len() > MAX_OPTION_LEN as usize {
            return Err(ClientError::Usage("too many metadata contexts"));
        }
        send_option(s, OPT_SET_META_CONTEXT, &data, t).await?;
        let mut done = false;
        for _ in 0..MAX_REPLIES {
            match option_reply(s, OPT_SET_META_CONTEXT, t).await? {
                (REP_META_CONTEXT, p) if p.len() > 4 => {
                    let id = u32::from_be_bytes(p[0..4].try_into().expect("4 bytes"));
                    let name = std::str::from_utf8(&p[4..])
                        .map_err(|_| ClientError::Protocol("metadata context name not UTF-8"))?;
                    if !opts.meta_contexts.iter().any(|n| n == name) {
                        return Err(ClientError::Protocol(
                            "server chose a context not asked for",
                        ));
                    }
                    if contexts.iter().any(|(n, i)| n == name || *i == id) {
                        return Err(ClientError::Protocol("metadata context twice"));
                    }
                    contexts.push((name.to_string(), id));
                }
                (REP_ACK, p) if p.is_empty() => {
                    done = true;
                    break;
                }
                (r, p) if r & REP_ERR != 0 => return Err(refused(OPT_SET_META_CONTEXT, r, &p)),
                _ => {
                    return Err(ClientError::Protocol(
                        "unexpected reply to SET_META_CONTEXT",
                    ))
                }
            }
        }
        if !done {
            return Err(ClientError::Protocol(
                "too many replies to SET_META_CONTEXT",
            ));
        }
    }

    let mut data = Vec::new();
    put_string(&mut data, &opts.export)?;
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &data, t).await?;
    let (mut size, mut flags, mut max_block) = (None, 0u16, None);
    let mut done = false;
    for _ in 0..MAX_REPLIES {
        let (reply, p) = option_reply(s, OPT_GO, t).await?;
        match reply {
            REP_ACK if p.is_empty() => {
                done = true;
                break;
            }
            REP_INFO if p.len() >= 2 => match u16::from_be_bytes([p[0], p[1]]) {
                INFO_EXPORT if p.len() == 12 => {
                    size = Some(u64::from_be_bytes(p[2..10].try_into().expect("8 bytes")));
                    flags = u16::from_be_bytes([p[10], p[11]]);
                }
                INFO_BLOCK_SIZE if p.len() == 14 => {
                    let be32 = |i: usize| u32::from_be_bytes(p[i..i + 4].try_into().expect("4"));
                    let (min, preferred, max) = (be32(2), be32(6), be32(10));
                    if !min.is_power_of_two() || min > 64 * 1024 || max < min || preferred < min {
                        return Err(ClientError::Protocol("invalid block size information"));
                    }
                    max_block = Some((min, max));
                }
                INFO_EXPORT | INFO_BLOCK_SIZE => {
                    return Err(ClientError::Protocol("information reply of the wrong size"))
                }
                _ => {}
            },
            r if r & REP_ERR != 0 => return Err(refused(OPT_GO, r, &p)),
            _ => return Err(ClientError::Protocol("unexpected reply to GO")),
        }
    }
    if !done {
        return Err(ClientError::Protocol("too many replies to GO"));
    }
    let size = size.ok_or(ClientError::Protocol("no export information"))?;
    let max_request = match max_block {
        Some((min, max)) => {
            let m = max.min(MAX_PAYLOAD);
            m - m % min
        }
        None => MAX_PAYLOAD,
    };
    Ok(Negotiated {
        size,
        flags,
        structured,
        contexts,
        max_request,
    })
}
