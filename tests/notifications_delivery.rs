//! The delivery worker and the push-device routes against real peers: delivery jobs (the
//! contract between the notifier and the worker) are published straight to NOTIFY, and what
//! arrives is read back from aiosmtpd's Maildir and moto's SNS state; the delivery log from
//! Redis, the outcome events from the EVENTS_NOTIFICATION stream, dead letters from DLQ.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_notifications::delivery::DeliverySettings;
use inkwire_notifications::delivery_job::{Content, DeliveryJob, JobKind, single_job_id};
use inkwire_notifications::delivery_log::{self, DeliveryRecord};
use inkwire_notifications::model::{DeliveryChannel, DeliveryStatus};
use inkwire_notifications::providers::ProviderConfig;
use inkwire_notifications::templates::RenderedEmail;
use inkwire_shared::consumer::Jitter;
use inkwire_shared::jetstream::{self, Outgoing, read_stream};
use inkwire_tests::peers::{SmtpPeer, SnsPeer};
use inkwire_tests::{TestEnv, json};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(15);
const PREFS: &str = "/api/realtime/notifications/preferences";
const DEVICES: &str = "/api/realtime/notifications/preferences/devices";

fn fast_retries(max_attempts: i64) -> DeliverySettings {
    DeliverySettings {
        backoff: vec![Duration::from_millis(300), Duration::from_millis(600)],
        max_attempts,
        jitter: Jitter::Equal,
        ack_wait: Duration::from_secs(30),
    }
}

async fn env_with(providers: ProviderConfig, max_attempts: i64) -> TestEnv {
    TestEnv::start_settings(
        |_| {},
        |s| {
            s.providers = providers;
            s.delivery = fast_retries(max_attempts);
        },
    )
    .await
}

fn job(user: &str, channel: DeliveryChannel, content: Content) -> DeliveryJob {
    let id = Uuid::now_v7();
    DeliveryJob {
        job_id: single_job_id(id, channel),
        channel,
        user_id: user.into(),
        notification_ids: vec![id],
        content,
        muted_count: 0,
        kind: JobKind::Single,
    }
}

fn text(title: &str, body: &str) -> Content {
    Content {
        title: title.into(),
        body: body.into(),
        email: None,
        sms: None,
        push: None,
    }
}

async fn publish(env: &TestEnv, job: &DeliveryJob) {
    jetstream::publish(&env.state.js, job.to_outgoing())
        .await
        .expect("job published");
}

async fn set_contacts(env: &TestEnv, user: &str, contacts: Value) {
    let (status, body) = env
        .put(PREFS, &env.token(user), &json!({"contacts": contacts}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

async fn record(env: &TestEnv, id: Uuid, channel: DeliveryChannel) -> Option<DeliveryRecord> {
    let mut redis = env.state.redis.clone();
    delivery_log::read(&mut redis, id)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.channel == channel)
}

/// Waits until the job's log record satisfies `done`.
async fn wait_record(
    env: &TestEnv,
    job: &DeliveryJob,
    done: impl Fn(&DeliveryRecord) -> bool,
) -> DeliveryRecord {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = record(env, job.notification_ids[0], job.channel).await;
        if let Some(r) = r.as_ref().filter(|r| done(r)) {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "log never got there: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_final(env: &TestEnv, job: &DeliveryJob) -> DeliveryRecord {
    wait_record(env, job, |r| r.status.is_final()).await
}

/// The outcome events (`notification_delivered` / `notification_failed`) of notification `id`.
async fn events(env: &TestEnv, event_type: &str, id: Uuid) -> Vec<Value> {
    read_stream(
        &env.state.js,
        "EVENTS_NOTIFICATION",
        format!("events.notification.{event_type}"),
        DeliverPolicy::All,
        10_000,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|s| serde_json::from_slice::<Value>(&s.payload).unwrap())
    .filter(|e| e["data"]["notificationId"] == json!(id))
    .collect()
}

async fn dead_letters(env: &TestEnv) -> u64 {
    env.stream_messages("DLQ").await
}

#[tokio::test]
async fn an_email_is_delivered_multipart_logged_with_its_message_id_and_sent_once() {
    let smtp = SmtpPeer::start().await;
    let env = env_with(smtp.provider_config(), 6).await;
    set_contacts(&env, "ada", json!({"email": "ada@example.com"})).await;
    let mut content = text("Chapter 3 approved", "Ada approved chapter 3");
    content.email = Some(RenderedEmail {
        subject: "Your chapter was approved".into(),
        html: "<p>Ada approved <b>chapter 3</b></p>".into(),
        text: "Ada approved chapter 3 (text part)".into(),
    });
    let j = job("ada", DeliveryChannel::Email, content);
    publish(&env, &j).await;

    let mail = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(mail.len(), 1);
    assert!(mail[0].rcpt_to.contains("ada@example.com"), "{:?}", mail[0]);
    assert_eq!(mail[0].subject, "Your chapter was approved");
    assert_eq!(mail[0].mime_type, "multipart/alternative");
    assert_eq!(
        mail[0].text.as_deref().map(str::trim_end),
        Some("Ada approved chapter 3 (text part)")
    );
    assert_eq!(
        mail[0].html.as_deref().map(str::trim_end),
        Some("<p>Ada approved <b>chapter 3</b></p>")
    );
    let r = wait_final(&env, &j).await;
    assert_eq!(r.status, DeliveryStatus::Sent, "{r:?}");
    assert_eq!(r.attempts, 1);
    assert_eq!(
        r.provider_message_id.as_deref(),
        Some(mail[0].message_id.as_str())
    );

    // The same job again: JetStream drops the copy with the same id, and a copy under
    // another id (as after the duplicate window) is stopped by the log's final status.
    publish(&env, &j).await;
    let mut copy = j.to_outgoing();
    copy.msg_id = format!("{}:again", j.job_id);
    jetstream::publish(&env.state.js, copy).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(smtp.messages().len(), 1, "no second email");
    let delivered = events(&env, "notification_delivered", j.notification_ids[0]).await;
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!(delivered[0]["userId"], "ada");
    assert_eq!(delivered[0]["data"]["channel"], "email");
    assert_eq!(delivered[0]["data"]["attempts"], 1);
    assert_eq!(
        delivered[0]["data"]["providerMessageId"],
        json!(mail[0].message_id)
    );
    assert_eq!(
        record(&env, j.notification_ids[0], j.channel)
            .await
            .unwrap(),
        r
    );

    // Without an HTML part the title and body go as plain text.
    let plain = job(
        "ada",
        DeliveryChannel::Email,
        text("Plain title", "Plain body"),
    );
    publish(&env, &plain).await;
    let mail = smtp.wait_for_messages(2, WAIT).await;
    let m = mail.iter().find(|m| m.subject == "Plain title").unwrap();
    assert_eq!(m.mime_type, "text/plain");
    assert_eq!(m.text.as_deref().map(str::trim_end), Some("Plain body"));
}

#[tokio::test]
async fn smtp_down_is_retried_with_backoff_and_delivered_when_it_returns() {
    let mut smtp = SmtpPeer::start().await;
    let env = env_with(smtp.provider_config(), 20).await;
    set_contacts(&env, "bob", json!({"email": "bob@example.com"})).await;
    smtp.stop().await;
    let j = job("bob", DeliveryChannel::Email, text("Hello", "while down"));
    let published = Instant::now();
    publish(&env, &j).await;

    // Attempts go on, still queued, each logged with its error.
    let r = wait_record(&env, &j, |r| r.attempts >= 3).await;
    assert_eq!(r.status, DeliveryStatus::Queued, "{r:?}");
    assert!(r.error.as_deref().unwrap().contains("SMTP"), "{r:?}");
    // Backoff: the 2nd attempt at least 150 ms after the 1st (300 ms, equal jitter), the 3rd
    // at least 300 ms after that.
    assert!(
        published.elapsed() >= Duration::from_millis(450),
        "{:?}",
        published.elapsed()
    );
    assert!(smtp.messages().is_empty());

    smtp.restart().await;
    let mail = smtp.wait_for_messages(1, WAIT).await;
    assert_eq!(mail[0].subject, "Hello");
    let r = wait_final(&env, &j).await;
    assert_eq!(r.status, DeliveryStatus::Sent);
    assert!(r.attempts > 3, "{r:?}");
    assert!(
        r.history
            .iter()
            .filter(|h| h.status == DeliveryStatus::Queued)
            .count()
            >= 3
    );
    let delivered = events(&env, "notification_delivered", j.notification_ids[0]).await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["data"]["attempts"], json!(r.attempts));
    assert_eq!(dead_letters(&env).await, 0);
}

#[tokio::test]
async fn retries_that_run_out_are_failed_and_dead_lettered() {
    let mut smtp = SmtpPeer::start().await;
    let env = env_with(smtp.provider_config(), 3).await;
    set_contacts(&env, "cy", json!({"email": "cy@example.com"})).await;
    smtp.stop().await;
    let j = job("cy", DeliveryChannel::Email, text("Never", "arrives"));
    publish(&env, &j).await;
    let r = wait_final(&env, &j).await;
    assert_eq!(r.status, DeliveryStatus::Failed);
    assert_eq!(r.attempts, 3);
    let error = r.error.unwrap();
    assert!(
        error.starts_with("gave up after 3 attempts: SMTP"),
        "{error}"
    );
    let failed = events(&env, "notification_failed", j.notification_ids[0]).await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["data"]["attempts"], 3);
    let deadline = Instant::now() + WAIT;
    while dead_letters(&env).await == 0 {
        assert!(Instant::now() < deadline, "no dead-letter copy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_rejected_recipient_fails_at_once_without_retry() {
    let smtp = SmtpPeer::start().await;
    let env = env_with(smtp.provider_config(), 6).await;
    set_contacts(&env, "dee", json!({"email": "reject-dee@example.com"})).await;
    let j = job("dee", DeliveryChannel::Email, text("Hi", "there"));
    publish(&env, &j).await;
    let r = wait_final(&env, &j).await;
    assert_eq!(r.status, DeliveryStatus::Failed);
    assert_eq!(r.attempts, 1);
    assert!(r.error.as_deref().unwrap().contains("550"), "{r:?}");
    // Not retried: a second look later still shows one attempt, and nothing was dead-lettered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        record(&env, j.notification_ids[0], j.channel)
            .await
            .unwrap()
            .attempts,
        1
    );
    assert_eq!(dead_letters(&env).await, 0);
    let failed = events(&env, "notification_failed", j.notification_ids[0]).await;
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["data"]["error"].as_str().unwrap().contains("550"));
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn sms_goes_to_the_contact_number_clipped_to_the_sms_limit() {
    let sns = SnsPeer::start().await;
    let env = env_with(sns.provider_config(None), 6).await;
    set_contacts(&env, "eve", json!({"phone": "+447700900123"})).await;
    let j = job(
        "eve",
        DeliveryChannel::Sms,
        text("Book published", "It is live"),
    );
    publish(&env, &j).await;
    let r = wait_final(&env, &j).await;
    assert_eq!(r.status, DeliveryStatus::Sent, "{r:?}");
    let sms = sns.sms().await;
    assert_eq!(sms.len(), 1);
    assert_eq!(sms[0].phone_number, "+447700900123");
    assert_eq!(sms[0].message, "Book published: It is live");
    assert_eq!(
        r.provider_message_id.as_deref(),
        Some(sms[0].message_id.as_str())
    );

    // A long SMS part is clipped to 1,600 characters (SNS's limit), not refused.
    let mut content = text("t", "b");
    content.sms = Some("é".repeat(2_000));
    let long = job("eve", DeliveryChannel::Sms, content);
    publish(&env, &long).await;
    let r = wait_final(&env, &long).await;
    assert_eq!(r.status, DeliveryStatus::Sent, "{r:?}");
    let sms = sns.sms().await;
    let clipped = sms.iter().find(|s| s.message.starts_with('é')).unwrap();
    assert_eq!(clipped.message.chars().count(), 1_600);
    assert!(clipped.message.ends_with('…'));
}

#[tokio::test]
async fn no_contact_or_no_provider_is_skipped_with_the_reason() {
    let smtp = SmtpPeer::start().await;
    // Email configured, SNS not.
    let env = env_with(smtp.provider_config(), 6).await;
    set_contacts(&env, "fay", json!({"phone": "+447700900123"})).await;
    let no_email = job("fay", DeliveryChannel::Email, text("a", "b"));
    let no_sns = job("fay", DeliveryChannel::Sms, text("a", "b"));
    let no_device = job("fay", DeliveryChannel::Push, text("a", "b"));
    for j in [&no_email, &no_sns, &no_device] {
        publish(&env, j).await;
    }
    let r = wait_final(&env, &no_email).await;
    assert_eq!(r.status, DeliveryStatus::SkippedNoAddress);
    assert!(
        r.error.as_deref().unwrap().contains("no email address"),
        "{r:?}"
    );
    let r = wait_final(&env, &no_sns).await;
    assert_eq!(r.status, DeliveryStatus::SkippedNoAddress);
    assert!(
        r.error.as_deref().unwrap().contains("not configured"),
        "{r:?}"
    );
    let r = wait_final(&env, &no_device).await;
    assert_eq!(r.status, DeliveryStatus::SkippedNoAddress);
    assert!(smtp.messages().is_empty());
    // A malformed job is dead-lettered, not retried.
    let bad = Outgoing {
        subject: "notify.deliver.email.fay".into(),
        msg_id: "not-a-job".into(),
        payload: bytes::Bytes::from_static(b"{\"jobId\": 1}"),
    };
    jetstream::publish(&env.state.js, bad).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while dead_letters(&env).await == 0 {
        assert!(Instant::now() < deadline, "no dead-letter copy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn devices_of(env: &TestEnv, user: &str) -> Vec<Value> {
    let (status, prefs) = env.get(PREFS, &env.token(user)).await;
    assert_eq!(status, StatusCode::OK);
    prefs["devices"].as_array().unwrap().clone()
}

#[tokio::test]
async fn push_reaches_every_registered_device_and_a_disabled_endpoint_removes_the_device() {
    let sns = SnsPeer::start().await;
    let app = sns.create_platform_application("inkwire", "GCM").await;
    let env = env_with(sns.provider_config(Some(&app)), 6).await;
    let token = env.token("gus");
    let (status, phone) = env
        .post(
            DEVICES,
            &token,
            &json!({"token": "tok-phone", "platform": "gcm"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{phone}");
    let (status, tablet) = env
        .post(
            DEVICES,
            &token,
            &json!({"token": "tok-tablet", "platform": "fcm", "deviceId": "tablet"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{tablet}");
    let phone_arn = phone["endpointArn"].as_str().unwrap().to_string();
    let tablet_arn = tablet["endpointArn"].as_str().unwrap().to_string();

    let mut content = text("Review ready", "Chapter 4 was reviewed");
    content.push = Some(inkwire_notifications::send::PushPayload {
        title: "Review".into(),
        body: "Chapter 4".into(),
        data: json!({"deepLink": "/d/4"}),
    });
    let first = job("gus", DeliveryChannel::Push, content);
    publish(&env, &first).await;
    let r = wait_final(&env, &first).await;
    assert_eq!(r.status, DeliveryStatus::Sent, "{r:?}");
    for arn in [&phone_arn, &tablet_arn] {
        let messages = sns.endpoint_messages(arn).await;
        assert_eq!(messages.len(), 1, "{arn}: {messages:?}");
        let m: Value = serde_json::from_str(&messages[0].1).unwrap();
        let gcm: Value = serde_json::from_str(m["GCM"].as_str().unwrap()).unwrap();
        assert_eq!(gcm["notification"]["title"], "Review");
        assert_eq!(gcm["data"]["deepLink"], "/d/4");
        assert_eq!(
            gcm["data"]["notificationId"],
            first.notification_ids[0].to_string()
        );
    }

    // The platform disabled the phone's endpoint: the tablet still gets it, the phone is
    // removed (from inkwire and from SNS).
    sns.set_endpoint_enabled(&phone_arn, false).await;
    let second = job("gus", DeliveryChannel::Push, text("Again", "second"));
    publish(&env, &second).await;
    let r = wait_final(&env, &second).await;
    assert_eq!(r.status, DeliveryStatus::Sent, "{r:?}");
    assert_eq!(sns.endpoint_messages(&tablet_arn).await.len(), 2);
    assert_eq!(sns.endpoint_messages(&phone_arn).await.len(), 1);
    let devices = devices_of(&env, "gus").await;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0]["id"], "tablet");
    assert_eq!(sns.live_endpoints(&app).await, vec![tablet_arn.clone()]);

    // The last device disabled too: failed (not retried), device removed; then nothing left.
    sns.set_endpoint_enabled(&tablet_arn, false).await;
    let third = job("gus", DeliveryChannel::Push, text("Third", "x"));
    publish(&env, &third).await;
    let r = wait_final(&env, &third).await;
    assert_eq!(r.status, DeliveryStatus::Failed, "{r:?}");
    assert_eq!(r.attempts, 1);
    assert!(
        r.error.as_deref().unwrap().contains("EndpointDisabled"),
        "{r:?}"
    );
    assert!(devices_of(&env, "gus").await.is_empty());
    let failed = events(&env, "notification_failed", third.notification_ids[0]).await;
    assert_eq!(failed.len(), 1);
    let fourth = job("gus", DeliveryChannel::Push, text("Fourth", "x"));
    publish(&env, &fourth).await;
    let r = wait_final(&env, &fourth).await;
    assert_eq!(r.status, DeliveryStatus::SkippedNoAddress);
}

#[tokio::test]
async fn devices_register_idempotently_unregister_and_refuse_bad_input() {
    let sns = SnsPeer::start().await;
    let app = sns.create_platform_application("inkwire", "GCM").await;
    let env = env_with(sns.provider_config(Some(&app)), 6).await;
    let hal = env.token("hal");
    let (status, first) = env
        .post(DEVICES, &hal, &json!({"token": "tok-1", "platform": "gcm"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    for key in ["id", "platform", "endpointArn", "createdAt"] {
        assert!(first.get(key).is_some(), "{key} missing: {first}");
    }
    assert_eq!(first["platform"], "gcm");
    // The same token again is the same device.
    let (status, again) = env
        .post(DEVICES, &hal, &json!({"token": "tok-1", "platform": "gcm"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again, first);
    assert_eq!(devices_of(&env, "hal").await, vec![first.clone()]);
    let stored = sns
        .platform_endpoint(first["endpointArn"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(stored["custom_user_data"], "hal");

    // The phone signs in as another user: it is theirs now, and no longer hal's.
    let ivy = env.token("ivy");
    let (status, ivys) = env
        .post(DEVICES, &ivy, &json!({"token": "tok-1", "platform": "gcm"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(ivys["endpointArn"], first["endpointArn"]);
    assert!(devices_of(&env, "hal").await.is_empty());

    // Another user's device is not found; then its owner deletes it: gone from SNS too.
    let path = format!("{DEVICES}/{}", ivys["id"].as_str().unwrap());
    let (status, _) = env.delete(&path, &hal).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = env.delete(&path, &ivy).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(devices_of(&env, "ivy").await.is_empty());
    assert!(sns.live_endpoints(&app).await.is_empty());
    let (status, _) = env.delete(&path, &ivy).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env.delete(&format!("{DEVICES}/a.b"), &ivy).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Bad input.
    for (body, pointer) in [
        (json!({"platform": "gcm"}), "/token"),
        (json!({"token": "t", "platform": "fax"}), "/platform"),
        (json!({"token": "", "platform": "gcm"}), "/token"),
        (json!({"token": "a b", "platform": "gcm"}), "/token"),
        (
            json!({"token": "t", "platform": "gcm", "deviceId": "a.b"}),
            "/deviceId",
        ),
        (
            json!({"token": "t", "platform": "gcm", "extra": 1}),
            "/extra",
        ),
    ] {
        let (status, p) = env.post(DEVICES, &hal, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {p}");
        assert_eq!(p["code"], "validation_failed");
        assert!(
            p["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["pointer"] == pointer),
            "{body}: {p}"
        );
    }
    let (status, p) = env
        .post(DEVICES, &hal, &json!({"token": "t", "platform": "apns"}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    assert_eq!(p["code"], "unsupported_platform");
    assert!(p["detail"].as_str().unwrap().contains("GCM"), "{p}");
    let (status, _) = env
        .post(
            DEVICES,
            "not-a-token",
            &json!({"token": "t", "platform": "gcm"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(devices_of(&env, "hal").await.is_empty());
}

#[tokio::test]
async fn without_sns_devices_cannot_be_registered() {
    let env = TestEnv::start().await;
    let token = env.token("jo");
    let (status, p) = env
        .post(DEVICES, &token, &json!({"token": "t", "platform": "gcm"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{p}");
    assert_eq!(p["code"], "provider_not_configured");
    assert!(p["detail"].as_str().unwrap().contains("INKWIRE_SNS"), "{p}");
    assert!(devices_of(&env, "jo").await.is_empty());
}
