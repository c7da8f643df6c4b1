//! The HTTP routes: thin, over [`Shared`](crate::service::Shared).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use strata_oci::{ImageName, ImageRef, ImageSource as _, Platform};
use strata_ops::{ErrorKind, HasKind as _};

use crate::jobs::{Job, Prefetch, Request as JobRequest, Source, State as JobState};
use crate::problem::Problem;
use crate::service::{Admitted, CancelOutcome, Refused, Shared, target_repository};

/// Every route, as `METHOD PATH`: the OpenAPI document lists exactly
/// these (a unit test checks it against the router).
pub const ROUTES: &[&str] = &[
    "GET /healthz",
    "GET /readyz",
    "GET /metrics",
    "GET /v1/formats",
    "POST /v1/conversions",
    "GET /v1/conversions",
    "GET /v1/conversions/{id}",
    "DELETE /v1/conversions/{id}",
    "POST /v1/templates",
    "GET /v1/templates",
    "GET /v1/templates/{id}",
    "DELETE /v1/templates/{id}",
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

/// The bearer scheme of the guarded routes.
struct Bearer;

impl utoipa::Modify for Bearer {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        api.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
    }
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "strata serve",
        description = "Image conversions as jobs, verified from the registry before they succeed. Errors are application/problem+json with a stable code."
    ),
    modifiers(&Bearer),
    components(schemas(crate::problem::ProblemBody))
)]
struct ApiDoc;

/// The router and the OpenAPI document made from the same handlers (so
/// the document cannot drift from what is served).
pub fn router_and_openapi(shared: Arc<Shared>) -> (axum::Router, utoipa::openapi::OpenApi) {
    let (open, guarded) = handlers();
    let guarded = guarded.route_layer(axum::middleware::from_fn_with_state(shared.clone(), auth));
    let (router, api) = open.merge(guarded).split_for_parts();
    let doc = serde_json::to_vec(&api).unwrap_or_default();
    let router = router
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move { ([(header::CONTENT_TYPE, "application/json")], doc) }
            }),
        )
        .fallback(|| async {
            Problem::new(StatusCode::NOT_FOUND, "route-not-found", "no such route")
        })
        .layer(axum::extract::DefaultBodyLimit::max(shared.config.max_body))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(shared);
    (router, api)
}

type Routes = utoipa_axum::router::OpenApiRouter<Arc<Shared>>;

/// The open handlers and the guarded ones (bearer token), with their
/// OpenAPI paths.
fn handlers() -> (Routes, Routes) {
    use utoipa::OpenApi as _;
    use utoipa_axum::routes;
    let open = Routes::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(readyz));
    let guarded = Routes::new()
        .routes(routes!(metrics))
        .routes(routes!(formats))
        .routes(routes!(create, list))
        .routes(routes!(show, cancel))
        .routes(routes!(create_template, list_templates))
        .routes(routes!(show_template, cancel_template));
    (open, guarded)
}

/// The router.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    router_and_openapi(shared).0
}

/// The process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "the process answers", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Every request gets an id (answered as `X-Request-Id`) and one log
/// line: id, method, path, status, time. Headers (tokens) are never
/// logged. Probes and scrapes log at debug.
async fn log_request(req: Request, next: Next) -> Response {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = std::time::Instant::now();
    let mut resp = next.run(req).await;
    let (status, ms) = (resp.status().as_u16(), t0.elapsed().as_secs_f64() * 1e3);
    let probe = method == axum::http::Method::GET
        && ["/healthz", "/readyz", "/metrics"].contains(&path.as_str());
    if probe {
        tracing::debug!("request {id}: {method} {path} -> {status} ({ms:.1} ms)");
    } else {
        tracing::info!("request {id}: {method} {path} -> {status} ({ms:.1} ms)");
    }
    resp.headers_mut()
        .insert("x-request-id", HeaderValue::from(id));
    resp
}

async fn auth(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if !s.tokens.accepts(h) {
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer TOKEN)",
        )
        .into_response();
    }
    next.run(req).await
}

/// Ready for jobs: the store is writable, has `min_free` bytes free, the
/// queue is not full, the service is not stopping.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses(
    (status = 200, description = "ready; the checks", body = Object),
    (status = 503, description = "not ready; the checks", body = Object)))]
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

/// Every format: `supported`, `deprecated` or `removed`.
#[utoipa::path(get, path = "/v1/formats", tag = "conversions", security(("bearer" = [])), responses(
    (status = 200, description = "`{formats: [{name, status, lazy?, media_type?, reason?}]}`", body = Object),
    (status = 401, description = "no valid token", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
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
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversionBody {
    /// `HOST/REPO:TAG` or `HOST/REPO@sha256:...` on an allowed registry.
    source: String,
    /// `zstd:chunked` or `zstd` (`GET /v1/formats`).
    format: String,
    /// `none`, `list` (with `prefetch_list`) or `optimize` (a list
    /// recorded by running the image).
    #[serde(default)]
    prefetch: Option<Prefetch>,
    /// Absolute paths a lazy mount fetches first, placed first.
    #[serde(default)]
    prefetch_list: Option<Vec<String>>,
    /// `HOST/REPO[:TAG]`; the source's repository when not given. A tag
    /// is written last, after verification.
    #[serde(default)]
    target: Option<String>,
    /// With `prefetch: optimize`: the command to record (the config's
    /// entrypoint and cmd by default) and how long it may run (60 s).
    #[serde(default)]
    optimize: Option<crate::jobs::Optimize>,
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

/// Ask for a conversion.
#[utoipa::path(post, path = "/v1/conversions", tag = "conversions", security(("bearer" = [])),
    request_body = ConversionBody,
    responses(
        (status = 200, description = "a finished identical job, or one found converted in the registry", body = Job),
        (status = 202, description = "a new job or one in flight; `Location` names it", body = Job),
        (status = 400, description = "invalid-request", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "registry-not-allowed, optimize-disabled", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "source-not-found", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 410, description = "format-removed, with `fallback.source_digest`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 413, description = "body-too-large", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 415, description = "unsupported-media-type", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "format-unknown (with `fallback.source_digest`), source-unsupported", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "queue-full, with `Retry-After`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "source-unavailable", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "shutting-down", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
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

/// A request body, or the problem with it; 503 while stopping.
fn body_of<T>(s: &Shared, body: Result<Json<T>, JsonRejection>) -> Result<T, Problem> {
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
    Ok(b)
}

/// Resolve `source` (as the caller wrote it: `text`) to one manifest, once.
async fn resolve(
    s: &Arc<Shared>,
    source: &ImageRef,
    text: &str,
) -> Result<strata_oci::ResolvedImage, Problem> {
    let reg = s.registry.clone();
    let src = source.clone();
    tokio::task::spawn_blocking(move || {
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
        Problem::new(status, code, format!("resolving {text}: {e}"))
    })
}

async fn admit(
    s: &Arc<Shared>,
    body: Result<Json<ConversionBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(s, body)?;
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
        Prefetch::Optimize if !list.is_empty() => {
            return Err(bad(
                "prefetch \"optimize\" records its own list: no prefetch_list",
            ));
        }
        _ => {}
    }
    let optimize = match (prefetch, b.optimize) {
        (Prefetch::Optimize, _) if !s.config.allow_optimize => {
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "optimize-disabled",
                "prefetch \"optimize\" runs the image's code: this service is not configured to (allow_optimize)",
            ));
        }
        (Prefetch::Optimize, o) => {
            let o = o.unwrap_or(crate::jobs::Optimize {
                cmd: Vec::new(),
                timeout_s: 60,
            });
            if !(1..=600).contains(&o.timeout_s) || o.cmd.len() > 256 {
                return Err(bad(
                    "optimize: timeout_s from 1 to 600, at most 256 cmd words",
                ));
            }
            Some(o)
        }
        (_, Some(_)) => return Err(bad("optimize is given but prefetch is not \"optimize\"")),
        (_, None) => None,
    };
    if list.len() > 100_000 || list.iter().any(|p| !p.starts_with('/') || p.len() > 4096) {
        return Err(bad(
            "prefetch_list: at most 100000 absolute paths of at most 4096 bytes",
        ));
    }

    // the tag names a digest now, once: the job converts that
    let resolved = resolve(s, &source, &b.source).await?;
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
        optimize,
    };
    let key = crate::jobs::key(&resolved.manifest_digest, &request);
    let source = Source {
        reference: b.source.clone(),
        repository,
        digest,
        manifest_digest: resolved.manifest_digest,
    };
    let mut template = Job::queued("conversion", key, source, request, None);
    if deprecated {
        template.warnings.push("format-deprecated".into());
    }
    // not here: maybe converted by another instance (its deterministic tag)
    let known = s.lock().by_key.contains_key(&template.key);
    if !known {
        let (s2, t2) = (s.clone(), template.clone());
        if let Ok(Some(hit)) = tokio::task::spawn_blocking(move || s2.registry_hit(&t2)).await {
            let job = s.record_done(hit);
            return Ok(job_response(StatusCode::OK, &job, deprecated));
        }
    }
    admit_job(s, template)
}

/// Admit `template` (a new job's record): the same finished job (200),
/// the same job in flight or a new one (202), or why not.
fn admit_job(s: &Shared, template: Job) -> Result<Response, Problem> {
    let deprecated = template.warnings.iter().any(|w| w == "format-deprecated");
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
            tracing::info!("POST: 202 {}", job.id);
            job_response(StatusCode::ACCEPTED, &job, deprecated)
        }
    })
}

fn job_response(status: StatusCode, job: &Job, deprecated: bool) -> Response {
    let mut r = (status, Json(job)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("{}/{}", collection(&job.kind), job.id)) {
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

/// A job.
#[utoipa::path(get, path = "/v1/conversions/{id}", tag = "conversions", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job id")),
    responses(
        (status = 200, description = "the job", body = Job),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "job-not-found", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn show(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    show_kind(&s, "conversion", &id)
}

fn show_kind(s: &Shared, kind: &str, id: &str) -> Response {
    match s.lock().jobs.get(id).filter(|j| j.kind == kind) {
        Some(j) => Json(j).into_response(),
        None => no_job(id).into_response(),
    }
}

/// Where jobs of `kind` live.
fn collection(kind: &str) -> &'static str {
    if kind == "template" {
        "/v1/templates"
    } else {
        "/v1/conversions"
    }
}

/// `GET /v1/conversions` query.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// The source as given, its digest, its manifest digest or `HOST/REPO@DIGEST`.
    source: Option<String>,
    /// Only jobs in this state.
    state: Option<String>,
    /// At most this many (100; at most 1000).
    limit: Option<usize>,
}

/// Jobs, newest first.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JobList {
    jobs: Vec<Job>,
}

/// Jobs, newest first; no network call.
#[utoipa::path(get, path = "/v1/conversions", tag = "conversions", security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "the jobs", body = JobList),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn list(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    list_kind(&s, "conversion", &q)
}

fn list_kind(s: &Shared, kind: &str, q: &ListQuery) -> Response {
    let t = s.lock();
    let mut jobs: Vec<&Job> = t
        .jobs
        .values()
        .filter(|j| j.kind == kind)
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
    let jobs = jobs.into_iter().cloned().collect();
    Json(JobList { jobs }).into_response()
}

/// Cancel a job: a queued one at once, a running one at its next step;
/// nothing is tagged.
#[utoipa::path(delete, path = "/v1/conversions/{id}", tag = "conversions", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job id")),
    responses(
        (status = 200, description = "it was queued: cancelled", body = Job),
        (status = 202, description = "it runs: `cancel_requested`, cancelled at its next step", body = Job),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "job-not-found", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "job-finished, or too-late (its tags are being written)", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn cancel(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    cancel_kind(&s, "conversion", &id)
}

fn cancel_kind(s: &Shared, kind: &str, id: &str) -> Response {
    if s.lock().jobs.get(id).is_none_or(|j| j.kind != kind) {
        return no_job(id).into_response();
    }
    match s.cancel(id) {
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
        CancelOutcome::NotFound => no_job(id).into_response(),
    }
}

/// `POST /v1/templates` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateBody {
    /// What to build from: exactly one of them.
    from: TemplateFrom,
    /// `"2GiB"`, `"64MiB"` or bytes: the ext4's exact size.
    #[schema(value_type = String, example = "2GiB")]
    size: serde_json::Value,
    /// `HOST/REPO:TAG` (an allowed registry) to push the template to once
    /// it is checked.
    #[serde(default)]
    push: Option<String>,
    /// Images (on allowed registries) whose trees are laid over the
    /// template, in order: `[{"image": REF}]`, at most 16.
    #[serde(default)]
    add: Vec<TemplateAdd>,
}

/// An image laid over a template.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateAdd {
    /// `HOST/REPO:TAG` or `HOST/REPO@DIGEST`.
    image: String,
}

/// What a template is built from.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateFrom {
    /// An image: `HOST/REPO:TAG` or `HOST/REPO@DIGEST` on an allowed registry.
    #[serde(default)]
    image: Option<String>,
    /// A template in the service's store: its name or id.
    #[serde(default)]
    template: Option<String>,
}

/// Build a VM template (ext4 of an exact size) from an image or a
/// template; an identical request is answered from the finished job.
#[utoipa::path(post, path = "/v1/templates", tag = "templates", security(("bearer" = [])),
    request_body = TemplateBody,
    responses(
        (status = 200, description = "a finished identical job", body = Job),
        (status = 202, description = "a new job or one in flight; `Location` names it", body = Job),
        (status = 400, description = "invalid-request", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "registry-not-allowed", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "source-not-found, template-not-found", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "queue-full, with `Retry-After`", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 502, description = "source-unavailable", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn create_template(
    State(s): State<Arc<Shared>>,
    body: Result<Json<TemplateBody>, JsonRejection>,
) -> Response {
    match admit_template(&s, body).await {
        Ok(r) => r,
        Err(p) => {
            tracing::info!("POST /v1/templates: {} {}", p.status.as_u16(), p.code);
            p.into_response()
        }
    }
}

async fn admit_template(
    s: &Arc<Shared>,
    body: Result<Json<TemplateBody>, JsonRejection>,
) -> Result<Response, Problem> {
    let b = body_of(s, body)?;
    let size = match &b.size {
        serde_json::Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| bad("size: a whole number of bytes"))
            .and_then(|v| {
                strata_block::parse_size(&v.to_string()).map_err(|e| bad(format!("size: {e}")))
            }),
        serde_json::Value::String(t) => {
            strata_block::parse_size(t).map_err(|e| bad(format!("size: {e}")))
        }
        _ => Err(bad("size: \"2GiB\" or a number of bytes")),
    }?;
    let push = match &b.push {
        Some(p) => {
            let r = allowed_ref(s, "push", p)?;
            if !matches!(
                &r,
                ImageRef::Docker {
                    tag: Some(_),
                    digest: None,
                    ..
                }
            ) {
                return Err(bad("push names HOST/REPO:TAG"));
            }
            Some(r.to_string().trim_start_matches("docker://").to_string())
        }
        None => None,
    };
    let (kind, source) = match (&b.from.image, &b.from.template) {
        (Some(image), None) => {
            let r = allowed_ref(s, "image", image)?;
            let resolved = resolve(s, &r, image).await?;
            let source = Source {
                reference: image.clone(),
                repository: target_repository(&r),
                digest: resolved.index_digest.unwrap_or(resolved.manifest_digest),
                manifest_digest: resolved.manifest_digest,
            };
            ("image", source)
        }
        (None, Some(t)) => {
            let id = s.store.resolve_template(t).map_err(|e| {
                Problem::new(
                    StatusCode::NOT_FOUND,
                    "template-not-found",
                    format!("template {t:?}: {e}"),
                )
            })?;
            let source = Source {
                reference: t.clone(),
                repository: String::new(),
                digest: id,
                manifest_digest: id,
            };
            ("template", source)
        }
        _ => return Err(bad("from names exactly one of image and template")),
    };
    if b.add.len() > 16 {
        return Err(bad("add: at most 16 images"));
    }
    let mut add = Vec::new();
    for a in &b.add {
        let r = allowed_ref(s, "add", &a.image)?;
        let resolved = resolve(s, &r, &a.image).await?;
        add.push(Source {
            reference: a.image.clone(),
            repository: target_repository(&r),
            digest: resolved.index_digest.unwrap_or(resolved.manifest_digest),
            manifest_digest: resolved.manifest_digest,
        });
    }
    let spec = crate::jobs::TemplateSpec {
        from: kind.into(),
        size,
        push: push.clone(),
        add,
    };
    let key = crate::jobs::template_key(&source.manifest_digest, &spec);
    let request = JobRequest {
        format: "ext4".into(),
        prefetch: Prefetch::None,
        prefetch_list: Vec::new(),
        target: push.unwrap_or_default(),
        optimize: None,
    };
    let job = Job::queued("template", key, source, request, Some(spec));
    admit_job(s, job)
}

/// A template job.
#[utoipa::path(get, path = "/v1/templates/{id}", tag = "templates", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job id")),
    responses(
        (status = 200, description = "the job; `result.digest` is the template id", body = Job),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "job-not-found", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn show_template(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    show_kind(&s, "template", &id)
}

/// Template jobs, newest first (`source`: the image or template built from).
#[utoipa::path(get, path = "/v1/templates", tag = "templates", security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "the jobs", body = JobList),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn list_templates(State(s): State<Arc<Shared>>, Query(q): Query<ListQuery>) -> Response {
    list_kind(&s, "template", &q)
}

/// Cancel a template job (as for conversions).
#[utoipa::path(delete, path = "/v1/templates/{id}", tag = "templates", security(("bearer" = [])),
    params(("id" = String, Path, description = "the job id")),
    responses(
        (status = 200, description = "it was queued: cancelled", body = Job),
        (status = 202, description = "it runs: cancelled at its next step", body = Job),
        (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "job-not-found", body = crate::problem::ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "job-finished, or too-late (it is being pushed)", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
async fn cancel_template(State(s): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    cancel_kind(&s, "template", &id)
}

/// Prometheus text: jobs by state, queue depth, conversions started,
/// registry cache hits, bytes converted, verification failures by check,
/// seconds by phase (failures included).
#[utoipa::path(get, path = "/metrics", tag = "operations", security(("bearer" = [])), responses(
    (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
    (status = 401, description = "unauthorized", body = crate::problem::ProblemBody, content_type = "application/problem+json")))]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let (open, guarded) = handlers();
        let api = open.merge(guarded).into_openapi();
        let doc = serde_json::to_value(&api).unwrap();
        let mut listed: Vec<String> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .unwrap()
                    .keys()
                    .filter(|m| ["get", "post", "delete", "put", "patch"].contains(&m.as_str()))
                    .map(move |m| format!("{} {path}", m.to_uppercase()))
            })
            .collect();
        listed.sort();
        let mut routes: Vec<String> = ROUTES.iter().map(|r| r.to_string()).collect();
        routes.sort();
        assert_eq!(listed, routes);
        assert!(
            doc["components"]["securitySchemes"]["bearer"].is_object(),
            "{doc}"
        );
        assert!(doc["components"]["schemas"]["Job"].is_object(), "{doc}");
    }
}
