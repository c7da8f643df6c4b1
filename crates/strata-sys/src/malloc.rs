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
    let other = RELEASE.get().is_some_and(|release| release());
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only works on malloc's own state, under the
        // arena locks; any thread may call it at any time.
        (unsafe { libc::malloc_trim(0) == 1 }) || other
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        other
    }
}

/// Give jemalloc's free pages back to the kernel, every arena's
/// (`arena.<MALLCTL_ARENAS_ALL>.purge`): for [`set_release`] in a binary
/// whose global allocator is jemalloc. jemalloc keeps freed pages for
/// reuse (up to 10 s, purged as it allocates more); a daemon that calls
/// [`trim`] once its mount is made and once its reads go quiet costs what
/// its live data needs between bursts. (Decay times of 0 instead made a
/// lazy mount's reads cost 15-20% more CPU.) Whether the purge was done.
#[cfg(feature = "jemalloc")]
pub fn jemalloc_purge() -> bool {
    // SAFETY: a documented mallctl that reads and writes nothing (all
    // four pointers null); the name is NUL-terminated and outlives the
    // call.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        ) == 0
    }
}

/// jemalloc's settings for a spare daemon ([`crate::daemon::spawn_spare`]),
/// as the variable its environment sets them with: one arena (the memory
/// [`prefault`] makes is then the memory every thread allocates from),
/// large blocks from that arena too (not from one that gives them back
/// at once), and nothing given back until [`jemalloc_decay_default`].
pub const SPARE_MALLOC_CONF: (&str, &str) = (
    "_RJEM_MALLOC_CONF",
    "narenas:1,oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1",
);

/// Make `bytes` of memory ready for the allocator and free it again: its
/// pages are faulted in and zeroed now, not when the work that needs them
/// runs. Worth it only where freed memory stays with the allocator (a
/// spare daemon's [`SPARE_MALLOC_CONF`]). A lazy mount's first check,
/// started in a fresh process, took 8,000 page faults; after this, 400
/// (BENCHMARKS.md, issue 16, twelfth run).
pub fn prefault(bytes: usize) {
    const BLOCK: usize = 1 << 20;
    let blocks: Vec<Vec<u8>> = (0..bytes.div_ceil(BLOCK))
        .map(|_| {
            let mut b = Vec::<u8>::with_capacity(BLOCK);
            // one write per page faults it in
            b.resize(BLOCK, 1);
            b
        })
        .collect();
    std::hint::black_box(&blocks);
}

/// jemalloc's default decay (freed pages given back over 10 s), for a
/// spare once its work starts: what it made ready is used in the first
/// hundred milliseconds, the rest goes back. Whether it was set.
#[cfg(feature = "jemalloc")]
pub fn jemalloc_decay_default() -> bool {
    let set = |name: &std::ffi::CStr, mut ms: libc::ssize_t| {
        // SAFETY: a documented mallctl that writes one ssize_t, read from
        // a live local; the name is NUL-terminated.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                (&raw mut ms).cast(),
                std::mem::size_of::<libc::ssize_t>(),
            ) == 0
        }
    };
    set(c"arena.0.dirty_decay_ms", 10_000) & set(c"arena.0.muzzy_decay_ms", 0)
}

static RELEASE: std::sync::OnceLock<fn() -> bool> = std::sync::OnceLock::new();

/// What [`trim`] also calls: a binary whose global allocator is not the C
/// library's gives that allocator's free pages back there (the C
/// library's malloc still serves C code: zstd, the TLS library). Set once;
/// later calls are ignored.
pub fn set_release(release: fn() -> bool) {
    let _ = RELEASE.set(release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "jemalloc")]
    #[test]
    fn jemalloc_purge_gives_freed_pages_back() {
        let dirty = || {
            // SAFETY: "epoch" refreshes jemalloc's statistics (a u64 in,
            // none out); "stats.arenas.4096.pdirty" reads a size_t.
            unsafe {
                let mut e: u64 = 1;
                tikv_jemalloc_sys::mallctl(
                    c"epoch".as_ptr(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    (&raw mut e).cast(),
                    std::mem::size_of::<u64>(),
                );
                let mut v: usize = 0;
                let mut len = std::mem::size_of::<usize>();
                let r = tikv_jemalloc_sys::mallctl(
                    c"stats.arenas.4096.pdirty".as_ptr(),
                    (&raw mut v).cast(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                );
                assert_eq!(r, 0, "jemalloc's statistics");
                v
            }
        };
        // pages jemalloc allocated and got back: kept dirty for reuse
        // SAFETY: plain allocations from jemalloc, each freed once, with
        // the size and alignment they were made with.
        unsafe {
            let layout = std::alloc::Layout::from_size_align(64 << 10, 8).unwrap();
            let blocks: Vec<*mut u8> = (0..64)
                .map(|_| {
                    let p = tikv_jemalloc_sys::malloc(layout.size()).cast::<u8>();
                    assert!(!p.is_null());
                    p.write_bytes(7, layout.size());
                    p
                })
                .collect();
            for p in blocks {
                tikv_jemalloc_sys::free(p.cast());
            }
        }
        assert!(dirty() > 0, "freed pages are kept dirty");
        assert!(jemalloc_purge());
        assert_eq!(dirty(), 0, "every dirty page purged");
    }

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
