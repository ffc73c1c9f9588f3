//! [`AlertRows`] on a PostgreSQL connection (inside the caller's
//! transaction), and the alert outbox's writes.

use sqlx::PgConnection;

use super::inbox::{self, DELIVERY_COLUMNS};
use super::record::RESOURCE_COLUMNS;
use crate::store::alerting::{AlertRows, PendingRefund};
use crate::store::model::{Alert, AlertKey, Attempt, CancelRequest, Delivery, NewAlert};
use crate::store::model::{ProgressRow, RaiseOutcome, Resource};
use crate::store::sqlite::alerts::{PENDING_REFUND_COLUMNS, PENDING_REFUND_TABLES};
use crate::store::sqlite::resources::{Refund, REFUND_COLUMNS};
use crate::store::StoreError;

const ALERT_COLUMNS: &str = "id, rule, severity, provider, kind, resource_id, summary, details, \
                             state, version, created_at, updated_at, resolved_at";

const CANCEL_COLUMNS: &str = "id, provider, kind, resource_id, idempotency_key, requested_by,
     requested_at, http_status, outcome, error_code, response_body, answered_at";

#[async_trait::async_trait]
impl AlertRows for PgConnection {
    async fn resource(&mut self, rid: i64) -> Result<Option<Resource>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources WHERE rid = $1"
        ))
        .bind(rid)
        .fetch_optional(self)
        .await?)
    }

    async fn resource_by_key(
        &mut self,
        provider: &str,
        kind: &str,
        id: &str,
    ) -> Result<Option<Resource>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources WHERE id = $3 AND provider = $1 AND kind = $2"
        ))
        .bind(provider)
        .bind(kind)
        .bind(id)
        .fetch_optional(self)
        .await?)
    }

    async fn children(
        &mut self,
        provider: &str,
        kind: &str,
        parent_id: &str,
    ) -> Result<Vec<Resource>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources
             WHERE provider = $1 AND kind = $2 AND parent_id = $3 ORDER BY id"
        ))
        .bind(provider)
        .bind(kind)
        .bind(parent_id)
        .fetch_all(self)
        .await?)
    }

    async fn unsettled_resources(&mut self) -> Result<Vec<Resource>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {RESOURCE_COLUMNS} FROM resources
             WHERE NOT terminal AND status IS NOT NULL AND status_since IS NOT NULL ORDER BY rid"
        ))
        .fetch_all(self)
        .await?)
    }

    async fn refund_of(&mut self, rid: i64) -> Result<Option<Refund>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid = $1"
        ))
        .bind(rid)
        .fetch_optional(self)
        .await?)
    }

    async fn pending_refunds_opened_before(
        &mut self,
        cutoff: &str,
    ) -> Result<Vec<PendingRefund>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {PENDING_REFUND_COLUMNS} FROM {PENDING_REFUND_TABLES}
             WHERE f.status = 'pending' AND f.opened_at < $1 ORDER BY f.opened_at"
        ))
        .bind(cutoff)
        .fetch_all(self)
        .await?)
    }

    async fn latest_progress(&mut self, rid: i64) -> Result<Option<ProgressRow>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT observed_at, status, success_count, failure_count, validated_count
             FROM progress WHERE rid = $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(rid)
        .fetch_optional(self)
        .await?)
    }

    async fn latest_cancel_with_outcome(
        &mut self,
        provider: &str,
        resource_id: &str,
        outcome: &str,
    ) -> Result<Option<CancelRequest>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {CANCEL_COLUMNS} FROM cancel_requests
             WHERE provider = $1 AND resource_id = $2 AND outcome = $3 ORDER BY id DESC LIMIT 1"
        ))
        .bind(provider)
        .bind(resource_id)
        .bind(outcome)
        .fetch_optional(self)
        .await?)
    }

    async fn delivery(&mut self, id: i64) -> Result<Option<Delivery>, StoreError> {
        let _ = DELIVERY_COLUMNS;
        inbox::get(self, id).await
    }

    async fn refusals_since(
        &mut self,
        since: &str,
    ) -> Result<Vec<(String, String, i64)>, StoreError> {
        // Rows and summaries together (a summary whose minute holds `since`
        // counts whole), as on SQLite.
        Ok(sqlx::query_as(
            r#"SELECT provider, reason, SUM(n)::bigint FROM (
                   SELECT provider, reason, COUNT(*) AS n FROM refusals
                   WHERE received_at >= $1 GROUP BY provider, reason
                   UNION ALL
                   SELECT provider, reason, SUM(count) AS n FROM refusal_summaries
                   WHERE minute >= substr($1, 1, 16) GROUP BY provider, reason) AS counted
               GROUP BY provider, reason ORDER BY provider COLLATE "C", reason COLLATE "C""#,
        )
        .bind(since)
        .fetch_all(self)
        .await?)
    }

    async fn find_alert(&mut self, key: &AlertKey) -> Result<Option<Alert>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE rule = $1 AND provider = $2 AND kind = $3 AND resource_id = $4"
        ))
        .bind(&key.rule)
        .bind(&key.provider)
        .bind(&key.kind)
        .bind(&key.resource_id)
        .fetch_optional(self)
        .await?)
    }

    async fn open_alerts_about(
        &mut self,
        provider: &str,
        kind: &str,
        resource_id: &str,
    ) -> Result<Vec<Alert>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE resource_id = $3 AND provider = $1 AND kind = $2 AND state = 'open'"
        ))
        .bind(provider)
        .bind(kind)
        .bind(resource_id)
        .fetch_all(self)
        .await?)
    }

    async fn open_alerts_of_rule(&mut self, rule: &str) -> Result<Vec<Alert>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts WHERE rule = $1 AND state = 'open' ORDER BY created_at"
        ))
        .bind(rule)
        .fetch_all(self)
        .await?)
    }

    async fn raise_alert(
        &mut self,
        new: &NewAlert,
        sinks: &[String],
        now: &str,
    ) -> Result<RaiseOutcome, StoreError> {
        let details = new.details.to_string();
        // The row is locked while it is judged: two replicas raising the
        // same alert make two versions one after the other, never one
        // version twice.
        let old: Option<Alert> = sqlx::query_as(&format!(
            "SELECT {ALERT_COLUMNS} FROM alerts
             WHERE rule = $1 AND provider = $2 AND kind = $3 AND resource_id = $4 FOR UPDATE"
        ))
        .bind(&new.rule)
        .bind(&new.provider)
        .bind(&new.kind)
        .bind(&new.resource_id)
        .fetch_optional(&mut *self)
        .await?;
        let outcome = match old {
            None => {
                let id = format!("alrt_{}", uuid::Uuid::new_v4().simple());
                let inserted: Option<Alert> = sqlx::query_as(&format!(
                    "INSERT INTO alerts (id, rule, severity, provider, kind, resource_id, summary,
                                         details, state, version, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'open', 1, $9, $9)
                     ON CONFLICT (rule, provider, kind, resource_id) DO NOTHING
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
                .fetch_optional(&mut *self)
                .await?;
                match inserted {
                    Some(alert) => RaiseOutcome::Created(alert),
                    // Another replica created it meanwhile: judge again, locked.
                    None => return Box::pin(self.raise_alert(new, sinks, now)).await,
                }
            }
            Some(old) => {
                if old.state == "open" && crate::domain::alerts::says_the_same(&old, new) {
                    return Ok(RaiseOutcome::Unchanged(old));
                }
                let alert = sqlx::query_as(&format!(
                    "UPDATE alerts SET severity = $1, summary = $2, details = $3, state = 'open',
                            resolved_at = NULL, version = version + 1, updated_at = $4
                     WHERE id = $5 RETURNING {ALERT_COLUMNS}"
                ))
                .bind(&new.severity)
                .bind(&new.summary)
                .bind(&details)
                .bind(now)
                .bind(&old.id)
                .fetch_one(&mut *self)
                .await?;
                RaiseOutcome::Updated(alert)
            }
        };
        enqueue(self, outcome.alert(), sinks, now).await?;
        Ok(outcome)
    }

    async fn resolve_alert(
        &mut self,
        key: &AlertKey,
        sinks: &[String],
        now: &str,
    ) -> Result<Option<Alert>, StoreError> {
        let resolved: Option<Alert> = sqlx::query_as(&format!(
            "UPDATE alerts SET state = 'resolved', resolved_at = $1, version = version + 1,
                    updated_at = $1
             WHERE rule = $2 AND provider = $3 AND kind = $4 AND resource_id = $5
               AND state = 'open'
             RETURNING {ALERT_COLUMNS}"
        ))
        .bind(now)
        .bind(&key.rule)
        .bind(&key.provider)
        .bind(&key.kind)
        .bind(&key.resource_id)
        .fetch_optional(&mut *self)
        .await?;
        if let Some(alert) = &resolved {
            enqueue(self, alert, sinks, now).await?;
        }
        Ok(resolved)
    }
}

/// The open alerts about each of `resources` (`(provider, kind, id)`),
/// with one statement: what [`AlertRows::open_alerts_about`] reads of one.
pub async fn open_alerts_about_many(
    conn: &mut PgConnection,
    resources: &[(&str, &str, &str)],
) -> Result<Vec<Alert>, StoreError> {
    if resources.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE state = 'open' AND (resource_id, provider, kind) IN
               (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[]))"
    ))
    .bind(resources.iter().map(|r| r.2).collect::<Vec<_>>())
    .bind(resources.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(resources.iter().map(|r| r.1).collect::<Vec<_>>())
    .fetch_all(conn)
    .await?)
}

/// Queues an alert version for each of its sinks.
async fn enqueue(
    conn: &mut PgConnection,
    alert: &Alert,
    sinks: &[String],
    now: &str,
) -> Result<(), StoreError> {
    if sinks.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO alert_outbox (alert_id, alert_version, sink, payload, next_attempt_at, created_at)
         SELECT $1, $2, s, $3, $4, $4 FROM UNNEST($5::text[]) AS s
         ON CONFLICT (alert_id, alert_version, sink) DO NOTHING",
    )
    .bind(&alert.id)
    .bind(alert.version)
    .bind(alert.payload().to_string())
    .bind(now)
    .bind(sinks)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records an attempt at an outbox row and what it means for the row:
/// delivered, or due again at `next_attempt_at`.
pub async fn outbox_attempted(
    conn: &mut PgConnection,
    row: i64,
    attempt: &Attempt,
    next_attempt_at: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO alert_attempts (outbox_id, attempted_at, status_code, error)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(row)
    .bind(&attempt.attempted_at)
    .bind(attempt.status_code)
    .bind(&attempt.error)
    .execute(&mut *conn)
    .await?;
    match next_attempt_at {
        None => sqlx::query(
            "UPDATE alert_outbox SET state = 'delivered', attempts = attempts + 1,
                    delivered_at = $2, last_error = NULL
             WHERE id = $1",
        )
        .bind(row)
        .bind(&attempt.attempted_at),
        Some(next) => sqlx::query(
            "UPDATE alert_outbox SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3
             WHERE id = $1",
        )
        .bind(row)
        .bind(next)
        .bind(&attempt.error),
    }
    .execute(conn)
    .await?;
    Ok(())
}
