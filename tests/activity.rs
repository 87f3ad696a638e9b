//! The activity log (issue 12) against real nats-server and redis-server: activity of every
//! source through the real APIs lands once each (a redelivery and a replay change nothing),
//! `from` / `to` / `type` / cursor pages, statistics per local day across a time-zone
//! boundary with a streak, retention trimmed on write and by the sweep, nobody reads
//! another user's log, bad input on every route, and no message or comment text in any
//! Redis value the activity log wrote.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_activity::sources::sources;
use inkwire_activity::worker::{self, ActivityConfig};
use inkwire_notifications::inbox;
use inkwire_notifications::model::Priority;
use inkwire_notifications::send::Notification;
use inkwire_shared::consumer::Delivery;
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{TestEnv, start_session};
use reqwest::StatusCode;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const ACTIVITY: &str = "/api/realtime/activity";
const STATS: &str = "/api/realtime/activity/stats";
const PUBLISH: &str = "/api/realtime/events/publish";

fn iso(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

/// Publishes an event through the events API.
async fn publish(env: &TestEnv, token: &str, event: Value) {
    let (s, b) = env.post(PUBLISH, token, &event).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
}

fn comment(user: &str, text: &str, at: OffsetDateTime) -> Value {
    json!({"category": "collaboration", "type": "comment_added", "userId": user,
        "projectId": "p-1", "documentId": "d-1", "timestamp": iso(at),
        "data": {"commentId": format!("c-{}", uuid::Uuid::new_v4().simple()), "text": text}})
}

fn edit(user: &str, at: OffsetDateTime) -> Value {
    json!({"category": "collaboration", "type": "edit_applied", "userId": user,
        "projectId": "p-1", "timestamp": iso(at), "data": {"operation": "insert", "length": 3}})
}

/// Every entry of `path` (query included), following cursors.
async fn all_entries(env: &TestEnv, token: &str, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}cursor={c}"),
            None => path.to_string(),
        };
        let (s, b) = env.get(&url, token).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        out.extend(b["entries"].as_array().unwrap().iter().cloned());
        match b["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return out,
        }
    }
    panic!("more than 100 pages");
}

/// Waits until `user`'s log has `n` entries; returns them.
async fn wait_for(env: &TestEnv, user: &str, n: usize) -> Vec<Value> {
    let token = env.token(user);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let entries = all_entries(env, &token, ACTIVITY).await;
        if entries.len() >= n || tokio::time::Instant::now() > deadline {
            assert_eq!(entries.len(), n, "{entries:#?}");
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn types(entries: &[Value]) -> Vec<String> {
    let mut t: Vec<String> = entries
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    t.sort();
    t
}

/// Every value the activity log keeps in Redis, as text.
async fn activity_values(env: &TestEnv) -> Vec<String> {
    let mut redis = env.state.redis.clone();
    let names: Vec<&str> = sources().iter().map(|s| s.name).collect();
    let keys = inkwire_activity::store::all_keys(&mut redis, &names)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut redis)
            .await
            .unwrap();
        let values: Vec<String> = match kind.as_str() {
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .query_async(&mut redis)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut redis)
                .await
                .unwrap(),
            "string" => vec![
                redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut redis)
                    .await
                    .unwrap(),
            ],
            "none" => continue,
            other => panic!("unexpected {other} at {key}"),
        };
        out.push(key);
        out.extend(values);
    }
    out
}

fn note(user: &str) -> Notification {
    Notification {
        id: uuid::Uuid::now_v7(),
        user_id: user.into(),
        category: "chat".into(),
        priority: Priority::Medium,
        title: "SECRET-NOTIFICATION-TITLE".into(),
        body: "SECRET-NOTIFICATION-BODY".into(),
        email: None,
        sms: None,
        push: None,
        data: json!({}),
        channels: None,
        group_key: None,
        template: None,
        project_id: None,
        send_at: None,
        created_at: OffsetDateTime::now_utc(),
        sender: "svc".into(),
    }
}

#[tokio::test]
async fn activity_of_every_source_lands_once_holds_no_text_and_is_private() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "ann", ProjectRole::Editor).await;
    env.register_document("p-1", "d-1").await;
    let ann = env.token("ann");
    let now = OffsetDateTime::now_utc();

    // Writing: a session started and ended through the writing API.
    let session = start_session(&env, &ann).await;
    let (s, b) = env
        .post(
            &format!("/api/realtime/writing/sessions/{session}/end"),
            &ann,
            &json!({}),
        )
        .await;
    assert!(s.is_success(), "{s} {b}");
    // A comment and an edit through the events API.
    publish(&env, &ann, comment("ann", "SECRET-COMMENT-TEXT", now)).await;
    publish(&env, &ann, edit("ann", now)).await;
    // A chat message through the chat API.
    let (s, room) = env
        .post(
            "/api/realtime/chat/rooms",
            &ann,
            &json!({"participants": ["bob"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{room}");
    let room = room["id"].as_str().unwrap().to_string();
    let (s, b) = env
        .post(
            &format!("/api/realtime/chat/rooms/{room}/messages"),
            &ann,
            &json!({"clientMessageId": "m-1", "text": "SECRET-CHAT-TEXT"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    // A notification read through the notifications API (stored the way the notifier does).
    let n = note("ann");
    let mut redis = env.state.redis.clone();
    inbox::add(&mut redis, &env.state.js, &n, 1000)
        .await
        .unwrap();
    let (s, b) = env
        .post(
            &format!("/api/realtime/notifications/{}/read", n.id),
            &ann,
            &json!({}),
        )
        .await;
    assert!(s.is_success(), "{s} {b}");
    // A workflow run, published by a back end for ann.
    publish(
        &env,
        &env.service_token(),
        json!({"category": "automation", "type": "workflow_started", "userId": "ann",
            "projectId": "p-1", "data": {"workflowId": "wf-1", "executionId": "x-1", "trigger": "manual"}}),
    )
    .await;
    publish(
        &env,
        &env.service_token(),
        json!({"category": "automation", "type": "action_executed", "userId": "ann",
            "data": {"workflowId": "wf-1", "executionId": "x-1", "actionId": "a", "status": "succeeded"}}),
    )
    .await;

    let entries = wait_for(&env, "ann", 7).await;
    assert_eq!(
        types(&entries),
        [
            "chat_message",
            "comment",
            "edit",
            "notifications_read",
            "workflow_started",
            "writing_session_ended",
            "writing_session_started"
        ]
    );
    let chat = entries
        .iter()
        .find(|e| e["type"] == "chat_message")
        .unwrap();
    assert_eq!(chat["roomId"], room.as_str());
    let c = entries.iter().find(|e| e["type"] == "comment").unwrap();
    assert_eq!(
        (&c["projectId"], &c["documentId"]),
        (&json!("p-1"), &json!("d-1"))
    );
    // Newest first (compared as instants: RFC 3339 text drops trailing zeros, so
    // "…41.81Z" is later than "…41.817Z" as a string).
    let times: Vec<time::OffsetDateTime> = entries
        .iter()
        .map(|e| {
            time::OffsetDateTime::parse(
                e["at"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        })
        .collect();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(times, sorted);

    // Every message of every source delivered again (what a crash between the write and the
    // ack causes): nothing is counted twice.
    let clock = worker::clock(&env.state.config);
    let retention = ActivityConfig::default().retention_ms();
    let mut again = 0;
    for source in sources() {
        let msgs = read_stream(
            &env.state.js,
            &source.stream,
            source.filter.clone(),
            DeliverPolicy::All,
            10_000,
        )
        .await
        .unwrap();
        for m in msgs {
            let d = Delivery {
                subject: m.subject,
                payload: m.payload,
                stream_sequence: m.sequence,
                deliveries: 2,
                published: Some(m.published),
            };
            assert!(
                !worker::apply(&mut redis, &source, &d, clock, retention)
                    .await
                    .unwrap(),
                "{} seq {} applied twice",
                source.name,
                d.stream_sequence
            );
            again += 1;
        }
    }
    assert!(again >= 7, "{again}");
    let after = all_entries(&env, &ann, ACTIVITY).await;
    assert_eq!(after, entries);
    let (_, stats) = env.get(STATS, &ann).await;
    assert_eq!(
        stats["days"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["total"].as_u64().unwrap())
            .sum::<u64>(),
        7,
        "{stats}"
    );

    // `inkwire replay activity` rebuilds the same log.
    let replayed = inkwire_activity::replay::replay(
        &env.state.js,
        &env.state.redis,
        clock,
        &ActivityConfig::default(),
    )
    .await
    .unwrap();
    assert!(replayed.recorded >= 7, "{replayed:?}");
    assert_eq!(all_entries(&env, &ann, ACTIVITY).await, entries);

    // No text of a message, comment or notification in anything the activity log stored.
    let values = activity_values(&env).await;
    assert!(
        values.iter().any(|v| v.contains("chat_message")),
        "{values:?}"
    );
    for v in &values {
        assert!(!v.contains("SECRET"), "text stored: {v}");
    }

    // Another user sees nothing of ann's; only an admin or service token may name her.
    let bob = env.token("bob");
    let (s, b) = env.get(ACTIVITY, &bob).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["entries"], json!([]), "{b}");
    let (_, b) = env.get(STATS, &bob).await;
    assert_eq!(b["activeDays"], 0, "{b}");
    for path in [
        format!("{ACTIVITY}?userId=ann"),
        format!("{STATS}?userId=ann"),
    ] {
        let (s, b) = env.get(&path, &bob).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
        assert_eq!(b["code"], "forbidden", "{b}");
    }
    let as_admin = all_entries(&env, &env.admin_token(), &format!("{ACTIVITY}?userId=ann")).await;
    assert_eq!(as_admin, entries);
    let (s, b) = env
        .get(&format!("{STATS}?userId=ann"), &env.service_token())
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["userId"], "ann");
    // bob's own chat activity is his: he sent nothing, the room's message is ann's.
    let (_, b) = env.get(&format!("{ACTIVITY}?userId=bob"), &bob).await;
    assert_eq!(b["entries"], json!([]));
}

#[tokio::test]
async fn from_to_type_and_cursor_pages() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "cat", ProjectRole::Editor).await;
    env.register_document("p-1", "d-1").await;
    let token = env.token("cat");
    let now = OffsetDateTime::now_utc();
    let hours = |h: i64| now - time::Duration::hours(h);
    for h in 1..=6 {
        publish(&env, &token, comment("cat", "c", hours(h))).await;
        publish(
            &env,
            &token,
            edit("cat", hours(h) - time::Duration::minutes(30)),
        )
        .await;
    }
    let all = wait_for(&env, "cat", 12).await;

    // Pages of 5, newest first, every entry once.
    let (s, first) = env.get(&format!("{ACTIVITY}?limit=5"), &token).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(first["entries"].as_array().unwrap().len(), 5);
    let paged = all_entries(&env, &token, &format!("{ACTIVITY}?limit=5")).await;
    assert_eq!(paged, all);
    let ids: BTreeSet<&str> = paged.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 12);
    let at: Vec<OffsetDateTime> = paged
        .iter()
        .map(|e| OffsetDateTime::parse(e["at"].as_str().unwrap(), &Rfc3339).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]));
    assert!((at[0] - hours(1)).abs() < time::Duration::milliseconds(2));

    // type
    let comments = all_entries(&env, &token, &format!("{ACTIVITY}?type=comment&limit=2")).await;
    assert_eq!(comments.len(), 6);
    assert!(comments.iter().all(|e| e["type"] == "comment"));

    // from (inclusive) and to (exclusive): the comments of hours 2..=4 and the edits of 2..=3.
    let window = format!(
        "{ACTIVITY}?from={}&to={}&limit=3",
        iso(hours(4) - time::Duration::seconds(1)).replace('+', "%2B"),
        iso(hours(2) + time::Duration::seconds(1)).replace('+', "%2B")
    );
    let some = all_entries(&env, &token, &window).await;
    assert_eq!(
        types(&some),
        ["comment", "comment", "comment", "edit", "edit"],
        "{some:#?}"
    );
    let (_, b) = env.get(&format!("{window}&type=edit"), &token).await;
    assert_eq!(b["entries"].as_array().unwrap().len(), 2, "{b}");
}

/// A zone whose latest local midnight lies between 1 and 23 hours ago, and that midnight.
fn zone_with_recent_midnight(now: jiff::Timestamp) -> (String, jiff::Timestamp) {
    let candidates = [
        "Asia/Kathmandu",
        "Asia/Kolkata",
        "America/New_York",
        "Asia/Tokyo",
    ]
    .into_iter()
    .map(str::to_string)
    .chain((-12..=14).map(|h: i32| {
        // POSIX signs: Etc/GMT-3 is UTC+3.
        if h == 0 {
            "Etc/UTC".to_string()
        } else {
            format!("Etc/GMT{}{}", if h > 0 { "-" } else { "+" }, h.abs())
        }
    }));
    for name in candidates {
        let tz = jiff::tz::TimeZone::get(&name).unwrap();
        let midnight = now.to_zoned(tz).start_of_day().unwrap().timestamp();
        let ago = now.duration_since(midnight).as_secs();
        if (3600..23 * 3600).contains(&ago) {
            return (name, midnight);
        }
    }
    unreachable!("some whole-hour zone has had midnight 1-23 hours ago")
}

#[tokio::test]
async fn stats_count_per_local_day_across_a_time_zone_boundary_with_a_streak() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "dee", ProjectRole::Editor).await;
    env.register_document("p-1", "d-1").await;
    let token = env.token("dee");
    let (zone, midnight) = zone_with_recent_midnight(jiff::Timestamp::now());
    let at = |minutes: i64| {
        OffsetDateTime::from_unix_timestamp(midnight.as_second() + minutes * 60).unwrap()
    };
    // One comment 20 minutes before local midnight, two after it (and an edit).
    publish(&env, &token, comment("dee", "x", at(-20))).await;
    publish(&env, &token, comment("dee", "x", at(20))).await;
    publish(&env, &token, comment("dee", "x", at(40))).await;
    publish(&env, &token, edit("dee", at(41))).await;
    wait_for(&env, "dee", 4).await;

    let (s, stats) = env
        .get(&format!("{STATS}?tz={}", zone.replace('+', "%2B")), &token)
        .await;
    assert_eq!(s, StatusCode::OK, "{stats}");
    assert_eq!(stats["timeZone"], zone.as_str());
    let tz = jiff::tz::TimeZone::get(&zone).unwrap();
    let today = midnight.to_zoned(tz.clone()).date();
    let yesterday = today.yesterday().unwrap();
    assert_eq!(
        stats["days"],
        json!([
            {"date": yesterday.to_string(), "total": 1, "byType": {"comment": 1}},
            {"date": today.to_string(), "total": 3, "byType": {"comment": 2, "edit": 1}},
        ]),
        "{stats}"
    );
    assert_eq!(stats["activeDays"], 2);
    assert_eq!(stats["currentStreak"], 2);
    assert_eq!(stats["longestStreak"], 2);
    assert_eq!(stats["totals"], json!({"comment": 3, "edit": 1}));
    assert_eq!(stats["hours"][0], 3, "{stats}");
    assert_eq!(stats["hours"][23], 1, "{stats}");
    assert_eq!(stats["mostActiveHours"][0], json!({"hour": 0, "count": 3}));

    // Without `tz`, the time zone of the notification preferences.
    let (s, b) = env
        .put(
            "/api/realtime/notifications/preferences",
            &token,
            &json!({"timeZone": zone}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, again) = env.get(STATS, &token).await;
    assert_eq!(again["timeZone"], zone.as_str());
    assert_eq!(again["days"], stats["days"]);
}

#[tokio::test]
async fn retention_trims_on_write_and_by_the_sweep() {
    let retention = Duration::from_secs(2);
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.activity.retention = retention;
            s.activity.sweep_interval = Duration::from_millis(200);
        },
    )
    .await;
    env.add_member("p-1", "eve", ProjectRole::Editor).await;
    env.register_document("p-1", "d-1").await;
    let token = env.token("eve");
    publish(&env, &token, comment("eve", "x", OffsetDateTime::now_utc())).await;
    wait_for(&env, "eve", 1).await;
    let mut redis = env.state.redis.clone();
    let log = inkwire_activity::store::log_key("eve");
    let queue = inkwire_activity::store::sweep_queue();
    assert!(queue.score(&mut redis, "eve").await.unwrap().is_some());

    // The sweep removes it once it is older than the retention, with no further write.
    let deadline = tokio::time::Instant::now() + retention + Duration::from_secs(5);
    loop {
        let left: u64 = redis::cmd("ZCARD")
            .arg(&log)
            .query_async(&mut redis)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queue.score(&mut redis, "eve").await.unwrap(), None);
    let (_, b) = env.get(ACTIVITY, &token).await;
    assert_eq!(b["entries"], json!([]));

    // A write trims what expired, without the sweep: an entry put beside it by hand (as if
    // the sweep had not run yet) is gone after the next write.
    let old = format!(
        "{}|{}",
        inkwire_activity::store::entry_id(1, "comments", 1),
        json!({"type": "comment", "at": 1})
    );
    redis::cmd("ZADD")
        .arg(&log)
        .arg(0)
        .arg(&old)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    publish(&env, &token, comment("eve", "x", OffsetDateTime::now_utc())).await;
    wait_for(&env, "eve", 1).await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(&log)
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_ne!(members[0], old);

    // An event older than the retention when it is consumed is not recorded at all.
    let stale = OffsetDateTime::now_utc() - time::Duration::hours(1);
    publish(&env, &token, comment("eve", "x", stale)).await;
    publish(&env, &token, edit("eve", OffsetDateTime::now_utc())).await;
    let entries = wait_for(&env, "eve", 2).await;
    assert_eq!(types(&entries), ["comment", "edit"]);
}

#[tokio::test]
async fn bad_input_on_every_route_is_a_clear_problem() {
    let env = TestEnv::start().await;
    let token = env.token("fay");
    for path in [ACTIVITY, STATS] {
        let (s, b) = env.get(path, "not-a-token").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {b}");
        let (s, _, _) = env.send(env.http.get(env.url(path))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
        let (s, b) = env.get(&format!("{path}?page=2"), &token).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("unknown_parameter")),
            "{b}"
        );
        let (s, b) = env.get(&format!("{path}?userId=a.b"), &token).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_id")),
            "{b}"
        );
    }
    for query in [
        "from=yesterday",
        "to=2026-13-01T00:00:00Z",
        "from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z",
        "type=keystroke",
        "cursor=abc",
        "cursor=0000000000999.nope.00000000000000000007",
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=%2B5",
    ] {
        let (s, b) = env.get(&format!("{ACTIVITY}?{query}"), &token).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{query}: {b}");
        assert_eq!(b["code"], "invalid_parameter", "{query}: {b}");
        assert!(b["detail"].as_str().unwrap().len() > 10, "{b}");
    }
    for tz in ["Mars/Olympus", "", "UTC%2B1", &"A".repeat(200)] {
        let (s, b) = env.get(&format!("{STATS}?tz={tz}"), &token).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{tz}: {b}");
        assert_eq!(b["code"], "invalid_parameter", "{tz}: {b}");
    }
    let (s, b) = env.get(&format!("{STATS}?tz=Europe/Berlin"), &token).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["activeDays"], 0);
}
