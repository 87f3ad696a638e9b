//! SMS and mobile push through AWS SNS (aws-sdk-sns): `Publish` with `PhoneNumber` for SMS,
//! `Publish` with `TargetArn` and a per-platform JSON message for push, and the platform
//! endpoints push devices are registered as. One client, built once, with the SDK's own
//! retries off: the delivery consumer retries with backoff and counts every attempt, so a
//! call here is exactly one attempt, classified transient or permanent.
//!
//! TLS for real AWS is rustls with ring (already in the build through async-nats), not the
//! SDK's default aws-lc, which would compile a second crypto library.

use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::ProfileFileRegionProvider;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sns::config::Credentials;
use aws_sdk_sns::config::http::HttpResponse;
use aws_sdk_sns::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sns::types::MessageAttributeValue;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use serde_json::{Map, Value, json};

use super::{DEFAULT_AWS_REGION, ProviderConfig, SendError, Sent, error_chain};

/// Sends SMS and push notifications, and manages push devices' platform endpoints.
#[derive(Debug)]
pub struct SnsProvider {
    client: aws_sdk_sns::Client,
    platform_application_arn: Option<String>,
}

/// A push notification as notifications carry it (`{"title", "body", "data"}`).
#[derive(Debug, Clone, PartialEq)]
pub struct PushPayload {
    pub title: Option<String>,
    pub body: Option<String>,
    /// Extra key/values for the app (a deep link, the notification id).
    pub data: Map<String, Value>,
}

impl PushPayload {
    /// Reads `{"title"?, "body"?, "data"?}`; at least one of title and body must be a
    /// non-empty string, `data` an object. Anything else is permanent: retrying the same
    /// payload cannot help.
    pub fn from_value(value: &Value) -> Result<PushPayload, SendError> {
        let bad = |why: &str| SendError::Permanent(format!("push payload: {why}"));
        let object = value.as_object().ok_or_else(|| bad("not a JSON object"))?;
        let text = |key: &str| -> Result<Option<String>, SendError> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(&format!("{key} is not a string"))),
            }
        };
        let title = text("title")?;
        let body = text("body")?;
        if title.is_none() && body.is_none() {
            return Err(bad("neither title nor body"));
        }
        let data = match object.get("data") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(data)) => data.clone(),
            Some(_) => return Err(bad("data is not an object")),
        };
        Ok(PushPayload { title, body, data })
    }

    /// The `Publish` message for `MessageStructure=json`: a `default` text for platforms
    /// without their own key, and the FCM (`GCM`) and APNs payloads, each a JSON string as
    /// SNS requires.
    pub fn sns_message(&self) -> String {
        let default = self
            .body
            .clone()
            .or_else(|| self.title.clone())
            .unwrap_or_default();
        let mut notification = Map::new();
        if let Some(title) = &self.title {
            notification.insert("title".into(), json!(title));
        }
        if let Some(body) = &self.body {
            notification.insert("body".into(), json!(body));
        }
        // FCM data values must be strings: others travel as their JSON text.
        let fcm_data: Map<String, Value> = self
            .data
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), Value::String(s))
            })
            .collect();
        let gcm = json!({"notification": notification, "data": fcm_data});
        // APNs: the alert inside `aps`, the app's data beside it under its own key so that
        // it can never collide with `aps`.
        let apns = json!({
            "aps": {"alert": notification, "sound": "default"},
            "data": self.data,
        });
        json!({
            "default": default,
            "GCM": gcm.to_string(),
            "APNS": apns.to_string(),
            "APNS_SANDBOX": apns.to_string(),
        })
        .to_string()
    }
}

/// `arn:PARTITION:sns:REGION:ACCOUNT:app/PLATFORM/NAME`
pub fn is_platform_application_arn(arn: &str) -> bool {
    sns_resource(arn).is_some_and(|r| {
        r.strip_prefix("app/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(platform, name)| {
                !platform.is_empty() && !name.is_empty() && !name.contains('/')
            })
    })
}

/// `arn:PARTITION:sns:REGION:ACCOUNT:endpoint/PLATFORM/APP/ID`
pub fn is_endpoint_arn(arn: &str) -> bool {
    sns_resource(arn).is_some_and(|r| {
        r.strip_prefix("endpoint/").is_some_and(|rest| {
            rest.split('/').count() == 3 && rest.split('/').all(|p| !p.is_empty())
        })
    })
}

/// The resource part of an SNS ARN whose other parts are well formed.
fn sns_resource(arn: &str) -> Option<&str> {
    if arn.len() > 1024 || arn.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    let mut parts = arn.splitn(6, ':');
    let (arn_word, partition, service, region, account, resource) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    let ok = arn_word == "arn"
        && partition.starts_with("aws")
        && service == "sns"
        && !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        && account.len() == 12
        && account.chars().all(|c| c.is_ascii_digit());
    ok.then_some(resource)
}

/// Whether an SNS error code (or, for codes not listed, the HTTP status) is worth a retry.
/// Listed permanent codes are the client faults `Publish` and the endpoint calls document:
/// retrying the same request would be refused the same way.
pub(crate) fn is_transient(code: &str, status: u16) -> bool {
    match code {
        "Throttled"
        | "Throttling"
        | "ThrottlingException"
        | "KMSThrottling"
        | "TooManyRequestsException"
        | "RequestLimitExceeded"
        | "InternalError"
        | "InternalFailure"
        | "ServiceUnavailable"
        | "RequestTimeout"
        | "RequestTimeoutException"
        | "ExpiredToken"
        | "RequestExpired" => true,
        "InvalidParameter"
        | "ParameterValueInvalid"
        | "EndpointDisabled"
        | "NotFound"
        | "AuthorizationError"
        | "InvalidSecurity"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "AccessDenied"
        | "OptInRequired"
        | "KMSAccessDenied"
        | "KMSDisabled"
        | "KMSInvalidState"
        | "KMSNotFound"
        | "KMSOptInRequired"
        | "PlatformApplicationDisabled"
        | "ValidationException"
        | "OptedOut" => false,
        _ => status == 429 || status >= 500,
    }
}

fn classify<E>(operation: &str, err: SdkError<E, HttpResponse>) -> SendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("");
            let message = ctx.err().message().unwrap_or("");
            let text = format!("SNS {operation}: {code} (HTTP {status}): {message}");
            if is_transient(code, status) {
                SendError::Transient(text)
            } else {
                SendError::Permanent(text)
            }
        }
        SdkError::ConstructionFailure(_) => SendError::Permanent(format!(
            "SNS {operation}: the request could not be built: {}",
            error_chain(&err)
        )),
        // A misconfigured client (e.g. no credentials anywhere) fails the same way every
        // time; an I/O failure or a timeout may not.
        SdkError::DispatchFailure(failure) if failure.is_user() => {
            SendError::Permanent(format!("SNS {operation}: {}", error_chain(&err)))
        }
        _ => SendError::Transient(format!("SNS {operation}: {}", error_chain(&err))),
    }
}

impl SnsProvider {
    /// Builds the one client: region from the configuration, else the AWS profile, else
    /// us-east-1 (the instance metadata service is not asked); static keys when configured,
    /// else the SDK's default credential chain; the optional endpoint URL for SNS only.
    pub async fn new(config: &ProviderConfig) -> SnsProvider {
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let region = match &config.aws_region {
            Some(region) => RegionProviderChain::first_try(Region::new(region.clone())),
            None => RegionProviderChain::first_try(ProfileFileRegionProvider::new())
                .or_else(Region::new(DEFAULT_AWS_REGION)),
        };
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http_client)
            .region(region)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(config.sns_timeout)
                    .operation_timeout(config.sns_timeout)
                    .build(),
            );
        if let Some(keys) = &config.aws_keys {
            loader = loader.credentials_provider(Credentials::new(
                keys.access_key_id.clone(),
                keys.secret_access_key.clone(),
                keys.session_token.clone(),
                None,
                "inkwire-environment",
            ));
        }
        let shared = loader.load().await;
        let mut sns = aws_sdk_sns::config::Builder::from(&shared);
        if let Some(endpoint) = &config.sns_endpoint {
            sns = sns.endpoint_url(endpoint.clone());
        }
        SnsProvider {
            client: aws_sdk_sns::Client::from_conf(sns.build()),
            platform_application_arn: config.sns_platform_application_arn.clone(),
        }
    }

    /// The SDK client, for operator tools and tests (creating a platform application).
    pub fn client(&self) -> &aws_sdk_sns::Client {
        &self.client
    }

    pub fn platform_application_arn(&self) -> Option<&str> {
        self.platform_application_arn.as_deref()
    }

    /// Sends `text` as a transactional SMS to `phone` (E.164). SNS validates the number: an
    /// invalid one is refused with `InvalidParameter`, which is permanent.
    pub async fn send_sms(&self, phone: &str, text: &str) -> Result<Sent, SendError> {
        if text.trim().is_empty() {
            return Err(SendError::Permanent("SMS text is empty".into()));
        }
        let sms_type = MessageAttributeValue::builder()
            .data_type("String")
            .string_value("Transactional")
            .build()
            .map_err(|e| SendError::Permanent(format!("SNS Publish: {e}")))?;
        let out = self
            .client
            .publish()
            .phone_number(phone)
            .message(text)
            // Transactional: delivered with priority, not subject to marketing opt-outs.
            .message_attributes("AWS.SNS.SMS.SMSType", sms_type)
            .send()
            .await
            .map_err(|e| classify("Publish", e))?;
        Ok(Sent {
            provider_message_id: out.message_id,
        })
    }

    /// Publishes a push notification to a device's platform endpoint, with a payload for
    /// each platform built from `{"title", "body", "data"}` (see [`PushPayload`]).
    pub async fn send_push(&self, endpoint_arn: &str, payload: &Value) -> Result<Sent, SendError> {
        if !is_endpoint_arn(endpoint_arn) {
            return Err(SendError::Permanent(format!(
                "{endpoint_arn:?} is not an SNS platform endpoint ARN"
            )));
        }
        let message = PushPayload::from_value(payload)?.sns_message();
        let out = self
            .client
            .publish()
            .target_arn(endpoint_arn)
            .message_structure("json")
            .message(message)
            .send()
            .await
            .map_err(|e| classify("Publish", e))?;
        Ok(Sent {
            provider_message_id: out.message_id,
        })
    }

    /// Registers a device token with the configured platform application and answers the
    /// endpoint ARN. A token SNS already knows (same device registered again, perhaps for
    /// another user, or disabled by the platform since) keeps its endpoint, which is updated
    /// and enabled again: AWS's documented way to keep one endpoint per token.
    pub async fn create_platform_endpoint(
        &self,
        token: &str,
        user_data: &str,
    ) -> Result<String, SendError> {
        let application = self.platform_application_arn.as_deref().ok_or_else(|| {
            SendError::Permanent(
                "no platform application configured (INKWIRE_SNS_PLATFORM_APPLICATION_ARN)".into(),
            )
        })?;
        if token.trim().is_empty() || token.len() > 4096 || token.chars().any(|c| c.is_control()) {
            return Err(SendError::Permanent(
                "device token is empty, too long or has control characters".into(),
            ));
        }
        let created = self
            .client
            .create_platform_endpoint()
            .platform_application_arn(application)
            .token(token)
            .custom_user_data(user_data)
            .send()
            .await;
        match created {
            Ok(out) => out.endpoint_arn.ok_or_else(|| {
                SendError::Transient("SNS CreatePlatformEndpoint answered no EndpointArn".into())
            }),
            Err(err) => {
                let existing = err
                    .as_service_error()
                    .filter(|e| e.code() == Some("InvalidParameter"))
                    .and_then(|e| e.message())
                    .and_then(existing_endpoint_arn);
                let Some(arn) = existing else {
                    return Err(classify("CreatePlatformEndpoint", err));
                };
                self.client
                    .set_endpoint_attributes()
                    .endpoint_arn(&arn)
                    .attributes("Token", token)
                    .attributes("CustomUserData", user_data)
                    .attributes("Enabled", "true")
                    .send()
                    .await
                    .map_err(|e| classify("SetEndpointAttributes", e))?;
                Ok(arn)
            }
        }
    }

    /// Deletes a platform endpoint (a device unregistered). Deleting one that is already
    /// gone succeeds, as in SNS.
    pub async fn delete_endpoint(&self, endpoint_arn: &str) -> Result<(), SendError> {
        if !is_endpoint_arn(endpoint_arn) {
            return Err(SendError::Permanent(format!(
                "{endpoint_arn:?} is not an SNS platform endpoint ARN"
            )));
        }
        self.client
            .delete_endpoint()
            .endpoint_arn(endpoint_arn)
            .send()
            .await
            .map_err(|e| classify("DeleteEndpoint", e))?;
        Ok(())
    }
}

/// SNS refuses a second endpoint for a known token with "… Endpoint ARN already exists with
/// the same Token, but different attributes." and names the existing endpoint.
fn existing_endpoint_arn(message: &str) -> Option<String> {
    if !message.contains("already exists") {
        return None;
    }
    message
        .split_whitespace()
        .map(|word| word.trim_end_matches(['.', ',', ';']))
        .find(|word| is_endpoint_arn(word))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_classified() {
        for code in [
            "InvalidParameter",
            "ParameterValueInvalid",
            "EndpointDisabled",
            "NotFound",
            "AuthorizationError",
            "PlatformApplicationDisabled",
        ] {
            assert!(!is_transient(code, 400), "{code}");
        }
        for code in ["Throttled", "KMSThrottling", "InternalError"] {
            assert!(is_transient(code, 400), "{code}");
        }
        // Unknown codes follow the HTTP status.
        assert!(is_transient("SomethingNew", 503));
        assert!(is_transient("SomethingNew", 429));
        assert!(!is_transient("SomethingNew", 400));
        assert!(!is_transient("", 403));
    }

    #[test]
    fn arns_are_checked() {
        let app = "arn:aws:sns:us-east-1:123456789012:app/GCM/inkwire";
        let endpoint =
            "arn:aws:sns:us-east-1:123456789012:endpoint/GCM/inkwire/bdf369b9-c646-4aa6-b4fc";
        assert!(is_platform_application_arn(app));
        assert!(!is_platform_application_arn(endpoint));
        assert!(is_endpoint_arn(endpoint));
        assert!(!is_endpoint_arn(app));
        for bad in [
            "",
            "arn:aws:sns:us-east-1:123456789012:topic",
            "arn:aws:sqs:us-east-1:123456789012:endpoint/GCM/a/b",
            "arn:aws:sns:us-east-1:12345:endpoint/GCM/a/b",
            "arn:aws:sns:us-east-1:123456789012:endpoint/GCM/a/b c",
            "arn:aws:sns:us-east-1:123456789012:endpoint/GCM//b",
            "arn:aws:sns::123456789012:app/GCM/x",
        ] {
            assert!(
                !is_endpoint_arn(bad) && !is_platform_application_arn(bad),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_existing_endpoint_is_found_in_snss_message() {
        let arn = "arn:aws:sns:us-east-1:123456789012:endpoint/GCM/inkwire/0d3b";
        let message = format!(
            "Invalid parameter: Token Reason: Endpoint {arn} already exists with the same \
             Token, but different attributes."
        );
        assert_eq!(existing_endpoint_arn(&message).as_deref(), Some(arn));
        assert_eq!(existing_endpoint_arn("Invalid parameter: Token"), None);
    }

    #[test]
    fn push_payloads_are_built_per_platform() {
        let payload = PushPayload::from_value(&json!({
            "title": "Chapter 3 approved",
            "body": "Ada approved your chapter",
            "data": {"notificationId": "n-1", "count": 3}
        }))
        .unwrap();
        let message: Value = serde_json::from_str(&payload.sns_message()).unwrap();
        assert_eq!(message["default"], "Ada approved your chapter");
        let gcm: Value = serde_json::from_str(message["GCM"].as_str().unwrap()).unwrap();
        assert_eq!(gcm["notification"]["title"], "Chapter 3 approved");
        assert_eq!(gcm["data"]["count"], "3", "FCM data values are strings");
        let apns: Value = serde_json::from_str(message["APNS"].as_str().unwrap()).unwrap();
        assert_eq!(apns["aps"]["alert"]["body"], "Ada approved your chapter");
        assert_eq!(apns["data"]["count"], 3);
        assert_eq!(message["APNS_SANDBOX"], message["APNS"]);

        let title_only = PushPayload::from_value(&json!({"title": "Hi"})).unwrap();
        let message: Value = serde_json::from_str(&title_only.sns_message()).unwrap();
        assert_eq!(message["default"], "Hi");
    }

    #[test]
    fn bad_push_payloads_are_permanent() {
        for bad in [
            json!("text"),
            json!({}),
            json!({"title": "", "body": "  "}),
            json!({"title": 3}),
            json!({"title": "t", "data": [1]}),
        ] {
            let err = PushPayload::from_value(&bad).unwrap_err();
            assert!(matches!(err, SendError::Permanent(_)), "{bad}: {err:?}");
        }
    }
}
