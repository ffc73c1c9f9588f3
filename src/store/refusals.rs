//! Refused deliveries: reason, source, size, time; never the body.

use sqlx::SqlitePool;

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

pub async fn insert_tx(tx: &mut super::Tx<'_>, r: &Refusal) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO refusals (provider, reason, message, http_status, body_size, remote_addr, received_at)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&r.provider)
    .bind(&r.reason)
    .bind(&r.message)
    .bind(r.http_status as i64)
    .bind(r.body_size)
    .bind(&r.remote_addr)
    .bind(&r.received_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Refusals received at or after `since`.
pub async fn count_since(pool: &SqlitePool, since: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT COUNT(*) FROM refusals WHERE received_at >= ?")
        .bind(since)
        .fetch_one(pool)
        .await
}
