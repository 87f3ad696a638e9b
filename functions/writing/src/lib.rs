//! Writing sessions: the HTTP API, the tracker (a durable consumer of `events.writing.>`),
//! its state machine and metrics, and the scheduler for time-driven transitions.

pub mod api;
pub mod days;
pub mod input;
pub mod replay;
pub mod scheduler;
pub mod session;
pub mod state_machine;
pub mod store;
pub mod tracker;
