//! The HTTP routes: thin, over [`Shared`](crate::service::Shared).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use serde_json::json;
use strata_oci::{ImageName, ImageRef, ImageSource as _, Platform};
use strata_ops::{ErrorKind, HasKind as _};

use crate::jobs::{Job, Prefetch, Progress, Request as JobRequest, Source, State as JobState};
use crate::problem::Problem;
use crate::service::{Admitted, CancelOutcome, Refused, Shared, target_repository};

/// Every route, as `METHOD PATH` (README, tests).
pub const ROUTES: &[&str] = &[
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/formats",
    "POST /v1/conversions",
    "GET /v1/conversions",
    "GET /v1/conversions/{id}",
    "DELETE /v1/conversions/{id}",
];

/// Formats strata never writes: an explicit "removed" for old clients.
const NEVER_WRITTEN: &[(&str, &str)] = &[
    ("overlaybd", "strata never writes overlaybd"),
    ("estargz", "strata never writes eStargz"),
    ("nydus", "strata never writes Nydus"),
];

/// Formats this build writes.
const WRITTEN: &[(&str, bool, &str)] = &[
    (
        "zstd:chunked",
        true,
        "application/vnd.oci.image.layer.v1.tar+zstd",
    ),
    ("zstd", false, "application/vnd.oci.image.layer.v1.tar+zstd"),
];

/// The router.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    let open = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    let guarded = axum::Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/formats", get(formats))
        .route("/v1/conversions", get(list).post(create))
        .route("/v1/conversions/{id}", get(show).delete(cancel))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), auth));
    open.merge(guarded)
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "route-not-found", "no such route")
        })
        .layer(axum::extract::DefaultBodyLimit::max(shared.config.max_body))
        .with_state(shared)
}

async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !s.tokens.accepts(h) {
        tracing::info!("{} {}: 401", req.method(), req.uri().path());
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer TOKEN)",
        )
        .into_response();
    }
    next.run(req).await
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let free = rustix::fs::statvfs(s.store.root())
        .map(|v| v.f_bavail * v.f_frsize)
        .unwrap_or(0);
    let probe = s.store.root().join("tmp").join(".readyz");
    let writable = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    let queued = s.lock().queued();
    let stopping = s.shutting_down.load(Ordering::SeqCst);
    let ok = writable && free >= s.config.min_free && queued < s.config.queue && !stopping;
    let body = json!({"ready": ok, "checks": {
        "store_writable": writable,
        "free_bytes": free,
        "min_free_bytes": s.config.min_free,
        "queue": format!("{queued}/{}", s.config.queue),
        "shutting_down": stopping,
    }});
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn formats(State(s): State<Arc<Shared>>) -> Json<serde_json::Value> {
    let mut out = Vec::new();
    for (name, lazy, media_type) in WRITTEN {
        let status = if s.config.formats.disabled.iter().any(|d| d == name) {
            "removed"
        } else if s.config.formats.deprecated.iter().any(|d| d == name) {
            "deprecated"
        } else {
            "supported"
        };
        let mut f = json!({"name": name, "status": status, "lazy": lazy, "media_type": media_type});
        if status == "removed" {
            f["reason"] = json!("removed from this service by its configuration");
        }
        out.push(f);
    }
    for (name, reason) in NEVER_WRITTEN {
        out.push(json!({"name": name, "status": "removed", "reason": reason}));
    }
    Json(json!({ "formats": out }))
}

/// `POST /v1/conversions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionBody {
    source: String,
    format: String,
    #[serde(default)]
    prefetch: Option<Prefetch>,
    #[serde(default)]
    prefetch_list: Option<Vec<String>>,
    #[serde(default)]
    target: Option<String>,
}

fn bad(detail: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid-request", detail)
}

/// A registry reference (`HOST/REPO[:TAG|@DIGEST]`) on an allowed host.
fn allowed_ref(s: &Shared, what: &str, text: &str) -> Result<ImageRef, Problem> {
    let text = text.strip_prefix("docker://").unwrap_or(text);
    let r = match text.parse::<ImageName>() {
        Ok(ImageName::Qualified(r @ ImageRef::Docker { .. })) => r,
        Ok(_) => {
            return Err(bad(format!(
                "{what} {text:?} is not HOST/REPO[:TAG] or HOST/REPO@DIGEST naming a registry"
            )));
        }
        Err(e) => return Err(bad(format!("{what} {text:?}: {e}"))),
    };
    let ImageRef::Docker { registry, .. } = &r else {
        unreachable!("matched above")
    };
    if !s.config.allowed(registry) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "registry-not-allowed",
            format!("{what} registry {registry} is not in this service's [registries] allow list"),
        )
        .with("registry", json!(registry)));
    }
    Ok(r)
}

async fn create(
    State(s): State<Arc<Shared>>,
    body: Result<Json<ConversionBody>, JsonRejection>,
) -> Response {
    match admit(&s, body).await {
        Ok(r) => r,
        Err(p) => {
            tracing::info!("POST /v1/conversions: {} {}", p.status.as_u16(), p.code);
            p.into_response()
        }
    }
}

async fn admit(
    s: &Arc<Shared>,
    body: Result<Json<ConversionBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let Json(b) = body.map_err(|e| match e.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "the body must be application/json",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            format!("the body is over {} bytes", s.config.max_body),
        ),
        _ => bad(e.body_text()),
    })?;
    if s.shutting_down.load(Ordering::SeqCst) {
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            "the service is stopping",
        ));
    }
    let source = allowed_ref(s, "source", &b.source)?;
    let repository = target_repository(&source);
    let target = match &b.target {
        Some(t) => {
            let t = allowed_ref(s, "target", t)?;
            if let ImageRef::Docker {
                digest: Some(_), ..
            } = &t
            {
                return Err(bad(
                    "target names a repository and maybe a tag, not a digest",
                ));
            }
            t.to_string().trim_start_matches("docker://").to_string()
        }
        None => repository.clone(),
    };
    let prefetch = b.prefetch.unwrap_or(if b.prefetch_list.is_some() {
        Prefetch::List
    } else {
        Prefetch::None
    });
    let list = b.prefetch_list.unwrap_or_default();
    match prefetch {
        Prefetch::List if list.is_empty() => {
            return Err(bad("prefetch \"list\" needs a non-empty prefetch_list"));
        }
        Prefetch::None if !list.is_empty() => {
            return Err(bad("prefetch_list is given but prefetch is \"none\""));
        }
        Prefetch::Optimize => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "prefetch-unsupported",
                "prefetch \"optimize\" is not offered by this version of the service: give a prefetch_list",
            ));
        }
        _ => {}
    }
    if list.len() > 100_000 || list.iter().any(|p| !p.starts_with('/') || p.len() > 4096) {
        return Err(bad(
            "prefetch_list: at most 100000 absolute paths of at most 4096 bytes",
        ));
    }

    // the tag names a digest now, once: the job converts that
    let reg = s.registry.clone();
    let src = source.clone();
    let resolved = tokio::task::spawn_blocking(move || {
        strata_oci::registry::RegistrySource::new(src, &reg)
            .and_then(|r| r.resolve(&Platform::host_default()))
    })
    .await
    .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| {
        let (status, code) = match e.kind() {
            ErrorKind::NotFound => (StatusCode::NOT_FOUND, "source-not-found"),
            ErrorKind::InvalidInput | ErrorKind::Unsupported => {
                (StatusCode::UNPROCESSABLE_ENTITY, "source-unsupported")
            }
            _ => (StatusCode::BAD_GATEWAY, "source-unavailable"),
        };
        Problem::new(status, code, format!("resolving {}: {e}", b.source))
    })?;
    let digest = resolved.index_digest.unwrap_or(resolved.manifest_digest);
    let fallback = json!({"action": "use-source", "source_digest": digest.to_string(),
        "source": format!("{repository}@{digest}")});

    // formats are explicit: removed and unknown ones are answered as such,
    // with the source to use instead
    let format = b.format.trim().to_ascii_lowercase();
    let removed = NEVER_WRITTEN
        .iter()
        .find(|(n, _)| *n == format)
        .map(|(_, r)| r.to_string())
        .or_else(|| {
            s.config
                .formats
                .disabled
                .contains(&format)
                .then(|| format!("{format} was removed from this service"))
        });
    if let Some(why) = removed {
        return Err(Problem::new(StatusCode::GONE, "format-removed", why)
            .with("format", json!(format))
            .with("fallback", fallback));
    }
    if !WRITTEN.iter().any(|(n, ..)| *n == format) {
        return Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "format-unknown",
            format!("unknown format {:?}: GET /v1/formats lists them", b.format),
        )
        .with("format", json!(b.format))
        .with("fallback", fallback));
    }
    let deprecated = s.config.formats.deprecated.contains(&format);

    let request = JobRequest {
        format,
        prefetch,
        prefetch_list: list,
        target,
    };
    let key = crate::jobs::key(&resolved.manifest_digest, &request);
    let now = crate::jobs::now();
    let template = Job {
        id: crate::jobs::job_id(&key, 1),
        kind: "conversion".into(),
        state: JobState::Queued,
        key,
        source: Source {
            reference: b.source.clone(),
            repository,
            digest,
            manifest_digest: resolved.manifest_digest,
        },
        request,
        progress: Progress {
            phase: "queued".into(),
            ..Progress::default()
        },
        result: None,
        verification: None,
        error: None,
        warnings: if deprecated {
            vec!["format-deprecated".into()]
        } else {
            Vec::new()
        },
        attempt: 1,
        runs: 0,
        created: now,
        updated: now,
        cancel_requested: false,
    };
    // not here: maybe converted by another instance (its deterministic tag)
    let known = s.lock().by_key.contains_key(&template.key);
    if !known {
        let (s2, t2) = (s.clone(), template.clone());
        if let Ok(Some(hit)) = tokio::task::spawn_blocking(move || s2.registry_hit(&t2)).await {
            let job = s.record_done(hit);
            return Ok(job_response(StatusCode::OK, &job, deprecated));
        }
    }
    let admitted = s.admit(template).map_err(|r| match r {
        Refused::QueueFull(secs) => {
            let mut p = Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue-full",
                format!("{} jobs are waiting: retry later", s.config.queue),
            )
            .with("retry_after_s", json!(secs));
            p.retry_after = Some(secs);
            p
        }
        Refused::ShuttingDown => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            "the service is stopping",
        ),
        Refused::Journal(m) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
    })?;
    Ok(match admitted {
        Admitted::Done(job) => job_response(StatusCode::OK, &job, deprecated),
        Admitted::InFlight(job) => {
            tracing::info!("POST /v1/conversions: 202 {}", job.id);
            job_response(StatusCode::ACCEPTED, &job, deprecated)
        }
    })
}

fn job_response(status: StatusCode, job: &Job, deprecated: bool) -> Response {
    let mut r = (status, Json(job)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/conversions/{}", job.id)) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if deprecated {
        r.headers_mut()
            .insert("deprecation", HeaderValue::from_static("true"));
    }
    r
}

fn no_job(id: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "job-not-found",
        format!("no job {id:?}"),
    )
}

async fn show(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.lock().jobs.get(&id) {
        Some(j) => Json(j).into_response(),
        None => no_job(&id).into_response(),
    }
}

/// `GET /v1/conversions` query.
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    source: Option<String>,
    state: Option<String>,
    limit: Option<usize>,
}

async fn list(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    let t = s.lock();
    let mut jobs: Vec<&Job> = t
        .jobs
        .values()
        .filter(|j| {
            q.source.as_deref().is_none_or(|src| {
                j.source.reference == src
                    || j.source.digest.to_string() == src
                    || j.source.manifest_digest.to_string() == src
                    || format!("{}@{}", j.source.repository, j.source.manifest_digest) == src
            })
        })
        .filter(|j| q.state.as_deref().is_none_or(|st| j.state.as_str() == st))
        .collect();
    jobs.sort_by(|a, b| (b.created, &b.id).cmp(&(a.created, &a.id)));
    jobs.truncate(q.limit.unwrap_or(100).min(1000));
    Json(json!({ "jobs": jobs })).into_response()
}

async fn cancel(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match s.cancel(&id) {
        CancelOutcome::Cancelled(j) => (StatusCode::OK, Json(j)).into_response(),
        CancelOutcome::Requested(j) => (StatusCode::ACCEPTED, Json(j)).into_response(),
        CancelOutcome::Finished(j) => Problem::new(
            StatusCode::CONFLICT,
            "job-finished",
            format!("job {} is {} already", j.id, j.state.as_str()),
        )
        .into_response(),
        CancelOutcome::TooLate(j) => Problem::new(
            StatusCode::CONFLICT,
            "too-late",
            format!(
                "job {} is writing its tags: it can no longer be cancelled",
                j.id
            ),
        )
        .into_response(),
        CancelOutcome::NotFound => no_job(&id).into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    use std::fmt::Write as _;
    let mut out = String::new();
    let t = s.lock();
    let _ = writeln!(out, "# HELP strata_serve_jobs Jobs by state.");
    let _ = writeln!(out, "# TYPE strata_serve_jobs gauge");
    for st in JobState::ALL {
        let n = t.jobs.values().filter(|j| j.state == st).count();
        let _ = writeln!(out, "strata_serve_jobs{{state=\"{}\"}} {n}", st.as_str());
    }
    let queued = t.queued();
    drop(t);
    let c = &s.counters;
    let _ = writeln!(
        out,
        "# HELP strata_serve_queue_depth Jobs waiting for a worker."
    );
    let _ = writeln!(out, "# TYPE strata_serve_queue_depth gauge");
    let _ = writeln!(out, "strata_serve_queue_depth {queued}");
    let _ = writeln!(
        out,
        "# HELP strata_serve_conversions_started_total Conversions begun."
    );
    let _ = writeln!(out, "# TYPE strata_serve_conversions_started_total counter");
    let _ = writeln!(
        out,
        "strata_serve_conversions_started_total {}",
        c.conversions_started.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strata_serve_cache_hits_total Answers found converted in the registry."
    );
    let _ = writeln!(out, "# TYPE strata_serve_cache_hits_total counter");
    let _ = writeln!(
        out,
        "strata_serve_cache_hits_total{{where=\"registry\"}} {}",
        c.registry_hits.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strata_serve_converted_bytes_total Uncompressed bytes converted."
    );
    let _ = writeln!(out, "# TYPE strata_serve_converted_bytes_total counter");
    let _ = writeln!(
        out,
        "strata_serve_converted_bytes_total {}",
        c.converted_bytes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP strata_serve_verification_failures_total Failed verifications by check."
    );
    let _ = writeln!(
        out,
        "# TYPE strata_serve_verification_failures_total counter"
    );
    for (check, n) in c
        .verification_failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "strata_serve_verification_failures_total{{check=\"{check}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP strata_serve_phase_seconds_total Seconds spent by phase, failures included."
    );
    let _ = writeln!(out, "# TYPE strata_serve_phase_seconds_total counter");
    for (phase, secs) in c
        .phase_seconds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        let _ = writeln!(
            out,
            "strata_serve_phase_seconds_total{{phase=\"{phase}\"}} {secs}"
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        out,
    )
        .into_response()
}
