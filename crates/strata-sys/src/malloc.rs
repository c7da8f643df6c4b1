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
/// whose global allocator is jemalloc. The first call also sets every
/// arena's decay times to 0: from then on a freed page goes back at once
/// (as glibc's malloc does with [`MMAP_THRESHOLD`]), where jemalloc's
/// default keeps freed pages 10 s for reuse. A daemon calls [`trim`]
/// first when its start's burst of allocations is over (the mount made),
/// so the burst runs at jemalloc's speed and what follows (read buffers
/// made and freed) costs what it uses. Whether the purge was done.
#[cfg(feature = "jemalloc")]
pub fn jemalloc_purge() -> bool {
    use std::ffi::{CStr, CString, c_void};
    // SAFETY (each mallctl here): documented jemalloc controls, called
    // with NUL-terminated names that outlive the call and, where a value
    // is read or written, a pointer to a live value of the control's type
    // (unsigned for arenas.narenas, ssize_t for the decay times) with its
    // size.
    let write_ssize = |name: &CStr, v: isize| unsafe {
        let mut v = v;
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&raw mut v).cast::<c_void>(),
            std::mem::size_of::<isize>(),
        ) == 0
    };
    static DECAY: std::sync::Once = std::sync::Once::new();
    DECAY.call_once(|| {
        for knob in ["dirty_decay_ms", "muzzy_decay_ms"] {
            let _ = write_ssize(&CString::new(format!("arenas.{knob}")).expect("no NUL"), 0);
            let mut n: u32 = 0;
            let mut len = std::mem::size_of::<u32>();
            // SAFETY: as above.
            let read = unsafe {
                tikv_jemalloc_sys::mallctl(
                    c"arenas.narenas".as_ptr(),
                    (&raw mut n).cast::<c_void>(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                )
            };
            if read != 0 {
                continue;
            }
            for i in 0..n {
                // arenas not in use refuse it: nothing to do there
                let _ = write_ssize(
                    &CString::new(format!("arena.{i}.{knob}")).expect("no NUL"),
                    0,
                );
            }
        }
    });
    // SAFETY: as above; purge reads and writes nothing (all null).
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
    fn jemalloc_purge_purges_and_then_gives_pages_back_at_once() {
        let decay = || {
            let mut v: isize = -2;
            let mut len = std::mem::size_of::<isize>();
            // SAFETY: reads an ssize_t control into a live ssize_t.
            let r = unsafe {
                tikv_jemalloc_sys::mallctl(
                    c"arenas.dirty_decay_ms".as_ptr(),
                    (&raw mut v).cast(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_ne!(decay(), 0, "jemalloc's default keeps freed pages a while");
        assert!(jemalloc_purge());
        assert_eq!(decay(), 0);
        assert!(jemalloc_purge(), "a second purge works too");
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
