//! `strata mounts`: lazy mounts and served templates, with their progress.

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let entries = strata_mounts::list(&ctx.root);
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(ExitCode::SUCCESS);
    }
    for e in &entries {
        println!("{e}");
    }
    if entries.is_empty() && !ctx.quiet {
        println!("no lazy mounts or served templates");
    }
    Ok(ExitCode::SUCCESS)
}
