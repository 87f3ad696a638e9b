//! Losing a right takes effect at once: live subscriptions are re-checked against the
//! current rights in Redis whenever somebody announces that rights shrank
//! (`inkwire.access.changed`, see `shared::access_changes`), and periodically as a safety net
//! for announcements missed while NATS was unreachable (`INKWIRE_RELAY_RECHECK_INTERVAL`).
//!
//! Nothing is cached: a re-check asks Redis the same question a new subscribe asks
//! (`permissions::check`). Each connection owns its subscriptions, so the listener only finds
//! the connections concerned and sends them a [`Control::Recheck`]; the connection runs the
//! checks in a task of its own (its loop keeps writing frames meanwhile) and receives the
//! verdict as a [`Control::Revoke`], which it applies between two frames: it leaves the
//! channel in the hub, drops frames of that subscription still in its queue and tells the
//! client `{"op":"unsubscribed","channel":…,"reason":"revoked"}`.
//!
//! A check that fails (Redis unavailable, timeout) keeps the subscription: the next
//! announcement or periodic re-check decides. Dropping every subscription of every client
//! during a Redis hiccup would turn a short outage into a reconnect storm.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use inkwire_shared::access_changes::{ACCESS_CHANGED_SUBJECT, AccessChange};
use inkwire_shared::auth::Caller;
use inkwire_shared::channels::{Channel, ChannelKind};
use inkwire_shared::membership::is_valid_id;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;

use crate::Relay;
use crate::permissions::{self, Access};

/// How long one re-check of a connection's subscriptions may take before it is abandoned.
const RECHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Which of a connection's subscriptions a re-check covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `project:{p}` and every `document:` subscription (a document's project is looked up
    /// again by the check itself, so documents of other projects simply stay granted).
    Project(String),
    /// One channel.
    Channel(Channel),
    /// Every subscription whose right lives in Redis (project, document, room).
    All,
}

impl Scope {
    pub fn covers(&self, channel: &Channel) -> bool {
        // user: and category: rights come from the token, which cannot change while the
        // connection lives; only rights stored in Redis can be lost.
        let in_redis = matches!(
            channel.kind,
            ChannelKind::Project | ChannelKind::Document | ChannelKind::Room
        );
        in_redis
            && match self {
                Scope::Project(p) => {
                    channel.kind == ChannelKind::Document
                        || (channel.kind == ChannelKind::Project && &channel.id == p)
                }
                Scope::Channel(c) => c == channel,
                Scope::All => true,
            }
    }
}

/// What the relay tells a connection outside its socket.
#[derive(Debug)]
pub enum Control {
    /// Re-check the subscriptions in the scope against the current rights.
    Recheck(Scope),
    /// Subscriptions `(channel, subscription id)` found no longer allowed.
    Revoke(Vec<(Channel, u64)>),
}

/// Sends [`Control`]s to one connection. Not a tokio `mpsc` channel: an unbounded channel
/// allocates a block of 32 slots per connection up front (about 2 KB with this payload), which
/// alone would push an idle connection past its 10 KB budget; controls are rare, so a queue
/// behind a mutex and a `Notify` (about 100 bytes, nothing more until a control is sent) do.
#[derive(Clone)]
pub struct ControlSender(Arc<Inbox>);

/// Receives the [`Control`]s of one connection.
pub struct ControlReceiver(Arc<Inbox>);

struct Inbox {
    queue: Mutex<VecDeque<Control>>,
    ready: Notify,
}

/// A connection's control inbox.
pub fn control_channel() -> (ControlSender, ControlReceiver) {
    let inbox = Arc::new(Inbox {
        queue: Mutex::new(VecDeque::new()),
        ready: Notify::new(),
    });
    (ControlSender(inbox.clone()), ControlReceiver(inbox))
}

impl ControlSender {
    /// Queues `control`; the connection takes it between two frames.
    pub fn send(&self, control: Control) {
        self.0
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(control);
        // Stores a permit when the connection is not waiting, so no control is missed.
        self.0.ready.notify_one();
    }
}

impl ControlReceiver {
    /// The next control (waits for one; never `None`: the connection holds a sender too).
    pub async fn recv(&mut self) -> Option<Control> {
        loop {
            let next = self
                .0
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            if next.is_some() {
                return next;
            }
            self.0.ready.notified().await;
        }
    }
}

/// In how many slices the periodic re-check spreads the connections over its interval.
const RECHECK_SLICES: u64 = 16;

/// The safety-net re-check: one task per instance that asks every connection, once per
/// `INKWIRE_RELAY_RECHECK_INTERVAL`, to re-check all its rights held in Redis, a slice of the
/// connections at a time so that Redis sees a steady trickle rather than a burst. One timer
/// for the instance, not one per connection: a timer per idle connection costs memory the
/// relay's budget of 10 KB per idle connection cannot spare.
pub fn spawn_periodic_recheck(relay: Relay) {
    let period = relay.config.recheck_interval / RECHECK_SLICES as u32;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = relay.shutdown.clone();
        let mut slice = 0;
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            for control in relay.controls_in_slice(slice, RECHECK_SLICES) {
                control.send(Control::Recheck(Scope::All));
            }
            slice = (slice + 1) % RECHECK_SLICES;
        }
    });
}

/// The channels of `change` to re-check, and for whom: `Some(user)` means that user's
/// connections, `None` every subscriber of the channel. `None` when the announcement names
/// an id no channel can have.
pub fn targets(change: &AccessChange) -> Option<(Option<&str>, Scope)> {
    match change {
        AccessChange::Member {
            project_id,
            user_id,
        } => (is_valid_id(project_id) && is_valid_id(user_id))
            .then(|| (Some(user_id.as_str()), Scope::Project(project_id.clone()))),
        AccessChange::Document { document_id, .. } => is_valid_id(document_id).then(|| {
            (
                None,
                Scope::Channel(Channel::new(ChannelKind::Document, document_id.clone())),
            )
        }),
        AccessChange::RoomParticipant { room_id, user_id } => {
            (is_valid_id(room_id) && is_valid_id(user_id)).then(|| {
                (
                    Some(user_id.as_str()),
                    Scope::Channel(Channel::new(ChannelKind::Room, room_id.clone())),
                )
            })
        }
    }
}

/// Listens to access-change announcements and asks the concerned connections of this
/// instance to re-check. Core NATS: the client resubscribes by itself after a reconnect, and
/// what was announced meanwhile is caught by the periodic re-check.
pub async fn spawn_access_listener(relay: Relay) -> anyhow::Result<()> {
    let mut sub = relay.app.nats.subscribe(ACCESS_CHANGED_SUBJECT).await?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let change: AccessChange = match serde_json::from_slice(&msg.payload) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "malformed access-change announcement; ignored");
                    continue;
                }
            };
            let Some((user, scope)) = targets(&change) else {
                tracing::warn!(?change, "access change with an invalid id; ignored");
                continue;
            };
            let controls = match (user, &scope) {
                (Some(user), _) => relay.controls_of_user(user),
                (None, Scope::Channel(channel)) => relay.hub.controls_of(channel).await,
                (None, _) => relay.controls_of_all(),
            };
            tracing::debug!(
                ?change,
                connections = controls.len(),
                "re-checking subscriptions"
            );
            for control in controls {
                control.send(Control::Recheck(scope.clone()));
            }
        }
    });
    Ok(())
}

/// Checks `subscriptions` of `caller` against the current rights and sends the denied ones
/// back to the connection as a [`Control::Revoke`].
pub fn spawn_recheck(
    caller: Caller,
    subscriptions: Vec<(Channel, u64)>,
    mut redis: ConnectionManager,
    control: ControlSender,
) {
    tokio::spawn(async move {
        let mut denied = Vec::new();
        let checked = tokio::time::timeout(RECHECK_TIMEOUT, async {
            for (channel, sub) in subscriptions {
                match permissions::check(&caller, &channel, &mut redis).await {
                    Ok(Access::Granted) => {}
                    Ok(Access::Denied(_)) => denied.push((channel, sub)),
                    Err(e) => {
                        tracing::warn!(error = %e, %channel, "re-check failed; subscription kept until the next one");
                    }
                }
            }
        })
        .await;
        if checked.is_err() {
            tracing::warn!("re-check timed out; the rest is kept until the next one");
        }
        if !denied.is_empty() {
            control.send(Control::Revoke(denied));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Channel {
        Channel::parse(s).unwrap()
    }

    #[test]
    fn scopes_cover_only_rights_stored_in_redis() {
        let p = Scope::Project("p1".into());
        assert!(p.covers(&ch("project:p1")));
        assert!(!p.covers(&ch("project:p2")));
        assert!(p.covers(&ch("document:d9")));
        assert!(!p.covers(&ch("room:r1")));
        assert!(!p.covers(&ch("user:p1")));
        let one = Scope::Channel(ch("room:r1"));
        assert!(one.covers(&ch("room:r1")) && !one.covers(&ch("room:r2")));
        for (name, covered) in [
            ("project:a", true),
            ("document:a", true),
            ("room:a", true),
            ("user:a", false),
            ("category:writing", false),
        ] {
            assert_eq!(Scope::All.covers(&ch(name)), covered, "{name}");
        }
    }

    #[test]
    fn announcements_name_who_and_what() {
        let member = AccessChange::Member {
            project_id: "p1".into(),
            user_id: "u1".into(),
        };
        assert_eq!(
            targets(&member),
            Some((Some("u1"), Scope::Project("p1".into())))
        );
        let doc = AccessChange::Document {
            project_id: "p1".into(),
            document_id: "d1".into(),
        };
        assert_eq!(
            targets(&doc),
            Some((None, Scope::Channel(ch("document:d1"))))
        );
        let room = AccessChange::RoomParticipant {
            room_id: "r1".into(),
            user_id: "u1".into(),
        };
        assert_eq!(
            targets(&room),
            Some((Some("u1"), Scope::Channel(ch("room:r1"))))
        );
        let bad = AccessChange::Member {
            project_id: "p.>".into(),
            user_id: "u1".into(),
        };
        assert_eq!(targets(&bad), None);
    }
}
