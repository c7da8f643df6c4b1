//! A small HTTP/1.1 proxy on 127.0.0.1 in front of a registry, to make it
//! misbehave on purpose: demand Basic or Bearer auth, answer 500, drop a
//! blob response half way, and count what was asked for.
//!
//! One request per connection (`Connection: close` is forced both ways),
//! which reqwest handles by reconnecting.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

/// How the proxy misbehaves.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Require `Authorization: Basic base64(user:pass)`.
    pub basic: Option<String>,
    /// Require a bearer token obtained from `/token` with these basic creds.
    pub bearer: Option<String>,
    /// Answer 500 to the first N blob requests.
    pub fail_blobs: u64,
    /// Answer 500 to every request.
    pub always_500: bool,
    /// Drop the first N blob responses (over 1 KiB) after half their body.
    pub drop_blobs: u64,
}

/// What the proxy saw.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests seen (method and path, with Range if any).
    pub requests: Mutex<Vec<String>>,
    /// Response body bytes sent for blob GETs.
    pub blob_bytes: AtomicU64,
}

/// A running proxy.
pub struct Proxy {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Counters.
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

const TOKEN: &str = "strata-test-token";

impl Proxy {
    /// Start a proxy to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str, faults: Faults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let fail_left = Arc::new(AtomicU64::new(faults.fail_blobs));
        let drop_left = Arc::new(AtomicU64::new(faults.drop_blobs));
        {
            let stats = stats.clone();
            let stop = stop.clone();
            let upstream = upstream.to_string();
            let me = addr.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let (stats, upstream, faults, fail_left, drop_left, me) = (
                        stats.clone(),
                        upstream.clone(),
                        faults.clone(),
                        fail_left.clone(),
                        drop_left.clone(),
                        me.clone(),
                    );
                    thread::spawn(move || {
                        let _ = handle(
                            conn, &upstream, &faults, &stats, &fail_left, &drop_left, &me,
                        );
                    });
                }
            });
        }
        Proxy { addr, stats, stop }
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<String> {
        self.stats.requests.lock().expect("lock").clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
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

fn b64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn handle(
    client: TcpStream,
    upstream: &str,
    faults: &Faults,
    stats: &Stats,
    fail_left: &AtomicU64,
    drop_left: &AtomicU64,
    me: &str,
) -> std::io::Result<()> {
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
    let range = headers
        .iter()
        .find(|h| h.to_ascii_lowercase().starts_with("range:"))
        .map(|h| h[6..].trim().to_string());
    stats.requests.lock().expect("lock").push(match &range {
        Some(r) => format!("{method} {path} range={r}"),
        None => format!("{method} {path}"),
    });
    let auth = headers
        .iter()
        .find(|h| h.to_ascii_lowercase().starts_with("authorization:"))
        .map(|h| h[14..].trim().to_string());

    if faults.always_500 {
        return respond(
            client,
            "500 Internal Server Error",
            &[],
            b"{\"errors\":[{\"code\":\"UNKNOWN\",\"message\":\"injected failure\"}]}",
        );
    }
    if let Some(creds) = &faults.bearer {
        if path.starts_with("/token") {
            if auth.as_deref() == Some(&format!("Basic {}", b64(creds))) {
                return respond(
                    client,
                    "200 OK",
                    &["Content-Type: application/json".into()],
                    format!("{{\"token\":\"{TOKEN}\"}}").as_bytes(),
                );
            }
            return respond(client, "401 Unauthorized", &[], b"");
        }
        if auth.as_deref() != Some(&format!("Bearer {TOKEN}")) {
            let ch = format!(
                "WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"test\",scope=\"repository:x:pull\""
            );
            return respond(
                client,
                "401 Unauthorized",
                &[ch],
                b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
            );
        }
    }
    if let Some(creds) = &faults.basic
        && auth.as_deref() != Some(&format!("Basic {}", b64(creds)))
    {
        return respond(
            client,
            "401 Unauthorized",
            &["WWW-Authenticate: Basic realm=\"test\"".into()],
            b"",
        );
    }
    let is_blob = path.contains("/blobs/sha256:");
    if is_blob
        && fail_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        return respond(client, "500 Internal Server Error", &[], b"");
    }

    // Forward upstream with Connection: close.
    let mut up = TcpStream::connect(upstream)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for h in &headers {
        let l = h.to_ascii_lowercase();
        if l.starts_with("connection:") || l.starts_with("host:") {
            continue;
        }
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Host: {upstream}\r\nConnection: close\r\n\r\n"));
    up.write_all(req.as_bytes())?;
    up.write_all(&body)?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    let header_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(resp.len());
    let body_len = resp.len() - header_end;
    let mut out = client;
    if is_blob
        && method == "GET"
        && body_len > 1024
        && drop_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    {
        let cut = header_end + body_len / 2;
        out.write_all(&resp[..cut])?;
        stats
            .blob_bytes
            .fetch_add((cut - header_end) as u64, Ordering::SeqCst);
        let _ = out.shutdown(std::net::Shutdown::Both);
        return Ok(());
    }
    if is_blob && method == "GET" {
        stats
            .blob_bytes
            .fetch_add(body_len as u64, Ordering::SeqCst);
    }
    out.write_all(&resp)
}
