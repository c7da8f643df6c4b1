//! A lazy mount served by the process that mounts it (`strata mount
//! --lazy`'s daemon, or its `--foreground` run; a snapshotter's child):
//! the steps between the caller's options and [`Serving::wait`].
//!
//! ```text
//! start: malloc for a daemon, log to stderr -> open the store (no lock:
//!   each operation takes it) -> registry options + the store's
//!   registries.json -> open the name (short names resolve) -> read the
//!   prefetch list -> mount (events to the log) -> Serving (its report)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use strata_oci::preresolved::Preresolved;
use strata_oci::short_names::open_name;
use strata_oci::{ImageRef, OciError, RegistryConfig};
use strata_store::{Store, StoreError};

use crate::{LazyError, LazyOptions, MountReport, Mounted};

/// What to serve.
pub struct DaemonRequest {
    /// The image as the user named it (see `strata_oci::short_names`).
    pub image: String,
    /// The mount point.
    pub target: PathBuf,
    /// How; `pull.registry` gets the store's `registries.json` added and
    /// a 10 s stall timeout (a stalled read fails and is retried).
    pub opts: LazyOptions,
    /// A file of paths (one per line) fetched first, read into
    /// `opts.prefetch_list`.
    pub prefetch_list_file: Option<PathBuf>,
    /// What the caller resolved the image to (`strata_oci::preresolved`):
    /// the registry is asked only for blobs. The image must be named by
    /// digest.
    pub resolved_file: Option<PathBuf>,
    /// Report the stage `checked` to the waiting parent once every TOC
    /// and tar-split is checked, before the mount is made
    /// (`strata_sys::daemon::report_stage`); the mount's own report
    /// follows.
    pub report_checked: bool,
}

/// The stage a daemon started with [`DaemonRequest::report_checked`]
/// reports before its mount is made: the image's TOCs and tar-splits are
/// fetched and checked.
pub const CHECKED: &str = "checked";

/// Why a lazy mount could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store did not open.
    #[error("opening store {}", root.display())]
    Store {
        /// The store.
        root: PathBuf,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The registry configuration is broken.
    #[error(transparent)]
    Config(OciError),
    /// The name does not open.
    #[error("opening {image}")]
    Open {
        /// As given.
        image: String,
        /// Why.
        #[source]
        source: OciError,
    },
    /// The prefetch list does not read.
    #[error("reading prefetch list {}", path.display())]
    PrefetchList {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mounting failed (`LazyError::NotLazy` with `Fallback::Fail`: it
    /// cannot be lazy).
    #[error("mounting {name} lazily")]
    Mount {
        /// The fully qualified reference.
        name: String,
        /// Why.
        #[source]
        source: LazyError,
    },
}

/// A lazy mount being served.
pub struct Serving {
    mounted: Mounted,
    report: MountReport,
}

impl Serving {
    /// What to tell people (and a waiting parent).
    pub fn report(&self) -> &MountReport {
        &self.report
    }

    /// Serve until unmounted (nothing to serve when the image was mounted
    /// the composefs way).
    pub fn wait(self) -> Result<(), LazyError> {
        match self.mounted {
            Mounted::Lazy(m) => m.wait(),
            _ => Ok(()),
        }
    }
}

/// Set up this process as a lazy mount's server and mount: call it before
/// any thread starts (malloc is tuned for a long-lived daemon).
pub fn start(root: &Path, req: DaemonRequest) -> Result<Serving, DaemonError> {
    strata_sys::malloc::tune_for_daemon();
    strata_ops::log::init();
    let store = Store::open(root).map_err(|source| DaemonError::Store {
        root: root.to_path_buf(),
        source,
    })?;
    let mut opts = req.opts;
    let config = RegistryConfig::load(root).map_err(DaemonError::Config)?;
    opts.pull.registry = opts.pull.registry.with_config(&config);
    opts.pull.registry.stall_timeout = Some(Duration::from_secs(10));
    let open_err = |source| DaemonError::Open {
        image: req.image.clone(),
        source,
    };
    let mut opened =
        open_name(&req.image, &opts.pull.registry, &opts.pull.platform).map_err(open_err)?;
    if let Some(path) = &req.resolved_file {
        let pinned = match &opened.reference {
            ImageRef::Docker {
                digest: Some(d), ..
            } => *d,
            _ => {
                return Err(open_err(OciError::Reference {
                    input: req.image.clone(),
                    reason: "an image handed over resolved must be named by digest".into(),
                }));
            }
        };
        opened.source =
            Box::new(Preresolved::read(opened.source, path, &pinned).map_err(open_err)?);
    }
    if let Some(path) = req.prefetch_list_file {
        let list = std::fs::read_to_string(&path)
            .map_err(|source| DaemonError::PrefetchList { path, source })?;
        opts.prefetch_list = Some(list);
    }
    let name = opened.reference.to_string();
    let events = Arc::new(strata_ops::log::LogEvents);
    let report_checked = req.report_checked;
    let mounted = crate::mount::mount_then(
        Arc::new(store),
        Arc::from(opened.source),
        &name,
        &req.target,
        &opts,
        events,
        &mut || {
            if report_checked {
                strata_sys::daemon::report_stage(CHECKED);
            }
        },
    )
    .map_err(|source| DaemonError::Mount {
        name: name.clone(),
        source,
    })?;
    let mut report = mounted.report(&name, &req.target);
    // how a short name resolved, for people
    report.notes.splice(0..0, opened.notes);
    tracing::info!("{}", report.message);
    Ok(Serving { mounted, report })
}
