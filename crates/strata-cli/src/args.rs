//! Argument groups several commands share (flattened into theirs).

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{Context, Result};
use strata_oci::short_names::{RegistriesConf, resolve_short_name};
use strata_oci::{
    FileCredentials, ImageName, ImageRef, ImageSource, Platform, RegistryConfig, RegistryOptions,
    open_source,
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
        Ok(RegistryOptions {
            plain_http: self.plain_http,
            credentials: Arc::new(FileCredentials::new(self.authfile.clone())),
            user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        }
        .with_config(&config))
    }
}

/// Open what the user named: a transport reference (`docker://`, `oci:`,
/// ...), a bare `HOST[:PORT]/REPO[:TAG]` (docker://), or a short name
/// resolved as podman does (registries.conf's unqualified-search-registries,
/// else docker.io; the user is told which registry answered). Returns the
/// fully qualified reference (the name the store records) and its source.
pub fn open_reference(
    ctx: &crate::Ctx,
    text: &str,
    registry: &RegistryOptions,
    platform: &Platform,
) -> Result<(ImageRef, Box<dyn ImageSource>)> {
    let image: ImageName = text
        .parse()
        .with_context(|| format!("parsing image reference {text:?}"))?;
    match image {
        ImageName::Qualified(r) => {
            let source = open_source(&r, registry).with_context(|| format!("opening {r}"))?;
            Ok((r, source))
        }
        ImageName::Short(short) => {
            let conf = RegistriesConf::load()?;
            let found = resolve_short_name(&short, &conf, registry, platform)?;
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
            Ok((found.reference, found.source))
        }
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
