//! Audit queries behind the read commands and `/v1`: one resource's history,
//! and pages of transitions, alerts and inbox deliveries.
//!
//! Pages are keyset pages, newest first: the cursor names the last row
//! returned and the next page starts strictly below it, so rows that arrive
//! between two pages never shift or repeat what the reader sees.
//! Filters come in as the user typed them and are validated here, once, for
//! the CLI and the API alike.

use std::collections::HashMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Serialize, Serializer};
use sqlx::{FromRow, QueryBuilder, Sqlite, SqlitePool};

use super::resources::{Resource, RESOURCE_COLUMNS};

/// Rows per page when none is asked for.
pub const DEFAULT_LIMIT: i64 = 100;
/// Most rows one page may hold.
pub const MAX_LIMIT: i64 = 1000;
/// States of an inbox delivery.
pub const EVENT_STATES: [&str; 6] = [
    "pending",
    "processing",
    "processed",
    "ignored",
    "failed",
    "dead",
];
/// States of an alert.
pub const ALERT_STATES: [&str; 2] = ["open", "resolved"];
/// Alert rules (the `type` of an alert).
pub const ALERT_TYPES: [&str; 6] = [
    "partial_cancellation",
    "cancel_not_effective",
    "stuck",
    "refund_overdue",
    "dead_letter",
    "verification_failures",
];
/// Providers cancelwatch knows.
pub const PROVIDERS: [&str; 2] = ["stripe", "juice"];

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A filter, limit or cursor the user gave is not valid.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> QueryError {
    QueryError::Invalid {
        field,
        message: message.into(),
    }
}

/// What page to read: how many rows, and where the previous page ended.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    /// 1..=1000; 100 when absent.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageRequest {
    fn limit(&self) -> Result<i64, QueryError> {
        match self.limit {
            None => Ok(DEFAULT_LIMIT),
            Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            Some(n) => Err(invalid(
                "limit",
                format!("{n} is out of range: it must be between 1 and {MAX_LIMIT}"),
            )),
        }
    }

    fn cursor(&self, tag: &str) -> Result<Option<String>, QueryError> {
        let Some(c) = self.cursor.as_deref().filter(|c| !c.is_empty()) else {
            return Ok(None);
        };
        let bad = || invalid("cursor", format!("{c:?} is not a cursor of this listing"));
        let bytes = URL_SAFE_NO_PAD.decode(c).map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let payload = text
            .strip_prefix(tag)
            .and_then(|t| t.strip_prefix(':'))
            .ok_or_else(bad)?;
        Ok(Some(payload.to_string()))
    }

    fn id_cursor(&self, tag: &str) -> Result<Option<i64>, QueryError> {
        match self.cursor(tag)? {
            None => Ok(None),
            Some(p) => p.parse::<i64>().map(Some).map_err(|_| {
                invalid(
                    "cursor",
                    format!(
                        "{:?} is not a cursor of this listing",
                        self.cursor.as_deref().unwrap_or_default()
                    ),
                )
            }),
        }
    }
}

fn encode_cursor(tag: &str, payload: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{tag}:{payload}"))
}

/// One page of rows, newest first; `next_cursor` is absent on the last page.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Cuts the `limit + 1` rows read down to `limit` and names the cursor.
fn page<T>(mut rows: Vec<T>, limit: i64, cursor_of: impl Fn(&T) -> String) -> Page<T> {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(cursor_of)
    } else {
        None
    };
    Page {
        data: rows,
        next_cursor,
    }
}

/// Parses an RFC 3339 time into the stored text form (UTC, milliseconds).
pub fn parse_time(field: &'static str, value: &str) -> Result<String, QueryError> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| crate::time::fmt(t.with_timezone(&chrono::Utc)))
        .map_err(|_| {
            invalid(
                field,
                format!("{value:?} is not an RFC 3339 time such as 2026-10-30T12:00:00Z"),
            )
        })
}

fn one_of(field: &'static str, value: &str, allowed: &[&str]) -> Result<String, QueryError> {
    if allowed.contains(&value) {
        Ok(value.to_string())
    } else {
        Err(invalid(
            field,
            format!("{value:?} is not one of {}", allowed.join(", ")),
        ))
    }
}

fn non_empty(field: &'static str, value: &str) -> Result<String, QueryError> {
    if value.trim().is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(value.to_string())
    }
}

/// Serializes text holding JSON as that JSON (or as a string if it is not JSON).
fn json_text<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => v.serialize(s),
        Err(_) => s.serialize_str(text),
    }
}

pub(super) fn json_text_opt<S: Serializer>(text: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match text {
        Some(t) => json_text(t, s),
        None => s.serialize_none(),
    }
}

/// What caused an observation: `event`, `reconcile`, `cancel`, `backfill`, `replay`.
#[derive(Debug, Clone, FromRow, Serialize, PartialEq)]
pub struct Trigger {
    #[sqlx(rename = "trigger_type")]
    #[serde(rename = "type")]
    pub kind: String,
    #[sqlx(rename = "trigger_id")]
    pub id: Option<String>,
}

/// One observed status change, in the JSON form SPEC.md fixes.
#[derive(Debug, Clone, FromRow, Serialize)]
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

const TRANSITION_COLUMNS: &str = "id, provider, kind, resource_id, parent_id, from_status, \
     to_status, observed_at, provider_at, trigger_type, trigger_id, livemode";

/// Progress counts of a batch job at one observation.
#[derive(Debug, Clone, FromRow, Serialize)]
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
#[derive(Debug, Clone, FromRow, Serialize)]
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
    pub opened_at: String,
    pub completed_at: Option<String>,
    pub updated_at: String,
    #[sqlx(flatten)]
    pub trigger: Trigger,
}

const REFUND_COLUMNS: &str = "rid, id, provider, kind, resource_id, parent_id, status, reason, \
     amount, currency, opened_at, completed_at, updated_at, trigger_type, trigger_id";

/// A cancel issued through cancelwatch and the provider's answer.
#[derive(Debug, Clone, FromRow, Serialize)]
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
    #[serde(serialize_with = "json_text_opt")]
    pub response_body: Option<String>,
    pub answered_at: Option<String>,
}

/// Which resource an alert is about.
#[derive(Debug, Clone, FromRow, Serialize)]
pub struct ResourceRef {
    pub provider: String,
    pub kind: String,
    #[sqlx(rename = "resource_id")]
    pub id: String,
}

/// Where one alert stands at one sink (its latest version there).
#[derive(Debug, Clone, FromRow, Serialize)]
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
#[derive(Debug, Clone, FromRow, Serialize)]
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
    pub details: String,
    pub state: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    pub resolved_at: Option<String>,
    #[sqlx(skip)]
    pub deliveries: Vec<AlertDelivery>,
}

const ALERT_COLUMNS: &str = "id, rule, severity, provider, kind, resource_id, summary, details, \
     state, version, created_at, updated_at, resolved_at";

/// An inbox delivery, without its raw body.
#[derive(Debug, Clone, FromRow, Serialize)]
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

const EVENT_COLUMNS: &str = "id, provider, dedupe_key, event_type, event_id, resource_kind, \
     resource_id, livemode, body_size, raw_body IS NOT NULL AS body_kept, source, received_at, \
     state, attempts, next_attempt_at, last_error, processed_at";

/// Everything recorded about the resources with one id.
#[derive(Debug, Clone, Serialize)]
pub struct History {
    pub id: String,
    /// Usually one; an id shared by two kinds or providers lists each.
    pub resources: Vec<ResourceHistory>,
}

/// One resource's state and trail.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceHistory {
    #[serde(flatten)]
    pub resource: Resource,
    /// Oldest first.
    pub transitions: Vec<Transition>,
    pub progress: Vec<Progress>,
    pub refunds: Vec<Refund>,
    pub alerts: Vec<Alert>,
    pub cancel_requests: Vec<CancelRequest>,
    /// The items of a bulk transfer.
    pub children: Vec<ChildHistory>,
}

/// One item of a bulk transfer.
#[derive(Debug, Clone, Serialize)]
pub struct ChildHistory {
    #[serde(flatten)]
    pub resource: Resource,
    /// Oldest first.
    pub transitions: Vec<Transition>,
    pub refunds: Vec<Refund>,
}

/// The history of every resource with this provider id; `None` when there is none.
pub async fn history(pool: &SqlitePool, resource_id: &str) -> Result<Option<History>, QueryError> {
    let resources: Vec<Resource> = sqlx::query_as(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE id = ? ORDER BY rid"
    ))
    .bind(resource_id)
    .fetch_all(pool)
    .await?;
    if resources.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(resources.len());
    for resource in resources {
        out.push(resource_history(pool, resource).await?);
    }
    Ok(Some(History {
        id: resource_id.to_string(),
        resources: out,
    }))
}

async fn resource_history(
    pool: &SqlitePool,
    resource: Resource,
) -> Result<ResourceHistory, QueryError> {
    let rid = resource.rid;
    let transitions: Vec<Transition> = sqlx::query_as(&format!(
        "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE rid = ? ORDER BY id"
    ))
    .bind(rid)
    .fetch_all(pool)
    .await?;
    let progress: Vec<Progress> = sqlx::query_as(
        "SELECT id, observed_at, status, success_count, failure_count, validated_count,
                trigger_type, trigger_id
         FROM progress WHERE rid = ? ORDER BY id",
    )
    .bind(rid)
    .fetch_all(pool)
    .await?;
    let refunds: Vec<Refund> = sqlx::query_as(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid = ? ORDER BY id"
    ))
    .bind(rid)
    .fetch_all(pool)
    .await?;
    let mut alerts: Vec<Alert> = sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE resource_id = ? AND provider = ? AND kind = ?
         ORDER BY created_at, id"
    ))
    .bind(&resource.id)
    .bind(&resource.provider)
    .bind(&resource.kind)
    .fetch_all(pool)
    .await?;
    attach_deliveries(pool, &mut alerts).await?;
    let cancel_requests: Vec<CancelRequest> = sqlx::query_as(
        "SELECT id, provider, kind, resource_id, idempotency_key, requested_by, requested_at,
                http_status, outcome, error_code, response_body, answered_at
         FROM cancel_requests WHERE resource_id = ? AND provider = ? AND kind = ?
         ORDER BY id",
    )
    .bind(&resource.id)
    .bind(&resource.provider)
    .bind(&resource.kind)
    .fetch_all(pool)
    .await?;
    let children = children(pool, &resource).await?;
    Ok(ResourceHistory {
        resource,
        transitions,
        progress,
        refunds,
        alerts,
        cancel_requests,
        children,
    })
}

/// The items whose parent is this resource, each with its transitions and refunds.
async fn children(pool: &SqlitePool, parent: &Resource) -> Result<Vec<ChildHistory>, QueryError> {
    let items: Vec<Resource> = sqlx::query_as(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE parent_id = ? AND provider = ? ORDER BY rid"
    ))
    .bind(&parent.id)
    .bind(&parent.provider)
    .fetch_all(pool)
    .await?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let children_rids = "SELECT rid FROM resources WHERE parent_id = ?1 AND provider = ?2";
    let transitions: Vec<(i64, Transition)> = sqlx::query_as::<_, RidTransition>(&format!(
        "SELECT rid, {TRANSITION_COLUMNS} FROM transitions
         WHERE rid IN ({children_rids}) ORDER BY rid, id"
    ))
    .bind(&parent.id)
    .bind(&parent.provider)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.rid, r.transition))
    .collect();
    let refunds: Vec<Refund> = sqlx::query_as(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid IN ({children_rids}) ORDER BY rid, id"
    ))
    .bind(&parent.id)
    .bind(&parent.provider)
    .fetch_all(pool)
    .await?;

    let mut by_rid: HashMap<i64, ChildHistory> = HashMap::new();
    let order: Vec<i64> = items.iter().map(|r| r.rid).collect();
    for resource in items {
        by_rid.insert(
            resource.rid,
            ChildHistory {
                resource,
                transitions: Vec::new(),
                refunds: Vec::new(),
            },
        );
    }
    for (rid, t) in transitions {
        if let Some(c) = by_rid.get_mut(&rid) {
            c.transitions.push(t);
        }
    }
    for r in refunds {
        if let Some(c) = by_rid.get_mut(&r.rid) {
            c.refunds.push(r);
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|rid| by_rid.remove(&rid))
        .collect())
}

#[derive(FromRow)]
struct RidTransition {
    rid: i64,
    #[sqlx(flatten)]
    transition: Transition,
}

/// Filters of a transitions listing; every one optional, all must match.
#[derive(Debug, Clone, Default)]
pub struct TransitionFilter {
    /// `stripe` or `juice`.
    pub provider: Option<String>,
    /// e.g. `stripe.outbound_transfer`.
    pub kind: Option<String>,
    /// The status changed to.
    pub to_status: Option<String>,
    /// Observed at or after (RFC 3339).
    pub since: Option<String>,
    /// Observed before (RFC 3339).
    pub until: Option<String>,
    pub resource_id: Option<String>,
}

/// A page of transitions, newest first.
pub async fn transitions(
    pool: &SqlitePool,
    filter: &TransitionFilter,
    page_req: &PageRequest,
) -> Result<Page<Transition>, QueryError> {
    let limit = page_req.limit()?;
    let mut q = transitions_query("", filter, page_req)?;
    let rows: Vec<Transition> = q.build_query_as().fetch_all(pool).await?;
    Ok(page(rows, limit, |t| encode_cursor("t", &t.id.to_string())))
}

/// SQLite's plan for the query `transitions` runs (`EXPLAIN QUERY PLAN`), one
/// line per step, to check that listings use an index.
pub async fn explain_transitions(
    pool: &SqlitePool,
    filter: &TransitionFilter,
    page_req: &PageRequest,
) -> Result<Vec<String>, QueryError> {
    let mut q = transitions_query("EXPLAIN QUERY PLAN ", filter, page_req)?;
    let rows: Vec<(i64, i64, i64, String)> = q.build_query_as().fetch_all(pool).await?;
    Ok(rows.into_iter().map(|r| r.3).collect())
}

fn transitions_query(
    prefix: &str,
    filter: &TransitionFilter,
    page_req: &PageRequest,
) -> Result<QueryBuilder<'static, Sqlite>, QueryError> {
    let limit = page_req.limit()?;
    let cursor = page_req.id_cursor("t")?;
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(prefix);
    let source = match &filter.resource_id {
        // One resource has a handful of transitions: take them first, by rid
        // through `resources`, then filter those. Left to itself the planner
        // would rather walk, say, every transition of a kind by `id`.
        Some(r) => {
            q.push(
                "WITH of_resource AS MATERIALIZED (SELECT * FROM transitions \
                 WHERE rid IN (SELECT rid FROM resources WHERE id = ",
            )
            .push_bind(non_empty("resource_id", r)?)
            .push(")) ");
            "of_resource"
        }
        None => "transitions",
    };
    q.push(format!(
        "SELECT {TRANSITION_COLUMNS} FROM {source} WHERE 1 = 1"
    ));
    if let Some(p) = &filter.provider {
        q.push(" AND provider = ")
            .push_bind(one_of("provider", p, &PROVIDERS)?);
    }
    if let Some(k) = &filter.kind {
        q.push(" AND kind = ").push_bind(non_empty("kind", k)?);
    }
    if let Some(s) = &filter.to_status {
        q.push(" AND to_status = ").push_bind(non_empty("to", s)?);
    }
    if let Some(t) = &filter.since {
        q.push(" AND observed_at >= ")
            .push_bind(parse_time("since", t)?);
    }
    if let Some(t) = &filter.until {
        q.push(" AND observed_at < ")
            .push_bind(parse_time("until", t)?);
    }
    if let Some(c) = cursor {
        q.push(" AND id < ").push_bind(c);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    Ok(q)
}

/// Filters of an alerts listing.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// The rule (`type`), e.g. `partial_cancellation`.
    pub rule: Option<String>,
    /// Raised or updated at or after (RFC 3339).
    pub since: Option<String>,
    /// `open` or `resolved`.
    pub state: Option<String>,
}

/// A page of alerts, newest first (by creation), each with its delivery state per sink.
pub async fn alerts(
    pool: &SqlitePool,
    filter: &AlertFilter,
    page_req: &PageRequest,
) -> Result<Page<Alert>, QueryError> {
    let limit = page_req.limit()?;
    let cursor = match page_req.cursor("a")? {
        None => None,
        Some(p) => {
            let (created_at, id) = p.split_once('|').ok_or_else(|| {
                invalid(
                    "cursor",
                    format!(
                        "{:?} is not a cursor of this listing",
                        page_req.cursor.as_deref().unwrap_or_default()
                    ),
                )
            })?;
            Some((created_at.to_string(), id.to_string()))
        }
    };
    let mut q: QueryBuilder<Sqlite> =
        QueryBuilder::new(format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1"));
    if let Some(r) = &filter.rule {
        q.push(" AND rule = ")
            .push_bind(one_of("type", r, &ALERT_TYPES)?);
    }
    if let Some(s) = &filter.state {
        q.push(" AND state = ")
            .push_bind(one_of("state", s, &ALERT_STATES)?);
    }
    if let Some(t) = &filter.since {
        q.push(" AND updated_at >= ")
            .push_bind(parse_time("since", t)?);
    }
    if let Some((created_at, id)) = cursor {
        q.push(" AND (created_at < ")
            .push_bind(created_at.clone())
            .push(" OR (created_at = ")
            .push_bind(created_at)
            .push(" AND id < ")
            .push_bind(id)
            .push("))");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(limit + 1);
    let rows: Vec<Alert> = q.build_query_as().fetch_all(pool).await?;
    let mut p = page(rows, limit, |a| {
        encode_cursor("a", &format!("{}|{}", a.created_at, a.id))
    });
    attach_deliveries(pool, &mut p.data).await?;
    Ok(p)
}

/// Fills each alert's `deliveries`: per sink, the outbox row of its latest version.
async fn attach_deliveries(pool: &SqlitePool, alerts: &mut [Alert]) -> Result<(), QueryError> {
    if alerts.is_empty() {
        return Ok(());
    }
    let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
        "SELECT alert_id, sink, alert_version, state, attempts, last_error, delivered_at
         FROM alert_outbox WHERE alert_id IN (",
    );
    let mut ids = q.separated(", ");
    for a in alerts.iter() {
        ids.push_bind(a.id.clone());
    }
    q.push(") ORDER BY alert_id, sink, alert_version DESC");
    let rows: Vec<AlertDelivery> = q.build_query_as().fetch_all(pool).await?;
    let mut by_alert: HashMap<String, Vec<AlertDelivery>> = HashMap::new();
    for row in rows {
        let list = by_alert.entry(row.alert_id.clone()).or_default();
        // Rows come newest version first within a sink: keep the first.
        if list.last().map(|d| d.sink.as_str()) != Some(row.sink.as_str()) {
            list.push(row);
        }
    }
    for a in alerts.iter_mut() {
        a.deliveries = by_alert.remove(&a.id).unwrap_or_default();
    }
    Ok(())
}

/// Filters of an inbox listing.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// pending, processing, processed, ignored, failed or dead.
    pub state: Option<String>,
    /// `stripe` or `juice`.
    pub provider: Option<String>,
}

/// A page of inbox deliveries (no raw bodies), newest first.
pub async fn events(
    pool: &SqlitePool,
    filter: &EventFilter,
    page_req: &PageRequest,
) -> Result<Page<Event>, QueryError> {
    let limit = page_req.limit()?;
    let cursor = page_req.id_cursor("e")?;
    let mut q: QueryBuilder<Sqlite> =
        QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM inbox WHERE 1 = 1"));
    if let Some(s) = &filter.state {
        q.push(" AND state = ")
            .push_bind(one_of("state", s, &EVENT_STATES)?);
    }
    if let Some(p) = &filter.provider {
        q.push(" AND provider = ")
            .push_bind(one_of("provider", p, &PROVIDERS)?);
    }
    if let Some(c) = cursor {
        q.push(" AND id < ").push_bind(c);
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let rows: Vec<Event> = q.build_query_as().fetch_all(pool).await?;
    Ok(page(rows, limit, |e| encode_cursor("e", &e.id.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked() {
        let p = |limit| PageRequest {
            limit,
            cursor: None,
        };
        assert_eq!(p(None).limit().unwrap(), DEFAULT_LIMIT);
        assert_eq!(p(Some(1000)).limit().unwrap(), 1000);
        assert!(p(Some(0)).limit().is_err());
        assert!(p(Some(1001)).limit().is_err());
    }

    #[test]
    fn cursors_round_trip_and_are_tagged() {
        let c = encode_cursor("t", "42");
        let req = PageRequest {
            limit: None,
            cursor: Some(c),
        };
        assert_eq!(req.id_cursor("t").unwrap(), Some(42));
        assert!(req.id_cursor("e").is_err());
        let bad = PageRequest {
            limit: None,
            cursor: Some("not a cursor!".into()),
        };
        assert!(bad.id_cursor("t").is_err());
    }

    #[test]
    fn times_are_normalised() {
        assert_eq!(
            parse_time("since", "2026-10-30T14:00:00+02:00").unwrap(),
            "2026-10-30T12:00:00.000Z"
        );
        assert!(parse_time("since", "yesterday").is_err());
    }
}
