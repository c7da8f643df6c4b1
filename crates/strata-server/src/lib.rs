//! `strata serve`: an HTTP service that converts images to lazy formats
//! as jobs, verifies every result from the registry before calling it a
//! success, tags last, and answers removed or unknown formats explicitly
//! with the source image to use instead. Also the client side
//! (`strata convert --via`).
//!
//! The library core does the work (pull, convert, push, verify); this
//! crate only admits, queues, journals and answers.

pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod jobs;
pub mod problem;
pub mod service;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use strata_oci::RegistryOptions;
use strata_store::Store;

pub use config::Config;

/// Why the service stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding, the journal, the tokens.
    #[error("{0}")]
    Setup(String),
    /// Serving.
    #[error("serving on {listen}: {source}")]
    Io {
        /// The address.
        listen: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Serve until SIGTERM or SIGINT. `ready` runs once the socket accepts.
pub async fn serve(
    config: Config,
    store: Store,
    registry: RegistryOptions,
    ready: impl FnOnce(&str),
) -> Result<(), ServeError> {
    let tokens = auth::Tokens::load(&config.tokens_file).map_err(ServeError::Setup)?;
    let state_dir = config
        .state_dir
        .clone()
        .unwrap_or_else(|| store.root().join("serve"));
    let listen = config.listen.clone();
    let shared = service::Shared::start(config, store, registry, tokens, state_dir)
        .map_err(ServeError::Setup)?;
    let app = api::router(shared.clone());
    let s2 = shared.clone();
    let stop = async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(e) => {
                    tracing::error!("SIGTERM handler: {e}");
                    return std::future::pending().await;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!(
            "stopping: no new jobs; running jobs stay journaled and resume at the next start"
        );
        s2.shutting_down.store(true, Ordering::SeqCst);
    };
    let io = |source| ServeError::Io {
        listen: listen.clone(),
        source,
    };
    if let Some(path) = listen.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let _ = std::fs::remove_file(&path);
        let l = tokio::net::UnixListener::bind(&path).map_err(io)?;
        ready(&listen);
        axum::serve(l, app)
            .with_graceful_shutdown(stop)
            .await
            .map_err(io)
    } else {
        let l = tokio::net::TcpListener::bind(&listen).await.map_err(io)?;
        let addr = l.local_addr().map_err(io)?.to_string();
        ready(&addr);
        axum::serve(l, app)
            .with_graceful_shutdown(stop)
            .await
            .map_err(io)
    }
}
