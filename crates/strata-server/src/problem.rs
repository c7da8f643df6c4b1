//! Errors answered as `application/problem+json` (RFC 9457), each with a
//! stable `code`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// A problem's body (RFC 9457), as sent.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ProblemBody {
    /// `urn:strata:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The code in words.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// Stable: `format-removed`, `format-unknown`, `queue-full`,
    /// `registry-not-allowed`, `source-not-found`, `job-not-found`, ...
    pub code: String,
    /// What went wrong.
    pub detail: String,
    /// More members by code: `fallback: {action: "use-source",
    /// source_digest, source}` (410, 422), `retry_after_s` (429),
    /// `format`, `registry`.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: Map<String, Value>,
}

/// One problem answer.
#[derive(Debug, Clone)]
pub struct Problem {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`format-removed`, `queue-full`, ...).
    pub code: &'static str,
    /// What went wrong, for a human.
    pub detail: String,
    /// More members (`fallback`, `format`, `retry_after_s`, ...).
    pub extra: Map<String, Value>,
    /// `Retry-After` seconds (429, 503).
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem with no extra members.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Problem {
        Problem {
            status,
            code,
            detail: detail.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    /// Add a member.
    pub fn with(mut self, key: &str, value: Value) -> Problem {
        self.extra.insert(key.to_string(), value);
        self
    }

    /// The body.
    pub fn body(&self) -> Value {
        let body = ProblemBody {
            kind: format!("urn:strata:problem:{}", self.code),
            title: self.code.replace('-', " "),
            status: self.status.as_u16(),
            code: self.code.to_string(),
            detail: self.detail.clone(),
            extra: self.extra.clone(),
        };
        serde_json::to_value(&body).unwrap_or(Value::Null)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).unwrap_or_default();
        let mut r = (self.status, body).into_response();
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"strata\""),
            );
        }
        r
    }
}
