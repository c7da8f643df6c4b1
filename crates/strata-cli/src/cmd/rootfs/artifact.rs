//! `strata rootfs push NAME REF` and `strata rootfs pull REF`: templates
//! through an OCI registry (see `strata_block::artifact`).

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use strata_oci::{ImageName, ImageRef};

use crate::Ctx;
use crate::args::RegistryArgs;

/// Arguments of `strata rootfs push`.
#[derive(clap::Args)]
pub struct PushArgs {
    /// Template name or id.
    pub name: String,
    /// [docker://]HOST[:PORT]/REPO[:TAG]
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Packs uploaded at once.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// Size at which a new pack is closed (e.g. 32MiB).
    #[arg(long, default_value = "32MiB")]
    pub pack_size: String,
}

/// Arguments of `strata rootfs pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// [docker://]HOST[:PORT]/REPO[:TAG|@DIGEST]
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
    /// Packs (chunks, for artifacts from before packs) fetched at once
    /// (with --all).
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
}

/// A registry reference: `docker://HOST[:PORT]/REPO[:TAG]` or bare
/// `HOST[:PORT]/REPO[:TAG]`.
fn parse_ref(r: &str) -> Result<ImageRef> {
    let name: ImageName = r
        .parse()
        .with_context(|| format!("parsing reference {r:?}"))?;
    match name {
        ImageName::Qualified(reference @ ImageRef::Docker { .. }) => Ok(reference),
        _ => anyhow::bail!(
            "{r}: templates travel through registries: [docker://]HOST[:PORT]/REPO[:TAG]"
        ),
    }
}

pub fn push(ctx: &Ctx, a: PushArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let id = store.resolve_template(&a.name)?;
    let reference = parse_ref(&a.reference)?;
    let opts = a.registry.options(&store)?;
    let t = Instant::now();
    let r = ctx
        .with_events(|ctl| {
            let po = strata_block::artifact::PushOptions {
                jobs: a.jobs,
                pack_size: strata_block::parse_bytes(&a.pack_size)?,
            };
            strata_block::artifact::push_with(&store, &id, &reference, &opts, &po, ctl)
        })
        .with_context(|| format!("pushing template {} to {reference}", a.name))?;
    let secs = t.elapsed().as_secs_f64();
    let v = crate::render::json_with(&r, serde_json::json!({"id": id, "seconds": secs}));
    let said = format!("pushed {} to {reference} in {secs:.2} s: {r}", a.name);
    ctx.print_with(&v, None::<&str>, said)
}

pub fn pull(ctx: &Ctx, a: PullArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let reference = parse_ref(&a.reference)?;
    let opts = a.registry.options(&store)?;
    let t = Instant::now();
    let r = ctx
        .with_events(|ctl| {
            strata_block::artifact::pull(&store, &reference, &opts, a.all, a.jobs, ctl)
        })
        .with_context(|| format!("pulling template {reference}"))?;
    let name = a.name.clone().unwrap_or_else(|| a.reference.clone());
    store.set_template_name(&name, &r.id)?;
    let secs = t.elapsed().as_secs_f64();
    let v = crate::render::json_with(&r, serde_json::json!({"name": name, "seconds": secs}));
    let said = format!("pulled template {name} in {secs:.2} s: {r}");
    ctx.print_with(&v, None::<&str>, said)
}
