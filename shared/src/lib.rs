//! The library every inkwire function uses: the event envelope and its JSON Schemas, subject
//! and stream names, JetStream provisioning and publishing, the durable consumer runner,
//! Redis helpers, authentication and project membership, and the HTTP glue that serves one
//! axum `Router` on AWS Lambda or on a local address.

pub mod auth;
pub mod channels;
pub mod config;
pub mod consumer;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod jetstream;
pub mod local_servers;
pub mod membership;
pub mod problem;
pub mod redis_store;
pub mod schema;
pub mod state;
pub mod subjects;
pub mod telemetry;

pub use state::AppState;
