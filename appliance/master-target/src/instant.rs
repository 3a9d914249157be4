//! Instant access: a recovery point served read-only over NBD, straight from the repository.
//!
//! Nothing is copied: each read decrypts the chunks it touches (the repository's reader checks
//! every chunk against its name, so a damaged chunk is an I/O error, never wrong data), and
//! `base:allocation` reports holes so `qemu-img convert` and friends skip them.

use ferry_nbd::{Errno, Export, NbdResult};
use ferry_repository::PointReader;
use std::sync::Arc;

pub struct PointExport {
    pub reader: Arc<PointReader>,
}

const STATE_HOLE_ZERO: u32 = 3;

#[async_trait::async_trait]
impl Export for PointExport {
    fn size(&self) -> u64 {
        self.reader.size()
    }

    fn read_only(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, len: u32) -> NbdResult<Vec<u8>> {
        let r = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            r.read_at(offset, &mut buf).map(|_| buf)
        })
        .await
        .map_err(|_| Errno::Io)?
        .map_err(|e| {
            tracing::error!(offset, len, error = %e, "instant access read failed");
            Errno::Io
        })
    }

    async fn write(&self, _: u64, _: Vec<u8>, _: bool) -> NbdResult<()> {
        Err(Errno::Perm)
    }

    async fn write_zeroes(&self, _: u64, _: u32, _: bool) -> NbdResult<()> {
        Err(Errno::Perm)
    }

    async fn trim(&self, _: u64, _: u32, _: bool) -> NbdResult<()> {
        Err(Errno::Perm)
    }

    async fn flush(&self) -> NbdResult<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> NbdResult<Vec<(u32, u32)>> {
        let r = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let bs = u64::from(r.block_size());
            let end = (offset + u64::from(len)).min(r.size());
            let mut out: Vec<(u32, u32)> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let block = pos / bs;
                let next = ((block + 1) * bs).min(end);
                let flags = if r.is_hole(block)? {
                    STATE_HOLE_ZERO
                } else {
                    0
                };
                let n = (next - pos) as u32;
                match out.last_mut() {
                    Some((l, f)) if *f == flags => *l += n,
                    _ => out.push((n, flags)),
                }
                pos = next;
            }
            Ok::<_, ferry_repository::RepoError>(out)
        })
        .await
        .map_err(|_| Errno::Io)?
        .map_err(|_| Errno::Io)
    }
}
