//! The live feed behind `GET /events` (Server-Sent Events): what this
//! process's stages decide, as it happens — alerts, alert status changes,
//! tariff changes, and each regional minute's load.
//!
//! Events get ids `{epoch}-{seq}` (`epoch`: when the process started, ms;
//! `seq` counts up from 1) and the last [`RING`] are kept, so a client that
//! reconnects with `Last-Event-ID` gets every event after that one, without
//! a gap, as long as it is still kept; an id from an earlier process (or
//! one no longer kept) gets everything kept, starting with a `reset` event
//! saying so. A client that falls more than [`BACKLOG`] events behind is
//! dropped (it can resume), so a slow client never slows the stages:
//! [`LiveFeed::publish`] only appends to memory.
//!
//! Must not: block or fail a stage; hold more than [`RING`] events.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// Events kept for resuming.
pub const RING: usize = 10_000;
/// Events a client may fall behind before it is dropped.
pub const BACKLOG: usize = 1_024;
/// Clients streaming at once; more are refused (503).
pub const MAX_CLIENTS: usize = 256;

/// What an event is about (the SSE `event:` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveKind {
    /// A new alert (`alerts_processed`).
    Alert,
    /// An alert acknowledged or resolved (`alert_status_updates`).
    AlertStatus,
    /// A price change (`tariff_updates`).
    Tariff,
    /// A region's load for one minute (`aggregates_1m_regional`).
    RegionalLoad,
}

impl LiveKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LiveKind::Alert => "alert",
            LiveKind::AlertStatus => "alert_status",
            LiveKind::Tariff => "tariff",
            LiveKind::RegionalLoad => "regional_load",
        }
    }

    pub fn parse(s: &str) -> Option<LiveKind> {
        [
            LiveKind::Alert,
            LiveKind::AlertStatus,
            LiveKind::Tariff,
            LiveKind::RegionalLoad,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One event: its sequence number, kind, region (for filters) and the
/// message as JSON (the topic's payload).
#[derive(Debug)]
pub struct LiveEvent {
    pub seq: u64,
    pub kind: LiveKind,
    pub region: Option<String>,
    pub data: String,
}

/// The feed: a ring of recent events and a broadcast of new ones.
pub struct LiveFeed {
    epoch: i64,
    inner: Mutex<Ring>,
    tx: broadcast::Sender<Arc<LiveEvent>>,
    closed: watch::Sender<bool>,
    clients: Arc<tokio::sync::Semaphore>,
}

struct Ring {
    next: u64,
    events: VecDeque<Arc<LiveEvent>>,
}

impl Default for LiveFeed {
    fn default() -> Self {
        LiveFeed::new()
    }
}

impl std::fmt::Debug for LiveFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFeed")
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Where a client resumes.
pub struct Resume {
    /// Events after the client's last one (or all kept).
    pub backlog: Vec<Arc<LiveEvent>>,
    /// Whether the client's last id could not be found (a `reset`).
    pub reset: bool,
    /// New events from here on.
    pub rx: broadcast::Receiver<Arc<LiveEvent>>,
    /// Turns true when the process stops (the stream ends).
    pub closed: watch::Receiver<bool>,
}

impl LiveFeed {
    pub fn new() -> LiveFeed {
        let (tx, _) = broadcast::channel(BACKLOG);
        LiveFeed {
            epoch: crate::time::now_ms(),
            inner: Mutex::new(Ring {
                next: 1,
                events: VecDeque::with_capacity(RING),
            }),
            tx,
            closed: watch::channel(false).0,
            clients: Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS)),
        }
    }

    /// A place for one more streaming client, if there is room.
    pub fn client_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.clients.clone().try_acquire_owned().ok()
    }

    /// The SSE id of event `seq`.
    pub fn id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.epoch)
    }

    /// Appends an event; never blocks on clients.
    pub fn publish(&self, kind: LiveKind, region: Option<&str>, message: &impl Serialize) {
        let Ok(data) = serde_json::to_string(message) else {
            return;
        };
        let mut ring = self.inner.lock();
        let event = Arc::new(LiveEvent {
            seq: ring.next,
            kind,
            region: region.map(str::to_owned),
            data,
        });
        ring.next += 1;
        if ring.events.len() == RING {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Sent under the lock, so a client resuming sees each event once:
        // in its backlog or on its receiver.
        let _ = self.tx.send(event);
    }

    /// Where a client with `last_event_id` (none: a new client, who gets
    /// only new events) picks up.
    pub fn resume(&self, last_event_id: Option<&str>) -> Resume {
        let ring = self.inner.lock();
        let rx = self.tx.subscribe();
        let closed = self.closed.subscribe();
        let Some(last) = last_event_id else {
            return Resume {
                backlog: Vec::new(),
                reset: false,
                rx,
                closed,
            };
        };
        let seq = last
            .split_once('-')
            .filter(|(epoch, _)| *epoch == self.epoch.to_string())
            .and_then(|(_, seq)| seq.parse::<u64>().ok());
        let oldest = ring.events.front().map_or(ring.next, |e| e.seq);
        match seq {
            // Known, and nothing after it was dropped from the ring.
            Some(seq) if seq + 1 >= oldest && seq < ring.next => Resume {
                backlog: ring
                    .events
                    .iter()
                    .filter(|e| e.seq > seq)
                    .cloned()
                    .collect(),
                reset: false,
                rx,
                closed,
            },
            _ => Resume {
                backlog: ring.events.iter().cloned().collect(),
                reset: true,
                rx,
                closed,
            },
        }
    }

    /// Ends every client's stream (the process is stopping).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(events: &[Arc<LiveEvent>]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_client_resumes_after_its_last_event_without_gap() {
        let feed = LiveFeed::new();
        for i in 0..5 {
            feed.publish(LiveKind::Alert, Some("R"), &i);
        }
        let r = feed.resume(Some(&feed.id(2)));
        assert!(!r.reset);
        assert_eq!(seqs(&r.backlog), vec![3, 4, 5]);
        // Up to date: nothing in the backlog, the next comes on rx.
        let mut r = feed.resume(Some(&feed.id(5)));
        assert!(r.backlog.is_empty() && !r.reset);
        feed.publish(LiveKind::Tariff, None, &6);
        assert_eq!(r.rx.try_recv().unwrap().seq, 6);
    }

    #[test]
    fn an_unknown_or_dropped_id_gets_everything_kept_as_a_reset() {
        let feed = LiveFeed::new();
        for i in 0..(RING + 10) {
            feed.publish(LiveKind::RegionalLoad, None, &i);
        }
        let r = feed.resume(Some(&feed.id(3)));
        assert!(r.reset);
        assert_eq!(r.backlog.len(), RING);
        assert_eq!(r.backlog[0].seq, 11);
        let r = feed.resume(Some("123-4"));
        assert!(r.reset);
        // A new client starts with what comes next.
        let r = feed.resume(None);
        assert!(r.backlog.is_empty() && !r.reset);
    }
}
