//! The activity log (issue 12): what each user did — writing sessions started and ended,
//! edits, comments, chat messages, notifications read, workflow runs — built by durable
//! consumers of the streams those live in (one per source, applied once each by a
//! per-source high-water mark), kept for a retention period (30 days) that is enforced on
//! every write and by a leased sweep, and served newest first with cursors, and as
//! statistics per local day in the user's time zone. Entries hold ids, types and times only:
//! never a message's, comment's or notification's text.

pub mod api;
pub mod replay;
pub mod sources;
pub mod stats;
pub mod store;
pub mod worker;

pub use api::{ActivityApi, routes};
pub use worker::{ActivityConfig, run_worker};
