//! The appliance's uplink: one bandwidth budget (`ferry process-server --uplink-mbit N`) that
//! every protected machine's replication shares, by priority, as Zerto's VPG priority does.
//!
//! When the uplink is the bottleneck, the machines with data waiting divide it by weight: 4 for
//! `high`, 2 for `medium`, 1 for `low`. High-priority machines keep their RPO through a busy
//! period, and a low-priority one still gets a fifth of the uplink against one high-priority
//! machine (a seventh against a high and a medium one): it falls behind but is never starved.
//! Weights rather than strict priority because strict priority starves: a high-priority
//! machine seeding a large disk would stop every other machine's replication for hours.
//! Doubling per level keeps the difference plain to see in `ferry status`.
//!
//! The division is start-time fair queueing (SFQ) over one token bucket: each machine has a
//! tag, the bytes it was let through divided by its weight, and of the machines with a stream
//! waiting, the one with the smallest tag has the turn (a tie goes to the higher weight).
//! Bytes are let through in grants of at most [`MAX_GRANT`]. A machine that had nothing to
//! send starts again at the tag of the newest grant, so idleness earns no credit to burst
//! with later. The sharing is work-conserving: a machine with nothing waiting, or one held by
//! its own policy limit (which is checked before its turn is asked for), takes no turn, and
//! the others use its share at once.
//!
//! Streams not having the turn are parked with their waker and woken when their machine's turn
//! comes; no stream polls. Memory: one entry per machine, one waiter per stream of the machine.

use crate::throttle::{Bucket, Take};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

/// A machine's weight in the uplink.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    #[default]
    Medium,
    Low,
}

impl Priority {
    pub fn weight(self) -> u32 {
        match self {
            Priority::High => 4,
            Priority::Medium => 2,
            Priority::Low => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Medium => "medium",
            Priority::Low => "low",
        }
    }
}

impl std::fmt::Display for Priority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Priority, String> {
        match s {
            "high" => Ok(Priority::High),
            "medium" => Ok(Priority::Medium),
            "low" => Ok(Priority::Low),
            _ => Err(format!("unknown priority {s:?} (known: high, medium, low)")),
        }
    }
}

/// A machine is let through at most this much at once while it has the turn, so a
/// higher-priority machine that starts sending waits for at most one grant of another.
const MAX_GRANT: usize = 64 * 1024;
/// A waiter not heard from for this long is forgotten (its writer went away without dropping
/// the stream). Longer than any wait for tokens: a piece at 1 Mbit/s takes 131 ms.
const STALE: Duration = Duration::from_secs(1);
/// A machine counts as active (in the shares `ferry status` shows) this long after it last
/// sent or waited.
const ACTIVE: Duration = Duration::from_secs(1);

/// The appliance's uplink budget, shared by the machines' connections.
pub struct Uplink {
    mbit: u32,
    sched: Mutex<Sched>,
}

/// A machine's place in the uplink, for the status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Share {
    /// The uplink's budget, megabits per second.
    pub uplink_mbit: u32,
    /// The fraction of the uplink the machine's weight entitles it to against the machines
    /// active now (sending, or waiting to, within the last second): what it gets while they
    /// all have data waiting.
    pub fraction: f64,
    /// What the machine sent through the uplink over about the last second, Mbit/s.
    pub rate_mbit: f64,
    /// Bytes the machine sent through the uplink since the process server started (TLS
    /// records included).
    pub sent_bytes: u64,
    /// When these figures were taken (Unix time, ns).
    pub at_unix_ns: u64,
}

impl Uplink {
    pub fn new(mbit: u32) -> Arc<Uplink> {
        Arc::new(Uplink {
            mbit,
            sched: Mutex::new(Sched::new(f64::from(mbit) * 1e6 / 8.0, Instant::now())),
        })
    }

    pub fn mbit(&self) -> u32 {
        self.mbit
    }

    /// The machine's place (made on first use).
    pub(crate) fn join(&self, name: &str, priority: Priority) -> usize {
        self.lock().join(name, priority, Instant::now())
    }

    pub(crate) fn take(
        &self,
        member: usize,
        stream: u64,
        want: usize,
        waker: &Waker,
        now: Instant,
    ) -> Take {
        let (t, wake) = self.lock().take(member, stream, want, waker, now);
        wake.into_iter().for_each(Waker::wake);
        t
    }

    pub(crate) fn give_back(&self, member: usize, n: usize) {
        self.lock().give_back(member, n);
    }

    pub(crate) fn leave(&self, member: usize, stream: u64) {
        let wake = self.lock().leave(member, stream);
        wake.into_iter().for_each(Waker::wake);
    }

    pub(crate) fn share(&self, member: usize, now: Instant) -> Share {
        let (fraction, rate_mbit, sent_bytes) = self.lock().share(member, now);
        Share {
            uplink_mbit: self.mbit,
            fraction,
            rate_mbit,
            sent_bytes,
            at_unix_ns: crate::status::now_unix_ns(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().expect("uplink lock")
    }
}

/// The scheduling itself, with the time passed in (so tests can run it on a made-up clock).
pub(crate) struct Sched {
    bucket: Bucket,
    members: Vec<Member>,
    /// SFQ's virtual time: the start tag of the newest grant.
    clock: f64,
}

struct Member {
    name: String,
    weight: f64,
    /// Bytes let through divided by the weight (the finish tag of its newest grant).
    tag: f64,
    waiters: Vec<Waiter>,
    sent: u64,
    /// The last time it sent or waited.
    active: Option<Instant>,
    /// The rate meter: `sent` at `meter_at`, and the rate measured then.
    meter_at: Instant,
    meter_sent: u64,
    rate_mbit: f64,
}

struct Waiter {
    stream: u64,
    waker: Waker,
    seen: Instant,
}

impl Sched {
    pub(crate) fn new(bytes_per_sec: f64, now: Instant) -> Sched {
        Sched {
            bucket: Bucket::new(Some(bytes_per_sec), now),
            members: Vec::new(),
            clock: 0.0,
        }
    }

    pub(crate) fn join(&mut self, name: &str, priority: Priority, now: Instant) -> usize {
        if let Some(i) = self.members.iter().position(|m| m.name == name) {
            return i;
        }
        self.members.push(Member {
            name: name.to_string(),
            weight: f64::from(priority.weight()),
            tag: self.clock,
            waiters: Vec::new(),
            sent: 0,
            active: None,
            meter_at: now,
            meter_sent: 0,
            rate_mbit: 0.0,
        });
        self.members.len() - 1
    }

    /// Stream `stream` of machine `m` wants to write `want` bytes. Returns what it may do, and
    /// the wakers of streams whose turn it is now.
    pub(crate) fn take(
        &mut self,
        m: usize,
        stream: u64,
        want: usize,
        waker: &Waker,
        now: Instant,
    ) -> (Take, Vec<Waker>) {
        self.forget_stale(now);
        let clock = self.clock;
        let me = &mut self.members[m];
        if me.waiters.is_empty() {
            // Back from idleness: no credit for the time it sent nothing.
            me.tag = me.tag.max(clock);
        }
        match me.waiters.iter_mut().find(|w| w.stream == stream) {
            Some(w) => {
                if !w.waker.will_wake(waker) {
                    w.waker = waker.clone();
                }
                w.seen = now;
            }
            None => me.waiters.push(Waiter {
                stream,
                waker: waker.clone(),
                seen: now,
            }),
        }
        me.active = Some(now);
        if self.turn() != Some(m) {
            return (Take::Parked, Vec::new());
        }
        match self.bucket.available(want, MAX_GRANT, now) {
            Err(wait) => (Take::Wait(wait), Vec::new()),
            Ok(n) => {
                self.bucket.take(n);
                let me = &mut self.members[m];
                me.waiters.retain(|w| w.stream != stream);
                self.clock = me.tag;
                me.tag += n as f64 / me.weight;
                me.sent += n as u64;
                (Take::Go(n), self.wake_turn(Some(m)))
            }
        }
    }

    /// Bytes granted to machine `m` but not written.
    pub(crate) fn give_back(&mut self, m: usize, n: usize) {
        self.bucket.give_back(n);
        let me = &mut self.members[m];
        me.tag -= n as f64 / me.weight;
        me.sent = me.sent.saturating_sub(n as u64);
    }

    /// Stream `stream` of machine `m` waits no more (gone, or held by its machine's own limit).
    pub(crate) fn leave(&mut self, m: usize, stream: u64) -> Vec<Waker> {
        let before = self.turn();
        self.members[m].waiters.retain(|w| w.stream != stream);
        if self.turn() == before {
            return Vec::new();
        }
        self.wake_turn(None)
    }

    /// The machine whose turn it is: of those with a stream waiting, the smallest tag, then
    /// the higher weight.
    fn turn(&self) -> Option<usize> {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.waiters.is_empty())
            .min_by(|(_, a), (_, b)| a.tag.total_cmp(&b.tag).then(b.weight.total_cmp(&a.weight)))
            .map(|(i, _)| i)
    }

    /// The streams to wake: those of the machine whose turn it is, unless it is `except` (its
    /// streams are not parked: the one just served comes back by itself).
    fn wake_turn(&self, except: Option<usize>) -> Vec<Waker> {
        match self.turn() {
            Some(t) if Some(t) != except => self.members[t]
                .waiters
                .iter()
                .map(|w| w.waker.clone())
                .collect(),
            _ => Vec::new(),
        }
    }

    fn forget_stale(&mut self, now: Instant) {
        for m in &mut self.members {
            m.waiters
                .retain(|w| now.saturating_duration_since(w.seen) < STALE);
        }
    }

    /// Machine `m`'s entitled fraction, its rate over about the last second (Mbit/s), and
    /// its bytes sent.
    pub(crate) fn share(&mut self, m: usize, now: Instant) -> (f64, f64, u64) {
        let active = |x: &Member| {
            !x.waiters.is_empty()
                || x.active
                    .is_some_and(|a| now.saturating_duration_since(a) < ACTIVE)
        };
        let me = &self.members[m];
        let others: f64 = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, x)| *i != m && active(x))
            .map(|(_, x)| x.weight)
            .sum();
        let fraction = me.weight / (me.weight + others);
        let me = &mut self.members[m];
        let secs = now.saturating_duration_since(me.meter_at).as_secs_f64();
        if secs >= 1.0 {
            me.rate_mbit = (me.sent - me.meter_sent.min(me.sent)) as f64 * 8.0 / secs / 1e6;
            me.meter_at = now;
            me.meter_sent = me.sent;
        }
        (fraction, me.rate_mbit, me.sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn waker() -> (Waker, Arc<Count>) {
        let c = Arc::new(Count(Default::default()));
        (Waker::from(c.clone()), c)
    }

    /// Run the machines (priority, the bytes per second their own limit allows, when they start
    /// having data waiting) on a made-up clock for `secs`, one stream each, every stream
    /// asking again as soon as it may; returns the bytes each sent.
    fn simulate(
        uplink: f64,
        machines: &[(Priority, Option<f64>, Option<f64>)],
        secs: f64,
    ) -> Vec<u64> {
        let t0 = Instant::now();
        let mut s = Sched::new(uplink, t0);
        let mut own: Vec<Bucket> = machines.iter().map(|m| Bucket::new(m.1, t0)).collect();
        let ids: Vec<usize> = machines
            .iter()
            .enumerate()
            .map(|(i, m)| s.join(&format!("m{i}"), m.0, t0))
            .collect();
        let (w, _) = waker();
        // Each stream's next moment to ask (None: parked until woken).
        let mut next: Vec<Option<f64>> = machines.iter().map(|m| m.2).collect();
        let mut sent = vec![0u64; machines.len()];
        let mut clock = 0.0;
        while clock < secs {
            // The stream due first asks; a parked one asks when the one served passes the turn.
            let Some((i, at)) = next
                .iter()
                .enumerate()
                .filter_map(|(i, t)| t.map(|t| (i, t)))
                .min_by(|a, b| a.1.total_cmp(&b.1))
            else {
                break;
            };
            clock = at;
            let now = t0 + Duration::from_secs_f64(clock);
            let allowed = match own[i].available(MAX_GRANT, usize::MAX, now) {
                Ok(n) => n,
                Err(d) => {
                    for wk in s.leave(ids[i], i as u64) {
                        drop(wk);
                    }
                    wake_parked(&s, &mut next, clock);
                    next[i] = Some(clock + d.as_secs_f64());
                    continue;
                }
            };
            match s.take(ids[i], i as u64, allowed, &w, now).0 {
                Take::Go(n) => {
                    own[i].take(n);
                    sent[i] += n as u64;
                    next[i] = Some(clock);
                    wake_parked(&s, &mut next, clock);
                }
                Take::Wait(d) => next[i] = Some(clock + d.as_secs_f64()),
                Take::Parked => next[i] = None,
            }
        }
        sent
    }

    /// The machine whose turn it is, if parked, asks now.
    fn wake_parked(s: &Sched, next: &mut [Option<f64>], clock: f64) {
        if let Some(t) = s.turn() {
            let stream = s.members[t].waiters[0].stream as usize;
            if next[stream].is_none() {
                next[stream] = Some(clock);
            }
        }
    }

    const MB: f64 = 1e6;

    #[test]
    fn backlogged_machines_share_the_uplink_by_weight() {
        use Priority::*;
        // 2 MB/s for 10 s: 20 MB in all.
        let sent = simulate(
            2.0 * MB,
            &[(High, None, Some(0.0)), (Low, None, Some(0.0))],
            10.0,
        );
        let total: u64 = sent.iter().sum();
        assert!(
            (19.5 * MB..=20.5 * MB).contains(&(total as f64)),
            "{sent:?}"
        );
        let ratio = sent[0] as f64 / sent[1] as f64;
        assert!(
            (3.8..=4.2).contains(&ratio),
            "high:low = {ratio} ({sent:?})"
        );
        let sent = simulate(
            7.0 * MB,
            &[
                (High, None, Some(0.0)),
                (Medium, None, Some(0.0)),
                (Low, None, Some(0.0)),
            ],
            10.0,
        );
        let low = sent[2] as f64;
        assert!((3.8..=4.2).contains(&(sent[0] as f64 / low)), "{sent:?}");
        assert!((1.9..=2.1).contains(&(sent[1] as f64 / low)), "{sent:?}");
        // Equal priorities: equal shares.
        let sent = simulate(
            2.0 * MB,
            &[(Low, None, Some(0.0)), (Low, None, Some(0.0))],
            5.0,
        );
        let ratio = sent[0] as f64 / sent[1] as f64;
        assert!((0.95..=1.05).contains(&ratio), "{sent:?}");
    }

    #[test]
    fn a_share_left_unused_goes_to_the_others() {
        use Priority::*;
        // The high-priority machine has nothing to send: the low one gets the whole uplink.
        let sent = simulate(2.0 * MB, &[(High, None, None), (Low, None, Some(0.0))], 5.0);
        assert_eq!(sent[0], 0);
        assert!(sent[1] as f64 >= 9.8 * MB, "{sent:?}");
        // The high-priority machine's own policy holds it at 0.5 MB/s: it gets that, and the
        // low one the remaining 1.5 MB/s, not the fifth its weight alone would give it.
        let sent = simulate(
            2.0 * MB,
            &[(High, Some(0.5 * MB), Some(0.0)), (Low, None, Some(0.0))],
            10.0,
        );
        assert!(
            (4.8 * MB..=5.2 * MB).contains(&(sent[0] as f64)),
            "{sent:?}"
        );
        assert!(sent[1] as f64 >= 14.5 * MB, "{sent:?}");
    }

    #[test]
    fn idleness_earns_no_credit() {
        use Priority::*;
        // The low machine alone for 5 s, then the high one too for 5 s: the high one gets 4/5
        // of those 5 s (8 MB), not all of them as it would if its 5 s of silence counted.
        let sent = simulate(
            2.0 * MB,
            &[(High, None, Some(5.0)), (Low, None, Some(0.0))],
            10.0,
        );
        assert!(
            (7.6 * MB..=8.4 * MB).contains(&(sent[0] as f64)),
            "{sent:?}"
        );
        assert!(sent[1] as f64 >= 11.5 * MB, "{sent:?}");
    }

    #[test]
    fn a_parked_stream_is_woken_when_its_turn_comes_and_a_silent_one_is_forgotten() {
        use Priority::*;
        let t0 = Instant::now();
        let mut s = Sched::new(1.0 * MB, t0);
        let (hi, lo) = (s.join("hi", High, t0), s.join("lo", Low, t0));
        let (wh, _) = waker();
        let (wl, woken) = waker();
        // No tokens yet: the high machine has the turn and waits for them; the low one parks.
        assert!(matches!(s.take(hi, 1, 1000, &wh, t0).0, Take::Wait(_)));
        assert_eq!(s.take(lo, 2, 1000, &wl, t0).0, Take::Parked);
        // The high stream goes away: the turn passes and the low stream is woken.
        let wake = s.leave(hi, 1);
        assert_eq!(wake.len(), 1);
        wake.into_iter().for_each(Waker::wake);
        assert_eq!(woken.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        let t1 = t0 + Duration::from_millis(100);
        assert!(matches!(s.take(lo, 2, 1000, &wl, t1).0, Take::Go(_)));
        // A high stream that waits for tokens and is never heard from again holds the turn
        // only until it is stale.
        let mut s = Sched::new(1.0 * MB, t1);
        let (hi, lo) = (s.join("hi", High, t1), s.join("lo", Low, t1));
        assert!(matches!(s.take(hi, 3, 1000, &wh, t1).0, Take::Wait(_)));
        assert_eq!(s.take(lo, 2, 1000, &wl, t1).0, Take::Parked);
        let t2 = t1 + STALE / 2;
        assert_eq!(s.take(lo, 2, 1000, &wl, t2).0, Take::Parked);
        let later = t1 + STALE + Duration::from_millis(1);
        assert!(matches!(s.take(lo, 2, 1000, &wl, later).0, Take::Go(_)));
        // The status: the low machine's fraction against the active high one, and alone.
        let (f, _, sent) = s.share(lo, later);
        assert!(sent >= 1000);
        assert!((f - 1.0).abs() < 1e-9, "{f}");
        let _ = s.take(hi, 4, 1000, &wh, later);
        let (f, _, _) = s.share(lo, later);
        assert!((f - 0.2).abs() < 1e-9, "{f}");
    }
}
