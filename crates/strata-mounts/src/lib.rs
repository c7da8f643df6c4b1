//! The mounts strata made, whatever their kind, as one list and one
//! unmount:
//!
//! ```text
//! kind     mount source        made by                         after unmounting
//! image    strata:<digest>     Store::mount_image (composefs)  nothing
//! lazy     strata-lazy:...     strata_lazy::mount (FUSE data)  strata_lazy::cleanup
//! served   strata-rootfs:...   strata_block::served::serve     strata_block::served::cleanup
//! ```
//!
//! [`list`] gives the lazy mounts and served templates on record in a store
//! with whether their daemon still serves them; [`unmount`] refuses mounts
//! strata did not make, unmounts and does the cleanup of the kind. The CLI
//! (`strata mounts`, `strata umount`) and a snapshotter share these.
//!
//! What this crate does not do: mount (see [`strata_store::Store::mount_image`],
//! [`strata_lazy::mount`], [`strata_block::served::serve`]), print.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use strata_block::served::{self, Dropped, ServeRecord, ServeStatus};
use strata_lazy::{MountRecord, MountStatus};
use strata_ops::human_bytes;
use strata_sys::MountError;

/// What kind of mount strata made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A composefs mount of a stored image.
    Image,
    /// A lazy mount (served by a FUSE daemon).
    Lazy,
    /// A template served as a file.
    Served,
}

impl Kind {
    /// The kind of a mount with this mountinfo source, `None` for mounts
    /// strata did not make.
    pub fn of_source(source: &str) -> Option<Kind> {
        if source.starts_with(strata_lazy::mount::SOURCE_PREFIX) {
            Some(Kind::Lazy)
        } else if source.starts_with(served::SOURCE_PREFIX) {
            Some(Kind::Served)
        } else if source.starts_with("strata:") {
            Some(Kind::Image)
        } else {
            None
        }
    }
}

/// Why [`unmount`] failed.
#[derive(Debug, thiserror::Error)]
pub enum UnmountError {
    /// The path cannot be resolved.
    #[error("resolving {}: {source}", path.display())]
    Resolve {
        /// The path as given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Nothing is mounted there.
    #[error("{} is not a mount point", .0.display())]
    NotMounted(PathBuf),
    /// Something else than strata mounted it.
    #[error("{} is a {fs_type} mount of {mount_source:?}, not one strata made; use umount(8)", target.display())]
    Foreign {
        /// The mount point.
        target: PathBuf,
        /// Its filesystem type.
        fs_type: String,
        /// Its mount source.
        mount_source: String,
    },
    /// Reading mountinfo or unmounting failed (busy, ...).
    #[error(transparent)]
    Mount(#[from] MountError),
}

impl strata_ops::HasKind for UnmountError {
    fn kind(&self) -> strata_ops::ErrorKind {
        use strata_ops::ErrorKind as K;
        match self {
            UnmountError::Resolve { source, .. } => K::of_io(source),
            UnmountError::NotMounted(_) => K::NotFound,
            UnmountError::Foreign { .. } => K::InvalidInput,
            UnmountError::Mount(MountError::Busy(_)) => K::Busy,
            UnmountError::Mount(MountError::NotMounted(_)) => K::NotFound,
            UnmountError::Mount(_) => K::Internal,
        }
    }
}

/// What [`unmount`] did.
#[derive(Debug)]
pub struct Unmounted {
    /// The mount point (or served file), canonical.
    pub target: PathBuf,
    /// What it was.
    pub kind: Kind,
    /// For a served file: the writes dropped with it.
    pub dropped: Option<Dropped>,
    /// Cleanup that failed after the unmount itself worked (the mount is
    /// gone; leftovers stay in the store).
    pub cleanup_error: Option<String>,
}

impl Unmounted {
    /// What people should know: writes dropped, cleanup that failed.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self.cleanup_error.iter().cloned().collect();
        if let Some(d) = self.dropped.filter(|d| d.written > d.committed) {
            w.push(format!(
                "dropped the writes to {} since {} (chunks written: {}, committed: {})",
                self.target.display(),
                if d.committed > 0 {
                    "the last commit"
                } else {
                    "it was served"
                },
                d.written,
                d.committed
            ));
        }
        w
    }
}

impl fmt::Display for Unmounted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unmounted {}", self.target.display())
    }
}

/// Unmount `path`, a mount strata made in the store at `root` (a mount
/// point, or a served file), and clean up after it: a lazy mount's data
/// layer and daemon, a served file's daemon and record (its writes not
/// committed are dropped, see [`Unmounted::warnings`]).
pub fn unmount(root: &Path, path: &Path) -> Result<Unmounted, UnmountError> {
    // a FUSE mount whose daemon died cannot be stat'ed: resolve the parent
    let target = served::canonical(path).map_err(|source| UnmountError::Resolve {
        path: path.to_path_buf(),
        source,
    })?;
    let mounts = strata_sys::mounts()?;
    let Some(m) = mounts.iter().rev().find(|m| m.mount_point == target) else {
        return Err(UnmountError::NotMounted(target));
    };
    let Some(kind) = Kind::of_source(&m.source) else {
        return Err(UnmountError::Foreign {
            target,
            fs_type: m.fs_type.clone(),
            mount_source: m.source.clone(),
        });
    };
    strata_sys::unmount(&target)?;
    let mut done = Unmounted {
        target,
        kind,
        dropped: None,
        cleanup_error: None,
    };
    match kind {
        Kind::Image => {}
        Kind::Lazy => {
            done.cleanup_error = strata_lazy::cleanup(root, &done.target)
                .err()
                .map(|e| e.to_string());
        }
        Kind::Served => done.dropped = Some(served::cleanup(root, &done.target)),
    }
    Ok(done)
}

/// A lazy mount or served template on record, as [`list`] gives it.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A lazy mount.
    Lazy(MountRecord),
    /// A served template.
    Served(ServeRecord),
}

const STALE: &str = "stale (daemon gone: `strata umount` cleans it)";

impl Entry {
    /// Whether it is served, in words (with what to do when stale).
    pub fn status(&self) -> &'static str {
        match self {
            Entry::Lazy(r) => match r.status {
                MountStatus::Serving => "serving",
                MountStatus::Stale => STALE,
                MountStatus::NotMounted => "not mounted",
            },
            Entry::Served(r) => match r.status {
                ServeStatus::Serving => "serving",
                ServeStatus::Stale => STALE,
                ServeStatus::NotServed => {
                    "not served (written chunks kept for `strata rootfs commit`)"
                }
            },
        }
    }
}

/// Its state, `kind` (`lazy` or `rootfs`) and `status` (in words).
impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Row<'a, T> {
            #[serde(flatten)]
            state: &'a T,
            kind: &'static str,
            status: &'static str,
        }
        let status = self.status();
        match self {
            Entry::Lazy(r) => Row {
                state: &r.state,
                kind: "lazy",
                status,
            }
            .serialize(s),
            Entry::Served(r) => Row {
                state: &r.state,
                kind: "rootfs",
                status,
            }
            .serialize(s),
        }
    }
}

/// One line: where, what, progress, status, daemon pid.
impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Served(r) => {
                let s = &r.state;
                write!(
                    f,
                    "{}  rootfs {}  {}  {} of {} chunks read, {} fetched ({}){}  {}  pid {}",
                    s.file.display(),
                    s.name,
                    human_bytes(s.size),
                    s.chunks_read,
                    s.chunks_total,
                    s.chunks_fetched,
                    human_bytes(s.bytes_fetched),
                    if s.writable {
                        format!(", {} written", s.dirty_chunks)
                    } else {
                        String::new()
                    },
                    self.status(),
                    s.pid
                )
            }
            Entry::Lazy(r) => {
                let s = &r.state;
                write!(
                    f,
                    "{}  {}  files {}/{} local  {} of {} fetched by reads  prefetch {}{}{}  {}  pid {}",
                    s.dir.display(),
                    s.reference,
                    s.files_local,
                    s.files_total,
                    human_bytes(s.bytes_fetched),
                    human_bytes(s.image_bytes),
                    s.prefetch.as_str(),
                    if s.complete { " (pulled)" } else { "" },
                    match &s.inconsistent {
                        Some(why) => format!("  INCONSISTENT (reads fail): {why}"),
                        None => String::new(),
                    },
                    self.status(),
                    s.pid
                )
            }
        }
    }
}

/// The lazy mounts and served templates on record in the store at `root`
/// (lazy mounts first). The served templates' numbers are fresh (see
/// [`strata_block::served::list`]).
pub fn list(root: &Path) -> Vec<Entry> {
    let lazy = strata_lazy::list(root).into_iter().map(Entry::Lazy);
    let served = served::list(root, true).into_iter().map(Entry::Served);
    lazy.chain(served).collect()
}
