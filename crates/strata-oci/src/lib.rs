//! OCI images: references, manifests, sources, and pulling into the store.
//!
//! - [`ImageRef`]: skopeo's transport syntax (`docker://`, `oci:`,
//!   `oci-archive:`, `docker-archive:`); [`ImageName`]: that or a bare
//!   reference as podman takes it (`debian:12`, `localhost:5000/app:1`).
//! - [`short_names`]: short names resolved through registries.conf's
//!   aliases and search registries.
//! - [`manifest`]: tolerant parsing of OCI and Docker schema2 manifests,
//!   indexes and configs; the exact bytes are always kept, because digests
//!   are over bytes, not over parsed structures.
//! - [`ImageSource`]: where images come from: a registry ([`registry`]:
//!   credential providers, auth, one shared HTTP client, retries, Range
//!   resume) or a layout/archive ([`layout`]).
//! - [`layout_writer`]: writes OCI layouts (fixtures, exports).
//! - [`pull`]: the pipeline that verifies every byte and commits to the store.
//! - [`convert`], [`push`]: rewriting an image's layers as zstd:chunked into
//!   an OCI layout or a registry.
//!
//! Everything is blocking; parallelism is threads.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod convert;
pub mod layout;
pub mod layout_writer;
pub mod limits;
pub mod manifest;
pub mod partial;
pub mod preresolved;
pub mod pull;
pub mod push;
pub mod reference;
pub mod registry;
pub mod short_names;
pub mod store_or_pull;
pub mod verify;

use std::io::Read;
use std::path::PathBuf;

use strata_digest::Digest;

pub use layout_writer::OciLayoutWriter;
pub use manifest::{
    Descriptor, ImageConfig, LayerCompression, Manifest, Platform, layer_compression, parse_config,
};
pub use reference::{ImageName, ImageRef, ShortName};
pub use registry::{
    CredentialProvider, Credentials, FileCredentials, RegistryClient, RegistryConfig,
    RegistryOptions, StaticCredentials,
};

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
    /// A registries.conf file that does not parse or says something
    /// invalid.
    #[error("parsing registries configuration {path}: {reason}")]
    RegistriesConf {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A short name that no candidate registry resolved.
    #[error("resolving short name {name:?} ({lookup}): {attempts}")]
    ShortName {
        /// The short name.
        name: String,
        /// How the candidates were chosen.
        lookup: String,
        /// Each candidate and why it failed, `; `-separated.
        attempts: String,
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
    #[error("{action}: authentication required or failed for {host} ({source_of_creds})")]
    Auth {
        /// What we asked for.
        action: String,
        /// The registry host.
        host: String,
        /// Where credentials came from, e.g. `credentials from
        /// /run/user/0/containers/auth.json` (never the credentials).
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
    /// A configuration or credentials file that does not parse or holds
    /// something unusable. The reason never quotes a secret.
    #[error("{action} {path}: {reason}")]
    Config {
        /// What we were doing, e.g. `reading credentials file`.
        action: String,
        /// Which file.
        path: PathBuf,
        /// What is wrong with it.
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
    /// The registry does not serve byte ranges of blobs.
    #[error("{action}: the registry does not serve byte ranges ({reason})")]
    NoRanges {
        /// What we asked for.
        action: String,
        /// What it answered.
        reason: String,
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
    /// The operation was cancelled; nothing of it became visible.
    #[error("cancelled")]
    Cancelled,
}

impl From<strata_ops::Cancelled> for OciError {
    fn from(_: strata_ops::Cancelled) -> Self {
        OciError::Cancelled
    }
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

/// Where an image comes from: a registry, an OCI layout, or an archive.
///
/// Sources verify what they resolve (manifest and config) but not blob
/// streams: the caller reads blobs through a
/// [`VerifyingReader`](strata_digest::VerifyingReader), so verification
/// happens once, where the bytes are consumed.
pub trait ImageSource: Send + Sync {
    /// Resolve to one image manifest: follow an index (or Docker manifest
    /// list) to `platform` (an error lists the platforms available when
    /// none matches), fetch and verify the manifest (against the
    /// reference's digest when it has one; `manifest_digest` is always the
    /// sha256 of the bytes) and the config.
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError>;
    /// Stream a blob's bytes from `offset` (0 = the whole blob). Not
    /// verified here. Registry sources retry dropped connections and 5xx
    /// answers by asking again with `Range: bytes=N-` from where they got
    /// to (5 attempts, backoff from 200 ms, doubling); when the attempts
    /// run out the returned reader fails with an `io::Error` naming the
    /// blob and the repository.
    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError>;
    /// A stream of `len` bytes of a blob from `offset` (not verified
    /// here): bytes can be used as they arrive. Registry sources ask for
    /// exactly that range and resume as [`open_blob`](Self::open_blob)
    /// does; the stream may end early only with an error.
    fn open_range(
        &self,
        desc: &Descriptor,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        Ok(Box::new(self.open_blob(desc, offset)?.take(len)))
    }
    /// Exactly `len` bytes of a blob from `offset` (not verified here).
    /// Registries are asked with `Range: bytes=A-B`; one that ignores
    /// ranges (answers 200) or refuses them gives [`OciError::NoRanges`].
    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        let r = self.open_blob(desc, offset)?;
        r.take(len)
            .read_to_end(&mut out)
            .map_err(|e| OciError::Network {
                action: format!("reading bytes {offset}+{len} of blob {}", desc.digest),
                reason: e.to_string(),
            })?;
        if out.len() as u64 != len {
            return Err(OciError::Format {
                what: format!("blob {}", desc.digest),
                reason: format!("shorter than {}", offset + len),
            });
        }
        Ok(out)
    }
    /// Several ranges `(offset, len)` of a blob, in the order asked.
    /// Registries get them in multi-range requests (`Range: bytes=a-b,c-d`,
    /// answered `multipart/byteranges`); a registry refusing many ranges
    /// (400, 416) is asked one range at a time.
    fn read_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        ranges
            .iter()
            .map(|(o, l)| self.read_range(desc, *o, *l))
            .collect()
    }
    /// A description for messages, e.g. `docker://127.0.0.1:5000/debian:12`.
    fn describe(&self) -> String;
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
        ImageRef::OciArchive { file, tag } => Box::new(layout::LayoutSource::open_archive(
            file,
            tag.clone(),
            r.to_string(),
        )?),
        ImageRef::DockerArchive { file, tag } => Box::new(layout::DockerArchiveSource::open(
            file,
            tag.clone(),
            r.to_string(),
        )?),
    })
}

/// An [`OciError::Io`] naming the action and the file.
pub(crate) fn io_err(
    action: &str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> OciError {
    let action = action.to_string();
    let path = path.to_path_buf();
    move |source| OciError::Io {
        action,
        path,
        source,
    }
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

impl strata_ops::HasKind for OciError {
    fn kind(&self) -> strata_ops::ErrorKind {
        use strata_ops::ErrorKind as K;
        match self {
            OciError::Reference { .. } => K::InvalidInput,
            OciError::Format { .. } => K::InvalidInput,
            OciError::DigestMismatch { .. } => K::DigestMismatch,
            OciError::Registry { status, .. } => match status {
                404 => K::NotFound,
                401 => K::Unauthorized,
                403 => K::Denied,
                400 | 416 => K::InvalidInput,
                415 => K::Unsupported,
                500..=599 | 429 => K::Unavailable,
                _ => K::Internal,
            },
            OciError::Auth { .. } => K::Unauthorized,
            OciError::Network { .. } => K::Unavailable,
            OciError::Io { source, .. } => K::of_io(source),
            OciError::NoRanges { .. } => K::Unsupported,
            OciError::NoPlatform { .. } => K::NotFound,
            OciError::Cancelled => K::Cancelled,
            OciError::RegistriesConf { .. } | OciError::Config { .. } => K::InvalidInput,
            OciError::ShortName { .. } => K::NotFound,
        }
    }
}
