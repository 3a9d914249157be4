//! `ferry bench --peer HOST:PORT` and `ferry bench --serve ADDR`: the WAN link to the recovery
//! site, measured over plain TCP (a link measurement carries no data worth protecting, and TLS
//! would measure the CPU as well as the link).
//!
//! Protocol (all integers big-endian), one connection:
//! - client `FRYWAN01`, server `FRYWAN01` (so a wrong port fails clearly);
//! - any number of pings: client `P` + 8 bytes, server `p` + the same 8 bytes (TCP_NODELAY on both
//!   sides: one small segment each way, the RTT);
//! - at most one sink, last: client `T` + u32 milliseconds, then data until it shuts down its
//!   write side; server `d` + u64 bytes received + u64 nanoseconds from first byte to end of
//!   stream, and closes. The client's throughput is bytes over the time from its first write to
//!   that reply, so data still queued in its socket buffer when it stops writing is counted only
//!   once it has crossed the link.
//!
//! The responder is bounded: one client at a time (others wait in the listen backlog), a read
//! and write timeout on every session, a session time limit, a byte limit per sink, a ping limit,
//! and a lifetime after which it stops listening (connections are then refused).

use crate::bench::BenchError;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

pub const MAGIC: &[u8; 8] = b"FRYWAN01";
/// Longest throughput run a client may ask for.
pub const MAX_SINK: Duration = Duration::from_secs(60);
/// Most pings in one session.
pub const MAX_PINGS: u32 = 10_000;
/// After the client stops writing, how long its socket buffer may take to drain across the link.
const DRAIN_GRACE: Duration = Duration::from_secs(30);

/// The measured link (Mbit/s = 10^6 bits per second).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WanFigures {
    pub peer: String,
    pub pings: u32,
    pub rtt_min_ms: f64,
    pub rtt_p50_ms: f64,
    pub rtt_p99_ms: f64,
    /// TCP payload throughput from this box to the peer, one connection.
    pub upstream_mbps: f64,
    pub upstream_bytes: u64,
    pub upstream_secs: f64,
    /// Bandwidth-delay product: upstream rate × RTT p50, bytes (what a TCP window must hold).
    pub bdp_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub pings: u32,
    /// Throughput run (at most [`MAX_SINK`]).
    pub upstream: Duration,
    /// Connect, read and write timeout.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            pings: 50,
            upstream: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Stop listening after this long.
    pub lifetime: Duration,
    /// Most bytes one sink accepts.
    pub max_bytes: u64,
    /// Read/write timeout on a session.
    pub idle: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            lifetime: Duration::from_secs(600),
            max_bytes: 64 << 30,
            idle: Duration::from_secs(10),
        }
    }
}

/// One served session, for the server's log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Served {
    pub pings: u32,
    pub bytes: u64,
    pub secs: f64,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn session(mut s: TcpStream, o: &ServeOptions) -> io::Result<Served> {
    // Pings, plus the longest sink, plus its drain, plus slack for the handshake.
    let deadline = Instant::now() + MAX_SINK + DRAIN_GRACE + Duration::from_secs(30);
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(o.idle))?;
    s.set_write_timeout(Some(o.idle))?;
    let mut m = [0u8; 8];
    s.read_exact(&mut m)?;
    if &m != MAGIC {
        return Err(bad("not a `ferry bench --peer` client"));
    }
    s.write_all(MAGIC)?;
    let mut out = Served::default();
    loop {
        if Instant::now() > deadline {
            return Err(bad("session time limit"));
        }
        let mut op = [0u8; 1];
        if s.read(&mut op)? == 0 {
            return Ok(out);
        }
        match op[0] {
            b'P' => {
                let mut r = [b'p'; 9];
                s.read_exact(&mut r[1..])?;
                out.pings += 1;
                if out.pings > MAX_PINGS {
                    return Err(bad("too many pings"));
                }
                s.write_all(&r)?;
            }
            b'T' => {
                let mut ms = [0u8; 4];
                s.read_exact(&mut ms)?;
                let ms = u64::from(u32::from_be_bytes(ms));
                if ms == 0 || ms > MAX_SINK.as_millis() as u64 {
                    return Err(bad(format!("throughput run of {ms} ms")));
                }
                let until =
                    (Instant::now() + Duration::from_millis(ms) + DRAIN_GRACE).min(deadline);
                let mut buf = vec![0u8; 256 << 10];
                let mut first = None;
                loop {
                    if Instant::now() > until {
                        return Err(bad("throughput run over its time limit"));
                    }
                    let k = s.read(&mut buf)?;
                    if k == 0 {
                        break;
                    }
                    first.get_or_insert_with(Instant::now);
                    out.bytes += k as u64;
                    if out.bytes > o.max_bytes {
                        return Err(bad(format!("more than {} bytes", o.max_bytes)));
                    }
                }
                let ns = first.map_or(0, |t| t.elapsed().as_nanos() as u64);
                out.secs = ns as f64 / 1e9;
                let mut r = [0u8; 17];
                r[0] = b'd';
                r[1..9].copy_from_slice(&out.bytes.to_be_bytes());
                r[9..].copy_from_slice(&ns.to_be_bytes());
                s.write_all(&r)?;
                let _ = s.shutdown(Shutdown::Both);
                return Ok(out);
            }
            x => return Err(bad(format!("unknown request {x:#04x}"))),
        }
    }
}

/// Serve clients one at a time until `o.lifetime` has passed; `log` gets one line per session.
/// Returns the number of sessions.
pub fn serve(
    listener: TcpListener,
    o: &ServeOptions,
    mut log: impl FnMut(String),
) -> io::Result<u64> {
    listener.set_nonblocking(true)?;
    let end = Instant::now() + o.lifetime;
    let mut sessions = 0;
    while Instant::now() < end {
        match listener.accept() {
            Ok((s, from)) => {
                s.set_nonblocking(false)?;
                sessions += 1;
                match session(s, o) {
                    Ok(r) => log(format!(
                        "{from}: {} pings, {} bytes in {:.3} s",
                        r.pings, r.bytes, r.secs
                    )),
                    Err(e) => log(format!("{from}: ended: {e}")),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(sessions)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Measure the link to a peer running [`serve`].
pub fn measure(peer: &str, o: &ClientOptions) -> Result<WanFigures, BenchError> {
    let err = |e: io::Error| BenchError::Wan(peer.to_string(), e);
    if o.upstream.is_zero() || o.upstream > MAX_SINK {
        return Err(err(bad(format!(
            "the throughput run must be above 0 and at most {} s",
            MAX_SINK.as_secs()
        ))));
    }
    let pings = o.pings.clamp(1, MAX_PINGS - 1);
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut stream = None;
    for a in peer.to_socket_addrs().map_err(err)? {
        match TcpStream::connect_timeout(&a, o.timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut s = stream.ok_or(last).map_err(err)?;
    s.set_nodelay(true).map_err(err)?;
    s.set_read_timeout(Some(o.timeout)).map_err(err)?;
    s.set_write_timeout(Some(o.timeout)).map_err(err)?;
    s.write_all(MAGIC).map_err(err)?;
    let mut m = [0u8; 8];
    s.read_exact(&mut m).map_err(err)?;
    if &m != MAGIC {
        return Err(err(bad("not a `ferry bench --serve` responder")));
    }
    // One unrecorded ping first: the connection's first exchange pays for cold paths.
    let mut rtt = Vec::with_capacity(pings as usize);
    for i in 0..=u64::from(pings) {
        let mut req = [b'P'; 9];
        req[1..].copy_from_slice(&i.to_be_bytes());
        let t = Instant::now();
        s.write_all(&req).map_err(err)?;
        let mut r = [0u8; 9];
        s.read_exact(&mut r).map_err(err)?;
        let took = t.elapsed().as_secs_f64() * 1e3;
        if r[0] != b'p' || r[1..] != req[1..] {
            return Err(err(bad("ping answered wrongly")));
        }
        if i > 0 {
            rtt.push(took);
        }
    }
    rtt.sort_by(f64::total_cmp);
    let mut req = [b'T'; 5];
    req[1..].copy_from_slice(&(o.upstream.as_millis() as u32).to_be_bytes());
    s.write_all(&req).map_err(err)?;
    // Incompressible, in case anything on the path compresses.
    let mut buf = vec![0u8; 128 << 10];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < o.upstream {
        s.write_all(&buf).map_err(err)?;
        sent += buf.len() as u64;
    }
    s.shutdown(Shutdown::Write).map_err(err)?;
    s.set_read_timeout(Some(o.timeout + DRAIN_GRACE))
        .map_err(err)?;
    let mut r = [0u8; 17];
    s.read_exact(&mut r).map_err(err)?;
    let secs = t.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(r[1..9].try_into().expect("8 bytes"));
    if r[0] != b'd' || got != sent {
        return Err(err(bad(format!("the peer received {got} of {sent} bytes"))));
    }
    let upstream_mbps = got as f64 * 8.0 / secs / 1e6;
    let rtt_p50_ms = pct(&rtt, 0.50);
    Ok(WanFigures {
        peer: peer.to_string(),
        pings,
        rtt_min_ms: rtt[0],
        rtt_p50_ms,
        rtt_p99_ms: pct(&rtt, 0.99),
        upstream_mbps,
        upstream_bytes: got,
        upstream_secs: secs,
        bdp_bytes: (upstream_mbps * 1e6 / 8.0 * rtt_p50_ms / 1e3).round() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_link_then_the_responder_stops_at_its_lifetime() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let o = ServeOptions {
                lifetime: Duration::from_secs(3),
                max_bytes: 64 << 30,
                idle: Duration::from_secs(2),
            };
            let n = serve(l, &o, |s| lines.push(s)).unwrap();
            (n, lines)
        });
        // Something that is not a client is dropped, and the next client is still served.
        let mut junk = TcpStream::connect(&addr).unwrap();
        junk.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut rest = Vec::new();
        let _ = junk.read_to_end(&mut rest);
        assert!(rest.is_empty());
        let f = measure(
            &addr,
            &ClientOptions {
                pings: 20,
                upstream: Duration::from_millis(300),
                timeout: Duration::from_secs(5),
            },
        )
        .unwrap();
        assert_eq!(f.pings, 20);
        assert!(f.rtt_min_ms > 0.0 && f.rtt_min_ms <= f.rtt_p50_ms, "{f:?}");
        assert!(f.rtt_p50_ms <= f.rtt_p99_ms, "{f:?}");
        assert!(f.upstream_mbps > 10.0 && f.upstream_bytes > 0, "{f:?}");
        assert!(f.upstream_secs >= 0.3, "{f:?}");
        let (n, lines) = server.join().unwrap();
        assert_eq!(n, 2, "{lines:?}");
        assert!(
            lines[0].contains("not a `ferry bench --peer` client"),
            "{lines:?}"
        );
        // The client's unrecorded first ping counts here.
        assert!(lines[1].contains("21 pings"), "{lines:?}");
        // Past its lifetime the responder no longer listens.
        assert!(TcpStream::connect(&addr).is_err());
        // Bad requests are errors, not hangs.
        assert!(measure(
            &addr,
            &ClientOptions {
                timeout: Duration::from_secs(1),
                ..Default::default()
            }
        )
        .is_err());
        assert!(measure(
            "127.0.0.1:1",
            &ClientOptions {
                upstream: Duration::from_secs(61),
                ..Default::default()
            }
        )
        .is_err());
    }
}
