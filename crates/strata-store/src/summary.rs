//! What the store holds, as values to show: the images with their names
//! ([`Store::images`]), one image in full ([`Store::inspect_image`]), the
//! templates ([`Store::templates`], [`Store::inspect_template`]). Each is
//! `Serialize` (the CLI's `--json`, a server's responses) with typed
//! digests.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use strata_digest::{Digest, VerityDigest};

use crate::{ErofsInfo, Result, Store, StoreError, TemplateRemote};

/// An image and its names.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    /// The image.
    pub manifest_digest: Digest,
    /// Its names (none when only its digest reaches it).
    pub names: Vec<String>,
    /// Layers.
    pub layers: usize,
    /// Sum of the compressed layer sizes.
    pub compressed_size: u64,
}

impl ImageSummary {
    /// The column heads of its [`Display`](fmt::Display) rows.
    pub fn header() -> String {
        format!(
            "{:<60} {:<19} {:>6} {:>10}",
            "NAME", "DIGEST", "LAYERS", "SIZE"
        )
    }
}

/// A row per name (`<none>` without one): name, short digest, layers, size.
impl fmt::Display for ImageSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let none = ["<none>".to_string()];
        let names = if self.names.is_empty() {
            &none[..]
        } else {
            &self.names[..]
        };
        let (d, size) = (
            self.manifest_digest.short(),
            strata_ops::human_bytes(self.compressed_size),
        );
        for (i, n) in names.iter().enumerate() {
            let nl = if i > 0 { "\n" } else { "" };
            write!(f, "{nl}{n:<60} {d:<19} {:>6} {size:>10}", self.layers)?;
        }
        Ok(())
    }
}

/// An image in full: names, meta, tree, layers (with the images sharing
/// them), manifest and config.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInspect {
    /// Its names.
    pub names: Vec<String>,
    /// The image.
    pub manifest_digest: Digest,
    /// Manifest media type.
    pub manifest_media_type: String,
    /// Config digest.
    pub config_digest: Digest,
    /// Where it was first pulled from.
    pub source: String,
    /// Seconds since the epoch when it was committed.
    pub created: u64,
    /// Its EROFS image, once built.
    pub tree: Option<TreeInspect>,
    /// Layers, bottom first.
    pub layers: Vec<LayerInspect>,
    /// The manifest as stored.
    pub manifest: serde_json::Value,
    /// The config as stored.
    pub config: serde_json::Value,
}

/// An image's EROFS tree.
#[derive(Debug, Clone, Serialize)]
pub struct TreeInspect {
    /// Format written.
    pub format: String,
    /// The tree digest.
    pub tree_digest: Digest,
    /// The composefs image id.
    pub composefs_id: VerityDigest,
    /// Size of the flattened image.
    pub size: u64,
    /// Inodes.
    pub inodes: u64,
    /// When stored as a shared base and an upper part.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parts: Option<Parts>,
}

/// The two parts of a split image.
#[derive(Debug, Clone, Serialize)]
pub struct Parts {
    /// The shared base.
    pub base: BasePart,
    /// The image's own part.
    pub upper: Part,
}

/// The shared base part.
#[derive(Debug, Clone, Serialize)]
pub struct BasePart {
    /// Bottom layers it holds.
    pub layers: usize,
    /// Their chain id.
    pub chain_id: Digest,
    /// The part.
    #[serde(flatten)]
    pub part: Part,
}

/// One EROFS part.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    /// SHA-256 of its bytes.
    pub digest: Digest,
    /// Its composefs image id.
    pub composefs_id: VerityDigest,
    /// Size in bytes.
    pub size: u64,
}

impl From<&crate::PartInfo> for Part {
    fn from(p: &crate::PartInfo) -> Part {
        Part {
            digest: p.digest,
            composefs_id: p.verity,
            size: p.size,
        }
    }
}

impl From<ErofsInfo> for TreeInspect {
    fn from(i: ErofsInfo) -> TreeInspect {
        TreeInspect {
            parts: i.split.as_ref().map(|s| Parts {
                base: BasePart {
                    layers: s.base_layers,
                    chain_id: s.base_chain,
                    part: Part::from(&s.base),
                },
                upper: Part::from(&s.upper),
            }),
            format: i.format,
            tree_digest: i.tree_digest,
            composefs_id: i.composefs_id,
            size: i.size,
            inodes: i.inodes,
        }
    }
}

/// A layer of an inspected image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInspect {
    /// Position, bottom = 0.
    pub index: usize,
    /// The compressed blob's digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size.
    pub size: u64,
    /// The uncompressed layer's digest.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// Tar entries.
    pub entries: u64,
    /// Distinct objects.
    pub objects: u64,
    /// Other images using this layer.
    pub shared_with: Vec<Sharer>,
}

/// Another image using a layer.
#[derive(Debug, Clone, Serialize)]
pub struct Sharer {
    /// The image.
    pub manifest_digest: Digest,
    /// Its names.
    pub names: Vec<String>,
}

/// A template and its names.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateSummary {
    /// Its id.
    pub id: Digest,
    /// Its names.
    pub names: Vec<String>,
    /// Image size in bytes.
    pub size: u64,
    /// Distinct chunks.
    pub chunks: u64,
    /// The template it derives from.
    pub parent: Option<Digest>,
    /// 0 for a build from an image, parent's + 1 otherwise.
    pub generation: u32,
    /// The reference it was pulled from, when pulled.
    pub remote: Option<String>,
}

/// One line: names, short id, size, chunks, generation, where pulled from.
impl fmt::Display for TemplateSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = if self.names.is_empty() {
            "<none>".to_string()
        } else {
            self.names.join(",")
        };
        write!(
            f,
            "{names:<24} {}  {:>9}  {:>6} chunks  gen {}",
            &self.id.hex()[..12],
            strata_ops::human_bytes(self.size),
            self.chunks,
            self.generation,
        )?;
        match &self.remote {
            Some(r) => write!(f, "  (pulled from {r})"),
            None => Ok(()),
        }
    }
}

/// A template in full: map summary, lineage, build, remote.
#[derive(Debug, Clone, Serialize)]
pub struct TemplateInspect {
    /// Its id.
    pub id: Digest,
    /// Its names.
    pub names: Vec<String>,
    /// Image size in bytes.
    pub size: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// Chunks the size spans.
    pub chunks_total: u64,
    /// Non-zero chunks.
    pub chunks_nonzero: usize,
    /// Distinct non-zero chunks.
    pub chunks_distinct: usize,
    /// Of those, in the store.
    pub chunks_local: usize,
    /// Distinct chunks the parent (when in the store) does not have.
    pub chunks_new_vs_parent: Option<usize>,
    /// The template it derives from.
    pub parent: Option<Digest>,
    /// 0 for a build from an image, parent's + 1 otherwise.
    pub generation: u32,
    /// How it was made.
    pub build: BTreeMap<String, String>,
    /// Where it was pulled from.
    pub remote: Option<TemplateRemote>,
}

fn names_of(names: &BTreeMap<String, Digest>, d: &Digest) -> Vec<String> {
    names
        .iter()
        .filter(|(_, x)| *x == d)
        .map(|(n, _)| n.clone())
        .collect()
}

impl Store {
    /// Every image with its names.
    pub fn images(&self) -> Result<Vec<ImageSummary>> {
        let refs = self.refs()?;
        let mut out = Vec::new();
        for d in self.image_digests()? {
            let meta = self.image_meta(&d)?;
            out.push(ImageSummary {
                names: names_of(&refs, &d),
                layers: meta.layers.len(),
                compressed_size: meta.layers.iter().map(|l| l.blob.size).sum(),
                manifest_digest: d,
            });
        }
        Ok(out)
    }

    /// The image `digest` in full.
    pub fn inspect_image(&self, digest: &Digest) -> Result<ImageInspect> {
        let meta = self.image_meta(digest)?;
        let dir = self.image_dir(digest);
        let parse = |bytes: Vec<u8>, what: &'static str, file: &str| {
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                what,
                path: dir.join(file),
                reason: e.to_string(),
            })
        };
        let manifest = parse(self.image_manifest(digest)?, "manifest", "manifest")?;
        let config = parse(self.image_config(digest)?, "config", "config")?;
        let refs = self.refs()?;
        let mut layers = Vec::new();
        for (index, l) in meta.layers.iter().enumerate() {
            let lmeta = self.layer_meta(&l.diff_id)?;
            let shared_with = self
                .images_using_layer(&l.diff_id)?
                .into_iter()
                .filter(|other| other != digest)
                .map(|other| Sharer {
                    names: names_of(&refs, &other),
                    manifest_digest: other,
                })
                .collect();
            layers.push(LayerInspect {
                index,
                digest: l.blob.digest,
                media_type: l.blob.media_type.clone(),
                size: l.blob.size,
                diff_id: l.diff_id,
                uncompressed_size: lmeta.size,
                entries: lmeta.entries,
                objects: lmeta.objects,
                shared_with,
            });
        }
        Ok(ImageInspect {
            names: names_of(&refs, digest),
            manifest_digest: *digest,
            manifest_media_type: meta.manifest_media_type,
            config_digest: meta.config_digest,
            source: meta.source,
            created: meta.created,
            tree: self.erofs_info(digest).map(TreeInspect::from),
            layers,
            manifest,
            config,
        })
    }

    /// Every template with its names.
    pub fn templates(&self) -> Result<Vec<TemplateSummary>> {
        let names = self.template_names()?;
        let mut out = Vec::new();
        for id in self.template_ids()? {
            let map = self.template_map(&id)?;
            out.push(TemplateSummary {
                names: names_of(&names, &id),
                size: map.size,
                chunks: map.chunk_set().len() as u64,
                parent: map.parent,
                generation: map.generation,
                remote: self.template_remote(&id).map(|r| r.reference),
                id,
            });
        }
        Ok(out)
    }

    /// The template `id` in full.
    pub fn inspect_template(&self, id: &Digest) -> Result<TemplateInspect> {
        let map = self.template_map(id)?;
        let chunks = map.chunk_set();
        let parent_chunks = match map.parent {
            Some(p) if self.has_template(&p) => Some(self.template_map(&p)?.chunk_set()),
            _ => None,
        };
        Ok(TemplateInspect {
            id: *id,
            names: names_of(&self.template_names()?, id),
            size: map.size,
            chunk_size: map.chunk_size,
            chunks_total: map.chunk_count(),
            chunks_nonzero: map.chunks().count(),
            chunks_distinct: chunks.len(),
            chunks_local: chunks.iter().filter(|d| self.has_object(d)).count(),
            chunks_new_vs_parent: parent_chunks
                .as_ref()
                .map(|pc| chunks.iter().filter(|d| !pc.contains(d)).count()),
            parent: map.parent,
            generation: map.generation,
            remote: self.template_remote(id),
            build: map.build,
        })
    }
}

/// The totals line: what was (or, dry, would be) freed; `{:#}` first
/// lists the images and layers (`image DIGEST`, `layer DIGEST`).
impl fmt::Display for crate::GcReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            self.images
                .iter()
                .try_for_each(|i| writeln!(f, "image {i}"))?;
            self.layers
                .iter()
                .try_for_each(|l| writeln!(f, "layer {l}"))?;
        }
        write!(
            f,
            "{} {}: {} images, {} layers, {} objects, {} blob aliases",
            if self.dry_run { "would free" } else { "freed" },
            strata_ops::human_bytes(self.bytes_freed),
            self.images.len(),
            self.layers.len(),
            self.objects,
            self.blob_aliases
        )
    }
}

/// The totals line: what was checked, `ok` or how many problems; `{:#}`
/// first lists the problems (`problem: ...`).
impl fmt::Display for crate::FsckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            self.problems
                .iter()
                .try_for_each(|p| writeln!(f, "problem: {p}"))?;
        }
        write!(
            f,
            "checked {} objects, {} layers, {} images, {} refs, {} templates: ",
            self.objects, self.layers, self.images, self.refs, self.templates
        )?;
        match self.problems.len() {
            0 => write!(f, "ok"),
            n => write!(f, "{n} problems"),
        }
    }
}
