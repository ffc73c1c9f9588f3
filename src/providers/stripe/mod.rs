//! Stripe v2: thin events signed with `Stripe-Signature`.

pub mod api;
pub mod config;
pub mod event;
pub mod knowledge;
pub mod objects;
pub mod signature;

use axum::http::HeaderMap;

use super::{
    CancelAnswer, Listing, Observation, Provider, ProviderError, Refused, Resolved, Target,
    Verified,
};
use crate::config::{StripeConfig, WorkerConfig};

pub const NAME: &str = "stripe";
pub const SIGNATURE_HEADER: &str = "stripe-signature";

pub struct Stripe {
    config: StripeConfig,
    api: api::StripeApi,
}

impl Stripe {
    pub fn new(config: StripeConfig, workers: &WorkerConfig) -> Self {
        let api = api::StripeApi::new(&config, workers);
        Self { config, api }
    }

    /// The API client (backfill lists events with it).
    pub fn api(&self) -> &api::StripeApi {
        &self.api
    }
}

#[async_trait::async_trait]
impl Provider for Stripe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn webhooks_enabled(&self) -> bool {
        !self.config.webhook_secrets.is_empty()
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
        self.api.fetch(target).await
    }

    async fn cancel(
        &self,
        target: &Target,
        idempotency_key: &str,
    ) -> Result<CancelAnswer, ProviderError> {
        if !self.api_enabled() {
            return Err(ProviderError::NotConfigured(NAME));
        }
        self.api.cancel(target, idempotency_key).await
    }

    fn verify(&self, headers: &HeaderMap, body: &[u8], now_unix: i64) -> Result<Verified, Refused> {
        let mut values = headers.get_all(SIGNATURE_HEADER).iter();
        let header = match (values.next(), values.next()) {
            (None, _) => {
                return Err(Refused::unauthorized(
                    "missing_signature",
                    "the Stripe-Signature header is missing",
                ))
            }
            (Some(_), Some(_)) => {
                return Err(Refused::unauthorized(
                    "invalid_signature",
                    "the Stripe-Signature header appears more than once",
                ))
            }
            (Some(v), None) => v.to_str().map_err(|_| {
                Refused::unauthorized(
                    "invalid_signature",
                    "the Stripe-Signature header is not ASCII",
                )
            })?,
        };
        signature::verify(
            header,
            body,
            &self.config.webhook_secrets,
            self.config.tolerance_secs,
            now_unix,
        )
        .map_err(|e| match e {
            signature::SignatureError::Missing => {
                Refused::unauthorized("missing_signature", e.to_string())
            }
            signature::SignatureError::TooOld { .. } => {
                Refused::unauthorized("timestamp_out_of_tolerance", e.to_string())
            }
            _ => Refused::unauthorized("invalid_signature", e.to_string()),
        })?;
        Ok(verified(event::ThinEvent::decode(body)?))
    }

    /// Stripe keeps its events for 30 days.
    fn events_listed_for(&self) -> Option<std::time::Duration> {
        Some(std::time::Duration::from_secs(30 * 86_400))
    }

    /// Events newest first, a page at a time, of one account context; the
    /// dedupe key is the event id, as for webhooks, so a listed event
    /// already delivered is known.
    async fn list_events(
        &self,
        since: &str,
        context: Option<&str>,
    ) -> Result<Listing, ProviderError> {
        if !self.api_enabled() {
            return Err(ProviderError::NotConfigured(NAME));
        }
        let mut listing = Listing::default();
        for object in self
            .api
            .list_events(since, api::PAGE_LIMIT, context)
            .await?
        {
            let raw_body = serde_json::to_vec(&object).unwrap_or_default();
            match event::ThinEvent::decode(&raw_body) {
                Ok(thin) => listing.events.push((verified(thin), raw_body)),
                Err(e) => {
                    tracing::warn!(error = %e, "backfill: skipping a listed object that is not a v2 event");
                    listing.skipped += 1;
                }
            }
        }
        Ok(listing)
    }

    /// An event that says Stripe failed to generate another names, in its
    /// `data.impact`, the object (and context) that one was about.
    async fn resolve(&self, target: Target) -> Result<Resolved, ProviderError> {
        if target.kind != event::EVENT_LOOKUP {
            return Ok(Resolved::Fetch(target));
        }
        if !self.api_enabled() {
            return Err(ProviderError::NotConfigured(NAME));
        }
        let event = self.api.event(&target).await?;
        Ok(event::impacted(&event, &target, |event_type| {
            knowledge::follows(&self.config, event_type)
        }))
    }
}

/// A thin event whose signature checked out, or that Stripe's API listed.
fn verified(event: event::ThinEvent) -> Verified {
    Verified {
        provider: NAME,
        dedupe_key: event.id.clone(),
        event_type: event.event_type.clone(),
        resource: event.resource(),
        livemode: event.livemode,
        event_id: Some(event.id),
        _sealed: (),
    }
}
