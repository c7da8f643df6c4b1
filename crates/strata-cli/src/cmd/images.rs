//! `strata images`

use std::process::ExitCode;

use anyhow::Result;
use strata_store::ImageSummary;

use crate::Ctx;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let images = ctx.open_store()?.images()?;
    if ctx.quiet && !ctx.json {
        images
            .iter()
            .for_each(|i| println!("{}", i.manifest_digest));
        return Ok(ExitCode::SUCCESS);
    }
    if !ctx.json {
        println!("{}", ImageSummary::header());
    }
    ctx.print_lines(&images)
}
