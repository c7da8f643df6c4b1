//! Contents on demand: chunks fetched once, verified, staged, and whole
//! files moved into the store's objects.
//!
//! # What is served, and why it is what a full pull would give (issue 15)
//!
//! A full pull rebuilds each layer's tar from its tar-split and checks the
//! diff_id: the tar-split, which the diff_id covers, decides every file's
//! content. The TOC only says where contents lie and what their SHA-256s
//! are, and its author may lie (swap two files' entries, or name the
//! digest of an object some other image put in the store). So a byte is
//! served only once the whole content holding it was checked against its
//! tar-split entry as well as its TOC entry:
//!
//! * **Fetched contents** are fetched whole before any byte of them is
//!   served (in requests of at most [`BULK_REQUEST_BYTES`], chunk by chunk
//!   verified against the TOC's chunk digests), then checked as a whole:
//!   SHA-256 against the TOC's digest and CRC-64 (Go's `crc64.ISO`)
//!   against the tar-split entry's checksum ([`RemoteFile::crc64`]). Only
//!   then are they served: from their staging file at once, and from
//!   objects/ once a background thread moved them into the store (in
//!   batches, one sync for many files, off the reader's path; see
//!   [`Fetcher::flush`]). A read of a large file
//!   thus waits for the whole file. Serving chunks of a large file as
//!   they arrive was rejected: a chunk's TOC digest proves the bytes are
//!   some content the author knows, not that they are this tar entry's
//!   (two files' entries swapped in the TOC have valid chunk digests), and
//!   the tar-split holds one checksum per file, so nothing short of the
//!   whole file binds bytes to an entry.
//! * **Contents already in the store** (put there by another image, or an
//!   earlier mount) are served for a lazy layer's file only after the
//!   object's CRC-64 matched the tar-split entry's: computed once per
//!   object and mount (cached), only for contents read or prefetched. A
//!   TOC author who names another tenant's object by its digest cannot
//!   also give its CRC-64 without knowing the content (guessing succeeds
//!   with probability 2^-64 per try, and a miss is EIO, a warning and the
//!   content refused for the mount's life). Contents of layers the store
//!   has are trusted: their layer passed its diff_id on import.
//! * **A layer whose files are all present** is rebuilt as a tar from its
//!   tar-split and the objects and hashed ([`Fetcher::check_layers`]):
//!   with the per-file checks a self-consistent forger is left with CRC
//!   collisions between its own contents, which the diff_id catches. A
//!   mismatch makes the mount inconsistent: every read after that fails
//!   with EIO.
//!
//! Served objects are linked into the mount's verified directory (see
//! [`Fetcher::set_verified_dir`]), the overlay's first data layer: the
//! kernel reads contents there without the daemon, and nothing the store
//! holds is reachable through the mount before it was checked.
//!
//! # Bounded waits
//!
//! A read never waits unboundedly for another thread's work: for chunks
//! another reader fetches (EIO once [`WAIT_LIMIT`] passes without one of
//! them arriving), for a fetch slot (EIO after [`WAIT_LIMIT`]), for a bulk
//! prefetch of its file (after [`WAIT_LIMIT`] it fetches itself). The one
//! request a fetching reader makes is bounded by the registry's range
//! timeout ([`strata_oci::registry::DEFAULT_RANGE_TIMEOUT`], 30 s), and
//! chunks a fetch claimed return to missing however it ends, a panic
//! included, waking those waiting for them.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use strata_digest::Digest;
use strata_oci::ImageSource;
use strata_oci::partial::{RemoteFile, decode_chunk};
use strata_ops::{Ctl, Event, EventSink, Op, Unit, Warning};
use strata_store::Store;

use crate::LazyImage;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The content is neither in the store nor in any layer.
    #[error("content {0} is in no layer")]
    Unknown(Digest),
    /// Fetching or verifying failed.
    #[error("layer {layer}: {reason}")]
    Fetch {
        /// The blob.
        layer: Digest,
        /// What went wrong.
        reason: String,
    },
    /// Local I/O.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The fetch was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The content does not match its tar-split entry (or the TOC): it is
    /// never served by this mount.
    #[error("content {digest} refused: {reason}")]
    Rejected {
        /// The content.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// The mount's contents failed their layer's diff_id: nothing is
    /// served any more.
    #[error("the lazy mount is inconsistent: {0}")]
    Inconsistent(String),
    /// Another thread's work this read waited for did not progress within
    /// [`WAIT_LIMIT`].
    #[error("gave up waiting after {0:?}: {1}")]
    TimedOut(Duration, String),
}

/// Longest a read waits for other threads' work without it progressing
/// (a chunk another reader fetches arriving, a fetch slot freeing): twice
/// the registry's timeout of one range request
/// ([`strata_oci::registry::DEFAULT_RANGE_TIMEOUT`]), 60 s. Then the read
/// fails (EIO), or for a bulk prefetch, fetches itself.
pub const WAIT_LIMIT: Duration = Duration::from_secs(2 * 30);

/// Lock `m`, also when a panic poisoned it: the data behind every mutex
/// of the fetcher stays consistent at each unlock (claims are undone by
/// [`ClaimGuard`]).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tar-split's checksum (Go's `crc64.ISO`), folded with carry-less
/// multiplication where the CPU has it.
const CRC64: crc_fast::CrcAlgorithm = crc_fast::CrcAlgorithm::Crc64GoIso;

/// What the lazy layers' tar-splits say of one content.
#[derive(Clone, Copy)]
enum Claim {
    /// Its CRC-64.
    Crc(u64),
    /// Two entries with this digest give different checksums (or one
    /// gives none): one of them lies.
    Conflict,
}

/// Counters, for `strata mounts` and the benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    /// Compressed bytes fetched by reads.
    pub bytes_fetched: AtomicU64,
    /// Chunks fetched.
    pub chunks_fetched: AtomicU64,
    /// Files fetched whole and moved into the store.
    pub files_completed: AtomicU64,
    /// Failed fetches.
    pub errors: AtomicU64,
    /// Files fetched because a program that was read names them (its ELF
    /// interpreter and libraries), before anything opened them.
    pub deps_fetched: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Have {
    Missing,
    Fetching,
    Present,
}

/// Most blob bytes one run of chunks is asked for in (a chunk alone may
/// span up to [`strata_oci::partial::MAX_CHUNK_SPAN`]).
const MAX_RUN_SPAN: u64 = strata_oci::partial::MAX_CHUNK_SPAN + BULK_REQUEST_BYTES;

/// Bytes one request of [`Fetcher::fetch_many`] asks for at most (a bigger
/// file is asked for alone): a cancel waits for one such request.
pub const BULK_REQUEST_BYTES: u64 = 4 << 20;

/// A run of adjacent files at least this long (compressed) is streamed,
/// each file served once its own bytes are in, rather than fetched whole
/// first.
const STREAM_SPAN_BYTES: u64 = 1 << 20;

/// Files a program loads (its libraries) fetched at once.
const DEPS_PARALLEL: usize = 6;

/// Largest `.pyc` read for its imports, and largest module fetched for
/// one.
const PYC_BYTES: u64 = 1 << 20;
/// A file a program's first calls read, fetched with its libraries, is
/// at most this big.
const PROGRAM_START_BYTES: u64 = 1 << 20;
/// Modules fetched at most for one module's imports.
const PYC_IMPORTS: usize = 64;
/// Rounds of imports of imports fetched ahead of the interpreter.
const PYC_ROUNDS: usize = 16;
/// Modules fetched at most in those rounds, from one module opened.
const PYC_CASCADE: usize = 512;

/// What a file loads next (see [`Fetcher::deps_to_prefetch`]).
#[derive(Debug, Default)]
pub struct Loads {
    /// Missing files, in the order they are wanted.
    pub files: Vec<Digest>,
    /// Python modules (fetched together), not an ELF file's libraries.
    modules: bool,
    /// Python modules a program reads first (CPython's `encodings`),
    /// fetched as modules beside `files`.
    then_modules: Vec<Digest>,
}

impl Loads {
    /// Nothing to fetch.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.then_modules.is_empty()
    }
}

/// A read of a file this small (compressed) brings its small neighbours.
const NEAR_FILE_BYTES: u64 = 64 * 1024;
/// How much blob a read brings along at most.
const NEAR_SPAN_BYTES: u64 = 256 * 1024;
/// Neighbours are contiguous in the blob but for gaps this large.
const NEAR_GAP_BYTES: u64 = 4 * 1024;

/// Bytes read at a time when a finished file is hashed.
const HASH_BUF: usize = 64 * 1024;

/// A file being fetched: a sparse staging file and which chunks it holds.
struct Partial {
    file: File,
    path: PathBuf,
    have: Mutex<Vec<Have>>,
    changed: Condvar,
    /// Once the whole file was checked: stored, or why not.
    finished: Mutex<Option<Result<(), String>>>,
}

/// Chunks a fetch claimed ([`Have::Fetching`]): those not made present
/// return to missing when it is dropped, however the fetch ends (an error,
/// a panic), and everyone waiting for them is woken.
struct ClaimGuard<'a> {
    p: &'a Partial,
    mine: Vec<usize>,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        let mut have = lock(&self.p.have);
        for &i in &self.mine {
            if have[i] == Have::Fetching {
                have[i] = Have::Missing;
            }
        }
        drop(have);
        self.p.changed.notify_all();
    }
}

/// A counting semaphore bounding concurrent fetches.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// A slot, waiting at most `limit` for one.
    fn take(&self, limit: Duration) -> Result<SlotGuard<'_>, ReadError> {
        let deadline = Instant::now() + limit;
        let mut n = lock(&self.free);
        while *n == 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(ReadError::TimedOut(
                    limit,
                    "every fetch slot stayed busy".into(),
                ));
            }
            n = self
                .freed
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *n -= 1;
        Ok(SlotGuard(self))
    }
}

/// One streamed request for a run of files in blob order, taken one file
/// at a time: each is checked, served (stored in the background) and
/// released to the reads waiting for it as soon as its own bytes are in.
/// Files not taken when it is dropped are released too (their reads
/// fetch them themselves).
struct Span<'f> {
    fetcher: &'f Fetcher,
    desc: &'f strata_oci::Descriptor,
    r: Box<dyn Read + Send>,
    pos: u64,
    end: u64,
    files: Vec<&'f RemoteFile>,
    next: usize,
    frames: Vec<u8>,
    _slot: SlotGuard<'f>,
}

impl<'f> Span<'f> {
    fn open(
        fetcher: &'f Fetcher,
        desc: &'f strata_oci::Descriptor,
        start: u64,
        end: u64,
        files: Vec<&'f RemoteFile>,
    ) -> Result<Span<'f>, ReadError> {
        let slot = fetcher.slots.take(fetcher.wait_limit)?;
        let r = fetcher
            .source
            .open_range(desc, start, end - start)
            .map_err(|e| fetcher.span_error(desc, e.to_string()))?;
        Ok(Span {
            fetcher,
            desc,
            r,
            pos: start,
            end,
            files,
            next: 0,
            frames: Vec::new(),
            _slot: slot,
        })
    }

    /// The next file: `Some(true)` taken, `Some(false)` refused (its
    /// check failed, recorded), `None` when none is left.
    fn take_next(&mut self) -> Result<Option<bool>, ReadError> {
        let Some(&f) = self.files.get(self.next) else {
            return Ok(None);
        };
        // (a failure leaves `next` at this file: the drop releases it)
        let fetcher = self.fetcher;
        let fail = |reason: String| fetcher.span_error(self.desc, reason);
        if f.offset < self.pos || f.end > self.end {
            return Err(fail(format!(
                "{}: its frames at {}..{} are not inside the run {}..{}",
                f.name, f.offset, f.end, self.pos, self.end
            )));
        }
        let gap = f.offset - self.pos;
        let skipped = io::copy(&mut (&mut self.r).take(gap), &mut io::sink())
            .map_err(|e| fail(format!("bytes {}..{}: {e}", self.pos, f.offset)))?;
        self.frames.clear();
        (&mut self.r)
            .take(f.end - f.offset)
            .read_to_end(&mut self.frames)
            .map_err(|e| fail(format!("bytes {}..{}: {e}", f.offset, f.end)))?;
        if skipped != gap || self.frames.len() as u64 != f.end - f.offset {
            return Err(fail(format!("the answer ended before byte {}", f.end)));
        }
        fetcher
            .stats
            .bytes_fetched
            .fetch_add(f.end - self.pos, Ordering::Relaxed);
        self.pos = f.end;
        let taken = match fetcher.check_fetched(self.desc, f, &self.frames)? {
            Some(content) => {
                fetcher.store_fresh(f.digest, &content)?;
                true
            }
            None => false,
        };
        self.next += 1;
        lock(&fetcher.bulk).remove(&f.digest);
        fetcher.bulk_done.notify_all();
        Ok(Some(taken))
    }
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        let rest = self.files.get(self.next..).unwrap_or_default();
        if rest.is_empty() {
            return;
        }
        let mut bulk = lock(&self.fetcher.bulk);
        for f in rest {
            bulk.remove(&f.digest);
        }
        drop(bulk);
        self.fetcher.bulk_done.notify_all();
    }
}

/// What a read's request brings after the file read: its neighbours,
/// still streaming. [`ReadRest::finish`] takes them, after the read's
/// reply (see [`Fetcher::read_streamed`]).
pub struct ReadRest<'f>(Span<'f>);

impl ReadRest<'_> {
    /// The files it still brings.
    pub fn files(&self) -> Vec<Digest> {
        let rest = self.0.files.get(self.0.next..).unwrap_or_default();
        rest.iter().map(|f| f.digest).collect()
    }

    /// Take the rest of the request's files (errors only end it: reads of
    /// those files fetch them themselves).
    pub fn finish(mut self) {
        loop {
            match self.0.take_next() {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!("the neighbours of a read: {e}");
                    return;
                }
            }
        }
    }
}

struct SlotGuard<'a>(&'a Slots);
impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *lock(&self.0.free) += 1;
        self.0.freed.notify_one();
    }
}

/// Serves file contents of a [`LazyImage`], fetching what the store lacks.
pub struct Fetcher {
    store: Arc<Store>,
    source: Arc<dyn ImageSource>,
    image: Arc<LazyImage>,
    dir: PathBuf,
    partial: Mutex<HashMap<Digest, Arc<Partial>>>,
    slots: Slots,
    /// Contents a bulk prefetch is fetching: reads wait for them rather
    /// than fetch them twice.
    bulk: Mutex<std::collections::HashSet<Digest>>,
    bulk_done: Condvar,
    epoch: std::time::Instant,
    /// Milliseconds after `epoch` of the last fetch a read caused.
    last_read_fetch: AtomicU64,
    /// Per content of a lazy layer, its tar-split checksum. Contents not
    /// here come from layers the store has (trusted).
    claims: HashMap<Digest, (Claim, Vec<usize>)>,
    /// Contents checked for this mount: `Ok` (may be served) or why not
    /// (never served).
    verdicts: Mutex<HashMap<Digest, Result<(), String>>>,
    /// Where checked objects are linked (the overlay's first data layer).
    verified_dir: Option<PathBuf>,
    /// Set when a layer failed its diff_id: every read fails.
    inconsistent: Arc<Mutex<Option<String>>>,
    /// Checked contents on their way into the store.
    fresh: Arc<Fresh>,
    /// The thread moving them, once started.
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Names of staging files of fresh contents.
    fresh_names: AtomicU64,
    /// Layers whose rebuilt tar matched their diff_id.
    layers_checked: Mutex<std::collections::HashSet<usize>>,
    events: Option<Arc<dyn EventSink>>,
    wait_limit: Duration,
    /// Files looked at for what they load (ELF files, Python modules).
    deps_seen: Mutex<std::collections::HashSet<Digest>>,
    /// Whether programs bring their libraries (`STRATA_LAZY_ELF_DEPS=0`:
    /// no, for measuring what it gains).
    elf_deps_on: bool,
    /// Whether Python modules bring what they import
    /// (`STRATA_LAZY_PY_IMPORTS=0`: no, for measuring what it gains).
    py_imports_on: bool,
    /// The image's `.pyc` files by content (a path of each), made at the
    /// first module looked at.
    pyc_paths: std::sync::OnceLock<HashMap<Digest, Vec<u8>>>,
    /// [`pythons`](Self::pythons), found once.
    pythons: std::sync::OnceLock<HashMap<Digest, Digest>>,
    /// Python import roots met so far (`crate::pyc::module_files`).
    py_roots: Mutex<Vec<Vec<u8>>>,
    /// Counters.
    pub stats: Stats,
}

impl Fetcher {
    /// Stage partial files in `dir` (created); at most `parallel` fetches
    /// run at once.
    pub fn new(
        store: Arc<Store>,
        source: Arc<dyn ImageSource>,
        image: Arc<LazyImage>,
        dir: PathBuf,
        parallel: usize,
    ) -> io::Result<Fetcher> {
        fs::create_dir_all(&dir)?;
        let mut claims: HashMap<Digest, (Claim, Vec<usize>)> = HashMap::new();
        for (l, layer) in image.layers.iter().enumerate() {
            let Some(ix) = &layer.index else { continue };
            for f in &ix.files {
                let c = f.crc64.map_or(Claim::Conflict, Claim::Crc);
                let e = claims.entry(f.digest).or_insert((c, Vec::new()));
                if !matches!((e.0, c), (Claim::Crc(a), Claim::Crc(b)) if a == b) {
                    e.0 = Claim::Conflict;
                }
                if e.1.last() != Some(&l) {
                    e.1.push(l);
                }
            }
        }
        Ok(Fetcher {
            store,
            source,
            image,
            dir,
            partial: Mutex::new(HashMap::new()),
            slots: Slots {
                free: Mutex::new(parallel.max(1)),
                freed: Condvar::new(),
            },
            bulk: Mutex::new(std::collections::HashSet::new()),
            bulk_done: Condvar::new(),
            epoch: std::time::Instant::now(),
            last_read_fetch: AtomicU64::new(0),
            claims,
            verdicts: Mutex::new(HashMap::new()),
            verified_dir: None,
            inconsistent: Arc::new(Mutex::new(None)),
            fresh: Arc::new(Fresh::default()),
            committer: Mutex::new(None),
            fresh_names: AtomicU64::new(0),
            layers_checked: Mutex::new(std::collections::HashSet::new()),
            events: None,
            wait_limit: WAIT_LIMIT,
            deps_seen: Mutex::new(std::collections::HashSet::new()),
            elf_deps_on: std::env::var_os("STRATA_LAZY_ELF_DEPS").is_none_or(|v| v != "0"),
            py_imports_on: std::env::var_os("STRATA_LAZY_PY_IMPORTS").is_none_or(|v| v != "0"),
            pyc_paths: std::sync::OnceLock::new(),
            pythons: std::sync::OnceLock::new(),
            py_roots: Mutex::new(Vec::new()),
            stats: Stats::default(),
        })
    }

    /// Link every object checked for this mount into `dir` (in the
    /// objects/ layout): the overlay's first data layer.
    pub fn set_verified_dir(&mut self, dir: PathBuf) {
        self.verified_dir = Some(dir);
    }

    /// Report refused contents and an inconsistent mount to `events`.
    pub fn set_events(&mut self, events: Arc<dyn EventSink>) {
        self.events = Some(events);
    }

    /// Wait at most `limit` for other threads' work ([`WAIT_LIMIT`] by
    /// default; tests shorten it).
    pub fn set_wait_limit(&mut self, limit: Duration) {
        self.wait_limit = limit;
    }

    /// Why the mount is inconsistent, once a layer failed its diff_id.
    pub fn inconsistent(&self) -> Option<String> {
        lock(&self.inconsistent).clone()
    }

    /// Fail every read from now on (and unlink the verified objects, so
    /// files opened later reach the daemon and fail too).
    pub fn mark_inconsistent(&self, reason: String) {
        {
            let mut bad = lock(&self.inconsistent);
            if bad.is_some() {
                return;
            }
            *bad = Some(reason.clone());
        }
        tracing::error!("the lazy mount is inconsistent: {reason}");
        if let Some(dir) = &self.verified_dir {
            let _ = fs::remove_dir_all(dir);
        }
        self.warn(Warning::LazyInconsistent { reason });
    }

    fn warn(&self, w: Warning) {
        if let Some(e) = &self.events {
            e.event(&Event::Warning {
                op: Op::Prefetch,
                warning: w,
            });
        }
    }

    fn check_consistent(&self) -> Result<(), ReadError> {
        match self.inconsistent() {
            Some(r) => Err(ReadError::Inconsistent(r)),
            None => Ok(()),
        }
    }

    /// Refuse `digest` for the mount's life.
    fn reject(&self, digest: &Digest, reason: String) -> ReadError {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let first = lock(&self.verdicts)
            .insert(*digest, Err(reason.clone()))
            .is_none_or(|v| v.is_ok());
        if first {
            tracing::error!("content {digest} refused: {reason}");
            self.warn(Warning::ContentRefused {
                digest: *digest,
                reason: reason.clone(),
            });
        }
        ReadError::Rejected {
            digest: *digest,
            reason,
        }
    }

    fn accept(&self, digest: &Digest) {
        lock(&self.verdicts).insert(*digest, Ok(()));
        self.link(digest);
    }

    fn link(&self, digest: &Digest) {
        link_verified(
            &self.store,
            self.verified_dir.as_deref(),
            &self.inconsistent,
            digest,
        );
    }

    /// What the tar-splits of the lazy layers say of `digest`; `None` when
    /// no lazy layer names it, or every one that does was checked whole
    /// since (its diff_id matched: a pull imported it, or
    /// [`check_layers`](Self::check_layers) rebuilt it), so its contents
    /// are the tar's.
    fn claim(&self, digest: &Digest) -> Option<Claim> {
        let (c, layers) = self.claims.get(digest)?;
        let checked = lock(&self.layers_checked);
        if layers.iter().all(|l| checked.contains(l)) {
            return None;
        }
        Some(*c)
    }

    /// The tar-split's checksum for `digest`, or why it cannot be served.
    fn claim_of(&self, digest: &Digest) -> Result<Option<u64>, ReadError> {
        match self.claim(digest) {
            None => Ok(None),
            Some(Claim::Crc(c)) => Ok(Some(c)),
            Some(Claim::Conflict) => Err(self.reject(
                digest,
                "the tar-split gives files with this digest no checksum or different ones".into(),
            )),
        }
    }

    /// The object of `digest` when it may be served without any check:
    /// trusted (a stored layer's) or checked already for this mount.
    /// `Ok(None)`: not in the store, or not checked yet.
    pub fn open_verified(&self, digest: &Digest) -> Result<Option<File>, ReadError> {
        self.check_consistent()?;
        let verdict = lock(&self.verdicts).get(digest).cloned();
        if let Some(Err(r)) = verdict {
            return Err(ReadError::Rejected {
                digest: *digest,
                reason: r,
            });
        }
        // checked, on its way into the store
        if let Some(f) = self.open_fresh(digest) {
            return Ok(Some(f));
        }
        if verdict.is_none() && self.claim(digest).is_some() {
            // not checked yet
            return Ok(None);
        }
        Ok(self.store.open_object(digest).ok())
    }

    /// A checked content not in the store yet: its staging file.
    fn open_fresh(&self, digest: &Digest) -> Option<File> {
        let st = lock(&self.fresh.state);
        st.files.get(digest).and_then(|f| f.try_clone().ok())
    }

    /// Whether the store has `digest`, or will once a checked fetch of it
    /// is committed.
    fn has(&self, digest: &Digest) -> bool {
        self.store.has_object(digest) || lock(&self.fresh.state).files.contains_key(digest)
    }

    /// A new name for a fresh content's staging file.
    fn fresh_path(&self) -> PathBuf {
        let n = self.fresh_names.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("fresh-{n}"))
    }

    /// Serve `file` (checked: the whole of `digest`) from now on and have
    /// it moved into the store.
    fn add_fresh(&self, digest: Digest, file: File, path: PathBuf) {
        lock(&self.verdicts).insert(digest, Ok(()));
        let file = Arc::new(file);
        {
            let mut st = lock(&self.fresh.state);
            if st.files.contains_key(&digest) {
                drop(st);
                let _ = fs::remove_file(&path);
                return;
            }
            st.files.insert(digest, file.clone());
            st.queue.push((digest, file, path));
        }
        self.fresh.changed.notify_all();
        let mut committer = lock(&self.committer);
        if committer.is_none() {
            let (store, fresh, dir, bad) = (
                self.store.clone(),
                self.fresh.clone(),
                self.verified_dir.clone(),
                self.inconsistent.clone(),
            );
            match std::thread::Builder::new()
                .name("lazy-store".into())
                .spawn(move || commit_loop(store, fresh, dir, bad))
            {
                Ok(h) => *committer = Some(h),
                Err(e) => {
                    tracing::warn!("starting the thread that stores fetched files: {e}");
                    drop(committer);
                    self.flush_here();
                }
            }
        }
    }

    /// Store, on this thread, what is queued (when no committer runs).
    fn flush_here(&self) {
        let batch = std::mem::take(&mut lock(&self.fresh.state).queue);
        if batch.is_empty() {
            return;
        }
        let stored = commit_batch(&self.store, &batch);
        let mut st = lock(&self.fresh.state);
        for (d, _, path) in &batch {
            if stored.is_ok() {
                self.link(d);
                self.fresh.committed.fetch_add(1, Ordering::Relaxed);
            }
            st.files.remove(d);
            let _ = fs::remove_file(path);
        }
    }

    /// Wait until every checked content fetched so far is in the store
    /// (reads return before that: see the module docs).
    pub fn flush(&self) {
        if lock(&self.committer).is_none() {
            return self.flush_here();
        }
        let mut st = lock(&self.fresh.state);
        while !st.queue.is_empty() || st.busy {
            // a committer that ended (it does not, but a panic would)
            // leaves the rest to this thread
            if lock(&self.committer)
                .as_ref()
                .is_none_or(|h| h.is_finished())
            {
                drop(st);
                return self.flush_here();
            }
            st = self
                .fresh
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Contents moved into the store in the background so far.
    pub fn committed(&self) -> u64 {
        self.fresh.committed.load(Ordering::Relaxed)
    }

    /// Link the image's contents from layers the store has (trusted) that
    /// are in the store into the verified directory.
    pub fn link_trusted(&self) {
        let Some(dir) = &self.verified_dir else {
            return;
        };
        // fan-out dirs are made as links need them (all 256 up front cost
        // a tenth of a mount's time)
        let _ = fs::create_dir_all(dir);
        for d in self.image.contents() {
            if self.claim(&d).is_none() && self.store.has_object(&d) {
                self.link(&d);
            }
        }
    }

    /// Whether `digest` may be served from the store with no check.
    pub fn is_local(&self, digest: &Digest) -> bool {
        let verdict = lock(&self.verdicts).get(digest).cloned();
        !matches!(verdict, Some(Err(_)))
            && (self.claim(digest).is_none() || matches!(verdict, Some(Ok(()))))
            && self.store.has_object(digest)
    }

    /// The object of `digest` if the store has it, checked against the
    /// tar-split (once per mount) when a lazy layer names it.
    pub fn open_local(&self, digest: &Digest) -> Result<Option<File>, ReadError> {
        if let Some(f) = self.open_verified(digest)? {
            return Ok(Some(f));
        }
        let Ok(f) = self.store.open_object(digest) else {
            return Ok(None);
        };
        let Some(want) = self.claim_of(digest)? else {
            // a stored layer's content
            self.link(digest);
            return Ok(Some(f));
        };
        let (crc, _) = checksums(&f)?;
        if crc != want {
            return Err(self.reject(
                digest,
                format!(
                    "the object in the store has CRC-64 {crc:016x}, the tar-split entry {want:016x}"
                ),
            ));
        }
        self.accept(digest);
        Ok(Some(f))
    }

    /// Rebuild the tar of every lazy layer whose files are all in the
    /// store (and not checked yet) and compare its SHA-256 with the
    /// layer's diff_id. A mismatch makes the mount inconsistent (and is
    /// returned). Returns how many layers are checked in all.
    pub fn check_layers(&self) -> Result<usize, ReadError> {
        for (i, l) in self.image.layers.iter().enumerate() {
            let Some(ix) = &l.index else { continue };
            if lock(&self.layers_checked).contains(&i) {
                continue;
            }
            if self.store.has_layer(&l.diff_id) {
                // a pull imported it (and checked its diff_id)
                lock(&self.layers_checked).insert(i);
                continue;
            }
            if !ix.files.iter().all(|f| self.store.has_object(&f.digest)) {
                continue;
            }
            let counter = AtomicU64::new(0);
            let opened = strata_oci::partial::open_chunked(self.source.as_ref(), &l.desc, &counter);
            let full = match opened {
                Ok(Ok(ix)) => ix,
                Ok(Err(why)) => {
                    tracing::warn!("layer {i}: cannot check its diff_id: {why}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("layer {i}: cannot check its diff_id (later): {e}");
                    continue;
                }
            };
            let got = full.diff_id_from_store(&self.store)?;
            if got != l.diff_id {
                let reason = format!(
                    "layer {i} ({}): its tar rebuilt from the fetched contents hashes to {got}, \
                     its diff_id is {}",
                    l.desc.digest, l.diff_id
                );
                self.mark_inconsistent(reason.clone());
                return Err(ReadError::Inconsistent(reason));
            }
            tracing::info!("layer {i} is complete and matches its diff_id");
            lock(&self.layers_checked).insert(i);
        }
        Ok(lock(&self.layers_checked).len())
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The image.
    pub fn image(&self) -> &LazyImage {
        &self.image
    }

    /// Read `len` bytes at `offset` of the content `digest` (`size` bytes).
    pub fn read(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
        len: u32,
    ) -> Result<Vec<u8>, ReadError> {
        let (data, rest) = self.read_streamed(digest, size, offset, len)?;
        if let Some(rest) = rest {
            rest.finish();
        }
        Ok(data)
    }

    /// [`read`](Self::read), returning as soon as the file read is in:
    /// the neighbours its request brings along are left streaming in the
    /// returned [`ReadRest`], for the caller to finish once it has
    /// replied (reads of them wait for it meanwhile).
    pub fn read_streamed(
        &self,
        digest: &Digest,
        size: u64,
        offset: u64,
        len: u32,
    ) -> Result<(Vec<u8>, Option<ReadRest<'_>>), ReadError> {
        self.check_consistent()?;
        let end = size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok((Vec::new(), None));
        }
        // at most `len` (a u32) bytes, whatever `size` says
        let n = (end - offset) as u32;
        if let Some(f) = self.open_local(digest)? {
            return Ok((pread(&f, offset, n)?, None));
        }
        if self.wait_bulk(digest)
            && let Some(f) = self.open_local(digest)?
        {
            return Ok((pread(&f, offset, n)?, None));
        }
        let t0 = Instant::now();
        let fetched = |how: &str| {
            let (name, blob) = self
                .image
                .remote(digest)
                .map_or(("?", 0), |(_, f)| (f.name.as_str(), f.end - f.offset));
            tracing::debug!(
                "read of {name} ({digest}, {size} bytes, {blob} in the blob) waited {:.1} ms for {how}",
                t0.elapsed().as_secs_f64() * 1000.0
            )
        };
        // a small file: its small neighbours in the blob, of the same
        // directory, come in the same request (a program reads the files
        // of a directory one after another: one round trip, not one each)
        let near = self.neighbours(digest);
        if near.len() > 1 {
            match self.start_near(digest, &near) {
                Ok(span) => {
                    if let Some(f) = self.open_local(digest)? {
                        fetched(&format!(
                            "its fetch ({} neighbours still coming)",
                            near.len() - 1
                        ));
                        return Ok((pread(&f, offset, n)?, Some(ReadRest(span))));
                    }
                }
                Err(e) => tracing::debug!("fetching {digest} with its neighbours: {e}"),
            }
        }
        // the whole file, checked, before any byte of it is served
        self.fetch_whole(digest)?;
        fetched("its fetch");
        match self.open_local(digest)? {
            Some(f) => Ok((pread(&f, offset, n)?, None)),
            None => Err(ReadError::Fetch {
                layer: self.image.remote(digest).map_or(*digest, |(d, _)| d.digest),
                reason: format!("{digest} is not in the store after its fetch"),
            }),
        }
    }

    /// When `digest` (just read or opened, local) is looked at for the
    /// first time, the missing files it loads next, for
    /// [`fetch_deps`](Self::fetch_deps): a dynamically linked ELF file's
    /// interpreter, `/etc/ld.so.cache` and libraries; a Python module's
    /// (`.pyc`) imports (`crate::pyc`).
    pub fn deps_to_prefetch(&self, digest: &Digest) -> Loads {
        let Ok(Some(f)) = self.open_verified(digest) else {
            return Loads::default();
        };
        let Ok(head) = pread(&f, 0, 16) else {
            return Loads::default();
        };
        if !lock(&self.deps_seen).insert(*digest) {
            return Loads::default();
        }
        if head.starts_with(b"\x7fELF") && self.elf_deps_on {
            let (mut files, program) = self.elf_files(&f);
            let mut then_modules = Vec::new();
            if program {
                // what its first calls read (setlocale, tzset), and an
                // interpreter's first module
                for (d, size) in crate::elf::program_start_files(&self.image.tree) {
                    if size > 0
                        && size <= PROGRAM_START_BYTES
                        && !files.contains(&d)
                        && self.missing(&d)
                    {
                        files.push(d);
                    }
                }
                if self.py_imports_on
                    && let Some(pyc) = self.pythons().get(digest)
                    && self.missing(pyc)
                {
                    then_modules.push(*pyc);
                }
            }
            return Loads {
                files,
                modules: false,
                then_modules,
            };
        }
        if crate::pyc::is_pyc(&head) && self.py_imports_on {
            return Loads {
                files: self.module_files(digest, &f),
                modules: true,
                then_modules: Vec::new(),
            };
        }
        Loads::default()
    }

    /// The missing module files the `.pyc` `digest` (open as `f`) imports.
    fn module_files(&self, digest: &Digest, f: &File) -> Vec<Digest> {
        let paths = self.pyc_paths.get_or_init(|| {
            let mut m = HashMap::new();
            for (p, n) in self.image.tree.walk() {
                if let strata_tree::NodeKind::Regular { digest, .. } = &n.kind
                    && p.ends_with(b".pyc")
                {
                    m.entry(*digest)
                        .or_insert_with(|| [b"/", p.as_slice()].concat());
                }
            }
            m
        });
        let Some(path) = paths.get(digest) else {
            return Vec::new();
        };
        let Ok(len) = f.metadata().map(|m| m.len()) else {
            return Vec::new();
        };
        if len > PYC_BYTES {
            return Vec::new();
        }
        let Ok(data) = pread(f, 0, len as u32) else {
            return Vec::new();
        };
        let Some(mut names) = crate::pyc::names(&data) else {
            return Vec::new();
        };
        names.extend(crate::pyc::started_with(path).iter().map(|n| n.to_string()));
        let found = {
            let mut roots = lock(&self.py_roots);
            crate::pyc::module_files(&self.image.tree, path, &names, &mut roots)
        };
        let mut out = Vec::new();
        for (d, size) in found {
            if out.len() < PYC_IMPORTS
                && size > 0
                && size <= PYC_BYTES
                && !out.contains(&d)
                && self.image.remote(&d).is_some()
                && !self.has(&d)
            {
                out.push(d);
            }
        }
        out
    }

    /// Fetch what [`deps_to_prefetch`](Self::deps_to_prefetch) returned for
    /// `origin`. Libraries: each file by its own requests,
    /// [`DEPS_PARALLEL`] at once (a read of one of them waits for its
    /// chunks instead of asking again), served at once and stored in the
    /// background; then the libraries those libraries need, a few rounds
    /// deep. Modules: all in one request per layer, then the libraries of
    /// the extension modules among them. Failures only end the prefetch
    /// (reads fetch for themselves).
    pub fn fetch_deps(&self, origin: &Digest, deps: Loads) {
        if deps.modules {
            return self.fetch_modules(origin, deps.files);
        }
        if !deps.then_modules.is_empty() {
            let modules = deps.then_modules;
            return std::thread::scope(|s| {
                s.spawn(|| self.fetch_modules(origin, modules));
                self.fetch_deps(
                    origin,
                    Loads {
                        files: deps.files,
                        ..Loads::default()
                    },
                );
            });
        }
        let mut todo = deps.files;
        for _ in 0..4 {
            // what a bulk prefetch is bringing is not asked for twice (a
            // read of it waits for the bulk)
            {
                let bulk = lock(&self.bulk);
                todo.retain(|d| !bulk.contains(d));
            }
            if todo.is_empty() {
                return;
            }
            let t0 = Instant::now();
            let next_job = AtomicUsize::new(0);
            let fetched = AtomicU64::new(0);
            std::thread::scope(|s| {
                for _ in 0..todo.len().min(DEPS_PARALLEL) {
                    s.spawn(|| {
                        while let Some(d) = todo.get(next_job.fetch_add(1, Ordering::Relaxed)) {
                            match self.fetch_whole(d) {
                                Ok(()) => {
                                    fetched.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(e) => {
                                    tracing::debug!("fetching {d}, which {origin} loads: {e}")
                                }
                            }
                        }
                    });
                }
            });
            let n = fetched.into_inner();
            self.stats.deps_fetched.fetch_add(n, Ordering::Relaxed);
            tracing::debug!(
                "fetched {n} of {} files {origin} loads (interpreter, libraries) in {:.1} ms",
                todo.len(),
                t0.elapsed().as_secs_f64() * 1000.0
            );
            let mut next = Vec::new();
            for d in &todo {
                for n in self.elf_deps(d) {
                    if !next.contains(&n) {
                        next.push(n);
                    }
                }
            }
            todo = next;
        }
    }

    /// [`fetch_deps`](Self::fetch_deps) of modules: those `origin`
    /// imports in one request per layer, then what those import as they
    /// arrive (each looked at once per mount), round after round, ahead
    /// of the interpreter; the libraries of extension modules on the side.
    fn fetch_modules(&self, origin: &Digest, first: Vec<Digest>) {
        let name = |d: &Digest| self.image.remote(d).map_or("?", |(_, f)| f.name.as_str());
        let t0 = Instant::now();
        let mut todo = first;
        let mut total = 0;
        std::thread::scope(|s| {
            for _ in 0..PYC_ROUNDS {
                {
                    let bulk = lock(&self.bulk);
                    todo.retain(|d| !bulk.contains(d) && !self.has(d));
                }
                todo.truncate(PYC_CASCADE.saturating_sub(total));
                if todo.is_empty() {
                    break;
                }
                total += todo.len();
                match self.fetch_many_deferred(&todo, Ctl::none()) {
                    Ok(n) => {
                        self.stats
                            .deps_fetched
                            .fetch_add(n as u64, Ordering::Relaxed);
                        tracing::debug!(
                            "fetched {n} of {} modules {} imports, {:.1} ms in: {}",
                            todo.len(),
                            name(origin),
                            t0.elapsed().as_secs_f64() * 1000.0,
                            todo.iter().map(name).collect::<Vec<_>>().join(" ")
                        );
                    }
                    Err(e) => {
                        tracing::debug!("fetching the modules {} imports: {e}", name(origin));
                        return;
                    }
                }
                let mut next = Vec::new();
                let mut libs = Vec::new();
                for d in &todo {
                    let loads = self.deps_to_prefetch(d);
                    let into = match loads.modules {
                        true => &mut next,
                        false => &mut libs,
                    };
                    for f in loads.files {
                        if !into.contains(&f) {
                            into.push(f);
                        }
                    }
                }
                if !libs.is_empty() {
                    // extension modules load their libraries (`dlopen`)
                    s.spawn(move || {
                        self.fetch_deps(
                            origin,
                            Loads {
                                files: libs,
                                ..Loads::default()
                            },
                        )
                    });
                }
                todo = next;
            }
        });
    }

    /// Whether `digest` was looked at for what it loads (or is not
    /// fetched lazily at all).
    pub fn deps_seen(&self, digest: &Digest) -> bool {
        self.claims.is_empty() || lock(&self.deps_seen).contains(digest)
    }

    /// The missing files the ELF file `digest` (local) loads, once per
    /// content per mount (anything else is not marked as looked at: a
    /// module is looked at once opened).
    fn elf_deps(&self, digest: &Digest) -> Vec<Digest> {
        let Ok(Some(f)) = self.open_verified(digest) else {
            return Vec::new();
        };
        match pread(&f, 0, 4) {
            Ok(h) if h == b"\x7fELF" => {}
            _ => return Vec::new(),
        }
        if !lock(&self.deps_seen).insert(*digest) {
            return Vec::new();
        }
        self.elf_files(&f).0
    }

    /// Whether `d` is a file of the image not in the store yet.
    fn missing(&self, d: &Digest) -> bool {
        self.image.remote(d).is_some() && !self.has(d)
    }

    /// The image's CPython interpreters: the content of each
    /// `/usr[/local]/bin/python3.N` (N a number, through symlinks), and
    /// that of the compiled `__init__` of the `encodings` package of its
    /// version, which is the first module a start of it reads (then, by
    /// their imports, the codecs: [`crate::pyc`]).
    fn pythons(&self) -> &HashMap<Digest, Digest> {
        self.pythons.get_or_init(|| {
            let tree = &self.image.tree;
            let mut m = HashMap::new();
            for prefix in ["/usr", "/usr/local"] {
                // (children: directories only)
                let Some(kids) = tree
                    .lookup_ino(format!("{prefix}/bin").as_bytes())
                    .and_then(|bin| tree.children(bin))
                else {
                    continue;
                };
                for (name, _) in kids {
                    let Some(minor) = name
                        .strip_prefix(b"python3.")
                        .filter(|m| !m.is_empty() && m.len() <= 3 && m.iter().all(u8::is_ascii_digit))
                    else {
                        continue;
                    };
                    let minor = String::from_utf8_lossy(minor);
                    let program = [format!("{prefix}/bin/").as_bytes(), name].concat();
                    let init = format!(
                        "{prefix}/lib/python3.{minor}/encodings/__pycache__/__init__.cpython-3{minor}.pyc"
                    );
                    if let (Some((prog, _)), Some((pyc, size))) = (
                        crate::elf::resolve(tree, &program),
                        crate::elf::resolve(tree, init.as_bytes()),
                    ) && size > 0
                        && size <= PYC_BYTES
                    {
                        m.insert(prog, pyc);
                    }
                }
            }
            m
        })
    }

    /// The missing files the ELF file `f` loads, and whether it is a
    /// program (it names an interpreter: the dynamic loader).
    fn elf_files(&self, f: &File) -> (Vec<Digest>, bool) {
        let read_at = |off: u64, len: usize| pread(f, off, len.min(1 << 20) as u32);
        let Some(d) = crate::elf::deps(&read_at) else {
            return (Vec::new(), false);
        };
        let tree = &self.image.tree;
        let mut found: Vec<(Digest, u64)> = Vec::new();
        if let Some(i) = &d.interp {
            found.extend(crate::elf::resolve(tree, i));
            // glibc's loader reads it before any library
            found.extend(crate::elf::resolve(tree, b"/etc/ld.so.cache"));
        }
        let dirs = crate::elf::library_dirs(&d);
        for n in &d.needed {
            if n.contains(&b'/') {
                found.extend(crate::elf::resolve(tree, n));
                continue;
            }
            found.extend(dirs.iter().find_map(|dir| {
                let mut p = dir.clone();
                p.push(b'/');
                p.extend_from_slice(n);
                crate::elf::resolve(tree, &p)
            }));
        }
        let mut out = Vec::new();
        for (d, size) in found {
            if size > 0 && !out.contains(&d) && self.missing(&d) {
                out.push(d);
            }
        }
        (out, d.interp.is_some())
    }

    /// `digest` and the files after it in its layer's blob that a read of
    /// it brings along: small ones (at most [`NEAR_FILE_BYTES`] each) of
    /// the same directory, missing from the store, within
    /// [`NEAR_SPAN_BYTES`] of blob; only `digest` for a larger file.
    fn neighbours(&self, digest: &Digest) -> Vec<Digest> {
        let mut out = vec![*digest];
        let Some(&(l, i)) = self.image.remote.get(digest) else {
            return out;
        };
        let Some(ix) = self.image.layers[l].index.as_ref() else {
            return out;
        };
        let f = &ix.files[i];
        if f.end - f.offset > NEAR_FILE_BYTES {
            return out;
        }
        let dir = |name: &str| name.rsplit_once('/').map_or("", |(d, _)| d).to_string();
        let here = dir(&f.name);
        let mut end = f.end;
        for g in &ix.files[i + 1..] {
            if g.offset < end
                || g.offset > end + NEAR_GAP_BYTES
                || g.end - f.offset > NEAR_SPAN_BYTES
                || g.end - g.offset > NEAR_FILE_BYTES
                || dir(&g.name) != here
            {
                break;
            }
            end = g.end;
            if g.size > 0 && !out.contains(&g.digest) && !self.has(&g.digest) {
                out.push(g.digest);
            }
        }
        // what a bulk prefetch is bringing is not asked for twice
        let bulk = lock(&self.bulk);
        out.retain(|d| d == digest || !bulk.contains(d));
        out
    }

    /// Fetch many contents (a prefetch list) with few requests: per layer,
    /// the missing files' ranges (near ones merged) in multi-range GETs of
    /// at most [`BULK_REQUEST_BYTES`] (a bigger file alone); each file is
    /// verified and stored, request by request. Returns how many were
    /// fetched. `ctl` gets a `Progress` of [`Unit::Files`] (op
    /// [`Op::Prefetch`]) per request and is checked before each: a cancel
    /// stops the list within one request with [`ReadError::Cancelled`]
    /// (what was stored stays).
    pub fn fetch_many(&self, digests: &[Digest], ctl: Ctl<'_>) -> Result<usize, ReadError> {
        self.fetch_many_with(digests, ctl, false)
    }

    /// [`fetch_many`](Self::fetch_many), the files served from their
    /// staging files at once and stored in the background batches (no
    /// sync per request): for a few files wanted soon.
    pub fn fetch_many_deferred(
        &self,
        digests: &[Digest],
        ctl: Ctl<'_>,
    ) -> Result<usize, ReadError> {
        self.fetch_many_with(digests, ctl, true)
    }

    /// [`fetch_many`](Self::fetch_many); with `defer`, the files are
    /// served from their staging files at once and stored in the
    /// background (a read waits for them), else stored request by request.
    fn fetch_many_with(
        &self,
        digests: &[Digest],
        ctl: Ctl<'_>,
        defer: bool,
    ) -> Result<usize, ReadError> {
        self.reserve_bulk(digests);
        // released however the list ends (a panic too)
        struct Release<'a>(&'a Fetcher, &'a [Digest]);
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                let mut bulk = lock(&self.0.bulk);
                for d in self.1 {
                    bulk.remove(d);
                }
                drop(bulk);
                self.0.bulk_done.notify_all();
            }
        }
        let _release = Release(self, digests);
        self.check_consistent()?;
        self.fetch_many_reserved(digests, ctl, defer)
    }

    /// Make reads of `digests` wait for [`fetch_many`](Self::fetch_many)
    /// (call before the reads can start; `fetch_many` releases them).
    pub fn reserve_bulk(&self, digests: &[Digest]) {
        lock(&self.bulk).extend(digests.iter().copied());
    }

    fn fetch_many_reserved(
        &self,
        digests: &[Digest],
        ctl: Ctl<'_>,
        defer: bool,
    ) -> Result<usize, ReadError> {
        let mut by_layer: HashMap<Digest, (strata_oci::Descriptor, Vec<&RemoteFile>)> =
            HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for d in digests {
            if !seen.insert(*d) || self.has(d) {
                // present: checked against the tar-split now, so reads
                // serve it without the check (what is prefetched is read)
                if self.has(d)
                    && let Err(e) = self.open_local(d)
                {
                    tracing::warn!("prefetch: {e}");
                }
                continue;
            }
            if let Some((desc, rf)) = self.image.remote(d) {
                by_layer
                    .entry(desc.digest)
                    .or_insert_with(|| (desc.clone(), Vec::new()))
                    .1
                    .push(rf);
            }
        }
        let total = by_layer.values().map(|(_, f)| f.len() as u64).sum();
        let done = AtomicU64::new(0);
        // layers at once: a program's files come from several, in the
        // order it reads them
        let results: Vec<Result<(), ReadError>> = std::thread::scope(|s| {
            let layers: Vec<_> = by_layer
                .into_values()
                .map(|(desc, mut files)| {
                    let done = &done;
                    let layer = desc.digest;
                    let h = s.spawn(move || {
                        let r = self.fetch_layer_files(&desc, &mut files, ctl, done, total, defer);
                        {
                            let mut bulk = lock(&self.bulk);
                            for f in &files {
                                bulk.remove(&f.digest);
                            }
                        }
                        self.bulk_done.notify_all();
                        r
                    });
                    (layer, h)
                })
                .collect();
            layers
                .into_iter()
                .map(|(layer, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(ReadError::Fetch {
                            layer,
                            reason: "its prefetch panicked".into(),
                        })
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        Ok(done.into_inner() as usize)
    }

    fn fetch_layer_files(
        &self,
        desc: &strata_oci::Descriptor,
        files: &mut [&RemoteFile],
        ctl: Ctl<'_>,
        done: &AtomicU64,
        total: u64,
        defer: bool,
    ) -> Result<(), ReadError> {
        const MERGE_GAP: u64 = 32 * 1024;
        files.sort_by_key(|f| f.offset);
        // merged spans: (start, end, files[i..j])
        let mut spans: Vec<(u64, u64, usize, usize)> = Vec::new();
        for (i, f) in files.iter().enumerate() {
            match spans.last_mut() {
                Some((_, e, _, j)) if f.offset <= *e + MERGE_GAP => {
                    *e = (*e).max(f.end);
                    *j = i + 1;
                }
                _ => spans.push((f.offset, f.end, i, i + 1)),
            }
        }
        let fail = |e: strata_oci::OciError| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            ReadError::Fetch {
                layer: desc.digest,
                reason: e.to_string(),
            }
        };
        // a request's files are done: counted, and said
        let completed = |n: u64| {
            self.stats.files_completed.fetch_add(n, Ordering::Relaxed);
            let so_far = done.fetch_add(n, Ordering::Relaxed) + n;
            ctl.emit(Event::Progress {
                op: Op::Prefetch,
                unit: Unit::Files,
                done: so_far,
                total: Some(total),
            });
        };
        // requests of at most BULK_REQUEST_BYTES (a bigger span alone)
        let mut k = 0;
        while k < spans.len() {
            let (mut l, mut bytes) = (k, 0);
            while l < spans.len()
                && (l == k || bytes + (spans[l].1 - spans[l].0) <= BULK_REQUEST_BYTES)
            {
                bytes += spans[l].1 - spans[l].0;
                l += 1;
            }
            ctl.cancel.check().map_err(|_| ReadError::Cancelled)?;
            let group = &spans[k..l];
            if let [(start, end, i, j)] = *group
                && end - start >= STREAM_SPAN_BYTES
            {
                // one long run of files (those placed first): streamed,
                // each file served as soon as its bytes are in
                let streamed = self.stream_span(desc, start, end, &files[i..j], ctl);
                if !defer {
                    // stored, as the rest of a list is, before the next
                    // request (or the cancel) is answered
                    self.flush();
                }
                completed(streamed?);
                k = l;
                continue;
            }
            let asks: Vec<(u64, u64)> = group.iter().map(|(s, e, _, _)| (*s, e - s)).collect();
            let answers = {
                let _slot = self.slots.take(self.wait_limit)?;
                self.source.read_ranges(desc, &asks).map_err(fail)?
            };
            if answers.len() != asks.len() {
                return Err(ReadError::Fetch {
                    layer: desc.digest,
                    reason: format!("asked for {} ranges, got {}", asks.len(), answers.len()),
                });
            }
            // (deferred files are stored in the background)
            let mut batch = match defer {
                true => None,
                false => Some(self.store.object_batch().map_err(io::Error::other)?),
            };
            let mut n = 0;
            let mut accepted = Vec::new();
            for ((start, _, i, j), bytes) in group.iter().zip(&answers) {
                self.stats
                    .bytes_fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                for f in &files[*i..*j] {
                    let frames = bytes
                        .get(
                            usize::try_from(f.offset - start).unwrap_or(usize::MAX)
                                ..usize::try_from(f.end - start).unwrap_or(usize::MAX),
                        )
                        .ok_or_else(|| ReadError::Fetch {
                            layer: desc.digest,
                            reason: format!("a short answer for bytes {start}.."),
                        })?;
                    let Some(content) = self.check_fetched(desc, f, frames)? else {
                        continue;
                    };
                    if let Some(batch) = &mut batch {
                        batch.put(&mut content.as_slice(), f.size)?;
                        accepted.push(f.digest);
                    } else {
                        self.store_fresh(f.digest, &content)?;
                    }
                    n += 1;
                }
            }
            if let Some(batch) = batch {
                batch.commit().map_err(io::Error::other)?;
            }
            for d in &accepted {
                self.accept(d);
            }
            {
                let mut bulk = lock(&self.bulk);
                for (_, _, i, j) in group {
                    for f in &files[*i..*j] {
                        bulk.remove(&f.digest);
                    }
                }
            }
            self.bulk_done.notify_all();
            completed(n);
            k = l;
        }
        Ok(())
    }

    /// The content of `f` decoded from its `frames`, when it is what the
    /// TOC and the tar-split say (a mismatch is recorded and gives
    /// `None`: the file is not stored, nor served).
    fn check_fetched(
        &self,
        desc: &strata_oci::Descriptor,
        f: &RemoteFile,
        frames: &[u8],
    ) -> Result<Option<Vec<u8>>, ReadError> {
        let whole = strata_oci::partial::RemoteChunk {
            file_offset: 0,
            size: f.size,
            blob_offset: f.offset,
            blob_end: f.end,
            digest: f.digest,
            zeros: false,
        };
        let content = decode_chunk(desc, frames, &whole).map_err(|e| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            ReadError::Fetch {
                layer: desc.digest,
                reason: e.to_string(),
            }
        })?;
        // the tar-split's checksum too: a file whose TOC entry points at
        // other bytes is not stored (nor served)
        let crc = crc_fast::checksum(CRC64, &content);
        match self.claim_of(&f.digest) {
            Ok(Some(want)) if want == crc => Ok(Some(content)),
            Ok(_) => {
                self.reject(
                    &f.digest,
                    format!(
                        "its content has CRC-64 {crc:016x}, the tar-split entry says otherwise"
                    ),
                );
                Ok(None)
            }
            Err(_) => Ok(None),
        }
    }

    /// Serve `content` from a staging file at once; it is stored in the
    /// background.
    /// A streamed request's failure, counted.
    fn span_error(&self, desc: &strata_oci::Descriptor, reason: String) -> ReadError {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        ReadError::Fetch {
            layer: desc.digest,
            reason,
        }
    }

    fn store_fresh(&self, digest: Digest, content: &[u8]) -> Result<(), ReadError> {
        let path = self.fresh_path();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        io::Write::write_all(&mut file, content)?;
        self.add_fresh(digest, file, path);
        Ok(())
    }

    /// Fetch the files of one run of blob bytes `start..end` (`files`, in
    /// blob order, their frames inside it) in one streamed request: each
    /// is checked, served and released to reads waiting for it as soon
    /// as its bytes are in. Returns how many were taken. `ctl`'s cancel is
    /// checked before each file (what was taken stays).
    fn stream_span(
        &self,
        desc: &strata_oci::Descriptor,
        start: u64,
        end: u64,
        files: &[&RemoteFile],
        ctl: Ctl<'_>,
    ) -> Result<u64, ReadError> {
        let mut span = Span::open(self, desc, start, end, files.to_vec())?;
        let mut n = 0;
        loop {
            ctl.cancel.check().map_err(|_| ReadError::Cancelled)?;
            match span.take_next()? {
                Some(taken) => n += taken as u64,
                None => return Ok(n),
            }
        }
    }

    /// Start fetching `near` (`digest`, then the neighbours after it in
    /// its layer's blob, see [`neighbours`](Self::neighbours)) in one
    /// streamed request, and take `digest` from it. The rest is left to
    /// the returned span: reads of those files wait for it.
    fn start_near<'f>(&'f self, digest: &Digest, near: &[Digest]) -> Result<Span<'f>, ReadError> {
        let mut files: Vec<&'f RemoteFile> = Vec::new();
        let mut desc = None;
        for d in near {
            if let Some((dd, rf)) = self.image.remote(d) {
                desc.get_or_insert(dd);
                files.push(rf);
            }
        }
        let (Some(desc), Some(first)) = (desc, files.first()) else {
            return Err(ReadError::Unknown(*digest));
        };
        if first.digest != *digest || files.windows(2).any(|w| w[1].offset < w[0].end) {
            return Err(ReadError::Fetch {
                layer: desc.digest,
                reason: format!("the neighbours of {digest} are not after it in its blob"),
            });
        }
        let (start, end) = (
            first.offset,
            files.iter().map(|f| f.end).max().unwrap_or(first.end),
        );
        let claimed: Vec<Digest> = files.iter().map(|f| f.digest).collect();
        self.reserve_bulk(&claimed);
        self.last_read_fetch
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let mut span = match Span::open(self, desc, start, end, files) {
            Ok(span) => span,
            Err(e) => {
                let mut bulk = lock(&self.bulk);
                for d in &claimed {
                    bulk.remove(d);
                }
                drop(bulk);
                self.bulk_done.notify_all();
                return Err(e);
            }
        };
        span.take_next()?;
        Ok(span)
    }

    /// Wait while a bulk prefetch fetches `digest` (at most the wait
    /// limit: then the read fetches it itself); true if it waited.
    fn wait_bulk(&self, digest: &Digest) -> bool {
        let deadline = Instant::now() + self.wait_limit;
        let mut bulk = lock(&self.bulk);
        let mut waited = false;
        while bulk.contains(digest) {
            waited = true;
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(
                    "waited {:?} for the prefetch of {digest}: fetching it",
                    self.wait_limit
                );
                break;
            }
            bulk = self
                .bulk_done
                .wait_timeout(bulk, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        waited
    }

    /// Seconds since the last fetch a read asked for (for prefetch to
    /// give way to reads).
    pub fn idle_for(&self) -> Duration {
        let last = self.last_read_fetch.load(Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(last))
    }

    /// Fetch all of a content (prefetch); returns once it is in the store.
    /// Checked against the TOC and the tar-split before it is stored.
    pub fn fetch_whole(&self, digest: &Digest) -> Result<(), ReadError> {
        self.check_consistent()?;
        if self.open_local(digest)?.is_some() {
            return Ok(());
        }
        let (desc, rf) = self
            .image
            .remote(digest)
            .ok_or(ReadError::Unknown(*digest))?;
        let p = self.partial_of(digest, rf.size)?;
        let n = rf.chunks.len();
        self.ensure(&p, desc, rf, 0, n)?;
        self.finish(digest, rf, &p)
    }

    fn partial_of(&self, digest: &Digest, size: u64) -> Result<Arc<Partial>, ReadError> {
        let mut map = lock(&self.partial);
        if let Some(p) = map.get(digest) {
            return Ok(p.clone());
        }
        let chunks = self
            .image
            .remote(digest)
            .map(|(_, f)| f.chunks.len())
            .ok_or(ReadError::Unknown(*digest))?;
        let path = self.dir.join(digest.hex());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.set_len(size)?;
        let p = Arc::new(Partial {
            file,
            path,
            have: Mutex::new(vec![Have::Missing; chunks]),
            changed: Condvar::new(),
            finished: Mutex::new(None),
        });
        map.insert(*digest, p.clone());
        Ok(p)
    }

    /// Make chunks `first..last` present: fetch those nobody fetches yet
    /// (contiguous ones together, at most [`BULK_REQUEST_BYTES`] of blob
    /// per request), and wait for the ones other readers fetch (failing
    /// once [`WAIT_LIMIT`] passes without one arriving).
    fn ensure(
        &self,
        p: &Partial,
        desc: &strata_oci::Descriptor,
        rf: &RemoteFile,
        first: usize,
        last: usize,
    ) -> Result<(), ReadError> {
        let range = first..last.min(rf.chunks.len());
        loop {
            let claim = {
                let mut have = lock(&p.have);
                if have[range.clone()].iter().all(|h| *h == Have::Present) {
                    return Ok(());
                }
                let mine: Vec<usize> = range
                    .clone()
                    .filter(|&i| {
                        let claim = have[i] == Have::Missing;
                        if claim {
                            have[i] = Have::Fetching;
                        }
                        claim
                    })
                    .collect();
                ClaimGuard { p, mine }
            };
            // runs of claimed chunks contiguous in the file, each within
            // one request's bytes
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for &i in &claim.mine {
                match runs.last_mut() {
                    Some((a, e))
                        if *e == i
                            && rf.chunks[i]
                                .blob_end
                                .saturating_sub(rf.chunks[*a].blob_offset)
                                <= BULK_REQUEST_BYTES =>
                    {
                        *e = i + 1
                    }
                    _ => runs.push((i, i + 1)),
                }
            }
            for (a, b) in runs {
                // an error (or a panic) leaves the rest of the claim to
                // the guard: back to missing, waiters woken
                self.fetch_run(p, desc, rf, a, b)?;
                let mut have = lock(&p.have);
                for h in &mut have[a..b] {
                    *h = Have::Present;
                }
                drop(have);
                p.changed.notify_all();
            }
            drop(claim);
            // wait for chunks other readers fetch; retry what they failed
            let mut have = lock(&p.have);
            let present = |h: &[Have]| h.iter().filter(|h| **h == Have::Present).count();
            let mut seen = present(&have[range.clone()]);
            let mut deadline = Instant::now() + self.wait_limit;
            while have[range.clone()].contains(&Have::Fetching) {
                let now = Instant::now();
                if now >= deadline {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(ReadError::TimedOut(
                        self.wait_limit,
                        format!(
                            "chunks of {} another read fetches did not arrive",
                            rf.digest
                        ),
                    ));
                }
                have = p
                    .changed
                    .wait_timeout(have, deadline - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                let n = present(&have[range.clone()]);
                if n > seen {
                    seen = n;
                    deadline = Instant::now() + self.wait_limit;
                }
            }
            if have[range.clone()].iter().all(|h| *h == Have::Present) {
                return Ok(());
            }
        }
    }

    /// Fetch chunks `a..b` (contiguous in the blob) in one request, verify
    /// each and write it to the staging file; marks them present.
    fn fetch_run(
        &self,
        p: &Partial,
        desc: &strata_oci::Descriptor,
        rf: &RemoteFile,
        a: usize,
        b: usize,
    ) -> Result<(), ReadError> {
        let chunks = &rf.chunks[a..b];
        let fail = |e: strata_oci::OciError| {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            ReadError::Fetch {
                layer: desc.digest,
                reason: e.to_string(),
            }
        };
        let (Some(c0), Some(cn)) = (chunks.first(), chunks.last()) else {
            return Ok(());
        };
        let (start, end) = (c0.blob_offset, cn.blob_end);
        let all_zeros = chunks.iter().all(|c| c.zeros);
        if !all_zeros && (end < start || end - start > MAX_RUN_SPAN) {
            return Err(ReadError::Fetch {
                layer: desc.digest,
                reason: format!(
                    "chunks of {} span bytes {start}..{end} of the blob",
                    rf.digest
                ),
            });
        }
        self.last_read_fetch
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let bytes = if all_zeros {
            Vec::new()
        } else {
            let _slot = self.slots.take(self.wait_limit)?;
            let b = self
                .source
                .read_range(desc, start, end - start)
                .map_err(fail)?;
            self.stats
                .bytes_fetched
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            self.stats
                .chunks_fetched
                .fetch_add(chunks.len() as u64, Ordering::Relaxed);
            b
        };
        // a run of zeros is already there: the staging file was created
        // sparse at its full size and no one else writes its chunks (this
        // used to allocate and write the zeros, megabytes for a sparse file)
        for c in chunks.iter().filter(|c| !c.zeros) {
            // checked: a short answer (or a TOC's odd numbers) is an
            // error, not a panic
            let frames = c
                .blob_offset
                .checked_sub(start)
                .zip(c.blob_end.checked_sub(start))
                .and_then(|(a, b)| bytes.get(a as usize..b as usize))
                .ok_or_else(|| ReadError::Fetch {
                    layer: desc.digest,
                    reason: format!(
                        "the answer for bytes {start}..{end} has {} bytes, no frames for the chunk at {}",
                        bytes.len(),
                        c.blob_offset
                    ),
                })?;
            let data = decode_chunk(desc, frames, c).map_err(fail)?;
            p.file.write_all_at(&data, c.file_offset)?;
        }
        Ok(())
    }

    /// Once every chunk is present: check the whole file against the TOC
    /// (SHA-256) and the tar-split (CRC-64) and move it into the store.
    /// Once per file: later callers get the first one's outcome.
    fn finish(&self, digest: &Digest, rf: &RemoteFile, p: &Partial) -> Result<(), ReadError> {
        let mut finished = lock(&p.finished);
        if let Some(r) = &*finished {
            return r.clone().map_err(|reason| ReadError::Rejected {
                digest: *digest,
                reason,
            });
        }
        let complete = lock(&p.have).iter().all(|h| *h == Have::Present);
        if !complete {
            return Err(ReadError::Fetch {
                layer: self.image.remote(digest).map_or(*digest, |(d, _)| d.digest),
                reason: format!("{digest} is not complete"),
            });
        }
        let (crc, got) = checksums(&p.file)?;
        let want = self.claim_of(digest);
        let wrong = if got != *digest {
            // every chunk matched its digest, the whole does not: a TOC
            // that lies
            Some(format!(
                "file content hashes to {got}, the TOC says {digest}"
            ))
        } else {
            match want {
                Ok(Some(c)) if c == crc => None,
                Ok(Some(c)) => Some(format!(
                    "{}: the content has CRC-64 {crc:016x}, its tar-split entry {c:016x}",
                    rf.name
                )),
                Ok(None) => None,
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(reason) = wrong {
            // drop the staging so nothing wrong is kept
            self.forget(digest, p);
            *finished = Some(Err(reason.clone()));
            return Err(self.reject(digest, reason));
        }
        // served from its staging file now, stored in the background; the
        // file leaves the partial's name first (a new partial of the same
        // content would truncate it)
        let file = p.file.try_clone()?;
        let fresh = self.fresh_path();
        fs::rename(&p.path, &fresh)?;
        lock(&self.partial).remove(digest);
        self.stats.files_completed.fetch_add(1, Ordering::Relaxed);
        self.add_fresh(*digest, file, fresh);
        *finished = Some(Ok(()));
        Ok(())
    }

    fn forget(&self, digest: &Digest, p: &Partial) {
        lock(&self.partial).remove(digest);
        let _ = fs::remove_file(&p.path);
    }
}

impl Drop for Fetcher {
    /// What was fetched and checked reaches the store before the fetcher
    /// goes.
    fn drop(&mut self) {
        lock(&self.fresh.state).stop = true;
        self.fresh.changed.notify_all();
        if let Some(h) = lock(&self.committer).take() {
            let _ = h.join();
        }
        self.flush_here();
    }
}

/// Link the object of `digest` into the verified directory `dir` (the
/// overlay's first data layer), unless the mount is inconsistent.
fn link_verified(
    store: &Store,
    dir: Option<&std::path::Path>,
    inconsistent: &Mutex<Option<String>>,
    digest: &Digest,
) {
    let Some(dir) = dir else {
        return;
    };
    if lock(inconsistent).is_some() {
        return;
    }
    let hex = digest.hex();
    let to = dir.join(&hex[..2]).join(&hex[2..]);
    let mut r = fs::hard_link(store.object_path(digest), &to);
    if matches!(&r, Err(e) if e.kind() == io::ErrorKind::NotFound) {
        r = fs::create_dir_all(dir.join(&hex[..2]))
            .and_then(|()| fs::hard_link(store.object_path(digest), &to));
    }
    match r {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        // served through the daemon instead
        Err(e) => tracing::debug!("linking {digest} into {}: {e}", dir.display()),
    }
}

/// Contents checked and served whose move into the store is pending.
///
/// A read returned as soon as its file was checked: storing it (a copy
/// into a staging batch, two syncs, renames) cost more than the fetch on
/// a fast link (25 of 35 ms for a small file on loopback), once per file a
/// program opens one after another. So a thread moves checked files into
/// the store in batches, as many as are waiting at once, and until then
/// they are served from their staging file. A content is always in one of
/// the two: it leaves this set only after its batch committed. The
/// committer moves each staging file into the store as it is
/// ([`strata_store::ObjectBatch::adopt`]): it is neither copied nor hashed
/// again.
#[derive(Default)]
struct Fresh {
    state: Mutex<FreshState>,
    changed: Condvar,
    /// Contents moved into the store so far.
    committed: AtomicU64,
}

#[derive(Default)]
struct FreshState {
    /// Served from here until in the store.
    files: HashMap<Digest, Arc<File>>,
    /// Not committed yet: the content, its file, the staging path.
    queue: Vec<(Digest, Arc<File>, PathBuf)>,
    /// The committer is storing a batch.
    busy: bool,
    /// The fetcher is going: commit what is queued, then end.
    stop: bool,
}

/// The committer thread: store what is queued, in batches, until told to
/// stop (and then the rest).
fn commit_loop(
    store: Arc<Store>,
    fresh: Arc<Fresh>,
    verified_dir: Option<PathBuf>,
    inconsistent: Arc<Mutex<Option<String>>>,
) {
    loop {
        let batch = {
            let mut st = lock(&fresh.state);
            while st.queue.is_empty() && !st.stop {
                st = fresh.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.queue.is_empty() {
                return;
            }
            st.busy = true;
            std::mem::take(&mut st.queue)
        };
        let stored = commit_batch(&store, &batch);
        match &stored {
            Ok(()) => {
                for (d, _, _) in &batch {
                    link_verified(&store, verified_dir.as_deref(), &inconsistent, d);
                }
                fresh
                    .committed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            // served from the network again next time
            Err(e) => tracing::warn!("storing {} fetched files: {e}", batch.len()),
        }
        let mut st = lock(&fresh.state);
        for (d, _, path) in &batch {
            st.files.remove(d);
            let _ = fs::remove_file(path);
        }
        st.busy = false;
        drop(st);
        fresh.changed.notify_all();
    }
}

fn commit_batch(store: &Store, batch: &[(Digest, Arc<File>, PathBuf)]) -> io::Result<()> {
    let mut objects = store.object_batch().map_err(io::Error::other)?;
    for (d, file, path) in batch {
        let size = file.metadata()?.len();
        // the staging file was written from the bytes checked against `d`
        // (or hashed whole once complete) and is written no more: it is
        // moved into the store as it is, not copied and hashed again
        match objects.adopt(file, path, *d, size) {
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => {}
            Err(e) => return Err(e),
        }
        let mut r = AtReader {
            file: file.as_ref(),
            off: 0,
        };
        let put = objects.put(&mut r, size)?;
        if put != *d {
            // the staging file changed under us: nothing wrong is stored
            return Err(io::Error::other(format!(
                "the staging file of {d} now hashes to {put}"
            )));
        }
    }
    objects.commit().map_err(io::Error::other)?;
    Ok(())
}

struct AtReader<'a> {
    file: &'a File,
    off: u64,
}

impl Read for AtReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.off)?;
        self.off += n as u64;
        Ok(n)
    }
}

/// CRC-64 (tar-split's) and SHA-256 of a whole file.
fn checksums(f: &File) -> io::Result<(u64, Digest)> {
    let mut crc = crc_fast::Digest::new(CRC64);
    let mut sha = Sha256::new();
    let mut off = 0u64;
    // small: this runs on short-lived read workers, and a megabyte zeroed
    // per finished file stays in the worker's malloc arena
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = match f.read_at(&mut buf, off) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        crc.update(&buf[..n]);
        sha.update(&buf[..n]);
        off += n as u64;
    }
    Ok((
        crc.finalize(),
        Digest::sha256_from_bytes(sha.finalize().into()),
    ))
}

/// Read up to `len` bytes at `offset`: a FUSE read's size, never a number
/// from the TOC.
fn pread(f: &File, offset: u64, len: u32) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    let mut got = 0;
    while got < out.len() {
        let n = f.read_at(&mut out[got..], offset + got as u64)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    out.truncate(got);
    Ok(out)
}
