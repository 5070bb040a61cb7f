//! segs: the Smart Energy Grid stream host.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map.

pub mod reading;
pub mod time;
pub mod plugins;
pub mod config;
pub mod ingest;
pub mod windows;
pub mod bus;
pub mod dedupe;
pub mod store;
pub mod pipeline;
pub mod api;
pub mod simulator;
pub mod app;
