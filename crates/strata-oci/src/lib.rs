//! OCI images: references, manifests, sources, and pulling into the store.
//!
//! - [`ImageRef`]: skopeo's transport syntax (`docker://`, `oci:`,
//!   `oci-archive:`, `docker-archive:`).
//! - [`manifest`]: tolerant parsing of OCI and Docker schema2 manifests,
//!   indexes and configs; the exact bytes are always kept, because digests
//!   are over bytes, not over parsed structures.
//! - [`ImageSource`]: where images come from: a registry ([`registry`]:
//!   auth, retries, Range resume) or a layout/archive ([`layout`]).
//! - [`pull`]: the pipeline that verifies every byte and commits to the store.
//!
//! Everything is blocking; parallelism is threads.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod layout;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;

use std::io::Read;
use std::path::PathBuf;

use strata_digest::Digest;

pub use manifest::{
    Descriptor, ImageConfig, LayerCompression, Manifest, Platform, layer_compression, parse_config,
};
pub use reference::ImageRef;

/// Errors of image sources and formats. Messages name the image, blob or
/// file and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// An image reference that does not parse.
    #[error("invalid image reference {input:?}: {reason}")]
    Reference {
        /// The input.
        input: String,
        /// Why.
        reason: String,
    },
    /// A manifest, index or config that does not parse or is inconsistent.
    #[error("{what}: {reason}")]
    Format {
        /// What was being read.
        what: String,
        /// Why it is wrong.
        reason: String,
    },
    /// Bytes that do not match the digest that named them.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was fetched.
        what: String,
        /// Expected digest.
        expected: Digest,
        /// Actual digest.
        actual: Digest,
    },
    /// A registry answered with an error status.
    #[error("{action}: registry answered {status}{detail}")]
    Registry {
        /// What we asked for.
        action: String,
        /// HTTP status.
        status: u16,
        /// Error code and message from the body, if any.
        detail: String,
    },
    /// Authentication failed or is required.
    #[error("{action}: authentication required or failed for {host} (credentials from {source_of_creds})")]
    Auth {
        /// What we asked for.
        action: String,
        /// The registry host.
        host: String,
        /// Where credentials came from (never the credentials).
        source_of_creds: String,
    },
    /// A transport-level failure (connection refused, reset, timeout).
    #[error("{action}: {reason}")]
    Network {
        /// What we asked for.
        action: String,
        /// Why it failed.
        reason: String,
    },
    /// A local file problem.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: String,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The image has nothing for the wanted platform.
    #[error("{image}: no manifest for platform {wanted}; available: {available}")]
    NoPlatform {
        /// The image.
        image: String,
        /// Wanted platform.
        wanted: String,
        /// Platforms in the index.
        available: String,
    },
}

/// An image resolved to one manifest, with its config, all verified.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    /// The exact manifest bytes.
    pub manifest_bytes: Vec<u8>,
    /// sha256 of `manifest_bytes`.
    pub manifest_digest: Digest,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// The exact config bytes (verified against `manifest.config.digest`).
    pub config_bytes: Vec<u8>,
    /// The index the manifest was picked from, if any.
    pub index_digest: Option<Digest>,
}

/// Where an image comes from.
pub trait ImageSource: Send + Sync {
    /// Resolve to one image manifest for `platform` (following an index),
    /// fetching and verifying the manifest and the config.
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError>;
    /// Stream a blob from `offset`. Not verified here: the caller wraps it
    /// in a verifying reader. Registry sources retry dropped connections
    /// and 5xx answers by resuming with `Range`.
    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError>;
    /// A description for messages, e.g. `docker://127.0.0.1:5000/debian:12`.
    fn describe(&self) -> String;
}

/// Registry access options.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry.
    pub plain_http: bool,
    /// Hosts (`host[:port]`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Credentials file (auth.json format) to use first.
    pub auth_file: Option<PathBuf>,
    /// User-Agent header.
    pub user_agent: String,
}

/// Open the source a reference names.
pub fn open_source(r: &ImageRef, opts: &RegistryOptions) -> Result<Box<dyn ImageSource>, OciError> {
    Ok(match r {
        ImageRef::Docker { .. } => Box::new(registry::RegistrySource::new(r.clone(), opts)?),
        ImageRef::OciLayout { dir, tag } => Box::new(layout::LayoutSource::open(
            dir.clone(),
            tag.clone(),
            r.to_string(),
        )?),
        ImageRef::OciArchive { file, tag } => {
            Box::new(layout::LayoutSource::open_archive(file, tag.clone(), r.to_string())?)
        }
        ImageRef::DockerArchive { file, tag } => {
            Box::new(layout::DockerArchiveSource::open(file, tag.clone(), r.to_string())?)
        }
    })
}

/// Check bytes against a digest, as an [`OciError`].
pub(crate) fn verify(what: &str, bytes: &[u8], expected: &Digest) -> Result<(), OciError> {
    let actual = Digest::sha256_of(bytes);
    if actual != *expected {
        return Err(OciError::DigestMismatch {
            what: what.to_string(),
            expected: *expected,
            actual,
        });
    }
    Ok(())
}
