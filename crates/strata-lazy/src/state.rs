//! Lazy mounts on record: `<store>/lazy/<id>/state.json`, rewritten by the
//! daemon as it works, read by `strata mounts` and `strata umount`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_digest::Digest;

/// What a lazy mount's background fetching does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrefetchState {
    /// Nothing: only what is read is fetched.
    None,
    /// Fetching the prefetch list.
    List,
    /// Pulling the whole image.
    All,
    /// Finished.
    Done,
    /// Failed (the reason is in [`MountState::prefetch_error`]).
    Failed,
}

impl PrefetchState {
    /// Whether it is fetching now.
    pub fn is_busy(self) -> bool {
        matches!(self, PrefetchState::List | PrefetchState::All)
    }

    /// Its name, as in the state file.
    pub fn as_str(self) -> &'static str {
        match self {
            PrefetchState::None => "none",
            PrefetchState::List => "list",
            PrefetchState::All => "all",
            PrefetchState::Done => "done",
            PrefetchState::Failed => "failed",
        }
    }
}

/// One lazy mount.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountState {
    /// The daemon's pid.
    pub pid: u32,
    /// Mount point.
    pub dir: PathBuf,
    /// What was mounted (as given).
    pub reference: String,
    /// Manifest digest.
    pub manifest_digest: Digest,
    /// The daemon's log file.
    pub log: PathBuf,
    /// Seconds since the epoch at mount.
    pub started: u64,
    /// Files with content in the image.
    pub files_total: u64,
    /// Of those, in the store.
    pub files_local: u64,
    /// Bytes fetched by reads (and TOCs).
    pub bytes_fetched: u64,
    /// Compressed bytes of the layers the store lacked at mount.
    pub image_bytes: u64,
    /// Failed fetches.
    pub errors: u64,
    /// Files fetched because a program read from the mount names them
    /// (its ELF interpreter and libraries) before anything opened them.
    #[serde(default)]
    pub files_for_programs: u64,
    /// What the background fetching does.
    pub prefetch: PrefetchState,
    /// Why the prefetch failed (with [`PrefetchState::Failed`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch_error: Option<String>,
    /// Whether the image is now recorded as pulled.
    pub complete: bool,
    /// Opens that reached the daemon's FUSE data layer (files missing
    /// when first opened; files in objects/ never reach it). Once every
    /// file is local the kernel opens files itself and this stops growing.
    #[serde(default)]
    pub opens: u64,
    /// Set when the mount's contents failed a layer's diff_id (the
    /// reason): the mount is inconsistent and its reads fail (EIO).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inconsistent: Option<String>,
}

/// The directory holding the lazy mount at `dir` (a canonical path).
pub fn mount_dir(store_root: &Path, dir: &Path) -> PathBuf {
    let key = strata_digest::Digest::sha256_of(dir.as_os_str().as_encoded_bytes());
    store_root.join("lazy").join(&key.hex()[..16])
}

impl MountState {
    /// Write atomically to `<mount dir>/state.json`.
    pub fn save(&self, mdir: &Path) -> io::Result<()> {
        fs::create_dir_all(mdir)?;
        let tmp = mdir.join("state.json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(io::Error::other)?)?;
        fs::rename(tmp, mdir.join("state.json"))
    }

    /// Read `<mount dir>/state.json`.
    pub fn load(mdir: &Path) -> io::Result<MountState> {
        let b = fs::read(mdir.join("state.json"))?;
        serde_json::from_slice(&b).map_err(io::Error::other)
    }

    /// Every lazy mount on record in the store.
    pub fn all(store_root: &Path) -> Vec<(PathBuf, MountState)> {
        let mut v = Vec::new();
        if let Ok(rd) = fs::read_dir(store_root.join("lazy")) {
            for e in rd.flatten() {
                if let Ok(s) = MountState::load(&e.path()) {
                    v.push((e.path(), s));
                }
            }
        }
        v.sort_by(|a, b| a.1.dir.cmp(&b.1.dir));
        v
    }
}
