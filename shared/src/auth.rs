//! JWT authentication: HS256 tokens carrying the user id (`sub`) and global roles.
//!
//! Global roles are `service` (application back ends: may act for any user) and `admin`
//! (operators). Per-project roles live in Redis (see `membership`). The `Caller` extractor
//! turns an `Authorization: Bearer` header into a verified identity or a 401 problem.

use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::problem::{Problem, clip};
use crate::state::AppState;

/// A global role carried in the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GlobalRole {
    Service,
    Admin,
}

impl std::str::FromStr for GlobalRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "service" => Ok(GlobalRole::Service),
            "admin" => Ok(GlobalRole::Admin),
            _ => Err(format!("unknown role {s:?} (service or admin)")),
        }
    }
}

/// The claims inkwire reads and writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub roles: Vec<GlobalRole>,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub roles: Vec<GlobalRole>,
    /// Unix time at which the token stops being valid.
    pub expires_at: u64,
}

impl Caller {
    pub fn is_service(&self) -> bool {
        self.roles.contains(&GlobalRole::Service)
    }
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&GlobalRole::Admin)
    }
    /// Service and admin callers may act across projects and users.
    pub fn is_privileged(&self) -> bool {
        self.is_service() || self.is_admin()
    }
}

/// Signing and verification keys for the configured secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

/// Why a token was refused. The messages are safe to show to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    /// `nbf` (not before) is still in the future.
    #[error("token not yet valid")]
    NotYetValid,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    /// A claim is missing or has a value inkwire does not accept; the text names the claim.
    #[error("invalid token: {0}")]
    Claim(String),
}

impl From<AuthError> for Problem {
    fn from(e: AuthError) -> Problem {
        Problem::unauthorized(e.to_string())
    }
}

impl JwtKeys {
    pub fn hs256(secret: &str) -> JwtKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
        }
    }

    /// Signs a token for `user_id` with `roles`, valid for `ttl`.
    pub fn issue(&self, user_id: &str, roles: &[GlobalRole], ttl: Duration) -> String {
        let now = unix_now();
        self.sign(&Claims {
            sub: user_id.to_string(),
            roles: roles.to_vec(),
            exp: now + ttl.as_secs(),
            iat: now,
        })
    }

    /// Signs arbitrary claims (tests use this for expired tokens and odd claims).
    pub fn sign(&self, claims: &impl Serialize) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Verifies a token and returns the caller it names. The signature, `exp` and `nbf` are
    /// checked by `jsonwebtoken`; the claims are then read one by one so that an error names
    /// the claim at fault.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.decoding,
            &self.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
            ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not allowed"),
            // Also when present but not of the right type: the library does not tell apart.
            ErrorKind::MissingRequiredClaim(claim) => AuthError::Claim(format!(
                "missing claim {:?}{}",
                clip(claim, 32),
                match claim.as_str() {
                    "exp" => " (expiry, seconds since 1970)",
                    "sub" => " (the user id, a string)",
                    _ => "",
                }
            )),
            ErrorKind::InvalidClaimFormat(claim) => AuthError::Claim(format!(
                "claim {:?} must be a number of seconds since 1970",
                clip(claim, 32)
            )),
            ErrorKind::Json(_) => AuthError::Invalid("the payload is not a JSON object"),
            _ => AuthError::Invalid("malformed"),
        })?;
        caller_from_claims(&data.claims)
    }
}

/// The caller named by verified claims; an error names the claim at fault.
fn caller_from_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
) -> Result<Caller, AuthError> {
    use serde_json::Value;
    let user_id = match claims.get("sub") {
        Some(Value::String(s)) if crate::membership::is_valid_id(s) => s.clone(),
        Some(Value::String(_)) => {
            return Err(AuthError::Claim(
                "claim \"sub\" is not a valid user id (1-64 letters, digits, '_' or '-')".into(),
            ));
        }
        _ => return Err(AuthError::Claim("claim \"sub\" must be a string".into())),
    };
    let roles = match claims.get("roles") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(r) => r.parse::<GlobalRole>().map_err(|_| {
                    AuthError::Claim(format!(
                        "claim \"roles\" has unknown role {:?} (service or admin)",
                        clip(r, 32)
                    ))
                }),
                _ => Err(AuthError::Claim(
                    "claim \"roles\" must be a list of strings".into(),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(AuthError::Claim(
                "claim \"roles\" must be a list of strings".into(),
            ));
        }
    };
    // `exp` was checked to be a whole number by the library.
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    Ok(Caller {
        user_id,
        roles,
        expires_at,
    })
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Extracts the bearer token from an `Authorization` header value.
pub fn bearer_token(parts: &Parts) -> Result<&str, AuthError> {
    let value = parts
        .headers
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Invalid("authorization header is not ASCII"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthError::Invalid("expected 'Bearer <token>'"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Invalid("expected 'Bearer <token>'"));
    }
    Ok(token.trim())
}

impl<S> FromRequestParts<S> for Caller
where
    S: Send + Sync,
    AppState: FromRef<S>,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let token = bearer_token(parts)?;
        Ok(AppState::from_ref(state).jwt.verify(token)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_failures() {
        let keys = JwtKeys::hs256("0123456789abcdef0123");
        let t = keys.issue("u-1", &[GlobalRole::Admin], Duration::from_secs(60));
        let c = keys.verify(&t).unwrap();
        assert_eq!(c.user_id, "u-1");
        assert!(c.is_admin() && !c.is_service());

        let other = JwtKeys::hs256("another-secret-entirely");
        assert_eq!(other.verify(&t), Err(AuthError::Invalid("bad signature")));

        let expired = keys.sign(&Claims {
            sub: "u-1".into(),
            roles: vec![],
            exp: unix_now() - 3600,
            iat: unix_now() - 7200,
        });
        assert_eq!(keys.verify(&expired), Err(AuthError::Expired));
        assert!(matches!(
            keys.verify("not.a.jwt"),
            Err(AuthError::Invalid(_))
        ));

        let bad_sub = keys.issue("u.1>", &[], Duration::from_secs(60));
        assert!(keys.verify(&bad_sub).is_err());
    }

    fn claim_error(keys: &JwtKeys, claims: serde_json::Value) -> String {
        match keys.verify(&keys.sign(&claims)) {
            Err(e) => e.to_string(),
            Ok(c) => panic!("accepted {claims}: {c:?}"),
        }
    }

    #[test]
    fn nbf_is_honoured() {
        let keys = JwtKeys::hs256("0123456789abcdef0123");
        let now = unix_now();
        let later = serde_json::json!({"sub": "u-1", "exp": now + 3600, "nbf": now + 600});
        assert_eq!(keys.verify(&keys.sign(&later)), Err(AuthError::NotYetValid));
        assert_eq!(AuthError::NotYetValid.to_string(), "token not yet valid");
        // Within the leeway, and in the past: valid.
        for nbf in [now + 2, now - 600] {
            let ok = serde_json::json!({"sub": "u-1", "exp": now + 3600, "nbf": nbf});
            assert_eq!(keys.verify(&keys.sign(&ok)).unwrap().user_id, "u-1");
        }
        let bad = serde_json::json!({"sub": "u-1", "exp": now + 3600, "nbf": "soon"});
        assert!(claim_error(&keys, bad).contains("\"nbf\""));
    }

    #[test]
    fn claim_errors_name_the_claim() {
        let keys = JwtKeys::hs256("0123456789abcdef0123");
        let exp = unix_now() + 3600;
        let cases = [
            (
                serde_json::json!({"sub": "u-1", "exp": exp, "roles": ["root"]}),
                "invalid token: claim \"roles\" has unknown role \"root\" (service or admin)",
            ),
            (
                serde_json::json!({"sub": "u-1", "exp": exp, "roles": ["admin", 7]}),
                "invalid token: claim \"roles\" must be a list of strings",
            ),
            (
                serde_json::json!({"sub": "u-1", "exp": exp, "roles": "admin"}),
                "invalid token: claim \"roles\" must be a list of strings",
            ),
            (
                serde_json::json!({"sub": "u-1"}),
                "invalid token: missing claim \"exp\" (expiry, seconds since 1970)",
            ),
            (
                serde_json::json!({"exp": exp}),
                "invalid token: missing claim \"sub\" (the user id, a string)",
            ),
            (
                serde_json::json!({"sub": 42, "exp": exp}),
                "invalid token: missing claim \"sub\" (the user id, a string)",
            ),
            (
                serde_json::json!({"sub": "u.1>", "exp": exp}),
                "invalid token: claim \"sub\" is not a valid user id (1-64 letters, digits, '_' or '-')",
            ),
        ];
        for (claims, expected) in cases {
            assert_eq!(claim_error(&keys, claims.clone()), expected, "{claims}");
        }
        // A huge unknown role is not echoed whole.
        let long = "r".repeat(10_000);
        let e = claim_error(
            &keys,
            serde_json::json!({"sub": "u-1", "exp": exp, "roles": [long]}),
        );
        assert!(e.len() < 200, "{e}");
        // Known roles still work, and null means none.
        let ok = serde_json::json!({"sub": "u-1", "exp": exp, "roles": ["service", "admin"]});
        let c = keys.verify(&keys.sign(&ok)).unwrap();
        assert!(c.is_service() && c.is_admin() && c.expires_at == exp);
        let none = serde_json::json!({"sub": "u-1", "exp": exp, "roles": null});
        assert!(keys.verify(&keys.sign(&none)).unwrap().roles.is_empty());
    }
}
