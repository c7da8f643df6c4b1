//! An image out of the store: its flattened tree as a directory or a tar
//! ([`Store::export_dir`], [`Store::export_tar`]), or a self-contained
//! EROFS file ([`Store::export_erofs_file`]).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use strata_digest::Digest;
use strata_tree::export::ExportError;

use crate::{Store, StoreError};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageExportError {
    /// Reading the image from the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the tree failed (destination not empty, disk full, ...).
    #[error("exporting {digest} to {}: {source}", dest.display())]
    Tree {
        /// The image.
        digest: Digest,
        /// Where to (`-` for a stream).
        dest: PathBuf,
        /// Why.
        source: ExportError,
    },
    /// Writing the EROFS file failed.
    #[error("exporting {digest} as EROFS to {}: {source}", dest.display())]
    Erofs {
        /// The image.
        digest: Digest,
        /// The file.
        dest: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl Store {
    /// Write the flattened tree of `digest` into `dir` (missing or empty).
    pub fn export_dir(&self, digest: &Digest, dir: &Path) -> Result<(), ImageExportError> {
        let tree = self.image_tree(digest)?;
        let mut open = |d: &Digest| self.open_object(d).map_err(io::Error::other);
        strata_tree::export::export_dir(&tree, dir, &mut open).map_err(|source| {
            ImageExportError::Tree {
                digest: *digest,
                dest: dir.to_path_buf(),
                source,
            }
        })
    }

    /// Write the flattened tree of `digest` as a tar to `out`.
    pub fn export_tar(&self, digest: &Digest, out: &mut dyn Write) -> Result<(), ImageExportError> {
        let tree = self.image_tree(digest)?;
        let mut open = |d: &Digest| -> io::Result<Box<dyn Read>> {
            Ok(Box::new(self.open_object(d).map_err(io::Error::other)?))
        };
        strata_tree::export::export_tar(&tree, out, &mut open).map_err(|source| {
            ImageExportError::Tree {
                digest: *digest,
                dest: PathBuf::from("-"),
                source,
            }
        })
    }

    /// Write `digest` as a self-contained EROFS image (contents inside) to
    /// `path`; returns its size. Written to a temporary name next to
    /// `path` and renamed, so a failed export leaves no partial image under
    /// the asked name.
    pub fn export_erofs_file(&self, digest: &Digest, path: &Path) -> Result<u64, ImageExportError> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dir.join(format!(".{name}.strata-tmp"));
        let result = (|| -> Result<u64, ImageExportError> {
            let err = |source| ImageExportError::Erofs {
                digest: *digest,
                dest: path.to_path_buf(),
                source,
            };
            let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp).map_err(err)?);
            let n = self.export_erofs(digest, &mut w)?;
            let f = w.into_inner().map_err(|e| err(e.into_error()))?;
            f.sync_all().map_err(err)?;
            std::fs::rename(&tmp, path).map_err(err)?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}
