//! One WebSocket connection: the upgrade (authenticated before it happens), then a single
//! task that reads client frames, writes queued frames, sends heartbeats and enforces the
//! limits (rate, frame size, send queue, token expiry). The same task applies revocations
//! (`revocation`): they arrive on a control channel and take effect between two frames.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use inkwire_shared::auth::{Caller, unix_now};
use inkwire_shared::channels::Channel;
use inkwire_shared::user_presence::Device;
use serde_json::Value;
use tokio::sync::{Notify, mpsc};

use crate::Relay;
use crate::hub::{Outbound, Peer};
use crate::permissions::{self, Access, WsPath};
use crate::presence::ActivityMark;
use crate::protocol::{
    ClientFrame, ServerFrame, UnsubscribeReason, close, codes, parse_client_frame,
};
use crate::rate_limit::TokenBucket;
use crate::revocation::{self, Control, ControlReceiver, ControlSender, Scope};

/// Frames dropped by the rate limit before the connection is closed.
const RATE_ABUSE_LIMIT: u32 = 200;
/// Malformed frames before the connection is closed.
const BAD_FRAME_LIMIT: u32 = 20;
/// Queued frames written per flush.
const WRITE_BATCH: usize = 64;

struct Conn {
    relay: Relay,
    caller: Caller,
    path: WsPath,
    id: u64,
    connection_id: String,
    tx: mpsc::Sender<Outbound>,
    too_slow: Arc<Notify>,
    control: ControlSender,
    sink: SplitSink<WebSocket, Message>,
    /// Live subscriptions and their ids.
    channels: HashMap<Channel, u64>,
    next_sub: u64,
    /// Channels whose subscription ended while frames of theirs may still be queued; such
    /// frames are dropped. Cleared whenever the queue is empty (the hub sends nothing for a
    /// subscription after `leave`), so the common case costs one `is_empty`. Subscribing to
    /// the channel again takes it out: the right is back, so a frame still queued from
    /// before may go too.
    ended: Vec<String>,
    bad_frames: u32,
    rate_dropped: u32,
    /// Marks this connection active for user presence (one atomic load per client frame).
    activity: ActivityMark,
}

/// Reasons to end a connection that do not come from the socket.
enum Stop {
    TooSlow,
    Shutdown,
    Expired,
}

/// Why the loop ended: the close frame to send, if any.
type Ending = Option<(u16, &'static str)>;

pub async fn run(socket: WebSocket, relay: Relay, caller: Caller, path: WsPath, device: Device) {
    let id = relay.next_connection_id();
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(relay.config.send_queue);
    let (control, control_rx) = revocation::control_channel();
    let connection_id = format!("{}-{id}", relay.instance_id);
    relay.register_connection(&caller.user_id, id, control.clone());
    let activity = relay
        .presence
        .opened(id, &connection_id, &caller.user_id, device);
    let mut conn = Conn {
        relay: relay.clone(),
        caller,
        path,
        id,
        connection_id,
        tx,
        too_slow: Arc::new(Notify::new()),
        control,
        sink,
        channels: HashMap::new(),
        next_sub: 1,
        ended: Vec::new(),
        bad_frames: 0,
        rate_dropped: 0,
        activity,
    };
    relay.metrics.connection_opened(path);
    let mut stream = stream;
    let ending = conn.serve(&mut stream, rx, control_rx).await;
    if let Some((code, reason)) = ending {
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            conn.sink.send(Message::Close(Some(CloseFrame {
                code,
                reason: reason.into(),
            }))),
        )
        .await;
        // The closing handshake: wait (briefly) for the client's close frame, so the close
        // frame is read before the TCP connection goes away.
        if matches!(sent, Ok(Ok(()))) {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(Ok(m)) = stream.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.sink.close()).await;
    relay.unregister_connection(&conn.caller.user_id, conn.id);
    relay.presence.closed(conn.id);
    for channel in std::mem::take(&mut conn.channels).into_keys() {
        relay.hub.leave(&channel, conn.id).await;
    }
    relay.metrics.connection_closed(path);
    relay.release_user(&conn.caller.user_id);
}

impl Conn {
    fn peer(&self, sub: u64) -> Peer {
        Peer {
            id: self.id,
            sub,
            tx: self.tx.clone(),
            too_slow: self.too_slow.clone(),
            control: self.control.clone(),
        }
    }

    /// Whether a queued `message` frame may still be written: not when its channel's
    /// subscription ended while it was queued.
    fn is_live(&self, frame: &str) -> bool {
        self.ended.is_empty()
            || !self
                .ended
                .iter()
                .any(|c| frame_channel(frame) == Some(c.as_str()))
    }

    /// Ends subscription `channel` (if it is the one with id `sub`, when given): the hub
    /// stops sending its frames, and those still queued are dropped.
    async fn end_subscription(&mut self, channel: &Channel, sub: Option<u64>) -> bool {
        match self.channels.get(channel) {
            Some(current) if sub.is_none_or(|s| s == *current) => {
                self.ended.push(channel.to_string());
                self.channels.remove(channel);
                self.relay.hub.leave(channel, self.id).await;
                true
            }
            _ => false,
        }
    }

    /// Starts a re-check of the subscriptions in `scope`; its verdict comes back as a
    /// `Control::Revoke`.
    fn recheck(&self, scope: &Scope) {
        if self.caller.is_privileged() {
            // Privileged callers read every project, document and room by their token.
            return;
        }
        let subscriptions: Vec<(Channel, u64)> = self
            .channels
            .iter()
            .filter(|(c, _)| scope.covers(c))
            .map(|(c, s)| (c.clone(), *s))
            .collect();
        if !subscriptions.is_empty() {
            revocation::spawn_recheck(
                self.caller.clone(),
                subscriptions,
                self.relay.app.redis.clone(),
                self.control.clone(),
            );
        }
    }

    /// Applies a re-check's verdict; returns false when the connection broke.
    async fn revoke(&mut self, denied: Vec<(Channel, u64)>) -> bool {
        for (channel, sub) in denied {
            // A subscription that ended, or was made again, since the check is left alone:
            // a new one was checked when it was made.
            if !self.end_subscription(&channel, Some(sub)).await {
                continue;
            }
            self.relay.metrics.revoked.fetch_add(1, Ordering::Relaxed);
            let name = channel.to_string();
            let text = ServerFrame::Unsubscribed {
                channel: &name,
                reason: UnsubscribeReason::Revoked,
                reference: None,
            }
            .to_text();
            if !self.send_text(text).await {
                return false;
            }
        }
        true
    }

    async fn send_text(&mut self, text: String) -> bool {
        self.relay
            .metrics
            .frames_out
            .fetch_add(1, Ordering::Relaxed);
        self.sink.send(Message::Text(text.into())).await.is_ok()
    }

    async fn send_error(&mut self, code: &str, message: &str, reference: Option<&Value>) -> bool {
        let text = ServerFrame::Error {
            code,
            message,
            reference,
        }
        .to_text();
        self.send_text(text).await
    }

    async fn serve(
        &mut self,
        stream: &mut SplitStream<WebSocket>,
        mut rx: mpsc::Receiver<Outbound>,
        mut control_rx: ControlReceiver,
    ) -> Ending {
        let config = self.relay.config.clone();
        let welcome = ServerFrame::Welcome {
            connection_id: &self.connection_id,
            user_id: &self.caller.user_id,
            heartbeat_ms: config.heartbeat.as_millis() as u64,
        }
        .to_text();
        if !self.send_text(welcome).await {
            return None;
        }
        for channel in self.path.default_channels(&self.caller) {
            if !Box::pin(self.subscribe(channel.to_string(), None, None)).await {
                return None;
            }
        }

        let mut bucket = TokenBucket::new(config.rate_per_sec, config.rate_burst);
        let mut heartbeat = tokio::time::interval_at(
            tokio::time::Instant::now() + config.heartbeat,
            config.heartbeat,
        );
        let mut unanswered = 0u32;
        let expires_in = Duration::from_secs(self.caller.expires_at.saturating_sub(unix_now()));
        let mut shutdown = self.relay.shutdown.clone();
        let too_slow = self.too_slow.clone();
        // The rare reasons to stop, combined into one future created once: the loop below
        // runs for every outbound frame, and re-creating these waiters each time costs more
        // than the frame itself.
        let stop = async move {
            tokio::select! {
                _ = too_slow.notified() => Stop::TooSlow,
                _ = shutdown.wait() => Stop::Shutdown,
                _ = tokio::time::sleep(expires_in) => Stop::Expired,
            }
        };
        tokio::pin!(stop);

        loop {
            tokio::select! {
                biased;
                why = &mut stop => {
                    return Some(match why {
                        Stop::TooSlow => {
                            self.relay.metrics.slow_disconnects.fetch_add(1, Ordering::Relaxed);
                            (close::TOO_SLOW, "send queue full: the client does not read fast enough")
                        }
                        Stop::Shutdown => (close::GOING_AWAY, "server shutting down; reconnect with since"),
                        Stop::Expired => (close::TOKEN_EXPIRED, "token expired"),
                    });
                }
                Some(control) = control_rx.recv() => {
                    match control {
                        Control::Recheck(scope) => self.recheck(&scope),
                        Control::Revoke(denied) => {
                            // Boxed: a revocation is rare, and its state inline would make
                            // every connection's task larger for good.
                            if !Box::pin(self.revoke(denied)).await {
                                return None;
                            }
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if unanswered >= 2 {
                        self.relay.metrics.heartbeat_timeouts.fetch_add(1, Ordering::Relaxed);
                        return Some((close::HEARTBEAT_TIMEOUT, "no answer to two heartbeats"));
                    }
                    unanswered += 1;
                    if self.sink.send(Message::Ping(Default::default())).await.is_err() {
                        return None;
                    }
                }
                out = rx.recv() => {
                    let Some(Outbound::Frame(first)) = out else { return None };
                    if !self.write_batch(first, &mut rx).await {
                        return None;
                    }
                }
                incoming = stream.next() => {
                    let msg = match incoming {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            let text = e.to_string();
                            if text.contains("Space limit exceeded") || text.contains("too long") || text.contains("Message too big") || text.contains("capacity") {
                                return Some((close::MESSAGE_TOO_BIG, "frame larger than the maximum frame size"));
                            }
                            return None;
                        }
                        None => return None,
                    };
                    // Any frame proves the client is alive.
                    unanswered = 0;
                    match msg {
                        Message::Text(text) => {
                            self.relay.metrics.frames_in.fetch_add(1, Ordering::Relaxed);
                            self.activity.touch();
                            if !bucket.try_take() {
                                self.relay.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
                                self.rate_dropped += 1;
                                if self.rate_dropped > RATE_ABUSE_LIMIT {
                                    return Some((close::RATE_LIMIT_ABUSE, "too many frames after being rate limited"));
                                }
                                // One error per burst is enough; the rest are dropped silently.
                                if self.rate_dropped == 1 || self.rate_dropped.is_multiple_of(50) {
                                    let message = format!("more than {} frames per second; frames are being dropped", config.rate_per_sec);
                                    if !self.send_error(codes::RATE_LIMITED, &message, None).await {
                                        return None;
                                    }
                                }
                                continue;
                            }
                            // Boxed: handling a client frame (a subscribe reads history from
                            // the stream) has a large state that the connection's task would
                            // otherwise carry inline for its whole life.
                            if let Some(ending) = Box::pin(self.handle_text(&text)).await {
                                return ending;
                            }
                        }
                        Message::Binary(_) => {
                            if let Some(ending) = self.bad_frame("binary frames are not part of the protocol; send JSON text", None).await {
                                return ending;
                            }
                        }
                        Message::Ping(_) | Message::Pong(_) => {}
                        Message::Close(_) => return None,
                    }
                }
            }
        }
    }

    /// Writes `first` and whatever else is queued (up to a batch) with one flush, skipping
    /// frames of subscriptions that ended.
    async fn write_batch(&mut self, first: Utf8Bytes, rx: &mut mpsc::Receiver<Outbound>) -> bool {
        let mut n = 0u64;
        let mut taken = 1usize;
        if self.is_live(&first) {
            if self.sink.feed(Message::Text(first)).await.is_err() {
                return false;
            }
            n += 1;
        }
        while taken < WRITE_BATCH {
            match rx.try_recv() {
                Ok(Outbound::Frame(f)) => {
                    taken += 1;
                    if !self.is_live(&f) {
                        continue;
                    }
                    if self.sink.feed(Message::Text(f)).await.is_err() {
                        return false;
                    }
                    n += 1;
                }
                Err(_) => break,
            }
        }
        if rx.is_empty() {
            self.ended.clear();
        }
        if n == 0 {
            return true;
        }
        self.relay
            .metrics
            .frames_out
            .fetch_add(n, Ordering::Relaxed);
        self.sink.flush().await.is_ok()
    }

    async fn bad_frame(&mut self, message: &str, reference: Option<&Value>) -> Option<Ending> {
        self.relay
            .metrics
            .bad_frames
            .fetch_add(1, Ordering::Relaxed);
        self.bad_frames += 1;
        if self.bad_frames > BAD_FRAME_LIMIT {
            return Some(Some((close::POLICY_VIOLATION, "too many malformed frames")));
        }
        if !self.send_error(codes::BAD_FRAME, message, reference).await {
            return Some(None);
        }
        None
    }

    /// Handles one text frame; `Some(ending)` ends the connection.
    async fn handle_text(&mut self, text: &str) -> Option<Ending> {
        let frame = match parse_client_frame(text) {
            Ok(f) => f,
            Err(e) => return self.bad_frame(&e.message, e.reference.as_ref()).await,
        };
        let ok = match frame {
            ClientFrame::Ping { reference } => {
                let text = ServerFrame::Pong {
                    reference: reference.as_ref(),
                }
                .to_text();
                self.send_text(text).await
            }
            ClientFrame::Subscribe {
                channel,
                since,
                reference,
            } => self.subscribe(channel, since, reference.as_ref()).await,
            ClientFrame::Unsubscribe { channel, reference } => {
                self.unsubscribe(channel, reference.as_ref()).await
            }
        };
        if ok { None } else { Some(None) }
    }

    /// Parses a channel name, answering `unknown_channel` when it is not one; the error
    /// carries whether the connection is still usable.
    async fn parse_channel(
        &mut self,
        name: &str,
        reference: Option<&Value>,
    ) -> Result<Channel, bool> {
        match Channel::parse(name) {
            Ok(c) => Ok(c),
            Err(e) => Err(self
                .send_error(codes::UNKNOWN_CHANNEL, &e.to_string(), reference)
                .await),
        }
    }

    async fn unsubscribe(&mut self, name: String, reference: Option<&Value>) -> bool {
        let channel = match self.parse_channel(&name, reference).await {
            Ok(c) => c,
            Err(still_open) => return still_open,
        };
        if !self.end_subscription(&channel, None).await {
            return self
                .send_error(
                    codes::NOT_SUBSCRIBED,
                    &format!("not subscribed to {name}"),
                    reference,
                )
                .await;
        }
        let text = ServerFrame::Unsubscribed {
            channel: &name,
            reason: UnsubscribeReason::Requested,
            reference,
        }
        .to_text();
        self.send_text(text).await
    }

    /// Checks and performs a subscription; returns false when the connection broke.
    async fn subscribe(
        &mut self,
        name: String,
        since: Option<u64>,
        reference: Option<&Value>,
    ) -> bool {
        let channel = match self.parse_channel(&name, reference).await {
            Ok(c) => c,
            Err(still_open) => return still_open,
        };
        if !self.path.allows(channel.kind) {
            let message = format!(
                "{} channels are not served on {}",
                channel.kind.as_str(),
                self.path.route()
            );
            return self
                .send_error(codes::CHANNEL_NOT_ALLOWED_ON_PATH, &message, reference)
                .await;
        }
        if self.channels.contains_key(&channel) {
            return self
                .send_error(
                    codes::ALREADY_SUBSCRIBED,
                    &format!("already subscribed to {channel}"),
                    reference,
                )
                .await;
        }
        if self.channels.len() >= self.relay.config.max_subscriptions {
            let message = format!(
                "at most {} subscriptions per connection",
                self.relay.config.max_subscriptions
            );
            return self
                .send_error(codes::TOO_MANY_SUBSCRIPTIONS, &message, reference)
                .await;
        }
        let mut redis = self.relay.app.redis.clone();
        match permissions::check(&self.caller, &channel, &mut redis).await {
            Ok(Access::Granted) => {}
            Ok(Access::Denied(why)) => {
                self.relay.metrics.denied.fetch_add(1, Ordering::Relaxed);
                return self.send_error(codes::FORBIDDEN, &why, reference).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "permission check failed");
                return self
                    .send_error(
                        codes::UNAVAILABLE,
                        "permission check unavailable; retry",
                        reference,
                    )
                    .await;
            }
        }
        let sub = self.next_sub;
        self.next_sub += 1;
        let joined = match self.relay.hub.join(&channel, self.peer(sub), since).await {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(error = %e, %channel, "join failed");
                self.relay.hub.leave(&channel, self.id).await;
                return self
                    .send_error(codes::UNAVAILABLE, "channel unavailable; retry", reference)
                    .await;
            }
        };
        let name = channel.to_string();
        self.ended.retain(|c| *c != name);
        self.channels.insert(channel.clone(), sub);
        let subscribed = ServerFrame::Subscribed {
            channel: &name,
            position: joined.position,
            recovered: joined.recovered,
            reference,
        }
        .to_text();
        if !self.send_text(subscribed).await {
            return false;
        }
        // What the client has seen once the history is sent; live messages after it follow.
        let mut delivered = since.unwrap_or(joined.position).min(joined.position);
        let history: Vec<Utf8Bytes> = joined
            .history
            .into_iter()
            .map(|(seq, frame)| {
                delivered = delivered.max(seq);
                frame
            })
            .collect();
        let held_back = self.relay.hub.go_live(&channel, self.id, delivered).await;
        for frame in history.into_iter().chain(held_back) {
            if self.sink.feed(Message::Text(frame)).await.is_err() {
                return false;
            }
            self.relay
                .metrics
                .frames_out
                .fetch_add(1, Ordering::Relaxed);
        }
        self.sink.flush().await.is_ok()
    }
}

/// The channel a `message` frame names: frames start `{"op":"message","channel":"…"` (see
/// `protocol::message_frame`; channel names hold no quote or escape).
fn frame_channel(frame: &str) -> Option<&str> {
    let rest = frame.strip_prefix(r#"{"op":"message","channel":""#)?;
    rest.split_once('"').map(|(channel, _)| channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_name_their_channel() {
        let frame = crate::protocol::message_frame(
            "project:p-1",
            7,
            br#"{"type":"system","data":{"n":1},"ts":"2026-11-22T10:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(frame_channel(&frame), Some("project:p-1"));
        assert_eq!(frame_channel(r#"{"op":"pong"}"#), None);
    }
}
