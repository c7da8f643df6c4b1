//! The registry client (OCI distribution spec, blocking).
//!
//! - Every manifest request sends `Accept` with all four manifest types
//!   (Debian's docker-registry answers 404 for OCI manifests otherwise).
//! - Auth: anonymous first; a 401 challenge `Basic` or `Bearer realm=…`
//!   is answered with credentials from the auth files (token fetched from
//!   the realm and cached). Credentials and tokens never appear in errors,
//!   logs or `Debug` output.
//! - Retries: connection failures and 5xx are retried with exponential
//!   backoff (200 ms, x2, 5 attempts). A blob stream that breaks mid-way is
//!   resumed with `Range: bytes=N-` from the byte it reached; a registry
//!   that ignores Range (200) is skipped forward instead.
//! - Pushing ([`RegistryPusher`]): `HEAD` a blob first and skip it when the
//!   registry has it; otherwise `POST /blobs/uploads/` and one monolithic
//!   `PUT <Location>?digest=…` (a failed PUT restarts the upload session);
//!   manifests are `PUT` with their exact bytes and the returned
//!   `Docker-Content-Digest` is checked. Tokens are asked for
//!   `repository:REPO:pull,push`.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use reqwest::blocking::{Body, Client, Response};
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, LOCATION, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use strata_digest::Digest;

use crate::manifest::{ACCEPT_MANIFESTS, Document, parse_document, pick_platform};
use crate::{
    Descriptor, ImageRef, ImageSource, OciError, Platform, RegistryOptions, ResolvedImage, verify,
};

/// Attempts per request (and per blob stream) before giving up.
const ATTEMPTS: u32 = 5;
/// How long one send or one body read may wait for the registry.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Username and password for one registry. `Debug` redacts.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
    /// Which file they came from (safe to show).
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Credentials {{ user: <redacted>, password: <redacted>, source: {:?} }}",
            self.source
        )
    }
}

/// Find credentials for `host` in the usual auth files, in order:
/// `explicit`, `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`,
/// `~/.docker/config.json`.
pub fn find_credentials(host: &str, explicit: Option<&PathBuf>) -> Option<Credentials> {
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        files.push(p.clone());
    }
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        files.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        files.push(PathBuf::from(p).join("containers/auth.json"));
    }
    if let Some(p) = std::env::var_os("HOME") {
        files.push(PathBuf::from(p).join(".docker/config.json"));
    }
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
            continue;
        };
        for (key, entry) in auths {
            let k = key
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            let k = k.split('/').next().unwrap_or(k);
            let matches = k == host
                || (host == "docker.io" && (k == "index.docker.io" || k == "registry-1.docker.io"));
            if !matches {
                continue;
            }
            let (user, password) = if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
                let Ok(dec) = base64::engine::general_purpose::STANDARD.decode(a) else {
                    continue;
                };
                let Ok(s) = String::from_utf8(dec) else {
                    continue;
                };
                let Some((u, p)) = s.split_once(':') else {
                    continue;
                };
                (u.to_string(), p.to_string())
            } else {
                let u = entry.get("username").and_then(|x| x.as_str());
                let p = entry.get("password").and_then(|x| x.as_str());
                match (u, p) {
                    (Some(u), Some(p)) => (u.to_string(), p.to_string()),
                    _ => continue,
                }
            };
            return Some(Credentials {
                user,
                password,
                source: f.display().to_string(),
            });
        }
    }
    None
}

/// How requests are authorized once a challenge was answered. `Debug` is
/// not derived: the token must never be printed.
#[derive(Clone)]
enum Authz {
    None,
    Basic,
    /// A bearer token for the scope it was issued for.
    Bearer(String),
}

/// Bearer tokens by scope (`repository:NAME:pull`). A source serves one
/// repository, so in practice this holds one token; keying by scope keeps
/// a token from being reused for a scope it was not issued for.
#[derive(Default)]
struct TokenCache {
    by_scope: HashMap<String, String>,
}

struct Inner {
    client: Client,
    base: String,
    host: String,
    repository: String,
    creds: Option<Credentials>,
    authz: Mutex<Authz>,
    tokens: Mutex<TokenCache>,
    /// Set once the registry refused a multi-range request.
    single_ranges: std::sync::atomic::AtomicBool,
    /// A push client: bearer tokens are asked for `pull,push`.
    push: bool,
    /// The client's stall timeout.
    stall: Duration,
}

/// One request for [`Inner::execute`].
struct Call<'a> {
    method: Method,
    url: &'a str,
    headers: HeaderMap,
    /// Makes the body afresh for every attempt (a file is reopened).
    body: Option<&'a (dyn Fn() -> Result<Body, OciError> + 'a)>,
    /// Overrides the client's stall timeout (an upload's send lasts as
    /// long as its body).
    timeout: Option<Duration>,
    /// Attempts for connection failures and 5xx answers.
    attempts: u32,
    /// Statuses handed back as answers besides 2xx (e.g. 404 for HEAD).
    also_ok: &'a [StatusCode],
}

/// A source backed by a registry.
pub struct RegistrySource {
    inner: Arc<Inner>,
    reference: ImageRef,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl RegistrySource {
    /// Prepare a client for `reference` (a `docker://` reference).
    pub fn new(reference: ImageRef, opts: &RegistryOptions) -> Result<Self, OciError> {
        let ImageRef::Docker {
            registry,
            repository,
            tag,
            digest,
        } = &reference
        else {
            return Err(OciError::Reference {
                input: reference.to_string(),
                reason: "not a docker:// reference".into(),
            });
        };
        Ok(RegistrySource {
            inner: Arc::new(Inner::new(registry, repository, opts, false)?),
            tag: tag.clone(),
            digest: *digest,
            reference,
        })
    }
}

impl Inner {
    /// A client for `repository` on `registry` (`host[:port]`).
    fn new(
        registry: &str,
        repository: &str,
        opts: &RegistryOptions,
        push: bool,
    ) -> Result<Inner, OciError> {
        let plain = opts.plain_http || opts.insecure_registries.iter().any(|h| h == registry);
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let base = format!("{}://{host}", if plain { "http" } else { "https" });
        let ua = if opts.user_agent.is_empty() {
            "strata".to_string()
        } else {
            opts.user_agent.clone()
        };
        let stall = opts.stall_timeout.unwrap_or(STALL_TIMEOUT);
        let client = Client::builder()
            .user_agent(ua)
            .connect_timeout(Duration::from_secs(10))
            // blocking reqwest applies this to each send and each body read,
            // so it bounds a stall, not a download; a stalled blob read is
            // then resumed with Range like a dropped connection
            .timeout(stall)
            .build()
            .map_err(|e| OciError::Network {
                action: format!("setting up HTTP client for {registry}"),
                reason: e.to_string(),
            })?;
        Ok(Inner {
            client,
            base,
            host: registry.to_string(),
            repository: repository.to_string(),
            creds: find_credentials(registry, opts.auth_file.as_ref()),
            authz: Mutex::new(Authz::None),
            tokens: Mutex::new(TokenCache::default()),
            single_ranges: std::sync::atomic::AtomicBool::new(false),
            push,
            stall,
        })
    }

    fn creds_source(&self) -> String {
        self.creds.as_ref().map_or_else(
            || "no credentials found".to_string(),
            |c| format!("credentials from {}", c.source),
        )
    }

    /// Send a GET with retries and auth. Returns the response with a
    /// success (2xx) status, or an error naming `action`.
    fn get(&self, url: &str, headers: &HeaderMap, action: &str) -> Result<Response, OciError> {
        let call = Call {
            method: Method::GET,
            url,
            headers: headers.clone(),
            body: None,
            timeout: None,
            attempts: ATTEMPTS,
            also_ok: &[],
        };
        self.execute(&call, action)
    }

    /// Whether `url` is on this registry (credentials go nowhere else).
    fn same_origin(&self, url: &str) -> bool {
        url.strip_prefix(self.base.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Send a request with retries and auth: connection failures and 5xx
    /// answers are retried (`call.attempts` in all, backoff from 200 ms,
    /// doubling), a 401 is answered once with credentials. Returns the
    /// response when its status is 2xx or in `call.also_ok`, else an error
    /// naming `action`, the status and the registry's error.
    fn execute(&self, call: &Call<'_>, action: &str) -> Result<Response, OciError> {
        let mut delay = Duration::from_millis(200);
        let mut authed_once = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = self
                .client
                .request(call.method.clone(), call.url)
                .headers(call.headers.clone());
            if let Some(t) = call.timeout {
                req = req.timeout(t);
            }
            if let Some(make) = call.body {
                req = req.body(make()?);
            }
            if self.same_origin(call.url) {
                req = match self.authz.lock().expect("no panics while held").clone() {
                    Authz::None => req,
                    Authz::Basic => match &self.creds {
                        Some(c) => req.basic_auth(&c.user, Some(&c.password)),
                        None => req,
                    },
                    Authz::Bearer(t) => req.bearer_auth(t),
                };
            }
            let resp = match req.send() {
                Ok(r) => r,
                Err(e) => {
                    if attempt < call.attempts {
                        std::thread::sleep(delay);
                        delay *= 2;
                        continue;
                    }
                    // an upload URL's query is the registry's session
                    // state: not for messages
                    let e = if call.url.contains('?') {
                        e.without_url()
                    } else {
                        e
                    };
                    return Err(OciError::Network {
                        action: action.to_string(),
                        reason: error_chain(&e),
                    });
                }
            };
            let status = resp.status();
            if status.is_success() || call.also_ok.contains(&status) {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED {
                if authed_once {
                    return Err(OciError::Auth {
                        action: action.to_string(),
                        host: self.host.clone(),
                        source_of_creds: self.creds_source(),
                    });
                }
                authed_once = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.authenticate(&challenge, action)?;
                // an authentication round is not a failed attempt
                attempt -= 1;
                continue;
            }
            if status.is_server_error() && attempt < call.attempts {
                std::thread::sleep(delay);
                delay *= 2;
                continue;
            }
            let detail = error_detail(resp);
            return Err(OciError::Registry {
                action: action.to_string(),
                status: status.as_u16(),
                detail,
            });
        }
    }

    fn authenticate(&self, challenge: &str, action: &str) -> Result<(), OciError> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let auth_err = || OciError::Auth {
            action: action.to_string(),
            host: self.host.clone(),
            source_of_creds: self.creds_source(),
        };
        if scheme.eq_ignore_ascii_case("basic") {
            if self.creds.is_none() {
                return Err(auth_err());
            }
            *self.authz.lock().expect("no panics while held") = Authz::Basic;
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(auth_err());
        }
        let params = parse_challenge(params);
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(auth_err)?;
        let mut query: Vec<(String, String)> = Vec::new();
        if let Some((_, s)) = params.iter().find(|(k, _)| k == "service") {
            query.push(("service".into(), s.clone()));
        }
        // A push client asks for pull and push whatever the challenge
        // names (a HEAD is challenged for pull only), so one token serves
        // the whole push.
        let scope = if self.push {
            format!("repository:{}:pull,push", self.repository)
        } else {
            params
                .iter()
                .find(|(k, _)| k == "scope")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| format!("repository:{}:pull", self.repository))
        };
        query.push(("scope".into(), scope.clone()));
        let stale = match &*self.authz.lock().expect("no panics while held") {
            Authz::Bearer(t) => Some(t.clone()),
            _ => None,
        };
        {
            // a cached token for this scope that we have not just been
            // refused with: use it without asking the realm again
            let mut cache = self.tokens.lock().expect("no panics while held");
            match cache.by_scope.get(&scope) {
                Some(t) if Some(t) != stale.as_ref() => {
                    *self.authz.lock().expect("no panics while held") = Authz::Bearer(t.clone());
                    return Ok(());
                }
                Some(_) => {
                    cache.by_scope.remove(&scope);
                }
                None => {}
            }
        }
        let qs: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", url_encode(v)))
            .collect();
        let sep = if realm.contains('?') { '&' } else { '?' };
        let mut req = self.client.get(format!("{realm}{sep}{}", qs.join("&")));
        if let Some(c) = &self.creds {
            req = req.basic_auth(&c.user, Some(&c.password));
        }
        let resp = req.send().map_err(|e| OciError::Network {
            action: format!("{action}: fetching a token from {realm}"),
            reason: error_chain(&e),
        })?;
        if !resp.status().is_success() {
            return Err(auth_err());
        }
        let body = resp.bytes().map_err(|_| auth_err())?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|_| auth_err())?;
        let token = v
            .get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .ok_or_else(auth_err)?;
        self.tokens
            .lock()
            .expect("no panics while held")
            .by_scope
            .insert(scope, token.to_string());
        *self.authz.lock().expect("no panics while held") = Authz::Bearer(token.to_string());
        Ok(())
    }

    /// GET a manifest by tag or digest: its bytes, `Content-Type`, and the
    /// `Docker-Content-Digest` the registry claims, checked against the
    /// bytes when it is a digest we can compute.
    fn fetch_manifest(
        &self,
        reference: &str,
        what: &str,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repository);
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, ACCEPT_MANIFESTS.parse().expect("static header"));
        let action = format!("fetching manifest {what}");
        let (bytes, headers) = self.get_bytes(&url, &h, &action)?;
        let ct = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.to_string());
        // Only sha256 digests parse; anything else we cannot check.
        let claimed_digest: Option<Digest> = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        if bytes.len() > 16 << 20 {
            return Err(OciError::Format {
                what: format!("fetching manifest {what}"),
                reason: "larger than 16 MiB".into(),
            });
        }
        if let Some(claimed) = claimed_digest {
            verify(
                &format!("fetching manifest {what} (checking Docker-Content-Digest)"),
                &bytes,
                &claimed,
            )?;
        }
        Ok((bytes, ct))
    }

    /// GET a small document (manifest, config) whole, retrying when the
    /// body breaks off like [`get`](Self::get) retries failed requests.
    fn get_bytes(
        &self,
        url: &str,
        headers: &HeaderMap,
        action: &str,
    ) -> Result<(Vec<u8>, HeaderMap), OciError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let resp = self.get(url, headers, action)?;
            let response_headers = resp.headers().clone();
            match resp.bytes() {
                Ok(b) => return Ok((b.to_vec(), response_headers)),
                Err(_) if attempt < ATTEMPTS => {
                    attempt += 1;
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => {
                    return Err(OciError::Network {
                        action: action.to_string(),
                        reason: error_chain(&e),
                    });
                }
            }
        }
    }

    fn blob_action(&self, d: &Digest) -> String {
        format!("fetching blob {d} from {}/{}", self.host, self.repository)
    }

    fn blob_url(&self, d: &Digest) -> String {
        format!("{}/v2/{}/blobs/{d}", self.base, self.repository)
    }
}

/// What a blob upload sends.
#[derive(Debug, Clone, Copy)]
pub enum BlobContent<'a> {
    /// Bytes in memory (a config).
    Bytes(&'a [u8]),
    /// A file, streamed (reopened for every attempt).
    File(&'a Path),
}

/// A client that pushes blobs and manifests to one repository of a
/// registry (OCI distribution spec). Same auth, retries and TLS choice as
/// [`RegistrySource`]; bearer tokens are asked for
/// `repository:REPO:pull,push`.
pub struct RegistryPusher {
    inner: Inner,
}

/// Send rate below which an upload is taken for stalled: a blob PUT may
/// take its stall timeout plus its size at this rate.
const MIN_UPLOAD_RATE: u64 = 256 * 1024;

impl RegistryPusher {
    /// A pusher for the repository of `reference` (a `docker://`
    /// reference; its tag or digest is not used here).
    pub fn new(reference: &ImageRef, opts: &RegistryOptions) -> Result<Self, OciError> {
        let ImageRef::Docker {
            registry,
            repository,
            ..
        } = reference
        else {
            return Err(OciError::Reference {
                input: reference.to_string(),
                reason: "not a docker:// reference".into(),
            });
        };
        Ok(RegistryPusher {
            inner: Inner::new(registry, repository, opts, true)?,
        })
    }

    /// `host[:port]/repository`, for messages.
    pub fn target(&self) -> String {
        format!("{}/{}", self.inner.host, self.inner.repository)
    }

    /// `GET /v2/`: the registry answers (and accepts our credentials for a
    /// push, when it asks for them).
    pub fn ping(&self) -> Result<(), OciError> {
        let url = format!("{}/v2/", self.inner.base);
        let action = format!("reaching registry {} (GET /v2/)", self.inner.host);
        self.inner.get(&url, &HeaderMap::new(), &action)?;
        Ok(())
    }

    /// `HEAD /v2/REPO/blobs/DIGEST`: whether the repository has the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, OciError> {
        let url = self.inner.blob_url(digest);
        let action = format!("checking for blob {digest} in {}", self.target());
        let call = Call {
            method: Method::HEAD,
            url: &url,
            headers: HeaderMap::new(),
            body: None,
            timeout: None,
            attempts: ATTEMPTS,
            also_ok: &[StatusCode::NOT_FOUND],
        };
        let resp = self.inner.execute(&call, &action)?;
        Ok(resp.status() == StatusCode::OK)
    }

    /// Upload blob `digest` of `size` bytes: `POST /v2/REPO/blobs/uploads/`
    /// then one `PUT <Location>?digest=DIGEST` with all the bytes, which
    /// must be answered 201. A PUT that fails with a connection error or a
    /// 5xx starts again from a new upload session (5 attempts in all).
    pub fn upload_blob(
        &self,
        digest: &Digest,
        size: u64,
        content: BlobContent<'_>,
    ) -> Result<(), OciError> {
        let action = format!("uploading blob {digest} to {}", self.target());
        let post_url = format!(
            "{}/v2/{}/blobs/uploads/",
            self.inner.base, self.inner.repository
        );
        let make_body = || -> Result<Body, OciError> {
            Ok(match content {
                BlobContent::Bytes(b) => Body::from(b.to_vec()),
                BlobContent::File(p) => {
                    let f =
                        std::fs::File::open(p).map_err(crate::io_err("opening staged blob", p))?;
                    Body::sized(f, size)
                }
            })
        };
        let mut put_headers = HeaderMap::new();
        put_headers.insert(
            CONTENT_TYPE,
            "application/octet-stream".parse().expect("static header"),
        );
        // the send of a PUT lasts as long as its body: the stall timeout
        // alone would cut large blobs off
        let put_timeout = self.inner.stall + Duration::from_secs(size / MIN_UPLOAD_RATE);
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let start = Call {
                method: Method::POST,
                url: &post_url,
                headers: HeaderMap::new(),
                body: None,
                timeout: None,
                attempts: ATTEMPTS,
                also_ok: &[],
            };
            let resp = self
                .inner
                .execute(&start, &format!("{action}: starting an upload (POST)"))?;
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| OciError::Format {
                    what: format!("{action}: starting an upload (POST)"),
                    reason: format!(
                        "the registry answered {} without a Location header",
                        resp.status().as_u16()
                    ),
                })?;
            let put_url =
                upload_url(&post_url, &location, digest).map_err(|reason| OciError::Format {
                    what: format!("{action}: starting an upload (POST)"),
                    reason,
                })?;
            let put = Call {
                method: Method::PUT,
                url: &put_url,
                headers: put_headers.clone(),
                body: Some(&make_body),
                timeout: Some(put_timeout),
                // retried below from a new session: the old one may be gone
                attempts: 1,
                also_ok: &[],
            };
            let put_action = format!("{action}: sending {size} bytes (PUT)");
            match self.inner.execute(&put, &put_action) {
                Ok(resp) if resp.status() == StatusCode::CREATED => return Ok(()),
                Ok(resp) => {
                    return Err(OciError::Registry {
                        action: put_action,
                        status: resp.status().as_u16(),
                        detail: " instead of 201 Created".into(),
                    });
                }
                Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `PUT /v2/REPO/manifests/REFERENCE` with the exact `bytes` as
    /// `media_type`. Returns the manifest's digest; a `Docker-Content-Digest`
    /// answer that is not the sha256 of `bytes` is an error.
    pub fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, OciError> {
        let digest = Digest::sha256_of(bytes);
        let action = format!("pushing manifest {digest} to {}:{reference}", self.target());
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.inner.base, self.inner.repository
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            media_type.parse().map_err(|_| OciError::Format {
                what: action.clone(),
                reason: format!("media type {media_type:?} is not a valid header value"),
            })?,
        );
        let make_body = || -> Result<Body, OciError> { Ok(Body::from(bytes.to_vec())) };
        let call = Call {
            method: Method::PUT,
            url: &url,
            headers,
            body: Some(&make_body),
            timeout: None,
            attempts: ATTEMPTS,
            also_ok: &[],
        };
        let resp = self.inner.execute(&call, &action)?;
        if resp.status() != StatusCode::CREATED {
            return Err(OciError::Registry {
                action,
                status: resp.status().as_u16(),
                detail: " instead of 201 Created".into(),
            });
        }
        if let Some(claimed) = resp
            .headers()
            .get("docker-content-digest")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            && claimed != digest.to_string()
        {
            return Err(OciError::Format {
                what: action,
                reason: format!(
                    "the registry answered Docker-Content-Digest {}, but the manifest sent is {digest}",
                    one_line(&claimed, 100)
                ),
            });
        }
        Ok(digest)
    }
}

/// Errors worth a new upload session: the connection failed or the
/// registry had a server error.
fn retryable(e: &OciError) -> bool {
    match e {
        OciError::Network { .. } => true,
        OciError::Registry { status, .. } => *status >= 500,
        _ => false,
    }
}

/// The PUT URL of an upload: `location` (absolute, or relative to the
/// POST's URL) with `digest=DIGEST` added to its query.
fn upload_url(post_url: &str, location: &str, digest: &Digest) -> Result<String, String> {
    let base = reqwest::Url::parse(post_url).map_err(|e| format!("bad URL {post_url}: {e}"))?;
    let mut url = base
        .join(location.trim())
        .map_err(|e| format!("the registry answered an unusable Location ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the registry answered a Location with scheme {:?}",
            url.scheme()
        ));
    }
    url.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    Ok(url.into())
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches(',').trim();
        out.push((key, value));
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn error_detail(resp: Response) -> String {
    let body = resp.text().unwrap_or_default();
    let v: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    if let Some(errs) = v
        .as_ref()
        .and_then(|v| v.get("errors"))
        .and_then(|e| e.as_array())
        && let Some(first) = errs.first()
    {
        let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
        let msg = first.get("message").and_then(|c| c.as_str()).unwrap_or("");
        let mut out = format!(" {code}: {msg}");
        if let Some(d) = first.get("detail").and_then(|d| d.as_str())
            && !d.is_empty()
        {
            out.push_str(&format!(" ({})", one_line(d, 200)));
        }
        return out;
    }
    // Not the spec's error document: show the start of what it said.
    let text = one_line(&body, 200);
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// `s` on one line, at most `max` characters.
fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

impl ImageSource for RegistrySource {
    fn resolve(&self, platform: &Platform) -> Result<ResolvedImage, OciError> {
        let what = self.reference.to_string();
        let first_ref = match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        };
        let (mut bytes, mut ct) = self.inner.fetch_manifest(&first_ref, &what)?;
        let mut digest = Digest::sha256_of(&bytes);
        if let Some(d) = &self.digest {
            verify(&format!("fetching manifest {what}"), &bytes, d)?;
        }
        let mut index_digest = None;
        for _ in 0..4 {
            match parse_document(&bytes, ct.as_deref(), &format!("manifest {what}"))? {
                Document::Manifest(manifest) => {
                    let url = self.inner.blob_url(&manifest.config.digest);
                    let action = format!("fetching config {} of {what}", manifest.config.digest);
                    if manifest.config.size > 16 << 20 {
                        return Err(OciError::Format {
                            what: action,
                            reason: format!(
                                "config declares {} bytes (limit 16 MiB)",
                                manifest.config.size
                            ),
                        });
                    }
                    let (config_bytes, _) =
                        self.inner.get_bytes(&url, &HeaderMap::new(), &action)?;
                    verify(&action, &config_bytes, &manifest.config.digest)?;
                    return Ok(ResolvedImage {
                        manifest_bytes: bytes,
                        manifest_digest: digest,
                        manifest: *manifest,
                        config_bytes,
                        index_digest,
                    });
                }
                Document::Index(entries) => {
                    index_digest = Some(digest);
                    let chosen = pick_platform(&entries, platform, &what)?.clone();
                    let (b, c) = self
                        .inner
                        .fetch_manifest(&chosen.digest.to_string(), &what)?;
                    verify(
                        &format!("fetching manifest {what} for {platform}"),
                        &b,
                        &chosen.digest,
                    )?;
                    bytes = b;
                    ct = c.or(Some(chosen.media_type.clone()));
                    digest = chosen.digest;
                }
            }
        }
        Err(OciError::Format {
            what,
            reason: "indexes nested too deep".into(),
        })
    }

    fn open_blob(&self, desc: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        if offset >= desc.size && desc.size > 0 {
            // nothing left to read; a Range request would answer 416
            return Ok(Box::new(io::empty()));
        }
        let mut r = BlobReader {
            inner: self.inner.clone(),
            desc: desc.clone(),
            pos: offset,
            resp: None,
            failures: 0,
        };
        r.connect()?;
        Ok(Box::new(r))
    }

    fn read_range(&self, desc: &Descriptor, offset: u64, len: u64) -> Result<Vec<u8>, OciError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .get_ranges(desc, &[(offset, len)])?
            .pop()
            .expect("one part per range"))
    }

    fn read_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        const PER_REQUEST: usize = 32;
        let mut out = Vec::with_capacity(ranges.len());
        for batch in ranges.chunks(PER_REQUEST) {
            if batch.len() == 1 || self.inner.single_ranges.load(Ordering::Relaxed) {
                for (o, l) in batch {
                    out.push(self.read_range(desc, *o, *l)?);
                }
                continue;
            }
            match self.get_ranges(desc, batch) {
                Ok(parts) => out.extend(parts),
                Err(OciError::NoRanges { .. }) => {
                    // Some registries refuse several ranges at once; ask
                    // one at a time from now on.
                    self.inner.single_ranges.store(true, Ordering::Relaxed);
                    for (o, l) in batch {
                        out.push(self.read_range(desc, *o, *l)?);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        self.reference.to_string()
    }
}

impl RegistrySource {
    /// One GET for one or several ranges; the parts of the 206 (a single
    /// range or `multipart/byteranges`) are matched to ranges by
    /// `Content-Range`.
    fn get_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        let spec: Vec<String> = ranges
            .iter()
            .map(|(o, l)| format!("{o}-{}", o + l - 1))
            .collect();
        let action = format!(
            "{}: bytes {}",
            self.inner.blob_action(&desc.digest),
            spec.join(",")
        );
        let mut h = HeaderMap::new();
        h.insert(
            RANGE,
            format!("bytes={}", spec.join(",")).parse().expect("ascii"),
        );
        let url = self.inner.blob_url(&desc.digest);
        let resp = match self.inner.get(&url, &h, &action) {
            Ok(r) => r,
            Err(OciError::Registry { status, detail, .. }) if status == 400 || status == 416 => {
                return Err(OciError::NoRanges {
                    action,
                    reason: format!("answered {status}{detail}"),
                });
            }
            Err(e) => return Err(e),
        };
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(OciError::NoRanges {
                action,
                reason: format!("answered {} instead of 206", resp.status().as_u16()),
            });
        }
        let ct = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let single_range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let want: u64 = ranges.iter().map(|(_, l)| l).sum();
        let mut body = Vec::new();
        resp.take(want + 64 * 1024 + 512 * ranges.len() as u64)
            .read_to_end(&mut body)
            .map_err(|e| OciError::Network {
                action: action.clone(),
                reason: e.to_string(),
            })?;
        // (start, bytes) parts the registry sent.
        let mut parts: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some(cr) = single_range {
            // The registry merged everything into one range.
            let start = parse_content_range(&cr).ok_or_else(|| OciError::NoRanges {
                action: action.clone(),
                reason: format!("bad Content-Range {cr:?}"),
            })?;
            parts.push((start, body));
        } else {
            let boundary = ct
                .split(';')
                .filter_map(|p| p.trim().strip_prefix("boundary="))
                .next()
                .map(|b| b.trim_matches('"').to_string())
                .ok_or_else(|| OciError::NoRanges {
                    action: action.clone(),
                    reason: format!("a 206 of type {ct:?} without a boundary"),
                })?;
            parts = parse_multipart(&body, &boundary).ok_or_else(|| OciError::Network {
                action: action.clone(),
                reason: "malformed multipart/byteranges answer".into(),
            })?;
        }
        ranges
            .iter()
            .map(|(o, l)| {
                parts
                    .iter()
                    .find(|(s, b)| s <= o && o + l <= s + b.len() as u64)
                    .map(|(s, b)| b[(o - s) as usize..(o - s + l) as usize].to_vec())
                    .ok_or_else(|| OciError::Network {
                        action: action.clone(),
                        reason: format!("the answer lacks bytes {o}+{l}"),
                    })
            })
            .collect()
    }
}

/// `bytes START-END/TOTAL` -> START.
fn parse_content_range(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Parts of a `multipart/byteranges` body: `(start, bytes)`.
fn parse_multipart(body: &[u8], boundary: &str) -> Option<Vec<(u64, Vec<u8>)>> {
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p + from)
    };
    let mut parts = Vec::new();
    let mut pos = find(body, delim.as_bytes(), 0)?;
    loop {
        pos += delim.len();
        if body.get(pos..pos + 2) == Some(b"--") {
            return Some(parts);
        }
        let head_end = find(body, b"\r\n\r\n", pos)?;
        let head = std::str::from_utf8(&body[pos..head_end]).ok()?;
        let mut start = None;
        let mut len = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("content-range") {
                let v = v.trim().strip_prefix("bytes ")?;
                let (se, _) = v.split_once('/')?;
                let (a, b) = se.split_once('-')?;
                let (a, b): (u64, u64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                start = Some(a);
                len = Some(b.checked_sub(a)? + 1);
            }
        }
        let (start, len) = (start?, len? as usize);
        let data = head_end + 4;
        parts.push((start, body.get(data..data + len)?.to_vec()));
        pos = find(body, delim.as_bytes(), data + len)?;
    }
}

/// A blob stream that resumes after dropped connections.
struct BlobReader {
    inner: Arc<Inner>,
    desc: Descriptor,
    pos: u64,
    resp: Option<Response>,
    failures: u32,
}

impl BlobReader {
    fn action(&self) -> String {
        self.inner.blob_action(&self.desc.digest)
    }

    fn connect(&mut self) -> Result<(), OciError> {
        let mut h = HeaderMap::new();
        if self.pos > 0 {
            h.insert(
                RANGE,
                format!("bytes={}-", self.pos).parse().expect("ascii"),
            );
        }
        let url = self.inner.blob_url(&self.desc.digest);
        let mut resp = self.inner.get(&url, &h, &self.action())?;
        if self.pos > 0 && resp.status() == StatusCode::PARTIAL_CONTENT {
            // `Content-Range: bytes START-END/TOTAL` must start where we are
            let start = resp
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            if start != Some(self.pos) {
                return Err(OciError::Network {
                    action: self.action(),
                    reason: format!(
                        "asked for bytes from {} but the registry answered Content-Range starting at {}",
                        self.pos,
                        start.map_or("(none)".to_string(), |s| s.to_string())
                    ),
                });
            }
        } else if self.pos > 0 && resp.status() == StatusCode::OK {
            // Range ignored: skip what we already have.
            let skipped =
                io::copy(&mut (&mut resp).take(self.pos), &mut io::sink()).map_err(|e| {
                    OciError::Network {
                        action: self.action(),
                        reason: e.to_string(),
                    }
                })?;
            if skipped != self.pos {
                return Err(OciError::Network {
                    action: self.action(),
                    reason: "connection dropped while skipping".into(),
                });
            }
        }
        self.resp = Some(resp);
        Ok(())
    }

    fn retry(&mut self, why: String) -> io::Result<()> {
        self.resp = None;
        self.failures += 1;
        if self.failures >= ATTEMPTS {
            return Err(io::Error::other(format!(
                "{}: gave up after {} attempts at byte {}: {why}",
                self.action(),
                self.failures,
                self.pos
            )));
        }
        // 200 ms, 400 ms, 800 ms, ...
        std::thread::sleep(Duration::from_millis(200 << (self.failures - 1).min(5)));
        self.connect().map_err(io::Error::other)
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.resp.is_none() {
                self.retry("connection lost".into())?;
                continue;
            }
            let r = self.resp.as_mut().expect("checked").read(buf);
            match r {
                Ok(0) if !buf.is_empty() && self.pos < self.desc.size => {
                    let why = format!("stream ended at byte {} of {}", self.pos, self.desc.size);
                    self.retry(why)?;
                }
                Ok(n) => {
                    self.pos += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = e.to_string();
                    self.retry(why)?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn multipart_byteranges_parse() {
        let body = b"\r\n--XYZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes 2-4/100\r\n\r\nabc\r\n--XYZ\r\ncontent-range: bytes 10-10/100\r\n\r\nZ\r\n--XYZ--\r\n";
        let parts = parse_multipart(body, "XYZ").unwrap();
        assert_eq!(parts, vec![(2, b"abc".to_vec()), (10, b"Z".to_vec())]);
        // a part shorter than its Content-Range says
        assert!(
            parse_multipart(b"--XYZ\r\nContent-Range: bytes 0-9/10\r\n\r\nab", "XYZ").is_none()
        );
        assert_eq!(parse_content_range("bytes 7-9/10"), Some(7));
    }

    use super::*;

    #[test]
    fn url_encoding() {
        assert_eq!(
            url_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(url_encode("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn unquoted_challenge_params() {
        let p = parse_challenge("realm=https://auth.io/token, service=reg");
        assert_eq!(
            p[0],
            ("realm".to_string(), "https://auth.io/token".to_string())
        );
        assert_eq!(p[1], ("service".to_string(), "reg".to_string()));
    }

    #[test]
    fn challenge_parsing() {
        let p = parse_challenge(
            r#"realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            vec![
                ("realm".to_string(), "http://127.0.0.1:1/token".to_string()),
                ("service".to_string(), "reg".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
    }

    #[test]
    fn upload_locations_resolve() {
        let post = "http://h:1/v2/a/b/blobs/uploads/";
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        let q = "digest=sha256%3Ae3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        // relative to the host, with the registry's own query kept
        assert_eq!(
            upload_url(post, "/v2/a/b/blobs/uploads/u1?_state=x%2By", &d).unwrap(),
            format!("http://h:1/v2/a/b/blobs/uploads/u1?_state=x%2By&{q}")
        );
        // absolute, elsewhere
        assert_eq!(
            upload_url(post, "https://store.example/up/u2", &d).unwrap(),
            format!("https://store.example/up/u2?{q}")
        );
        // relative to the POST's path
        assert_eq!(
            upload_url(post, "u3", &d).unwrap(),
            format!("http://h:1/v2/a/b/blobs/uploads/u3?{q}")
        );
        assert!(upload_url(post, "ftp://x/y", &d).is_err());
    }

    #[test]
    fn credentials_go_to_the_registry_only() {
        let opts = RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        };
        let inner = Inner::new("h:5000", "a", &opts, true).unwrap();
        assert!(inner.same_origin("http://h:5000/v2/a/blobs/uploads/x?y=1"));
        assert!(!inner.same_origin("http://h:50001/v2/"));
        assert!(!inner.same_origin("https://h:5000/v2/"));
        assert!(!inner.same_origin("http://other/v2/"));
    }

    #[test]
    fn error_text_is_one_short_line() {
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }

    #[test]
    fn credentials_debug_redacts_and_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        let enc = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        std::fs::write(&f, format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{enc}"}},"https://other.io/v1/":{{"username":"bob","password":"pw"}}}}}}"#)).unwrap();
        let c = find_credentials("127.0.0.1:5000", Some(&f)).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s3cret"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("alice"), "{dbg}");
        let c2 = find_credentials("other.io", Some(&f)).unwrap();
        assert_eq!(c2.user, "bob");
        assert!(
            find_credentials("nothere.io", Some(&f)).is_none()
                || std::env::var_os("REGISTRY_AUTH_FILE").is_some()
        );
    }
}
