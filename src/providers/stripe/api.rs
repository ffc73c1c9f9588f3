//! The Stripe v2 API (Stripe's v2 API reference): fetch a related object, cancel,
//! list events for backfill.

use reqwest::header::{HeaderName, AUTHORIZATION};
use reqwest::Method;
use serde_json::Value;

use super::event::{BATCH_JOB, OUTBOUND_TRANSFER};
use super::objects;
use crate::config::{StripeConfig, WorkerConfig};
use crate::providers::http::{Answer, HttpClient};
use crate::providers::limit::RateLimit;
use crate::providers::{safe_id, CancelAnswer, CancelOutcome, Observation, ProviderError, Target};

/// Events asked for per page when backfilling.
pub const PAGE_LIMIT: u32 = 100;

/// Only a path on the API base: one leading `/`, under `/v2/`, no `..`, no
/// backslash, no whitespace or control characters. Never an absolute URL or `//host`.
/// The path itself (before `?`) holds only letters, digits, `_`, `-`, `.` and
/// `/`: no percent-encoding, which a server would decode after this check
/// (`%2e%2e` is `..`, `%2f` a `/`). The query may be encoded.
pub fn safe_path(path: &str) -> bool {
    let (route, _query) = path.split_once('?').unwrap_or((path, ""));
    path.starts_with("/v2/")
        && !path.contains("..")
        && !path.contains('\\')
        && !path.contains("://")
        && !path.chars().any(|c| c.is_whitespace() || c.is_control())
        && route
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
}

/// True when a related object's `url` names the object itself: the id the
/// event gave is its last segment (or, for a singleton, the whole path).
fn names_its_object(url: &str, id: &str) -> bool {
    url == id || url.rsplit('/').next() == Some(id)
}

/// The object path of a kind and id, when the event gave none.
pub fn object_path(kind: &str, id: &str) -> Result<String, ProviderError> {
    if !safe_id(id) {
        return Err(ProviderError::Unusable(format!(
            "{kind}: unsafe id {id:?}: it forms no valid API path"
        )));
    }
    match kind {
        OUTBOUND_TRANSFER => Ok(format!("/v2/money_management/outbound_transfers/{id}")),
        BATCH_JOB => Ok(format!("/v2/core/batch_jobs/{id}")),
        other => Err(ProviderError::Unusable(format!(
            "no known path for {other} (the event carried no url)"
        ))),
    }
}

/// A Stripe API client.
#[derive(Clone)]
pub struct StripeApi {
    http: HttpClient,
    api_key: String,
    api_version: String,
}

impl StripeApi {
    /// The HTTP client, whose request budget the replicas share.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    pub fn new(config: &StripeConfig, workers: &WorkerConfig) -> StripeApi {
        StripeApi {
            http: HttpClient::new(
                super::NAME,
                &config.api_base,
                workers,
                RateLimit::new(config.rate_limit_per_second, config.rate_limit_burst),
                config.max_response_bytes,
            ),
            api_key: config.api_key.clone(),
            api_version: config.api_version.clone(),
        }
    }

    fn headers(
        &self,
        context: Option<&str>,
        trigger_event: Option<&str>,
    ) -> Vec<(HeaderName, String)> {
        let mut h = vec![
            (AUTHORIZATION, format!("Bearer {}", self.api_key)),
            (
                HeaderName::from_static("stripe-version"),
                self.api_version.clone(),
            ),
        ];
        if let Some(c) = context.filter(|c| !c.is_empty()) {
            h.push((HeaderName::from_static("stripe-context"), c.to_string()));
        }
        if let Some(e) = trigger_event {
            h.push((
                HeaderName::from_static("stripe-request-trigger"),
                format!("event={e}"),
            ));
        }
        h
    }

    /// GETs the related object and decodes it.
    pub async fn fetch(&self, target: &Target) -> Result<Observation, ProviderError> {
        let path = match target.url.as_deref() {
            Some(url) if safe_path(url) && names_its_object(url, &target.id) => url.to_string(),
            Some(url) => {
                tracing::warn!(url = %url, resource = %target.id, "refusing to follow a related_object url that is not a plain /v2/ path to this object; using the kind's path");
                object_path(&target.kind, &target.id)?
            }
            None => object_path(&target.kind, &target.id)?,
        };
        let answer = self
            .http
            .send(
                Method::GET,
                &path,
                &self.headers(target.context.as_deref(), target.trigger_event.as_deref()),
                None,
            )
            .await?;
        if !answer.is_success() {
            return Err(answer.into_error(&format!("stripe GET {path}")));
        }
        let object = answer.json().ok_or_else(|| {
            ProviderError::Permanent(format!("stripe GET {path}: the answer is not JSON"))
        })?;
        let obs =
            objects::decode(&target.kind, &target.id, object).map_err(ProviderError::Permanent)?;
        Ok(objects::timed_by_event(
            obs,
            target.trigger_created.as_deref(),
        ))
    }

    /// POSTs `…/cancel` with an `Idempotency-Key` and maps the answer.
    pub async fn cancel(
        &self,
        target: &Target,
        idempotency_key: &str,
    ) -> Result<CancelAnswer, ProviderError> {
        let path = format!("{}/cancel", object_path(&target.kind, &target.id)?);
        let mut headers = self.headers(target.context.as_deref(), None);
        headers.push((
            HeaderName::from_static("idempotency-key"),
            idempotency_key.to_string(),
        ));
        let answer = self
            .http
            .send(Method::POST, &path, &headers, Some(b"{}".to_vec()))
            .await?;
        if matches!(answer.status, 401 | 403) {
            return Err(answer.into_error(&format!("stripe POST {path}")));
        }
        Ok(cancel_answer(&target.kind, answer))
    }

    /// GETs the event a target names (`/v2/core/events/{id}`, in its
    /// context), with its `data`.
    pub async fn event(&self, target: &Target) -> Result<Value, ProviderError> {
        if !safe_id(&target.id) {
            return Err(ProviderError::Permanent(format!(
                "unsafe event id {:?}",
                target.id
            )));
        }
        let path = format!("/v2/core/events/{}", target.id);
        let headers = self.headers(target.context.as_deref(), target.trigger_event.as_deref());
        let answer = self.http.send(Method::GET, &path, &headers, None).await?;
        if !answer.is_success() {
            return Err(answer.into_error(&format!("stripe GET {path}")));
        }
        answer.json().ok_or_else(|| {
            ProviderError::Permanent(format!("stripe GET {path}: the answer is not JSON"))
        })
    }

    /// Lists the events of account `context` (none: the platform's own)
    /// created at or after `since` (RFC 3339), `page_limit` per page,
    /// following `next_page_url` until it is null. Each event as its JSON object.
    pub async fn list_events(
        &self,
        since: &str,
        page_limit: u32,
        context: Option<&str>,
    ) -> Result<Vec<Value>, ProviderError> {
        let mut path = format!(
            "/v2/core/events?created[gte]={}&limit={page_limit}",
            url::form_urlencoded::byte_serialize(since.as_bytes()).collect::<String>()
        );
        let mut events = Vec::new();
        let mut seen_pages = std::collections::HashSet::new();
        loop {
            if !seen_pages.insert(path.clone()) {
                return Err(ProviderError::Permanent(format!(
                    "stripe event listing loops back to {path}"
                )));
            }
            let answer = self
                .http
                .send(Method::GET, &path, &self.headers(context, None), None)
                .await?;
            if !answer.is_success() {
                return Err(answer.into_error("stripe GET /v2/core/events"));
            }
            let page = answer.json().ok_or_else(|| {
                ProviderError::Permanent(
                    "stripe GET /v2/core/events: the answer is not JSON".into(),
                )
            })?;
            if let Some(data) = page.get("data").and_then(Value::as_array) {
                events.extend(data.iter().cloned());
            }
            match page.get("next_page_url").and_then(Value::as_str) {
                Some(next) if safe_path(next) => path = next.to_string(),
                Some(next) => {
                    return Err(ProviderError::Permanent(format!(
                        "stripe next_page_url {next:?} is not a /v2/ path"
                    )))
                }
                None => return Ok(events),
            }
        }
    }
}

/// Maps a cancel answer of a resource of `kind` to its outcome (Stripe's v2
/// API reference). A refusal is read by its error type as well as its
/// code: v2 names some errors by type alone (`already_canceled`,
/// `not_cancelable`, `idempotency_error`). The code is recorded, else the type.
pub fn cancel_answer(kind: &str, answer: Answer) -> CancelAnswer {
    let (error_type, code) = (answer.error_type(), answer.error_code());
    let outcome = if answer.is_success() {
        accepted_outcome(kind, &answer)
    } else {
        let named =
            |name: &str| error_type.as_deref() == Some(name) || code.as_deref() == Some(name);
        match answer.status {
            _ if named("already_canceled") || named("outbound_transfer_already_canceled") => {
                CancelOutcome::AlreadyCancelled
            }
            _ if named("not_cancelable")
                || named("outbound_transfer_not_cancelable")
                || named("batch_api_non_cancellable_job") =>
            {
                CancelOutcome::NotCancellable
            }
            409 => CancelOutcome::IdempotencyConflict,
            _ if named("idempotency_error") => CancelOutcome::IdempotencyConflict,
            404 => CancelOutcome::NotFound,
            _ if named("not_found") || named("batch_job_not_found") => CancelOutcome::NotFound,
            _ => CancelOutcome::Error,
        }
    };
    CancelAnswer {
        outcome,
        http_status: answer.status,
        error_code: code.or(error_type),
        body: answer.body_text(),
    }
}

/// A cancel Stripe answered with the object. A batch job's cancel moves it
/// to `cancelling` first; one that answers `canceled` was cancelled before.
fn accepted_outcome(kind: &str, answer: &Answer) -> CancelOutcome {
    let status = answer
        .json()
        .and_then(|o| o.get("status").and_then(Value::as_str).map(str::to_string));
    match (kind, status.as_deref()) {
        (BATCH_JOB, Some("canceled")) => CancelOutcome::AlreadyCancelled,
        _ => CancelOutcome::Accepted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderMap;

    #[test]
    fn path_rule() {
        assert!(safe_path("/v2/money_management/outbound_transfers/obt_1"));
        assert!(safe_path("/v2/core/events?page=abc&limit=10"));
        for bad in [
            "https://evil.example/v2/x",
            "//evil.example/v2/x",
            "/v1/charges",
            "v2/core",
            "/v2/../v1/x",
            "/v2/%2e%2e/v1/charges",
            "/v2/%2E%2E/v1/charges",
            "/v2/core/batch_jobs%2f..%2f..%2fv1",
            "/v2/x y",
            "/v2\\x",
            "",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }

    #[test]
    fn a_url_must_name_its_own_object() {
        let url = "/v2/money_management/outbound_transfers/obt_1";
        assert!(names_its_object(url, "obt_1"));
        assert!(!names_its_object(url, "obt_2"));
        assert!(names_its_object("/v2/core/account", "/v2/core/account"));
    }

    #[test]
    fn paths_from_kind() {
        assert_eq!(
            object_path(OUTBOUND_TRANSFER, "obt_1").unwrap(),
            "/v2/money_management/outbound_transfers/obt_1"
        );
        assert_eq!(
            object_path(BATCH_JOB, "batchv2_1").unwrap(),
            "/v2/core/batch_jobs/batchv2_1"
        );
        assert!(object_path(BATCH_JOB, "../x").is_err());
        assert!(object_path("stripe.other", "x").is_err());
    }

    #[test]
    fn cancel_outcomes() {
        let a = |status: u16, code: &str| Answer {
            status,
            headers: HeaderMap::new(),
            body: format!(
                r#"{{"error":{{"type":"invalid_request_error","code":"{code}","message":"m"}}}}"#
            )
            .into_bytes(),
        };
        let cases = [
            (200, "", CancelOutcome::Accepted),
            (
                400,
                "outbound_transfer_already_canceled",
                CancelOutcome::AlreadyCancelled,
            ),
            (
                400,
                "outbound_transfer_not_cancelable",
                CancelOutcome::NotCancellable,
            ),
            (
                400,
                "batch_api_non_cancellable_job",
                CancelOutcome::NotCancellable,
            ),
            (404, "not_found", CancelOutcome::NotFound),
            (404, "batch_job_not_found", CancelOutcome::NotFound),
            (409, "idempotency_error", CancelOutcome::IdempotencyConflict),
            (500, "api_error", CancelOutcome::Error),
        ];
        for (status, code, want) in cases {
            let answer = cancel_answer(OUTBOUND_TRANSFER, a(status, code));
            assert_eq!(answer.outcome, want, "{status} {code}");
            assert_eq!(answer.http_status, status);
            assert!(answer.body.contains("invalid_request_error"));
        }
    }

    #[test]
    fn cancel_outcomes_by_error_type() {
        let typed = |status: u16, kind: &str| Answer {
            status,
            headers: HeaderMap::new(),
            body: format!(r#"{{"error":{{"type":"{kind}","message":"m"}}}}"#).into_bytes(),
        };
        let cases = [
            (400, "already_canceled", CancelOutcome::AlreadyCancelled),
            (400, "not_cancelable", CancelOutcome::NotCancellable),
            (400, "idempotency_error", CancelOutcome::IdempotencyConflict),
            (400, "invalid_request_error", CancelOutcome::Error),
        ];
        for (status, kind, want) in cases {
            let answer = cancel_answer(OUTBOUND_TRANSFER, typed(status, kind));
            assert_eq!(answer.outcome, want, "{kind}");
            assert_eq!(
                answer.error_code.as_deref(),
                Some(kind),
                "the type is recorded"
            );
        }
    }

    #[test]
    fn a_batch_job_answered_canceled_was_cancelled_before() {
        let ok = |status: &str| Answer {
            status: 200,
            headers: HeaderMap::new(),
            body: format!(r#"{{"id":"batchv2_1","status":"{status}"}}"#).into_bytes(),
        };
        let outcome = |kind, status| cancel_answer(kind, ok(status)).outcome;
        assert_eq!(outcome(BATCH_JOB, "cancelling"), CancelOutcome::Accepted);
        assert_eq!(
            outcome(BATCH_JOB, "canceled"),
            CancelOutcome::AlreadyCancelled
        );
        assert_eq!(
            outcome(OUTBOUND_TRANSFER, "canceled"),
            CancelOutcome::Accepted
        );
    }
}
