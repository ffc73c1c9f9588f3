//! Reads of the operator's console beyond the audit queries: resources that
//! have not settled, and the deliveries about one resource; one text for
//! every engine, as the rest of this folder.

use sqlx::{Pool, QueryBuilder};

use super::engine::{PushParam, ReadEngine};
use super::rows::{Event, EVENT_COLUMNS};
use super::QueryError;
use crate::store::sqlite::resources::Resource;

/// Resources not in a terminal status whose current status began before
/// `before`, longest-held first, at most `limit`; without their snapshot (a
/// bulk transfer's is large and a list never shows it). Which of them are
/// held too long is the caller's decision (limits per status).
pub async fn unsettled_since<DB: ReadEngine>(
    pool: &Pool<DB>,
    before: &str,
    limit: i64,
) -> Result<Vec<Resource>, QueryError> {
    let mut q = QueryBuilder::new(
        "SELECT rid, provider, kind, id, parent_id, status, terminal, livemode, context,
                amount, currency, CAST(NULL AS TEXT) AS snapshot, provider_updated_at,
                status_since, first_seen_at, last_observed_at, not_found, cancel_requested_at,
                next_reconcile_at, reconcile_failures
         FROM resources
         WHERE NOT terminal AND status IS NOT NULL AND status_since < ",
    );
    q.param(before.to_string())
        .push(" ORDER BY status_since, rid LIMIT ")
        .param(limit);
    Ok(DB::fetch_all(pool, q).await?)
}

/// The inbox deliveries about the resource with this provider id, newest
/// first, at most `limit`.
pub async fn deliveries_of<DB: ReadEngine>(
    pool: &Pool<DB>,
    resource_id: &str,
    limit: i64,
) -> Result<Vec<Event>, QueryError> {
    let mut q = QueryBuilder::new(format!(
        "SELECT {EVENT_COLUMNS} FROM inbox WHERE resource_id = "
    ));
    q.param(resource_id.to_string())
        .push(" ORDER BY id DESC LIMIT ")
        .param(limit);
    Ok(DB::fetch_all(pool, q).await?)
}
