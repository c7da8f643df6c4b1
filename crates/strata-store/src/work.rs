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

    /// Enter an operation: the first one takes the lock shared (waiting
    /// while a gc holds it exclusive).
    pub(crate) fn enter(self: &Arc<Self>) -> Result<Work> {
        let mut inner = self.inner();
        if inner.active == 0 {
            let f = open_lock(&self.lock_path)?;
            lock_blocking(&f, FlockOperation::LockShared)
                .map_err(io_err("locking store (shared)", &self.lock_path))?;
            fs::create_dir_all(&self.staging)
                .map_err(io_err("creating staging dir", &self.staging))?;
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
        fs::create_dir_all(&self.staging)
            .map_err(io_err("creating staging dir", &self.staging))?;
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
