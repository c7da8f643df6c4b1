//! Checking what a registry serves once a converted image was pushed:
//! [`verify_pushed`].
//!
//! A conversion service calls a job a success only when the registry
//! serves the image the conversion meant to push. Everything about the
//! converted image is read back from the registry; the store is asked
//! only about the source image (its config, diff_ids and tree) and for
//! file contents by their SHA-256 (to name their fs-verity digests and to
//! rebuild a tar-split's tar), never for its records of converted layers.
//!
//! ```text
//! manifest-digest  GET manifest by digest (and its config) -> digest == the
//!                  reference's == convert's; layers == convert's; subject
//! config-runtime   pushed config == source config, rootfs.diff_ids aside
//! config-diff-ids  pushed diff_ids == convert's == source's (unless reordered)
//! toc-digest       each zstd:chunked layer: TOC + tar-split by range, checked
//!                  as a partial pull checks them (partial::open_chunked_with)
//! blob-digest   ┐  each layer: one streaming GET; sha256(blob) == descriptor,
//! layer-diff-id ┘  sha256(tar) == diff_id, and so is the tar-split's tar
//! tree-digest      tree as a lazy mount sees it == the source's tree
//! ```
//!
//! The first failed check ends the run: later checks are not run, and the
//! report says which one failed and why (layer index, digests, expected
//! and got). Only a cancel is an error.
//!
//! # The tree digest: built from what was read back (decided)
//!
//! `tree-digest` builds the converted image's tree from the registry's
//! answers, not by pulling it into a second store: a zstd:chunked layer
//! contributes the entries its verified tar-split lists with the TOC's
//! content digests (what `strata_lazy::prepare` and a partial pull use),
//! any other layer the entries of its tar as streamed for `layer-diff-id`.
//! For a zstd:chunked layer both views must agree entry for entry (so a
//! lazy mount, a partial pull and a full pull see one tree). The tree is
//! then written as the flattened composefs EROFS image
//! ([`Store::build_flat`], fs-verity digests from the store's objects by
//! content digest) and its SHA-256 compared with the source's, built now
//! by the same code. Why not a pull into a temporary store: it downloads
//! every layer a second time (the streaming check already read them all),
//! writes every file, and says less when it fails (a pull error instead of
//! the layer and entry that differ).

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use strata_digest::{Digest, Hasher};
use strata_ops::{Ctl, Event, Op, Unit};
use strata_store::{Store, StoreError};
use strata_tar::{Entry, EntryKind};
use strata_tree::Tree;

use crate::convert::{ConvertSummary, Format};
use crate::partial::{ChunkedIndex, MetadataBudget, open_chunked_with};
use crate::registry::RegistrySource;
use crate::{
    Descriptor, ImageRef, ImageSource, LayerCompression, OciError, Platform, RegistryOptions,
    ResolvedImage, layer_compression, parse_config,
};

/// Check: the manifest fetched by digest is the one convert pushed.
pub const MANIFEST_DIGEST: &str = "manifest-digest";
/// Check: the pushed config is the source's, `rootfs.diff_ids` aside.
pub const CONFIG_RUNTIME: &str = "config-runtime";
/// Check: the pushed config's diff_ids are convert's and the source's.
pub const CONFIG_DIFF_IDS: &str = "config-diff-ids";
/// Check: every zstd:chunked layer's TOC and tar-split verify.
pub const TOC_DIGEST: &str = "toc-digest";
/// Check: every layer blob hashes to its descriptor's digest and size.
pub const BLOB_DIGEST: &str = "blob-digest";
/// Check: every layer's tar hashes to its diff_id.
pub const LAYER_DIFF_ID: &str = "layer-diff-id";
/// Check: the converted image's tree is the source's.
pub const TREE_DIGEST: &str = "tree-digest";

/// The checks, in the order they run.
pub const CHECKS: [&str; 7] = [
    MANIFEST_DIGEST,
    CONFIG_RUNTIME,
    CONFIG_DIFF_IDS,
    TOC_DIGEST,
    BLOB_DIGEST,
    LAYER_DIFF_ID,
    TREE_DIGEST,
];

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// One of [`CHECKS`].
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// How long it took. `blob-digest` and `layer-diff-id` share one read
    /// of each blob: its time is `blob-digest`'s; `layer-diff-id`'s is
    /// what it does besides (hashing the tar-splits' tars).
    pub seconds: f64,
    /// When failed: what was wrong (layer index, digests, expected and
    /// got). When passed: a note, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What [`verify_pushed`] found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Every check ran and passed.
    pub ok: bool,
    /// The checks run, in [`CHECKS`] order; the last one is the failed one
    /// when `ok` is false.
    pub checks: Vec<CheckResult>,
    /// How long the whole verification took.
    pub seconds: f64,
}

impl VerifyReport {
    /// The check that failed, if one did.
    pub fn failed(&self) -> Option<&CheckResult> {
        self.checks.iter().find(|c| !c.ok)
    }
}

/// `verified: 7 checks passed in 0.4 s` or `check blob-digest failed: ...`.
impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failed() {
            Some(c) => write!(
                f,
                "check {} failed: {}",
                c.name,
                c.detail.as_deref().unwrap_or("no detail")
            ),
            None => write!(
                f,
                "verified: {} checks passed in {:.1} s",
                self.checks.len(),
                self.seconds
            ),
        }
    }
}

/// A blob's tar as read once: its diff_id and entries.
type KnownTar = std::sync::Arc<(Digest, Vec<Entry>)>;

/// What earlier verifications in this process learnt from blobs whose
/// bytes they hashed, so a blob converted the same way again (a shared
/// base layer: same bytes, same digest) is streamed and hashed for
/// `blob-digest` but not decompressed and parsed again.
///
/// Sound because the key is what was checked: a blob that hashes to a
/// digest has the bytes that digest was computed from, so its tar (diff_id
/// and entries) is the one read before; a tar-split fetched by range is
/// pinned by the TOC annotation digest (in the manifest) of a blob whose
/// bytes hash to its digest, so the tar rebuilt from it is the one rebuilt
/// before. Only what passed is kept. Bounded: [`VerifyCache::CAP`] blobs.
#[derive(Default)]
pub struct VerifyCache {
    /// Blob digest -> the tar's diff_id and entries.
    tars: std::sync::Mutex<std::collections::HashMap<Digest, KnownTar>>,
    /// (blob digest, TOC annotation) -> the diff_id of the tar rebuilt
    /// from its tar-split with the store's contents.
    rebuilt: std::sync::Mutex<std::collections::HashMap<(Digest, String), Digest>>,
    /// Blobs whose tar came from here (for reports and tests).
    hits: AtomicU64,
}

impl VerifyCache {
    /// Blobs kept at most (a Debian base layer's entries are a few MB).
    pub const CAP: usize = 32;

    /// Layers whose tar was known from an earlier verification.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    fn tar(&self, blob: &Digest) -> Option<KnownTar> {
        self.tars
            .lock()
            .expect("no panics while held")
            .get(blob)
            .cloned()
    }

    fn keep_tar(&self, blob: Digest, diff_id: Digest, entries: Vec<Entry>) {
        let mut t = self.tars.lock().expect("no panics while held");
        if t.len() >= Self::CAP {
            t.clear();
        }
        t.insert(blob, std::sync::Arc::new((diff_id, entries)));
    }

    fn rebuilt(&self, key: &(Digest, String)) -> Option<Digest> {
        self.rebuilt
            .lock()
            .expect("no panics while held")
            .get(key)
            .copied()
    }

    fn keep_rebuilt(&self, key: (Digest, String), diff_id: Digest) {
        let mut r = self.rebuilt.lock().expect("no panics while held");
        if r.len() >= 16 * Self::CAP {
            r.clear();
        }
        r.insert(key, diff_id);
    }
}

/// Check what the registry serves as `pushed` (`docker://HOST/REPO@sha256:…`,
/// the image `convert` pushed and described in `expected`) against the
/// source image `source` (its manifest digest in `store`). With
/// `expect_subject`, the pushed manifest's `subject.digest` must be
/// `source`.
///
/// The checks run in [`CHECKS`] order and the first that fails ends the
/// run (see the [module documentation](self)). Layers are streamed one at
/// a time, never held: memory is the layers' metadata (TOCs, tar-splits,
/// entry lists). Events go to `ctl` ([`Op::Verify`]: started, resolved,
/// a unit per layer streamed with its progress, finished).
///
/// Errors: only [`OciError::Cancelled`], once `ctl.cancel` fires (checked
/// between requests and between chunks of a blob). Everything else (an
/// unreachable registry, a digest mismatch, a bad TOC) is a failed check
/// in the report.
pub fn verify_pushed(
    store: &Store,
    source: &Digest,
    pushed: &ImageRef,
    expected: &ConvertSummary,
    expect_subject: bool,
    opts: &RegistryOptions,
    ctl: Ctl<'_>,
) -> Result<VerifyReport, OciError> {
    let cache = VerifyCache::default();
    verify_pushed_with(
        store,
        source,
        pushed,
        expected,
        expect_subject,
        opts,
        &cache,
        ctl,
    )
}

/// [`verify_pushed`] remembering in `cache` what it learns from blobs, and
/// using what earlier runs learnt (see [`VerifyCache`]): how a service
/// that converts many images on one base verifies each without
/// decompressing the base again.
#[allow(clippy::too_many_arguments)]
pub fn verify_pushed_with(
    store: &Store,
    source: &Digest,
    pushed: &ImageRef,
    expected: &ConvertSummary,
    expect_subject: bool,
    opts: &RegistryOptions,
    cache: &VerifyCache,
    ctl: Ctl<'_>,
) -> Result<VerifyReport, OciError> {
    let started = Instant::now();
    ctl.cancel.check()?;
    ctl.emit(Event::Started {
        op: Op::Verify,
        subject: pushed.to_string(),
    });
    let mut report = Report {
        ctl,
        checks: Vec::new(),
    };
    let job = Job {
        store,
        source,
        pushed,
        expected,
        expect_subject,
        opts,
        cache,
        ctl,
    };
    job.run(&mut report)?;
    ctl.emit(Event::Finished { op: Op::Verify });
    let ok = report.checks.len() == CHECKS.len() && report.checks.iter().all(|c| c.ok);
    Ok(VerifyReport {
        ok,
        checks: report.checks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Why a check stopped.
enum Stop {
    /// The cancel fired.
    Cancelled,
    /// The check failed: what was wrong.
    Failed(String),
}

impl From<strata_ops::Cancelled> for Stop {
    fn from(_: strata_ops::Cancelled) -> Self {
        Stop::Cancelled
    }
}

/// A check's value and its note, or why it stopped.
type Checked<T> = Result<(T, Option<String>), Stop>;

/// A failed check, unless the failure came from the cancel (a read cut
/// short says so only as an I/O error).
fn failed(ctl: Ctl<'_>, detail: String) -> Stop {
    if ctl.cancel.is_cancelled() {
        Stop::Cancelled
    } else {
        Stop::Failed(detail)
    }
}

/// The checks run so far.
struct Report<'a> {
    ctl: Ctl<'a>,
    checks: Vec<CheckResult>,
}

impl Report<'_> {
    /// Record a check that began at `started`: `Some(value)` when it
    /// passed, `None` when it failed (the run ends).
    fn record<T>(
        &mut self,
        name: &str,
        started: Instant,
        outcome: Checked<T>,
    ) -> Result<Option<T>, OciError> {
        let seconds = started.elapsed().as_secs_f64();
        let (ok, detail, value) = match outcome {
            Ok((v, note)) => (true, note, Some(v)),
            Err(Stop::Cancelled) => return Err(OciError::Cancelled),
            Err(Stop::Failed(_)) if self.ctl.cancel.is_cancelled() => {
                return Err(OciError::Cancelled);
            }
            Err(Stop::Failed(d)) => (false, Some(d), None),
        };
        self.checks.push(CheckResult {
            name: name.to_string(),
            ok,
            seconds,
            detail,
        });
        Ok(value)
    }

    /// Run and record one check.
    fn run<T>(
        &mut self,
        name: &str,
        check: impl FnOnce() -> Checked<T>,
    ) -> Result<Option<T>, OciError> {
        let started = Instant::now();
        let outcome = check();
        self.record(name, started, outcome)
    }
}

/// One verification's inputs.
struct Job<'a> {
    store: &'a Store,
    source: &'a Digest,
    pushed: &'a ImageRef,
    expected: &'a ConvertSummary,
    expect_subject: bool,
    opts: &'a RegistryOptions,
    cache: &'a VerifyCache,
    ctl: Ctl<'a>,
}

/// The image as the registry serves it.
struct Served {
    registry: RegistrySource,
    resolved: ResolvedImage,
}

/// What reading every blob found.
struct Streamed {
    /// Each layer's tar entries (content digests hashed from the tar).
    tars: Vec<Vec<Entry>>,
    /// The first layer whose tar is wrong, while every blob was right.
    tar_failure: Option<String>,
    /// Compressed bytes read.
    bytes: u64,
}

impl Job<'_> {
    /// Run the checks in order until one fails; `Err` only when cancelled.
    fn run(&self, report: &mut Report<'_>) -> Result<(), OciError> {
        let ctl = self.ctl;
        let Some(served) = report.run(MANIFEST_DIGEST, || self.manifest_digest())? else {
            return Ok(());
        };
        ctl.emit(Event::Resolved {
            op: Op::Verify,
            manifest_digest: served.resolved.manifest_digest,
            layers: served.resolved.manifest.layers.len(),
        });
        if report
            .run(CONFIG_RUNTIME, || self.config_runtime(&served))?
            .is_none()
        {
            return Ok(());
        }
        let Some(diff_ids) = report.run(CONFIG_DIFF_IDS, || self.config_diff_ids(&served))? else {
            return Ok(());
        };
        let Some(indexes) = report.run(TOC_DIGEST, || self.toc_digest(&served))? else {
            return Ok(());
        };
        let started = Instant::now();
        let streamed = self.stream_layers(&served, &diff_ids).map(|s| {
            let note = format!(
                "{} blobs, {} read",
                served.resolved.manifest.layers.len(),
                strata_ops::human_bytes(s.bytes)
            );
            (s, Some(note))
        });
        let Some(streamed) = report.record(BLOB_DIGEST, started, streamed)? else {
            return Ok(());
        };
        let started = Instant::now();
        let tars = match streamed.tar_failure {
            Some(why) => Err(Stop::Failed(why)),
            None => self
                .tar_splits_rebuild(&indexes, &diff_ids)
                .map(|note| (streamed.tars, note)),
        };
        let Some(tars) = report.record(LAYER_DIFF_ID, started, tars)? else {
            return Ok(());
        };
        report.run(TREE_DIGEST, || self.tree_digest(&served, &indexes, tars))?;
        Ok(())
    }

    fn fail(&self, detail: String) -> Stop {
        failed(self.ctl, detail)
    }

    /// The platform to resolve with: the source's (a pushed index would
    /// be followed to it, and then refused).
    fn platform(&self) -> Platform {
        self.store
            .image_config(self.source)
            .ok()
            .and_then(|c| parse_config(&c).ok())
            .map(|c| Platform {
                variant: c
                    .raw
                    .get("variant")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                os: c.os,
                architecture: c.architecture,
            })
            .filter(|p| !p.os.is_empty() && !p.architecture.is_empty())
            .unwrap_or_else(Platform::host_default)
    }

    /// `manifest-digest`: the manifest fetched by the reference's digest
    /// (resolve checks the bytes against it, and the config against the
    /// manifest) is the one convert pushed, lists convert's layer blobs
    /// in layer media types strata reads, and has the source as subject
    /// when asked.
    fn manifest_digest(&self) -> Checked<Served> {
        let (pushed, expected) = (self.pushed, self.expected);
        let ImageRef::Docker { digest, .. } = pushed else {
            return Err(self.fail(format!(
                "{pushed} is not a registry reference (docker://HOST/REPO@DIGEST)"
            )));
        };
        let Some(named) = digest else {
            return Err(self.fail(format!(
                "{pushed} names no digest: the pushed manifest is fetched by digest"
            )));
        };
        if *named != expected.manifest_digest {
            return Err(self.fail(format!(
                "{pushed} names manifest {named} but the conversion pushed {}",
                expected.manifest_digest
            )));
        }
        let registry = RegistrySource::new(pushed.clone(), self.opts)
            .map_err(|e| self.fail(format!("opening {pushed}: {e}")))?;
        self.ctl.cancel.check()?;
        let resolved = registry.resolve(&self.platform()).map_err(|e| {
            self.fail(format!(
                "fetching manifest {named} and its config from the registry: {e}"
            ))
        })?;
        if let Some(index) = resolved.index_digest {
            return Err(self.fail(format!(
                "{named} is an index ({index}), not the image manifest the conversion pushed"
            )));
        }
        if resolved.manifest_digest != *named {
            return Err(self.fail(format!(
                "the registry served manifest {} for {named}",
                resolved.manifest_digest
            )));
        }
        let layers = &resolved.manifest.layers;
        if layers.len() != expected.layers.len() {
            return Err(self.fail(format!(
                "manifest {named} lists {} layers, the conversion wrote {}",
                layers.len(),
                expected.layers.len()
            )));
        }
        for (i, (got, want)) in layers.iter().zip(&expected.layers).enumerate() {
            if got.digest != want.digest || got.size != want.size {
                return Err(self.fail(format!(
                    "layer {i}: manifest {named} lists blob {} ({} bytes), the conversion wrote {} ({} bytes)",
                    got.digest, got.size, want.digest, want.size
                )));
            }
            layer_compression(&got.media_type)
                .map_err(|e| self.fail(format!("layer {i} ({}): {e}", got.digest)))?;
        }
        let mut note = None;
        if self.expect_subject {
            let doc: Value = serde_json::from_slice(&resolved.manifest_bytes)
                .map_err(|e| self.fail(format!("parsing manifest {named}: {e}")))?;
            let source = self.source.to_string();
            match doc.pointer("/subject/digest").and_then(Value::as_str) {
                None => {
                    return Err(self.fail(format!(
                        "manifest {named} has no subject digest (expected the source {source})"
                    )));
                }
                Some(s) if s != source => {
                    return Err(self.fail(format!(
                        "manifest {named}: subject is {s}, expected the source {source}"
                    )));
                }
                Some(_) => note = Some(format!("subject is the source {source}")),
            }
        }
        Ok((Served { registry, resolved }, note))
    }

    /// `config-runtime`: the pushed config and the source's, as JSON, are
    /// equal but for `rootfs.diff_ids` (which convert rewrites when it
    /// places files first). `history` is compared too: convert copies it.
    fn config_runtime(&self, served: &Served) -> Checked<()> {
        let config = &served.resolved.manifest.config.digest;
        let source_bytes = self.store.image_config(self.source).map_err(|e| {
            self.fail(format!(
                "reading the config of the source image {} from the store: {e}",
                self.source
            ))
        })?;
        let parse = |bytes: &[u8], what: &str| {
            serde_json::from_slice::<Value>(bytes)
                .map_err(|e| self.fail(format!("parsing {what}: {e}")))
        };
        let mut source = parse(&source_bytes, "the source's config")?;
        let mut pushed = parse(
            &served.resolved.config_bytes,
            &format!("the pushed config {config}"),
        )?;
        for v in [&mut source, &mut pushed] {
            if let Some(rootfs) = v.get_mut("rootfs").and_then(Value::as_object_mut) {
                rootfs.remove("diff_ids");
            }
        }
        match first_difference(&source, &pushed, "") {
            None => Ok(((), None)),
            Some(d) => Err(self.fail(format!(
                "the pushed config {config} differs from the source's: {d}"
            ))),
        }
    }

    /// `config-diff-ids`: one diff_id per layer everywhere; the pushed
    /// config's are convert's, and the source's where convert kept the
    /// tar (else the one it reordered from is the source's).
    fn config_diff_ids(&self, served: &Served) -> Checked<Vec<Digest>> {
        let config = &served.resolved.manifest.config.digest;
        let pushed = parse_config(&served.resolved.config_bytes)
            .map_err(|e| self.fail(format!("the pushed config {config}: {e}")))?
            .diff_ids;
        let source: Vec<Digest> = self
            .store
            .image_meta(self.source)
            .map_err(|e| {
                self.fail(format!(
                    "reading the source image {} from the store: {e}",
                    self.source
                ))
            })?
            .layers
            .iter()
            .map(|l| l.diff_id)
            .collect();
        let expected = &self.expected.layers;
        let layers = served.resolved.manifest.layers.len();
        if pushed.len() != layers || expected.len() != layers || source.len() != layers {
            return Err(self.fail(format!(
                "layer counts differ: the pushed config lists {} diff_ids, its manifest {layers} layers, the conversion {} layers, the source {} layers",
                pushed.len(),
                expected.len(),
                source.len()
            )));
        }
        for (i, ((got, want), before)) in pushed.iter().zip(expected).zip(&source).enumerate() {
            if *got != want.diff_id {
                return Err(self.fail(format!(
                    "layer {i}: the pushed config {config} says diff_id {got}, the conversion {}",
                    want.diff_id
                )));
            }
            match want.reordered_from {
                None if got != before => {
                    return Err(self.fail(format!(
                        "layer {i}: diff_id {got} is not the source's {before} (the conversion kept the tar)"
                    )));
                }
                Some(from) if from != *before => {
                    return Err(self.fail(format!(
                        "layer {i}: the conversion reordered it from diff_id {from}, not from the source's {before}"
                    )));
                }
                _ => {}
            }
        }
        Ok((pushed, None))
    }

    /// `toc-digest`: each layer with zstd:chunked annotations is opened as
    /// a partial pull opens it (TOC and tar-split fetched by range, the TOC
    /// checked against the annotation's digest, the tar-split against the
    /// TOC's, both parsed within limits and compared entry by entry), and
    /// must be readable piecewise with a CRC-64 per file, as a lazy mount
    /// needs. A layer convert wrote as zstd:chunked must have them.
    fn toc_digest(&self, served: &Served) -> Checked<Vec<Option<ChunkedIndex>>> {
        let budget = MetadataBudget::default();
        let fetched = AtomicU64::new(0);
        let layers = &served.resolved.manifest.layers;
        let mut indexes = Vec::with_capacity(layers.len());
        for (i, (desc, want)) in layers.iter().zip(&self.expected.layers).enumerate() {
            self.ctl.cancel.check()?;
            let at = format!("layer {i} ({})", desc.digest);
            if strata_chunked::reader::locate(&desc.annotations).is_none() {
                if want.format == Format::ZstdChunked {
                    return Err(self.fail(format!(
                        "{at}: the conversion wrote it as zstd:chunked but its descriptor has no TOC annotations"
                    )));
                }
                indexes.push(None);
                continue;
            }
            let ix = match open_chunked_with(&served.registry, desc, &fetched, &budget) {
                Ok(Ok(ix)) => ix,
                Ok(Err(why)) => {
                    return Err(self.fail(format!("{at}: cannot be read piecewise: {why}")));
                }
                Err(e) => return Err(self.fail(format!("{at}: {e}"))),
            };
            if let Some(f) = ix.files.iter().find(|f| f.crc64.is_none()) {
                return Err(self.fail(format!(
                    "{at}: the tar-split gives {:?} no CRC-64 (a lazy mount refuses the layer)",
                    f.name
                )));
            }
            indexes.push(Some(ix));
        }
        let chunked = indexes.iter().flatten().count();
        let note = format!(
            "{chunked} of {} layers zstd:chunked ({} of TOCs and tar-splits read)",
            indexes.len(),
            strata_ops::human_bytes(fetched.load(Ordering::Relaxed))
        );
        Ok((indexes, Some(note)))
    }

    /// `blob-digest` (and the tar half of `layer-diff-id`): every layer in
    /// one streaming GET each. `Err(Failed)` is a blob that is not its
    /// descriptor's; a tar that is not its diff_id is kept in
    /// [`Streamed::tar_failure`] while the later blobs are still hashed
    /// (not decompressed), so a bad blob is named first whatever its place.
    fn stream_layers(&self, served: &Served, diff_ids: &[Digest]) -> Result<Streamed, Stop> {
        let layers = &served.resolved.manifest.layers;
        let items: Vec<(&Descriptor, &Digest)> = layers.iter().zip(diff_ids).collect();
        // layers at once (as a pull reads them): a bad blob stops the rest
        let tars = strata_ops::par_map(
            &items,
            strata_ops::default_jobs(4),
            self.ctl.cancel,
            |index, &(desc, _)| {
                let unit = Unit::Layer {
                    index,
                    digest: desc.digest,
                };
                self.ctl.emit(Event::UnitStarted {
                    op: Op::Verify,
                    unit: unit.clone(),
                    total: Some(desc.size),
                    reused: false,
                });
                let known = self.cache.tar(&desc.digest);
                let tar = stream_layer(&served.registry, index, desc, known.is_none(), self.ctl)?;
                // the blob hashed to its digest: its tar is the one read before
                let tar = match (tar, known) {
                    (None, Some(k)) => {
                        self.cache.hits.fetch_add(1, Ordering::Relaxed);
                        Some(Ok((k.0, k.1.clone())))
                    }
                    (Some(Ok((diff_id, entries))), _) => {
                        self.cache.keep_tar(desc.digest, diff_id, entries.clone());
                        Some(Ok((diff_id, entries)))
                    }
                    (tar, _) => tar,
                };
                self.ctl.emit(Event::UnitDone {
                    op: Op::Verify,
                    unit,
                });
                Ok::<_, Stop>(tar)
            },
        )?;
        let mut streamed = Streamed {
            tars: Vec::with_capacity(layers.len()),
            tar_failure: None,
            bytes: layers.iter().map(|d| d.size).sum(),
        };
        for (index, (tar, &(desc, diff_id))) in tars.into_iter().zip(&items).enumerate() {
            if streamed.tar_failure.is_some() {
                break;
            }
            match tar {
                None => {}
                Some(Err(why)) => streamed.tar_failure = Some(why),
                Some(Ok((got, _))) if got != *diff_id => {
                    streamed.tar_failure = Some(format!(
                        "layer {index} ({}): its tar hashes to {got}, the config says diff_id {diff_id}",
                        desc.digest
                    ));
                }
                Some(Ok((_, entries))) => streamed.tars.push(entries),
            }
        }
        Ok(streamed)
    }

    /// The rest of `layer-diff-id`: the tar a partial pull rebuilds from a
    /// zstd:chunked layer's tar-split (its contents by the TOC's digests,
    /// read here from the store) hashes to the diff_id too.
    fn tar_splits_rebuild(
        &self,
        indexes: &[Option<ChunkedIndex>],
        diff_ids: &[Digest],
    ) -> Result<Option<String>, Stop> {
        for (i, (ix, diff_id)) in indexes.iter().zip(diff_ids).enumerate() {
            let Some(ix) = ix else { continue };
            self.ctl.cancel.check()?;
            let at = format!("layer {i} ({})", ix.desc.digest);
            let key = (
                ix.desc.digest,
                // the TOC's digest is among them
                format!("{:?}", ix.desc.annotations),
            );
            let got = match self.cache.rebuilt(&key) {
                Some(d) => d,
                None => ix.diff_id_from_store(self.store).map_err(|e| {
                    self.fail(format!(
                        "{at}: rebuilding its tar from the tar-split with contents from the store: {e}"
                    ))
                })?,
            };
            if got == *diff_id {
                self.cache.keep_rebuilt(key, got);
            }
            if got != *diff_id {
                return Err(self.fail(format!(
                    "{at}: the tar rebuilt from its tar-split hashes to {got}, the config says diff_id {diff_id}"
                )));
            }
        }
        Ok(None)
    }

    /// `tree-digest`: the tree as a lazy mount sees it (zstd:chunked
    /// layers: the tar-split's entries with the TOC's digests, which must
    /// be the tar's; other layers: the tar's) has the source's tree
    /// digest. See the [module documentation](self).
    fn tree_digest(
        &self,
        served: &Served,
        indexes: &[Option<ChunkedIndex>],
        tars: Vec<Vec<Entry>>,
    ) -> Checked<()> {
        let layers = &served.resolved.manifest.layers;
        let mut tree = Tree::new();
        for (i, ((desc, ix), tar)) in layers.iter().zip(indexes).zip(tars).enumerate() {
            self.ctl.cancel.check()?;
            let at = format!("layer {i} ({})", desc.digest);
            let entries = match ix {
                None => tar,
                Some(ix) => {
                    let toc = ix.entries().map_err(|e| {
                        self.fail(format!("{at}: listing its entries from the tar-split: {e}"))
                    })?;
                    if let Some(d) = entry_difference(&toc, &tar) {
                        return Err(
                            self.fail(format!("{at}: a lazy mount would not see its tar: {d}"))
                        );
                    }
                    toc
                }
            };
            tree.apply_layer(&entries)
                .map_err(|e| self.fail(format!("{at}: does not apply: {e}")))?;
        }
        let source = self.source;
        let diff_ids: Vec<Digest> = self
            .store
            .image_meta(source)
            .map_err(|e| self.fail(format!("reading the source image {source}: {e}")))?
            .layers
            .iter()
            .map(|l| l.diff_id)
            .collect();
        // the source's tree digest as the store recorded it when it built
        // the source's EROFS (the store is trusted): the source's tree is
        // then built only to name a difference
        if let Some(info) = self.store.erofs_info(source)
            && tree.objects().iter().all(|d| self.store.has_object(d))
            && let Ok(flat) = self.store.build_flat(&diff_ids, Some(&tree))
            && Digest::sha256_of(&flat) == info.tree_digest
        {
            return Ok(((), Some(format!("tree {}", info.tree_digest))));
        }
        let source_tree = self.store.image_tree(source).map_err(|e| {
            self.fail(format!(
                "building the tree of the source image {source}: {e}"
            ))
        })?;
        self.ctl.cancel.check()?;
        let source_flat = match self.store.build_flat(&diff_ids, Some(&source_tree)) {
            Ok(flat) => flat,
            Err(StoreError::Unsupported(why)) => {
                // no EROFS image to hash: the trees are compared as listings
                return match tree_difference(&source_tree, &tree) {
                    None => Ok((
                        (),
                        Some(format!(
                            "trees equal, compared as listings (the source's tree has no EROFS image: {why})"
                        )),
                    )),
                    Some(d) => {
                        Err(self.fail(format!("the pushed image's tree is not the source's: {d}")))
                    }
                };
            }
            Err(e) => {
                return Err(self.fail(format!(
                    "building the tree digest of the source image {source}: {e}"
                )));
            }
        };
        let want = Digest::sha256_of(&source_flat);
        drop(source_flat);
        // a content the store lacks is in no source layer: the trees differ
        if let Some(d) = tree
            .objects()
            .into_iter()
            .find(|d| !self.store.has_object(d))
        {
            let diff = tree_difference(&source_tree, &tree)
                .unwrap_or_else(|| "their listings agree".into());
            return Err(self.fail(format!(
                "the pushed image's tree has content {d}, which no source layer has: {diff}"
            )));
        }
        let got = self
            .store
            .build_flat(&diff_ids, Some(&tree))
            .map(|flat| Digest::sha256_of(&flat))
            .map_err(|e| self.fail(format!("building the tree digest of the pushed image: {e}")))?;
        if got != want {
            let diff = tree_difference(&source_tree, &tree)
                .unwrap_or_else(|| "their listings agree".into());
            return Err(self.fail(format!(
                "the pushed image's tree digest is {got}, the source's {want}: {diff}"
            )));
        }
        Ok(((), Some(format!("tree {got}"))))
    }
}

/// A layer's tar as streamed: its SHA-256 and entries, or what is wrong
/// with it.
type TarRead = Result<(Digest, Vec<Entry>), String>;

/// One layer's blob, streamed once: `Err(Failed)` when the blob is not its
/// descriptor's (or cannot be read); else, when `read_tar`, its tar.
fn stream_layer(
    source: &dyn ImageSource,
    index: usize,
    desc: &Descriptor,
    read_tar: bool,
    ctl: Ctl<'_>,
) -> Result<Option<TarRead>, Stop> {
    let at = format!("layer {index} ({})", desc.digest);
    let compression =
        layer_compression(&desc.media_type).map_err(|e| failed(ctl, format!("{at}: {e}")))?;
    let blob = source
        .open_blob(desc, 0)
        .map_err(|e| failed(ctl, format!("{at}: opening the blob: {e}")))?;
    let mut counted = Counted {
        inner: blob,
        hasher: Hasher::new(),
        ctl,
        index,
        desc,
        reported: 0,
    };
    let read_err = |e: io::Error| failed(ctl, format!("{at}: reading the blob: {e}"));
    let mut tar = None;
    if read_tar {
        let compressed = BufReader::with_capacity(256 * 1024, &mut counted);
        let mut decoded = match compression {
            LayerCompression::None => Decoded::Plain(compressed),
            LayerCompression::Gzip => {
                Decoded::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(compressed)))
            }
            LayerCompression::Zstd => Decoded::Zstd(
                zstd::stream::read::Decoder::with_buffer(compressed)
                    .map_err(|e| failed(ctl, format!("{at}: starting zstd: {e}")))?,
            ),
        };
        let read = match strata_tar::import_tar(&mut decoded, &mut HashOnly) {
            Ok(imported) => {
                // a pull refuses bytes after the compressed stream
                let rest = io::copy(decoded.compressed(), &mut io::sink()).map_err(read_err)?;
                if rest > 0 {
                    Err(format!(
                        "{at}: {rest} bytes after the end of its compressed stream"
                    ))
                } else {
                    Ok((imported.diff_id, imported.record.entries))
                }
            }
            Err(e) => Err(format!("{at}: its tar does not decompress or parse: {e}")),
        };
        tar = Some(read);
    }
    // the rest of the blob: all of it when the tar is not read, what a
    // failed tar read left
    io::copy(&mut counted, &mut io::sink()).map_err(read_err)?;
    let size = counted.hasher.len();
    let digest = counted.hasher.finish();
    if size != desc.size || digest != desc.digest {
        return Err(failed(
            ctl,
            format!(
                "{at}: the registry served {size} bytes hashing to {digest}, the manifest names {} of {} bytes",
                desc.digest, desc.size
            ),
        ));
    }
    Ok(tar)
}

/// A blob stream, hashed and counted as it is read; progress goes to the
/// events and the cancel is checked before every read.
struct Counted<'a> {
    inner: Box<dyn Read + Send>,
    hasher: Hasher,
    ctl: Ctl<'a>,
    index: usize,
    desc: &'a Descriptor,
    reported: u64,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ctl.cancel.check()?;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        let done = self.hasher.len();
        if done - self.reported >= 1 << 20 || (n == 0 && done > self.reported) {
            self.reported = done;
            self.ctl.emit(Event::Progress {
                op: Op::Verify,
                unit: Unit::Layer {
                    index: self.index,
                    digest: self.desc.digest,
                },
                done,
                total: Some(self.desc.size),
            });
        }
        Ok(n)
    }
}

/// A layer's tar, decompressed as its media type says.
enum Decoded<R: BufRead> {
    Plain(R),
    Gzip(Box<flate2::bufread::MultiGzDecoder<R>>),
    Zstd(zstd::stream::read::Decoder<'static, R>),
}

impl<R: BufRead> Decoded<R> {
    /// The compressed stream, to read what the decompressor left.
    fn compressed(&mut self) -> &mut R {
        match self {
            Decoded::Plain(r) => r,
            Decoded::Gzip(d) => d.get_mut(),
            Decoded::Zstd(d) => d.get_mut(),
        }
    }
}

impl<R: BufRead> Read for Decoded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoded::Plain(r) => r.read(buf),
            Decoded::Gzip(d) => d.read(buf),
            Decoded::Zstd(d) => d.read(buf),
        }
    }
}

/// Hashes file contents and keeps nothing.
struct HashOnly;

impl strata_tar::ObjectSink for HashOnly {
    fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest> {
        let mut h = Hasher::new();
        let n = io::copy(&mut content.take(size), &mut h)?;
        if n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("a file's content ends after {n} of its {size} bytes"),
            ));
        }
        Ok(h.finish())
    }
}

/// Longest value quoted in a detail.
const QUOTE: usize = 160;

/// `s`, cut to about [`QUOTE`] bytes.
fn quote(s: String) -> String {
    if s.len() <= QUOTE {
        return s;
    }
    let mut end = QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The first place (a JSON pointer, keys in order) where the source's
/// config `a` and the pushed `b` differ, with both values.
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    let show = |v: &Value| quote(v.to_string());
    let here = || if at.is_empty() { "/" } else { at }.to_string();
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = format!("{at}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => first_difference(u, v, &path),
                    (Some(u), None) => Some(format!(
                        "{path}: the source has {}, the pushed config nothing",
                        show(u)
                    )),
                    (None, Some(v)) => Some(format!(
                        "{path}: the pushed config has {}, the source nothing",
                        show(v)
                    )),
                    (None, None) => None,
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{at}/{i}"))),
        _ if a == b => None,
        _ => Some(format!(
            "{}: the source has {}, the pushed config {}",
            here(),
            show(a),
            show(b)
        )),
    }
}

/// An entry's kind and metadata, for details.
fn describe(e: &Entry) -> String {
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let kind = match &e.kind {
        EntryKind::Regular { digest, size } => format!("file of {size} bytes {digest}"),
        EntryKind::Dir => "directory".into(),
        EntryKind::Symlink { target } => format!("symlink to {:?}", lossy(target)),
        EntryKind::Hardlink { target } => format!("hard link to {:?}", lossy(target)),
        EntryKind::CharDev { major, minor } => format!("char device {major}:{minor}"),
        EntryKind::BlockDev { major, minor } => format!("block device {major}:{minor}"),
        EntryKind::Fifo => "fifo".into(),
    };
    format!(
        "{kind}, mode {:o}, owner {}:{}, mtime {}.{:09}, {} xattrs",
        e.mode,
        e.uid,
        e.gid,
        e.mtime.secs,
        e.mtime.nanos,
        e.xattrs.len()
    )
}

/// The first entry where a layer's TOC view `toc` and its tar `tar`
/// differ.
fn entry_difference(toc: &[Entry], tar: &[Entry]) -> Option<String> {
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    for (n, (t, e)) in toc.iter().zip(tar).enumerate() {
        if t == e {
            continue;
        }
        if t.path != e.path {
            return Some(format!(
                "entry {}: the tar-split names {:?}, the tar {:?}",
                n + 1,
                lossy(&t.path),
                lossy(&e.path)
            ));
        }
        return Some(format!(
            "entry {} ({:?}): the tar-split and TOC say {}, the tar {}",
            n + 1,
            lossy(&e.path),
            describe(t),
            describe(e)
        ));
    }
    (toc.len() != tar.len()).then(|| {
        format!(
            "the tar-split lists {} entries, the tar {}",
            toc.len(),
            tar.len()
        )
    })
}

/// The first line where the canonical listings of the source's tree and
/// the pushed one differ.
fn tree_difference(source: &Tree, pushed: &Tree) -> Option<String> {
    let (a, b) = (source.dump(), pushed.dump());
    let (mut a, mut b) = (a.lines(), b.lines());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return None,
            (Some(x), Some(y)) if x == y => {}
            (x, y) => {
                let show = |l: Option<&str>| l.map_or("nothing more".into(), |l| quote(l.into()));
                return Some(format!(
                    "first difference: the source has {}, the pushed image {}",
                    show(x),
                    show(y)
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_differences_name_the_place() {
        let a: Value =
            serde_json::json!({"config": {"Env": ["A=1"], "Cmd": ["sh"]}, "os": "linux"});
        assert_eq!(first_difference(&a, &a.clone(), ""), None);
        let b: Value =
            serde_json::json!({"config": {"Env": ["A=2"], "Cmd": ["sh"]}, "os": "linux"});
        assert_eq!(
            first_difference(&a, &b, "").unwrap(),
            r#"/config/Env/0: the source has "A=1", the pushed config "A=2""#
        );
        let c: Value = serde_json::json!({"config": {"Env": ["A=1"]}, "os": "linux"});
        assert_eq!(
            first_difference(&a, &c, "").unwrap(),
            r#"/config/Cmd: the source has ["sh"], the pushed config nothing"#
        );
        let d: Value =
            serde_json::json!({"config": {"Env": ["A=1", "B=2"], "Cmd": ["sh"]}, "os": "linux"});
        assert!(
            first_difference(&a, &d, "")
                .unwrap()
                .starts_with("/config/Env: ")
        );
        assert_eq!(
            first_difference(&Value::Null, &serde_json::json!(1), "").unwrap(),
            "/: the source has null, the pushed config 1"
        );
    }

    #[test]
    fn quotes_are_cut_on_char_boundaries() {
        let long = "é".repeat(200);
        let q = quote(long);
        assert!(q.len() <= QUOTE + "…".len() && q.ends_with('…'), "{q}");
        assert_eq!(quote("short".into()), "short");
    }

    #[test]
    fn a_report_names_its_failed_check() {
        let check = |name: &str, ok: bool| CheckResult {
            name: name.into(),
            ok,
            seconds: 0.0,
            detail: (!ok).then(|| "layer 1 (sha256:ab): bad".to_string()),
        };
        let r = VerifyReport {
            ok: false,
            checks: vec![check(MANIFEST_DIGEST, true), check(CONFIG_RUNTIME, false)],
            seconds: 0.1,
        };
        assert_eq!(r.failed().unwrap().name, CONFIG_RUNTIME);
        assert_eq!(
            r.to_string(),
            "check config-runtime failed: layer 1 (sha256:ab): bad"
        );
        let json = serde_json::to_string(&r).unwrap();
        let back: VerifyReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }
}
