//! Image references in skopeo's transport syntax.
//!
//! - `docker://[HOST[:PORT]/]REPO[:TAG][@DIGEST]`: Docker Hub rules apply
//!   when the first component is not a host (no `.` or `:` and not
//!   `localhost`): registry `docker.io`, and `library/` for one-component
//!   names. The default tag is `latest`.
//! - `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`: split at the first `:` after
//!   the transport, like containers/image does (so DIR cannot contain `:`).
//! - `docker-archive:FILE[:REPO:TAG]`.

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
                let (name, digest) = match rest.split_once('@') {
                    Some((n, d)) => (
                        n,
                        Some(d.parse::<Digest>().map_err(|e| err(s, &e.to_string()))?),
                    ),
                    None => (rest, None),
                };
                let (host, path) = match name.split_once('/') {
                    Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                        (h.to_string(), p.to_string())
                    }
                    _ => ("docker.io".to_string(), name.to_string()),
                };
                let last_slash = path.rfind('/').map(|i| i + 1).unwrap_or(0);
                let (repo, tag) = match path[last_slash..].rfind(':') {
                    Some(i) => (
                        path[..last_slash + i].to_string(),
                        Some(path[last_slash + i + 1..].to_string()),
                    ),
                    None => (path.clone(), None),
                };
                let repo = if host == "docker.io" && !repo.contains('/') {
                    format!("library/{repo}")
                } else {
                    repo
                };
                if !valid_repo(&repo) {
                    return Err(err(s, "invalid repository name"));
                }
                if let Some(t) = &tag
                    && !valid_tag(t)
                {
                    return Err(err(s, "invalid tag"));
                }
                let tag = if tag.is_none() && digest.is_none() {
                    Some("latest".to_string())
                } else {
                    tag
                };
                Ok(ImageRef::Docker {
                    registry: host,
                    repository: repo,
                    tag,
                    digest,
                })
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
}
