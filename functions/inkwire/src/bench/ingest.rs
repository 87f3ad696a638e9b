//! `inkwire bench ingest`: how close the HTTP events API comes to bare JetStream.
//!
//! In one run, against the same servers and streams:
//! (a) baseline — one NATS client publishes the same envelopes straight to JetStream with
//!     dedupe ids and a window of outstanding acks;
//! (b) HTTP single — concurrent connections each POST one event at a time;
//! (c) HTTP batch — concurrent connections POST batches of 100 events.
//! The HTTP server runs in this process, authenticated as a normal project member, so
//! validation, authorization (a Redis lookup) and publishing are all measured.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use inkwire_shared::http;
use inkwire_shared::jetstream::Outgoing;
use inkwire_shared::membership::{self, ProjectRole};
use serde_json::{Value, json};

use super::load_client::LoadClient;
use super::report::{Progress, ScenarioResult, percentiles, print};

#[derive(Args)]
pub struct IngestArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Events for the baseline and the batch scenario.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events for the single-event scenario (one request each).
    #[arg(long, default_value_t = 40_000)]
    single_events: u64,
    /// Concurrent connections for single-event publishing.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Concurrent connections for batch publishing.
    #[arg(long, default_value_t = 8)]
    batch_connections: usize,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Outstanding acks for the baseline publisher (the server uses INKWIRE_PUBLISH_WINDOW).
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Use this Redis server instead of starting one.
    #[arg(long)]
    redis_url: Option<String>,
}

const USER: &str = "bench-user";
const PROJECT: &str = "bench-project";

/// An event an editor of the project may publish (so the role check is measured too); the
/// server stamps the time (a fixed one would leave the accepted window).
fn envelope(n: u64) -> Value {
    json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "category": "collaboration",
        "type": "edit_applied",
        "userId": USER,
        "projectId": PROJECT,
        "data": {"operation": "insert", "paragraph": n % 1000, "length": 3, "version": n},
        "metadata": {"source": "bench", "version": 1}
    })
}

pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batch_size >= 1 && args.batch_size <= 1000,
        "--batch-size must be 1..=1000"
    );
    anyhow::ensure!(
        args.connections >= 1 && args.batch_connections >= 1,
        "connections must be at least 1"
    );
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-server",
    )
    .await?;
    let state = bench.state.clone();
    let mut redis = state.redis.clone();
    // A project always has an owner first.
    membership::set_member(&mut redis, PROJECT, "bench-owner", Some(ProjectRole::Owner)).await?;
    membership::set_member(&mut redis, PROJECT, USER, Some(ProjectRole::Editor)).await?;
    let token = state.jwt.issue(USER, &[], Duration::from_secs(3600));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (trigger, shutdown) = inkwire_shared::consumer::ShutdownTrigger::new();
    let running = inkwire::start(state.clone(), inkwire::Settings::default(), shutdown).await?;
    let server = tokio::spawn(http::serve_on(listener, running.router.clone(), async {
        let _ = stop_rx.await;
    }));

    // The baseline publisher has its own connection, as an application would.
    let client =
        inkwire_shared::jetstream::connect(&state.config.nats_url, "inkwire-bench-baseline")
            .await?;
    let js = inkwire_shared::jetstream::context(client);

    let baseline = bench_baseline(&js, args.events, args.window).await?;
    let base_rate = baseline.events_per_sec;
    let mut results = vec![finish(baseline, base_rate)];
    let single = bench_single(&addr, &token, args.single_events, args.connections).await?;
    results.push(finish(single, base_rate));
    let batch = bench_batch(
        &addr,
        &token,
        args.events,
        args.batch_size,
        args.batch_connections,
    )
    .await?;
    results.push(finish(batch, base_rate));
    print(&results, args.json);

    let _ = stop_tx.send(());
    let _ = server.await;
    trigger.trigger();
    running.finished().await;
    bench.stop().await;
    Ok(())
}

fn finish(mut r: ScenarioResult, baseline: f64) -> ScenarioResult {
    r.baseline_events_per_sec = baseline;
    r.ratio_to_baseline = if baseline > 0.0 {
        r.events_per_sec / baseline
    } else {
        0.0
    };
    r
}

fn result(
    scenario: String,
    events: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
    notes: String,
) -> ScenarioResult {
    let (p50_ms, p99_ms, max_ms) = percentiles(latencies);
    let seconds = elapsed.as_secs_f64();
    ScenarioResult {
        bench: "ingest",
        scenario,
        events,
        seconds,
        events_per_sec: events as f64 / seconds,
        p50_ms,
        p99_ms,
        max_ms,
        ratio_to_baseline: 0.0,
        baseline_events_per_sec: 0.0,
        notes,
    }
}

async fn bench_baseline(
    js: &async_nats::jetstream::Context,
    events: u64,
    window: usize,
) -> anyhow::Result<ScenarioResult> {
    let progress = Progress::start("baseline", events);
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(events as usize);
    let mut pending = FuturesOrdered::new();
    for n in 0..events {
        if pending.len() >= window
            && let Some(done) = pending.next().await
        {
            latencies.push(done?);
            progress.done.fetch_add(1, Ordering::Relaxed);
        }
        let event = envelope(n);
        let msg = Outgoing {
            subject: "events.collaboration.edit_applied".into(),
            msg_id: event["id"].as_str().unwrap_or_default().to_string(),
            payload: Bytes::from(serde_json::to_vec(&event)?),
        };
        let sent = Instant::now();
        let ack = js
            .send_publish(
                msg.subject,
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(msg.payload)
                    .message_id(msg.msg_id),
            )
            .await?;
        pending.push_back(async move {
            let ack = ack.await?;
            anyhow::ensure!(!ack.duplicate, "unexpected duplicate");
            Ok::<_, anyhow::Error>(sent.elapsed())
        });
    }
    while let Some(done) = pending.next().await {
        latencies.push(done?);
    }
    let elapsed = start.elapsed();
    progress.finish();
    Ok(result(
        "baseline: bare JetStream publish".into(),
        events,
        elapsed,
        latencies,
        format!("one client, {window} acks in flight; latency is publish→ack"),
    ))
}

/// A closed-loop HTTP load: `connections` workers, each with its own kept-alive connection,
/// POST the bodies `body_for(n, events_per_request)` for n in 0..requests.
struct Load {
    path: &'static str,
    requests: u64,
    connections: usize,
    events_per_request: u64,
    body_for: fn(u64, u64) -> anyhow::Result<Vec<u8>>,
}

/// Runs `load` and returns the per-request latencies.
async fn drive(
    addr: &str,
    token: &str,
    load: Load,
    progress: &Progress,
) -> anyhow::Result<Vec<Duration>> {
    let Load {
        path,
        requests,
        connections,
        events_per_request,
        body_for,
    } = load;
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (next, done) = (next.clone(), progress.done.clone());
        let mut client = LoadClient::connect(addr, token).await?;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= requests {
                    break;
                }
                let body = body_for(n, events_per_request)?;
                let t = Instant::now();
                let (status, answer) = client.post_json(path, body).await?;
                anyhow::ensure!(
                    status == 202,
                    "{path} answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
                latencies.push(t.elapsed());
                done.fetch_add(events_per_request, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    Ok(latencies)
}

async fn bench_single(
    addr: &str,
    token: &str,
    events: u64,
    connections: usize,
) -> anyhow::Result<ScenarioResult> {
    let progress = Progress::start("http single", events);
    let start = Instant::now();
    let latencies = drive(
        addr,
        token,
        Load {
            path: "/api/realtime/events/publish",
            requests: events,
            connections,
            events_per_request: 1,
            body_for: |n, _| Ok(serde_json::to_vec(&envelope(n))?),
        },
        &progress,
    )
    .await?;
    let elapsed = start.elapsed();
    progress.finish();
    Ok(result(
        "http single: POST /events/publish".into(),
        events,
        elapsed,
        latencies,
        format!("{connections} connections, one event per request"),
    ))
}

async fn bench_batch(
    addr: &str,
    token: &str,
    events: u64,
    batch_size: usize,
    connections: usize,
) -> anyhow::Result<ScenarioResult> {
    let size = batch_size as u64;
    let batches = events.div_ceil(size);
    let progress = Progress::start("http batch", batches * size);
    let start = Instant::now();
    let latencies = drive(
        addr,
        token,
        Load {
            path: "/api/realtime/events/batch",
            requests: batches,
            connections,
            events_per_request: size,
            body_for: |b, size| {
                let items: Vec<Value> = (0..size).map(|i| envelope(b * size + i)).collect();
                Ok(serde_json::to_vec(&json!({ "events": items }))?)
            },
        },
        &progress,
    )
    .await?;
    let elapsed = start.elapsed();
    progress.finish();
    Ok(result(
        format!("http batch: POST /events/batch ×{batch_size}"),
        batches * size,
        elapsed,
        latencies,
        format!("{connections} connections; latency is per {batch_size}-event request"),
    ))
}
