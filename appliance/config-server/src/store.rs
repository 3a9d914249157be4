//! The configuration server's state in sled: one tree per kind of object, JSON values.
//!
//! Keys are the object's path below `/v1/tenants` joined with `/` (`acme/web-01/disk-0`), which
//! is unambiguous because names cannot hold `/` (see `ferry_api::validate::name`), and which
//! makes "everything of tenant acme" a prefix scan. Append-only logs (audit, events) are keyed by
//! a big-endian sequence number so that a scan returns them in order.
//!
//! Every change is flushed before the server answers: an acknowledged change survives a crash.

use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database: {0}")]
    Sled(#[from] sled::Error),
    #[error("state database: {tree}/{key} does not decode: {source}")]
    Corrupt {
        tree: &'static str,
        key: String,
        source: serde_json::Error,
    },
    #[error("state database: cannot encode a value: {0}")]
    Encode(serde_json::Error),
}

/// Tree names. Changing one loses the objects stored under the old name.
pub mod trees {
    pub const TENANTS: &str = "tenants";
    pub const SITES: &str = "sites";
    pub const MACHINES: &str = "machines";
    pub const DISKS: &str = "disks";
    pub const POLICIES: &str = "policies";
    pub const PLANS: &str = "plans";
    pub const APPLIANCES: &str = "appliances";
    /// Enrollment tokens by id (only a hash of the secret).
    pub const TOKENS: &str = "tokens";
    /// Issued client certificates: SHA-256 of the DER (hex) → `ferry_api::IssuedCertificate`
    /// (the principal, times, revocation; records of earlier versions hold the principal alone).
    pub const CERTS: &str = "certs";
    pub const AUDIT: &str = "audit";
    pub const EVENTS: &str = "events";
    /// The appliance itself (password hash, network, settings): see `crate::system::keys`.
    pub const SYSTEM: &str = "system";
    /// Failover jobs: `{tenant}/{id:020}` → job.
    pub const JOBS: &str = "jobs";
    /// Job numbers (a log of numbers, so they never repeat).
    pub const JOB_IDS: &str = "job-ids";
    /// Where each recovery plan stands: `{tenant}/{plan}` → plan status.
    pub const PLAN_STATUS: &str = "plan-status";
    /// Active alerts: `{tenant or -}/{subject}` → the event that raised them.
    pub const ALERTS: &str = "alerts";
    /// When each appliance last reported, and what: name → seen.
    pub const APPLIANCE_SEEN: &str = "appliance-seen";
    /// Each tenant's data key, hex (secret): tenant → key.
    pub const TENANT_KEYS: &str = "tenant-keys";
    /// Certificates issued from the data CA: `{appliance}/{kind}` → names, certificate, key.
    pub const DATA_CERTS: &str = "data-certs";
    /// Data-link certificates of appliances whose identity was revoked:
    /// `{tenant}/{sha256}` → the `DATA_CERTS` key they had.
    pub const REVOKED_DATA_CERTS: &str = "revoked-data-certs";
    /// Step orders to the recovery-site roles: `{id:020}` → order and its result.
    pub const ORDERS: &str = "orders";
    /// A job step's order: `{tenant}/{job:020}/{step:04}/{part}` → order id.
    pub const ORDER_KEYS: &str = "order-keys";
    /// Order numbers (a log of numbers, so they never repeat).
    pub const ORDER_IDS: &str = "order-ids";
}

/// Entries kept per log (audit, events): about 60 MB of audit at ~300 bytes an entry.
pub const LOG_KEEP: u64 = 200_000;

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    log_keep: u64,
    /// One appender at a time per store: a log's next number is its last plus one.
    appending: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Store {
    /// Open (or create) the store in `dir`. sled holds the directory's lock until its flusher
    /// thread notices the last handle went (up to its flush interval after the drop), and a
    /// server restarting in place may find its predecessor still exiting: a held lock is waited
    /// for, up to 10 s, before it is an error.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => break r?,
            }
        };
        Ok(Store {
            db,
            log_keep: LOG_KEEP,
            appending: Default::default(),
        })
    }

    fn tree(&self, name: &'static str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    fn decode<T: DeserializeOwned>(
        tree: &'static str,
        key: &[u8],
        v: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(v).map_err(|source| StoreError::Corrupt {
            tree,
            key: String::from_utf8_lossy(key).into_owned(),
            source,
        })
    }

    fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(v).map_err(StoreError::Encode)
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.tree(tree)?.get(key)? {
            Some(v) => Ok(Some(Self::decode(tree, key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    pub fn contains(&self, tree: &'static str, key: &str) -> Result<bool, StoreError> {
        Ok(self.tree(tree)?.contains_key(key)?)
    }

    /// Every value whose key starts with `prefix`, in key order.
    pub fn list<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        prefix: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Self::decode(tree, &k, &v)
            })
            .collect()
    }

    /// Like [`Store::list`], with each value's key.
    pub fn list_keyed<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.tree(tree)?
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let key = String::from_utf8_lossy(&k).into_owned();
                Ok((key, Self::decode(tree, &k, &v)?))
            })
            .collect()
    }

    /// Whether a key under `prefix` satisfies `f`; no value is decoded.
    pub fn any_key(
        &self,
        tree: &'static str,
        prefix: &str,
        f: impl Fn(&[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        for kv in self.tree(tree)?.scan_prefix(prefix) {
            if f(&kv?.0) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    pub fn any_with_prefix(&self, tree: &'static str, prefix: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree(tree)?
            .scan_prefix(prefix)
            .next()
            .transpose()?
            .is_some())
    }

    /// Store `value` under `key` only if the key is free; false when it was taken.
    pub fn insert_new<T: Serialize>(
        &self,
        tree: &'static str,
        key: &str,
        value: &T,
    ) -> Result<bool, StoreError> {
        let v = Self::encode(value)?;
        Ok(self
            .tree(tree)?
            .compare_and_swap(key, None as Option<&[u8]>, Some(v))?
            .is_ok())
    }

    pub fn put<T: Serialize>(
        &self,
        tree: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.tree(tree)?.insert(key, Self::encode(value)?)?;
        Ok(())
    }

    /// False when there was nothing to remove.
    pub fn remove(&self, tree: &'static str, key: &str) -> Result<bool, StoreError> {
        Ok(self.tree(tree)?.remove(key)?.is_some())
    }

    /// Append to a log; `make` gets the entry's sequence number. The log keeps at most
    /// [`LOG_KEEP`] entries: refusals of unauthenticated clients are logged too, and they
    /// must not be able to fill the disk.
    pub fn append<T: Serialize>(
        &self,
        tree: &'static str,
        make: impl FnOnce(u64) -> T,
    ) -> Result<u64, StoreError> {
        // Each log numbers its own entries without gaps (sled's generate_id jumps after a
        // restart), which makes "keep the last N" a comparison of keys.
        let _one = self.appending.lock().unwrap_or_else(|e| e.into_inner());
        let t = self.tree(tree)?;
        let seq = match t.last()? {
            Some((k, _)) => <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    tree,
                    key: hex::encode(&k),
                    source: serde::de::Error::custom("a log key is not 8 bytes"),
                })?
                .saturating_add(1),
            None => 1,
        };
        t.insert(seq.to_be_bytes(), Self::encode(&make(seq))?)?;
        // A few removals per append catch up with any backlog without a long pause.
        let cutoff = seq.saturating_sub(self.log_keep).to_be_bytes();
        for _ in 0..8 {
            match t.first()? {
                Some((k, _)) if k.as_ref() <= cutoff.as_slice() => {
                    t.remove(k)?;
                }
                _ => break,
            }
        }
        Ok(seq)
    }

    /// The newest `limit` entries of a log, oldest first.
    pub fn tail<T: DeserializeOwned>(
        &self,
        tree: &'static str,
        limit: usize,
    ) -> Result<Vec<T>, StoreError> {
        let mut out: Vec<T> = self
            .tree(tree)?
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Self::decode(tree, &k, &v)
            })
            .collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// Make every change so far durable; called before a change is acknowledged.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_keep_a_bounded_tail() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.log_keep = 10;
        for i in 0..100u32 {
            s.append(trees::AUDIT, |_| i).unwrap();
            s.append(trees::EVENTS, |_| i).unwrap();
        }
        let all: Vec<u32> = s.tail(trees::AUDIT, 1000).unwrap();
        assert_eq!(all, (90..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_store_still_held_by_its_previous_handle_is_waited_for() {
        let d = tempfile::tempdir().unwrap();
        let first = Store::open(d.path()).unwrap();
        first.put(trees::SITES, "acme/a", &1u32).unwrap();
        let gone = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        // Opened while the first handle lives: waits for its lock instead of failing.
        let second = Store::open(d.path()).unwrap();
        gone.join().unwrap();
        assert_eq!(second.get::<u32>(trees::SITES, "acme/a").unwrap(), Some(1));
    }

    #[tokio::test]
    async fn objects_logs_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        {
            let s = Store::open(d.path()).unwrap();
            assert!(s.insert_new(trees::SITES, "acme/a", &1u32).unwrap());
            assert!(!s.insert_new(trees::SITES, "acme/a", &2u32).unwrap());
            s.put(trees::SITES, "acme/b", &3u32).unwrap();
            s.put(trees::SITES, "acmex/c", &4u32).unwrap();
            assert_eq!(s.list::<u32>(trees::SITES, "acme/").unwrap(), [1, 3]);
            for i in 0..5u32 {
                s.append(trees::AUDIT, |seq| (seq, i)).unwrap();
            }
            s.flush().await.unwrap();
        }
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.get::<u32>(trees::SITES, "acme/b").unwrap(), Some(3));
        let t: Vec<(u64, u32)> = s.tail(trees::AUDIT, 2).unwrap();
        assert_eq!(t.iter().map(|e| e.1).collect::<Vec<_>>(), [3, 4]);
        // Numbering goes on where it stopped, and nothing old is trimmed away.
        assert_eq!(s.append(trees::AUDIT, |seq| (seq, 5)).unwrap(), 6);
        let t: Vec<(u64, u32)> = s.tail(trees::AUDIT, 100).unwrap();
        assert_eq!(t.len(), 6);
        assert!(s.remove(trees::SITES, "acme/a").unwrap());
        assert!(!s.any_with_prefix(trees::SITES, "zzz/").unwrap());
        assert!(s
            .any_key(trees::SITES, "acme", |k| k.ends_with(b"/c"))
            .unwrap());
        assert!(!s
            .any_key(trees::SITES, "acme/", |k| k.ends_with(b"/c"))
            .unwrap());
        s.put(trees::SITES, "bad", &"not a number").unwrap();
        assert!(matches!(
            s.get::<u32>(trees::SITES, "bad"),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
