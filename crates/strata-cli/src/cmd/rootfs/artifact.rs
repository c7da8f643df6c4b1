//! `strata rootfs push NAME REF` and `strata rootfs pull REF`: templates
//! through an OCI registry (see `strata_block::artifact`).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use strata_oci::ImageRef;

use strata_ops::human_bytes as human;

use crate::Ctx;
use crate::args::RegistryArgs;

/// Arguments of `strata rootfs push`.
#[derive(clap::Args)]
pub struct PushArgs {
    /// Template name or id.
    pub name: String,
    /// docker://HOST[:PORT]/REPO[:TAG]
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Chunks uploaded at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

/// Arguments of `strata rootfs pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// docker://HOST[:PORT]/REPO[:TAG|@DIGEST]
    pub reference: String,
    /// Name for the template (default: the reference as given).
    #[arg(long)]
    pub name: Option<String>,
    /// Fetch every chunk now (default: the map only; `rootfs serve`
    /// fetches chunks as they are read).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Chunks fetched at once (with --all).
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

fn parse_ref(r: &str) -> Result<ImageRef> {
    let reference: ImageRef = r
        .parse()
        .with_context(|| format!("parsing reference {r:?}"))?;
    if !matches!(reference, ImageRef::Docker { .. }) {
        anyhow::bail!("{r}: templates travel through registries: docker://HOST[:PORT]/REPO[:TAG]");
    }
    Ok(reference)
}

pub fn push(ctx: &Ctx, a: PushArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let id = store.resolve_template(&a.name)?;
    let reference = parse_ref(&a.reference)?;
    let opts = a.registry.options(&store)?;
    let t = Instant::now();
    let render = ctx.render();
    let r = strata_block::artifact::push(&store, &id, &reference, &opts, a.jobs, ctx.ctl(&render));
    render.finish();
    let r = r.with_context(|| format!("pushing template {} to {reference}", a.name))?;
    if ctx.json {
        let mut v = serde_json::to_value(&r)?;
        v["id"] = serde_json::json!(id.to_string());
        v["seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
        println!("{v}");
    } else if !ctx.quiet {
        println!(
            "pushed {} to {reference} ({}) in {:.2} s: {} of {} chunks uploaded ({}), {} already there",
            a.name,
            r.manifest_digest,
            t.elapsed().as_secs_f64(),
            r.uploaded,
            r.chunks,
            human(r.bytes_uploaded),
            human(r.bytes_skipped)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn pull(ctx: &Ctx, a: PullArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let reference = parse_ref(&a.reference)?;
    let opts = a.registry.options(&store)?;
    let t = Instant::now();
    let render = ctx.render();
    let r =
        strata_block::artifact::pull(&store, &reference, &opts, a.all, a.jobs, ctx.ctl(&render));
    render.finish();
    let r = r.with_context(|| format!("pulling template {reference}"))?;
    let name = a.name.clone().unwrap_or_else(|| a.reference.clone());
    store.set_template_name(&name, &r.id)?;
    if ctx.json {
        let mut v = serde_json::to_value(&r)?;
        v["name"] = serde_json::json!(name);
        v["seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
        println!("{v}");
    } else if !ctx.quiet {
        println!(
            "pulled template {name} ({}) in {:.2} s: {} chunks, {} local, {} fetched ({}){}",
            r.id,
            t.elapsed().as_secs_f64(),
            r.chunks,
            r.chunks_local,
            r.fetched,
            human(r.bytes_fetched),
            if r.chunks_local + r.fetched < r.chunks {
                "; the rest come on demand (`strata rootfs serve`)"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
