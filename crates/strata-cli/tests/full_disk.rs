//! A full disk under the store (issue 15): a partial pull, a lazy read, a
//! writable template serve and a conversion each fail with the disk named
//! ("No space left on device", EIO/ENOSPC for readers and writers) within
//! a bounded time, leave a store `strata fsck` passes, keep serving, and
//! succeed once space is back. The store lives on a small loop-mounted
//! ext4 that a preallocated filler file makes full. Run as root.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A small ext4 on a sparse file, mounted as the env's store root.
struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    fn new(env: &Env, mib: u64) -> SmallDisk {
        require_tool("mkfs.ext4", "e2fsprogs");
        let img = env.path("disk.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        // no reserved blocks: root would write into them
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(&img));
        let dir = env.root();
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "loop"])
            .arg(&img)
            .arg(&dir));
        std::fs::remove_dir(dir.join("lost+found")).unwrap();
        SmallDisk { dir }
    }

    fn avail(&self) -> u64 {
        let out = run(Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.dir));
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Take all free space but about `keep` bytes (0: every block).
    fn fill(&self, keep: u64) {
        let filler = self.dir.join("filler");
        // what df calls available is a little more than one file can take
        let mut n = self.avail().saturating_sub(keep);
        for _ in 0..40 {
            let ok = Command::new("fallocate")
                .args(["-l", &n.to_string()])
                .arg(&filler)
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success();
            if ok {
                break;
            }
            n = n.saturating_sub((n / 64).max(256 << 10));
        }
        if keep == 0 {
            // the last blocks, one write at a time until the disk refuses
            let _ = Command::new("dd")
                .args(["if=/dev/zero", "bs=4096", "oflag=append", "conv=notrunc"])
                .arg(format!("of={}", filler.display()))
                .stderr(Stdio::null())
                .status();
        }
        let left = self.avail();
        assert!(left <= keep + (8 << 20), "{left} bytes left");
    }

    fn unfill(&self) {
        std::fs::remove_file(self.dir.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn says_disk_full(stderr: &str) -> bool {
    stderr.contains("No space left on device") || stderr.contains("os error 28")
}

fn images(env: &Env) -> String {
    env.json(&["images"]).to_string()
}

#[test]
fn a_partial_pull_onto_a_full_disk_fails_naming_it_and_leaves_a_clean_store() {
    // an updated debian base (a few files changed or added) as
    // zstd:chunked in a registry; the store holds the old base, so the
    // pull is partial: it fetches only the new files
    let maker = Env::new();
    let out_dir = maker.path("out");
    maker.ok(&[
        "convert",
        &oci_ref(&apps_layout(), "base-updated"),
        &format!("oci:{}:upd", out_dir.display()),
    ]);
    let reg = Registry::start();
    reg.push(
        &format!("oci:{}:upd", out_dir.display()),
        "upd:1",
        &["--preserve-digests"],
    );
    let r = format!("docker://{}/upd:1", reg.addr);
    let env = Env::new();
    let disk = SmallDisk::new(&env, 768);
    env.ok(&["pull", "-q", &oci_ref(&debian_layout(), "base")]);
    disk.fill(0);

    let t = Instant::now();
    let out = env.run(&["pull", "--plain-http", &r]);
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pulled onto a full disk: {stderr}");
    assert!(says_disk_full(&stderr), "{stderr}");
    assert!(took < Duration::from_secs(60), "took {took:?}: {stderr}");
    eprintln!("full disk: the partial pull failed after {took:?}");
    // fsck, listings and gc work on the full disk
    env.fsck_ok();
    assert!(!images(&env).contains("upd:1"), "{}", images(&env));
    env.ok(&["gc"]);

    disk.unfill();
    let v = env.json(&["pull", "--plain-http", &r]);
    assert_eq!(v["layers_partial"], 1, "the pull is partial: {v}");
    env.fsck_ok();
    env.ok(&["verify", &r]);
}

#[test]
fn lazy_reads_on_a_full_disk_fail_with_eio_in_bounded_time_and_work_once_space_is_back() {
    let reg = Registry::start();
    let r = chunked_python(&reg, "py:1");
    let env = Env::new();
    let disk = SmallDisk::new(&env, 768);
    let mount = LazyMount::new(&env, &r, env.path("mnt"));
    let dir = mount.dir.clone();
    disk.fill(0);

    let python = dir.join("usr/bin/python3.11");
    let t = Instant::now();
    let err = std::fs::read(&python).expect_err("nowhere to put what it fetched");
    let took = t.elapsed();
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(took < Duration::from_secs(35), "EIO after {took:?}");
    eprintln!("full disk: the lazy read got EIO after {took:?}");
    let all = env.json(&["mounts"]);
    let me = all
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["dir"].as_str() == dir.to_str())
        .unwrap_or_else(|| panic!("the mount is gone: {all}"))
        .clone();
    assert!(
        me["inconsistent"].is_null(),
        "a full disk is no inconsistency: {me}"
    );
    let log = std::fs::read_to_string(me["log"].as_str().unwrap()).unwrap_or_default();
    assert!(says_disk_full(&log), "the log names the cause: {log}");

    // the same daemon serves the file once there is room
    disk.unfill();
    assert_eq!(chroot_python(&dir, "print(6 * 7)"), "42");
    drop(mount);
    env.fsck_ok();
}

#[test]
fn writes_to_a_served_template_on_a_full_disk_fail_and_the_rest_commits() {
    require_tool("mke2fs", "e2fsprogs");
    let env = Env::new();
    let disk = SmallDisk::new(&env, 1024);
    let r = oci_ref(&debian_layout(), "python");
    env.ok(&["pull", "-q", &r]);
    env.ok(&[
        "rootfs", "build", "--from", &r, "--size", "512MiB", "--name", "py",
    ]);
    let file = env.path("sandbox.img");
    env.ok(&[
        "rootfs",
        "serve",
        "py",
        file.to_str().unwrap(),
        "--writable",
    ]);
    struct Served<'a>(&'a Env, &'a Path);
    impl Drop for Served<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["umount", self.1.to_str().unwrap()]);
        }
    }
    let served = Served(&env, &file);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let pattern = |seed: u8| -> Vec<u8> { (0..1u32 << 20).map(|i| (i as u8) ^ seed).collect() };
    // a first write lands; then the disk fills
    let at1 = 300u64 << 20;
    f.write_all_at(&pattern(1), at1).unwrap();
    f.sync_all().unwrap();
    disk.fill(0);
    let at2 = 400u64 << 20;
    let t = Instant::now();
    let res = f.write_all_at(&pattern(2), at2).and_then(|()| f.sync_all());
    let err = res.expect_err("a write onto a full disk fails");
    assert!(
        matches!(err.raw_os_error(), Some(28) | Some(5)),
        "ENOSPC or EIO: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    eprintln!(
        "full disk: the served write failed ({err}) after {:?}",
        t.elapsed()
    );
    // the file still reads, the first write included
    let mut back = vec![0u8; 1 << 20];
    f.read_exact_at(&mut back, at1).unwrap();
    assert!(back == pattern(1), "the first write reads back");

    disk.unfill();
    f.write_all_at(&pattern(3), at2).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let c = env.json(&[
        "rootfs",
        "commit",
        file.to_str().unwrap(),
        "--name",
        "child",
    ]);
    assert!(c["written_chunks"].as_u64().unwrap() >= 32, "{c}");
    drop(served);
    let raw = env.path("child.raw");
    env.ok(&["rootfs", "export", "child", raw.to_str().unwrap()]);
    let g = std::fs::File::open(&raw).unwrap();
    g.read_exact_at(&mut back, at1).unwrap();
    assert!(back == pattern(1), "the child holds the first write");
    g.read_exact_at(&mut back, at2).unwrap();
    assert!(
        back == pattern(3),
        "the child holds the write made once space was back"
    );
    env.fsck_ok();
}

#[test]
fn a_conversion_onto_a_full_disk_fails_naming_it_and_leaves_no_usable_half() {
    require_tool("skopeo", "skopeo");
    let env = Env::new();
    let disk = SmallDisk::new(&env, 768);
    let src = oci_ref(&debian_layout(), "python");
    env.ok(&["pull", "-q", &src]);
    disk.fill(1 << 20);
    let out_dir = env.root().join("converted");
    let target = format!("oci:{}:python", out_dir.display());
    let t = Instant::now();
    let out = env.run(&["convert", &src, &target]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "converted onto a full disk: {stderr}"
    );
    assert!(says_disk_full(&stderr), "{stderr}");
    assert!(t.elapsed() < Duration::from_secs(120));
    eprintln!("full disk: the conversion failed after {:?}", t.elapsed());
    env.fsck_ok();
    // nothing half-written is named: the target has no such tag
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw", &target])
        .output()
        .unwrap();
    assert!(
        !inspect.status.success(),
        "a failed conversion left {target} readable"
    );

    disk.unfill();
    env.ok(&["convert", &src, &target]);
    let inspect = Command::new("skopeo")
        .args(["inspect", "--raw", &target])
        .output()
        .unwrap();
    assert!(inspect.status.success());
    env.fsck_ok();
}
