//! The rows the audit queries return, with the columns each is read from.

use serde::Serialize;
use sqlx::FromRow;

use super::{json_text, json_text_opt};

/// What caused an observation: `event`, `reconcile`, `cancel`, `backfill`, `replay`.
#[derive(Debug, Clone, FromRow, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Trigger {
    #[sqlx(rename = "trigger_type")]
    #[serde(rename = "type")]
    pub kind: String,
    #[sqlx(rename = "trigger_id")]
    pub id: Option<String>,
}

/// One observed status change, in the JSON form the API documents.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Transition {
    pub id: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub from_status: Option<String>,
    pub to_status: String,
    pub observed_at: String,
    pub provider_at: Option<String>,
    #[sqlx(flatten)]
    pub trigger: Trigger,
    pub livemode: Option<bool>,
}

pub(super) const TRANSITION_COLUMNS: &str =
    "id, provider, kind, resource_id, parent_id, from_status, \
     to_status, observed_at, provider_at, trigger_type, trigger_id, livemode";

/// Progress counts of a batch job at one observation.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Progress {
    pub id: i64,
    pub observed_at: String,
    pub status: String,
    pub success_count: Option<i64>,
    pub failure_count: Option<i64>,
    pub validated_count: Option<i64>,
    #[sqlx(flatten)]
    pub trigger: Trigger,
}

/// The money side of one transfer's cancellation.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Refund {
    #[serde(skip)]
    pub rid: i64,
    pub id: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub status: String,
    pub reason: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// The transfer's own amount, when the refund is counted otherwise.
    pub presentment_amount: Option<i64>,
    pub presentment_currency: Option<String>,
    pub opened_at: String,
    pub completed_at: Option<String>,
    pub updated_at: String,
    #[sqlx(flatten)]
    pub trigger: Trigger,
}

pub(super) const REFUND_COLUMNS: &str =
    "rid, id, provider, kind, resource_id, parent_id, status, reason, \
     amount, currency, presentment_amount, presentment_currency, opened_at, completed_at, \
     updated_at, trigger_type, trigger_id";

/// A cancel issued through cancelwatch and the provider's answer.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct CancelRequest {
    pub id: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub idempotency_key: String,
    pub requested_by: String,
    pub requested_at: String,
    pub http_status: Option<i64>,
    pub outcome: Option<String>,
    pub error_code: Option<String>,
    /// The provider's answer, as JSON when it was JSON.
    #[serde(serialize_with = "json_text_opt")]
    #[schema(value_type = Option<serde_json::Value>)]
    pub response_body: Option<String>,
    pub answered_at: Option<String>,
}

/// Which resource an alert is about.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct ResourceRef {
    pub provider: String,
    pub kind: String,
    #[sqlx(rename = "resource_id")]
    pub id: String,
}

/// Where one alert stands at one sink (its latest version there).
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct AlertDelivery {
    #[serde(skip)]
    pub alert_id: String,
    pub sink: String,
    pub alert_version: i64,
    /// `pending` or `delivered` (or what the outbox records beyond those).
    pub state: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub delivered_at: Option<String>,
}

/// An alert with its delivery state per sink.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: String,
    #[sqlx(rename = "rule")]
    #[serde(rename = "type")]
    pub rule: String,
    pub severity: String,
    #[sqlx(flatten)]
    pub resource: ResourceRef,
    pub summary: String,
    #[serde(serialize_with = "json_text")]
    #[schema(value_type = Object)]
    pub details: String,
    pub state: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    pub resolved_at: Option<String>,
    #[sqlx(skip)]
    pub deliveries: Vec<AlertDelivery>,
}

pub(super) const ALERT_COLUMNS: &str =
    "id, rule, severity, provider, kind, resource_id, summary, details, \
     state, version, created_at, updated_at, resolved_at";

/// An inbox delivery, without its raw body.
#[derive(Debug, Clone, FromRow, Serialize, utoipa::ToSchema)]
pub struct Event {
    pub id: i64,
    pub provider: String,
    /// The dedupe key: what `replay` takes.
    #[sqlx(rename = "dedupe_key")]
    pub key: String,
    pub event_type: String,
    pub event_id: Option<String>,
    pub resource_kind: Option<String>,
    pub resource_id: Option<String>,
    pub livemode: Option<bool>,
    pub body_size: i64,
    /// False once prune dropped the raw body.
    pub body_kept: bool,
    pub source: String,
    pub received_at: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
    pub processed_at: Option<String>,
}

pub(super) const EVENT_COLUMNS: &str =
    "id, provider, dedupe_key, event_type, event_id, resource_kind, \
     resource_id, livemode, body_size, raw_body IS NOT NULL AS body_kept, source, received_at, \
     state, attempts, next_attempt_at, last_error, processed_at";
