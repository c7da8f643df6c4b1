//! The FUSE half of a lazy mount: the image's file contents named by
//! digest in the store's objects/ layout (`/<2 hex>/<62 hex>`), read-only.
//!
//! A lazy mount is a composefs mount. The tree (from the TOCs) becomes an
//! EROFS image whose files redirect to their objects; overlayfs stacks it
//! over two data-only layers: the mount's directory of links to the
//! objects checked for it (`<mdir>/verified`, see the fetcher's docs)
//! first, then this filesystem. Directories, symlinks, attributes and
//! xattrs come from EROFS in the kernel, and a file whose object was
//! checked (or belongs to a layer the store has) is read from the store
//! without the daemon. Only contents missing when a file
//! is first opened are looked up here: they are served from the
//! [`Fetcher`] (checked whole against the TOC and the tar-split first),
//! or by passthrough once checked and local.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
    SessionACL,
};
use strata_digest::Digest;
use strata_tree::{NodeKind, Tree};

use crate::Fetcher;

/// Contents never change: the kernel may cache everything for long.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Inode of the root directory.
const ROOT: u64 = 1;
/// Inode of the fan-out directory `00`; `ff` is `FAN0 + 255`.
const FAN0: u64 = 2;
/// Inode of the first content (in digest order).
const FILE0: u64 = FAN0 + 256;

/// What an open file reads from.
enum Open {
    /// The object in the store, read by the daemon (passthrough off, or
    /// other opens of the inode are served by the daemon).
    Object(File),
    /// Passthrough to the object: the kernel reads it without us (the
    /// file is kept for reads the kernel still sends).
    Backing(Arc<BackingId>),
    /// Not in the store when opened: fetched on demand.
    Lazy,
}

#[derive(Default)]
struct InodeIo {
    backing: std::sync::Weak<BackingId>,
    served: usize,
}

/// Contents opened, in first-open order (`--record`). Every open of a
/// file reaches this filesystem when it is the mount's only data layer.
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<(HashSet<Digest>, Vec<Digest>)>,
}

impl Recorder {
    fn note(&self, d: Digest) {
        let mut seen = self.seen.lock().expect("no panics while held");
        if seen.0.insert(d) {
            seen.1.push(d);
        }
    }

    /// The paths (relative to the root) of the files whose contents were
    /// opened, in first-open order; a content several files share gives
    /// all their paths.
    pub fn paths(&self, tree: &Tree) -> Vec<Vec<u8>> {
        let order = self.seen.lock().expect("no panics while held").1.clone();
        let wanted: HashSet<&Digest> = order.iter().collect();
        let mut by_digest: HashMap<Digest, Vec<Vec<u8>>> = HashMap::new();
        for (path, node) in tree.walk() {
            if let NodeKind::Regular { digest, .. } = &node.kind
                && wanted.contains(digest)
            {
                by_digest.entry(*digest).or_default().push(path);
            }
        }
        order
            .iter()
            .flat_map(|d| by_digest.remove(d).unwrap_or_default())
            .collect()
    }
}

/// The filesystem.
pub struct LazyFs {
    fetcher: Arc<Fetcher>,
    /// The image's non-empty contents, sorted: content `i` is inode
    /// `FILE0 + i`.
    files: Vec<(Digest, u64)>,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    /// The kernel allows one backing file per inode at a time, and no
    /// passthrough open while the inode has opens served by us: per inode,
    /// its backing (while some open uses it) and how many opens we serve.
    modes: Mutex<HashMap<u64, InodeIo>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    want_passthrough: bool,
    recorder: Option<Arc<Recorder>>,
    opens: Arc<AtomicU64>,
    all_local: Arc<AtomicBool>,
    /// Passthrough opens not released yet.
    passthrough_open: AtomicU64,
    /// Objects read by inode once the kernel stopped sending opens.
    by_inode: Mutex<HashMap<u64, Arc<File>>>,
    /// Backing files kept registered after their last close, so reopening
    /// a file costs no syscall (most recent [`KEEP_BACKING`]).
    keep: Mutex<std::collections::VecDeque<Arc<BackingId>>>,
    /// Reads that may wait for the network run here, so the few FUSE
    /// threads keep answering lookups and cached reads.
    pool: PoolHandle,
}

type Job = Box<dyn FnOnce() + Send>;

/// How many closed files stay registered for passthrough.
const KEEP_BACKING: usize = 16384;

/// How many objects stay open for reads by inode.
const BY_INODE: usize = 512;

/// A read worker with no job for this long ends.
const WORKER_IDLE_EXIT: Duration = Duration::from_secs(5);

/// Stack of a read worker. A worker runs one [`Fetcher::read`]: the HTTP
/// request waits on reqwest's runtime thread and zstd keeps its state on
/// the heap, so a few dozen KiB are used. Only touched pages are resident
/// (and glibc gives them back when the thread ends): the limit bounds
/// address space, with room to spare against an overflow.
const WORKER_STACK: usize = 512 * 1024;

/// Threads for reads that may wait for the network.
///
/// Design note (issue 14, "lazy mounts cost little"): a mount used to
/// start `read_workers` threads (16 by default) up front and keep them
/// for its whole life, though most of it is spent idle (a container
/// reads its image in a burst, then runs from the page cache). Each
/// thread costs its stack and, with glibc, soon its own malloc arena
/// that keeps freed fetch buffers resident. Workers now start when a job
/// finds none idle, at most `max`, and end after [`WORKER_IDLE_EXIT`]
/// without work: an idle mount has none, a burst still gets `max`.
struct ReadPool {
    state: Mutex<PoolState>,
    work: Condvar,
    max: usize,
    idle_exit: Duration,
}

#[derive(Default)]
struct PoolState {
    queue: std::collections::VecDeque<Job>,
    /// Workers running.
    live: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// Set when the filesystem is gone: workers end once the queue is empty.
    closed: bool,
}

impl ReadPool {
    fn new(max: usize, idle_exit: Duration) -> Arc<ReadPool> {
        Arc::new(ReadPool {
            state: Mutex::new(PoolState::default()),
            work: Condvar::new(),
            max: max.max(1),
            idle_exit,
        })
    }

    /// Run `job` on a worker; a new one when every worker is busy and
    /// fewer than `max` run, else it waits in the queue.
    fn submit(self: &Arc<Self>, job: Job) {
        let mut st = self.state.lock().expect("no panics while held");
        st.queue.push_back(job);
        if st.queue.len() <= st.idle {
            self.work.notify_one();
            return;
        }
        if st.live >= self.max {
            return;
        }
        st.live += 1;
        let n = st.live;
        drop(st);
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lazy-read-{n}"))
            .stack_size(WORKER_STACK)
            .spawn(move || pool.work_loop());
        if let Err(e) = spawned {
            let mut st = self.state.lock().expect("no panics while held");
            st.live -= 1;
            tracing::warn!("starting a read worker: {e}");
            // nobody would run it: run it here
            if st.live == 0
                && let Some(job) = st.queue.pop_front()
            {
                drop(st);
                job();
            }
        }
    }

    fn work_loop(&self) {
        // counted out however the thread ends (a job that panics too)
        struct Leave<'a>(&'a ReadPool);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                let mut st = match self.0.state.lock() {
                    Ok(st) => st,
                    Err(poisoned) => poisoned.into_inner(),
                };
                st.live -= 1;
            }
        }
        let _leave = Leave(self);
        let mut st = self.state.lock().expect("no panics while held");
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                job();
                st = self.state.lock().expect("no panics while held");
                continue;
            }
            if st.closed {
                break;
            }
            st.idle += 1;
            let (guard, wait) = self
                .work
                .wait_timeout(st, self.idle_exit)
                .expect("no panics while held");
            st = guard;
            st.idle -= 1;
            if wait.timed_out() && st.queue.is_empty() {
                break;
            }
        }
    }
}

/// Ends the read workers when the filesystem is dropped.
struct PoolHandle(Arc<ReadPool>);

impl Drop for PoolHandle {
    fn drop(&mut self) {
        self.0.state.lock().expect("no panics while held").closed = true;
        self.0.work.notify_all();
    }
}

/// Mount options for [`LazyFs::mount`].
pub struct MountConfig {
    /// Serve fully cached files by FUSE passthrough when the kernel can.
    pub passthrough: bool,
    /// FUSE threads (lookups and cached reads; few is fastest).
    pub threads: usize,
    /// Most threads for reads that fetch (started on demand, ending
    /// when idle).
    pub read_workers: usize,
    /// Record the contents opened.
    pub recorder: Option<Arc<Recorder>>,
    /// Shown as the mount's source in mountinfo.
    pub fsname: String,
    /// Counts the opens this filesystem answered.
    pub opens: Arc<AtomicU64>,
    /// Set once every content of the image is in the store. Files opened
    /// after that are read from objects/ by overlayfs; files it bound to
    /// this filesystem earlier keep coming here, so opens then answer
    /// ENOSYS (once no passthrough open is left): the kernel stops sending
    /// them (and their releases) and reads by inode through its page
    /// cache. Ignored while recording.
    pub all_local: Arc<AtomicBool>,
}

impl LazyFs {
    /// A filesystem of `fetcher`'s image's contents.
    pub fn new(fetcher: Arc<Fetcher>, cfg: &MountConfig) -> LazyFs {
        let mut files: Vec<(Digest, u64)> = fetcher
            .image()
            .tree
            .reachable()
            .filter_map(|n| match n.kind {
                NodeKind::Regular { digest, size } if size > 0 => Some((digest, size)),
                _ => None,
            })
            .collect();
        files.sort_unstable();
        files.dedup_by_key(|f| f.0);
        LazyFs {
            fetcher,
            files,
            open: Mutex::new(HashMap::new()),
            modes: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            want_passthrough: cfg.passthrough,
            recorder: cfg.recorder.clone(),
            opens: cfg.opens.clone(),
            all_local: cfg.all_local.clone(),
            passthrough_open: AtomicU64::new(0),
            by_inode: Mutex::new(HashMap::new()),
            keep: Mutex::new(std::collections::VecDeque::new()),
            pool: PoolHandle(ReadPool::new(cfg.read_workers, WORKER_IDLE_EXIT)),
        }
    }

    /// Mount at `dir` and serve in background threads until unmounted.
    pub fn mount(self, dir: &Path, cfg: &MountConfig) -> io::Result<fuser::BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName(cfg.fsname.clone()),
            MountOption::Subtype("strata".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(cfg.threads.max(1));
        config.clone_fd = true;
        fuser::spawn_mount(self, dir, &config)
    }

    /// The content of inode `ino`, and its size.
    fn content(&self, ino: INodeNo) -> Option<(Digest, u64)> {
        self.files.get(ino.0.checked_sub(FILE0)? as usize).copied()
    }

    /// Contents under fan-out directory `fan` (first digest byte).
    fn fan_range(&self, fan: u8) -> std::ops::Range<usize> {
        let lo = self.files.partition_point(|f| f.0.as_bytes()[0] < fan);
        let hi = self.files.partition_point(|f| f.0.as_bytes()[0] <= fan);
        lo..hi
    }

    fn dir_attr(ino: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size: 4096,
            blocks: 8,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino.0 == ROOT || (FAN0..FILE0).contains(&ino.0) {
            return Some(Self::dir_attr(ino.0));
        }
        let (_, size) = self.content(ino)?;
        Some(FileAttr {
            size,
            blocks: size.div_ceil(512),
            kind: FileType::RegularFile,
            perm: 0o444,
            nlink: 1,
            ..Self::dir_attr(ino.0)
        })
    }

    /// A read that may need the network: on the worker pool.
    fn read_lazy(&self, digest: Digest, len: u64, offset: u64, size: u32, reply: ReplyData) {
        let fetcher = self.fetcher.clone();
        // a panic in the fetch is this request's EIO, not a dead worker
        // and a reader stuck in the kernel (the fetcher undoes its claims)
        let job: Job = Box::new(move || {
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                fetcher.read_streamed(&digest, len, offset, size)
            }));
            match read {
                Ok(Ok((data, rest))) => {
                    reply.data(&data);
                    // a program's or module's first read: what it loads
                    // next is looked up once the reader has its bytes (a
                    // module's imports take a parse), and fetched after
                    // the neighbours its request brings are taken
                    let deps = match offset {
                        0 => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            fetcher.deps_to_prefetch(&digest)
                        }))
                        .unwrap_or_else(|_| {
                            tracing::error!("looking at what {digest} loads panicked");
                            Default::default()
                        }),
                        _ => Default::default(),
                    };
                    if let Some(rest) = rest {
                        finish_rest(rest);
                    }
                    if !deps.is_empty() {
                        fetch_deps(&fetcher, &digest, || deps);
                    }
                }
                Ok(Err(e)) => {
                    let path = path_of(&fetcher.image().tree, &digest);
                    tracing::error!("read of {path} (bytes {offset}+{size}) failed: {e}");
                    reply.error(Errno::EIO)
                }
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("?");
                    tracing::error!(
                        "read of {digest} (bytes {offset}+{size}) panicked: {why}: EIO"
                    );
                    fetcher.stats.errors.fetch_add(1, Ordering::Relaxed);
                    reply.error(Errno::EIO)
                }
            }
        });
        self.pool.0.submit(job);
    }
}

impl LazyFs {
    /// A read without an open (the kernel stopped sending them): from the
    /// object, kept open for the next read of the inode.
    fn read_by_inode(
        &self,
        ino: INodeNo,
        digest: Digest,
        len: u64,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let cached = self
            .by_inode
            .lock()
            .expect("no panics while held")
            .get(&ino.0)
            .cloned();
        let file = match cached {
            Some(f) => f,
            None => match self.fetcher.open_verified(&digest) {
                Ok(Some(f)) => {
                    let f = Arc::new(f);
                    let mut open = self.by_inode.lock().expect("no panics while held");
                    if open.len() >= BY_INODE {
                        open.clear();
                    }
                    open.insert(ino.0, f.clone());
                    f
                }
                // not checked yet (or refused): the fetcher decides
                _ => return self.read_lazy(digest, len, offset, size, reply),
            },
        };
        reply_file_at(&file, offset, size, reply);
    }
}

/// Fetch what the program `digest` loads (`deps()` says what), on a
/// worker: a panic there is logged, never the worker's end.
fn fetch_deps(fetcher: &Fetcher, digest: &Digest, deps: impl FnOnce() -> crate::fetch::Loads) {
    let run = std::panic::AssertUnwindSafe(|| fetcher.fetch_deps(digest, deps()));
    if std::panic::catch_unwind(run).is_err() {
        tracing::error!("fetching the libraries of {digest} panicked");
    }
}

/// Take the rest of a read's request, on its worker after the reply: a
/// panic there is logged, never the worker's end (the span's drop
/// releases what it did not take).
fn finish_rest(rest: crate::fetch::ReadRest<'_>) {
    let run = std::panic::AssertUnwindSafe(|| rest.finish());
    if std::panic::catch_unwind(run).is_err() {
        tracing::error!("taking the neighbours of a read panicked");
    }
}

/// A path of a file with content `digest` (for log lines).
fn path_of(tree: &Tree, digest: &Digest) -> String {
    tree.walk()
        .find(|(_, n)| matches!(&n.kind, NodeKind::Regular { digest: d, .. } if d == digest))
        .map(|(p, _)| format!("/{}", String::from_utf8_lossy(&p)))
        .unwrap_or_else(|| digest.to_string())
}

/// Read up to `size` bytes at `offset` and reply with them, through a
/// buffer each thread keeps (a fresh zeroed megabyte per read costs page
/// faults).
fn reply_file_at(f: &File, offset: u64, size: u32, reply: ReplyData) {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.len() < size as usize {
            buf.resize(size as usize, 0);
        }
        let buf = &mut buf[..size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return reply.error(e.into()),
            }
        }
        reply.data(&buf[..got]);
    })
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if self.want_passthrough {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    let _ = config.set_max_stack_depth(1);
                    self.passthrough.store(true, Ordering::Relaxed);
                }
                Err(_) => tracing::warn!(
                    "the kernel offers no FUSE passthrough: fetched files are served through the daemon"
                ),
            }
        }
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = name.as_bytes();
        let ino = match parent.0 {
            // one spelling per name: lowercase hex only
            _ if !name.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) => None,
            ROOT => std::str::from_utf8(name)
                .ok()
                .filter(|n| n.len() == 2)
                .and_then(|n| u8::from_str_radix(n, 16).ok())
                .map(|fan| FAN0 + fan as u64),
            p if (FAN0..FILE0).contains(&p) => std::str::from_utf8(name)
                .ok()
                .filter(|n| n.len() == 62)
                .and_then(|n| format!("sha256:{:02x}{n}", p - FAN0).parse::<Digest>().ok())
                .and_then(|d| self.files.binary_search_by_key(&d, |f| f.0).ok())
                .map(|i| FILE0 + i as u64),
            _ => None,
        };
        match ino.and_then(|i| self.attr(INodeNo(i))) {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some((digest, _)) = self.content(ino) else {
            return reply.error(Errno::EISDIR);
        };
        if let Some(rec) = &self.recorder {
            rec.note(digest);
        } else if self.all_local.load(Ordering::Relaxed)
            && self.passthrough_open.load(Ordering::SeqCst) == 0
        {
            // "no open": the kernel opens files itself from now on. Only
            // once no passthrough open is left: fuse_file_mmap refuses
            // (ENODEV) a file opened without us while its inode has a
            // backing file, which would break exec and dlopen.
            return reply.error(Errno::ENOSYS);
        }
        self.opens.fetch_add(1, Ordering::Relaxed);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut modes = self.modes.lock().expect("no panics while held");
        let io = modes.entry(ino.0).or_default();
        let passthrough = self.passthrough.load(Ordering::Relaxed) && io.served == 0;
        let cached = io.backing.upgrade().filter(|_| passthrough);
        let how = match cached {
            // the kernel holds the object open already: no syscall here
            Some(id) => Open::Backing(id),
            // only objects served without a check (trusted, or checked
            // already): the others are checked by a read on the pool
            None => match self.fetcher.open_verified(&digest).ok().flatten().ok_or(()) {
                Ok(f) if passthrough => match reply.open_backing(&f) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        io.backing = Arc::downgrade(&id);
                        let mut keep = self.keep.lock().expect("no panics while held");
                        keep.push_back(id.clone());
                        if keep.len() > KEEP_BACKING {
                            keep.pop_front();
                        }
                        Open::Backing(id)
                    }
                    Err(e) => {
                        tracing::warn!("passthrough refused ({e}): serving through the daemon");
                        self.passthrough.store(false, Ordering::Relaxed);
                        Open::Object(f)
                    }
                },
                Ok(f) => Open::Object(f),
                Err(_) => Open::Lazy,
            },
        };
        if matches!(how, Open::Backing(..)) {
            self.passthrough_open.fetch_add(1, Ordering::SeqCst);
        } else {
            io.served += 1;
        }
        drop(modes);
        if !matches!(how, Open::Lazy) && !self.fetcher.deps_seen(&digest) {
            // a program or library that arrived with others (a neighbour,
            // a prefetch): what it loads is fetched while it is mapped
            let fetcher = self.fetcher.clone();
            self.pool.0.submit(Box::new(move || {
                fetch_deps(&fetcher, &digest, || fetcher.deps_to_prefetch(&digest))
            }));
        }
        let how = Arc::new(how);
        self.open
            .lock()
            .expect("no panics while held")
            .insert(fh, how.clone());
        match &*how {
            Open::Backing(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, id)
            }
            _ => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some((digest, len)) = self.content(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let how = self
            .open
            .lock()
            .expect("no panics while held")
            .get(&fh.0)
            .cloned();
        if self.fetcher.inconsistent().is_some() {
            // nothing more is served once a layer failed its diff_id
            return reply.error(Errno::EIO);
        }
        match how.as_deref() {
            Some(Open::Object(f)) => reply_file_at(f, offset, size, reply),
            None if fh.0 == 0 => self.read_by_inode(ino, digest, len, offset, size, reply),
            // passthrough files are read by the kernel; stray reads, and
            // reads without an open, go through the fetcher (local first)
            _ => self.read_lazy(digest, len, offset, size, reply),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let how = self
            .open
            .lock()
            .expect("no panics while held")
            .remove(&fh.0);
        if matches!(how.as_deref(), Some(Open::Backing(..))) {
            self.passthrough_open.fetch_sub(1, Ordering::SeqCst);
        }
        let mut modes = self.modes.lock().expect("no panics while held");
        if let Some(how) = how
            && let Some(io) = modes.get_mut(&ino.0)
        {
            if !matches!(*how, Open::Backing(..)) {
                io.served = io.served.saturating_sub(1);
            }
            drop(how);
            if io.served == 0 && io.backing.strong_count() == 0 {
                modes.remove(&ino.0);
            }
        }
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // nothing to flush on a read-only mount: the kernel stops asking
        reply.error(Errno::ENOSYS);
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // "no opendir": listings never change, no OPENDIR round trips
        reply.error(Errno::ENOSYS);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut entries: Vec<(u64, FileType, String)> = vec![
            (ino.0, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        if ino.0 == ROOT {
            entries.extend(
                (0..=255u8)
                    .filter(|fan| !self.fan_range(*fan).is_empty())
                    .map(|fan| (FAN0 + fan as u64, FileType::Directory, format!("{fan:02x}"))),
            );
        } else if (FAN0..FILE0).contains(&ino.0) {
            let range = self.fan_range((ino.0 - FAN0) as u8);
            entries.extend(range.map(|i| {
                let hex = self.files[i].0.hex();
                (
                    FILE0 + i as u64,
                    FileType::RegularFile,
                    hex[2..].to_string(),
                )
            }));
        } else {
            return reply.error(Errno::ENOTDIR);
        }
        for (k, (i, t, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(i), k as u64 + 1, t, OsStr::new(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.files.iter().map(|f| f.1).sum();
        let files = self.files.len() as u64 + 257;
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(pool: &ReadPool) -> usize {
        pool.state.lock().expect("no panics while held").live
    }

    fn wait_until(what: &str, f: impl Fn() -> bool) {
        let t = std::time::Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn read_workers_start_on_demand_stay_bounded_and_end_when_idle() {
        for (max, jobs) in [(1, 5), (3, 20), (16, 4)] {
            let pool = ReadPool::new(max, Duration::from_millis(100));
            assert_eq!(live(&pool), 0, "no worker before a job");
            let running = Arc::new(AtomicU64::new(0));
            let go = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicU64::new(0));
            for _ in 0..jobs {
                let (running, go, done) = (running.clone(), go.clone(), done.clone());
                pool.submit(Box::new(move || {
                    running.fetch_add(1, Ordering::SeqCst);
                    while !go.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                }));
            }
            // blocked jobs: the pool grows to its bound, not past it
            let bound = max.min(jobs) as u64;
            wait_until("workers up to the bound", || {
                running.load(Ordering::SeqCst) == bound
            });
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(running.load(Ordering::SeqCst), bound);
            assert_eq!(live(&pool), bound as usize);
            go.store(true, Ordering::SeqCst);
            wait_until("every job ran", || {
                done.load(Ordering::SeqCst) == jobs as u64
            });
            wait_until("idle workers end", || live(&pool) == 0);
        }
    }

    #[test]
    fn read_workers_end_when_the_filesystem_is_dropped() {
        let pool = ReadPool::new(4, Duration::from_secs(3600));
        let done = Arc::new(AtomicU64::new(0));
        for _ in 0..4 {
            let done = done.clone();
            pool.submit(Box::new(move || {
                std::thread::sleep(Duration::from_millis(20));
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        drop(PoolHandle(pool.clone()));
        wait_until("queued jobs still run and workers end", || {
            done.load(Ordering::SeqCst) == 4 && live(&pool) == 0
        });
    }
}
