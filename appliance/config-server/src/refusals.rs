//! Rate limits for refused clients (`docs/api.md`, "Errors" and "Audit"): every `401` and
//! `403` answer is counted against the client it went to, in a bounded in-memory table; a
//! client refused [`Limits::per_window`] times within a window gets `429 too-many-refusals`
//! (with `Retry-After`) until its window ends, before the gate does anything else (no store
//! lookup, no audit entry of its own). What those answers were is summed up in one audit entry
//! per client and window ([`Summary`]), written when the window ends.
//!
//! A client is the certificate it presented (its SHA-256; the TLS layer verified that the
//! appliance CA signed it, so there are only as many as were issued) or, without one, its
//! address (an IPv6 address by its /64, which one host usually holds whole). So an identity
//! that keeps failing does not shut out the other identities that connect from its address,
//! and enrollment tokens guessed without a certificate count against the address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals a client may get within one window before it is answered `429`.
pub const DEFAULT_PER_WINDOW: u32 = 20;
/// The window: refusals are counted per minute.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Clients tracked at once; past this, the clients whose windows ended go first, then the
/// oldest windows.
pub const MAX_CLIENTS: usize = 8192;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Refusals per window before the `429`s (0: no limit).
    pub per_window: u32,
    pub window: Duration,
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            per_window: DEFAULT_PER_WINDOW,
            window: WINDOW,
            max_clients: MAX_CLIENTS,
        }
    }
}

/// Whom refusals are counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    /// The SHA-256 of the client certificate presented.
    Certificate(String),
    /// No certificate: the peer's address (IPv6: its /64).
    Address(IpAddr),
}

impl Client {
    pub fn of(cert_sha256: Option<&str>, peer: IpAddr) -> Client {
        match cert_sha256 {
            Some(fp) => Client::Certificate(fp.to_string()),
            None => Client::Address(match peer.to_canonical() {
                IpAddr::V6(a) => {
                    let s = a.segments();
                    IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
                v4 => v4,
            }),
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Certificate(fp) => write!(f, "certificate {fp}"),
            Client::Address(a @ IpAddr::V6(_)) => write!(f, "{a}/64"),
            Client::Address(a) => write!(f, "{a}"),
        }
    }
}

struct Entry {
    started: Instant,
    started_unix: u64,
    refused: u32,
    limited: u64,
    /// The last address the client came from (for the summary).
    from: String,
}

/// The `429`s one client got in one window: one audit entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub client: Client,
    pub from: String,
    /// Refusals answered (and audited) one by one before the limit.
    pub refused: u32,
    /// Requests answered `429` since.
    pub limited: u64,
    pub since_unix: u64,
}

impl Summary {
    pub fn message(&self) -> String {
        format!(
            "{} requests refused from {} since {} UTC: after {} refusals (audited one by one), \
             {} more answered 429 too-many-refusals without being looked at",
            u64::from(self.refused) + self.limited,
            self.client,
            crate::app::format_time(self.since_unix),
            self.refused,
            self.limited
        )
    }
}

/// What the gate does with a request before anything else.
pub enum Verdict {
    Pass,
    /// Answer `429` now; the client may try again in this many seconds.
    Limited {
        retry_after_secs: u64,
    },
}

pub struct Refusals {
    limits: Limits,
    table: Mutex<HashMap<Client, Entry>>,
    /// Counted `401`/`403` answers, and `429` answers (the metrics' counters).
    pub refused_total: AtomicU64,
    pub limited_total: AtomicU64,
}

impl Refusals {
    pub fn new(limits: Limits) -> Refusals {
        Refusals {
            limits,
            table: Mutex::new(HashMap::new()),
            refused_total: AtomicU64::new(0),
            limited_total: AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn ended(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.started) >= self.limits.window
    }

    fn summary(c: &Client, e: &Entry) -> Option<Summary> {
        (e.limited > 0).then(|| Summary {
            client: c.clone(),
            from: e.from.clone(),
            refused: e.refused,
            limited: e.limited,
            since_unix: e.started_unix,
        })
    }

    /// Before anything else: is `client` over its limit? A window that ended is forgotten
    /// (and its summary, if it had `429`s, returned for the audit log).
    pub fn check(&self, client: &Client, now: Instant) -> (Verdict, Option<Summary>) {
        if self.limits.per_window == 0 {
            return (Verdict::Pass, None);
        }
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = t.get_mut(client) else {
            return (Verdict::Pass, None);
        };
        if self.ended(e, now) {
            let s = Self::summary(client, e);
            t.remove(client);
            return (Verdict::Pass, s);
        }
        if e.refused < self.limits.per_window {
            return (Verdict::Pass, None);
        }
        e.limited += 1;
        self.limited_total.fetch_add(1, Relaxed);
        let left = self
            .limits
            .window
            .saturating_sub(now.saturating_duration_since(e.started));
        let retry_after_secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        (
            Verdict::Limited {
                retry_after_secs: retry_after_secs.max(1),
            },
            None,
        )
    }

    /// A request of `client` (from `from`) was refused (`401`, `403`). Returns the summaries
    /// of clients evicted to make room.
    pub fn refused(&self, client: &Client, from: &str, now: Instant, unix: u64) -> Vec<Summary> {
        self.refused_total.fetch_add(1, Relaxed);
        if self.limits.per_window == 0 {
            return Vec::new();
        }
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = Vec::new();
        if let Some(e) = t.get_mut(client) {
            if !self.ended(e, now) {
                e.refused = e.refused.saturating_add(1);
                e.from = from.to_string();
                return evicted;
            }
            evicted.extend(Self::summary(client, e));
            t.remove(client);
        }
        if t.len() >= self.limits.max_clients.max(1) {
            // Windows that ended first (all of them), then the oldest one.
            t.retain(|c, e| {
                let gone = now.saturating_duration_since(e.started) >= self.limits.window;
                if gone {
                    evicted.extend(Self::summary(c, e));
                }
                !gone
            });
            if t.len() >= self.limits.max_clients.max(1) {
                if let Some(oldest) = t
                    .iter()
                    .min_by_key(|(_, e)| e.started)
                    .map(|(c, _)| c.clone())
                {
                    if let Some(e) = t.remove(&oldest) {
                        evicted.extend(Self::summary(&oldest, &e));
                    }
                }
            }
        }
        t.insert(
            client.clone(),
            Entry {
                started: now,
                started_unix: unix,
                refused: 1,
                limited: 0,
                from: from.to_string(),
            },
        );
        evicted
    }

    /// Forget the windows that ended (every window, from a timer): their summaries.
    pub fn sweep(&self, now: Instant) -> Vec<Summary> {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        t.retain(|c, e| {
            let gone = now.saturating_duration_since(e.started) >= self.limits.window;
            if gone {
                out.extend(Self::summary(c, e));
            }
            !gone
        });
        out
    }

    /// Clients tracked now.
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_window: u32, max_clients: usize) -> Refusals {
        Refusals::new(Limits {
            per_window,
            window: Duration::from_secs(60),
            max_clients,
        })
    }

    fn addr(i: u8) -> Client {
        Client::of(None, IpAddr::from([10, 0, 0, i]))
    }

    fn limited(v: &Verdict) -> Option<u64> {
        match v {
            Verdict::Limited { retry_after_secs } => Some(*retry_after_secs),
            Verdict::Pass => None,
        }
    }

    #[test]
    fn limits_after_the_threshold_until_the_window_ends() {
        let r = limits(3, 16);
        let t0 = Instant::now();
        let c = addr(1);
        for i in 0..3 {
            assert!(limited(&r.check(&c, t0).0).is_none(), "refusal {i}");
            assert!(r.refused(&c, "10.0.0.1:5", t0, 1000).is_empty());
        }
        let t1 = t0 + Duration::from_secs(20);
        assert_eq!(limited(&r.check(&c, t1).0), Some(40));
        assert_eq!(limited(&r.check(&c, t1).0), Some(40));
        // Another client, and the same address with a certificate, are not affected.
        assert!(limited(&r.check(&addr(2), t1).0).is_none());
        let cert = Client::of(Some("ab"), IpAddr::from([10, 0, 0, 1]));
        assert!(limited(&r.check(&cert, t1).0).is_none());
        assert_eq!(r.limited_total.load(Relaxed), 2);
        assert_eq!(r.refused_total.load(Relaxed), 3);
        // The window rolls over: the summary, once, and the client starts afresh.
        let t2 = t0 + Duration::from_secs(60);
        let (v, s) = r.check(&c, t2);
        assert!(limited(&v).is_none());
        let s = s.expect("a summary");
        assert_eq!((s.refused, s.limited, s.since_unix), (3, 2, 1000));
        assert!(
            s.message()
                .starts_with("5 requests refused from 10.0.0.1 since "),
            "{}",
            s.message()
        );
        assert!(r.check(&c, t2).1.is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn a_window_without_429s_leaves_no_summary() {
        let r = limits(3, 16);
        let t0 = Instant::now();
        r.refused(&addr(1), "a", t0, 0);
        r.refused(&addr(2), "b", t0, 0);
        for _ in 0..4 {
            r.refused(&addr(3), "c", t0, 0);
        }
        r.check(&addr(3), t0);
        assert!(r.sweep(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(r.len(), 3);
        let s = r.sweep(t0 + Duration::from_secs(60));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].client, addr(3));
        assert!(r.is_empty());
        // A refusal after the window ended starts a new one.
        r.refused(&addr(1), "a", t0, 0);
        r.refused(&addr(1), "a", t0 + Duration::from_secs(61), 0);
        assert!(limited(&r.check(&addr(1), t0 + Duration::from_secs(61)).0).is_none());
    }

    #[test]
    fn the_table_is_bounded_ended_windows_and_then_the_oldest_go_first() {
        let r = limits(1, 4);
        let t0 = Instant::now();
        for i in 0..4 {
            r.refused(&addr(i), "x", t0 + Duration::from_secs(u64::from(i)), 0);
            r.check(&addr(i), t0 + Duration::from_secs(u64::from(i)));
        }
        assert_eq!(r.len(), 4);
        // Full, none ended: the oldest (addr 0) goes, with its summary.
        let s = r.refused(&addr(9), "x", t0 + Duration::from_secs(10), 0);
        assert_eq!(s.iter().map(|s| &s.client).collect::<Vec<_>>(), [&addr(0)]);
        assert_eq!(r.len(), 4);
        // Full, two ended: both go.
        let s = r.refused(&addr(8), "x", t0 + Duration::from_secs(62), 0);
        assert_eq!(s.len(), 2);
        assert_eq!(r.len(), 3);
        for i in 0..200u8 {
            r.refused(&addr(i), "x", t0 + Duration::from_secs(70), 0);
        }
        assert!(r.len() <= 4);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let a: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(Client::of(None, a), Client::of(None, b));
        assert_eq!(Client::of(None, a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(Client::of(None, mapped).to_string(), "127.0.0.1");
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let r = limits(0, 4);
        let t0 = Instant::now();
        for _ in 0..100 {
            r.refused(&addr(1), "x", t0, 0);
        }
        assert!(limited(&r.check(&addr(1), t0).0).is_none());
        assert!(r.is_empty());
    }
}
