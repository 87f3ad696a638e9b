//! Chat rooms (issue 12): rooms with participants (the Redis set the relay checks for
//! `room:{id}`), messages with one order per room, stored in the `CHAT` JetStream stream and
//! kept readable in Redis, idempotent sends, cursor-paginated history, edits and tombstones
//! of one's own messages, exact unread counts, read receipts and typing indicators, each
//! pushed live to `room:{id}`. Removing a participant is announced to every relay instance
//! (`shared::access_changes`), which drops that user's live `room:` subscriptions at once.

pub mod api;
pub mod store;

pub use api::{ChatApi, routes};
