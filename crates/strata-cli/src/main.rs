//! `strata`: pull, store, inspect, mount and export container root filesystems.
//!
//! This binary is glue: argument parsing (clap), terminal output and exit
//! codes. Every capability lives in a library crate; commands are one file
//! each under `cmd/`.

#![forbid(unsafe_code)]

mod args;
mod background;
mod cmd;
mod render;

use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// jemalloc: a lazy mount's TOCs, tar-splits, tree and EROFS image are a
/// few hundred thousand small allocations made and freed on several
/// threads at once, where glibc's malloc took a third of the daemon's
/// time (BENCHMARKS.md, issue 16, tenth run).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// strata: a content-addressed store of container and microVM root filesystems.
#[derive(Parser)]
#[command(name = "strata", version, about)]
struct Cli {
    /// Store directory (default /var/lib/strata as root, else $XDG_DATA_HOME/strata).
    #[arg(long, global = true, env = "STRATA_ROOT")]
    root: Option<PathBuf>,
    /// Print only what scripts need (digests), no progress.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pull an image: docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG],
    /// or as with podman HOST[:PORT]/REPO[:TAG] or a short name (debian:12) for registries.conf's search registries.
    Pull(cmd::pull::Args),
    /// List images in the store.
    Images,
    /// Show an image's manifest, config and layers as JSON.
    Inspect(cmd::inspect::Args),
    /// Give an image another name.
    Tag(cmd::tag::Args),
    /// Remove an image name (all names, given a digest).
    Rm(cmd::rm::Args),
    /// Remove everything no name reaches.
    Gc(cmd::gc::Args),
    /// Check the whole store; exits 1 when anything is wrong.
    Fsck,
    /// Write an image's flattened tree to a directory, a tar or an EROFS file.
    Export(cmd::export::Args),
    /// Mount an image read-only (or --rw) the composefs way: one overlay mount.
    Mount(cmd::mount::Args),
    /// Unmount what `strata mount` mounted.
    Umount(cmd::mount::UmountArgs),
    /// List lazy mounts and their progress.
    Mounts,
    /// Rebuild an image's tree and EROFS image and re-hash every object it uses.
    Verify(cmd::verify::Args),
    /// Write an image with its layers as zstd:chunked (same tars, same diff_ids) to oci:DIR[:TAG]
    /// or push it to a registry, docker://HOST[:PORT]/REPO[:TAG].
    Convert(cmd::convert::Args),
    /// VM templates: ext4 images of any size from images or other templates.
    Rootfs(cmd::rootfs::Args),
    /// Pull an image into containerd through the strata snapshotter (layers go to strata's store).
    Rpull(cmd::rpull::Args),
    /// Serve containerd's snapshots API on a unix socket (a proxy snapshotter).
    Snapshotter(cmd::snapshotter::Args),
    /// Serve the HTTP conversion service (jobs, verified results, explicit format fallbacks).
    Serve(cmd::serve::Args),
    /// A lazy mount's daemon started ahead of its mount (the snapshotter's).
    #[command(hide = true)]
    Spare(cmd::spare::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cmd::completions::Args),
    /// Print the man page (roff) of strata or of one subcommand.
    Man(cmd::completions::ManArgs),
}

/// What every command gets.
pub struct Ctx {
    root: PathBuf,
    quiet: bool,
    json: bool,
    cancel: strata_ops::Cancel,
}

impl Ctx {
    /// The store for a command: one operation for gc (the lock is held
    /// shared until the command ends).
    fn open_store(&self) -> Result<strata_store::Store> {
        strata_store::Store::open_locked(&self.root)
            .with_context(|| format!("opening store {}", self.root.display()))
    }

    /// Where this command's events are shown.
    fn render(&self) -> render::Render {
        render::Render::new(self.quiet, self.json)
    }

    /// Print `v` as JSON with --json, else `quiet` (if any) with --quiet,
    /// else `human`.
    fn print_with(
        &self,
        v: &impl serde::Serialize,
        quiet: Option<impl Display>,
        human: impl Display,
    ) -> Result<ExitCode> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v)?);
        } else if !self.quiet {
            println!("{human}");
        } else if let Some(q) = quiet {
            println!("{q}");
        }
        Ok(ExitCode::SUCCESS)
    }

    /// A line for people, unless --quiet.
    fn say(&self, line: impl Display) {
        if !self.quiet {
            println!("{line}");
        }
    }

    /// Notes for people (how a short name resolved) on stderr, unless
    /// --quiet.
    fn notes(&self, notes: &[String]) {
        if !self.quiet {
            notes.iter().for_each(|n| eprintln!("strata: {n}"));
        }
    }

    /// Items as a JSON array with --json, else one line each.
    fn print_lines<T: serde::Serialize + Display>(&self, items: &[T]) -> Result<ExitCode> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(items)?);
        } else {
            items.iter().for_each(|i| println!("{i}"));
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Run `f` with its events shown (bars cleared when it returns),
    /// cancelled by Ctrl-C.
    fn with_events<T>(&self, f: impl FnOnce(strata_ops::Ctl) -> T) -> T {
        let render = self.render();
        let r = f(strata_ops::Ctl::new(&render, &self.cancel));
        render.finish();
        r
    }
}

fn main() -> ExitCode {
    strata_sys::malloc::set_release(strata_sys::malloc::jemalloc_purge);
    let mut cli = Cli::parse();
    if let Command::Spare(a) = &cli.command {
        cli = match cmd::spare::wait(a) {
            Ok(Some(work)) => work,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                strata_sys::daemon::report_failed(e.as_ref());
                eprintln!("strata: error: {e:#}");
                return ExitCode::FAILURE;
            }
        };
    }
    // bounds on what images may claim (SECURITY.md); daemons this process
    // starts inherit the environment and read the same values
    match strata_oci::limits::Limits::from_env() {
        Ok(l) => {
            let _ = strata_oci::limits::set(l);
        }
        Err(e) => {
            eprintln!("strata: error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let ctx = Ctx {
        root: cli.root.clone().unwrap_or_else(strata_store::default_root),
        quiet: cli.quiet,
        json: cli.json,
        cancel: strata_ops::Cancel::new(),
    };
    // a daemon handles its own signals
    if let Command::Snapshotter(a) = cli.command {
        return match cmd::snapshotter::run(cli.root, a) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("strata: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Command::Serve(a) = cli.command {
        return match cmd::serve::run(ctx.root.clone(), a) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("strata: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // Ctrl-C: long operations stop at their next unit and leave nothing
    // half-visible; a second Ctrl-C ends the process at once
    {
        let cancel = ctx.cancel.clone();
        let _ = ctrlc::set_handler(move || {
            if cancel.is_cancelled() {
                std::process::exit(130);
            }
            cancel.cancel();
        });
    }
    let result = match cli.command {
        Command::Pull(a) => cmd::pull::run(&ctx, a),
        Command::Images => cmd::images::run(&ctx),
        Command::Inspect(a) => cmd::inspect::run(&ctx, a),
        Command::Tag(a) => cmd::tag::run(&ctx, a),
        Command::Rm(a) => cmd::rm::run(&ctx, a),
        Command::Gc(a) => cmd::gc::run(&ctx, a),
        Command::Fsck => cmd::fsck::run(&ctx),
        Command::Export(a) => cmd::export::run(&ctx, a),
        Command::Mount(a) => cmd::mount::run(&ctx, a),
        Command::Umount(a) => cmd::mount::umount(&ctx, a),
        Command::Mounts => cmd::mounts::run(&ctx),
        Command::Verify(a) => cmd::verify::run(&ctx, a),
        Command::Convert(a) => cmd::convert::run(&ctx, a),
        Command::Rootfs(a) => cmd::rootfs::run(&ctx, a),
        Command::Rpull(a) => cmd::rpull::run(&ctx, a),
        Command::Snapshotter(_) | Command::Serve(_) => unreachable!("served above"),
        Command::Spare(_) => unreachable!("a spare's work replaced it above"),
        Command::Completions(a) => cmd::completions::completions(a),
        Command::Man(a) => cmd::completions::man(a),
    };
    match result {
        Ok(code) => code,
        Err(e) if ctx.cancel.is_cancelled() => {
            eprintln!("strata: cancelled: {e:#}");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("strata: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
