//! Real-time analytics (issue 13): a durable consumer over every category stream counts
//! events per type, per project and overall in short buckets (5 s by default) rolled up to
//! 1 min, 1 h and 1 day, adds the words the writing tracker reports per project and the
//! sales per book per day; counts are exact under redelivery (one batched script per fetched
//! batch, applied once per message) and rebuilt by `inkwire replay analytics`. At every
//! bucket boundary, once the consumers have applied everything stored before it, one
//! instance pushes the bucket's changed series to `category:analytics` and to each changed
//! project's channel, then hands the bucket to [`hooks::on_bucket_closed`] (the seam for
//! thresholds and anomaly detection: [`thresholds`] evaluates every threshold at each
//! bucket, [`anomalies`] puts every closed minute to the detector of [`anomaly`]).

pub mod anomalies;
pub mod anomaly;
pub mod api;
pub mod closer;
pub mod config;
pub mod counted;
pub mod hooks;
pub mod replay;
pub mod store;
pub mod threshold_rule;
pub mod thresholds;
pub mod worker;

pub use api::{AnalyticsApi, routes};
pub use config::AnalyticsConfig;
pub use worker::run_worker;
