//! A small HTTP/1.1 proxy on 127.0.0.1 in front of a registry, to make it
//! misbehave on purpose: demand Basic or Bearer auth, answer 500, drop a
//! blob response half way, redirect blobs (or in a loop), lie about
//! digests, answer blobs a byte at a time or never, coalesce ranges or
//! answer ranges not asked for, and log what was asked for. One request
//! per connection (`Connection: close`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use base64::Engine as _;

/// The status of `GET path` on `addr`, or None if nothing answers.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// How the [`Proxy`] misbehaves.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Require `Authorization: Basic base64(user:pass)` (`"user:pass"`).
    pub basic: Option<String>,
    /// Require a bearer token, handed out by the proxy's own `/token`
    /// endpoint to clients presenting these basic credentials.
    pub bearer: Option<String>,
    /// Answer 500 to the first N blob GETs.
    pub fail_blobs: u64,
    /// Answer 500 to every request.
    pub always_500: bool,
    /// Cut the first N blob GET responses (over 1 KiB) after half their body.
    pub drop_blobs: u64,
    /// Answer blob GETs with `307` to the upstream registry itself, as
    /// registries do to send clients to their storage.
    pub redirect_blobs: bool,
    /// Replace the `Docker-Content-Digest` of manifest answers with the
    /// digest of nothing.
    pub lie_about_manifest_digest: bool,
    /// Drop `Range` from blob GETs: the registry answers 200, whole blob.
    pub ignore_ranges: bool,
    /// Answer 400 to blob GETs asking for more than one range.
    pub refuse_multi_range: bool,
    /// Send blob GET answers (headers, then body) one byte per this
    /// interval: a slowloris registry that never stalls long enough for a
    /// stall timeout.
    pub slow_blobs: Option<Duration>,
    /// Accept blob GETs, read them and never answer (until the proxy is
    /// dropped).
    pub hang_blobs: bool,
    /// Ask the registry for one range spanning all of a multi-range blob
    /// GET's ranges: the client gets one 206 covering them (and the gaps
    /// in between), as RFC 9110 lets a server coalesce.
    pub coalesce_ranges: bool,
    /// Ask the registry for every range of a blob GET one byte further
    /// on: the answer covers ranges that were not asked for.
    pub shift_ranges: bool,
    /// Answer blob GETs with `307` to the same URL on the proxy: a
    /// redirect loop.
    pub redirect_loop: bool,
    /// Append this many spaces to manifest GET bodies (still valid JSON)
    /// and drop their `Docker-Content-Digest`: a registry serving a
    /// manifest larger than registries accept.
    pub pad_manifests: usize,
}

/// A running HTTP/1.1 proxy on 127.0.0.1 in front of a registry. One
/// request per connection (`Connection: close` both ways).
pub struct Proxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    state: Arc<ProxyState>,
}

/// The bearer token the proxy issues.
pub const TOKEN: &str = "strata-test-token-d41d8cd9";

impl Proxy {
    /// Start a proxy to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(ProxyState {
            stop: stop.clone(),
            upstream: upstream.to_string(),
            me: addr.clone(),
            faults: faults.clone(),
            fail_left: AtomicU64::new(faults.fail_blobs),
            drop_left: AtomicU64::new(faults.drop_blobs),
            log: log.clone(),
        });
        let stop2 = stop.clone();
        let state = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let shared = shared.clone();
                thread::spawn(move || {
                    let _ = shared.handle(conn);
                });
            }
        });
        Proxy {
            addr,
            log,
            stop,
            state,
        }
    }

    /// From now on, answer 500 to the next `n` blob GETs (`u64::MAX`:
    /// all of them; 0: none), as [`Faults::fail_blobs`] does from the
    /// start: a registry that breaks while a mount serves.
    pub fn set_fail_blobs(&self, n: u64) {
        self.state.fail_left.store(n, Ordering::SeqCst);
    }

    /// Requests seen so far: `METHOD PATH[ range=...][ auth=SCHEME]`.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().expect("proxy log").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

struct ProxyState {
    stop: Arc<AtomicBool>,
    upstream: String,
    me: String,
    faults: Faults,
    fail_left: AtomicU64,
    drop_left: AtomicU64,
    log: Arc<Mutex<Vec<String>>>,
}

fn respond(mut c: TcpStream, status: &str, headers: &[String], body: &[u8]) -> std::io::Result<()> {
    let mut s = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    c.write_all(s.as_bytes())?;
    c.write_all(body)
}

fn basic(creds: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(creds)
    )
}

/// Take one unit from `n` if any is left.
fn take_one(n: &AtomicU64) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

impl ProxyState {
    fn handle(&self, client: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(client.try_clone()?);
        let mut request_line = String::new();
        reader.read_line(&mut request_line)?;
        let mut headers = Vec::new();
        let mut content_length = 0usize;
        loop {
            let mut l = String::new();
            reader.read_line(&mut l)?;
            let t = l.trim_end().to_string();
            if t.is_empty() {
                break;
            }
            if let Some(v) = t.to_ascii_lowercase().strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            headers.push(t);
        }
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.to_ascii_lowercase().starts_with(&format!("{name}:")))
                .map(|h| h[name.len() + 1..].trim().to_string())
        };
        let range = header("range");
        let auth = header("authorization");
        let mut entry = format!("{method} {path}");
        if let Some(r) = &range {
            entry.push_str(&format!(" range={r}"));
        }
        if let Some(a) = &auth {
            // the scheme only: tests must not be able to leak secrets either
            entry.push_str(&format!(" auth={}", a.split(' ').next().unwrap_or("")));
        }
        self.log.lock().expect("proxy log").push(entry);

        let f = &self.faults;
        if f.always_500 {
            return respond(
                client,
                "500 Internal Server Error",
                &[],
                br#"{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}"#,
            );
        }
        if let Some(creds) = &f.bearer {
            if path.starts_with("/token") {
                if auth.as_deref() == Some(basic(creds).as_str()) {
                    let body = format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#);
                    return respond(
                        client,
                        "200 OK",
                        &["Content-Type: application/json".into()],
                        body.as_bytes(),
                    );
                }
                return respond(client, "401 Unauthorized", &[], b"");
            }
            if auth.as_deref() != Some(format!("Bearer {TOKEN}").as_str()) {
                let challenge = format!(
                    "WWW-Authenticate: Bearer realm=\"http://{}/token\",service=\"strata-test\",scope=\"repository:{}:pull\"",
                    self.me,
                    repo_of(&path)
                );
                return respond(
                    client,
                    "401 Unauthorized",
                    &[challenge],
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                );
            }
        }
        if let Some(creds) = &f.basic
            && auth.as_deref() != Some(basic(creds).as_str())
        {
            return respond(
                client,
                "401 Unauthorized",
                &["WWW-Authenticate: Basic realm=\"strata-test\"".into()],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            );
        }
        let is_blob_get = method == "GET" && path.contains("/blobs/sha256:");
        if is_blob_get && take_one(&self.fail_left) {
            return respond(client, "500 Internal Server Error", &[], b"");
        }

        if is_blob_get && f.refuse_multi_range && range.as_deref().is_some_and(|r| r.contains(','))
        {
            return respond(
                client,
                "400 Bad Request",
                &[],
                br#"{"errors":[{"code":"RANGE_INVALID","message":"too many ranges"}]}"#,
            );
        }
        if is_blob_get && f.redirect_loop {
            let location = format!("Location: http://{}{path}", self.me);
            return respond(client, "307 Temporary Redirect", &[location], b"");
        }
        if is_blob_get && f.hang_blobs {
            // read, never answer; the connection closes with the proxy
            while !self.stop.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(50));
            }
            return Ok(());
        }
        if is_blob_get && f.redirect_blobs {
            let location = format!("Location: http://{}{path}", self.upstream);
            return respond(client, "307 Temporary Redirect", &[location], b"");
        }

        // (start, end) inclusive of each range asked
        let asked: Option<Vec<(u64, u64)>> = range.as_deref().and_then(|r| {
            r.trim()
                .strip_prefix("bytes=")?
                .split(',')
                .map(|p| {
                    let (a, b) = p.trim().split_once('-')?;
                    Some((a.parse().ok()?, b.parse().ok()?))
                })
                .collect()
        });
        let new_range = match &asked {
            Some(a) if is_blob_get && f.coalesce_ranges && a.len() > 1 => {
                let lo = a.iter().map(|r| r.0).min().unwrap_or(0);
                let hi = a.iter().map(|r| r.1).max().unwrap_or(0);
                Some(format!("Range: bytes={lo}-{hi}"))
            }
            Some(a) if is_blob_get && f.shift_ranges => {
                let shifted: Vec<String> = a
                    .iter()
                    .map(|(s, e)| format!("{}-{}", s + 1, e + 1))
                    .collect();
                Some(format!("Range: bytes={}", shifted.join(",")))
            }
            _ => None,
        };
        let mut up = TcpStream::connect(&self.upstream)?;
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        if let Some(r) = &new_range {
            req.push_str(r);
            req.push_str("\r\n");
        }
        for h in &headers {
            let l = h.to_ascii_lowercase();
            if (new_range.is_some() && l.starts_with("range:"))
                || l.starts_with("connection:")
                || l.starts_with("host:")
                || l.starts_with("authorization:")
                || (is_blob_get && f.ignore_ranges && l.starts_with("range:"))
            {
                continue;
            }
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str(&format!(
            "Host: {}\r\nConnection: close\r\n\r\n",
            self.upstream
        ));
        up.write_all(req.as_bytes())?;
        up.write_all(&body)?;
        let mut resp = Vec::new();
        up.read_to_end(&mut resp)?;
        let header_end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(resp.len(), |p| p + 4);
        let body_len = resp.len() - header_end;
        if f.pad_manifests > 0 && method == "GET" && path.contains("/manifests/") {
            let head = String::from_utf8_lossy(&resp[..header_end]).into_owned();
            let mut lines: Vec<String> = head
                .split("\r\n")
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    !l.starts_with("docker-content-digest:") && !l.starts_with("content-length:")
                })
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            lines.push(format!("Content-Length: {}", body_len + f.pad_manifests));
            let head = lines.join("\r\n") + "\r\n\r\n";
            let mut out = client;
            out.write_all(head.as_bytes())?;
            out.write_all(&resp[header_end..])?;
            return out.write_all(&vec![b' '; f.pad_manifests]);
        }
        if f.lie_about_manifest_digest && path.contains("/manifests/") {
            let head = String::from_utf8_lossy(&resp[..header_end]).into_owned();
            let lie = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
            let head: String = head
                .split("\r\n")
                .map(|l| {
                    if l.to_ascii_lowercase().starts_with("docker-content-digest:") {
                        format!("Docker-Content-Digest: {lie}")
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            resp = [head.as_bytes(), &resp[header_end..]].concat();
            let mut out = client;
            return out.write_all(&resp);
        }
        let mut out = client;
        if let (true, Some(every)) = (is_blob_get, f.slow_blobs) {
            out.write_all(&resp[..header_end])?;
            for b in &resp[header_end..] {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(every);
                out.write_all(&[*b])?;
                out.flush()?;
            }
            return Ok(());
        }
        if is_blob_get && body_len > 1024 && take_one(&self.drop_left) {
            out.write_all(&resp[..header_end + body_len / 2])?;
            out.flush()?;
            let _ = out.shutdown(Shutdown::Both);
            return Ok(());
        }
        out.write_all(&resp)
    }
}

/// `/v2/NAME/(manifests|blobs)/...` -> `NAME`.
fn repo_of(path: &str) -> String {
    let p = path.trim_start_matches("/v2/");
    for marker in ["/manifests/", "/blobs/", "/tags/"] {
        if let Some(i) = p.find(marker) {
            return p[..i].to_string();
        }
    }
    p.trim_end_matches('/').to_string()
}
