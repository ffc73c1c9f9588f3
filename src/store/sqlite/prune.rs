//! SQL of `prune`: drop what a long-running daemon no longer needs, in small
//! batches so the one writer connection is never held for long. Transitions,
//! refunds, progress, alerts and cancel requests are never touched here.

use crate::store::StoreError;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Sqlite, SqlitePool};

/// Rows changed per statement (each statement is its own short transaction).
pub(crate) const BATCH: i64 = 2_000;

type Statement<'q> = sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>;

/// Runs the statement `make` builds until it changes nothing; returns the rows changed.
async fn in_batches<'q>(
    pool: &SqlitePool,
    make: impl Fn() -> Statement<'q>,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let done = make().execute(pool).await?.rows_affected();
        total += done;
        if done == 0 {
            return Ok(total);
        }
        // Let the daemon's own writes in between two batches.
        tokio::task::yield_now().await;
    }
}

/// NULLs the raw body of final (processed, ignored, dead) deliveries received before `cutoff`.
pub async fn drop_bodies(pool: &SqlitePool, cutoff: &str) -> Result<u64, StoreError> {
    in_batches(pool, || {
        sqlx::query(
            "UPDATE inbox SET raw_body = NULL WHERE id IN (
                SELECT id FROM inbox
                WHERE received_at < ? AND raw_body IS NOT NULL
                  AND state IN ('processed', 'ignored', 'dead')
                LIMIT ?)",
        )
        .bind(cutoff)
        .bind(BATCH)
    })
    .await
}

/// Deletes refusal records received before `cutoff`, and the summaries of
/// the minutes before it.
pub async fn delete_refusals(pool: &SqlitePool, cutoff: &str) -> Result<u64, StoreError> {
    let rows = in_batches(pool, || {
        sqlx::query(
            "DELETE FROM refusals WHERE id IN (
                SELECT id FROM refusals WHERE received_at < ? LIMIT ?)",
        )
        .bind(cutoff)
        .bind(BATCH)
    })
    .await?;
    let summaries = in_batches(pool, || {
        sqlx::query(super::refusals::DELETE_OLD_SUMMARIES)
            .bind(cutoff)
            .bind(BATCH)
    })
    .await?;
    Ok(rows + summaries)
}

/// Deletes `provider`'s final deliveries received before `cutoff` (their
/// dedupe keys go with them, so `cutoff` must lie beyond the provider's retries).
pub async fn delete_deliveries(
    pool: &SqlitePool,
    provider: &str,
    cutoff: &str,
) -> Result<u64, StoreError> {
    in_batches(pool, || {
        sqlx::query(
            "DELETE FROM inbox WHERE id IN (
                SELECT id FROM inbox
                WHERE received_at < ? AND provider = ?
                  AND state IN ('processed', 'ignored', 'dead')
                LIMIT ?)",
        )
        .bind(cutoff)
        .bind(provider)
        .bind(BATCH)
    })
    .await
}
