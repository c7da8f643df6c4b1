//! Manifests, indexes, configs and media types.
//!
//! Parsing is tolerant (unknown fields ignored) and never replaces bytes:
//! callers keep the exact bytes they fetched, since digests cover bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use strata_digest::Digest;

use crate::OciError;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest type we accept, for `Accept` headers.
pub const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A platform: `os/architecture[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// GOARCH style, e.g. `amd64`.
    pub architecture: String,
    /// e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine (GOARCH naming).
    pub fn host_default() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    /// Whether an index entry's platform satisfies this wanted platform.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || self.variant == other.variant)
    }
}

impl FromStr for Platform {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || OciError::Format {
            what: format!("platform {s:?}"),
            reason: "expected os/arch[/variant]".into(),
        };
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type.
    #[serde(default)]
    pub media_type: String,
    /// Digest of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Alternate URLs (foreign layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

/// An image manifest (OCI or Docker schema2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The manifest's media type.
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// Layers, bottom to top.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// A parsed manifest-or-index document.
#[derive(Debug, Clone)]
pub enum Document {
    /// One image (boxed: it is much larger than an index's entry list).
    Manifest(Box<Manifest>),
    /// An index / manifest list.
    Index(Vec<Descriptor>),
}

/// Parse a manifest or index. `content_type` (from HTTP or a descriptor)
/// is used when the document has no `mediaType`.
pub fn parse_document(
    bytes: &[u8],
    content_type: Option<&str>,
    what: &str,
) -> Result<Document, OciError> {
    let fmt_err = |reason: String| OciError::Format {
        what: what.to_string(),
        reason,
    };
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| fmt_err(format!("not a manifest: {e}")))?;
    if raw.schema_version == Some(1) {
        return Err(fmt_err("Docker schema1 manifests are not supported".into()));
    }
    let mt = raw
        .media_type
        .clone()
        .or_else(|| content_type.map(|s| s.split(';').next().unwrap_or(s).trim().to_string()))
        .unwrap_or_default();
    let is_index =
        mt == OCI_INDEX || mt == DOCKER_LIST || (raw.manifests.is_some() && raw.config.is_none());
    if is_index {
        return Ok(Document::Index(raw.manifests.unwrap_or_default()));
    }
    let config = raw
        .config
        .ok_or_else(|| fmt_err("manifest has no config".into()))?;
    let media_type = if mt.is_empty() {
        OCI_MANIFEST.to_string()
    } else {
        mt
    };
    if media_type != OCI_MANIFEST && media_type != DOCKER_MANIFEST {
        return Err(fmt_err(format!(
            "unsupported manifest media type {media_type:?}"
        )));
    }
    Ok(Document::Manifest(Box::new(Manifest {
        media_type,
        config,
        layers: raw.layers.unwrap_or_default(),
        annotations: raw.annotations,
    })))
}

/// Pick the index entry for `platform`.
pub fn pick_platform<'a>(
    entries: &'a [Descriptor],
    platform: &Platform,
    image: &str,
) -> Result<&'a Descriptor, OciError> {
    entries
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .or_else(|| {
            // single entry without platform info: take it
            (entries.len() == 1 && entries[0].platform.is_none()).then(|| &entries[0])
        })
        .ok_or_else(|| OciError::NoPlatform {
            image: image.to_string(),
            wanted: platform.to_string(),
            available: entries
                .iter()
                .map(|d| {
                    d.platform
                        .as_ref()
                        .map_or("(none)".to_string(), |p| p.to_string())
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// Plain tar.
    None,
    /// gzip (incl. eStargz).
    Gzip,
    /// zstd (incl. zstd:chunked).
    Zstd,
}

/// The compression of a layer media type; unknown types are errors.
pub fn layer_compression(media_type: &str) -> Result<LayerCompression, OciError> {
    Ok(match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => LayerCompression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => LayerCompression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => LayerCompression::Zstd,
        other => {
            return Err(OciError::Format {
                what: format!("reading layer media type {other:?}"),
                reason: "unknown layer media type (expected an OCI or Docker tar, tar+gzip or tar+zstd layer)".into(),
            });
        }
    })
}

/// The parts of an image config strata needs.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// `rootfs.diff_ids`.
    pub diff_ids: Vec<Digest>,
    /// `os`.
    pub os: String,
    /// `architecture`.
    pub architecture: String,
    /// The whole config document, for fields strata does not model.
    pub raw: serde_json::Value,
}

/// Parse an image config.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, OciError> {
    #[derive(Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<Digest>,
    }
    #[derive(Deserialize)]
    struct Raw {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        rootfs: RootFs,
    }
    let fmt_err = |e: serde_json::Error| OciError::Format {
        what: "parsing image config".into(),
        reason: e.to_string(),
    };
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(fmt_err)?;
    let parsed: Raw = serde_json::from_value(value.clone()).map_err(fmt_err)?;
    Ok(ImageConfig {
        diff_ids: parsed.rootfs.diff_ids,
        os: parsed.os,
        architecture: parsed.architecture,
        raw: value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_FOREIGN: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn oci_and_docker_manifests() {
        let oci = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D}","size":3}}]}}"#
        );
        match parse_document(oci.as_bytes(), None, "m").unwrap() {
            Document::Manifest(m) => {
                assert_eq!(m.layers.len(), 1);
                assert_eq!(m.layers[0].size, 3);
            }
            _ => panic!(),
        }
        // Docker schema2 without mediaType in the body but in Content-Type
        let docker = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{D}","size":2}},"layers":[]}}"#
        );
        match parse_document(docker.as_bytes(), Some(DOCKER_MANIFEST), "m").unwrap() {
            Document::Manifest(m) => assert_eq!(m.media_type, DOCKER_MANIFEST),
            _ => panic!(),
        }
        assert!(
            parse_document(br#"{"schemaVersion":1}"#, None, "m")
                .unwrap_err()
                .to_string()
                .contains("schema1")
        );
        assert!(parse_document(b"nope", None, "m").is_err());
    }

    #[test]
    fn index_platform_pick() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1,"platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":2,"platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let Document::Index(entries) = parse_document(idx.as_bytes(), None, "i").unwrap() else {
            panic!()
        };
        let amd = pick_platform(&entries, &"linux/amd64".parse().unwrap(), "x").unwrap();
        assert_eq!(amd.size, 2);
        let arm = pick_platform(&entries, &"linux/arm64".parse().unwrap(), "x").unwrap();
        assert_eq!(arm.size, 1);
        let e = pick_platform(&entries, &"linux/s390x".parse().unwrap(), "x").unwrap_err();
        assert!(e.to_string().contains("linux/arm64/v8, linux/amd64"), "{e}");
    }

    #[test]
    fn platform_strings() {
        for (input, os, arch, variant) in [
            ("linux/amd64", "linux", "amd64", None),
            ("linux/arm64/v8", "linux", "arm64", Some("v8")),
            ("windows/amd64", "windows", "amd64", None),
        ] {
            let p: Platform = input.parse().unwrap();
            assert_eq!(
                (p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()),
                (os, arch, variant)
            );
            assert_eq!(p.to_string(), input);
        }
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", ""] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        let host = Platform::host_default();
        assert_eq!(host.os, "linux");
        assert!(!host.architecture.is_empty() && host.architecture != "x86_64");
        // a wanted platform without variant takes any variant, not vice versa
        let any: Platform = "linux/arm64".parse().unwrap();
        let v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(any.matches(&v8) && !v8.matches(&any) && v8.matches(&v8));
    }

    #[test]
    fn docker_manifest_list() {
        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{D}","size":7,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Document::Index(entries) = parse_document(list.as_bytes(), None, "l").unwrap() else {
            panic!("a manifest list is an index")
        };
        assert_eq!(
            pick_platform(&entries, &Platform::host_default(), "l")
                .map(|d| d.size)
                .ok(),
            (Platform::host_default().architecture == "amd64").then_some(7)
        );
        // an index found only through the Content-Type
        let bare = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D}","size":1}}]}}"#
        );
        let Document::Index(entries) =
            parse_document(bare.as_bytes(), Some(OCI_INDEX), "i").unwrap()
        else {
            panic!("an OCI index")
        };
        // one entry without platform: taken whatever is wanted
        assert_eq!(
            pick_platform(&entries, &"linux/riscv64".parse().unwrap(), "i")
                .unwrap()
                .size,
            1
        );
        // unknown fields and annotations are tolerated and kept
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"x","config":{{"mediaType":"c","digest":"{D}","size":2,"annotations":{{"k":"v"}}}},"layers":[{{"mediaType":"{DOCKER_FOREIGN}","digest":"{D}","size":3,"urls":["https://example.com/l"]}}],"annotations":{{"a":"b"}}}}"#
        );
        let Document::Manifest(m) = parse_document(m.as_bytes(), None, "m").unwrap() else {
            panic!("a manifest")
        };
        assert_eq!(m.config.annotations["k"], "v");
        assert_eq!(m.annotations["a"], "b");
        assert_eq!(m.layers[0].urls, ["https://example.com/l"]);
        assert_eq!(
            layer_compression(&m.layers[0].media_type).unwrap(),
            LayerCompression::Gzip
        );
        // a Docker manifest list is not an image manifest
        let e = parse_document(br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json","config":{"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":1}}"#, None, "m").unwrap_err();
        assert!(
            e.to_string().contains("unsupported manifest media type"),
            "{e}"
        );
    }

    #[test]
    fn media_types() {
        assert_eq!(
            layer_compression("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            LayerCompression::Zstd
        );
        assert_eq!(
            layer_compression("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            LayerCompression::Gzip
        );
        for (mt, c) in [
            (
                "application/vnd.oci.image.layer.v1.tar",
                LayerCompression::None,
            ),
            (
                "application/vnd.oci.image.layer.v1.tar+gzip",
                LayerCompression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar",
                LayerCompression::None,
            ),
            (DOCKER_FOREIGN, LayerCompression::Gzip),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                LayerCompression::Zstd,
            ),
        ] {
            assert_eq!(layer_compression(mt).unwrap(), c, "{mt}");
        }
        let e = layer_compression("application/vnd.example.unknown").unwrap_err();
        assert!(e.to_string().contains("unknown layer media type"), "{e}");
        assert!(
            e.to_string().contains("application/vnd.example.unknown"),
            "{e}"
        );
    }

    #[test]
    fn config_diff_ids() {
        let c = format!(
            r#"{{"os":"linux","architecture":"amd64","rootfs":{{"type":"layers","diff_ids":["{D}"]}}}}"#
        );
        let cfg = parse_config(c.as_bytes()).unwrap();
        assert_eq!(cfg.diff_ids.len(), 1);
        assert_eq!(
            (cfg.os.as_str(), cfg.architecture.as_str()),
            ("linux", "amd64")
        );
        assert_eq!(cfg.raw["rootfs"]["type"], "layers");
        assert!(parse_config(b"{}").is_err());
    }
}
