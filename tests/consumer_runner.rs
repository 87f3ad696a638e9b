//! The durable consumer runner against a real JetStream: retries with backoff, dead letters,
//! exactly-once effects on redelivery, graceful stop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use bytes::Bytes;
use futures::StreamExt;
use inkwire_shared::consumer::{
    ConsumerSpec, Delivery, FlushPolicy, HandlerError, RunStats, Shutdown, ShutdownTrigger,
    Verdict, WriteBehind, run, run_concurrent, run_write_behind,
};
use inkwire_shared::idempotency::{Writes, apply_once, high_water_mark};
use inkwire_shared::subjects::dlq_headers;
use inkwire_tests::TestEnv;

fn spec(durable: &str) -> ConsumerSpec {
    let mut s = ConsumerSpec::new("EVENTS_SYSTEM", durable).filter("events.system.>");
    s.backoff = vec![Duration::from_millis(200), Duration::from_millis(400)];
    s.max_deliver = 3;
    s.ack_wait = Duration::from_secs(5);
    s.fetch_expires = Duration::from_secs(1);
    s
}

async fn publish(env: &TestEnv, id: &str, body: &str) {
    inkwire_shared::jetstream::publish(
        &env.state.js,
        inkwire_shared::jetstream::Outgoing {
            subject: "events.system.service_started".into(),
            msg_id: id.into(),
            payload: Bytes::from(body.to_string()),
        },
    )
    .await
    .unwrap();
}

/// Runs the handler in the background; returns a trigger and the join handle.
fn start<H, F>(
    env: &TestEnv,
    spec: ConsumerSpec,
    handler: H,
) -> (ShutdownTrigger, tokio::task::JoinHandle<RunStats>)
where
    H: Fn(Delivery) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<(), HandlerError>> + Send,
{
    let (trigger, shutdown): (ShutdownTrigger, Shutdown) = ShutdownTrigger::new();
    let js = env.state.js.clone();
    let task = tokio::spawn(async move { run(js, spec, handler, shutdown).await.unwrap() });
    (trigger, task)
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Dead letters written by consumer `durable` (the router, which also runs in the test
/// environment, dead-letters these non-event payloads too).
async fn dead_letters(env: &TestEnv, durable: &str) -> Vec<async_nats::jetstream::Message> {
    let stream = env.state.js.get_stream("DLQ").await.unwrap();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_millis(300))
        .messages()
        .await
        .unwrap();
    while let Some(Ok(m)) = batch.next().await {
        let consumer = m
            .headers
            .as_ref()
            .and_then(|h| h.get(dlq_headers::CONSUMER))
            .map(|v| v.as_str().to_string());
        if consumer.as_deref() == Some(durable) {
            out.push(m);
        }
    }
    out
}

#[tokio::test]
async fn retries_with_backoff_then_succeeds() {
    let env = TestEnv::start().await;
    publish(&env, "m-1", "{}").await;
    let seen: Arc<Mutex<Vec<(i64, Instant)>>> = Arc::default();
    let log = seen.clone();
    let (trigger, task) = start(&env, spec("retry"), move |d: Delivery| {
        let log = log.clone();
        async move {
            log.lock().unwrap().push((d.deliveries, Instant::now()));
            if d.deliveries < 3 {
                Err(HandlerError::Retry("not yet".into()))
            } else {
                Ok(())
            }
        }
    });
    wait_until("three deliveries", || seen.lock().unwrap().len() == 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.trigger();
    let stats = task.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        stats,
        RunStats {
            acked: 1,
            retried: 2,
            dead_lettered: 0
        },
        "deliveries seen: {seen:?}"
    );
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(
        seen[1].1 - seen[0].1 >= Duration::from_millis(190),
        "first backoff honoured"
    );
    assert!(
        seen[2].1 - seen[1].1 >= Duration::from_millis(390),
        "second backoff honoured"
    );
    assert!(dead_letters(&env, "retry").await.is_empty());
}

#[tokio::test]
async fn dead_letters_after_the_last_delivery_and_on_permanent_errors() {
    let env = TestEnv::start().await;
    publish(&env, "always-fails", r#"{"n":1}"#).await;
    publish(&env, "malformed", r#"{"n":2}"#).await;
    let (trigger, task) = start(&env, spec("dlq"), |d: Delivery| async move {
        if d.payload.as_ref() == br#"{"n":2}"# {
            Err(HandlerError::Permanent("cannot parse".into()))
        } else {
            Err(HandlerError::Retry("dependency down".into()))
        }
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    let dlq = loop {
        let d = dead_letters(&env, "dlq").await;
        if d.len() == 2 || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    trigger.trigger();
    let stats = task.await.unwrap();
    assert_eq!(dlq.len(), 2, "both messages dead-lettered");
    assert_eq!(stats.dead_lettered, 2);
    assert_eq!(stats.retried, 2);
    let header = |m: &async_nats::jetstream::Message, h: &str| {
        m.headers
            .as_ref()
            .unwrap()
            .get(h)
            .unwrap()
            .as_str()
            .to_string()
    };
    let permanent = dlq
        .iter()
        .find(|m| m.payload.as_ref() == br#"{"n":2}"#)
        .unwrap();
    assert_eq!(
        permanent.subject.as_str(),
        "dlq.events.system.service_started"
    );
    assert_eq!(header(permanent, dlq_headers::DELIVERIES), "1");
    assert!(header(permanent, dlq_headers::REASON).contains("cannot parse"));
    let exhausted = dlq
        .iter()
        .find(|m| m.payload.as_ref() == br#"{"n":1}"#)
        .unwrap();
    assert_eq!(header(exhausted, dlq_headers::DELIVERIES), "3");
    assert_eq!(header(exhausted, dlq_headers::STREAM), "EVENTS_SYSTEM");
    assert_eq!(header(exhausted, dlq_headers::SEQUENCE), "1");
    assert!(header(exhausted, dlq_headers::REASON).contains("dependency down"));

    // Nothing is left pending on the consumer.
    let mut consumer: async_nats::jetstream::consumer::Consumer<pull::Config> = env
        .state
        .js
        .get_stream("EVENTS_SYSTEM")
        .await
        .unwrap()
        .get_consumer("dlq")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
}

#[tokio::test]
async fn a_redelivered_message_counts_once_even_out_of_order() {
    let env = TestEnv::start().await;
    publish(&env, "a", "a").await;
    publish(&env, "b", "b").await;
    let window = Duration::from_secs(600);
    let redis = env.state.redis.clone();
    let (trigger, task) = start(&env, spec("once"), move |d: Delivery| {
        let mut redis = redis.clone();
        async move {
            let writes = Writes::new().cmd(["INCR", "test:count"]).cmd([
                "RPUSH",
                "test:order",
                std::str::from_utf8(&d.payload).unwrap(),
            ]);
            match (&d.payload[..], d.deliveries) {
                // "a" fails before writing on its first delivery, so "b" is applied first.
                (b"a", 1) => Err(HandlerError::Retry("transient".into())),
                _ => {
                    let applied = apply_once(
                        &mut redis,
                        "once",
                        "doc-1",
                        d.stream_sequence,
                        &writes,
                        window,
                    )
                    .await
                    .map_err(|e| HandlerError::Retry(e.to_string()))?;
                    // "b" crashes after its writes on the first delivery: the ack never happens.
                    if &d.payload[..] == b"b" && d.deliveries == 1 {
                        assert!(applied);
                        return Err(HandlerError::Retry("crashed after writing".into()));
                    }
                    Ok(())
                }
            }
        }
    });
    let mut redis = env.state.redis.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Result<async_nats::jetstream::consumer::Consumer<pull::Config>, _> = env
            .state
            .js
            .get_stream("EVENTS_SYSTEM")
            .await
            .unwrap()
            .get_consumer("once")
            .await;
        if let Ok(mut consumer) = found {
            let info = consumer.info().await.unwrap();
            if info.delivered.stream_sequence == 2
                && info.num_pending == 0
                && info.num_ack_pending == 0
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "messages not settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    trigger.trigger();
    let stats = task.await.unwrap();
    assert_eq!(stats.acked, 2);
    let count: i64 = redis::cmd("GET")
        .arg("test:count")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(count, 2, "each message counted exactly once");
    let order: Vec<String> = redis::cmd("LRANGE")
        .arg("test:order")
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(order, vec!["b", "a"]);
    assert_eq!(
        high_water_mark(&mut redis, "once", "doc-1").await.unwrap(),
        2
    );
}

#[tokio::test]
async fn shutdown_stops_the_runner_promptly() {
    let env = TestEnv::start().await;
    let (trigger, task) = start(&env, spec("idle"), |_d: Delivery| async { Ok(()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    trigger.trigger();
    tokio::time::timeout(Duration::from_secs(3), task)
        .await
        .expect("runner stops")
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// A write-behind worker that keeps what it applied in memory and "saves" it to `stored` on
/// a flush; the first `fail_flushes` flushes fail (and forget the unsaved state). With a
/// `gate`, a save is a write under way that completes only when the gate gets a permit.
struct Counter {
    applied: Vec<u64>,
    writing: Vec<u64>,
    written: bool,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    stored: Arc<Mutex<Vec<u64>>>,
    seen: Arc<Mutex<usize>>,
    fail_flushes: usize,
}

impl Counter {
    fn new(stored: &Arc<Mutex<Vec<u64>>>, seen: &Arc<Mutex<usize>>) -> Counter {
        Counter {
            applied: Vec::new(),
            writing: Vec::new(),
            written: false,
            gate: None,
            stored: stored.clone(),
            seen: seen.clone(),
            fail_flushes: 0,
        }
    }
}

impl WriteBehind for Counter {
    async fn apply(&mut self, batch: Vec<Delivery>) -> Vec<Verdict> {
        *self.seen.lock().unwrap() += batch.len();
        batch
            .iter()
            .map(|d| {
                self.applied.push(d.stream_sequence);
                Verdict::Pending
            })
            .collect()
    }
    async fn flush(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        let mut settled = Vec::new();
        if !self.writing.is_empty() {
            self.written().await;
            settled = self.settle().await;
        }
        let applied = std::mem::take(&mut self.applied);
        if self.fail_flushes > 0 {
            self.fail_flushes -= 1;
            settled.extend(
                applied
                    .into_iter()
                    .map(|s| (s, Err(HandlerError::Retry("store down".into())))),
            );
        } else if self.gate.is_some() {
            self.writing = applied;
        } else {
            self.stored.lock().unwrap().extend(&applied);
            settled.extend(applied.into_iter().map(|s| (s, Ok(()))));
        }
        settled
    }
    async fn written(&mut self) {
        match &self.gate {
            Some(gate) if !self.writing.is_empty() && !self.written => {
                gate.acquire().await.unwrap().forget();
                self.written = true;
            }
            _ => std::future::pending().await,
        }
    }
    async fn settle(&mut self) -> Vec<(u64, Result<(), HandlerError>)> {
        if !std::mem::take(&mut self.written) {
            return Vec::new();
        }
        let done = std::mem::take(&mut self.writing);
        self.stored.lock().unwrap().extend(&done);
        done.into_iter().map(|s| (s, Ok(()))).collect()
    }
    fn writing(&self) -> usize {
        self.writing.len()
    }
}

async fn ack_pending(env: &TestEnv, durable: &str) -> (u64, usize) {
    let stream = env.state.js.get_stream("EVENTS_SYSTEM").await.unwrap();
    let mut c = stream.get_consumer::<pull::Config>(durable).await.unwrap();
    let info = c.info().await.unwrap();
    (info.ack_floor.stream_sequence, info.num_ack_pending)
}

#[tokio::test]
async fn write_behind_acks_only_what_a_flush_made_durable() {
    let env = TestEnv::start().await;
    for i in 0..5 {
        publish(&env, &format!("wb-{i}"), "{}").await;
    }
    let stored: Arc<Mutex<Vec<u64>>> = Arc::default();
    let seen: Arc<Mutex<usize>> = Arc::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut worker = Counter::new(&stored, &seen);
    worker.gate = Some(gate.clone());
    let policy = FlushPolicy {
        interval: Duration::from_secs(60),
        max_pending: 1000,
    };
    let (trigger, shutdown) = ShutdownTrigger::new();
    let js = env.state.js.clone();
    let task = tokio::spawn(run_write_behind(
        js,
        spec("wb-acks"),
        policy,
        worker,
        shutdown,
    ));
    // Caught up with the stream, the runner flushes at once; the write is still under way.
    wait_until("five applied", || *seen.lock().unwrap() == 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ack_pending(&env, "wb-acks").await,
        (0, 5),
        "applied but not written: nothing acknowledged"
    );
    assert!(stored.lock().unwrap().is_empty());
    // The write completes: then, and only then, the messages are acknowledged.
    gate.add_permits(1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while ack_pending(&env, "wb-acks").await != (5, 0) {
        assert!(Instant::now() < deadline, "acks never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*stored.lock().unwrap(), vec![1, 2, 3, 4, 5]);
    trigger.trigger();
    let stats = task.await.unwrap().unwrap();
    assert_eq!((stats.acked, stats.retried), (5, 0));
}

#[tokio::test]
async fn write_behind_redelivers_what_a_failed_flush_lost() {
    let env = TestEnv::start().await;
    for i in 0..4 {
        publish(&env, &format!("wb-{i}"), "{}").await;
    }
    let stored: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut worker = Counter::new(&stored, &Arc::default());
    worker.fail_flushes = 1;
    let policy = FlushPolicy {
        interval: Duration::from_millis(50),
        max_pending: 1000,
    };
    let (trigger, shutdown) = ShutdownTrigger::new();
    let js = env.state.js.clone();
    let task = tokio::spawn(run_write_behind(
        js,
        spec("wb-fail"),
        policy,
        worker,
        shutdown,
    ));
    wait_until("all stored after the retry", || {
        stored.lock().unwrap().len() >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    trigger.trigger();
    let stats = task.await.unwrap().unwrap();
    let mut stored = stored.lock().unwrap().clone();
    stored.sort();
    assert_eq!(stored, vec![1, 2, 3, 4], "each stored once, none lost");
    assert_eq!((stats.acked, stats.retried), (4, 4), "{stats:?}");
}

/// The concurrent runner overlaps messages of different subjects but keeps one subject's
/// messages in stream order, and settles everything it took when stopped.
#[tokio::test]
async fn the_concurrent_runner_overlaps_subjects_and_keeps_each_subjects_order() {
    let env = TestEnv::start().await;
    let subjects = [
        "events.system.service_started",
        "events.system.service_stopped",
    ];
    for n in 0..60u32 {
        inkwire_shared::jetstream::publish(
            &env.state.js,
            inkwire_shared::jetstream::Outgoing {
                subject: subjects[(n % 2) as usize].into(),
                msg_id: format!("c-{n}"),
                payload: Bytes::from(n.to_string()),
            },
        )
        .await
        .unwrap();
    }
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (trigger, shutdown) = ShutdownTrigger::new();
    let js = env.state.js.clone();
    let (log, act, top) = (seen.clone(), active.clone(), most.clone());
    let task = tokio::spawn(async move {
        run_concurrent(
            js,
            spec("concurrent"),
            move |d: Delivery| {
                let (log, act, top) = (log.clone(), act.clone(), top.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    let now = act.fetch_add(1, SeqCst) + 1;
                    top.fetch_max(now, SeqCst);
                    let n: u32 = std::str::from_utf8(&d.payload).unwrap().parse().unwrap();
                    // Later messages finish sooner: order is kept only if the runner keeps it.
                    tokio::time::sleep(Duration::from_millis(u64::from(60 - n) / 4)).await;
                    log.lock().unwrap().push((d.subject.clone(), n));
                    act.fetch_sub(1, SeqCst);
                    Ok(())
                }
            },
            8,
            shutdown,
        )
        .await
        .unwrap()
    });
    wait_until("all 60 handled", || seen.lock().unwrap().len() == 60).await;
    trigger.trigger();
    let stats = task.await.unwrap();
    assert_eq!(stats.acked, 60);
    let seen = seen.lock().unwrap();
    for subject in subjects {
        let order: Vec<u32> = seen
            .iter()
            .filter(|(s, _)| s == subject)
            .map(|(_, n)| *n)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "{subject} handled out of order");
        assert_eq!(order.len(), 30);
    }
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "two subjects overlap, never more"
    );
}
