//! [`RegistryConfig`]: per-store registry settings from
//! `$STRATA_ROOT/registries.json`.
//!
//! ```json
//! {"insecure": ["127.0.0.1:5000", "registry.lan:5000"]}
//! ```
//!
//! Registries listed as `insecure` are reached over plain HTTP without
//! `--plain-http`. A missing file means the defaults; a file that does not
//! parse is an error naming it (a typo must not silently turn TLS back
//! on, or off).

use std::path::{Path, PathBuf};

use crate::OciError;

/// The registry settings of a store (`registries.json` in its root).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Hosts (`host[:port]`) reached over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
}

impl RegistryConfig {
    /// The file name in a store root.
    pub const FILE_NAME: &'static str = "registries.json";

    /// `STORE_ROOT/registries.json`.
    pub fn path(store_root: &Path) -> PathBuf {
        store_root.join(Self::FILE_NAME)
    }

    /// Load `registries.json` from `store_root`: the defaults when there
    /// is no such file; an error naming the file when it cannot be read or
    /// does not parse.
    pub fn load(store_root: &Path) -> Result<RegistryConfig, OciError> {
        let path = Self::path(store_root);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RegistryConfig::default());
            }
            Err(e) => return Err(crate::io_err("reading registry configuration", &path)(e)),
        };
        Self::parse(&bytes, &path)
    }

    /// Parse the bytes of a `registries.json`; `path` names it in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<RegistryConfig, OciError> {
        serde_json::from_slice(bytes).map_err(|e| OciError::Config {
            action: "reading registry configuration".into(),
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            RegistryConfig::load(dir.path()).unwrap(),
            RegistryConfig::default()
        );
    }

    #[test]
    fn insecure_hosts_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("registries.json"),
            br#"{"insecure": ["127.0.0.1:5000", "reg.lan"]}"#,
        )
        .unwrap();
        let c = RegistryConfig::load(dir.path()).unwrap();
        assert_eq!(c.insecure, ["127.0.0.1:5000", "reg.lan"]);
        std::fs::write(dir.path().join("registries.json"), b"{}").unwrap();
        assert!(
            RegistryConfig::load(dir.path())
                .unwrap()
                .insecure
                .is_empty()
        );
    }

    #[test]
    fn garbage_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registries.json");
        for (bytes, why) in [
            (
                &b"{\"insecure\": [\"127.0.0.1:5000\""[..],
                "EOF while parsing",
            ),
            (b"{\"insecure\": \"127.0.0.1:5000\"}", "invalid type"),
            (b"{\"insecur\": []}", "unknown field `insecur`"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let e = RegistryConfig::load(dir.path()).unwrap_err();
            assert!(matches!(e, OciError::Config { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!(
                    "reading registry configuration {}: ",
                    path.display()
                )) && msg.contains(why),
                "{msg}"
            );
        }
    }
}
