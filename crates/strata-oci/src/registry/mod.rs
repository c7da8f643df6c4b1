//! The registry client (OCI distribution spec, blocking).
//!
//! ```text
//!  RegistryOptions ─────────────┬─ credentials: Arc<dyn CredentialProvider>
//!   (cloned per request)        │     FileCredentials (CLI) | StaticCredentials (daemons)
//!                               ├─ client: RegistryClient (shared pools)
//!                               └─ plain_http, insecure_registries, user_agent, stall_timeout
//!         │ new()
//!         ▼
//!  RegistrySource (ImageSource) ─┐
//!  RegistryPusher ───────────────┴─ Session: base URL, auth state, retries ── reqwest Client
//! ```
//!
//! - Auth: anonymous first; a 401 challenge `Basic` or
//!   `Bearer realm=…` is answered with the credentials the
//!   [`CredentialProvider`] gave for the host (a token fetched from the
//!   realm and cached per source). Credentials and tokens never appear in
//!   errors, logs or `Debug` output.
//! - Transport: one [`RegistryClient`] per [`RegistryOptions`] (clones
//!   share it) keeps connections alive across sources, pushers and
//!   threads. Connection failures and 5xx are retried with exponential
//!   backoff (200 ms, x2, 5 attempts). A blob stream that breaks mid-way is
//!   resumed with `Range: bytes=N-` from the byte it reached; a registry
//!   that ignores Range (200) is skipped forward instead. Several ranges
//!   go in one request (`multipart/byteranges`).
//! - [`RegistrySource`]: manifests (all four types in `Accept`), configs
//!   and blobs, verified where they are resolved.
//! - [`RegistryPusher`]: blobs (`HEAD` first, then `POST` and one
//!   monolithic `PUT`) and manifests; tokens are asked for
//!   `repository:REPO:pull,push`.
//! - [`RegistryConfig`]: the store's `registries.json`.
//!
//! A daemon keeps one `RegistryOptions` (one client) for its life and, per
//! request, passes the caller's credentials without touching files:
//!
//! ```no_run
//! use std::sync::Arc;
//! use strata_oci::registry::{Credentials, RegistryOptions, RegistrySource, StaticCredentials};
//!
//! # fn f(base: &RegistryOptions, user: &str, password: &str) -> Result<(), strata_oci::OciError> {
//! let creds = StaticCredentials::new().with("registry.example:5000", Credentials::new(user, password));
//! let opts = base.with_credentials(Arc::new(creds));
//! let source = RegistrySource::new("docker://registry.example:5000/app:1".parse()?, &opts)?;
//! # Ok(()) }
//! ```

mod auth;
mod config;
mod push;
mod source;
mod transport;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use auth::{CredentialProvider, Credentials, FileCredentials, StaticCredentials};
pub use config::RegistryConfig;
pub use push::{BlobContent, RegistryPusher};
pub use source::RegistrySource;

/// Parsers of registry answers, public only for the fuzz targets in
/// `fuzz/` (not an API: names and signatures may change).
#[doc(hidden)]
pub mod fuzzing {
    pub use super::auth::parse_challenge;
    pub use super::transport::{parse_content_range, parse_multipart};
}
pub use transport::RegistryClient;

/// Registry access options. Cloning is cheap and shares the HTTP client
/// (connection pools) and the credential provider.
#[derive(Clone)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry.
    pub plain_http: bool,
    /// Hosts (`host[:port]`) reached over plain HTTP (see
    /// [`RegistryConfig`]).
    pub insecure_registries: Vec<String>,
    /// Where credentials come from; by default the auth files
    /// ([`FileCredentials`] with no explicit file).
    pub credentials: Arc<dyn CredentialProvider>,
    /// User-Agent header (`strata` when empty).
    pub user_agent: String,
    /// How long one request may stall before it is retried (60 s when
    /// unset); lazy mounts use a short one so a read fails in bounded time.
    pub stall_timeout: Option<Duration>,
    /// The HTTP client shared by every source and pusher built from these
    /// options and their clones.
    pub client: RegistryClient,
}

impl RegistryOptions {
    /// The same options (and the same shared client) with credentials from
    /// `provider`: how a daemon passes one request's credentials.
    pub fn with_credentials(&self, provider: Arc<dyn CredentialProvider>) -> RegistryOptions {
        RegistryOptions {
            credentials: provider,
            ..self.clone()
        }
    }

    /// These options with the store's `registries.json` applied (its
    /// insecure hosts added).
    pub fn with_config(mut self, config: &RegistryConfig) -> RegistryOptions {
        for h in &config.insecure {
            if !self.insecure_registries.contains(h) {
                self.insecure_registries.push(h.clone());
            }
        }
        self
    }
}

impl Default for RegistryOptions {
    /// TLS, credentials from the default auth files, a new shared client.
    fn default() -> RegistryOptions {
        RegistryOptions {
            plain_http: false,
            insecure_registries: Vec::new(),
            credentials: Arc::new(FileCredentials::default()),
            user_agent: String::new(),
            stall_timeout: None,
            client: RegistryClient::new(),
        }
    }
}

impl fmt::Debug for RegistryOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryOptions")
            .field("plain_http", &self.plain_http)
            .field("insecure_registries", &self.insecure_registries)
            // providers' Debug never shows secrets (a trait requirement)
            .field("credentials", &self.credentials)
            .field("user_agent", &self.user_agent)
            .field("stall_timeout", &self.stall_timeout)
            .field("client", &self.client)
            .finish()
    }
}
