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

use crate::problem::Problem;
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
    #[error("invalid token: {0}")]
    Invalid(&'static str),
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

    /// Signs arbitrary claims (tests use this for expired tokens).
    pub fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Verifies a token and returns the caller it names.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not allowed"),
                ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing claim"),
                _ => AuthError::Invalid("malformed"),
            })?;
        let claims = data.claims;
        if !crate::membership::is_valid_id(&claims.sub) {
            return Err(AuthError::Invalid("subject is not a valid user id"));
        }
        Ok(Caller {
            user_id: claims.sub,
            roles: claims.roles,
            expires_at: claims.exp,
        })
    }
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
}
