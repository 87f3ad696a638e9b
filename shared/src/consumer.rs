//! The durable pull-consumer runner every worker uses.
//!
//! - bounded pulls (a small batch per pull request) so `ack_wait` clocks do not start on
//!   many messages that will wait long in a local buffer;
//! - explicit ack after the handler succeeds;
//! - a retryable failure is nak'ed with the next backoff delay (spread by [`Jitter`] when the
//!   spec asks for it); a permanent failure, or a
//!   retryable one on the last allowed delivery, is copied to `dlq.<subject>` with the reason
//!   and then terminated, so nothing is dropped silently;
//! - the server's max-deliveries advisory is watched too, so a message whose last delivery
//!   timed out (a crashed or hung handler) is dead-lettered as well;
//! - on shutdown the runner finishes the message in hand, releases the rest of the batch
//!   (nak without delay) and returns.
//!
//! Two shapes: [`run`] (one message at a time) and [`run_write_behind`] (a worker that
//! applies what is at hand in memory and makes its state durable in periodic flushes; each
//! message is acked only after the flush that covers it).

use std::future::Future;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::{AckKind, Context, Message};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use crate::subjects::{self, dlq_headers};

/// What a durable consumer reads and how it retries.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    pub durable: String,
    /// Empty for every subject of the stream.
    pub filter_subject: String,
    /// Delays before the 2nd, 3rd, ... delivery; the last one repeats if there are fewer
    /// delays than deliveries.
    pub backoff: Vec<Duration>,
    /// Deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// How long the handler may take before the server redelivers.
    pub ack_wait: Duration,
    /// Messages per pull request (the most buffered locally).
    pub batch: usize,
    /// How long one pull request waits for messages before it is renewed.
    pub fetch_expires: Duration,
    pub deliver_policy: DeliverPolicy,
    /// Unacknowledged messages the server lets this consumer have; by default four batches.
    /// A write-behind worker holds a whole flush's worth.
    pub max_ack_pending: Option<i64>,
    /// How the backoff delays are spread (none by default: the delays as listed).
    pub jitter: Jitter,
}

/// Randomisation of retry delays, so that messages that failed together (a provider that was
/// down for all of them) do not come back together and knock it over again.
///
/// With `d` the listed backoff delay:
/// - [`Jitter::None`]: exactly `d`;
/// - [`Jitter::Full`]: uniformly in `[0, d]` — the widest spread, but a retry may come at once;
/// - [`Jitter::Equal`]: uniformly in `[d/2, d]` — half the spread, and never sooner than half
///   the delay, so a peer that is down still gets a rest between attempts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Jitter {
    #[default]
    None,
    Full,
    Equal,
}

impl Jitter {
    /// `none`, `full` or `equal`.
    pub fn parse(s: &str) -> Option<Jitter> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Some(Jitter::None),
            "full" => Some(Jitter::Full),
            "equal" => Some(Jitter::Equal),
            _ => None,
        }
    }

    /// `delay` spread by this jitter, `unit` a number in `[0, 1]` (the random draw).
    pub fn apply(self, delay: Duration, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        match self {
            Jitter::None => delay,
            Jitter::Full => delay.mul_f64(unit),
            Jitter::Equal => delay / 2 + (delay / 2).mul_f64(unit),
        }
    }
}

/// A uniform draw in `[0, 1]` from the operating system's generator (through a v4 UUID's
/// random bits, to need no other crate). Retry delays need spread, not cryptography. The
/// lowest 53 bits are all random (a v4 UUID's fixed version and variant bits are above them).
fn random_unit() -> f64 {
    const MASK: u128 = (1 << 53) - 1;
    let bits = uuid::Uuid::new_v4().as_u128() & MASK;
    bits as f64 / MASK as f64
}

impl ConsumerSpec {
    /// Sensible defaults: 5 deliveries, 1 s / 5 s / 30 s / 2 min backoff, 30 s ack wait,
    /// batches of 50.
    pub fn new(stream: impl Into<String>, durable: impl Into<String>) -> ConsumerSpec {
        ConsumerSpec {
            stream: stream.into(),
            durable: durable.into(),
            filter_subject: String::new(),
            backoff: vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
                Duration::from_secs(120),
            ],
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            batch: 50,
            fetch_expires: Duration::from_secs(1),
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: None,
            jitter: Jitter::None,
        }
    }

    pub fn filter(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = subject.into();
        self
    }

    /// The listed delay before the delivery after `deliveries` (no jitter).
    pub fn base_delay_after(&self, deliveries: i64) -> Duration {
        let i = (deliveries.max(1) - 1) as usize;
        self.backoff
            .get(i)
            .or(self.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1))
    }

    /// The delay before the delivery after `deliveries`: the listed one, spread by
    /// [`ConsumerSpec::jitter`].
    pub fn delay_after(&self, deliveries: i64) -> Duration {
        let base = self.base_delay_after(deliveries);
        match self.jitter {
            Jitter::None => base,
            jitter => jitter.apply(base, random_unit()),
        }
    }

    fn consumer_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            filter_subject: self.filter_subject.clone(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            deliver_policy: self.deliver_policy,
            // Bounded in-flight work: at most a few batches unacknowledged.
            max_ack_pending: self
                .max_ack_pending
                .unwrap_or((self.batch as i64 * 4).max(100)),
            ..Default::default()
        }
    }
}

/// One delivered message, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub subject: String,
    pub payload: Bytes,
    pub stream_sequence: u64,
    /// 1 on the first delivery.
    pub deliveries: i64,
    /// When JetStream stored the message (`None` when not known, e.g. a message built in a
    /// test). A consumer that keeps time-based state uses it to check a client's clock.
    pub published: Option<time::OffsetDateTime>,
}

/// How a handler failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// Worth another try later (a dependency was down).
    #[error("retryable: {0}")]
    Retry(String),
    /// Will never succeed (the message is malformed): dead-letter it now.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// Counters of one runner, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunStats {
    pub acked: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

impl RunStats {
    fn add(&mut self, other: &RunStats) {
        self.acked += other.acked;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
    }
}

/// Triggers a graceful stop of runners and servers.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side of [`Shutdown`].
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

impl ShutdownTrigger {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger { tx }, Shutdown { rx })
    }
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }
    /// Completes when shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|v| *v).await;
    }
}

/// Creates the durable consumer if needed, starts watching its max-deliveries advisories and
/// opens one long-lived pull stream on it (a single inbox, pull requests renewed as messages
/// are consumed, idle heartbeats to detect a lost server). Separate short fetches, each with
/// its own inbox, lose a message that the server delivers just as a request expires.
async fn open(
    js: &Context,
    spec: &ConsumerSpec,
) -> anyhow::Result<(
    async_nats::jetstream::consumer::pull::Stream,
    tokio::task::JoinHandle<()>,
)> {
    let stream = js
        .get_stream(&spec.stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream {}: {e}", spec.stream))?;
    let consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = stream
        .get_or_create_consumer(&spec.durable, spec.consumer_config())
        .await
        .map_err(|e| anyhow::anyhow!("consumer {}: {e}", spec.durable))?;
    let advisories = spawn_max_delivery_watch(js.clone(), spec).await?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(spec.batch)
        .expires(spec.fetch_expires)
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consumer {}: {e}", spec.durable))?;
    Ok((messages, advisories))
}

/// Creates the durable consumer if needed and processes messages until `shutdown`.
pub async fn run<H, F>(
    js: Context,
    spec: ConsumerSpec,
    handler: H,
    mut shutdown: Shutdown,
) -> anyhow::Result<RunStats>
where
    H: Fn(Delivery) -> F,
    F: Future<Output = Result<(), HandlerError>>,
{
    let (mut messages, advisories) = open(&js, &spec).await?;
    let mut stats = RunStats::default();
    loop {
        let next = tokio::select! {
            n = messages.next() => n,
            _ = shutdown.wait() => break,
        };
        let Some(msg) = first_message(&spec, next)? else {
            continue;
        };
        handle_one(&js, &spec, &handler, msg, &mut stats).await;
    }
    release_buffered(&mut messages).await;
    advisories.abort();
    Ok(stats)
}

/// Like [`run`], with up to `concurrency` messages handled at once (each acked, retried or
/// dead-lettered on its own as it finishes). Messages on the same subject are handled one
/// after another, in stream order; messages on different subjects overlap. For handlers
/// whose per-subject order matters (one recipient's notifications) but whose subjects are
/// independent, so that the round trips of many subjects overlap.
pub async fn run_concurrent<H, F>(
    js: Context,
    spec: ConsumerSpec,
    handler: H,
    concurrency: usize,
    mut shutdown: Shutdown,
) -> anyhow::Result<RunStats>
where
    H: Fn(Delivery) -> F,
    F: Future<Output = Result<(), HandlerError>>,
{
    use futures::stream::FuturesUnordered;
    use std::collections::{HashMap, VecDeque};
    let concurrency = concurrency.max(1);
    let (mut messages, advisories) = open(&js, &spec).await?;
    let mut stats = RunStats::default();
    let mut in_flight = FuturesUnordered::new();
    // Subjects being handled, with the messages that arrived behind the one in flight.
    let mut waiting: HashMap<String, VecDeque<Message>> = HashMap::new();
    // Messages taken from the stream and not settled yet (in flight or waiting).
    let mut held = 0usize;
    let handle = |msg: Message| {
        let (js, spec, handler) = (&js, &spec, &handler);
        async move {
            let subject = msg.subject.to_string();
            let mut one = RunStats::default();
            handle_one(js, spec, handler, msg, &mut one).await;
            (subject, one)
        }
    };
    let mut stopping = false;
    while !stopping || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some((subject, one)) = in_flight.next(), if !in_flight.is_empty() => {
                stats.add(&one);
                held -= 1;
                let next = waiting.get_mut(&subject).and_then(VecDeque::pop_front);
                match next {
                    Some(msg) => in_flight.push(handle(msg)),
                    None => {
                        waiting.remove(&subject);
                    }
                }
            }
            n = messages.next(), if !stopping && held < concurrency => {
                if let Some(msg) = first_message(&spec, n)? {
                    held += 1;
                    match waiting.get_mut(msg.subject.as_str()) {
                        Some(queue) => queue.push_back(msg),
                        None => {
                            waiting.insert(msg.subject.to_string(), VecDeque::new());
                            in_flight.push(handle(msg));
                        }
                    }
                }
            }
            _ = shutdown.wait(), if !stopping => {
                // Graceful: what is being handled finishes and is settled; messages waiting
                // behind it are released with the rest of the buffer.
                stopping = true;
                for queue in waiting.values_mut() {
                    for msg in queue.drain(..) {
                        held -= 1;
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                    }
                }
            }
        }
    }
    release_buffered(&mut messages).await;
    advisories.abort();
    Ok(stats)
}

/// What a write-behind worker decided for one delivery.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Nothing to make durable (ignored, or a duplicate): ack now.
    Done,
    /// Applied in memory: ack once a flush reports it durable.
    Pending,
    /// Failed: nak with backoff or dead-letter, as in [`run`].
    Failed(HandlerError),
}

/// A worker that applies messages to state it holds in memory and makes that state durable
/// in flushes (one write per changed item instead of one per message). A flush may start a
/// write and return at once; the runner then waits for [`written`](Self::written) and calls
/// [`settle`](Self::settle), so input keeps being applied while the write is under way.
pub trait WriteBehind: Send {
    /// Applies the deliveries in order; one verdict per delivery.
    fn apply(&mut self, batch: Vec<Delivery>) -> impl Future<Output = Vec<Verdict>> + Send;
    /// Settles the write in flight (if any), then starts writing what
    /// [`apply`](Self::apply) left pending. Returns an outcome for each stream sequence it
    /// settled; a pending sequence it does not name stays pending. A worker that reports a
    /// failure must also forget that message's effect, since the redelivery applies it again.
    fn flush(&mut self) -> impl Future<Output = Vec<(u64, Result<(), HandlerError>)>> + Send;
    /// Completes when a write started by a flush has finished (never, if none is under way).
    /// Must be cancel-safe: the runner polls it in a `select!`.
    fn written(&mut self) -> impl Future<Output = ()> + Send;
    /// Settles a finished write, as [`flush`](Self::flush) does, without starting another.
    fn settle(&mut self) -> impl Future<Output = Vec<(u64, Result<(), HandlerError>)>> + Send;
    /// True when the worker wants a flush before it applies more.
    fn wants_flush(&self) -> bool {
        false
    }
    /// How many pending messages are in the write under way.
    fn writing(&self) -> usize {
        0
    }
    /// A flush the worker wants within this time even with nothing pending (for work it
    /// does on flushes, such as deferred notifications).
    fn next_flush(&self) -> Option<Duration> {
        None
    }
}

/// When a write-behind runner flushes: when it has caught up with the stream (nothing more
/// is waiting, and no write is under way), or `interval` after the oldest unflushed message,
/// or at `max_pending` messages, whichever comes first. Under a backlog, writes batch up to
/// an interval's worth; at a trickle, each message is written at once.
#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    /// At the latest this long after the oldest pending message was applied.
    pub interval: Duration,
    /// Or as soon as this many messages are pending.
    pub max_pending: usize,
}

/// Like [`run`], for a [`WriteBehind`] worker: messages are applied as they arrive (every
/// one already here, up to `spec.batch`, at once),
/// flushed by `policy`, and each is acked after the flush that made it durable, so a crash
/// at any point loses nothing (what was not flushed is redelivered). On shutdown the worker
/// flushes until nothing is pending (a few rounds at most).
pub async fn run_write_behind<W: WriteBehind>(
    js: Context,
    spec: ConsumerSpec,
    policy: FlushPolicy,
    mut worker: W,
    mut shutdown: Shutdown,
) -> anyhow::Result<RunStats> {
    let (mut messages, advisories) = open(&js, &spec).await?;
    let mut run = WriteBehindRun {
        js: &js,
        spec: &spec,
        policy,
        pending: std::collections::HashMap::with_capacity(policy.max_pending + spec.batch),
        due: None,
        stats: RunStats::default(),
        acking: Vec::new(),
        caught_up: false,
    };
    loop {
        let timer = async {
            match run.due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            _ = shutdown.wait() => break,
            _ = timer => {
                run.flush(&mut worker).await;
                continue;
            }
            _ = worker.written() => {
                let settled = worker.settle().await;
                run.settled(&mut worker, settled).await;
                // Idle since: what came in meanwhile is written now rather than on the timer.
                if run.caught_up && run.unwritten(&worker) > 0 {
                    run.flush(&mut worker).await;
                }
                continue;
            }
            n = messages.next() => n,
        };
        let (kept, deliveries) = match gather(&spec, &mut messages, first).await {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) => return Err(e),
        };
        let seqs: Vec<u64> = deliveries.iter().map(|d| d.stream_sequence).collect();
        // Nothing more waiting on the server: a flush now costs no batching.
        run.caught_up = kept
            .last()
            .and_then(|m| m.info().ok())
            .is_some_and(|i| i.pending == 0);
        let mut verdicts = worker.apply(deliveries).await.into_iter();
        let mut done = Vec::new();
        for (msg, seq) in kept.into_iter().zip(seqs) {
            match verdicts.next() {
                Some(Verdict::Done) => done.push(msg),
                Some(Verdict::Failed(e)) => settle(&js, &spec, msg, Err(e), &mut run.stats).await,
                Some(Verdict::Pending) => run.hold(msg, seq),
                None => {
                    let e = HandlerError::Retry("no verdict from the worker".into());
                    settle(&js, &spec, msg, Err(e), &mut run.stats).await
                }
            }
        }
        run.ack_all(done);
        let unwritten = run.unwritten(&worker);
        if unwritten >= policy.max_pending
            || worker.wants_flush()
            || (run.caught_up && worker.writing() == 0 && unwritten > 0)
        {
            run.flush(&mut worker).await;
        }
    }
    for _ in 0..3 {
        if run.pending.is_empty() {
            break;
        }
        run.flush(&mut worker).await;
    }
    // Whatever the last flushes could not settle goes back to the server at once.
    for (_, msg) in run.pending.drain() {
        let _ = msg.ack_with(AckKind::Nak(None)).await;
    }
    for task in run.acking.drain(..) {
        let _ = task.await;
    }
    release_buffered(&mut messages).await;
    advisories.abort();
    Ok(run.stats)
}

/// The bookkeeping of [`run_write_behind`]: messages held until a flush covers them.
struct WriteBehindRun<'a> {
    js: &'a Context,
    spec: &'a ConsumerSpec,
    policy: FlushPolicy,
    pending: std::collections::HashMap<u64, Message>,
    due: Option<tokio::time::Instant>,
    stats: RunStats,
    /// Background ack tasks, awaited before the runner returns.
    acking: Vec<tokio::task::JoinHandle<()>>,
    /// The last batch left nothing waiting on the server.
    caught_up: bool,
}

impl WriteBehindRun<'_> {
    /// Pending messages not yet in a write.
    fn unwritten<W: WriteBehind>(&self, worker: &W) -> usize {
        self.pending.len().saturating_sub(worker.writing())
    }

    fn hold(&mut self, msg: Message, seq: u64) {
        self.pending.insert(seq, msg);
        let interval = self.policy.interval;
        self.due
            .get_or_insert_with(|| tokio::time::Instant::now() + interval);
    }

    /// Acks in the background: the acks of one flush are many, and the next batch need not
    /// wait for them to be written.
    fn ack_all(&mut self, msgs: Vec<Message>) {
        if msgs.is_empty() {
            return;
        }
        self.stats.acked += msgs.len() as u64;
        self.acking.retain(|t| !t.is_finished());
        self.acking.push(tokio::spawn(async move {
            for msg in msgs {
                if let Err(e) = msg.ack().await {
                    tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                }
            }
        }));
    }

    async fn flush<W: WriteBehind>(&mut self, worker: &mut W) {
        let settled = worker.flush().await;
        // Everything applied so far is now in a write (or settled): the flush timer starts
        // again with the next message.
        self.due = None;
        self.settled(worker, settled).await;
    }

    /// Acks (or retries) what a flush or settle reported, and sets the next flush time.
    async fn settled<W: WriteBehind>(
        &mut self,
        worker: &mut W,
        settled: Vec<(u64, Result<(), HandlerError>)>,
    ) {
        let mut done = Vec::new();
        for (seq, outcome) in settled {
            let Some(msg) = self.pending.remove(&seq) else {
                continue;
            };
            match outcome {
                Ok(()) => done.push(msg),
                Err(e) => settle(self.js, self.spec, msg, Err(e), &mut self.stats).await,
            }
        }
        self.ack_all(done);
        // Messages in a write under way are settled when it is written; the timer is for
        // what is still to be written.
        let now = tokio::time::Instant::now();
        let by_pending =
            (self.unwritten(worker) > 0).then(|| self.due.unwrap_or(now + self.policy.interval));
        let by_worker = worker.next_flush().map(|d| now + d);
        self.due = match (by_pending, by_worker) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

/// What the pull stream gave: the message, `None` after a stream error (logged; the caller
/// goes on), an error when the stream ended.
fn first_message(
    spec: &ConsumerSpec,
    next: Option<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>>,
) -> anyhow::Result<Option<Message>> {
    match next {
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(e)) => {
            tracing::warn!(consumer = %spec.durable, error = %e, "pull stream error; continuing");
            Ok(None)
        }
        None => anyhow::bail!("consumer {}: pull stream ended", spec.durable),
    }
}

/// A batch: the first message (what the pull stream just gave) and every one already here
/// after it, up to `spec.batch`, with the handler's view of each. `None` after a stream
/// error (logged; the caller goes on), an error when the stream ended.
async fn gather(
    spec: &ConsumerSpec,
    messages: &mut async_nats::jetstream::consumer::pull::Stream,
    first: Option<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>>,
) -> anyhow::Result<Option<(Vec<Message>, Vec<Delivery>)>> {
    use futures::FutureExt;
    let Some(first) = first_message(spec, first)? else {
        return Ok(None);
    };
    let mut batch = vec![first];
    while batch.len() < spec.batch {
        match messages.next().now_or_never() {
            Some(Some(Ok(m))) => batch.push(m),
            _ => break,
        }
    }
    let mut kept = Vec::with_capacity(batch.len());
    let mut deliveries = Vec::with_capacity(batch.len());
    for m in batch {
        if let Some(d) = delivery_of(&m).await {
            deliveries.push(d);
            kept.push(m);
        }
    }
    Ok(Some((kept, deliveries)))
}

/// Naks (without delay) the messages that already reached this process, so that
/// another instance gets them at once instead of after `ack_wait`.
async fn release_buffered(messages: &mut async_nats::jetstream::consumer::pull::Stream) {
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout(Duration::from_millis(20), messages.next()).await
    {
        let _ = msg.ack_with(AckKind::Nak(None)).await;
    }
}

async fn handle_one<H, F>(
    js: &Context,
    spec: &ConsumerSpec,
    handler: &H,
    msg: Message,
    stats: &mut RunStats,
) where
    H: Fn(Delivery) -> F,
    F: Future<Output = Result<(), HandlerError>>,
{
    let Some(delivery) = delivery_of(&msg).await else {
        return;
    };
    // A handler that outlives ack_wait would be redelivered anyway: count it as a retry.
    let outcome = match tokio::time::timeout(spec.ack_wait, handler(delivery)).await {
        Ok(r) => r,
        Err(_) => Err(HandlerError::Retry(format!(
            "handler took longer than {:?}",
            spec.ack_wait
        ))),
    };
    settle(js, spec, msg, outcome, stats).await;
}

/// The handler's view of a message; terminates messages without JetStream metadata.
async fn delivery_of(msg: &Message) -> Option<Delivery> {
    match msg.info() {
        Ok(info) => Some(Delivery {
            subject: msg.subject.to_string(),
            payload: msg.payload.clone(),
            stream_sequence: info.stream_sequence,
            deliveries: info.delivered,
            published: Some(info.published),
        }),
        Err(e) => {
            tracing::warn!(error = %e, "message without JetStream metadata; terminating");
            let _ = msg.ack_with(AckKind::Term).await;
            None
        }
    }
}

/// Acks, naks with backoff, or dead-letters a message according to its handler's outcome.
async fn settle(
    js: &Context,
    spec: &ConsumerSpec,
    msg: Message,
    outcome: Result<(), HandlerError>,
    stats: &mut RunStats,
) {
    let (seq, deliveries) = match msg.info() {
        Ok(info) => (info.stream_sequence, info.delivered),
        Err(_) => return,
    };
    match outcome {
        Ok(()) => {
            if let Err(e) = msg.ack().await {
                tracing::warn!(error = %e, seq, "ack failed; the message will be redelivered");
            }
            stats.acked += 1;
        }
        Err(HandlerError::Retry(reason)) if deliveries < spec.max_deliver => {
            let delay = spec.delay_after(deliveries);
            tracing::info!(consumer = %spec.durable, seq, deliveries, ?delay, %reason, "retrying");
            let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
            stats.retried += 1;
        }
        Err(e) => {
            let reason = match e {
                HandlerError::Retry(r) => format!("gave up after {deliveries} deliveries: {r}"),
                HandlerError::Permanent(r) => format!("permanent failure: {r}"),
            };
            let original = DeadLetter {
                subject: msg.subject.as_str(),
                payload: msg.payload.clone(),
                stream: &spec.stream,
                sequence: seq,
                consumer: &spec.durable,
                deliveries,
                reason: &reason,
            };
            match dead_letter(js, original).await {
                Ok(()) => {
                    tracing::warn!(consumer = %spec.durable, seq, %reason, "dead-lettered");
                    let _ = msg.ack_with(AckKind::Term).await;
                    stats.dead_lettered += 1;
                }
                Err(err) => {
                    // Never drop: keep it in the stream and try again later.
                    tracing::error!(error = %err, seq, "dead-letter copy failed; will retry");
                    let _ = msg
                        .ack_with(AckKind::Nak(Some(spec.delay_after(deliveries))))
                        .await;
                }
            }
        }
    }
}

struct DeadLetter<'a> {
    subject: &'a str,
    payload: Bytes,
    stream: &'a str,
    sequence: u64,
    consumer: &'a str,
    deliveries: i64,
    reason: &'a str,
}

/// Copies a message to `dlq.<subject>` with the reason; the id `<stream>:<seq>:<consumer>`
/// makes a repeated copy a duplicate.
async fn dead_letter(js: &Context, d: DeadLetter<'_>) -> Result<(), async_nats::Error> {
    let mut headers = HeaderMap::new();
    // Header values must be one line.
    let reason: String = d
        .reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    headers.insert(dlq_headers::REASON, reason.as_str());
    headers.insert(dlq_headers::STREAM, d.stream);
    headers.insert(dlq_headers::SEQUENCE, d.sequence.to_string().as_str());
    headers.insert(dlq_headers::CONSUMER, d.consumer);
    headers.insert(dlq_headers::DELIVERIES, d.deliveries.to_string().as_str());
    headers.insert(dlq_headers::SUBJECT, d.subject);
    let id = format!("{}:{}:{}", d.stream, d.sequence, d.consumer);
    js.send_publish(
        subjects::dlq_subject(d.subject),
        Publish::build()
            .payload(d.payload)
            .headers(headers)
            .message_id(id),
    )
    .await?
    .await?;
    Ok(())
}

#[derive(Deserialize)]
struct MaxDeliveriesAdvisory {
    stream_seq: u64,
    deliveries: i64,
}

/// Watches `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`: the server sends
/// it when a message ran out of deliveries without a verdict from us (every delivery timed
/// out). The message is then read back from the stream and dead-lettered.
async fn spawn_max_delivery_watch(
    js: Context,
    spec: &ConsumerSpec,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        spec.stream, spec.durable
    );
    let mut sub = js.client().subscribe(subject).await?;
    let stream_name = spec.stream.clone();
    let consumer = spec.durable.clone();
    Ok(tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let Ok(adv) = serde_json::from_slice::<MaxDeliveriesAdvisory>(&msg.payload) else {
                continue;
            };
            let Ok(stream) = js.get_stream(&stream_name).await else {
                continue;
            };
            let Ok(original) = stream.get_raw_message(adv.stream_seq).await else {
                continue;
            };
            let d = DeadLetter {
                subject: original.subject.as_str(),
                payload: original.payload.clone(),
                stream: &stream_name,
                sequence: adv.stream_seq,
                consumer: &consumer,
                deliveries: adv.deliveries,
                reason: "max deliveries reached without an acknowledgement (handler timed out or crashed)",
            };
            if let Err(e) = dead_letter(&js, d).await {
                tracing::error!(error = %e, seq = adv.stream_seq, "dead-letter copy from advisory failed");
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_repeats_last_delay() {
        let mut s = ConsumerSpec::new("S", "d");
        s.backoff = vec![Duration::from_millis(10), Duration::from_millis(20)];
        assert_eq!(s.delay_after(1), Duration::from_millis(10));
        assert_eq!(s.delay_after(2), Duration::from_millis(20));
        assert_eq!(s.delay_after(7), Duration::from_millis(20));
    }

    #[test]
    fn jitter_bounds() {
        let d = Duration::from_secs(10);
        assert_eq!(Jitter::None.apply(d, 0.3), d);
        assert_eq!(Jitter::Full.apply(d, 0.0), Duration::ZERO);
        assert_eq!(Jitter::Full.apply(d, 1.0), d);
        assert_eq!(Jitter::Equal.apply(d, 0.0), Duration::from_secs(5));
        assert_eq!(Jitter::Equal.apply(d, 1.0), d);
        // Out-of-range draws are clamped, never beyond the listed delay.
        assert_eq!(Jitter::Full.apply(d, 7.0), d);
        assert_eq!(Jitter::Equal.apply(d, -1.0), Duration::from_secs(5));
        assert_eq!(Jitter::parse(" Equal "), Some(Jitter::Equal));
        assert_eq!(Jitter::parse("half"), None);
    }

    #[test]
    fn jittered_delays_stay_within_their_bounds_and_spread() {
        let mut s = ConsumerSpec::new("S", "d");
        s.backoff = vec![Duration::from_secs(2), Duration::from_secs(60)];
        for (jitter, low_fraction) in [(Jitter::Full, 0.0), (Jitter::Equal, 0.5)] {
            s.jitter = jitter;
            for deliveries in [1, 2, 9] {
                let base = s.base_delay_after(deliveries);
                let low = base.mul_f64(low_fraction);
                let draws: Vec<Duration> = (0..500).map(|_| s.delay_after(deliveries)).collect();
                for d in &draws {
                    assert!(
                        *d >= low && *d <= base,
                        "{jitter:?}: {d:?} outside {low:?}..={base:?}"
                    );
                }
                let distinct: std::collections::HashSet<_> = draws.iter().collect();
                assert!(distinct.len() > 400, "{jitter:?}: draws do not spread");
                // Both halves of the range are reached.
                let mid = low + (base - low) / 2;
                assert!(draws.iter().any(|d| *d < mid) && draws.iter().any(|d| *d > mid));
            }
        }
        s.jitter = Jitter::None;
        assert_eq!(s.delay_after(2), Duration::from_secs(60));
    }

    #[test]
    fn random_units_are_in_range() {
        for _ in 0..1000 {
            let u = random_unit();
            assert!((0.0..=1.0).contains(&u), "{u}");
        }
    }
}
