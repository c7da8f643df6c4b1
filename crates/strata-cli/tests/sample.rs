//! End-to-end on the sample image that ships with the repository:
//! pull from an OCI layout, list, inspect, export (dir and tar), re-pull,
//! tag, rm, gc, fsck.

mod common;
use common::*;

#[test]
fn pull_inspect_export_equals_umoci() {
    let env = Env::new();
    let layout = sample_layout();
    let src = format!("oci:{}:latest", layout.display());
    let summary = env.json(&["pull", &src]);
    let digest = summary["manifest_digest"].as_str().unwrap().to_string();
    assert!(
        summary["layers_fetched"].as_u64().unwrap() >= 1,
        "{summary}"
    );
    assert_eq!(summary["layers_reused"], 0, "{summary}");
    assert!(summary["bytes_written"].as_u64().unwrap() > 0, "{summary}");

    // The name it was pulled with and the digest both resolve.
    let by_name = env.json(&["inspect", &src]);
    let by_digest = env.json(&["inspect", &digest]);
    assert_eq!(by_name["manifest_digest"], by_digest["manifest_digest"]);
    let layers = by_name["layers"].as_array().unwrap();
    let diff_ids = by_name["config"]["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    for (l, d) in layers.iter().zip(diff_ids) {
        assert_eq!(&l["diff_id"], d);
    }

    let images = env.ok(&["images"]);
    assert!(images.contains(&src), "{images}");

    let exported = env.assert_export_matches_umoci(&layout, "latest", &src);

    // Tar export re-imported by GNU tar equals the dir export.
    let tarfile = env.path("sample.tar");
    env.ok(&["export", &digest, "--tar", tarfile.to_str().unwrap()]);
    let untar = gnu_untar(&tarfile, &env.path("untar"));
    let diffs = compare_trees(&exported, &untar, Compare::ALL);
    assert!(
        diffs.is_empty(),
        "tar export differs:\n{}",
        diffs.join("\n")
    );

    // A second pull downloads and writes nothing.
    let again = env.json(&["pull", &src]);
    assert_eq!(again["manifest_digest"].as_str().unwrap(), digest);
    assert_eq!(again["layers_fetched"], 0, "{again}");
    assert_eq!(again["bytes_downloaded"], 0, "{again}");
    assert_eq!(again["bytes_written"], 0, "{again}");
    env.fsck_ok();
}

#[test]
fn tag_rm_gc() {
    let env = Env::new();
    let src = format!("oci:{}:latest", sample_layout().display());
    let digest = env.ok(&["--quiet", "pull", &src]).trim().to_string();
    env.ok(&["tag", &src, "mine"]);
    assert_eq!(
        env.json(&["inspect", "mine"])["manifest_digest"],
        digest.as_str()
    );

    // Removing one name keeps the image; gc frees nothing.
    env.ok(&["rm", "mine"]);
    env.fails(&["inspect", "mine"]);
    let gc = env.json(&["gc"]);
    assert_eq!(gc["objects"], 0, "{gc}");
    assert_eq!(gc["layers"].as_array().unwrap().len(), 0, "{gc}");

    // Removing the last name: dry run reports, real run frees, store empty.
    env.ok(&["rm", &digest]);
    let dry = env.json(&["gc", "--dry-run"]);
    assert!(dry["objects"].as_u64().unwrap() > 0, "{dry}");
    let n_layers = dry["layers"].as_array().unwrap().len();
    assert!(n_layers >= 1, "{dry}");
    let objects_dir = env.root().join("objects");
    let count = |d: &std::path::Path| walk_files(d);
    assert_eq!(
        count(&objects_dir),
        dry["objects"].as_u64().unwrap() as usize
    );
    let real = env.json(&["gc"]);
    assert_eq!(real["objects"], dry["objects"]);
    assert_eq!(count(&objects_dir), 0);
    assert!(
        std::fs::read_dir(env.root().join("layers"))
            .unwrap()
            .next()
            .is_none()
    );
    env.fsck_ok();
}

fn walk_files(d: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(d).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walk_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

#[test]
fn fsck_reports_damaged_objects() {
    let env = Env::new();
    let src = format!("oci:{}:latest", sample_layout().display());
    env.ok(&["pull", &src]);
    env.fsck_ok();
    // Alter one object behind strata's back.
    let objects = env.root().join("objects");
    let fan = std::fs::read_dir(&objects)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let obj = std::fs::read_dir(&fan)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut perms = std::fs::metadata(&obj).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&obj, perms).unwrap();
    std::fs::write(&obj, b"tampered").unwrap();
    let out = env.run(&["fsck"]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let name = obj.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        text.contains(&name),
        "fsck output should name the object {name}:\n{text}"
    );
    assert!(text.contains("hashes to"), "{text}");
}

#[test]
fn unknown_image_is_a_clear_error() {
    let env = Env::new();
    let err = env.fails(&["inspect", "nope"]);
    assert!(err.contains("\"nope\" not found"), "{err}");
    let err = env.fails(&["pull", "oci:/nonexistent/layout:latest"]);
    assert!(err.contains("/nonexistent/layout"), "{err}");
    let err = env.fails(&["pull", "bogus://x"]);
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn oci_archive_and_docker_archive_transports() {
    let env = Env::new();
    let layout = sample_layout();
    // oci-archive: a tar of the layout
    let oa = env.path("hello-oci.tar");
    run(std::process::Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&oa)
        .arg("."));
    let oa_ref = format!("oci-archive:{}:latest", oa.display());
    let s1 = env.json(&["pull", &oa_ref]);
    // same manifest bytes as the layout: same digest, nothing new written
    let from_layout = env.json(&["pull", &format!("oci:{}:latest", layout.display())]);
    assert_eq!(s1["manifest_digest"], from_layout["manifest_digest"]);
    assert_eq!(from_layout["bytes_written"], 0);

    // docker-archive written by skopeo (docker save format)
    require_tool("skopeo", "skopeo");
    let da = env.path("hello-docker.tar");
    run(std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(format!("docker-archive:{}:sample/hello:v1", da.display())));
    let da_ref = format!("docker-archive:{}:sample/hello:v1", da.display());
    let s2 = env.json(&["pull", &da_ref]);
    // the layers are the same uncompressed tars: reused by diff_id
    assert_eq!(s2["layers_fetched"], 0, "{s2}");
    let ours = env.assert_export_matches_umoci(&layout, "latest", &da_ref);
    assert!(ours.join("usr/bin/hello").is_file());
    // pulling the docker archive again gives the same synthesized manifest
    let s3 = env.json(&["pull", &da_ref]);
    assert_eq!(s3["manifest_digest"], s2["manifest_digest"]);
    // a tag that is not in the archive is named in the error
    let err = env.fails(&[
        "pull",
        &format!("docker-archive:{}:other:tag", da.display()),
    ]);
    assert!(
        err.contains("other:tag") && err.contains("sample/hello:v1"),
        "{err}"
    );
    env.fsck_ok();
}

#[test]
fn progress_bars_on_a_terminal_and_none_when_piped() {
    require_tool("script", "util-linux");
    let env = Env::new();
    let src = format!("oci:{}:latest", sample_layout().display());
    // `script` gives strata a pseudo-terminal, as a user's shell would.
    let cmdline = format!(
        "{} --root {} pull {src}",
        env!("CARGO_BIN_EXE_strata"),
        env.root().display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tty = String::from_utf8_lossy(&out.stdout);
    // one bar per layer with bytes, rate and ETA, finished with "done"
    for l in env.json(&["inspect", &src])["layers"].as_array().unwrap() {
        let short = &l["digest"].as_str().unwrap()[..19];
        assert!(tty.contains(short), "no bar for {short}: {tty}");
    }
    assert!(
        tty.contains("eta") && tty.contains("/s") && tty.contains("done"),
        "{tty}"
    );
    assert!(tty.contains("pulled "), "summary line missing: {tty}");
    // piped (not a terminal): the summary and tree-digest lines only
    let piped = env.ok(&["pull", &src]);
    assert_eq!(piped.lines().count(), 2, "{piped}");
    assert!(
        piped.lines().nth(1).unwrap().starts_with("tree sha256:"),
        "{piped}"
    );
    assert!(
        piped.starts_with("pulled ") && !piped.contains("eta"),
        "{piped}"
    );
}
