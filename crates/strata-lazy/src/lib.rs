//! Lazy images: start a container before its image has arrived.
//!
//! ```text
//! manifest + config (verified)
//!   -> per layer: in the store? its record : TOC + tar-split by range
//!      (verified) -> entries without contents
//!   -> flatten -> EROFS image, every file a redirect to its object
//!   -> overlayfs: EROFS over data-only layers [objects/, FUSE of contents]
//! open(file) -> object in the store? the kernel reads it, no daemon
//!   : FUSE (fs.rs): passthrough when local, else fetch the missing chunks
//!     (bounded pool, one fetch per chunk however many readers wait)
//!     -> verify each chunk -> staging file
//!   -> file complete: verify the whole file -> objects/
//! ```
//!
//! A byte is served only after the whole content holding it was checked
//! against its TOC entry (SHA-256) and its tar-split entry (CRC-64), so a
//! tampered blob or a lying TOC gives EIO, never data a full pull would
//! reject; an object the store already has is served for a lazy layer's
//! file only once its CRC-64 matched the tar-split entry, and a layer
//! whose files are all present is rebuilt and checked against its diff_id
//! (see the `fetch` module). The mount's first data layer is a directory
//! of links to checked objects, not objects/. The objects themselves are
//! trusted as in every composefs mount without `--verity` (the lazy EROFS
//! image carries no fs-verity digests: they are not known before the
//! contents arrive).

pub mod daemon;
mod early;
mod elf;
mod fetch;
pub mod fs;
pub mod mount;
mod pyc;
pub mod record;
pub mod state;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

use strata_digest::{Digest, VerityDigest};
use strata_oci::partial::{ChunkedIndex, RemoteFile};
use strata_oci::{Descriptor, ImageSource, OciError, ResolvedImage};
use strata_store::{Store, StoreError};
use strata_tree::Tree;

pub use fetch::{Fetcher, Loads, ReadError, ReadRest, Stats};
pub use mount::{
    Fallback, LazyMount, LazyOptions, MountRecord, MountReport, MountStatus, Mounted, Prefetch,
    attach, cleanup, list, mount, received_since, start_set,
};
pub use state::{MountState, PrefetchState};

/// Why an image cannot be served lazily, or failed to be prepared.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// A layer cannot be read piecewise; pull the image in full instead.
    #[error("layer {index} ({digest}) cannot be read lazily: {reason}")]
    NotLazy {
        /// Position in the manifest, bottom = 0.
        index: usize,
        /// The blob's digest.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// Registry or format problem.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Store problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The tree cannot be written as EROFS.
    #[error("building the EROFS image of the tree: {0}")]
    Image(String),
    /// The layers do not make a tree.
    #[error("layer {index} ({digest}): {reason}")]
    Layer {
        /// Position in the manifest.
        index: usize,
        /// The blob's digest.
        digest: Digest,
        /// What is wrong.
        reason: String,
    },
    /// The mount point cannot be used.
    #[error("mount point {}: {reason}", path.display())]
    Target {
        /// The mount point.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// Something is in use: a mount point, an earlier daemon.
    #[error("{0}")]
    Busy(String),
    /// Mounting or unmounting failed.
    #[error(transparent)]
    Mount(#[from] strata_sys::MountError),
    /// The full pull (fallback or prefetch) failed.
    #[error(transparent)]
    Pull(#[from] strata_oci::pull::PullError),
    /// A local file or thread could not be made.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
}

impl strata_ops::HasKind for LazyError {
    fn kind(&self) -> strata_ops::ErrorKind {
        use strata_ops::ErrorKind as K;
        match self {
            LazyError::NotLazy { .. } => K::Unsupported,
            LazyError::Oci(e) => e.kind(),
            LazyError::Store(e) => e.kind(),
            LazyError::Image(_) | LazyError::Layer { .. } => K::InvalidInput,
            LazyError::Target { .. } => K::InvalidInput,
            LazyError::Busy(_) => K::Busy,
            LazyError::Mount(strata_sys::MountError::AlreadyMounted(_))
            | LazyError::Mount(strata_sys::MountError::Busy(_)) => K::Busy,
            LazyError::Mount(strata_sys::MountError::NotMounted(_)) => K::NotFound,
            LazyError::Mount(_) => K::Internal,
            LazyError::Pull(e) => e.kind(),
            LazyError::Io { source, .. } => K::of_io(source),
        }
    }
}

/// One layer of a lazy image.
pub struct LazyLayer {
    /// Its descriptor in the manifest.
    pub desc: Descriptor,
    /// Its diff_id in the config.
    pub diff_id: Digest,
    /// `None` when the store has the layer already.
    pub index: Option<LayerIndex>,
}

/// What a lazy image keeps of a zstd:chunked layer's [`ChunkedIndex`]
/// once its tree is built: the blob's descriptor and where each file's
/// bytes are in it, which is all fetching needs.
///
/// The index's tar-split (the tar headers and padding of every entry, 6 MB
/// for the Debian+python image) is dropped: a lazy image reads it once,
/// to list the layer's entries ([`ChunkedIndex::entries`]), and nothing
/// after needs it (fetches go by [`RemoteFile`]; a full pull, on fallback
/// or `Prefetch::All`, opens the layer's index again itself). Kept for the
/// mount's whole life it was a third of a mount daemon's live data.
pub struct LayerIndex {
    /// The layer's descriptor.
    pub desc: Descriptor,
    /// Regular files with content, in TOC order.
    pub files: Vec<RemoteFile>,
}

impl LayerIndex {
    /// The parts of `ix` a lazy image keeps; its tar-split is dropped.
    fn keep(ix: ChunkedIndex) -> Self {
        let mut files = ix.files;
        files.shrink_to_fit();
        LayerIndex {
            desc: ix.desc,
            files,
        }
    }
}

/// An image whose tree is known and whose contents may be missing.
pub struct LazyImage {
    /// Manifest and config.
    pub resolved: ResolvedImage,
    /// The flattened tree (regular files name their content digest).
    pub tree: Tree,
    /// Layers, bottom first.
    pub layers: Vec<LazyLayer>,
    /// Bytes downloaded to prepare it (TOCs and tar-splits).
    pub downloaded: u64,
    remote: HashMap<Digest, (usize, usize)>,
}

impl LazyImage {
    /// Where a content can be fetched from: the layer and the file.
    pub fn remote(&self, digest: &Digest) -> Option<(&Descriptor, &RemoteFile)> {
        let (l, f) = *self.remote.get(digest)?;
        let index = self.layers[l].index.as_ref()?;
        Some((&index.desc, &index.files[f]))
    }

    /// Contents (of non-empty files) of the tree.
    pub fn contents(&self) -> std::collections::BTreeSet<Digest> {
        self.tree
            .reachable()
            .filter_map(|n| match n.kind {
                strata_tree::NodeKind::Regular { digest, size } if size > 0 => Some(digest),
                _ => None,
            })
            .collect()
    }

    /// Every content the mount may store: the tree's, and the files of
    /// its lazy layers that an upper layer hides (a range request brings
    /// them along with their neighbours, and checking a layer's diff_id
    /// reads them). Its lease names these, so gc never takes what the
    /// daemon fetched while the mount lives.
    pub fn storable(&self) -> std::collections::BTreeSet<Digest> {
        let mut all = self.contents();
        for ix in self.layers.iter().filter_map(|l| l.index.as_ref()) {
            all.extend(ix.files.iter().filter(|f| f.size > 0).map(|f| f.digest));
        }
        all
    }

    /// How many contents the tree has, and how many of them the store
    /// lacks (a stat each).
    pub fn count_missing(&self, store: &Store) -> (u64, u64) {
        let contents: Vec<Digest> = self.contents().into_iter().collect();
        let missing = store.has_objects(&contents).iter().filter(|h| !**h).count();
        (contents.len() as u64, missing as u64)
    }

    /// The composefs EROFS image of the tree for a lazy mount: every
    /// non-empty file redirects to its object (no fs-verity digests, none
    /// of the contents read).
    pub fn erofs(&self) -> Result<Vec<u8>, LazyError> {
        struct Unfetched;
        impl strata_erofs::convert::Objects for Unfetched {
            fn verity(&mut self, d: &Digest, _: u64) -> std::io::Result<VerityDigest> {
                Err(std::io::Error::other(format!("{d} is not fetched")))
            }
            fn read(&mut self, d: &Digest, _: u64, _: u64) -> std::io::Result<Vec<u8>> {
                Err(std::io::Error::other(format!("{d} is not fetched")))
            }
        }
        let (fs, _) = strata_erofs::convert::from_tree(
            &self.tree,
            strata_erofs::convert::Contents::RedirectUnfetched,
            &mut Unfetched,
        )
        .map_err(|e| LazyError::Image(e.to_string()))?;
        let image = strata_erofs::build_owned(fs, strata_erofs::Flavor::Composefs)
            .map_err(|e| LazyError::Image(e.to_string()))?;
        Ok(image
            .into_bytes()
            .unwrap_or_else(|_| unreachable!("composefs images stream no data")))
    }

    /// Contents of the files `strata convert --prefetch-list` placed
    /// first in the layers the store lacks: those whose frames end at or
    /// before the layer's [`FIRST_END_ANNOTATION`] mark.
    ///
    /// [`FIRST_END_ANNOTATION`]: strata_oci::convert::FIRST_END_ANNOTATION
    pub fn placed_first(&self) -> Vec<Digest> {
        self.layers
            .iter()
            .filter_map(|l| {
                let ix = l.index.as_ref()?;
                let end: u64 = ix
                    .desc
                    .annotations
                    .get(strata_oci::convert::FIRST_END_ANNOTATION)?
                    .parse()
                    .ok()?;
                Some(
                    ix.files
                        .iter()
                        .filter(move |f| f.end <= end)
                        .map(|f| f.digest),
                )
            })
            .flatten()
            .collect()
    }

    /// Total bytes of the files named by `remote`.
    pub fn remote_bytes(&self) -> u64 {
        self.remote
            .keys()
            .filter_map(|d| self.remote(d))
            .map(|(_, f)| f.size)
            .sum()
    }
}

/// Build the tree of the image `source` resolved to from layer records
/// the store has and TOCs of the zstd:chunked layers it lacks.
pub fn prepare(
    store: &Store,
    source: &dyn ImageSource,
    resolved: ResolvedImage,
) -> Result<LazyImage, LazyError> {
    let config = strata_oci::parse_config(&resolved.config_bytes)?;
    let layers_desc = &resolved.manifest.layers;
    if config.diff_ids.len() != layers_desc.len() {
        return Err(LazyError::Oci(OciError::Format {
            what: format!("config {}", resolved.manifest.config.digest),
            reason: format!(
                "lists {} diff_ids but the manifest has {} layers",
                config.diff_ids.len(),
                layers_desc.len()
            ),
        }));
    }
    let counter = AtomicU64::new(0);
    // one metadata budget for the whole image (entries, TOC + tar-split
    // bytes), not one per layer: a hostile image cannot multiply it
    let budget = strata_oci::partial::MetadataBudget::default();
    for desc in layers_desc {
        strata_oci::layer_compression(&desc.media_type)?;
    }
    // every layer's TOC, tar-split and entries at once (network + CPU);
    // the tar-split is dropped once the entries are listed
    type Prepared = Result<(Vec<strata_tar::Entry>, Option<LayerIndex>), LazyError>;
    let prepared: Vec<Prepared> = std::thread::scope(|s| {
        let handles: Vec<_> = layers_desc
            .iter()
            .zip(&config.diff_ids)
            .enumerate()
            .map(|(index, (desc, diff_id))| {
                let (counter, budget) = (&counter, &budget);
                s.spawn(move || -> Prepared {
                    if store.has_layer(diff_id) {
                        return Ok((store.layer_record(diff_id)?.entries, None));
                    }
                    let t0 = std::time::Instant::now();
                    let opened =
                        strata_oci::partial::open_chunked_with(source, desc, counter, budget)?;
                    tracing::debug!(
                        "layer {index}: TOC and tar-split fetched and read in {:.1} ms",
                        t0.elapsed().as_secs_f64() * 1000.0
                    );
                    match opened {
                        // every content is checked against its tar-split
                        // checksum before it is served: one without
                        // cannot be served lazily
                        Ok(ix) => match ix.files.iter().find(|f| f.crc64.is_none()) {
                            Some(f) => Err(LazyError::NotLazy {
                                index,
                                digest: desc.digest,
                                reason: format!(
                                    "the tar-split gives {:?} no CRC-64 to check it against",
                                    f.name
                                ),
                            }),
                            None => Ok((ix.entries()?, Some(LayerIndex::keep(ix)))),
                        },
                        Err(reason) => Err(LazyError::NotLazy {
                            index,
                            digest: desc.digest,
                            reason,
                        }),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("layer preparation does not panic"))
            .collect()
    });
    let mut tree = Tree::new();
    let mut layers = Vec::new();
    let mut remote = HashMap::new();
    for (index, ((desc, diff_id), p)) in layers_desc
        .iter()
        .zip(&config.diff_ids)
        .zip(prepared)
        .enumerate()
    {
        let (entries, chunked) = p?;
        tree.apply_layer(&entries).map_err(|e| LazyError::Layer {
            index,
            digest: desc.digest,
            reason: e.to_string(),
        })?;
        if let Some(ix) = &chunked {
            for (i, f) in ix.files.iter().enumerate() {
                remote.entry(f.digest).or_insert((layers.len(), i));
            }
        }
        layers.push(LazyLayer {
            desc: desc.clone(),
            diff_id: *diff_id,
            index: chunked,
        });
    }
    Ok(LazyImage {
        resolved,
        tree,
        layers,
        downloaded: counter.into_inner(),
        remote,
    })
}
