//! Plugin faults and automatic rollbacks as alerts: the slots' events
//! ([`PluginEvent`]) become `PLUGIN_FAULT` / `PLUGIN_ROLLBACK` alerts on the
//! `alerts` topic, where the alert stage deduplicates
//! (`alert:dedupe:{plugin}:{type}:{bucket}`), stores and publishes them like
//! any other alert.
//!
//! Must not: decide anything about the fault; the slot has done that.

use tokio::sync::mpsc;

use super::Context;
use crate::bus::Topic;
use crate::messages::{Alert, AlertMetadata, AlertType, KeyedMessage, PluginMetadata, Severity};
use crate::plugins::PluginEvent;

/// The alert an event raises.
pub fn alert(event: &PluginEvent) -> Alert {
    match event {
        PluginEvent::Fault {
            version,
            call,
            reason,
            at_ms,
        } => Alert {
            id: uuid::Uuid::new_v4(),
            alert_type: AlertType::PluginFault,
            severity: Severity::High,
            meter_id: None,
            region: None,
            timestamp_ms: *at_ms,
            message: format!(
                "Plugin {} v{} failed during `{call}`: {reason}",
                version.name, version.version
            ),
            metadata: AlertMetadata::Plugin(PluginMetadata {
                plugin: version.name.clone(),
                version: version.version,
                sha256: version.sha256.clone(),
                call: Some((*call).to_owned()),
                reason: reason.clone(),
                rolled_back_from: None,
            }),
            rule: Some(version.provenance()),
        },
        PluginEvent::RolledBack {
            from,
            to,
            faults,
            at_ms,
        } => Alert {
            id: uuid::Uuid::new_v4(),
            alert_type: AlertType::PluginRollback,
            severity: Severity::Critical,
            meter_id: None,
            region: None,
            timestamp_ms: *at_ms,
            message: format!(
                "Plugin {} rolled back from v{} to v{} after {faults} faults in a row",
                to.name, from.version, to.version
            ),
            metadata: AlertMetadata::Plugin(PluginMetadata {
                plugin: to.name.clone(),
                version: to.version,
                sha256: to.sha256.clone(),
                call: None,
                reason: format!("{faults} faults in a row of v{}", from.version),
                rolled_back_from: Some(from.version),
            }),
            rule: Some(to.provenance()),
        },
    }
}

/// Publishes an alert per event until the slots are gone. A publish that
/// fails is retried (the bus refuses only while it is behind or down).
pub async fn raise_alerts(ctx: Context, mut events: mpsc::UnboundedReceiver<PluginEvent>) {
    while let Some(event) = events.recv().await {
        let record = KeyedMessage::of(&alert(&event)).into_record(crate::time::now_ms());
        super::publish(&ctx, "faults", Topic::Alerts, vec![record]).await;
    }
}
