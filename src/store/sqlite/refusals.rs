//! Refused deliveries: reason, source, size, time; never the body.

use crate::store::StoreError;
use sqlx::SqliteConnection;

#[derive(Debug, Clone)]
pub struct Refusal {
    pub provider: String,
    pub reason: String,
    pub message: String,
    pub http_status: u16,
    pub body_size: Option<i64>,
    pub remote_addr: Option<String>,
    pub received_at: String,
}

/// Most refusals one statement of [`insert_many`] carries: every row count
/// is a statement of its own in the connection's cache, so a flood's
/// batches of all sizes add at most 64 small ones.
pub const ROWS_PER_INSERT: usize = 64;

/// Records refusals, one statement per [`ROWS_PER_INSERT`].
pub async fn insert_many(
    conn: &mut SqliteConnection,
    refusals: &[&Refusal],
) -> Result<(), StoreError> {
    for chunk in refusals.chunks(ROWS_PER_INSERT) {
        let sql = insert_sql(chunk.len());
        let mut insert = sqlx::query(&sql);
        for r in chunk {
            insert = insert
                .bind(&r.provider)
                .bind(&r.reason)
                .bind(&r.message)
                .bind(i64::from(r.http_status))
                .bind(r.body_size)
                .bind(&r.remote_addr)
                .bind(&r.received_at);
        }
        insert.execute(&mut *conn).await?;
    }
    Ok(())
}

/// [`insert_many`] on the writer's handle, one prepared statement stepped
/// once per refusal (see [`super::inbox::insert_rows`]).
pub fn insert_rows(conn: &rusqlite::Connection, refusals: &[&Refusal]) -> Result<(), StoreError> {
    if refusals.is_empty() {
        return Ok(());
    }
    let mut insert = conn.prepare(&insert_sql(1)).map_err(super::direct_error)?;
    for r in refusals {
        insert
            .execute(rusqlite::params![
                r.provider,
                r.reason,
                r.message,
                r.http_status,
                r.body_size,
                r.remote_addr,
                r.received_at,
            ])
            .map_err(super::direct_error)?;
    }
    Ok(())
}

/// The insert of `rows` refusals, 7 values each.
fn insert_sql(rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO refusals (provider, reason, message, http_status, body_size, remote_addr, received_at)
         VALUES {values}"
    )
}
