//! The snapshotter's state and operations, blocking and independent of
//! gRPC (the service calls them on tokio's blocking pool).
//!
//! ```text
//! <root>/meta/<id>.json    one record per snapshot (durable: write, fsync, rename)
//! <root>/snapshots/<id>/   fs/ (the layer or the container's upper dir), work/
//! <root>/trash/<id>/       removed snapshots' dirs, deleted by Cleanup
//! <root>/store/            strata's store: the images remote layers come from
//! <root>/mnt/<manifest>/   strata's one (composefs) mount of such an image,
//!                          the lower of every container on it
//! ```
//!
//! A *remote* Prepare (one with strata's labels, see [`crate::labels`])
//! pulls the image into the store itself (once: the next layers find it
//! there), records a committed snapshot for the layer and answers
//! AlreadyExists: containerd downloads nothing. A zstd:chunked image is
//! mounted lazily instead: its daemon starts at the first layer's
//! Prepare, which answers once the daemon has checked every TOC and
//! tar-split; the mount is finished meanwhile, and whatever needs it
//! waits for it. A container's snapshot on such a layer is an overlay
//! whose lower is the image's mount.
//!
//! Names are containerd's backend keys (`<namespace>/<seq>/<key>`, with
//! slashes and spaces), so nothing on disk is named by them: ids are.
//! A crash at any point leaves at worst a dir without a record (removed
//! at the next start or Cleanup) or a record whose dir is in the trash
//! (impossible: the record goes first).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use strata_digest::Digest;
use strata_store::Store;

use crate::filters::Filter;
use crate::labels::{self, RemoteLayer};

/// How long a container's Prepare waits for a lazy mount that a daemon
/// started before a restart of the snapshotter is still building (it
/// takes well under a second; the limit is for a daemon that hangs).
const BUILD_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a snapshot is, in containerd's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A read-only view of its parent chain.
    View,
    /// Writable (an unpacking layer or a container's rootfs).
    Active,
    /// A committed layer: read-only, a parent for others.
    Committed,
}

impl Kind {
    /// The name containerd's filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of one snapshot alone (not its parents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes.
    pub size: u64,
    /// Inodes.
    pub inodes: u64,
}

/// One snapshot as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// Its directory under `snapshots/`.
    pub id: u64,
    /// containerd's backend key (Active, View) or name (Committed).
    pub name: String,
    /// The parent's name, if any.
    pub parent: Option<String>,
    /// What it is.
    pub kind: Kind,
    /// Labels as containerd set them.
    pub labels: BTreeMap<String, String>,
    /// Unix nanoseconds.
    pub created: u128,
    /// Unix nanoseconds.
    pub updated: u128,
    /// Usage computed at commit (committed snapshots).
    #[serde(default)]
    pub usage: Usage,
    /// For a layer strata made available itself: where it comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<Remote>,
    /// Other images this layer is the top of (the same chain reached
    /// through another image, e.g. a base image and an image on it):
    /// any of them can be mounted for a container on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tops: Vec<Remote>,
}

/// A committed layer of an image in strata's store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// The reference it was pulled from.
    pub image: String,
    /// The image (manifest digest) in the store.
    pub manifest: Digest,
    /// The layer's index.
    pub layer: usize,
    /// The image's layer count.
    pub layers: usize,
    /// zstd:chunked all through: the image is mounted lazily (its files
    /// arrive on first read) instead of pulled.
    #[serde(default)]
    pub lazy: bool,
    /// The registry is reached over plain HTTP.
    #[serde(default)]
    pub plain_http: bool,
}

impl Remote {
    /// The reference, pinned to the manifest, as `strata mount --lazy`
    /// takes it.
    fn pinned(&self) -> String {
        pinned(&self.image, &self.manifest)
    }
}

/// `image` (a reference) pinned to `manifest`, as `strata mount --lazy`
/// takes it.
fn pinned(image: &str, manifest: &Digest) -> String {
    let base = image.trim_start_matches("docker://");
    let base = base.split('@').next().unwrap_or(base);
    // drop a tag: the digest pins it
    let repo = match base.rfind(':') {
        Some(i) if !base[i..].contains('/') => &base[..i],
        _ => base,
    };
    format!("docker://{repo}@{manifest}")
}

/// A mount for containerd (what `mount(8)` would be given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `bind` or `overlay`.
    pub kind: String,
    /// The source.
    pub source: String,
    /// Options, as `mount -o` takes them.
    pub options: Vec<String>,
}

/// Why an operation failed; each maps to one gRPC code containerd
/// understands.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// No snapshot of that name (NotFound).
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    /// The name is taken (AlreadyExists).
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The operation does not apply to this snapshot as it is
    /// (FailedPrecondition): commit of a view, removal with children.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A request that can never succeed (InvalidArgument).
    #[error("{0}")]
    InvalidArgument(String),
    /// The image of a remote layer could not be had (Unavailable): the
    /// registry and the cause are named.
    #[error("{0}")]
    Unavailable(String),
    /// The disk or the store failed (Internal).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, SnapError>;

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> SnapError {
    let what = what.into();
    move |source| SnapError::Io { what, source }
}

fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

struct State {
    by_name: HashMap<String, Info>,
    next_id: u64,
    /// Ids whose dir is being made by a create that holds no lock while
    /// it mounts: the sweep leaves them alone.
    pending: std::collections::HashSet<u64>,
}

/// The snapshotter: records in memory, mirrored durably on disk.
pub struct Snapshotter {
    root: PathBuf,
    state: Mutex<State>,
    store: Store,
    /// One pull per image at a time.
    pulls: Mutex<HashMap<Digest, std::sync::Arc<Mutex<()>>>>,
    /// `--prefetch` of lazy mounts: `all`, `none`.
    prefetch: String,
    /// A lazy mount that cannot be made: pull the image in full instead.
    lazy_fallback: bool,
    /// Held while an image is mounted for a new snapshot until that
    /// snapshot is recorded, and while Cleanup unmounts: Cleanup never
    /// unmounts an image a snapshot being made will stand on. The state
    /// lock is never held while mounting (a lazy mount or a first
    /// composefs mount takes a while; Stat, List and other Prepares go on).
    mounting: Mutex<()>,
    /// zstd:chunked images whose TOCs and tar-splits were fetched and
    /// checked (once per image: each layer's Prepare asks): diff ids and
    /// blobs.
    checked: Mutex<HashMap<Digest, Layers>>,
    /// Per lazy image: a source on its registry and its top layer, for
    /// the check before a container starts on it.
    sources: std::sync::Arc<Mutex<HashMap<Digest, LazySource>>>,
    /// One set of HTTP connection pools for every pull and check the
    /// daemon makes (TLS roots loaded once, connections reused).
    client: strata_oci::RegistryClient,
    /// Lazy mounts made at an image's first Prepare whose daemon has
    /// checked the image's TOCs and tar-splits and is still building the
    /// mount: the pull goes on meanwhile, and whatever needs the mount
    /// waits for it ([`Snapshotter::settle`]). Keyed by mount dir.
    building: std::sync::Arc<Mutex<HashMap<PathBuf, std::sync::Arc<Building>>>>,
    /// containerd's content store's blobs
    /// ([`set_containerd_root`](Self::set_containerd_root)).
    containerd_blobs: Option<PathBuf>,
    /// A lazy mount's daemon started ahead ([`set_spare`](Self::set_spare)).
    spare: std::sync::Arc<Spares>,
}

/// The daemon a lazy mount takes next, started ahead of it: a lazy
/// image's first Prepare does not wait for a process to start and for the
/// memory its check needs to be made (BENCHMARKS.md, issue 16, twelfth
/// run).
#[derive(Default)]
struct Spares {
    /// The one waiting, if any.
    ready: Mutex<Option<strata_sys::daemon::Spare>>,
    /// Memory (MiB) it makes ready; 0: none is kept.
    mib: std::sync::atomic::AtomicUsize,
    /// `strata --root STORE` (the command line before `spare`).
    root: Mutex<PathBuf>,
    /// Its log (what it says before its work).
    log: Mutex<PathBuf>,
}

/// How long after a spare was taken the next one starts: not while the
/// container that took it is being started, on the same cores.
const SPARE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

impl Spares {
    /// The spare, if one waits (and is alive).
    fn take(&self) -> Option<strata_sys::daemon::Spare> {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = ready.take()?;
        s.alive().then_some(s)
    }

    /// Start the next spare `after` this long, on a thread of its own,
    /// unless one waits or none is wanted.
    fn refill(self: &std::sync::Arc<Self>, after: std::time::Duration) {
        if self.mib.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        let spares = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            let mut ready = spares.ready.lock().unwrap_or_else(|e| e.into_inner());
            if ready.as_mut().is_some_and(|s| s.alive()) {
                return;
            }
            match spares.spawn() {
                Ok(s) => *ready = Some(s),
                Err(e) => tracing::warn!("starting a spare lazy mount daemon: {}", error_chain(&e)),
            }
        });
    }

    fn spawn(
        &self,
    ) -> std::result::Result<strata_sys::daemon::Spare, strata_sys::daemon::DaemonError> {
        let exe =
            std::env::current_exe().map_err(|source| strata_sys::daemon::DaemonError::Start {
                what: "spare lazy mount".into(),
                step: "finding the strata binary".into(),
                source,
            })?;
        let mib = self.mib.load(std::sync::atomic::Ordering::Relaxed);
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("--root")
            .arg(&*self.root.lock().unwrap_or_else(|e| e.into_inner()))
            .args(["--quiet", "spare", "--prefault-mib", &mib.to_string()]);
        let (k, v) = strata_sys::malloc::SPARE_MALLOC_CONF;
        cmd.env(k, v);
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        strata_sys::daemon::spawn_spare("spare lazy mount", cmd, &log)
    }
}

/// The check of a lazy image's registry before a container starts on it
/// ([`Snapshotter::start_probe`]).
struct Probe {
    rx: std::sync::mpsc::Receiver<std::result::Result<(), String>>,
    /// When the probe was sent: bytes the mount's daemon received after
    /// it answer it too.
    since: std::time::SystemTime,
    target: PathBuf,
    store_root: PathBuf,
    image: String,
    started: std::time::Instant,
}

impl Probe {
    /// The registry answered (the probe, or bytes to the mount's daemon
    /// sent after the probe was), or why it did not.
    fn wait(self) -> Result<()> {
        let gone = |e: String| {
            SnapError::Unavailable(format!(
                "strata: the registry of the lazy image {} cannot be reached, and files of it \
                 not fetched yet could not be read: {e}",
                self.image
            ))
        };
        loop {
            // the mount's daemon may show the registry answering first,
            // where the probe's own answer waits behind its bytes on a busy
            // link
            match self.rx.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(probed) => {
                    tracing::debug!(
                        "registry of {} checked in {:?}",
                        self.image,
                        self.started.elapsed()
                    );
                    return probed.map_err(gone);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if strata_lazy::received_since(&self.store_root, &self.target, self.since) {
                        tracing::debug!(
                            "the registry of {} is sending to its lazy mount: not probed",
                            self.image
                        );
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(gone("the probe of the registry panicked".into()));
                }
            }
        }
    }
}

/// A lazy mount being built by its daemon: its outcome once known.
#[derive(Default)]
struct Building {
    done: Mutex<Option<std::result::Result<(), String>>>,
    cv: std::sync::Condvar,
}

impl Building {
    fn finish(&self, r: std::result::Result<(), String>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.cv.notify_all();
    }

    fn wait(&self) -> std::result::Result<(), String> {
        let mut g = self.done.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A registry source and the blob it is checked with.
type LazySource = (
    std::sync::Arc<dyn strata_oci::ImageSource>,
    strata_oci::Descriptor,
);

/// An image's diff ids and layer blobs.
type Layers = (Vec<Digest>, Vec<Digest>);

/// The mount dir name of the layers up to chain id `chain`.
fn prefix_name(chain: &str) -> String {
    let hex = chain.rsplit(':').next().unwrap_or(chain);
    format!("layers-{hex}")
}

/// The store name that keeps an image the snapshotter pulled from gc.
fn store_name(manifest: &Digest) -> String {
    format!("containerd-snapshotter/{manifest}")
}

impl Snapshotter {
    /// Open (or create) the snapshotter's state under `root`: read every
    /// record, remove dirs no record names (a crash between creating a
    /// snapshot's dir and its record) and the trash.
    pub fn open(root: &Path) -> Result<Snapshotter> {
        Self::open_with_store(root, &root.join("store"))
    }

    /// [`open`](Self::open) with strata's store at `store_root` (the
    /// node's store: one copy of every file for the CLI and containerd).
    pub fn open_with_store(root: &Path, store_root: &Path) -> Result<Snapshotter> {
        for d in ["meta", "snapshots", "trash", "mnt"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(format!("creating {}", p.display())))?;
        }
        let mut by_name = HashMap::new();
        let mut next_id = 1;
        let meta = root.join("meta");
        for e in fs::read_dir(&meta).map_err(io_err(format!("reading {}", meta.display())))? {
            let e = e.map_err(io_err(format!("reading {}", meta.display())))?;
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                // a record being written when a crash came
                let _ = fs::remove_file(&p);
                continue;
            }
            let bytes = fs::read(&p).map_err(io_err(format!("reading {}", p.display())))?;
            // a new record is written in place (store_new_record): a crash
            // before its sync leaves it empty or cut short, and then its
            // call was never answered. Such a record goes to `lost/`; one
            // that is whole JSON but not a record fails the start.
            let info: Info = match serde_json::from_slice(&bytes) {
                Ok(i) => i,
                Err(e) if e.classify() != serde_json::error::Category::Data => {
                    let lost = root.join("lost");
                    let to = lost.join(p.file_name().unwrap_or_default());
                    tracing::warn!(
                        "{} is not whole ({e}): a snapshot whose creation a crash cut \
                         short, never reported made; moved to {}",
                        p.display(),
                        to.display()
                    );
                    fs::create_dir_all(&lost)
                        .and_then(|()| fs::rename(&p, &to))
                        .map_err(io_err(format!(
                            "moving {} to {}",
                            p.display(),
                            to.display()
                        )))?;
                    // its id is not given again
                    if let Some(id) = p
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .and_then(|s| s.parse::<u64>().ok())
                    {
                        next_id = next_id.max(id.saturating_add(1));
                    }
                    continue;
                }
                Err(e) => {
                    return Err(SnapError::Io {
                        what: format!("reading {}", p.display()),
                        source: io::Error::new(io::ErrorKind::InvalidData, e),
                    });
                }
            };
            next_id = next_id.max(info.id + 1);
            by_name.insert(info.name.clone(), info);
        }
        let known = by_name.values().map(|i: &Info| i.id).collect();
        let store = Store::open(store_root).map_err(|e| SnapError::Io {
            what: format!("opening store {}", store_root.display()),
            source: io::Error::other(e.to_string()),
        })?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            state: Mutex::new(State {
                by_name,
                next_id,
                pending: Default::default(),
            }),
            store,
            pulls: Mutex::new(HashMap::new()),
            prefetch: "all".into(),
            lazy_fallback: false,
            mounting: Mutex::new(()),
            checked: Mutex::new(HashMap::new()),
            sources: Default::default(),
            building: Default::default(),
            client: strata_oci::RegistryClient::new(),
            spare: Default::default(),
            containerd_blobs: None,
        };
        s.sweep(known)?;
        s.empty_trash();
        Ok(s)
    }

    /// What lazy mounts fetch in the background: `all` (the default: the
    /// image ends fully pulled) or `none` (only what is read).
    pub fn set_prefetch(&mut self, prefetch: &str) {
        self.prefetch = prefetch.to_string();
    }

    /// When a zstd:chunked image cannot be mounted lazily (a TOC failing
    /// its checks, no range requests, no FUSE): pull it in full instead of
    /// failing (`[snapshotter] lazy_fallback = "pull"`).
    pub fn set_lazy_fallback(&mut self, pull: bool) {
        self.lazy_fallback = pull;
    }

    /// containerd's root (`[snapshotter] containerd_root`): the manifest
    /// and config of an image whose layer is prepared are read from its
    /// content store (`io.containerd.content.v1.content/blobs`), where
    /// containerd put them before unpacking, instead of from the registry.
    pub fn set_containerd_root(&mut self, root: &Path) {
        self.containerd_blobs = Some(root.join("io.containerd.content.v1.content").join("blobs"));
    }

    /// Keep a lazy mount's daemon started ahead, with `mib` MiB of memory
    /// made ready (`[snapshotter] spare_mib`); 0 keeps none. The first
    /// starts now.
    pub fn set_spare(&mut self, mib: usize) {
        self.spare
            .mib
            .store(mib, std::sync::atomic::Ordering::Relaxed);
        *self.spare.root.lock().unwrap_or_else(|e| e.into_inner()) =
            self.store.root().to_path_buf();
        *self.spare.log.lock().unwrap_or_else(|e| e.into_inner()) = self.root.join("spare.log");
        self.spare.refill(std::time::Duration::ZERO);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // every change is made on a copy and stored before it is put in
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot's directory.
    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn record_path(&self, id: u64) -> PathBuf {
        self.root.join("meta").join(format!("{id}.json"))
    }

    /// The record of a snapshot with a new id, written in place and synced
    /// once: no file has its name (ids are never given twice, not even
    /// those of records [`open`](Self::open) found cut short). One journal
    /// commit, where [`store_record`](Self::store_record)'s write aside
    /// and rename take two, on the path of every pull and container
    /// start. What a crash leaves of it is an empty or cut-short file of a
    /// call never answered, which `open` moves aside.
    fn store_new_record(&self, info: &Info) -> Result<()> {
        let p = self.record_path(info.id);
        let what = || format!("writing {}", p.display());
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(io_err(what()))?;
        let written = f
            .write_all(&serde_json::to_vec(info).expect("records serialize"))
            .and_then(|()| f.sync_all())
            .and_then(|()| sync_dir(&self.root.join("meta")));
        if let Err(e) = written {
            // nothing half-written stays for the next start to find
            let _ = fs::remove_file(&p);
            return Err(io_err(what())(e));
        }
        Ok(())
    }

    /// A record replacing the one of the same id: written aside, synced,
    /// renamed over it, so a crash leaves the old record or the new one.
    fn store_record(&self, info: &Info) -> Result<()> {
        let p = self.record_path(info.id);
        let tmp = p.with_extension("tmp");
        let what = || format!("writing {}", p.display());
        let mut f = fs::File::create(&tmp).map_err(io_err(what()))?;
        f.write_all(&serde_json::to_vec(info).expect("records serialize"))
            .map_err(io_err(what()))?;
        f.sync_all().map_err(io_err(what()))?;
        fs::rename(&tmp, &p).map_err(io_err(what()))?;
        sync_dir(&self.root.join("meta")).map_err(io_err(what()))
    }

    fn drop_record(&self, id: u64) -> Result<()> {
        let p = self.record_path(id);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("removing {}", p.display()))(e)),
        }
        sync_dir(&self.root.join("meta")).map_err(io_err("syncing the records"))
    }

    /// The parent chain of `parent` (nearest first), each committed.
    fn chain(st: &State, parent: Option<&str>) -> Result<Vec<Info>> {
        let mut out = Vec::new();
        let mut next = parent.map(str::to_string);
        while let Some(name) = next {
            let p = st
                .by_name
                .get(&name)
                .ok_or_else(|| SnapError::NotFound(name.clone()))?;
            if p.kind != Kind::Committed {
                return Err(SnapError::InvalidArgument(format!(
                    "parent {name:?} is not committed"
                )));
            }
            if out.len() > 4096 {
                return Err(SnapError::InvalidArgument(format!(
                    "the parent chain of {name:?} is longer than 4096"
                )));
            }
            next = p.parent.clone();
            out.push(p.clone());
        }
        Ok(out)
    }

    /// Prepare (`Kind::Active`) or View: a new snapshot on `parent`.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument("an empty key".into()));
        }
        if kind == Kind::Active
            && let Some(r) =
                RemoteLayer::from_labels(&labels).map_err(SnapError::InvalidArgument)?
        {
            return self.prepare_remote(key, parent, labels, r);
        }
        let (id, chain) = {
            let mut st = self.lock();
            if st.by_name.contains_key(key) {
                return Err(SnapError::AlreadyExists(key.to_string()));
            }
            let chain = Self::chain(&st, parent)?;
            let id = st.next_id;
            st.next_id += 1;
            st.pending.insert(id);
            (id, chain)
        };
        let r = self.create_unlocked(id, kind, key, parent, labels, &chain);
        self.lock().pending.remove(&id);
        r
    }

    /// The rest of [`create`](Self::create), with `id` reserved: make the
    /// dirs, mount the image below (if any) with the state unlocked, then
    /// record.
    fn create_unlocked(
        &self,
        id: u64,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        chain: &[Info],
    ) -> Result<Vec<Mount>> {
        let dir = self.dir(id);
        for d in ["fs", "work"] {
            let p = dir.join(d);
            if let Err(e) = fs::create_dir_all(&p) {
                let _ = fs::remove_dir_all(&dir);
                return Err(io_err(format!("creating {}", p.display()))(e));
            }
        }
        let t = now();
        let info = Info {
            id,
            name: key.to_string(),
            parent: parent.map(str::to_string),
            kind,
            labels,
            created: t,
            updated: t,
            usage: Usage::default(),
            remote: None,
            tops: Vec::new(),
        };
        // on a remote layer: no Cleanup unmounts the image until this
        // snapshot is recorded as standing on it
        let _gate = chain
            .iter()
            .any(|p| p.remote.is_some())
            .then(|| self.mounting.lock().unwrap_or_else(|e| e.into_inner()));
        let (mounts, probe) = match self.mounts_of(&info, chain, true) {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let mut st = self.lock();
        // another create of the same key won while this one mounted
        let taken = st.by_name.contains_key(key);
        // or the parent went away (Remove refuses parents with recorded
        // children only)
        let parent_gone = parent.is_some_and(|p| !st.by_name.contains_key(p));
        if taken || parent_gone {
            let _ = fs::remove_dir_all(&dir);
            return Err(if taken {
                SnapError::AlreadyExists(key.to_string())
            } else {
                SnapError::NotFound(parent.unwrap_or_default().to_string())
            });
        }
        if let Err(e) = self.store_new_record(&info) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        st.by_name.insert(key.to_string(), info);
        drop(st);
        // the registry's answer, asked for while the snapshot was recorded
        if let Some(probe) = probe
            && let Err(e) = probe.wait()
        {
            // no start: nothing of this snapshot stays
            let mut st = self.lock();
            st.by_name.remove(key);
            let _ = self.drop_record(id);
            drop(st);
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(mounts)
    }

    /// `info`'s mounts; `new`: for a snapshot being made (a lazy image's
    /// registry is checked then).
    fn mounts_of(
        &self,
        info: &Info,
        chain: &[Info],
        new: bool,
    ) -> Result<(Vec<Mount>, Option<Probe>)> {
        let fs_of = |i: &Info| self.dir(i.id).join("fs").display().to_string();
        let bind = |src: String, rw: bool| Mount {
            kind: "bind".into(),
            source: src,
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        // the parents' dirs, nearest first, down to the first remote
        // layer, which stands for itself and everything under it
        let mut lowers = Vec::new();
        let mut probe = None;
        for p in chain {
            match &p.remote {
                Some(_) => {
                    let (dir, started) = self.image_mount(p, new)?;
                    probe = started;
                    lowers.push(dir.display().to_string());
                    break;
                }
                None => lowers.push(fs_of(p)),
            }
        }
        let mounts = match (info.kind, lowers.len()) {
            (Kind::Active, 0) => vec![bind(fs_of(info), true)],
            (Kind::Active, _) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", self.dir(info.id).join("work").display()),
                    format!("upperdir={}", fs_of(info)),
                    format!("lowerdir={}", lowers.join(":")),
                ],
            }],
            (_, 0) => vec![bind(fs_of(info), false)],
            (_, 1) => vec![bind(lowers.remove(0), false)],
            (_, _) => vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["ro".into(), format!("lowerdir={}", lowers.join(":"))],
            }],
        };
        Ok((mounts, probe))
    }

    /// Where the image of a remote layer is mounted (mounted now if it
    /// is not): `<root>/mnt/<manifest hex>`, one mount per image, shared
    /// by every container on it and left in place across restarts.
    fn image_mount(&self, info: &Info, new: bool) -> Result<(PathBuf, Option<Probe>)> {
        // the images this layer is the top of; one already mounted, else
        // one in the store, else the first
        let candidates: Vec<&Remote> = info
            .remote
            .iter()
            .filter(|r| r.layer + 1 == r.layers)
            .chain(info.tops.iter())
            .collect();
        let mounted = |r: &&&Remote| {
            let dir = self.root.join("mnt").join(r.manifest.hex());
            self.being_built(&dir) || strata_sys::is_mount_point(&dir).unwrap_or(false)
        };
        let r = candidates
            .iter()
            .find(mounted)
            .or_else(|| {
                candidates
                    .iter()
                    .find(|r| self.store.image_meta(&r.manifest).is_ok())
            })
            .or(candidates.first())
            .copied();
        let Some(r) = r else {
            return Ok((self.prefix_mount(info)?, None));
        };
        let dir = self.root.join("mnt").join(r.manifest.hex());
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        if let Err(e) = self.settle(&dir) {
            tracing::warn!(
                "the lazy mount of {} failed once checked ({e}): mounting it again",
                r.image
            );
        }
        let mounted = strata_sys::is_mount_point(&dir).map_err(|e| SnapError::Io {
            what: format!("checking {}", dir.display()),
            source: io::Error::other(e.to_string()),
        })?;
        let probe = (new && mounted && r.lazy && self.store.image_meta(&r.manifest).is_err())
            .then(|| self.start_probe(r, &dir))
            .flatten();
        if !mounted && r.lazy && self.store.image_meta(&r.manifest).is_err() {
            let t0 = std::time::Instant::now();
            self.mount_lazy(r, &dir)?;
            tracing::info!(
                "mounted {} ({}) lazily at {} in {:?}",
                r.image,
                r.manifest,
                dir.display(),
                t0.elapsed()
            );
        } else if !mounted {
            self.mount_full(&r.image, &r.manifest, &dir)?;
        }
        Ok((dir, probe))
    }

    /// The composefs mount of `image` (`manifest`, in the store) at `dir`,
    /// read-only, split as `strata mount` does: what containers stand on.
    fn mount_full(&self, image: &str, manifest: &Digest, dir: &Path) -> Result<()> {
        let t0 = std::time::Instant::now();
        let opts = strata_store::MountOptions {
            writable: false,
            upper: None,
            verity: false,
            split: strata_store::SplitPolicy::Auto(strata_store::DEFAULT_SPLIT_THRESHOLD),
        };
        self.store
            .mount_image(manifest, dir, &opts)
            .map_err(|e| SnapError::Io {
                what: format!("mounting {image} ({manifest}) at {}", dir.display()),
                source: io::Error::other(e.to_string()),
            })?;
        tracing::info!(
            "mounted {image} ({manifest}) at {} in {:?}",
            dir.display(),
            t0.elapsed()
        );
        Ok(())
    }

    /// The mount of the layers up to an intermediate layer of a remote
    /// image (a view of it, a container on it, an image sharing those
    /// base layers): a composefs image of just those layers, built from
    /// the store, at `<root>/mnt/layers-<chain id hex>`.
    fn prefix_mount(&self, info: &Info) -> Result<PathBuf> {
        let Some(r) = info.remote.as_ref() else {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {:?} has no image below it",
                info.name
            )));
        };
        let meta = match self.store.image_meta(&r.manifest) {
            Ok(meta) => meta,
            // a lazy image's layers below its top (a view of one, or an
            // image pulled normally on top of them): its lazy mount holds
            // the whole chain only, so the image is pulled in full now
            // (chunks already fetched are not fetched again) and the
            // layers are built from the store
            Err(_) => self.pull_in_full(r).map_err(|e| match e {
                SnapError::Unavailable(m) => SnapError::Unavailable(format!(
                    "snapshot {:?} is layer {} of {} of {}, which is mounted lazily; pulling \
                     it in full to mount its layers up to this one failed: {m}",
                    info.name,
                    r.layer + 1,
                    r.layers,
                    r.image
                )),
                e => e,
            })?,
        };
        let diff_ids: Vec<Digest> = meta
            .layers
            .iter()
            .take(r.layer + 1)
            .map(|l| l.diff_id)
            .collect();
        let chain = labels::chain_ids(&diff_ids)
            .pop()
            .ok_or_else(|| SnapError::FailedPrecondition(format!("{} has no layers", r.image)))?;
        let name = prefix_name(&chain);
        let dir = self.root.join("mnt").join(&name);
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        if strata_sys::is_mount_point(&dir).unwrap_or(false) {
            return Ok(dir);
        }
        let io = |what: String| {
            move |e: strata_store::StoreError| SnapError::Io {
                what,
                source: io::Error::other(e.to_string()),
            }
        };
        let image = self.store.build_flat(&diff_ids, None).map_err(io(format!(
            "building the layers of {} up to {}",
            r.image, r.layer
        )))?;
        let erofs = self.root.join("mnt").join(format!("{name}.erofs"));
        let tmp = erofs.with_extension("erofs.tmp");
        fs::write(&tmp, &image)
            .and_then(|()| fs::rename(&tmp, &erofs))
            .map_err(io_err(format!("writing {}", erofs.display())))?;
        let m = strata_sys::OverlayMount {
            dirs_above: Vec::new(),
            layers: vec![erofs],
            data_dirs: vec![self.store.root().join("objects")],
            upper: None,
            verity_require: false,
            source: format!("strata-layers:{chain}"),
        };
        strata_sys::mount_overlay(&m, &dir).map_err(|e| SnapError::Io {
            what: format!(
                "mounting layers 0..={} of {} at {}",
                r.layer,
                r.image,
                dir.display()
            ),
            source: io::Error::other(e.to_string()),
        })?;
        tracing::info!(
            "mounted layers 0..={} of {} ({chain}) at {}",
            r.layer,
            r.image,
            dir.display()
        );
        Ok(dir)
    }

    /// `image` pinned to `manifest` and how to reach its registry (hosts
    /// the store's registries.json lists as insecure: plain HTTP).
    fn registry_of(
        &self,
        image: &str,
        manifest: &Digest,
        plain_http: bool,
    ) -> Result<(strata_oci::ImageRef, strata_oci::RegistryOptions)> {
        let reference = match image.parse::<strata_oci::ImageName>() {
            Ok(strata_oci::ImageName::Qualified(strata_oci::ImageRef::Docker {
                registry,
                repository,
                tag,
                ..
            })) => strata_oci::ImageRef::Docker {
                registry,
                repository,
                tag,
                digest: Some(*manifest),
            },
            Ok(_) => {
                return Err(SnapError::InvalidArgument(format!(
                    "label {}: {image:?} is not a registry reference",
                    labels::IMAGE,
                )));
            }
            Err(e) => {
                return Err(SnapError::InvalidArgument(format!(
                    "label {}: {e}",
                    labels::IMAGE
                )));
            }
        };
        let config = strata_oci::RegistryConfig::load(self.store.root()).map_err(|e| {
            SnapError::Unavailable(format!("reading the store's registry config: {e}"))
        })?;
        let registry = strata_oci::RegistryOptions {
            plain_http,
            user_agent: format!("strata-snapshotter/{}", env!("CARGO_PKG_VERSION")),
            client: self.client.clone(),
            ..Default::default()
        }
        .with_config(&config);
        Ok((reference, registry))
    }

    /// Before a container starts on a lazy image whose files are not all
    /// local: one byte of its top layer from its registry (bounded by the
    /// registry client's timeouts), or bytes the mount's daemon received
    /// from the registry meanwhile, whichever comes first. A registry
    /// that is gone then fails the start with an error naming strata and
    /// the registry, instead of the container's first read of a file not
    /// fetched yet (EIO, with no word of why). Started here, on a thread
    /// of its own, answered by [`Probe::wait`]: the container's snapshot
    /// is recorded meanwhile. `None`: every file is local.
    fn start_probe(&self, r: &Remote, dir: &Path) -> Option<Probe> {
        let target = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
        if let Ok(rec) = strata_lazy::attach(self.store.root(), &target)
            && rec.state.files_local >= rec.state.files_total
        {
            return None;
        }
        let cached = self
            .sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.manifest)
            .cloned();
        // what it takes to ask: the source of an earlier pull, else one
        // made now (the image resolved again) on the probe's thread
        let registry = match &cached {
            Some(_) => None,
            None => Some(self.registry_of(&r.image, &r.manifest, r.plain_http)),
        };
        let sources = self.sources.clone();
        let manifest = r.manifest;
        let since = std::time::SystemTime::now();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let asked = (|| -> std::result::Result<(), String> {
                let (source, top) = match cached {
                    Some(s) => s,
                    None => {
                        let (reference, registry) = registry
                            .expect("made when none was cached")
                            .map_err(|e| e.to_string())?;
                        let source: std::sync::Arc<dyn strata_oci::ImageSource> =
                            strata_oci::open_source(&reference, &registry)
                                .map_err(|e| error_chain(&e))?
                                .into();
                        let resolved = source
                            .resolve(&strata_oci::Platform::host_default())
                            .map_err(|e| error_chain(&e))?;
                        let top = resolved
                            .manifest
                            .layers
                            .last()
                            .cloned()
                            .ok_or_else(|| format!("{manifest} has no layers"))?;
                        sources
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(manifest, (source.clone(), top.clone()));
                        (source, top)
                    }
                };
                source
                    .read_range(&top, 0, 1)
                    .map(drop)
                    .map_err(|e| error_chain(&e))
            })();
            let _ = tx.send(asked);
        });
        Some(Probe {
            rx,
            since,
            target,
            store_root: self.store.root().to_path_buf(),
            image: r.image.clone(),
            started: std::time::Instant::now(),
        })
    }

    /// The lazy mount of `r`'s image at `<root>/mnt/<manifest hex>`,
    /// unless it is there already (an earlier pull, a restart).
    fn premount_lazy(&self, r: &RemoteLayer, resolved: &strata_oci::ResolvedImage) -> Result<()> {
        let dir = self.root.join("mnt").join(r.manifest.hex());
        // ordered with Cleanup (which unmounts what no snapshot uses)
        let _gate = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        // one being built was checked: it is made (or fails, and the
        // first container makes it again)
        if self.being_built(&dir) || strata_sys::is_mount_point(&dir).unwrap_or(false) {
            return Ok(());
        }
        // what this process resolved goes to the daemon: it does not ask
        // the registry for the manifest and config again
        let handed = self
            .root
            .join("mnt")
            .join(format!("{}.resolved", r.manifest.hex()));
        strata_oci::preresolved::write(&handed, resolved)
            .map_err(io_err(format!("writing {}", handed.display())))?;
        let made = self.mount_lazy_ref(
            &pinned(&r.image, &r.manifest),
            r.plain_http,
            &dir,
            Some(&handed),
            true,
        );
        let _ = fs::remove_file(&handed);
        if made.is_err() {
            // nothing stays of an image refused
            let _ = fs::remove_dir(&dir);
        }
        made
    }

    /// The composefs mount of an image just pulled in full, made now (as
    /// a lazy image's is at its pull): its first container, often the
    /// pod's sandbox started right after, does not wait for it. Best
    /// effort: the first container mounts it otherwise, and Cleanup
    /// unmounts it while no container uses it.
    fn premount_pulled(&self, r: &RemoteLayer) {
        let dir = self.root.join("mnt").join(r.manifest.hex());
        let _gate = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        if strata_sys::is_mount_point(&dir).unwrap_or(false) {
            return;
        }
        let mounted = fs::create_dir_all(&dir)
            .map_err(io_err(format!("creating {}", dir.display())))
            .and_then(|()| self.mount_full(&r.image, &r.manifest, &dir));
        if let Err(e) = mounted {
            tracing::warn!("mounting {} once pulled: {e}", r.image);
            let _ = fs::remove_dir(&dir);
        }
    }

    /// `strata mount --lazy` of the image at `dir`: a daemon of its own,
    /// which outlives this process (containers keep reading while the
    /// snapshotter restarts).
    fn mount_lazy(&self, r: &Remote, dir: &Path) -> Result<()> {
        self.mount_lazy_ref(&r.pinned(), r.plain_http, dir, None, false)
    }

    /// [`mount_lazy`](Self::mount_lazy) of `pinned` (a reference with its
    /// digest), the daemon started here. `early`: return once the daemon
    /// has checked the image (its TOCs and tar-splits); a thread waits for
    /// the mount, and [`settle`](Self::settle) for that thread.
    fn mount_lazy_ref(
        &self,
        pinned: &str,
        plain_http: bool,
        dir: &Path,
        resolved: Option<&Path>,
        early: bool,
    ) -> Result<()> {
        let failed = |e: String| {
            SnapError::Unavailable(format!(
                "lazy mount of {} at {}: {e}",
                pinned,
                dir.display()
            ))
        };
        let exe = std::env::current_exe().map_err(io_err("finding the strata binary"))?;
        let target = dir
            .canonicalize()
            .map_err(io_err(format!("resolving {}", dir.display())))?;
        let log = strata_lazy::state::mount_dir(self.store.root(), &target).join("log");
        let mut args: Vec<std::ffi::OsString> = vec!["--root".into(), self.store.root().into()];
        args.extend(
            [
                "--quiet",
                "mount",
                "--lazy=require",
                "--foreground",
                "--prefetch",
                &self.prefetch,
            ]
            .map(Into::into),
        );
        if plain_http {
            args.push("--plain-http".into());
        }
        if let Some(f) = resolved {
            args.extend(["--resolved".into(), f.into()]);
        }
        if early {
            args.push("--report-checked".into());
        }
        args.extend([pinned.into(), target.clone().into()]);
        use strata_sys::daemon::Said;
        let mut daemon = self
            .lazy_daemon(exe, args, &log)
            .map_err(|e| failed(error_chain(&e)))?;
        loop {
            match daemon.said().map_err(|e| failed(error_chain(&e)))? {
                Said::Ready(_) => return Ok(()),
                Said::Stage(s) if s == strata_lazy::daemon::CHECKED => break,
                Said::Stage(_) => {}
            }
        }
        let building = std::sync::Arc::new(Building::default());
        self.building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.to_path_buf(), building.clone());
        let all = self.building.clone();
        let (dir, what) = (dir.to_path_buf(), pinned.to_string());
        std::thread::spawn(move || {
            let r = loop {
                match daemon.said() {
                    Ok(Said::Ready(_)) => break Ok(()),
                    Ok(Said::Stage(_)) => {}
                    Err(e) => break Err(error_chain(&e)),
                }
            };
            if let Err(e) = &r {
                tracing::warn!("lazy mount of {what} at {}: {e}", dir.display());
            }
            building.finish(r);
            all.lock().unwrap_or_else(|e| e.into_inner()).remove(&dir);
        });
        Ok(())
    }

    /// The daemon of a lazy mount, `strata ARGS`: the spare if one waits
    /// (the next starts a little later), else a new process.
    fn lazy_daemon(
        &self,
        exe: PathBuf,
        args: Vec<std::ffi::OsString>,
        log: &Path,
    ) -> std::result::Result<strata_sys::daemon::Daemon, strata_sys::daemon::DaemonError> {
        let spare = self.spare.take();
        // the next, once this start is over (also when the one waiting had died)
        self.spare.refill(SPARE_AFTER);
        if let Some(spare) = spare {
            if let Some(dir) = log.parent() {
                fs::create_dir_all(dir).map_err(|source| {
                    strata_sys::daemon::DaemonError::Start {
                        what: "lazy mount".into(),
                        step: format!("creating {}", dir.display()),
                        source,
                    }
                })?;
            }
            let (pid, mut line) = (spare.pid(), vec![exe.clone().into_os_string()]);
            line.extend(args.iter().cloned());
            match spare.start(&line, log) {
                Ok(d) => return Ok(d),
                Err(e) => tracing::warn!(
                    "the spare daemon {pid}: {}; starting another",
                    error_chain(&e)
                ),
            }
        }
        let mut cmd = std::process::Command::new(exe);
        cmd.args(args);
        strata_sys::daemon::spawn("lazy mount", cmd, log)
    }

    /// Wait until no lazy mount at `dir` is being built; whether one
    /// being built failed (the mount is not there: make it again).
    fn settle(&self, dir: &Path) -> std::result::Result<(), String> {
        if let Some(b) = self.building_at(dir) {
            return b.wait();
        }
        // a daemon this process started before a restart, still building
        let Ok(target) = dir.canonicalize() else {
            return Ok(());
        };
        match strata_lazy::mount::wait_built(self.store.root(), &target, BUILD_LIMIT) {
            Ok(true) => {
                tracing::info!(
                    "waited for the lazy mount at {} an earlier snapshotter started",
                    dir.display()
                );
                Ok(())
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether a daemon builds the lazy mount at `dir`: one this process
    /// started, or one started before a restart.
    fn being_built(&self, dir: &Path) -> bool {
        self.building_at(dir).is_some()
            || dir
                .canonicalize()
                .is_ok_and(|t| strata_lazy::mount::builder(self.store.root(), &t).is_some())
    }

    /// The lazy mount at `dir` its daemon is still building, if any.
    fn building_at(&self, dir: &Path) -> Option<std::sync::Arc<Building>> {
        let all = self.building.lock().unwrap_or_else(|e| e.into_inner());
        all.get(dir).cloned()
    }

    /// Unmount an image mount of either kind (`strata umount` stops a
    /// lazy mount's daemon too).
    fn unmount_image(&self, dir: &Path) -> std::result::Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let out = std::process::Command::new(exe)
            .arg("--root")
            .arg(self.store.root())
            .arg("umount")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// A Prepare with strata's labels: make the layer available from the
    /// store (pulling the image once), record it committed, answer
    /// AlreadyExists.
    fn prepare_remote(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        r: RemoteLayer,
    ) -> Result<Vec<Mount>> {
        // the same layer on the same parent from another namespace or an
        // earlier pull: nothing to do
        let existing = |st: &State| {
            st.by_name
                .values()
                .find(|i| {
                    i.kind == Kind::Committed
                        && i.labels.get(labels::SNAPSHOT_REF) == Some(&r.target)
                        && i.parent.as_deref() == parent
                })
                .map(|i| i.name.clone())
        };
        let knows = |i: &Info| {
            i.remote
                .iter()
                .chain(i.tops.iter())
                .any(|x| x.manifest == r.manifest)
        };
        {
            let st = self.lock();
            if let Some(name) = existing(&st)
                && st.by_name.get(&name).is_some_and(knows)
            {
                return Err(SnapError::AlreadyExists(name));
            }
            if st.by_name.contains_key(key) {
                return Err(SnapError::AlreadyExists(key.to_string()));
            }
            Self::chain(&st, parent)?;
        }
        let (diff_ids, blobs, lazy) = self.ensure_image(&r)?;
        let layer = match &r.layer {
            labels::LayerSel::Index(i) => *i,
            labels::LayerSel::Blob(d) => blobs.iter().position(|b| b == d).ok_or_else(|| {
                SnapError::InvalidArgument(format!("{} ({}) has no layer {d}", r.image, r.manifest))
            })?,
        };
        // the labels may not map a chain id to other content
        let chain = labels::chain_ids(&diff_ids);
        match chain.get(layer) {
            Some(c) if *c == r.target => {}
            Some(c) => {
                return Err(SnapError::InvalidArgument(format!(
                    "layer {} of {} ({}) ends chain {c}, not the target {}",
                    layer, r.image, r.manifest, r.target
                )));
            }
            None => {
                return Err(SnapError::InvalidArgument(format!(
                    "{} ({}) has {} layers, no layer {}",
                    r.image,
                    r.manifest,
                    diff_ids.len(),
                    layer
                )));
            }
        }
        let this = Remote {
            image: r.image.clone(),
            manifest: r.manifest,
            layer,
            layers: diff_ids.len(),
            lazy,
            plain_http: r.plain_http,
        };
        let mut st = self.lock();
        if let Some(name) = existing(&st) {
            // the same chain through another image: if it is that image's
            // top, containers on it may mount that image
            let mut info = st.by_name[&name].clone();
            if layer + 1 == diff_ids.len() && !knows(&info) {
                info.tops.push(this);
                info.updated = now();
                self.store_record(&info)?;
                st.by_name.insert(name.clone(), info);
            }
            return Err(SnapError::AlreadyExists(name));
        }
        let parent_chain = Self::chain(&st, parent)?;
        // the parent must be the layer below, from strata too
        let below_ok = match (layer, parent_chain.first()) {
            (0, None) => true,
            (i, Some(p)) => p.labels.get(labels::SNAPSHOT_REF) == chain.get(i - 1),
            _ => false,
        };
        if !below_ok {
            return Err(SnapError::InvalidArgument(format!(
                "layer {} of {} is prepared on parent {parent:?}, which is not the chain below it",
                layer, r.image
            )));
        }
        let id = st.next_id;
        st.next_id += 1;
        let t = now();
        let info = Info {
            id,
            name: key.to_string(),
            parent: parent.map(str::to_string),
            kind: Kind::Committed,
            labels,
            created: t,
            updated: t,
            usage: Usage::default(),
            remote: Some(this),
            tops: Vec::new(),
        };
        self.store_new_record(&info)?;
        st.by_name.insert(key.to_string(), info);
        Err(SnapError::AlreadyExists(key.to_string()))
    }

    /// The image of `r`: its diff ids, and whether it is served lazily
    /// (zstd:chunked all through and not in the store; mounted at the
    /// first container) or is in the store (pulled now, by digest, if it
    /// is not).
    fn ensure_image(&self, r: &RemoteLayer) -> Result<(Vec<Digest>, Vec<Digest>, bool)> {
        let gate = self.pull_gate(&r.manifest);
        let _one = gate.lock().unwrap_or_else(|e| e.into_inner());
        let name = store_name(&r.manifest);
        let diff_ids_of =
            |m: &strata_store::ImageMeta| m.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>();
        let blobs_of = |m: &strata_store::ImageMeta| {
            m.layers.iter().map(|l| l.blob.digest).collect::<Vec<_>>()
        };
        if let Ok(meta) = self.store.image_meta(&r.manifest) {
            self.store
                .set_ref(&name, &r.manifest)
                .map_err(|e| SnapError::Io {
                    what: format!("naming {} in the store", r.manifest),
                    source: io::Error::other(e.to_string()),
                })?;
            return Ok((diff_ids_of(&meta), blobs_of(&meta), false));
        }
        if let Some((d, b)) = self
            .checked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&r.manifest)
        {
            return Ok((d.clone(), b.clone(), true));
        }
        let unavailable = |e: String| SnapError::Unavailable(format!("pulling {}: {e}", r.image));
        let (reference, registry) = self.registry_of(&r.image, &r.manifest, r.plain_http)?;
        let source = strata_oci::open_source(&reference, &registry)
            .map_err(|e| unavailable(error_chain(&e)))?;
        let resolved = match self.resolved_by_containerd(&r.manifest) {
            Some(resolved) => resolved,
            None => source
                .resolve(&strata_oci::Platform::host_default())
                .map_err(|e| unavailable(error_chain(&e)))?,
        };
        let chunked = resolved
            .manifest
            .layers
            .iter()
            .all(|l| strata_chunked::reader::locate(&l.annotations).is_some());
        let mut fell_back = false;
        if chunked {
            // zstd:chunked all through: the image's lazy mount is made now,
            // at its first layer's Prepare, as stargz does. It fetches and
            // checks every layer's TOC and tar-split (digests, bounds,
            // CRCs): a bad one fails it and nothing is recorded. The first
            // container finds it ready, and its prefetch starts now.
            let config = strata_oci::parse_config(&resolved.config_bytes)
                .map_err(|e| unavailable(error_chain(&e)))?;
            let blobs: Vec<Digest> = resolved.manifest.layers.iter().map(|l| l.digest).collect();
            let t0 = std::time::Instant::now();
            let mounted = self.premount_lazy(r, &resolved);
            let why = match mounted {
                Ok(()) => {
                    tracing::info!(
                        "mounted {} ({}) lazily in {:?}",
                        r.image,
                        r.manifest,
                        t0.elapsed()
                    );
                    self.checked
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(r.manifest, (config.diff_ids.clone(), blobs.clone()));
                    // the check before a container starts asks the same
                    // registry, on this source's open connections
                    if let Some(top) = resolved.manifest.layers.last() {
                        self.sources
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(r.manifest, (source.into(), top.clone()));
                    }
                    return Ok((config.diff_ids, blobs, true));
                }
                Err(e) => e,
            };
            // why not: the library's own check of the TOCs names the cause
            // (the mount's is only its message)
            fell_back = true;
            let fallback = |e: String| {
                tracing::warn!(
                    "{} ({}) cannot be mounted lazily, pulling it in full \
                     (lazy_fallback = \"pull\"): {e}",
                    r.image,
                    r.manifest
                );
            };
            match strata_lazy::prepare(&self.store, &*source, resolved.clone()) {
                Ok(_) if self.lazy_fallback => fallback(why.to_string()),
                Ok(_) => return Err(why),
                // readable, not lazily (the old zstd:chunked layout, no
                // CRCs to check files against): pulled in full below, as
                // `strata mount --lazy` does
                Err(e @ strata_lazy::LazyError::NotLazy { .. }) => {
                    tracing::warn!(
                        "{} ({}) is not served lazily, pulling it in full: {}",
                        r.image,
                        r.manifest,
                        error_chain(&e)
                    );
                }
                Err(
                    e @ strata_lazy::LazyError::Oci(
                        strata_oci::OciError::Network { .. }
                        | strata_oci::OciError::Registry { .. }
                        | strata_oci::OciError::Auth { .. },
                    ),
                ) => return Err(unavailable(error_chain(&e))),
                // a full pull checks every layer against its diff_id: the
                // TOC is not used
                Err(e) if self.lazy_fallback => fallback(error_chain(&e)),
                Err(e) => {
                    return Err(SnapError::InvalidArgument(format!(
                        "{} ({}) cannot be served lazily: {}",
                        r.image,
                        r.manifest,
                        error_chain(&e)
                    )));
                }
            }
        }
        let mut opts = strata_oci::pull::PullOptions::host(registry);
        // a fallback from a lazy mount: the whole blobs, checked against
        // their digests and diff_ids, whatever the TOCs say
        opts.partial = !fell_back;
        // the image as resolved above: the registry is not asked for the
        // manifest and config again
        let source = strata_oci::preresolved::Preresolved::new(source, resolved);
        strata_oci::pull::pull_from(&self.store, &source, &name, &opts, strata_ops::Ctl::none())
            .map_err(|e| unavailable(error_chain(&e)))?;
        let meta = self
            .store
            .image_meta(&r.manifest)
            .map_err(|e| unavailable(e.to_string()))?;
        self.premount_pulled(r);
        Ok((diff_ids_of(&meta), blobs_of(&meta), false))
    }

    /// The image of `manifest` as containerd fetched it into its content
    /// store (checked against the digests), if it is there.
    fn resolved_by_containerd(&self, manifest: &Digest) -> Option<strata_oci::ResolvedImage> {
        let blobs = self.containerd_blobs.as_ref()?;
        match strata_oci::preresolved::from_content_store(blobs, manifest) {
            Ok(Some(r)) => {
                tracing::debug!("{manifest} and its config from containerd's content store");
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(
                    "reading {manifest} from containerd's content store: {}; asking the registry",
                    error_chain(&e)
                );
                None
            }
        }
    }

    /// The lock that makes pulls (and lazy mounts) of one image happen
    /// one at a time.
    fn pull_gate(&self, manifest: &Digest) -> std::sync::Arc<Mutex<()>> {
        self.pulls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(*manifest)
            .or_default()
            .clone()
    }

    /// Pull `r`'s image into the store in full (by digest, partially:
    /// chunks the store holds are not fetched), once at a time per image.
    fn pull_in_full(&self, r: &Remote) -> Result<strata_store::ImageMeta> {
        let gate = self.pull_gate(&r.manifest);
        let _one = gate.lock().unwrap_or_else(|e| e.into_inner());
        if let Ok(meta) = self.store.image_meta(&r.manifest) {
            return Ok(meta);
        }
        let unavailable = |e: String| SnapError::Unavailable(format!("pulling {}: {e}", r.image));
        let (reference, registry) = self.registry_of(&r.image, &r.manifest, r.plain_http)?;
        let source = strata_oci::open_source(&reference, &registry)
            .map_err(|e| unavailable(error_chain(&e)))?;
        let opts = strata_oci::pull::PullOptions::host(registry);
        let t0 = std::time::Instant::now();
        strata_oci::pull::pull_from(
            &self.store,
            &*source,
            &store_name(&r.manifest),
            &opts,
            strata_ops::Ctl::none(),
        )
        .map_err(|e| unavailable(error_chain(&e)))?;
        tracing::info!(
            "pulled {} ({}) in full for its layers below the top in {:?}",
            r.image,
            r.manifest,
            t0.elapsed()
        );
        self.store
            .image_meta(&r.manifest)
            .map_err(|e| unavailable(e.to_string()))
    }

    /// The mounts of an active snapshot or a view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let (info, chain) = {
            let st = self.lock();
            let info = st
                .by_name
                .get(key)
                .ok_or_else(|| SnapError::NotFound(key.to_string()))?
                .clone();
            if info.kind == Kind::Committed {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: it has no mounts of its own"
                )));
            }
            let chain = Self::chain(&st, info.parent.as_deref())?;
            (info, chain)
        };
        // the snapshot is recorded on its image, so Cleanup keeps that
        // mount; the gate only orders a remount (after a reboot) with it
        let _gate = chain
            .iter()
            .any(|p| p.remote.is_some())
            .then(|| self.mounting.lock().unwrap_or_else(|e| e.into_inner()));
        self.mounts_of(&info, &chain, false).map(|(m, _)| m)
    }

    /// Commit the active snapshot `key` as `name`.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        let check = |st: &State| -> Result<Info> {
            if st.by_name.contains_key(name) {
                return Err(SnapError::AlreadyExists(name.to_string()));
            }
            let old = st
                .by_name
                .get(key)
                .ok_or_else(|| SnapError::NotFound(key.to_string()))?
                .clone();
            if old.kind != Kind::Active {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} is a {}: only active snapshots commit",
                    old.kind.as_str()
                )));
            }
            Ok(old)
        };
        let id = check(&self.lock())?.id;
        // a layer's walk takes a while: unlocked (containerd's applier is
        // done writing it; other calls go on meanwhile)
        let fs_dir = self.dir(id).join("fs");
        let usage =
            disk_usage(&fs_dir).map_err(io_err(format!("measuring {}", fs_dir.display())))?;
        let mut st = self.lock();
        let old = check(&st)?;
        if old.id != id {
            return Err(SnapError::NotFound(key.to_string()));
        }
        let t = now();
        let info = Info {
            name: name.to_string(),
            kind: Kind::Committed,
            labels,
            created: t,
            updated: t,
            usage,
            ..old
        };
        self.store_record(&info)?;
        st.by_name.remove(key);
        st.by_name.insert(name.to_string(), info);
        Ok(())
    }

    /// Remove `key` (it must have no children); its dir goes to the
    /// trash, emptied by [`cleanup`](Self::cleanup).
    pub fn remove(&self, key: &str) -> Result<()> {
        let mut st = self.lock();
        let info = st
            .by_name
            .get(key)
            .ok_or_else(|| SnapError::NotFound(key.to_string()))?
            .clone();
        if let Some(child) = st
            .by_name
            .values()
            .find(|i| i.parent.as_deref() == Some(key))
        {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key:?} has children ({:?} among them)",
                child.name
            )));
        }
        self.drop_record(info.id)?;
        st.by_name.remove(key);
        let dir = self.dir(info.id);
        let trash = self.root.join("trash").join(info.id.to_string());
        if let Err(e) = fs::rename(&dir, &trash)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!("moving {} to the trash: {e}", dir.display());
        }
        Ok(())
    }

    /// One snapshot's record.
    pub fn stat(&self, key: &str) -> Result<Info> {
        self.lock()
            .by_name
            .get(key)
            .cloned()
            .ok_or_else(|| SnapError::NotFound(key.to_string()))
    }

    /// Update labels as containerd's `Update` does: `paths` empty or
    /// `labels` replaces them all; `labels.K` sets (or, empty or absent
    /// in `labels`, deletes) one.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info> {
        let mut st = self.lock();
        let mut info = st
            .by_name
            .get(name)
            .ok_or_else(|| SnapError::NotFound(name.to_string()))?
            .clone();
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            info.labels = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        } else {
            for p in paths {
                let Some(k) = p.strip_prefix("labels.") else {
                    return Err(SnapError::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {name:?} (only labels)"
                    )));
                };
                match labels.get(k).filter(|v| !v.is_empty()) {
                    Some(v) => info.labels.insert(k.to_string(), v.clone()),
                    None => info.labels.remove(k),
                };
            }
        }
        info.updated = now();
        self.store_record(&info)?;
        st.by_name.insert(name.to_string(), info.clone());
        Ok(info)
    }

    /// Every snapshot matching one of `filters` (all when empty), sorted
    /// by name.
    pub fn list(&self, filters: &[Filter]) -> Vec<Info> {
        let mut v: Vec<Info> = self
            .lock()
            .by_name
            .values()
            .filter(|i| filters.is_empty() || filters.iter().any(|f| f.matches(i)))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Usage of one snapshot alone: recorded at commit, measured now for
    /// active ones.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let info = self.stat(key)?;
        if info.kind == Kind::Committed {
            return Ok(info.usage);
        }
        let fs_dir = self.dir(info.id).join("fs");
        disk_usage(&fs_dir).map_err(io_err(format!("measuring {}", fs_dir.display())))
    }

    /// Free what removals left: the trash, dirs no record names, image
    /// mounts no container or view stands on, and the store names of
    /// images no layer comes from (strata's gc then frees them).
    pub fn cleanup(&self) -> Result<()> {
        // no snapshot is being made on an image while this decides which
        // are unused and unmounts them
        let _gate = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        let st = self.lock();
        let mut used_mounts = std::collections::HashSet::new();
        let mut used_images = std::collections::HashSet::new();
        for i in st.by_name.values() {
            for r in i.remote.iter().chain(i.tops.iter()) {
                used_images.insert(r.manifest);
            }
            if i.kind != Kind::Committed
                && let Ok(chain) = Self::chain(&st, i.parent.as_deref())
                && let Some(p) = chain.iter().find(|p| p.remote.is_some())
            {
                for r in p.remote.iter().chain(p.tops.iter()) {
                    used_mounts.insert(r.manifest.hex().to_string());
                }
                if let Some(c) = p.labels.get(labels::SNAPSHOT_REF) {
                    used_mounts.insert(prefix_name(c));
                }
            }
        }
        // a new snapshot on an image needs the gate held here, so the
        // images found unused stay unused until it is released
        drop(st);
        // a mount being built is a pull's: not unmounted under it
        for dir in self
            .building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
        {
            if let Some(n) = dir.file_name() {
                used_mounts.insert(n.to_string_lossy().into_owned());
            }
        }
        let mnt = self.root.join("mnt");
        for e in fs::read_dir(&mnt)
            .map_err(io_err(format!("reading {}", mnt.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if used_mounts.contains(&name) {
                continue;
            }
            let p = e.path();
            // a mount a daemon still builds (started before a restart)
            if self.being_built(&p) {
                continue;
            }
            // an image handed to a lazy mount's daemon that a crash left
            if name.ends_with(".resolved") {
                let _ = fs::remove_file(&p);
                continue;
            }
            // a prefix mount's image, and the mount (strata's own overlay,
            // not one `strata umount` knows)
            if let Some(stem) = name.strip_suffix(".erofs") {
                if !used_mounts.contains(stem) {
                    let _ = fs::remove_file(&p);
                }
                continue;
            }
            if name.starts_with("layers-") {
                if strata_sys::is_mount_point(&p).unwrap_or(false)
                    && let Err(err) = strata_sys::unmount(&p)
                {
                    tracing::warn!("unmounting {}: {err}", p.display());
                    continue;
                }
                let _ = fs::remove_dir(&p);
                continue;
            }
            if strata_sys::is_mount_point(&p).unwrap_or(false)
                && let Err(err) = self.unmount_image(&p)
            {
                tracing::warn!("unmounting {}: {err}", p.display());
                continue;
            }
            let _ = fs::remove_dir(&p);
        }
        if let Ok(refs) = self.store.refs() {
            for (name, d) in refs {
                if name.starts_with("containerd-snapshotter/") && !used_images.contains(&d) {
                    let _ = self.store.remove_ref(&name);
                }
            }
        }
        {
            // under the lock: a create's dir is pending until recorded
            let st = self.lock();
            let known = st
                .by_name
                .values()
                .map(|i| i.id)
                .chain(st.pending.iter().copied())
                .collect();
            self.sweep(known)?;
        }
        self.empty_trash();
        Ok(())
    }

    /// Move the dirs of snapshots no record names (`known`: the ids
    /// recorded or pending) to the trash: renames only, quick under the
    /// state lock.
    fn sweep(&self, known: std::collections::HashSet<u64>) -> Result<()> {
        let snaps = self.root.join("snapshots");
        for e in fs::read_dir(&snaps)
            .map_err(io_err(format!("reading {}", snaps.display())))?
            .flatten()
        {
            let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            if id.is_none_or(|id| !known.contains(&id)) {
                let to = self
                    .root
                    .join("trash")
                    .join(format!("orphan-{}", e.file_name().to_string_lossy()));
                if fs::rename(e.path(), &to).is_err() {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Delete what is in the trash (nothing refers to it: no state lock).
    fn empty_trash(&self) {
        let trash = self.root.join("trash");
        for e in fs::read_dir(&trash).into_iter().flatten().flatten() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// An error and its causes, `: `-joined.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

fn sync_dir(p: &Path) -> io::Result<()> {
    fs::File::open(p)?.sync_all()
}

/// Bytes (allocated) and inodes under `dir`, each inode once.
pub fn disk_usage(dir: &Path) -> io::Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut u = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            u.inodes += 1;
            u.size += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prepares, commits, removes and Cleanups from many threads at once:
    /// every snapshot that exists keeps its dir (a Cleanup's sweep never
    /// takes the dir of a create that has not recorded yet), and what was
    /// removed is gone.
    #[test]
    fn concurrent_calls_keep_every_live_snapshots_dir() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Snapshotter::open(dir.path()).unwrap());
        s.create(Kind::Active, "base-key", None, BTreeMap::new())
            .unwrap();
        s.commit("base", "base-key", BTreeMap::new()).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sweeper = {
            let (s, done) = (s.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    s.cleanup().unwrap();
                    n += 1;
                }
                n
            })
        };
        let threads: Vec<_> = (1..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..40 {
                        let key = format!("k{t}-{i}");
                        let m = s
                            .create(Kind::Active, &key, Some("base"), BTreeMap::new())
                            .unwrap();
                        assert_eq!(m[0].kind, "overlay");
                        let upper = s.dir(s.stat(&key).unwrap().id).join("fs");
                        fs::write(upper.join("f"), b"x").unwrap();
                        match i % 3 {
                            0 => s.remove(&key).unwrap(),
                            1 => s
                                .commit(&format!("c{t}-{i}"), &key, BTreeMap::new())
                                .unwrap(),
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(sweeper.join().unwrap() > 10, "Cleanup ran meanwhile");
        s.cleanup().unwrap();
        let live = s.list(&[]);
        // base + 7 threads x (40 - 14 removed)
        assert_eq!(live.len(), 1 + 7 * 26);
        for i in &live {
            assert!(s.dir(i.id).join("fs").is_dir(), "{} lost its dir", i.name);
            if i.name != "base" {
                assert_eq!(fs::read(s.dir(i.id).join("fs/f")).unwrap(), b"x");
            }
            if i.kind == Kind::Committed && i.name != "base" {
                assert_eq!(i.usage.inodes, 1, "{}: {:?}", i.name, i.usage);
            }
        }
        let dirs = fs::read_dir(dir.path().join("snapshots")).unwrap().count();
        assert_eq!(dirs, live.len(), "removed snapshots' dirs are freed");
        assert_eq!(fs::read_dir(dir.path().join("trash")).unwrap().count(), 0);
        // a fresh open reads the same records
        drop(s);
        let again = Snapshotter::open(dir.path()).unwrap();
        assert_eq!(again.list(&[]).len(), 1 + 7 * 26);
    }

    /// A new record is written in place: what a crash leaves of one (empty,
    /// cut short) is moved to `lost/` at the next open, its dir is freed
    /// and its id is not given again; a whole record beside it is kept,
    /// and JSON that is whole but no record still fails the open.
    #[test]
    fn a_new_record_a_crash_cut_short_is_moved_aside_and_its_id_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Snapshotter::open(dir.path()).unwrap();
        s.create(Kind::Active, "a", None, BTreeMap::new()).unwrap();
        s.create(Kind::Active, "b", None, BTreeMap::new()).unwrap();
        s.create(Kind::Active, "c", None, BTreeMap::new()).unwrap();
        let (b, c) = (s.stat("b").unwrap().id, s.stat("c").unwrap().id);
        drop(s);
        let meta = dir.path().join("meta");
        // as a kill between creating c's record and writing it, and a
        // power loss that kept half of b's
        let whole = fs::read(meta.join(format!("{b}.json"))).unwrap();
        fs::write(meta.join(format!("{b}.json")), &whole[..whole.len() / 2]).unwrap();
        fs::write(meta.join(format!("{c}.json")), b"").unwrap();
        let s = Snapshotter::open(dir.path()).unwrap();
        let names: Vec<_> = s.list(&[]).into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["a"]);
        for id in [b, c] {
            assert!(dir.path().join("lost").join(format!("{id}.json")).is_file());
            assert!(!s.dir(id).exists(), "snapshot {id}'s dir is freed");
        }
        s.create(Kind::Active, "d", None, BTreeMap::new()).unwrap();
        assert!(
            s.stat("d").unwrap().id > c,
            "ids of lost records are not given again"
        );
        drop(s);
        let s = Snapshotter::open(dir.path()).unwrap();
        assert_eq!(s.list(&[]).len(), 2);
        drop(s);
        fs::write(meta.join("99.json"), br#"{"not":"a record"}"#).unwrap();
        let e = Snapshotter::open(dir.path())
            .err()
            .expect("a record that is no record fails the open");
        assert!(e.to_string().contains("99.json"), "{e}");
    }
}
