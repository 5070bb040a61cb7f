//! The process's metrics in one Prometheus registry (`prometheus-client`):
//! the pipeline counters every stage adds to, store write latency per
//! stage, and — filled at scrape time — each stage's bus lag per topic and
//! partition. `GET /metrics` encodes it (OpenMetrics text); the status line
//! and `/healthz` read the same counters.
//!
//! Must not: decide anything, or cost a stage more than an atomic add per
//! call (histograms are observed once per store transaction, not per
//! reading).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A counter in the registry, added to like an `AtomicU64` (so stages keep
/// `fetch_add(n, Relaxed)` / `load(Relaxed)`).
#[derive(Debug, Clone, Default)]
pub struct Count(Counter<u64, AtomicU64>);

impl Count {
    pub fn fetch_add(&self, n: u64, _: Ordering) -> u64 {
        self.0.inc_by(n)
    }

    pub fn load(&self, _: Ordering) -> u64 {
        self.0.get()
    }
}

/// Labels of a per-stage series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    pub stage: &'static str,
}

/// Labels of a plugin version's series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    pub plugin: String,
    pub version: u64,
    /// The first 12 hex digits of the component's sha256.
    pub sha256: String,
}

/// Labels of a bus lag series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LagLabels {
    pub group: String,
    pub topic: String,
    pub partition: u32,
}

macro_rules! counters {
    ($($(#[$doc:meta])* $field:ident => $name:literal, $help:literal;)*) => {
        /// Counters every stage adds to; read by the status line, `/healthz`
        /// and `/metrics`.
        #[derive(Debug)]
        pub struct Metrics {
            $($(#[$doc])* pub $field: Count,)*
            /// Seconds per store transaction of a stage's step, by stage.
            pub store_write_seconds: Family<StageLabel, Histogram>,
            /// Records of a stage's inputs its group has not committed, by
            /// topic and partition (set at scrape time).
            pub bus_lag: Family<LagLabels, Gauge>,
            /// Per plugin version: calls, faults, records, mean time per
            /// record (copied from the plugin slots at scrape time).
            pub plugin_calls: Family<PluginLabels, Counter>,
            pub plugin_faults: Family<PluginLabels, Counter>,
            pub plugin_records: Family<PluginLabels, Counter>,
            pub plugin_ns_per_record: Family<PluginLabels, Gauge<f64, AtomicU64>>,
            /// What each stage is doing (running, retrying since …).
            pub health: crate::health::Health,
            registry: Registry,
        }

        impl Default for Metrics {
            fn default() -> Self {
                let mut registry = Registry::with_prefix("segs");
                $(let $field = Count::default();
                registry.register($name, $help, $field.0.clone());)*
                let store_write_seconds = Family::<StageLabel, Histogram>::new_with_constructor(
                    || Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
                );
                registry.register(
                    "store_write_seconds",
                    "Seconds per store transaction of a stage's step",
                    store_write_seconds.clone(),
                );
                let bus_lag = Family::<LagLabels, Gauge>::default();
                registry.register(
                    "bus_lag_records",
                    "Records of a stage's input topics its consumer group has not committed",
                    bus_lag.clone(),
                );
                let plugin_calls = Family::<PluginLabels, Counter>::default();
                registry.register("plugin_calls", "Calls of a plugin version (one per batch)", plugin_calls.clone());
                let plugin_faults = Family::<PluginLabels, Counter>::default();
                registry.register("plugin_faults", "Failed calls of a plugin version (trap, timeout, memory, contract)", plugin_faults.clone());
                let plugin_records = Family::<PluginLabels, Counter>::default();
                registry.register("plugin_records", "Records handed to a plugin version", plugin_records.clone());
                let plugin_ns_per_record = Family::<PluginLabels, Gauge<f64, AtomicU64>>::default();
                registry.register("plugin_ns_per_record", "Mean wall time per record of a plugin version's calls, ns", plugin_ns_per_record.clone());
                Metrics {
                    $($field,)*
                    store_write_seconds,
                    bus_lag,
                    plugin_calls,
                    plugin_faults,
                    plugin_records,
                    plugin_ns_per_record,
                    health: Default::default(),
                    registry,
                }
            }
        }

        impl Metrics {
            /// Every counter by name, as JSON (the status line, `/healthz`).
            pub fn snapshot(&self) -> serde_json::Value {
                serde_json::json!({
                    $(stringify!($field): self.$field.load(Ordering::Relaxed),)*
                })
            }
        }
    };
}

counters! {
    /// Readings acknowledged with a 2xx.
    accepted => "readings_accepted", "Readings acknowledged (2xx)";
    duplicates => "readings_duplicate", "Readings dropped as duplicates";
    rejected_requests => "requests_rejected", "Requests refused as invalid (4xx)";
    /// Requests refused because the pipeline was behind (503).
    refused_busy => "requests_refused_busy", "Requests refused with 503 because the pipeline is behind";
    /// Requests held for room on the bus (`ingest.max_wait_ms`), and the
    /// time they spent held, whether they were then taken or refused.
    held_requests => "requests_held", "Requests held for room on the bus before they were taken or refused";
    held_ms => "requests_held_milliseconds", "Milliseconds requests spent held for room on the bus";
    readings_processed => "readings_processed", "Readings folded into windows by the stream stage";
    late_readings => "readings_late", "Readings that arrived after their window closed";
    bad_records => "bus_bad_records", "Bus records that were not the topic's message (skipped)";
    windows_closed => "windows_closed", "Windows closed (1-minute and 15-minute)";
    anomalies => "anomalies", "Anomalies found by the anomaly rule";
    alerts_stored => "alerts_stored", "Alerts stored";
    alerts_deduplicated => "alerts_deduplicated", "Alerts dropped as duplicates of a stored one";
    tariffs_published => "tariffs_published", "Tariff changes stored and published";
    /// Webhook deliveries taken by their receivers, and failed attempts.
    notifications_delivered => "notifications_delivered", "Webhook deliveries taken by their receivers";
    notification_failures => "notification_failures", "Webhook delivery attempts that failed";
    raw_archived => "readings_archived", "Readings stored in raw_readings";
    plugin_failures => "plugin_failures", "Plugin calls that failed (trap, timeout, memory)";
    stage_errors => "stage_errors", "Stage errors (retried)";
}

impl Metrics {
    /// Records one store transaction of `stage`.
    pub fn store_write(&self, stage: &'static str, took: Duration) {
        self.store_write_seconds
            .get_or_create(&StageLabel { stage })
            .observe(took.as_secs_f64());
    }

    /// Brings a plugin version's series up to its slot's own counters.
    #[allow(clippy::too_many_arguments)]
    pub fn plugin_version(
        &self,
        plugin: &str,
        version: u64,
        sha256: &str,
        calls: u64,
        faults: u64,
        records: u64,
        mean_ns_per_record: Option<f64>,
    ) {
        let labels = PluginLabels {
            plugin: plugin.to_owned(),
            version,
            sha256: sha256.chars().take(12).collect(),
        };
        for (family, value) in [
            (&self.plugin_calls, calls),
            (&self.plugin_faults, faults),
            (&self.plugin_records, records),
        ] {
            let c = family.get_or_create(&labels);
            let seen = c.get();
            if value > seen {
                c.inc_by(value - seen);
            }
        }
        if let Some(ns) = mean_ns_per_record {
            self.plugin_ns_per_record.get_or_create(&labels).set(ns);
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_the_registry_are_the_same_numbers() {
        let m = Metrics::default();
        m.accepted.fetch_add(1000, Ordering::Relaxed);
        m.refused_busy.fetch_add(2, Ordering::Relaxed);
        m.store_write("alerts", Duration::from_millis(3));
        assert_eq!(m.snapshot()["accepted"], 1000);
        let text = m.encode();
        assert!(text.contains("segs_readings_accepted_total 1000"), "{text}");
        assert!(
            text.contains("segs_requests_refused_busy_total 2"),
            "{text}"
        );
        assert!(
            text.contains("segs_store_write_seconds_count{stage=\"alerts\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
