//! Bandwidth limits on the replication link. A machine's policy caps what its disks send to the
//! master target, in megabits per second on the wire (TLS records included), with weekly
//! windows that have their own limit (e.g. 20 Mbit/s on weekdays from 8:00 to 18:00, unlimited
//! at night), evaluated in the appliance's local time zone.
//!
//! Every connection of the machine's disks (continuous shipping, periodic cycles, seeds and
//! resyncs) draws from one token bucket, so the limit holds for the machine as a whole however
//! many of its disks are sending. What a connection draws is what crosses the WAN in bulk: the
//! writes of a replication connection, and also the reads of the resync of reprotect and
//! failback, whose blocks come from the master target ([`Throttled::both_ways`]). The bucket holds at most a tenth of a second of traffic, so a
//! pause is not followed by a burst the WAN link would queue.
//!
//! Above the machines' own limits, the appliance may have an uplink budget that all machines
//! share by priority ([`crate::uplink`]): a write then needs its machine's own tokens first,
//! then its machine's turn in the uplink.

use crate::uplink::{Priority, Share, Uplink};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
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

/// The shared token bucket of one machine's connections, and the machine's place in the
/// appliance's uplink when there is one ([`Uplink`]).
pub struct Throttle {
    pub name: String,
    pub priority: Priority,
    schedule: Schedule,
    limit: Mutex<Limit>,
    uplink: Option<(Arc<Uplink>, usize)>,
}

/// The machine's own limit: its bucket at the rate its schedule sets now.
struct Limit {
    bucket: Bucket,
    mbit: Option<u32>,
    /// When the schedule was last looked at (it is asked again after a second).
    checked: Option<Instant>,
}

/// A token bucket: `rate` bytes per second, holding at most [`BURST`] of it. The machines' own
/// limits and the appliance's uplink are each one.
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
    /// Bytes per second; None: unlimited.
    rate: Option<f64>,
}

/// Writes are let through in pieces of at most this much when limited.
const PIECE: f64 = 16.0 * 1024.0;
/// The bucket holds at most this much time's worth of traffic.
const BURST: Duration = Duration::from_millis(100);
/// A stream waiting for its machine's turn in the uplink asks again after this long even if
/// nobody woke it (in case the stream whose turn it was went away without a word).
const PARKED: Duration = Duration::from_millis(250);

impl Bucket {
    /// Empty at `now`, filling from then on.
    pub(crate) fn new(rate: Option<f64>, now: Instant) -> Bucket {
        Bucket {
            tokens: 0.0,
            last: now,
            rate,
        }
    }

    fn set_rate(&mut self, rate: Option<f64>) {
        self.rate = rate;
        self.tokens = self.tokens.min(burst(rate));
    }

    /// How much of `want` may go now (at most `max`), without taking it; or how long to wait
    /// until at least a piece may.
    pub(crate) fn available(
        &mut self,
        want: usize,
        max: usize,
        now: Instant,
    ) -> Result<usize, Duration> {
        let Some(rate) = self.rate else {
            return Ok(want.min(max));
        };
        let cap = burst(Some(rate));
        self.tokens = (self.tokens + rate * now.duration_since(self.last).as_secs_f64()).min(cap);
        self.last = now.max(self.last);
        let need = (want as f64).min(PIECE).min(cap);
        if self.tokens >= need {
            Ok((self.tokens.floor() as usize).min(want).min(max).max(1))
        } else {
            Err(Duration::from_secs_f64((need - self.tokens) / rate).max(Duration::from_millis(1)))
        }
    }

    /// Take `n` bytes' worth (after [`Bucket::available`] allowed them).
    pub(crate) fn take(&mut self, n: usize) {
        if self.rate.is_some() {
            self.tokens -= n as f64;
        }
    }

    /// Bytes taken but not written.
    pub(crate) fn give_back(&mut self, n: usize) {
        if let Some(rate) = self.rate {
            self.tokens = (self.tokens + n as f64).min(burst(Some(rate)));
        }
    }
}

/// What a stream may do now.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Write this many bytes (taken from the buckets).
    Go(usize),
    /// Wait this long for tokens, then ask again.
    Wait(Duration),
    /// Another machine's turn in the uplink: the waker is called when it may be ours.
    Parked,
}

impl Throttle {
    /// A machine's limit alone (no uplink shared with other machines).
    pub fn new(name: &str, schedule: Schedule) -> Arc<Throttle> {
        Throttle::build(name, schedule, Priority::default(), None)
    }

    /// A machine's limit, and its share of `uplink` by `priority`.
    pub fn sharing(
        name: &str,
        schedule: Schedule,
        priority: Priority,
        uplink: &Arc<Uplink>,
    ) -> Arc<Throttle> {
        let member = uplink.join(name, priority);
        Throttle::build(name, schedule, priority, Some((uplink.clone(), member)))
    }

    fn build(
        name: &str,
        schedule: Schedule,
        priority: Priority,
        uplink: Option<(Arc<Uplink>, usize)>,
    ) -> Arc<Throttle> {
        Arc::new(Throttle {
            name: name.to_string(),
            priority,
            schedule,
            limit: Mutex::new(Limit {
                bucket: Bucket::new(None, Instant::now()),
                mbit: None,
                checked: None,
            }),
            uplink,
        })
    }

    /// The limit in force now, megabits per second (None: unlimited).
    pub fn limit_mbit(&self) -> Option<u32> {
        let mut l = self.limit.lock().expect("throttle lock");
        self.refresh(&mut l, Instant::now());
        l.mbit
    }

    /// The machine's place in the appliance's uplink now, if it shares one.
    pub fn share(&self) -> Option<Share> {
        self.uplink
            .as_ref()
            .map(|(u, m)| u.share(*m, Instant::now()))
    }

    fn refresh(&self, l: &mut Limit, now: Instant) {
        if l.checked
            .is_some_and(|c| now.duration_since(c) < Duration::from_secs(1))
        {
            return;
        }
        l.checked = Some(now);
        let mbit = self.schedule.limit_now();
        if mbit != l.mbit {
            tracing::info!(machine = %self.name, limit_mbit = ?mbit, "bandwidth limit now in force");
            l.mbit = mbit;
            l.bucket.set_rate(mbit.map(|m| f64::from(m) * 1e6 / 8.0));
        }
    }

    /// Let up to `want` bytes of `stream` through now: the machine's own limit first, then
    /// its turn in the uplink.
    pub(crate) fn take(&self, stream: u64, want: usize, waker: &Waker) -> Take {
        let now = Instant::now();
        let mut l = self.limit.lock().expect("throttle lock");
        self.refresh(&mut l, now);
        let allowed = match l.bucket.available(want, usize::MAX, now) {
            Ok(n) => n,
            Err(wait) => {
                // Waiting on its own limit, the machine does not hold the uplink's turn.
                if let Some((u, m)) = &self.uplink {
                    u.leave(*m, stream);
                }
                return Take::Wait(wait);
            }
        };
        let t = match &self.uplink {
            None => Take::Go(allowed),
            Some((u, m)) => u.take(*m, stream, allowed, waker, now),
        };
        if let Take::Go(n) = t {
            l.bucket.take(n);
        }
        t
    }

    /// Bytes taken but not written.
    fn give_back(&self, n: usize) {
        if n > 0 {
            self.limit
                .lock()
                .expect("throttle lock")
                .bucket
                .give_back(n);
            if let Some((u, m)) = &self.uplink {
                u.give_back(*m, n);
            }
        }
    }

    /// `stream` is gone: it waits for nothing any more.
    fn leave(&self, stream: u64) {
        if let Some((u, m)) = &self.uplink {
            u.leave(*m, stream);
        }
    }
}

/// One throttle per machine, by disk name. `disks` are (disk, machine, priority): a machine's
/// disks share its throttle, whose schedule is the machine's in `schedules` (none: unlimited)
/// and which draws on `uplink` by its priority. Without an uplink, only machines with a limit
/// get one. The disks of one machine must name one priority.
pub fn by_disk(
    disks: &[(String, String, Priority)],
    schedules: &HashMap<String, Schedule>,
    uplink: Option<&Arc<Uplink>>,
) -> Result<HashMap<String, Arc<Throttle>>, String> {
    let mut machines: HashMap<&str, Arc<Throttle>> = HashMap::new();
    let mut out = HashMap::new();
    for (disk, machine, priority) in disks {
        let schedule = schedules.get(machine).cloned().unwrap_or_default();
        if uplink.is_none() && schedule.is_unlimited() {
            continue;
        }
        let t = machines.entry(machine).or_insert_with(|| match uplink {
            Some(u) => Throttle::sharing(machine, schedule, *priority, u),
            None => Throttle::build(machine, schedule, *priority, None),
        });
        if t.priority != *priority {
            return Err(format!(
                "disk {disk} has priority {priority}, but another disk of machine {machine} has {}: a machine has one priority",
                t.priority
            ));
        }
        out.insert(disk.clone(), t.clone());
    }
    Ok(out)
}

fn burst(rate: Option<f64>) -> f64 {
    rate.map_or(f64::INFINITY, |r| (r * BURST.as_secs_f64()).max(PIECE))
}

/// Streams are told apart in the uplink's queue by a number of their own.
static STREAMS: AtomicU64 = AtomicU64::new(1);

/// A stream whose writes draw from a [`Throttle`]; its reads too when made with
/// [`Throttled::both_ways`]. A replication connection limits only its writes (its reads are the
/// master target's small acknowledgements); a resync connection, whose bulk comes from the
/// master target, limits its reads as well: a read lets through only what the bucket holds, and
/// while it is empty the stream is not read at all, so TCP's window slows the sender down.
pub struct Throttled<S> {
    inner: S,
    throttle: Option<Arc<Throttle>>,
    write: Gate,
    /// None: reads are not limited.
    read: Option<Gate>,
}

/// One direction's place in its throttle. The two directions of a stream wait apart (each
/// with its own timers and its own place in the uplink's queue): a split stream's reader and
/// writer are polled by different tasks, and a timer or a queue entry keeps one waker only.
struct Gate {
    id: u64,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    parked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            id: STREAMS.fetch_add(1, Ordering::Relaxed),
            sleep: None,
            parked: None,
        }
    }

    /// Wait until `t` lets some of `want` bytes through; how many it let (taken from its
    /// buckets: what is not used goes back with [`Throttle::give_back`]).
    fn poll_take(&mut self, t: &Throttle, cx: &mut Context<'_>, want: usize) -> Poll<usize> {
        loop {
            if let Some(s) = self.sleep.as_mut() {
                ready!(s.as_mut().poll(cx));
                self.sleep = None;
            }
            match t.take(self.id, want, cx.waker()) {
                Take::Go(n) => {
                    self.parked = None;
                    return Poll::Ready(n);
                }
                Take::Wait(wait) => {
                    self.parked = None;
                    self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                }
                Take::Parked => {
                    let p = self
                        .parked
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(PARKED)));
                    ready!(p.as_mut().poll(cx));
                    self.parked = None;
                }
            }
        }
    }
}

impl<S> Throttled<S> {
    /// Writes limited by `throttle` (None: nothing is limited).
    pub fn new(inner: S, throttle: Option<Arc<Throttle>>) -> Throttled<S> {
        Throttled {
            inner,
            throttle,
            write: Gate::new(),
            read: None,
        }
    }

    /// Reads and writes limited by `throttle`, drawing from its one bucket (None: nothing is
    /// limited, and nothing is paid for it).
    pub fn both_ways(inner: S, throttle: Option<Arc<Throttle>>) -> Throttled<S> {
        Throttled {
            inner,
            read: throttle.as_ref().map(|_| Gate::new()),
            throttle,
            write: Gate::new(),
        }
    }
}

impl<S> Drop for Throttled<S> {
    fn drop(&mut self) {
        if let Some(t) = &self.throttle {
            t.leave(self.write.id);
            if let Some(r) = &self.read {
                t.leave(r.id);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Throttled<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let (Some(t), Some(gate)) = (me.throttle.as_ref(), me.read.as_mut()) else {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        };
        if buf.remaining() == 0 {
            return Pin::new(&mut me.inner).poll_read(cx, buf);
        }
        // Tokens first, then at most that much is read; what did not come goes back.
        let n = ready!(gate.poll_take(t, cx, buf.remaining()));
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(n));
        let r = Pin::new(&mut me.inner).poll_read(cx, &mut part);
        let got = match r {
            Poll::Ready(Ok(())) => part.filled().len(),
            _ => 0,
        };
        t.give_back(n - got);
        buf.advance(got);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Throttled<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let Some(t) = me.throttle.as_ref() else {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        };
        if buf.is_empty() {
            return Pin::new(&mut me.inner).poll_write(cx, buf);
        }
        let n = ready!(me.write.poll_take(t, cx, buf.len()));
        let r = Pin::new(&mut me.inner).poll_write(cx, &buf[..n]);
        match &r {
            Poll::Ready(Ok(k)) => t.give_back(n - k),
            _ => t.give_back(n),
        }
        r
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

    /// A machine's throttle with a flat limit.
    fn limited(mbit: u32) -> Arc<Throttle> {
        Throttle::new(
            "m",
            Schedule {
                default_mbit: Some(mbit),
                windows: Vec::new(),
            },
        )
    }

    /// Bytes through a limited stream arrive no faster than the limit (plus one burst).
    #[tokio::test(flavor = "current_thread")]
    async fn a_limited_stream_delivers_at_the_limit() {
        let t = limited(16); // 2 MB/s
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

    /// A resync connection's reads: bytes read from a stream limited both ways come no faster
    /// than the limit (plus one burst), while the sender has them all at once; and the reads
    /// and writes of one machine draw from its one bucket. Unlimited, reads are not slowed.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_limited_both_ways_reads_at_the_limit() {
        let t = limited(16); // 2 MB/s
        let total = 1_000_000usize;
        let (a, mut b) = tokio::io::duplex(1 << 21);
        // The sender is not limited: everything is in the pipe before the first read.
        b.write_all(&vec![7u8; total]).await.unwrap();
        b.shutdown().await.unwrap();
        let mut r = Throttled::both_ways(a, Some(t.clone()));
        let started = Instant::now();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        let took = started.elapsed().as_secs_f64();
        assert_eq!(got.len(), total);
        // 1 MB at 2 MB/s: at least 0.5 s less the 0.1 s burst the bucket may hold.
        assert!(
            took >= 0.4,
            "1 MB was read through a 16 Mbit/s limit in {took:.2} s"
        );
        assert!(
            took < 1.5,
            "1 MB was read through a 16 Mbit/s limit in {took:.2} s"
        );

        // Another connection of the machine, reading and writing at once: together no
        // faster than the one limit.
        let (a, mut b) = tokio::io::duplex(1 << 21);
        b.write_all(&vec![1u8; total / 2]).await.unwrap();
        b.shutdown().await.unwrap();
        let (mut rd, mut wr) = tokio::io::split(Throttled::both_ways(a, Some(t.clone())));
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            wr.write_all(&vec![2u8; total / 2]).await.unwrap();
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let took = started.elapsed().as_secs_f64();
        assert_eq!(got.len(), total / 2);
        let mut sent = Vec::new();
        b.read_to_end(&mut sent).await.unwrap();
        assert_eq!(sent.len(), total / 2);
        assert!(
            took >= 0.4,
            "0.5 MB each way went through 16 Mbit/s in {took:.2} s"
        );

        // Writes alone limited (a replication connection): reads come at once.
        let took = read_waiting(total, |a| Throttled::new(a, Some(t))).await;
        assert!(took < 0.2, "unlimited reads took {took:.2} s");

        // Unlimited: no throttle at all, nothing slowed.
        let took = read_waiting(total, |a| Throttled::both_ways(a, None)).await;
        assert!(took < 0.2, "unlimited reads took {took:.2} s");
    }

    /// Seconds to read `total` bytes already waiting in a duplex, through the stream `wrap`
    /// makes of its end.
    async fn read_waiting(
        total: usize,
        wrap: impl FnOnce(tokio::io::DuplexStream) -> Throttled<tokio::io::DuplexStream>,
    ) -> f64 {
        let (a, mut b) = tokio::io::duplex(1 << 21);
        b.write_all(&vec![3u8; total]).await.unwrap();
        b.shutdown().await.unwrap();
        let mut r = wrap(a);
        let started = Instant::now();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), total);
        started.elapsed().as_secs_f64()
    }

    /// Two machines' streams on one uplink, both always with data waiting: the bytes that get
    /// through divide 4:1 (high:low), and together no faster than the uplink.
    #[tokio::test(flavor = "current_thread")]
    async fn streams_of_machines_sharing_an_uplink_get_their_weights() {
        use std::sync::atomic::AtomicU64;
        let uplink = Uplink::new(16); // 2 MB/s
        let counts: Vec<Arc<AtomicU64>> = (0..2).map(|_| Arc::new(AtomicU64::new(0))).collect();
        for (i, p) in [Priority::High, Priority::Low].into_iter().enumerate() {
            let t = Throttle::sharing(&format!("m{i}"), Schedule::default(), p, &uplink);
            let (a, mut b) = tokio::io::duplex(1 << 16);
            let mut w = Throttled::new(a, Some(t));
            tokio::spawn(async move {
                let data = vec![0u8; 100_000];
                while w.write_all(&data).await.is_ok() {}
            });
            let count = counts[i].clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = b.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    count.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let got: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let total = (got[0] + got[1]) as f64;
        eprintln!("in 2 s at 16 Mbit/s: high {} B, low {} B", got[0], got[1]);
        // 2 s at 2 MB/s, plus at most one burst (0.2 MB).
        assert!((3.6e6..=4.3e6).contains(&total), "{got:?}");
        let ratio = got[0] as f64 / got[1] as f64;
        assert!(
            (3.3..=4.8).contains(&ratio),
            "high:low = {ratio:.2} ({got:?})"
        );
        let share = Throttle::sharing("m1", Schedule::default(), Priority::Low, &uplink)
            .share()
            .unwrap();
        assert_eq!(share.uplink_mbit, 16);
        assert!((share.fraction - 0.2).abs() < 1e-9, "{share:?}");
    }
}
