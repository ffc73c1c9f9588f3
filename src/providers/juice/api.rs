//! The Juice bulk transfers API (Juice's API reference): fetch and cancel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use reqwest::header::{HeaderName, AUTHORIZATION};
use reqwest::Method;

use super::objects;
use crate::config::{JuiceConfig, WorkerConfig};
use crate::providers::http::{Answer, HttpClient, Sent};
use crate::providers::limit::RateLimit;
use crate::providers::{safe_id, CancelAnswer, CancelOutcome, Observation, ProviderError};

/// A Juice API client.
#[derive(Clone)]
pub struct JuiceApi {
    http: HttpClient,
    authorization: String,
    reversed_statuses: Vec<String>,
    item_currency_fields: Vec<String>,
    unrecorded: Arc<Mutex<Reported>>,
}

/// Most bulk transfers whose unrecorded items are remembered as reported;
/// beyond, the memory starts again (a bulk transfer may be reported twice).
const REPORTED_KEPT: usize = 10_000;

/// The items each bulk transfer was last reported to hold that could not
/// be recorded, so that each is logged and counted once, not at every fetch.
type Reported = HashMap<String, objects::Unrecorded>;

impl JuiceApi {
    /// The HTTP client, whose request budget the replicas share.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    pub fn new(config: &JuiceConfig, workers: &WorkerConfig) -> JuiceApi {
        let authorization = if config.auth_scheme == "bearer" {
            format!("Bearer {}", config.api_key)
        } else {
            config.api_key.clone()
        };
        JuiceApi {
            http: HttpClient::new(
                super::NAME,
                &config.api_base,
                workers,
                RateLimit::new(config.rate_limit_per_second, config.rate_limit_burst),
                config.max_response_bytes,
            ),
            authorization,
            reversed_statuses: config.reversed_statuses.clone(),
            item_currency_fields: config.item_currency_fields.clone(),
            unrecorded: Arc::default(),
        }
    }

    /// Logs and counts (`cancelwatch_unkeyed_items_total`) the items of a
    /// bulk transfer that could not be recorded as transfers of their own,
    /// once per bulk transfer (again only when more turn up). They are not
    /// lost: the bulk transfer's snapshot keeps every item as fetched.
    fn report_unrecorded(&self, bulk_id: &str, found: objects::Unrecorded) {
        if found == objects::Unrecorded::default() {
            return;
        }
        let mut reported = self.unrecorded.lock().unwrap_or_else(|e| e.into_inner());
        let before = reported.get(bulk_id).copied().unwrap_or_default();
        if found.unkeyed <= before.unkeyed && found.without_status <= before.without_status {
            return;
        }
        if reported.len() >= REPORTED_KEPT {
            reported.clear();
        }
        reported.insert(bulk_id.to_string(), found);
        drop(reported);
        let more = found.unkeyed.saturating_sub(before.unkeyed);
        metrics::counter!("cancelwatch_unkeyed_items_total", "provider" => super::NAME)
            .increment(more as u64);
        tracing::warn!(
            bulk_transfer = %bulk_id,
            unkeyed = found.unkeyed,
            without_status = found.without_status,
            "juice: items of this bulk transfer have neither an id nor a reference, or no \
             status; they are not recorded as transfers of their own and stay in the bulk \
             transfer's snapshot"
        );
    }

    fn headers(&self) -> Vec<(HeaderName, String)> {
        vec![(AUTHORIZATION, self.authorization.clone())]
    }

    fn path(id: &str) -> Result<String, ProviderError> {
        if safe_id(id) {
            Ok(format!("/bulk-transfers/{id}"))
        } else {
            Err(ProviderError::Unusable(format!(
                "juice: unsafe bulk transfer id {id:?}: it forms no valid API path"
            )))
        }
    }

    /// GETs a bulk transfer with its items.
    pub async fn fetch_bulk(&self, id: &str) -> Result<Observation, ProviderError> {
        let path = Self::path(id)?;
        let answer = self
            .http
            .send(Method::GET, &path, &self.headers(), None)
            .await?;
        if !answer.is_success() {
            return Err(answer.into_error(&format!("juice GET {path}")));
        }
        let body = answer.json().ok_or_else(|| {
            ProviderError::Permanent(format!("juice GET {path}: the answer is not JSON"))
        })?;
        let reading = objects::Reading {
            reversed: &self.reversed_statuses,
            currency_fields: &self.item_currency_fields,
        };
        let (obs, unrecorded) =
            objects::decode_bulk_counted(id, body, &reading).map_err(ProviderError::Permanent)?;
        self.report_unrecorded(&obs.id, unrecorded);
        Ok(obs)
    }

    /// POSTs `/bulk-transfers/{id}/cancel` and maps the answer. Juice
    /// documents no idempotency for it: a cancel whose answer was lost may
    /// have been applied, and sent again it would answer `invalid_state` and
    /// hide the first answer (a `partial_cancellation`, say). So it is never
    /// sent twice blindly ([`HttpClient::send_unrepeated`]): a lost answer
    /// is [`ProviderError::Unanswered`], a 5xx [`CancelOutcome::Unknown`],
    /// and the state fetched next tells what happened. The key is sent all
    /// the same, for an account where Juice honours it.
    pub async fn cancel_bulk(
        &self,
        id: &str,
        idempotency_key: &str,
    ) -> Result<CancelAnswer, ProviderError> {
        let path = format!("{}/cancel", Self::path(id)?);
        let mut headers = self.headers();
        headers.push((
            HeaderName::from_static("idempotency-key"),
            idempotency_key.to_string(),
        ));
        let sent = self
            .http
            .send_unrepeated(Method::POST, &path, &headers, Some(b"{}".to_vec()))
            .await?;
        let answer = match sent {
            Sent::Answered(answer) => answer,
            Sent::Unanswered(message) => return Err(ProviderError::Unanswered(message)),
        };
        if matches!(answer.status, 401 | 403) {
            return Err(answer.into_error(&format!("juice POST {path}")));
        }
        Ok(cancel_answer(answer))
    }
}

/// The error code of a Juice answer: `error.code`, a top-level `code`, or the
/// first of `errors[]`.
fn juice_code(answer: &Answer) -> Option<String> {
    answer.error_code().or_else(|| {
        let v = answer.json()?;
        let first = v.get("errors")?.as_array()?.first()?.clone();
        first
            .get("code")
            .and_then(|c| c.as_str())
            .or_else(|| first.as_str())
            .map(str::to_string)
    })
}

/// Maps a cancel answer to its outcome (Juice's API reference).
pub fn cancel_answer(answer: Answer) -> CancelAnswer {
    let code = juice_code(&answer);
    let outcome = match (answer.status, code.as_deref()) {
        (_, Some("partial_cancellation")) => CancelOutcome::PartialCancellation,
        (s, _) if (200..300).contains(&s) => CancelOutcome::Accepted,
        (_, Some("bulk_transfer_not_found")) | (404, _) => CancelOutcome::NotFound,
        (_, Some("invalid_state")) => CancelOutcome::NotCancellable,
        (_, Some("already_cancelled")) => CancelOutcome::AlreadyCancelled,
        (_, Some("idempotency_error" | "idempotency_conflict")) | (409, _) => {
            CancelOutcome::IdempotencyConflict
        }
        // The provider failed, or gave up waiting, after the request reached it.
        (s, _) if s >= 500 || s == 408 => CancelOutcome::Unknown,
        _ => CancelOutcome::Error,
    };
    CancelAnswer {
        outcome,
        http_status: answer.status,
        error_code: code,
        body: answer.body_text(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderMap;

    fn a(status: u16, body: &str) -> Answer {
        Answer {
            status,
            headers: HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn cancel_outcomes() {
        let cases = [
            (
                200,
                r#"{"data":{"id":"b","status":"cancelled"}}"#,
                CancelOutcome::Accepted,
            ),
            (
                422,
                r#"{"error":{"code":"partial_cancellation","message":"m","type":"t","details":{}}}"#,
                CancelOutcome::PartialCancellation,
            ),
            (
                200,
                r#"{"code":"partial_cancellation","message":"some transfers could not be cancelled"}"#,
                CancelOutcome::PartialCancellation,
            ),
            (
                400,
                r#"{"error":{"code":"invalid_state"}}"#,
                CancelOutcome::NotCancellable,
            ),
            (
                404,
                r#"{"error":{"code":"bulk_transfer_not_found"}}"#,
                CancelOutcome::NotFound,
            ),
            (
                400,
                r#"{"message":"bad","errors":[{"code":"bulk_transfer_not_found"}]}"#,
                CancelOutcome::NotFound,
            ),
            (500, "oops, not json", CancelOutcome::Unknown),
            (
                503,
                r#"{"error":{"code":"service_unavailable"}}"#,
                CancelOutcome::Unknown,
            ),
            (429, r#"{"retry_after": 1}"#, CancelOutcome::Error),
        ];
        for (status, body, want) in cases {
            let answer = cancel_answer(a(status, body));
            assert_eq!(answer.outcome, want, "{status} {body}");
            assert_eq!(answer.body, body);
        }
    }

    #[test]
    fn auth_scheme() {
        let mut cfg = JuiceConfig {
            api_key: "jk_1".into(),
            ..JuiceConfig::default()
        };
        let workers = WorkerConfig::default();
        assert_eq!(JuiceApi::new(&cfg, &workers).headers()[0].1, "jk_1");
        cfg.auth_scheme = "bearer".into();
        assert_eq!(JuiceApi::new(&cfg, &workers).headers()[0].1, "Bearer jk_1");
    }

    #[test]
    fn unsafe_ids_are_refused() {
        assert!(JuiceApi::path("6f1c1e9a-0000-4000-8000-000000000001").is_ok());
        assert!(JuiceApi::path("../admin").is_err());
        assert!(JuiceApi::path("a/b").is_err());
    }
}
