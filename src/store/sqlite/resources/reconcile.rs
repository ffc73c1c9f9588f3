//! The reconcile schedule: which resources are due for a fetch, and when
//! the next one is.

use crate::store::StoreError;
use sqlx::SqlitePool;

use super::{Resource, RESOURCE_COLUMNS};
use crate::store::sqlite::Tx;

/// Resources whose reconcile time has come, oldest first.
pub async fn due_for_reconcile(
    pool: &SqlitePool,
    now: &str,
    limit: i64,
) -> Result<Vec<Resource>, StoreError> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE next_reconcile_at IS NOT NULL AND next_reconcile_at <= ?
         ORDER BY next_reconcile_at, rid LIMIT ?"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}

/// A reconcile fetch failed: count it and push the next one back.
pub async fn reconcile_failed(
    tx: &mut Tx<'_>,
    rid: i64,
    next_reconcile_at: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE resources SET reconcile_failures = reconcile_failures + 1, next_reconcile_at = ?
         WHERE rid = ?",
    )
    .bind(next_reconcile_at)
    .bind(rid)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets (or clears) the next reconcile time and resets the failure count.
pub async fn mark_reconciled(
    tx: &mut Tx<'_>,
    rid: i64,
    next_reconcile_at: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query("UPDATE resources SET next_reconcile_at = ?, reconcile_failures = 0 WHERE rid = ?")
        .bind(next_reconcile_at)
        .bind(rid)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
