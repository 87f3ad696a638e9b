//! The events API: publish one event or a batch, query a category by time range, read stream
//! statistics, manage projects (members, documents) and the dead-letter queue.
//!
//! Every route except health needs a bearer token. See the README's "Events API" section for
//! the request and response shapes.

pub mod access;
pub mod dlq;
pub mod members;
pub mod publish;
pub mod query;

use axum::Router;
use axum::routing::{delete, get, post, put};
use inkwire_shared::AppState;

/// The events API routes (without health routes and fallbacks; see [`app`]).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/realtime/events/publish", post(publish::publish_one))
        .route("/api/realtime/events/batch", post(publish::publish_batch))
        .route("/api/realtime/events/{category}", get(query::range))
        .route("/api/realtime/events/{category}/info", get(query::info))
        .route("/api/realtime/dlq", get(dlq::list))
        .route("/api/realtime/dlq/{seq}", delete(dlq::discard))
        .route("/api/realtime/dlq/{seq}/replay", post(dlq::replay))
        .route("/api/projects", get(members::my_projects))
        .route("/api/projects/{project_id}", get(members::project))
        .route("/api/projects/{project_id}/members", get(members::list))
        .route(
            "/api/projects/{project_id}/members/{user_id}",
            put(members::put_member).delete(members::delete_member),
        )
        .route(
            "/api/projects/{project_id}/documents",
            get(members::list_documents),
        )
        .route(
            "/api/projects/{project_id}/documents/{document_id}",
            put(members::put_document)
                .get(members::get_document)
                .delete(members::delete_document),
        )
}

/// The complete events service: API and health routes behind the shared edge (problem+json
/// for every error, limits, panics answered 500).
pub fn app(state: AppState) -> Router {
    inkwire_shared::http::edge(routes().merge(inkwire_shared::http::health_routes()))
        .with_state(state)
}
