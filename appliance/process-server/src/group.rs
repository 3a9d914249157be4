//! Consistency groups: the disks of one protected machine are cut at one instant.
//!
//! Why: a machine's disks share one write order (a database's log on one disk, its tables on
//! another). Points cut per disk at different moments can hold a write of one disk without an
//! earlier write of the other that the guest saw completed before it issued the later one: a
//! state the machine was never in, which its database may not recover from. So the disks of a
//! machine are cut together, like ASR's multi-VM consistency or a Zerto VPG.
//!
//! How: every journal append of a group's disk happens under the group's gate (shared side). A
//! cut takes the gate's exclusive side for the instant it reads each disk's newest journal
//! position, so no append is half done, and a write is in the cut iff it was appended before
//! that instant. A write the guest issues after another was acknowledged is appended after it
//! (the export acknowledges only appended writes), so the cut holds every write that happened
//! before any write it holds: a prefix of the machine's write order. Each disk's shipper then
//! sends a checkpoint that ends exactly at its position (an empty one when the disk had no
//! writes since its last) tagged with the cut's id, the cut's time. The next cut is made only
//! once every disk's point at this one is committed, so the disks never drift more than one cut
//! apart, and the group's RPO is that of its slowest disk (it says so in status).
//!
//! A disk whose journal restarts (a checksum resync re-bases its numbering) leaves the cut under
//! way: its position there means nothing any more, and that cut then never gets a point on every
//! disk, so it is not a machine point. Failover uses only cuts that every disk has.

use ferry_journal::Journal;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

/// One machine's disks, cut together.
pub struct Group {
    pub name: String,
    gate: RwLock<()>,
    members: Mutex<BTreeMap<String, Arc<Journal>>>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    current: Option<Cut>,
    /// The journal positions of the last cut made (no new cut while nothing was written).
    last_ends: Option<BTreeMap<String, u64>>,
    last_id: u64,
}

struct Cut {
    id: u64,
    ends: BTreeMap<String, u64>,
    /// Disks whose point at this cut is not committed yet.
    pending: BTreeSet<String>,
}

/// Where a disk's next checkpoint must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutAt {
    /// The cut's id: its time (Unix ns), also the points' `created_unix_ns`.
    pub id: u64,
    /// The disk's journal position at the cut.
    pub end: u64,
}

impl Group {
    pub fn new(name: &str) -> Arc<Group> {
        Arc::new(Group {
            name: name.to_string(),
            gate: RwLock::new(()),
            members: Mutex::new(BTreeMap::new()),
            state: Mutex::new(State::default()),
        })
    }

    /// Add a disk (before its export takes writes).
    pub fn join(&self, disk: &str, journal: Arc<Journal>) {
        self.members
            .lock()
            .expect("members")
            .insert(disk.to_string(), journal);
    }

    pub fn disks(&self) -> Vec<String> {
        self.members
            .lock()
            .expect("members")
            .keys()
            .cloned()
            .collect()
    }

    /// Held by a journal append of a member disk.
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The cut `disk`'s next checkpoint must end at: the cut under way when this disk's point
    /// at it is still due (and not `sent`, the cut a checkpoint in flight already ends at);
    /// else a new cut, when every disk committed the last one and some disk was written since.
    /// None: nothing to send now (the other disks are still sending theirs, or nothing changed).
    pub fn cut_for(&self, disk: &str, sent: Option<u64>) -> Option<CutAt> {
        let mut st = self.state.lock().expect("group state");
        if let Some(c) = &st.current {
            if c.pending.contains(disk) {
                if sent == Some(c.id) {
                    return None;
                }
                return c.ends.get(disk).map(|&end| CutAt { id: c.id, end });
            }
            if !c.pending.is_empty() {
                return None;
            }
        }
        let members = self.members.lock().expect("members");
        let ends: BTreeMap<String, u64> = {
            let _instant = self.gate.write().unwrap_or_else(|e| e.into_inner());
            members
                .iter()
                .map(|(n, j)| (n.clone(), j.stats().last_seq))
                .collect()
        };
        if st.last_ends.as_ref() == Some(&ends) {
            return None;
        }
        // Ids grow strictly, whatever the clock does: a cut is named by its id on every disk.
        let id = crate::status::now_unix_ns().max(st.last_id + 1);
        st.last_id = id;
        let end = *ends.get(disk)?;
        tracing::debug!(group = %self.name, id, ?ends, "consistency-group cut");
        st.last_ends = Some(ends.clone());
        st.current = Some(Cut {
            id,
            pending: ends.keys().cloned().collect(),
            ends,
        });
        Some(CutAt { id, end })
    }

    /// `disk`'s point at cut `id` is committed (or can no longer be made: see the module).
    pub fn done(&self, disk: &str, id: u64) {
        let mut st = self.state.lock().expect("group state");
        if let Some(c) = st.current.as_mut().filter(|c| c.id == id) {
            c.pending.remove(disk);
        }
    }

    /// Whether `disk` still has a point at a cut to commit: the cut under way awaits it, or a
    /// disk of the group was written since the last cut (the next cut needs a point of every
    /// disk, an empty one for a disk that was not written). While so, the disk is not caught
    /// up: its newest point and the other disks' may not be of one cut that holds every write.
    pub fn pending(&self, disk: &str) -> bool {
        let st = self.state.lock().expect("group state");
        if st
            .current
            .as_ref()
            .is_some_and(|c| c.pending.contains(disk))
        {
            return true;
        }
        let members = self.members.lock().expect("members");
        match &st.last_ends {
            None => true,
            Some(ends) => members
                .iter()
                .any(|(n, j)| ends.get(n) != Some(&j.stats().last_seq)),
        }
    }

    /// `disk` leaves the cut under way whatever it is (its journal was re-based).
    pub fn leave_cut(&self, disk: &str) {
        let mut st = self.state.lock().expect("group state");
        if let Some(c) = st.current.as_mut() {
            c.pending.remove(disk);
        }
        // Its positions changed meaning: the next cut is made even if the numbers repeat.
        st.last_ends = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_journal::{JournalConfig, Op};

    fn journal(dir: &std::path::Path, name: &str) -> Arc<Journal> {
        Arc::new(Journal::open(JournalConfig::new(dir.join(name), 1 << 20)).unwrap())
    }

    fn write(j: &Journal) {
        j.append(Op::Write {
            offset: 0,
            data: &[7u8; 512],
        })
        .unwrap();
    }

    #[test]
    fn a_cut_waits_for_every_disk_and_only_then_the_next_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (journal(dir.path(), "a"), journal(dir.path(), "b"));
        let g = Group::new("web");
        g.join("a", a.clone());
        g.join("b", b.clone());
        // Nothing written yet: the first cut still fixes both positions (both 0).
        write(&a);
        write(&a);
        let ca = g.cut_for("a", None).unwrap();
        assert_eq!(ca.end, 2);
        write(&b);
        // b's position in that cut is before its write.
        let cb = g.cut_for("b", None).unwrap();
        assert_eq!((cb.id, cb.end), (ca.id, 0));
        // a sent its point (in flight): nothing more for a until b is done too.
        assert_eq!(g.cut_for("a", Some(ca.id)), None);
        g.done("a", ca.id);
        assert_eq!(g.cut_for("a", None), None, "b has not committed the cut");
        g.done("b", cb.id);
        let next = g.cut_for("a", None).unwrap();
        assert!(next.id > ca.id);
        assert_eq!(next.end, 2);
        assert_eq!(g.cut_for("b", None).unwrap().end, 1);
        assert!(g.pending("a") && g.pending("b"));
        g.done("a", next.id);
        assert!(
            !g.pending("a") && g.pending("b"),
            "b's point at the cut is due"
        );
        g.done("b", next.id);
        assert!(!g.pending("a") && !g.pending("b"));
        // Nothing written since: no new cut.
        assert_eq!(g.cut_for("a", None), None);
        write(&b);
        // b was written: a too must get a point at the next cut (an empty one).
        assert!(g.pending("a"));
        assert_eq!(g.cut_for("a", None).unwrap().end, 2);
    }

    #[test]
    fn a_disk_that_leaves_the_cut_does_not_hold_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (journal(dir.path(), "a"), journal(dir.path(), "b"));
        let g = Group::new("web");
        g.join("a", a.clone());
        g.join("b", b);
        write(&a);
        let c = g.cut_for("a", None).unwrap();
        g.done("a", c.id);
        g.leave_cut("b");
        write(&a);
        assert_eq!(g.cut_for("a", None).unwrap().end, 2);
    }
}
