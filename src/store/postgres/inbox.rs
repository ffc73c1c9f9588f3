//! The inbox on PostgreSQL: durable accept with dedupe, leases granted
//! under [`LEASE_LOCK`] with their expiry on the database clock, and
//! attempt ends fenced by the lease's token and holder.

use std::collections::{HashMap, HashSet};

use sqlx::PgConnection;
use uuid::Uuid;

use super::keeper::alive;
use super::LEASE_LOCK;
use crate::store::model::{Delivery, NewDelivery};
use crate::store::{Added, StoreError};

pub const DELIVERY_COLUMNS: &str =
    "id, provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
     context, livemode, raw_body, body_size, source, received_at, state, attempts, next_attempt_at,
     last_error, processed_at";

/// Takes the lease lock for the rest of the transaction `conn` is in.
pub async fn lock_leases(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LEASE_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

/// How long a lease ending at `lease_until` (a replica's clock) lasts from
/// now: the database adds it to its own clock.
pub fn lease_secs(lease_until: &str) -> f64 {
    crate::time::parse_lenient(lease_until)
        .map(|end| (end - crate::time::now()).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0)
        .max(1.0)
}

/// The SQL condition that the lease of inbox row `alias` is over: run out
/// by the database clock, or held by a replica that is gone.
fn lapsed(alias: &str) -> String {
    format!(
        "({alias}.lease_expires_at IS NULL OR {alias}.lease_expires_at <= clock_timestamp()
          OR {alias}.lease_owner IS NULL
          OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.owner = {alias}.lease_owner AND {}))",
        alive("r")
    )
}

/// The SQL condition that no other delivery of `alias`'s resource is being
/// processed (the unique index refuses a second lease anyway).
fn resource_free(alias: &str) -> String {
    format!(
        "({alias}.resource_id IS NULL OR NOT EXISTS (
            SELECT 1 FROM inbox o
            WHERE o.resource_id = {alias}.resource_id AND o.state = 'processing' AND o.id <> {alias}.id))"
    )
}

/// Stores a group commit's deliveries with one insert (the first of each
/// key; a key already stored adds nothing), then leases those offered a
/// lease whose resource is free. `None` where the key was there already.
pub async fn insert_batch(
    conn: &mut PgConnection,
    batch: &[(&NewDelivery, Option<&str>)],
    owner: Uuid,
) -> Result<Vec<Option<Added>>, StoreError> {
    let mut firsts: HashMap<(&str, &str), usize> = HashMap::new();
    let mut rows = Vec::with_capacity(batch.len());
    for (i, (d, _)) in batch.iter().enumerate() {
        if let std::collections::hash_map::Entry::Vacant(first) =
            firsts.entry((d.provider.as_str(), d.dedupe_key.as_str()))
        {
            first.insert(i);
            rows.push(*d);
        }
    }
    let col = |f: fn(&NewDelivery) -> Option<String>| rows.iter().map(|d| f(d)).collect::<Vec<_>>();
    let inserted: Vec<(i64, String, String)> = sqlx::query_as(
        "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                            context, livemode, raw_body, body_size, source, received_at, next_attempt_at)
         SELECT provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                context, livemode, raw_body, length(raw_body), source, received_at, received_at
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::bool[], $9::bytea[], $10::text[], $11::text[])
              WITH ORDINALITY AS v (provider, dedupe_key, event_type, event_id, resource_kind,
                                    resource_id, context, livemode, raw_body, source, received_at, n)
         ORDER BY n
         ON CONFLICT (provider, dedupe_key) DO NOTHING
         RETURNING id, provider, dedupe_key",
    )
    .bind(col(|d| Some(d.provider.clone())))
    .bind(col(|d| Some(d.dedupe_key.clone())))
    .bind(col(|d| Some(d.event_type.clone())))
    .bind(col(|d| d.event_id.clone()))
    .bind(col(|d| d.resource_kind.clone()))
    .bind(col(|d| d.resource_id.clone()))
    .bind(col(|d| d.context.clone()))
    .bind(rows.iter().map(|d| d.livemode).collect::<Vec<_>>())
    .bind(rows.iter().map(|d| d.raw_body.clone()).collect::<Vec<_>>())
    .bind(col(|d| Some(d.source.to_string())))
    .bind(col(|d| Some(d.received_at.clone())))
    .fetch_all(&mut *conn)
    .await?;

    let mut out = vec![None; batch.len()];
    let mut offered = Vec::new();
    for (id, provider, key) in inserted {
        if let Some(&i) = firsts.get(&(provider.as_str(), key.as_str())) {
            out[i] = Some(Added { id, leased: false });
            if let Some(lease) = batch[i].1 {
                offered.push((i, id, lease));
            }
        }
    }
    if !offered.is_empty() {
        lock_leases(conn).await?;
        let leased: Vec<i64> = sqlx::query_scalar(&format!(
            "UPDATE inbox i SET state = 'processing', attempts = 1, lease_until = v.lease,
                    lease_expires_at = clock_timestamp() + make_interval(secs => v.secs),
                    lease_owner = $4
             FROM UNNEST($1::bigint[], $2::text[], $3::float8[]) AS v (id, lease, secs)
             WHERE i.id = v.id AND {}
             RETURNING i.id",
            resource_free("i")
        ))
        .bind(offered.iter().map(|o| o.1).collect::<Vec<_>>())
        .bind(offered.iter().map(|o| o.2.to_string()).collect::<Vec<_>>())
        .bind(offered.iter().map(|o| lease_secs(o.2)).collect::<Vec<_>>())
        .bind(owner)
        .fetch_all(&mut *conn)
        .await?;
        for (i, id, _) in offered {
            if leased.contains(&id) {
                out[i] = Some(Added { id, leased: true });
            }
        }
    }
    Ok(out)
}

/// Leases up to `limit` deliveries: lapsed leases first (run out, or held
/// by a replica that is gone), then those due at `now` in the order they
/// fell due; never one whose resource is being processed, never two of one
/// resource. Rows another transaction holds are skipped, not waited for.
pub async fn claim(
    conn: &mut PgConnection,
    now: &str,
    lease_until: &str,
    limit: usize,
    owner: Uuid,
    only: Option<i64>,
) -> Result<Vec<Delivery>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    lock_leases(conn).await?;
    // Due deliveries are to be read from `inbox_due` in its order, stopping
    // at the limit. A table that grew fast since it was last analyzed (a
    // backlog building up) looks small to the planner, which would then
    // read every due row and sort them, under the lease lock every replica
    // waits for; with sorting priced out it walks the index. Pricing it
    // out makes the plan look costly enough for JIT compilation, which
    // would take far longer than the claim itself: off too.
    sqlx::query("SELECT set_config('enable_sort', 'off', true), set_config('jit', 'off', true)")
        .execute(&mut *conn)
        .await?;
    let only_lapsed = only.map_or(String::new(), |_| " AND l.id = $7".into());
    let only_ready = only.map_or(String::new(), |_| " AND c.id = $7".into());
    let sql = format!(
        "WITH lapsed AS (
             SELECT l.id, l.resource_id, 0 AS part, ''::text AS due FROM inbox l
             WHERE l.state = 'processing' AND {lapsed}{only_lapsed}
             ORDER BY l.id LIMIT $2 FOR UPDATE SKIP LOCKED),
         ready AS (
             SELECT c.id, c.resource_id, 1 AS part, c.next_attempt_at AS due FROM inbox c
             WHERE c.state IN ('pending', 'failed') AND c.next_attempt_at <= $1
               AND {free}{only_ready}
             ORDER BY c.next_attempt_at, c.id LIMIT $2 FOR UPDATE SKIP LOCKED),
         ranked AS (
             SELECT id, part, due, ROW_NUMBER() OVER (
                 PARTITION BY resource_id, CASE WHEN resource_id IS NULL THEN id END
                 ORDER BY part, due, id) AS nth
             FROM (SELECT * FROM lapsed UNION ALL SELECT * FROM ready) AS candidates),
         picked AS (SELECT id FROM ranked WHERE nth = 1 ORDER BY part, due, id LIMIT $3)
         UPDATE inbox SET state = 'processing', lease_until = $4,
                lease_expires_at = clock_timestamp() + make_interval(secs => $5),
                lease_owner = $6, attempts = attempts + 1
         WHERE id IN (SELECT id FROM picked)
         RETURNING {DELIVERY_COLUMNS}",
        lapsed = lapsed("l"),
        free = resource_free("c"),
    );
    let mut claimed: Vec<Delivery> = sqlx::query_as(&sql)
        .bind(now)
        .bind((limit * 2) as i64)
        .bind(limit as i64)
        .bind(lease_until)
        .bind(lease_secs(lease_until))
        .bind(owner)
        .bind(only.unwrap_or(0))
        .fetch_all(&mut *conn)
        .await?;
    claimed.sort_by(|a, b| (&a.next_attempt_at, a.id).cmp(&(&b.next_attempt_at, b.id)));
    Ok(claimed)
}

/// The fence every end of an attempt carries: the lease token the holder
/// was given and the holder itself. A replica whose lease was taken over
/// (it ran out, or the others thought it gone) matches no row.
const FENCE: &str = "state = 'processing' AND lease_until = $2 AND lease_owner = $3";

/// How an attempt ends ([`end_many`]).
pub struct End<'a> {
    pub id: i64,
    /// The lease the attempt holds: with the holder, its fence.
    pub lease_until: &'a str,
    /// `processed`, `ignored`, `failed`, `dead` or `pending` (given back).
    pub state: &'static str,
    /// Set when the delivery is done; kept as it is when `None`.
    pub processed_at: Option<String>,
    /// When it is due again; kept as it is when `None`.
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    /// The attempt is given back uncounted.
    pub give_back: bool,
}

/// Ends many attempts with one statement, each fenced by its lease and
/// the holder `owner`. The `(id, lease)` of those that ended: an attempt
/// whose lease was lost changes nothing.
pub async fn end_many(
    conn: &mut PgConnection,
    owner: Uuid,
    ends: &[End<'_>],
) -> Result<HashSet<(i64, String)>, StoreError> {
    if ends.is_empty() {
        return Ok(HashSet::new());
    }
    let text =
        |f: for<'x> fn(&'x End<'x>) -> Option<&'x str>| ends.iter().map(f).collect::<Vec<_>>();
    let ended: Vec<(i64, String)> = sqlx::query_as(
        "UPDATE inbox i SET state = e.state,
                processed_at = COALESCE(e.processed_at, i.processed_at),
                next_attempt_at = COALESCE(e.next_attempt_at, i.next_attempt_at),
                last_error = e.last_error,
                attempts = CASE WHEN e.give_back THEN GREATEST(i.attempts - 1, 0)
                                ELSE i.attempts END,
                lease_until = NULL, lease_expires_at = NULL, lease_owner = NULL
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::bool[])
              AS e (id, lease_until, state, processed_at, next_attempt_at, last_error, give_back)
         WHERE i.id = e.id AND i.state = 'processing' AND i.lease_until = e.lease_until
           AND i.lease_owner = $8
         RETURNING e.id, e.lease_until",
    )
    .bind(ends.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind(text(|e| Some(e.lease_until)))
    .bind(text(|e| Some(e.state)))
    .bind(text(|e| e.processed_at.as_deref()))
    .bind(text(|e| e.next_attempt_at.as_deref()))
    .bind(text(|e| e.last_error.as_deref()))
    .bind(ends.iter().map(|e| e.give_back).collect::<Vec<_>>())
    .bind(owner)
    .fetch_all(conn)
    .await?;
    Ok(ended.into_iter().collect())
}

/// Gives an attempt back uncounted, due again at `next_attempt_at`; fenced.
pub async fn release(
    conn: &mut PgConnection,
    id: i64,
    lease_until: &str,
    owner: Uuid,
    error: Option<&str>,
    next_attempt_at: Option<&str>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(&format!(
        "UPDATE inbox SET state = 'pending', attempts = GREATEST(attempts - 1, 0),
                next_attempt_at = COALESCE($4, next_attempt_at),
                last_error = COALESCE($5, last_error), lease_until = NULL,
                lease_expires_at = NULL, lease_owner = NULL
         WHERE id = $1 AND {FENCE}"
    ))
    .bind(id)
    .bind(lease_until)
    .bind(owner)
    .bind(next_attempt_at)
    .bind(error)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Puts a delivery back in line, whatever its state but `processing`.
pub async fn requeue(conn: &mut PgConnection, id: i64, now: &str) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE inbox SET state = 'pending', attempts = 0, next_attempt_at = $2, lease_until = NULL,
                lease_expires_at = NULL, lease_owner = NULL
         WHERE id = $1 AND state <> 'processing'",
    )
    .bind(id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The delivery `id`, inside a transaction.
pub async fn get(conn: &mut PgConnection, id: i64) -> Result<Option<Delivery>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM inbox WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Refusal records, one insert for the batch; those past the rate kept as
/// rows (`summarized`) added to their minute's summary instead.
pub async fn insert_refusals(
    conn: &mut PgConnection,
    refusals: &[&crate::store::model::Refusal],
) -> Result<(), StoreError> {
    let rows: Vec<&crate::store::model::Refusal> =
        refusals.iter().copied().filter(|r| !r.summarized).collect();
    if !rows.is_empty() {
        let text = |f: fn(&crate::store::model::Refusal) -> Option<String>| {
            rows.iter().map(|r| f(r)).collect::<Vec<_>>()
        };
        sqlx::query(
            "INSERT INTO refusals (provider, reason, message, http_status, body_size, remote_addr,
                                   received_at)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                                  $6::text[], $7::text[])",
        )
        .bind(text(|r| Some(r.provider.clone())))
        .bind(text(|r| Some(r.reason.clone())))
        .bind(text(|r| Some(r.message.clone())))
        .bind(
            rows.iter()
                .map(|r| i64::from(r.http_status))
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.body_size).collect::<Vec<_>>())
        .bind(text(|r| r.remote_addr.clone()))
        .bind(text(|r| Some(r.received_at.clone())))
        .execute(&mut *conn)
        .await?;
    }
    for ((minute, provider, reason, source), (status, count)) in
        crate::store::sqlite::refusals::summaries(refusals)
    {
        sqlx::query(
            "INSERT INTO refusal_summaries (minute, provider, reason, source, http_status, count)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (minute, provider, reason, source)
             DO UPDATE SET count = refusal_summaries.count + excluded.count",
        )
        .bind(minute)
        .bind(provider)
        .bind(reason)
        .bind(source)
        .bind(i64::from(status))
        .bind(count)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}
