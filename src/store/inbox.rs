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
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                            context, livemode, raw_body, body_size, source, received_at, next_attempt_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (provider, dedupe_key) DO NOTHING
         RETURNING id",
    )
    .bind(&d.provider)
    .bind(&d.dedupe_key)
    .bind(&d.event_type)
    .bind(&d.event_id)
    .bind(&d.resource_kind)
    .bind(&d.resource_id)
    .bind(&d.context)
    .bind(super::bool_int(d.livemode))
    .bind(&d.raw_body)
    .bind(d.raw_body.len() as i64)
    .bind(d.source)
    .bind(&d.received_at)
    .bind(&d.received_at)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(id.is_some())
}

/// A read-only look before the write: duplicates are answered without one.
pub async fn exists(
    pool: &SqlitePool,
    provider: &str,
    dedupe_key: &str,
) -> Result<bool, sqlx::Error> {
    let found: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM inbox WHERE provider = ? AND dedupe_key = ?")
            .bind(provider)
            .bind(dedupe_key)
            .fetch_optional(pool)
            .await?;
    Ok(found.is_some())
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

/// Claims the oldest ready delivery whose resource no live lease holds, and
/// leases it until `lease_until`. A lease that ran out (a crashed worker) makes
/// its delivery ready again.
pub async fn claim(
    pool: &SqlitePool,
    now: &str,
    lease_until: &str,
) -> Result<Option<Delivery>, sqlx::Error> {
    let sql = format!(
        "UPDATE inbox SET state = 'processing', lease_until = ?1, attempts = attempts + 1
         WHERE id = (
            SELECT c.id FROM inbox c
            WHERE ((c.state IN ('pending', 'failed') AND c.next_attempt_at <= ?2)
                   OR (c.state = 'processing' AND c.lease_until <= ?2))
              AND (c.resource_id IS NULL OR NOT EXISTS (
                    SELECT 1 FROM inbox o
                    WHERE o.resource_id = c.resource_id AND o.state = 'processing'
                      AND o.lease_until > ?2 AND o.id <> c.id))
            ORDER BY c.id
            LIMIT 1)
         RETURNING {DELIVERY_COLUMNS}"
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
