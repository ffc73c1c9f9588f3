//! SQL of cancel requests issued through cancelwatch and the providers' answers.

use crate::store::StoreError;
use sqlx::FromRow;

use super::Tx;

/// How many earlier requests for this resource burnt their idempotency key
/// (the provider answered `idempotency_conflict`): the next key's attempt number.
pub async fn burnt_keys(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    resource_id: &str,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM cancel_requests
         WHERE provider = ? AND kind = ? AND resource_id = ? AND outcome = 'idempotency_conflict'",
    )
    .bind(provider)
    .bind(kind)
    .bind(resource_id)
    .fetch_one(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// Records a request before it goes out; returns its id.
pub async fn insert(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    resource_id: &str,
    idempotency_key: &str,
    requested_by: &str,
    now: &str,
) -> Result<i64, StoreError> {
    sqlx::query_scalar(
        "INSERT INTO cancel_requests (provider, kind, resource_id, idempotency_key, requested_by, requested_at)
         VALUES (?, ?, ?, ?, ?, ?)
         RETURNING id",
    )
    .bind(provider)
    .bind(kind)
    .bind(resource_id)
    .bind(idempotency_key)
    .bind(requested_by)
    .bind(now)
    .fetch_one(&mut **tx)
    .await
        .map_err(StoreError::from)
}

/// Stores the provider's answer (or the failure to get one: `error`).
pub async fn answer(
    tx: &mut Tx<'_>,
    id: i64,
    http_status: Option<u16>,
    outcome: &str,
    error_code: Option<&str>,
    response_body: Option<&str>,
    now: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE cancel_requests SET http_status = ?, outcome = ?, error_code = ?, response_body = ?,
                                    answered_at = ?
         WHERE id = ?",
    )
    .bind(http_status.map(i64::from))
    .bind(outcome)
    .bind(error_code)
    .bind(response_body)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A stored cancel request.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
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
    pub response_body: Option<String>,
    pub answered_at: Option<String>,
}

pub(crate) const CANCEL_COLUMNS: &str =
    "id, provider, kind, resource_id, idempotency_key, requested_by, requested_at,
     http_status, outcome, error_code, response_body, answered_at";

/// Every request about one resource, oldest first.
pub async fn of_resource(
    pool: &sqlx::SqlitePool,
    kind: &str,
    resource_id: &str,
) -> Result<Vec<CancelRequest>, StoreError> {
    sqlx::query_as::<_, CancelRequest>(&format!(
        "SELECT {CANCEL_COLUMNS} FROM cancel_requests
         WHERE kind = ? AND resource_id = ? ORDER BY id"
    ))
    .bind(kind)
    .bind(resource_id)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}
