//! `strata mount IMAGE DIR`, `strata mount --lazy REF DIR` and
//! `strata umount DIR|FILE`.
//!
//! A lazy mount is served by a process of its own: without `--foreground`
//! the command starts itself again as a daemon (log in
//! `<store>/lazy/<id>/log`) and returns when the daemon reports the mount
//! ready, or with its error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use strata_digest::Digest;
use strata_lazy::{Fallback, LazyOptions, Mounted, Prefetch};
use strata_oci::pull::PullOptions;
use strata_sys::{MountError, OverlayMount, daemon};

use crate::Ctx;
use crate::args::{RegistryArgs, SplitArgs, open_reference, platform};

/// Arguments of `strata mount`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest (with --lazy: a reference to pull from).
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
    lazy: Option<LazyMode>,
    #[command(flatten)]
    lazy_args: LazyArgs,
}

/// `--lazy` or `--lazy=require`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LazyMode {
    /// Lazy when the image allows it, else a full pull (said loudly).
    Auto,
    /// Lazy or fail.
    Require,
}

/// What is fetched in the background.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PrefetchArg {
    /// Only what is read.
    None,
    /// The files in --prefetch-list.
    List,
    /// The list first, then everything; the image is then recorded as pulled.
    All,
}

/// Options of lazy mounts.
#[derive(clap::Args)]
pub struct LazyArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// With --lazy: platform to pick from an index, os/arch[/variant].
    #[arg(long)]
    platform: Option<String>,
    /// With --lazy: background fetching.
    #[arg(long, value_enum, default_value_t = PrefetchArg::All)]
    prefetch: PrefetchArg,
    /// With --lazy: paths (one per line) fetched first.
    #[arg(long)]
    prefetch_list: Option<PathBuf>,
    /// With --lazy: write the paths read, in first-read order, to FILE
    /// (a prefetch list for next time) when unmounted.
    #[arg(long)]
    record: Option<PathBuf>,
    /// With --lazy: stay in the foreground, logging to stderr.
    #[arg(long)]
    foreground: bool,
    /// With --lazy: serve files fetched through the FUSE data layer by FUSE
    /// passthrough once local (files in the store never reach the daemon
    /// either way). Passthrough raises the kernel's stacking depth: the
    /// mount can then not be the lower layer of another overlay (a
    /// container's writable layer), so it is off by default.
    #[arg(long)]
    passthrough: bool,
    /// With --lazy: fetches running at once.
    #[arg(long, default_value_t = 8)]
    fetch_jobs: usize,
}

/// Arguments of `strata umount`.
#[derive(clap::Args)]
pub struct UmountArgs {
    /// Mount point (or served file).
    dir: PathBuf,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    if let Some(mode) = a.lazy {
        if a.rw || a.upper.is_some() || a.verity {
            bail!(
                "--lazy mounts are read-only and cannot require fs-verity: drop --rw/--upper/--verity"
            );
        }
        return lazy(ctx, &a, mode);
    }
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    let target = mount_point(&a.dir)?;
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
        let (u, w) = (base.join("upper"), base.join("work"));
        for d in [&u, &w] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Some((u, w))
    } else {
        None
    };
    let m = OverlayMount {
        dirs_above: Vec::new(),
        layers,
        data_dirs: vec![store.root().join("objects")],
        upper: upper.clone(),
        verity_require: a.verity,
        source: strata_store::composefs_source(&digest),
    };
    strata_sys::mount_overlay(&m, &target)
        .map_err(|e| mount_error(e, &format!("mounting {digest} at {}", target.display())))?;
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

/// `dir` as a canonical path, checked to be a directory.
fn mount_point(dir: &Path) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!("mount point {} is not an existing directory", dir.display());
    }
    dir.canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))
}

fn mount_error(e: MountError, what: &str) -> anyhow::Error {
    match e {
        MountError::AlreadyMounted(p) => anyhow::anyhow!(
            "{} is already a mount point; `strata umount {}` first or pick another directory",
            p.display(),
            p.display()
        ),
        MountError::Busy(p) => anyhow::anyhow!(
            "{} is busy: a process has a file open or its working directory there (see `fuser -vm {}`); close it and retry",
            p.display(),
            p.display()
        ),
        e => anyhow::Error::new(e).context(what.to_string()),
    }
}

fn lazy(ctx: &Ctx, a: &Args, mode: LazyMode) -> Result<ExitCode> {
    let target = mount_point(&a.dir)?;
    if strata_sys::mounts()?
        .iter()
        .any(|m| m.mount_point == target)
    {
        bail!(
            "{} is already a mount point; `strata umount {}` first or pick another directory",
            target.display(),
            target.display()
        );
    }
    let la = &a.lazy_args;
    if !la.foreground {
        let log = strata_lazy::state::mount_dir(&ctx.root, &target).join("log");
        return crate::background::started(ctx, "lazy mount", &log);
    }
    // the daemon (or a foreground mount) serves for long: before any
    // thread starts (the registry client's, FUSE's, the read workers')
    strata_sys::malloc::tune_for_daemon();
    crate::background::init_log();
    let result = (|| -> Result<(String, Vec<String>, Option<Box<strata_lazy::LazyMount>>)> {
        let store = Arc::new(ctx.open_store_for_daemon()?);
        let mut registry = la.registry.options(&store)?;
        registry.stall_timeout = Some(std::time::Duration::from_secs(10));
        let platform = platform(la.platform.as_deref())?;
        let (reference, source) = open_reference(ctx, &a.image, &registry, &platform)?;
        let source: Arc<dyn strata_oci::ImageSource> = Arc::from(source);
        let name = reference.to_string();
        let opts = LazyOptions {
            fallback: match mode {
                LazyMode::Auto => Fallback::Pull,
                LazyMode::Require => Fallback::Fail,
            },
            prefetch: match la.prefetch {
                PrefetchArg::None => Prefetch::None,
                PrefetchArg::List => Prefetch::List,
                PrefetchArg::All => Prefetch::All,
            },
            prefetch_list: match &la.prefetch_list {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading prefetch list {}", p.display()))?,
                ),
                None => None,
            },
            record: la.record.clone(),
            passthrough: la.passthrough,
            fetch_jobs: la.fetch_jobs,
            pull: PullOptions {
                platform,
                registry,
                jobs: 3,
                split: a.split.policy(),
            },
        };
        let mounted = strata_lazy::mount(
            store,
            source,
            &name,
            &target,
            &opts,
            Arc::new(crate::background::LogEvents),
        )
        .map_err(|e| match e {
            e @ strata_lazy::LazyError::NotLazy { .. } => {
                anyhow::Error::new(e).context("--lazy=require")
            }
            e => anyhow::Error::new(e).context(format!("mounting {name} lazily")),
        })?;
        Ok(match mounted {
            Mounted::Composefs { manifest_digest } => (
                format!(
                    "{name} ({manifest_digest}) is in the store: mounted it at {} the composefs way",
                    target.display()
                ),
                Vec::new(),
                None,
            ),
            Mounted::Full { reason, .. } => (
                format!(
                    "pulled {name} in full and mounted it at {} (not lazily)",
                    target.display()
                ),
                vec![format!("not lazy: {reason}")],
                None,
            ),
            Mounted::Lazy(m) => {
                let (to_fetch, total) = m.files_to_fetch();
                (
                    format!(
                        "mounted {name} lazily at {} ({to_fetch} of {total} contents to fetch, {} of TOCs read)",
                        target.display(),
                        strata_ops::human_bytes(m.toc_bytes())
                    ),
                    Vec::new(),
                    Some(m),
                )
            }
        })
    })();
    let (msg, notes, mount) = match result {
        Ok(r) => r,
        Err(e) => {
            if daemon::is_daemon() {
                daemon::notify(&serde_json::json!({ "error": format!("{e:#}") }).to_string());
            }
            return Err(e);
        }
    };
    tracing::info!("{msg}");
    let mode = match &mount {
        Some(_) => "lazy",
        None if notes.is_empty() => "composefs",
        None => "full",
    };
    let mut report = serde_json::json!({"mode": mode, "message": msg, "notes": notes});
    if let Some(m) = &mount {
        report["manifest_digest"] = serde_json::json!(m.manifest_digest());
    }
    crate::background::ready(ctx, &report);
    if let Some(m) = mount {
        m.wait().context("serving the lazy mount")?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn umount(ctx: &Ctx, a: UmountArgs) -> Result<ExitCode> {
    // a FUSE mount whose daemon died cannot be stat'ed: resolve the parent
    let target = strata_block::served::canonical(&a.dir)
        .with_context(|| format!("resolving {}", a.dir.display()))?;
    let mounts = strata_sys::mounts().context("reading /proc/self/mountinfo")?;
    let Some(m) = mounts.iter().rev().find(|m| m.mount_point == target) else {
        bail!("{} is not a mount point", target.display());
    };
    let lazy = m.source.starts_with(strata_lazy::mount::SOURCE_PREFIX);
    let served = m.source.starts_with(strata_block::served::SOURCE_PREFIX);
    if !m.source.starts_with("strata:") && !lazy && !served {
        bail!(
            "{} is a {} mount of {:?}, not one strata made; use umount(8)",
            target.display(),
            m.fs_type,
            m.source
        );
    }
    strata_sys::unmount(&target)
        .map_err(|e| mount_error(e, &format!("unmounting {}", target.display())))?;
    if lazy && let Err(e) = strata_lazy::cleanup(&ctx.root, &target) {
        eprintln!("strata: {e}");
    }
    if served {
        let d = strata_block::served::cleanup(&ctx.root, &target);
        if d.written > d.committed && !ctx.quiet {
            eprintln!(
                "strata: dropped the writes to {} since {} (chunks written: {}, committed: {})",
                target.display(),
                if d.committed > 0 {
                    "the last commit"
                } else {
                    "it was served"
                },
                d.written,
                d.committed
            );
        }
    }
    if !ctx.quiet {
        println!("unmounted {}", target.display());
    }
    Ok(ExitCode::SUCCESS)
}
