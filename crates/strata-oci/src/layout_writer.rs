//! Writing OCI image layouts: the fixtures of tests and the `oci:` side of
//! exports.
//!
//! ```text
//! DIR/
//!   oci-layout            {"imageLayoutVersion":"1.0.0"}
//!   index.json            {"schemaVersion":2,"mediaType":"…index.v1+json","manifests":[…]}
//!   blobs/sha256/<hex>    every blob, named by its digest
//! ```
//!
//! `index.json` is rewritten after every [`OciLayoutWriter::add_manifest`], so
//! the layout is readable at any point. Blobs are written to a temporary
//! file and renamed, so a blob file is either absent or complete.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;
use strata_digest::Digest;

use crate::io_err;
use crate::manifest::{OCI_INDEX, OCI_MANIFEST};
use crate::{Descriptor, OciError, Platform};

/// The media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Creates an OCI image layout directory and adds blobs and manifests to it.
#[derive(Debug)]
pub struct OciLayoutWriter {
    dir: PathBuf,
    manifests: Vec<Descriptor>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: &'a [Descriptor],
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    config: &'a Descriptor,
    layers: &'a [Descriptor],
    #[serde(skip_serializing_if = "Option::is_none")]
    subject: Option<&'a Descriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// Blobs are world-readable like skopeo's (temporary files start 0600).
fn readable(f: &fs::File, path: &Path) -> Result<(), OciError> {
    use std::os::unix::fs::PermissionsExt as _;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err("setting the mode of", path))
}

fn json_err(what: &str) -> impl FnOnce(serde_json::Error) -> OciError {
    let what = what.to_string();
    move |e| OciError::Format {
        what,
        reason: e.to_string(),
    }
}

/// The bytes of an OCI image manifest for `config` and `layers`, with a
/// `subject` (the manifest it refers to) when given (compact JSON, fields
/// in spec order).
pub fn oci_manifest_bytes(
    config: &Descriptor,
    layers: &[Descriptor],
    subject: Option<&Descriptor>,
    annotations: &BTreeMap<String, String>,
) -> Result<Vec<u8>, OciError> {
    serde_json::to_vec(&ManifestOut {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        config,
        layers,
        subject,
        annotations,
    })
    .map_err(json_err("encoding an OCI manifest"))
}

/// The bytes of an OCI image index listing `manifests`.
pub fn oci_index_bytes(manifests: &[Descriptor]) -> Result<Vec<u8>, OciError> {
    serde_json::to_vec(&IndexOut {
        schema_version: 2,
        media_type: OCI_INDEX,
        manifests,
    })
    .map_err(json_err("encoding an OCI index"))
}

impl OciLayoutWriter {
    /// Create a layout at `dir` (created if missing; an existing
    /// `index.json` there is replaced).
    pub fn create(dir: &Path) -> Result<Self, OciError> {
        let blobs = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(io_err("creating OCI layout", &blobs))?;
        let layout = dir.join("oci-layout");
        fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(io_err("writing", &layout))?;
        let w = OciLayoutWriter {
            dir: dir.to_path_buf(),
            manifests: Vec::new(),
        };
        w.write_index()?;
        Ok(w)
    }

    /// Open the layout at `dir`, keeping the manifests its `index.json`
    /// lists (a later tag of the same name replaces the old entry), or
    /// create it.
    pub fn open_or_create(dir: &Path) -> Result<Self, OciError> {
        let index = dir.join("index.json");
        let existing: Vec<Descriptor> = match fs::read(&index) {
            Ok(b) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&b).map_err(json_err("reading index.json"))?;
                serde_json::from_value(v.get("manifests").cloned().unwrap_or_default())
                    .map_err(json_err("reading index.json"))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_err("reading", &index)(e)),
        };
        let mut w = Self::create(dir)?;
        w.manifests = existing;
        w.write_index()?;
        Ok(w)
    }

    /// Move a finished temporary file into the layout as blob `digest`.
    pub fn add_blob_file(
        &mut self,
        media_type: &str,
        file: tempfile::NamedTempFile,
        digest: Digest,
        size: u64,
    ) -> Result<Descriptor, OciError> {
        let path = self.blob_path(&digest);
        readable(file.as_file(), file.path())?;
        file.as_file()
            .sync_all()
            .map_err(io_err("syncing blob", file.path()))?;
        file.persist(&path)
            .map_err(|e| io_err("writing blob", &path)(e.error))?;
        Ok(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
        })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob named `digest` lives in this layout.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    /// Store `bytes` as a blob and return its descriptor.
    pub fn add_blob(&mut self, media_type: &str, bytes: &[u8]) -> Result<Descriptor, OciError> {
        let digest = Digest::sha256_of(bytes);
        let path = self.blob_path(&digest);
        if !path.is_file() {
            let parent = path.parent().unwrap_or(&self.dir);
            let mut tmp = tempfile::NamedTempFile::new_in(parent)
                .map_err(io_err("creating a temporary blob in", parent))?;
            tmp.write_all(bytes)
                .map_err(io_err("writing blob", tmp.path()))?;
            readable(tmp.as_file(), tmp.path())?;
            tmp.persist(&path)
                .map_err(|e| io_err("writing blob", &path)(e.error))?;
        }
        Ok(Descriptor {
            media_type: media_type.to_string(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
        })
    }

    /// Store a manifest (or index) and list it in `index.json`, tagged
    /// `tag` (`org.opencontainers.image.ref.name`) when given. The media
    /// type is taken from the document's `mediaType` (OCI manifest if
    /// absent).
    pub fn add_manifest(
        &mut self,
        manifest_bytes: &[u8],
        tag: Option<&str>,
    ) -> Result<Descriptor, OciError> {
        self.add_manifest_for(manifest_bytes, tag, None)
    }

    /// Like [`add_manifest`](Self::add_manifest), recording `platform` in
    /// the index entry.
    pub fn add_manifest_for(
        &mut self,
        manifest_bytes: &[u8],
        tag: Option<&str>,
        platform: Option<Platform>,
    ) -> Result<Descriptor, OciError> {
        let doc: serde_json::Value = serde_json::from_slice(manifest_bytes)
            .map_err(json_err("adding a manifest to an OCI layout"))?;
        let media_type = doc
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or(OCI_MANIFEST)
            .to_string();
        let mut desc = self.add_blob(&media_type, manifest_bytes)?;
        if let Some(t) = tag {
            self.manifests
                .retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(t));
            desc.annotations.insert(REF_NAME.to_string(), t.to_string());
        }
        desc.platform = platform;
        self.manifests.push(desc.clone());
        self.write_index()?;
        Ok(desc)
    }

    /// Add a whole image: the config and layer blobs, then an OCI manifest
    /// naming them. `layers` are `(media type, bytes)`. Returns the
    /// manifest's descriptor and bytes.
    pub fn add_image(
        &mut self,
        config: &[u8],
        layers: &[(&str, &[u8])],
        tag: Option<&str>,
    ) -> Result<(Descriptor, Vec<u8>), OciError> {
        let config = self.add_blob(OCI_CONFIG, config)?;
        let layers = layers
            .iter()
            .map(|(mt, bytes)| self.add_blob(mt, bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = oci_manifest_bytes(&config, &layers, None, &BTreeMap::new())?;
        let desc = self.add_manifest(&manifest, tag)?;
        Ok((desc, manifest))
    }

    fn write_index(&self) -> Result<(), OciError> {
        let bytes = oci_index_bytes(&self.manifests)?;
        let path = self.dir.join("index.json");
        fs::write(&path, bytes).map_err(io_err("writing", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ImageSource;
    use crate::layout::LayoutSource;

    #[test]
    fn written_layout_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = OciLayoutWriter::create(dir.path()).unwrap();
        let cfg =
            br#"{"os":"linux","architecture":"amd64","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let (desc, bytes) = w.add_image(cfg, &[], Some("v1")).unwrap();
        assert_eq!(desc.digest, Digest::sha256_of(&bytes));
        let src =
            LayoutSource::open(dir.path().into(), Some("v1".into()), "oci:x:v1".into()).unwrap();
        let r = src.resolve(&Platform::host_default()).unwrap();
        assert_eq!(r.manifest_digest, desc.digest);
        assert_eq!(r.config_bytes, cfg);
        assert_eq!(r.manifest.config.media_type, OCI_CONFIG);
    }
}
