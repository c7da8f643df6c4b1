//! zstd:chunked layers (containers/storage's format), written and read by
//! our own code.
//!
//! ```text
//! blob = zstd frames ............ decompressed in order: the layer tar, byte for byte
//!        (a new frame at each file payload and each chunk boundary;
//!         headers and padding in the frames between)
//!      + skippable frame: TOC        (zstd JSON: every entry, digests, blob offsets)
//!      + skippable frame: tar-split  (zstd NDJSON: raw headers + file sizes and CRCs)
//!      + skippable frame: footer     (64 bytes, magic "GNUlInUx")
//! ```
//!
//! Any zstd reader sees the ordinary layer (skippable frames are skipped),
//! so the diff_id does not change and every runtime can pull the image in
//! full. A reader that knows the format finds the TOC from the layer's
//! annotations (`io.github.containers.zstd-chunked.*`) or the footer, and can
//! fetch single files or chunks by range.
//!
//! What this crate owns: the chunker ([`rollsum`]), a tar reader with Go's
//! `archive/tar` semantics for names and times ([`gotar`]: the TOC must match
//! what c/storage reads from the tar-split), the writer ([`write_layer`]),
//! TOC/footer readers for the current and the old (`io.containers.*`,
//! 40-byte footer) layouts ([`reader`]), and placing listed entries first
//! in a tar ([`reorder`]). What it does not own: fetching,
//! the store, mounting.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod gotar;
pub mod reader;
pub mod reorder;
pub mod rollsum;
pub mod toc;
mod tocscan;
mod writer;

pub use writer::{ChunkedLayer, WriteOptions, write_layer};

/// Annotation: sha256 of the compressed TOC bytes.
pub const ANN_TOC_CHECKSUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// Annotation: `offset:compressed length:uncompressed length:1` of the TOC.
pub const ANN_TOC_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// Annotation: `offset:compressed length:uncompressed length` of the tar-split.
pub const ANN_TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
/// Old layout (c/storage <= 1.43, Debian's skopeo 1.9.3): TOC checksum.
pub const ANN_OLD_TOC_CHECKSUM: &str = "io.containers.zstd-chunked.manifest-checksum";
/// Old layout: TOC position.
pub const ANN_OLD_TOC_POSITION: &str = "io.containers.zstd-chunked.manifest-position";

/// zstd skippable frame magic (little-endian 0x184D2A50).
pub const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// Footer magic of the current layout.
pub const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";
/// Footer magic of the old (40-byte footer) layout.
pub const OLD_FOOTER_MAGIC: &[u8; 8] = b"GnUlInUx";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    /// Reading the tar or writing the blob failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The error.
        source: std::io::Error,
    },
    /// The tar holds something zstd:chunked cannot describe (sparse files,
    /// global PAX headers, non-UTF-8 names, duplicate paths): write the
    /// layer as plain zstd instead.
    #[error("cannot be zstd:chunked: {0}")]
    Unsupported(String),
    /// The tar is malformed.
    #[error("malformed tar at offset {offset}: {reason}")]
    Tar {
        /// Byte offset in the tar.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A TOC, footer or annotation is malformed or does not match its digest.
    #[error("{what}: {reason}")]
    Format {
        /// Which part.
        what: String,
        /// What is wrong.
        reason: String,
    },
}
