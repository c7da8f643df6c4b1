//! Sources against real peers: Debian's docker-registry on 127.0.0.1 (fed
//! by skopeo), a misbehaving proxy in front of it, and OCI layouts and
//! docker archives built on disk.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{Faults, Proxy, Registry, config_json, gzip, noise, tar_dir, tar_of};
use strata_digest::{Digest, VerifyingReader};
use strata_oci::layout_writer::{oci_index_bytes, oci_manifest_bytes};
use strata_oci::manifest::{DOCKER_MANIFEST, OCI_MANIFEST};
use strata_oci::{
    Credentials, Descriptor, FileCredentials, ImageRef, ImageSource, OciError, OciLayoutWriter,
    Platform, RegistryOptions, StaticCredentials, open_source,
};

const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// skopeo gzips plain layers on the way to a registry unless told not to.
const KEEP: &[&str] = &["--preserve-digests"];

/// A two-layer image (a 300 KB gzip layer, a tiny plain one) written to an
/// OCI layout.
struct Fixture {
    _dir: tempfile::TempDir,
    layout: PathBuf,
    manifest: Descriptor,
    config: Vec<u8>,
    layers: Vec<(Descriptor, Vec<u8>)>,
}

fn image_parts(arch: &str, seed: u64) -> (Vec<u8>, Vec<(&'static str, Vec<u8>)>) {
    let big = tar_of(&[("data/big.bin", &noise(300_000, seed))]);
    let small = tar_of(&[("etc/hello", format!("hello {arch}\n").as_bytes())]);
    let diff_ids = vec![
        Digest::sha256_of(&big).to_string(),
        Digest::sha256_of(&small).to_string(),
    ];
    (
        config_json(arch, &diff_ids),
        vec![(TAR_GZ, gzip(&big)), (TAR, small)],
    )
}

fn fixture(tag: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let mut w = OciLayoutWriter::create(&layout).unwrap();
    let (config, layers) = image_parts("amd64", 1);
    let refs: Vec<(&str, &[u8])> = layers.iter().map(|(m, b)| (*m, b.as_slice())).collect();
    let (manifest, bytes) = w.add_image(&config, &refs, Some(tag)).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let descs: Vec<Descriptor> = serde_json::from_value(parsed["layers"].clone()).unwrap();
    Fixture {
        _dir: dir,
        layout,
        manifest,
        config,
        layers: descs
            .into_iter()
            .zip(layers.into_iter().map(|l| l.1))
            .collect(),
    }
}

/// A registry holding the `fixture("v1")` image as `test/app:v1`.
fn registry_with_app() -> (Registry, Fixture) {
    let reg = Registry::start();
    let fx = fixture("v1");
    reg.push(
        &format!("oci:{}:v1", fx.layout.display()),
        "test/app:v1",
        KEEP,
    );
    (reg, fx)
}

fn plain(addr: &str) -> RegistryOptions {
    RegistryOptions {
        insecure_registries: vec![addr.to_string()],
        user_agent: "strata-test".into(),
        ..Default::default()
    }
}

fn open(reference: &str, opts: &RegistryOptions) -> Box<dyn ImageSource> {
    let r: ImageRef = reference.parse().unwrap();
    open_source(&r, opts).unwrap_or_else(|e| panic!("opening {reference}: {e}"))
}

/// The whole blob, verified against its descriptor.
fn fetch(src: &dyn ImageSource, desc: &Descriptor) -> Vec<u8> {
    let r = src.open_blob(desc, 0).unwrap();
    let mut v = VerifyingReader::new(r, desc.digest, Some(desc.size));
    let mut out = Vec::new();
    v.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("reading {}: {e}", desc.digest));
    assert!(v.is_verified());
    out
}

fn amd64() -> Platform {
    "linux/amd64".parse().unwrap()
}

fn check_resolved_matches(src: &dyn ImageSource, fx: &Fixture) {
    let r = src.resolve(&amd64()).unwrap();
    assert_eq!(r.manifest_digest, Digest::sha256_of(&r.manifest_bytes));
    assert_eq!(r.manifest_digest, fx.manifest.digest);
    assert_eq!(r.config_bytes, fx.config);
    assert_eq!(r.manifest.layers.len(), 2);
    for (got, (want, bytes)) in r.manifest.layers.iter().zip(&fx.layers) {
        assert_eq!(got.digest, want.digest);
        assert!(&fetch(src, got) == bytes, "layer {} differs", got.digest);
    }
}

#[test]
fn registry_resolves_by_tag_and_digest_and_streams_blobs() {
    let (reg, fx) = registry_with_app();

    let by_tag = open(
        &format!("docker://{}/test/app:v1", reg.addr),
        &plain(&reg.addr),
    );
    assert_eq!(
        by_tag.describe(),
        format!("docker://{}/test/app:v1", reg.addr)
    );
    check_resolved_matches(by_tag.as_ref(), &fx);
    let r = by_tag.resolve(&amd64()).unwrap();
    assert_eq!(r.manifest.media_type, OCI_MANIFEST);
    assert_eq!(r.index_digest, None);

    let by_digest = open(
        &format!("docker://{}/test/app@{}", reg.addr, fx.manifest.digest),
        &RegistryOptions {
            plain_http: true,
            ..Default::default()
        },
    );
    check_resolved_matches(by_digest.as_ref(), &fx);

    // a blob from an offset: the tail only
    let (desc, bytes) = &fx.layers[0];
    let mut tail = Vec::new();
    by_tag
        .open_blob(desc, 1000)
        .unwrap()
        .read_to_end(&mut tail)
        .unwrap();
    assert!(tail == bytes[1000..]);
    let mut nothing = Vec::new();
    by_tag
        .open_blob(desc, desc.size)
        .unwrap()
        .read_to_end(&mut nothing)
        .unwrap();
    assert!(nothing.is_empty());
}

#[test]
fn registry_serves_docker_schema2() {
    let reg = Registry::start();
    let fx = fixture("v1");
    reg.push(
        &format!("oci:{}:v1", fx.layout.display()),
        "test/docker:v1",
        &["--format", "v2s2"],
    );
    let src = open(
        &format!("docker://{}/test/docker:v1", reg.addr),
        &plain(&reg.addr),
    );
    let r = src.resolve(&amd64()).unwrap();
    assert_eq!(r.manifest.media_type, DOCKER_MANIFEST);
    assert_eq!(r.manifest_digest, Digest::sha256_of(&r.manifest_bytes));
    assert_eq!(
        r.manifest.layers[0].media_type,
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    // the gzip layer travels as is; the plain one was gzipped by skopeo
    assert!(fetch(src.as_ref(), &r.manifest.layers[0]) == fx.layers[0].1);
    assert_eq!(r.manifest.layers.len(), 2);
    fetch(src.as_ref(), &r.manifest.layers[1]);
    let config = strata_oci::parse_config(&r.config_bytes).unwrap();
    assert_eq!(config.diff_ids.len(), 2);
}

#[test]
fn registry_follows_an_index_to_the_wanted_platform() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let mut w = OciLayoutWriter::create(dir.path()).unwrap();
    let mut entries = Vec::new();
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let (config, layers) = image_parts(arch, i as u64 + 10);
        let config = w
            .add_blob("application/vnd.oci.image.config.v1+json", &config)
            .unwrap();
        let layers: Vec<Descriptor> = layers
            .iter()
            .map(|(m, b)| w.add_blob(m, b).unwrap())
            .collect();
        let bytes = oci_manifest_bytes(&config, &layers, None, &BTreeMap::new()).unwrap();
        let mut d = w.add_blob(OCI_MANIFEST, &bytes).unwrap();
        d.platform = Some(format!("linux/{arch}").parse().unwrap());
        entries.push(d);
    }
    let index = oci_index_bytes(&entries).unwrap();
    let index_desc = w.add_manifest(&index, Some("multi")).unwrap();
    reg.push(
        &format!("oci:{}:multi", dir.path().display()),
        "test/multi:latest",
        &["--all", "--preserve-digests"],
    );

    let src = open(
        &format!("docker://{}/test/multi", reg.addr),
        &plain(&reg.addr),
    );
    let arm = src.resolve(&"linux/arm64".parse().unwrap()).unwrap();
    assert_eq!(arm.index_digest, Some(index_desc.digest));
    assert_eq!(arm.manifest_digest, entries[1].digest);
    assert_eq!(
        strata_oci::parse_config(&arm.config_bytes)
            .unwrap()
            .architecture,
        "arm64"
    );
    let amd = src.resolve(&amd64()).unwrap();
    assert_eq!(amd.manifest_digest, entries[0].digest);

    let e = src.resolve(&"linux/s390x".parse().unwrap()).unwrap_err();
    assert!(matches!(e, OciError::NoPlatform { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("linux/s390x") && msg.contains("linux/amd64, linux/arm64"),
        "{msg}"
    );

    // the same through the layout source
    let layout = open(
        &format!("oci:{}:multi", dir.path().display()),
        &RegistryOptions::default(),
    );
    let arm = layout.resolve(&"linux/arm64".parse().unwrap()).unwrap();
    assert_eq!(arm.manifest_digest, entries[1].digest);
    assert_eq!(arm.index_digest, Some(index_desc.digest));
}

#[test]
fn registry_errors_name_what_was_missing() {
    let (reg, fx) = registry_with_app();
    let opts = plain(&reg.addr);

    let missing_tag = format!("docker://{}/test/app:nope", reg.addr);
    let e = open(&missing_tag, &opts)
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "fetching manifest {missing_tag}: registry answered 404"
        )),
        "{e}"
    );
    assert!(e.contains("MANIFEST_UNKNOWN"), "{e}");

    let missing_repo = format!("docker://{}/no/such:v1", reg.addr);
    let e = open(&missing_repo, &opts)
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing_repo) && e.contains("404"), "{e}");

    let src = open(&format!("docker://{}/test/app:v1", reg.addr), &opts);
    let bogus = Descriptor {
        digest: Digest::sha256_of(b"not there"),
        size: 9,
        ..fx.layers[1].0.clone()
    };
    let e = match src.open_blob(&bogus, 0) {
        Ok(_) => panic!("opening a missing blob succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains(&bogus.digest.to_string()) && e.contains("404"),
        "{e}"
    );
    assert!(e.contains("test/app") && e.contains("BLOB_UNKNOWN"), "{e}");

    // pinned digest that the registry does not have
    let pinned = format!("docker://{}/test/app@{}", reg.addr, bogus.digest);
    let e = open(&pinned, &opts)
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&pinned) && e.contains("404"), "{e}");
}

fn write_auth_file(dir: &Path, host: &str, user_pass: &str) -> PathBuf {
    use base64::Engine as _;
    let enc = base64::engine::general_purpose::STANDARD.encode(user_pass);
    let p = dir.join("auth.json");
    std::fs::write(
        &p,
        format!(
            r#"{{"auths":{{"other.example:5000":{{"auth":"eDp5"}},"{host}":{{"auth":"{enc}"}}}}}}"#
        ),
    )
    .unwrap();
    p
}

#[test]
fn registry_bearer_token_auth() {
    let (reg, fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            bearer: Some("alice:s3cret-pw".into()),
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let reference = format!("docker://{}/test/app:v1", proxy.addr);

    // no credentials: the token endpoint refuses
    let e = open(&reference, &plain(&proxy.addr))
        .resolve(&amd64())
        .unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!(
            "authentication required or failed for {}",
            proxy.addr
        )),
        "{e}"
    );

    // wrong password: refused, and the message holds no secret
    let wrong = write_auth_file(dir.path(), &proxy.addr, "alice:wrong-pw");
    let opts = RegistryOptions {
        credentials: Arc::new(FileCredentials::new(Some(wrong.clone()))),
        ..plain(&proxy.addr)
    };
    let e = open(&reference, &opts)
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("authentication") && !e.contains("wrong-pw"),
        "{e}"
    );

    let good = write_auth_file(
        dir.path(),
        &format!("http://{}/v1/", proxy.addr),
        "alice:s3cret-pw",
    );
    let opts = RegistryOptions {
        credentials: Arc::new(FileCredentials::new(Some(good))),
        ..plain(&proxy.addr)
    };
    let before = proxy.requests().len();
    let src = open(&reference, &opts);
    check_resolved_matches(src.as_ref(), &fx);
    let log = proxy.requests()[before..].to_vec();
    let token_requests: Vec<&String> = log.iter().filter(|l| l.contains("/token")).collect();
    // one token, fetched with the basic credentials for the repository's
    // pull scope, then reused for the manifest, the config and each blob
    assert_eq!(token_requests.len(), 1, "{log:?}");
    assert!(
        token_requests[0].contains("scope=repository%3Atest%2Fapp%3Apull")
            && token_requests[0].contains("auth=Basic"),
        "{log:?}"
    );
    let with_token = log.iter().filter(|l| l.contains("auth=Bearer")).count();
    assert!(with_token >= 4, "{log:?}");
}

#[test]
fn registry_basic_auth_from_auth_file() {
    let (reg, fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            basic: Some("bob:hunter2".into()),
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let reference = format!("docker://{}/test/app:v1", proxy.addr);
    let e = open(&reference, &plain(&proxy.addr))
        .resolve(&amd64())
        .unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");

    let auth = write_auth_file(dir.path(), &proxy.addr, "bob:hunter2");
    let opts = RegistryOptions {
        credentials: Arc::new(FileCredentials::new(Some(auth))),
        ..plain(&proxy.addr)
    };
    check_resolved_matches(open(&reference, &opts).as_ref(), &fx);
    assert!(proxy.requests().iter().any(|l| l.contains("auth=Basic")));
}

/// The credentials a daemon is handed per request (CRI's AuthConfig, an
/// HTTP request's), built in memory: no file is read.
fn in_memory(host: &str, creds: Credentials) -> Arc<StaticCredentials> {
    Arc::new(StaticCredentials::new().with(host, creds))
}

#[test]
fn registry_bearer_auth_with_credentials_built_in_memory() {
    let (reg, fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            bearer: Some("carol:in-memory-pw".into()),
            ..Default::default()
        },
    );
    let reference = format!("docker://{}/test/app:v1", proxy.addr);
    // one set of options for the daemon's life; credentials per request
    let base = RegistryOptions {
        credentials: Arc::new(StaticCredentials::new()),
        ..plain(&proxy.addr)
    };

    // a request without credentials is refused
    let e = open(&reference, &base).resolve(&amd64()).unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");
    assert!(e.to_string().contains("no credentials found"), "{e}");

    // wrong password: refused, named as the caller's, not shown
    let wrong = base.with_credentials(in_memory(
        &proxy.addr,
        Credentials::new("carol", "not-the-pw").with_source("the test request"),
    ));
    let e = open(&reference, &wrong).resolve(&amd64()).unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("credentials from the test request") && !msg.contains("not-the-pw"),
        "{msg}"
    );

    // the right ones: a token from the realm, then the whole image
    let good = base.with_credentials(in_memory(
        &proxy.addr,
        Credentials::new("carol", "in-memory-pw"),
    ));
    let before = proxy.requests().len();
    check_resolved_matches(open(&reference, &good).as_ref(), &fx);
    let log = proxy.requests()[before..].to_vec();
    assert_eq!(
        log.iter().filter(|l| l.contains("/token")).count(),
        1,
        "{log:?}"
    );

    // a registry token the caller already holds goes to the registry as
    // it is, without asking the realm
    let token = base.with_credentials(in_memory(
        &proxy.addr,
        Credentials::registry_token(common::TOKEN),
    ));
    let before = proxy.requests().len();
    check_resolved_matches(open(&reference, &token).as_ref(), &fx);
    let log = proxy.requests()[before..].to_vec();
    assert!(!log.iter().any(|l| l.contains("/token")), "{log:?}");
    assert!(log.iter().any(|l| l.contains("auth=Bearer")), "{log:?}");
    let stale = base.with_credentials(in_memory(
        &proxy.addr,
        Credentials::registry_token("expired-token"),
    ));
    let e = open(&reference, &stale).resolve(&amd64()).unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");

    // every source above shared the one client of the base options
    assert_eq!(base.client.clients_built(), 1);
}

#[test]
fn registry_basic_auth_with_credentials_built_in_memory() {
    let (reg, fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            basic: Some("dave:basic-pw".into()),
            ..Default::default()
        },
    );
    let reference = format!("docker://{}/test/app:v1", proxy.addr);
    let anonymous = RegistryOptions {
        credentials: Arc::new(StaticCredentials::new()),
        ..plain(&proxy.addr)
    };
    let e = open(&reference, &anonymous).resolve(&amd64()).unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");
    // credentials for another host are not sent here
    let elsewhere = anonymous.with_credentials(in_memory(
        "other.example:5000",
        Credentials::new("dave", "basic-pw"),
    ));
    let e = open(&reference, &elsewhere).resolve(&amd64()).unwrap_err();
    assert!(matches!(e, OciError::Auth { .. }), "{e}");
    let good =
        anonymous.with_credentials(in_memory(&proxy.addr, Credentials::new("dave", "basic-pw")));
    check_resolved_matches(open(&reference, &good).as_ref(), &fx);
}

#[test]
fn an_explicit_auth_file_that_is_missing_fails_the_open() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-auth.json");
    let opts = RegistryOptions {
        credentials: Arc::new(FileCredentials::new(Some(missing.clone()))),
        ..plain("127.0.0.1:9")
    };
    let r: ImageRef = "docker://127.0.0.1:9/a/b:1".parse().unwrap();
    let e = open_source(&r, &opts).err().expect("an error");
    assert!(
        e.to_string()
            .starts_with(&format!("reading credentials file {}:", missing.display())),
        "{e}"
    );
}

#[test]
fn registry_blob_survives_500_and_a_dropped_connection() {
    let (reg, fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            fail_blobs: 1,
            drop_blobs: 1,
            ..Default::default()
        },
    );
    let src = open(
        &format!("docker://{}/test/app:v1", proxy.addr),
        &plain(&proxy.addr),
    );
    let r = src.resolve(&amd64()).unwrap();
    // the config GET took the 500; the first layer GET is cut half way
    let big = &r.manifest.layers[0];
    assert!(fetch(src.as_ref(), big) == fx.layers[0].1);
    let log = proxy.requests();
    let blob_path = format!("/blobs/{}", big.digest);
    let gets: Vec<&String> = log.iter().filter(|l| l.contains(&blob_path)).collect();
    assert_eq!(gets.len(), 2, "{log:?}");
    assert!(!gets[0].contains("range="), "{log:?}");
    let resumed_at: u64 = gets[1]
        .split("range=bytes=")
        .nth(1)
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or_else(|| panic!("no Range resume in {log:?}"));
    assert!(resumed_at > 0 && resumed_at < big.size, "{log:?}");
}

#[test]
fn registry_blob_reports_the_blob_when_resume_attempts_run_out() {
    let (reg, _fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            drop_blobs: 1000,
            ..Default::default()
        },
    );
    let src = open(
        &format!("docker://{}/test/app:v1", proxy.addr),
        &plain(&proxy.addr),
    );
    let r = src.resolve(&amd64()).unwrap();
    let big = &r.manifest.layers[0];
    let mut out = Vec::new();
    let e = src
        .open_blob(big, 0)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&big.digest.to_string()) && e.contains("test/app"),
        "{e}"
    );
    assert!(e.contains("5 attempts"), "{e}");
    let gets = proxy
        .requests()
        .iter()
        .filter(|l| l.contains(&big.digest.to_string()))
        .count();
    assert_eq!(gets, 5, "{:?}", proxy.requests());
}

#[test]
fn registry_blob_redirects_are_followed() {
    let (reg, fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            redirect_blobs: true,
            ..Default::default()
        },
    );
    let src = open(
        &format!("docker://{}/test/app:v1", proxy.addr),
        &RegistryOptions {
            plain_http: true,
            ..Default::default()
        },
    );
    check_resolved_matches(src.as_ref(), &fx);
    // the tail of a blob through the redirect: Range survives it
    let (desc, bytes) = &fx.layers[0];
    let mut tail = Vec::new();
    src.open_blob(desc, 5000)
        .unwrap()
        .read_to_end(&mut tail)
        .unwrap();
    assert!(tail == bytes[5000..]);
    let log = proxy.requests();
    assert!(
        log.iter().any(|l| l.contains("range=bytes=5000-")),
        "{log:?}"
    );
}

#[test]
fn registry_manifest_must_match_docker_content_digest() {
    let (reg, _fx) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            lie_about_manifest_digest: true,
            ..Default::default()
        },
    );
    let reference = format!("docker://{}/test/app:v1", proxy.addr);
    let e = open(&reference, &plain(&proxy.addr))
        .resolve(&amd64())
        .unwrap_err();
    assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&reference) && msg.contains("Docker-Content-Digest"),
        "{msg}"
    );
}

#[test]
fn registry_gives_up_after_persistent_500() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            always_500: true,
            ..Default::default()
        },
    );
    let reference = format!("docker://{}/test/app:v1", proxy.addr);
    let e = open(&reference, &plain(&proxy.addr))
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(e.contains(&reference) && e.contains("500"), "{e}");
    assert_eq!(proxy.requests().len(), 5, "{:?}", proxy.requests());
}

#[test]
fn oci_layout_picks_by_tag() {
    let fx = fixture("v1");
    let mut w = OciLayoutWriter::create(&fx.layout).unwrap();
    // re-create the index with two tags
    w.add_manifest(
        &std::fs::read(w.blob_path(&fx.manifest.digest)).unwrap(),
        Some("v1"),
    )
    .unwrap();
    w.add_manifest(
        &std::fs::read(w.blob_path(&fx.manifest.digest)).unwrap(),
        Some("v2"),
    )
    .unwrap();
    let opts = RegistryOptions::default();
    let dir = fx.layout.display().to_string();
    check_resolved_matches(open(&format!("oci:{dir}:v2"), &opts).as_ref(), &fx);

    let e = open(&format!("oci:{dir}:v3"), &opts)
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no image tagged \"v3\"") && e.contains("v1, v2"),
        "{e}"
    );
    let e = open(&format!("oci:{dir}"), &opts)
        .resolve(&amd64())
        .unwrap_err()
        .to_string();
    assert!(e.contains("name one of: v1, v2"), "{e}");

    let single = fixture("only");
    check_resolved_matches(
        open(&format!("oci:{}", single.layout.display()), &opts).as_ref(),
        &single,
    );

    let e = match open_source(&"oci:/nonexistent/layout".parse().unwrap(), &opts) {
        Ok(_) => panic!("opened a missing layout"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("/nonexistent/layout"), "{e}");
}

#[test]
fn oci_archive_reads_like_its_layout() {
    let fx = fixture("v1");
    let archive = fx._dir.path().join("image.tar");
    tar_dir(&fx.layout, &archive);
    let src = open(
        &format!("oci-archive:{}:v1", archive.display()),
        &RegistryOptions::default(),
    );
    check_resolved_matches(src.as_ref(), &fx);
}

/// A classic `docker save` archive of the fixture's image.
fn classic_docker_archive(fx: &Fixture, out: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("cafe.json"), &fx.config).unwrap();
    let mut layer_paths = Vec::new();
    for (i, (_, bytes)) in fx.layers.iter().enumerate() {
        std::fs::create_dir_all(d.join(format!("l{i}"))).unwrap();
        std::fs::write(d.join(format!("l{i}/layer.tar")), bytes).unwrap();
        layer_paths.push(format!("l{i}/layer.tar"));
    }
    let manifest = serde_json::json!([{
        "Config": "cafe.json",
        "RepoTags": ["example/app:v1", "docker.io/library/plain:latest"],
        "Layers": layer_paths,
    }]);
    std::fs::write(
        d.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    tar_dir(d, out);
}

#[test]
fn docker_archive_classic_synthesizes_a_stable_manifest() {
    let fx = fixture("v1");
    let archive = fx._dir.path().join("docker.tar");
    classic_docker_archive(&fx, &archive);
    let opts = RegistryOptions::default();
    let mut digests = Vec::new();
    for tag in [
        "example/app:v1",
        "docker.io/example/app:v1",
        "plain",
        "plain:latest",
    ] {
        let src = open(
            &format!("docker-archive:{}:{tag}", archive.display()),
            &opts,
        );
        let r = src.resolve(&amd64()).unwrap();
        assert_eq!(r.manifest_digest, Digest::sha256_of(&r.manifest_bytes));
        assert_eq!(r.manifest.media_type, OCI_MANIFEST);
        assert_eq!(r.config_bytes, fx.config);
        // layer files are as in the archive: gzip sniffed, plain tar kept
        assert_eq!(r.manifest.layers[0].media_type, TAR_GZ);
        assert_eq!(r.manifest.layers[1].media_type, TAR);
        for (got, (want, bytes)) in r.manifest.layers.iter().zip(&fx.layers) {
            assert_eq!(got.digest, want.digest);
            assert!(
                &fetch(src.as_ref(), got) == bytes,
                "layer {} differs",
                got.digest
            );
        }
        digests.push(r.manifest_digest);
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
    // the synthesized manifest is canonical: sorted keys, no whitespace
    let src = open(&format!("docker-archive:{}", archive.display()), &opts);
    let r = src.resolve(&amd64()).unwrap();
    let text = String::from_utf8(r.manifest_bytes.clone()).unwrap();
    assert!(
        text.starts_with(r#"{"config":{"digest":"#) && !text.contains(' '),
        "{text}"
    );

    let e = open(
        &format!("docker-archive:{}:other:v9", archive.display()),
        &opts,
    )
    .resolve(&amd64())
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("other:v9") && e.contains("example/app:v1"),
        "{e}"
    );
}

#[test]
fn docker_archive_in_oci_layout_format_keeps_the_real_manifest() {
    let fx = fixture("v1");
    // docker 25+: an OCI layout with manifest.json beside it, names in
    // io.containerd.image.name
    let index_path = fx.layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"][0]["annotations"] = serde_json::json!({
        "io.containerd.image.name": "docker.io/example/app:v1",
        "org.opencontainers.image.ref.name": "v1",
    });
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    let layers: Vec<String> = fx
        .layers
        .iter()
        .map(|(d, _)| format!("blobs/sha256/{}", d.digest.hex()))
        .collect();
    let config_digest = Digest::sha256_of(&fx.config);
    let manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", config_digest.hex()),
        "RepoTags": ["example/app:v1"],
        "Layers": layers,
    }]);
    std::fs::write(
        fx.layout.join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let archive = fx._dir.path().join("docker-oci.tar");
    tar_dir(&fx.layout, &archive);

    let opts = RegistryOptions::default();
    for tag in ["", ":example/app:v1", ":v1"] {
        let src = open(&format!("docker-archive:{}{tag}", archive.display()), &opts);
        check_resolved_matches(src.as_ref(), &fx);
    }
}
