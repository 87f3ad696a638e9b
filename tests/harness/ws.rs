//! A small WebSocket test client (tokio-tungstenite) speaking the relay protocol.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// `ws://host/ws/<path>?token=…` from an `http://host` base.
pub fn ws_url(base: &str, path: &str, token: &str) -> String {
    format!(
        "{}/ws/{path}?token={token}",
        base.replacen("http://", "ws://", 1)
    )
}

pub struct WsClient {
    pub socket: Socket,
}

/// How a read ended when it did not yield a JSON frame.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(Option<u16>),
    Timeout,
}

impl WsClient {
    /// Connects and reads the welcome frame.
    pub async fn connect(url: &str) -> WsClient {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e}"));
        let mut c = WsClient { socket };
        let welcome = c.next().await;
        assert_eq!(welcome["op"], "welcome", "{welcome}");
        c
    }

    /// Connects with a custom request (headers), returning the HTTP status on refusal.
    pub async fn try_connect(
        request: impl IntoClientRequest + Unpin,
    ) -> Result<
        (
            WsClient,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        u16,
    > {
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, response)) => Ok((WsClient { socket }, response)),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, msg: Message) {
        let _ = self.socket.send(msg).await;
    }

    /// The next JSON frame, or how the connection ended.
    pub async fn next_within(&mut self, wait: Duration) -> Result<Value, Ended> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.socket.next()).await {
                Err(_) => return Err(Ended::Timeout),
                Ok(None) => return Err(Ended::Closed(None)),
                Ok(Some(Err(_))) => return Err(Ended::Closed(None)),
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Ok(serde_json::from_str(&t).expect("server frames are JSON"));
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Err(Ended::Closed(frame.map(|f| u16::from(f.code))));
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next JSON frame (5 s at most).
    pub async fn next(&mut self) -> Value {
        match self.next_within(Duration::from_secs(5)).await {
            Ok(v) => v,
            Err(e) => panic!("expected a frame, got {e:?}"),
        }
    }

    /// Subscribes and returns the `subscribed` frame (or the error frame).
    pub async fn subscribe(&mut self, channel: &str, since: Option<u64>) -> Value {
        let mut frame = json!({"op": "subscribe", "channel": channel, "ref": channel});
        if let Some(s) = since {
            frame["since"] = json!(s);
        }
        self.send(frame).await;
        self.next().await
    }

    /// Reads until the connection closes; returns the close code and the frames read.
    pub async fn until_closed(&mut self, wait: Duration) -> (Ended, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            match self.next_within(wait).await {
                Ok(v) => frames.push(v),
                Err(e) => return (e, frames),
            }
        }
    }
}
