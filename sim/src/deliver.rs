//! Deliveries: what the simulator POSTs to a daemon's webhook endpoints,
//! signed at send time as the providers do.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::state::World;
use crate::signing;

/// Which provider a delivery comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Stripe,
    Juice,
}

impl Provider {
    /// `stripe` or `juice`: the path segment under `/webhooks/`.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::Juice => "juice",
        }
    }
}

/// One webhook delivery. `body` is the exact JSON sent: a Stripe thin event,
/// or Juice's `{"checksum","event","data"}` (the checksum is recomputed with the
/// simulator's key at send time). Stripe deliveries are signed at send time
/// with a fresh `t`, as Stripe re-signs each retry.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub provider: Provider,
    pub body: Value,
}

impl Delivery {
    /// A Stripe thin event delivery.
    pub fn stripe(event: Value) -> Self {
        Self {
            provider: Provider::Stripe,
            body: event,
        }
    }

    /// A Juice delivery, its checksum computed with `key`.
    pub fn juice(key: &str, event: &str, data: Value) -> Self {
        let checksum = signing::juice_checksum(key, event, &data);
        Self {
            provider: Provider::Juice,
            body: json!({"checksum": checksum, "event": event, "data": data}),
        }
    }

    /// The Stripe event type or the Juice event name.
    pub fn event_type(&self) -> &str {
        let field = match self.provider {
            Provider::Stripe => "type",
            Provider::Juice => "event",
        };
        self.body[field].as_str().unwrap_or_default()
    }

    /// The Stripe event id (Juice events have none).
    pub fn event_id(&self) -> Option<&str> {
        match self.provider {
            Provider::Stripe => self.body["id"].as_str(),
            Provider::Juice => None,
        }
    }
}

/// How the deliveries of a step are sent.
#[derive(Debug, Clone, Default)]
pub struct DeliveryOptions {
    /// Send every delivery twice (the second as a provider retry would).
    pub duplicate: bool,
    /// Send the deliveries of a step in random order.
    pub shuffle: bool,
    /// Pause before each send after the first.
    pub delay: Duration,
}

impl World {
    /// Remembers a delivery's event: Stripe events for the events API, Juice
    /// ones for the count.
    pub(crate) fn record_delivery(&mut self, d: &Delivery) {
        match d.provider {
            Provider::Stripe => self.record_stripe_event(&d.body),
            Provider::Juice => {
                let event = d.body["event"].as_str().unwrap_or_default();
                self.record_juice_event(event, &d.body["data"]);
            }
        }
    }
}

/// Keys the deliveries are signed with.
#[derive(Clone)]
pub(crate) struct Signer {
    pub stripe_webhook_secret: String,
    pub juice_checksum_key: String,
}

const ATTEMPTS: u32 = 5;
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The exact bytes and headers of one send.
pub(crate) fn prepare(signer: &Signer, d: &Delivery) -> anyhow::Result<(Vec<u8>, Option<String>)> {
    match d.provider {
        Provider::Stripe => {
            let body = serde_json::to_vec(&d.body)?;
            let header = signing::stripe_signature(
                &signer.stripe_webhook_secret,
                chrono::Utc::now().timestamp(),
                &body,
            );
            Ok((body, Some(header)))
        }
        Provider::Juice => {
            let event = d.body["event"]
                .as_str()
                .context("a Juice delivery needs `event`")?;
            let data = &d.body["data"];
            let checksum = signing::juice_checksum(&signer.juice_checksum_key, event, data);
            let body = json!({"checksum": checksum, "event": event, "data": data});
            Ok((serde_json::to_vec(&body)?, None))
        }
    }
}

/// POSTs one delivery to `{target}/webhooks/<provider>`, retrying connection
/// errors, 408, 429 and 5xx a few times with a short backoff (re-signing each
/// time). Fails if the daemon never accepts it or refuses it outright.
pub(crate) async fn send(
    client: &reqwest::Client,
    target: &str,
    signer: &Signer,
    d: &Delivery,
) -> anyhow::Result<()> {
    let url = format!(
        "{}/webhooks/{}",
        target.trim_end_matches('/'),
        d.provider.name()
    );
    let mut backoff = BACKOFF_START;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let (body, signature) = prepare(signer, d)?;
        let mut request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(sig) = signature {
            request = request
                .header(signing::STRIPE_SIGNATURE_HEADER, sig)
                .header(
                    "user-agent",
                    "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
                );
        }
        match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                let retryable = status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                if !retryable {
                    bail!(
                        "{url} refused {} {}: {status} {text}",
                        d.provider.name(),
                        d.event_type()
                    );
                }
                last = format!("{status} {text}");
            }
            Err(e) => last = e.to_string(),
        }
    }
    bail!(
        "{url} did not accept {} {} after {ATTEMPTS} attempts: {last}",
        d.provider.name(),
        d.event_type()
    )
}
