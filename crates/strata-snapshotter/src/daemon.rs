//! Serving: the socket, readiness, signals. Stopping never unmounts
//! anything: containers keep running while the snapshotter restarts.

use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::config::Config;
use crate::core::Snapshotter;
use crate::proto::snapshots::snapshots_server::SnapshotsServer;
use crate::service::Service;

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state under the root did not open.
    #[error("opening snapshotter state in {root}: {source}")]
    Open {
        /// The root.
        root: String,
        /// Why.
        source: crate::core::SnapError,
    },
    /// The socket could not be made.
    #[error("listening on {socket}: {source}")]
    Listen {
        /// The socket.
        socket: String,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("serving on {socket}: {source}")]
    Serve {
        /// The socket.
        socket: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

fn bind(socket: &Path) -> std::io::Result<UnixListener> {
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d)?;
    }
    // a socket left by an earlier run (a live one would answer: containerd
    // talks to whichever is bound last, so two must not run; the caller's
    // unit makes sure)
    match std::fs::remove_file(socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(socket)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serve until SIGINT or SIGTERM; `ready` is called once the socket
/// accepts.
pub async fn serve(config: &Config, ready: impl FnOnce()) -> Result<(), ServeError> {
    let root = config.root.clone();
    let prefetch = config.prefetch;
    let fallback = config.lazy_fallback == crate::config::LazyFallback::Pull;
    let spare_mib = config.spare_mib;
    let containerd_root = config.containerd_root.clone();
    let store = config.store.clone().unwrap_or_else(|| root.join("store"));
    let core = tokio::task::spawn_blocking(move || {
        Snapshotter::open_with_store(&root, &store).map(|mut s| {
            s.set_prefetch(prefetch.as_str());
            s.set_lazy_fallback(fallback);
            s.set_spare(spare_mib);
            s.set_containerd_root(&containerd_root);
            s
        })
    })
    .await
    .expect("opening does not panic")
    .map_err(|source| ServeError::Open {
        root: config.root.display().to_string(),
        source,
    })?;
    let socket = config.socket.display().to_string();
    let listener = bind(&config.socket).map_err(|source| ServeError::Listen {
        socket: socket.clone(),
        source,
    })?;
    ready();
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping (mounts stay)");
    };
    Server::builder()
        .add_service(SnapshotsServer::new(Service::new(Arc::new(core))))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop)
        .await
        .map_err(|source| ServeError::Serve { socket, source })
}

/// Tell systemd (`Type=notify`) `state`, when it asked (`$NOTIFY_SOCKET`).
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("notifying systemd: {e}");
            return;
        }
    };
    // an abstract socket is named with a leading '@'
    let r = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = r {
        tracing::warn!("notifying systemd: {e}");
    }
}
