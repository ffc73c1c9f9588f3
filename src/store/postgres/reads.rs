//! The PostgreSQL engine's plain reads, the outbox and reconcile picks, the
//! cancel request rows and prune: the same statements as the SQLite
//! engine's, with the same answers. (The audit queries are not here: one
//! text of them serves both engines, in `store::queries`.)
//!
//! Where SQLite and PostgreSQL would order the same rows differently, the
//! statement says how: text keys sort by byte (`COLLATE "C"`, SQLite's
//! `BINARY`, whatever the database's own collation), and a missing account
//! context sorts first, as SQLite sorts NULL.

use sqlx::{PgConnection, PgPool};

use crate::store::model::{Backlog, CancelRequest, Delivery, OutboxRow, Resource};
use crate::store::sqlite::cancels::CANCEL_COLUMNS;
use crate::store::sqlite::inbox::DELIVERY_COLUMNS;
use crate::store::sqlite::prune::BATCH;
use crate::store::sqlite::resources::RESOURCE_COLUMNS;
use crate::store::StoreError;

// ---- the inbox ---------------------------------------------------------

pub async fn get(pool: &PgPool, id: i64) -> Result<Option<Delivery>, StoreError> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM inbox WHERE id = $1");
    Ok(sqlx::query_as(&sql).bind(id).fetch_optional(pool).await?)
}

pub async fn by_key(pool: &PgPool, key: &str) -> Result<Option<Delivery>, StoreError> {
    let sql =
        format!("SELECT {DELIVERY_COLUMNS} FROM inbox WHERE dedupe_key = $1 ORDER BY id LIMIT 1");
    Ok(sqlx::query_as(&sql).bind(key).fetch_optional(pool).await?)
}

/// Deliveries not yet finished, and the receipt time of the oldest.
pub async fn depth(pool: &PgPool) -> Result<(i64, Option<String>), StoreError> {
    let sql = "SELECT COUNT(*), MIN(received_at) FROM inbox
               WHERE state IN ('pending', 'processing', 'failed')";
    Ok(sqlx::query_as(sql).fetch_one(pool).await?)
}

/// Per account context, the latest arrival of a delivery of `provider`
/// received at or after `since` (the `inbox_received` index bounds the scan).
pub async fn newest_received(
    pool: &PgPool,
    provider: &str,
    since: &str,
) -> Result<Vec<(Option<String>, String)>, StoreError> {
    let sql = r#"SELECT context, MAX(received_at) FROM inbox
                 WHERE received_at >= $1 AND provider = $2
                 GROUP BY context ORDER BY context COLLATE "C" NULLS FIRST"#;
    Ok(sqlx::query_as(sql)
        .bind(since)
        .bind(provider)
        .fetch_all(pool)
        .await?)
}

pub async fn count_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    let sql = r#"SELECT state, COUNT(*) FROM inbox GROUP BY state ORDER BY state COLLATE "C""#;
    Ok(sqlx::query_as(sql).fetch_all(pool).await?)
}

// ---- reconcile ---------------------------------------------------------

/// Resources whose reconcile time has come, oldest first.
pub async fn due_for_reconcile(
    pool: &PgPool,
    now: &str,
    limit: i64,
) -> Result<Vec<Resource>, StoreError> {
    let sql = format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE next_reconcile_at IS NOT NULL AND next_reconcile_at <= $1
         ORDER BY next_reconcile_at, rid LIMIT $2"
    );
    Ok(sqlx::query_as(&sql)
        .bind(now)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

// ---- the alert outbox --------------------------------------------------

/// How many outbox rows wait, per sink name (due or not).
pub async fn pending_by_sink(pool: &PgPool) -> Result<Vec<Backlog>, StoreError> {
    let sql = r#"SELECT sink, COUNT(*) AS waiting, MIN(created_at) AS oldest FROM alert_outbox
                 WHERE state = 'pending' GROUP BY sink ORDER BY sink COLLATE "C""#;
    Ok(sqlx::query_as(sql).fetch_all(pool).await?)
}

/// Open alerts, per rule.
pub async fn open_by_rule(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    let sql = r#"SELECT rule, COUNT(*) FROM alerts WHERE state = 'open'
                 GROUP BY rule ORDER BY rule COLLATE "C""#;
    Ok(sqlx::query_as(sql).fetch_all(pool).await?)
}

/// Pending rows of one sink that are due at `now`, oldest first.
pub async fn due(
    pool: &PgPool,
    sink: &str,
    now: &str,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    let sql = "SELECT id, alert_id, alert_version, sink, payload, attempts FROM alert_outbox
               WHERE sink = $1 AND state = 'pending' AND next_attempt_at <= $2
               ORDER BY next_attempt_at, id LIMIT $3";
    Ok(sqlx::query_as(sql)
        .bind(sink)
        .bind(now)
        .bind(limit)
        .fetch_all(pool)
        .await?)
}

// ---- prune -------------------------------------------------------------

/// Runs `sql` (which changes at most `$1` rows; `binds` fill `$2`...) until
/// it changes nothing; returns the rows changed. Each run is its own short
/// transaction, so no lock is held for long on a large backlog.
///
/// Each statement picks its batch `FOR UPDATE SKIP LOCKED`: a row picked is
/// locked and its condition checked again on its latest version, so a row
/// another writer is changing at that moment (a delivery being requeued) is
/// left for the next prune rather than changed from a stale view of it.
async fn in_batches(pool: &PgPool, sql: &str, binds: &[&str]) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let mut q = sqlx::query(sql).bind(BATCH);
        for b in binds {
            q = q.bind(*b);
        }
        let done = q.execute(pool).await?.rows_affected();
        total += done;
        if done == 0 {
            return Ok(total);
        }
    }
}

/// NULLs the raw body of final (processed, ignored, dead) deliveries received before `cutoff`.
pub async fn drop_bodies(pool: &PgPool, cutoff: &str) -> Result<u64, StoreError> {
    let sql = "UPDATE inbox SET raw_body = NULL WHERE id IN (
                   SELECT id FROM inbox
                   WHERE received_at < $2 AND raw_body IS NOT NULL
                     AND state IN ('processed', 'ignored', 'dead')
                   LIMIT $1 FOR UPDATE SKIP LOCKED)";
    in_batches(pool, sql, &[cutoff]).await
}

/// Deletes refusal records received before `cutoff`.
pub async fn delete_refusals(pool: &PgPool, cutoff: &str) -> Result<u64, StoreError> {
    let sql = "DELETE FROM refusals WHERE id IN (
                   SELECT id FROM refusals WHERE received_at < $2
                   LIMIT $1 FOR UPDATE SKIP LOCKED)";
    let rows = in_batches(pool, sql, &[cutoff]).await?;
    // Summaries of minutes wholly before the cutoff, as on SQLite.
    let sql = "DELETE FROM refusal_summaries WHERE ctid IN (
                   SELECT ctid FROM refusal_summaries WHERE minute < substr($2, 1, 16)
                   LIMIT $1 FOR UPDATE SKIP LOCKED)";
    Ok(rows + in_batches(pool, sql, &[cutoff]).await?)
}

/// Deletes `provider`'s final deliveries received before `cutoff` (their
/// dedupe keys go with them, so `cutoff` must lie beyond the provider's
/// retries). Transitions, refunds, progress, alerts and cancel requests are
/// kept: they do not point at deliveries.
pub async fn delete_deliveries(
    pool: &PgPool,
    provider: &str,
    cutoff: &str,
) -> Result<u64, StoreError> {
    let sql = "DELETE FROM inbox WHERE id IN (
                   SELECT id FROM inbox
                   WHERE received_at < $2 AND provider = $3
                     AND state IN ('processed', 'ignored', 'dead')
                   LIMIT $1 FOR UPDATE SKIP LOCKED)";
    in_batches(pool, sql, &[cutoff, provider]).await
}

// ---- cancel requests ---------------------------------------------------

/// How many earlier requests for this resource burnt their idempotency key
/// (the provider answered `idempotency_conflict`): the next key's attempt number.
pub async fn burnt_keys(
    tx: &mut PgConnection,
    provider: &str,
    kind: &str,
    resource_id: &str,
) -> Result<i64, StoreError> {
    let sql = "SELECT COUNT(*) FROM cancel_requests
               WHERE provider = $1 AND kind = $2 AND resource_id = $3
                 AND outcome = 'idempotency_conflict'";
    Ok(sqlx::query_scalar(sql)
        .bind(provider)
        .bind(kind)
        .bind(resource_id)
        .fetch_one(tx)
        .await?)
}

/// Records a request before it goes out; returns its id.
pub async fn insert(
    tx: &mut PgConnection,
    provider: &str,
    kind: &str,
    resource_id: &str,
    idempotency_key: &str,
    requested_by: &str,
    now: &str,
) -> Result<i64, StoreError> {
    let sql = "INSERT INTO cancel_requests
                   (provider, kind, resource_id, idempotency_key, requested_by, requested_at)
               VALUES ($1, $2, $3, $4, $5, $6) RETURNING id";
    let values = [
        provider,
        kind,
        resource_id,
        idempotency_key,
        requested_by,
        now,
    ];
    let mut q = sqlx::query_scalar(sql);
    for v in values {
        q = q.bind(v);
    }
    Ok(q.fetch_one(tx).await?)
}

/// Stores the provider's answer (or the failure to get one: `error`).
pub async fn answer(
    tx: &mut PgConnection,
    id: i64,
    http_status: Option<u16>,
    outcome: &str,
    error_code: Option<&str>,
    response_body: Option<&str>,
    now: &str,
) -> Result<(), StoreError> {
    let sql = "UPDATE cancel_requests
               SET http_status = $1, outcome = $2, error_code = $3, response_body = $4,
                   answered_at = $5
               WHERE id = $6";
    sqlx::query(sql)
        .bind(http_status.map(i64::from))
        .bind(outcome)
        .bind(error_code)
        .bind(response_body)
        .bind(now)
        .bind(id)
        .execute(tx)
        .await?;
    Ok(())
}

/// Every request about one resource, oldest first.
pub async fn of_resource(
    pool: &PgPool,
    kind: &str,
    resource_id: &str,
) -> Result<Vec<CancelRequest>, StoreError> {
    let sql = format!(
        "SELECT {CANCEL_COLUMNS} FROM cancel_requests
         WHERE kind = $1 AND resource_id = $2 ORDER BY id"
    );
    Ok(sqlx::query_as(&sql)
        .bind(kind)
        .bind(resource_id)
        .fetch_all(pool)
        .await?)
}

#[cfg(test)]
mod tests {
    //! Each read against the SQLite engine's own, on the same rows.

    use crate::store::queries::parity::{at, same, with_both};
    use crate::store::sqlite::{alerts, cancels, inbox, prune, resources};

    #[tokio::test]
    async fn inbox_reads_match_sqlite() {
        with_both(|b| async move {
            let got = same!(b; inbox::get, &b.sqlite; super::get, &b.pg; 4).unwrap();
            let got = got.unwrap();
            assert_eq!(
                (got.dedupe_key.as_str(), got.raw_body),
                ("jc_2", Some(b"{}".to_vec()))
            );
            let missing = same!(b; inbox::get, &b.sqlite; super::get, &b.pg; 99).unwrap();
            assert!(missing.is_none());
            let by_key = same!(b; inbox::by_key, &b.sqlite; super::by_key, &b.pg; "jc_1");
            let by_key = by_key.unwrap().unwrap();
            assert_eq!((by_key.id, by_key.raw_body), (3, None));

            // Pending and failed: evt_2 and jc_2.
            let depth = same!(b; inbox::depth, &b.sqlite; super::depth, &b.pg;).unwrap();
            assert_eq!(depth, (2, Some(at(1))));
            let newest = same!(b; inbox::newest_received, &b.sqlite;
                super::newest_received, &b.pg; "stripe", &at(0));
            let newest = newest.unwrap();
            assert_eq!(newest, [(None, at(0)), (Some("acct_1".to_string()), at(1))]);
            let states = same!(b; inbox::count_by_state, &b.sqlite; super::count_by_state, &b.pg;);
            let states = states.unwrap();
            let states: Vec<(&str, i64)> = states.iter().map(|(s, n)| (s.as_str(), *n)).collect();
            assert_eq!(
                states,
                [("dead", 1), ("failed", 1), ("pending", 1), ("processed", 1)]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn reconcile_and_outbox_picks_match_sqlite() {
        with_both(|b| async move {
            let due = same!(b; resources::due_for_reconcile, &b.sqlite;
                super::due_for_reconcile, &b.pg; &at(45), 10);
            let due = due.unwrap();
            assert_eq!(
                due.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
                ["bt_1"]
            );
            let due = same!(b; resources::due_for_reconcile, &b.sqlite;
                super::due_for_reconcile, &b.pg; &at(90), 1);
            assert_eq!(due.unwrap().len(), 1);

            // Byte order: "Pager" before "ops", whatever the database's collation.
            let pending =
                same!(b; alerts::pending_by_sink, &b.sqlite; super::pending_by_sink, &b.pg;);
            let pending = pending.unwrap();
            let waiting: Vec<(&str, i64)> = pending
                .iter()
                .map(|b| (b.sink.as_str(), b.waiting))
                .collect();
            assert_eq!(waiting, [("Pager", 1), ("ops", 2)]);
            let due = same!(b; alerts::due, &b.sqlite; super::due, &b.pg; "ops", &at(8), 10);
            // Row 2 is due at minute 9 only; row 1 was delivered.
            assert_eq!(due.unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [4]);
        })
        .await;
    }

    #[tokio::test]
    async fn cancel_requests_match_sqlite() {
        with_both(|b| async move {
            let (provider, kind, id) = ("stripe", "stripe.outbound_transfer", "obt_1");
            let mut lite = b.sqlite_write.begin().await.unwrap();
            let mut pg = b.pg.begin().await.unwrap();
            let burnt = same!(b; cancels::burnt_keys, &mut lite; super::burnt_keys, &mut pg;
                provider, kind, id);
            assert_eq!(burnt.unwrap(), 1);
            let row = same!(b; cancels::insert, &mut lite; super::insert, &mut pg;
                provider, kind, id, "k-2", "api", &at(20));
            let row = row.unwrap();
            assert_eq!(row, 3);
            let answered = same!(b; cancels::answer, &mut lite; super::answer, &mut pg;
                row, Some(409), "idempotency_conflict", Some("conflict"), None, &at(21));
            answered.unwrap();
            let burnt = same!(b; cancels::burnt_keys, &mut lite; super::burnt_keys, &mut pg;
                provider, kind, id);
            assert_eq!(burnt.unwrap(), 2);
            lite.commit().await.unwrap();
            pg.commit().await.unwrap();
            let all = same!(b; cancels::of_resource, &b.sqlite; super::of_resource, &b.pg;
                kind, id);
            let all = all.unwrap();
            let last = all.last().unwrap();
            assert_eq!(all.len(), 3);
            assert_eq!(
                (
                    last.http_status,
                    last.error_code.as_deref(),
                    last.answered_at.clone()
                ),
                (Some(409), Some("conflict"), Some(at(21)))
            );
        })
        .await;
    }

    #[tokio::test]
    async fn prune_matches_sqlite_and_keeps_what_it_must() {
        with_both(|b| async move {
            // Final deliveries received before minute 4 with a body: evt_1 only
            // (jc_1's is gone already, evt_2 is pending).
            let dropped = same!(b; prune::drop_bodies, &b.sqlite_write;
                super::drop_bodies, &b.pg; &at(4));
            assert_eq!(dropped.unwrap(), 1);
            let refusals = same!(b; prune::delete_refusals, &b.sqlite_write;
                super::delete_refusals, &b.pg; &at(5));
            assert_eq!(refusals.unwrap(), 1);
            // Juice's dead jc_1 goes; its failed jc_2 and every Stripe one stay.
            let deleted = same!(b; prune::delete_deliveries, &b.sqlite_write;
                super::delete_deliveries, &b.pg; "juice", &at(60));
            assert_eq!(deleted.unwrap(), 1);
            let states = same!(b; inbox::count_by_state, &b.sqlite; super::count_by_state, &b.pg;);
            assert_eq!(states.unwrap().iter().map(|s| s.1).sum::<i64>(), 3);
            let kept = same!(b; inbox::get, &b.sqlite; super::get, &b.pg; 1).unwrap();
            let kept = kept.unwrap();
            assert_eq!((kept.state.as_str(), kept.raw_body), ("processed", None));
            // What was recorded from the pruned deliveries stays.
            let history = same!(b, |pool| crate::store::queries::history(pool, "tr_1").await);
            assert_eq!(history.unwrap().map(|h| h.resources.len()), Some(1));
        })
        .await;
    }
}
