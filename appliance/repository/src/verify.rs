//! Verify and garbage-collect: the two whole-repository walks.
//!
//! Why verify: storage can rot or be tampered with; an operator must learn which recovery points
//! are still good before needing them. Verify reads every root, page and chunk from storage
//! (never from a cache), authenticates each against its name (and pages against their position),
//! and reports each bad object once with every point that depends on it.
//!
//! Why gc works as it does: chunks and pages are shared between points and disks, so an object
//! may be freed only when no point names it. Gc marks from every root on disk and sweeps the
//! rest. It must not run while a checkpoint writer is open (the writer may have stored chunks
//! that only its future root will name, or rely on an existing chunk it checked), so gc holds
//! the repository's gate exclusively: it stops new writers, waits (bounded) for open ones to
//! finish, and gives up with `Busy` rather than deadlock.

use crate::map::FANOUT_BITS;
use crate::reader::load_chunk;
use crate::root::{list_disks, list_seqs, read_root};
use crate::store::Kind;
use crate::{Inner, RepoError, Repository};
use ferry_chunk::ChunkId;
use serde::{Serialize, Serializer};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// How long gc waits for open checkpoint writers before giving up.
const GC_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub pages_checked: u64,
    pub points_checked: u64,
    pub bad: Vec<BadObject>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.bad.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BadObject {
    #[serde(serialize_with = "ser_id")]
    pub id: ChunkId,
    /// "chunk", "page" or "root".
    pub kind: String,
    pub reason: String,
    /// (disk, seq) of every point that depends on this object.
    pub points: Vec<(String, u64)>,
}

fn ser_id<S: Serializer>(id: &ChunkId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&id.to_hex())
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub points_marked: u64,
    pub chunks_kept: u64,
    pub chunks_removed: u64,
    pub pages_kept: u64,
    pub pages_removed: u64,
    pub bytes_freed: u64,
    /// Packs rewritten because they were mostly garbage, and the bytes that gave back.
    pub packs_compacted: u64,
    pub pack_bytes_reclaimed: u64,
    /// Pages that could not be read while marking (their subtrees were unrecoverable anyway).
    pub unreadable_pages: u64,
}

struct Verifier<'a> {
    inner: &'a Inner,
    report: VerifyReport,
    /// Bad objects under each verified page (indices into report.bad).
    pages: HashMap<ChunkId, Vec<usize>>,
    chunks: HashMap<ChunkId, Option<usize>>,
}

impl Verifier<'_> {
    fn bad(&mut self, id: ChunkId, kind: &str, reason: String) -> usize {
        self.report.bad.push(BadObject {
            id,
            kind: kind.into(),
            reason,
            points: Vec::new(),
        });
        self.report.bad.len() - 1
    }

    fn page(&mut self, disk: &str, level: u8, index: u64, id: ChunkId) -> Vec<usize> {
        if let Some(v) = self.pages.get(&id) {
            return v.clone();
        }
        self.report.pages_checked += 1;
        let mut out = Vec::new();
        match self.inner.load_page_uncached(disk, level, index, &id) {
            Err(e) => out.push(self.bad(id, "page", reason(e))),
            Ok(page) => {
                for (k, child) in page.iter().enumerate() {
                    if child.is_zero() {
                        continue;
                    }
                    if level == 0 {
                        let r = match self.chunks.get(child) {
                            Some(r) => *r,
                            None => {
                                self.report.chunks_checked += 1;
                                let r = load_chunk(self.inner, child)
                                    .err()
                                    .map(|e| self.bad(*child, "chunk", reason(e)));
                                self.chunks.insert(*child, r);
                                r
                            }
                        };
                        out.extend(r);
                    } else {
                        let ci = (index << FANOUT_BITS) + k as u64;
                        out.extend(self.page(disk, level - 1, ci, *child));
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        self.pages.insert(id, out.clone());
        out
    }
}

fn reason(e: RepoError) -> String {
    match e {
        RepoError::MissingChunk(_) => "missing".into(),
        RepoError::BadChunk { reason, .. } | RepoError::BadPage { reason, .. } => reason,
        e => e.to_string(),
    }
}

impl Repository {
    /// Check every root, page and chunk that any point (of any disk) depends on.
    pub fn verify(&self) -> VerifyReport {
        let inner = self.inner();
        let root = inner.store.root();
        let mut v = Verifier {
            inner,
            report: VerifyReport::default(),
            pages: HashMap::new(),
            chunks: HashMap::new(),
        };
        let disks = match list_disks(root) {
            Ok(d) => d,
            Err(e) => {
                v.bad(ChunkId::ZERO, "root", format!("cannot list disks: {e}"));
                return v.report;
            }
        };
        for disk in disks {
            let seqs = match list_seqs(root, &disk) {
                Ok(s) => s,
                Err(e) => {
                    v.bad(
                        ChunkId::ZERO,
                        "root",
                        format!("cannot list points of {disk}: {e}"),
                    );
                    continue;
                }
            };
            for seq in seqs {
                v.report.points_checked += 1;
                let bads = match read_root(&inner.key, root, &disk, seq) {
                    Err((why, page)) => vec![v.bad(page.unwrap_or(ChunkId::ZERO), "root", why)],
                    Ok(rec) if rec.root_page.is_zero() => Vec::new(),
                    Ok(rec) => v.page(&disk, rec.root_level, 0, rec.root_page),
                };
                for b in bads {
                    v.report.bad[b].points.push((disk.clone(), seq));
                }
            }
        }
        if !v.report.bad.is_empty() {
            tracing::warn!(
                bad = v.report.bad.len(),
                "repository verify found bad objects"
            );
        }
        v.report
    }

    /// Remove every chunk and page that no point names. Waits (up to 30 s) for open checkpoint
    /// writers to finish and holds new ones back meanwhile; `Busy` if they do not finish.
    pub fn gc(&self) -> Result<GcReport, RepoError> {
        self.writable()?;
        let _gate = GcGate::enter(self)?;
        let inner = self.inner();
        let root = inner.store.root();
        let mut report = GcReport::default();
        let mut live_pages: HashSet<ChunkId> = HashSet::new();
        let mut live_chunks: HashSet<ChunkId> = HashSet::new();
        for disk in list_disks(root)? {
            for seq in list_seqs(root, &disk)? {
                let Ok(rec) = read_root(&inner.key, root, &disk, seq) else {
                    tracing::warn!(disk, seq, "gc ignores a root that does not authenticate");
                    continue;
                };
                report.points_marked += 1;
                if !rec.root_page.is_zero() {
                    let mut stack = vec![(rec.root_level, 0u64, rec.root_page)];
                    while let Some((level, index, id)) = stack.pop() {
                        if !live_pages.insert(id) {
                            continue;
                        }
                        let page = match inner.load_page_uncached(&disk, level, index, &id) {
                            Ok(p) => p,
                            Err(RepoError::BadPage { .. }) => {
                                report.unreadable_pages += 1;
                                continue;
                            }
                            Err(e) => return Err(e),
                        };
                        for (k, child) in page.iter().enumerate().filter(|c| !c.1.is_zero()) {
                            if level == 0 {
                                live_chunks.insert(*child);
                            } else {
                                let ci = (index << FANOUT_BITS) + k as u64;
                                stack.push((level - 1, ci, *child));
                            }
                        }
                    }
                }
            }
        }
        for (kind, live, kept, removed) in [
            (
                Kind::Chunk,
                &live_chunks,
                &mut report.chunks_kept,
                &mut report.chunks_removed,
            ),
            (
                Kind::Page,
                &live_pages,
                &mut report.pages_kept,
                &mut report.pages_removed,
            ),
        ] {
            let mut dead = Vec::new();
            for (id, size) in inner.store.list(kind)? {
                if live.contains(&id) {
                    *kept += 1;
                } else {
                    dead.push(id);
                    *removed += 1;
                    report.bytes_freed += size;
                }
            }
            inner.store.remove(kind, &dead)?;
        }
        let (packs, reclaimed) = inner.store.compact()?;
        report.packs_compacted = packs;
        report.pack_bytes_reclaimed = reclaimed;
        inner.pages.lock().expect("page cache").clear();
        tracing::info!(?report, "gc finished");
        Ok(report)
    }
}

/// Exclusive hold of the writer gate for the duration of a gc.
struct GcGate<'a>(&'a Repository);

impl<'a> GcGate<'a> {
    fn enter(repo: &'a Repository) -> Result<Self, RepoError> {
        let (m, cv) = repo.gate();
        let mut g = m.lock().expect("gate");
        if g.gc() {
            return Err(RepoError::Busy("gc already running".into()));
        }
        g.set_gc(true);
        let deadline = Instant::now() + GC_WAIT;
        while g.writers() > 0 {
            let now = Instant::now();
            if now >= deadline {
                g.set_gc(false);
                cv.notify_all();
                return Err(RepoError::Busy(
                    "checkpoint writers stayed open; gc not started".into(),
                ));
            }
            g = cv.wait_timeout(g, deadline - now).expect("gate").0;
        }
        Ok(GcGate(repo))
    }
}

impl Drop for GcGate<'_> {
    fn drop(&mut self) {
        let (m, cv) = self.0.gate();
        m.lock().expect("gate").set_gc(false);
        cv.notify_all();
    }
}
