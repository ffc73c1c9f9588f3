//! Injected API faults (errors, rate limits, hangs, outages) and the
//! middleware that records every API request and applies them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{juice_api, stripe_api, RecordedRequest, Shared};

#[derive(Debug, Default)]
struct FaultState {
    fail_left: u32,
    fail_status: u16,
    rate_limit_left: u32,
    retry_after_secs: u64,
    /// `Retry-After` as an HTTP date rather than seconds.
    retry_after_as_date: bool,
    idempotency_conflict_left: u32,
    hang_left: u32,
    hang: Duration,
    /// Requests whose path holds one of these wait that long, every time.
    hang_paths: Vec<(String, Duration)>,
    refuse_all: bool,
    /// Every request waits a random time in this range before its answer.
    latency: Option<(Duration, Duration)>,
    /// For the next cancels: what follows once the cancel is applied.
    after_cancel_left: u32,
    after_cancel: Option<AfterCancel>,
}

/// What a cancel request gets after it was applied, instead of its answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum AfterCancel {
    /// This status, with a proper error body.
    Fail(u16),
    /// Its answer only after this long (a client that gave up sees none).
    Hang(Duration),
}

/// A handle to inject faults into the simulated APIs. Faults apply to API
/// requests only, never to the deliveries the simulator sends.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    inner: Arc<Mutex<FaultState>>,
}

/// What one request gets instead of its normal answer.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Refuse,
    Fail(u16),
    RateLimit { secs: u64, as_date: bool },
    IdempotencyConflict,
}

impl Faults {
    fn state(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `n` API requests answer `status` with a proper error body.
    pub fn fail_next(&self, n: u32, status: u16) {
        let mut s = self.state();
        s.fail_left = n;
        s.fail_status = status;
    }

    /// The next `n` API requests answer 429 (Stripe: `Retry-After` header;
    /// Juice: `retry_after` in the body).
    pub fn rate_limit_next(&self, n: u32, retry_after_secs: u64) {
        let mut s = self.state();
        s.rate_limit_left = n;
        s.retry_after_secs = retry_after_secs;
        s.retry_after_as_date = false;
    }

    /// [`Faults::rate_limit_next`], Stripe's `Retry-After` given in its
    /// other form: the HTTP date `retry_after_secs` from now.
    pub fn rate_limit_next_until_date(&self, n: u32, retry_after_secs: u64) {
        self.rate_limit_next(n, retry_after_secs);
        self.state().retry_after_as_date = true;
    }

    /// The next `n` API requests are refused as Stripe refuses a reused
    /// idempotency key: 400, an error named by its type alone.
    pub fn idempotency_conflict_next(&self, n: u32) {
        self.state().idempotency_conflict_left = n;
    }

    /// The next `n` API requests wait `d` before being answered.
    pub fn hang_next(&self, n: u32, d: Duration) {
        let mut s = self.state();
        s.hang_left = n;
        s.hang = d;
    }

    /// The next `n` cancel requests (`POST …/cancel`) are applied, then
    /// answered `status` instead of their answer: the answer a client gets
    /// after a cancel that did take effect, when the provider fails on the
    /// way back.
    pub fn fail_after_applying_next_cancels(&self, n: u32, status: u16) {
        let mut s = self.state();
        s.after_cancel_left = n;
        s.after_cancel = Some(AfterCancel::Fail(status));
    }

    /// The next `n` cancel requests are applied, then answered only after
    /// `d`: a client that times out before never learns what happened.
    pub fn hang_after_applying_next_cancels(&self, n: u32, d: Duration) {
        let mut s = self.state();
        s.after_cancel_left = n;
        s.after_cancel = Some(AfterCancel::Hang(d));
    }

    /// Every API request whose path holds `needle` (an object's id) waits
    /// `d` before it is answered, until [`Faults::clear`]: one resource
    /// whose calls hang while the others are answered.
    pub fn hang_paths_containing(&self, needle: &str, d: Duration) {
        self.state().hang_paths.push((needle.to_string(), d));
    }

    /// How long a request for `path` waits by [`Faults::hang_paths_containing`].
    fn path_hang(&self, path: &str) -> Option<Duration> {
        let s = self.state();
        s.hang_paths
            .iter()
            .find(|(needle, _)| path.contains(needle.as_str()))
            .map(|(_, d)| *d)
    }

    /// While on, every API request answers 503.
    pub fn refuse_all(&self, on: bool) {
        self.state().refuse_all = on;
    }

    /// Every API request waits a random time from `min` up to `max` before
    /// it is answered, as a remote provider's answers do: long enough for
    /// callers' requests to overlap when they can. `None` answers at once.
    pub fn latency(&self, range: Option<(Duration, Duration)>) {
        self.state().latency = range;
    }

    /// This request's latency, drawn from the configured range.
    fn take_latency(&self) -> Option<Duration> {
        let (min, max) = self.state().latency?;
        if max <= min {
            return Some(min);
        }
        Some(rand::Rng::gen_range(&mut rand::thread_rng(), min..max))
    }

    /// Removes every injected fault.
    pub fn clear(&self) {
        *self.state() = FaultState::default();
    }

    /// Takes a cancel request's fault after it is applied, if any.
    fn take_after_cancel(&self) -> Option<AfterCancel> {
        let mut s = self.state();
        if s.after_cancel_left == 0 {
            return None;
        }
        s.after_cancel_left -= 1;
        s.after_cancel
    }

    /// Takes this request's share of the injected faults.
    fn take(&self) -> (Option<Duration>, Option<Fault>) {
        let mut s = self.state();
        let hang = if s.hang_left > 0 {
            s.hang_left -= 1;
            Some(s.hang)
        } else {
            None
        };
        let fault = if s.refuse_all {
            Some(Fault::Refuse)
        } else if s.fail_left > 0 {
            s.fail_left -= 1;
            Some(Fault::Fail(s.fail_status))
        } else if s.rate_limit_left > 0 {
            s.rate_limit_left -= 1;
            Some(Fault::RateLimit {
                secs: s.retry_after_secs,
                as_date: s.retry_after_as_date,
            })
        } else if s.idempotency_conflict_left > 0 {
            s.idempotency_conflict_left -= 1;
            Some(Fault::IdempotencyConflict)
        } else {
            None
        };
        (hang, fault)
    }
}

/// Counts an API request as being answered while it lives.
struct Answering<'a>(&'a Shared);

impl<'a> Answering<'a> {
    fn start(shared: &'a Shared) -> Self {
        let now = shared.api_calls.fetch_add(1, Ordering::SeqCst) + 1;
        shared.api_calls_peak.fetch_max(now, Ordering::SeqCst);
        Answering(shared)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.api_calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Records the request, then applies any injected fault before the handler.
pub(crate) async fn middleware(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let _answering = Answering::start(&shared);
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| {
            let name = name.as_str().to_ascii_lowercase();
            let value = if name == "authorization" {
                "present".to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name, value)
        })
        .collect();
    // Held until the answer is sent, so that a fetch that begins meanwhile
    // is seen as overlapping it.
    let _fetching = super::overlap::fetched_resource(request.method(), &path)
        .map(|resource| super::overlap::Fetching::start(&shared.overlaps, resource));
    super::remember(
        &mut shared.requests.lock().unwrap_or_else(|e| e.into_inner()),
        RecordedRequest {
            method: request.method().as_str().to_string(),
            path: path.clone(),
            headers,
        },
        super::REQUESTS_KEPT,
    );

    if let Some(d) = shared.faults.path_hang(&path) {
        tokio::time::sleep(d).await;
    }
    let (hang, fault) = shared.faults.take();
    if let Some(d) = shared.faults.take_latency() {
        tokio::time::sleep(d).await;
    }
    if let Some(d) = hang {
        tokio::time::sleep(d).await;
    }
    let stripe = path.starts_with("/v2/");
    if let Some(fault) = fault {
        return fault_response(fault, stripe);
    }
    let is_cancel = request.method() == axum::http::Method::POST && path.ends_with("/cancel");
    let after = is_cancel
        .then(|| shared.faults.take_after_cancel())
        .flatten();
    let response = next.run(request).await;
    match after {
        None => response,
        Some(AfterCancel::Fail(code)) => fault_response(Fault::Fail(code), stripe),
        Some(AfterCancel::Hang(d)) => {
            tokio::time::sleep(d).await;
            response
        }
    }
}

fn fault_response(fault: Fault, stripe: bool) -> Response {
    let (status, retry_after) = match fault {
        Fault::Refuse => (StatusCode::SERVICE_UNAVAILABLE, None),
        Fault::Fail(code) => (
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            None,
        ),
        Fault::RateLimit { secs, as_date } => (
            StatusCode::TOO_MANY_REQUESTS,
            Some(if as_date {
                httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(secs))
            } else {
                secs.to_string()
            }),
        ),
        Fault::IdempotencyConflict if stripe => {
            return stripe_api::typed_error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they were first used with.",
            )
            .into_response()
        }
        Fault::IdempotencyConflict => (StatusCode::BAD_REQUEST, None),
    };
    let message = format!("simulated fault: {status}");
    if stripe {
        let (kind, code) = match (status.as_u16(), &retry_after) {
            (_, Some(_)) => ("rate_limit_error", "rate_limit"),
            (503, _) => ("api_error", "service_unavailable"),
            (s, _) if s >= 500 => ("api_error", "internal_error"),
            _ => ("invalid_request_error", "simulated_error"),
        };
        let mut response = stripe_api::error(status, kind, code, &message).into_response();
        if let Some(value) = retry_after {
            response
                .headers_mut()
                .insert("retry-after", value.parse().expect("digits or a date"));
        }
        response
    } else {
        match retry_after.and_then(|v| v.parse().ok()) {
            Some(secs) => juice_api::rate_limited(secs),
            None => {
                let code = if status.as_u16() == 503 {
                    "service_unavailable"
                } else if status.is_server_error() {
                    "internal_error"
                } else {
                    "simulated_error"
                };
                juice_api::error(status, code, &message, "api_error", serde_json::json!({}))
                    .into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_consumed_in_order() {
        let f = Faults::default();
        f.fail_next(1, 500);
        f.rate_limit_next(1, 7);
        f.hang_next(1, Duration::from_millis(5));
        assert_eq!(
            f.take(),
            (Some(Duration::from_millis(5)), Some(Fault::Fail(500)))
        );
        assert_eq!(
            f.take(),
            (
                None,
                Some(Fault::RateLimit {
                    secs: 7,
                    as_date: false
                })
            )
        );
        f.idempotency_conflict_next(1);
        assert_eq!(f.take(), (None, Some(Fault::IdempotencyConflict)));
        assert_eq!(f.take(), (None, None));
        f.refuse_all(true);
        assert_eq!(f.take(), (None, Some(Fault::Refuse)));
        f.clear();
        assert_eq!(f.take(), (None, None));
        f.fail_after_applying_next_cancels(1, 503);
        assert_eq!(f.take(), (None, None), "not a fault before the handler");
        assert_eq!(f.take_after_cancel(), Some(AfterCancel::Fail(503)));
        assert_eq!(f.take_after_cancel(), None);
    }
}
