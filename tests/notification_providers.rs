//! The notification providers against real peers: email through aiosmtpd (read back from its
//! Maildir), SMS and push through moto's SNS server (read back from `/moto-api/data.json`).
//! Each test starts its own peers on free ports.

use std::collections::HashMap;
use std::time::Duration;

use inkwire_notifications::model::DeliveryChannel;
use inkwire_notifications::providers::{ProviderConfig, Providers, SendError};
use inkwire_tests::json;
use inkwire_tests::peers::{SmtpPeer, SnsPeer};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

async fn providers(config: &ProviderConfig) -> Providers {
    Providers::build(config).await.expect("providers build")
}

fn assert_permanent(result: Result<impl std::fmt::Debug, SendError>, needle: &str) -> String {
    match result {
        Err(SendError::Permanent(m)) => {
            assert!(m.contains(needle), "{m:?} does not mention {needle:?}");
            m
        }
        other => panic!("expected a permanent error mentioning {needle:?}, got {other:?}"),
    }
}

fn assert_transient(result: Result<impl std::fmt::Debug, SendError>, needle: &str) -> String {
    match result {
        Err(SendError::Transient(m)) => {
            assert!(m.contains(needle), "{m:?} does not mention {needle:?}");
            m
        }
        other => panic!("expected a transient error mentioning {needle:?}, got {other:?}"),
    }
}

#[tokio::test]
async fn email_with_html_is_multipart_alternative_and_arrives_intact() {
    let smtp = SmtpPeer::start().await;
    let providers = providers(&smtp.provider_config()).await;
    let email = providers.email.as_ref().expect("email provider");

    let sent = email
        .send(
            "Ada Lovelace <ada@example.com>",
            "Café review: chapter 3 approved ✓",
            "Ada approved chapter 3.\nOpen it: https://inkwire.test/d/3",
            Some("<p>Ada approved <b>chapter 3</b>.</p>"),
        )
        .await
        .expect("sent");
    let plain = email
        .send("bob@example.com", "Plain only", "Just text.", None)
        .await
        .expect("sent");

    let mail = smtp.wait_for_messages(2, WAIT).await;
    assert_eq!(mail.len(), 2, "{mail:?}");
    let rich = mail
        .iter()
        .find(|m| m.rcpt_to.contains("ada@example.com"))
        .expect("Ada's email");
    assert_eq!(rich.subject, "Café review: chapter 3 approved ✓");
    assert_eq!(rich.mime_type, "multipart/alternative");
    assert_eq!(
        rich.text.as_deref().map(str::trim_end),
        Some("Ada approved chapter 3.\nOpen it: https://inkwire.test/d/3")
    );
    assert_eq!(
        rich.html.as_deref().map(str::trim_end),
        Some("<p>Ada approved <b>chapter 3</b>.</p>")
    );
    assert!(
        rich.from.contains("notifications@inkwire.test"),
        "{}",
        rich.from
    );
    assert!(rich.to.contains("ada@example.com"), "{}", rich.to);
    // The provider message id is the Message-ID header the server received.
    let id = sent.provider_message_id.expect("message id");
    assert!(id.ends_with("@inkwire.test>"), "{id}");
    assert_eq!(rich.message_id, id);

    let bare = mail
        .iter()
        .find(|m| m.rcpt_to.contains("bob@example.com"))
        .expect("Bob's email");
    assert_eq!(bare.mime_type, "text/plain");
    assert_eq!(bare.subject, "Plain only");
    assert_eq!(bare.text.as_deref().map(str::trim_end), Some("Just text."));
    assert_eq!(bare.html, None);
    assert_eq!(Some(bare.message_id.clone()), plain.provider_message_id);
    assert_ne!(bare.message_id, rich.message_id);
}

#[tokio::test]
async fn a_rejected_recipient_is_permanent_and_a_deferred_one_transient() {
    let smtp = SmtpPeer::start().await;
    let providers = providers(&smtp.provider_config()).await;
    let email = providers.email.as_ref().unwrap();

    let rejected = assert_permanent(
        email.send("reject-me@example.com", "s", "t", None).await,
        "550",
    );
    assert!(rejected.contains("rejected"), "{rejected}");
    assert_transient(
        email.send("defer-me@example.com", "s", "t", None).await,
        "451",
    );
    // lettre refuses what is not an address before talking to the server.
    assert_permanent(
        email.send("no at sign", "s", "t", None).await,
        "not an email address",
    );
    // The transport is still usable after refusals, and only the good one is stored.
    email
        .send("carol@example.com", "after", "t", None)
        .await
        .expect("sent after refusals");
    let mail = smtp.wait_for_messages(1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mail_now = smtp.messages();
    assert_eq!(mail_now.len(), 1, "{mail_now:?}");
    assert!(mail[0].rcpt_to.contains("carol@example.com"));
}

#[tokio::test]
async fn smtp_down_is_transient_and_the_same_email_is_delivered_when_it_returns() {
    let mut smtp = SmtpPeer::start().await;
    let providers = providers(&smtp.provider_config()).await;
    let email = providers.email.as_ref().unwrap();
    // A first send leaves a pooled connection behind, which the outage breaks.
    email
        .send("ada@example.com", "before", "t", None)
        .await
        .unwrap();
    smtp.wait_for_messages(1, WAIT).await;

    smtp.stop().await;
    for _ in 0..2 {
        assert_transient(
            email.send("ada@example.com", "during", "t", None).await,
            "Connection refused",
        );
    }

    smtp.restart().await;
    let sent = email
        .send("ada@example.com", "during", "t", None)
        .await
        .expect("delivered once the server is back");
    let mail = smtp.wait_for_messages(2, WAIT).await;
    assert_eq!(mail.len(), 2);
    assert_eq!(mail[1].subject, "during");
    assert_eq!(Some(mail[1].message_id.clone()), sent.provider_message_id);
}

#[tokio::test]
async fn a_server_that_never_answers_times_out_as_transient() {
    // Accepts connections and says nothing, like a wedged server.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let config = ProviderConfig {
        smtp_url: Some(format!("smtp://127.0.0.1:{port}")),
        smtp_timeout: Duration::from_millis(400),
        ..ProviderConfig::default()
    };
    let providers = providers(&config).await;
    let started = std::time::Instant::now();
    let err = providers
        .email
        .as_ref()
        .unwrap()
        .send("ada@example.com", "s", "t", None)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    held.abort();
}

#[tokio::test]
async fn sms_to_a_valid_number_is_published() {
    let sns = SnsPeer::start().await;
    let providers = providers(&sns.provider_config(None)).await;
    let sms = providers.sns.as_ref().expect("SNS provider");

    let sent = sms
        .send_sms("+447700900123", "Your book was published")
        .await
        .expect("sent");
    let id = sent.provider_message_id.expect("SNS message id");
    let recorded = sns.sms().await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].message_id, id);
    assert_eq!(recorded[0].phone_number, "+447700900123");
    assert_eq!(recorded[0].message, "Your book was published");
}

#[tokio::test]
async fn an_invalid_phone_number_is_permanent_and_nothing_is_sent() {
    let sns = SnsPeer::start().await;
    let providers = providers(&sns.provider_config(None)).await;
    let sms = providers.sns.as_ref().unwrap();
    // SNS (and moto) refuse numbers that are not E.164 with InvalidParameter.
    for phone in ["+0123456789", "not-a-number", "+1234567890123456"] {
        assert_permanent(sms.send_sms(phone, "hello").await, "InvalidParameter");
    }
    assert_permanent(sms.send_sms("+447700900123", "  ").await, "empty");
    assert_eq!(sns.sms().await, vec![]);
}

#[tokio::test]
async fn push_goes_to_the_devices_platform_endpoint() {
    let sns = SnsPeer::start().await;
    let app = sns.create_platform_application("inkwire", "GCM").await;
    let providers = providers(&sns.provider_config(Some(&app))).await;
    let push = providers.sns.as_ref().unwrap();

    let endpoint = push
        .create_platform_endpoint("fcm-token-1", "u-1")
        .await
        .expect("endpoint");
    assert!(endpoint.contains(":endpoint/GCM/inkwire/"), "{endpoint}");
    let sent = push
        .send_push(
            &endpoint,
            &json!({"title": "Chapter approved", "body": "Ada approved chapter 3",
                    "data": {"notificationId": "n-1", "unread": 4}}),
        )
        .await
        .expect("published");
    let id = sent.provider_message_id.expect("message id");

    let messages = sns.endpoint_messages(&endpoint).await;
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0].0, id);
    let message: Value = serde_json::from_str(&messages[0].1).unwrap();
    assert_eq!(message["default"], "Ada approved chapter 3");
    let gcm: Value = serde_json::from_str(message["GCM"].as_str().unwrap()).unwrap();
    assert_eq!(gcm["notification"]["title"], "Chapter approved");
    assert_eq!(gcm["data"]["notificationId"], "n-1");
    assert_eq!(gcm["data"]["unread"], "4");
    let apns: Value = serde_json::from_str(message["APNS"].as_str().unwrap()).unwrap();
    assert_eq!(apns["aps"]["alert"]["body"], "Ada approved chapter 3");

    let stored = sns.platform_endpoint(&endpoint).await.unwrap();
    assert_eq!(stored["custom_user_data"], "u-1");
    assert_eq!(stored["token"], "fcm-token-1");

    // Unregistered: gone from SNS, and deleting again is fine.
    push.delete_endpoint(&endpoint).await.expect("deleted");
    push.delete_endpoint(&endpoint)
        .await
        .expect("deleting twice");
    assert_eq!(sns.live_endpoints(&app).await, Vec::<String>::new());
    assert_permanent(
        push.send_push(&endpoint, &json!({"title": "t"})).await,
        "NotFound",
    );
}

#[tokio::test]
async fn a_token_registered_again_keeps_its_endpoint_updated_and_enabled() {
    let sns = SnsPeer::start().await;
    let app = sns.create_platform_application("inkwire", "GCM").await;
    let providers = providers(&sns.provider_config(Some(&app))).await;
    let push = providers.sns.as_ref().unwrap();

    let first = push.create_platform_endpoint("tok-9", "u-1").await.unwrap();
    // The same registration again is the same endpoint.
    assert_eq!(
        push.create_platform_endpoint("tok-9", "u-1").await.unwrap(),
        first
    );
    // The device signs in as another user, after the platform disabled it.
    sns.set_endpoint_enabled(&first, false).await;
    let again = push.create_platform_endpoint("tok-9", "u-2").await.unwrap();
    assert_eq!(again, first);
    let stored = sns.platform_endpoint(&first).await.unwrap();
    assert_eq!(stored["enabled"], true, "{stored}");
    assert_eq!(stored["attributes"]["CustomUserData"], "u-2", "{stored}");
    push.send_push(&first, &json!({"body": "back"}))
        .await
        .expect("sent");
    let endpoints = sns.data().await["sns"]["PlatformEndpoint"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(endpoints, 1);
}

#[tokio::test]
async fn a_disabled_endpoint_is_permanent() {
    let sns = SnsPeer::start().await;
    let app = sns.create_platform_application("inkwire-ios", "APNS").await;
    let providers = providers(&sns.provider_config(Some(&app))).await;
    let push = providers.sns.as_ref().unwrap();
    let endpoint = push
        .create_platform_endpoint("apns-token", "u-1")
        .await
        .unwrap();

    sns.set_endpoint_enabled(&endpoint, false).await;
    assert_permanent(
        push.send_push(&endpoint, &json!({"title": "t", "body": "b"}))
            .await,
        "EndpointDisabled",
    );
    assert!(sns.endpoint_messages(&endpoint).await.is_empty());
    // Not an endpoint ARN at all: refused before any call.
    assert_permanent(
        push.send_push(
            "arn:aws:sns:us-east-1:123456789012:inkwire-topic",
            &json!({"title": "t"}),
        )
        .await,
        "not an SNS platform endpoint ARN",
    );
}

#[tokio::test]
async fn without_a_platform_application_devices_cannot_be_registered() {
    let sns = SnsPeer::start().await;
    let providers = providers(&sns.provider_config(None)).await;
    let push = providers.sns.as_ref().unwrap();
    assert_permanent(
        push.create_platform_endpoint("tok", "u-1").await,
        "no platform application configured",
    );
    // A platform application SNS does not know is permanent too.
    let unknown = providers_for_app(&sns, "arn:aws:sns:us-east-1:123456789012:app/GCM/nope").await;
    assert_permanent(
        unknown
            .sns
            .as_ref()
            .unwrap()
            .create_platform_endpoint("tok", "u-1")
            .await,
        "NotFound",
    );
}

async fn providers_for_app(sns: &SnsPeer, app: &str) -> Providers {
    providers(&sns.provider_config(Some(app))).await
}

#[tokio::test]
async fn sns_unreachable_is_transient() {
    let sns = SnsPeer::start().await;
    let closed = inkwire_shared::local_servers::free_port().unwrap();
    let config = ProviderConfig {
        sns_endpoint: Some(format!("http://127.0.0.1:{closed}")),
        ..sns.provider_config(None)
    };
    let providers = providers(&config).await;
    assert_transient(
        providers
            .sns
            .as_ref()
            .unwrap()
            .send_sms("+447700900123", "hello")
            .await,
        "Connection refused",
    );
    assert_eq!(sns.sms().await, vec![]);
}

#[tokio::test]
async fn unconfigured_providers_are_skipped_with_a_reason() {
    let none: HashMap<&str, &str> = HashMap::new();
    let config = ProviderConfig::from_lookup(|k| none.get(k).map(|v| v.to_string())).unwrap();
    let providers = providers(&config).await;
    assert!(providers.email.is_none());
    assert!(providers.sns.is_none());
    assert_eq!(providers.skip_reason(DeliveryChannel::InApp), None);
    for channel in DeliveryChannel::EXTERNAL {
        let reason = providers.skip_reason(channel).expect("a reason");
        assert!(reason.contains("not configured"), "{channel:?}: {reason}");
    }

    // Email only: SMS and push still skipped, email not.
    let smtp = SmtpPeer::start().await;
    let email_only = providers_from(&[("INKWIRE_SMTP_URL", &smtp.url())]).await;
    assert!(email_only.email.is_some() && email_only.sns.is_none());
    assert_eq!(email_only.skip_reason(DeliveryChannel::Email), None);
    assert!(email_only.skip_reason(DeliveryChannel::Sms).is_some());
    assert!(email_only.skip_reason(DeliveryChannel::Push).is_some());
}

async fn providers_from(vars: &[(&str, &str)]) -> Providers {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = ProviderConfig::from_lookup(|k| map.get(k).cloned()).unwrap();
    providers(&config).await
}

#[tokio::test]
async fn configuration_debug_never_shows_secrets() {
    let sns = SnsPeer::start().await;
    let map: HashMap<&str, String> = HashMap::from([
        (
            "INKWIRE_SMTP_URL",
            "smtps://mailer:s3cret-pw@mail.example.com".to_string(),
        ),
        ("INKWIRE_SNS_ENDPOINT", sns.endpoint()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE".into()),
        (
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
        ),
        ("AWS_SESSION_TOKEN", "IQoJb3JpZ2luX2VjEXAMPLE".into()),
    ]);
    let config = ProviderConfig::from_lookup(|k| map.get(k).cloned()).unwrap();
    let providers = providers(&config).await;
    for shown in [
        format!("{config:?}"),
        format!("{config:#?}"),
        format!("{providers:?}"),
        format!("{:?}", providers.email.as_ref().unwrap()),
    ] {
        for secret in [
            "s3cret-pw",
            "wJalrXUtnFEMI",
            "IQoJb3JpZ2luX2Vj",
            "AKIAIOSFODNN7EXAMPLE",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
    }
    // The keys still work: SNS accepts a call signed with them.
    providers
        .sns
        .as_ref()
        .unwrap()
        .send_sms("+15555550100", "signed")
        .await
        .expect("sent with the configured keys");
}
