//! Templates in OCI registries: an artifact whose config is the map and
//! whose layers are a pack index and the chunk packs (see [`crate::packs`]).
//!
//! ```text
//! manifest (application/vnd.oci.image.manifest.v1+json)
//!   artifactType  application/vnd.strata.rootfs.v2
//!   config        the map        application/vnd.strata.rootfs.map.v1+json
//!   layers[0]     the index      application/vnd.strata.rootfs.packindex.v1+json
//!   layers[1..]   the packs      application/vnd.strata.rootfs.pack.v1
//! ```
//!
//! Any OCI registry stores it; `skopeo copy` and registry mirroring move
//! it like an image. A push reuses the packs of the nearest template it
//! derives from that is in the same registry (recorded when it was pushed
//! or pulled): they are listed, not uploaded (mounted from their repository
//! when it is another one), and one new pack holds the chunks they lack.
//! A pull takes the map and the index only and records where the chunks
//! are, so `rootfs serve` reads what a reader touches by range (a chunk and
//! its neighbours in one request); `--all` fetches the packs whole. Every
//! fetched chunk is checked against its digest first.
//!
//! Artifacts pushed before packs (`application/vnd.strata.rootfs.v1`: a
//! blob per chunk) are still read: pull, `--all` and serve fetch their
//! chunks one blob each. Pushes always write packs.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

use strata_digest::{Digest, Hasher};
use strata_oci::manifest::Descriptor;
use strata_oci::registry::{BlobContent, RegistryPusher, RegistrySource};
use strata_oci::{ImageRef, ImageSource, Platform, RegistryOptions};
use strata_ops::{Cancel, Ctl, Event, Op, Unit};
use strata_store::{Store, TemplateMap, TemplateRemote};

use crate::packs::{INDEX_MEDIA_TYPE, PACK_MEDIA_TYPE, PACK_TARGET, PackIndex, Packs};
use crate::{BlockError, ChunkSource};

/// The artifact's type.
pub const ARTIFACT_TYPE: &str = "application/vnd.strata.rootfs.v2";
/// The type of artifacts pushed before packs (a blob per chunk): read only.
pub const ARTIFACT_TYPE_V1: &str = "application/vnd.strata.rootfs.v1";
/// The config blob: the template's map.
pub const MAP_MEDIA_TYPE: &str = "application/vnd.strata.rootfs.map.v1+json";
/// A chunk blob of a v1 artifact.
pub const CHUNK_MEDIA_TYPE: &str = "application/vnd.strata.rootfs.chunk.v1";
/// Manifest media type.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Registries refuse bigger manifests (distribution: 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;
/// Ancestors looked at for packs to reuse.
const MAX_ANCESTORS: usize = 64;

fn oci(what: String) -> impl FnOnce(strata_oci::OciError) -> BlockError {
    move |source| BlockError::Oci { what, source }
}

/// What a push did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    /// The artifact manifest's digest.
    pub manifest_digest: Digest,
    /// Distinct chunks of the template.
    pub chunks: u64,
    /// Chunks in the packs uploaded now.
    pub uploaded: u64,
    /// Bytes uploaded (packs).
    pub bytes_uploaded: u64,
    /// Bytes of the chunks not uploaded: in packs the registry has already.
    pub bytes_skipped: u64,
    /// Pack blobs the artifact lists.
    pub packs: u64,
    /// Of those, uploaded now.
    pub packs_uploaded: u64,
    /// Of those, packs of the template it derives from, listed and not
    /// uploaded.
    pub packs_reused: u64,
    /// Of the reused ones, mounted from another repository of the registry.
    pub packs_mounted: u64,
    /// The artifact whose packs were reused.
    pub base: Option<String>,
}

/// How to push.
#[derive(Debug, Clone, Copy)]
pub struct PushOptions {
    /// Packs built and uploaded at once.
    pub jobs: usize,
    /// A new pack is closed once it holds this many bytes
    /// ([`PACK_TARGET`]; at least one chunk).
    pub pack_size: u64,
}

impl Default for PushOptions {
    fn default() -> PushOptions {
        PushOptions {
            jobs: 4,
            pack_size: PACK_TARGET,
        }
    }
}

/// Push template `id` to `reference` (`docker://HOST/REPO:TAG`): see
/// [`push_with`]; packs of [`PACK_TARGET`] bytes, `jobs` at once.
pub fn push(
    store: &Store,
    id: &Digest,
    reference: &ImageRef,
    opts: &RegistryOptions,
    jobs: usize,
    ctl: Ctl<'_>,
) -> Result<PushReport, BlockError> {
    let po = PushOptions {
        jobs,
        ..PushOptions::default()
    };
    push_with(store, id, reference, opts, &po, ctl)
}

/// Push template `id` to `reference` (`docker://HOST/REPO:TAG`).
///
/// The packs of the nearest template it derives from (itself included)
/// that was pushed to or pulled from the same registry are reused; the
/// chunks they lack go into new packs. Chunks of new packs the store lacks
/// are fetched from the template's registry into the store first (checked).
///
/// Events (op [`Op::TemplatePush`]): `Started`, `Resolved` (the manifest's
/// digest, known before any upload, and the distinct chunks), then per pack
/// `UnitStarted` (unit [`Unit::Layer`]: its place among the packs and its
/// digest; `reused`: not uploaded now), `Progress` (bytes of the packs
/// handled so far, of all of them) and `UnitDone`, and `Finished`.
/// `ctl.cancel` is checked before every request and between chunks; a
/// cancelled push returns [`BlockError::Cancelled`] with the tag not pushed
/// (packs uploaded stay in the registry's repository: a re-run skips them).
pub fn push_with(
    store: &Store,
    id: &Digest,
    reference: &ImageRef,
    opts: &RegistryOptions,
    po: &PushOptions,
    ctl: Ctl<'_>,
) -> Result<PushReport, BlockError> {
    framed(ctl, Op::TemplatePush, reference, || {
        push_inner(store, id, reference, opts, po, ctl)
    })
}

/// `Started`, `f`, then `Finished` on success; a failure caused by the
/// cancel (a read cut short) is [`BlockError::Cancelled`].
fn framed<T>(
    ctl: Ctl<'_>,
    op: Op,
    reference: &ImageRef,
    f: impl FnOnce() -> Result<T, BlockError>,
) -> Result<T, BlockError> {
    ctl.emit(Event::Started {
        op,
        subject: reference.to_string(),
    });
    match f() {
        Ok(r) => {
            ctl.emit(Event::Finished { op });
            Ok(r)
        }
        Err(_) if ctl.cancel.is_cancelled() => Err(BlockError::Cancelled),
        Err(e) => Err(e),
    }
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> BlockError {
    move |source| BlockError::Io { what, source }
}

/// Whether `opts` reach `registry` over plain HTTP.
fn plain_http_for(opts: &RegistryOptions, registry: &str) -> bool {
    opts.plain_http || opts.insecure_registries.iter().any(|h| h == registry)
}

/// `opts`, reaching the registry of `remote` over plain HTTP when it was
/// reached that way before.
fn options_for(opts: &RegistryOptions, remote: &TemplateRemote, registry: &str) -> RegistryOptions {
    let mut o = opts.clone();
    if remote.plain_http && !plain_http_for(&o, registry) {
        o.insecure_registries.push(registry.to_string());
    }
    o
}

fn push_inner(
    store: &Store,
    id: &Digest,
    reference: &ImageRef,
    opts: &RegistryOptions,
    po: &PushOptions,
    ctl: Ctl<'_>,
) -> Result<PushReport, BlockError> {
    const OP: Op = Op::TemplatePush;
    ctl.cancel.check()?;
    let map = store.template_map(id)?;
    let ImageRef::Docker {
        registry,
        repository,
        tag,
        digest,
    } = reference
    else {
        return Err(BlockError::Io {
            what: format!("pushing to {reference}"),
            source: io::Error::other("a template goes to a registry: docker://HOST/REPO:TAG"),
        });
    };
    if digest.is_some() {
        return Err(BlockError::Io {
            what: format!("pushing to {reference}"),
            source: io::Error::other("push to a tag, not a digest"),
        });
    }
    let tag = tag.clone().unwrap_or_else(|| "latest".into());
    // distinct chunks in map order (the disk's order)
    let mut seen = BTreeSet::new();
    let chunks: Vec<(Digest, u64)> = map
        .chunks()
        .filter(|(_, d)| seen.insert(*d))
        .map(|(i, d)| (d, map.chunk_len(i)))
        .collect();
    let base = find_base(store, id, &map, registry, opts, ctl.cancel);
    let base_packs = base.as_ref().and_then(|b| b.packs.as_ref());
    let plan = crate::packs::plan(&chunks, base_packs, po.pack_size.max(map.chunk_size));
    ctl.cancel.check()?;
    fetch_missing(store, id, &plan, opts, po.jobs, ctl)?;
    // the new packs' digests before anything is sent: the manifest is
    // known first, and a re-run after a cancel finds the same packs
    let mut new_packs: Vec<(Digest, u64)> = Vec::with_capacity(plan.new.len());
    for pack in &plan.new {
        let mut h = Hasher::new();
        let mut size = 0;
        for (d, len) in pack {
            ctl.cancel.check()?;
            let b = read_chunk(store, d, *len)?;
            h.update(&b);
            size += *len;
        }
        new_packs.push((h.finish(), size));
    }
    let new_digests: Vec<Digest> = new_packs.iter().map(|p| p.0).collect();
    let index = crate::packs::index_for(&chunks, base_packs, &plan, &new_digests);
    let index_bytes = index.to_bytes();
    let index_desc = Descriptor {
        media_type: INDEX_MEDIA_TYPE.into(),
        digest: Digest::sha256_of(&index_bytes),
        size: index_bytes.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
        urls: Vec::new(),
    };
    let mut pack_descs: Vec<Descriptor> = Vec::new();
    if let Some(b) = base_packs {
        for &p in &plan.reused {
            pack_descs.push(crate::packs::descriptor(b.packs[p].digest, b.packs[p].size));
        }
    }
    pack_descs.extend(
        new_packs
            .iter()
            .map(|&(d, size)| crate::packs::descriptor(d, size)),
    );
    let map_bytes = map.to_bytes();
    let map_digest = Digest::sha256_of(&map_bytes);
    let mut layers = vec![serde_json::json!({
        "mediaType": INDEX_MEDIA_TYPE, "digest": index_desc.digest.to_string(), "size": index_desc.size,
    })];
    layers.extend(pack_descs.iter().map(|d| {
        serde_json::json!({"mediaType": PACK_MEDIA_TYPE, "digest": d.digest.to_string(), "size": d.size})
    }));
    let mut annotations = serde_json::json!({
        "io.strata.rootfs.id": id.to_string(),
        "io.strata.rootfs.size": map.size.to_string(),
    });
    if let Some(p) = map.parent {
        annotations["io.strata.rootfs.parent"] = p.to_string().into();
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MAP_MEDIA_TYPE, "digest": map_digest.to_string(), "size": map_bytes.len()},
        "layers": layers,
        "annotations": annotations,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("serializable");
    if manifest_bytes.len() > MAX_MANIFEST {
        return Err(BlockError::Io {
            what: format!("pushing template {id}"),
            source: io::Error::other(format!(
                "its {} packs make a {} byte manifest; registries take at most {MAX_MANIFEST}",
                pack_descs.len(),
                manifest_bytes.len()
            )),
        });
    }
    ctl.emit(Event::Resolved {
        op: OP,
        manifest_digest: Digest::sha256_of(&manifest_bytes),
        layers: chunks.len(),
    });
    ctl.cancel.check()?;
    let pusher =
        RegistryPusher::new(reference, opts).map_err(oci(format!("pushing to {reference}")))?;
    pusher
        .ping()
        .map_err(oci(format!("pushing to {reference}")))?;
    let total: u64 = pack_descs.iter().map(|d| d.size).sum();
    let done = AtomicU64::new(0);
    let progress = |k: usize, desc: &Descriptor| {
        let unit = Unit::Layer {
            index: k,
            digest: desc.digest,
        };
        unit_done(ctl, OP, unit, &done, desc.size, total);
    };
    let started = |k: usize, desc: &Descriptor, reused: bool| {
        ctl.emit(Event::UnitStarted {
            op: OP,
            unit: Unit::Layer {
                index: k,
                digest: desc.digest,
            },
            total: Some(desc.size),
            reused,
        });
    };
    // the base's packs: listed; in another repository, mounted (or copied
    // when the registry does not mount)
    let mut packs_mounted = 0;
    let reused = plan.reused.len();
    for (k, desc) in pack_descs[..reused].iter().enumerate() {
        ctl.cancel.check()?;
        started(k, desc, true);
        let base = base.as_ref().expect("reused packs have a base");
        if base.repository() != repository.as_str() {
            let what = || format!("reusing pack {} in {}", desc.digest, pusher.target());
            if !pusher.has_blob(&desc.digest).map_err(oci(what()))? {
                ctl.cancel.check()?;
                if pusher
                    .mount_blob(&desc.digest, base.repository())
                    .map_err(oci(what()))?
                {
                    packs_mounted += 1;
                } else {
                    let bytes = read_blob(&base.src, desc, ctl.cancel)
                        .map_err(io_error(format!("{} from {}", what(), base.reference)))?;
                    ctl.cancel.check()?;
                    pusher
                        .upload_blob(&desc.digest, desc.size, BlobContent::Bytes(&bytes))
                        .map_err(oci(what()))?;
                }
            }
        }
        progress(k, desc);
    }
    // the new packs, built again from the chunks and checked against the
    // digests announced
    let new_list: Vec<(usize, &Vec<(Digest, u64)>)> = plan.new.iter().enumerate().collect();
    let uploaded = strata_ops::par_map(
        &new_list,
        po.jobs.clamp(1, 8),
        ctl.cancel,
        |_, &(n, pack)| {
            let k = reused + n;
            let desc = &pack_descs[k];
            let what = || format!("pushing pack {} to {}", desc.digest, pusher.target());
            ctl.cancel.check()?;
            let has = pusher.has_blob(&desc.digest).map_err(oci(what()))?;
            started(k, desc, has);
            if !has {
                let mut bytes = Vec::with_capacity(desc.size as usize);
                for (d, len) in pack {
                    ctl.cancel.check()?;
                    bytes.extend_from_slice(&read_chunk(store, d, *len)?);
                }
                if Digest::sha256_of(&bytes) != desc.digest {
                    return Err(BlockError::Io {
                        what: what(),
                        source: io::Error::other("its chunks changed in the store while pushing"),
                    });
                }
                ctl.cancel.check()?;
                pusher
                    .upload_blob(&desc.digest, desc.size, BlobContent::Bytes(&bytes))
                    .map_err(oci(what()))?;
            }
            progress(k, desc);
            Ok::<_, BlockError>(!has)
        },
    )?;
    let (mut chunks_up, mut bytes_uploaded, mut chunk_bytes_up, mut packs_uploaded) = (0, 0, 0, 0);
    for ((pack, up), (_, size)) in plan.new.iter().zip(&uploaded).zip(&new_packs) {
        if *up {
            packs_uploaded += 1;
            chunks_up += pack.len() as u64;
            bytes_uploaded += size;
            chunk_bytes_up += pack.iter().map(|c| c.1).sum::<u64>();
        }
    }
    for (digest, bytes, what) in [
        (index_desc.digest, &index_bytes, "the pack index"),
        (map_digest, &map_bytes, "the map"),
    ] {
        let what = format!("pushing {what} of {id} to {}", pusher.target());
        ctl.cancel.check()?;
        if !pusher.has_blob(&digest).map_err(oci(what.clone()))? {
            pusher
                .upload_blob(&digest, bytes.len() as u64, BlobContent::Bytes(bytes))
                .map_err(oci(what))?;
        }
    }
    // the last point a cancel stops the push: the tag is not moved
    ctl.cancel.check()?;
    let manifest_digest = pusher
        .put_manifest(&tag, OCI_MANIFEST, &manifest_bytes)
        .map_err(oci(format!("pushing the manifest to {reference}")))?;
    store.add_template_pushed(
        id,
        &TemplateRemote {
            reference: pin(reference, &manifest_digest),
            manifest_digest,
            plain_http: plain_http_for(opts, registry),
        },
    )?;
    let all_bytes: u64 = chunks.iter().map(|c| c.1).sum();
    Ok(PushReport {
        manifest_digest,
        chunks: chunks.len() as u64,
        uploaded: chunks_up,
        bytes_uploaded,
        bytes_skipped: all_bytes - chunk_bytes_up,
        packs: pack_descs.len() as u64,
        packs_uploaded,
        packs_reused: reused as u64,
        packs_mounted,
        base: base.map(|b| b.reference.to_string()),
    })
}

/// `n` more bytes of `total` handled (`done` counts them): `Progress`,
/// then `UnitDone` of `unit`.
fn unit_done(ctl: Ctl<'_>, op: Op, unit: Unit, done: &AtomicU64, n: u64, total: u64) {
    let n = done.fetch_add(n, Ordering::Relaxed) + n;
    ctl.emit(Event::Progress {
        op,
        unit: unit.clone(),
        done: n,
        total: Some(total),
    });
    ctl.emit(Event::UnitDone { op, unit });
}

/// A chunk's bytes from the store.
fn read_chunk(store: &Store, d: &Digest, len: u64) -> Result<Vec<u8>, BlockError> {
    let what = || format!("reading chunk {d} from the store");
    let mut f = store.open_object(d)?;
    let mut b = Vec::with_capacity(len as usize);
    f.read_to_end(&mut b).map_err(io_error(what()))?;
    if b.len() as u64 != len {
        return Err(BlockError::Io {
            what: what(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} bytes, the map says {len}", b.len()),
            ),
        });
    }
    Ok(b)
}

/// Chunks of `plan`'s new packs the store lacks, fetched from the
/// registry template `id` came from (checked) into the store.
fn fetch_missing(
    store: &Store,
    id: &Digest,
    plan: &crate::packs::Plan,
    opts: &RegistryOptions,
    jobs: usize,
    ctl: Ctl<'_>,
) -> Result<(), BlockError> {
    let missing: Vec<(Digest, u64)> = plan
        .new
        .iter()
        .flatten()
        .filter(|(d, _)| !store.has_object(d))
        .copied()
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let source = source_for(store, id, opts, ctl.cancel)?.ok_or_else(|| BlockError::Io {
        what: format!("pushing template {id}"),
        source: io::Error::other(format!(
            "chunk {} is not in the store and the template has no remote",
            missing[0].0
        )),
    })?;
    let got = strata_ops::par_map(&missing, jobs.clamp(1, 16), ctl.cancel, |_, &(d, len)| {
        let b = source.fetch(&d, len).and_then(|b| checked(b, &d, len));
        b.map(|b| (d, b)).map_err(io_error(format!(
            "fetching chunk {d} from {}",
            source.art.reference
        )))
    })?;
    let mut batch = store.object_batch()?;
    for (d, b) in got {
        batch
            .put(&mut b.as_slice(), b.len() as u64)
            .map_err(io_error(format!("storing chunk {d}")))?;
    }
    ctl.cancel.check()?;
    batch.commit()?;
    Ok(())
}

/// `b` when it is chunk `d` (`len` bytes).
fn checked(b: Vec<u8>, d: &Digest, len: u64) -> io::Result<Vec<u8>> {
    if b.len() as u64 == len && Digest::sha256_of(&b) == *d {
        Ok(b)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "chunk {d}: the registry sent {} bytes that do not match its digest",
                b.len()
            ),
        ))
    }
}

/// The artifact whose packs a push of template `id` to `registry` reuses:
/// the one of the template itself or of its nearest ancestor that was
/// pushed to or pulled from that registry and has packs. Artifacts that
/// cannot be read are passed over (their packs are not reused).
fn find_base(
    store: &Store,
    id: &Digest,
    map: &TemplateMap,
    registry: &str,
    opts: &RegistryOptions,
    cancel: &Cancel,
) -> Option<Artifact> {
    let (mut at, mut parent) = (*id, map.parent);
    for _ in 0..MAX_ANCESTORS {
        for rec in store
            .template_pushed(&at)
            .into_iter()
            .chain(store.template_remote(&at))
        {
            let Ok(r) = rec.reference.parse::<ImageRef>() else {
                continue;
            };
            let ImageRef::Docker { registry: reg, .. } = &r else {
                continue;
            };
            if reg != registry || cancel.is_cancelled() {
                continue;
            }
            match open(&r, &options_for(opts, &rec, reg), cancel) {
                Ok(a) if a.packs.is_some() && a.map.digest() == at => return Some(a),
                Ok(_) => {}
                Err(e) => tracing::info!("not reusing the packs of {r}: {e}"),
            }
        }
        let p = parent?;
        parent = store.template_map(&p).ok()?.parent;
        at = p;
    }
    None
}

/// What a pull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PullReport {
    /// The template's id.
    pub id: Digest,
    /// The artifact manifest's digest.
    pub manifest_digest: Digest,
    /// Distinct chunks of the template.
    pub chunks: u64,
    /// Chunks the store has.
    pub chunks_local: u64,
    /// Chunks fetched now (`all`).
    pub fetched: u64,
    /// Their bytes.
    pub bytes_fetched: u64,
    /// Pack blobs of the artifact (0: an artifact from before packs).
    pub packs: u64,
    /// Of those, read now (`all`).
    pub packs_fetched: u64,
}

/// A template artifact in a registry, resolved and checked: its manifest,
/// map and pack index (fetched and verified).
pub struct Artifact {
    src: RegistrySource,
    reference: ImageRef,
    /// The manifest's digest.
    pub manifest_digest: Digest,
    /// The template's map (the artifact's config).
    pub map: TemplateMap,
    /// Its packs; `None` for an artifact pushed before packs (a blob per
    /// chunk).
    pub packs: Option<Packs>,
}

/// A blob's bytes, at most its descriptor's size, checked against its
/// digest.
fn read_blob(src: &RegistrySource, desc: &Descriptor, cancel: &Cancel) -> io::Result<Vec<u8>> {
    cancel.check()?;
    let r = src
        .open_blob(desc, 0)
        .map_err(|e| io::Error::other(e.to_string()))?;
    let mut r = Cancellable { inner: r, cancel };
    let mut b = Vec::with_capacity(desc.size.min(MAX_MANIFEST as u64) as usize);
    (&mut r).take(desc.size + 1).read_to_end(&mut b)?;
    if b.len() as u64 != desc.size || Digest::sha256_of(&b) != desc.digest {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "blob {}: the registry sent {} bytes that do not match its digest",
                desc.digest,
                b.len()
            ),
        ));
    }
    Ok(b)
}

/// Resolve the template artifact at `reference` and check it: its config
/// is a map, its pack index (fetched, bounded by the map's size, verified)
/// matches the map and the packs the manifest lists. An artifact from
/// before packs must list every chunk of its map as a layer.
pub fn open(
    reference: &ImageRef,
    opts: &RegistryOptions,
    cancel: &Cancel,
) -> Result<Artifact, BlockError> {
    let what = format!("pulling {reference}");
    cancel.check()?;
    let src = RegistrySource::new(reference.clone(), opts).map_err(oci(what.clone()))?;
    let resolved = src
        .resolve(&Platform::host_default())
        .map_err(oci(what.clone()))?;
    let bad = |reason: String| BlockError::Io {
        what: what.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, reason),
    };
    if resolved.manifest.config.media_type != MAP_MEDIA_TYPE {
        return Err(bad(format!(
            "not a strata template: its config is {:?}, not {MAP_MEDIA_TYPE}",
            resolved.manifest.config.media_type
        )));
    }
    // resolve() checked the config (map) bytes against their digest
    let map = TemplateMap::parse(&resolved.config_bytes)
        .map_err(|r| bad(format!("its map does not parse: {r}")))?;
    let layers = &resolved.manifest.layers;
    let packs = match layers.first() {
        Some(first) if first.media_type == INDEX_MEDIA_TYPE => {
            let packs = &layers[1..];
            if let Some((i, l)) = packs
                .iter()
                .enumerate()
                .find(|(_, l)| l.media_type != PACK_MEDIA_TYPE)
            {
                return Err(bad(format!(
                    "layer {} ({}) is {:?}, not a pack",
                    i + 1,
                    l.digest,
                    l.media_type
                )));
            }
            let max = PackIndex::max_len(&map, packs.len());
            if first.size > max {
                return Err(bad(format!(
                    "its pack index is {} bytes; one for its map takes at most {max}",
                    first.size
                )));
            }
            let bytes = read_blob(&src, first, cancel)
                .map_err(io_error(format!("{what}: reading its pack index")))?;
            Some(
                Packs::parse(&bytes, packs, &map)
                    .map_err(|r| bad(format!("its pack index {}: {r}", first.digest)))?,
            )
        }
        _ => {
            let by_digest: BTreeMap<Digest, u64> =
                layers.iter().map(|l| (l.digest, l.size)).collect();
            for (i, d) in map.chunks() {
                if by_digest.get(&d) != Some(&map.chunk_len(i)) {
                    return Err(bad(format!(
                        "chunk {i} ({d}) of its map is not among its layers with {} bytes",
                        map.chunk_len(i)
                    )));
                }
            }
            None
        }
    };
    Ok(Artifact {
        src,
        reference: reference.clone(),
        manifest_digest: resolved.manifest_digest,
        map,
        packs,
    })
}

impl Artifact {
    /// The repository it is in.
    fn repository(&self) -> &str {
        match &self.reference {
            ImageRef::Docker { repository, .. } => repository,
            _ => "",
        }
    }

    /// The bytes of a run of chunks (untrusted): with packs, one range
    /// request (the run must be consecutive in one pack); else one blob
    /// each.
    fn read_run(&self, run: &[(Digest, u64)], cancel: &Cancel) -> io::Result<Vec<Vec<u8>>> {
        let Some(packs) = &self.packs else {
            return run
                .iter()
                .map(|(d, len)| {
                    let desc = Descriptor {
                        media_type: CHUNK_MEDIA_TYPE.into(),
                        digest: *d,
                        size: *len,
                        annotations: BTreeMap::new(),
                        platform: None,
                        urls: Vec::new(),
                    };
                    cancel.check()?;
                    let r = self
                        .src
                        .open_blob(&desc, 0)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    let mut r = Cancellable { inner: r, cancel };
                    let mut b = Vec::with_capacity(*len as usize);
                    // never more than the chunk's length (a lying registry)
                    (&mut r).take(len + 1).read_to_end(&mut b)?;
                    Ok(b)
                })
                .collect();
        };
        let Some(&(first, _)) = run.first() else {
            return Ok(Vec::new());
        };
        let not_found = |d: &Digest| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("chunk {d} is in no pack of {}", self.reference),
            )
        };
        let start = packs.locate(&first).ok_or_else(|| not_found(&first))?;
        let mut end = start.offset;
        for (d, len) in run {
            let l = packs.locate(d).ok_or_else(|| not_found(d))?;
            if l.pack != start.pack || l.offset != end || l.len != *len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("chunk {d} does not follow the one before in its pack"),
                ));
            }
            end += len;
        }
        cancel.check()?;
        let desc = &packs.packs[start.pack];
        let bytes = self
            .src
            .read_range(desc, start.offset, end - start.offset)
            .map_err(|e| io::Error::other(e.to_string()))?;
        if bytes.len() as u64 != end - start.offset {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "pack {}: {} bytes for a range of {}",
                    desc.digest,
                    bytes.len(),
                    end - start.offset
                ),
            ));
        }
        let mut out = Vec::with_capacity(run.len());
        let mut at = 0usize;
        for (_, len) in run {
            out.push(bytes[at..at + *len as usize].to_vec());
            at += *len as usize;
        }
        Ok(out)
    }
}

/// Pull the template at `reference`: its map (and pack index), and with
/// `all` every chunk the store lacks. Returns the report; the template is
/// recorded with where its chunks come from (unnamed: the caller names
/// it), and whether that registry is reached over plain HTTP.
///
/// Events (op [`Op::TemplatePull`]): `Started`, `Resolved` (the artifact's
/// manifest digest and distinct chunks), with `all` per pack read (unit
/// [`Unit::Layer`]; for an artifact from before packs, per chunk, unit
/// [`Unit::Chunk`]) `UnitStarted`, `Progress` (chunk bytes stored so far,
/// of all missing) and `UnitDone`, and `Finished`. `ctl.cancel` is checked
/// before every request and inside reads; a cancelled pull returns
/// [`BlockError::Cancelled`] and records no template (chunks already
/// stored are only reachable once a pull records the template).
pub fn pull(
    store: &Store,
    reference: &ImageRef,
    opts: &RegistryOptions,
    all: bool,
    jobs: usize,
    ctl: Ctl<'_>,
) -> Result<PullReport, BlockError> {
    framed(ctl, Op::TemplatePull, reference, || {
        // one operation for gc: chunks and map
        let _work = store.work()?;
        pull_inner(store, reference, opts, all, jobs, ctl)
    })
}

fn pull_inner(
    store: &Store,
    reference: &ImageRef,
    opts: &RegistryOptions,
    all: bool,
    jobs: usize,
    ctl: Ctl<'_>,
) -> Result<PullReport, BlockError> {
    const OP: Op = Op::TemplatePull;
    let art = open(reference, opts, ctl.cancel)?;
    ctl.cancel.check()?;
    let map = &art.map;
    // distinct chunks: digest -> (index of first use, length)
    let mut chunks: BTreeMap<Digest, (u64, u64)> = BTreeMap::new();
    for (i, d) in map.chunks() {
        chunks.entry(d).or_insert((i, map.chunk_len(i)));
    }
    ctl.emit(Event::Resolved {
        op: OP,
        manifest_digest: art.manifest_digest,
        layers: chunks.len(),
    });
    let missing: Vec<(Digest, u64, u64)> = chunks
        .iter()
        .filter(|(d, _)| !store.has_object(d))
        .map(|(d, (i, l))| (*d, *i, *l))
        .collect();
    let (mut fetched, mut bytes_fetched, mut packs_fetched) = (0, 0, 0);
    if all && !missing.is_empty() {
        let total: u64 = missing.iter().map(|(_, _, l)| l).sum();
        let done = AtomicU64::new(0);
        let progress = |unit: Unit, n: u64| unit_done(ctl, OP, unit, &done, n, total);
        match &art.packs {
            Some(packs) => {
                let wanted: BTreeSet<Digest> = missing.iter().map(|m| m.0).collect();
                let holding: Vec<usize> = packs.packs_holding(&wanted).into_iter().collect();
                let got = strata_ops::par_map(&holding, jobs.clamp(1, 8), ctl.cancel, |_, &p| {
                    let desc = &packs.packs[p];
                    let unit = Unit::Layer {
                        index: p,
                        digest: desc.digest,
                    };
                    ctl.emit(Event::UnitStarted {
                        op: OP,
                        unit: unit.clone(),
                        total: Some(desc.size),
                        reused: false,
                    });
                    let stored = fetch_pack(store, &art, p, &wanted, ctl.cancel)?;
                    progress(unit, stored.1);
                    Ok::<_, BlockError>(stored)
                })?;
                for (n, bytes) in got {
                    fetched += n;
                    bytes_fetched += bytes;
                }
                packs_fetched = holding.len() as u64;
            }
            None => {
                let source = RegistryChunks {
                    art: &art,
                    cancel: ctl.cancel.clone(),
                };
                let got = strata_ops::par_map(
                    &missing,
                    jobs.clamp(1, 16),
                    ctl.cancel,
                    |_, &(d, i, len)| {
                        let unit = Unit::Chunk { index: i };
                        ctl.emit(Event::UnitStarted {
                            op: OP,
                            unit: unit.clone(),
                            total: Some(len),
                            reused: false,
                        });
                        let b = source
                            .fetch(&d, len)
                            .and_then(|b| checked(b, &d, len))
                            .map_err(io_error(format!("fetching chunk {d} from {reference}")))?;
                        progress(unit, len);
                        Ok::<_, BlockError>((d, b))
                    },
                )?;
                // verified: store them (durable before the map names them)
                let mut batch = store.object_batch()?;
                for (d, b) in got {
                    batch
                        .put(&mut b.as_slice(), b.len() as u64)
                        .map_err(io_error(format!("storing chunk {d}")))?;
                    fetched += 1;
                    bytes_fetched += b.len() as u64;
                }
                ctl.cancel.check()?;
                batch.commit()?;
            }
        }
    }
    // the last point a cancel stops the pull: nothing names the chunks yet
    ctl.cancel.check()?;
    let registry = match reference {
        ImageRef::Docker { registry, .. } => registry.as_str(),
        _ => "",
    };
    let remote = TemplateRemote {
        reference: pin(reference, &art.manifest_digest),
        manifest_digest: art.manifest_digest,
        plain_http: plain_http_for(opts, registry),
    };
    let id = store.commit_template(map, Some(&remote))?;
    Ok(PullReport {
        id,
        manifest_digest: art.manifest_digest,
        chunks: chunks.len() as u64,
        chunks_local: (chunks.len() - missing.len()) as u64,
        fetched,
        bytes_fetched,
        packs: art.packs.as_ref().map_or(0, |p| p.packs.len() as u64),
        packs_fetched,
    })
}

/// Read pack `p` of `art` whole (one streaming GET, up to its last wanted
/// chunk), check each of its chunks in `wanted` and store them (durable).
/// Returns the chunks and bytes stored.
fn fetch_pack(
    store: &Store,
    art: &Artifact,
    p: usize,
    wanted: &BTreeSet<Digest>,
    cancel: &Cancel,
) -> Result<(u64, u64), BlockError> {
    let packs = art.packs.as_ref().expect("an artifact with packs");
    let desc = &packs.packs[p];
    let what = format!("fetching pack {} of {}", desc.digest, art.reference);
    let entries: Vec<(u64, u64, Digest)> = packs
        .pack_chunks(p)
        .iter()
        .filter(|e| wanted.contains(&e.2))
        .copied()
        .collect();
    cancel.check()?;
    let r = art.src.open_blob(desc, 0).map_err(oci(what.clone()))?;
    let mut r = Cancellable { inner: r, cancel };
    let mut batch = store.object_batch()?;
    let (mut pos, mut n, mut bytes) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    for (offset, len, d) in entries {
        // skip what is not wanted (chunks the store has, unused bytes)
        let gap = offset - pos;
        let skipped =
            io::copy(&mut (&mut r).take(gap), &mut io::sink()).map_err(io_error(what.clone()))?;
        if skipped != gap {
            return Err(BlockError::Io {
                what,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the pack ends early"),
            });
        }
        buf.clear();
        (&mut r)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(io_error(what.clone()))?;
        let b = checked(std::mem::take(&mut buf), &d, len)
            .map_err(io_error(format!("{what}: chunk {d} at offset {offset}")))?;
        batch
            .put(&mut b.as_slice(), len)
            .map_err(io_error(format!("storing chunk {d}")))?;
        buf = b;
        pos = offset + len;
        n += 1;
        bytes += len;
    }
    cancel.check()?;
    batch.commit()?;
    Ok((n, bytes))
}

/// `reference` pinned to `digest` (`docker://HOST/REPO@sha256:..`).
fn pin(reference: &ImageRef, digest: &Digest) -> String {
    match reference {
        ImageRef::Docker {
            registry,
            repository,
            ..
        } => format!("docker://{registry}/{repository}@{digest}"),
        other => other.to_string(),
    }
}

/// Chunks fetched from the artifact a template was pulled from: by range
/// from its packs (a chunk and its neighbours in one request), or a blob
/// each from an artifact from before packs.
pub struct RegistryChunks<A = Artifact> {
    art: A,
    /// Stops a fetch between reads of its body.
    cancel: Cancel,
}

/// A reader that fails with [`strata_ops::Cancelled`] once `cancel` fires.
struct Cancellable<'a, R> {
    inner: R,
    cancel: &'a Cancel,
}

impl<R: Read> Read for Cancellable<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.cancel.check()?;
        self.inner.read(buf)
    }
}

impl<A: std::borrow::Borrow<Artifact> + Send + Sync> ChunkSource for RegistryChunks<A> {
    fn fetch(&self, digest: &Digest, len: u64) -> io::Result<Vec<u8>> {
        let mut b = self
            .art
            .borrow()
            .read_run(&[(*digest, len)], &self.cancel)?;
        Ok(b.pop().unwrap_or_default())
    }

    fn followers(&self, digest: &Digest, max: u64) -> Vec<(Digest, u64)> {
        match &self.art.borrow().packs {
            Some(p) => p.followers(digest, max),
            None => Vec::new(),
        }
    }

    fn fetch_run(&self, run: &[(Digest, u64)]) -> io::Result<Vec<Vec<u8>>> {
        self.art.borrow().read_run(run, &self.cancel)
    }
}

/// Where the chunks of template `id` come from when the store lacks
/// them: the artifact it was pulled from (resolved and checked now, so a
/// registry that cannot be reached is an error here, not at the first
/// read), or `None` for a local template. The registry is reached over
/// plain HTTP when the pull did. Once `cancel` fires, its fetches fail
/// with [`strata_ops::Cancelled`] (kind Cancelled) between reads.
pub fn source_for(
    store: &Store,
    id: &Digest,
    opts: &RegistryOptions,
    cancel: &Cancel,
) -> Result<Option<RegistryChunks>, BlockError> {
    let Some(remote) = store.template_remote(id) else {
        return Ok(None);
    };
    let reference: ImageRef = remote
        .reference
        .parse()
        .map_err(oci(format!("the remote of template {id}")))?;
    let registry = match &reference {
        ImageRef::Docker { registry, .. } => registry.clone(),
        _ => String::new(),
    };
    let opts = options_for(opts, &remote, &registry);
    let art = open(&reference, &opts, cancel).map_err(|e| {
        if matches!(e, BlockError::Cancelled) {
            return e;
        }
        let hint = if plain_http_for(&opts, &registry) {
            String::new()
        } else {
            format!(
                "; if {registry} serves plain HTTP, pass --plain-http or list it as \
                 insecure in the store's registries.json"
            )
        };
        BlockError::Io {
            what: format!(
                "template {id}: its missing chunks come from registry {registry} ({}), which cannot be used",
                remote.reference
            ),
            source: io::Error::other(format!("{e}{hint}")),
        }
    })?;
    if art.map.digest() != *id {
        return Err(BlockError::Io {
            what: format!(
                "template {id}: reading its chunks from {}",
                remote.reference
            ),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the artifact there is template {}", art.map.digest()),
            ),
        });
    }
    Ok(Some(RegistryChunks {
        art,
        cancel: cancel.clone(),
    }))
}
