//! Refused deliveries: reason, source, size, time; never the body.

use sqlx::{SqliteConnection, SqlitePool};

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
) -> Result<(), sqlx::Error> {
    for chunk in refusals.chunks(ROWS_PER_INSERT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO refusals (provider, reason, message, http_status, body_size, remote_addr, received_at) ",
        );
        qb.push_values(chunk, |mut row, r| {
            row.push_bind(&r.provider)
                .push_bind(&r.reason)
                .push_bind(&r.message)
                .push_bind(i64::from(r.http_status))
                .push_bind(r.body_size)
                .push_bind(&r.remote_addr)
                .push_bind(&r.received_at);
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

/// Refusals received at or after `since`.
pub async fn count_since(pool: &SqlitePool, since: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM refusals WHERE received_at >= ?")
        .bind(since)
        .fetch_one(pool)
        .await
}
