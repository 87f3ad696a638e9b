//! Starts `nats-server` (with JetStream) and `redis-server` as child processes on free
//! loopback ports. Used by `inkwire dev`, `inkwire bench` and the test harness, so that none
//! of them depends on servers already running on the default ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Where to look besides `PATH`: Debian installs nats-server in /usr/sbin, which is not on
/// every user's PATH.
const EXTRA_DIRS: &[&str] = &["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"];

/// Finds an executable by name on `PATH` or in the usual system directories.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// How the servers keep their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Redis appends to disk and JetStream keeps its files: `inkwire dev`.
    Keep,
    /// Nothing of Redis on disk (tests, benchmarks); JetStream still uses files in the dir.
    Scratch,
}

/// Settings of the started `nats-server` beyond its defaults.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// The largest message the server accepts (`max_payload`, 1 MiB by default); tests
    /// lower it to reach the limit with schema-valid events.
    pub max_payload: Option<usize>,
}

/// Running child servers; killed when dropped, stopped gracefully by [`LocalServers::stop`].
pub struct LocalServers {
    pub nats_url: String,
    pub redis_url: String,
    pub data_dir: PathBuf,
    nats: Child,
    redis: Child,
}

impl LocalServers {
    /// Starts both servers with their data under `data_dir` and waits until they accept
    /// connections.
    pub async fn start(data_dir: &Path, persistence: Persistence) -> anyhow::Result<LocalServers> {
        Self::start_with(data_dir, persistence, &NatsOptions::default()).await
    }

    /// [`LocalServers::start`] with `nats-server` settings.
    pub async fn start_with(
        data_dir: &Path,
        persistence: Persistence,
        nats_options: &NatsOptions,
    ) -> anyhow::Result<LocalServers> {
        let nats_bin = find_binary("nats-server").ok_or_else(|| missing("nats-server"))?;
        let redis_bin = find_binary("redis-server").ok_or_else(|| missing("redis-server"))?;
        let nats_dir = data_dir.join("nats");
        let redis_dir = data_dir.join("redis");
        std::fs::create_dir_all(&nats_dir)?;
        std::fs::create_dir_all(&redis_dir)?;

        let nats_port = free_port()?;
        let nats_log = std::fs::File::create(data_dir.join("nats-server.log"))?;
        let mut nats_cmd = Command::new(&nats_bin);
        if let Some(max) = nats_options.max_payload {
            // Only a configuration file can set max_payload; the flags below still apply.
            let conf = data_dir.join("nats-server.conf");
            std::fs::write(&conf, format!("max_payload: {max}\n"))?;
            nats_cmd.arg("-c").arg(conf);
        }
        let nats = nats_cmd
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&nats_dir)
            .stdin(Stdio::null())
            .stdout(nats_log.try_clone()?)
            .stderr(nats_log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", nats_bin.display()))?;

        let redis_port = free_port()?;
        let mut redis_cmd = Command::new(&redis_bin);
        redis_cmd
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&redis_dir)
            .args(["--save", ""])
            .args(["--daemonize", "no"]);
        match persistence {
            Persistence::Keep => redis_cmd.args(["--appendonly", "yes"]),
            Persistence::Scratch => redis_cmd.args(["--appendonly", "no"]),
        };
        let redis_log = std::fs::File::create(data_dir.join("redis-server.log"))?;
        let redis = redis_cmd
            .stdin(Stdio::null())
            .stdout(redis_log.try_clone()?)
            .stderr(redis_log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", redis_bin.display()))?;

        let mut servers = LocalServers {
            nats_url: format!("nats://127.0.0.1:{nats_port}"),
            redis_url: format!("redis://127.0.0.1:{redis_port}"),
            data_dir: data_dir.to_path_buf(),
            nats,
            redis,
        };
        servers
            .wait_ready(nats_port, "nats-server", "nats-server.log")
            .await?;
        servers
            .wait_ready(redis_port, "redis-server", "redis-server.log")
            .await?;
        Ok(servers)
    }

    async fn wait_ready(&mut self, port: u16, name: &str, log: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            let child = if name == "nats-server" {
                &mut self.nats
            } else {
                &mut self.redis
            };
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(self.data_dir.join(log)).unwrap_or_default();
                anyhow::bail!("{name} exited ({status}) before accepting connections:\n{text}");
            }
            if Instant::now() > deadline {
                anyhow::bail!("{name} did not accept connections on port {port} within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id of `nats-server` (tests stop and continue it to fake a server that
    /// takes a message but never acknowledges it).
    pub fn nats_pid(&self) -> Option<u32> {
        self.nats.id()
    }

    /// The process id of redis-server.
    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.id()
    }

    /// Asks both servers to stop (SIGTERM), waiting up to five seconds before killing them.
    pub async fn stop(mut self) {
        for child in [&mut self.nats, &mut self.redis] {
            terminate(child).await;
        }
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn missing(name: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{name} was not found on PATH or in /usr/sbin. Install it with `sudo infra/install-servers.sh` \
         (Debian: apt-get install nats-server redis-server), or point NATS_URL / REDIS_URL at running servers."
    )
}
