//! `strata mount --lazy`: the Debian+python image converted to zstd:chunked
//! and served from a real registry starts before it has arrived, reads
//! the right bytes under concurrency, fails reads with EIO in bounded time
//! when the registry is gone or lies, and leaves a store fsck accepts.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The converted image in a fresh registry; returns the reference.
fn converted_in_registry() -> (Registry, String) {
    let reg = Registry::start();
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", &src]);
    let out = conv.path("out");
    conv.ok(&["convert", &src, &format!("oci:{}:python", out.display())]);
    reg.push(
        &format!("oci:{}:python", out.display()),
        "py:1",
        &["--preserve-digests"],
    );
    let r = format!("docker://{}/py:1", reg.addr);
    (reg, r)
}

/// The tree the image should show, as umoci unpacks the original.
fn reference_tree(env: &Env) -> PathBuf {
    umoci_unpack(&debian_layout(), "python", &env.path("umoci"))
}

/// A lazy mount that is unmounted when dropped, whatever the test did.
struct Mounted<'a> {
    env: &'a Env,
    dir: PathBuf,
}

impl<'a> Mounted<'a> {
    fn new(env: &'a Env, r: &str, extra: &[&str]) -> (Mounted<'a>, serde_json::Value) {
        let dir = env.path("mnt");
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec!["mount", "--lazy", "--plain-http"];
        args.extend_from_slice(extra);
        args.push(r);
        args.push(dir.to_str().unwrap());
        let v = env.json(&args);
        (Mounted { env, dir }, v)
    }

    fn state(&self) -> serde_json::Value {
        let all = self.env.json(&["mounts"]);
        all.as_array()
            .unwrap()
            .iter()
            .find(|m| m["dir"].as_str() == self.dir.to_str())
            .cloned()
            .unwrap_or_else(|| panic!("{} not in strata mounts: {all}", self.dir.display()))
    }

    fn log(&self) -> String {
        let s = self.state();
        std::fs::read_to_string(s["log"].as_str().unwrap()).unwrap_or_default()
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["umount", self.dir.to_str().unwrap()]);
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn chroot_python(dir: &Path, code: &str) -> std::process::Output {
    Command::new("chroot")
        .arg(dir)
        .args(["/usr/bin/python3", "-c", code])
        .output()
        .unwrap()
}

#[test]
fn python_runs_before_the_image_has_arrived_and_the_tree_is_whole() {
    require_tool("umoci", "umoci");
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    let (m, v) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    assert_eq!(v["mode"], "lazy", "{v}");
    // a small file's read brings its small neighbours of the same
    // directory in the same request (at most 256 KiB of blob); a large
    // file comes alone
    let count = |s: &serde_json::Value| {
        (
            s["files_local"].as_u64().unwrap(),
            s["bytes_fetched"].as_u64().unwrap(),
        )
    };
    // the state file is saved every so often: wait for a change
    let settled = |before: (u64, u64)| {
        let t0 = Instant::now();
        loop {
            let now = count(&m.state());
            if now != before || t0.elapsed() > Duration::from_secs(10) {
                // and one more save, in case it caught a request half done
                std::thread::sleep(Duration::from_millis(1500));
                return count(&m.state());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let s0 = count(&m.state());
    let abc = std::fs::read(m.dir.join("usr/lib/python3.11/abc.py")).unwrap();
    assert!(String::from_utf8_lossy(&abc).contains("class ABCMeta"));
    let s1 = settled(s0);
    assert!(s1.0 > s0.0 + 1, "no neighbours came: {s0:?} -> {s1:?}");
    assert!(s1.1 - s0.1 <= 320 << 10, "too much came: {s0:?} -> {s1:?}");
    // a program: its loader and libraries come along, fetched together
    // while the program is read (python3.11: ld.so, ld.so.cache, libm,
    // libz, libexpat, libc), with what its first calls read (C.UTF-8's
    // LC_CTYPE, the gconv cache, /etc/localtime) and, for CPython, the
    // first module it imports (encodings) and that module's imports;
    // nothing else does
    let bin = std::fs::read(m.dir.join("usr/bin/python3.11")).unwrap();
    assert!(bin.len() > 1 << 20);
    let s2 = settled(s1);
    let st = m.state();
    let libs = st["files_for_programs"].as_u64().unwrap();
    assert!(libs >= 5, "python's libraries did not come: {st}");
    assert_eq!(
        s2.0,
        s1.0 + 1 + libs,
        "a large file comes alone but for what it loads: {s1:?} -> {s2:?}, {st}"
    );
    for f in [
        "usr/lib/x86_64-linux-gnu/libc.so.6",
        "usr/lib/locale/C.utf8/LC_CTYPE",
        "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
        "usr/lib/python3.11/encodings/__pycache__/__init__.cpython-311.pyc",
        "usr/lib/python3.11/encodings/__pycache__/aliases.cpython-311.pyc",
        "usr/lib/python3.11/encodings/__pycache__/utf_8.cpython-311.pyc",
    ] {
        let bytes = std::fs::read(m.dir.join(f)).unwrap();
        assert!(!bytes.is_empty(), "{f}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        count(&m.state()),
        s2,
        "libc, the locale, the gconv cache and python's first modules were fetched with python, not when opened"
    );
    let out = chroot_python(&m.dir, "import json; print(1)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = m.state();
    assert_eq!(s["status"], "serving", "{s}");
    let (local, total) = (
        s["files_local"].as_u64().unwrap(),
        s["files_total"].as_u64().unwrap(),
    );
    assert!(
        local * 10 < total,
        "most of the image must still be missing: {local}/{total}"
    );
    let (fetched, image) = (
        s["bytes_fetched"].as_u64().unwrap(),
        s["image_bytes"].as_u64().unwrap(),
    );
    assert!(
        fetched * 100 < image * 15,
        "python started with {fetched} of {image} bytes fetched"
    );
    // nothing recorded as pulled yet
    let e = env.fails(&["inspect", &r]);
    assert!(e.contains("not found"), "{e}");

    // paths, modes, owners, xattrs and bytes equal umoci's unpack (a few
    // directories read lazily here; the whole tree in the prefetch test)
    let want = reference_tree(&env);
    for sub in ["etc", "usr/lib/python3.11/json", "usr/bin"] {
        let diffs = compare_trees(&m.dir.join(sub), &want.join(sub), Compare::ALL);
        assert!(
            diffs.is_empty(),
            "lazy mount differs in {sub}:\n{}",
            diffs.join("\n")
        );
    }
    std::thread::sleep(Duration::from_millis(700));
    let s = m.state();
    assert_eq!(s["errors"], 0, "{s}");
    assert!(
        s["files_local"].as_u64().unwrap() > local,
        "files read are stored: {s}"
    );
    drop(m);
    let all = env.json(&["mounts"]);
    assert_eq!(all.as_array().unwrap().len(), 0, "umount forgets it: {all}");
    env.fsck_ok();
}

#[test]
fn prefetch_records_the_image_and_later_mounts_use_composefs() {
    require_tool("umoci", "umoci");
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    let (m, _) = Mounted::new(&env, &r, &[]);
    // python's files are opened while they arrive: overlayfs binds them to
    // the FUSE data layer (the rest will be read from objects/)
    let out = chroot_python(&m.dir, "import json; print(0)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = m.state();
        if s["complete"] == true && s["files_local"] == s["files_total"] {
            assert_eq!(s["prefetch"], "done", "{s}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish: {s}\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // every file is local: files opened from now on are read from objects/
    // by overlayfs; those bound to the FUSE layer before are opened by the
    // kernel itself ("no open"), read by inode through the page cache
    let wait_switch = Instant::now() + Duration::from_secs(10);
    while !m.log().contains("every file is local") {
        assert!(
            Instant::now() < wait_switch,
            "no switch to no-open:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = chroot_python(&m.dir, "import json, sqlite3; print(1)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let opens_before = m.state()["opens"].as_u64().expect("opens counted");
    // the whole tree, served by the same FUSE mount, equals umoci's unpack
    let want = reference_tree(&env);
    let diffs = compare_trees(&m.dir, &want, Compare::ALL);
    assert!(
        diffs.is_empty(),
        "lazy mount differs:\n{}",
        diffs.join("\n")
    );
    std::thread::sleep(Duration::from_millis(700)); // state is saved every 0.5 s
    let opens_after = m.state()["opens"].as_u64().expect("opens counted");
    assert!(
        opens_after <= opens_before + 1,
        "reading every file still sent opens to the daemon: {opens_before} -> {opens_after}"
    );
    drop(m);
    // the image is pulled: same tree digest as a normal pull of it
    let lazy_tree = env.json(&["inspect", &r])["tree"]["tree_digest"].clone();
    let other = Env::new();
    other.ok(&["pull", "--plain-http", &r]);
    assert_eq!(
        other.json(&["inspect", &r])["tree"]["tree_digest"],
        lazy_tree
    );
    // and a second lazy mount is a composefs mount
    let (m2, v) = Mounted::new(&env, &r, &[]);
    assert_eq!(v["mode"], "composefs", "{v}");
    let out = chroot_python(&m2.dir, "print(2)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    drop(m2);
    env.fsck_ok();
}

#[test]
fn thirty_two_concurrent_readers_get_the_right_bytes() {
    require_tool("umoci", "umoci");
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    let want = reference_tree(&env);
    let (m, _) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    // the biggest files (several chunks each) and many small ones
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    for dir in ["usr/lib/x86_64-linux-gnu", "usr/lib/python3.11", "usr/bin"] {
        for e in std::fs::read_dir(want.join(dir)).unwrap().flatten() {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_file() {
                files.push((
                    md.len(),
                    e.path().strip_prefix(&want).unwrap().to_path_buf(),
                ));
            }
        }
    }
    files.sort();
    files.reverse();
    let big: Vec<PathBuf> = files.iter().take(4).map(|f| f.1.clone()).collect();
    let small: Vec<PathBuf> = files
        .iter()
        .skip(4)
        .take(200)
        .map(|f| f.1.clone())
        .collect();
    std::thread::scope(|s| {
        for t in 0..32 {
            let (m, want, big, small) = (&m, &want, &big, &small);
            s.spawn(move || {
                // everyone reads the big files at different offsets first
                for (i, p) in big.iter().enumerate() {
                    let mut f = std::fs::File::open(m.dir.join(p)).unwrap();
                    let mut got = Vec::new();
                    let len = f.metadata().unwrap().len();
                    let start = (len / 32) * ((t + i as u64) % 32);
                    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start)).unwrap();
                    f.read_to_end(&mut got).unwrap();
                    let all = std::fs::read(want.join(p)).unwrap();
                    assert!(got == all[start as usize..], "{} from {start}", p.display());
                }
                for p in small.iter().skip(t as usize % 7).step_by(3) {
                    let got = std::fs::read(m.dir.join(p)).unwrap();
                    assert!(
                        got == std::fs::read(want.join(p)).unwrap(),
                        "{}",
                        p.display()
                    );
                }
            });
        }
    });
    let s = m.state();
    assert_eq!(s["errors"], 0, "{s}");
    // gc runs while the mount is served (its daemon holds no lock between
    // commits) and keeps every content the mount fetched
    let gc = env.json(&["gc"]);
    assert_eq!(gc["objects"], 0, "{gc}");
    for p in big.iter().chain(small.iter().take(20)) {
        let got = std::fs::read(m.dir.join(p)).unwrap();
        assert!(
            got == std::fs::read(want.join(p)).unwrap(),
            "{}",
            p.display()
        );
    }
    drop(m);
    env.ok(&["gc"]);
    env.fsck_ok();
}

#[test]
fn a_stopped_registry_gives_eio_in_bounded_time_and_reads_recover() {
    let (mut reg, r) = converted_in_registry();
    let env = Env::new();
    let (m, _) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    let cached = m.dir.join("usr/bin/python3.11");
    let uncached = m.dir.join("usr/lib/python3.11/json/decoder.py");
    let first = std::fs::read(&cached).unwrap();
    reg.stop();
    assert_eq!(
        std::fs::read(&cached).unwrap(),
        first,
        "cached files keep working"
    );
    let t = Instant::now();
    let e = std::fs::read(&uncached).expect_err("nothing to fetch from");
    let took = t.elapsed();
    assert_eq!(e.raw_os_error(), Some(5), "EIO: {e}");
    assert!(took < Duration::from_secs(30), "EIO after {took:?}");
    let log = m.log();
    assert!(
        log.contains("usr/lib/python3.11/json/decoder.py") && log.contains("layer sha256:"),
        "the log names file and layer:\n{log}"
    );
    reg.restart();
    let back = std::fs::read(&uncached).expect("reads succeed once the registry is back");
    assert!(String::from_utf8_lossy(&back).contains("JSONDecoder"));
    drop(m);
    env.fsck_ok();
}

#[test]
fn a_tampered_blob_reads_eio_and_nothing_is_stored() {
    let (reg, r) = converted_in_registry();
    let env = Env::new();
    // flip one byte inside the frames of one file in the registry's storage
    let (m, _) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    let victim = "usr/lib/python3.11/json/encoder.py";
    let insp = {
        // find the file's frames through the TOC the registry serves
        let manifest = Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(&r)
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&manifest.stdout).unwrap()
    };
    let top = &insp["layers"].as_array().unwrap()[1];
    let digest = top["digest"].as_str().unwrap();
    let blob_path = reg.blob_path(&digest[7..]);
    let mut blob = std::fs::read(&blob_path).unwrap();
    let (off, end) = toc_file_range(&blob, top, victim);
    blob[((off + end) / 2) as usize] ^= 0x40;
    std::fs::write(&blob_path, &blob).unwrap();

    let err = std::fs::read(m.dir.join(victim)).expect_err("tampered bytes are never served");
    assert_eq!(err.raw_os_error(), Some(5), "{err}");
    assert!(m.log().contains(victim), "{}", m.log());
    // other files of the same layer still read
    let ok = std::fs::read(m.dir.join("usr/lib/python3.11/json/decoder.py")).unwrap();
    assert!(String::from_utf8_lossy(&ok).contains("JSONDecoder"));
    drop(m);
    let e = env.fails(&["pull", "--plain-http", &r]);
    assert!(e.contains("digest") || e.contains("decompress"), "{e}");
    let e = env.fails(&["inspect", &r]);
    assert!(e.contains("not found"), "{e}");
    env.fsck_ok();
}

#[test]
fn images_that_cannot_be_lazy_are_pulled_in_full_and_said_so() {
    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "gz:1", &[]);
    let r = format!("docker://{}/gz:1", reg.addr);
    lazy_refused_then_full(&r, "not zstd:chunked");
}

/// `--lazy=require` refuses naming `reason` and pulls nothing; `--lazy`
/// pulls in full, says why, and the mount runs python.
fn lazy_refused_then_full(r: &str, reason: &str) {
    let env = Env::new();
    let dir = env.path("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.to_str().unwrap();
    let e = env.fails(&["mount", "--lazy=require", "--plain-http", r, d]);
    assert!(e.contains("--lazy=require") && e.contains(reason), "{e}");
    let e = env.fails(&["inspect", r]);
    assert!(e.contains("not found"), "require pulls nothing: {e}");
    let out = env.run(&["mount", "--lazy", "--plain-http", r, d]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not lazy") && stderr.contains(reason),
        "{stderr}"
    );
    let said = chroot_python(&dir, "print(3)");
    assert_eq!(String::from_utf8_lossy(&said.stdout).trim(), "3");
    env.ok(&["umount", d]);
    env.fsck_ok();
}

#[test]
fn a_killed_daemon_leaves_a_stale_mount_that_umount_cleans() {
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    let (m, _) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    // fetched now: an object no image names yet
    let python = std::fs::read(m.dir.join("usr/bin/python3.11")).unwrap();
    let objects = || {
        walk_files(&env.root().join("objects"))
            .into_iter()
            .filter(|p| std::fs::read(p).is_ok_and(|b| b == python))
            .count()
    };
    // the read returned once python was checked; the store gets it in the
    // background, at once
    let t0 = std::time::Instant::now();
    while objects() == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = m.state()["pid"].as_u64().unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s = m.state();
    assert!(s["status"].as_str().unwrap().starts_with("stale"), "{s}");
    let e = std::fs::read(m.dir.join("etc/os-release")).expect_err("nobody serves it");
    assert_eq!(e.raw_os_error(), Some(107), "ENOTCONN: {e}");
    // still mounted: gc runs but must not take objects its files read
    // (the mount's lease outlives its daemon while the mount stays)
    assert_eq!(objects(), 1, "python was fetched into objects/");
    let report = env.json(&["gc"]);
    assert_eq!(
        report["objects"], 0,
        "gc took what the mount reads: {report}"
    );
    assert_eq!(objects(), 1, "python's object survives gc");
    env.ok(&["umount", m.dir.to_str().unwrap()]);
    assert_eq!(env.json(&["mounts"]).as_array().unwrap().len(), 0);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(env.root().to_str().unwrap()),
        "the dead FUSE data layer is left mounted:\n{info}"
    );
    env.ok(&["gc"]);
    assert!(
        std::fs::read_dir(&m.dir).unwrap().next().is_none(),
        "the mount is gone"
    );
    env.fsck_ok();
}

#[test]
fn a_recorded_read_list_is_prefetched_next_time() {
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    let list = env.path("list");
    let (m, _) = Mounted::new(
        &env,
        &r,
        &["--prefetch", "none", "--record", list.to_str().unwrap()],
    );
    let out = chroot_python(&m.dir, "import json; print(1)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    drop(m);
    let recorded = std::fs::read_to_string(&list).unwrap();
    assert!(
        recorded.lines().next() == Some("/usr/bin/python3.11"),
        "{recorded}"
    );
    assert!(recorded.contains("/usr/lib/python3.11/json/"), "{recorded}");
    // a fresh store, the list as prefetch: those files arrive without reads
    let env2 = Env::new();
    let (m2, _) = Mounted::new(
        &env2,
        &r,
        &[
            "--prefetch",
            "list",
            "--prefetch-list",
            list.to_str().unwrap(),
        ],
    );
    let want = recorded.lines().count() as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = m2.state();
        if s["prefetch"] == "done" {
            assert!(s["files_local"].as_u64().unwrap() >= want * 9 / 10, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // what the runtime reads before the program (the user lookup) came
    // beside the list, which python's reads do not name
    for f in ["/etc/passwd", "/etc/group"] {
        assert!(!recorded.lines().any(|l| l == f), "{f} in {recorded}");
    }
    let fetched = |m: &Mounted| m.state()["bytes_fetched"].as_u64().unwrap();
    let mut before = fetched(&m2);
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(200));
        let now = fetched(&m2);
        if now == before {
            break;
        }
        before = now;
    }
    for f in ["etc/passwd", "etc/group"] {
        let text = std::fs::read_to_string(m2.dir.join(f)).unwrap();
        assert!(text.starts_with("root:"), "{f}: {text}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        fetched(&m2),
        before,
        "/etc/passwd and /etc/group were fetched when read, not with the list"
    );
    drop(m2);
    env2.fsck_ok();

    // the list travels in the image: convert --prefetch-list puts it in a
    // manifest annotation; with --keep-order the layers (and config) stay
    // the same
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", &src]);
    let out = conv.path("out");
    conv.ok(&[
        "convert",
        &src,
        &format!("oci:{}:python", out.display()),
        "--prefetch-list",
        list.to_str().unwrap(),
        "--keep-order",
    ]);
    let m = layout_manifest(&out, "python");
    assert_eq!(
        m["config"]["digest"],
        layout_manifest(&debian_layout(), "python")["config"]["digest"]
    );
    let ann = m["annotations"]["dev.strata.lazy.prefetch"]
        .as_str()
        .unwrap();
    assert!(ann.lines().any(|l| l == "/usr/bin/python3.11"), "{ann}");
    let addr = r.trim_start_matches("docker://").split('/').next().unwrap();
    let mut push = Command::new("skopeo");
    push.args([
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ])
    .arg(format!("oci:{}:python", out.display()))
    .arg(format!("docker://{addr}/py:2"));
    strata_testkit::run(&mut push);
    let r2 = format!("docker://{addr}/py:2");
    let env3 = Env::new();
    let (m3, _) = Mounted::new(&env3, &r2, &["--prefetch", "list"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = m3.state();
        if s["prefetch"] == "done" {
            assert!(s["files_local"].as_u64().unwrap() >= want * 9 / 10, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(m3);
    env3.fsck_ok();
}

#[test]
fn lazy_mount_errors_are_clear() {
    let env = Env::new();
    let e = env.fails(&[
        "mount",
        "--lazy",
        "docker://127.0.0.1:1/x:y",
        "/nonexistent-dir",
    ]);
    assert!(e.contains("not an existing directory"), "{e}");
    let dir = env.path("d");
    std::fs::create_dir_all(&dir).unwrap();
    let e = env.fails(&[
        "mount",
        "--lazy",
        "--rw",
        "docker://127.0.0.1:1/x:y",
        dir.to_str().unwrap(),
    ]);
    assert!(e.contains("read-only"), "{e}");
    let t = Instant::now();
    let e = env.fails(&[
        "mount",
        "--lazy",
        "--plain-http",
        "docker://127.0.0.1:1/x:y",
        dir.to_str().unwrap(),
    ]);
    assert!(e.contains("127.0.0.1:1"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(env.json(&["mounts"]).as_array().unwrap().len(), 0);
    env.fsck_ok();
}

#[test]
fn a_registry_without_ranges_means_a_full_pull_and_strata_says_so() {
    let (reg, _) = converted_in_registry();
    let proxy = strata_testkit::proxy::Proxy::start(
        &reg.addr,
        strata_testkit::proxy::Faults {
            ignore_ranges: true,
            ..Default::default()
        },
    );
    let r = format!("docker://{}/py:1", proxy.addr);
    lazy_refused_then_full(&r, "does not serve byte ranges");
}

/// A lazy mount is a composefs mount (overlayfs over the tree's EROFS
/// image) whose data layers are the store's objects, then the daemon's
/// FUSE: files the store has never reach the daemon. Unmounting it with
/// umount(8) instead of `strata umount` still stops the daemon.
#[test]
fn store_files_bypass_the_daemon_and_a_plain_umount_stops_it() {
    require_tool("umoci", "umoci");
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    // the base layer (same diff_id as the converted one) is in the store
    env.ok(&["pull", "-q", &oci_ref(&debian_layout(), "base")]);
    let (m, v) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    assert_eq!(v["mode"], "lazy", "{v}");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == m.dir.to_str())
        .expect("the mount is in mountinfo");
    assert!(
        line.contains(" - overlay strata-lazy:sha256:"),
        "not an overlay mount: {line}"
    );
    let want = reference_tree(&env);
    let opens = |m: &Mounted| {
        std::thread::sleep(Duration::from_millis(700)); // state saved every 0.5 s
        m.state()["opens"].as_u64().expect("opens counted")
    };
    let before = opens(&m);
    // base layer: read from the store by the kernel
    for f in ["usr/bin/ls", "usr/lib/os-release", "usr/bin/bash"] {
        assert_eq!(
            std::fs::read(m.dir.join(f)).unwrap(),
            std::fs::read(want.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(opens(&m), before, "files in the store went to the daemon");
    // python layer: fetched through the daemon
    let py = "usr/lib/python3.11/json/decoder.py";
    assert_eq!(
        std::fs::read(m.dir.join(py)).unwrap(),
        std::fs::read(want.join(py)).unwrap()
    );
    assert!(
        opens(&m) > before,
        "a missing file did not reach the daemon"
    );

    // a container's writable layer: overlayfs over the lazy mount
    let (up, work, top) = (env.path("up"), env.path("work"), env.path("top"));
    for d in [&up, &work, &top] {
        std::fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        m.dir.display(),
        up.display(),
        work.display()
    );
    let out = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "an overlay cannot sit on the lazy mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(top.join("etc/written"), "w").unwrap();
    let f = "usr/lib/python3.11/json/scanner.py";
    let got = std::fs::read(top.join(f));
    let _ = Command::new("umount").arg(&top).status();
    assert_eq!(got.unwrap(), std::fs::read(want.join(f)).unwrap());
    assert_eq!(std::fs::read(up.join("etc/written")).unwrap(), b"w");

    let pid = m.state()["pid"].as_u64().unwrap();
    let st = Command::new("umount").arg(&m.dir).status().unwrap();
    assert!(st.success(), "umount(8) failed");
    // mounted again at once, while the old daemon may still be ending
    let (m2, v) = Mounted::new(&env, &r, &["--prefetch", "none"]);
    assert_eq!(v["mode"], "lazy", "{v}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the daemon still runs after umount(8)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    // the old daemon's exit left the new mount alone
    let f = "usr/lib/python3.11/json/encoder.py";
    assert_eq!(
        std::fs::read(m2.dir.join(f)).unwrap(),
        std::fs::read(want.join(f)).unwrap()
    );
    assert_eq!(m2.state()["status"], "serving");
    drop(m2);
    assert_eq!(env.json(&["mounts"]).as_array().unwrap().len(), 0);
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !info.contains(env.root().to_str().unwrap()),
        "a mount under the store is left:\n{info}"
    );
    drop(m);
    env.fsck_ok();
}

/// Once every file is local, files bound to the FUSE layer earlier are
/// opened by the kernel without the daemon ("no open"). exec (an mmap of
/// a file bound to the FUSE layer) keeps working across that switch, with
/// a passthrough open of the same file held and after it is released (the
/// daemon holds the switch while passthrough opens are held: fuse_file_mmap
/// refuses a file opened without it while its inode has a backing file).
#[test]
fn exec_works_after_the_image_arrived_while_a_passthrough_open_is_held() {
    let (_reg, r) = converted_in_registry();
    let env = Env::new();
    let (m, _) = Mounted::new(&env, &r, &["--prefetch", "none", "--passthrough"]);
    // python's binary is fetched and bound to the FUSE data layer
    let out = chroot_python(&m.dir, "print(1)");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    // now local (and python's open released): a second open of it is a
    // passthrough open, held
    std::thread::sleep(Duration::from_millis(500));
    let bin = m.dir.join("usr/bin/python3.11");
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg("import sys, time; f = open(sys.argv[1], 'rb'); print('open', flush=True); time.sleep(300)")
        .arg(&bin)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "open");
    // every other file arrives (a pull into the same store)
    env.ok(&["pull", "-q", "--plain-http", &r]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !m.log().contains("every file is local") {
        assert!(Instant::now() < deadline, "never all local:\n{}", m.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // exec maps the held binary's inode
    let out = chroot_python(&m.dir, "print(2)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "exec with a passthrough open held: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = holder.kill();
    let _ = holder.wait();
    std::thread::sleep(Duration::from_millis(200));
    // and after it is released (the kernel may stop sending opens now)
    for code in ["print(3)", "print(4)"] {
        let out = chroot_python(&m.dir, code);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            &code[6..7],
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    drop(m);
    env.fsck_ok();
}

/// Drop the manifest annotation that carries the prefetch list from the
/// layout's `tag` (a new manifest blob, the index pointing at it).
fn drop_prefetch_annotation(layout: &Path, tag: &str) {
    let mut m = layout_manifest(layout, tag);
    m.as_object_mut().unwrap().remove("annotations");
    let bytes = serde_json::to_vec(&m).unwrap();
    let mut h = strata_digest::Hasher::new();
    std::io::Write::write_all(&mut h, &bytes).unwrap();
    let digest = h.finish();
    std::fs::write(blob_path(layout, &digest.to_string()), &bytes).unwrap();
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    for d in index["manifests"].as_array_mut().unwrap() {
        if d["annotations"]["org.opencontainers.image.ref.name"] == tag {
            d["digest"] = digest.to_string().into();
            d["size"] = bytes.len().into();
        }
    }
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
}

#[test]
fn files_placed_first_arrive_in_one_plain_range_per_layer() {
    let reg = Registry::start();
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", &src]);
    let listed = [
        "usr/bin/python3.11",
        "usr/lib/python3.11/os.py",
        "usr/lib/python3.11/json/__init__.py",
        "usr/lib/python3.11/json/decoder.py",
        "usr/lib/python3.11/encodings/__init__.py",
    ];
    let list = conv.path("list");
    std::fs::write(
        &list,
        listed.iter().map(|p| format!("/{p}\n")).collect::<String>(),
    )
    .unwrap();
    let out = conv.path("out");
    conv.ok(&[
        "convert",
        &src,
        &format!("oci:{}:python", out.display()),
        "--prefetch-list",
        list.to_str().unwrap(),
    ]);
    // only the mark in the layer tells a lazy mount what leads
    drop_prefetch_annotation(&out, "python");
    let m = layout_manifest(&out, "python");
    assert!(m["annotations"].is_null(), "{m}");
    let layers = m["layers"].as_array().unwrap();
    // the base layer holds no listed file: unchanged, unmarked
    let original = layout_manifest(&debian_layout(), "python");
    let config = |layout: &Path, m: &serde_json::Value| -> serde_json::Value {
        let d = m["config"]["digest"].as_str().unwrap();
        serde_json::from_slice(&std::fs::read(blob_path(layout, d)).unwrap()).unwrap()
    };
    let (c0, c1) = (config(&debian_layout(), &original), config(&out, &m));
    assert_eq!(c0["rootfs"]["diff_ids"][0], c1["rootfs"]["diff_ids"][0]);
    assert_ne!(c0["rootfs"]["diff_ids"][1], c1["rootfs"]["diff_ids"][1]);
    assert!(layers[0]["annotations"]["dev.strata.lazy.first-end"].is_null());
    let mark: u64 = layers[1]["annotations"]["dev.strata.lazy.first-end"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let blob = layers[1]["digest"].as_str().unwrap().to_string();

    reg.push(
        &format!("oci:{}:python", out.display()),
        "placed:1",
        &["--preserve-digests"],
    );
    let proxy = strata_testkit::proxy::Proxy::start(&reg.addr, Default::default());
    let r = format!("docker://{}/placed:1", proxy.addr);
    let env = Env::new();
    let (mnt, _) = Mounted::new(&env, &r, &["--prefetch", "list"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = mnt.state();
        assert_ne!(
            s["prefetch"],
            "failed",
            "{s}\n{}",
            std::fs::read_to_string(s["log"].as_str().unwrap_or("")).unwrap_or_default()
        );
        if s["prefetch"] == "done" {
            // the list's files, and beside them what the runtime reads
            // before the program (/etc/passwd, /etc/group, in the base)
            assert_eq!(
                s["files_local"].as_u64().unwrap(),
                listed.len() as u64 + 2,
                "{s}\n{}",
                std::fs::read_to_string(s["log"].as_str().unwrap_or("")).unwrap_or_default()
            );
            break;
        }
        assert!(Instant::now() < deadline, "{s}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // what came from before the mark came in one single-range request
    let early: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|l| l.contains(&blob))
        .filter(|l| {
            l.split("range=bytes=")
                .nth(1)
                .and_then(|r| r.split('-').next())
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|start| start < mark)
        })
        .collect();
    assert_eq!(early.len(), 1, "{early:?}");
    assert!(!early[0].contains(','), "{early:?}");
    // and the files are right: python runs from them
    let out = chroot_python(&mnt.dir, "print(6*7)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(mnt);
    env.fsck_ok();
}

/// Every regular file under `dir`.
fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}
