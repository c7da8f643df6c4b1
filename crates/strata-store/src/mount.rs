//! Composefs mounts of stored images: one overlay whose lower layers are the
//! image's EROFS part(s) and whose data-only layer is `objects/`, read-only
//! or with a writable upper dir. The CLI's `strata mount` and a containerd
//! snapshotter mount images through [`Store::mount_image`] alike.
//!
//! The upper dir of a writable mount is kept, by default, in
//! `uppers/<image>-<mount point>/` (the first 16 hex digits of the manifest
//! digest and of the SHA-256 of the canonical mount point): mounting the
//! same image at the same place again finds the changes made before.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;
use strata_digest::Digest;
use strata_sys::{MountError, OverlayMount};

use crate::{SplitPolicy, Store, StoreError, composefs_source};

/// How to mount an image.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Writable: changes go to an upper dir (`upper`, else one kept in the
    /// store for this image and mount point).
    pub writable: bool,
    /// The directory holding `upper/` and `work/` (implies `writable`).
    pub upper: Option<PathBuf>,
    /// overlayfs `verity=require`: every object must have fs-verity with
    /// the digest the image records.
    pub verity: bool,
    /// How the image's EROFS tree is stored when it is built now.
    pub split: SplitPolicy,
}

/// A mounted image.
#[derive(Debug, Clone, Serialize)]
pub struct MountedImage {
    /// The image.
    pub manifest_digest: Digest,
    /// Its tree digest.
    pub tree_digest: Digest,
    /// Where it is mounted (canonical).
    pub mount_point: PathBuf,
    /// The upper dir of a writable mount.
    pub upper: Option<PathBuf>,
    /// Whether the image is stored as a shared base and an upper part.
    pub split: bool,
}

impl fmt::Display for MountedImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.upper.is_some() {
            "read-write"
        } else {
            "read-only"
        };
        write!(
            f,
            "mounted {} {mode} at {} (tree {})",
            self.manifest_digest,
            self.mount_point.display(),
            self.tree_digest
        )
    }
}

/// Why an image could not be mounted.
#[derive(Debug, thiserror::Error)]
pub enum MountImageError {
    /// Its EROFS image could not be built or read.
    #[error("preparing the EROFS image of {digest}: {source}")]
    Prepare {
        /// The image.
        digest: Digest,
        /// Why.
        source: StoreError,
    },
    /// The upper or work dir could not be made.
    #[error("creating {}: {source}", path.display())]
    Upper {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The mount point is not usable, or the kernel refused the mount.
    #[error("mounting {digest} at {}: {source}", target.display())]
    Mount {
        /// The image.
        digest: Digest,
        /// The mount point.
        target: PathBuf,
        /// Why.
        source: MountError,
    },
}

impl strata_ops::HasKind for MountImageError {
    fn kind(&self) -> strata_ops::ErrorKind {
        use strata_ops::ErrorKind as K;
        match self {
            MountImageError::Prepare { source, .. } => source.kind(),
            MountImageError::Upper { source, .. } => K::of_io(source),
            MountImageError::Mount { source, .. } => match source {
                MountError::AlreadyMounted(_) | MountError::Busy(_) => K::Busy,
                MountError::NotADirectory(_) | MountError::NotMounted(_) => K::InvalidInput,
                MountError::NoVerity(_) | MountError::NoFilesystem { .. } => K::Unsupported,
                _ => K::Internal,
            },
        }
    }
}

impl Store {
    /// The upper dir `strata mount --rw` keeps for `digest` mounted at
    /// `target` (a canonical path).
    pub fn default_upper(&self, digest: &Digest, target: &Path) -> PathBuf {
        let key = Digest::sha256_of(target.as_os_str().as_encoded_bytes());
        self.root()
            .join("uppers")
            .join(format!("{}-{}", &digest.hex()[..16], &key.hex()[..16]))
    }

    /// Mount the image `digest` at `dir` (an existing directory with
    /// nothing mounted on it), building its EROFS image first when the
    /// store has none.
    pub fn mount_image(
        &self,
        digest: &Digest,
        dir: &Path,
        opts: &MountOptions,
    ) -> Result<MountedImage, MountImageError> {
        let mount_err = |target: &Path, source| MountImageError::Mount {
            digest: *digest,
            target: target.to_path_buf(),
            source,
        };
        let target = strata_sys::free_mount_point(dir).map_err(|e| mount_err(dir, e))?;
        let (info, layers) =
            self.image_erofs(digest, opts.split)
                .map_err(|source| MountImageError::Prepare {
                    digest: *digest,
                    source,
                })?;
        let upper = match (&opts.upper, opts.writable) {
            (Some(u), _) => Some(u.clone()),
            (None, true) => Some(self.default_upper(digest, &target)),
            (None, false) => None,
        };
        let upper = match upper {
            Some(base) => {
                let (u, w) = (base.join("upper"), base.join("work"));
                for d in [&u, &w] {
                    std::fs::create_dir_all(d).map_err(|source| MountImageError::Upper {
                        path: d.clone(),
                        source,
                    })?;
                }
                Some((u, w))
            }
            None => None,
        };
        let m = OverlayMount {
            dirs_above: Vec::new(),
            layers,
            data_dirs: vec![self.root().join("objects")],
            upper: upper.clone(),
            verity_require: opts.verity,
            source: composefs_source(digest),
        };
        strata_sys::mount_overlay(&m, &target).map_err(|e| mount_err(&target, e))?;
        Ok(MountedImage {
            manifest_digest: *digest,
            tree_digest: info.tree_digest,
            mount_point: target,
            upper: upper.map(|(u, _)| u),
            split: info.split.is_some(),
        })
    }
}
