//! Notifications: the HTTP API (send, inbox, read marks, preferences, templates, delivery
//! log), the in-app inbox in Redis with exact unread counts, the notifier that decides per
//! recipient and channel (preferences, priority routing, quiet hours, auto-mute, digests), the
//! scheduler for held, digested and scheduled deliveries, and the providers that deliver
//! (email over SMTP, SMS and push through AWS SNS).

pub mod api;
pub mod config;
pub mod delivery;
pub mod delivery_job;
pub mod delivery_log;
pub mod devices;
pub mod digest_schedule;
pub mod digests;
pub mod inbox;
pub mod model;
pub mod mute;
pub mod notifier;
pub mod plan;
pub mod preferences;
pub mod providers;
pub mod quiet_hours;
pub mod routing;
pub mod rules;
pub mod scheduler;
pub mod send;
pub mod templates;
#[cfg(test)]
mod zone_testing;
