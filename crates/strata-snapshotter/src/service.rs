//! containerd's Snapshots gRPC service over [`Snapshotter`]: decode, run
//! the operation on tokio's blocking pool, encode. No logic here.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::core::{self, Kind, Mount, SnapError, Snapshotter};
use crate::filters::Filter;
use crate::proto::snapshots::snapshots_server::Snapshots;
use crate::proto::snapshots::{self as pb};
use crate::proto::types;

/// The service containerd calls.
#[derive(Clone)]
pub struct Service {
    core: Arc<Snapshotter>,
}

impl Service {
    /// Serve `core`.
    pub fn new(core: Arc<Snapshotter>) -> Service {
        Service { core }
    }

    async fn run<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Snapshotter) -> Result<T, SnapError> + Send + 'static,
    ) -> Result<T, Status> {
        let core = self.core.clone();
        let t0 = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || f(&core))
            .await
            .map_err(|e| Status::internal(format!("strata: {op} failed: {e}")))?;
        tracing::debug!(
            op,
            elapsed_us = t0.elapsed().as_micros() as u64,
            ok = r.is_ok()
        );
        r.map_err(|e| status(op, e))
    }
}

/// containerd turns codes back into its errdefs (NotFound, AlreadyExists,
/// FailedPrecondition, InvalidArgument); the message names strata.
pub fn status(op: &str, e: SnapError) -> Status {
    let msg = format!("strata: {op}: {e}");
    match e {
        SnapError::NotFound(_) => Status::not_found(msg),
        SnapError::AlreadyExists(_) => Status::already_exists(msg),
        SnapError::FailedPrecondition(_) => Status::failed_precondition(msg),
        SnapError::InvalidArgument(_) => Status::invalid_argument(msg),
        SnapError::Unavailable(_) => Status::unavailable(msg),
        SnapError::Io { .. } => Status::internal(msg),
    }
}

fn mounts(v: Vec<Mount>) -> Vec<types::Mount> {
    v.into_iter()
        .map(|m| types::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn parent(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

fn labels(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn timestamp(nanos: u128) -> prost_types::Timestamp {
    let d = Duration::from_nanos(nanos.min(u64::MAX as u128) as u64);
    let t = UNIX_EPOCH + d;
    prost_types::Timestamp::from(t)
}

fn info(i: core::Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: match i.kind {
            Kind::View => pb::Kind::View,
            Kind::Active => pb::Kind::Active,
            Kind::Committed => pb::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(i.created)),
        updated_at: Some(timestamp(i.updated)),
        labels: i.labels.into_iter().collect(),
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for Service {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .run("prepare", move |c| {
                c.create(
                    Kind::Active,
                    &r.key,
                    parent(r.parent).as_deref(),
                    labels(r.labels),
                )
            })
            .await?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        let m = self
            .run("view", move |c| {
                c.create(
                    Kind::View,
                    &r.key,
                    parent(r.parent).as_deref(),
                    labels(r.labels),
                )
            })
            .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts(m),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let m = self.run("mounts", move |c| c.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse { mounts: mounts(m) }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run("commit", move |c| {
            c.commit(&r.name, &r.key, labels(r.labels))
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        self.run("remove", move |c| c.remove(&r.key)).await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let i = self.run("stat", move |c| c.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let Some(i) = r.info else {
            return Err(Status::invalid_argument("strata: update: no info"));
        };
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let i = self
            .run("update", move |c| {
                c.update(&i.name, labels(i.labels), &paths)
            })
            .await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info(i)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let filters = r
            .filters
            .iter()
            .map(|f| Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("strata: list: {e}")))?;
        let all = self.run("list", move |c| Ok(c.list(&filters))).await?;
        // batches of 100, as containerd's own service sends them
        let batches: Vec<Result<pb::ListSnapshotsResponse, Status>> = all
            .chunks(100)
            .map(|c| {
                Ok(pb::ListSnapshotsResponse {
                    info: c.iter().cloned().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let u = self.run("usage", move |c| c.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: i64::try_from(u.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(u.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.run("cleanup", |c| c.cleanup()).await?;
        Ok(Response::new(()))
    }
}
