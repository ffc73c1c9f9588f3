//! The Juice bulk transfers API (Juice's API reference): fetch and cancel.

use reqwest::header::{HeaderName, AUTHORIZATION};
use reqwest::Method;

use super::objects;
use crate::config::{JuiceConfig, WorkerConfig};
use crate::providers::http::{Answer, HttpClient};
use crate::providers::limit::RateLimit;
use crate::providers::{safe_id, CancelAnswer, CancelOutcome, Observation, ProviderError};

/// A Juice API client.
#[derive(Clone)]
pub struct JuiceApi {
    http: HttpClient,
    authorization: String,
    reversed_statuses: Vec<String>,
}

impl JuiceApi {
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
            ),
            authorization,
            reversed_statuses: config.reversed_statuses.clone(),
        }
    }

    fn headers(&self) -> Vec<(HeaderName, String)> {
        vec![(AUTHORIZATION, self.authorization.clone())]
    }

    fn path(id: &str) -> Result<String, ProviderError> {
        if safe_id(id) {
            Ok(format!("/bulk-transfers/{id}"))
        } else {
            Err(ProviderError::Permanent(format!(
                "juice: unsafe bulk transfer id {id:?}"
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
        objects::decode_bulk(id, body, &self.reversed_statuses).map_err(ProviderError::Permanent)
    }

    /// POSTs `/bulk-transfers/{id}/cancel` and maps the answer.
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
        let answer = self
            .http
            .send(Method::POST, &path, &headers, Some(b"{}".to_vec()))
            .await?;
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
            (500, "oops, not json", CancelOutcome::Error),
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
