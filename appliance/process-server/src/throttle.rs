//! Bandwidth limits on the replication link. A machine's policy caps what its disks send to the
//! master target, in megabits per second on the wire (TLS records included), with weekly
//! windows that have their own limit (e.g. 20 Mbit/s on weekdays from 8:00 to 18:00, unlimited
//! at night), evaluated in the appliance's local time zone.
//!
//! Every connection of the machine's disks (continuous shipping, periodic cycles, seeds and
//! resyncs) draws from one token bucket, so the limit holds for the machine as a whole however
//! many of its disks are sending. The bucket holds at most a tenth of a second of traffic, so a
//! pause is not followed by a burst the WAN link would queue.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A weekly window with its own limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// Monday first.
    pub days: [bool; 7],
    /// Minutes after local midnight: `start_minute <= m < end_minute`.
    pub start_minute: u16,
    pub end_minute: u16,
    /// None: unlimited in this window.
    pub limit_mbit: Option<u32>,
}

/// The limits of one machine: the first window holding the moment decides, else the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    pub default_mbit: Option<u32>,
    pub windows: Vec<Window>,
}

impl Schedule {
    /// The limit on `weekday` (0 = Monday) at `minute` after midnight.
    pub fn limit_at(&self, weekday: usize, minute: u16) -> Option<u32> {
        self.windows
            .iter()
            .find(|w| {
                w.days.get(weekday).copied().unwrap_or(false)
                    && (w.start_minute..w.end_minute).contains(&minute)
            })
            .map_or(self.default_mbit, |w| w.limit_mbit)
    }

    /// The limit now, in the appliance's local time zone (`TZ`, else `/etc/localtime`, else UTC).
    pub fn limit_now(&self) -> Option<u32> {
        if self.windows.is_empty() {
            return self.default_mbit;
        }
        let now = jiff::ZonedDateTime::now();
        let weekday = now.weekday().to_monday_zero_offset() as usize;
        let minute = now.hour() as u16 * 60 + now.minute() as u16;
        self.limit_at(weekday, minute)
    }

    /// Never limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.default_mbit.is_none() && self.windows.iter().all(|w| w.limit_mbit.is_none())
    }
}

/// The shared token bucket of one machine's connections.
pub struct Throttle {
    pub name: String,
    schedule: Schedule,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    last: Instant,
    /// Bytes per second; None: unlimited.
    rate: Option<f64>,
    mbit: Option<u32>,
    /// When the schedule was last looked at (it is asked again after a second).
    checked: Option<Instant>,
}

/// Writes are let through in pieces of at most this much when limited.
const PIECE: f64 = 16.0 * 1024.0;
/// The bucket holds at most this much time's worth of traffic.
const BURST: Duration = Duration::from_millis(100);

impl Throttle {
    pub fn new(name: &str, schedule: Schedule) -> Arc<Throttle> {
        Arc::new(Throttle {
            name: name.to_string(),
            schedule,
            bucket: Mutex::new(Bucket {
                tokens: 0.0,
                last: Instant::now(),
                rate: None,
                mbit: None,
                checked: None,
            }),
        })
    }

    /// The limit in force now, megabits per second (None: unlimited).
    pub fn limit_mbit(&self) -> Option<u32> {
        let mut b = self.bucket.lock().expect("throttle lock");
        self.refresh(&mut b, Instant::now());
        b.mbit
    }

    fn refresh(&self, b: &mut Bucket, now: Instant) {
        if b.checked
            .is_some_and(|c| now.duration_since(c) < Duration::from_secs(1))
        {
            return;
        }
        b.checked = Some(now);
        let mbit = self.schedule.limit_now();
        if mbit != b.mbit {
            tracing::info!(machine = %self.name, limit_mbit = ?mbit, "bandwidth limit now in force");
            b.mbit = mbit;
            b.rate = mbit.map(|m| f64::from(m) * 1e6 / 8.0);
            b.tokens = b.tokens.min(burst(b.rate));
        }
    }

    /// Let up to `want` bytes through now: `Ok(n)` (n >= 1, taken from the bucket), or how long
    /// to wait before asking again.
    fn take(&self, want: usize) -> Result<usize, Duration> {
        let now = Instant::now();
        let mut b = self.bucket.lock().expect("throttle lock");
        self.refresh(&mut b, now);
        let Some(rate) = b.rate else {
            return Ok(want);
        };
        let cap = burst(Some(rate));
        b.tokens = (b.tokens + rate * now.duration_since(b.last).as_secs_f64()).min(cap);
        b.last = now;
        let need = (want as f64).min(PIECE).min(cap);
        if b.tokens >= need {
            let n = (b.tokens.floor() as usize).min(want).max(1);
            b.tokens -= n as f64;
            Ok(n)
        } else {
            Err(Duration::from_secs_f64((need - b.tokens) / rate).max(Duration::from_millis(1)))
        }
    }

    /// Bytes taken but not written.
    fn give_back(&self, n: usize) {
        if n > 0 {
            let mut b = self.bucket.lock().expect("throttle lock");
            if let Some(rate) = b.rate {
                b.tokens = (b.tokens + n as f64).min(burst(Some(rate)));
            }
        }
    }
}

fn burst(rate: Option<f64>) -> f64 {
    rate.map_or(f64::INFINITY, |r| (r * BURST.as_secs_f64()).max(PIECE))
}

/// A stream whose writes draw from a [`Throttle`] (reads are not limited: they are the master
/// target's small acknowledgements).
pub struct Throttled<S> {
    inner: S,
    throttle: Option<Arc<Throttle>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Throttled<S> {
    pub fn new(inner: S, throttle: Option<Arc<Throttle>>) -> Throttled<S> {
        Throttled {
            inner,
            throttle,
            sleep: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let Some(t) = me.throttle.clone() else {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        };
        if buf.is_empty() {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        loop {
            if let Some(s) = me.sleep.as_mut() {
                ready!(s.as_mut().poll(cx));
                me.sleep = None;
            }
            match t.take(buf.len()) {
                Ok(n) => {
                    let r = Pin::new(&mut me.inner).poll_write(cx, &buf[..n]);
                    match &r {
                        Poll::Ready(Ok(k)) => t.give_back(n - k),
                        _ => t.give_back(n),
                    }
                    return r;
                }
                Err(wait) => me.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn office_hours() -> Schedule {
        Schedule {
            default_mbit: None,
            windows: vec![
                Window {
                    days: [true, true, true, true, true, false, false],
                    start_minute: 8 * 60,
                    end_minute: 18 * 60,
                    limit_mbit: Some(20),
                },
                Window {
                    days: [true; 7],
                    start_minute: 0,
                    end_minute: 1440,
                    limit_mbit: Some(200),
                },
            ],
        }
    }

    #[test]
    fn the_first_window_holding_the_moment_decides_else_the_default() {
        let s = office_hours();
        assert_eq!(s.limit_at(0, 8 * 60), Some(20)); // Monday 08:00
        assert_eq!(s.limit_at(4, 18 * 60 - 1), Some(20)); // Friday 17:59
        assert_eq!(s.limit_at(4, 18 * 60), Some(200)); // Friday 18:00: the second window
        assert_eq!(s.limit_at(5, 9 * 60), Some(200)); // Saturday
        let s = Schedule {
            default_mbit: Some(50),
            windows: vec![Window {
                days: [false, false, false, false, false, true, true],
                start_minute: 0,
                end_minute: 1440,
                limit_mbit: None,
            }],
        };
        assert_eq!(s.limit_at(2, 600), Some(50));
        assert_eq!(s.limit_at(6, 600), None); // unlimited on Sundays
        assert!(!s.is_unlimited());
        assert!(Schedule::default().is_unlimited());
    }

    /// Bytes through a limited stream arrive no faster than the limit (plus one burst).
    #[tokio::test(flavor = "current_thread")]
    async fn a_limited_stream_delivers_at_the_limit() {
        let t = Throttle::new(
            "m",
            Schedule {
                default_mbit: Some(16), // 2 MB/s
                windows: Vec::new(),
            },
        );
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Throttled::new(a, Some(t.clone()));
        let total = 1_000_000usize;
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            let data = vec![7u8; total];
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let took = started.elapsed().as_secs_f64();
        assert_eq!(got.len(), total);
        // 1 MB at 2 MB/s: at least 0.5 s less the 0.1 s burst the bucket may hold.
        assert!(
            took >= 0.4,
            "1 MB went through a 16 Mbit/s limit in {took:.2} s"
        );
        assert_eq!(t.limit_mbit(), Some(16));
        // Unlimited: no throttle at all.
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Throttled::new(a, None);
        w.write_all(&[1u8; 1000]).await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1000);
    }
}
