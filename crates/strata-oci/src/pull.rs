//! Pulling an image into the store.
//!
//! ```text
//! resolve manifest + config (verified)
//!   -> per layer, in parallel (bounded):
//!        diff_id already in the store?        -> reuse, download nothing
//!        compressed digest known to the store? -> reuse
//!        else: blob stream -> count -> verify(blob digest, size)
//!              -> decompress (gzip | zstd | none)   [reader thread]
//!              -> tar import: contents -> staged objects, record  [this thread]
//!              -> diff_id == config's?  -> commit objects, then layer
//!   -> commit image -> point the name at it
//! ```
//!
//! Nothing from the network becomes visible before its digest was checked:
//! staged objects of a layer are committed only after both the compressed
//! digest and the diff_id matched; any failure drops the staging.

use std::collections::HashMap;
use std::io::{self, BufReader, Read};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use strata_digest::{Digest, VerifyingReader};
use strata_ops::{Cancelled, Ctl, ErrorKind, Event, HasKind, Op, Unit, Warning};
use strata_store::{BlobInfo, ImageLayer, ImageMeta, LayerMeta, Store, StoreError};
use strata_tar::TarError;

use crate::{
    Descriptor, ImageRef, ImageSource, LayerCompression, OciError, Platform, RegistryOptions,
    layer_compression, open_source, parse_config,
};

/// Options of a pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Which platform to pick from an index.
    pub platform: Platform,
    /// Registry access.
    pub registry: RegistryOptions,
    /// Layers fetched at once.
    pub jobs: usize,
    /// Whether the image's EROFS is split into a shared base part.
    pub split: strata_store::SplitPolicy,
    /// zstd:chunked layers: fetch only the files the store lacks, by
    /// their TOCs (`true`, the default), or the whole blob like any other
    /// layer (`false`: the TOCs are not read; a lazy mount's fallback).
    pub partial: bool,
}

impl PullOptions {
    /// The host's platform, 3 layers at once, the default split policy.
    pub fn host(registry: RegistryOptions) -> Self {
        PullOptions {
            platform: Platform::host_default(),
            registry,
            jobs: 3,
            split: strata_store::SplitPolicy::Auto(strata_store::DEFAULT_SPLIT_THRESHOLD),
            partial: true,
        }
    }
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullSummary {
    /// The name the image was recorded under.
    pub name: String,
    /// The image's manifest digest.
    pub manifest_digest: Digest,
    /// Layers already in the store.
    pub layers_reused: usize,
    /// Layers downloaded.
    pub layers_fetched: usize,
    /// Compressed bytes downloaded.
    pub bytes_downloaded: u64,
    /// Bytes of new objects written to the store.
    pub bytes_written: u64,
    /// New objects written.
    pub objects_written: u64,
    /// File contents that were already in the store.
    pub files_deduplicated: u64,
    /// The image's tree digest (SHA-256 of its composefs EROFS image).
    pub tree_digest: Option<Digest>,
    /// Layers pulled partially (zstd:chunked: only missing files fetched).
    pub layers_partial: usize,
    /// Layers pulled partially: what each fetched.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partial: Vec<PartialLayer>,
    /// What the pull warned about (also sent as events).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
    /// Set when the tree could not become an EROFS image (the image is
    /// still stored and exportable, but cannot be mounted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub erofs_error: Option<String>,
}

/// A layer pulled partially (zstd:chunked: only missing files fetched).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartialLayer {
    /// The layer blob's digest.
    pub digest: Digest,
    /// Files fetched from the registry.
    pub files_fetched: u64,
    /// Bytes downloaded for it (TOC and tar-split included).
    pub downloaded: u64,
    /// Files the store had.
    pub files_local: u64,
}

/// The summary line, a line per partially pulled layer, the tree digest.
impl std::fmt::Display for PullSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use strata_ops::human_bytes as human;
        write!(
            f,
            "pulled {} {}: layers {} reused, {} fetched; {} downloaded, {} written, {} files deduplicated",
            self.name,
            self.manifest_digest,
            self.layers_reused,
            self.layers_fetched,
            human(self.bytes_downloaded),
            human(self.bytes_written),
            self.files_deduplicated
        )?;
        for p in &self.partial {
            write!(
                f,
                "\nlayer {}: partial pull: {} files fetched ({} with the TOC), {} from the store",
                p.digest,
                p.files_fetched,
                human(p.downloaded),
                p.files_local
            )?;
        }
        match &self.tree_digest {
            Some(t) => write!(f, "\ntree {t}"),
            None => Ok(()),
        }
    }
}

/// Why a pull failed.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// Registry, layout or format problem.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Store problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A layer's bytes were bad.
    #[error("layer {index} ({digest}): {reason}")]
    Layer {
        /// Position in the manifest, bottom = 0.
        index: usize,
        /// The blob's digest.
        digest: Digest,
        /// What went wrong.
        reason: String,
    },
    /// The config does not fit the manifest.
    #[error("config {0}: {1}")]
    Config(Digest, String),
    /// The pull was cancelled; nothing of it became visible.
    #[error("pull cancelled")]
    Cancelled,
}

impl From<Cancelled> for PullError {
    fn from(_: Cancelled) -> Self {
        PullError::Cancelled
    }
}

impl HasKind for PullError {
    fn kind(&self) -> ErrorKind {
        match self {
            PullError::Oci(e) => e.kind(),
            PullError::Store(e) => e.kind(),
            PullError::Layer { .. } | PullError::Config(..) => ErrorKind::InvalidInput,
            PullError::Cancelled => ErrorKind::Cancelled,
        }
    }
}

/// Pull `reference` into `store` and name it `name`.
pub fn pull(
    store: &Store,
    reference: &ImageRef,
    name: &str,
    opts: &PullOptions,
    ctl: Ctl<'_>,
) -> Result<PullSummary, PullError> {
    let source = open_source(reference, &opts.registry)?;
    pull_from(store, source.as_ref(), name, opts, ctl)
}

/// Pull from an already opened source. Events go to `ctl.events`; once
/// `ctl.cancel` fires, the pull stops at its next read and returns
/// [`PullError::Cancelled`] with nothing of it committed but whole layers.
pub fn pull_from(
    store: &Store,
    source: &dyn ImageSource,
    name: &str,
    opts: &PullOptions,
    ctl: Ctl<'_>,
) -> Result<PullSummary, PullError> {
    ctl.emit(Event::Started {
        op: Op::Pull,
        subject: name.to_string(),
    });
    // one operation for gc: layers, image and ref are not swept between
    let work = store.work()?;
    let r = pull_inner(store, source, name, opts, ctl);
    drop(work);
    match r {
        Ok(s) => {
            ctl.emit(Event::Finished { op: Op::Pull });
            Ok(s)
        }
        // a failure caused by the cancel (a read cut short) says so
        Err(_) if ctl.cancel.is_cancelled() => Err(PullError::Cancelled),
        Err(e) => Err(e),
    }
}

fn pull_inner(
    store: &Store,
    source: &dyn ImageSource,
    name: &str,
    opts: &PullOptions,
    ctl: Ctl<'_>,
) -> Result<PullSummary, PullError> {
    ctl.cancel.check()?;
    let resolved = source.resolve(&opts.platform)?;
    let manifest = &resolved.manifest;
    let config = parse_config(&resolved.config_bytes)?;
    let config_digest = manifest.config.digest;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(PullError::Config(
            config_digest,
            format!(
                "lists {} diff_ids but the manifest has {} layers",
                config.diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    // Unknown media types fail before any byte is downloaded.
    let mut compressions = Vec::new();
    for (index, l) in manifest.layers.iter().enumerate() {
        compressions.push(
            layer_compression(&l.media_type).map_err(|e| PullError::Layer {
                index,
                digest: l.digest,
                reason: e.to_string(),
            })?,
        );
    }
    ctl.emit(Event::Resolved {
        op: Op::Pull,
        manifest_digest: resolved.manifest_digest,
        layers: manifest.layers.len(),
    });

    let mut summary = PullSummary {
        name: name.to_string(),
        manifest_digest: resolved.manifest_digest,
        layers_reused: 0,
        layers_fetched: 0,
        bytes_downloaded: 0,
        bytes_written: 0,
        objects_written: 0,
        files_deduplicated: 0,
        tree_digest: None,
        layers_partial: 0,
        partial: Vec::new(),
        warnings: Vec::new(),
        erofs_error: None,
    };
    let notes: Mutex<Notes> = Mutex::new(Notes::default());
    let downloaded = AtomicU64::new(0);
    // zstd:chunked metadata of all layers together is bounded
    let budget = crate::partial::MetadataBudget::default();
    let jobs = opts.jobs.clamp(1, 8);
    let outcomes = strata_ops::par_map(&manifest.layers, jobs, ctl.cancel, |index, desc| {
        let diff_id = config.diff_ids[index];
        let outcome = pull_layer(
            store,
            source,
            index,
            desc,
            compressions[index],
            diff_id,
            ctl,
            &downloaded,
            &notes,
            opts.partial.then_some(&budget),
        )?;
        ctl.emit(Event::UnitDone {
            op: Op::Pull,
            unit: Unit::Layer {
                index,
                digest: desc.digest,
            },
        });
        Ok::<_, PullError>(outcome.map(|o| (diff_id, o)))
    })?;
    // Records of layers imported by this pull, kept to validate the image
    // without reading them back.
    let mut fresh: HashMap<Digest, strata_tar::LayerRecord> = HashMap::new();
    for outcome in outcomes {
        match outcome {
            None => summary.layers_reused += 1,
            Some((diff_id, (stats, record, partial))) => {
                fresh.insert(diff_id, record);
                summary.layers_fetched += 1;
                summary.layers_partial += partial as usize;
                summary.bytes_written += stats.bytes_written;
                summary.objects_written += stats.objects_written;
                summary.files_deduplicated += stats.files_deduplicated;
            }
        }
    }
    summary.bytes_downloaded = downloaded.load(Ordering::SeqCst);
    let notes = notes.into_inner().expect("threads joined");
    summary.partial = notes.partial;
    summary.warnings = notes.warnings;
    ctl.cancel.check()?;

    // The layers are valid one by one; the image is valid only if they
    // flatten (hardlinks resolve, no path escapes through a symlink).
    let mut tree = strata_tree::Tree::new();
    for (index, (l, d)) in manifest.layers.iter().zip(&config.diff_ids).enumerate() {
        let stored;
        let record = match fresh.get(d) {
            Some(r) => r,
            None => {
                stored = store.layer_record(d)?;
                &stored
            }
        };
        tree.apply_layer(&record.entries)
            .map_err(|e| PullError::Layer {
                index,
                digest: l.digest,
                reason: e.to_string(),
            })?;
    }

    let meta = ImageMeta {
        manifest_digest: resolved.manifest_digest,
        manifest_media_type: manifest.media_type.clone(),
        config_digest,
        layers: manifest
            .layers
            .iter()
            .zip(&config.diff_ids)
            .map(|(l, d)| ImageLayer {
                blob: BlobInfo {
                    digest: l.digest,
                    media_type: l.media_type.clone(),
                    size: l.size,
                },
                diff_id: *d,
            })
            .collect(),
        source: source.describe(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    store.commit_image(&meta, &resolved.manifest_bytes, &resolved.config_bytes)?;
    store.set_ref(name, &resolved.manifest_digest)?;
    match store.build_image_erofs(&resolved.manifest_digest, Some(&tree), opts.split) {
        Ok(info) => summary.tree_digest = Some(info.tree_digest),
        Err(strata_store::StoreError::Unsupported(e)) => {
            let w = Warning::NotMountable { reason: e.clone() };
            ctl.warn(Op::Pull, w.clone());
            summary.warnings.push(w);
            summary.erofs_error = Some(e);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(summary)
}

/// `Ok(None)`: reused; `Ok(Some(stats))`: fetched and committed.
#[allow(clippy::too_many_arguments)]
fn pull_layer(
    store: &Store,
    source: &dyn ImageSource,
    index: usize,
    desc: &Descriptor,
    compression: LayerCompression,
    diff_id: Digest,
    ctl: Ctl<'_>,
    downloaded: &AtomicU64,
    notes: &Mutex<Notes>,
    budget: Option<&crate::partial::MetadataBudget>,
) -> Result<Option<(strata_store::BatchStats, strata_tar::LayerRecord, bool)>, PullError> {
    let layer_err = |reason: String| PullError::Layer {
        index,
        digest: desc.digest,
        reason,
    };
    if store.has_layer(&diff_id) {
        store.add_blob_alias(&desc.digest, &diff_id)?;
        layer_started(ctl, index, desc, true);
        return Ok(None);
    }
    if let Some(known) = store.layer_by_blob(&desc.digest) {
        if known != diff_id {
            return Err(layer_err(format!(
                "config says diff_id {diff_id} but this blob is known to decompress to {known}"
            )));
        }
        layer_started(ctl, index, desc, true);
        return Ok(None);
    }
    layer_started(ctl, index, desc, false);
    if let Some(budget) = budget
        && strata_chunked::reader::locate(&desc.annotations).is_some()
    {
        match crate::partial::fetch(store, source, desc, downloaded, index, ctl, budget)? {
            Ok(fetched) => {
                notes.lock().expect("lock").partial.push(PartialLayer {
                    digest: desc.digest,
                    files_fetched: fetched.files_fetched as u64,
                    downloaded: fetched.downloaded,
                    files_local: fetched.files_local as u64,
                });
                ctl.cancel.check()?;
                let mut batch = store.object_batch()?;
                let imported = std::thread::scope(|scope| {
                    let (r, w) = io::pipe().map_err(|e| layer_err(e.to_string()))?;
                    let producer = scope.spawn(move || {
                        let mut w = io::BufWriter::with_capacity(256 * 1024, w);
                        crate::partial::write_tar(store, &fetched, &mut w)?;
                        io::Write::flush(&mut w)
                    });
                    let imported = strata_tar::import_tar(r, &mut batch);
                    let produced = producer.join().expect("tar writer does not panic");
                    let imported = imported.map_err(|e| layer_err(e.to_string()))?;
                    produced.map_err(|e| layer_err(format!("rebuilding the tar: {e}")))?;
                    Ok::<_, PullError>(imported)
                })?;
                if imported.diff_id != diff_id {
                    return Err(layer_err(format!(
                        "the tar rebuilt from the tar-split and files hashes to {} but the config says diff_id {diff_id}",
                        imported.diff_id
                    )));
                }
                let stats = commit_imported(store, desc, diff_id, &imported, batch)?;
                return Ok(Some((stats, imported.record, true)));
            }
            Err(crate::partial::Fallback(why)) => {
                let w = Warning::FullPull {
                    index,
                    digest: desc.digest,
                    reason: why,
                };
                ctl.warn(Op::Pull, w.clone());
                notes.lock().expect("lock").warnings.push(w);
            }
        }
    }
    let blob = source.open_blob(desc, 0)?;
    let counted = CountingReader {
        inner: blob,
        index,
        desc,
        ctl,
        done: 0,
        last_event: 0,
        total: downloaded,
    };
    let verified = VerifyingReader::new(
        BufReader::with_capacity(256 * 1024, counted),
        desc.digest,
        Some(desc.size),
    );
    // Reading + verifying + decompressing the blob runs on its own thread,
    // tar parsing + hashing + staging files on this one (the diff_id is
    // hashed on a third, inside strata-tar). A separate thread for blob
    // verification was measured: no gain on 2 cores.
    let mut batch = store.object_batch()?;
    let imported = std::thread::scope(|scope| {
        let compressed: Box<dyn Read + Send + '_> = Box::new(verified);
        let decompressed =
            ThreadedReader::spawn(scope, move || -> io::Result<Box<dyn Read + Send + '_>> {
                Ok(match compression {
                    LayerCompression::None => compressed,
                    LayerCompression::Gzip => Box::new(DrainAtEof::new(GzipLayer(
                        flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(
                            256 * 1024,
                            compressed,
                        )),
                    ))),
                    LayerCompression::Zstd => Box::new(DrainAtEof::new(ZstdLayer(
                        zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(
                            256 * 1024,
                            compressed,
                        ))?,
                    ))),
                })
            });
        strata_tar::import_tar(decompressed, &mut batch).map_err(|e| match e {
            TarError::Io(io) => layer_err(io_error_text(&io)),
            other => layer_err(other.to_string()),
        })
    })?;
    if imported.diff_id != diff_id {
        return Err(layer_err(format!(
            "uncompressed layer hashes to {} but the config says diff_id {diff_id}",
            imported.diff_id
        )));
    }
    let stats = commit_imported(store, desc, diff_id, &imported, batch)?;
    Ok(Some((stats, imported.record, false)))
}

fn commit_imported(
    store: &Store,
    desc: &Descriptor,
    diff_id: Digest,
    imported: &strata_tar::Imported,
    batch: strata_store::ObjectBatch<'_>,
) -> Result<strata_store::BatchStats, PullError> {
    let meta = LayerMeta {
        diff_id,
        size: imported.size,
        blobs: vec![BlobInfo {
            digest: desc.digest,
            media_type: desc.media_type.clone(),
            size: desc.size,
        }],
        entries: imported.record.entries.len() as u64,
        objects: imported
            .record
            .objects()
            .collect::<std::collections::HashSet<_>>()
            .len() as u64,
    };
    Ok(store.commit_layer(batch, &meta, &imported.record)?)
}

fn io_error_text(e: &io::Error) -> String {
    match e.get_ref() {
        Some(inner) => inner.to_string(),
        None => e.to_string(),
    }
}

/// What layers say besides their stats.
#[derive(Default)]
struct Notes {
    partial: Vec<PartialLayer>,
    warnings: Vec<Warning>,
}

fn layer_started(ctl: Ctl<'_>, index: usize, desc: &Descriptor, reused: bool) {
    ctl.emit(Event::UnitStarted {
        op: Op::Pull,
        unit: Unit::Layer {
            index,
            digest: desc.digest,
        },
        total: Some(desc.size),
        reused,
    });
}

/// Counts a blob's bytes, reports them (at most every 256 KiB), and stops
/// the stream once the pull is cancelled.
struct CountingReader<'a, R> {
    inner: R,
    index: usize,
    desc: &'a Descriptor,
    ctl: Ctl<'a>,
    done: u64,
    last_event: u64,
    total: &'a AtomicU64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.ctl.cancel.check()?;
        let n = self.inner.read(buf)?;
        self.total.fetch_add(n as u64, Ordering::Relaxed);
        self.done += n as u64;
        if self.done - self.last_event >= 256 * 1024 || (n == 0 && self.done > self.last_event) {
            self.last_event = self.done;
            self.ctl.emit(Event::Progress {
                op: Op::Pull,
                unit: Unit::Layer {
                    index: self.index,
                    digest: self.desc.digest,
                },
                done: self.done,
                total: Some(self.desc.size),
            });
        }
        Ok(n)
    }
}

/// A decompressor whose underlying compressed stream can be drained.
trait Drain: Read {
    /// Read the compressed stream to its end (so it is verified).
    fn drain(&mut self) -> io::Result<()>;
}

struct GzipLayer<R: io::BufRead>(flate2::bufread::MultiGzDecoder<R>);
impl<R: io::BufRead> Read for GzipLayer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl<R: io::BufRead> Drain for GzipLayer<R> {
    fn drain(&mut self) -> io::Result<()> {
        let trailing = io::copy(self.0.get_mut(), &mut io::sink())?;
        if trailing > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{trailing} bytes of garbage after the gzip stream"),
            ));
        }
        Ok(())
    }
}

struct ZstdLayer<'a, R: io::BufRead>(zstd::stream::read::Decoder<'a, R>);
impl<R: io::BufRead> Read for ZstdLayer<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl<R: io::BufRead> Drain for ZstdLayer<'_, R> {
    fn drain(&mut self) -> io::Result<()> {
        let trailing = io::copy(self.0.get_mut(), &mut io::sink())?;
        if trailing > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{trailing} bytes of garbage after the zstd stream"),
            ));
        }
        Ok(())
    }
}

/// At the decompressed stream's end, drain the compressed stream so its
/// digest check runs before the consumer sees end-of-file.
struct DrainAtEof<D> {
    inner: D,
    done: bool,
}
impl<D: Drain> DrainAtEof<D> {
    fn new(inner: D) -> Self {
        DrainAtEof { inner, done: false }
    }
}
impl<D: Drain> Read for DrainAtEof<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.inner.drain()?;
            self.done = true;
        }
        Ok(n)
    }
}

/// Runs a reader on a background thread, handing over 1 MiB chunks through
/// a bounded channel. Errors travel in order; dropping the reader stops the
/// thread at its next send.
struct ThreadedReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Used chunks go back to the producer, so it never allocates and
    /// zeroes a fresh megabyte per chunk.
    recycle: mpsc::Sender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl ThreadedReader {
    fn spawn<'scope, 'env, F>(scope: &'scope std::thread::Scope<'scope, 'env>, make: F) -> Self
    where
        F: FnOnce() -> io::Result<Box<dyn Read + Send + 'scope>> + Send + 'scope,
    {
        let (tx, rx) = mpsc::sync_channel(8);
        let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
        scope.spawn(move || {
            let mut r = match make() {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            loop {
                let mut buf = match recycled.try_recv() {
                    Ok(mut b) => {
                        b.resize(1 << 20, 0);
                        b
                    }
                    Err(_) => vec![0u8; 1 << 20],
                };
                let mut filled = 0;
                let res = loop {
                    match r.read(&mut buf[filled..]) {
                        Ok(0) => break Ok(()),
                        Ok(n) => {
                            filled += n;
                            if filled == buf.len() {
                                break Ok(());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => break Err(e),
                    }
                };
                buf.truncate(filled);
                let eof = filled == 0;
                if filled > 0 && tx.send(Ok(buf)).is_err() {
                    return;
                }
                if let Err(e) = res {
                    let _ = tx.send(Err(e));
                    return;
                }
                if eof {
                    let _ = tx.send(Ok(Vec::new()));
                    return;
                }
            }
        });
        ThreadedReader {
            rx,
            recycle,
            current: Vec::new(),
            pos: 0,
            done: false,
        }
    }
}

impl Read for ThreadedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => {
                    self.done = true;
                    return Ok(0);
                }
                Ok(Ok(chunk)) => {
                    let used = std::mem::replace(&mut self.current, chunk);
                    if used.capacity() > 0 {
                        let _ = self.recycle.send(used);
                    }
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "decompression thread ended unexpectedly",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_reader_passes_bytes_and_errors_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let d2 = data.clone();
        std::thread::scope(|s| {
            let mut r = ThreadedReader::spawn(s, move || Ok(Box::new(io::Cursor::new(d2))));
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert_eq!(out, data);
        });

        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("boom"));
                }
                self.0 -= 1;
                buf[0] = 7;
                Ok(1)
            }
        }
        std::thread::scope(|s| {
            let mut r = ThreadedReader::spawn(s, || Ok(Box::new(Failing(10))));
            let mut out = Vec::new();
            let err = r.read_to_end(&mut out).unwrap_err();
            assert_eq!(err.to_string(), "boom");
            assert_eq!(out, vec![7; 10]);
        });
    }
}
