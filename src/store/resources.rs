//! SQL of tracked resources and what is recorded about them: transitions,
//! progress counts, refunds, and the reconcile schedule.

use sqlx::{FromRow, SqlitePool};

use super::Tx;

/// A resource's stored current state: what the pipeline reads before it
/// records, and (without its bookkeeping fields) what the API and the CLI
/// show of it.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Resource {
    #[serde(skip)]
    pub rid: i64,
    pub provider: String,
    pub kind: String,
    pub id: String,
    pub parent_id: Option<String>,
    pub status: Option<String>,
    pub terminal: bool,
    pub livemode: Option<bool>,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub provider_updated_at: Option<String>,
    pub status_since: Option<String>,
    pub first_seen_at: String,
    pub last_observed_at: Option<String>,
    pub not_found: bool,
    pub cancel_requested_at: Option<String>,
    /// The last fetched object.
    #[serde(serialize_with = "super::queries::json_text_opt")]
    pub snapshot: Option<String>,
    /// The Stripe account context to fetch with.
    #[serde(skip)]
    pub context: Option<String>,
    #[serde(skip)]
    pub next_reconcile_at: Option<String>,
    #[serde(skip)]
    pub reconcile_failures: i64,
}

pub(super) const RESOURCE_COLUMNS: &str =
    "rid, provider, kind, id, parent_id, status, terminal, livemode, context,
     amount, currency, snapshot, provider_updated_at, status_since, first_seen_at, last_observed_at,
     not_found, cancel_requested_at, next_reconcile_at, reconcile_failures";

/// [`RESOURCE_COLUMNS`] with no snapshot (`None`): what the pipeline's
/// writes return. Recording never reads the stored object back, and a bulk
/// transfer's can be large.
const RESOURCE_COLUMNS_NO_SNAPSHOT: &str =
    "rid, provider, kind, id, parent_id, status, terminal, livemode, context,
     amount, currency, NULL AS snapshot, provider_updated_at, status_since, first_seen_at,
     last_observed_at, not_found, cancel_requested_at, next_reconcile_at, reconcile_failures";

/// One resource by its key, inside a write transaction.
pub async fn get(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    id: &str,
) -> Result<Option<Resource>, sqlx::Error> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE provider = ? AND kind = ? AND id = ?"
    ))
    .bind(provider)
    .bind(kind)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// One resource by kind and id, from a read pool.
pub async fn find(
    pool: &SqlitePool,
    kind: &str,
    id: &str,
) -> Result<Option<Resource>, sqlx::Error> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = ? AND id = ?"
    ))
    .bind(kind)
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// A resource to ensure: its key, and what is known of it before its first
/// observation.
#[derive(Debug, Clone, Copy)]
pub struct ResourceKey<'a> {
    pub provider: &'a str,
    pub kind: &'a str,
    pub id: &'a str,
    pub parent_id: Option<&'a str>,
    pub context: Option<&'a str>,
}

/// Adds a resource not seen before (status NULL) and returns its row; an
/// existing one is returned as it is (without its snapshot: [`get`] has it).
pub async fn ensure(
    tx: &mut Tx<'_>,
    provider: &str,
    kind: &str,
    id: &str,
    parent_id: Option<&str>,
    context: Option<&str>,
    now: &str,
) -> Result<Resource, sqlx::Error> {
    let key = ResourceKey {
        provider,
        kind,
        id,
        parent_id,
        context,
    };
    let mut rows = ensure_many(tx, &[key], now).await?;
    rows.pop()
        .ok_or_else(|| sqlx::Error::Protocol("ensure returned no row".into()))
}

/// [`ensure`] for many resources in one statement (per thousand), rows in
/// the order of `keys`, which must be distinct. The no-op update on a
/// conflict is what makes `RETURNING` answer for an existing row too.
pub async fn ensure_many(
    tx: &mut Tx<'_>,
    keys: &[ResourceKey<'_>],
    now: &str,
) -> Result<Vec<Resource>, sqlx::Error> {
    let mut found = std::collections::HashMap::with_capacity(keys.len());
    for chunk in keys.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO resources (provider, kind, id, parent_id, context, first_seen_at) ",
        );
        qb.push_values(chunk, |mut row, k| {
            row.push_bind(k.provider)
                .push_bind(k.kind)
                .push_bind(k.id)
                .push_bind(k.parent_id)
                .push_bind(k.context)
                .push_bind(now);
        });
        qb.push(format!(
            " ON CONFLICT (provider, kind, id) DO UPDATE SET provider = excluded.provider
             RETURNING {RESOURCE_COLUMNS_NO_SNAPSHOT}"
        ));
        for r in qb.build_query_as::<Resource>().fetch_all(&mut **tx).await? {
            found.insert((r.provider.clone(), r.kind.clone(), r.id.clone()), r);
        }
    }
    keys.iter()
        .map(|k| {
            found
                .remove(&(k.provider.to_string(), k.kind.to_string(), k.id.to_string()))
                .ok_or_else(|| {
                    sqlx::Error::Protocol(format!("ensure returned no row for {}", k.id))
                })
        })
        .collect()
}

/// Most rows one multi-row statement carries: SQLite allows 32766 bound
/// values, and no row here binds more than 14.
const ROWS_PER_STATEMENT: usize = 1_000;

/// The new current state of a resource after an accepted observation.
#[derive(Debug, Clone)]
pub struct StateUpdate<'a> {
    pub rid: i64,
    pub parent_id: Option<&'a str>,
    pub status: &'a str,
    pub terminal: bool,
    pub livemode: Option<bool>,
    pub context: Option<&'a str>,
    pub amount: Option<i64>,
    pub currency: Option<&'a str>,
    pub snapshot: &'a str,
    pub provider_updated_at: Option<&'a str>,
    pub status_since: &'a str,
    pub observed_at: &'a str,
    pub next_reconcile_at: Option<&'a str>,
}

/// Writes the current state of many resources, one statement per
/// thousand; fields an observation lacks keep their value. Returns the rows
/// as they are now (without the snapshot just written), in the order of
/// `updates` (one per resource).
pub async fn update_states(
    tx: &mut Tx<'_>,
    updates: &[StateUpdate<'_>],
) -> Result<Vec<Resource>, sqlx::Error> {
    let mut written = std::collections::HashMap::with_capacity(updates.len());
    for chunk in updates.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "UPDATE resources SET
                parent_id = COALESCE(v.column2, parent_id), status = v.column3, terminal = v.column4,
                livemode = COALESCE(v.column5, livemode), context = COALESCE(v.column6, context),
                amount = COALESCE(v.column7, amount), currency = COALESCE(v.column8, currency),
                snapshot = v.column9, provider_updated_at = COALESCE(v.column10, provider_updated_at),
                status_since = v.column11, last_observed_at = v.column12, not_found = 0,
                next_reconcile_at = v.column13, reconcile_failures = 0
             FROM (",
        );
        qb.push_values(chunk, |mut row, u| {
            row.push_bind(u.rid)
                .push_bind(u.parent_id)
                .push_bind(u.status)
                .push_bind(u.terminal)
                .push_bind(super::bool_int(u.livemode))
                .push_bind(u.context)
                .push_bind(u.amount)
                .push_bind(u.currency)
                .push_bind(u.snapshot)
                .push_bind(u.provider_updated_at)
                .push_bind(u.status_since)
                .push_bind(u.observed_at)
                .push_bind(u.next_reconcile_at);
        });
        qb.push(format!(
            ") AS v WHERE resources.rid = v.column1 RETURNING {RESOURCE_COLUMNS_NO_SNAPSHOT}"
        ));
        for r in qb.build_query_as::<Resource>().fetch_all(&mut **tx).await? {
            written.insert(r.rid, r);
        }
    }
    updates
        .iter()
        .map(|u| {
            written
                .remove(&u.rid)
                .ok_or_else(|| sqlx::Error::Protocol(format!("no resource with rid {}", u.rid)))
        })
        .collect()
}

/// Stale observations: only the time the resources were seen moves.
pub async fn touch_many(
    tx: &mut Tx<'_>,
    rids: &[i64],
    observed_at: &str,
) -> Result<(), sqlx::Error> {
    for chunk in rids.chunks(ROWS_PER_STATEMENT) {
        let mut qb =
            sqlx::QueryBuilder::<sqlx::Sqlite>::new("UPDATE resources SET last_observed_at = ");
        qb.push_bind(observed_at).push(" WHERE rid IN (");
        let mut ids = qb.separated(", ");
        for rid in chunk {
            ids.push_bind(*rid);
        }
        qb.push(")");
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// The provider answered 404 for this resource.
pub async fn mark_not_found(
    tx: &mut Tx<'_>,
    rid: i64,
    observed_at: &str,
    next_reconcile_at: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE resources SET not_found = 1, last_observed_at = ?, next_reconcile_at = ? WHERE rid = ?",
    )
    .bind(observed_at)
    .bind(next_reconcile_at)
    .bind(rid)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A cancel went out through cancelwatch.
pub async fn set_cancel_requested(tx: &mut Tx<'_>, rid: i64, at: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE resources SET cancel_requested_at = ? WHERE rid = ?")
        .bind(at)
        .bind(rid)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// One transition row.
#[derive(Debug, Clone)]
pub struct NewTransition<'a> {
    pub rid: i64,
    pub provider: &'a str,
    pub kind: &'a str,
    pub resource_id: &'a str,
    pub parent_id: Option<&'a str>,
    pub from_status: Option<&'a str>,
    pub to_status: &'a str,
    pub observed_at: &'a str,
    pub provider_at: Option<&'a str>,
    pub trigger_type: &'a str,
    pub trigger_id: Option<&'a str>,
    pub livemode: Option<bool>,
    pub snapshot: &'a str,
}

/// Inserts transition rows in the order given, one statement per thousand.
pub async fn insert_transitions(
    tx: &mut Tx<'_>,
    transitions: &[NewTransition<'_>],
) -> Result<(), sqlx::Error> {
    for chunk in transitions.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status, to_status,
                                      observed_at, provider_at, trigger_type, trigger_id, livemode, snapshot) ",
        );
        qb.push_values(chunk, |mut row, t| {
            row.push_bind(t.rid)
                .push_bind(t.provider)
                .push_bind(t.kind)
                .push_bind(t.resource_id)
                .push_bind(t.parent_id)
                .push_bind(t.from_status)
                .push_bind(t.to_status)
                .push_bind(t.observed_at)
                .push_bind(t.provider_at)
                .push_bind(t.trigger_type)
                .push_bind(t.trigger_id)
                .push_bind(super::bool_int(t.livemode))
                .push_bind(t.snapshot);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// One progress row: a bulk job's counts as observed.
#[derive(Debug, Clone)]
pub struct NewProgress<'a> {
    pub rid: i64,
    pub observed_at: &'a str,
    pub status: &'a str,
    pub success: Option<i64>,
    pub failure: Option<i64>,
    pub validated: Option<i64>,
    pub trigger_type: &'a str,
    pub trigger_id: Option<&'a str>,
}

/// Inserts progress rows, one statement per thousand.
pub async fn insert_progress(tx: &mut Tx<'_>, rows: &[NewProgress<'_>]) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO progress (rid, observed_at, status, success_count, failure_count, validated_count,
                                   trigger_type, trigger_id) ",
        );
        qb.push_values(chunk, |mut row, p| {
            row.push_bind(p.rid)
                .push_bind(p.observed_at)
                .push_bind(p.status)
                .push_bind(p.success)
                .push_bind(p.failure)
                .push_bind(p.validated)
                .push_bind(p.trigger_type)
                .push_bind(p.trigger_id);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A refund's stored state.
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Refund {
    pub id: i64,
    pub rid: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub status: String,
    pub reason: String,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub opened_at: String,
    pub completed_at: Option<String>,
    pub updated_at: String,
    pub trigger_type: String,
    pub trigger_id: Option<String>,
}

const REFUND_COLUMNS: &str =
    "id, rid, provider, kind, resource_id, parent_id, status, reason, amount,
     currency, opened_at, completed_at, updated_at, trigger_type, trigger_id";

pub async fn refund_of(tx: &mut Tx<'_>, rid: i64) -> Result<Option<Refund>, sqlx::Error> {
    sqlx::query_as::<_, Refund>(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid = ?"
    ))
    .bind(rid)
    .fetch_optional(&mut **tx)
    .await
}

/// The refund status of each of `rids` that has a refund.
pub async fn refund_statuses(
    tx: &mut Tx<'_>,
    rids: &[i64],
) -> Result<std::collections::HashMap<i64, String>, sqlx::Error> {
    let mut statuses = std::collections::HashMap::new();
    for chunk in rids.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT rid, status FROM refunds WHERE rid IN (",
        );
        let mut ids = qb.separated(", ");
        for rid in chunk {
            ids.push_bind(*rid);
        }
        qb.push(")");
        let rows: Vec<(i64, String)> = qb.build_query_as().fetch_all(&mut **tx).await?;
        statuses.extend(rows);
    }
    Ok(statuses)
}

/// A refund to open.
#[derive(Debug, Clone)]
pub struct NewRefund<'a> {
    pub rid: i64,
    pub provider: &'a str,
    pub kind: &'a str,
    pub resource_id: &'a str,
    pub parent_id: Option<&'a str>,
    pub status: &'a str,
    pub reason: &'a str,
    pub amount: Option<i64>,
    pub currency: Option<&'a str>,
    pub now: &'a str,
    pub trigger_type: &'a str,
    pub trigger_id: Option<&'a str>,
}

/// Opens refunds (a resource has at most one: a second is not opened), one
/// statement per thousand.
pub async fn insert_refunds(tx: &mut Tx<'_>, refunds: &[NewRefund<'_>]) -> Result<(), sqlx::Error> {
    for chunk in refunds.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                                  currency, opened_at, completed_at, updated_at, trigger_type, trigger_id) ",
        );
        qb.push_values(chunk, |mut row, r| {
            row.push_bind(r.rid)
                .push_bind(r.provider)
                .push_bind(r.kind)
                .push_bind(r.resource_id)
                .push_bind(r.parent_id)
                .push_bind(r.status)
                .push_bind(r.reason)
                .push_bind(r.amount)
                .push_bind(r.currency)
                .push_bind(r.now)
                .push_bind((r.status == "completed").then_some(r.now))
                .push_bind(r.now)
                .push_bind(r.trigger_type)
                .push_bind(r.trigger_id);
        });
        qb.push(" ON CONFLICT (rid) DO NOTHING");
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// A pending refund's end: `completed` or `failed`.
#[derive(Debug, Clone)]
pub struct RefundSettlement<'a> {
    pub rid: i64,
    pub status: &'a str,
    pub trigger_type: &'a str,
    pub trigger_id: Option<&'a str>,
}

/// Moves pending refunds to `completed` or `failed`, one statement per thousand.
pub async fn settle_refunds(
    tx: &mut Tx<'_>,
    settlements: &[RefundSettlement<'_>],
    now: &str,
) -> Result<(), sqlx::Error> {
    for chunk in settlements.chunks(ROWS_PER_STATEMENT) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("UPDATE refunds SET status = v.column2, completed_at = CASE WHEN v.column2 = 'completed' THEN ");
        qb.push_bind(now)
            .push(" ELSE completed_at END, updated_at = ")
            .push_bind(now)
            .push(", trigger_type = v.column3, trigger_id = v.column4 FROM (");
        qb.push_values(chunk, |mut row, r| {
            row.push_bind(r.rid)
                .push_bind(r.status)
                .push_bind(r.trigger_type)
                .push_bind(r.trigger_id);
        });
        qb.push(") AS v WHERE refunds.rid = v.column1 AND refunds.status = 'pending'");
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Resources whose reconcile time has come, oldest first.
pub async fn due_for_reconcile(
    pool: &SqlitePool,
    now: &str,
    limit: i64,
) -> Result<Vec<Resource>, sqlx::Error> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE next_reconcile_at IS NOT NULL AND next_reconcile_at <= ?
         ORDER BY next_reconcile_at, rid LIMIT ?"
    ))
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// A reconcile fetch failed: count it and push the next one back.
pub async fn reconcile_failed(
    tx: &mut Tx<'_>,
    rid: i64,
    next_reconcile_at: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE resources SET reconcile_failures = reconcile_failures + 1, next_reconcile_at = ?
         WHERE rid = ?",
    )
    .bind(next_reconcile_at)
    .bind(rid)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Sets (or clears) the next reconcile time and resets the failure count.
pub async fn mark_reconciled(
    tx: &mut Tx<'_>,
    rid: i64,
    next_reconcile_at: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE resources SET next_reconcile_at = ?, reconcile_failures = 0 WHERE rid = ?")
        .bind(next_reconcile_at)
        .bind(rid)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A resource's transitions, oldest first (tests and read commands).
#[derive(Debug, Clone, FromRow, serde::Serialize)]
pub struct Transition {
    pub id: i64,
    pub provider: String,
    pub kind: String,
    pub resource_id: String,
    pub parent_id: Option<String>,
    pub from_status: Option<String>,
    pub to_status: String,
    pub observed_at: String,
    pub provider_at: Option<String>,
    pub trigger_type: String,
    pub trigger_id: Option<String>,
    pub livemode: Option<bool>,
}

pub async fn transitions_of(
    pool: &SqlitePool,
    resource_id: &str,
) -> Result<Vec<Transition>, sqlx::Error> {
    sqlx::query_as::<_, Transition>(
        "SELECT id, provider, kind, resource_id, parent_id, from_status, to_status, observed_at,
                provider_at, trigger_type, trigger_id, livemode
         FROM transitions WHERE rid IN (SELECT rid FROM resources WHERE id = ?) ORDER BY id",
    )
    .bind(resource_id)
    .fetch_all(pool)
    .await
}

/// Refunds of a resource's children or of itself (tests and read commands).
pub async fn refunds_under(
    pool: &SqlitePool,
    resource_id: &str,
) -> Result<Vec<Refund>, sqlx::Error> {
    sqlx::query_as::<_, Refund>(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE resource_id = ? OR parent_id = ? ORDER BY id"
    ))
    .bind(resource_id)
    .bind(resource_id)
    .fetch_all(pool)
    .await
}

/// (trigger id, observed at) of every transition with this trigger type: the
/// benchmark's end-to-end measurement.
pub async fn observed_by_trigger(
    pool: &SqlitePool,
    trigger_type: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT trigger_id, observed_at FROM transitions
         WHERE trigger_type = ? AND trigger_id IS NOT NULL ORDER BY id",
    )
    .bind(trigger_type)
    .fetch_all(pool)
    .await
}
