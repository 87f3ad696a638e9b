//! Counters of one relay instance: served as Prometheus text at `/metrics` and summed over
//! all instances by `GET /api/realtime/websocket/stats`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::permissions::WsPath;

#[derive(Default)]
pub struct Metrics {
    pub connections: [AtomicI64; 4],
    pub connections_opened: AtomicU64,
    pub channels: AtomicI64,
    pub subscriptions: AtomicI64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub rate_limited: AtomicU64,
    pub bad_frames: AtomicU64,
    pub recoveries: AtomicU64,
    pub gaps_filled: AtomicU64,
    pub denied: AtomicU64,
    pub heartbeat_timeouts: AtomicU64,
    /// Subscriptions dropped because the subscriber lost the right to read the channel.
    pub revoked: AtomicU64,
}

fn path_index(path: WsPath) -> usize {
    WsPath::ALL
        .iter()
        .position(|p| *p == path)
        .expect("every path is listed")
}

impl Metrics {
    pub fn connection_opened(&self, path: WsPath) {
        self.connections[path_index(path)].fetch_add(1, Ordering::Relaxed);
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
    }
    pub fn connection_closed(&self, path: WsPath) {
        self.connections[path_index(path)].fetch_sub(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, instance: &str) -> StatsSnapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let by_path: Vec<(String, i64)> = WsPath::ALL
            .iter()
            .map(|p| {
                (
                    p.name().to_string(),
                    self.connections[path_index(*p)].load(Ordering::Relaxed),
                )
            })
            .collect();
        StatsSnapshot {
            instances: 1,
            instance_ids: vec![instance.to_string()],
            connections: by_path.iter().map(|(_, n)| n).sum(),
            connections_by_path: by_path.into_iter().collect(),
            channels: self.channels.load(Ordering::Relaxed),
            subscriptions: self.subscriptions.load(Ordering::Relaxed),
            frames_in: load(&self.frames_in),
            frames_out: load(&self.frames_out),
            messages_in: load(&self.messages_in),
            drops: load(&self.slow_disconnects),
            rate_limited: load(&self.rate_limited),
            bad_frames: load(&self.bad_frames),
            recoveries: load(&self.recoveries),
            gaps_filled: load(&self.gaps_filled),
            denied: load(&self.denied),
            heartbeat_timeouts: load(&self.heartbeat_timeouts),
            revoked: load(&self.revoked),
        }
    }

    /// Prometheus text exposition format.
    pub fn render(&self, instance: &str) -> String {
        let s = self.snapshot(instance);
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, value: String| {
            out.push_str(&format!(
                "# HELP inkwire_relay_{name} {help}\n# TYPE inkwire_relay_{name} {kind}\n{value}"
            ));
        };
        let mut by_path = String::new();
        for (path, n) in &s.connections_by_path {
            by_path.push_str(&format!(
                "inkwire_relay_connections{{path=\"{path}\"}} {n}\n"
            ));
        }
        gauge(
            "connections",
            "Open WebSocket connections.",
            "gauge",
            by_path,
        );
        let line = |name: &str, v: String| format!("inkwire_relay_{name} {v}\n");
        gauge(
            "channels",
            "Channels with local subscribers.",
            "gauge",
            line("channels", s.channels.to_string()),
        );
        gauge(
            "subscriptions",
            "Channel subscriptions.",
            "gauge",
            line("subscriptions", s.subscriptions.to_string()),
        );
        gauge(
            "frames_in_total",
            "Frames received from clients.",
            "counter",
            line("frames_in_total", s.frames_in.to_string()),
        );
        gauge(
            "frames_out_total",
            "Frames sent to clients.",
            "counter",
            line("frames_out_total", s.frames_out.to_string()),
        );
        gauge(
            "messages_in_total",
            "Channel messages received from NATS.",
            "counter",
            line("messages_in_total", s.messages_in.to_string()),
        );
        gauge(
            "slow_disconnects_total",
            "Connections closed because their send queue was full.",
            "counter",
            line("slow_disconnects_total", s.drops.to_string()),
        );
        gauge(
            "rate_limited_total",
            "Frames dropped by the inbound rate limit.",
            "counter",
            line("rate_limited_total", s.rate_limited.to_string()),
        );
        gauge(
            "bad_frames_total",
            "Malformed or unknown frames.",
            "counter",
            line("bad_frames_total", s.bad_frames.to_string()),
        );
        gauge(
            "recoveries_total",
            "Subscriptions that asked for history with since.",
            "counter",
            line("recoveries_total", s.recoveries.to_string()),
        );
        gauge(
            "gaps_filled_total",
            "Live gaps filled from the stream.",
            "counter",
            line("gaps_filled_total", s.gaps_filled.to_string()),
        );
        gauge(
            "heartbeat_timeouts_total",
            "Connections closed for not answering heartbeats.",
            "counter",
            line("heartbeat_timeouts_total", s.heartbeat_timeouts.to_string()),
        );
        gauge(
            "denied_total",
            "Subscriptions refused by permission checks.",
            "counter",
            line("denied_total", s.denied.to_string()),
        );
        gauge(
            "revoked_total",
            "Subscriptions dropped because the subscriber lost the right to read the channel.",
            "counter",
            line("revoked_total", s.revoked.to_string()),
        );
        out
    }
}

/// Statistics of one instance, or the sum over several.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub instances: u64,
    pub instance_ids: Vec<String>,
    pub connections: i64,
    pub connections_by_path: std::collections::BTreeMap<String, i64>,
    pub channels: i64,
    pub subscriptions: i64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub messages_in: u64,
    pub drops: u64,
    pub rate_limited: u64,
    pub bad_frames: u64,
    pub recoveries: u64,
    pub gaps_filled: u64,
    pub denied: u64,
    pub heartbeat_timeouts: u64,
    /// Absent from instances that predate revocation (summed as 0).
    #[serde(default)]
    pub revoked: u64,
}

impl StatsSnapshot {
    pub fn add(&mut self, o: &StatsSnapshot) {
        self.instances += o.instances;
        self.instance_ids.extend(o.instance_ids.iter().cloned());
        self.connections += o.connections;
        for (k, v) in &o.connections_by_path {
            *self.connections_by_path.entry(k.clone()).or_default() += v;
        }
        self.channels += o.channels;
        self.subscriptions += o.subscriptions;
        self.frames_in += o.frames_in;
        self.frames_out += o.frames_out;
        self.messages_in += o.messages_in;
        self.drops += o.drops;
        self.rate_limited += o.rate_limited;
        self.bad_frames += o.bad_frames;
        self.recoveries += o.recoveries;
        self.gaps_filled += o.gaps_filled;
        self.denied += o.denied;
        self.heartbeat_timeouts += o.heartbeat_timeouts;
        self.revoked += o.revoked;
    }
}
