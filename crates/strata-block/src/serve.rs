//! `strata rootfs serve`: a template as one FUSE file, chunks read on demand.
//!
//! ```text
//! read(off, len) -> per chunk:  dirty (writable)   -> overlay file
//!                               zero in the map    -> zeros
//!                               in the store       -> the chunk object
//!                               missing            -> ChunkSource (the registry
//!                                                     it was pulled from),
//!                                                     verified, kept in memory,
//!                                                     written to objects/ in batches
//! write (--writable)          -> copy the chunk up into the sparse overlay on
//!                                its first write, mark it dirty (dirty log)
//! ```
//!
//! The mount's source is `strata-rootfs:<id>`: gc keeps served templates.
//! Everything about a served file lives in `<store>/serve/<key>/`:
//! `state.json` (progress, rewritten while serving), `overlay` and `dirty`
//! (the chunk indexes written, 8 bytes each, appended on a chunk's first
//! write) and `log`.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};
use serde::{Deserialize, Serialize};
use strata_digest::Digest;
use strata_ops::{Event, EventSink, Op, Unit, Warning};
use strata_store::{Store, TemplateMap};

use crate::ChunkSource;

/// The file's attributes never change behind the kernel's back.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Open chunk objects kept for the next read.
const OPEN_CHUNKS: usize = 512;

/// Attempts per chunk fetch before a read fails with EIO.
const FETCH_ATTEMPTS: u32 = 3;

/// By default a chunk missing from the store is fetched with the chunks
/// that follow it at the source (a pack), up to this many bytes in all,
/// when the store lacks them too: one range request instead of several.
pub const DEFAULT_READAHEAD: u64 = 256 * 1024;

/// A served file on record: `<store>/serve/<key>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeState {
    /// The daemon's pid.
    pub pid: u32,
    /// The served file (canonical path).
    pub file: PathBuf,
    /// Template id.
    pub template: Digest,
    /// As given on the command line.
    pub name: String,
    /// Whether writes are taken (into the overlay).
    pub writable: bool,
    /// The daemon's log.
    pub log: PathBuf,
    /// Seconds since the epoch at start.
    pub started: u64,
    /// Image size in bytes.
    pub size: u64,
    /// Non-zero chunks in the map.
    pub chunks_total: u64,
    /// Their bytes.
    pub bytes_total: u64,
    /// Of those, chunks missing from the store when serving began.
    pub chunks_missing: u64,
    /// Distinct chunks read so far.
    pub chunks_read: u64,
    /// Their bytes.
    pub bytes_read: u64,
    /// Chunks fetched from the remote (verified).
    pub chunks_fetched: u64,
    /// Their bytes.
    pub bytes_fetched: u64,
    /// Chunks written (in the overlay).
    pub dirty_chunks: u64,
    /// Failed reads and fetches.
    pub errors: u64,
    /// Where missing chunks come from.
    pub remote: Option<String>,
}

/// The directory of the file served at `file` (a canonical path).
pub fn serve_dir(store_root: &Path, file: &Path) -> PathBuf {
    let key = Digest::sha256_of(file.as_os_str().as_encoded_bytes());
    store_root.join("serve").join(&key.hex()[..16])
}

impl ServeState {
    /// Write atomically to `<dir>/state.json`.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let tmp = dir.join("state.json.tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).map_err(io::Error::other)?,
        )?;
        fs::rename(tmp, dir.join("state.json"))
    }

    /// Read `<dir>/state.json`.
    pub fn load(dir: &Path) -> io::Result<ServeState> {
        let b = fs::read(dir.join("state.json"))?;
        serde_json::from_slice(&b).map_err(io::Error::other)
    }

    /// Every served file on record in the store, with its directory.
    pub fn all(store_root: &Path) -> Vec<(PathBuf, ServeState)> {
        let mut v = Vec::new();
        if let Ok(rd) = fs::read_dir(store_root.join("serve")) {
            for e in rd.flatten() {
                if let Ok(s) = ServeState::load(&e.path()) {
                    v.push((e.path(), s));
                }
            }
        }
        v.sort_by(|a, b| a.1.file.cmp(&b.1.file));
        v
    }
}

/// The chunk indexes recorded in `<dir>/dirty`, sorted and distinct.
pub fn dirty_chunks(dir: &Path) -> io::Result<Vec<u64>> {
    let b = match fs::read(dir.join("dirty")) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut v: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

/// Counters shared by the filesystem and the daemon's state writer.
#[derive(Default)]
struct Counters {
    chunks_read: AtomicU64,
    bytes_read: AtomicU64,
    chunks_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    dirty: AtomicU64,
    errors: AtomicU64,
}

/// Writes in `--writable` mode.
struct Overlay {
    file: File,
    dirty: Vec<AtomicBool>,
    log: Mutex<File>,
    /// Striped locks serialising a chunk's copy-up.
    locks: Vec<Mutex<()>>,
}

/// What serving a template needs; shared by the FUSE threads and the
/// daemon (state, flushing).
pub struct Served {
    store: Arc<Store>,
    map: TemplateMap,
    id: Digest,
    source: Option<Arc<dyn ChunkSource>>,
    /// Fetched and verified chunks not yet written to objects/.
    pending: Mutex<HashMap<Digest, Arc<Vec<u8>>>>,
    /// Chunks being fetched (by one reader; the others wait on
    /// `fetched`): no chunk is fetched twice at once.
    in_flight: Mutex<HashSet<Digest>>,
    fetched: Condvar,
    open: Mutex<HashMap<Digest, Arc<File>>>,
    /// Chunk indexes read at least once.
    seen: Vec<AtomicBool>,
    overlay: Option<Overlay>,
    counters: Counters,
    started: SystemTime,
    uid: u32,
    gid: u32,
    events: Arc<dyn EventSink>,
    /// Bytes of the distinct chunks the store lacked at the start.
    missing_bytes: u64,
    /// [`ServeOptions::readahead`].
    readahead: u64,
}

/// How to serve.
pub struct ServeOptions {
    /// Take writes into an overlay in this directory (`overlay`, `dirty`).
    pub writable: Option<PathBuf>,
    /// Bytes a fetch brings at most: the chunk read and the missing ones
    /// after it at the source ([`DEFAULT_READAHEAD`]).
    pub readahead: u64,
    /// Owner of the served file.
    pub uid: u32,
    /// Group of the served file.
    pub gid: u32,
    /// Chunk fetches are reported here (op [`Op::TemplateServe`]): a
    /// `Progress` per chunk fetched (bytes fetched so far, of the bytes
    /// missing at the start), a [`Warning::ChunkFetchFailed`] per fetch
    /// that failed.
    pub events: Arc<dyn EventSink>,
}

impl Served {
    /// Prepare to serve template `id`; `source` gives the chunks the store
    /// lacks.
    pub fn new(
        store: Arc<Store>,
        id: Digest,
        source: Option<Arc<dyn ChunkSource>>,
        opts: &ServeOptions,
    ) -> Result<Served, crate::BlockError> {
        let map = store.template_map(&id)?;
        let chunks = map.chunk_count() as usize;
        let overlay =
            match &opts.writable {
                None => None,
                Some(dir) => Some(Overlay::open(dir, map.size, chunks).map_err(|e| {
                    crate::BlockError::Io {
                        what: format!("preparing the write overlay in {}", dir.display()),
                        source: e,
                    }
                })?),
            };
        let missing_bytes = map
            .chunks()
            .filter(|(_, d)| !store.has_object(d))
            .map(|(i, d)| (d, map.chunk_len(i)))
            .collect::<HashMap<_, _>>()
            .values()
            .sum();
        let counters = Counters::default();
        if let Some(o) = &overlay {
            let n = o.dirty.iter().filter(|d| d.load(Ordering::Relaxed)).count();
            counters.dirty.store(n as u64, Ordering::Relaxed);
        }
        Ok(Served {
            store,
            map,
            id,
            source,
            pending: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashSet::new()),
            fetched: Condvar::new(),
            open: Mutex::new(HashMap::new()),
            seen: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            overlay,
            counters,
            started: SystemTime::now(),
            uid: opts.uid,
            gid: opts.gid,
            events: opts.events.clone(),
            missing_bytes,
            readahead: opts.readahead,
        })
    }

    /// The template's map.
    pub fn map(&self) -> &TemplateMap {
        &self.map
    }

    /// Chunks of the map the store lacks now.
    pub fn missing(&self) -> u64 {
        self.map
            .chunk_set()
            .iter()
            .filter(|d| !self.store.has_object(d))
            .count() as u64
    }

    /// Copy the counters into `s`.
    pub fn fill(&self, s: &mut ServeState) {
        let c = &self.counters;
        s.chunks_read = c.chunks_read.load(Ordering::Relaxed);
        s.bytes_read = c.bytes_read.load(Ordering::Relaxed);
        s.chunks_fetched = c.chunks_fetched.load(Ordering::Relaxed);
        s.bytes_fetched = c.bytes_fetched.load(Ordering::Relaxed);
        s.dirty_chunks = c.dirty.load(Ordering::Relaxed);
        s.errors = c.errors.load(Ordering::Relaxed);
    }

    /// Write fetched chunks to objects/ (durable), then drop them from
    /// memory. Returns how many were written.
    pub fn flush_fetched(&self) -> Result<usize, crate::BlockError> {
        let batch: Vec<(Digest, Arc<Vec<u8>>)> = self
            .pending
            .lock()
            .expect("no panics while held")
            .iter()
            .map(|(d, b)| (*d, b.clone()))
            .collect();
        if batch.is_empty() {
            return Ok(0);
        }
        let mut objects = self.store.object_batch()?;
        for (d, b) in &batch {
            let got = objects
                .put(&mut b.as_slice(), b.len() as u64)
                .map_err(|e| crate::BlockError::Io {
                    what: format!("storing fetched chunk {d}"),
                    source: e,
                })?;
            debug_assert_eq!(got, *d);
        }
        objects.commit()?;
        let mut pending = self.pending.lock().expect("no panics while held");
        for (d, _) in &batch {
            pending.remove(d);
        }
        Ok(batch.len())
    }

    /// Bytes `[offset, offset + size)` of the image (clipped at its end).
    pub fn read_at(&self, offset: u64, size: u64) -> io::Result<Vec<u8>> {
        let end = (offset + size).min(self.map.size);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let cs = self.map.chunk_size;
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let within = pos - i * cs;
            let n = (cs - within).min(end - pos);
            self.read_chunk_into(i, within, n, &mut out)?;
            pos += n;
        }
        Ok(out)
    }

    fn read_chunk_into(&self, i: u64, within: u64, n: u64, out: &mut Vec<u8>) -> io::Result<()> {
        let at = out.len();
        out.resize(at + n as usize, 0);
        let buf = &mut out[at..];
        if let Some(o) = &self.overlay
            && o.dirty[i as usize].load(Ordering::Acquire)
        {
            return o.file.read_exact_at(buf, i * self.map.chunk_size + within);
        }
        let Some(d) = self.map.chunk(i) else {
            return Ok(()); // zeros
        };
        if !self.seen[i as usize].swap(true, Ordering::Relaxed) {
            self.counters.chunks_read.fetch_add(1, Ordering::Relaxed);
            self.counters
                .bytes_read
                .fetch_add(self.map.chunk_len(i), Ordering::Relaxed);
        }
        self.read_object(i, &d, self.map.chunk_len(i), within, buf)
    }

    /// Bytes of chunk `i` (`d`, `len` bytes long) at `within`, from memory,
    /// the store or the source.
    fn read_object(
        &self,
        i: u64,
        d: &Digest,
        len: u64,
        within: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        if let Some(b) = self.pending_chunk(d) {
            return copy_from(&b, within, buf);
        }
        if let Some(f) = self.open_chunk(d)? {
            return f.read_exact_at(buf, within);
        }
        let b = match self.fetch(d, len) {
            Ok(b) => b,
            Err(e) => {
                self.events.event(&Event::Warning {
                    op: Op::TemplateServe,
                    warning: Warning::ChunkFetchFailed {
                        index: i,
                        digest: *d,
                        reason: e.to_string(),
                    },
                });
                return Err(e);
            }
        };
        copy_from(&b, within, buf)
    }

    fn pending_chunk(&self, d: &Digest) -> Option<Arc<Vec<u8>>> {
        self.pending
            .lock()
            .expect("no panics while held")
            .get(d)
            .cloned()
    }

    /// The chunk's object, or `None` when the store lacks it.
    fn open_chunk(&self, d: &Digest) -> io::Result<Option<Arc<File>>> {
        if let Some(f) = self.open.lock().expect("no panics while held").get(d) {
            return Ok(Some(f.clone()));
        }
        match File::open(self.store.object_path(d)) {
            Ok(f) => {
                let f = Arc::new(f);
                let mut open = self.open.lock().expect("no panics while held");
                if open.len() >= OPEN_CHUNKS {
                    open.clear();
                }
                open.insert(*d, f.clone());
                Ok(Some(f))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fetch chunk `d` from the source, once however many readers want it,
    /// with the chunks that follow it at the source and are missing too
    /// (up to [`ServeOptions::readahead`] bytes, one request), and check each before
    /// anyone sees it.
    fn fetch(&self, d: &Digest, len: u64) -> io::Result<Arc<Vec<u8>>> {
        let Some(source) = &self.source else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "chunk {d} of template {} is not in the store and the template has no remote",
                    self.id
                ),
            ));
        };
        // claim `d` (or wait for the reader that has it) and the followers
        // nobody has
        let mut run = vec![(*d, len)];
        {
            let mut flying = self.in_flight.lock().expect("no panics while held");
            loop {
                if let Some(b) = self.pending_chunk(d) {
                    return Ok(b);
                }
                if !flying.contains(d) {
                    break;
                }
                flying = self.fetched.wait(flying).expect("no panics while held");
            }
            if let Some(f) = self.open_chunk(d)? {
                let mut b = vec![0u8; len as usize];
                f.read_exact_at(&mut b, 0)?;
                return Ok(Arc::new(b));
            }
            flying.insert(*d);
            for (c, l) in source.followers(d, self.readahead.saturating_sub(len)) {
                if flying.contains(&c)
                    || self.pending_chunk(&c).is_some()
                    || self.store.has_object(&c)
                {
                    break;
                }
                flying.insert(c);
                run.push((c, l));
            }
        }
        let got = self.fetch_claimed(source.as_ref(), &run);
        {
            let mut flying = self.in_flight.lock().expect("no panics while held");
            for (c, _) in &run {
                flying.remove(c);
            }
        }
        self.fetched.notify_all();
        got
    }

    /// Fetch `run` (claimed), retrying: `run[0]` must come and be right;
    /// a follower that does not match its digest is dropped (read again
    /// on its own when wanted).
    fn fetch_claimed(
        &self,
        source: &dyn ChunkSource,
        run: &[(Digest, u64)],
    ) -> io::Result<Arc<Vec<u8>>> {
        let d = run[0].0;
        let mut last = None;
        for attempt in 0..FETCH_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            let parts = match source.fetch_run(run) {
                Ok(parts) if parts.len() == run.len() => parts,
                Ok(parts) => {
                    last = Some(io::Error::other(format!(
                        "{} chunks for a run of {}",
                        parts.len(),
                        run.len()
                    )));
                    continue;
                }
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let mut first = None;
            for ((c, l), b) in run.iter().zip(parts) {
                if b.len() as u64 != *l || Digest::sha256_of(&b) != *c {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    if *c == d {
                        // a wrong answer is not retried: the registry has it wrong
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "chunk {d}: the remote sent {} bytes that do not match its digest",
                                b.len()
                            ),
                        ));
                    }
                    continue;
                }
                let b = Arc::new(b);
                if *c == d {
                    first = Some(b.clone());
                }
                self.pending
                    .lock()
                    .expect("no panics while held")
                    .insert(*c, b);
                self.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                let done = self.counters.bytes_fetched.fetch_add(*l, Ordering::Relaxed) + l;
                self.events.event(&Event::Progress {
                    op: Op::TemplateServe,
                    unit: Unit::Objects,
                    done,
                    total: Some(self.missing_bytes),
                });
            }
            return Ok(first.expect("run[0] was checked"));
        }
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        let e = last.expect("at least one attempt");
        Err(io::Error::new(
            e.kind(),
            format!("fetching chunk {d} ({FETCH_ATTEMPTS} attempts): {e}"),
        ))
    }

    /// Write `data` at `offset` into the overlay.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let Some(o) = &self.overlay else {
            return Err(io::Error::from_raw_os_error(libc_erofs()));
        };
        let end = offset + data.len() as u64;
        if end > self.map.size {
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::NOSPC.raw_os_error(),
            ));
        }
        let cs = self.map.chunk_size;
        let mut pos = offset;
        while pos < end {
            let i = pos / cs;
            let start = i * cs;
            let n = (start + cs).min(end) - pos;
            let piece = &data[(pos - offset) as usize..(pos - offset + n) as usize];
            if o.dirty[i as usize].load(Ordering::Acquire) {
                o.file.write_all_at(piece, pos)?;
            } else {
                let _g = o.locks[i as usize % o.locks.len()]
                    .lock()
                    .expect("no panics while held");
                if !o.dirty[i as usize].load(Ordering::Acquire) {
                    let len = self.map.chunk_len(i);
                    let whole = pos == start && n == len;
                    if !whole && let Some(d) = self.map.chunk(i) {
                        let mut base = vec![0u8; len as usize];
                        self.read_object(i, &d, len, 0, &mut base)?;
                        o.file.write_all_at(&base, start)?;
                    }
                    o.file.write_all_at(piece, pos)?;
                    {
                        // a short append (a full disk) is cut off again:
                        // a torn record would shift every later one
                        let mut log = o.log.lock().expect("no panics while held");
                        let before = log.metadata()?.len();
                        if let Err(e) = log.write_all(&i.to_le_bytes()) {
                            let _ = log.set_len(before);
                            return Err(e);
                        }
                    }
                    o.dirty[i as usize].store(true, Ordering::Release);
                    self.counters.dirty.fetch_add(1, Ordering::Relaxed);
                } else {
                    o.file.write_all_at(piece, pos)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Make the overlay and its dirty log durable.
    pub fn sync(&self) -> io::Result<()> {
        if let Some(o) = &self.overlay {
            o.file.sync_data()?;
            o.log.lock().expect("no panics while held").sync_data()?;
        }
        Ok(())
    }

    fn attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(1),
            size: self.map.size,
            blocks: self.map.size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: if self.overlay.is_some() { 0o644 } else { 0o444 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn libc_erofs() -> i32 {
    rustix::io::Errno::ROFS.raw_os_error()
}

fn copy_from(b: &[u8], within: u64, buf: &mut [u8]) -> io::Result<()> {
    let src = b
        .get(within as usize..within as usize + buf.len())
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past a chunk's end"))?;
    buf.copy_from_slice(src);
    Ok(())
}

impl Overlay {
    /// Open (or create) the overlay of a `size`-byte image in `dir`,
    /// taking up the chunks an earlier serve of the same file wrote.
    fn open(dir: &Path, size: u64, chunks: usize) -> io::Result<Overlay> {
        fs::create_dir_all(dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("overlay"))?;
        file.set_len(size)?;
        let dirty: Vec<AtomicBool> = (0..chunks).map(|_| AtomicBool::new(false)).collect();
        for i in dirty_chunks(dir)? {
            if let Some(d) = dirty.get(i as usize) {
                d.store(true, Ordering::Relaxed);
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("dirty"))?;
        // a record torn by a crash is dropped (its chunk was never
        // reported written), so that appends stay aligned
        let len = log.metadata()?.len();
        if len % 8 != 0 {
            log.set_len(len - len % 8)?;
        }
        Ok(Overlay {
            file,
            dirty,
            log: Mutex::new(log),
            locks: (0..64).map(|_| Mutex::new(())).collect(),
        })
    }
}

/// The FUSE side: one regular file, inode 1, the mount point itself.
pub struct TemplateFs(pub Arc<Served>);

impl TemplateFs {
    /// Mount on the regular file `file` and serve in background threads
    /// until unmounted.
    pub fn mount(self, file: &Path, threads: usize) -> io::Result<fuser::BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("strata-rootfs:{}", self.0.id)),
            MountOption::Subtype("strata".into()),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        if self.0.overlay.is_none() {
            config.mount_options.push(MountOption::RO);
        }
        config.acl = SessionACL::All;
        config.n_threads = Some(threads.max(1));
        config.clone_fd = true;
        fuser::spawn_mount(self, file, &config)
    }
}

impl Filesystem for TemplateFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOTDIR);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        reply.attr(&TTL, &self.0.attr());
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        // a disk image keeps its size, owner and mode; times are not kept
        if size.is_some_and(|s| s != self.0.map.size)
            || mode.is_some()
            || uid.is_some()
            || gid.is_some()
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &self.0.attr());
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != 1 {
            return reply.error(Errno::ENOENT);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY && self.0.overlay.is_none() {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read_at(offset, size as u64) {
            Ok(b) => reply.data(&b),
            Err(e) => {
                self.0.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!("read of bytes {offset}+{size} failed: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.write_at(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                let errno = e.raw_os_error().map(Errno::from_i32).unwrap_or(Errno::EIO);
                if e.raw_os_error().is_none() {
                    self.0.counters.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!("write of bytes {offset}+{} failed: {e}", data.len());
                }
                reply.error(errno)
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.0.sync() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!("syncing the overlay failed: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.0.map.size / 4096;
        reply.statfs(blocks, 0, 0, 1, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record torn by a crash (or cut short by a full disk) is dropped
    /// when the overlay opens, so that later records stay aligned.
    #[test]
    fn a_torn_dirty_record_is_dropped_and_appends_stay_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = 3u64.to_le_bytes().to_vec();
        log.extend_from_slice(&7u64.to_le_bytes()[..5]);
        fs::write(dir.path().join("dirty"), &log).unwrap();
        let o = Overlay::open(dir.path(), 16 << 16, 16).unwrap();
        assert!(o.dirty[3].load(Ordering::Relaxed));
        assert!(
            !o.dirty[7].load(Ordering::Relaxed),
            "a torn record marks nothing"
        );
        o.log
            .lock()
            .unwrap()
            .write_all(&9u64.to_le_bytes())
            .unwrap();
        drop(o);
        assert_eq!(dirty_chunks(dir.path()).unwrap(), vec![3, 9]);
    }
}
