//! Templates in OCI registries: an artifact whose config is the map and
//! whose layers are the chunks.
//!
//! ```text
//! manifest (application/vnd.oci.image.manifest.v1+json)
//!   artifactType  application/vnd.strata.rootfs.v1
//!   config        the map        application/vnd.strata.rootfs.map.v1+json
//!   layers        each distinct chunk, in map order
//!                                application/vnd.strata.rootfs.chunk.v1
//! ```
//!
//! Any OCI registry stores it; `skopeo copy` and registry mirroring move
//! it like an image. A push skips the chunks the repository has (HEAD);
//! a pull takes the map only and records where the chunks are, so
//! `rootfs serve` fetches what a reader touches (`--all` fetches every
//! chunk). Every fetched byte is checked against its digest first.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

use strata_digest::Digest;
use strata_oci::manifest::Descriptor;
use strata_oci::registry::{BlobContent, RegistryPusher, RegistrySource};
use strata_oci::{ImageRef, ImageSource, Platform, RegistryOptions};
use strata_ops::{Cancel, Ctl, Event, Op, Unit};
use strata_store::{Store, TemplateMap, TemplateRemote};

use crate::{BlockError, ChunkSource};

/// The artifact's type.
pub const ARTIFACT_TYPE: &str = "application/vnd.strata.rootfs.v1";
/// The config blob: the template's map.
pub const MAP_MEDIA_TYPE: &str = "application/vnd.strata.rootfs.map.v1+json";
/// A chunk blob.
pub const CHUNK_MEDIA_TYPE: &str = "application/vnd.strata.rootfs.chunk.v1";
/// Manifest media type.
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Registries refuse bigger manifests (distribution: 4 MiB).
const MAX_MANIFEST: usize = 4 << 20;

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
    /// Chunks uploaded (the rest the registry had).
    pub uploaded: u64,
    /// Their bytes.
    pub bytes_uploaded: u64,
    /// Bytes of the chunks the registry had already.
    pub bytes_skipped: u64,
}

/// Push template `id` to `reference` (`docker://HOST/REPO:TAG`).
///
/// Events (op [`Op::TemplatePush`]): `Started`, `Resolved` (the manifest's
/// digest, known before any upload, and the distinct chunks), then per
/// distinct chunk `UnitStarted` (`reused`: the registry has it), `Progress`
/// (bytes of all chunks handled so far, of their total) and `UnitDone`, and
/// `Finished`. `ctl.cancel` is checked before every request and inside
/// chunk reads from the template's own registry; a cancelled push returns
/// [`BlockError::Cancelled`] with the tag not pushed (chunks uploaded stay
/// in the registry's repository: a re-run skips them).
pub fn push(
    store: &Store,
    id: &Digest,
    reference: &ImageRef,
    opts: &RegistryOptions,
    jobs: usize,
    ctl: Ctl<'_>,
) -> Result<PushReport, BlockError> {
    framed(ctl, Op::TemplatePush, reference, || {
        push_inner(store, id, reference, opts, jobs, ctl)
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

fn push_inner(
    store: &Store,
    id: &Digest,
    reference: &ImageRef,
    opts: &RegistryOptions,
    jobs: usize,
    ctl: Ctl<'_>,
) -> Result<PushReport, BlockError> {
    const OP: Op = Op::TemplatePush;
    ctl.cancel.check()?;
    let map = store.template_map(id)?;
    let ImageRef::Docker { tag, digest, .. } = reference else {
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
    // distinct chunks in map order (the index of their first use), with
    // their sizes
    let mut seen = BTreeSet::new();
    let chunks: Vec<(u64, Digest, u64)> = map
        .chunks()
        .filter(|(_, d)| seen.insert(*d))
        .map(|(i, d)| (i, d, map.chunk_len(i)))
        .collect();
    let remote = if chunks.iter().any(|(_, d, _)| !store.has_object(d)) {
        source_for(store, id, opts, ctl.cancel)?
    } else {
        None
    };
    let map_bytes = map.to_bytes();
    let config = Descriptor {
        media_type: MAP_MEDIA_TYPE.into(),
        digest: Digest::sha256_of(&map_bytes),
        size: map_bytes.len() as u64,
        annotations: BTreeMap::new(),
        platform: None,
        urls: Vec::new(),
    };
    let layers: Vec<serde_json::Value> = chunks
        .iter()
        .map(|(_, d, len)| {
            serde_json::json!({"mediaType": CHUNK_MEDIA_TYPE, "digest": d.to_string(), "size": len})
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": MAP_MEDIA_TYPE, "digest": config.digest.to_string(), "size": config.size},
        "layers": layers,
        "annotations": {
            "io.strata.rootfs.id": id.to_string(),
            "io.strata.rootfs.size": map.size.to_string(),
        },
    });
    let manifest_bytes = serde_json::to_vec(&manifest).expect("serializable");
    if manifest_bytes.len() > MAX_MANIFEST {
        return Err(BlockError::Io {
            what: format!("pushing template {id}"),
            source: io::Error::other(format!(
                "its {} distinct chunks make a {} byte manifest; registries take at most {MAX_MANIFEST}",
                chunks.len(),
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
    let total: u64 = chunks.iter().map(|(_, _, len)| len).sum();
    let done = AtomicU64::new(0);
    let upload = |i: u64, d: &Digest, len: u64| -> Result<bool, BlockError> {
        let what = || format!("pushing chunk {d} to {}", pusher.target());
        ctl.cancel.check()?;
        let has = pusher.has_blob(d).map_err(oci(what()))?;
        ctl.emit(Event::UnitStarted {
            op: OP,
            unit: Unit::Chunk { index: i },
            total: Some(len),
            reused: has,
        });
        if !has {
            send_chunk(store, &pusher, remote.as_ref(), d, len, ctl)?;
        }
        let n = done.fetch_add(len, Ordering::Relaxed) + len;
        ctl.emit(Event::Progress {
            op: OP,
            unit: Unit::Chunk { index: i },
            done: n,
            total: Some(total),
        });
        ctl.emit(Event::UnitDone {
            op: OP,
            unit: Unit::Chunk { index: i },
        });
        Ok(!has)
    };
    let was_uploaded =
        strata_ops::par_map(&chunks, jobs.clamp(1, 16), ctl.cancel, |_, &(i, d, len)| {
            upload(i, &d, len)
        })?;
    let (mut uploaded, mut bytes_uploaded, mut bytes_skipped) = (0, 0, 0);
    for (&(_, _, len), up) in chunks.iter().zip(was_uploaded) {
        if up {
            uploaded += 1;
            bytes_uploaded += len;
        } else {
            bytes_skipped += len;
        }
    }
    ctl.cancel.check()?;
    let what = format!("pushing the map of {id} to {}", pusher.target());
    if !pusher.has_blob(&config.digest).map_err(oci(what.clone()))? {
        ctl.cancel.check()?;
        pusher
            .upload_blob(&config.digest, config.size, BlobContent::Bytes(&map_bytes))
            .map_err(oci(what))?;
    }
    // the last point a cancel stops the push: the tag is not moved
    ctl.cancel.check()?;
    let digest = pusher
        .put_manifest(&tag, OCI_MANIFEST, &manifest_bytes)
        .map_err(oci(format!("pushing the manifest to {reference}")))?;
    Ok(PushReport {
        manifest_digest: digest,
        chunks: chunks.len() as u64,
        uploaded,
        bytes_uploaded,
        bytes_skipped,
    })
}

/// Upload chunk `d` (`len` bytes) from the store, or from the registry the
/// template came from when the store lacks it (checked first).
fn send_chunk(
    store: &Store,
    pusher: &RegistryPusher,
    remote: Option<&RegistryChunks>,
    d: &Digest,
    len: u64,
    ctl: Ctl<'_>,
) -> Result<(), BlockError> {
    let what = || format!("pushing chunk {d} to {}", pusher.target());
    let bytes = match store.open_object(d) {
        Ok(mut f) => {
            let mut b = Vec::with_capacity(len as usize);
            f.read_to_end(&mut b).map_err(|e| BlockError::Io {
                what: what(),
                source: e,
            })?;
            b
        }
        Err(_) => {
            let r = remote.ok_or_else(|| BlockError::Io {
                what: what(),
                source: io::Error::other("the chunk is not in the store"),
            })?;
            let b = r.fetch(d, len).map_err(|e| BlockError::Io {
                what: what(),
                source: e,
            })?;
            if Digest::sha256_of(&b) != *d {
                return Err(BlockError::Io {
                    what: what(),
                    source: io::Error::other("its source sent bytes that do not match"),
                });
            }
            b
        }
    };
    ctl.cancel.check()?;
    pusher
        .upload_blob(d, len, BlobContent::Bytes(&bytes))
        .map_err(oci(what()))
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
}

/// The artifact at `reference`: its manifest digest, the map, and the
/// chunk descriptors by digest.
fn resolve(
    reference: &ImageRef,
    opts: &RegistryOptions,
) -> Result<(RegistrySource, Digest, TemplateMap), BlockError> {
    let what = format!("pulling {reference}");
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
    let layers: BTreeMap<Digest, u64> = resolved
        .manifest
        .layers
        .iter()
        .map(|l| (l.digest, l.size))
        .collect();
    for (i, d) in map.chunks() {
        if layers.get(&d) != Some(&map.chunk_len(i)) {
            return Err(bad(format!(
                "chunk {i} ({d}) of its map is not among its layers with {} bytes",
                map.chunk_len(i)
            )));
        }
    }
    Ok((src, resolved.manifest_digest, map))
}

/// Pull the template at `reference`: its map, and with `all` every chunk
/// the store lacks. Returns the report; the template is recorded with
/// where its chunks come from (unnamed: the caller names it).
///
/// Events (op [`Op::TemplatePull`]): `Started`, `Resolved` (the artifact's
/// manifest digest and distinct chunks), with `all` per chunk fetched
/// `UnitStarted`, `Progress` (bytes fetched so far, of all missing) and
/// `UnitDone`, and `Finished`. `ctl.cancel` is checked before every request
/// and inside chunk reads; a cancelled pull returns
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
    ctl.cancel.check()?;
    let (src, manifest_digest, map) = resolve(reference, opts)?;
    ctl.cancel.check()?;
    let pinned = pin(reference, &manifest_digest);
    // distinct chunks: digest -> (index of first use, length)
    let mut chunks: BTreeMap<Digest, (u64, u64)> = BTreeMap::new();
    for (i, d) in map.chunks() {
        chunks.entry(d).or_insert((i, map.chunk_len(i)));
    }
    ctl.emit(Event::Resolved {
        op: OP,
        manifest_digest,
        layers: chunks.len(),
    });
    let missing: Vec<(Digest, u64, u64)> = chunks
        .iter()
        .filter(|(d, _)| !store.has_object(d))
        .map(|(d, (i, l))| (*d, *i, *l))
        .collect();
    let (mut fetched, mut bytes_fetched) = (0, 0);
    if all && !missing.is_empty() {
        let source = RegistryChunks {
            src,
            cancel: ctl.cancel.clone(),
        };
        let total: u64 = missing.iter().map(|(_, _, l)| l).sum();
        let done = AtomicU64::new(0);
        let got = strata_ops::par_map(
            &missing,
            jobs.clamp(1, 16),
            ctl.cancel,
            |_, &(d, i, len)| {
                ctl.emit(Event::UnitStarted {
                    op: OP,
                    unit: Unit::Chunk { index: i },
                    total: Some(len),
                    reused: false,
                });
                let b = source.fetch(&d, len).and_then(|b| {
                    if b.len() as u64 == len && Digest::sha256_of(&b) == d {
                        Ok(b)
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "the registry sent bytes that do not match its digest",
                        ))
                    }
                });
                let b = b.map_err(|e| BlockError::Io {
                    what: format!("fetching chunk {d} from {reference}"),
                    source: e,
                })?;
                let n = done.fetch_add(len, Ordering::Relaxed) + len;
                ctl.emit(Event::Progress {
                    op: OP,
                    unit: Unit::Chunk { index: i },
                    done: n,
                    total: Some(total),
                });
                ctl.emit(Event::UnitDone {
                    op: OP,
                    unit: Unit::Chunk { index: i },
                });
                Ok::<_, BlockError>((d, b))
            },
        )?;
        // verified: store them (durable before the map names them)
        let mut batch = store.object_batch()?;
        for (d, b) in got {
            batch
                .put(&mut b.as_slice(), b.len() as u64)
                .map_err(|e| BlockError::Io {
                    what: format!("storing chunk {d}"),
                    source: e,
                })?;
            fetched += 1;
            bytes_fetched += b.len() as u64;
        }
        ctl.cancel.check()?;
        batch.commit()?;
    }
    // the last point a cancel stops the pull: nothing names the chunks yet
    ctl.cancel.check()?;
    let remote = TemplateRemote {
        reference: pinned,
        manifest_digest,
    };
    let id = store.commit_template(&map, Some(&remote))?;
    Ok(PullReport {
        id,
        manifest_digest,
        chunks: chunks.len() as u64,
        chunks_local: (chunks.len() - missing.len()) as u64,
        fetched,
        bytes_fetched,
    })
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

/// Chunks fetched from the repository a template was pulled from.
pub struct RegistryChunks {
    src: RegistrySource,
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

impl ChunkSource for RegistryChunks {
    fn fetch(&self, digest: &Digest, len: u64) -> io::Result<Vec<u8>> {
        let desc = Descriptor {
            media_type: CHUNK_MEDIA_TYPE.into(),
            digest: *digest,
            size: len,
            annotations: BTreeMap::new(),
            platform: None,
            urls: Vec::new(),
        };
        self.cancel.check()?;
        let r = self
            .src
            .open_blob(&desc, 0)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let mut r = Cancellable {
            inner: r,
            cancel: &self.cancel,
        };
        let mut b = Vec::with_capacity(len as usize);
        // never more than the chunk's length (a lying registry)
        (&mut r).take(len + 1).read_to_end(&mut b)?;
        Ok(b)
    }
}

/// Where the chunks of template `id` come from when the store lacks
/// them: the registry it was pulled from, or `None` for a local one.
/// Once `cancel` fires, its fetches fail with [`strata_ops::Cancelled`]
/// (kind Cancelled) between reads.
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
    let src = RegistrySource::new(reference, opts)
        .map_err(oci(format!("reaching {}", remote.reference)))?;
    Ok(Some(RegistryChunks {
        src,
        cancel: cancel.clone(),
    }))
}
