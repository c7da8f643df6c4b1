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
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("{p}");
        }
        if report.problems.is_empty() && !ctx.quiet {
            let tree = report
                .tree_digest
                .map(|d| d.to_string())
                .unwrap_or_default();
            println!("verified {digest}: {} objects, tree {tree}", report.objects);
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        if !ctx.json {
            eprintln!("strata: {} problem(s) in {digest}", report.problems.len());
        }
        ExitCode::FAILURE
    })
}
