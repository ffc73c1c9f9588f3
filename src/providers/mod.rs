//! Everything a provider brings (how it signs, what its events and objects look
//! like, how its API is called, what its statuses mean) lives in its own folder
//! behind the [`Provider`] trait. Adding a provider is adding a folder and one
//! line in [`Providers::from_config`].

pub mod http;
pub mod juice;
pub mod knowledge;
pub mod limit;
pub mod stripe;

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use serde::Serialize;

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

/// Why a delivery was refused: what is wrong with it, a stable code and a
/// message for the sender. The webhook route decides the HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Refused {
    pub kind: RefusalKind,
    pub code: &'static str,
    pub message: String,
}

/// Every [`Refused::code`] the providers give, for the counters of refusals
/// to exist from the start.
pub const REFUSAL_CODES: [&str; 6] = [
    "missing_signature",
    "invalid_signature",
    "timestamp_out_of_tolerance",
    "malformed_payload",
    "unexpected_object",
    "payload_too_large",
];

/// What is wrong with a refused delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Its signature is missing, wrong or too old.
    Unauthenticated,
    /// It is not a well-formed delivery of this provider.
    Malformed,
    /// Its body is over the size limit.
    TooLarge,
}

impl Refused {
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind: RefusalKind::Unauthenticated,
            code,
            message: message.into(),
        }
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self {
            kind: RefusalKind::Malformed,
            code: "malformed_payload",
            message: message.into(),
        }
    }
}

/// One provider: its webhooks (verify) and its API (fetch, cancel).
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// `stripe`, `juice`: the path segment under `/webhooks/` and the `provider` column.
    fn name(&self) -> &'static str;
    /// True when webhook secrets are configured: `/webhooks/<name>` is mounted.
    fn webhooks_enabled(&self) -> bool;
    /// True when an API key is configured: `fetch` and `cancel` can be called.
    fn api_enabled(&self) -> bool;
    /// Spends a `replicas`-th of the request budget from now on: that many
    /// replicas share the provider's rate limit.
    fn share_budget(&self, replicas: u32);
    /// Checks the signature over the exact bytes, then decodes what the inbox needs.
    fn verify(&self, headers: &HeaderMap, body: &[u8], now_unix: i64) -> Result<Verified, Refused>;
    /// Fetches the current state of a resource.
    async fn fetch(&self, target: &Target) -> Result<Observation, ProviderError>;
    /// Calls the provider's cancel endpoint with an idempotency key.
    async fn cancel(
        &self,
        target: &Target,
        idempotency_key: &str,
    ) -> Result<CancelAnswer, ProviderError>;
    /// How far back its API lists its events ([`Provider::list_events`]),
    /// when it lists them: the catch-up job runs for it, never further back.
    fn events_listed_for(&self) -> Option<Duration> {
        None
    }
    /// Lists the events created at or after `since` (RFC 3339) of one
    /// account `context` (none: the provider's own account), for a
    /// backfill. A provider whose API lists no events refuses.
    async fn list_events(
        &self,
        since: &str,
        context: Option<&str>,
    ) -> Result<Listing, ProviderError> {
        let _ = (since, context);
        Err(ProviderError::Permanent(format!(
            "{} has no API that lists its events",
            self.name()
        )))
    }
    /// What a target to fetch names, when the delivery could not say it (a
    /// Stripe event announcing that an event about some object was never
    /// generated): the target to fetch, or why there is none. Any other
    /// target is itself.
    async fn resolve(&self, target: Target) -> Result<Resolved, ProviderError> {
        Ok(Resolved::Fetch(target))
    }
}

/// What a target turned out to name ([`Provider::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Fetch this.
    Fetch(Target),
    /// Nothing to fetch, and why: the delivery is marked `ignored`.
    Nothing(String),
}

/// What a provider's event listing found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Every listed event, as the inbox stores a delivery of it.
    pub events: Vec<(Verified, Vec<u8>)>,
    /// Listed objects that were not events the provider's decoder accepts.
    pub skipped: usize,
}

/// The configured providers. A provider is built when it has webhook secrets
/// (its webhook path is mounted) or an API key (fetch, cancel, reconcile).
#[derive(Clone, Default)]
pub struct Providers {
    pub all: Vec<Arc<dyn Provider>>,
}

impl Providers {
    pub fn from_config(config: &Config) -> Providers {
        let mut all: Vec<Arc<dyn Provider>> = Vec::new();
        if config.stripe_enabled() || !config.stripe.api_key.is_empty() {
            all.push(Arc::new(stripe::Stripe::new(
                config.stripe.clone(),
                &config.workers,
            )));
        }
        if config.juice_enabled() || !config.juice.api_key.is_empty() {
            all.push(Arc::new(juice::Juice::new(
                config.juice.clone(),
                &config.workers,
            )));
        }
        Providers { all }
    }

    /// The provider whose webhook endpoint is mounted, by name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.all
            .iter()
            .find(|p| p.name() == name && p.webhooks_enabled())
    }

    /// The provider whose API can be called, by name.
    /// Every provider's request budget shared among `replicas` processes.
    pub fn share_budget(&self, replicas: u32) {
        for p in &self.all {
            p.share_budget(replicas);
        }
    }

    pub fn api(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.all
            .iter()
            .find(|p| p.name() == name && p.api_enabled())
    }
}

/// The provider of a resource kind: the part before the dot (`stripe.batch_job` → `stripe`).
pub fn provider_of(kind: &str) -> &str {
    kind.split('.').next().unwrap_or(kind)
}

/// What to fetch (or cancel), and why.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Target {
    /// e.g. `stripe.outbound_transfer`.
    pub kind: String,
    pub id: String,
    /// Stripe account context (`Stripe-Context`).
    pub context: Option<String>,
    /// Stripe: the event's `related_object.url`, followed only when it is a `/v2/` path.
    pub url: Option<String>,
    /// Stripe: the event that triggered the fetch (`Stripe-Request-Trigger: event=…`).
    pub trigger_event: Option<String>,
    /// Stripe: when that event was created, the provider's time of a state
    /// whose object carries none (a batch job has no `status_transitions`).
    pub trigger_created: Option<String>,
}

/// How a status behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusClass {
    /// Still moving (`processing`, `cancelling`, `executing`, unknown values): reconciled, may be stuck.
    Transitional,
    /// At rest but not final (Stripe `posted`, may still be `returned`; Juice item
    /// `cancelled`, awaiting its reversal): never stuck, reconciled only while
    /// its provider watches it ([`knowledge::Watch`]) or its refund is pending.
    Settled,
    /// Final: never moves again.
    Terminal,
}

/// Batch progress counts at one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Progress {
    pub success: Option<i64>,
    pub failure: Option<i64>,
    pub validated: Option<i64>,
}

/// The state of the money side of a cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundStatus {
    Pending,
    Completed,
    Failed,
}

impl RefundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RefundStatus::Pending => "pending",
            RefundStatus::Completed => "completed",
            RefundStatus::Failed => "failed",
        }
    }
}

/// What one observation says about a transfer's refund (SPEC "Refund progress").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefundSignal {
    pub status: RefundStatus,
    /// The status that opened (or moved) it: canceled, failed, returned, cancelled, reversed, …
    pub reason: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
}

/// A resource as fetched from its provider, decoded defensively.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Observation {
    pub provider: &'static str,
    pub kind: String,
    pub id: String,
    pub parent_id: Option<String>,
    /// Open: stored as it came.
    pub status: String,
    pub class: StatusClass,
    /// The provider's own time of this status, RFC 3339 UTC millis.
    pub provider_at: Option<String>,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub livemode: Option<bool>,
    /// The object as fetched, as JSON text: written out here, by the task
    /// that fetched it, rather than by the recorder while it holds the writer.
    pub snapshot: String,
    pub progress: Option<Progress>,
    /// Juice items, recorded as resources of their own.
    pub children: Vec<Observation>,
    pub refund: Option<RefundSignal>,
}

/// What a provider answered to a cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelOutcome {
    Accepted,
    AlreadyCancelled,
    NotCancellable,
    NotFound,
    /// Juice: some transfers could not be cancelled. The state DID change.
    PartialCancellation,
    IdempotencyConflict,
    /// The cancel went out but its answer was lost (timeout, connection
    /// reset, 5xx): it may have taken effect. Only the state can tell.
    Unknown,
    Error,
}

impl CancelOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CancelOutcome::Accepted => "accepted",
            CancelOutcome::AlreadyCancelled => "already_cancelled",
            CancelOutcome::NotCancellable => "not_cancellable",
            CancelOutcome::NotFound => "not_found",
            CancelOutcome::PartialCancellation => "partial_cancellation",
            CancelOutcome::IdempotencyConflict => "idempotency_conflict",
            CancelOutcome::Unknown => "unknown",
            CancelOutcome::Error => "error",
        }
    }
}

/// The provider's answer to a cancel call, raw body kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CancelAnswer {
    pub outcome: CancelOutcome,
    pub http_status: u16,
    pub error_code: Option<String>,
    pub body: String,
}

/// Why a provider call did not give an answer to use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth another try later (network, timeout, 5xx, 409).
    #[error("{message}")]
    Retryable {
        message: String,
        /// What the provider asked for (`Retry-After`, Juice `retry_after`).
        retry_after: Option<Duration>,
    },
    /// 429: the provider asks us to slow down. Nothing is wrong with the
    /// request, so a delivery waits for it without using up an attempt.
    #[error("rate limited: {message}")]
    RateLimited {
        message: String,
        /// What the provider asked for (`Retry-After`, Juice `retry_after`).
        retry_after: Option<Duration>,
    },
    /// 404: the resource does not exist (for this key and context).
    #[error("not found: {0}")]
    NotFound(String),
    /// 401/403: the API key is wrong or lacks rights. Nothing is dropped for it.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The provider has no API key configured.
    #[error("no API key configured for {0}")]
    NotConfigured(&'static str),
    /// Will fail the same way again (bad path, undecodable answer, other 4xx).
    #[error("{0}")]
    Permanent(String),
    /// The request can never be made: what the delivery names forms no
    /// valid path on the provider's API (an id with characters a path
    /// cannot hold, a kind with no known path). Nothing was sent.
    #[error("{0}")]
    Unusable(String),
    /// A request that must not be sent twice went out, but no answer came
    /// back (timeout, connection reset): it may have taken effect.
    #[error("no answer: {0}")]
    Unanswered(String),
}

impl ProviderError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ProviderError::Retryable { .. } => "retryable",
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::NotFound(_) => "not_found",
            ProviderError::Unauthorized(_) => "unauthorized",
            ProviderError::NotConfigured(_) => "not_configured",
            ProviderError::Permanent(_) => "permanent",
            ProviderError::Unusable(_) => "unusable",
            ProviderError::Unanswered(_) => "unanswered",
        }
    }
}

pub use knowledge::{classify, rank};

/// An id safe to put in a URL path: letters, digits, `_` and `-`.
pub(crate) fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A JSON integer that may come as a number or as a string of digits.
pub(crate) fn lenient_i64(v: Option<&serde_json::Value>) -> Option<i64> {
    match v? {
        serde_json::Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A provider time as our one text form (zone-less read as UTC).
pub(crate) fn lenient_time(v: Option<&serde_json::Value>) -> Option<String> {
    v?.as_str()
        .and_then(crate::time::parse_lenient)
        .map(crate::time::fmt)
}

/// Reads a JSON object from bytes, with messages fit for a 400, in one
/// pass that also refuses a key held twice (see [`parse_unrepeated`]).
pub(crate) fn json_object(
    body: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, Refused> {
    if body.is_empty() {
        return Err(Refused::malformed("the body is empty"));
    }
    if std::str::from_utf8(body).is_err() {
        return Err(Refused::malformed("the body is not valid UTF-8"));
    }
    match parse_unrepeated(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(Refused::malformed("the body is JSON but not an object")),
        Err(Unparsed::Repeated(key)) => Err(Refused::malformed(format!(
            "the body repeats the key {key:?}: which one counts would be a guess"
        ))),
        Err(Unparsed::Invalid(e)) => Err(Refused::malformed(format!("the body is not JSON: {e}"))),
    }
}

/// Why [`parse_unrepeated`] gave no value.
#[derive(Debug)]
enum Unparsed {
    /// An object (at any depth) holds this key twice.
    Repeated(String),
    Invalid(serde_json::Error),
}

/// Parses `body` as serde_json would, refusing an object (at any depth)
/// that holds a key twice. A JSON parser keeps one of the two (serde_json
/// the last, SQLite's `json_extract` the first), so the stored body and
/// what was decided from it could disagree: such a body is refused.
fn parse_unrepeated(body: &[u8]) -> Result<serde_json::Value, Unparsed> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;

    /// Builds the value; the first key found twice is noted in `.0`.
    struct Build<'a>(&'a std::cell::RefCell<Option<String>>);
    impl<'de> DeserializeSeed<'de> for Build<'_> {
        type Value = Value;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Build<'_> {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
            let mut map = serde_json::Map::new();
            while let Some(key) = access.next_key::<String>()? {
                let value = access.next_value_seed(Build(self.0))?;
                if map.contains_key(&key) {
                    *self.0.borrow_mut() = Some(key);
                    return Err(serde::de::Error::custom("a key held twice"));
                }
                map.insert(key, value);
            }
            Ok(Value::Object(map))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = access.next_element_seed(Build(self.0))? {
                items.push(item);
            }
            Ok(Value::Array(items))
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_string()))
        }
        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
    }
    let repeated = std::cell::RefCell::new(None);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = Build(&repeated)
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
    match (parsed, repeated.into_inner()) {
        (_, Some(key)) => Err(Unparsed::Repeated(key)),
        (Ok(value), None) => Ok(value),
        (Err(e), None) => Err(Unparsed::Invalid(e)),
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

#[cfg(test)]
mod json_tests {
    use super::*;

    /// The key an object in `body` holds twice, if any.
    fn repeated_key(body: &[u8]) -> Option<String> {
        match parse_unrepeated(body) {
            Err(Unparsed::Repeated(key)) => Some(key),
            _ => None,
        }
    }

    /// One pass gives what serde_json gives, for every kind of value.
    #[test]
    fn the_one_pass_parses_as_serde_json_does() {
        let body = br#"{"a":[1,-2,3.5,1e300,"s\u00e9",true,null,{"b":{}}],"c":"/x"}"#;
        let ours = parse_unrepeated(body).unwrap();
        let theirs: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(ours, theirs);
        assert!(matches!(
            parse_unrepeated(b"{} x"),
            Err(Unparsed::Invalid(_))
        ));
    }

    #[test]
    fn a_key_held_twice_at_any_depth_is_refused() {
        assert_eq!(repeated_key(br#"{"a":1,"b":[{"c":1}]}"#), None);
        assert_eq!(
            repeated_key(br#"{"id":"evt_1","id":"evt_2"}"#).as_deref(),
            Some("id")
        );
        let nested = br#"{"data":{"items":[{"ref":"x","ref":"y"}]}}"#;
        assert_eq!(repeated_key(nested).as_deref(), Some("ref"));
        let refused = json_object(br#"{"type":"a","type":"b"}"#).unwrap_err();
        assert_eq!(refused.kind, RefusalKind::Malformed);
        assert!(refused.message.contains("\"type\""), "{}", refused.message);
    }
}
