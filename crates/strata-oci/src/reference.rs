//! Image references in skopeo's transport syntax, and bare names as podman
//! takes them.
//!
//! - `docker://[HOST[:PORT]/]REPO[:TAG][@DIGEST]`: Docker Hub rules apply
//!   when the first component is not a host (no `.` or `:` and not
//!   `localhost`): registry `docker.io`, and `library/` for one-component
//!   names. The default tag is `latest`.
//! - `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`: split at the first `:` after
//!   the transport, like containers/image does (so DIR cannot contain `:`).
//! - `docker-archive:FILE[:REPO:TAG]`.
//! - [`ImageName`]: any of the above, or a reference without a transport:
//!   `HOST[:PORT]/REPO[:TAG][@DIGEST]` means `docker://`, and a name whose
//!   first component is not a host (`debian:12`, `user/app`) is a
//!   [`ShortName`] for the search registries to resolve.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use strata_digest::Digest;

use crate::OciError;

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// An image in a registry.
    Docker {
        /// `host[:port]`.
        registry: String,
        /// Repository path.
        repository: String,
        /// Tag, when not pulled by digest alone.
        tag: Option<String>,
        /// Digest, when pinned.
        digest: Option<Digest>,
    },
    /// An OCI image layout directory.
    OciLayout {
        /// The layout directory.
        dir: PathBuf,
        /// `org.opencontainers.image.ref.name` to pick.
        tag: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive {
        /// The archive.
        file: PathBuf,
        /// Tag to pick.
        tag: Option<String>,
    },
    /// A `docker save` archive.
    DockerArchive {
        /// The archive.
        file: PathBuf,
        /// `repo:tag` from RepoTags to pick.
        tag: Option<String>,
    },
}

fn err(input: &str, reason: &str) -> OciError {
    OciError::Reference {
        input: input.to_string(),
        reason: reason.to_string(),
    }
}

fn split_path(rest: &str) -> (PathBuf, Option<String>) {
    match rest.split_once(':') {
        Some((p, t)) if !t.is_empty() => (PathBuf::from(p), Some(t.to_string())),
        Some((p, _)) => (PathBuf::from(p), None),
        None => (PathBuf::from(rest), None),
    }
}

fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && !t.starts_with(['.', '-'])
}

fn valid_repo(r: &str) -> bool {
    !r.is_empty()
        && r.split('/').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'.'
                        || b == b'_'
                        || b == b'-'
                })
        })
}

/// `host[:port]` as docker accepts it: DNS labels or an IPv4 address, or
/// an IPv6 address in brackets, and an optional numeric port.
pub(crate) fn valid_host(h: &str) -> bool {
    let (name, port) = match h.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(':') && (!n.starts_with('[') || n.ends_with(']')) => {
            (n, Some(p))
        }
        _ => (h, None),
    };
    let name_ok = if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
    } else {
        !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    name_ok
        && port
            .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Docker's rule for the first component of a name: a registry host when
/// it has a `.` or a `:` or is `localhost`, else part of the repository.
fn is_registry_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

/// A docker-style name split into its parts, before Docker Hub defaults.
struct DockerName {
    /// The registry when the first component is a host.
    host: Option<String>,
    /// The repository path as written (no `library/` added).
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Split and check `[HOST[:PORT]/]REPO[:TAG][@DIGEST]`; `input` is the
/// whole reference for messages.
fn split_docker_name(input: &str, name: &str) -> Result<DockerName, OciError> {
    let (name, digest) = match name.split_once('@') {
        Some((n, d)) => (
            n,
            Some(
                d.parse::<Digest>()
                    .map_err(|e| err(input, &e.to_string()))?,
            ),
        ),
        None => (name, None),
    };
    let (host, path) = match name.split_once('/') {
        Some((h, p)) if is_registry_host(h) => {
            if !valid_host(h) {
                return Err(err(input, &format!("invalid registry host {h:?}")));
            }
            // docker's own spelling of Docker Hub
            let h = if h == "index.docker.io" {
                "docker.io"
            } else {
                h
            };
            (Some(h.to_string()), p)
        }
        _ => (None, name),
    };
    let last_slash = path.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (path, tag) = match path[last_slash..].rfind(':') {
        Some(i) => (
            &path[..last_slash + i],
            Some(path[last_slash + i + 1..].to_string()),
        ),
        None => (path, None),
    };
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(err(
            input,
            "invalid repository name (repository names must be lowercase)",
        ));
    }
    if !valid_repo(path) {
        return Err(err(input, "invalid repository name"));
    }
    if let Some(t) = &tag
        && !valid_tag(t)
    {
        return Err(err(input, "invalid tag"));
    }
    Ok(DockerName {
        host,
        path: path.to_string(),
        tag,
        digest,
    })
}

impl DockerName {
    /// The reference on the named host, or on Docker Hub when none is named.
    fn qualify_on_docker_hub(self) -> ImageRef {
        let registry = self.host.unwrap_or_else(|| DOCKER_HUB.to_string());
        docker_ref(&registry, &self.path, self.tag, self.digest)
    }
}

/// Docker Hub's registry name in references (reached at
/// `registry-1.docker.io`).
pub const DOCKER_HUB: &str = "docker.io";

/// A `docker://` reference: Docker Hub puts one-component names under
/// `library/`, and `latest` is the tag when neither tag nor digest is given.
fn docker_ref(registry: &str, path: &str, tag: Option<String>, digest: Option<Digest>) -> ImageRef {
    let repository = if registry == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    let tag = if tag.is_none() && digest.is_none() {
        Some("latest".to_string())
    } else {
        tag
    };
    ImageRef::Docker {
        registry: registry.to_string(),
        repository,
        tag,
        digest,
    }
}

/// What a user may name an image with where it is pulled, as podman takes
/// it: skopeo's transport syntax, or a bare docker reference without a
/// transport (`debian:12`, `localhost:5000/app:1`, `docker.io/library/debian`).
///
/// A bare reference whose first component is a registry host (it has a `.`
/// or a `:` or is `localhost`) is fully qualified and means `docker://`; any
/// other bare reference is a *short name* that the search registries of
/// registries.conf resolve ([`crate::registries_conf`]). Unlike a bare short
/// name, `docker://debian` is always Docker Hub, as with skopeo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageName {
    /// A reference that says where the image is.
    Qualified(ImageRef),
    /// A name without a registry.
    Short(ShortName),
}

/// A bare reference without a registry host: `REPO[:TAG][@DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortName {
    /// Repository path as written (`debian`, `user/app`).
    pub repository: String,
    /// Tag as written.
    pub tag: Option<String>,
    /// Digest as written.
    pub digest: Option<Digest>,
}

impl ShortName {
    /// The `docker://` reference of this name on `registry` (`host[:port]`);
    /// on `docker.io` one-component names get `library/`.
    pub fn on(&self, registry: &str) -> ImageRef {
        docker_ref(registry, &self.repository, self.tag.clone(), self.digest)
    }

    /// The reference an alias (`[aliases]` of registries.conf: a fully
    /// qualified name without tag or digest) names, with this name's tag
    /// and digest.
    pub fn via_alias(&self, alias: &str) -> Result<ImageRef, OciError> {
        let parts = split_docker_name(alias, alias)?;
        let Some(host) = parts.host else {
            return Err(err(alias, "an alias must name a registry host"));
        };
        if parts.tag.is_some() || parts.digest.is_some() {
            return Err(err(alias, "an alias must not have a tag or digest"));
        }
        Ok(docker_ref(
            &host,
            &parts.path,
            self.tag.clone(),
            self.digest,
        ))
    }
}

impl fmt::Display for ShortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageName {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let transport = ["docker://", "oci:", "oci-archive:", "docker-archive:"]
            .iter()
            .any(|t| s.starts_with(t));
        if transport {
            return s.parse().map(ImageName::Qualified);
        }
        let parts = split_docker_name(s, s)?;
        Ok(match parts.host {
            Some(_) => ImageName::Qualified(parts.qualify_on_docker_hub()),
            None => ImageName::Short(ShortName {
                repository: parts.path,
                tag: parts.tag,
                digest: parts.digest,
            }),
        })
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageName::Qualified(r) => r.fmt(f),
            ImageName::Short(n) => n.fmt(f),
        }
    }
}

impl FromStr for ImageRef {
    type Err = OciError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (transport, rest) = s.split_once(':').ok_or_else(|| {
            err(
                s,
                "expected TRANSPORT:REFERENCE (docker://, oci:, oci-archive:, docker-archive:)",
            )
        })?;
        match transport {
            "docker" => {
                let rest = rest
                    .strip_prefix("//")
                    .ok_or_else(|| err(s, "docker references start with docker://"))?;
                let parts = split_docker_name(s, rest)?;
                Ok(parts.qualify_on_docker_hub())
            }
            "oci" | "oci-archive" | "docker-archive" => {
                if rest.is_empty() {
                    return Err(err(s, "missing path"));
                }
                let (path, tag) = split_path(rest);
                Ok(match transport {
                    "oci" => ImageRef::OciLayout { dir: path, tag },
                    "oci-archive" => ImageRef::OciArchive { file: path, tag },
                    _ => ImageRef::DockerArchive { file: path, tag },
                })
            }
            other => Err(err(
                s,
                &format!(
                    "unknown transport {other:?} (docker://, oci:, oci-archive:, docker-archive:)"
                ),
            )),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_tag = |f: &mut fmt::Formatter<'_>, t: &str, p: &PathBuf, tag: &Option<String>| {
            write!(f, "{t}:{}", p.display())?;
            if let Some(tag) = tag {
                write!(f, ":{tag}")?;
            }
            Ok(())
        };
        match self {
            ImageRef::Docker {
                registry,
                repository,
                tag,
                digest,
            } => {
                write!(f, "docker://{registry}/{repository}")?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                if let Some(d) = digest {
                    write!(f, "@{d}")?;
                }
                Ok(())
            }
            ImageRef::OciLayout { dir, tag } => with_tag(f, "oci", dir, tag),
            ImageRef::OciArchive { file, tag } => with_tag(f, "oci-archive", file, tag),
            ImageRef::DockerArchive { file, tag } => with_tag(f, "docker-archive", file, tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let tag_and_digest = format!("docker://reg.io/a:v1@{d}");
        let cases: Vec<(&str, &str)> = vec![
            (
                "docker://debian",
                "docker://docker.io/library/debian:latest",
            ),
            ("docker://debian:12", "docker://docker.io/library/debian:12"),
            ("docker://user/app:v1", "docker://docker.io/user/app:v1"),
            (
                "docker://127.0.0.1:5000/deb/base:x",
                "docker://127.0.0.1:5000/deb/base:x",
            ),
            ("docker://localhost/a", "docker://localhost/a:latest"),
            (
                "docker://docker.io/debian",
                "docker://docker.io/library/debian:latest",
            ),
            (
                "docker://localhost:5000/a/b/c:1.0-rc_1",
                "docker://localhost:5000/a/b/c:1.0-rc_1",
            ),
            (&tag_and_digest, &tag_and_digest),
            ("oci:samples/hello:latest", "oci:samples/hello:latest"),
            ("oci:/tmp/x", "oci:/tmp/x"),
            ("oci-archive:/tmp/a.tar:v2", "oci-archive:/tmp/a.tar:v2"),
            (
                "docker-archive:/tmp/d.tar:repo/x:tag",
                "docker-archive:/tmp/d.tar:repo/x:tag",
            ),
        ];
        for (input, canonical) in cases {
            let r: ImageRef = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), canonical);
            let again: ImageRef = canonical.parse().unwrap();
            assert_eq!(again, r);
        }
        let pinned: ImageRef = format!("docker://reg.io:5000/a/b@{d}").parse().unwrap();
        assert_eq!(pinned.to_string(), format!("docker://reg.io:5000/a/b@{d}"));
        match pinned {
            ImageRef::Docker { tag, digest, .. } => {
                assert_eq!(tag, None);
                assert_eq!(digest.unwrap().to_string(), d);
            }
            _ => panic!(),
        }
    }

    #[test]
    fn parse_errors() {
        for (bad, why) in [
            ("debian", "expected TRANSPORT"),
            ("http://x/y", "unknown transport"),
            ("docker:debian", "docker://"),
            ("docker://Reg.io/UPPER", "invalid repository"),
            ("docker://r.io/a:b@sha256:1234", "invalid digest"),
            ("docker://r.io/a:b c", "invalid tag"),
            ("oci:", "missing path"),
            ("docker://", "invalid repository"),
            ("docker://reg.io/", "invalid repository"),
            ("docker://reg.io/a:", "invalid tag"),
            ("docker://reg.io/a:.x", "invalid tag"),
            ("docker://reg.io/a//b", "invalid repository"),
        ] {
            let e = bad.parse::<ImageRef>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// Bare references, as podman and docker normalize them. `None` for
    /// the canonical form: a short name (resolved on Docker Hub here).
    #[test]
    fn bare_names_table() {
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let pinned = format!("app@{d}");
        let pinned_hub = format!("docker://docker.io/library/app@{d}");
        let tag_digest = format!("debian:12@{d}");
        let tag_digest_hub = format!("docker://docker.io/library/debian:12@{d}");
        let nested_digest = format!("reg.io:5000/a/b/c@{d}");
        let nested_digest_canon = format!("docker://reg.io:5000/a/b/c@{d}");
        // (input, short name?, canonical docker:// form)
        let cases: Vec<(&str, bool, &str)> = vec![
            ("debian", true, "docker://docker.io/library/debian:latest"),
            ("debian:12", true, "docker://docker.io/library/debian:12"),
            ("user/app:v1", true, "docker://docker.io/user/app:v1"),
            ("a/b/c", true, "docker://docker.io/a/b/c:latest"),
            (
                "localhost",
                true,
                "docker://docker.io/library/localhost:latest",
            ),
            // a skopeo transport that does not parse falls back to a name,
            // as podman does: the image `docker` tagged 12
            ("docker:12", true, "docker://docker.io/library/docker:12"),
            (&pinned, true, &pinned_hub),
            (&tag_digest, true, &tag_digest_hub),
            ("localhost/app", false, "docker://localhost/app:latest"),
            (
                "localhost:5000/app:1",
                false,
                "docker://localhost:5000/app:1",
            ),
            (
                "127.0.0.1:5000/app:1",
                false,
                "docker://127.0.0.1:5000/app:1",
            ),
            ("[::1]:5000/app:1", false, "docker://[::1]:5000/app:1"),
            (
                "docker.io/library/debian",
                false,
                "docker://docker.io/library/debian:latest",
            ),
            (
                "docker.io/debian:12",
                false,
                "docker://docker.io/library/debian:12",
            ),
            (
                "index.docker.io/library/debian:12",
                false,
                "docker://docker.io/library/debian:12",
            ),
            ("quay.io/debian:12", false, "docker://quay.io/debian:12"),
            (
                "reg.io:5000/a/b/c:1.0-rc_1",
                false,
                "docker://reg.io:5000/a/b/c:1.0-rc_1",
            ),
            (&nested_digest, false, &nested_digest_canon),
            // transports stay as they were
            (
                "docker://debian",
                false,
                "docker://docker.io/library/debian:latest",
            ),
            (
                "oci:samples/hello:latest",
                false,
                "oci:samples/hello:latest",
            ),
            (
                "oci-archive:/tmp/a.tar:v2",
                false,
                "oci-archive:/tmp/a.tar:v2",
            ),
            (
                "docker-archive:/tmp/d.tar",
                false,
                "docker-archive:/tmp/d.tar",
            ),
        ];
        for (input, is_short, canonical) in cases {
            let name: ImageName = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            let r = match &name {
                ImageName::Short(n) => {
                    assert!(is_short, "{input}: parsed as a short name");
                    // a short name prints as written and parses back
                    assert_eq!(n.to_string(), input);
                    assert_eq!(input.parse::<ImageName>().unwrap(), name);
                    n.on(DOCKER_HUB)
                }
                ImageName::Qualified(r) => {
                    assert!(!is_short, "{input}: parsed as qualified");
                    r.clone()
                }
            };
            assert_eq!(r.to_string(), canonical, "{input}");
            // the canonical form means the same image
            assert_eq!(canonical.parse::<ImageRef>().unwrap(), r, "{input}");
        }
        // a short name on another registry keeps its path as written
        let ImageName::Short(n) = "app:1".parse().unwrap() else {
            panic!()
        };
        assert_eq!(
            n.on("127.0.0.1:5000").to_string(),
            "docker://127.0.0.1:5000/app:1"
        );
        let ImageName::Short(n) = tag_digest.parse().unwrap() else {
            panic!()
        };
        assert_eq!(n.tag.as_deref(), Some("12"));
        assert_eq!(n.digest.map(|x| x.to_string()).as_deref(), Some(d));
    }

    #[test]
    fn bare_name_errors() {
        for (bad, why) in [
            ("Debian:12", "must be lowercase"),
            ("reg.io/Debian", "must be lowercase"),
            ("localhost:5000/App:1", "must be lowercase"),
            ("debian:12 x", "invalid tag"),
            ("debian:.x", "invalid tag"),
            ("debian:", "invalid tag"),
            ("app@sha256:1234", "invalid digest"),
            ("app@md5:1234", "sha256"),
            ("", "invalid repository"),
            ("reg.io/", "invalid repository"),
            ("a//b", "invalid repository"),
            ("bad_host.io/app", "invalid registry host"),
            ("reg.io:port/app", "invalid registry host"),
            ("reg.io:/app", "invalid registry host"),
            ("-reg.io/app", "invalid registry host"),
            ("docker:debian x", "invalid tag"),
        ] {
            let e = bad.parse::<ImageName>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.starts_with("invalid image reference"), "{bad:?}: {e}");
        }
        // transport syntax keeps its own errors
        let e = "docker:/x".parse::<ImageRef>().unwrap_err().to_string();
        assert!(e.contains("docker://"), "{e}");
    }
}
