//! The files `strata convert --prefetch-list` placed first, asked for
//! before the mount is built.
//!
//! A layer whose list was placed first says where that run of files ends
//! (`FIRST_END_ANNOTATION`): its bytes `0..end` are what the prefetch
//! fetches first. Building the mount (TOCs checked, tree, EROFS image)
//! is CPU work during which the link would be idle, so the run is
//! streamed from the registry from the moment the manifest is known, into
//! memory, and the prefetch reads it from there as it arrives.
//!
//! [`EarlySource`] wraps the image's source: a read inside a run waits
//! for its bytes, anything else goes to the registry. A layer's run
//! starts once a read outside it is answered for every layer with a run
//! (the mount reads the TOCs and tar-splits first, and needs them before
//! anything else: they do not share the link), or when a read inside it
//! comes first. Runs live as long
//! as [`EarlyRuns`] (held by the prefetch, dropped when its list is done:
//! a download not finished by then stops). A run that fails falls back
//! to the registry from where its reader got to.

use std::io::{self, Read};
use std::sync::{Arc, Condvar, Mutex, Weak};

use strata_digest::Digest;
use strata_oci::{Descriptor, ImageSource, OciError, Platform, ResolvedImage};

/// Runs longer than this are not streamed ahead (they are held in
/// memory until the prefetch reads them).
pub const EARLY_MAX_BYTES: u64 = 64 << 20;

/// All of an image's runs streamed ahead, at most.
pub const EARLY_MAX_TOTAL: u64 = 128 << 20;

/// Bytes read from the registry at a time.
const STEP: usize = 256 << 10;

struct Run {
    desc: Descriptor,
    end: u64,
    state: Mutex<RunState>,
    grown: Condvar,
    started: std::sync::atomic::AtomicBool,
    /// A read of its layer outside it was answered.
    answered: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct RunState {
    data: Vec<u8>,
    failed: Option<String>,
}

impl Run {
    /// Wait until bytes `at..` (some of them) are in, or the run failed:
    /// how many bytes are in from `at` on, or why not.
    fn wait_for(&self, at: u64) -> Result<std::sync::MutexGuard<'_, RunState>, String> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if st.data.len() as u64 > at || st.data.len() as u64 == self.end {
                return Ok(st);
            }
            if let Some(why) = &st.failed {
                return Err(why.clone());
            }
            st = self.grown.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The runs being streamed; dropping this stops them and frees them.
#[derive(Default)]
pub struct EarlyRuns {
    runs: Vec<Arc<Run>>,
}

impl EarlyRuns {
    /// How many runs are streamed.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// A source whose reads inside a run come from it.
pub struct EarlySource {
    inner: Arc<dyn ImageSource>,
    runs: Vec<(Digest, Weak<Run>)>,
}

/// Start `run`'s download (once).
fn go(inner: &Arc<dyn ImageSource>, run: &Arc<Run>) {
    use std::sync::atomic::Ordering;
    if run.started.swap(true, Ordering::SeqCst) {
        return;
    }
    let (source, w) = (inner.clone(), Arc::downgrade(run));
    let spawned = std::thread::Builder::new()
        .name("early-run".into())
        .spawn(move || download(source.as_ref(), &w));
    if let Err(e) = spawned {
        fail(run, format!("starting its download: {e}"));
    }
}

/// Start streaming `runs` (a layer and where its run ends) from `inner`;
/// the source to read the image through, and the runs to keep alive.
pub fn start(
    inner: Arc<dyn ImageSource>,
    runs: Vec<(Descriptor, u64)>,
) -> (Arc<dyn ImageSource>, EarlyRuns) {
    if runs.is_empty() {
        return (inner, EarlyRuns::default());
    }
    let mut kept = Vec::new();
    let mut weak = Vec::new();
    for (desc, end) in runs {
        let run = Arc::new(Run {
            desc,
            end,
            state: Mutex::new(RunState::default()),
            grown: Condvar::new(),
            started: Default::default(),
            answered: Default::default(),
        });
        weak.push((run.desc.digest, Arc::downgrade(&run)));
        kept.push(run);
    }
    (
        Arc::new(EarlySource { inner, runs: weak }),
        EarlyRuns { runs: kept },
    )
}

fn fail(run: &Run, why: String) {
    run.state.lock().unwrap_or_else(|e| e.into_inner()).failed = Some(why);
    run.grown.notify_all();
}

/// Stream `run` into memory while anyone keeps it.
fn download(source: &dyn ImageSource, run: &Weak<Run>) {
    let (desc, end) = match run.upgrade() {
        Some(r) => (r.desc.clone(), r.end),
        None => return,
    };
    let mut r = match source.open_range(&desc, 0, end) {
        Ok(r) => r,
        Err(e) => {
            if let Some(run) = run.upgrade() {
                fail(&run, e.to_string());
            }
            return;
        }
    };
    // the whole run's room at once (it is at most EARLY_MAX_BYTES): a
    // growing buffer copied the run again at each doubling, beside the
    // mount being built
    if let Some(run) = run.upgrade() {
        let mut st = run.state.lock().unwrap_or_else(|e| e.into_inner());
        let room = usize::try_from(end.min(EARLY_MAX_BYTES)).unwrap_or(0);
        let have = st.data.len();
        st.data.reserve_exact(room.saturating_sub(have));
    }
    let mut buf = vec![0u8; STEP];
    let mut got = 0u64;
    while got < end {
        let n = r.read(&mut buf);
        // nobody wants it any more: stop
        let Some(run) = run.upgrade() else { return };
        match n {
            Ok(0) => {
                fail(&run, format!("the answer ended at byte {got} of {end}"));
                return;
            }
            Ok(n) => {
                let n = n.min((end - got) as usize);
                run.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .data
                    .extend_from_slice(&buf[..n]);
                got += n as u64;
                run.grown.notify_all();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                fail(&run, e.to_string());
                return;
            }
        }
    }
}

impl EarlySource {
    /// The run holding bytes `offset..offset+len` of `desc`, if it lives
    /// (started now if it was not).
    fn covering(&self, desc: &Descriptor, offset: u64, len: u64) -> Option<Arc<Run>> {
        let run = self.run_of(desc)?;
        let inside = offset.checked_add(len)? <= run.end && run.desc.size == desc.size;
        inside.then(|| {
            go(&self.inner, &run);
            run
        })
    }

    fn run_of(&self, desc: &Descriptor) -> Option<Arc<Run>> {
        let (_, w) = self.runs.iter().find(|(d, _)| *d == desc.digest)?;
        w.upgrade()
    }

    /// A read outside `desc`'s run was answered: once that is so of
    /// every run's layer, the runs start.
    fn answered(&self, desc: &Descriptor) {
        use std::sync::atomic::Ordering;
        let Some(run) = self.run_of(desc) else { return };
        if run.answered.swap(true, Ordering::SeqCst) {
            return;
        }
        let runs: Vec<_> = self.runs.iter().filter_map(|(_, w)| w.upgrade()).collect();
        if runs.iter().all(|r| r.answered.load(Ordering::SeqCst)) {
            for r in &runs {
                go(&self.inner, r);
            }
        }
    }

    /// Bytes `offset..offset+len` from `run` once they are in, or `None`
    /// when the run failed first.
    fn from_run(run: &Run, offset: u64, len: u64) -> Option<Vec<u8>> {
        let end = offset + len;
        if len == 0 {
            return Some(Vec::new());
        }
        let mut at = end - 1;
        loop {
            let st = run.wait_for(at).ok()?;
            if st.data.len() as u64 >= end {
                return Some(st.data[offset as usize..end as usize].to_vec());
            }
            at = st.data.len() as u64;
        }
    }
}

/// A reader of a run's bytes `pos..end`; from the registry once the run
/// failed.
struct RunReader {
    run: Arc<Run>,
    pos: u64,
    end: u64,
    inner: Arc<dyn ImageSource>,
    fallback: Option<Box<dyn Read + Send>>,
}

impl Read for RunReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.end || buf.is_empty() {
            return Ok(0);
        }
        if let Some(f) = &mut self.fallback {
            let n = f.read(buf)?;
            self.pos += n as u64;
            return Ok(n);
        }
        let run = self.run.clone();
        match run.wait_for(self.pos) {
            Ok(st) => {
                let have = (st.data.len() as u64).min(self.end);
                let n = ((have - self.pos) as usize).min(buf.len());
                let at = self.pos as usize;
                buf[..n].copy_from_slice(&st.data[at..at + n]);
                self.pos += n as u64;
                Ok(n)
            }
            Err(why) => {
                tracing::debug!(
                    "the early run of {} failed ({why}): reading on from the registry",
                    self.run.desc.digest
                );
                let f = self
                    .inner
                    .open_range(&self.run.desc, self.pos, self.end - self.pos)
                    .map_err(io::Error::other)?;
                self.fallback = Some(f);
                self.read(buf)
            }
        }
    }
}

impl ImageSource for EarlySource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        self.inner.resolve(platform)
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        self.inner.open_blob(desc, offset)
    }

    fn open_range(
        &self,
        desc: &Descriptor,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        match self.covering(desc, offset, len) {
            Some(run) => Ok(Box::new(RunReader {
                run,
                pos: offset,
                end: offset + len,
                inner: self.inner.clone(),
                fallback: None,
            })),
            None => self.inner.open_range(desc, offset, len),
        }
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        if let Some(run) = self.covering(desc, offset, len)
            && let Some(bytes) = Self::from_run(&run, offset, len)
        {
            return Ok(bytes);
        }
        let r = self.inner.read_range(desc, offset, len);
        self.answered(desc);
        r
    }

    fn read_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        let runs: Option<Vec<_>> = ranges
            .iter()
            .map(|&(o, l)| self.covering(desc, o, l))
            .collect();
        if let Some(runs) = runs {
            let got: Option<Vec<_>> = runs
                .iter()
                .zip(ranges)
                .map(|(run, &(o, l))| Self::from_run(run, o, l))
                .collect();
            if let Some(got) = got {
                return Ok(got);
            }
        }
        let r = self.inner.read_ranges(desc, ranges);
        self.answered(desc);
        r
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A blob in memory, counting the requests; with `fail_after`, the
    /// first stream fails after that many bytes.
    struct Mem {
        blob: Vec<u8>,
        requests: AtomicUsize,
        fail_after: Option<usize>,
    }

    impl ImageSource for Mem {
        fn resolve(&self, _: &Platform) -> Result<ResolvedImage, OciError> {
            unreachable!("not resolved here")
        }
        fn open_blob(&self, _: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
            let first = self.requests.fetch_add(1, Ordering::SeqCst) == 0;
            let mut bytes = self.blob[offset as usize..].to_vec();
            if let Some(n) = self.fail_after.filter(|_| first) {
                bytes.truncate(n);
                let failing = io::Cursor::new(bytes).chain(Failing);
                return Ok(Box::new(failing));
            }
            Ok(Box::new(io::Cursor::new(bytes)))
        }
        fn describe(&self) -> String {
            "mem".into()
        }
    }

    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("connection reset"))
        }
    }

    fn desc(blob: &[u8]) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            digest: Digest::sha256_of(blob),
            size: blob.len() as u64,
            annotations: Default::default(),
            platform: None,
            urls: Vec::new(),
        }
    }

    fn mem(blob: &[u8], fail_after: Option<usize>) -> Arc<Mem> {
        Arc::new(Mem {
            blob: blob.to_vec(),
            requests: AtomicUsize::new(0),
            fail_after,
        })
    }

    fn blob() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn reads_inside_the_run_come_from_it_and_others_from_the_source() {
        let b = blob();
        let d = desc(&b);
        let mem = mem(&b, None);
        let (src, runs) = start(mem.clone(), vec![(d.clone(), 2_000_000)]);
        assert_eq!(runs.len(), 1);
        let mut got = Vec::new();
        src.open_range(&d, 1000, 1_500_000)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b[1000..1_501_000]);
        assert_eq!(src.read_range(&d, 5, 10).unwrap(), b[5..15]);
        let parts = src.read_ranges(&d, &[(0, 3), (1_999_990, 10)]).unwrap();
        assert_eq!(
            parts,
            vec![b[0..3].to_vec(), b[1_999_990..2_000_000].to_vec()]
        );
        assert_eq!(
            mem.requests.load(Ordering::SeqCst),
            1,
            "the run's one request"
        );
        // past the run's end: the source
        assert_eq!(
            src.read_range(&d, 1_999_999, 2).unwrap(),
            b[1_999_999..2_000_001]
        );
        assert_eq!(mem.requests.load(Ordering::SeqCst), 2);
        // once the runs are dropped (and the download thread has let go
        // of its run), everything goes to the source
        drop(runs);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            assert_eq!(src.read_range(&d, 0, 3).unwrap(), b[0..3]);
            if mem.requests.load(Ordering::SeqCst) == 3 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the run outlived its keeper"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_run_starts_once_a_read_outside_it_is_answered() {
        let b = blob();
        let d = desc(&b);
        let mem = mem(&b, None);
        let (src, runs) = start(mem.clone(), vec![(d.clone(), 1_000_000)]);
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            mem.requests.load(Ordering::SeqCst),
            0,
            "not before the metadata"
        );
        // the metadata at the blob's end, then the run
        assert_eq!(src.read_range(&d, 2_999_000, 1000).unwrap(), b[2_999_000..]);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while runs.runs[0].state.lock().unwrap().data.len() < 1_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the run did not arrive"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(mem.requests.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_run_that_fails_midway_is_read_on_from_the_source() {
        let b = blob();
        let d = desc(&b);
        let mem = mem(&b, Some(700_000));
        let (src, _runs) = start(mem.clone(), vec![(d.clone(), 2_000_000)]);
        let mut got = Vec::new();
        src.open_range(&d, 100, 1_000_000)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, b[100..1_000_100]);
        // the run's request, then one from where the run stopped
        assert_eq!(mem.requests.load(Ordering::SeqCst), 2);
        // a whole range inside the failed run: from the source
        assert_eq!(
            src.read_range(&d, 1_500_000, 10).unwrap(),
            b[1_500_000..1_500_010]
        );
    }
}
