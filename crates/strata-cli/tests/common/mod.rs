//! Helpers for the CLI end-to-end tests: run the real `strata` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use strata_testkit::*;

/// A store in a temp dir plus a way to run `strata` against it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--root").arg(self.root());
        c.env_remove("STRATA_ROOT");
        c
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "strata {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running strata")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("strata {args:?} printed non-JSON ({e}): {s}"))
    }

    /// `strata fsck` must pass.
    pub fn fsck_ok(&self) {
        let out = self.run(&["fsck"]);
        assert!(
            out.status.success(),
            "fsck found problems:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Export an image and compare it with `umoci unpack` of the same layout tag.
    pub fn assert_export_matches_umoci(&self, layout: &Path, tag: &str, image: &str) -> PathBuf {
        let name: String = image
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let ours = self.path(&format!("export-{name}"));
        self.ok(&["export", image, ours.to_str().unwrap()]);
        let theirs = umoci_unpack(layout, tag, &self.path(&format!("umoci-{name}")));
        let diffs = compare_trees(&ours, &theirs, Compare::ALL);
        assert!(
            diffs.is_empty(),
            "strata export of {image} differs from umoci unpack of {}:{tag}:\n{}",
            layout.display(),
            diffs.join("\n")
        );
        ours
    }
}

/// The repository's sample image layout.
pub fn sample_layout() -> PathBuf {
    repo_root().join("samples/hello")
}

/// The fixture layouts built by scripts/fixtures.sh.
pub fn synth_layout() -> PathBuf {
    fixtures_dir().join("synth")
}
pub fn bad_layout() -> PathBuf {
    fixtures_dir().join("bad")
}
pub fn debian_layout() -> PathBuf {
    fixtures_dir().join("debian")
}
/// app-0..app-149: debian's base layer plus a small app layer each.
pub fn apps_layout() -> PathBuf {
    fixtures_dir().join("apps")
}

/// `oci:LAYOUT:TAG`.
pub fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

/// The manifest digest (`sha256:...`) of a layout tag.
pub fn layout_manifest_digest(layout: &Path, tag: &str) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    m["digest"].as_str().unwrap().to_string()
}

/// The manifest JSON of a layout tag.
pub fn layout_manifest(layout: &Path, tag: &str) -> serde_json::Value {
    let d = layout_manifest_digest(layout, tag);
    serde_json::from_slice(&std::fs::read(blob_path(layout, &d)).unwrap()).unwrap()
}

pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Every layer of every image in the store rebuilds to its diff_id.
pub fn assert_layers_rebuild(root: &Path) {
    let store = strata_store::Store::open(root).unwrap();
    let mut n = 0;
    for img in store.image_digests().unwrap() {
        for l in store.image_meta(&img).unwrap().layers {
            let mut h = strata_digest::Hasher::new();
            store.rebuild_layer(&l.diff_id, &mut h).unwrap();
            assert_eq!(
                h.finish(),
                l.diff_id,
                "layer {} does not rebuild exactly",
                l.diff_id
            );
            n += 1;
        }
    }
    assert!(n > 0, "no layers checked");
}

/// Extract a tar with GNU tar (xattrs, numeric owners, permissions) into a
/// new directory `dir`; returns `dir`.
pub fn gnu_untar(tarfile: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir(dir).unwrap();
    run(Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(tarfile)
        .arg("-C")
        .arg(dir));
    dir.to_path_buf()
}

/// The blob range `[offset, endOffset)` of file `name` in a zstd:chunked
/// layer, read from the TOC its manifest annotation points at.
pub fn toc_file_range(blob: &[u8], layer: &serde_json::Value, name: &str) -> (u64, u64) {
    let pos: Vec<u64> = layer["annotations"]["io.github.containers.zstd-chunked.manifest-position"]
        .as_str()
        .expect("a zstd:chunked layer")
        .split(':')
        .map(|n| n.parse().unwrap())
        .collect();
    let toc: serde_json::Value = serde_json::from_slice(
        &zstd::stream::decode_all(&blob[pos[0] as usize..(pos[0] + pos[1]) as usize]).unwrap(),
    )
    .unwrap();
    let e = toc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the TOC"));
    (
        e["offset"].as_u64().unwrap(),
        e["endOffset"].as_u64().unwrap(),
    )
}

/// The debian fixture's python image converted to zstd:chunked and pushed
/// to `reg` as `repo_tag`; its `docker://` reference.
pub fn chunked_python(reg: &Registry, repo_tag: &str) -> String {
    let conv = Env::new();
    let src = oci_ref(&debian_layout(), "python");
    conv.ok(&["pull", "-q", &src]);
    let out = conv.path("out");
    conv.ok(&["convert", &src, &format!("oci:{}:python", out.display())]);
    reg.push(
        &format!("oci:{}:python", out.display()),
        repo_tag,
        &["--preserve-digests"],
    );
    format!("docker://{}/{repo_tag}", reg.addr)
}

/// A lazy mount made with `strata mount --lazy --plain-http --prefetch
/// none REF DIR`; undone (through strata, then by force) when dropped.
pub struct LazyMount<'a> {
    env: &'a Env,
    /// The mount point.
    pub dir: PathBuf,
    /// What `strata --json mount` printed.
    pub report: serde_json::Value,
}

impl<'a> LazyMount<'a> {
    pub fn new(env: &'a Env, reference: &str, dir: PathBuf) -> LazyMount<'a> {
        std::fs::create_dir_all(&dir).unwrap();
        let report = env.json(&[
            "mount",
            "--lazy",
            "--plain-http",
            "--prefetch",
            "none",
            reference,
            dir.to_str().unwrap(),
        ]);
        assert_eq!(report["mode"], "lazy", "{report}");
        LazyMount { env, dir, report }
    }
}

impl Drop for LazyMount<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["umount", self.dir.to_str().unwrap()]);
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `chroot DIR python3 -c CODE`: its stdout, trimmed (a failure shows
/// its stderr).
pub fn chroot_python(dir: &Path, code: &str) -> String {
    let out = std::process::Command::new("chroot")
        .arg(dir)
        .args(["python3", "-c", code])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// GET `path` from `addr` with plain HTTP: body and status line.
pub fn http_get(addr: &str, path: &str) -> (Vec<u8>, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/vnd.oci.image.manifest.v1+json\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..at]).to_string();
    (buf[at + 4..].to_vec(), head)
}

/// The artifact at `repo:tag`: its manifest and its pack index.
pub fn artifact(reg: &Registry, repo: &str, tag: &str) -> (serde_json::Value, serde_json::Value) {
    let (body, head) = http_get(&reg.addr, &format!("/v2/{repo}/manifests/{tag}"));
    assert!(head.contains(" 200 "), "{head}");
    let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let index = m["layers"][0]["digest"].as_str().unwrap();
    let bytes = std::fs::read(reg.blob_path(&index[7..])).unwrap();
    (m, serde_json::from_slice(&bytes).unwrap())
}

/// Pack digests a manifest lists.
pub fn packs_of(m: &serde_json::Value) -> Vec<String> {
    m["layers"].as_array().unwrap()[1..]
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], "application/vnd.strata.rootfs.pack.v1");
            l["digest"].as_str().unwrap().to_string()
        })
        .collect()
}

/// A template artifact's pack index as `(chunk, pack digest, offset, len)`.
pub fn index_entries(reg: &Registry, repo: &str, tag: &str) -> Vec<(String, String, u64, u64)> {
    let (m, index) = artifact(reg, repo, tag);
    let packs = packs_of(&m);
    index["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e[0].as_str().unwrap().to_string(),
                packs[e[1].as_u64().unwrap() as usize].clone(),
                e[2].as_u64().unwrap(),
                e[3].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A served file, unmounted (through strata) even when an assertion fails.
pub struct Served<'a> {
    pub env: &'a Env,
    pub file: PathBuf,
}

impl<'a> Served<'a> {
    pub fn new(env: &'a Env, name: &str, file: &str, extra: &[&str]) -> Served<'a> {
        let file = env.path(file);
        let mut args = vec!["rootfs", "serve", name, file.to_str().unwrap()];
        args.extend_from_slice(extra);
        env.ok(&args);
        Served { env, file }
    }

    pub fn path(&self) -> &str {
        self.file.to_str().unwrap()
    }

    /// This file's entry in `strata --json mounts`, once the daemon's
    /// numbers have settled (they are written every 250 ms).
    pub fn state(&self) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        for _ in 0..20 {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let all = self.env.json(&["mounts"]);
            let me = all
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["kind"] == "rootfs" && m["file"] == self.path())
                .unwrap_or_else(|| panic!("{} not in `strata mounts`: {all}", self.path()))
                .clone();
            if me == last {
                return me;
            }
            last = me;
        }
        last
    }
}

impl Drop for Served<'_> {
    fn drop(&mut self) {
        let _ = self.env.run(&["umount", self.path()]);
    }
}

/// Per range GET of a pack the proxy saw (from `skip` on), the chunks of
/// `index` it covered: whole chunks only, or the test fails.
pub fn range_chunks(
    proxy: &strata_testkit::proxy::Proxy,
    skip: usize,
    index: &[(String, String, u64, u64)],
) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for r in proxy.requests().iter().skip(skip) {
        let Some(rest) = r.strip_prefix("GET ") else {
            continue;
        };
        let path = rest.split(' ').next().unwrap();
        let Some((_, blob)) = path.split_once("/blobs/") else {
            continue;
        };
        if !index.iter().any(|e| e.1 == blob) {
            continue; // the map or the index
        }
        let range = rest
            .split(' ')
            .find_map(|w| w.strip_prefix("range=bytes="))
            .unwrap_or_else(|| panic!("a pack read without a range: {r}"));
        let (a, b) = range.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        let covered: Vec<String> = index
            .iter()
            .filter(|(_, p, o, l)| p == blob && *o >= a && o + l - 1 <= b)
            .map(|e| e.0.clone())
            .collect();
        let bytes: u64 = index
            .iter()
            .filter(|e| covered.contains(&e.0))
            .map(|e| e.3)
            .sum();
        assert_eq!(bytes, b - a + 1, "{r} is not whole chunks");
        out.push(covered);
    }
    out
}

/// The python image built as a template of `size` named `name`.
pub fn python_template(env: &Env, name: &str, size: &str) {
    require_tool("mke2fs", "e2fsprogs");
    let r = oci_ref(&debian_layout(), "python");
    env.ok(&["pull", "-q", &r]);
    env.ok(&[
        "rootfs", "build", "--from", &r, "--size", size, "--name", name,
    ]);
}

/// Indexes of the 64 KiB chunks holding the data blocks of `files` in
/// the raw ext4 image `raw`, by debugfs (independent of strata).
pub fn data_chunks(raw: &Path, files: &[String]) -> std::collections::BTreeSet<u64> {
    require_tool("debugfs", "e2fsprogs");
    let mut set = std::collections::BTreeSet::new();
    for f in files {
        let out = run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("blocks {f}"))
            .arg(raw)
            .stderr(std::process::Stdio::null()));
        for b in out.split_whitespace() {
            let b: u64 = b
                .parse()
                .unwrap_or_else(|_| panic!("debugfs blocks {f}: {out}"));
            set.insert(b * 4096 / 65536);
        }
    }
    set
}

/// Chunk digests by index, from a template's map in `env`'s store.
pub fn map_chunks(env: &Env, id: &str) -> std::collections::BTreeMap<u64, String> {
    let hex = id.trim_start_matches("sha256:");
    let bytes = std::fs::read(env.root().join("blocks/maps").join(hex)).unwrap();
    let map: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for e in map["extents"].as_array().unwrap() {
        let first = e["chunk"].as_u64().unwrap();
        for (k, d) in e["digests"].as_array().unwrap().iter().enumerate() {
            out.insert(first + k as u64, d.as_str().unwrap().to_string());
        }
    }
    out
}

/// Flip a byte of chunk `chunk` (`at` bytes into it) where `index` (see
/// [`index_entries`]) puts it in its pack, in the registry's storage.
pub fn tamper_chunk_in_pack(
    reg: &Registry,
    index: &[(String, String, u64, u64)],
    chunk: &str,
    at: u64,
) {
    let (_, pack, offset, _) = index.iter().find(|e| e.0 == chunk).unwrap().clone();
    let blob = reg.blob_path(&pack[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[(offset + at) as usize] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
}

/// Whether `env`'s store holds object `d` (`sha256:...`).
pub fn object_exists(env: &Env, d: &str) -> bool {
    env.root()
        .join("objects")
        .join(&d[7..9])
        .join(&d[9..])
        .exists()
}

/// The sample image pulled into `env` and built as a 64 MiB template `t`;
/// returns the image reference.
pub fn sample_template(env: &Env) -> String {
    require_tool("mke2fs", "e2fsprogs");
    let img = oci_ref(&sample_layout(), "latest");
    env.ok(&["pull", "-q", &img]);
    env.ok(&[
        "rootfs", "build", "--from", &img, "--size", "64MiB", "--name", "t",
    ]);
    img
}
