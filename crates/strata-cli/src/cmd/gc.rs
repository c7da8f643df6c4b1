//! `strata gc [--dry-run]`

use std::process::ExitCode;

use anyhow::{Context, Result};

use super::human;
use crate::Ctx;

/// Arguments of `strata gc`.
#[derive(clap::Args)]
pub struct Args {
    /// Show what would be removed without removing it.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    // A lazy mount's daemon holds the store (its fetched files belong to
    // no image yet): gc would wait for it forever, so say so instead.
    let serving: Vec<String> = super::lazy::serving(&ctx.root)
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    if !serving.is_empty() {
        anyhow::bail!(
            "lazy mounts serve from this store ({}): gc needs the store to itself; `strata umount` them first",
            serving.join(", ")
        );
    }
    let served: Vec<String> = super::rootfs_serve::serving(&ctx.root)
        .iter()
        .map(|d| d.display().to_string())
        .collect();
    if !served.is_empty() {
        anyhow::bail!(
            "templates are served from this store ({}): gc needs the store to itself; `strata umount` them first",
            served.join(", ")
        );
    }
    let store = strata_store::Store::open_exclusive(&ctx.root)
        .with_context(|| format!("opening store {} for gc", ctx.root.display()))?;
    let report = store.gc(a.dry_run)?;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if a.dry_run { "would free" } else { "freed" };
    if !ctx.quiet {
        for i in &report.images {
            println!("image {i}");
        }
        for l in &report.layers {
            println!("layer {l}");
        }
    }
    println!(
        "{verb} {}: {} images, {} layers, {} objects, {} blob aliases",
        human(report.bytes_freed),
        report.images.len(),
        report.layers.len(),
        report.objects,
        report.blob_aliases
    );
    Ok(ExitCode::SUCCESS)
}
