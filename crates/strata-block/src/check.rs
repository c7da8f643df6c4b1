//! Checking a built template before a service calls it done: its raw
//! image passes `e2fsck -fn`, has the template's size, and (built from an
//! image) mounts to the image's tree.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use strata_digest::Digest;
use strata_store::Store;

use crate::{BlockError, export_template};

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// `e2fsck-clean`, `size`, `tree-equal`.
    pub name: &'static str,
    /// Passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// Seconds it took.
    pub seconds: f64,
}

/// Check template `id`, built from `image` when given, with `adds` laid
/// over it as the build lays them (its tree is then compared with the
/// template's, mounted read-only: everything but directory mtimes,
/// nanoseconds and `/lost+found`). Every check runs; the caller sees
/// which failed. A cancel between checks is an error.
pub fn verify_template(
    store: &Store,
    id: &Digest,
    image: Option<&Digest>,
    adds: &[std::path::PathBuf],
    ctl: strata_ops::Ctl<'_>,
) -> Result<Vec<Check>, BlockError> {
    let io = |what: String| move |e: std::io::Error| BlockError::Io { what, source: e };
    let staging = tempfile::Builder::new()
        .prefix("template-check-")
        .tempdir_in(store.root().join("tmp"))
        .map_err(io("creating a staging directory".into()))?;
    let raw = staging.path().join("raw");
    let t0 = Instant::now();
    let map = export_template(store, id, &raw)?;
    ctl.cancel.check()?;
    let mut checks = Vec::new();

    let len = std::fs::metadata(&raw)
        .map_err(io(format!("reading {}", raw.display())))?
        .len();
    checks.push(Check {
        name: "size",
        ok: len == map.size,
        detail: format!("{len} bytes, the template says {}", map.size),
        seconds: t0.elapsed().as_secs_f64(),
    });

    let t0 = Instant::now();
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&raw)
        .output()
        .map_err(io("running e2fsck (e2fsprogs)".into()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("").to_string();
    checks.push(Check {
        name: "e2fsck-clean",
        ok: out.status.success(),
        detail: format!("e2fsck -fn: {} ({last})", out.status),
        seconds: t0.elapsed().as_secs_f64(),
    });
    ctl.cancel.check()?;

    if let Some(image) = image {
        let t0 = Instant::now();
        let (ok, detail) = trees(store, image, adds, &raw, staging.path())?;
        checks.push(Check {
            name: "tree-equal",
            ok,
            detail,
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    Ok(checks)
}

/// Whether the ext4 at `raw` holds `image`'s tree.
fn trees(
    store: &Store,
    image: &Digest,
    adds: &[std::path::PathBuf],
    raw: &Path,
    staging: &Path,
) -> Result<(bool, String), BlockError> {
    let io = |what: String| move |e: std::io::Error| BlockError::Io { what, source: e };
    // detached: it goes with the fd, whatever happens
    let above = adds.iter().rev().cloned().collect();
    let tree = crate::image_tree_detached(store, image, above, "strata-check")?;
    let tree_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&tree));
    let want = crate::ext4_comparable_digest(Path::new(&tree_path))
        .map_err(io(format!("reading the tree of {image}")))?;
    drop(tree);
    let mnt = staging.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(io(format!("creating {}", mnt.display())))?;
    let mounted = Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,ro,noload"])
        .arg(raw)
        .arg(&mnt)
        .output()
        .map_err(io("running mount".into()))?;
    if !mounted.status.success() {
        return Ok((
            false,
            format!(
                "the template does not mount: {}",
                String::from_utf8_lossy(&mounted.stderr).trim()
            ),
        ));
    }
    let got = crate::ext4_comparable_digest(&mnt);
    let _ = Command::new("umount").arg(&mnt).status();
    let got = got.map_err(io("reading the template's tree".into()))?;
    Ok((
        got == want,
        format!("template tree {got}, image tree {want}"),
    ))
}
