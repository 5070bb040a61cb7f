//! The notification stage: one per `[[notify.webhooks]]`, each in its own
//! consumer group (`notification-group/{name}`) on `alerts_processed` and
//! `tariff_updates`, so a failing receiver holds back only its own
//! deliveries. It POSTs each matching event, signed, and keeps at it with
//! backoff until the receiver takes it; the delivery log
//! (`notification_deliveries`) says where each event stands.
//!
//! Once per receiver: an event is sent only if the log does not have it as
//! delivered for that webhook, and the offsets are committed only after the
//! poll's events are delivered and logged, so a restart, a replay or an
//! outbox published twice sends nothing twice. The one window left is a
//! crash between the receiver's 2xx and the log write: the event is sent
//! again with the same `X-Segs-Delivery` id, for the receiver to recognise.
//!
//! The request: `POST {url}`, body `{"id", "event", "data"}` (`data` is the
//! topic's message as published), headers `X-Segs-Event` (`alert` |
//! `tariff`), `X-Segs-Delivery` (the event id, `alert:{alertId}` or
//! `tariff:{tariffId}`), `X-Segs-Timestamp` (Unix seconds) and
//! `X-Segs-Signature: sha256={hex}`, the HMAC-SHA256 with the webhook's
//! secret of `{timestamp}.{body}`.
//!
//! Must not: make the process not ready because a receiver fails (that is
//! the receiver's outage, shown in the log and the delivery log).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::Sha256;

use super::{Context, Stage, with_retry};
use crate::bus::{Delivered, Topic};
use crate::config::{NotifyEvent, WebhookConfig};
use crate::messages::{AlertProcessed, TariffUpdate, decode};
use crate::store::NotificationLog;

/// What each webhook's group reads.
pub const INPUTS: &[Topic] = &[Topic::AlertsProcessed, Topic::TariffUpdates];

/// The consumer group of webhook `name`.
pub fn group(name: &str) -> String {
    format!("notification-group/{name}")
}

/// First wait after a failed attempt; it doubles up to `max_backoff_s`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

pub struct NotifyStage {
    ctx: Context,
    hook: Arc<WebhookConfig>,
    key: Vec<u8>,
    client: reqwest::Client,
}

/// An event to deliver, with the message as it was published.
struct Event<'a> {
    id: String,
    kind: NotifyEvent,
    data: &'a RawValue,
}

/// The body of a delivery.
#[derive(Serialize)]
struct Body<'a> {
    id: &'a str,
    event: &'static str,
    data: &'a RawValue,
}

fn kind_name(kind: NotifyEvent) -> &'static str {
    match kind {
        NotifyEvent::Alert => "alert",
        NotifyEvent::Tariff => "tariff",
    }
}

/// `sha256={hex}` of HMAC-SHA256(key, `{timestamp}.{body}`).
pub fn signature(key: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

impl Stage for NotifyStage {
    const NAME: &'static str = "notify";

    fn context(&self) -> &Context {
        &self.ctx
    }

    async fn process(&mut self, records: &[Delivered]) {
        let events: Vec<Event<'_>> = records.iter().filter_map(|d| self.event(d)).collect();
        if events.is_empty() {
            return;
        }
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let (ctx, name) = (self.ctx.clone(), self.hook.name.clone());
        let delivered = with_retry(&ctx, Self::NAME, "read the delivery log", || {
            ctx.store.delivered_notifications(&name, &ids)
        })
        .await;
        let mut sent = std::collections::HashSet::<String>::from_iter(delivered);
        for e in &events {
            // A repeat within the poll (an outbox published twice) too.
            if sent.insert(e.id.clone()) {
                self.deliver(e).await;
            }
        }
    }
}

impl NotifyStage {
    pub fn new(ctx: Context, hook: Arc<WebhookConfig>) -> NotifyStage {
        let key = hook.signing_key().unwrap_or_default().into_bytes();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(hook.timeout_s))
            .build()
            .expect("an HTTP client with a timeout");
        NotifyStage {
            ctx,
            hook,
            key,
            client,
        }
    }

    /// The record as an event for this webhook, if it matches its filters.
    fn event<'a>(&self, d: &'a Delivered) -> Option<Event<'a>> {
        let hook = &self.hook;
        let data: &RawValue = serde_json::from_slice(&d.record.value).ok()?;
        let (id, kind, region) = match d.topic {
            Topic::AlertsProcessed => {
                let a: AlertProcessed = decode(&d.record.value).ok()?;
                let wanted = a.severity >= hook.min_severity
                    && (hook.alert_types.is_empty() || hook.alert_types.contains(&a.alert_type));
                if !wanted {
                    return None;
                }
                (
                    format!("alert:{}", a.alert_id),
                    NotifyEvent::Alert,
                    a.region,
                )
            }
            Topic::TariffUpdates => {
                let t: TariffUpdate = decode(&d.record.value).ok()?;
                (
                    format!("tariff:{}", t.tariff_id),
                    NotifyEvent::Tariff,
                    Some(t.region),
                )
            }
            _ => return None,
        };
        let wanted = hook.events.contains(&kind)
            && (hook.regions.is_empty()
                || region.as_ref().is_some_and(|r| hook.regions.contains(r)));
        wanted.then_some(Event { id, kind, data })
    }

    /// POSTs the event until the receiver answers 2xx, logging each failed
    /// attempt and the delivery.
    async fn deliver(&self, e: &Event<'_>) {
        let body = serde_json::to_vec(&Body {
            id: &e.id,
            event: kind_name(e.kind),
            data: e.data,
        })
        .expect("a delivery body serializes");
        let max_backoff = Duration::from_secs(self.hook.max_backoff_s);
        let mut delays = super::retry_delays(FIRST_BACKOFF, max_backoff);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let now = crate::time::now_ms();
            let timestamp = now.div_euclid(1000);
            let answer = self
                .client
                .post(&self.hook.url)
                .header("content-type", "application/json")
                .header("x-segs-event", kind_name(e.kind))
                .header("x-segs-delivery", &e.id)
                .header("x-segs-timestamp", timestamp)
                .header("x-segs-signature", signature(&self.key, timestamp, &body))
                .body(body.clone())
                .send()
                .await;
            let (status, error) = match answer {
                Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                Ok(r) => (
                    Some(r.status().as_u16()),
                    Some(format!("the receiver answered {}", r.status())),
                ),
                Err(err) => (None, Some(format!("{err}"))),
            };
            let entry = NotificationLog {
                webhook: self.hook.name.clone(),
                event_id: e.id.clone(),
                event_type: kind_name(e.kind),
                delivered: error.is_none(),
                attempts,
                response_status: status,
                last_error: error.clone(),
                at_ms: now,
            };
            let ctx = &self.ctx;
            with_retry(ctx, Self::NAME, "write the delivery log", || {
                ctx.store.log_notification(&entry)
            })
            .await;
            let m = &self.ctx.metrics;
            let Some(error) = error else {
                m.notifications_delivered.fetch_add(1, Ordering::Relaxed);
                return;
            };
            m.notification_failures.fetch_add(1, Ordering::Relaxed);
            let backoff = delays.next().unwrap_or(max_backoff);
            tracing::warn!(
                webhook = %self.hook.name,
                event = %e.id,
                attempts,
                %error,
                retry_in_ms = backoff.as_millis() as u64,
                "webhook delivery failed; will retry"
            );
            tokio::time::sleep(backoff).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // Computed independently: python3 -c 'import hmac, hashlib;
        // print(hmac.new(b"key", b"1700000000.{}", hashlib.sha256).hexdigest())'
        assert_eq!(
            signature(b"key", 1_700_000_000, b"{}"),
            "sha256=9d713ed406bb7076d4123f0dc2c39d2df5c654ed4b0cd56b52c8b4c940bd63ae"
        );
    }
}
