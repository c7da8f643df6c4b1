//! glibc malloc tuning for long-running daemons (lazy mounts, `rootfs
//! serve`): a daemon per mount, 20 of them at once, should cost what its
//! live data needs, not what glibc's defaults keep around.
//!
//! Both functions are no-ops where the C library is not glibc.

/// The most malloc arenas a daemon uses (glibc's default: 8 per core).
pub const ARENA_MAX: i32 = 2;

/// Blocks at least this big are mmapped and unmapped when freed.
pub const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Tune glibc malloc for a daemon. Call it first thing, before any thread
/// starts: arenas that threads created before it stay (arenas are never
/// freed), and blocks allocated before it keep where they were put.
///
/// - `M_ARENA_MAX` = [`ARENA_MAX`]: glibc gives every thread that
///   allocates its own arena, up to 8 per core, and an arena is never
///   freed: each keeps the memory its thread once freed (fetch buffers of
///   read workers that have ended). Two arenas are plenty for a daemon
///   whose threads mostly wait on the network and the kernel.
/// - `M_MMAP_THRESHOLD` = [`MMAP_THRESHOLD`], fixed: glibc raises its
///   threshold (and its trim threshold to twice that) whenever an mmapped
///   block is freed, up to that block's size. fuser frees a 16 MiB request
///   buffer right after the FUSE handshake, so without a fixed threshold
///   every later fetch buffer below 16 MiB comes from an arena, and no
///   arena top below 32 MiB is ever given back. Setting it also turns the
///   dynamic adjustment off.
///
/// Measured on 20 lazy mounts of a Debian+python image (BENCHMARKS.md,
/// "Lazy mount memory"): with [`trim`] and the tar-split dropped, PSS per
/// mount fell from ~50 MB to under 10 MB.
pub fn tune_for_daemon() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two ints and only changes malloc's parameters;
    // it is thread-safe in glibc (takes the arena locks). A 0 return (a
    // parameter refused) leaves the defaults, which is harmless.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Give the free memory at the top of malloc's arenas, and free pages
/// inside them, back to the kernel (`malloc_trim(0)`). Cheap when there is
/// little to give back (it walks the arenas' free lists); call it after a
/// burst of allocations (a mount built, a burst of reads over), not on a
/// hot path. Returns whether memory was released (always `false` where it
/// is a no-op).
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only works on malloc's own state, under the
        // arena locks; any thread may call it at any time.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tune_and_trim_do_not_disturb_malloc() {
        tune_for_daemon();
        // big enough to be mmapped under the new threshold, and small ones
        let big = vec![1u8; 4 << 20];
        let small: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 512]).collect();
        drop(small);
        trim();
        assert_eq!(big.iter().map(|&b| b as usize).sum::<usize>(), 4 << 20);
        let again = vec![2u8; 1 << 20];
        assert_eq!(again[again.len() - 1], 2);
    }
}
