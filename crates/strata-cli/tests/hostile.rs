//! Hostile zstd:chunked images through the real binary (issue 15): a
//! layer converted by `strata convert`, its TOC and tar-split edited (the
//! annotations, manifest and index rewritten to match, so every digest
//! checks out), then `strata pull`. Each pull fails with an error naming
//! the cause, without a panic or an abort, in bounded time and memory
//! (peak RSS from /usr/bin/time), and leaves a clean store.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;
use strata_digest::Digest;

const TOC_POS: &str = "io.github.containers.zstd-chunked.manifest-position";
const TOC_SUM: &str = "io.github.containers.zstd-chunked.manifest-checksum";
const TS_POS: &str = "io.github.containers.zstd-chunked.tarsplit-position";

/// synth's python image converted to zstd:chunked, in a layout of its own.
fn converted(env: &Env) -> PathBuf {
    let src = oci_ref(&synth_layout(), "python");
    env.ok(&["pull", &src]);
    let out = env.path("chunked");
    env.ok(&["convert", &src, &oci_ref(&out, "t")]);
    out
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

fn put(layout: &Path, bytes: &[u8]) -> String {
    let d = Digest::sha256_of(bytes).to_string();
    std::fs::write(blob(layout, &d), bytes).unwrap();
    d
}

fn positions(layer: &Value, key: &str) -> Vec<u64> {
    layer["annotations"][key]
        .as_str()
        .unwrap()
        .split(':')
        .map(|n| n.parse().unwrap())
        .collect()
}

/// A copy of `layout` tagged `tag` whose largest zstd:chunked layer has
/// its TOC and tar-split lines edited by `edit` (`ts_claim`: the
/// tar-split's uncompressed size the annotation states, if not its own).
fn hostile(
    env: &Env,
    layout: &Path,
    tag: &str,
    ts_claim: Option<u64>,
    edit: impl FnOnce(&mut Value, &mut Vec<Value>),
) -> String {
    let out = env.path(tag);
    run(Command::new("cp").arg("-a").arg(layout).arg(&out));
    let index_path = out.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let mdesc = index["manifests"][0].clone();
    let mut manifest: Value = serde_json::from_slice(
        &std::fs::read(blob(&out, mdesc["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let li = (0..manifest["layers"].as_array().unwrap().len())
        .filter(|i| manifest["layers"][*i]["annotations"][TOC_POS].is_string())
        .max_by_key(|i| manifest["layers"][*i]["size"].as_u64().unwrap())
        .expect("a zstd:chunked layer");
    let layer = manifest["layers"][li].clone();
    let bytes = std::fs::read(blob(&out, layer["digest"].as_str().unwrap())).unwrap();
    let (t, s) = (positions(&layer, TOC_POS), positions(&layer, TS_POS));
    let cut = |o: u64, l: u64| zstd::decode_all(&bytes[o as usize..(o + l) as usize]).unwrap();
    let mut toc: Value = serde_json::from_slice(&cut(t[0], t[1])).unwrap();
    let mut ts: Vec<Value> = cut(s[0], s[1])
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    edit(&mut toc, &mut ts);
    let mut ts_text = Vec::new();
    for l in &ts {
        ts_text.extend_from_slice(serde_json::to_string(l).unwrap().as_bytes());
        ts_text.push(b'\n');
    }
    let ts_z = zstd::encode_all(&ts_text[..], 3).unwrap();
    toc["tarSplitDigest"] = Digest::sha256_of(&ts_z).to_string().into();
    let toc_json = serde_json::to_vec(&toc).unwrap();
    let toc_z = zstd::encode_all(&toc_json[..], 3).unwrap();
    // the frames before the TOC's skippable frame, then the new metadata
    // (in skippable frames, so that the blob still decompresses to the tar)
    let mut new = bytes[..t[0] as usize - 8].to_vec();
    let skippable = |new: &mut Vec<u8>, payload: &[u8]| {
        new.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18]);
        new.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let at = new.len();
        new.extend_from_slice(payload);
        at
    };
    let toc_at = skippable(&mut new, &toc_z);
    let ts_at = skippable(&mut new, &ts_z);
    let l = &mut manifest["layers"][li];
    l["annotations"][TOC_POS] = format!("{toc_at}:{}:{}:1", toc_z.len(), toc_json.len()).into();
    l["annotations"][TOC_SUM] = Digest::sha256_of(&toc_z).to_string().into();
    l["annotations"][TS_POS] = format!(
        "{ts_at}:{}:{}",
        ts_z.len(),
        ts_claim.unwrap_or(ts_text.len() as u64)
    )
    .into();
    l["size"] = new.len().into();
    l["digest"] = put(&out, &new).into();
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][0]["digest"] = put(&out, &mbytes).into();
    index["manifests"][0]["size"] = mbytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    oci_ref(&out, "t")
}

/// `strata pull r` into an empty store must fail saying `want`; returns
/// (peak RSS kB, seconds) of the pull.
fn refused(r: &str, want: &str) -> (u64, f64) {
    let (ok, err, kb, secs) = timed_pull(r);
    assert!(!ok, "{r}: pulled");
    // an abort or a panic would show here (and in the exit status)
    assert!(
        !err.contains("panicked") && !err.contains("memory allocation"),
        "{err}"
    );
    assert!(!err.contains("Command terminated by signal"), "{err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    (kb, secs)
}

/// `strata pull r` into an empty store: (success, stderr, peak RSS kB,
/// seconds); a failed pull must leave the store clean.
fn timed_pull(r: &str) -> (bool, String, u64, f64) {
    require_tool("time", "time");
    let env = Env::new();
    let report = env.path("time.out");
    let out = Command::new("/usr/bin/time")
        .arg("-o")
        .arg(&report)
        .args(["-f", "%M %e"])
        .arg(env!("CARGO_BIN_EXE_strata"))
        .arg("--root")
        .arg(env.root())
        .args(["pull", r])
        .env_remove("STRATA_ROOT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let t = std::fs::read_to_string(&report).unwrap();
    let last = t.lines().last().unwrap();
    let mut f = last.split_whitespace();
    let kb = f.next().unwrap().parse().unwrap();
    let secs = f.next().unwrap().parse().unwrap();
    if !out.status.success() {
        env.fails(&["inspect", r]);
    }
    env.fsck_ok();
    (out.status.success(), err, kb, secs)
}

#[test]
fn hostile_chunked_layers_are_refused_in_bounded_time_and_memory() {
    let env = Env::new();
    let layout = converted(&env);
    // the control case pulls (partially: its files are in the store)
    let pulled = Env::new();
    pulled.ok(&["pull", &oci_ref(&layout, "t")]);

    let mut report = Vec::new();
    // a file of 2^40 and one of 2^62 bytes, the TOC and the tar-split
    // agreeing: refused naming the file before any allocation
    for (name, size) in [("file_2p40", 1u64 << 40), ("file_2p62", 1 << 62)] {
        let mut file = String::new();
        let r = hostile(&env, &layout, name, None, |toc, ts| {
            let e = toc["entries"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|e| e["type"] == "reg" && e["size"].as_u64().unwrap_or(0) > 0)
                .unwrap();
            file = e["name"].as_str().unwrap().to_string();
            e["size"] = size.into();
            let l = ts.iter_mut().find(|l| l["name"] == e["name"]).unwrap();
            l["size"] = size.into();
        });
        let (kb, s) = refused(&r, &format!("size {size} is more than its"));
        assert!(kb < 100 * 1024 && s < 10.0, "{name}: {kb} kB, {s} s");
        report.push(format!("{name}: peak RSS {kb} kB, {s} s"));
        let _ = file;
    }
    // a TOC of 10^6 entries (1 MiB compressed): refused by what the
    // tar-split can describe, then with the tar-split claiming 150 MiB
    let million = |toc: &mut Value, _: &mut Vec<Value>| {
        toc["entries"] = (0..1_000_000)
            .map(|i| serde_json::json!({"type": "dir", "name": format!("d{i}")}))
            .collect::<Vec<_>>()
            .into();
    };
    let r = hostile(&env, &layout, "toc_1e6", None, million);
    let (kb, s) = refused(&r, "more entries than the tar-split");
    assert!(kb < 100 * 1024 && s < 10.0, "toc_1e6: {kb} kB, {s} s");
    report.push(format!("toc_1e6: peak RSS {kb} kB, {s} s"));
    let r = hostile(&env, &layout, "toc_1e6_claim", Some(150 << 20), million);
    let (kb, s) = refused(&r, "more entries than the tar-split");
    assert!(kb < 200 * 1024 && s < 20.0, "toc_1e6_claim: {kb} kB, {s} s");
    report.push(format!(
        "toc_1e6 (tar-split claims 150 MiB): peak RSS {kb} kB, {s} s"
    ));
    // a 100 MB TOC (a field no one reads): pulled, at a cost that does
    // not grow with it
    let r = hostile(&env, &layout, "toc_100MB", None, |toc, _| {
        toc["padding"] = "x".repeat(100_000_000).into();
    });
    let (ok, err, kb, s) = timed_pull(&r);
    assert!(ok, "{err}");
    assert!(kb < 100 * 1024 && s < 20.0, "toc_100MB: {kb} kB, {s} s");
    report.push(format!("toc_100MB (pulled): peak RSS {kb} kB, {s} s"));
    let (ok, err, kb0, s0) = timed_pull(&oci_ref(&layout, "t"));
    assert!(ok, "{err}");
    report.push(format!(
        "the layout as converted (pulled): peak RSS {kb0} kB, {s0} s"
    ));
    // a TOC-only entry reusing a real file's digest and frames
    let r = hostile(&env, &layout, "ghost", None, |toc, _| {
        let entries = toc["entries"].as_array_mut().unwrap();
        let mut g = entries
            .iter()
            .find(|e| e["type"] == "reg" && e["size"].as_u64().unwrap_or(0) > 0)
            .unwrap()
            .clone();
        g["name"] = "ghost".into();
        entries.push(g);
    });
    refused(&r, "the TOC lists \"ghost\", which the tar-split lacks");
    for l in report {
        eprintln!("{l}");
    }
}

/// A copy of synth's `gnu` image whose manifest carries one annotation of
/// `pad` bytes.
fn padded_manifest(env: &Env, tag: &str, pad: usize) -> String {
    let out = env.path(tag);
    run(Command::new("cp").arg("-a").arg(synth_layout()).arg(&out));
    let index_path = out.join("index.json");
    let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let entries = index["manifests"].as_array().unwrap();
    let i = entries
        .iter()
        .position(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "gnu")
        .unwrap();
    let mut manifest: Value = serde_json::from_slice(
        &std::fs::read(blob(
            &out,
            index["manifests"][i]["digest"].as_str().unwrap(),
        ))
        .unwrap(),
    )
    .unwrap();
    manifest["annotations"]["org.example.padding"] = "p".repeat(pad).into();
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][i]["digest"] = put(&out, &mbytes).into();
    index["manifests"][i]["size"] = mbytes.len().into();
    index["manifests"][i]["annotations"]["org.opencontainers.image.ref.name"] = tag.into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    oci_ref(&out, tag)
}

/// Manifests over 4 MiB (the OCI distribution spec's guidance) are
/// refused naming the limit, from a layout and from a registry; an
/// annotation value of 3 MiB inside the limit is fine; the limit can be
/// raised through the environment, and a bad value is named.
#[test]
fn manifests_over_the_size_limit_are_refused_and_the_limit_can_be_raised() {
    let env = Env::new();
    let ok = padded_manifest(&env, "pad3m", 3 << 20);
    let big = padded_manifest(&env, "pad5m", 5 << 20);
    let store = Env::new();
    store.ok(&["pull", &ok]);
    let err = store.fails(&["pull", &big]);
    assert!(
        err.contains("the manifest size limit") && err.contains(&(4u64 << 20).to_string()),
        "{err}"
    );
    store.fsck_ok();
    let out = store
        .cmd()
        .args(["pull", &big])
        .env("STRATA_MAX_MANIFEST_BYTES", "8M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = store
        .cmd()
        .args(["images"])
        .env("STRATA_MAX_MANIFEST_BYTES", "lots")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("STRATA_MAX_MANIFEST_BYTES=\"lots\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the same through a registry (docker-registry itself refuses
    // manifests over 4 MiB: a proxy pads a small one on the way out)
    let reg = Registry::start();
    reg.push(&ok, "ok:1", &["--preserve-digests"]);
    let proxy = strata_testkit::proxy::Proxy::start(
        &reg.addr,
        strata_testkit::proxy::Faults {
            pad_manifests: 5 << 20,
            ..Default::default()
        },
    );
    let r = format!("docker://{}/ok:1", proxy.addr);
    let fresh = Env::new();
    let err = fresh.fails(&["pull", "--plain-http", &r]);
    assert!(err.contains("the manifest size limit"), "{err}");
    fresh.fsck_ok();
}
