//! composefs EROFS images end to end: pull builds them, `strata mount`
//! mounts them with one overlay mount, the mounted tree equals `strata
//! export` (itself checked against umoci), `verify` and `fsck` catch
//! tampering, `export --erofs` is mountable on its own, and hybrid (split)
//! mounts equal flattened ones. Real kernel mounts; run as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A mount that is undone even when an assertion fails.
struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn mount(env: &Env, image: &str, name: &str, extra: &[&str]) -> Mounted {
    let dir = env.path(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec!["mount", image, dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    env.ok(&args);
    Mounted { dir }
}

fn mountinfo() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

/// Mounted trees report directory link counts and inode numbers the
/// overlay way; everything else must match exactly.
const MOUNTED: Compare = Compare::ALL;

fn assert_same_tree(a: &Path, b: &Path, what: &str) {
    let diffs = compare_trees(a, b, MOUNTED);
    assert!(diffs.is_empty(), "{what}:\n{}", diffs.join("\n"));
}

fn tree_info(env: &Env, image: &str) -> serde_json::Value {
    let v = env.json(&["inspect", image]);
    let t = v["tree"].clone();
    assert!(t.is_object(), "inspect shows no tree for {image}: {v}");
    t
}

#[test]
fn synthetic_images_mount_as_exported() {
    require_tool("fsck.erofs", "erofs-utils");
    require_tool("fsverity", "fsverity");
    let env = Env::new();
    let layout = synth_layout();
    for tag in [
        "gnu",
        "python",
        "bsdtar",
        "mixed",
        "gnu-old-nosparse",
        "gnu-old",
        "gnu-zstd",
    ] {
        let out = env.ok(&["pull", &oci_ref(&layout, tag)]);
        assert!(
            out.contains("tree sha256:"),
            "pull prints the tree digest: {out}"
        );
        // umoci cannot read zstd: its gzip twin has the same tree.
        let umoci_tag = tag.trim_end_matches("-zstd");
        let image = oci_ref(&layout, tag);
        let export = if tag == "gnu-old" {
            // umoci rejects old GNU sparse entries; the export itself is
            // checked against GNU tar in tests/layers.rs.
            let p = env.path("export-gnu-old");
            env.ok(&["export", &image, p.to_str().unwrap()]);
            p
        } else {
            env.assert_export_matches_umoci(&layout, umoci_tag, &image)
        };
        let t = tree_info(&env, &image);
        assert_eq!(t["format"], "composefs-v1");
        let before = mountinfo();
        let m = mount(&env, &image, &format!("mnt-{tag}"), &[]);
        let after = mountinfo();
        // (tests running beside this one mount too: only this mount point)
        let at = format!(" {} ", m.dir.display());
        let new: Vec<&String> = after
            .iter()
            .filter(|l| !before.contains(l) && l.contains(&at))
            .collect();
        assert_eq!(new.len(), 1, "one new mount for {tag}, got {new:#?}");
        assert!(
            new[0].contains(" - overlay strata:sha256:"),
            "an overlay with strata's source: {}",
            new[0]
        );
        let ours = env.path("").display().to_string();
        assert!(
            !after
                .iter()
                .any(|l| l.contains(" - erofs ") && !before.contains(l) && l.contains(&ours)),
            "no EROFS mount of this test's in the namespace"
        );
        assert_same_tree(&m.dir, &export, &format!("mount of {tag} vs strata export"));
        // The EROFS image itself passes erofs-utils' checker.
        let store_img = env
            .root()
            .join("images")
            .join(
                env.json(&["inspect", &image])["manifest_digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            )
            .join("image.erofs");
        let fsck = Command::new("fsck.erofs").arg(&store_img).output().unwrap();
        assert!(
            fsck.status.success(),
            "fsck.erofs {}: {}",
            store_img.display(),
            String::from_utf8_lossy(&fsck.stderr)
        );
        // The composefs id is the image's fs-verity digest, printed as
        // composefs prints it: bare lowercase hex, no `sha256:`.
        let tool = Command::new("fsverity")
            .arg("digest")
            .arg(&store_img)
            .output()
            .unwrap();
        assert!(
            tool.status.success(),
            "fsverity digest {}",
            store_img.display()
        );
        let tool = String::from_utf8(tool.stdout).unwrap();
        let want = tool
            .split_whitespace()
            .next()
            .and_then(|d| d.strip_prefix("sha256:"))
            .unwrap();
        assert_eq!(t["composefs_id"], want, "composefs id of {tag}");
        env.ok(&["verify", &image]);
        drop(m);
    }
    env.fsck_ok();
}

#[test]
fn same_tree_same_digest_whatever_the_compression() {
    let env = Env::new();
    let layout = synth_layout();
    let mut digests = Vec::new();
    for tag in ["gnu", "gnu-zstd", "gnu-tar"] {
        env.ok(&["pull", &oci_ref(&layout, tag)]);
        digests.push(tree_info(&env, &oci_ref(&layout, tag))["tree_digest"].clone());
    }
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    // Different trees, different digests.
    env.ok(&["pull", &oci_ref(&layout, "python")]);
    let other = tree_info(&env, &oci_ref(&layout, "python"))["tree_digest"].clone();
    assert_ne!(other, digests[0]);
}

#[test]
fn debian_python_runs_from_the_mount() {
    let env = Env::new();
    let layout = debian_layout();
    let image = oci_ref(&layout, "python");
    env.ok(&["pull", &image]);
    let export = env.path("export");
    env.ok(&["export", &image, export.to_str().unwrap()]);
    let m = mount(&env, &image, "mnt", &[]);
    assert_same_tree(&m.dir, &export, "debian+python mount vs export");
    let out = Command::new("chroot")
        .arg(&m.dir)
        .args(["/usr/bin/python3", "-c", "print(42)"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn rw_mount_keeps_changes_in_the_upper_dir() {
    let env = Env::new();
    let image = oci_ref(&synth_layout(), "gnu");
    env.ok(&["pull", &image]);
    let upper = env.path("upper");
    let original;
    {
        let m = mount(&env, &image, "mnt", &["--upper", upper.to_str().unwrap()]);
        original = std::fs::read_to_string(m.dir.join("etc/hostname")).unwrap();
        std::fs::write(m.dir.join("etc/hostname"), "written-in-upper\n").unwrap();
        std::fs::write(m.dir.join("new-file"), "new\n").unwrap();
        env.ok(&["umount", m.dir.to_str().unwrap()]);
    }
    assert_eq!(
        std::fs::read_to_string(upper.join("upper/new-file")).unwrap(),
        "new\n"
    );
    assert_eq!(
        std::fs::read_to_string(upper.join("upper/etc/hostname")).unwrap(),
        "written-in-upper\n"
    );
    // The store is untouched: verify re-hashes every object.
    env.ok(&["verify", &image]);
    let m = mount(&env, &image, "mnt2", &[]);
    assert_eq!(
        std::fs::read_to_string(m.dir.join("etc/hostname")).unwrap(),
        original
    );
    assert_ne!(original, "written-in-upper\n");
}

#[test]
fn mount_errors_are_clear() {
    let env = Env::new();
    let image = oci_ref(&synth_layout(), "gnu");
    env.ok(&["pull", &image]);
    let dir = env.path("mnt");
    std::fs::create_dir(&dir).unwrap();
    let d = dir.to_str().unwrap();

    let e = env.fails(&["mount", "no-such-image", d]);
    assert!(e.contains("not found"), "{e}");

    let m = mount(&env, &image, "mnt", &[]);
    let e = env.fails(&["mount", &image, d]);
    assert!(e.contains("already a mount point"), "{e}");

    let f = std::fs::File::open(m.dir.join("etc/hostname")).unwrap();
    let e = env.fails(&["umount", d]);
    assert!(e.contains("busy"), "{e}");
    drop(f);
    env.ok(&["umount", d]);
    let e = env.fails(&["umount", d]);
    assert!(e.contains("not a mount point"), "{e}");

    // This kernel has no fs-verity: --verity must refuse, saying why.
    let e = env.fails(&["mount", "--verity", &image, d]);
    assert!(e.contains("fs-verity"), "{e}");
    assert!(
        !mountinfo().iter().any(|l| l.contains(&format!(" {d} "))),
        "nothing mounted after a refusal"
    );
    drop(m);
    env.fsck_ok();
}

#[test]
fn verify_and_fsck_name_tampered_objects() {
    let env = Env::new();
    let image = oci_ref(&synth_layout(), "gnu");
    env.ok(&["pull", &image]);
    env.ok(&["verify", &image]);
    // Alter one object and delete another behind strata's back.
    let mut objs: Vec<PathBuf> = walk_files(&env.root().join("objects"));
    objs.sort();
    let (altered, deleted) = (&objs[0], &objs[1]);
    let mut perms = std::fs::metadata(altered).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(altered, perms).unwrap();
    let mut bytes = std::fs::read(altered).unwrap();
    bytes.push(b'!');
    std::fs::write(altered, bytes).unwrap();
    std::fs::remove_file(deleted).unwrap();
    let name = |p: &Path| {
        let fan = p
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        format!("sha256:{fan}{}", p.file_name().unwrap().to_string_lossy())
    };
    let out = env.run(&["verify", &image]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("object {}: content hashes to", name(altered))),
        "{text}"
    );
    assert!(
        text.contains(&format!("object {}: missing", name(deleted))),
        "{text}"
    );
    let out = env.run(&["fsck"]);
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&name(altered)), "{text}");
    assert!(text.contains("missing objects"), "{text}");
}

#[test]
fn verify_catches_an_altered_erofs_image() {
    let env = Env::new();
    let image = oci_ref(&synth_layout(), "gnu");
    env.ok(&["pull", &image]);
    let digest = env.json(&["inspect", &image])["manifest_digest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = env
        .root()
        .join("images")
        .join(digest.trim_start_matches("sha256:"))
        .join("image.erofs");
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&p, b).unwrap();
    let out = env.run(&["verify", &image]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("image.erofs: hashes to"));
    assert!(!env.run(&["fsck"]).status.success());
}

fn walk_files(d: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn export_erofs_mounts_without_the_store() {
    require_tool("fsck.erofs", "erofs-utils");
    let env = Env::new();
    for tag in ["gnu", "mixed"] {
        let image = oci_ref(&synth_layout(), tag);
        env.ok(&["pull", &image]);
        let export = env.path(&format!("export-{tag}"));
        env.ok(&["export", &image, export.to_str().unwrap()]);
        let file = env.path(&format!("{tag}.erofs"));
        env.ok(&["export", &image, "--erofs", file.to_str().unwrap()]);
        let fsck = Command::new("fsck.erofs").arg(&file).output().unwrap();
        assert!(
            fsck.status.success(),
            "fsck.erofs: {}",
            String::from_utf8_lossy(&fsck.stderr)
        );
        let dir = env.path(&format!("vm-{tag}"));
        std::fs::create_dir(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "erofs", "-o", "ro"])
            .arg(&file)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t erofs {}", file.display());
        let _m = Mounted { dir: dir.clone() };
        assert_same_tree(&dir, &export, &format!("export --erofs of {tag} vs export"));
    }
    // The store is not needed to read it: the file holds the contents.
    let digest_free = env.path("gnu.erofs");
    assert!(std::fs::metadata(&digest_free).unwrap().len() > 4096 * 4);
}

#[test]
fn a_name_erofs_cannot_hold_is_a_clear_error() {
    let env = Env::new();
    let image = oci_ref(&bad_layout(), "name-too-long");
    let out = env.run(&["pull", &image]);
    assert!(out.status.success(), "the image is valid OCI and is kept");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be mounted") && err.contains("longer than 255"),
        "{err}"
    );
    let dir = env.path("mnt");
    std::fs::create_dir(&dir).unwrap();
    let e = env.fails(&["mount", &image, dir.to_str().unwrap()]);
    assert!(e.contains("longer than 255"), "{e}");
    // Other views of the image still work: a tar can hold the name.
    env.ok(&[
        "export",
        &image,
        "--tar",
        env.path("x.tar").to_str().unwrap(),
    ]);
    env.fsck_ok();
}

#[test]
fn hybrid_mounts_equal_flattened_mounts() {
    let flat = Env::new();
    let hybrid = Env::new();
    let layout = synth_layout();
    let debian = debian_layout();
    let cases = [
        (&layout, "gnu"),
        (&layout, "python"),
        (&layout, "mixed"),
        (&debian, "python"),
    ];
    for (l, tag) in cases {
        let image = oci_ref(l, tag);
        flat.ok(&["pull", "--split-base", "never", &image]);
        hybrid.ok(&["pull", "--split-base", "always", &image]);
        let tf = tree_info(&flat, &image);
        let th = tree_info(&hybrid, &image);
        assert!(tf.get("parts").is_none());
        assert!(
            th["parts"]["base"]["digest"].is_string(),
            "hybrid has parts: {th}"
        );
        assert_eq!(
            tf["tree_digest"], th["tree_digest"],
            "one digest whether split or not"
        );
        let mf = mount(&flat, &image, &format!("mf-{tag}"), &[]);
        let before = mountinfo();
        let mh = mount(&hybrid, &image, &format!("mh-{tag}"), &[]);
        // this store's and mount point's only: tests running alongside
        // mount too
        let ours = hybrid.dir.path().to_str().unwrap();
        let new = mountinfo()
            .into_iter()
            .filter(|l| !before.contains(l) && l.contains(ours))
            .count();
        assert_eq!(new, 1, "a hybrid image is one overlay mount too");
        let diffs = compare_trees(&mh.dir, &mf.dir, MOUNTED);
        // Overlayfs reports nlink 1 for directories merged from two layers.
        let diffs: Vec<_> = diffs.into_iter().filter(|d| !d.contains("nlink")).collect();
        assert!(
            diffs.is_empty(),
            "hybrid vs flat mount of {tag}:\n{}",
            diffs.join("\n")
        );
        hybrid.ok(&["verify", &image]);
    }
    hybrid.fsck_ok();
}

#[test]
fn auto_split_moves_earlier_sharers_onto_the_shared_base() {
    let env = Env::new();
    let apps = apps_layout();
    let python = oci_ref(&debian_layout(), "python");
    let (a0, a1) = (oci_ref(&apps, "app-0"), oci_ref(&apps, "app-1"));
    env.ok(&["pull", &python]);
    env.ok(&["pull", &a0]);
    // Two images share the base layer: under the default threshold (3)
    // both stay flattened.
    for i in [&python, &a0] {
        assert!(tree_info(&env, i).get("parts").is_none(), "{i} split early");
    }
    let flat_digest = tree_info(&env, &python)["tree_digest"].clone();
    env.ok(&["pull", &a1]);
    let bases: Vec<_> = [&python, &a0, &a1]
        .iter()
        .map(|i| {
            let t = tree_info(&env, i);
            assert!(
                t["parts"]["base"]["digest"].is_string(),
                "{i} not split: {t}"
            );
            t["parts"]["base"]["digest"].clone()
        })
        .collect();
    assert!(
        bases.windows(2).all(|w| w[0] == w[1]),
        "one base: {bases:?}"
    );
    assert_eq!(
        tree_info(&env, &python)["tree_digest"],
        flat_digest,
        "re-splitting keeps the image's one digest"
    );
    // The re-split image still mounts and runs.
    let m = mount(&env, &python, "mnt", &[]);
    let out = Command::new("chroot")
        .arg(&m.dir)
        .args(["/usr/bin/python3", "-c", "print(6*7)"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n", "{out:?}");
    let m1 = mount(&env, &a1, "mnt1", &[]);
    assert_eq!(
        std::fs::read_to_string(m1.dir.join("etc/hostname")).unwrap(),
        "app-1\n"
    );
    assert!(
        !m1.dir.join("etc/motd").exists(),
        "the app layer's whiteout hides motd"
    );
    assert!(m.dir.join("etc/motd").exists());
    drop((m, m1));
    env.ok(&["verify", &python]);
    env.fsck_ok();
}
