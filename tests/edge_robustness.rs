//! The edge under faults and at the limits of HTTP: readiness with a hung nats-server or
//! redis-server (SIGSTOP), a panicking handler, and the answers hyper gives by itself
//! (request target too long, unparseable request), which must be problem+json like every
//! other error.

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use inkwire_tests::TestEnv;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Stops a process with SIGSTOP and continues it when dropped, even if the test fails.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        signal("-STOP", pid);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal("-CONT", self.0);
    }
}

fn signal(sig: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

async fn readyz(env: &TestEnv) -> (StatusCode, Value, String, Duration) {
    let started = Instant::now();
    let res = env
        .http
        .get(env.url("/readyz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("readyz answers");
    let status = res.status();
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body: Value = res.json().await.expect("JSON");
    (status, body, ct, started.elapsed())
}

/// `/readyz` answers 200 again within a few seconds.
async fn ready_again(env: &TestEnv) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body, _, _) = readyz(env).await;
        if status == StatusCode::OK {
            assert_eq!(body["nats"], "ok");
            assert_eq!(body["redis"], "ok");
            return;
        }
        assert!(Instant::now() < deadline, "not ready again: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn readyz_notices_a_hung_nats_server() {
    let env = TestEnv::start().await;
    let (status, body, _, _) = readyz(&env).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    {
        let _stopped = Stopped::new(env.nats_pid());
        let (status, body, ct, took) = readyz(&env).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(ct, "application/problem+json");
        assert_eq!(body["code"], "not_ready");
        assert!(body["detail"].as_str().unwrap().contains("nats"), "{body}");
        assert_ne!(body["nats"], "ok");
        assert_eq!(body["redis"], "ok");
    }
    ready_again(&env).await;
}

#[tokio::test]
async fn readyz_notices_a_hung_redis_server() {
    let env = TestEnv::start().await;
    let (status, body, _, _) = readyz(&env).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    {
        let _stopped = Stopped::new(env.redis_pid());
        let (status, body, ct, took) = readyz(&env).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(ct, "application/problem+json");
        assert!(body["detail"].as_str().unwrap().contains("redis"), "{body}");
        assert_ne!(body["redis"], "ok");
        assert_eq!(body["nats"], "ok");
    }
    ready_again(&env).await;
}

/// Serves `router` through the shared edge on a free port.
async fn serve_edge(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(inkwire_shared::http::serve_on(
        listener,
        inkwire_shared::http::edge(router),
        std::future::pending(),
    ));
    base
}

#[tokio::test]
async fn a_panicking_handler_answers_500_problem_json() {
    let base = serve_edge(
        Router::new()
            .route(
                "/boom",
                get(|| async {
                    panic!("secret detail from the handler");
                    #[allow(unreachable_code)]
                    ""
                }),
            )
            .route("/fine", get(|| async { "fine" })),
    )
    .await;
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let res = http.get(format!("{base}/boom")).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            res.headers()["content-type"],
            "application/problem+json",
            "{res:?}"
        );
        let text = res.text().await.unwrap();
        assert!(!text.contains("secret detail"), "{text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["code"], "internal_error");
        assert_eq!(body["status"], 500);
    }
    let res = http.get(format!("{base}/fine")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "fine");
}

/// Sends `request` as is and reads the whole answer (the server closes the connection).
async fn raw(base: &str, request: &[u8]) -> (u16, String, Value) {
    let mut tcp = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete answer");
    let status = head[9..12].parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_lowercase(), body)
}

#[tokio::test]
async fn hypers_own_answers_are_problem_json() {
    let env = TestEnv::start().await;
    // Over hyper's fixed 64 KiB limit: hyper answers by itself.
    let long = format!(
        "GET /api/projects/{}/members HTTP/1.1\r\nhost: x\r\n\r\n",
        "x".repeat(70_000)
    );
    let (status, head, body) = raw(&env.base, long.as_bytes()).await;
    assert_eq!(status, 414, "{head}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert_eq!(body["code"], "uri_too_long");
    // Not HTTP.
    let (status, head, body) = raw(&env.base, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").await;
    assert_eq!(status, 400, "{head}");
    assert!(
        head.contains("content-type: application/problem+json"),
        "{head}"
    );
    assert_eq!(body["code"], "malformed_request");
    // The server still serves.
    let (status, body) = env.get("/readyz", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn limits_and_rejections_are_problem_json() {
    let env = TestEnv::start().await;
    let token = env.token("u-1");
    let check = |status: StatusCode, headers: &reqwest::header::HeaderMap, body: &Value| {
        assert_eq!(
            headers["content-type"], "application/problem+json",
            "{body}"
        );
        assert_eq!(body["status"], status.as_u16(), "{body}");
        body["code"].as_str().unwrap().to_string()
    };
    // Below hyper's limit, above the edge's.
    let path = format!("/api/projects/{}/members", "x".repeat(20_000));
    let (s, b, h) = env
        .send(env.http.get(env.url(&path)).bearer_auth(&token))
        .await;
    assert_eq!(s, StatusCode::URI_TOO_LONG);
    assert_eq!(check(s, &h, &b), "uri_too_long");
    // Headers over the edge's limit.
    let (s, b, h) = env
        .send(
            env.http
                .get(env.url("/api/realtime/writing/stats"))
                .bearer_auth(&token)
                .header("x-padding", "p".repeat(100_000)),
        )
        .await;
    assert_eq!(s, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(check(s, &h, &b), "headers_too_large");
    // A path segment that is not UTF-8 once decoded: axum's rejection, made problem+json.
    let (s, b, h) = env
        .send(
            env.http
                .get(env.url("/api/projects/%FF%FE/members"))
                .bearer_auth(&token),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(check(s, &h, &b), "invalid_path");
    // A plain GET on a WebSocket path.
    let (s, b, h) = env
        .send(
            env.http
                .get(env.url("/ws/collaboration"))
                .bearer_auth(&token),
        )
        .await;
    assert!(s.is_client_error(), "{s}");
    check(s, &h, &b);
}

// Several threads, so that client and server really run at the same time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_request_body_does_not_break_the_connection() {
    let env = TestEnv::start().await;
    let service = env.service_token();
    // Answered without reading the body (a route that takes none, a request refused before
    // its body is looked at). If the server then closes the connection without saying so,
    // the client puts it back in its pool and the next request on it fails: the body must be
    // read (and dropped) so that the connection stays usable.
    let mut lost = Vec::new();
    for size in [64 * 1024, 600 * 1024, 3 * 1024 * 1024] {
        let body = vec![b'x'; size];
        for (method, path, token) in [
            (reqwest::Method::POST, "/api/realtime/events/publish", ""),
            (
                reqwest::Method::POST,
                "/api/realtime/writing/sessions/s-1/pause",
                "",
            ),
            (reqwest::Method::GET, "/metrics", service.as_str()),
            (reqwest::Method::GET, "/ws/notifications", service.as_str()),
            (reqwest::Method::GET, "/healthz", ""),
        ] {
            for _ in 0..5 {
                let res = env
                    .http
                    .request(method.clone(), env.url(path))
                    .bearer_auth(token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match res {
                    Err(e) => lost.push(format!("{method} {path} ({size} bytes): {e}")),
                    Ok(res) => {
                        assert!(!res.status().is_server_error(), "{path}: {}", res.status());
                        res.bytes().await.unwrap();
                    }
                }
                // The next request, on the same pooled connection.
                if let Err(e) = env.http.get(env.url("/healthz")).send().await {
                    lost.push(format!(
                        "GET /healthz after {method} {path} ({size} bytes): {e}"
                    ));
                }
            }
        }
    }
    assert!(lost.is_empty(), "{} answers lost: {lost:#?}", lost.len());
}
