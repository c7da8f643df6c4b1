//! `verify_pushed` against Debian's docker-registry on 127.0.0.1: the
//! hello sample pulled into a store, converted to zstd:chunked and pushed
//! with strata's own push, then checked as the registry serves it: as
//! pushed, with a blob or a TOC corrupted in the registry's storage, with
//! wrong expectations, with manifests made by hand (a subject, a layer in
//! the wrong place, a layer whose tree differs), with gzip layers, and
//! cancelled. One registry per test.

use std::path::PathBuf;

use serde_json::{Value, json};
use strata_digest::Digest;
use strata_oci::convert::{ConvertOptions, ConvertSummary, Format, LAYER_ZSTD, convert};
use strata_oci::manifest::OCI_MANIFEST;
use strata_oci::pull::{PullOptions, pull};
use strata_oci::push::RegistryDestination;
use strata_oci::registry::{BlobContent, RegistryPusher};
use strata_oci::verify::{
    BLOB_DIGEST, CHECKS, CONFIG_DIFF_IDS, LAYER_DIFF_ID, MANIFEST_DIGEST, TOC_DIGEST, TREE_DIGEST,
    VerifyCache, VerifyReport, verify_pushed, verify_pushed_with,
};
use strata_oci::{ImageRef, OciError, Platform, RegistryOptions, open_source};
use strata_ops::{Cancel, Collect, Ctl, ErrorKind, Event, EventSink, HasKind, Op};
use strata_store::{SplitPolicy, Store};
use strata_testkit::Registry;

/// The TOC's place in a zstd:chunked blob: `offset:length:uncompressed:1`.
const TOC_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";

/// A registry, and a store holding the hello sample (three small gzip
/// layers: files, a hard link, a symlink, a whiteout).
struct Fixture {
    reg: Registry,
    opts: RegistryOptions,
    store: Store,
    source: Digest,
    dir: tempfile::TempDir,
}

fn hello() -> PathBuf {
    strata_testkit::repo_root().join("samples/hello")
}

fn amd64() -> Platform {
    "linux/amd64".parse().unwrap()
}

fn fixture() -> Fixture {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let opts = RegistryOptions {
        insecure_registries: vec![reg.addr.clone()],
        user_agent: "strata-test".into(),
        ..Default::default()
    };
    let src: ImageRef = format!("oci:{}:latest", hello().display()).parse().unwrap();
    let popts = PullOptions {
        platform: amd64(),
        registry: opts.clone(),
        jobs: 2,
        split: SplitPolicy::Never,
        partial: true,
    };
    let source = pull(&store, &src, "hello", &popts, Ctl::none())
        .unwrap()
        .manifest_digest;
    Fixture {
        reg,
        opts,
        store,
        source,
        dir,
    }
}

impl Fixture {
    /// `docker://ADDR/REPO@DIGEST`.
    fn by_digest(&self, repo: &str, digest: &Digest) -> ImageRef {
        format!("docker://{}/{repo}@{digest}", self.reg.addr)
            .parse()
            .unwrap()
    }

    /// Convert the source as `copts` say and push it to `repo:tag`: the
    /// pushed image by digest, and what convert said.
    fn convert(&self, repo: &str, tag: &str, copts: &ConvertOptions) -> (ImageRef, ConvertSummary) {
        let dest: ImageRef = format!("docker://{}/{repo}:{tag}", self.reg.addr)
            .parse()
            .unwrap();
        let dest = RegistryDestination::new(&dest, &self.opts, self.dir.path()).unwrap();
        let summary = convert(&self.store, &self.source, &dest, copts, Ctl::none()).unwrap();
        (self.by_digest(repo, &summary.manifest_digest), summary)
    }

    /// The source converted to zstd:chunked with the default options, as
    /// `repo:v1`.
    fn chunked(&self, repo: &str) -> (ImageRef, ConvertSummary) {
        let (pushed, summary) = self.convert(repo, "v1", &ConvertOptions::default());
        for (i, l) in summary.layers.iter().enumerate() {
            assert_eq!(l.format, Format::ZstdChunked, "layer {i}: {l:?}");
        }
        (pushed, summary)
    }

    fn verify(&self, pushed: &ImageRef, expected: &ConvertSummary, subject: bool) -> VerifyReport {
        verify_pushed(
            &self.store,
            &self.source,
            pushed,
            expected,
            subject,
            &self.opts,
            Ctl::none(),
        )
        .unwrap_or_else(|e| panic!("verifying {pushed}: {e}"))
    }

    fn pusher(&self, repo: &str) -> RegistryPusher {
        let r: ImageRef = format!("docker://{}/{repo}", self.reg.addr)
            .parse()
            .unwrap();
        RegistryPusher::new(&r, &self.opts).unwrap()
    }

    /// The manifest the registry serves for `pushed`, as JSON.
    fn manifest(&self, pushed: &ImageRef) -> Value {
        let r = open_source(pushed, &self.opts)
            .unwrap()
            .resolve(&amd64())
            .unwrap();
        serde_json::from_slice(&r.manifest_bytes).unwrap()
    }

    /// Put `doc` as a manifest in `repo` under `tag`: the reference to it
    /// by digest.
    fn put_manifest(&self, repo: &str, tag: &str, doc: &Value) -> ImageRef {
        let bytes = serde_json::to_vec(doc).unwrap();
        let digest = self
            .pusher(repo)
            .put_manifest(tag, OCI_MANIFEST, &bytes)
            .unwrap();
        self.by_digest(repo, &digest)
    }

    /// Flip one byte of blob `digest` in the registry's storage.
    fn corrupt(&self, digest: &Digest, offset: usize) {
        let path = self.reg.blob_path(&digest.hex());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[offset] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
    }
}

fn digest_of(r: &ImageRef) -> Digest {
    match r {
        ImageRef::Docker {
            digest: Some(d), ..
        } => *d,
        other => panic!("{other} names no digest"),
    }
}

/// Every check ran, in order, and passed.
fn assert_ok(r: &VerifyReport) {
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, CHECKS, "{r:#?}");
    assert!(r.ok && r.failed().is_none(), "{r:#?}");
    for c in &r.checks {
        assert!(c.ok && c.seconds >= 0.0, "{c:?}");
    }
    let sum: f64 = r.checks.iter().map(|c| c.seconds).sum();
    assert!(r.seconds >= sum, "{r:#?}");
}

/// The checks up to `check` ran, in order; `check` failed, the others
/// passed; its detail has every one of `needles`. Returns the detail.
fn assert_failed(r: &VerifyReport, check: &str, needles: &[&str]) -> String {
    assert!(!r.ok, "{r:#?}");
    let at = CHECKS.iter().position(|c| *c == check).unwrap();
    let names: Vec<&str> = r.checks.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, CHECKS[..=at], "later checks must not run: {r:#?}");
    let failed = r.failed().expect("a failed check");
    assert_eq!(failed.name, check, "{r:#?}");
    assert!(r.checks[..at].iter().all(|c| c.ok), "{r:#?}");
    let detail = failed.detail.clone().expect("a failed check says why");
    for n in needles {
        assert!(detail.contains(n), "{check}: {detail:?} lacks {n:?}");
    }
    detail
}

#[test]
fn a_converted_and_pushed_image_verifies() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let events = Collect::new();
    let cancel = Cancel::new();
    let r = verify_pushed(
        &fx.store,
        &fx.source,
        &pushed,
        &summary,
        false,
        &fx.opts,
        Ctl::new(&events, &cancel),
    )
    .unwrap();
    assert_ok(&r);
    let note = |name: &str| {
        r.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .detail
            .clone()
            .unwrap_or_default()
    };
    assert!(
        note(TOC_DIGEST).starts_with("3 of 3 layers zstd:chunked"),
        "{r:#?}"
    );
    assert!(note(TREE_DIGEST).starts_with("tree sha256:"), "{r:#?}");
    // the tree is the one strata records for the source
    let source_tree = fx.store.erofs_info(&fx.source).unwrap().tree_digest;
    assert_eq!(note(TREE_DIGEST), format!("tree {source_tree}"));
    // a report is a job record
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["checks"][0]["name"], MANIFEST_DIGEST);
    assert_eq!(json["ok"], true);

    let ev = events.events();
    assert!(
        matches!(ev.first(), Some(Event::Started { op: Op::Verify, .. })),
        "{ev:?}"
    );
    assert!(
        matches!(ev.last(), Some(Event::Finished { op: Op::Verify })),
        "{ev:?}"
    );
    let done = ev
        .iter()
        .filter(|e| matches!(e, Event::UnitDone { op: Op::Verify, .. }))
        .count();
    assert_eq!(done, 3, "one unit per layer streamed: {ev:?}");
}

#[test]
fn a_layer_with_files_placed_first_verifies() {
    let fx = fixture();
    let copts = ConvertOptions {
        prefetch: vec!["/usr/bin/hello".into()],
        place_first: true,
        ..Default::default()
    };
    let (pushed, summary) = fx.convert("hello", "first", &copts);
    assert!(
        summary.layers[0].reordered_from.is_some(),
        "layer 0 was reordered: {summary:?}"
    );
    assert_ok(&fx.verify(&pushed, &summary, false));
}

#[test]
fn a_blob_corrupted_in_the_registry_fails_blob_digest() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let layer = &summary.layers[1];
    // its first frame (a file's header or content): not the TOC or the
    // tar-split, which a partial read fetches by range
    fx.corrupt(&layer.digest, 0);
    let r = fx.verify(&pushed, &summary, false);
    assert_failed(
        &r,
        BLOB_DIGEST,
        &["layer 1", &layer.digest.to_string(), "hashing to"],
    );
}

/// A second verification with the first one's cache does not decompress
/// the blobs it hashed before, and still fails a blob altered since: the
/// cache skips work, never a check.
#[test]
fn a_verification_cache_skips_decompressing_known_blobs_but_not_hashing_them() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let cache = VerifyCache::default();
    let verify = || {
        verify_pushed_with(
            &fx.store,
            &fx.source,
            &pushed,
            &summary,
            false,
            &fx.opts,
            &cache,
            Ctl::none(),
        )
        .unwrap()
    };
    assert_ok(&verify());
    assert_eq!(cache.hits(), 0);
    let again = verify();
    assert_ok(&again);
    assert_eq!(cache.hits(), 3, "every layer's tar was known");
    let layer = &summary.layers[2];
    fx.corrupt(&layer.digest, 0);
    let r = verify();
    assert_failed(
        &r,
        BLOB_DIGEST,
        &["layer 2", &layer.digest.to_string(), "hashing to"],
    );
}

#[test]
fn a_toc_corrupted_in_the_registry_fails_toc_digest() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let doc = fx.manifest(&pushed);
    let position = doc["layers"][1]["annotations"][TOC_POSITION]
        .as_str()
        .expect("a zstd:chunked layer has a TOC position");
    let nums: Vec<usize> = position.split(':').map(|n| n.parse().unwrap()).collect();
    let layer = &summary.layers[1];
    fx.corrupt(&layer.digest, nums[0] + nums[1] / 2);
    let r = fx.verify(&pushed, &summary, false);
    assert_failed(&r, TOC_DIGEST, &["layer 1", &layer.digest.to_string()]);
}

#[test]
fn a_wrong_manifest_digest_fails_manifest_digest() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let other = Digest::sha256_of(b"not the manifest");
    // convert said one digest, the reference names another
    let mut wrong = summary.clone();
    wrong.manifest_digest = other;
    let r = fx.verify(&pushed, &wrong, false);
    assert_failed(
        &r,
        MANIFEST_DIGEST,
        &[&other.to_string(), &summary.manifest_digest.to_string()],
    );
    // both name a manifest the registry does not have
    let r = fx.verify(&fx.by_digest("hello", &other), &wrong, false);
    assert_failed(
        &r,
        MANIFEST_DIGEST,
        &["fetching manifest", &other.to_string()],
    );
    // a reference without a digest is not what convert pushed
    let tagged: ImageRef = format!("docker://{}/hello:v1", fx.reg.addr)
        .parse()
        .unwrap();
    let r = fx.verify(&tagged, &summary, false);
    assert_failed(&r, MANIFEST_DIGEST, &["names no digest"]);
    // convert's layers are not the manifest's
    let mut wrong = summary.clone();
    wrong.layers[2].size += 1;
    let r = fx.verify(&pushed, &wrong, false);
    assert_failed(
        &r,
        MANIFEST_DIGEST,
        &["layer 2", &summary.layers[2].digest.to_string()],
    );
}

#[test]
fn a_wrong_diff_id_fails_config_diff_ids() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let mut wrong = summary.clone();
    let other = Digest::sha256_of(b"another tar");
    wrong.layers[1].diff_id = other;
    let r = fx.verify(&pushed, &wrong, false);
    assert_failed(
        &r,
        CONFIG_DIFF_IDS,
        &[
            "layer 1",
            &other.to_string(),
            &summary.layers[1].diff_id.to_string(),
        ],
    );
    // a layer convert says it kept but did not come from the source
    let mut wrong = summary.clone();
    wrong.layers[0].reordered_from = Some(other);
    let r = fx.verify(&pushed, &wrong, false);
    assert_failed(
        &r,
        CONFIG_DIFF_IDS,
        &["layer 0", "reordered", &other.to_string()],
    );
}

#[test]
fn the_subject_is_checked_when_asked() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let mut doc = fx.manifest(&pushed);
    doc.as_object_mut().unwrap().remove("subject");
    let source_size = fx.store.image_manifest(&fx.source).unwrap().len();
    let with_subject = |digest: &Digest| {
        let mut d = doc.clone();
        d["subject"] =
            json!({"mediaType": OCI_MANIFEST, "digest": digest.to_string(), "size": source_size});
        d
    };
    let expect = |r: &ImageRef| {
        let mut s = summary.clone();
        s.manifest_digest = digest_of(r);
        s
    };

    let good = fx.put_manifest("hello", "subject", &with_subject(&fx.source));
    let r = fx.verify(&good, &expect(&good), true);
    assert_ok(&r);
    assert!(
        r.checks[0]
            .detail
            .as_deref()
            .unwrap()
            .contains("subject is the source")
    );

    let other = Digest::sha256_of(b"another image");
    let bad = fx.put_manifest("hello", "other-subject", &with_subject(&other));
    let r = fx.verify(&bad, &expect(&bad), true);
    assert_failed(
        &r,
        MANIFEST_DIGEST,
        &[&other.to_string(), &fx.source.to_string()],
    );
    // not asked: not checked
    assert_ok(&fx.verify(&bad, &expect(&bad), false));

    let none = fx.put_manifest("hello", "no-subject", &doc);
    let r = fx.verify(&none, &expect(&none), true);
    assert_failed(&r, MANIFEST_DIGEST, &["no subject"]);
}

#[test]
fn a_blob_in_the_wrong_place_fails_layer_diff_id() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    // layer 2's blob (whole and right) where layer 1's belongs
    let mut doc = fx.manifest(&pushed);
    doc["layers"][1] = doc["layers"][2].clone();
    let moved = fx.put_manifest("hello", "moved", &doc);
    let mut expected = summary.clone();
    expected.manifest_digest = digest_of(&moved);
    expected.layers[1].digest = summary.layers[2].digest;
    expected.layers[1].size = summary.layers[2].size;
    let r = fx.verify(&moved, &expected, false);
    assert_failed(
        &r,
        LAYER_DIFF_ID,
        &[
            "layer 1",
            &summary.layers[2].diff_id.to_string(),
            &summary.layers[1].diff_id.to_string(),
        ],
    );
}

/// A tar of empty files (`path`, mode), as tar-rs writes it.
fn tar_of_empty_files(files: &[(&str, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, std::io::empty()).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn a_layer_that_changes_the_tree_fails_tree_digest() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    // layer 2 rewritten (so it claims to be reordered) with another mode
    // for srv/empty: right blob, right diff_id, another tree
    let tar = tar_of_empty_files(&[("etc/.wh.old.conf", 0o644), ("srv/empty", 0o600)]);
    let mut blob = Vec::new();
    let layer = strata_chunked::write_layer(
        &tar[..],
        &mut blob,
        &strata_chunked::WriteOptions::default(),
    )
    .unwrap();
    let pusher = fx.pusher("hello");
    pusher
        .upload_blob(
            &layer.blob_digest,
            blob.len() as u64,
            BlobContent::Bytes(&blob),
        )
        .unwrap();
    let mut config: Value =
        serde_json::from_slice(&fx.store.image_config(&fx.source).unwrap()).unwrap();
    config["rootfs"]["diff_ids"][2] = json!(layer.diff_id.to_string());
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = Digest::sha256_of(&config);
    pusher
        .upload_blob(
            &config_digest,
            config.len() as u64,
            BlobContent::Bytes(&config),
        )
        .unwrap();
    let mut doc = fx.manifest(&pushed);
    doc["config"]["digest"] = json!(config_digest.to_string());
    doc["config"]["size"] = json!(config.len());
    doc["layers"][2] = json!({
        "mediaType": LAYER_ZSTD,
        "digest": layer.blob_digest.to_string(),
        "size": layer.blob_size,
        "annotations": layer.annotations,
    });
    let changed = fx.put_manifest("hello", "changed", &doc);
    let mut expected = summary.clone();
    expected.manifest_digest = digest_of(&changed);
    let l = &mut expected.layers[2];
    l.reordered_from = Some(l.diff_id);
    l.diff_id = layer.diff_id;
    l.digest = layer.blob_digest;
    l.size = layer.blob_size;
    let r = fx.verify(&changed, &expected, false);
    assert_failed(&r, TREE_DIGEST, &["tree digest", "/srv/empty"]);
}

#[test]
fn gzip_layers_are_read_too() {
    let fx = fixture();
    // a template of convert's summary, then the sample as it is: gzip
    let (_, template) = fx.chunked("hello");
    fx.reg.push(
        &format!("oci:{}:latest", hello().display()),
        "plain:1",
        &["--preserve-digests"],
    );
    let pushed = fx.by_digest("plain", &fx.source);
    let doc = fx.manifest(&pushed);
    let meta = fx.store.image_meta(&fx.source).unwrap();
    let mut expected = template.clone();
    expected.manifest_digest = fx.source;
    for ((l, stored), desc) in expected
        .layers
        .iter_mut()
        .zip(&meta.layers)
        .zip(doc["layers"].as_array().unwrap())
    {
        assert!(
            desc["mediaType"].as_str().unwrap().ends_with("gzip"),
            "{desc}"
        );
        l.diff_id = stored.diff_id;
        l.reordered_from = None;
        l.digest = desc["digest"].as_str().unwrap().parse().unwrap();
        l.size = desc["size"].as_u64().unwrap();
        l.format = Format::Zstd;
    }
    let r = fx.verify(&pushed, &expected, false);
    assert_ok(&r);
    let toc = r.checks.iter().find(|c| c.name == TOC_DIGEST).unwrap();
    assert!(
        toc.detail.as_deref().unwrap().starts_with("0 of 3"),
        "{toc:?}"
    );
    // a gzip layer where convert said zstd:chunked: no TOC to read
    expected.layers[0].format = Format::ZstdChunked;
    let r = fx.verify(&pushed, &expected, false);
    assert_failed(&r, TOC_DIGEST, &["layer 0", "no TOC annotations"]);
}

/// Cancels its token when the first layer starts streaming.
struct CancelAtFirstLayer(Cancel);

impl EventSink for CancelAtFirstLayer {
    fn event(&self, e: &Event) {
        if matches!(e, Event::UnitStarted { op: Op::Verify, .. }) {
            self.0.cancel();
        }
    }
}

#[test]
fn a_cancelled_verification_is_an_error() {
    let fx = fixture();
    let (pushed, summary) = fx.chunked("hello");
    let run = |ctl: Ctl<'_>| {
        verify_pushed(
            &fx.store, &fx.source, &pushed, &summary, false, &fx.opts, ctl,
        )
    };
    // cancelled before it starts
    let cancel = Cancel::new();
    cancel.cancel();
    let e = run(Ctl::new(&strata_ops::NoEvents, &cancel)).unwrap_err();
    assert!(matches!(e, OciError::Cancelled), "{e}");
    assert_eq!(e.kind(), ErrorKind::Cancelled);
    // cancelled while a blob streams
    let cancel = Cancel::new();
    let sink = CancelAtFirstLayer(cancel.clone());
    let e = run(Ctl::new(&sink, &cancel)).unwrap_err();
    assert!(matches!(e, OciError::Cancelled), "{e}");
    assert_eq!(e.kind(), ErrorKind::Cancelled);
}
