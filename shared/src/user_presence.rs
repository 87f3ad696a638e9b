//! The contract between the relay and the presence function (issue 12, user presence): the
//! report a relay instance publishes on `presence.report.{instanceId}` (see
//! `subjects::presence_report_subject`) and the device a client reports when it connects.
//!
//! It lives here, not in either crate, because both sides must agree on it and domain crates
//! talk through subjects rather than to each other. A report is a batch: the relay collects
//! what happened to its connections during one report interval and publishes it at once, so
//! the per-frame cost on the relay is one atomic load (see the relay's `presence` module).
//! Every report is also the instance's heartbeat; an instance with nothing to say still sends
//! an empty one every heartbeat interval.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Longest device name a client may report, in characters.
pub const MAX_DEVICE_NAME: usize = 64;

/// The kind of device a client says it runs on. Reported by the client, never guessed from
/// headers on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Web,
    Desktop,
    Mobile,
    Tablet,
    Other,
}

impl DeviceType {
    pub const NAMES: &'static str = "web, desktop, mobile, tablet, other";

    pub fn parse(s: &str) -> Option<DeviceType> {
        Some(match s {
            "web" => DeviceType::Web,
            "desktop" => DeviceType::Desktop,
            "mobile" => DeviceType::Mobile,
            "tablet" => DeviceType::Tablet,
            "other" => DeviceType::Other,
            _ => return None,
        })
    }
}

/// A client's device, from the `deviceType` and `deviceName` query parameters of the
/// WebSocket upgrade. Both are optional; absent means "not said".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<DeviceType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Device {
    /// Reads and validates the device parameters of an upgrade's query string; the error is
    /// a sentence for a `400`.
    pub fn from_query(query: &HashMap<String, String>) -> Result<Device, String> {
        let kind = match query.get("deviceType") {
            None => None,
            Some(t) => Some(DeviceType::parse(t).ok_or_else(|| {
                format!(
                    "deviceType {:?} is not one of {}",
                    crate::problem::clip(t, 32),
                    DeviceType::NAMES
                )
            })?),
        };
        let name = match query.get("deviceName") {
            None => None,
            Some(n) => Some(valid_name(n)?.to_string()),
        };
        Ok(Device { kind, name })
    }

    /// Whether a device read from a report is one a relay could have accepted.
    pub fn is_valid(&self) -> bool {
        self.name.as_deref().is_none_or(|n| valid_name(n).is_ok())
    }
}

fn valid_name(name: &str) -> Result<&str, String> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_DEVICE_NAME {
        return Err(format!(
            "deviceName must be 1-{MAX_DEVICE_NAME} characters (got {chars})"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("deviceName must not contain control characters".into());
    }
    Ok(name)
}

/// A connection that opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Opened {
    /// `{instanceId}-{n}`, the id the `welcome` frame gives the client.
    pub connection: String,
    pub user: String,
    #[serde(default)]
    pub device: Device,
    /// When it opened (relay clock, ms since the epoch).
    pub at_ms: u64,
}

/// A connection on which the client sent frames during the report interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Active {
    pub connection: String,
    pub user: String,
}

/// A connection that closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Closed {
    pub connection: String,
    pub user: String,
    pub at_ms: u64,
}

/// One report of one relay instance: apply `opened`, then `active`, then `closed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub instance: String,
    /// Numbers this instance's reports (the message id is derived from it).
    pub seq: u64,
    /// When the report was made (relay clock, ms): activity in it happened by then.
    pub at_ms: u64,
    #[serde(default)]
    pub opened: Vec<Opened>,
    #[serde(default)]
    pub active: Vec<Active>,
    #[serde(default)]
    pub closed: Vec<Closed>,
    /// `opened` lists every live connection of the instance (the answer to a resync request).
    #[serde(default)]
    pub resync: bool,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.opened.is_empty() && self.active.is_empty() && self.closed.is_empty() && !self.resync
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn devices_are_validated() {
        assert_eq!(Device::from_query(&q(&[])).unwrap(), Device::default());
        let d = Device::from_query(&q(&[
            ("deviceType", "mobile"),
            ("deviceName", "Ana's phone"),
        ]))
        .unwrap();
        assert_eq!(d.kind, Some(DeviceType::Mobile));
        assert_eq!(d.name.as_deref(), Some("Ana's phone"));
        assert!(Device::from_query(&q(&[("deviceType", "toaster")])).is_err());
        assert!(Device::from_query(&q(&[("deviceName", "")])).is_err());
        assert!(Device::from_query(&q(&[("deviceName", &"é".repeat(65))])).is_err());
        assert!(Device::from_query(&q(&[("deviceName", &"é".repeat(64))])).is_ok());
        assert!(Device::from_query(&q(&[("deviceName", "a\nb")])).is_err());
    }

    #[test]
    fn reports_round_trip() {
        let r = Report {
            instance: "i1".into(),
            seq: 3,
            at_ms: 10,
            opened: vec![Opened {
                connection: "i1-1".into(),
                user: "u".into(),
                device: Device {
                    kind: Some(DeviceType::Web),
                    name: None,
                },
                at_ms: 9,
            }],
            ..Default::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains(r#""device":{"type":"web"}"#), "{text}");
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), r);
    }
}
