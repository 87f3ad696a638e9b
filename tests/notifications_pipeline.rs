//! The notification pipeline end to end against real nats-server, redis-server and relay:
//! sends through the API, the notifier (started by `inkwire::start`) deciding per recipient
//! and channel, the in-app inbox and its WebSocket frames, and the delivery jobs it publishes
//! on `notify.deliver.>` (read back from the NOTIFY stream) with the delivery log — routing,
//! quiet hours, auto-mute, digests (with extra scheduler instances), scheduled sends and
//! redelivery. The delivery worker is not part of this: the jobs are what is checked.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_notifications::config::NotifyConfig;
use inkwire_notifications::delivery_job::{DeliveryJob, JobKind};
use inkwire_notifications::delivery_log;
use inkwire_notifications::digests::{self, Added, DigestItem, DigestWindow};
use inkwire_notifications::model::{DeliveryChannel, DeliveryStatus};
use inkwire_notifications::mute::{self, MuteDecision};
use inkwire_notifications::notifier::{self, Notifier, NotifierSettings};
use inkwire_notifications::plan::Providers;
use inkwire_notifications::scheduler::run_scheduler;
use inkwire_shared::consumer::ShutdownTrigger;
use inkwire_shared::jetstream::{Outgoing, Stored, publish, read_stream};
use inkwire_tests::{TestEnv, WsClient, json};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const SEND: &str = "/api/realtime/notifications/send";
const PREFS: &str = "/api/realtime/notifications/preferences";

/// Every provider configured and a fast scheduler tick.
fn settings(s: &mut inkwire::Settings) {
    s.notifier.providers = Providers::ALL;
    s.notifier.tick = Duration::from_millis(50);
    // The notifier's part alone: its delivery jobs stay queued on `notify.deliver.>`.
    s.without_delivery = true;
}

async fn env() -> TestEnv {
    TestEnv::start_settings(|_| {}, settings).await
}

/// Polls `check` every 50 ms until it gives a value; panics after `timeout`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends as the service; the notification ids in recipient order.
async fn send(env: &TestEnv, body: Value) -> Vec<Uuid> {
    let (status, answer) = env.post(SEND, &env.service_token(), &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    answer["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().parse().unwrap())
        .collect()
}

async fn send_one(env: &TestEnv, body: Value) -> Uuid {
    send(env, body).await[0]
}

async fn set_prefs(env: &TestEnv, user: &str, prefs: Value) {
    let (status, body) = env.put(PREFS, &env.token(user), &prefs).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Registers a push device for `user` the way the devices route keeps it.
async fn add_device(env: &TestEnv, user: &str) {
    let device = json!({"id": "d-1", "platform": "fcm",
        "endpointArn": "arn:aws:sns:us-east-1:123456789012:endpoint/GCM/inkwire/d-1",
        "createdAt": "2026-01-01T00:00:00Z"});
    let mut redis = env.state.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(format!("inkwire:notify:devices:{user}"))
        .arg("d-1")
        .arg(device.to_string())
        .query_async(&mut redis)
        .await
        .unwrap();
}

/// Every delivery job in NOTIFY, with when it was stored.
async fn jobs(env: &TestEnv) -> Vec<(Stored, DeliveryJob)> {
    read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.deliver.>".into(),
        DeliverPolicy::All,
        100_000,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|s| {
        let job = serde_json::from_slice(&s.payload).unwrap();
        (s, job)
    })
    .collect()
}

/// The single jobs of `id`: channel → job.
async fn jobs_of(env: &TestEnv, id: Uuid) -> BTreeMap<DeliveryChannel, Vec<DeliveryJob>> {
    let mut out: BTreeMap<DeliveryChannel, Vec<DeliveryJob>> = BTreeMap::new();
    for (_, job) in jobs(env).await {
        if job.kind == JobKind::Single && job.notification_ids == [id] {
            out.entry(job.channel).or_default().push(job);
        }
    }
    out
}

/// Channel → status of `id`'s delivery log.
async fn log(env: &TestEnv, id: Uuid) -> BTreeMap<String, String> {
    let mut redis = env.state.redis.clone();
    delivery_log::read(&mut redis, id)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.channel.as_str().to_string(),
                r.status.as_str().to_string(),
            )
        })
        .collect()
}

fn statuses(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(c, s)| (c.to_string(), s.to_string()))
        .collect()
}

/// The statuses one channel went through.
async fn history(env: &TestEnv, id: Uuid, channel: DeliveryChannel) -> Vec<DeliveryStatus> {
    let mut redis = env.state.redis.clone();
    delivery_log::read(&mut redis, id)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.channel == channel)
        .map(|r| r.history.into_iter().map(|h| h.status).collect())
        .unwrap_or_default()
}

/// Waits until the notifier has settled every message published so far.
async fn settled(env: &TestEnv) {
    eventually(
        "the notifier to settle",
        Duration::from_secs(60),
        || async {
            let stream = env.state.js.get_stream("NOTIFY").await.ok()?;
            let mut consumer: async_nats::jetstream::consumer::Consumer<
                async_nats::jetstream::consumer::pull::Config,
            > = stream.get_consumer(notifier::DURABLE).await.ok()?;
            let info = consumer.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        },
    )
    .await
}

async fn inbox_size(env: &TestEnv, user: &str) -> (u64, u64) {
    let mut redis = env.state.redis.clone();
    redis::pipe()
        .cmd("ZCARD")
        .arg(format!("inkwire:notify:inbox:{user}"))
        .cmd("ZCARD")
        .arg(format!("inkwire:notify:unread:{user}"))
        .query_async(&mut redis)
        .await
        .unwrap()
}

/// The notifications due queue: member → score.
async fn due_entries(env: &TestEnv) -> BTreeMap<String, u64> {
    let mut redis = env.state.redis.clone();
    let all: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(notifier::DUE_QUEUE)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut redis)
        .await
        .unwrap();
    all.into_iter().map(|(m, s)| (m, s as u64)).collect()
}

fn now_ms() -> u64 {
    Timestamp::now().as_millisecond() as u64
}

fn hhmm(t: jiff::civil::DateTime) -> String {
    format!("{:02}:{:02}", t.hour(), t.minute())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_app_notifications_reach_the_inbox_and_the_socket_with_exact_counts() {
    let env = env().await;
    let ann = env.token("ann");
    let mut ws = WsClient::connect(&env.ws_url("notifications", &ann)).await;
    assert_eq!(ws.next().await["op"], "subscribed");
    let mut ids = BTreeSet::new();
    for i in 0..3 {
        ids.insert(
            send_one(
                &env,
                json!({"userId": "ann", "category": "chat", "priority": "medium",
                    "title": format!("Hello {i}"), "body": "from the pipeline"}),
            )
            .await,
        );
    }
    // version → (notification id, unread count); pushes may arrive in any order.
    let mut frames = BTreeMap::new();
    while frames.len() < 3 {
        let frame = ws.next().await;
        if frame["type"] != "notification" {
            continue;
        }
        let data = &frame["data"];
        assert_eq!(data["event"], "notification", "{frame}");
        frames.insert(
            data["version"].as_u64().unwrap(),
            (
                data["notification"]["id"]
                    .as_str()
                    .unwrap()
                    .parse::<Uuid>()
                    .unwrap(),
                data["unreadCount"].as_u64().unwrap(),
            ),
        );
    }
    assert_eq!(
        frames.values().map(|(id, _)| *id).collect::<BTreeSet<_>>(),
        ids
    );
    for (version, (_, unread)) in &frames {
        assert_eq!(unread, version, "the count after each add is exact");
    }
    let (status, count) = env
        .get("/api/realtime/notifications/unread-count", &ann)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(count["unreadCount"], 3);
    for id in &ids {
        assert_eq!(
            log(&env, *id).await,
            statuses(&[("in_app", "sent"), ("push", "skipped_no_address")])
        );
    }

    // Bulk: 1,000 recipients, one inbox item each.
    let users: Vec<String> = (0..1000).map(|i| format!("bulk-{i}")).collect();
    let bulk = send(
        &env,
        json!({"userIds": users, "category": "system", "priority": "high",
            "title": "Maintenance", "body": "Tonight at 22:00"}),
    )
    .await;
    assert_eq!(bulk.len(), 1000);
    settled(&env).await;
    let mut redis = env.state.redis.clone();
    let mut pipe = redis::pipe();
    for u in &users {
        pipe.cmd("ZCARD").arg(format!("inkwire:notify:inbox:{u}"));
        pipe.cmd("ZCARD").arg(format!("inkwire:notify:unread:{u}"));
    }
    let counts: Vec<u64> = pipe.query_async(&mut redis).await.unwrap();
    assert!(counts.iter().all(|c| *c == 1), "every recipient has one");
    // No contact points: the external channels are skipped with the reason.
    let mut redis = env.state.redis.clone();
    let records = delivery_log::read(&mut redis, bulk[999]).await.unwrap();
    let email = records
        .iter()
        .find(|r| r.channel == DeliveryChannel::Email)
        .unwrap();
    assert_eq!(email.status, DeliveryStatus::SkippedNoAddress);
    assert_eq!(
        email.error.as_deref(),
        Some("the recipient has no email address")
    );
    // One notification_created event per recipient.
    assert_eq!(env.stream_messages("EVENTS_NOTIFICATION").await, 1003);
    assert!(jobs(&env).await.is_empty());
}

#[tokio::test]
async fn each_priority_goes_to_the_channels_of_the_routing_table() {
    let env = env().await;
    set_prefs(
        &env,
        "rita",
        json!({"quietHours": {"enabled": false, "start": "22:00", "end": "08:00"},
            "muteWindowSeconds": 0,
            "contacts": {"email": "rita@example.com", "phone": "+447700900123"}}),
    )
    .await;
    add_device(&env, "rita").await;
    let mut ids = BTreeMap::new();
    for p in ["critical", "high", "medium", "low"] {
        let id = send_one(
            &env,
            json!({"userId": "rita", "category": "collaboration", "priority": p,
                "title": format!("A {p} one"), "body": "b"}),
        )
        .await;
        ids.insert(p, id);
    }
    // Limited to email by the send; and a category whose email is switched off.
    let only_email = send_one(
        &env,
        json!({"userId": "rita", "category": "collaboration", "priority": "high",
            "title": "Email only", "body": "b", "channels": ["email"]}),
    )
    .await;
    set_prefs(
        &env,
        "pia",
        json!({"quietHours": {"enabled": false},
            "categories": {"chat": {"channels": {"email": false}}},
            "contacts": {"email": "pia@example.com"}}),
    )
    .await;
    let switched_off = send_one(
        &env,
        json!({"userId": "pia", "category": "chat", "priority": "high", "title": "t1", "body": "b"}),
    )
    .await;
    let critical_anyway = send_one(
        &env,
        json!({"userId": "pia", "category": "chat", "priority": "critical", "title": "t2", "body": "b"}),
    )
    .await;
    settled(&env).await;

    use DeliveryChannel::*;
    // priority, the channels it has jobs on, its delivery log.
    type Row<'a> = (&'a str, Vec<DeliveryChannel>, Vec<(&'a str, &'a str)>);
    let expected: [Row; 4] = [
        (
            "critical",
            vec![Email, Sms, Push],
            vec![
                ("in_app", "sent"),
                ("email", "queued"),
                ("sms", "queued"),
                ("push", "queued"),
            ],
        ),
        (
            "high",
            vec![Email, Push],
            vec![("in_app", "sent"), ("email", "queued"), ("push", "queued")],
        ),
        (
            "medium",
            vec![Push],
            vec![("in_app", "sent"), ("push", "queued")],
        ),
        (
            "low",
            vec![],
            vec![("in_app", "sent"), ("email", "digested")],
        ),
    ];
    for (p, channels, logged) in expected {
        let id = ids[p];
        let jobs = jobs_of(&env, id).await;
        assert_eq!(jobs.keys().copied().collect::<Vec<_>>(), channels, "{p}");
        for (channel, js) in &jobs {
            assert_eq!(js.len(), 1, "{p} {channel:?}");
            let job = &js[0];
            assert_eq!(job.job_id, format!("{id}:{}", channel.as_str()));
            assert_eq!(job.user_id, "rita");
            assert_eq!(job.muted_count, 0);
            assert_eq!(job.content.title, format!("A {p} one"));
        }
        assert_eq!(log(&env, id).await, statuses(&logged), "{p}");
    }
    let subjects: BTreeSet<String> = read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.deliver.>".into(),
        DeliverPolicy::All,
        100,
    )
    .await
    .unwrap()
    .iter()
    .map(|s| {
        let job: DeliveryJob = serde_json::from_slice(&s.payload).unwrap();
        job.subject()
    })
    .collect();
    assert!(subjects.contains("notify.deliver.sms.rita"), "{subjects:?}");
    assert_eq!(
        jobs_of(&env, only_email)
            .await
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![Email]
    );
    assert_eq!(
        log(&env, only_email).await,
        statuses(&[("in_app", "sent"), ("email", "queued")])
    );
    assert!(jobs_of(&env, switched_off).await.is_empty());
    assert_eq!(
        log(&env, switched_off).await,
        statuses(&[
            ("in_app", "sent"),
            ("email", "skipped_preference"),
            ("push", "skipped_no_address")
        ])
    );
    assert_eq!(
        jobs_of(&env, critical_anyway)
            .await
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![Email]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quiet_hours_hold_external_channels_until_the_window_opens() {
    let env = env().await;
    let zone = "Asia/Kathmandu";
    let tz = TimeZone::get(zone).unwrap();
    let now = Timestamp::now().to_zoned(tz.clone());
    let minute = now
        .datetime()
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()
        .unwrap();
    // The window started a minute ago and ends at the next minute (the one after when this
    // one is nearly over, so that the send surely lands inside it).
    let ahead = if now.second() >= 50 { 2 } else { 1 };
    let start = minute.checked_sub(1.minute()).unwrap();
    let end = minute.checked_add(ahead.minutes()).unwrap();
    let end_at = tz.to_timestamp(end).unwrap();
    set_prefs(
        &env,
        "quinn",
        json!({"timeZone": zone,
            "quietHours": {"enabled": true, "start": hhmm(start), "end": hhmm(end)},
            "muteWindowSeconds": 0,
            "contacts": {"email": "quinn@example.com", "phone": "+9779812345678"}}),
    )
    .await;
    let mut ws = WsClient::connect(&env.ws_url("notifications", &env.token("quinn"))).await;
    assert_eq!(ws.next().await["op"], "subscribed");
    let high = send_one(
        &env,
        json!({"userId": "quinn", "category": "publishing", "priority": "high",
            "title": "Proofs are ready", "body": "b"}),
    )
    .await;
    let critical = send_one(
        &env,
        json!({"userId": "quinn", "category": "account", "priority": "critical",
            "title": "Password changed", "body": "b"}),
    )
    .await;
    settled(&env).await;
    // In-app at once, quiet hours or not.
    let frame = ws.next().await;
    assert_eq!(frame["data"]["notification"]["id"], json!(high));
    assert_eq!(inbox_size(&env, "quinn").await, (2, 2));
    assert_eq!(
        log(&env, high).await,
        statuses(&[
            ("in_app", "sent"),
            ("email", "held_quiet_hours"),
            ("push", "skipped_no_address")
        ])
    );
    assert!(jobs_of(&env, high).await.is_empty());
    // Critical bypasses quiet hours.
    assert_eq!(
        jobs_of(&env, critical)
            .await
            .keys()
            .copied()
            .collect::<Vec<_>>(),
        vec![DeliveryChannel::Email, DeliveryChannel::Sms]
    );
    let member = notifier::held_member(high, DeliveryChannel::Email);
    assert_eq!(
        due_entries(&env).await.get(&member).copied(),
        Some(end_at.as_millisecond() as u64),
        "held until the window ends"
    );

    // The window closes during the test: the held email goes out then, once.
    let wait = Duration::from_millis(
        (end_at.as_millisecond() - Timestamp::now().as_millisecond()).max(0) as u64,
    );
    let (stored, job) = eventually("the held email", wait + Duration::from_secs(15), || async {
        jobs(&env)
            .await
            .into_iter()
            .find(|(_, j)| j.notification_ids == [high])
    })
    .await;
    let published_ms = (stored.published.unix_timestamp_nanos() / 1_000_000) as i64;
    assert!(
        published_ms >= end_at.as_millisecond() - 50,
        "published {published_ms}, window ends {}",
        end_at.as_millisecond()
    );
    assert_eq!(job.channel, DeliveryChannel::Email);
    assert_eq!(job.job_id, format!("{high}:email"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(jobs_of(&env, high).await[&DeliveryChannel::Email].len(), 1);
    assert_eq!(
        history(&env, high, DeliveryChannel::Email).await,
        [DeliveryStatus::HeldQuietHours, DeliveryStatus::Queued]
    );
    assert!(!due_entries(&env).await.contains_key(&member));
}

#[tokio::test]
async fn similar_notifications_are_muted_and_the_next_one_says_how_many() {
    let env = env().await;
    set_prefs(
        &env,
        "mo",
        json!({"quietHours": {"enabled": false}, "muteWindowSeconds": 2,
            "contacts": {"email": "mo@example.com"}}),
    )
    .await;
    let similar = |i: usize| {
        json!({"userId": "mo", "category": "collaboration", "priority": "high",
            "groupKey": "thread-1", "title": format!("Comment {i}"), "body": "b"})
    };
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(send_one(&env, similar(i)).await);
    }
    let other = send_one(
        &env,
        json!({"userId": "mo", "category": "collaboration", "priority": "high",
            "groupKey": "thread-2", "title": "Elsewhere", "body": "b"}),
    )
    .await;
    settled(&env).await;
    assert_eq!(
        jobs_of(&env, first[0]).await[&DeliveryChannel::Email].len(),
        1
    );
    for id in &first[1..] {
        assert!(jobs_of(&env, *id).await.is_empty());
        assert_eq!(
            log(&env, *id).await,
            statuses(&[
                ("in_app", "sent"),
                ("email", "muted"),
                ("push", "skipped_no_address")
            ])
        );
    }
    // Another key is not muted; muted ones are still in the inbox.
    assert_eq!(jobs_of(&env, other).await.len(), 1);
    assert_eq!(inbox_size(&env, "mo").await, (4, 4));

    // After the window: the next one is sent and says how many were muted.
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let next = send_one(&env, similar(3)).await;
    let after = send_one(&env, similar(4)).await;
    settled(&env).await;
    let job = jobs_of(&env, next).await[&DeliveryChannel::Email][0].clone();
    assert_eq!(job.muted_count, 2);
    assert_eq!(job.content.body, "b\n\n2 similar notifications were muted");
    assert_eq!(serde_json::to_value(&job).unwrap()["mutedCount"], json!(2));
    // It started a new window.
    assert_eq!(log(&env, after).await["email"], "muted");

    // The check and the record are one step: of many similar ones at once, one is sent.
    let mut tasks = tokio::task::JoinSet::new();
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for id in ids.clone() {
        let mut redis = env.state.redis.clone();
        tasks.spawn(async move {
            mute::check_and_record(
                &mut redis,
                id,
                "max",
                "chat/g",
                Duration::from_secs(60),
                now_ms(),
            )
            .await
            .unwrap()
        });
    }
    let decisions: Vec<MuteDecision> = tasks.join_all().await;
    let sent = decisions
        .iter()
        .filter(|d| matches!(d, MuteDecision::Send { .. }))
        .count();
    assert_eq!(sent, 1, "{decisions:?}");
    // Asked again for the same notification: the same answer, nothing counted twice.
    let mut redis = env.state.redis.clone();
    for id in &ids {
        let again = mute::check_and_record(
            &mut redis,
            *id,
            "max",
            "chat/g",
            Duration::from_secs(60),
            now_ms(),
        )
        .await
        .unwrap();
        let first = mute::check_and_record(
            &mut redis,
            *id,
            "max",
            "chat/g",
            Duration::from_secs(60),
            now_ms(),
        )
        .await
        .unwrap();
        assert_eq!(again, first);
    }
    assert_eq!(
        mute::take_muted(&mut redis, "max", &["chat/g".to_string()])
            .await
            .unwrap(),
        19
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn digests_go_out_once_per_key_and_window_even_with_several_schedulers() {
    let env = env().await;
    let zone = "America/New_York";
    let tz = TimeZone::get(zone).unwrap();
    set_prefs(
        &env,
        "dina",
        json!({"timeZone": zone, "contacts": {"email": "dina@example.com"}}),
    )
    .await;
    // Low priority: email only in a digest — the category has none, so daily 08:00 local.
    let send_low = |title: &str, group: Option<&str>| {
        let mut body = json!({"userId": "dina", "category": "publishing", "priority": "low",
            "title": title, "body": "Chapter <3> & more"});
        if let Some(g) = group {
            body["groupKey"] = json!(g);
        }
        body
    };
    let mut plain = Vec::new();
    for i in 0..3 {
        plain.push(send_one(&env, send_low(&format!("Review {i} <b>"), None)).await);
    }
    let mut grouped = Vec::new();
    for i in 0..2 {
        grouped.push(send_one(&env, send_low(&format!("Sale {i}"), Some("g2"))).await);
    }
    settled(&env).await;
    for id in plain.iter().chain(&grouped) {
        assert_eq!(
            log(&env, *id).await,
            statuses(&[("in_app", "sent"), ("email", "digested")])
        );
    }
    assert!(jobs(&env).await.is_empty());
    // Due at the next 08:00 in New York; the window started at the 08:00 before.
    let now = Timestamp::now().to_zoned(tz.clone());
    let today = now.date().at(8, 0, 0, 0).to_zoned(tz.clone()).unwrap();
    let due = if today.timestamp() > now.timestamp() {
        today
    } else {
        today.tomorrow().unwrap()
    };
    let start = due.yesterday().unwrap();
    let entries = due_entries(&env).await;
    let windows: BTreeMap<String, (DigestWindow, u64)> = entries
        .iter()
        .filter_map(|(m, score)| {
            DigestWindow::parse_member(m).map(|w| (w.key.clone(), (w, *score)))
        })
        .collect();
    assert_eq!(
        windows.keys().cloned().collect::<Vec<_>>(),
        ["publishing", "publishing.g2"]
    );
    for (w, score) in windows.values() {
        assert_eq!(w.user, "dina");
        assert_eq!(*score, due.timestamp().as_millisecond() as u64, "{w:?}");
        assert_eq!(w.start_ms, start.timestamp().as_millisecond(), "{w:?}");
    }

    // Two more scheduler instances on the same Redis, ticking fast.
    let (trigger, shutdown) = ShutdownTrigger::new();
    for _ in 0..2 {
        let redis = inkwire_shared::redis_store::connect(&env.redis_url)
            .await
            .unwrap();
        let n = Notifier::new(
            env.state.js.clone(),
            redis,
            Arc::new(NotifyConfig::default()),
            Arc::new(NotifierSettings {
                providers: Providers::ALL,
                tick: Duration::from_millis(5),
                ..NotifierSettings::default()
            }),
        );
        tokio::spawn(run_scheduler(n, shutdown.clone()));
    }
    // Due now (the documented way to make an entry due early).
    let mut redis = env.state.redis.clone();
    for (w, _) in windows.values() {
        notifier::due_queue()
            .schedule(&mut redis, &w.member(), now_ms())
            .await
            .unwrap();
    }
    let digests = eventually("two digests", Duration::from_secs(10), || async {
        let d: Vec<DeliveryJob> = jobs(&env)
            .await
            .into_iter()
            .map(|(_, j)| j)
            .filter(|j| matches!(j.kind, JobKind::Digest { .. }))
            .collect();
        (d.len() >= 2).then_some(d)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        jobs(&env).await.len(),
        2,
        "one digest per key and window, nothing else"
    );
    let by_key: BTreeMap<String, &DeliveryJob> = digests
        .iter()
        .map(|j| match &j.kind {
            JobKind::Digest { key, .. } => (key.clone(), j),
            JobKind::Single => unreachable!(),
        })
        .collect();
    let all = by_key["publishing"];
    assert_eq!(all.notification_ids, plain);
    assert_eq!(all.user_id, "dina");
    assert_eq!(all.channel, DeliveryChannel::Email);
    assert_eq!(
        all.job_id,
        format!(
            "digest:dina:publishing:{}",
            start.timestamp().as_millisecond()
        )
    );
    let email = all.content.email.as_ref().unwrap();
    assert_eq!(email.subject, "3 new notifications: publishing");
    assert!(
        email.text.contains("- Review 0 <b>\n  Chapter <3> & more"),
        "{}",
        email.text
    );
    assert!(
        email.html.contains(
            "<li><strong>Review 2 &lt;b&gt;</strong><br>Chapter &lt;3&gt; &amp; more</li>"
        ),
        "{}",
        email.html
    );
    let g2 = by_key["publishing.g2"];
    assert_eq!(g2.notification_ids, grouped);
    assert_eq!(
        g2.content.email.as_ref().unwrap().subject,
        "2 new notifications: publishing.g2"
    );
    // Built once: each item was queued once.
    for id in plain.iter().chain(&grouped) {
        assert_eq!(
            history(&env, *id, DeliveryChannel::Email).await,
            [DeliveryStatus::Digested, DeliveryStatus::Queued]
        );
    }
    assert!(
        due_entries(&env)
            .await
            .keys()
            .all(|m| !m.starts_with("digest:")),
        "both entries done"
    );

    // An item for a window whose digest was built already goes to the next window.
    let late = send_one(&env, send_low("Late", None)).await;
    settled(&env).await;
    assert_eq!(log(&env, late).await["email"], "digested");
    let next: Vec<(DigestWindow, u64)> = due_entries(&env)
        .await
        .into_iter()
        .filter_map(|(m, s)| DigestWindow::parse_member(&m).map(|w| (w, s)))
        .collect();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].0.key, "publishing");
    assert_eq!(next[0].0.start_ms, due.timestamp().as_millisecond());
    assert_eq!(
        next[0].1,
        due.tomorrow().unwrap().timestamp().as_millisecond() as u64
    );
    // A digested send redelivered after its digest went out changes nothing.
    let sent: Vec<Stored> = read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.send.dina".into(),
        DeliverPolicy::All,
        10,
    )
    .await
    .unwrap();
    publish(
        &env.state.js,
        Outgoing {
            subject: "notify.send.dina".into(),
            msg_id: "copy-of-first".into(),
            payload: sent[0].payload.clone(),
        },
    )
    .await
    .unwrap();
    settled(&env).await;
    assert_eq!(
        history(&env, plain[0], DeliveryChannel::Email).await,
        [DeliveryStatus::Digested, DeliveryStatus::Queued]
    );
    assert_eq!(due_entries(&env).await.len(), 1);
    assert_eq!(jobs(&env).await.len(), 2);
    trigger.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_digest_window_loses_no_item_to_a_concurrent_close() {
    let env = TestEnv::start().await;
    let queue = notifier::due_queue();
    let window = DigestWindow {
        user: "cora".into(),
        key: "chat".into(),
        start_ms: 1_000,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    let mut close = None;
    for (i, id) in ids.iter().enumerate() {
        if i == 100 {
            // Closed while the adds run.
            let (mut redis, window) = (env.state.redis.clone(), window.clone());
            close = Some(tokio::spawn(async move {
                digests::close(&mut redis, &window).await.unwrap().0
            }));
        }
        let (mut redis, queue, window, id) =
            (env.state.redis.clone(), queue.clone(), window.clone(), *id);
        tasks.spawn(async move {
            let item = DigestItem {
                id,
                title: format!("t{i}"),
                body: "b".into(),
                created_ms: i as i64,
                similarity_key: "chat/g".into(),
            };
            let added = digests::add_item(&mut redis, &queue, &window, 5_000, 0, &item)
                .await
                .unwrap();
            (id, added)
        });
    }
    let closed_items = close.unwrap().await.unwrap();
    let mut redis = env.state.redis.clone();
    let outcomes: Vec<(Uuid, Added)> = tasks.join_all().await;
    let in_digest: BTreeSet<Uuid> = closed_items.iter().map(|i| i.id).collect();
    for (id, added) in &outcomes {
        match added {
            Added::Open => assert!(in_digest.contains(id), "added before the close"),
            Added::Closed => assert!(!in_digest.contains(id), "refused after the close"),
            Added::AlreadySent => panic!("each id was added once"),
        }
    }
    // Every item is either in the digest or told to go elsewhere; a second close reads the
    // same items, and adding an included one again says it went out.
    assert_eq!(outcomes.len(), 200);
    let (again, _) = digests::close(&mut redis, &window).await.unwrap();
    assert_eq!(again, closed_items);
    if let Some(first) = closed_items.first() {
        let added = digests::add_item(&mut redis, &queue, &window, 5_000, 0, first)
            .await
            .unwrap();
        assert_eq!(added, Added::AlreadySent);
    }
}

#[tokio::test]
async fn scheduled_sends_arrive_at_their_time_and_cancelled_ones_never() {
    let env = env().await;
    let at = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let at_text = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let body = |title: &str| {
        json!({"userId": "sam", "category": "writing", "priority": "medium",
            "title": title, "body": "b", "sendAt": at_text})
    };
    let due = send_one(&env, body("On time")).await;
    let cancelled = send_one(&env, body("Never")).await;
    let (status, answer) = env
        .delete(
            &format!("/api/realtime/notifications/scheduled/{cancelled}"),
            &env.service_token(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    settled(&env).await;
    assert_eq!(inbox_size(&env, "sam").await, (0, 0), "not before its time");
    eventually("the scheduled send", Duration::from_secs(10), || async {
        (inbox_size(&env, "sam").await.0 == 1).then_some(())
    })
    .await;
    let arrived = time::OffsetDateTime::now_utc();
    assert!(arrived >= at, "arrived {arrived}, due {at}");
    assert_eq!(log(&env, due).await["in_app"], "sent");
    // Sent: too late to cancel.
    let (status, problem) = env
        .delete(
            &format!("/api/realtime/notifications/scheduled/{due}"),
            &env.service_token(),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert_eq!(problem["code"], "scheduled_already_sent");
    // The cancelled one never arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, page) = env
        .get("/api/realtime/notifications", &env.token("sam"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let titles: Vec<&str> = page["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["On time"]);
    assert_eq!(
        log(&env, cancelled).await,
        statuses(&[("in_app", "cancelled")])
    );
    assert!(due_entries(&env).await.is_empty());
}

#[tokio::test]
async fn a_redelivered_send_changes_nothing_and_a_malformed_one_is_dead_lettered() {
    // A short duplicate window, so that JetStream does not hide a second job.
    let env =
        TestEnv::start_settings(|c| c.duplicate_window = Duration::from_secs(1), settings).await;
    set_prefs(
        &env,
        "rex",
        json!({"quietHours": {"enabled": false}, "contacts": {"email": "rex@example.com"}}),
    )
    .await;
    let id = send_one(
        &env,
        json!({"userId": "rex", "category": "chat", "priority": "high", "title": "t", "body": "b"}),
    )
    .await;
    settled(&env).await;
    let original = read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.send.rex".into(),
        DeliverPolicy::All,
        10,
    )
    .await
    .unwrap();
    assert_eq!(original.len(), 1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The same message twice more under other ids (as a producer retrying would).
    for copy in ["copy-1", "copy-2"] {
        publish(
            &env.state.js,
            Outgoing {
                subject: "notify.send.rex".into(),
                msg_id: copy.into(),
                payload: original[0].payload.clone(),
            },
        )
        .await
        .unwrap();
    }
    settled(&env).await;
    assert_eq!(inbox_size(&env, "rex").await, (1, 1));
    assert_eq!(jobs_of(&env, id).await[&DeliveryChannel::Email].len(), 1);
    assert_eq!(
        history(&env, id, DeliveryChannel::Email).await,
        [DeliveryStatus::Queued]
    );
    assert_eq!(
        history(&env, id, DeliveryChannel::InApp).await,
        [DeliveryStatus::Sent]
    );
    assert_eq!(env.stream_messages("EVENTS_NOTIFICATION").await, 1);

    // Not a notification, and one whose recipient is not the subject's: dead-lettered.
    let mut wrong = serde_json::from_slice::<Value>(&original[0].payload).unwrap();
    wrong["id"] = json!(Uuid::now_v7());
    for (msg_id, payload) in [
        ("bad-1", b"{not json".to_vec()),
        ("bad-2", serde_json::to_vec(&wrong).unwrap()),
    ] {
        publish(
            &env.state.js,
            Outgoing {
                subject: "notify.send.someone-else".into(),
                msg_id: msg_id.into(),
                payload: payload.into(),
            },
        )
        .await
        .unwrap();
    }
    eventually("two dead letters", Duration::from_secs(10), || async {
        (env.stream_messages("DLQ").await == 2).then_some(())
    })
    .await;
    assert_eq!(inbox_size(&env, "someone-else").await, (0, 0));
    assert_eq!(inbox_size(&env, "rex").await, (1, 1));
}

#[tokio::test]
async fn a_bulk_send_decides_per_recipient_and_a_redelivered_job_changes_nothing() {
    // A short duplicate window, so that JetStream does not hide a second copy of the job.
    let env =
        TestEnv::start_settings(|c| c.duplicate_window = Duration::from_secs(1), settings).await;
    // Ann has an email address, Bob switched chat email off, Cy has no address at all.
    set_prefs(
        &env,
        "ann",
        json!({"quietHours": {"enabled": false}, "contacts": {"email": "ann@example.com"}}),
    )
    .await;
    set_prefs(
        &env,
        "bob",
        json!({"quietHours": {"enabled": false},
            "categories": {"chat": {"channels": {"email": false}}},
            "contacts": {"email": "bob@example.com"}}),
    )
    .await;
    set_prefs(&env, "cy", json!({"quietHours": {"enabled": false}})).await;
    let mut bob = WsClient::connect(&env.ws_url("notifications", &env.token("bob"))).await;
    assert_eq!(bob.next().await["op"], "subscribed");
    let ids = send(
        &env,
        json!({"userIds": ["ann", "bob", "cy"], "category": "chat", "priority": "high",
            "title": "New message", "body": "Hi all"}),
    )
    .await;
    settled(&env).await;
    let bulk = read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.send.>".into(),
        DeliverPolicy::All,
        10,
    )
    .await
    .unwrap();
    assert_eq!(bulk.len(), 1, "one job for the three recipients");
    assert!(bulk[0].subject.starts_with("notify.send.bulk."));

    check_bulk(&env, &ids).await;
    let frame = loop {
        let frame = bob.next().await;
        if frame["type"] == "notification" {
            break frame;
        }
    };
    assert_eq!(frame["data"]["unreadCount"], 1, "{frame}");
    assert_eq!(
        frame["data"]["notification"]["id"],
        json!(ids[1]),
        "{frame}"
    );

    // The same job again under another id, past the duplicate window (as a producer
    // retrying would): nothing changes, nothing is published twice.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    publish(
        &env.state.js,
        Outgoing {
            subject: bulk[0].subject.clone(),
            msg_id: "bulk-copy".into(),
            payload: bulk[0].payload.clone(),
        },
    )
    .await
    .unwrap();
    settled(&env).await;
    check_bulk(&env, &ids).await;

    // A job whose recipients are not ids, and one on another event's subject: dead-lettered
    // whole, nobody notified.
    let mut bad = serde_json::from_slice::<Value>(&bulk[0].payload).unwrap();
    bad["recipients"] = json!(["dan", "not an id"]);
    let other = format!("notify.send.bulk.{}", Uuid::now_v7());
    for (msg_id, subject, payload) in [
        (
            "bad-1",
            bulk[0].subject.clone(),
            serde_json::to_vec(&bad).unwrap(),
        ),
        ("bad-2", other, bulk[0].payload.to_vec()),
    ] {
        publish(
            &env.state.js,
            Outgoing {
                subject,
                msg_id: msg_id.into(),
                payload: payload.into(),
            },
        )
        .await
        .unwrap();
    }
    eventually("two dead letters", Duration::from_secs(10), || async {
        (env.stream_messages("DLQ").await == 2).then_some(())
    })
    .await;
    assert_eq!(inbox_size(&env, "dan").await, (0, 0));
    check_bulk(&env, &ids).await;
}

/// What the bulk send of `a_bulk_send_decides_per_recipient…` leaves, however often its job
/// is delivered.
async fn check_bulk(env: &TestEnv, ids: &[Uuid]) {
    for user in ["ann", "bob", "cy"] {
        assert_eq!(inbox_size(env, user).await, (1, 1), "{user}");
    }
    assert_eq!(
        log(env, ids[0]).await,
        statuses(&[
            ("in_app", "sent"),
            ("email", "queued"),
            ("push", "skipped_no_address")
        ])
    );
    assert_eq!(
        log(env, ids[1]).await,
        statuses(&[
            ("in_app", "sent"),
            ("email", "skipped_preference"),
            ("push", "skipped_no_address")
        ])
    );
    assert_eq!(
        log(env, ids[2]).await,
        statuses(&[
            ("in_app", "sent"),
            ("email", "skipped_no_address"),
            ("push", "skipped_no_address")
        ])
    );
    assert_eq!(jobs_of(env, ids[0]).await[&DeliveryChannel::Email].len(), 1);
    assert!(jobs_of(env, ids[1]).await.is_empty());
    assert_eq!(env.stream_messages("EVENTS_NOTIFICATION").await, 3);
}
