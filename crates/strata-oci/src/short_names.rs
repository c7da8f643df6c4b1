//! Short names: where an image named without a registry is looked for, the
//! way containers-registries.conf(5) tells podman.
//!
//! ```text
//! "app:1" --[aliases]--------------------------> the alias, alone
//!         --unqualified-search-registries = [a, b]--> a/app:1, then b/app:1
//!         --nothing configured------------------> docker.io/library/app:1
//! ```
//!
//! Candidates are tried in order and the first whose manifest resolves for
//! the wanted platform wins; when none does, the error lists every
//! candidate with why it failed. There is no interactive prompt
//! (`short-name-mode` is not read).
//!
//! Files read ([`RegistriesConf::load`]): `$CONTAINERS_REGISTRIES_CONF`
//! alone when it is set; otherwise the user's
//! `$XDG_CONFIG_HOME/containers/registries.conf` (or
//! `~/.config/containers/registries.conf`) when it exists, else
//! `/etc/containers/registries.conf`, then the drop-ins
//! `/etc/containers/registries.conf.d/*.conf` in name order. A drop-in that
//! sets `unqualified-search-registries` replaces the list before it; its
//! aliases are added to (or replace) those before. A missing file is an
//! empty one; a file that does not parse is an error naming it. Only the v2
//! format's `unqualified-search-registries` and `[aliases]` are read:
//! `[[registry]]` tables (mirrors, `insecure`, `blocked`) are not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::preresolved::Preresolved;
use crate::reference::{DOCKER_HUB, ShortName, valid_host};
use crate::{ImageRef, ImageSource, OciError, Platform, RegistryOptions, open_source};

/// The system registries.conf.
pub const SYSTEM_REGISTRIES_CONF: &str = "/etc/containers/registries.conf";
/// The system drop-in directory.
pub const SYSTEM_REGISTRIES_CONF_D: &str = "/etc/containers/registries.conf.d";

/// What registries.conf files say about short names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistriesConf {
    /// `unqualified-search-registries`: `host[:port]` to try short names
    /// on, in order (empty: Docker Hub).
    pub search: Vec<String>,
    /// The file that set `search`.
    pub search_from: Option<PathBuf>,
    /// `[aliases]`: short name (a repository without tag or digest) -> a
    /// fully qualified name without tag or digest.
    pub aliases: BTreeMap<String, String>,
}

/// One file's keys; everything else in the file is ignored.
#[derive(serde::Deserialize)]
struct ConfFile {
    #[serde(rename = "unqualified-search-registries")]
    search: Option<Vec<String>>,
    #[serde(default)]
    aliases: BTreeMap<String, String>,
}

fn conf_err(path: &Path, reason: impl Into<String>) -> OciError {
    OciError::RegistriesConf {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `line L, column C` of a byte offset, for messages.
fn position(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("line {line}, column {column}")
}

impl RegistriesConf {
    /// Merge one file's text (`path` is for messages): a search list
    /// replaces the one before, aliases are added.
    pub fn merge_file(&mut self, text: &str, path: &Path) -> Result<(), OciError> {
        let file: ConfFile = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| format!("{}: ", position(text, s.start)))
                .unwrap_or_default();
            conf_err(path, format!("{at}{}", e.message().trim_end()))
        })?;
        if let Some(search) = file.search {
            for r in &search {
                if !valid_host(r) {
                    return Err(conf_err(
                        path,
                        format!(
                            "unqualified-search-registries: {r:?} is not a registry host[:port]"
                        ),
                    ));
                }
            }
            self.search = search;
            self.search_from = Some(path.to_path_buf());
        }
        for (short, full) in file.aliases {
            let probe = ShortName {
                repository: short.clone(),
                tag: None,
                digest: None,
            };
            probe
                .via_alias(&full)
                .map_err(|e| conf_err(path, format!("alias {short:?}: {e}")))?;
            self.aliases.insert(short, full);
        }
        Ok(())
    }

    /// Read and merge `path` when it exists.
    fn merge_path(&mut self, path: &Path) -> Result<(), OciError> {
        match std::fs::read_to_string(path) {
            Ok(text) => self.merge_file(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(OciError::Io {
                action: "reading registries configuration".into(),
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Read `main` (when it exists), then the `*.conf` files of
    /// `drop_ins` (when given and present) in name order.
    pub fn load_from(main: &Path, drop_ins: Option<&Path>) -> Result<Self, OciError> {
        let mut conf = RegistriesConf::default();
        conf.merge_path(main)?;
        let Some(dir) = drop_ins else {
            return Ok(conf);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(conf),
            Err(source) => {
                return Err(OciError::Io {
                    action: "listing registries configuration drop-ins".into(),
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| OciError::Io {
                action: "listing registries configuration drop-ins".into(),
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "conf") {
                files.push(path);
            }
        }
        files.sort();
        for f in files {
            conf.merge_path(&f)?;
        }
        Ok(conf)
    }

    /// The configuration podman would use (see the module overview for
    /// the files and their order).
    pub fn load() -> Result<Self, OciError> {
        if let Some(p) = std::env::var_os("CONTAINERS_REGISTRIES_CONF").filter(|p| !p.is_empty()) {
            return Self::load_from(Path::new(&p), None);
        }
        let user = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|d| d.join("containers/registries.conf"))
            .filter(|p| p.exists());
        let main = user.unwrap_or_else(|| PathBuf::from(SYSTEM_REGISTRIES_CONF));
        Self::load_from(&main, Some(Path::new(SYSTEM_REGISTRIES_CONF_D)))
    }

    /// The references to try for `name`, in order.
    pub fn candidates(&self, name: &ShortName) -> Result<Vec<ImageRef>, OciError> {
        if let Some(full) = self.aliases.get(&name.repository) {
            return Ok(vec![name.via_alias(full)?]);
        }
        if self.search.is_empty() {
            return Ok(vec![name.on(DOCKER_HUB)]);
        }
        Ok(self.search.iter().map(|r| name.on(r)).collect())
    }

    /// How `name` is looked up, for messages: `alias in FILE`,
    /// `unqualified-search-registries of FILE` or `no
    /// unqualified-search-registries configured`.
    pub fn describe_lookup(&self, name: &ShortName) -> String {
        if self.aliases.contains_key(&name.repository) {
            return "registries.conf alias".to_string();
        }
        match (&self.search_from, self.search.is_empty()) {
            (Some(f), false) => format!("unqualified-search-registries of {}", f.display()),
            _ => format!("no unqualified-search-registries configured: {DOCKER_HUB}"),
        }
    }
}

/// A short name resolved to one registry.
pub struct Resolution {
    /// The fully qualified reference that resolved.
    pub reference: ImageRef,
    /// Its source, resolved for the platform asked (resolving it again for
    /// that platform asks the registry nothing).
    pub source: Box<dyn ImageSource>,
    /// Candidates tried before it, each with why it failed.
    pub skipped: Vec<String>,
    /// How the candidates were chosen ([`RegistriesConf::describe_lookup`]).
    pub lookup: String,
}

/// Try the candidates of `name` in order; the first whose manifest (and
/// config) resolves for `platform` wins. The error names every candidate
/// and why it failed.
pub fn resolve_short_name(
    name: &ShortName,
    conf: &RegistriesConf,
    opts: &RegistryOptions,
    platform: &Platform,
) -> Result<Resolution, OciError> {
    let lookup = conf.describe_lookup(name);
    let mut skipped = Vec::new();
    for candidate in conf.candidates(name)? {
        let attempt = open_source(&candidate, opts).and_then(|source| {
            let image = source.resolve(platform)?;
            // resolving it again for the same platform would ask the
            // registry twice
            Ok(
                Box::new(Preresolved::for_platform(source, platform.clone(), image))
                    as Box<dyn ImageSource>,
            )
        });
        match attempt {
            Ok(source) => {
                return Ok(Resolution {
                    reference: candidate,
                    source,
                    skipped,
                    lookup,
                });
            }
            Err(e) => {
                // registry errors name the reference already
                let (e, c) = (e.to_string(), candidate.to_string());
                skipped.push(if e.contains(&c) {
                    e
                } else {
                    format!("{c}: {e}")
                });
            }
        }
    }
    Err(OciError::ShortName {
        name: name.to_string(),
        lookup,
        attempts: skipped.join("; "),
    })
}

/// An image a user named, opened.
pub struct Opened {
    /// The fully qualified reference (the name the store records).
    pub reference: ImageRef,
    /// Its source.
    pub source: Box<dyn ImageSource>,
    /// For a short name, for people: the candidates that failed and the
    /// registry that answered.
    pub notes: Vec<String>,
}

/// Open what a user named as podman takes it: a transport reference
/// (`docker://`, `oci:`, ...), a bare `HOST[:PORT]/REPO[:TAG]` (docker://),
/// or a short name resolved by the registries.conf files
/// ([`RegistriesConf::load`]) for `platform`.
pub fn open_name(
    text: &str,
    opts: &RegistryOptions,
    platform: &Platform,
) -> Result<Opened, OciError> {
    match text.parse()? {
        crate::ImageName::Qualified(reference) => Ok(Opened {
            source: open_source(&reference, opts)?,
            reference,
            notes: Vec::new(),
        }),
        crate::ImageName::Short(short) => {
            let found = resolve_short_name(&short, &RegistriesConf::load()?, opts, platform)?;
            let name = format!("{:?}", short.to_string());
            let mut notes: Vec<String> = (found.skipped.iter())
                .map(|skipped| format!("short name {name}: {skipped}"))
                .collect();
            notes.push(format!(
                "short name {name} resolved to {} ({})",
                found.reference, found.lookup
            ));
            Ok(Opened {
                reference: found.reference,
                source: found.source,
                notes,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short(s: &str) -> ShortName {
        match s.parse::<crate::ImageName>().unwrap() {
            crate::ImageName::Short(n) => n,
            other => panic!("{s}: not short: {other:?}"),
        }
    }

    #[test]
    fn search_list_aliases_and_default() {
        let p = Path::new("/etc/containers/registries.conf");
        let mut conf = RegistriesConf::default();
        // nothing configured: Docker Hub
        let c: Vec<String> = conf
            .candidates(&short("debian:12"))
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(c, ["docker://docker.io/library/debian:12"]);
        assert!(conf.describe_lookup(&short("debian")).contains("docker.io"));

        conf.merge_file(
            "unqualified-search-registries = [\"127.0.0.1:5001\", \"quay.io\", \"docker.io\"]\n\
             short-name-mode = \"enforcing\"\n\
             [[registry]]\nlocation = \"x.io\"\ninsecure = true\n\
             [aliases]\n\"fedora\" = \"registry.fedoraproject.org/fedora\"\n",
            p,
        )
        .unwrap();
        let c: Vec<String> = conf
            .candidates(&short("app:1"))
            .unwrap()
            .iter()
            .map(|r| r.to_string())
            .collect();
        assert_eq!(
            c,
            [
                "docker://127.0.0.1:5001/app:1",
                "docker://quay.io/app:1",
                "docker://docker.io/library/app:1"
            ]
        );
        assert!(
            conf.describe_lookup(&short("app"))
                .contains("/etc/containers/registries.conf")
        );
        let c = conf.candidates(&short("fedora:40")).unwrap();
        assert_eq!(
            c[0].to_string(),
            "docker://registry.fedoraproject.org/fedora:40"
        );
        assert_eq!(c.len(), 1);

        // a drop-in replaces the list and keeps the aliases
        let d = Path::new("/etc/containers/registries.conf.d/10-local.conf");
        conf.merge_file("unqualified-search-registries = [\"localhost:5000\"]", d)
            .unwrap();
        assert_eq!(conf.search, ["localhost:5000"]);
        assert_eq!(conf.search_from.as_deref(), Some(d));
        assert_eq!(conf.aliases.len(), 1);
        // a drop-in without the key leaves the list alone
        conf.merge_file("[aliases]\n\"x\" = \"reg.io/y/x\"\n", p)
            .unwrap();
        assert_eq!(conf.search, ["localhost:5000"]);
        assert_eq!(conf.aliases.len(), 2);
    }

    #[test]
    fn broken_files_are_named() {
        let p = Path::new("/tmp/conf/registries.conf");
        for (text, why) in [
            ("unqualified-search-registries = [\"a.io\"", "line 1"),
            ("x = 1\nunqualified-search-registries = \"a.io\"", "line 2"),
            (
                "unqualified-search-registries = [\"a.io/ns\"]",
                "not a registry host",
            ),
            ("[aliases]\n\"a\" = \"nohost\"", "alias \"a\""),
            ("[aliases]\n\"a\" = \"r.io/a:1\"", "tag or digest"),
        ] {
            let e = RegistriesConf::default()
                .merge_file(text, p)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("parsing registries configuration /tmp/conf/registries.conf: "),
                "{text}: {e}"
            );
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn load_from_files_and_drop_ins() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("registries.conf");
        let d = dir.path().join("registries.conf.d");
        std::fs::create_dir(&d).unwrap();
        // missing files are empty configurations
        assert_eq!(
            RegistriesConf::load_from(&main, Some(&d)).unwrap(),
            RegistriesConf::default()
        );
        std::fs::write(&main, "unqualified-search-registries = [\"a.io\"]").unwrap();
        std::fs::write(
            d.join("20-b.conf"),
            "unqualified-search-registries = [\"b.io\"]",
        )
        .unwrap();
        std::fs::write(
            d.join("10-c.conf"),
            "unqualified-search-registries = [\"c.io\"]",
        )
        .unwrap();
        std::fs::write(d.join("30-ignored.txt"), "not toml [").unwrap();
        let conf = RegistriesConf::load_from(&main, Some(&d)).unwrap();
        assert_eq!(conf.search, ["b.io"]);
        assert_eq!(conf.search_from, Some(d.join("20-b.conf")));
        assert_eq!(
            RegistriesConf::load_from(&main, None).unwrap().search,
            ["a.io"]
        );
        std::fs::write(d.join("15-bad.conf"), "unqualified-search-registries = 3").unwrap();
        let e = RegistriesConf::load_from(&main, Some(&d))
            .unwrap_err()
            .to_string();
        assert!(e.contains("15-bad.conf"), "{e}");
    }
}
