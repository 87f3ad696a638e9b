//! Workflows (issue 14) against real nats-server and redis-server, with a local HTTP server
//! as the peer every `http` step calls (it counts requests per idempotency key, fails on
//! demand and answers slowly on demand): registration and its errors; a DAG with parallel
//! branches and a join that reads both; retries with their backoff; timeouts; the `fail`
//! and `continue` strategies; conditions; durable delays; cancel during a long step; the
//! token fencing of attempts; idempotent starts; the automation events; who may do what.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::DeliverPolicy;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{any, get};
use axum::{Json, Router};
use inkwire_shared::events::Category;
use inkwire_shared::jetstream::read_stream;
use inkwire_shared::membership::ProjectRole;
use inkwire_tests::TestEnv;
use inkwire_workflows::store;
use reqwest::StatusCode;
use serde_json::{Value, json};

const REGISTER: &str = "/api/workflows/register";

/// What the peer saw: (path, idempotency key, when).
#[derive(Clone, Default)]
struct Peer {
    seen: Arc<Mutex<Vec<(String, String, Instant)>>>,
}

impl Peer {
    fn calls(&self, path: &str) -> Vec<(String, Instant)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, k, t)| (k.clone(), *t))
            .collect()
    }

    fn record(&self, path: String, headers: &HeaderMap) -> usize {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut seen = self.seen.lock().unwrap();
        seen.push((path.clone(), key.clone(), Instant::now()));
        seen.iter()
            .filter(|(p, k, _)| *p == path && *k == key)
            .count()
    }
}

/// `/ok/{name}` answers `{"name", "n"}`; `/fail-first/{name}?n=N` answers 503 to the first N
/// calls whatever their key; `/flaky/{name}?fails=N` answers 503 to the first N
/// calls with one idempotency key; `/slow/{name}?ms=` answers after a while; `/bad/{name}`
/// is 400; `/echo/{name}` answers the request body.
async fn start_peer() -> (String, Peer) {
    let peer = Peer::default();
    async fn ok(State(p): State<Peer>, Path(name): Path<String>, h: HeaderMap) -> Json<Value> {
        let n = p.record(format!("/ok/{name}"), &h);
        Json(json!({"name": name, "n": n}))
    }
    async fn flaky(
        State(p): State<Peer>,
        Path(name): Path<String>,
        Query(q): Query<HashMap<String, String>>,
        h: HeaderMap,
    ) -> (axum::http::StatusCode, Json<Value>) {
        let n = p.record(format!("/flaky/{name}"), &h);
        let fails: usize = q.get("fails").and_then(|f| f.parse().ok()).unwrap_or(0);
        if n <= fails {
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"n": n})),
            )
        } else {
            (axum::http::StatusCode::OK, Json(json!({"n": n})))
        }
    }
    async fn slow(
        State(p): State<Peer>,
        Path(name): Path<String>,
        Query(q): Query<HashMap<String, String>>,
        h: HeaderMap,
    ) -> Json<Value> {
        p.record(format!("/slow/{name}"), &h);
        let ms: u64 = q.get("ms").and_then(|f| f.parse().ok()).unwrap_or(1000);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        p.record(format!("/slow-done/{name}"), &h);
        Json(json!({"slept": ms}))
    }
    async fn bad(
        State(p): State<Peer>,
        Path(name): Path<String>,
        h: HeaderMap,
    ) -> (axum::http::StatusCode, Json<Value>) {
        p.record(format!("/bad/{name}"), &h);
        (
            axum::http::StatusCode::BAD_REQUEST,
            Json(json!({"error": "no"})),
        )
    }
    async fn echo(
        State(p): State<Peer>,
        Path(name): Path<String>,
        h: HeaderMap,
        body: String,
    ) -> Json<Value> {
        p.record(format!("/echo/{name}"), &h);
        Json(serde_json::from_str(&body).unwrap_or(Value::String(body)))
    }
    async fn fail_first(
        State(p): State<Peer>,
        Path(name): Path<String>,
        Query(q): Query<HashMap<String, String>>,
        h: HeaderMap,
    ) -> (axum::http::StatusCode, Json<Value>) {
        let path = format!("/fail-first/{name}");
        p.record(path.clone(), &h);
        let n = p.calls(&path).len();
        let fails: usize = q.get("n").and_then(|f| f.parse().ok()).unwrap_or(1);
        if n <= fails {
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"n": n})),
            )
        } else {
            (axum::http::StatusCode::OK, Json(json!({"n": n})))
        }
    }
    let app = Router::new()
        .route("/ok/{name}", get(ok))
        .route("/fail-first/{name}", get(fail_first))
        .route("/flaky/{name}", get(flaky))
        .route("/slow/{name}", get(slow))
        .route("/bad/{name}", get(bad))
        .route("/echo/{name}", any(echo))
        .with_state(peer.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, peer)
}

async fn env() -> TestEnv {
    let env = TestEnv::start_settings(|_| {}, |s| s.without_workflows_worker = false).await;
    env.add_member("p-w", "olga", ProjectRole::Owner).await;
    env.add_member("p-w", "rita", ProjectRole::Reader).await;
    env
}

fn http_step(id: &str, url: String, deps: &[&str]) -> Value {
    json!({"id": id, "action": "http", "dependsOn": deps, "input": {"method": "GET", "url": url}})
}

fn workflow(id: &str, steps: Vec<Value>) -> Value {
    json!({"id": id, "version": 1, "projectId": "p-w", "triggers": [{"type": "manual"}], "steps": steps})
}

async fn register(env: &TestEnv, def: &Value) {
    let (s, b) = env.post(REGISTER, &env.token("olga"), def).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

async fn execute(env: &TestEnv, id: &str, body: &Value) -> String {
    let (s, b) = env
        .post(
            &format!("/api/workflows/{id}/execute"),
            &env.token("olga"),
            body,
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    b["runId"].as_str().unwrap().to_string()
}

/// Waits for the run to end; answers its view.
async fn ended(env: &TestEnv, run: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (s, v) = env
            .get(
                &format!("/api/workflows/executions/{run}"),
                &env.token("olga"),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{v}");
        if v["status"] != "running" && v["status"] != "rolling_back" {
            return v;
        }
        assert!(Instant::now() < deadline, "still running: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run:#}"))
}

async fn automation_events(env: &TestEnv, run: &str) -> Vec<Value> {
    let stream = inkwire_shared::subjects::event_stream(Category::Automation);
    read_stream(
        &env.state.js,
        &stream,
        String::new(),
        DeliverPolicy::All,
        10_000,
    )
    .await
    .unwrap()
    .iter()
    .map(|m| serde_json::from_slice::<Value>(&m.payload).unwrap())
    .filter(|e| e["data"]["executionId"] == run)
    .collect()
}

/// The run's events once one of `event_type` is among them (it follows the run's end).
async fn events_with(env: &TestEnv, run: &str, event_type: &str) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let events = automation_events(env, run).await;
        if events.iter().any(|e| e["type"] == event_type) || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_checks_the_definition_and_the_caller() {
    let env = env().await;
    let olga = env.token("olga");
    // Every problem, each with its pointer.
    let bad = json!({"id": "w", "version": 1, "projectId": "p-w", "triggers": [{"type": "manual"}],
    "steps": [
        {"id": "a", "action": "http", "dependsOn": ["b"], "input": {"url": "http://x"}},
        {"id": "b", "action": "http", "dependsOn": ["a"], "input": {"url": "http://x"}},
        {"id": "c", "action": "teleport", "dependsOn": ["nope"]},
        {"id": "d", "action": "http", "input": {"url": "{{ steps.zz.output }}"}}
    ]});
    let (s, b) = env.post(REGISTER, &olga, &bad).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let pointers: Vec<&str> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    for p in [
        "/steps/2/action",
        "/steps/2/dependsOn/0",
        "/steps/3/input/url",
    ] {
        assert!(pointers.contains(&p), "{p} missing from {b:#}");
    }
    assert!(b.to_string().contains("cycle"), "{b:#}");

    let def = workflow(
        "w-reg",
        vec![http_step("a", "http://127.0.0.1:1/ok/a".into(), &[])],
    );
    let (s, _) = env.post(REGISTER, &env.token("rita"), &def).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = env.post(REGISTER, &env.token("stranger"), &def).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    register(&env, &def).await;
    // The same again changes nothing; other content under the same version is refused.
    let (s, b) = env.post(REGISTER, &olga, &def).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut changed = def.clone();
    changed["steps"][0]["input"]["url"] = json!("http://127.0.0.1:1/ok/b");
    let (s, b) = env.post(REGISTER, &olga, &changed).await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("version_exists"))
    );
    changed["version"] = json!(2);
    let (s, _) = env.post(REGISTER, &olga, &changed).await;
    assert_eq!(s, StatusCode::CREATED);
    // Readers read; strangers see nothing.
    let (s, b) = env.get("/api/workflows/w-reg", &env.token("rita")).await;
    assert_eq!((s, b["version"].as_u64()), (StatusCode::OK, Some(2)), "{b}");
    let (s, b) = env
        .get("/api/workflows/w-reg?version=1", &env.token("rita"))
        .await;
    assert_eq!(
        b["steps"][0]["input"]["url"], "http://127.0.0.1:1/ok/a",
        "{s} {b}"
    );
    let (s, _) = env
        .get("/api/workflows/w-reg", &env.token("stranger"))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, b) = env.get("/api/workflows", &env.token("rita")).await;
    assert_eq!(b["workflows"][0]["id"], "w-reg", "{b}");
    let (_, b) = env.get("/api/workflows", &env.token("stranger")).await;
    assert_eq!(b["workflows"], json!([]), "{b}");
    // Readers do not run workflows; bad ids and parameters are 400.
    let (s, _) = env
        .post(
            "/api/workflows/w-reg/execute",
            &env.token("rita"),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = env.get("/api/workflows/w.reg", &olga).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = env.get("/api/workflows/w-reg?version=x", &olga).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = env
        .post(
            "/api/workflows/w-reg/execute",
            &olga,
            &json!({"inputs": {}}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = env.get("/api/workflows", "not-a-token").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_branches_join_and_every_step_is_visible() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let def = workflow(
        "w-dag",
        vec![
            json!({"id": "start", "action": "http", "input": {"url": format!("{peer_url}/ok/start")}}),
            json!({"id": "left", "action": "http", "dependsOn": ["start"],
                "input": {"url": format!("{peer_url}/slow/left?ms=400")}}),
            json!({"id": "right", "action": "http", "dependsOn": ["start"],
                "input": {"url": format!("{peer_url}/slow/right?ms=400")}}),
            json!({"id": "join", "action": "http", "dependsOn": ["left", "right"],
                "input": {"method": "POST", "url": format!("{peer_url}/echo/join"),
                    "body": {"left": "{{ steps.left.output.body.slept }}", "who": "{{ trigger.input.who }}",
                        "n": "{{ steps.start.output.body.n }}"}}}),
            json!({"id": "save", "action": "redis", "dependsOn": ["join"],
                "input": {"op": "incr", "key": "joins", "by": 2}}),
        ],
    );
    register(&env, &def).await;
    // A reader watches the project's channel.
    let mut watcher =
        inkwire_tests::WsClient::connect(&env.ws_url("collaboration", &env.token("rita"))).await;
    let ok = watcher.subscribe("project:p-w", None).await;
    assert_eq!(ok["op"], "subscribed", "{ok}");
    let run = execute(&env, "w-dag", &json!({"input": {"who": "olga"}})).await;
    let view = ended(&env, &run, Duration::from_secs(15)).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    // The branches overlapped: the second started before the first finished.
    let left = peer.calls("/slow/left")[0].1;
    let right = peer.calls("/slow/right")[0].1;
    let first_done = peer.calls("/slow-done/left")[0]
        .1
        .min(peer.calls("/slow-done/right")[0].1);
    assert!(
        left.max(right) < first_done,
        "the branches ran one after the other"
    );
    // The join read both branches, the trigger and the first step, with their JSON types.
    let join = step(&view, "join");
    assert_eq!(join["status"], "succeeded");
    assert_eq!(
        join["output"]["body"],
        json!({"left": 400, "who": "olga", "n": 1}),
        "{join:#}"
    );
    assert_eq!(join["input"]["body"]["left"], 400);
    assert_eq!(join["attempts"], 1);
    assert!(join["durationMs"].is_u64() && join["startedAt"].is_string());
    assert_eq!(step(&view, "save")["output"], json!({"value": 2}));
    // Each effect once, with the step's idempotency key.
    for path in ["/ok/start", "/slow/left", "/slow/right", "/echo/join"] {
        let calls = peer.calls(path);
        assert_eq!(calls.len(), 1, "{path}: {calls:?}");
        assert!(calls[0].0.starts_with(&run), "{path}: key {:?}", calls[0].0);
    }
    // The redis action wrote inside the project's namespace only.
    let mut redis = env.state.redis.clone();
    let v: Option<i64> = redis::cmd("GET")
        .arg("inkwire:wf:data:p-w:joins")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(v, Some(2));
    // The events: started, one per action, completed — each valid, none twice.
    let events = events_with(&env, &run, "workflow_completed").await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types.iter().filter(|t| **t == "workflow_started").count(),
        1,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "action_executed").count(),
        5,
        "{types:?}"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "workflow_completed").count(),
        1,
        "{types:?}"
    );
    for e in &events {
        inkwire_shared::schema::schemas()
            .validate_event(e)
            .unwrap_or_else(|errs| panic!("{e}: {errs:?}"));
        assert_eq!(e["projectId"], "p-w");
    }
    // The progress reached the project's channel live: each step, then the run's end.
    let mut succeeded = std::collections::BTreeSet::new();
    loop {
        let f = watcher.next().await;
        if f["type"] != "workflow_update" || f["data"]["runId"] != run.as_str() {
            continue;
        }
        let d = &f["data"];
        if d["kind"] == "step" && d["status"] == "succeeded" {
            succeeded.insert(d["stepId"].as_str().unwrap().to_string());
        }
        if d["kind"] == "workflow" && d["status"] == "completed" {
            break;
        }
    }
    assert_eq!(succeeded.len(), 5, "{succeeded:?}");
    // The counters.
    let (_, stats) = env
        .get("/api/workflows/stats?projectId=p-w", &env.token("rita"))
        .await;
    let w = stats["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workflowId"] == "w-dag")
        .unwrap()
        .clone();
    assert_eq!(
        (
            w["started"].as_u64(),
            w["completed"].as_u64(),
            w["active"].as_u64(),
            w["stepsSucceeded"].as_u64()
        ),
        (Some(1), Some(1), Some(0), Some(5)),
        "{stats:#}"
    );
    assert!(w["meanDurationMs"].as_u64().unwrap() >= 400);
    let (s, _) = env
        .get("/api/workflows/stats?projectId=p-w", &env.token("stranger"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The executions list shows it; a reader may read it, a stranger may not.
    let (_, list) = env
        .get("/api/workflows/w-dag/executions", &env.token("rita"))
        .await;
    assert_eq!(list["executions"][0]["runId"], run.as_str(), "{list}");
    let (s, _) = env
        .get(
            &format!("/api/workflows/executions/{run}"),
            &env.token("stranger"),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_and_timeouts_and_4xx_end_the_step() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let retry = json!({"maxAttempts": 4, "initialInterval": "300ms", "backoffCoefficient": 2, "jitter": false});
    let def = workflow(
        "w-retry",
        vec![json!({"id": "flaky", "action": "http", "retry": retry,
            "input": {"url": format!("{peer_url}/flaky/f?fails=2")}})],
    );
    register(&env, &def).await;
    let run = execute(&env, "w-retry", &json!({})).await;
    let view = ended(&env, &run, Duration::from_secs(15)).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    let s = step(&view, "flaky");
    assert_eq!(
        (s["attempts"].as_u64(), &s["output"]["body"]["n"]),
        (Some(3), &json!(3)),
        "{s:#}"
    );
    let calls = peer.calls("/flaky/f");
    assert_eq!(calls.len(), 3);
    // 300 ms, then 600 ms (the watcher looks every 100 ms: a little later, never earlier).
    let gap1 = calls[1].1 - calls[0].1;
    let gap2 = calls[2].1 - calls[1].1;
    assert!(
        gap1 >= Duration::from_millis(290) && gap1 < Duration::from_millis(1500),
        "{gap1:?}"
    );
    assert!(
        gap2 >= Duration::from_millis(590) && gap2 < Duration::from_millis(2000),
        "{gap2:?}"
    );
    // Every attempt is in the step's log.
    let outcomes: Vec<&str> = s["log"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["retrying", "retrying", "succeeded"], "{s:#}");
    assert_eq!(s["log"][0]["error"]["code"], "http_503");
    // One key for every attempt of the step.
    assert!(calls.iter().all(|(k, _)| *k == calls[0].0));

    // A timeout is retryable; after the attempts the run fails, naming the step.
    let def = workflow(
        "w-timeout",
        vec![
            json!({"id": "slow", "action": "http", "timeout": "300ms",
                "retry": {"maxAttempts": 2, "initialInterval": "100ms", "jitter": false},
                "input": {"url": format!("{peer_url}/slow/t?ms=3000")}}),
            http_step("after", format!("{peer_url}/ok/after"), &["slow"]),
        ],
    );
    register(&env, &def).await;
    let started = Instant::now();
    let run = execute(&env, "w-timeout", &json!({})).await;
    let view = ended(&env, &run, Duration::from_secs(15)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(view["status"], "failed", "{view:#}");
    let s = step(&view, "slow");
    assert_eq!(
        (s["status"].as_str(), s["attempts"].as_u64()),
        (Some("failed"), Some(2))
    );
    assert_eq!(s["error"]["code"], "timeout", "{s:#}");
    assert_eq!(step(&view, "after")["status"], "skipped");
    assert!(peer.calls("/ok/after").is_empty());

    // A 400 is not retried.
    let def = workflow(
        "w-4xx",
        vec![http_step("bad", format!("{peer_url}/bad/x"), &[])],
    );
    register(&env, &def).await;
    let run = execute(&env, "w-4xx", &json!({})).await;
    let view = ended(&env, &run, Duration::from_secs(10)).await;
    let s = step(&view, "bad");
    assert_eq!(
        (s["attempts"].as_u64(), s["error"]["code"].as_str()),
        (Some(1), Some("http_400"))
    );
    assert_eq!(peer.calls("/bad/x").len(), 1);
    let events = events_with(&env, &run, "workflow_failed").await;
    let failed = events
        .iter()
        .find(|e| e["type"] == "workflow_failed")
        .expect("workflow_failed");
    assert_eq!(failed["data"]["failedActionId"], "bad", "{failed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continue_conditions_and_delays() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let def = workflow(
        "w-flow",
        vec![
            json!({"id": "bad", "action": "http", "onError": "continue",
                "input": {"url": format!("{peer_url}/bad/c")}}),
            json!({"id": "after", "action": "http", "dependsOn": ["bad"], "input": {"method": "POST",
                "url": format!("{peer_url}/echo/after"), "body": {"error": "{{ steps.bad.error.code }}"}}}),
            json!({"id": "check", "action": "condition", "dependsOn": ["after"],
                "input": {"if": "trigger.input.words >= 100", "then": ["big"], "else": ["small"]}}),
            http_step("big", format!("{peer_url}/ok/big"), &["check"]),
            http_step("small", format!("{peer_url}/ok/small"), &["check"]),
            http_step(
                "after_small",
                format!("{peer_url}/ok/after_small"),
                &["small"],
            ),
            json!({"id": "wait", "action": "delay", "dependsOn": ["big"], "input": {"duration": "1500ms"}}),
            http_step("done", format!("{peer_url}/ok/done"), &["wait"]),
        ],
    );
    register(&env, &def).await;
    let started = Instant::now();
    let run = execute(&env, "w-flow", &json!({"input": {"words": 120}})).await;
    // While the delay runs, the step is waiting and nothing sleeps on it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = env
            .get(
                &format!("/api/workflows/executions/{run}"),
                &env.token("olga"),
            )
            .await;
        if step(&v, "wait")["status"] == "waiting" {
            assert!(step(&v, "wait")["waitingUntil"].is_string(), "{v:#}");
            break;
        }
        assert!(Instant::now() < deadline, "never waiting: {v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let view = ended(&env, &run, Duration::from_secs(15)).await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(step(&view, "bad")["status"], "failed");
    assert_eq!(
        step(&view, "after")["output"]["body"],
        json!({"error": "http_400"})
    );
    assert_eq!(step(&view, "check")["output"]["result"], true);
    assert_eq!(step(&view, "big")["status"], "succeeded");
    assert_eq!(step(&view, "small")["status"], "skipped");
    assert_eq!(step(&view, "after_small")["status"], "skipped");
    assert_eq!(step(&view, "wait")["status"], "succeeded");
    assert_eq!(step(&view, "done")["status"], "succeeded");
    assert!(peer.calls("/ok/small").is_empty() && peer.calls("/ok/after_small").is_empty());
    assert_eq!(peer.calls("/ok/done").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_long_step_and_nothing_after_it_runs() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let def = workflow(
        "w-cancel",
        vec![
            json!({"id": "long", "action": "http", "timeout": "60s",
                "input": {"url": format!("{peer_url}/slow/long?ms=20000")}}),
            http_step("next", format!("{peer_url}/ok/next"), &["long"]),
        ],
    );
    register(&env, &def).await;
    let run = execute(&env, "w-cancel", &json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer.calls("/slow/long").is_empty() {
        assert!(Instant::now() < deadline, "the long step never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, _) = env
        .post(
            &format!("/api/workflows/executions/{run}/cancel"),
            &env.token("rita"),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let t = Instant::now();
    let (s, v) = env
        .post(
            &format!("/api/workflows/executions/{run}/cancel"),
            &env.token("olga"),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "cancelled");
    assert_eq!(step(&v, "next")["status"], "cancelled");
    let (s, v) = env
        .post(
            &format!("/api/workflows/executions/{run}/cancel"),
            &env.token("olga"),
            &json!({}),
        )
        .await;
    assert_eq!(
        (s, v["code"].as_str()),
        (StatusCode::CONFLICT, Some("execution_ended"))
    );
    // The running step let go at its next await point (well before the peer answered),
    // and nothing after it ran.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut redis = env.state.redis.clone();
        let (st, ls): (Option<String>, Option<u64>) = redis::cmd("HMGET")
            .arg(store::run_key(&run))
            .arg("st:long")
            .arg("ls:long")
            .query_async(&mut redis)
            .await
            .unwrap();
        // The attempt was abandoned: its result is never stored.
        assert_eq!(st.as_deref(), Some("running"));
        assert!(ls.is_some());
        if t.elapsed() > Duration::from_secs(1) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(peer.calls("/ok/next").is_empty());
    let events = events_with(&env, &run, "workflow_failed").await;
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "workflow_failed")
        .collect();
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0]["data"]["error"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_starts_one_run_and_a_stale_attempt_changes_nothing() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let def = workflow(
        "w-once",
        vec![http_step("a", format!("{peer_url}/ok/once"), &[])],
    );
    register(&env, &def).await;
    let first = execute(&env, "w-once", &json!({"idempotencyKey": "k-1"})).await;
    let (s, b) = env
        .post(
            "/api/workflows/w-once/execute",
            &env.token("olga"),
            &json!({"idempotencyKey": "k-1"}),
        )
        .await;
    assert_eq!(
        (s, b["runId"].as_str(), b["created"].as_bool()),
        (StatusCode::ACCEPTED, Some(first.as_str()), Some(false))
    );
    ended(&env, &first, Duration::from_secs(10)).await;
    assert_eq!(peer.calls("/ok/once").len(), 1);
    let (s, _) = env
        .post(
            "/api/workflows/w-once/execute",
            &env.token("olga"),
            &json!({"idempotencyKey": "k 1"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // Fencing, on the scripts themselves: an attempt whose lease ran out is taken over, and
    // the first holder's late result is refused.
    let run = "r-fence";
    let mut redis = env.state.redis.clone();
    let _: () = redis::cmd("HSET")
        .arg(store::run_key(run))
        .arg(&[
            "status", "running", "left", "1", "st:a", "ready", "at:a", "1", "rd:a", "0", "deps:a",
            "", "kids:a", "",
        ])
        .query_async(&mut redis)
        .await
        .unwrap();
    let start = |token: &'static str, now: u64, lease: u64| {
        let mut redis = redis.clone();
        async move {
            let v: (String, String) = store::start_script()
                .key(store::run_key(run))
                .arg("a")
                .arg(1)
                .arg(token)
                .arg(now)
                .arg(lease)
                .invoke_async(&mut redis)
                .await
                .unwrap();
            v.0
        }
    };
    assert_eq!(start("t-1", 1_000, 2_000).await, "ok");
    assert_eq!(start("t-2", 1_500, 3_000).await, "busy"); // a redelivery while the lease runs
    assert_eq!(start("t-2", 2_500, 4_000).await, "ok"); // the lease ran out: taken over
    let finish = |token: &'static str| {
        let mut redis = redis.clone();
        async move {
            let v: Vec<String> = store::finish_script()
                .key(store::run_key(run))
                .key(store::watch_key())
                .key(store::watch_lease_key(run))
                .arg("a")
                .arg(token)
                .arg("succeeded")
                .arg("fail")
                .arg(3_000)
                .arg(4_000)
                .arg(json!({"who": token}).to_string())
                .arg("")
                .arg("")
                .arg(run)
                .invoke_async(&mut redis)
                .await
                .unwrap();
            v
        }
    };
    assert_eq!(finish("t-1").await, vec!["stale"]);
    assert_eq!(finish("t-2").await, vec!["completed"]);
    assert_eq!(finish("t-2").await, vec!["stale"]);
    let out: String = redis::cmd("HGET")
        .arg(store::run_key(run))
        .arg("out:a")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(out, json!({"who": "t-2"}).to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_survive_kill_9_of_the_worker_and_every_effect_happens_once() {
    // The API runs here; the steps run in a separate worker process, killed with SIGKILL
    // again and again in the middle of the runs.
    let env = TestEnv::start().await;
    env.add_member("p-w", "olga", ProjectRole::Owner).await;
    let (peer_url, peer) = start_peer().await;
    let mut steps = Vec::new();
    for i in 0..8 {
        let mut http = json!({"id": format!("s{i}"), "action": "http", "timeout": "1s",
            "input": {"url": format!("{peer_url}/slow/s{i}-{{{{ run.id }}}}?ms=120")}});
        if i > 0 {
            http["dependsOn"] = json!([format!("r{}", i - 1)]);
        }
        steps.push(http);
        steps.push(
            json!({"id": format!("r{i}"), "action": "redis", "dependsOn": [format!("s{i}")],
            "input": {"op": "incr", "key": "effects"}}),
        );
    }
    register(&env, &workflow("w-crash", steps)).await;
    let files = tempfile::tempdir().unwrap();
    let files = files.path().to_str().unwrap().to_string();
    let worker_env = [
        ("INKWIRE_WORKFLOW_WATCH_GRACE", "1s"),
        ("INKWIRE_WORKFLOW_LEASE_MARGIN", "300ms"),
        ("INKWIRE_WORKFLOW_HTTP_ALLOW_PRIVATE", "1"),
        ("INKWIRE_WORKFLOW_FILES_DIR", files.as_str()),
    ];
    let exe = env!("CARGO_BIN_EXE_workflows-worker-process");
    let mut worker = inkwire_tests::ServerProcess::start(&env, exe, &worker_env).await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(execute(&env, "w-crash", &json!({})).await);
    }
    // Kill at varied moments: mid-request, between a step's result and its dependants'
    // dispatch, mid-script.
    for pause in [180u64, 420, 250, 600, 330, 150, 500, 270] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        worker.kill();
        worker = inkwire_tests::ServerProcess::start(&env, exe, &worker_env).await;
    }
    for run in &runs {
        let view = ended(&env, run, Duration::from_secs(60)).await;
        assert_eq!(view["status"], "completed", "{view:#}");
        for s in view["steps"].as_array().unwrap() {
            assert_eq!(s["status"], "succeeded", "{s:#}");
        }
    }
    drop(worker);
    // Each HTTP effect under one key per step (a request repeated after a kill carries the
    // same key: the receiver applies it once), and each redis increment applied once.
    let seen = peer.seen.lock().unwrap().clone();
    let keys: std::collections::BTreeSet<&str> = seen
        .iter()
        .filter(|(p, _, _)| p.starts_with("/slow/"))
        .map(|(_, k, _)| k.as_str())
        .collect();
    assert_eq!(keys.len(), 3 * 8, "{keys:?}");
    for run in &runs {
        for i in 0..8 {
            assert!(keys.contains(format!("{run}:s{i}").as_str()));
        }
    }
    let mut redis = env.state.redis.clone();
    let effects: i64 = redis::cmd("GET")
        .arg("inkwire:wf:data:p-w:effects")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(effects, 3 * 8);
    // The events: per run one start, one completion, and one succeeded action per step.
    for run in &runs {
        let events = events_with(&env, run, "workflow_completed").await;
        let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
        assert_eq!(
            (count("workflow_started"), count("workflow_completed")),
            (1, 1)
        );
        let succeeded: std::collections::BTreeSet<&str> = events
            .iter()
            .filter(|e| e["type"] == "action_executed" && e["data"]["status"] == "succeeded")
            .map(|e| e["data"]["actionId"].as_str().unwrap())
            .collect();
        assert_eq!(succeeded.len(), 16, "{succeeded:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_cron_schedules_start_runs() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let mut def = workflow(
        "w-on-words",
        vec![
            json!({"id": "tell", "action": "http", "input": {"method": "POST",
            "url": format!("{peer_url}/echo/words"), "body": {"words": "{{ trigger.data.words }}", "by": "{{ trigger.userId }}"}}}),
        ],
    );
    def["triggers"] = json!([{"type": "event", "category": "writing", "eventType": "word_added",
        "filter": [{"path": "data.words", "op": "gte", "value": 100}]}]);
    register(&env, &def).await;
    let word = |project: &str, words: u64| {
        json!({"category": "writing", "type": "word_added", "userId": "u-o", "projectId": project,
            "data": {"sessionId": "s-1", "words": words}})
    };
    let (s, b) = env
        .post(
            "/api/realtime/events/batch",
            &env.service_token(),
            &json!({"events": [word("p-w", 150), word("p-w", 20), word("p-other", 500), word("p-w", 100)]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    // Two events pass the filter in the workflow's project: two runs, each once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = env
            .get("/api/workflows/w-on-words/executions", &env.token("olga"))
            .await;
        let runs = list["executions"].as_array().unwrap();
        let done = runs.iter().filter(|r| r["status"] == "completed").count();
        if done == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{list:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, list) = env
        .get("/api/workflows/w-on-words/executions", &env.token("olga"))
        .await;
    assert_eq!(list["executions"].as_array().unwrap().len(), 2, "{list:#}");
    let mut words: Vec<u64> = Vec::new();
    for r in list["executions"].as_array().unwrap() {
        let (_, v) = env
            .get(
                &format!("/api/workflows/executions/{}", r["runId"].as_str().unwrap()),
                &env.token("olga"),
            )
            .await;
        assert_eq!(v["trigger"]["kind"], "event");
        words.push(
            step(&v, "tell")["output"]["body"]["words"]
                .as_u64()
                .unwrap(),
        );
        assert_eq!(step(&v, "tell")["output"]["body"]["by"], "u-o");
    }
    words.sort();
    assert_eq!(words, vec![100, 150]);
    assert_eq!(peer.calls("/echo/words").len(), 2);

    // Every second, in a time zone: a run per fire time, each with its own scheduledAt.
    let mut cron = workflow(
        "w-tick",
        vec![json!({"id": "tick", "action": "redis", "input": {"op": "incr", "key": "ticks"}})],
    );
    cron["triggers"] =
        json!([{"type": "cron", "schedule": "* * * * * *", "timeZone": "Europe/Paris"}]);
    register(&env, &cron).await;
    tokio::time::sleep(Duration::from_millis(3_300)).await;
    // A new version without the schedule stops it.
    cron["version"] = json!(2);
    cron["triggers"] = json!([{"type": "manual"}]);
    register(&env, &cron).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_, list) = env
        .get(
            "/api/workflows/w-tick/executions?limit=100",
            &env.token("olga"),
        )
        .await;
    let runs = list["executions"].as_array().unwrap().clone();
    assert!((2..=5).contains(&runs.len()), "{list:#}");
    let mut scheduled = std::collections::BTreeSet::new();
    for r in &runs {
        let (_, v) = env
            .get(
                &format!("/api/workflows/executions/{}", r["runId"].as_str().unwrap()),
                &env.token("olga"),
            )
            .await;
        assert_eq!(v["trigger"]["kind"], "cron", "{v:#}");
        let at = v["trigger"]["scheduledAt"].as_str().unwrap().to_string();
        assert!(at.ends_with(":00Z") || !at.contains('.'), "{at}");
        assert!(scheduled.insert(at.clone()), "{at} fired twice");
    }
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (_, later) = env
        .get(
            "/api/workflows/w-tick/executions?limit=100",
            &env.token("olga"),
        )
        .await;
    assert_eq!(
        later["executions"].as_array().unwrap().len(),
        runs.len(),
        "still firing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_runs_the_compensations_in_reverse_order_and_cancel_can_ask_for_them() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let undo = |name: &str| json!({"action": "http", "input": {"url": format!("{peer_url}/ok/undo-{name}")}});
    let def = workflow(
        "w-rollback",
        vec![
            json!({"id": "a", "action": "http", "input": {"url": format!("{peer_url}/ok/a")}, "compensate": undo("a")}),
            json!({"id": "note", "action": "redis", "dependsOn": ["a"], "input": {"op": "set", "key": "k", "value": "v"}}),
            json!({"id": "b", "action": "http", "dependsOn": ["note"], "input": {"url": format!("{peer_url}/ok/b")}, "compensate": undo("b")}),
            json!({"id": "c", "action": "http", "dependsOn": ["b"], "onError": "rollback",
                "input": {"url": format!("{peer_url}/bad/c")}, "compensate": undo("c")}),
            http_step("d", format!("{peer_url}/ok/d"), &["c"]),
        ],
    );
    register(&env, &def).await;
    let run = execute(&env, "w-rollback", &json!({})).await;
    let view = ended(&env, &run, Duration::from_secs(15)).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["error"]["code"], "http_400", "{view:#}");
    // b's undo, then a's; c failed (nothing to undo), `note` has no compensation, d never ran.
    let undo_b = peer.calls("/ok/undo-b");
    let undo_a = peer.calls("/ok/undo-a");
    assert_eq!((undo_a.len(), undo_b.len()), (1, 1));
    assert!(undo_b[0].1 < undo_a[0].1, "not in reverse completion order");
    assert!(peer.calls("/ok/undo-c").is_empty() && peer.calls("/ok/d").is_empty());
    assert_eq!(
        step(&view, "b")["compensation"]["status"],
        "succeeded",
        "{view:#}"
    );
    assert_eq!(step(&view, "a")["compensation"]["status"], "succeeded");
    assert_eq!(step(&view, "note")["compensation"], Value::Null);
    assert_eq!(step(&view, "d")["status"], "skipped");
    let events = events_with(&env, &run, "workflow_failed").await;
    let compensations: Vec<&str> = events
        .iter()
        .filter(|e| {
            e["type"] == "action_executed" && e["data"]["actionType"] == "compensation:http"
        })
        .map(|e| e["data"]["actionId"].as_str().unwrap())
        .collect();
    assert_eq!(compensations.len(), 2, "{events:#?}");

    // Cancel with compensations: what completed is undone, then the run is cancelled.
    let def = workflow(
        "w-cancel-undo",
        vec![
            json!({"id": "a", "action": "http", "input": {"url": format!("{peer_url}/ok/a2")}, "compensate": undo("a2")}),
            json!({"id": "long", "action": "http", "dependsOn": ["a"], "input": {"url": format!("{peer_url}/slow/l2?ms=20000")}}),
        ],
    );
    register(&env, &def).await;
    let run = execute(&env, "w-cancel-undo", &json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer.calls("/slow/l2").is_empty() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, b) = env
        .post(
            &format!("/api/workflows/executions/{run}/cancel"),
            &env.token("olga"),
            &json!({"compensate": "yes"}),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = env
        .post(
            &format!("/api/workflows/executions/{run}/cancel"),
            &env.token("olga"),
            &json!({"compensate": true}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let view = ended(&env, &run, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "cancelled", "{view:#}");
    assert_eq!(peer.calls("/ok/undo-a2").len(), 1);
    assert_eq!(step(&view, "a")["compensation"]["status"], "succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_reruns_from_the_failed_step_keeping_what_succeeded() {
    let env = env().await;
    let (peer_url, peer) = start_peer().await;
    let once = json!({"maxAttempts": 1});
    let mut def = workflow(
        "w-rerun",
        vec![
            http_step("a", format!("{peer_url}/ok/ra"), &[]),
            json!({"id": "b", "action": "http", "dependsOn": ["a"], "retry": once,
                "input": {"url": format!("{peer_url}/fail-first/rb?n=1")}}),
            json!({"id": "c", "action": "http", "dependsOn": ["b"], "input": {"method": "POST",
                "url": format!("{peer_url}/echo/rc"), "body": {"a": "{{ steps.a.output.body.n }}"}}}),
        ],
    );
    register(&env, &def).await;
    let first = execute(&env, "w-rerun", &json!({})).await;
    let failed = ended(&env, &first, Duration::from_secs(10)).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(step(&failed, "c")["status"], "skipped");
    let path = format!("/api/workflows/executions/{first}/rerun");
    let (s, _) = env.post(&path, &env.token("rita"), &json!({})).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = env
        .post(&path, &env.token("olga"), &json!({"version": "2"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let (s, b) = env.post(&path, &env.token("olga"), &json!({})).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let second = b["runId"].as_str().unwrap().to_string();
    let view = ended(&env, &second, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    assert_eq!(view["rerunOf"], first.as_str());
    // `a` kept its output (it did not run again); `b` and `c` ran.
    assert_eq!(peer.calls("/ok/ra").len(), 1);
    assert_eq!(step(&view, "a")["output"], step(&failed, "a")["output"]);
    assert_eq!(step(&view, "c")["output"]["body"], json!({"a": 1}));
    let events = events_with(&env, &second, "workflow_started").await;
    assert_eq!(
        events
            .iter()
            .find(|e| e["type"] == "workflow_started")
            .unwrap()["data"]["trigger"],
        "rerun"
    );
    // A completed run is not rerun; a missing one is 404.
    let (s, b) = env
        .post(
            &format!("/api/workflows/executions/{second}/rerun"),
            &env.token("olga"),
            &json!({}),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::CONFLICT, Some("execution_not_rerunnable"))
    );
    let (s, _) = env
        .post(
            "/api/workflows/executions/nope/rerun",
            &env.token("olga"),
            &json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // On a newer version: its new step runs too.
    def["version"] = json!(2);
    def["steps"]
        .as_array_mut()
        .unwrap()
        .push(http_step("d", format!("{peer_url}/ok/rd"), &["c"]));
    register(&env, &def).await;
    let (s, b) = env
        .post(&path, &env.token("olga"), &json!({"version": 2}))
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let view = ended(&env, b["runId"].as_str().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(
        (view["status"].as_str(), view["version"].as_u64()),
        (Some("completed"), Some(2))
    );
    assert_eq!(step(&view, "d")["status"], "succeeded");

    // `onError: retry`: the engine reruns the run by itself after the step's maxInterval.
    let auto = workflow(
        "w-auto",
        vec![json!({"id": "x", "action": "http", "onError": "retry",
            "retry": {"maxAttempts": 1, "initialInterval": "100ms", "maxInterval": "300ms"},
            "input": {"url": format!("{peer_url}/fail-first/auto?n=2")}})],
    );
    register(&env, &auto).await;
    execute(&env, "w-auto", &json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let list = loop {
        let (_, list) = env
            .get("/api/workflows/w-auto/executions", &env.token("olga"))
            .await;
        if list["executions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == "completed")
        {
            break list;
        }
        assert!(Instant::now() < deadline, "{list:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let runs = list["executions"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "{list:#}");
    assert_eq!(runs[0]["automaticRerun"], 2, "{list:#}");
    assert_eq!(runs[0]["rerunOf"], runs[1]["runId"]);
    assert_eq!(peer.calls("/fail-first/auto").len(), 3);
}

/// A local OpenAI-compatible chat-completions server: answers "echo: " + the last message,
/// and records the requests it got.
async fn start_ai() -> (String, Arc<Mutex<Vec<Value>>>) {
    let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
    async fn complete(
        State(seen): State<Arc<Mutex<Vec<Value>>>>,
        h: HeaderMap,
        Json(body): Json<Value>,
    ) -> (axum::http::StatusCode, Json<Value>) {
        seen.lock().unwrap().push(
            json!({"body": body, "auth": h.get("authorization").and_then(|v| v.to_str().ok())}),
        );
        let last = body["messages"]
            .as_array()
            .and_then(|m| m.last())
            .map(|m| m["content"].clone());
        if body.get("response_format").is_some() {
            let listing = json!({"title": "The Long Draft", "subtitle": "A novel", "description": "A book.",
                "keywords": ["a", "b", "c", "d", "e"]});
            return (
                axum::http::StatusCode::OK,
                Json(
                    json!({"model": body["model"], "choices": [{"index": 0, "message": {"role": "assistant",
                    "content": format!("```json\n{listing}\n```")}}]}),
                ),
            );
        }
        (
            axum::http::StatusCode::OK,
            Json(
                json!({"id": "c-1", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                    "message": {"role": "assistant", "content": format!("echo: {}", last.and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default())}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}),
            ),
        )
    }
    let app = Router::new()
        .route("/v1/chat/completions", axum::routing::post(complete))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_sms_notification_ai_and_loop_actions_reach_real_peers() {
    use inkwire_tests::peers::{SmtpPeer, SnsPeer};
    let smtp = SmtpPeer::start().await;
    let sns = SnsPeer::start().await;
    let (ai_url, ai_seen) = start_ai().await;
    let (peer_url, peer) = start_peer().await;
    let mut providers = smtp.provider_config();
    let sns_config = sns.provider_config(None);
    providers.sns_enabled = true;
    providers.sns_endpoint = sns_config.sns_endpoint.clone();
    providers.aws_region = sns_config.aws_region.clone();
    providers.aws_keys = sns_config.aws_keys.clone();
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.without_workflows_worker = false;
            s.workflows.providers = providers.clone();
            s.workflows.ai = inkwire_workflows::messaging::AiConfig {
                base_url: Some(ai_url.clone()),
                model: "local-model".into(),
                api_key: Some("sk-test".into()),
                timeout: Duration::from_secs(10),
            };
        },
    )
    .await;
    env.add_member("p-w", "olga", ProjectRole::Owner).await;
    let def = workflow(
        "w-actions",
        vec![
            json!({"id": "ask", "action": "ai", "input": {"system": "Be brief.", "prompt": "Title for {{ trigger.input.book }}"}}),
            json!({"id": "mail", "action": "email", "dependsOn": ["ask"], "input": {
                "to": ["a@example.com", "b@example.com"], "subject": "New title",
                "text": "{{ steps.ask.output.text }}", "html": "<p>{{ steps.ask.output.text }}</p>"}}),
            json!({"id": "text", "action": "sms", "dependsOn": ["ask"], "input": {"to": "+447700900123", "text": "{{ steps.ask.output.text }}"}}),
            json!({"id": "tell", "action": "notification", "dependsOn": ["ask"], "input": {
                "userId": "olga", "category": "publishing", "priority": "high", "title": "{{ steps.ask.output.text }}", "body": "from a workflow"}}),
            json!({"id": "each", "action": "loop", "input": {"over": "trigger.input.chapters", "concurrency": 2,
                "step": {"action": "http", "input": {"method": "POST", "url": format!("{peer_url}/echo/chapter"), "body": {"n": "{{ index }}", "title": "{{ item }}"}}}}}),
        ],
    );
    register(&env, &def).await;
    let run = execute(
        &env,
        "w-actions",
        &json!({"input": {"book": "Dune", "chapters": ["one", "two", "three"]}}),
    )
    .await;
    let view = ended(&env, &run, Duration::from_secs(30)).await;
    assert_eq!(view["status"], "completed", "{view:#}");
    // AI: the request carried the model, the key and both messages.
    assert_eq!(step(&view, "ask")["output"]["text"], "echo: Title for Dune");
    let req = ai_seen.lock().unwrap()[0].clone();
    assert_eq!(req["body"]["model"], "local-model");
    assert_eq!(req["auth"], "Bearer sk-test");
    assert_eq!(req["body"]["messages"][0]["role"], "system");
    // Email: two messages over SMTP, text and HTML.
    let mails = smtp.wait_for_messages(2, Duration::from_secs(10)).await;
    let mut to: Vec<String> = mails.iter().map(|m| m.rcpt_to.clone()).collect();
    to.sort();
    assert_eq!(to, vec!["a@example.com", "b@example.com"], "{mails:?}");
    assert_eq!(mails[0].subject, "New title");
    assert!(
        mails[0]
            .html
            .as_deref()
            .unwrap_or_default()
            .contains("<p>echo: Title for Dune</p>")
    );
    // SMS through SNS (moto).
    let sms = sns.sms().await;
    assert_eq!(
        (sms.len(), sms[0].phone_number.as_str()),
        (1, "+447700900123"),
        "{sms:?}"
    );
    assert_eq!(sms[0].message, "echo: Title for Dune");
    // The notification reached olga's inbox through the notifications service.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, inbox) = env
            .get("/api/realtime/notifications", &env.token("olga"))
            .await;
        if inbox["notifications"]
            .as_array()
            .is_some_and(|n| !n.is_empty())
        {
            assert_eq!(
                inbox["notifications"][0]["title"], "echo: Title for Dune",
                "{inbox:#}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{inbox:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The loop: one call per item, outputs in item order, a key per iteration.
    let each = step(&view, "each");
    assert_eq!(each["output"]["count"], 3);
    assert_eq!(
        each["output"]["items"][1]["body"],
        json!({"n": 1, "title": "two"}),
        "{each:#}"
    );
    let calls = peer.calls("/echo/chapter");
    assert_eq!(calls.len(), 3);
    let keys: std::collections::BTreeSet<String> = calls.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(keys.len(), 3, "{keys:?}");

    // A workflow notifies its project's members only.
    let def = workflow(
        "w-stranger",
        vec![json!({"id": "tell", "action": "notification", "input": {
            "userId": "mallory", "category": "publishing", "priority": "low", "title": "hi"}})],
    );
    register(&env, &def).await;
    let run = execute(&env, "w-stranger", &json!({})).await;
    let view = ended(&env, &run, Duration::from_secs(10)).await;
    assert_eq!(
        step(&view, "tell")["error"]["code"],
        "recipient_not_member",
        "{view:#}"
    );
}

async fn install(env: &TestEnv, name: &str, body: Value) -> String {
    let (s, b) = env
        .post(
            &format!("/api/workflows/templates/{name}/install"),
            &env.token("olga"),
            &body,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    b["id"].as_str().unwrap().to_string()
}

/// Runs of a workflow, newest first, once `n` of them ended.
async fn runs_ended(env: &TestEnv, id: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, list) = env
            .get(
                &format!("/api/workflows/{id}/executions"),
                &env.token("olga"),
            )
            .await;
        let runs = list["executions"].as_array().cloned().unwrap_or_default();
        if runs.iter().filter(|r| r["status"] != "running").count() >= n {
            let mut full = Vec::new();
            for r in &runs {
                let (_, v) = env
                    .get(
                        &format!("/api/workflows/executions/{}", r["runId"].as_str().unwrap()),
                        &env.token("olga"),
                    )
                    .await;
                full.push(v);
            }
            return full;
        }
        assert!(Instant::now() < deadline, "{list:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn inbox(env: &TestEnv, user: &str, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = env
            .get("/api/realtime/notifications", &env.token(user))
            .await;
        let items = b["notifications"].as_array().cloned().unwrap_or_default();
        if items.len() >= n {
            return items;
        }
        assert!(Instant::now() < deadline, "{user}: {b:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The user's notification with `title`, once it is in the inbox.
async fn inbox_with(env: &TestEnv, user: &str, title: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, b) = env
            .get("/api/realtime/notifications", &env.token(user))
            .await;
        if let Some(n) = b["notifications"]
            .as_array()
            .and_then(|items| items.iter().find(|n| n["title"] == title))
        {
            return n.clone();
        }
        assert!(Instant::now() < deadline, "{user}: no {title:?} in {b:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes an installed workflow's cron trigger due now (instead of waiting for 20:00).
async fn fire_cron_now(env: &TestEnv, workflow: &str) {
    let mut redis = env.state.redis.clone();
    let member = format!("{workflow}~0");
    let now = inkwire_workflows::engine::now_ms();
    let _: () = redis::pipe()
        .cmd("HSET")
        .arg(inkwire_workflows::triggers::cron_at_key())
        .arg(&member)
        .arg(now)
        .cmd("ZADD")
        .arg(inkwire_workflows::triggers::cron_key())
        .arg(now)
        .arg(&member)
        .query_async(&mut redis)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_install_per_project_and_run_end_to_end() {
    use inkwire_tests::peers::SmtpPeer;
    let smtp = SmtpPeer::start().await;
    let providers = smtp.provider_config();
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.without_workflows_worker = false;
            s.without_analytics_worker = false;
            s.workflows.providers = providers.clone();
        },
    )
    .await;
    env.add_member("p-w", "olga", ProjectRole::Owner).await;
    env.add_member("p-w", "rita", ProjectRole::Editor).await;
    env.register_document("p-w", "d-1").await;
    let (_, list) = env
        .get("/api/workflows/templates", &env.token("rita"))
        .await;
    assert_eq!(list["templates"].as_array().unwrap().len(), 6, "{list:#}");
    // Owners install; the parameters a template needs are asked for by name.
    let (s, _) = env
        .post(
            "/api/workflows/templates/sales-spike-alert/install",
            &env.token("rita"),
            &json!({"projectId": "p-w"}),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, b) = env
        .post(
            "/api/workflows/templates/weekly-analytics-digest/install",
            &env.token("olga"),
            &json!({"projectId": "p-w"}),
        )
        .await;
    assert_eq!(
        (s, b["errors"][0]["pointer"].as_str()),
        (StatusCode::BAD_REQUEST, Some("/email")),
        "{b}"
    );
    let (s, b) = env
        .post(
            "/api/workflows/templates/nope/install",
            &env.token("olga"),
            &json!({"projectId": "p-w"}),
        )
        .await;
    assert_eq!(
        (s, b["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("template_not_found"))
    );

    // Collaboration conflict alert: both writers are told, at high priority.
    install(
        &env,
        "collaboration-conflict-alert",
        json!({"projectId": "p-w"}),
    )
    .await;
    // Sales spike: 7 days at 10 a day, then 25 in one update.
    let spike = install(&env, "sales-spike-alert", json!({"projectId": "p-w"})).await;
    let mut redis = env.state.redis.clone();
    let day = 86_400_000u64;
    let today = inkwire_workflows::engine::now_ms() / day * day;
    for i in 1..=7 {
        let _: () = redis::cmd("HSET")
            .arg(inkwire_analytics::store::book_key("b-1"))
            .arg(format!("d:{}:units", today - i * day))
            .arg(10)
            .arg("p:p-w")
            .arg(1)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    let events = json!({"events": [
        {"category": "collaboration", "type": "conflict_detected", "userId": "olga", "projectId": "p-w", "documentId": "d-1",
         "data": {"otherUserId": "rita", "severity": "high", "reason": "same_paragraph", "paragraph": 3}},
        {"category": "publishing", "type": "sales_updated", "userId": "olga", "projectId": "p-w",
         "data": {"bookId": "b-1", "platform": "kdp", "units": 25}}
    ]});
    let (s, b) = env
        .post("/api/realtime/events/batch", &env.service_token(), &events)
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let runs = runs_ended(&env, &spike, 1).await;
    assert_eq!(runs[0]["status"], "completed", "{:#}", runs[0]);
    assert_eq!(
        step(&runs[0], "spike")["output"]["result"],
        true,
        "{:#}",
        runs[0]
    );
    let rita = inbox(&env, "rita", 2).await;
    let titles: Vec<&str> = rita.iter().map(|n| n["title"].as_str().unwrap()).collect();
    assert!(titles.contains(&"Editing conflict"), "{titles:?}");
    assert!(
        titles.iter().any(|t| t.starts_with("Sales spike for b-1")),
        "{titles:?}"
    );
    assert!(rita.iter().all(|n| n["priority"] == "high"), "{rita:#?}");

    // Daily goal reminder at 20:00 in the project's zone (fired now): nobody wrote today.
    let goal = install(
        &env,
        "daily-writing-goal-reminder",
        json!({"projectId": "p-w", "timeZone": "Europe/Paris"}),
    )
    .await;
    let (_, def) = env
        .get(&format!("/api/workflows/{goal}"), &env.token("olga"))
        .await;
    assert_eq!(def["triggers"][0]["timeZone"], "Europe/Paris");
    fire_cron_now(&env, &goal).await;
    let runs = runs_ended(&env, &goal, 1).await;
    assert_eq!(runs[0]["status"], "completed", "{:#}", runs[0]);
    let olga = inbox_with(&env, "olga", "500 words to go today").await;
    assert_eq!(olga["priority"], "medium", "{olga:#}");
    // Each notification once (the notifications' own rule for conflicts sends another
    // "Editing conflict", with its own text).
    let (_, all) = env
        .get("/api/realtime/notifications", &env.token("olga"))
        .await;
    let sent: Vec<(String, String)> = all["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["title"].to_string(), n["body"].to_string()))
        .collect();
    let unique: std::collections::BTreeSet<&(String, String)> = sent.iter().collect();
    assert_eq!(unique.len(), sent.len(), "{sent:?}");
    assert_eq!(
        sent.iter()
            .filter(|(_, b)| b.contains("are editing the same paragraph"))
            .count(),
        1,
        "{sent:?}"
    );

    // Weekly digest by email.
    let digest = install(
        &env,
        "weekly-analytics-digest",
        json!({"projectId": "p-w", "email": "olga@example.com"}),
    )
    .await;
    fire_cron_now(&env, &digest).await;
    let runs = runs_ended(&env, &digest, 1).await;
    assert_eq!(runs[0]["status"], "completed", "{:#}", runs[0]);
    let mails = smtp.wait_for_messages(1, Duration::from_secs(10)).await;
    assert_eq!(mails[0].rcpt_to, "olga@example.com");
    assert_eq!(mails[0].subject, "Your week on p-w");

    // Auto-save: crossing 100 words writes a snapshot of the document to the sandbox.
    let backup = install(&env, "auto-save-backup", json!({"projectId": "p-w"})).await;
    let word = |total: u64| {
        json!({"category": "writing", "type": "word_added", "userId": "olga", "projectId": "p-w",
        "documentId": "d-1", "data": {"sessionId": "s-1", "words": 5, "totalWords": total}})
    };
    let (s, b) = env
        .post(
            "/api/realtime/events/batch",
            &env.service_token(),
            &json!({"events": [word(60), word(102)]}),
        )
        .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{b}");
    let runs = runs_ended(&env, &backup, 2).await;
    let snapshot = runs
        .iter()
        .find(|r| step(r, "snapshot")["status"] == "succeeded")
        .expect("a snapshot");
    assert_eq!(
        step(snapshot, "snapshot")["output"]["path"],
        "backups/d-1/100-words.json"
    );
    assert!(
        runs.iter()
            .any(|r| step(r, "snapshot")["status"] == "skipped"),
        "the 60-word event wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publication_pipeline_builds_an_epub_uploads_it_and_tells_the_author() {
    let (ai_url, _) = start_ai().await;
    // The store: records every request with its body.
    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;
    let store: Seen = Arc::default();
    async fn books(
        State(seen): State<Seen>,
        method: axum::http::Method,
        Path(id): Path<String>,
        body: String,
    ) -> Json<Value> {
        let v = serde_json::from_str(&body).unwrap_or(Value::Null);
        seen.lock()
            .unwrap()
            .push((method.to_string(), id.clone(), v));
        Json(json!({"bookId": id, "listed": true}))
    }
    let app = Router::new()
        .route("/v1/books/{id}", any(books))
        .with_state(store.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let env = TestEnv::start_settings(
        |_| {},
        |s| {
            s.without_workflows_worker = false;
            s.workflows.ai = inkwire_workflows::messaging::AiConfig {
                base_url: Some(ai_url.clone()),
                model: "local-model".into(),
                api_key: None,
                timeout: Duration::from_secs(10),
            };
        },
    )
    .await;
    env.add_member("p-w", "olga", ProjectRole::Owner).await;
    env.register_document("p-w", "d-1").await;
    // The manuscript, typed by a stock Yjs client.
    let mut writer = env.synced_peer(&env.base, "d-1", "olga").await;
    let paragraph = "It was a long draft, and the night was longer. ".repeat(10);
    let manuscript = format!("{paragraph}\n\n{paragraph}\n\n{paragraph}");
    writer.insert(0, &manuscript).await;
    writer.quiesce(300).await;
    let id = install(
        &env,
        "book-publication-pipeline",
        json!({"projectId": "p-w", "storeUrl": store_url}),
    )
    .await;
    let moved = json!({"category": "publishing", "type": "status_changed", "userId": "olga", "projectId": "p-w",
        "documentId": "d-1", "data": {"bookId": "b-7", "from": "draft", "to": "review"}});
    let (s, b) = env
        .post("/api/realtime/events/publish", &env.service_token(), &moved)
        .await;
    assert!(s.is_success(), "{s} {b}");
    let runs = runs_ended(&env, &id, 1).await;
    let run = &runs[0];
    assert_eq!(run["status"], "completed", "{run:#}");
    assert_eq!(step(run, "valid")["output"]["result"], true);
    assert_eq!(step(run, "notify_invalid")["status"], "skipped");
    assert_eq!(
        step(run, "metadata")["output"]["json"]["title"],
        "The Long Draft"
    );
    // The EPUB: a zip whose first entry is the EPUB mimetype, with the manuscript inside.
    let epub = step(run, "epub")["output"].clone();
    assert_eq!(epub["chapters"], 1);
    let uploaded = store.lock().unwrap().clone();
    assert_eq!(uploaded.len(), 1, "{uploaded:?}");
    let (method, book, body) = &uploaded[0];
    assert_eq!((method.as_str(), book.as_str()), ("PUT", "b-7"));
    assert_eq!(body["metadata"]["title"], "The Long Draft");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body["epub"]["base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(bytes.len() as u64, body["epub"]["bytes"].as_u64().unwrap());
    assert!(bytes.starts_with(b"PK"), "not a zip");
    assert_eq!(&bytes[30..38], b"mimetype");
    assert_eq!(&bytes[38..58], b"application/epub+zip");
    // The author is told.
    let olga = inbox(&env, "olga", 1).await;
    assert_eq!(
        olga[0]["title"], "Book b-7 was sent to the store",
        "{olga:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_at_each_phase_of_a_step_loses_nothing_and_repeats_no_effect() {
    let env = TestEnv::start().await;
    env.add_member("p-w", "olga", ProjectRole::Owner).await;
    let (peer_url, peer) = start_peer().await;
    let def = workflow(
        "w-phases",
        vec![
            json!({"id": "a", "action": "http", "timeout": "1s", "input": {"url": format!("{peer_url}/ok/a-{{{{ run.id }}}}")}}),
            json!({"id": "count", "action": "redis", "dependsOn": ["a"], "timeout": "1s", "input": {"op": "incr", "key": "phases"}}),
            json!({"id": "b", "action": "http", "dependsOn": ["count"], "timeout": "1s", "input": {"url": format!("{peer_url}/ok/b-{{{{ run.id }}}}")}}),
        ],
    );
    register(&env, &def).await;
    let files = tempfile::tempdir().unwrap();
    let files = files.path().to_str().unwrap().to_string();
    let base_env = vec![
        ("INKWIRE_WORKFLOW_WATCH_GRACE", "1s"),
        ("INKWIRE_WORKFLOW_LEASE_MARGIN", "200ms"),
        ("INKWIRE_WORKFLOW_HTTP_ALLOW_PRIVATE", "1"),
        ("INKWIRE_WORKFLOW_FILES_DIR", files.as_str()),
    ];
    let exe = env!("CARGO_BIN_EXE_workflows-worker-process");
    let phases = ["received", "started", "acted", "finished", "dispatched"];
    for phase in phases {
        let mut crashing = base_env.clone();
        crashing.push(("INKWIRE_WORKFLOW_CRASH_AT", phase));
        let mut doomed = inkwire_tests::ServerProcess::start(&env, exe, &crashing).await;
        let run = execute(&env, "w-phases", &json!({})).await;
        assert!(
            doomed.exited_within(Duration::from_secs(10)).await,
            "{phase}: never reached"
        );
        // A healthy worker takes over; the run completes with each effect once.
        let healthy = inkwire_tests::ServerProcess::start(&env, exe, &base_env).await;
        let view = ended(&env, &run, Duration::from_secs(20)).await;
        assert_eq!(view["status"], "completed", "{phase}: {view:#}");
        for s in ["a", "b"] {
            let keys: std::collections::BTreeSet<String> = peer
                .calls(&format!("/ok/{s}-{run}"))
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            assert_eq!(keys.len(), 1, "{phase}: {s} {keys:?}");
        }
        let events = events_with(&env, &run, "workflow_completed").await;
        let count = |t: &str| events.iter().filter(|e| e["type"] == t).count();
        assert_eq!(
            (
                count("workflow_started"),
                count("action_executed"),
                count("workflow_completed")
            ),
            (1, 3, 1),
            "{phase}"
        );
        drop(healthy);
    }
    let mut redis = env.state.redis.clone();
    let n: i64 = redis::cmd("GET")
        .arg("inkwire:wf:data:p-w:phases")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(n, phases.len() as i64, "a redis effect was repeated");
}
