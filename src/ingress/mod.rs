//! Webhook routes: size limit, `provider.verify`, `inbox.accept`, answer.
//! A 2xx goes out only after the delivery is committed.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;

use crate::inbox::InboxError;
use crate::providers::{RefusalKind, Refused};
use crate::store::model::{NewDelivery, Refusal};
use crate::store::Unavailable;
use crate::App;

/// The HTTP answer to a refused delivery.
fn status_of(kind: RefusalKind) -> StatusCode {
    match kind {
        RefusalKind::Unauthenticated => StatusCode::UNAUTHORIZED,
        RefusalKind::Malformed => StatusCode::BAD_REQUEST,
        RefusalKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
    }
}

/// The webhook route; `{provider}` names one of the configured providers.
pub const ROUTE: &str = "/webhooks/{provider}";

pub fn routes() -> Router<Arc<App>> {
    Router::new().route(ROUTE, post(receive))
}

/// Errors of the ingress layer, each with its HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("{0}")]
    Refused(Refused),
    #[error("no webhook endpoint for provider {0:?}")]
    UnknownProvider(String),
    /// The database is full or locked: the provider should retry later.
    #[error("the database is unavailable")]
    Unavailable(Unavailable),
    #[error("internal: {0}")]
    Internal(String),
}

/// On a response: the refusal it answers is counted, logged and recorded
/// already, so the server's limits do not do it again.
#[derive(Clone, Copy)]
pub struct RefusalRecorded;

/// 503 for a database that is full or locked, with how long to wait: a
/// lock is usually let go within seconds; space takes an operator.
pub fn unavailable_body(cause: Unavailable) -> Response {
    let (message, retry_after) = match cause {
        Unavailable::Full => ("the database's disk is full; retry later", 60u32),
        Unavailable::Busy => ("the database is locked by another process; retry later", 5),
        Unavailable::Io => ("the database cannot be reached or written; retry later", 5),
    };
    let mut response = error_body(StatusCode::SERVICE_UNAVAILABLE, cause.code(), message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(retry_after));
    response
}

pub fn error_body(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        match self {
            IngressError::Refused(r) => {
                let mut response = error_body(status_of(r.kind), r.code, &r.message);
                response.extensions_mut().insert(RefusalRecorded);
                response
            }
            IngressError::UnknownProvider(p) => error_body(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no webhook endpoint for {p:?} (is it configured?)"),
            ),
            // Logged by the inbox when it begins and ends, not per request.
            IngressError::Unavailable(cause) => unavailable_body(cause),
            IngressError::Internal(detail) => {
                tracing::error!(%detail, "webhook delivery failed inside cancelwatch");
                error_body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

/// Refusals write at most one log line a second, each telling how many were
/// left out since the previous one: a flood of forged deliveries must not
/// fill the disk. Every refusal is still counted in metrics and kept in the
/// `refusals` table.
static REFUSAL_LOG: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(std::time::Duration::from_secs(1)));

/// Lets one log line through per interval and counts the others.
pub struct LogLimiter {
    interval: std::time::Duration,
    /// When the last line went out, and how many were left out since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogLimiter {
    pub fn new(interval: std::time::Duration) -> LogLimiter {
        LogLimiter {
            interval,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(left out since the last line)` when a line may go out at `now`.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, left_out) = &mut *state;
        match last {
            Some(at) if now.duration_since(*at) < self.interval => {
                *left_out += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(left_out))
            }
        }
    }
}

async fn receive(
    State(app): State<Arc<App>>,
    Path(provider_name): Path<String>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, IngressError> {
    let started = std::time::Instant::now();
    let provider = app
        .providers
        .get(&provider_name)
        .cloned()
        .ok_or_else(|| IngressError::UnknownProvider(provider_name.clone()))?;
    let name = provider.name();
    let received_at = crate::time::now_str();
    let refuse = |refused: Refused, size: Option<usize>| {
        metrics::counter!("cancelwatch_deliveries_refused_total", "provider" => name, "reason" => refused.code)
            .increment(1);
        if let Some(left_out) = REFUSAL_LOG.admit(std::time::Instant::now()) {
            tracing::warn!(provider = name, reason = refused.code, message = %refused.message, remote = %remote, left_out, "delivery refused");
        }
        app.inbox.record_refusal(Refusal {
            provider: name.to_string(),
            reason: refused.code.to_string(),
            message: refused.message.clone(),
            http_status: status_of(refused.kind).as_u16(),
            body_size: size.map(|s| s as i64),
            remote_addr: Some(remote.to_string()),
            received_at: received_at.clone(),
            summarized: false,
        });
        IngressError::Refused(refused)
    };

    let body = match read_limited(&headers, body, app.config.server.max_body_bytes).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(size)) => {
            return Err(refuse(
                Refused {
                    kind: RefusalKind::TooLarge,
                    code: "payload_too_large",
                    message: format!(
                        "the body is over {} bytes",
                        app.config.server.max_body_bytes
                    ),
                },
                size,
            ))
        }
        Err(BodyError::Read(e)) => {
            return Err(refuse(
                Refused::malformed(format!("the body could not be read: {e}")),
                None,
            ))
        }
    };

    let now = chrono::Utc::now().timestamp();
    let verified = if body.len() <= VERIFY_INLINE_MAX {
        provider.verify(&headers, &body, now)
    } else {
        // Parsing and checking a large body is milliseconds of CPU (a Juice
        // checksum canonicalises the whole `data`): on a blocking thread, a
        // few at once, so a flood of large forged bodies neither stalls the
        // async workers that answer everything else nor takes every core.
        let _turn = LARGE_VERIFY
            .get_or_init(|| {
                let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
                tokio::sync::Semaphore::new((cores / 2).max(1))
            })
            .acquire()
            .await
            .expect("never closed");
        let (p, h, b) = (provider.clone(), headers.clone(), body.clone());
        match tokio::task::spawn_blocking(move || p.verify(&h, &b, now)).await {
            Ok(verified) => verified,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    .map_err(|r| refuse(r, Some(body.len())))?;

    let resource = verified.resource.clone();
    let delivery = NewDelivery {
        provider: name.to_string(),
        dedupe_key: verified.dedupe_key.clone(),
        event_type: verified.event_type.clone(),
        event_id: verified.event_id.clone(),
        resource_kind: resource.as_ref().map(|r| r.kind.clone()),
        resource_id: resource.as_ref().map(|r| r.id.clone()),
        context: resource.and_then(|r| r.context),
        livemode: verified.livemode,
        raw_body: body.to_vec(),
        source: "webhook",
        received_at,
    };
    let accepted = app.inbox.accept(delivery).await.map_err(|e| match e {
        InboxError::Unavailable(cause) => IngressError::Unavailable(cause),
        e => IngressError::Internal(format!("{name} delivery {}: {e}", verified.dedupe_key)),
    })?;
    if accepted.duplicate {
        metrics::counter!("cancelwatch_deliveries_duplicate_total", "provider" => name)
            .increment(1);
    } else {
        metrics::counter!("cancelwatch_deliveries_received_total", "provider" => name).increment(1);
    }
    // From the request's body being read to its answer being ready (durable):
    // the daemon's own share of the acknowledgement latency a sender sees.
    metrics::histogram!("cancelwatch_ack_seconds", "provider" => name)
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(provider = name, key = %verified.dedupe_key, event_type = %verified.event_type, duplicate = accepted.duplicate, "delivery accepted");
    Ok(Json(json!({"received": true, "duplicate": accepted.duplicate})).into_response())
}

enum BodyError {
    TooLarge(Option<usize>),
    Read(String),
}

/// Reads at most `limit` bytes; a declared or actual size over it stops the
/// read at once.
/// Bodies up to this size are verified on the async worker that read them
/// (microseconds); larger ones on a blocking thread, [`LARGE_VERIFY`] at once.
const VERIFY_INLINE_MAX: usize = 64 << 10;

/// Verifications of large bodies running at once: half the cores.
static LARGE_VERIFY: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();

async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, BodyError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(BodyError::TooLarge(Some(len)));
        }
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            BodyError::TooLarge(None)
        } else {
            BodyError::Read(e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::LogLimiter;
    use std::time::{Duration, Instant};

    #[test]
    fn refusal_lines_are_limited_and_count_what_they_left_out() {
        let limiter = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limiter.admit(t0), Some(0));
        for ms in [1, 10, 999] {
            assert_eq!(limiter.admit(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(limiter.admit(t0 + Duration::from_millis(1_000)), Some(3));
        assert_eq!(limiter.admit(t0 + Duration::from_millis(1_001)), None);
        assert_eq!(limiter.admit(t0 + Duration::from_millis(5_000)), Some(1));
    }
}
