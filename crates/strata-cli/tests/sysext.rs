//! Packaging: `contrib/sysext/build.sh` makes a systemd-sysext image of
//! strata (an EROFS file written by strata itself) that the kernel mounts
//! and that holds exactly the binary, the unit, the containerd drop-in and
//! the extension-release file, root-owned with their modes; containerd 1.6
//! takes the drop-in through `imports`. Real loop mounts; run as root.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The read-only loop mount of an EROFS file, undone even when an
/// assertion fails.
struct ErofsMount {
    dir: PathBuf,
}

impl ErofsMount {
    fn new(file: &Path, dir: PathBuf) -> ErofsMount {
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "erofs", "-o", "loop,ro"])
            .arg(file)
            .arg(&dir)
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "mount -t erofs -o loop,ro {} failed ({}): {}\n\
             the kernel needs EROFS (CONFIG_EROFS_FS, `modprobe erofs`) and loop devices, and this test root",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        ErofsMount { dir }
    }
}

impl Drop for ErofsMount {
    fn drop(&mut self) {
        let done = Command::new("umount")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !done {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Run the builder with this test's strata, in `dir`, with no argument:
/// it writes `dir/strata.raw`.
fn build_sysext(dir: &Path) -> PathBuf {
    require_tool("python3", "python3");
    require_tool("strip", "binutils");
    run(Command::new("bash")
        .arg(repo_root().join("contrib/sysext/build.sh"))
        .current_dir(dir)
        .env("STRATA", env!("CARGO_BIN_EXE_strata"))
        .env("TMPDIR", dir)
        .env_remove("STRATA_ROOT")
        .env_remove("SOURCE_DATE_EPOCH"));
    let raw = dir.join("strata.raw");
    assert!(raw.is_file(), "build.sh wrote no {}", raw.display());
    raw
}

#[test]
fn the_sysext_image_holds_exactly_strata_its_unit_and_the_containerd_drop_in() {
    let env = Env::new();
    let raw = build_sysext(env.dir.path());
    let leftovers: Vec<_> = std::fs::read_dir(env.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "strata.raw")
        .collect();
    assert!(leftovers.is_empty(), "build.sh left {leftovers:?} behind");

    let mnt = ErofsMount::new(&raw, env.path("mnt"));
    let tree = scan_tree(&mnt.dir);
    let found: BTreeMap<String, (bool, u32, u32, u32)> = tree
        .iter()
        .map(|(path, st)| {
            (
                String::from_utf8_lossy(path).into_owned(),
                (st.kind == "dir", st.mode, st.uid, st.gid),
            )
        })
        .collect();
    let dir = |p: &str| (p.to_string(), (true, 0o755, 0, 0));
    let file = |p: &str, mode| (p.to_string(), (false, mode, 0, 0));
    let expected: BTreeMap<String, (bool, u32, u32, u32)> = [
        dir(""),
        dir("usr"),
        dir("usr/bin"),
        file("usr/bin/strata", 0o755),
        dir("usr/lib"),
        dir("usr/lib/extension-release.d"),
        file(
            "usr/lib/extension-release.d/extension-release.strata",
            0o644,
        ),
        dir("usr/lib/systemd"),
        dir("usr/lib/systemd/system"),
        file("usr/lib/systemd/system/strata-snapshotter.service", 0o644),
        dir("usr/share"),
        dir("usr/share/strata"),
        file("usr/share/strata/containerd-strata.toml", 0o644),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        found, expected,
        "the sysext's paths as (is_dir, mode, uid, gid)"
    );
    for (path, st) in &tree {
        assert!(
            st.kind == "dir" || st.kind.starts_with("file "),
            "{}: {}",
            String::from_utf8_lossy(path),
            st.kind
        );
    }

    let read = |p: &str| std::fs::read_to_string(mnt.dir.join(p)).unwrap();
    let release = read("usr/lib/extension-release.d/extension-release.strata");
    let keys: Vec<&str> = release.lines().collect();
    assert!(keys.contains(&"ID=_any"), "extension-release:\n{release}");
    assert!(
        keys.contains(&"EXTENSION_RELOAD_MANAGER=1"),
        "extension-release:\n{release}"
    );

    let unit = read("usr/lib/systemd/system/strata-snapshotter.service");
    for line in [
        "ExecStart=/usr/bin/strata snapshotter",
        "Type=notify",
        "KillMode=process",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line} in:\n{unit}");
    }
    assert_eq!(
        read("usr/share/strata/containerd-strata.toml"),
        std::fs::read_to_string(repo_root().join("contrib/containerd/strata.toml")).unwrap(),
        "the drop-in is contrib/containerd/strata.toml"
    );

    let version = run(Command::new(mnt.dir.join("usr/bin/strata")).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("strata {}", env!("CARGO_PKG_VERSION")),
        "usr/bin/strata --version from the mounted sysext"
    );
}

#[test]
fn containerd_imports_the_drop_in_as_proxy_snapshotter_and_cri_default() {
    require_tool("containerd", "containerd");
    let env = Env::new();
    let config = env.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nimports = [\"{}\"]\n",
            repo_root().join("contrib/containerd/strata.toml").display()
        ),
    )
    .unwrap();
    let dump = run(Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .args(["config", "dump"]));
    let lines: Vec<&str> = dump.lines().map(str::trim).collect();
    let section = |header: &str| {
        let start = lines
            .iter()
            .position(|l| *l == header)
            .unwrap_or_else(|| panic!("no {header} in containerd's config:\n{dump}"));
        lines[start + 1..]
            .iter()
            .take_while(|l| !l.starts_with('['))
            .copied()
            .collect::<Vec<_>>()
    };
    let proxy = section("[proxy_plugins.strata]");
    assert!(
        proxy.contains(&"type = \"snapshot\"")
            && proxy.contains(&"address = \"/run/strata/snapshotter.sock\""),
        "[proxy_plugins.strata]: {proxy:?}"
    );
    let cri = section("[plugins.\"io.containerd.grpc.v1.cri\".containerd]");
    assert!(
        cri.contains(&"snapshotter = \"strata\"")
            && cri.contains(&"disable_snapshot_annotations = false"),
        "CRI's containerd section: {cri:?}"
    );
}
