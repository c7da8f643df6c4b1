//! An image resolved once, handed to another process.
//!
//! The snapshotter resolves an image (manifest and config) before it
//! starts the lazy mount's daemon; without this the daemon asks the
//! registry again, two round trips more before the first container. The
//! snapshotter writes what it resolved to a file ([`write`]); the daemon
//! reads it back ([`Preresolved::read`]), checks it against the digest
//! its reference is pinned to, and answers `resolve` from it while blobs
//! still come from the registry.

use std::io::Read;
use std::path::Path;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use strata_digest::Digest;

use crate::manifest::{Document, parse_document};
use crate::{Descriptor, ImageSource, OciError, Platform, ResolvedImage};

/// The file's contents.
#[derive(Serialize, Deserialize)]
struct Saved {
    /// The manifest's media type (its bytes may not carry it).
    media_type: String,
    /// The manifest's bytes, base64.
    manifest: String,
    /// The config's bytes, base64.
    config: String,
    /// The index the manifest was picked from.
    index_digest: Option<Digest>,
}

/// Write `resolved` to `path` (replacing it).
pub fn write(path: &Path, resolved: &ResolvedImage) -> std::io::Result<()> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let saved = Saved {
        media_type: resolved.manifest.media_type.clone(),
        manifest: b64.encode(&resolved.manifest_bytes),
        config: b64.encode(&resolved.config_bytes),
        index_digest: resolved.index_digest,
    };
    let json = serde_json::to_vec(&saved).map_err(std::io::Error::other)?;
    std::fs::write(path, json)
}

/// The image whose manifest is `manifest`, from a content-addressed blob
/// directory laid out as containerd's content store is
/// (`<blobs>/sha256/<hex>`, `io.containerd.content.v1.content/blobs`
/// under containerd's root): a snapshotter asked for a layer of an image
/// containerd is pulling finds there the manifest and config containerd
/// fetched a moment ago, without asking the registry again. Both are
/// checked against their digests and held to the manifest and config
/// limits. `Ok(None)`: one of them is not there (the caller asks the
/// registry); an error: one is there but wrong.
pub fn from_content_store(
    blobs: &Path,
    manifest: &Digest,
) -> Result<Option<ResolvedImage>, OciError> {
    let limits = crate::limits::current();
    let read = |d: &Digest, cap: u64| -> Result<Option<Vec<u8>>, OciError> {
        let path = blobs.join(d.algorithm().name()).join(d.hex());
        let mut bytes = Vec::new();
        match std::fs::File::open(&path) {
            Ok(f) => f
                .take(cap + 1)
                .read_to_end(&mut bytes)
                .map_err(crate::io_err("reading", &path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::io_err("reading", &path)(e)),
        };
        let what = format!("{d} in {}", blobs.display());
        if bytes.len() as u64 > cap {
            return Err(OciError::Format {
                what,
                reason: format!("larger than its limit of {cap} bytes"),
            });
        }
        crate::verify(&what, &bytes, d)?;
        Ok(Some(bytes))
    };
    let Some(manifest_bytes) = read(manifest, limits.manifest_bytes)? else {
        return Ok(None);
    };
    let what = format!("manifest {manifest} in {}", blobs.display());
    let parsed = match parse_document(&manifest_bytes, None, &what)? {
        Document::Manifest(m) => *m,
        Document::Index(_) => {
            return Err(OciError::Format {
                what,
                reason: "an index, not a manifest".into(),
            });
        }
    };
    let Some(config_bytes) = read(&parsed.config.digest, limits.config_bytes)? else {
        return Ok(None);
    };
    Ok(Some(ResolvedImage {
        manifest_bytes,
        manifest_digest: *manifest,
        manifest: parsed,
        config_bytes,
        index_digest: None,
    }))
}

/// A source whose `resolve` answers what was resolved before; blobs come
/// from `inner`.
pub struct Preresolved {
    inner: Box<dyn ImageSource>,
    resolved: ResolvedImage,
    /// The platform it was resolved for, when another one goes to
    /// `inner` (`None`: answered for any).
    platform: Option<Platform>,
}

impl Preresolved {
    /// `resolved` (as `inner` resolved it, in this process) answered
    /// again without asking.
    pub fn new(inner: Box<dyn ImageSource>, resolved: ResolvedImage) -> Preresolved {
        Preresolved {
            inner,
            resolved,
            platform: None,
        }
    }

    /// [`new`](Self::new), answering only for `platform` (another one is
    /// resolved by `inner`).
    pub fn for_platform(
        inner: Box<dyn ImageSource>,
        platform: Platform,
        resolved: ResolvedImage,
    ) -> Preresolved {
        Preresolved {
            inner,
            resolved,
            platform: Some(platform),
        }
    }

    /// Read what [`write`] wrote at `path`: the manifest must hash to
    /// `pinned` (the digest the reference names: the manifest's, or the
    /// index's it was picked from), the config to the manifest's config
    /// digest. Anything else is refused, naming the file.
    pub fn read(
        inner: Box<dyn ImageSource>,
        path: &Path,
        pinned: &Digest,
    ) -> Result<Preresolved, OciError> {
        let what = format!("resolved image {}", path.display());
        let fmt = |reason: String| OciError::Format {
            what: what.clone(),
            reason,
        };
        let limits = crate::limits::current();
        let cap = 2 * (limits.manifest_bytes + limits.config_bytes) + 4096;
        let mut json = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(cap + 1).read_to_end(&mut json))
            .map_err(crate::io_err("reading", path))?;
        if json.len() as u64 > cap {
            return Err(fmt(format!(
                "larger than {cap} bytes (a manifest and a config within their limits)"
            )));
        }
        let saved: Saved = serde_json::from_slice(&json).map_err(|e| fmt(e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let manifest_bytes = b64
            .decode(&saved.manifest)
            .map_err(|e| fmt(format!("manifest: {e}")))?;
        let config_bytes = b64
            .decode(&saved.config)
            .map_err(|e| fmt(format!("config: {e}")))?;
        let manifest_digest = Digest::sha256_of(&manifest_bytes);
        if manifest_digest != *pinned && saved.index_digest.as_ref() != Some(pinned) {
            return Err(fmt(format!(
                "its manifest is {manifest_digest}, not the {pinned} the reference names"
            )));
        }
        let manifest = match parse_document(&manifest_bytes, Some(&saved.media_type), &what)? {
            Document::Manifest(m) => *m,
            Document::Index(_) => return Err(fmt("an index, not a manifest".into())),
        };
        crate::verify(&what, &config_bytes, &manifest.config.digest)?;
        Ok(Preresolved::new(
            inner,
            ResolvedImage {
                manifest_bytes,
                manifest_digest,
                manifest,
                config_bytes,
                index_digest: saved.index_digest,
            },
        ))
    }
}

impl ImageSource for Preresolved {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        match &self.platform {
            Some(p) if p != platform => self.inner.resolve(platform),
            _ => Ok(self.resolved.clone()),
        }
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        self.inner.open_blob(desc, offset)
    }

    fn open_range(
        &self,
        desc: &Descriptor,
        offset: u64,
        len: u64,
    ) -> Result<Box<dyn Read + Send>, OciError> {
        self.inner.open_range(desc, offset, len)
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        self.inner.read_range(desc, offset, len)
    }

    fn read_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        self.inner.read_ranges(desc, ranges)
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that only describes itself (no blob is read here).
    struct Nowhere;
    impl ImageSource for Nowhere {
        fn resolve(&self, _: &Platform) -> Result<ResolvedImage, OciError> {
            unreachable!("a preresolved source does not resolve again")
        }
        fn open_blob(&self, _: &Descriptor, _: u64) -> Result<Box<dyn Read + Send>, OciError> {
            unreachable!("no blob is read here")
        }
        fn describe(&self) -> String {
            "nowhere".into()
        }
    }

    fn image() -> ResolvedImage {
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
            Digest::sha256_of(config),
            config.len()
        );
        let manifest_bytes = manifest.into_bytes();
        let Document::Manifest(m) = parse_document(&manifest_bytes, None, "test").unwrap() else {
            panic!("a manifest")
        };
        ResolvedImage {
            manifest_digest: Digest::sha256_of(&manifest_bytes),
            manifest_bytes,
            manifest: *m,
            config_bytes: config.to_vec(),
            index_digest: None,
        }
    }

    #[test]
    fn what_is_written_reads_back_when_the_digest_is_the_pinned_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolved.json");
        let r = image();
        write(&path, &r).unwrap();
        let p = Preresolved::read(Box::new(Nowhere), &path, &r.manifest_digest).unwrap();
        let back = p.resolve(&Platform::host_default()).unwrap();
        assert_eq!(back.manifest_bytes, r.manifest_bytes);
        assert_eq!(back.config_bytes, r.config_bytes);
        assert_eq!(back.manifest_digest, r.manifest_digest);
        assert_eq!(p.describe(), "nowhere");
    }

    #[test]
    fn another_digest_or_a_changed_config_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolved.json");
        let r = image();
        write(&path, &r).unwrap();
        let other = Digest::sha256_of(b"another image");
        let e = Preresolved::read(Box::new(Nowhere), &path, &other)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("not the"), "{e}");

        let mut changed = r.clone();
        changed.config_bytes = br#"{"architecture":"arm64"}"#.to_vec();
        write(&path, &changed).unwrap();
        let e = Preresolved::read(Box::new(Nowhere), &path, &r.manifest_digest)
            .err()
            .expect("refused");
        assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
    }

    #[test]
    fn an_oversized_or_broken_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolved.json");
        std::fs::write(&path, b"{not json").unwrap();
        let d = Digest::sha256_of(b"x");
        let e = Preresolved::read(Box::new(Nowhere), &path, &d)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("resolved.json"), "{e}");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        let e = Preresolved::read(Box::new(Nowhere), &path, &d)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    /// The manifest and config as containerd's content store holds them
    /// are the image; one missing is none (the caller asks the
    /// registry); one whose bytes are not its digest's, or an index, is
    /// an error naming it.
    #[test]
    fn an_image_is_read_from_a_content_store_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(blobs.join("sha256")).unwrap();
        let put = |bytes: &[u8]| {
            let d = Digest::sha256_of(bytes);
            std::fs::write(blobs.join("sha256").join(d.hex()), bytes).unwrap();
            d
        };
        let r = image();
        // nothing there yet
        assert!(
            from_content_store(&blobs, &r.manifest_digest)
                .unwrap()
                .is_none()
        );
        assert!(
            from_content_store(&dir.path().join("nowhere"), &r.manifest_digest)
                .unwrap()
                .is_none()
        );
        put(&r.manifest_bytes);
        // the manifest without its config
        assert!(
            from_content_store(&blobs, &r.manifest_digest)
                .unwrap()
                .is_none()
        );
        let config = put(&r.config_bytes);
        let back = from_content_store(&blobs, &r.manifest_digest)
            .unwrap()
            .unwrap();
        assert_eq!(back.manifest_bytes, r.manifest_bytes);
        assert_eq!(back.config_bytes, r.config_bytes);
        assert_eq!(back.manifest.config.digest, config);
        // a config changed in place
        std::fs::write(blobs.join("sha256").join(config.hex()), b"{}").unwrap();
        let Err(e) = from_content_store(&blobs, &r.manifest_digest) else {
            panic!("a changed config is refused");
        };
        assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
        // an index where a manifest was named
        let index = put(br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#);
        let Err(e) = from_content_store(&blobs, &index) else {
            panic!("an index is refused");
        };
        assert!(e.to_string().contains("an index"), "{e}");
    }
}
