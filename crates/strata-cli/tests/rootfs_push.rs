//! Templates through a real registry (Debian `docker-registry` on
//! 127.0.0.1): push skips chunks the registry has, a derived template
//! uploads only its new chunks, pull takes the map only (or every chunk
//! with --all, verified), bad references and tampered blobs fail clearly.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;

/// Distinct chunk digests of template `name` in `env`'s store.
fn chunk_set(env: &Env, name: &str) -> BTreeSet<String> {
    let id = env.json(&["rootfs", "inspect", name])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(env.root().join("blocks/maps").join(&id[7..])).unwrap();
    let map: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    map["extents"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["digests"].as_array().unwrap().clone())
        .map(|d| d.as_str().unwrap().to_string())
        .collect()
}

/// A small template from the sample image, and a derived one with files added.
fn templates(env: &Env) {
    sample_template(env);
    let add = env.path("add");
    std::fs::create_dir_all(add.join("etc/app")).unwrap();
    let mut x = 88172645463325252u64;
    let data: Vec<u8> = (0..600_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(add.join("etc/app/data"), data).unwrap();
    std::fs::write(add.join("etc/app/config"), "mode = sandbox\n").unwrap();
    env.ok(&[
        "rootfs",
        "build",
        "--from-template",
        "t",
        "--add",
        add.to_str().unwrap(),
        "--name",
        "t2",
    ]);
}

#[test]
fn push_writes_packs_reuses_the_parents_and_pull_fetches_on_request() {
    let reg = Registry::start();
    let a = Env::new();
    templates(&a);
    let r1 = format!("docker://{}/vm/t:1", reg.addr);
    let push = |name: &str, r: &str| {
        a.json(&[
            "rootfs",
            "push",
            name,
            r,
            "--plain-http",
            "--pack-size",
            "1MiB",
        ])
    };
    let p = push("t", &r1);
    let t = chunk_set(&a, "t");
    assert_eq!(p["chunks"].as_u64(), Some(t.len() as u64), "{p}");
    assert_eq!(
        p["uploaded"], p["chunks"],
        "first push uploads every chunk: {p}"
    );
    // packs of at most 1 MiB (16 chunks), not a blob per chunk
    let (m, index) = artifact(&reg, "vm/t", "1");
    assert_eq!(m["artifactType"], "application/vnd.strata.rootfs.v2", "{m}");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.strata.rootfs.map.v1+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.strata.rootfs.packindex.v1+json"
    );
    let packs = packs_of(&m);
    assert_eq!(packs.len() as u64, p["packs"].as_u64().unwrap(), "{p}");
    assert_eq!(packs.len(), t.len().div_ceil(16), "{p}");
    for d in &packs {
        assert!(
            reg.blob_path(&d[7..]).exists(),
            "pack {d} not in the registry"
        );
    }
    assert!(
        t.iter().all(|d| !reg.blob_path(&d[7..]).exists()),
        "no chunk is a blob of its own"
    );
    assert_eq!(
        index["chunks"].as_array().unwrap().len(),
        t.len(),
        "{index}"
    );
    let again = push("t", &r1);
    assert_eq!(again["uploaded"], 0, "{again}");
    assert_eq!(again["packs_uploaded"], 0, "{again}");
    assert_eq!(
        again["manifest_digest"], p["manifest_digest"],
        "same template, same artifact"
    );

    // the derived template: the parent's packs are listed, one new pack
    // holds exactly the chunks t lacks
    let r2 = format!("docker://{}/vm/t:2", reg.addr);
    let p2 = a.json(&["rootfs", "push", "t2", &r2, "--plain-http"]);
    let t2 = chunk_set(&a, "t2");
    let new: BTreeSet<_> = t2.difference(&t).collect();
    assert!(!new.is_empty());
    assert_eq!(p2["uploaded"].as_u64(), Some(new.len() as u64), "{p2}");
    assert_eq!(p2["packs_uploaded"], 1, "{p2}");
    assert_eq!(p2["packs_mounted"], 0, "same repository: {p2}");
    let (m2, index2) = artifact(&reg, "vm/t", "2");
    let packs2 = packs_of(&m2);
    assert_eq!(
        packs2.len() as u64,
        p2["packs_reused"].as_u64().unwrap() + 1,
        "{p2}"
    );
    assert!(packs2[..packs2.len() - 1].iter().all(|d| packs.contains(d)));
    let last = (packs2.len() - 1) as u64;
    let in_new: BTreeSet<String> = index2["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e[1].as_u64() == Some(last))
        .map(|e| e[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(in_new, new.into_iter().cloned().collect(), "the new pack");

    // pushed to another repository of the registry: the packs are mounted
    let r4 = format!("docker://{}/sandboxes/child:1", reg.addr);
    let p4 = a.json(&["rootfs", "push", "t2", &r4, "--plain-http"]);
    assert_eq!(p4["uploaded"], 0, "{p4}");
    assert_eq!(p4["packs_mounted"], p4["packs"], "{p4}");
    assert_eq!(packs_of(&artifact(&reg, "sandboxes/child", "1").0), packs2);

    // pull: the map and the index only
    let b = Env::new();
    let pulled = b.json(&["rootfs", "pull", &r2, "--plain-http", "--name", "t2"]);
    assert_eq!(pulled["fetched"], 0, "{pulled}");
    assert_eq!(
        pulled["packs"].as_u64(),
        Some(packs2.len() as u64),
        "{pulled}"
    );
    assert_eq!(
        pulled["id"],
        a.json(&["rootfs", "inspect", "t2"])["id"],
        "{pulled}"
    );
    let info = b.json(&["rootfs", "inspect", "t2"]);
    assert_eq!(info["chunks_local"], 0, "{info}");
    assert!(
        info["remote"]["reference"]
            .as_str()
            .unwrap()
            .contains("@sha256:"),
        "{info}"
    );
    assert!(t2.iter().all(|d| !object_exists(&b, d)));
    b.fsck_ok();

    // --all: the packs whole, every chunk verified; the export is the same bytes
    let all = b.json(&[
        "rootfs",
        "pull",
        &r2,
        "--plain-http",
        "--all",
        "--name",
        "t2",
    ]);
    assert_eq!(all["fetched"].as_u64(), Some(t2.len() as u64), "{all}");
    assert_eq!(all["packs_fetched"], all["packs"], "{all}");
    assert!(t2.iter().all(|d| object_exists(&b, d)));
    let (ra, rb) = (a.path("a.raw"), b.path("b.raw"));
    a.ok(&["rootfs", "export", "t2", ra.to_str().unwrap()]);
    b.ok(&["rootfs", "export", "t2", rb.to_str().unwrap()]);
    run(Command::new("cmp").arg(&ra).arg(&rb));
    b.fsck_ok();
    // the pulled template pushed elsewhere in the registry: its own packs,
    // mounted, nothing uploaded
    let r3 = format!("docker://{}/copy/t:2", reg.addr);
    let p3 = b.json(&["rootfs", "push", "t2", &r3, "--plain-http"]);
    assert_eq!(p3["chunks"].as_u64(), Some(t2.len() as u64), "{p3}");
    assert_eq!(p3["uploaded"], 0, "{p3}");
    assert_eq!(p3["packs_mounted"], p3["packs"], "{p3}");
}

#[test]
fn tampered_packs_and_bad_references_fail_clearly() {
    let mut reg = Registry::start();
    let a = Env::new();
    templates(&a);
    let r = format!("docker://{}/vm/t:1", reg.addr);
    a.ok(&["rootfs", "push", "t", &r, "--plain-http"]);

    // a pack byte altered in the registry: pull --all names the chunk,
    // stores nothing, records no template
    let (m, index) = artifact(&reg, "vm/t", "1");
    let pack = packs_of(&m)[0].clone();
    let victim = index["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e[1] == 0 && e[2] == 0)
        .unwrap()[0]
        .as_str()
        .unwrap()
        .to_string();
    let blob = reg.blob_path(&pack[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let b = Env::new();
    let e = b.fails(&["rootfs", "pull", &r, "--plain-http", "--all"]);
    assert!(e.contains(&victim) && e.contains("digest"), "{e}");
    assert!(b.ok(&["rootfs", "ls"]).trim().is_empty() || !b.ok(&["rootfs", "ls"]).contains("vm/t"));
    assert!(!object_exists(&b, &victim));
    b.fsck_ok();

    // an image is not a template
    reg.push(&oci_ref(&sample_layout(), "latest"), "img/sample:1", &[]);
    let e = b.fails(&[
        "rootfs",
        "pull",
        &format!("docker://{}/img/sample:1", reg.addr),
        "--plain-http",
    ]);
    assert!(e.contains("not a strata template"), "{e}");
    let e = b.fails(&["rootfs", "pull", "oci:/nonexistent:x"]);
    assert!(e.contains("docker://"), "{e}");
    let e = a.fails(&["rootfs", "push", "nosuch", &r, "--plain-http"]);
    assert!(e.contains("nosuch"), "{e}");
    let e = b.fails(&[
        "rootfs",
        "pull",
        &format!("docker://{}/vm/none:1", reg.addr),
        "--plain-http",
    ]);
    assert!(e.contains("vm/none"), "{e}");

    // the registry gone: a clear error, nothing recorded
    reg.stop();
    let c = Env::new();
    let e = c.fails(&["rootfs", "pull", &r, "--plain-http"]);
    assert!(e.contains(&reg.addr), "{e}");
    c.fsck_ok();
    a.fsck_ok();
}

/// Without `--name` the template is named by the reference as given; a
/// map-only pull cannot be exported (the chunks are in the registry) and
/// says which chunk is missing rather than writing a partial file.
#[test]
fn a_map_only_pull_is_named_by_its_reference_and_export_names_the_missing_chunk() {
    let reg = Registry::start();
    let a = Env::new();
    sample_template(&a);
    let r = format!("docker://{}/vm/t:1", reg.addr);
    let pushed = a.json(&["rootfs", "push", "t", &r, "--plain-http", "--jobs", "2"]);

    let b = Env::new();
    let pulled = b.json(&["rootfs", "pull", &r, "--plain-http"]);
    assert_eq!(pulled["name"], r.as_str(), "{pulled}");
    assert_eq!(pulled["manifest_digest"], pushed["manifest_digest"]);
    assert_eq!(pulled["fetched"], 0, "{pulled}");
    assert!(b.ok(&["rootfs", "ls"]).contains(&r));
    let info = b.json(&["rootfs", "inspect", &r]);
    assert_eq!(info["id"], pulled["id"], "{info}");
    assert_eq!(info["id"], a.json(&["rootfs", "inspect", "t"])["id"]);

    let out = b.path("t.raw");
    let e = b.fails(&["rootfs", "export", &r, out.to_str().unwrap()]);
    assert!(e.contains("is not in the store"), "{e}");
    b.fsck_ok();

    // a second pull of the same artifact records the same template
    let again = b.json(&["rootfs", "pull", &r, "--plain-http", "--all"]);
    assert_eq!(again["id"], pulled["id"], "{again}");
    assert_eq!(again["fetched"], again["chunks"], "{again}");
    b.ok(&["rootfs", "export", &r, out.to_str().unwrap()]);
    b.fsck_ok();
}
