//! The client session store (issue 12) against real nats-server and redis-server: create,
//! read, update, delete and list with the version in `ETag` and body; two concurrent
//! updates with the same `If-Match` giving exactly one `200` and one `412` (the winner's
//! state stored); sliding expiry (a read extends it, no read and it is gone); another
//! user's id answered `404`; the size limit (`413`) and the per-user cap; bad JSON, bad
//! ids, bad preconditions and missing tokens; and a preference change reaching the user's
//! other session over the relay, while an update that leaves the preferences as they were
//! sends nothing.

use std::time::Duration;

use inkwire_tests::TestEnv;
use inkwire_tests::ws::{Ended, WsClient};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

const SESSIONS: &str = "/api/realtime/client-sessions";

fn path(id: &str) -> String {
    format!("{SESSIONS}/{id}")
}

/// `PUT` with optional `If-Match` / `If-None-Match`.
async fn put(
    env: &TestEnv,
    user: &str,
    id: &str,
    body: &Value,
    if_match: Option<&str>,
    if_none_match: Option<&str>,
) -> (StatusCode, Value, HeaderMap) {
    let mut req = env
        .http
        .put(env.url(&path(id)))
        .bearer_auth(env.token(user))
        .json(body);
    if let Some(m) = if_match {
        req = req.header("If-Match", m);
    }
    if let Some(m) = if_none_match {
        req = req.header("If-None-Match", m);
    }
    env.send(req).await
}

async fn get(env: &TestEnv, user: &str, id: &str) -> (StatusCode, Value, HeaderMap) {
    env.send(
        env.http
            .get(env.url(&path(id)))
            .bearer_auth(env.token(user)),
    )
    .await
}

async fn list(env: &TestEnv, user: &str) -> Vec<Value> {
    let (s, b) = env.get(SESSIONS, &env.token(user)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b["sessions"].as_array().unwrap().clone()
}

fn etag(h: &HeaderMap) -> &str {
    h.get("etag").unwrap().to_str().unwrap()
}

fn assert_problem(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], want.as_u16(), "{body}");
}

#[tokio::test]
async fn create_read_update_delete_and_list() {
    let env = TestEnv::start().await;
    let body = json!({"state": {"route": "/p/1", "scroll": 120}, "preferences": {"theme": "dark"}});
    let (s, b, h) = put(&env, "alice", "tab-1", &body, None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(etag(&h), "\"1\"");
    assert_eq!(b["id"], "tab-1");
    assert_eq!(b["version"], 1);
    assert_eq!(b["state"], body["state"]);
    assert_eq!(b["preferences"], body["preferences"]);
    for field in ["createdAt", "updatedAt", "expiresAt"] {
        assert!(
            time::OffsetDateTime::parse(
                b[field].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339
            )
            .is_ok(),
            "{field}: {b}"
        );
    }

    // Read: the same, with its version.
    let (s, got, h) = get(&env, "alice", "tab-1").await;
    assert_eq!(s, StatusCode::OK, "{got}");
    assert_eq!(etag(&h), "\"1\"");
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(
        (got["version"].clone(), got["state"].clone()),
        (json!(1), body["state"].clone())
    );

    // Update with the version read: version 2. A member left out keeps its value.
    let (s, b, h) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"state": {"route": "/p/2"}}),
        Some("\"1\""),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(etag(&h), "\"2\"");
    assert_eq!(b["version"], 2);
    assert_eq!(b["state"], json!({"route": "/p/2"}));
    assert_eq!(b["preferences"], json!({"theme": "dark"}));
    assert_eq!(b["createdAt"], got["createdAt"]);

    // A stale If-Match: 412 with the current version, nothing changed.
    let (s, b, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"state": "lost"}),
        Some("\"1\""),
        None,
    )
    .await;
    assert_problem(s, &b, StatusCode::PRECONDITION_FAILED, "version_mismatch");
    assert_eq!(b["currentVersion"], 2);
    let (_, now, h) = get(&env, "alice", "tab-1").await;
    assert_eq!(
        (etag(&h), now["state"].clone()),
        ("\"2\"", json!({"route": "/p/2"}))
    );

    // One of several tags matching is enough; `*` needs the session to exist.
    let (s, b, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({}),
        Some("\"9\", \"2\""),
        None,
    )
    .await;
    assert_eq!((s, b["version"].clone()), (StatusCode::OK, json!(3)), "{b}");
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({}), Some("*"), None).await;
    assert_eq!((s, b["version"].clone()), (StatusCode::OK, json!(4)), "{b}");
    let (s, b, _) = put(&env, "alice", "tab-9", &json!({}), Some("*"), None).await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    let (s, b, _) = put(&env, "alice", "tab-9", &json!({}), Some("\"1\""), None).await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");

    // Without If-Match a PUT overwrites whatever is stored (documented: last write wins).
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({"state": 7}), None, None).await;
    assert_eq!(
        (s, b["version"].clone(), b["state"].clone()),
        (StatusCode::OK, json!(5), json!(7))
    );

    // If-None-Match: * only creates.
    let (s, b, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"state": 8}),
        None,
        Some("*"),
    )
    .await;
    assert_problem(
        s,
        &b,
        StatusCode::PRECONDITION_FAILED,
        "client_session_exists",
    );
    assert_eq!(b["currentVersion"], 5);
    let (s, b, _) = put(&env, "alice", "tab-2", &json!({}), None, Some("*")).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["state"], Value::Null);
    assert_eq!(b["preferences"], json!({}));

    // The list: both, most recently used first, without state.
    let sessions = list(&env, "alice").await;
    let ids: Vec<&str> = sessions.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tab-2", "tab-1"]);
    assert_eq!(sessions[1]["version"], 5);
    assert_eq!(sessions[1]["preferences"], json!({"theme": "dark"}));
    assert!(sessions[1].get("state").is_none(), "{}", sessions[1]);
    assert!(list(&env, "bob").await.is_empty());

    // Delete: a stale If-Match changes nothing; then 204, then 404.
    let del = |m: Option<&'static str>| {
        let mut r = env
            .http
            .delete(env.url(&path("tab-1")))
            .bearer_auth(env.token("alice"));
        if let Some(m) = m {
            r = r.header("If-Match", m);
        }
        r
    };
    let (s, b, _) = env.send(del(Some("\"4\""))).await;
    assert_problem(s, &b, StatusCode::PRECONDITION_FAILED, "version_mismatch");
    let (s, _, _) = get(&env, "alice", "tab-1").await;
    assert_eq!(s, StatusCode::OK);
    let (s, b, _) = env.send(del(Some("\"5\""))).await;
    assert_eq!(s, StatusCode::NO_CONTENT, "{b}");
    let (s, b, _) = get(&env, "alice", "tab-1").await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    let (s, b, _) = env.send(del(None)).await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    let ids: Vec<Value> = list(&env, "alice")
        .await
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(ids, [json!("tab-2")]);

    // Created again: a new life from version 1.
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({}), None, None).await;
    assert_eq!(
        (s, b["version"].clone()),
        (StatusCode::CREATED, json!(1)),
        "{b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_with_the_same_version_one_wins() {
    let env = TestEnv::start().await;
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({"state": 0}), None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    for round in 1..=25u64 {
        let tag = format!("\"{round}\"");
        let a = json!({"state": {"writer": "a", "round": round}});
        let b = json!({"state": {"writer": "b", "round": round}});
        let (ra, rb) = tokio::join!(
            put(&env, "alice", "tab-1", &a, Some(&tag), None),
            put(&env, "alice", "tab-1", &b, Some(&tag), None),
        );
        let mut statuses = [ra.0, rb.0];
        statuses.sort();
        assert_eq!(
            statuses,
            [StatusCode::OK, StatusCode::PRECONDITION_FAILED],
            "round {round}: {} / {}",
            ra.1,
            rb.1
        );
        let (winner, loser) = if ra.0 == StatusCode::OK {
            (&ra, &rb)
        } else {
            (&rb, &ra)
        };
        assert_eq!(loser.1["code"], "version_mismatch");
        assert_eq!(loser.1["currentVersion"], round + 1);
        assert_eq!(winner.1["version"], round + 1);
        let (_, stored, h) = get(&env, "alice", "tab-1").await;
        assert_eq!(etag(&h), format!("\"{}\"", round + 1));
        assert_eq!(stored["state"], winner.1["state"], "round {round}");
    }
}

#[tokio::test]
async fn expiry_slides_with_every_read_and_without_reads_the_session_is_gone() {
    let env = TestEnv::start_settings(
        |_| {},
        |s| s.client_sessions.ttl = Duration::from_millis(1500),
    )
    .await;
    for id in ["kept", "dropped"] {
        let (s, b, _) = put(&env, "alice", id, &json!({"state": id}), None, None).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    // `kept` is read every 500 ms for 3 s (twice its TTL): each read moves its expiry on.
    let mut last_expiry = String::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (s, b, _) = get(&env, "alice", "kept").await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let expiry = b["expiresAt"].as_str().unwrap().to_string();
        assert!(expiry > last_expiry, "{expiry} after {last_expiry}");
        last_expiry = expiry;
    }
    let mut redis = env.state.redis.clone();
    let pttl: i64 = redis::cmd("PTTL")
        .arg("inkwire:client-session:alice:s:kept")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!((1..=1500).contains(&pttl), "{pttl}");
    // `dropped` was never read: gone, and not listed.
    let (s, b, _) = get(&env, "alice", "dropped").await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    let ids: Vec<Value> = list(&env, "alice")
        .await
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert_eq!(ids, [json!("kept")]);
    // A write extends it too.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (s, b, _) = put(&env, "alice", "kept", &json!({"state": 2}), None, None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (s, b, _) = get(&env, "alice", "kept").await;
    assert_eq!((s, b["state"].clone()), (StatusCode::OK, json!(2)), "{b}");
    // Then no reads: gone, the index with it.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (s, b, _) = get(&env, "alice", "kept").await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    assert!(list(&env, "alice").await.is_empty());
    let exists: i64 = redis::cmd("EXISTS")
        .arg("inkwire:client-session:alice:index")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(exists, 0);
}

#[tokio::test]
async fn another_users_session_is_not_found_and_not_touched() {
    let env = TestEnv::start().await;
    let (s, b, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"state": "alice's"}),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b, _) = get(&env, "bob", "tab-1").await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    let (s, b, _) = put(
        &env,
        "bob",
        "tab-1",
        &json!({"state": "x"}),
        Some("\"1\""),
        None,
    )
    .await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    let (s, b) = env.delete(&path("tab-1"), &env.token("bob")).await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
    assert!(list(&env, "bob").await.is_empty());
    // The same id is bob's own session, apart from alice's.
    let (s, b, _) = put(&env, "bob", "tab-1", &json!({"state": "bob's"}), None, None).await;
    assert_eq!(
        (s, b["version"].clone()),
        (StatusCode::CREATED, json!(1)),
        "{b}"
    );
    let (s, b, h) = get(&env, "alice", "tab-1").await;
    assert_eq!(
        (s, etag(&h), b["state"].clone()),
        (StatusCode::OK, "\"1\"", json!("alice's"))
    );
    // Privileged callers have no way into a user's sessions either.
    let (s, b) = env.get(&path("tab-1"), &env.admin_token()).await;
    assert_problem(s, &b, StatusCode::NOT_FOUND, "client_session_not_found");
}

#[tokio::test]
async fn size_limit_and_per_user_cap() {
    let env = TestEnv::start_settings(|_| {}, |s| s.client_sessions.max_per_user = 3).await;
    // 64 KiB of JSON text for state and preferences together: `"x…x"` is n + 2 bytes, `{}`
    // 2 more.
    let limit = 64 * 1024;
    let fits = json!({"state": "x".repeat(limit - 4)});
    let (s, b, _) = put(&env, "alice", "big", &fits, None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{}", b["code"]);
    let over = json!({"state": "x".repeat(limit - 3)});
    let (s, b, _) = put(&env, "alice", "big", &over, None, None).await;
    assert_problem(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(b["limit"], limit);
    let (_, b, h) = get(&env, "alice", "big").await;
    assert_eq!(etag(&h), "\"1\"");
    assert_eq!(b["state"], fits["state"]);
    // Preferences alone fit, but not beside the stored state: the stored total counts.
    let (s, b, _) = put(
        &env,
        "alice",
        "big",
        &json!({"preferences": {"k": "v"}}),
        None,
        None,
    )
    .await;
    assert_problem(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    // Refused before anything is stored when new.
    let (s, b, _) = put(&env, "alice", "huge", &over, None, None).await;
    assert_problem(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let (s, _, _) = get(&env, "alice", "huge").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // At most 3 sessions per user: a fourth is refused, updating one is not.
    for id in ["t2", "t3"] {
        let (s, b, _) = put(&env, "alice", id, &json!({}), None, None).await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let (s, b, _) = put(&env, "alice", "t4", &json!({}), None, None).await;
    assert_problem(s, &b, StatusCode::CONFLICT, "too_many_client_sessions");
    assert_eq!(b["limit"], 3);
    let (s, b, _) = put(&env, "alice", "t3", &json!({"state": 1}), None, None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    // Other users have their own allowance.
    let (s, b, _) = put(&env, "bob", "t4", &json!({}), None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    // Deleting one makes room.
    let (s, _) = env.delete(&path("big"), &env.token("alice")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, b, _) = put(&env, "alice", "t4", &json!({}), None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let env = TestEnv::start().await;
    let token = env.token("alice");
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({"state": 1}), None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    // Not JSON, not JSON by content type, against the schema.
    let raw = |body: &'static str, ct: &'static str| {
        env.http
            .put(env.url(&path("tab-1")))
            .bearer_auth(&token)
            .header("content-type", ct)
            .body(body)
    };
    let (s, b, _) = env.send(raw("{\"state\": ", "application/json")).await;
    assert_problem(s, &b, StatusCode::BAD_REQUEST, "malformed_json");
    let (s, b, _) = env.send(raw("{\"state\": 2}", "text/plain")).await;
    assert_problem(
        s,
        &b,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    for body in [
        json!([]),
        json!("state"),
        json!({"preferences": []}),
        json!({"preferences": "dark"}),
        json!({"state": 1, "extra": true}),
        json!({"preferences": {"": 1}}),
    ] {
        let (s, b, _) = put(&env, "alice", "tab-1", &body, None, None).await;
        assert_problem(s, &b, StatusCode::BAD_REQUEST, "validation_failed");
    }

    // Bad ids on every route with one, before anything else.
    for bad in ["a.b", "a%20b", "%2A", "a%3Ab", &"x".repeat(65)] {
        let p = path(bad);
        let (s, b, _) = env
            .send(
                env.http
                    .put(env.url(&p))
                    .bearer_auth(&token)
                    .json(&json!({})),
            )
            .await;
        assert_problem(s, &b, StatusCode::BAD_REQUEST, "invalid_id");
        let (s, b) = env.get(&p, &token).await;
        assert_problem(s, &b, StatusCode::BAD_REQUEST, "invalid_id");
        let (s, b) = env.delete(&p, &token).await;
        assert_problem(s, &b, StatusCode::BAD_REQUEST, "invalid_id");
    }

    // Preconditions that are not entity tags.
    for bad in ["1x", "W/1", "\"1", "yes"] {
        let (s, b, _) = put(
            &env,
            "alice",
            "tab-1",
            &json!({"state": 9}),
            Some(bad),
            None,
        )
        .await;
        assert_problem(s, &b, StatusCode::BAD_REQUEST, "invalid_precondition");
        assert_eq!(b["header"], "If-Match");
    }
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({}), None, Some("\"1\"")).await;
    assert_problem(s, &b, StatusCode::BAD_REQUEST, "invalid_precondition");
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({}), Some("\"1\""), Some("*")).await;
    assert_problem(s, &b, StatusCode::BAD_REQUEST, "invalid_precondition");
    // A weak tag is well-formed but never matches (If-Match compares strongly).
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({}), Some("W/\"1\""), None).await;
    assert_problem(s, &b, StatusCode::PRECONDITION_FAILED, "version_mismatch");
    // The list takes no parameters.
    let (s, b) = env.get(&format!("{SESSIONS}?limit=5"), &token).await;
    assert_problem(s, &b, StatusCode::BAD_REQUEST, "unknown_parameter");

    // No token, a forged one, an expired one: 401 on every route.
    let forged = inkwire_shared::auth::JwtKeys::hs256("not-the-server-secret-at-all").issue(
        "alice",
        &[],
        Duration::from_secs(600),
    );
    let expired = env.expired_token("alice");
    for bad in [None, Some(forged.as_str()), Some(expired.as_str())] {
        let auth = |r: reqwest::RequestBuilder| match bad {
            Some(t) => r.bearer_auth(t),
            None => r,
        };
        for req in [
            auth(env.http.put(env.url(&path("tab-1")))).json(&json!({"state": 9})),
            auth(env.http.get(env.url(&path("tab-1")))),
            auth(env.http.delete(env.url(&path("tab-1")))),
            auth(env.http.get(env.url(SESSIONS))),
        ] {
            let (s, b, h) = env.send(req).await;
            assert_problem(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(h["www-authenticate"], "Bearer");
        }
    }
    // A token whose user id could not be part of a key is no token.
    let odd = env.token("a:b");
    let (s, b) = env.get(&path("tab-1"), &odd).await;
    assert_problem(s, &b, StatusCode::UNAUTHORIZED, "unauthorized");

    // Nothing of that changed the session.
    let (s, b, h) = get(&env, "alice", "tab-1").await;
    assert_eq!(
        (s, etag(&h), b["state"].clone()),
        (StatusCode::OK, "\"1\"", json!(1))
    );
}

/// Frames within `wait` (none is expected at the end).
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

#[tokio::test]
async fn preference_changes_reach_the_users_other_sessions_and_nothing_else_does() {
    let env = TestEnv::start().await;
    // Two tabs of alice; the second listens on her user channel, as a browser tab does.
    for id in ["tab-1", "tab-2"] {
        let (s, b, _) = put(
            &env,
            "alice",
            id,
            &json!({"state": {"tab": id}}),
            None,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let mut tab2 = WsClient::connect(&env.ws_url("collaboration", &env.token("alice"))).await;
    assert_eq!(tab2.subscribe("user:alice", None).await["op"], "subscribed");
    // bob's `/ws/notifications` connection is subscribed to `user:bob` on connect.
    let mut bob = WsClient::connect(&env.ws_url("notifications", &env.token("bob"))).await;
    frames_within(&mut bob, Duration::from_millis(300)).await;

    // Creating sessions with no preferences pushed nothing.
    assert!(
        frames_within(&mut tab2, Duration::from_millis(300))
            .await
            .is_empty()
    );

    // tab-1 changes its preferences: tab-2 gets them with the origin and the version.
    let prefs = json!({"theme": "dark", "fontSize": 16, "panels": {"outline": true}});
    let (s, b, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"preferences": prefs}),
        Some("\"1\""),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let frame = tab2.next().await;
    assert_eq!(frame["op"], "message", "{frame}");
    assert_eq!(frame["channel"], "user:alice");
    assert_eq!(frame["type"], "user_message");
    assert_eq!(
        frame["data"],
        json!({"event": "client_session_preferences", "sessionId": "tab-1", "version": 2,
            "preferences": prefs, "updatedAt": b["updatedAt"]}),
    );
    let schema: Value =
        serde_json::from_str(include_str!("../schemas/relay/server-message.json")).unwrap();
    let validator = jsonschema::draft202012::options().build(&schema).unwrap();
    assert!(validator.is_valid(&frame), "{frame}");

    // The same preferences again (in another key order) with a new state, a state-only
    // update, and a read: versions move on, nothing is pushed.
    let same = json!({"state": {"tab": "tab-1", "n": 2},
        "preferences": {"panels": {"outline": true}, "fontSize": 16.0, "theme": "dark"}});
    let (s, b, _) = put(&env, "alice", "tab-1", &same, None, None).await;
    assert_eq!((s, b["version"].clone()), (StatusCode::OK, json!(3)), "{b}");
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({"state": 3}), None, None).await;
    assert_eq!((s, b["version"].clone()), (StatusCode::OK, json!(4)), "{b}");
    let (s, _, _) = get(&env, "alice", "tab-1").await;
    assert_eq!(s, StatusCode::OK);
    // A refused write pushes nothing either.
    let (s, _, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"preferences": {"theme": "light"}}),
        Some("\"1\""),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED);
    assert!(
        frames_within(&mut tab2, Duration::from_millis(800))
            .await
            .is_empty(),
        "an update that changed no preferences was pushed"
    );

    // Another change, from tab-2 this time: pushed with tab-2 as its origin (tab-2 ignores
    // its own echo by that id), and bob, listening on his own channel, gets nothing of it.
    let (s, _, _) = put(
        &env,
        "alice",
        "tab-2",
        &json!({"preferences": {"theme": "light"}}),
        None,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let frame = tab2.next().await;
    assert_eq!(frame["data"]["sessionId"], "tab-2");
    assert_eq!(frame["data"]["preferences"], json!({"theme": "light"}));
    assert!(
        frames_within(&mut bob, Duration::from_millis(500))
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_page_of_an_allowed_origin_may_send_if_match_and_read_the_etag() {
    let env = TestEnv::start_with(|c| {
        c.allowed_origins =
            inkwire_shared::origins::AllowedOrigins::parse("https://app.example.com").unwrap()
    })
    .await;
    let res = env
        .http
        .request(reqwest::Method::OPTIONS, env.url(&path("tab-1")))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "PUT")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type, if-match, if-none-match",
        )
        .send()
        .await
        .unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let allowed = res.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["if-match", "if-none-match"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    let (s, b, h) = env
        .send(
            env.http
                .put(env.url(&path("tab-1")))
                .header("Origin", "https://app.example.com")
                .bearer_auth(env.token("alice"))
                .json(&json!({"state": 1})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert!(
        h["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("etag"),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_that_failed_is_made_by_the_next_read() {
    let env = TestEnv::start_with(|c| c.publish_timeout = Duration::from_millis(300)).await;
    let (s, b, _) = put(&env, "alice", "tab-1", &json!({}), None, None).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let mut tab2 = WsClient::connect(&env.ws_url("collaboration", &env.token("alice"))).await;
    assert_eq!(tab2.subscribe("user:alice", None).await["op"], "subscribed");
    let unpushed = || async {
        let mut redis = env.state.redis.clone();
        let v: String = redis::cmd("HGET")
            .arg("inkwire:client-session:alice:s:tab-1")
            .arg("unpushed")
            .query_async(&mut redis)
            .await
            .unwrap();
        v
    };

    // NATS frozen: the write stands, its push times out and stays flagged.
    env.stop_nats();
    let prefs = json!({"theme": "dark"});
    let (s, b, _) = put(
        &env,
        "alice",
        "tab-1",
        &json!({"preferences": prefs}),
        None,
        None,
    )
    .await;
    env.continue_nats();
    assert_eq!((s, b["version"].clone()), (StatusCode::OK, json!(2)), "{b}");
    assert_eq!(unpushed().await, "1");

    // The next read pushes it again (the same push id: stored once, whether or not the
    // frozen publish got through in the end) and clears the flag.
    let (s, b, _) = get(&env, "alice", "tab-1").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(unpushed().await, "");
    let frames = frames_within(&mut tab2, Duration::from_secs(2)).await;
    let pushes: Vec<&Value> = frames.iter().filter(|f| f["op"] == "message").collect();
    assert_eq!(pushes.len(), 1, "{frames:?}");
    assert_eq!(pushes[0]["data"]["version"], 2);
    assert_eq!(pushes[0]["data"]["preferences"], prefs);
    // Nothing more on later reads.
    let (s, _, _) = get(&env, "alice", "tab-1").await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        frames_within(&mut tab2, Duration::from_millis(500))
            .await
            .is_empty()
    );
}
