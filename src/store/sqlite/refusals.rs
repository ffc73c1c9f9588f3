//! Refused deliveries: reason, source, size, time; never the body. Up to a
//! rate (`database.refusal_rows_per_minute`) each is a row of `refusals`;
//! beyond it they are counted in `refusal_summaries`, one row per minute,
//! provider, reason and source, so a flood cannot fill the disk.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::store::model::source_of;
use crate::store::StoreError;
use sqlx::SqliteConnection;

use super::Tx;

#[derive(Debug, Clone)]
pub struct Refusal {
    pub provider: String,
    pub reason: String,
    pub message: String,
    pub http_status: u16,
    pub body_size: Option<i64>,
    pub remote_addr: Option<String>,
    pub received_at: String,
    /// Counted in a summary rather than kept as a row of its own.
    pub summarized: bool,
}

impl Refusal {
    /// Where it came from, as summaries and limits group sources: an IPv4
    /// address, or an IPv6 address's /64 (one host commonly holds a whole
    /// /64); empty when unknown.
    pub fn source(&self) -> String {
        self.remote_addr
            .as_deref()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(|a| source_of(a.ip()).to_string())
            .unwrap_or_default()
    }
}

/// The summary a refusal is counted in: its minute (`YYYY-MM-DDTHH:MM`,
/// the start of its `received_at`), provider, reason and source.
pub(crate) type SummaryKey<'a> = (&'a str, &'a str, &'a str, String);

/// The summarized refusals of a batch, counted per summary, with the
/// status of each.
pub(crate) fn summaries<'a>(refusals: &[&'a Refusal]) -> BTreeMap<SummaryKey<'a>, (u16, i64)> {
    let mut counted = BTreeMap::new();
    for r in refusals.iter().filter(|r| r.summarized) {
        let minute = r.received_at.get(..16).unwrap_or(&r.received_at);
        let entry = counted
            .entry((minute, r.provider.as_str(), r.reason.as_str(), r.source()))
            .or_insert((r.http_status, 0));
        entry.1 += 1;
    }
    counted
}

/// Adds counted refusals to their summary.
const ADD_TO_SUMMARY: &str =
    "INSERT INTO refusal_summaries (minute, provider, reason, source, http_status, count)
     VALUES (?, ?, ?, ?, ?, ?)
     ON CONFLICT (minute, provider, reason, source) DO UPDATE SET count = count + excluded.count";

/// The statements [`insert_many`] runs for `refusals`.
pub fn statements(refusals: &[&Refusal]) -> usize {
    let rows = refusals.iter().filter(|r| !r.summarized).count();
    rows.div_ceil(ROWS_PER_INSERT) + summaries(refusals).len()
}

/// Refused deliveries received at or after `since`, per (provider, reason):
/// the rows and the summaries together (a summary whose minute holds
/// `since` counts whole).
pub async fn counts_since(
    tx: &mut Tx<'_>,
    since: &str,
) -> Result<Vec<(String, String, i64)>, StoreError> {
    sqlx::query_as::<_, (String, String, i64)>(
        "SELECT provider, reason, SUM(n) FROM (
             SELECT provider, reason, COUNT(*) AS n FROM refusals
             WHERE received_at >= ?1 GROUP BY provider, reason
             UNION ALL
             SELECT provider, reason, SUM(count) AS n FROM refusal_summaries
             WHERE minute >= substr(?1, 1, 16) GROUP BY provider, reason)
         GROUP BY provider, reason ORDER BY provider, reason",
    )
    .bind(since)
    .fetch_all(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// Deletes up to `?2` summaries of minutes wholly before the time `?1`.
pub const DELETE_OLD_SUMMARIES: &str = "DELETE FROM refusal_summaries WHERE rowid IN (
     SELECT rowid FROM refusal_summaries WHERE minute < substr(?1, 1, 16) LIMIT ?2)";

/// Most refusals one statement of [`insert_many`] carries: every row count
/// is a statement of its own in the connection's cache, so a flood's
/// batches of all sizes add at most 64 small ones.
pub const ROWS_PER_INSERT: usize = 64;

/// Records refusals, one statement per [`ROWS_PER_INSERT`].
pub async fn insert_many(
    conn: &mut SqliteConnection,
    refusals: &[&Refusal],
) -> Result<(), StoreError> {
    for ((minute, provider, reason, source), (status, count)) in summaries(refusals) {
        sqlx::query(ADD_TO_SUMMARY)
            .bind(minute)
            .bind(provider)
            .bind(reason)
            .bind(source)
            .bind(i64::from(status))
            .bind(count)
            .execute(&mut *conn)
            .await?;
    }
    let rows: Vec<&Refusal> = refusals.iter().copied().filter(|r| !r.summarized).collect();
    for chunk in rows.chunks(ROWS_PER_INSERT) {
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
    for ((minute, provider, reason, source), (status, count)) in summaries(refusals) {
        conn.execute(
            ADD_TO_SUMMARY,
            rusqlite::params![minute, provider, reason, source, status, count],
        )
        .map_err(super::direct_error)?;
    }
    let mut insert = conn.prepare(&insert_sql(1)).map_err(super::direct_error)?;
    for r in refusals.iter().filter(|r| !r.summarized) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DatabaseConfig;

    fn refusal(source: &str, received_at: &str, summarized: bool) -> Refusal {
        Refusal {
            provider: "stripe".into(),
            reason: "bad_signature".into(),
            message: "no match".into(),
            http_status: 401,
            body_size: None,
            remote_addr: Some(source.into()),
            received_at: received_at.into(),
            summarized,
        }
    }

    /// Summarized refusals make one row per minute, provider, reason and
    /// source (an IPv6 /64 is one source), and still count, with the rows,
    /// in what the alert reads; prune drops the minutes before its cutoff.
    #[tokio::test]
    async fn summaries_count_every_refusal_in_few_rows() {
        let dir = tempfile::tempdir().unwrap();
        let engine =
            super::super::SqliteStore::open(&dir.path().join("x.db"), &DatabaseConfig::default())
                .await
                .unwrap();
        let db = engine.db().clone();
        let mut batch = vec![refusal("192.0.2.1:4000", "2026-12-07T10:00:01.000Z", false)];
        for i in 0..50 {
            let second = format!("2026-12-07T10:00:{:02}.000Z", i % 60);
            batch.push(refusal(&format!("192.0.2.1:{}", 5000 + i), &second, true));
            batch.push(refusal(&format!("[2001:db8::{i:x}]:443"), &second, true));
        }
        batch.push(refusal("192.0.2.1:4001", "2026-12-07T10:01:00.000Z", true));
        let refs: Vec<&Refusal> = batch.iter().collect();
        let mut conn = db.write.acquire().await.unwrap();
        insert_many(&mut conn, &refs).await.unwrap();
        drop(conn);

        let count = |sql| sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.read);
        assert_eq!(count("SELECT COUNT(*) FROM refusals").await.unwrap(), 1);
        assert_eq!(
            count("SELECT COUNT(*) FROM refusal_summaries")
                .await
                .unwrap(),
            3
        );
        let mut tx = db.write.begin().await.unwrap();
        let counted = counts_since(&mut tx, "2026-12-07T10:00:00.000Z")
            .await
            .unwrap();
        assert_eq!(
            counted,
            vec![("stripe".into(), "bad_signature".into(), 102)]
        );
        tx.rollback().await.unwrap();

        super::super::prune::delete_refusals(&db.write, "2026-12-07T10:01:00.000Z")
            .await
            .unwrap();
        assert_eq!(
            count("SELECT COUNT(*) FROM refusal_summaries")
                .await
                .unwrap(),
            1
        );
        assert_eq!(count("SELECT COUNT(*) FROM refusals").await.unwrap(), 0);
        db.close().await;
    }
}
