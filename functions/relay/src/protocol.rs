//! The relay's JSON protocol: frames a client sends, frames the server sends, error codes and
//! close codes. Each frame is described by a schema in `schemas/relay/`; the README has the
//! reference a client author can implement from.
//!
//! Every frame is a JSON object whose `op` names it. Client frames may carry a `ref`
//! (string or number, at most 64 characters) that the answer echoes.

use serde::Serialize;
use serde_json::Value;

/// A frame from a client, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Subscribe {
        channel: String,
        since: Option<u64>,
        reference: Option<Value>,
    },
    Unsubscribe {
        channel: String,
        reference: Option<Value>,
    },
    Ping {
        reference: Option<Value>,
    },
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub message: String,
    /// The `ref` of the frame, if it could be read.
    pub reference: Option<Value>,
}

fn bad(message: impl Into<String>, reference: Option<Value>) -> FrameError {
    FrameError {
        message: message.into(),
        reference,
    }
}

const CLIENT_OPS: &str = "subscribe, unsubscribe, ping";

/// Parses and validates one text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| bad(format!("frame is not valid JSON: {e}"), None))?;
    let Value::Object(mut obj) = value else {
        return Err(bad("frame must be a JSON object", None));
    };
    let reference = match obj.remove("ref") {
        None => None,
        Some(r @ Value::Number(_)) => Some(r),
        Some(Value::String(s)) if s.len() <= 64 => Some(Value::String(s)),
        Some(_) => {
            return Err(bad(
                "ref must be a number or a string of at most 64 characters",
                None,
            ));
        }
    };
    let op = match obj.remove("op") {
        Some(Value::String(op)) => op,
        Some(_) => return Err(bad("op must be a string", reference)),
        None => return Err(bad(format!("missing op (one of {CLIENT_OPS})"), reference)),
    };
    let take_channel = |obj: &mut serde_json::Map<String, Value>| match obj.remove("channel") {
        Some(Value::String(c)) if c.len() <= 200 => Ok(c),
        Some(Value::String(_)) => Err(bad("channel is too long", reference.clone())),
        Some(_) => Err(bad("channel must be a string", reference.clone())),
        None => Err(bad(format!("{op} needs a channel"), reference.clone())),
    };
    let frame = match op.as_str() {
        "subscribe" => {
            let channel = take_channel(&mut obj)?;
            let since = match obj.remove("since") {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(s) => Some(s),
                    None => {
                        return Err(bad(
                            "since must be a non-negative integer position",
                            reference,
                        ));
                    }
                },
                Some(_) => {
                    return Err(bad(
                        "since must be a non-negative integer position",
                        reference,
                    ));
                }
            };
            ClientFrame::Subscribe {
                channel,
                since,
                reference: reference.clone(),
            }
        }
        "unsubscribe" => ClientFrame::Unsubscribe {
            channel: take_channel(&mut obj)?,
            reference: reference.clone(),
        },
        "ping" => ClientFrame::Ping {
            reference: reference.clone(),
        },
        other => {
            return Err(bad(
                format!("unknown op {other:?} (one of {CLIENT_OPS})"),
                reference,
            ));
        }
    };
    if let Some(extra) = obj.keys().next() {
        return Err(bad(format!("unexpected field {extra:?}"), reference));
    }
    Ok(frame)
}

/// Stable error codes of `error` frames.
pub mod codes {
    pub const BAD_FRAME: &str = "bad_frame";
    pub const UNKNOWN_CHANNEL: &str = "unknown_channel";
    pub const FORBIDDEN: &str = "forbidden";
    pub const CHANNEL_NOT_ALLOWED_ON_PATH: &str = "channel_not_allowed_on_path";
    pub const ALREADY_SUBSCRIBED: &str = "already_subscribed";
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const UNAVAILABLE: &str = "unavailable";
}

/// WebSocket close codes the relay uses.
pub mod close {
    /// The server is shutting down: reconnect (to another instance) with `since`.
    pub const GOING_AWAY: u16 = 1001;
    /// Repeated malformed frames.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame larger than the maximum frame size.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Two heartbeats were not answered.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// The token expired: get a new one and reconnect.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The client did not read fast enough and its send queue filled up.
    pub const TOO_SLOW: u16 = 4008;
    /// The client kept sending after being rate limited.
    pub const RATE_LIMIT_ABUSE: u16 = 4029;
}

/// Why a subscription ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnsubscribeReason {
    /// The client sent `unsubscribe`.
    Requested,
    /// The subscriber lost the right to read the channel (removed from the project, the
    /// document removed, no longer a room participant).
    Revoked,
}

/// Frames the server sends (except `message`, which is assembled without re-serializing).
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        #[serde(rename = "connectionId")]
        connection_id: &'a str,
        #[serde(rename = "userId")]
        user_id: &'a str,
        #[serde(rename = "heartbeatMs")]
        heartbeat_ms: u64,
    },
    Subscribed {
        channel: &'a str,
        position: u64,
        recovered: bool,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    Unsubscribed {
        channel: &'a str,
        reason: UnsubscribeReason,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    Error {
        code: &'a str,
        message: &'a str,
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
}

impl ServerFrame<'_> {
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("server frames serialize")
    }
}

/// Builds a `message` frame from a stored channel payload (`{"type","data","ts"}`) without
/// re-serializing it: `{"op":"message","channel":…,"seq":…,` + the payload's members.
/// Returns `None` when the payload is not a JSON object with the expected members.
pub fn message_frame(channel: &str, seq: u64, payload: &[u8]) -> Option<String> {
    // Validate: NATS input is outside input too.
    serde_json::from_slice::<StoredMessage>(payload).ok()?;
    let text = std::str::from_utf8(payload).ok()?.trim_start();
    let members = text.strip_prefix('{')?;
    let channel = serde_json::to_string(channel).ok()?;
    let mut out = String::with_capacity(members.len() + channel.len() + 48);
    out.push_str("{\"op\":\"message\",\"channel\":");
    out.push_str(&channel);
    out.push_str(",\"seq\":");
    out.push_str(&seq.to_string());
    out.push(',');
    out.push_str(members);
    Some(out)
}

/// What a stored channel message must contain.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredMessage {
    #[serde(rename = "type")]
    _message_type: inkwire_shared::channels::MessageType,
    #[serde(rename = "data")]
    _data: serde::de::IgnoredAny,
    #[serde(rename = "ts")]
    _ts: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_client_frames() {
        assert_eq!(
            parse_client_frame(r#"{"op":"subscribe","channel":"project:p1","since":7,"ref":"a"}"#)
                .unwrap(),
            ClientFrame::Subscribe {
                channel: "project:p1".into(),
                since: Some(7),
                reference: Some(json!("a"))
            }
        );
        assert_eq!(
            parse_client_frame(r#"{"op":"ping","ref":3}"#).unwrap(),
            ClientFrame::Ping {
                reference: Some(json!(3))
            }
        );
        for bad in [
            "not json",
            "[]",
            r#"{"channel":"x"}"#,
            r#"{"op":"dance"}"#,
            r#"{"op":"subscribe"}"#,
            r#"{"op":"subscribe","channel":5}"#,
            r#"{"op":"subscribe","channel":"project:p","since":-1}"#,
            r#"{"op":"subscribe","channel":"project:p","since":"7"}"#,
            r#"{"op":"ping","extra":1}"#,
            r#"{"op":"ping","ref":{"a":1}}"#,
        ] {
            assert!(parse_client_frame(bad).is_err(), "{bad}");
        }
        let e = parse_client_frame(r#"{"op":"dance","ref":"r1"}"#).unwrap_err();
        assert_eq!(e.reference, Some(json!("r1")));
    }

    #[test]
    fn message_frames_splice_the_payload() {
        let payload = br#"{"type":"document_update","data":{"a":1},"ts":"2026-11-21T10:00:00Z"}"#;
        let frame = message_frame("project:p1", 42, payload).unwrap();
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(
            v,
            json!({"op":"message","channel":"project:p1","seq":42,"type":"document_update","data":{"a":1},"ts":"2026-11-21T10:00:00Z"})
        );
        assert!(message_frame("c", 1, b"[1]").is_none());
        assert!(message_frame("c", 1, br#"{"type":"nope","data":1,"ts":"x"}"#).is_none());
        assert!(
            message_frame("c", 1, br#"{"type":"system","data":1,"ts":"x","evil":2}"#).is_none()
        );
    }
}
