//! RFC 9457 `application/problem+json` errors: the only error shape the HTTP API returns.
//!
//! Each problem has a stable `code` (also the last segment of `type`) that clients can match
//! on, a human `detail`, and for validation failures the list of failing fields.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::schema::FieldError;

/// Base URI of problem types; `type` is `{PROBLEM_BASE}{code}`.
pub const PROBLEM_BASE: &str = "https://inkwire.dev/problems/";

/// One validation failure inside a batch: which item and which fields.
#[derive(Debug, Clone, Serialize)]
pub struct ItemErrors {
    pub index: usize,
    pub errors: Vec<FieldError>,
}

/// An API error. `type` and `title` are derived from `code` and `status` when it is sent.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: u16,
    pub code: &'static str,
    pub detail: String,
    pub errors: Vec<FieldError>,
    pub invalid_items: Vec<ItemErrors>,
}

/// The wire form (RFC 9457 members plus inkwire's extensions).
#[derive(Serialize)]
struct ProblemDocument<'a> {
    #[serde(rename = "type")]
    type_uri: String,
    title: &'static str,
    status: u16,
    code: &'a str,
    detail: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    errors: &'a [FieldError],
    #[serde(rename = "invalidItems", skip_serializing_if = "<[_]>::is_empty")]
    invalid_items: &'a [ItemErrors],
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status: status.as_u16(),
            code,
            detail: detail.into(),
            errors: Vec::new(),
            invalid_items: Vec::new(),
        }
    }

    /// The RFC 9457 document.
    pub fn to_json(&self) -> serde_json::Value {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        serde_json::to_value(ProblemDocument {
            type_uri: format!("{PROBLEM_BASE}{}", self.code),
            title: status.canonical_reason().unwrap_or("Error"),
            status: self.status,
            code: self.code,
            detail: &self.detail,
            errors: &self.errors,
            invalid_items: &self.invalid_items,
        })
        .expect("problem serializes")
    }

    /// 400 with the failing fields of one document.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        let detail = summarize(&errors);
        Problem {
            errors,
            ..Problem::new(StatusCode::BAD_REQUEST, "validation_failed", detail)
        }
    }

    /// 400 with the failing fields of each bad item of a batch.
    pub fn invalid_items(items: Vec<ItemErrors>) -> Self {
        let detail = format!(
            "{} item(s) invalid, nothing was published: indexes {}",
            items.len(),
            items
                .iter()
                .map(|i| i.index.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Problem {
            invalid_items: items,
            ..Problem::new(StatusCode::BAD_REQUEST, "validation_failed", detail)
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::BAD_REQUEST, code, detail)
    }
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::NOT_FOUND, "not_found", detail)
    }
    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::CONFLICT, code, detail)
    }
    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }
    /// A dependency (NATS, Redis) failed: the client did nothing wrong and may retry.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
    }
}

fn summarize(errors: &[FieldError]) -> String {
    match errors {
        [] => "invalid input".into(),
        [one] => format!("{}: {}", pointer_or_root(&one.pointer), one.message),
        [first, rest @ ..] => format!(
            "{}: {} (and {} more)",
            pointer_or_root(&first.pointer),
            first.message,
            rest.len()
        ),
    }
}

fn pointer_or_root(p: &str) -> &str {
    if p.is_empty() { "(body)" } else { p }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self.to_json()).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// Turns an infrastructure error into a 503 and logs it (without user data).
pub fn dependency_failed(what: &str, err: impl std::fmt::Display) -> Problem {
    tracing::error!(dependency = what, error = %err, "dependency call failed");
    Problem::unavailable(format!("{what} is unavailable; retry later"))
}
