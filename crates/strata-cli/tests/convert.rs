//! `strata convert`: zstd:chunked images stay ordinary OCI images. The tar
//! inside every layer is unchanged (same config, same diff_ids), skopeo +
//! umoci see the same tree, containerd pulls it from a registry and runs
//! it, and strata pulls it back to the same tree digest. Converted images
//! can be pushed straight to a registry. With a prefetch list placed
//! first, the changed layers still make the same tree for all of them.

mod common;

use std::process::Command;

use common::*;
use strata_testkit::containerd::Containerd;
use strata_testkit::proxy::{Faults, Proxy};
use strata_testkit::require_tool;

fn tree_digest(env: &Env, image: &str) -> serde_json::Value {
    env.json(&["inspect", image])["tree"]["tree_digest"].clone()
}

#[test]
fn converted_images_keep_their_tars_and_trees() {
    require_tool("skopeo", "skopeo");
    require_tool("umoci", "umoci");
    let env = Env::new();
    let out = env.path("out");
    let cases = [
        (debian_layout(), "python"),
        (synth_layout(), "python"),
        (synth_layout(), "bsdtar"),
    ];
    for (layout, tag) in &cases {
        let src = oci_ref(layout, tag);
        env.ok(&["pull", &src]);
        let run = env.run(&["convert", &src, &format!("oci:{}:{tag}", out.display())]);
        let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
        assert!(run.status.success(), "{stderr}");
        let before = layout_manifest(layout, tag);
        let after = layout_manifest(&out, tag);
        assert_eq!(
            before["config"]["digest"], after["config"]["digest"],
            "{tag}: the config (and its diff_ids) must not change"
        );
        let layers = after["layers"].as_array().unwrap();
        let chunked = layers
            .iter()
            .filter(|l| {
                l["annotations"]["io.github.containers.zstd-chunked.manifest-checksum"].is_string()
            })
            .count();
        for l in layers {
            assert_eq!(
                l["mediaType"],
                "application/vnd.oci.image.layer.v1.tar+zstd"
            );
        }
        if layout == &debian_layout() {
            assert_eq!(chunked, layers.len(), "every debian layer is zstd:chunked");
            assert!(stderr.is_empty(), "{stderr}");
        } else {
            // The synthetic base layer has a non-UTF-8 name (and bsdtar a
            // sparse file): written as plain zstd, and said so.
            assert!(chunked >= 1 && chunked < layers.len(), "{tag}: {chunked}");
            assert!(stderr.contains("written as plain zstd"), "{stderr}");
        }
        // skopeo (recompressing to gzip, which umoci reads) + umoci unpack
        // give the tree strata exports for the original image.
        let gz = env.path("gz");
        let st = Command::new("skopeo")
            .args(["copy", "--dest-compress", "--dest-compress-format", "gzip"])
            .arg(format!("oci:{}:{tag}", out.display()))
            .arg(format!("oci:{}:{tag}", gz.display()))
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        env.assert_export_matches_umoci(&gz, tag, &src);
        // strata pulls the converted image back to the same tree.
        let other = Env::new();
        other.ok(&["pull", &format!("oci:{}:{tag}", out.display())]);
        assert_eq!(
            tree_digest(&other, &format!("oci:{}:{tag}", out.display())),
            tree_digest(&env, &src)
        );
        other.fsck_ok();
    }
    env.fsck_ok();
}

/// Push the layout `out`'s `python` tag to a fresh registry as
/// `repo:python`; containerd pulls it (`ctr image pull`) and runs python.
fn containerd_pulls_and_runs_python(out: &std::path::Path, repo: &str) {
    let reg = Registry::start();
    reg.push(
        &format!("oci:{}:python", out.display()),
        &format!("{repo}:python"),
        &["--preserve-digests"],
    );
    let image = format!("{}/{repo}:python", reg.addr);
    let c = Containerd::start();
    c.ctr(&["image", "pull", "--plain-http", &image]);
    let said = c.ctr(&[
        "run",
        "--rm",
        &image,
        &format!("{repo}-1"),
        "/usr/bin/python3",
        "-c",
        "print(6*7)",
    ]);
    assert_eq!(said.trim(), "42");
}

#[test]
fn containerd_runs_a_converted_image() {
    let env = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    let out = env.path("out");
    env.ok(&["convert", &src, &format!("oci:{}:python", out.display())]);
    // through a registry, as a platform would: ctr image pull + ctr run
    containerd_pulls_and_runs_python(&out, "converted");
}

#[test]
fn convert_errors_are_clear() {
    let env = Env::new();
    let e = env.fails(&["convert", "no-such-image", "oci:/tmp/x:y"]);
    assert!(e.contains("no-such-image"), "{e}");
    let src = oci_ref(&synth_layout(), "gnu");
    // a registry destination that nothing answers: a connection error
    // naming it
    let e = env.fails(&["convert", &src, "docker://127.0.0.1:1/x:y"]);
    assert!(
        e.contains("127.0.0.1:1") && e.contains("reaching registry"),
        "{e}"
    );
    let e = env.fails(&["convert", &src, "oci-archive:/tmp/x.tar"]);
    assert!(e.contains("docker://HOST"), "{e}");
    let e = env.fails(&["convert", &src, "oci:/tmp/x:y", "--format", "lz4"]);
    assert!(e.contains("unknown format"), "{e}");
    env.fsck_ok();
}

fn skopeo(args: &[&str]) -> Vec<u8> {
    require_tool("skopeo", "skopeo");
    let out = Command::new("skopeo").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "skopeo {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// No `push-*` staging directory is left in the store's tmp/.
fn no_push_staging_left(env: &Env) {
    let tmp = env.root().join("tmp");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("push-"))
        .collect();
    assert!(
        left.is_empty(),
        "staging left in {}: {left:?}",
        tmp.display()
    );
}

#[test]
fn convert_pushes_to_a_registry() {
    require_tool("skopeo", "skopeo");
    let reg = strata_testkit::Registry::start();
    let env = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    env.ok(&["pull", &src]);
    let dst = format!("docker://{}/conv:1", reg.addr);
    let s = env.json(&["convert", &src, &dst, "--plain-http"]);
    let n_layers = s["layers"].as_array().unwrap().len() as u64;
    assert_eq!(n_layers, 2, "{s}");
    // every layer and the config were uploaded
    assert_eq!(s["push"]["blobs_uploaded"], n_layers + 1, "{s}");
    assert_eq!(s["push"]["blobs_present"], 0, "{s}");
    no_push_staging_left(&env);

    // What the registry serves: our exact manifest, zstd:chunked layers,
    // the source's config.
    let raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dst]);
    assert_eq!(
        strata_digest::Digest::sha256_of(&raw).to_string(),
        s["manifest_digest"],
        "the registry holds the manifest strata made"
    );
    let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        m["config"]["digest"],
        layout_manifest(&debian_layout(), "python")["config"]["digest"],
        "the config (and its diff_ids) must not change"
    );
    let layers = m["layers"].as_array().unwrap();
    assert_eq!(layers.len() as u64, n_layers);
    for l in layers {
        assert_eq!(
            l["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        assert!(
            l["annotations"]["io.github.containers.zstd-chunked.manifest-checksum"].is_string(),
            "not zstd:chunked: {l}"
        );
    }

    // strata pulls it back to the same tree.
    let other = Env::new();
    other.ok(&["pull", "--plain-http", &dst]);
    assert_eq!(tree_digest(&other, &dst), tree_digest(&env, &src));
    other.fsck_ok();

    // Again, to another tag of the same repository: nothing to upload.
    let dst2 = format!("docker://{}/conv:2", reg.addr);
    let out = env.ok(&["convert", &src, &dst2, "--plain-http"]);
    assert!(
        out.contains(&format!(
            "pushed to {dst2}: 0 blobs uploaded (0 B), {} already present",
            n_layers + 1
        )),
        "{out}"
    );
    let raw2 = skopeo(&["inspect", "--raw", "--tls-verify=false", &dst2]);
    assert_eq!(raw2, raw, "the same conversion gives the same manifest");

    // skopeo copies the pushed image out, every blob verified.
    let copied = env.path("copied");
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &dst,
        &format!("oci:{}:x", copied.display()),
    ]);
    assert_eq!(
        layout_manifest(&copied, "x")["config"]["digest"],
        m["config"]["digest"]
    );
    env.fsck_ok();
    no_push_staging_left(&env);
}

#[test]
fn a_refused_push_is_a_clear_error_and_leaves_the_store_clean() {
    let env = Env::new();
    let src = oci_ref(&synth_layout(), "gnu");
    env.ok(&["pull", &src]);
    // nothing listens
    let port = strata_testkit::free_port();
    let dst = format!("docker://127.0.0.1:{port}/refused:1");
    let e = env.fails(&["convert", &src, &dst, "--plain-http"]);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("reaching registry"),
        "{e}"
    );
    env.fsck_ok();
    no_push_staging_left(&env);

    let reg = strata_testkit::Registry::start();
    // a registry that answers 500 to everything: the status and its error
    let broken = Proxy::start(
        &reg.addr,
        Faults {
            always_500: true,
            ..Faults::default()
        },
    );
    let dst = format!("docker://{}/broken:1", broken.addr);
    let e = env.fails(&["convert", &src, &dst, "--plain-http"]);
    assert!(
        e.contains(&broken.addr) && e.contains("500") && e.contains("injected failure"),
        "{e}"
    );
    // retried like a GET
    let tries = broken.requests().len();
    assert_eq!(tries, 5, "{:?}", broken.requests());

    // a registry that stores the manifest under another digest than the
    // bytes sent: refused after the blobs went up
    let liar = Proxy::start(
        &reg.addr,
        Faults {
            lie_about_manifest_digest: true,
            ..Faults::default()
        },
    );
    let dst = format!("docker://{}/liar:1", liar.addr);
    let e = env.fails(&["convert", &src, &dst, "--plain-http"]);
    assert!(
        e.contains("Docker-Content-Digest") && e.contains(&liar.addr) && e.contains("liar:1"),
        "{e}"
    );
    env.fsck_ok();
    no_push_staging_left(&env);
}

#[test]
fn a_push_asks_for_a_pull_and_push_token_and_shows_no_secret() {
    let reg = strata_testkit::Registry::start();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            bearer: Some("alice:s3cret".into()),
            ..Faults::default()
        },
    );
    let env = Env::new();
    let src = oci_ref(&synth_layout(), "gnu");
    env.ok(&["pull", &src]);
    let dst = format!("docker://{}/team/app:1", proxy.addr);
    // no credentials: an auth error naming the registry
    let e = env.fails(&["convert", &src, &dst, "--plain-http"]);
    assert!(
        e.contains("authentication") && e.contains(&proxy.addr),
        "{e}"
    );
    let auth = env.path("auth.json");
    let b64 = "YWxpY2U6czNjcmV0"; // alice:s3cret
    std::fs::write(
        &auth,
        format!(r#"{{"auths":{{"{}":{{"auth":"{b64}"}}}}}}"#, proxy.addr),
    )
    .unwrap();
    let out = env.run(&[
        "convert",
        &src,
        &dst,
        "--plain-http",
        "--authfile",
        auth.to_str().unwrap(),
    ]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{all}");
    assert!(all.contains("blobs uploaded"), "{all}");
    for secret in ["s3cret", b64, strata_testkit::proxy::TOKEN] {
        assert!(!all.contains(secret), "secret leaked: {all}");
    }
    let log = proxy.requests();
    assert!(
        log.iter().any(|l| l.starts_with("GET /token")
            && l.contains("scope=repository%3Ateam%2Fapp%3Apull%2Cpush")),
        "no pull,push token asked for: {log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("PUT /v2/team/app/manifests/1") && l.ends_with("auth=Bearer")),
        "{log:?}"
    );
    // the pushed image pulls back (straight from the registry)
    let other = Env::new();
    let back = format!("docker://{}/team/app:1", reg.addr);
    other.ok(&["pull", "--plain-http", &back]);
    assert_eq!(tree_digest(&other, &back), tree_digest(&env, &src));
    env.fsck_ok();
}

#[test]
fn layers_skopeo_wrote_as_zstd_chunked_pull_to_the_same_tree() {
    require_tool("skopeo", "skopeo");
    let env = Env::new();
    let src = oci_ref(&debian_layout(), "base");
    env.ok(&["pull", &src]);
    let sk = env.path("skopeo");
    let st = Command::new("skopeo")
        .args(["copy", "--dest-compress-format", "zstd:chunked"])
        .arg(&src)
        .arg(format!("oci:{}:base", sk.display()))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let m = layout_manifest(&sk, "base");
    assert!(
        m["layers"][0]["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string(),
        "Debian's skopeo writes the old zstd:chunked layout: {m}"
    );
    let other = Env::new();
    let r = format!("oci:{}:base", sk.display());
    other.ok(&["pull", &r]);
    other.assert_export_matches_umoci(&debian_layout(), "base", &r);
    other.fsck_ok();
}

/// The store holds debian:base; an updated base (three files changed, one
/// added, all one new layer) is served as zstd:chunked by a registry.
fn updated_base_in_registry() -> (strata_testkit::Registry, Env, String, serde_json::Value) {
    let maker = Env::new();
    let out = maker.path("out");
    maker.ok(&[
        "convert",
        &oci_ref(&apps_layout(), "base-updated"),
        &format!("oci:{}:upd", out.display()),
    ]);
    let reg = strata_testkit::Registry::start();
    reg.push(
        &format!("oci:{}:upd", out.display()),
        "upd:1",
        &["--preserve-digests"],
    );
    let want = tree_digest(&maker, &oci_ref(&apps_layout(), "base-updated"));
    let env = Env::new();
    env.ok(&["pull", &oci_ref(&debian_layout(), "base")]);
    let r = format!("docker://{}/upd:1", reg.addr);
    (reg, env, r, want)
}

#[test]
fn partial_pull_fetches_only_the_missing_files() {
    let (_reg, env, r, want) = updated_base_in_registry();
    let run = env.run(&["--json", "pull", "--plain-http", &r]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(s["layers_partial"], 1, "{s}");
    let manifest = env.json(&["inspect", &r]);
    let layer_size = manifest["layers"][0]["size"].as_u64().unwrap();
    let got = s["bytes_downloaded"].as_u64().unwrap();
    // TOC + tar-split (~1 MB for 5000 files) + the four new files' frames.
    assert!(
        got * 20 < layer_size,
        "downloaded {got} of a {layer_size}-byte layer"
    );
    assert_eq!(
        s["objects_written"], 4,
        "three changed files and one new: {s}"
    );
    assert_eq!(tree_digest(&env, &r), want, "the same tree as a full pull");
    env.fsck_ok();
}

#[test]
fn a_tampered_chunk_fails_the_partial_pull_and_stores_nothing() {
    let (reg, env, r, _) = updated_base_in_registry();
    // Corrupt the frames of the file only the updated layer has.
    let out = env.path("peek");
    let st = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", "--preserve-digests"])
        .arg(format!("docker://{}/upd:1", reg.addr))
        .arg(format!("oci:{}:upd", out.display()))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let man = layout_manifest(&out, "upd");
    let layer = &man["layers"][0];
    let digest = layer["digest"].as_str().unwrap();
    let blob_file = out.join("blobs/sha256").join(&digest[7..]);
    let blob = std::fs::read(&blob_file).unwrap();
    let (off, end) = toc_file_range(&blob, layer, "etc/strata-updated");
    let in_registry = reg.blob_path(&digest[7..]);
    let mut bytes = std::fs::read(&in_registry).unwrap();
    let mid = ((off + end) / 2) as usize;
    bytes[mid] ^= 0x40;
    std::fs::write(&in_registry, &bytes).unwrap();
    let err = env.fails(&["pull", "--plain-http", &r]);
    assert!(
        err.contains("digest") || err.contains("decompress"),
        "a clear error naming the bad content: {err}"
    );
    let e = env.fails(&["inspect", &r]);
    assert!(e.contains("not found"), "nothing recorded: {e}");
    env.fsck_ok();
}

fn partial_through(
    faults: strata_testkit::proxy::Faults,
) -> (serde_json::Value, String, Vec<String>) {
    let (reg, env, _, want) = updated_base_in_registry();
    let proxy = strata_testkit::proxy::Proxy::start(&reg.addr, faults);
    let r = format!("docker://{}/upd:1", proxy.addr);
    let run = env.run(&["--json", "pull", "--plain-http", &r]);
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    assert!(run.status.success(), "{stderr}");
    assert_eq!(tree_digest(&env, &r), want, "same tree whatever the path");
    env.fsck_ok();
    (
        serde_json::from_slice(&run.stdout).unwrap(),
        stderr,
        proxy.requests(),
    )
}

#[test]
fn partial_pull_asks_for_several_ranges_at_once() {
    let (s, _, log) = partial_through(Default::default());
    assert_eq!(s["layers_partial"], 1, "{s}");
    let ranged: Vec<_> = log.iter().filter(|l| l.contains("range=")).collect();
    assert!(
        ranged.iter().any(|l| l.contains(',')),
        "no multi-range request: {ranged:?}"
    );
}

#[test]
fn a_registry_refusing_many_ranges_is_asked_one_at_a_time() {
    let (s, _, log) = partial_through(strata_testkit::proxy::Faults {
        refuse_multi_range: true,
        ..Default::default()
    });
    assert_eq!(s["layers_partial"], 1, "{s}");
    let single = log
        .iter()
        .filter(|l| l.contains("range=") && !l.contains(','))
        .count();
    assert!(single >= 3, "{log:?}");
}

#[test]
fn a_registry_without_ranges_gets_a_full_pull_and_strata_says_so() {
    let (s, stderr, _) = partial_through(strata_testkit::proxy::Faults {
        ignore_ranges: true,
        ..Default::default()
    });
    assert_eq!(s["layers_partial"], 0, "{s}");
    assert_eq!(s["layers_fetched"], 1, "{s}");
    assert!(
        stderr.contains("pulled in full") && stderr.contains("does not serve byte ranges"),
        "{stderr}"
    );
}

#[test]
fn estargz_layers_made_by_ctr_remote_pull_like_umoci_unpacks_them() {
    require_tool("ctr-remote", "stargz-snapshotter");
    require_tool("skopeo", "skopeo");
    let env = Env::new();
    // A layout with just one synthetic gzip image (containerd cannot import
    // the old GNU sparse ones the full fixture has).
    let src = env.path("src");
    let st = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(oci_ref(&synth_layout(), "python"))
        .arg(format!("oci:{}:python", src.display()))
        .status()
        .unwrap();
    assert!(st.success());
    let c = Containerd::start();
    c.import_layout(&src, "strata/synth");
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(c.socket())
        .args(["image", "convert", "--estargz", "--oci"])
        .args(["strata/synth:python", "strata/synth:python-esgz"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctr-remote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive = env.path("esgz.tar");
    c.ctr(&[
        "images",
        "export",
        "--platform",
        "linux/amd64",
        archive.to_str().unwrap(),
        "strata/synth:python-esgz",
    ]);
    let layout = env.path("esgz");
    std::fs::create_dir_all(&layout).unwrap();
    assert!(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-xf")
            .arg(&archive)
            .status()
            .unwrap()
            .success()
    );
    let m = layout_manifest(&layout, "python-esgz");
    assert!(
        m["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"].is_string(),
        "ctr-remote wrote eStargz: {m}"
    );
    let r = oci_ref(&layout, "python-esgz");
    env.ok(&["pull", &r]);
    // The eStargz TOC and landmark are tar entries: every runtime that
    // unpacks the layer sees them, and so does strata.
    env.assert_export_matches_umoci(&layout, "python-esgz", &r);
    env.fsck_ok();
}

#[test]
fn podman_pulls_and_runs_a_converted_image() {
    require_tool("podman", "podman");
    let env = Env::new();
    // podman names the image after the layout path, and image names must
    // be lowercase: a lowercase directory of our own.
    let out = std::path::PathBuf::from(format!("/tmp/strata-podman-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    env.ok(&[
        "convert",
        &oci_ref(&debian_layout(), "python"),
        &format!("oci:{}:python", out.display()),
    ]);
    let root = env.path("podman-root");
    let runroot = env.path("podman-run");
    let podman = |args: &[&str]| {
        let o = Command::new("podman")
            .arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "overlay"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let id = podman(&["pull", "-q", &format!("oci:{}:python", out.display())]);
    let said = podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        id.trim(),
        "/usr/bin/python3",
        "-c",
        "print(6*7)",
    ]);
    assert_eq!(said.trim(), "42");
    // podman's storage holds mounts and containers under root: clean up.
    let _ = Command::new("podman")
        .arg("--root")
        .arg(&root)
        .arg("--runroot")
        .arg(&runroot)
        .args(["system", "reset", "-f"])
        .output();
    let _ = std::fs::remove_dir_all(&out);
}

/// Regular files and hard links of a tar, in order.
fn file_entries(tar: &[u8]) -> Vec<String> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .filter(|e| {
            matches!(
                e.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Link
            )
        })
        .map(|e| {
            String::from_utf8(e.path_bytes().to_vec())
                .unwrap()
                .trim_start_matches("./")
                .to_string()
        })
        .collect()
}

/// `(name, offset, endOffset)` of every `reg` entry with contents of a
/// zstd:chunked layer's TOC.
fn toc_files(blob: &[u8], layer: &serde_json::Value) -> Vec<(String, u64, u64)> {
    let pos: Vec<usize> =
        layer["annotations"]["io.github.containers.zstd-chunked.manifest-position"]
            .as_str()
            .expect("a zstd:chunked layer")
            .split(':')
            .map(|n| n.parse().unwrap())
            .collect();
    let toc: serde_json::Value =
        serde_json::from_slice(&zstd::stream::decode_all(&blob[pos[0]..pos[0] + pos[1]]).unwrap())
            .unwrap();
    toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "reg" && e["size"].as_u64().unwrap_or(0) > 0)
        .map(|e| {
            (
                e["name"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("./")
                    .to_string(),
                e["offset"].as_u64().unwrap(),
                e["endOffset"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn files_placed_first_lead_their_layers_and_the_tree_is_the_same() {
    require_tool("skopeo", "skopeo");
    require_tool("umoci", "umoci");
    let env = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    env.ok(&["pull", &src]);
    // files of both layers; perl5.36.0 is a hard link to perl (which must
    // come along), and a path the image lacks is ignored
    let listed = [
        "usr/bin/ls",
        "usr/bin/perl5.36.0",
        "usr/bin/python3.11",
        "usr/lib/python3.11/os.py",
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/encodings/__init__.py",
    ];
    let list = env.path("list");
    let mut text: String = listed.iter().map(|p| format!("/{p}\n")).collect();
    text.push_str("/no/such/file\n");
    std::fs::write(&list, text).unwrap();
    let out = env.path("out");
    let said = env.ok(&[
        "convert",
        &src,
        &format!("oci:{}:python", out.display()),
        "--prefetch-list",
        list.to_str().unwrap(),
    ]);
    assert!(
        said.contains("first in 2 layers") && said.contains("diff_ids changed"),
        "{said}"
    );
    let before = layout_manifest(&debian_layout(), "python");
    let after = layout_manifest(&out, "python");
    assert_ne!(before["config"]["digest"], after["config"]["digest"]);
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob_path(&out, after["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let layers = after["layers"].as_array().unwrap();
    let mut seen = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let blob = std::fs::read(blob_path(&out, l["digest"].as_str().unwrap())).unwrap();
        let tar = zstd::stream::decode_all(&blob[..]).unwrap();
        // the config names the reordered tar
        assert_eq!(
            config["rootfs"]["diff_ids"][i].as_str().unwrap(),
            format!("sha256:{}", sha256_hex(&tar)),
            "layer {i}"
        );
        // the listed files of this layer (and perl) lead its files
        let files = file_entries(&tar);
        let lead: Vec<&String> = files
            .iter()
            .take_while(|f| listed.contains(&f.as_str()) || *f == "usr/bin/perl")
            .collect();
        let here: Vec<&String> = files
            .iter()
            .filter(|f| listed.contains(&f.as_str()))
            .collect();
        assert!(!here.is_empty(), "layer {i} holds listed files");
        for f in &here {
            assert!(lead.contains(f), "layer {i}: {f} is not first: {lead:?}");
        }
        seen.extend(here.into_iter().cloned());
        if files.iter().any(|f| f == "usr/bin/perl5.36.0") {
            let at = |n: &str| files.iter().position(|f| f == n).unwrap();
            assert!(at("usr/bin/perl") < at("usr/bin/perl5.36.0"), "{lead:?}");
        }
        // the mark: every placed file's frames end by it, every other
        // file's start after it
        let mark: u64 = l["annotations"]["dev.strata.lazy.first-end"]
            .as_str()
            .unwrap_or_else(|| panic!("layer {i} has no first-end mark: {l}"))
            .parse()
            .unwrap();
        for (name, offset, end) in toc_files(&blob, l) {
            if lead.iter().any(|f| **f == name) {
                assert!(end <= mark, "{name} ends at {end}, after {mark}");
            } else {
                assert!(offset >= mark, "{name} starts at {offset}, before {mark}");
            }
        }
    }
    seen.sort();
    let mut want: Vec<String> = listed.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);

    // the same tree: skopeo (to gzip) + umoci, and strata's own pull
    let gz = env.path("gz");
    let st = Command::new("skopeo")
        .args(["copy", "--dest-compress", "--dest-compress-format", "gzip"])
        .arg(format!("oci:{}:python", out.display()))
        .arg(format!("oci:{}:python", gz.display()))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    env.assert_export_matches_umoci(&gz, "python", &src);
    let other = Env::new();
    let conv = format!("oci:{}:python", out.display());
    other.ok(&["pull", &conv]);
    assert_eq!(tree_digest(&other, &conv), tree_digest(&env, &src));
    other.fsck_ok();
    // containerd pulls it from a registry and runs it
    containerd_pulls_and_runs_python(&out, "placed");

    // --keep-order: the tars, the config and the diff_ids stay
    let kept = env.path("kept");
    let said = env.ok(&[
        "convert",
        &src,
        &format!("oci:{}:python", kept.display()),
        "--prefetch-list",
        list.to_str().unwrap(),
        "--keep-order",
    ]);
    assert!(!said.contains("placed"), "{said}");
    let m = layout_manifest(&kept, "python");
    assert_eq!(m["config"]["digest"], before["config"]["digest"]);
    assert!(m["annotations"]["dev.strata.lazy.prefetch"].is_string());
    for l in m["layers"].as_array().unwrap() {
        assert!(
            l["annotations"]["dev.strata.lazy.first-end"].is_null(),
            "{l}"
        );
    }
    env.fsck_ok();
}

fn sha256_hex(b: &[u8]) -> String {
    let mut h = strata_digest::Hasher::new();
    std::io::Write::write_all(&mut h, b).unwrap();
    h.finish().hex()
}
