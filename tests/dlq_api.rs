//! The dead-letter queue API with real dead letters: one written by the consumer runner for
//! an event a consumer refuses, others published straight to `dlq.>` as the runner does.
//! Listing in pages, replaying (the consumer gets the event again; a retried replay stores
//! one copy and answers the same), discarding, and who may do it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use bytes::Bytes;
use inkwire_shared::consumer::{ConsumerSpec, Delivery, HandlerError, ShutdownTrigger, run};
use inkwire_shared::subjects::dlq_headers;
use inkwire_tests::{TestEnv, json};
use reqwest::StatusCode;
use serde_json::Value;

const EVENT_ID: &str = "0191f2a4-5b6c-7d8e-9f00-112233445566";

async fn publish_event(env: &TestEnv) {
    let (status, body) = env
        .post(
            "/api/realtime/events/publish",
            &env.service_token(),
            &json!({
                "id": EVENT_ID,
                "category": "system",
                "type": "service_started",
                "userId": "svc",
                "data": {"service": "demo"}
            }),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// A dead letter as `shared::consumer` writes it, published straight to `dlq.<subject>`.
async fn publish_dead_letter(env: &TestEnv, subject: &str, payload: &[u8], msg_id: &str) -> u64 {
    let mut headers = HeaderMap::new();
    headers.insert(dlq_headers::REASON, "permanent: test");
    headers.insert(dlq_headers::STREAM, "EVENTS_SYSTEM");
    headers.insert(dlq_headers::SEQUENCE, "99");
    headers.insert(dlq_headers::CONSUMER, "by-hand");
    headers.insert(dlq_headers::DELIVERIES, "5");
    headers.insert(dlq_headers::SUBJECT, subject);
    env.state
        .js
        .send_publish(
            format!("dlq.{subject}"),
            PublishMessage::build()
                .payload(Bytes::copy_from_slice(payload))
                .headers(headers)
                .message_id(msg_id),
        )
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence
}

async fn list(env: &TestEnv, query: &str) -> Value {
    let (status, body) = env
        .get(&format!("/api/realtime/dlq{query}"), &env.admin_token())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_refused_event_is_listed_replayed_to_its_consumer_and_gone() {
    let env = TestEnv::start().await;
    // A consumer that refuses the event the first time and accepts it afterwards.
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let log = seen.clone();
    let mut spec = ConsumerSpec::new("EVENTS_SYSTEM", "picky").filter("events.system.>");
    spec.backoff = vec![Duration::from_millis(100)];
    spec.max_deliver = 2;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let js = env.state.js.clone();
    let task = tokio::spawn(async move {
        run(
            js,
            spec,
            move |d: Delivery| {
                let log = log.clone();
                async move {
                    let first = {
                        let mut log = log.lock().unwrap();
                        log.push(d);
                        log.len() == 1
                    };
                    if first {
                        Err(HandlerError::Permanent("picky refuses it".into()))
                    } else {
                        Ok(())
                    }
                }
            },
            shutdown,
        )
        .await
    });
    publish_event(&env).await;

    let mut listed = Value::Null;
    wait_for("the dead letter", async || {
        listed = list(&env, "").await;
        listed["count"] == 1
    })
    .await;
    let letter = &listed["deadLetters"][0];
    assert_eq!(letter["subject"], "events.system.service_started");
    assert_eq!(letter["stream"], "EVENTS_SYSTEM");
    assert_eq!(letter["streamSequence"], 1);
    assert_eq!(letter["consumer"], "picky");
    assert_eq!(letter["deliveries"], 1);
    assert!(
        letter["reason"]
            .as_str()
            .unwrap()
            .contains("picky refuses it"),
        "{letter}"
    );
    assert!(letter["time"].as_str().unwrap().ends_with('Z'), "{letter}");
    assert_eq!(letter["payload"]["id"], EVENT_ID);
    assert_eq!(letter["payload"]["data"], json!({"service": "demo"}));
    assert_eq!(listed["total"], 1);
    assert!(listed.get("nextCursor").is_none());
    let seq = letter["sequence"].as_u64().unwrap();

    // Replay: the event goes back to its subject, the consumer gets it again and accepts it.
    let path = format!("/api/realtime/dlq/{seq}/replay");
    let (status, first) = env.post(&path, &env.service_token(), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(
        first,
        json!({"sequence": seq, "subject": "events.system.service_started",
               "stream": "EVENTS_SYSTEM", "replayedSequence": 2, "duplicate": false})
    );
    wait_for("the replayed delivery", async || {
        seen.lock().unwrap().len() == 2
    })
    .await;
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1].stream_sequence, 2);
        assert_eq!(seen[1].payload, seen[0].payload, "the same payload");
    }
    assert_eq!(list(&env, "").await["count"], 0, "gone from the queue");

    // A retried replay answers the same and stores nothing more.
    let (status, again) = env.post(&path, &env.service_token(), &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again, first);
    assert_eq!(env.stream_messages("EVENTS_SYSTEM").await, 2);

    trigger.trigger();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn dead_letters_are_paged_oldest_first_and_discarded() {
    let env = TestEnv::start().await;
    let mut seqs = Vec::new();
    for i in 0..5 {
        let payload = json!({"n": i}).to_string();
        seqs.push(
            publish_dead_letter(
                &env,
                "events.system.service_stopped",
                payload.as_bytes(),
                &format!("dl-{i}"),
            )
            .await,
        );
    }
    let binary =
        publish_dead_letter(&env, "events.system.service_stopped", b"\xff\x00", "dl-b").await;

    // Pages of two, oldest first.
    let page = list(&env, "?limit=2").await;
    assert_eq!(page["count"], 2);
    assert_eq!(page["total"], 6);
    assert_eq!(page["deadLetters"][0]["sequence"], seqs[0]);
    assert_eq!(page["deadLetters"][1]["payload"], json!({"n": 1}));
    assert_eq!(page["deadLetters"][1]["consumer"], "by-hand");
    assert_eq!(page["deadLetters"][1]["deliveries"], 5);
    assert_eq!(page["deadLetters"][1]["streamSequence"], 99);
    let cursor = page["nextCursor"].as_str().unwrap().to_string();
    assert_eq!(cursor, seqs[2].to_string());

    // Discarding: 204, then 404; discarded sequences are skipped by the pages.
    let admin = env.admin_token();
    let (status, body) = env
        .delete(&format!("/api/realtime/dlq/{}", seqs[2]), &admin)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = env
        .delete(&format!("/api/realtime/dlq/{}", seqs[2]), &admin)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "dead_letter_not_found");
    let page = list(&env, &format!("?limit=2&cursor={cursor}")).await;
    let got: Vec<u64> = page["deadLetters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sequence"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![seqs[3], seqs[4]]);
    let last = list(
        &env,
        &format!("?cursor={}", page["nextCursor"].as_str().unwrap()),
    )
    .await;
    assert_eq!(last["count"], 1);
    assert!(last.get("nextCursor").is_none());
    // A payload that is not JSON is shown in base64.
    assert_eq!(last["deadLetters"][0]["sequence"], binary);
    assert_eq!(last["deadLetters"][0]["payloadBase64"], "/wA=");
    assert!(last["deadLetters"][0].get("payload").is_none());

    // Bad parameters.
    for (query, code) in [
        ("?limit=0", "invalid_parameter"),
        ("?limit=1001", "invalid_parameter"),
        ("?cursor=x", "invalid_parameter"),
        ("?sort=desc", "unknown_parameter"),
    ] {
        let (status, body) = env.get(&format!("/api/realtime/dlq{query}"), &admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body["code"], code, "{query}");
    }
    for path in ["/api/realtime/dlq/abc", "/api/realtime/dlq/0"] {
        let (status, body) = env.delete(path, &admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(body["code"], "invalid_id");
    }
    let (status, body) = env
        .post("/api/realtime/dlq/9999/replay", &admin, &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "dead_letter_not_found");
}

#[tokio::test]
async fn an_empty_queue_answers_not_found() {
    // nats-server 2.9 refuses a delete from an empty stream with a generic error: it must
    // still be a 404, not a 503.
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let (status, body) = env.delete("/api/realtime/dlq/1", &svc).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "dead_letter_not_found");
    let (status, body) = env
        .post("/api/realtime/dlq/1/replay", &svc, &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn only_admin_and_service_see_the_queue() {
    let env = TestEnv::start().await;
    let seq = publish_dead_letter(&env, "events.system.service_stopped", b"{}", "dl-1").await;
    let user = env.token("alice");
    let (status, body) = env.get("/api/realtime/dlq", &user).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = env
        .post(
            &format!("/api/realtime/dlq/{seq}/replay"),
            &user,
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env.delete(&format!("/api/realtime/dlq/{seq}"), &user).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env.get("/api/realtime/dlq", "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Nothing was touched.
    assert_eq!(list(&env, "").await["count"], 1);
    let (status, _) = env.get("/api/realtime/dlq", &env.service_token()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_replay_interrupted_after_publishing_stores_one_copy() {
    let env = TestEnv::start().await;
    // A valid event: the router (running here too) must not dead-letter the replayed copy.
    let payload = json!({"id": EVENT_ID, "category": "system", "type": "service_stopped",
        "userId": "svc", "timestamp": "2026-01-01T00:00:00Z", "data": {"service": "demo"}})
    .to_string();
    let seq = publish_dead_letter(
        &env,
        "events.system.service_stopped",
        payload.as_bytes(),
        "EVENTS_SYSTEM:99:by-hand",
    )
    .await;
    // A first replay published and then crashed before removing the dead letter: its copy
    // (with the replay's message id) is already in the stream.
    env.state
        .js
        .send_publish(
            "events.system.service_stopped",
            PublishMessage::build()
                .payload(Bytes::from(payload.clone()))
                .message_id("dlq-replay:EVENTS_SYSTEM:99:by-hand"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let before = env.stream_messages("EVENTS_SYSTEM").await;

    let (status, body) = env
        .post(
            &format!("/api/realtime/dlq/{seq}/replay"),
            &env.admin_token(),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["duplicate"], true);
    assert_eq!(env.stream_messages("EVENTS_SYSTEM").await, before);
    assert_eq!(list(&env, "").await["count"], 0);
}

#[tokio::test]
async fn a_dead_letter_without_a_stream_to_go_back_to_is_not_replayable() {
    let env = TestEnv::start().await;
    let seq = publish_dead_letter(&env, "nowhere.at.all", b"{}", "dl-x").await;
    let (status, body) = env
        .post(
            &format!("/api/realtime/dlq/{seq}/replay"),
            &env.admin_token(),
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "dead_letter_not_replayable");
    assert_eq!(
        list(&env, "").await["count"],
        1,
        "kept for a later decision"
    );
}
