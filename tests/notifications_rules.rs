//! Rules from domain events, end to end: events published as the `service` (through the
//! events API, as the producers will) become notifications on `notify.send.{userId}` for the
//! right users, with the rule's category and priority and ids derived from the event id, so a
//! repeated event makes no second notification. Rules whose producers do not exist yet are
//! exercised the same way.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use inkwire_notifications::model::Priority;
use inkwire_notifications::rules;
use inkwire_notifications::send::{Notification, notification_id};
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{TestEnv, json};
use reqwest::StatusCode;
use serde_json::Value;
use uuid::Uuid;

const PUBLISH: &str = "/api/realtime/events/publish";
const WAIT: Duration = Duration::from_secs(15);

/// Waits until every rule's consumer exists (they read events published from then on).
async fn rules_ready(env: &TestEnv, durables: &[(&str, &str)]) {
    let deadline = Instant::now() + WAIT;
    for (stream, durable) in durables {
        loop {
            let s = env.state.js.get_stream(*stream).await.unwrap();
            if s.consumer_info(*durable).await.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "{durable} never appeared");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn publish_event(env: &TestEnv, event: Value) -> Uuid {
    let (status, body) = env.post(PUBLISH, &env.service_token(), &event).await;
    assert!(status.is_success(), "{status}: {body}");
    event["id"].as_str().unwrap().parse().unwrap()
}

async fn sends(env: &TestEnv) -> Vec<Notification> {
    read_stream(
        &env.state.js,
        "NOTIFY",
        "notify.send.>".into(),
        DeliverPolicy::All,
        10_000,
    )
    .await
    .unwrap()
    .into_iter()
    .map(|s| serde_json::from_slice(&s.payload).unwrap())
    .collect()
}

/// Waits until `n` notifications made of event `id` are on `notify.send.>`.
async fn wait_sends(env: &TestEnv, event: Uuid, n: usize) -> Vec<Notification> {
    let deadline = Instant::now() + WAIT;
    loop {
        let mine: Vec<Notification> = sends(env)
            .await
            .into_iter()
            .filter(|s| s.data["event"]["id"] == json!(event))
            .collect();
        if mine.len() >= n {
            return mine;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} notifications for event {event}",
            mine.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn flow_state_and_conflicts_notify_the_right_users_with_the_rules_priority() {
    let env = TestEnv::start().await;
    rules_ready(
        &env,
        &[
            ("EVENTS_WRITING", "notify-rules-writing-flow_state_entered"),
            (
                "EVENTS_COLLABORATION",
                "notify-rules-collaboration-conflict_detected",
            ),
        ],
    )
    .await;

    let flow = Uuid::now_v7();
    let flow_event = json!({"id": flow, "category": "writing", "type": "flow_state_entered",
        "userId": "writer-1", "projectId": "p-1",
        "data": {"sessionId": "s-1", "wpm": 41.25}});
    publish_event(&env, flow_event.clone()).await;
    let conflict = Uuid::now_v7();
    publish_event(
        &env,
        json!({"id": conflict, "category": "collaboration", "type": "conflict_detected",
            "userId": "ann", "projectId": "p-1", "documentId": "d-1",
            "data": {"otherUserId": "ben", "severity": "high", "reason": "same_paragraph"}}),
    )
    .await;

    let got = wait_sends(&env, flow, 1).await;
    assert_eq!(got.len(), 1);
    let n = &got[0];
    assert_eq!(n.user_id, "writer-1");
    assert_eq!(n.priority, Priority::Low);
    assert_eq!(n.category, "writing");
    assert_eq!(n.title, "Flow state");
    assert!(
        n.body.contains("41.2") || n.body.contains("41.3"),
        "{}",
        n.body
    );
    assert_eq!(n.id, notification_id(flow, "writer-1"));
    assert_eq!(n.sender, rules::SENDER);
    assert_eq!(n.group_key.as_deref(), Some("flow_state"));
    assert_eq!(n.project_id.as_deref(), Some("p-1"));

    let mut got = wait_sends(&env, conflict, 2).await;
    got.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    let users: Vec<&str> = got.iter().map(|n| n.user_id.as_str()).collect();
    assert_eq!(users, ["ann", "ben"]);
    for n in &got {
        assert_eq!(n.priority, Priority::High);
        assert_eq!(n.category, "collaboration");
        assert_eq!(n.subject(), format!("notify.send.{}", n.user_id));
        assert_eq!(n.id, notification_id(conflict, &n.user_id));
        assert!(n.body.contains("same paragraph"), "{}", n.body);
        assert_eq!(n.data["otherUserId"], "ben");
    }

    // The same event again (a producer's retry): the same notification ids, stored once.
    publish_event(&env, flow_event).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(wait_sends(&env, flow, 1).await.len(), 1);
}

#[tokio::test]
async fn project_events_notify_the_owners_and_workflow_failures_their_owner() {
    let env = TestEnv::start().await;
    env.add_member("p-9", "olga", ProjectRole::Owner).await;
    env.add_member("p-9", "oscar", ProjectRole::Owner).await;
    env.add_member("p-9", "eddie", ProjectRole::Editor).await;
    rules_ready(
        &env,
        &[
            (
                "EVENTS_PUBLISHING",
                "notify-rules-publishing-book_published",
            ),
            (
                "EVENTS_ANALYTICS",
                "notify-rules-analytics-threshold_crossed",
            ),
            (
                "EVENTS_ANALYTICS",
                "notify-rules-analytics-anomaly_detected",
            ),
            (
                "EVENTS_AUTOMATION",
                "notify-rules-automation-workflow_failed",
            ),
        ],
    )
    .await;
    let published = publish_event(
        &env,
        json!({"id": Uuid::now_v7(), "category": "publishing", "type": "book_published",
            "userId": "eddie", "projectId": "p-9",
            "data": {"bookId": "b-1", "platforms": ["kdp", "kobo"]}}),
    )
    .await;
    let threshold = publish_event(
        &env,
        json!({"id": Uuid::now_v7(), "category": "analytics", "type": "threshold_crossed",
            "userId": "svc", "projectId": "p-9",
            "data": {"metric": "sales.units", "value": 210, "threshold": 200, "direction": "above"}}),
    )
    .await;
    let anomaly = publish_event(
        &env,
        json!({"id": Uuid::now_v7(), "category": "analytics", "type": "anomaly_detected",
            "userId": "svc", "projectId": "p-9",
            "data": {"metric": "sales.units", "value": 90, "expected": 40}}),
    )
    .await;
    let failed = publish_event(
        &env,
        json!({"id": Uuid::now_v7(), "category": "automation", "type": "workflow_failed",
            "userId": "wf-owner", "projectId": "p-9",
            "data": {"workflowId": "wf-publish", "executionId": "x-1", "error": "upload timed out"}}),
    )
    .await;

    for (event, priority, category) in [
        (published, Priority::Medium, "publishing"),
        (threshold, Priority::High, "analytics"),
        (anomaly, Priority::High, "analytics"),
    ] {
        let mut got = wait_sends(&env, event, 2).await;
        got.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        let users: Vec<&str> = got.iter().map(|n| n.user_id.as_str()).collect();
        assert_eq!(users, ["olga", "oscar"], "owners only, not the editor");
        for n in &got {
            assert_eq!((n.priority, n.category.as_str()), (priority, category));
        }
    }
    let got = wait_sends(&env, published, 2).await;
    assert!(got[0].body.contains("kdp, kobo"), "{}", got[0].body);
    let got = wait_sends(&env, failed, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].user_id, "wf-owner");
    assert_eq!(got[0].priority, Priority::High);
    assert!(got[0].body.contains("upload timed out"), "{}", got[0].body);

    // No project, no owners: a project rule notifies no one (and nothing is stuck).
    let orphan = publish_event(
        &env,
        json!({"id": Uuid::now_v7(), "category": "analytics", "type": "anomaly_detected",
            "userId": "svc", "data": {"metric": "m", "value": 1, "expected": 2}}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        sends(&env)
            .await
            .iter()
            .all(|n| n.data["event"]["id"] != json!(orphan))
    );
    assert_eq!(env.stream_messages("DLQ").await, 0);
}

#[tokio::test]
async fn a_rule_table_from_a_file_replaces_the_defaults() {
    let table = rules::parse_file(
        r#"{"rules": [{"event": "writing.flow_state_exited", "category": "writing",
            "priority": "medium", "recipients": ["user"], "groupKey": "flow",
            "template": {"title": "Out of flow", "body": "Session {{ sessionId }} left flow"}}]}"#,
        &Default::default(),
    )
    .unwrap();
    let env = TestEnv::start_settings(|_| {}, |s| s.rules = Some(table)).await;
    rules_ready(
        &env,
        &[("EVENTS_WRITING", "notify-rules-writing-flow_state_exited")],
    )
    .await;
    let exited = publish_event(
        &env,
        json!({"id": Uuid::now_v7(), "category": "writing", "type": "flow_state_exited",
            "userId": "w-2", "data": {"sessionId": "s-7", "durationMs": 60000}}),
    )
    .await;
    let got = wait_sends(&env, exited, 1).await;
    assert_eq!(got[0].priority, Priority::Medium);
    assert_eq!(got[0].body, "Session s-7 left flow");
    // The defaults are gone: flow_state_entered has no consumer, and makes nothing.
    let stream = env.state.js.get_stream("EVENTS_WRITING").await.unwrap();
    assert!(
        stream
            .consumer_info("notify-rules-writing-flow_state_entered")
            .await
            .is_err()
    );
    assert_eq!(
        env.post(
            PUBLISH,
            &env.service_token(),
            &json!({"category": "writing", "type": "flow_state_entered", "userId": "w-2",
                "data": {"sessionId": "s-7", "wpm": 30}}),
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sends(&env).await.len(), 1);
}
