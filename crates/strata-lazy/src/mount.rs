//! A lazy mount as a value: started from a store, an image source and
//! options; observed through [`LazyMount::status`]; served until unmounted
//! ([`LazyMount::wait`]) or unmounted by its owner ([`LazyMount::unmount`]);
//! found again from its saved state by a process that did not start it
//! ([`attach`], [`list`]).
//!
//! ```text
//! mount(store, source, name, target, options, events)
//!   image in the store?          -> composefs mount          -> Mounted::Composefs
//!   prepare (TOCs, tar-splits)   -> a layer is not chunked   -> full pull + composefs
//!                                                               (Auto) or NotLazy (Require)
//!   reserve the prefetch list, start the prefetch thread
//!   <mdir>/image.erofs (the tree; files redirect to objects)
//!   <mdir>/data: FUSE of missing contents (fs.rs)
//!   <mdir>/verified: links to the objects checked for this mount
//!   overlay at target: image.erofs over [verified, data]     -> Mounted::Lazy(LazyMount)
//!   a state thread rewrites <mdir>/state.json every 500 ms, checks
//!   each layer whose files all arrived against its diff_id (a mismatch:
//!   `inconsistent`, every read EIO) and detaches the data layer once
//!   the target is unmounted
//! ```
//!
//! `<mdir>` is `<store>/lazy/<hash of the target>` ([`mount_dir`]). The
//! FUSE server lives in the process that called [`mount`]: the CLI makes
//! that a daemon of its own (one per mount, see `strata_sys::daemon`), so a
//! manager that restarts does not take running containers' data with it;
//! the restarted manager finds the mount with [`attach`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use strata_digest::Digest;
use strata_oci::ImageSource;
use strata_oci::pull::{PullOptions, pull_from};
use strata_ops::{Cancel, Ctl, Event, EventSink, Op, Warning};
use strata_store::Store;

use crate::fs::{LazyFs, MountConfig, Recorder};
use crate::state::{MountState, PrefetchState, mount_dir};
use crate::{Fetcher, LazyError, LazyImage, ReadError};

/// What to do when an image cannot be read lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Pull it in full and mount it the composefs way (with a warning).
    Pull,
    /// Fail with [`LazyError::NotLazy`].
    Fail,
}

/// What is fetched in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    /// Only what is read.
    None,
    /// The prefetch list (and files placed first).
    List,
    /// The list first, then a pull of the whole image, which records it.
    All,
}

/// How to mount lazily.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// When the image cannot be lazy.
    pub fallback: Fallback,
    /// Background fetching.
    pub prefetch: Prefetch,
    /// Paths (one per line) fetched first; `None`: the list in the
    /// manifest's annotation, and the files placed first in the layers.
    pub prefetch_list: Option<String>,
    /// Write the paths read, in first-read order, to this file.
    pub record: Option<PathBuf>,
    /// Serve fetched files by FUSE passthrough (the mount then cannot be
    /// the lower layer of another overlay).
    pub passthrough: bool,
    /// Fetches at once.
    pub fetch_jobs: usize,
    /// For the full pull (fallback and `Prefetch::All`).
    pub pull: PullOptions,
}

/// How an image was mounted.
pub enum Mounted {
    /// It was in the store: a composefs mount, nothing to serve.
    Composefs {
        /// The image.
        manifest_digest: Digest,
    },
    /// It could not be lazy: pulled in full, then a composefs mount.
    Full {
        /// The image.
        manifest_digest: Digest,
        /// Why it could not be lazy.
        reason: String,
    },
    /// Lazily: served by this process until unmounted.
    Lazy(Box<LazyMount>),
}

/// What a mount daemon reports once its mount is ready (one JSON line to
/// the process that started it, see `strata_sys::daemon::notify`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountReport {
    /// `lazy`, `composefs` (the image was in the store) or `full` (pulled
    /// in full: it could not be lazy).
    pub mode: String,
    /// One line for people.
    pub message: String,
    /// Warnings for people.
    pub notes: Vec<String>,
    /// The image, for a lazy mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<Digest>,
}

impl Mounted {
    /// The report of `name` mounted at `target`.
    pub fn report(&self, name: &str, target: &Path) -> MountReport {
        let target = target.display();
        let (mode, message, notes, manifest_digest) = match self {
            Mounted::Composefs { manifest_digest } => (
                "composefs",
                format!(
                    "{name} ({manifest_digest}) is in the store: mounted it at {target} the composefs way"
                ),
                Vec::new(),
                None,
            ),
            Mounted::Full { reason, .. } => (
                "full",
                format!("pulled {name} in full and mounted it at {target} (not lazily)"),
                vec![format!("not lazy: {reason}")],
                None,
            ),
            Mounted::Lazy(m) => (
                "lazy",
                format!(
                    "mounted {name} lazily at {target} ({} of {} contents to fetch, {} of TOCs read)",
                    m.to_fetch,
                    m.files_total,
                    strata_ops::human_bytes(m.toc_bytes)
                ),
                Vec::new(),
                Some(m.manifest_digest),
            ),
        };
        MountReport {
            mode: mode.to_string(),
            message,
            notes,
            manifest_digest,
        }
    }
}

/// A lazy mount served by this process.
pub struct LazyMount {
    target: PathBuf,
    mdir: PathBuf,
    manifest_digest: Digest,
    to_fetch: u64,
    files_total: u64,
    toc_bytes: u64,
    session: Option<fuser::BackgroundSession>,
    data: PathBuf,
    state: Arc<Mutex<MountState>>,
    done: Arc<AtomicBool>,
    updater: Option<std::thread::JoinHandle<()>>,
    record: Option<(PathBuf, Arc<Recorder>)>,
    image: Arc<LazyImage>,
    prefetch_cancel: Cancel,
    /// Keeps the image's contents from gc while mounted (also after this
    /// process is gone, while the mount stays).
    _lease: strata_store::Lease,
}

/// Whether a mount on record is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MountStatus {
    /// Its daemon runs and it is mounted.
    Serving,
    /// Still mounted but its daemon is gone: reads of missing files fail
    /// (ENOTCONN); [`cleanup`] after unmounting.
    Stale,
    /// Not mounted (its daemon is ending or gone).
    NotMounted,
}

/// A lazy mount on record in a store, served by some process.
#[derive(Debug, Clone)]
pub struct MountRecord {
    /// Its state as last saved.
    pub state: MountState,
    /// Whether it is served.
    pub status: MountStatus,
}

/// The mount source of a lazy mount's overlay.
pub const SOURCE_PREFIX: &str = "strata-lazy:";

/// Mount `name` (resolved by `source`) at `target`, lazily when its layers
/// allow. `target` must be an existing directory and not a mount point.
pub fn mount(
    store: Arc<Store>,
    source: Arc<dyn ImageSource>,
    name: &str,
    target: &Path,
    opts: &LazyOptions,
    events: Arc<dyn EventSink>,
) -> Result<Mounted, LazyError> {
    mount_then(store, source, name, target, opts, events, &mut || {})
}

/// [`mount`], calling `checked` once every TOC and tar-split has been
/// fetched and checked (a lazy mount only): what is left (the EROFS
/// image, the lease, the FUSE and overlay mounts) is this machine's own
/// work. A caller waiting for a pull's answer (the snapshotter) can give
/// it there and let the mount finish meanwhile.
pub fn mount_then(
    store: Arc<Store>,
    source: Arc<dyn ImageSource>,
    name: &str,
    target: &Path,
    opts: &LazyOptions,
    events: Arc<dyn EventSink>,
    checked: &mut dyn FnMut(),
) -> Result<Mounted, LazyError> {
    let started = Instant::now();
    let cancel = Cancel::new();
    let ctl = Ctl::new(events.as_ref(), &cancel);
    ctl.emit(Event::Started {
        op: Op::LazyPrepare,
        subject: name.to_string(),
    });
    let target = check_target(target)?;
    // another daemon still making a mount there: two would stack
    if let Some(pid) = builder(store.root(), &target) {
        return Err(LazyError::Busy(format!(
            "the daemon (pid {pid}) of another lazy mount at {} is still making it",
            target.display()
        )));
    }
    // preparing is one operation for gc (the layers it reads from the
    // store stay until the lease is taken); serving after it is not: the
    // lease keeps what the mount reads, and each commit of fetched
    // contents is an operation of its own
    let work = store.work()?;
    let resolved = source.resolve(&opts.pull.platform)?;
    ctl.emit(Event::Resolved {
        op: Op::LazyPrepare,
        manifest_digest: resolved.manifest_digest,
        layers: resolved.manifest.layers.len(),
    });
    // already pulled: the composefs mount serves it
    if store.has_image(&resolved.manifest_digest) {
        let digest = resolved.manifest_digest;
        store.set_ref(name, &digest)?;
        mount_composefs(&store, &digest, &target, opts.pull.split)?;
        ctl.emit(Event::Finished {
            op: Op::LazyPrepare,
        });
        return Ok(Mounted::Composefs {
            manifest_digest: digest,
        });
    }
    // the files placed first start arriving while the mount is built
    let (source, early) = crate::early::start(source, early_runs(&store, &resolved, opts));
    if !early.is_empty() {
        tracing::debug!("streaming the files placed first of {} layers", early.len());
    }
    let lazy = match crate::prepare(&store, source.as_ref(), resolved) {
        Ok(l) => l,
        Err(LazyError::NotLazy {
            index,
            digest,
            reason,
        }) => {
            if opts.fallback == Fallback::Fail {
                return Err(LazyError::NotLazy {
                    index,
                    digest,
                    reason,
                });
            }
            let why = format!("layer {index} ({digest}) cannot be read lazily: {reason}");
            ctl.warn(
                Op::LazyPrepare,
                Warning::FullPull {
                    index,
                    digest,
                    reason,
                },
            );
            tracing::warn!("{why}: pulling in full");
            let summary = pull_from(&store, source.as_ref(), name, &opts.pull, ctl)?;
            mount_composefs(&store, &summary.manifest_digest, &target, opts.pull.split)?;
            return Ok(Mounted::Full {
                manifest_digest: summary.manifest_digest,
                reason: why,
            });
        }
        Err(e) => return Err(e),
    };
    checked();
    // from here until its state is saved, this daemon is the one building
    // the mount: a snapshotter restarted meanwhile waits for it instead of
    // starting another (written after the report: whoever sees it knows
    // the image was checked)
    let building = mount_dir(store.root(), &target).join(BUILDING);
    if let Some(parent) = building.parent() {
        std::fs::create_dir_all(parent).map_err(|e| LazyError::Io {
            what: format!("creating {}", parent.display()),
            source: e,
        })?;
    }
    // whole or not at all (a reader seeing it empty would take the mount
    // for nobody's): written aside, then renamed into place
    let aside = building.with_extension("tmp");
    std::fs::write(&aside, std::process::id().to_string())
        .and_then(|()| std::fs::rename(&aside, &building))
        .map_err(|e| LazyError::Io {
            what: format!("writing {}", building.display()),
            source: e,
        })?;
    let m = serve(
        store,
        source,
        name,
        &target,
        opts,
        lazy,
        started,
        events.clone(),
        early,
    )?;
    drop(work);
    ctl.emit(Event::Finished {
        op: Op::LazyPrepare,
    });
    Ok(Mounted::Lazy(Box::new(m)))
}

fn check_target(target: &Path) -> Result<PathBuf, LazyError> {
    let bad = |reason: String| LazyError::Target {
        path: target.to_path_buf(),
        reason,
    };
    if !target.is_dir() {
        return Err(bad("not an existing directory".into()));
    }
    let target = target
        .canonicalize()
        .map_err(|e| bad(format!("resolving it: {e}")))?;
    if strata_sys::mounts()?
        .iter()
        .any(|m| m.mount_point == target)
    {
        return Err(LazyError::Busy(format!(
            "{} is already a mount point",
            target.display()
        )));
    }
    Ok(target)
}

/// Mount a stored image the composefs way at `target`.
pub fn mount_composefs(
    store: &Store,
    digest: &Digest,
    target: &Path,
    split: strata_store::SplitPolicy,
) -> Result<(), LazyError> {
    let (_, layers) = store.image_erofs(digest, split)?;
    let m = strata_sys::OverlayMount {
        dirs_above: Vec::new(),
        layers,
        data_dirs: vec![store.root().join("objects")],
        upper: None,
        verity_require: false,
        source: strata_store::composefs_source(digest),
    };
    strata_sys::mount_overlay(&m, target)?;
    Ok(())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The runs of files placed first that the prefetch will fetch (it does
/// when there is a prefetch and no list given: the image's own list is
/// the files placed first), of layers the store lacks, each at most
/// [`EARLY_MAX_BYTES`](crate::early::EARLY_MAX_BYTES), all of them
/// [`EARLY_MAX_TOTAL`](crate::early::EARLY_MAX_TOTAL) (layers in order).
fn early_runs(
    store: &Store,
    resolved: &strata_oci::ResolvedImage,
    opts: &LazyOptions,
) -> Vec<(strata_oci::Descriptor, u64)> {
    // STRATA_LAZY_EARLY=0 turns it off (for A/B measurements)
    let off = std::env::var_os("STRATA_LAZY_EARLY").is_some_and(|v| v == "0");
    if off || opts.prefetch == Prefetch::None || opts.prefetch_list.is_some() {
        return Vec::new();
    }
    let diff_ids = strata_oci::parse_config(&resolved.config_bytes)
        .map(|c| c.diff_ids)
        .unwrap_or_default();
    resolved
        .manifest
        .layers
        .iter()
        .enumerate()
        .filter(|(i, d)| {
            store.layer_by_blob(&d.digest).is_none()
                && diff_ids.get(*i).is_none_or(|id| !store.has_layer(id))
        })
        .filter_map(|(_, d)| {
            let end: u64 = d
                .annotations
                .get(strata_oci::convert::FIRST_END_ANNOTATION)?
                .parse()
                .ok()?;
            (end > 0 && end <= d.size && end <= crate::early::EARLY_MAX_BYTES)
                .then(|| (d.clone(), end))
        })
        .scan(0u64, |total, (d, end)| {
            *total += end;
            (*total <= crate::early::EARLY_MAX_TOTAL).then_some((d, end))
        })
        .collect()
}

/// The digests of the prefetch list's files, and (with no list given)
/// the files placed first in their layers; or, with neither, the
/// [`start_set`] (then `true`). With a list, also the [`RUNTIME_FILES`]
/// it lacks, fetched beside it.
fn wanted(lazy: &LazyImage, opts: &LazyOptions) -> (Vec<Digest>, bool, Vec<Digest>) {
    if opts.prefetch == Prefetch::None {
        return (Vec::new(), false, Vec::new());
    }
    let list = match &opts.prefetch_list {
        Some(l) => l.clone(),
        None => lazy
            .resolved
            .manifest
            .annotations
            .get(strata_oci::convert::PREFETCH_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
    };
    let mut wanted: Vec<Digest> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter_map(|line| {
            let path = line.trim_start_matches('/');
            match lazy.tree.lookup(path.as_bytes()).map(|n| &n.kind) {
                Some(strata_tree::NodeKind::Regular { digest, size }) if *size > 0 => Some(*digest),
                _ => None,
            }
        })
        .collect();
    if opts.prefetch_list.is_none() {
        let mut seen: std::collections::HashSet<_> = wanted.iter().copied().collect();
        wanted.extend(lazy.placed_first().into_iter().filter(|d| seen.insert(*d)));
    }
    // (`STRATA_LAZY_START_SET=0` turns it off, for measuring)
    let start_set_on = std::env::var_os("STRATA_LAZY_START_SET").is_none_or(|v| v != "0");
    if wanted.is_empty()
        && start_set_on
        && opts.prefetch == Prefetch::All
        && opts.prefetch_list.is_none()
    {
        return (start_set(lazy), true, Vec::new());
    }
    // a list records what the program read; the runtime reads these in
    // the container's root before the program starts, at every container
    let runtime = if wanted.is_empty() {
        Vec::new()
    } else {
        RUNTIME_FILES
            .iter()
            .filter_map(|p| crate::elf::resolve(&lazy.tree, p.as_bytes()))
            .filter(|(d, size)| worth_fetching(lazy, d, *size, START_SMALL_MAX))
            .map(|(d, _)| d)
            .filter(|d| !wanted.contains(d))
            .collect()
    };
    (wanted, false, runtime)
}

/// What the container runtime reads in a container's root before its
/// program starts: containerd and runc look the user and its groups up.
const RUNTIME_FILES: [&str; 2] = ["/etc/passwd", "/etc/group"];

/// A file of the start set larger than this is left to reads.
const START_FILE_MAX: u64 = 16 << 20;
/// The same for the small files of the start set (those a program's
/// first calls read).
const START_SMALL_MAX: u64 = 1 << 20;

/// What `Prefetch::All` fetches first when the image has no list and no
/// files placed first: what a program started from it loads before
/// anything else. The image's command (`Entrypoint`/`Cmd`, looked up on
/// its `PATH`), and for the host's machine the dynamic loader,
/// `/etc/ld.so.cache` and the C library, which every dynamically linked
/// program of a glibc or musl image opens first; then the few small
/// files read before the program starts or by its first calls:
/// `/etc/passwd` and `/etc/group` (the runtime looks the user up in
/// them), C.UTF-8's `LC_CTYPE` and glibc's gconv cache (setlocale), and
/// `/etc/localtime` (tzset); with the command, the programs the image's
/// own layers add to its `PATH` ([`layer_programs`]). Those missing from
/// the store, each at most
/// [`START_FILE_MAX`] ([`START_SMALL_MAX`] for the small ones); the
/// libraries the command names follow once it is in (see
/// `prefetch_thread`).
///
/// A guess, bounded to a few files: a container that runs something else
/// still gets the loader and libc it will most likely need, and the
/// whole image is pulled afterwards anyway. Fetched while the container
/// is being created, when the link is otherwise idle.
pub fn start_set(lazy: &LazyImage) -> Vec<Digest> {
    let tree = &lazy.tree;
    let mut paths: Vec<Vec<u8>> = Vec::new();
    let (cmd, env) = crate::record::command_of(&lazy.resolved.config_bytes);
    let path = env
        .iter()
        .find_map(|kv| kv.strip_prefix("PATH="))
        .unwrap_or_default();
    let path_dirs: Vec<&str> = path.split(':').filter(|d| d.starts_with('/')).collect();
    if let Some(program) = cmd.first() {
        if program.contains('/') {
            paths.push(program.as_bytes().to_vec());
        } else {
            for dir in &path_dirs {
                let p = format!("{dir}/{program}");
                if crate::elf::resolve(tree, p.as_bytes()).is_some() {
                    paths.push(p.into_bytes());
                    break;
                }
            }
        }
    }
    paths.extend(layer_programs(lazy, &path_dirs));
    let loaders: &[&str] = if cfg!(target_arch = "aarch64") {
        &["/lib/ld-linux-aarch64.so.1", "/lib/ld-musl-aarch64.so.1"]
    } else {
        &["/lib64/ld-linux-x86-64.so.2", "/lib/ld-musl-x86_64.so.1"]
    };
    paths.extend(loaders.iter().map(|l| l.as_bytes().to_vec()));
    paths.push(b"/etc/ld.so.cache".to_vec());
    if let Some(libc) = crate::elf::libc_dirs()
        .iter()
        .map(|d| format!("{d}/libc.so.6"))
        .find(|p| crate::elf::resolve(tree, p.as_bytes()).is_some())
    {
        paths.push(libc.into_bytes());
    }
    let big = paths.len();
    // small files read before the program or by its first calls: the
    // runtime's user lookup (runc reads these in the container's root),
    // then what the program's setlocale and tzset read
    for p in RUNTIME_FILES {
        paths.push(p.as_bytes().to_vec());
    }
    let found = paths
        .iter()
        .enumerate()
        .filter_map(|(i, p)| Some((i, crate::elf::resolve(tree, p)?)))
        .chain(
            crate::elf::program_start_files(tree)
                .into_iter()
                .map(|f| (big, f)),
        );
    let mut out = Vec::new();
    for (i, (d, size)) in found {
        let max = if i < big {
            START_FILE_MAX
        } else {
            START_SMALL_MAX
        };
        if worth_fetching(lazy, &d, size, max) && !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The most programs [`layer_programs`] names.
const LAYER_PROGRAMS: usize = 2;
/// A file on the `PATH` smaller than this is taken for a script.
const PROGRAM_MIN: u64 = 64 << 10;

/// The programs the image's own layers put on its `PATH`, for the start
/// set: a container often runs a command of its own, not the image's
/// (`python3 -c ...` on an image whose config names none, or `bash`),
/// and what it runs is then most likely what the layers above the base
/// added (a language runtime, a server), not one of the base's hundreds
/// of tools. The topmost layer above the bottom one that adds
/// executables of at least [`PROGRAM_MIN`] bytes (scripts are smaller)
/// to a `PATH` directory (still the image's: not replaced above), and of
/// those the [`LAYER_PROGRAMS`] largest. A guess, like the rest of the
/// start set: on the fixture's python layer it finds python3.11, which
/// its first container otherwise waited 46-59 ms for (BENCHMARKS.md,
/// issue 16, twelfth run).
fn layer_programs(lazy: &LazyImage, path_dirs: &[&str]) -> Vec<Vec<u8>> {
    fn on_path<'a>(name: &'a str, path_dirs: &[&str]) -> Option<&'a str> {
        let name = name.trim_start_matches("./").trim_start_matches('/');
        let dir = name.rsplit_once('/').map_or("", |(d, _)| d);
        path_dirs
            .iter()
            .any(|d| d.trim_start_matches('/').trim_end_matches('/') == dir)
            .then_some(name)
    }
    for layer in lazy.layers.iter().skip(1).rev() {
        let Some(ix) = &layer.index else { continue };
        let mut found: Vec<(u64, &str)> = ix
            .files
            .iter()
            .filter(|f| f.size >= PROGRAM_MIN)
            .filter_map(|f| Some((f.size, on_path(&f.name, path_dirs)?, f.digest)))
            .filter(|(_, name, digest)| {
                lazy.tree.lookup(name.as_bytes()).is_some_and(|n| {
                    n.meta.mode & 0o111 != 0
                        && matches!(&n.kind, strata_tree::NodeKind::Regular { digest: d, .. } if d == digest)
                })
            })
            .map(|(size, name, _)| (size, name))
            .collect();
        if !found.is_empty() {
            found.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
            return found
                .into_iter()
                .take(LAYER_PROGRAMS)
                .map(|(_, name)| format!("/{name}").into_bytes())
                .collect();
        }
    }
    Vec::new()
}

/// Whether a file guessed to be read soon (`size` bytes of `d`) is
/// fetched ahead: not empty, at most `max`, and not local yet.
fn worth_fetching(lazy: &LazyImage, d: &Digest, size: u64, max: u64) -> bool {
    size > 0 && size <= max && lazy.remote(d).is_some()
}

#[allow(clippy::too_many_arguments)]
fn serve(
    store: Arc<Store>,
    source: Arc<dyn ImageSource>,
    name: &str,
    target: &Path,
    opts: &LazyOptions,
    lazy: LazyImage,
    started: Instant,
    events: Arc<dyn EventSink>,
    early: crate::early::EarlyRuns,
) -> Result<LazyMount, LazyError> {
    let digest = lazy.resolved.manifest_digest;
    let prepared = started.elapsed();
    // the EROFS image is built on another core while the lease, the
    // fetcher and the state are set up (it needs only the tree), and what
    // the store lacks is counted on a third
    let lazy = Arc::new(lazy);
    let aside = |name: &str| std::thread::Builder::new().name(name.into());
    let spawn_err = |e| LazyError::Io {
        what: "starting a thread to build the mount".into(),
        source: e,
    };
    let image = {
        let lazy = lazy.clone();
        aside("lazy-erofs")
            .spawn(move || {
                let t = Instant::now();
                lazy.erofs().map(|bytes| (bytes, t.elapsed()))
            })
            .map_err(spawn_err)?
    };
    let counted = {
        let (lazy, store) = (lazy.clone(), store.clone());
        aside("lazy-count")
            .spawn(move || lazy.count_missing(&store))
            .map_err(spawn_err)?
    };
    let panicked = |what: &str| LazyError::Io {
        what: what.into(),
        source: std::io::Error::other("its thread panicked"),
    };
    let mdir = mount_dir(store.root(), target);
    let io = |what: String| move |e: std::io::Error| LazyError::Io { what, source: e };
    std::fs::create_dir_all(&mdir).map_err(io(format!("creating {}", mdir.display())))?;
    wait_for_earlier_daemon(&mdir, target)?;
    // before any content arrives: what it fetches belongs to no image yet
    let lease = store.lease_for_mount(
        &format!("lazy mount {}", target.display()),
        strata_store::LeaseRoots {
            objects: lazy.storable().into_iter().collect(),
            ..Default::default()
        },
        target,
    )?;
    // the overlay's first data layer: links to the objects checked for
    // this mount (not objects/, which may hold other images' contents a
    // lying TOC names)
    let verified = mdir.join("verified");
    let _ = std::fs::remove_dir_all(&verified);
    std::fs::create_dir_all(&verified).map_err(io(format!("creating {}", verified.display())))?;
    let fetcher = {
        let mut f = Fetcher::new(
            store.clone(),
            source.clone(),
            lazy.clone(),
            mdir.join("partial"),
            opts.fetch_jobs,
        )
        .map_err(io("creating the fetcher's staging".into()))?;
        f.set_verified_dir(verified.clone());
        f.set_events(events.clone());
        Arc::new(f)
    };
    // contents of layers the store has are read by the kernel from the
    // start, as before (links, no daemon)
    fetcher.link_trusted();
    // reads of listed files wait for the bulk fetch instead of racing it
    let (wanted, start, runtime) = wanted(&lazy, opts);
    fetcher.reserve_bulk(&wanted);
    fetcher.reserve_bulk(&runtime);
    let (files_total, to_fetch) = counted
        .join()
        .map_err(|_| panicked("counting what the store lacks"))?;
    let state = Arc::new(Mutex::new(MountState {
        pid: std::process::id(),
        dir: target.to_path_buf(),
        reference: name.to_string(),
        manifest_digest: digest,
        log: mdir.join("log"),
        started: now(),
        files_total,
        files_local: files_total.saturating_sub(to_fetch),
        bytes_fetched: lazy.downloaded,
        image_bytes: lazy
            .layers
            .iter()
            .filter(|l| l.index.is_some())
            .map(|l| l.desc.size)
            .sum(),
        errors: 0,
        files_for_programs: 0,
        prefetch: PrefetchState::None,
        prefetch_error: None,
        complete: false,
        opens: 0,
        inconsistent: None,
    }));
    // background prefetch: a list starts now, while the mount is built
    let prefetch_cancel = Cancel::new();
    // the start set waits for the mount: its CPU goes to building it, and
    // the link is idle after it (while the container is created); so does
    // a list whose files are placed first: their bytes stream in already,
    // only checking and storing them waits (a fifth of a loopback rpull)
    let (mounted_tx, mounted_rx) = std::sync::mpsc::channel::<()>();
    let after_mount = start || !early.is_empty();
    if opts.prefetch != Prefetch::None {
        let fetcher = fetcher.clone();
        let prefetch = opts.prefetch;
        let state = state.clone();
        let store = store.clone();
        let source = source.clone();
        let name = name.to_string();
        let pull = opts.pull.clone();
        let cancel = prefetch_cancel.clone();
        let events = events.clone();
        std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || {
                if after_mount && mounted_rx.recv().is_err() {
                    // not mounted after all
                    return;
                }
                prefetch_thread(
                    fetcher, prefetch, wanted, start, runtime, state, store, source, name, pull,
                    cancel, events, early,
                )
            })
            .map_err(io("starting the prefetch thread".into()))?;
    }
    let recorder = opts.record.as_ref().map(|_| Arc::new(Recorder::default()));
    let cfg = MountConfig {
        passthrough: opts.passthrough,
        threads: 2,
        read_workers: 2 * opts.fetch_jobs.max(1),
        recorder: recorder.clone(),
        fsname: format!("strata-lazy-data:{digest}"),
        opens: Arc::new(AtomicU64::new(0)),
        all_local: Arc::new(AtomicBool::new(false)),
    };
    // composefs: the tree as EROFS over [objects/, FUSE of missing contents]
    let erofs = mdir.join("image.erofs");
    let tmp = mdir.join("image.erofs.tmp");
    let built = image
        .join()
        .unwrap_or_else(|_| Err(panicked("building the EROFS image")));
    let staged = built.and_then(|(bytes, took)| {
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &erofs))
            .map(|()| took)
            .map_err(io(format!("writing {}", erofs.display())))
    });
    let took = match staged {
        Ok(took) => took,
        Err(e) => {
            prefetch_cancel.cancel();
            remove_leftovers(&mdir);
            return Err(e);
        }
    };
    tracing::info!(
        "tree from the TOCs in {:.0} ms, its EROFS image in {:.0} ms (alongside), written at {:.0} ms",
        prepared.as_secs_f64() * 1000.0,
        took.as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0
    );
    // the FUSE data layer; a killed daemon's dead one may still be there
    let data = mdir.join("data");
    let _ = strata_sys::unmount_detach(&data);
    let fail = |e: LazyError| {
        prefetch_cancel.cancel();
        remove_leftovers(&mdir);
        e
    };
    let data = std::fs::create_dir_all(&data)
        .and_then(|()| data.canonicalize())
        .map_err(io(format!("creating {}", data.display())))
        .map_err(fail)?;
    let session = LazyFs::new(fetcher.clone(), &cfg)
        .mount(&data, &cfg)
        .map_err(io(format!("mounting FUSE at {}", data.display())))
        .map_err(fail)?;
    // recording needs every open: then the FUSE layer is the only data layer
    // (it serves local contents too)
    let mut data_dirs = vec![verified, data.clone()];
    if opts.record.is_some() {
        data_dirs.remove(0);
    }
    let m = strata_sys::OverlayMount {
        dirs_above: Vec::new(),
        layers: vec![erofs],
        data_dirs,
        upper: None,
        verity_require: false,
        source: format!("{SOURCE_PREFIX}{digest}"),
    };
    let undo = |session: fuser::BackgroundSession| {
        let _ = strata_sys::unmount_detach(&data);
        let _ = session.join();
    };
    if let Err(e) = strata_sys::mount_overlay(&m, target) {
        undo(session);
        return Err(fail(e.into()));
    }
    let _ = mounted_tx.send(());
    let saved = {
        // the counts here are from before the prefetch: a prefetch that
        // already moved on is saved as still on its list until the
        // monitor saves it with counts taken after it (a state never says
        // done with counts from before)
        let mut st = state.lock().expect("no panics while held").clone();
        if st.prefetch != PrefetchState::None {
            st.prefetch = PrefetchState::List;
            st.prefetch_error = None;
            st.complete = false;
        }
        st.save(&mdir)
    };
    let _ = std::fs::remove_file(mdir.join(BUILDING));
    if let Err(e) = saved {
        // nothing may stay mounted when the caller is told it failed
        let _ = strata_sys::unmount_detach(target);
        undo(session);
        return Err(fail(LazyError::Io {
            what: format!("saving the state of {}", target.display()),
            source: e,
        }));
    }
    // what building the tree and its EROFS image freed goes back to the
    // kernel (the daemon's malloc keeps it otherwise: strata_sys::malloc)
    // at the first quiet period, not now: trimming takes 10-15 ms of CPU
    // while the container this mount was made for starts
    let done = Arc::new(AtomicBool::new(false));
    let updater = {
        let u = Updater {
            done: done.clone(),
            fetcher,
            lazy: lazy.clone(),
            mdir: mdir.clone(),
            record: opts.record.clone().zip(recorder.clone()),
            opens: cfg.opens.clone(),
            all_local: cfg.all_local.clone(),
            target: target.to_path_buf(),
            data: data.clone(),
            state: state.clone(),
        };
        std::thread::Builder::new()
            .name("lazy-state".into())
            .spawn(move || u.run())
            .map_err(io("starting the state thread".into()))?
    };
    Ok(LazyMount {
        target: target.to_path_buf(),
        mdir,
        manifest_digest: digest,
        to_fetch,
        files_total,
        toc_bytes: lazy.downloaded,
        session: Some(session),
        data,
        state,
        done,
        updater: Some(updater),
        record: opts.record.clone().zip(recorder),
        image: lazy,
        prefetch_cancel,
        _lease: lease,
    })
}

#[allow(clippy::too_many_arguments)]
fn prefetch_thread(
    fetcher: Arc<Fetcher>,
    prefetch: Prefetch,
    wanted: Vec<Digest>,
    start: bool,
    runtime: Vec<Digest>,
    state: Arc<Mutex<MountState>>,
    store: Arc<Store>,
    source: Arc<dyn ImageSource>,
    name: String,
    pull: PullOptions,
    cancel: Cancel,
    events: Arc<dyn EventSink>,
    early: crate::early::EarlyRuns,
) {
    let set = |s: PrefetchState, err: Option<String>, complete: bool| {
        // under the state's lock: a saved state never says complete with
        // the prefetch still running
        let mut st = state.lock().expect("no panics while held");
        st.prefetch = s;
        st.prefetch_error = err;
        st.complete |= complete;
    };
    let ctl = Ctl::new(events.as_ref(), &cancel);
    ctl.emit(Event::Started {
        op: Op::Prefetch,
        subject: name.clone(),
    });
    set(PrefetchState::List, None, false);
    let mut list_error = None;
    // (the start set's few files are stored in the background: a sync per
    // request there slowed what runs beside it, containerd's calls too)
    let listed = std::thread::scope(|s| {
        // the runtime's few files beside the list (they are elsewhere in
        // their layer, behind its files placed first), served at once
        if !runtime.is_empty() {
            let (fetcher, runtime) = (&fetcher, &runtime);
            s.spawn(move || {
                if let Err(e) = fetcher.fetch_many_deferred(runtime, ctl) {
                    tracing::debug!("prefetching what the runtime reads: {e}");
                }
            });
        }
        match start {
            true => fetcher.fetch_many_deferred(&wanted, ctl),
            false => fetcher.fetch_many(&wanted, ctl),
        }
    });
    // what was streamed ahead for the list is freed (and stops)
    drop(early);
    // the start set's command brings its libraries (a list holds them)
    for d in wanted.iter().filter(|_| start) {
        let deps = fetcher.deps_to_prefetch(d);
        if !deps.is_empty() {
            fetcher.fetch_deps(d, deps);
        }
    }
    match listed {
        Ok(n) if start => tracing::info!("prefetched {n} files a program loads first"),
        Ok(n) => tracing::info!("prefetched {n} files of the list"),
        Err(ReadError::Cancelled) => {
            tracing::info!("prefetch cancelled during the list");
            set(PrefetchState::Failed, Some("cancelled".into()), false);
            return;
        }
        Err(e) => {
            tracing::error!("prefetch of the list failed: {e}");
            list_error = Some(format!("prefetch of the list: {e}"));
        }
    }
    if prefetch != Prefetch::All {
        // a list that failed is said so, not reported done
        match list_error {
            Some(e) => set(PrefetchState::Failed, Some(e), false),
            None => set(PrefetchState::Done, None, false),
        }
        ctl.emit(Event::Finished { op: Op::Prefetch });
        return;
    }
    // give way to reads: start once they have fetched nothing for a
    // second (at most 30 s after the list)
    let t = Instant::now();
    while fetcher.idle_for() < Duration::from_secs(1)
        && t.elapsed() < Duration::from_secs(30)
        && !cancel.is_cancelled()
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    set(PrefetchState::All, None, false);
    match pull_from(&store, source.as_ref(), &name, &pull, ctl) {
        Ok(s) => {
            tracing::info!(
                "prefetch done: {name} is pulled ({} downloaded by the pull); later mounts use the composefs path",
                strata_ops::human_bytes(s.bytes_downloaded)
            );
            set(PrefetchState::Done, None, true);
            ctl.emit(Event::Finished { op: Op::Prefetch });
        }
        Err(e) => {
            tracing::error!("prefetch (pull of {name}) failed: {e}");
            set(PrefetchState::Failed, Some(e.to_string()), false);
        }
    }
}

/// Keeps the state file current until the target is unmounted.
struct Updater {
    done: Arc<AtomicBool>,
    fetcher: Arc<Fetcher>,
    lazy: Arc<LazyImage>,
    mdir: PathBuf,
    record: Option<(PathBuf, Arc<Recorder>)>,
    opens: Arc<AtomicU64>,
    all_local: Arc<AtomicBool>,
    target: PathBuf,
    data: PathBuf,
    state: Arc<Mutex<MountState>>,
}

impl Updater {
    fn run(self) {
        let mut heartbeat = Heartbeat::new(&self.mdir.join(RECEIVED));
        // re-check only what is still missing, and only when something may
        // have arrived (reads completed files, prefetch running) or every
        // 5 s: stat'ing every object each tick cost reads CPU
        let is_missing = |d: &Digest| !self.fetcher.is_local(d);
        let mut missing: Vec<Digest> = self
            .lazy
            .contents()
            .into_iter()
            .filter(is_missing)
            .collect();
        let mut seen_done = u64::MAX;
        let mut layers_seen = u64::MAX;
        let mut last_check = Instant::now();
        let lazy_layers = self
            .lazy
            .layers
            .iter()
            .filter(|l| l.index.is_some())
            .count();
        let mut checked = 0;
        let mut last_full = Instant::now();
        let mut last_prefetch = PrefetchState::None;
        let mut quiet = Quiet::new(self.activity(), Instant::now());
        while !self.done.load(Ordering::SeqCst) {
            // unmounted (by umount(8) too): stop serving the data layer
            let mounted = strata_sys::mounts()
                .map(|ms| ms.iter().any(|m| m.mount_point == self.target))
                .unwrap_or(true);
            if !mounted {
                tracing::info!("{} is unmounted: stopping", self.target.display());
                match strata_sys::unmount_detach(&self.data) {
                    // `strata umount` got there first
                    Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => {}
                    Err(e) => tracing::error!("unmounting the data layer: {e}"),
                }
            }
            // files checked, and files the background moved into the store
            let completed = self.fetcher.stats.files_completed.load(Ordering::Relaxed)
                + self.fetcher.committed();
            // the prefetch state is read before the counts: a state saved
            // as done then carries counts taken after the prefetch ended
            // the prefetch's state, read before the counts: the state saved
            // carries this reading, so it never says done (or complete)
            // with counts taken before the prefetch ended
            let (prefetch, prefetch_error, complete) = {
                let st = self.state.lock().expect("no panics while held");
                (st.prefetch, st.prefetch_error.clone(), st.complete)
            };
            if !missing.is_empty()
                && (completed != seen_done
                    || prefetch.is_busy()
                    || prefetch != last_prefetch
                    || last_full.elapsed() > Duration::from_secs(5))
            {
                missing.retain(is_missing);
                seen_done = completed;
                last_full = Instant::now();
            }
            // a layer whose files are all in the store: its rebuilt tar
            // against its diff_id (once; again when more files arrived)
            if (completed != layers_seen || last_check.elapsed() > Duration::from_secs(5))
                && checked < lazy_layers
                && self.fetcher.inconsistent().is_none()
            {
                layers_seen = completed;
                last_check = Instant::now();
                match self.fetcher.check_layers() {
                    Ok(n) => checked = n,
                    Err(e) => tracing::error!("{e}"),
                }
            }
            last_prefetch = prefetch;
            if missing.is_empty() && !self.all_local.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    "every file is local: the kernel reads them from the store without the daemon (files opened before: by inode, no opens)"
                );
            }
            {
                let mut st = self.state.lock().expect("no panics while held");
                st.files_local = st.files_total.saturating_sub(missing.len() as u64);
                st.bytes_fetched =
                    self.lazy.downloaded + self.fetcher.stats.bytes_fetched.load(Ordering::Relaxed);
                st.errors = self.fetcher.stats.errors.load(Ordering::Relaxed);
                st.files_for_programs = self.fetcher.stats.deps_fetched.load(Ordering::Relaxed);
                st.opens = self.opens.load(Ordering::Relaxed);
                st.inconsistent = self.fetcher.inconsistent();
                let mut saved = st.clone();
                saved.prefetch = prefetch;
                saved.prefetch_error = prefetch_error;
                saved.complete = complete;
                let _ = saved.save(&self.mdir);
            }
            if let Some((path, rec)) = &self.record {
                let _ = write_record(path, &rec.paths(&self.lazy.tree));
            }
            if !mounted {
                // what reads fetched reaches the store before the daemon goes
                self.fetcher.flush();
                return;
            }
            let (activity, idle) = (self.activity(), self.fetcher.idle_for());
            if quiet.tick(activity, idle, prefetch.is_busy(), Instant::now()) {
                let t = Instant::now();
                let released = strata_sys::malloc::trim();
                tracing::debug!(
                    "reads went quiet: malloc trimmed in {:.1} ms (released: {released})",
                    t.elapsed().as_secs_f64() * 1000.0
                );
            }
            heartbeat.beat_for(Duration::from_millis(500));
        }
    }

    /// Grows with every chunk fetched by reads and every file completed
    /// (by reads or the prefetch).
    fn activity(&self) -> u64 {
        let s = &self.fetcher.stats;
        s.chunks_fetched.load(Ordering::Relaxed) + s.files_completed.load(Ordering::Relaxed)
    }
}

/// When to give the memory a burst of fetches freed back to the kernel:
/// once per quiet period, after fetching went quiet for [`Quiet::AFTER`].
/// Fetch buffers are freed as soon as their chunks are written, but the
/// allocator keeps freed pages for reuse (jemalloc up to 10 s, purged only
/// as it allocates more; glibc's arenas until trimmed); trimming on every
/// tick would walk the arenas for nothing, trimming never keeps a burst's
/// peak for the mount's life. A second of quiet is enough: a trim is cheap
/// (well under a millisecond for a daemon's few arenas) but the first,
/// after building the mount freed its tree, takes 10-15 ms.
struct Quiet {
    /// Activity when last trimmed; none before the first trim (what
    /// building the mount freed waits for the first quiet period).
    trimmed: Option<u64>,
    /// Activity seen last, and since when.
    seen: u64,
    since: Instant,
}

impl Quiet {
    const AFTER: Duration = Duration::from_secs(1);

    fn new(activity: u64, now: Instant) -> Self {
        Quiet {
            trimmed: None,
            seen: activity,
            since: now,
        }
    }

    /// Whether to trim now: something was fetched since the last trim, and
    /// nothing for [`Quiet::AFTER`] (by the counters, and by the fetcher's
    /// own clock of read fetches), and no prefetch is running.
    fn tick(
        &mut self,
        activity: u64,
        fetcher_idle: Duration,
        prefetch_busy: bool,
        now: Instant,
    ) -> bool {
        if activity != self.seen {
            self.seen = activity;
            self.since = now;
        }
        if self.trimmed == Some(activity)
            || prefetch_busy
            || fetcher_idle < Self::AFTER
            || now.saturating_duration_since(self.since) < Self::AFTER
        {
            return false;
        }
        self.trimmed = Some(activity);
        true
    }
}

impl LazyMount {
    /// Where it is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The image's manifest digest.
    pub fn manifest_digest(&self) -> Digest {
        self.manifest_digest
    }

    /// Contents that were missing when mounted, and contents in all.
    pub fn files_to_fetch(&self) -> (u64, u64) {
        (self.to_fetch, self.files_total)
    }

    /// Bytes of TOCs and tar-splits read to mount it.
    pub fn toc_bytes(&self) -> u64 {
        self.toc_bytes
    }

    /// Where its state, log and staging live.
    pub fn mount_dir(&self) -> &Path {
        &self.mdir
    }

    /// Its state now.
    pub fn status(&self) -> MountState {
        self.state.lock().expect("no panics while held").clone()
    }

    /// Serve until the target is unmounted (by [`LazyMount::unmount`] from
    /// another handle, `strata umount` or umount(8)); then write the record
    /// and remove the staging.
    pub fn wait(mut self) -> Result<(), LazyError> {
        let session = self
            .session
            .take()
            .expect("a mount has a session until it ends");
        let r = session.join();
        self.finish()?;
        r.map_err(|e| LazyError::Io {
            what: "serving the FUSE mount".into(),
            source: e,
        })
    }

    /// Unmount (the target, then the data layer) and stop serving.
    pub fn unmount(mut self) -> Result<(), LazyError> {
        match strata_sys::unmount(&self.target) {
            Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let _ = strata_sys::unmount_detach(&self.data);
        if let Some(s) = self.session.take() {
            let _ = s.join();
        }
        self.finish()
    }

    fn finish(&mut self) -> Result<(), LazyError> {
        self.prefetch_cancel.cancel();
        self.done.store(true, Ordering::SeqCst);
        if let Some(u) = self.updater.take() {
            let _ = u.join();
        }
        let r = match &self.record {
            Some((path, rec)) => {
                write_record(path, &rec.paths(&self.image.tree)).map_err(|e| LazyError::Io {
                    what: format!("writing {}", path.display()),
                    source: e,
                })
            }
            None => Ok(()),
        };
        tracing::info!("unmounted {}", self.target.display());
        remove_leftovers(&self.mdir);
        r
    }
}

impl Drop for LazyMount {
    fn drop(&mut self) {
        if self.session.is_some() {
            // dropped while serving: the owner is gone, so is the mount
            let _ = strata_sys::unmount_detach(&self.target);
            let _ = strata_sys::unmount_detach(&self.data);
            if let Some(s) = self.session.take() {
                let _ = s.join();
            }
            let _ = self.finish();
        }
    }
}

/// Staging, state and EROFS image of a lazy mount that is gone.
fn remove_leftovers(mdir: &Path) {
    let _ = std::fs::remove_dir_all(mdir.join("partial"));
    let _ = std::fs::remove_dir_all(mdir.join("verified"));
    let _ = std::fs::remove_file(mdir.join("state.json"));
    let _ = std::fs::remove_file(mdir.join("image.erofs"));
    let _ = std::fs::remove_file(mdir.join("image.erofs.tmp"));
    let _ = std::fs::remove_file(mdir.join(BUILDING));
    // (a daemon killed between writing the mark aside and renaming it)
    let _ = std::fs::remove_file(mdir.join(BUILDING).with_extension("tmp"));
}

/// In a lazy mount's state directory: the pid of the daemon building the
/// mount, from the check of the image's TOCs and tar-splits until the
/// mount's state is saved.
const BUILDING: &str = "building";

/// The daemon building the lazy mount at `target` (canonical), if one is
/// (alive, and the mount not made yet).
pub fn builder(store_root: &Path, target: &Path) -> Option<u32> {
    building_pid(&mount_dir(store_root, target))
}

/// [`builder`] of the mount whose state directory is `mdir`.
fn building_pid(mdir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(mdir.join(BUILDING))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (pid != std::process::id() && strata_sys::daemon::alive(pid)).then_some(pid)
}

/// Wait, at most `limit`, while a daemon builds the lazy mount at `target`
/// (canonical): until the mount is made or the daemon has gone. Whether
/// one was building it; `Err` names the daemon still building after
/// `limit`.
pub fn wait_built(store_root: &Path, target: &Path, limit: Duration) -> Result<bool, String> {
    let Some(pid) = builder(store_root, target) else {
        return Ok(false);
    };
    let until = Instant::now() + limit;
    loop {
        if strata_sys::is_mount_point(target).unwrap_or(false)
            || builder(store_root, target).is_none()
        {
            return Ok(true);
        }
        if Instant::now() >= until {
            return Err(format!(
                "the daemon (pid {pid}) building the lazy mount at {} has not made it in {limit:?}",
                target.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A daemon of an earlier lazy mount at `target` that is still ending (it
/// notices an umount(8) within half a second) would remove this mount's
/// files as it exits: wait for it, a little.
fn wait_for_earlier_daemon(mdir: &Path, target: &Path) -> Result<(), LazyError> {
    let Ok(prev) = MountState::load(mdir) else {
        return Ok(());
    };
    if prev.pid != std::process::id()
        && !strata_sys::daemon::wait_gone(prev.pid, Duration::from_secs(3))
    {
        return Err(LazyError::Busy(format!(
            "the daemon (pid {}) of an earlier lazy mount at {} still runs",
            prev.pid,
            target.display()
        )));
    }
    Ok(())
}

fn write_record(path: &Path, paths: &[Vec<u8>]) -> std::io::Result<()> {
    let mut s = Vec::new();
    for p in paths {
        s.push(b'/');
        s.extend_from_slice(p);
        s.push(b'\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, s)?;
    std::fs::rename(tmp, path)
}

fn status_of(s: &MountState, mounted: &[strata_sys::MountInfo]) -> MountStatus {
    let alive = strata_sys::daemon::alive(s.pid);
    let is_mounted = mounted
        .iter()
        .any(|m| m.mount_point == s.dir && m.source.starts_with(SOURCE_PREFIX));
    match (alive, is_mounted) {
        (true, true) => MountStatus::Serving,
        (false, true) => MountStatus::Stale,
        (_, false) => MountStatus::NotMounted,
    }
}

/// Every lazy mount on record in the store at `root`.
pub fn list(root: &Path) -> Vec<MountRecord> {
    let mounted = strata_sys::mounts().unwrap_or_default();
    MountState::all(root)
        .into_iter()
        .map(|(_, state)| MountRecord {
            status: status_of(&state, &mounted),
            state,
        })
        .collect()
}

/// The file a lazy mount's daemon keeps the time it last received bytes
/// from its registry in (milliseconds since the Unix epoch, 8 bytes
/// little-endian): [`received_since`].
const RECEIVED: &str = "received";

/// Keeps [`RECEIVED`] saying when this process last received bytes from
/// a registry (`strata_oci::registry::last_received`), on the state
/// thread: every 10 ms while bytes arrive, at each state tick when none
/// have for a second.
struct Heartbeat {
    file: Option<std::fs::File>,
    said: u64,
    changed: Instant,
}

impl Heartbeat {
    fn new(path: &Path) -> Heartbeat {
        Heartbeat {
            file: std::fs::File::create(path)
                .inspect_err(|e| tracing::warn!("no heartbeat file {}: {e}", path.display()))
                .ok(),
            said: 0,
            changed: Instant::now(),
        }
    }

    /// Wait `d`, saying what arrives meanwhile.
    fn beat_for(&mut self, d: Duration) {
        let until = Instant::now() + d;
        loop {
            let at = strata_oci::registry::last_received()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as u64);
            if at != self.said
                && let Some(f) = &self.file
            {
                use std::os::unix::fs::FileExt;
                if f.write_at(&at.to_le_bytes(), 0).is_ok() {
                    self.said = at;
                    self.changed = Instant::now();
                }
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            let step = match self.changed.elapsed() < Duration::from_secs(1) {
                true => Duration::from_millis(10),
                false => until - now,
            };
            std::thread::sleep(step.min(until - now));
        }
    }
}

/// Whether the daemon of the lazy mount at `target` received bytes from
/// its registry after `since` (a later millisecond): proof that the
/// registry answered since then, as a probe of it would be.
pub fn received_since(root: &Path, target: &Path, since: SystemTime) -> bool {
    let Ok(b) = std::fs::read(mount_dir(root, target).join(RECEIVED)) else {
        return false;
    };
    let Ok(ms) = <[u8; 8]>::try_from(b.as_slice()).map(u64::from_le_bytes) else {
        return false;
    };
    let since = since
        .duration_since(UNIX_EPOCH)
        .map_or(u64::MAX, |d| d.as_millis() as u64);
    ms > since
}

/// The lazy mount on record at `target` (a canonical path), served by
/// whichever process: how a restarted manager finds the mounts it started.
pub fn attach(root: &Path, target: &Path) -> Result<MountRecord, LazyError> {
    let state = MountState::load(&mount_dir(root, target)).map_err(|e| LazyError::Io {
        what: format!(
            "reading the state of the lazy mount at {}",
            target.display()
        ),
        source: e,
    })?;
    let mounted = strata_sys::mounts()?;
    Ok(MountRecord {
        status: status_of(&state, &mounted),
        state,
    })
}

/// After the lazy mount at `target` was unmounted: detach its data layer
/// (ending its daemon's FUSE session, a killed daemon's dead one too), let
/// its daemon finish (or kill it when it hangs), drop its state and
/// staging.
pub fn cleanup(root: &Path, target: &Path) -> Result<(), LazyError> {
    let mdir = mount_dir(root, target);
    let r = match strata_sys::unmount_detach(&mdir.join("data")) {
        // the daemon got there first, or never mounted it
        Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => Ok(()),
        Err(e) => Err(e.into()),
    };
    if let Ok(s) = MountState::load(&mdir) {
        strata_sys::daemon::stop(s.pid, Duration::from_secs(5));
    }
    remove_leftovers(&mdir);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_received_after_a_moment_are_told_by_the_mounts_file() {
        let root = tempfile::tempdir().unwrap();
        let target = Path::new("/mnt/some/where");
        let since = SystemTime::now();
        // no daemon said anything: not received
        assert!(!received_since(root.path(), target, since));
        let mdir = mount_dir(root.path(), target);
        std::fs::create_dir_all(&mdir).unwrap();
        let say = |t: SystemTime| {
            let ms = t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
            std::fs::write(mdir.join(RECEIVED), ms.to_le_bytes()).unwrap();
        };
        // bytes from before, or from the same millisecond: not proof
        say(since - Duration::from_millis(50));
        assert!(!received_since(root.path(), target, since));
        say(since);
        assert!(!received_since(root.path(), target, since));
        // after: proof
        say(since + Duration::from_millis(2));
        assert!(received_since(root.path(), target, since));
        // another mount's file says nothing of this one
        assert!(!received_since(root.path(), Path::new("/mnt/other"), since));
        // a torn or foreign file: not proof
        std::fs::write(mdir.join(RECEIVED), b"12345").unwrap();
        assert!(!received_since(root.path(), target, since));
    }

    #[test]
    fn trims_once_per_quiet_period() {
        let t0 = Instant::now();
        // in tenths of Quiet::AFTER
        let after = Quiet::AFTER;
        let at = |tenths: u32| t0 + after * tenths / 10;
        let idle = after * 60;
        let mut q = Quiet::new(3, t0);
        // what building the mount freed: once its first AFTER is quiet
        assert!(!q.tick(3, idle, false, at(5)));
        assert!(!q.tick(3, idle, true, at(20)));
        assert!(q.tick(3, idle, false, at(20)));
        // nothing fetched since: never again
        assert!(!q.tick(3, idle, false, at(100)));
        // a burst: not while it goes on, nor within AFTER of its end
        assert!(!q.tick(10, Duration::ZERO, false, at(110)));
        assert!(!q.tick(20, Duration::ZERO, false, at(120)));
        assert!(!q.tick(20, after * 6 / 10, false, at(126)));
        // the fetcher says it fetched recently: wait
        assert!(!q.tick(20, after * 8 / 10, false, at(135)));
        assert!(q.tick(20, idle, false, at(135)));
        // once
        assert!(!q.tick(20, idle, false, at(300)));
        // a prefetch running holds it off until it is over
        assert!(!q.tick(25, idle, true, at(310)));
        assert!(!q.tick(25, idle, true, at(400)));
        assert!(q.tick(25, idle, false, at(410)));
    }
}
