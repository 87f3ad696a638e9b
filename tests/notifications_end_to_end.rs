//! Notifications through the whole chain, against real peers: the send API → NOTIFY → the
//! notifier (routing) → delivery jobs → the delivery worker → aiosmtpd (email) and moto (SMS,
//! push), with the inbox and the delivery log read back through the API.

use std::time::{Duration, Instant};

use inkwire_notifications::providers::ProviderConfig;
use inkwire_tests::peers::{SmtpPeer, SnsPeer};
use inkwire_tests::{TestEnv, json};
use reqwest::StatusCode;
use serde_json::Value;

const SEND: &str = "/api/realtime/notifications/send";
const PREFS: &str = "/api/realtime/notifications/preferences";
const DEVICES: &str = "/api/realtime/notifications/preferences/devices";

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The delivery log of `id` as `{channel: status}`.
async fn statuses(env: &TestEnv, token: &str, id: &str) -> Value {
    let (status, body) = env
        .get(
            &format!("/api/realtime/notifications/{id}/deliveries"),
            token,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut out = serde_json::Map::new();
    for d in body["deliveries"].as_array().expect("deliveries") {
        out.insert(
            d["channel"].as_str().unwrap().to_string(),
            d["status"].clone(),
        );
    }
    Value::Object(out)
}

#[tokio::test]
async fn every_priority_reaches_its_channels_through_real_providers() {
    let smtp = SmtpPeer::start().await;
    let sns = SnsPeer::start().await;
    let app = sns.create_platform_application("inkwire", "GCM").await;
    let providers = ProviderConfig {
        smtp_url: Some(smtp.url()),
        email_from: "inkwire <notifications@inkwire.test>".into(),
        smtp_timeout: Duration::from_secs(5),
        ..sns.provider_config(Some(&app))
    };
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            // The notifier plans with the channels the delivery worker can send on.
            s.notifier.providers = inkwire_notifications::providers::configured(&providers);
            s.providers = providers;
        },
    )
    .await;
    let ada = env.token("ada");
    let (status, body) = env
        .put(
            PREFS,
            &ada,
            &json!({"quietHours": {"enabled": false},
                "contacts": {"email": "ada@example.com", "phone": "+447700900123"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, device) = env
        .post(
            DEVICES,
            &ada,
            &json!({"token": "tok-ada", "platform": "gcm"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{device}");
    let endpoint = device["endpointArn"].as_str().unwrap().to_string();

    let mut ids = Vec::new();
    for priority in ["critical", "high", "medium", "low"] {
        let (status, body) = env
            .post(
                SEND,
                &env.service_token(),
                &json!({"userId": "ada", "category": "publishing", "priority": priority,
                    "title": format!("A {priority} one"), "body": format!("Body {priority}")}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        ids.push(body["notifications"][0]["id"].as_str().unwrap().to_string());
    }

    // critical → every channel; high → in_app + email + push; medium → in_app + push;
    // low → in_app (its email waits for the digest).
    let want = [
        json!({"in_app": "sent", "email": "sent", "sms": "sent", "push": "sent"}),
        json!({"in_app": "sent", "email": "sent", "push": "sent"}),
        json!({"in_app": "sent", "push": "sent"}),
        json!({"in_app": "sent", "email": "digested"}),
    ];
    for (id, want) in ids.iter().zip(want) {
        let got = wait_for("the final statuses", async || {
            let got = statuses(&env, &ada, id).await;
            (got == want).then_some(got)
        })
        .await;
        assert_eq!(got, want);
    }

    let mail = smtp.wait_for_messages(2, Duration::from_secs(10)).await;
    let mut subjects: Vec<&str> = mail.iter().map(|m| m.subject.as_str()).collect();
    subjects.sort_unstable();
    assert_eq!(subjects, ["A critical one", "A high one"]);
    assert!(mail.iter().all(|m| m.rcpt_to.contains("ada@example.com")));
    let sms = sns.sms().await;
    assert_eq!(sms.len(), 1, "{sms:?}");
    assert_eq!(sms[0].phone_number, "+447700900123");
    assert!(sms[0].message.contains("A critical one"), "{sms:?}");
    let pushes = sns.endpoint_messages(&endpoint).await;
    assert_eq!(pushes.len(), 3, "{pushes:?}");

    let (status, inbox) = env.get("/api/realtime/notifications", &ada).await;
    assert_eq!(status, StatusCode::OK, "{inbox}");
    assert_eq!(inbox["unreadCount"], 4, "{inbox}");
    // Nothing more arrives later (no duplicate deliveries).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(smtp.messages().len(), 2);
    assert_eq!(sns.sms().await.len(), 1);
}
