//! Chat rooms (issue 12) against real nats-server and redis-server: concurrent sends in one
//! order with exact unread counts, idempotent sends, history in both directions, edits and
//! tombstones of one's own messages only, read receipts, typing (rate limited, not stored),
//! a removed participant cut off on two relay instances, and bad input on every route.

use std::time::Duration;

use inkwire_tests::TestEnv;
use inkwire_tests::ws::{Ended, WsClient, ws_url};
use reqwest::StatusCode;
use serde_json::{Value, json};

const ROOMS: &str = "/api/realtime/chat/rooms";

async fn create_room(env: &TestEnv, owner: &str, others: &[&str]) -> String {
    let (s, b) = env
        .post(
            ROOMS,
            &env.token(owner),
            &json!({"name": "r", "participants": others}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    b["id"].as_str().unwrap().to_string()
}

async fn send(env: &TestEnv, room: &str, user: &str, cid: &str, text: &str) -> (StatusCode, Value) {
    env.post(
        &format!("{ROOMS}/{room}/messages"),
        &env.token(user),
        &json!({"clientMessageId": cid, "text": text}),
    )
    .await
}

async fn unread(env: &TestEnv, room: &str, user: &str) -> u64 {
    let (s, b) = env.get(&format!("{ROOMS}/{room}"), &env.token(user)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["unread"].as_u64().unwrap()
}

async fn frames_within(c: &mut WsClient, wait: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Ok(f) => out.push(f),
            Err(Ended::Timeout) => return out,
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_sends_are_stored_once_in_one_order_with_exact_unread_counts() {
    let env = TestEnv::start().await;
    let users: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let room = create_room(&env, "u0", &others).await;
    let mut watcher = WsClient::connect(&env.ws_url("collaboration", &env.token("u3"))).await;
    assert_eq!(
        watcher.subscribe(&format!("room:{room}"), None).await["op"],
        "subscribed"
    );

    let mut tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for n in 0..100 {
            let (env, room, user) = (&env, room.clone(), user.clone());
            tasks.push(async move {
                // A 503 (Redis slower than the response timeout on a loaded machine) may
                // or may not have stored the message: the API's answer is to retry with the
                // same client id, which stores nothing twice — what the counts check below.
                let cid = format!("c{i}-{n}");
                let mut tries = 0;
                loop {
                    let (s, b) = send(env, &room, &user, &cid, "hi").await;
                    if s == StatusCode::SERVICE_UNAVAILABLE && tries < 5 {
                        tries += 1;
                        continue;
                    }
                    assert!(s == StatusCode::CREATED || s == StatusCode::OK, "{s} {b}");
                    break;
                }
            });
        }
    }
    futures::future::join_all(tasks).await;

    // History forward from 0: sequences 1..=1000, every client id once.
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let (s, b) = env
            .get(
                &format!("{ROOMS}/{room}/messages?after={after}&limit=100"),
                &env.token("u5"),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        all.extend(b["messages"].as_array().unwrap().clone());
        match b["nextCursor"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());
    let mut ids: Vec<String> = all
        .iter()
        .map(|m| format!("{}/{}", m["senderId"], m["clientMessageId"]))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 1000);
    assert_eq!(env.stream_messages("CHAT").await, 1000);
    for user in &users {
        assert_eq!(unread(&env, &room, user).await, 900, "{user}");
    }
    // The live frames carry the same sequences, each once.
    let mut live: Vec<u64> = frames_within(&mut watcher, Duration::from_secs(2))
        .await
        .iter()
        .filter(|f| f["data"]["event"] == "message_new")
        .map(|f| f["data"]["message"]["seq"].as_u64().unwrap())
        .collect();
    live.sort();
    assert_eq!(live, (1..=1000).collect::<Vec<u64>>());
    // The room list shows the count and the last message.
    let (_, list) = env.get(ROOMS, &env.token("u1")).await;
    assert_eq!(list["rooms"][0]["unread"], 900, "{list}");
    assert_eq!(list["rooms"][0]["lastMessage"]["seq"], 1000, "{list}");

    // A receipt part of the way, walked a few messages per script call, counts exactly what
    // it passes: u2 reads up to 500 in steps of 7; left unread are the others' messages after.
    let others_after = |user: &str, from: u64| {
        all.iter()
            .filter(|m| m["seq"].as_u64().unwrap() > from && m["senderId"] != user)
            .count() as u64
    };
    let mut redis = env.state.redis.clone();
    let read = inkwire_chat::store::mark_read_in_steps(&mut redis, &room, "u2", 500, 7)
        .await
        .unwrap();
    let inkwire_chat::store::Outcome::Done(read) = read else {
        panic!("{read:?}")
    };
    assert_eq!((read.up_to, read.moved), (500, true));
    assert_eq!(read.unread, others_after("u2", 500));
    assert_eq!(unread(&env, &room, "u2").await, others_after("u2", 500));
    // Up to the last message, whatever the gap, nothing is left.
    let (s, b) = env
        .post(
            &format!("{ROOMS}/{room}/read"),
            &env.token("u2"),
            &json!({"upTo": 1000}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["upTo"].as_u64(), b["unread"].as_u64()),
        (Some(1000), Some(0))
    );
}

#[tokio::test]
async fn send_is_idempotent_history_pages_edits_deletes_reads_and_typing() {
    let env = TestEnv::start().await;
    let room = create_room(&env, "ana", &["ben"]).await;
    let (s1, first) = send(&env, &room, "ana", "c-1", "one").await;
    assert_eq!(s1, StatusCode::CREATED, "{first}");
    let (s2, again) = send(&env, &room, "ana", "c-1", "one").await;
    assert_eq!(s2, StatusCode::OK, "{again}");
    assert_eq!(first, again);
    // The same id with another text is a second message under a reused id, not a retry:
    // refused, and nothing is stored, counted or logged.
    let (s3, reused) = send(&env, &room, "ana", "c-1", "not one").await;
    assert_eq!(s3, StatusCode::CONFLICT, "{reused}");
    assert_eq!(reused["code"], "client_message_id_reused", "{reused}");
    for n in 2..=7 {
        send(&env, &room, "ana", &format!("c-{n}"), &format!("m{n}")).await;
    }
    assert_eq!(env.stream_messages("CHAT").await, 7);
    let ben = env.token("ben");
    // Newest first, three per page.
    let (_, p1) = env
        .get(&format!("{ROOMS}/{room}/messages?limit=3"), &ben)
        .await;
    let seqs = |b: &Value| -> Vec<u64> {
        b["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&p1), vec![7, 6, 5]);
    let (_, p2) = env
        .get(
            &format!(
                "{ROOMS}/{room}/messages?limit=3&before={}",
                p1["nextCursor"]
            ),
            &ben,
        )
        .await;
    assert_eq!(seqs(&p2), vec![4, 3, 2]);
    let (_, p3) = env
        .get(
            &format!(
                "{ROOMS}/{room}/messages?limit=3&before={}",
                p2["nextCursor"]
            ),
            &ben,
        )
        .await;
    assert_eq!(seqs(&p3), vec![1]);
    assert!(p3["nextCursor"].is_null());
    let (_, f) = env
        .get(&format!("{ROOMS}/{room}/messages?after=4"), &ben)
        .await;
    assert_eq!(seqs(&f), vec![5, 6, 7]);

    // Edit and delete: own only.
    let (s, b) = env
        .put(
            &format!("{ROOMS}/{room}/messages/2"),
            &ben,
            &json!({"text": "x"}),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden"))
    );
    let (s, _) = env
        .delete(&format!("{ROOMS}/{room}/messages/2"), &ben)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = env
        .delete(&format!("{ROOMS}/{room}/messages/99"), &env.token("ana"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, b) = env
        .put(
            &format!("{ROOMS}/{room}/messages/2"),
            &env.token("ana"),
            &json!({"text": "two"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["message"]["text"], "two");
    assert!(b["message"]["editedAt"].is_string());
    let (s, b) = env
        .delete(&format!("{ROOMS}/{room}/messages/3"), &env.token("ana"))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["message"]["deleted"], true);
    assert!(b["message"].get("text").is_none());
    let (s, b) = env
        .put(
            &format!("{ROOMS}/{room}/messages/3"),
            &env.token("ana"),
            &json!({"text": "no"}),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("message_deleted"))
    );

    // Unread: 7 sent, one deleted → 6; reading up to 4 passes 1, 2, 4 (3 is deleted) → 3.
    assert_eq!(unread(&env, &room, "ben").await, 6);
    assert_eq!(unread(&env, &room, "ana").await, 0);
    let mut ws = WsClient::connect(&env.ws_url("collaboration", &env.token("ana"))).await;
    assert_eq!(
        ws.subscribe(&format!("room:{room}"), None).await["op"],
        "subscribed"
    );
    let (s, b) = env
        .post(&format!("{ROOMS}/{room}/read"), &ben, &json!({"upTo": 4}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["upTo"].as_u64(), b["unread"].as_u64()),
        (Some(4), Some(3))
    );
    // Never backwards; capped at the last message.
    let (_, b) = env
        .post(&format!("{ROOMS}/{room}/read"), &ben, &json!({"upTo": 2}))
        .await;
    assert_eq!(
        (b["upTo"].as_u64(), b["unread"].as_u64()),
        (Some(4), Some(3))
    );
    let (_, b) = env
        .post(&format!("{ROOMS}/{room}/read"), &ben, &json!({"upTo": 500}))
        .await;
    assert_eq!(
        (b["upTo"].as_u64(), b["unread"].as_u64()),
        (Some(7), Some(0))
    );

    // Reading only one's own messages passes nothing: still exact.
    let (s, b) = env
        .post(
            &format!("{ROOMS}/{room}/read"),
            &env.token("ana"),
            &json!({"upTo": 7}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(
        (b["upTo"].as_u64(), b["unread"].as_u64()),
        (Some(7), Some(0))
    );

    // Typing: pushed, rate limited, never stored.
    let (s, b) = env
        .post(&format!("{ROOMS}/{room}/typing"), &ben, &json!({}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let (s, b) = env
        .post(&format!("{ROOMS}/{room}/typing"), &ben, &json!({}))
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("typing_rate_limited"))
    );
    let frames = frames_within(&mut ws, Duration::from_millis(500)).await;
    let events: Vec<&str> = frames
        .iter()
        .filter_map(|f| f["data"]["event"].as_str())
        .collect();
    // Ben at 4, at 2 (no move: the same receipt, pushed once), at 7; Ana at 7; typing.
    assert_eq!(
        events,
        vec!["messages_read", "messages_read", "messages_read", "typing"],
        "{frames:?}"
    );
    assert_eq!(frames[0]["data"]["upTo"], 4);
    assert_eq!(
        env.stream_messages("CHAT").await,
        9,
        "7 messages, 1 edit, 1 tombstone"
    );
    let (_, h) = env.get(&format!("{ROOMS}/{room}/messages"), &ben).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 7);
}

#[tokio::test]
async fn a_removed_participant_receives_nothing_more_on_either_instance_and_cannot_read() {
    let env = TestEnv::start().await;
    let second = env.second_instance(|_| {}).await;
    let room = create_room(&env, "ana", &["ben", "cem"]).await;
    let channel = format!("room:{room}");
    let ben = env.token("ben");
    let mut one = WsClient::connect(&env.ws_url("collaboration", &ben)).await;
    let mut two = WsClient::connect(&ws_url(&second.base, "collaboration", &ben)).await;
    let mut cem =
        WsClient::connect(&ws_url(&second.base, "collaboration", &env.token("cem"))).await;
    for c in [&mut one, &mut two, &mut cem] {
        assert_eq!(c.subscribe(&channel, None).await["op"], "subscribed");
    }
    // Ben may not remove Cem (not the creator); Ana may remove Ben.
    let (s, _) = env
        .delete(&format!("{ROOMS}/{room}/participants/cem"), &ben)
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = env
        .delete(
            &format!("{ROOMS}/{room}/participants/ben"),
            &env.token("ana"),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["removed"], true);
    for c in [&mut one, &mut two] {
        let frames = frames_within(c, Duration::from_millis(700)).await;
        assert!(
            frames
                .iter()
                .any(|f| f["op"] == "unsubscribed" && f["channel"] == channel.as_str()),
            "{frames:?}"
        );
    }
    let (s, _) = send(&env, &room, "ana", "after", "secret").await;
    assert_eq!(s, StatusCode::CREATED);
    for c in [&mut one, &mut two] {
        let frames = frames_within(c, Duration::from_millis(500)).await;
        assert!(frames.iter().all(|f| f["op"] != "message"), "{frames:?}");
    }
    let frames = frames_within(&mut cem, Duration::from_millis(500)).await;
    assert!(
        frames.iter().any(|f| f["data"]["event"] == "message_new"),
        "{frames:?}"
    );
    // No history, no sends, no re-subscribe, the room is gone from his list.
    let (s, b) = env.get(&format!("{ROOMS}/{room}/messages"), &ben).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("room_not_found"))
    );
    let (s, _) = send(&env, &room, "ben", "x", "hi").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(one.subscribe(&channel, None).await["op"], "error");
    let (_, list) = env.get(ROOMS, &ben).await;
    assert_eq!(list["rooms"], json!([]));
    // Added back: he starts with nothing unread.
    let (s, b) = env
        .post(
            &format!("{ROOMS}/{room}/participants"),
            &env.token("cem"),
            &json!({"userId": "ben"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(unread(&env, &room, "ben").await, 0);
}

#[tokio::test]
async fn bad_input_on_every_route_is_refused_and_changes_nothing() {
    let env = TestEnv::start().await;
    let room = create_room(&env, "ana", &["ben"]).await;
    send(&env, &room, "ana", "c-1", "one").await;
    let ana = env.token("ana");
    let eve = env.token("eve");
    let bad_bodies = [
        json!({}),
        json!({"participants": "ben"}),
        json!({"participants": ["a.b"]}),
        json!({"participants": [], "extra": 1}),
    ];
    for body in &bad_bodies {
        let (s, b) = env.post(ROOMS, &ana, body).await;
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("validation_failed")),
            "{body}"
        );
    }
    let r = format!("{ROOMS}/{room}");
    let cases: Vec<(&str, String, Value, StatusCode, &str)> = vec![
        (
            "POST",
            format!("{r}/messages"),
            json!({"text": "x"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "POST",
            format!("{r}/messages"),
            json!({"clientMessageId": "a b", "text": "x"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "POST",
            format!("{r}/messages"),
            json!({"clientMessageId": "a", "text": ""}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "POST",
            format!("{ROOMS}/a.b/messages"),
            json!({"clientMessageId": "a", "text": "x"}),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "POST",
            format!("{r}/read"),
            json!({"upTo": -1}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "POST",
            format!("{r}/read"),
            json!({"upTo": "3"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "POST",
            format!("{r}/participants"),
            json!({"userId": "*"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "PUT",
            format!("{r}/messages/0"),
            json!({"text": "x"}),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "PUT",
            format!("{r}/messages/1"),
            json!({"text": 5}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "DELETE",
            format!("{r}/messages/abc"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "DELETE",
            format!("{r}/participants/a.b"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            "GET",
            format!("{r}/messages?limit=0"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            format!("{r}/messages?limit=101"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            format!("{r}/messages?before=1&after=1"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
        (
            "GET",
            format!("{r}/messages?page=2"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "unknown_parameter",
        ),
        (
            "GET",
            format!("{ROOMS}/a.b"),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
    ];
    for (method, path, body, status, code) in &cases {
        let (s, b) = match *method {
            "POST" => env.post(path, &ana, body).await,
            "PUT" => env.put(path, &ana, body).await,
            "DELETE" => env.delete(path, &ana).await,
            _ => env.get(path, &ana).await,
        };
        assert_eq!(
            (s, b["code"].as_str()),
            (*status, Some(*code)),
            "{method} {path} {body}"
        );
    }
    // A stranger: every room route answers 404 room_not_found (nothing to probe).
    for (method, path) in [
        ("GET", r.clone()),
        ("GET", format!("{r}/messages")),
        ("POST", format!("{r}/typing")),
        ("POST", format!("{r}/read")),
        ("POST", format!("{r}/messages")),
        ("POST", format!("{r}/participants")),
        ("PUT", format!("{r}/messages/1")),
        ("DELETE", format!("{r}/messages/1")),
        ("DELETE", format!("{r}/participants/ben")),
    ] {
        let body = match path.rsplit('/').next().unwrap() {
            "read" => json!({"upTo": 1}),
            "messages" => json!({"clientMessageId": "e", "text": "x"}),
            "participants" => json!({"userId": "eve"}),
            _ => json!({"text": "x"}),
        };
        let (s, b) = match method {
            "POST" => env.post(&path, &eve, &body).await,
            "PUT" => env.put(&path, &eve, &body).await,
            "DELETE" => env.delete(&path, &eve).await,
            _ => env.get(&path, &eve).await,
        };
        assert_eq!(
            (s, b["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("room_not_found")),
            "{method} {path}"
        );
    }
    // Without a token: 401.
    let (s, _) = env.get(ROOMS, "").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // Nothing changed.
    let (_, h) = env.get(&format!("{r}/messages"), &ana).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 1, "{h}");
    let (_, room_view) = env.get(&r, &ana).await;
    assert_eq!(room_view["participants"], json!(["ana", "ben"]));
    assert_eq!(env.stream_messages("CHAT").await, 1);
}
