//! Writing sessions end to end: HTTP API → JetStream → tracker → Redis, live metrics over
//! the relay, time-driven transitions from the scheduler, with short thresholds.

use std::time::{Duration, Instant};

use bytes::Bytes;
use inkwire_shared::consumer::Delivery;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{START, TestEnv, WsClient, json, start_session};
use inkwire_writing::state_machine::TrackerConfig;
use inkwire_writing::tracker::Tracker;
use reqwest::StatusCode;
use serde_json::Value;

fn fast() -> TrackerConfig {
    TrackerConfig {
        pause_after: Duration::from_millis(1200),
        break_after: Duration::from_millis(1000),
        end_after_break: Duration::from_millis(1000),
        warmup: Duration::from_millis(500),
        burst_gap: Duration::from_millis(300),
        flow_window: Duration::from_millis(1000),
        default_baseline_wpm: 1.0,
        flow_max_revision: 0.5,
        live_interval: Duration::from_millis(500),
        ..TrackerConfig::default()
    }
}

async fn env() -> TestEnv {
    let env = TestEnv::start_settings(|_| {}, |s| s.writing = fast()).await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    env.add_member("p-1", "bob", ProjectRole::Reader).await;
    env.register_document("p-1", "d-1").await;
    env
}

fn path(id: &str, action: &str) -> String {
    format!("/api/realtime/writing/sessions/{id}/{action}")
}

async fn wait_for_state(
    env: &TestEnv,
    token: &str,
    id: &str,
    state: &str,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, m) = env.get(&path(id, "metrics"), token).await;
        assert_eq!(status, StatusCode::OK, "{m}");
        if m["state"] == state {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "session never reached {state}; now {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_scripted_session_warms_up_flows_pauses_breaks_and_ends_on_time() {
    let env = env().await;
    let alice = env.token("alice");
    let mut watcher = WsClient::connect(&env.ws_url("collaboration", &env.token("bob"))).await;
    assert_eq!(
        watcher.subscribe("project:p-1", None).await["op"],
        "subscribed"
    );

    let (status, started) = env
        .post(
            START,
            &alice,
            &json!({"projectId": "p-1", "documentId": "d-1", "goalWords": 50}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    let id = started["sessionId"].as_str().unwrap().to_string();
    assert_eq!(started["state"], "idle");

    for i in 0..15 {
        let batch = json!({"keys": 12, "charsAdded": 12, "charsDeleted": 1, "wordsAdded": 2, "paragraphBoundary": i == 7});
        let (status, body) = env.post(&path(&id, "keystroke"), &alice, &batch).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = wait_for_state(&env, &alice, &id, "flow_state", Duration::from_secs(5)).await;
    assert_eq!(m["words"], 30);
    assert_eq!(m["keystrokes"], 180);
    assert_eq!(m["paragraphs"], 1);
    assert_eq!(m["goalProgress"], 0.6);
    assert!(m["wpm1m"].as_f64().unwrap() > 100.0, "{m}");

    // Then silence: paused, break and ended arrive on time with no further input.
    let t = Instant::now();
    let paused = wait_for_state(&env, &alice, &id, "paused", Duration::from_secs(4)).await;
    assert!(paused["flowMs"].as_u64().unwrap() > 0);
    wait_for_state(&env, &alice, &id, "break", Duration::from_secs(4)).await;
    let ended = wait_for_state(&env, &alice, &id, "ended", Duration::from_secs(4)).await;
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "transitions are timely: {:?}",
        t.elapsed()
    );
    assert_eq!(ended["endReason"], "inactivity");
    assert_eq!(ended["words"], 30);

    // The watcher saw live metrics, the flow transition and the end.
    let mut kinds = Vec::new();
    while let Ok(f) = watcher.next_within(Duration::from_millis(500)).await {
        if f["op"] == "message" && f["data"]["kind"] == "writing.metrics" {
            for session in f["data"]["sessions"].as_array().unwrap() {
                assert_eq!(session["metrics"]["sessionId"], id.as_str());
                for t in session["transitions"].as_array().unwrap() {
                    kinds.push(t["type"].as_str().unwrap().to_string());
                }
            }
        }
    }
    for expected in ["flow_state_entered", "flow_state_exited", "session_ended"] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} not pushed: {kinds:?}"
        );
    }

    // Derived events are in the stream.
    let admin = env.admin_token();
    let (_, page) = env
        .get("/api/realtime/events/writing?type=session_ended", &admin)
        .await;
    assert_eq!(page["events"][0]["data"]["reason"], "inactivity", "{page}");
    let (_, page) = env
        .get("/api/realtime/events/writing?type=word_added", &admin)
        .await;
    // One word_added per session and flush: together they cover every batch exactly once.
    let added = page["events"].as_array().unwrap();
    let sum = |field: &str| -> u64 {
        added
            .iter()
            .map(|e| e["data"][field].as_u64().unwrap())
            .sum()
    };
    assert!((1..=15).contains(&added.len()), "{page}");
    assert_eq!((sum("words"), sum("batches")), (30, 15), "{page}");
    assert_eq!(added.last().unwrap()["data"]["totalWords"], 30);

    // A replay of the stream rebuilds exactly the live projections.
    let snapshot = |env: &TestEnv| {
        let mut redis = env.state.redis.clone();
        async move {
            let keys = inkwire_writing::replay::projection_keys(&mut redis)
                .await
                .unwrap();
            let mut out = Vec::new();
            for k in keys.into_iter().filter(|k| !k.ends_with(":meta")) {
                let kind: String = redis::cmd("TYPE")
                    .arg(&k)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                let value: Value = match kind.as_str() {
                    "string" => {
                        let s: String = redis::cmd("GET")
                            .arg(&k)
                            .query_async(&mut redis)
                            .await
                            .unwrap();
                        serde_json::from_str(&s).unwrap_or(Value::String(s))
                    }
                    "hash" => {
                        let h: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
                            .arg(&k)
                            .query_async(&mut redis)
                            .await
                            .unwrap();
                        json!(h)
                    }
                    "set" => {
                        let mut m: Vec<String> = redis::cmd("SMEMBERS")
                            .arg(&k)
                            .query_async(&mut redis)
                            .await
                            .unwrap();
                        m.sort();
                        json!(m)
                    }
                    "zset" => {
                        let m: Vec<(String, f64)> = redis::cmd("ZRANGE")
                            .arg(&k)
                            .arg(0)
                            .arg(-1)
                            .arg("WITHSCORES")
                            .query_async(&mut redis)
                            .await
                            .unwrap();
                        json!(m)
                    }
                    other => json!(other),
                };
                out.push((k, value));
            }
            out
        }
    };
    let live = snapshot(&env).await;
    assert!(live.iter().any(|(k, _)| k.contains(&id)), "{live:?}");
    env.shutdown.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = inkwire_writing::replay::replay(&env.state.js, &env.state.redis, fast())
        .await
        .unwrap();
    assert_eq!(stats.skipped, 0);
    assert!(stats.events > 15);
    assert_eq!(snapshot(&env).await, live, "replay equals the live state");

    // Ended sessions refuse writes.
    let (status, _) = env
        .post(
            &path(&id, "keystroke"),
            &alice,
            &json!({"keys": 1, "charsAdded": 1, "charsDeleted": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = env.post(&path(&id, "end"), &alice, &json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn pause_resume_end_and_bad_input() {
    let env = env().await;
    let alice = env.token("alice");
    let (status, started) = env
        .post(
            START,
            &alice,
            &json!({"projectId": "p-1", "documentId": "d-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = started["sessionId"].as_str().unwrap().to_string();
    let (status, _) = env
        .post(
            &path(&id, "keystroke"),
            &alice,
            &json!({"keys": 5, "charsAdded": 5, "charsDeleted": 0, "wordsAdded": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_for_state(&env, &alice, &id, "warming_up", Duration::from_secs(3)).await;

    let (status, _) = env.post(&path(&id, "pause"), &alice, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_for_state(&env, &alice, &id, "paused", Duration::from_secs(3)).await;
    let (status, body) = env.post(&path(&id, "pause"), &alice, &json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = env.post(&path(&id, "resume"), &alice, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_for_state(&env, &alice, &id, "warming_up", Duration::from_secs(3)).await;

    // Only the owner writes; members read; outsiders nothing.
    let bob = env.token("bob");
    let (status, _) = env
        .post(
            &path(&id, "keystroke"),
            &bob,
            &json!({"keys": 1, "charsAdded": 1, "charsDeleted": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env.get(&path(&id, "metrics"), &bob).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env.get(&path(&id, "metrics"), &env.token("mallory")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, analytics) = env
        .get("/api/realtime/analytics/project/p-1/writing", &bob)
        .await;
    assert_eq!(status, StatusCode::OK, "{analytics}");
    assert_eq!(analytics["activeWriters"][0]["userId"], "alice");
    assert_eq!(analytics["wordsToday"], 1);
    let (status, _) = env
        .get(
            "/api/realtime/analytics/project/p-1/writing",
            &env.token("mallory"),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, active) = env
        .get("/api/realtime/writing/sessions/active", &alice)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(active["sessions"][0]["sessionId"], id.as_str());

    // Impossible values are refused and change nothing.
    let future = (time::OffsetDateTime::now_utc() + Duration::from_secs(3600))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for (bad, pointer) in [
        (
            json!({"keys": -1, "charsAdded": 1, "charsDeleted": 0}),
            "/keys",
        ),
        (
            json!({"keys": 10, "charsAdded": 10, "charsDeleted": 0, "wordsAdded": 5000}),
            "/wordsAdded",
        ),
        (
            json!({"keys": 10, "charsAdded": 10, "charsDeleted": 0, "clientTimestamp": future}),
            "/clientTimestamp",
        ),
        (
            json!({"keys": 10, "charsAdded": "ten", "charsDeleted": 0}),
            "/charsAdded",
        ),
        (json!({"keys": 10}), "/charsAdded"),
    ] {
        let (status, body) = env.post(&path(&id, "keystroke"), &alice, &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["errors"][0]["pointer"], pointer, "{bad}: {body}");
    }
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(m["keystrokes"], 5);
    let (status, _) = env.get(&path("no-such-session", "metrics"), &alice).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env
        .post(
            START,
            &alice,
            &json!({"projectId": "p-2", "documentId": "d-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = env
        .post(
            START,
            &bob,
            &json!({"projectId": "p-1", "documentId": "d-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "readers do not write");
    let (status, _) = env
        .post(
            START,
            &alice,
            &json!({"projectId": "p-1", "documentId": "d-9"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    let (status, _) = env.post(&path(&id, "end"), &alice, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = env.post(&path(&id, "end"), &alice, &json!({})).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "ending twice, even before the tracker applied the first"
    );
    let ended = wait_for_state(&env, &alice, &id, "ended", Duration::from_secs(3)).await;
    assert_eq!(ended["endReason"], "user");
}

#[tokio::test]
async fn words_per_local_day_goal_and_streak() {
    let env = env().await;
    let alice = env.token("alice");
    let (status, body) = env
        .put(
            "/api/realtime/writing/preferences",
            &alice,
            &json!({"timeZone": "Mars/Olympus"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errors"][0]["pointer"], "/timeZone");
    let (status, body) = env
        .put("/api/realtime/writing/preferences", &alice, &json!({}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, stats) = env
        .put(
            "/api/realtime/writing/preferences",
            &alice,
            &json!({"timeZone": "Pacific/Kiritimati", "dailyGoalWords": 3}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["timeZone"], "Pacific/Kiritimati");
    assert_eq!(stats["streakDays"], 0);
    let id = start_session(&env, &alice).await;
    for words in [1, 2] {
        let (status, _) = env
            .post(
                &path(&id, "keystroke"),
                &alice,
                &json!({"keys": 9, "charsAdded": 9, "charsDeleted": 0, "wordsAdded": words}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let stats = loop {
        let (_, stats) = env.get("/api/realtime/writing/stats", &alice).await;
        if stats["today"]["words"] == 3 || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Days are counted in the writer's zone (UTC+14 here), not the server's.
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
    let local_today = inkwire_writing::days::local_day(now_ms, Some("Pacific/Kiritimati"));
    assert_eq!(stats["today"]["date"], local_today.as_str(), "{stats}");
    assert_eq!(stats["today"]["words"], 3, "{stats}");
    assert_eq!(stats["today"]["goalProgress"], 1.0);
    assert_eq!(stats["streakDays"], 1);
    assert_eq!(stats["days"][0]["date"], local_today.as_str());
}

#[tokio::test]
async fn a_redelivered_batch_is_counted_once() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    wait_for_state(&env, &alice, &id, "idle", Duration::from_secs(2)).await;
    let mut tracker = Tracker::new(env.state.js.clone(), env.state.redis.clone(), fast(), false);
    let event = json!({"id": uuid::Uuid::new_v4().to_string(), "category": "writing", "type": "keystroke", "userId": "alice",
        "projectId": "p-1", "timestamp": "2030-01-01T00:00:00Z", "data": {"sessionId": id, "keys": 9, "charsAdded": 9, "charsDeleted": 0, "wordsAdded": 4}});
    let delivery = |n| Delivery {
        subject: "events.writing.keystroke".into(),
        payload: Bytes::from(event.to_string()),
        stream_sequence: 1_000_000,
        deliveries: n,
        published: None,
    };
    tracker.handle(delivery(1)).await.unwrap();
    tracker.handle(delivery(2)).await.unwrap();
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(
        (m["words"].as_u64(), m["keystrokes"].as_u64()),
        (Some(4), Some(9)),
        "{m}"
    );
}

/// A keystroke batch of Alice's for session `id`, as the tracker receives it at `seq`.
fn keystroke(id: &str, seq: u64, words: u32) -> Delivery {
    let event = json!({"id": uuid::Uuid::new_v4().to_string(), "category": "writing", "type": "keystroke",
        "userId": "alice", "projectId": "p-1", "timestamp": "2030-01-01T00:00:00Z",
        "data": {"sessionId": id, "keys": 5, "charsAdded": 5, "charsDeleted": 0, "wordsAdded": words}});
    Delivery {
        subject: "events.writing.keystroke".into(),
        payload: Bytes::from(event.to_string()),
        stream_sequence: seq,
        deliveries: 1,
        published: None,
    }
}

#[tokio::test]
async fn a_stale_instance_takes_the_newer_state_and_applies_again() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    wait_for_state(&env, &alice, &id, "idle", Duration::from_secs(2)).await;
    let tracker = || Tracker::new(env.state.js.clone(), env.state.redis.clone(), fast(), false);
    let (mut a, mut b) = (tracker(), tracker());
    // A holds the session in memory; B saves a newer version behind A's back.
    a.handle(keystroke(&id, 2_000_001, 1)).await.unwrap();
    b.handle(keystroke(&id, 2_000_002, 2)).await.unwrap();
    // A's save is refused (version), so it reloads B's state and applies its input again.
    a.handle(keystroke(&id, 2_000_003, 4)).await.unwrap();
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(m["words"], 7, "every instance's input, once: {m}");
    // And B, now stale in turn, does the same.
    b.handle(keystroke(&id, 2_000_004, 8)).await.unwrap();
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(
        (m["words"].as_u64(), m["keystrokes"].as_u64()),
        (Some(15), Some(20)),
        "{m}"
    );
}

#[tokio::test]
async fn a_crash_before_or_after_the_save_neither_loses_nor_doubles_input() {
    use inkwire_shared::consumer::WriteBehind;
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    wait_for_state(&env, &alice, &id, "idle", Duration::from_secs(2)).await;
    let tracker = || Tracker::new(env.state.js.clone(), env.state.redis.clone(), fast(), false);
    let words = |m: &Value| m["words"].as_u64();

    // Applied, never saved, then the process dies: the message was not acknowledged, so
    // it is redelivered — to another instance — and counted then.
    let mut a = tracker();
    a.apply(vec![keystroke(&id, 4_000_001, 3)]).await;
    drop(a);
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(words(&m), Some(0), "nothing saved yet: {m}");
    let mut b = tracker();
    b.handle(keystroke(&id, 4_000_001, 3)).await.unwrap();
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(words(&m), Some(3), "{m}");

    // Applied and saved, then the process dies before acknowledging: the redelivery is
    // recognised and changes nothing.
    let mut c = tracker();
    c.apply(vec![keystroke(&id, 4_000_002, 5)]).await;
    assert!(
        c.flush().await.is_empty(),
        "the save is under way, nothing settled yet"
    );
    c.written().await;
    drop(c);
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(words(&m), Some(8), "{m}");
    let mut d = tracker();
    d.handle(keystroke(&id, 4_000_002, 5)).await.unwrap();
    let (_, m) = env.get(&path(&id, "metrics"), &alice).await;
    assert_eq!(
        (words(&m), m["keystrokes"].as_u64()),
        (Some(8), Some(10)),
        "{m}"
    );
}

#[tokio::test]
async fn derived_events_saved_before_a_crash_are_published_on_recovery() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    wait_for_state(&env, &alice, &id, "idle", Duration::from_secs(2)).await;
    // What a tracker leaves behind if it dies between saving a session and publishing the
    // derived events saved with it.
    let event_id = uuid::Uuid::new_v4().to_string();
    let derived = json!({"id": event_id, "category": "writing", "type": "paragraph_completed",
        "userId": "alice", "projectId": "p-1", "timestamp": "2030-01-01T00:00:00Z",
        "data": {"sessionId": id, "paragraphIndex": 0, "words": 3}, "metadata": {"source": "tracker"}});
    let outbox = inkwire_writing::store::outbox_key(&id);
    let mut redis = env.state.redis.clone();
    redis::cmd("HSET")
        .arg(&outbox)
        .arg(&event_id)
        .arg(format!("events.writing.paragraph_completed\n{derived}"))
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    // The next tracker to load the session publishes them, once, and takes them out of the
    // outbox.
    let mut t = Tracker::new(env.state.js.clone(), env.state.redis.clone(), fast(), true);
    t.handle(keystroke(&id, 3_000_001, 1)).await.unwrap();
    let admin = env.admin_token();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page) = env
            .get(
                "/api/realtime/events/writing?type=paragraph_completed",
                &admin,
            )
            .await;
        let left: i64 = redis::cmd("HEXISTS")
            .arg(&outbox)
            .arg(&event_id)
            .query_async(&mut redis)
            .await
            .unwrap();
        if page["count"] == 1 && left == 0 {
            assert_eq!(page["events"][0]["id"], event_id.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not published: {page}, key left: {left}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_for_someone_elses_session_are_ignored() {
    let env = env().await;
    env.add_member("p-1", "mallory", ProjectRole::Editor).await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    // Mallory publishes a keystroke event of her own that names Alice's session.
    let forged = json!({"category": "writing", "type": "keystroke", "userId": "mallory", "projectId": "p-1",
        "data": {"sessionId": id, "keys": 100, "charsAdded": 500, "charsDeleted": 0, "wordsAdded": 100}});
    let (status, body) = env
        .post(
            "/api/realtime/events/publish",
            &env.token("mallory"),
            &forged,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("domain_api_required")),
        "keystrokes go through the writing API: {body}"
    );
    // Had it reached the stream some other way (a publisher on NATS), the tracker would
    // still leave Alice's session alone.
    let mut forged = forged;
    forged["id"] = json!(uuid::Uuid::new_v4().to_string());
    forged["timestamp"] = json!(
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    env.state
        .js
        .publish("events.writing.keystroke", forged.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (status, _) = env
        .post(
            &path(&id, "keystroke"),
            &alice,
            &json!({"keys": 3, "charsAdded": 3, "charsDeleted": 0, "wordsAdded": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let m = wait_for_state(&env, &alice, &id, "warming_up", Duration::from_secs(3)).await;
    assert_eq!(
        (m["words"].as_u64(), m["keystrokes"].as_u64()),
        (Some(1), Some(3)),
        "{m}"
    );
}
