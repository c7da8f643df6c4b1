//! The client side (`strata convert --via URL`): ask a service for a
//! conversion and wait for it. Anything short of a verified result (a
//! removed or unknown format, a failed or cancelled job, a result without
//! a passed verification, a service that cannot be reached) is a
//! *fallback*: the caller deploys the source image and says why lazy
//! loading is not used. Bad credentials and bad requests are errors, not
//! fallbacks: they mean the client is set up wrong.

use std::time::{Duration, Instant};

use serde_json::Value;

/// What came of asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViaOutcome {
    /// A verified conversion.
    Converted {
        /// The converted manifest's digest.
        digest: String,
        /// `HOST/REPO@DIGEST`.
        reference: String,
        /// The job's id.
        job: String,
    },
    /// Use the source image instead.
    Fallback {
        /// Its digest, when the service said it (a client that got no
        /// answer resolves the source itself).
        source_digest: Option<String>,
        /// Why, in one line (`<service> answered 410 format-removed: ...`).
        reason: String,
    },
}

/// A client mistake or a refusal that is not a fallback.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(pub String);

fn problem_line(base: &str, status: u16, body: &Value) -> String {
    let code = body["code"].as_str().unwrap_or("error");
    let detail = body["detail"].as_str().unwrap_or("");
    format!("{base} answered {status} {code}: {detail}")
}

/// POST `body` to `base`/v1/conversions and follow the job until it ends
/// or `wait` passes.
pub fn convert_via(
    base: &str,
    token: Option<&str>,
    body: &Value,
    wait: Duration,
) -> Result<ViaOutcome, ClientError> {
    let base = base.trim_end_matches('/');
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| ClientError(format!("building an HTTP client: {e}")))?;
    let auth = |rb: reqwest::blocking::RequestBuilder| match token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let unreachable = |e: reqwest::Error| ViaOutcome::Fallback {
        source_digest: None,
        reason: format!("{base} could not be reached: {e}"),
    };
    let resp = match auth(client.post(format!("{base}/v1/conversions")))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).expect("JSON values encode"))
        .send()
    {
        Ok(r) => r,
        Err(e) => return Ok(unreachable(e)),
    };
    let (mut status, mut doc) = read(resp);
    match status {
        200 | 202 => {}
        401 | 403 => {
            return Err(ClientError(format!(
                "{}{}",
                problem_line(base, status, &doc),
                if status == 401 {
                    " (give a token with --token-file or $STRATA_TOKEN)"
                } else {
                    ""
                }
            )));
        }
        400 | 413 | 415 => return Err(ClientError(problem_line(base, status, &doc))),
        _ => {
            return Ok(ViaOutcome::Fallback {
                source_digest: doc["fallback"]["source_digest"]
                    .as_str()
                    .map(str::to_string),
                reason: problem_line(base, status, &doc),
            });
        }
    }
    let id = doc["id"].as_str().unwrap_or_default().to_string();
    let deadline = Instant::now() + wait;
    let mut pause = Duration::from_millis(250);
    loop {
        let state = doc["state"].as_str().unwrap_or_default();
        let source_digest = doc["source"]["digest"].as_str().map(str::to_string);
        match state {
            // verified here, or found converted by another instance
            // under the tag only a verified result gets
            "succeeded"
                if doc["verification"]["ok"] == Value::Bool(true)
                    || doc["result"]["cache"] == "registry" =>
            {
                return Ok(ViaOutcome::Converted {
                    digest: doc["result"]["digest"].as_str().unwrap_or_default().into(),
                    reference: doc["result"]["reference"]
                        .as_str()
                        .unwrap_or_default()
                        .into(),
                    job: id,
                });
            }
            "succeeded" => {
                return Ok(ViaOutcome::Fallback {
                    source_digest,
                    reason: format!("{base}: job {id} succeeded without a passed verification"),
                });
            }
            "failed" | "cancelled" => {
                let e = &doc["error"];
                let what = match (e["code"].as_str(), e["check"].as_str()) {
                    (Some(c), Some(k)) => {
                        format!("{c} ({k}): {}", e["message"].as_str().unwrap_or(""))
                    }
                    (Some(c), None) => format!("{c}: {}", e["message"].as_str().unwrap_or("")),
                    _ => state.to_string(),
                };
                return Ok(ViaOutcome::Fallback {
                    source_digest,
                    reason: format!("{base}: job {id} {state}: {what}"),
                });
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Ok(ViaOutcome::Fallback {
                source_digest,
                reason: format!(
                    "{base}: job {id} did not finish within {} s (it goes on; GET /v1/conversions/{id})",
                    wait.as_secs()
                ),
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_secs(2));
        let r = match auth(client.get(format!("{base}/v1/conversions/{id}"))).send() {
            Ok(r) => r,
            Err(e) => {
                return Ok(ViaOutcome::Fallback {
                    source_digest,
                    reason: format!("{base} could not be reached while job {id} ran: {e}"),
                });
            }
        };
        (status, doc) = read(r);
        if status != 200 {
            return Ok(ViaOutcome::Fallback {
                source_digest,
                reason: problem_line(base, status, &doc),
            });
        }
    }
}

fn read(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    // bounded: a job or a problem is a few KiB
    let mut buf = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(r, 8 << 20), &mut buf);
    (status, serde_json::from_slice(&buf).unwrap_or(Value::Null))
}
