//! One store, many processes: pulls, conversions, template builds and a
//! lazy mount's daemon work while `strata gc` runs in a loop; then the same
//! operations killed with SIGKILL at fixed instants. Nothing in use is lost,
//! fsck stays clean, and every re-run converges to the digest a clean run
//! gives. Run as root (mounts, FUSE).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// `strata gc` in a loop, each run in its own process, until stopped. Every
/// run must succeed: gc never waits for a daemon, only for operations.
struct GcLoop {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, u64)>>,
}

impl GcLoop {
    fn start(env: &Env) -> GcLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let root = env.root();
        let handle = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut sweeps, mut objects) = (0u64, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
                    c.arg("--root").arg(&root).args(["--json", "gc"]);
                    let out = c.output().expect("running strata gc");
                    assert!(
                        out.status.success(),
                        "gc failed while others work: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    sweeps += 1;
                    objects += r["objects"].as_u64().unwrap();
                    std::thread::sleep(Duration::from_millis(20));
                }
                (sweeps, objects)
            })
        };
        GcLoop {
            stop,
            handle: Some(handle),
        }
    }

    /// Stop; how many sweeps ran and how many objects they removed.
    fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().unwrap().join().expect("gc loop")
    }
}

impl Drop for GcLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A lazy mount, unmounted when dropped whatever the test did.
struct Lazy<'a> {
    env: &'a Env,
    dir: PathBuf,
}

impl<'a> Lazy<'a> {
    fn mount(env: &'a Env, reference: &str, dir: &Path, extra: &[&str]) -> Lazy<'a> {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = vec!["mount", "--lazy=require", "--plain-http"];
        args.extend_from_slice(extra);
        args.push(reference);
        args.push(dir.to_str().unwrap());
        let v = env.json(&args);
        assert_eq!(v["mode"], "lazy", "{v}");
        Lazy {
            env,
            dir: dir.canonicalize().unwrap(),
        }
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

    fn pid(&self) -> u32 {
        self.state()["pid"].as_u64().unwrap() as u32
    }
}

impl Drop for Lazy<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["umount", self.dir.to_str().unwrap()]);
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A composefs mount of an image of a store: the expected tree, read in
/// place (an export would write thousands of files for nothing).
struct Tree {
    dir: PathBuf,
}

impl Tree {
    fn mount(env: &Env, image: &str, name: &str) -> Tree {
        let dir = env.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        env.ok(&["mount", image, dir.to_str().unwrap()]);
        Tree { dir }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// Up to `n` regular, non-empty files under `dir`, sorted.
fn files_of(dir: &Path, n: usize) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let md = std::fs::symlink_metadata(e.path()).unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() && md.len() > 0 {
                out.push(e.path().strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out.sort();
    // spread over the tree rather than the first directory only
    let step = (out.len() / n.max(1)).max(1);
    out.into_iter().step_by(step).take(n).collect()
}

/// Every file reads through the mount as in the expected tree.
fn assert_reads(mnt: &Path, want: &Path, files: &[PathBuf]) {
    for p in files {
        let got = std::fs::read(mnt.join(p))
            .unwrap_or_else(|e| panic!("reading {} through the lazy mount: {e}", p.display()));
        assert!(
            got == std::fs::read(want.join(p)).unwrap(),
            "{}",
            p.display()
        );
    }
}

/// The objects in the store of `env`.
fn objects(env: &Env) -> std::collections::BTreeSet<String> {
    let mut all = std::collections::BTreeSet::new();
    for fan in std::fs::read_dir(env.root().join("objects")).unwrap() {
        let fan = fan.unwrap();
        for o in std::fs::read_dir(fan.path()).unwrap() {
            let name = o.unwrap().file_name();
            all.insert(format!(
                "{}{}",
                fan.file_name().to_string_lossy(),
                name.to_string_lossy()
            ));
        }
    }
    all
}

/// The objects in the store once a lazy mount has stored what its reads
/// brought (no change for 500 ms; at most 10 s).
fn settled_objects(env: &Env) -> std::collections::BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = objects(env);
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let now = objects(env);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn kill9(pid: u32) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -9 {pid}");
}

/// Run `strata args` in the background and SIGKILL it after `delay` (if
/// it is still running then).
fn kill_after(env: &Env, args: &[&str], delay: Duration) {
    let mut c = env
        .cmd()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning strata");
    std::thread::sleep(delay);
    let _ = c.kill(); // SIGKILL
    let _ = c.wait();
}

#[test]
fn processes_work_while_gc_loops_and_nothing_in_use_is_lost() {
    let t0 = Instant::now();
    let reg = Registry::start();
    let apps = apps_layout();
    let python = oci_ref(&synth_layout(), "python");
    // the truth, from a store nobody else touches
    let truth = Env::new();
    let mut expected: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    for i in 0..6 {
        let r = oci_ref(&apps, &format!("app-{i}"));
        let v = truth.json(&["pull", &r]);
        expected.insert(r, v["tree_digest"].clone());
    }
    // served lazily: app-0 as zstd:chunked; pulled from the registry: gnu
    let lazy_ref = format!("docker://{}/app:1", reg.addr);
    let gnu_ref = format!("docker://{}/gnu:1", reg.addr);
    truth.ok(&[
        "convert",
        "--plain-http",
        &oci_ref(&apps, "app-0"),
        &lazy_ref,
    ]);
    truth.ok(&[
        "convert",
        "--plain-http",
        &oci_ref(&synth_layout(), "gnu"),
        &gnu_ref,
    ]);
    let v = truth.json(&["pull", "--plain-http", &gnu_ref]);
    expected.insert(gnu_ref.clone(), v["tree_digest"].clone());
    let converted = truth.json(&[
        "convert",
        &python,
        &format!("oci:{}:py", truth.path("conv").display()),
    ])["manifest_digest"]
        .clone();
    let template =
        truth.json(&["rootfs", "build", "--from", &python, "--size", "64MiB"])["id"].clone();
    let want = Tree::mount(&truth, &oci_ref(&apps, "app-0"), "want");
    let want = want.dir.as_path();
    let files = files_of(want, 400);
    eprintln!("truth ready in {:.1} s", t0.elapsed().as_secs_f64());

    let env = Env::new();
    let gc = GcLoop::start(&env);
    let mnt = env.path("mnt");
    let lazy = Lazy::mount(&env, &lazy_ref, &mnt, &["--prefetch", "none"]);
    std::thread::scope(|s| {
        // reads through the lazy mount: each fetch is a commit of the
        // daemon's while gc sweeps
        s.spawn(|| assert_reads(&lazy.dir, want, &files[..200]));
        // pulls (the same base layer as the lazy image), removals, re-pulls
        for w in 0..2 {
            let (env, apps) = (&env, &apps);
            s.spawn(move || {
                for round in 0..3 {
                    for i in (w * 3)..(w * 3 + 3) {
                        let r = oci_ref(apps, &format!("app-{i}"));
                        env.ok(&["-q", "pull", &r]);
                        if round == 1 {
                            env.ok(&["rm", &r]);
                        }
                    }
                }
            });
        }
        // a pull from the registry, conversions
        s.spawn(|| {
            env.ok(&["-q", "pull", "--plain-http", &gnu_ref]);
            for k in 0..3 {
                let out = format!("oci:{}:py", env.path(&format!("conv{k}")).display());
                let v = env.json(&["convert", &python, &out]);
                assert_eq!(v["manifest_digest"], converted, "{v}");
            }
        });
        // template builds (the second is not from the cache)
        s.spawn(|| {
            env.ok(&["-q", "pull", &python]);
            for args in [&[][..], &["--no-cache"][..]] {
                let mut a = vec!["rootfs", "build", "--from", &python, "--size", "64MiB"];
                a.extend_from_slice(args);
                a.extend_from_slice(&["--name", "t"]);
                let v = env.json(&a);
                assert_eq!(v["id"], template, "{v}");
            }
        });
    });
    // everything the mount read, and what it had not read yet, reads right
    assert_reads(&lazy.dir, want, &files);
    let (sweeps, swept) = gc.stop();
    eprintln!(
        "{sweeps} gc runs removed {swept} objects meanwhile; work done in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert!(sweeps >= 3, "gc ran {sweeps} times only");
    assert_eq!(lazy.state()["errors"], 0);
    // every image is whole: tree rebuilt from its records, objects re-hashed
    for (r, tree) in &expected {
        let v = env.json(&["verify", r]);
        assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{r}: {v}");
        assert_eq!(&v["tree_digest"], tree, "{r}");
    }
    assert_eq!(env.json(&["rootfs", "inspect", "t"])["id"], template);
    env.fsck_ok();
    // the daemon's fetched contents stay until its mount goes
    drop(lazy);
    env.ok(&["gc"]);
    env.fsck_ok();
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn gc_sweeps_while_a_lazy_mount_is_served_and_its_reads_still_work() {
    let reg = Registry::start();
    let hello = oci_ref(&sample_layout(), "latest");
    let lazy_ref = format!("docker://{}/hello:1", reg.addr);
    let truth = Env::new();
    truth.ok(&["convert", "--plain-http", &hello, &lazy_ref]);
    let want = truth.path("want");
    truth.ok(&["export", &hello, want.to_str().unwrap()]);
    let files = files_of(&want, 1000);
    assert!(files.len() >= 4, "{files:?}");

    let env = Env::new();
    let lazy = Lazy::mount(&env, &lazy_ref, &env.path("mnt"), &["--prefetch", "none"]);
    let (first, rest) = files.split_at(files.len() / 2);
    assert_reads(&lazy.dir, &want, first);
    // what the mount stored by now: the files read and the neighbours
    // their requests brought, a lower layer's file an upper one hides too
    let fetched = settled_objects(&env);
    assert!(fetched.len() > first.len(), "{fetched:?}");
    // an image nobody names any more
    let python = oci_ref(&synth_layout(), "python");
    env.ok(&["-q", "pull", &python]);
    env.ok(&["rm", &python]);
    let t = Instant::now();
    let r = env.json(&["gc"]);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "gc waited {:?} for a daemon",
        t.elapsed()
    );
    assert_eq!(r["layers"].as_array().unwrap().len(), 3, "{r}");
    assert!(r["objects"].as_u64().unwrap() > 0, "{r}");
    let kept = objects(&env);
    let lost: Vec<_> = fetched.iter().filter(|o| !kept.contains(*o)).collect();
    assert!(lost.is_empty(), "gc took what the mount fetched: {lost:?}");
    // what was fetched before gc and what is fetched after it read right
    assert_reads(&lazy.dir, &want, &files);
    assert_reads(&lazy.dir, &want, rest);
    assert_eq!(lazy.state()["errors"], 0);
    assert_eq!(env.json(&["gc"])["objects"], 0, "the mount's contents stay");
    env.fsck_ok();
}

#[test]
fn operations_killed_at_fixed_instants_leave_a_store_that_converges() {
    let t0 = Instant::now();
    let reg = Registry::start();
    let apps = apps_layout();
    let pull_ref = oci_ref(&apps, "app-7");
    let conv_ref = oci_ref(&apps, "app-8");
    let lazy_ref = format!("docker://{}/kill:1", reg.addr);
    let conv_dest = format!("docker://{}/kill:2", reg.addr);
    // what clean runs give
    let truth = Env::new();
    let tree = truth.json(&["pull", &pull_ref])["tree_digest"].clone();
    let build = ["rootfs", "build", "--from", &pull_ref, "--size", "192MiB"];
    let template = truth.json(&build)["id"].clone();
    let converted =
        truth.json(&["convert", "--plain-http", &conv_ref, &lazy_ref])["manifest_digest"].clone();
    let lazy_tree = truth.json(&["verify", &conv_ref])["tree_digest"].clone();
    let want = Tree::mount(&truth, &conv_ref, "want");
    let want = want.dir.as_path();
    let files = files_of(want, 100);
    eprintln!("truth ready in {:.1} s", t0.elapsed().as_secs_f64());

    let env = Env::new();
    // after a kill: fsck passes and gc runs
    let settle = |what: &str| {
        env.fsck_ok();
        let out = env.run(&["gc"]);
        assert!(
            out.status.success(),
            "gc after {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // a pull: early and amid its layers; the re-run converges
    for (k, ms) in [200, 900].into_iter().enumerate() {
        kill_after(&env, &["pull", &pull_ref], Duration::from_millis(ms));
        settle(&format!("a pull killed after {ms} ms"));
        let v = env.json(&["pull", &pull_ref]);
        assert_eq!(v["tree_digest"], tree, "pull after a kill at {ms} ms");
        if k == 0 {
            env.ok(&["rm", &pull_ref]);
            env.ok(&["gc"]);
        }
    }
    eprintln!("pulls done at {:.1} s", t0.elapsed().as_secs_f64());
    // a template build (of the image pulled)
    for ms in [300, 1500] {
        let mut a = build.to_vec();
        a.push("--no-cache");
        kill_after(&env, &a, Duration::from_millis(ms));
        settle(&format!("a template build killed after {ms} ms"));
    }
    assert_eq!(env.json(&build)["id"], template);
    eprintln!("builds done at {:.1} s", t0.elapsed().as_secs_f64());
    // a conversion (pushed): in its pull, then converting
    for ms in [500, 3000] {
        kill_after(
            &env,
            &["convert", "--plain-http", &conv_ref, &conv_dest],
            Duration::from_millis(ms),
        );
        settle(&format!("a conversion killed after {ms} ms"));
    }
    let v = env.json(&["convert", "--plain-http", &conv_ref, &conv_dest]);
    assert_eq!(v["manifest_digest"], converted);
    eprintln!("conversions done at {:.1} s", t0.elapsed().as_secs_f64());
    // a lazy mount's daemon fetching the whole image (prefetch all), with
    // none of its layers in the store
    env.ok(&["rm", &pull_ref]);
    env.ok(&["rm", &conv_ref]);
    env.ok(&["gc"]);
    let mnt = env.path("mnt");
    for ms in [0, 600] {
        let lazy = Lazy::mount(&env, &lazy_ref, &mnt, &["--prefetch", "all"]);
        assert_reads(&lazy.dir, want, &files[..10]);
        std::thread::sleep(Duration::from_millis(ms));
        kill9(lazy.pid());
        // stale but mounted: its lease still keeps what it fetched
        settle(&format!("a lazy mount's daemon killed after {ms} ms"));
        drop(lazy);
        settle("unmounting the stale mount");
        // the image may have arrived whole: then a mount would not be lazy
        let _ = env.run(&["rm", &lazy_ref]);
    }
    let lazy = Lazy::mount(&env, &lazy_ref, &mnt, &["--prefetch", "all"]);
    assert_reads(&lazy.dir, want, &files);
    let deadline = Instant::now() + Duration::from_secs(60);
    while lazy.state()["complete"] != true {
        assert!(Instant::now() < deadline, "{}", lazy.state());
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(lazy);
    let v = env.json(&["verify", &lazy_ref]);
    assert_eq!(v["tree_digest"], lazy_tree, "{v}");
    env.ok(&["gc"]);
    env.fsck_ok();
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}
