//! Latency percentiles, progress display and result printing shared by the benchmarks.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

/// One scenario's figures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ScenarioResult {
    pub bench: &'static str,
    pub scenario: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// events/s divided by the baseline's events/s from the same run.
    pub ratio_to_baseline: f64,
    pub baseline_events_per_sec: f64,
    pub notes: String,
}

/// Sorted latencies → (p50, p99, max) in milliseconds.
pub fn percentiles(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99), at(1.0))
}

/// Prints `label: done/total` to stderr twice a second while running in a terminal.
pub struct Progress {
    pub done: Arc<AtomicU64>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn start(label: &str, total: u64) -> Progress {
        let done = Arc::new(AtomicU64::new(0));
        let task = std::io::stderr().is_terminal().then(|| {
            let done = done.clone();
            let label = label.to_string();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let n = done.load(Ordering::Relaxed);
                    eprint!("\r  {label}: {n}/{total}   ");
                }
            })
        });
        Progress { done, task }
    }

    pub fn finish(self) {
        if let Some(t) = self.task {
            t.abort();
            eprint!("\r\x1b[2K");
        }
    }
}

pub fn print(results: &[ScenarioResult], json: bool) {
    if json {
        for r in results {
            println!("{}", serde_json::to_string(r).expect("serializable"));
        }
        return;
    }
    println!(
        "{:<34} {:>10} {:>12} {:>9} {:>9} {:>9} {:>8}",
        "scenario", "events", "events/s", "p50 ms", "p99 ms", "max ms", "ratio"
    );
    for r in results {
        println!(
            "{:<34} {:>10} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>7.2}x",
            r.scenario,
            r.events,
            r.events_per_sec,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.ratio_to_baseline
        );
    }
    for r in results {
        if !r.notes.is_empty() {
            println!("  {}: {}", r.scenario, r.notes);
        }
    }
}
