//! JSON Schemas from `schemas/`, compiled once, and validation errors that name the failing
//! field (a JSON pointer), the rule that failed and the kind of the offending value.
//!
//! The schema files are embedded at compile time, so a binary never depends on the working
//! directory. Envelope validation is two-step: the envelope schema first, then the `data`
//! schema chosen by `category` and `type` (with pointers prefixed by `/data`). Keeping the
//! steps apart avoids `$ref` resolution between files and lets the error for "a type that
//! belongs to another category" be specific.
//!
//! The schemas and the consumers' types must agree: what validates here is applied by every
//! consumer. Two rules close the gaps JSON Schema leaves open. A `date-time` must also parse
//! with the parser the consumers use (the `time` crate's RFC 3339), which is stricter than
//! the format check in places (a leap second on a day that has none); and numbers are
//! canonicalized ([`canonicalize_numbers`]) before validation, because JSON Schema's
//! `integer` accepts `12.0` and `1.2e1` while a typed parse into `u32` does not.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::Serialize;
use serde_json::{Number, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::events::Category;

macro_rules! schema_files {
    ($($path:literal),* $(,)?) => {
        /// Every schema file: its path under `schemas/` and its text.
        pub const SCHEMA_FILES: &[(&str, &str)] = &[
            $(($path, include_str!(concat!("../../schemas/", $path))),)*
        ];
    };
}

schema_files!(
    "envelope.json",
    "api/batch-request.json",
    "api/member-request.json",
    "api/document-request.json",
    "api/broadcast-request.json",
    "api/send-to-user-request.json",
    "api/writing-start-request.json",
    "api/writing-keystroke-request.json",
    "api/writing-preferences-request.json",
    "api/notification-send-request.json",
    "api/notification-template.json",
    "api/notification-device-request.json",
    "api/collaboration-presence-request.json",
    "api/collaboration-cursor-request.json",
    "api/collaboration-edit-request.json",
    "api/chat-room-request.json",
    "api/chat-participant-request.json",
    "api/chat-message-request.json",
    "api/chat-edit-request.json",
    "api/chat-read-request.json",
    "api/client-session-request.json",
    "api/presence-status-request.json",
    "api/analytics-threshold-request.json",
    "relay/client-subscribe.json",
    "relay/client-unsubscribe.json",
    "relay/client-ping.json",
    "relay/server-welcome.json",
    "relay/server-subscribed.json",
    "relay/server-unsubscribed.json",
    "relay/server-message.json",
    "relay/server-error.json",
    "relay/server-pong.json",
    "events/writing/keystroke.json",
    "events/writing/word_added.json",
    "events/writing/paragraph_completed.json",
    "events/writing/session_started.json",
    "events/writing/session_ended.json",
    "events/writing/flow_state_entered.json",
    "events/writing/flow_state_exited.json",
    "events/writing/session_state_changed.json",
    "events/collaboration/user_joined.json",
    "events/collaboration/user_left.json",
    "events/collaboration/cursor_moved.json",
    "events/collaboration/edit_applied.json",
    "events/collaboration/comment_added.json",
    "events/collaboration/conflict_detected.json",
    "events/publishing/status_changed.json",
    "events/publishing/upload_started.json",
    "events/publishing/review_completed.json",
    "events/publishing/book_published.json",
    "events/publishing/sales_updated.json",
    "events/analytics/metric_updated.json",
    "events/analytics/threshold_crossed.json",
    "events/analytics/threshold_resolved.json",
    "events/analytics/anomaly_detected.json",
    "events/automation/workflow_started.json",
    "events/automation/action_executed.json",
    "events/automation/workflow_completed.json",
    "events/automation/workflow_failed.json",
    "events/system/service_started.json",
    "events/system/service_stopped.json",
    "events/notification/notification_created.json",
    "events/notification/notification_delivered.json",
    "events/notification/notification_failed.json",
);

/// One reason an input was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// JSON pointer (RFC 6901) to the failing field; for a missing field, where it should be.
    pub pointer: String,
    /// The schema keyword (or inkwire rule) that failed: `type`, `required`, `format`, ...
    pub rule: String,
    /// The JSON kind of the offending value (`string`, `number`, ...), or `missing`.
    pub kind: String,
    /// A human-readable explanation.
    pub message: String,
}

impl FieldError {
    pub fn new(
        pointer: impl Into<String>,
        rule: &str,
        value: Option<&Value>,
        message: impl Into<String>,
    ) -> Self {
        FieldError {
            pointer: pointer.into(),
            rule: rule.to_string(),
            kind: value.map_or("missing", kind_of).to_string(),
            message: message.into(),
        }
    }

    /// The same error, seen from a containing document (`/events/3` + `/data/words`).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.pointer = format!("{prefix}{}", self.pointer);
        self
    }
}

/// The JSON kind of a value as a schema author would name it.
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// All compiled schemas, keyed by path under `schemas/` (`events/writing/keystroke.json`).
pub struct Schemas {
    validators: HashMap<&'static str, jsonschema::Validator>,
    /// Per schema, JSON pointers of its `date-time` fields (checked with the consumers'
    /// parser after the schema passes).
    date_times: HashMap<&'static str, Vec<String>>,
}

/// The schemas, compiled on first use and shared by the whole process.
pub fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| Schemas::compile().expect("embedded schemas compile"))
}

impl Schemas {
    /// Compiles every embedded schema; fails on the first file that is not a valid schema or
    /// whose `examples` do not validate against it.
    pub fn compile() -> Result<Schemas, String> {
        let mut validators = HashMap::new();
        let mut date_times = HashMap::new();
        for (path, text) in SCHEMA_FILES {
            let schema: Value =
                serde_json::from_str(text).map_err(|e| format!("{path}: not JSON: {e}"))?;
            let validator = jsonschema::draft202012::options()
                .should_validate_formats(true)
                .build(&schema)
                .map_err(|e| format!("{path}: not a valid schema: {e}"))?;
            let examples = schema
                .get("examples")
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("{path}: has no examples"))?;
            for (i, example) in examples.iter().enumerate() {
                if let Err(e) = validator.validate(example) {
                    return Err(format!("{path}: example {i} is invalid: {e}"));
                }
            }
            let mut fields = Vec::new();
            date_time_fields(&schema, String::new(), &mut fields);
            date_times.insert(*path, fields);
            validators.insert(*path, validator);
        }
        Ok(Schemas {
            validators,
            date_times,
        })
    }

    /// Validates `instance` against the schema at `path`.
    pub fn validate(&self, path: &str, instance: &Value) -> Result<(), Vec<FieldError>> {
        let validator = self
            .validators
            .get(path)
            .unwrap_or_else(|| panic!("schema {path} is not embedded"));
        // The boolean check short-circuits and allocates nothing: most input is valid, and
        // collecting every error is only worth its cost when there are errors to report.
        if validator.is_valid(instance) {
            return self.check_date_times(path, instance);
        }
        let errors: Vec<FieldError> = validator
            .iter_errors(instance)
            .map(to_field_error)
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Checks that every `date-time` field of a schema-valid `instance` also parses with the
    /// consumers' parser.
    fn check_date_times(&self, path: &str, instance: &Value) -> Result<(), Vec<FieldError>> {
        let errors: Vec<FieldError> = self
            .date_times
            .get(path)
            .into_iter()
            .flatten()
            .filter_map(|pointer| {
                let value = instance.pointer(pointer)?;
                let text = value.as_str()?;
                parse_date_time(text).err().map(|e| {
                    FieldError::new(
                        pointer.clone(),
                        "format",
                        Some(value),
                        format!(
                            "{text:?} is not a date-time inkwire can read ({e}); use RFC 3339, \
                             e.g. 2026-11-21T10:00:00Z"
                        ),
                    )
                })
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Validates an event envelope and its `data`.
    pub fn validate_event(&self, event: &Value) -> Result<(), Vec<FieldError>> {
        self.validate("envelope.json", event)?;
        // The envelope schema guarantees both are strings of the right shape.
        let category: Category = event["category"]
            .as_str()
            .and_then(|c| c.parse().ok())
            .expect("envelope schema checked category");
        let event_type = event["type"]
            .as_str()
            .expect("envelope schema checked type");
        if !category.has_type(event_type) {
            let message = match Category::of_type(event_type) {
                Some(other) => format!(
                    "event type {event_type:?} belongs to category {:?}, not {:?}",
                    other.as_str(),
                    category.as_str()
                ),
                None => format!(
                    "unknown event type {event_type:?} for category {:?}; known: {}",
                    category.as_str(),
                    category.event_types().join(", ")
                ),
            };
            return Err(vec![FieldError::new(
                "/type",
                "eventType",
                Some(&event["type"]),
                message,
            )]);
        }
        let path = format!("events/{}/{event_type}.json", category.as_str());
        self.validate(&path, &event["data"])
            .map_err(|errs| errs.into_iter().map(|e| e.prefixed("/data")).collect())
    }
}

fn to_field_error(e: jsonschema::ValidationError<'_>) -> FieldError {
    use jsonschema::error::ValidationErrorKind as K;
    let at = e.instance_path().as_str().to_string();
    let message = e.to_string();
    let rule = e.kind().keyword().to_string();
    match e.kind() {
        K::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            FieldError::new(
                format!("{at}/{}", escape_pointer(name)),
                &rule,
                None,
                message,
            )
        }
        K::AdditionalProperties { unexpected } => {
            let name = unexpected.first().cloned().unwrap_or_default();
            let value = e.instance().get(&name).cloned();
            FieldError::new(
                format!("{at}/{}", escape_pointer(&name)),
                &rule,
                value.as_ref(),
                format!("unexpected property {name:?}"),
            )
        }
        _ => FieldError::new(at, &rule, Some(e.instance()), message),
    }
}

fn escape_pointer(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Parses an RFC 3339 date-time exactly as the consumers do (`time::serde::rfc3339`).
pub fn parse_date_time(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(text, &Rfc3339)
}

/// Collects the pointers of the `date-time` fields of `schema` (through nested objects).
fn date_time_fields(schema: &Value, at: String, out: &mut Vec<String>) {
    if schema.get("format").and_then(Value::as_str) == Some("date-time") {
        out.push(at.clone());
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            date_time_fields(sub, format!("{at}/{}", escape_pointer(name)), out);
        }
    }
}

/// Rewrites every integral number written as a float (`12.0`, `1.2e1`, `-0`) as an integer.
///
/// JSON does not distinguish `12` from `12.0`, and JSON Schema's `integer` accepts both, but
/// a typed consumer (`u32`) refuses a float. Doing this at the edge, before validation, means
/// the stored event always spells integers as integers. Values beyond the 64-bit range stay
/// floats (the schemas' `maximum`s refuse them where an integer is expected).
pub fn canonicalize_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(int) = n.as_f64().and_then(integral) {
                *n = int;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(canonicalize_numbers),
        Value::Object(map) => map.values_mut().for_each(canonicalize_numbers),
        _ => {}
    }
}

/// The integer an integral float stands for, if it fits 64 bits.
fn integral(f: f64) -> Option<Number> {
    // 2^63 and 2^64 are exact in f64; the comparisons are exact too.
    const I64_MIN: f64 = -9_223_372_036_854_775_808.0;
    const U64_END: f64 = 18_446_744_073_709_551_616.0;
    if !f.is_finite() || f.fract() != 0.0 || !(I64_MIN..U64_END).contains(&f) {
        return None;
    }
    if f < 0.0 {
        Some(Number::from(f as i64))
    } else {
        Some(Number::from(f as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_schema_compiles_and_its_examples_validate() {
        let s = Schemas::compile().unwrap();
        assert_eq!(s.validators.len(), SCHEMA_FILES.len());
    }

    #[test]
    fn every_event_type_has_a_schema() {
        for c in Category::ALL {
            for t in c.event_types() {
                let path = format!("events/{}/{t}.json", c.as_str());
                assert!(
                    SCHEMA_FILES.iter().any(|(p, _)| *p == path),
                    "{path} missing"
                );
            }
        }
    }

    fn event(data: Value) -> Value {
        json!({"category": "writing", "type": "word_added", "userId": "u-1", "data": data})
    }

    #[test]
    fn wrong_type_names_pointer_rule_and_kind() {
        let errs = schemas()
            .validate_event(&event(json!({"sessionId": "s", "words": "three"})))
            .unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].pointer, "/data/words");
        assert_eq!(errs[0].rule, "type");
        assert_eq!(errs[0].kind, "string");
    }

    #[test]
    fn missing_field_points_at_where_it_belongs() {
        let errs = schemas()
            .validate_event(&event(json!({"words": 3})))
            .unwrap_err();
        assert_eq!(errs[0].pointer, "/data/sessionId");
        assert_eq!(errs[0].rule, "required");
        assert_eq!(errs[0].kind, "missing");
    }

    #[test]
    fn type_of_another_category_is_named() {
        let mut e = event(json!({}));
        e["type"] = json!("cursor_moved");
        let errs = schemas().validate_event(&e).unwrap_err();
        assert_eq!(errs[0].pointer, "/type");
        assert_eq!(errs[0].rule, "eventType");
        assert!(errs[0].message.contains("collaboration"));
    }

    #[test]
    fn bad_timestamp_is_a_format_error() {
        let mut e = event(json!({"sessionId": "s", "words": 1}));
        e["timestamp"] = json!("yesterday at noon");
        let errs = schemas().validate_event(&e).unwrap_err();
        assert_eq!(errs[0].pointer, "/timestamp");
        assert_eq!(errs[0].rule, "format");
    }

    #[test]
    fn unexpected_property_is_reported() {
        let mut e = event(json!({"sessionId": "s", "words": 1}));
        e["colour"] = json!(3);
        let errs = schemas().validate_event(&e).unwrap_err();
        assert_eq!(errs[0].pointer, "/colour");
        assert_eq!(errs[0].rule, "additionalProperties");
        assert_eq!(errs[0].kind, "integer");
    }

    #[test]
    fn integral_floats_become_integers() {
        let mut v: Value =
            serde_json::from_str(r#"{"a": 12.0, "b": [1.2e1, -0, -3.0, 0.5], "c": 1e300, "d": 7}"#)
                .unwrap();
        canonicalize_numbers(&mut v);
        assert_eq!(
            v.to_string(),
            r#"{"a":12,"b":[12,0,-3,0.5],"c":1e+300,"d":7}"#
        );
        let k = json!({"sessionId": "s", "keys": 12, "charsAdded": 1, "charsDeleted": 0});
        assert!(
            schemas()
                .validate("events/writing/keystroke.json", &k)
                .is_ok()
        );
    }

    #[test]
    fn a_date_time_the_consumers_cannot_read_is_refused() {
        let mut e = event(json!({"sessionId": "s", "words": 1}));
        // The format check accepts a leap second on any day; `time` only on the last of a
        // month (when one can happen).
        e["timestamp"] = json!("2026-11-21T23:59:60Z");
        let errs = schemas().validate_event(&e).unwrap_err();
        assert_eq!(errs[0].pointer, "/timestamp");
        assert_eq!(errs[0].rule, "format");
        e["timestamp"] = json!("2026-11-21t10:00:00.5z");
        assert!(schemas().validate_event(&e).is_ok());
        let k = json!({"sessionId": "s", "keys": 1, "charsAdded": 1, "charsDeleted": 0,
            "clientTimestamp": "2026-11-21T23:59:60+00:00"});
        let errs = schemas()
            .validate("events/writing/keystroke.json", &k)
            .unwrap_err();
        assert_eq!(errs[0].pointer, "/clientTimestamp");
    }

    /// Every integer a client sends is bounded, so that it fits what the consumers store
    /// (the tracker's `u32` counters, JavaScript's exact integers).
    #[test]
    fn every_integer_field_has_a_maximum() {
        fn walk(path: &str, at: &str, schema: &Value) {
            if schema.get("type").and_then(Value::as_str) == Some("integer") {
                let max = schema.get("maximum").and_then(Value::as_u64);
                assert!(
                    max.is_some_and(|m| m < (1 << 53)),
                    "{path}{at}: integer without a maximum"
                );
            }
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    walk(path, &format!("{at}/{name}"), sub);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(path, &format!("{at}/*"), items);
            }
        }
        for (path, text) in SCHEMA_FILES {
            if path.starts_with("events/") || path.starts_with("api/") || *path == "envelope.json" {
                walk(path, "", &serde_json::from_str(text).unwrap());
            }
        }
    }
}
