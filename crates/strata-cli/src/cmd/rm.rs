//! `strata rm IMAGE...`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

/// Arguments of `strata rm`.
#[derive(clap::Args)]
pub struct Args {
    /// Image names or manifest digests.
    #[arg(required = true)]
    images: Vec<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    for image in &a.images {
        let (digest, names) = store.remove_image(image)?;
        names
            .iter()
            .for_each(|n| ctx.say(format_args!("untagged {n}")));
        if !store.has_image(&digest) {
            ctx.say(format_args!(
                "removed {digest} (space is freed by strata gc)"
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}
