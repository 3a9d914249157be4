//! How the data path's processes hand memory back to the kernel.
//!
//! Every checkpoint allocates its touched blocks (64 KiB each) and their sealed blobs, ships them
//! and frees them all; journal reads allocate each record (up to a few MiB). With glibc's
//! defaults, blocks under 128 KiB come from the heap and the freed top of the heap goes back to
//! the kernel as soon as 128 KiB of it is free, so the next checkpoint faults the same tens of
//! MiB in again, page by page, each page cleared by the kernel: measured by `bench/` as a
//! quarter of the drainer's CPU (checkpoint::Builder 313-333 MB/s per core, 391-476 with
//! this). Keeping up to [`TRIM_THRESHOLD`] of freed heap and serving allocations up to
//! [`MMAP_THRESHOLD`] from the heap lets a checkpoint reuse the last one's pages.

/// Allocations up to this size come from the heap (a fixed value also stops glibc from moving
/// the threshold by itself).
pub const MMAP_THRESHOLD: usize = 8 << 20;
/// Freed memory at the top of the heap up to this size is kept for the next checkpoint: about two
/// checkpoints of the shipper's largest size (64 MiB of blocks plus their blobs).
pub const TRIM_THRESHOLD: usize = 256 << 20;

/// Apply the thresholds above to this process's allocator (glibc's malloc). Call it once, early,
/// in a process that runs the data path; it changes nothing else. (Other C libraries keep their
/// own behaviour.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ] {
        // SAFETY: mallopt only sets a tunable of glibc's allocator (it takes the allocator's own
        // lock); both values are in range (M_MMAP_THRESHOLD allows up to 32 MiB on 64-bit).
        let ok = unsafe { libc::mallopt(param, value as libc::c_int) };
        if ok != 1 {
            tracing::warn!(param, value, "mallopt refused an allocator setting");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}
