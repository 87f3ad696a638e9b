//! Push devices: registering a device token as an SNS platform endpoint and keeping it in
//! `inkwire:notify:devices:{userId}` (a HASH device id → [`Device`] JSON, shown with the
//! preferences), unregistering it, and forgetting a device whose endpoint SNS disabled.
//!
//! A token maps to one endpoint (SNS answers the same ARN for a known token), and an endpoint
//! belongs to one user at a time: `inkwire:notify:device-owner:{sha256(endpointArn)}` names
//! the current owner, so a phone that signs in as someone else stops receiving the previous
//! user's notifications at once.

use jiff::Timestamp;
use redis::aio::ConnectionManager;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::api::devices_key;
use crate::preferences::Device;

/// Most devices one user may register (push fans out to every one).
pub const MAX_DEVICES: usize = 20;
/// Longest device token accepted (FCM tokens are ~160 characters, APNs tokens 64).
pub const MAX_TOKEN_CHARS: usize = 4096;

/// Device platforms and the SNS platform (in the platform application's ARN) each needs.
pub const PLATFORMS: &[(&str, &str)] = &[
    ("gcm", "GCM"),
    ("fcm", "GCM"),
    ("apns", "APNS"),
    ("apns_sandbox", "APNS_SANDBOX"),
    ("adm", "ADM"),
    ("baidu", "BAIDU"),
    ("wns", "WNS"),
    ("mpns", "MPNS"),
];

/// The SNS platform of a platform application ARN (`…:app/GCM/name` → `GCM`).
pub fn application_platform(arn: &str) -> Option<&str> {
    let resource = arn.rsplit_once(':')?.1;
    resource.strip_prefix("app/")?.split('/').next()
}

/// Whether `platform` (as a client names it) can be registered with the application whose
/// SNS platform is `sns_platform`.
pub fn platform_matches(platform: &str, sns_platform: &str) -> bool {
    PLATFORMS
        .iter()
        .any(|(p, s)| *p == platform && s.eq_ignore_ascii_case(sns_platform))
}

/// A device token: 1-4096 visible ASCII characters.
pub fn is_valid_token(token: &str) -> bool {
    (1..=MAX_TOKEN_CHARS).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

/// The id of a device registered without one: derived from the platform and the token, so
/// the same registration names the same device.
pub fn derived_device_id(platform: &str, token: &str) -> String {
    let digest = Sha256::digest(format!("{platform}\n{token}").as_bytes());
    let hex: String = digest.iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("d-{hex}")
}

/// `inkwire:notify:device-owner:{sha256(endpointArn)}`: `{userId}\n{deviceId}`.
pub fn owner_key(endpoint_arn: &str) -> String {
    let digest = Sha256::digest(endpoint_arn.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("inkwire:notify:device-owner:{hex}")
}

/// Every device of `user`.
pub async fn list(redis: &mut ConnectionManager, user: &str) -> redis::RedisResult<Vec<Device>> {
    let all: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(devices_key(user))
        .query_async(redis)
        .await?;
    Ok(all
        .iter()
        .filter_map(|(_, json)| serde_json::from_str(json).ok())
        .collect())
}

/// One device of `user`.
pub async fn get(
    redis: &mut ConnectionManager,
    user: &str,
    id: &str,
) -> redis::RedisResult<Option<Device>> {
    let raw: Option<String> = redis::cmd("HGET")
        .arg(devices_key(user))
        .arg(id)
        .query_async(redis)
        .await?;
    Ok(raw.and_then(|json| serde_json::from_str(&json).ok()))
}

/// What [`store`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A new device.
    Created(Device),
    /// The same endpoint was registered already under this id: that device, unchanged.
    Existing(Device),
}

/// Stores `user`'s device for `endpoint_arn` (answering the existing one when the endpoint is
/// known under `id` or under another id of the same user), and takes the endpoint away from
/// any other user who had it.
pub async fn store(
    redis: &mut ConnectionManager,
    user: &str,
    id: &str,
    platform: &str,
    endpoint_arn: &str,
) -> redis::RedisResult<Stored> {
    let devices = list(redis, user).await?;
    if let Some(existing) = devices.iter().find(|d| d.endpoint_arn == endpoint_arn) {
        return Ok(Stored::Existing(existing.clone()));
    }
    let device = Device {
        id: id.to_string(),
        platform: platform.to_string(),
        endpoint_arn: endpoint_arn.to_string(),
        created_at: Timestamp::now(),
    };
    let owner_key = owner_key(endpoint_arn);
    let previous: Option<String> = redis::cmd("GET").arg(&owner_key).query_async(redis).await?;
    if let Some((prev_user, prev_id)) = previous.as_deref().and_then(|p| p.split_once('\n'))
        && prev_user != user
    {
        let _: () = redis::cmd("HDEL")
            .arg(devices_key(prev_user))
            .arg(prev_id)
            .query_async(redis)
            .await?;
    }
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(devices_key(user))
        .arg(id)
        .arg(serde_json::to_string(&device).expect("devices serialize"))
        .ignore()
        .cmd("SET")
        .arg(&owner_key)
        .arg(format!("{user}\n{id}"))
        .ignore()
        .query_async(redis)
        .await?;
    Ok(Stored::Created(device))
}

/// Removes `device` from `user`'s devices (and its owner record, if it is still theirs).
pub async fn forget(
    redis: &mut ConnectionManager,
    user: &str,
    device: &Device,
) -> redis::RedisResult<()> {
    let owner_key = owner_key(&device.endpoint_arn);
    let owner: Option<String> = redis::cmd("GET").arg(&owner_key).query_async(redis).await?;
    let mut pipe = redis::pipe();
    pipe.cmd("HDEL")
        .arg(devices_key(user))
        .arg(&device.id)
        .ignore();
    if owner.as_deref() == Some(&format!("{user}\n{}", device.id)) {
        pipe.cmd("DEL").arg(&owner_key).ignore();
    }
    pipe.query_async(redis).await
}

/// The device as the API shows it.
pub fn to_json(device: &Device) -> Value {
    serde_json::to_value(device).expect("devices serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_match_their_application() {
        let app = "arn:aws:sns:us-east-1:123456789012:app/GCM/inkwire";
        assert_eq!(application_platform(app), Some("GCM"));
        assert_eq!(
            application_platform("arn:aws:sns:us-east-1:123456789012:app/APNS_SANDBOX/x"),
            Some("APNS_SANDBOX")
        );
        assert!(platform_matches("gcm", "GCM"));
        assert!(platform_matches("fcm", "GCM"));
        assert!(platform_matches("apns_sandbox", "APNS_SANDBOX"));
        assert!(!platform_matches("apns", "GCM"));
        assert!(!platform_matches("apns", "APNS_SANDBOX"));
        assert!(
            !platform_matches("GCM", "GCM"),
            "platform names are lowercase"
        );
        assert!(!platform_matches("fax", "GCM"));
    }

    #[test]
    fn tokens_and_ids() {
        assert!(is_valid_token("fcm:APA91b-token_1"));
        for bad in ["", "a b", "tab\there", "é"] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
        assert!(!is_valid_token(&"x".repeat(MAX_TOKEN_CHARS + 1)));
        let a = derived_device_id("gcm", "tok");
        assert_eq!(a, derived_device_id("gcm", "tok"));
        assert_ne!(a, derived_device_id("apns", "tok"));
        assert!(inkwire_shared::membership::is_valid_id(&a), "{a}");
        assert_ne!(owner_key("arn:a"), owner_key("arn:b"));
    }
}
