//! `strata mount --lazy` of hostile zstd:chunked images (issue 15): a lazy
//! mount serves nothing a full pull would reject.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Write `bytes` as a blob of `layout`; its digest.
fn put_blob(layout: &Path, bytes: &[u8]) -> String {
    let d = strata_digest::Digest::sha256_of(bytes).to_string();
    std::fs::write(blob_path(layout, &d), bytes).unwrap();
    d
}

/// Give the top layer of the image tagged `tag` in `layout` another
/// diff_id in its config (new config, manifest and index entry): its
/// blob, TOC and tar-split are untouched and agree with each other.
fn break_top_diff_id(layout: &Path) {
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let mdesc = &mut index["manifests"][0];
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob_path(layout, mdesc["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob_path(
            layout,
            manifest["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap(),
    )
    .unwrap();
    let ids = config["rootfs"]["diff_ids"].as_array_mut().unwrap();
    let n = ids.len();
    ids[n - 1] = strata_digest::Digest::sha256_of(b"another tar")
        .to_string()
        .into();
    let cbytes = serde_json::to_vec(&config).unwrap();
    manifest["config"]["digest"] = put_blob(layout, &cbytes).into();
    manifest["config"]["size"] = cbytes.len().into();
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    mdesc["digest"] = put_blob(layout, &mbytes).into();
    mdesc["size"] = mbytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = e.file_type().unwrap();
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

fn mount_state(env: &Env, dir: &Path) -> serde_json::Value {
    let all = env.json(&["mounts"]);
    all.as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"].as_str() == dir.to_str())
        .cloned()
        .unwrap_or_else(|| panic!("{} not in strata mounts: {all}", dir.display()))
}

/// The layer's files all arrive through reads; its rebuilt tar fails the
/// diff_id: the mount is marked inconsistent, `strata mounts` says so,
/// and reads that reach the mount fail with EIO.
#[test]
fn a_layer_failing_its_diff_id_makes_the_lazy_mount_inconsistent() {
    let reg = Registry::start();
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", &src]);
    let out = conv.path("out");
    conv.ok(&["convert", &src, &format!("oci:{}:python", out.display())]);
    break_top_diff_id(&out);
    reg.push(
        &format!("oci:{}:python", out.display()),
        "bad:1",
        &["--preserve-digests"],
    );
    let r = format!("docker://{}/bad:1", reg.addr);

    let env = Env::new();
    let mount = LazyMount::new(&env, &r, env.path("mnt"));
    let dir = mount.dir.clone();
    assert!(mount_state(&env, &dir)["inconsistent"].is_null());

    // read every file but one of the base layer: the top layer completes
    let spare = dir.join("usr/bin/ls");
    let mut files = Vec::new();
    files_under(&dir, &mut files);
    for f in files.iter().filter(|f| **f != spare) {
        let _ = std::fs::read(f);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let s = loop {
        let s = mount_state(&env, &dir);
        if !s["inconsistent"].is_null() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "not marked inconsistent: {s}\n{}",
            std::fs::read_to_string(s["log"].as_str().unwrap()).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        s["inconsistent"].as_str().unwrap().contains("diff_id"),
        "{s}"
    );
    let human = env.ok(&["mounts"]);
    assert!(human.contains("INCONSISTENT"), "{human}");
    let log = std::fs::read_to_string(s["log"].as_str().unwrap()).unwrap_or_default();
    assert!(log.contains("inconsistent"), "{log}");
    // a file not read before: EIO, not its bytes
    let err = std::fs::read(&spare).expect_err("an inconsistent mount serves nothing more");
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
}

/// The registry breaks while a lazy mount serves (every blob GET answers
/// 500): each read of a file not fetched yet fails with EIO within the
/// documented bound (30 s), again and again, without a hang; the mount
/// stays up and serves the file once the registry is back.
#[test]
fn a_fetch_that_keeps_failing_gives_eio_every_time_and_recovers() {
    use strata_testkit::proxy::{Faults, Proxy};
    let reg = Registry::start();
    let r = chunked_python(&reg, "py:1");
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let r = r.replace(&reg.addr, &proxy.addr);
    let env = Env::new();
    let mount = LazyMount::new(&env, &r, env.path("mnt"));
    let dir = mount.dir.clone();

    proxy.set_fail_blobs(u64::MAX);
    let python = dir.join("usr/bin/python3.11");
    for attempt in 1..=3 {
        let t = Instant::now();
        let err = std::fs::read(&python).expect_err("the registry answers 500");
        let took = t.elapsed();
        assert_eq!(err.raw_os_error(), Some(5), "attempt {attempt}: {err}");
        assert!(
            took < Duration::from_secs(30),
            "attempt {attempt}: EIO after {took:?}"
        );
        eprintln!("failing registry: read {attempt} got EIO after {took:?}");
    }
    let s = mount_state(&env, &dir);
    assert!(
        s["inconsistent"].is_null(),
        "a failing registry is no inconsistency: {s}"
    );
    let log = std::fs::read_to_string(s["log"].as_str().unwrap()).unwrap_or_default();
    assert!(
        log.contains("500"),
        "the log names the registry's answer: {log}"
    );

    proxy.set_fail_blobs(0);
    assert_eq!(chroot_python(&dir, "print(6 * 7)"), "42");
    drop(mount);
    env.fsck_ok();
}
