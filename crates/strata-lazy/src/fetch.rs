//! Contents on demand: chunks fetched once, verified, staged, and whole
//! files moved into the store's objects.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use strata_digest::Digest;
use strata_oci::ImageSource;
use strata_oci::partial::{RemoteFile, decode_chunk};
use strata_ops::{Ctl, Event, Op, Unit};
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
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Have {
    Missing,
    Fetching,
    Present,
}

/// Files up to this size are fetched whole on their first read (their
/// chunks are contiguous in the blob: one range request); larger files
/// this much past each read.
const READ_AHEAD: u64 = 2 << 20;

/// Bytes one request of [`Fetcher::fetch_many`] asks for at most (a bigger
/// file is asked for alone): a cancel waits for one such request.
pub const BULK_REQUEST_BYTES: u64 = 4 << 20;

/// Bytes read at a time when a finished file is hashed.
const HASH_BUF: usize = 64 * 1024;

/// A file being fetched: a sparse staging file and which chunks it holds.
struct Partial {
    file: File,
    path: PathBuf,
    have: Mutex<Vec<Have>>,
    changed: Condvar,
    finished: AtomicBool,
}

/// A counting semaphore bounding concurrent fetches.
struct Slots {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn take(&self) -> SlotGuard<'_> {
        let mut n = self.free.lock().expect("no panics while held");
        while *n == 0 {
            n = self.freed.wait(n).expect("no panics while held");
        }
        *n -= 1;
        SlotGuard(self)
    }
}

struct SlotGuard<'a>(&'a Slots);
impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().expect("no panics while held") += 1;
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
            stats: Stats::default(),
        })
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
        let end = size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        if let Ok(f) = self.store.open_object(digest) {
            return Ok(pread(&f, offset, end - offset)?);
        }
        if self.wait_bulk(digest)
            && let Ok(f) = self.store.open_object(digest)
        {
            return Ok(pread(&f, offset, end - offset)?);
        }
        let (desc, rf) = self
            .image
            .remote(digest)
            .ok_or(ReadError::Unknown(*digest))?;
        let p = self.partial_of(digest, size)?;
        // chunks overlapping [offset, end), and those read ahead
        let first = rf
            .chunks
            .partition_point(|c| c.file_offset + c.size <= offset);
        let last = rf.chunks.partition_point(|c| c.file_offset < end);
        let ahead = if size <= READ_AHEAD {
            rf.chunks.len()
        } else {
            rf.chunks
                .partition_point(|c| c.file_offset < end.saturating_add(READ_AHEAD))
        };
        self.ensure(&p, desc, rf, first, last, ahead)?;
        let data = pread(&p.file, offset, end - offset)?;
        self.maybe_finish(digest, &p)?;
        Ok(data)
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
        self.reserve_bulk(digests);
        let r = self.fetch_many_reserved(digests, ctl);
        {
            let mut bulk = self.bulk.lock().expect("no panics while held");
            for d in digests {
                bulk.remove(d);
            }
        }
        self.bulk_done.notify_all();
        r
    }

    /// Make reads of `digests` wait for [`fetch_many`](Self::fetch_many)
    /// (call before the reads can start; `fetch_many` releases them).
    pub fn reserve_bulk(&self, digests: &[Digest]) {
        self.bulk
            .lock()
            .expect("no panics while held")
            .extend(digests.iter().copied());
    }

    fn fetch_many_reserved(&self, digests: &[Digest], ctl: Ctl<'_>) -> Result<usize, ReadError> {
        let mut by_layer: HashMap<Digest, (strata_oci::Descriptor, Vec<&RemoteFile>)> =
            HashMap::new();
        let mut seen = std::collections::HashSet::new();
        for d in digests {
            if !seen.insert(*d) || self.store.has_object(d) {
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
        let mut done = 0;
        for (desc, mut files) in by_layer.into_values() {
            let r = self.fetch_layer_files(&desc, &mut files, ctl, &mut done, total);
            {
                let mut bulk = self.bulk.lock().expect("no panics while held");
                for f in &files {
                    bulk.remove(&f.digest);
                }
            }
            self.bulk_done.notify_all();
            r?;
        }
        Ok(done as usize)
    }

    fn fetch_layer_files(
        &self,
        desc: &strata_oci::Descriptor,
        files: &mut [&RemoteFile],
        ctl: Ctl<'_>,
        done: &mut u64,
        total: u64,
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
            let asks: Vec<(u64, u64)> = group.iter().map(|(s, e, _, _)| (*s, e - s)).collect();
            let answers = {
                let _slot = self.slots.take();
                self.source.read_ranges(desc, &asks).map_err(fail)?
            };
            let mut batch = self.store.object_batch().map_err(io::Error::other)?;
            let mut n = 0;
            for ((start, _, i, j), bytes) in group.iter().zip(&answers) {
                self.stats
                    .bytes_fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                for f in &files[*i..*j] {
                    let frames = bytes
                        .get((f.offset - start) as usize..(f.end - start) as usize)
                        .ok_or_else(|| ReadError::Fetch {
                            layer: desc.digest,
                            reason: format!("a short answer for bytes {start}.."),
                        })?;
                    let whole = strata_oci::partial::RemoteChunk {
                        file_offset: 0,
                        size: f.size,
                        blob_offset: f.offset,
                        blob_end: f.end,
                        digest: f.digest,
                        zeros: false,
                    };
                    let content = decode_chunk(desc, frames, &whole).map_err(fail)?;
                    batch.put(&mut content.as_slice(), f.size)?;
                    n += 1;
                }
            }
            batch.commit().map_err(io::Error::other)?;
            self.stats.files_completed.fetch_add(n, Ordering::Relaxed);
            *done += n;
            ctl.emit(Event::Progress {
                op: Op::Prefetch,
                unit: Unit::Files,
                done: *done,
                total: Some(total),
            });
            k = l;
        }
        Ok(())
    }

    /// Wait while a bulk prefetch fetches `digest`; true if it did.
    fn wait_bulk(&self, digest: &Digest) -> bool {
        let mut bulk = self.bulk.lock().expect("no panics while held");
        let mut waited = false;
        while bulk.contains(digest) {
            waited = true;
            bulk = self
                .bulk_done
                .wait_timeout(bulk, Duration::from_secs(1))
                .expect("no panics while held")
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
    pub fn fetch_whole(&self, digest: &Digest) -> Result<(), ReadError> {
        if self.store.has_object(digest) {
            return Ok(());
        }
        let (desc, rf) = self
            .image
            .remote(digest)
            .ok_or(ReadError::Unknown(*digest))?;
        let p = self.partial_of(digest, rf.size)?;
        let n = rf.chunks.len();
        self.ensure(&p, desc, rf, 0, n, n)?;
        self.maybe_finish(digest, &p)
    }

    fn partial_of(&self, digest: &Digest, size: u64) -> Result<Arc<Partial>, ReadError> {
        let mut map = self.partial.lock().expect("no panics while held");
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
            finished: AtomicBool::new(false),
        });
        map.insert(*digest, p.clone());
        Ok(p)
    }

    /// Make chunks `need` (`first..last`) present, fetching those up to
    /// `ahead` that nobody fetches yet (contiguous ones in one request), and
    /// waiting for the ones other readers fetch.
    fn ensure(
        &self,
        p: &Partial,
        desc: &strata_oci::Descriptor,
        rf: &RemoteFile,
        first: usize,
        last: usize,
        ahead: usize,
    ) -> Result<(), ReadError> {
        loop {
            let mine: Vec<usize> = {
                let mut have = p.have.lock().expect("no panics while held");
                if have[first..last].iter().all(|h| *h == Have::Present) {
                    return Ok(());
                }
                (first..ahead.max(last))
                    .filter(|&i| {
                        let claim = have[i] == Have::Missing;
                        if claim {
                            have[i] = Have::Fetching;
                        }
                        claim
                    })
                    .collect()
            };
            let needed_mine = mine.iter().any(|&i| i >= first && i < last);
            // contiguous runs of claimed chunks
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for &i in &mine {
                match runs.last_mut() {
                    Some((_, e)) if *e == i => *e = i + 1,
                    _ => runs.push((i, i + 1)),
                }
            }
            let mut failure = None;
            for (a, b) in runs {
                let r = if failure.is_none() {
                    self.fetch_run(p, desc, rf, a, b)
                } else {
                    Err(ReadError::Fetch {
                        layer: desc.digest,
                        reason: "skipped after an earlier failure".into(),
                    })
                };
                let mut have = p.have.lock().expect("no panics while held");
                for h in &mut have[a..b] {
                    if *h == Have::Fetching {
                        *h = if r.is_ok() {
                            Have::Present
                        } else {
                            Have::Missing
                        };
                    }
                }
                p.changed.notify_all();
                if let Err(e) = r
                    && failure.is_none()
                {
                    failure = Some(e);
                }
            }
            if let Some(e) = failure
                && needed_mine
            {
                return Err(e);
            }
            // wait for chunks other readers fetch; retry what they failed
            let mut have = p.have.lock().expect("no panics while held");
            while have[first..last].contains(&Have::Fetching) {
                have = p
                    .changed
                    .wait_timeout(have, Duration::from_secs(1))
                    .expect("no panics while held")
                    .0;
            }
            if have[first..last].iter().all(|h| *h == Have::Present) {
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
        let (start, end) = (chunks[0].blob_offset, chunks[chunks.len() - 1].blob_end);
        self.last_read_fetch
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        let all_zeros = chunks.iter().all(|c| c.zeros);
        let bytes = if all_zeros {
            Vec::new()
        } else {
            let _slot = self.slots.take();
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
            let frames = &bytes[(c.blob_offset - start) as usize..(c.blob_end - start) as usize];
            let data = decode_chunk(desc, frames, c).map_err(fail)?;
            p.file.write_all_at(&data, c.file_offset)?;
        }
        Ok(())
    }

    /// When every chunk is present: check the whole file and move it into
    /// the store (once).
    fn maybe_finish(&self, digest: &Digest, p: &Partial) -> Result<(), ReadError> {
        let complete = p
            .have
            .lock()
            .expect("no panics while held")
            .iter()
            .all(|h| *h == Have::Present);
        if !complete || p.finished.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let size = p.file.metadata()?.len();
        let mut hasher = Sha256::new();
        let mut off = 0u64;
        // small: this runs on short-lived read workers, and a megabyte
        // zeroed per finished file stays in the worker's malloc arena
        let mut buf = vec![0u8; HASH_BUF];
        while off < size {
            let n = p.file.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            off += n as u64;
        }
        let got = Digest::sha256_from_bytes(hasher.finalize().into());
        let layer = self.image.remote(digest).map(|(d, _)| d.digest);
        if got != *digest {
            // every chunk matched its digest, the whole does not: a TOC
            // that lies; drop the staging so nothing wrong is kept
            self.forget(digest, p);
            return Err(ReadError::Fetch {
                layer: layer.unwrap_or(*digest),
                reason: format!("file content hashes to {got}, the TOC says {digest}"),
            });
        }
        let mut batch = self.store.object_batch().map_err(io::Error::other)?;
        let mut r = AtReader {
            file: &p.file,
            off: 0,
        };
        let put = batch.put(&mut r, size)?;
        debug_assert_eq!(put, *digest);
        batch.commit().map_err(io::Error::other)?;
        self.stats.files_completed.fetch_add(1, Ordering::Relaxed);
        self.forget(digest, p);
        Ok(())
    }

    fn forget(&self, digest: &Digest, p: &Partial) {
        self.partial
            .lock()
            .expect("no panics while held")
            .remove(digest);
        let _ = fs::remove_file(&p.path);
    }
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

fn pread(f: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
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
