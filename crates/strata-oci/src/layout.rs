//! Local sources: OCI image layouts (`oci:`), their tar archives
//! (`oci-archive:`), and `docker save` archives (`docker-archive:`).
//!
//! Archives are unpacked into a private temporary directory held by the
//! source (members are checked not to escape it). A docker archive has no
//! manifest of its own: we synthesize an OCI manifest whose bytes are
//! canonical (keys sorted, no whitespace), so pulling the same archive
//! twice gives the same manifest digest:
//!
//! ```text
//! {"config":{"digest":D,"mediaType":"application/vnd.oci.image.config.v1+json","size":N},
//!  "layers":[{"digest":D,"mediaType":"application/vnd.oci.image.layer.v1.tar[+gzip|+zstd]","size":N},..],
//!  "mediaType":"application/vnd.oci.image.manifest.v1+json","schemaVersion":2}
//! ```
//!
//! The `manifest_digest` of such an image is the sha256 of those synthesized
//! bytes; it is stable for one archive but is not the digest the image has in
//! any registry. Layer media types are sniffed from magic bytes (docker
//! writes plain tars, older tools sometimes gzip), and layer digests are
//! computed by hashing the member files.
//!
//! Docker 25+ writes `docker save` archives that are also OCI layouts
//! (`index.json` beside `manifest.json`); those are read as layouts, so the
//! real manifest and its registry digest are kept. There `TAG` is matched
//! against the `io.containerd.image.name` annotation (`repo:tag`, Docker Hub
//! names normalized) and then against `org.opencontainers.image.ref.name`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use strata_digest::{Digest, Hasher};

use crate::io_err;
use crate::manifest::{Document, OCI_MANIFEST, parse_document, pick_platform};
use crate::{Descriptor, ImageSource, OciError, Platform, ResolvedImage, verify};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Normalize a docker image name for comparison: `debian` ->
/// `docker.io/library/debian:latest`, `a/b:1` -> `docker.io/a/b:1`.
fn normalize_docker_name(name: &str) -> String {
    let name = name.split('@').next().unwrap_or(name);
    let last = name.rsplit('/').next().unwrap_or(name);
    let mut n = if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    };
    let first = n.split('/').next().unwrap_or("");
    let has_host =
        n.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if !has_host {
        n = if n.contains('/') {
            format!("docker.io/{n}")
        } else {
            format!("docker.io/library/{n}")
        };
    } else if let Some(rest) = n.strip_prefix("docker.io/")
        && !rest.contains('/')
    {
        n = format!("docker.io/library/{rest}");
    }
    n
}

/// An OCI image layout directory (possibly unpacked from an archive).
pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
    describe: String,
    /// Match `tag` as a docker name (`repo:tag`) against
    /// `io.containerd.image.name` first (docker save archives).
    docker_names: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl LayoutSource {
    /// Open a layout directory.
    pub fn open(dir: PathBuf, tag: Option<String>, describe: String) -> Result<Self, OciError> {
        let layout = dir.join("oci-layout");
        if !layout.is_file() {
            return Err(OciError::Io {
                action: "opening OCI layout".into(),
                path: dir.clone(),
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    "no oci-layout file: not an OCI image layout",
                ),
            });
        }
        Ok(LayoutSource {
            dir,
            tag,
            describe,
            docker_names: false,
            _tmp: None,
        })
    }

    /// Unpack an `oci-archive:` tar and open it.
    pub fn open_archive(
        file: &Path,
        tag: Option<String>,
        describe: String,
    ) -> Result<Self, OciError> {
        let tmp = unpack_archive(file)?;
        let mut s = Self::open(tmp.path().to_path_buf(), tag, describe)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(d.algorithm().name())
            .join(d.hex())
    }

    /// A manifest, index or config, at most `limit` bytes (checked
    /// against the descriptor and the file before it is read).
    fn read_blob(&self, desc: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>, OciError> {
        let p = self.blob_path(&desc.digest);
        let too_big = |n: u64| OciError::Format {
            what: format!("{} {what} {}", self.describe, desc.digest),
            reason: format!("{n} bytes, more than {limit} (the {what} size limit)"),
        };
        if desc.size > limit {
            return Err(too_big(desc.size));
        }
        let bytes = read_at_most(&p, limit).map_err(io_err(&format!("reading {what}"), &p))?;
        if bytes.len() as u64 > limit {
            return Err(too_big(bytes.len() as u64));
        }
        verify(
            &format!("{} {what} {}", self.describe, desc.digest),
            &bytes,
            &desc.digest,
        )?;
        Ok(bytes)
    }
}

impl ImageSource for LayoutSource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        let index_path = self.dir.join("index.json");
        let limit = crate::limits::current().manifest_bytes;
        let index_bytes =
            read_at_most(&index_path, limit).map_err(io_err("reading", &index_path))?;
        if index_bytes.len() as u64 > limit {
            return Err(OciError::Format {
                what: format!("{} index.json", self.describe),
                reason: format!("more than {limit} bytes (the manifest size limit)"),
            });
        }
        let Document::Index(entries) = parse_document(
            &index_bytes,
            Some(crate::manifest::OCI_INDEX),
            &format!("{} index.json", self.describe),
        )?
        else {
            return Err(OciError::Format {
                what: format!("{} index.json", self.describe),
                reason: "not an index".into(),
            });
        };
        let name_key = if self.docker_names {
            CONTAINERD_NAME
        } else {
            REF_NAME
        };
        let mut tags: Vec<&str> = entries
            .iter()
            .filter_map(|d| d.annotations.get(name_key).map(|s| s.as_str()))
            .collect();
        tags.dedup();
        let tag_list = if tags.is_empty() {
            "(none)".to_string()
        } else {
            tags.join(", ")
        };
        let candidates: Vec<Descriptor> = match &self.tag {
            Some(t) => {
                let wanted = normalize_docker_name(t);
                let mut by_name: Vec<Descriptor> = Vec::new();
                if self.docker_names {
                    by_name = entries
                        .iter()
                        .filter(|d| {
                            d.annotations
                                .get(CONTAINERD_NAME)
                                .map(|n| normalize_docker_name(n))
                                == Some(wanted.clone())
                        })
                        .cloned()
                        .collect();
                }
                if by_name.is_empty() {
                    by_name = entries
                        .iter()
                        .filter(|d| d.annotations.get(REF_NAME) == Some(t))
                        .cloned()
                        .collect();
                }
                if by_name.is_empty() {
                    return Err(OciError::Format {
                        what: format!("resolving {}", self.describe),
                        reason: format!("no image tagged {t:?} in the layout; tags: {tag_list}"),
                    });
                }
                by_name
            }
            None => entries.clone(),
        };
        let chosen = match candidates.as_slice() {
            [] => {
                return Err(OciError::Format {
                    what: format!("resolving {}", self.describe),
                    reason: "the layout's index.json lists no images".into(),
                });
            }
            [one] => one.clone(),
            // several entries for one tag: one per platform
            many if self.tag.is_some() || many.iter().all(|d| d.platform.is_some()) => {
                pick_platform(many, platform, &self.describe)?.clone()
            }
            many => {
                return Err(OciError::Format {
                    what: format!("resolving {}", self.describe),
                    reason: format!(
                        "the layout holds {} images: name one of: {tag_list}",
                        many.len()
                    ),
                });
            }
        };
        let mut desc = chosen;
        let mut index_digest = None;
        for _ in 0..4 {
            let bytes =
                self.read_blob(&desc, "manifest", crate::limits::current().manifest_bytes)?;
            match parse_document(
                &bytes,
                Some(&desc.media_type),
                &format!("{} manifest {}", self.describe, desc.digest),
            )? {
                Document::Manifest(manifest) => {
                    let config_bytes = self.read_blob(
                        &manifest.config,
                        "config",
                        crate::limits::current().config_bytes,
                    )?;
                    return Ok(ResolvedImage {
                        manifest_digest: desc.digest,
                        manifest_bytes: bytes,
                        manifest: *manifest,
                        config_bytes,
                        index_digest,
                    });
                }
                Document::Index(entries) => {
                    index_digest = Some(desc.digest);
                    desc = pick_platform(&entries, platform, &self.describe)?.clone();
                }
            }
        }
        Err(OciError::Format {
            what: format!("resolving {}", self.describe),
            reason: "indexes nested too deep".into(),
        })
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        let p = self.blob_path(&desc.digest);
        let mut f = File::open(&p).map_err(io_err("opening blob", &p))?;
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))
                .map_err(io_err("seeking blob", &p))?;
        }
        Ok(Box::new(io::BufReader::with_capacity(256 * 1024, f)))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

/// The first `limit + 1` bytes of a file (one more than allowed tells).
fn read_at_most(p: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(p)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn unpack_archive(file: &Path) -> Result<tempfile::TempDir, OciError> {
    let f = File::open(file).map_err(io_err("opening archive", file))?;
    let tmp = tempfile::Builder::new()
        .prefix("strata-archive-")
        .tempdir()
        .map_err(io_err("creating temp dir for", file))?;
    let mut ar = tar::Archive::new(io::BufReader::new(f));
    ar.set_preserve_permissions(false);
    ar.set_unpack_xattrs(false);
    for entry in ar.entries().map_err(io_err("reading archive", file))? {
        let mut entry = entry.map_err(io_err("reading archive", file))?;
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            // layouts hold only files and dirs; links could point anywhere
            continue;
        }
        // unpack_in refuses paths that escape the directory
        let ok = entry
            .unpack_in(tmp.path())
            .map_err(io_err("unpacking archive", file))?;
        if !ok {
            return Err(OciError::Format {
                what: format!("archive {}", file.display()),
                reason: "a member path leaves the archive root".into(),
            });
        }
    }
    Ok(tmp)
}

/// A `docker save` archive: either the classic format (`manifest.json`
/// only; an OCI manifest is synthesized) or Docker 25+'s, which is also an
/// OCI layout and is read as one.
pub struct DockerArchiveSource {
    format: DockerArchiveFormat,
}

enum DockerArchiveFormat {
    Classic(ClassicDockerArchive),
    Layout(LayoutSource),
}

struct ClassicDockerArchive {
    tmp: tempfile::TempDir,
    tag: Option<String>,
    describe: String,
    blobs: std::sync::Mutex<HashMap<Digest, PathBuf>>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

impl DockerArchiveSource {
    /// Unpack and open a docker archive.
    pub fn open(file: &Path, tag: Option<String>, describe: String) -> Result<Self, OciError> {
        let tmp = unpack_archive(file)?;
        if tmp.path().join("index.json").is_file() && tmp.path().join("oci-layout").is_file() {
            let mut layout = LayoutSource::open(tmp.path().to_path_buf(), tag, describe)?;
            layout.docker_names = true;
            layout._tmp = Some(tmp);
            return Ok(DockerArchiveSource {
                format: DockerArchiveFormat::Layout(layout),
            });
        }
        Ok(DockerArchiveSource {
            format: DockerArchiveFormat::Classic(ClassicDockerArchive {
                tmp,
                tag,
                describe,
                blobs: std::sync::Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl ImageSource for DockerArchiveSource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        match &self.format {
            DockerArchiveFormat::Classic(c) => c.resolve(platform),
            DockerArchiveFormat::Layout(l) => l.resolve(platform),
        }
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        match &self.format {
            DockerArchiveFormat::Classic(c) => c.open_blob(desc, offset),
            DockerArchiveFormat::Layout(l) => l.open_blob(desc, offset),
        }
    }

    fn describe(&self) -> String {
        match &self.format {
            DockerArchiveFormat::Classic(c) => c.describe(),
            DockerArchiveFormat::Layout(l) => l.describe(),
        }
    }
}

impl ClassicDockerArchive {
    fn member(&self, rel: &str) -> Result<PathBuf, OciError> {
        if rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            return Err(OciError::Format {
                what: format!("reading {} manifest.json", self.describe),
                reason: format!("manifest.json names a path outside the archive: {rel:?}"),
            });
        }
        Ok(self.tmp.path().join(rel))
    }
}

fn sniff_and_hash(p: &Path) -> Result<(Digest, u64, &'static str), OciError> {
    let mut f = File::open(p).map_err(io_err("opening layer", p))?;
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut head = Vec::new();
    loop {
        let n = f.read(&mut buf).map_err(io_err("reading layer", p))?;
        if n == 0 {
            break;
        }
        if head.len() < 4 {
            head.extend_from_slice(&buf[..n.min(4)]);
        }
        h.update(&buf[..n]);
    }
    let mt = if head.starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    };
    let size = h.len();
    Ok((h.finish(), size, mt))
}

impl ImageSource for ClassicDockerArchive {
    fn resolve(&self, _platform: &Platform) -> Result<ResolvedImage, OciError> {
        let mpath = self.tmp.path().join("manifest.json");
        let limits = crate::limits::current();
        let bytes = read_at_most(&mpath, limits.manifest_bytes)
            .map_err(io_err("reading docker archive manifest.json", &mpath))?;
        if bytes.len() as u64 > limits.manifest_bytes {
            return Err(OciError::Format {
                what: format!("{} manifest.json", self.describe),
                reason: format!(
                    "more than {} bytes (the manifest size limit)",
                    limits.manifest_bytes
                ),
            });
        }
        let entries: Vec<DockerManifestEntry> =
            serde_json::from_slice(&bytes).map_err(|e| OciError::Format {
                what: format!("{} manifest.json", self.describe),
                reason: e.to_string(),
            })?;
        let all_tags: Vec<String> = entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect();
        let entry = match &self.tag {
            Some(t) => entries
                .iter()
                .find(|e| {
                    let wanted = normalize_docker_name(t);
                    e.repo_tags.as_ref().is_some_and(|tags| {
                        tags.iter()
                            .any(|x| x == t || normalize_docker_name(x) == wanted)
                    })
                })
                .ok_or_else(|| OciError::Format {
                    what: format!("resolving {}", self.describe),
                    reason: format!("no image tagged {t:?}; tags: {}", all_tags.join(", ")),
                })?,
            None if entries.len() == 1 => &entries[0],
            None => {
                return Err(OciError::Format {
                    what: format!("resolving {}", self.describe),
                    reason: format!(
                        "the archive holds {} images: name one of: {}",
                        entries.len(),
                        all_tags.join(", ")
                    ),
                });
            }
        };
        let cpath = self.member(&entry.config)?;
        let config_bytes =
            read_at_most(&cpath, limits.config_bytes).map_err(io_err("reading config", &cpath))?;
        if config_bytes.len() as u64 > limits.config_bytes {
            return Err(OciError::Format {
                what: format!("{} config {}", self.describe, entry.config),
                reason: format!(
                    "more than {} bytes (the config size limit)",
                    limits.config_bytes
                ),
            });
        }
        let config_digest = Digest::sha256_of(&config_bytes);
        let mut blobs = self.blobs.lock().expect("no panics while held");
        blobs.insert(config_digest, cpath.clone());
        let mut layers = Vec::new();
        for l in &entry.layers {
            let p = self.member(l)?;
            let (digest, size, mt) = sniff_and_hash(&p)?;
            blobs.insert(digest, p);
            layers.push(serde_json::json!({"mediaType": mt, "digest": digest, "size": size}));
        }
        // serde_json's default map is sorted: canonical bytes.
        let manifest_json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config_bytes.len(),
            },
            "layers": layers,
        });
        let manifest_bytes = serde_json::to_vec(&manifest_json).map_err(|e| OciError::Format {
            what: format!("synthesizing a manifest for {}", self.describe),
            reason: e.to_string(),
        })?;
        let Document::Manifest(manifest) = parse_document(&manifest_bytes, None, &self.describe)?
        else {
            return Err(OciError::Format {
                what: format!("synthesizing a manifest for {}", self.describe),
                reason: "the synthesized document does not parse as a manifest".into(),
            });
        };
        Ok(ResolvedImage {
            manifest_digest: Digest::sha256_of(&manifest_bytes),
            manifest_bytes,
            manifest: *manifest,
            config_bytes,
            index_digest: None,
        })
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        let p = self
            .blobs
            .lock()
            .expect("no panics while held")
            .get(&desc.digest)
            .cloned()
            .ok_or_else(|| OciError::Format {
                what: format!("opening blob {} of {}", desc.digest, self.describe),
                reason: "not a layer of the resolved image (resolve first)".into(),
            })?;
        let mut f = File::open(&p).map_err(io_err("opening layer", &p))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(io_err("seeking layer", &p))?;
        Ok(Box::new(io::BufReader::with_capacity(256 * 1024, f)))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names_normalize() {
        for (a, b) in [
            ("debian", "docker.io/library/debian:latest"),
            ("debian:12", "docker.io/library/debian:12"),
            ("docker.io/debian:12", "docker.io/library/debian:12"),
            ("docker.io/library/debian:12", "docker.io/library/debian:12"),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("reg.io:5000/a/b:c", "reg.io:5000/a/b:c"),
            ("reg.io:5000/a", "reg.io:5000/a:latest"),
        ] {
            assert_eq!(normalize_docker_name(a), b, "{a}");
        }
    }
}
