//! User presence (issue 12) against real nats-server and redis-server, with the relay's
//! reports, the presence worker and the API as they run in production: a relay instance
//! killed with SIGKILL (a separate process) takes its users offline within the heartbeat
//! TTL while a user also connected to a live instance stays online; several tabs of one
//! user; away by idle time and by the status route; who of a room is online; and
//! `presence_update` reaching only those who share a project or room.

use std::time::Duration;

use inkwire_presence::PresenceConfig;
use inkwire_relay::presence::PresenceReportConfig;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::ws::{Ended, WsClient, ws_url};
use inkwire_tests::{ServerProcess, TestEnv};
use reqwest::StatusCode;
use serde_json::{Value, json};

const USERS: &str = "/api/realtime/presence/users";
const ROOMS: &str = "/api/realtime/presence/rooms";
const STATUS: &str = "/api/realtime/presence/status";

/// The heartbeat TTL of these tests.
const TTL: Duration = Duration::from_secs(2);

/// Short report interval and heartbeat (relay), short TTL and tick (worker).
async fn env(away_after: Duration) -> TestEnv {
    TestEnv::start_settings(
        |_| {},
        |s| {
            s.without_presence_worker = false;
            s.relay.presence = PresenceReportConfig {
                report_interval: Duration::from_millis(100),
                heartbeat: Duration::from_millis(300),
            };
            s.presence = PresenceConfig {
                away_after,
                ttl: TTL,
                tick: Duration::from_millis(100),
            };
        },
    )
    .await
}

/// A connection of `user` to the relay at `base` (`/ws/presence`), with device parameters.
async fn connect(env: &TestEnv, base: &str, user: &str, device: &str) -> WsClient {
    let url = format!("{}{device}", ws_url(base, "presence", &env.token(user)));
    WsClient::connect(&url).await
}

/// `user`'s presence as they see it themselves.
async fn presence(env: &TestEnv, user: &str) -> Value {
    let (s, b) = env.get(&format!("{USERS}/{user}"), &env.token(user)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    b
}

/// Waits until `user` has `status`; returns how long it took.
async fn wait_status(env: &TestEnv, user: &str, status: &str, within: Duration) -> Duration {
    let start = tokio::time::Instant::now();
    loop {
        let p = presence(env, user).await;
        if p["status"] == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{user} not {status} within {within:?}: {p}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `user` has `n` devices; returns the presence.
async fn wait_devices(env: &TestEnv, user: &str, n: usize, within: Duration) -> Value {
    let start = tokio::time::Instant::now();
    loop {
        let p = presence(env, user).await;
        if p["devices"].as_array().unwrap().len() == n {
            return p;
        }
        assert!(start.elapsed() < within, "{user}: not {n} devices: {p}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An observer subscribed to `channel`.
async fn observer(env: &TestEnv, user: &str, channel: &str) -> WsClient {
    let mut c = WsClient::connect(&env.ws_url("presence", &env.token(user))).await;
    let subscribed = c.subscribe(channel, None).await;
    assert_eq!(subscribed["op"], "subscribed", "{subscribed}");
    c
}

/// The `presence_update` frames (their data) that arrive within `wait`.
async fn updates_within(c: &mut WsClient, wait: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Ok(f) if f["type"] == "presence_update" => {
                assert_eq!(f["data"]["scope"], "user", "{f}");
                out.push(f["data"].clone());
            }
            Ok(_) => {}
            Err(Ended::Timeout) => return out,
            Err(e) => panic!("connection ended: {e:?}"),
        }
    }
}

/// Reads `presence_update`s until one says `user` is `status`; panics after `within`.
async fn until_update(c: &mut WsClient, user: &str, status: &str, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match c.next_within(left).await {
            Ok(f) if f["type"] == "presence_update" => {
                if f["data"]["userId"] == user && f["data"]["status"] == status {
                    return f["data"].clone();
                }
            }
            Ok(_) => {}
            Err(e) => panic!("no presence_update {user} {status}: {e:?}"),
        }
    }
}

fn statuses_of(updates: &[Value], user: &str) -> Vec<String> {
    updates
        .iter()
        .filter(|u| u["userId"] == user)
        .map(|u| u["status"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_killed_relay_takes_its_users_offline_within_the_ttl_and_users_on_a_live_one_stay() {
    let env = env(Duration::from_secs(600)).await;
    for user in ["ann", "bob", "obs"] {
        env.add_member("p-team", user, ProjectRole::Editor).await;
    }
    env.add_member("p-other", "loner", ProjectRole::Editor)
        .await;
    let mut obs = observer(&env, "obs", "project:p-team").await;
    let mut loner = observer(&env, "loner", "project:p-other").await;
    // Loner shares nothing with ann or bob: not even their project's channel is open to them.
    let denied = loner.subscribe("project:p-team", None).await;
    assert_eq!(denied["code"], "forbidden", "{denied}");

    let mut doomed = ServerProcess::start(
        &env,
        env!("CARGO_BIN_EXE_relay-process"),
        &[
            ("INKWIRE_ROUTER", "off"),
            ("INKWIRE_RELAY_PRESENCE_INTERVAL", "100ms"),
            ("INKWIRE_RELAY_PRESENCE_HEARTBEAT", "300ms"),
        ],
    )
    .await;
    let _ann = connect(
        &env,
        &doomed.base,
        "ann",
        "&deviceType=desktop&deviceName=Laptop",
    )
    .await;
    let _bob_doomed = connect(&env, &doomed.base, "bob", "&deviceType=mobile").await;
    let _bob_live = connect(&env, &env.base, "bob", "&deviceType=web").await;
    wait_status(&env, "ann", "online", Duration::from_secs(5)).await;
    wait_status(&env, "bob", "online", Duration::from_secs(5)).await;
    let ann = wait_devices(&env, "ann", 1, Duration::from_secs(5)).await;
    assert_eq!(ann["devices"][0]["type"], "desktop");
    assert_eq!(ann["devices"][0]["name"], "Laptop");
    assert_eq!(ann["lastSeen"], Value::Null);
    wait_devices(&env, "bob", 2, Duration::from_secs(5)).await;
    until_update(&mut obs, "ann", "online", Duration::from_secs(5)).await;

    doomed.kill();
    let took = wait_status(&env, "ann", "offline", TTL + Duration::from_secs(5)).await;
    assert!(
        took <= TTL + Duration::from_secs(2),
        "offline {took:?} after the kill; the TTL is {TTL:?}"
    );
    let ann = presence(&env, "ann").await;
    assert!(ann["lastSeen"].is_string(), "{ann}");
    assert_eq!(ann["devices"], json!([]));
    // Bob's connection to the live instance keeps him online; his dead one is gone.
    let bob = presence(&env, "bob").await;
    assert_eq!(bob["status"], "online", "{bob}");
    assert_eq!(bob["devices"].as_array().unwrap().len(), 1, "{bob}");
    assert_eq!(bob["devices"][0]["type"], "web");

    let offline = until_update(&mut obs, "ann", "offline", Duration::from_secs(3)).await;
    assert!(offline["lastSeen"].is_string(), "{offline}");
    let later = updates_within(&mut obs, Duration::from_millis(700)).await;
    assert!(
        !statuses_of(&later, "bob").contains(&"offline".to_string()),
        "bob never went offline: {later:?}"
    );
    // Nothing about ann or bob reached the user who shares nothing (only their own coming
    // online, on their own project), and they cannot read the others.
    let theirs = updates_within(&mut loner, Duration::from_millis(300)).await;
    assert!(theirs.iter().all(|u| u["userId"] == "loner"), "{theirs:?}");
    assert_eq!(statuses_of(&theirs, "loner"), ["online"], "{theirs:?}");
    let (s, b) = env.get(&format!("{USERS}/ann"), &env.token("loner")).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["code"], "user_not_found");
}

#[tokio::test]
async fn a_second_tab_never_replaces_the_first_and_the_last_to_close_sets_last_seen() {
    let env = env(Duration::from_secs(600)).await;
    for user in ["ann", "obs"] {
        env.add_member("p-tabs", user, ProjectRole::Editor).await;
    }
    let mut obs = observer(&env, "obs", "project:p-tabs").await;
    let mut tab1 = connect(&env, &env.base, "ann", "&deviceType=web&deviceName=Tab%201").await;
    let mut tab2 = connect(&env, &env.base, "ann", "&deviceType=web&deviceName=Tab%202").await;
    wait_status(&env, "ann", "online", Duration::from_secs(5)).await;
    let p = wait_devices(&env, "ann", 2, Duration::from_secs(5)).await;
    let mut names: Vec<&str> = p["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["Tab 1", "Tab 2"]);

    tab1.socket.close(None).await.unwrap();
    // Several report intervals later: still online, one device left.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let p = presence(&env, "ann").await;
    assert_eq!(p["status"], "online", "{p}");
    assert_eq!(p["devices"].as_array().unwrap().len(), 1, "{p}");
    assert_eq!(p["devices"][0]["name"], "Tab 2");
    assert_eq!(p["lastSeen"], Value::Null);

    let before_close = time::OffsetDateTime::now_utc();
    tab2.socket.close(None).await.unwrap();
    wait_status(&env, "ann", "offline", Duration::from_secs(3)).await;
    let p = presence(&env, "ann").await;
    let last_seen = time::OffsetDateTime::parse(
        p["lastSeen"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(last_seen >= before_close - Duration::from_millis(50), "{p}");
    // The observer saw ann online once and offline once: no flicker while a tab was left.
    let updates = updates_within(&mut obs, Duration::from_millis(500)).await;
    assert_eq!(
        statuses_of(&updates, "ann"),
        ["online", "offline"],
        "{updates:?}"
    );
}

#[tokio::test]
async fn away_after_idle_time_or_when_the_client_says_so_and_back_on_activity() {
    let env = env(Duration::from_millis(1200)).await;
    for user in ["ann", "obs"] {
        env.add_member("p-away", user, ProjectRole::Editor).await;
    }
    let mut obs = observer(&env, "obs", "project:p-away").await;
    // The status cannot be set without a connection.
    let (s, b) = env
        .post(STATUS, &env.token("ann"), &json!({"status": "away"}))
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert_eq!(b["code"], "not_connected");

    let mut ann = connect(&env, &env.base, "ann", "").await;
    wait_status(&env, "ann", "online", Duration::from_secs(3)).await;
    until_update(&mut obs, "ann", "online", Duration::from_secs(3)).await;
    // Idle: away after the idle time, pushed.
    let took = wait_status(&env, "ann", "away", Duration::from_secs(4)).await;
    assert!(
        took >= Duration::from_millis(500),
        "away too soon: {took:?}"
    );
    until_update(&mut obs, "ann", "away", Duration::from_secs(3)).await;
    // Any client frame is activity: online again.
    ann.send(json!({"op": "ping"})).await;
    assert_eq!(ann.next().await["op"], "pong");
    wait_status(&env, "ann", "online", Duration::from_secs(2)).await;
    until_update(&mut obs, "ann", "online", Duration::from_secs(3)).await;

    // The client says away: away at once, and activity does not undo what the user said.
    let (s, b) = env
        .post(STATUS, &env.token("ann"), &json!({"status": "away"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "away");
    until_update(&mut obs, "ann", "away", Duration::from_secs(3)).await;
    ann.send(json!({"op": "ping"})).await;
    assert_eq!(ann.next().await["op"], "pong");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(presence(&env, "ann").await["status"], "away");
    // Saying online is activity too: online, and idle again only after the idle time.
    let (s, b) = env
        .post(STATUS, &env.token("ann"), &json!({"status": "online"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "online");
    until_update(&mut obs, "ann", "online", Duration::from_secs(3)).await;
    assert_eq!(presence(&env, "ann").await["status"], "online");
}

#[tokio::test]
async fn who_is_in_a_room_now_is_for_its_participants_and_room_sharers_get_updates() {
    let env = env(Duration::from_secs(600)).await;
    let (s, room) = env
        .post(
            "/api/realtime/chat/rooms",
            &env.token("ann"),
            &json!({"name": "r", "participants": ["bob", "cid"]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{room}");
    let room = room["id"].as_str().unwrap().to_string();
    // Bob shares only the room with cid: he gets cid's updates on the room's channel.
    let mut bob_watch = observer(&env, "bob", &format!("room:{room}")).await;
    let _ann = connect(&env, &env.base, "ann", "").await;
    let mut cid = connect(&env, &env.base, "cid", "").await;
    wait_status(&env, "ann", "online", Duration::from_secs(3)).await;
    wait_status(&env, "cid", "online", Duration::from_secs(3)).await;

    let (s, b) = env.get(&format!("{ROOMS}/{room}"), &env.token("ann")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["participants"], 3);
    // Bob's watching connection counts: he is online too.
    let mut online: Vec<&str> = b["online"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["userId"].as_str().unwrap())
        .collect();
    online.sort();
    assert_eq!(online, ["ann", "bob", "cid"], "{b}");
    // Bob may read cid (they share the room); dave may not read the room nor cid.
    let (s, _) = env.get(&format!("{USERS}/cid"), &env.token("bob")).await;
    assert_eq!(s, StatusCode::OK);
    let (s, b) = env
        .get(&format!("{ROOMS}/{room}"), &env.token("dave"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert_eq!(b["code"], "room_not_found");
    let (s, _) = env.get(&format!("{USERS}/cid"), &env.token("dave")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The service reads any room.
    let (s, _) = env
        .get(&format!("{ROOMS}/{room}"), &env.service_token())
        .await;
    assert_eq!(s, StatusCode::OK);

    cid.socket.close(None).await.unwrap();
    let gone = until_update(&mut bob_watch, "cid", "offline", Duration::from_secs(3)).await;
    assert!(gone["lastSeen"].is_string(), "{gone}");
    let (_, b) = env.get(&format!("{ROOMS}/{room}"), &env.token("ann")).await;
    assert!(
        !b["online"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["userId"] == "cid"),
        "{b}"
    );
}

#[tokio::test]
async fn bad_input_on_every_route_is_refused_with_a_problem() {
    let env = env(Duration::from_secs(600)).await;
    let ann = env.token("ann");
    // No token, a bad token.
    for (method, path) in [
        (reqwest::Method::GET, format!("{USERS}/ann")),
        (reqwest::Method::GET, format!("{ROOMS}/r-1")),
        (reqwest::Method::POST, STATUS.to_string()),
    ] {
        let (s, b, _) = env
            .send(
                env.http
                    .request(method.clone(), env.url(&path))
                    .json(&json!({"status": "away"})),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}: {b}");
        let (s, _, _) = env
            .send(
                env.http
                    .request(method, env.url(&path))
                    .bearer_auth("not-a-token")
                    .json(&json!({"status": "away"})),
            )
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{path}");
    }
    // Bad ids.
    let long = "x".repeat(65);
    for bad in ["a.b", "a%2Ab", long.as_str(), "%E2%82%AC"] {
        for base in [USERS, ROOMS] {
            let (s, b) = env.get(&format!("{base}/{bad}"), &ann).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{base}/{bad}: {b}");
            assert_eq!(b["code"], "invalid_id", "{b}");
        }
    }
    // Bad statuses and bodies.
    let _c = connect(&env, &env.base, "ann", "").await;
    wait_status(&env, "ann", "online", Duration::from_secs(3)).await;
    for body in [
        json!({"status": "offline"}),
        json!({"status": "invisible"}),
        json!({"status": 1}),
        json!({}),
        json!({"status": "away", "extra": true}),
        json!(["away"]),
    ] {
        let (s, b) = env.post(STATUS, &ann, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {b}");
    }
    let (s, b, _) = env
        .send(
            env.http
                .post(env.url(STATUS))
                .bearer_auth(&ann)
                .header("content-type", "application/json")
                .body("{not json"),
        )
        .await;
    assert!(s.is_client_error(), "{s} {b}");
    // Device parameters: validated before the upgrade, never guessed.
    let long_name = "n".repeat(65);
    for query in [
        format!("&deviceName={long_name}"),
        "&deviceName=".to_string(),
        "&deviceName=a%0Ab".to_string(),
        "&deviceType=toaster".to_string(),
    ] {
        let url = format!("{}{query}", env.ws_url("presence", &ann));
        match WsClient::try_connect(url.as_str()).await {
            Err(status) => assert_eq!(status, 400, "{query}"),
            Ok(_) => panic!("{query} was accepted"),
        }
    }
    // A user's own presence needs no sharing; another's does.
    let (s, b) = env.get(&format!("{USERS}/ann"), &ann).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["devices"].as_array().unwrap().len(), 1, "{b}");
    assert_eq!(b["devices"][0]["type"], Value::Null, "nothing guessed: {b}");
    assert_eq!(b["devices"][0]["name"], Value::Null, "nothing guessed: {b}");
    let (s, b) = env.get(&format!("{USERS}/nobody-here"), &ann).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
}

#[tokio::test]
async fn an_instance_swept_while_alive_reports_its_connections_again() {
    let env = env(Duration::from_secs(600)).await;
    for user in ["ann", "obs"] {
        env.add_member("p-late", user, ProjectRole::Editor).await;
    }
    let mut obs = observer(&env, "obs", "project:p-late").await;
    let _ann = connect(&env, &env.base, "ann", "&deviceType=tablet").await;
    wait_status(&env, "ann", "online", Duration::from_secs(3)).await;
    until_update(&mut obs, "ann", "online", Duration::from_secs(3)).await;
    // As if the instance's reports had been late: its heartbeat deadline passes and the
    // worker sweeps it. (A report may come first and push the deadline again: then again.)
    let mut redis = env.state.redis.clone();
    let queue = inkwire_shared::due_queue::DueQueue::new(inkwire_presence::store::INSTANCES_QUEUE);
    let mut swept = false;
    for _ in 0..10 {
        queue
            .schedule(&mut redis, &env.relay.instance_id, 0)
            .await
            .unwrap();
        let updates = updates_within(&mut obs, Duration::from_millis(500)).await;
        let seen = statuses_of(&updates, "ann");
        if seen.contains(&"offline".to_string()) {
            swept = true;
            // The instance lives: its next report is answered with a resync request, and
            // the resync brings ann's connection back.
            if !seen.ends_with(&["online".to_string()]) {
                until_update(&mut obs, "ann", "online", Duration::from_secs(3)).await;
            }
            break;
        }
    }
    assert!(swept, "the instance was never swept");
    let p = wait_devices(&env, "ann", 1, Duration::from_secs(3)).await;
    assert_eq!(p["status"], "online", "{p}");
    assert_eq!(p["devices"][0]["type"], "tablet", "{p}");
}
