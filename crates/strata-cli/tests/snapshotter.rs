//! `strata snapshotter` as containerd's proxy snapshotter (issue 16), with
//! the real containerd 1.6 and runc: `ctr pull --snapshotter strata` goes
//! through the overlay contract (Prepare, containerd's applier, Commit),
//! `ctr run` starts a container on it, the records survive a kill -9 of
//! the snapshotter, and containerd's gc removes what it no longer needs.
//! Run as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use strata_testkit::containerd::Containerd;

/// A `strata snapshotter` child, killed on drop.
struct Snapshotter {
    child: Child,
    root: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Snapshotter {
    fn start(dir: &Path) -> Snapshotter {
        let root = dir.join("snap-root");
        let socket = dir.join("strata.sock");
        let log = dir.join("snapshotter.log");
        let child = spawn(&root, &socket, &log);
        let s = Snapshotter {
            child,
            root,
            socket,
            log,
        };
        s.wait_ready();
        s
    }

    /// [`start`](Self::start) on `root`, `socket` and `log`, with
    /// `config` (a TOML file) as its `--config`.
    fn start_with_config(
        root: PathBuf,
        socket: PathBuf,
        log: PathBuf,
        config: &Path,
    ) -> Snapshotter {
        let s = Snapshotter {
            child: spawn_with(&root, &socket, &log, config.to_str().unwrap()),
            root,
            socket,
            log,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the snapshotter did not listen: {}", self.log_text());
    }

    /// `strata --root <its store> --json CMD`: what it printed.
    fn store_json(&self, cmd: &str) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_strata"))
            .arg("--root")
            .arg(self.root.join("store"))
            .args(["--json", cmd])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "strata {cmd}: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// kill -9, then start again on the same root and socket.
    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.root, &self.socket, &self.log);
        self.wait_ready();
    }
}

fn spawn(root: &Path, socket: &Path, log: &Path) -> Child {
    spawn_with(root, socket, log, "/dev/null")
}

fn spawn_with(root: &Path, socket: &Path, log: &Path, config: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--root")
        .arg(root)
        .arg("snapshotter")
        .arg("--socket")
        .arg(socket)
        .arg("--config")
        .arg(config)
        .env("STRATA_LOG", "info,strata_snapshotter=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting strata snapshotter")
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // image mounts (and lazy mounts' daemons) outlive the snapshotter
        // by design: a test takes them down itself
        if let Ok(d) = std::fs::read_dir(self.root.join("mnt")) {
            for e in d.flatten() {
                let _ = Command::new(env!("CARGO_BIN_EXE_strata"))
                    .arg("--root")
                    .arg(self.root.join("store"))
                    .arg("umount")
                    .arg(e.path())
                    .output();
                let _ = Command::new("umount").arg("-l").arg(e.path()).output();
            }
        }
    }
}

/// `strata --json rpull --plain-http --address SOCK IMAGE`: its summary.
fn rpull(ctrd: &Containerd, snap: &Snapshotter, image: &str) -> serde_json::Value {
    let out = Env::new()
        .cmd()
        .args(["--json", "rpull", "--plain-http", "--address"])
        .arg(ctrd.socket())
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rpull: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        snap.log_text()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A container id no other test (nor containerd instance: runc's state
/// is shared) uses.
/// The spare lazy mount daemons (`strata spare`) waiting for a
/// snapshotter whose store is `store`.
fn spares(store: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.contains(&&b"spare"[..]) && args.contains(&store.as_os_str().as_encoded_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// `f`'s first answer within `limit`, asked every 50 ms.
fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cid(name: &str) -> String {
    format!("{name}-{}", std::process::id())
}

fn proxy_config(socket: &Path) -> String {
    format!(
        "[proxy_plugins]\n  [proxy_plugins.strata]\n    type = \"snapshot\"\n    address = \"{}\"\n",
        socket.display()
    )
}

/// The snapshot records strata holds (`ctr snapshots ls` lists
/// containerd's view; this is the backend's).
fn records(root: &Path) -> usize {
    std::fs::read_dir(root.join("meta"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `ctr [-n NS] run --rm --snapshotter strata IMAGE ID python3 -c CODE`,
/// retried for up to 15 s (containerd dials a restarted snapshotter
/// again on its own schedule); python's output. A run that succeeded
/// with no output at all is run once more: ctr 1.6 can lose a short-lived
/// task's output (its copy of the fifo races the task's delete, as in
/// containerd#770); python exiting 0 shows the container ran.
fn run_python(
    ctrd: &Containerd,
    snap: &Snapshotter,
    ns: &str,
    image: &str,
    id: &str,
    code: &str,
) -> String {
    let t0 = Instant::now();
    let mut lost_once = false;
    let out = loop {
        let o = ctrd.ctr_output(&[
            "-n",
            ns,
            "run",
            "--rm",
            "--snapshotter",
            "strata",
            image,
            &cid(id),
            "python3",
            "-c",
            code,
        ]);
        if o.status.success() && o.stdout.is_empty() && !lost_once {
            eprintln!("ctr run {id}: exit 0 and no output; once more");
            lost_once = true;
            continue;
        }
        if o.status.success() || t0.elapsed() > Duration::from_secs(15) {
            break o;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        snap.log_text()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Take down the detached container `id` (a full id) in namespace `ns`.
fn remove_container(ctrd: &Containerd, ns: &str, id: &str) {
    let _ = ctrd.ctr_output(&["-n", ns, "task", "kill", "-s", "SIGKILL", id]);
    std::thread::sleep(Duration::from_millis(500));
    let _ = ctrd.ctr_output(&["-n", ns, "task", "rm", "-f", id]);
    let _ = ctrd.ctr_output(&["-n", ns, "container", "rm", id]);
}

#[test]
fn containerd_pulls_and_runs_through_strata_on_the_overlay_contract() {
    let dir = tempfile::tempdir().unwrap();
    let mut snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let plugins = ctrd.ctr(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains("strata")
                && l.contains("ok")),
        "{plugins}"
    );

    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "debian:python", &[]);
    let image = format!("{}/debian:python", reg.addr);
    ctrd.ctr(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "strata",
        &image,
    ]);
    // two layers, committed by containerd's unpacker through strata
    let ls = ctrd.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(
        ls.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{ls}"
    );
    assert_eq!(records(&snap.root), 2);

    let run = |id: &str| {
        ctrd.ctr(&[
            "run",
            "--rm",
            "--snapshotter",
            "strata",
            &image,
            id,
            "python3",
            "-c",
            "import sys; print('python', sys.version_info[0])",
        ])
    };
    assert_eq!(run(&cid("c1")).trim(), "python 3", "{}", snap.log_text());

    // kill -9: the records are on disk; a new container starts once
    // containerd has dialled again (its backoff is at most 3 s)
    snap.kill_and_restart();
    let t0 = Instant::now();
    loop {
        let out = ctrd.ctr_output(&["snapshots", "--snapshotter", "strata", "usage"]);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("unavailable"), "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "containerd still cannot reach strata: {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "containerd reached the restarted snapshotter after {:?}",
        t0.elapsed()
    );
    assert_eq!(run(&cid("c2")).trim(), "python 3", "{}", snap.log_text());

    // containerd's gc removes the layers once no image needs them, and
    // strata's Cleanup frees their directories
    ctrd.ctr(&["images", "rm", "--sync", &image]);
    let t0 = Instant::now();
    while records(&snap.root) > 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(records(&snap.root), 0, "{}", snap.log_text());
    let left = std::fs::read_dir(snap.root.join("snapshots"))
        .unwrap()
        .count()
        + std::fs::read_dir(snap.root.join("trash")).unwrap().count();
    assert_eq!(left, 0, "directories left after gc and Cleanup");
}

#[test]
fn with_the_snapshotter_down_containerd_names_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nobody.sock");
    let ctrd = Containerd::start_with(&proxy_config(&socket));
    let out = ctrd.ctr_output(&["snapshots", "--snapshotter", "strata", "prepare", "k1"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(socket.to_str().unwrap()), "{text}");
}

/// A view of the bottom layer of a two-layer Debian + python image (an
/// intermediate layer: `ls` is `ctr snapshots ls`): it mounts, holds
/// Debian and not python's layer, and is removed.
///
/// `ctr snapshots view` holds no lease: containerd's gc may remove the
/// view at any moment (it runs after enough mutations, and rpull's lease
/// removal is one), so its mounts are asked for when it is created, and a
/// view gc already removed is not an error at the end.
fn view_of_the_bottom_layer(ctrd: &Containerd, ls: &str) {
    let bottom = ls
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 2 && f[1] == "Committed")
        .unwrap_or_else(|| panic!("no bottom layer in {ls}"))[0]
        .to_string();
    let view = ctrd.ctr(&[
        "snapshots",
        "--snapshotter",
        "strata",
        "view",
        "--mounts",
        "v-bottom",
        &bottom,
    ]);
    let mounts: serde_json::Value =
        serde_json::from_str(&view).unwrap_or_else(|e| panic!("{e}: {view}"));
    let src = mounts
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["Type"] == "bind"))
        .and_then(|m| m["Source"].as_str())
        .unwrap_or_else(|| panic!("no bind mount in {view}"));
    let src = Path::new(src);
    assert!(src.join("etc/debian_version").is_file(), "{view}");
    assert!(src.join("usr/bin").is_dir(), "{view}");
    assert!(
        !src.join("usr/bin/python3").exists(),
        "python's layer is not in a view of the layer below it"
    );
    let rm = ctrd.ctr_output(&["snapshots", "--snapshotter", "strata", "rm", "v-bottom"]);
    let err = String::from_utf8_lossy(&rm.stderr);
    assert!(
        rm.status.success() || err.contains("not found"),
        "removing the view: {err}"
    );
}

/// `strata rpull`: containerd gets the manifest and config only; every
/// layer's Prepare is answered by strata from its own store (pulled once,
/// deduplicated), and a container runs on strata's one mount of the image.
#[test]
fn rpull_makes_the_layers_available_from_strata_and_ctr_runs_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "debian:python", &[]);
    let image = format!("{}/debian:python", reg.addr);
    // containerd holds an ingest under the ref rpull writes the config as,
    // with bytes that are not the config's (another client's, cut short):
    // rpull goes on from there, containerd refuses the commit, and rpull
    // aborts the ingest and writes the config again
    let config = layout_manifest(&debian_layout(), "python")["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = std::fs::read(blob_path(&debian_layout(), &config)).unwrap();
    let r#ref = format!("config-{config}");
    // (ctr writes what it read once its input ends, then fails to commit
    // it: the ingest stays, holding the wrong bytes)
    let mut ingest = Command::new("ctr")
        .arg("--address")
        .arg(ctrd.socket())
        .args(["content", "ingest", "--expected-size"])
        .arg(bytes.len().to_string())
        .args(["--expected-digest", &config, &r#ref])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = ingest.stdin.take().unwrap();
        input.write_all(&vec![b'x'; bytes.len()]).unwrap();
    }
    assert!(
        !ingest.wait().unwrap().success(),
        "ctr committed the wrong bytes"
    );
    let active = ctrd.ctr(&["content", "active"]);
    assert!(
        active.lines().any(|l| l.starts_with(&r#ref) && l.contains(&bytes.len().to_string())),
        "containerd holds the ingest {ref}: {active}",
        ref = r#ref
    );
    let t0 = Instant::now();
    let s = rpull(&ctrd, &snap, &image);
    eprintln!("rpull of debian:python: {:?}", t0.elapsed());
    let blobs = ctrd.ctr(&["content", "ls", "-q"]);
    assert!(blobs.contains(&config), "the config is in: {blobs}");
    assert_eq!(s["layers"], 2, "{s}");
    assert_eq!(s["layers_prepared"], 2, "{s}");

    // containerd holds the manifest and the config, no layer
    let manifest = layout_manifest(&debian_layout(), "python");
    let content = ctrd.ctr(&["content", "ls", "-q"]);
    for l in manifest["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert!(
            !content.contains(d),
            "layer {d} in containerd's content store"
        );
    }
    assert_eq!(content.lines().count(), 2, "{content}");
    let ls = ctrd.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(
        ls.lines().filter(|l| l.contains("Committed")).count(),
        2,
        "{ls}"
    );
    // mounted once pulled, before any container asks for it
    let premounted = snap
        .root
        .join("mnt")
        .join(layout_manifest_digest(&debian_layout(), "python").trim_start_matches("sha256:"));
    assert!(
        strata_sys::is_mount_point(&premounted).unwrap(),
        "{} is not mounted after the pull: {}",
        premounted.display(),
        snap.log_text()
    );

    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        &cid("r1"),
        "python3",
        "-c",
        "import json; print(json.dumps({'ok': 1}))",
    ]);
    assert_eq!(out.trim(), r#"{"ok": 1}"#, "{}", snap.log_text());
    // strata's one mount of the image is what containers stand on
    let mnt = snap.root.join("mnt");
    let mounted: Vec<_> = std::fs::read_dir(&mnt).unwrap().flatten().collect();
    assert_eq!(mounted.len(), 1, "one image mount");

    // a view of the bottom layer alone (an intermediate layer of the
    // image): a mount of the layers up to it, without python's layer
    view_of_the_bottom_layer(&ctrd, &ls);

    // again: nothing to make available
    let s = rpull(&ctrd, &snap, &image);
    assert_eq!(s["layers_prepared"], 0, "{s}");

    // gone from containerd: the layers go, the mount goes at Cleanup
    ctrd.ctr(&["images", "rm", "--sync", &image]);
    let t0 = Instant::now();
    while records(&snap.root) > 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(records(&snap.root), 0, "{}", snap.log_text());
    let t0 = Instant::now();
    while std::fs::read_dir(&mnt).unwrap().count() > 0 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "the image mount is gone"
    );
}

/// A zstd:chunked image through `strata rpull`: nothing is pulled, the
/// first container starts on a lazy mount (prefetch off: files arrive on
/// first read), and a running container keeps reading files that had not
/// arrived while the snapshotter is killed (kill -9); a restarted
/// snapshotter starts the next container on the same mount.
#[test]
fn a_zstd_chunked_image_runs_lazily_and_survives_a_snapshotter_kill() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("snap-root");
    let socket = dir.path().join("strata.sock");
    let log = dir.path().join("snapshotter.log");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[snapshotter]\nprefetch = \"none\"\n").unwrap();
    let mut snap = Snapshotter::start_with_config(root, socket, log, &config);
    // a lazy mount's daemon is started ahead: the image's first Prepare
    // hands it its mount
    let store = snap.root.join("store");
    let spare = wait_for(Duration::from_secs(30), || spares(&store).first().copied())
        .unwrap_or_else(|| panic!("no spare daemon started\n{}", snap.log_text()));
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let reg = Registry::start();
    let r = chunked_python(&reg, "py:1");
    // through a proxy that logs the requests
    let proxy = strata_testkit::proxy::Proxy::start(&reg.addr, Default::default());
    let image = r
        .trim_start_matches("docker://")
        .replace(&reg.addr, &proxy.addr);
    let s = rpull(&ctrd, &snap, &image);
    assert_eq!(s["layers_prepared"], 2, "{s}");
    // rpull resolves the tag; the snapshotter fetches the manifest by
    // digest once and hands it with the config to the lazy mount's daemon
    // (which does not ask again); each layer's TOC and tar-split come in
    // one range request
    let asked = proxy.requests();
    let by_digest = asked
        .iter()
        .filter(|r| r.starts_with("GET /v2/py/manifests/sha256:"))
        .count();
    assert_eq!(by_digest, 1, "{asked:#?}");
    let raw = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false", &r])
        .output()
        .unwrap();
    assert!(raw.status.success(), "skopeo inspect --raw {r}");
    let manifest: serde_json::Value = serde_json::from_slice(&raw.stdout).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let configs = asked.iter().filter(|r| r.contains(config_digest)).count();
    assert_eq!(configs, 2, "rpull's and the snapshotter's: {asked:#?}");
    for l in manifest["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        let reads: Vec<_> = asked.iter().filter(|r| r.contains(d)).collect();
        assert_eq!(reads.len(), 1, "{d}: {reads:#?}");
        assert!(reads[0].contains("range="), "{reads:#?}");
    }
    // lazy: the image is not in strata's store, nothing was pulled
    let images = snap.store_json("images");
    assert_eq!(images.as_array().map(|a| a.len()), Some(0), "{images}");

    let t0 = Instant::now();
    let long = cid("long");
    ctrd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "strata",
        &image,
        &long,
        "sleep",
        "120",
    ]);
    eprintln!("lazy container started in {:?}", t0.elapsed());
    let mounts = snap.store_json("mounts");
    assert_eq!(mounts[0]["kind"], "lazy", "{mounts}");
    assert_eq!(mounts[0]["complete"], false, "{mounts}");
    assert_eq!(
        mounts[0]["pid"], spare,
        "the spare serves the mount: {mounts}"
    );
    // and the next spare follows
    let next = wait_for(Duration::from_secs(30), || {
        spares(&store).into_iter().find(|&p| p != spare)
    });
    assert!(
        next.is_some(),
        "no spare after the first was taken\n{}",
        snap.log_text()
    );
    let fetched = mounts[0]["bytes_fetched"].as_u64().unwrap();
    let size = mounts[0]["image_bytes"].as_u64().unwrap();
    eprintln!("lazy container: {fetched} of the image's {size} bytes fetched at its start");
    assert!(fetched * 10 < size, "{mounts}");

    // the snapshotter dies; python (never read yet) still runs in the
    // container: the lazy mount's daemon is a process of its own
    let _ = snap.child.kill();
    let _ = snap.child.wait();
    // the spare waiting goes with it (its stdin ends); the mount's daemon
    // (the first spare) stays
    let waiting = || -> Vec<u32> { spares(&store).into_iter().filter(|&p| p != spare).collect() };
    let left = wait_for(Duration::from_secs(10), || {
        waiting().is_empty().then_some(())
    });
    assert!(left.is_some(), "spares left: {:?}", waiting());
    assert!(
        strata_sys::daemon::alive(spare),
        "the mount's daemon ended with the snapshotter"
    );
    let out = ctrd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &long,
        "python3",
        "-c",
        "print(6 * 7)",
    ]);
    assert_eq!(out.trim(), "42");

    // restarted, it starts the next container on the same mount
    snap.child = spawn_with(
        &snap.root,
        &snap.socket,
        &snap.log,
        config.to_str().unwrap(),
    );
    snap.wait_ready();
    let out = run_python(&ctrd, &snap, "default", &image, "second", "print('again')");
    assert_eq!(out, "again");
    assert_eq!(
        std::fs::read_dir(snap.root.join("mnt")).unwrap().count(),
        1,
        "one mount of the image for both containers"
    );
    // a view of the layer below the top (an image pulled normally on
    // Debian's layer asks the same): the lazy mount holds the whole chain
    // only, so the image is pulled in full for it, while the container
    // goes on running on its lazy mount
    let ls = ctrd.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    view_of_the_bottom_layer(&ctrd, &ls);
    let out = ctrd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        &long,
        "python3",
        "-c",
        "print(7 * 7)",
    ]);
    assert_eq!(out.trim(), "49");
    remove_container(&ctrd, "default", &long);
}

/// The snapshotter is killed after a lazy image's Prepare answered (the
/// image checked) and before its daemon made the mount: restarted, it
/// waits for that daemon instead of starting a second one on the same
/// mount point, and the container starts on the first daemon's mount.
/// The daemon is held with SIGSTOP in that window, so the window is
/// always hit.
#[test]
fn a_snapshotter_killed_while_a_lazy_mount_is_built_waits_for_it_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let reg = Registry::start();
    let r = chunked_python(&reg, "built/py:1");
    let image = r.trim_start_matches("docker://").to_string();

    // the daemon names itself in its mount's state dir once it reported
    // the image checked, until the mount is made: stop it there
    let lazy = snap.root.join("store").join("lazy");
    let stopped = std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(120) {
            for e in std::fs::read_dir(&lazy).into_iter().flatten().flatten() {
                if let Ok(pid) = std::fs::read_to_string(e.path().join("building")) {
                    let pid = pid.trim().to_string();
                    // (written whole by a rename: never empty; polled on if it were)
                    if pid.is_empty() {
                        continue;
                    }
                    let ok = Command::new("kill").args(["-STOP", &pid]).status().unwrap();
                    assert!(ok.success(), "kill -STOP {pid}");
                    return pid;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("no lazy mount daemon said it was building");
    });
    rpull(&ctrd, &snap, &image);
    let pid = stopped.join().unwrap();
    let mnt: Vec<PathBuf> = std::fs::read_dir(snap.root.join("mnt"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(mnt.len(), 1, "{mnt:?}");
    let target = mnt[0].canonicalize().unwrap();
    let mounted_at = |t: &Path| {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(4) == Some(t.to_str().unwrap()))
            .count()
    };
    assert_eq!(mounted_at(&target), 0, "stopped before its mount was made");
    // nor does anyone else start a second daemon there: refused, naming
    // the one building it
    let second = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("--root")
        .arg(snap.root.join("store"))
        .args(["mount", "--lazy=require", "--plain-http", &image])
        .arg(&target)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second daemon mounted: {err}");
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains("is still making it"),
        "{err}"
    );
    assert_eq!(mounted_at(&target), 0);

    snap.kill_and_restart();
    let out = std::thread::scope(|s| {
        let run =
            s.spawn(|| run_python(&ctrd, &snap, "default", &image, "built", "print('built')"));
        // the container waits for the stopped daemon; then it goes on
        std::thread::sleep(Duration::from_secs(2));
        if run.is_finished() {
            let got = run.join();
            panic!(
                "started before the mount was made: {got:?}\n{}",
                snap.log_text()
            );
        }
        let ok = Command::new("kill").args(["-CONT", &pid]).status().unwrap();
        assert!(ok.success());
        run.join().unwrap()
    });
    assert_eq!(out, "built", "{}", snap.log_text());
    assert_eq!(mounted_at(&target), 1, "one mount at {}", target.display());
    let mounts = snap.store_json("mounts");
    assert_eq!(mounts.as_array().map(|a| a.len()), Some(1), "{mounts}");
    assert_eq!(
        mounts[0]["pid"].to_string(),
        pid,
        "the first daemon serves it: {mounts}"
    );
    assert!(
        snap.log_text().contains("an earlier snapshotter started"),
        "{}",
        snap.log_text()
    );
}

/// The registry of a lazy image is gone when a container starts: the
/// start fails within a bounded time with an error naming strata and the
/// registry, and works once the registry is back.
#[test]
fn a_lazy_image_whose_registry_is_gone_fails_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let mut reg = Registry::start();
    let r = chunked_python(&reg, "py:1");
    let image = r.trim_start_matches("docker://").to_string();
    rpull(&ctrd, &snap, &image);

    reg.stop();
    let before = records(&snap.root);
    let t0 = Instant::now();
    let out = ctrd.ctr_output(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        &cid("gone"),
        "true",
    ]);
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started without its registry");
    assert!(err.contains("strata") && err.contains(&reg.addr), "{err}");
    // the container's snapshot, recorded while the registry was asked,
    // does not stay
    assert_eq!(records(&snap.root), before, "{}", snap.log_text());
    assert!(
        took < Duration::from_secs(60),
        "failed after {took:?}: {err}"
    );
    eprintln!("start without the registry failed after {took:?}: {err}");

    reg.restart();
    let out = ctrd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "strata",
        &image,
        &cid("back"),
        "python3",
        "-c",
        "print('back')",
    ]);
    assert_eq!(out.trim(), "back");
}

/// Kubernetes' path: containerd's CRI with `snapshotter = "strata"` and
/// snapshot annotations on. A CRI client (Python grpcio, the CRI API as
/// kubelet speaks it) pulls a zstd:chunked image and runs python in a
/// pod: strata reads CRI's labels, makes every layer available itself (the
/// sandbox image from its store, the image lazily) and the container
/// runs on the lazy mount.
#[test]
fn kubernetes_cri_runs_a_zstd_chunked_image_lazily_through_strata() {
    require_tool("python3", "python3");
    require_tool("umoci", "umoci");
    let grpc = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools"])
        .output()
        .unwrap();
    assert!(
        grpc.status.success(),
        "python3 lacks grpcio/grpcio-tools (scripts/install-deps.sh installs them): {}",
        String::from_utf8_lossy(&grpc.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let r = chunked_python(&reg, "py:1");
    let image = r.trim_start_matches("docker://").to_string();
    // the sandbox ("pause") image: debian's base running sleep
    let pause = dir.path().join("pause");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &oci_ref(&debian_layout(), "base"),
        &format!("oci:{}:base", pause.display()),
    ]));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &format!("{}:base", pause.display()),
        "--tag",
        "pause",
        "--config.cmd",
        "/bin/sleep",
        "--config.cmd",
        "infinity",
    ]));
    reg.push(
        &format!("oci:{}:pause", pause.display()),
        "strata/pause:sleep",
        &[],
    );

    // strata reaches the registry over plain HTTP (CRI's labels cannot say)
    let root = dir.path().join("snap-root");
    std::fs::create_dir_all(root.join("store")).unwrap();
    std::fs::write(
        root.join("store/registries.json"),
        format!(r#"{{"insecure": ["{}"]}}"#, reg.addr),
    )
    .unwrap();
    let config = dir.path().join("config.toml");
    let socket = dir.path().join("strata.sock");
    let log = dir.path().join("snapshotter.log");
    let d = dir.path().display();
    let cri = format!(
        "  restrict_oom_score_adj = true\n  sandbox_image = \"{}/strata/pause:sleep\"\n",
        reg.addr
    );
    let extra = format!(
        "{}\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  conf_dir = \"{d}/cni/conf\"\n  bin_dir = \"{d}/cni/bin\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"strata\"\n  \
         disable_snapshot_annotations = false\n  default_runtime_name = \"runc\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  Root = \"{d}/runc\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{a}\"]\n  endpoint = [\"http://{a}\"]\n",
        proxy_config(&socket),
        a = reg.addr
    );
    let ctrd = Containerd::start_with_cri(&cri, &extra);
    // containerd's content store, where it puts the manifests and configs
    // it pulls before the layers' Prepares
    std::fs::write(
        &config,
        format!(
            "[snapshotter]\nprefetch = \"none\"\ncontainerd_root = \"{}\"\n",
            ctrd.root().display()
        ),
    )
    .unwrap();
    let snap = Snapshotter::start_with_config(root, socket, log, &config);
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cri/cri_client.py");
    let logs = dir.path().join("pod-logs");
    // kubelet's order: the sandbox image is there before the pod's image
    // (it shares debian's base layer with it)
    let out = Command::new("python3")
        .arg(&client)
        .arg("--socket")
        .arg(ctrd.socket())
        .args([
            "pull",
            "--image",
            &format!("{}/strata/pause:sleep", reg.addr),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CRI pull of the sandbox image: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        snap.log_text()
    );
    let t0 = Instant::now();
    let out = Command::new("python3")
        .arg(&client)
        .arg("--socket")
        .arg(ctrd.socket())
        .args(["run", "--image", &image, "--sandbox-name"])
        .arg(cid("pod"))
        .arg("--log-dir")
        .arg(&logs)
        .args([
            "--timeout",
            "120",
            "--",
            "python3",
            "-c",
            "print('cri lazy')",
        ])
        .output()
        .unwrap();
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "CRI run failed ({}): {stderr}\n{}",
        out.status,
        snap.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cri lazy");
    eprintln!(
        "CRI pull + pod + container run: {took:?}; {}",
        stderr.lines().last().unwrap_or("")
    );
    // (containerd's gc may have had strata unmount it since the pod went)
    let log = snap.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("mounted") && l.contains("/py:1") && l.contains("lazily")),
        "the pod ran on a lazy mount of the image: {log}"
    );
    // its manifest and config came from containerd's content store, not
    // from the registry a second time
    let pod_manifest = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{image}"))
        .output()
        .unwrap();
    assert!(
        pod_manifest.status.success(),
        "skopeo inspect --raw {image}"
    );
    let digest = strata_digest::Digest::sha256_of(&pod_manifest.stdout);
    assert!(
        log.lines().any(|l| l.contains(&format!(
            "{digest} and its config from containerd's content store"
        ))),
        "{digest} read from containerd's content store: {log}"
    );
    // containerd fetched no layer itself
    let content = ctrd.ctr(&["-n", "k8s.io", "content", "ls", "-q"]);
    let manifest = layout_manifest(&debian_layout(), "python");
    for l in manifest["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert!(
            !content.contains(d),
            "layer {d} in containerd's content store"
        );
    }

    // `strata rpull -n k8s.io` of a gzip image: CRI finds it by its tag
    // and digest names, and a pod with kubelet's IfNotPresent runs on it
    // without a pull
    reg.push(&oci_ref(&debian_layout(), "python"), "gz/py:1", &[]);
    let gz = format!("{}/gz/py:1", reg.addr);
    let out = Env::new()
        .cmd()
        .args([
            "--json",
            "rpull",
            "--plain-http",
            "-n",
            "k8s.io",
            "--address",
        ])
        .arg(ctrd.socket())
        .arg(&gz)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "rpull -n k8s.io: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        snap.log_text()
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = Command::new("python3")
        .arg(&client)
        .arg("--socket")
        .arg(ctrd.socket())
        .args(["status", "--image", &gz])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "CRI does not see the rpulled image: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let config = layout_manifest(&debian_layout(), "python")["config"]["digest"].clone();
    assert_eq!(status["id"], config, "{status}");
    // (the zstd:chunked py:1 has the same config, so the same CRI id:
    // CRI lists both names under it)
    let has = |field: &str, v: String| {
        status[field]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x.as_str() == Some(v.as_str()))
    };
    assert!(has("repo_tags", gz.clone()), "{status}");
    let by_digest = format!(
        "{}/gz/py@{}",
        reg.addr,
        summary["manifest_digest"].as_str().unwrap()
    );
    assert!(has("repo_digests", by_digest), "{status}");
    let out = Command::new("python3")
        .arg(&client)
        .arg("--socket")
        .arg(ctrd.socket())
        .args(["run", "--if-not-present", "--image", &gz, "--sandbox-name"])
        .arg(cid("pod-gz"))
        .arg("--log-dir")
        .arg(&logs)
        .args(["--container-name", "gz", "--timeout", "120", "--"])
        .args(["python3", "-c", "print('cri rpulled')"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "CRI run of the rpulled image: {stderr}\n{}",
        snap.log_text()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cri rpulled");
    assert!(
        stderr.contains("\"pulled\": false"),
        "kubelet would not have pulled it: {stderr}"
    );
}

/// `[snapshotter] store` naming the node's strata store: an image the CLI
/// pulled before is not downloaded again for containerd (one copy of
/// every file on the node), and containers run on it.
#[test]
fn a_shared_store_gives_containerd_what_the_cli_already_pulled() {
    use strata_testkit::proxy::{Faults, Proxy};
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "debian:python", &[]);
    let proxy = Proxy::start(&reg.addr, Faults::default());
    let image = format!("{}/debian:python", proxy.addr);
    let cli = Env::new();
    cli.ok(&["pull", "-q", "--plain-http", &format!("docker://{image}")]);

    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[snapshotter]\nstore = \"{}\"\n", cli.root().display()),
    )
    .unwrap();
    let root = dir.path().join("snap-root");
    let socket = dir.path().join("strata.sock");
    let log = dir.path().join("snapshotter.log");
    let snap = Snapshotter::start_with_config(root, socket, log, &config);
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let before = proxy.requests().len();
    let s = rpull(&ctrd, &snap, &image);
    assert_eq!(s["layers_prepared"], 2, "{s}");
    let layers: Vec<String> = layout_manifest(&debian_layout(), "python")["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    let fetched: Vec<String> = proxy.requests()[before..]
        .iter()
        .filter(|r| layers.iter().any(|d| r.contains(d.as_str())))
        .cloned()
        .collect();
    assert!(fetched.is_empty(), "layers fetched again: {fetched:?}");
    let out = run_python(&ctrd, &snap, "default", &image, "shared", "print('shared')");
    assert_eq!(out, "shared", "{}", snap.log_text());
    // the CLI's store names the image for the snapshotter (kept from gc)
    let names = cli.json(&["images"]).to_string();
    assert!(names.contains("containerd-snapshotter/"), "{names}");
    // the image mount is taken down with the test (it is in the CLI's store)
    let mnt = snap.root.join("mnt");
    for e in std::fs::read_dir(&mnt).unwrap().flatten() {
        let _ = cli.run(&["umount", e.path().to_str().unwrap()]);
    }
}

/// Restarts around running containers: containerd killed (-9) and
/// restarted, then the snapshotter restarted while the registry is down.
/// The running container keeps running and reading, containerd and the
/// snapshotter come back at once (nothing is contacted at start), and new
/// containers start on what strata already holds.
#[test]
fn containerd_and_snapshotter_restarts_with_the_registry_down_keep_containers_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut snap = Snapshotter::start(dir.path());
    let mut ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let mut reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "debian:python", &[]);
    let image = format!("{}/debian:python", reg.addr);
    rpull(&ctrd, &snap, &image);
    let long = cid("restarts");
    ctrd.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "strata",
        &image,
        &long,
        "sleep",
        "300",
    ]);

    ctrd.kill_and_restart();
    let tasks = ctrd.ctr(&["task", "ls"]);
    assert!(
        tasks
            .lines()
            .any(|l| l.contains(&long) && l.contains("RUNNING")),
        "the container runs on after containerd's restart: {tasks}"
    );
    let out = ctrd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &long,
        "python3",
        "-c",
        "print(1 + 1)",
    ]);
    assert_eq!(out.trim(), "2");
    let out = run_python(
        &ctrd,
        &snap,
        "default",
        &image,
        "after-ctrd",
        "print('after containerd')",
    );
    assert_eq!(out, "after containerd");

    // the registry is gone; the snapshotter restarts at once and serves
    // what its store holds
    reg.stop();
    let t0 = Instant::now();
    snap.kill_and_restart();
    let ready = t0.elapsed();
    eprintln!("snapshotter ready {ready:?} after a restart with the registry down");
    assert!(ready < Duration::from_secs(5), "{ready:?}");
    let out = ctrd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e2",
        &long,
        "python3",
        "-c",
        "print(3 * 3)",
    ]);
    assert_eq!(out.trim(), "9");
    let out = run_python(
        &ctrd,
        &snap,
        "default",
        &image,
        "after-snap",
        "print('registry down')",
    );
    assert_eq!(out, "registry down");
    remove_container(&ctrd, "default", &long);
}

/// A zstd:chunked image whose top layer's TOC is not the one its
/// manifest names: rpull is refused naming the layer and the digest,
/// before anything is recorded; containerd and strata hold nothing.
#[test]
fn a_tampered_toc_is_refused_and_nothing_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let reg = Registry::start();
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", "-q", &src]);
    let out = conv.path("out");
    conv.ok(&["convert", &src, &format!("oci:{}:python", out.display())]);
    // the manifest claims another TOC for the top layer
    let index_path = out.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let mdesc = &mut index["manifests"][0];
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blob_path(&out, mdesc["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let top = manifest["layers"].as_array().unwrap().len() - 1;
    let key = "io.github.containers.zstd-chunked.manifest-checksum";
    let ann = &mut manifest["layers"][top]["annotations"];
    assert!(ann[key].is_string(), "{ann}");
    let wrong = strata_digest::Digest::sha256_of(b"another TOC").to_string();
    ann[key] = wrong.clone().into();
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let md = strata_digest::Digest::sha256_of(&mbytes).to_string();
    std::fs::write(blob_path(&out, &md), &mbytes).unwrap();
    mdesc["digest"] = md.into();
    mdesc["size"] = mbytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();
    reg.push(
        &format!("oci:{}:python", out.display()),
        "bad/py:1",
        &["--preserve-digests"],
    );

    let out = Env::new()
        .cmd()
        .args(["rpull", "--plain-http", "--address"])
        .arg(ctrd.socket())
        .arg(format!("{}/bad/py:1", reg.addr))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tampered TOC was accepted");
    assert!(
        err.contains("strata") && err.contains("cannot be served lazily") && err.contains(&wrong),
        "the error names strata, the reason and the claimed TOC: {err}"
    );
    assert_eq!(records(&snap.root), 0, "a snapshot was recorded");
    let snaps = ctrd.ctr(&["snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(snaps.lines().count(), 1, "{snaps}");
    let images = ctrd.ctr(&["images", "ls", "-q"]);
    assert!(images.trim().is_empty(), "{images}");
    let mnt = std::fs::read_dir(snap.root.join("mnt")).unwrap().count();
    assert_eq!(mnt, 0, "nothing mounted");

    // configured to fall back: the same image is pulled in full (its
    // layers checked against their diff_ids, the TOC unused), said so in
    // the log, and python runs
    let mut snap = snap;
    let config = dir.path().join("fallback.toml");
    std::fs::write(&config, "[snapshotter]\nlazy_fallback = \"pull\"\n").unwrap();
    let _ = snap.child.kill();
    let _ = snap.child.wait();
    snap.child = spawn_with(
        &snap.root,
        &snap.socket,
        &snap.log,
        config.to_str().unwrap(),
    );
    snap.wait_ready();
    // containerd dials the restarted snapshotter again within its backoff
    let image = format!("{}/bad/py:1", reg.addr);
    let t0 = Instant::now();
    loop {
        let out = Env::new()
            .cmd()
            .args(["rpull", "--plain-http", "--address"])
            .arg(ctrd.socket())
            .arg(&image)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            // containerd's transport to the old process, until it redials
            err.contains("connection") && t0.elapsed() < Duration::from_secs(30),
            "rpull with lazy_fallback = \"pull\": {err}\n{}",
            snap.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        snap.log_text()
            .contains("cannot be mounted lazily, pulling it in full"),
        "{}",
        snap.log_text()
    );
    assert_eq!(
        run_python(&ctrd, &snap, "default", &image, "fallback", "print(1)"),
        "1",
        "python on the image pulled in full"
    );
}

/// The same image rpulled into two namespaces and pulled the ordinary
/// way into a third: no "already exists", containers run in each, and
/// removing it from one namespace (containerd's gc, strata's Cleanup)
/// leaves the others running and starting.
#[test]
fn one_image_in_three_namespaces_remote_and_normal() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let reg = Registry::start();
    reg.push(&oci_ref(&debian_layout(), "python"), "debian:python", &[]);
    let image = format!("{}/debian:python", reg.addr);
    let rpull_ns = |ns: &str| {
        let out = Env::new()
            .cmd()
            .args(["--json", "rpull", "--plain-http", "-n", ns, "--address"])
            .arg(ctrd.socket())
            .arg(&image)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rpull -n {ns}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            snap.log_text()
        );
    };
    rpull_ns("one");
    rpull_ns("two");
    ctrd.ctr(&[
        "-n",
        "three",
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "strata",
        &image,
    ]);
    let long = cid("ns-two");
    ctrd.ctr(&[
        "-n",
        "two",
        "run",
        "-d",
        "--snapshotter",
        "strata",
        &image,
        &long,
        "sleep",
        "300",
    ]);
    for ns in ["one", "three"] {
        let code = format!("print('{ns}')");
        let out = run_python(&ctrd, &snap, ns, &image, &format!("ns-{ns}"), &code);
        assert_eq!(out, ns);
    }
    // each namespace lists its own chain
    for ns in ["one", "two", "three"] {
        let ls = ctrd.ctr(&["-n", ns, "snapshots", "--snapshotter", "strata", "ls"]);
        assert!(
            ls.lines().filter(|l| l.contains("Committed")).count() >= 2,
            "{ns}: {ls}"
        );
    }
    // gone from one: the others keep running and starting
    ctrd.ctr(&["-n", "one", "images", "rm", "--sync", &image]);
    let ls = ctrd.ctr(&["-n", "one", "snapshots", "--snapshotter", "strata", "ls"]);
    assert_eq!(ls.lines().count(), 1, "namespace one keeps nothing: {ls}");
    let out = ctrd.ctr(&[
        "-n",
        "two",
        "task",
        "exec",
        "--exec-id",
        "e1",
        &long,
        "python3",
        "-c",
        "print(5)",
    ]);
    assert_eq!(out.trim(), "5");
    let out = run_python(
        &ctrd,
        &snap,
        "two",
        &image,
        "ns-two-again",
        "print('two again')",
    );
    assert_eq!(out, "two again");
    remove_container(&ctrd, "two", &long);
}

/// A zstd:chunked image with the files python reads placed first
/// (`strata convert --prefetch-list`), through the snapshotter with
/// `prefetch = "list"`: the lazy mount fetches the list at once, python
/// runs in a container, and the rest of the image stays in the registry.
#[test]
fn an_image_with_its_list_placed_first_runs_with_prefetch_list() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", "-q", &src]);
    let list = conv.path("list");
    std::fs::write(
        &list,
        "/usr/bin/python3.11\n/usr/lib/python3.11/os.py\n/usr/lib/python3.11/encodings/__init__.py\n",
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
    reg.push(
        &format!("oci:{}:python", out.display()),
        "placed/py:1",
        &["--preserve-digests"],
    );
    let image = format!("{}/placed/py:1", reg.addr);

    let root = dir.path().join("snap-root");
    let socket = dir.path().join("strata.sock");
    let log = dir.path().join("snapshotter.log");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[snapshotter]\nprefetch = \"list\"\n").unwrap();
    let snap = Snapshotter::start_with_config(root, socket, log, &config);
    // the spare daemon dies before it is used: the mount gets a daemon
    // of its own
    let store = snap.root.join("store");
    let spare = wait_for(Duration::from_secs(30), || spares(&store).first().copied())
        .unwrap_or_else(|| panic!("no spare daemon started\n{}", snap.log_text()));
    let ok = Command::new("kill")
        .args(["-KILL", &spare.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill -KILL {spare}");
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    rpull(&ctrd, &snap, &image);
    let out = run_python(&ctrd, &snap, "default", &image, "placed", "print('placed')");
    assert_eq!(out, "placed");
    // the lazy mount's own log: the list came first. Its state file is
    // saved by the daemon's state thread every half second or so (later
    // on a loaded machine): waited for, not read once
    let listed = |m: &serde_json::Value| {
        let prefetch = m["prefetch"] == "list" || m["prefetch"] == "done";
        let mlog = std::fs::read_to_string(m["log"].as_str()?).ok()?;
        (prefetch && mlog.contains("prefetched ")).then_some(mlog)
    };
    let (mounts, mlog) = wait_for(Duration::from_secs(60), || {
        let mounts = snap.store_json("mounts");
        let mlog = listed(&mounts[0])?;
        Some((mounts, mlog))
    })
    .unwrap_or_else(|| {
        panic!(
            "the list's prefetch is neither under way nor done: {}",
            snap.store_json("mounts")
        )
    });
    let m = &mounts[0];
    assert_eq!(m["kind"], "lazy", "{mounts}");
    assert_ne!(m["pid"], spare, "{mounts}");
    // nothing more comes than the list
    assert_eq!(m["complete"], false, "{mounts}");
    let n: u64 = mlog
        .lines()
        .find_map(|l| {
            l.split("prefetched ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no list prefetch in the mount's log: {mlog}"));
    assert!(n >= 3, "{n} files of the list: {mlog}");
    let (fetched, size) = (
        m["bytes_fetched"].as_u64().unwrap(),
        m["image_bytes"].as_u64().unwrap(),
    );
    assert!(fetched * 4 < size, "the rest stays remote: {mounts}");
}

/// zstd:chunked in the old layout (Debian's skopeo writes it: no
/// tar-split, so no file can be checked against the tar): not served
/// lazily but pulled in full, said so in the log, and python runs.
#[test]
fn an_image_that_cannot_be_lazy_is_pulled_in_full_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshotter::start(dir.path());
    let ctrd = Containerd::start_with(&proxy_config(&snap.socket));
    let reg = Registry::start();
    // through a private layout: pushing straight to a registry, skopeo
    // would substitute the gzip blobs it remembers
    let old = dir.path().join("old");
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--dest-compress-format",
        "zstd:chunked",
        &oci_ref(&debian_layout(), "python"),
        &format!("oci:{}:py", old.display()),
    ]));
    let m = layout_manifest(&old, "py");
    assert!(
        m["layers"][0]["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string(),
        "skopeo wrote the old layout: {m}"
    );
    reg.push(
        &format!("oci:{}:py", old.display()),
        "old/py:1",
        &["--preserve-digests"],
    );
    let image = format!("{}/old/py:1", reg.addr);
    let s = rpull(&ctrd, &snap, &image);
    assert_eq!(s["layers_prepared"], 2, "{s}");
    let log = snap.log_text();
    assert!(
        log.contains("is not served lazily, pulling it in full")
            && log.contains("old zstd:chunked"),
        "{log}"
    );
    let images = snap.store_json("images");
    assert_eq!(images.as_array().map(|a| a.len()), Some(1), "{images}");
    let out = run_python(
        &ctrd,
        &snap,
        "default",
        &image,
        "old",
        "print('old layout')",
    );
    assert_eq!(out, "old layout");
}

/// The lazy mount daemon the snapshotter starts ahead (`strata spare`):
/// handed a command line other than a lazy mount's, it refuses it and
/// says why; handed a lazy mount whose registry is gone, it fails as a
/// daemon started with it would, its stderr in the log it was handed; and
/// when its parent goes away before any work, it ends.
#[test]
fn a_spare_daemon_runs_only_a_lazy_mount_and_ends_with_its_parent() {
    use strata_sys::daemon::{DaemonError, Said, spawn_spare, wait_gone};
    let dir = tempfile::tempdir().unwrap();
    let exe = env!("CARGO_BIN_EXE_strata");
    let root = dir.path().join("store");
    let spare = || {
        let mut c = Command::new(exe);
        c.arg("--root")
            .arg(&root)
            .args(["--quiet", "spare", "--prefault-mib", "4"]);
        spawn_spare("spare", c, &dir.path().join("spare.log")).unwrap()
    };
    let work = |args: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v = vec![exe.into(), "--root".into(), root.clone().into_os_string()];
        v.extend(args.iter().map(Into::into));
        v
    };

    let log = dir.path().join("work.log");
    let mut d = spare().start(&work(&["images"]), &log).unwrap();
    match d.said() {
        Err(DaemonError::Failed { error, .. }) => assert!(
            error.contains("a spare runs `strata mount --lazy --foreground` only"),
            "{error}"
        ),
        other => panic!("a spare ran `strata images`: {other:?}"),
    }

    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let mount = [
        "--quiet",
        "mount",
        "--lazy=require",
        "--foreground",
        "--plain-http",
        "127.0.0.1:1/gone/py:1",
        target.to_str().unwrap(),
    ];
    let log = dir.path().join("mount.log");
    let mut d = spare().start(&work(&mount), &log).unwrap();
    let e = loop {
        match d.said() {
            Ok(Said::Stage(_)) => {}
            Ok(Said::Ready(r)) => panic!("mounted from a registry that is gone: {r}"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(e.contains("127.0.0.1:1"), "{e}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("127.0.0.1:1"),
        "its stderr goes to the log it was handed: {logged}"
    );

    let s = spare();
    let pid = s.pid();
    drop(s);
    assert!(
        wait_gone(pid, Duration::from_secs(10)),
        "a spare whose parent dropped it still runs"
    );
}
