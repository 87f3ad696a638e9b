//! `inkwire bench presence`: `--editors` y-websocket connections over `--docs` documents,
//! moving their awareness cursors (Yjs relative positions, as editors send them) from
//! paragraph to paragraph; each document's editors take turns at `--rate` moves per second.
//!
//! Measured in the same run:
//! - baseline: move → the same awareness state arriving at another editor of the document
//!   (the plain y-websocket awareness relay, which every Yjs server does);
//! - presence: cursor moves per second carried, and move → conflict warning on `user:{id}`
//!   (p50 / p99 / max).
//!
//! Every warning is checked against a brute-force oracle that replays the same moves in the
//! same order with the rules written out afresh (same paragraph: high, neighbours: medium,
//! first time per pair and paragraph or when the severity rises): the bench fails when a
//! warning the oracle expects is missing or one it does not expect arrives. A document's
//! next move waits (besides the `1 / rate` pace) until the server relayed the previous one,
//! so the server sees each document's moves in the oracle's order even when it falls behind
//! (moves on different connections could otherwise be read in another order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use futures::{SinkExt, StreamExt};
use inkwire_shared::membership::{self, ProjectRole};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use yrs::sync::awareness::AwarenessUpdateEntry;
use yrs::sync::{AwarenessUpdate, Message};
use yrs::updates::decoder::Decode;
use yrs::updates::encoder::Encode;
use yrs::{Assoc, ClientID, Doc, ReadTxn, StickyIndex, Text, Transact};

use super::report::{ScenarioResult, percentiles, print};

#[derive(Args)]
pub struct PresenceArgs {
    /// One JSON object per scenario on stdout.
    #[arg(long)]
    json: bool,
    /// Documents.
    #[arg(long, default_value_t = 100)]
    docs: usize,
    /// Editors (connections), spread evenly over the documents.
    #[arg(long, default_value_t = 1000)]
    editors: usize,
    /// Cursor moves per editor.
    #[arg(long, default_value_t = 20)]
    moves: usize,
    /// Moves per second per document (its editors take turns).
    #[arg(long, default_value_t = 20)]
    rate: u32,
    /// Paragraphs per document.
    #[arg(long, default_value_t = 30)]
    paragraphs: u32,
    /// Seed of the moves.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    nats_url: Option<String>,
    #[arg(long)]
    redis_url: Option<String>,
}

const PROJECT: &str = "bench-presence";

/// A warning as the oracle expects it or the server sent it: document, the two users
/// (sorted), paragraph, severity.
type Key = (usize, String, String, u32, &'static str);

/// The oracle: per document, each editor's paragraph and what was warned.
#[derive(Default)]
struct Oracle {
    at: HashMap<usize, u32>,
    warned: HashMap<(usize, usize, u32), u8>,
}

impl Oracle {
    /// Editor `who` moved to `paragraph`: the warnings this must cause (other editor, place
    /// paragraph, severity).
    fn moved(&mut self, who: usize, paragraph: u32) -> Vec<(usize, u32, &'static str)> {
        self.at.insert(who, paragraph);
        let mut out = Vec::new();
        let others: Vec<(usize, u32)> = self
            .at
            .iter()
            .filter(|(o, _)| **o != who)
            .map(|(o, p)| (*o, *p))
            .collect();
        for (other, p) in others {
            let (rank, sev, place) = match paragraph.abs_diff(p) {
                0 => (3, "high", p),
                1 => (2, "medium", p.min(paragraph)),
                _ => continue,
            };
            let pair = (who.min(other), who.max(other), place);
            if self.warned.get(&pair).is_some_and(|r| *r >= rank) {
                continue;
            }
            self.warned.insert(pair, rank);
            out.push((other, place, sev));
        }
        out
    }
}

fn lcg(s: &mut u64) -> u64 {
    *s = s
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *s >> 33
}

fn awareness_frame(client: u64, clock: u32, state: &Value) -> Vec<u8> {
    let clients = [(
        ClientID::new(client),
        AwarenessUpdateEntry {
            clock,
            json: state.to_string().into(),
        },
    )]
    .into_iter()
    .collect();
    Message::Awareness(AwarenessUpdate { clients }).encode_v1()
}

/// Where awareness states sent by the bench arrived first at another editor.
type Seen = Arc<Mutex<HashMap<(u64, u32), Instant>>>;

pub async fn run(args: PresenceArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.docs >= 1 && args.editors >= 2 * args.docs && args.moves >= 1,
        "--docs at least 1, --editors at least two per document, --moves at least 1"
    );
    anyhow::ensure!(
        args.rate >= 1 && args.paragraphs >= 3,
        "--rate at least 1, --paragraphs at least 3"
    );
    let per_doc = args.editors / args.docs;
    let bench = super::BenchServers::start(
        args.nats_url.clone(),
        args.redis_url.clone(),
        "inkwire-bench-presence",
    )
    .await?;
    let state = bench.state.clone();
    let mut redis = state.redis.clone();
    membership::set_member(&mut redis, PROJECT, "bench-owner", Some(ProjectRole::Owner)).await?;
    let user = |d: usize, e: usize| format!("bp-{d}-{e}");
    for d in 0..args.docs {
        membership::register_document(&mut redis, PROJECT, &format!("bp-{d}"))
            .await?
            .map_err(|e| anyhow::anyhow!("registering a document: {e:?}"))?;
        for e in 0..per_doc {
            membership::set_member(&mut redis, PROJECT, &user(d, e), Some(ProjectRole::Editor))
                .await?;
        }
    }
    let mut settings = inkwire::Settings::from_env()?;
    // Longer than the run: every warning the oracle expects is the first of its kind.
    settings.coedit.conflict_interval = Duration::from_secs(3600);
    settings.coedit.max_connections_per_document = settings
        .coedit
        .max_connections_per_document
        .max(per_doc + 1);
    let served = super::Served::start(&state, settings).await?;
    let base = format!("ws://{}/ws/docs", served.addr);

    // The text: paragraphs written by the bench's own Yjs document (so its relative
    // positions are valid on the server), sent by the first editor of each document.
    let text: String = (0..args.paragraphs)
        .map(|p| format!("paragraph {p} of the bench document"))
        .collect::<Vec<_>>()
        .join("\n");
    let starts: Vec<u32> = std::iter::once(0)
        .chain(
            text.match_indices('\n')
                .map(|(i, _)| i as u32 + 1)
                .take(args.paragraphs as usize - 1),
        )
        .collect();
    let doc = Doc::new();
    let root = doc.get_or_insert_text("content");
    root.insert(&mut doc.transact_mut(), 0, &text);
    let fill = Message::Sync(yrs::sync::SyncMessage::Update(
        doc.transact()
            .encode_state_as_update_v1(&yrs::StateVector::default()),
    ))
    .encode_v1();
    let cursors: Vec<Value> = {
        let txn = doc.transact();
        starts
            .iter()
            .map(|s| {
                let sticky = StickyIndex::at(&txn, root_branch(&root), s + 2, Assoc::After)
                    .expect("inside the text");
                let j = serde_json::to_value(&sticky).expect("sticky indices serialize");
                json!({"cursor": {"anchor": j, "head": j}})
            })
            .collect()
    };

    // Warnings as they arrive.
    let warnings: Arc<Mutex<Vec<(Instant, String, Value)>>> = Arc::default();
    let mut sub = state.nats.subscribe("live.rt.user.>").await?;
    {
        let warnings = warnings.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let to = msg
                    .subject
                    .as_str()
                    .rsplit('.')
                    .next()
                    .unwrap_or("")
                    .to_string();
                if let Ok(v) = serde_json::from_slice::<Value>(&msg.payload)
                    && v["data"]["kind"] == "conflict_warning"
                {
                    warnings
                        .lock()
                        .unwrap()
                        .push((Instant::now(), to, v["data"].clone()));
                }
            }
        });
    }
    state.nats.flush().await?;

    // Connect every editor; readers note when a bench awareness state arrives elsewhere.
    let seen: Seen = Arc::default();
    let notifies: Vec<Arc<tokio::sync::Notify>> = (0..args.docs).map(|_| Arc::default()).collect();
    let mut sinks = Vec::new();
    for (d, doc_notify) in notifies.iter().enumerate() {
        let mut doc_sinks = Vec::new();
        for e in 0..per_doc {
            let token = state.jwt.issue(&user(d, e), &[], Duration::from_secs(3600));
            let url = format!("{base}/bp-{d}?token={token}");
            let (ws, _) = tokio_tungstenite::connect_async(url).await?;
            let (sink, mut stream) = ws.split();
            let seen = seen.clone();
            let notify = doc_notify.clone();
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let WsMessage::Binary(b) = msg else { continue };
                    if let Ok(Message::Awareness(a)) = Message::decode_v1(&b) {
                        let now = Instant::now();
                        let mut seen = seen.lock().unwrap();
                        for (c, entry) in a.clients {
                            seen.entry((c.get(), entry.clock)).or_insert(now);
                        }
                        drop(seen);
                        notify.notify_waiters();
                    }
                }
            });
            doc_sinks.push(sink);
        }
        doc_sinks[0]
            .send(WsMessage::Binary(fill.clone().into()))
            .await?;
        sinks.push(doc_sinks);
    }
    // Let every document take its text.
    tokio::time::sleep(Duration::from_secs(1)).await;
    warnings.lock().unwrap().clear();

    // The moves: documents in parallel, each document's editors in turn.
    let gap = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (d, mut doc_sinks) in sinks.into_iter().enumerate() {
        let cursors = cursors.clone();
        let moves = args.moves * per_doc;
        let paragraphs = args.paragraphs;
        let mut rng = args.seed ^ (d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let seen = seen.clone();
        let notify = notifies[d].clone();
        tasks.push(tokio::spawn(async move {
            let mut oracle = Oracle::default();
            let mut expected: Vec<(usize, usize, u32, &'static str, Instant)> = Vec::new();
            let mut sent: Vec<(u64, u32, Instant)> = Vec::new();
            let mut next = tokio::time::Instant::now();
            for m in 0..moves {
                let e = m % per_doc;
                let p = (lcg(&mut rng) % u64::from(paragraphs)) as u32;
                let client = (d * 10_000 + e + 1) as u64;
                let clock = (m / per_doc) as u32 + 1;
                let frame = awareness_frame(client, clock, &cursors[p as usize]);
                tokio::time::sleep_until(next).await;
                let at = Instant::now();
                if doc_sinks[e]
                    .send(WsMessage::Binary(frame.into()))
                    .await
                    .is_err()
                {
                    break;
                }
                sent.push((client, clock, at));
                for (other, place, sev) in oracle.moved(e, p) {
                    expected.push((e, other, place, sev, at));
                }
                next += gap;
                // Until the server relayed it (it evaluated it in the same step).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                loop {
                    let woken = notify.notified();
                    tokio::pin!(woken);
                    woken.as_mut().enable();
                    if seen.lock().unwrap().contains_key(&(client, clock)) {
                        break;
                    }
                    if tokio::time::timeout_at(deadline, woken).await.is_err() {
                        break;
                    }
                }
                next = next.max(tokio::time::Instant::now());
            }
            (d, expected, sent, doc_sinks)
        }));
    }
    let mut expected: HashMap<Key, Instant> = HashMap::new();
    let mut sent_all = Vec::new();
    let mut keep = Vec::new();
    for t in tasks {
        let (d, exp, sent, sinks) = t.await?;
        for (a, b, place, sev, at) in exp {
            let (x, y) = (user(d, a.min(b)), user(d, a.max(b)));
            expected.insert((d, x, y, place, sev), at);
        }
        sent_all.extend(sent);
        keep.push(sinks);
    }
    let moving = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Compare with the oracle: each warning is two frames, one on each user's channel.
    let mut received: HashMap<Key, (Instant, u32)> = HashMap::new();
    for (at, to, w) in warnings.lock().unwrap().iter() {
        let Some(d) = w["documentId"]
            .as_str()
            .and_then(|doc| doc.strip_prefix("bp-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let other = w["otherUserId"].as_str().unwrap_or("").to_string();
        let sev = match w["severity"].as_str() {
            Some("high") => "high",
            Some("medium") => "medium",
            _ => continue,
        };
        let paragraph = w["paragraph"].as_u64().unwrap_or(u64::MAX) as u32;
        let (x, y) = if *to < other {
            (to.clone(), other)
        } else {
            (other, to.clone())
        };
        let slot = received
            .entry((d, x, y, paragraph, sev))
            .or_insert((*at, 0));
        slot.0 = slot.0.min(*at);
        slot.1 += 1;
    }
    let mut latencies = Vec::new();
    let mut missing = 0usize;
    for (key, at) in &expected {
        match received.get(key) {
            Some((first, 2)) => latencies.push(first.saturating_duration_since(*at)),
            _ => missing += 1,
        }
    }
    let unexpected = received
        .iter()
        .filter(|(k, (_, n))| *n != 2 || !expected.contains_key(*k))
        .count();
    // Baseline: the same moves' awareness relay to another editor.
    let baseline: Vec<Duration> = {
        let seen = seen.lock().unwrap();
        sent_all
            .iter()
            .filter_map(|(c, clock, at)| {
                seen.get(&(*c, *clock))
                    .map(|t| t.saturating_duration_since(*at))
            })
            .collect()
    };
    let relayed = baseline.len();
    drop(keep);
    served.stop().await;
    bench.stop().await;

    let moves = sent_all.len() as u64;
    let rate = moves as f64 / moving.as_secs_f64();
    let (b50, b99, bmax) = percentiles(baseline);
    let (p50, p99, pmax) = percentiles(latencies);
    let results = vec![
        ScenarioResult {
            bench: "presence",
            scenario: "awareness relay (baseline)".into(),
            events: relayed as u64,
            seconds: moving.as_secs_f64(),
            events_per_sec: relayed as f64 / moving.as_secs_f64(),
            p50_ms: b50,
            p99_ms: b99,
            max_ms: bmax,
            ratio_to_baseline: 1.0,
            baseline_events_per_sec: relayed as f64 / moving.as_secs_f64(),
            notes: format!("{} of {moves} moves seen by another editor", relayed),
        },
        ScenarioResult {
            bench: "presence",
            scenario: "cursor move → conflict warning".into(),
            events: moves,
            seconds: moving.as_secs_f64(),
            events_per_sec: rate,
            p50_ms: p50,
            p99_ms: p99,
            max_ms: pmax,
            ratio_to_baseline: if b99 > 0.0 { p99 / b99 } else { 0.0 },
            baseline_events_per_sec: relayed as f64 / moving.as_secs_f64(),
            notes: format!(
                "{} editors, {} documents; {} warnings expected by the oracle, {} missing, {} unexpected; ratio = p99 / baseline p99",
                per_doc * args.docs,
                args.docs,
                expected.len(),
                missing,
                unexpected
            ),
        },
    ];
    print(&results, args.json);
    anyhow::ensure!(
        missing == 0 && unexpected == 0,
        "{missing} warnings missing and {unexpected} unexpected against the oracle"
    );
    Ok(())
}

fn root_branch(root: &yrs::TextRef) -> yrs::branch::BranchPtr {
    let b: &yrs::branch::Branch = root.as_ref();
    yrs::branch::BranchPtr::from(b)
}
