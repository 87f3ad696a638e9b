//! The client session store (issue 12): what a browser tab or app keeps across a page
//! reload — its state (any JSON, size-limited) and its preferences — under an id the client
//! chooses, several per user, each expiring after a sliding TTL that every read and write
//! extends. Writes are compare-and-set on a version (`ETag` / `If-Match`, `412` on a stale
//! one) in one Lua script. A change of preferences is pushed to the user's relay channel
//! `user:{id}`, so that the user's other sessions (tabs, devices) follow it.
//!
//! "Client sessions", not "sessions": the writing sessions of `functions/writing` are
//! another thing. The store is deliberately not event-sourced: see
//! `docs/adr/014-client-session-store.md`.

pub mod api;
pub mod config;
pub mod store;

pub use api::{ClientSessionsApi, routes};
pub use config::ClientSessionConfig;
