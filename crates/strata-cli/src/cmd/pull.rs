//! `strata pull REF`

use std::process::ExitCode;

use anyhow::{Context, Result};
use strata_oci::pull::{PullOptions, pull_from};
use strata_oci::short_names::open_name;

use crate::Ctx;
use crate::args::{RegistryArgs, SplitArgs};

/// Arguments of `strata pull`.
#[derive(clap::Args)]
pub struct Args {
    /// Image reference: skopeo transport syntax, or without a transport as
    /// with podman (`HOST[:PORT]/REPO[:TAG]` means docker://; a short name
    /// like `debian:12` is looked for on registries.conf's
    /// unqualified-search-registries, else on docker.io).
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Platform to pick from an index, os/arch[/variant].
    #[arg(long)]
    platform: Option<strata_oci::Platform>,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
    #[command(flatten)]
    split: SplitArgs,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let opts = PullOptions {
        platform: a
            .platform
            .unwrap_or_else(strata_oci::Platform::host_default),
        registry: a.registry.options(&store)?,
        jobs: a.jobs,
        split: a.split.policy(),
        partial: true,
    };
    let opened = open_name(&a.reference, &opts.registry, &opts.platform)
        .with_context(|| format!("opening {}", a.reference))?;
    ctx.notes(&opened.notes);
    let (name, source) = (opened.reference.to_string(), opened.source);
    let summary = ctx
        .with_events(|ctl| pull_from(&store, source.as_ref(), &name, &opts, ctl))
        .with_context(|| format!("pulling {name}"))?;
    ctx.print_with(&summary, Some(summary.manifest_digest), &summary)
}
