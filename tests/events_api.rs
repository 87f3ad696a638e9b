//! End-to-end tests of the events API against real nats-server and redis-server.

use std::time::Duration;

use inkwire_shared::membership::ProjectRole;
use inkwire_shared::publish_rules::{self, PublishRule};
use inkwire_shared::schema::SCHEMA_FILES;
use inkwire_tests::{TestEnv, json, word_added};
use reqwest::StatusCode;
use serde_json::Value;

const PUBLISH: &str = "/api/realtime/events/publish";
const BATCH: &str = "/api/realtime/events/batch";

/// An event any member of the project may publish.
fn cursor_moved(user: &str, project: &str) -> Value {
    json!({"category": "collaboration", "type": "cursor_moved", "userId": user,
        "projectId": project, "data": {"paragraph": 1, "offset": 2}})
}

#[tokio::test]
async fn every_event_type_round_trips() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    // A recent time (the edge accepts 24 h back), in the normalized form it is stored in.
    let timestamp = (time::OffsetDateTime::now_utc() - Duration::from_secs(3600))
        .replace_nanosecond(0)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let mut sent = Vec::new();
    for (path, text) in SCHEMA_FILES
        .iter()
        .filter(|(p, _)| p.starts_with("events/"))
    {
        let parts: Vec<&str> = path.trim_end_matches(".json").split('/').collect();
        let (category, event_type) = (parts[1], parts[2]);
        let schema: Value = serde_json::from_str(text).unwrap();
        let data = schema["examples"][0].clone();
        let id = uuid::Uuid::new_v4().to_string();
        let event = json!({"id": id, "category": category, "type": event_type, "userId": "u-1",
            "timestamp": timestamp, "data": data, "metadata": {"source": "test", "correlationId": "c-1", "version": 1}});
        let (status, body) = env.post(PUBLISH, &svc, &event).await;
        let category_enum = category.parse().unwrap();
        if let PublishRule::DomainApi(route) = publish_rules::rule(category_enum, event_type) {
            // Tracker commands go through the writing API, for every caller.
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{category}.{event_type}: {body}"
            );
            assert_eq!(body["code"], "domain_api_required");
            assert!(body["detail"].as_str().unwrap().contains(route), "{body}");
            continue;
        }
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{category}.{event_type}: {body}"
        );
        assert_eq!(body["id"], id);
        assert_eq!(body["duplicate"], false);
        assert!(body["sequence"].as_u64().unwrap() >= 1);
        // Stored with integral numbers spelled as integers (`22.0` → `22`).
        let mut event = event;
        inkwire_shared::schema::canonicalize_numbers(&mut event);
        sent.push((category.to_string(), event_type.to_string(), event));
    }
    // 32 types, of which 3 are tracker commands refused here.
    assert_eq!(sent.len(), 29);
    let admin = env.admin_token();
    for (category, event_type, event) in sent {
        let (status, page) = env
            .get(
                &format!("/api/realtime/events/{category}?type={event_type}"),
                &admin,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        // Consumers may add events of the same type (the notifier's `notification_created`
        // for the notifications that rules make of other events): find ours by id.
        let ours: Vec<&Value> = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["id"] == event["id"])
            .collect();
        assert_eq!(ours.len(), 1, "{category}.{event_type}: {page}");
        assert_eq!(ours[0], &event, "stored event differs from the one sent");
    }
}

#[tokio::test]
async fn server_fills_id_and_timestamp_and_dedupes_repeated_ids() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "u-1", ProjectRole::Editor).await;
    // word_added is an event the tracker produces: the service role publishes it.
    let token = env.service_token();
    let (status, first) = env
        .post(PUBLISH, &token, &word_added("u-1", "p-1", 3))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first}");
    assert!(uuid::Uuid::parse_str(first["id"].as_str().unwrap()).is_ok());
    assert_eq!(first["stream"], "EVENTS_WRITING");

    let mut again = word_added("u-1", "p-1", 3);
    again["id"] = first["id"].clone();
    let (status, second) = env.post(PUBLISH, &token, &again).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["sequence"], first["sequence"]);
    // Upper-case spelling of the same UUID is the same event.
    again["id"] = json!(first["id"].as_str().unwrap().to_uppercase());
    let (_, third) = env.post(PUBLISH, &token, &again).await;
    assert_eq!(third["duplicate"], true);
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 1);

    // A batch with a repeated id stores it once and says so.
    let id = uuid::Uuid::new_v4().to_string();
    let mut e = word_added("u-1", "p-1", 1);
    e["id"] = json!(id);
    let (status, body) = env
        .post(BATCH, &token, &json!({"events": [e.clone(), e]}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["published"], 1);
    assert_eq!(body["duplicates"], 1);
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 2);
}

#[tokio::test]
async fn batch_with_bad_items_publishes_nothing_and_lists_each() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let good = word_added("u-1", "p-1", 3);
    let mut wrong_type = word_added("u-1", "p-1", 3);
    wrong_type["data"]["words"] = json!("three");
    let mut other_category = word_added("u-1", "p-1", 3);
    other_category["type"] = json!("cursor_moved");
    let batch = json!({"events": [good.clone(), wrong_type, good.clone(), other_category]});
    let (status, body) = env.post(BATCH, &svc, &batch).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "validation_failed");
    let items = body["invalidItems"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["index"], 1);
    assert_eq!(items[0]["errors"][0]["pointer"], "/data/words");
    assert_eq!(items[0]["errors"][0]["rule"], "type");
    assert_eq!(items[0]["errors"][0]["kind"], "string");
    assert_eq!(items[1]["index"], 3);
    assert_eq!(items[1]["errors"][0]["pointer"], "/type");
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 0);

    // An unauthorized item also stops the whole batch.
    env.add_member("p-1", "u-1", ProjectRole::Editor).await;
    let token = env.token("u-1");
    let foreign = cursor_moved("u-1", "p-2");
    let (status, body) = env
        .post(
            BATCH,
            &token,
            &json!({"events": [cursor_moved("u-1", "p-1"), foreign]}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("events[1]"));
    assert_eq!(env.stream_messages("EVENTS_COLLABORATION").await, 0);
    // So does an item of a type the user may not publish at all.
    let (status, body) = env
        .post(
            BATCH,
            &token,
            &json!({"events": [cursor_moved("u-1", "p-1"), good.clone()]}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "service_role_required");
    assert!(body["detail"].as_str().unwrap().contains("events[1]"));
    assert_eq!(env.stream_messages("EVENTS_COLLABORATION").await, 0);
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 0);

    // Empty and oversized batches are refused by the request schema.
    let (status, body) = env.post(BATCH, &svc, &json!({"events": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["pointer"], "/events");
    let many: Vec<Value> = (0..1001).map(|_| good.clone()).collect();
    let (status, body) = env.post(BATCH, &svc, &json!({"events": many})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["rule"], "maxItems");

    // A good batch of 1,000 is published in order.
    let many: Vec<Value> = (0..1000).map(|i| word_added("u-1", "p-1", i)).collect();
    let (status, body) = env.post(BATCH, &svc, &json!({"events": many})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["published"], 1000);
    let seqs: Vec<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["sequence"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 1000);
}

#[tokio::test]
async fn bad_input_gets_specific_errors_and_changes_nothing() {
    let env = TestEnv::start_with(|c| c.max_body_bytes = 64 * 1024).await;
    let svc = env.service_token();

    let (status, body, headers) = env
        .send(
            env.http
                .post(env.url(PUBLISH))
                .bearer_auth(&svc)
                .header("content-type", "application/json")
                .body("{\"category\": "),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "malformed_json");
    assert_eq!(headers["content-type"], "application/problem+json");

    let (status, body, _) = env
        .send(
            env.http
                .post(env.url(PUBLISH))
                .bearer_auth(&svc)
                .header("content-type", "text/plain")
                .body(word_added("u", "p", 1).to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(body["code"], "unsupported_media_type");

    let big = "x".repeat(70 * 1024);
    let (status, body, _) = env
        .send(
            env.http
                .post(env.url(PUBLISH))
                .bearer_auth(&svc)
                .header("content-type", "application/json")
                .body(format!("\"{big}\"")),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["code"], "payload_too_large");

    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"category": "poetry", "type": "word_added", "userId": "u", "data": {}}),
            "/category",
            "enum",
        ),
        (
            json!({"category": "writing", "type": "sneezed", "userId": "u", "data": {}}),
            "/type",
            "eventType",
        ),
        (
            json!({"category": "writing", "type": "comment_added", "userId": "u", "data": {}}),
            "/type",
            "eventType",
        ),
        (
            json!({"category": "writing", "type": "word_added", "userId": "u", "data": {"sessionId": "s", "words": -1}}),
            "/data/words",
            "minimum",
        ),
        (
            json!({"category": "writing", "type": "word_added", "userId": "u", "data": {"sessionId": 7, "words": 1}}),
            "/data/sessionId",
            "type",
        ),
        (
            json!({"category": "writing", "type": "word_added", "userId": "u", "data": {"sessionId": "s", "words": 1}, "timestamp": "2026-13-45T99:00:00Z"}),
            "/timestamp",
            "format",
        ),
        (
            json!({"category": "writing", "type": "word_added", "userId": "u", "data": {"sessionId": "s", "words": 1}, "timestamp": 1700000000}),
            "/timestamp",
            "type",
        ),
        (
            json!({"category": "writing", "type": "word_added", "userId": "u", "data": {"sessionId": "s", "words": 1}, "id": "not-a-uuid"}),
            "/id",
            "pattern",
        ),
        (
            json!({"category": "writing", "type": "word_added", "userId": "a.b", "data": {"sessionId": "s", "words": 1}}),
            "/userId",
            "pattern",
        ),
        (
            json!({"category": "writing", "type": "word_added", "data": {"sessionId": "s", "words": 1}}),
            "/userId",
            "required",
        ),
        (json!([1, 2, 3]), "", "type"),
    ];
    for (event, pointer, rule) in cases {
        let (status, body) = env.post(PUBLISH, &svc, &event).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{event}: {body}");
        assert_eq!(body["errors"][0]["pointer"], pointer, "{event}: {body}");
        assert_eq!(body["errors"][0]["rule"], rule, "{event}: {body}");
    }
    for c in inkwire_shared::events::Category::ALL {
        assert_eq!(
            env.stream_messages(&inkwire_shared::subjects::event_stream(c))
                .await,
            0
        );
    }

    let admin = env.admin_token();
    let (status, body) = env.get("/api/realtime/events/poetry", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("unknown event category")
    );
    for query in [
        "from=yesterday",
        "limit=0",
        "limit=5000",
        "type=cursor_moved",
        "cursor=x",
        "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        "colour=red",
    ] {
        let (status, body) = env
            .get(&format!("/api/realtime/events/writing?{query}"), &admin)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
    let (status, _) = env.get("/api/nothing/here", &admin).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = env.delete(PUBLISH, &admin).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
}

#[tokio::test]
async fn tokens_are_required_and_checked() {
    let env = TestEnv::start().await;
    let event = word_added("u-1", "p-1", 1);
    let (status, body, headers) = env.send(env.http.post(env.url(PUBLISH)).json(&event)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["detail"], "missing bearer token");
    assert_eq!(headers["www-authenticate"], "Bearer");

    let (status, body) = env.post(PUBLISH, &env.expired_token("u-1"), &event).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["detail"], "token expired");

    let forged = inkwire_shared::auth::JwtKeys::hs256("somebody-else's-secret").issue(
        "u-1",
        &[inkwire_shared::auth::GlobalRole::Service],
        Duration::from_secs(60),
    );
    let (status, body) = env.post(PUBLISH, &forged, &event).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["detail"].as_str().unwrap().contains("bad signature"));

    let (status, _, _) = env
        .send(
            env.http
                .post(env.url(PUBLISH))
                .header("authorization", "Basic dTpw")
                .json(&event),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for path in [
        "/api/realtime/events/writing",
        "/api/realtime/events/writing/info",
        "/api/projects/p-1/members",
    ] {
        let (status, _, _) = env.send(env.http.get(env.url(path))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // Health endpoints are public.
    let (status, body, _) = env.send(env.http.get(env.url("/healthz"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, body, _) = env.send(env.http.get(env.url("/readyz"))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["nats"], "ok");
    assert_eq!(body["redis"], "ok");
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 0);
}

#[tokio::test]
async fn users_publish_only_as_themselves_into_their_projects() {
    let env = TestEnv::start().await;
    env.add_member("p-1", "u-1", ProjectRole::Reviewer).await;
    env.add_member("p-2", "u-2", ProjectRole::Owner).await;
    env.register_document("p-1", "d-1").await;
    env.register_document("p-2", "d-2").await;
    let token = env.token("u-1");

    let (status, body) = env.post(PUBLISH, &token, &cursor_moved("u-2", "p-1")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("userId"));
    let (status, _) = env.post(PUBLISH, &token, &cursor_moved("u-1", "p-2")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let mut doc = cursor_moved("u-1", "p-1");
    doc.as_object_mut().unwrap().remove("projectId");
    doc["documentId"] = json!("d-2");
    let (status, _) = env.post(PUBLISH, &token, &doc).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a document of another project"
    );
    doc["documentId"] = json!("d-unknown");
    let (status, _) = env.post(PUBLISH, &token, &doc).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "an unregistered document");
    doc["projectId"] = json!("p-1");
    doc["documentId"] = json!("d-2");
    let (status, body) = env.post(PUBLISH, &env.service_token(), &doc).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(env.stream_messages("EVENTS_COLLABORATION").await, 0);

    // Allowed: own events in own project and its documents; the service role for anyone.
    let (status, _) = env.post(PUBLISH, &token, &cursor_moved("u-1", "p-1")).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    doc["documentId"] = json!("d-1");
    let (status, body) = env.post(PUBLISH, &token, &doc).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (status, _) = env
        .post(PUBLISH, &env.service_token(), &cursor_moved("u-2", "p-9"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Reading a whole category is for admin and service only.
    let (status, _) = env.get("/api/realtime/events/writing", &token).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(env.stream_messages("EVENTS_COLLABORATION").await, 3);
}

#[tokio::test]
async fn range_queries_return_exactly_the_range_across_pages() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let admin = env.admin_token();
    let publish_group = |words: std::ops::Range<u64>, event_type: &'static str| {
        let env = &env;
        let svc = svc.clone();
        async move {
            let events: Vec<Value> = words
                .map(|w| {
                    if event_type == "word_added" {
                        word_added("u-1", "p-1", w)
                    } else {
                        json!({"category": "writing", "type": event_type, "userId": "u-1", "data": {"sessionId": "s", "words": w}})
                    }
                })
                .collect();
            let (status, body) = env.post(BATCH, &svc, &json!({"events": events})).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
    };
    let stamp = || {
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    publish_group(0..10, "word_added").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let from = stamp();
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish_group(100..117, "word_added").await;
    publish_group(500..505, "paragraph_completed").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let to = stamp();
    tokio::time::sleep(Duration::from_millis(50)).await;
    publish_group(1000..1010, "word_added").await;

    // All types in range, pages of 7: 17 word_added then 5 paragraph_completed.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/api/realtime/events/writing?from={from}&to={to}&limit=7");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, page) = env.get(&path.replace('+', "%2B"), &admin).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for e in page["events"].as_array().unwrap() {
            seen.push((
                e["type"].as_str().unwrap().to_string(),
                e["data"]["words"].as_u64().unwrap(),
            ));
        }
        match page.get("nextCursor").and_then(Value::as_str) {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    let expected: Vec<(String, u64)> = (100..117)
        .map(|w| ("word_added".to_string(), w))
        .chain((500..505).map(|w| ("paragraph_completed".to_string(), w)))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 4);

    // With a type filter.
    let path = format!("/api/realtime/events/writing?from={from}&to={to}&type=paragraph_completed");
    let (_, page) = env.get(&path, &admin).await;
    let words: Vec<u64> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["words"].as_u64().unwrap())
        .collect();
    assert_eq!(words, vec![500, 501, 502, 503, 504]);
    assert!(page.get("nextCursor").is_none());

    // Stream information.
    let (status, info) = env.get("/api/realtime/events/writing/info", &admin).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["messages"], 42);
    assert_eq!(info["firstSequence"], 1);
    assert_eq!(info["lastSequence"], 42);
    assert!(info["bytes"].as_u64().unwrap() > 0);
    let (_, empty) = env.get("/api/realtime/events/system/info", &admin).await;
    assert_eq!(empty["messages"], 0);
    assert!(empty["firstTime"].is_null());
}

#[tokio::test]
async fn membership_api_is_for_owners_and_the_service_role() {
    let env = TestEnv::start().await;
    let svc = env.service_token();
    let owner = env.token("alice");
    let editor = env.token("bob");
    let outsider = env.token("mallory");

    let (status, body) = env
        .put(
            "/api/projects/p-1/members/alice",
            &svc,
            &json!({"role": "owner"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = env
        .put(
            "/api/projects/p-1/members/bob",
            &owner,
            &json!({"role": "editor"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .put(
            "/api/projects/p-1/members/mallory",
            &editor,
            &json!({"role": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "editors cannot add members");
    let (status, _) = env
        .put(
            "/api/projects/p-1/members/mallory",
            &outsider,
            &json!({"role": "owner"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = env
        .put(
            "/api/projects/p-1/members/bob",
            &owner,
            &json!({"role": "boss"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["errors"][0]["pointer"], "/role");
    let (status, body) = env
        .put(
            "/api/projects/p.1/members/bob",
            &svc,
            &json!({"role": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_id");

    let (status, body) = env.get("/api/projects/p-1/members", &editor).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["members"],
        json!([{"userId": "alice", "role": "owner"}, {"userId": "bob", "role": "editor"}])
    );
    let (status, _) = env.get("/api/projects/p-1/members", &outsider).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The last owner can be neither removed nor demoted.
    let (status, body) = env.delete("/api/projects/p-1/members/alice", &owner).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, _) = env
        .put(
            "/api/projects/p-1/members/alice",
            &owner,
            &json!({"role": "reader"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = env.delete("/api/projects/p-1/members/bob", &owner).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = env.delete("/api/projects/p-1/members/bob", &owner).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Documents belong to exactly one project.
    let (status, _) = env
        .put(
            "/api/projects/p-1/documents/d-1",
            &owner,
            &json!({"title": "Chapter 1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = env
        .put("/api/projects/p-1/documents/d-1", &owner, &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "registering again is idempotent");
    let (status, _) = env
        .put(
            "/api/projects/p-2/members/alice",
            &svc,
            &json!({"role": "owner"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = env
        .put("/api/projects/p-2/documents/d-1", &owner, &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["code"], "document_in_other_project");
    let (status, _) = env
        .put("/api/projects/p-1/documents/d-2", &editor, &json!({}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}
