//! SQL of the inbox: durable accept with dedupe, claims with leases, outcomes.

use crate::store::StoreError;
use sqlx::{FromRow, SqliteConnection, SqlitePool};

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
pub async fn insert(tx: &mut Tx<'_>, d: &NewDelivery) -> Result<bool, StoreError> {
    Ok(insert_many(tx, &[(d, None)], &d.received_at).await?[0].is_some())
}

/// Most deliveries one statement of [`insert_many`] carries. Every row
/// count is a statement of its own in the connection's cache (up to 256,
/// each sized by its program and bound values): at most 64 rows a statement
/// keeps that cache small whatever the batch sizes (with 128, peak RSS at
/// full-speed ingestion was 95–98 MiB; with 64, 87–89 MiB and the same
/// throughput).
pub const ROWS_PER_INSERT: usize = 64;

/// A new row of [`insert_many`]: its id, and whether it went in leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub id: i64,
    pub leased: bool,
}

/// Inserts many deliveries with one statement (a group commit's batch): one
/// round trip instead of one per row. Each goes in line (`pending`), or,
/// when it comes with a lease time and no live lease holds its resource at
/// `now` (the claim's rule), straight to a worker of this process
/// (`processing`, first attempt). Returns, per delivery, its new row, or
/// `None` when the key was already there; of two with the same key in one
/// batch only the first can be new. The caller gives a lease to at most
/// one delivery of a resource per batch.
pub async fn insert_many(
    conn: &mut SqliteConnection,
    batch: &[(&NewDelivery, Option<&str>)],
    now: &str,
) -> Result<Vec<Option<Inserted>>, StoreError> {
    let mut new = vec![None; batch.len()];
    let mut seen = std::collections::HashMap::new();
    let mut firsts = Vec::with_capacity(batch.len());
    for (i, (d, _)) in batch.iter().enumerate() {
        // The first of a key is the one inserted, and the one its new row
        // is told to.
        if let std::collections::hash_map::Entry::Vacant(first) =
            seen.entry((d.provider.as_str(), d.dedupe_key.as_str()))
        {
            first.insert(i);
            firsts.push(i);
        }
    }
    for chunk in firsts.chunks(ROWS_PER_INSERT) {
        // `go`: the row has a lease and its resource is free.
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                                context, livemode, raw_body, body_size, source, received_at, next_attempt_at,
                                state, attempts, lease_until, lease_owner)
             SELECT column1, column2, column3, column4, column5, column6, column7, column8, column9,
                    column10, column11, column12, column12,
                    CASE WHEN go THEN 'processing' ELSE 'pending' END, go, CASE WHEN go THEN column13 END,
                    CASE WHEN go THEN column14 END
             FROM (SELECT v.*, (v.column13 IS NOT NULL AND NOT EXISTS (
                       SELECT 1 FROM inbox o
                       WHERE o.resource_id = v.column6 AND o.state = 'processing' AND o.lease_until > ",
        );
        qb.push_bind(now).push(")) AS go FROM (");
        qb.push_values(chunk, |mut row, &i| {
            let (d, lease_until) = batch[i];
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
                .push_bind(lease_until)
                .push_bind(super::owner::this_process());
        });
        // `WHERE true` tells SQLite's parser that `ON CONFLICT` is the
        // upsert clause, not a join's.
        qb.push(
            ") AS v) WHERE true
             ON CONFLICT (provider, dedupe_key) DO NOTHING
             RETURNING id, provider, dedupe_key, state = 'processing'",
        );
        let added: Vec<(i64, String, String, bool)> =
            qb.build_query_as().fetch_all(&mut *conn).await?;
        for (id, provider, key, leased) in added {
            if let Some(&i) = seen.get(&(provider.as_str(), key.as_str())) {
                new[i] = Some(Inserted { id, leased });
            }
        }
    }
    Ok(new)
}

/// [`insert_many`] on the writer's handle (see [`super::on_handle`]), for a
/// group too large for one statement: the same rows and results, from a
/// plain one-row insert prepared once and stepped per delivery, with no
/// round trip to the connection's thread per 64 rows. `conn` must be in a
/// transaction, which keeps them all or none.
pub fn insert_rows(
    conn: &rusqlite::Connection,
    batch: &[(&NewDelivery, Option<&str>)],
    now: &str,
) -> Result<Vec<Option<Inserted>>, StoreError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let e = super::direct_error;
    // `RETURNING` and the lease rule's subquery in each one-row insert cost
    // more than checking the lease apart, only for a delivery that comes
    // with one, and reading the new row's id.
    let mut insert = conn
        .prepare(
            "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                                context, livemode, raw_body, body_size, source, received_at, next_attempt_at,
                                state, attempts, lease_until, lease_owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12, ?13, ?14, ?15, ?16)
             ON CONFLICT (provider, dedupe_key) DO NOTHING",
        )
        .map_err(e)?;
    let mut held = None;
    let mut out = Vec::with_capacity(batch.len());
    for (d, lease_until) in batch {
        // The claim's rule, as in `insert_many`: no live lease holds the resource.
        let lease = match (lease_until, &d.resource_id) {
            (None, _) => None,
            (Some(until), None) => Some(until),
            (Some(until), Some(resource)) => {
                let held = match &mut held {
                    Some(held) => held,
                    None => held.insert(
                        conn.prepare(
                            "SELECT EXISTS (SELECT 1 FROM inbox
                                            WHERE resource_id = ?1 AND state = 'processing' AND lease_until > ?2)",
                        )
                        .map_err(e)?,
                    ),
                };
                let taken: bool = held.query_row((resource, now), |r| r.get(0)).map_err(e)?;
                (!taken).then_some(until)
            }
        };
        let added = insert
            .execute(rusqlite::params![
                d.provider,
                d.dedupe_key,
                d.event_type,
                d.event_id,
                d.resource_kind,
                d.resource_id,
                d.context,
                super::bool_int(d.livemode),
                d.raw_body,
                d.raw_body.len() as i64,
                d.source,
                d.received_at,
                if lease.is_some() {
                    "processing"
                } else {
                    "pending"
                },
                i64::from(lease.is_some()),
                lease,
                lease.map(|_| super::owner::this_process()),
            ])
            .map_err(e)?;
        // A key already there (also earlier in this batch) adds no row.
        out.push((added == 1).then(|| Inserted {
            id: conn.last_insert_rowid(),
            leased: lease.is_some(),
        }));
    }
    Ok(out)
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

pub(crate) const DELIVERY_COLUMNS: &str =
    "id, provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
     context, livemode, raw_body, body_size, source, received_at, state, attempts, next_attempt_at,
     last_error, processed_at";

/// Claims up to `limit` ready deliveries and leases them until
/// `lease_until`, in one statement: first deliveries whose lease ran out (a
/// crashed worker's; there are at most a few `processing` rows), then the
/// due deliveries in line (`next_attempt_at` is the receipt time for a first
/// attempt, so new deliveries go in arrival order and retries when they fall
/// due). Never one whose resource a live lease holds, and never two of one
/// resource in a batch: the later ones wait for the next claim. Both lookups
/// are index range scans that stop at the limit (`inbox_state_id`,
/// `inbox_ready`). Returned in the order they fell due (`next_attempt_at`,
/// then id).
///
/// One statement is atomic on its own, so the pick and the lease are one
/// step for every other writer of the database, inside a transaction or not.
pub async fn claim_batch(
    conn: &mut SqliteConnection,
    now: &str,
    lease_until: &str,
    limit: usize,
) -> Result<Vec<Delivery>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut claimed: Vec<Delivery> = sqlx::query_as(&claim_sql())
        .bind(now)
        .bind((limit * 2) as i64)
        .bind(limit as i64)
        .bind(lease_until)
        .bind(super::owner::this_process())
        .fetch_all(conn)
        .await?;
    claimed.sort_by(|a, b| (&a.next_attempt_at, a.id).cmp(&(&b.next_attempt_at, b.id)));
    Ok(claimed)
}

/// The statement of [`claim_batch`]: `?1` now, `?2` how many candidates
/// each list looks at, `?3` the limit, `?4` the lease's end.
fn claim_sql() -> String {
    // A few more candidates than wanted: some may share a resource. Each
    // candidate list is materialized on its own so that it stays one ordered
    // index scan stopping at its limit; of the candidates that share a
    // resource only the first (lapsed ones first, then by due time) is taken.
    format!(
        "WITH lapsed AS MATERIALIZED (
             SELECT l.id, l.resource_id, 0 AS part, '' AS due FROM inbox l
             WHERE l.state = 'processing' AND l.lease_until <= ?1 AND {lapsed_free}
             ORDER BY l.id LIMIT ?2),
         ready AS MATERIALIZED (
             -- One ordered range scan of `inbox_ready` per state, merged,
             -- that stops at the limit. (`state IN (…)` would gather and sort
             -- every due row first, checking each one's resource: a cost
             -- that grows with the backlog.)
             SELECT c.id, c.resource_id, 1 AS part, c.next_attempt_at AS due FROM inbox c
             WHERE c.state = 'pending' AND c.next_attempt_at <= ?1 AND {pending_free}
             UNION ALL
             SELECT f.id, f.resource_id, 1 AS part, f.next_attempt_at AS due FROM inbox f
             WHERE f.state = 'failed' AND f.next_attempt_at <= ?1 AND {failed_free}
             ORDER BY 4, 1 LIMIT ?2),
         ranked AS (
             SELECT id, part, due, ROW_NUMBER() OVER (
                 PARTITION BY resource_id, CASE WHEN resource_id IS NULL THEN id END
                 ORDER BY part, due, id) AS nth
             FROM (SELECT * FROM lapsed UNION ALL SELECT * FROM ready) AS candidates),
         picked AS (
             SELECT id FROM ranked WHERE nth = 1 ORDER BY part, due, id LIMIT ?3)
         UPDATE inbox SET state = 'processing', lease_until = ?4, lease_owner = ?5,
                          attempts = attempts + 1
         WHERE id IN (SELECT id FROM picked)
         RETURNING {DELIVERY_COLUMNS}",
        lapsed_free = resource_free("l"),
        pending_free = resource_free("c"),
        failed_free = resource_free("f"),
    )
}

/// The SQL condition, for the inbox row `alias` (with `?1` the time now),
/// that no live lease holds its resource: the claim's rule that one
/// resource is processed by one worker at a time.
fn resource_free(alias: &str) -> String {
    format!(
        "({alias}.resource_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM inbox o
            WHERE o.resource_id = {alias}.resource_id AND o.state = 'processing'
              AND o.lease_until > ?1 AND o.id <> {alias}.id))"
    )
}

impl Delivery {
    /// The row [`insert_many`] stored for `d` leased: what a claim of it
    /// would have returned.
    pub fn inserted_leased(id: i64, d: &NewDelivery) -> Delivery {
        Delivery {
            id,
            provider: d.provider.clone(),
            dedupe_key: d.dedupe_key.clone(),
            event_type: d.event_type.clone(),
            event_id: d.event_id.clone(),
            resource_kind: d.resource_kind.clone(),
            resource_id: d.resource_id.clone(),
            context: d.context.clone(),
            livemode: d.livemode,
            raw_body: Some(d.raw_body.clone()),
            body_size: d.raw_body.len() as i64,
            source: d.source.to_string(),
            received_at: d.received_at.clone(),
            state: "processing".into(),
            attempts: 1,
            next_attempt_at: d.received_at.clone(),
            last_error: None,
            processed_at: None,
        }
    }
}

/// Claims the next ready delivery (see [`claim_batch`]).
pub async fn claim(
    pool: &SqlitePool,
    now: &str,
    lease_until: &str,
) -> Result<Option<Delivery>, StoreError> {
    let mut conn = pool.acquire().await?;
    let claimed = claim_batch(&mut conn, now, lease_until, 1).await?;
    Ok(claimed.into_iter().next())
}

/// Claims one given delivery (replay processes it inline), under the same
/// conditions as [`claim`]: ready or with a lapsed lease, its resource free.
pub async fn claim_one(
    pool: &SqlitePool,
    id: i64,
    now: &str,
    lease_until: &str,
) -> Result<Option<Delivery>, StoreError> {
    let sql = format!(
        "UPDATE inbox SET state = 'processing', lease_until = ?1, lease_owner = ?4,
                          attempts = attempts + 1
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
        .bind(super::owner::this_process())
        .fetch_optional(pool)
        .await
        .map_err(StoreError::from)
}

/// The delivery with row id `id`, read inside a write transaction.
pub async fn get_in(tx: &mut Tx<'_>, id: i64) -> Result<Option<Delivery>, StoreError> {
    sqlx::query_as::<_, Delivery>(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM inbox WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

pub async fn get(pool: &SqlitePool, id: i64) -> Result<Option<Delivery>, StoreError> {
    sqlx::query_as::<_, Delivery>(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM inbox WHERE id = ?"
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)
}

pub async fn by_key(pool: &SqlitePool, key: &str) -> Result<Option<Delivery>, StoreError> {
    sqlx::query_as::<_, Delivery>(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM inbox WHERE dedupe_key = ? ORDER BY id LIMIT 1"
    ))
    .bind(key)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)
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
) -> Result<bool, StoreError> {
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

/// Ends a processing attempt `ignored`, keeping why in `last_error` (for
/// `events` to show); false when its lease was lost meanwhile.
pub async fn ignore(
    tx: &mut Tx<'_>,
    id: i64,
    lease_until: &str,
    reason: &str,
    now: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE inbox SET state = 'ignored', processed_at = ?, lease_until = NULL, last_error = ?
         WHERE id = ? AND state = 'processing' AND lease_until = ?",
    )
    .bind(now)
    .bind(reason)
    .bind(id)
    .bind(lease_until)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Ends many processing attempts, each `processed` or `ignored`: `ends` holds
/// (delivery, lease end, state). An attempt whose lease was lost (the
/// delivery was claimed again, with a lease of its own) is left alone.
/// Returns the deliveries it ended.
pub async fn finish_many(
    tx: &mut Tx<'_>,
    ends: &[(i64, &str, &str)],
    now: &str,
) -> Result<std::collections::HashSet<i64>, StoreError> {
    let mut ended = std::collections::HashSet::with_capacity(ends.len());
    // SQLite allows 32766 bound values; 3 a delivery.
    for chunk in ends.chunks(1_000) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "UPDATE inbox SET state = v.column3, processed_at = ",
        );
        qb.push_bind(now)
            .push(", lease_until = NULL, last_error = NULL FROM (");
        qb.push_values(chunk, |mut row, (id, lease, state)| {
            row.push_bind(*id).push_bind(*lease).push_bind(*state);
        });
        qb.push(
            ") AS v WHERE inbox.id = v.column1 AND inbox.state = 'processing'
                    AND inbox.lease_until = v.column2
             RETURNING inbox.id",
        );
        let ids: Vec<i64> = qb.build_query_scalar().fetch_all(&mut **tx).await?;
        ended.extend(ids);
    }
    Ok(ended)
}

/// A failed attempt: retry at `next_attempt_at`, or `dead` when `dead` is set.
pub async fn fail(
    tx: &mut Tx<'_>,
    id: i64,
    lease_until: &str,
    error: &str,
    next_attempt_at: &str,
    dead: bool,
) -> Result<bool, StoreError> {
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
    tx: &mut Tx<'_>,
    id: i64,
    lease_until: &str,
    error: &str,
    next_attempt_at: &str,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE inbox SET state = 'pending', attempts = MAX(attempts - 1, 0), next_attempt_at = ?,
                          last_error = ?, lease_until = NULL
         WHERE id = ? AND state = 'processing' AND lease_until = ?",
    )
    .bind(next_attempt_at)
    .bind(error)
    .bind(id)
    .bind(lease_until)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives back claims no attempt was started for (`claims` holds delivery and
/// lease end): each delivery is pending again, due as it was, its attempt
/// uncounted. A claim whose lease was lost meanwhile is left alone. Returns
/// how many were given back.
pub async fn unclaim(tx: &mut Tx<'_>, claims: &[(i64, &str)]) -> Result<u64, StoreError> {
    let mut given_back = 0;
    for (id, lease_until) in claims {
        let done = sqlx::query(
            "UPDATE inbox SET state = 'pending', attempts = MAX(attempts - 1, 0), lease_until = NULL
             WHERE id = ? AND state = 'processing' AND lease_until = ?",
        )
        .bind(id)
        .bind(lease_until)
        .execute(&mut **tx)
        .await?;
        given_back += done.rows_affected();
    }
    Ok(given_back)
}

/// Puts a stored delivery back in line (replay), whatever its state.
pub async fn requeue(pool: &SqlitePool, id: i64, now: &str) -> Result<bool, StoreError> {
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
pub async fn depth(pool: &SqlitePool) -> Result<(i64, Option<String>), StoreError> {
    sqlx::query_as(
        "SELECT COUNT(*), MIN(received_at) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
    )
    .fetch_one(pool)
    .await
        .map_err(StoreError::from)
}

/// Per account context, the latest arrival of a delivery of `provider`
/// received at or after `since` (the `inbox_received` index bounds the scan).
pub async fn newest_received(
    pool: &SqlitePool,
    provider: &str,
    since: &str,
) -> Result<Vec<(Option<String>, String)>, StoreError> {
    sqlx::query_as(
        "SELECT context, MAX(received_at) FROM inbox
         WHERE received_at >= ? AND provider = ? GROUP BY context ORDER BY context",
    )
    .bind(since)
    .bind(provider)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}

pub async fn count_by_state(pool: &SqlitePool) -> Result<Vec<(String, i64)>, StoreError> {
    sqlx::query_as("SELECT state, COUNT(*) FROM inbox GROUP BY state ORDER BY state")
        .fetch_all(pool)
        .await
        .map_err(StoreError::from)
}

/// Ends at once the leases held by processes that are gone (a daemon
/// killed, then started again): their deliveries are claimed on the next
/// claim instead of when the leases run out. How many were ended.
pub async fn release_gone_holders(conn: &mut SqliteConnection) -> Result<u64, StoreError> {
    let holders: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT lease_owner FROM inbox
         WHERE state = 'processing' AND lease_owner IS NOT NULL AND lease_owner <> ?",
    )
    .bind(super::owner::this_process())
    .fetch_all(&mut *conn)
    .await?;
    let mut released = 0;
    for holder in holders.iter().filter(|h| super::owner::is_gone(h)) {
        // The empty text sorts before every time: the lease has run out.
        released += sqlx::query(
            "UPDATE inbox SET lease_until = '' WHERE state = 'processing' AND lease_owner = ?",
        )
        .bind(holder)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    }
    if released > 0 {
        tracing::info!(
            deliveries = released,
            "leases of a process that is gone taken up at once"
        );
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    /// The claim stays index range scans whatever the inbox holds: no step
    /// of its plan walks the whole table.
    #[tokio::test]
    async fn the_claim_walks_indexes_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::Db::open(
            &dir.path().join("plan.db"),
            &crate::config::DatabaseConfig::default(),
        )
        .await
        .unwrap();
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {}", super::claim_sql()))
                .bind("2026-01-01T00:00:00.000Z")
                .bind(20)
                .bind(10)
                .bind("2026-01-01T00:01:00.000Z")
                .fetch_all(&db.read)
                .await
                .unwrap();
        let plan: Vec<&str> = plan.iter().map(|r| r.3.as_str()).collect();
        for step in [
            "SEARCH l USING INDEX inbox_state_id (state=?)",
            "SEARCH c USING INDEX inbox_ready (state=? AND next_attempt_at<?)",
            "SEARCH f USING INDEX inbox_ready (state=? AND next_attempt_at<?)",
            "SEARCH o USING INDEX inbox_leased (resource_id=?)",
            "MERGE (UNION ALL)",
        ] {
            assert!(plan.contains(&step), "no {step:?} in {plan:#?}");
        }
        assert!(
            !plan.iter().any(|s| s.starts_with("SCAN inbox")
                || s.starts_with("SCAN l ")
                || s.starts_with("SCAN c ")
                || s.starts_with("SCAN f ")),
            "a full scan of the inbox: {plan:#?}"
        );
        db.close().await;
    }
}

/// The inbox's group commit against this engine: what one commit stores,
/// and which deliveries it leases for the hand-over.
#[cfg(test)]
mod group_commit_tests {
    use super::super::{on_handle, Db};
    use super::*;
    use crate::config::DatabaseConfig;
    use crate::inbox::{to_offer, Inbox};
    use crate::store::model::Refusal;
    use crate::store::Store;

    fn delivery(key: &str, resource: Option<&str>) -> NewDelivery {
        NewDelivery {
            provider: "stripe".into(),
            dedupe_key: key.into(),
            event_type: "v2.core.batch_job.updated".into(),
            event_id: Some(key.into()),
            resource_kind: resource.map(|_| "stripe.batch_job".to_string()),
            resource_id: resource.map(str::to_string),
            context: None,
            livemode: Some(false),
            raw_body: b"{}".to_vec(),
            source: "webhook",
            received_at: crate::time::now_str(),
        }
    }

    /// A batch too large for one statement (150 deliveries, 10 of them a
    /// key again, and 100 refusals, all queued before the writer runs) is
    /// committed whole, on the writer's handle: each request learns whether
    /// its delivery was new, each key is stored once, each refusal recorded.
    #[tokio::test]
    async fn a_batch_too_large_for_one_statement_commits_whole() {
        batch_commits_whole(150, 10, 100).await;
    }

    /// [`a_batch_too_large_for_one_statement_commits_whole`] where the
    /// refusals make it too large (a transaction of sqlx's statements).
    #[tokio::test]
    async fn a_batch_of_mostly_refusals_commits_whole() {
        batch_commits_whole(30, 5, 200).await;
    }

    /// `deliveries` deliveries, the last `again` of them keys already
    /// given, and `refusals` refusals, queued together.
    async fn batch_commits_whole(deliveries: usize, again: usize, refusals: usize) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DatabaseConfig::default();
        let engine = super::super::SqliteStore::open(&dir.path().join("x.db"), &cfg)
            .await
            .unwrap();
        let db = engine.db().clone();
        let store: Store = std::sync::Arc::new(engine);
        let (inbox, writer) = Inbox::start(&store, &cfg);
        for i in 0..refusals {
            inbox.record_refusal(Refusal {
                provider: "stripe".into(),
                reason: "bad_signature".into(),
                message: format!("forged {i}"),
                http_status: 401,
                body_size: Some(2),
                remote_addr: None,
                received_at: crate::time::now_str(),
                summarized: false,
            });
        }
        let distinct = deliveries - again;
        let keys: Vec<String> = (0..deliveries)
            .map(|i| format!("k{}", i % distinct))
            .collect();
        let accepts = keys.iter().enumerate().map(|(i, key)| {
            let resource = format!("r_{i}");
            inbox.accept(delivery(key, Some(&resource)))
        });
        let answers = futures_util::future::join_all(accepts).await;
        let duplicates: Vec<bool> = answers.into_iter().map(|a| a.unwrap().duplicate).collect();
        let expected: Vec<bool> = (0..deliveries).map(|i| i >= distinct).collect();
        assert_eq!(duplicates, expected);
        drop(inbox);
        writer.await.unwrap();
        let count = |sql| sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.read);
        let stored = count("SELECT COUNT(*) FROM inbox").await.unwrap();
        assert_eq!(stored, distinct as i64);
        let keys = count("SELECT COUNT(DISTINCT dedupe_key) FROM inbox");
        assert_eq!(keys.await.unwrap(), distinct as i64);
        let recorded = count("SELECT COUNT(*) FROM refusals").await.unwrap();
        assert_eq!(recorded, refusals as i64);
        db.close().await;
    }

    /// Offered: in order, as many as there are slots, the first of each
    /// resource and key. Leased by the insert: those whose resource no live
    /// lease holds; the rest wait in line.
    #[tokio::test]
    async fn hand_over_follows_the_claims_rules() {
        hand_over_follows_the_claims_rules_with(Insert::Statement).await;
    }

    /// [`hand_over_follows_the_claims_rules`] with the insert of batches too
    /// large for one statement (one row at a time, on the handle).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_over_follows_the_claims_rules_in_large_batches() {
        hand_over_follows_the_claims_rules_with(Insert::RowsOnHandle).await;
    }

    enum Insert {
        Statement,
        RowsOnHandle,
    }

    async fn hand_over_follows_the_claims_rules_with(insert: Insert) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db"), &DatabaseConfig::default())
            .await
            .unwrap();
        let now = crate::time::now_str();
        let far = "2999-01-01T00:00:00.000Z";
        let past = "2000-01-01T00:00:00.000Z";
        let mut tx = db.write.begin().await.unwrap();
        let held = delivery("held", Some("r_held"));
        let lapsed = delivery("lapsed", Some("r_lapsed"));
        let before = [(&held, Some(far)), (&lapsed, Some(past))];
        let added = insert_many(&mut tx, &before, &now).await.unwrap();
        assert!(added.iter().all(|a| a.is_some_and(|a| a.leased)));

        let batch = [
            delivery("a", Some("r_held")),   // a live lease holds it
            delivery("b", Some("r_1")),      // first of r_1
            delivery("c", Some("r_1")),      // r_1 again
            delivery("b", Some("r_2")),      // key b again
            delivery("d", None),             // names no resource
            delivery("e", Some("r_lapsed")), // its lease ran out
            delivery("f", Some("r_3")),      // no slot left
        ];
        let refs: Vec<&NewDelivery> = batch.iter().collect();
        let offered = to_offer(&refs, 4, far);
        let keys = |flags: &[bool]| -> Vec<&str> {
            refs.iter()
                .zip(flags)
                .filter(|(_, f)| **f)
                .map(|(d, _)| d.dedupe_key.as_str())
                .collect()
        };
        let flags: Vec<bool> = offered.iter().map(Option::is_some).collect();
        assert_eq!(keys(&flags), ["a", "b", "d", "e"]);

        let rows: Vec<(&NewDelivery, Option<&str>)> = refs.iter().copied().zip(offered).collect();
        let added = match insert {
            Insert::Statement => insert_many(&mut tx, &rows, &now).await,
            Insert::RowsOnHandle => on_handle(&mut tx, |c| insert_rows(c, &rows, &now)).await,
        }
        .unwrap();
        let flags: Vec<bool> = added.iter().map(|a| a.is_some_and(|a| a.leased)).collect();
        assert_eq!(keys(&flags), ["b", "d", "e"]);
        assert_eq!(added.iter().filter(|a| a.is_some()).count(), 6);
        let stored: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT dedupe_key, state, attempts, lease_until FROM inbox
             WHERE dedupe_key NOT IN ('held', 'lapsed') ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let leased = |key: &str| {
            (
                key.to_string(),
                "processing".to_string(),
                1,
                Some(far.to_string()),
            )
        };
        let waiting = |key: &str| (key.to_string(), "pending".to_string(), 0, None);
        assert_eq!(
            stored,
            [
                waiting("a"),
                leased("b"),
                waiting("c"),
                leased("d"),
                leased("e"),
                waiting("f")
            ]
        );
        tx.commit().await.unwrap();
        db.close().await;
    }
}
