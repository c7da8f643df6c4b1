//! Where `strata convert` writes an image: an OCI layout directory or a
//! registry repository, behind one [`ImageDestination`] trait.
//!
//! - [`LayoutDestination`]: blobs are staged in the layout's
//!   `blobs/sha256/` and renamed into place; the manifest is listed in
//!   `index.json` under the tag.
//! - [`RegistryDestination`]: blobs are staged in a private temporary
//!   directory (the store's `tmp/`), and each is uploaded as soon as it is
//!   written unless the repository already has it (`HEAD` answered 200);
//!   then the config, then the manifest under the tag. Memory stays
//!   bounded: a staged blob is streamed from its file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use strata_digest::Digest;

use crate::registry::{BlobContent, RegistryPusher};
use crate::{Descriptor, ImageRef, OciError, OciLayoutWriter, RegistryOptions};

/// Blobs and manifests sent to a registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PushStats {
    /// Blobs uploaded.
    pub blobs_uploaded: u64,
    /// Blobs the repository already had (not uploaded).
    pub blobs_present: u64,
    /// Bytes of the uploaded blobs.
    pub bytes_uploaded: u64,
}

impl std::fmt::Display for PushStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let up = strata_ops::human_bytes(self.bytes_uploaded);
        let (n, present) = (self.blobs_uploaded, self.blobs_present);
        write!(f, "{n} blobs uploaded ({up}), {present} already present")
    }
}

/// Where a converted image is written.
pub trait ImageDestination: Sync {
    /// A description for messages (`oci:DIR:TAG`, `docker://HOST/REPO:TAG`).
    fn describe(&self) -> String;
    /// Where blobs are written before [`put_blob_file`](Self::put_blob_file)
    /// takes them.
    fn staging_dir(&self) -> &Path;
    /// Whether blobs should be handed over as soon as each is written (a
    /// registry uploads while later layers convert), rather than all at the
    /// end, once every layer converted (a layout then holds no blob of a
    /// failed conversion).
    fn eager(&self) -> bool;
    /// Take a finished blob file written in [`staging_dir`](Self::staging_dir).
    fn put_blob_file(
        &self,
        media_type: &str,
        file: tempfile::NamedTempFile,
        digest: Digest,
        size: u64,
    ) -> Result<Descriptor, OciError>;
    /// Store a small blob (a config).
    fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor, OciError>;
    /// Store the manifest (exact `bytes`, of `media_type`) under the
    /// destination's tag; returns its digest.
    fn put_manifest(&self, media_type: &str, bytes: &[u8]) -> Result<Digest, OciError>;
    /// What was uploaded, for a registry.
    fn push_stats(&self) -> Option<PushStats> {
        None
    }
}

fn descriptor(media_type: &str, digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest,
        size,
        annotations: BTreeMap::new(),
        platform: None,
        urls: Vec::new(),
    }
}

/// An OCI layout directory (created if missing; other tags are kept).
pub struct LayoutDestination {
    writer: Mutex<OciLayoutWriter>,
    tag: Option<String>,
    staging: PathBuf,
    display: String,
}

impl LayoutDestination {
    /// Open (or create) the layout at `dir`; the manifest will be tagged
    /// `tag`.
    pub fn open(dir: &Path, tag: Option<&str>) -> Result<Self, OciError> {
        let writer = OciLayoutWriter::open_or_create(dir)?;
        let display = match tag {
            Some(t) => format!("oci:{}:{t}", dir.display()),
            None => format!("oci:{}", dir.display()),
        };
        Ok(LayoutDestination {
            writer: Mutex::new(writer),
            tag: tag.map(str::to_string),
            staging: dir.join("blobs").join("sha256"),
            display,
        })
    }
}

impl ImageDestination for LayoutDestination {
    fn describe(&self) -> String {
        self.display.clone()
    }

    fn staging_dir(&self) -> &Path {
        &self.staging
    }

    fn eager(&self) -> bool {
        false
    }

    fn put_blob_file(
        &self,
        media_type: &str,
        file: tempfile::NamedTempFile,
        digest: Digest,
        size: u64,
    ) -> Result<Descriptor, OciError> {
        self.writer
            .lock()
            .expect("no panics while held")
            .add_blob_file(media_type, file, digest, size)
    }

    fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor, OciError> {
        self.writer
            .lock()
            .expect("no panics while held")
            .add_blob(media_type, bytes)
    }

    fn put_manifest(&self, _media_type: &str, bytes: &[u8]) -> Result<Digest, OciError> {
        // the layout takes the media type from the document itself
        Ok(self
            .writer
            .lock()
            .expect("no panics while held")
            .add_manifest(bytes, self.tag.as_deref())?
            .digest)
    }
}

/// A repository in a registry: `docker://HOST[:PORT]/REPO[:TAG]` (tag
/// `latest` when none is given).
pub struct RegistryDestination {
    pusher: RegistryPusher,
    /// None: the manifest is put by its digest, under no tag.
    tag: Option<String>,
    staging: tempfile::TempDir,
    stats: Mutex<PushStats>,
    display: String,
}

impl RegistryDestination {
    /// Prepare a push to `reference`, staging blobs in a new temporary
    /// directory under `staging_parent` (removed when this is dropped).
    /// The registry is asked `GET /v2/` first, so an unreachable registry
    /// or refused credentials fail here, before any conversion work.
    pub fn new(
        reference: &ImageRef,
        opts: &RegistryOptions,
        staging_parent: &Path,
    ) -> Result<Self, OciError> {
        let ImageRef::Docker { tag, digest, .. } = reference else {
            return Err(OciError::Reference {
                input: reference.to_string(),
                reason: "a registry destination is a docker:// reference".into(),
            });
        };
        if digest.is_some() {
            return Err(OciError::Reference {
                input: reference.to_string(),
                reason: "a push destination names a tag, not a digest (the digest is that of the converted manifest)".into(),
            });
        }
        let pusher = RegistryPusher::new(reference, opts)?;
        pusher.ping()?;
        let staging = tempfile::Builder::new()
            .prefix("push-")
            .tempdir_in(staging_parent)
            .map_err(crate::io_err(
                "creating a staging directory in",
                staging_parent,
            ))?;
        Ok(RegistryDestination {
            pusher,
            tag: Some(tag.clone().unwrap_or_else(|| "latest".to_string())),
            staging,
            stats: Mutex::new(PushStats::default()),
            display: reference.to_string(),
        })
    }

    /// As [`new`](Self::new), but the manifest is put by its digest and
    /// tagged nowhere (a tag given in `reference` is ignored): a service
    /// verifies what the registry serves first, and tags it last, with
    /// [`tag`](Self::tag).
    pub fn untagged(
        reference: &ImageRef,
        opts: &RegistryOptions,
        staging_parent: &Path,
    ) -> Result<Self, OciError> {
        let mut d = Self::new(reference, opts, staging_parent)?;
        d.tag = None;
        Ok(d)
    }

    /// Put `bytes` (a manifest already pushed by digest) under `tag` too.
    pub fn tag(&self, tag: &str, media_type: &str, bytes: &[u8]) -> Result<Digest, OciError> {
        self.pusher.put_manifest(tag, media_type, bytes)
    }

    /// Upload a blob unless the repository has it.
    fn send(&self, digest: &Digest, size: u64, content: BlobContent<'_>) -> Result<(), OciError> {
        if self.pusher.has_blob(digest)? {
            self.stats
                .lock()
                .expect("no panics while held")
                .blobs_present += 1;
            return Ok(());
        }
        self.pusher.upload_blob(digest, size, content)?;
        let mut s = self.stats.lock().expect("no panics while held");
        s.blobs_uploaded += 1;
        s.bytes_uploaded += size;
        Ok(())
    }
}

impl ImageDestination for RegistryDestination {
    fn describe(&self) -> String {
        self.display.clone()
    }

    fn staging_dir(&self) -> &Path {
        self.staging.path()
    }

    fn eager(&self) -> bool {
        true
    }

    fn put_blob_file(
        &self,
        media_type: &str,
        file: tempfile::NamedTempFile,
        digest: Digest,
        size: u64,
    ) -> Result<Descriptor, OciError> {
        self.send(&digest, size, BlobContent::File(file.path()))?;
        // the staged file is removed when `file` drops
        Ok(descriptor(media_type, digest, size))
    }

    fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor, OciError> {
        let digest = Digest::sha256_of(bytes);
        self.send(&digest, bytes.len() as u64, BlobContent::Bytes(bytes))?;
        Ok(descriptor(media_type, digest, bytes.len() as u64))
    }

    fn put_manifest(&self, media_type: &str, bytes: &[u8]) -> Result<Digest, OciError> {
        match &self.tag {
            Some(tag) => self.pusher.put_manifest(tag, media_type, bytes),
            None => {
                let digest = Digest::sha256_of(bytes).to_string();
                self.pusher.put_manifest(&digest, media_type, bytes)
            }
        }
    }

    fn push_stats(&self) -> Option<PushStats> {
        Some(*self.stats.lock().expect("no panics while held"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_push_destination_needs_a_tag_not_a_digest() {
        let r: ImageRef = "docker://127.0.0.1:1/x@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = RegistryDestination::new(&r, &RegistryOptions::default(), dir.path())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("not a digest"), "{e}");
    }
}
