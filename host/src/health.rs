//! Health: what each stage is doing, for `/healthz` and `/readyz` — running,
//! or retrying (since when, how many attempts, the last error) — and when it
//! last made progress.
//!
//! Stages report here from their retry loops ([`StageHealth`] keyed by stage
//! name); the API adds the dependencies' checks (bus, store, Redis) at
//! request time. A stage stuck retrying a store error is visible here, and
//! makes the process not ready.
//!
//! Must not: decide anything for the stages (retries are theirs).

use std::collections::BTreeMap;

use parking_lot::Mutex;
use serde::Serialize;

/// Every stage's state, by stage name.
#[derive(Debug, Default)]
pub struct Health {
    stages: Mutex<BTreeMap<&'static str, StageHealth>>,
}

/// One stage's state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageHealth {
    /// `running` or `retrying`.
    pub state: &'static str,
    /// What is being retried (`apply a stage's effects`, `poll`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrying: Option<&'static str>,
    /// When the state began (RFC 3339).
    #[serde(with = "crate::store::rfc3339_ms")]
    pub since: i64,
    /// Failed attempts in a row.
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the stage last handled records (RFC 3339), if it has.
    #[serde(
        with = "crate::store::rfc3339_ms::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_progress: Option<i64>,
}

impl StageHealth {
    fn running(now: i64) -> StageHealth {
        StageHealth {
            state: "running",
            retrying: None,
            since: now,
            attempts: 0,
            last_error: None,
            last_progress: None,
        }
    }
}

impl Health {
    /// A stage starts, running.
    pub fn started(&self, stage: &'static str) {
        let now = crate::time::now_ms();
        self.stages
            .lock()
            .entry(stage)
            .or_insert_with(|| StageHealth::running(now));
    }

    /// `stage` failed doing `what` and will try again.
    pub fn failed(&self, stage: &'static str, what: &'static str, error: &str) {
        let now = crate::time::now_ms();
        let mut stages = self.stages.lock();
        let s = stages
            .entry(stage)
            .or_insert_with(|| StageHealth::running(now));
        if s.retrying != Some(what) {
            s.state = "retrying";
            s.retrying = Some(what);
            s.since = now;
            s.attempts = 0;
        }
        s.attempts += 1;
        s.last_error = Some(error.to_owned());
    }

    /// `stage` succeeded doing `what`: running again if that was what it
    /// was retrying.
    pub fn succeeded(&self, stage: &'static str, what: &'static str) {
        let mut stages = self.stages.lock();
        if let Some(s) = stages.get_mut(stage) {
            if s.retrying == Some(what) {
                let progress = s.last_progress;
                *s = StageHealth::running(crate::time::now_ms());
                s.last_progress = progress;
            }
        }
    }

    /// `stage` handled records.
    pub fn progressed(&self, stage: &'static str) {
        let now = crate::time::now_ms();
        let mut stages = self.stages.lock();
        let s = stages
            .entry(stage)
            .or_insert_with(|| StageHealth::running(now));
        s.last_progress = Some(now);
    }

    /// Every stage, by name.
    pub fn snapshot(&self) -> BTreeMap<&'static str, StageHealth> {
        self.stages.lock().clone()
    }

    /// Whether some stage is retrying.
    pub fn any_retrying(&self) -> bool {
        self.stages.lock().values().any(|s| s.retrying.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_retrying_shows_until_that_thing_succeeds() {
        let h = Health::default();
        h.started("alerts");
        assert!(!h.any_retrying());
        h.failed("alerts", "apply", "database is down");
        h.failed("alerts", "apply", "database is still down");
        let s = &h.snapshot()["alerts"];
        assert_eq!(
            (s.state, s.retrying, s.attempts),
            ("retrying", Some("apply"), 2)
        );
        assert_eq!(s.last_error.as_deref(), Some("database is still down"));
        assert!(h.any_retrying());
        // Something else succeeding does not hide it.
        h.succeeded("alerts", "poll");
        assert!(h.any_retrying());
        h.succeeded("alerts", "apply");
        assert!(!h.any_retrying());
        assert_eq!(h.snapshot()["alerts"].state, "running");
    }
}
