//! `strata verify IMAGE`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

/// Arguments of `strata verify`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest.
    image: String,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    let report = ctx.with_events(|ctl| store.verify_image(&digest, ctl))?;
    let n = report.problems.len();
    // the problems even with --quiet
    ctx.print_with(&report, (n > 0).then_some(&report), &report)?;
    if n == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    if !ctx.json {
        eprintln!("strata: {n} problem(s) in {digest}");
    }
    Ok(ExitCode::FAILURE)
}
