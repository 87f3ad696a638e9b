//! The in-app inbox against real redis-server, nats-server and relay: notifications seeded the
//! way the notifier stores them (`inbox::add`), then listed, paged, filtered, marked read and
//! deleted through the HTTP API with exact counts; trimming to the inbox limit; and the
//! unread count under concurrency, as the API answers it and as two WebSocket clients
//! subscribed to `user:{id}` see it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use inkwire_notifications::inbox;
use inkwire_notifications::model::Priority;
use inkwire_notifications::send::Notification;
use inkwire_tests::{TestEnv, WsClient, json};
use reqwest::StatusCode;
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

const LIST: &str = "/api/realtime/notifications";
const COUNT: &str = "/api/realtime/notifications/unread-count";
const READ_ALL: &str = "/api/realtime/notifications/read-all";

fn note(user: &str, i: usize, created_ms: i64) -> Notification {
    Notification {
        id: Uuid::now_v7(),
        user_id: user.into(),
        category: "chat".into(),
        priority: Priority::Medium,
        title: format!("Message {i}"),
        body: "hello".into(),
        email: None,
        sms: None,
        push: None,
        data: json!({"i": i}),
        channels: None,
        group_key: None,
        template: None,
        project_id: None,
        send_at: None,
        created_at: OffsetDateTime::from_unix_timestamp_nanos(created_ms as i128 * 1_000_000)
            .unwrap(),
        sender: "svc".into(),
    }
}

async fn add(env: &TestEnv, n: &Notification) -> inbox::AddOutcome {
    let mut redis = env.state.redis.clone();
    inbox::add(&mut redis, &env.state.js, n, 1000)
        .await
        .unwrap()
}

fn read_path(id: impl std::fmt::Display) -> String {
    format!("/api/realtime/notifications/{id}/read")
}

fn titles(page: &Value) -> Vec<String> {
    page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["title"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn list_page_filter_read_and_delete_with_exact_counts() {
    let env = TestEnv::start().await;
    let ann = env.token("ann");
    let base = 1_763_800_000_000i64;
    // 25 notifications; 0-9 share one millisecond, so paging must order ties stably.
    let mut notes = Vec::new();
    for i in 0..25 {
        let ms = if i < 10 { base } else { base + i as i64 };
        let n = note("ann", i, ms);
        let out = add(&env, &n).await;
        assert!(out.created);
        assert_eq!(out.unread_count, i as u64 + 1);
        assert_eq!(out.version, i as u64 + 1);
        notes.push(n);
    }
    // Someone else's notification.
    let other = note("bob", 99, base);
    add(&env, &other).await;

    // Three pages of 10, 10 and 5, newest first, every notification exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("{LIST}?limit=10&cursor={c}"),
            None => format!("{LIST}?limit=10"),
        };
        let (status, page) = env.get(&path, &ann).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        // One more arrives after the first page (below).
        assert_eq!(page["unreadCount"], if pages == 0 { 25 } else { 26 });
        pages += 1;
        for n in page["notifications"].as_array().unwrap() {
            assert_eq!(n["userId"], "ann");
            assert_eq!(n["read"], false);
            seen.push(n["id"].as_str().unwrap().to_string());
        }
        match page.get("nextCursor").and_then(Value::as_str) {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        // A notification added meanwhile does not shift later pages.
        if pages == 1 {
            let newer = note("ann", 100, base + 1_000);
            add(&env, &newer).await;
            notes.push(newer);
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 25);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 25);
    let created: Vec<i64> = seen
        .iter()
        .map(|id| {
            let n = notes.iter().find(|n| n.id.to_string() == *id).unwrap();
            n.created_ms()
        })
        .collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first");

    // Marks: the count drops by one per notification, never twice.
    for n in &notes[..5] {
        let (status, body) = env.post(&read_path(n.id), &ann, &json!({})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["changed"], true);
    }
    let (status, body) = env.post(&read_path(notes[0].id), &ann, &json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["changed"], false);
    assert_eq!(body["unreadCount"], 21);
    let (_, count) = env.get(COUNT, &ann).await;
    assert_eq!(count["unreadCount"], 21);
    let (_, page) = env
        .get(&format!("{LIST}?unread=true&limit=100"), &ann)
        .await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 21);
    assert!(!titles(&page).contains(&"Message 0".to_string()));
    let (_, page) = env.get(&format!("{LIST}?limit=100"), &ann).await;
    let read: Vec<&Value> = page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["read"] == true)
        .collect();
    assert_eq!(read.len(), 5);

    // Another user's notification is not found, whatever is asked of it.
    let (status, problem) = env.post(&read_path(other.id), &ann, &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    let (status, _) = env.delete(&format!("{LIST}/{}", other.id), &ann).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env
        .get(&format!("{LIST}/{}/deliveries", other.id), &ann)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = env.post(&read_path("not-a-uuid"), &ann, &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, bob) = env.get(COUNT, &env.token("bob")).await;
    assert_eq!(bob["unreadCount"], 1);

    // Delete an unread one and a read one.
    let (status, body) = env.delete(&format!("{LIST}/{}", notes[10].id), &ann).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["unreadCount"], 20);
    let (status, body) = env.delete(&format!("{LIST}/{}", notes[1].id), &ann).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["unreadCount"], 20);
    let (status, _) = env.delete(&format!("{LIST}/{}", notes[1].id), &ann).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A redelivered add does not bring a deleted notification back.
    let again = add(&env, &notes[10]).await;
    assert!(!again.created);
    assert_eq!(again.unread_count, 20);
    let (_, page) = env.get(&format!("{LIST}?limit=100"), &ann).await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 24);

    // Read all.
    let (status, body) = env.post(READ_ALL, &ann, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (body["marked"].clone(), body["unreadCount"].clone()),
        (json!(20), json!(0))
    );
    let (_, page) = env.get(&format!("{LIST}?unread=true"), &ann).await;
    assert_eq!(page["notifications"], json!([]));
    assert_eq!(page["unreadCount"], 0);
    let (_, body) = env.post(READ_ALL, &ann, &json!({})).await;
    assert_eq!(body["marked"], 0);

    // Bad query parameters.
    for (query, code) in [
        ("unread=yes", "invalid_parameter"),
        ("limit=0", "invalid_parameter"),
        ("limit=101", "invalid_parameter"),
        ("cursor=abc", "invalid_parameter"),
        ("page=2", "unknown_parameter"),
    ] {
        let (status, problem) = env.get(&format!("{LIST}?{query}"), &ann).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {problem}");
        assert_eq!(problem["code"], code, "{query}");
    }
}

#[tokio::test]
async fn adds_are_idempotent_and_the_inbox_is_trimmed_with_its_unread_count() {
    let env = TestEnv::start().await;
    let mut redis = env.state.redis.clone();
    let base = 1_763_800_000_000i64;
    let notes: Vec<Notification> = (0..8).map(|i| note("cy", i, base + i as i64)).collect();
    let first = inbox::add(&mut redis, &env.state.js, &notes[0], 5)
        .await
        .unwrap();
    let again = inbox::add(&mut redis, &env.state.js, &notes[0], 5)
        .await
        .unwrap();
    assert!(first.created && !again.created);
    assert_eq!((again.unread_count, again.version), (1, 1));
    let (unread, _, _) = inbox::mark_read(&mut redis, &env.state.js, "cy", notes[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unread, 0);
    for n in &notes[1..] {
        inbox::add(&mut redis, &env.state.js, n, 5).await.unwrap();
    }
    // 8 added, 5 kept: the newest; the read one was among the trimmed, so 5 are unread.
    let page = inbox::list(&mut redis, "cy", false, 100, None)
        .await
        .unwrap();
    let kept: Vec<String> = page
        .notifications
        .iter()
        .map(|n| n["title"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kept,
        [
            "Message 7",
            "Message 6",
            "Message 5",
            "Message 4",
            "Message 3"
        ]
    );
    assert_eq!(page.unread_count, 5);
    assert_eq!(inbox::unread_count(&mut redis, "cy").await.unwrap().0, 5);
    // A trimmed one does not come back.
    let back = inbox::add(&mut redis, &env.state.js, &notes[1], 5)
        .await
        .unwrap();
    assert!(!back.created);
    assert_eq!(back.unread_count, 5);
}

/// Notification frames of `user:{id}` read until `count` versions arrived (they may come in
/// any order) or 10 s passed: version → (event, unread count).
async fn frames_until(client: &mut WsClient, count: usize) -> BTreeMap<u64, (String, u64)> {
    let mut out = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < count {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(frame) = client.next_within(left).await else {
            break;
        };
        if frame["type"] != "notification" {
            continue;
        }
        let data = &frame["data"];
        out.insert(
            data["version"].as_u64().unwrap(),
            (
                data["event"].as_str().unwrap().to_string(),
                data["unreadCount"].as_u64().unwrap(),
            ),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_unread_count_is_exact_under_concurrent_adds_and_marks() {
    let env = TestEnv::start().await;
    let dee = env.token("dee");
    let mut a = WsClient::connect(&env.ws_url("notifications", &dee)).await;
    let mut b = WsClient::connect(&env.ws_url("notifications", &dee)).await;
    assert_eq!(a.next().await["op"], "subscribed");
    assert_eq!(b.next().await["op"], "subscribed");

    let base = 1_763_800_000_000i64;
    let notes: Vec<Notification> = (0..200).map(|i| note("dee", i, base + i as i64)).collect();
    // 200 adds and 100 marks (of half of them) all at once: a mark that arrives before its
    // add is a 404 and is tried again.
    let mut tasks = tokio::task::JoinSet::new();
    for n in notes.clone() {
        let (mut redis, js) = (env.state.redis.clone(), env.state.js.clone());
        tasks.spawn(async move {
            inbox::add(&mut redis, &js, &n, 1000).await.unwrap();
        });
    }
    for n in notes.iter().step_by(2) {
        let url = env.url(&read_path(n.id));
        let (http, token) = (env.http.clone(), dee.clone());
        tasks.spawn(async move {
            loop {
                let res = http.post(&url).bearer_auth(&token).send().await.unwrap();
                match res.status() {
                    StatusCode::OK => break,
                    StatusCode::NOT_FOUND => tokio::time::sleep(Duration::from_millis(5)).await,
                    s => panic!("mark read: {s}"),
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }

    let (status, count) = env.get(COUNT, &dee).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(count["unreadCount"], 100);
    // 200 adds and 100 marks that each changed something: 300 versions.
    assert_eq!(count["version"], 300);
    let (_, page) = env
        .get(&format!("{LIST}?unread=true&limit=100"), &dee)
        .await;
    assert_eq!(page["notifications"].as_array().unwrap().len(), 100);
    assert!(page.get("nextCursor").is_none());

    for client in [&mut a, &mut b] {
        let frames = frames_until(client, 300).await;
        let (&top, (event, unread)) = frames.last_key_value().expect("frames arrived");
        assert_eq!(top, 300, "the last change's frame arrived");
        assert_eq!(
            *unread, 100,
            "the newest frame ({event}) carries the exact count"
        );
        // Every frame's count is the count at its version: adds raise it, marks lower it.
        let adds = frames.values().filter(|(e, _)| e == "notification").count();
        let marks = frames
            .values()
            .filter(|(e, _)| e == "notifications_read")
            .count();
        assert_eq!((adds, marks), (200, 100));
    }
}
