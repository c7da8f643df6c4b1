//! strata as a containerd proxy snapshotter: containerd's snapshots gRPC
//! API on a unix socket (`[proxy_plugins.strata] type = "snapshot"`).
//!
//! ```text
//! containerd --gRPC--> service (decode) --spawn_blocking--> core::Snapshotter
//!                                                            records: <root>/meta/<id>.json
//!                                                            dirs:    <root>/snapshots/<id>/{fs,work}
//! ```
//!
//! Layers containerd unpacks itself (no strata labels) follow the overlay
//! contract: Prepare returns a bind mount (no parent) or an overlay
//! (upper = the snapshot's `fs`, lowers = its committed parents' `fs`),
//! containerd's applier writes the layer, Commit records it.
#![deny(missing_docs)]

pub mod config;
pub mod core;
pub mod daemon;
pub mod filters;
pub mod labels;
pub mod proto;
pub mod rpull;
pub mod service;

pub use config::Config;
pub use core::Snapshotter;
