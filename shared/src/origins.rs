//! Which browser origins may talk to inkwire: the `INKWIRE_ALLOWED_ORIGINS` allow-list, the
//! same-origin rule, the WebSocket upgrade check and the CORS layer built from the same list.
//!
//! Browsers attach cookies to WebSocket upgrades from any site, and the relay accepts a token
//! in a cookie; without an `Origin` check any page could open a socket as the signed-in user
//! (cross-site WebSocket hijacking). So an upgrade (or any request) carrying an `Origin` is
//! allowed only when that origin is listed or equals the request's own `Host`. Requests
//! without `Origin` come from non-browser clients, which cannot be made to carry somebody
//! else's cookie, and pass.
//!
//! Entries are `scheme://host[:port]`; the port may be `*` (`http://localhost:*`). Scheme and
//! host compare case-insensitively and a scheme's default port equals no port. There is no
//! `*` for every origin and no `null`: both would reopen the hole this closes.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::problem::Problem;

/// The port part of an allowed origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortRule {
    /// No port written, or the scheme's default port.
    Default,
    Exact(u16),
    /// `:*`: any port (local development servers move around).
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct OriginRule {
    scheme: String,
    host: String,
    port: PortRule,
}

/// A parsed origin (`scheme`, `host`, and the port when it is not the scheme's default).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

fn valid_scheme(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
}

fn valid_host(h: &str) -> bool {
    if let Some(inner) = h.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Splits `host[:port]` (IPv6 hosts in brackets) into host and the port text.
fn split_authority(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        match authority.find(']') {
            Some(end) => {
                let (host, rest) = authority.split_at(end + 1);
                (host, rest.strip_prefix(':'))
            }
            None => (authority, None),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    }
}

/// Parses `scheme://host[:port]` where the port may be `*` when `wildcard` is set.
fn parse_parts(text: &str, wildcard: bool) -> Result<(String, String, PortRule), String> {
    let (scheme, authority) = text
        .split_once("://")
        .ok_or_else(|| format!("{text:?} is not scheme://host[:port]"))?;
    let scheme = scheme.to_ascii_lowercase();
    if !valid_scheme(&scheme) {
        return Err(format!("{text:?} has an invalid scheme"));
    }
    if authority.contains(['/', '?', '#', '@']) {
        return Err(format!(
            "{text:?} must be scheme://host[:port], without path, query or user"
        ));
    }
    let (host, port) = split_authority(authority);
    let host = host.to_ascii_lowercase();
    if !valid_host(&host) {
        return Err(format!("{text:?} has an invalid host"));
    }
    let port = match port {
        None => PortRule::Default,
        Some("*") if wildcard => PortRule::Any,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => {
                if default_port(&scheme) == Some(n) {
                    PortRule::Default
                } else {
                    PortRule::Exact(n)
                }
            }
            _ => return Err(format!("{text:?} has an invalid port")),
        },
    };
    Ok((scheme, host, port))
}

impl Origin {
    fn parse(text: &str) -> Option<Origin> {
        let (scheme, host, port) = parse_parts(text, false).ok()?;
        Some(Origin {
            scheme,
            host,
            port: match port {
                PortRule::Exact(n) => Some(n),
                _ => None,
            },
        })
    }

    /// Whether this origin names the server the request was sent to (`Host`). The scheme a
    /// client used is not visible behind a TLS-terminating proxy, so only host and port are
    /// compared; a `Host` without a port matches the origin's default port.
    fn is_host(&self, host_header: &str) -> bool {
        let (host, port) = split_authority(host_header.trim());
        if !host.eq_ignore_ascii_case(&self.host) {
            return false;
        }
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if default_port(&self.scheme) == Some(n) => None,
                Ok(n) => Some(n),
                Err(_) => return false,
            },
        };
        port == self.port
    }
}

impl OriginRule {
    fn matches(&self, origin: &Origin) -> bool {
        self.scheme == origin.scheme
            && self.host == origin.host
            && match self.port {
                PortRule::Default => origin.port.is_none(),
                PortRule::Exact(n) => origin.port == Some(n),
                PortRule::Any => true,
            }
    }
}

/// The allow-list of browser origins (`INKWIRE_ALLOWED_ORIGINS`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    rules: Vec<OriginRule>,
}

/// Why a request's `Origin` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("origin {origin:?} is not allowed (INKWIRE_ALLOWED_ORIGINS)")]
pub struct OriginNotAllowed {
    /// The refused origin, shortened so that an error never echoes a large value.
    pub origin: String,
}

impl From<OriginNotAllowed> for Problem {
    fn from(e: OriginNotAllowed) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, "origin_not_allowed", e.to_string())
    }
}

impl AllowedOrigins {
    /// Parses a comma-separated list; empty entries are ignored, any bad entry is an error.
    pub fn parse(list: &str) -> Result<AllowedOrigins, String> {
        let mut rules = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" || entry.eq_ignore_ascii_case("null") {
                return Err(format!(
                    "{entry:?} is not allowed: list each origin (scheme://host[:port])"
                ));
            }
            let (scheme, host, port) = parse_parts(entry, true)?;
            let rule = OriginRule { scheme, host, port };
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        Ok(AllowedOrigins { rules })
    }

    /// What `inkwire dev` allows: `localhost`, `127.0.0.1` and `[::1]` on any port, over
    /// http and https (pages served by local development servers).
    pub fn local_development() -> AllowedOrigins {
        AllowedOrigins::parse(
            "http://localhost:*, https://localhost:*, http://127.0.0.1:*, https://127.0.0.1:*, \
             http://[::1]:*, https://[::1]:*",
        )
        .expect("literal origins parse")
    }

    /// Adds the entries of `other` that are not listed yet.
    pub fn extend(&mut self, other: AllowedOrigins) {
        for rule in other.rules {
            if !self.rules.contains(&rule) {
                self.rules.push(rule);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `origin` (an `Origin` header value) is on the list.
    pub fn allows(&self, origin: &str) -> bool {
        match Origin::parse(origin) {
            Some(o) => self.rules.iter().any(|r| r.matches(&o)),
            None => false,
        }
    }

    /// Whether a request with `origin` and `host` headers may be served: listed, or same
    /// origin.
    pub fn allows_request(&self, origin: &HeaderValue, host: Option<&HeaderValue>) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let Some(parsed) = Origin::parse(origin) else {
            return false;
        };
        if let Some(host) = host.and_then(|h| h.to_str().ok())
            && parsed.is_host(host)
        {
            return true;
        }
        self.rules.iter().any(|r| r.matches(&parsed))
    }

    /// The check of a WebSocket upgrade (and of anything else that must not be driven by
    /// another site): no `Origin` passes, an allowed or same origin passes, anything else is
    /// refused.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), OriginNotAllowed> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        if self.allows_request(origin, headers.get(header::HOST)) {
            return Ok(());
        }
        let shown = String::from_utf8_lossy(origin.as_bytes());
        Err(OriginNotAllowed {
            origin: shown.chars().take(100).collect(),
        })
    }
}

/// How long browsers may cache a preflight answer.
pub const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);

/// CORS for the HTTP API with the allow-list: preflights are answered for the methods and
/// request headers the API uses; an origin that is neither listed nor the request's own host
/// gets no CORS headers, so the browser withholds the answer from the page. No credentials:
/// the HTTP API reads tokens from `Authorization`, never from cookies. `If-Match` /
/// `If-None-Match` and `ETag` are what the client session store's optimistic concurrency
/// needs from a page.
pub fn cors_layer(origins: &AllowedOrigins) -> CorsLayer {
    let origins = Arc::new(origins.clone());
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, parts| {
            origins.allows_request(origin, parts.headers.get(header::HOST))
        }))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("idempotency-key"),
            header::IF_MATCH,
            header::IF_NONE_MATCH,
        ])
        .expose_headers([header::ETAG])
        .max_age(PREFLIGHT_MAX_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn parses_and_matches_entries() {
        let list = AllowedOrigins::parse(
            " https://App.Example.com , http://localhost:*, https://api.example.com:443,, http://10.0.0.1:8080",
        )
        .unwrap();
        assert!(list.allows("https://app.example.com"));
        assert!(list.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(!list.allows("http://app.example.com"));
        assert!(!list.allows("https://app.example.com:8443"));
        assert!(!list.allows("https://evil.example.com"));
        assert!(!list.allows("https://app.example.com.evil.net"));
        assert!(list.allows("http://localhost:5173"));
        assert!(list.allows("http://localhost"));
        assert!(!list.allows("https://localhost:5173"));
        assert!(list.allows("https://api.example.com"));
        assert!(list.allows("http://10.0.0.1:8080"));
        assert!(!list.allows("http://10.0.0.1:8081"));
        assert!(!list.allows("null"));
        assert!(!list.allows("https://app.example.com/"));
        assert!(!list.allows(""));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "*",
            "null",
            "example.com",
            "https://",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://user@app.example.com",
            "https://app.example.com:0",
            "https://app.example.com:99999",
            "https://app.example.com:80a",
            "https://exa mple.com",
            "https://a..b",
            "1http://x",
            "https://[zz]",
        ] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(AllowedOrigins::parse("").unwrap().is_empty());
        assert!(
            AllowedOrigins::parse("https://x.example:*")
                .unwrap()
                .allows("https://x.example:1")
        );
    }

    #[test]
    fn same_origin_passes_without_a_list() {
        let none = AllowedOrigins::default();
        let ok = |origin: &str, host: &str| none.allows_request(&hv(origin), Some(&hv(host)));
        assert!(ok("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(ok("https://relay.example.com", "relay.example.com"));
        assert!(ok("https://relay.example.com", "relay.example.com:443"));
        assert!(ok("http://[::1]:9000", "[::1]:9000"));
        assert!(!ok("http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!ok("https://evil.example", "relay.example.com"));
        assert!(!ok("https://relay.example.com:8443", "relay.example.com"));
        assert!(!ok("null", "relay.example.com"));
        assert!(!none.allows_request(&hv("http://a.example"), None));
    }

    #[test]
    fn check_lets_non_browsers_through_and_shortens_the_echo() {
        let list = AllowedOrigins::parse("https://app.example.com").unwrap();
        let mut headers = HeaderMap::new();
        assert!(list.check(&headers).is_ok());
        headers.insert(header::HOST, hv("relay.example.com"));
        headers.insert(header::ORIGIN, hv("https://app.example.com"));
        assert!(list.check(&headers).is_ok());
        let long = format!("https://{}.example", "a".repeat(500));
        headers.insert(header::ORIGIN, hv(&long));
        let e = list.check(&headers).unwrap_err();
        assert_eq!(e.origin.len(), 100);
        assert_eq!(Problem::from(e).code, "origin_not_allowed");
    }

    #[test]
    fn local_development_covers_loopback_on_any_port() {
        let dev = AllowedOrigins::local_development();
        assert!(dev.allows("http://localhost:3000"));
        assert!(dev.allows("http://127.0.0.1:5173"));
        assert!(dev.allows("http://[::1]:8080"));
        assert!(!dev.allows("http://localhost.evil.example:3000"));
        let mut list = AllowedOrigins::parse("https://app.example.com").unwrap();
        list.extend(dev);
        assert!(list.allows("https://app.example.com") && list.allows("http://localhost:1"));
    }
}
