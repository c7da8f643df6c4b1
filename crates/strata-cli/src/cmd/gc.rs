//! `strata gc [--dry-run]`

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::Ctx;

/// Arguments of `strata gc`.
#[derive(clap::Args)]
pub struct Args {
    /// Show what would be removed without removing it.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    // waits for running operations (daemons between operations hold only
    // leases, which gc honours); names what still holds the lock after
    // strata_store::GC_LOCK_WAIT instead of waiting forever
    let store = strata_store::Store::open_for_gc(&ctx.root)
        .with_context(|| format!("opening store {} for gc", ctx.root.display()))?;
    let report = ctx.with_events(|ctl| store.gc(a.dry_run, ctl))?;
    ctx.print_with(&report, Some(&report), format!("{report:#}"))
}
