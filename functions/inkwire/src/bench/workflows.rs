//! `inkwire bench workflows`: steps per second through a 10-step DAG with a fixed number of
//! runs in flight, and each step's dispatch latency (ready → handler start), against the
//! bare JetStream round trip the engine's dispatch is built on, from the same run.
//!
//! For each `--runs-in-flight` value C (50 and 200 by default):
//!
//! - **baseline**: C chains of 10 messages on a stream with the `WF` stream's settings, new
//!   in each phase (`WF_BENCH`, `wfbench.{chain}.{i}`: one subject per message like the
//!   engine's `wf.step.{run}.{step}`), consumed by the runner the engine uses
//!   (`consumer::run_concurrent`, with the engine's consumer settings and concurrency) whose
//!   handler does nothing but publish the chain's next message (acked, with a dedupe id, as a
//!   dispatch is) — the 10th starts a new chain, so C stay in flight. Messages/s, and
//!   publish → handler start latency;
//! - **engine**: the workflow engine (`run_worker`, as `workflows-worker` runs it, with the
//!   `INKWIRE_WORKFLOW_*` settings) runs a registered 10-step DAG — a root, four parallel
//!   steps, a join, then a chain of four, every step a `redis` `incr` of a key of its run —
//!   with C runs in flight: the bench starts a run (`start_run`, as the execute API does)
//!   each time one ends (its `workflow_completed` event, taken from the automation subject
//!   on core NATS; the in-flight runs' statuses are also read every 500 ms in case one was
//!   missed). Steps/s = completed runs × 10 / seconds; dispatch latency = the step's ready
//!   time (when the script that released it answered) → its handler holding the attempt
//!   (after the run's read and the `START` script), as the engine records it
//!   (`Engine::latencies`, first attempts).
//!
//! Each phase runs a warm-up that is not counted, then `--seconds`: 1 s for the baseline;
//! the watch grace (`INKWIRE_WORKFLOW_WATCH_GRACE`, 5 s) + 1 s for the engine, because the
//! watcher looks at every run once, a grace after its start, and that work belongs in a
//! steady state. After an engine phase the bench waits until the watcher has looked at the
//! last runs. Ratio = the engine's steps/s over the baseline's messages/s at the same C.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use inkwire_shared::consumer::{self, Delivery, HandlerError, ShutdownTrigger};
use inkwire_shared::events::Category;
use inkwire_shared::jetstream::{self, Outgoing};
use inkwire_shared::subjects;
use inkwire_workflows::engine::{self, Loaded, StartRequest};
use inkwire_workflows::{Engine, WorkflowsConfig, registry, store};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::fanout::now_ns;
use super::histogram::Histogram;

#[derive(Args)]
pub struct WorkflowsArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Runs (baseline: chains) kept in flight; one baseline and one engine phase per value.
    #[arg(long, value_delimiter = ',', default_values_t = [50usize, 200])]
    runs_in_flight: Vec<usize>,
    /// Seconds measured per phase (after 1 s of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct WorkflowsResult {
    bench: &'static str,
    scenario: String,
    runs_in_flight: usize,
    /// Steps (engine) or messages (baseline) in the measured time.
    events: u64,
    seconds: f64,
    events_per_sec: f64,
    /// Runs (engine) or 10-message chains (baseline) completed.
    runs: u64,
    runs_per_sec: f64,
    /// The engine's steps/s over the baseline's messages/s at the same runs in flight.
    ratio_to_baseline: f64,
    baseline_events_per_sec: f64,
    /// Dispatch latency (engine: step ready → handler start; baseline: publish → handler
    /// start).
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    latency_samples: u64,
    /// Cores busy during the measured time: this process, its nats-server and redis-server
    /// (when the bench started them) and everything else on the machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu: Option<Cores>,
}

/// Steps per run of the bench's DAG.
const STEPS: u64 = 10;
const WARMUP: Duration = Duration::from_secs(1);
const WORKFLOW: &str = "bench-dag";
const PROJECT: &str = "bench-p";

/// root → a, b, c, d → join → c1 → c2 → c3 → c4; every step a Redis `incr` of the run's key.
fn definition() -> Value {
    let step = |id: &str, deps: &[&str]| {
        json!({"id": id, "action": "redis", "dependsOn": deps,
               "input": {"op": "incr", "key": "bench:{{ run.id }}"}})
    };
    let steps = vec![
        step("root", &[]),
        step("a", &["root"]),
        step("b", &["root"]),
        step("c", &["root"]),
        step("d", &["root"]),
        step("join", &["a", "b", "c", "d"]),
        step("c1", &["join"]),
        step("c2", &["c1"]),
        step("c3", &["c2"]),
        step("c4", &["c3"]),
    ];
    json!({"id": WORKFLOW, "version": 1, "projectId": PROJECT,
           "triggers": [{"type": "manual"}], "steps": steps})
}

/// Where a phase is: counted only while measuring; no new work once stopping.
const WARMING: u8 = 0;
const MEASURING: u8 = 1;
const STOPPING: u8 = 2;

struct Figures {
    events: u64,
    runs: u64,
    seconds: f64,
    histogram: Histogram,
    cpu: Option<Cores>,
}

/// CPU use over a measured time, in cores (1.0 = one core busy).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct Cores {
    inkwire: f64,
    nats_server: f64,
    redis_server: f64,
    other: f64,
}

/// CPU seconds so far (Linux `/proc`): this process, its `nats-server` and `redis-server`
/// children, and the whole machine (busy time of every core).
#[derive(Clone, Copy)]
struct CpuTimes {
    at: Instant,
    own: f64,
    nats: f64,
    redis: f64,
    machine: f64,
}

/// `USER_HZ`, the unit of `/proc`'s CPU times: 100 on every Linux the bench runs on.
const TICKS: f64 = 100.0;

/// (comm, ppid, utime + stime in s) of a `/proc/{pid}/stat` line.
fn proc_stat(text: &str) -> Option<(&str, u32, f64)> {
    let comm = &text[text.find('(')? + 1..text.rfind(')')?];
    let rest: Vec<&str> = text[text.rfind(')')? + 2..].split(' ').collect();
    let ppid = rest.get(1)?.parse().ok()?;
    let ticks: u64 = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
    Some((comm, ppid, ticks as f64 / TICKS))
}

fn cpu_times() -> Option<CpuTimes> {
    let at = Instant::now();
    let own = proc_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)?.2;
    let me = std::process::id();
    let (mut nats, mut redis) = (0.0, 0.0);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        match proc_stat(&text) {
            Some(("nats-server", ppid, t)) if ppid == me => nats += t,
            Some(("redis-server", ppid, t)) if ppid == me => redis += t,
            _ => {}
        }
    }
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let busy: u64 = cpu.iter().take(8).sum::<u64>() - cpu.get(3)? - cpu.get(4)?;
    Some(CpuTimes {
        at,
        own,
        nats,
        redis,
        machine: busy as f64 / TICKS,
    })
}

fn cores_between(from: Option<CpuTimes>, to: Option<CpuTimes>) -> Option<Cores> {
    let (a, b) = (from?, to?);
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let per = |x: f64, y: f64| ((y - x) / secs * 100.0).round() / 100.0;
    let (inkwire, nats_server, redis_server) = (
        per(a.own, b.own),
        per(a.nats, b.nats),
        per(a.redis, b.redis),
    );
    Some(Cores {
        inkwire,
        nats_server,
        redis_server,
        other: (per(a.machine, b.machine) - inkwire - nats_server - redis_server).max(0.0),
    })
}

fn histogram_of(us: &[u64]) -> Histogram {
    let h = Histogram::default();
    for v in us {
        h.record(Duration::from_micros(*v));
    }
    h
}

// ---- baseline ----

/// A baseline message: its chain, its place in it, and when it was published (µs).
#[derive(Serialize, Deserialize)]
struct Link {
    chain: String,
    i: u64,
    sent_us: u64,
}

/// The baseline's stream: the `WF` stream's settings under another name and subjects, new
/// in each phase (so that a phase neither sees the messages of the one before nor pays for
/// the index of a stream they made large).
const BENCH_STREAM: &str = "WF_BENCH";
const BENCH_PREFIX: &str = "wfbench";

fn link(chain: String, i: u64) -> Outgoing {
    let subject = format!("{BENCH_PREFIX}.{chain}.{i}");
    let msg_id = format!("bench:{chain}:{i}");
    let payload = serde_json::to_vec(&Link {
        chain,
        i,
        sent_us: now_ns() / 1_000,
    })
    .expect("serializable");
    Outgoing {
        subject,
        msg_id,
        payload: Bytes::from(payload),
    }
}

fn new_chain() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

struct Bare {
    js: async_nats::jetstream::Context,
    phase: AtomicU8,
    consumed: AtomicU64,
    chains: AtomicU64,
    /// Chains that ended after the stop (so none is left in flight).
    ended: AtomicU64,
    latencies: Mutex<Vec<u64>>,
}

async fn bare_step(bare: &Bare, delivery: Delivery) -> Result<(), HandlerError> {
    let at = now_ns() / 1_000;
    let l: Link = serde_json::from_slice(&delivery.payload)
        .map_err(|e| HandlerError::Permanent(e.to_string()))?;
    let phase = bare.phase.load(Ordering::Relaxed);
    if phase == MEASURING {
        bare.latencies
            .lock()
            .unwrap()
            .push(at.saturating_sub(l.sent_us));
        bare.consumed.fetch_add(1, Ordering::Relaxed);
        if l.i + 1 == STEPS {
            bare.chains.fetch_add(1, Ordering::Relaxed);
        }
    }
    if phase == STOPPING {
        bare.ended.fetch_add(1, Ordering::Relaxed);
        return Ok(());
    }
    let next = if l.i + 1 == STEPS {
        link(new_chain(), 0)
    } else {
        link(l.chain, l.i + 1)
    };
    jetstream::publish(&bare.js, next)
        .await
        .map_err(|e| HandlerError::Retry(e.to_string()))?;
    Ok(())
}

async fn baseline(
    state: &inkwire_shared::AppState,
    config: &WorkflowsConfig,
    c: usize,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let js = &state.js;
    let mut stream = jetstream::desired_streams(&state.config)
        .into_iter()
        .find(|s| s.name == subjects::WF_STREAM)
        .ok_or_else(|| anyhow::anyhow!("no WF stream in the configuration"))?;
    stream.name = BENCH_STREAM.into();
    stream.subjects = vec![format!("{BENCH_PREFIX}.>")];
    stream.description = Some("inkwire bench workflows: the baseline's round trips".into());
    let _ = js.delete_stream(BENCH_STREAM).await;
    js.create_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("{BENCH_STREAM}: {e}"))?;
    let mut spec = engine::consumer_spec();
    spec.stream = BENCH_STREAM.into();
    spec.durable = "bench-bare-steps".into();
    spec.filter_subject = format!("{BENCH_PREFIX}.>");
    let bare = Arc::new(Bare {
        js: js.clone(),
        phase: AtomicU8::new(WARMING),
        consumed: AtomicU64::new(0),
        chains: AtomicU64::new(0),
        ended: AtomicU64::new(0),
        latencies: Mutex::default(),
    });
    let (trigger, shutdown) = ShutdownTrigger::new();
    let b = bare.clone();
    let runner = tokio::spawn(consumer::run_concurrent(
        js.clone(),
        spec,
        move |delivery| {
            let b = b.clone();
            async move { bare_step(&b, delivery).await }
        },
        config.concurrency,
        shutdown,
    ));
    jetstream::publish_windowed(js, (0..c).map(|_| link(new_chain(), 0)), 512)
        .await
        .map_err(|e| anyhow::anyhow!("first links: {}", e.error))?;
    tokio::time::sleep(WARMUP).await;
    bare.phase.store(MEASURING, Ordering::Relaxed);
    let started = Instant::now();
    let cpu_from = cpu_times();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    bare.phase.store(STOPPING, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let cpu = cores_between(cpu_from, cpu_times());
    let deadline = Instant::now() + Duration::from_secs(30);
    while bare.ended.load(Ordering::Relaxed) < c as u64 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "baseline: {} of {c} chains ended 30 s after the stop",
            bare.ended.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    trigger.trigger();
    runner.await??;
    js.delete_stream(BENCH_STREAM).await?;
    let latencies = std::mem::take(&mut *bare.latencies.lock().unwrap());
    Ok(Figures {
        events: bare.consumed.load(Ordering::Relaxed),
        runs: bare.chains.load(Ordering::Relaxed),
        seconds: secs,
        histogram: histogram_of(&latencies),
        cpu,
    })
}

// ---- engine ----

async fn start_one(engine: Engine, loaded: Arc<Loaded>) -> anyhow::Result<String> {
    let (run, _) = engine::start_run(
        &engine,
        &loaded,
        StartRequest {
            trigger: json!({"kind": "manual"}),
            started_by: "bench".into(),
            once: None,
        },
    )
    .await?;
    Ok(run)
}

/// Runs `c` runs at a time for the warm-up and `seconds`, then lets the last ones end.
async fn engine_load(
    state: &inkwire_shared::AppState,
    engine: &Engine,
    loaded: &Arc<Loaded>,
    c: usize,
    seconds: u64,
) -> anyhow::Result<Figures> {
    let latencies = engine
        .latencies
        .clone()
        .ok_or_else(|| anyhow::anyhow!("the engine keeps no latencies"))?;
    let ended_subject = |t: &str| subjects::event_subject(Category::Automation, t);
    let completed = state
        .nats
        .subscribe(ended_subject("workflow_completed"))
        .await?;
    let failed = state
        .nats
        .subscribe(ended_subject("workflow_failed"))
        .await?;
    let mut ended_events = futures::stream::select(completed, failed);
    let mut redis = state.redis.clone();
    let mut starts = FuturesUnordered::new();
    for _ in 0..c {
        starts.push(start_one(engine.clone(), loaded.clone()));
    }
    let mut in_flight: HashSet<String> = HashSet::new();
    // Runs whose end was seen before their start answered (or after the poll had seen it).
    let mut ended_first: HashSet<String> = HashSet::new();
    let mut phase = WARMING;
    let mut runs = 0u64;
    let mut measured_from = Instant::now();
    let mut secs = 0.0;
    let (mut cpu_from, mut cpu) = (None, None);
    // The watcher looks at every run once, its grace after the start: a warm-up of the grace
    // and a second puts that share of the work in the measured time, as in a steady state.
    let mut next_phase = tokio::time::Instant::now() + engine.config.watch_grace + WARMUP;
    let mut poll = tokio::time::interval(Duration::from_millis(500));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_deadline = None;
    let mut ended: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            Some(r) = starts.next(), if !starts.is_empty() => {
                let run = r?;
                if ended_first.remove(&run) {
                    ended.push(run);
                } else {
                    in_flight.insert(run);
                }
            }
            Some(msg) = ended_events.next() => {
                let event: Value = serde_json::from_slice(&msg.payload)?;
                let run = event["data"]["executionId"].as_str().unwrap_or_default().to_string();
                anyhow::ensure!(
                    event["type"] != "workflow_failed",
                    "run {run} failed: {}", event["data"]
                );
                if in_flight.remove(&run) {
                    ended.push(run);
                } else {
                    ended_first.insert(run);
                }
            }
            _ = poll.tick() => {
                let ids: Vec<String> = in_flight.iter().cloned().collect();
                if !ids.is_empty() {
                    let mut pipe = redis::pipe();
                    for id in &ids {
                        pipe.hget(store::run_key(id), "status");
                    }
                    let statuses: Vec<Option<String>> = pipe.query_async(&mut redis).await?;
                    for (id, s) in ids.into_iter().zip(statuses) {
                        match s.as_deref() {
                            Some(store::status::COMPLETED) => {
                                in_flight.remove(&id);
                                ended.push(id);
                            }
                            Some(store::status::RUNNING) => {}
                            other => anyhow::bail!("run {id} is {other:?}"),
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(next_phase), if phase != STOPPING => {
                if phase == WARMING {
                    phase = MEASURING;
                    latencies.lock().unwrap().clear();
                    measured_from = Instant::now();
                    cpu_from = cpu_times();
                    next_phase += Duration::from_secs(seconds);
                } else {
                    phase = STOPPING;
                    secs = measured_from.elapsed().as_secs_f64();
                    cpu = cores_between(cpu_from, cpu_times());
                    drain_deadline = Some(Instant::now() + Duration::from_secs(30));
                }
            }
        }
        for _ in ended.drain(..) {
            match phase {
                MEASURING => runs += 1,
                STOPPING => continue,
                _ => {}
            }
            starts.push(start_one(engine.clone(), loaded.clone()));
        }
        if phase == STOPPING {
            if starts.is_empty() && in_flight.is_empty() {
                break;
            }
            anyhow::ensure!(
                drain_deadline.is_some_and(|d| Instant::now() < d),
                "{} runs still running 30 s after the stop",
                in_flight.len()
            );
        }
    }
    // The watcher's looks at the last runs, so that they do not weigh on the next phase.
    let deadline = Instant::now() + engine.config.watch_grace + Duration::from_secs(30);
    loop {
        let due: u64 = redis::cmd("ZCARD")
            .arg(store::watch_key())
            .query_async(&mut redis)
            .await?;
        if due == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{due} runs still in the watcher's queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Figures {
        events: runs * STEPS,
        runs,
        seconds: secs,
        histogram: histogram_of(&std::mem::take(&mut *latencies.lock().unwrap())),
        cpu,
    })
}

fn row(scenario: String, c: usize, f: &Figures, baseline_rate: f64) -> WorkflowsResult {
    let rate = f.events as f64 / f.seconds;
    WorkflowsResult {
        bench: "workflows",
        scenario,
        runs_in_flight: c,
        events: f.events,
        seconds: f.seconds,
        events_per_sec: rate,
        runs: f.runs,
        runs_per_sec: f.runs as f64 / f.seconds,
        ratio_to_baseline: rate / baseline_rate,
        baseline_events_per_sec: baseline_rate,
        p50_ms: f.histogram.quantile_ms(0.50),
        p95_ms: f.histogram.quantile_ms(0.95),
        p99_ms: f.histogram.quantile_ms(0.99),
        max_ms: f.histogram.max_ms(),
        latency_samples: f.histogram.count(),
        cpu: f.cpu,
    }
}

pub async fn run(args: WorkflowsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.runs_in_flight.is_empty() && args.runs_in_flight.iter().all(|c| *c >= 1),
        "--runs-in-flight: one or more numbers, each at least 1"
    );
    anyhow::ensure!(args.seconds >= 1, "--seconds must be at least 1");
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-workflows",
    )
    .await?;
    let state = bench.state.clone();
    // The deployment's settings (`INKWIRE_WORKFLOW_*`), as `workflows-worker` reads them.
    let config = WorkflowsConfig::from_env()?;
    let definition = inkwire_workflows::parse_definition(&definition())
        .map_err(|e| anyhow::anyhow!("the bench's definition: {e:?}"))?;
    let mut redis = state.redis.clone();
    registry::register(&mut redis, &definition, "bench").await?;
    let mut engine = Engine::new(state.js.clone(), state.redis.clone(), config.clone());
    engine.latencies = Some(Arc::default());
    let loaded = engine.definition(WORKFLOW, 1).await?;
    let (trigger, shutdown) = ShutdownTrigger::new();
    let worker = tokio::spawn(inkwire_workflows::run_worker(engine.clone(), shutdown));

    let mut results = Vec::new();
    for &c in &args.runs_in_flight {
        let bare = baseline(&state, &config, c, args.seconds).await?;
        let bare_rate = bare.events as f64 / bare.seconds;
        results.push(row(
            format!("baseline: bare JetStream round trip, {c} chains"),
            c,
            &bare,
            bare_rate,
        ));
        let ours = engine_load(&state, &engine, &loaded, c, args.seconds).await?;
        results.push(row(
            format!("engine: 10-step DAG, {c} runs in flight"),
            c,
            &ours,
            bare_rate,
        ));
    }
    trigger.trigger();
    worker.await??;
    bench.stop().await;

    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<52} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8}  cores: inkwire/nats/redis/other",
            "scenario",
            "events",
            "events/s",
            "runs/s",
            "ratio",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
        );
        for r in &results {
            let cpu = r
                .cpu
                .map(|c| {
                    format!(
                        "{:.2}/{:.2}/{:.2}/{:.2}",
                        c.inkwire, c.nats_server, c.redis_server, c.other
                    )
                })
                .unwrap_or_else(|| "-".into());
            println!(
                "{:<52} {:>8} {:>9.0} {:>7.0} {:>6.2}x {:>7.2} {:>7.2} {:>7.2} {:>8.2}  {cpu}",
                r.scenario,
                r.events,
                r.events_per_sec,
                r.runs_per_sec,
                r.ratio_to_baseline,
                r.p50_ms,
                r.p95_ms,
                r.p99_ms,
                r.max_ms
            );
        }
        println!(
            "  events: steps (engine) or messages (baseline) in {} s; latency: step ready → \
             handler start (engine), publish → handler start (baseline); targets: ≥ 2,000 \
             steps/s, p95 dispatch < 10 ms",
            args.seconds
        );
    }
    Ok(())
}
