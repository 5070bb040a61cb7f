//! Parked anomaly batches (`plugin_dead_letter`), run again through the
//! serving version on an operator's request (`POST
//! /admin/dead-letters/replay`, `segs replay-dead-letters`).
//!
//! With `on_fault = "dead_letter"` the stream stage parks the input of a
//! failed `detect` call (every reading with the baseline it was compared
//! to) through its checkpoint's outbox, so a parked batch is neither lost
//! nor parked twice. A replay reads the topic as consumer group
//! `dead-letter-replay-group`, runs each letter through the anomaly rule's
//! serving version, publishes the findings on `alerts` (provenance: the
//! version that replayed) and only then commits past the letter. A crash
//! in between publishes the same alerts again, with the same derived ids,
//! and the alert stage recognises them; a letter the serving version fails
//! on too stays parked, and the replay stops there.
//!
//! Must not: run concurrently with itself (one replay at a time per
//! process; the caller holds [`DeadLetters`]'s lock).

use std::time::Duration;

use serde::Serialize;
use tokio::sync::Mutex;

use super::Context;
use super::stream::anomaly_alert;
use crate::bus::{BusError, Topic};
use crate::messages::{DeadLetter, KeyedMessage, decode};
use crate::plugins::{AnomalyRule, anomaly};

/// The consumer group of replays.
pub const DEAD_LETTER_GROUP: &str = "dead-letter-replay-group";
/// What the replay group reads.
pub const INPUTS: &[Topic] = &[Topic::PluginDeadLetter];

/// One poll's wait for letters.
const POLL_WAIT: Duration = Duration::from_millis(300);
/// How long a replay waits for letters it knows are parked (Kafka assigns
/// the partition to a new member after a group join; another process may
/// hold it).
const ASSIGN_WAIT: Duration = Duration::from_secs(30);
/// Letters taken per poll.
const POLL_MAX: usize = 64;

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ReplayReport {
    /// Letters run through the serving version and committed.
    pub replayed: u64,
    /// Alerts they raised (published on `alerts`; the alert stage stores
    /// and deduplicates them).
    pub alerts: u64,
    /// Letters that could not be read (logged and skipped).
    pub unreadable: u64,
    /// Letters still parked after the replay.
    pub parked: u64,
    /// Why the replay stopped before the end, if it did (the serving
    /// version failed on a letter too, or the bus refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// The replayer of one process: the anomaly rule's own handle on its slot,
/// behind a lock so that replays run one at a time.
pub struct DeadLetters {
    ctx: Context,
    anomaly: Mutex<AnomalyRule>,
}

impl DeadLetters {
    /// On the in-process buses, registers the replay group on the topic, so
    /// that what is parked from now on is kept until it is replayed (they
    /// keep a topic's records for its groups; Kafka keeps them for the
    /// topic's retention, and a new group starts from the earliest).
    pub async fn new(ctx: Context, anomaly: AnomalyRule) -> Result<DeadLetters, BusError> {
        if ctx.config.bus.kind != crate::config::BusKind::Kafka {
            drop(ctx.bus.subscribe(DEAD_LETTER_GROUP, INPUTS).await?);
        }
        Ok(DeadLetters {
            ctx,
            anomaly: Mutex::new(anomaly),
        })
    }

    /// Letters parked and not replayed yet.
    pub async fn parked(&self) -> Result<u64, BusError> {
        let lag = self.ctx.bus.lag(DEAD_LETTER_GROUP, INPUTS).await?;
        Ok(lag.iter().map(|(_, _, n)| n).sum())
    }

    /// Runs every parked letter through the serving version, in order, until
    /// none is left or one fails again.
    pub async fn replay(&self) -> Result<ReplayReport, BusError> {
        let mut anomaly = self.anomaly.lock().await;
        let mut report = ReplayReport::default();
        let parked = self.parked().await?;
        if parked == 0 {
            return Ok(report);
        }
        let mut consumer = self.ctx.bus.subscribe(DEAD_LETTER_GROUP, INPUTS).await?;
        let mut waiting_since = std::time::Instant::now();
        'letters: loop {
            let letters = consumer.poll(POLL_MAX, POLL_WAIT).await?;
            if letters.is_empty() {
                if report.replayed + report.unreadable >= parked {
                    break;
                }
                if waiting_since.elapsed() >= ASSIGN_WAIT {
                    report.stopped = Some(format!(
                        "no parked letter came within {} s: another process may hold \
                         {} in group {DEAD_LETTER_GROUP}",
                        ASSIGN_WAIT.as_secs(),
                        Topic::PluginDeadLetter.name()
                    ));
                    break;
                }
                continue;
            }
            waiting_since = std::time::Instant::now();
            for d in letters {
                let next = (d.topic, d.partition, d.offset + 1);
                match decode::<DeadLetter>(&d.record.value) {
                    Ok(letter) => match self.run(&mut anomaly, &letter) {
                        Ok(alerts) => {
                            let n = alerts.len() as u64;
                            let records: Vec<_> = alerts
                                .into_iter()
                                .map(|m| m.into_record(crate::time::now_ms()))
                                .collect();
                            if let Err(e) = self.ctx.bus.produce(Topic::Alerts, records).await {
                                report.stopped = Some(format!("publishing its alerts: {e}"));
                                break 'letters;
                            }
                            report.replayed += 1;
                            report.alerts += n;
                        }
                        Err(e) => {
                            report.stopped = Some(format!(
                                "the letter parked at offset {} of partition {} failed again: {e}",
                                d.offset, d.partition
                            ));
                            break 'letters;
                        }
                    },
                    Err(e) => {
                        tracing::error!(
                            partition = d.partition,
                            offset = d.offset,
                            error = %e,
                            "an unreadable dead letter is skipped"
                        );
                        report.unreadable += 1;
                    }
                }
                consumer.commit_positions(&[next]).await?;
            }
        }
        drop(consumer);
        report.parked = self.parked().await?;
        tracing::info!(?report, "dead letters replayed");
        Ok(report)
    }

    /// The letter's batch through the serving version; its findings as
    /// alerts ready to publish.
    fn run(
        &self,
        anomaly: &mut AnomalyRule,
        letter: &DeadLetter,
    ) -> Result<Vec<KeyedMessage>, crate::plugins::PluginError> {
        let batch = anomaly::ReadingBatch {
            power_kw: letter.readings.iter().map(|r| r.power_kw).collect(),
            baseline_kw: letter.readings.iter().map(|r| r.baseline_kw).collect(),
            sample_count: letter.readings.iter().map(|r| r.sample_count).collect(),
        };
        let findings = anomaly.detect(&batch)?;
        let rule = anomaly.served_by().provenance();
        Ok(findings
            .iter()
            .map(|f| {
                let r = &letter.readings[f.index as usize];
                let alert = anomaly_alert(&r.meter_id, &r.region, r.timestamp_ms, &batch, f, &rule);
                KeyedMessage::of(&alert)
            })
            .collect())
    }
}
