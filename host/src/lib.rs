//! segs: the Smart Energy Grid stream host.
//!
//! See `ARCHITECTURE.md` at the repository root for the code map.

pub mod reading;
pub mod time;
pub mod plugins;
pub mod config;
