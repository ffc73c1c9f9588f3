//! The HTTP side shared by the provider API clients: one call with a timeout,
//! retried with exponential backoff and jitter on network errors, 409, 429 and
//! 5xx, honouring `Retry-After` (seconds or an HTTP date; and Juice's
//! `retry_after`), capped at [`RETRY_AFTER_CAP`], and `Stripe-Should-Retry`.
//! A request the provider does not make idempotent
//! ([`HttpClient::send_unrepeated`]) is sent again only when it surely did
//! not take effect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;

use super::limit::RateLimit;
use super::ProviderError;
use crate::config::WorkerConfig;

/// Every `reason` of `cancelwatch_fetch_errors_total`.
pub const FETCH_ERROR_REASONS: [&str; 5] = ["status", "connect", "timeout", "network", "budget"];

/// The longest wait a provider's `Retry-After` is honoured for: a date far
/// ahead (or a clock far off) must not park a delivery for days. A
/// delivery that waited this long asks again, and waits again if told to.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3_600);

tokio::task_local! {
    /// When the work a call is part of must be over (a delivery's lease,
    /// less the time to write its outcome): set by [`within`].
    static DEADLINE: tokio::time::Instant;
}

/// Runs `f` with every provider call in it kept within `deadline`: a try
/// is given at most the time left, and no try starts (nor a retry waits)
/// past it; the call ends with what its last try got, so the real error
/// (a timeout, a 503) is what is recorded, not a lease that ran out.
pub async fn within<F: std::future::Future>(deadline: tokio::time::Instant, f: F) -> F::Output {
    DEADLINE.scope(deadline, f).await
}

/// The time left before the deadline of [`within`], if one is set.
fn time_left() -> Option<Duration> {
    DEADLINE
        .try_with(|d| d.saturating_duration_since(tokio::time::Instant::now()))
        .ok()
}

/// True when a try after waiting `wait` would start too late to get its
/// answer in time (the deadline, less this client's per-try timeout).
fn no_time_for_another(wait: Duration, per_try: Duration) -> bool {
    time_left().is_some_and(|left| wait + per_try.min(Duration::from_secs(1)) >= left)
}

/// A provider's answer: status, headers and the raw body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `Stripe-Should-Retry`, when present.
    fn should_retry_header(&self) -> Option<bool> {
        match self.headers.get("stripe-should-retry")?.to_str().ok()? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// Whether a non-2xx answer is worth another try.
    pub fn retryable(&self) -> bool {
        if let Some(forced) = self.should_retry_header() {
            return forced;
        }
        matches!(self.status, 409 | 429) || self.status >= 500
    }

    /// The wait the provider asked for, at most [`RETRY_AFTER_CAP`]:
    /// `Retry-After` (seconds, or an HTTP date: the time until then, none
    /// when it has passed) or a `retry_after` in the JSON body (top level or
    /// inside `error`).
    pub fn retry_after(&self) -> Option<Duration> {
        let header = self
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::trim);
        let seconds = header.and_then(|v| v.parse::<f64>().ok());
        let until_date = || {
            let date = httpdate::parse_http_date(header?).ok()?;
            Some(
                date.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default()
                    .as_secs_f64(),
            )
        };
        let body = || {
            let v = self.json()?;
            let r = v
                .get("retry_after")
                .or_else(|| v.get("error").and_then(|e| e.get("retry_after")))?;
            r.as_f64().or_else(|| r.as_str()?.trim().parse().ok())
        };
        seconds
            .or_else(until_date)
            .or_else(body)
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(RETRY_AFTER_CAP.as_secs_f64())))
    }

    /// The error code in `{"error":{"code":…}}` (or a top-level `code`).
    pub fn error_code(&self) -> Option<String> {
        self.error_field("code")
    }

    /// The error type in `{"error":{"type":…}}` (or a top-level `type`):
    /// Stripe's v2 API names some errors by their type alone
    /// (`already_canceled`, `idempotency_error`, …).
    pub fn error_type(&self) -> Option<String> {
        self.error_field("type")
    }

    fn error_field(&self, field: &str) -> Option<String> {
        let v = self.json()?;
        v.get("error")
            .and_then(|e| e.get(field))
            .or_else(|| v.get(field))
            .and_then(|c| c.as_str())
            .filter(|c| !c.is_empty())
            .map(str::to_string)
    }

    /// The error a failed fetch becomes.
    pub fn into_error(self, what: &str) -> ProviderError {
        let named: Vec<String> = [self.error_type(), self.error_code()]
            .into_iter()
            .flatten()
            .collect();
        let detail = format!("{what}: HTTP {} {}", self.status, named.join(" "));
        match self.status {
            404 => ProviderError::NotFound(detail),
            401 | 403 => ProviderError::Unauthorized(detail),
            429 if self.retryable() => ProviderError::RateLimited {
                retry_after: self.retry_after(),
                message: detail,
            },
            _ if self.retryable() => ProviderError::Retryable {
                retry_after: self.retry_after(),
                message: detail,
            },
            _ => ProviderError::Permanent(detail),
        }
    }
}

/// What became of a request that is never sent twice blindly.
#[derive(Debug, Clone)]
pub enum Sent {
    /// The provider answered, whatever the status.
    Answered(Answer),
    /// It went out, but no answer came back (timeout, connection reset):
    /// it may have taken effect.
    Unanswered(String),
}

/// A JSON API on one base URL.
#[derive(Clone)]
pub struct HttpClient {
    provider: &'static str,
    client: reqwest::Client,
    base: String,
    attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    /// Longest wait between two tries within one call; a provider asking for
    /// more gets the error back, and the caller retries later. Also the
    /// longest wait for the request budget.
    inline_wait_cap: Duration,
    /// Our own budget of requests to this provider, shared by every clone.
    limit: Option<Arc<RateLimit>>,
    /// Longest answer body read (`<provider>.max_response_bytes`).
    max_response_bytes: usize,
}

/// Why one try got no answer to give back.
#[derive(Debug)]
enum TryError {
    /// Sending, or reading the answer, failed.
    Http(reqwest::Error),
    /// The answer's body is longer than the cap: read no further.
    TooLarge { limit: usize },
}

impl HttpClient {
    pub fn new(
        provider: &'static str,
        base: &str,
        workers: &WorkerConfig,
        limit: Option<RateLimit>,
        max_response_bytes: usize,
    ) -> HttpClient {
        let timeout = Duration::from_secs(workers.fetch_timeout_secs.max(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("cancelwatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        HttpClient {
            provider,
            client,
            base: base.trim_end_matches('/').to_string(),
            attempts: workers.http_retries.max(1),
            backoff_base: Duration::from_millis(workers.backoff_base_ms.max(1)),
            backoff_max: Duration::from_secs(workers.backoff_max_secs.max(1)),
            inline_wait_cap: timeout,
            limit: limit.map(Arc::new),
            max_response_bytes,
        }
    }

    /// Spends a `replicas`-th of the request budget (see [`RateLimit::share_among`]).
    pub fn share_budget(&self, replicas: u32) {
        if let Some(limit) = &self.limit {
            limit.share_among(replicas);
        }
    }

    /// Sends one request (retried as the module says) and returns the last
    /// answer, whatever its status. Only a failure to get any answer is an error.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ProviderError> {
        let url = format!("{}{}", self.base, path);
        let header_map = to_header_map(headers)?;
        // The first try waits its turn in the request budget (up to the
        // inline cap; beyond, nothing is sent and the caller waits outside,
        // uncounted). A retry goes only if the budget has room at once:
        // otherwise the call ends with what the last try got, so a failing
        // provider's failures still count, and a call stays within the
        // delivery's lease.
        self.wait_for_budget(&method, path).await?;
        let mut attempt = 1;
        loop {
            let result = self
                .try_once(&method, &url, &header_map, body.as_deref())
                .await;
            let (wait, last) = match result {
                Ok(answer) if answer.is_success() => return Ok(answer),
                Ok(answer) => {
                    metrics::counter!("cancelwatch_fetch_errors_total", "provider" => self.provider, "reason" => "status")
                        .increment(1);
                    if !answer.retryable() || attempt >= self.attempts {
                        return Ok(answer);
                    }
                    let wait = match answer.retry_after() {
                        Some(asked) if asked > self.inline_wait_cap => return Ok(answer),
                        Some(asked) => asked,
                        None => self.backoff(attempt),
                    };
                    (wait, Ok(answer))
                }
                Err(TryError::TooLarge { limit }) => {
                    return Err(self.too_large(&method, path, limit))
                }
                Err(TryError::Http(e)) => {
                    let reason = if e.is_timeout() { "timeout" } else { "network" };
                    metrics::counter!("cancelwatch_fetch_errors_total", "provider" => self.provider, "reason" => reason)
                        .increment(1);
                    let error = ProviderError::Retryable {
                        message: format!(
                            "{} {method} {path}: {reason} error: {}",
                            self.provider,
                            without_url(&e)
                        ),
                        retry_after: None,
                    };
                    if attempt >= self.attempts {
                        return Err(error);
                    }
                    (self.backoff(attempt), Err(error))
                }
            };
            if no_time_for_another(wait, self.inline_wait_cap) {
                tracing::debug!(provider = self.provider, %path, attempt, "no time left for another try within the delivery's lease");
                return last;
            }
            tracing::debug!(provider = self.provider, %path, attempt, wait_ms = wait.as_millis() as u64, "retrying a provider call");
            tokio::time::sleep(wait).await;
            if let Some(limit) = &self.limit {
                if limit.acquire(Duration::ZERO).await.is_err() {
                    metrics::counter!("cancelwatch_fetch_errors_total", "provider" => self.provider, "reason" => "budget")
                        .increment(1);
                    return last;
                }
            }
            attempt += 1;
        }
    }

    /// Sends a request that must not take effect twice (no idempotency
    /// key): tried again only when it surely did not reach the provider (the
    /// connection could not be made) or was turned away unread (429). Any
    /// other answer, a 5xx included, is given back as it is, and a request
    /// that went out without an answer is [`Sent::Unanswered`]. `Err` only
    /// when nothing was sent.
    pub async fn send_unrepeated(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Sent, ProviderError> {
        let url = format!("{}{}", self.base, path);
        let header_map = to_header_map(headers)?;
        self.wait_for_budget(&method, path).await?;
        let mut attempt = 1;
        loop {
            let result = self
                .try_once(&method, &url, &header_map, body.as_deref())
                .await;
            let wait = match result {
                Ok(answer) if answer.status != 429 || attempt >= self.attempts => {
                    return Ok(Sent::Answered(answer))
                }
                Ok(answer) => match answer.retry_after() {
                    Some(asked) if asked > self.inline_wait_cap => {
                        return Ok(Sent::Answered(answer))
                    }
                    Some(asked) => asked,
                    None => self.backoff(attempt),
                },
                // It went out and was answered: not sent again.
                Err(TryError::TooLarge { limit }) => {
                    return Ok(Sent::Unanswered(
                        self.too_large(&method, path, limit).to_string(),
                    ))
                }
                Err(TryError::Http(e)) => {
                    let reason = if e.is_connect() {
                        "connect"
                    } else if e.is_timeout() {
                        "timeout"
                    } else {
                        "network"
                    };
                    metrics::counter!("cancelwatch_fetch_errors_total", "provider" => self.provider, "reason" => reason)
                        .increment(1);
                    let message = format!(
                        "{} {method} {path}: {reason} error: {}",
                        self.provider,
                        without_url(&e)
                    );
                    if !e.is_connect() {
                        return Ok(Sent::Unanswered(message));
                    }
                    if attempt >= self.attempts {
                        return Err(ProviderError::Retryable {
                            message,
                            retry_after: None,
                        });
                    }
                    self.backoff(attempt)
                }
            };
            tracing::debug!(provider = self.provider, %path, attempt, wait_ms = wait.as_millis() as u64, "sending again a call that did not reach the provider");
            tokio::time::sleep(wait).await;
            if let Some(limit) = &self.limit {
                limit
                    .acquire(self.inline_wait_cap)
                    .await
                    .map_err(|booked| ProviderError::RateLimited {
                        message: format!(
                            "{} {method} {path}: not sent again, our request budget is booked",
                            self.provider
                        ),
                        retry_after: Some(booked),
                    })?;
            }
            attempt += 1;
        }
    }

    /// Waits for the first try's turn in the request budget, up to the
    /// inline cap; beyond it, the call ends rate limited, nothing sent.
    async fn wait_for_budget(&self, method: &Method, path: &str) -> Result<(), ProviderError> {
        if let Some(limit) = &self.limit {
            if let Err(booked) = limit.acquire(self.inline_wait_cap).await {
                metrics::counter!("cancelwatch_fetch_errors_total", "provider" => self.provider, "reason" => "budget")
                    .increment(1);
                return Err(ProviderError::RateLimited {
                    message: format!(
                        "{} {method} {path}: not sent, our request budget for {} is booked for the next {:.1} s",
                        self.provider,
                        self.provider,
                        booked.as_secs_f64()
                    ),
                    retry_after: Some(booked),
                });
            }
        }
        Ok(())
    }

    /// One try: sends the request and reads the whole answer, timed into
    /// `cancelwatch_fetch_seconds`.
    async fn try_once(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<Answer, TryError> {
        let mut request = self
            .client
            .request(method.clone(), url)
            .headers(headers.clone());
        if let Some(b) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        // A try gets at most the time left within the deadline (when it
        // has less than the client's timeout, that one ends it sooner).
        if let Some(left) = time_left() {
            request = request.timeout(left.min(self.inline_wait_cap).max(Duration::from_millis(1)));
        }
        let started = Instant::now();
        let limit = self.max_response_bytes;
        let result = async {
            let mut response = request.send().await.map_err(TryError::Http)?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            // Refused on its announced length, or as soon as the body read
            // passes the cap: a huge answer never sits whole in memory.
            if response.content_length().is_some_and(|n| n > limit as u64) {
                return Err(TryError::TooLarge { limit });
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(TryError::Http)? {
                if body.len() + chunk.len() > limit {
                    return Err(TryError::TooLarge { limit });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Answer {
                status,
                headers,
                body,
            })
        }
        .await;
        metrics::histogram!("cancelwatch_fetch_seconds", "provider" => self.provider)
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// An answer over the cap, as the error its attempt fails with (counted
    /// in `cancelwatch_fetch_errors_total{reason="too_large"}`).
    fn too_large(&self, method: &Method, path: &str, limit: usize) -> ProviderError {
        metrics::counter!("cancelwatch_fetch_errors_total", "provider" => self.provider, "reason" => "too_large")
            .increment(1);
        tracing::warn!(provider = self.provider, %path, limit, "a provider answer is larger than {}.max_response_bytes: refused", self.provider);
        ProviderError::Permanent(format!(
            "{} {method} {path}: the answer is larger than {}.max_response_bytes ({limit} bytes)",
            self.provider, self.provider
        ))
    }

    /// The wait before try `attempt + 1` within one call: exponential with
    /// jitter, never longer than the inline cap (the delivery's lease runs meanwhile).
    fn backoff(&self, attempt: u32) -> Duration {
        backoff(self.backoff_base, self.backoff_max, attempt).min(self.inline_wait_cap)
    }
}

/// The headers of a request as reqwest takes them; an error when a value
/// holds characters a header cannot.
fn to_header_map(headers: &[(HeaderName, String)]) -> Result<HeaderMap, ProviderError> {
    let mut header_map = HeaderMap::new();
    for (name, value) in headers {
        let value = HeaderValue::from_str(value)
            .map_err(|_| ProviderError::Permanent(format!("header {name} holds bad characters")))?;
        header_map.insert(name.clone(), value);
    }
    Ok(header_map)
}

/// A reqwest error without the URL in its text (keeps logs short and free of hosts' query strings).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(url.as_str(), "…");
    }
    if let Some(source) = std::error::Error::source(e) {
        text = format!("{text}: {source}");
    }
    text
}

/// Exponential backoff with jitter: between half and all of base·2^(n-1), capped at `max`.
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let full = base.saturating_mul(1u32 << exp).min(max);
    let half = full / 2;
    let jitter = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
    (half + Duration::from_millis(jitter)).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, headers: &[(&'static str, &str)], body: &str) -> Answer {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        Answer {
            status,
            headers: map,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn classification() {
        assert!(answer(500, &[], "").retryable());
        assert!(answer(429, &[], "").retryable());
        assert!(answer(409, &[], "").retryable());
        assert!(!answer(400, &[], "").retryable());
        assert!(!answer(503, &[("stripe-should-retry", "false")], "").retryable());
        assert!(matches!(
            answer(404, &[], "").into_error("x"),
            ProviderError::NotFound(_)
        ));
        assert!(matches!(
            answer(403, &[], "").into_error("x"),
            ProviderError::Unauthorized(_)
        ));
        assert!(matches!(
            answer(503, &[("stripe-should-retry", "false")], "").into_error("x"),
            ProviderError::Permanent(_)
        ));
        assert!(matches!(
            answer(503, &[("retry-after", "3")], "").into_error("x"),
            ProviderError::Retryable { .. }
        ));
        assert!(matches!(
            answer(429, &[("retry-after", "3")], "").into_error("x"),
            ProviderError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(3)
        ));
    }

    #[test]
    fn retry_after_from_header_or_body() {
        assert_eq!(
            answer(429, &[("retry-after", "3")], "").retry_after(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            answer(429, &[], r#"{"retry_after": 2}"#).retry_after(),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            answer(
                429,
                &[],
                r#"{"error": {"code": "rate_limited", "retry_after": "1.5"}}"#
            )
            .retry_after(),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(answer(429, &[], "nope").retry_after(), None);
        assert_eq!(
            answer(429, &[("retry-after", "36000")], "").retry_after(),
            Some(RETRY_AFTER_CAP)
        );
        assert_eq!(
            answer(400, &[], r#"{"error":{"code":"invalid_state"}}"#).error_code(),
            Some("invalid_state".into())
        );
        let typed = answer(
            400,
            &[],
            r#"{"error":{"type":"already_canceled","code":null}}"#,
        );
        assert_eq!(typed.error_type(), Some("already_canceled".into()));
        assert_eq!(typed.error_code(), None);
        let ProviderError::Permanent(detail) = typed.into_error("GET /x") else {
            panic!("a 400 is permanent");
        };
        assert_eq!(detail, "GET /x: HTTP 400 already_canceled");
    }

    #[test]
    fn retry_after_as_an_http_date() {
        let at =
            |from_now: Duration| httpdate::fmt_http_date(std::time::SystemTime::now() + from_now);
        // Dates have whole seconds: a date 5 s ahead is 4 to 5 s away.
        let wait = answer(503, &[("retry-after", &at(Duration::from_secs(5)))], "")
            .retry_after()
            .unwrap();
        assert!(
            wait > Duration::from_secs(3) && wait <= Duration::from_secs(5),
            "{wait:?}"
        );
        let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(60));
        assert_eq!(
            answer(429, &[("retry-after", &past)], "").retry_after(),
            Some(Duration::ZERO)
        );
        // The obsolete forms a recipient must accept, and a cap on far dates.
        let far = answer(
            429,
            &[("retry-after", "Sunday, 06-Nov-44 08:49:37 GMT")],
            "",
        );
        assert_eq!(far.retry_after(), Some(RETRY_AFTER_CAP));
        let far = answer(429, &[("retry-after", "Sun Nov  6 08:49:37 2044")], "");
        assert_eq!(far.retry_after(), Some(RETRY_AFTER_CAP));
        assert_eq!(
            answer(429, &[("retry-after", "soon")], "").retry_after(),
            None
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        for attempt in 1..20 {
            let d = backoff(base, max, attempt);
            assert!(d <= max);
            let full = base.saturating_mul(1 << (attempt - 1).min(30)).min(max);
            assert!(d >= full / 2, "attempt {attempt}: {d:?}");
        }
    }
}
