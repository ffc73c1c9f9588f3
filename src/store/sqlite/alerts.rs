//! SQL of alerts: one row per (rule, resource), versioned; an outbox row per
//! (alert version, sink) written in the same transaction; delivery attempts.

use crate::store::StoreError;
use serde_json::{json, Value};
use sqlx::{FromRow, SqlitePool};

use super::cancels::{CancelRequest, CANCEL_COLUMNS};
use super::inbox::Delivery;

use super::Tx;

/// What a rule wants to say about one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlert {
    pub rule: String,
    pub severity: String,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub summary: String,
    pub details: Value,
}

impl NewAlert {
    /// The (rule, resource) this alert is one of.
    pub fn key(&self) -> AlertKey {
        AlertKey {
            rule: self.rule.clone(),
            provider: self.provider.clone(),
            kind: self.kind.clone(),
            resource_id: self.resource_id.clone(),
        }
    }
}

/// The resource an alert is about: `(provider, kind, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertKey {
    pub rule: String,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
}

/// An alert as stored.
#[derive(Debug, Clone, FromRow, PartialEq)]
pub struct Alert {
    pub id: String,
    pub rule: String,
    pub severity: String,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub summary: String,
    pub details: String,
    pub state: String,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
    pub resolved_at: Option<String>,
}

impl Alert {
    /// The JSON every sink receives for this version of the alert.
    pub fn payload(&self) -> Value {
        let details: Value = serde_json::from_str(&self.details).unwrap_or(Value::Null);
        json!({
            "id": self.id,
            "type": self.rule,
            "severity": self.severity,
            "resource": {"provider": self.provider, "kind": self.kind, "id": self.resource_id},
            "summary": self.summary,
            "details": details,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "state": self.state,
            "version": self.version,
        })
    }
}

/// What [`raise`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum RaiseOutcome {
    /// A new alert (version 1).
    Created(Alert),
    /// An existing alert got a new version (changed, or re-opened).
    Updated(Alert),
    /// The open alert already said exactly this: nothing written.
    Unchanged(Alert),
}

impl RaiseOutcome {
    /// The alert as it stands after the raise.
    pub fn alert(&self) -> &Alert {
        match self {
            RaiseOutcome::Created(a) | RaiseOutcome::Updated(a) | RaiseOutcome::Unchanged(a) => a,
        }
    }
}

const ALERT_COLUMNS: &str = "id, rule, severity, provider, kind, resource_id, summary, details, \
                             state, version, created_at, updated_at, resolved_at";

/// The alert of one rule about one resource, if any.
pub async fn find(tx: &mut Tx<'_>, key: &AlertKey) -> Result<Option<Alert>, StoreError> {
    sqlx::query_as::<_, Alert>(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE rule = ? AND provider = ? AND kind = ? AND resource_id = ?"
    ))
    .bind(&key.rule)
    .bind(&key.provider)
    .bind(&key.kind)
    .bind(&key.resource_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// The open alerts about one resource, whatever their rule.
pub async fn open_about(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    resource_id: &str,
) -> Result<Vec<Alert>, StoreError> {
    super::on_handle(tx, |conn| {
        open_about_many(conn, &[(provider, kind, resource_id)])
    })
    .await
}

/// The open alerts about each of `resources` (provider, kind, id), whatever
/// their rule; straight on the writer's handle (see [`super::on_handle`]).
pub fn open_about_many(
    conn: &rusqlite::Connection,
    resources: &[(&str, &str, &str)],
) -> Result<Vec<Alert>, StoreError> {
    let mut select = conn
        .prepare_cached(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE resource_id = ?3 AND provider = ?1 AND kind = ?2 AND state = 'open'"
        ))
        .map_err(super::direct_error)?;
    let mut open = Vec::new();
    for key in resources {
        let rows = select
            .query_map(*key, |row| {
                Ok(Alert {
                    id: row.get(0)?,
                    rule: row.get(1)?,
                    severity: row.get(2)?,
                    provider: row.get(3)?,
                    kind: row.get(4)?,
                    resource_id: row.get(5)?,
                    summary: row.get(6)?,
                    details: row.get(7)?,
                    state: row.get(8)?,
                    version: row.get(9)?,
                    created_at: row.get(10)?,
                    updated_at: row.get(11)?,
                    resolved_at: row.get(12)?,
                })
            })
            .map_err(super::direct_error)?;
        for alert in rows {
            open.push(alert.map_err(super::direct_error)?);
        }
    }
    Ok(open)
}

/// Open alerts of one rule.
pub async fn open_of_rule(tx: &mut Tx<'_>, rule: &str) -> Result<Vec<Alert>, StoreError> {
    sqlx::query_as::<_, Alert>(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE rule = ? AND state = 'open' ORDER BY created_at"
    ))
    .bind(rule)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// Inserts or updates the one alert per (rule, resource) and queues the new
/// version for each of `sinks`. Changing summary, details or severity, or
/// raising a resolved alert again, bumps its version; an identical re-raise of
/// an open alert writes nothing.
pub async fn raise(
    tx: &mut Tx<'_>,
    new: &NewAlert,
    sinks: &[String],
    now: &str,
) -> Result<RaiseOutcome, StoreError> {
    let key = new.key();
    let details = new.details.to_string();
    let outcome = match find(tx, &key).await? {
        None => {
            let id = format!("alrt_{}", uuid::Uuid::new_v4().simple());
            let alert = sqlx::query_as::<_, Alert>(&format!(
                "INSERT INTO alerts (id, rule, severity, provider, kind, resource_id, summary, details,
                                     state, version, created_at, updated_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'open', 1, ?, ?)
                 RETURNING {ALERT_COLUMNS}"
            ))
            .bind(&id)
            .bind(&new.rule)
            .bind(&new.severity)
            .bind(&new.provider)
            .bind(&new.kind)
            .bind(&new.resource_id)
            .bind(&new.summary)
            .bind(&details)
            .bind(now)
            .bind(now)
            .fetch_one(&mut **tx)
            .await?;
            RaiseOutcome::Created(alert)
        }
        Some(old) => {
            if old.state == "open" && crate::domain::alerts::says_the_same(&old, new) {
                return Ok(RaiseOutcome::Unchanged(old));
            }
            let alert = sqlx::query_as::<_, Alert>(&format!(
                "UPDATE alerts SET severity = ?, summary = ?, details = ?, state = 'open',
                        resolved_at = NULL, version = version + 1, updated_at = ?
                 WHERE id = ?
                 RETURNING {ALERT_COLUMNS}"
            ))
            .bind(&new.severity)
            .bind(&new.summary)
            .bind(&details)
            .bind(now)
            .bind(&old.id)
            .fetch_one(&mut **tx)
            .await?;
            RaiseOutcome::Updated(alert)
        }
    };
    enqueue(tx, outcome.alert(), sinks, now).await?;
    Ok(outcome)
}

/// Resolves the open alert of `key`, if there is one, and queues the resolved
/// version for each of `sinks`. Returns the resolved alert.
pub async fn resolve(
    tx: &mut Tx<'_>,
    key: &AlertKey,
    sinks: &[String],
    now: &str,
) -> Result<Option<Alert>, StoreError> {
    let resolved = sqlx::query_as::<_, Alert>(&format!(
        "UPDATE alerts SET state = 'resolved', resolved_at = ?, version = version + 1, updated_at = ?
         WHERE rule = ? AND provider = ? AND kind = ? AND resource_id = ? AND state = 'open'
         RETURNING {ALERT_COLUMNS}"
    ))
    .bind(now)
    .bind(now)
    .bind(&key.rule)
    .bind(&key.provider)
    .bind(&key.kind)
    .bind(&key.resource_id)
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(alert) = &resolved {
        enqueue(tx, alert, sinks, now).await?;
    }
    Ok(resolved)
}

/// One outbox row per sink for this version of the alert, due now.
async fn enqueue(
    tx: &mut Tx<'_>,
    alert: &Alert,
    sinks: &[String],
    now: &str,
) -> Result<(), StoreError> {
    let payload = alert.payload().to_string();
    for sink in sinks {
        sqlx::query(
            "INSERT INTO alert_outbox (alert_id, alert_version, sink, payload, next_attempt_at, created_at)
             VALUES (?, ?, ?, ?, ?, ?)
             ON CONFLICT (alert_id, alert_version, sink) DO NOTHING",
        )
        .bind(&alert.id)
        .bind(alert.version)
        .bind(sink)
        .bind(&payload)
        .bind(now)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// One alert version waiting for one sink.
#[derive(Debug, Clone, FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub alert_id: String,
    pub alert_version: i64,
    pub sink: String,
    pub payload: String,
    pub attempts: i64,
}

/// The alert deliveries waiting for one sink (due or not).
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Backlog {
    pub sink: String,
    pub waiting: i64,
    /// When the oldest of them was written (`created_at`).
    pub oldest: Option<String>,
}

/// What waits in the outbox, per sink name. The index on (sink, state, …)
/// finds the pending rows without reading the delivered ones.
pub async fn pending_by_sink(pool: &SqlitePool) -> Result<Vec<Backlog>, StoreError> {
    sqlx::query_as(
        "SELECT sink, COUNT(*) AS waiting, MIN(created_at) AS oldest FROM alert_outbox
         WHERE state = 'pending' GROUP BY sink ORDER BY sink",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}

/// Open alerts, per rule.
pub async fn open_by_rule(pool: &SqlitePool) -> Result<Vec<(String, i64)>, StoreError> {
    sqlx::query_as(
        "SELECT rule, COUNT(*) FROM alerts WHERE state = 'open' GROUP BY rule ORDER BY rule",
    )
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}

/// Pending rows of one sink that are due at `now`, oldest first.
pub async fn due(
    pool: &SqlitePool,
    sink: &str,
    now: &str,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    sqlx::query_as::<_, OutboxRow>(
        "SELECT id, alert_id, alert_version, sink, payload, attempts FROM alert_outbox
         WHERE sink = ? AND state = 'pending' AND next_attempt_at <= ?
         ORDER BY next_attempt_at, id LIMIT ?",
    )
    .bind(sink)
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}

/// The result of one delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempted_at: String,
    /// HTTP status, when the sink answered over HTTP.
    pub status_code: Option<i64>,
    /// What went wrong; `None` when delivered.
    pub error: Option<String>,
}

/// Records a successful attempt and marks the row delivered.
pub async fn mark_delivered(
    write: &SqlitePool,
    outbox_id: i64,
    attempt: &Attempt,
) -> Result<(), StoreError> {
    let mut tx = write.begin().await?;
    insert_attempt(&mut tx, outbox_id, attempt).await?;
    sqlx::query(
        "UPDATE alert_outbox SET state = 'delivered', attempts = attempts + 1, delivered_at = ?,
                last_error = NULL
         WHERE id = ?",
    )
    .bind(&attempt.attempted_at)
    .bind(outbox_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await.map_err(StoreError::from)
}

/// Records a failed attempt; the row stays pending until `next_attempt_at`.
pub async fn reschedule(
    write: &SqlitePool,
    outbox_id: i64,
    attempt: &Attempt,
    next_attempt_at: &str,
) -> Result<(), StoreError> {
    let mut tx = write.begin().await?;
    insert_attempt(&mut tx, outbox_id, attempt).await?;
    sqlx::query(
        "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?
         WHERE id = ?",
    )
    .bind(next_attempt_at)
    .bind(&attempt.error)
    .bind(outbox_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await.map_err(StoreError::from)
}

async fn insert_attempt(
    tx: &mut Tx<'_>,
    outbox_id: i64,
    attempt: &Attempt,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO alert_attempts (outbox_id, attempted_at, status_code, error) VALUES (?, ?, ?, ?)",
    )
    .bind(outbox_id)
    .bind(&attempt.attempted_at)
    .bind(attempt.status_code)
    .bind(&attempt.error)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

// ---- What the rules read -------------------------------------------------

/// A tracked resource, as the rules see it: the resources table's own row.
pub use super::resources::Resource as ResourceRow;
use super::resources::RESOURCE_COLUMNS;

/// The resource with row id `rid`.
pub async fn resource(tx: &mut Tx<'_>, rid: i64) -> Result<Option<ResourceRow>, StoreError> {
    sqlx::query_as::<_, ResourceRow>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE rid = ?"
    ))
    .bind(rid)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// The items of a parent resource (a Juice bulk transfer's transfers), by id.
pub async fn children(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    parent_id: &str,
) -> Result<Vec<ResourceRow>, StoreError> {
    sqlx::query_as::<_, ResourceRow>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE provider = ? AND kind = ? AND parent_id = ? ORDER BY id"
    ))
    .bind(provider)
    .bind(kind)
    .bind(parent_id)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// Resources not terminal whose status has a start time: the stuck candidates.
pub async fn unsettled_resources(tx: &mut Tx<'_>) -> Result<Vec<ResourceRow>, StoreError> {
    sqlx::query_as::<_, ResourceRow>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE terminal = 0 AND status IS NOT NULL AND status_since IS NOT NULL ORDER BY rid"
    ))
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// The latest cancel request of a resource that was answered with `outcome`.
pub async fn latest_cancel_with_outcome(
    tx: &mut Tx<'_>,
    provider: &str,
    resource_id: &str,
    outcome: &str,
) -> Result<Option<CancelRequest>, StoreError> {
    sqlx::query_as::<_, CancelRequest>(&format!(
        "SELECT {CANCEL_COLUMNS} FROM cancel_requests
         WHERE provider = ? AND resource_id = ? AND outcome = ? ORDER BY id DESC LIMIT 1"
    ))
    .bind(provider)
    .bind(resource_id)
    .bind(outcome)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// Progress counts of one observation.
#[derive(Debug, Clone, FromRow)]
pub struct ProgressRow {
    pub observed_at: String,
    pub status: String,
    pub success_count: Option<i64>,
    pub failure_count: Option<i64>,
    pub validated_count: Option<i64>,
}

/// The latest progress counts of a resource.
pub async fn latest_progress(tx: &mut Tx<'_>, rid: i64) -> Result<Option<ProgressRow>, StoreError> {
    sqlx::query_as::<_, ProgressRow>(
        "SELECT observed_at, status, success_count, failure_count, validated_count FROM progress
         WHERE rid = ? ORDER BY id DESC LIMIT 1",
    )
    .bind(rid)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// A pending refund with what is known of its resource, as the
/// `refund_overdue` rule reads it (a join of the two tables, not a row of one).
#[derive(Debug, Clone, FromRow)]
pub struct PendingRefund {
    pub rid: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub status: String,
    pub reason: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub opened_at: String,
    /// What is known of its resource: its status now, when it was last
    /// fetched, and when it is fetched next.
    pub resource_status: Option<String>,
    pub last_observed_at: Option<String>,
    pub next_reconcile_at: Option<String>,
}

/// The columns of [`PendingRefund`], its resource `r`. A bulk transfer's
/// item that rests is not written when its bulk transfer is fetched, nor
/// given a fetch time of its own while the bulk transfer moves
/// (`record::decide`): its parent's times stand for it then. Both engines.
pub(crate) const PENDING_REFUND_COLUMNS: &str =
    "f.rid, f.provider, f.kind, f.resource_id, f.parent_id, f.status, f.reason, f.amount,
     f.currency, f.opened_at, r.status AS resource_status,
     CASE WHEN p.last_observed_at > r.last_observed_at THEN p.last_observed_at
          ELSE r.last_observed_at END AS last_observed_at,
     COALESCE(r.next_reconcile_at, p.next_reconcile_at) AS next_reconcile_at";

/// The tables [`PENDING_REFUND_COLUMNS`] read: a refund, its resource and
/// the resource's parent, if stored.
pub(crate) const PENDING_REFUND_TABLES: &str = "refunds f JOIN resources r ON r.rid = f.rid
     LEFT JOIN resources p ON p.rid = (SELECT q.rid FROM resources q
         WHERE q.id = r.parent_id AND q.provider = r.provider AND q.rid <> r.rid
         ORDER BY q.rid LIMIT 1)";

/// Refunds still pending that were opened before `cutoff`.
pub async fn pending_refunds_opened_before(
    tx: &mut Tx<'_>,
    cutoff: &str,
) -> Result<Vec<PendingRefund>, StoreError> {
    sqlx::query_as::<_, PendingRefund>(&format!(
        "SELECT {PENDING_REFUND_COLUMNS} FROM {PENDING_REFUND_TABLES}
         WHERE f.status = 'pending' AND f.opened_at < ? ORDER BY f.opened_at"
    ))
    .bind(cutoff)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// Refused deliveries received at or after `since`, per (provider, reason),
/// those counted in summaries included.
pub async fn refusals_since(
    tx: &mut Tx<'_>,
    since: &str,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    super::refusals::counts_since(tx, since).await
}

/// The inbox delivery with row id `id`.
pub async fn delivery(tx: &mut Tx<'_>, id: i64) -> Result<Option<Delivery>, StoreError> {
    super::inbox::get_in(tx, id).await
}
