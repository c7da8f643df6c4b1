//! `strata serve`: the HTTP conversion service, until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::{Context, Result};
use strata_server::config::{Config, DEFAULT_CONFIG};

/// `strata --root DIR serve` converts with the store in DIR.
#[derive(clap::Args)]
pub struct Args {
    /// HOST:PORT or unix:PATH [config: listen; default 127.0.0.1:8080]
    #[arg(long)]
    listen: Option<String>,
    /// The config file (default /etc/strata/serve.toml, if it exists)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(root: PathBuf, a: Args) -> Result<std::process::ExitCode> {
    // before any thread: few arenas, a fixed mmap threshold (jobs come
    // and go for weeks)
    strata_sys::malloc::tune_for_daemon();
    let (path, named) = match &a.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut config = Config::load(&path, named).map_err(anyhow::Error::msg)?;
    if let Some(l) = a.listen {
        config.listen = l;
    }
    super::snapshotter::daemon_logging();
    let store = strata_store::Store::open(&root)
        .with_context(|| format!("opening store {}", root.display()))?;
    let registry = strata_oci::RegistryOptions {
        insecure_registries: config.registries.insecure.clone(),
        credentials: std::sync::Arc::new(strata_oci::FileCredentials::new(
            config.auth_file.clone(),
        )),
        user_agent: format!("strata/{}", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let served = rt.block_on(strata_server::serve(config, store, registry, |addr| {
        tracing::info!("serving on {addr}");
        strata_snapshotter::daemon::notify_systemd("READY=1");
    }));
    // running jobs stay journaled as running and resume at the next start
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    served.context("strata serve")?;
    Ok(std::process::ExitCode::SUCCESS)
}
