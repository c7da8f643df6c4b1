//! `strata pull REF`

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use strata_oci::pull::{PullOptions, pull};
use strata_oci::{FileCredentials, ImageRef, Platform, RegistryConfig, RegistryOptions};

use super::human;
use crate::Ctx;
use crate::progress::TermProgress;

/// Arguments of `strata pull`.
#[derive(clap::Args)]
pub struct Args {
    /// Image reference (skopeo transport syntax).
    reference: String,
    /// Use plain HTTP for the registry (no TLS).
    #[arg(long)]
    plain_http: bool,
    /// Platform to pick from an index, os/arch[/variant].
    #[arg(long)]
    platform: Option<String>,
    /// Registry credentials file (auth.json format).
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    authfile: Option<std::path::PathBuf>,
    /// Layers downloaded at once.
    #[arg(long, default_value_t = 3)]
    jobs: usize,
    #[command(flatten)]
    split: SplitArgs,
}

/// How an image's EROFS tree is stored.
#[derive(clap::Args)]
pub struct SplitArgs {
    /// Keep a layer-chain prefix shared by other images as its own EROFS
    /// base part (auto: when at least --split-threshold images share it).
    #[arg(long, value_enum, default_value_t = SplitMode::Auto)]
    split_base: SplitMode,
    /// Images that must share a base chain before `auto` splits it out.
    #[arg(long, default_value_t = strata_store::DEFAULT_SPLIT_THRESHOLD)]
    split_threshold: usize,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SplitMode {
    Auto,
    Never,
    Always,
}

impl SplitArgs {
    /// The store's policy for these flags.
    pub fn policy(&self) -> strata_store::SplitPolicy {
        match self.split_base {
            SplitMode::Auto => strata_store::SplitPolicy::Auto(self.split_threshold),
            SplitMode::Never => strata_store::SplitPolicy::Never,
            SplitMode::Always => strata_store::SplitPolicy::Always,
        }
    }
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let reference: ImageRef = a
        .reference
        .parse()
        .with_context(|| format!("parsing image reference {:?}", a.reference))?;
    let platform = match &a.platform {
        Some(p) => p
            .parse()
            .with_context(|| format!("parsing platform {p:?}"))?,
        None => Platform::host_default(),
    };
    let store = ctx.open_store()?;
    let opts = PullOptions {
        platform,
        registry: registry_options(&store, a.plain_http, a.authfile.clone())?,
        jobs: a.jobs,
        split: a.split.policy(),
    };
    let name = reference.to_string();
    let progress = TermProgress::new(!ctx.quiet && !ctx.json);
    let summary = pull(&store, &reference, &name, &opts, &progress)
        .with_context(|| format!("pulling {name}"));
    progress.finish();
    let summary = summary?;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if ctx.quiet {
        println!("{}", summary.manifest_digest);
    } else {
        println!(
            "pulled {} {}: layers {} reused, {} fetched; {} downloaded, {} written, {} files deduplicated",
            summary.name,
            summary.manifest_digest,
            summary.layers_reused,
            summary.layers_fetched,
            human(summary.bytes_downloaded),
            human(summary.bytes_written),
            summary.files_deduplicated
        );
        if let Some(t) = &summary.tree_digest {
            println!("tree {t}");
        }
    }
    if !ctx.quiet {
        for n in &summary.notes {
            eprintln!("strata: {n}");
        }
    }
    if let Some(e) = &summary.erofs_error {
        eprintln!("strata: warning: {} cannot be mounted: {e}", summary.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// Registry options for a command: flags, credentials from the auth files
/// (`--authfile` first), and the store's `registries.json` (an error when
/// it does not parse).
pub fn registry_options(
    store: &strata_store::Store,
    plain_http: bool,
    auth_file: Option<std::path::PathBuf>,
) -> Result<RegistryOptions> {
    let config = RegistryConfig::load(store.root())?;
    Ok(RegistryOptions {
        plain_http,
        credentials: Arc::new(FileCredentials::new(auth_file)),
        user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
        ..RegistryOptions::default()
    }
    .with_config(&config))
}
