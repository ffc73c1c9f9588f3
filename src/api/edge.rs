//! What every request passes first: one process-wide cap on the requests
//! handled at once (`server.max_concurrent_requests`), whose wait counts in
//! the request's deadline (`server.request_timeout_secs`), and the count, log
//! line and refusal record of every request refused for its time or size
//! (408, 413, 431).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

use crate::ingress::{error_body, LogLimiter, RefusalRecorded};
use crate::store::model::Refusal;
use crate::App;

pub struct Limits {
    app: Arc<App>,
    /// One for the whole process: health checks wait behind slow uploads
    /// like everything else, so they see a daemon that cannot take more.
    slots: Semaphore,
    deadline: Duration,
}

impl Limits {
    pub fn new(app: Arc<App>) -> Limits {
        let server = &app.config.server;
        Limits {
            slots: Semaphore::new(server.max_concurrent_requests),
            deadline: Duration::from_secs(server.request_timeout_secs),
            app,
        }
    }
}

/// Lines about requests refused here: at most one a second, each telling how
/// many were left out since the one before.
static LOG: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(Duration::from_secs(1)));

pub async fn limit(State(limits): State<Arc<Limits>>, request: Request, next: Next) -> Response {
    let remote = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let path = request.uri().path().to_owned();
    let received_at = crate::time::now_str();
    let handled = tokio::time::timeout(limits.deadline, async {
        let slot = match limits.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                metrics::counter!("cancelwatch_http_requests_queued_total").increment(1);
                limits
                    .slots
                    .acquire()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let response = next.run(request).await;
        drop(slot);
        response
    })
    .await;
    let response = handled.unwrap_or_else(|_| {
        error_body(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request was not answered within server.request_timeout_secs",
        )
    });
    let status = response.status();
    if matches!(status.as_u16(), 408 | 413 | 431) {
        refused(&limits.app, &response, &path, remote, received_at);
    }
    response
}

/// Counts a refusal; unless the route has done so, logs it and, on a
/// provider's webhook route, records it as that provider's refusal (other
/// routes name no provider to file it under).
fn refused(
    app: &App,
    response: &Response,
    path: &str,
    remote: Option<SocketAddr>,
    received_at: String,
) {
    let status = response.status();
    metrics::counter!("cancelwatch_http_refusals_total", "status" => status.as_str().to_owned())
        .increment(1);
    if response.extensions().get::<RefusalRecorded>().is_some() {
        return;
    }
    let reason = match status {
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        _ => "headers_too_large",
    };
    let remote_addr = remote.map(|r| r.to_string());
    if let Some(left_out) = LOG.admit(Instant::now()) {
        tracing::warn!(
            status = status.as_u16(),
            reason,
            path,
            remote = remote_addr.as_deref().unwrap_or("-"),
            left_out,
            "request refused"
        );
    }
    let provider = path
        .strip_prefix("/webhooks/")
        .and_then(|name| app.providers.get(name))
        .map(|p| p.name());
    if let Some(provider) = provider {
        metrics::counter!("cancelwatch_deliveries_refused_total", "provider" => provider, "reason" => reason)
            .increment(1);
        app.inbox.record_refusal(Refusal {
            provider: provider.to_string(),
            reason: reason.to_string(),
            message: format!("answered {status} by the server's limits"),
            http_status: status.as_u16(),
            body_size: None,
            remote_addr,
            received_at,
            summarized: false,
        });
    }
}
