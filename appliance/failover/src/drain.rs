//! A planned failover waits until the process server has shipped every journaled write, and
//! until the source has stopped writing: a disk that still takes writes would go live at the
//! recovery site while its guest runs on, and what it wrote after would be lost.

use crate::{FailoverError, Result};
use ferry_process_server::status::{self, DiskStatus};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the journal must stand still, caught up, before the disk counts as drained.
pub const QUIET: Duration = Duration::from_secs(1);
/// A source still writing after this long fails the drain (its pre-hooks did not stop it).
pub const STILL_WRITING: Duration = Duration::from_secs(15);

/// Wait until `disk`'s status, written after `since_ns`, has said for [`QUIET`] that the
/// recovery site holds every write journaled ([`DiskStatus::caught_up`]) with no new write.
pub fn wait(cache: &Path, disk: &str, since_ns: u64, timeout: Duration) -> Result<DiskStatus> {
    let path = cache.join(disk).join("status.json");
    let began = Instant::now();
    let deadline = began + timeout;
    // The journal's written position when it was last seen to move, and when that was.
    let mut last: Option<(u64, Instant)> = None;
    let mut moved = false;
    loop {
        let st = status::read(&path);
        if let Ok(s) = &st {
            if s.updated_unix_ns > since_ns {
                match last {
                    Some((seq, _)) if seq != s.journal_last_seq => {
                        moved = true;
                        last = Some((s.journal_last_seq, Instant::now()));
                    }
                    Some((_, at)) if s.caught_up() && at.elapsed() >= QUIET => {
                        return Ok(s.clone());
                    }
                    None => last = Some((s.journal_last_seq, Instant::now())),
                    _ => {}
                }
                if moved
                    && began.elapsed() >= STILL_WRITING
                    && last.is_some_and(|(_, at)| at.elapsed() < QUIET)
                {
                    return Err(FailoverError::Refused(format!(
                        "disk {disk} is still taking writes after {STILL_WRITING:?} (journal at \
                         {}): the source must stop first, e.g. a pre-hook that shuts the guest down",
                        s.journal_last_seq
                    )));
                }
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
