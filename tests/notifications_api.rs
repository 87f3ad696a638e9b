//! The notifications send API, templates, scheduled sends and the delivery log, against real
//! nats-server and redis-server: what a send publishes to the NOTIFY stream (subjects, ids,
//! rendered text), bulk limits, idempotency, every kind of bad input, who may send to whom,
//! template CRUD, cancelling scheduled sends, and who may read a delivery log.

use std::collections::BTreeSet;

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_notifications::delivery_log::{self, AttemptInfo};
use inkwire_notifications::model::{DeliveryChannel, DeliveryStatus};
use inkwire_notifications::send::{Notification, notifications_of};
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{TestEnv, json};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;
use uuid::Uuid;

const SEND: &str = "/api/realtime/notifications/send";

fn template_path(name: &str) -> String {
    format!("/api/realtime/notifications/templates/{name}")
}

/// The send jobs stored in NOTIFY: (subject, notification).
async fn jobs(env: &TestEnv) -> Vec<(String, Notification)> {
    let stored = read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.send.>".into(),
        DeliverPolicy::All,
        10_000,
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    for s in stored {
        for n in notifications_of(&s.subject, &s.payload).unwrap() {
            out.push((s.subject.clone(), n));
        }
    }
    out
}

/// How many recipients' notifications NOTIFY holds (a bulk job holds several).
async fn job_count(env: &TestEnv) -> u64 {
    jobs(env).await.len() as u64
}

async fn send_keyed(
    env: &TestEnv,
    token: &str,
    key: Option<&str>,
    body: &Value,
) -> (StatusCode, Value, HeaderMap) {
    let mut req = env.http.post(env.url(SEND)).bearer_auth(token).json(body);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    env.send(req).await
}

fn ids_of(answer: &Value) -> Vec<(String, String)> {
    answer["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["userId"].as_str().unwrap().to_string(),
                n["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn book_template() -> Value {
    json!({
        "title": "{{ book }} is published",
        "body": "Your book {{ book }} is live, {{ name }}.",
        "email": {"subject": "{{ book }} is live", "html": "<p>{{ book }}</p>", "text": "{{ book }}"},
        "sms": "{{ book }} is live",
        "push": {"title": "Published", "body": "{{ book }}"}
    })
}

#[tokio::test]
async fn a_send_publishes_one_rendered_job_per_recipient() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let (status, body) = env
        .put(&template_path("book-published"), &svc, &book_template())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, answer, _) = send_keyed(
        &env,
        &svc,
        None,
        &json!({"userIds": ["ann", "bob", "cy"], "category": "publishing", "priority": "medium",
            "template": "book-published", "data": {"book": "<Winter & Light>", "name": "friend"},
            "groupKey": "book-7", "channels": ["in_app", "email"]}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["scheduled"], false);
    let sent = ids_of(&answer);
    assert_eq!(
        sent.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(),
        ["ann", "bob", "cy"]
    );
    let stored = jobs(&env).await;
    assert_eq!(stored.len(), 3);
    // Several recipients: one bulk job, stored once, on the subject of the send's event.
    assert_eq!(env.stream_messages("NOTIFY").await, 1);
    let bulk = &stored[0].0;
    assert!(bulk.starts_with("notify.send.bulk."), "{bulk}");
    for ((subject, n), (user, id)) in stored.iter().zip(&sent) {
        assert_eq!(subject, bulk);
        assert_eq!(n.push.as_ref().unwrap().data["notificationId"], json!(id));
        assert_eq!(&n.user_id, user);
        assert_eq!(&n.id.to_string(), id);
        assert_eq!(n.title, "<Winter & Light> is published");
        assert_eq!(n.body, "Your book <Winter & Light> is live, friend.");
        let email = n.email.as_ref().unwrap();
        assert_eq!(email.html, "<p>&lt;Winter &amp; Light&gt;</p>");
        assert_eq!(email.text, "<Winter & Light>");
        assert_eq!(n.sms.as_deref(), Some("<Winter & Light> is live"));
        assert_eq!(n.push.as_ref().unwrap().body, "<Winter & Light>");
        assert_eq!(n.template.as_deref(), Some("book-published"));
        assert_eq!(n.group_key.as_deref(), Some("book-7"));
        assert_eq!(n.sender, "svc");
        assert_eq!(
            n.channels,
            Some(vec![DeliveryChannel::InApp, DeliveryChannel::Email])
        );
    }
    // Distinct ids; every recipient's job has the same creation time.
    let ids: BTreeSet<_> = stored.iter().map(|(_, n)| n.id).collect();
    assert_eq!(ids.len(), 3);

    // The title + body form carries the text as it is.
    let (status, answer, _) = send_keyed(
        &env,
        &svc,
        None,
        &json!({"userId": "ann", "category": "system", "priority": "critical",
            "title": "Maintenance", "body": "Tonight at 22:00"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let stored = jobs(&env).await;
    assert_eq!(stored.len(), 4);
    let last = &stored[3].1;
    assert_eq!(
        (last.title.as_str(), last.body.as_str()),
        ("Maintenance", "Tonight at 22:00")
    );
    assert!(last.email.is_none() && last.template.is_none());
}

#[tokio::test]
async fn bulk_sends_take_1000_recipients_and_refuse_1001() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let users: Vec<String> = (0..1000).map(|i| format!("u-{i}")).collect();
    let (status, answer, _) = send_keyed(
        &env,
        &svc,
        None,
        &json!({"userIds": users, "category": "system", "priority": "low", "title": "Hello", "body": "all"}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(ids_of(&answer).len(), 1000);
    assert_eq!(job_count(&env).await, 1000);
    let stored = jobs(&env).await;
    let recipients: BTreeSet<_> = stored.iter().map(|(_, n)| n.user_id.clone()).collect();
    assert_eq!(recipients.len(), 1000);
    assert!(recipients.contains("u-999"));
    // One stored message for the whole send.
    assert_eq!(env.stream_messages("NOTIFY").await, 1);
    let ids: BTreeSet<_> = stored.iter().map(|(_, n)| n.id).collect();
    assert_eq!(ids.len(), 1000);

    let users: Vec<String> = (0..1001).map(|i| format!("u-{i}")).collect();
    let (status, problem, _) = send_keyed(
        &env,
        &svc,
        None,
        &json!({"userIds": users, "category": "system", "priority": "low", "title": "Hello", "body": "all"}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["code"], "validation_failed");
    assert_eq!(problem["errors"][0]["pointer"], "/userIds");
    assert_eq!(problem["errors"][0]["rule"], "maxItems");
    assert_eq!(job_count(&env).await, 1000);
}

#[tokio::test]
async fn the_same_key_sends_once_and_a_different_body_is_a_conflict() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let body = json!({"userIds": ["ann", "bob"], "category": "chat", "priority": "high",
        "title": "New message", "body": "Hi"});
    let (s1, a1, h1) = send_keyed(&env, &svc, Some("send-1"), &body).await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{a1}");
    assert!(!h1.contains_key("idempotent-replayed"));
    let (s2, a2, h2) = send_keyed(&env, &svc, Some("send-1"), &body).await;
    assert_eq!(s2, StatusCode::ACCEPTED, "{a2}");
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(ids_of(&a1), ids_of(&a2));
    assert_eq!(job_count(&env).await, 2);
    // The body's idempotencyKey is the same key.
    let mut with_id = body.clone();
    with_id["idempotencyKey"] = json!("send-2");
    let (s3, a3, _) = send_keyed(&env, &svc, None, &with_id).await;
    let (s4, a4, _) = send_keyed(&env, &svc, None, &with_id).await;
    assert_eq!((s3, s4), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(ids_of(&a3), ids_of(&a4));
    assert_ne!(ids_of(&a1), ids_of(&a3));
    assert_eq!(job_count(&env).await, 4);
    // Same key, different body.
    let mut other = body.clone();
    other["body"] = json!("Hello");
    let (s, problem, _) = send_keyed(&env, &svc, Some("send-1"), &other).await;
    assert_eq!(s, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "idempotency_key_reused");
    assert_eq!(problem["status"], 409);
    // Header and body key that differ.
    let (s, problem, _) = send_keyed(&env, &svc, Some("other"), &with_id).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["code"], "idempotency_key_mismatch");
    // Without a key, every send is new.
    let (_, a5, _) = send_keyed(&env, &svc, None, &body).await;
    let (_, a6, _) = send_keyed(&env, &svc, None, &body).await;
    assert_ne!(ids_of(&a5), ids_of(&a6));
    assert_eq!(job_count(&env).await, 8);
}

#[tokio::test]
async fn bad_sends_are_refused_with_what_is_wrong_and_publish_nothing() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let (status, body) = env
        .put(&template_path("book-published"), &svc, &book_template())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let base =
        json!({"userId": "ann", "category": "chat", "priority": "high", "title": "t", "body": "b"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    for (body, pointer) in [
        (with("priority", json!("urgent")), "/priority"),
        (with("category", json!("poetry")), "/category"),
        (with("title", json!("x".repeat(201))), "/title"),
        (with("body", json!("x".repeat(10_001))), "/body"),
        (with("channels", json!(["fax"])), "/channels/0"),
        (with("userId", json!("a.b")), "/userId"),
        (with("groupKey", json!("a b")), "/groupKey"),
        (with("template", json!("book-published")), "/template"),
    ] {
        let (status, problem, _) = send_keyed(&env, &svc, None, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {problem}");
        assert_eq!(problem["code"], "validation_failed", "{problem}");
        assert!(
            problem["errors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["pointer"] == pointer),
            "{pointer}: {problem}"
        );
    }
    // sendAt in the past.
    let (status, problem, _) = send_keyed(
        &env,
        &svc,
        None,
        &with("sendAt", json!("2020-01-01T00:00:00Z")),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["code"], "send_at_in_past");
    // A template variable the data lacks is named, with its part.
    let templated = json!({"userId": "ann", "category": "publishing", "priority": "medium",
        "template": "book-published", "data": {"book": "Winter"}});
    let (status, problem, _) = send_keyed(&env, &svc, None, &templated).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["code"], "template_variable_missing");
    assert_eq!(problem["variable"], "name");
    assert_eq!(problem["part"], "body");
    assert!(problem["detail"].as_str().unwrap().contains("\"name\""));
    // An unknown template.
    let mut unknown = templated.clone();
    unknown["template"] = json!("nope");
    let (status, problem, _) = send_keyed(&env, &svc, None, &unknown).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["code"], "unknown_template");
    assert_eq!(job_count(&env).await, 0);
    // The same send with the variable goes out.
    let mut ok = templated.clone();
    ok["data"]["name"] = json!("Ada");
    let (status, answer, _) = send_keyed(&env, &svc, None, &ok).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(jobs(&env).await[0].1.body, "Your book Winter is live, Ada.");
}

#[tokio::test]
async fn who_may_send_to_whom() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "olga", ProjectRole::Owner).await;
    env.add_member("p-1", "rita", ProjectRole::Reader).await;
    env.add_member("p-1", "ed", ProjectRole::Editor).await;
    env.add_member("p-2", "zed", ProjectRole::Owner).await;
    let body = |users: &[&str], project: Option<&str>| {
        let mut b = json!({"userIds": users, "category": "collaboration", "priority": "high",
            "title": "Review", "body": "Chapter 3 is ready"});
        if let Some(p) = project {
            b["projectId"] = json!(p);
        }
        b
    };
    let olga = env.token("olga");
    let rita = env.token("rita");
    let (svc, admin) = (env.service_token(), env.admin_token());
    let cases: Vec<(&str, Value, StatusCode)> = vec![
        // Anyone to themselves.
        (&rita, body(&["rita"], None), StatusCode::ACCEPTED),
        // A reader to someone else: no project, then not the owner.
        (&rita, body(&["ed"], None), StatusCode::FORBIDDEN),
        (&rita, body(&["ed"], Some("p-1")), StatusCode::FORBIDDEN),
        // The owner to members, with the project named.
        (
            &olga,
            body(&["rita", "ed", "olga"], Some("p-1")),
            StatusCode::ACCEPTED,
        ),
        (&olga, body(&["rita"], None), StatusCode::FORBIDDEN),
        // The owner to a non-member, and to members of a project she does not own.
        (
            &olga,
            body(&["rita", "zed"], Some("p-1")),
            StatusCode::FORBIDDEN,
        ),
        (&olga, body(&["zed"], Some("p-2")), StatusCode::FORBIDDEN),
        // The service and admin roles to anyone.
        (&svc, body(&["zed", "nobody"], None), StatusCode::ACCEPTED),
        (&admin, body(&["nobody"], None), StatusCode::ACCEPTED),
    ];
    let mut published = 0;
    for (token, b, want) in cases {
        let (status, answer, _) = send_keyed(&env, token, None, &b).await;
        assert_eq!(status, want, "{b}: {answer}");
        if status == StatusCode::ACCEPTED {
            published += b["userIds"].as_array().unwrap().len() as u64;
        } else {
            assert_eq!(answer["code"], "forbidden");
        }
    }
    // The first non-member is named.
    let (_, problem, _) = send_keyed(&env, &olga, None, &body(&["rita", "zed"], Some("p-1"))).await;
    assert_eq!(problem["userId"], "zed", "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("\"zed\""));
    assert_eq!(job_count(&env).await, published);
    // No token at all.
    let (status, _) = env.post(SEND, "", &body(&["rita"], None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn templates_are_checked_when_saved_and_only_the_back_end_manages_them() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let admin = env.admin_token();
    let path = template_path("welcome.v2");
    let t = json!({"title": "Welcome {{ name }}", "body": "Glad you are here."});
    let (status, body) = env.put(&path, &svc, &t).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = env.put(&path, &admin, &t).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = env.get(&path, &svc).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["template"], t);
    assert_eq!(body["name"], "welcome.v2");
    // Users may not manage templates.
    let user = env.token("u-1");
    assert_eq!(env.put(&path, &user, &t).await.0, StatusCode::FORBIDDEN);
    assert_eq!(env.get(&path, &user).await.0, StatusCode::FORBIDDEN);
    assert_eq!(env.delete(&path, &user).await.0, StatusCode::FORBIDDEN);
    // A part that does not parse is named with minijinja's message and line.
    let broken = json!({"title": "ok", "body": "fine",
        "email": {"subject": "s", "html": "<p>\n{{ name </p>", "text": "t"}});
    let (status, problem) = env.put(&template_path("broken"), &svc, &broken).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(problem["code"], "template_invalid");
    assert_eq!(problem["part"], "email.html");
    assert_eq!(problem["line"], 2);
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("syntax error")
    );
    assert_eq!(
        env.get(&template_path("broken"), &svc).await.0,
        StatusCode::NOT_FOUND
    );
    // Unknown fields and bad names.
    let (status, problem) = env
        .put(
            &template_path("x"),
            &svc,
            &json!({"title": "t", "body": "b", "html": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["errors"][0]["pointer"], "/html");
    let (status, problem) = env.put(&template_path("Bad_Name"), &svc, &t).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(problem["code"], "invalid_id");
    // Delete, then it is gone.
    let (status, _) = env.delete(&path, &svc).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(env.get(&path, &svc).await.0, StatusCode::NOT_FOUND);
    assert_eq!(env.delete(&path, &svc).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn scheduled_sends_can_be_cancelled_until_they_are_sent() {
    let env = TestEnv::start().await;
    let ann = env.token("ann");
    let at = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (status, answer, _) = send_keyed(
        &env,
        &ann,
        None,
        &json!({"userId": "ann", "category": "writing", "priority": "low",
            "title": "Write!", "body": "Your daily session", "sendAt": at}),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["scheduled"], true);
    let id = ids_of(&answer)[0].1.clone();
    let job = &jobs(&env).await[0].1;
    assert_eq!(
        job.send_at.unwrap().unix_timestamp(),
        time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339)
            .unwrap()
            .unix_timestamp()
    );
    let path = format!("/api/realtime/notifications/scheduled/{id}");
    // Not the sender: as if it did not exist.
    let (status, problem) = env.delete(&path, &env.token("bob")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    // The sender cancels; cancelling again is answered the same.
    let (status, body) = env.delete(&path, &ann).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled");
    let (status, body) = env.delete(&path, &ann).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The sender may read its (empty) delivery log; others may not.
    let deliveries = format!("/api/realtime/notifications/{id}/deliveries");
    let (status, body) = env.get(&deliveries, &ann).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["deliveries"], json!([]));
    assert_eq!(
        env.get(&deliveries, &env.token("bob")).await.0,
        StatusCode::NOT_FOUND
    );

    // A second scheduled send, which the scheduler marks sent: too late to cancel.
    let (_, answer, _) = send_keyed(
        &env,
        &env.service_token(),
        None,
        &json!({"userId": "ann", "category": "writing", "priority": "low",
            "title": "Later", "body": "b", "sendAt": at}),
    )
    .await;
    let sent_id = ids_of(&answer)[0].1.clone();
    let key = format!("inkwire:notify:scheduled:{sent_id}");
    let mut redis = env.state.redis.clone();
    let raw: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut record: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(record["state"], "pending");
    assert_eq!(record["sender"], "svc");
    assert_eq!(record["userId"], "ann");
    record["state"] = json!("sent");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(record.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
    let path = format!("/api/realtime/notifications/scheduled/{sent_id}");
    let (status, problem) = env.delete(&path, &env.service_token()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "scheduled_already_sent");
    // Unknown and malformed ids.
    for bad in [Uuid::now_v7().to_string(), "not-a-uuid".into()] {
        let (status, _) = env
            .delete(
                &format!("/api/realtime/notifications/scheduled/{bad}"),
                &ann,
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn the_delivery_log_keeps_final_statuses_and_is_shown_to_the_parties() {
    let env = TestEnv::start().await;
    let ann = env.token("ann");
    // Stored in olga's inbox the way the notifier does it (built here rather than sent: the
    // running notifier would write its own records for a sent one).
    let n: Notification = serde_json::from_value(json!({
        "id": Uuid::now_v7(), "userId": "olga", "category": "system", "priority": "high",
        "title": "t", "body": "b", "createdAt": "2026-11-22T12:00:00Z", "sender": "olga"
    }))
    .unwrap();
    let mut redis = env.state.redis.clone();
    inkwire_notifications::inbox::add(&mut redis, &env.state.js, &n, 1000)
        .await
        .unwrap();
    let id = n.id;
    let info = |attempts: u32, error: Option<&str>, provider: Option<&str>| AttemptInfo {
        attempts: Some(attempts),
        error: error.map(str::to_string),
        provider_message_id: provider.map(str::to_string),
    };
    let email = DeliveryChannel::Email;
    let (applied, r) = delivery_log::record(
        &mut redis,
        id,
        email,
        DeliveryStatus::Queued,
        &info(0, None, None),
    )
    .await
    .unwrap();
    assert!(applied);
    assert_eq!(r.status, DeliveryStatus::Queued);
    delivery_log::record(
        &mut redis,
        id,
        email,
        DeliveryStatus::Queued,
        &info(1, Some("421 try later"), None),
    )
    .await
    .unwrap();
    let (applied, r) = delivery_log::record(
        &mut redis,
        id,
        email,
        DeliveryStatus::Sent,
        &info(2, None, Some("<m-1@mail>")),
    )
    .await
    .unwrap();
    assert!(applied);
    assert_eq!((r.attempts, r.error.as_deref()), (2, None));
    // A late duplicate cannot undo `sent`.
    let (applied, r) = delivery_log::record(
        &mut redis,
        id,
        email,
        DeliveryStatus::Queued,
        &info(1, None, None),
    )
    .await
    .unwrap();
    assert!(!applied);
    assert_eq!(r.status, DeliveryStatus::Sent);
    delivery_log::record(
        &mut redis,
        id,
        DeliveryChannel::Sms,
        DeliveryStatus::SkippedNoAddress,
        &AttemptInfo::default(),
    )
    .await
    .unwrap();

    let path = format!("/api/realtime/notifications/{id}/deliveries");
    for token in [env.token("olga"), env.service_token(), env.admin_token()] {
        let (status, body) = env.get(&path, &token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let d = body["deliveries"].as_array().unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0]["channel"], "email");
        assert_eq!(d[0]["status"], "sent");
        assert_eq!(d[0]["attempts"], 2);
        assert_eq!(d[0]["providerMessageId"], "<m-1@mail>");
        let history: Vec<&str> = d[0]["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["status"].as_str().unwrap())
            .collect();
        assert_eq!(history, ["queued", "queued", "sent"]);
        assert_eq!(d[0]["history"][1]["error"], "421 try later");
        assert_eq!(d[1]["channel"], "sms");
        assert_eq!(d[1]["status"], "skipped_no_address");
    }
    // Anyone else: as if it did not exist.
    let (status, problem) = env.get(&path, &ann).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (status, _) = env
        .get(
            &format!("/api/realtime/notifications/{}/deliveries", Uuid::now_v7()),
            &env.service_token(),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_unacknowledged_send_lists_every_recipient_and_its_retry_publishes_once() {
    let env =
        TestEnv::start_with(|c| c.publish_timeout = std::time::Duration::from_millis(1000)).await;
    let svc = env.service_token();
    let users: Vec<String> = (0..50).map(|i| format!("u-{i}")).collect();
    let body = json!({"userIds": users, "category": "system", "priority": "high",
        "title": "Hello", "body": "all"});
    // nats-server frozen: the jobs reach its socket and are stored when it continues, long
    // after their acks timed out.
    env.stop_nats();
    let (status, problem, headers) = send_keyed(&env, &svc, None, &body).await;
    env.continue_nats();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(problem["code"], "outcome_unknown", "{problem}");
    assert!(headers.contains_key("retry-after"));
    let items = problem["items"].as_array().unwrap();
    assert_eq!(items.len(), 50);
    for (item, user) in items.iter().zip(&users) {
        assert_eq!(&item["userId"], user);
        assert!(["unknown", "not_stored", "stored"].contains(&item["outcome"].as_str().unwrap()));
    }
    let retry_id = problem["retryId"].as_str().unwrap().to_string();
    // The retry with retryId names the same notifications; what was stored is not doubled.
    let (status, answer, _) = send_keyed(&env, &svc, Some(&retry_id), &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let retried: Vec<String> = ids_of(&answer).into_iter().map(|(_, id)| id).collect();
    let first: Vec<String> = items
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(retried, first);
    assert_eq!(job_count(&env).await, 50);
    // One bulk job: every recipient had the same outcome, and it is stored once.
    let outcomes: BTreeSet<_> = items.iter().map(|i| i["outcome"].to_string()).collect();
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(env.stream_messages("NOTIFY").await, 1);
}

const PREFERENCES: &str = "/api/realtime/notifications/preferences";

#[tokio::test]
async fn preferences_default_replace_refuse_every_bad_field_and_show_devices() {
    let env = TestEnv::start().await;
    let ada = env.token("ada");
    // Defaults, with every known category listed.
    let (status, prefs) = env.get(PREFERENCES, &ada).await;
    assert_eq!(status, StatusCode::OK, "{prefs}");
    assert_eq!(prefs["timeZone"], "UTC");
    assert_eq!(
        prefs["quietHours"],
        json!({"enabled": true, "start": "22:00", "end": "08:00"})
    );
    assert_eq!(prefs["muteWindowSeconds"], 3600);
    assert_eq!(prefs["categories"].as_object().unwrap().len(), 8);
    assert_eq!(prefs["categories"]["chat"]["channels"]["sms"], true);
    assert_eq!(prefs["devices"], json!([]));

    let doc = json!({
      "timeZone": "Europe/London",
      "quietHours": {"enabled": true, "start": "23:00", "end": "07:30"},
      "categories": {
        "collaboration": {"channels": {"in_app": true, "email": true, "sms": false, "push": true},
                          "digest": {"frequency": "daily", "at": "08:00"}},
        "publishing": {"digest": {"frequency": "weekly", "weekday": "monday", "at": "09:00"}}
      },
      "muteWindowSeconds": 600,
      "contacts": {"email": "ada@example.com", "phone": "+447700900123"}
    });
    let (status, saved) = env.put(PREFERENCES, &ada, &doc).await;
    assert_eq!(status, StatusCode::OK, "{saved}");
    let (_, read) = env.get(PREFERENCES, &ada).await;
    assert_eq!(read, saved);
    assert_eq!(read["timeZone"], "Europe/London");
    assert_eq!(read["quietHours"]["end"], "07:30");
    assert_eq!(
        read["categories"]["collaboration"]["channels"]["sms"],
        false
    );
    assert_eq!(
        read["categories"]["collaboration"]["digest"]["frequency"],
        "daily"
    );
    assert_eq!(
        read["categories"]["publishing"]["digest"]["weekday"],
        "monday"
    );
    assert_eq!(read["muteWindowSeconds"], 600);
    assert_eq!(read["contacts"]["phone"], "+447700900123");
    // Someone else's are untouched.
    let (_, other) = env.get(PREFERENCES, &env.token("bob")).await;
    assert_eq!(other["timeZone"], "UTC");

    // Every bad field is listed; nothing is stored.
    let bad = json!({
      "timeZone": "Mars/Olympus",
      "quietHours": {"start": "25:00", "end": "7:5"},
      "categories": {"poetry": {}},
      "contacts": {"email": "not-an-address", "phone": "07700900123"},
      "colour": "blue"
    });
    let (status, problem) = env.put(PREFERENCES, &ada, &bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["code"], "invalid_preferences");
    let pointers: BTreeSet<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    for p in [
        "/timeZone",
        "/quietHours/start",
        "/quietHours/end",
        "/categories/poetry",
        "/contacts/email",
        "/contacts/phone",
        "/colour",
    ] {
        assert!(pointers.contains(p), "{p} missing from {problem}");
    }
    let (_, read) = env.get(PREFERENCES, &ada).await;
    assert_eq!(read, saved);

    // Devices kept beside the preferences are shown, and a PUT cannot change them.
    let mut redis = env.state.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg("inkwire:notify:devices:ada")
        .arg("dev-1")
        .arg(
            json!({"id": "dev-1", "platform": "apns",
            "endpointArn": "arn:aws:sns:eu-west-1:123456789012:endpoint/APNS/app/1",
            "createdAt": "2026-11-22T12:00:00Z"})
            .to_string(),
        )
        .query_async(&mut redis)
        .await
        .unwrap();
    let (_, read) = env.get(PREFERENCES, &ada).await;
    assert_eq!(read["devices"][0]["id"], "dev-1");
    assert_eq!(read["devices"][0]["platform"], "apns");
    let mut round_trip = read.clone();
    round_trip["devices"] = json!([]);
    let (status, after) = env.put(PREFERENCES, &ada, &round_trip).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["devices"][0]["id"], "dev-1");
}
