//! HTTP for registries: one shared client, retries, stall timeouts, byte
//! ranges.
//!
//! - [`RegistryClient`] holds the reqwest clients (and so the connection
//!   pools) that every source and pusher built from the same
//!   [`RegistryOptions`] uses. Blocking reqwest applies a client's timeout
//!   to each send and each body read, which is how a stall is bounded
//!   without bounding a download; a per-request timeout would bound the
//!   whole body instead, so clients are kept one per (user agent, stall
//!   timeout). `plain_http` needs no client of its own: the scheme is in
//!   the URL.
//! - [`Session`]: one repository on one registry: base URL, auth state,
//!   and requests with retries (connection failures and 5xx, 5 attempts,
//!   backoff from 200 ms, doubling) and one answer to a 401 challenge.
//! - [`BlobReader`]: a blob stream that resumes after a dropped connection
//!   with `Range: bytes=N-` (skipping forward when the registry ignores
//!   Range).
//! - [`Session::get_ranges`]: several ranges in one request, answered as
//!   one `Content-Range` (the range asked, or several coalesced: cut up)
//!   or `multipart/byteranges`; every part must lie within what was
//!   asked. One range request takes at most
//!   [`RegistryOptions::range_timeout`] (30 s by default) in all,
//!   connecting, retries and body included.
//! - Streams (blobs, manifests, configs) slower than
//!   [`RegistryOptions::min_rate`] over a window (1 KiB/s over 30 s by
//!   default) count as dropped connections: a registry sending a byte at a
//!   time cannot hold a pull forever. A redirect loop ends after
//!   [`MAX_REDIRECTS`] with an error and is not retried.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::blocking::{Body, Client, Response};
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, HeaderMap, RANGE, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use strata_digest::Digest;

use super::RegistryOptions;
use super::auth::Authenticator;
use crate::{Descriptor, OciError};

/// Attempts per request (and per blob stream) before giving up.
pub(crate) const ATTEMPTS: u32 = 5;
/// How long one send or one body read may wait for the registry.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one range request may take in all (connecting, retries, the
/// whole body) unless [`RegistryOptions::range_timeout`] says otherwise.
pub const DEFAULT_RANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Slowest a stream may be, bytes per second over a window, unless
/// [`RegistryOptions::min_rate`] says otherwise.
pub const DEFAULT_MIN_RATE: u64 = 1024;
/// The window the minimum rate is measured over, unless
/// [`RegistryOptions::rate_window`] says otherwise.
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(30);
/// Redirects followed per request; one more is an error (a loop ends
/// there), not retried.
pub const MAX_REDIRECTS: usize = 10;
/// Bytes of part headers and boundaries a `multipart/byteranges` answer
/// may add per range.
const MULTIPART_OVERHEAD: u64 = 1024;
/// Most bytes a single 206 may carry beyond the ranges asked for when the
/// registry coalesced them (the gaps in between): more is refused as an
/// answer to something else, and the ranges are asked one at a time.
const MAX_COALESCED_EXTRA: u64 = 16 << 20;

/// The settings that need a client of their own.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    user_agent: String,
    stall: Duration,
}

/// A shared, connection-reusing HTTP client for registries. Clones share
/// the same clients and connection pools; every [`RegistrySource`] and
/// [`RegistryPusher`] built from the same [`RegistryOptions`] (or from
/// options holding a clone of this handle) reuses its connections instead
/// of opening new ones.
///
/// One reqwest client is kept per (user agent, stall timeout), built on
/// first use. Holds no credentials: those belong to each source.
///
/// [`RegistrySource`]: super::RegistrySource
/// [`RegistryPusher`]: super::RegistryPusher
#[derive(Clone, Default)]
pub struct RegistryClient {
    clients: Arc<Mutex<HashMap<ClientKey, Client>>>,
}

impl RegistryClient {
    /// A handle with no clients yet.
    pub fn new() -> RegistryClient {
        RegistryClient::default()
    }

    /// How many distinct HTTP clients (connection pools) this handle has
    /// built: one per (user agent, stall timeout) in use.
    pub fn clients_built(&self) -> usize {
        self.clients.lock().expect("no panics while held").len()
    }

    /// The client for these settings, built on first use.
    fn http(&self, user_agent: &str, stall: Duration, registry: &str) -> Result<Client, OciError> {
        let key = ClientKey {
            user_agent: user_agent.to_string(),
            stall,
        };
        let mut clients = self.clients.lock().expect("no panics while held");
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let tls = super::tls::client_config().map_err(|e| OciError::Network {
            action: format!("setting up TLS for {registry}"),
            reason: e.to_string(),
        })?;
        let client = Client::builder()
            .tls_backend_preconfigured(tls)
            .user_agent(user_agent)
            .connect_timeout(Duration::from_secs(10))
            // blocking reqwest applies this to each send and each body read,
            // so it bounds a stall, not a download; a stalled blob read is
            // then resumed with Range like a dropped connection
            .timeout(stall)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .build()
            .map_err(|e| OciError::Network {
                action: format!("setting up HTTP client for {registry}"),
                reason: e.to_string(),
            })?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("clients_built", &self.clients_built())
            .finish()
    }
}

/// One request for [`Session::execute`].
pub(crate) struct Call<'a> {
    pub(crate) method: Method,
    pub(crate) url: &'a str,
    pub(crate) headers: HeaderMap,
    /// Makes the body afresh for every attempt (a file is reopened).
    pub(crate) body: Option<&'a (dyn Fn() -> Result<Body, OciError> + 'a)>,
    /// Overrides the client's stall timeout (an upload's send lasts as
    /// long as its body).
    pub(crate) timeout: Option<Duration>,
    /// Attempts for connection failures and 5xx answers.
    pub(crate) attempts: u32,
    /// Statuses handed back as answers besides 2xx (e.g. 404 for HEAD).
    pub(crate) also_ok: &'a [StatusCode],
    /// When the whole call (every attempt) must be over.
    pub(crate) deadline: Option<Instant>,
}

impl<'a> Call<'a> {
    /// A request without a body, retried [`ATTEMPTS`] times, 2xx only.
    pub(crate) fn new(method: Method, url: &'a str) -> Call<'a> {
        Call {
            method,
            url,
            headers: HeaderMap::new(),
            body: None,
            timeout: None,
            attempts: ATTEMPTS,
            also_ok: &[],
            deadline: None,
        }
    }
}

/// One repository on one registry: where it is, the shared HTTP client,
/// and the auth state.
pub(crate) struct Session {
    http: Client,
    /// `http[s]://host[:port]`.
    pub(crate) base: String,
    /// `host[:port]` as in the reference.
    pub(crate) host: String,
    pub(crate) repository: String,
    auth: Authenticator,
    /// Set once the registry refused a multi-range request.
    pub(crate) single_ranges: AtomicBool,
    /// The client's stall timeout.
    pub(crate) stall: Duration,
    /// Total time of one range request.
    pub(crate) range_timeout: Duration,
    /// Slowest stream: (bytes per second, window); 0 bytes: no minimum.
    pub(crate) min_rate: (u64, Duration),
}

impl Session {
    /// A session for `repository` on `registry` (`host[:port]`), with the
    /// credentials `opts` provides for it; `push` asks tokens for
    /// `pull,push`.
    pub(crate) fn new(
        registry: &str,
        repository: &str,
        opts: &RegistryOptions,
        push: bool,
    ) -> Result<Session, OciError> {
        let plain = opts.plain_http || opts.insecure_registries.iter().any(|h| h == registry);
        let host = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let base = format!("{}://{host}", if plain { "http" } else { "https" });
        let ua = if opts.user_agent.is_empty() {
            "strata"
        } else {
            opts.user_agent.as_str()
        };
        let stall = opts.stall_timeout.unwrap_or(STALL_TIMEOUT);
        let http = opts.client.http(ua, stall, registry)?;
        let creds = opts.credentials.credentials(registry)?;
        Ok(Session {
            http,
            base,
            host: registry.to_string(),
            repository: repository.to_string(),
            auth: Authenticator::new(registry, repository, creds, push),
            single_ranges: AtomicBool::new(false),
            stall,
            range_timeout: opts.range_timeout.unwrap_or(DEFAULT_RANGE_TIMEOUT),
            min_rate: (
                opts.min_rate.unwrap_or(DEFAULT_MIN_RATE),
                opts.rate_window.unwrap_or(DEFAULT_RATE_WINDOW),
            ),
        })
    }

    /// `host[:port]/repository`, for messages.
    pub(crate) fn target(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }

    /// Send a GET with retries and auth. Returns the response with a
    /// success (2xx) status, or an error naming `action`.
    pub(crate) fn get(
        &self,
        url: &str,
        headers: &HeaderMap,
        action: &str,
    ) -> Result<Response, OciError> {
        let call = Call {
            headers: headers.clone(),
            ..Call::new(Method::GET, url)
        };
        self.execute(&call, action)
    }

    /// Whether `url` is on this registry (credentials go nowhere else).
    pub(crate) fn same_origin(&self, url: &str) -> bool {
        url.strip_prefix(self.base.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    /// Send a request with retries and auth: connection failures and 5xx
    /// answers are retried (`call.attempts` in all, backoff from 200 ms,
    /// doubling), a 401 is answered once with credentials. Returns the
    /// response when its status is 2xx or in `call.also_ok`, else an error
    /// naming `action`, the status and the registry's error.
    pub(crate) fn execute(&self, call: &Call<'_>, action: &str) -> Result<Response, OciError> {
        let mut delay = Duration::from_millis(200);
        let mut authed_once = false;
        let mut attempt = 0;
        let past_deadline = || OciError::Network {
            action: action.to_string(),
            reason: format!(
                "no complete answer within {} s (the range timeout)",
                self.range_timeout.as_secs_f64()
            ),
        };
        loop {
            attempt += 1;
            let left = match call.deadline {
                Some(d) => Some(
                    d.checked_duration_since(Instant::now())
                        .filter(|l| !l.is_zero())
                        .ok_or_else(past_deadline)?,
                ),
                None => None,
            };
            let mut req = self
                .http
                .request(call.method.clone(), call.url)
                .headers(call.headers.clone());
            match (call.timeout, left) {
                (Some(t), Some(l)) => req = req.timeout(t.min(l)),
                (Some(t), None) | (None, Some(t)) => req = req.timeout(t),
                (None, None) => {}
            }
            if let Some(make) = call.body {
                req = req.body(make()?);
            }
            if self.same_origin(call.url) {
                req = self.auth.authorize(req);
            }
            let resp = match req.send() {
                Ok(r) => r,
                Err(e) => {
                    if e.is_redirect() {
                        // a loop does not end by asking again
                        return Err(OciError::Network {
                            action: action.to_string(),
                            reason: format!(
                                "more than {MAX_REDIRECTS} redirects (a redirect loop?): {}",
                                error_chain(&e.without_url())
                            ),
                        });
                    }
                    if let Some(hint) = tls_refusal(&e) {
                        // the same certificate is refused every time
                        return Err(OciError::Network {
                            action: action.to_string(),
                            reason: format!("{}; {hint}", error_chain(&e.without_url())),
                        });
                    }
                    if attempt < call.attempts {
                        if call.deadline.is_some_and(|d| Instant::now() + delay >= d) {
                            return Err(past_deadline());
                        }
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
                    return Err(self.auth.refused(action));
                }
                authed_once = true;
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                self.auth.answer(&self.http, &challenge, action)?;
                // an authentication round is not a failed attempt
                attempt -= 1;
                continue;
            }
            if status.is_server_error()
                && attempt < call.attempts
                && call.deadline.is_none_or(|d| Instant::now() + delay < d)
            {
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

    /// GET a small document (manifest, config) whole, retrying when the
    /// body breaks off like [`get`](Self::get) retries failed requests.
    pub(crate) fn get_bytes(
        &self,
        url: &str,
        headers: &HeaderMap,
        action: &str,
        limit: u64,
    ) -> Result<(Vec<u8>, HeaderMap), OciError> {
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            let resp = self.get(url, headers, action)?;
            let response_headers = resp.headers().clone();
            let mut body = Vec::new();
            // at most `limit` bytes; one byte more tells the caller
            let read = RateGuard::new(resp, self.min_rate)
                .take(limit.saturating_add(1))
                .read_to_end(&mut body);
            match read {
                Ok(_) => return Ok((body, response_headers)),
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

    /// `fetching blob DIGEST from HOST/REPO`.
    pub(crate) fn blob_action(&self, d: &Digest) -> String {
        format!("fetching blob {d} from {}/{}", self.host, self.repository)
    }

    /// `BASE/v2/REPO/blobs/DIGEST`.
    pub(crate) fn blob_url(&self, d: &Digest) -> String {
        format!("{}/v2/{}/blobs/{d}", self.base, self.repository)
    }

    /// One GET for one or several ranges `(offset, len)` of a blob; the
    /// parts of the 206 (a single range or `multipart/byteranges`) are
    /// matched to ranges by `Content-Range`. A single range covering
    /// several asked ones (a registry may coalesce them) is cut up. Every
    /// part must lie within what was asked and the whole answer must come
    /// within the range timeout. A registry that refuses the ranges (400,
    /// 416), ignores them (200) or coalesces them into far more than was
    /// asked gives [`OciError::NoRanges`].
    pub(crate) fn get_ranges(
        &self,
        desc: &Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, OciError> {
        let deadline = Instant::now() + self.range_timeout;
        let mut spec = Vec::with_capacity(ranges.len());
        for &(o, l) in ranges {
            let last = o
                .checked_add(l)
                .and_then(|e| e.checked_sub(1))
                .filter(|_| l > 0)
                .ok_or_else(|| OciError::Format {
                    what: self.blob_action(&desc.digest),
                    reason: format!("bytes {o}+{l} are not a range"),
                })?;
            spec.push(format!("{o}-{last}"));
        }
        let action = format!(
            "{}: bytes {}",
            self.blob_action(&desc.digest),
            spec.join(",")
        );
        let mut h = HeaderMap::new();
        h.insert(
            RANGE,
            format!("bytes={}", spec.join(",")).parse().expect("ascii"),
        );
        let url = self.blob_url(&desc.digest);
        let call = Call {
            headers: h,
            deadline: Some(deadline),
            ..Call::new(Method::GET, &url)
        };
        let resp = match self.execute(&call, &action) {
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
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // what was asked, as one span: every part must lie inside it
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
        let want: u64 = ranges.iter().map(|(_, l)| l).sum();
        let net = |reason: String| OciError::Network {
            action: action.clone(),
            reason,
        };
        // (start, bytes) parts the registry sent.
        let mut parts: Vec<(u64, Vec<u8>)> = Vec::new();
        if let Some(cr) = single_range {
            // One range: the one asked, or several coalesced.
            let (start, end) = parse_content_range_span(&cr).ok_or_else(|| OciError::NoRanges {
                action: action.clone(),
                reason: format!("bad Content-Range {cr:?}"),
            })?;
            if start < lo || end >= hi {
                return Err(net(format!(
                    "the registry answered bytes {start}-{end}, not within the {lo}-{} asked for",
                    hi - 1
                )));
            }
            let len = end - start + 1;
            if len > want.saturating_add(MAX_COALESCED_EXTRA) {
                return Err(OciError::NoRanges {
                    action: action.clone(),
                    reason: format!(
                        "answered {len} bytes in one range for {want} bytes asked in {}",
                        ranges.len()
                    ),
                });
            }
            let body = read_body(resp, len, deadline, self.range_timeout).map_err(&net)?;
            if body.len() as u64 != len {
                return Err(net(format!(
                    "Content-Range {cr:?} announced {len} bytes but the body has {}{}",
                    body.len(),
                    if body.len() as u64 > len {
                        " or more"
                    } else {
                        ""
                    }
                )));
            }
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
            let limit = want
                .saturating_add(MAX_COALESCED_EXTRA)
                .saturating_add(MULTIPART_OVERHEAD.saturating_mul(ranges.len() as u64));
            let body = read_body(resp, limit, deadline, self.range_timeout).map_err(&net)?;
            if body.len() as u64 > limit {
                return Err(net(format!(
                    "a multipart answer of more than {limit} bytes for {want} bytes asked"
                )));
            }
            parts = parse_multipart(&body, &boundary)
                .ok_or_else(|| net("malformed multipart/byteranges answer".into()))?;
            for (s, b) in &parts {
                let e = s.saturating_add(b.len() as u64);
                let asked = ranges.iter().any(|&(o, l)| *s < o + l && o < e);
                if *s < lo || e > hi || !asked {
                    return Err(net(format!(
                        "the registry sent bytes {s}+{}, which were not asked for",
                        b.len()
                    )));
                }
            }
        }
        ranges
            .iter()
            .map(|&(o, l)| {
                parts
                    .iter()
                    .find(|(s, b)| *s <= o && o + l <= s + b.len() as u64)
                    .map(|(s, b)| b[(o - s) as usize..(o - s + l) as usize].to_vec())
                    .ok_or_else(|| net(format!("the answer lacks bytes {o}+{l}")))
            })
            .collect()
    }

    /// Whether the registry refused a multi-range request before.
    pub(crate) fn single_ranges_only(&self) -> bool {
        self.single_ranges.load(Ordering::Relaxed)
    }

    /// Ask one range at a time from now on.
    pub(crate) fn set_single_ranges_only(&self) {
        self.single_ranges.store(true, Ordering::Relaxed);
    }
}

/// Read a response body of at most `limit` bytes (one more is read to
/// tell a longer one) by `deadline`.
fn read_body(
    mut resp: Response,
    limit: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::with_capacity(limit.min(4 << 20) as usize);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "the answer was not complete within {} s (the range timeout): {} bytes came",
                timeout.as_secs_f64(),
                body.len()
            ));
        }
        let room = (limit + 1 - body.len() as u64).min(buf.len() as u64) as usize;
        match resp.read(&mut buf[..room]) {
            Ok(0) => return Ok(body),
            Ok(n) => {
                note_received();
                body.extend_from_slice(&buf[..n]);
                if body.len() as u64 > limit {
                    return Ok(body);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if Instant::now() + Duration::from_millis(200) >= deadline => {
                // the request's own timeout is what is left of the deadline
                return Err(format!(
                    "the answer was not complete within {} s (the range timeout): {} bytes came ({})",
                    timeout.as_secs_f64(),
                    body.len(),
                    error_chain(&e)
                ));
            }
            Err(e) => return Err(error_chain(&e)),
        }
    }
}

/// `bytes START-END/TOTAL` -> START (checked like `parse_content_range_span`).
pub fn parse_content_range(v: &str) -> Option<u64> {
    parse_content_range_span(v).map(|(s, _)| s)
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) -> (START, END), END
/// inclusive: numbers that parse, START <= END < u64::MAX, END < TOTAL.
pub fn parse_content_range_span(v: &str) -> Option<(u64, u64)> {
    let v = v.trim().strip_prefix("bytes ")?;
    let (se, total) = v.split_once('/')?;
    let (a, b) = se.split_once('-')?;
    let num = |t: &str| -> Option<u64> {
        let t = t.trim();
        // digits only: no signs, no spaces inside
        if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (a, b) = (num(a)?, num(b)?);
    // the end just past the range must be a number too
    if a > b || b == u64::MAX {
        return None;
    }
    match total.trim() {
        "*" => {}
        t => {
            if b >= num(t)? {
                return None;
            }
        }
    }
    Some((a, b))
}

/// Parts of a `multipart/byteranges` body: `(start, bytes)`, each as long
/// as its `Content-Range` says (all arithmetic checked).
pub fn parse_multipart(body: &[u8], boundary: &str) -> Option<Vec<(u64, Vec<u8>)>> {
    if boundary.is_empty() {
        return None;
    }
    let delim = format!("--{boundary}");
    let find = |hay: &[u8], needle: &[u8], from: usize| -> Option<usize> {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .and_then(|p| p.checked_add(from))
    };
    let mut parts = Vec::new();
    let mut pos = find(body, delim.as_bytes(), 0)?;
    loop {
        pos = pos.checked_add(delim.len())?;
        if body.get(pos..pos.checked_add(2)?) == Some(b"--") {
            return Some(parts);
        }
        let head_end = find(body, b"\r\n\r\n", pos)?;
        let head = std::str::from_utf8(&body[pos..head_end]).ok()?;
        let mut span = None;
        for line in head.split("\r\n") {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            if k.trim().eq_ignore_ascii_case("content-range") {
                span = Some(parse_content_range_span(v)?);
            }
        }
        let (start, end) = span?;
        let len = usize::try_from((end - start).checked_add(1)?).ok()?;
        let data = head_end.checked_add(4)?;
        let data_end = data.checked_add(len)?;
        parts.push((start, body.get(data..data_end)?.to_vec()));
        pos = find(body, delim.as_bytes(), data_end)?;
    }
}

/// A reader that fails when fewer than `rate` bytes per second arrive
/// over a window (a stream kept alive a byte at a time is a stall).
pub(crate) struct RateGuard<R> {
    inner: R,
    rate: u64,
    window: Duration,
    since: Instant,
    bytes: u64,
}

impl<R> RateGuard<R> {
    /// `(rate, window)`: bytes per second over each window; rate 0: none.
    pub(crate) fn new(inner: R, (rate, window): (u64, Duration)) -> Self {
        RateGuard {
            inner,
            rate,
            window,
            since: Instant::now(),
            bytes: 0,
        }
    }
}

/// When this process last received body bytes from a registry
/// (milliseconds since the Unix epoch; 0: never).
static LAST_RECEIVED_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// When this process last received bytes of a response body from a
/// registry, if ever: evidence that a registry was answering then (a
/// lazy mount's daemon publishes it, see `strata_lazy`).
pub fn last_received() -> Option<std::time::SystemTime> {
    match LAST_RECEIVED_MS.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        ms => Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)),
    }
}

/// Body bytes arrived now (see [`last_received`]).
fn note_received() {
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        LAST_RECEIVED_MS.fetch_max(now.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

impl<R: Read> Read for RateGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            note_received();
        }
        self.bytes += n as u64;
        let took = self.since.elapsed();
        if self.rate > 0 && n > 0 && took >= self.window {
            let floor = (self.rate as f64 * took.as_secs_f64()) as u64;
            if self.bytes < floor {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} bytes in {:.0} s, slower than the minimum of {} bytes/s",
                        self.bytes,
                        took.as_secs_f64(),
                        self.rate
                    ),
                ));
            }
            self.since = Instant::now();
            self.bytes = 0;
        }
        Ok(n)
    }
}

/// A blob stream that resumes after dropped connections.
pub(crate) struct BlobReader {
    session: Arc<Session>,
    desc: Descriptor,
    pos: u64,
    /// Where the stream ends (exclusive): the blob's size, or the end of
    /// the range asked for.
    end: u64,
    resp: Option<RateGuard<Response>>,
    failures: u32,
}

impl BlobReader {
    /// A stream of `desc` from `offset`, connected.
    pub(crate) fn open(
        session: Arc<Session>,
        desc: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, OciError> {
        BlobReader::open_range(session, desc, offset, desc.size)
    }

    /// A stream of `desc`'s bytes `offset..end`, connected (asked for as
    /// that range: the registry sends no byte past `end`).
    pub(crate) fn open_range(
        session: Arc<Session>,
        desc: &Descriptor,
        offset: u64,
        end: u64,
    ) -> Result<BlobReader, OciError> {
        let mut r = BlobReader {
            session,
            desc: desc.clone(),
            pos: offset,
            end: end.min(desc.size),
            resp: None,
            failures: 0,
        };
        r.connect()?;
        Ok(r)
    }

    fn action(&self) -> String {
        self.session.blob_action(&self.desc.digest)
    }

    fn connect(&mut self) -> Result<(), OciError> {
        let mut h = HeaderMap::new();
        let ranged = self.pos > 0 || self.end < self.desc.size;
        if self.end < self.desc.size {
            h.insert(
                RANGE,
                format!("bytes={}-{}", self.pos, self.end.saturating_sub(1))
                    .parse()
                    .expect("ascii"),
            );
        } else if self.pos > 0 {
            h.insert(
                RANGE,
                format!("bytes={}-", self.pos).parse().expect("ascii"),
            );
        }
        let url = self.session.blob_url(&self.desc.digest);
        let mut resp = self.session.get(&url, &h, &self.action())?;
        if ranged && resp.status() == StatusCode::PARTIAL_CONTENT {
            // `Content-Range: bytes START-END/TOTAL` must start where we are
            let start = resp
                .headers()
                .get(CONTENT_RANGE)
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
        self.resp = Some(RateGuard::new(resp, self.session.min_rate));
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
        // no byte past the end asked for (a registry ignoring the range
        // sends the rest of the blob)
        let left = self.end.saturating_sub(self.pos);
        if left == 0 {
            return Ok(0);
        }
        let buf = match usize::try_from(left) {
            Ok(l) if l < buf.len() => &mut buf[..l],
            _ => buf,
        };
        loop {
            if self.resp.is_none() {
                self.retry("connection lost".into())?;
                continue;
            }
            let r = self.resp.as_mut().expect("checked").read(buf);
            match r {
                Ok(0) if !buf.is_empty() && self.pos < self.end => {
                    let why = format!("stream ended at byte {} of {}", self.pos, self.end);
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

/// What to do about a TLS handshake that failed for good (a certificate
/// refused, or a server that does not speak TLS), found in `e`'s sources;
/// `None` for anything else (worth another attempt).
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        // rustls' error sits in io::Errors nested one in another, which
        // `source()` skips over
        let mut inner: &(dyn std::error::Error + 'static) = c;
        while let Some(i) = inner
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
        {
            inner = i;
        }
        let tls = inner.downcast_ref::<rustls::Error>();
        match tls {
            Some(rustls::Error::InvalidCertificate(_)) => {
                return Some(
                    "the registry's TLS certificate was refused (to trust a private CA, \
                     add it to the system's roots or point SSL_CERT_FILE at it)",
                );
            }
            Some(rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. }) => {
                return Some(
                    "the registry did not answer in TLS (if it serves plain HTTP, use \
                     --plain-http or list it as insecure)",
                );
            }
            _ => {}
        }
        cur = c.source();
    }
    None
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The registry's error code and message from an error answer's body
/// (` CODE: MESSAGE (DETAIL)`), or the start of the body.
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
pub(crate) fn one_line(s: &str, max: usize) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn hostile_ranges_do_not_wrap() {
        // END before START, END past TOTAL, signs, u64::MAX spans
        assert_eq!(parse_content_range_span("bytes 9-7/10"), None);
        assert_eq!(parse_content_range_span("bytes 7-10/10"), None);
        assert_eq!(parse_content_range_span("bytes +7-9/10"), None);
        assert_eq!(parse_content_range_span("bytes 7-9/*"), Some((7, 9)));
        let max = u64::MAX;
        assert_eq!(parse_content_range_span(&format!("bytes 0-{max}/*")), None);
        assert_eq!(
            parse_content_range_span(&format!("bytes 0-{}/*", max - 1)),
            Some((0, max - 1))
        );
        let body = format!("--B\r\nContent-Range: bytes 0-{max}/*\r\n\r\nab\r\n--B--");
        assert!(parse_multipart(body.as_bytes(), "B").is_none());
        let body = format!(
            "--B\r\nContent-Range: bytes {}-{max}/*\r\n\r\nab\r\n--B--",
            max - 1
        );
        assert!(parse_multipart(body.as_bytes(), "B").is_none());
        assert!(parse_multipart(b"--\r\n\r\n", "").is_none());
        // a part whose data would end past usize
        let body = format!(
            "--B\r\nContent-Range: bytes 0-{}/*\r\n\r\nab",
            usize::MAX - 3
        );
        assert!(parse_multipart(body.as_bytes(), "B").is_none());
    }

    #[test]
    fn a_stream_slower_than_the_minimum_fails() {
        struct Trickle;
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_millis(20));
                buf[0] = 0;
                Ok(1)
            }
        }
        let mut g = RateGuard::new(Trickle, (1000, Duration::from_millis(200)));
        let e = io::copy(&mut g, &mut io::sink()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("slower than the minimum"), "{e}");
        // fast enough: no error
        let mut g = RateGuard::new(&[7u8; 100_000][..], (1000, Duration::from_millis(1)));
        assert_eq!(io::copy(&mut g, &mut io::sink()).unwrap(), 100_000);
    }

    #[test]
    fn body_bytes_read_say_when_the_registry_last_answered() {
        let before = std::time::SystemTime::now() - Duration::from_millis(1);
        let mut g = RateGuard::new(&[7u8; 1000][..], (0, Duration::from_secs(1)));
        io::copy(&mut g, &mut io::sink()).unwrap();
        let at = last_received().expect("bytes were read");
        assert!(at >= before, "{at:?} is before the read at {before:?}");
        assert!(at <= std::time::SystemTime::now());
    }

    #[test]
    fn credentials_go_to_the_registry_only() {
        let opts = RegistryOptions {
            plain_http: true,
            ..RegistryOptions::default()
        };
        let session = Session::new("h:5000", "a", &opts, true).unwrap();
        assert!(session.same_origin("http://h:5000/v2/a/blobs/uploads/x?y=1"));
        assert!(!session.same_origin("http://h:50001/v2/"));
        assert!(!session.same_origin("https://h:5000/v2/"));
        assert!(!session.same_origin("http://other/v2/"));
    }

    #[test]
    fn error_text_is_one_short_line() {
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
        assert_eq!(one_line("abcdef", 3), "abc…");
    }

    #[test]
    fn sessions_from_the_same_options_share_one_client() {
        let opts = RegistryOptions {
            plain_http: true,
            credentials: Arc::new(super::super::StaticCredentials::new()),
            ..RegistryOptions::default()
        };
        let a = Session::new("h:5000", "a", &opts, false).unwrap();
        let b = Session::new("other:5000", "b", &opts.clone(), true).unwrap();
        assert_eq!(opts.client.clients_built(), 1);
        // a different stall timeout needs its own client (the timeout is
        // the client's); the handle still holds both
        let short = RegistryOptions {
            stall_timeout: Some(Duration::from_secs(3)),
            ..opts.clone()
        };
        let c = Session::new("h:5000", "a", &short, false).unwrap();
        assert_eq!(opts.client.clients_built(), 2);
        assert_eq!(c.stall, Duration::from_secs(3));
        // options built apart do not share
        let apart = RegistryOptions {
            credentials: opts.credentials.clone(),
            ..RegistryOptions::default()
        };
        let _d = Session::new("h:5000", "a", &apart, false).unwrap();
        assert_eq!(opts.client.clients_built(), 2);
        assert_eq!(apart.client.clients_built(), 1);
        drop((a, b));
    }
}
