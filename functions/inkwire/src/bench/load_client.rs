//! A lean HTTP/1.1 load generator: one kept-alive connection per worker, requests built from
//! pre-made header values. It costs the machine as little as possible, so the figures
//! measure the server rather than the client (both share this machine's two cores).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper_util::rt::TokioIo;

pub struct LoadClient {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
    auth: HeaderValue,
}

impl LoadClient {
    /// Connects to `addr` (host:port) with a bearer token.
    pub async fn connect(addr: &str, token: &str) -> anyhow::Result<LoadClient> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(LoadClient {
            sender,
            authority: addr.to_string(),
            auth: HeaderValue::from_str(&format!("Bearer {token}"))?,
        })
    }

    /// POSTs a JSON body to `path` and returns the status and body.
    pub async fn post_json(&mut self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, Bytes)> {
        self.sender.ready().await?;
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(Full::new(Bytes::from(body)))?;
        let res = self.sender.send_request(req).await?;
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}
