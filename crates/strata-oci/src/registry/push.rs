//! [`RegistryPusher`]: blobs and manifests to one repository of a
//! registry (OCI distribution spec).
//!
//! `HEAD` a blob first and skip it when the registry has it; otherwise
//! `POST /blobs/uploads/` and one monolithic `PUT <Location>?digest=…` (a
//! failed PUT restarts the upload session); manifests are `PUT` with their
//! exact bytes and the returned `Docker-Content-Digest` is checked. Tokens
//! are asked for `repository:REPO:pull,push`.

use std::path::Path;
use std::time::Duration;

use reqwest::blocking::Body;
use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION};
use reqwest::{Method, StatusCode};
use strata_digest::Digest;

use super::RegistryOptions;
use super::transport::{ATTEMPTS, Call, Session, one_line};
use crate::{ImageRef, OciError};

/// What a blob upload sends.
#[derive(Debug, Clone, Copy)]
pub enum BlobContent<'a> {
    /// Bytes in memory (a config).
    Bytes(&'a [u8]),
    /// A file, streamed (reopened for every attempt).
    File(&'a Path),
}

/// A client that pushes blobs and manifests to one repository of a
/// registry (OCI distribution spec). Same auth, retries and TLS choice as
/// [`RegistrySource`](super::RegistrySource), and the same shared HTTP
/// client when built from the same [`RegistryOptions`]; bearer tokens are
/// asked for `repository:REPO:pull,push`.
pub struct RegistryPusher {
    session: Session,
}

/// Send rate below which an upload is taken for stalled: a blob PUT may
/// take its stall timeout plus its size at this rate.
const MIN_UPLOAD_RATE: u64 = 256 * 1024;

impl RegistryPusher {
    /// A pusher for the repository of `reference` (a `docker://`
    /// reference; its tag or digest is not used here).
    pub fn new(reference: &ImageRef, opts: &RegistryOptions) -> Result<Self, OciError> {
        let ImageRef::Docker {
            registry,
            repository,
            ..
        } = reference
        else {
            return Err(OciError::Reference {
                input: reference.to_string(),
                reason: "not a docker:// reference".into(),
            });
        };
        Ok(RegistryPusher {
            session: Session::new(registry, repository, opts, true)?,
        })
    }

    /// `host[:port]/repository`, for messages.
    pub fn target(&self) -> String {
        self.session.target()
    }

    /// `GET /v2/`: the registry answers (and accepts our credentials for a
    /// push, when it asks for them).
    pub fn ping(&self) -> Result<(), OciError> {
        let url = format!("{}/v2/", self.session.base);
        let action = format!("reaching registry {} (GET /v2/)", self.session.host);
        self.session.get(&url, &HeaderMap::new(), &action)?;
        Ok(())
    }

    /// `HEAD /v2/REPO/blobs/DIGEST`: whether the repository has the blob.
    pub fn has_blob(&self, digest: &Digest) -> Result<bool, OciError> {
        let url = self.session.blob_url(digest);
        let action = format!("checking for blob {digest} in {}", self.target());
        let call = Call {
            method: Method::HEAD,
            url: &url,
            headers: HeaderMap::new(),
            body: None,
            timeout: None,
            attempts: ATTEMPTS,
            also_ok: &[StatusCode::NOT_FOUND],
            deadline: None,
        };
        let resp = self.session.execute(&call, &action)?;
        Ok(resp.status() == StatusCode::OK)
    }

    /// `POST /v2/REPO/blobs/uploads/?mount=DIGEST&from=OTHER`: ask the
    /// registry to link blob `digest` of repository `from` (same registry)
    /// into this one without sending it. `true` when it did (201); a
    /// registry that does not mount answers 202 with an upload session,
    /// which is left to expire, and this returns `false`.
    pub fn mount_blob(&self, digest: &Digest, from: &str) -> Result<bool, OciError> {
        let action = format!("mounting blob {digest} from {from} into {}", self.target());
        let url = format!(
            "{}/v2/{}/blobs/uploads/?mount={digest}&from={from}",
            self.session.base, self.session.repository
        );
        let call = Call {
            also_ok: &[StatusCode::ACCEPTED],
            ..Call::new(Method::POST, &url)
        };
        let resp = self.session.execute(&call, &action)?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Upload blob `digest` of `size` bytes: `POST /v2/REPO/blobs/uploads/`
    /// then one `PUT <Location>?digest=DIGEST` with all the bytes, which
    /// must be answered 201. A PUT that fails with a connection error or a
    /// 5xx starts again from a new upload session (5 attempts in all).
    pub fn upload_blob(
        &self,
        digest: &Digest,
        size: u64,
        content: BlobContent<'_>,
    ) -> Result<(), OciError> {
        let action = format!("uploading blob {digest} to {}", self.target());
        let post_url = format!(
            "{}/v2/{}/blobs/uploads/",
            self.session.base, self.session.repository
        );
        let make_body = || -> Result<Body, OciError> {
            Ok(match content {
                BlobContent::Bytes(b) => Body::from(b.to_vec()),
                BlobContent::File(p) => {
                    let f =
                        std::fs::File::open(p).map_err(crate::io_err("opening staged blob", p))?;
                    Body::sized(f, size)
                }
            })
        };
        let mut put_headers = HeaderMap::new();
        put_headers.insert(
            CONTENT_TYPE,
            "application/octet-stream".parse().expect("static header"),
        );
        // the send of a PUT lasts as long as its body: the stall timeout
        // alone would cut large blobs off
        let put_timeout = self.session.stall + Duration::from_secs(size / MIN_UPLOAD_RATE);
        let mut delay = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let start = Call {
                method: Method::POST,
                url: &post_url,
                headers: HeaderMap::new(),
                body: None,
                timeout: None,
                attempts: ATTEMPTS,
                also_ok: &[],
                deadline: None,
            };
            let resp = self
                .session
                .execute(&start, &format!("{action}: starting an upload (POST)"))?;
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .ok_or_else(|| OciError::Format {
                    what: format!("{action}: starting an upload (POST)"),
                    reason: format!(
                        "the registry answered {} without a Location header",
                        resp.status().as_u16()
                    ),
                })?;
            let put_url =
                upload_url(&post_url, &location, digest).map_err(|reason| OciError::Format {
                    what: format!("{action}: starting an upload (POST)"),
                    reason,
                })?;
            let put = Call {
                method: Method::PUT,
                url: &put_url,
                headers: put_headers.clone(),
                body: Some(&make_body),
                timeout: Some(put_timeout),
                // retried below from a new session: the old one may be gone
                attempts: 1,
                also_ok: &[],
                deadline: None,
            };
            let put_action = format!("{action}: sending {size} bytes (PUT)");
            match self.session.execute(&put, &put_action) {
                Ok(resp) if resp.status() == StatusCode::CREATED => return Ok(()),
                Ok(resp) => {
                    return Err(OciError::Registry {
                        action: put_action,
                        status: resp.status().as_u16(),
                        detail: " instead of 201 Created".into(),
                    });
                }
                Err(e) if attempt < ATTEMPTS && retryable(&e) => {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `PUT /v2/REPO/manifests/REFERENCE` with the exact `bytes` as
    /// `media_type`. Returns the manifest's digest; a `Docker-Content-Digest`
    /// answer that is not the sha256 of `bytes` is an error.
    pub fn put_manifest(
        &self,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, OciError> {
        let digest = Digest::sha256_of(bytes);
        let action = format!("pushing manifest {digest} to {}:{reference}", self.target());
        let url = format!(
            "{}/v2/{}/manifests/{reference}",
            self.session.base, self.session.repository
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            media_type.parse().map_err(|_| OciError::Format {
                what: action.clone(),
                reason: format!("media type {media_type:?} is not a valid header value"),
            })?,
        );
        let make_body = || -> Result<Body, OciError> { Ok(Body::from(bytes.to_vec())) };
        let call = Call {
            method: Method::PUT,
            url: &url,
            headers,
            body: Some(&make_body),
            timeout: None,
            attempts: ATTEMPTS,
            also_ok: &[],
            deadline: None,
        };
        let resp = self.session.execute(&call, &action)?;
        if resp.status() != StatusCode::CREATED {
            return Err(OciError::Registry {
                action,
                status: resp.status().as_u16(),
                detail: " instead of 201 Created".into(),
            });
        }
        if let Some(claimed) = resp
            .headers()
            .get("docker-content-digest")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
            && claimed != digest.to_string()
        {
            return Err(OciError::Format {
                what: action,
                reason: format!(
                    "the registry answered Docker-Content-Digest {}, but the manifest sent is {digest}",
                    one_line(&claimed, 100)
                ),
            });
        }
        Ok(digest)
    }
}

/// Errors worth a new upload session: the connection failed or the
/// registry had a server error.
fn retryable(e: &OciError) -> bool {
    match e {
        OciError::Network { .. } => true,
        OciError::Registry { status, .. } => *status >= 500,
        _ => false,
    }
}

/// The PUT URL of an upload: `location` (absolute, or relative to the
/// POST's URL) with `digest=DIGEST` added to its query.
fn upload_url(post_url: &str, location: &str, digest: &Digest) -> Result<String, String> {
    let base = reqwest::Url::parse(post_url).map_err(|e| format!("bad URL {post_url}: {e}"))?;
    let mut url = base
        .join(location.trim())
        .map_err(|e| format!("the registry answered an unusable Location ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the registry answered a Location with scheme {:?}",
            url.scheme()
        ));
    }
    url.query_pairs_mut()
        .append_pair("digest", &digest.to_string());
    Ok(url.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_resolve() {
        let post = "http://h:1/v2/a/b/blobs/uploads/";
        let d: Digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            .parse()
            .unwrap();
        let q = "digest=sha256%3Ae3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        // relative to the host, with the registry's own query kept
        assert_eq!(
            upload_url(post, "/v2/a/b/blobs/uploads/u1?_state=x%2By", &d).unwrap(),
            format!("http://h:1/v2/a/b/blobs/uploads/u1?_state=x%2By&{q}")
        );
        // absolute, elsewhere
        assert_eq!(
            upload_url(post, "https://store.example/up/u2", &d).unwrap(),
            format!("https://store.example/up/u2?{q}")
        );
        // relative to the POST's path
        assert_eq!(
            upload_url(post, "u3", &d).unwrap(),
            format!("http://h:1/v2/a/b/blobs/uploads/u3?{q}")
        );
        assert!(upload_url(post, "ftp://x/y", &d).is_err());
    }
}
