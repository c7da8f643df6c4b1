//! The FUSE filesystem of a lazy image: read-only, metadata from the tree,
//! contents from the store (passthrough) or the [`Fetcher`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request, SessionACL,
};
use strata_digest::Digest;
use strata_tree::{Node, NodeKind, Tree};

use crate::Fetcher;

/// The image never changes: the kernel may cache everything for long.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// What an open file reads from.
enum Open {
    /// The object in the store (when passthrough is off).
    Object(File),
    /// Passthrough to the object: the kernel reads it without us (the
    /// file is kept for reads the kernel still sends).
    Backing(Arc<BackingId>),
    /// Not in the store when opened: fetched on demand.
    Lazy { digest: Digest, size: u64 },
}

#[derive(Default)]
struct InodeIo {
    backing: std::sync::Weak<BackingId>,
    served: usize,
}

/// Paths of files read, in first-read order (`--record`).
#[derive(Default)]
pub struct Recorder {
    seen: Mutex<(std::collections::HashSet<u64>, Vec<Vec<u8>>)>,
}

impl Recorder {
    /// The paths recorded so far.
    pub fn paths(&self) -> Vec<Vec<u8>> {
        self.seen.lock().expect("no panics while held").1.clone()
    }
}

/// The filesystem.
pub struct LazyFs {
    fetcher: Arc<Fetcher>,
    parents: Vec<u64>,
    /// A path of every inode (log lines, `--record`).
    paths: Vec<Vec<u8>>,
    open: Mutex<HashMap<u64, Arc<Open>>>,
    /// The kernel allows one backing file per inode at a time, and no
    /// passthrough open while the inode has opens served by us: per inode,
    /// its backing (while some open uses it) and how many opens we serve.
    modes: Mutex<HashMap<u64, InodeIo>>,
    next_fh: AtomicU64,
    passthrough: AtomicBool,
    want_passthrough: bool,
    recorder: Option<Arc<Recorder>>,
    all_local: Arc<AtomicBool>,
    opens: Arc<AtomicU64>,
    /// Objects read by inode once the kernel stopped sending opens.
    by_inode: Mutex<HashMap<u64, Arc<File>>>,
    /// Backing files kept registered after their last close, so reopening
    /// a file costs no syscall (most recent [`KEEP_BACKING`]).
    keep: Mutex<std::collections::VecDeque<Arc<BackingId>>>,
    /// Reads that may wait for the network run here, so the few FUSE
    /// threads keep answering metadata and cached reads.
    pool: Mutex<std::sync::mpsc::Sender<Job>>,
}

type Job = Box<dyn FnOnce() + Send>;

/// How many closed files stay registered for passthrough.
const KEEP_BACKING: usize = 16384;

/// How many objects stay open for reads by inode.
const BY_INODE: usize = 512;

/// `n` threads running jobs from one queue.
fn worker_pool(n: usize) -> std::sync::mpsc::Sender<Job> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..n.max(1) {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("lazy-read-{i}"))
            .spawn(move || {
                loop {
                    let job = rx.lock().expect("no panics while held").recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })
            .expect("spawning a read worker");
    }
    tx
}

/// Mount options for [`LazyFs::mount`].
pub struct MountConfig {
    /// Serve fully cached files by FUSE passthrough when the kernel can.
    pub passthrough: bool,
    /// FUSE threads (metadata and cached reads; few is fastest).
    pub threads: usize,
    /// Threads for reads that fetch.
    pub read_workers: usize,
    /// Record the paths read.
    pub recorder: Option<Arc<Recorder>>,
    /// Shown as the mount's source in mountinfo.
    pub fsname: String,
    /// Set once every content of the image is in the store. Opens then
    /// answer ENOSYS, so the kernel stops sending them (and their
    /// releases) and keeps file pages cached: a fully fetched mount reads
    /// like a local filesystem. Ignored while recording (it needs opens).
    pub all_local: Arc<AtomicBool>,
    /// Counts the opens answered (not refused for "no open").
    pub opens: Arc<AtomicU64>,
}

impl LazyFs {
    /// A filesystem over `fetcher`'s image.
    pub fn new(fetcher: Arc<Fetcher>, cfg: &MountConfig) -> LazyFs {
        let tree = &fetcher.image().tree;
        let mut parents = vec![0u64; tree.len().max(1) + 1];
        let mut paths = vec![Vec::new(); parents.len()];
        let mut stack = vec![(0u64, Vec::new())];
        while let Some((dir, path)) = stack.pop() {
            let Some(kids) = tree.children(dir) else {
                continue;
            };
            for (name, ino) in kids {
                let mut p = path.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(name);
                if ino as usize >= parents.len() {
                    parents.resize(ino as usize + 1, 0);
                    paths.resize(ino as usize + 1, Vec::new());
                }
                if paths[ino as usize].is_empty() {
                    paths[ino as usize] = p.clone();
                }
                if tree.node(ino).is_some_and(|n| n.kind == NodeKind::Dir) {
                    parents[ino as usize] = dir;
                    stack.push((ino, p));
                }
            }
        }
        LazyFs {
            fetcher,
            parents,
            paths,
            open: Mutex::new(HashMap::new()),
            modes: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
            want_passthrough: cfg.passthrough,
            recorder: cfg.recorder.clone(),
            all_local: cfg.all_local.clone(),
            opens: cfg.opens.clone(),
            by_inode: Mutex::new(HashMap::new()),
            keep: Mutex::new(std::collections::VecDeque::new()),
            pool: Mutex::new(worker_pool(cfg.read_workers)),
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
            MountOption::Dev,
            MountOption::Suid,
            MountOption::Exec,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(cfg.threads.max(1));
        config.clone_fd = true;
        fuser::spawn_mount(self, dir, &config)
    }

    fn tree(&self) -> &Tree {
        &self.fetcher.image().tree
    }

    fn node(&self, ino: INodeNo) -> Option<&Node> {
        self.tree().node(ino.0.checked_sub(1)?)
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let (kind, size, rdev) = match &node.kind {
            NodeKind::Regular { size, .. } => (FileType::RegularFile, *size, 0),
            NodeKind::Dir => (FileType::Directory, 4096, 0),
            NodeKind::Symlink { target } => (FileType::Symlink, target.len() as u64, 0),
            NodeKind::CharDev { major, minor } => {
                (FileType::CharDevice, 0, makedev(*major, *minor))
            }
            NodeKind::BlockDev { major, minor } => {
                (FileType::BlockDevice, 0, makedev(*major, *minor))
            }
            NodeKind::Fifo => (FileType::NamedPipe, 0, 0),
        };
        let t = &node.meta.mtime;
        let mtime = if t.secs >= 0 {
            UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
        };
        FileAttr {
            ino: INodeNo(node.ino + 1),
            size,
            blocks: size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm: (node.meta.mode & 0o7777) as u16,
            nlink: node.nlink.max(1),
            uid: node.meta.uid as u32,
            gid: node.meta.gid as u32,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn record(&self, ino: u64) {
        let Some(rec) = &self.recorder else {
            return;
        };
        let mut seen = rec.seen.lock().expect("no panics while held");
        if seen.0.insert(ino)
            && let Some(p) = self.paths.get(ino as usize)
        {
            seen.1.push(p.clone());
        }
    }

    /// A read that may need the network: on the worker pool.
    fn read_lazy(
        &self,
        ino: INodeNo,
        digest: Digest,
        len: u64,
        offset: u64,
        size: u32,
        reply: ReplyData,
    ) {
        let fetcher = self.fetcher.clone();
        let path = self.path_of(ino.0 - 1);
        let job: Job = Box::new(move || match fetcher.read(&digest, len, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => {
                tracing::error!("read of {path} (bytes {offset}+{size}) failed: {e}");
                reply.error(Errno::EIO)
            }
        });
        let sent = self.pool.lock().expect("no panics while held").send(job);
        if let Err(std::sync::mpsc::SendError(job)) = sent {
            job();
        }
    }

    /// A read without an open (the kernel stopped sending them): from the
    /// object, kept open for the next read of the inode.
    fn read_by_inode(&self, ino: INodeNo, offset: u64, size: u32, reply: ReplyData) {
        let Some(NodeKind::Regular { digest, size: len }) = self.node(ino).map(|n| &n.kind) else {
            return reply.error(Errno::EIO);
        };
        let cached = self
            .by_inode
            .lock()
            .expect("no panics while held")
            .get(&ino.0)
            .cloned();
        let file = match cached {
            Some(f) => f,
            None => match self.fetcher.store().open_object(digest) {
                Ok(f) => {
                    let f = Arc::new(f);
                    let mut open = self.by_inode.lock().expect("no panics while held");
                    if open.len() >= BY_INODE {
                        open.clear();
                    }
                    open.insert(ino.0, f.clone());
                    f
                }
                Err(_) if !self.fetcher.store().has_object(digest) => {
                    return self.read_lazy(ino, *digest, *len, offset, size, reply);
                }
                Err(e) => {
                    let path = self.path_of(ino.0 - 1);
                    tracing::error!("opening the object of {path} failed: {e}");
                    return reply.error(Errno::EIO);
                }
            },
        };
        reply_file_at(&file, offset, size, reply);
    }

    fn path_of(&self, ino: u64) -> String {
        match self.paths.get(ino as usize) {
            Some(p) => String::from_utf8_lossy(p).into(),
            None => format!("inode {ino}"),
        }
    }
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

fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

fn file_type(n: &Node) -> FileType {
    match n.kind {
        NodeKind::Regular { .. } => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink { .. } => FileType::Symlink,
        NodeKind::CharDev { .. } => FileType::CharDevice,
        NodeKind::BlockDev { .. } => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

fn xattr_reply(data: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
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
                    "the kernel offers no FUSE passthrough: cached files are served through the daemon"
                ),
            }
        }
        // symlink targets and directory listings never change: the kernel
        // caches them, and a listing brings its entries' attributes along
        for flag in [
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(dir) = parent.0.checked_sub(1) else {
            return reply.error(Errno::ENOENT);
        };
        match self
            .tree()
            .child(dir, name.as_bytes())
            .and_then(|i| self.tree().node(i))
        {
            Some(n) => reply.entry(&TTL, &self.attr(n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Some(n) => reply.attr(&TTL, &self.attr(n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).map(|n| &n.kind) {
            Some(NodeKind::Symlink { target }) => reply.data(target),
            _ => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let Some(NodeKind::Regular { digest, size }) = self.node(ino).map(|n| &n.kind) else {
            return reply.error(Errno::EINVAL);
        };
        if self.recorder.is_none() && self.all_local.load(Ordering::Relaxed) {
            // "no open": from now on the kernel opens files itself and
            // reads by inode (fh 0), through its page cache
            return reply.error(Errno::ENOSYS);
        }
        self.record(ino.0 - 1);
        self.opens.fetch_add(1, Ordering::Relaxed);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let store = self.fetcher.store();
        let mut modes = self.modes.lock().expect("no panics while held");
        let io = modes.entry(ino.0).or_default();
        let passthrough = self.passthrough.load(Ordering::Relaxed) && io.served == 0;
        let cached = io.backing.upgrade().filter(|_| passthrough);
        let how = match cached {
            // the kernel holds the object open already: no syscall here
            Some(id) => Open::Backing(id),
            None => match store.open_object(digest) {
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
                Err(_) => Open::Lazy {
                    digest: *digest,
                    size: *size,
                },
            },
        };
        if !matches!(how, Open::Backing(..)) {
            io.served += 1;
        }
        drop(modes);
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
        if fh.0 == 0 {
            return self.read_by_inode(ino, offset, size, reply);
        }
        let how = self
            .open
            .lock()
            .expect("no panics while held")
            .get(&fh.0)
            .cloned();
        let Some(how) = how else {
            return reply.error(Errno::EBADF);
        };
        match &*how {
            Open::Backing(_) => {
                // the kernel reads passthrough files itself; serve stray reads
                let Some(NodeKind::Regular { digest, size: len }) = self.node(ino).map(|n| &n.kind)
                else {
                    return reply.error(Errno::EIO);
                };
                match self.fetcher.read(digest, *len, offset, size) {
                    Ok(data) => reply.data(&data),
                    Err(_) => reply.error(Errno::EIO),
                }
            }
            Open::Object(f) => reply_file_at(f, offset, size, reply),
            Open::Lazy { digest, size: len } => {
                self.read_lazy(ino, *digest, *len, offset, size, reply)
            }
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
        // "no opendir": directories never change, the kernel keeps their
        // listings cached and sends no OPENDIR/RELEASEDIR round trips
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
        let dir = ino.0 - 1;
        let Some(kids) = self.tree().children(dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let parent = self.parents.get(dir as usize).copied().unwrap_or(0) + 1;
        let dots = [
            (ino, FileType::Directory, OsStr::new(".")),
            (INodeNo(parent), FileType::Directory, OsStr::new("..")),
        ];
        let rest = kids.filter_map(|(name, i)| {
            let n = self.tree().node(i)?;
            Some((INodeNo(i + 1), file_type(n), OsStr::from_bytes(name)))
        });
        for (k, (i, t, name)) in dots
            .into_iter()
            .chain(rest)
            .enumerate()
            .skip(offset as usize)
        {
            if reply.add(i, k as u64 + 1, t, name) {
                break;
            }
        }
        reply.ok();
    }

    /// Listing and lookups in one: the kernel creates the entries' dentries
    /// and inodes from it, so walking a tree costs no LOOKUP per file.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let dir = ino.0 - 1;
        let Some(kids) = self.tree().children(dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let parent = self.parents.get(dir as usize).copied().unwrap_or(0);
        let dots = [(dir, OsStr::new(".")), (parent, OsStr::new(".."))];
        let rest = kids.map(|(name, i)| (i, OsStr::from_bytes(name)));
        for (k, (i, name)) in dots
            .into_iter()
            .chain(rest)
            .enumerate()
            .skip(offset as usize)
        {
            let Some(n) = self.tree().node(i) else {
                continue;
            };
            if reply.add(
                INodeNo(i + 1),
                k as u64 + 1,
                name,
                &TTL,
                &self.attr(n),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.tree().len() as u64;
        let bytes = self.fetcher.image().remote_bytes();
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match n.meta.xattrs.get(name.as_bytes()) {
            Some(v) => xattr_reply(v, size, reply),
            None => reply.error(Errno::ENODATA),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // isatty() and friends: not a terminal
        reply.error(Errno::ENOTTY);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let Some(n) = self.node(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut list = Vec::new();
        for k in n.meta.xattrs.keys() {
            list.extend_from_slice(k);
            list.push(0);
        }
        xattr_reply(&list, size, reply);
    }
}
