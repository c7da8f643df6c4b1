//! Argument groups several commands share (flattened into theirs).

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{Context, Result};
use strata_oci::{FileCredentials, Platform, RegistryConfig, RegistryOptions};

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
        Ok(RegistryOptions {
            plain_http: self.plain_http,
            credentials: Arc::new(FileCredentials::new(self.authfile.clone())),
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
        .with_config(&config))
    }
}

/// `--platform os/arch[/variant]`, default the host's.
pub fn platform(p: Option<&str>) -> Result<Platform> {
    match p {
        Some(p) => p.parse().with_context(|| format!("parsing platform {p:?}")),
        None => Ok(Platform::host_default()),
    }
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
