//! The store lock, taken per operation.
//!
//! Design note: `lock` is an `flock(2)` lock. Every write into the store
//! happens inside a [`Work`] (shared), gc runs alone (exclusive). A handle
//! does not hold the lock for its life: a daemon that serves a lazy mount
//! or a template for weeks would keep gc out for weeks. Instead each
//! operation (a pull, a conversion, a template build, one commit of
//! fetched contents) enters a [`Work`] for as long as it runs, and what a
//! long-lived holder needs between its operations is kept by a lease
//! (`leases.rs`), which gc reads under its exclusive lock.
//!
//! The guards of one handle share one open file description of `lock`
//! (flock is per open file description): the first guard opens it and
//! takes it shared, the last one closes it. So nested and concurrent
//! operations of one handle never wait for each other, and a gc waiting
//! for the lock cannot deadlock a thread that already works. Each handle
//! has its own staging dir `tmp/<pid>-<n>`, created by the first guard and
//! removed by the last: under the exclusive lock no operation runs
//! anywhere, so every entry of `tmp/` is a leftover of a dead one.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustix::fs::{FlockOperation, flock};

use crate::{Result, StoreError, io_err};

/// The lock state of one store handle, shared with its guards.
#[derive(Debug)]
pub(crate) struct WorkState {
    lock_path: PathBuf,
    staging: PathBuf,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Guards alive.
    active: usize,
    /// `lock`, opened and locked (shared, or exclusive for gc) while
    /// `active > 0`.
    lock: Option<File>,
}

/// An operation on the store in progress: while any [`Work`] of a handle
/// lives, the handle holds the store lock shared (gc waits), and its
/// staging dir exists. Dropping the last one removes the staging dir and
/// releases the lock. Get one with [`crate::Store::work`]; hold it across
/// every step that must not be interleaved with a gc (objects written ->
/// layer committed -> image committed -> ref set).
#[must_use = "the lock is released when the guard is dropped"]
#[derive(Debug)]
pub struct Work {
    state: Arc<WorkState>,
}

impl WorkState {
    pub(crate) fn new(root: &Path, staging: PathBuf) -> Arc<WorkState> {
        Arc::new(WorkState {
            lock_path: root.join("lock"),
            staging,
            inner: Mutex::new(Inner {
                active: 0,
                lock: None,
            }),
        })
    }

    pub(crate) fn staging(&self) -> &Path {
        &self.staging
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // a panic while held leaves counts that are still right
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Create the staging dir. On a full disk the operation goes on
    /// without it: what only reads (fsck, listings) or frees space (gc,
    /// rm) must work then, and what writes fails at its first write with
    /// the disk named.
    fn make_staging(&self) -> Result<()> {
        match fs::create_dir_all(&self.staging) {
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => Ok(()),
            r => r.map_err(io_err("creating staging dir", &self.staging)),
        }
    }

    /// Enter an operation: the first one takes the lock shared (waiting
    /// while a gc holds it exclusive).
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Work> {
        let mut inner = self.inner();
        if inner.active == 0 {
            let f = open_lock(&self.lock_path)?;
            lock_blocking(&f, FlockOperation::LockShared)
                .map_err(io_err("locking store (shared)", &self.lock_path))?;
            self.make_staging()?;
            inner.lock = Some(f);
        }
        inner.active += 1;
        Ok(Work {
            state: self.clone(),
        })
    }

    /// Enter holding `lock`, already locked (exclusive, for gc). Only for
    /// a handle no guard was taken of yet.
    pub(crate) fn enter_locked(self: &Arc<Self>, lock: File) -> Result<Work> {
        let mut inner = self.inner();
        debug_assert_eq!(inner.active, 0, "a fresh handle");
        self.make_staging()?;
        inner.lock = Some(lock);
        inner.active += 1;
        Ok(Work {
            state: self.clone(),
        })
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let mut inner = self.state.inner();
        inner.active -= 1;
        if inner.active == 0 {
            // the staging goes while the lock is still held: nobody takes
            // tmp/ for a leftover while we remove it
            crate::make_writable(&self.state.staging);
            let _ = fs::remove_dir_all(&self.state.staging);
            inner.lock = None;
        }
    }
}

/// The store's lock file, opened (not locked).
pub(crate) fn open_lock(lock_path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(lock_path)
        .map_err(io_err("opening store lock", lock_path))
}

/// `flock` that waits, retried when a signal interrupts it.
pub(crate) fn lock_blocking(f: &File, op: FlockOperation) -> std::io::Result<()> {
    loop {
        match flock(f, op) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Take `lock` exclusive, waiting at most `wait` for the operations that
/// hold it shared. `Ok(None)` when they did not end in time.
///
/// A blocked `flock` cannot be given up, so it waits in a thread of its
/// own; if we stop waiting first, the thread drops the lock as soon as it
/// gets it.
pub(crate) fn lock_exclusive_within(lock_path: &Path, wait: Duration) -> Result<Option<File>> {
    let f = open_lock(lock_path)?;
    if flock(&f, FlockOperation::NonBlockingLockExclusive).is_ok() {
        return Ok(Some(f));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let path = lock_path.to_path_buf();
    std::thread::Builder::new()
        .name("gc-lock".into())
        .spawn(move || {
            let r = lock_blocking(&f, FlockOperation::LockExclusive).map(|()| f);
            // an error to send back means the waiter left: dropping the
            // file releases the lock
            let _ = tx.send(r);
        })
        .map_err(io_err("starting a thread to wait for", &path))?;
    match rx.recv_timeout(wait) {
        Ok(Ok(f)) => Ok(Some(f)),
        Ok(Err(e)) => Err(io_err("locking store (exclusive)", lock_path)(e)),
        Err(_) => Ok(None),
    }
}

/// Pids that hold a flock on `lock_path` now (from /proc/locks), for
/// saying who keeps gc waiting.
pub(crate) fn lock_holders(lock_path: &Path) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(ino) = fs::metadata(lock_path).map(|m| m.ino()) else {
        return Vec::new();
    };
    let Ok(locks) = fs::read_to_string("/proc/locks") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = locks
        .lines()
        .filter_map(|line| {
            // "1: FLOCK  ADVISORY  READ  1234 fd:01:5678 0 EOF"; blocked
            // waiters are listed as "1: -> FLOCK ..."
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(1) != Some(&"FLOCK") {
                return None;
            }
            let lock_ino: u64 = f.get(5)?.rsplit(':').next()?.parse().ok()?;
            (lock_ino == ino).then(|| f.get(4)?.parse().ok())?
        })
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Why gc did not get the store alone.
pub(crate) fn busy(root: &Path, lock_path: &Path) -> Result<StoreError> {
    let leases = crate::leases::all(root)?;
    let holders = lock_holders(lock_path)
        .into_iter()
        .map(|pid| {
            let named: Vec<&str> = leases
                .iter()
                .filter(|(_, l)| l.pid == pid && l.holder_runs())
                .map(|(_, l)| l.holder.as_str())
                .collect();
            if named.is_empty() {
                let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                format!("{} (pid {pid})", comm.trim())
            } else {
                format!("{} (pid {pid})", named.join(", "))
            }
        })
        .collect();
    Ok(StoreError::Busy {
        path: root.to_path_buf(),
        holders,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use strata_ops::Ctl;

    use crate::{LeaseRoots, Store, StoreError};

    use super::*;

    fn tmp_entries(root: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(root.join("tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn an_idle_handle_does_not_keep_gc_out_and_a_working_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&root).unwrap();
        // idle: gc runs at once
        let t = Instant::now();
        drop(Store::open_for_gc_within(&root, Duration::from_secs(5)).unwrap());
        assert!(t.elapsed() < Duration::from_secs(2));
        // working: gc waits, then says who keeps it out
        let work = store.work().unwrap();
        let nested = store.work().unwrap();
        match Store::open_for_gc_within(&root, Duration::from_millis(200)) {
            Err(StoreError::Busy { holders, .. }) => {
                let me = format!("pid {}", std::process::id());
                assert!(holders.iter().any(|h| h.contains(&me)), "{holders:?}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("gc got the store while an operation runs"),
        }
        drop(work);
        assert!(
            Store::open_for_gc_within(&root, Duration::from_millis(200)).is_err(),
            "a nested guard still holds the lock"
        );
        // gc waits for the operation that ends
        let ended = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(nested);
        });
        let t = Instant::now();
        let gc = Store::open_for_gc_within(&root, Duration::from_secs(10)).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(250));
        ended.join().unwrap();
        // gc's own writes (dropping a template) do not wait for itself
        gc.gc(false, Ctl::none()).unwrap();
        // operations wait for gc
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let w = store.work().unwrap();
            tx.send(Instant::now()).unwrap();
            drop(w);
            store
        });
        std::thread::sleep(Duration::from_millis(200));
        let released = Instant::now();
        drop(gc);
        assert!(rx.recv().unwrap() >= released);
        waiter.join().unwrap();
    }

    #[test]
    fn staging_lives_as_long_as_the_operations_of_a_handle() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&root).unwrap();
        assert!(tmp_entries(&root).is_empty(), "nothing staged while idle");
        let mut batch = store.object_batch().unwrap();
        batch.put(&mut &b"hello"[..], 5).unwrap();
        assert_eq!(tmp_entries(&root).len(), 1, "the handle's staging dir");
        let scratch = store.scratch_path("x").unwrap();
        fs::write(&scratch, b"scratch").unwrap();
        drop(batch);
        assert!(tmp_entries(&root).is_empty(), "removed with the last guard");
        // a killed process's staging goes at the next open
        fs::create_dir_all(root.join("tmp/999999999-0/objects")).unwrap();
        let other = Store::open(&root).unwrap();
        assert!(tmp_entries(&root).is_empty(), "{:?}", tmp_entries(&root));
        // a live pid's leftovers (a handle dropped mid-way by a panic, say)
        // go when gc has the store alone
        fs::create_dir_all(root.join(format!("tmp/{}-77", std::process::id()))).unwrap();
        let _w = other.work().unwrap();
        drop(Store::open(&root).unwrap());
        assert_eq!(tmp_entries(&root).len(), 2, "kept while others work");
        drop(_w);
        drop(Store::open_for_gc(&root).unwrap());
        assert!(tmp_entries(&root).is_empty(), "{:?}", tmp_entries(&root));
    }

    #[test]
    fn gc_keeps_what_a_lease_names_and_sweeps_the_rest_while_a_holder_idles() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let store = Store::open(&root).unwrap();
        let put = |bytes: &[u8]| {
            let mut b = store.object_batch().unwrap();
            let d = b.put(&mut &bytes[..], bytes.len() as u64).unwrap();
            b.commit().unwrap();
            d
        };
        let kept = put(b"leased content");
        let _lease = store
            .lease(
                "test holder",
                LeaseRoots {
                    objects: vec![kept],
                    ..Default::default()
                },
            )
            .unwrap();
        let swept = put(b"nobody's content");
        // the holder stays open (a daemon), between its operations
        let gc = Store::open_for_gc_within(&root, Duration::from_secs(5)).unwrap();
        let r = gc.gc(false, Ctl::none()).unwrap();
        assert_eq!(r.objects, 1, "{r:?}");
        drop(gc);
        assert!(store.has_object(&kept));
        assert!(!store.has_object(&swept));
        // and it writes again afterwards
        let again = put(b"nobody's content");
        assert_eq!(again, swept);
        assert!(store.has_object(&swept));
    }
}
