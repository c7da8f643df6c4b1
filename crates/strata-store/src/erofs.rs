//! Image trees and their composefs EROFS images.
//!
//! ```text
//! layers/<diff_id>/verity       fs-verity digest of every object of the layer
//!                               (pairs of 32-byte sha256 and verity, sorted)
//! images/<manifest>/image.erofs the flattened composefs image (absent when split)
//! images/<manifest>/erofs.json  ErofsInfo: tree digest, composefs id, parts
//! bases/<chain id>/image.erofs  a shared base part of hybrid images
//! bases/<chain id>/erofs.json   its ErofsInfo
//! ```
//!
//! The tree digest (SHA-256 of the flattened image's bytes) is the image's
//! one digest whether or not it is split: a split image's flattened bytes
//! are computed, hashed and dropped.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use strata_digest::{Digest, FsVerityHasher, VerityDigest, fsverity_digest};
use strata_erofs::convert::{Contents, Objects, from_tree};
use strata_erofs::{Flavor, FsTree};
use strata_ops::{Ctl, Event, Op, Unit};
use strata_tree::Tree;

use crate::{
    Result, Store, StoreError, io_err, read_json, sync_dir, write_atomic, write_json_durable,
};

/// Digests of one EROFS image file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartInfo {
    /// SHA-256 of the image bytes.
    pub digest: Digest,
    /// fs-verity digest of the image bytes (the composefs image id).
    pub verity: VerityDigest,
    /// Size in bytes.
    pub size: u64,
}

/// `images/<manifest>/erofs.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErofsInfo {
    /// Image format written ("composefs-v1").
    pub format: String,
    /// SHA-256 of the flattened composefs image: the image's tree digest.
    pub tree_digest: Digest,
    /// fs-verity digest of the flattened image (the composefs image id).
    pub composefs_id: VerityDigest,
    /// Size of the flattened image.
    pub size: u64,
    /// Inodes in the flattened image.
    pub inodes: u64,
    /// Set when the image is stored as a hybrid of two parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitInfo>,
}

/// How a hybrid image is stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SplitInfo {
    /// Number of bottom layers in the base part.
    pub base_layers: usize,
    /// Chain id of those layers (names `bases/<hex>`).
    pub base_chain: Digest,
    /// The base part.
    pub base: PartInfo,
    /// The upper part (`images/<manifest>/upper.erofs`).
    pub upper: PartInfo,
}

/// When to store an image as a hybrid of a shared base part and its own part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitPolicy {
    /// Never: one flattened image.
    Never,
    /// When the longest proper layer-chain prefix this image shares with
    /// others is used by at least this many images (this one included).
    Auto(usize),
    /// Whenever the image has more than one layer: at the longest prefix
    /// shared with another image, else below its top layer.
    Always,
}

/// The default `Auto` threshold.
pub const DEFAULT_SPLIT_THRESHOLD: usize = 3;

const FORMAT: &str = "composefs-v1";

/// Chain id of a layer list (OCI's definition: chain(n) = sha256(chain(n-1) + " " + diff_id(n))).
pub fn chain_id(diff_ids: &[Digest]) -> Digest {
    let mut chain = diff_ids[0];
    for d in &diff_ids[1..] {
        chain = Digest::sha256_of(format!("{chain} {d}").as_bytes());
    }
    chain
}

/// What the store's objects look like to the converter.
struct StoreObjects<'a> {
    store: &'a Store,
    verity: HashMap<Digest, VerityDigest>,
}

impl Objects for StoreObjects<'_> {
    fn verity(&mut self, digest: &Digest, _size: u64) -> io::Result<VerityDigest> {
        if let Some(v) = self.verity.get(digest) {
            return Ok(*v);
        }
        let v = object_verity(&self.store.object_path(digest))?;
        self.verity.insert(*digest, v);
        Ok(v)
    }

    fn read(&mut self, digest: &Digest, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let p = self.store.object_path(digest);
        let f = File::open(&p).map_err(|e| with_path(e, "opening object", &p))?;
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| with_path(e, "reading object", &p))?;
        Ok(buf)
    }
}

fn with_path(e: io::Error, what: &str, p: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

/// fs-verity digest of a file.
pub fn object_verity(p: &Path) -> io::Result<VerityDigest> {
    let mut f = File::open(p).map_err(|e| with_path(e, "opening object", p))?;
    let mut h = FsVerityHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| with_path(e, "reading object", p))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finish())
}

pub(crate) fn encode_verity(map: &[(Digest, VerityDigest)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(map.len() * 64);
    for (d, v) in map {
        out.extend_from_slice(d.as_bytes());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

impl Store {
    /// The flattened tree of an image, from its layer records.
    pub fn image_tree(&self, digest: &Digest) -> Result<Tree> {
        let meta = self.image_meta(digest)?;
        self.layers_tree(&meta.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>())
    }

    fn layers_tree(&self, diff_ids: &[Digest]) -> Result<Tree> {
        let mut tree = Tree::new();
        for (i, d) in diff_ids.iter().enumerate() {
            let record = self.layer_record(d)?;
            tree.apply_layer(&record.entries)
                .map_err(|e| StoreError::Corrupt {
                    what: "layer chain",
                    path: self.layer_dir(d),
                    reason: format!("layer {i} does not apply: {e}"),
                })?;
        }
        Ok(tree)
    }

    /// Compute the fs-verity digests of objects, sorted by digest.
    pub(crate) fn compute_verity(
        &self,
        objects: impl Iterator<Item = Digest>,
    ) -> io::Result<Vec<(Digest, VerityDigest)>> {
        let mut todo: Vec<Digest> = objects.collect();
        todo.sort();
        todo.dedup();
        // hashing is CPU-bound: one thread per core; already sorted
        strata_ops::par_map(
            &todo,
            strata_ops::default_jobs(8),
            &strata_ops::Cancel::new(),
            |_, d| Ok::<_, io::Error>((*d, object_verity(&self.object_path(d))?)),
        )
    }

    /// Write a layer's verity file into `dir` (staging or committed).
    pub(crate) fn write_layer_verity(
        &self,
        dir: &Path,
        objects: impl Iterator<Item = Digest>,
    ) -> Result<Vec<(Digest, VerityDigest)>> {
        let map = self
            .compute_verity(objects)
            .map_err(io_err("computing fs-verity digests", dir))?;
        write_atomic(self, &dir.join("verity"), &encode_verity(&map))?;
        Ok(map)
    }

    /// The fs-verity digests of a layer's objects, sorted, those of `known`
    /// objects as given (computed as a batch wrote them), the others read.
    pub(crate) fn layer_verity_map(
        &self,
        dir: &Path,
        objects: impl Iterator<Item = Digest>,
        known: &HashMap<Digest, VerityDigest>,
    ) -> Result<Vec<(Digest, VerityDigest)>> {
        let mut todo: Vec<Digest> = objects.collect();
        todo.sort();
        todo.dedup();
        let (have, read): (Vec<Digest>, Vec<Digest>) =
            todo.into_iter().partition(|d| known.contains_key(d));
        let mut map = self
            .compute_verity(read.into_iter())
            .map_err(io_err("computing fs-verity digests", dir))?;
        map.extend(have.into_iter().map(|d| (d, known[&d])));
        map.sort_by_key(|e| e.0);
        Ok(map)
    }

    /// The fs-verity digests of a layer's objects (computed and stored if
    /// the layer predates them).
    pub fn layer_verity(&self, diff_id: &Digest) -> Result<Vec<(Digest, VerityDigest)>> {
        let _work = self.work()?;
        let p = self.layer_dir(diff_id).join("verity");
        match fs::read(&p) {
            Ok(b) if b.len() % 64 == 0 => Ok(b
                .chunks_exact(64)
                .map(|c| {
                    let d = Digest::sha256_from_bytes(c[..32].try_into().expect("32 bytes"));
                    (
                        d,
                        VerityDigest::from_bytes(c[32..].try_into().expect("32 bytes")),
                    )
                })
                .collect()),
            Ok(_) => Err(StoreError::Corrupt {
                what: "layer verity file",
                path: p,
                reason: "size is not a multiple of 64".into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let record = self.layer_record(diff_id)?;
                self.write_layer_verity(&self.layer_dir(diff_id), record.objects())
            }
            Err(e) => Err(io_err("reading", p)(e)),
        }
    }

    fn fs_tree(
        &self,
        tree: &Tree,
        diff_ids: &[Digest],
        contents: Contents,
    ) -> Result<(FsTree, Vec<Digest>)> {
        let mut verity = HashMap::new();
        if contents == Contents::Redirect {
            for d in diff_ids {
                verity.extend(self.layer_verity(d)?);
            }
        }
        let mut objs = StoreObjects {
            store: self,
            verity,
        };
        from_tree(tree, contents, &mut objs).map_err(io_err(
            "reading objects for the image",
            self.root.join("objects"),
        ))
    }

    /// The composefs-flavour EROFS input tree of an image (file contents
    /// as redirects into objects/ with their fs-verity digests). For
    /// benchmarks and tools; [`Store::image_erofs`] is what mounts use.
    pub fn image_fs_tree(&self, digest: &Digest, tree: &Tree) -> Result<FsTree> {
        let meta = self.image_meta(digest)?;
        let diff_ids: Vec<Digest> = meta.layers.iter().map(|l| l.diff_id).collect();
        Ok(self.fs_tree(tree, &diff_ids, Contents::Redirect)?.0)
    }

    /// Build the flattened composefs image of an image's layers (in memory).
    pub fn build_flat(&self, diff_ids: &[Digest], tree: Option<&Tree>) -> Result<Vec<u8>> {
        let owned;
        let tree = match tree {
            Some(t) => t,
            None => {
                owned = self.layers_tree(diff_ids)?;
                &owned
            }
        };
        let (fs, _) = self.fs_tree(tree, diff_ids, Contents::Redirect)?;
        let image = strata_erofs::build_owned(fs, Flavor::Composefs)
            .map_err(|e| StoreError::Unsupported(e.to_string()))?;
        Ok(image
            .into_bytes()
            .unwrap_or_else(|_| unreachable!("composefs images stream no data")))
    }

    /// Where an image's EROFS files are, and their digests; builds them on
    /// first use. Returns the files to stack (top first).
    pub fn image_erofs(
        &self,
        digest: &Digest,
        policy: SplitPolicy,
    ) -> Result<(ErofsInfo, Vec<PathBuf>)> {
        let _work = self.work()?;
        let dir = self.image_dir(digest);
        if let Ok(info) = read_json::<ErofsInfo>(&dir.join("erofs.json"), "erofs info") {
            let files = self.erofs_files(digest, &info);
            if files.iter().all(|f| f.exists()) {
                return Ok((info, files));
            }
        }
        let info = self.build_image_erofs(digest, None, policy)?;
        let files = self.erofs_files(digest, &info);
        Ok((info, files))
    }

    /// An image's EROFS info, if built.
    pub fn erofs_info(&self, digest: &Digest) -> Option<ErofsInfo> {
        read_json(&self.image_dir(digest).join("erofs.json"), "erofs info").ok()
    }

    fn erofs_files(&self, digest: &Digest, info: &ErofsInfo) -> Vec<PathBuf> {
        match &info.split {
            None => vec![self.image_dir(digest).join("image.erofs")],
            Some(s) => vec![
                self.image_dir(digest).join("upper.erofs"),
                self.root
                    .join("bases")
                    .join(s.base_chain.hex())
                    .join("image.erofs"),
            ],
        }
    }

    /// Build and store an image's EROFS image(s).
    ///
    /// Under [`SplitPolicy::Auto`], the image that makes a layer-chain prefix
    /// reach the threshold also moves the images pulled before it (still
    /// flattened) onto the shared base, so every sharer pays for the base
    /// once, whatever the pull order.
    pub fn build_image_erofs(
        &self,
        digest: &Digest,
        tree: Option<&Tree>,
        policy: SplitPolicy,
    ) -> Result<ErofsInfo> {
        let _work = self.work()?;
        let info = self.build_one_erofs(digest, tree, policy)?;
        if let (SplitPolicy::Auto(_), Some(split)) = (policy, &info.split) {
            let meta = self.image_meta(digest)?;
            let prefix: Vec<Digest> = meta.layers[..split.base_layers]
                .iter()
                .map(|l| l.diff_id)
                .collect();
            for other in self.image_digests()? {
                if other == *digest {
                    continue;
                }
                let Some(other_info) = self.erofs_info(&other) else {
                    continue;
                };
                if other_info.split.is_some() {
                    continue;
                }
                let Ok(m) = self.image_meta(&other) else {
                    continue;
                };
                let shares = m.layers.len() > prefix.len()
                    && m.layers.iter().zip(&prefix).all(|(l, d)| l.diff_id == *d);
                if shares {
                    self.build_one_erofs(&other, None, policy)?;
                }
            }
        }
        Ok(info)
    }

    fn build_one_erofs(
        &self,
        digest: &Digest,
        tree: Option<&Tree>,
        policy: SplitPolicy,
    ) -> Result<ErofsInfo> {
        let meta = self.image_meta(digest)?;
        let diff_ids: Vec<Digest> = meta.layers.iter().map(|l| l.diff_id).collect();
        let owned;
        let tree = match tree {
            Some(t) => t,
            None => {
                owned = self.layers_tree(&diff_ids)?;
                &owned
            }
        };
        let (fs, _) = self.fs_tree(tree, &diff_ids, Contents::Redirect)?;
        let flat = strata_erofs::build(&fs, Flavor::Composefs)
            .map_err(|e| StoreError::Unsupported(e.to_string()))?;
        let bytes = flat.as_bytes().expect("composefs images stream no data");
        let dir = self.image_dir(digest);
        let mut info = ErofsInfo {
            format: FORMAT.into(),
            tree_digest: Digest::sha256_of(bytes),
            composefs_id: fsverity_digest(bytes),
            size: bytes.len() as u64,
            inodes: flat.inodes(),
            split: None,
        };
        match self.split_point(digest, &diff_ids, policy)? {
            None => {
                write_atomic(self, &dir.join("image.erofs"), bytes)?;
            }
            Some(k) => {
                let base_ids = &diff_ids[..k];
                let base = self.ensure_base(base_ids)?;
                let base_tree = self.layers_tree(base_ids)?;
                let (base_fs, _) = self.fs_tree(&base_tree, base_ids, Contents::Redirect)?;
                let upper_fs = strata_erofs::split::upper(&base_fs, &fs);
                let upper = strata_erofs::build(&upper_fs, Flavor::Layer)
                    .map_err(|e| StoreError::Unsupported(e.to_string()))?;
                let ub = upper.as_bytes().expect("no streamed data");
                write_atomic(self, &dir.join("upper.erofs"), ub)?;
                info.split = Some(SplitInfo {
                    base_layers: k,
                    base_chain: chain_id(base_ids),
                    base,
                    upper: part_info(ub),
                });
            }
        }
        write_json_durable_atomic(self, &dir.join("erofs.json"), &info)?;
        let stale = if info.split.is_some() {
            "image.erofs"
        } else {
            "upper.erofs"
        };
        let _ = fs::remove_file(dir.join(stale));
        Ok(info)
    }

    /// The base part for a layer chain, built if missing.
    fn ensure_base(&self, diff_ids: &[Digest]) -> Result<PartInfo> {
        let _work = self.work()?;
        let dir = self.root.join("bases").join(chain_id(diff_ids).hex());
        if let Ok(p) = read_json::<PartInfo>(&dir.join("erofs.json"), "base info")
            && dir.join("image.erofs").exists()
        {
            return Ok(p);
        }
        let bytes = self.build_flat(diff_ids, None)?;
        let stage = self.staging_path("base")?;
        fs::create_dir_all(&stage).map_err(io_err("creating", &stage))?;
        let info = part_info(&bytes);
        crate::write_durable(&stage.join("image.erofs"), &bytes)?;
        write_json_durable(&stage.join("erofs.json"), &info)?;
        fs::write(
            stage.join("layers"),
            diff_ids
                .iter()
                .map(|d| format!("{d}\n"))
                .collect::<String>(),
        )
        .map_err(io_err("writing", stage.join("layers")))?;
        sync_dir(&stage)?;
        let bases = self.root.join("bases");
        fs::create_dir_all(&bases).map_err(io_err("creating", &bases))?;
        match fs::rename(&stage, &dir) {
            Ok(()) => sync_dir(&bases)?,
            Err(_) if dir.join("erofs.json").exists() => {
                let _ = fs::remove_dir_all(&stage);
            }
            Err(e) => return Err(io_err("committing base part", &dir)(e)),
        }
        Ok(info)
    }

    /// How many bottom layers go to a shared base part, if any.
    fn split_point(
        &self,
        digest: &Digest,
        diff_ids: &[Digest],
        policy: SplitPolicy,
    ) -> Result<Option<usize>> {
        if diff_ids.len() < 2 || policy == SplitPolicy::Never {
            return Ok(None);
        }
        // For each proper prefix length, how many images (this one
        // included) start with the same layers.
        let mut users = vec![1usize; diff_ids.len()];
        for other in self.image_digests()? {
            if other == *digest {
                continue;
            }
            let Ok(m) = self.image_meta(&other) else {
                continue;
            };
            let common = m
                .layers
                .iter()
                .zip(diff_ids)
                .take_while(|(a, b)| a.diff_id == **b)
                .count();
            // Each shared prefix of k layers (k >= 1, short of the whole image).
            let shared = common.min(diff_ids.len().saturating_sub(1));
            for u in users.iter_mut().take(shared + 1).skip(1) {
                *u += 1;
            }
        }
        let best = (1..diff_ids.len()).rev().find(|k| users[*k] >= 2);
        Ok(match policy {
            SplitPolicy::Never => None,
            SplitPolicy::Always => Some(best.unwrap_or(diff_ids.len() - 1)),
            SplitPolicy::Auto(n) => (1..diff_ids.len()).rev().find(|k| users[*k] >= n.max(2)),
        })
    }

    /// Write a self-contained EROFS image (contents inside) of an image to `out`.
    pub fn export_erofs(&self, digest: &Digest, out: &mut dyn io::Write) -> Result<u64> {
        let meta = self.image_meta(digest)?;
        let diff_ids: Vec<Digest> = meta.layers.iter().map(|l| l.diff_id).collect();
        let tree = self.layers_tree(&diff_ids)?;
        let (fs, table) = self.fs_tree(&tree, &diff_ids, Contents::Embed)?;
        let image = strata_erofs::build(&fs, Flavor::Plain)
            .map_err(|e| StoreError::Unsupported(e.to_string()))?;
        struct Src<'a> {
            store: &'a Store,
            table: Vec<Digest>,
        }
        impl strata_erofs::DataSource for Src<'_> {
            fn copy(
                &mut self,
                source: u64,
                offset: u64,
                len: u64,
                out: &mut dyn io::Write,
            ) -> io::Result<()> {
                let d = self.table[source as usize];
                let p = self.store.object_path(&d);
                let mut f = File::open(&p).map_err(|e| with_path(e, "opening object", &p))?;
                io::Seek::seek(&mut f, io::SeekFrom::Start(offset))?;
                let n = io::copy(&mut f.take(len), out)?;
                if n != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("object {} is shorter than the tree says", p.display()),
                    ));
                }
                Ok(())
            }
        }
        let mut src = Src { store: self, table };
        image
            .write_to(out, &mut src)
            .map_err(io_err("writing EROFS export", self.image_dir(digest)))?;
        Ok(image.len())
    }
}

fn part_info(bytes: &[u8]) -> PartInfo {
    PartInfo {
        digest: Digest::sha256_of(bytes),
        verity: fsverity_digest(bytes),
        size: bytes.len() as u64,
    }
}

fn write_json_durable_atomic<T: Serialize>(store: &Store, p: &Path, v: &T) -> Result<()> {
    let _work = store.work()?;
    let stage = store.staging_path("json")?;
    write_json_durable(&stage, v)?;
    fs::rename(&stage, p).map_err(io_err("renaming into place", p))?;
    sync_dir(p.parent().expect("has a parent"))
}

/// What [`Store::verify_image`] found.
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    /// The image.
    pub image: Option<Digest>,
    /// Tree digest recomputed from the layer records.
    pub tree_digest: Option<Digest>,
    /// Objects re-hashed.
    pub objects: u64,
    /// Every mismatch, one line each, naming what and where.
    pub problems: Vec<String>,
}

/// Its problems, one a line, or that the image verified.
impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.problems.is_empty() {
            return f.write_str(&self.problems.join("\n"));
        }
        let image = self.image.map(|d| d.to_string()).unwrap_or_default();
        let tree = self.tree_digest.map(|d| d.to_string()).unwrap_or_default();
        let n = self.objects;
        write!(f, "verified {image}: {n} objects, tree {tree}")
    }
}

impl Store {
    /// Rebuild an image's tree from its layer records, re-write its EROFS
    /// image(s) in memory and compare them with the stored ones, and
    /// re-hash (SHA-256 and fs-verity) every object the image references.
    ///
    /// Events (op [`Op::Verify`]): `Started`, `Resolved`, `Progress` of
    /// [`Unit::Layers`] (records read) then of [`Unit::Objects`] (objects
    /// re-hashed, every 64 and the last), `Finished`. Once `ctl.cancel`
    /// fires it stops at the next layer or object with
    /// [`StoreError::Cancelled`]; it changes nothing in the store.
    pub fn verify_image(&self, digest: &Digest, ctl: Ctl<'_>) -> Result<VerifyReport> {
        ctl.emit(Event::Started {
            op: Op::Verify,
            subject: digest.to_string(),
        });
        let r = self.verify_image_inner(digest, ctl);
        match r {
            Ok(r) => {
                ctl.emit(Event::Finished { op: Op::Verify });
                Ok(r)
            }
            Err(_) if ctl.cancel.is_cancelled() => Err(StoreError::Cancelled),
            Err(e) => Err(e),
        }
    }

    fn verify_image_inner(&self, digest: &Digest, ctl: Ctl<'_>) -> Result<VerifyReport> {
        ctl.cancel.check()?;
        let mut r = VerifyReport {
            image: Some(*digest),
            ..Default::default()
        };
        let meta = self.image_meta(digest)?;
        let diff_ids: Vec<Digest> = meta.layers.iter().map(|l| l.diff_id).collect();
        ctl.emit(Event::Resolved {
            op: Op::Verify,
            manifest_digest: *digest,
            layers: diff_ids.len(),
        });
        // Objects first: a tree built from a bad object would hide the cause.
        let mut verity: HashMap<Digest, VerityDigest> = HashMap::new();
        let mut objects = Vec::new();
        let layers = diff_ids.len() as u64;
        let mut record_problems = Vec::new();
        for (i, d) in diff_ids.iter().enumerate() {
            ctl.cancel.check()?;
            match self.layer_verity(d) {
                Ok(v) => verity.extend(v),
                Err(e) => r.problems.push(format!("layer {d}: {e}")),
            }
            match self.layer_record(d) {
                Ok(rec) => objects.extend(rec.objects()),
                Err(e) => record_problems.push(format!("layer {d}: {e}")),
            }
            ctl.emit(Event::Progress {
                op: Op::Verify,
                unit: Unit::Layers,
                done: i as u64 + 1,
                total: Some(layers),
            });
        }
        r.problems.extend(record_problems);
        objects.sort();
        objects.dedup();
        r.objects = objects.len() as u64;
        let total = r.objects;
        let done = AtomicU64::new(0);
        // hashing is CPU-bound: one thread per core
        let problems = strata_ops::par_map(
            &objects,
            strata_ops::default_jobs(8),
            ctl.cancel,
            |_, &d| {
                let p = self.object_path(&d);
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_multiple_of(64) || n == total {
                    ctl.emit(Event::Progress {
                        op: Op::Verify,
                        unit: Unit::Objects,
                        done: n,
                        total: Some(total),
                    });
                }
                Ok::<_, StoreError>(match hash_both(&p) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        Some(format!("object {d}: missing ({})", p.display()))
                    }
                    Err(e) => Some(format!("object {d}: {e}")),
                    Ok((sha, _)) if sha != d => Some(format!(
                        "object {d}: content hashes to {sha} ({})",
                        p.display()
                    )),
                    Ok((_, v)) if verity.get(&d).is_some_and(|want| *want != v) => Some(format!(
                        "object {d}: fs-verity digest differs from the layer's record"
                    )),
                    Ok(_) => None,
                })
            },
        );
        let mut obj_problems: Vec<String> = problems?.into_iter().flatten().collect();
        obj_problems.sort();
        r.problems.extend(obj_problems);
        if !r.problems.is_empty() {
            return Ok(r);
        }
        ctl.cancel.check()?;
        let stored = self.erofs_info(digest);
        let tree = self.layers_tree(&diff_ids)?;
        let (fs, _) = self.fs_tree(&tree, &diff_ids, Contents::Redirect)?;
        let flat = match strata_erofs::build(&fs, Flavor::Composefs) {
            Ok(f) => f,
            Err(e) => {
                r.problems
                    .push(format!("tree cannot become an EROFS image: {e}"));
                return Ok(r);
            }
        };
        let bytes = flat.as_bytes().expect("no streamed data");
        let tree_digest = Digest::sha256_of(bytes);
        r.tree_digest = Some(tree_digest);
        let Some(info) = stored else {
            r.problems.push(
                "no EROFS image was built for this image yet (strata mount builds it)".into(),
            );
            return Ok(r);
        };
        if info.tree_digest != tree_digest {
            r.problems.push(format!(
                "tree digest: recorded {} but the layers give {tree_digest}",
                info.tree_digest
            ));
        }
        let dir = self.image_dir(digest);
        let check_file =
            |r: &mut VerifyReport, p: &Path, want: &Digest, rebuilt: &Digest| match fs::read(p) {
                Ok(b) => {
                    let got = Digest::sha256_of(&b);
                    if got != *want {
                        r.problems
                            .push(format!("{}: hashes to {got}, recorded {want}", p.display()));
                    }
                    if want != rebuilt {
                        r.problems.push(format!(
                            "{}: recorded {want} but a rebuild gives {rebuilt}",
                            p.display()
                        ));
                    }
                }
                Err(e) => r.problems.push(format!("{}: {e}", p.display())),
            };
        match &info.split {
            None => check_file(
                &mut r,
                &dir.join("image.erofs"),
                &info.tree_digest,
                &tree_digest,
            ),
            Some(s) => {
                let base_ids = &diff_ids[..s.base_layers];
                let base_tree = self.layers_tree(base_ids)?;
                let (base_fs, _) = self.fs_tree(&base_tree, base_ids, Contents::Redirect)?;
                let base = strata_erofs::build(&base_fs, Flavor::Composefs)
                    .map_err(|e| StoreError::Unsupported(e.to_string()))?;
                let upper =
                    strata_erofs::build(&strata_erofs::split::upper(&base_fs, &fs), Flavor::Layer)
                        .map_err(|e| StoreError::Unsupported(e.to_string()))?;
                let bd = Digest::sha256_of(base.as_bytes().expect("no streamed data"));
                let ud = Digest::sha256_of(upper.as_bytes().expect("no streamed data"));
                let base_path = self
                    .root
                    .join("bases")
                    .join(s.base_chain.hex())
                    .join("image.erofs");
                check_file(&mut r, &base_path, &s.base.digest, &bd);
                check_file(&mut r, &dir.join("upper.erofs"), &s.upper.digest, &ud);
            }
        }
        Ok(r)
    }
}

pub(crate) fn hash_both(p: &Path) -> io::Result<(Digest, VerityDigest)> {
    let mut f = File::open(p)?;
    let mut sha = strata_digest::Hasher::new();
    let mut v = FsVerityHasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        v.update(&buf[..n]);
    }
    Ok((sha.finish(), v.finish()))
}
