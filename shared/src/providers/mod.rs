//! The delivery providers (the `providers` feature of this crate): email over SMTP
//! ([`email`], lettre) and SMS and mobile push through AWS SNS ([`sns`], aws-sdk-sns). This
//! module owns their configuration (read from the environment, secrets redacted in
//! `Debug`) and the one error type every provider answers with (transient → retry with
//! backoff, permanent → give up and log). Shared by the notifications (their delivery
//! worker) and the workflows (the email and SMS actions); only those enable the feature, so
//! the other functions' binaries carry neither lettre nor the AWS SDK.
//!
//! Providers only send: retries, backoff and logs belong to their callers, so a provider
//! makes exactly one attempt per call and classifies its outcome.

pub mod email;
pub mod sns;

use std::fmt;
use std::time::Duration;

use crate::config::{ConfigError, parse_duration, redact_url};

pub use email::EmailProvider;
pub use sns::{PushPayload, SnsProvider};

/// The `From` of every email when `INKWIRE_EMAIL_FROM` is not set.
pub const DEFAULT_EMAIL_FROM: &str = "inkwire <notifications@localhost>";
/// The region when neither the environment nor the AWS profile names one.
pub const DEFAULT_AWS_REGION: &str = "us-east-1";
/// How long one send may take (connect, TLS, SMTP dialogue or the SNS call) by default.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// What one provider call achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The provider's id for what was sent: the email's `Message-ID` header, the SNS
    /// `MessageId`. Kept in the delivery log.
    pub provider_message_id: Option<String>,
}

/// Why a provider call failed, classified for the retry decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying later: the peer is down, slow, throttling or answered a temporary
    /// failure (SMTP 4xx, HTTP 5xx).
    #[error("transient: {0}")]
    Transient(String),
    /// Retrying cannot help: the address or number is invalid, the recipient or endpoint is
    /// rejected or disabled, the request is not authorized.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl SendError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SendError::Transient(_))
    }

    /// The description without the classification.
    pub fn message(&self) -> &str {
        match self {
            SendError::Transient(m) | SendError::Permanent(m) => m,
        }
    }
}

/// `error` and its causes on one line, each cause once ("dispatch failure: io error: …").
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Static AWS keys given through the environment. Without them the SDK's default credential
/// chain (profile, web identity, container, instance metadata) is used.
#[derive(Clone, PartialEq, Eq)]
pub struct AwsKeys {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the key id's first characters (enough to tell keys apart in a log); the secret
        // and the session token never.
        let shown: String = self.access_key_id.chars().take(4).collect();
        f.debug_struct("AwsKeys")
            .field("access_key_id", &format_args!("{shown}…"))
            .field("secret_access_key", &format_args!("<redacted>"))
            .field(
                "session_token",
                &self
                    .session_token
                    .as_ref()
                    .map(|_| format_args!("<redacted>")),
            )
            .finish()
    }
}

/// Provider configuration, from the environment ([`ProviderConfig::from_env`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// `INKWIRE_SMTP_URL`: `smtp://host:port` (plain), `smtp://host:587?tls=required`
    /// (STARTTLS), `smtp://host?tls=opportunistic`, `smtps://user:pass@host` (implicit TLS);
    /// a path names the EHLO host (`smtp://host/mail.example.com`). Unset: no email.
    pub smtp_url: Option<String>,
    /// `INKWIRE_EMAIL_FROM`, a mailbox such as `inkwire <notifications@example.com>`.
    pub email_from: String,
    /// `INKWIRE_SMTP_TIMEOUT` (`10s` by default): one email send, connection included.
    pub smtp_timeout: Duration,
    /// `INKWIRE_SNS_ENABLED`: whether SMS and push go through SNS. Defaults to on when
    /// `INKWIRE_SNS_ENDPOINT` or `INKWIRE_SNS_PLATFORM_APPLICATION_ARN` is set, off otherwise
    /// (set it to `true` for SMS on AWS with no platform application).
    pub sns_enabled: bool,
    /// `INKWIRE_SNS_ENDPOINT`: an endpoint URL other than AWS's (tests: a local moto server).
    pub sns_endpoint: Option<String>,
    /// `INKWIRE_SNS_PLATFORM_APPLICATION_ARN`: the platform application (FCM, APNs) push
    /// devices are registered with. Without it devices cannot be registered.
    pub sns_platform_application_arn: Option<String>,
    /// `INKWIRE_SNS_TIMEOUT` (`10s` by default): one SNS call.
    pub sns_timeout: Duration,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`; when unset, the AWS profile's region, else
    /// [`DEFAULT_AWS_REGION`].
    pub aws_region: Option<String>,
    /// `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`).
    pub aws_keys: Option<AwsKeys>,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        ProviderConfig {
            smtp_url: None,
            email_from: DEFAULT_EMAIL_FROM.into(),
            smtp_timeout: DEFAULT_SEND_TIMEOUT,
            sns_enabled: false,
            sns_endpoint: None,
            sns_platform_application_arn: None,
            sns_timeout: DEFAULT_SEND_TIMEOUT,
            aws_region: None,
            aws_keys: None,
        }
    }
}

impl fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("smtp_url", &self.smtp_url.as_deref().map(redact_url))
            .field("email_from", &self.email_from)
            .field("smtp_timeout", &self.smtp_timeout)
            .field("sns_enabled", &self.sns_enabled)
            .field(
                "sns_endpoint",
                &self.sns_endpoint.as_deref().map(redact_url),
            )
            .field(
                "sns_platform_application_arn",
                &self.sns_platform_application_arn,
            )
            .field("sns_timeout", &self.sns_timeout)
            .field("aws_region", &self.aws_region)
            .field("aws_keys", &self.aws_keys)
            .finish()
    }
}

impl ProviderConfig {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<ProviderConfig, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the configuration through `get`, so tests can supply their own variables. Empty
    /// values count as unset (a deployment template often sets a variable to "").
    pub fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<ProviderConfig, ConfigError> {
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
        let mut c = ProviderConfig::default();
        if let Some(url) = get("INKWIRE_SMTP_URL") {
            // Checked here, so a typo fails at start rather than at the first email.
            email::check_smtp_url(&url).map_err(|problem| ConfigError {
                name: "INKWIRE_SMTP_URL",
                problem,
            })?;
            c.smtp_url = Some(url.trim().to_string());
        }
        if let Some(from) = get("INKWIRE_EMAIL_FROM") {
            email::parse_mailbox(&from).map_err(|problem| ConfigError {
                name: "INKWIRE_EMAIL_FROM",
                problem,
            })?;
            c.email_from = from.trim().to_string();
        }
        if let Some(v) = get("INKWIRE_SMTP_TIMEOUT") {
            c.smtp_timeout = parse_timeout(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_SMTP_TIMEOUT",
                problem,
            })?;
        }
        c.sns_endpoint = get("INKWIRE_SNS_ENDPOINT").map(|v| v.trim().to_string());
        if let Some(endpoint) = &c.sns_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError {
                name: "INKWIRE_SNS_ENDPOINT",
                problem: format!(
                    "{:?} is not an http:// or https:// URL",
                    redact_url(endpoint)
                ),
            });
        }
        if let Some(arn) = get("INKWIRE_SNS_PLATFORM_APPLICATION_ARN") {
            let arn = arn.trim().to_string();
            if !sns::is_platform_application_arn(&arn) {
                return Err(ConfigError {
                    name: "INKWIRE_SNS_PLATFORM_APPLICATION_ARN",
                    problem: format!(
                        "{arn:?} is not a platform application ARN \
                         (arn:aws:sns:REGION:ACCOUNT:app/PLATFORM/NAME)"
                    ),
                });
            }
            c.sns_platform_application_arn = Some(arn);
        }
        c.sns_enabled = match get("INKWIRE_SNS_ENABLED") {
            Some(v) => parse_bool(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_SNS_ENABLED",
                problem,
            })?,
            None => c.sns_endpoint.is_some() || c.sns_platform_application_arn.is_some(),
        };
        if let Some(v) = get("INKWIRE_SNS_TIMEOUT") {
            c.sns_timeout = parse_timeout(&v).map_err(|problem| ConfigError {
                name: "INKWIRE_SNS_TIMEOUT",
                problem,
            })?;
        }
        c.aws_region = get("AWS_REGION")
            .or_else(|| get("AWS_DEFAULT_REGION"))
            .map(|v| v.trim().to_string());
        c.aws_keys = match (get("AWS_ACCESS_KEY_ID"), get("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Some(AwsKeys {
                access_key_id,
                secret_access_key,
                session_token: get("AWS_SESSION_TOKEN"),
            }),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError {
                    name: "AWS_ACCESS_KEY_ID",
                    problem: "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together"
                        .into(),
                });
            }
        };
        Ok(c)
    }
}

fn parse_timeout(v: &str) -> Result<Duration, String> {
    let d = parse_duration(v)?;
    if d.is_zero() || d > Duration::from_secs(300) {
        return Err(format!("{v:?} is outside 1ms..=5m"));
    }
    Ok(d)
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        other => Err(format!("{other:?} is neither true nor false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)]) -> Result<ProviderConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProviderConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_means_no_providers_and_defaults() {
        let c = with(&[]).unwrap();
        assert_eq!(c, ProviderConfig::default());
        assert_eq!(c.email_from, DEFAULT_EMAIL_FROM);
        assert!(!c.sns_enabled);
        assert_eq!(c.smtp_timeout, Duration::from_secs(10));
    }

    #[test]
    fn every_variable_is_read() {
        let c = with(&[
            (
                "INKWIRE_SMTP_URL",
                "smtp://mail.example.com:587?tls=required",
            ),
            ("INKWIRE_EMAIL_FROM", "Ink <ink@example.com>"),
            ("INKWIRE_SMTP_TIMEOUT", "3s"),
            ("INKWIRE_SNS_ENDPOINT", "http://127.0.0.1:5000"),
            (
                "INKWIRE_SNS_PLATFORM_APPLICATION_ARN",
                "arn:aws:sns:eu-west-1:123456789012:app/GCM/inkwire",
            ),
            ("INKWIRE_SNS_TIMEOUT", "250ms"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret/key"),
        ])
        .unwrap();
        assert_eq!(
            c.smtp_url.as_deref(),
            Some("smtp://mail.example.com:587?tls=required")
        );
        assert_eq!(c.email_from, "Ink <ink@example.com>");
        assert_eq!(c.smtp_timeout, Duration::from_secs(3));
        assert!(
            c.sns_enabled,
            "an endpoint or platform application turns SNS on"
        );
        assert_eq!(c.sns_endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(c.sns_timeout, Duration::from_millis(250));
        assert_eq!(c.aws_region.as_deref(), Some("eu-west-1"));
        let keys = c.aws_keys.unwrap();
        assert_eq!(keys.access_key_id, "AKIAEXAMPLE");
        assert_eq!(keys.session_token, None);
    }

    #[test]
    fn sns_switch_overrides_the_inference() {
        assert!(
            with(&[("INKWIRE_SNS_ENABLED", "true")])
                .unwrap()
                .sns_enabled
        );
        let off = with(&[
            ("INKWIRE_SNS_ENABLED", "off"),
            ("INKWIRE_SNS_ENDPOINT", "http://127.0.0.1:5000"),
        ])
        .unwrap();
        assert!(!off.sns_enabled);
        // An empty value is unset, as deployment templates often write it.
        assert!(!with(&[("INKWIRE_SNS_ENDPOINT", "")]).unwrap().sns_enabled);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (vars, name) in [
            (
                vec![("INKWIRE_SMTP_URL", "mail.example.com")],
                "INKWIRE_SMTP_URL",
            ),
            (
                vec![("INKWIRE_SMTP_URL", "http://mail.example.com")],
                "INKWIRE_SMTP_URL",
            ),
            (
                vec![("INKWIRE_SMTP_URL", "smtp://h?tls=sometimes")],
                "INKWIRE_SMTP_URL",
            ),
            (
                vec![("INKWIRE_EMAIL_FROM", "not an address")],
                "INKWIRE_EMAIL_FROM",
            ),
            (vec![("INKWIRE_SMTP_TIMEOUT", "0s")], "INKWIRE_SMTP_TIMEOUT"),
            (vec![("INKWIRE_SNS_TIMEOUT", "10")], "INKWIRE_SNS_TIMEOUT"),
            (
                vec![("INKWIRE_SNS_ENABLED", "maybe")],
                "INKWIRE_SNS_ENABLED",
            ),
            (
                vec![("INKWIRE_SNS_ENDPOINT", "127.0.0.1:5000")],
                "INKWIRE_SNS_ENDPOINT",
            ),
            (
                vec![(
                    "INKWIRE_SNS_PLATFORM_APPLICATION_ARN",
                    "arn:aws:sns:us-east-1:1:topic",
                )],
                "INKWIRE_SNS_PLATFORM_APPLICATION_ARN",
            ),
            (vec![("AWS_SECRET_ACCESS_KEY", "s")], "AWS_ACCESS_KEY_ID"),
        ] {
            let err = with(&vars).unwrap_err();
            assert_eq!(err.name, name, "{vars:?}: {err}");
        }
    }

    #[test]
    fn debug_redacts_every_secret() {
        let c = with(&[
            (
                "INKWIRE_SMTP_URL",
                "smtps://mailer:pa55-w0rd@mail.example.com",
            ),
            ("INKWIRE_SNS_ENABLED", "true"),
            ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
            (
                "AWS_SECRET_ACCESS_KEY",
                "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            ),
            ("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN"),
        ])
        .unwrap();
        let shown = format!("{c:?}");
        for secret in [
            "pa55-w0rd",
            "mailer",
            "wJalrXUtnFEMI",
            "FwoGZXIvYXdz",
            "AKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        // What helps an operator is still there.
        assert!(shown.contains("mail.example.com"), "{shown}");
        assert!(shown.contains("AKIA…"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let pretty = format!("{c:#?}");
        assert!(!pretty.contains("pa55-w0rd") && !pretty.contains("wJalrXUtnFEMI"));
    }

    #[test]
    fn send_errors_say_whether_to_retry() {
        let t = SendError::Transient("connection refused".into());
        let p = SendError::Permanent("550 no such user".into());
        assert!(t.is_transient() && !p.is_transient());
        assert_eq!(p.message(), "550 no such user");
        assert_eq!(t.to_string(), "transient: connection refused");
    }
}
