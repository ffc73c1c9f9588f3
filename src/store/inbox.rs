//! SQL of the inbox: durable accept with dedupe, claims with leases, outcomes.

use sqlx::{FromRow, SqlitePool};

use super::Tx;

/// A verified delivery on its way into the inbox.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub provider: String,
    pub dedupe_key: String,
    pub event_type: String,
    pub event_id: Option<String>,
    pub resource_kind: Option<String>,
    pub resource_id: Option<String>,
    pub context: Option<String>,
    pub livemode: Option<bool>,
    pub raw_body: Vec<u8>,
    pub source: &'static str,
    pub received_at: String,
}

/// Inserts unless the (provider, dedupe key) is already there. True when new.
pub async fn insert(tx: &mut Tx<'_>, d: &NewDelivery) -> Result<bool, sqlx::Error> {
    Ok(insert_many(tx, &[d]).await?[0])
}

/// Inserts many deliveries with one statement (a group commit's batch): one
/// round trip instead of one per row. Returns, per delivery, whether it was
/// new; of two with the same key in one batch only the first can be.
pub async fn insert_many(
    tx: &mut Tx<'_>,
    batch: &[&NewDelivery],
) -> Result<Vec<bool>, sqlx::Error> {
    // SQLite allows 32766 bound values; 13 a row.
    const ROWS_PER_STATEMENT: usize = 1_000;
    let mut new = vec![false; batch.len()];
    let mut seen = std::collections::HashMap::new();
    let mut firsts = Vec::with_capacity(batch.len());
    for (i, d) in batch.iter().enumerate() {
        if seen
            .insert((d.provider.as_str(), d.dedupe_key.as_str()), i)
            .is_none()
        {
            firsts.push(i);
        }
    }
    for chunk in firsts.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                                context, livemode, raw_body, body_size, source, received_at, next_attempt_at) ",
        );
        qb.push_values(chunk, |mut row, &i| {
            let d = batch[i];
            row.push_bind(&d.provider)
                .push_bind(&d.dedupe_key)
                .push_bind(&d.event_type)
                .push_bind(&d.event_id)
                .push_bind(&d.resource_kind)
                .push_bind(&d.resource_id)
                .push_bind(&d.context)
                .push_bind(super::bool_int(d.livemode))
                .push_bind(&d.raw_body)
                .push_bind(d.raw_body.len() as i64)
                .push_bind(d.source)
                .push_bind(&d.received_at)
                .push_bind(&d.received_at);
        });
        qb.push(" ON CONFLICT (provider, dedupe_key) DO NOTHING RETURNING provider, dedupe_key");
        let added: Vec<(String, String)> = qb.build_query_as().fetch_all(&mut **tx).await?;
        for (provider, key) in &added {
            if let Some(&i) = seen.get(&(provider.as_str(), key.as_str())) {
                new[i] = true;
            }
        }
    }
    Ok(new)
}

/// A stored delivery, as workers and read commands see it.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Delivery {
    pub id: i64,
    pub provider: String,
    pub dedupe_key: String,
    pub event_type: String,
    pub event_id: Option<String>,
    pub resource_kind: Option<String>,
    pub resource_id: Option<String>,
    pub context: Option<String>,
    pub livemode: Option<bool>,
    #[serde(skip)]
    pub raw_body: Option<Vec<u8>>,
    pub body_size: i64,
    pub source: String,
    pub received_at: String,
    pub state: String,
    pub attempts: i64,
    pub next_attempt_at: String,
    pub last_error: Option<String>,
    pub processed_at: Option<String>,
}

const DELIVERY_COLUMNS: &str =
    "id, provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
     context, livemode, raw_body, body_size, source, received_at, state, attempts, next_attempt_at,
     last_error, processed_at";

/// Claims the next ready delivery whose resource no live lease holds, and
/// leases it until `lease_until`. First a delivery whose lease ran out (a
/// crashed worker; there are at most a few `processing` rows), else the due
/// delivery first in line: `next_attempt_at` is the receipt time for a first
/// attempt, so new deliveries go in arrival order and retries when they fall
/// due. Both lookups are index range scans (`inbox_ready`, `inbox_due`).
pub async fn claim(
    pool: &SqlitePool,
    now: &str,
    lease_until: &str,
) -> Result<Option<Delivery>, sqlx::Error> {
    let free = |alias: &str| {
        format!(
            "({alias}.resource_id IS NULL OR NOT EXISTS (
                SELECT 1 FROM inbox o
                WHERE o.resource_id = {alias}.resource_id AND o.state = 'processing'
                  AND o.lease_until > ?2 AND o.id <> {alias}.id))"
        )
    };
    let sql = format!(
        "UPDATE inbox SET state = 'processing', lease_until = ?1, attempts = attempts + 1
         WHERE id = COALESCE(
            (SELECT l.id FROM inbox l
             WHERE l.state = 'processing' AND l.lease_until <= ?2 AND {lapsed_free}
             ORDER BY l.id LIMIT 1),
            (SELECT c.id FROM inbox c
             WHERE c.state IN ('pending', 'failed') AND c.next_attempt_at <= ?2 AND {due_free}
             ORDER BY c.next_attempt_at, c.id LIMIT 1))
         RETURNING {DELIVERY_COLUMNS}",
        lapsed_free = free("l"),
        due_free = free("c"),
    );
    sqlx::query_as::<_, Delivery>(&sql)
        .bind(lease_until)
        .bind(now)
        .fetch_optional(pool)
        .await
}

/// Claims one given delivery (replay processes it inline), under the same
/// conditions as [`claim`]: ready or with a lapsed lease, its resource free.
pub async fn claim_one(
    pool: &SqlitePool,
    id: i64,
    now: &str,
    lease_until: &str,
) -> Result<Option<Delivery>, sqlx::Error> {
    let sql = format!(
        "UPDATE inbox SET state = 'processing', lease_until = ?1, attempts = attempts + 1
         WHERE id = ?3
           AND ((state IN ('pending', 'failed') AND next_attempt_at <= ?2)
                OR (state = 'processing' AND lease_until <= ?2))
           AND (resource_id IS NULL OR NOT EXISTS (
                 SELECT 1 FROM inbox o
                 WHERE o.resource_id = inbox.resource_id AND o.state = 'processing'
                   AND o.lease_until > ?2 AND o.id <> inbox.id))
         RETURNING {DELIVERY_COLUMNS}"
    );
    sqlx::query_as::<_, Delivery>(&sql)
        .bind(lease_until)
        .bind(now)
        .bind(id)
        .fetch_optional(pool)
        .await
}

pub async fn get(pool: &SqlitePool, id: i64) -> Result<Option<Delivery>, sqlx::Error> {
    sqlx::query_as::<_, Delivery>(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM inbox WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

pub async fn by_key(pool: &SqlitePool, key: &str) -> Result<Option<Delivery>, sqlx::Error> {
    sqlx::query_as::<_, Delivery>(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM inbox WHERE dedupe_key = ? ORDER BY id LIMIT 1"
    ))
    .bind(key)
    .fetch_optional(pool)
    .await
}

/// Ends a processing attempt: `processed` or `ignored`. Only the holder of the
/// lease may (the lease is part of the condition), so a late worker whose lease
/// ran out changes nothing.
pub async fn finish(
    tx: &mut Tx<'_>,
    id: i64,
    lease_until: &str,
    state: &str,
    now: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inbox SET state = ?, processed_at = ?, lease_until = NULL, last_error = NULL
         WHERE id = ? AND state = 'processing' AND lease_until = ?",
    )
    .bind(state)
    .bind(now)
    .bind(id)
    .bind(lease_until)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A failed attempt: retry at `next_attempt_at`, or `dead` when `dead` is set.
pub async fn fail(
    tx: &mut Tx<'_>,
    id: i64,
    lease_until: &str,
    error: &str,
    next_attempt_at: &str,
    dead: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inbox SET state = ?, next_attempt_at = ?, last_error = ?, lease_until = NULL
         WHERE id = ? AND state = 'processing' AND lease_until = ?",
    )
    .bind(if dead { "dead" } else { "failed" })
    .bind(next_attempt_at)
    .bind(error)
    .bind(id)
    .bind(lease_until)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives an attempt back without counting it (e.g. the provider key is wrong:
/// no event is dropped for that).
pub async fn release(
    pool: &SqlitePool,
    id: i64,
    lease_until: &str,
    error: &str,
    next_attempt_at: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE inbox SET state = 'pending', attempts = MAX(attempts - 1, 0), next_attempt_at = ?,
                          last_error = ?, lease_until = NULL
         WHERE id = ? AND state = 'processing' AND lease_until = ?",
    )
    .bind(next_attempt_at)
    .bind(error)
    .bind(id)
    .bind(lease_until)
    .execute(pool)
    .await?;
    Ok(())
}

/// Puts a stored delivery back in line (replay), whatever its state.
pub async fn requeue(pool: &SqlitePool, id: i64, now: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inbox SET state = 'pending', attempts = 0, next_attempt_at = ?, lease_until = NULL
         WHERE id = ? AND state <> 'processing'",
    )
    .bind(now)
    .bind(id)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deliveries not yet finished, and the receipt time of the oldest.
pub async fn depth(pool: &SqlitePool) -> Result<(i64, Option<String>), sqlx::Error> {
    sqlx::query_as(
        "SELECT COUNT(*), MIN(received_at) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
    )
    .fetch_one(pool)
    .await
}

pub async fn count_by_state(pool: &SqlitePool) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as("SELECT state, COUNT(*) FROM inbox GROUP BY state ORDER BY state")
        .fetch_all(pool)
        .await
}
