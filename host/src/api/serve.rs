//! The HTTP server: the accept loop and the connection settings of `[http]`.
//!
//! - At most `http.max_connections` connections are served at once: a permit
//!   of a semaphore is taken *before* `accept`, so further clients wait in
//!   the kernel's listen backlog (no file descriptor, no task, no buffer)
//!   until a served connection closes.
//! - Each connection is served by hyper's HTTP/1.1 connection with a timer,
//!   so `http.header_read_timeout_s` bounds the time to send a request head,
//!   from the accept and again from the end of every response (hyper uses
//!   the same timer for an idle kept-alive connection); past it the
//!   connection is closed. Only HTTP/1.1 is served: hyper-util's `auto`
//!   builder reads the protocol preface with no timer at all, and h2c has no
//!   header timeout.
//! - The per-request limits (body read timeout, in-flight cap) are tower
//!   layers on the router (`api::router`).
//!
//! Must not: know routes or handlers.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::HttpConfig;

/// Serves `router` on `listener` with the limits of `limits` until `stop`
/// completes; then stops accepting, lets requests in progress finish and
/// closes idle connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &HttpConfig,
    stop: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(limits.header_read_timeout_s))
        .keep_alive(limits.keep_alive);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut warned_full: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        // A permit first: past the cap, connections stay in the backlog.
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break, // closed: never, the semaphore is ours
            },
            () = &mut stop => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        if connections.available_permits() == 0
            && warned_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            warned_full = Some(Instant::now());
            tracing::warn!(
                max_connections = limits.max_connections,
                "HTTP: connection cap reached (http.max_connections); further clients wait until a connection closes"
            );
        }
        let conn = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                // Header timeouts, resets, malformed requests: the client's.
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// As hyper 0.14's server and axum's `serve` do: a failed accept of one
/// connection is skipped; anything else (out of file descriptors) is logged
/// and retried after a second, when connections may have closed.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "HTTP: accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
