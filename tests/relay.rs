//! End-to-end tests of the WebSocket relay with real WebSocket clients, real NATS and Redis.

use std::time::Duration;

use inkwire_shared::channels::{self, Channel, MessageType};
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{BROADCAST, Ended, TestEnv, WsClient, broadcast, json, ws_url};
use reqwest::StatusCode;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Publishes straight to the RELAY stream (faster than the API for bulk).
async fn publish_direct(env: &TestEnv, channel: &str, data: Value) -> u64 {
    let c = Channel::parse(channel).unwrap();
    channels::publish(
        &env.state.js,
        &c,
        MessageType::DocumentUpdate,
        &data,
        uuid::Uuid::new_v4().to_string(),
    )
    .await
    .unwrap()
    .sequence
}

#[tokio::test]
async fn authentication_happens_before_the_upgrade() {
    let env = TestEnv::start().await;
    let base = env.base.replacen("http://", "ws://", 1);
    let no_token = WsClient::try_connect(format!("{base}/ws/collaboration")).await;
    assert_eq!(no_token.err(), Some(401));
    let forged = inkwire_shared::auth::JwtKeys::hs256("not-the-right-secret!!").issue(
        "u-1",
        &[],
        Duration::from_secs(60),
    );
    assert_eq!(
        WsClient::try_connect(ws_url(&env.base, "collaboration", &forged))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        WsClient::try_connect(ws_url(
            &env.base,
            "collaboration",
            &env.expired_token("u-1")
        ))
        .await
        .err(),
        Some(401)
    );

    let token = env.token("u-1");
    // Query parameter.
    let mut c = WsClient::connect(&ws_url(&env.base, "collaboration", &token)).await;
    c.send(json!({"op": "ping", "ref": 1})).await;
    assert_eq!(c.next().await, json!({"op": "pong", "ref": 1}));
    // Sec-WebSocket-Protocol entry; the server selects inkwire.v1.
    let mut req = format!("{base}/ws/presence").into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("inkwire.v1, bearer.{token}").parse().unwrap(),
    );
    let (mut c, response) = WsClient::try_connect(req)
        .await
        .expect("protocol token accepted");
    assert_eq!(response.headers()["sec-websocket-protocol"], "inkwire.v1");
    assert_eq!(c.next().await["op"], "welcome");
    // Cookie.
    let mut req = format!("{base}/ws/analytics")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "cookie",
        format!("theme=dark; inkwire_token={token}")
            .parse()
            .unwrap(),
    );
    let (mut c, _) = WsClient::try_connect(req)
        .await
        .expect("cookie token accepted");
    let welcome = c.next().await;
    assert_eq!(welcome["userId"], "u-1");
    assert_eq!(welcome["heartbeatMs"], 25000);
}

#[tokio::test]
async fn permission_matrix_for_every_channel_kind() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "alice", ProjectRole::Reader).await;
    env.add_member("p-2", "bob", ProjectRole::Owner).await;
    env.register_document("p-1", "d-1").await;
    env.register_document("p-2", "d-2").await;
    let mut redis = env.state.redis.clone();
    let _: () = redis::cmd("SADD")
        .arg("inkwire:room:r-1:participants")
        .arg("alice")
        .query_async(&mut redis)
        .await
        .unwrap();

    let mut alice = WsClient::connect(&env.ws_url("collaboration", &env.token("alice"))).await;
    for (channel, allowed) in [
        ("user:alice", true),
        ("user:bob", false),
        ("project:p-1", true),
        ("project:p-2", false),
        ("document:d-1", true),
        ("document:d-2", false),
        ("document:d-unregistered", false),
        ("room:r-1", true),
        ("room:r-2", false),
    ] {
        let answer = alice.subscribe(channel, None).await;
        if allowed {
            assert_eq!(answer["op"], "subscribed", "{channel}: {answer}");
            assert_eq!(answer["ref"], channel);
        } else {
            assert_eq!(
                (answer["op"].as_str(), answer["code"].as_str()),
                (Some("error"), Some("forbidden")),
                "{channel}: {answer}"
            );
            assert_eq!(answer["ref"], channel);
            // A denied subscribe changed nothing.
            alice
                .send(json!({"op": "unsubscribe", "channel": channel}))
                .await;
            assert_eq!(alice.next().await["code"], "not_subscribed");
        }
    }
    let again = alice.subscribe("project:p-1", None).await;
    assert_eq!(again["code"], "already_subscribed");

    // Category firehoses: admin and service only, and only on paths that serve them.
    let mut analytics = WsClient::connect(&env.ws_url("analytics", &env.token("alice"))).await;
    assert_eq!(
        analytics.subscribe("category:writing", None).await["code"],
        "forbidden"
    );
    let mut admin = WsClient::connect(&env.ws_url("analytics", &env.admin_token())).await;
    assert_eq!(
        admin.subscribe("category:writing", None).await["op"],
        "subscribed"
    );
    assert_eq!(
        admin.subscribe("category:poetry", None).await["code"],
        "unknown_channel"
    );
    assert_eq!(
        alice.subscribe("category:writing", None).await["code"],
        "channel_not_allowed_on_path"
    );
    for bad in ["project", "planet:x", "project:a.b", "project:*"] {
        assert_eq!(
            alice.subscribe(bad, None).await["code"],
            "unknown_channel",
            "{bad}"
        );
    }
    let mut svc = WsClient::connect(&env.ws_url("collaboration", &env.service_token())).await;
    assert_eq!(svc.subscribe("project:p-2", None).await["op"], "subscribed");
    assert_eq!(
        svc.subscribe("user:alice", None).await["code"],
        "forbidden",
        "user channels stay private"
    );

    // Only allowed subscriptions receive messages.
    broadcast(&env, "project:p-2", 1).await;
    let seq = broadcast(&env, "project:p-1", 2).await;
    let msg = alice.next().await;
    assert_eq!(msg["op"], "message");
    assert_eq!(msg["channel"], "project:p-1");
    assert_eq!(msg["seq"], seq);
    assert_eq!(msg["data"], json!({"n": 2}));
    assert!(
        alice.next_within(Duration::from_millis(300)).await.is_err(),
        "nothing from p-2"
    );
}

#[tokio::test]
async fn resubscribing_with_since_recovers_exactly_what_was_missed() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    let url = env.ws_url("collaboration", &env.token("alice"));
    let mut c = WsClient::connect(&url).await;
    let sub = c.subscribe("project:p-1", None).await;
    assert_eq!(sub["position"], 0);
    let first = broadcast(&env, "project:p-1", 0).await;
    assert_eq!(c.next().await["seq"], first);
    drop(c);

    let mut expected = Vec::new();
    for n in 1..=50 {
        expected.push(publish_direct(&env, "project:p-1", json!({"n": n})).await);
        // Noise on another channel interleaves sequences.
        publish_direct(&env, "project:p-other", json!({"n": n})).await;
    }
    let mut c = WsClient::connect(&url).await;
    let sub = c.subscribe("project:p-1", Some(first)).await;
    assert_eq!(sub["op"], "subscribed", "{sub}");
    assert_eq!(sub["recovered"], true);
    assert_eq!(sub["position"], *expected.last().unwrap());
    let mut got = Vec::new();
    for _ in 0..50 {
        let m = c.next().await;
        assert_eq!(m["data"]["n"], got.len() as u64 + 1);
        got.push(m["seq"].as_u64().unwrap());
    }
    assert_eq!(got, expected);
    // Then live, without duplicates.
    let live = broadcast(&env, "project:p-1", 51).await;
    assert_eq!(c.next().await["seq"], live);
    assert!(c.next_within(Duration::from_millis(300)).await.is_err());

    // Resubscribing at the current position recovers trivially.
    let mut c2 = WsClient::connect(&url).await;
    let sub = c2.subscribe("project:p-1", Some(live)).await;
    assert_eq!(
        (sub["recovered"].as_bool(), sub["position"].as_u64()),
        (Some(true), Some(live))
    );
    assert!(c2.next_within(Duration::from_millis(300)).await.is_err());
}

#[tokio::test]
async fn recovery_beyond_history_says_recovered_false() {
    let env = TestEnv::start_with(|c| c.relay_history_per_channel = 20).await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    let url = env.ws_url("collaboration", &env.token("alice"));
    let first = publish_direct(&env, "project:p-1", json!({"n": 0})).await;
    for n in 1..=50 {
        publish_direct(&env, "project:p-1", json!({"n": n})).await;
    }
    let mut c = WsClient::connect(&url).await;
    let sub = c.subscribe("project:p-1", Some(first)).await;
    assert_eq!(sub["recovered"], false, "{sub}");
    let mut ns = Vec::new();
    for _ in 0..20 {
        ns.push(c.next().await["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(ns, (31..=50).collect::<Vec<_>>(), "what remains, in order");
    assert!(c.next_within(Duration::from_millis(300)).await.is_err());
}

#[tokio::test]
async fn two_relay_instances_deliver_the_same_messages() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    env.add_member("p-1", "bob", ProjectRole::Reader).await;
    let second = env.second_instance(|_| {}).await;
    let mut a = WsClient::connect(&env.ws_url("collaboration", &env.token("alice"))).await;
    let mut b = WsClient::connect(&ws_url(&second.base, "collaboration", &env.token("bob"))).await;
    a.subscribe("project:p-1", None).await;
    b.subscribe("project:p-1", None).await;
    let mut seqs = Vec::new();
    for n in 0..20 {
        seqs.push(broadcast(&env, "project:p-1", n).await);
    }
    for client in [&mut a, &mut b] {
        let got: Vec<u64> = futures_collect(client, 20).await;
        assert_eq!(got, seqs);
    }
    // Stats are summed over both instances.
    let (status, stats) = env
        .get("/api/realtime/websocket/stats", &env.admin_token())
        .await;
    assert_eq!(status, StatusCode::OK, "{stats}");
    assert_eq!(stats["instances"], 2, "{stats}");
    assert_eq!(stats["connections"], 2);
    assert_eq!(stats["connectionsByPath"]["collaboration"], 2);
    assert_eq!(stats["subscriptions"], 2);
    let (status, _) = env
        .get("/api/realtime/websocket/stats", &env.token("alice"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    second.shutdown.trigger();
    assert_eq!(
        b.until_closed(Duration::from_secs(3)).await.0,
        Ended::Closed(Some(1001)),
        "going away on shutdown"
    );

    // Bob reconnects to the remaining instance with the last position he saw: he loses
    // nothing that was published while he was away.
    let mut missed = Vec::new();
    for n in 20..25 {
        missed.push(broadcast(&env, "project:p-1", n).await);
    }
    let mut b = WsClient::connect(&env.ws_url("collaboration", &env.token("bob"))).await;
    let sub = b
        .subscribe("project:p-1", Some(*seqs.last().unwrap()))
        .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(futures_collect(&mut b, 5).await, missed);
}

async fn futures_collect(c: &mut WsClient, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = c.next().await;
        assert_eq!(m["op"], "message", "{m}");
        out.push(m["seq"].as_u64().unwrap());
    }
    out
}

#[tokio::test]
async fn a_slow_client_is_disconnected_and_a_fast_one_gets_everything() {
    let env = TestEnv::start_full(|_| {}, |r| r.send_queue = 32).await;
    env.add_member("p-1", "fast", ProjectRole::Editor).await;
    env.add_member("p-1", "slow", ProjectRole::Editor).await;
    let mut fast = WsClient::connect(&env.ws_url("collaboration", &env.token("fast"))).await;
    let mut slow = WsClient::connect(&env.ws_url("collaboration", &env.token("slow"))).await;
    fast.subscribe("project:p-1", None).await;
    slow.subscribe("project:p-1", None).await;
    let total = 1500u64;
    let padding = "x".repeat(16 * 1024);
    let reader = tokio::spawn(async move {
        let mut n = 0u64;
        while n < total {
            let m = fast.next().await;
            assert_eq!(m["data"]["n"], n, "fast client sees every message in order");
            n += 1;
        }
        n
    });
    for n in 0..total {
        publish_direct(&env, "project:p-1", json!({"n": n, "pad": padding})).await;
    }
    assert_eq!(reader.await.unwrap(), total);
    // The slow client never read; now it does: it got part of the stream, then the close.
    let (ended, frames) = slow.until_closed(Duration::from_secs(5)).await;
    assert!(
        matches!(ended, Ended::Closed(Some(4008)) | Ended::Closed(None)),
        "{ended:?}"
    );
    assert!((frames.len() as u64) < total, "slow client was cut off");
    assert!(
        env.relay
            .metrics
            .slow_disconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[tokio::test]
async fn rate_limits_frame_size_and_malformed_frames() {
    let env = TestEnv::start_full(
        |_| {},
        |r| {
            r.rate_per_sec = 5;
            r.rate_burst = 5;
            r.max_frame_bytes = 1024;
        },
    )
    .await;
    let token = env.token("u-1");
    let url = env.ws_url("collaboration", &token);

    // Rate limit: the burst is answered, the rest dropped with one error; abuse closes.
    let mut c = WsClient::connect(&url).await;
    for i in 0..10 {
        c.send(json!({"op": "ping", "ref": i})).await;
    }
    let mut pongs = 0;
    let mut limited = 0;
    while let Ok(f) = c.next_within(Duration::from_millis(300)).await {
        match f["op"].as_str() {
            Some("pong") => pongs += 1,
            Some("error") if f["code"] == "rate_limited" => limited += 1,
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!((pongs, limited), (5, 1));
    for i in 0..300 {
        c.send_raw(Message::Text(
            json!({"op": "ping", "ref": i}).to_string().into(),
        ))
        .await;
    }
    let (ended, _) = c.until_closed(Duration::from_secs(3)).await;
    assert_eq!(ended, Ended::Closed(Some(4029)));

    // Oversized frame.
    let mut c = WsClient::connect(&url).await;
    c.send_raw(Message::Text("x".repeat(4096).into())).await;
    assert_eq!(
        c.until_closed(Duration::from_secs(3)).await.0,
        Ended::Closed(Some(1009))
    );

    // Malformed frames get errors; the connection survives them, up to a limit.
    let mut c = WsClient::connect(&url).await;
    c.send_raw(Message::Text("{not json".into())).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"op": "dance", "ref": "r"})).await;
    let e = c.next().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_frame"), Some("r"))
    );
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"op": "subscribe", "channel": "project:p", "since": "yesterday"}))
        .await;
    assert_eq!(c.next().await["code"], "bad_frame");
    c.send(json!({"op": "ping", "ref": "still-alive"})).await;
    assert_eq!(c.next().await["op"], "pong");
}

#[tokio::test]
async fn repeated_garbage_closes_the_connection() {
    let env = TestEnv::start().await;
    let mut c = WsClient::connect(&env.ws_url("collaboration", &env.token("u-1"))).await;
    for _ in 0..25 {
        c.send_raw(Message::Text("garbage".into())).await;
    }
    let (ended, frames) = c.until_closed(Duration::from_secs(3)).await;
    assert_eq!(ended, Ended::Closed(Some(1008)));
    assert_eq!(frames.len(), 20);
}

#[tokio::test]
async fn heartbeats_and_token_expiry_close_connections() {
    let env = TestEnv::start_full(|_| {}, |r| r.heartbeat = Duration::from_millis(200)).await;
    // A client that never reads never answers pings.
    let mut c = WsClient::connect(&env.ws_url("collaboration", &env.token("u-1"))).await;
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let heartbeat_timeouts = env
        .relay
        .metrics
        .heartbeat_timeouts
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(heartbeat_timeouts, 1);
    // The close frame (4000) is in the client's buffer, unless answering the queued pings
    // after the server hung up fails first.
    let (ended, _) = c.until_closed(Duration::from_secs(2)).await;
    assert!(
        matches!(ended, Ended::Closed(Some(4000)) | Ended::Closed(None)),
        "{ended:?}"
    );
    // A client that reads (tungstenite answers pings) stays.
    let mut c = WsClient::connect(&env.ws_url("collaboration", &env.token("u-1"))).await;
    assert_eq!(
        c.next_within(Duration::from_millis(900)).await,
        Err(Ended::Timeout)
    );

    let short = env.state.jwt.issue("u-1", &[], Duration::from_secs(2));
    let mut c = WsClient::connect(&env.ws_url("collaboration", &short)).await;
    let (ended, _) = c.until_closed(Duration::from_secs(5)).await;
    assert_eq!(ended, Ended::Closed(Some(4001)));
}

#[tokio::test]
async fn limits_per_connection_and_per_user() {
    let env = TestEnv::start_full(
        |_| {},
        |r| {
            r.max_subscriptions = 2;
            r.max_connections_per_user = 2;
        },
    )
    .await;
    let url = env.ws_url("collaboration", &env.token("u-1"));
    let mut a = WsClient::connect(&url).await;
    let _b = WsClient::connect(&url).await;
    assert_eq!(WsClient::try_connect(url.clone()).await.err(), Some(429));
    assert_eq!(a.subscribe("user:u-1", None).await["op"], "subscribed");
    let mut redis = env.state.redis.clone();
    for r in ["r-1", "r-2"] {
        let _: () = redis::cmd("SADD")
            .arg(format!("inkwire:room:{r}:participants"))
            .arg("u-1")
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    assert_eq!(a.subscribe("room:r-1", None).await["op"], "subscribed");
    assert_eq!(
        a.subscribe("room:r-2", None).await["code"],
        "too_many_subscriptions"
    );
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _c = WsClient::connect(&url).await;
}

#[tokio::test]
async fn server_api_and_router_deliver_to_the_right_people() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "alice", ProjectRole::Owner).await;
    env.add_member("p-1", "bob", ProjectRole::Editor).await;
    env.register_document("p-1", "d-1").await;

    // send-to-user reaches the user's notifications connection (auto-subscribed).
    let mut notes = WsClient::connect(&env.ws_url("notifications", &env.token("bob"))).await;
    assert_eq!(notes.next().await["op"], "subscribed");
    let (status, body) = env
        .post(
            "/api/realtime/websocket/send-to-user",
            &env.service_token(),
            &json!({"userId": "bob", "type": "notification", "data": {"title": "hi"}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let m = notes.next().await;
    assert_eq!(
        (m["type"].as_str(), m["data"]["title"].as_str()),
        (Some("notification"), Some("hi"))
    );
    let (status, _) = env
        .post(
            "/api/realtime/websocket/send-to-user",
            &env.token("alice"),
            &json!({"userId": "bob", "type": "notification", "data": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Broadcast: project owners may, editors may not; bad bodies are 400.
    let (status, _) = env
        .post(
            BROADCAST,
            &env.token("alice"),
            &json!({"channel": "document:d-1", "type": "system", "data": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, _) = env
        .post(
            BROADCAST,
            &env.token("bob"),
            &json!({"channel": "project:p-1", "type": "system", "data": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for bad in [
        json!({"channel": "project:p-1", "type": "shout", "data": 1}),
        json!({"channel": "p-1", "type": "system", "data": 1}),
        json!({"channel": "project:p-1", "type": "system"}),
    ] {
        let (status, body) = env.post(BROADCAST, &env.service_token(), &bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }

    // The router forwards domain events to project, document and category channels,
    // except the per-batch ones (word_added, keystrokes). Both are the tracker's (or a back
    // end's) to publish.
    let mut doc = WsClient::connect(&env.ws_url("collaboration", &env.token("bob"))).await;
    doc.subscribe("document:d-1", None).await;
    let mut admin = WsClient::connect(&env.ws_url("analytics", &env.admin_token())).await;
    admin.subscribe("category:writing", None).await;
    let words = json!({"category": "writing", "type": "word_added", "userId": "bob", "documentId": "d-1",
        "data": {"sessionId": "s", "words": 3}});
    let (status, _) = env
        .post("/api/realtime/events/publish", &env.service_token(), &words)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let event = json!({"category": "writing", "type": "paragraph_completed", "userId": "bob", "documentId": "d-1", "data": {"sessionId": "s", "words": 2}});
    let (status, published) = env
        .post("/api/realtime/events/publish", &env.service_token(), &event)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    for c in [&mut doc, &mut admin] {
        let m = c.next().await;
        assert_eq!(m["type"], "document_update", "{m}");
        assert_eq!(
            m["data"]["id"], published["id"],
            "the paragraph_completed event, not the word_added"
        );
        assert_eq!(m["data"]["type"], "paragraph_completed");
    }

    // Metrics need a token.
    let (status, _, _) = env.send(env.http.get(env.url("/metrics"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, text, _) = env
        .send(
            env.http
                .get(env.url("/metrics"))
                .bearer_auth(env.admin_token()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.as_str()
            .unwrap()
            .contains("inkwire_relay_connections{path=\"collaboration\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn every_server_frame_matches_its_schema() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    let schemas = inkwire_shared::schema::schemas();
    let (socket, _) =
        tokio_tungstenite::connect_async(env.ws_url("collaboration", &env.token("alice")))
            .await
            .unwrap();
    let mut c = WsClient { socket };
    let mut frames = vec![c.next().await];
    frames.push(c.subscribe("project:p-1", None).await);
    broadcast(&env, "project:p-1", 1).await;
    frames.push(c.next().await);
    c.send(json!({"op": "ping"})).await;
    frames.push(c.next().await);
    frames.push(c.subscribe("project:nope", None).await);
    c.send(json!({"op": "unsubscribe", "channel": "project:p-1", "ref": 9}))
        .await;
    frames.push(c.next().await);
    let ops: Vec<&str> = frames.iter().map(|f| f["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        vec![
            "welcome",
            "subscribed",
            "message",
            "pong",
            "error",
            "unsubscribed"
        ]
    );
    for f in &frames {
        let path = format!("relay/server-{}.json", f["op"].as_str().unwrap());
        schemas
            .validate(&path, f)
            .unwrap_or_else(|e| panic!("{f} does not match {path}: {e:?}"));
    }
}
