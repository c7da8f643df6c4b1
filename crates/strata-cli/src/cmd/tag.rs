//! `strata tag IMAGE NAME`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

/// Arguments of `strata tag`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest.
    image: String,
    /// The new name.
    name: String,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    if a.name.is_empty() || a.name.parse::<strata_digest::Digest>().is_ok() {
        anyhow::bail!(
            "invalid name {:?}: a name must be non-empty and not a digest",
            a.name
        );
    }
    store.set_ref(&a.name, &digest)?;
    ctx.say(format_args!("tagged {digest} as {}", a.name));
    Ok(ExitCode::SUCCESS)
}
