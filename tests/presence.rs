//! End-to-end tests of presence and conflict prediction (issue 11) with stock npm Yjs clients
//! (`tests/peers`, cursors as Yjs relative positions in awareness), REST-only clients, real
//! NATS and Redis: warnings on `user:{id}` within 100 ms, the rules' distances, predictions
//! that stay right while a third client inserts paragraphs above, dedupe, readers, several
//! instances, expiry (stale, disconnect, a dead instance) and bad input.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use inkwire_collaboration::CoeditConfig;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::yjs_peer::YjsPeer;
use inkwire_tests::{TestEnv, WsClient};
use reqwest::StatusCode;
use serde_json::{Value, json};

const PROJECT: &str = "p-pr";
const OTHER_PROJECT: &str = "p-other";

/// Eight paragraphs: "p0 …" to "p7 …", each 10 UTF-16 units with its newline.
const TEXT: &str =
    "p0 aaaaaa\np1 bbbbbb\np2 cccccc\np3 dddddd\np4 eeeeee\np5 ffffff\np6 gggggg\np7 hhhhhh";

/// Offset of the start of paragraph `p` of [`TEXT`] (plus `k`).
fn at(p: u64, k: u64) -> u64 {
    p * 10 + k
}

async fn env_with(tweak: impl FnOnce(&mut CoeditConfig)) -> TestEnv {
    TestEnv::start_settings(
        |_| {},
        |s| {
            s.coedit.presence_interval = Duration::from_millis(100);
            s.coedit.attribution_interval = Duration::from_millis(200);
            tweak(&mut s.coedit);
        },
    )
    .await
}

async fn setup(env: &TestEnv, doc: &str, members: &[(&str, ProjectRole)]) {
    env.document_with_members(PROJECT, doc, members).await;
}

async fn peer(env_base: &str, env: &TestEnv, doc: &str, user: &str) -> YjsPeer {
    env.synced_peer(env_base, doc, user).await
}

/// Messages of one relay channel as they arrive (core NATS on the stream's republish
/// subject, as every relay instance receives them), with their arrival time.
#[derive(Clone)]
struct Inbox(Arc<Mutex<Vec<(Instant, Value)>>>);

impl Inbox {
    async fn subscribe(env: &TestEnv, subject: String) -> Inbox {
        let mut sub = env.state.nats.subscribe(subject).await.unwrap();
        let inbox = Inbox(Arc::default());
        let store = inbox.0.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) {
                    store.lock().unwrap().push((Instant::now(), v));
                }
            }
        });
        env.state.nats.flush().await.unwrap();
        inbox
    }

    /// `user:{id}` channel.
    async fn user(env: &TestEnv, user: &str) -> Inbox {
        Self::subscribe(env, format!("live.rt.user.{user}")).await
    }

    fn all(&self) -> Vec<(Instant, Value)> {
        self.0.lock().unwrap().clone()
    }

    /// Conflict warnings (the `data` of each), with arrival times.
    fn warnings(&self) -> Vec<(Instant, Value)> {
        self.all()
            .into_iter()
            .filter(|(_, v)| v["data"]["kind"] == "conflict_warning")
            .map(|(t, v)| (t, v["data"].clone()))
            .collect()
    }

    async fn wait_warnings(&self, n: usize, wait: Duration) -> Vec<(Instant, Value)> {
        let deadline = Instant::now() + wait;
        loop {
            let w = self.warnings();
            if w.len() >= n || Instant::now() >= deadline {
                return w;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn collaborators(env: &TestEnv, base: &str, doc: &str, user: &str) -> Vec<Value> {
    let res = env
        .http
        .get(format!(
            "{base}/api/realtime/collaboration/document/{doc}/collaborators"
        ))
        .bearer_auth(env.token(user))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let body: Value = res.json().await.unwrap();
    body["collaborators"].as_array().unwrap().clone()
}

async fn conflicts(env: &TestEnv, doc: &str, user: &str) -> Vec<Value> {
    let (status, body) = env
        .get(
            &format!("/api/realtime/collaboration/document/{doc}/conflicts"),
            &env.token(user),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["conflicts"].as_array().unwrap().clone()
}

fn of_user<'a>(list: &'a [Value], user: &str) -> Option<&'a Value> {
    list.iter().find(|c| c["userId"] == user)
}

/// Waits until the collaborators list satisfies `pred`.
async fn until_collaborators(
    env: &TestEnv,
    base: &str,
    doc: &str,
    user: &str,
    wait: Duration,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + wait;
    loop {
        let list = collaborators(env, base, doc, user).await;
        if pred(&list) || Instant::now() >= deadline {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A writer's client that fills the document with [`TEXT`].
async fn filled(env: &TestEnv, doc: &str, user: &str) -> YjsPeer {
    let mut p = peer(&env.base, env, doc, user).await;
    p.insert(0, TEXT).await;
    p.quiesce(200).await;
    p
}

async fn cursor_rest(env: &TestEnv, doc: &str, user: &str, offset: u64) -> (StatusCode, Value) {
    env.post(
        "/api/realtime/collaboration/cursor",
        &env.token(user),
        &json!({"documentId": doc, "offset": offset}),
    )
    .await
}

#[tokio::test]
async fn writer_moving_into_anothers_paragraph_warns_both_within_100ms() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-warn",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let (ia, ib) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "bob").await,
    );
    let events = Inbox::subscribe(&env, "events.collaboration.conflict_detected".into()).await;
    let mut a = filled(&env, "d-warn", "alice").await;
    let mut b = peer(&env.base, &env, "d-warn", "bob").await;
    a.cursor(at(1, 3), at(1, 3)).await;
    b.cursor(at(5, 2), at(5, 2)).await;
    // Both are seen, resolved from their relative positions.
    let list = until_collaborators(
        &env,
        &env.base,
        "d-warn",
        "alice",
        Duration::from_secs(5),
        |l| l.iter().filter(|c| !c["cursor"].is_null()).count() == 2,
    )
    .await;
    assert_eq!(
        of_user(&list, "alice").unwrap()["cursor"],
        json!({"offset": 13, "paragraph": 1})
    );
    assert_eq!(
        of_user(&list, "bob").unwrap()["cursor"],
        json!({"offset": 52, "paragraph": 5})
    );
    assert_eq!(of_user(&list, "bob").unwrap()["source"], "yjs");
    assert_eq!(of_user(&list, "bob").unwrap()["mode"], "editing");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(ia.warnings().is_empty() && ib.warnings().is_empty());
    // B moves into A's paragraph.
    let moved = Instant::now();
    b.cursor(at(1, 7), at(1, 7)).await;
    let (wa, wb) = tokio::join!(
        ia.wait_warnings(1, Duration::from_secs(2)),
        ib.wait_warnings(1, Duration::from_secs(2))
    );
    assert_eq!((wa.len(), wb.len()), (1, 1), "{wa:?} {wb:?}");
    for ((t, w), other) in [(&wa[0], "bob"), (&wb[0], "alice")] {
        let latency = t.duration_since(moved);
        assert!(
            latency < Duration::from_millis(100),
            "warned after {latency:?}"
        );
        assert_eq!(w["otherUserId"], other);
        assert_eq!(w["severity"], "high");
        assert_eq!(w["reason"], "same_paragraph");
        assert_eq!(w["paragraph"], 1);
        assert_eq!(w["documentId"], "d-warn");
        assert!(w["suggestion"].as_str().unwrap().contains(other));
    }
    let current = conflicts(&env, "d-warn", "bob").await;
    assert_eq!(
        current,
        vec![json!({"userIds": ["alice", "bob"], "severity": "high",
            "reason": "same_paragraph", "paragraph": 1})]
    );
    // One event, recorded, valid against its schema (the stream accepted it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ev = events.all();
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].1["type"], "conflict_detected");
    assert_eq!(ev[0].1["category"], "collaboration");
    assert_eq!(ev[0].1["userId"], "bob", "the mover's event");
    assert_eq!(ev[0].1["data"]["otherUserId"], "alice");
    assert_eq!(ev[0].1["documentId"], "d-warn");
    inkwire_shared::schema::schemas()
        .validate_event(&ev[0].1)
        .unwrap();
    // Moving away ends the current conflict.
    b.cursor(at(5, 0), at(5, 0)).await;
    let gone = until_collaborators(
        &env,
        &env.base,
        "d-warn",
        "bob",
        Duration::from_secs(5),
        |l| of_user(l, "bob").is_some_and(|b| b["cursor"]["paragraph"] == 5),
    )
    .await;
    assert!(!gone.is_empty());
    assert!(conflicts(&env, "d-warn", "bob").await.is_empty());
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn two_or_more_paragraphs_apart_no_warning_adjacent_is_medium() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-dist",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Owner)],
    )
    .await;
    let (ia, ib) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "bob").await,
    );
    let mut a = filled(&env, "d-dist", "alice").await;
    let mut b = peer(&env.base, &env, "d-dist", "bob").await;
    a.cursor(at(2, 1), at(2, 1)).await;
    for p in [7, 6, 5, 4] {
        b.cursor(at(p, 4), at(p, 4)).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Two paragraphs apart (2 and 4) and more: nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ia.warnings().is_empty(), "{:?}", ia.warnings());
    assert!(ib.warnings().is_empty());
    // Adjacent: medium.
    b.cursor(at(3, 4), at(3, 4)).await;
    let w = ia.wait_warnings(1, Duration::from_secs(2)).await;
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].1["severity"], "medium");
    assert_eq!(w[0].1["reason"], "adjacent_paragraph");
    assert_eq!(w[0].1["paragraph"], 2);
    assert_eq!(ib.wait_warnings(1, Duration::from_secs(2)).await.len(), 1);
    // A selection of A's reaching into paragraph 3 overlapping B's selection: high.
    b.cursor(at(3, 2), at(3, 8)).await;
    a.cursor(at(2, 1), at(3, 5)).await;
    let w = ia.wait_warnings(2, Duration::from_secs(2)).await;
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!(w[1].1["severity"], "high");
    assert_eq!(w[1].1["reason"], "overlapping_selection");
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn prediction_stays_right_while_a_third_client_inserts_paragraphs_above() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-above",
        &[
            ("alice", ProjectRole::Editor),
            ("bob", ProjectRole::Editor),
            ("carol", ProjectRole::Editor),
        ],
    )
    .await;
    let (ia, ib) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "bob").await,
    );
    let ic = Inbox::user(&env, "carol").await;
    let mut a = filled(&env, "d-above", "alice").await;
    let mut b = peer(&env.base, &env, "d-above", "bob").await;
    let mut c = peer(&env.base, &env, "d-above", "carol").await;
    // Two paragraphs apart: 4 and 6.
    a.cursor(at(4, 5), at(4, 5)).await;
    b.cursor(at(6, 5), at(6, 5)).await;
    // Carol inserts paragraphs at the top, several times, while they stay put.
    for round in 1..=5u64 {
        c.insert(0, "new paragraph\n\n").await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let list = until_collaborators(
            &env,
            &env.base,
            "d-above",
            "carol",
            Duration::from_secs(5),
            |l| {
                of_user(l, "alice").is_some_and(|a| a["cursor"]["paragraph"] == 4 + 2 * round)
                    && of_user(l, "bob").is_some_and(|b| b["cursor"]["paragraph"] == 6 + 2 * round)
            },
        )
        .await;
        assert_eq!(
            of_user(&list, "alice").unwrap()["cursor"]["paragraph"],
            4 + 2 * round,
            "{list:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ia.warnings().is_empty(), "{:?}", ia.warnings());
    assert!(ib.warnings().is_empty());
    assert!(
        ic.warnings().is_empty(),
        "carol has no cursor: never a party"
    );
    // Every client agrees on the text; B now moves into A's (shifted) paragraph, by offset
    // in its own copy.
    let text = b.quiesce(200).await;
    let start_of_a = text
        .split('\n')
        .take(14)
        .map(|l| l.encode_utf16().count() as u64 + 1)
        .sum::<u64>();
    b.cursor(start_of_a + 2, start_of_a + 2).await;
    let w = ib.wait_warnings(1, Duration::from_secs(2)).await;
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].1["paragraph"], 14);
    assert_eq!(w[0].1["reason"], "same_paragraph");
    assert_eq!(ia.wait_warnings(1, Duration::from_secs(2)).await.len(), 1);
    a.exit().await;
    b.exit().await;
    c.exit().await;
}

#[tokio::test]
async fn a_pair_that_stays_put_is_warned_once_and_again_only_when_severity_rises() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-once",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let (ia, ib) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "bob").await,
    );
    let events = Inbox::subscribe(&env, "events.collaboration.conflict_detected".into()).await;
    let mut a = filled(&env, "d-once", "alice").await;
    let mut b = peer(&env.base, &env, "d-once", "bob").await;
    a.cursor(at(2, 2), at(2, 2)).await;
    // Adjacent first (medium), then into the same paragraph (high: a rise).
    b.cursor(at(3, 2), at(3, 2)).await;
    assert_eq!(ib.wait_warnings(1, Duration::from_secs(2)).await.len(), 1);
    b.cursor(at(2, 6), at(2, 6)).await;
    let w = ib.wait_warnings(2, Duration::from_secs(2)).await;
    assert_eq!(w.len(), 2);
    assert_eq!(
        (w[0].1["severity"].clone(), w[1].1["severity"].clone()),
        (json!("medium"), json!("high"))
    );
    // Both stay in paragraph 2: cursors move inside it, both type there, a third party's
    // edits elsewhere shift nothing. No more warnings.
    for i in 0..10u64 {
        b.cursor(at(2, 3 + i % 4), at(2, 3 + i % 4)).await;
        a.insert(at(2, 1) + i, "x").await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // Back to adjacent and into the paragraph again: same place, not higher: silent.
    b.cursor(at(3, 12), at(3, 12)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.cursor(at(2, 6), at(2, 6)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(ib.warnings().len(), 2, "{:?}", ib.warnings());
    assert_eq!(ia.warnings().len(), 2, "{:?}", ia.warnings());
    assert_eq!(events.all().len(), 2);
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn rest_only_clients_get_the_same_warnings_and_positions_follow_edits() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-rest",
        &[
            ("alice", ProjectRole::Editor),
            ("bob", ProjectRole::Editor),
            ("carol", ProjectRole::Editor),
            ("dave", ProjectRole::Editor),
        ],
    )
    .await;
    let (ia, ib) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "bob").await,
    );
    let id = Inbox::user(&env, "dave").await;
    // Carol writes the text (REST clients cannot) and keeps no cursor.
    let mut c = filled(&env, "d-rest", "carol").await;
    let (s, body) = env
        .post(
            "/api/realtime/collaboration/presence",
            &env.token("alice"),
            &json!({"documentId": "d-rest", "mode": "editing", "offset": at(3, 1),
                "viewport": {"first": 0, "last": 7}, "device": "cli"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(
        body["presence"]["cursor"],
        json!({"offset": 31, "paragraph": 3})
    );
    assert_eq!(body["presence"]["source"], "rest");
    assert_eq!(body["presence"]["device"], "cli");
    let (s, _) = cursor_rest(&env, "d-rest", "bob", at(6, 1)).await;
    assert_eq!(s, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ia.warnings().is_empty());
    // Alice also listens the way browsers do: the relay's WebSocket, `user:alice` and the
    // document's channel.
    let mut ws = WsClient::connect(&env.ws_url("presence", &env.token("alice"))).await;
    for channel in ["user:alice", "document:d-rest"] {
        let ok = ws.subscribe(channel, None).await;
        assert_eq!(ok["op"], "subscribed", "{ok}");
    }
    // Bob reports typing in Alice's paragraph.
    let (s, body) = env
        .post(
            "/api/realtime/collaboration/edit",
            &env.token("bob"),
            &json!({"documentId": "d-rest", "offset": at(3, 8), "inserted": 12, "deleted": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["presence"]["typingVelocity"], 12);
    assert!(!body["presence"]["lastEdit"].is_null());
    let (wa, wb) = tokio::join!(
        ia.wait_warnings(1, Duration::from_secs(2)),
        ib.wait_warnings(1, Duration::from_secs(2))
    );
    assert_eq!((wa.len(), wb.len()), (1, 1));
    assert_eq!(wa[0].1["otherUserId"], "bob");
    assert_eq!(wa[0].1["severity"], "high");
    let (mut warning, mut presence) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(3);
    while (warning.is_none() || presence.is_none()) && Instant::now() < deadline {
        let Ok(frame) = ws.next_within(Duration::from_secs(1)).await else {
            continue;
        };
        if frame["op"] != "message" {
            continue;
        }
        inkwire_shared::schema::schemas()
            .validate("relay/server-message.json", &frame)
            .unwrap_or_else(|e| panic!("{frame}: {e:?}"));
        match frame["data"]["kind"].as_str() {
            Some("conflict_warning") => warning = Some(frame),
            Some("presence") if frame["data"]["collaborators"][0]["userId"] == "bob" => {
                presence = Some(frame)
            }
            _ => {}
        }
    }
    let warning = warning.expect("the warning over the relay");
    assert_eq!(warning["channel"], "user:alice");
    assert_eq!(warning["type"], "presence_update");
    assert_eq!(warning["data"]["otherUserId"], "bob");
    let presence = presence.expect("bob's presence over the relay");
    assert_eq!(presence["channel"], "document:d-rest");
    assert_eq!(
        presence["data"]["collaborators"][0]["cursor"]["paragraph"],
        3
    );
    // A REST position is a relative position too: text inserted above moves it along.
    c.insert(0, "top\n").await;
    let list = until_collaborators(
        &env,
        &env.base,
        "d-rest",
        "dave",
        Duration::from_secs(5),
        |l| of_user(l, "alice").is_some_and(|a| a["cursor"]["paragraph"] == 4),
    )
    .await;
    assert_eq!(
        of_user(&list, "alice").unwrap()["cursor"],
        json!({"offset": 35, "paragraph": 4})
    );
    // A Yjs writer and a REST writer: the same rules.
    let mut d = peer(&env.base, &env, "d-rest", "dave").await;
    d.cursor(at(3, 6) + 4, at(3, 6) + 4).await;
    let w = id.wait_warnings(2, Duration::from_secs(2)).await;
    let mut others: Vec<&str> = w
        .iter()
        .map(|(_, w)| w["otherUserId"].as_str().unwrap())
        .collect();
    others.sort();
    assert_eq!(
        others,
        ["alice", "bob"],
        "dave is warned about both REST users"
    );
    c.exit().await;
    d.exit().await;
}

#[tokio::test]
async fn a_readers_presence_shows_but_never_makes_them_a_party() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-read",
        &[
            ("alice", ProjectRole::Editor),
            ("rita", ProjectRole::Reader),
            ("rex", ProjectRole::Reviewer),
        ],
    )
    .await;
    let (ia, ir) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "rita").await,
    );
    let ix = Inbox::user(&env, "rex").await;
    let mut a = filled(&env, "d-read", "alice").await;
    a.cursor(at(2, 2), at(2, 2)).await;
    // A Yjs reader claiming to edit, in Alice's paragraph.
    let mut r = peer(&env.base, &env, "d-read", "rita").await;
    r.cursor_mode(at(2, 5), at(2, 8), "editing").await;
    // A REST reviewer viewing the same paragraph.
    let (s, body) = env
        .post(
            "/api/realtime/collaboration/presence",
            &env.token("rex"),
            &json!({"documentId": "d-read", "offset": at(2, 4)}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["presence"]["mode"], "viewing");
    let list = until_collaborators(
        &env,
        &env.base,
        "d-read",
        "rex",
        Duration::from_secs(5),
        |l| of_user(l, "rita").is_some_and(|r| !r["cursor"].is_null()),
    )
    .await;
    let rita = of_user(&list, "rita").unwrap();
    assert_eq!(rita["role"], "reader");
    assert_eq!(rita["mode"], "viewing", "a reader cannot claim to edit");
    assert_eq!(rita["selection"]["anchor"], 25);
    assert_eq!(rita["selection"]["head"], 28);
    assert!(of_user(&list, "rex").is_some());
    // Alice types and moves in the paragraph they look at: nobody is warned.
    for i in 0..5u64 {
        a.insert(at(2, 3) + i, "y").await;
        a.cursor(at(2, 4) + i, at(2, 4) + i).await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for inbox in [&ia, &ir, &ix] {
        assert!(inbox.warnings().is_empty(), "{:?}", inbox.warnings());
    }
    assert!(conflicts(&env, "d-read", "alice").await.is_empty());
    // Readers may not report edits or claim the editing mode over REST.
    for (path, body) in [
        (
            "/api/realtime/collaboration/edit",
            json!({"documentId": "d-read", "offset": 3}),
        ),
        (
            "/api/realtime/collaboration/presence",
            json!({"documentId": "d-read", "mode": "editing"}),
        ),
    ] {
        let (s, b) = env.post(path, &env.token("rex"), &body).await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
        assert_eq!(b["code"], "forbidden");
    }
    a.exit().await;
    r.exit().await;
}

#[tokio::test]
async fn instances_see_each_others_presence_and_warn_across_them() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-inst",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let second = env
        .second_instance_settings(|s| s.coedit.presence_interval = Duration::from_millis(100))
        .await;
    let (ia, ib) = (
        Inbox::user(&env, "alice").await,
        Inbox::user(&env, "bob").await,
    );
    let mut a = filled(&env, "d-inst", "alice").await;
    a.cursor(at(3, 3), at(3, 3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b = peer(&second.base, &env, "d-inst", "bob").await;
    // The second instance loaded the document after Alice's presence was stored.
    let list = until_collaborators(
        &env,
        &second.base,
        "d-inst",
        "bob",
        Duration::from_secs(5),
        |l| of_user(l, "alice").is_some_and(|a| a["cursor"]["paragraph"] == 3),
    )
    .await;
    assert!(of_user(&list, "alice").is_some(), "{list:?}");
    let moved = Instant::now();
    b.cursor(at(3, 7), at(3, 7)).await;
    let (wa, wb) = tokio::join!(
        ia.wait_warnings(1, Duration::from_secs(2)),
        ib.wait_warnings(1, Duration::from_secs(2))
    );
    assert_eq!(
        (wa.len(), wb.len()),
        (1, 1),
        "one warning each, whoever evaluated"
    );
    assert!(wb[0].0.duration_since(moved) < Duration::from_millis(100));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((ia.warnings().len(), ib.warnings().len()), (1, 1));
    // Both instances list both.
    for base in [&env.base, &second.base] {
        let list =
            until_collaborators(&env, base, "d-inst", "alice", Duration::from_secs(5), |l| {
                of_user(l, "bob").is_some_and(|b| b["cursor"]["paragraph"] == 3)
                    && of_user(l, "alice").is_some()
            })
            .await;
        assert!(of_user(&list, "bob").is_some(), "{base}: {list:?}");
    }
    // Bob disconnects: gone everywhere.
    b.exit().await;
    let list = until_collaborators(
        &env,
        &env.base,
        "d-inst",
        "alice",
        Duration::from_secs(5),
        |l| of_user(l, "bob").is_none(),
    )
    .await;
    assert!(of_user(&list, "bob").is_none(), "{list:?}");
    a.exit().await;
}

#[tokio::test]
async fn stale_and_dead_instance_presence_expires_and_departures_are_published() {
    let env = env_with(|c| {
        c.presence_ttl = Duration::from_millis(1500);
        c.instance_ttl = Duration::from_secs(1);
    })
    .await;
    setup(
        &env,
        "d-exp",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let doc_channel = Inbox::subscribe(&env, "live.rt.document.d-exp".into()).await;
    let mut a = filled(&env, "d-exp", "alice").await;
    a.cursor(at(1, 1), at(1, 1)).await;
    // A session of an instance that is gone: stored in Redis, its heartbeat expiring.
    let mut redis = env.state.redis.clone();
    let ghost = json!({
        "sessionId": "bob:rest", "userId": "bob", "role": "editor", "source": "rest",
        "instance": "ghost", "mode": "viewing", "lastSeen": inkwire_collaboration::presence::now_ms(),
    });
    redis::pipe()
        .hset(
            inkwire_collaboration::presence::presence_key("d-exp"),
            "bob:rest",
            ghost.to_string(),
        )
        .cmd("SET")
        .arg(inkwire_collaboration::presence::instance_key("ghost"))
        .arg(1)
        .arg("PX")
        .arg(1500)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    // A second instance loads the document: the ghost's session is there while it lives.
    let second = env
        .second_instance_settings(|s| {
            s.coedit.presence_interval = Duration::from_millis(100);
            s.coedit.instance_ttl = Duration::from_secs(1);
        })
        .await;
    let list = collaborators(&env, &second.base, "d-exp", "alice").await;
    assert!(of_user(&list, "bob").is_some(), "{list:?}");
    // Its heartbeat expires: the session goes, and one departure is published.
    let list = until_collaborators(
        &env,
        &second.base,
        "d-exp",
        "alice",
        Duration::from_secs(5),
        |l| of_user(l, "bob").is_none(),
    )
    .await;
    assert!(of_user(&list, "bob").is_none(), "{list:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let left: Vec<Value> = doc_channel
        .all()
        .into_iter()
        .filter(|(_, v)| v["type"] == "presence_update")
        .flat_map(|(_, v)| v["data"]["left"].as_array().cloned().unwrap_or_default())
        .filter(|l| l["sessionId"] == "bob:rest")
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    // A REST session nobody renews is removed after the TTL; Yjs clients renew theirs.
    let (s, _) = cursor_rest(&env, "d-exp", "bob", at(4, 0)).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        of_user(
            &collaborators(&env, &env.base, "d-exp", "alice").await,
            "bob"
        )
        .is_some()
    );
    let list = until_collaborators(
        &env,
        &env.base,
        "d-exp",
        "alice",
        Duration::from_secs(5),
        |l| of_user(l, "bob").is_none(),
    )
    .await;
    assert!(of_user(&list, "bob").is_none(), "{list:?}");
    a.exit().await;
}

#[tokio::test]
async fn presence_updates_are_coalesced() {
    let env = env_with(|c| c.presence_interval = Duration::from_millis(250)).await;
    setup(
        &env,
        "d-co",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let doc_channel = Inbox::subscribe(&env, "live.rt.document.d-co".into()).await;
    let mut a = filled(&env, "d-co", "alice").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = doc_channel.all().len();
    let start = Instant::now();
    for i in 0..60u64 {
        a.cursor(i, i).await;
    }
    let elapsed = start.elapsed();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let frames: Vec<Value> = doc_channel.all()[before..]
        .iter()
        .filter(|(_, v)| v["type"] == "presence_update" && v["data"]["kind"] == "presence")
        .map(|(_, v)| v["data"].clone())
        .collect();
    let bound = (elapsed.as_millis() / 250) as usize + 3;
    assert!(
        !frames.is_empty() && frames.len() <= bound,
        "{} frames for 60 moves in {elapsed:?}",
        frames.len()
    );
    // The last one says where the cursor ended.
    let last = frames.last().unwrap();
    assert_eq!(last["collaborators"][0]["cursor"]["offset"], 59);
    a.exit().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_problem_json() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-bad",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    env.add_member(OTHER_PROJECT, "olga", ProjectRole::Owner)
        .await;
    env.register_document(OTHER_PROJECT, "d-olga").await;
    let a = filled(&env, "d-bad", "alice").await;
    let len = TEXT.len() as u64;
    let token = env.token("bob");
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        (
            "cursor",
            json!({"documentId": "d-bad", "offset": len + 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "position_out_of_range",
        ),
        (
            "edit",
            json!({"documentId": "d-bad", "offset": 1_000_000}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "position_out_of_range",
        ),
        (
            "cursor",
            json!({"documentId": "d-bad", "offset": 1, "selection": {"anchor": 0, "head": len + 5}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "position_out_of_range",
        ),
        (
            "presence",
            json!({"documentId": "d-bad", "viewport": {"first": 0, "last": 8}}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "position_out_of_range",
        ),
        (
            "presence",
            json!({"documentId": "d-bad", "viewport": {"first": 5, "last": 2}}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "cursor",
            json!({"documentId": "d-nobody", "offset": 0}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "cursor",
            json!({"documentId": "d-olga", "offset": 0}),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "cursor",
            json!({"documentId": "d.bad", "offset": 0}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "cursor",
            json!({"documentId": "d-bad", "offset": -1}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "cursor",
            json!({"documentId": "d-bad"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "presence",
            json!({"documentId": "d-bad", "mode": "dancing"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
        (
            "presence",
            json!({"documentId": "d-bad", "userId": "alice"}),
            StatusCode::BAD_REQUEST,
            "validation_failed",
        ),
    ];
    for (route, body, status, code) in cases {
        let (s, b) = env
            .post(
                &format!("/api/realtime/collaboration/{route}"),
                &token,
                &body,
            )
            .await;
        assert_eq!(
            (s, b["code"].as_str()),
            (status, Some(code)),
            "{route} {body}: {b}"
        );
    }
    // Offsets at the very end are fine; past it, the problem names the field.
    let (s, _) = cursor_rest(&env, "d-bad", "bob", len).await;
    assert_eq!(s, StatusCode::OK);
    let (_, b) = cursor_rest(&env, "d-bad", "bob", len + 1).await;
    assert_eq!(b["pointer"], "/offset");
    assert_eq!(b["limit"], len);
    // Not JSON, no token, a forged token.
    let res = env
        .http
        .post(env.url("/api/realtime/collaboration/presence"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let (s, b) = env
        .post(
            "/api/realtime/collaboration/presence",
            "forged",
            &json!({"documentId": "d-bad"}),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("unauthorized"))
    );
    // Reading: members only; bad ids; privileged callers see 404 for unknown documents.
    for (path, tok, status) in [
        (
            "/api/realtime/collaboration/document/d-olga/collaborators",
            env.token("bob"),
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/realtime/collaboration/document/d-nobody/conflicts",
            env.token("bob"),
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/realtime/collaboration/document/d.x/conflicts",
            env.token("bob"),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/realtime/collaboration/document/d-nobody/collaborators",
            env.service_token(),
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/realtime/collaboration/document/d-bad/collaborators",
            env.service_token(),
            StatusCode::OK,
        ),
    ] {
        let (s, b) = env.get(path, &tok).await;
        assert_eq!(s, status, "{path}: {b}");
    }
    // Service callers read presence but have none to set.
    let (s, _) = env
        .post(
            "/api/realtime/collaboration/presence",
            &env.service_token(),
            &json!({"documentId": "d-bad"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // Losing a right takes effect at once.
    let mut redis = env.state.redis.clone();
    inkwire_shared::membership::set_member(&mut redis, PROJECT, "bob", None)
        .await
        .unwrap();
    let (s, _) = cursor_rest(&env, "d-bad", "bob", 0).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    a.exit().await;
}

#[tokio::test]
async fn document_metrics_per_collaborator_team_conflicts_and_score() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-met",
        &[
            ("alice", ProjectRole::Editor),
            ("bob", ProjectRole::Editor),
            ("rita", ProjectRole::Reader),
        ],
    )
    .await;
    env.add_member(OTHER_PROJECT, "olga", ProjectRole::Owner)
        .await;
    let ib = Inbox::user(&env, "bob").await;
    let mut a = peer(&env.base, &env, "d-met", "alice").await;
    let mut b = peer(&env.base, &env, "d-met", "bob").await;
    a.insert(0, "hello brave world\n").await;
    a.quiesce(300).await;
    let len_a = "hello brave world\n".len() as u64;
    b.insert(len_a, "second paragraph here").await;
    b.quiesce(300).await;
    // Both move into paragraph 1 (a prediction), then both edit it within seconds (a
    // collision that still happened).
    a.cursor(len_a + 2, len_a + 2).await;
    b.cursor(len_a + 5, len_a + 5).await;
    assert_eq!(ib.wait_warnings(1, Duration::from_secs(2)).await.len(), 1);
    a.insert(len_a + 2, "X").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.insert(len_a + 10, "Y").await;
    let text = b.quiesce(300).await;
    let path = "/api/realtime/collaboration/project/p-pr/document/d-met/metrics";
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (s, body) = env.get(path, &env.token("rita")).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let ready = body["collaborators"].as_array().is_some_and(|c| {
            c.len() == 2 && c.iter().all(|u| u["edits"].as_u64().unwrap_or(0) >= 2)
        }) && body["conflicts"]["collisions"] == 1;
        if ready || Instant::now() >= deadline {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let users = body["collaborators"].as_array().unwrap();
    assert_eq!(users.len(), 2, "{body}");
    let (ua, ub) = (&users[0], &users[1]);
    assert_eq!(
        (ua["userId"].as_str(), ub["userId"].as_str()),
        (Some("alice"), Some("bob"))
    );
    assert_eq!(ua["wordsAdded"], 3, "{body}");
    assert_eq!(ub["wordsAdded"], 3, "{body}");
    assert_eq!(ua["charactersAdded"], len_a + 1);
    assert_eq!(ua["charactersInText"], len_a + 1);
    assert_eq!(ub["charactersInText"], 22);
    assert!(ua["activeMinutes"].as_u64().unwrap() >= 1);
    let share = ua["shareOfText"].as_f64().unwrap() + ub["shareOfText"].as_f64().unwrap();
    assert!((share - 1.0).abs() < 0.01, "{body}");
    assert_eq!(body["text"]["characters"], text.encode_utf16().count());
    assert_eq!(body["text"]["unattributedCharacters"], 0);
    assert_eq!(body["team"]["collaborators"], 2);
    assert_eq!(body["team"]["wordsAdded"], 6);
    assert!(body["team"]["wordsPerHour"].as_f64().unwrap() > 0.0);
    let hours = body["team"]["activeCollaboratorsOverTime"]
        .as_array()
        .unwrap();
    assert_eq!(hours.last().unwrap()["activeCollaborators"], 2, "{body}");
    assert_eq!(body["conflicts"]["predicted"], 1);
    assert_eq!(body["conflicts"]["collisions"], 1);
    assert_eq!(body["conflicts"]["collisionsAfterWarning"], 1);
    let score = body["efficiency"]["score"].as_u64().unwrap();
    assert!(score <= 100, "{body}");
    // Avoidance: one warning, one collision after it: 0.
    assert_eq!(body["efficiency"]["avoidance"], 0.0);
    // Who may ask, and about what.
    for (p, token, status, code) in [
        (
            path.to_string(),
            env.token("olga"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            "/api/realtime/collaboration/project/p-other/document/d-met/metrics".into(),
            env.token("olga"),
            StatusCode::NOT_FOUND,
            "document_not_found",
        ),
        (
            "/api/realtime/collaboration/project/p-pr/document/d.x/metrics".into(),
            env.token("alice"),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
    ] {
        let (s, b) = env.get(&p, &token).await;
        assert_eq!((s, b["code"].as_str()), (status, Some(code)), "{p}: {b}");
    }
    let (s, _) = env.get(path, &env.service_token()).await;
    assert_eq!(s, StatusCode::OK);
    a.exit().await;
    b.exit().await;
}

#[tokio::test]
async fn losing_a_right_ends_presence_and_party_status_at_once() {
    use inkwire_shared::access_changes::{AccessChange, announce};
    use inkwire_shared::membership::set_member;
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-lose",
        &[
            ("alice", ProjectRole::Editor),
            ("bob", ProjectRole::Editor),
            ("dora", ProjectRole::Editor),
        ],
    )
    .await;
    let ia = Inbox::user(&env, "alice").await;
    let mut a = filled(&env, "d-lose", "alice").await;
    let mut d = peer(&env.base, &env, "d-lose", "dora").await;
    a.cursor(at(1, 1), at(1, 1)).await;
    d.cursor(at(5, 1), at(5, 1)).await;
    let (s, _) = cursor_rest(&env, "d-lose", "bob", at(4, 1)).await;
    assert_eq!(s, StatusCode::OK);
    let mut redis = env.state.redis.clone();
    let changed = |user: &str| AccessChange::Member {
        project_id: PROJECT.into(),
        user_id: user.into(),
    };
    // Bob leaves the project: his REST session goes at once.
    set_member(&mut redis, PROJECT, "bob", None).await.unwrap();
    announce(&env.state.nats, &changed("bob")).await.unwrap();
    let list = until_collaborators(
        &env,
        &env.base,
        "d-lose",
        "alice",
        Duration::from_secs(3),
        |l| of_user(l, "bob").is_none(),
    )
    .await;
    assert!(of_user(&list, "bob").is_none(), "{list:?}");
    // Dora becomes a reader: she stays present, viewing, and is no longer a party.
    set_member(&mut redis, PROJECT, "dora", Some(ProjectRole::Reader))
        .await
        .unwrap();
    announce(&env.state.nats, &changed("dora")).await.unwrap();
    let list = until_collaborators(
        &env,
        &env.base,
        "d-lose",
        "alice",
        Duration::from_secs(3),
        |l| of_user(l, "dora").is_some_and(|d| d["role"] == "reader"),
    )
    .await;
    let dora = of_user(&list, "dora").unwrap();
    assert_eq!(
        (dora["role"].as_str(), dora["mode"].as_str()),
        (Some("reader"), Some("viewing"))
    );
    a.cursor(at(5, 4), at(5, 4)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(ia.warnings().is_empty(), "{:?}", ia.warnings());
    a.exit().await;
    d.exit().await;
}

#[tokio::test]
async fn a_rest_session_moves_with_its_requests_between_instances() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-hop",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let second = env
        .second_instance_settings(|s| s.coedit.presence_interval = Duration::from_millis(100))
        .await;
    let ia = Inbox::user(&env, "alice").await;
    let mut a = filled(&env, "d-hop", "alice").await;
    a.cursor(at(6, 1), at(6, 1)).await;
    // Bob's REST calls land on one instance, then on the other (a load balancer).
    let (s, _) = cursor_rest(&env, "d-hop", "bob", at(2, 1)).await;
    assert_eq!(s, StatusCode::OK);
    let res = env
        .http
        .post(format!("{}/api/realtime/collaboration/cursor", second.base))
        .bearer_auth(env.token("bob"))
        .json(&json!({"documentId": "d-hop", "offset": at(6, 5)}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    // One session, where the last call put it, on both instances; Alice is warned once.
    for base in [&env.base, &second.base] {
        let list = until_collaborators(&env, base, "d-hop", "alice", Duration::from_secs(5), |l| {
            of_user(l, "bob").is_some_and(|b| b["cursor"]["paragraph"] == 6)
        })
        .await;
        let bobs: Vec<&Value> = list.iter().filter(|c| c["userId"] == "bob").collect();
        assert_eq!(bobs.len(), 1, "{base}: {list:?}");
        assert_eq!(bobs[0]["cursor"]["paragraph"], 6);
    }
    let w = ia.wait_warnings(1, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ia.warnings().len(), 1, "{w:?}");
    a.exit().await;
}

#[tokio::test]
async fn a_collision_across_instances_is_counted_once() {
    let env = env_with(|_| {}).await;
    setup(
        &env,
        "d-col",
        &[("alice", ProjectRole::Editor), ("bob", ProjectRole::Editor)],
    )
    .await;
    let second = env
        .second_instance_settings(|s| s.coedit.attribution_interval = Duration::from_millis(200))
        .await;
    let mut a = filled(&env, "d-col", "alice").await;
    let mut b = peer(&second.base, &env, "d-col", "bob").await;
    b.quiesce(300).await;
    // Both type in paragraph 2, in turns, a few characters each.
    for i in 0..4u64 {
        a.insert(at(2, 3) + i, "a").await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        b.insert(at(2, 1), "b").await;
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    a.quiesce(300).await;
    let path = "/api/realtime/collaboration/project/p-pr/document/d-col/metrics";
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, body) = env.get(path, &env.token("alice")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["conflicts"]["collisions"], 1, "{body}");
    assert_eq!(body["conflicts"]["collisionsAfterWarning"], 0, "{body}");
    a.exit().await;
    b.exit().await;
}
