//! Every route, fed what a careless or hostile client sends: control characters, huge
//! strings, odd numbers, wrong types, deep nesting, unicode, broken percent-encoding and very
//! long path segments, in every body field, every path parameter and the query string.
//!
//! Whatever comes in, the answer is never a 5xx (the servers are healthy, so not even a
//! `503`), never an empty reply or a reset connection, every error is
//! `application/problem+json` with a `code`, no error body is longer than
//! [`MAX_ERROR_BODY`] (large values are not echoed), and the server stays ready.
//!
//! [`ROUTES`] lists the routes of every router (events, membership, relay API, writing,
//! notifications, chat, presence, activity, analytics, health, relay paths); a route added to a router
//! belongs here too.

use std::time::Duration;

use inkwire_shared::membership::ProjectRole;
use inkwire_tests::{TestEnv, json};
use reqwest::Method;
use serde_json::Value;

/// Largest error body accepted, in bytes.
const MAX_ERROR_BODY: usize = 6 * 1024;

/// Which token a route is called with: the one that gets furthest into its handler.
#[derive(Clone, Copy)]
enum As {
    /// `u-1`: owner of project `p-1` and of the writing session.
    Owner,
    /// A `service` token (firehose reads, statistics, sending to users).
    Service,
    /// No token (public routes).
    Nobody,
}

struct Route {
    method: Method,
    /// `{project}`, `{user}`, `{document}`, `{session}`, `{category}` and `{seq}` are filled in.
    path: &'static str,
    /// A valid body (`None`: the route takes none).
    body: Option<fn() -> Value>,
    caller: As,
}

const fn route(
    method: Method,
    path: &'static str,
    body: Option<fn() -> Value>,
    caller: As,
) -> Route {
    Route {
        method,
        path,
        body,
        caller,
    }
}

fn event() -> Value {
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    json!({"category": "collaboration", "type": "cursor_moved", "userId": "u-1", "projectId": "p-1",
        "documentId": "d-1", "timestamp": now,
        "data": {"paragraph": 12, "offset": 40, "selection": {"anchor": 40, "head": 52}},
        "metadata": {"source": "fuzz", "correlationId": "c-1", "version": 1}})
}

/// Every route of every router. Order matters only for the writing session: `end` comes
/// last among its routes.
const ROUTES: &[Route] = &[
    // Events API.
    route(
        Method::POST,
        "/api/realtime/events/publish",
        Some(event),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/events/batch",
        Some(|| json!({"events": [event()]})),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/events/{category}",
        None,
        As::Service,
    ),
    route(
        Method::GET,
        "/api/realtime/events/{category}/info",
        None,
        As::Service,
    ),
    // Projects, members and documents.
    route(Method::GET, "/api/projects", None, As::Owner),
    route(Method::GET, "/api/projects/{project}", None, As::Owner),
    route(
        Method::GET,
        "/api/projects/{project}/documents",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/projects/{project}/documents/{document}",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/projects/{project}/documents/{document}",
        None,
        As::Owner,
    ),
    // Dead letters.
    route(Method::GET, "/api/realtime/dlq", None, As::Service),
    route(Method::DELETE, "/api/realtime/dlq/{seq}", None, As::Service),
    route(
        Method::POST,
        "/api/realtime/dlq/{seq}/replay",
        None,
        As::Service,
    ),
    // Membership.
    route(
        Method::GET,
        "/api/projects/{project}/members",
        None,
        As::Owner,
    ),
    route(
        Method::PUT,
        "/api/projects/{project}/members/{user}",
        Some(|| json!({"role": "editor"})),
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/projects/{project}/members/{user}",
        None,
        As::Owner,
    ),
    route(
        Method::PUT,
        "/api/projects/{project}/documents/{document}",
        Some(|| json!({"title": "Chapter 1"})),
        As::Owner,
    ),
    // Relay server API and metrics.
    route(
        Method::GET,
        "/api/realtime/websocket/stats",
        None,
        As::Service,
    ),
    route(
        Method::POST,
        "/api/realtime/websocket/broadcast",
        Some(
            || json!({"channel": "project:p-1", "type": "system", "data": {"text": "hello"}, "id": "m-1"}),
        ),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/websocket/send-to-user",
        Some(
            || json!({"userId": "u-1", "type": "notification", "data": {"title": "hello"}, "id": "n-1"}),
        ),
        As::Service,
    ),
    route(Method::GET, "/metrics", None, As::Service),
    // Relay paths, without an upgrade.
    route(Method::GET, "/ws/collaboration", None, As::Owner),
    route(Method::GET, "/ws/analytics", None, As::Owner),
    route(Method::GET, "/ws/notifications", None, As::Owner),
    route(Method::GET, "/ws/presence", None, As::Owner),
    // Writing sessions.
    route(
        Method::POST,
        "/api/realtime/writing/sessions/start",
        Some(|| json!({"projectId": "p-1", "documentId": "d-1", "goalWords": 500})),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/writing/sessions/active",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/writing/sessions/{session}/keystroke",
        Some(|| {
            json!({"keys": 12, "charsAdded": 11, "charsDeleted": 1, "wordsAdded": 2,
            "wordsDeleted": 0, "paragraphBoundary": false, "pasted": false,
            "clientTimestamp": time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap()})
        }),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/writing/sessions/{session}/metrics",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/writing/sessions/{session}/pause",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/writing/sessions/{session}/resume",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/writing/sessions/{session}/end",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/analytics/project/{project}/writing",
        None,
        As::Owner,
    ),
    route(
        Method::PUT,
        "/api/realtime/writing/preferences",
        Some(|| json!({"timeZone": "Europe/Berlin", "dailyGoalWords": 1000})),
        As::Owner,
    ),
    route(Method::GET, "/api/realtime/writing/stats", None, As::Owner),
    // Co-editing: the document REST API, presence and analytics.
    route(
        Method::GET,
        "/api/realtime/collaboration/document/{document}/content",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/collaboration/document/{document}/contributions",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/collaboration/presence",
        Some(|| {
            json!({"documentId": "d-1", "mode": "editing", "offset": 0,
                "selection": {"anchor": 0, "head": 0}, "viewport": {"first": 0, "last": 0},
                "device": "web"})
        }),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/collaboration/cursor",
        Some(|| json!({"documentId": "d-1", "offset": 0, "selection": {"anchor": 0, "head": 0}})),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/collaboration/edit",
        Some(|| json!({"documentId": "d-1", "offset": 0, "inserted": 1, "deleted": 0})),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/collaboration/document/{document}/collaborators",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/collaboration/document/{document}/conflicts",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/collaboration/project/{project}/document/{document}/metrics",
        None,
        As::Owner,
    ),
    // Notifications (`{notification}` is in u-1's inbox, `{scheduled}` a send u-1 scheduled;
    // the deleting routes come last).
    route(
        Method::POST,
        "/api/realtime/notifications/send",
        Some(|| {
            json!({"userIds": ["u-1"], "category": "chat", "priority": "high", "title": "Hi",
                "body": "there", "channels": ["in_app", "email"], "groupKey": "g-1",
                "projectId": "p-1", "data": {"k": "v"}, "idempotencyKey": "fuzz-1"})
        }),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/notifications/send",
        Some(|| {
            json!({"userId": "u-2", "category": "chat", "priority": "low", "template": "fuzz",
                "data": {"name": "Ada"}, "sendAt": (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
                .format(&time::format_description::well_known::Rfc3339).unwrap()})
        }),
        As::Service,
    ),
    route(Method::GET, "/api/realtime/notifications", None, As::Owner),
    route(
        Method::GET,
        "/api/realtime/notifications/unread-count",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/notifications/{notification}/read",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/notifications/{notification}/deliveries",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/notifications/read-all",
        None,
        As::Owner,
    ),
    route(
        Method::PUT,
        "/api/realtime/notifications/templates/{template}",
        Some(|| {
            json!({"title": "Hi {{ name }}", "body": "b",
                "email": {"subject": "s", "html": "<p>{{ name }}</p>", "text": "t"},
                "sms": "s", "push": {"title": "p", "body": "q"}})
        }),
        As::Service,
    ),
    route(
        Method::GET,
        "/api/realtime/notifications/templates/{template}",
        None,
        As::Service,
    ),
    route(
        Method::PUT,
        "/api/realtime/notifications/preferences",
        Some(|| {
            json!({"timeZone": "Europe/London",
                "quietHours": {"enabled": true, "start": "22:00", "end": "08:00"},
                "categories": {"chat": {"channels": {"in_app": true, "email": false, "sms": false, "push": true},
                    "digest": {"frequency": "weekly", "weekday": "monday", "at": "09:00"}}},
                "muteWindowSeconds": 3600,
                "contacts": {"email": "ada@example.com", "phone": "+447700900123"}})
        }),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/notifications/preferences",
        None,
        As::Owner,
    ),
    // Push devices (SNS is a moto peer; the device registered here is deleted below).
    route(
        Method::POST,
        "/api/realtime/notifications/preferences/devices",
        Some(|| json!({"token": "fuzz-token", "platform": "gcm", "deviceId": "fuzz-device"})),
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/notifications/preferences/devices/{device}",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/notifications/scheduled/{scheduled}",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/notifications/{notification}",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/notifications/templates/{template}",
        None,
        As::Service,
    ),
    // Chat (`{room}` is a room of u-1 and u-2; the deleting routes come last).
    route(
        Method::POST,
        "/api/realtime/chat/rooms",
        Some(|| json!({"name": "fuzz", "participants": ["u-2"]})),
        As::Owner,
    ),
    route(Method::GET, "/api/realtime/chat/rooms", None, As::Owner),
    route(
        Method::GET,
        "/api/realtime/chat/rooms/{room}",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/chat/rooms/{room}/participants",
        Some(|| json!({"userId": "u-3"})),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/chat/rooms/{room}/messages",
        Some(|| json!({"clientMessageId": "c-1", "text": "hi"})),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/chat/rooms/{room}/messages",
        None,
        As::Owner,
    ),
    route(
        Method::PUT,
        "/api/realtime/chat/rooms/{room}/messages/{seq}",
        Some(|| json!({"text": "edited"})),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/chat/rooms/{room}/read",
        Some(|| json!({"upTo": 1})),
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/chat/rooms/{room}/typing",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/chat/rooms/{room}/messages/{seq}",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/chat/rooms/{room}/participants/{user}",
        None,
        As::Owner,
    ),
    // Client sessions (`{csession}` is one of u-1's; deleting comes last).
    route(
        Method::PUT,
        "/api/realtime/client-sessions/{csession}",
        Some(
            || json!({"state": {"route": "/p/1", "scroll": 10}, "preferences": {"theme": "dark"}}),
        ),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/client-sessions/{csession}",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/client-sessions",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/client-sessions/{csession}",
        None,
        As::Owner,
    ),
    // User presence (`{user}` u-2 shares the chat room with u-1).
    route(
        Method::GET,
        "/api/realtime/presence/users/{user}",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/presence/rooms/{room}",
        None,
        As::Owner,
    ),
    route(
        Method::POST,
        "/api/realtime/presence/status",
        Some(|| json!({"status": "away"})),
        As::Owner,
    ),
    // Activity log (the caller's own, and another user's with a service token).
    route(Method::GET, "/api/realtime/activity", None, As::Owner),
    route(Method::GET, "/api/realtime/activity/stats", None, As::Owner),
    route(Method::GET, "/api/realtime/activity", None, As::Service),
    route(
        Method::GET,
        "/api/realtime/activity/stats",
        None,
        As::Service,
    ),
    // Analytics (the overall series as a member, which is refused, and with a service token;
    // a member's project figures; a book's sales with a service token).
    route(
        Method::GET,
        "/api/realtime/analytics/metrics",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/analytics/metrics",
        None,
        As::Service,
    ),
    route(
        Method::GET,
        "/api/realtime/analytics/projects/{project}",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/analytics/books/{book}/sales",
        None,
        As::Service,
    ),
    // Analytics thresholds (`{threshold}` on u-1's project p-1; deleting comes last).
    route(
        Method::PUT,
        "/api/realtime/analytics/thresholds/{threshold}",
        Some(|| {
            json!({"metric": "word_added", "projectId": "p-1", "window": "1m",
                "comparator": "gt", "value": 100, "hysteresis": 10})
        }),
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/analytics/thresholds/{threshold}",
        None,
        As::Owner,
    ),
    route(
        Method::GET,
        "/api/realtime/analytics/thresholds",
        None,
        As::Owner,
    ),
    route(
        Method::DELETE,
        "/api/realtime/analytics/thresholds/{threshold}",
        None,
        As::Owner,
    ),
    // Health.
    route(Method::GET, "/healthz", None, As::Nobody),
    route(Method::GET, "/readyz", None, As::Nobody),
];

/// JSON texts put in place of one field (or of the whole body).
fn odd_json_values() -> Vec<String> {
    let deep_arrays = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let deep_objects = format!("{}1{}", r#"{"a":"#.repeat(100), "}".repeat(100));
    vec![
        r#""\u0000""#.into(),
        r#""a\r\nb""#.into(),
        r#""\u001b[31mred\u001b[0m""#.into(),
        format!("\"{}\"", "x".repeat(100_000)),
        format!("\"{}\"", "é".repeat(30_000)),
        r#""é🦀\u202e\ufeff""#.into(),
        r#""\ud800""#.into(),
        r#""""#.into(),
        r#"" ""#.into(),
        r#""a.b.>*""#.into(),
        r#""../..""#.into(),
        r#""%00%ZZ""#.into(),
        "1e308".into(),
        "1e400".into(),
        "-0".into(),
        "-0.0".into(),
        "1.5".into(),
        "1.0".into(),
        "18446744073709551616".into(),
        "-9223372036854775809".into(),
        "-1".into(),
        "0".into(),
        "true".into(),
        "null".into(),
        "[]".into(),
        "{}".into(),
        r#"["x", 1, null, {}]"#.into(),
        r#"{"\u0000": 1, "a\r\nb": "c"}"#.into(),
        r#""9999-12-31T23:59:60Z""#.into(),
        r#""0000-01-01T00:00:00Z""#.into(),
        r#""2026-11-21T10:00:00+99:99""#.into(),
        r#""2026-02-30T10:00:00Z""#.into(),
        deep_arrays,
        deep_objects,
    ]
}

/// Whole bodies that are not what any route expects.
fn odd_bodies() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "",
        "{",
        r#"{"a":"#,
        "null",
        "[]",
        r#""text""#,
        "123",
        "\u{feff}{}",
        r#"{"a":1,"a":2}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    out.push(vec![0xff, 0xfe, 0x00, 0x7b]);
    out.push(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes());
    out.push(format!(r#"{{"extra":"{}"}}"#, "x".repeat(100_000)).into_bytes());
    out.push(format!("[{}1]", "1,".repeat(300_000)).into_bytes());
    out
}

/// Raw path segments (already percent-encoded where meant to be).
fn odd_segments() -> Vec<String> {
    vec![
        "%00".into(),
        "%ZZ".into(),
        "%".into(),
        "a%0D%0Ab".into(),
        "%1B%5B31m".into(),
        "%FF%FE".into(),
        "%F0%9F%A6%80".into(),
        "%C3%A9".into(),
        "%E2%80%AE".into(),
        "..".into(),
        "%2E%2E".into(),
        "a%2Fb".into(),
        "a.b".into(),
        "*".into(),
        "%3E".into(),
        "%20".into(),
        "-".into(),
        "0".into(),
        "18446744073709551616".into(),
        "x".repeat(65),
        "x".repeat(5_000),
        "x".repeat(20_000),
        "x".repeat(70_000),
    ]
}

/// Query strings tried on every route.
fn odd_queries() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let values = [
        "%00",
        "%ZZ",
        "%FF%FE",
        "a%0D%0Ab",
        "1e308",
        "-0",
        "1.5",
        "18446744073709551616",
        "-1",
        "0",
        "9999-12-31T23:59:59Z",
        "0000-01-01T00:00:00Z",
        "2026-11-21T10:00:00%2B99:99",
    ];
    for key in [
        "from",
        "to",
        "type",
        "limit",
        "cursor",
        "token",
        "tz",
        "userId",
        "x",
        "window",
        "step",
        "projectId",
        "days",
    ] {
        for v in values {
            out.push(format!("{key}={v}"));
        }
    }
    out.extend(
        [
            "&&&",
            "=",
            "a",
            "limit=1&limit=2",
            "%ZZ=1",
            "%00=%00",
            "from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
        ]
        .map(String::from),
    );
    out.push(format!("x={}", "y".repeat(10_000)));
    out.push(format!("x={}", "y".repeat(100_000)));
    out
}

struct Fuzzer {
    env: TestEnv,
    http: reqwest::Client,
    owner: String,
    service: String,
    session: String,
    notification: String,
    scheduled: String,
    room: String,
    requests: usize,
    failures: Vec<String>,
}

impl Fuzzer {
    fn token(&self, caller: As) -> Option<&str> {
        match caller {
            As::Owner => Some(&self.owner),
            As::Service => Some(&self.service),
            As::Nobody => None,
        }
    }

    fn path(&self, template: &str, replace: Option<(&str, &str)>) -> String {
        let mut path = template.to_string();
        for (name, value) in [
            ("{project}", "p-1"),
            ("{user}", "u-2"),
            ("{document}", "d-1"),
            ("{session}", self.session.as_str()),
            ("{category}", "writing"),
            ("{seq}", "1"),
            ("{notification}", self.notification.as_str()),
            ("{scheduled}", self.scheduled.as_str()),
            ("{room}", self.room.as_str()),
            ("{template}", "fuzz"),
            ("{device}", "fuzz-device"),
            ("{csession}", "tab-1"),
            ("{book}", "b-1"),
            ("{threshold}", "fuzz-threshold"),
        ] {
            let value = match replace {
                Some((n, v)) if n == name => v,
                _ => value,
            };
            path = path.replace(name, value);
        }
        path
    }

    /// Sends one request and records what is wrong with its answer.
    async fn send(
        &mut self,
        what: String,
        r: &Route,
        path: &str,
        content_type: Option<&str>,
        body: Option<Vec<u8>>,
    ) {
        self.requests += 1;
        if path.len() > 60_000 {
            // Beyond what the `http` crate (and so reqwest) lets a client send.
            let problem = match raw_request(&self.env.base, r, path, self.token(r.caller)).await {
                Err(e) => Some(format!("no answer ({e})")),
                Ok((status, ct, body)) => judge(status, &ct, &body),
            };
            if let Some(p) = problem {
                let line = format!("{} {}: {what}: {p}", r.method, r.path);
                self.failures.push(line.chars().take(300).collect());
            }
            return;
        }
        let url = format!("{}{path}", self.env.base);
        let mut req = self.http.request(r.method.clone(), url);
        if let Some(t) = self.token(r.caller) {
            req = req.bearer_auth(t);
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let problem = match req.send().await {
            Err(e) => Some(format!("no answer ({e})")),
            Ok(res) => {
                let status = res.status();
                let ct = res
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                match res.bytes().await {
                    Err(e) => Some(format!("{status} with a broken body ({e})")),
                    Ok(bytes) => judge(status, &ct, &bytes),
                }
            }
        };
        if let Some(p) = problem {
            let line = format!("{} {}: {what}: {p}", r.method, r.path);
            self.failures.push(line.chars().take(300).collect());
        }
    }
}

/// Sends a request over a plain TCP connection and reads the answer to the end (the
/// request asks the server to close the connection afterwards).
async fn raw_request(
    base: &str,
    r: &Route,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(reqwest::StatusCode, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut req = format!(
        "{} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n",
        r.method
    );
    if let Some(t) = token {
        req.push_str(&format!("authorization: Bearer {t}\r\n"));
    }
    req.push_str("content-length: 0\r\n\r\n");
    tcp.write_all(req.as_bytes()).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    parse_answer(&answer).ok_or_else(|| {
        std::io::Error::other(format!(
            "unparseable answer {:?}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ))
    })
}

/// Status, content type and body of a raw HTTP/1.1 answer (`content-length` framed).
fn parse_answer(answer: &[u8]) -> Option<(reqwest::StatusCode, String, Vec<u8>)> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..split]).ok()?;
    let body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.get(9..12)?.parse().ok()?;
    let mut content_type = String::new();
    let mut length = None;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = value.trim().to_string(),
            "content-length" => length = value.trim().parse::<usize>().ok(),
            _ => {}
        }
    }
    let body = &body[..length?.min(body.len())];
    Some((
        reqwest::StatusCode::from_u16(status).ok()?,
        content_type,
        body.to_vec(),
    ))
}

/// What is wrong with an answer, if anything.
fn judge(status: reqwest::StatusCode, content_type: &str, body: &[u8]) -> Option<String> {
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status.is_server_error() {
        return Some(format!("{status}: {}", text()));
    }
    if !status.is_client_error() {
        return None;
    }
    if !content_type.starts_with("application/problem+json") {
        return Some(format!(
            "{status} as {content_type:?}, not problem+json: {:?}",
            text()
        ));
    }
    if body.len() > MAX_ERROR_BODY {
        return Some(format!("{status} with a {} byte error body", body.len()));
    }
    let doc: Value = match serde_json::from_slice(body) {
        Ok(d) => d,
        Err(e) => return Some(format!("{status}: problem is not JSON ({e})")),
    };
    if doc["code"].as_str().is_none_or(|c| c.is_empty()) || doc["status"] != status.as_u16() {
        return Some(format!("{status}: problem without code or status: {doc}"));
    }
    None
}

fn with_field(valid: &Value, pointer: &str, raw: &str) -> Vec<u8> {
    const MARK: &str = "__fuzzed_value__";
    let mut v = valid.clone();
    *v.pointer_mut(pointer).expect("field exists") = json!(MARK);
    v.to_string()
        .replacen(&format!("\"{MARK}\""), raw, 1)
        .into_bytes()
}

/// JSON pointers of every field of `v` (objects and arrays, recursively), and `v` itself.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                pointers(child, format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                pointers(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    if !at.is_empty() {
        out.push(at);
    }
}

/// Seeds what the notification routes work on: `(notification id, scheduled send id)`.
async fn notifications_to_fuzz(env: &TestEnv, owner: &str) -> (String, String) {
    let (status, body) = env
        .put(
            "/api/realtime/notifications/templates/fuzz",
            &env.service_token(),
            &json!({"title": "Hi {{ name }}", "body": "b"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let in_an_hour = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (status, body) = env
        .post(
            "/api/realtime/notifications/send",
            owner,
            &json!({"userId": "u-1", "category": "chat", "priority": "low", "title": "Later",
                "body": "b", "sendAt": in_an_hour}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let scheduled = body["notifications"][0]["id"].as_str().unwrap().to_string();
    let n = inkwire_notifications::send::Notification {
        id: uuid::Uuid::now_v7(),
        user_id: "u-1".into(),
        category: "chat".into(),
        priority: inkwire_notifications::model::Priority::High,
        title: "Hi".into(),
        body: "there".into(),
        email: None,
        sms: None,
        push: None,
        data: json!({}),
        channels: None,
        group_key: None,
        template: None,
        project_id: None,
        send_at: None,
        created_at: time::OffsetDateTime::now_utc(),
        sender: "svc".into(),
    };
    let mut redis = env.state.redis.clone();
    inkwire_notifications::inbox::add(&mut redis, &env.state.js, &n, 1000)
        .await
        .unwrap();
    (n.id.to_string(), scheduled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_survives_odd_input() {
    // SNS (moto) with a platform application, so the push-device routes get past
    // `503 provider_not_configured` into their handlers.
    let sns = inkwire_tests::peers::SnsPeer::start().await;
    let app = sns.create_platform_application("fuzz", "GCM").await;
    let providers = sns.provider_config(Some(&app));
    let env = TestEnv::start_settings(|_| {}, |s| s.providers = providers).await;
    env.add_member("p-1", "u-1", ProjectRole::Owner).await;
    env.register_document("p-1", "d-1").await;
    let owner = env.token("u-1");
    let (status, started) = env
        .post(
            "/api/realtime/writing/sessions/start",
            &owner,
            &json!({"projectId": "p-1", "documentId": "d-1"}),
        )
        .await;
    assert_eq!(status, 201, "{started}");
    // A notification in u-1's inbox, a template, and a send u-1 scheduled.
    let (notification, scheduled) = notifications_to_fuzz(&env, &owner).await;
    // A chat room of u-1 and u-2.
    let (_, room) = env
        .post(
            "/api/realtime/chat/rooms",
            &owner,
            &json!({"name": "fuzz", "participants": ["u-2"]}),
        )
        .await;
    let room = room["id"].as_str().expect("room created").to_string();
    let mut f = Fuzzer {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap(),
        owner,
        service: env.service_token(),
        session: started["sessionId"].as_str().unwrap().to_string(),
        notification,
        scheduled,
        room,
        env,
        requests: 0,
        failures: Vec::new(),
    };
    let values = odd_json_values();
    let bodies = odd_bodies();
    let segments = odd_segments();
    let queries = odd_queries();
    for r in ROUTES {
        let path = f.path(r.path, None);
        let valid = r.body.map(|b| b());
        let valid_bytes = valid.as_ref().map(|v| v.to_string().into_bytes());
        let json_ct = valid.as_ref().map(|_| "application/json");
        // The valid request itself.
        f.send("valid".into(), r, &path, json_ct, valid_bytes.clone())
            .await;
        // Every field of the body, replaced by every odd value.
        if let Some(valid) = &valid {
            let mut fields = Vec::new();
            pointers(valid, String::new(), &mut fields);
            for field in &fields {
                for raw in &values {
                    let body = with_field(valid, field, raw);
                    let what = format!("{field} = {raw}");
                    f.send(what, r, &path, json_ct, Some(body)).await;
                }
            }
        }
        // Whole bodies, whatever the route (bodies on GET and DELETE too), and odd content
        // types.
        for body in &bodies {
            let what = format!(
                "body {:?}",
                String::from_utf8_lossy(&body[..body.len().min(40)])
            );
            f.send(what, r, &path, Some("application/json"), Some(body.clone()))
                .await;
        }
        for raw in values.iter().take(12) {
            let what = format!("whole body {raw}");
            f.send(
                what,
                r,
                &path,
                Some("application/json"),
                Some(raw.clone().into_bytes()),
            )
            .await;
        }
        for ct in [
            "text/plain",
            "application/json; charset=\u{e9}",
            "application/x+json;;;",
            "*/*",
        ] {
            f.send(
                format!("content-type {ct}"),
                r,
                &path,
                Some(ct),
                valid_bytes.clone(),
            )
            .await;
        }
        // Every path parameter.
        for name in [
            "{project}",
            "{user}",
            "{document}",
            "{session}",
            "{category}",
            "{seq}",
            "{notification}",
            "{scheduled}",
            "{room}",
            "{template}",
            "{device}",
            "{csession}",
            "{book}",
            "{threshold}",
        ] {
            if !r.path.contains(name) {
                continue;
            }
            for seg in &segments {
                let path = f.path(r.path, Some((name, seg)));
                let what = format!("{name} = {:?}", &seg[..seg.len().min(40)]);
                f.send(what, r, &path, json_ct, valid_bytes.clone()).await;
            }
        }
        // Extra and very long path segments after the route.
        for seg in ["%00", "%ZZ", &"x".repeat(70_000)] {
            let what = format!("trailing segment {:?}", &seg[..seg.len().min(40)]);
            f.send(
                what,
                r,
                &format!("{path}/{seg}"),
                json_ct,
                valid_bytes.clone(),
            )
            .await;
        }
        // The query string.
        for q in &queries {
            let what = format!("query {:?}", &q[..q.len().min(60)]);
            f.send(
                what,
                r,
                &format!("{path}?{q}"),
                json_ct,
                valid_bytes.clone(),
            )
            .await;
        }
    }
    // Still serving, and still ready.
    let (status, body) = f.env.get("/readyz", "").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = f
        .env
        .post("/api/realtime/events/publish", &f.owner, &event())
        .await;
    assert_eq!(status, 202, "{body}");
    let shown: Vec<&String> = f.failures.iter().take(40).collect();
    assert!(
        f.failures.is_empty(),
        "{} of {} requests were answered wrongly; the first ones:\n{}",
        f.failures.len(),
        f.requests,
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}
