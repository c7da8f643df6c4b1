//! `strata serve`, the conversion service, over real HTTP with a real
//! docker-registry: auth, every route's errors, a conversion verified from
//! the registry before it is tagged, identical requests made one job, a
//! second instance answering from the registry, the removed-format story
//! with `strata convert --via`, a verification failure that tags nothing,
//! a full queue, cancels, and a kill -9 mid-job.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use strata_testkit::Registry;
use strata_testkit::proxy::{Faults, Proxy};

const TOKEN: &str = "tok-3f9a-secret";

/// A `strata serve` process on a free port.
struct Service {
    child: Child,
    url: String,
    dir: PathBuf,
    args: Vec<String>,
}

impl Service {
    /// Start one with `config` (TOML; `tokens_file` is added) in `dir`.
    fn start(dir: &Path, config: &str) -> Service {
        std::fs::create_dir_all(dir).unwrap();
        let tokens = dir.join("tokens");
        std::fs::write(&tokens, format!("# the test's token\n{TOKEN}\n")).unwrap();
        let cfg = dir.join("serve.toml");
        std::fs::write(
            &cfg,
            format!("tokens_file = \"{}\"\n{config}", tokens.display()),
        )
        .unwrap();
        let port = strata_testkit::free_port();
        let args = vec![
            "--root".to_string(),
            dir.join("store").display().to_string(),
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--config".into(),
            cfg.display().to_string(),
        ];
        let mut s = Service {
            child: spawn(dir, &args),
            url: format!("http://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            args,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let t0 = Instant::now();
        loop {
            if let Ok(r) = reqwest::blocking::get(format!("{}/healthz", self.url))
                && r.status() == 200
            {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("strata serve exited ({st}): {}", self.log());
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    fn kill9_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.dir, &self.args);
        self.wait_ready();
    }

    fn client(&self) -> reqwest::blocking::Client {
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
    }

    /// `METHOD path` with the token: (status, JSON body or Null).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let c = self.client();
        let url = format!("{}{path}", self.url);
        let mut rb = match method {
            "GET" => c.get(url),
            "POST" => c.post(url),
            "DELETE" => c.delete(url),
            m => panic!("{m}"),
        }
        .bearer_auth(TOKEN);
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        let r = rb.send().unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Poll a job until it is over.
    fn wait_job(&self, id: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let (st, job) = self.call("GET", &format!("/v1/conversions/{id}"), None);
            assert_eq!(st, 200, "{job}");
            if ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap()) {
                return job;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "{job}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll a job until `f` holds.
    fn wait_for(&self, id: &str, f: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let (_, job) = self.call("GET", &format!("/v1/conversions/{id}"), None);
            if f(&job) {
                return job;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "{job}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn metric(&self, name: &str) -> f64 {
        let r = self
            .client()
            .get(format!("{}/metrics", self.url))
            .bearer_auth(TOKEN)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("serve.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .env("STRATA_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn config_for(hosts: &[&str], extra: &str) -> String {
    let list = hosts
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("{extra}\n[registries]\nallow = [{list}]\ninsecure = [{list}]\n")
}

/// The digest skopeo sees for a reference (what the source tag names).
fn skopeo_digest(reference: &str) -> String {
    format!("sha256:{}", sha256_hex(&raw_bytes(reference)))
}

/// The manifest (or index) bytes a reference names, as skopeo reads them.
fn raw_bytes(reference: &str) -> Vec<u8> {
    let out = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "skopeo inspect {reference}");
    out.stdout
}

/// The same, parsed.
fn raw_manifest(reference: &str) -> Value {
    serde_json::from_slice(&raw_bytes(reference)).unwrap()
}

fn sha256_hex(b: &[u8]) -> String {
    strata_digest::Digest::sha256_of(b).hex().to_string()
}

/// Tags of a repository (the registry's own list).
fn tags(addr: &str, repo: &str) -> Vec<String> {
    let r = reqwest::blocking::get(format!("http://{addr}/v2/{repo}/tags/list")).unwrap();
    let v: Value = r.json_or_null();
    let mut t: Vec<String> = v["tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    t.sort();
    t
}

trait JsonOrNull {
    fn json_or_null(self) -> Value;
}
impl JsonOrNull for reqwest::blocking::Response {
    fn json_or_null(self) -> Value {
        serde_json::from_slice(&self.bytes().unwrap_or_default()).unwrap_or(Value::Null)
    }
}

fn push_sample(reg: &Registry, repo_tag: &str) -> String {
    reg.push(&oci_ref(&sample_layout(), "latest"), repo_tag, &[]);
    format!("{}/{repo_tag}", reg.addr)
}

#[test]
fn auth_and_every_routes_errors() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let src = push_sample(&reg, "app:1");
    // a host that is not allowed: nothing may connect to it
    let fence = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    fence.set_nonblocking(true).unwrap();
    let fenced = fence.local_addr().unwrap().to_string();
    let svc = Service::start(dir.path(), &config_for(&[&reg.addr], ""));
    let c = svc.client();

    // open routes
    let r = c.get(format!("{}/healthz", svc.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(format!("{}/readyz", svc.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json_or_null()["checks"]["queue"], "0/64");

    // the OpenAPI document (generated from the handlers) is open, valid,
    // and lists every route this test drives
    let r = c.get(format!("{}/openapi.json", svc.url)).send().unwrap();
    assert_eq!(r.status(), 200);
    let doc_path = dir.path().join("openapi.json");
    std::fs::write(&doc_path, r.bytes().unwrap()).unwrap();
    let v = Command::new("python3")
        .args(["-m", "openapi_spec_validator"])
        .arg(&doc_path)
        .output()
        .expect("python3 with openapi-spec-validator (scripts/install-deps.sh installs it)");
    assert!(
        v.status.success(),
        "openapi_spec_validator: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&doc_path).unwrap()).unwrap();
    for (m, p) in [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/v1/formats"),
        ("post", "/v1/conversions"),
        ("get", "/v1/conversions"),
        ("get", "/v1/conversions/{id}"),
        ("delete", "/v1/conversions/{id}"),
    ] {
        assert!(
            doc["paths"][p][m].is_object(),
            "{m} {p} not in the OpenAPI document"
        );
    }

    // auth: missing, wrong, one byte off, one byte more, Basic
    let guarded = format!("{}/v1/formats", svc.url);
    let off = format!("{}X", &TOKEN[..TOKEN.len() - 1]);
    let more = format!("{TOKEN}x");
    for h in [
        None,
        Some("Bearer nope".to_string()),
        Some(format!("Bearer {off}")),
        Some(format!("Bearer {more}")),
        Some(format!("Basic {TOKEN}")),
    ] {
        let mut rb = c.get(&guarded);
        if let Some(h) = &h {
            rb = rb.header("authorization", h);
        }
        let r = rb.send().unwrap();
        assert_eq!(r.status(), 401, "{h:?}");
        assert_eq!(
            r.headers()["www-authenticate"],
            "Bearer realm=\"strata\"",
            "{h:?}"
        );
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        assert_eq!(r.json_or_null()["code"], "unauthorized");
    }

    // formats
    let (st, f) = svc.call("GET", "/v1/formats", None);
    assert_eq!(st, 200);
    let status_of = |name: &str| {
        f["formats"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .map(|x| x["status"].clone())
    };
    assert_eq!(status_of("zstd:chunked"), Some(json!("supported")));
    assert_eq!(status_of("zstd"), Some(json!("supported")));
    assert_eq!(status_of("overlaybd"), Some(json!("removed")));

    // request errors
    let post = |body: &[u8], ctype: &str| {
        let r = c
            .post(format!("{}/v1/conversions", svc.url))
            .bearer_auth(TOKEN)
            .header("content-type", ctype)
            .body(body.to_vec())
            .send()
            .unwrap();
        (r.status().as_u16(), r.json_or_null())
    };
    let (st, p) = post(b"{\"source\": ", "application/json");
    assert_eq!(
        (st, p["code"].as_str()),
        (400, Some("invalid-request")),
        "{p}"
    );
    let (st, p) = post(
        br#"{"source":"x","format":"zstd","extra":1}"#,
        "application/json",
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (400, Some("invalid-request")),
        "{p}"
    );
    let body = json!({"source": src, "format": "zstd:chunked"}).to_string();
    let (st, p) = post(body.as_bytes(), "text/plain");
    assert_eq!(
        (st, p["code"].as_str()),
        (415, Some("unsupported-media-type")),
        "{p}"
    );
    let big = format!(
        r#"{{"source":"{src}","format":"zstd","prefetch_list":["/{}"]}}"#,
        "a".repeat(64 * 1024)
    );
    let (st, p) = post(big.as_bytes(), "application/json");
    assert_eq!(
        (st, p["code"].as_str()),
        (413, Some("body-too-large")),
        "{p}"
    );
    let (st, p) = svc.call(
        "POST",
        "/v1/conversions",
        Some(&json!({"source": format!("{fenced}/app:1"), "format": "zstd:chunked"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (403, Some("registry-not-allowed")),
        "{p}"
    );
    let (st, p) = svc.call(
        "POST",
        "/v1/conversions",
        Some(&json!({"source": src, "format": "zstd:chunked", "target": format!("{fenced}/out")})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (403, Some("registry-not-allowed")),
        "{p}"
    );
    assert!(
        fence.accept().is_err(),
        "nothing may connect to a registry that is not allowed"
    );
    let (st, p) = svc.call(
        "POST",
        "/v1/conversions",
        Some(&json!({"source": format!("{}/nothing:1", reg.addr), "format": "zstd:chunked"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (404, Some("source-not-found")),
        "{p}"
    );
    let (st, p) = svc.call(
        "POST",
        "/v1/conversions",
        Some(&json!({"source": src, "format": "zstd:chunked", "prefetch": "list"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (400, Some("invalid-request")),
        "{p}"
    );
    let (st, p) = svc.call("GET", "/v1/conversions/c-nothing-1", None);
    assert_eq!(
        (st, p["code"].as_str()),
        (404, Some("job-not-found")),
        "{p}"
    );
    let (st, p) = svc.call("DELETE", "/v1/conversions/c-nothing-1", None);
    assert_eq!(
        (st, p["code"].as_str()),
        (404, Some("job-not-found")),
        "{p}"
    );
    let (st, p) = svc.call("GET", "/v1/nothing", None);
    assert_eq!(st, 404, "{p}");

    // metrics parse as Prometheus text
    let text = c
        .get(format!("{}/metrics", svc.url))
        .bearer_auth(TOKEN)
        .send()
        .unwrap()
        .text()
        .unwrap();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("{l}"));
        v.parse::<f64>().unwrap_or_else(|_| panic!("{l}"));
    }
    assert!(
        text.contains("strata_serve_jobs{state=\"queued\"} 0"),
        "{text}"
    );

    // an empty tokens file refuses everything
    drop(svc);
    let dir2 = tempfile::tempdir().unwrap();
    let svc2 = Service::start(dir2.path(), "");
    std::fs::write(dir2.path().join("tokens"), "").unwrap();
    let mut svc2 = svc2;
    svc2.kill9_and_restart();
    let (st, _) = svc2.call("GET", "/v1/formats", None);
    assert_eq!(st, 401);

    // every request is logged once with its id; the token never is
    let r = c.get(format!("{}/v1/formats", svc2.url)).send().unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let log2 = svc2.log();
    assert!(
        log2.contains(&format!("request {id}: GET /v1/formats -> 401")),
        "{log2}"
    );
    let log = std::fs::read_to_string(dir.path().join("serve.log")).unwrap();
    assert!(log.contains("-> 401"), "requests are logged: {log}");
    assert!(!log.contains(TOKEN) && !log.contains(&off), "{log}");
}

/// One conversion end to end: 100 identical requests make one job; it is
/// verified from the registry and only then tagged; its result pulls to
/// the source's tree; an identical request answers 200; a second
/// instance with its own store answers from the registry; the client
/// gets the converted digest.
#[test]
fn a_conversion_is_verified_then_tagged_and_shared() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let src = push_sample(&reg, "app:1");
    let svc = Service::start(&dir.path().join("a"), &config_for(&[&reg.addr], ""));
    let body = json!({"source": src, "format": "zstd:chunked", "target": format!("{}/app:1-lazy", reg.addr)});

    let answers: Vec<(u16, Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..100)
            .map(|_| s.spawn(|| svc.call("POST", "/v1/conversions", Some(&body))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ids: std::collections::BTreeSet<_> =
        answers.iter().map(|(_, j)| j["id"].to_string()).collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(answers.iter().all(|(s, _)| *s == 200 || *s == 202));
    let id = answers[0].1["id"].as_str().unwrap().to_string();

    let job = svc.wait_job(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{}", svc.log());
    assert_eq!(svc.metric("strata_serve_conversions_started_total"), 1.0);
    let source_digest = skopeo_digest(&src);
    assert_eq!(job["source"]["digest"], source_digest.as_str());
    let checks: Vec<&str> = job["verification"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["ok"], true, "{c}");
            c["name"].as_str().unwrap()
        })
        .collect();
    for c in [
        "manifest-digest",
        "config-runtime",
        "config-diff-ids",
        "toc-digest",
        "blob-digest",
        "layer-diff-id",
        "tree-digest",
    ] {
        assert!(checks.contains(&c), "{c} not in {checks:?}");
    }
    assert_eq!(job["verification"]["ok"], true);

    // the tags name the verified digest; the manifest links the source
    let digest = job["result"]["digest"].as_str().unwrap().to_string();
    let det = job["result"]["tags"][0].as_str().unwrap();
    assert!(
        det.starts_with(&format!(
            "sha256-{}.strata.zstd-chunked.",
            &source_digest[7..]
        )),
        "{det}"
    );
    assert_eq!(skopeo_digest(&format!("{}/app:1-lazy", reg.addr)), digest);
    assert_eq!(skopeo_digest(&format!("{}/app:{det}", reg.addr)), digest);
    let m = raw_manifest(&format!("{}/app@{digest}", reg.addr));
    assert_eq!(m["subject"]["digest"], source_digest.as_str(), "{m}");
    assert_eq!(
        m["annotations"]["dev.strata.convert.key"], job["key"],
        "{m}"
    );

    // the referrers fallback index of the source names it
    let index = raw_manifest(&format!("{}/app:sha256-{}", reg.addr, &source_digest[7..]));
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    let entries = index["manifests"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{index}");
    assert_eq!(entries[0]["digest"], digest.as_str());
    assert_eq!(
        entries[0]["annotations"]["dev.strata.convert.format"],
        "zstd:chunked"
    );

    // strata pulls it lazily-formatted back to the source's tree
    let env = Env::new();
    let pulled = |r: &str| {
        env.ok(&["--quiet", "pull", "--plain-http", r])
            .trim()
            .to_string()
    };
    let (a, b) = (
        pulled(&src),
        pulled(job["result"]["reference"].as_str().unwrap()),
    );
    assert_ne!(a, b);
    let tree = |d: &str| env.json(&["inspect", d])["tree"]["tree_digest"].clone();
    assert_eq!(tree(&a), tree(&b));
    assert!(tree(&a).is_string());

    // the same request: the finished job, 200
    let (st, again) = svc.call("POST", "/v1/conversions", Some(&body));
    assert_eq!(
        (st, again["id"].as_str()),
        (200, Some(id.as_str())),
        "{again}"
    );
    // found by source, by reference and by digest
    for q in [src.clone(), source_digest.clone()] {
        let (st, l) = svc.call("GET", &format!("/v1/conversions?source={q}"), None);
        assert_eq!(st, 200);
        assert_eq!(l["jobs"][0]["id"], id.as_str(), "{q}: {l}");
    }
    let (st, p) = svc.call("DELETE", &format!("/v1/conversions/{id}"), None);
    assert_eq!((st, p["code"].as_str()), (409, Some("job-finished")), "{p}");

    // a second instance, its own store: the registry is the cache
    let svc_b = Service::start(&dir.path().join("b"), &config_for(&[&reg.addr], ""));
    let (st, b) = svc_b.call("POST", "/v1/conversions", Some(&body));
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["result"]["cache"], "registry", "{b}");
    assert_eq!(b["result"]["digest"], digest.as_str());
    assert_eq!(svc_b.metric("strata_serve_conversions_started_total"), 0.0);

    // the client side
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "convert",
            "--via",
            &svc.url,
            &src,
            &format!("{}/app:1-lazy", reg.addr),
        ])
        .env("STRATA_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), digest);
}

/// rchab's story: a service that removed a format, an old client asking
/// for it. The client warns that lazy loading is not used and why, prints
/// the source's digest to deploy, exits 0 (1 with --require), and
/// nothing is written to the registry.
#[test]
fn old_client_asking_for_a_removed_format_gets_the_source_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let src = push_sample(&reg, "app:1");
    let svc = Service::start(
        dir.path(),
        &config_for(&[&reg.addr], "[formats]\ndisabled = [\"zstd:chunked\"]\n"),
    );
    let source_digest = skopeo_digest(&src);
    let before = tags(&reg.addr, "app");
    let convert = |format: &str, extra: &[&str], url: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["convert", "--via", url, &src, "--format", format])
            .args(extra)
            .env("STRATA_TOKEN", TOKEN)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (format, status, code) in [
        ("zstd:chunked", 410, "format-removed"),
        ("overlaybd", 410, "format-removed"),
        ("foo", 422, "format-unknown"),
    ] {
        let (exit, stdout, stderr) = convert(format, &[], &svc.url);
        assert_eq!(exit, Some(0), "{format}: {stderr}");
        assert_eq!(stdout, source_digest, "{format}: {stderr}");
        assert!(
            stderr.contains("warning: lazy loading is not used")
                && stderr.contains(&format!("answered {status} {code}")),
            "{format}: {stderr}"
        );
        let (exit, stdout, _) = convert(format, &["--require"], &svc.url);
        assert_eq!((exit, stdout.as_str()), (Some(1), source_digest.as_str()));
        // the answer itself
        let (st, p) = svc.call(
            "POST",
            "/v1/conversions",
            Some(&json!({"source": src, "format": format})),
        );
        assert_eq!((st, p["code"].as_str()), (status, Some(code)), "{p}");
        assert_eq!(p["fallback"]["action"], "use-source");
        assert_eq!(p["fallback"]["source_digest"], source_digest.as_str());
    }
    // zstd is still offered; the removed one is listed as removed
    let (_, f) = svc.call("GET", "/v1/formats", None);
    let zc = f["formats"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "zstd:chunked")
        .unwrap()
        .clone();
    assert_eq!(zc["status"], "removed", "{f}");
    assert_eq!(tags(&reg.addr, "app"), before, "nothing was tagged");
    // no service at all: the client resolves the source itself
    let (exit, stdout, stderr) = convert("zstd:chunked", &["--plain-http"], "http://127.0.0.1:9");
    assert_eq!(
        (exit, stdout.as_str()),
        (Some(0), source_digest.as_str()),
        "{stderr}"
    );
    assert!(stderr.contains("could not be reached"), "{stderr}");
    // a wrong token is an error, not a fallback
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["convert", "--via", &svc.url, &src, "--format", "zstd"])
        .env("STRATA_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

/// The registry serves the pushed image's TOC ranges wrong: the job fails
/// naming the check, and no tag is written.
#[test]
fn a_result_the_registry_serves_wrong_fails_its_check_and_tags_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    push_sample(&reg, "app:1");
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            shift_ranges: true,
            ..Default::default()
        },
    );
    let svc = Service::start(dir.path(), &config_for(&[&proxy.addr], ""));
    let (st, job) = svc.call(
        "POST",
        "/v1/conversions",
        Some(&json!({"source": format!("{}/app:1", proxy.addr), "format": "zstd:chunked", "target": format!("{}/app:bad", proxy.addr)})),
    );
    assert_eq!(st, 202, "{job}");
    let job = svc.wait_job(job["id"].as_str().unwrap());
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "verification-failed", "{job}");
    assert_eq!(job["error"]["check"], "toc-digest", "{job}");
    assert_eq!(job["verification"]["ok"], false);
    let t = tags(&reg.addr, "app");
    assert_eq!(t, ["1"], "nothing tagged: {t:?}");
    assert_eq!(
        svc.metric("strata_serve_verification_failures_total{check=\"toc-digest\"}"),
        1.0
    );
}

/// One worker, a queue of one, a slow registry: the next distinct
/// request gets 429 with Retry-After; a queued job cancels at once, a
/// running one at its next step, and neither is tagged. Then a kill -9
/// mid-job: the restarted service runs the job again to success.
#[test]
fn queue_full_cancels_and_a_kill_mid_job() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    push_sample(&reg, "app:1");
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            slow_blobs: Some(Duration::from_millis(2)),
            ..Default::default()
        },
    );
    let mut svc = Service::start(
        dir.path(),
        &config_for(&[&proxy.addr], "workers = 1\nqueue = 1\n"),
    );
    let src = format!("{}/app:1", proxy.addr);
    let post = |svc: &Service, tag: &str| {
        svc.call(
            "POST",
            "/v1/conversions",
            Some(&json!({"source": src, "format": "zstd", "target": format!("{}/app:{tag}", proxy.addr)})),
        )
    };
    let (st, a) = post(&svc, "a");
    assert_eq!(st, 202, "{a}");
    let a = a["id"].as_str().unwrap().to_string();
    svc.wait_for(&a, |j| j["state"] == "running");
    let (st, b) = post(&svc, "b");
    assert_eq!(st, 202, "{b}");
    let b = b["id"].as_str().unwrap().to_string();
    let (st, c) = post(&svc, "c");
    assert_eq!((st, c["code"].as_str()), (429, Some("queue-full")), "{c}");
    assert!(c["retry_after_s"].as_u64().unwrap() >= 1, "{c}");
    let r = svc
        .client()
        .get(format!("{}/readyz", svc.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 503, "a full queue is not ready");

    // cancel the queued one: at once; the running one: at its next step
    let (st, j) = svc.call("DELETE", &format!("/v1/conversions/{b}"), None);
    assert_eq!((st, j["state"].as_str()), (200, Some("cancelled")), "{j}");
    let (st, j) = svc.call("DELETE", &format!("/v1/conversions/{a}"), None);
    assert_eq!(st, 202, "{j}");
    assert_eq!(j["cancel_requested"], true);
    let j = svc.wait_job(&a);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(tags(&reg.addr, "app"), ["1"], "nothing tagged");

    // submitted again: attempt 2; killed mid-job, then it finishes
    let (st, a2) = post(&svc, "a");
    assert_eq!(st, 202, "{a2}");
    let a2 = a2["id"].as_str().unwrap().to_string();
    assert!(a2.ends_with("-2"), "{a2}");
    svc.wait_for(&a2, |j| j["state"] == "running");
    svc.kill9_and_restart();
    let j = svc.wait_job(&a2);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", svc.log());
    assert_eq!(j["runs"], 2, "{j}");
    assert!(tags(&reg.addr, "app").contains(&"a".to_string()));
    // cancelled while verifying: nothing tagged; killed while verifying:
    // the restarted service runs it again to success
    let (st, v) = post(&svc, "v");
    assert_eq!(st, 202, "{v}");
    let v = v["id"].as_str().unwrap().to_string();
    svc.wait_for(&v, |j| j["state"] == "verifying");
    let (st, j) = svc.call("DELETE", &format!("/v1/conversions/{v}"), None);
    assert_eq!(st, 202, "{j}");
    let j = svc.wait_job(&v);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert!(!tags(&reg.addr, "app").contains(&"v".to_string()));
    let (st, w) = post(&svc, "w");
    assert_eq!(st, 202, "{w}");
    let w = w["id"].as_str().unwrap().to_string();
    svc.wait_for(&w, |j| j["state"] == "verifying");
    svc.kill9_and_restart();
    let j = svc.wait_job(&w);
    assert_eq!(
        (j["state"].as_str(), j["runs"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{j}"
    );
    assert!(tags(&reg.addr, "app").contains(&"w".to_string()));

    // SIGTERM with a job running: the service stops within its grace
    // (the job finishes in it or stays journaled as running) and the
    // next start finishes the job
    let (st, t) = post(&svc, "t");
    assert_eq!(st, 202, "{t}");
    let t = t["id"].as_str().unwrap().to_string();
    svc.wait_for(&t, |j| j["state"] == "running");
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&svc.child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = svc.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", svc.log());
    // finished within the 5 s grace, or journaled as running
    let rec: Value = serde_json::from_slice(
        &std::fs::read(svc.dir.join(format!("store/serve/jobs/{t}.json"))).unwrap(),
    )
    .unwrap();
    assert!(
        ["running", "verifying", "succeeded"].contains(&rec["state"].as_str().unwrap()),
        "{rec}"
    );
    svc.kill9_and_restart();
    let j = svc.wait_job(&t);
    assert_eq!(j["state"], "succeeded", "{j}\n{}", svc.log());

    // a torn record beside it: set aside at the next start, the rest load
    std::fs::write(svc.dir.join("store/serve/jobs/c-torn-1.json"), b"{\"id\":").unwrap();
    svc.kill9_and_restart();
    let (st, j) = svc.call("GET", &format!("/v1/conversions/{a2}"), None);
    assert_eq!((st, j["state"].as_str()), (200, Some("succeeded")));
    assert!(svc.dir.join("store/serve/corrupt/c-torn-1.json").exists());
    // retention: at 0 days the next start drops every finished job and
    // the store's names for their sources
    let cfg = svc.dir.join("serve.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, format!("retention_days = 0\n{text}")).unwrap();
    let names = |svc: &Service| {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--root")
            .arg(svc.dir.join("store"))
            .args(["--json", "images"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(names(&svc).contains("serve/"), "{}", names(&svc));
    std::thread::sleep(Duration::from_millis(1100));
    svc.kill9_and_restart();
    let (st, p) = svc.call("GET", &format!("/v1/conversions/{a2}"), None);
    assert_eq!(
        (st, p["code"].as_str()),
        (404, Some("job-not-found")),
        "{p}"
    );
    assert!(!names(&svc).contains("serve/"), "{}", names(&svc));

    // the store is consistent
    let fsck = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--root")
        .arg(svc.dir.join("store"))
        .arg("fsck")
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// VM templates over the same API: built from an image, checked (e2fsck,
/// size, the image's tree in the ext4), an identical request answered
/// from the finished job; grown from that template and pushed once
/// checked; `strata rootfs pull` gets the same template.
#[test]
fn templates_are_built_checked_cached_and_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let src = push_sample(&reg, "app:1");
    let svc = Service::start(dir.path(), &config_for(&[&reg.addr], ""));
    let body = json!({"from": {"image": src}, "size": "64MiB"});
    let (st, job) = svc.call("POST", "/v1/templates", Some(&body));
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("t-"), "{id}");
    let wait = |id: &str| {
        let t0 = Instant::now();
        loop {
            let (st, j) = svc.call("GET", &format!("/v1/templates/{id}"), None);
            assert_eq!(st, 200, "{j}");
            if ["succeeded", "failed", "cancelled"].contains(&j["state"].as_str().unwrap()) {
                return j;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{j}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let job = wait(&id);
    assert_eq!(job["state"], "succeeded", "{job}\n{}", svc.log());
    let checks: Vec<(&str, bool)> = job["verification"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        checks,
        [("size", true), ("e2fsck-clean", true), ("tree-equal", true)],
        "{job}"
    );
    let template = job["result"]["digest"].as_str().unwrap().to_string();
    assert_eq!(job["result"]["layers"]["size"], 64 << 20, "{job}");
    // the same request: the finished job; a conversion route does not
    // know a template job
    let (st, again) = svc.call("POST", "/v1/templates", Some(&body));
    assert_eq!(
        (st, again["id"].as_str()),
        (200, Some(id.as_str())),
        "{again}"
    );
    let (st, _) = svc.call("GET", &format!("/v1/conversions/{id}"), None);
    assert_eq!(st, 404);
    let (st, l) = svc.call("GET", &format!("/v1/templates?source={src}"), None);
    assert_eq!(
        (st, l["jobs"][0]["id"].as_str()),
        (200, Some(id.as_str())),
        "{l}"
    );

    // grown from the template and pushed, last
    let pushed = format!("{}/vm:big", reg.addr);
    let (st, job) = svc.call(
        "POST",
        "/v1/templates",
        Some(&json!({"from": {"template": template}, "size": 128 << 20, "push": pushed})),
    );
    assert_eq!(st, 202, "{job}");
    let job = wait(job["id"].as_str().unwrap());
    assert_eq!(job["state"], "succeeded", "{job}\n{}", svc.log());
    let names: Vec<&str> = job["verification"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["size", "e2fsck-clean"], "{job}");
    assert_eq!(
        job["result"]["layers"]["parent"],
        template.as_str(),
        "{job}"
    );
    assert!(
        job["result"]["reference"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/vm@sha256:", reg.addr))
    );
    // an image laid over it: the ext4 holds both trees (checked:
    // tree-equal against the image with the add laid over it)
    reg.push(&oci_ref(&synth_layout(), "gnu"), "synth:gnu", &[]);
    let (st, added) = svc.call(
        "POST",
        "/v1/templates",
        Some(&json!({"from": {"image": src}, "size": "64MiB", "add": [{"image": format!("{}/synth:gnu", reg.addr)}]})),
    );
    assert_eq!(st, 202, "{added}");
    let added = wait(added["id"].as_str().unwrap());
    assert_eq!(added["state"], "succeeded", "{added}\n{}", svc.log());
    let with_add: Vec<(&str, bool)> = added["verification"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        with_add,
        [("size", true), ("e2fsck-clean", true), ("tree-equal", true)],
        "{added}"
    );
    assert_ne!(
        added["result"]["digest"],
        template.as_str(),
        "the add changed the template"
    );
    let env = Env::new();
    let got = env.json(&[
        "rootfs",
        "pull",
        &format!("docker://{pushed}"),
        "--plain-http",
        "--all",
    ]);
    assert_eq!(got["id"], job["result"]["digest"], "{got}");

    // what is refused
    for (body, status, code) in [
        (
            json!({"from": {"image": src, "template": template}, "size": "64MiB"}),
            400,
            "invalid-request",
        ),
        (
            json!({"from": {"template": "nothing"}, "size": "64MiB"}),
            404,
            "template-not-found",
        ),
        (
            json!({"from": {"image": src}, "size": "1KiB"}),
            400,
            "invalid-request",
        ),
        (
            json!({"from": {"image": src}, "size": "64MiB", "push": format!("{}/vm@{template}", reg.addr)}),
            400,
            "invalid-request",
        ),
        (
            json!({"from": {"image": src}, "size": "64MiB", "push": "127.0.0.1:1/vm:x"}),
            403,
            "registry-not-allowed",
        ),
    ] {
        let (st, p) = svc.call("POST", "/v1/templates", Some(&body));
        assert_eq!(
            (st, p["code"].as_str()),
            (status, Some(code)),
            "{body}: {p}"
        );
    }
}

/// `prefetch: optimize`: the service runs the image (here a given
/// command) over a lazy mount of a first conversion, records what it
/// reads, and places that first in the result, which is verified as
/// any other.
#[test]
fn optimize_records_what_the_image_reads_and_places_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "py:1", &[]);
    let src = format!("{}/py:1", reg.addr);
    // not unless configured: it runs the image's code
    let off = Service::start(&dir.path().join("off"), &config_for(&[&reg.addr], ""));
    let (st, p) = off.call(
        "POST",
        "/v1/conversions",
        Some(&json!({"source": src, "format": "zstd:chunked", "prefetch": "optimize"})),
    );
    assert_eq!(
        (st, p["code"].as_str()),
        (403, Some("optimize-disabled")),
        "{p}"
    );
    drop(off);
    let svc = Service::start(
        &dir.path().join("on"),
        &config_for(&[&reg.addr], "allow_optimize = true\n"),
    );
    for (body, what) in [
        (
            json!({"source": src, "format": "zstd:chunked", "prefetch": "optimize", "prefetch_list": ["/a"]}),
            "a list",
        ),
        (
            json!({"source": src, "format": "zstd:chunked", "optimize": {"cmd": ["true"], "timeout_s": 5}}),
            "optimize without prefetch optimize",
        ),
        (
            json!({"source": src, "format": "zstd:chunked", "prefetch": "optimize", "optimize": {"timeout_s": 0}}),
            "no time",
        ),
    ] {
        let (st, p) = svc.call("POST", "/v1/conversions", Some(&body));
        assert_eq!(
            (st, p["code"].as_str()),
            (400, Some("invalid-request")),
            "{what}: {p}"
        );
    }
    let (st, job) = svc.call(
        "POST",
        "/v1/conversions",
        Some(&json!({
            "source": src,
            "format": "zstd:chunked",
            "prefetch": "optimize",
            "optimize": {"cmd": ["python3", "-c", "import json; print(1)"], "timeout_s": 60},
            "target": format!("{}/py:lazy", reg.addr),
        })),
    );
    assert_eq!(st, 202, "{job}");
    let job = svc.wait_job(job["id"].as_str().unwrap());
    assert_eq!(job["state"], "succeeded", "{job}\n{}", svc.log());
    assert_eq!(job["verification"]["ok"], true, "{job}");
    let recorded: Vec<&str> = job["result"]["recorded"]
        .as_array()
        .unwrap_or_else(|| panic!("nothing recorded: {job}\n{}", svc.log()))
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(
        recorded.first(),
        Some(&"/usr/bin/python3.11"),
        "{recorded:?}"
    );
    assert!(
        recorded
            .iter()
            .any(|p| p.starts_with("/usr/lib/python3.11/json/")),
        "{recorded:?}"
    );
    let placed: u64 = job["result"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["placed_first"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        placed as usize >= recorded.len(),
        "{placed} placed for {} recorded",
        recorded.len()
    );
    // the list travels in the manifest
    let m = raw_manifest(&format!("{}/py:lazy", reg.addr));
    assert_eq!(
        m["annotations"]["dev.strata.lazy.prefetch"],
        recorded.join("\n"),
        "{m}"
    );
    // the client asks the same: the finished job's result
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "convert",
            "--via",
            &svc.url,
            &src,
            &format!("{}/py:lazy", reg.addr),
        ])
        .args([
            "--optimize",
            "--timeout",
            "60",
            "--cmd",
            "python3",
            "-c",
            "import json; print(1)",
        ])
        .env("STRATA_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        job["result"]["digest"].as_str().unwrap()
    );
    // the lazy mount it ran on is gone
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains(dir.path().to_str().unwrap()), "{info}");
}

/// The Debian + python image takes seconds to convert and push: a cancel
/// then ends the job with nothing tagged, and a kill -9 then makes the
/// restarted service run it again to a verified result, the only thing
/// its tag ever names.
#[test]
fn a_cancel_and_a_kill_while_converting_and_pushing() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "py:1", &[]);
    let src = format!("{}/py:1", reg.addr);
    let mut svc = Service::start(dir.path(), &config_for(&[&reg.addr], ""));
    let post = |svc: &Service, tag: &str| {
        let body = json!({"source": src, "format": "zstd:chunked", "target": format!("{}/py:{tag}", reg.addr)});
        let (st, j) = svc.call("POST", "/v1/conversions", Some(&body));
        assert_eq!(st, 202, "{j}");
        j["id"].as_str().unwrap().to_string()
    };
    let converting = |j: &Value| j["progress"]["phase"] == "converting";

    let c = post(&svc, "c");
    svc.wait_for(&c, converting);
    let (st, j) = svc.call("DELETE", &format!("/v1/conversions/{c}"), None);
    assert_eq!(st, 202, "{j}");
    let j = svc.wait_job(&c);
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(tags(&reg.addr, "py"), ["1"], "nothing tagged");

    let k = post(&svc, "k");
    svc.wait_for(&k, converting);
    svc.kill9_and_restart();
    assert!(
        !tags(&reg.addr, "py").contains(&"k".to_string()),
        "tagged before verified"
    );
    let j = svc.wait_job(&k);
    assert_eq!(
        (j["state"].as_str(), j["runs"].as_u64()),
        (Some("succeeded"), Some(2)),
        "{j}\n{}",
        svc.log()
    );
    assert_eq!(
        skopeo_digest(&format!("{}/py:k", reg.addr)),
        j["result"]["digest"].as_str().unwrap()
    );
}
