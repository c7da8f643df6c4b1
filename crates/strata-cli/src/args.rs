//! Argument groups several commands share (flattened into theirs).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use strata_oci::pull::PullOptions;
use strata_oci::{FileCredentials, RegistryConfig, RegistryOptions, store_or_pull};

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

/// The image `text` names in the store, else pulled (for the host's
/// platform; see `strata_oci::store_or_pull`). How a short name resolved
/// is said on stderr.
pub fn image_or_pull(
    ctx: &crate::Ctx,
    store: &strata_store::Store,
    text: &str,
    registry: &RegistryOptions,
) -> Result<strata_digest::Digest> {
    let opts = PullOptions::host(registry.clone());
    let found = ctx.with_events(|ctl| store_or_pull::image_or_pull(store, text, &opts, ctl))?;
    ctx.notes(&found.notes);
    Ok(found.manifest_digest)
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
