//! `strata serve`'s config: TOML, every key documented here and in
//! README, unknown keys refused.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where `strata serve` looks for its config when `--config` is not given
/// (a missing default file means every default).
pub const DEFAULT_CONFIG: &str = "/etc/strata/serve.toml";

/// The service's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `HOST:PORT` (TCP) or `unix:PATH`; `--listen` overrides.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// One bearer token per line (`#` comments and blank lines skipped).
    /// A missing or empty file: every request but `/healthz` and
    /// `/readyz` is refused.
    #[serde(default = "default_tokens_file")]
    pub tokens_file: PathBuf,
    /// Jobs run at once.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Jobs waiting at most; one more is answered 429.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Job records (default `<store root>/serve`).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Registry credentials (a containers-auth.json); the default auth
    /// files when unset. Callers never pass registry credentials.
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// Bytes a request body may have.
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// `/readyz` fails below this many free bytes in the store.
    #[serde(default = "default_min_free")]
    pub min_free: u64,
    /// Days a finished job's record (and the store's name for its
    /// source, `serve/<id>`) are kept; then both go (checked at start and
    /// hourly) and gc may reclaim the source.
    #[serde(default = "default_retention_days")]
    pub retention_days: u64,
    /// Whether `prefetch: optimize` may run: it runs the image's own code
    /// as root in a chroot (no network, its own mount and pid
    /// namespaces), which is no boundary against a hostile image. Off
    /// unless the images converted are trusted or the service runs in a
    /// VM of its own.
    #[serde(default)]
    pub allow_optimize: bool,
    /// Registries.
    #[serde(default)]
    pub registries: Registries,
    /// Formats.
    #[serde(default)]
    pub formats: Formats,
}

/// `[registries]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registries {
    /// Hosts (`host[:port]`) sources may come from and results may go to;
    /// any other is refused (403) before a byte is sent to it.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Hosts reached over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
}

/// `[formats]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Formats {
    /// Formats this instance has removed: asked for, they answer 410 with
    /// the source's digest to use instead.
    #[serde(default)]
    pub disabled: Vec<String>,
    /// Formats still converted, with a `Deprecation` header and a warning
    /// in the job.
    #[serde(default)]
    pub deprecated: Vec<String>,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_tokens_file() -> PathBuf {
    PathBuf::from("/etc/strata/tokens")
}
fn default_workers() -> usize {
    2
}
fn default_queue() -> usize {
    64
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_retention_days() -> u64 {
    7
}
fn default_min_free() -> u64 {
    1 << 30
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("the defaults parse")
    }
}

impl Config {
    /// Parse `text` (the contents of `path`, named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?;
        if c.workers == 0 {
            return Err(format!("{}: workers must be at least 1", path.display()));
        }
        Ok(c)
    }

    /// Load `path`; when it was not `named` on the command line and does
    /// not exist, the defaults.
    pub fn load(path: &Path, named: bool) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(t) => Config::parse(&t, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => Ok(Config::default()),
            Err(e) => Err(format!("reading {}: {e}", path.display())),
        }
    }

    /// Whether `host` may be read from or pushed to.
    pub fn allowed(&self, host: &str) -> bool {
        self.registries.allow.iter().any(|h| h == host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_the_documented_keys() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.workers, 2);
        assert_eq!(c.queue, 64);
        let c = Config::parse(
            r#"
listen = "unix:/run/strata/api.sock"
tokens_file = "/tmp/t"
workers = 3
queue = 5
[registries]
allow = ["127.0.0.1:5000"]
insecure = ["127.0.0.1:5000"]
[formats]
disabled = ["zstd"]
"#,
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.workers, 3);
        assert!(c.allowed("127.0.0.1:5000"));
        assert!(!c.allowed("127.0.0.1:5001"));
        assert_eq!(c.formats.disabled, ["zstd"]);
    }

    #[test]
    fn unknown_keys_and_zero_workers_are_refused_naming_the_file() {
        let e = Config::parse("listn = \"x\"", Path::new("/etc/x.toml")).unwrap_err();
        assert!(e.contains("/etc/x.toml") && e.contains("listn"), "{e}");
        let e = Config::parse("workers = 0", Path::new("x.toml")).unwrap_err();
        assert!(e.contains("workers"), "{e}");
        assert!(Config::load(Path::new("/nonexistent/serve.toml"), true).is_err());
        assert!(Config::load(Path::new("/nonexistent/serve.toml"), false).is_ok());
    }
}
