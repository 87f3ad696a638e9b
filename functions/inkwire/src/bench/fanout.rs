//! `inkwire bench fanout`: N WebSocket clients on one project channel, R messages per second.
//!
//! Two scenarios in one run, with the same client process:
//! (a) baseline — a bare broadcast server: tokio + tungstenite (the library under the
//!     relay), no authentication, no NATS, a bounded queue per connection;
//! (b) relay — the real relay: JWT upgrade, permission check per subscription, messages
//!     published to JetStream and fanned out through NATS.
//! The clients run in a child process (`inkwire bench fanout-clients`), because one process
//! may only hold 20,000 files here. Reported: deliveries per second, publish-to-receive
//! latency (p50/p99/max), messages lost, and the server's resident memory per idle
//! connection.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures::{SinkExt, StreamExt};
use inkwire_relay::RelayConfig;
use inkwire_shared::AppState;
use inkwire_shared::auth::JwtKeys;
use inkwire_shared::channels::{self, Channel, MessageType};
use inkwire_shared::membership::{self, ProjectRole};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::histogram::Histogram;

const PROJECT: &str = "bench-fanout";
pub(super) const USER_PREFIX: &str = "fan-";

#[derive(Args)]
pub struct FanoutArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// WebSocket clients on the channel.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Messages published per second.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// How long to publish.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Use this Redis server instead of starting one.
    #[arg(long)]
    redis_url: Option<String>,
    /// Run only the relay scenario (for profiling; no ratio is reported).
    #[arg(long)]
    relay_only: bool,
}

/// The client process (started by `bench fanout`).
#[derive(Args)]
pub struct ClientsArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    connections: usize,
    #[arg(long)]
    channel: String,
    /// Messages each client expects.
    #[arg(long)]
    expect: u64,
    /// Talk to the bare broadcast server (no token, no subscribe).
    #[arg(long)]
    bare: bool,
    /// Give up this many seconds after the first message.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct ClientsSummary {
    pub connected: u64,
    pub failed: u64,
    pub received: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub last_receive_ns: u64,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct FanoutResult {
    bench: &'static str,
    scenario: &'static str,
    connections: u64,
    rate: u64,
    seconds: u64,
    published: u64,
    expected_deliveries: u64,
    deliveries: u64,
    lost: u64,
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_per_connection_bytes: u64,
    ratio_to_baseline: f64,
    baseline_deliveries_per_sec: f64,
}

pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Resident memory of this process in bytes.
pub(super) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Small buffers for idle connections, as the relay uses (the default 128 KiB read buffer is
/// zeroed on every read, which costs a bench client more than parsing its frames).
pub(super) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
}

pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.connections >= 1 && args.rate >= 1 && args.seconds >= 1,
        "connections, rate and seconds must be at least 1"
    );
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-fanout",
    )
    .await?;
    let state = bench.state.clone();
    // A project always has an owner first.
    membership::set_member(
        &mut state.redis.clone(),
        PROJECT,
        "bench-owner",
        Some(ProjectRole::Owner),
    )
    .await?;
    let users: Vec<String> = (0..args.connections)
        .map(|i| format!("{USER_PREFIX}{i}"))
        .collect();
    futures::stream::iter(users.iter())
        .map(|u| {
            let mut redis = state.redis.clone();
            async move {
                membership::set_member(&mut redis, PROJECT, u, Some(ProjectRole::Reader)).await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;

    let mut scenarios = Vec::new();
    if !args.relay_only {
        scenarios.push(scenario_bare(&args).await?);
    }
    scenarios.push(scenario_relay(&args, &state).await?);
    let base_rate = if args.relay_only {
        0.0
    } else {
        scenarios[0].deliveries_per_sec
    };
    let results: Vec<FanoutResult> = scenarios
        .into_iter()
        .map(|mut r| {
            r.baseline_deliveries_per_sec = base_rate;
            r.ratio_to_baseline = if base_rate > 0.0 {
                r.deliveries_per_sec / base_rate
            } else {
                0.0
            };
            r
        })
        .collect();
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
    } else {
        println!(
            "{:<28} {:>7} {:>12} {:>8} {:>13} {:>8} {:>8} {:>8} {:>11} {:>7}",
            "scenario",
            "conns",
            "deliveries",
            "lost",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "B/conn idle",
            "ratio"
        );
        for r in &results {
            println!(
                "{:<28} {:>7} {:>12} {:>8} {:>13.0} {:>8.2} {:>8.2} {:>8.2} {:>11} {:>6.2}x",
                r.scenario,
                r.connections,
                r.deliveries,
                r.lost,
                r.deliveries_per_sec,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.rss_per_connection_bytes,
                r.ratio_to_baseline
            );
        }
        println!(
            "  {} messages/s for {} s to one channel; latency is publish→receive in the client process",
            args.rate, args.seconds
        );
    }
    bench.stop().await;
    Ok(())
}

/// Where and how the client process connects.
pub(super) struct ClientsPlan<'a> {
    pub url: &'a str,
    /// The channel every client subscribes to (`project:…`, `room:…`).
    pub channel: &'a str,
    pub connections: usize,
    /// Messages each client waits for.
    pub expect: u64,
    /// Talk to a bare broadcast server (no token, no subscribe).
    pub bare: bool,
    pub secret: &'a str,
}

/// Starts the client process and waits until every client is connected (and subscribed).
pub(super) async fn start_clients(
    plan: &ClientsPlan<'_>,
) -> anyhow::Result<(
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    u64,
)> {
    let exe = std::env::current_exe()?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args([
        "bench",
        "fanout-clients",
        "--url",
        plan.url,
        "--channel",
        plan.channel,
    ])
    .args([
        "--connections",
        &plan.connections.to_string(),
        "--expect",
        &plan.expect.to_string(),
    ])
    .env("INKWIRE_JWT_SECRET", plan.secret)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit())
    .kill_on_drop(true);
    if plan.bare {
        cmd.arg("--bare");
    }
    let mut child = cmd.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let ready = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("client process ended before connecting"))?;
    let connected: u64 = ready
        .strip_prefix("ready ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected line from clients: {ready}"))?;
    Ok((child, lines, connected))
}

pub(super) async fn finish_clients(
    mut child: tokio::process::Child,
    mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> anyhow::Result<ClientsSummary> {
    let line = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("client process ended without a summary"))?;
    let summary: ClientsSummary =
        serde_json::from_str(line.strip_prefix("done ").unwrap_or(&line))?;
    let _ = child.wait().await;
    Ok(summary)
}

fn result(
    scenario: &'static str,
    args: &FanoutArgs,
    summary: &ClientsSummary,
    first_publish_ns: u64,
    rss_per_connection: u64,
) -> FanoutResult {
    let published = args.rate * args.seconds;
    let expected = published * summary.connected;
    let span = (summary.last_receive_ns.saturating_sub(first_publish_ns)) as f64 / 1e9;
    FanoutResult {
        bench: "fanout",
        scenario,
        connections: summary.connected,
        rate: args.rate,
        seconds: args.seconds,
        published,
        expected_deliveries: expected,
        deliveries: summary.received,
        lost: expected.saturating_sub(summary.received) + summary.failed * published,
        deliveries_per_sec: if span > 0.0 {
            summary.received as f64 / span
        } else {
            0.0
        },
        p50_ms: summary.p50_ms,
        p99_ms: summary.p99_ms,
        max_ms: summary.max_ms,
        rss_per_connection_bytes: rss_per_connection,
        ratio_to_baseline: 0.0,
        baseline_deliveries_per_sec: 0.0,
    }
}

/// Publishes `rate` messages per second for `seconds` through `send`; returns the first
/// publish time.
async fn paced<F, Fut>(args: &FanoutArgs, mut send: F) -> anyhow::Result<u64>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let total = args.rate * args.seconds;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let start = Instant::now();
    let first = now_ns();
    for n in 0..total {
        tokio::time::sleep_until((start + interval * n as u32).into()).await;
        send(n).await?;
    }
    Ok(first)
}

/// A bare broadcast server: tokio + tungstenite (the library under the relay), no
/// authentication, no NATS, a bounded queue per connection. The baseline of `fanout` and
/// `chat`.
pub(super) struct BareBroadcast {
    pub url: String,
    senders: Arc<std::sync::Mutex<Vec<mpsc::Sender<Message>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl BareBroadcast {
    pub async fn start() -> anyhow::Result<BareBroadcast> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("ws://{}/", listener.local_addr()?);
        let senders: Arc<std::sync::Mutex<Vec<mpsc::Sender<Message>>>> = Arc::default();
        let accept_senders = senders.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let senders = accept_senders.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let Ok(ws) =
                        tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await
                    else {
                        return;
                    };
                    let (mut sink, mut stream) = ws.split();
                    let (tx, mut rx) = mpsc::channel::<Message>(1024);
                    senders.lock().expect("senders").push(tx);
                    loop {
                        tokio::select! {
                            m = rx.recv() => {
                                let Some(m) = m else { break };
                                if sink.feed(m).await.is_err() { break }
                                while let Ok(m) = rx.try_recv() {
                                    if sink.feed(m).await.is_err() { return }
                                }
                                if sink.flush().await.is_err() { break }
                            }
                            incoming = stream.next() => if incoming.is_none() { break },
                        }
                    }
                });
            }
        });
        Ok(BareBroadcast {
            url,
            senders,
            accept,
        })
    }

    /// Queues `msg` for every connection; a full queue drops it (as the relay's would end
    /// the connection).
    pub fn offer(&self, msg: &Message) {
        for tx in self.senders.lock().expect("senders").iter() {
            let _ = tx.try_send(msg.clone());
        }
    }

    /// Queues `msg` for every connection, waiting for room in each queue.
    pub async fn send(&self, msg: &Message) {
        let senders = self.senders.lock().expect("senders").clone();
        for tx in senders {
            let _ = tx.send(msg.clone()).await;
        }
    }

    pub fn stop(self) {
        self.accept.abort();
        self.senders.lock().expect("senders").clear();
    }
}

async fn scenario_bare(args: &FanoutArgs) -> anyhow::Result<FanoutResult> {
    let bare = BareBroadcast::start().await?;
    let rss_before = rss_bytes();
    let channel = format!("project:{PROJECT}");
    let (child, lines, connected) = start_clients(&ClientsPlan {
        url: &bare.url,
        channel: &channel,
        connections: args.connections,
        expect: args.rate * args.seconds,
        bare: true,
        secret: "unused-by-the-bare-server",
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_conn = rss_bytes().saturating_sub(rss_before) / connected.max(1);
    let first = paced(args, |n| {
        let frame = json!({"op": "message", "channel": format!("project:{PROJECT}"), "seq": n + 1, "type": "system",
            "data": {"n": n, "sentNs": now_ns()}, "ts": "2026-11-21T10:00:00Z"})
        .to_string();
        bare.offer(&Message::Text(frame.into()));
        async { Ok(()) }
    })
    .await?;
    let summary = finish_clients(child, lines).await?;
    bare.stop();
    Ok(result(
        "baseline: bare broadcast",
        args,
        &summary,
        first,
        per_conn,
    ))
}

async fn scenario_relay(args: &FanoutArgs, state: &AppState) -> anyhow::Result<FanoutResult> {
    let relay_config = RelayConfig {
        max_connections_per_user: 10,
        ..RelayConfig::default()
    };
    let settings = inkwire::Settings {
        relay: relay_config,
        // The clients' own presence_update frames on the project channel are not fan-out.
        without_presence_worker: true,
        without_analytics_worker: true,
        ..Default::default()
    };
    let served = super::Served::start(state, settings).await?;
    let url = format!("ws://{}/ws/collaboration", served.addr);
    let rss_before = rss_bytes();
    let channel = format!("project:{PROJECT}");
    let (child, lines, connected) = start_clients(&ClientsPlan {
        url: &url,
        channel: &channel,
        connections: args.connections,
        expect: args.rate * args.seconds,
        bare: false,
        secret: &state.config.jwt_secret,
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let per_conn = rss_bytes().saturating_sub(rss_before) / connected.max(1);
    let channel = Channel::parse(&channel)?;
    let js = state.js.clone();
    let first = paced(args, |n| {
        let js = js.clone();
        let channel = channel.clone();
        async move {
            let data = json!({"n": n, "sentNs": now_ns()});
            channels::publish(
                &js,
                &channel,
                MessageType::System,
                &data,
                format!("fanout-{}-{n}", now_ns()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(())
        }
    })
    .await?;
    let summary = finish_clients(child, lines).await?;
    served.stop().await;
    Ok(result(
        "relay: NATS + auth + recovery",
        args,
        &summary,
        first,
        per_conn,
    ))
}

#[derive(Deserialize)]
struct Frame {
    op: String,
    #[serde(default)]
    data: Option<FrameData>,
}

/// A frame's data: `sentNs` (fanout), or a chat message whose text is the send time in
/// nanoseconds (`chat`).
#[derive(Deserialize)]
struct FrameData {
    #[serde(rename = "sentNs", default)]
    sent_ns: Option<u64>,
    #[serde(default)]
    message: Option<ChatMessage>,
}

#[derive(Deserialize)]
struct ChatMessage {
    text: String,
}

impl FrameData {
    fn sent_ns(&self) -> Option<u64> {
        self.sent_ns
            .or_else(|| self.message.as_ref().and_then(|m| m.text.parse().ok()))
    }
}

/// The client process: connects, subscribes, reports `ready`, records every message, and
/// prints `done {summary}` when every client has its messages (or on timeout).
pub async fn clients(args: ClientsArgs) -> anyhow::Result<()> {
    let secret = std::env::var("INKWIRE_JWT_SECRET")
        .unwrap_or_else(|_| inkwire_shared::config::DEV_JWT_SECRET.to_string());
    let keys = Arc::new(JwtKeys::hs256(&secret));
    let histogram = Arc::new(Histogram::default());
    let received = Arc::new(AtomicU64::new(0));
    let complete = Arc::new(AtomicU64::new(0));
    let last_receive = Arc::new(AtomicU64::new(0));
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(args.connections);
    let gate = Arc::new(tokio::sync::Semaphore::new(128));
    for i in 0..args.connections {
        let (keys, histogram, received, complete, last_receive, ready_tx, gate) = (
            keys.clone(),
            histogram.clone(),
            received.clone(),
            complete.clone(),
            last_receive.clone(),
            ready_tx.clone(),
            gate.clone(),
        );
        let (url, channel, bare, expect) = (
            args.url.clone(),
            args.channel.clone(),
            args.bare,
            args.expect,
        );
        tokio::spawn(async move {
            let permit = gate.acquire_owned().await.expect("semaphore");
            let url = if bare {
                url
            } else {
                format!(
                    "{url}?token={}",
                    keys.issue(&format!("{USER_PREFIX}{i}"), &[], Duration::from_secs(3600))
                )
            };
            let Ok((mut ws, _)) =
                tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true).await
            else {
                let _ = ready_tx.send(false).await;
                return;
            };
            if !bare {
                let subscribe = json!({"op": "subscribe", "channel": channel}).to_string();
                let ok = async {
                    ws.next().await?.ok()?; // welcome
                    ws.send(Message::Text(subscribe.into())).await.ok()?;
                    let answer = ws.next().await?.ok()?;
                    answer
                        .to_text()
                        .ok()?
                        .contains("\"subscribed\"")
                        .then_some(())
                }
                .await;
                if ok.is_none() {
                    let _ = ready_tx.send(false).await;
                    return;
                }
            }
            drop(permit);
            let _ = ready_tx.send(true).await;
            drop(ready_tx);
            let mut mine = 0u64;
            while let Some(Ok(msg)) = ws.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(frame) = serde_json::from_str::<Frame>(&text) else {
                    continue;
                };
                if frame.op != "message" {
                    continue;
                }
                if let Some(sent) = frame.data.as_ref().and_then(FrameData::sent_ns) {
                    let now = now_ns();
                    histogram.record(Duration::from_nanos(now.saturating_sub(sent)));
                    last_receive.fetch_max(now, Ordering::Relaxed);
                }
                received.fetch_add(1, Ordering::Relaxed);
                mine += 1;
                if mine == expect {
                    complete.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    drop(ready_tx);
    let (mut connected, mut failed) = (0u64, 0u64);
    // Every client task reports once (and keeps its sender), so count the reports.
    while connected + failed < args.connections as u64 {
        match ready_rx.recv().await {
            Some(true) => connected += 1,
            Some(false) => failed += 1,
            None => break,
        }
    }
    println!("ready {connected} {failed}");
    // Wait for every connected client to have its messages; give up `timeout` seconds after
    // the first one arrived, or when nothing has arrived for 10 s.
    let mut first_seen: Option<Instant> = None;
    let mut last_count = 0;
    let mut last_progress = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = received.load(Ordering::Relaxed);
        if n > 0 && first_seen.is_none() {
            first_seen = Some(Instant::now());
        }
        if n != last_count {
            last_count = n;
            last_progress = Instant::now();
        }
        let done = complete.load(Ordering::Relaxed) >= connected;
        let timed_out = first_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(args.timeout))
            || (first_seen.is_some() && last_progress.elapsed() > Duration::from_secs(10));
        if done || timed_out {
            break;
        }
    }
    let summary = ClientsSummary {
        connected,
        failed,
        received: received.load(Ordering::Relaxed),
        p50_ms: histogram.quantile_ms(0.50),
        p99_ms: histogram.quantile_ms(0.99),
        max_ms: histogram.max_ms(),
        last_receive_ns: last_receive.load(Ordering::Relaxed),
    };
    println!("done {}", serde_json::to_string(&summary)?);
    std::process::exit(0);
}
