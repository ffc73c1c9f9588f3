//! Refunds: the money side of a cancellation, opened and settled as
//! observations come in.

use crate::store::StoreError;
use sqlx::{FromRow, SqlitePool};

use super::execute_each;
use crate::store::sqlite::{direct_error, Tx};

/// A refund's stored state.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Refund {
    pub id: i64,
    pub rid: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub status: String,
    pub reason: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    /// The transfer's own amount when the refund is counted otherwise.
    pub presentment_amount: Option<i64>,
    pub presentment_currency: Option<String>,
    pub opened_at: String,
    pub completed_at: Option<String>,
    pub updated_at: String,
    pub trigger_type: String,
    pub trigger_id: Option<String>,
}

pub const REFUND_COLUMNS: &str =
    "id, rid, provider, kind, resource_id, parent_id, status, reason, amount,
     currency, presentment_amount, presentment_currency, opened_at, completed_at,
     updated_at, trigger_type, trigger_id";

pub async fn refund_of(tx: &mut Tx<'_>, rid: i64) -> Result<Option<Refund>, StoreError> {
    sqlx::query_as::<_, Refund>(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid = ?"
    ))
    .bind(rid)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// The refund status of each of `rids` that has a refund.
pub fn refund_statuses(
    conn: &rusqlite::Connection,
    rids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, StoreError> {
    use rusqlite::OptionalExtension;
    let mut select = conn
        .prepare_cached("SELECT status FROM refunds WHERE rid = ?1")
        .map_err(direct_error)?;
    let mut statuses = std::collections::HashMap::new();
    for &rid in rids {
        let status: Option<String> = select
            .query_row([rid], |row| row.get(0))
            .optional()
            .map_err(direct_error)?;
        statuses.extend(status.map(|status| (rid, status)));
    }
    Ok(statuses)
}

/// A refund to open.
#[derive(Debug, Clone)]
pub struct NewRefund<'a> {
    pub rid: i64,
    pub provider: &'a str,
    pub kind: &'a str,
    pub resource_id: &'a str,
    pub parent_id: Option<&'a str>,
    pub status: &'a str,
    pub reason: &'a str,
    pub amount: Option<i64>,
    pub currency: Option<&'a str>,
    /// The transfer's own amount, when it differs from the refund's.
    pub presentment: Option<(Option<i64>, Option<&'a str>)>,
    pub now: &'a str,
    pub trigger_type: &'a str,
    pub trigger_id: Option<&'a str>,
}

/// Opens refunds (a resource has at most one: a second is not opened).
pub fn insert_refunds(
    conn: &rusqlite::Connection,
    refunds: &[NewRefund<'_>],
) -> Result<(), StoreError> {
    execute_each(
        conn,
        "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                              currency, opened_at, completed_at, updated_at, trigger_type, trigger_id,
                              presentment_amount, presentment_currency)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?10, ?12, ?13, ?14, ?15)
         ON CONFLICT (rid) DO NOTHING",
        refunds,
        |r| {
            let (presentment_amount, presentment_currency) = r.presentment.unwrap_or_default();
            (
                r.rid,
                r.provider,
                r.kind,
                r.resource_id,
                r.parent_id,
                r.status,
                r.reason,
                r.amount,
                r.currency,
                r.now,
                (r.status == "completed").then_some(r.now),
                r.trigger_type,
                r.trigger_id,
                presentment_amount,
                presentment_currency,
            )
        },
    )
}

/// A pending refund's end: `completed` or `failed`.
#[derive(Debug, Clone)]
pub struct RefundSettlement<'a> {
    pub rid: i64,
    pub status: &'a str,
    pub trigger_type: &'a str,
    pub trigger_id: Option<&'a str>,
}

/// Moves pending refunds to `completed` or `failed`.
pub fn settle_refunds(
    conn: &rusqlite::Connection,
    settlements: &[RefundSettlement<'_>],
    now: &str,
) -> Result<(), StoreError> {
    execute_each(
        conn,
        "UPDATE refunds SET status = ?2,
                completed_at = CASE WHEN ?2 = 'completed' THEN ?3 ELSE completed_at END,
                updated_at = ?3, trigger_type = ?4, trigger_id = ?5
         WHERE rid = ?1 AND status = 'pending'",
        settlements,
        |r| (r.rid, r.status, now, r.trigger_type, r.trigger_id),
    )
}

/// Refunds of a resource's children or of itself (tests and read commands).
pub async fn refunds_under(
    pool: &SqlitePool,
    resource_id: &str,
) -> Result<Vec<Refund>, StoreError> {
    sqlx::query_as::<_, Refund>(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE resource_id = ? OR parent_id = ? ORDER BY id"
    ))
    .bind(resource_id)
    .bind(resource_id)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}
