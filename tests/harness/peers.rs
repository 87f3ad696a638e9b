//! Real protocol peers for the notification providers, started on free loopback ports like
//! nats-server and redis-server: an SMTP server (aiosmtpd, storing mail in a Maildir, with a
//! handler that refuses some recipients) and an AWS SNS endpoint (moto's server). Both are
//! Python packages; when they are missing the harness fails saying how to install them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inkwire_notifications::providers::{AwsKeys, ProviderConfig, SnsProvider};
use inkwire_shared::local_servers::free_port;
use serde_json::Value;
use tokio::process::{Child, Command};

const INSTALL_HINT: &str = "run `.ci/run` (it installs them) or \
     `python3 -m pip install 'moto[server]' aiosmtpd`";

/// Fails the test with the install hint unless `python3` can import `modules`.
fn require_python_modules(modules: &[&str]) {
    let script = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output();
    match out {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "the notification provider tests need the Python packages aiosmtpd and moto[server] \
             ({}); {INSTALL_HINT}",
            // The traceback's last line names the module that is missing.
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        ),
        Err(e) => panic!("the notification provider tests need python3 ({e}); {INSTALL_HINT}"),
    }
}

/// Waits until `ready` holds, failing with the peer's log if its process exits first.
async fn wait_until<F, Fut>(child: &mut Child, name: &str, log: &Path, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if ready().await {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{name} exited ({status}) before it was ready:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "{name} was not ready within 30 s:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// An aiosmtpd server storing what it receives in a Maildir. Recipients whose local part
/// starts with `reject` are refused with 550, `defer` with 451 (`tests/peers/smtp_peer.py`).
pub struct SmtpPeer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// One message as the SMTP peer stored it.
#[derive(Debug, Clone)]
pub struct ReceivedMail {
    pub from: String,
    pub to: String,
    /// The envelope recipients (aiosmtpd's `X-RcptTo`).
    pub rcpt_to: String,
    /// The subject, decoded (RFC 2047).
    pub subject: String,
    pub message_id: String,
    /// The top-level MIME type, e.g. `multipart/alternative`.
    pub mime_type: String,
    /// The decoded `text/plain` part.
    pub text: Option<String>,
    /// The decoded `text/html` part.
    pub html: Option<String>,
}

fn parse_mail(raw: &[u8]) -> ReceivedMail {
    use mailparse::MailHeaderMap;
    let mail = mailparse::parse_mail(raw).expect("the stored message parses");
    let header = |name: &str| mail.headers.get_first_value(name).unwrap_or_default();
    let mut text = None;
    let mut html = None;
    let mut stack = vec![&mail];
    while let Some(part) = stack.pop() {
        match part.ctype.mimetype.as_str() {
            "text/plain" if text.is_none() => text = Some(part.get_body().expect("text body")),
            "text/html" if html.is_none() => html = Some(part.get_body().expect("html body")),
            _ => stack.extend(part.subparts.iter()),
        }
    }
    ReceivedMail {
        from: header("From"),
        to: header("To"),
        rcpt_to: header("X-RcptTo"),
        subject: header("Subject"),
        message_id: header("Message-ID"),
        mime_type: mail.ctype.mimetype.clone(),
        text,
        html,
    }
}

impl SmtpPeer {
    /// Starts the server on a free port.
    pub async fn start() -> SmtpPeer {
        require_python_modules(&["aiosmtpd"]);
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut peer = SmtpPeer {
            port: free_port().expect("free port"),
            dir,
            child: None,
        };
        peer.spawn().await;
        peer
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("Maildir")
    }

    async fn spawn(&mut self) {
        let log_path = self.dir.path().join("aiosmtpd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("log file");
        let peers = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers");
        let mut child = Command::new("python3")
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["-c", "smtp_peer.RejectingMailbox"])
            .arg(self.maildir())
            .env("PYTHONPATH", peers)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 -m aiosmtpd");
        let port = self.port;
        wait_until(&mut child, "aiosmtpd", &log_path, || accepts(port)).await;
        self.child = Some(child);
    }

    /// `smtp://127.0.0.1:PORT`, for `INKWIRE_SMTP_URL`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Provider configuration pointing at this server, with a 5 s send timeout.
    pub fn provider_config(&self) -> ProviderConfig {
        ProviderConfig {
            smtp_url: Some(self.url()),
            email_from: "inkwire <notifications@inkwire.test>".into(),
            smtp_timeout: Duration::from_secs(5),
            ..ProviderConfig::default()
        }
    }

    /// Stops the server (the port stays reserved for [`SmtpPeer::restart`]); mail already
    /// stored stays.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
            let _ = child.wait().await;
        }
        // Nothing listens any more: a send now meets a refused connection.
        let deadline = Instant::now() + Duration::from_secs(5);
        while accepts(self.port).await {
            assert!(
                Instant::now() < deadline,
                "port {} still accepts",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the server again on the same port, with the same Maildir.
    pub async fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "stop the SMTP peer before restarting it"
        );
        self.spawn().await;
    }

    /// Every message stored so far, oldest first.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        let Ok(entries) = std::fs::read_dir(self.maildir().join("new")) else {
            return Vec::new();
        };
        let mut files: Vec<(std::time::SystemTime, String, PathBuf)> = entries
            .flatten()
            .map(|e| {
                let modified = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (
                    modified,
                    e.file_name().to_string_lossy().into_owned(),
                    e.path(),
                )
            })
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|(_, _, path)| parse_mail(&std::fs::read(&path).expect("read stored mail")))
            .collect()
    }

    /// Waits until at least `n` messages are stored and returns them all.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<ReceivedMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} messages arrived within {timeout:?}",
                messages.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// moto's server, answering the SNS API; what was sent is read back from
/// `GET /moto-api/data.json`.
pub struct SnsPeer {
    pub port: u16,
    _dir: tempfile::TempDir,
    _child: Child,
    http: reqwest::Client,
}

/// One SMS as moto recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsRecord {
    pub message_id: String,
    pub phone_number: String,
    pub message: String,
}

impl SnsPeer {
    pub async fn start() -> SnsPeer {
        require_python_modules(&["moto.server", "flask", "flask_cors"]);
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port().expect("free port");
        let log_path = dir.path().join("moto.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        // `python3 -m moto.server` is `moto_server`, without depending on where pip put
        // its scripts (not always on PATH).
        let mut child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start python3 -m moto.server");
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/moto-api/data.json");
        wait_until(&mut child, "moto_server", &log_path, || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await;
        SnsPeer {
            port,
            _dir: dir,
            _child: child,
            http,
        }
    }

    /// `http://127.0.0.1:PORT`, for `INKWIRE_SNS_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Provider configuration pointing at this server (region us-east-1, test keys: moto
    /// accepts any), with SNS on.
    pub fn provider_config(&self, platform_application_arn: Option<&str>) -> ProviderConfig {
        ProviderConfig {
            sns_enabled: true,
            sns_endpoint: Some(self.endpoint()),
            sns_platform_application_arn: platform_application_arn.map(str::to_string),
            sns_timeout: Duration::from_secs(5),
            aws_region: Some("us-east-1".into()),
            aws_keys: Some(AwsKeys {
                access_key_id: "testing".into(),
                secret_access_key: "testing".into(),
                session_token: None,
            }),
            ..ProviderConfig::default()
        }
    }

    /// A provider without a platform application, for set-up calls through its client.
    pub async fn admin(&self) -> Arc<SnsProvider> {
        Arc::new(SnsProvider::new(&self.provider_config(None)).await)
    }

    /// Creates a platform application (`GCM` or `APNS`) and returns its ARN.
    pub async fn create_platform_application(&self, name: &str, platform: &str) -> String {
        let admin = self.admin().await;
        admin
            .client()
            .create_platform_application()
            .name(name)
            .platform(platform)
            .attributes("PlatformCredential", "test-credential")
            .send()
            .await
            .expect("create platform application")
            .platform_application_arn
            .expect("platform application ARN")
    }

    /// Turns a platform endpoint on or off (as SNS does when a platform reports a token
    /// invalid).
    pub async fn set_endpoint_enabled(&self, endpoint_arn: &str, enabled: bool) {
        self.admin()
            .await
            .client()
            .set_endpoint_attributes()
            .endpoint_arn(endpoint_arn)
            .attributes("Enabled", enabled.to_string())
            .send()
            .await
            .expect("set endpoint attributes");
    }

    /// The ARNs of the endpoints a platform application has now (through the SNS API).
    pub async fn live_endpoints(&self, platform_application_arn: &str) -> Vec<String> {
        self.admin()
            .await
            .client()
            .list_endpoints_by_platform_application()
            .platform_application_arn(platform_application_arn)
            .send()
            .await
            .expect("list endpoints")
            .endpoints
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| e.endpoint_arn)
            .collect()
    }

    /// moto's whole state.
    pub async fn data(&self) -> Value {
        self.http
            .get(format!("{}/moto-api/data.json", self.endpoint()))
            .send()
            .await
            .expect("GET /moto-api/data.json")
            .json()
            .await
            .expect("data.json is JSON")
    }

    /// Every SMS sent so far (`sns.SMS`).
    pub async fn sms(&self) -> Vec<SmsRecord> {
        let data = self.data().await;
        data["sns"]["SMS"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|s| SmsRecord {
                        message_id: s["message_id"].as_str().unwrap_or_default().into(),
                        phone_number: s["phone_number"].as_str().unwrap_or_default().into(),
                        message: s["message"].as_str().unwrap_or_default().into(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The platform endpoint `arn` as moto holds it (`sns.PlatformEndpoint[]`: `attributes`,
    /// `custom_user_data`, `enabled`, `messages` {id: message}), or `None`. data.json lists
    /// every endpoint ever created, deleted ones included: see [`SnsPeer::live_endpoints`].
    pub async fn platform_endpoint(&self, arn: &str) -> Option<Value> {
        let data = self.data().await;
        data["sns"]["PlatformEndpoint"]
            .as_array()?
            .iter()
            .find(|e| e["arn"] == arn)
            .cloned()
    }

    /// The messages published to the platform endpoint `arn`: (message id, message).
    pub async fn endpoint_messages(&self, arn: &str) -> Vec<(String, String)> {
        let Some(endpoint) = self.platform_endpoint(arn).await else {
            return Vec::new();
        };
        endpoint["messages"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(id, msg)| (id.clone(), msg.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }
}
