//! End-to-end tests of co-editing (issue 10) with stock npm clients (yjs 13.6, y-websocket
//! 3.1, ws: `tests/peers`), real NATS and Redis: convergence, instances, offline edits,
//! read-only users, awareness, idle clients, a server killed with SIGKILL, compaction and unloading,
//! and bad frames.

use std::time::Duration;

use inkwire_collaboration::CoeditConfig;
use inkwire_collaboration::storage::Store;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::yjs_peer::{RawEnd, RawYjs, YjsPeer};
use inkwire_tests::{ServerProcess, TestEnv};
use reqwest::StatusCode;
use yrs::sync::{Message, SyncMessage};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Doc, GetString, ReadTxn, StateVector, Text, Transact, Update};

const PROJECT: &str = "p-co";

async fn env_with(tweak: impl FnOnce(&mut CoeditConfig)) -> TestEnv {
    TestEnv::start_settings(
        |_| {},
        |s| {
            s.coedit.attribution_interval = Duration::from_millis(200);
            tweak(&mut s.coedit);
        },
    )
    .await
}

/// `doc` registered in the test project, with `members` (user, role).
async fn setup(env: &TestEnv, doc: &str, members: &[(&str, ProjectRole)]) {
    env.document_with_members(PROJECT, doc, members).await;
}

async fn peer(env_base: &str, env: &TestEnv, doc: &str, user: &str) -> YjsPeer {
    env.synced_peer(env_base, doc, user).await
}

fn doc_from(state: &[u8]) -> Doc {
    let doc = Doc::new();
    doc.transact_mut()
        .apply_update(Update::decode_v1(state).unwrap())
        .unwrap();
    doc
}

fn text_of(doc: &Doc) -> String {
    let txn = doc.transact();
    txn.get_text("content")
        .map(|t| t.get_string(&txn))
        .unwrap_or_default()
}

async fn rest_text(env: &TestEnv, doc: &str, user: &str) -> String {
    let (status, body) = env
        .get(
            &format!("/api/realtime/collaboration/document/{doc}/content"),
            &env.token(user),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["roots"]["content"].as_str().unwrap_or("").to_string()
}

/// Waits (20 s at most) until every peer holds the same text, and returns it.
async fn agree(peers: &mut [&mut YjsPeer]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut texts = Vec::new();
        for p in peers.iter_mut() {
            texts.push(p.text().await);
        }
        if texts.windows(2).all(|w| w[0] == w[1]) {
            return texts.pop().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clients diverged: {texts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eventually<F, Fut>(wait: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn two_clients_converge_after_1000_random_concurrent_edits_each() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-conv",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Owner)],
    )
    .await;
    let mut a = peer(&env.base, &env, "d-conv", "alice").await;
    let mut b = peer(&env.base, &env, "d-conv", "bob").await;
    tokio::join!(a.edits(1000, 1), b.edits(1000, 2));
    let (ta, _) = tokio::join!(a.quiesce(1000), b.quiesce(1000));
    assert!(!ta.is_empty());
    let ta = agree(&mut [&mut a, &mut b]).await;
    // The stored document (REST, rebuilt from the stream) is the same.
    assert_eq!(rest_text(&env, "d-conv", "alice").await, ta);
    let res = env
        .http
        .get(env.url("/api/realtime/collaboration/document/d-conv/state"))
        .bearer_auth(env.token("bob"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/octet-stream");
    let state = res.bytes().await.unwrap();
    assert_eq!(text_of(&doc_from(&state)), ta);
    // Attribution: both users, with updates; edit_applied events aggregated.
    let found = eventually(Duration::from_secs(10), || async {
        let (_, body) = env
            .get(
                "/api/realtime/collaboration/document/d-conv/contributions",
                &env.token("alice"),
            )
            .await;
        let c = body["contributors"].as_array().cloned().unwrap_or_default();
        c.len() == 2
            && c.iter().all(|u| {
                u["updates"].as_u64().unwrap_or(0) > 0
                    && u["inserted"].as_u64().unwrap_or(0) > 0
                    && u["activeMinutes"].as_u64().unwrap_or(0) >= 1
            })
    })
    .await;
    assert!(found, "contributions of both users");
    let events = env.stream_messages("EVENTS_COLLABORATION").await;
    // joined ×2 plus a handful of aggregated edit_applied, far fewer than 2,000 edits.
    assert!((4..200).contains(&events), "{events} collaboration events");
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn three_clients_on_two_instances_converge_and_share_awareness() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-multi",
        &[
            ("alice", ProjectRole::Editor),
            ("bob", ProjectRole::Editor),
            ("carol", ProjectRole::Editor),
        ],
    )
    .await;
    let second = env
        .second_instance_settings(|s| s.coedit.attribution_interval = Duration::from_millis(200))
        .await;
    let mut a = peer(&env.base, &env, "d-multi", "alice").await;
    let mut b = peer(&env.base, &env, "d-multi", "bob").await;
    let mut c = peer(&second.base, &env, "d-multi", "carol").await;
    // Awareness crosses instances.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while c.peers().await.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "carol sees the two others"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::join!(a.edits(300, 11), b.edits(300, 12), c.edits(300, 13));
    tokio::join!(a.quiesce(1000), b.quiesce(1000), c.quiesce(1000));
    let ta = agree(&mut [&mut a, &mut b, &mut c]).await;
    assert!(!ta.is_empty());
    // What `inkwire replay coedit` rebuilds from the stream equals the live document ...
    let rebuilt = inkwire_collaboration::storage::rebuild(&env.state.js, "d-multi")
        .await
        .unwrap();
    assert_eq!(text_of(&rebuilt), ta);
    // ... and `inkwire replay coedit` with no ids finds it in the stream.
    let listed = inkwire_collaboration::storage::documents(&env.state.js)
        .await
        .unwrap();
    assert!(listed.iter().any(|d| d == "d-multi"), "{listed:?}");
    assert_eq!(env.coedit.loaded_documents(), 1);
    assert_eq!(second.coedit.loaded_documents(), 1);
    for p in [a, b, c] {
        p.exit().await;
    }
}

#[tokio::test]
async fn offline_edits_merge_on_reconnect() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-off",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let mut a = peer(&env.base, &env, "d-off", "alice").await;
    let mut b = peer(&env.base, &env, "d-off", "bob").await;
    a.insert(0, "shared ").await;
    b.quiesce(500).await;
    a.call(serde_json::json!({"cmd": "disconnect"})).await;
    a.insert(0, "[offline]").await;
    b.insert(100, "[online]").await;
    b.quiesce(300).await;
    a.call(serde_json::json!({"cmd": "connect"})).await;
    let ta = agree(&mut [&mut a, &mut b]).await;
    assert!(ta.contains("[offline]") && ta.contains("[online]") && ta.contains("shared"));
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn a_reader_cannot_change_the_document() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-read",
        &[
            ("ed", ProjectRole::Editor),
            ("rita", ProjectRole::Reader),
            ("rev", ProjectRole::Reviewer),
        ],
    )
    .await;
    let mut e = peer(&env.base, &env, "d-read", "ed").await;
    e.insert(0, "hello").await;
    e.quiesce(300).await;
    for reader in ["rita", "rev"] {
        let mut r = peer(&env.base, &env, "d-read", reader).await;
        assert_eq!(r.quiesce(300).await, "hello");
        // Connecting and syncing is not an attempt to change anything.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !r.events().iter().any(|v| v["event"] == "denied"),
            "{:?}",
            r.events()
        );
        r.insert(0, "X").await;
        assert!(
            r.wait_event(Duration::from_secs(5), |v| v["event"] == "denied")
                .await,
            "the reader is told"
        );
        // Nobody else sees it, and the stored document does not have it.
        assert_eq!(e.quiesce(500).await, "hello");
        assert_eq!(rest_text(&env, "d-read", "ed").await, "hello");
        // Its offline-style resync on reconnect is dropped too.
        r.call(serde_json::json!({"cmd": "disconnect"})).await;
        r.call(serde_json::json!({"cmd": "connect"})).await;
        r.wait_synced().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(e.text().await, "hello");
        r.exit().await;
    }
    e.exit().await;
}

#[tokio::test]
async fn refused_upgrades_are_problems_and_readers_are_allowed() {
    let env = env_with(|_| {}).await;
    setup(&env, "d-auth", &[("ed", ProjectRole::Editor)]).await;
    env.add_member("p-other", "stranger", ProjectRole::Owner)
        .await;
    let base = env.base.replacen("http://", "ws://", 1);
    let try_connect = |url: String| async move {
        match tokio_tungstenite::connect_async(url).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(try_connect(format!("{base}/ws/docs/d-auth")).await, 401);
    assert_eq!(
        try_connect(format!("{base}/ws/docs/d-auth?token=forged")).await,
        401
    );
    assert_eq!(
        try_connect(format!(
            "{base}/ws/docs/d-auth?token={}",
            env.token("stranger")
        ))
        .await,
        403
    );
    assert_eq!(
        try_connect(format!(
            "{base}/ws/docs/d-unregistered?token={}",
            env.token("ed")
        ))
        .await,
        403
    );
    assert_eq!(
        try_connect(format!("{base}/ws/docs/bad.id?token={}", env.token("ed"))).await,
        400
    );
    assert_eq!(
        try_connect(format!("{base}/ws/docs/d-auth?token={}", env.token("ed"))).await,
        101
    );
    // Refusals are problem+json.
    let res = env
        .http
        .get(env.url("/ws/docs/d-auth"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .bearer_auth(env.token("stranger"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    // A browser on another site, even with a member's token.
    let res = env
        .http
        .get(env.url("/ws/docs/d-auth"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("origin", "https://evil.example")
        .bearer_auth(env.token("ed"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["code"], "origin_not_allowed");
    // REST: members only, ids checked, problems.
    let (s, body) = env
        .get(
            "/api/realtime/collaboration/document/d-auth/content",
            &env.token("stranger"),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "forbidden");
    let (s, _) = env
        .get(
            "/api/realtime/collaboration/document/bad.id/state",
            &env.token("ed"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = env
        .get(
            "/api/realtime/collaboration/document/d-auth/contributions",
            "",
        )
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn awareness_arrives_and_disappears_when_a_client_leaves() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-aw",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Reader)],
    )
    .await;
    let a = peer(&env.base, &env, "d-aw", "alice").await;
    let mut b = peer(&env.base, &env, "d-aw", "bob").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !b
        .peers()
        .await
        .iter()
        .any(|p| p["state"]["user"]["name"].as_str().is_some())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob sees alice's awareness"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.exit().await;
    assert!(
        b.wait_event(Duration::from_secs(5), |v| {
            v["event"] == "awareness" && !v["removed"].as_array().unwrap().is_empty()
        })
        .await,
        "alice's awareness is removed when she leaves: {:?}",
        b.events()
    );
    assert!(b.peers().await.is_empty());
    b.exit().await;
}

#[tokio::test]
async fn an_idle_client_stays_connected_past_the_clients_30_second_timeout() {
    // Default keep-alive (15 s); the client sends nothing (no local awareness state), so
    // only the server's keep-alive stops its 30-second watchdog from reconnecting.
    let env = env_with(|_| {}).await;
    setup(&env, "d-idle", &[("alice", ProjectRole::Editor)]).await;
    let mut p = YjsPeer::start(&env.base, "d-idle", &env.token("alice"), true).await;
    p.wait_synced().await;
    tokio::time::sleep(Duration::from_secs(40)).await;
    let stats = p.stats().await;
    assert_eq!(
        stats["connects"],
        1,
        "reconnected: {stats} {:?}",
        p.events()
    );
    assert_eq!(stats["closes"], 0, "{stats}");
    assert_eq!(stats["wsconnected"], true);
    p.exit().await;
}

#[tokio::test]
async fn a_killed_server_loses_no_edit_another_client_had_received() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-crash",
        &[
            ("wanda", ProjectRole::Editor),
            ("rita", ProjectRole::Reader),
        ],
    )
    .await;
    let mut doomed = ServerProcess::start(&env, env!("CARGO_BIN_EXE_coedit-process"), &[]).await;
    let mut w = peer(&doomed.base, &env, "d-crash", "wanda").await;
    let mut r = peer(&doomed.base, &env, "d-crash", "rita").await;
    // Wanda types; mid-way the server dies, and so does she (so nothing is resent).
    let typing = tokio::spawn(async move {
        w.edits(100_000, 7).await;
        w
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while r.text().await.len() <= 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the reader sees edits"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    doomed.kill();
    typing.abort();
    // What the reader had received when the server died: the text it shows, and its
    // document state (read until the state holds what the text shows, so a state asked
    // for in the middle of applying a received update is not mistaken for a loss).
    let shown = r.text().await.len();
    let mut seen = r.state().await;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while text_of(&doc_from(&seen)).len() < shown && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = r.state().await;
    }
    r.kill().await;
    let seen_doc = doc_from(&seen);
    let seen_text = text_of(&seen_doc);
    assert!(
        seen_text.len() > 300 && seen_text.len() >= shown,
        "the reader showed {shown} characters, its state holds {}",
        seen_text.len()
    );
    // A fresh instance (the test environment's) loads the document from the stream.
    let mut c = peer(&env.base, &env, "d-crash", "rita").await;
    let after = doc_from(&c.state().await);
    let sv_seen = seen_doc.transact().state_vector();
    let sv_after = after.transact().state_vector();
    for (client, clock) in sv_seen.iter() {
        assert!(
            sv_after.get(client) >= *clock,
            "client {client}: {} < {clock}: an update the reader had is lost",
            sv_after.get(client)
        );
    }
    // Applying what the reader had changes nothing.
    let before = text_of(&after);
    after
        .transact_mut()
        .apply_update(Update::decode_v1(&seen).unwrap())
        .unwrap();
    assert_eq!(text_of(&after), before);
    c.exit().await;
}

#[tokio::test]
async fn compaction_unload_and_reload_give_the_same_content() {
    let env = env_with(|c| {
        c.idle_unload = Duration::from_millis(400);
        c.compact_interval = Duration::from_secs(3600);
    })
    .await;
    setup(&env, "d-comp", &[("alice", ProjectRole::Editor)]).await;
    let store = Store::open(&env.state.js).await.unwrap();
    let mut a = peer(&env.base, &env, "d-comp", "alice").await;
    a.edits(300, 5).await;
    a.quiesce(500).await;
    let before = store.update_count("d-comp").await.unwrap();
    assert!(before >= 300, "{before} updates stored");
    env.coedit.compact_now("d-comp").await;
    let head = store.head("d-comp").await.unwrap().expect("a snapshot");
    assert!(head.head.covered > 0 && !head.head.chunks.is_empty());
    a.edits(100, 6).await;
    a.quiesce(500).await;
    env.coedit.compact_now("d-comp").await;
    // The second compaction purged what the first snapshot covers.
    let after = store.update_count("d-comp").await.unwrap();
    assert!(after < before, "{after} updates left of {before}");
    let text = a.text().await;
    a.exit().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.coedit.loaded_documents() == 0
        })
        .await,
        "unloaded"
    );
    // Reloaded from the snapshot plus the updates after it.
    assert_eq!(rest_text(&env, "d-comp", "alice").await, text);
    let mut b = peer(&env.base, &env, "d-comp", "alice").await;
    assert_eq!(b.text().await, text);
    b.exit().await;
}

/// A raw client's sync step 1 for an empty document.
fn empty_step1() -> Vec<u8> {
    Message::Sync(SyncMessage::SyncStep1(StateVector::default())).encode_v1()
}

#[tokio::test]
async fn a_hundred_documents_opened_then_left_are_unloaded() {
    let env = env_with(|c| c.idle_unload = Duration::from_millis(500)).await;
    env.add_member(PROJECT, "alice", ProjectRole::Editor).await;
    let token = env.token("alice");
    let mut conns = Vec::new();
    for i in 0..100 {
        let doc = format!("d-many-{i}");
        env.register_document(PROJECT, &doc).await;
        let mut c = RawYjs::connect(&env.base, &doc, &token).await;
        // The server's step 1 comes first.
        let first = c.next_binary(Duration::from_secs(5)).await.unwrap();
        assert_eq!(&first[..2], &[0, 0]);
        c.send(empty_step1()).await;
        conns.push(c);
    }
    assert_eq!(env.coedit.loaded_documents(), 100);
    for mut c in conns {
        let _ = c.socket.close(None).await;
    }
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.coedit.loaded_documents() == 0
        })
        .await,
        "{} documents still loaded",
        env.coedit.loaded_documents()
    );
}

#[tokio::test]
async fn bad_frames_close_only_their_connection() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-bad",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let mut a = peer(&env.base, &env, "d-bad", "alice").await;
    let mut b = peer(&env.base, &env, "d-bad", "bob").await;
    a.insert(0, "before").await;
    let token = env.token("alice");
    let ten_mib = {
        let d = Doc::new();
        let t = d.get_or_insert_text("content");
        t.insert(&mut d.transact_mut(), 0, &"x".repeat(10 << 20));
        let u = d
            .transact()
            .encode_state_as_update_v1(&StateVector::default());
        Message::Sync(SyncMessage::Update(u)).encode_v1()
    };
    let packed = [empty_step1(), empty_step1()].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff, 0xfe, 0xfd, 0x13, 0x37]),
        ("truncated varint", vec![0x80]),
        ("truncated sync", vec![0, 0x80, 0x80]),
        ("unknown type", vec![9, 0]),
        ("unknown sync type", vec![0, 7, 0]),
        ("garbage update", vec![0, 2, 6, 1, 2, 3, 4, 5, 6]),
        ("two messages in one frame", packed),
        ("10 MiB update", ten_mib),
    ];
    for (what, frame) in cases {
        let mut raw = RawYjs::connect(&env.base, "d-bad", &token).await;
        raw.send(frame).await;
        let end = raw.until_closed(Duration::from_secs(10)).await;
        assert!(matches!(end, RawEnd::Closed(_)), "{what}: {end:?}");
        if !what.contains("MiB") {
            assert_eq!(end, RawEnd::Closed(Some(4400)), "{what}");
        }
    }
    // The others carry on.
    b.insert(0, "after ").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !a.text().await.contains("after") {
        assert!(tokio::time::Instant::now() < deadline, "a sees b's edit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ta = agree(&mut [&mut a, &mut b]).await;
    assert!(ta.contains("before") && ta.contains("after"), "{ta}");
    assert_eq!(a.stats().await["connects"], 1);
    assert_eq!(b.stats().await["connects"], 1);
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn a_removed_member_is_disconnected_and_a_demoted_one_becomes_read_only() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-rev",
        &[
            ("ed", ProjectRole::Owner),
            ("gone", ProjectRole::Editor),
            ("demoted", ProjectRole::Editor),
        ],
    )
    .await;
    let mut e = peer(&env.base, &env, "d-rev", "ed").await;
    let gone = peer(&env.base, &env, "d-rev", "gone").await;
    let mut demoted = peer(&env.base, &env, "d-rev", "demoted").await;
    let mut redis = env.state.redis.clone();
    use inkwire_shared::access_changes::{AccessChange, announce};
    use inkwire_shared::membership::set_member;
    set_member(&mut redis, PROJECT, "gone", None).await.unwrap();
    announce(
        &env.state.nats,
        &AccessChange::Member {
            project_id: PROJECT.into(),
            user_id: "gone".into(),
        },
    )
    .await
    .unwrap();
    assert!(
        gone.wait_event(Duration::from_secs(5), |v| v["event"] == "close"
            && v["code"] == 4403)
            .await,
        "{:?}",
        gone.events()
    );
    set_member(&mut redis, PROJECT, "demoted", Some(ProjectRole::Reader))
        .await
        .unwrap();
    announce(
        &env.state.nats,
        &AccessChange::Member {
            project_id: PROJECT.into(),
            user_id: "demoted".into(),
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    demoted.insert(0, "nope").await;
    assert!(
        demoted
            .wait_event(Duration::from_secs(5), |v| v["event"] == "denied")
            .await
    );
    assert_eq!(e.quiesce(500).await, "");
    e.exit().await;
    demoted.exit().await;
}

#[tokio::test]
async fn a_failed_load_refuses_the_connection_instead_of_serving_an_empty_document() {
    let env = env_with(|c| {
        c.idle_unload = Duration::from_millis(300);
        c.load_timeout = Duration::from_secs(1);
    })
    .await;
    setup(&env, "d-fail", &[("alice", ProjectRole::Editor)]).await;
    let mut a = peer(&env.base, &env, "d-fail", "alice").await;
    a.insert(0, "keep me").await;
    a.quiesce(300).await;
    a.exit().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.coedit.loaded_documents() == 0
        })
        .await
    );
    // JetStream does not answer: the document cannot load, and no upgrade happens.
    env.stop_nats();
    let url = format!(
        "{}/ws/docs/d-fail?token={}",
        env.base.replacen("http://", "ws://", 1),
        env.token("alice")
    );
    let refused = match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("{e}"),
    };
    env.continue_nats();
    assert_eq!(refused, 503);
    assert_eq!(env.coedit.loaded_documents(), 0);
    // Once NATS answers again, the stored content is there.
    let mut b = peer(&env.base, &env, "d-fail", "alice").await;
    assert_eq!(b.text().await, "keep me");
    b.exit().await;
}
