//! Checkpoint writers: turn one checkpoint's block updates into a new recovery point.
//!
//! Why: a checkpoint must become visible all at once or not at all, and must cost in proportion
//! to what changed, not to the disk's size. A writer therefore keeps in memory only the map pages
//! it changed (copied from the previous point on first touch). A checkpoint that changes blocks
//! all over a large disk (a seed, or a resync of a multi-terabyte disk) would hold every leaf
//! page, so past [`MAX_DIRTY_PAGES`] the changed leaves are written out early and only their new
//! names kept in their parents (which are [`crate::map::FANOUT`] times fewer); a leaf touched
//! again is read back by that name. Pages nothing names are collected by gc, so an early-written
//! page of a checkpoint that is then abandoned costs nothing. It stores chunks as they arrive
//! (content-addressed, so a crash leaves only unreferenced objects that gc removes), and on
//! [`CheckpointWriter::commit`] writes the changed pages bottom-up, `syncfs`es, and writes the
//! root last. Dropping a writer without commit leaves no point.
//!
//! Every chunk that enters the repository is authenticated first (a blob from the network is
//! opened with the tenant key and must match its name), so the store never holds a chunk that
//! could not be served.

use crate::map::{zero_page, Geometry, Page, FANOUT, FANOUT_BITS};
use crate::root::{write_root, PointRecord};
use crate::store::Kind;
use crate::{CheckpointMeta, RecoveryPoint, RepoError, Repository};
use ferry_chunk::{is_zero, ChunkId};
use std::collections::{BTreeMap, HashMap};

/// Changed pages a writer keeps in memory (32 KiB each) before it writes leaves out early.
pub const MAX_DIRTY_PAGES: usize = 2048;

/// A block's chunk, authenticated and stored by [`CheckpointWriter::verify_chunk`], waiting to
/// be placed in the map by [`CheckpointWriter::put_verified`] (only the writer makes one).
#[derive(Debug)]
pub struct VerifiedChunk {
    index: u64,
    id: ChunkId,
    /// The block becomes a hole (a zero name, or a blob whose plaintext is all zero).
    zero: bool,
    /// Bytes this verification added to the store.
    written: u64,
}

pub struct CheckpointWriter<'a> {
    repo: &'a Repository,
    disk: String,
    meta: CheckpointMeta,
    geo: Geometry,
    prev: Option<PointRecord>,
    /// Changed pages of this checkpoint by (level, index), copied from `prev` on first touch.
    pages: BTreeMap<(u8, u64), Page>,
    /// Per changed leaf: which of its blocks this checkpoint wrote (for `changed_blocks`).
    touched: HashMap<u64, [u64; FANOUT / 64]>,
    stored_bytes: u64,
    done: bool,
    max_dirty_pages: usize,
    /// The name of an all-zero block of the disk's block size (such a chunk becomes a hole).
    zero_id: ChunkId,
}

impl<'a> CheckpointWriter<'a> {
    pub(crate) fn new(
        repo: &'a Repository,
        disk: String,
        meta: CheckpointMeta,
        prev: Option<PointRecord>,
    ) -> Self {
        let geo = Geometry::new(meta.disk_size, meta.block_size);
        let zero_id = repo
            .inner()
            .key
            .chunk_id(&vec![0u8; meta.block_size as usize]);
        let mut w = CheckpointWriter {
            repo,
            disk,
            meta,
            geo,
            prev,
            pages: BTreeMap::new(),
            touched: HashMap::new(),
            stored_bytes: 0,
            done: false,
            max_dirty_pages: MAX_DIRTY_PAGES,
            zero_id,
        };
        // Growth past the old tree's height: the new upper levels are changed pages (their
        // child 0 is the old root), so the commit links the old tree under the new root.
        if let Some(p) = &w.prev {
            if !p.root_page.is_zero() {
                for level in p.root_level + 1..=geo.root_level {
                    let mut page = zero_page();
                    if level == p.root_level + 1 {
                        page[0] = p.root_page;
                    }
                    w.pages.insert((level, 0), page);
                }
            }
        }
        w
    }

    /// Keep at most `n` changed pages in memory (tests use a small bound to exercise spilling).
    pub fn set_max_dirty_pages(&mut self, n: usize) {
        self.max_dirty_pages = n.max(1);
    }

    /// The metadata this checkpoint will carry.
    pub fn meta(&self) -> &CheckpointMeta {
        &self.meta
    }

    /// The checkpoint ends at journal position `journal_end` after all: a checksum resync
    /// learns it only after reading the disk, and may restart the sender's journal numbering
    /// (a process server that lost its cache counts from 1 again), so any value is taken. The
    /// next checkpoint must start there.
    pub fn rebase_journal_end(&mut self, journal_end: u64) {
        self.meta.journal_end = journal_end;
        self.meta.journal_start = self.meta.journal_start.min(journal_end);
    }

    /// Block `index` becomes a hole (reads as zeros, stores nothing).
    pub fn put_zero(&mut self, index: u64) -> Result<(), RepoError> {
        self.set(index, ChunkId::ZERO)
    }

    /// Block `index` becomes chunk `id`. With `blob`, the blob is authenticated against `id`
    /// (else `BadChunk`) and stored if new; without, the chunk must already be stored
    /// (else `MissingChunk`). A chunk whose plaintext is all zero becomes a hole.
    ///
    /// This is [`CheckpointWriter::verify_chunk`] followed by
    /// [`CheckpointWriter::put_verified`].
    pub fn put_chunk(
        &mut self,
        index: u64,
        id: ChunkId,
        blob: Option<&[u8]>,
    ) -> Result<(), RepoError> {
        let v = self.verify_chunk(index, id, blob)?;
        self.put_verified(v)
    }

    /// The first half of [`CheckpointWriter::put_chunk`], which changes no map and may run on
    /// several threads at once (it takes `&self`): check the index, authenticate `blob` against
    /// `id` and store it if new (or, without a blob, check that the chunk is stored). The map
    /// changes only when the result is given to [`CheckpointWriter::put_verified`], in the
    /// order the blocks arrived.
    ///
    /// Calls naming the same `id` must not run concurrently (each must see the other's store
    /// done or not begun, as sequential `put_chunk` calls would): a caller that verifies in
    /// parallel hands all the blocks of one id to one thread, in arrival order.
    pub fn verify_chunk(
        &self,
        index: u64,
        id: ChunkId,
        blob: Option<&[u8]>,
    ) -> Result<VerifiedChunk, RepoError> {
        self.check_index(index)?;
        let mut v = VerifiedChunk {
            index,
            id,
            zero: id.is_zero(),
            written: 0,
        };
        if v.zero {
            return Ok(v);
        }
        let inner = self.repo.inner();
        match blob {
            Some(blob) => {
                // Authenticated (AEAD over header and name), not opened: see
                // `TenantKey::authenticate_chunk`. Every read checks the name again.
                let len =
                    inner
                        .key
                        .authenticate_chunk(&id, blob)
                        .map_err(|e| RepoError::BadChunk {
                            id,
                            reason: e.to_string(),
                        })?;
                if len > self.geo.block_len(index) {
                    return Err(RepoError::BadChunk {
                        id,
                        reason: format!(
                            "{len} bytes do not fit block {index} ({} bytes)",
                            self.geo.block_len(index)
                        ),
                    });
                }
                // A block of zeros is a hole, whatever its length (the last block of a disk
                // may be short).
                let zero = match len == self.meta.block_size as usize {
                    true => id == self.zero_id,
                    false => id == inner.key.chunk_id(&vec![0u8; len]),
                };
                if zero {
                    v.zero = true;
                    return Ok(v);
                }
                if inner.store.put(Kind::Chunk, &id, blob)? {
                    v.written = blob.len() as u64;
                }
            }
            None => {
                if !inner.store.exists(Kind::Chunk, &id) {
                    return Err(RepoError::MissingChunk(id));
                }
            }
        }
        Ok(v)
    }

    /// The second half of [`CheckpointWriter::put_chunk`]: the block named by a
    /// [`CheckpointWriter::verify_chunk`] of this writer becomes its chunk (or a hole).
    pub fn put_verified(&mut self, v: VerifiedChunk) -> Result<(), RepoError> {
        if v.zero {
            return self.put_zero(v.index);
        }
        self.stored_bytes += v.written;
        self.set(v.index, v.id)
    }

    /// Partial-block write: the block's current content (this checkpoint's earlier put, else the
    /// previous point's, else zeros) with `extents` (offset in block, bytes) applied, stored as
    /// a full block.
    pub fn put_patch(&mut self, index: u64, extents: &[(u32, Vec<u8>)]) -> Result<(), RepoError> {
        self.check_index(index)?;
        let len = self.geo.block_len(index);
        for (off, data) in extents {
            if *off as usize + data.len() > len {
                return Err(RepoError::Invalid(format!(
                    "extent {off}+{} outside block {index} ({len} bytes)",
                    data.len()
                )));
            }
        }
        let cur = self.leaf(index >> FANOUT_BITS)?[(index as usize) & (FANOUT - 1)];
        let mut block = if cur.is_zero() {
            vec![0u8; len]
        } else {
            let mut b = crate::reader::load_chunk(self.repo.inner(), &cur)?;
            if b.len() > len {
                return Err(RepoError::BadChunk {
                    id: cur,
                    reason: "chunk longer than its block".into(),
                });
            }
            b.resize(len, 0);
            b
        };
        for (off, data) in extents {
            block[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        if is_zero(&block) {
            return self.put_zero(index);
        }
        let inner = self.repo.inner();
        let id = inner.key.chunk_id(&block);
        if !inner.store.exists(Kind::Chunk, &id) {
            let blob = inner.key.seal_chunk(&id, &block);
            if inner.store.put(Kind::Chunk, &id, &blob)? {
                self.stored_bytes += blob.len() as u64;
            }
        }
        self.set(index, id)
    }

    /// Write the changed pages, make everything durable, then write the root: from the moment
    /// the root's rename is durable the point exists, and not before.
    pub fn commit(mut self) -> Result<RecoveryPoint, RepoError> {
        let inner = self.repo.inner().clone();
        let top = self.geo.root_level;
        for level in 0..top {
            let keys: Vec<u64> = self
                .pages
                .range((level, 0)..=(level, u64::MAX))
                .map(|(k, _)| k.1)
                .collect();
            for idx in keys {
                let page = self.pages.remove(&(level, idx)).expect("listed page");
                let id = inner.store_page(&self.disk, level, idx, page)?;
                let parent = self.page_mut(level + 1, idx >> FANOUT_BITS)?;
                parent[(idx as usize) & (FANOUT - 1)] = id;
            }
        }
        let root_page = match self.pages.remove(&(top, 0)) {
            Some(page) => inner.store_page(&self.disk, top, 0, page)?,
            None => self.prev.as_ref().map_or(ChunkId::ZERO, |p| p.root_page),
        };
        let changed_blocks = self
            .touched
            .values()
            .flat_map(|bits| bits.iter())
            .map(|w| w.count_ones() as u64)
            .sum();
        let rec = PointRecord {
            point: RecoveryPoint {
                disk: self.disk.clone(),
                meta: self.meta.clone(),
                changed_blocks,
                stored_bytes: self.stored_bytes,
            },
            root_page,
            root_level: top,
        };
        inner.store.sync_all()?;
        write_root(&inner.store, &inner.key, &rec)?;
        self.repo.publish(rec.clone());
        tracing::debug!(disk = %self.disk, seq = self.meta.seq, changed_blocks, "checkpoint committed");
        self.finish();
        Ok(rec.point)
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.repo.end_write(&self.disk, true);
        }
    }

    fn check_index(&self, index: u64) -> Result<(), RepoError> {
        if index >= self.geo.blocks {
            return Err(RepoError::Invalid(format!(
                "block {index} beyond the disk ({} blocks)",
                self.geo.blocks
            )));
        }
        Ok(())
    }

    fn set(&mut self, index: u64, id: ChunkId) -> Result<(), RepoError> {
        self.check_index(index)?;
        let leaf = index >> FANOUT_BITS;
        let slot = (index as usize) & (FANOUT - 1);
        self.leaf(leaf)?[slot] = id;
        self.touched.entry(leaf).or_insert([0; FANOUT / 64])[slot / 64] |= 1 << (slot % 64);
        if self.pages.len() > self.max_dirty_pages {
            self.spill_leaves()?;
        }
        Ok(())
    }

    /// Write every changed leaf out now and keep only its name, in its (changed) parent.
    fn spill_leaves(&mut self) -> Result<(), RepoError> {
        if self.geo.root_level == 0 {
            return Ok(()); // one leaf is the whole map
        }
        let leaves: Vec<u64> = self
            .pages
            .range((0, 0)..=(0, u64::MAX))
            .map(|(k, _)| k.1)
            .collect();
        let inner = self.repo.inner().clone();
        for idx in leaves {
            let page = self.pages.remove(&(0, idx)).expect("listed page");
            let id = inner.store_page(&self.disk, 0, idx, page)?;
            let parent = self.page_mut(1, idx >> FANOUT_BITS)?;
            parent[(idx as usize) & (FANOUT - 1)] = id;
        }
        tracing::debug!(disk = %self.disk, seq = self.meta.seq, parents = self.pages.len(), "changed leaves written early");
        Ok(())
    }

    fn leaf(&mut self, leaf: u64) -> Result<&mut Page, RepoError> {
        self.page_mut(0, leaf)
    }

    /// A changed page, copied from the previous point the first time it is touched (or, for a
    /// leaf written out early, read back by the name its changed parent holds).
    fn page_mut(&mut self, level: u8, index: u64) -> Result<&mut Page, RepoError> {
        if !self.pages.contains_key(&(level, index)) {
            let spilled = (level == 0)
                .then(|| self.pages.get(&(1, index >> FANOUT_BITS)))
                .flatten()
                .map(|parent| parent[(index as usize) & (FANOUT - 1)]);
            let page = match (spilled, &self.prev) {
                (Some(id), _) if id.is_zero() => zero_page(),
                (Some(id), _) => self
                    .repo
                    .inner()
                    .page(&self.disk, 0, index, &id)?
                    .as_ref()
                    .clone(),
                (None, prev) => match prev {
                    Some(p) => self
                        .repo
                        .inner()
                        .find_page(&self.disk, &p.root_page, p.root_level, level, index)?
                        .map_or_else(zero_page, |a| a.as_ref().clone()),
                    None => zero_page(),
                },
            };
            self.pages.insert((level, index), page);
        }
        Ok(self.pages.get_mut(&(level, index)).expect("inserted"))
    }
}

impl Drop for CheckpointWriter<'_> {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(disk = %self.disk, seq = self.meta.seq, "checkpoint abandoned");
        }
        self.finish();
    }
}
