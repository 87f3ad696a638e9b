//! `inkwire bench analytics`: how fast the analytics count, against the bare JetStream
//! consume ceiling from the same run, and how soon a closed bucket's push reaches the
//! relays.
//!
//! 1. **Throughput.** `--events` envelopes (`publishing.status_changed` of 100 projects: a
//!    type no other worker of inkwire consumes) are published to `EVENTS_PUBLISHING`
//!    first. Then:
//!    - **baseline**: the faster of two bare pull consumers on the stream (fetch requests
//!      of one batch, acked before the next; the continuous pull stream the runner uses,
//!      acking as messages arrive), with the analytics consumer's settings (explicit acks,
//!      the same batch and ack window), fetching and acking every message and doing
//!      nothing else;
//!    - **inkwire**: the analytics worker (`inkwire_analytics::run_worker`, as
//!      `analytics-worker` runs it) counts the same backlog into Redis; done when the day's
//!      `total` equals the events published.
//! 2. **Lag.** With 1 s buckets (`--bucket`), events are published at `--rate` for
//!    `--seconds`; each bucket's `metrics_update` on `category:analytics` is taken where
//!    the relay instances take it (`live.rt.category.analytics`, core NATS), and the lag is
//!    its arrival − the bucket's end: the wait of the bucket's last event, and the figure
//!    the issue bounds (p99 < 1 s). Buckets that ended before this load began (the
//!    backlog's, pushed late by design) are not counted.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, pull};
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use inkwire_analytics::config::{AnalyticsConfig, DAY_MS};
use inkwire_analytics::store;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::jetstream::{Outgoing, publish_windowed};
use serde::Serialize;
use serde_json::{Value, json};

use super::histogram::Histogram;

#[derive(Args)]
pub struct AnalyticsArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Events in the backlog counted by the baseline and by inkwire.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Events per second during the lag measurement.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Seconds of the lag measurement.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// The bucket length during the lag measurement (the default deployment uses 5s).
    #[arg(long, default_value = "1s")]
    bucket: String,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct AnalyticsResult {
    bench: &'static str,
    scenario: String,
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    /// events/s over the bare consumer's.
    ratio_to_baseline: f64,
    baseline_events_per_sec: f64,
    /// Lag scenario: buckets pushed, and bucket end → push arrival.
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_p99_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lag_max_ms: Option<f64>,
}

const STREAM: &str = "EVENTS_PUBLISHING";

fn envelope(i: u64) -> Outgoing {
    let event = Event::builder(Category::Publishing, "status_changed", "bench-user")
        .project(format!("bench-p{}", i % 100))
        .source("bench")
        .data(json!({"bookId": format!("b-{}", i % 1000), "to": "ready"}))
        .build();
    Outgoing {
        subject: event.subject(),
        msg_id: event.id.to_string(),
        payload: Bytes::from(serde_json::to_vec(&event).expect("events serialize")),
    }
}

async fn publish(js: &async_nats::jetstream::Context, from: u64, to: u64) -> anyhow::Result<()> {
    let mut i = from;
    while i < to {
        let end = (i + 10_000).min(to);
        publish_windowed(js, (i..end).map(envelope), 512)
            .await
            .map_err(|e| anyhow::anyhow!("publishing the backlog: {}", e.error))?;
        i = end;
    }
    Ok(())
}

/// The events counted so far: the `total` of today's and yesterday's day buckets.
async fn counted(redis: &mut redis::aio::ConnectionManager) -> anyhow::Result<i64> {
    let now = super::fanout::now_ns() / 1_000_000;
    let today = now - now % DAY_MS;
    let keys = [
        store::bucket_key(DAY_MS, today),
        store::bucket_key(DAY_MS, today - DAY_MS),
    ];
    let rows = store::read_fields(redis, &keys, &["total".to_string()]).await?;
    Ok(rows.iter().flatten().sum())
}

/// Seconds a bare durable consumer takes to fetch and ack `events` messages: with fetch
/// requests of one batch each, acked before the next (`streaming == false`), or with the
/// continuous pull stream the runner uses, acking as messages arrive.
async fn bare_consume(
    stream: &async_nats::jetstream::stream::Stream,
    spec: &inkwire_shared::consumer::ConsumerSpec,
    events: u64,
    streaming: bool,
) -> anyhow::Result<f64> {
    let name = if streaming {
        "bench-bare-stream"
    } else {
        "bench-bare-fetch"
    };
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: spec.max_ack_pending.unwrap_or(1000),
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut seen = 0u64;
    if streaming {
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(spec.batch)
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("pull stream: {e}"))?;
        while seen < events {
            let msg = messages
                .next()
                .await
                .ok_or_else(|| anyhow::anyhow!("pull stream ended"))?
                .map_err(|e| anyhow::anyhow!("message: {e}"))?;
            msg.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            seen += 1;
        }
    } else {
        while seen < events {
            let mut batch = consumer
                .fetch()
                .max_messages(spec.batch)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|e| anyhow::anyhow!("fetch: {e}"))?;
            let mut acks = Vec::with_capacity(spec.batch);
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(|e| anyhow::anyhow!("message: {e}"))?;
                acks.push(async move { msg.ack().await });
                seen += 1;
            }
            for r in futures::future::join_all(acks).await {
                r.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    stream.delete_consumer(name).await?;
    Ok(secs)
}

pub async fn run(args: AnalyticsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.events >= 1_000, "--events must be at least 1000");
    anyhow::ensure!(
        args.rate >= 1 && args.seconds >= 3,
        "--rate ≥ 1, --seconds ≥ 3"
    );
    let bucket = inkwire_shared::config::parse_duration(&args.bucket)
        .map_err(|e| anyhow::anyhow!("--bucket: {e}"))?;
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-analytics",
    )
    .await?;
    let state = bench.state.clone();
    // The deployment's settings (`INKWIRE_ANALYTICS_*`), as `analytics-worker` reads them.
    let config = AnalyticsConfig::from_env()?;
    publish(&state.js, 0, args.events).await?;

    // Baseline: the best of two bare consumers that fetch and ack the backlog and do nothing
    // else, with the analytics consumer's settings (explicit acks, batch, ack window).
    let stream = state.js.get_stream(STREAM).await?;
    let spec = inkwire_analytics::worker::spec(STREAM, &config);
    let bare_fetch = bare_consume(&stream, &spec, args.events, false).await?;
    let bare_stream = bare_consume(&stream, &spec, args.events, true).await?;
    let bare_secs = bare_fetch.min(bare_stream);
    let bare_rate = args.events as f64 / bare_secs;

    // inkwire: the analytics worker on the same backlog.
    let (trigger, shutdown) = inkwire_shared::consumer::ShutdownTrigger::new();
    let started = Instant::now();
    let worker = tokio::spawn(inkwire_analytics::run_worker(
        state.js.clone(),
        state.redis.clone(),
        config.clone(),
        shutdown,
    ));
    let mut redis = state.redis.clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let n = counted(&mut redis).await?;
        if n >= args.events as i64 {
            anyhow::ensure!(
                n == args.events as i64,
                "counted {n} of {} events",
                args.events
            );
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "counted only {n} of {} events in 10 minutes",
            args.events
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ours_secs = started.elapsed().as_secs_f64();
    let ours_rate = args.events as f64 / ours_secs;
    trigger.trigger();
    let _ = worker.await;

    // Lag: short buckets, a steady rate, each bucket's push where the relays take it.
    let lag_config = AnalyticsConfig {
        bucket,
        ..config.clone()
    };
    lag_config
        .check()
        .map_err(|e| anyhow::anyhow!("--bucket: {e}"))?;
    let bucket_ms = lag_config.bucket_ms();
    let mut frames = state
        .nats
        .subscribe("live.rt.category.analytics")
        .await
        .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    let (trigger, shutdown) = inkwire_shared::consumer::ShutdownTrigger::new();
    let worker = tokio::spawn(inkwire_analytics::run_worker(
        state.js.clone(),
        state.redis.clone(),
        lag_config,
        shutdown,
    ));
    let js = state.js.clone();
    let (rate, seconds, base) = (args.rate, args.seconds, args.events);
    let load_started = super::fanout::now_ns() / 1_000_000;
    let load = tokio::spawn(async move {
        let per_tick = (rate / 20).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut i = base;
        for _ in 0..seconds * 20 {
            tick.tick().await;
            publish(&js, i, i + per_tick).await?;
            i += per_tick;
        }
        anyhow::Ok(i - base)
    });
    let histogram = Histogram::default();
    let mut buckets = 0u64;
    let stop_at = Instant::now() + Duration::from_secs(args.seconds + 3);
    while let Ok(Some(msg)) = tokio::time::timeout(
        stop_at.saturating_duration_since(Instant::now()),
        frames.next(),
    )
    .await
    {
        let arrived = super::fanout::now_ns() / 1_000_000;
        let Ok(frame) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        let Some(end) = frame["data"]["end"]
            .as_str()
            .and_then(|e| {
                time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as u64)
        else {
            continue;
        };
        // Buckets from the throughput phase's time (pushed late, if at all) are not lag:
        // another resolution, or 1 s buckets of the backlog, ended before this load began.
        if frame["data"]["resolution"] != inkwire_analytics::config::label(bucket_ms)
            || end <= load_started
        {
            continue;
        }
        histogram.record(Duration::from_millis(arrived.saturating_sub(end)));
        buckets += 1;
    }
    let published = load.await??;
    trigger.trigger();
    let _ = worker.await;
    bench.stop().await;

    let results = [
        AnalyticsResult {
            bench: "analytics",
            scenario: "baseline: bare JetStream consume (best of fetch / pull stream, + ack)"
                .into(),
            events: args.events,
            seconds: bare_secs,
            events_per_sec: bare_rate,
            ratio_to_baseline: 1.0,
            baseline_events_per_sec: bare_rate,
            buckets: None,
            lag_p50_ms: None,
            lag_p99_ms: None,
            lag_max_ms: None,
        },
        AnalyticsResult {
            bench: "analytics",
            scenario: "inkwire: analytics worker counting".into(),
            events: args.events,
            seconds: ours_secs,
            events_per_sec: ours_rate,
            ratio_to_baseline: ours_rate / bare_rate,
            baseline_events_per_sec: bare_rate,
            buckets: None,
            lag_p50_ms: None,
            lag_p99_ms: None,
            lag_max_ms: None,
        },
        AnalyticsResult {
            bench: "analytics",
            scenario: format!(
                "inkwire: bucket end → push, {} buckets at {}/s",
                args.bucket, args.rate
            ),
            events: published,
            seconds: args.seconds as f64,
            events_per_sec: published as f64 / args.seconds as f64,
            ratio_to_baseline: 0.0,
            baseline_events_per_sec: bare_rate,
            buckets: Some(buckets),
            lag_p50_ms: Some(histogram.quantile_ms(0.50)),
            lag_p99_ms: Some(histogram.quantile_ms(0.99)),
            lag_max_ms: Some(histogram.max_ms()),
        },
    ];
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<52} {:>8} {:>8} {:>10} {:>7} {:>8} {:>8} {:>8}",
            "scenario", "events", "seconds", "events/s", "ratio", "lag p50", "lag p99", "lag max"
        );
        for r in &results {
            let ms = |v: Option<f64>| v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into());
            println!(
                "{:<52} {:>8} {:>8.2} {:>10.0} {:>6.2}x {:>8} {:>8} {:>8}",
                r.scenario,
                r.events,
                r.seconds,
                r.events_per_sec,
                r.ratio_to_baseline,
                ms(r.lag_p50_ms),
                ms(r.lag_p99_ms),
                ms(r.lag_max_ms)
            );
        }
        println!(
            "  lag: each bucket's metrics_update as the relay instances receive it, minus the \
             bucket's end (target p99 < 1 s); throughput target ≥ 0.5× the bare consumer"
        );
    }
    Ok(())
}
