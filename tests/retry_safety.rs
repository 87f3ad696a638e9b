//! Retry safety end to end, against real nats-server and redis-server: a `503` says whether
//! the outcome is unknown, retries with the same `Idempotency-Key` (or body `id`) take
//! effect once, keys are validated, messages larger than NATS' `max_payload` are `413`
//! before anything is published, and a broadcast `id` that cannot be a NATS header is a
//! `400`, not a panic.
//!
//! An unacknowledged publish is produced for real: nats-server is frozen with SIGSTOP while
//! the request is in flight (the publish reaches the server's socket and is stored when it
//! continues, long after the ack timed out), with a short `INKWIRE_PUBLISH_TIMEOUT`.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_shared::events::Category;
use inkwire_shared::membership::ProjectRole;
use inkwire_shared::{jetstream, subjects};
use inkwire_tests::{BROADCAST, NatsOptions, START, TestEnv, json, start_session, word_added};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

const SEND_TO_USER: &str = "/api/realtime/websocket/send-to-user";
const PUBLISH: &str = "/api/realtime/events/publish";
const BATCH: &str = "/api/realtime/events/batch";

/// A keystroke batch of 12 keys.
fn batch() -> Value {
    json!({"keys": 12, "charsAdded": 11, "charsDeleted": 1, "wordsAdded": 2})
}

async fn env() -> TestEnv {
    let env = TestEnv::start_with(|c| c.publish_timeout = Duration::from_millis(1000)).await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    env.add_member("p-1", "olga", ProjectRole::Owner).await;
    env.register_document("p-1", "d-1").await;
    env
}

fn session_path(id: &str, action: &str) -> String {
    format!("/api/realtime/writing/sessions/{id}/{action}")
}

/// POST with an optional `Idempotency-Key`.
async fn post_keyed(
    env: &TestEnv,
    path: &str,
    token: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> (StatusCode, Value, HeaderMap) {
    let mut req = env.http.post(env.url(path)).bearer_auth(token);
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    req = match body {
        Some(b) => req.json(b),
        None => req,
    };
    env.send(req).await
}

/// Messages stored on `subject` of `stream`.
async fn stored_on(env: &TestEnv, stream: &str, subject: &str) -> Vec<Value> {
    jetstream::read_stream(
        &env.state.js,
        stream,
        subject.to_string(),
        DeliverPolicy::All,
        10_000,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|m| serde_json::from_slice(&m.payload).unwrap())
    .collect()
}

async fn keystroke_events(env: &TestEnv) -> Vec<Value> {
    stored_on(
        env,
        &subjects::event_stream(Category::Writing),
        &subjects::event_subject(Category::Writing, "keystroke"),
    )
    .await
}

/// Waits until the tracker has applied `keys` keystrokes to the session, then a little
/// longer, and checks that nothing more was applied.
async fn assert_keystrokes_settle_at(env: &TestEnv, token: &str, id: &str, keys: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, m) = env.get(&session_path(id, "metrics"), token).await;
        assert_eq!(status, StatusCode::OK, "{m}");
        let seen = m["keystrokes"].as_u64().unwrap();
        assert!(seen <= keys, "applied more than once: {m}");
        if seen == keys {
            break;
        }
        assert!(Instant::now() < deadline, "never applied: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, m) = env.get(&session_path(id, "metrics"), token).await;
    assert_eq!(m["keystrokes"], keys, "applied more than once: {m}");
}

fn assert_outcome_unknown(status: StatusCode, body: &Value, headers: &HeaderMap) {
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["code"], "outcome_unknown", "{body}");
    assert_eq!(
        headers["content-type"], "application/problem+json",
        "{headers:?}"
    );
    assert!(headers.contains_key("retry-after"), "{headers:?}");
}

#[tokio::test]
async fn an_unacknowledged_keystroke_is_outcome_unknown_and_its_retry_applies_once() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;

    env.stop_nats();
    let (status, body, headers) = post_keyed(
        &env,
        &session_path(&id, "keystroke"),
        &alice,
        Some("ks-1"),
        Some(&batch()),
    )
    .await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);
    assert_eq!(body["retryId"], "ks-1", "{body}");

    // The frozen server stored the batch when it continued; the retry must not add one.
    let (status, retried, _) = post_keyed(
        &env,
        &session_path(&id, "keystroke"),
        &alice,
        body["retryId"].as_str(),
        Some(&batch()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_keystrokes_settle_at(&env, &alice, &id, 12).await;
    assert_eq!(keystroke_events(&env).await.len(), 1);
}

#[tokio::test]
async fn a_keystroke_without_a_key_gets_a_retry_id_that_works() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;

    env.stop_nats();
    let (status, body, headers) = post_keyed(
        &env,
        &session_path(&id, "keystroke"),
        &alice,
        None,
        Some(&batch()),
    )
    .await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);
    let retry_id = body["retryId"].as_str().expect("a retry id").to_string();

    let (status, retried, _) = post_keyed(
        &env,
        &session_path(&id, "keystroke"),
        &alice,
        Some(&retry_id),
        Some(&batch()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_keystrokes_settle_at(&env, &alice, &id, 12).await;
}

#[tokio::test]
async fn an_unacknowledged_end_can_be_retried_after_it_was_applied() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;

    env.stop_nats();
    let (status, body, headers) =
        post_keyed(&env, &session_path(&id, "end"), &alice, Some("end-1"), None).await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);

    // The end was stored and applied meanwhile: the retry is not "a second end".
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = env.get(&session_path(&id, "metrics"), &alice).await;
        if m["state"] == "ended" {
            break;
        }
        assert!(Instant::now() < deadline, "never ended: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, retried, _) =
        post_keyed(&env, &session_path(&id, "end"), &alice, Some("end-1"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    // A different end is still refused.
    let (status, other, _) =
        post_keyed(&env, &session_path(&id, "end"), &alice, Some("end-2"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{other}");
    let ended = stored_on(
        &env,
        &subjects::event_stream(Category::Writing),
        &subjects::event_subject(Category::Writing, "session_state_changed"),
    )
    .await
    .into_iter()
    .filter(|e| e["data"]["to"] == "ended" && e["metadata"]["source"] == "api")
    .count();
    assert_eq!(ended, 1);
}

/// Waits until the tracker put the session in `state`.
async fn wait_for_state(env: &TestEnv, token: &str, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, m) = env.get(&session_path(id, "metrics"), token).await;
        if m["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "never {state}: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_retried_pause_or_resume_takes_effect_once() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    let (status, body, _) = post_keyed(
        &env,
        &session_path(&id, "keystroke"),
        &alice,
        None,
        Some(&batch()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_for_state(&env, &alice, &id, "warming_up").await;

    // A pause whose ack never came: stored anyway, and its retry, once the pause was
    // applied, is not refused as "already paused" and stores nothing more.
    env.stop_nats();
    let (status, body, headers) = post_keyed(
        &env,
        &session_path(&id, "pause"),
        &alice,
        Some("pause-1"),
        None,
    )
    .await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);
    assert_eq!(body["retryId"], "pause-1", "{body}");
    wait_for_state(&env, &alice, &id, "paused").await;
    let (status, retried, _) = post_keyed(
        &env,
        &session_path(&id, "pause"),
        &alice,
        Some("pause-1"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    let (status, second, _) =
        post_keyed(&env, &session_path(&id, "pause"), &alice, None, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a new pause: {second}");
    assert_eq!(second["code"], "invalid_transition");

    // A resume sent twice with one key: one answer, replayed, one effect.
    let resume = session_path(&id, "resume");
    let (s1, r1, h1) = post_keyed(&env, &resume, &alice, Some("resume-1"), None).await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{r1}");
    assert!(!h1.contains_key("idempotent-replayed"));
    wait_for_state(&env, &alice, &id, "warming_up").await;
    let (s2, r2, h2) = post_keyed(&env, &resume, &alice, Some("resume-1"), None).await;
    assert_eq!(s2, StatusCode::ACCEPTED, "{r2}");
    assert_eq!(r2, r1);
    assert_eq!(h2["idempotent-replayed"], "true");
    let (status, again, _) = post_keyed(&env, &resume, &alice, None, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "a new resume: {again}");

    // One pause and one resume were stored, whatever the retries.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requested: Vec<String> = stored_on(
        &env,
        &subjects::event_stream(Category::Writing),
        &subjects::event_subject(Category::Writing, "session_state_changed"),
    )
    .await
    .into_iter()
    .filter(|e| e["metadata"]["source"] == "api")
    .map(|e| e["data"]["to"].as_str().unwrap().to_string())
    .collect();
    assert_eq!(requested, vec!["paused", "active_writing"]);
    let (_, m) = env.get(&session_path(&id, "metrics"), &alice).await;
    assert_eq!(m["state"], "warming_up", "{m}");
}

#[tokio::test]
async fn an_unacknowledged_broadcast_is_outcome_unknown_and_its_retry_is_stored_once() {
    let env = env().await;
    let svc = env.service_token();
    let message =
        json!({"channel": "room:r-1", "type": "system", "data": {"text": "hi"}, "id": "b-1"});

    env.stop_nats();
    let (status, body, headers) = post_keyed(&env, BROADCAST, &svc, None, Some(&message)).await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);
    assert_eq!(body["retryId"], "b-1", "{body}");

    let (status, retried, _) = post_keyed(&env, BROADCAST, &svc, None, Some(&message)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(retried["id"], "b-1");
    assert_eq!(stored_on(&env, "RELAY", "rt.room.r-1").await.len(), 1);
}

#[tokio::test]
async fn an_unacknowledged_batch_says_what_each_item_became_and_republishing_stores_once() {
    let env = env().await;
    let svc = env.service_token();
    let events: Vec<Value> = (0..3).map(|i| word_added("alice", "p-1", i)).collect();

    env.stop_nats();
    let (status, body, headers) =
        post_keyed(&env, BATCH, &svc, None, Some(&json!({"events": events}))).await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);
    let items = body["items"].as_array().expect("items");
    assert_eq!(items.len(), 3, "{body}");
    for (i, item) in items.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["outcome"], "unknown", "{body}");
    }

    // Republishing with the ids the answer gave is deduplicated.
    let again: Vec<Value> = events
        .iter()
        .zip(items)
        .map(|(e, item)| {
            let mut e = e.clone();
            e["id"] = item["id"].clone();
            e
        })
        .collect();
    let (status, retried, _) =
        post_keyed(&env, BATCH, &svc, None, Some(&json!({"events": again}))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(retried["duplicates"], 3, "{retried}");
    let word_added_subject = subjects::event_subject(Category::Writing, "word_added");
    let stored = stored_on(
        &env,
        &subjects::event_stream(Category::Writing),
        &word_added_subject,
    )
    .await;
    assert_eq!(stored.len(), 3);

    // A single event: the retry id is its id.
    env.stop_nats();
    let (status, body, headers) = post_keyed(
        &env,
        PUBLISH,
        &svc,
        None,
        Some(&word_added("alice", "p-1", 9)),
    )
    .await;
    env.continue_nats();
    assert_outcome_unknown(status, &body, &headers);
    let mut event = word_added("alice", "p-1", 9);
    event["id"] = body["retryId"].clone();
    let (status, retried, _) = post_keyed(&env, PUBLISH, &svc, None, Some(&event)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{retried}");
    assert_eq!(retried["duplicate"], true, "{retried}");
}

#[tokio::test]
async fn the_same_key_twice_gets_the_same_answer_and_one_effect() {
    let env = env().await;
    let alice = env.token("alice");
    let svc = env.service_token();
    let id = start_session(&env, &alice).await;
    let path = session_path(&id, "keystroke");

    let (s1, first, h1) = post_keyed(&env, &path, &alice, Some("k-1"), Some(&batch())).await;
    assert_eq!(s1, StatusCode::ACCEPTED, "{first}");
    assert!(!h1.contains_key("idempotent-replayed"));
    let (s2, second, h2) = post_keyed(&env, &path, &alice, Some("k-1"), Some(&batch())).await;
    assert_eq!(s2, StatusCode::ACCEPTED, "{second}");
    assert_eq!(second, first);
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_keystrokes_settle_at(&env, &alice, &id, 12).await;

    // The same key on another route is another request.
    let (s, paused, _) =
        post_keyed(&env, &session_path(&id, "pause"), &alice, Some("k-1"), None).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{paused}");

    // Broadcast and send-to-user: by header or by body id.
    let message = json!({"channel": "room:r-1", "type": "system", "data": {"n": 1}});
    let (s1, b1, _) = post_keyed(&env, BROADCAST, &svc, Some("bc-1"), Some(&message)).await;
    let (s2, b2, h) = post_keyed(&env, BROADCAST, &svc, Some("bc-1"), Some(&message)).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED),
        "{b1} {b2}"
    );
    assert_eq!(b1, b2);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(stored_on(&env, "RELAY", "rt.room.r-1").await.len(), 1);

    let note = json!({"userId": "zoe", "type": "notification", "data": {}, "id": "n-1"});
    let (s1, n1, _) = post_keyed(&env, SEND_TO_USER, &svc, None, Some(&note)).await;
    let (s2, n2, h) = post_keyed(&env, SEND_TO_USER, &svc, Some("n-1"), Some(&note)).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED),
        "{n1} {n2}"
    );
    assert_eq!(n1, n2);
    assert_eq!(h["idempotent-replayed"], "true");
    assert_eq!(stored_on(&env, "RELAY", "rt.user.zoe").await.len(), 1);
    let (s, mismatch, _) = post_keyed(&env, SEND_TO_USER, &svc, Some("n-2"), Some(&note)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{mismatch}");
    assert_eq!(mismatch["code"], "idempotency_key_mismatch");

    // Starting a session twice with one key starts one session.
    let start = json!({"projectId": "p-1", "documentId": "d-1"});
    let (s1, st1, _) = post_keyed(&env, START, &alice, Some("st-1"), Some(&start)).await;
    let (s2, st2, h) = post_keyed(&env, START, &alice, Some("st-1"), Some(&start)).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::CREATED, StatusCode::CREATED),
        "{st1} {st2}"
    );
    assert_eq!(st1["sessionId"], st2["sessionId"]);
    assert_eq!(h["idempotent-replayed"], "true");
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_422() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    let other = start_session(&env, &alice).await;
    let path = session_path(&id, "keystroke");

    let (s, _, _) = post_keyed(&env, &path, &alice, Some("k-1"), Some(&batch())).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let mut changed = batch();
    changed["keys"] = json!(13);
    let (s, body, headers) = post_keyed(&env, &path, &alice, Some("k-1"), Some(&changed)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "idempotency_key_reused");
    assert_eq!(headers["content-type"], "application/problem+json");
    // Another target with the same key is another request too.
    let (s, body, _) = post_keyed(
        &env,
        &session_path(&other, "keystroke"),
        &alice,
        Some("k-1"),
        Some(&batch()),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_keystrokes_settle_at(&env, &alice, &id, 12).await;
    assert_eq!(keystroke_events(&env).await.len(), 1);
}

#[tokio::test]
async fn concurrent_duplicates_apply_once() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    let path = session_path(&id, "keystroke");

    let body = batch();
    let answers = futures::future::join_all(
        (0..8).map(|_| post_keyed(&env, &path, &alice, Some("same"), Some(&body))),
    )
    .await;
    let mut sequences = Vec::new();
    for (status, body, _) in &answers {
        match *status {
            StatusCode::ACCEPTED => sequences.push(body["sequence"].clone()),
            StatusCode::CONFLICT => assert_eq!(body["code"], "idempotency_in_progress"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(!sequences.is_empty());
    assert!(
        sequences.iter().all(|s| *s == sequences[0]),
        "{sequences:?}"
    );
    assert_keystrokes_settle_at(&env, &alice, &id, 12).await;
    assert_eq!(keystroke_events(&env).await.len(), 1);
}

#[tokio::test]
async fn a_retried_member_change_gets_its_first_answer() {
    let env = env().await;
    let olga = env.token("olga");
    let member = "/api/projects/p-1/members/bob";
    let put = |key: &'static str| {
        env.send(
            env.http
                .put(env.url(member))
                .bearer_auth(&olga)
                .header("Idempotency-Key", key)
                .json(&json!({"role": "editor"})),
        )
    };
    let (s1, b1, _) = put("put-1").await;
    let (s2, b2, h) = put("put-1").await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK), "{b1} {b2}");
    assert_eq!(b1, b2);
    assert_eq!(h["idempotent-replayed"], "true");

    let delete = |key: Option<&'static str>| {
        let mut req = env.http.delete(env.url(member)).bearer_auth(&olga);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        env.send(req)
    };
    let (s1, _, _) = delete(Some("del-1")).await;
    let (s2, _, h) = delete(Some("del-1")).await;
    assert_eq!((s1, s2), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
    assert_eq!(h["idempotent-replayed"], "true");
    // Without the key a second delete is a new request: bob is not a member any more.
    let (s3, body, _) = delete(None).await;
    assert_eq!(s3, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn a_retried_document_removal_gets_its_first_answer() {
    let env = env().await;
    let olga = env.token("olga");
    let document = "/api/projects/p-1/documents/d-1";
    let delete = |key: Option<&'static str>| {
        let mut req = env.http.delete(env.url(document)).bearer_auth(&olga);
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        env.send(req)
    };
    let (s1, _, _) = delete(Some("doc-del-1")).await;
    let (s2, _, h) = delete(Some("doc-del-1")).await;
    assert_eq!((s1, s2), (StatusCode::NO_CONTENT, StatusCode::NO_CONTENT));
    assert_eq!(h["idempotent-replayed"], "true");
    let (s3, body, _) = delete(None).await;
    assert_eq!(s3, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["code"], "document_not_found");
}

#[tokio::test]
async fn an_invalid_idempotency_key_is_400_naming_the_header() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    let path = session_path(&id, "keystroke");
    let long = "k".repeat(256);
    let bad: Vec<reqwest::header::HeaderValue> = vec![
        reqwest::header::HeaderValue::from_str(&long).unwrap(),
        reqwest::header::HeaderValue::from_bytes("é".as_bytes()).unwrap(),
        reqwest::header::HeaderValue::from_static("a\tb"),
        reqwest::header::HeaderValue::from_static(""),
    ];
    for value in bad {
        let (status, body, _) = env
            .send(
                env.http
                    .post(env.url(&path))
                    .bearer_auth(&alice)
                    .header("Idempotency-Key", value.clone())
                    .json(&batch()),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{value:?}: {body}");
        assert_eq!(body["code"], "invalid_idempotency_key");
        assert!(
            body["detail"].as_str().unwrap().contains("Idempotency-Key"),
            "{body}"
        );
        assert!(!body.to_string().contains(&long), "the value is not echoed");
    }
    let (status, body, _) = env
        .send(
            env.http
                .post(env.url(&path))
                .bearer_auth(&alice)
                .header("Idempotency-Key", "a")
                .header("Idempotency-Key", "b")
                .json(&batch()),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(keystroke_events(&env).await.is_empty());
}

#[tokio::test]
async fn messages_larger_than_nats_accepts_are_413_before_publishing() {
    // 32 KiB: provisioning still fits, a comment of 10,000 four-byte characters does not.
    let env = TestEnv::start_nats_options(
        NatsOptions {
            max_payload: Some(32 * 1024),
        },
        |_| {},
        |_| {},
    )
    .await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    let svc = env.service_token();
    let big_text = "𝄞".repeat(10_000);
    let comment = |text: &str| {
        json!({"category": "collaboration", "type": "comment_added", "userId": "alice",
               "projectId": "p-1", "data": {"commentId": "c-1", "text": text}})
    };
    let collaboration = subjects::event_stream(Category::Collaboration);

    let (status, body) = env.post(PUBLISH, &svc, &comment(&big_text)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["code"], "payload_too_large");

    let batch = json!({"events": [comment("short"), comment(&big_text), comment("short")]});
    let (status, body) = env.post(BATCH, &svc, &batch).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["index"], 1, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("events[1]"),
        "{body}"
    );
    assert_eq!(
        env.stream_messages(&collaboration).await,
        0,
        "nothing published"
    );

    let data = json!({"blob": "x".repeat(40_000)});
    let (status, body) = env
        .post(
            BROADCAST,
            &svc,
            &json!({"channel": "room:r-1", "type": "system", "data": data}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let (status, body) = env
        .post(
            SEND_TO_USER,
            &svc,
            &json!({"userId": "alice", "type": "system", "data": data}),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(env.stream_messages("RELAY").await, 0);

    // What fits is still published.
    let (status, body) = env.post(PUBLISH, &svc, &comment("fits")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // The size check counts exactly what nats-server counts: a message of max_payload
    // bytes is stored, one byte more is refused before it is sent.
    let max = env.state.nats.server_info().max_payload;
    let sized = |size: usize| {
        let mut msg = jetstream::Outgoing {
            subject: "rt.room.sized".into(),
            msg_id: format!("sized-{size}"),
            payload: bytes::Bytes::new(),
        };
        msg.payload = bytes::Bytes::from(vec![b'x'; size - jetstream::wire_size(&msg)]);
        msg
    };
    let stored = jetstream::publish_acked(&env.state.js, sized(max)).await;
    assert!(stored.is_ok(), "{stored:?}");
    assert_eq!(
        jetstream::publish_acked(&env.state.js, sized(max + 1)).await,
        Err(jetstream::PublishFailure::TooLarge { size: max + 1, max })
    );
}

#[tokio::test]
async fn a_broadcast_id_that_cannot_be_a_header_is_400_and_the_server_stays_healthy() {
    let env = env().await;
    let svc = env.service_token();
    let ids = [
        "a\r\nb".to_string(),
        "\u{0}".to_string(),
        "é".to_string(),
        "a b".to_string(),
        "x".repeat(10_000),
    ];
    for id in &ids {
        for (path, mut body) in [
            (
                BROADCAST,
                json!({"channel": "room:r-1", "type": "system", "data": {}}),
            ),
            (
                SEND_TO_USER,
                json!({"userId": "alice", "type": "system", "data": {}}),
            ),
        ] {
            body["id"] = json!(id);
            let (status, answer) = env.post(path, &svc, &body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {id:?}: {answer}");
            assert_eq!(answer["code"], "validation_failed");
            assert_eq!(answer["errors"][0]["pointer"], "/id", "{answer}");
        }
    }
    let (status, _) = env.get("/healthz", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = env
        .post(
            BROADCAST,
            &svc,
            &json!({"channel": "room:r-1", "type": "system", "data": {}, "id": "ok.id:1-2_3"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(env.stream_messages("RELAY").await, 1);
}
