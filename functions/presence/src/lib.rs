//! User presence (issue 12): online / away / offline per user, from the connections on every
//! relay instance (several tabs and devices count apart; online while any lives), away after
//! an idle time or when the client says so, offline with `lastSeen` after the last closes;
//! the devices clients report; who of a chat room is online now. A change goes as a
//! `presence_update` to the `project:` and `room:` channels of the user's projects and rooms,
//! whose subscribers the relay checks, so only those who share one with the user get it.
//!
//! The relay does not call this crate: it reports over NATS (`shared::user_presence`, stream
//! PRESENCE), and the worker here applies the reports, sweeps instances whose heartbeat
//! lapsed (a relay killed with SIGKILL takes its users offline within the TTL) and turns
//! idle users away. The API reads and sets the state in Redis.

pub mod api;
pub mod config;
pub mod store;
pub mod worker;

pub use api::{PresenceApi, routes};
pub use config::PresenceConfig;
pub use worker::{PresenceWorker, run_worker};
