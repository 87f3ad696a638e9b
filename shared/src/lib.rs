//! The library every inkwire function uses: the event envelope and its JSON Schemas, subject
//! and stream names, JetStream provisioning and publishing, the durable consumer runner,
//! Redis helpers, authentication and project membership, and the HTTP glue that serves one
//! axum `Router` on AWS Lambda or on a local address.

pub mod access_changes;
pub mod allocator;
pub mod auth;
pub mod channels;
pub mod config;
pub mod consumer;
pub mod due_queue;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod idempotent_requests;
pub mod jetstream;
pub mod local_servers;
pub mod membership;
pub mod origins;
pub mod problem;
#[cfg(feature = "providers")]
pub mod providers;
pub mod publish_rules;
pub mod redis_store;
pub mod schema;
pub mod state;
pub mod subjects;
pub mod telemetry;
pub mod user_presence;
pub mod websocket;

pub use state::AppState;
