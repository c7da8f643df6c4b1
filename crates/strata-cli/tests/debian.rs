//! The real Debian images (debootstrap minbase + a python3 layer): pulls
//! equal umoci, a derived pull downloads only its new layer, kill -9 at
//! random points leaves a store fsck accepts, concurrent pulls and a gc
//! all finish, and a full disk is a clean error.

mod common;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn debian_base_and_python_equal_umoci_and_rebuild_exactly() {
    let env = Env::new();
    let layout = debian_layout();
    for tag in ["base", "python"] {
        let r = oci_ref(&layout, tag);
        env.ok(&["pull", &r]);
        env.assert_export_matches_umoci(&layout, tag, &r);
    }
    assert_layers_rebuild(&env.root());
    env.fsck_ok();
}

#[test]
fn derived_pull_downloads_only_the_new_layer() {
    let reg = Registry::start();
    let env = Env::new();
    let layout = debian_layout();
    reg.push(&oci_ref(&layout, "base"), "debian:base", &[]);
    reg.push(&oci_ref(&layout, "python"), "debian:python", &[]);
    let base = env.json(&[
        "pull",
        "--plain-http",
        &format!("docker://{}/debian:base", reg.addr),
    ]);
    assert_eq!(base["layers_fetched"], 1, "{base}");
    let py_ref = format!("docker://{}/debian:python", reg.addr);
    let py = env.json(&["pull", "--plain-http", &py_ref]);
    let insp = env.json(&["inspect", &py_ref]);
    let layers = insp["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    let top_size = layers[1]["size"].as_u64().unwrap();
    assert_eq!(py["layers_reused"], 1, "{py}");
    assert_eq!(py["layers_fetched"], 1, "{py}");
    assert_eq!(
        py["bytes_downloaded"].as_u64().unwrap(),
        top_size,
        "derived pull must download exactly the new layer's compressed bytes: {py}"
    );
    // the base layer is shared and inspect says so
    assert_eq!(
        layers[0]["shared_with"].as_array().unwrap().len(),
        1,
        "{insp}"
    );

    // The same image recompressed with zstd by skopeo: a fresh store pulls
    // it, and every layer rebuilds to the config's diff_id (the zstd blobs
    // decode to the exact tars).
    reg.push_zstd(&oci_ref(&layout, "python"), "debian-zstd:python");
    let fresh = Env::new();
    let z_ref = format!("docker://{}/debian-zstd:python", reg.addr);
    let z = fresh.json(&["pull", "--plain-http", &z_ref]);
    assert_eq!(z["layers_fetched"], 2, "{z}");
    let zi = fresh.json(&["inspect", &z_ref]);
    for (l, g) in zi["layers"].as_array().unwrap().iter().zip(layers) {
        assert!(l["media_type"].as_str().unwrap().ends_with("+zstd"), "{zi}");
        assert_eq!(l["diff_id"], g["diff_id"]);
    }
    assert_layers_rebuild(&fresh.root());
    fresh.fsck_ok();
}

#[test]
fn kill_9_at_random_points_leaves_a_valid_store() {
    let env = Env::new();
    let r = oci_ref(&debian_layout(), "python");
    // how long a full pull takes here
    let t0 = Instant::now();
    let reference = Env::new();
    let want = reference.ok(&["--quiet", "pull", &r]).trim().to_string();
    let full = t0.elapsed();
    let mut seed: u64 = 0x5eed_1234_abcd_0001;
    for i in 0..20 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let at = Duration::from_micros(seed % (full.as_micros() as u64 + 1));
        let mut child = env
            .cmd()
            .args(["--quiet", "pull", &r])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(at);
        let _ = Command::new("kill")
            .arg("-9")
            .arg(child.id().to_string())
            .status();
        let _ = child.wait();
        let out = env.run(&["fsck"]);
        assert!(
            out.status.success(),
            "fsck after kill -9 #{i} at {at:?}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let got = env.ok(&["--quiet", "pull", &r]).trim().to_string();
    assert_eq!(got, want);
    env.fsck_ok();
    assert_layers_rebuild(&env.root());
}

#[test]
fn concurrent_pulls_and_gc() {
    let env = Env::new();
    let layout = debian_layout();
    let synth = synth_layout();
    // something for gc to collect while the pulls run
    env.ok(&["pull", &oci_ref(&synth, "gnu")]);
    env.ok(&["rm", &oci_ref(&synth, "gnu")]);
    let spawn = |args: Vec<String>| {
        env.cmd()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let a = spawn(vec!["pull".into(), oci_ref(&layout, "base")]);
    let b = spawn(vec!["pull".into(), oci_ref(&layout, "python")]);
    std::thread::sleep(Duration::from_millis(100));
    let g = spawn(vec!["gc".into()]);
    for (name, c) in [("pull base", a), ("pull python", b), ("gc", g)] {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    env.fsck_ok();
    assert_layers_rebuild(&env.root());
    let images = env.json(&["images"]);
    assert_eq!(images.as_array().unwrap().len(), 2, "{images}");
}

#[test]
fn full_disk_is_a_clean_error() {
    require_tool("mkfs.ext4", "e2fsprogs");
    let env = Env::new();
    let img = env.path("small.img");
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("truncate").args(["-s", "24M"]).arg(&img));
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
    let mounted = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "loop mount failed: this test needs root and loop devices"
    );
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Umount(mnt.clone());
    let root = mnt.join("store");
    let strata = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
            .unwrap()
    };
    let out = strata(&["pull", &oci_ref(&debian_layout(), "base")]);
    assert!(!out.status.success(), "a 24 MiB store cannot hold Debian");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("No space left on device"), "{err}");
    let fsck = strata(&["fsck"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    // staging was cleaned: the small image still fits
    let ok = strata(&["pull", &format!("oci:{}:latest", sample_layout().display())]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
