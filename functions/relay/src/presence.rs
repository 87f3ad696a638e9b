//! User presence reports (issue 12): what this instance's connections did, published in
//! batches on `presence.report.{instanceId}` (the PRESENCE stream) for the presence worker,
//! which owns the online / away / offline state.
//!
//! The hot path stays cheap: a connection's client frames cost one relaxed atomic load each
//! (the connection's "active" flag is already set); only the first frame of a report interval
//! takes the reporter's lock to note the connection. Opens and closes are noted as they
//! happen. Every `report_interval` the notes become one report; when there is nothing to say
//! an empty report still goes every `heartbeat`, because reports are the instance's
//! heartbeat: an instance that stops reporting (killed, partitioned) has its connections
//! swept by the presence worker after the heartbeat TTL.
//!
//! A report that could not be published is retried as it is, with the same message id (the
//! stream drops it if the first attempt was stored after all); what happens meanwhile waits
//! for the next report, so nothing is reordered or lost while NATS is away. When the worker
//! swept this instance although it is alive (its reports were late), it asks for a resync on
//! `inkwire.presence.resync.{instanceId}` and the next report lists every live connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use inkwire_shared::consumer::Shutdown;
use inkwire_shared::jetstream::{self, Outgoing};
use inkwire_shared::subjects;
use inkwire_shared::user_presence::{Active, Closed, Device, Opened, Report};

/// How often reports go and how often an idle instance still heartbeats.
#[derive(Debug, Clone)]
pub struct PresenceReportConfig {
    pub report_interval: Duration,
    pub heartbeat: Duration,
}

impl Default for PresenceReportConfig {
    fn default() -> Self {
        PresenceReportConfig {
            report_interval: Duration::from_secs(1),
            heartbeat: Duration::from_secs(10),
        }
    }
}

struct Live {
    connection: String,
    user: String,
    device: Device,
    at_ms: u64,
}

/// Opens and closes in the order they happened: a report is a prefix of this log, so a
/// connection's close never goes before its open.
enum Event {
    Opened(Opened),
    Closed(Closed),
}

#[derive(Default)]
struct Pending {
    live: HashMap<u64, Live>,
    log: std::collections::VecDeque<Event>,
    /// Connections that sent frames since the last report, with their flags to reset.
    active: Vec<(Active, Arc<AtomicBool>)>,
    resync: bool,
}

/// Most opens, closes and active connections in one report: keeps a report far below
/// NATS's `max_payload` (a few hundred KB at most) when thousands of clients connect at
/// once or a resync lists every connection; the rest follows at once in further reports.
pub const MAX_REPORT_ENTRIES: usize = 2000;

/// Collects this instance's connection events and publishes them as reports.
pub struct PresenceReporter {
    instance: String,
    pending: Mutex<Pending>,
}

/// A connection's handle: marks it active at the cost of an atomic load per frame.
#[derive(Clone)]
pub struct ActivityMark {
    id: u64,
    flag: Arc<AtomicBool>,
    reporter: Arc<PresenceReporter>,
}

impl ActivityMark {
    /// Called for every client frame.
    #[inline]
    pub fn touch(&self) {
        if !self.flag.load(Ordering::Relaxed) && !self.flag.swap(true, Ordering::Relaxed) {
            self.reporter.note_active(self.id, self.flag.clone());
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PresenceReporter {
    pub fn new(instance: String) -> Arc<PresenceReporter> {
        Arc::new(PresenceReporter {
            instance,
            pending: Mutex::default(),
        })
    }

    /// Notes a connection that opened (opening counts as activity).
    pub fn opened(
        self: &Arc<Self>,
        id: u64,
        connection: &str,
        user: &str,
        device: Device,
    ) -> ActivityMark {
        let at_ms = now_ms();
        let mut p = self.pending.lock().expect("presence lock");
        p.log.push_back(Event::Opened(Opened {
            connection: connection.to_string(),
            user: user.to_string(),
            device: device.clone(),
            at_ms,
        }));
        p.live.insert(
            id,
            Live {
                connection: connection.to_string(),
                user: user.to_string(),
                device,
                at_ms,
            },
        );
        ActivityMark {
            id,
            flag: Arc::new(AtomicBool::new(false)),
            reporter: self.clone(),
        }
    }

    /// Notes a connection that closed.
    pub fn closed(&self, id: u64) {
        let mut p = self.pending.lock().expect("presence lock");
        if let Some(live) = p.live.remove(&id) {
            p.log.push_back(Event::Closed(Closed {
                connection: live.connection,
                user: live.user,
                at_ms: now_ms(),
            }));
        }
    }

    fn note_active(&self, id: u64, flag: Arc<AtomicBool>) {
        let mut p = self.pending.lock().expect("presence lock");
        let entry = p.live.get(&id).map(|l| Active {
            connection: l.connection.clone(),
            user: l.user.clone(),
        });
        if let Some(active) = entry {
            p.active.push((active, flag));
        }
    }

    fn request_resync(&self) {
        self.pending.lock().expect("presence lock").resync = true;
    }

    /// Takes what was noted since the last report (at most `max` entries) as report number
    /// `seq`; the flag says whether more is left for another report at once.
    fn take(&self, seq: u64, max: usize) -> (Report, bool) {
        let mut p = self.pending.lock().expect("presence lock");
        let resync = std::mem::take(&mut p.resync);
        if resync {
            // Every live connection opens again, before the closes still to report (the
            // opens noted so far are among the live ones, or closed).
            let closes: Vec<Event> = std::mem::take(&mut p.log)
                .into_iter()
                .filter(|e| matches!(e, Event::Closed(_)))
                .collect();
            let opens: Vec<Event> = p
                .live
                .values()
                .map(|l| {
                    Event::Opened(Opened {
                        connection: l.connection.clone(),
                        user: l.user.clone(),
                        device: l.device.clone(),
                        at_ms: l.at_ms,
                    })
                })
                .collect();
            p.log = opens.into_iter().chain(closes).collect();
        }
        let mut report = Report {
            instance: self.instance.clone(),
            seq,
            at_ms: now_ms(),
            resync,
            ..Default::default()
        };
        let n = p.log.len().min(max);
        for event in p.log.drain(..n) {
            match event {
                Event::Opened(o) => report.opened.push(o),
                Event::Closed(c) => report.closed.push(c),
            }
        }
        // Activity goes with the last part, after the opens it may refer to.
        if p.log.is_empty() {
            let room = max.saturating_sub(n).max(1);
            let k = p.active.len().min(room);
            report.active = p
                .active
                .drain(..k)
                .map(|(a, flag)| {
                    flag.store(false, Ordering::Relaxed);
                    a
                })
                .collect();
        }
        let more = !p.log.is_empty() || !p.active.is_empty();
        (report, more)
    }

    /// Publishes reports until `shutdown`, then sends what is left once more.
    pub async fn run(
        self: Arc<Self>,
        nats: async_nats::Client,
        js: async_nats::jetstream::Context,
        config: PresenceReportConfig,
        mut shutdown: Shutdown,
    ) {
        if let Ok(mut sub) = nats
            .subscribe(subjects::presence_resync_subject(&self.instance))
            .await
        {
            let me = self.clone();
            tokio::spawn(async move {
                while sub.next().await.is_some() {
                    me.request_resync();
                }
            });
        }
        let subject = subjects::presence_report_subject(&self.instance);
        // Seqs start at the current time so that a restarted instance (a new instance id
        // anyway) never reuses a message id within the duplicate window.
        let mut seq = now_ms();
        let mut unsent: Option<Report> = None;
        let mut last_sent = tokio::time::Instant::now() - config.heartbeat;
        let mut tick = tokio::time::interval(config.report_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = false;
        // More is noted than one report holds: send the next one without waiting.
        let mut more = false;
        loop {
            if !stopping && !more {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait() => {
                        // Let the connections close (they report their closes) first.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        stopping = true;
                    }
                }
            }
            more = false;
            if unsent.is_none() {
                let (report, left) = self.take(seq, MAX_REPORT_ENTRIES);
                more = left;
                if !report.is_empty() || last_sent.elapsed() >= config.heartbeat {
                    seq += 1;
                    unsent = Some(report);
                }
            }
            if let Some(report) = &unsent {
                let msg = Outgoing {
                    subject: subject.clone(),
                    msg_id: format!("presence-{}-{}", report.instance, report.seq),
                    payload: Bytes::from(serde_json::to_vec(report).expect("reports serialize")),
                };
                match jetstream::publish(&js, msg).await {
                    Ok(_) => {
                        unsent = None;
                        last_sent = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "presence report not published; retrying");
                        // Wait for the next tick (or give up, when stopping).
                        more = false;
                    }
                }
            }
            if stopping && (!more || unsent.is_some()) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_batch_activity_and_resync_lists_live_connections() {
        let r = PresenceReporter::new("i1".into());
        let a = r.opened(1, "i1-1", "ann", Device::default());
        let _b = r.opened(2, "i1-2", "bob", Device::default());
        a.touch();
        a.touch();
        let (first, more) = r.take(1, MAX_REPORT_ENTRIES);
        assert!(!more);
        assert_eq!(first.opened.len(), 2);
        assert_eq!(first.active.len(), 1, "one entry per interval");
        assert!(!first.resync);
        a.touch();
        r.closed(2);
        let (second, _) = r.take(2, MAX_REPORT_ENTRIES);
        assert!(second.opened.is_empty());
        assert_eq!(second.active.len(), 1);
        assert_eq!(second.closed[0].user, "bob");
        assert!(r.take(3, MAX_REPORT_ENTRIES).0.is_empty());
        r.request_resync();
        let (third, _) = r.take(4, MAX_REPORT_ENTRIES);
        assert!(third.resync);
        assert_eq!(third.opened.len(), 1);
        assert_eq!(third.opened[0].connection, "i1-1");
    }

    #[test]
    fn large_batches_are_split_in_order_with_activity_last() {
        let r = PresenceReporter::new("i1".into());
        let marks: Vec<ActivityMark> = (0..5)
            .map(|i| r.opened(i, &format!("i1-{i}"), "u", Device::default()))
            .collect();
        marks[4].touch();
        r.closed(0);
        let (first, more) = r.take(1, 3);
        assert!(more);
        assert_eq!(first.opened.len(), 3);
        assert!(first.closed.is_empty() && first.active.is_empty());
        let (second, more) = r.take(2, 3);
        assert!(!more);
        assert_eq!(second.opened.len(), 2);
        assert_eq!(second.closed[0].connection, "i1-0");
        assert_eq!(second.active[0].connection, "i1-4");
    }
}
