//! A stock Yjs client (`tests/peers/coedit-peer.mjs`: yjs 13.6, y-websocket 3.1, ws) run
//! with node and driven over stdin/stdout, one JSON object per line; and a raw y-websocket
//! connection (tokio-tungstenite) for the frames a stock client never sends.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

use crate::ws::Socket;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// One node process holding one `WebsocketProvider`.
pub struct YjsPeer {
    child: Child,
    stdin: ChildStdin,
    next: u64,
    pending: Pending,
    events: Arc<Mutex<Vec<Value>>>,
}

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// `ws://host/ws/docs` from an `http://host` base.
pub fn docs_url(base: &str) -> String {
    format!("{}/ws/docs", base.replacen("http://", "ws://", 1))
}

impl YjsPeer {
    /// Starts a client of `document` on the server at `base` (`http://…`). `quiet`: no
    /// local awareness state, so the client sends nothing while idle.
    pub async fn start(base: &str, document: &str, token: &str, quiet: bool) -> YjsPeer {
        let dir = peers_dir();
        assert!(
            dir.join("node_modules/y-websocket").is_dir(),
            "the co-editing tests need the stock Yjs clients: run `npm ci` in {} \
             (infra/install-servers.sh does)",
            dir.display()
        );
        let mut cmd = Command::new("node");
        cmd.arg(dir.join("coedit-peer.mjs"))
            .arg(docs_url(base))
            .arg(document)
            .arg(token)
            .arg(if quiet { "quiet" } else { "normal" })
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("node runs (install Node 18+)");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (p, e) = (pending.clone(), events.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(id) = v.get("id").and_then(Value::as_u64) {
                    if let Some(tx) = p.lock().unwrap().remove(&id) {
                        let _ = tx.send(v);
                    }
                } else {
                    e.lock().unwrap().push(v);
                }
            }
        });
        YjsPeer {
            child,
            stdin,
            next: 1,
            pending,
            events,
        }
    }

    /// Sends a command and waits (2 minutes at most) for its reply.
    pub async fn call(&mut self, mut cmd: Value) -> Value {
        let id = self.next;
        self.next += 1;
        cmd["id"] = json!(id);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let line = format!("{cmd}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .expect("peer stdin");
        self.stdin.flush().await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(120), rx)
            .await
            .unwrap_or_else(|_| panic!("peer did not answer {cmd}"))
            .expect("peer alive");
        assert!(reply.get("error").is_none(), "{cmd}: {reply}");
        reply
    }

    pub async fn wait_synced(&mut self) {
        self.call(json!({"cmd": "waitSynced"})).await;
    }

    pub async fn edits(&mut self, n: u64, seed: u64) {
        self.call(json!({"cmd": "edits", "n": n, "seed": seed}))
            .await;
    }

    pub async fn insert(&mut self, index: u64, text: &str) {
        self.call(json!({"cmd": "insert", "index": index, "text": text}))
            .await;
    }

    pub async fn text(&mut self) -> String {
        self.call(json!({"cmd": "text"})).await["text"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The text once no update arrived for `ms`.
    pub async fn quiesce(&mut self, ms: u64) -> String {
        self.call(json!({"cmd": "quiesce", "ms": ms})).await["text"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// `Y.encodeStateAsUpdate(doc)`.
    pub async fn state(&mut self) -> Vec<u8> {
        use base64::Engine;
        let s = self.call(json!({"cmd": "state"})).await;
        base64::engine::general_purpose::STANDARD
            .decode(s["state"].as_str().unwrap())
            .unwrap()
    }

    /// Puts the awareness cursor (Yjs relative positions) at `anchor..head` of the text.
    pub async fn cursor(&mut self, anchor: u64, head: u64) {
        self.call(json!({"cmd": "cursor", "anchor": anchor, "head": head}))
            .await;
    }

    /// Sets the awareness `mode` (`editing`, `viewing`, `commenting`) and cursor.
    pub async fn cursor_mode(&mut self, anchor: u64, head: u64, mode: &str) {
        self.call(json!({"cmd": "cursor", "anchor": anchor, "head": head, "mode": mode}))
            .await;
    }

    /// The client's Yjs client id.
    pub async fn client_id(&mut self) -> u64 {
        self.call(json!({"cmd": "clientId"})).await["clientId"]
            .as_u64()
            .unwrap()
    }

    pub async fn stats(&mut self) -> Value {
        self.call(json!({"cmd": "stats"})).await
    }

    pub async fn peers(&mut self) -> Vec<Value> {
        self.call(json!({"cmd": "peers"})).await["peers"]
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until an event matches `pred`.
    pub async fn wait_event(&self, wait: Duration, pred: impl Fn(&Value) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.events().iter().any(&pred) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills the node process at once (SIGKILL).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Destroys the provider (a clean close) and ends the process.
    pub async fn exit(mut self) {
        let _ = self.call(json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// A raw y-websocket connection.
pub struct RawYjs {
    pub socket: Socket,
}

/// How a raw connection ended.
#[derive(Debug, PartialEq)]
pub enum RawEnd {
    Closed(Option<u16>),
    Timeout,
}

impl RawYjs {
    pub async fn connect(base: &str, document: &str, token: &str) -> RawYjs {
        let url = format!("{}/{document}?token={token}", docs_url(base));
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("raw y-websocket connect");
        RawYjs { socket }
    }

    pub async fn send(&mut self, frame: Vec<u8>) {
        let _ = self.socket.send(Message::Binary(frame.into())).await;
    }

    /// The next binary frame.
    pub async fn next_binary(&mut self, wait: Duration) -> Result<Vec<u8>, RawEnd> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.socket.next()).await {
                Err(_) => return Err(RawEnd::Timeout),
                Ok(None) | Ok(Some(Err(_))) => return Err(RawEnd::Closed(None)),
                Ok(Some(Ok(Message::Binary(b)))) => return Ok(b.to_vec()),
                Ok(Some(Ok(Message::Close(f)))) => {
                    return Err(RawEnd::Closed(f.map(|f| u16::from(f.code))));
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Reads until the connection ends.
    pub async fn until_closed(&mut self, wait: Duration) -> RawEnd {
        loop {
            match self.next_binary(wait).await {
                Ok(_) => continue,
                Err(e) => return e,
            }
        }
    }
}
