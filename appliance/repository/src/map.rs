//! The block map: a persistent radix tree of content-addressed pages, one tree per recovery point.
//!
//! Why: a recovery point must be cheap to make (a checkpoint every second) and cheap to keep
//! (thousands of points per disk), yet each one must describe the whole disk. A copy-on-write
//! tree gives both: a checkpoint writes only the pages on the paths to its changed blocks and
//! shares every other page with the point before it. Pages are named by
//! [`TenantKey::map_page_id`], a keyed hash over the page bytes AND its disk, level and index, so
//! a page moved to another position or disk, or an entry swapped inside a page, fails the name
//! check; pages are also sealed (AES-GCM) so the storage does not even learn which blocks are equal.
//!
//! How: leaf pages (level 0) hold [`FANOUT`] chunk ids, one per block; interior pages hold
//! [`FANOUT`] child page ids. An all-zero id means "hole" (leaf) or "whole subtree zero"
//! (interior). The page at (level, index) covers blocks `[index << 10*(level+1), ...)`; its child
//! `k` is (level-1, index*FANOUT + k). A tree's root is (root_level, 0). Because a position does
//! not depend on the tree's height, growing a disk just puts a new root above the old one.

use crate::store::Kind;
use crate::{Inner, RepoError};
use ferry_chunk::ChunkId;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

/// Entries per page.
pub(crate) const FANOUT: usize = 1024;
pub(crate) const FANOUT_BITS: u32 = 10;
const PAGE_MAGIC: [u8; 4] = *b"FMP1";
const PAGE_HEADER: usize = 8;
/// Plaintext size of every page: header + FANOUT ids.
pub(crate) const PAGE_BYTES: usize = PAGE_HEADER + FANOUT * 32;

pub(crate) type Page = Vec<ChunkId>;

pub(crate) fn zero_page() -> Page {
    vec![ChunkId::ZERO; FANOUT]
}

/// Shape of one disk's tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub disk_size: u64,
    pub block_size: u32,
    pub blocks: u64,
    pub root_level: u8,
}

impl Geometry {
    pub(crate) fn new(disk_size: u64, block_size: u32) -> Geometry {
        let blocks = disk_size.div_ceil(block_size as u64);
        let mut root_level = 0u8;
        // Smallest root_level with FANOUT^(root_level+1) >= blocks.
        while (root_level as u32 + 1) * FANOUT_BITS < 64
            && blocks > 1u64 << ((root_level as u32 + 1) * FANOUT_BITS)
        {
            root_level += 1;
        }
        Geometry {
            disk_size,
            block_size,
            blocks,
            root_level,
        }
    }

    /// Length of block `index` (the last block may be short).
    pub(crate) fn block_len(&self, index: u64) -> usize {
        let start = index * self.block_size as u64;
        (self.disk_size - start).min(self.block_size as u64) as usize
    }
}

/// Encode a page's plaintext: magic, level, 3 reserved zero bytes, FANOUT ids.
pub(crate) fn encode_page(level: u8, page: &Page) -> Vec<u8> {
    let mut v = Vec::with_capacity(PAGE_BYTES);
    v.extend_from_slice(&PAGE_MAGIC);
    v.extend_from_slice(&[level, 0, 0, 0]);
    for id in page {
        v.extend_from_slice(&id.0);
    }
    v
}

fn decode_page(level: u8, bytes: &[u8]) -> Result<Page, String> {
    if bytes.len() != PAGE_BYTES || bytes[..4] != PAGE_MAGIC || bytes[4..8] != [level, 0, 0, 0] {
        return Err("malformed page".into());
    }
    Ok(bytes[PAGE_HEADER..]
        .chunks_exact(32)
        .map(|c| ChunkId(c.try_into().expect("32 bytes")))
        .collect())
}

/// The AEAD context of a sealed page: a label plus the page's own name.
fn page_context(id: &ChunkId) -> Vec<u8> {
    let mut c = b"ferry map page v1\0".to_vec();
    c.extend_from_slice(&id.0);
    c
}

impl Inner {
    /// Seal and store a page (if new); returns its id, or ZERO for an all-zero page.
    pub(crate) fn store_page(
        &self,
        disk: &str,
        level: u8,
        index: u64,
        page: Page,
    ) -> Result<ChunkId, RepoError> {
        if page.iter().all(|e| e.is_zero()) {
            return Ok(ChunkId::ZERO);
        }
        let plain = encode_page(level, &page);
        let id = self.key.map_page_id(disk, level, index, &plain);
        if !self.store.exists(Kind::Page, &id) {
            let blob = self.key.seal(&plain, &page_context(&id));
            self.store.put(Kind::Page, &id, &blob)?;
        }
        self.pages
            .lock()
            .expect("page cache")
            .insert(id, Arc::new(page));
        Ok(id)
    }

    /// Load, authenticate and cache the page `id` expected at (disk, level, index).
    pub(crate) fn page(
        &self,
        disk: &str,
        level: u8,
        index: u64,
        id: &ChunkId,
    ) -> Result<Arc<Page>, RepoError> {
        if let Some(p) = self.pages.lock().expect("page cache").get(id) {
            return Ok(p);
        }
        let page = Arc::new(self.load_page_uncached(disk, level, index, id)?);
        self.pages
            .lock()
            .expect("page cache")
            .insert(*id, page.clone());
        Ok(page)
    }

    pub(crate) fn load_page_uncached(
        &self,
        disk: &str,
        level: u8,
        index: u64,
        id: &ChunkId,
    ) -> Result<Page, RepoError> {
        let bad = |reason: String| RepoError::BadPage { id: *id, reason };
        let blob = self
            .store
            .get(Kind::Page, id)?
            .ok_or_else(|| bad("missing".into()))?;
        let plain = self
            .key
            .open(&blob, &page_context(id))
            .map_err(|e| bad(e.to_string()))?;
        if self.key.map_page_id(disk, level, index, &plain) != *id {
            return Err(bad("page is not the one named for this position".into()));
        }
        decode_page(level, &plain).map_err(bad)
    }

    /// The page at (level, index) of the tree rooted at (root_level, 0) with id `root`;
    /// `None` when that subtree is all zero (or outside the tree).
    pub(crate) fn find_page(
        &self,
        disk: &str,
        root: &ChunkId,
        root_level: u8,
        level: u8,
        index: u64,
    ) -> Result<Option<Arc<Page>>, RepoError> {
        if level > root_level || root.is_zero() {
            return Ok(None);
        }
        let shift = |l: u8| (l - level) as u32 * FANOUT_BITS;
        if shift(root_level) < 64 && index >> shift(root_level) != 0 {
            return Ok(None);
        }
        let mut cur = *root;
        let mut l = root_level;
        loop {
            let my_index = if shift(l) >= 64 { 0 } else { index >> shift(l) };
            let page = self.page(disk, l, my_index, &cur)?;
            if l == level {
                return Ok(Some(page));
            }
            let child_index = index >> shift(l - 1);
            cur = page[(child_index as usize) & (FANOUT - 1)];
            if cur.is_zero() {
                return Ok(None);
            }
            l -= 1;
        }
    }
}

/// A small LRU map: bounded memory for decrypted pages and chunks. Eviction scans (capacities
/// are a few hundred at most), which keeps it simple and allocation-free on hits.
pub(crate) struct Lru<K, V> {
    cap: usize,
    tick: u64,
    map: HashMap<K, (V, u64)>,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Lru {
            cap: cap.max(1),
            tick: 0,
            map: HashMap::new(),
        }
    }

    pub(crate) fn get(&mut self, k: &K) -> Option<V> {
        self.tick += 1;
        let t = self.tick;
        self.map.get_mut(k).map(|(v, used)| {
            *used = t;
            v.clone()
        })
    }

    pub(crate) fn insert(&mut self, k: K, v: V) {
        self.tick += 1;
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            if let Some(old) = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            {
                self.map.remove(&old);
            }
        }
        self.map.insert(k, (v, self.tick));
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry() {
        let g = Geometry::new(0, 4096);
        assert_eq!((g.blocks, g.root_level), (0, 0));
        let g = Geometry::new(1024 * 4096, 4096);
        assert_eq!((g.blocks, g.root_level), (1024, 0));
        let g = Geometry::new(1024 * 4096 + 1, 4096);
        assert_eq!((g.blocks, g.root_level), (1025, 1));
        assert_eq!(g.block_len(1024), 1);
        assert_eq!(g.block_len(3), 4096);
        let g = Geometry::new(u64::MAX, 512);
        assert_eq!(g.root_level, 5);
    }

    #[test]
    fn page_round_trip_and_lru() {
        let mut p = zero_page();
        p[3] = ChunkId([9; 32]);
        let enc = encode_page(2, &p);
        assert_eq!(enc.len(), PAGE_BYTES);
        assert_eq!(decode_page(2, &enc).unwrap(), p);
        assert!(decode_page(1, &enc).is_err());
        let mut l = Lru::new(2);
        l.insert(1, 1);
        l.insert(2, 2);
        l.get(&1);
        l.insert(3, 3);
        assert_eq!(l.get(&2), None);
        assert_eq!(l.get(&1), Some(1));
        assert_eq!(l.get(&3), Some(3));
    }
}
