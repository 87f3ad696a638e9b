//! hyper's own answers, made problem+json.
//!
//! When hyper cannot parse a request (a request target over its fixed 64 KiB limit, a header
//! section over its buffer, broken HTTP syntax) it answers by itself — `414`, `431` or `400`
//! with an empty body — and closes the connection; the router never sees the request. The
//! connections served here are wrapped so that such an answer is replaced, as it is written,
//! by the same status with a problem+json body. Every other byte passes through unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::http::StatusCode;
use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::problem::Problem;

/// A listener whose connections are [`ProblemIo`]s.
pub struct ProblemListener<L>(pub L);

impl<L: Listener> Listener for ProblemListener<L> {
    type Io = ProblemIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.0.accept().await;
        (
            ProblemIo {
                inner: io,
                pending: Vec::new(),
                written: 0,
            },
            addr,
        )
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection whose automatic hyper answers are rewritten (see the module documentation).
pub struct ProblemIo<T> {
    inner: T,
    /// The rewritten answer still to be written, and how much of it was.
    pending: Vec<u8>,
    written: usize,
}

impl<T: AsyncWrite + Unpin> ProblemIo<T> {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` as written when it is an automatic answer, queueing its replacement.
    fn intercept(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        let replacement = rewrite(buf)?;
        self.pending = replacement;
        self.written = 0;
        // Start writing now; what is left is written by the flush hyper does next.
        Some(match self.drain(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ProblemIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ProblemIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(done) = self.intercept(cx, buf) {
            return done;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (non_empty.next(), non_empty.next())
            && let Some(done) = self.intercept(cx, only)
        {
            return done;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The problem+json replacement of `bytes` when they are exactly one of hyper's automatic
/// answers: a `400`, `414` or `431` head with `content-length: 0` and no header besides
/// `date` and `connection`, and nothing after it. Answers from the router never look like
/// that: every error answer that passed [`super::edge`] has a problem+json body.
fn rewrite(bytes: &[u8]) -> Option<Vec<u8>> {
    if !bytes.starts_with(b"HTTP/1.") || !bytes.ends_with(b"\r\n\r\n") {
        return None;
    }
    let head = std::str::from_utf8(&bytes[..bytes.len() - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line.get(9..12)?.parse().ok()?;
    if !matches!(status, 400 | 414 | 431) {
        return None;
    }
    let mut date = None;
    let mut empty = false;
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" if value == "0" => empty = true,
            "date" => date = Some(value),
            "connection" => {}
            _ => return None,
        }
    }
    if !empty {
        return None;
    }
    let status = StatusCode::from_u16(status).ok()?;
    let problem = match status {
        StatusCode::URI_TOO_LONG => Problem::new(
            status,
            "uri_too_long",
            format!(
                "the request target is too long; at most {} bytes are accepted",
                super::MAX_URI_BYTES
            ),
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Problem::new(
            status,
            "headers_too_large",
            format!(
                "the request headers are too large; at most {} bytes are accepted",
                super::MAX_HEADER_BYTES
            ),
        ),
        _ => Problem::bad_request(
            "malformed_request",
            "the request is not valid HTTP/1.1 (request line or headers)",
        ),
    };
    let body = serde_json::to_vec(&problem.to_json()).ok()?;
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    if let Some(date) = date {
        out.push_str("date: ");
        out.push_str(date);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_automatic_answers() {
        let auto = b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\ndate: Sat, 21 Nov 2026 10:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite(auto).unwrap()).unwrap();
        assert!(out.starts_with("HTTP/1.1 414 URI Too Long\r\n"), "{out}");
        assert!(out.contains("content-type: application/problem+json\r\n"));
        assert!(out.contains("date: Sat, 21 Nov 2026 10:00:00 GMT\r\n"));
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let doc: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(doc["code"], "uri_too_long");

        for not_auto in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            b"{\"a\":1}",
        ] {
            assert!(rewrite(not_auto).is_none(), "{not_auto:?}");
        }
    }
}
