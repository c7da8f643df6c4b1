//! `strata inspect IMAGE`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

/// Arguments of `strata inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest.
    image: String,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    let out = store.inspect_image(&digest)?;
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
