//! `inkwire dev` safety and `inkwire watch`, with the real binary: a second `inkwire dev` on
//! the same data directory fails at once and leaves the first one running; a port clash is
//! reported before any server starts; `--addr` takes host names; dev runs as development and
//! answers CORS preflights from local development servers only;
//! `watch` reports refused connections and subscriptions.

mod common;

use std::time::{Duration, Instant};

use common::{Dev, inkwire, run_to_end};

async fn healthy(base: &str) -> bool {
    match reqwest::get(format!("{base}/healthz")).await {
        Ok(r) => r.status() == reqwest::StatusCode::OK,
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_second_dev_on_the_same_data_dir_fails_at_once() {
    let mut first = Dev::start();
    assert!(healthy(&first.base()).await);

    let other_port = inkwire_shared::local_servers::free_port().unwrap();
    let started = Instant::now();
    let mut cmd = inkwire(&[
        "dev",
        "--addr",
        &format!("127.0.0.1:{other_port}"),
        "--data-dir",
    ]);
    cmd.arg(&first.data_dir);
    let (status, _, stderr) = run_to_end(cmd, Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        stderr.contains("another `inkwire dev` is already running")
            && stderr.contains(&first.data_dir.display().to_string()),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "it failed at once, not after starting servers: {:?}",
        started.elapsed()
    );
    // The first one is untouched.
    assert!(first.is_running());
    assert!(healthy(&first.base()).await);
    assert!(
        !healthy(&format!("http://127.0.0.1:{other_port}")).await,
        "the second one serves nothing"
    );
}

#[tokio::test]
async fn a_port_clash_is_reported_before_any_server_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = inkwire(&["dev", "--addr", &addr, "--data-dir"]);
    cmd.arg(dir.path());
    let started = Instant::now();
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(30));
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")) && stderr.contains("--addr"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!stdout.contains("is running"), "{stdout}");
    // nats-server and redis-server were never started (they write their logs here).
    assert!(!dir.path().join("nats-server.log").exists());
    assert!(!dir.path().join("redis-server.log").exists());
}

#[tokio::test]
async fn dev_listens_on_a_host_name_and_runs_as_development() {
    let port = inkwire_shared::local_servers::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let dev = Dev::start_with(dir, &data_dir, &format!("localhost:{port}"), port);
    assert!(healthy(&dev.base()).await);
    // The paste block names the resolved address, and the user token works against it.
    assert_eq!(
        dev.export("INKWIRE_URL"),
        format!("http://127.0.0.1:{port}")
    );
    let res = reqwest::Client::new()
        .get(format!("{}/api/projects", dev.base()))
        .bearer_auth(dev.export("INKWIRE_TOKEN"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), reqwest::StatusCode::OK);
    assert!(
        dev.banner
            .iter()
            .any(|l| l.trim() == "INKWIRE_ENV development"),
        "{:#?}",
        dev.banner
    );
    // Pages of local development servers may call it (CORS), other sites may not.
    for (origin, allowed) in [
        ("http://localhost:5173", true),
        ("http://127.0.0.1:3000", true),
        ("https://evil.example", false),
    ] {
        let res = reqwest::Client::new()
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/projects", dev.base()),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
            .await
            .unwrap();
        assert_eq!(
            res.headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string()),
            allowed.then(|| origin.to_string()),
            "preflight from {origin}"
        );
    }
    // Its data directory is locked while it runs.
    assert!(data_dir.join("inkwire-dev.lock").exists());
}

#[tokio::test]
async fn watch_reports_a_refused_connection_and_a_refused_subscription() {
    let dev = Dev::start();
    let url = dev.base();

    // A bad token: HTTP 401 before any WebSocket, and the problem is shown.
    let mut cmd = inkwire(&["watch", "--url", &url, "--token", "nope", "user:dev-user"]);
    cmd.env("RUST_LOG", "off");
    let (status, _, stderr) = run_to_end(cmd, Duration::from_secs(20));
    assert!(!status.success());
    assert!(stderr.contains("401"), "{stderr}");

    // Someone else's channel: the error frame is printed, and watch fails.
    let token = dev.export("INKWIRE_TOKEN");
    let cmd = inkwire(&[
        "watch",
        "--url",
        &url,
        "--token",
        &token,
        "user:someone-else",
    ]);
    let (status, stdout, stderr) = run_to_end(cmd, Duration::from_secs(20));
    assert!(!status.success(), "{stdout}");
    let frames: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON frame per line"))
        .collect();
    assert_eq!(frames[0]["op"], "welcome", "{stdout}");
    assert_eq!(frames[1]["op"], "error", "{stdout}");
    assert_eq!(frames[1]["code"], "forbidden");
    assert!(stderr.contains("user:someone-else"), "{stderr}");

    // The token may come from INKWIRE_TOKEN and the server from INKWIRE_URL.
    let mut cmd = inkwire(&["watch", "--count", "1", "user:dev-user"]);
    cmd.env("INKWIRE_URL", &url).env("INKWIRE_TOKEN", &token);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Give it a message on its channel.
    let svc = dev.export("INKWIRE_SERVICE_TOKEN");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = client
            .post(format!("{url}/api/realtime/websocket/send-to-user"))
            .bearer_auth(&svc)
            .json(&serde_json::json!({"userId": "dev-user", "type": "notification", "data": {"hello": 1}}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), reqwest::StatusCode::ACCEPTED);
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "watch did not see the message");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["op"], "message", "{text}");
    assert_eq!(last["data"], serde_json::json!({"hello": 1}));
}
