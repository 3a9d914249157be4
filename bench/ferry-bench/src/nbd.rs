//! A blocking face on `ferry_nbd::client` for the benchmarks: pipelined writes with up to
//! `depth` in flight, each reply timed from its request (the library measures the latency).

use anyhow::{ensure, Context};
use ferry_nbd::client::Client as NbdClient;
use ferry_nbd::proto::FLAG_READ_ONLY;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub struct Client {
    rt: tokio::runtime::Runtime,
    c: NbdClient<TcpStream>,
}

impl Client {
    pub fn connect(addr: &str, export: &str) -> anyhow::Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = rt
            .block_on(NbdClient::connect_tcp(addr, export))
            .with_context(|| format!("NBD connect to {addr}, export {export}"))?;
        ensure!(
            c.transmission_flags() & FLAG_READ_ONLY == 0,
            "export {export} is read-only"
        );
        Ok(Client { rt, c })
    }

    pub fn size(&self) -> u64 {
        self.c.size()
    }

    pub fn inflight(&self) -> usize {
        self.c.in_flight()
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
        let c = &mut self.c;
        self.rt.block_on(async {
            while c.in_flight() >= depth.max(1) {
                lat.push(c.complete().await?.latency);
            }
            c.submit_write(offset, data, false).await?;
            Ok(())
        })
    }

    /// Wait for every reply still outstanding.
    pub fn drain(&mut self, lat: &mut Vec<Duration>) -> anyhow::Result<()> {
        let done = self.rt.block_on(self.c.drain())?;
        lat.extend(done.into_iter().map(|d| d.latency));
        Ok(())
    }

    /// Drain, then FLUSH; returns how long the flush took.
    pub fn flush(&mut self) -> anyhow::Result<Duration> {
        self.drain(&mut Vec::new())?;
        let t = Instant::now();
        self.rt.block_on(self.c.flush())?;
        Ok(t.elapsed())
    }

    pub fn disconnect(mut self) -> anyhow::Result<()> {
        self.drain(&mut Vec::new())?;
        self.rt.block_on(self.c.disconnect())?;
        Ok(())
    }
}
