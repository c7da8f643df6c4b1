//! [`RegistrySource`]: an [`ImageSource`] backed by a registry.
//!
//! Every manifest request sends `Accept` with all four manifest types
//! (Debian's docker-registry answers 404 for OCI manifests otherwise); a
//! `Docker-Content-Digest` answer is checked against the bytes. Blobs are
//! streamed through [`BlobReader`] (resumed with Range after a dropped
//! connection) or read as ranges, several per request.

use std::io::{self, Read};
use std::sync::Arc;

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap};
use strata_digest::Digest;

use super::RegistryOptions;
use super::transport::{BlobReader, Session};
use crate::manifest::{ACCEPT_MANIFESTS, Document, parse_document, pick_platform};
use crate::{Descriptor, ImageRef, ImageSource, OciError, Platform, ResolvedImage, verify};

/// A source backed by a registry.
pub struct RegistrySource {
    session: Arc<Session>,
    reference: ImageRef,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl RegistrySource {
    /// Prepare a client for `reference` (a `docker://` reference): the
    /// HTTP client comes from `opts.client` (shared), the credentials from
    /// `opts.credentials` (asked now, so a credentials file that cannot be
    /// read fails here).
    pub fn new(reference: ImageRef, opts: &RegistryOptions) -> Result<Self, OciError> {
        let ImageRef::Docker {
            registry,
            repository,
            tag,
            digest,
        } = &reference
        else {
            return Err(OciError::Reference {
                input: reference.to_string(),
                reason: "not a docker:// reference".into(),
            });
        };
        Ok(RegistrySource {
            session: Arc::new(Session::new(registry, repository, opts, false)?),
            tag: tag.clone(),
            digest: *digest,
            reference,
        })
    }

    /// The raw document `reference` (a tag or a digest) names in this
    /// repository, and its `Content-Type`: an index is not followed. By
    /// digest, the bytes must hash to it.
    pub fn manifest_document(
        &self,
        reference: &str,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let what = format!(
            "{}/{}:{reference}",
            self.session.base, self.session.repository
        );
        let (bytes, ct) = self.fetch_manifest(reference, &what)?;
        if let Ok(d) = reference.parse::<Digest>() {
            verify(&format!("fetching manifest {what}"), &bytes, &d)?;
        }
        Ok((bytes, ct))
    }

    /// GET a manifest by tag or digest: its bytes, `Content-Type`, and the
    /// `Docker-Content-Digest` the registry claims, checked against the
    /// bytes when it is a digest we can compute.
    fn fetch_manifest(
        &self,
        reference: &str,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let s = &self.session;
        let url = format!("{}/v2/{}/manifests/{reference}", s.base, s.repository);
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, ACCEPT_MANIFESTS.parse().expect("static header"));
        let action = format!("fetching manifest {what}");
        let limit = crate::limits::current().manifest_bytes;
        let (bytes, headers) = s.get_bytes(&url, &h, &action, limit)?;
        let ct = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.to_string());
        // Only sha256 digests parse; anything else we cannot check.
        let claimed_digest: Option<Digest> = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        if bytes.len() as u64 > limit {
            return Err(OciError::Format {
                what: format!("fetching manifest {what}"),
                reason: format!(
                    "larger than {limit} bytes (the manifest size limit; \
                     STRATA_MAX_MANIFEST_BYTES raises it)"
                ),
            });
        }
        if let Some(claimed) = claimed_digest {
            verify(
                &format!("fetching manifest {what} (checking Docker-Content-Digest)"),
                &bytes,
                &claimed,
            )?;
        }
        Ok((bytes, ct))
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        let what = self.reference.to_string();
        let first_ref = match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        };
        let (mut bytes, mut ct) = self.fetch_manifest(&first_ref, &what)?;
        let mut digest = Digest::sha256_of(&bytes);
        if let Some(d) = &self.digest {
            verify(&format!("fetching manifest {what}"), &bytes, d)?;
        }
        let mut index_digest = None;
        for _ in 0..4 {
            match parse_document(&bytes, ct.as_deref(), &format!("manifest {what}"))? {
                Document::Manifest(manifest) => {
                    let url = self.session.blob_url(&manifest.config.digest);
                    let action = format!("fetching config {} of {what}", manifest.config.digest);
                    let limit = crate::limits::current().config_bytes;
                    if manifest.config.size > limit {
                        return Err(OciError::Format {
                            what: action,
                            reason: format!(
                                "config declares {} bytes, more than {limit} (the config \
                                 size limit; STRATA_MAX_CONFIG_BYTES raises it)",
                                manifest.config.size
                            ),
                        });
                    }
                    let (config_bytes, _) =
                        self.session
                            .get_bytes(&url, &HeaderMap::new(), &action, limit)?;
                    verify(&action, &config_bytes, &manifest.config.digest)?;
                    return Ok(ResolvedImage {
                        manifest_bytes: bytes,
                        manifest_digest: digest,
                        manifest: *manifest,
                        config_bytes,
                        index_digest,
                    });
                }
                Document::Index(entries) => {
                    index_digest = Some(digest);
                    let chosen = pick_platform(&entries, platform, &what)?.clone();
                    let (b, c) = self.fetch_manifest(&chosen.digest.to_string(), &what)?;
                    verify(
                        &format!("fetching manifest {what} for {platform}"),
                        &b,
                        &chosen.digest,
                    )?;
                    bytes = b;
                    ct = c.or(Some(chosen.media_type.clone()));
                    digest = chosen.digest;
                }
            }
        }
        Err(OciError::Format {
            what,
            reason: "indexes nested too deep".into(),
        })
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        if offset >= desc.size && desc.size > 0 {
            // nothing left to read; a Range request would answer 416
            return Ok(Box::new(io::empty()));
        }
        Ok(Box::new(BlobReader::open(
            self.session.clone(),
            desc,
            offset,
        )?))
    }

    fn open_range(
        &self,
        desc: &Descriptor,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        let end = offset.saturating_add(len);
        if len == 0 || offset >= desc.size || end > desc.size {
            return Err(OciError::Format {
                what: format!("blob {}", desc.digest),
                reason: format!(
                    "bytes {offset}+{len} are not a range of its {} bytes",
                    desc.size
                ),
            });
        }
        Ok(Box::new(BlobReader::open_range(
            self.session.clone(),
            desc,
            offset,
            end,
        )?))
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .session
            .get_ranges(desc, &[(offset, len)])?
            .pop()
            .expect("one part per range"))
    }

    fn read_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        const PER_REQUEST: usize = 32;
        let mut out = Vec::with_capacity(ranges.len());
        for batch in ranges.chunks(PER_REQUEST) {
            if batch.len() == 1 || self.session.single_ranges_only() {
                for (o, l) in batch {
                    out.push(self.read_range(desc, *o, *l)?);
                }
                continue;
            }
            match self.session.get_ranges(desc, batch) {
                Ok(parts) => out.extend(parts),
                Err(OciError::NoRanges { .. }) => {
                    // Some registries refuse several ranges at once; ask
                    // one at a time from now on.
                    self.session.set_single_ranges_only();
                    for (o, l) in batch {
                        out.push(self.read_range(desc, *o, *l)?);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        self.reference.to_string()
    }
}
