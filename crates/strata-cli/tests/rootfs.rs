//! VM templates end to end with real e2fsprogs and loop mounts: builds
//! from images hold the image's tree and run python; builds are cached by
//! their inputs and reproducible; templates grow and shrink keeping every
//! file; derived templates store only changed chunks; bad input and
//! crashes leave nothing half-built. Run as root.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A loop mount undone even when an assertion fails.
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    fn new(raw: &Path, dir: PathBuf, rw: bool) -> LoopMount {
        std::fs::create_dir_all(&dir).unwrap();
        let opts = if rw { "loop,rw" } else { "loop,ro" };
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", opts])
            .arg(raw)
            .arg(&dir));
        LoopMount { dir }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
    }
}

fn python_image(env: &Env) -> String {
    let r = oci_ref(&debian_layout(), "python");
    env.ok(&["pull", "-q", &r]);
    r
}

/// Export a template and check the filesystem with `e2fsck -fn`.
fn export_checked(env: &Env, name: &str) -> PathBuf {
    require_tool("e2fsck", "e2fsprogs");
    let raw = env.path(&format!("{name}.raw"));
    env.ok(&["rootfs", "export", name, raw.to_str().unwrap()]);
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {name}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    raw
}

/// The tree in the template equals `reference` (ext4 adds lost+found and
/// its own root directory times; mke2fs 1.47 `-d` copies mtimes to the
/// second, so nanoseconds are not compared).
fn assert_tree(mnt: &Path, reference: &Path, what: &str) {
    let what_to_compare = Compare {
        nanos: false,
        ..Compare::ALL
    };
    let diffs: Vec<String> = compare_trees(mnt, reference, what_to_compare)
        .into_iter()
        .filter(|l| !l.contains("lost+found"))
        .collect();
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

fn inspect(env: &Env, name: &str) -> serde_json::Value {
    let s = env.ok(&["rootfs", "inspect", name]);
    serde_json::from_str(&s).unwrap()
}

#[test]
fn a_build_from_the_python_image_holds_its_tree_runs_python_and_is_reproducible() {
    require_tool("mke2fs", "e2fsprogs");
    let env = Env::new();
    let img = python_image(&env);
    let out = env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--name", "py",
    ]);
    assert!(out.contains("built template py"), "{out}");
    let raw = export_checked(&env, "py");
    assert_eq!(
        std::fs::metadata(&raw).unwrap().len(),
        1 << 30,
        "exact size"
    );
    let reference = env.path("ref");
    env.ok(&["export", &img, reference.to_str().unwrap()]);
    {
        let m = LoopMount::new(&raw, env.path("mnt"), false);
        assert_tree(&m.dir, &reference, "template tree vs strata export");
        let out = Command::new("chroot")
            .arg(&m.dir)
            .args(["python3", "-c", "print(42)"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "42",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // the same inputs: the cache answers at once, and says so
    let id = inspect(&env, "py")["id"].as_str().unwrap().to_string();
    let again = env.json(&["rootfs", "build", "--from", &img, "--size", "1GiB"]);
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(again["id"], id.as_str());
    let text = env.ok(&["rootfs", "build", "--from", &img, "--size", "1GiB"]);
    assert!(text.contains("was cached"), "{text}");
    // rebuilt without the cache, in another store: the same bytes
    let other = Env::new();
    python_image(&other);
    let fresh = other.json(&[
        "rootfs",
        "build",
        "--from",
        &img,
        "--size",
        "1GiB",
        "--no-cache",
    ]);
    assert_eq!(fresh["cached"], false);
    assert_eq!(fresh["id"], id.as_str(), "same inputs, same bytes");
    // another size is another template
    let bigger = env.json(&["rootfs", "build", "--from", &img, "--size", "1040MiB"]);
    assert_ne!(bigger["id"], id.as_str());
    env.fsck_ok();
}

#[test]
fn synthetic_trees_keep_owners_modes_xattrs_hardlinks_devices_and_symlinks() {
    require_tool("mke2fs", "e2fsprogs");
    let env = Env::new();
    let layout = synth_layout();
    for tag in ["mixed", "gnu"] {
        let r = oci_ref(&layout, tag);
        env.ok(&["pull", "-q", &r]);
        env.ok(&[
            "rootfs", "build", "--from", &r, "--size", "64MiB", "--name", tag,
        ]);
        let raw = export_checked(&env, tag);
        let reference = env.path(&format!("ref-{tag}"));
        env.ok(&["export", &r, reference.to_str().unwrap()]);
        let m = LoopMount::new(&raw, env.path(&format!("mnt-{tag}")), false);
        assert_tree(&m.dir, &reference, &format!("synthetic {tag}"));
    }
}

#[test]
fn templates_grow_and_shrink_keeping_every_file_and_adds_replace_stale_files() {
    require_tool("resize2fs", "e2fsprogs");
    let env = Env::new();
    let img = python_image(&env);
    let reference = env.path("ref");
    env.ok(&["export", &img, reference.to_str().unwrap()]);
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--name", "t1",
    ]);
    env.ok(&[
        "rootfs",
        "build",
        "--from-template",
        "t1",
        "--size",
        "4GiB",
        "--name",
        "t4",
    ]);
    env.ok(&[
        "rootfs",
        "build",
        "--from-template",
        "t4",
        "--size",
        "512MiB",
        "--name",
        "t05",
    ]);
    for (name, size) in [("t4", 4u64 << 30), ("t05", 512 << 20)] {
        let raw = export_checked(&env, name);
        assert_eq!(std::fs::metadata(&raw).unwrap().len(), size);
        let m = LoopMount::new(&raw, env.path(&format!("mnt-{name}")), false);
        assert_tree(&m.dir, &reference, name);
        // the filesystem really has the new size
        let st = rustix::fs::statvfs(&m.dir).unwrap();
        let fs_bytes = st.f_blocks * st.f_frsize;
        assert!(
            fs_bytes > size * 9 / 10 && fs_bytes <= size,
            "{name}: filesystem of {fs_bytes} bytes in a {size}-byte image"
        );
    }
    let v = inspect(&env, "t05");
    assert_eq!(v["generation"], 2);
    assert_eq!(v["parent"], inspect(&env, "t4")["id"]);
    // too small: the error names the minimum
    let err = env.fails(&[
        "rootfs",
        "build",
        "--from-template",
        "t1",
        "--size",
        "64MiB",
    ]);
    assert!(err.contains("needs at least"), "{err}");
    let min_line = err.split("needs at least").nth(1).unwrap().to_string();
    assert!(min_line.contains("MiB"), "{err}");
    // a build from the image that cannot fit says the same
    let err = env.fails(&["rootfs", "build", "--from", &img, "--size", "32MiB"]);
    assert!(
        err.contains("do not fit in 32.0 MiB") && err.contains("needs at least"),
        "{err}"
    );

    // provisioning: a later --add replaces what an earlier one put there
    let a1 = env.path("add1");
    std::fs::create_dir_all(a1.join("opt/agent")).unwrap();
    std::fs::write(a1.join("opt/agent/agent.conf"), "version=1\n").unwrap();
    std::fs::write(a1.join("opt/agent/old-only"), "stale\n").unwrap();
    let a2 = env.path("add2");
    std::fs::create_dir_all(a2.join("opt/agent")).unwrap();
    std::fs::write(a2.join("opt/agent/agent.conf"), "version=2\n").unwrap();
    std::fs::write(a2.join("etc-motd"), "hi\n").unwrap();
    // an --add tree's own root (often a private temp dir) does not set the
    // template's root directory
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&a2, std::fs::Permissions::from_mode(0o700)).unwrap();
    let (a1s, a2s) = (a1.to_str().unwrap(), a2.to_str().unwrap());
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--add", a1s, "--name", "v1",
    ]);
    env.ok(&[
        "rootfs",
        "build",
        "--from-template",
        "v1",
        "--add",
        a2s,
        "--name",
        "v2",
    ]);
    // both adds at once from the image: the last one wins
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--add", a1s, "--add", a2s, "--name",
        "both",
    ]);
    for name in ["v2", "both"] {
        let raw = export_checked(&env, name);
        let m = LoopMount::new(&raw, env.path(&format!("mnt-{name}")), false);
        let conf = std::fs::read_to_string(m.dir.join("opt/agent/agent.conf")).unwrap();
        assert_eq!(conf, "version=2\n", "{name}");
        assert_eq!(
            std::fs::read_to_string(m.dir.join("etc-motd")).unwrap(),
            "hi\n"
        );
        assert!(
            m.dir.join("opt/agent/old-only").exists(),
            "{name}: adds lay over"
        );
        assert!(
            m.dir.join("usr/bin/python3").exists(),
            "{name}: the image stays"
        );
        use std::os::unix::fs::MetadataExt;
        let root_mode = std::fs::metadata(&m.dir).unwrap().mode() & 0o7777;
        assert_eq!(root_mode, 0o755, "{name}: root directory mode");
    }
    // changing an --add tree changes the build key: no stale cache hit
    std::fs::write(a2.join("opt/agent/agent.conf"), "version=3\n").unwrap();
    let v3 = env.json(&["rootfs", "build", "--from-template", "v1", "--add", a2s]);
    assert_eq!(v3["cached"], false, "{v3}");
    env.fsck_ok();
}

/// 4 KiB blocks that differ between two raw images of the same size.
fn changed_blocks(a: &Path, b: &Path) -> Vec<u64> {
    let mut fa = std::fs::File::open(a).unwrap();
    let mut fb = std::fs::File::open(b).unwrap();
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut out = Vec::new();
    let mut off = 0u64;
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            break;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        for (k, (x, y)) in ba[..n].chunks(4096).zip(bb[..n].chunks(4096)).enumerate() {
            if x != y {
                out.push(off / 4096 + k as u64);
            }
        }
        off += n as u64;
    }
    out
}

#[test]
fn a_derived_template_stores_at_most_the_changed_blocks() {
    let env = Env::new();
    let img = python_image(&env);
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--name", "base",
    ]);
    let add = env.path("add");
    std::fs::create_dir_all(add.join("srv")).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(add.join("srv/data.bin"), &payload).unwrap();
    let built = env.json(&[
        "rootfs",
        "build",
        "--from-template",
        "base",
        "--add",
        add.to_str().unwrap(),
        "--name",
        "child",
    ]);
    let parent = export_checked(&env, "base");
    let child = export_checked(&env, "child");
    // the same check `cmp -l` does, per 4 KiB block
    let blocks = changed_blocks(&parent, &child);
    assert!(!blocks.is_empty(), "the add changed nothing?");
    let mut chunks: Vec<u64> = blocks.iter().map(|b| b / 16).collect();
    chunks.dedup();
    let new = inspect(&env, "child")["chunks_new_vs_parent"]
        .as_u64()
        .unwrap();
    let stored = built["stats"]["new_chunks"].as_u64().unwrap();
    assert!(new >= 1, "a changed image stores something");
    assert!(
        new <= chunks.len() as u64 && stored <= chunks.len() as u64,
        "{new} new chunks ({stored} written) but only {} chunks hold the {} changed blocks",
        chunks.len(),
        blocks.len()
    );
    assert!(
        stored * 65536 <= blocks.len() as u64 * 4096 * 16,
        "stored bytes are bounded by the changed blocks' chunks"
    );
    let m = LoopMount::new(&child, env.path("mnt"), false);
    assert_eq!(std::fs::read(m.dir.join("srv/data.bin")).unwrap(), payload);
}

#[test]
fn bad_input_is_refused_clearly_and_leaves_nothing() {
    let env = Env::new();
    let img = python_image(&env);
    let err = env.fails(&["rootfs", "build", "--from", &img, "--size", "1000001"]);
    assert!(err.contains("whole number of 4096-byte blocks"), "{err}");
    let err = env.fails(&["rootfs", "build", "--from", &img, "--size", "2XB"]);
    assert!(err.contains("unknown unit"), "{err}");
    let err = env.fails(&["rootfs", "build", "--from", &img]);
    assert!(err.contains("--size is required"), "{err}");
    let err = env.fails(&[
        "rootfs",
        "build",
        "--from",
        "no/such:image",
        "--size",
        "1GiB",
    ]);
    assert!(
        err.contains("no/such:image") && err.contains("not found"),
        "{err}"
    );
    let err = env.fails(&[
        "rootfs",
        "build",
        "--from-template",
        "nope",
        "--size",
        "1GiB",
    ]);
    assert!(err.contains("template \"nope\" not found"), "{err}");
    let missing = env.path("no-such-dir");
    let err = env.fails(&[
        "rootfs",
        "build",
        "--from",
        &img,
        "--size",
        "1GiB",
        "--add",
        missing.to_str().unwrap(),
    ]);
    assert!(
        err.contains("--add") && err.contains("no-such-dir"),
        "{err}"
    );
    let file = env.path("a-file");
    std::fs::write(&file, "x").unwrap();
    let err = env.fails(&[
        "rootfs",
        "build",
        "--from",
        &img,
        "--size",
        "1GiB",
        "--add",
        file.to_str().unwrap(),
    ]);
    assert!(err.contains("not a directory"), "{err}");
    let err = env.fails(&[
        "rootfs",
        "export",
        "nope",
        env.path("x.raw").to_str().unwrap(),
    ]);
    assert!(err.contains("not found"), "{err}");
    let err = env.fails(&["rootfs", "rm", "nope"]);
    assert!(err.contains("no template named"), "{err}");
    assert_eq!(env.json(&["rootfs", "ls"]).as_array().unwrap().len(), 0);
    env.fsck_ok();
}

#[test]
fn a_full_disk_during_a_build_fails_clearly_and_leaves_nothing() {
    require_tool("mkfs.ext4", "e2fsprogs");
    let env = Env::new();
    // the store on a 24 MiB ext4: room for a small image, not for 30 MB
    // of provisioning files
    let disk = env.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&disk));
    let m = LoopMount::new(&disk, env.path("small"), true);
    let root = m.dir.join("store");
    let strata = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--root")
            .arg(&root)
            .args(args)
            .output()
            .unwrap()
    };
    let r = oci_ref(&synth_layout(), "mixed");
    assert!(strata(&["pull", "-q", &r]).status.success());
    // 30 MB that does not compress or dedup: the raw image cannot be written
    let add = env.path("big-add");
    std::fs::create_dir_all(&add).unwrap();
    let mut x = 0x9e3779b97f4a7c15u64;
    let bytes: Vec<u8> = (0..30_000_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(add.join("blob"), bytes).unwrap();
    let out = strata(&[
        "rootfs",
        "build",
        "--from",
        &r,
        "--size",
        "256MiB",
        "--add",
        add.to_str().unwrap(),
        "--name",
        "big",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "30 MB fit in a 24 MiB store?");
    assert!(
        err.contains("No space left on device") || err.contains("space"),
        "the error says the disk is full: {err}"
    );
    let ls = strata(&["--json", "rootfs", "ls"]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout).trim(), "[]");
    let fsck = strata(&["fsck"]);
    assert!(
        fsck.status.success(),
        "{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    // and the staging leftovers are gone once the store is used alone
    assert!(strata(&["images"]).status.success());
    let tmp_bytes: u64 = walk_sizes(&root.join("tmp"));
    assert!(tmp_bytes < 1 << 20, "{tmp_bytes} bytes left in tmp/");
}

fn walk_sizes(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let md = e.metadata().unwrap();
            n += if md.is_dir() {
                walk_sizes(&e.path())
            } else {
                md.len()
            };
        }
    }
    n
}

#[test]
fn a_killed_build_leaves_no_template_and_a_clean_store() {
    let env = Env::new();
    let img = python_image(&env);
    for delay_ms in [100u64, 300, 600, 900] {
        let mut child = env
            .cmd()
            .args([
                "rootfs",
                "build",
                "--from",
                &img,
                "--size",
                "1GiB",
                "--no-cache",
                "--name",
            ])
            .arg(format!("k{delay_ms}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        env.fsck_ok();
        let ls = env.json(&["rootfs", "ls"]);
        let named: Vec<&serde_json::Value> = ls
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| {
                t["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|n| n == &*format!("k{delay_ms}"))
            })
            .collect();
        if status.success() {
            assert_eq!(named.len(), 1, "finished before the kill: named");
        } else {
            // killed: either nothing, or (killed after the map) an unnamed
            // complete template; a name never points at a missing map
            assert!(named.len() <= 1);
        }
    }
    // no detached build mounts or loop devices stay behind
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mi.contains("strata-build:"),
        "a build mount survived:\n{mi}"
    );
    // and a build after the crashes works
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--name", "ok",
    ]);
    export_checked(&env, "ok");
    env.fsck_ok();
}

#[test]
fn gc_frees_unnamed_templates_and_keeps_named_ones() {
    let env = Env::new();
    let img = python_image(&env);
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "1GiB", "--name", "keep",
    ]);
    let add = env.path("add");
    std::fs::create_dir_all(&add).unwrap();
    std::fs::write(add.join("only-here"), vec![7u8; 200_000]).unwrap();
    let loose = env.json(&[
        "rootfs",
        "build",
        "--from-template",
        "keep",
        "--add",
        add.to_str().unwrap(),
    ]);
    let loose_id = loose["id"].as_str().unwrap().to_string();
    assert_eq!(env.json(&["rootfs", "ls"]).as_array().unwrap().len(), 2);
    let gc = env.json(&["gc"]);
    assert_eq!(gc["templates"].as_array().unwrap().len(), 1, "{gc}");
    assert_eq!(gc["templates"][0], loose_id.as_str());
    assert!(
        gc["objects"].as_u64().unwrap() >= 1,
        "its own chunks go: {gc}"
    );
    let ls = env.json(&["rootfs", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    env.fsck_ok();
    export_checked(&env, "keep");
    // the cache entry of the removed template is gone with it
    let again = env.json(&[
        "rootfs",
        "build",
        "--from-template",
        "keep",
        "--add",
        add.to_str().unwrap(),
    ]);
    assert_eq!(again["cached"], false, "{again}");
    env.ok(&["rootfs", "rm", "keep"]);
    env.ok(&["rm", &img]);
    let gc = env.json(&["gc"]);
    assert_eq!(gc["templates"].as_array().unwrap().len(), 2, "{gc}");
    let objects = env.path("store/objects");
    assert_eq!(walk_sizes(&objects), 0, "every chunk and object freed");
    env.fsck_ok();
}
