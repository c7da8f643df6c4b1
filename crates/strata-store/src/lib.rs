//! The strata store: one content-addressed directory that is the single
//! source of truth for everything strata knows.
//!
//! ```text
//! $STRATA_ROOT
//! ├── lock                    flock: shared while an operation writes, exclusive for gc
//! ├── objects/ab/cdef…        file contents, named by SHA-256 of content, mode 0444
//! ├── layers/<diff_id hex>/   one per uncompressed layer
//! │   ├── record              tar rebuild data (headers inline, contents as object refs; zstd)
//! │   ├── meta.json           diff_id, size, compressed blobs seen, counts
//! │   └── verity              (object SHA-256, fs-verity digest) pairs, 64 bytes each
//! ├── blobs/<blob hex>        compressed blob digest -> diff_id (layer reuse by blob)
//! ├── images/<manifest hex>/  manifest (exact bytes), config (exact bytes), meta.json,
//! │   ├── image.erofs         the flattened composefs EROFS image (redirects into objects/)
//! │   ├── upper.erofs         or, when split: the part above a shared base
//! │   └── erofs.json          tree_digest, composefs_id, size, parts
//! ├── bases/<chain id hex>/   a shared base part: image.erofs, erofs.json, layers
//! ├── uppers/<image>-<dir>/   upper/ and work/ of `strata mount --rw`
//! ├── refs/<escaped name>     image name -> manifest digest (one file per name)
//! ├── blocks/                 VM templates: maps, names, build cache (chunks are objects)
//! ├── leases/<pid>-<n>.json   what a running holder (or a mount) uses: gc keeps it
//! ├── lazy/, serve/           state of lazy mounts and served templates (their crates')
//! └── tmp/<pid>-<n>/          staging of one store handle while it works (see below)
//! ```
//!
//! Rules this crate enforces:
//! - A thing becomes visible only by an atomic `rename(2)` after its bytes are
//!   durable (`syncfs`/`fsync`) and verified. Objects are verified by
//!   construction (their name is the hash of what was written); layers and
//!   images are committed by callers only after blob and diff_id checks.
//! - Commit order is objects -> layer -> image -> ref, each durable before the
//!   next, so a crash at any instant leaves a store that [`Store::fsck`]
//!   accepts: at worst staging leftovers in `tmp/` and unreferenced objects,
//!   layers or images for gc.
//!
//! Locking and leases (what keeps gc from removing what is in use):
//! - **Writes happen inside a [`Work`]**: the store `lock` held shared for
//!   the length of one operation, not for a handle's life. Every writing
//!   method here enters one by itself ([`ObjectBatch`] for its whole life);
//!   an operation of several steps (a pull: objects, layers, image, ref; a
//!   template build: chunks, map, name) holds one across them
//!   ([`Store::work`]). A short-lived process whose life is one operation
//!   (a CLI command) may hold one for the handle's life
//!   ([`Store::open_locked`]); a daemon never does.
//! - **gc holds `lock` exclusive** ([`Store::open_for_gc`]): it waits for
//!   running operations (not for idle handles), so nothing is between
//!   "object written" and "record committed" while it marks and sweeps.
//! - **Lifetimes are leases**: a long-lived user (a lazy mount's daemon, a
//!   served template) takes a lease ([`Store::lease_for_mount`]) naming the
//!   images, templates and objects it needs, before it relies on them; gc
//!   keeps what live leases name (holder running, or its mount still
//!   mounted) and what is mounted (mountinfo). Leases are written under a
//!   [`Work`] and read by gc under the exclusive lock, so a lease either
//!   existed when gc marked or was taken after the sweep.
//! - gc fails closed: a lease or mountinfo it cannot read, or operations
//!   that keep the lock past [`GC_LOCK_WAIT`] ([`StoreError::Busy`], naming
//!   them), and it removes nothing.
//! - `tmp/`: a handle's staging dir exists while it has a [`Work`]; the last
//!   one ending removes it (a failed operation leaves nothing). Staging of
//!   dead processes is removed when a store is opened; under gc's exclusive
//!   lock nothing works, so gc empties `tmp/` entirely.
//!
//! What this crate does not do: network, decompression, tar parsing (it
//! stores [`strata_tar::LayerRecord`]s built elsewhere), printing.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod erofs;
mod export;
mod fsck;
mod gc;
mod leases;
mod mount;
mod objects;
mod root;
mod summary;
mod templates;
mod work;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_digest::Digest;
use strata_tar::LayerRecord;

pub use erofs::{
    DEFAULT_SPLIT_THRESHOLD, ErofsInfo, PartInfo, SplitInfo, SplitPolicy, VerifyReport, chain_id,
    object_verity,
};
pub use export::ImageExportError;
pub use fsck::FsckReport;
pub use gc::GcReport;
pub use leases::{Lease, LeaseRecord, LeaseRoots, process_start_time};
pub use mount::{MountImageError, MountOptions, MountedImage};
pub use objects::{BatchStats, ObjectBatch};
pub use root::default_root;
pub use summary::{
    BasePart, ImageInspect, ImageSummary, LayerInspect, Part, Parts, Sharer, TemplateInspect,
    TemplateSummary, TreeInspect,
};
pub use templates::{BLOCK_SIZE, CHUNK_SIZE, Extent, MAP_VERSION, TemplateMap, TemplateRemote};
pub use work::Work;
use work::WorkState;

/// Errors of store operations. Each names the path or object and the action.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An image name or digest that the store does not know.
    #[error("image {0:?} not found in the store")]
    ImageNotFound(String),
    /// A template name or id that the store does not know.
    #[error("template {0:?} not found in the store")]
    TemplateNotFound(String),
    /// A layer the store does not have.
    #[error("layer {0} not found in the store")]
    LayerNotFound(Digest),
    /// A record in the store is malformed.
    #[error("corrupt {what} {path}: {reason}")]
    Corrupt {
        /// Kind of record.
        what: &'static str,
        /// Where it is.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tree or request strata cannot turn into what was asked.
    #[error("{0}")]
    Unsupported(String),
    /// Lock contention that cannot be waited out.
    #[error("store {0} is locked by another process")]
    Locked(PathBuf),
    /// The operation was cancelled; what it did so far is consistent.
    #[error("cancelled")]
    Cancelled,
    /// The store is in use by others and the operation needs it alone.
    #[error("store {} is in use{}", path.display(), if holders.is_empty() { String::from(" by other processes") } else { format!(" by: {}", holders.join(", ")) })]
    Busy {
        /// The store.
        path: PathBuf,
        /// Live leases: who holds what.
        holders: Vec<String>,
    },
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn io_err(
    action: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// One compressed form of a layer that was seen (pulled) for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobInfo {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
}

/// `layers/<diff_id>/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMeta {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the uncompressed tar.
    pub size: u64,
    /// Compressed blobs known to decompress to this layer.
    pub blobs: Vec<BlobInfo>,
    /// Number of tar entries.
    pub entries: u64,
    /// Number of distinct objects referenced.
    pub objects: u64,
}

/// One layer of an image, as recorded in the image's meta.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageLayer {
    /// The compressed blob named in the manifest.
    pub blob: BlobInfo,
    /// The uncompressed layer's digest (config rootfs.diff_ids).
    pub diff_id: Digest,
}

/// `images/<manifest digest>/meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Digest of the manifest bytes.
    pub manifest_digest: Digest,
    /// Manifest media type.
    pub manifest_media_type: String,
    /// Digest of the config bytes.
    pub config_digest: Digest,
    /// Layers bottom to top.
    pub layers: Vec<ImageLayer>,
    /// The reference it was first pulled from.
    pub source: String,
    /// Seconds since the epoch when it was committed.
    pub created: u64,
}

/// The mount source of a composefs mount of an image (`strata:<manifest
/// digest>`): gc keeps images mounted this way.
pub fn composefs_source(manifest_digest: &Digest) -> String {
    format!("strata:{manifest_digest}")
}

/// The on-disk store.
///
/// A handle does not hold the store lock by itself: every write enters a
/// [`Work`] (the lock shared) for as long as it runs, and gc takes the lock
/// exclusive. Long-lived users (daemons) keep what they need between
/// operations with leases ([`Store::lease`]).
pub struct Store {
    root: PathBuf,
    work: Arc<WorkState>,
    /// A guard held for the handle's life ([`Store::open_locked`], and
    /// the exclusive lock of an [`ExclusiveStore`]).
    life: Option<Work>,
}

static STAGING_SEQ: AtomicU64 = AtomicU64::new(0);

const DIRS: [&str; 7] = [
    "objects", "layers", "blobs", "images", "refs", "bases", "tmp",
];

/// How long [`Store::open_for_gc`] waits for running operations to end.
pub const GC_LOCK_WAIT: Duration = Duration::from_secs(60);

impl Store {
    /// Open (creating if needed) the store at `root`. Takes no lock for
    /// the handle's life: operations take it ([`Store::work`]), so a
    /// daemon holding this handle for weeks does not keep gc out.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref();
        create_dirs(root)?;
        // staging of processes gone is never used again; when nobody works
        // here at all, everything in tmp/ is a leftover
        clean_dead_staging(&root.join("tmp"));
        let lock = work::open_lock(&root.join("lock"))?;
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok() {
            clean_dir(&root.join("tmp"))?;
        }
        drop(lock);
        Ok(Self::handle(root, None))
    }

    /// Open the store and hold the lock shared until the handle is
    /// dropped: for a process whose whole life is one short operation (a
    /// CLI command), so every step it takes is one operation for gc.
    /// Waits while a gc runs. Never for a daemon: use [`Store::open`].
    pub fn open_locked(root: impl AsRef<Path>) -> Result<Store> {
        let mut store = Self::open(root)?;
        store.life = Some(store.work()?);
        Ok(store)
    }

    fn handle(root: &Path, life: Option<Work>) -> Store {
        let staging = root.join("tmp").join(format!(
            "{}-{}",
            std::process::id(),
            STAGING_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        Store {
            root: root.to_path_buf(),
            work: WorkState::new(root, staging),
            life,
        }
    }

    /// Enter an operation on the store: until the guard (and every other
    /// guard of this handle) is dropped, the store lock is held shared, so
    /// no gc runs. Cheap when this handle works already. Every write of
    /// this crate enters one by itself; callers hold one across steps that
    /// only make sense together (a pull's layers, image and ref).
    pub fn work(&self) -> Result<Work> {
        self.work.enter()
    }

    /// Open the store holding the lock exclusive (gc). Waits for every
    /// running operation to end, however long.
    pub fn open_exclusive(root: impl AsRef<Path>) -> Result<ExclusiveStore> {
        let root = root.as_ref();
        create_dirs(root)?;
        let lock_path = root.join("lock");
        let lock = work::open_lock(&lock_path)?;
        work::lock_blocking(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(io_err("locking store (exclusive)", &lock_path))?;
        Self::exclusive(root, lock)
    }

    fn exclusive(root: &Path, lock: File) -> Result<ExclusiveStore> {
        // nobody works: all of tmp/ is leftovers (of killed operations)
        clean_dir(&root.join("tmp"))?;
        let mut store = Self::handle(root, None);
        store.life = Some(store.work.enter_locked(lock)?);
        Ok(ExclusiveStore(store))
    }

    /// Open the store alone for gc. Running operations (a pull, a build,
    /// a daemon committing what it fetched) are waited for, up to
    /// [`GC_LOCK_WAIT`]; daemons between operations do not hold the lock
    /// (their leases say what they use). When operations still hold it
    /// after that, fail with [`StoreError::Busy`] naming them.
    pub fn open_for_gc(root: impl AsRef<Path>) -> Result<ExclusiveStore> {
        Self::open_for_gc_within(root, GC_LOCK_WAIT)
    }

    /// [`Store::open_for_gc`], waiting at most `wait`.
    pub fn open_for_gc_within(root: impl AsRef<Path>, wait: Duration) -> Result<ExclusiveStore> {
        let root = root.as_ref();
        create_dirs(root)?;
        let lock_path = root.join("lock");
        match work::lock_exclusive_within(&lock_path, wait)? {
            Some(lock) => Self::exclusive(root, lock),
            None => Err(work::busy(root, &lock_path)?),
        }
    }

    /// Record that `holder` uses `roots` until the returned lease is
    /// dropped: gc keeps them, whichever process runs it.
    pub fn lease(&self, holder: &str, roots: LeaseRoots) -> Result<Lease> {
        // under the lock: a gc sweeping now has read the leases already
        let _work = self.work()?;
        leases::take(&self.root, holder, roots, None)
    }

    /// A lease that also stays live while `mount_point` is mounted (a
    /// mount whose files read what `roots` names).
    pub fn lease_for_mount(
        &self,
        holder: &str,
        roots: LeaseRoots,
        mount_point: &Path,
    ) -> Result<Lease> {
        let _work = self.work()?;
        leases::take(&self.root, holder, roots, Some(mount_point.to_path_buf()))
    }

    /// Every lease on record (live or stale).
    pub fn leases(&self) -> Result<Vec<LeaseRecord>> {
        Ok(leases::all(&self.root)?
            .into_iter()
            .map(|(_, l)| l)
            .collect())
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, unique path for scratch files of other crates, inside this
    /// handle's staging dir: never visible as store content, removed with
    /// the staging dir when the handle's last [`Work`] ends (also after a
    /// crash, by the next gc or store user alone). Use it only while
    /// holding a [`Work`]: the staging dir exists only then.
    pub fn scratch_path(&self, what: &str) -> Result<PathBuf> {
        self.staging_path(what)
    }

    /// A fresh, unique path inside this handle's staging dir (exists while
    /// a [`Work`] of the handle lives). The dir is made here if the
    /// [`Work`] could not make it (a full disk): the error names the disk.
    pub(crate) fn staging_path(&self, what: &str) -> Result<PathBuf> {
        let staging = self.work.staging();
        if !staging.is_dir() {
            fs::create_dir_all(staging).map_err(io_err("creating staging dir", staging))?;
        }
        Ok(staging.join(format!(
            "{what}-{}",
            STAGING_SEQ.fetch_add(1, Ordering::Relaxed)
        )))
    }

    // ---- objects ---------------------------------------------------------

    /// Where the object named `digest` lives (it may not exist).
    pub fn object_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.root.join("objects").join(&hex[..2]).join(&hex[2..])
    }

    /// Whether the object exists.
    pub fn has_object(&self, digest: &Digest) -> bool {
        self.object_path(digest).exists()
    }

    /// Whether each of `digests` is in the store, as [`has_object`]
    /// says, for many at once: looked up relative to `objects/` (a short
    /// walk, no path built), and not at all under a fan-out directory
    /// that does not exist (a fresh store has few).
    ///
    /// [`has_object`]: Self::has_object
    pub fn has_objects(&self, digests: &[Digest]) -> Vec<bool> {
        use rustix::fs::{AtFlags, Mode, OFlags, openat, statat};
        let Ok(objects) = rustix::fs::open(
            self.root.join("objects"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return vec![false; digests.len()];
        };
        // per fan-out byte: unknown yet, absent, or open
        let mut fanout: Vec<Option<Option<rustix::fd::OwnedFd>>> = (0..256).map(|_| None).collect();
        let mut name = [0u8; 62];
        digests
            .iter()
            .map(|d| {
                let hex = d.hex();
                let b = usize::from(d.as_bytes()[0]);
                let dir = fanout[b].get_or_insert_with(|| {
                    openat(
                        &objects,
                        &hex[..2],
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .ok()
                });
                let Some(dir) = dir else { return false };
                if hex.len() != 64 {
                    return self.object_path(d).exists();
                }
                name.copy_from_slice(&hex.as_bytes()[2..]);
                // (as Path::exists: a link is followed)
                statat(dir, &name[..], AtFlags::empty()).is_ok()
            })
            .collect()
    }

    /// Open an object for reading.
    pub fn open_object(&self, digest: &Digest) -> Result<File> {
        let p = self.object_path(digest);
        File::open(&p).map_err(io_err("opening object", p))
    }

    /// Start a batch of object writes that become visible together on commit.
    pub fn object_batch(&self) -> Result<ObjectBatch<'_>> {
        ObjectBatch::new(self)
    }

    // ---- layers ----------------------------------------------------------

    pub(crate) fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    /// Whether a layer with this diff_id is committed.
    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).join("meta.json").exists()
    }

    /// The diff_id of the layer a compressed blob is known to decompress to.
    pub fn layer_by_blob(&self, blob: &Digest) -> Option<Digest> {
        let p = self.root.join("blobs").join(blob.hex());
        let s = fs::read_to_string(p).ok()?;
        let d: Digest = s.trim().parse().ok()?;
        self.has_layer(&d).then_some(d)
    }

    /// A committed layer's meta.
    pub fn layer_meta(&self, diff_id: &Digest) -> Result<LayerMeta> {
        let p = self.layer_dir(diff_id).join("meta.json");
        if !p.exists() {
            return Err(StoreError::LayerNotFound(*diff_id));
        }
        read_json(&p, "layer meta")
    }

    /// A committed layer's record.
    pub fn layer_record(&self, diff_id: &Digest) -> Result<LayerRecord> {
        let p = self.layer_dir(diff_id).join("record");
        let f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::LayerNotFound(*diff_id)
            } else {
                io_err("opening layer record", &p)(e)
            }
        })?;
        LayerRecord::decode(io::BufReader::new(f)).map_err(|e| StoreError::Corrupt {
            what: "layer record",
            path: p.clone(),
            reason: e.to_string(),
        })
    }

    /// Regenerate a layer's exact uncompressed tar from its record.
    pub fn rebuild_layer(&self, diff_id: &Digest, out: &mut dyn Write) -> Result<u64> {
        let record = self.layer_record(diff_id)?;
        let mut open = |d: &Digest| -> io::Result<Box<dyn Read>> {
            let p = self.object_path(d);
            Ok(Box::new(File::open(&p).map_err(|e| {
                io::Error::new(e.kind(), format!("opening object {}: {e}", p.display()))
            })?))
        };
        record
            .rebuild(&mut open, out)
            .map_err(io_err("rebuilding layer", self.layer_dir(diff_id)))
    }

    /// Commit a layer: make the batch's objects visible, then the record and
    /// meta, atomically. Call only after the layer's blob digest and diff_id
    /// were verified. If the layer already exists (a concurrent pull), the
    /// existing one is kept and the blob alias is still recorded.
    pub fn commit_layer(
        &self,
        batch: ObjectBatch<'_>,
        meta: &LayerMeta,
        record: &LayerRecord,
    ) -> Result<BatchStats> {
        let _work = self.work()?;
        let (stats, known) = batch.commit_unsynced()?;
        let final_dir = self.layer_dir(&meta.diff_id);
        if !final_dir.exists() {
            // The record, meta and verity files are written plainly; one
            // syncfs then makes them and the objects' renames durable
            // before the layer is renamed into place (a sync per file was
            // 6 journal commits, 40 ms of a pull's end).
            let stage = self.staging_path("layer")?;
            fs::create_dir(&stage).map_err(io_err("creating layer staging", &stage))?;
            let rec_path = stage.join("record");
            let f = File::create(&rec_path).map_err(io_err("writing layer record", &rec_path))?;
            let mut w = io::BufWriter::new(f);
            record
                .encode(&mut w)
                .map_err(io_err("writing layer record", &rec_path))?;
            w.flush()
                .map_err(io_err("writing layer record", &rec_path))?;
            drop(w);
            let meta_path = stage.join("meta.json");
            fs::write(&meta_path, json_bytes(&meta_path, meta)?)
                .map_err(io_err("writing", &meta_path))?;
            let verity = self.layer_verity_map(&stage, record.objects(), &known)?;
            let verity_path = stage.join("verity");
            fs::write(&verity_path, erofs::encode_verity(&verity))
                .map_err(io_err("writing", &verity_path))?;
            syncfs(&stage)?;
            match fs::rename(&stage, &final_dir) {
                Ok(()) => sync_dir(&self.root.join("layers"))?,
                Err(_) if final_dir.join("meta.json").exists() => {
                    let _ = fs::remove_dir_all(&stage);
                }
                Err(e) => return Err(io_err("committing layer", &final_dir)(e)),
            }
        } else {
            syncfs(&self.root)?;
        }
        for b in &meta.blobs {
            self.add_blob_alias(&b.digest, &meta.diff_id)?;
        }
        Ok(stats)
    }

    /// Record that the compressed blob `blob` decompresses to layer `diff_id`.
    pub fn add_blob_alias(&self, blob: &Digest, diff_id: &Digest) -> Result<()> {
        let _work = self.work()?;
        let p = self.root.join("blobs").join(blob.hex());
        if fs::read_to_string(&p).is_ok_and(|s| s.trim() == diff_id.to_string()) {
            return Ok(());
        }
        write_atomic(self, &p, format!("{diff_id}\n").as_bytes())
    }

    // ---- images ----------------------------------------------------------

    pub(crate) fn image_dir(&self, manifest_digest: &Digest) -> PathBuf {
        self.root.join("images").join(manifest_digest.hex())
    }

    /// Whether an image is committed.
    pub fn has_image(&self, manifest_digest: &Digest) -> bool {
        self.image_dir(manifest_digest).join("meta.json").exists()
    }

    /// Commit an image whose layers are all committed. Idempotent.
    pub fn commit_image(&self, meta: &ImageMeta, manifest: &[u8], config: &[u8]) -> Result<()> {
        let _work = self.work()?;
        for l in &meta.layers {
            if !self.has_layer(&l.diff_id) {
                return Err(StoreError::LayerNotFound(l.diff_id));
            }
        }
        let final_dir = self.image_dir(&meta.manifest_digest);
        if final_dir.join("meta.json").exists() {
            return Ok(());
        }
        let stage = self.staging_path("image")?;
        fs::create_dir(&stage).map_err(io_err("creating image staging", &stage))?;
        write_durable(&stage.join("manifest"), manifest)?;
        write_durable(&stage.join("config"), config)?;
        write_json_durable(&stage.join("meta.json"), meta)?;
        sync_dir(&stage)?;
        match fs::rename(&stage, &final_dir) {
            Ok(()) => sync_dir(&self.root.join("images")),
            Err(_) if final_dir.join("meta.json").exists() => {
                let _ = fs::remove_dir_all(&stage);
                Ok(())
            }
            Err(e) => Err(io_err("committing image", &final_dir)(e)),
        }
    }

    /// An image's meta.
    pub fn image_meta(&self, manifest_digest: &Digest) -> Result<ImageMeta> {
        let p = self.image_dir(manifest_digest).join("meta.json");
        if !p.exists() {
            return Err(StoreError::ImageNotFound(manifest_digest.to_string()));
        }
        read_json(&p, "image meta")
    }

    /// An image's exact manifest bytes.
    pub fn image_manifest(&self, manifest_digest: &Digest) -> Result<Vec<u8>> {
        let p = self.image_dir(manifest_digest).join("manifest");
        fs::read(&p).map_err(io_err("reading manifest", p))
    }

    /// An image's exact config bytes.
    pub fn image_config(&self, manifest_digest: &Digest) -> Result<Vec<u8>> {
        let p = self.image_dir(manifest_digest).join("config");
        fs::read(&p).map_err(io_err("reading config", p))
    }

    /// Every committed image's manifest digest.
    pub fn image_digests(&self) -> Result<Vec<Digest>> {
        list_hex_names(&self.root.join("images"))
    }

    // ---- refs ------------------------------------------------------------

    /// Point `name` at an image, replacing any previous target atomically.
    pub fn set_ref(&self, name: &str, manifest_digest: &Digest) -> Result<()> {
        let _work = self.work()?;
        if !self.has_image(manifest_digest) {
            return Err(StoreError::ImageNotFound(manifest_digest.to_string()));
        }
        let p = self.root.join("refs").join(escape_ref(name));
        write_atomic(self, &p, format!("{manifest_digest}\n").as_bytes())
    }

    /// Remove a name. Returns the digest it pointed to.
    pub fn remove_ref(&self, name: &str) -> Result<Option<Digest>> {
        let _work = self.work()?;
        let p = self.root.join("refs").join(escape_ref(name));
        let target = read_ref_file(&p).ok();
        match fs::remove_file(&p) {
            Ok(()) => {
                sync_dir(&self.root.join("refs"))?;
                Ok(target)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("removing ref", p)(e)),
        }
    }

    /// Every name and what it points to, sorted by name.
    pub fn refs(&self) -> Result<BTreeMap<String, Digest>> {
        let dir = self.root.join("refs");
        let mut out = BTreeMap::new();
        for e in fs::read_dir(&dir).map_err(io_err("listing refs", &dir))? {
            let e = e.map_err(io_err("listing refs", &dir))?;
            let fname = e.file_name();
            let Some(name) = fname.to_str().and_then(unescape_ref) else {
                continue;
            };
            if let Ok(d) = read_ref_file(&e.path()) {
                out.insert(name, d);
            }
        }
        Ok(out)
    }

    /// Resolve an IMAGE argument: a name (exactly as pulled or tagged), a
    /// manifest digest (`sha256:...`), or an unambiguous hex prefix of one
    /// (at least 6 digits).
    pub fn resolve_image(&self, name_or_digest: &str) -> Result<Digest> {
        let p = self.root.join("refs").join(escape_ref(name_or_digest));
        if let Ok(d) = read_ref_file(&p) {
            return Ok(d);
        }
        if let Ok(d) = name_or_digest.parse::<Digest>()
            && self.has_image(&d)
        {
            return Ok(d);
        }
        let prefix = name_or_digest
            .strip_prefix("sha256:")
            .unwrap_or(name_or_digest);
        if prefix.len() >= 6 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<Digest> = self
                .image_digests()?
                .into_iter()
                .filter(|d| d.hex().starts_with(prefix))
                .collect();
            if matches.len() == 1 {
                return Ok(matches[0]);
            }
        }
        // A short name matches a ref that ends with it (`hello` ->
        // `oci:samples/hello:latest` is not attempted: too loose); we accept
        // `NAME` for `NAME:latest` refs only when unique.
        let refs = self.refs()?;
        let candidates: Vec<&Digest> = refs
            .iter()
            .filter(|(n, _)| {
                n.strip_suffix(":latest").is_some_and(|base| {
                    base == name_or_digest || base.ends_with(&format!("/{name_or_digest}"))
                })
            })
            .map(|(_, d)| d)
            .collect();
        if candidates.len() == 1 {
            return Ok(*candidates[0]);
        }
        Err(StoreError::ImageNotFound(name_or_digest.to_string()))
    }

    /// Remove an image name; when given a digest, remove every name of that
    /// image. The image's files go when no name points to it any more (its
    /// layers and objects stay until gc). Returns the names removed.
    pub fn remove_image(&self, name_or_digest: &str) -> Result<(Digest, Vec<String>)> {
        let _work = self.work()?;
        let digest = self.resolve_image(name_or_digest)?;
        let refs = self.refs()?;
        let is_name = refs.contains_key(name_or_digest);
        let mut removed = Vec::new();
        for (name, d) in &refs {
            if *d == digest && (!is_name || name == name_or_digest) {
                self.remove_ref(name)?;
                removed.push(name.clone());
            }
        }
        if !self.refs()?.values().any(|d| *d == digest) {
            let dir = self.image_dir(&digest);
            // Move aside first so a half-deleted image is never visible.
            // (on a full disk there is no staging dir: gc takes the
            // unnamed image later)
            if let Ok(trash) = self.staging_path("rm-image")
                && fs::rename(&dir, &trash).is_ok()
            {
                sync_dir(&self.root.join("images"))?;
                let _ = fs::remove_dir_all(&trash);
            }
        }
        Ok((digest, removed))
    }

    /// Images that use the layer `diff_id`.
    pub fn images_using_layer(&self, diff_id: &Digest) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for d in self.image_digests()? {
            if let Ok(m) = self.image_meta(&d)
                && m.layers.iter().any(|l| l.diff_id == *diff_id)
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Check everything: re-hash every object, decode every record, rebuild
    /// every layer and compare with its diff_id, check images and refs.
    pub fn fsck(&self, ctl: strata_ops::Ctl<'_>) -> Result<FsckReport> {
        // no gc half-way through removing what we look at
        let _work = self.work()?;
        fsck::run(self, ctl)
    }
}

/// The store opened alone ([`Store::open_exclusive`]): the only handle
/// that can run gc, so no pull is between "object written" and "record
/// committed" while it sweeps.
pub struct ExclusiveStore(Store);

impl std::ops::Deref for ExclusiveStore {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.0
    }
}

impl ExclusiveStore {
    /// Mark and sweep: keep what refs, live leases and mounts reach, remove
    /// the rest. Fails (removing nothing) when it cannot tell what is in
    /// use: mountinfo unreadable, a lease unreadable.
    pub fn gc(&self, dry_run: bool, ctl: strata_ops::Ctl<'_>) -> Result<GcReport> {
        gc::run(&self.0, dry_run, ctl)
    }
}

// ---- helpers ---------------------------------------------------------------

/// Escape a ref name into one file name: keep `[A-Za-z0-9._-]`, encode the
/// rest as `%XX` (so `/` and `:` never make directories or look odd).
pub fn escape_ref(name: &str) -> String {
    let mut s = String::with_capacity(name.len() + 8);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    if s.starts_with('.') {
        s.replace_range(0..1, "%2E");
    }
    s
}

/// Inverse of [`escape_ref`]; `None` for names that are not ours.
pub fn unescape_ref(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn read_ref_file(p: &Path) -> io::Result<Digest> {
    let s = fs::read_to_string(p)?;
    s.trim()
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn list_hex_names(dir: &Path) -> Result<Vec<Digest>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err("listing", dir))? {
        let e = e.map_err(io_err("listing", dir))?;
        if let Some(n) = e.file_name().to_str()
            && let Ok(d) = format!("sha256:{n}").parse::<Digest>()
        {
            out.push(d);
        }
    }
    out.sort();
    Ok(out)
}

fn create_dirs(root: &Path) -> Result<()> {
    fs::create_dir_all(root).map_err(io_err("creating store", root))?;
    for d in DIRS {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(io_err("creating store dir", &p))?;
    }
    Ok(())
}

/// Remove `tmp/<pid>-<n>` staging dirs whose process is gone.
fn clean_dead_staging(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(p, n)| n.parse::<u64>().ok().and(p.parse::<u32>().ok()))
        else {
            continue;
        };
        if leases::process_start_time(pid).is_none() {
            make_writable(&e.path());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

pub(crate) fn clean_dir(dir: &Path) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("cleaning", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(io_err("cleaning", dir))?;
        let p = e.path();
        let r = if e.file_type().is_ok_and(|t| t.is_dir()) {
            make_writable(&p);
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(io_err("removing stale staging", &p))?;
    }
    Ok(())
}

pub(crate) fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o700));
                make_writable(&e.path());
            }
        }
    }
}

pub(crate) fn sync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io_err("syncing dir", p))
}

pub(crate) fn write_durable(p: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(p).map_err(io_err("creating", p))?;
    f.write_all(bytes).map_err(io_err("writing", p))?;
    f.sync_all().map_err(io_err("syncing", p))
}

pub(crate) fn write_json_durable<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    write_durable(p, &json_bytes(p, v)?)
}

/// `v` as the pretty JSON (and final newline) the store writes to `p`.
fn json_bytes<T: Serialize>(p: &Path, v: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(v).map_err(|e| StoreError::Corrupt {
        what: "json",
        path: p.to_path_buf(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// `syncfs` of the filesystem holding `p`.
pub(crate) fn syncfs(p: &Path) -> Result<()> {
    let f = File::open(p).map_err(io_err("opening", p))?;
    rustix::fs::syncfs(&f).map_err(|e| io_err("syncing the filesystem of", p)(e.into()))
}

/// Write `bytes` to `p` atomically: staging file, fsync, rename, fsync dir.
pub(crate) fn write_atomic(store: &Store, p: &Path, bytes: &[u8]) -> Result<()> {
    let _work = store.work()?;
    let stage = store.staging_path("file")?;
    write_durable(&stage, bytes)?;
    fs::rename(&stage, p).map_err(io_err("renaming into place", p))?;
    sync_dir(p.parent().expect("store paths have parents"))
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(p: &Path, what: &'static str) -> Result<T> {
    let bytes = fs::read(p).map_err(io_err("reading", p))?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        what,
        path: p.to_path_buf(),
        reason: e.to_string(),
    })
}

impl From<strata_ops::Cancelled> for StoreError {
    fn from(_: strata_ops::Cancelled) -> Self {
        StoreError::Cancelled
    }
}

impl strata_ops::HasKind for StoreError {
    fn kind(&self) -> strata_ops::ErrorKind {
        use strata_ops::ErrorKind as K;
        match self {
            StoreError::Io { source, .. } => K::of_io(source),
            StoreError::ImageNotFound(_)
            | StoreError::TemplateNotFound(_)
            | StoreError::LayerNotFound(_) => K::NotFound,
            StoreError::Corrupt { .. } => K::DigestMismatch,
            StoreError::Unsupported(_) => K::Unsupported,
            StoreError::Locked(_) | StoreError::Busy { .. } => K::Busy,
            StoreError::Cancelled => K::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many lookups at once answer as one at a time: objects present,
    /// absent beside them in the same fan-out directory, and absent under
    /// fan-out directories that do not exist.
    #[test]
    fn has_objects_agrees_with_has_object() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let mut batch = store.object_batch().unwrap();
        let mut all = Vec::new();
        for i in 0..40u32 {
            let c = format!("content {i}").into_bytes();
            if i % 3 == 0 {
                all.push(batch.put(&mut &c[..], c.len() as u64).unwrap());
            } else {
                all.push(Digest::sha256_of(&c));
            }
        }
        batch.commit().unwrap();
        let present: Vec<bool> = all.iter().map(|d| store.has_object(d)).collect();
        assert_eq!(present.iter().filter(|p| **p).count(), 14);
        assert_eq!(store.has_objects(&all), present);
        // a digest in the fan-out directory of a present one, but absent
        let hex = all[0].hex();
        let sibling: Digest = format!("sha256:{}{}", &hex[..2], "0".repeat(62))
            .parse()
            .unwrap();
        assert!(!store.has_object(&sibling));
        assert_eq!(store.has_objects(&[sibling, all[0]]), vec![false, true]);
        assert!(store.has_objects(&[]).is_empty());
    }

    #[test]
    fn ref_escaping_round_trips() {
        for name in [
            "docker://127.0.0.1:5000/debian:bookworm",
            "oci:samples/hello:latest",
            ".hidden",
            "a%b",
            "sha256:abc",
        ] {
            let e = escape_ref(name);
            assert!(!e.contains('/') && !e.starts_with('.'), "{e}");
            assert_eq!(unescape_ref(&e).as_deref(), Some(name));
        }
    }
}
