//! `inkwire bench notify`: in-app notifications end to end — the send API, the notifier, the
//! inbox and the frame on the recipient's WebSocket — for many recipients.
//!
//! (a) baseline — bare JetStream: the same number of notification-sized messages published
//!     with the same publishing window the send API uses (what storing the send jobs alone
//!     costs);
//! (b) throughput — `--recipients` WebSocket clients, each on its own `user:` channel; bulk
//!     sends (1,000 recipients per request, a few requests in flight) of `--notifications`
//!     in-app notifications, timed from the first request until every client has its frames;
//! (c) latency — single-recipient sends at `--rate` per second for `--latency-seconds`, each
//!     timed from just before its request until its frame arrives.
//!
//! At the end every recipient's unread count is checked against what was sent to them, both
//! through `GET /unread-count` and in the newest (highest `version`) frame they received.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures::{SinkExt, StreamExt};
use inkwire_shared::jetstream::{Outgoing, publish_windowed};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::report::{ScenarioResult, percentiles, print};

#[derive(Args)]
pub struct NotifyArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// In-app notifications for the throughput scenario.
    #[arg(long, default_value_t = 50_000)]
    notifications: u64,
    /// Recipients (one WebSocket client each).
    #[arg(long, default_value_t = 1_000)]
    recipients: u64,
    /// Send requests in flight at once in the throughput scenario.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Sends per second in the latency scenario.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// How long the latency scenario sends.
    #[arg(long, default_value_t = 5)]
    latency_seconds: u64,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

/// What the clients saw: per recipient, frames received and the newest frame's count.
#[derive(Default)]
struct Seen {
    frames: HashMap<String, u64>,
    newest: HashMap<String, (u64, u64)>,
    /// Latency samples of the latency scenario (frame arrival − send instant).
    latencies: Vec<Duration>,
}

fn user(i: u64) -> String {
    format!("bench-n-{i}")
}

pub async fn run(args: NotifyArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.notifications >= 1 && args.recipients >= 1 && args.recipients <= 1_000,
        "--notifications must be at least 1 and --recipients between 1 and 1,000"
    );
    anyhow::ensure!(
        args.rate >= 1 && args.concurrency >= 1,
        "--rate and --concurrency must be at least 1"
    );
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-notify",
    )
    .await?;
    let state = bench.state.clone();

    // (a) Baseline: bare JetStream publishing of notification-sized messages.
    let sample = json!({"id": uuid::Uuid::nil(), "userId": user(0), "category": "system",
        "priority": "low", "title": "Bench", "body": "A notification of the benchmark",
        "data": {"b": 0}, "channels": ["in_app"], "createdAt": "2026-11-22T00:00:00Z",
        "sender": "service"});
    let payload = Bytes::from(serde_json::to_vec(&sample)?);
    let start = Instant::now();
    let msgs = (0..args.notifications).map(|n| Outgoing {
        subject: format!("notify.bench.{}", user(n % args.recipients)),
        msg_id: format!("bench-baseline-{n}"),
        payload: payload.clone(),
    });
    publish_windowed(&state.js, msgs, 512)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let base_secs = start.elapsed().as_secs_f64();
    let base_rate = args.notifications as f64 / base_secs;

    // The service, on a local port.
    // The deployment's settings, without the presence, activity and analytics workers
    // (separate processes in a deployment, as in the other benches): on these two cores
    // they would report, scan and count this load instead of measuring it.
    let settings = inkwire::Settings {
        without_presence_worker: true,
        without_activity_worker: true,
        without_analytics_worker: true,
        ..inkwire::Settings::from_env()?
    };
    let served = super::Served::start(&state, settings).await?;
    let addr = served.addr;

    // One client per recipient, subscribed to its user channel.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sent_at: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let (frames_tx, mut frames_rx) = mpsc::unbounded_channel::<()>();
    let mut clients = Vec::new();
    for i in 0..args.recipients {
        let id = user(i);
        let token = state.jwt.issue(&id, &[], Duration::from_secs(3600));
        let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
            format!("ws://{addr}/ws/notifications?token={token}"),
            Some(super::fanout::ws_config()),
            true,
        )
        .await?;
        ws.next().await; // welcome
        ws.send(Message::Text(
            json!({"op": "subscribe", "channel": format!("user:{id}")})
                .to_string()
                .into(),
        ))
        .await?;
        ws.next().await; // subscribed
        let seen = seen.clone();
        let sent_at = sent_at.clone();
        let frames_tx = frames_tx.clone();
        clients.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let arrived = Instant::now();
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let data = &v["data"];
                if data["event"] != "notification" {
                    continue;
                }
                let (Some(count), Some(version)) =
                    (data["unreadCount"].as_u64(), data["version"].as_u64())
                else {
                    continue;
                };
                let latency_seq = data["notification"]["data"]["l"].as_u64();
                let sent = latency_seq.and_then(|l| sent_at.lock().unwrap().get(&l).copied());
                let mut s = seen.lock().unwrap();
                *s.frames.entry(id.clone()).or_default() += 1;
                let newest = s.newest.entry(id.clone()).or_default();
                if version > newest.0 {
                    *newest = (version, count);
                }
                if let Some(sent) = sent {
                    s.latencies.push(arrived - sent);
                }
                drop(s);
                let _ = frames_tx.send(());
            }
        }));
    }
    drop(frames_tx);

    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let service = state.jwt.issue(
        "bench-service",
        &[inkwire_shared::auth::GlobalRole::Service],
        Duration::from_secs(3600),
    );
    let mut expected: HashMap<String, u64> = HashMap::new();

    // (b) Throughput: bulk sends, up to 1,000 recipients each.
    let per_request = args.recipients;
    let requests = args.notifications.div_ceil(per_request);
    let start = Instant::now();
    let mut in_flight = futures::stream::iter(0..requests)
        .map(|r| {
            let count = per_request.min(args.notifications - r * per_request);
            let ids: Vec<String> = (0..count).map(user).collect();
            let body = json!({"userIds": ids, "category": "system", "priority": "low",
                "title": "Bench", "body": "A notification of the benchmark",
                "channels": ["in_app"], "data": {"b": r}});
            let req = client
                .post(format!("{base}/api/realtime/notifications/send"))
                .bearer_auth(&service)
                .json(&body);
            async move {
                let res = req.send().await?;
                anyhow::ensure!(
                    res.status().as_u16() == 202,
                    "send answered {}",
                    res.status()
                );
                Ok::<u64, anyhow::Error>(count)
            }
        })
        .buffer_unordered(args.concurrency);
    while let Some(r) = in_flight.next().await {
        let _ = r?;
    }
    drop(in_flight);
    let accepted_secs = start.elapsed().as_secs_f64();
    for n in 0..args.notifications {
        *expected.entry(user(n % per_request)).or_default() += 1;
    }
    // When the notifier has handled every send (its `notification_created` events are in the
    // stream), so that the rest of the time is the relay's. Read on its own connection.
    let notifier_secs = {
        let watcher = inkwire_shared::jetstream::context(
            inkwire_shared::jetstream::connect(&state.config.nats_url, "inkwire-bench-watch")
                .await?,
        );
        let mut events = watcher
            .get_stream(inkwire_shared::subjects::event_stream(
                inkwire_shared::events::Category::Notification,
            ))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loop {
            let info = events.info().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if info.state.messages >= args.notifications {
                break start.elapsed().as_secs_f64();
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(60),
                "the notifier stalled after {} notifications",
                info.state.messages
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut frames = 0;
    while frames < args.notifications {
        tokio::time::timeout(Duration::from_secs(30), frames_rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {frames} of {} frames arrived", args.notifications))?
            .ok_or_else(|| anyhow::anyhow!("the clients stopped"))?;
        frames += 1;
    }
    let throughput_secs = start.elapsed().as_secs_f64();

    // (c) Latency: single-recipient sends at a fixed rate.
    let total = args.rate * args.latency_seconds;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::with_capacity(total as usize);
    for l in 0..total {
        ticker.tick().await;
        let to = user(l % args.recipients);
        *expected.entry(to.clone()).or_default() += 1;
        let body = json!({"userId": to, "category": "system", "priority": "low",
            "title": "Bench", "body": "A timed notification", "channels": ["in_app"],
            "data": {"l": l}});
        sent_at.lock().unwrap().insert(l, Instant::now());
        let req = client
            .post(format!("{base}/api/realtime/notifications/send"))
            .bearer_auth(&service)
            .json(&body);
        sends.push(tokio::spawn(async move {
            let res = req.send().await?;
            anyhow::ensure!(
                res.status().as_u16() == 202,
                "send answered {}",
                res.status()
            );
            Ok::<(), anyhow::Error>(())
        }));
    }
    for s in sends {
        s.await??;
    }
    let mut frames = 0;
    while frames < total {
        tokio::time::timeout(Duration::from_secs(30), frames_rx.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {frames} of {total} timed frames arrived"))?
            .ok_or_else(|| anyhow::anyhow!("the clients stopped"))?;
        frames += 1;
    }

    // Exact unread counts, through the API and in the newest frame of every recipient.
    let mut checked = 0;
    for (id, want) in &expected {
        let token = state.jwt.issue(id, &[], Duration::from_secs(60));
        let got: Value = client
            .get(format!("{base}/api/realtime/notifications/unread-count"))
            .bearer_auth(&token)
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(
            got["unreadCount"].as_u64() == Some(*want),
            "{id}: unread count {got} after {want} notifications"
        );
        let newest = seen.lock().unwrap().newest.get(id).copied();
        anyhow::ensure!(
            newest.map(|n| n.1) == Some(*want),
            "{id}: the newest frame says {newest:?}, {want} were sent"
        );
        checked += 1;
    }

    let latencies = std::mem::take(&mut seen.lock().unwrap().latencies);
    let samples = latencies.len() as u64;
    let (p50, p99, max) = percentiles(latencies);
    let row = |scenario: &str, events: u64, secs: f64| ScenarioResult {
        bench: "notify",
        scenario: scenario.to_string(),
        events,
        seconds: secs,
        events_per_sec: events as f64 / secs,
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        ratio_to_baseline: events as f64 / secs / base_rate,
        baseline_events_per_sec: base_rate,
        notes: String::new(),
    };
    let mut results = vec![
        row(
            "baseline: bare JetStream publish",
            args.notifications,
            base_secs,
        ),
        row(
            "in-app: send → WebSocket frame",
            args.notifications,
            throughput_secs,
        ),
    ];
    results[1].notes = format!(
        "{} recipients, {} per request, {} requests in flight; every send accepted after \
         {accepted_secs:.2} s, settled by the notifier after {notifier_secs:.2} s; unread counts of {checked} recipients exact (API and newest \
         frame)",
        args.recipients, per_request, args.concurrency
    );
    let mut latency = row(
        &format!("latency at {}/s: send → frame", args.rate),
        samples,
        args.latency_seconds as f64,
    );
    latency.p50_ms = p50;
    latency.p99_ms = p99;
    latency.max_ms = max;
    latency.ratio_to_baseline = 0.0;
    results.push(latency);
    print(&results, args.json);

    served.stop().await;
    for c in clients {
        c.abort();
    }
    bench.stop().await;
    Ok(())
}
