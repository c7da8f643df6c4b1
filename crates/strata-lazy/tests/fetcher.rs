//! The fetcher below the binary: a local OCI layout of the Debian+python
//! image converted to zstd:chunked, served through a source that counts,
//! fails and tampers on demand. No mounts: these run as any user.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use strata_digest::Digest;
use strata_lazy::Fetcher;
use strata_oci::pull::{PullOptions, pull};
use strata_oci::{Descriptor, ImageRef, ImageSource, OciError, Platform, ResolvedImage};
use strata_ops::Ctl;
use strata_store::{SplitPolicy, Store};
use strata_tree::NodeKind;

/// A source that counts range reads and can fail or flip bytes.
struct Faulty {
    inner: Box<dyn ImageSource>,
    ranges: AtomicU64,
    fail: AtomicBool,
    tamper: AtomicBool,
}

impl Faulty {
    fn check(&self, desc: &Descriptor) -> Result<(), OciError> {
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
    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        self.check(desc)?;
        self.ranges.fetch_add(1, Ordering::SeqCst);
        Ok(self.spoil(self.inner.read_range(desc, offset, len)?))
    }
    fn read_ranges(&self, desc: &Descriptor, r: &[(u64, u64)]) -> Result<Vec<Vec<u8>>, OciError> {
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
    let store = Arc::new(Store::open(dir.join("store")).unwrap());
    let resolved = source.resolve(&Platform::host_default()).unwrap();
    let image = strata_lazy::prepare(&store, source.as_ref(), resolved).unwrap();
    let (digest, size) = match image.tree.lookup(b"usr/bin/python3.11").map(|n| &n.kind) {
        Some(NodeKind::Regular { digest, size }) => (*digest, *size),
        other => panic!("python3.11 is a regular file: {other:?}"),
    };
    let f = Fetcher::new(
        store,
        source,
        Arc::new(image),
        dir.join("partial"),
        parallel,
    )
    .unwrap();
    (Arc::new(f), digest, size)
}

fn faulty(fx: &Fixture) -> Arc<Faulty> {
    Arc::new(Faulty {
        inner: strata_oci::open_source(&fx.layout, &Default::default()).unwrap(),
        ranges: AtomicU64::new(0),
        fail: AtomicBool::new(false),
        tamper: AtomicBool::new(false),
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
