//! `/etc/strata/config.toml`, the snapshotter's part: every key, its
//! default, and what a command line overrides.
//!
//! ```toml
//! [snapshotter]
//! # where snapshots and their records live; containerd's convention for a
//! # proxy snapshotter named "strata", so kubelet's image-filesystem stats
//! # see it (--root overrides)
//! root = "/var/lib/containerd/io.containerd.snapshotter.v1.strata"
//! # the unix socket containerd's [proxy_plugins.strata] address names
//! # (--socket overrides)
//! socket = "/run/strata/snapshotter.sock"
//! # strata's store the layers come from (default: ROOT/store); name the
//! # node's store (`strata`'s --root, /var/lib/strata) to keep one copy of
//! # every file for the CLI and containerd alike
//! # store = "/var/lib/strata"
//! # what lazy mounts of zstd:chunked images fetch in the background:
//! # "all" (the image's prefetch list first, if it has one, else what a
//! # program loads first: the image's command, the loader, libc and the
//! # small files a start reads; then the rest: the image ends fully
//! # pulled), "list" (only the list the image carries,
//! # `strata convert --prefetch-list`) or "none" (only what is read)
//! prefetch = "all"
//! # when a zstd:chunked image cannot be mounted lazily (its TOC fails its
//! # checks, the registry refuses range requests, FUSE is missing): "fail"
//! # (the pull fails, naming strata and why) or "pull" (it is pulled in
//! # full instead, every layer checked against its diff_id, with a
//! # warning). A registry that cannot be reached fails either way: a full
//! # pull needs it too.
//! lazy_fallback = "fail"
//! # a lazy mount's daemon is started ahead, with this much memory (MiB)
//! # made ready for the check of an image's TOCs and tar-splits (about
//! # 45 MiB for an image of 12,000 files); the first container of a lazy
//! # image then waits for neither. 0: none is started ahead
//! spare_mib = 48
//! # containerd's root: a Prepare of a layer containerd is pulling reads
//! # the image's manifest and config from containerd's content store
//! # there (checked against their digests) instead of asking the registry
//! # again; where they are missing, the registry is asked
//! containerd_root = "/var/lib/containerd"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The default config file.
pub const DEFAULT_CONFIG: &str = "/etc/strata/config.toml";
/// The default root.
pub const DEFAULT_ROOT: &str = "/var/lib/containerd/io.containerd.snapshotter.v1.strata";
/// The default socket.
pub const DEFAULT_SOCKET: &str = "/run/strata/snapshotter.sock";
/// containerd's default root.
pub const DEFAULT_CONTAINERD_ROOT: &str = "/var/lib/containerd";

/// The snapshotter's settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Snapshots and their records.
    #[serde(default = "default_root")]
    pub root: PathBuf,
    /// The socket to serve on.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// strata's store (default: `root/store`).
    #[serde(default)]
    pub store: Option<PathBuf>,
    /// Background fetching of lazy mounts: `all` or `none`.
    #[serde(default = "default_prefetch")]
    pub prefetch: Prefetch,
    /// What a lazy mount that cannot be made turns into.
    #[serde(default)]
    pub lazy_fallback: LazyFallback,
    /// Memory (MiB) the lazy mount daemon started ahead makes ready; 0:
    /// none is started ahead.
    #[serde(default = "default_spare_mib")]
    pub spare_mib: usize,
    /// containerd's root, whose content store holds the manifests and
    /// configs of the images containerd pulls.
    #[serde(default = "default_containerd_root")]
    pub containerd_root: PathBuf,
}

fn default_containerd_root() -> PathBuf {
    DEFAULT_CONTAINERD_ROOT.into()
}

fn default_spare_mib() -> usize {
    48
}

/// When a zstd:chunked image cannot be mounted lazily.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LazyFallback {
    /// The pull fails, naming why.
    #[default]
    Fail,
    /// The image is pulled in full (checked against its diff_ids).
    Pull,
}

/// What lazy mounts fetch in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefetch {
    /// Everything (the image ends fully pulled).
    All,
    /// The prefetch list the image carries.
    List,
    /// Only what is read.
    None,
}

impl Prefetch {
    /// As `strata mount --prefetch` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Prefetch::All => "all",
            Prefetch::List => "list",
            Prefetch::None => "none",
        }
    }
}

fn default_prefetch() -> Prefetch {
    Prefetch::All
}

fn default_root() -> PathBuf {
    DEFAULT_ROOT.into()
}

fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: default_root(),
            socket: default_socket(),
            store: None,
            prefetch: default_prefetch(),
            lazy_fallback: LazyFallback::Fail,
            spare_mib: default_spare_mib(),
            containerd_root: default_containerd_root(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    snapshotter: Option<Config>,
    // the other daemons' sections, read by them
    #[serde(default)]
    serve: Option<toml::Table>,
    #[serde(default)]
    limits: Option<toml::Table>,
}

impl Config {
    /// Read `path`; a missing file is the defaults only when `path` is
    /// the default one (a file named on the command line must exist).
    pub fn load(path: &Path, named: bool) -> Result<Config, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
                return Ok(Config::default());
            }
            Err(e) => return Err(format!("reading {}: {e}", path.display())),
        };
        let f: File =
            toml::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        let _ = (f.serve, f.limits);
        Ok(f.snapshotter.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keys_and_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        assert!(Config::load(&p, true).unwrap_err().contains("c.toml"));
        std::fs::write(&p, "[snapshotter]\nsocket = \"/x.sock\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.socket, PathBuf::from("/x.sock"));
        assert_eq!(c.root, PathBuf::from(DEFAULT_ROOT));
        std::fs::write(&p, "[snapshotter]\nstore = \"/var/lib/strata\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.store, Some(PathBuf::from("/var/lib/strata")));
        std::fs::write(&p, "[snapshotter]\nlazy_fallback = \"pull\"\n").unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.lazy_fallback, LazyFallback::Pull);
        assert_eq!(c.spare_mib, 48);
        assert_eq!(c.containerd_root, PathBuf::from("/var/lib/containerd"));
        std::fs::write(&p, "[snapshotter]\ncontainerd_root = \"/c\"\n").unwrap();
        assert_eq!(
            Config::load(&p, true).unwrap().containerd_root,
            PathBuf::from("/c")
        );
        std::fs::write(&p, "[snapshotter]\nspare_mib = 0\n").unwrap();
        assert_eq!(Config::load(&p, true).unwrap().spare_mib, 0);
        std::fs::write(&p, "[snapshotter]\nlazy_fallback = \"maybe\"\n").unwrap();
        let e = Config::load(&p, true).unwrap_err();
        assert!(e.contains("maybe"), "{e}");
        std::fs::write(&p, "[snapshotter]\nsokcet = \"/x.sock\"\n").unwrap();
        let e = Config::load(&p, true).unwrap_err();
        assert!(e.contains("sokcet"), "{e}");
    }
}
