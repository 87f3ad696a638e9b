//! Local fan-out: which connections of this instance subscribe to which channel.
//!
//! The first local subscriber of a channel makes the hub subscribe to the channel's live
//! subject (`live.rt.<kind>.<id>`, republished by the RELAY stream with the stream sequence
//! of each message); the last one leaving unsubscribes. Each channel has one task that turns
//! a NATS message into a `message` frame once and hands the same bytes to every subscriber's
//! bounded send queue. A subscriber whose queue is full is told to close (too slow); the
//! others do not wait for it.
//!
//! A subscriber joins in *recovering* mode: live messages are buffered for it while its
//! history is read from the stream, then the buffer is flushed (without what the history
//! already delivered) and it goes live. Every subscriber remembers the last sequence it was
//! sent, so nothing is delivered twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream;
use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use inkwire_shared::channels::Channel;
use tokio::sync::{Notify, mpsc};

use crate::metrics::Metrics;
use crate::protocol::message_frame;
use crate::recovery;
use crate::revocation::ControlSender;

/// What a connection's send queue carries.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A `message` frame. It names its channel, which is how the connection drops queued
    /// frames of a subscription that ended meanwhile (a revoked channel delivers nothing after
    /// its `unsubscribed` frame) without a tag on every frame: the queue's slots are allocated
    /// per connection up front, so each byte of an `Outbound` is paid by every idle
    /// connection.
    Frame(Utf8Bytes),
}

/// The hub's handle on one subscription of one connection.
#[derive(Clone)]
pub struct Peer {
    pub id: u64,
    /// The subscription's id, unique within the connection.
    pub sub: u64,
    pub tx: mpsc::Sender<Outbound>,
    /// Notified when the connection must close because it is too slow.
    pub too_slow: Arc<Notify>,
    /// Reaches the connection outside its queue (re-checks of its rights).
    pub control: ControlSender,
}

struct Subscriber {
    peer: Peer,
    last_seq: u64,
    /// Live messages held back while the subscriber's history is being read.
    pending: Option<Vec<(u64, Utf8Bytes)>>,
}

struct ChannelState {
    /// The newest sequence this instance has seen on the channel.
    last_seq: u64,
    subscribers: HashMap<u64, Subscriber>,
}

struct ChannelEntry {
    state: Mutex<ChannelState>,
    task: tokio::task::JoinHandle<()>,
}

pub struct Hub {
    nats: async_nats::Client,
    js: jetstream::Context,
    channels: tokio::sync::Mutex<HashMap<String, Arc<ChannelEntry>>>,
    metrics: Arc<Metrics>,
    queue_capacity: usize,
}

/// The answer to a join: where the channel is now and what the subscriber missed.
pub struct Joined {
    pub position: u64,
    pub recovered: bool,
    pub history: Vec<(u64, Utf8Bytes)>,
}

impl Hub {
    pub fn new(
        nats: async_nats::Client,
        js: jetstream::Context,
        metrics: Arc<Metrics>,
        queue_capacity: usize,
    ) -> Arc<Hub> {
        Arc::new(Hub {
            nats,
            js,
            channels: tokio::sync::Mutex::new(HashMap::new()),
            metrics,
            queue_capacity,
        })
    }

    /// Adds `peer` to `channel` in recovering mode and reads what it missed since `since`.
    /// The caller sends `subscribed` and the history, then calls [`Hub::go_live`].
    pub async fn join(
        self: &Arc<Self>,
        channel: &Channel,
        peer: Peer,
        since: Option<u64>,
    ) -> Result<Joined, async_nats::Error> {
        let name = channel.to_string();
        let entry = {
            let mut channels = self.channels.lock().await;
            let entry = match channels.get(&name) {
                Some(e) => e.clone(),
                None => {
                    let e = self.open_channel(channel).await?;
                    channels.insert(name.clone(), e.clone());
                    self.metrics
                        .channels
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    e
                }
            };
            let mut state = entry.state.lock().expect("channel state lock");
            state.subscribers.insert(
                peer.id,
                Subscriber {
                    peer,
                    last_seq: 0,
                    pending: Some(Vec::new()),
                },
            );
            drop(state);
            entry
        };
        self.metrics
            .subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let position = entry.state.lock().expect("channel state lock").last_seq;
        let subject = channel.subject();
        let (recovered, history) = match since {
            None => (false, Vec::new()),
            Some(s) if s == position => (true, Vec::new()),
            Some(s) if s > position => (false, Vec::new()),
            Some(s) => {
                self.metrics
                    .recoveries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let complete = recovery::reaches_back_to(&self.js, &subject, s).await?;
                let raw = recovery::read_range(&self.js, &subject, s, position).await?;
                let history = raw
                    .into_iter()
                    .filter_map(|(seq, payload)| {
                        message_frame(&name, seq, &payload).map(|f| (seq, Utf8Bytes::from(f)))
                    })
                    .collect();
                (complete, history)
            }
        };
        Ok(Joined {
            position,
            recovered,
            history,
        })
    }

    /// Ends recovery for `peer` on `channel`: returns the live messages buffered meanwhile that
    /// come after `delivered_up_to`; from now on messages go to the peer's queue.
    pub async fn go_live(
        &self,
        channel: &Channel,
        peer_id: u64,
        delivered_up_to: u64,
    ) -> Vec<Utf8Bytes> {
        let Some(entry) = self
            .channels
            .lock()
            .await
            .get(&channel.to_string())
            .cloned()
        else {
            return Vec::new();
        };
        let mut state = entry.state.lock().expect("channel state lock");
        let Some(sub) = state.subscribers.get_mut(&peer_id) else {
            return Vec::new();
        };
        let pending = sub.pending.take().unwrap_or_default();
        let mut last = delivered_up_to;
        let mut out = Vec::new();
        for (seq, frame) in pending {
            if seq > last {
                last = seq;
                out.push(frame);
            }
        }
        sub.last_seq = last;
        out
    }

    /// Removes `peer_id` from `channel`; unsubscribes from NATS when it was the last one.
    pub async fn leave(&self, channel: &Channel, peer_id: u64) {
        let name = channel.to_string();
        let mut channels = self.channels.lock().await;
        let Some(entry) = channels.get(&name).cloned() else {
            return;
        };
        let empty = {
            let mut state = entry.state.lock().expect("channel state lock");
            if state.subscribers.remove(&peer_id).is_some() {
                self.metrics
                    .subscriptions
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            state.subscribers.is_empty()
        };
        if empty {
            channels.remove(&name);
            entry.task.abort();
            self.metrics
                .channels
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The control handles of every local subscriber of `channel`.
    pub async fn controls_of(&self, channel: &Channel) -> Vec<ControlSender> {
        let Some(entry) = self
            .channels
            .lock()
            .await
            .get(&channel.to_string())
            .cloned()
        else {
            return Vec::new();
        };
        let state = entry.state.lock().expect("channel state lock");
        state
            .subscribers
            .values()
            .map(|s| s.peer.control.clone())
            .collect()
    }

    /// Subscribes to the channel's live subject, learns its current position and starts the
    /// fan-out task.
    async fn open_channel(
        self: &Arc<Self>,
        channel: &Channel,
    ) -> Result<Arc<ChannelEntry>, async_nats::Error> {
        let subscription = self.nats.subscribe(channel.live_subject()).await?;
        // Make sure the server has the subscription before the position is read, so that
        // every message after the position arrives live.
        self.nats.flush().await?;
        let last_seq = recovery::last_sequence(&self.js, &channel.subject()).await?;
        let entry = Arc::new_cyclic(|weak: &std::sync::Weak<ChannelEntry>| {
            let weak = weak.clone();
            let hub = Arc::downgrade(self);
            let channel = channel.clone();
            let task = tokio::spawn(async move {
                fan_out_loop(hub, weak, channel, subscription).await;
            });
            ChannelEntry {
                state: Mutex::new(ChannelState {
                    last_seq,
                    subscribers: HashMap::new(),
                }),
                task,
            }
        });
        Ok(entry)
    }

    fn deliver(&self, state: &mut ChannelState, seq: u64, frame: Utf8Bytes) {
        state.last_seq = state.last_seq.max(seq);
        let capacity = self.queue_capacity;
        for sub in state.subscribers.values_mut() {
            if let Some(pending) = &mut sub.pending {
                pending.push((seq, frame.clone()));
                if pending.len() > capacity {
                    sub.peer.too_slow.notify_one();
                }
                continue;
            }
            if seq <= sub.last_seq {
                continue;
            }
            sub.last_seq = seq;
            match sub.peer.tx.try_send(Outbound::Frame(frame.clone())) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.peer.too_slow.notify_one();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }
}

fn header_u64(msg: &async_nats::Message, name: &str) -> Option<u64> {
    msg.headers.as_ref()?.get(name)?.as_str().parse().ok()
}

async fn fan_out_loop(
    hub: std::sync::Weak<Hub>,
    entry: std::sync::Weak<ChannelEntry>,
    channel: Channel,
    mut subscription: async_nats::Subscriber,
) {
    let name = channel.to_string();
    let subject = channel.subject();
    while let Some(msg) = subscription.next().await {
        let (Some(hub), Some(entry)) = (hub.upgrade(), entry.upgrade()) else {
            return;
        };
        hub.metrics
            .messages_in
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(seq) = header_u64(&msg, "Nats-Sequence") else {
            tracing::warn!(channel = %name, "live message without Nats-Sequence; ignored");
            continue;
        };
        let previous = header_u64(&msg, "Nats-Last-Sequence").unwrap_or(0);
        let Some(frame) = message_frame(&name, seq, &msg.payload) else {
            tracing::warn!(channel = %name, seq, "malformed channel message; ignored");
            continue;
        };
        let known = entry.state.lock().expect("channel state lock").last_seq;
        if seq <= known {
            continue;
        }
        if previous > known {
            // Core NATS dropped something (or we subscribed late): fetch it from the stream.
            match recovery::read_range(&hub.js, &subject, known, seq - 1).await {
                Ok(missed) => {
                    hub.metrics
                        .gaps_filled
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut state = entry.state.lock().expect("channel state lock");
                    for (s, payload) in missed {
                        if s > state.last_seq
                            && let Some(f) = message_frame(&name, s, &payload)
                        {
                            hub.deliver(&mut state, s, Utf8Bytes::from(f));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(channel = %name, error = %e, "could not fill a gap from the stream")
                }
            }
        }
        let mut state = entry.state.lock().expect("channel state lock");
        hub.deliver(&mut state, seq, Utf8Bytes::from(frame));
    }
}
