//! `inkwire bench tracker`: the writing tracker's throughput and live-update latency.
//!
//! (a) baseline — bare pipelined Redis: one `HINCRBY` per keystroke batch on the batch's
//!     session hash, 1,000 commands per round trip;
//! (b) ceiling — the same messages pulled and acked by a bare JetStream consumer (no work):
//!     the delivery cost the tracker cannot avoid, for scale;
//! (c) tracker — the same number of keystroke batches, preloaded into `EVENTS_WRITING` for
//!     many concurrent sessions, consumed by one tracker instance (projection, derived
//!     events, live pushes), timed until the consumer has acknowledged everything;
//! (d) latency — a WebSocket client on the writer's `user:` channel; each keystroke POST is
//!     timed until the live metrics showing it arrive (with the once-per-second throttle off).

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use bytes::Bytes;
use clap::Args;
use futures::{SinkExt, StreamExt};
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish_windowed};
use inkwire_shared::membership::{self, ProjectRole};
use inkwire_writing::session::Session;
use inkwire_writing::state_machine::TrackerConfig;
use inkwire_writing::store;
use inkwire_writing::tracker::{DURABLE, Tracker, run_tracker};
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::report::percentiles;

#[derive(Args)]
pub struct TrackerArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Keystroke batches to process (enough that start-up does not dominate).
    #[arg(long, default_value_t = 400_000)]
    batches: u64,
    /// Concurrent sessions they belong to.
    #[arg(long, default_value_t = 1_000)]
    sessions: u64,
    /// Keystroke POSTs timed for the latency scenario.
    #[arg(long, default_value_t = 300)]
    latency_samples: usize,
    /// Do not publish derived events and live pushes (to see what they cost).
    #[arg(long)]
    no_emit: bool,
    /// Tracker instances sharing the durable consumer (what several instances cost: they
    /// see the same sessions, and a stale save is refused and redone).
    #[arg(long, default_value_t = 1)]
    instances: usize,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct TrackerResult {
    bench: &'static str,
    scenario: &'static str,
    batches: u64,
    seconds: f64,
    batches_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    ratio_to_baseline: f64,
    baseline_batches_per_sec: f64,
}

const PROJECT: &str = "bench-writing";

pub async fn run(args: TrackerArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.batches >= 1 && args.sessions >= 1,
        "--batches and --sessions must be at least 1"
    );
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-tracker",
    )
    .await?;
    let state = bench.state.clone();
    // The configured thresholds (INKWIRE_WRITING_*), as the tracker would run them.
    let config = TrackerConfig::from_env()?;
    let mut redis = state.redis.clone();

    // Baseline: bare pipelined Redis updates, the same count.
    let start = Instant::now();
    let mut pipe = redis::pipe();
    for n in 0..args.batches {
        pipe.hincr(format!("bench:baseline:{}", n % args.sessions), "words", 2)
            .ignore();
        if (n + 1) % 1000 == 0 || n + 1 == args.batches {
            pipe.query_async::<()>(&mut redis).await?;
            pipe = redis::pipe();
        }
    }
    let base_secs = start.elapsed().as_secs_f64();
    let base_rate = args.batches as f64 / base_secs;

    // Sessions, and their keystroke batches preloaded into the stream.
    let t0 = time::OffsetDateTime::now_utc();
    let t0_ms = (t0.unix_timestamp_nanos() / 1_000_000) as u64;
    for s in 0..args.sessions {
        let session = Session::new(
            &format!("bench-s{s}"),
            &format!("bench-u{}", s % 100),
            Some(PROJECT.into()),
            Some("bench-d".into()),
            None,
            t0_ms,
            19.0,
        );
        store::save(&mut redis, &session, 0, &config, 0, "").await?;
    }
    let per_session = args.batches.div_ceil(args.sessions);
    let msgs = (0..args.batches).map(|n| {
        let s = n % args.sessions;
        let k = n / args.sessions;
        let at = t0 + Duration::from_millis(k * 1000 / per_session.max(1) * 60 + k * 100);
        let event = Event::builder(Category::Writing, "keystroke", format!("bench-u{}", s % 100))
            .project(PROJECT)
            .document("bench-d")
            .timestamp(at)
            .source("bench")
            .data(json!({"sessionId": format!("bench-s{s}"), "keys": 12, "charsAdded": 12, "charsDeleted": 1, "wordsAdded": 2}))
            .build();
        Outgoing {
            subject: event.subject(),
            msg_id: event.id.to_string(),
            payload: Bytes::from(serde_json::to_vec(&event).expect("serializes")),
        }
    });
    publish_windowed(&state.js, msgs, 512)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // Ceiling: bare JetStream consumption of the same messages (pull, ack each), no work.
    let consume_secs = bare_consume(&state, args.batches).await?;

    // The tracker, alone, until everything is acknowledged.
    let (trigger, shutdown) = ShutdownTrigger::new();
    let tracker = Tracker::new(
        state.js.clone(),
        state.redis.clone(),
        config.clone(),
        !args.no_emit,
    );
    let start = Instant::now();
    let mut tasks = vec![tokio::spawn(run_tracker(tracker, shutdown.clone()))];
    for _ in 1..args.instances.max(1) {
        let t = Tracker::new(
            state.js.clone(),
            state.redis.clone(),
            config.clone(),
            !args.no_emit,
        );
        tasks.push(tokio::spawn(run_tracker(t, shutdown.clone())));
    }
    let stream = state.js.get_stream("EVENTS_WRITING").await?;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(mut c) = stream.get_consumer::<pull::Config>(DURABLE).await {
            let info = c.info().await?;
            if info.ack_floor.stream_sequence >= args.batches && info.num_ack_pending == 0 {
                break;
            }
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(600),
            "tracker did not finish within 10 minutes"
        );
    }
    let tracker_secs = start.elapsed().as_secs_f64();
    trigger.trigger();
    for task in tasks {
        let _ = task.await;
    }
    // Every batch applied exactly once: each added two words.
    let mut words = 0;
    let ids: Vec<String> = (0..args.sessions).map(|s| format!("bench-s{s}")).collect();
    for chunk in ids.chunks(1000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for l in store::load_many(&mut redis, &refs).await? {
            words += l.map_or(0, |l| l.session.words_added);
        }
    }
    anyhow::ensure!(
        words == 2 * args.batches,
        "the tracker counted {words} words for {} batches of 2",
        args.batches
    );

    // Latency: keystroke POST → live metrics on the WebSocket, throttle off.
    let latency = latency_scenario(&state, args.latency_samples).await?;
    // A throughput row: `args.batches` in `secs`, beside the Redis baseline.
    let throughput = |scenario: &'static str, secs: f64| TrackerResult {
        bench: "tracker",
        scenario,
        batches: args.batches,
        seconds: secs,
        batches_per_sec: args.batches as f64 / secs,
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        ratio_to_baseline: args.batches as f64 / secs / base_rate,
        baseline_batches_per_sec: base_rate,
    };
    let samples = latency.len() as u64;
    let (p50, p99, max) = percentiles(latency);
    let results = vec![
        throughput("baseline: bare pipelined Redis", base_secs),
        throughput("ceiling: bare JetStream consume", consume_secs),
        throughput(
            if args.instances > 1 {
                "tracker: several instances"
            } else {
                "tracker: one instance"
            },
            tracker_secs,
        ),
        TrackerResult {
            bench: "tracker",
            scenario: "latency: POST → WebSocket",
            batches: samples,
            seconds: 0.0,
            batches_per_sec: 0.0,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: max,
            ratio_to_baseline: 0.0,
            baseline_batches_per_sec: base_rate,
        },
    ];
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<34} {:>9} {:>12} {:>9} {:>9} {:>9} {:>7}",
            "scenario", "batches", "batches/s", "p50 ms", "p99 ms", "max ms", "ratio"
        );
        for r in &results {
            println!(
                "{:<34} {:>9} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>6.2}x",
                r.scenario,
                r.batches,
                r.batches_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.ratio_to_baseline
            );
        }
        println!(
            "  {} sessions, {} batches each, {} tracker instance(s), every batch counted once \
             (checked); the tracker {}; the ceiling row is JetStream delivery and acks alone \
             (no work), for scale",
            args.sessions,
            args.batches.div_ceil(args.sessions),
            args.instances.max(1),
            if args.no_emit {
                "publishes no derived events or live metrics (--no-emit)"
            } else {
                "publishes derived events and live metrics as in production"
            }
        );
    }
    bench.stop().await;
    Ok(())
}

async fn latency_scenario(
    state: &inkwire_shared::AppState,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut redis = state.redis.clone();
    // A project always has an owner first.
    membership::set_member(&mut redis, "lat-p", "lat-o", Some(ProjectRole::Owner)).await?;
    membership::set_member(&mut redis, "lat-p", "lat-u", Some(ProjectRole::Editor)).await?;
    membership::register_document(&mut redis, "lat-p", "lat-d")
        .await?
        .map_err(|e| anyhow::anyhow!("registering the latency document: {e:?}"))?;
    let settings = inkwire::Settings {
        writing: TrackerConfig {
            live_interval: Duration::ZERO,
            ..TrackerConfig::default()
        },
        // Measures live metrics only: no presence_update frames.
        without_presence_worker: true,
        without_analytics_worker: true,
        ..Default::default()
    };
    let served = super::Served::start(state, settings).await?;
    let addr = served.addr;
    let token = state.jwt.issue("lat-u", &[], Duration::from_secs(3600));
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/collaboration?token={token}"))
            .await?;
    ws.next().await; // welcome
    ws.send(Message::Text(
        json!({"op": "subscribe", "channel": "user:lat-u"})
            .to_string()
            .into(),
    ))
    .await?;
    ws.next().await; // subscribed
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let started: serde_json::Value = client
        .post(format!("{base}/api/realtime/writing/sessions/start"))
        .bearer_auth(&token)
        .json(&json!({"projectId": "lat-p", "documentId": "lat-d"}))
        .send()
        .await?
        .json()
        .await?;
    let id = started["sessionId"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("start failed: {started}"))?
        .to_string();
    let mut latencies = Vec::with_capacity(samples);
    for n in 1..=samples as u64 {
        let t = Instant::now();
        let res = client
            .post(format!(
                "{base}/api/realtime/writing/sessions/{id}/keystroke"
            ))
            .bearer_auth(&token)
            .json(&json!({"keys": 1, "charsAdded": 1, "charsDeleted": 0}))
            .send()
            .await?;
        anyhow::ensure!(
            res.status().as_u16() == 202,
            "keystroke answered {}",
            res.status()
        );
        // Wait for the metrics that include this keystroke.
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await?
                .ok_or_else(|| anyhow::anyhow!("socket closed"))??;
            let Message::Text(text) = msg else { continue };
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if v["data"]["sessions"][0]["metrics"]["keystrokes"].as_u64() >= Some(n) {
                break;
            }
        }
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    served.stop().await;
    Ok(latencies)
}

/// Pulls and acks `count` messages of the writing stream with a consumer of its own and no
/// work in between: what JetStream delivery costs on this machine.
async fn bare_consume(state: &inkwire_shared::AppState, count: u64) -> anyhow::Result<f64> {
    const NAME: &str = "bench-bare-consume";
    let stream = state.js.get_stream("EVENTS_WRITING").await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(NAME.into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let start = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(2000)
        .messages()
        .await?;
    for _ in 0..count {
        let m = messages
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the stream ended early"))??;
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(messages);
    stream.delete_consumer(NAME).await?;
    Ok(secs)
}
