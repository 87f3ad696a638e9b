//! The WebSocket handshake as every inkwire endpoint does it (the relay's `/ws/*` and
//! co-editing's `/ws/docs/{id}`): where a client's token may come from, and refused upgrades as
//! problem+json. One place, so the two endpoints cannot drift apart in who they let in.

use std::collections::HashMap;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::problem::Problem;

/// Cookie that may carry the token for browsers (set it HttpOnly from your app's domain).
pub const TOKEN_COOKIE: &str = "inkwire_token";
/// Prefix of a `Sec-WebSocket-Protocol` entry that carries the token.
pub const TOKEN_PROTOCOL_PREFIX: &str = "bearer.";

/// Finds the token: `?token=`, a `bearer.<jwt>` WebSocket subprotocol, the `inkwire_token`
/// cookie, or an `Authorization: Bearer` header, in that order. Also returns the subprotocol
/// entry it came from (a server that accepts it must echo a protocol the client offered).
pub fn find_token(
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Option<(String, Option<String>)> {
    if let Some(t) = query.get("token") {
        return Some((t.clone(), None));
    }
    for value in headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for entry in value.split(',').map(str::trim) {
            if let Some(t) = entry.strip_prefix(TOKEN_PROTOCOL_PREFIX) {
                return Some((t.to_string(), Some(entry.to_string())));
            }
        }
    }
    for value in headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for pair in value.split(';').map(str::trim) {
            if let Some(t) = pair
                .strip_prefix(TOKEN_COOKIE)
                .and_then(|r| r.strip_prefix('='))
            {
                return Some((t.to_string(), None));
            }
        }
    }
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| (token.trim().to_string(), None))
}

/// A refused upgrade as problem+json (axum's own rejections are plain text). Anything that
/// is not a WebSocket handshake is `426 upgrade_required`, with the `Upgrade` header RFC 9110
/// asks for (and the version RFC 6455 asks for when the version was wrong). `serves` says
/// what the path is for, e.g. "y-websocket connections".
pub fn upgrade_rejection(rejection: WebSocketUpgradeRejection, serves: &str) -> Response {
    use WebSocketUpgradeRejection as R;
    let problem = match rejection {
        R::MethodNotGet(_) | R::MethodNotConnect(_) => Problem::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "a WebSocket handshake is a GET request",
        ),
        R::WebSocketKeyHeaderMissing(_) => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_websocket_handshake",
            "the WebSocket handshake lacks Sec-WebSocket-Key",
        ),
        other => Problem::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!(
                "this path serves {serves} only ({}); connect with a WebSocket client \
                 (Upgrade: websocket, Sec-WebSocket-Version: 13)",
                other.body_text()
            ),
        ),
    };
    let upgrade = problem.status == StatusCode::UPGRADE_REQUIRED.as_u16();
    let mut res = problem.into_response();
    if upgrade {
        let h = res.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_sources() {
        let mut q = HashMap::new();
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "inkwire.v1, bearer.abc".parse().unwrap(),
        );
        assert_eq!(
            find_token(&q, &h),
            Some(("abc".into(), Some("bearer.abc".into())))
        );
        q.insert("token".into(), "qq".into());
        assert_eq!(find_token(&q, &h), Some(("qq".into(), None)));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=b; inkwire_token=cc".parse().unwrap());
        assert_eq!(find_token(&HashMap::new(), &h), Some(("cc".into(), None)));
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer  dd ".parse().unwrap());
        assert_eq!(find_token(&HashMap::new(), &h), Some(("dd".into(), None)));
        assert_eq!(find_token(&HashMap::new(), &HeaderMap::new()), None);
    }
}
