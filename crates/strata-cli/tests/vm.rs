//! VM templates booted in real microVMs: QEMU (TCG here: nested KVM does
//! not boot on this machine; `scripts/vm/boot.py` says which it used) with
//! Debian's cloud kernel and a busybox initramfs (`scripts/vm/setup.sh`)
//! that mounts the template's ext4 as root and runs a command. The
//! Debian + python template boots from an exported raw file, a served
//! local template, a grown one (the guest's `df` sees the new size), a
//! map-only template served from a registry through a counting proxy
//! (chunks by range from its packs, each once, a minority of the image), a
//! tampered pack (EIO in the guest, nothing stored), and a writable serve
//! whose disk becomes a child template that boots with what was written
//! and pushes as one new pack. Run as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use common::*;
use strata_testkit::proxy::{Faults, Proxy};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kernel, initramfs and QEMU (scripts/vm/setup.sh, idempotent): fails
/// saying what is missing.
fn vm_ready() {
    static SETUP: Once = Once::new();
    SETUP.call_once(|| {
        let out = Command::new("bash")
            .arg(repo().join("scripts/vm/setup.sh"))
            .output()
            .expect("running scripts/vm/setup.sh");
        assert!(
            out.status.success(),
            "scripts/vm/setup.sh (QEMU, the Debian cloud kernel, busybox-static) failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// What a boot printed and returned.
struct Boot {
    rc: i64,
    output: String,
    json: serde_json::Value,
}

/// Boot `disk` and run `cmd` in it (`rw`: the disk is writable).
fn boot(disk: &Path, cmd: &str, rw: bool) -> Boot {
    vm_ready();
    let mut c = Command::new("python3");
    c.arg(repo().join("scripts/vm/boot.py")).arg(disk).args([
        "--cmd",
        cmd,
        "--json",
        "--timeout",
        "240",
        "--mem",
        "256",
    ]);
    if rw {
        c.arg("--rw");
    }
    let out = c.output().expect("running scripts/vm/boot.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "boot.py {}: no JSON ({e}): {stdout}\n{}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        json["error"].is_null() || json["rc"].as_i64().is_some_and(|r| r < 124),
        "the VM did not run the command: {json}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "booted {}: accel {} machine {} in {} s",
        disk.display(),
        json["accel"],
        json["machine"],
        json["seconds_total"]
    );
    Boot {
        rc: json["rc"].as_i64().unwrap_or(-1),
        output: json["output"].as_str().unwrap_or_default().to_string(),
        json,
    }
}

/// Boot and expect `marker` in the output and status 0.
fn boots_with(disk: &Path, cmd: &str, marker: &str) -> Boot {
    let b = boot(disk, cmd, false);
    assert!(
        b.rc == 0 && b.output.contains(marker),
        "{} should print {marker:?}: {}",
        disk.display(),
        b.json
    );
    b
}

const PYTHON: &str =
    "python3 -c 'import json, sys; print(json.dumps({\"vm\": sys.version_info[0]}))'";
const PYTHON_SAYS: &str = "{\"vm\": 3}";

/// Kibibytes of `/` the guest's `df` reports.
fn df_root_kib(output: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.trim_end().ends_with(" /"))
        .unwrap_or_else(|| panic!("no / in df output: {output}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn a_template_boots_from_a_raw_file_a_local_serve_and_grown() {
    let env = Env::new();
    python_template(&env, "py", "1GiB");
    let raw = env.path("py.raw");
    env.ok(&["rootfs", "export", "py", raw.to_str().unwrap()]);
    boots_with(&raw, PYTHON, PYTHON_SAYS);

    let served = Served::new(&env, "py", "py.img", &[]);
    boots_with(&served.file, PYTHON, PYTHON_SAYS);
    let st = served.state();
    assert!(st["bytes_read"].as_u64().unwrap() > 0, "{st}");
    drop(served);

    // grown on the host; the guest sees the size without resize2fs
    env.ok(&[
        "rootfs",
        "build",
        "--from-template",
        "py",
        "--size",
        "3GiB",
        "--name",
        "big",
    ]);
    let served = Served::new(&env, "big", "big.img", &[]);
    let b = boots_with(&served.file, "df -k /", "/");
    let kib = df_root_kib(&b.output);
    assert!(
        kib > (2u64 << 20) + (800 << 10) && kib <= 3 << 20,
        "df of the 3 GiB template: {kib} KiB: {}",
        b.output
    );
    let small = boots_with(&raw, "df -k /", "/");
    assert!(df_root_kib(&small.output) < 1 << 20, "{}", small.output);
}

#[test]
fn a_map_only_template_boots_from_the_registry_and_a_tampered_pack_fails_in_the_guest() {
    let reg = Registry::start();
    let a = Env::new();
    python_template(&a, "py", "2GiB");
    let r = format!("docker://{}/vm/py:1", reg.addr);
    let pushed = a.json(&["rootfs", "push", "py", &r, "--plain-http"]);
    // the 2 GiB template: its map, its index and its packs, at most 10 blobs
    let (m, _) = artifact(&reg, "vm/py", "1");
    let blobs = 1 + m["layers"].as_array().unwrap().len();
    assert!(blobs <= 10, "{blobs} blobs: {pushed}");
    assert_eq!(blobs as u64, 2 + pushed["packs"].as_u64().unwrap());
    let index = index_entries(&reg, "vm/py", "1");

    let proxy = Proxy::start(&reg.addr, Faults::default());
    let b = Env::new();
    let via = format!("docker://{}/vm/py:1", proxy.addr);
    b.ok(&["rootfs", "pull", &via, "--plain-http", "--name", "py"]);
    let seen = proxy.requests().len();
    let served = Served::new(&b, "py", "py.img", &[]);
    boots_with(&served.file, PYTHON, PYTHON_SAYS);
    let st = served.state();
    let runs = range_chunks(&proxy, seen, &index);
    let got: Vec<String> = runs.concat();
    let distinct: std::collections::BTreeSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), got.len(), "a chunk was fetched twice");
    assert_eq!(
        st["chunks_fetched"].as_u64(),
        Some(got.len() as u64),
        "{st}"
    );
    let (fetched, total) = (
        st["bytes_fetched"].as_u64().unwrap(),
        st["bytes_total"].as_u64().unwrap(),
    );
    assert!(
        fetched > 0 && fetched * 2 < total,
        "booting to python fetched {fetched} of {total} bytes"
    );
    assert_eq!(st["errors"], 0, "{st}");

    // a byte of a pack altered in the registry: the guest gets EIO reading
    // the file, strata counts the error, the chunk is not stored
    let raw = a.path("py.raw");
    a.ok(&["rootfs", "export", "py", raw.to_str().unwrap()]);
    let victim = "/usr/lib/python3.11/pydoc_data/topics.py";
    let id = a.json(&["rootfs", "inspect", "py"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let chunk_of = map_chunks(&a, &id);
    let d = data_chunks(&raw, &[victim.to_string()])
        .into_iter()
        .filter_map(|c| chunk_of.get(&c).cloned())
        .find(|d| !distinct.contains(d))
        .expect("a chunk of the victim not fetched yet");
    tamper_chunk_in_pack(&reg, &index, &d, 10);
    let bad = boot(
        &served.file,
        &format!("cat {victim} > /dev/null && echo read-it"),
        false,
    );
    assert!(
        bad.rc != 0 && !bad.output.contains("read-it") && bad.output.contains("Input/output error"),
        "{}",
        bad.json
    );
    let st = served.state();
    assert!(st["errors"].as_u64().unwrap() > 0, "{st}");
    assert!(!object_exists(&b, &d), "the tampered chunk was stored");
    drop(served);
    b.fsck_ok();
}

#[test]
fn a_running_vms_disk_becomes_a_child_template_that_boots_and_pushes_as_one_pack() {
    let reg = Registry::start();
    let env = Env::new();
    python_template(&env, "py", "1GiB");
    let r1 = format!("docker://{}/vm/py:1", reg.addr);
    let parent = env.json(&["rootfs", "push", "py", &r1, "--plain-http"]);

    let served = Served::new(&env, "py", "sandbox.img", &["--writable"]);
    let w = boot(
        &served.file,
        "mkdir -p /opt/app && echo 'print(\"from the sandbox\")' > /opt/app/hello.py \
         && echo sandbox=1 >> /etc/environment && echo wrote",
        true,
    );
    assert!(w.rc == 0 && w.output.contains("wrote"), "{}", w.json);
    let st = served.state();
    assert!(st["dirty_chunks"].as_u64().unwrap() > 0, "{st}");
    let c = env.json(&["rootfs", "commit", served.path(), "--name", "child"]);
    assert_eq!(
        c["parent"],
        env.json(&["rootfs", "inspect", "py"])["id"],
        "{c}"
    );
    drop(served);

    let child = Served::new(&env, "child", "child.img", &[]);
    let b = boots_with(
        &child.file,
        "python3 /opt/app/hello.py && tail -1 /etc/environment",
        "from the sandbox",
    );
    assert!(b.output.contains("sandbox=1"), "{}", b.json);
    drop(child);
    let parent_raw = env.path("py.raw");
    env.ok(&["rootfs", "export", "py", parent_raw.to_str().unwrap()]);
    let p = boot(
        &parent_raw,
        "test -e /opt/app/hello.py || echo parent-unchanged",
        false,
    );
    assert!(p.output.contains("parent-unchanged"), "{}", p.json);

    // the child's push: the parent's packs listed, one new pack of what
    // the VM wrote
    let r2 = format!("docker://{}/vm/py:child", reg.addr);
    let pushed = env.json(&["rootfs", "push", "child", &r2, "--plain-http"]);
    assert_eq!(pushed["packs_uploaded"], 1, "{pushed}");
    assert_eq!(pushed["packs_reused"], parent["packs"], "{pushed}");
    assert_eq!(
        pushed["uploaded"].as_u64(),
        c["new_chunks"].as_u64(),
        "the new pack holds the chunks the parent lacks: {pushed} {c}"
    );
    env.fsck_ok();
}
