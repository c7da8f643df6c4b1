//! `strata convert`: rewrite an image's layers as zstd:chunked (or plain
//! zstd) from the store, without downloading anything the store has.
//!
//! Each layer tar is rebuilt byte for byte from its record and written as
//! zstd:chunked; the tar inside is unchanged, so the config (and its
//! diff_ids) is copied as is and any runtime can still pull the image in
//! full. A layer zstd:chunked cannot describe (sparse files, non-UTF-8
//! names, duplicate paths) is written as plain zstd and reported.
//!
//! With a prefetch list and [`ConvertOptions::place_first`], the listed
//! files (with their parent directories and hard link targets) are moved
//! to the front of their layers' tars ([`strata_chunked::reorder`]) and
//! the end of their frames is marked in a layer annotation
//! ([`FIRST_END_ANNOTATION`]): a lazy mount then fetches them in one plain
//! range per layer. Those tars change, so their diff_ids and the config
//! are rewritten; the tree they make is the same.
//!
//! The image goes to an [`ImageDestination`]: an OCI layout
//! ([`convert_to_layout`]) or a registry ([`RegistryDestination`](crate::push::RegistryDestination)),
//! see [`convert`].

use std::collections::{BTreeMap, HashSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use strata_ops::{Ctl, Event, Op, Unit, Warning};

use serde::Serialize;
use sha2::{Digest as _, Sha256};
use strata_chunked::reorder::{Placed, Plan, clean_name, plan_first, write_first};
use strata_chunked::{ChunkedError, ChunkedLayer, WriteOptions, write_layer};
use strata_digest::Digest;
use strata_store::Store;

use crate::layout_writer::{OCI_CONFIG, oci_manifest_bytes};
use crate::manifest::OCI_MANIFEST;
use crate::push::{ImageDestination, LayoutDestination, PushStats, RegistryDestination};
use crate::{Descriptor, ImageName, ImageRef, OciError, RegistryOptions, io_err};

/// OCI media type of a zstd layer.
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// The layer format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Format {
    /// zstd:chunked (falls back to zstd per layer when it cannot).
    #[serde(rename = "zstd:chunked")]
    ZstdChunked,
    /// Plain zstd.
    #[serde(rename = "zstd")]
    Zstd,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "zstd:chunked" => Ok(Format::ZstdChunked),
            "zstd" => Ok(Format::Zstd),
            f => Err(format!("unknown format {f:?}: zstd:chunked or zstd")),
        }
    }
}

/// The paths of a prefetch list (one per line, as `strata mount --lazy
/// --record` writes it): absolute, blank lines skipped.
pub fn prefetch_paths(list: &str) -> Vec<String> {
    list.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| format!("/{}", l.trim_start_matches('/')))
        .collect()
}

/// Where a conversion writes.
pub enum Target {
    /// An OCI layout (created if missing).
    Layout {
        /// Its directory.
        dir: PathBuf,
        /// The tag to give the image.
        tag: Option<String>,
    },
    /// A registry.
    Registry(Box<RegistryDestination>),
}

impl Target {
    /// `dest`: `oci:DIR[:TAG]`, or a registry as `docker://HOST[:PORT]/REPO[:TAG]`
    /// or bare `HOST[:PORT]/REPO[:TAG]`. A registry is reached (and logged
    /// in to) now, before any conversion work.
    pub fn open(
        dest: &str,
        registry: &RegistryOptions,
        staging_parent: &Path,
    ) -> Result<(ImageRef, Target), OciError> {
        let unsupported = |reason: &str| OciError::Reference {
            input: dest.to_string(),
            reason: format!("{reason}: write to oci:DIR[:TAG] or docker://HOST[:PORT]/REPO[:TAG]"),
        };
        let reference = match dest.parse()? {
            ImageName::Qualified(r) => r,
            ImageName::Short(_) => return Err(unsupported("a short name says no registry")),
        };
        let target = match &reference {
            ImageRef::OciLayout { dir, tag } => Target::Layout {
                dir: dir.clone(),
                tag: tag.clone(),
            },
            ImageRef::Docker { .. } => Target::Registry(Box::new(RegistryDestination::new(
                &reference,
                registry,
                staging_parent,
            )?)),
            _ => return Err(unsupported("not a destination")),
        };
        Ok((reference, target))
    }
}

/// [`convert_to_layout`] or [`convert`] to a registry, as `target` says.
pub fn convert_to(
    store: &Store,
    image: &Digest,
    target: &Target,
    opts: &ConvertOptions,
    ctl: Ctl<'_>,
) -> Result<ConvertSummary, OciError> {
    match target {
        Target::Layout { dir, tag } => {
            convert_to_layout(store, image, dir, tag.as_deref(), opts, ctl)
        }
        Target::Registry(r) => convert(store, image, r.as_ref(), opts, ctl),
    }
}

/// Options of [`convert_to_layout`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Layer format.
    pub format: Format,
    /// zstd level.
    pub level: i32,
    /// Layers converted at once.
    pub jobs: usize,
    /// Paths to fetch first when the image is mounted lazily, recorded in
    /// the manifest annotation [`PREFETCH_ANNOTATION`] (other runtimes
    /// ignore it).
    pub prefetch: Vec<String>,
    /// Also place the [`prefetch`](Self::prefetch) files (and what they
    /// need: parent directories, hard link targets) first in their layers,
    /// and mark where they end with [`FIRST_END_ANNOTATION`]. Those
    /// layers' tars (so their diff_ids, and the config) change; the tree
    /// does not. Without it every tar stays byte for byte the same.
    pub place_first: bool,
    /// The manifest's `subject` (OCI 1.1): the image this one was
    /// converted from, so registries with a referrers API (and the
    /// `sha256-<hex>` fallback tag) link the two.
    pub subject: Option<Descriptor>,
    /// More manifest annotations (a conversion service's job key, the
    /// source reference).
    pub annotations: BTreeMap<String, String>,
}

/// The converter's version: bumped whenever the same image and options
/// would give other bytes, so a cache keyed on (source, options, version)
/// never answers with an old result.
pub const CONVERTER_VERSION: u32 = 1;

/// Manifest annotation listing, one per line, the paths a lazy mount
/// fetches first.
pub const PREFETCH_ANNOTATION: &str = "dev.strata.lazy.prefetch";

/// Layer annotation: the blob offset where the payloads of the files
/// placed first end. A lazy mount fetches `0..offset` first in one plain
/// range request; other runtimes ignore it.
pub const FIRST_END_ANNOTATION: &str = "dev.strata.lazy.first-end";

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            format: Format::ZstdChunked,
            level: 3,
            jobs: 2,
            prefetch: Vec::new(),
            place_first: false,
            subject: None,
            annotations: BTreeMap::new(),
        }
    }
}

/// What happened to one layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerOutcome {
    /// The layer's diff_id in the new image.
    pub diff_id: Digest,
    /// The diff_id before, when listed files were placed first (the tar
    /// changed; the tree it makes did not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reordered_from: Option<Digest>,
    /// Entries placed first (listed files and what they need).
    #[serde(skip_serializing_if = "is_zero")]
    pub placed_first: usize,
    /// The new blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// The format written.
    pub format: Format,
    /// Why it is not zstd:chunked, when it was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// The result of a conversion.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    /// Digest of the new manifest.
    pub manifest_digest: Digest,
    /// Per layer, bottom first.
    pub layers: Vec<LayerOutcome>,
    /// Uncompressed bytes converted.
    pub tar_bytes: u64,
    /// Blobs uploaded and found present, for a registry destination.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<PushStats>,
}

impl ConvertSummary {
    /// Prefetch-list entries placed first, and in how many layers (those
    /// layers' tars, so their diff_ids, changed).
    pub fn placed_first(&self) -> (usize, usize) {
        let reordered = self.layers.iter().filter(|l| l.reordered_from.is_some());
        reordered.fold((0, 0), |(n, k), l| (n + l.placed_first, k + 1))
    }
}

/// `DIGEST: N layers, SIZE of tar`.
impl std::fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (d, n) = (self.manifest_digest, self.layers.len());
        let tar = strata_ops::human_bytes(self.tar_bytes);
        write!(f, "{d}: {n} layers, {tar} of tar")
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn chunked_err(layer: &Digest) -> impl Fn(ChunkedError) -> OciError + '_ {
    move |e| OciError::Format {
        what: format!("converting layer {layer}"),
        reason: e.to_string(),
    }
}

/// Counts and hashes what is written.
struct Counting<W> {
    w: W,
    n: u64,
    sha: Sha256,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let k = self.w.write(b)?;
        self.sha.update(&b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

/// Rebuild `diff_id`'s tar from the store into a pipe read by `consume`.
fn with_tar<T>(
    store: &Store,
    diff_id: &Digest,
    consume: impl FnOnce(std::io::PipeReader) -> T,
) -> Result<(T, u64), OciError> {
    let (r, w) = std::io::pipe().map_err(io_err("creating a pipe for", store.root()))?;
    std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut w = std::io::BufWriter::with_capacity(256 * 1024, w);
            let n = store.rebuild_layer(diff_id, &mut w);
            let flushed = w.flush();
            (n, flushed)
        });
        let out = consume(r);
        let (n, flushed) = producer.join().expect("rebuild thread does not panic");
        // A consumer that stops early (a layer zstd:chunked cannot hold)
        // breaks the pipe: its own error says why. A consumer that read to
        // the end cannot have broken it.
        let broken = |e: &std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
        let n = match n {
            Ok(n) => n,
            Err(strata_store::StoreError::Io { source, .. }) if broken(&source) => 0,
            Err(e) => {
                return Err(OciError::Format {
                    what: format!("rebuilding layer {diff_id} from the store"),
                    reason: e.to_string(),
                });
            }
        };
        if let Err(e) = flushed
            && !broken(&e)
        {
            return Err(io_err("rebuilding layer into a pipe", store.root())(e));
        }
        Ok((out, n))
    })
}

/// A converted layer: its blob (a staged file, or already handed to the
/// destination), what happened, its annotations and its tar size.
type Converted = (Staged, LayerOutcome, BTreeMap<String, String>, u64);

/// Where a converted layer's blob is.
enum Staged {
    /// Still a file in the staging directory.
    File(tempfile::NamedTempFile),
    /// Taken by the destination.
    Put(Descriptor),
}

/// A rebuilt layer tar read from a pipe; the rebuild's error, if any,
/// is the reader's error at the end.
struct Rebuilt<'scope> {
    r: std::io::PipeReader,
    producer: Option<std::thread::ScopedJoinHandle<'scope, Result<(), String>>>,
}

impl std::io::Read for Rebuilt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        if n == 0
            && !buf.is_empty()
            && let Some(p) = self.producer.take()
        {
            p.join()
                .expect("rebuild thread does not panic")
                .map_err(std::io::Error::other)?;
        }
        Ok(n)
    }
}

/// Start rebuilding `diff_id`'s tar from the store on a thread of `s`.
fn rebuilt<'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    store: &'scope Store,
    diff_id: &'scope Digest,
) -> Result<Rebuilt<'scope>, ChunkedError> {
    let (r, w) = std::io::pipe().map_err(|e| ChunkedError::Io {
        action: "creating a pipe".into(),
        source: e,
    })?;
    let producer = s.spawn(move || {
        let mut w = BufWriter::with_capacity(256 * 1024, w);
        store
            .rebuild_layer(diff_id, &mut w)
            .map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())
    });
    Ok(Rebuilt {
        r,
        producer: Some(producer),
    })
}

/// Write `diff_id`'s tar, its entries in `plan`'s order, as zstd:chunked
/// to `file`; returns the layer and what moved.
fn write_placed_first(
    store: &Store,
    diff_id: &Digest,
    plan: &Plan,
    file: &std::fs::File,
    wopts: &WriteOptions,
) -> Result<Result<(ChunkedLayer, Placed), ChunkedError>, OciError> {
    let (r, w) = std::io::pipe().map_err(io_err("creating a pipe for", store.root()))?;
    let (res, placed) = std::thread::scope(|s| {
        let producer = s.spawn(move || {
            let mut w = BufWriter::with_capacity(256 * 1024, w);
            let placed = write_first(&mut || rebuilt(s, store, diff_id), plan, &mut w)?;
            w.flush().map_err(|e| ChunkedError::Io {
                action: "writing the reordered tar".into(),
                source: e,
            })?;
            Ok::<_, ChunkedError>(placed)
        });
        let res = write_layer(r, BufWriter::with_capacity(1 << 20, file), wopts);
        (res, producer.join().expect("reorder thread does not panic"))
    });
    // the writer's refusal first (it stopped reading, which broke the
    // reorder's pipe), then the reorder's failure (the writer may have
    // seen a clean but short tar)
    Ok(match (res, placed) {
        (Err(e @ ChunkedError::Unsupported(_)), _) => Err(e),
        (_, Err(e)) => Err(e),
        (Err(e), _) => Err(e),
        (Ok(l), Ok(p)) => Ok((l, p)),
    })
}

fn convert_layer(
    store: &Store,
    blobs: &Path,
    diff_id: &Digest,
    opts: &ConvertOptions,
    wanted: &HashSet<String>,
) -> Result<
    (
        tempfile::NamedTempFile,
        LayerOutcome,
        BTreeMap<String, String>,
        u64,
    ),
    OciError,
> {
    let tmp = || {
        tempfile::NamedTempFile::new_in(blobs)
            .map_err(io_err("creating a temporary blob in", blobs))
    };
    let mut fallback = None;
    if opts.format == Format::ZstdChunked {
        let wopts = WriteOptions { level: opts.level };
        let plan = if opts.place_first && !wanted.is_empty() {
            match with_tar(store, diff_id, |r| plan_first(r, wanted))?.0 {
                Ok(p) => p,
                Err(ChunkedError::Unsupported(why)) => {
                    fallback = Some(why);
                    None
                }
                Err(e) => return Err(chunked_err(diff_id)(e)),
            }
        } else {
            None
        };
        let file = tmp()?;
        let written = match (&plan, &fallback) {
            (_, Some(_)) => None,
            (Some(plan), None) => {
                let r = write_placed_first(store, diff_id, plan, file.as_file(), &wopts)?;
                Some(r.map(|(l, p)| {
                    let n = p.bytes;
                    (l, Some(p), n)
                }))
            }
            (None, None) => {
                let out = BufWriter::with_capacity(1 << 20, file.as_file());
                let (res, n) = with_tar(store, diff_id, |r| write_layer(r, out, &wopts))?;
                Some(res.map(|l| (l, None, n)))
            }
        };
        match written {
            None => {}
            Some(Ok((l, placed, n))) => {
                let mut annotations = l.annotations;
                let (reordered_from, placed_first, n) = match placed {
                    None => {
                        if l.diff_id != *diff_id {
                            return Err(OciError::DigestMismatch {
                                what: format!("rebuilt layer {diff_id}"),
                                expected: *diff_id,
                                actual: l.diff_id,
                            });
                        }
                        (None, 0, n)
                    }
                    Some(p) => {
                        let names: HashSet<&str> = p.names.iter().map(String::as_str).collect();
                        let end = l
                            .toc
                            .entries
                            .iter()
                            .filter(|e| {
                                e.kind == "reg" && names.contains(clean_name(&e.name).as_str())
                            })
                            .map(|e| e.end_offset)
                            .max()
                            .unwrap_or(0);
                        if end > 0 {
                            annotations.insert(FIRST_END_ANNOTATION.to_string(), end.to_string());
                        }
                        (Some(*diff_id), p.moved, n)
                    }
                };
                let outcome = LayerOutcome {
                    diff_id: l.diff_id,
                    reordered_from,
                    placed_first,
                    digest: l.blob_digest,
                    size: l.blob_size,
                    format: Format::ZstdChunked,
                    fallback: None,
                };
                return Ok((file, outcome, annotations, n));
            }
            Some(Err(ChunkedError::Unsupported(why))) => fallback = Some(why),
            Some(Err(e)) => return Err(chunked_err(diff_id)(e)),
        }
    }
    let file = tmp()?;
    let level = opts.level;
    let (res, n) = with_tar(store, diff_id, |mut r| -> std::io::Result<(u64, Sha256)> {
        let c = Counting {
            w: BufWriter::with_capacity(1 << 20, file.as_file()),
            n: 0,
            sha: Sha256::new(),
        };
        let mut enc = zstd::stream::write::Encoder::new(c, level)?;
        std::io::copy(&mut r, &mut enc)?;
        let mut c = enc.finish()?;
        c.flush()?;
        Ok((c.n, c.sha))
    })?;
    let (size, sha) = res.map_err(io_err("writing a zstd layer to", file.path()))?;
    let outcome = LayerOutcome {
        diff_id: *diff_id,
        reordered_from: None,
        placed_first: 0,
        digest: Digest::sha256_from_bytes(sha.finalize().into()),
        size,
        format: Format::Zstd,
        fallback,
    };
    Ok((file, outcome, BTreeMap::new(), n))
}

/// Write image `image` (in `store`) to the OCI layout `dir` as `tag`, its
/// layers converted to `opts.format`.
pub fn convert_to_layout(
    store: &Store,
    image: &Digest,
    dir: &Path,
    tag: Option<&str>,
    opts: &ConvertOptions,
    ctl: Ctl<'_>,
) -> Result<ConvertSummary, OciError> {
    // the image must exist before the layout is created
    let loaded = load(store, image)?;
    let dest = LayoutDestination::open(dir, tag)?;
    ctl.emit(Event::Started {
        op: Op::Convert,
        subject: image.to_string(),
    });
    convert_loaded(store, loaded, &dest, opts, ctl)
}

/// Write image `image` (in `store`) to `dest`, its layers converted to
/// `opts.format`: the layers (handed over as each is converted when the
/// destination is [eager](ImageDestination::eager)), then the config
/// (unchanged), then the manifest.
pub fn convert(
    store: &Store,
    image: &Digest,
    dest: &dyn ImageDestination,
    opts: &ConvertOptions,
    ctl: Ctl<'_>,
) -> Result<ConvertSummary, OciError> {
    let loaded = load(store, image)?;
    ctl.emit(Event::Started {
        op: Op::Convert,
        subject: image.to_string(),
    });
    convert_loaded(store, loaded, dest, opts, ctl)
}

/// The layers' diff_ids and the config of `image`.
fn load(store: &Store, image: &Digest) -> Result<(Vec<Digest>, Vec<u8>), OciError> {
    let meta = store.image_meta(image).map_err(|e| OciError::Format {
        what: format!("reading image {image} from the store"),
        reason: e.to_string(),
    })?;
    let config = store.image_config(image).map_err(|e| OciError::Format {
        what: format!("reading the config of {image}"),
        reason: e.to_string(),
    })?;
    Ok((meta.layers.iter().map(|l| l.diff_id).collect(), config))
}

fn convert_loaded(
    store: &Store,
    (diff_ids, config): (Vec<Digest>, Vec<u8>),
    dest: &dyn ImageDestination,
    opts: &ConvertOptions,
    ctl: Ctl<'_>,
) -> Result<ConvertSummary, OciError> {
    let staging = dest.staging_dir();
    let wanted: HashSet<String> = opts.prefetch.iter().map(|p| clean_name(p)).collect();
    // after a failure or a cancel no more layers start: the first error in
    // layer order is returned, and staged files go with the destination
    let converted = strata_ops::par_map(&diff_ids, opts.jobs, ctl.cancel, |index, d| {
        let unit = Unit::Layer { index, digest: *d };
        ctl.emit(Event::UnitStarted {
            op: Op::Convert,
            unit: unit.clone(),
            total: None,
            reused: false,
        });
        let (file, outcome, annotations, n) = convert_layer(store, staging, d, opts, &wanted)?;
        if let Some(why) = &outcome.fallback {
            ctl.warn(
                Op::Convert,
                Warning::PlainZstd {
                    index,
                    reason: why.clone(),
                },
            );
        }
        ctl.cancel.check()?;
        let staged = if dest.eager() {
            Staged::Put(dest.put_blob_file(LAYER_ZSTD, file, outcome.digest, outcome.size)?)
        } else {
            Staged::File(file)
        };
        ctl.emit(Event::UnitDone {
            op: Op::Convert,
            unit,
        });
        Ok::<Converted, OciError>((staged, outcome, annotations, n))
    })?;
    ctl.cancel.check()?;
    let mut layers = Vec::new();
    let mut descs: Vec<Descriptor> = Vec::new();
    let mut tar_bytes = 0;
    for (staged, outcome, annotations, n) in converted {
        let mut d = match staged {
            Staged::File(file) => {
                dest.put_blob_file(LAYER_ZSTD, file, outcome.digest, outcome.size)?
            }
            Staged::Put(d) => d,
        };
        d.annotations = annotations;
        descs.push(d);
        layers.push(outcome);
        tar_bytes += n;
    }
    // layers with files placed first have new diff_ids
    let reordered = layers.iter().filter(|l| l.reordered_from.is_some()).count();
    if reordered > 0 {
        ctl.warn(Op::Convert, Warning::DiffIdsChanged { layers: reordered });
    }
    let config = if reordered > 0 {
        let bad = |reason: String| OciError::Format {
            what: "the image config".into(),
            reason,
        };
        let mut c: serde_json::Value =
            serde_json::from_slice(&config).map_err(|e| bad(e.to_string()))?;
        let ids = c
            .pointer_mut("/rootfs/diff_ids")
            .and_then(|v| v.as_array_mut())
            .filter(|ids| ids.len() == layers.len())
            .ok_or_else(|| bad("rootfs.diff_ids does not list every layer".into()))?;
        for (id, l) in ids.iter_mut().zip(&layers) {
            *id = l.diff_id.to_string().into();
        }
        serde_json::to_vec(&c).map_err(|e| bad(e.to_string()))?
    } else {
        config
    };
    let config_desc = dest.put_blob(OCI_CONFIG, &config)?;
    let mut annotations = opts.annotations.clone();
    if !opts.prefetch.is_empty() {
        annotations.insert(PREFETCH_ANNOTATION.to_string(), opts.prefetch.join("\n"));
    }
    let manifest = oci_manifest_bytes(&config_desc, &descs, opts.subject.as_ref(), &annotations)?;
    ctl.cancel.check()?;
    let manifest_digest = dest.put_manifest(OCI_MANIFEST, &manifest)?;
    ctl.emit(Event::Finished { op: Op::Convert });
    Ok(ConvertSummary {
        manifest_digest,
        layers,
        tar_bytes,
        push: dest.push_stats(),
    })
}
