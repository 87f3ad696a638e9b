//! Analytics (issue 13) against real nats-server and redis-server: counts per type, per
//! project and overall equal the events published at every resolution — also after the
//! consumers were stopped part way, after every message was delivered again (a crash
//! between the script and the acks, redeliveries after later messages), and after
//! `inkwire replay analytics`; an event that fails validation counts nowhere and spoils
//! nothing; each bucket's frame reaches `category:analytics` and `project:{id}` within 1 s
//! of the bucket's end, the project channel carrying only its project; members read only
//! their project; bad parameters are `400`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_analytics::config::AnalyticsConfig;
use inkwire_analytics::store;
use inkwire_analytics::worker::{self, streams};
use inkwire_shared::consumer::{Delivery, ShutdownTrigger};
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{TestEnv, WsClient};
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const BATCH: &str = "/api/realtime/events/batch";
const METRICS: &str = "/api/realtime/analytics/metrics";

fn config() -> AnalyticsConfig {
    AnalyticsConfig {
        bucket: Duration::from_secs(1),
        ..AnalyticsConfig::default()
    }
}

/// The `i`-th test event and the series it counts in: (type, project).
fn event(i: usize) -> (Value, &'static str, Option<&'static str>) {
    match i % 5 {
        0 => (
            json!({"category": "writing", "type": "word_added", "userId": "u-a", "projectId": "p-a",
                "data": {"sessionId": "s-1", "words": 3}}),
            "word_added",
            Some("p-a"),
        ),
        1 => (
            json!({"category": "collaboration", "type": "comment_added", "userId": "u-b",
                "projectId": "p-b", "data": {"commentId": format!("c-{i}"), "text": "hm"}}),
            "comment_added",
            Some("p-b"),
        ),
        2 => (
            json!({"category": "publishing", "type": "sales_updated", "userId": "u-a",
                "projectId": "p-a",
                "data": {"bookId": "b-1", "platform": "kdp", "units": 2, "revenue": 1.25}}),
            "sales_updated",
            Some("p-a"),
        ),
        3 => (
            json!({"category": "publishing", "type": "status_changed", "userId": "u-a",
                "data": {"bookId": "b-1", "to": "ready"}}),
            "status_changed",
            None,
        ),
        _ => (
            json!({"category": "system", "type": "service_started", "userId": "ops",
                "data": {"service": "relay"}}),
            "service_started",
            None,
        ),
    }
}

/// What events `from..to` should count: series field → count.
fn expected(range: std::ops::Range<usize>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for i in range {
        let (_, t, p) = event(i);
        for f in [store::field(None, None), store::field(None, Some(t))]
            .into_iter()
            .chain(p.map(|p| store::field(Some(p), None)))
            .chain(p.map(|p| store::field(Some(p), Some(t))))
        {
            *out.entry(f).or_insert(0) += 1;
        }
    }
    out
}

async fn publish(env: &TestEnv, range: std::ops::Range<usize>) {
    let events: Vec<Value> = range.map(|i| event(i).0).collect();
    for chunk in events.chunks(500) {
        let (s, b) = env
            .post(BATCH, &env.service_token(), &json!({ "events": chunk }))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    }
}

/// A series' total over `window` with `step`, as the service reads it.
async fn series_total(env: &TestEnv, field: &str, window: &str, step: &str) -> i64 {
    let query = match inkwire_analytics::hooks::parse_field(field).unwrap() {
        (None, inkwire_analytics::hooks::Metric::Total) => String::new(),
        (None, inkwire_analytics::hooks::Metric::Type(t)) => format!("&type={t}"),
        (Some(p), inkwire_analytics::hooks::Metric::Total) => format!("&projectId={p}"),
        (Some(p), inkwire_analytics::hooks::Metric::Type(t)) => {
            format!("&projectId={p}&type={t}")
        }
        other => panic!("{other:?}"),
    };
    let (s, b) = env
        .get(
            &format!("{METRICS}?window={window}&step={step}{query}"),
            &env.service_token(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let points = b["points"].as_array().unwrap();
    let sum: i64 = points.iter().map(|p| p["count"].as_i64().unwrap()).sum();
    assert_eq!(sum, b["total"].as_i64().unwrap());
    sum
}

/// Every series at every resolution equals `want`.
async fn assert_counts(env: &TestEnv, want: &BTreeMap<String, i64>) {
    for (window, step) in [("5m", "1s"), ("30m", "1m"), ("3h", "1h"), ("3d", "1d")] {
        for (field, n) in want {
            assert_eq!(
                series_total(env, field, window, step).await,
                *n,
                "{field} over {window} by {step}"
            );
        }
    }
}

/// Waits until the overall count reaches `n` (then checks it stays there).
async fn wait_total(env: &TestEnv, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let total = series_total(env, "total", "5m", "1s").await;
        if total >= n || tokio::time::Instant::now() > deadline {
            assert_eq!(total, n);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every bucket and book hash (not the marks, the lease or the push position).
async fn figures(env: &TestEnv) -> BTreeMap<String, BTreeMap<String, i64>> {
    let mut redis = env.state.redis.clone();
    let mut out = BTreeMap::new();
    for key in store::all_keys(&mut redis, &streams()).await.unwrap() {
        if !key.starts_with("inkwire:analytics:")
            || key == store::lease_key()
            || key == store::pushed_key()
        {
            continue;
        }
        let h: BTreeMap<String, i64> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        out.insert(key, h);
    }
    out
}

/// Every message of every category stream, as a redelivery would bring it.
async fn all_deliveries(env: &TestEnv) -> Vec<(String, Vec<Delivery>)> {
    let mut out = Vec::new();
    for stream in streams() {
        let page = read_stream(
            &env.state.js,
            &stream,
            String::new(),
            DeliverPolicy::All,
            100_000,
        )
        .await
        .unwrap();
        let ds = page
            .into_iter()
            .map(|m| Delivery {
                subject: m.subject,
                payload: m.payload,
                stream_sequence: m.sequence,
                deliveries: 2,
                published: Some(m.published),
            })
            .collect();
        out.push((stream, ds));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_are_exact_through_a_restart_redeliveries_and_a_replay() {
    let env = TestEnv::start_settings(|_| {}, |s| s.analytics = config()).await;
    // The consumers of this test's own, to stop part way (the harness runs none).
    // A worker that crashed after its script and before its acks: the first 100 events'
    // counts are in Redis, and the consumers (created below) deliver them all the same.
    publish(&env, 0..100).await;
    let mut redis = env.state.redis.clone();
    let cfg = config();
    for (stream, ds) in all_deliveries(&env).await {
        let o = store::apply_batch(&mut redis, &cfg, &stream, 0, &ds)
            .await
            .unwrap();
        assert_eq!(o.applied.applied, ds.len(), "{stream}: {o:?}");
    }
    let (stop, shutdown) = ShutdownTrigger::new();
    let first = tokio::spawn(worker::run(
        env.state.js.clone(),
        env.state.redis.clone(),
        config(),
        shutdown,
        false,
    ));
    publish(&env, 100..300).await;
    // Stopped while messages are still arriving.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.trigger();
    first.await.unwrap().unwrap();
    publish(&env, 300..600).await;
    // An event that fails validation (a project id that is no identifier), put on the
    // stream past the events API, in the same batches as valid ones.
    env.state
        .js
        .publish(
            "events.writing.word_added",
            serde_json::to_vec(&json!({"category": "writing", "type": "word_added",
                "userId": "u-a", "projectId": "p:x", "data": {"sessionId": "s", "words": 5}}))
            .unwrap()
            .into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    publish(&env, 600..700).await;
    let (stop, shutdown) = ShutdownTrigger::new();
    let second = tokio::spawn(worker::run(
        env.state.js.clone(),
        env.state.redis.clone(),
        config(),
        shutdown,
        false,
    ));
    wait_total(&env, 700).await;
    let want = expected(0..700);
    assert_counts(&env, &want).await;
    let before = figures(&env).await;

    // Every message delivered again, as after a crash between the script and the acks: in
    // order, then newest first in small batches (redeliveries after later messages).
    for (stream, ds) in all_deliveries(&env).await {
        for batch in ds.chunks(64) {
            let o = store::apply_batch(&mut redis, &cfg, &stream, 0, batch)
                .await
                .unwrap();
            assert_eq!(o.applied.applied, 0, "{stream}: {o:?}");
        }
        let mut reversed = ds.clone();
        reversed.reverse();
        for batch in reversed.chunks(7) {
            store::apply_batch(&mut redis, &cfg, &stream, 0, batch)
                .await
                .unwrap();
        }
    }
    assert_eq!(
        figures(&env).await,
        before,
        "a redelivery changed the figures"
    );
    stop.trigger();
    second.await.unwrap().unwrap();

    // Words, and the book's sales today (the baseline days are empty).
    let (s, b) = env
        .get("/api/realtime/analytics/projects/p-a", &env.service_token())
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["today"]["words"], 140 * 3, "{b}");
    assert_eq!(b["today"]["total"], want["p:p-a:total"], "{b}");
    assert_eq!(b["today"]["byType"]["word_added"], 140, "{b}");
    let (s, b) = env
        .get(
            "/api/realtime/analytics/books/b-1/sales?days=3",
            &env.service_token(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let days = b["days"].as_array().unwrap();
    assert_eq!(days.len(), 3);
    assert_eq!(days[2]["units"], 140 * 2, "{b}");
    assert_eq!(days[2]["revenue"], 140.0 * 1.25, "{b}");
    assert_eq!(b["baseline"]["unitsPerDay"], 0.0, "{b}");
    assert_eq!(b["baseline"]["days"], 7);

    // `inkwire replay analytics` rebuilds the same figures.
    let stats = inkwire_analytics::replay::replay(&env.state.js, &env.state.redis, &cfg)
        .await
        .unwrap();
    assert_eq!(stats.counted, 700, "{stats:?}");
    assert_eq!(stats.skipped, 1, "{stats:?}");
    assert_eq!(
        figures(&env).await,
        before,
        "the replay built other figures"
    );
}

fn ms_of(iso: &str) -> i128 {
    OffsetDateTime::parse(iso, &Rfc3339)
        .unwrap()
        .unix_timestamp_nanos()
        / 1_000_000
}

fn now_ms() -> i128 {
    OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000
}

/// The next `metrics_update` frame, with the time it arrived.
async fn next_metrics(ws: &mut WsClient, wait: Duration) -> Option<(Value, i128)> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = ws.next_within(left).await.ok()?;
        if frame["op"] == "message" && frame["type"] == "metrics_update" {
            return Some((frame, now_ms()));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bucket_is_pushed_within_a_second_of_its_end_scoped_to_the_project() {
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.analytics = config();
            s.without_analytics_worker = false;
        },
    )
    .await;
    env.add_member("p-a", "u-a", ProjectRole::Reader).await;
    let mut admin = WsClient::connect(&env.ws_url("analytics", &env.admin_token())).await;
    let ok = admin.subscribe("category:analytics", None).await;
    assert_eq!(ok["op"], "subscribed", "{ok}");
    let mut member = WsClient::connect(&env.ws_url("analytics", &env.token("u-a"))).await;
    let ok = member.subscribe("project:p-a", None).await;
    assert_eq!(ok["op"], "subscribed", "{ok}");
    // A second instance with its own analytics worker: the consumers are shared and only
    // the lease holder pushes, so each bucket still gives one frame per channel.
    let _second = env
        .second_instance_settings(|s| {
            s.analytics = config();
            s.without_analytics_worker = false;
        })
        .await;
    // The member may not watch the firehose.
    let refused = member.subscribe("category:analytics", None).await;
    assert_eq!(refused["op"], "error", "{refused}");

    let mut last_end = 0;
    for round in 0..3 {
        // Events of two projects in one bucket (the closer starts with the current bucket,
        // so the first round waits for it to have started).
        tokio::time::sleep(Duration::from_millis(1100 - (now_ms() % 1000) as u64)).await;
        let base = round * 10;
        publish(&env, base..base + 2).await;
        let (all, at) = next_metrics(&mut admin, Duration::from_secs(5))
            .await
            .expect("a frame on category:analytics");
        let data = &all["data"];
        let end = ms_of(data["end"].as_str().unwrap());
        assert!(
            at - end <= 1000,
            "category frame {} ms after the bucket's end",
            at - end
        );
        assert!(at >= end, "pushed before the bucket ended");
        assert!(end > last_end, "bucket ending {end} pushed twice");
        last_end = end;
        eprintln!(
            "round {round}: category:analytics frame {} ms after the bucket's end",
            at - end
        );
        assert_eq!(data["resolution"], "1s");
        assert_eq!(data["total"], 2, "{data}");
        assert_eq!(data["projects"]["p-a"]["byType"]["word_added"], 1, "{data}");
        assert_eq!(data["projects"]["p-a"]["words"], 3, "{data}");
        assert_eq!(
            data["projects"]["p-b"]["byType"]["comment_added"], 1,
            "{data}"
        );
        let (mine, at) = next_metrics(&mut member, Duration::from_secs(5))
            .await
            .expect("a frame on project:p-a");
        assert!(
            at - end <= 1000,
            "project frame {} ms after the bucket's end",
            at - end
        );
        assert_eq!(mine["channel"], "project:p-a");
        let data = &mine["data"];
        assert_eq!(data["projectId"], "p-a");
        assert_eq!(data["end"], all["data"]["end"]);
        assert_eq!(data["total"], 1, "{data}");
        assert_eq!(data["byType"], json!({"word_added": 1}));
        assert!(!data.to_string().contains("p-b"), "{data}");
    }
    // One frame per bucket and channel: nothing more for buckets without events.
    assert!(
        next_metrics(&mut admin, Duration::from_millis(1500))
            .await
            .is_none()
    );
    assert!(
        next_metrics(&mut member, Duration::from_millis(300))
            .await
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_read_only_their_project_and_bad_parameters_are_400() {
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.analytics = config();
            s.without_analytics_worker = false;
        },
    )
    .await;
    env.add_member("p-a", "u-a", ProjectRole::Reader).await;
    env.add_member("p-b", "u-b", ProjectRole::Owner).await;
    let a = env.token("u-a");
    publish(&env, 0..5).await;
    wait_total(&env, 5).await;

    let (s, b) = env
        .get(&format!("{METRICS}?projectId=p-a&window=1m"), &a)
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["total"], 2, "{b}");
    assert_eq!(b["points"].as_array().unwrap().len(), 60);
    for path in [
        format!("{METRICS}?projectId=p-b"),
        format!("{METRICS}?projectId=p-b&type=comment_added"),
        METRICS.to_string(),
        format!("{METRICS}?type=word_added"),
        "/api/realtime/analytics/projects/p-b".to_string(),
        // b-1's sales named p-a only.
        "/api/realtime/analytics/books/b-1/sales".to_string(),
    ] {
        let token = if path.contains("books") {
            env.token("u-b")
        } else {
            a.clone()
        };
        let (s, b) = env.get(&path, &token).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{path}: {b}");
        assert_eq!(b["code"], "forbidden", "{path}: {b}");
    }
    let (s, b) = env.get("/api/realtime/analytics/projects/p-a", &a).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["today"]["total"], 2, "{b}");
    assert!(b["lastMinute"]["wpm"].is_number(), "{b}");
    let (s, b) = env.get("/api/realtime/analytics/books/b-1/sales", &a).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["days"].as_array().unwrap().len(), 30);

    for (query, code) in [
        ("?type=nope", "invalid_parameter"),
        ("?window=abc", "invalid_parameter"),
        ("?window=0s", "invalid_parameter"),
        ("?window=99999999999d", "invalid_parameter"),
        ("?step=1500ms", "invalid_parameter"),
        ("?window=1m&step=7s", "invalid_parameter"),
        ("?window=7d&step=1s", "invalid_parameter"),
        ("?projectId=a:b", "invalid_id"),
        ("?projectid=p-a", "unknown_parameter"),
    ] {
        let (s, b) = env
            .get(&format!("{METRICS}{query}"), &env.service_token())
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {b}");
        assert_eq!(b["code"], code, "{query}: {b}");
    }
    for (path, code) in [
        ("/api/realtime/analytics/projects/a.b", "invalid_id"),
        (
            "/api/realtime/analytics/projects/p-a?x=1",
            "unknown_parameter",
        ),
        ("/api/realtime/analytics/books/b%201/sales", "invalid_id"),
        (
            "/api/realtime/analytics/books/b-1/sales?days=0",
            "invalid_parameter",
        ),
        (
            "/api/realtime/analytics/books/b-1/sales?days=366",
            "invalid_parameter",
        ),
        (
            "/api/realtime/analytics/books/b-1/sales?days=x",
            "invalid_parameter",
        ),
    ] {
        let (s, b) = env.get(path, &env.service_token()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{path}: {b}");
        assert_eq!(b["code"], code, "{path}: {b}");
    }
    let (s, _) = env.get(METRICS, "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

/// The analytics events (`threshold_crossed`, `threshold_resolved`, `anomaly_detected`)
/// stored so far.
async fn analytics_events(env: &TestEnv) -> Vec<Value> {
    let stream =
        inkwire_shared::subjects::event_stream(inkwire_shared::events::Category::Analytics);
    read_stream(
        &env.state.js,
        &stream,
        String::new(),
        DeliverPolicy::All,
        10_000,
    )
    .await
    .unwrap()
    .iter()
    .map(|m| serde_json::from_slice(&m.payload).unwrap())
    .collect()
}

fn word(project: &str) -> Value {
    json!({"category": "writing", "type": "word_added", "userId": "u-o", "projectId": project,
        "data": {"sessionId": "s-1", "words": 1}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_fires_once_per_crossing_and_resolves_once() {
    const T: &str = "/api/realtime/analytics/thresholds";
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.analytics = config();
            s.without_analytics_worker = false;
        },
    )
    .await;
    env.add_member("p-t", "u-o", ProjectRole::Owner).await;
    env.add_member("p-t", "u-r", ProjectRole::Reader).await;
    let owner = env.token("u-o");
    let rule = json!({"metric": "word_added", "projectId": "p-t", "window": "3s",
        "comparator": "gt", "value": 5, "hysteresis": 2});

    // Who may: the project's owner (and admin / service); a reader neither manages nor sees.
    let (s, b) = env
        .put(&format!("{T}/many-words"), &env.token("u-r"), &rule)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = env.put(&format!("{T}/many-words"), &owner, &rule).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["window"], "3s");
    assert_eq!(b["state"]["fired"], false);
    let (s, _) = env.get(&format!("{T}/many-words"), &env.token("u-r")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = env.get(T, &env.token("u-r")).await;
    assert_eq!(
        (s, b["thresholds"].as_array().unwrap().len()),
        (StatusCode::OK, 0)
    );
    let (s, b) = env.get(T, &env.admin_token()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["thresholds"][0]["name"], "many-words", "{b}");
    // The overall series: admin and service only.
    let mut overall = rule.clone();
    overall.as_object_mut().unwrap().remove("projectId");
    let (s, _) = env.put(&format!("{T}/all-words"), &owner, &overall).await;
    assert_eq!(s, StatusCode::FORBIDDEN);

    // Bad input changes nothing.
    for (body, code) in [
        (
            json!({"metric": "bogus", "window": "3s", "comparator": "gt", "value": 1}),
            "invalid_parameter",
        ),
        (
            json!({"metric": "total", "window": "3x", "comparator": "gt", "value": 1}),
            "invalid_parameter",
        ),
        (
            json!({"metric": "total", "window": "2h", "comparator": "gt", "value": 1}),
            "invalid_parameter",
        ),
        (
            json!({"metric": "total", "window": "1500ms", "comparator": "gt", "value": 1}),
            "invalid_parameter",
        ),
        // Too long for any clock: an error, not an overflow.
        (
            json!({"metric": "total", "window": "999999999999999d", "comparator": "gt", "value": 1}),
            "invalid_parameter",
        ),
        (
            json!({"metric": "total", "window": "999999999999999h", "comparator": "gt", "value": 1}),
            "invalid_parameter",
        ),
        (
            json!({"metric": "total", "window": "3s", "comparator": "eq", "value": 1}),
            "validation_failed",
        ),
        (
            json!({"metric": "total", "window": "3s", "comparator": "gt"}),
            "validation_failed",
        ),
    ] {
        let (s, b) = env
            .put(&format!("{T}/bad"), &env.admin_token(), &body)
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
        assert_eq!(b["code"], code, "{body}: {b}");
    }
    let (s, b) = env
        .put(&format!("{T}/bad:name"), &env.admin_token(), &overall)
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_id"))
    );
    let (s, _) = env.get(&format!("{T}/bad"), &env.admin_token()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Above the threshold for several buckets (4 words a second over a 3 s window: 8, 12,
    // 12, ...), then nothing: one crossing, one resolution.
    for _ in 0..5 {
        let events: Vec<Value> = (0..4).map(|_| word("p-t")).collect();
        let (s, b) = env
            .post(BATCH, &env.service_token(), &json!({ "events": events }))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let (_, b) = env.get(&format!("{T}/many-words"), &owner).await;
    assert_eq!(b["state"]["fired"], true, "{b}");
    // The window empties 3 s after the last words; give the closer a few buckets.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = env.get(&format!("{T}/many-words"), &owner).await;
        if b["state"]["fired"] == false {
            assert_eq!(b["state"]["lastValue"], 0.0, "{b}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not resolved: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events = analytics_events(&env).await;
    let of = |t: &str| {
        events
            .iter()
            .filter(|e| e["type"] == t && e["data"]["name"] == "many-words")
            .collect::<Vec<_>>()
    };
    let crossed = of("threshold_crossed");
    let resolved = of("threshold_resolved");
    assert_eq!(crossed.len(), 1, "{events:?}");
    assert_eq!(resolved.len(), 1, "{events:?}");
    let c = &crossed[0];
    assert_eq!(c["projectId"], "p-t");
    assert_eq!(c["userId"], "u-o");
    assert_eq!(c["data"]["direction"], "above");
    assert_eq!(c["data"]["threshold"], 5.0);
    assert!(c["data"]["value"].as_f64().unwrap() > 5.0, "{c}");
    assert!(resolved[0]["data"]["value"].as_f64().unwrap() <= 3.0);
    // Both fit their schemas (as every stored event must).
    for e in [c, resolved[0]] {
        inkwire_shared::schema::schemas()
            .validate_event(e)
            .unwrap_or_else(|errs| panic!("{e}: {errs:?}"));
    }

    // The same rule again (a retried PUT) changes nothing; another rule starts afresh;
    // deleting removes it.
    let (s, b) = env.put(&format!("{T}/many-words"), &owner, &rule).await;
    assert_eq!((s, b["revision"].as_u64()), (StatusCode::OK, Some(1)));
    assert_eq!(b["state"]["fired"], false, "{b}");
    assert!(b["state"]["lastValue"].as_f64().is_some(), "{b}");
    let mut changed = rule.clone();
    changed["value"] = json!(50);
    let (s, b) = env.put(&format!("{T}/many-words"), &owner, &changed).await;
    assert_eq!((s, b["revision"].as_u64()), (StatusCode::OK, Some(2)));
    assert_eq!(b["state"]["lastValue"], Value::Null, "{b}");
    let (s, _) = env
        .delete(&format!("{T}/many-words"), &env.token("u-r"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = env.delete(&format!("{T}/many-words"), &owner).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = env.get(&format!("{T}/many-words"), &owner).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_against_an_hour_of_history_is_an_anomaly_once() {
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.analytics = config();
            s.without_analytics_worker = false;
        },
    )
    .await;
    // An hour of history: the project had 10 events a minute (a fixture in the rollup
    // hashes the counters write; the detector reads nothing else).
    let minute = 60_000i128;
    // Not in a minute's last seconds: the burst must be stored in the minute it is for.
    if now_ms() % minute > 50_000 {
        tokio::time::sleep(Duration::from_millis(
            (minute - now_ms() % minute + 200) as u64,
        ))
        .await;
    }
    let this_minute = now_ms() - now_ms() % minute;
    let mut redis = env.state.redis.clone();
    for i in 1..=60 {
        let key = store::bucket_key(60_000, (this_minute - i * minute) as u64);
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("p:p-z:total")
            .arg(10)
            .arg("total")
            .arg(10)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // In this minute: 200.
    let events: Vec<Value> = (0..200).map(|_| word("p-z")).collect();
    let (s, b) = env
        .post(BATCH, &env.service_token(), &json!({ "events": events }))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let closed_at = this_minute + minute;
    // The minute closes, then the detector has its turn (pushed within a second).
    let wait = (closed_at + 3_000 - now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found: Vec<Value> = analytics_events(&env)
            .await
            .into_iter()
            .filter(|e| e["type"] == "anomaly_detected" && e["projectId"] == "p-z")
            .collect();
        if !found.is_empty() || tokio::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(found.len(), 1, "{found:?}");
    let d = &found[0]["data"];
    assert_eq!(d["direction"], "spike", "{d}");
    assert_eq!(d["value"], 200.0, "{d}");
    assert_eq!(d["expected"], 10.0, "{d}");
    inkwire_shared::schema::schemas()
        .validate_event(&found[0])
        .unwrap_or_else(|errs| panic!("{}: {errs:?}", found[0]));
}
