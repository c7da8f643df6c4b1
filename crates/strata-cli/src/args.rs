//! Argument groups several commands share (flattened into theirs).

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{Context, Result};
use strata_oci::short_names::open_name;
use strata_oci::{
    FileCredentials, ImageRef, ImageSource, Platform, RegistryConfig, RegistryOptions,
};

/// How to reach registries.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RegistryArgs {
    /// Use plain HTTP (no TLS) for the registry.
    #[arg(long)]
    pub plain_http: bool,
    /// Registry credentials file (auth.json format).
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    pub authfile: Option<PathBuf>,
}

impl RegistryArgs {
    /// Registry options for these flags and the store's `registries.json`
    /// (hosts listed as insecure are reached over plain HTTP); a broken
    /// file is an error naming it.
    pub fn options(&self, store: &strata_store::Store) -> Result<RegistryOptions> {
        let config = RegistryConfig::load(store.root())?;
        Ok(self.flags().with_config(&config))
    }

    /// Registry options for these flags alone.
    pub fn flags(&self) -> RegistryOptions {
        RegistryOptions {
            plain_http: self.plain_http,
            credentials: Arc::new(FileCredentials::new(self.authfile.clone())),
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
    }
}

/// Open what the user named (see `strata_oci::short_names::open_name`):
/// the fully qualified reference (the name the store records) and its
/// source. How a short name resolved is said on stderr.
pub fn open_reference(
    ctx: &crate::Ctx,
    text: &str,
    registry: &RegistryOptions,
    platform: &Platform,
) -> Result<(ImageRef, Box<dyn ImageSource>)> {
    let opened = open_name(text, registry, platform).with_context(|| format!("opening {text}"))?;
    if !ctx.quiet {
        opened.notes.iter().for_each(|n| eprintln!("strata: {n}"));
    }
    Ok((opened.reference, opened.source))
}

/// The image `text` names in the store, else pulled (for the host's
/// platform) from what `text` references (see [`open_reference`]).
pub fn image_or_pull(
    ctx: &crate::Ctx,
    store: &strata_store::Store,
    text: &str,
    registry: &RegistryOptions,
) -> Result<strata_digest::Digest> {
    let not_here = match store.resolve_image(text) {
        Ok(d) => return Ok(d),
        Err(e) => e,
    };
    let opts = strata_oci::pull::PullOptions {
        platform: Platform::host_default(),
        registry: registry.clone(),
        jobs: 3,
        split: strata_store::SplitPolicy::Auto(strata_store::DEFAULT_SPLIT_THRESHOLD),
    };
    let (reference, source) = open_reference(ctx, text, registry, &opts.platform)
        .with_context(|| format!("{not_here}; pulling it"))?;
    let name = reference.to_string();
    let pulled =
        ctx.with_events(|ctl| strata_oci::pull::pull_from(store, &*source, &name, &opts, ctl));
    Ok(pulled
        .with_context(|| format!("pulling {name}"))?
        .manifest_digest)
}

/// How an image's EROFS tree is stored.
#[derive(clap::Args, Debug, Clone)]
pub struct SplitArgs {
    /// Keep a layer-chain prefix shared by other images as its own EROFS
    /// base part (auto: when at least --split-threshold images share it).
    #[arg(long, value_enum, default_value_t = SplitMode::Auto)]
    split_base: SplitMode,
    /// Images that must share a base chain before `auto` splits it out.
    #[arg(long, default_value_t = strata_store::DEFAULT_SPLIT_THRESHOLD)]
    split_threshold: usize,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
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
