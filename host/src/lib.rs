//! segs: the Smart Energy Grid stream host.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map.

pub mod api;
pub mod app;
pub mod billing;
pub mod bus;
pub mod config;
pub mod crash;
pub mod dedupe;
pub mod health;
pub mod ingest;
pub mod json_scan;
pub mod live;
pub mod messages;
pub mod metrics;
pub mod pipeline;
pub mod plugins;
pub mod reading;
pub mod shared;
pub mod simulator;
pub mod store;
pub mod time;
pub mod windows;
