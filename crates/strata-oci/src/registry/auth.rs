//! Registry authentication: where credentials come from and how a 401
//! challenge is answered.
//!
//! Credentials come from a [`CredentialProvider`], asked once per source or
//! pusher for the registry host: [`FileCredentials`] reads the usual auth
//! files (the CLI), [`StaticCredentials`] holds values a caller built in
//! memory (a snapshotter handed credentials by CRI, an HTTP request
//! carrying its own).
//!
//! Requests go anonymous first. A `401` with `WWW-Authenticate: Basic` is
//! answered with the user and password; `Bearer realm=…` with a token from
//! the realm (asked with the user and password, or with an identity token
//! as an OAuth2 refresh token), or with a registry token the caller already
//! holds. Tokens are cached by scope per source: a token is never shared
//! between sources, because two sources may run for two callers with
//! different credentials.
//!
//! Credentials and tokens never appear in errors, logs or `Debug` output;
//! messages say where credentials came from (a file path, "the caller").

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use reqwest::blocking::{Client, RequestBuilder};
use reqwest::header::CONTENT_TYPE;

use super::transport::error_chain;
use crate::OciError;

/// Credentials for one registry: a user and password, an identity token
/// or a registry token. `Debug` redacts the secret.
#[derive(Clone)]
pub struct Credentials {
    secret: Secret,
    /// Where they came from (a file path, "the caller"); safe to show.
    source: String,
}

/// The secret part of [`Credentials`]. No `Debug`: never printed.
#[derive(Clone)]
enum Secret {
    /// Sent as `Basic` auth, and to a token realm for a bearer token.
    Basic { user: String, password: String },
    /// An OAuth2 refresh token, exchanged at the realm for an access token
    /// (Docker's `identitytoken`, CRI's `identity_token`).
    IdentityToken(String),
    /// A bearer token sent to the registry as it is (CRI's
    /// `registry_token`).
    RegistryToken(String),
}

impl Credentials {
    /// A user name and password (their source reads "the caller").
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            secret: Secret::Basic {
                user: user.into(),
                password: password.into(),
            },
            source: "the caller".into(),
        }
    }

    /// An identity token: an OAuth2 refresh token that a bearer-token realm
    /// exchanges for an access token (`POST realm` with
    /// `grant_type=refresh_token`).
    pub fn identity_token(token: impl Into<String>) -> Credentials {
        Credentials {
            secret: Secret::IdentityToken(token.into()),
            source: "the caller".into(),
        }
    }

    /// A registry token: a bearer token sent to the registry as it is when
    /// it asks for a bearer token.
    pub fn registry_token(token: impl Into<String>) -> Credentials {
        Credentials {
            secret: Secret::RegistryToken(token.into()),
            source: "the caller".into(),
        }
    }

    /// The same credentials, saying they came from `source` (shown in
    /// errors as "credentials from SOURCE"; never put a secret there).
    pub fn with_source(mut self, source: impl Into<String>) -> Credentials {
        self.source = source.into();
        self
    }

    /// Where the credentials came from (a file path, "the caller").
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The user and password, when these are user-and-password credentials.
    fn basic(&self) -> Option<(&str, &str)> {
        match &self.secret {
            Secret::Basic { user, password } => Some((user, password)),
            _ => None,
        }
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.secret {
            Secret::Basic { .. } => "user and password",
            Secret::IdentityToken(_) => "identity token",
            Secret::RegistryToken(_) => "registry token",
        };
        f.debug_struct("Credentials")
            .field("kind", &kind)
            .field("secret", &"<redacted>")
            .field("source", &self.source)
            .finish()
    }
}

/// Where a registry client gets credentials for a registry host.
///
/// Asked once when a [`RegistrySource`](super::RegistrySource) or
/// [`RegistryPusher`](super::RegistryPusher) is built. A daemon passes
/// per-request credentials by building a provider for the request (usually
/// [`StaticCredentials`]) and putting it into a clone of its
/// [`RegistryOptions`](super::RegistryOptions) (see
/// [`RegistryOptions::with_credentials`](super::RegistryOptions::with_credentials)).
/// `Debug` implementations must not print secrets.
pub trait CredentialProvider: Send + Sync + fmt::Debug {
    /// Credentials for `host` (`host[:port]` as written in the reference;
    /// `docker.io` for Docker Hub), or `None` to go anonymous. An error
    /// (a credentials file that cannot be read) fails the operation.
    fn credentials(&self, host: &str) -> Result<Option<Credentials>, OciError>;
}

/// Whether an auth-file key (`host[:port]`, or a URL like
/// `https://host/v1/`) names `host`. Docker Hub goes by several names.
fn key_names_host(key: &str, host: &str) -> bool {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let k = k.split('/').next().unwrap_or(k);
    let hub = |h: &str| matches!(h, "docker.io" | "index.docker.io" | "registry-1.docker.io");
    k == host || (hub(host) && hub(k))
}

/// Credentials from auth files (`auth.json` of containers-auth.json(5),
/// or Docker's `config.json`), in order: the explicit file, then the
/// default files (`$REGISTRY_AUTH_FILE`,
/// `$XDG_RUNTIME_DIR/containers/auth.json`, `~/.docker/config.json`).
/// The first file with an entry for the host wins.
///
/// An explicit file that is missing or does not parse is an error naming
/// it; a default file that does not exist is skipped, one that exists but
/// does not parse is an error naming it. Files are read at every lookup,
/// so a new login is seen by the next source.
#[derive(Debug, Clone)]
pub struct FileCredentials {
    explicit: Option<PathBuf>,
    defaults: Vec<PathBuf>,
}

impl FileCredentials {
    /// Look in `explicit` first (when given), then in the default files
    /// named by the environment now.
    pub fn new(explicit: Option<PathBuf>) -> FileCredentials {
        FileCredentials {
            explicit,
            defaults: FileCredentials::default_files(),
        }
    }

    /// Replace the default files (e.g. a daemon's own `auth.json` instead
    /// of the environment's).
    pub fn with_default_files(mut self, files: Vec<PathBuf>) -> FileCredentials {
        self.defaults = files;
        self
    }

    /// The default files the environment names: `$REGISTRY_AUTH_FILE`,
    /// `$XDG_RUNTIME_DIR/containers/auth.json`, `$HOME/.docker/config.json`.
    pub fn default_files() -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
            files.push(PathBuf::from(p));
        }
        if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
            files.push(PathBuf::from(p).join("containers/auth.json"));
        }
        if let Some(p) = std::env::var_os("HOME") {
            files.push(PathBuf::from(p).join(".docker/config.json"));
        }
        files
    }
}

impl Default for FileCredentials {
    /// No explicit file; the environment's default files.
    fn default() -> FileCredentials {
        FileCredentials::new(None)
    }
}

impl CredentialProvider for FileCredentials {
    fn credentials(&self, host: &str) -> Result<Option<Credentials>, OciError> {
        if let Some(p) = &self.explicit {
            let bytes = std::fs::read(p).map_err(crate::io_err("reading credentials file", p))?;
            if let Some(c) = credentials_in_file(&bytes, p, host)? {
                return Ok(Some(c));
            }
        }
        for p in &self.defaults {
            let bytes = match std::fs::read(p) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::io_err("reading credentials file", p)(e)),
            };
            if let Some(c) = credentials_in_file(&bytes, p, host)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

/// The entry for `host` in the `auths` of an auth file's `bytes`. Entries
/// with nothing usable (Docker's `credsStore` leaves `{}`) are skipped;
/// an `auth` that is not base64 of `user:password` is an error naming the
/// file and the key. Messages never quote values from the file.
fn credentials_in_file(
    bytes: &[u8],
    path: &Path,
    host: &str,
) -> Result<Option<Credentials>, OciError> {
    let bad = |reason: String| OciError::Config {
        action: "reading credentials file".into(),
        path: path.to_path_buf(),
        reason,
    };
    // Parsed as a Value first: serde_json's syntax errors give a position,
    // never the text, so a secret cannot end up in the message.
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let top = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let Some(auths) = top.get("auths") else {
        return Ok(None);
    };
    let auths = auths
        .as_object()
        .ok_or_else(|| bad("\"auths\" is not an object".into()))?;
    let source = path.display().to_string();
    for (key, entry) in auths {
        if !key_names_host(key, host) {
            continue;
        }
        let entry = entry
            .as_object()
            .ok_or_else(|| bad(format!("the entry for {key:?} is not an object")))?;
        let text = |name: &str| {
            entry
                .get(name)
                .and_then(|x| x.as_str())
                .filter(|s| !s.is_empty())
        };
        if let Some(t) = text("identitytoken") {
            return Ok(Some(Credentials::identity_token(t).with_source(source)));
        }
        if let Some(a) = text("auth") {
            let not_basic = || {
                bad(format!(
                    "the \"auth\" of {key:?} is not base64 of user:password"
                ))
            };
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|_| not_basic())?;
            let decoded = String::from_utf8(decoded).map_err(|_| not_basic())?;
            let (user, password) = decoded.split_once(':').ok_or_else(not_basic)?;
            return Ok(Some(Credentials::new(user, password).with_source(source)));
        }
        if let (Some(user), Some(password)) = (text("username"), text("password")) {
            return Ok(Some(Credentials::new(user, password).with_source(source)));
        }
    }
    Ok(None)
}

/// Credentials held in memory, by registry host, as a caller built them
/// (CRI hands a snapshotter a user and password or a token per pull; an
/// HTTP request carries its own). `Debug` shows the hosts only.
#[derive(Debug, Clone, Default)]
pub struct StaticCredentials {
    by_host: Vec<(String, Credentials)>,
}

impl StaticCredentials {
    /// No credentials for any host (every registry is reached anonymously).
    pub fn new() -> StaticCredentials {
        StaticCredentials::default()
    }

    /// These credentials plus `credentials` for `host` (`host[:port]`, or
    /// a URL such as CRI's `server_address`; `docker.io` matches Docker
    /// Hub's other names).
    pub fn with(mut self, host: impl Into<String>, credentials: Credentials) -> StaticCredentials {
        self.insert(host, credentials);
        self
    }

    /// Add (or replace) the credentials for `host`.
    pub fn insert(&mut self, host: impl Into<String>, credentials: Credentials) {
        let host = host.into();
        self.by_host.retain(|(h, _)| *h != host);
        self.by_host.push((host, credentials));
    }
}

impl CredentialProvider for StaticCredentials {
    fn credentials(&self, host: &str) -> Result<Option<Credentials>, OciError> {
        Ok(self
            .by_host
            .iter()
            .find(|(key, _)| key_names_host(key, host))
            .map(|(_, c)| c.clone()))
    }
}

/// How requests are authorized once a challenge was answered. `Debug` is
/// not derived: the token must never be printed.
#[derive(Clone)]
enum Authz {
    None,
    Basic,
    /// A bearer token for the scope it was issued for.
    Bearer(String),
}

/// Bearer tokens by scope (`repository:NAME:pull`). A source serves one
/// repository, so in practice this holds one token; keying by scope keeps
/// a token from being reused for a scope it was not issued for.
#[derive(Default)]
struct TokenCache {
    by_scope: HashMap<String, String>,
}

/// The auth state of one source or pusher: its credentials, how the
/// registry last asked to be answered, and its tokens.
pub(crate) struct Authenticator {
    host: String,
    repository: String,
    creds: Option<Credentials>,
    /// A push client: bearer tokens are asked for `pull,push`.
    push: bool,
    authz: Mutex<Authz>,
    tokens: Mutex<TokenCache>,
}

impl Authenticator {
    /// The auth state for `repository` on `host`, with `creds` (if any).
    pub(crate) fn new(
        host: &str,
        repository: &str,
        creds: Option<Credentials>,
        push: bool,
    ) -> Authenticator {
        Authenticator {
            host: host.to_string(),
            repository: repository.to_string(),
            creds,
            push,
            authz: Mutex::new(Authz::None),
            tokens: Mutex::new(TokenCache::default()),
        }
    }

    /// Add the authorization the registry asked for to a request for the
    /// registry itself (the caller checks the origin).
    pub(crate) fn authorize(&self, req: RequestBuilder) -> RequestBuilder {
        match self.authz.lock().expect("no panics while held").clone() {
            Authz::None => req,
            Authz::Basic => match self.creds.as_ref().and_then(Credentials::basic) {
                Some((user, password)) => req.basic_auth(user, Some(password)),
                None => req,
            },
            Authz::Bearer(t) => req.bearer_auth(t),
        }
    }

    /// The error for a refused `action`: names the host and where the
    /// credentials came from, never the credentials.
    pub(crate) fn refused(&self, action: &str) -> OciError {
        OciError::Auth {
            action: action.to_string(),
            host: self.host.clone(),
            source_of_creds: self.creds.as_ref().map_or_else(
                || "no credentials found".to_string(),
                |c| format!("credentials from {}", c.source),
            ),
        }
    }

    /// Answer a 401's `WWW-Authenticate` `challenge`: from now on requests
    /// carry Basic auth or a bearer token (fetched from the realm with
    /// `http`, or taken from the cache). An error when there is nothing
    /// to answer with or the realm refuses.
    pub(crate) fn answer(
        &self,
        http: &Client,
        challenge: &str,
        action: &str,
    ) -> Result<(), OciError> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            if self.creds.as_ref().and_then(Credentials::basic).is_none() {
                return Err(self.refused(action));
            }
            *self.authz.lock().expect("no panics while held") = Authz::Basic;
            return Ok(());
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(self.refused(action));
        }
        if let Some(Secret::RegistryToken(t)) = self.creds.as_ref().map(|c| &c.secret) {
            // The caller's token is the answer; a second 401 is a refusal.
            *self.authz.lock().expect("no panics while held") = Authz::Bearer(t.clone());
            return Ok(());
        }
        let params = parse_challenge(params);
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| self.refused(action))?;
        let service = params
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.clone());
        // A push client asks for pull and push whatever the challenge
        // names (a HEAD is challenged for pull only), so one token serves
        // the whole push.
        let scope = if self.push {
            format!("repository:{}:pull,push", self.repository)
        } else {
            params
                .iter()
                .find(|(k, _)| k == "scope")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| format!("repository:{}:pull", self.repository))
        };
        let stale = match &*self.authz.lock().expect("no panics while held") {
            Authz::Bearer(t) => Some(t.clone()),
            _ => None,
        };
        {
            // a cached token for this scope that we have not just been
            // refused with: use it without asking the realm again
            let mut cache = self.tokens.lock().expect("no panics while held");
            match cache.by_scope.get(&scope) {
                Some(t) if Some(t) != stale.as_ref() => {
                    *self.authz.lock().expect("no panics while held") = Authz::Bearer(t.clone());
                    return Ok(());
                }
                Some(_) => {
                    cache.by_scope.remove(&scope);
                }
                None => {}
            }
        }
        let token = self.fetch_token(http, &realm, service.as_deref(), &scope, action)?;
        self.tokens
            .lock()
            .expect("no panics while held")
            .by_scope
            .insert(scope, token.clone());
        *self.authz.lock().expect("no panics while held") = Authz::Bearer(token);
        Ok(())
    }

    /// Ask `realm` for a token for `scope`: `GET` with the user and
    /// password (or anonymous), or, for an identity token, the OAuth2
    /// `POST` with `grant_type=refresh_token`.
    fn fetch_token(
        &self,
        http: &Client,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        action: &str,
    ) -> Result<String, OciError> {
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        query.push(("scope", scope));
        let req = match self.creds.as_ref().map(|c| &c.secret) {
            Some(Secret::IdentityToken(t)) => {
                query.extend([
                    ("grant_type", "refresh_token"),
                    ("refresh_token", t.as_str()),
                    ("client_id", "strata"),
                ]);
                http.post(realm)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form_encode(&query))
            }
            secret => {
                let sep = if realm.contains('?') { '&' } else { '?' };
                let req = http.get(format!("{realm}{sep}{}", form_encode(&query)));
                match secret {
                    Some(Secret::Basic { user, password }) => req.basic_auth(user, Some(password)),
                    _ => req,
                }
            }
        };
        let resp = req.send().map_err(|e| OciError::Network {
            action: format!("{action}: fetching a token from {realm}"),
            // the URL may hold the query, never a secret: the refresh token
            // goes in the body
            reason: error_chain(&e.without_url()),
        })?;
        if !resp.status().is_success() {
            return Err(self.refused(action));
        }
        let body = resp.bytes().map_err(|_| self.refused(action))?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| self.refused(action))?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .ok_or_else(|| self.refused(action))
    }
}

/// `k=v&k=v`, percent-encoded.
fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", url_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn url_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The `key=value` (or `key="value"`) parameters of a challenge.
pub fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches(',').trim();
        out.push((key, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_encoding() {
        assert_eq!(
            url_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(url_encode("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn unquoted_challenge_params() {
        let p = parse_challenge("realm=https://auth.io/token, service=reg");
        assert_eq!(
            p[0],
            ("realm".to_string(), "https://auth.io/token".to_string())
        );
        assert_eq!(p[1], ("service".to_string(), "reg".to_string()));
    }

    #[test]
    fn challenge_parsing() {
        let p = parse_challenge(
            r#"realm="http://127.0.0.1:1/token",service="reg",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(
            p,
            vec![
                ("realm".to_string(), "http://127.0.0.1:1/token".to_string()),
                ("service".to_string(), "reg".to_string()),
                ("scope".to_string(), "repository:a/b:pull,push".to_string()),
            ]
        );
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A provider reading `explicit` and the `defaults` only (not the
    /// environment's files, which differ between machines).
    fn files(explicit: Option<&Path>, defaults: &[&Path]) -> FileCredentials {
        FileCredentials::new(explicit.map(Path::to_path_buf))
            .with_default_files(defaults.iter().map(|p| p.to_path_buf()).collect())
    }

    fn user_password(c: &Credentials) -> (&str, &str) {
        c.basic().expect("user and password")
    }

    #[test]
    fn docker_config_auth_is_base64_of_user_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        let enc = b64("alice:s3cret:with:colons");
        std::fs::write(
            &f,
            format!(
                r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{enc}"}},"https://other.io/v1/":{{"username":"bob","password":"pw"}},"empty.io":{{}}}},"credsStore":"desktop"}}"#
            ),
        )
        .unwrap();
        let p = files(Some(&f), &[]);
        let c = p.credentials("127.0.0.1:5000").unwrap().unwrap();
        // only the first colon separates: passwords may hold colons
        assert_eq!(user_password(&c), ("alice", "s3cret:with:colons"));
        assert_eq!(c.source(), f.display().to_string());
        let c2 = p.credentials("other.io").unwrap().unwrap();
        assert_eq!(user_password(&c2), ("bob", "pw"));
        // an entry with nothing usable (a credential store's) is skipped
        assert!(p.credentials("empty.io").unwrap().is_none());
        assert!(p.credentials("nothere.io").unwrap().is_none());
    }

    #[test]
    fn docker_hub_names_match_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        let enc = b64("hub:pw");
        std::fs::write(
            &f,
            format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{enc}"}}}}}}"#),
        )
        .unwrap();
        let c = files(Some(&f), &[])
            .credentials("docker.io")
            .unwrap()
            .unwrap();
        assert_eq!(user_password(&c), ("hub", "pw"));
    }

    #[test]
    fn identity_tokens_are_read_from_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.json");
        std::fs::write(
            &f,
            format!(
                r#"{{"auths":{{"reg.io":{{"auth":"{}","identitytoken":"refresh-123"}}}}}}"#,
                b64("<token>:")
            ),
        )
        .unwrap();
        let c = files(Some(&f), &[]).credentials("reg.io").unwrap().unwrap();
        assert!(matches!(&c.secret, Secret::IdentityToken(t) if t == "refresh-123"));
        assert!(!format!("{c:?}").contains("refresh-123"));
    }

    #[test]
    fn a_missing_explicit_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("no-such-auth.json");
        let e = files(Some(&f), &[]).credentials("reg.io").unwrap_err();
        assert!(matches!(e, OciError::Io { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("reading credentials file {}:", f.display())),
            "{msg}"
        );
    }

    #[test]
    fn garbage_in_a_credentials_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        for (bytes, why) in [
            (
                &b"{\"auths\": {\"reg.io\": {\"auth\": \"c2VjcmV0"[..],
                "not JSON",
            ),
            (b"[1, 2]", "not a JSON object"),
            (b"{\"auths\": \"hunter2\"}", "\"auths\" is not an object"),
            (
                b"{\"auths\": {\"reg.io\": {\"auth\": \"!!hunter2!!\"}}}",
                "the \"auth\" of \"reg.io\" is not base64 of user:password",
            ),
        ] {
            std::fs::write(&f, bytes).unwrap();
            let e = files(Some(&f), &[]).credentials("reg.io").unwrap_err();
            assert!(matches!(e, OciError::Config { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("reading credentials file {}: {why}", f.display())),
                "{msg}"
            );
            assert!(
                !msg.contains("hunter2") && !msg.contains("c2VjcmV0"),
                "{msg}"
            );
        }
    }

    #[test]
    fn default_files_are_skipped_when_missing_but_not_when_broken() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let good = dir.path().join("good.json");
        std::fs::write(
            &good,
            format!(r#"{{"auths":{{"reg.io":{{"auth":"{}"}}}}}}"#, b64("u:p")),
        )
        .unwrap();
        let c = files(None, &[&missing, &good])
            .credentials("reg.io")
            .unwrap()
            .unwrap();
        assert_eq!(c.source(), good.display().to_string());
        assert!(
            files(None, &[&missing])
                .credentials("reg.io")
                .unwrap()
                .is_none()
        );

        let broken = dir.path().join("broken.json");
        std::fs::write(&broken, b"not json").unwrap();
        let e = files(None, &[&missing, &broken, &good])
            .credentials("reg.io")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&broken.display().to_string()) && e.contains("not JSON"),
            "{e}"
        );
        // an explicit file without an entry for the host falls through to
        // the default files
        let other = dir.path().join("other.json");
        std::fs::write(&other, br#"{"auths":{}}"#).unwrap();
        let c = files(Some(&other), &[&good])
            .credentials("reg.io")
            .unwrap()
            .unwrap();
        assert_eq!(c.source(), good.display().to_string());
    }

    #[test]
    fn static_credentials_by_host() {
        let p = StaticCredentials::new()
            .with("reg.io:5000", Credentials::new("alice", "pw1"))
            .with(
                "https://index.docker.io/v1/",
                Credentials::registry_token("tok-42").with_source("the CRI request"),
            );
        let c = p.credentials("reg.io:5000").unwrap().unwrap();
        assert_eq!(user_password(&c), ("alice", "pw1"));
        assert_eq!(c.source(), "the caller");
        assert!(p.credentials("reg.io").unwrap().is_none());
        let hub = p.credentials("docker.io").unwrap().unwrap();
        assert_eq!(hub.source(), "the CRI request");
        assert!(hub.basic().is_none());

        let mut p = p;
        p.insert("reg.io:5000", Credentials::new("alice", "pw2"));
        let c = p.credentials("reg.io:5000").unwrap().unwrap();
        assert_eq!(user_password(&c), ("alice", "pw2"));
    }

    /// A one-request HTTP server on 127.0.0.1 answering `answer`; returns
    /// its address and the request it got.
    fn one_shot_server(answer: &'static str) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
            head + &String::from_utf8(body).unwrap()
        });
        (addr, h)
    }

    #[test]
    fn identity_tokens_are_exchanged_at_the_realm_in_a_post_body() {
        let (addr, server) = one_shot_server(r#"{"access_token":"access-77"}"#);
        let auth = Authenticator::new(
            "reg.io",
            "team/app",
            Some(Credentials::identity_token("refresh/s3cret")),
            false,
        );
        let http = Client::new();
        auth.answer(
            &http,
            &format!(r#"Bearer realm="http://{addr}/token",service="reg.io""#),
            "fetching manifest x",
        )
        .unwrap();
        let request = server.join().unwrap();
        let first_line = request.lines().next().unwrap();
        // the refresh token travels in the body, never in the URL
        assert_eq!(first_line, "POST /token HTTP/1.1", "{request}");
        assert!(
            request.ends_with(
                "service=reg.io&scope=repository%3Ateam%2Fapp%3Apull&grant_type=refresh_token&refresh_token=refresh%2Fs3cret&client_id=strata"
            ),
            "{request}"
        );
        assert!(
            !request.to_ascii_lowercase().contains("authorization:"),
            "{request}"
        );
        // requests now carry the access token
        let req = auth
            .authorize(http.get("http://reg.io/v2/"))
            .build()
            .unwrap();
        assert_eq!(req.headers()["authorization"], "Bearer access-77");
    }

    #[test]
    fn a_basic_challenge_is_not_answered_with_a_token() {
        let auth = Authenticator::new("reg.io", "a", Some(Credentials::registry_token("t")), false);
        let e = auth
            .answer(&Client::new(), r#"Basic realm="x""#, "fetching manifest x")
            .unwrap_err();
        assert!(matches!(e, OciError::Auth { .. }), "{e}");
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let p = StaticCredentials::new()
            .with("reg.io", Credentials::new("alice", "s3cret-pw"))
            .with("tok.io", Credentials::identity_token("refresh-s3cret"))
            .with("bear.io", Credentials::registry_token("bearer-s3cret"));
        let dbg = format!("{p:?}");
        assert!(
            dbg.contains("reg.io") && dbg.contains("<redacted>"),
            "{dbg}"
        );
        for secret in ["alice", "s3cret-pw", "refresh-s3cret", "bearer-s3cret"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        let auth = Authenticator::new("reg.io", "a/b", p.credentials("reg.io").unwrap(), false);
        let e = auth.refused("fetching manifest x").to_string();
        assert_eq!(
            e,
            "fetching manifest x: authentication required or failed for reg.io (credentials from the caller)"
        );
    }
}
