//! `strata mount IMAGE DIR` and `strata umount DIR`

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use strata_digest::Digest;
use strata_sys::{MountError, OverlayMount};

use super::pull::SplitArgs;
use crate::Ctx;

/// Arguments of `strata mount`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest.
    image: String,
    /// Mount point (an existing directory).
    dir: PathBuf,
    /// Writable: changes go to an upper dir kept in the store (one per
    /// image and mount point, kept across mounts) or at --upper.
    #[arg(long)]
    rw: bool,
    /// Directory for the writable layer (implies --rw); holds upper/ and work/.
    #[arg(long)]
    upper: Option<PathBuf>,
    /// Require fs-verity on every object (overlayfs `verity=require`).
    #[arg(long)]
    verity: bool,
    #[command(flatten)]
    split: SplitArgs,
    /// Serve IMAGE (a reference to pull from) before it has arrived: a
    /// composefs mount whose missing files a FUSE data layer fetches on
    /// demand from zstd:chunked layers. `--lazy=require` fails instead of
    /// pulling in full when the image cannot be lazy.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "auto")]
    lazy: Option<super::lazy::LazyMode>,
    #[command(flatten)]
    lazy_args: super::lazy::LazyArgs,
}

/// Arguments of `strata umount`.
#[derive(clap::Args)]
pub struct UmountArgs {
    /// Mount point.
    dir: PathBuf,
}

/// The mount source strata writes; gc keeps images mounted this way.
pub fn source_of(digest: &Digest) -> String {
    format!("strata:{digest}")
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    if let Some(mode) = a.lazy {
        if a.rw || a.upper.is_some() || a.verity {
            bail!(
                "--lazy mounts are read-only and cannot require fs-verity: drop --rw/--upper/--verity"
            );
        }
        return super::lazy::run(ctx, &a.image, &a.dir, mode, &a.lazy_args, a.split.policy());
    }
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    if !a.dir.is_dir() {
        bail!(
            "mount point {} is not an existing directory",
            a.dir.display()
        );
    }
    let target = a
        .dir
        .canonicalize()
        .with_context(|| format!("resolving {}", a.dir.display()))?;
    let (info, layers) = store
        .image_erofs(&digest, a.split.policy())
        .with_context(|| format!("preparing the EROFS image of {digest}"))?;
    let upper = if a.rw || a.upper.is_some() {
        let base = match &a.upper {
            Some(u) => u.clone(),
            None => {
                let key = Digest::sha256_of(target.as_os_str().as_encoded_bytes());
                store.root().join("uppers").join(format!(
                    "{}-{}",
                    &digest.hex()[..16],
                    &key.hex()[..16]
                ))
            }
        };
        Some(prepare_upper(&base)?)
    } else {
        None
    };
    let m = OverlayMount {
        dirs_above: Vec::new(),
        layers,
        data_dirs: vec![store.root().join("objects")],
        upper: upper.clone(),
        verity_require: a.verity,
        source: source_of(&digest),
    };
    strata_sys::mount_overlay(&m, &target).map_err(|e| match e {
        MountError::AlreadyMounted(p) => anyhow::anyhow!(
            "{} is already a mount point; `strata umount {}` first or pick another directory",
            p.display(),
            p.display()
        ),
        e => anyhow::Error::new(e).context(format!("mounting {digest} at {}", target.display())),
    })?;
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({
                "manifest_digest": digest,
                "tree_digest": info.tree_digest,
                "mount_point": target,
                "upper": upper.as_ref().map(|u| &u.0),
                "split": info.split.is_some(),
            })
        );
    } else if !ctx.quiet {
        let mode = if upper.is_some() {
            "read-write"
        } else {
            "read-only"
        };
        println!(
            "mounted {} {mode} at {} (tree {})",
            a.image,
            target.display(),
            info.tree_digest
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn prepare_upper(base: &Path) -> Result<(PathBuf, PathBuf)> {
    let (u, w) = (base.join("upper"), base.join("work"));
    for d in [&u, &w] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    Ok((u, w))
}

pub fn umount(ctx: &Ctx, a: UmountArgs) -> Result<ExitCode> {
    // a FUSE mount whose daemon died cannot be stat'ed: resolve the parent
    let target = match a.dir.canonicalize() {
        Ok(t) => t,
        Err(e) => {
            let parent = a.dir.parent().filter(|p| !p.as_os_str().is_empty());
            match (parent.map(Path::canonicalize), a.dir.file_name()) {
                (Some(Ok(p)), Some(n)) => p.join(n),
                (None, Some(n)) => std::env::current_dir()?.join(n),
                _ => return Err(e).with_context(|| format!("resolving {}", a.dir.display())),
            }
        }
    };
    let mounts = strata_sys::mounts().context("reading /proc/self/mountinfo")?;
    let Some(m) = mounts.iter().rev().find(|m| m.mount_point == target) else {
        bail!("{} is not a mount point", target.display());
    };
    let lazy = m.source.starts_with("strata-lazy:");
    let served = m.source.starts_with("strata-rootfs:");
    if !m.source.starts_with("strata:") && !lazy && !served {
        bail!(
            "{} is a {} mount of {:?}, not one strata made; use umount(8)",
            target.display(),
            m.fs_type,
            m.source
        );
    }
    strata_sys::unmount(&target).map_err(|e| match e {
        MountError::Busy(p) => anyhow::anyhow!(
            "{} is busy: a process has a file open or its working directory there (see `fuser -vm {}`); close it and retry",
            p.display(),
            p.display()
        ),
        e => anyhow::Error::new(e),
    })?;
    if lazy {
        super::lazy::after_umount(ctx, &target);
    }
    if served {
        super::rootfs_serve::after_umount(ctx, &target);
    }
    if !ctx.quiet {
        println!("unmounted {}", target.display());
    }
    Ok(ExitCode::SUCCESS)
}
