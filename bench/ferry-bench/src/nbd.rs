//! A small blocking NBD client: fixed-newstyle handshake, `NBD_OPT_GO`, then pipelined
//! `NBD_CMD_WRITE` requests with simple replies, timed one by one.
//!
//! Only what the benchmarks need: no TLS, no structured replies, no reads. Requests are sent
//! with up to `depth` in flight; replies may come back in any order (qemu-nbd answers in
//! parallel) and are matched by handle.

use anyhow::{bail, ensure, Context};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const TRANSMISSION_FLAG_READ_ONLY: u16 = 1 << 1;

/// One connection in the transmission phase.
pub struct Client {
    sock: TcpStream,
    pub size: u64,
    next_handle: u64,
    /// handle -> time the request started going out
    inflight: HashMap<u64, Instant>,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl Client {
    /// Connect to `addr` (a loopback `host:port`) and select `export` with `NBD_OPT_GO`.
    pub fn connect(addr: &str, export: &str) -> anyhow::Result<Client> {
        let sock = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut c = Client {
            sock,
            size: 0,
            next_handle: 1,
            inflight: HashMap::new(),
        };
        c.handshake(export)
            .with_context(|| format!("NBD handshake with {addr} for export {export:?}"))?;
        Ok(c)
    }

    fn read_exact(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        let mut b = vec![0; n];
        self.sock.read_exact(&mut b)?;
        Ok(b)
    }

    fn handshake(&mut self, export: &str) -> anyhow::Result<()> {
        let hello = self.read_exact(18)?;
        ensure!(be_u64(&hello) == NBDMAGIC, "no NBDMAGIC");
        ensure!(be_u64(&hello[8..]) == IHAVEOPT, "not a newstyle server");
        let flags = be_u16(&hello[16..]);
        ensure!(
            flags & FLAG_FIXED_NEWSTYLE != 0,
            "server is not fixed newstyle"
        );
        let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        let mut opt = Vec::new();
        opt.extend_from_slice(&client_flags.to_be_bytes());
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes()); // no extra info requests
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        self.sock.write_all(&opt)?;
        loop {
            let h = self.read_exact(20)?;
            ensure!(be_u64(&h) == OPT_REPLY_MAGIC, "bad option reply magic");
            ensure!(be_u32(&h[8..]) == OPT_GO, "reply to another option");
            let kind = be_u32(&h[12..]);
            let len = be_u32(&h[16..]) as usize;
            ensure!(len <= 65536, "option reply of {len} bytes");
            let body = self.read_exact(len)?;
            match kind {
                REP_ACK => break,
                REP_INFO if len >= 2 && be_u16(&body) == INFO_EXPORT => {
                    ensure!(len >= 12, "short NBD_INFO_EXPORT");
                    self.size = be_u64(&body[2..]);
                    let tflags = be_u16(&body[10..]);
                    ensure!(
                        tflags & TRANSMISSION_FLAG_READ_ONLY == 0,
                        "export is read-only"
                    );
                }
                REP_INFO => {}
                k if k & (1 << 31) != 0 => bail!(
                    "server refused OPT_GO (error {:#x}): {}",
                    k,
                    String::from_utf8_lossy(&body)
                ),
                k => bail!("unexpected option reply type {k}"),
            }
        }
        ensure!(self.size > 0, "server sent no export size");
        Ok(())
    }

    fn send(&mut self, cmd: u16, offset: u64, data: &[u8], len: u32) -> anyhow::Result<()> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut hdr = [0u8; 28];
        hdr[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        hdr[4..6].copy_from_slice(&0u16.to_be_bytes()); // no FUA
        hdr[6..8].copy_from_slice(&cmd.to_be_bytes());
        hdr[8..16].copy_from_slice(&handle.to_be_bytes());
        hdr[16..24].copy_from_slice(&offset.to_be_bytes());
        hdr[24..28].copy_from_slice(&len.to_be_bytes());
        self.inflight.insert(handle, Instant::now());
        self.sock.write_all(&hdr)?;
        if !data.is_empty() {
            self.sock.write_all(data)?;
        }
        Ok(())
    }

    /// Wait for one reply; returns its latency (request start to reply).
    fn reap(&mut self) -> anyhow::Result<Duration> {
        let mut r = [0u8; 16];
        self.sock.read_exact(&mut r).context("reading a reply")?;
        let now = Instant::now();
        ensure!(be_u32(&r) == SIMPLE_REPLY_MAGIC, "not a simple reply");
        let err = be_u32(&r[4..]);
        let handle = be_u64(&r[8..]);
        let start = self
            .inflight
            .remove(&handle)
            .with_context(|| format!("reply for unknown handle {handle}"))?;
        ensure!(err == 0, "server answered error {err}");
        Ok(now - start)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Queue one write (no FUA); first reaps replies until fewer than `depth` are in flight.
    /// Latencies of reaped replies are pushed to `lat`.
    pub fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        depth: usize,
        lat: &mut Vec<Duration>,
    ) -> anyhow::Result<()> {
        while self.inflight.len() >= depth.max(1) {
            lat.push(self.reap()?);
        }
        self.send(CMD_WRITE, offset, data, data.len() as u32)
    }

    /// Wait for every reply still outstanding.
    pub fn drain(&mut self, lat: &mut Vec<Duration>) -> anyhow::Result<()> {
        while !self.inflight.is_empty() {
            lat.push(self.reap()?);
        }
        Ok(())
    }

    /// `NBD_CMD_FLUSH` and wait for it (after draining writes); returns how long it took.
    pub fn flush(&mut self) -> anyhow::Result<Duration> {
        self.drain(&mut Vec::new())?;
        self.send(CMD_FLUSH, 0, &[], 0)?;
        self.reap()
    }

    /// Drain, then `NBD_CMD_DISC` (no reply).
    pub fn disconnect(mut self) -> anyhow::Result<()> {
        self.drain(&mut Vec::new())?;
        self.send(CMD_DISC, 0, &[], 0)?;
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}
