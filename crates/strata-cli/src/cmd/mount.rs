//! `strata mount IMAGE DIR`, `strata mount --lazy REF DIR` and
//! `strata umount DIR|FILE`.
//!
//! A lazy mount is served by a process of its own: without `--foreground`
//! the command starts itself again as a daemon (log in
//! `<store>/lazy/<id>/log`) and returns when the daemon reports the mount
//! ready, or with its error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use strata_lazy::daemon::{self, DaemonRequest};
use strata_lazy::{Fallback, LazyOptions, Prefetch};
use strata_oci::Platform;
use strata_oci::pull::PullOptions;
use strata_store::MountOptions;

use crate::Ctx;
use crate::args::{RegistryArgs, SplitArgs};

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
    platform: Option<Platform>,
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
    /// With --lazy, for the snapshotter: the image as it resolved it
    /// (manifest and config, checked against the reference's digest), so
    /// the registry is not asked again.
    #[arg(long, hide = true, value_name = "FILE")]
    resolved: Option<PathBuf>,
    /// With --lazy --foreground, for the snapshotter: a daemon reports the
    /// stage `checked` once the image's TOCs and tar-splits are checked,
    /// then its report once mounted.
    #[arg(long, hide = true)]
    report_checked: bool,
}

/// Arguments of `strata umount`.
#[derive(clap::Args)]
pub struct UmountArgs {
    /// Mount point (or served file).
    dir: PathBuf,
}

impl Args {
    /// Whether this is a lazy mount served in the foreground (what a
    /// daemon runs).
    pub fn lazy_foreground(&self) -> bool {
        self.lazy.is_some() && self.lazy_args.foreground
    }
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
    let opts = MountOptions {
        writable: a.rw,
        upper: a.upper,
        verity: a.verity,
        split: a.split.policy(),
    };
    let mounted = store.mount_image(&digest, &a.dir, &opts)?;
    ctx.print_with(&mounted, None::<&str>, &mounted)
}

fn lazy(ctx: &Ctx, a: &Args, mode: LazyMode) -> Result<ExitCode> {
    let target = strata_sys::free_mount_point(&a.dir)?;
    let la = &a.lazy_args;
    if !la.foreground {
        let log = strata_lazy::state::mount_dir(&ctx.root, &target).join("log");
        return crate::background::started(ctx, "lazy mount", &log);
    }
    let req = DaemonRequest {
        image: a.image.clone(),
        target,
        prefetch_list_file: la.prefetch_list.clone(),
        resolved_file: la.resolved.clone(),
        report_checked: la.report_checked,
        opts: LazyOptions {
            fallback: match mode {
                LazyMode::Auto => Fallback::Pull,
                LazyMode::Require => Fallback::Fail,
            },
            prefetch: match la.prefetch {
                PrefetchArg::None => Prefetch::None,
                PrefetchArg::List => Prefetch::List,
                PrefetchArg::All => Prefetch::All,
            },
            prefetch_list: None,
            record: la.record.clone(),
            passthrough: la.passthrough,
            fetch_jobs: la.fetch_jobs,
            pull: PullOptions {
                platform: la.platform.clone().unwrap_or_else(Platform::host_default),
                split: a.split.policy(),
                partial: true,
                ..PullOptions::host(la.registry.flags())
            },
        },
    };
    // the daemon (or a foreground mount) serves for long: it tunes malloc
    // and starts logging before any thread starts
    let serving = daemon::start(&ctx.root, req).map_err(|e| {
        crate::background::failed(match e {
            daemon::DaemonError::Mount {
                source: e @ strata_lazy::LazyError::NotLazy { .. },
                ..
            } => anyhow::Error::new(e).context("--lazy=require"),
            e => e.into(),
        })
    })?;
    crate::background::ready(ctx, serving.report());
    serving.wait().context("serving the lazy mount")?;
    Ok(ExitCode::SUCCESS)
}

pub fn umount(ctx: &Ctx, a: UmountArgs) -> Result<ExitCode> {
    let done = strata_mounts::unmount(&ctx.root, &a.dir)?;
    done.warnings()
        .iter()
        .for_each(|w| eprintln!("strata: {w}"));
    ctx.say(&done);
    Ok(ExitCode::SUCCESS)
}
