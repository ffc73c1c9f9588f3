//! Everything a provider brings (how it signs, what its events and objects look
//! like, how its API is called, what its statuses mean) lives in its own folder
//! behind the [`Provider`] trait. Adding a provider is adding a folder and one
//! line in [`Providers::from_config`].

pub mod juice;
pub mod stripe;

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};

use crate::config::Config;

/// A delivery whose signature checked out. Only a provider's `verify` builds one.
#[derive(Debug, Clone)]
// The private field is the point: `#[non_exhaustive]` would not stop code
// elsewhere in this crate from building one.
#[allow(clippy::manual_non_exhaustive)]
pub struct Verified {
    pub provider: &'static str,
    /// Stripe: the event id. Juice: `event:lower(checksum)`.
    pub dedupe_key: String,
    pub event_type: String,
    pub event_id: Option<String>,
    /// The resource this delivery is about, when the payload names it.
    pub resource: Option<ResourceRef>,
    pub livemode: Option<bool>,
    // Private: nothing outside this module tree can build a `Verified`.
    _sealed: (),
}

/// Which resource a delivery points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRef {
    pub kind: String,
    pub id: String,
    /// Stripe account context to fetch it with.
    pub context: Option<String>,
}

/// Why a delivery was refused, with the HTTP answer it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refused {
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "malformed_payload",
            message: message.into(),
        }
    }
}

/// One webhook source.
pub trait Provider: Send + Sync {
    /// `stripe`, `juice`: the path segment under `/webhooks/` and the `provider` column.
    fn name(&self) -> &'static str;
    /// Checks the signature over the exact bytes, then decodes what the inbox needs.
    fn verify(&self, headers: &HeaderMap, body: &[u8], now_unix: i64) -> Result<Verified, Refused>;
}

/// The configured providers; one without secrets is not mounted.
#[derive(Clone, Default)]
pub struct Providers {
    pub all: Vec<Arc<dyn Provider>>,
}

impl Providers {
    pub fn from_config(config: &Config) -> Providers {
        let mut all: Vec<Arc<dyn Provider>> = Vec::new();
        if config.stripe_enabled() {
            all.push(Arc::new(stripe::Stripe::new(config.stripe.clone())));
        }
        if config.juice_enabled() {
            all.push(Arc::new(juice::Juice::new(config.juice.clone())));
        }
        Providers { all }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.all.iter().find(|p| p.name() == name)
    }
}

/// Reads a JSON object from bytes, with messages fit for a 400.
pub(crate) fn json_object(
    body: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, Refused> {
    if body.is_empty() {
        return Err(Refused::malformed("the body is empty"));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(Refused::malformed("the body is not valid UTF-8"));
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Refused::malformed("the body is JSON but not an object")),
        Err(e) => Err(Refused::malformed(format!("the body is not JSON: {e}"))),
    }
}

/// A required, non-empty string field.
pub(crate) fn required_str<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<&'a str, Refused> {
    match map.get(field) {
        None | Some(serde_json::Value::Null) => {
            Err(Refused::malformed(format!("missing field `{field}`")))
        }
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s),
        Some(serde_json::Value::String(_)) => {
            Err(Refused::malformed(format!("field `{field}` is empty")))
        }
        Some(_) => Err(Refused::malformed(format!(
            "field `{field}` must be a string"
        ))),
    }
}

/// An optional string field; a present one of another type is an error.
pub(crate) fn optional_str<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    field: &str,
) -> Result<Option<&'a str>, Refused> {
    match map.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Refused::malformed(format!(
            "field `{field}` must be a string"
        ))),
    }
}
