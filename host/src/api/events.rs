//! `GET /events`: the live feed ([`crate::live`]) as Server-Sent Events.
//!
//! Query: `types` (comma-separated: `alert`, `alert_status`, `tariff`,
//! `regional_load`; default all) and `region` (default every region; events
//! without a region, none today, always pass). Header `Last-Event-ID`
//! resumes after that event. Each event has `id:`, `event:` (its kind) and
//! `data:` (the topic's message as JSON); a `reset` event (data: why) comes
//! first when the last id could not be resumed from. A keep-alive comment
//! every 15 s. At most [`crate::live::MAX_CLIENTS`] clients stream at once
//! (503 beyond); a client more than [`crate::live::BACKLOG`] events behind
//! is dropped and may resume.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};

use super::{ApiState, bad_request, error, query};
use crate::live::{LiveEvent, LiveFeed, LiveKind};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct EventParams {
    /// Comma-separated: alert, alert_status, tariff, regional_load (default all).
    types: Option<String>,
    region: Option<String>,
}

/// Which events a client asked for.
struct Filter {
    kinds: Vec<LiveKind>,
    region: Option<String>,
}

impl Filter {
    fn wants(&self, e: &LiveEvent) -> bool {
        self.kinds.contains(&e.kind)
            && match (&self.region, &e.region) {
                (Some(want), Some(region)) => want == region,
                _ => true,
            }
    }
}

/// What one client's stream holds between events.
struct Client {
    feed: Arc<LiveFeed>,
    filter: Filter,
    reset: Option<String>,
    backlog: VecDeque<Arc<LiveEvent>>,
    rx: broadcast::Receiver<Arc<LiveEvent>>,
    closed: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

#[utoipa::path(get, path = "/events", tag = "live",
    params(EventParams, ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses((status = 200, description = "Server-Sent Events: alert, alert_status, tariff, regional_load (reset first when the id could not be resumed)", content_type = "text/event-stream"),
        (status = 400, body = super::ErrorBody), (status = 503, body = super::ErrorBody)))]
pub(super) async fn events(
    State(s): State<ApiState>,
    headers: HeaderMap,
    q: Result<Query<EventParams>, QueryRejection>,
) -> Response {
    let p = match query(q) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let kinds = match &p.types {
        None => vec![
            LiveKind::Alert,
            LiveKind::AlertStatus,
            LiveKind::Tariff,
            LiveKind::RegionalLoad,
        ],
        Some(list) => {
            let mut kinds = Vec::new();
            for t in list.split(',').map(str::trim) {
                match LiveKind::parse(t) {
                    Some(k) => kinds.push(k),
                    None => {
                        return bad_request(
                            "types",
                            format!(
                                "{t:?} is not an event type (alert, alert_status, tariff, regional_load)"
                            ),
                        );
                    }
                }
            }
            kinds
        }
    };
    let Some(slot) = s.live.client_slot() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "{} clients are streaming events already",
                crate::live::MAX_CLIENTS
            ),
            vec![],
        );
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resume = s.live.resume(last.as_deref());
    let client = Client {
        feed: s.live.clone(),
        filter: Filter {
            kinds,
            region: p.region,
        },
        reset: resume.reset.then(|| {
            format!(
                "cannot resume after {:?}: not among the events kept by this process; \
                 these are all it keeps",
                last.unwrap_or_default()
            )
        }),
        backlog: resume.backlog.into(),
        rx: resume.rx,
        closed: resume.closed,
        _slot: slot,
    };
    Sse::new(stream(client))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn sse_event(feed: &LiveFeed, e: &LiveEvent) -> Event {
    Event::default()
        .id(feed.id(e.seq))
        .event(e.kind.as_str())
        .data(&e.data)
}

fn stream(client: Client) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(client, |mut c| async move {
        if let Some(why) = c.reset.take() {
            return Some((Ok(Event::default().event("reset").data(why)), c));
        }
        while let Some(e) = c.backlog.pop_front() {
            if c.filter.wants(&e) {
                let event = sse_event(&c.feed, &e);
                return Some((Ok(event), c));
            }
        }
        loop {
            if *c.closed.borrow() {
                return None;
            }
            tokio::select! {
                got = c.rx.recv() => match got {
                    Ok(e) if c.filter.wants(&e) => {
                        let event = sse_event(&c.feed, &e);
                        return Some((Ok(event), c));
                    }
                    Ok(_) => {}
                    // Too far behind: dropped (it may resume from its
                    // last id), so it never holds the feed back.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return None,
                },
                _ = c.closed.changed() => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::live::BACKLOG;

    fn client(feed: &Arc<LiveFeed>) -> Client {
        let r = feed.resume(None);
        Client {
            feed: feed.clone(),
            filter: Filter {
                kinds: vec![LiveKind::Alert],
                region: None,
            },
            reset: None,
            backlog: r.backlog.into(),
            rx: r.rx,
            closed: r.closed,
            _slot: feed.client_slot().unwrap(),
        }
    }

    #[tokio::test]
    async fn a_client_that_keeps_up_gets_each_event() {
        let feed = Arc::new(LiveFeed::new());
        let mut s = Box::pin(stream(client(&feed)));
        feed.publish(LiveKind::Tariff, None, &0); // filtered out
        feed.publish(LiveKind::Alert, None, &1);
        assert!(s.next().await.is_some());
    }

    /// Publishing never waits for clients: one more than `BACKLOG` events
    /// behind, a client's stream ends (it may resume from its last id).
    #[tokio::test]
    async fn a_client_too_far_behind_is_dropped() {
        let feed = Arc::new(LiveFeed::new());
        let mut s = Box::pin(stream(client(&feed)));
        for i in 0..=BACKLOG {
            feed.publish(LiveKind::Alert, None, &i);
        }
        assert!(s.next().await.is_none(), "dropped, not slowed down");
    }

    #[tokio::test]
    async fn streams_end_when_the_process_stops() {
        let feed = Arc::new(LiveFeed::new());
        let mut s = Box::pin(stream(client(&feed)));
        feed.close();
        assert!(s.next().await.is_none());
    }
}
