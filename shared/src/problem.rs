//! RFC 9457 `application/problem+json` errors: the only error shape the HTTP API returns.
//!
//! Each problem has a stable `code` (also the last segment of `type`) that clients can match
//! on, a human `detail`, and for validation failures the list of failing fields.
//!
//! Texts that may quote client input are clipped when sent (`detail` to [`MAX_DETAIL_CHARS`],
//! each field error's `pointer` and `message` to [`MAX_TEXT_CHARS`]), and the lists to
//! [`MAX_LISTED_ERRORS`] entries, so that an error body stays a few KB whatever was sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::schema::FieldError;

/// Base URI of problem types; `type` is `{PROBLEM_BASE}{code}`.
pub const PROBLEM_BASE: &str = "https://inkwire.dev/problems/";

/// Code of the 503 that says a write was sent but its outcome is unknown.
pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";

/// Longest `detail` sent, in characters; longer ones are cut and end with `…`.
pub const MAX_DETAIL_CHARS: usize = 400;
/// Longest field error `pointer` or `message` sent, in characters.
pub const MAX_TEXT_CHARS: usize = 200;
/// Most field errors listed in one problem, counted over `errors` and every item of
/// `invalidItems` together (the `detail` still says how many there were).
pub const MAX_LISTED_ERRORS: usize = 10;

/// `text` cut to at most `max` characters (the last one then being `…`), on a character
/// boundary.
pub fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((cut, _)) if text[cut..].chars().nth(1).is_some() => {
            format!("{}…", &text[..cut]).into()
        }
        _ => text.into(),
    }
}

/// The items of a batch problem, within what is left of the error budget after `used`; at
/// most three errors per item, so that several bad items are shown.
fn clip_items(items: &[ItemErrors], used: usize) -> Vec<ItemErrors> {
    let mut left = MAX_LISTED_ERRORS.saturating_sub(used);
    let mut out = Vec::new();
    for item in items {
        if left == 0 {
            break;
        }
        let errors = clip_errors(&item.errors[..item.errors.len().min(left).min(3)]);
        left -= errors.len().max(1);
        out.push(ItemErrors {
            index: item.index,
            errors,
        });
    }
    out
}

fn clip_errors(errors: &[FieldError]) -> Vec<FieldError> {
    errors
        .iter()
        .take(MAX_LISTED_ERRORS)
        .map(|e| FieldError {
            pointer: clip(&e.pointer, MAX_TEXT_CHARS).into_owned(),
            rule: clip(&e.rule, MAX_TEXT_CHARS).into_owned(),
            kind: e.kind.clone(),
            message: clip(&e.message, MAX_TEXT_CHARS).into_owned(),
        })
        .collect()
}

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
    /// Extension members (RFC 9457 §3.2) beside the standard ones, e.g. `retryId`.
    pub extensions: serde_json::Map<String, serde_json::Value>,
    /// Seconds for the `Retry-After` header, when the client should retry.
    pub retry_after: Option<u16>,
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
    errors: Vec<FieldError>,
    #[serde(rename = "invalidItems", skip_serializing_if = "<[_]>::is_empty")]
    invalid_items: Vec<ItemErrors>,
    #[serde(flatten)]
    extensions: &'a serde_json::Map<String, serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            status: status.as_u16(),
            code,
            detail: detail.into(),
            errors: Vec::new(),
            invalid_items: Vec::new(),
            extensions: serde_json::Map::new(),
            retry_after: None,
        }
    }

    /// Adds an extension member. Names of the standard members (`type`, `status`, …) are
    /// ignored, so that an extension can never shadow or duplicate one.
    pub fn with_extension(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        const RESERVED: [&str; 7] = [
            "type",
            "title",
            "status",
            "code",
            "detail",
            "errors",
            "invalidItems",
        ];
        if !RESERVED.contains(&name) {
            self.extensions.insert(name.to_string(), value.into());
        }
        self
    }

    /// Sets the `Retry-After` header (seconds).
    pub fn with_retry_after(mut self, seconds: u16) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The RFC 9457 document.
    pub fn to_json(&self) -> serde_json::Value {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        serde_json::to_value(ProblemDocument {
            type_uri: format!("{PROBLEM_BASE}{}", self.code),
            title: status.canonical_reason().unwrap_or("Error"),
            status: self.status,
            code: self.code,
            detail: &clip(&self.detail, MAX_DETAIL_CHARS),
            errors: clip_errors(&self.errors),
            invalid_items: clip_items(&self.invalid_items, self.errors.len()),
            extensions: &self.extensions,
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
    /// 413: the request (or one message made from it) is larger than a limit.
    pub fn payload_too_large(detail: impl Into<String>) -> Self {
        Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", detail)
    }
    /// 503 after the write was sent but not acknowledged: it may or may not have taken
    /// effect. `retry_id` is what to retry with (an `Idempotency-Key` or an event id) so that
    /// the effect happens at most once.
    pub fn outcome_unknown(detail: impl Into<String>, retry_id: Option<&str>) -> Self {
        let p = Problem::new(StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown", detail)
            .with_retry_after(1);
        match retry_id {
            Some(id) => p.with_extension("retryId", id),
            None => p,
        }
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
        if let Some(seconds) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        res
    }
}

/// Turns an infrastructure error into a 503 and logs it (without user data).
pub fn dependency_failed(what: &str, err: impl std::fmt::Display) -> Problem {
    tracing::error!(dependency = what, error = %err, "dependency call failed");
    Problem::unavailable(format!("{what} is unavailable; retry later"))
}

/// An id from a path or query that will become part of a Redis key or NATS subject:
/// `400 invalid_id` naming `what` unless it keeps the identifier rule
/// ([`crate::membership::is_valid_id`]).
pub fn checked_id<'a>(what: &str, raw: &'a str) -> Result<&'a str, Problem> {
    if crate::membership::is_valid_id(raw) {
        Ok(raw)
    } else {
        Err(Problem::bad_request(
            "invalid_id",
            format!(
                "{what} id {:?} must be 1-64 characters of letters, digits, '_' or '-'",
                clip(raw, 64)
            ),
        ))
    }
}

/// Refuses a query parameter that is not in `known` (`400 unknown_parameter`, naming the
/// parameters the route takes).
pub fn refuse_unknown_params(
    params: &std::collections::HashMap<String, String>,
    known: &[&str],
) -> Result<(), Problem> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        Some(unknown) if known.is_empty() => Err(Problem::bad_request(
            "unknown_parameter",
            format!(
                "unknown query parameter {:?}; this route takes none",
                clip(unknown, 64)
            ),
        )),
        Some(unknown) => Err(Problem::bad_request(
            "unknown_parameter",
            format!(
                "unknown query parameter {:?}; known: {}",
                clip(unknown, 64),
                known.join(", ")
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_parameters_are_checked() {
        assert_eq!(checked_id("room", "r-1").unwrap(), "r-1");
        assert_eq!(checked_id("room", "a:b").unwrap_err().code, "invalid_id");
        let mut p = std::collections::HashMap::new();
        p.insert("limit".to_string(), "1".to_string());
        assert!(refuse_unknown_params(&p, &["limit"]).is_ok());
        p.insert("page".to_string(), "1".to_string());
        let e = refuse_unknown_params(&p, &["limit"]).unwrap_err();
        assert_eq!(e.code, "unknown_parameter");
        assert!(refuse_unknown_params(&p, &[]).is_err());
    }

    #[test]
    fn clip_cuts_on_char_boundaries() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "ab…");
        assert_eq!(clip("ééééé", 3), "éé…");
        assert_eq!(clip("", 3), "");
    }

    #[test]
    fn large_values_are_not_echoed() {
        let huge = "x".repeat(100_000);
        let errors = (0..50)
            .map(|i| {
                FieldError::new(
                    format!("/{huge}/{i}"),
                    "type",
                    None,
                    format!("{huge:?} is not of type \"integer\""),
                )
            })
            .collect::<Vec<_>>();
        let mut p = Problem::validation(errors.clone());
        p.detail = huge.clone();
        let text = p.to_json().to_string();
        assert!(text.len() < 6 * 1024, "{} bytes", text.len());
        let items = (0..1000)
            .map(|index| ItemErrors {
                index,
                errors: errors.clone(),
            })
            .collect();
        let doc = Problem::invalid_items(items).to_json();
        let text = doc.to_string();
        assert!(text.len() < 6 * 1024, "{} bytes", text.len());
        assert_eq!(doc["invalidItems"].as_array().unwrap().len(), 4);
        assert!(
            doc["detail"]
                .as_str()
                .unwrap()
                .starts_with("1000 item(s) invalid")
        );
    }
}
