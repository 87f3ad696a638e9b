//! Runs the real `inkwire` binary (built by cargo for these tests) as a child process: a
//! fresh `inkwire dev` on a free port and its own data directory, stopped with SIGTERM when
//! dropped so that its nats-server and redis-server children stop too.

#![allow(dead_code)] // each test file uses a part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_inkwire");

/// `inkwire` with the environment of a fresh shell: no server URLs, no INKWIRE_ENV.
pub fn inkwire(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("NATS_URL")
        .env_remove("REDIS_URL")
        .env_remove("INKWIRE_ENV")
        .env_remove("INKWIRE_JWT_SECRET")
        .env_remove("INKWIRE_URL")
        .env_remove("INKWIRE_TOKEN")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to its end (killed after `limit`): status, stdout, stderr.
pub fn run_to_end(mut cmd: Command, limit: Duration) -> (ExitStatus, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let err = std::fs::File::create(dir.path().join("err")).unwrap();
    let mut child = cmd.stdout(out).stderr(err).spawn().expect("spawn inkwire");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            terminate(&mut child);
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
    (status, read("out"), read("err"))
}

/// SIGTERM (what Ctrl-C does), then SIGKILL if it does not stop within 10 s.
pub fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A running `inkwire dev`.
pub struct Dev {
    child: Child,
    /// What it printed up to "Press Ctrl-C to stop.".
    pub banner: Vec<String>,
    pub port: u16,
    pub data_dir: PathBuf,
    pub stderr_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// Starts `inkwire dev --addr 127.0.0.1:<free port>` with a fresh data directory.
    pub fn start() -> Dev {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let port = inkwire_shared::local_servers::free_port().unwrap();
        Dev::start_with(dir, &data_dir, &format!("127.0.0.1:{port}"), port)
    }

    /// Starts `inkwire dev` in `data_dir` listening on `addr` (whose port is `port`).
    pub fn start_with(dir: tempfile::TempDir, data_dir: &Path, addr: &str, port: u16) -> Dev {
        let stderr_path = dir.path().join("dev-stderr.log");
        let mut child = inkwire(&["dev", "--addr", addr, "--data-dir"])
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn inkwire dev");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        // Keeps draining stdout for the whole run so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // Nobody listens any more; keep reading anyway.
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let done = line.starts_with("Press Ctrl-C");
                    banner.push(line);
                    if done {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = child.wait();
                    panic!(
                        "inkwire dev ended before it was ready:\n{}\n{}",
                        banner.join("\n"),
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "inkwire dev exited ({status}) before it was ready:\n{}\n{}",
                    banner.join("\n"),
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "inkwire dev not ready within 60 s"
            );
        }
        Dev {
            child,
            banner,
            port,
            data_dir: data_dir.to_path_buf(),
            stderr_path,
            _dir: dir,
        }
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `export …` lines it printed for pasting.
    pub fn exports(&self) -> Vec<String> {
        self.banner
            .iter()
            .map(|l| l.trim())
            .filter(|l| l.starts_with("export "))
            .map(str::to_string)
            .collect()
    }

    /// The value of an exported variable.
    pub fn export(&self, name: &str) -> String {
        let prefix = format!("export {name}=");
        self.exports()
            .iter()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_else(|| {
                panic!(
                    "inkwire dev printed no {prefix}…:\n{}",
                    self.banner.join("\n")
                )
            })
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}
