//! `strata spare` (hidden): a lazy mount's daemon started ahead of its
//! mount. The snapshotter keeps one waiting; when a lazy image's first
//! Prepare comes, it hands this process the `strata mount --lazy` command
//! line it would have started, and the mount starts without waiting for
//! a process to start and for the memory its check needs.

use anyhow::{Context, Result, bail};
use clap::Parser as _;

/// `strata spare`: what the snapshotter starts.
#[derive(clap::Args)]
pub struct Args {
    /// Memory (MiB) to make ready before waiting
    #[arg(long, default_value_t = 0)]
    prefault_mib: usize,
}

/// Get ready, wait for the command line, and return it parsed: the
/// caller runs it as if this process had been started with it. `None`
/// when the snapshotter went away first.
pub fn wait(a: &Args) -> Result<Option<crate::Cli>> {
    strata_sys::malloc::prefault(a.prefault_mib << 20);
    let Some(work) = strata_sys::daemon::wait_for_work().context("waiting for a spare's work")?
    else {
        return Ok(None);
    };
    // what was made ready is used in the first few hundred milliseconds;
    // from then on freed memory goes back as in any daemon
    strata_sys::malloc::jemalloc_decay_default();
    let cli = crate::Cli::try_parse_from(&work.args).context("a spare's command line")?;
    // a spare runs a lazy mount in the foreground, nothing else
    match &cli.command {
        crate::Command::Mount(m) if m.lazy_foreground() => Ok(Some(cli)),
        _ => bail!("a spare runs `strata mount --lazy --foreground` only"),
    }
}
