//! The edge rules of issue 8 (items 1, 5 and 6): one authorization rule per action whatever
//! the path, the edge accepts exactly what the consumers apply, and client clocks do not
//! drive server state. The property test needs no servers; the others run against real
//! nats-server and redis-server.

use std::time::{Duration, Instant};

use inkwire_events::publish::{ClockWindow, prepare};
use inkwire_shared::config::Config;
use inkwire_shared::events::{Category, Event};
use inkwire_shared::membership::ProjectRole;
use inkwire_shared::schema::SCHEMA_FILES;
use inkwire_tests::{START, TestEnv, WsClient, json, start_session};
use inkwire_writing::input::Input;
use reqwest::StatusCode;
use serde_json::{Number, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const PUBLISH: &str = "/api/realtime/events/publish";
const BATCH: &str = "/api/realtime/events/batch";
const ANALYTICS: &str = "/api/realtime/analytics/project/p-1/writing";

fn path(id: &str, action: &str) -> String {
    format!("/api/realtime/writing/sessions/{id}/{action}")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap()
}

// ---------------------------------------------------------------------------------------
// The property: every schema-valid event the edge accepts, every consumer parses.
// ---------------------------------------------------------------------------------------

/// A small seeded generator (xorshift64*): reproducible, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What the generator produced that a typed consumer might trip on, to show the property
/// was exercised and not vacuous.
#[derive(Default, Debug)]
struct Odd {
    float_integers: u64,
    odd_timestamps: u64,
}

/// An integer in `[min, max]`, sometimes spelled as a float (`12.0`, `-0`).
fn integer(rng: &mut Rng, min: u64, max: u64, odd: &mut Odd) -> Value {
    let n = match rng.below(4) {
        0 => min,
        1 => max,
        2 => min + rng.below(10).min(max - min),
        _ => min + rng.below(max - min + 1),
    };
    // Integral floats are exact up to 2^53; beyond, the spelling would change the value.
    if n < (1 << 53) && rng.chance(40) {
        odd.float_integers += 1;
        let f = if n == 0 && rng.chance(50) {
            -0.0
        } else {
            n as f64
        };
        return Value::Number(Number::from_f64(f).unwrap());
    }
    json!(n)
}

const ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";

fn id(rng: &mut Rng) -> String {
    let len = if rng.chance(10) {
        64
    } else {
        1 + rng.below(12)
    };
    (0..len).map(|_| *rng.pick(ID_CHARS) as char).collect()
}

fn digits(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(b'0' + rng.below(10) as u8))
        .collect()
}

/// A string for a `pattern` the schemas use; an unknown pattern fails the test, so the
/// generator keeps up with the schemas.
fn patterned(rng: &mut Rng, pattern: &str) -> String {
    match pattern {
        "^[A-Za-z0-9_-]{1,64}$" => id(rng),
        "^[A-Z]{3}$" => (0..3)
            .map(|_| char::from(b'A' + rng.below(26) as u8))
            .collect(),
        "^(97[89])?[0-9]{9}[0-9X]$" => {
            let prefix = if rng.chance(50) { "978" } else { "" };
            let last = if rng.chance(20) {
                "X".into()
            } else {
                digits(rng, 1)
            };
            format!("{prefix}{}{last}", digits(rng, 9))
        }
        // A notification category name.
        "^[a-z][a-z0-9_]{0,63}$" => {
            let len = rng.below(12);
            let rest: String = (0..len)
                .map(|_| *rng.pick(b"abcdefghijklmnopqrstuvwxyz0123456789_") as char)
                .collect();
            format!("{}{rest}", char::from(b'a' + rng.below(26) as u8))
        }
        // A UUID, in either case.
        "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$" => {
            let id = uuid::Uuid::from_u128((u128::from(rng.next()) << 64) | u128::from(rng.next()))
                .to_string();
            if rng.chance(20) {
                id.to_uppercase()
            } else {
                id
            }
        }
        other => panic!("the generator does not know the pattern {other}"),
    }
}

/// An RFC 3339 date-time near `now`, in one of the spellings the format allows: `t`/`z` in
/// either case, numeric offsets (`-00:00`, `+23:59`, ...), 0 to 12 fraction digits, a leap
/// second; sometimes outside the window the edge accepts.
fn date_time(rng: &mut Rng, now: OffsetDateTime, odd: &mut Odd) -> String {
    let offset_s: i64 = match rng.below(10) {
        0 => 3 * 86_400,
        1 => -3 * 86_400,
        2 => 10 * 60,
        _ => -(rng.below(23 * 3600) as i64) + rng.below(240) as i64,
    };
    let utc = now + time::Duration::seconds(offset_s);
    let leap = rng.chance(10);
    let zone_minutes: i64 = if leap {
        0
    } else {
        *rng.pick(&[0, 0, 60, -300, 330, 23 * 60 + 59, -(23 * 60 + 59), 14 * 60])
    };
    let local = utc + time::Duration::minutes(zone_minutes);
    let t = if rng.chance(30) { 't' } else { 'T' };
    let (h, m, s) = if leap {
        (23, 59, 60)
    } else {
        (local.hour(), local.minute(), local.second())
    };
    let frac = match rng.below(4) {
        0 => String::new(),
        _ => {
            let n = 1 + rng.below(12) as usize;
            format!(".{}", digits(rng, n))
        }
    };
    let zone = match (zone_minutes, rng.below(3)) {
        (0, 0) => "Z".to_string(),
        (0, 1) => "z".to_string(),
        (0, _) => "-00:00".to_string(),
        (z, _) => format!(
            "{}{:02}:{:02}",
            if z < 0 { '-' } else { '+' },
            z.abs() / 60,
            z.abs() % 60
        ),
    };
    let spelled = format!(
        "{:04}-{:02}-{:02}{t}{h:02}:{m:02}:{s:02}{frac}{zone}",
        local.year(),
        u8::from(local.month()),
        local.day()
    );
    if t == 't' || leap || frac.len() > 10 || zone != "Z" {
        odd.odd_timestamps += 1;
    }
    spelled
}

/// A value valid against `schema` (the subset of JSON Schema the event schemas use).
fn generate(rng: &mut Rng, schema: &Value, now: OffsetDateTime, odd: &mut Odd) -> Value {
    if let Some(choices) = schema.get("enum").and_then(Value::as_array) {
        return rng.pick(choices).clone();
    }
    let bound = |k: &str| schema.get(k).and_then(Value::as_u64);
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let required: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let mut out = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (name, sub) in props {
                    if required.contains(&name.as_str()) || rng.chance(60) {
                        out.insert(name.clone(), generate(rng, sub, now, odd));
                    }
                }
            }
            Value::Object(out)
        }
        Some("integer") => {
            let min = bound("minimum").unwrap_or(0);
            let max = bound("maximum").expect("every integer has a maximum");
            integer(rng, min, max, odd)
        }
        Some("number") => {
            let min = schema
                .get("minimum")
                .and_then(Value::as_f64)
                .unwrap_or(-1e6);
            let x = min + rng.below(1_000_000) as f64 / 64.0;
            if x.fract() == 0.0 && rng.chance(50) {
                json!(x as i64)
            } else {
                json!(x)
            }
        }
        Some("boolean") => json!(rng.chance(50)),
        Some("array") => {
            let items = schema.get("items").expect("arrays have items");
            let min = bound("minItems").unwrap_or(0);
            let max = bound("maxItems").unwrap_or(3).min(min + 3);
            let n = min + rng.below(max - min + 1);
            Value::Array((0..n).map(|_| generate(rng, items, now, odd)).collect())
        }
        Some("string") => {
            if schema.get("format").and_then(Value::as_str) == Some("date-time") {
                return json!(date_time(rng, now, odd));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
                return json!(patterned(rng, p));
            }
            let min = bound("minLength").unwrap_or(0);
            let max = bound("maxLength").unwrap_or(32).min(min + 20);
            let n = min + rng.below(max - min + 1);
            let alphabet = ['a', 'Z', ' ', 'é', '字', '\u{1F600}', '"', '\\', '\n'];
            json!((0..n).map(|_| *rng.pick(&alphabet)).collect::<String>())
        }
        other => panic!("the generator does not know the type {other:?} in {schema}"),
    }
}

/// A whole envelope of `category.event_type`, valid against the envelope and data schemas.
fn envelope(
    rng: &mut Rng,
    category: &str,
    event_type: &str,
    data_schema: &Value,
    now: OffsetDateTime,
    odd: &mut Odd,
) -> Value {
    let mut e = json!({"category": category, "type": event_type, "userId": id(rng),
        "data": generate(rng, data_schema, now, odd)});
    if rng.chance(70) {
        e["timestamp"] = json!(date_time(rng, now, odd));
    }
    if rng.chance(50) {
        let u = uuid::Uuid::new_v4().to_string();
        e["id"] = json!(if rng.chance(50) { u.to_uppercase() } else { u });
    }
    for key in ["projectId", "documentId"] {
        if rng.chance(50) {
            e[key] = json!(id(rng));
        }
    }
    if rng.chance(50) {
        e["metadata"] = json!({"source": "gen", "version": integer(rng, 1, 1000, odd)});
    }
    e
}

#[test]
fn every_schema_valid_event_the_edge_accepts_every_consumer_parses() {
    let schema_of = |path: &str| -> Value {
        let text = SCHEMA_FILES.iter().find(|(p, _)| *p == path).unwrap().1;
        serde_json::from_str(text).unwrap()
    };
    // The schemas alone, as a JSON Schema validator reads them: what "schema-valid" means.
    let plain = |path: &str| {
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema_of(path))
            .unwrap()
    };
    let envelope_schema = plain("envelope.json");
    let now = OffsetDateTime::now_utc();
    let window = ClockWindow {
        now,
        ..ClockWindow::now(&Config::default())
    };
    let mut rng = Rng(0x1e55_ed9e_5eed_0008);
    let mut odd = Odd::default();
    // The notification rules consume domain events too: every default rule's template must
    // render for every event its type can be, or the rule would dead-letter accepted input.
    let rules = inkwire_notifications::rules::check(
        &inkwire_notifications::rules::default_rules(),
        &inkwire_notifications::config::NotifyConfig::default(),
    )
    .expect("the default rules are valid");
    let mut rendered = 0u64;
    let (mut accepted, mut refused) = (0u64, 0u64);
    for category in Category::ALL {
        for event_type in category.event_types() {
            let path = format!("events/{category}/{event_type}.json");
            let data_schema = schema_of(&path);
            let data_validator = plain(&path);
            for _ in 0..300 {
                let event = envelope(
                    &mut rng,
                    category.as_str(),
                    event_type,
                    &data_schema,
                    now,
                    &mut odd,
                );
                assert!(
                    envelope_schema.is_valid(&event) && data_validator.is_valid(&event["data"]),
                    "the generator made an invalid event: {event}"
                );
                // The edge reads the bytes a client sends, as `JsonBody` does (which spells
                // integers as integers).
                let mut sent: Value =
                    serde_json::from_slice(&serde_json::to_vec(&event).unwrap()).expect("JSON");
                inkwire_shared::schema::canonicalize_numbers(&mut sent);
                let Ok(stored) = prepare(sent, &window) else {
                    refused += 1;
                    continue;
                };
                accepted += 1;
                let payload = serde_json::to_vec(&stored.value).unwrap();
                let e: Event = serde_json::from_slice(&payload)
                    .unwrap_or_else(|err| panic!("Event refuses {event}: {err}"));
                inkwire_relay::router::parse(&payload)
                    .unwrap_or_else(|err| panic!("the router refuses {event}: {err}"));
                if category == Category::Writing {
                    serde_json::from_slice::<Input>(&payload)
                        .unwrap_or_else(|err| panic!("the tracker refuses {event}: {err}"));
                }
                for rule in rules
                    .iter()
                    .filter(|r| r.event_category == category && r.event_type == *event_type)
                {
                    let inkwire_notifications::rules::RuleContent::Inline(t) = &rule.content else {
                        continue;
                    };
                    t.render(&inkwire_notifications::rules::template_data(&e))
                        .unwrap_or_else(|err| {
                            panic!("rule {} refuses {event}: {err}", rule.event_type)
                        });
                    rendered += 1;
                }
                // Normalizing keeps the instant.
                if let Some(t) = event.get("timestamp").and_then(Value::as_str) {
                    assert_eq!(e.timestamp, OffsetDateTime::parse(t, &Rfc3339).unwrap());
                }
            }
        }
    }
    assert!(
        accepted > refused,
        "mostly valid: {accepted} accepted, {refused} refused"
    );
    assert!(rendered > 1000, "rule templates rendered: {rendered}");
    assert!(
        odd.float_integers > 1000 && odd.odd_timestamps > 1000,
        "odd spellings exercised: {odd:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Against real servers.
// ---------------------------------------------------------------------------------------

async fn env() -> TestEnv {
    let env = TestEnv::start().await;
    env.add_member("p-1", "alice", ProjectRole::Editor).await;
    env.add_member("p-1", "bob", ProjectRole::Reader).await;
    env.register_document("p-1", "d-1").await;
    env
}

/// Polls the session's metrics until `done` holds.
async fn metrics_until(env: &TestEnv, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, m) = env.get(&path(id, "metrics"), &env.admin_token()).await;
        assert_eq!(status, StatusCode::OK, "{m}");
        if done(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "metrics never got there: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs a body exactly as written (odd number spellings survive).
async fn post_raw(env: &TestEnv, path: &str, token: &str, body: &str) -> (StatusCode, Value) {
    let (s, b, _) = env
        .send(
            env.http
                .post(env.url(path))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body.to_string()),
        )
        .await;
    (s, b)
}

#[tokio::test]
async fn a_reader_cannot_start_a_session_or_type_through_the_events_api() {
    let env = env().await;
    let bob = env.token("bob");
    let started = json!({"category": "writing", "type": "session_started", "userId": "bob",
        "projectId": "p-1", "documentId": "d-1", "data": {"sessionId": "bobs-session"}});
    let keystroke = json!({"category": "writing", "type": "keystroke", "userId": "bob",
        "projectId": "p-1", "documentId": "d-1",
        "data": {"sessionId": "bobs-session", "keys": 50, "charsAdded": 50, "charsDeleted": 0, "wordsAdded": 10}});
    for event in [&started, &keystroke] {
        let (status, body) = env.post(PUBLISH, &bob, event).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["code"], "domain_api_required", "{body}");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("/api/realtime/writing/sessions/"),
            "{body}"
        );
    }
    let (status, body) = env
        .post(BATCH, &bob, &json!({"events": [started, keystroke]}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("events[0]"));
    // The writing API says the same: readers do not write.
    let (status, _) = env
        .post(
            START,
            &bob,
            &json!({"projectId": "p-1", "documentId": "d-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Nothing reached the stream, and the project's analytics show nobody writing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 0);
    let (status, analytics) = env.get(ANALYTICS, &bob).await;
    assert_eq!(status, StatusCode::OK, "{analytics}");
    assert_eq!(analytics["activeWriters"], json!([]), "{analytics}");
    assert_eq!(analytics["wordsToday"], 0, "{analytics}");
}

#[tokio::test]
async fn every_type_follows_its_one_rule() {
    let env = env().await;
    env.add_member("p-1", "rita", ProjectRole::Reviewer).await;
    let ev = |user: &str, category: &str, t: &str, data: Value| json!({"category": category, "type": t, "userId": user, "projectId": "p-1", "data": data});
    let comment = json!({"commentId": "c-1", "text": "nice"});
    let edit = json!({"operation": "insert", "paragraph": 0, "length": 3});
    let svc = env.service_token();
    // The service role is sent to the writing API too, with the route named.
    let (status, body) = env
        .post(
            PUBLISH,
            &svc,
            &ev(
                "alice",
                "writing",
                "keystroke",
                json!({"sessionId": "s", "keys": 1, "charsAdded": 1, "charsDeleted": 0}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["code"], "domain_api_required");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("POST /api/realtime/writing/sessions/{sessionId}/keystroke"),
        "{body}"
    );
    for (token, event, expected) in [
        // Produced by consumers: service only.
        (
            env.token("alice"),
            ev(
                "alice",
                "writing",
                "word_added",
                json!({"sessionId": "s", "words": 1}),
            ),
            Err("service_role_required"),
        ),
        (
            env.token("alice"),
            ev(
                "alice",
                "analytics",
                "metric_updated",
                json!({"metric": "m", "value": 1}),
            ),
            Err("service_role_required"),
        ),
        (
            svc.clone(),
            ev(
                "alice",
                "writing",
                "word_added",
                json!({"sessionId": "s", "words": 1}),
            ),
            Ok(()),
        ),
        // Project activity by role.
        (
            env.token("bob"),
            ev("bob", "collaboration", "comment_added", comment.clone()),
            Err("project_role_required"),
        ),
        (
            env.token("rita"),
            ev("rita", "collaboration", "comment_added", comment),
            Ok(()),
        ),
        (
            env.token("rita"),
            ev("rita", "collaboration", "edit_applied", edit.clone()),
            Err("project_role_required"),
        ),
        (
            env.token("alice"),
            ev("alice", "collaboration", "edit_applied", edit),
            Ok(()),
        ),
        (
            env.token("bob"),
            ev(
                "bob",
                "collaboration",
                "cursor_moved",
                json!({"paragraph": 0, "offset": 0}),
            ),
            Ok(()),
        ),
        (
            env.token("bob"),
            {
                let mut e = ev(
                    "bob",
                    "collaboration",
                    "cursor_moved",
                    json!({"paragraph": 0, "offset": 0}),
                );
                e.as_object_mut().unwrap().remove("projectId");
                e
            },
            Err("project_role_required"),
        ),
        (
            env.token("rita"),
            ev(
                "rita",
                "publishing",
                "status_changed",
                json!({"bookId": "b", "to": "review"}),
            ),
            Err("project_role_required"),
        ),
        (
            env.token("rita"),
            ev(
                "rita",
                "publishing",
                "review_completed",
                json!({"bookId": "b", "reviewerId": "rita", "outcome": "approved"}),
            ),
            Ok(()),
        ),
    ] {
        let (status, body) = env.post(PUBLISH, &token, &event).await;
        match expected {
            Ok(()) => assert_eq!(status, StatusCode::ACCEPTED, "{event}: {body}"),
            Err(code) => {
                assert_eq!(status, StatusCode::FORBIDDEN, "{event}: {body}");
                assert_eq!(body["code"], code, "{event}: {body}");
            }
        }
    }
}

#[tokio::test]
async fn the_service_role_writes_to_a_users_session_through_the_writing_api() {
    let env = env().await;
    let alice = env.token("alice");
    let svc = env.service_token();
    let id = start_session(&env, &alice).await;
    let (status, body) = env
        .post(
            &path(&id, "keystroke"),
            &svc,
            &json!({"keys": 7, "charsAdded": 7, "charsDeleted": 0, "wordsAdded": 2}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let m = metrics_until(&env, &id, |m| m["keystrokes"] == 7).await;
    assert_eq!(m["words"], 2, "{m}");
    let (status, body) = env.post(&path(&id, "pause"), &svc, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    metrics_until(&env, &id, |m| m["state"] == "paused").await;
    // Every event it caused is Alice's.
    let (_, page) = env.get("/api/realtime/events/writing", &svc).await;
    for e in page["events"].as_array().unwrap() {
        assert_eq!(e["userId"], "alice", "{e}");
    }
    // After an accepted end, input is refused rather than accepted and ignored.
    let (status, _) = env.post(&path(&id, "end"), &svc, &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, body) = env
        .post(
            &path(&id, "keystroke"),
            &alice,
            &json!({"keys": 1, "charsAdded": 1, "charsDeleted": 0}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "session_ended");
}

#[tokio::test]
async fn an_event_naming_only_its_document_is_stored_with_the_project() {
    let env = env().await;
    let bob = env.token("bob");
    let mut watcher = WsClient::connect(&env.ws_url("collaboration", &bob)).await;
    assert_eq!(
        watcher.subscribe("project:p-1", None).await["op"],
        "subscribed"
    );
    let event = json!({"category": "collaboration", "type": "cursor_moved", "userId": "bob",
        "documentId": "d-1", "data": {"paragraph": 2, "offset": 5}});
    let (status, published) = env.post(PUBLISH, &bob, &event).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{published}");
    let m = watcher
        .next_within(Duration::from_secs(3))
        .await
        .expect("delivered on the project's channel");
    assert_eq!(m["channel"], "project:p-1", "{m}");
    assert_eq!(m["data"]["id"], published["id"], "{m}");
    assert_eq!(m["data"]["projectId"], "p-1", "{m}");
    let (_, page) = env
        .get("/api/realtime/events/collaboration", &env.service_token())
        .await;
    assert_eq!(page["events"][0]["projectId"], "p-1", "{page}");
    assert_eq!(page["events"][0]["documentId"], "d-1", "{page}");
}

#[tokio::test]
async fn event_times_outside_the_window_are_refused() {
    let env = TestEnv::start_with(|c| {
        c.max_clock_skew = Duration::from_secs(60);
        c.max_event_age = Duration::from_secs(3600);
    })
    .await;
    let svc = env.service_token();
    let now = OffsetDateTime::now_utc();
    let at = |offset: i64| {
        json!({"category": "writing", "type": "word_added", "userId": "u-1",
            "timestamp": rfc3339(now + time::Duration::seconds(offset)),
            "data": {"sessionId": "s", "words": 1}})
    };
    for offset in [5 * 60, -2 * 3600, 400 * 86_400] {
        let (status, body) = env.post(PUBLISH, &svc, &at(offset)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{offset}: {body}");
        assert_eq!(body["code"], "timestamp_out_of_range", "{body}");
        assert_eq!(body["errors"][0]["pointer"], "/timestamp", "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("1h") && detail.contains("1m"), "{detail}");
    }
    let (status, body) = env
        .post(BATCH, &svc, &json!({"events": [at(-60), at(3600), at(0)]}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "timestamp_out_of_range");
    assert_eq!(body["invalidItems"][0]["index"], 1, "{body}");
    assert_eq!(env.stream_messages("EVENTS_WRITING").await, 0);

    // Inside the window, any offset is stored in UTC.
    let mut e = at(-1800);
    let local = (now - Duration::from_secs(1800))
        .to_offset(time::UtcOffset::from_hms(5, 30, 0).unwrap())
        .replace_nanosecond(0)
        .unwrap();
    e["timestamp"] = json!(rfc3339(local));
    let (status, body) = env.post(PUBLISH, &svc, &e).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let (_, page) = env.get("/api/realtime/events/writing", &svc).await;
    let stored = page["events"][0]["timestamp"].as_str().unwrap().to_string();
    assert!(stored.ends_with('Z'), "{stored}");
    assert_eq!(OffsetDateTime::parse(&stored, &Rfc3339).unwrap(), local);
}

#[tokio::test]
async fn a_far_off_event_time_on_nats_does_not_drive_the_session() {
    let env = env().await;
    let alice = env.token("alice");
    let id = start_session(&env, &alice).await;
    // A keystroke published straight onto NATS, claiming to be from 2030.
    let event = json!({"id": uuid::Uuid::new_v4().to_string(), "category": "writing",
        "type": "keystroke", "userId": "alice", "projectId": "p-1", "documentId": "d-1",
        "timestamp": "2030-01-01T00:00:00Z",
        "data": {"sessionId": id, "keys": 9, "charsAdded": 9, "charsDeleted": 0, "wordsAdded": 3}});
    env.state
        .js
        .publish("events.writing.keystroke", event.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let m = metrics_until(&env, &id, |m| m["words"] == 3).await;
    let now_ms = (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as u64;
    assert_eq!(m["state"], "warming_up", "{m}");
    assert!(
        m["stateSince"].as_u64().unwrap() < now_ms + 60_000,
        "the session did not jump to 2030: {m}"
    );
    let (_, stats) = env.get("/api/realtime/writing/stats", &alice).await;
    let today = inkwire_writing::days::local_day(now_ms, None);
    assert_eq!(
        stats["days"],
        json!([{"date": today, "words": 3}]),
        "{stats}"
    );
}

#[tokio::test]
async fn odd_numbers_and_times_are_refused_at_the_edge_or_applied_never_dead_lettered() {
    let env = env().await;
    let alice = env.token("alice");
    let svc = env.service_token();

    // Through the writing API: integers spelled as floats are applied.
    let (status, started) = post_raw(
        &env,
        START,
        &alice,
        r#"{"projectId": "p-1", "documentId": "d-1", "goalWords": 5e1}"#,
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{started}");
    assert_eq!(started["goalWords"], 50, "{started}");
    let id = started["sessionId"].as_str().unwrap().to_string();
    let (status, body) = post_raw(
        &env,
        &path(&id, "keystroke"),
        &alice,
        r#"{"keys": 12.0, "charsAdded": 1.2e1, "charsDeleted": -0, "wordsAdded": 2.0,
            "clientTimestamp": "2026-01-01t10:00:00.123456789123z"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let m = metrics_until(&env, &id, |m| m["keystrokes"] == 12).await;
    assert_eq!(
        (m["charsAdded"].as_u64(), m["words"].as_u64()),
        (Some(12), Some(2))
    );

    // Through the events API: accepted ones are stored canonical, the rest refused.
    let now = OffsetDateTime::now_utc();
    let lower = rfc3339(now - Duration::from_secs(60))
        .replace('T', "t")
        .replace('Z', "z");
    let accepted = [
        format!(
            r#"{{"category": "writing", "type": "word_added", "userId": "alice", "timestamp": "{lower}",
                "data": {{"sessionId": "{id}", "words": 3.0, "totalWords": 1e1}}, "metadata": {{"version": 2.0}}}}"#
        ),
        r#"{"category": "writing", "type": "session_ended", "userId": "alice",
            "data": {"sessionId": "nobody-knows", "durationMs": 6e4, "wordsAdded": 0.0}}"#
            .to_string(),
        r#"{"category": "collaboration", "type": "cursor_moved", "userId": "alice", "documentId": "d-1",
            "data": {"paragraph": 1.0, "offset": 2E0, "selection": {"anchor": 0.0, "head": -0.0}}}"#
            .to_string(),
    ];
    for body in &accepted {
        let (status, answer) = post_raw(&env, PUBLISH, &svc, body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}: {answer}");
    }
    // A leap second on a day without one: the consumers' parser refuses it, so does the
    // edge. So are integers beyond what the consumers store.
    let day = now.date();
    let leap = format!("{day}T23:59:60Z");
    let refused = [
        (
            format!(
                r#"{{"category": "writing", "type": "word_added", "userId": "alice", "timestamp": "{leap}",
                    "data": {{"sessionId": "s", "words": 1}}}}"#
            ),
            "/timestamp",
        ),
        (
            r#"{"category": "writing", "type": "session_ended", "userId": "alice",
                "data": {"sessionId": "s", "durationMs": 1, "wordsAdded": 5e9}}"#
                .to_string(),
            "/data/wordsAdded",
        ),
        (
            r#"{"category": "publishing", "type": "sales_updated", "userId": "alice",
                "data": {"bookId": "b", "platform": "x", "units": 1, "periodStart": "2026-02-27T23:59:60Z"}}"#
                .to_string(),
            "/data/periodStart",
        ),
    ];
    for (body, pointer) in &refused {
        let (status, answer) = post_raw(&env, PUBLISH, &svc, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["errors"][0]["pointer"], *pointer, "{answer}");
    }

    // Everything accepted was applied or forwarded; nothing was dead-lettered.
    let (_, page) = env
        .get("/api/realtime/events/writing?type=word_added", &svc)
        .await;
    let stored = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["metadata"]["source"] != "tracker")
        .expect("the service's word_added");
    assert_eq!(stored["data"]["words"].to_string(), "3", "{stored}");
    assert_eq!(stored["metadata"]["version"].to_string(), "2", "{stored}");
    assert!(stored["timestamp"].as_str().unwrap().ends_with('Z'));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.stream_messages("DLQ").await, 0, "dead letters");
    let mut info = env
        .state
        .js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            inkwire_writing::tracker::DURABLE,
            "EVENTS_WRITING",
        )
        .await
        .unwrap();
    let info = info.info().await.unwrap();
    assert_eq!(
        (info.num_pending, info.num_ack_pending, info.num_redelivered),
        (0, 0, 0),
        "the tracker took everything at once: {info:?}"
    );
}
