//! A private containerd (own root, state and socket under a temp dir),
//! driven with `ctr`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_tool;

/// A running containerd; killed on drop.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// containerd on the config in `dir`, logging (appending) to
/// `dir/containerd.log`.
fn spawn(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("containerd.log"))
        .expect("log file");
    Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting containerd")
}

impl Containerd {
    /// Start containerd and wait for its socket.
    pub fn start() -> Containerd {
        Self::start_with("")
    }

    /// Start containerd with `extra` appended to its config (TOML, e.g.
    /// a `[proxy_plugins.NAME]` table) and wait for its socket.
    pub fn start_with(extra: &str) -> Containerd {
        Self::start_with_cri("", extra)
    }

    /// [`start_with`](Self::start_with), and `cri` (TOML keys) in the
    /// `[plugins."io.containerd.grpc.v1.cri"]` table.
    pub fn start_with_cri(cri: &str, extra: &str) -> Containerd {
        require_tool("containerd", "containerd");
        require_tool("ctr", "containerd");
        require_tool("runc", "runc");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
                 [grpc]\n  address = \"{1}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n{3}\n{2}\n",
                dir.path().display(),
                socket.display(),
                extra,
                cri
            ),
        )
        .expect("writing containerd config");
        let child = spawn(dir.path());
        let c = Containerd {
            child,
            socket,
            _dir: dir,
        };
        c.wait_ready();
        c
    }

    /// Its root (`root` in its config): its content store, metadata and
    /// snapshotters' dirs.
    pub fn root(&self) -> PathBuf {
        self._dir.path().join("root")
    }

    /// kill -9 containerd (its shims and containers live on) and start
    /// it again on the same root, state and config.
    pub fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(self._dir.path());
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let c = self;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            let ok = Command::new("ctr")
                .arg("--address")
                .arg(&c.socket)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "containerd did not answer on {} within 30 s",
            c.socket.display()
        );
    }

    /// containerd's own directory (config, root, state, log).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Run `ctr --address SOCKET ARGS...` and return its output whatever
    /// its status.
    pub fn ctr_output(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running ctr")
    }

    /// The socket path (`--address` for ctr and ctr-remote).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Run `ctr --address SOCKET ARGS...`; panics with its output on failure.
    pub fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running ctr");
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Import an OCI layout (tarred on the fly) under `base_name`.
    pub fn import_layout(&self, layout: &Path, base_name: &str) {
        let archive = self._dir.path().join("import.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(layout)
            .arg("-cf")
            .arg(&archive)
            .arg(".")
            .status()
            .expect("running tar");
        assert!(st.success(), "tar of {} failed", layout.display());
        self.ctr(&[
            "images",
            "import",
            "--base-name",
            base_name,
            archive.to_str().unwrap(),
        ]);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
