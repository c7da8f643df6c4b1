//! `strata images`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;
use strata_ops::human_bytes as human;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let images = ctx.open_store()?.images()?;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.quiet {
        for i in &images {
            println!("{}", i.manifest_digest);
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<60} {:<19} {:>6} {:>10}",
        "NAME", "DIGEST", "LAYERS", "SIZE"
    );
    for i in &images {
        let none = ["<none>".to_string()];
        for n in if i.names.is_empty() {
            &none
        } else {
            &i.names[..]
        } {
            let (d, size) = (i.manifest_digest.short(), human(i.compressed_size));
            println!("{n:<60} {d:<19} {:>6} {size:>10}", i.layers);
        }
    }
    Ok(ExitCode::SUCCESS)
}
