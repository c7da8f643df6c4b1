//! Test helpers shared by strata's integration tests.
//!
//! Everything here drives real components: Debian's `docker-registry` on
//! 127.0.0.1, `skopeo`, `umoci`. A missing tool is a test failure whose
//! message names the tool and the package to install, never a skip.

#![forbid(unsafe_code)]

pub mod containerd;
pub mod proxy;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/strata-testkit is two levels below the repo")
        .to_path_buf()
}

/// Where `scripts/fixtures.sh` put the test images.
pub fn fixtures_dir() -> PathBuf {
    let dir = std::env::var_os("STRATA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".cache/fixtures"));
    assert!(
        dir.is_dir(),
        "test fixtures missing at {}: run `bash scripts/fixtures.sh` (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Fail with a clear message when a tool is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "required tool `{tool}` is not installed: apt-get install {package} (scripts/install-deps.sh does)"
    );
}

/// Run a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// A running Debian `docker-registry` on 127.0.0.1 with its own storage.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Storage root (blobs under docker/registry/v2/blobs).
    pub storage: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
    /// The CA and server certificate of a TLS registry.
    _certs: Option<tempfile::TempDir>,
}

impl Registry {
    /// Start a registry and wait until `/v2/` answers.
    pub fn start() -> Registry {
        Registry::start_with("")
    }

    /// Start a registry serving HTTPS with a certificate for 127.0.0.1
    /// from a CA of its own, made here with `openssl`; returns the
    /// registry and the CA's PEM file (trust it with `SSL_CERT_FILE`).
    pub fn start_tls() -> (Registry, PathBuf) {
        require_tool("openssl", "openssl");
        let certs_dir = tempfile::tempdir().expect("tempdir");
        let certs = certs_dir.path().to_path_buf();
        let ca = certs.join("ca.pem");
        let ssl = |args: &[&str]| run(Command::new("openssl").current_dir(&certs).args(args));
        // a P-256 key with no passphrase, for the CA and for the server
        let req = |keyout: &str, rest: &[&str]| {
            let mut args = vec![
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ];
            args.extend_from_slice(&["-nodes", "-keyout", keyout]);
            args.extend_from_slice(rest);
            ssl(&args)
        };
        req(
            "ca.key",
            &[
                "-x509",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=strata test CA",
            ],
        );
        req(
            "server.key",
            &["-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        );
        fs::write(certs.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("write san.ext");
        ssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        let tls = format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display()
        );
        let mut reg = Registry::start_with(&tls);
        reg._certs = Some(certs_dir);
        (reg, ca)
    }

    /// Start a registry with `http_extra` appended to its `http:` section.
    fn start_with(http_extra: &str) -> Registry {
        require_tool("docker-registry", "docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = dir.path().join("storage");
        fs::create_dir_all(&storage).expect("mkdir storage");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{http_extra}",
                storage.display()
            ),
        )
        .expect("write registry config");
        let child = spawn_registry(dir.path(), &addr);
        Registry {
            addr,
            storage,
            child,
            _dir: dir,
            _certs: None,
        }
    }

    /// Kill the registry (its storage stays): connections are refused.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again on the same address and storage.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn_registry(self._dir.path(), &self.addr);
    }

    /// Copy an image into this registry with skopeo.
    pub fn push(&self, src: &str, repo_tag: &str, extra: &[&str]) {
        require_tool("skopeo", "skopeo");
        let dest = format!("docker://{}/{repo_tag}", self.addr);
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(extra)
            .arg(src)
            .arg(&dest));
    }

    /// Push `src` recompressed as zstd. skopeo 1.9 substitutes blobs it
    /// already knows (its blob-info cache) when pushing to a registry, so
    /// the image is recompressed into a private OCI layout first and then
    /// pushed with `--preserve-digests`.
    pub fn push_zstd(&self, src: &str, repo_tag: &str) {
        require_tool("skopeo", "skopeo");
        let tmp = tempfile::tempdir().expect("tempdir");
        let layout = format!("oci:{}:zstd", tmp.path().join("layout").display());
        run(Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-compress",
                "--dest-compress-format",
                "zstd",
            ])
            .arg(src)
            .arg(&layout));
        self.push(&layout, repo_tag, &["--preserve-digests"]);
    }

    /// Path of a blob in the registry's storage (to corrupt it in tests).
    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run docker-registry with `dir/config.yml`; wait until `/v2/` answers.
fn spawn_registry(dir: &Path, addr: &str) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("registry.log"))
        .expect("log file");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawning docker-registry");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            use std::io::Write;
            let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            // a TLS registry answers plain HTTP with 400
            if buf.starts_with("HTTP/1.") && (buf.contains(" 200 ") || buf.contains(" 400 ")) {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not answer on {addr} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// `umoci unpack --image LAYOUT:TAG OUT`; returns OUT/rootfs.
pub fn umoci_unpack(layout: &Path, tag: &str, out: &Path) -> PathBuf {
    require_tool("umoci", "umoci");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(out));
    out.join("rootfs")
}

/// One path's observable state, for tree comparisons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// Type and type-specific payload.
    pub kind: String,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// mtime (seconds, nanoseconds); dirs excluded by [`compare_trees`] callers if needed.
    pub mtime: (i64, i64),
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// (dev, ino) for hardlink grouping.
    pub ino: (u64, u64),
    /// Link count.
    pub nlink: u64,
}

/// Walk a tree into a map: relative path bytes -> state.
pub fn scan_tree(root: &Path) -> BTreeMap<Vec<u8>, PathState> {
    let mut out = BTreeMap::new();
    scan(root, root, &mut out);
    out
}

fn scan(root: &Path, p: &Path, out: &mut BTreeMap<Vec<u8>, PathState>) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        "dir".to_string()
    } else if ft.is_symlink() {
        let t = fs::read_link(p).expect("readlink");
        format!(
            "symlink -> {}",
            String::from_utf8_lossy(t.as_os_str().as_bytes())
        )
    } else if ft.is_file() {
        let mut h = sha2::Sha256::default();
        let mut f = fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            sha2::Digest::update(&mut h, &buf[..n]);
        }
        let d = sha2::Digest::finalize(h);
        format!("file size={} content={}", md.len(), hex::encode(d))
    } else if ft.is_char_device() {
        format!("chardev {}:{}", major(md.rdev()), minor(md.rdev()))
    } else if ft.is_block_device() {
        format!("blockdev {}:{}", major(md.rdev()), minor(md.rdev()))
    } else if ft.is_fifo() {
        "fifo".to_string()
    } else {
        "socket".to_string()
    };
    let mut xattrs = BTreeMap::new();
    if let Ok(names) = list_xattrs(p) {
        for n in names {
            if let Ok(v) = get_xattr(p, &n) {
                xattrs.insert(n, v);
            }
        }
    }
    let rel = p
        .strip_prefix(root)
        .expect("under root")
        .as_os_str()
        .as_bytes()
        .to_vec();
    out.insert(
        rel,
        PathState {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), md.mtime_nsec()),
            xattrs,
            ino: (md.dev(), md.ino()),
            nlink: md.nlink(),
        },
    );
    if ft.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(p)
            .expect("readdir")
            .map(|e| e.expect("dirent").path())
            .collect();
        entries.sort();
        for e in entries {
            scan(root, &e, out);
        }
    }
}

fn major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)
}
fn minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0xff)
}

fn list_xattrs(p: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = rustix::fs::llistxattr(p, &mut buf)?;
    Ok(buf[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| s.to_vec())
        .collect())
}

fn get_xattr(p: &Path, name: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    let n = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// What to compare besides paths, kinds, contents and link targets.
#[derive(Debug, Clone, Copy)]
pub struct Compare {
    /// Compare permission bits.
    pub modes: bool,
    /// Compare uid/gid.
    pub owners: bool,
    /// Compare xattrs.
    pub xattrs: bool,
    /// Compare mtimes of non-directories (to the second unless `nanos`).
    pub mtimes: bool,
    /// Compare nanoseconds too.
    pub nanos: bool,
    /// Compare hardlink groups.
    pub hardlinks: bool,
}

impl Compare {
    /// Everything.
    pub const ALL: Compare = Compare {
        modes: true,
        owners: true,
        xattrs: true,
        mtimes: true,
        nanos: true,
        hardlinks: true,
    };
}

/// Compare two trees; returns one line per difference (empty = equal).
pub fn compare_trees(a: &Path, b: &Path, what: Compare) -> Vec<String> {
    let ta = scan_tree(a);
    let tb = scan_tree(b);
    let mut diffs = Vec::new();
    let show = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    for (p, sa) in &ta {
        let Some(sb) = tb.get(p) else {
            diffs.push(format!("{}: only in {}", show(p), a.display()));
            continue;
        };
        if sa.kind != sb.kind {
            diffs.push(format!("{}: kind {} vs {}", show(p), sa.kind, sb.kind));
        }
        if what.modes && sa.mode != sb.mode && !sa.kind.starts_with("symlink") {
            diffs.push(format!("{}: mode {:o} vs {:o}", show(p), sa.mode, sb.mode));
        }
        if what.owners && (sa.uid, sa.gid) != (sb.uid, sb.gid) {
            diffs.push(format!(
                "{}: owner {}:{} vs {}:{}",
                show(p),
                sa.uid,
                sa.gid,
                sb.uid,
                sb.gid
            ));
        }
        if what.xattrs && sa.xattrs != sb.xattrs {
            diffs.push(format!(
                "{}: xattrs {:?} vs {:?}",
                show(p),
                sa.xattrs,
                sb.xattrs
            ));
        }
        if what.mtimes && sa.kind != "dir" {
            let (ma, mb) = if what.nanos {
                (sa.mtime, sb.mtime)
            } else {
                ((sa.mtime.0, 0), (sb.mtime.0, 0))
            };
            if ma != mb {
                diffs.push(format!("{}: mtime {:?} vs {:?}", show(p), ma, mb));
            }
        }
    }
    for p in tb.keys() {
        if !ta.contains_key(p) {
            diffs.push(format!("{}: only in {}", show(p), b.display()));
        }
    }
    if what.hardlinks {
        let groups = |t: &BTreeMap<Vec<u8>, PathState>| {
            let mut g: BTreeMap<(u64, u64), Vec<Vec<u8>>> = BTreeMap::new();
            for (p, s) in t {
                if s.kind != "dir" {
                    g.entry(s.ino).or_default().push(p.clone());
                }
            }
            let mut v: Vec<Vec<Vec<u8>>> = g.into_values().filter(|v| v.len() > 1).collect();
            v.sort();
            v
        };
        let (ga, gb) = (groups(&ta), groups(&tb));
        if ga != gb {
            let fmt = |g: &Vec<Vec<Vec<u8>>>| {
                g.iter()
                    .map(|v| v.iter().map(|p| show(p)).collect::<Vec<_>>().join("="))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            diffs.push(format!("hardlink groups [{}] vs [{}]", fmt(&ga), fmt(&gb)));
        }
    }
    diffs
}
