//! Juice (spendjuice): webhooks that carry a checksum in the body.

pub mod api;
pub mod checksum;
pub mod config;
pub mod event;
pub mod knowledge;
pub mod objects;

use axum::http::HeaderMap;

use super::{
    json_object, required_str, CancelAnswer, Observation, Provider, ProviderError, Refused, Target,
    Verified,
};
use crate::config::{JuiceConfig, WorkerConfig};

pub const NAME: &str = "juice";

pub struct Juice {
    config: JuiceConfig,
    api: api::JuiceApi,
}

impl Juice {
    pub fn new(config: JuiceConfig, workers: &WorkerConfig) -> Self {
        let api = api::JuiceApi::new(&config, workers);
        Self { config, api }
    }
}

/// Only bulk transfers are fetched; an item is fetched through its parent.
fn bulk_id(target: &Target) -> Result<&str, ProviderError> {
    match target.kind.as_str() {
        event::BULK_TRANSFER => Ok(&target.id),
        other => Err(ProviderError::Permanent(format!(
            "juice: {other} is fetched through its bulk transfer"
        ))),
    }
}

#[async_trait::async_trait]
impl Provider for Juice {
    fn name(&self) -> &'static str {
        NAME
    }

    fn webhooks_enabled(&self) -> bool {
        !self.config.checksum_keys.is_empty()
    }

    fn api_enabled(&self) -> bool {
        !self.config.api_key.is_empty()
    }

    fn share_budget(&self, replicas: u32) {
        self.api.http().share_budget(replicas);
    }

    async fn fetch(&self, target: &Target) -> Result<Observation, ProviderError> {
        if !self.api_enabled() {
            return Err(ProviderError::NotConfigured(NAME));
        }
        self.api.fetch_bulk(bulk_id(target)?).await
    }

    async fn cancel(
        &self,
        target: &Target,
        idempotency_key: &str,
    ) -> Result<CancelAnswer, ProviderError> {
        if !self.api_enabled() {
            return Err(ProviderError::NotConfigured(NAME));
        }
        self.api
            .cancel_bulk(bulk_id(target)?, idempotency_key)
            .await
    }

    /// The checksum sits inside the body, so the body is parsed first; then the
    /// checksum is checked over event + canonical(data); only then is the
    /// content trusted.
    fn verify(
        &self,
        _headers: &HeaderMap,
        body: &[u8],
        _now_unix: i64,
    ) -> Result<Verified, Refused> {
        let map = json_object(body)?;
        let checksum = match map.get("checksum") {
            None | Some(serde_json::Value::Null) => {
                return Err(Refused::unauthorized(
                    "missing_signature",
                    "the body has no `checksum`",
                ))
            }
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.as_str(),
            Some(_) => {
                return Err(Refused::unauthorized(
                    "invalid_signature",
                    "`checksum` must be a non-empty hex string",
                ))
            }
        };
        let event = required_str(&map, "event")?;
        let data = map
            .get("data")
            .ok_or_else(|| Refused::malformed("missing field `data`"))?;
        if !data.is_object() {
            return Err(Refused::malformed("field `data` must be an object"));
        }
        checksum::within_bounds(data).map_err(Refused::malformed)?;
        if !checksum::verify(checksum, event, data, &self.config.checksum_keys) {
            return Err(Refused::unauthorized(
                "invalid_signature",
                "the checksum matches no configured key",
            ));
        }
        Ok(Verified {
            provider: NAME,
            dedupe_key: format!("{event}:{}", checksum.to_ascii_lowercase()),
            event_type: event.to_string(),
            event_id: None,
            resource: event::resource(event, data),
            livemode: None,
            _sealed: (),
        })
    }
}
