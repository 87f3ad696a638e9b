//! `/ws/docs/{documentId}`: the y-websocket endpoint.
//!
//! **Before the upgrade** (every refusal is problem+json and no upgrade happens): the
//! browser's origin (`shared::origins`), the document id, the JWT (`?token=` as stock
//! clients send it through `params`, a `bearer.<jwt>` entry of `Sec-WebSocket-Protocol`, the
//! `inkwire_token` cookie, or `Authorization: Bearer`), the caller's role in the document's
//! project (owner/editor write, reviewer/reader read, others `403`), the per-document
//! connection limit (`429`), and the document itself, loaded before the upgrade so that a
//! failed load is a `503` rather than an empty document. Since nothing is upgraded before
//! authentication and loading finish, no frame can arrive (and be buffered) before then.
//!
//! Stock clients retry a refused upgrade (401/403/429/503) forever, with a backoff of at
//! most 2.5 s (y-websocket's `maxBackoffTime`): browsers only see code 1006. After the
//! upgrade, inkwire closes with 44xx codes when retrying cannot help (y-websocket 3.1 then
//! stops): `4400` malformed frame, `4403` access revoked, `4413` document too large.
//!
//! **After the upgrade**: exactly one message per frame each way; a frame that does not
//! decode, has trailing bytes, or has an unknown type closes that connection only
//! (`4400`); frames beyond the rate limit are read later; a writer task sends the
//! document's queue, an empty awareness message after `keepalive` of silence (stock clients
//! reconnect after 30 s without a message), and WebSocket pings.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use inkwire_shared::auth::{AuthError, Caller};
use inkwire_shared::membership::{self, ProjectRole, is_valid_id};
use inkwire_shared::problem::{Problem, dependency_failed};
use inkwire_shared::websocket::{find_token, upgrade_rejection};
use tokio::sync::{mpsc, oneshot};

use crate::Coedit;
use crate::attribution::LeaveReason;
use crate::document::{Command, Conn, DocHandle, Out, Verdict};
use crate::protocol::{self, Incoming};

/// The protocol name answered when the client offers it.
pub const PROTOCOL: &str = "inkwire.v1";

/// The WebSocket route.
pub fn routes(coedit: Coedit) -> Router {
    Router::new()
        .route("/ws/docs/{document_id}", get(upgrade))
        .with_state(coedit)
}

/// The caller's role for `document`, and the document's project; a problem otherwise.
async fn authorize(
    coedit: &Coedit,
    caller: &Caller,
    document: &str,
) -> Result<(String, ProjectRole), Problem> {
    let mut redis = coedit.app.redis.clone();
    let project = membership::project_of_document(&mut redis, document)
        .await
        .map_err(|e| dependency_failed("redis", e))?
        .ok_or_else(|| Problem::forbidden("not a member of this document's project"))?;
    let role = membership::role_of(&mut redis, &project, &caller.user_id)
        .await
        .map_err(|e| dependency_failed("redis", e))?
        .ok_or_else(|| Problem::forbidden("not a member of this document's project"))?;
    Ok((project, role))
}

async fn upgrade(
    State(coedit): State<Coedit>,
    path: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    // The origin first: a browser attaches the session cookie to an upgrade from any site.
    if let Err(e) = coedit.app.config.allowed_origins.check(&headers) {
        return Problem::from(e).into_response();
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return upgrade_rejection(rejection, "y-websocket connections"),
    };
    let document = match path {
        Ok(Path(d)) if is_valid_id(&d) => d,
        _ => {
            return Problem::bad_request(
                "invalid_id",
                "the document id must be 1-64 letters, digits, '_' or '-'",
            )
            .into_response();
        }
    };
    let Ok(Query(query)) = query else {
        return Problem::bad_request(
            "invalid_parameter",
            "the query string is not valid (bad percent-encoding?)",
        )
        .into_response();
    };
    let Some((token, token_protocol)) = find_token(&query, &headers) else {
        return Problem::from(AuthError::Missing).into_response();
    };
    let caller = match coedit.app.jwt.verify(&token) {
        Ok(c) => c,
        Err(e) => return Problem::from(e).into_response(),
    };
    if coedit.shutdown.is_triggered() {
        return Problem::unavailable("shutting down; connect to another instance").into_response();
    }
    let (project, role) = match authorize(&coedit, &caller, &document).await {
        Ok(r) => r,
        Err(p) => return p.into_response(),
    };
    let (out_tx, out_rx) = mpsc::channel(coedit.config.send_queue);
    let weak = out_tx.downgrade();
    let conn_id = coedit.next_connection_id();
    let mut out_tx = Some(out_tx);
    let mut joined = None;
    for _ in 0..3 {
        let handle = match coedit.document(&document, &project).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(document, error = %e, "document could not be loaded; connection refused");
                return Problem::unavailable("the document could not be loaded; retry later")
                    .into_response();
            }
        };
        if !handle.admit(coedit.config.max_connections_per_document) {
            return Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_connections",
                format!(
                    "at most {} connections per document",
                    coedit.config.max_connections_per_document
                ),
            )
            .into_response();
        }
        let (reply, answer) = oneshot::channel();
        let conn = Conn {
            id: conn_id,
            user: caller.user_id.clone(),
            role,
            out: out_tx.take().expect("sender"),
        };
        if handle.send(Command::Join { conn, reply }).await && answer.await == Ok(true) {
            joined = Some(handle);
            break;
        }
        // The document is unloading: load it again.
        handle.release();
        out_tx = weak.upgrade();
        if out_tx.is_none() {
            break;
        }
    }
    let Some(handle) = joined else {
        return Problem::unavailable("the document is being unloaded; retry").into_response();
    };
    let max = coedit.config.max_update_bytes;
    let mut offered = vec![PROTOCOL.to_string()];
    offered.extend(token_protocol);
    let failed = handle.clone();
    ws.protocols(offered)
        // Small buffers, as on the relay: a typing client sends frames of a few bytes, and
        // the default 128 KiB read buffer per connection was most of a loaded document's
        // memory.
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .max_write_buffer_size(coedit.config.max_update_bytes * 4 + (1 << 20))
        .on_failed_upgrade(move |_| {
            tokio::spawn(async move {
                failed
                    .send(Command::Leave {
                        id: conn_id,
                        reason: LeaveReason::Closed,
                    })
                    .await;
                failed.release();
            });
        })
        .on_upgrade(move |socket| {
            run(
                socket,
                coedit,
                handle,
                Session {
                    id: conn_id,
                    user: caller.user_id,
                },
                out_rx,
                weak,
            )
        })
}

struct Session {
    id: u64,
    user: String,
}

/// A token bucket: frames beyond the rate wait.
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            at: Instant::now(),
        }
    }

    /// How long to wait before the next frame may be handled.
    fn take(&mut self) -> Duration {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        self.at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

fn clip_reason(reason: &str) -> String {
    let mut end = reason.len().min(120);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

async fn run(
    socket: WebSocket,
    coedit: Coedit,
    handle: DocHandle,
    session: Session,
    mut out_rx: mpsc::Receiver<Out>,
    out: mpsc::WeakSender<Out>,
) {
    let (mut sink, mut stream) = socket.split();
    let (writer_done_tx, mut writer_done) = oneshot::channel::<()>();
    let keepalive = coedit.config.keepalive;
    let ping_every = coedit.config.ping_interval;
    let writer = tokio::spawn(async move {
        let mut last_sent = tokio::time::Instant::now();
        let mut ping = tokio::time::interval(ping_every);
        ping.tick().await;
        loop {
            tokio::select! {
                m = out_rx.recv() => match m {
                    Some(Out::Frame(b)) => {
                        if sink.send(Message::Binary(b)).await.is_err() {
                            break;
                        }
                        last_sent = tokio::time::Instant::now();
                    }
                    Some(Out::Close(code, reason)) => {
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame {
                                code,
                                reason: clip_reason(&reason).into(),
                            })))
                            .await;
                        break;
                    }
                    None => {
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame {
                                code: 1013,
                                reason: "too slow or document unloaded; reconnect".into(),
                            })))
                            .await;
                        break;
                    }
                },
                _ = tokio::time::sleep_until(last_sent + keepalive) => {
                    if sink.send(Message::Binary(Bytes::from_static(&protocol::KEEPALIVE))).await.is_err() {
                        break;
                    }
                    last_sent = tokio::time::Instant::now();
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = writer_done_tx.send(());
    });

    let mut bucket = Bucket::new(coedit.config.rate_per_sec, coedit.config.rate_burst);
    let silence = ping_every * 3;
    let mut sent_updates = 0u64;
    let mut reason = LeaveReason::Closed;
    let close = |code: u16, why: String| {
        if let Some(tx) = out.upgrade() {
            let _ = tx.try_send(Out::Close(code, why));
        }
    };
    loop {
        let next = tokio::select! {
            _ = &mut writer_done => break,
            n = tokio::time::timeout(silence, stream.next()) => n,
        };
        let msg = match next {
            Err(_) => {
                reason = LeaveReason::Timeout;
                close(1001, "no message or pong for too long".into());
                break;
            }
            Ok(None) | Ok(Some(Err(_))) => break,
            Ok(Some(Ok(m))) => m,
        };
        let frame = match msg {
            Message::Binary(b) => b,
            Message::Text(_) => {
                close(4400, "y-websocket frames are binary".into());
                break;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        let wait = bucket.take();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        match handle_frame(&coedit, &handle, &session, frame, &mut sent_updates).await {
            Ok(()) => {}
            Err((code, why)) => {
                tracing::debug!(document = %handle.id, connection = session.id, code, why, "closing connection");
                close(code, why);
                break;
            }
        }
    }
    handle
        .send(Command::Leave {
            id: session.id,
            reason,
        })
        .await;
    handle.release();
    // Let the writer send its close frame.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// Handles one frame; an error closes the connection with that code and reason.
async fn handle_frame(
    coedit: &Coedit,
    handle: &DocHandle,
    session: &Session,
    frame: Bytes,
    sent: &mut u64,
) -> Result<(), (u16, String)> {
    let msg = protocol::decode_frame(&frame).map_err(|e| (4400, e.to_string()))?;
    match msg {
        Incoming::Update(update) => {
            if update.len() + 1024 > coedit.app.nats.max_payload() {
                return Err((4413, "update larger than the server stores".into()));
            }
            let update = Bytes::from(update);
            let (reply, verdict) = oneshot::channel();
            if !handle
                .send(Command::Update {
                    id: session.id,
                    update: update.clone(),
                    reply,
                })
                .await
            {
                return Err((1012, "document unloaded; reconnect".into()));
            }
            match verdict.await {
                Ok(Verdict::Store) => {
                    *sent += 1;
                    let msg_id = format!("{}-{}-{}", coedit.instance_id, session.id, sent);
                    let sequence = coedit
                        .store
                        .append(
                            &handle.id,
                            &session.user,
                            &coedit.instance_id,
                            &msg_id,
                            update.clone(),
                        )
                        .await
                        .map_err(|e| {
                            tracing::warn!(document = %handle.id, error = %e, "update not stored");
                            (
                                1011,
                                "the update could not be stored; reconnect".to_string(),
                            )
                        })?;
                    handle.send(Command::Accepted { sequence, update }).await;
                }
                Ok(Verdict::Drop) | Ok(Verdict::Denied) => {}
                Ok(Verdict::TooLarge) => {
                    return Err((4413, "the document reached its size limit".into()));
                }
                Err(_) => return Err((1012, "document unloaded; reconnect".into())),
            }
        }
        Incoming::Auth => {}
        other => {
            handle
                .send(Command::Frame {
                    id: session.id,
                    msg: other,
                    raw: frame,
                })
                .await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_slows_down_after_the_burst() {
        let mut b = Bucket::new(10, 3);
        for _ in 0..3 {
            assert!(b.take().is_zero());
        }
        let wait = b.take();
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(100));
    }
}
