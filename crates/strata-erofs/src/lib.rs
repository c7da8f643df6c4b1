//! composefs-format EROFS images.
//!
//! strata gives every image one flattened, metadata-only EROFS image in
//! composefs format: regular files over 64 bytes are overlayfs redirects
//! into the store's `objects/`, carrying their fs-verity digest; the image
//! bytes are a pure function of the tree, so their SHA-256 is the image's
//! one tree digest and their fs-verity digest is its composefs image id.
//!
//! - [`FsTree`] is the writer's input, [`build`] the writer ([`Flavor`]
//!   picks a composefs image, a part of a hybrid mount, or a self-contained
//!   image with contents inside).
//! - [`convert`] makes an [`FsTree`] from a flattened [`strata_tree::Tree`],
//!   and [`split`] the upper part of a hybrid mount over a base tree.
//!
//! No I/O besides what the caller's [`convert::Objects`] and
//! [`DataSource`] do.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod convert;
mod format;
mod fs;
pub mod split;
mod writer;

pub use format::encode_dev;
pub use fs::{FILE_MAX, FileData, FsTree, Kind, NAME_MAX, Node, Stat, TreeError, XATTR_VALUE_MAX};
pub use writer::{DataSource, Flavor, Image, build, build_owned};

/// Files up to this size are stored inside composefs images.
pub const INLINE_MAX: u64 = 64;
