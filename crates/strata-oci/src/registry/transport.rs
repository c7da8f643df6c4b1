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
//!   one `Content-Range` or `multipart/byteranges`.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        let client = Client::builder()
            .user_agent(user_agent)
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
        loop {
            attempt += 1;
            let mut req = self
                .http
                .request(call.method.clone(), call.url)
                .headers(call.headers.clone());
            if let Some(t) = call.timeout {
                req = req.timeout(t);
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

    /// GET a small document (manifest, config) whole, retrying when the
    /// body breaks off like [`get`](Self::get) retries failed requests.
    pub(crate) fn get_bytes(
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
    /// matched to ranges by `Content-Range`. A registry that refuses the
    /// ranges (400, 416) or ignores them (200) gives
    /// [`OciError::NoRanges`].
    pub(crate) fn get_ranges(
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
            self.blob_action(&desc.digest),
            spec.join(",")
        );
        let mut h = HeaderMap::new();
        h.insert(
            RANGE,
            format!("bytes={}", spec.join(",")).parse().expect("ascii"),
        );
        let url = self.blob_url(&desc.digest);
        let resp = match self.get(&url, &h, &action) {
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

    /// Whether the registry refused a multi-range request before.
    pub(crate) fn single_ranges_only(&self) -> bool {
        self.single_ranges.load(Ordering::Relaxed)
    }

    /// Ask one range at a time from now on.
    pub(crate) fn set_single_ranges_only(&self) {
        self.single_ranges.store(true, Ordering::Relaxed);
    }
}

/// `bytes START-END/TOTAL` -> START.
pub fn parse_content_range(v: &str) -> Option<u64> {
    v.trim()
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Parts of a `multipart/byteranges` body: `(start, bytes)`.
pub fn parse_multipart(body: &[u8], boundary: &str) -> Option<Vec<(u64, Vec<u8>)>> {
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
pub(crate) struct BlobReader {
    session: Arc<Session>,
    desc: Descriptor,
    pos: u64,
    resp: Option<Response>,
    failures: u32,
}

impl BlobReader {
    /// A stream of `desc` from `offset`, connected.
    pub(crate) fn open(
        session: Arc<Session>,
        desc: &Descriptor,
        offset: u64,
    ) -> Result<BlobReader, OciError> {
        let mut r = BlobReader {
            session,
            desc: desc.clone(),
            pos: offset,
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
        if self.pos > 0 {
            h.insert(
                RANGE,
                format!("bytes={}-", self.pos).parse().expect("ascii"),
            );
        }
        let url = self.session.blob_url(&self.desc.digest);
        let mut resp = self.session.get(&url, &h, &self.action())?;
        if self.pos > 0 && resp.status() == StatusCode::PARTIAL_CONTENT {
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
