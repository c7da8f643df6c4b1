//! `strata mounts`: lazy mounts and served templates, with their progress.

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let entries = strata_mounts::list(&ctx.root);
    if entries.is_empty() && !ctx.json {
        ctx.say("no lazy mounts or served templates");
    }
    ctx.print_lines(&entries)
}
