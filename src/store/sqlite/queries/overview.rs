//! Reads of the operator's console beyond the audit queries: resources that
//! have not settled, and the deliveries about one resource.

use sqlx::SqlitePool;

use super::rows::{Event, EVENT_COLUMNS};
use super::QueryError;
use crate::store::sqlite::resources::Resource;

/// Resources not in a terminal status whose current status began before
/// `before`, longest-held first, at most `limit`; without their snapshot (a
/// bulk transfer's is large and a list never shows it). Which of them are
/// held too long is the caller's decision (limits per status).
pub async fn unsettled_since(
    pool: &SqlitePool,
    before: &str,
    limit: i64,
) -> Result<Vec<Resource>, QueryError> {
    Ok(sqlx::query_as(
        "SELECT rid, provider, kind, id, parent_id, status, terminal, livemode, context,
                amount, currency, NULL AS snapshot, provider_updated_at, status_since,
                first_seen_at, last_observed_at, not_found, cancel_requested_at,
                next_reconcile_at, reconcile_failures
         FROM resources
         WHERE terminal = 0 AND status IS NOT NULL AND status_since < ?
         ORDER BY status_since, rid LIMIT ?",
    )
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// The inbox deliveries about the resource with this provider id, newest
/// first, at most `limit`.
pub async fn deliveries_of(
    pool: &SqlitePool,
    resource_id: &str,
    limit: i64,
) -> Result<Vec<Event>, QueryError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM inbox WHERE resource_id = ? ORDER BY id DESC LIMIT ?"
    ))
    .bind(resource_id)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}
