//! The fetcher below the binary: a local OCI layout of the Debian+python
//! image converted to zstd:chunked, served through a source that counts,
//! fails and tampers on demand. No mounts: these run as any user.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use strata_digest::Digest;
use strata_lazy::{Fetcher, LazyImage, ReadError};
use strata_oci::pull::{PullOptions, pull};
use strata_oci::{Descriptor, ImageRef, ImageSource, OciError, Platform, ResolvedImage};
use strata_ops::Ctl;
use strata_store::{SplitPolicy, Store};
use strata_tree::NodeKind;

/// A source that counts range reads and can fail, flip bytes, panic or
/// stall.
struct Faulty {
    inner: Box<dyn ImageSource>,
    ranges: AtomicU64,
    /// Requests of several ranges.
    range_lists: AtomicU64,
    fail: AtomicBool,
    tamper: AtomicBool,
    panic: AtomicBool,
    /// Milliseconds a range read sleeps before failing (0: none).
    stall_ms: AtomicU64,
    /// Range reads and ranged streams running now, and the most seen at once.
    inflight: Arc<AtomicU64>,
    max_inflight: Arc<AtomicU64>,
    /// Milliseconds every range read takes (0: as fast as it can).
    delay_ms: AtomicU64,
    /// Ranged streams opened, and milliseconds each read of one takes.
    streams: AtomicU64,
    stream_step_ms: AtomicU64,
}

/// A stream read slowly, its first byte flipped when tampering.
struct Slow {
    inner: Box<dyn Read + Send>,
    step_ms: u64,
    flip: bool,
    /// Counted in flight until dropped.
    inflight: Arc<AtomicU64>,
}

impl Drop for Slow {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Read for Slow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::thread::sleep(std::time::Duration::from_millis(self.step_ms));
        let most = buf.len().min(32 << 10);
        let n = self.inner.read(&mut buf[..most])?;
        if self.flip && n > 0 {
            buf[0] ^= 0xff;
            self.flip = false;
        }
        Ok(n)
    }
}

impl Faulty {
    fn check(&self, desc: &Descriptor) -> Result<(), OciError> {
        if self.panic.load(Ordering::SeqCst) {
            // as a worker did on a TOC's wrapped-around chunk size
            let n = usize::MAX - self.ranges.load(Ordering::SeqCst) as usize;
            let v: Vec<u8> = Vec::with_capacity(n);
            std::hint::black_box(v);
            panic!("injected panic");
        }
        let stall = self.stall_ms.load(Ordering::SeqCst);
        if stall > 0 {
            std::thread::sleep(std::time::Duration::from_millis(stall));
            return Err(OciError::Network {
                action: format!("reading blob {}", desc.digest),
                reason: "injected stall".into(),
            });
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(OciError::Network {
                action: format!("reading blob {}", desc.digest),
                reason: "injected failure".into(),
            });
        }
        Ok(())
    }

    fn spoil(&self, mut b: Vec<u8>) -> Vec<u8> {
        if self.tamper.load(Ordering::SeqCst)
            && let Some(x) = b.get_mut(0)
        {
            *x ^= 0xff;
        }
        b
    }
}

impl ImageSource for Faulty {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        self.inner.resolve(platform)
    }
    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        self.check(desc)?;
        self.inner.open_blob(desc, offset)
    }
    fn open_range(
        &self,
        desc: &Descriptor,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        self.check(desc)?;
        self.streams.fetch_add(1, Ordering::SeqCst);
        let inner = self.inner.open_range(desc, offset, len)?;
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        Ok(Box::new(Slow {
            inner,
            step_ms: self.stream_step_ms.load(Ordering::SeqCst),
            flip: self.tamper.load(Ordering::SeqCst),
            inflight: self.inflight.clone(),
        }))
    }
    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        self.check(desc)?;
        self.ranges.fetch_add(1, Ordering::SeqCst);
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        let r = self.inner.read_range(desc, offset, len);
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        Ok(self.spoil(r?))
    }
    fn read_ranges(&self, desc: &Descriptor, r: &[(u64, u64)]) -> Result<Vec<Vec<u8>>, OciError> {
        self.range_lists.fetch_add(1, Ordering::SeqCst);
        r.iter()
            .map(|(o, l)| self.read_range(desc, *o, *l))
            .collect()
    }
    fn describe(&self) -> String {
        format!("faulty {}", self.inner.describe())
    }
}

/// The converted layout (made once per test process) and a store holding
/// the original image (the truth for file contents).
struct Fixture {
    _dir: tempfile::TempDir,
    layout: ImageRef,
    truth: Store,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let truth = Store::open(dir.path().join("truth")).unwrap();
    let src: ImageRef = format!(
        "oci:{}:python",
        strata_testkit::fixtures_dir().join("debian").display()
    )
    .parse()
    .unwrap();
    let opts = PullOptions {
        platform: Platform::host_default(),
        registry: Default::default(),
        jobs: 2,
        split: SplitPolicy::Never,
        partial: true,
    };
    let image = pull(&truth, &src, "py", &opts, Ctl::none())
        .unwrap()
        .manifest_digest;
    let out = dir.path().join("chunked");
    let copts = strata_oci::convert::ConvertOptions {
        format: strata_oci::convert::Format::ZstdChunked,
        level: 3,
        jobs: 2,
        prefetch: Vec::new(),
        place_first: false,
        ..Default::default()
    };
    strata_oci::convert::convert_to_layout(&truth, &image, &out, Some("c"), &copts, Ctl::none())
        .unwrap();
    let layout = format!("oci:{}:c", out.display()).parse().unwrap();
    Fixture {
        _dir: dir,
        layout,
        truth,
    }
}

/// A fresh store, a fetcher over `source`, and the python binary's content.
fn fetcher(
    dir: &std::path::Path,
    source: Arc<Faulty>,
    parallel: usize,
) -> (Arc<Fetcher>, Digest, u64) {
    fetcher_with(dir, source, parallel, |_, _| {}, None)
}

/// [`fetcher`], with the prepared image changed by `tweak` (as a hostile
/// TOC would have it) and the store given to it first, and a wait limit.
fn fetcher_with(
    dir: &std::path::Path,
    source: Arc<Faulty>,
    parallel: usize,
    tweak: impl FnOnce(&mut LazyImage, &Store),
    wait: Option<std::time::Duration>,
) -> (Arc<Fetcher>, Digest, u64) {
    let store = Arc::new(Store::open(dir.join("store")).unwrap());
    let resolved = source.resolve(&Platform::host_default()).unwrap();
    let mut image = strata_lazy::prepare(&store, source.as_ref(), resolved).unwrap();
    tweak(&mut image, &store);
    let (digest, size) = match image.tree.lookup(b"usr/bin/python3.11").map(|n| &n.kind) {
        Some(NodeKind::Regular { digest, size }) => (*digest, *size),
        other => panic!("python3.11 is a regular file: {other:?}"),
    };
    let mut f = Fetcher::new(
        store,
        source,
        Arc::new(image),
        dir.join("partial"),
        parallel,
    )
    .unwrap();
    if let Some(w) = wait {
        f.set_wait_limit(w);
    }
    (Arc::new(f), digest, size)
}

fn faulty(fx: &Fixture) -> Arc<Faulty> {
    Arc::new(Faulty {
        inner: strata_oci::open_source(&fx.layout, &Default::default()).unwrap(),
        ranges: AtomicU64::new(0),
        range_lists: AtomicU64::new(0),
        fail: AtomicBool::new(false),
        tamper: AtomicBool::new(false),
        panic: AtomicBool::new(false),
        stall_ms: AtomicU64::new(0),
        inflight: Arc::new(AtomicU64::new(0)),
        max_inflight: Arc::new(AtomicU64::new(0)),
        delay_ms: AtomicU64::new(0),
        streams: AtomicU64::new(0),
        stream_step_ms: AtomicU64::new(0),
    })
}

fn truth_bytes(fx: &Fixture, d: &Digest) -> Vec<u8> {
    let mut b = Vec::new();
    fx.truth
        .open_object(d)
        .unwrap()
        .read_to_end(&mut b)
        .unwrap();
    b
}

#[test]
fn concurrent_readers_of_one_chunk_share_one_fetch() {
    let fx = fixture();
    let want = {
        let tmp = tempfile::tempdir().unwrap();
        let (f, d, size) = fetcher(tmp.path(), faulty(&fx), 4);
        let b = f.read(&d, size, 0, 65536).unwrap();
        assert_eq!(b, truth_bytes(&fx, &d)[..65536]);
        f.stats.chunks_fetched.load(Ordering::SeqCst)
    };
    assert!(want > 0);
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, d, size) = fetcher(tmp.path(), src.clone(), 4);
    let truth = truth_bytes(&fx, &d);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                let b = f.read(&d, size, 0, 65536).unwrap();
                assert!(b == truth[..65536], "the right bytes");
            });
        }
    });
    assert_eq!(
        f.stats.chunks_fetched.load(Ordering::SeqCst),
        want,
        "16 readers fetched what one reader fetches"
    );
    assert_eq!(f.stats.errors.load(Ordering::SeqCst), 0);
}

#[test]
fn tampered_bytes_are_an_error_and_nothing_is_stored() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, d, size) = fetcher(tmp.path(), src.clone(), 2);
    src.tamper.store(true, Ordering::SeqCst);
    let e = f
        .read(&d, size, 0, 4096)
        .expect_err("tampered chunks are refused");
    // a flipped byte breaks the frame or the chunk's digest: either way
    // the read fails naming the layer
    assert!(e.to_string().contains("layer sha256:"), "{e}");
    assert!(!f.store().has_object(&d), "nothing stored");
    assert!(f.stats.errors.load(Ordering::SeqCst) > 0);
    // the same fetcher reads right once the source is honest
    src.tamper.store(false, Ordering::SeqCst);
    let b = f.read(&d, size, 0, 4096).unwrap();
    assert_eq!(b, truth_bytes(&fx, &d)[..4096]);
}

#[test]
fn a_failing_source_fails_reads_which_recover_and_whole_files_reach_the_store() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, d, size) = fetcher(tmp.path(), src.clone(), 1);
    src.fail.store(true, Ordering::SeqCst);
    assert!(f.read(&d, size, 0, 4096).is_err());
    src.fail.store(false, Ordering::SeqCst);
    // read the whole file: it is verified as a whole and stored
    let truth = truth_bytes(&fx, &d);
    let mut got = Vec::new();
    let mut off = 0;
    while off < size {
        let b = f.read(&d, size, off, 1 << 20).unwrap();
        assert!(!b.is_empty());
        off += b.len() as u64;
        got.extend(b);
    }
    assert!(got == truth, "the whole file");
    // the read returned once the file was checked; the store gets it in
    // the background
    f.flush();
    assert!(
        f.store().has_object(&d),
        "a complete file goes into objects/"
    );
    let mut stored = Vec::new();
    f.store()
        .open_object(&d)
        .unwrap()
        .read_to_end(&mut stored)
        .unwrap();
    assert!(stored == truth);
}

/// Run `f` on a thread; its result, or a panic of the test if it takes
/// longer than `limit` (a reader stuck for good).
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

/// Issue 15: a fetch that panics leaves no chunk "being fetched": every
/// reader of the file ends promptly (the panic, or an error), and once
/// the source behaves, reads work.
#[test]
fn a_panicking_fetch_resolves_every_waiter_and_later_reads_work() {
    let truth_fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&truth_fx);
    let (f, d, size) = fetcher_with(
        tmp.path(),
        src.clone(),
        4,
        |_, _| {},
        Some(std::time::Duration::from_secs(5)),
    );
    src.panic.store(true, Ordering::SeqCst);
    let outcomes = {
        let f = f.clone();
        within(
            std::time::Duration::from_secs(30),
            "readers of a panicking fetch",
            move || {
                std::thread::scope(|s| {
                    let hs: Vec<_> = (0..8)
                        .map(|_| {
                            s.spawn(|| {
                                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                    f.read(&d, size, 0, 4096)
                                }))
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| match h.join().unwrap() {
                            Ok(Ok(_)) => "data",
                            Ok(Err(_)) => "error",
                            Err(_) => "panic",
                        })
                        .collect::<Vec<_>>()
                })
            },
        )
    };
    assert!(
        outcomes.iter().all(|o| *o != "data"),
        "no reader got data from a panicking source: {outcomes:?}"
    );
    assert!(outcomes.contains(&"panic"), "{outcomes:?}");
    // the chunks went back to missing: the next read fetches them
    src.panic.store(false, Ordering::SeqCst);
    let truth = truth_bytes(&truth_fx, &d);
    let got = {
        let f = f.clone();
        within(
            std::time::Duration::from_secs(30),
            "a read after the panic",
            move || f.read(&d, size, 0, 4096),
        )
    }
    .expect("reads work once the source behaves");
    assert!(got == truth[..4096]);
}

/// Issue 15: readers waiting for chunks another read fetches give up
/// within the wait limit when that fetch hangs, with an error.
#[test]
fn waiters_of_a_stalled_fetch_get_errors_within_the_bound() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let limit = std::time::Duration::from_millis(500);
    let (f, d, size) = fetcher_with(tmp.path(), src.clone(), 8, |_, _| {}, Some(limit));
    // the first reader's request takes 6 s, then fails
    src.stall_ms.store(6000, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    let times = {
        let f = f.clone();
        within(
            std::time::Duration::from_secs(30),
            "readers of a stalled fetch",
            move || {
                std::thread::scope(|s| {
                    let hs: Vec<_> = (0..6)
                        .map(|_| {
                            s.spawn(|| {
                                let r = f.read(&d, size, 0, 4096);
                                (r.is_err(), t0.elapsed())
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap())
                        .collect::<Vec<_>>()
                })
            },
        )
    };
    assert!(
        times.iter().all(|(err, _)| *err),
        "every reader fails: {times:?}"
    );
    // the fetching reader waits for its request; the others gave up
    let quick = times
        .iter()
        .filter(|(_, t)| *t < std::time::Duration::from_secs(3))
        .count();
    assert!(
        quick >= times.len() - 1,
        "waiters gave up within the bound: {times:?}"
    );
}

/// The files of the image's lazy layers with `f` (layer, file index).
fn lazy_files(image: &LazyImage) -> Vec<(usize, usize, u64)> {
    let mut v = Vec::new();
    for (l, layer) in image.layers.iter().enumerate() {
        if let Some(ix) = &layer.index {
            for (i, f) in ix.files.iter().enumerate() {
                v.push((l, i, f.size));
            }
        }
    }
    v
}

/// Each of `digests` is in the fetcher's store with the right bytes.
fn assert_stored(f: &Fetcher, digests: &[Digest]) {
    for d in digests {
        let mut b = Vec::new();
        f.store()
            .open_object(d)
            .unwrap()
            .read_to_end(&mut b)
            .unwrap();
        assert_eq!(Digest::sha256_of(&b), *d);
    }
}

/// Consecutive files of one lazy layer, in blob order, whose frames span
/// at least `bytes`: what a list placed first is.
fn long_run(image: &LazyImage, bytes: u64) -> Vec<Digest> {
    for layer in &image.layers {
        let Some(ix) = &layer.index else { continue };
        let mut files: Vec<_> = ix.files.iter().filter(|f| f.size > 0).collect();
        files.sort_by_key(|f| f.offset);
        let mut seen = std::collections::HashSet::new();
        let mut run: Vec<Digest> = Vec::new();
        let start = files.first().map_or(0, |f| f.offset);
        for f in files {
            if !seen.insert(f.digest) {
                continue;
            }
            run.push(f.digest);
            if f.end - start >= bytes {
                return run;
            }
        }
    }
    panic!("no layer spans {bytes} bytes");
}

#[test]
fn a_long_run_of_files_streams_in_one_request_each_served_as_it_arrives() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, _, _) = fetcher(dir.path(), src.clone(), 4);
    let run = long_run(f.image(), 3 << 20);
    assert!(run.len() > 10, "a run of many files: {}", run.len());
    let (first, first_size) = f
        .image()
        .remote(&run[0])
        .map(|(_, rf)| (rf.digest, rf.size))
        .unwrap();
    src.stream_step_ms.store(15, Ordering::SeqCst);
    // (the TOCs were read by range)
    let ranges = src.ranges.load(Ordering::SeqCst);
    // reads made before the list starts wait for it
    f.reserve_bulk(&run);
    std::thread::scope(|s| {
        let list = s.spawn(|| f.fetch_many(&run, Ctl::none()));
        let got = f.read(&first, first_size, 0, 4096).unwrap();
        assert!(
            !list.is_finished(),
            "the first file was served before the rest of the run arrived"
        );
        assert_eq!(got, truth_bytes(&fx, &first)[..got.len()]);
        assert_eq!(list.join().unwrap().unwrap(), run.len());
    });
    assert_eq!(src.streams.load(Ordering::SeqCst), 1, "one request");
    assert_eq!(
        src.ranges.load(Ordering::SeqCst),
        ranges,
        "no range read besides"
    );
    assert_stored(&f, &run);
}

/// A small file read brings its small neighbours of the same directory
/// in the same streamed request, and the read returns once its own bytes
/// are in: the rest is taken after it (a read of one of them waits for
/// that stream instead of asking again). A rest dropped untaken releases
/// its files: their reads fetch them themselves.
#[test]
fn a_read_returns_before_the_neighbours_its_request_brings() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, _, _) = fetcher(dir.path(), src.clone(), 4);
    // checked and served (from staging or the store)
    let served = |d: &Digest| f.open_verified(d).unwrap().is_some();
    // small files, in blob order: the first whose read brings neighbours
    let mut small: Vec<(Digest, u64)> = Vec::new();
    for layer in &f.image().layers {
        let Some(ix) = &layer.index else { continue };
        let mut files: Vec<_> = ix.files.iter().filter(|rf| rf.size > 0).collect();
        files.sort_by_key(|rf| rf.offset);
        small.extend(
            files
                .iter()
                .filter(|rf| rf.end - rf.offset < 16 << 10)
                .map(|rf| (rf.digest, rf.size)),
        );
    }
    // each read's stream is slow: 40 ms per 32 KiB
    src.stream_step_ms.store(40, Ordering::SeqCst);
    let mut found = None;
    for (d, size) in small.iter().take(400) {
        if served(d) {
            continue;
        }
        let (data, rest) = f.read_streamed(d, *size, 0, 4096).unwrap();
        assert_eq!(data, truth_bytes(&fx, d)[..data.len()]);
        match rest {
            Some(rest) if rest.files().len() >= 2 => {
                found = Some((*d, rest));
                break;
            }
            Some(rest) => rest.finish(),
            None => {}
        }
    }
    let (read, rest) = found.expect("a small file with neighbours");
    let near = rest.files();
    assert!(served(&read));
    assert!(
        near.iter().all(|d| !served(d)),
        "the read returned before its neighbours arrived"
    );
    let (streams, ranges) = (
        src.streams.load(Ordering::SeqCst),
        src.ranges.load(Ordering::SeqCst),
    );
    let last = *near.last().unwrap();
    let last_size = f.image().remote(&last).unwrap().1.size;
    std::thread::scope(|s| {
        let waiting = s.spawn(|| f.read(&last, last_size, 0, 4096));
        rest.finish();
        let got = waiting.join().unwrap().unwrap();
        assert_eq!(got, truth_bytes(&fx, &last)[..got.len()]);
    });
    assert!(near.iter().all(served));
    assert_eq!(
        (
            src.streams.load(Ordering::SeqCst),
            src.ranges.load(Ordering::SeqCst)
        ),
        (streams, ranges),
        "the neighbour's read asked for nothing more"
    );
    f.flush();
    assert_stored(&f, &near);

    // a rest dropped untaken: its files are released and fetched by reads
    let mut dropped = None;
    for (d, size) in small.iter().skip(400).take(400) {
        if served(d) {
            continue;
        }
        if let (_, Some(rest)) = f.read_streamed(d, *size, 0, 4096).unwrap() {
            if rest.files().is_empty() {
                continue;
            }
            dropped = Some(rest.files());
            drop(rest);
            break;
        }
    }
    let dropped = dropped.expect("another small file with neighbours");
    let d = dropped[0];
    let size = f.image().remote(&d).unwrap().1.size;
    let got = within(
        std::time::Duration::from_secs(10),
        "a released file's read",
        {
            let f = f.clone();
            move || f.read(&d, size, 0, 4096)
        },
    )
    .unwrap();
    assert_eq!(got, truth_bytes(&fx, &d)[..got.len()]);
}

/// With no list, `Prefetch::All` starts with what a program loads first:
/// the image's command looked up on its PATH, the programs its top layer
/// adds to the PATH, the dynamic loader, `/etc/ld.so.cache` and libc
/// (symlinks followed inside the image).
#[test]
fn the_start_set_is_the_command_the_loader_libc_and_the_files_their_first_calls_read() {
    let fx = fixture();
    let regular =
        |image: &LazyImage, p: &str| match image.tree.lookup(p.as_bytes()).map(|n| &n.kind) {
            Some(NodeKind::Regular { digest, .. }) => *digest,
            other => panic!("{p} is a regular file: {other:?}"),
        };
    let (libc, loader) = if cfg!(target_arch = "aarch64") {
        (
            "usr/lib/aarch64-linux-gnu/libc.so.6",
            "usr/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1",
        )
    } else {
        (
            "usr/lib/x86_64-linux-gnu/libc.so.6",
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        )
    };
    // the fixture's config names no command: the program its top layer
    // adds to the PATH comes first (python3.11; none of the base layer's
    // programs, and not the python layer's scripts)
    let dir = tempfile::tempdir().unwrap();
    let (f, python, _) = fetcher(dir.path(), faulty(&fx), 2);
    let image = f.image();
    let set = strata_lazy::start_set(image);
    let want = [
        python,
        regular(image, loader),
        regular(image, "etc/ld.so.cache"),
        regular(image, libc),
        // then the small files read before the program and by its first
        // calls (localtime is a symlink to the zone's file)
        regular(image, "etc/passwd"),
        regular(image, "etc/group"),
        regular(image, "usr/lib/locale/C.utf8/LC_CTYPE"),
        regular(image, "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache"),
        regular(image, "usr/share/zoneinfo/Etc/UTC"),
    ];
    assert_eq!(set, want, "python, loader, cache, libc, the small ones");
    // with `cmd` as the image's command: its start set, and the digest
    // of `path` in it
    let with_command = |cmd: serde_json::Value, path: &str| {
        let dir = tempfile::tempdir().unwrap();
        let (f, ..) = fetcher_with(
            dir.path(),
            faulty(&fx),
            2,
            |image, _| {
                let mut config: serde_json::Value =
                    serde_json::from_slice(&image.resolved.config_bytes).unwrap();
                config["config"] = serde_json::json!({
                    "Env": ["PATH=/nonexistent:/usr/bin"],
                    "Cmd": cmd,
                });
                image.resolved.config_bytes = serde_json::to_vec(&config).unwrap();
            },
            None,
        );
        (strata_lazy::start_set(f.image()), regular(f.image(), path))
    };
    // a command: first, found on the image's PATH
    let (set, bash) = with_command(serde_json::json!(["bash", "-c", "true"]), "usr/bin/bash");
    assert_eq!(set[0], bash, "the command first");
    assert_eq!(set[1..], want);
    // a command that is the layer's program: named once
    let (set, _) = with_command(
        serde_json::json!(["python3", "-c", "print(1)"]),
        "usr/bin/python3.11",
    );
    assert_eq!(set, want, "python3 -> python3.11 first");
}

#[test]
fn a_tampered_stream_stores_nothing_of_the_file_it_spoils() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, _, _) = fetcher(dir.path(), src.clone(), 4);
    let run = long_run(f.image(), 2 << 20);
    src.tamper.store(true, Ordering::SeqCst);
    let r = f.fetch_many(&run, Ctl::none());
    assert!(
        matches!(r, Err(ReadError::Fetch { .. })),
        "a spoiled stream fails the list: {r:?}"
    );
    assert_eq!(src.streams.load(Ordering::SeqCst), 1);
    assert!(
        !f.store().has_object(&run[0]),
        "the spoiled file is not stored"
    );
    // the registry mends: a read fetches the file itself, right
    src.tamper.store(false, Ordering::SeqCst);
    let size = f.image().remote(&run[0]).unwrap().1.size;
    let b = f.read(&run[0], size, 0, 4096).unwrap();
    assert_eq!(b, truth_bytes(&fx, &run[0])[..b.len()]);
}

/// Issue 15: two files whose TOC entries were swapped (each entry names
/// the other's digest and frames; the tar-split keeps each file's own
/// checksum): reads of both fail, and neither's bytes are served.
#[test]
fn swapped_toc_entries_are_refused() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let pair = std::sync::Mutex::new(None);
    let (f, _, _) = fetcher_with(
        tmp.path(),
        src.clone(),
        2,
        |image, _| {
            // two files of one layer, one small, one of several chunks
            let files = lazy_files(image);
            let (l, a, _) = *files
                .iter()
                .find(|(_, _, s)| *s > 4096 && *s < 65536)
                .unwrap();
            let (_, b, _) = *files
                .iter()
                .filter(|(ll, _, _)| *ll == l)
                .max_by_key(|(_, _, s)| *s)
                .unwrap();
            let ix = image.layers[l].index.as_mut().unwrap();
            let (ca, cb) = (ix.files[a].crc64, ix.files[b].crc64);
            assert_ne!(ca, cb);
            ix.files[a].crc64 = cb;
            ix.files[b].crc64 = ca;
            *pair.lock().unwrap() = Some([
                (ix.files[a].digest, ix.files[a].size),
                (ix.files[b].digest, ix.files[b].size),
            ]);
        },
        None,
    );
    let pair = pair.lock().unwrap().unwrap();
    for (d, size) in pair {
        for _ in 0..2 {
            match f.read(&d, size, 0, 4096) {
                Err(ReadError::Rejected { .. }) => {}
                other => panic!("a swapped entry's read is refused: {other:?}"),
            }
        }
        assert!(!f.store().has_object(&d), "nothing refused is stored");
        assert!(f.open_verified(&d).is_err());
    }
}

/// Issue 15: a TOC naming the digest of an object another image put in
/// the store, for a file whose tar-split entry says other content: the
/// read fails without one byte of that object, and without a fetch.
#[test]
fn an_object_of_another_image_is_not_served_on_the_tocs_word() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let target = std::sync::Mutex::new(None);
    let (f, _, _) = fetcher_with(
        tmp.path(),
        src.clone(),
        2,
        |image, store| {
            let files = lazy_files(image);
            let (l, i, _) = *files.iter().find(|(_, _, s)| *s > 4096).unwrap();
            let ix = image.layers[l].index.as_mut().unwrap();
            let file = &mut ix.files[i];
            // "another tenant's" object, in the store already
            let bytes = truth_bytes(&fx, &file.digest);
            let mut batch = store.object_batch().unwrap();
            batch
                .put(&mut bytes.as_slice(), bytes.len() as u64)
                .unwrap();
            batch.commit().unwrap();
            // the hostile file's own tar-split checksum is another's
            file.crc64 = file.crc64.map(|c| c ^ 0x5a5a);
            *target.lock().unwrap() = Some((file.digest, file.size));
        },
        None,
    );
    let (d, size) = target.lock().unwrap().unwrap();
    assert!(f.store().has_object(&d));
    let ranges = src.ranges.load(Ordering::SeqCst);
    match f.read(&d, size, 0, 4096) {
        Err(ReadError::Rejected { .. }) => {}
        other => panic!("the foreign object is refused: {other:?}"),
    }
    assert!(f.open_verified(&d).is_err());
    assert!(f.fetch_whole(&d).is_err());
    assert_eq!(src.ranges.load(Ordering::SeqCst), ranges, "nothing fetched");
}

/// An object in the store whose checksum matches the tar-split entry is
/// served without a fetch (the check is not a refusal of dedup).
#[test]
fn an_object_in_the_store_matching_the_tar_split_is_served() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, d, size) = fetcher_with(
        tmp.path(),
        src.clone(),
        2,
        |image, store| {
            let d = match image.tree.lookup(b"usr/bin/python3.11").map(|n| &n.kind) {
                Some(NodeKind::Regular { digest, .. }) => *digest,
                _ => unreachable!(),
            };
            let bytes = truth_bytes(&fx, &d);
            let mut batch = store.object_batch().unwrap();
            batch
                .put(&mut bytes.as_slice(), bytes.len() as u64)
                .unwrap();
            batch.commit().unwrap();
        },
        None,
    );
    assert!(f.open_verified(&d).unwrap().is_none(), "not checked yet");
    let ranges = src.ranges.load(Ordering::SeqCst);
    let got = f.read(&d, size, 0, 4096).unwrap();
    assert!(got == truth_bytes(&fx, &d)[..4096]);
    assert_eq!(
        src.ranges.load(Ordering::SeqCst),
        ranges,
        "served from the store"
    );
    assert!(f.open_verified(&d).unwrap().is_some(), "checked once");
}

/// Issue 15: a layer whose files are all present is rebuilt and checked
/// against its diff_id; on a mismatch the mount is inconsistent and every
/// read fails.
#[test]
fn a_complete_layer_failing_its_diff_id_makes_the_mount_inconsistent() {
    let fx = fixture();
    for wrong in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let src = faulty(&fx);
        let (f, d, size) = fetcher_with(
            tmp.path(),
            src.clone(),
            2,
            |image, store| {
                // the smallest lazy layer's files, all in the store
                let l = (0..image.layers.len())
                    .filter(|l| image.layers[*l].index.is_some())
                    .min_by_key(|l| image.layers[*l].desc.size)
                    .unwrap();
                let ix = image.layers[l].index.as_ref().unwrap();
                let mut batch = store.object_batch().unwrap();
                for file in &ix.files {
                    let bytes = truth_bytes(&fx, &file.digest);
                    batch
                        .put(&mut bytes.as_slice(), bytes.len() as u64)
                        .unwrap();
                }
                batch.commit().unwrap();
                if wrong {
                    image.layers[l].diff_id = Digest::sha256_of(b"another tar");
                }
            },
            None,
        );
        match (wrong, f.check_layers()) {
            (false, Ok(n)) => assert!(n >= 1, "the complete layer was checked"),
            (true, Err(ReadError::Inconsistent(why))) => {
                assert!(why.contains("diff_id"), "{why}")
            }
            (_, r) => panic!("wrong diff_id {wrong}: {r:?}"),
        }
        assert_eq!(f.inconsistent().is_some(), wrong);
        let r = f.read(&d, size, 0, 4096);
        if wrong {
            assert!(matches!(r, Err(ReadError::Inconsistent(_))), "{r:?}");
        } else {
            assert!(r.unwrap() == truth_bytes(&fx, &d)[..4096]);
        }
    }
}

/// A sink that cancels at the first progress event and notes how many
/// range reads had been made by then.
struct CancelAtProgress<'a> {
    cancel: &'a strata_ops::Cancel,
    source: &'a Faulty,
    ranges_at_cancel: AtomicU64,
}

impl strata_ops::EventSink for CancelAtProgress<'_> {
    fn event(&self, e: &strata_ops::Event) {
        if matches!(e, strata_ops::Event::Progress { .. }) && !self.cancel.is_cancelled() {
            self.ranges_at_cancel
                .store(self.source.ranges.load(Ordering::SeqCst), Ordering::SeqCst);
            self.cancel.cancel();
        }
    }
}

#[test]
fn a_cancelled_prefetch_list_stops_within_one_request_and_keeps_what_it_stored() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, _, _) = fetcher(dir.path(), src.clone(), 4);
    let all: Vec<Digest> = f
        .image()
        .contents()
        .into_iter()
        .filter(|d| !f.store().has_object(d))
        .collect();
    assert!(all.len() > 100, "the image has many contents to fetch");
    let cancel = strata_ops::Cancel::new();
    let sink = CancelAtProgress {
        cancel: &cancel,
        source: &src,
        ranges_at_cancel: AtomicU64::new(0),
    };
    let ctl = Ctl {
        events: &sink,
        cancel: &cancel,
    };
    let r = f.fetch_many(&all, ctl);
    assert!(
        matches!(r, Err(ReadError::Cancelled)),
        "a cancelled list says so: {r:?}"
    );
    // the request that reported progress was the last one sent
    assert_eq!(
        src.ranges.load(Ordering::SeqCst),
        sink.ranges_at_cancel.load(Ordering::SeqCst),
        "no range read after the cancel"
    );
    let stored = all.iter().filter(|d| f.store().has_object(d)).count();
    assert!(
        stored >= 1 && stored < all.len(),
        "what arrived before the cancel stays, the rest was not fetched: {stored} of {}",
        all.len()
    );
    // a re-run fetches the rest, and every content is right
    let n = f.fetch_many(&all, Ctl::none()).unwrap();
    assert_eq!(
        n + stored,
        all.len(),
        "the re-run fetches only what is missing"
    );
    assert_stored(&f, &all[..50.min(all.len())]);
}

#[test]
fn reads_never_run_more_fetches_at_once_than_the_pool_allows() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    src.delay_ms.store(30, Ordering::SeqCst);
    let (f, _, _) = fetcher(dir.path(), src.clone(), 2);
    // 16 readers of 16 different contents at once
    let mut files: Vec<(Digest, u64)> = f
        .image()
        .contents()
        .into_iter()
        .filter_map(|d| f.image().remote(&d).map(|(_, rf)| (d, rf.size)))
        .collect();
    files.sort_by_key(|(d, _)| *d);
    files.truncate(16);
    assert_eq!(files.len(), 16);
    std::thread::scope(|s| {
        for (d, size) in &files {
            let f = f.clone();
            s.spawn(move || {
                let b = f.read(d, *size, 0, 4096).unwrap();
                assert_eq!(b.len() as u64, (*size).min(4096));
            });
        }
    });
    let max = src.max_inflight.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&max),
        "at most 2 fetches at once with a pool of 2, saw {max}"
    );
    // each read its own request (a small file's brings its neighbours)
    assert!(src.ranges.load(Ordering::SeqCst) + src.streams.load(Ordering::SeqCst) >= 16);
}

/// A Python module, once opened, brings what it imports when it runs,
/// and those bring theirs, before the interpreter asks; what it does not
/// import (a function's imports, other modules of its package) stays.
#[test]
fn an_opened_python_module_brings_what_its_imports_import() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let src = faulty(&fx);
    let (f, ..) = fetcher(dir.path(), src.clone(), 4);
    let image = f.image();
    let file = |p: &str| match image.tree.lookup(p.as_bytes()).map(|n| &n.kind) {
        Some(NodeKind::Regular { digest, .. }) => *digest,
        other => panic!("{p} is a regular file: {other:?}"),
    };
    let lib = "usr/lib/python3.11";
    let pyc = |m: &str| file(&format!("{lib}/{m}.cpython-311.pyc"));
    let decoder = pyc("json/__pycache__/decoder");
    // the module is read (what its first read fetches)
    let size = image.remote(&decoder).unwrap().1.size;
    f.read(&decoder, size, 0, size as u32).unwrap();
    f.flush();
    let loads = f.deps_to_prefetch(&decoder);
    let json_ext = image
        .tree
        .walk()
        .find(|(p, _)| p.starts_with(format!("{lib}/lib-dynload/_json.").as_bytes()))
        .map(|(p, _)| file(std::str::from_utf8(&p).unwrap()))
        .expect("the _json extension");
    // `import re`, `from json import scanner`, `from _json import ...`
    // (a module its read brought along as a neighbour is not asked for)
    for (what, d) in [
        ("re", pyc("re/__pycache__/__init__")),
        ("json.scanner", pyc("json/__pycache__/scanner")),
        ("_json", json_ext),
    ] {
        assert!(
            loads.files.contains(&d) || f.store().has_object(&d),
            "{what} is not brought: {:?}",
            loads.files
        );
    }
    assert!(loads.files.contains(&pyc("re/__pycache__/__init__")));
    // a module of the image, if it has it
    let module = |m: &str| match image
        .tree
        .lookup(format!("{lib}/{m}.cpython-311.pyc").as_bytes())
        .map(|n| &n.kind)
    {
        Some(NodeKind::Regular { digest, .. }) => Some(*digest),
        _ => None,
    };
    // not imported by json.decoder
    for m in [
        "json/__pycache__/encoder",
        "json/__pycache__/tool",
        "sqlite3/__pycache__/__init__",
    ] {
        if let Some(digest) = module(m) {
            assert!(!loads.files.contains(&digest), "{m} is brought");
        }
    }
    // looked at once
    assert!(f.deps_to_prefetch(&decoder).is_empty());
    let asked = src.range_lists.load(Ordering::SeqCst);
    f.fetch_deps(&decoder, loads);
    f.flush();
    // re, then what re imports when it runs, then what those import:
    // all in without a read of any
    let deep = [
        pyc("re/__pycache__/__init__"),
        pyc("re/__pycache__/_compiler"),
        pyc("re/__pycache__/_parser"),
        pyc("re/__pycache__/_casefix"),
        pyc("__pycache__/enum"),
        pyc("__pycache__/types"),
        pyc("__pycache__/functools"),
        pyc("collections/__pycache__/__init__"),
        pyc("__pycache__/keyword"),
        json_ext,
    ];
    assert_stored(&f, &deep);
    // a request per round of imports (one layer), not one per module
    let requests = src.range_lists.load(Ordering::SeqCst) - asked;
    assert!(
        requests < deep.len() as u64,
        "{requests} requests for {} modules",
        deep.len()
    );
    // what nothing imports at import time stays remote
    for m in [
        "sqlite3/__pycache__/__init__",
        "__pycache__/subprocess",
        "email/__pycache__/__init__",
    ] {
        if let Some(digest) = module(m) {
            assert!(!f.store().has_object(&digest), "{m} was fetched");
        }
    }
    // the modules fetched ahead were looked at as they came: opening one
    // asks for nothing more
    assert!(f.deps_to_prefetch(&pyc("__pycache__/enum")).is_empty());
}
