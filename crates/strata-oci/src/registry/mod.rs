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
mod tls;
mod transport;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use auth::{CredentialProvider, Credentials, FileCredentials, StaticCredentials};
pub use config::RegistryConfig;
pub use push::{BlobContent, RegistryPusher};
pub use source::RegistrySource;
pub use transport::last_received;

/// Parsers of registry answers, public only for the fuzz targets in
/// `fuzz/` (not an API: names and signatures may change).
#[doc(hidden)]
pub mod fuzzing {
    pub use super::auth::parse_challenge;
    pub use super::transport::{parse_content_range, parse_content_range_span, parse_multipart};
}
pub use transport::{
    DEFAULT_MIN_RATE, DEFAULT_RANGE_TIMEOUT, DEFAULT_RATE_WINDOW, MAX_REDIRECTS, RegistryClient,
};

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
    /// How long one range request (the reads of partial pulls and lazy
    /// mounts) may take in all, connecting, retries and body included
    /// ([`DEFAULT_RANGE_TIMEOUT`], 30 s, when unset): a registry that
    /// accepts connections and never answers, or answers a byte at a time,
    /// fails the read within this.
    pub range_timeout: Option<Duration>,
    /// Slowest a blob or document stream may be, in bytes per second over
    /// each [`rate_window`](Self::rate_window)
    /// ([`DEFAULT_MIN_RATE`], 1 KiB/s, when unset; `Some(0)`: no minimum).
    /// A slower stream counts as a dropped connection (resumed, at most
    /// 5 attempts).
    pub min_rate: Option<u64>,
    /// The window [`min_rate`](Self::min_rate) is measured over
    /// ([`DEFAULT_RATE_WINDOW`], 30 s, when unset).
    pub rate_window: Option<Duration>,
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
            range_timeout: None,
            min_rate: None,
            rate_window: None,
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
            .field("range_timeout", &self.range_timeout)
            .field("min_rate", &self.min_rate)
            .field("rate_window", &self.rate_window)
            .field("client", &self.client)
            .finish()
    }
}
