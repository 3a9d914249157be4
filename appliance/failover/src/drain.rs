//! A planned failover waits until the process server has shipped every journaled write.

use crate::{FailoverError, Result};
use ferry_process_server::status::{self, DiskStatus};
use std::path::Path;
use std::time::{Duration, Instant};

/// Wait until `disk`'s status, written after `since_ns`, says the recovery site holds every
/// write journaled before it ([`DiskStatus::caught_up`]).
pub fn wait(cache: &Path, disk: &str, since_ns: u64, timeout: Duration) -> Result<DiskStatus> {
    let path = cache.join(disk).join("status.json");
    let deadline = Instant::now() + timeout;
    loop {
        let st = status::read(&path);
        if let Ok(s) = &st {
            if s.updated_unix_ns > since_ns && s.caught_up() {
                return Ok(s.clone());
            }
        }
        if Instant::now() > deadline {
            return Err(FailoverError::Refused(match st {
                Ok(s) => format!(
                    "disk {disk} did not drain within {timeout:?}: state {:?}, journal {} written, {} durable, {} at the recovery site",
                    s.state, s.journal_last_seq, s.journal_durable_seq, s.acked_journal_seq
                ),
                Err(e) => format!("disk {disk} has no status at {}: {e}", path.display()),
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
