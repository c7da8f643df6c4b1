//! `strata rpull`: a containerd client that pulls an image the way a
//! remote snapshotter needs it. It resolves the image itself, puts the
//! manifest and config (never the layers) into containerd's content
//! store with the gc labels containerd expects, has containerd unpack
//! through the snapshotter with strata's labels (each layer's Prepare is
//! answered AlreadyExists: strata makes the layer available from its own
//! store) and records the image, all under one lease.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use strata_digest::Digest;
use strata_oci::{ImageName, ImageRef, OciError, Platform, RegistryOptions, ResolvedImage};
use tokio_stream::StreamExt;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::labels::{self, chain_ids};
use crate::proto::content::content_client::ContentClient;
use crate::proto::content::{self as cpb, WriteAction};
use crate::proto::images::images_client::ImagesClient;
use crate::proto::images::{self as ipb};
use crate::proto::leases::leases_client::LeasesClient;
use crate::proto::leases::{self as lpb};
use crate::proto::snapshots::snapshots_client::SnapshotsClient;
use crate::proto::snapshots::{self as spb};
use crate::proto::types;
use crate::proto::version::version_client::VersionClient;

/// What to pull and where.
#[derive(Debug, Clone)]
pub struct RpullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace (`k8s.io` for Kubernetes).
    pub namespace: String,
    /// The proxy snapshotter's name in containerd's config.
    pub snapshotter: String,
    /// Registry access (plain HTTP, credentials).
    pub registry: RegistryOptions,
}

/// What an rpull did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RpullSummary {
    /// The image name recorded in containerd.
    pub name: String,
    /// The platform manifest.
    pub manifest_digest: Digest,
    /// Layers.
    pub layers: usize,
    /// Layers strata made available (the others were there already).
    pub layers_prepared: usize,
    /// The top layer's chain id (the image's snapshot).
    pub chain_id: String,
    /// Seconds in all.
    pub seconds: f64,
}

/// Why an rpull failed.
#[derive(Debug, thiserror::Error)]
pub enum RpullError {
    /// The reference does not name a registry image.
    #[error("{0}")]
    Reference(String),
    /// The registry side.
    #[error("resolving {reference}: {source}")]
    Resolve {
        /// The reference.
        reference: String,
        /// Why.
        source: OciError,
    },
    /// containerd is not there.
    #[error("cannot reach containerd at {address}: {reason}")]
    Connect {
        /// The socket.
        address: String,
        /// Why.
        reason: String,
    },
    /// A containerd call failed.
    #[error("{what}: {status}")]
    Call {
        /// What was being done.
        what: String,
        /// containerd's answer.
        status: Status,
    },
}

fn call(what: impl Into<String>) -> impl FnOnce(Status) -> RpullError {
    let what = what.into();
    move |status| RpullError::Call { what, status }
}

/// Adds the namespace (and lease) headers containerd wants on every call.
#[derive(Clone)]
struct Headers {
    namespace: MetadataValue<tonic::metadata::Ascii>,
    lease: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Headers {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace.clone());
        if let Some(l) = &self.lease {
            r.metadata_mut().insert("containerd-lease", l.clone());
        }
        Ok(r)
    }
}

type Intercepted = tonic::service::interceptor::InterceptedService<Channel, Headers>;

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // civil from days (Howard Hinnant's algorithm)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn unique_suffix() -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{n}-{}", std::process::id())
}

/// Pull `reference` into containerd through the snapshotter.
pub async fn rpull(reference: &str, opts: &RpullOptions) -> Result<RpullSummary, RpullError> {
    let t0 = std::time::Instant::now();
    let image = match reference.parse::<ImageName>() {
        Ok(ImageName::Qualified(r @ ImageRef::Docker { .. })) => r,
        Ok(_) => {
            return Err(RpullError::Reference(format!(
                "{reference:?}: rpull takes a registry reference (HOST[:PORT]/REPO[:TAG] or docker://...)"
            )));
        }
        Err(e) => return Err(RpullError::Reference(e.to_string())),
    };
    let ImageRef::Docker {
        registry: host,
        repository,
        ..
    } = &image
    else {
        unreachable!("matched above")
    };
    let (host, repository) = (host.clone(), repository.clone());
    // the name containerd records: the reference without a transport,
    // as `ctr run` and CRI name it
    let name = image.to_string();
    let name = name.trim_start_matches("docker://").to_string();

    // the registry first: a bad reference fails before containerd is touched
    let resolved: ResolvedImage = {
        let image = image.clone();
        let registry = opts.registry.clone();
        tokio::task::spawn_blocking(move || {
            strata_oci::open_source(&image, &registry)?.resolve(&Platform::host_default())
        })
        .await
        .expect("resolving does not panic")
        .map_err(|source| RpullError::Resolve {
            reference: reference.to_string(),
            source,
        })?
    };
    let config =
        strata_oci::parse_config(&resolved.config_bytes).map_err(|source| RpullError::Resolve {
            reference: reference.to_string(),
            source,
        })?;
    let diff_ids: Vec<Digest> = config.diff_ids.clone();
    let chain = chain_ids(&diff_ids);
    let top = chain
        .last()
        .cloned()
        .ok_or_else(|| RpullError::Reference(format!("{reference}: the image has no layers")))?;

    let address = opts.address.display().to_string();
    let channel = Endpoint::from_shared(format!("unix://{address}"))
        .map_err(|e| RpullError::Connect {
            address: address.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| RpullError::Connect {
            address: address.clone(),
            reason: crate::core::error_chain(&e),
        })?;
    let mut headers = Headers {
        namespace: opts.namespace.parse().map_err(|_| {
            RpullError::Reference(format!("namespace {:?} is not valid", opts.namespace))
        })?,
        lease: None,
    };
    VersionClient::with_interceptor(channel.clone(), headers.clone())
        .version(())
        .await
        .map_err(|s| RpullError::Connect {
            address: address.clone(),
            reason: s.message().to_string(),
        })?;

    // one lease around it all; it expires by itself if we die
    let lease_id = format!("strata-rpull-{}", unique_suffix());
    let mut leases = LeasesClient::with_interceptor(channel.clone(), headers.clone());
    let expire = rfc3339(SystemTime::now() + Duration::from_secs(3600));
    leases
        .create(lpb::CreateRequest {
            id: lease_id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
        })
        .await
        .map_err(call("creating a lease"))?;
    headers.lease = Some(lease_id.parse().expect("ascii"));
    let result = pull_under_lease(
        &channel,
        &headers,
        opts,
        reference,
        &name,
        &host,
        &repository,
        &resolved,
        &diff_ids,
        &chain,
    )
    .await;
    let _ = leases
        .delete(lpb::DeleteRequest {
            id: lease_id,
            sync: false,
        })
        .await;
    let prepared = result?;
    Ok(RpullSummary {
        name,
        manifest_digest: resolved.manifest_digest,
        layers: diff_ids.len(),
        layers_prepared: prepared,
        chain_id: top,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[allow(clippy::too_many_arguments)]
async fn pull_under_lease(
    channel: &Channel,
    headers: &Headers,
    opts: &RpullOptions,
    reference: &str,
    name: &str,
    host: &str,
    repository: &str,
    resolved: &ResolvedImage,
    diff_ids: &[Digest],
    chain: &[String],
) -> Result<usize, RpullError> {
    let mut content = ContentClient::with_interceptor(channel.clone(), headers.clone());
    let source_label = (
        format!(
            "containerd.io/distribution.source.{}",
            host.split(':').next().unwrap_or(host)
        ),
        repository.to_string(),
    );
    let manifest = &resolved.manifest;
    let config_labels = HashMap::from([
        source_label.clone(),
        (
            format!("containerd.io/gc.ref.snapshot.{}", opts.snapshotter),
            chain.last().cloned().unwrap_or_default(),
        ),
    ]);
    let mut manifest_labels = HashMap::from([
        source_label.clone(),
        (
            "containerd.io/gc.ref.content.config".to_string(),
            manifest.config.digest.to_string(),
        ),
    ]);
    for (i, l) in manifest.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.to_string(),
        );
    }
    // the config and manifest go into containerd's content store while
    // the layers are made available (all under the lease): the image
    // record, made last, is what names them
    let contents = async {
        write_blob(
            &mut content,
            &format!("config-{}", manifest.config.digest),
            &resolved.config_bytes,
            &manifest.config.digest,
            config_labels,
        )
        .await?;
        write_blob(
            &mut content,
            &format!("manifest-{}", resolved.manifest_digest),
            &resolved.manifest_bytes,
            &resolved.manifest_digest,
            manifest_labels,
        )
        .await
    };
    let (prepared, ()) = tokio::try_join!(
        unpack(channel, headers, opts, reference, resolved, diff_ids, chain),
        contents
    )?;

    // the image records
    let mut images = ImagesClient::with_interceptor(channel.clone(), headers.clone());
    let target = types::Descriptor {
        media_type: manifest.media_type.clone(),
        digest: resolved.manifest_digest.to_string(),
        size: resolved.manifest_bytes.len() as i64,
        annotations: HashMap::new(),
    };
    for (name, labels) in image_records(
        name,
        &format!("{host}/{repository}"),
        &resolved.manifest_digest,
        &manifest.config.digest,
        &opts.namespace,
    ) {
        let image = ipb::Image {
            name: name.clone(),
            labels,
            target: Some(target.clone()),
            created_at: None,
            updated_at: None,
        };
        match images
            .create(ipb::CreateImageRequest {
                image: Some(image.clone()),
            })
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(ipb::UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                    })
                    .await
                    .map_err(call(format!("updating image {name}")))?;
            }
            Err(s) => return Err(call(format!("creating image {name}"))(s)),
        }
    }
    Ok(prepared)
}

/// Each layer's Prepare with strata's labels, bottom up (a layer's parent
/// is the one below): the number strata made available.
async fn unpack(
    channel: &Channel,
    headers: &Headers,
    opts: &RpullOptions,
    reference: &str,
    resolved: &ResolvedImage,
    diff_ids: &[Digest],
    chain: &[String],
) -> Result<usize, RpullError> {
    let mut snaps = SnapshotsClient::with_interceptor(channel.clone(), headers.clone());
    let mut prepared = 0;
    for (i, target) in chain.iter().enumerate() {
        let stat = snaps
            .stat(spb::StatSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: target.clone(),
            })
            .await;
        match stat {
            Ok(_) => continue,
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(call(format!("checking layer {i} ({target})"))(s)),
        }
        let mut l = HashMap::from([
            (labels::SNAPSHOT_REF.to_string(), target.clone()),
            (labels::IMAGE.to_string(), reference.to_string()),
            (
                labels::MANIFEST.to_string(),
                resolved.manifest_digest.to_string(),
            ),
            (labels::LAYER.to_string(), i.to_string()),
        ]);
        if opts.registry.plain_http {
            l.insert(labels::PLAIN_HTTP.to_string(), "true".to_string());
        }
        let key = format!("extract-{} {target}", unique_suffix());
        let r = snaps
            .prepare(spb::PrepareSnapshotRequest {
                snapshotter: opts.snapshotter.clone(),
                key: key.clone(),
                parent: if i == 0 {
                    String::new()
                } else {
                    chain[i - 1].clone()
                },
                labels: l,
            })
            .await;
        match r {
            Err(s) if s.code() == Code::AlreadyExists => prepared += 1,
            Err(s) => {
                return Err(call(format!(
                    "making layer {i} ({}) available through snapshotter {:?}",
                    diff_ids[i], opts.snapshotter
                ))(s));
            }
            Ok(_) => {
                // the snapshotter took it as an ordinary layer: it is not
                // strata, or not configured as a proxy for it
                let _ = snaps
                    .remove(spb::RemoveSnapshotRequest {
                        snapshotter: opts.snapshotter.clone(),
                        key,
                    })
                    .await;
                return Err(RpullError::Call {
                    what: format!("layer {i}"),
                    status: Status::failed_precondition(format!(
                        "snapshotter {:?} returned mounts instead of making the layer \
                         available itself: is it strata?",
                        opts.snapshotter
                    )),
                });
            }
        }
    }
    Ok(prepared)
}

/// CRI's label on the images it manages: kubelet sees only those.
pub const CRI_IMAGE_LABEL: &str = "io.cri-containerd.image";

/// The image records to create: `name`; in `k8s.io` also the ones CRI
/// makes when it pulls (`REPO@MANIFEST` and the image id, the config's
/// digest), each labelled as CRI-managed, so kubelet finds the image by
/// any of its names and does not pull it again.
fn image_records(
    name: &str,
    repo: &str,
    manifest: &Digest,
    config: &Digest,
    namespace: &str,
) -> Vec<(String, HashMap<String, String>)> {
    if namespace != "k8s.io" {
        return vec![(name.to_string(), HashMap::new())];
    }
    let managed = HashMap::from([(CRI_IMAGE_LABEL.to_string(), "managed".to_string())]);
    let mut v = vec![name.to_string()];
    for n in [format!("{repo}@{manifest}"), config.to_string()] {
        if !v.contains(&n) {
            v.push(n);
        }
    }
    v.into_iter().map(|n| (n, managed.clone())).collect()
}

/// Put `bytes` into containerd's content store as `digest` (STAT, WRITE,
/// COMMIT on the Write stream); a blob already there gets the labels.
/// An ingest of the same ref left by an earlier attempt (a pull cut
/// short) goes on from where it stopped, as containerd's own client does;
/// one that does not fit (more bytes than the blob has, other bytes, an
/// offset containerd refuses) is aborted and written again, once.
async fn write_blob(
    content: &mut ContentClient<Intercepted>,
    r#ref: &str,
    bytes: &[u8],
    digest: &Digest,
    labels: HashMap<String, String>,
) -> Result<(), RpullError> {
    match write_blob_once(content, r#ref, bytes, digest, labels.clone()).await {
        Err(RpullError::Call { status, .. })
            if matches!(
                status.code(),
                Code::OutOfRange | Code::DataLoss | Code::FailedPrecondition
            ) =>
        {
            tracing::debug!("containerd's ingest {ref}: {status}; writing it again", ref = r#ref);
            match content
                .abort(cpb::AbortRequest {
                    r#ref: r#ref.to_string(),
                })
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => {
                    return Err(call(format!(
                        "aborting {ref} in containerd's content store",
                        ref = r#ref
                    ))(s));
                }
            }
            write_blob_once(content, r#ref, bytes, digest, labels).await
        }
        r => r,
    }
}

async fn write_blob_once(
    content: &mut ContentClient<Intercepted>,
    r#ref: &str,
    bytes: &[u8],
    digest: &Digest,
    labels: HashMap<String, String>,
) -> Result<(), RpullError> {
    let what = || format!("writing {ref} to containerd's content store", ref = r#ref);
    let total = bytes.len() as i64;
    let write_at = |offset: i64| cpb::WriteContentRequest {
        action: WriteAction::Write as i32,
        r#ref: r#ref.to_string(),
        offset,
        data: bytes[offset as usize..].to_vec(),
        ..Default::default()
    };
    let commit = cpb::WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: r#ref.to_string(),
        total,
        offset: total,
        expected: digest.to_string(),
        labels: labels.clone(),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    // the first message goes out before the call is awaited: containerd
    // answers (and sends its headers) only once it has one
    tx.send(cpb::WriteContentRequest {
        action: WriteAction::Stat as i32,
        r#ref: r#ref.to_string(),
        total,
        expected: digest.to_string(),
        ..Default::default()
    })
    .await
    .expect("the receiver is alive");
    let resp = content
        .write(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    let exists = |s: &Status| s.code() == Code::AlreadyExists;
    let mut stream = match resp {
        Ok(r) => r.into_inner(),
        Err(s) if exists(&s) => return set_labels(content, digest, labels, what()).await,
        Err(s) => return Err(call(what())(s)),
    };
    let mut commit = Some(commit);
    loop {
        match stream.next().await {
            Some(Ok(r)) => {
                if r.action == WriteAction::Commit as i32 {
                    if r.digest != digest.to_string() {
                        return Err(RpullError::Call {
                            what: what(),
                            status: Status::data_loss(format!(
                                "containerd committed {} for {digest}",
                                r.digest
                            )),
                        });
                    }
                    return Ok(());
                }
                let next = if r.action == WriteAction::Stat as i32 {
                    // what the ingest holds already (0 when it is new)
                    match r.offset {
                        o if o < 0 || o > total => {
                            return Err(RpullError::Call {
                                what: what(),
                                status: Status::data_loss(format!(
                                    "containerd's ingest holds {o} bytes of {total}"
                                )),
                            });
                        }
                        o if o < total => Some(write_at(o)),
                        _ => commit.take(),
                    }
                } else {
                    commit.take()
                };
                match next {
                    Some(m) => {
                        if tx.send(m).await.is_err() {
                            return Err(call(what())(Status::aborted("the stream closed")));
                        }
                    }
                    None => return Ok(()),
                }
            }
            Some(Err(s)) if exists(&s) => {
                return set_labels(content, digest, labels, what()).await;
            }
            Some(Err(s)) => return Err(call(what())(s)),
            None => {
                return Err(call(what())(Status::aborted(
                    "containerd ended the stream before the commit",
                )));
            }
        }
    }
}

async fn set_labels(
    content: &mut ContentClient<Intercepted>,
    digest: &Digest,
    labels: HashMap<String, String>,
    what: String,
) -> Result<(), RpullError> {
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    content
        .update(cpb::UpdateRequest {
            info: Some(cpb::Info {
                digest: digest.to_string(),
                labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await
        .map_err(call(what))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        // date -u -d @1795000000 +%FT%TZ
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn k8s_io_gets_the_records_cri_makes() {
        let m = Digest::sha256_of(b"manifest");
        let c = Digest::sha256_of(b"config");
        let plain = image_records("h:5000/py:1", "h:5000/py", &m, &c, "default");
        assert_eq!(plain, vec![("h:5000/py:1".to_string(), HashMap::new())]);
        let cri = image_records("h:5000/py:1", "h:5000/py", &m, &c, "k8s.io");
        let names: Vec<&str> = cri.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec!["h:5000/py:1", &format!("h:5000/py@{m}"), &c.to_string()]
        );
        assert!(
            cri.iter()
                .all(|(_, l)| l.get(CRI_IMAGE_LABEL).map(String::as_str) == Some("managed"))
        );
        // pulled by digest: the name is the digest reference, once
        let by_digest = format!("h:5000/py@{m}");
        assert_eq!(
            image_records(&by_digest, "h:5000/py", &m, &c, "k8s.io").len(),
            2
        );
    }
}
