//! The events API: publish one event or a batch, query a category by time range, read stream
//! statistics, and manage project membership and document registration.
//!
//! Every route except health needs a bearer token. See the README's "Events API" section for
//! the request and response shapes.

pub mod access;
pub mod members;
pub mod publish;
pub mod query;

use axum::Router;
use axum::routing::{get, post, put};
use inkwire_shared::AppState;

/// The events API routes (without health routes and fallbacks; see [`app`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/realtime/events/publish", post(publish::publish_one))
        .route("/api/realtime/events/batch", post(publish::publish_batch))
        .route("/api/realtime/events/{category}", get(query::range))
        .route("/api/realtime/events/{category}/info", get(query::info))
        .route("/api/projects/{project_id}/members", get(members::list))
        .route(
            "/api/projects/{project_id}/members/{user_id}",
            put(members::put_member).delete(members::delete_member),
        )
        .route(
            "/api/projects/{project_id}/documents/{document_id}",
            put(members::put_document),
        )
}

/// The complete events service: API, health routes and problem+json fallbacks.
pub fn app(state: AppState) -> Router {
    inkwire_shared::http::with_fallbacks(routes().merge(inkwire_shared::http::health_routes()))
        .with_state(state)
}
