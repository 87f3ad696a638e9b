//! `inkwire serve` run as the real binary, without servers (NATS_URL and REDIS_URL point at a
//! port nothing listens on): the built-in development secret is refused unless
//! `INKWIRE_ENV=development` says so explicitly, and refused under `INKWIRE_ENV=production`
//! even when set explicitly (the check comes before any connection); logs written to a pipe
//! carry no colour codes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEV_SECRET: &str = inkwire_shared::config::DEV_JWT_SECRET;

/// Runs `inkwire serve` with only `vars` set; `Some(stderr)` when it exited within a few
/// seconds, `None` when it was still running (and was killed).
fn serve(vars: &[(&str, &str)]) -> Option<String> {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inkwire"));
    cmd.args(["serve", "--addr", "127.0.0.1:0"])
        .env_clear()
        .env("NATS_URL", format!("nats://127.0.0.1:{closed_port}"))
        .env("REDIS_URL", format!("redis://127.0.0.1:{closed_port}"))
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run the inkwire binary");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            assert!(!out.status.success());
            return Some(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn refused(stderr: &Option<String>) -> bool {
    stderr
        .as_deref()
        .is_some_and(|e| e.contains("INKWIRE_JWT_SECRET"))
}

#[test]
fn serve_refuses_the_development_secret_unless_development() {
    // Not said: refused, whether the secret is unset or set to the development one.
    let out = serve(&[]);
    assert!(refused(&out), "{out:?}");
    assert!(out.unwrap().contains("built-in development secret"));
    let out = serve(&[("INKWIRE_JWT_SECRET", DEV_SECRET)]);
    assert!(refused(&out), "{out:?}");
    // Production: refused even when set explicitly.
    let out = serve(&[
        ("INKWIRE_ENV", "production"),
        ("INKWIRE_JWT_SECRET", DEV_SECRET),
    ]);
    assert!(refused(&out), "{out:?}");
    // Development said explicitly: past the secret check (it then fails to reach NATS).
    let out = serve(&[("INKWIRE_ENV", "development")]);
    assert!(!refused(&out), "{out:?}");
    // A real secret: past the check too.
    let out = serve(&[
        ("INKWIRE_ENV", "production"),
        ("INKWIRE_JWT_SECRET", "a-real-secret-of-32-characters!!"),
    ]);
    assert!(!refused(&out), "{out:?}");
}

#[test]
fn logs_have_no_colour_codes_off_a_terminal() {
    // Debug logs of the NATS client trying to connect, on a pipe.
    let out = serve(&[("INKWIRE_ENV", "development")]).unwrap_or_default();
    assert!(out.contains("DEBUG"), "no logs: {out}");
    assert!(!out.contains('\u{1b}'), "escape codes in {out:?}");
}
