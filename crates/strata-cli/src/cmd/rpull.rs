//! `strata rpull REF`: pull into containerd through the strata snapshotter
//! (nothing but the manifest and config goes to containerd's content store).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use strata_snapshotter::rpull::{RpullOptions, rpull};

use crate::Ctx;
use crate::args::RegistryArgs;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference: HOST[:PORT]/REPO[:TAG|@DIGEST] or docker://...
    reference: String,
    /// containerd's socket
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = "/run/containerd/containerd.sock"
    )]
    address: PathBuf,
    /// containerd namespace (k8s.io for Kubernetes)
    #[arg(
        long,
        short = 'n',
        env = "CONTAINERD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// The snapshotter's name in containerd's [proxy_plugins]
    #[arg(long, default_value = "strata")]
    snapshotter: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let opts = RpullOptions {
        address: a.address,
        namespace: a.namespace,
        snapshotter: a.snapshotter,
        registry: a.registry.flags(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let s = rt
        .block_on(rpull(&a.reference, &opts))
        .with_context(|| format!("rpull {}", a.reference))?;
    let human = format!(
        "{} {}: {} layers ({} made available by strata) in {:.2} s",
        s.name, s.manifest_digest, s.layers, s.layers_prepared, s.seconds
    );
    ctx.print_with(&s, Some(s.manifest_digest), &human)
}
