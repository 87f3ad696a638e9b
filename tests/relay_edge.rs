//! The relay at the edge (issue 8): losing a right ends live subscriptions at once on every
//! instance, upgrades from origins that are not allowed are refused before the upgrade, CORS
//! follows the same allow-list, and every refusal on `/ws/*` is problem+json.

use std::time::{Duration, Instant};

use inkwire_shared::access_changes::{self, AccessChange};
use inkwire_shared::channels::{self, Channel, MessageType};
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_shared::origins::AllowedOrigins;
use inkwire_tests::{Ended, TestEnv, WsClient, broadcast, json, ws_url};
use reqwest::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;

async fn send_to_user(env: &TestEnv, user: &str, n: u64) {
    let (status, body) = env
        .post(
            "/api/realtime/websocket/send-to-user",
            &env.service_token(),
            &json!({"userId": user, "type": "notification", "data": {"n": n}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

/// Reads frames until `want` `unsubscribed` frames arrived or `within` passed; returns them
/// (as `channel reason` strings, sorted) and any other frames seen.
async fn revoked_frames(
    c: &mut WsClient,
    want: usize,
    within: Duration,
) -> (Vec<String>, Vec<Value>) {
    let deadline = tokio::time::Instant::now() + within;
    let mut unsubscribed = Vec::new();
    let mut others = Vec::new();
    while unsubscribed.len() < want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Ok(f) if f["op"] == "unsubscribed" => {
                assert!(f.get("ref").is_none(), "{f}");
                inkwire_shared::schema::schemas()
                    .validate("relay/server-unsubscribed.json", &f)
                    .unwrap_or_else(|e| panic!("{f}: {e:?}"));
                unsubscribed.push(format!(
                    "{} {}",
                    f["channel"].as_str().unwrap(),
                    f["reason"].as_str().unwrap()
                ));
            }
            Ok(f) => others.push(f),
            Err(_) => break,
        }
    }
    unsubscribed.sort();
    (unsubscribed, others)
}

/// Frames that arrive within `wait`.
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

fn subscribed(answer: &Value, channel: &str) {
    assert_eq!(
        (answer["op"].as_str(), answer["channel"].as_str()),
        (Some("subscribed"), Some(channel)),
        "{answer}"
    );
}

#[tokio::test]
async fn removing_a_member_revokes_live_subscriptions_on_every_instance() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "olga", ProjectRole::Owner).await;
    env.add_member("p-1", "mia", ProjectRole::Editor).await;
    env.add_member("p-2", "mia", ProjectRole::Reader).await;
    env.register_document("p-1", "d-1").await;
    env.register_document("p-2", "d-2").await;
    let second = env.second_instance(|_| {}).await;
    let token = env.token("mia");
    let mut one = WsClient::connect(&env.ws_url("collaboration", &token)).await;
    let mut two = WsClient::connect(&ws_url(&second.base, "collaboration", &token)).await;
    for c in [&mut one, &mut two] {
        for channel in [
            "project:p-1",
            "document:d-1",
            "project:p-2",
            "document:d-2",
            "user:mia",
        ] {
            subscribed(&c.subscribe(channel, None).await, channel);
        }
    }

    let started = Instant::now();
    let (status, body) = env
        .delete("/api/projects/p-1/members/mia", &env.token("olga"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for c in [&mut one, &mut two] {
        let (revoked, others) = revoked_frames(c, 2, Duration::from_secs(1)).await;
        assert_eq!(
            revoked,
            vec!["document:d-1 revoked", "project:p-1 revoked"],
            "others: {others:?}"
        );
        assert!(others.is_empty(), "{others:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "revocation took {:?}",
        started.elapsed()
    );

    // Nothing of p-1 arrives any more; p-2 and the user's own channel still do.
    broadcast(&env, "project:p-1", 1).await;
    broadcast(&env, "document:d-1", 2).await;
    broadcast(&env, "project:p-2", 3).await;
    broadcast(&env, "document:d-2", 4).await;
    send_to_user(&env, "mia", 5).await;
    for c in [&mut one, &mut two] {
        let frames = frames_within(c, Duration::from_millis(700)).await;
        let mut channels: Vec<&str> = frames
            .iter()
            .map(|f| {
                assert_eq!(f["op"], "message", "{f}");
                f["channel"].as_str().unwrap()
            })
            .collect();
        channels.sort();
        assert_eq!(channels, vec!["document:d-2", "project:p-2", "user:mia"]);
    }

    // A new subscribe is refused; the channels can be subscribed again once re-added.
    for c in [&mut one, &mut two] {
        for channel in ["project:p-1", "document:d-1"] {
            let answer = c.subscribe(channel, None).await;
            assert_eq!(
                (answer["op"].as_str(), answer["code"].as_str()),
                (Some("error"), Some("forbidden")),
                "{answer}"
            );
        }
    }
    let (status, _) = env
        .put(
            "/api/projects/p-1/members/mia",
            &env.token("olga"),
            &json!({"role": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    subscribed(&one.subscribe("project:p-1", None).await, "project:p-1");
    broadcast(&env, "project:p-1", 6).await;
    let m = one.next().await;
    assert_eq!(
        (m["channel"].as_str(), m["data"]["n"].as_u64()),
        (Some("project:p-1"), Some(6))
    );

    let (_, stats) = env
        .get("/api/realtime/websocket/stats", &env.admin_token())
        .await;
    assert_eq!(stats["revoked"], 4, "{stats}");
}

#[tokio::test]
async fn demotion_keeps_project_subscriptions_and_removal_then_ends_them() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "olga", ProjectRole::Owner).await;
    env.add_member("p-1", "mia", ProjectRole::Editor).await;
    env.register_document("p-1", "d-1").await;
    let mut c = WsClient::connect(&env.ws_url("presence", &env.token("mia"))).await;
    subscribed(&c.subscribe("project:p-1", None).await, "project:p-1");
    subscribed(&c.subscribe("document:d-1", None).await, "document:d-1");

    // Every role may read a project's channels: a demotion is re-checked and changes nothing.
    for role in ["reviewer", "reader"] {
        let (status, body) = env
            .put(
                "/api/projects/p-1/members/mia",
                &env.token("olga"),
                &json!({"role": role}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert!(
        frames_within(&mut c, Duration::from_millis(800))
            .await
            .is_empty()
    );
    broadcast(&env, "project:p-1", 1).await;
    broadcast(&env, "document:d-1", 2).await;
    let got: Vec<u64> = [c.next().await, c.next().await]
        .iter()
        .map(|f| f["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, vec![1, 2]);

    let (status, _) = env
        .delete("/api/projects/p-1/members/mia", &env.token("olga"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (revoked, others) = revoked_frames(&mut c, 2, Duration::from_secs(1)).await;
    assert_eq!(
        revoked,
        vec!["document:d-1 revoked", "project:p-1 revoked"],
        "{others:?}"
    );
}

#[tokio::test]
async fn document_and_room_announcements_revoke_their_subscribers() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "mia", ProjectRole::Editor).await;
    env.add_member("p-1", "ned", ProjectRole::Reader).await;
    env.register_document("p-1", "d-1").await;
    let mut redis = env.state.redis.clone();
    let _: () = redis::cmd("SADD")
        .arg("inkwire:room:r-1:participants")
        .arg("mia")
        .arg("ned")
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut mia = WsClient::connect(&env.ws_url("collaboration", &env.token("mia"))).await;
    let mut ned = WsClient::connect(&env.ws_url("collaboration", &env.token("ned"))).await;
    let mut svc = WsClient::connect(&env.ws_url("collaboration", &env.service_token())).await;
    for c in [&mut mia, &mut ned, &mut svc] {
        for channel in ["document:d-1", "room:r-1", "project:p-1"] {
            subscribed(&c.subscribe(channel, None).await, channel);
        }
    }

    // The document leaves its project (what deleting it does), then it is announced: every
    // subscriber but the privileged one loses it.
    let _: () = redis::cmd("DEL")
        .arg("inkwire:document:d-1:project")
        .query_async(&mut redis)
        .await
        .unwrap();
    access_changes::announce(
        &env.state.nats,
        &AccessChange::Document {
            project_id: "p-1".into(),
            document_id: "d-1".into(),
        },
    )
    .await
    .unwrap();
    for c in [&mut mia, &mut ned] {
        let (revoked, others) = revoked_frames(c, 1, Duration::from_secs(1)).await;
        assert_eq!(revoked, vec!["document:d-1 revoked"], "{others:?}");
    }

    // Ned leaves the room: only his room subscription ends.
    let _: () = redis::cmd("SREM")
        .arg("inkwire:room:r-1:participants")
        .arg("ned")
        .query_async(&mut redis)
        .await
        .unwrap();
    access_changes::announce(
        &env.state.nats,
        &AccessChange::RoomParticipant {
            room_id: "r-1".into(),
            user_id: "ned".into(),
        },
    )
    .await
    .unwrap();
    let (revoked, others) = revoked_frames(&mut ned, 1, Duration::from_secs(1)).await;
    assert_eq!(revoked, vec!["room:r-1 revoked"], "{others:?}");

    broadcast(&env, "room:r-1", 1).await;
    broadcast(&env, "document:d-1", 2).await;
    broadcast(&env, "project:p-1", 3).await;
    let channels = |frames: Vec<Value>| -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                assert_eq!(f["op"], "message", "{f}");
                f["channel"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let mut got = channels(frames_within(&mut mia, Duration::from_millis(600)).await);
    got.sort();
    assert_eq!(got, vec!["project:p-1", "room:r-1"]);
    assert_eq!(
        channels(frames_within(&mut ned, Duration::from_millis(200)).await),
        vec!["project:p-1"]
    );
    let mut got = channels(frames_within(&mut svc, Duration::from_millis(200)).await);
    got.sort();
    assert_eq!(got, vec!["document:d-1", "project:p-1", "room:r-1"]);
}

#[tokio::test]
async fn frames_queued_for_a_revoked_channel_are_not_delivered_after_unsubscribed() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "olga", ProjectRole::Owner).await;
    env.add_member("p-1", "mia", ProjectRole::Editor).await;
    let mut c = WsClient::connect(&env.ws_url("collaboration", &env.token("mia"))).await;
    subscribed(&c.subscribe("project:p-1", None).await, "project:p-1");
    // The client stops reading: large messages fill the socket buffers, the rest waits in
    // the connection's send queue.
    let n = 300;
    let blob = "x".repeat(60_000);
    let channel = Channel::parse("project:p-1").unwrap();
    for i in 0..n {
        channels::publish(
            &env.state.js,
            &channel,
            MessageType::System,
            &json!({"i": i, "blob": blob}),
            format!("m-{i}"),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, _) = env
        .delete("/api/projects/p-1/members/mia", &env.token("olga"))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Now the client reads everything: some messages, the revocation, and nothing of the
    // channel after it.
    let mut delivered = 0;
    let mut revoked_at = None;
    loop {
        match c.next_within(Duration::from_secs(1)).await {
            Ok(f) if f["op"] == "message" => {
                assert!(revoked_at.is_none(), "a message after the revocation");
                delivered += 1;
            }
            Ok(f) => {
                assert_eq!(
                    (f["op"].as_str(), f["reason"].as_str()),
                    (Some("unsubscribed"), Some("revoked")),
                    "{f}"
                );
                revoked_at = Some(delivered);
            }
            Err(Ended::Timeout) => break,
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }
    assert!(revoked_at.is_some(), "no revocation");
    assert!(
        delivered < n,
        "every message was delivered before the revocation: nothing was queued"
    );
}

#[tokio::test]
async fn the_periodic_recheck_catches_changes_nobody_announced() {
    let env =
        TestEnv::start_full(|_| {}, |r| r.recheck_interval = Duration::from_millis(300)).await;
    env.add_member("p-1", "mia", ProjectRole::Editor).await;
    let mut c = WsClient::connect(&env.ws_url("analytics", &env.token("mia"))).await;
    subscribed(&c.subscribe("project:p-1", None).await, "project:p-1");
    // Changed behind the API's back (as if the announcement was lost in a NATS outage).
    let mut redis = env.state.redis.clone();
    membership::set_member(&mut redis, "p-1", "mia", None)
        .await
        .unwrap();
    let (revoked, others) = revoked_frames(&mut c, 1, Duration::from_secs(2)).await;
    assert_eq!(revoked, vec!["project:p-1 revoked"], "{others:?}");
}

/// A WebSocket upgrade request to `path` on `base` with `origin` and a token given by
/// `auth` (cookie, query, protocol or header).
fn upgrade_request(
    env: &TestEnv,
    base: &str,
    path: &str,
    origin: Option<&str>,
    auth: &str,
) -> Request {
    let token = env.token("mia");
    let ws = base.replacen("http://", "ws://", 1);
    let url = if auth == "query" {
        format!("{ws}/ws/{path}?token={token}")
    } else {
        format!("{ws}/ws/{path}")
    };
    let mut req = url.into_client_request().unwrap();
    let h = req.headers_mut();
    match auth {
        "cookie" => {
            h.insert("cookie", format!("inkwire_token={token}").parse().unwrap());
        }
        "protocol" => {
            h.insert(
                "sec-websocket-protocol",
                format!("inkwire.v1, bearer.{token}").parse().unwrap(),
            );
        }
        "header" => {
            h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        _ => {}
    }
    if let Some(o) = origin {
        h.insert("origin", o.parse().unwrap());
    }
    req
}

#[tokio::test]
async fn upgrades_from_origins_that_are_not_allowed_are_refused() {
    let env = TestEnv::start_with(|c| {
        c.allowed_origins =
            AllowedOrigins::parse("https://app.example.com, http://localhost:*").unwrap()
    })
    .await;
    for auth in ["cookie", "query", "protocol", "header"] {
        for evil in [
            "https://evil.example",
            "null",
            "https://app.example.com.evil.example",
        ] {
            let refused = WsClient::try_connect(upgrade_request(
                &env,
                &env.base,
                "collaboration",
                Some(evil),
                auth,
            ))
            .await;
            assert_eq!(refused.err(), Some(403), "{auth} from {evil}");
        }
        for ok in [
            Some("https://app.example.com"),
            Some("http://localhost:5173"),
            Some(env.base.as_str()),
            None,
        ] {
            let (mut c, _) =
                WsClient::try_connect(upgrade_request(&env, &env.base, "collaboration", ok, auth))
                    .await
                    .unwrap_or_else(|s| panic!("{auth} from {ok:?}: {s}"));
            assert_eq!(c.next().await["op"], "welcome", "{auth} from {ok:?}");
        }
    }

    // The refusal is problem+json, comes before any upgrade, and does not need a token to
    // be decided.
    let res = env
        .http
        .get(env.url("/ws/notifications"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("origin", "https://evil.example")
        .header("cookie", format!("inkwire_token={}", env.token("mia")))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "origin_not_allowed", "{body}");

    // Without a list only the server's own origin (and non-browser clients) may connect.
    let plain = TestEnv::start().await;
    assert_eq!(
        WsClient::try_connect(upgrade_request(
            &plain,
            &plain.base,
            "presence",
            Some("http://localhost:5173"),
            "cookie"
        ))
        .await
        .err(),
        Some(403)
    );
    let (mut c, _) = WsClient::try_connect(upgrade_request(
        &plain,
        &plain.base,
        "presence",
        Some(&plain.base),
        "cookie",
    ))
    .await
    .expect("same origin");
    assert_eq!(c.next().await["op"], "welcome");
}

#[tokio::test]
async fn cors_follows_the_allowed_origins() {
    let env = TestEnv::start_with(|c| {
        c.allowed_origins = AllowedOrigins::parse("https://app.example.com").unwrap()
    })
    .await;
    let preflight = |path: &str, origin: &str, method: &str| {
        env.http
            .request(reqwest::Method::OPTIONS, env.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .header(
                "access-control-request-headers",
                "authorization, content-type, idempotency-key",
            )
    };
    for (path, method) in [
        ("/api/realtime/events/publish", "POST"),
        ("/api/projects/p-1/members/u-1", "DELETE"),
        ("/api/projects/p-1/members/u-1", "PUT"),
        ("/api/realtime/websocket/stats", "GET"),
        ("/api/realtime/writing/sessions/start", "POST"),
    ] {
        let res = preflight(path, "https://app.example.com", method)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{path}: {}", res.status());
        let h = res.headers();
        assert_eq!(
            h["access-control-allow-origin"], "https://app.example.com",
            "{path}"
        );
        let methods = h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .to_ascii_uppercase();
        for m in ["GET", "POST", "PUT", "DELETE", "OPTIONS"] {
            assert!(methods.contains(m), "{path}: {methods}");
        }
        let headers = h["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_ascii_lowercase();
        for name in ["authorization", "content-type", "idempotency-key"] {
            assert!(headers.contains(name), "{path}: {headers}");
        }
        assert_eq!(h["access-control-max-age"], "600");
        assert!(h.get("access-control-allow-credentials").is_none());

        let res = preflight(path, "https://evil.example", method)
            .send()
            .await
            .unwrap();
        assert!(
            res.headers().get("access-control-allow-origin").is_none(),
            "{path}: {:?}",
            res.headers()
        );
    }

    // Ordinary requests: the allowed origin gets the header (errors too), others do not.
    for (path, token) in [
        ("/healthz", None),
        ("/api/projects/p-1/members", Some(env.token("x"))),
    ] {
        for (origin, allowed) in [
            ("https://app.example.com", true),
            ("https://evil.example", false),
        ] {
            let mut req = env.http.get(env.url(path)).header("origin", origin);
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            let res = req.send().await.unwrap();
            assert_eq!(
                res.headers()
                    .get("access-control-allow-origin")
                    .map(|v| v.to_str().unwrap().to_string()),
                allowed.then(|| origin.to_string()),
                "{path} from {origin}"
            );
        }
    }
}

#[tokio::test]
async fn plain_http_on_websocket_paths_is_problem_json() {
    let env = TestEnv::start().await;
    let token = env.token("mia");
    for path in ["collaboration", "analytics", "notifications", "presence"] {
        for url in [
            env.url(&format!("/ws/{path}")),
            env.url(&format!("/ws/{path}?token={token}")),
        ] {
            let res = env.http.get(&url).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED, "{url}");
            assert_eq!(res.headers()["content-type"], "application/problem+json");
            assert_eq!(res.headers()["upgrade"], "websocket");
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["code"], "upgrade_required", "{body}");
            assert_eq!(body["status"], 426);
        }
    }
    // A handshake that lacks its key, and a wrong version.
    let res = env
        .http
        .get(env.url("/ws/collaboration"))
        .bearer_auth(&token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "invalid_websocket_handshake", "{body}");
    let res = env
        .http
        .get(env.url("/ws/collaboration"))
        .bearer_auth(&token)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "8")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(res.headers()["sec-websocket-version"], "13");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "upgrade_required", "{body}");
    // Other methods are problem+json too.
    let res = env
        .http
        .post(env.url("/ws/collaboration"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
}
