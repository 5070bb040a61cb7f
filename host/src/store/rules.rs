//! Storage semantics every backend shares, kept out of the SQL dialects: the
//! alert state machine (which moves are allowed, what an audit row says),
//! tariff id formatting, and "last entry wins" for regional windows and rule
//! state. (Window
//! merging, [`super::merge_duplicate_windows`], lives beside its row type.)
//! A backend runs the SQL; what the SQL is allowed to do is decided here.

use std::collections::HashMap;
use std::hash::Hash;

use super::{AlertRow, RegionalAggregate, Transition};
use crate::messages::AlertStatus;
use crate::time::format_rfc3339_ms;

// ---------------------------------------------------------- alert changes

/// A requested move of an alert's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AlertChange<'a> {
    /// active → acknowledged, by an operator.
    Acknowledge { by: &'a str },
    /// active | acknowledged → resolved.
    Resolve,
}

impl<'a> AlertChange<'a> {
    /// The status the alert ends in.
    pub(crate) fn target(self) -> AlertStatus {
        match self {
            AlertChange::Acknowledge { .. } => AlertStatus::Acknowledged,
            AlertChange::Resolve => AlertStatus::Resolved,
        }
    }

    /// The statuses the move may start from.
    pub(crate) fn allowed_from(self) -> &'static [AlertStatus] {
        match self {
            AlertChange::Acknowledge { .. } => &[AlertStatus::Active],
            AlertChange::Resolve => &[AlertStatus::Active, AlertStatus::Acknowledged],
        }
    }

    /// Decides the move for an alert currently stored as `current`: `None`
    /// when the backend should write it, or the final [`Transition`]
    /// (unchanged, refused) when nothing is to be written.
    pub(crate) fn check(self, current: &AlertRow) -> Option<Transition> {
        if current.status == self.target() {
            Some(Transition::Unchanged(current.clone()))
        } else if !self.allowed_from().contains(&current.status) {
            Some(Transition::Refused {
                status: current.status,
            })
        } else {
            None
        }
    }

    /// `audit_logs.actor`: who made the move, when known.
    pub(crate) fn actor(self) -> Option<&'a str> {
        match self {
            AlertChange::Acknowledge { by } => Some(by),
            AlertChange::Resolve => None,
        }
    }

    /// `audit_logs.action`: `alert.acknowledged` / `alert.resolved`.
    pub(crate) fn audit_action(self) -> String {
        format!("alert.{}", self.target())
    }

    /// `audit_logs.details`: `{"from", "to", "at"}`.
    pub(crate) fn audit_details(self, from: AlertStatus, at_ms: i64) -> serde_json::Value {
        serde_json::json!({
            "from": from,
            "to": self.target(),
            "at": format_rfc3339_ms(at_ms),
        })
    }
}

// ---------------------------------------------------------------- tariffs

/// `TRF-{PREFIX}-…` prefix of a region: upper-cased, every character that
/// is not an ASCII letter or digit replaced by '-'. Regions that map to the
/// same prefix share one id sequence (`tariff_id_sequences`).
pub(crate) fn tariff_prefix(region: &str) -> String {
    region
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The `n`th tariff id of a prefix: `TRF-{PREFIX}-{n:06}`.
pub(crate) fn tariff_id(prefix: &str, n: i64) -> String {
    format!("TRF-{prefix}-{n:06}")
}

// -------------------------------------------------------- regional windows

/// The entries of `items` to write when a key repeats (e.g. a regional
/// window's (region, window_start), a rule state's (rule, key)): only the
/// last one of each key, in input order — what writing them one after the
/// other would leave in the table. A backend that writes a batch in one
/// statement must not hand it a key twice.
pub(crate) fn last_entry_wins<'a, T, K: Hash + Eq>(
    items: &'a [T],
    key: impl Fn(&'a T) -> K,
) -> Vec<&'a T> {
    let mut last: HashMap<K, usize> = HashMap::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        last.insert(key(item), i);
    }
    items
        .iter()
        .enumerate()
        .filter(|(i, item)| last.get(&key(item)) == Some(i))
        .map(|(_, item)| item)
        .collect()
}

/// The key of a regional window: (region, window_start).
pub(crate) fn regional_key(a: &RegionalAggregate) -> (&str, i64) {
    (a.region.as_str(), a.window_start_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{AlertType, Severity};

    fn row(status: AlertStatus) -> AlertRow {
        AlertRow {
            id: uuid::Uuid::nil(),
            alert_type: AlertType::Anomaly,
            severity: Severity::High,
            region: None,
            meter_id: None,
            message: "m".into(),
            status,
            timestamp_ms: 0,
            acknowledged: false,
            acknowledged_by: None,
            acknowledged_at_ms: None,
            resolved_at_ms: None,
            metadata: serde_json::json!({}),
            created_at_ms: 0,
            updated_at_ms: 0,
            rule: None,
        }
    }

    #[test]
    fn alert_status_only_moves_forward() {
        use AlertStatus::*;
        let ack = AlertChange::Acknowledge { by: "op" };
        let res = AlertChange::Resolve;
        assert_eq!(ack.check(&row(Active)), None);
        assert!(matches!(
            ack.check(&row(Acknowledged)),
            Some(Transition::Unchanged(_))
        ));
        assert_eq!(
            ack.check(&row(Resolved)),
            Some(Transition::Refused { status: Resolved })
        );
        assert_eq!(res.check(&row(Active)), None);
        assert_eq!(res.check(&row(Acknowledged)), None);
        assert!(matches!(
            res.check(&row(Resolved)),
            Some(Transition::Unchanged(_))
        ));
        assert_eq!(ack.actor(), Some("op"));
        assert_eq!(res.actor(), None);
        assert_eq!(ack.audit_action(), "alert.acknowledged");
        assert_eq!(res.audit_action(), "alert.resolved");
        assert_eq!(
            res.audit_details(Acknowledged, 2_000),
            serde_json::json!({"from": "acknowledged", "to": "resolved",
                               "at": "1970-01-01T00:00:02.000Z"})
        );
    }

    #[test]
    fn tariff_prefixes_and_ids() {
        assert_eq!(tariff_prefix("Mumbai-North"), "MUMBAI-NORTH");
        assert_eq!(tariff_prefix("Delhi South"), "DELHI-SOUTH");
        assert_eq!(tariff_prefix("São_Paulo.2"), "S-O-PAULO-2");
        assert_eq!(tariff_id("MUMBAI-NORTH", 7), "TRF-MUMBAI-NORTH-000007");
        assert_eq!(tariff_id("X", 1_234_567), "TRF-X-1234567");
    }

    #[test]
    fn regional_rows_last_entry_wins_in_input_order() {
        let r = |region: &str, at: i64, load: f64| RegionalAggregate {
            region: region.into(),
            window_start_ms: at,
            meter_count: 1,
            total_consumption: 1.0,
            avg_consumption: 1.0,
            max_consumption: 1.0,
            min_consumption: 1.0,
            load_percentage: load,
            active_meters: vec![],
        };
        let aggs = [
            r("A", 0, 1.0),
            r("B", 0, 2.0),
            r("A", 0, 3.0),
            r("A", 60, 4.0),
        ];
        let kept: Vec<(&str, i64, f64)> = last_entry_wins(&aggs, regional_key)
            .into_iter()
            .map(|a| (a.region.as_str(), a.window_start_ms, a.load_percentage))
            .collect();
        assert_eq!(kept, [("B", 0, 2.0), ("A", 0, 3.0), ("A", 60, 4.0)]);
    }
}
