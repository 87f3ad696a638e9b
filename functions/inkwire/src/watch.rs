//! `inkwire watch`: subscribe to relay channels and print every frame as one JSON line, so
//! that the live side can be tried without installing a WebSocket client.
//!
//! The token goes in an `Authorization` header (not the URL, which ends up in logs). Frames
//! are re-serialized compactly, one per line, so the output pipes into `grep` or `jq`. A
//! refused subscription ends the command with an error after its `error` frame is printed:
//! a script learns at once that it watches nothing.

use std::io::Write as _;

use anyhow::Context as _;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// What `inkwire watch` was asked to do.
#[derive(Debug, Clone)]
pub struct WatchArgs {
    /// `http(s)://` or `ws(s)://` base URL, or a full `ws://…/ws/<path>` URL.
    pub url: String,
    pub token: String,
    /// The relay path used when `url` has none.
    pub path: String,
    /// Stop after this many `message` frames.
    pub count: Option<usize>,
    pub channels: Vec<String>,
}

/// The WebSocket URL to connect to: `http` becomes `ws` (`https`, `wss`), and a URL without a
/// path gets `/ws/<path>`.
pub fn websocket_url(url: &str, path: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("--url {url:?} has no scheme (use http:// or ws://)"))?;
    let scheme = match scheme {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => anyhow::bail!("--url scheme {other:?} is not http, https, ws or wss"),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        Ok(format!("{scheme}://{rest}"))
    } else {
        Ok(format!("{scheme}://{rest}/ws/{path}"))
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.channels.is_empty(), "name at least one channel");
    let url = websocket_url(&args.url, &args.path)?;
    let mut request = url
        .as_str()
        .into_client_request()
        .with_context(|| format!("bad relay URL {url:?}"))?;
    request.headers_mut().insert(
        "Authorization",
        HeaderValue::from_str(&format!("Bearer {}", args.token))
            .context("the token contains characters a header cannot carry")?,
    );
    let (mut socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(s) => s,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            anyhow::bail!(
                "the relay refused the connection ({}): {body}",
                response.status()
            );
        }
        Err(e) => return Err(e).with_context(|| format!("cannot connect to {url}")),
    };
    for (i, channel) in args.channels.iter().enumerate() {
        let frame = json!({"op": "subscribe", "channel": channel, "ref": i + 1});
        socket.send(Message::text(frame.to_string())).await?;
    }
    let mut messages = 0usize;
    let stdout = std::io::stdout();
    loop {
        let frame = tokio::select! {
            f = socket.next() => f,
            _ = tokio::signal::ctrl_c() => {
                let _ = socket.close(None).await;
                return Ok(());
            }
        };
        let text = match frame {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(close))) => {
                let (code, reason) = close
                    .map(|c| (u16::from(c.code), c.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                if code == 1000 || code == 1001 {
                    eprintln!("the relay closed the connection ({code} {reason})");
                    return Ok(());
                }
                anyhow::bail!("the relay closed the connection ({code} {reason})");
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e).context("WebSocket failed"),
            None => anyhow::bail!("the connection ended"),
        };
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.to_string()));
        {
            let mut out = stdout.lock();
            writeln!(out, "{value}")?;
            out.flush()?;
        }
        match value["op"].as_str() {
            Some("error") if value.get("ref").is_some_and(|r| r.is_u64()) => {
                let channel = value["ref"]
                    .as_u64()
                    .and_then(|r| args.channels.get((r as usize).wrapping_sub(1)))
                    .map_or("?", String::as_str);
                anyhow::bail!(
                    "subscribing to {channel} was refused: {}",
                    value["message"].as_str().unwrap_or("")
                );
            }
            Some("message") => {
                messages += 1;
                if args.count.is_some_and(|n| messages >= n) {
                    let _ = socket.close(None).await;
                    return Ok(());
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = |url: &str| websocket_url(url, "analytics").unwrap();
        assert_eq!(
            u("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/ws/analytics"
        );
        assert_eq!(
            u("http://127.0.0.1:8080/"),
            "ws://127.0.0.1:8080/ws/analytics"
        );
        assert_eq!(u("https://rt.example"), "wss://rt.example/ws/analytics");
        assert_eq!(
            u("ws://localhost:8080/ws/notifications"),
            "ws://localhost:8080/ws/notifications"
        );
        assert!(websocket_url("127.0.0.1:8080", "analytics").is_err());
        assert!(websocket_url("ftp://x", "analytics").is_err());
    }
}
