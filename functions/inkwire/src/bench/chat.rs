//! `inkwire bench chat`: chat messages end to end — the send API, the room's sequence and
//! unread counts in Redis, the CHAT log and the relay — until every member's WebSocket has
//! the frame, for a room of 10 members and a room of 1,000.
//!
//! For each room size, in one run and with the same client process (`bench fanout-clients`,
//! one WebSocket per member, each subscribed to the room):
//! (a) baseline — bare fan-out: the same clients on a bare broadcast server (tokio +
//!     tungstenite, no authentication, no storage, no NATS); the same number of senders, each
//!     broadcasting its next message as soon as the previous one is queued for every client;
//! (b) inkwire — the same senders (room members) each `POST …/rooms/{id}/messages` and send
//!     the next message when the answer arrives; every message is stored, counted, logged and
//!     pushed to `room:{id}`.
//! A message's text is its send time, so each client measures send → frame latency.
//! Reported: messages/s and deliveries/s (from the first send to the last frame), latency
//! percentiles, and lost deliveries; the ratio is inkwire's messages/s over the baseline's.
//!
//! Presence changes/s: a room of 10 fresh users, each connected to the relay and subscribed
//! to the room; `senders` of them switch their status (away, online, away, …) through
//! `POST /api/realtime/presence/status`, each the next time when the answer arrives. Every
//! change goes through the presence store and is pushed as a `presence_update` to the room,
//! so each member gets every change. Reported as changes/s (a change counts as delivered
//! when every member has it) and send → frame latency; its baseline is the bare fan-out to a
//! room of 10 with the same senders, from the same run. The chat rooms run without the
//! presence worker (1,000 members connecting would flood the room with presence frames);
//! the presence room runs with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Args;
use futures::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::fanout::{
    BareBroadcast, ClientsPlan, ClientsSummary, USER_PREFIX, finish_clients, now_ns, start_clients,
};
use super::load_client::LoadClient;

#[derive(Args)]
pub struct ChatArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Messages sent to the room of 10 members.
    #[arg(long, default_value_t = 4_000)]
    small_messages: u64,
    /// Messages sent to the room of 1,000 members.
    #[arg(long, default_value_t = 400)]
    large_messages: u64,
    /// Members sending at once (each waits for its previous message or status change).
    #[arg(long, default_value_t = 10)]
    senders: u64,
    /// Presence changes made in the presence room (of 10 members).
    #[arg(long, default_value_t = 4_000)]
    presence_changes: u64,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct ChatResult {
    bench: &'static str,
    scenario: String,
    members: u64,
    senders: u64,
    messages: u64,
    deliveries: u64,
    lost: u64,
    /// Sends the server refused or failed (inkwire only).
    failed_sends: u64,
    seconds: f64,
    messages_per_sec: f64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// messages/s over the bare fan-out's messages/s for the same room size.
    ratio_to_baseline: f64,
    baseline_messages_per_sec: f64,
}

pub async fn run(args: ChatArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.senders >= 1 && args.senders <= 10,
        "--senders must be 1 to 10 (senders are members of the room of 10)"
    );
    anyhow::ensure!(
        args.small_messages >= args.senders && args.large_messages >= args.senders,
        "each room needs at least one message per sender"
    );
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-chat",
    )
    .await?;
    let state = bench.state.clone();
    let mut results = Vec::new();
    // Presence first, with the presence worker; then the chat rooms without it.
    let served = super::Served::start(&state, inkwire::Settings::default()).await?;
    let mut presence_row = presence(&state, &served, args.presence_changes, args.senders).await?;
    served.stop().await;
    let settings = inkwire::Settings {
        without_presence_worker: true,
        without_analytics_worker: true,
        ..Default::default()
    };
    let served = super::Served::start(&state, settings).await?;
    for (members, messages) in [(10u64, args.small_messages), (1_000, args.large_messages)] {
        let messages = messages - messages % args.senders;
        let mut base = bare(members, messages, args.senders).await?;
        let mut ours = inkwire(&state, &served, members, messages, args.senders).await?;
        let rate = base.messages_per_sec;
        for r in [&mut base, &mut ours] {
            r.baseline_messages_per_sec = rate;
            r.ratio_to_baseline = if rate > 0.0 {
                r.messages_per_sec / rate
            } else {
                0.0
            };
        }
        if members == 10 {
            presence_row.baseline_messages_per_sec = rate;
            presence_row.ratio_to_baseline = if rate > 0.0 {
                presence_row.messages_per_sec / rate
            } else {
                0.0
            };
        }
        results.push(base);
        results.push(ours);
    }
    results.push(presence_row);
    served.stop().await;
    bench.stop().await;
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<36} {:>7} {:>8} {:>10} {:>6} {:>10} {:>12} {:>8} {:>8} {:>8} {:>7}",
            "scenario",
            "members",
            "messages",
            "deliveries",
            "lost",
            "messages/s",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "ratio"
        );
        for r in &results {
            println!(
                "{:<36} {:>7} {:>8} {:>10} {:>6} {:>10.0} {:>12.0} {:>8.2} {:>8.2} {:>8.2} {:>6.2}x",
                r.scenario,
                r.members,
                r.messages,
                r.deliveries,
                r.lost,
                r.messages_per_sec,
                r.deliveries_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.ratio_to_baseline
            );
        }
        println!(
            "  {} senders, each sending its next message when the previous one is answered \
             (inkwire) or queued for every client (bare); latency is send → frame; the \
             presence row counts status changes (its baseline: bare fan-out, room of 10)",
            args.senders
        );
    }
    Ok(())
}

fn result(
    scenario: String,
    members: u64,
    senders: u64,
    messages: u64,
    failed_sends: u64,
    first_send_ns: u64,
    summary: &ClientsSummary,
) -> ChatResult {
    let expected = messages * members;
    let span = summary.last_receive_ns.saturating_sub(first_send_ns) as f64 / 1e9;
    let per_sec = |n: u64| if span > 0.0 { n as f64 / span } else { 0.0 };
    ChatResult {
        bench: "chat",
        scenario,
        members,
        senders,
        messages,
        deliveries: summary.received,
        lost: expected.saturating_sub(summary.received),
        failed_sends,
        seconds: span,
        messages_per_sec: per_sec(summary.received / members.max(1)),
        deliveries_per_sec: per_sec(summary.received),
        p50_ms: summary.p50_ms,
        p99_ms: summary.p99_ms,
        max_ms: summary.max_ms,
        ratio_to_baseline: 0.0,
        baseline_messages_per_sec: 0.0,
    }
}

/// The baseline: `senders` tasks broadcasting on a bare server, closed loop.
async fn bare(members: u64, messages: u64, senders: u64) -> anyhow::Result<ChatResult> {
    let server = Arc::new(BareBroadcast::start().await?);
    let (child, lines, connected) = start_clients(&ClientsPlan {
        url: &server.url,
        channel: "room:bench",
        connections: members as usize,
        expect: messages,
        bare: true,
        secret: "unused-by-the-bare-server",
    })
    .await?;
    anyhow::ensure!(
        connected == members,
        "only {connected} of {members} clients connected"
    );
    let seq = Arc::new(AtomicU64::new(0));
    let first = now_ns();
    let tasks: Vec<_> = (0..senders)
        .map(|_| {
            let (server, seq) = (server.clone(), seq.clone());
            tokio::spawn(async move {
                for _ in 0..messages / senders {
                    let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
                    let frame = json!({"op": "message", "channel": "room:bench", "seq": n,
                        "type": "room_update", "data": {"event": "message_new",
                        "message": {"seq": n, "text": now_ns().to_string()}}})
                    .to_string();
                    server.send(&Message::Text(frame.into())).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let summary = finish_clients(child, lines).await?;
    if let Ok(server) = Arc::try_unwrap(server) {
        server.stop();
    }
    Ok(result(
        format!("baseline: bare fan-out, room of {members}"),
        members,
        senders,
        messages,
        0,
        first,
        &summary,
    ))
}

/// inkwire: a room of `members` created through the API, `senders` members sending.
async fn inkwire(
    state: &inkwire_shared::AppState,
    served: &super::Served,
    members: u64,
    messages: u64,
    senders: u64,
) -> anyhow::Result<ChatResult> {
    let addr = served.addr.to_string();
    let users: Vec<String> = (0..members).map(|i| format!("{USER_PREFIX}{i}")).collect();
    let token = |u: &str| state.jwt.issue(u, &[], Duration::from_secs(3600));
    let mut creator = LoadClient::connect(&addr, &token(&users[0])).await?;
    let (status, body) = creator
        .post_json(
            "/api/realtime/chat/rooms",
            json!({"name": format!("bench {members}"), "participants": users})
                .to_string()
                .into_bytes(),
        )
        .await?;
    anyhow::ensure!(
        status == 201,
        "creating the room: {status} {}",
        String::from_utf8_lossy(&body)
    );
    let room = serde_json::from_slice::<Value>(&body)?["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no room id in {}", String::from_utf8_lossy(&body)))?
        .to_string();
    let url = format!("ws://{addr}/ws/collaboration");
    let channel = format!("room:{room}");
    let (child, lines, connected) = start_clients(&ClientsPlan {
        url: &url,
        channel: &channel,
        connections: members as usize,
        expect: messages,
        bare: false,
        secret: &state.config.jwt_secret,
    })
    .await?;
    anyhow::ensure!(
        connected == members,
        "only {connected} of {members} clients connected"
    );
    let failed = Arc::new(AtomicU64::new(0));
    let path = format!("/api/realtime/chat/rooms/{room}/messages");
    let mut clients = Vec::new();
    for u in users.iter().take(senders as usize) {
        clients.push(LoadClient::connect(&addr, &token(u)).await?);
    }
    let first = now_ns();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(s, mut client)| {
            let (path, failed) = (path.clone(), failed.clone());
            tokio::spawn(async move {
                for i in 0..messages / senders {
                    let body = json!({"clientMessageId": format!("b{s}-{i}"),
                        "text": now_ns().to_string()})
                    .to_string()
                    .into_bytes();
                    match client.post_json(&path, body).await {
                        Ok((201, _)) => {}
                        Ok((status, body)) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "send refused: {status} {}",
                                    String::from_utf8_lossy(&body)
                                );
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("send failed: {e}");
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await?;
    }
    let summary = finish_clients(child, lines).await?;
    Ok(result(
        format!("inkwire: API → room, room of {members}"),
        members,
        senders,
        messages,
        failed.load(Ordering::Relaxed),
        first,
        &summary,
    ))
}

/// Presence changes/s: `senders` members of a room of 10 switch their status in a closed
/// loop; every member's relay connection must get every change.
async fn presence(
    state: &inkwire_shared::AppState,
    served: &super::Served,
    changes: u64,
    senders: u64,
) -> anyhow::Result<ChatResult> {
    const MEMBERS: usize = 10;
    const PREFIX: &str = "bench-presence-";
    let per_sender = changes / senders;
    let changes = per_sender * senders;
    let addr = served.addr.to_string();
    let users: Vec<String> = (0..MEMBERS).map(|i| format!("{PREFIX}{i}")).collect();
    let token = |u: &str| state.jwt.issue(u, &[], Duration::from_secs(3600));
    let mut creator = LoadClient::connect(&addr, &token(&users[0])).await?;
    let (status, body) = creator
        .post_json(
            "/api/realtime/chat/rooms",
            json!({"name": "bench presence", "participants": users})
                .to_string()
                .into_bytes(),
        )
        .await?;
    anyhow::ensure!(
        status == 201,
        "creating the presence room: {status} {}",
        String::from_utf8_lossy(&body)
    );
    let room = serde_json::from_slice::<Value>(&body)?["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no room id in {}", String::from_utf8_lossy(&body)))?
        .to_string();
    // Every member connected and subscribed; frames are kept only once `recording` is set.
    let recording = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let expect = changes;
    let mut observers = Vec::new();
    for u in &users {
        let url = format!("ws://{addr}/ws/collaboration?token={}", token(u));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        ws.next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no welcome"))??;
        let subscribe = json!({"op": "subscribe", "channel": format!("room:{room}")});
        ws.send(Message::Text(subscribe.to_string().into())).await?;
        let answer = ws
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no answer to subscribe"))??;
        anyhow::ensure!(
            answer.to_text()?.contains("\"subscribed\""),
            "subscribe refused: {answer}"
        );
        let recording = recording.clone();
        observers.push(tokio::spawn(async move {
            // (member index, receive time) of every user-presence frame while recording.
            let mut seen: Vec<(usize, u64)> = Vec::with_capacity(expect as usize);
            while (seen.len() as u64) < expect {
                let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                let Ok(Some(Ok(Message::Text(text)))) = next else {
                    match next {
                        Ok(Some(Ok(_))) => continue,
                        _ => break,
                    }
                };
                let now = now_ns();
                if !recording.load(Ordering::Acquire) {
                    continue;
                }
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                if frame["type"] != "presence_update" || frame["data"]["scope"] != "user" {
                    continue;
                }
                if let Some(i) = frame["data"]["userId"]
                    .as_str()
                    .and_then(|u| u.strip_prefix(PREFIX))
                    .and_then(|i| i.parse::<usize>().ok())
                {
                    seen.push((i, now));
                }
            }
            seen
        }));
    }
    // Ready when each sender's status is accepted: its connection is known to the presence
    // store (the relay's report applied). Then let the connect-time frames drain.
    let path = "/api/realtime/presence/status";
    let mut clients = Vec::new();
    for u in users.iter().take(senders as usize) {
        let mut client = LoadClient::connect(&addr, &token(u)).await?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = client
                .post_json(path, br#"{"status":"online"}"#.to_vec())
                .await?;
            if status == 200 {
                break;
            }
            anyhow::ensure!(
                status == 409 && std::time::Instant::now() < deadline,
                "{u} not online: {status} {}",
                String::from_utf8_lossy(&body)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    recording.store(true, Ordering::Release);
    let failed = Arc::new(AtomicU64::new(0));
    let first = now_ns();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let failed = failed.clone();
            tokio::spawn(async move {
                let mut sent = Vec::with_capacity(per_sender as usize);
                for k in 0..per_sender {
                    let status = if k % 2 == 0 { "away" } else { "online" };
                    let body = format!(r#"{{"status":"{status}"}}"#).into_bytes();
                    sent.push(now_ns());
                    match client.post_json(path, body).await {
                        Ok((200, _)) => {}
                        Ok((status, body)) => {
                            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "status refused: {status} {}",
                                    String::from_utf8_lossy(&body)
                                );
                            }
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("status failed: {e}");
                        }
                    }
                }
                sent
            })
        })
        .collect();
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await?);
    }
    // Each member's k-th frame about sender i is sender i's k-th change (one channel keeps
    // one order).
    let histogram = super::histogram::Histogram::default();
    let (mut received, mut last) = (0u64, 0u64);
    for observer in observers {
        let seen = observer.await?;
        let mut next = [0usize; MEMBERS];
        for (i, at) in seen {
            let k = next[i];
            next[i] += 1;
            if let Some(sent_at) = sent.get(i).and_then(|s| s.get(k)) {
                histogram.record(Duration::from_nanos(at.saturating_sub(*sent_at)));
                received += 1;
                last = last.max(at);
            }
        }
    }
    let summary = ClientsSummary {
        connected: MEMBERS as u64,
        failed: 0,
        received,
        p50_ms: histogram.quantile_ms(0.50),
        p99_ms: histogram.quantile_ms(0.99),
        max_ms: histogram.max_ms(),
        last_receive_ns: last,
    };
    Ok(result(
        format!("inkwire: presence changes, room of {MEMBERS}"),
        MEMBERS as u64,
        senders,
        changes,
        failed.load(Ordering::Relaxed),
        first,
        &summary,
    ))
}
