//! Point readers: serve one recovery point, read-only, at any offset.
//!
//! Why: instant recovery exports a point over NBD the moment it is asked for, whatever the disk
//! size, so a reader must not materialize anything; and it must never return wrong data: every
//! chunk is authenticated against its name and every page against its name *and* position on
//! each load from storage, and a failure is an error (`BadChunk`/`BadPage`/`MissingChunk`), never
//! bytes. A reader owns `Arc`s only, so it can live in another thread or task for as long as
//! the point is served; its memory is bounded by a small LRU of decrypted chunks (plus the
//! repository's shared LRU of pages). While it lives, its point is pinned: retention skips it.

use crate::map::{Geometry, Lru, FANOUT, FANOUT_BITS};
use crate::root::PointRecord;
use crate::store::Kind;
use crate::{Inner, RepoError};
use ferry_chunk::ChunkId;
use std::sync::{Arc, Mutex};

const CHUNK_CACHE: usize = 64; // 64 * 64 KiB = 4 MiB at the default block size

pub struct PointReader {
    inner: Arc<Inner>,
    rec: PointRecord,
    geo: Geometry,
    chunks: Mutex<Lru<ChunkId, Arc<Vec<u8>>>>,
}

impl Drop for PointReader {
    fn drop(&mut self) {
        let key = (self.rec.point.disk.clone(), self.rec.point.meta.seq);
        let mut pins = self.inner.pins.lock().expect("pins");
        if let Some(n) = pins.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&key);
            }
        }
    }
}

/// Load and authenticate a chunk from the store.
pub(crate) fn load_chunk(inner: &Inner, id: &ChunkId) -> Result<Vec<u8>, RepoError> {
    let blob = inner
        .store
        .get(Kind::Chunk, id)?
        .ok_or(RepoError::MissingChunk(*id))?;
    inner
        .key
        .open_chunk(id, &blob)
        .map_err(|e| RepoError::BadChunk {
            id: *id,
            reason: e.to_string(),
        })
}

impl PointReader {
    pub(crate) fn new(inner: Arc<Inner>, rec: PointRecord) -> Self {
        let geo = rec.geometry();
        PointReader {
            inner,
            rec,
            geo,
            chunks: Mutex::new(Lru::new(CHUNK_CACHE)),
        }
    }

    /// The disk's size in bytes at this point.
    pub fn size(&self) -> u64 {
        self.geo.disk_size
    }

    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }

    /// The point this reader serves.
    pub fn point(&self) -> &crate::RecoveryPoint {
        &self.rec.point
    }

    /// The chunk id of a block (ZERO for a hole).
    pub fn block_id(&self, block: u64) -> Result<ChunkId, RepoError> {
        if block >= self.geo.blocks {
            return Err(RepoError::Invalid(format!("block {block} beyond the disk")));
        }
        let leaf = self.inner.find_page(
            &self.rec.point.disk,
            &self.rec.root_page,
            self.rec.root_level,
            0,
            block >> FANOUT_BITS,
        )?;
        Ok(leaf.map_or(ChunkId::ZERO, |p| p[(block as usize) & (FANOUT - 1)]))
    }

    pub fn is_hole(&self, block: u64) -> Result<bool, RepoError> {
        Ok(self.block_id(block)?.is_zero())
    }

    /// A block's content (exactly its length), or `None` for a hole.
    pub fn read_block(&self, block: u64) -> Result<Option<Arc<Vec<u8>>>, RepoError> {
        let id = self.block_id(block)?;
        if id.is_zero() {
            return Ok(None);
        }
        if let Some(c) = self.chunks.lock().expect("chunk cache").get(&id) {
            return Ok(Some(c));
        }
        let mut plain = load_chunk(&self.inner, &id)?;
        let len = self.geo.block_len(block);
        if plain.len() > len {
            return Err(RepoError::BadChunk {
                id,
                reason: "chunk longer than its block".into(),
            });
        }
        // A chunk shorter than its block was the short last block before the disk grew.
        plain.resize(len, 0);
        let c = Arc::new(plain);
        self.chunks
            .lock()
            .expect("chunk cache")
            .insert(id, c.clone());
        Ok(Some(c))
    }

    /// Fill `buf` with the point's bytes at `offset`; the range must lie within the disk.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RepoError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.geo.disk_size)
            .ok_or_else(|| {
                RepoError::Invalid(format!(
                    "read of {} bytes at {offset} beyond the disk ({} bytes)",
                    buf.len(),
                    self.geo.disk_size
                ))
            })?;
        let bs = self.geo.block_size as u64;
        let mut pos = offset;
        while pos < end {
            let block = pos / bs;
            let in_block = (pos % bs) as usize;
            let n = ((bs - pos % bs).min(end - pos)) as usize;
            let out = &mut buf[(pos - offset) as usize..(pos - offset) as usize + n];
            match self.read_block(block)? {
                None => out.fill(0),
                Some(data) => out.copy_from_slice(&data[in_block..in_block + n]),
            }
            pos += n as u64;
        }
        Ok(())
    }
}
