//! The README's walkthrough, run as a newcomer runs it: a fresh `inkwire dev` (the real
//! binary, its own data directory and port), the `export` lines it prints pasted into bash,
//! then every shell block marked `<!-- walkthrough -->` in order, verbatim, with
//! `set -euo pipefail` (curl is called with `--fail-with-body`, so any HTTP error fails it).
//! The block marked `<!-- walkthrough: background -->` (`inkwire watch`) runs alongside, and
//! must print the live metrics of the session the walkthrough writes in.

mod common;

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Dev, terminate};
use serde_json::Value;

struct Block {
    background: bool,
    body: String,
}

/// The walkthrough's shell blocks, in order.
fn walkthrough_blocks(readme: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = readme.lines().peekable();
    while let Some(line) = lines.next() {
        let background = match line.trim() {
            "<!-- walkthrough -->" => false,
            "<!-- walkthrough: background -->" => true,
            _ => continue,
        };
        let fence = lines.next().unwrap_or_default().trim();
        assert_eq!(
            fence, "```sh",
            "a walkthrough marker must precede a ```sh block"
        );
        let mut body = String::new();
        for l in lines.by_ref() {
            if l.trim_start().starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.push(Block { background, body });
    }
    out
}

/// Single quotes for bash.
fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r#"'"'"'"#))
}

#[test]
fn the_readme_walkthrough_works_against_a_fresh_inkwire_dev() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let blocks = walkthrough_blocks(&readme);
    assert!(
        blocks.len() >= 5,
        "the walkthrough has {} blocks",
        blocks.len()
    );
    assert_eq!(blocks.iter().filter(|b| b.background).count(), 1);

    let dev = Dev::start();
    let exports = dev.exports();
    for name in [
        "INKWIRE_URL",
        "INKWIRE_SERVICE_TOKEN",
        "INKWIRE_TOKEN",
        "PATH",
    ] {
        assert!(
            exports
                .iter()
                .any(|e| e.starts_with(&format!("export {name}="))),
            "inkwire dev did not print `export {name}=`: {exports:#?}"
        );
    }

    let work = tempfile::tempdir().unwrap();
    let watch_out = work.path().join("watch.out");
    let mut script = String::from("set -euo pipefail\n");
    for e in &exports {
        script.push_str(e);
        script.push('\n');
    }
    for (i, block) in blocks.iter().enumerate() {
        if block.background {
            // As in a third terminal: it runs on while the next blocks run. Wait until it
            // subscribed, as a reader would see it do before going on.
            script.push_str(&format!(
                "( {} ) > {out} 2> {out}.err &\n\
                 for _ in $(seq 300); do grep -q '\"op\":\"subscribed\"' {out} && break; sleep 0.05; done\n\
                 grep -q '\"op\":\"subscribed\"' {out} || {{ echo 'watch did not subscribe'; cat {out} {out}.err; exit 1; }} >&2\n",
                block.body.trim(),
                out = quote(&watch_out),
            ));
        } else {
            script.push_str(&format!("echo '>>> walkthrough block {}' >&2\n", i + 1));
            script.push_str(&block.body);
        }
    }
    let script_path = work.path().join("walkthrough.sh");
    std::fs::write(&script_path, &script).unwrap();

    let stdout_path = work.path().join("stdout");
    let stderr_path = work.path().join("stderr");
    // The environment of a fresh shell: only what the pasted lines set.
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script_path)
        .env_remove("NATS_URL")
        .env_remove("REDIS_URL")
        .env_remove("INKWIRE_URL")
        .env_remove("INKWIRE_TOKEN")
        .env_remove("INKWIRE_SERVICE_TOKEN")
        .env_remove("INKWIRE_ENV")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        // Its own process group: the background watcher is stopped with it.
        .process_group(0);
    let mut child = cmd.spawn().expect("bash");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            terminate(&mut child);
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let stop_group = || {
        // SAFETY: kill(2) on the process group of the bash we spawned (its pid is the pgid).
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGTERM);
        }
    };
    if !status.success() {
        stop_group();
        panic!(
            "the walkthrough failed ({status}); the last block started is the failing one\n\
             --- stderr\n{}\n--- stdout\n{}\n--- watch\n{}",
            read(&stderr_path),
            read(&stdout_path),
            read(&watch_out)
        );
    }

    // The watcher saw the session's live metrics, up to the last batch's words.
    let stdout = read(&stdout_path);
    let session = stdout
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .unwrap_or_else(|| panic!("the walkthrough printed no session id:\n{stdout}"))
        .trim()
        .to_string();
    assert!(!session.is_empty(), "{stdout}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut most_words = 0;
    while most_words < 6 && Instant::now() < deadline {
        most_words = read(&watch_out)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|f| f["op"] == "message" && f["data"]["kind"] == "writing.metrics")
            .flat_map(|f| {
                f["data"]["sessions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|s| s["metrics"]["sessionId"] == session.as_str())
            .filter_map(|s| s["metrics"]["words"].as_u64())
            .max()
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_group();
    assert_eq!(most_words, 6, "the watcher's output:\n{}", read(&watch_out));
    drop(dev);
}
