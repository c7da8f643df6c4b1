//! `strata pull REF`

use std::process::ExitCode;

use anyhow::{Context, Result};
use strata_oci::pull::{PullOptions, pull_from};
use strata_oci::short_names::{RegistriesConf, resolve_short_name};
use strata_oci::{ImageName, Platform, RegistryOptions, open_source};

use super::human;
use crate::Ctx;
use crate::progress::TermProgress;

/// Arguments of `strata pull`.
#[derive(clap::Args)]
pub struct Args {
    /// Image reference: skopeo transport syntax, or without a transport as
    /// with podman (`HOST[:PORT]/REPO[:TAG]` means docker://; a short name
    /// like `debian:12` is looked for on registries.conf's
    /// unqualified-search-registries, else on docker.io).
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
    let image: ImageName = a
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
        registry: registry_options(&store, a.plain_http, a.authfile.clone()),
        jobs: a.jobs,
        split: a.split.policy(),
    };
    let (reference, source) = match image {
        ImageName::Qualified(r) => {
            let source = open_source(&r, &opts.registry).with_context(|| format!("pulling {r}"))?;
            (r, source)
        }
        ImageName::Short(short) => {
            // the store records the fully qualified name, and the user is
            // told which registry it came from
            let conf = RegistriesConf::load()?;
            let found = resolve_short_name(&short, &conf, &opts.registry, &opts.platform)?;
            if !ctx.quiet {
                for skipped in &found.skipped {
                    eprintln!("strata: short name {:?}: {skipped}", short.to_string());
                }
                eprintln!(
                    "strata: short name {:?} resolved to {} ({})",
                    short.to_string(),
                    found.reference,
                    found.lookup
                );
            }
            (found.reference, found.source)
        }
    };
    let name = reference.to_string();
    let progress = TermProgress::new(!ctx.quiet && !ctx.json);
    let summary = pull_from(&store, source.as_ref(), &name, &opts, &progress)
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

/// Registry options for a command: flags plus the store's insecure list.
pub fn registry_options(
    store: &strata_store::Store,
    plain_http: bool,
    auth_file: Option<std::path::PathBuf>,
) -> RegistryOptions {
    RegistryOptions {
        plain_http,
        auth_file,
        user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
        insecure_registries: insecure_registries(store),
        stall_timeout: None,
    }
}

/// Registries named in `$STRATA_ROOT/registries.json` (`{"insecure":
/// ["host:port", ...]}`) are reached over plain HTTP without `--plain-http`.
fn insecure_registries(store: &strata_store::Store) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Conf {
        #[serde(default)]
        insecure: Vec<String>,
    }
    std::fs::read(store.root().join("registries.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Conf>(&b).ok())
        .map(|c| c.insecure)
        .unwrap_or_default()
}
