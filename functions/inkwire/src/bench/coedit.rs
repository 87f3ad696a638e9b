//! `inkwire bench coedit`: co-editing with stock Yjs clients — `--docs` documents with
//! `--clients` y-websocket clients each, typing single characters at an editor's pace and
//! moving their awareness cursors — against inkwire's `/ws/docs` and, on the same load in the
//! same run, against the reference server `@y/websocket-server` (the peer baseline).
//!
//! The clients are one Node.js process (`tests/peers/coedit-load.mjs`, stock `yjs` +
//! `y-websocket`), so both servers meet the very same client code. Two loads per server:
//! - pace: `--rate` characters per second per client; latency from a client's insert until
//!   each other client of the document has it (p50 / p99 / max);
//! - throughput: `--burst-rate` characters per second per client (more than the servers can
//!   carry on this machine); updates delivered to other clients per second.
//!
//! Memory per loaded document is the growth of the server process's resident memory from
//! before the clients connected to the highest reading while they typed, divided by the
//! documents. The bench fails unless every update reached every other client and every
//! client of a document ends with the same text (zero lost updates).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clap::Args;
use inkwire_shared::membership::{self, ProjectRole};
use serde::Deserialize;
use serde_json::json;
use tokio::process::Command;

use super::report::{ScenarioResult, print};

#[derive(Args)]
pub struct CoeditArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Documents edited at once.
    #[arg(long, default_value_t = 50)]
    docs: usize,
    /// Clients per document.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Characters per second each client types in the pace scenario.
    #[arg(long, default_value_t = 5)]
    rate: u32,
    /// Characters per second each client tries to type in the throughput scenario.
    #[arg(long, default_value_t = 100)]
    burst_rate: u32,
    /// How long the clients type in each scenario.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Where `coedit-load.mjs` and its `node_modules` are (default: the source tree's
    /// `tests/peers`).
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

/// What `coedit-load.mjs` prints.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoadOutcome {
    sent: u64,
    received: u64,
    expected: u64,
    seconds: f64,
    delivered_seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    converged: bool,
}

/// One server's figures on both loads.
struct Measured {
    pace: LoadOutcome,
    burst: LoadOutcome,
    /// Resident memory growth per document while the documents were loaded, in bytes.
    memory_per_doc: f64,
}

fn default_peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/peers")
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
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

/// Runs the Node clients with `load` and samples `server_pid`'s memory meanwhile; returns
/// what they measured and the highest memory reading.
async fn run_load(
    peers: &Path,
    load: serde_json::Value,
    server_pid: u32,
) -> anyhow::Result<(LoadOutcome, u64)> {
    let child = Command::new("node")
        .arg(peers.join("coedit-load.mjs"))
        .arg(load.to_string())
        .current_dir(peers)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting node (is Node.js installed?): {e}"))?;
    let mut peak = rss(server_pid);
    let wait = child.wait_with_output();
    tokio::pin!(wait);
    let output = loop {
        tokio::select! {
            out = &mut wait => break out?,
            _ = tokio::time::sleep(Duration::from_millis(100)) => peak = peak.max(rss(server_pid)),
        }
    };
    anyhow::ensure!(
        output.status.success(),
        "the Yjs clients failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| anyhow::anyhow!("the Yjs clients printed no result: {stdout}"))?;
    let outcome: LoadOutcome = serde_json::from_str(line)?;
    anyhow::ensure!(
        outcome.converged && outcome.received == outcome.expected,
        "lost updates: {} of {} delivered, converged: {}",
        outcome.received,
        outcome.expected,
        outcome.converged
    );
    Ok((outcome, peak))
}

/// Both loads against one server: `base` is its `ws://…/ws/docs`, `docs` the document ids
/// with one token per client, `prefix` makes each load's documents new.
async fn measure(
    args: &CoeditArgs,
    peers: &Path,
    base: &str,
    docs: impl Fn(&str) -> serde_json::Value,
    server_pid: u32,
) -> anyhow::Result<Measured> {
    let before = rss(server_pid);
    let load = |prefix: &str, rate: u32| {
        json!({"base": base, "docs": docs(prefix), "rate": rate, "seconds": args.seconds,
            "settleMs": 5000})
    };
    let (pace, peak) = run_load(peers, load("pace", args.rate), server_pid).await?;
    let memory_per_doc = peak.saturating_sub(before) as f64 / args.docs as f64;
    let (burst, _) = run_load(peers, load("burst", args.burst_rate), server_pid).await?;
    Ok(Measured {
        pace,
        burst,
        memory_per_doc,
    })
}

/// The reference server, `@y/websocket-server`, on a free port.
async fn start_reference(peers: &Path) -> anyhow::Result<(tokio::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let server = peers.join("node_modules/@y/websocket-server/src/server.js");
    anyhow::ensure!(
        server.exists(),
        "{} is missing: run `npm ci` in {}",
        server.display(),
        peers.display()
    );
    let child = Command::new("node")
        .arg(server)
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the reference server did not listen on port {port}")
}

pub async fn run(args: CoeditArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.docs >= 1 && args.clients >= 2 && args.seconds >= 1,
        "--docs must be at least 1, --clients at least 2, --seconds at least 1"
    );
    anyhow::ensure!(
        args.rate >= 1 && args.burst_rate >= 1,
        "--rate and --burst-rate must be at least 1"
    );
    let peers = args.peers_dir.clone().unwrap_or_else(default_peers_dir);
    anyhow::ensure!(
        peers.join("node_modules/y-websocket").exists(),
        "no Yjs clients in {}: run `npm ci` there (infra/install-servers.sh does)",
        peers.display()
    );

    // The peer first, on its own: nothing of inkwire runs yet.
    let (mut reference, port) = start_reference(&peers).await?;
    let reference_pid = reference.id().unwrap_or(0);
    let peer =
        measure(
            &args,
            &peers,
            &format!("ws://127.0.0.1:{port}/ws/docs"),
            |prefix| {
                json!((0..args.docs)
                .map(|d| json!({"id": format!("{prefix}-{d}"), "tokens": vec![""; args.clients]}))
                .collect::<Vec<_>>())
            },
            reference_pid,
        )
        .await?;
    let _ = reference.kill().await;

    // inkwire, in this process.
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-coedit",
    )
    .await?;
    let state = bench.state.clone();
    let mut redis = state.redis.clone();
    let users: Vec<String> = (0..args.clients).map(|c| format!("bench-c-{c}")).collect();
    // A project is created by its first owner; the typing clients are editors.
    membership::set_member(
        &mut redis,
        "bench-coedit",
        "bench-owner",
        Some(ProjectRole::Owner),
    )
    .await?;
    for user in &users {
        membership::set_member(&mut redis, "bench-coedit", user, Some(ProjectRole::Editor)).await?;
    }
    for prefix in ["pace", "burst"] {
        for d in 0..args.docs {
            membership::register_document(&mut redis, "bench-coedit", &format!("{prefix}-{d}"))
                .await?
                .map_err(|e| anyhow::anyhow!("registering a document: {e:?}"))?;
        }
    }
    let tokens: Vec<String> = users
        .iter()
        .map(|u| state.jwt.issue(u, &[], Duration::from_secs(3600)))
        .collect();
    // The deployment's settings, without the presence and analytics workers (separate
    // processes in a deployment, as in the other benches): on these two cores they would
    // count and report this load instead of measuring it.
    let settings = inkwire::Settings {
        without_presence_worker: true,
        without_analytics_worker: true,
        ..inkwire::Settings::from_env()?
    };
    let served = super::Served::start(&state, settings).await?;
    let addr = served.addr;
    let ours = measure(
        &args,
        &peers,
        &format!("ws://{addr}/ws/docs"),
        |prefix| {
            json!(
                (0..args.docs)
                    .map(|d| json!({"id": format!("{prefix}-{d}"), "tokens": tokens}))
                    .collect::<Vec<_>>()
            )
        },
        std::process::id(),
    )
    .await?;
    served.stop().await;
    bench.stop().await;

    let load = format!(
        "{} documents × {} clients, stock yjs + y-websocket in one Node.js process",
        args.docs, args.clients
    );
    let row =
        |scenario: &str, o: &LoadOutcome, base: &LoadOutcome, latency: bool, notes: String| {
            let rate = o.received as f64 / o.delivered_seconds;
            let base_rate = base.received as f64 / base.delivered_seconds;
            ScenarioResult {
                bench: "coedit",
                scenario: scenario.to_string(),
                events: o.received,
                seconds: o.delivered_seconds,
                events_per_sec: rate,
                p50_ms: if latency { o.p50_ms } else { 0.0 },
                p99_ms: if latency { o.p99_ms } else { 0.0 },
                max_ms: if latency { o.max_ms } else { 0.0 },
                ratio_to_baseline: rate / base_rate,
                baseline_events_per_sec: base_rate,
                notes,
            }
        };
    let results = vec![
        row(
            &format!("reference server: {}/s per client", args.rate),
            &peer.pace,
            &peer.pace,
            true,
            format!(
                "@y/websocket-server 0.1.1; {load}; {} sent in {:.1} s; memory {:.1} KiB per \
                 document",
                peer.pace.sent,
                peer.pace.seconds,
                peer.memory_per_doc / 1024.0
            ),
        ),
        row(
            &format!("inkwire /ws/docs: {}/s per client", args.rate),
            &ours.pace,
            &peer.pace,
            true,
            format!(
                "{load}; {} sent in {:.1} s; memory {:.1} KiB per document ({:.2}× the \
                 reference's); every update reached every client, texts equal",
                ours.pace.sent,
                ours.pace.seconds,
                ours.memory_per_doc / 1024.0,
                ours.memory_per_doc / peer.memory_per_doc.max(1.0)
            ),
        ),
        row(
            &format!("reference server: {}/s per client", args.burst_rate),
            &peer.burst,
            &peer.burst,
            true,
            format!("{load}; {} sent", peer.burst.sent),
        ),
        row(
            &format!("inkwire /ws/docs: {}/s per client", args.burst_rate),
            &ours.burst,
            &peer.burst,
            true,
            format!(
                "{load}; {} sent; every update reached every client, texts equal",
                ours.burst.sent
            ),
        ),
    ];
    print(&results, args.json);
    Ok(())
}
