//! `strata snapshotter`: serve containerd's snapshots API (a proxy
//! snapshotter) until SIGTERM or SIGINT.

use std::path::PathBuf;

use anyhow::{Context, Result};
use strata_snapshotter::config::{Config, DEFAULT_CONFIG};

/// `strata --root DIR snapshotter` (or `$STRATA_ROOT`) puts the
/// snapshots and their records in DIR [config: snapshotter.root; default
/// /var/lib/containerd/io.containerd.snapshotter.v1.strata].
#[derive(clap::Args)]
pub struct Args {
    /// The unix socket containerd's [proxy_plugins.strata] names
    /// [config: snapshotter.socket; default /run/strata/snapshotter.sock]
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The config file (default /etc/strata/config.toml, if it exists)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(root: Option<PathBuf>, a: Args) -> Result<std::process::ExitCode> {
    let (path, named) = match &a.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    let mut config = Config::load(&path, named).map_err(anyhow::Error::msg)?;
    if let Some(r) = root {
        config.root = r;
    }
    if let Some(s) = a.socket {
        config.socket = s;
    }
    daemon_logging();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("starting the runtime")?;
    let socket = config.socket.clone();
    rt.block_on(strata_snapshotter::daemon::serve(&config, || {
        tracing::info!("serving containerd snapshots on {}", socket.display());
        strata_snapshotter::daemon::notify_systemd("READY=1");
    }))
    .context("strata snapshotter")?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// A daemon's log: stderr (journald under systemd), `info` unless
/// `$STRATA_LOG` says otherwise.
pub fn daemon_logging() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // journald and log files get no colour codes
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}
