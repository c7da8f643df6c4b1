//! Pulls from Debian's docker-registry on 127.0.0.1, directly and through a
//! misbehaving proxy: gzip and zstd layers, auth (basic, bearer), 404,
//! 500s (retried, then fatal), connections dropped mid-blob (resumed).

mod common;
use common::proxy::{Faults, Proxy};
use common::*;

fn push_sample(reg: &Registry) -> String {
    let src = format!("oci:{}:latest", sample_layout().display());
    reg.push(&src, "sample/hello:v1", &[]);
    format!("docker://{}/sample/hello:v1", reg.addr)
}

#[test]
fn registry_pull_gzip_and_zstd_equals_umoci() {
    let reg = Registry::start();
    let env = Env::new();
    let layout = synth_layout();
    reg.push(&oci_ref(&layout, "mixed"), "synth/mixed:gzip", &[]);
    reg.push_zstd(&oci_ref(&layout, "mixed"), "synth-zstd/mixed:zstd");
    // (a separate repository: skopeo reuses blobs a repository already has
    // instead of recompressing them)
    for (repo, tag) in [("synth/mixed", "gzip"), ("synth-zstd/mixed", "zstd")] {
        let r = format!("docker://{}/{repo}:{tag}", reg.addr);
        let s = env.json(&["pull", "--plain-http", &r]);
        let insp = env.json(&["inspect", &r]);
        for l in insp["layers"].as_array().unwrap() {
            assert!(l["media_type"].as_str().unwrap().ends_with(tag), "{insp}");
        }
        env.assert_export_matches_umoci(&layout, "mixed", &r);
        // pull by digest resolves to the same image
        let d = s["manifest_digest"].as_str().unwrap();
        let by_digest = format!("docker://{}/{repo}@{d}", reg.addr);
        let s2 = env.json(&["pull", "--plain-http", &by_digest]);
        assert_eq!(s2["manifest_digest"], s["manifest_digest"]);
        assert_eq!(s2["bytes_downloaded"], 0);
    }
    // the zstd image has other blobs but the same diff_ids
    assert_layers_rebuild(&env.root());
    env.fsck_ok();
}

#[test]
fn plain_http_is_refused_unless_asked() {
    let reg = Registry::start();
    let env = Env::new();
    let r = push_sample(&reg);
    let t = std::time::Instant::now();
    let err = env.fails(&["pull", &r]);
    assert!(err.contains(&reg.addr), "{err}");
    assert!(err.contains("did not answer in TLS"), "{err}");
    assert!(err.contains("--plain-http"), "{err}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "retried: {:?}",
        t.elapsed()
    );
    // registries.json names the host: plain HTTP without the flag
    std::fs::create_dir_all(env.root()).unwrap();
    std::fs::write(
        env.root().join("registries.json"),
        format!("{{\"insecure\": [\"{}\"]}}", reg.addr),
    )
    .unwrap();
    env.ok(&["pull", &r]);
    // a registries.json that does not parse is refused, naming the file,
    // instead of being ignored (which would quietly turn TLS back on)
    let conf = env.root().join("registries.json");
    std::fs::write(&conf, format!("{{\"insecure\": \"{}\"", reg.addr)).unwrap();
    let err = env.fails(&["pull", &r]);
    assert!(
        err.contains(&format!(
            "reading registry configuration {}",
            conf.display()
        )),
        "{err}"
    );
}

#[test]
fn https_registries_are_verified_against_the_system_roots() {
    let (reg, ca) = Registry::start_tls();
    let env = Env::new();
    let r = push_sample(&reg);
    // a CA nobody trusts: refused, naming the certificate
    let out = env
        .cmd()
        .env("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
        .args(["pull", &r])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("TLS certificate was refused"), "{err}");
    assert!(err.contains("SSL_CERT_FILE"), "{err}");
    assert!(err.contains(&reg.addr), "{err}");
    // refused at once: a certificate does not change between attempts
    let t = std::time::Instant::now();
    env.fails(&["pull", &r]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    // the same registry once its CA is trusted
    let out = env
        .cmd()
        .env("SSL_CERT_FILE", &ca)
        .args(["pull", &r])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.fsck_ok();
}

#[test]
fn not_found_and_server_errors_are_named() {
    let reg = Registry::start();
    let env = Env::new();
    push_sample(&reg);
    let missing = format!("docker://{}/sample/hello:nope", reg.addr);
    let err = env.fails(&["pull", "--plain-http", &missing]);
    assert!(
        err.contains("404") && err.contains("MANIFEST_UNKNOWN"),
        "{err}"
    );
    let norepo = format!("docker://{}/no/such:v1", reg.addr);
    let err = env.fails(&["pull", "--plain-http", &norepo]);
    assert!(err.contains("404"), "{err}");

    let broken = Proxy::start(
        &reg.addr,
        Faults {
            always_500: true,
            ..Faults::default()
        },
    );
    let r = format!("docker://{}/sample/hello:v1", broken.addr);
    let err = env.fails(&["pull", "--plain-http", &r]);
    assert!(
        err.contains("500") && err.contains("injected failure"),
        "{err}"
    );
    // retried before giving up
    assert!(broken.requests().len() >= 5, "{:?}", broken.requests());
    env.fsck_ok();
}

#[test]
fn transient_500s_and_dropped_connections_are_retried_and_resumed() {
    let reg = Registry::start();
    let env = Env::new();
    let layout = synth_layout();
    reg.push(&oci_ref(&layout, "gnu"), "synth/gnu:v1", &[]);
    let flaky = Proxy::start(
        &reg.addr,
        Faults {
            fail_blobs: 2,
            drop_blobs: 2,
            ..Faults::default()
        },
    );
    let r = format!("docker://{}/synth/gnu:v1", flaky.addr);
    env.ok(&["pull", "--plain-http", &r]);
    let reqs = flaky.requests();
    assert!(
        reqs.iter().any(|r| r.contains("range=bytes=")),
        "a dropped blob should be resumed with Range: {reqs:?}"
    );
    env.assert_export_matches_umoci(&layout, "gnu", &r);
    env.fsck_ok();
}

#[test]
fn basic_and_bearer_auth_from_auth_files() {
    let reg = Registry::start();
    let env = Env::new();
    push_sample(&reg);
    for (kind, faults) in [
        (
            "basic",
            Faults {
                basic: Some("alice:s3cret".into()),
                ..Faults::default()
            },
        ),
        (
            "bearer",
            Faults {
                bearer: Some("alice:s3cret".into()),
                ..Faults::default()
            },
        ),
    ] {
        let proxy = Proxy::start(&reg.addr, faults);
        let r = format!("docker://{}/sample/hello:v1", proxy.addr);
        // no credentials: a clear auth error that names the host
        let err = env.fails(&["pull", "--plain-http", &r]);
        assert!(
            err.contains("authentication") && err.contains(&proxy.addr),
            "{kind}: {err}"
        );
        // wrong credentials: same, and the password never shows
        let bad = env.path(&format!("{kind}-bad.json"));
        std::fs::write(
            &bad,
            format!(
                "{{\"auths\":{{\"{}\":{{\"auth\":\"{}\"}}}}}}",
                proxy.addr,
                b64("alice:wrongpw")
            ),
        )
        .unwrap();
        let err = env.fails(&[
            "pull",
            "--plain-http",
            "--authfile",
            bad.to_str().unwrap(),
            &r,
        ]);
        assert!(err.contains("authentication"), "{kind}: {err}");
        assert!(
            !err.contains("wrongpw") && !err.contains(&b64("alice:wrongpw")),
            "{kind}: {err}"
        );
        // right credentials via REGISTRY_AUTH_FILE
        let good = env.path(&format!("{kind}.json"));
        std::fs::write(
            &good,
            format!(
                "{{\"auths\":{{\"{}\":{{\"auth\":\"{}\"}}}}}}",
                proxy.addr,
                b64("alice:s3cret")
            ),
        )
        .unwrap();
        let out = env
            .cmd()
            .env("REGISTRY_AUTH_FILE", &good)
            .args(["pull", "--plain-http", &r])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains("s3cret"), "{kind}: secret leaked: {all}");
    }
}

fn b64(s: &str) -> String {
    let out = std::process::Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}
