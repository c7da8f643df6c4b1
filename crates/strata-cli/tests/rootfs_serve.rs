//! `strata rootfs serve` and `commit` end to end with the real kernel: a
//! template served as a FUSE file is loop-mounted and runs python; reads
//! touch only the chunks they need; a writable serve turns a sandbox's
//! writes into a child template; errors, stale daemons and gc. Run as root.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use strata_testkit::proxy::{Faults, Proxy};

/// A loop mount undone even when an assertion fails.
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    fn new(file: &Path, dir: PathBuf, rw: bool) -> LoopMount {
        std::fs::create_dir_all(&dir).unwrap();
        let opts = if rw { "loop,rw" } else { "loop,ro" };
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", opts])
            .arg(file)
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

fn chroot(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("chroot")
        .arg(dir)
        .args(args)
        .output()
        .expect("running chroot")
}

/// Read every file under `dir`; returns their paths relative to `root`.
fn read_tree(root: &Path, dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(read_tree(root, &e.path()));
        } else if t.is_file() {
            std::fs::read(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_owned();
            out.push(format!("/{}", rel.display()));
        }
    }
    out
}

fn drop_caches() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("dropping the page cache");
}

#[test]
fn a_served_template_runs_python_and_reads_only_the_chunks_it_needs() {
    let env = Env::new();
    python_template(&env, "py", "1GiB");
    let inspect = env.json(&["rootfs", "inspect", "py"]);
    let raw = env.path("py.raw");
    env.ok(&["rootfs", "export", "py", raw.to_str().unwrap()]);
    drop_caches();

    let served = Served::new(&env, "py", "py.img", &[]);
    let meta = std::fs::metadata(&served.file).unwrap();
    assert_eq!(meta.len(), 1 << 30, "the served file is the image's size");
    let st = served.state();
    assert_eq!(st["status"], "serving", "{st}");
    assert_eq!(st["chunks_read"], 0, "nothing read before a mount: {st}");
    assert_eq!(st["template"], inspect["id"], "{st}");
    // a read-only serve refuses writers
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&served.file)
        .expect_err("opening a read-only served file for writing");
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected, got {err}");

    let mnt = env.path("mnt");
    let lm = LoopMount::new(&served.file, mnt.clone(), false);
    let out = chroot(&mnt, &["python3", "-c", "print(42)"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "python in the served template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after_python = served.state()["chunks_read"].as_u64().unwrap();
    let total = st["chunks_total"].as_u64().unwrap();
    assert!(
        after_python > 0 && after_python * 5 < total,
        "python read {after_python} of {total} chunks: reads must stay local to what is used"
    );

    // one directory tree: every chunk holding its files' data is read, and
    // not much beyond (metadata and the kernel's readahead)
    let files = read_tree(&mnt, &mnt.join("usr/lib/python3.11/email"));
    assert!(files.len() > 20, "{files:?}");
    let need = data_chunks(&raw, &files);
    let read = served.state()["chunks_read"].as_u64().unwrap() - after_python;
    assert!(
        read <= need.len() as u64 + 64,
        "reading {} files ({} data chunks) read {read} new chunks",
        files.len(),
        need.len()
    );
    assert!(read > 0, "the tree's reads reached the daemon");
    // the bytes are the image's
    let img = std::fs::read(&served.file).unwrap();
    let want = std::fs::read(&raw).unwrap();
    assert!(
        img == want,
        "the served file differs from `strata rootfs export`"
    );
    drop(lm);
    drop(served);
    assert!(env.json(&["mounts"]).as_array().unwrap().is_empty());
    env.fsck_ok();
}

#[test]
fn a_writable_serve_commits_a_child_template_that_runs_what_was_written() {
    let env = Env::new();
    python_template(&env, "py", "1GiB");
    let parent = env.json(&["rootfs", "inspect", "py"]);
    let served = Served::new(&env, "py", "sandbox.img", &["--writable"]);
    let mnt = env.path("mnt");
    {
        let _lm = LoopMount::new(&served.file, mnt.clone(), true);
        std::fs::create_dir_all(mnt.join("opt/app")).unwrap();
        std::fs::write(
            mnt.join("opt/app/hello.py"),
            "import json\nprint(json.dumps({'hello': 'from the child'}))\n",
        )
        .unwrap();
        let mut x = 0x9e3779b97f4a7c15u64;
        let blob: Vec<u8> = (0..3u32 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        std::fs::write(mnt.join("opt/app/data"), &blob).unwrap();
        std::fs::remove_file(mnt.join("usr/bin/pydoc3.11")).unwrap();
    }
    let st = served.state();
    let written = st["dirty_chunks"].as_u64().unwrap();
    assert!(written >= 48, "3 MiB written: {st}");

    let c = env.json(&["rootfs", "commit", served.path(), "--name", "child"]);
    assert_eq!(c["parent"], parent["id"], "{c}");
    assert_eq!(c["written_chunks"].as_u64(), Some(written), "{c}");
    let new = c["new_chunks"].as_u64().unwrap();
    assert!(new <= written && new >= 48, "{c}");
    // no warning at umount: everything written was committed
    let out = env.run(&["umount", served.path()]);
    assert!(out.status.success());
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("dropped"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(served);

    // the child holds the writes, the parent does not
    let child = env.json(&["rootfs", "inspect", "child"]);
    assert_eq!(child["parent"], parent["id"], "{child}");
    assert_eq!(child["generation"], 1, "{child}");
    let served = Served::new(&env, "child", "child.img", &[]);
    {
        let _lm = LoopMount::new(&served.file, mnt.clone(), false);
        let out = chroot(&mnt, &["python3", "/opt/app/hello.py"]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            r#"{"hello": "from the child"}"#,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!mnt.join("usr/bin/pydoc3.11").exists());
        assert_eq!(
            std::fs::metadata(mnt.join("opt/app/data")).unwrap().len(),
            3 << 20
        );
    }
    drop(served);
    let praw = env.path("parent.raw");
    env.ok(&["rootfs", "export", "py", praw.to_str().unwrap()]);
    let _lm = LoopMount::new(&praw, env.path("pmnt"), false);
    assert!(
        !env.path("pmnt/opt/app").exists(),
        "the parent is unchanged"
    );
    assert!(env.path("pmnt/usr/bin/pydoc3.11").exists());
    drop(_lm);
    let craw = env.path("child.raw");
    env.ok(&["rootfs", "export", "child", craw.to_str().unwrap()]);
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(&craw)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck of the child: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    env.fsck_ok();
}

#[test]
fn serve_errors_stale_daemons_and_gc() {
    let env = Env::new();
    // a size of its own: gc keeps every template some mount serves, and
    // the other tests serve the 1 GiB build (same inputs, same id)
    python_template(&env, "py", "768MiB");
    let id = env.json(&["rootfs", "inspect", "py"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let f = env.path("x.img");
    let fs = f.to_str().unwrap();
    let e = env.fails(&["rootfs", "serve", "nosuch", fs]);
    assert!(e.contains("nosuch"), "{e}");
    let d = env.path("adir");
    std::fs::create_dir(&d).unwrap();
    let e = env.fails(&["rootfs", "serve", "py", d.to_str().unwrap()]);
    assert!(e.contains("not a regular file"), "{e}");
    let e = env.fails(&["rootfs", "commit", fs, "--name", "c"]);
    assert!(e.contains("not served"), "{e}");

    // served by id with its name removed: gc runs and keeps it (the
    // daemon's lease) until the umount
    let served = Served::new(&env, &id, "x.img", &[]);
    let e = env.fails(&["rootfs", "serve", "py", fs]);
    assert!(e.contains("already a mount point"), "{e}");
    let e = env.fails(&["rootfs", "commit", fs, "--name", "c"]);
    assert!(e.contains("read-only"), "{e}");
    env.ok(&["rootfs", "rm", "py"]);
    let gc = env.json(&["gc"]);
    assert!(
        gc["templates"].as_array().unwrap().is_empty(),
        "the served template is kept: {gc}"
    );
    assert!(env.ok(&["rootfs", "ls"]).contains(&id[7..19]));

    // kill -9 the daemon: the file is a stale mount that umount cleans
    let pid = served.state()["pid"].as_u64().unwrap();
    run(Command::new("kill").args(["-9", &pid.to_string()]));
    let t = Instant::now();
    loop {
        let all = env.json(&["mounts"]);
        if all[0]["status"].as_str().unwrap_or("").starts_with("stale") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never stale: {all}");
        std::thread::sleep(Duration::from_millis(100));
    }
    env.ok(&["umount", fs]);
    std::mem::forget(served);
    assert!(env.json(&["mounts"]).as_array().unwrap().is_empty());
    // no longer served: gc drops it; fsck is clean
    let gc = env.json(&["gc"]);
    assert_eq!(gc["templates"][0], id.as_str(), "{gc}");
    env.fsck_ok();
}

/// Distinct blob digests the proxy was asked for with GET.
fn blob_gets(proxy: &Proxy) -> BTreeSet<String> {
    proxy
        .requests()
        .iter()
        .filter_map(|r| {
            let path = r.strip_prefix("GET ")?.split(' ').next()?;
            let (_, d) = path.split_once("/blobs/")?;
            Some(d.to_string())
        })
        .collect()
}

#[test]
fn a_pulled_template_is_served_fetching_only_the_chunks_read_and_verifying_them() {
    let reg = Registry::start();
    let a = Env::new();
    python_template(&a, "py", "1GiB");
    let id = a.json(&["rootfs", "inspect", "py"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    let raw = a.path("py.raw");
    a.ok(&["rootfs", "export", "py", raw.to_str().unwrap()]);
    let upstream = format!("docker://{}/tmpl:1", reg.addr);
    a.ok(&["rootfs", "push", "py", &upstream, "--plain-http"]);
    let chunks = map_chunks(&a, &id);

    let index = index_entries(&reg, "tmpl", "1");

    // through a counting proxy: a pull moves the map and the pack index only
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let b = Env::new();
    let r = format!("docker://{}/tmpl:1", proxy.addr);
    b.ok(&["rootfs", "pull", &r, "--plain-http", "--name", "t"]);
    let before = blob_gets(&proxy);
    assert!(
        before.len() <= 2,
        "pull fetched more than the map and the index: {before:?}"
    );
    let seen = proxy.requests().len();

    let served = Served::new(&b, "t", "t.img", &["--plain-http"]);
    let st = served.state();
    let distinct: BTreeSet<&String> = chunks.values().collect();
    assert_eq!(
        st["chunks_missing"].as_u64(),
        Some(distinct.len() as u64),
        "{st}"
    );
    let mnt = b.path("mnt");
    let lm = LoopMount::new(&served.file, mnt.clone(), false);
    let out = chroot(&mnt, &["python3", "-c", "import json; print(1)"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = read_tree(&mnt, &mnt.join("usr/lib/python3.11/email"));
    let st = served.state();
    // the daemon's count is what the registry saw (range requests into the
    // packs, each whole chunks), and every chunk holding the read files'
    // data came from it
    let runs = range_chunks(&proxy, seen, &index);
    let got: BTreeSet<String> = runs.iter().flatten().cloned().collect();
    assert_eq!(
        got.len(),
        runs.iter().map(Vec::len).sum::<usize>(),
        "a chunk was fetched twice"
    );
    assert!(
        runs.iter().any(|r| r.len() > 1),
        "neighbouring chunks are fetched in one request"
    );
    assert_eq!(
        st["chunks_fetched"].as_u64(),
        Some(got.len() as u64),
        "{st}"
    );
    for c in data_chunks(&raw, &files) {
        if let Some(d) = chunks.get(&c) {
            assert!(
                got.contains(d),
                "chunk {c} ({d}) of the read tree was not fetched"
            );
        }
    }
    let (fetched, total) = (
        st["bytes_fetched"].as_u64().unwrap(),
        st["bytes_total"].as_u64().unwrap(),
    );
    assert!(
        fetched * 100 < total * 15,
        "python + one tree fetched {fetched} of {total} bytes"
    );
    assert_eq!(st["errors"], 0, "{st}");

    // read again from cold caches: everything comes from the store now
    drop(lm);
    drop_caches();
    let seen = proxy.requests().len();
    let lm = LoopMount::new(&served.file, mnt.clone(), false);
    read_tree(&mnt, &mnt.join("usr/lib/python3.11/email"));
    let again: Vec<String> = range_chunks(&proxy, seen, &index).concat();
    assert!(
        again.iter().all(|d| !got.contains(d)),
        "re-reading the tree fetched a chunk again"
    );

    // a pack byte altered in the registry: reading a chunk of it fails
    // with EIO, nothing of it is stored
    let victim = "/usr/lib/python3.11/pydoc_data/topics.py";
    let fetched_now: BTreeSet<String> = got.iter().chain(&again).cloned().collect();
    let d = data_chunks(&raw, &[victim.to_string()])
        .iter()
        .map(|c| chunks[c].clone())
        .find(|d| !fetched_now.contains(d))
        .expect("a chunk of the victim not fetched yet");
    tamper_chunk_in_pack(&reg, &index, &d, 100);
    let err = std::fs::read(mnt.join(&victim[1..])).expect_err("reading a tampered chunk");
    assert_eq!(err.raw_os_error(), Some(5), "EIO expected: {err}");
    let st = served.state();
    assert!(st["errors"].as_u64().unwrap() > 0, "{st}");
    assert!(!object_exists(&b, &d), "the tampered chunk was stored");
    // files already read still read
    read_tree(&mnt, &mnt.join("usr/lib/python3.11/email"));
    drop(lm);
    drop(served);
    b.fsck_ok();
}

/// A map-only template is served only once its registry answers: the
/// plain-HTTP choice of the pull is remembered; a record without it, or a
/// registry that is gone, fails `rootfs serve` at once with the registry,
/// the cause and the fix, and nothing is left mounted.
#[test]
fn serve_reaches_the_templates_registry_before_it_reports_ready() {
    let mut reg = Registry::start();
    let a = Env::new();
    sample_template(&a);
    let r = format!("docker://{}/vm/t:1", reg.addr);
    a.ok(&["rootfs", "push", "t", &r, "--plain-http"]);
    let b = Env::new();
    let pulled = b.json(&["rootfs", "pull", &r, "--plain-http", "--name", "t"]);
    let id = pulled["id"].as_str().unwrap().to_string();

    // no --plain-http: the pull's choice is used
    {
        let served = Served::new(&b, "t", "t.img", &[]);
        let mnt = b.path("mnt");
        let _lm = LoopMount::new(&served.file, mnt.clone(), false);
        assert!(mnt.join("etc").is_dir());
        let st = served.state();
        assert!(st["chunks_fetched"].as_u64().unwrap() > 0, "{st}");
    }

    // a record from before the choice was kept: refused at start, naming
    // the registry and the flag
    let b2 = &Env::new();
    let again = b2.json(&["rootfs", "pull", &r, "--plain-http", "--name", "t"]);
    assert_eq!(again["id"], pulled["id"]);
    let rec = b2.root().join("blocks/remote").join(&id[7..]);
    let mut remote: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert_eq!(remote["plain_http"], true, "{remote}");
    remote.as_object_mut().unwrap().remove("plain_http");
    std::fs::write(&rec, serde_json::to_vec(&remote).unwrap()).unwrap();
    let file = b2.path("t2.img");
    let t = Instant::now();
    let e = b2.fails(&["rootfs", "serve", "t", file.to_str().unwrap()]);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(
        e.contains(&reg.addr) && e.contains("--plain-http"),
        "the error names the registry and the flag: {e}"
    );
    assert!(!b2.ok(&["mounts"]).contains("t2.img"), "nothing is served");
    // with the flag it serves
    {
        let served = Served::new(b2, "t", "t2.img", &["--plain-http"]);
        assert!(served.state()["chunks_missing"].as_u64().unwrap() > 0);
    }

    // the registry gone: refused at start, the registry and the cause named
    reg.stop();
    let file = b2.path("t3.img");
    let t = Instant::now();
    let e = b2.fails(&[
        "rootfs",
        "serve",
        "t",
        file.to_str().unwrap(),
        "--plain-http",
    ]);
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(e.contains(&reg.addr), "{e}");
    assert!(!b2.ok(&["mounts"]).contains("t3.img"));
    b2.fsck_ok();
}
