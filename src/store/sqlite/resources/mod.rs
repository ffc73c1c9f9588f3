//! SQL of tracked resources and what is recorded about them: transitions,
//! progress counts, refunds, and the reconcile schedule.

pub mod aliases;
mod reconcile;
mod refunds;
mod trail;

pub use reconcile::{due_for_reconcile, mark_reconciled, reconcile_failed};

pub use refunds::{
    insert_refunds, refund_of, refund_statuses, refunds_under, settle_refunds, NewRefund, Refund,
    RefundSettlement, REFUND_COLUMNS,
};
pub use trail::{
    insert_progress, insert_transitions, transitions_of, NewProgress, NewTransition, Transition,
};

use crate::store::StoreError;
use sqlx::{FromRow, SqlitePool};

use rusqlite::OptionalExtension;

use super::{direct_error, Tx};

/// A resource's stored current state: what the pipeline reads before it
/// records, and (without its bookkeeping fields) what the API and the CLI
/// show of it.
#[derive(Debug, Clone, Default, FromRow, serde::Serialize, utoipa::ToSchema)]
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
    #[serde(serialize_with = "crate::store::queries::json_text_opt")]
    #[schema(value_type = Option<Object>)]
    pub snapshot: Option<String>,
    /// The Stripe account context to fetch with.
    #[serde(skip)]
    pub context: Option<String>,
    #[serde(skip)]
    pub next_reconcile_at: Option<String>,
    #[serde(skip)]
    pub reconcile_failures: i64,
}

pub(crate) const RESOURCE_COLUMNS: &str =
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
) -> Result<Option<Resource>, StoreError> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE provider = ? AND kind = ? AND id = ?"
    ))
    .bind(provider)
    .bind(kind)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(StoreError::from)
}

/// One resource by kind and id, from a read pool.
pub async fn find(pool: &SqlitePool, kind: &str, id: &str) -> Result<Option<Resource>, StoreError> {
    sqlx::query_as::<_, Resource>(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = ? AND id = ?"
    ))
    .bind(kind)
    .bind(id)
    .fetch_optional(pool)
    .await
    .map_err(StoreError::from)
}

/// A resource to find or add ([`find_many`], [`ensure`]): its key, and
/// what is known of it before its first observation.
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
) -> Result<Resource, StoreError> {
    let key = ResourceKey {
        provider,
        kind,
        id,
        parent_id,
        context,
    };
    let mut rows = super::on_handle(tx, |conn| ensure_many(conn, &[key], now)).await?;
    rows.pop()
        .ok_or(StoreError::Invariant("ensuring a resource returned no row"))
}

/// [`ensure`] for many resources, straight on the writer's handle (see
/// [`super::on_handle`]): rows in the order of `keys`. The no-op update on
/// a conflict is what makes `RETURNING` answer for an existing row too.
pub fn ensure_many(
    conn: &rusqlite::Connection,
    keys: &[ResourceKey<'_>],
    now: &str,
) -> Result<Vec<Resource>, StoreError> {
    let mut insert = conn
        .prepare_cached(&format!(
            "INSERT INTO resources (provider, kind, id, parent_id, context, first_seen_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (provider, kind, id) DO UPDATE SET provider = excluded.provider
             RETURNING {RESOURCE_COLUMNS_NO_SNAPSHOT}"
        ))
        .map_err(direct_error)?;
    keys.iter()
        .map(|k| {
            insert
                .query_row(
                    rusqlite::params![k.provider, k.kind, k.id, k.parent_id, k.context, now],
                    resource_of_row,
                )
                .map_err(direct_error)
        })
        .collect()
}

/// The rids of resources to be added in a write transaction, given out
/// before their rows are written (see [`find_many`]): the next rid after
/// the largest stored, counted on for every resource added in the
/// transaction. Valid only while the transaction holds the write lock.
#[derive(Debug, Default)]
pub struct NewRids {
    next: Option<i64>,
}

impl NewRids {
    fn take(&mut self, conn: &rusqlite::Connection) -> Result<i64, StoreError> {
        let next = match self.next {
            Some(next) => next,
            None => conn
                .query_row("SELECT COALESCE(MAX(rid), 0) + 1 FROM resources", [], |r| {
                    r.get(0)
                })
                .map_err(direct_error)?,
        };
        self.next = Some(next + 1);
        Ok(next)
    }
}

/// What is stored of each resource of `keys`, read without writing it, in
/// the order of `keys`, with whether it is new. A resource not stored yet
/// comes back as [`ensure_many`] would add it (no status, first seen
/// `now`), with a rid from `rids`; it must then be written by
/// [`update_states`] in the same transaction, before anything refers to
/// its rid. A resource observed for the first time is so written once,
/// whole, rather than added empty and then updated.
pub fn find_many(
    conn: &rusqlite::Connection,
    keys: &[ResourceKey<'_>],
    now: &str,
    rids: &mut NewRids,
) -> Result<Vec<(Resource, bool)>, StoreError> {
    let mut find = conn
        .prepare_cached(&format!(
            "SELECT {RESOURCE_COLUMNS_NO_SNAPSHOT} FROM resources
             WHERE id = ?1 AND provider = ?2 AND kind = ?3"
        ))
        .map_err(direct_error)?;
    keys.iter()
        .map(|k| {
            let found = find
                .query_row((k.id, k.provider, k.kind), resource_of_row)
                .optional()
                .map_err(direct_error)?;
            Ok(match found {
                Some(row) => (row, false),
                None => (
                    Resource {
                        rid: rids.take(conn)?,
                        provider: k.provider.to_string(),
                        kind: k.kind.to_string(),
                        id: k.id.to_string(),
                        parent_id: k.parent_id.map(str::to_string),
                        first_seen_at: now.to_string(),
                        context: k.context.map(str::to_string),
                        ..Resource::default()
                    },
                    true,
                ),
            })
        })
        .collect()
}

/// A row of [`RESOURCE_COLUMNS_NO_SNAPSHOT`] (or [`RESOURCE_COLUMNS`]), as
/// rusqlite reads it.
fn resource_of_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Resource> {
    Ok(Resource {
        rid: row.get(0)?,
        provider: row.get(1)?,
        kind: row.get(2)?,
        id: row.get(3)?,
        parent_id: row.get(4)?,
        status: row.get(5)?,
        terminal: row.get(6)?,
        livemode: row.get(7)?,
        context: row.get(8)?,
        amount: row.get(9)?,
        currency: row.get(10)?,
        snapshot: row.get(11)?,
        provider_updated_at: row.get(12)?,
        status_since: row.get(13)?,
        first_seen_at: row.get(14)?,
        last_observed_at: row.get(15)?,
        not_found: row.get(16)?,
        cancel_requested_at: row.get(17)?,
        next_reconcile_at: row.get(18)?,
        reconcile_failures: row.get(19)?,
    })
}

/// The new current state of a resource after an accepted observation.
#[derive(Debug, Clone)]
pub struct StateUpdate<'a> {
    pub rid: i64,
    /// Not stored yet ([`find_many`]): the row is added, with this key.
    pub new: Option<ResourceKey<'a>>,
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
    /// Write the row only when it would change (other than its time
    /// observed): a bulk transfer's items, most of which rest between two
    /// fetches of a large one.
    pub only_if_changed: bool,
}

/// Writes the current state of many resources; fields an observation lacks
/// keep their value. A resource [`find_many`] found new is added, with the
/// rid it gave it. Returns the rows written as they are now (without the
/// snapshot just written), in the order of `updates`; an update
/// `only_if_changed` that would change nothing writes nothing and returns
/// no row.
pub fn update_states(
    conn: &rusqlite::Connection,
    updates: &[StateUpdate<'_>],
) -> Result<Vec<Resource>, StoreError> {
    let mut update = conn
        .prepare_cached(&format!(
            "UPDATE resources SET
                parent_id = COALESCE(?2, parent_id), status = ?3, terminal = ?4,
                livemode = COALESCE(?5, livemode), context = COALESCE(?6, context),
                amount = COALESCE(?7, amount), currency = COALESCE(?8, currency),
                snapshot = ?9, provider_updated_at = COALESCE(?10, provider_updated_at),
                status_since = ?11, last_observed_at = ?12, not_found = 0,
                next_reconcile_at = ?13, reconcile_failures = 0
             WHERE rid = ?1 AND (NOT ?14
                OR parent_id IS NOT COALESCE(?2, parent_id) OR status IS NOT ?3
                OR terminal IS NOT ?4 OR livemode IS NOT COALESCE(?5, livemode)
                OR context IS NOT COALESCE(?6, context) OR amount IS NOT COALESCE(?7, amount)
                OR currency IS NOT COALESCE(?8, currency) OR snapshot IS NOT ?9
                OR provider_updated_at IS NOT COALESCE(?10, provider_updated_at)
                OR status_since IS NOT ?11 OR not_found <> 0
                OR next_reconcile_at IS NOT ?13 OR reconcile_failures <> 0)
             RETURNING {RESOURCE_COLUMNS_NO_SNAPSHOT}"
        ))
        .map_err(direct_error)?;
    // The same values, for a resource not stored yet: what it would hold
    // had it been added empty (first seen now, the key's parent and
    // context) and then updated as above.
    let mut insert = None;
    updates
        .iter()
        .map(|u| {
            let params = rusqlite::params![
                u.rid,
                u.parent_id,
                u.status,
                u.terminal,
                super::bool_int(u.livemode),
                u.context,
                u.amount,
                u.currency,
                u.snapshot,
                u.provider_updated_at,
                u.status_since,
                u.observed_at,
                u.next_reconcile_at,
                u.only_if_changed,
            ];
            let row = match &u.new {
                None => update.query_row(params, resource_of_row),
                Some(key) => {
                    let insert = match &mut insert {
                        Some(insert) => insert,
                        None => insert.insert(
                            conn.prepare_cached(&format!(
                                "INSERT INTO resources (
                                    rid, parent_id, status, terminal, livemode, context,
                                    amount, currency, snapshot, provider_updated_at,
                                    status_since, last_observed_at, next_reconcile_at,
                                    provider, kind, id, first_seen_at)
                                 VALUES (?1, COALESCE(?2, ?18), ?3, ?4, ?5, COALESCE(?6, ?19),
                                    ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?15, ?16, ?17, ?12)
                                 RETURNING {RESOURCE_COLUMNS_NO_SNAPSHOT}"
                            ))
                            .map_err(direct_error)?,
                        ),
                    };
                    let mut params = params.to_vec();
                    params.extend_from_slice(rusqlite::params![
                        key.provider,
                        key.kind,
                        key.id,
                        key.parent_id,
                        key.context,
                    ]);
                    insert.query_row(params.as_slice(), resource_of_row)
                }
            };
            match row {
                Err(rusqlite::Error::QueryReturnedNoRows) if u.only_if_changed => Ok(None),
                Err(rusqlite::Error::QueryReturnedNoRows) => {
                    Err(StoreError::Invariant("a resource being updated has no row"))
                }
                row => row.map(Some).map_err(direct_error),
            }
        })
        .filter_map(Result::transpose)
        .collect()
}

/// Stale observations: only the time the resources were seen moves.
pub fn touch_many(
    conn: &rusqlite::Connection,
    rids: &[i64],
    observed_at: &str,
) -> Result<(), StoreError> {
    execute_each(
        conn,
        "UPDATE resources SET last_observed_at = ?1 WHERE rid = ?2",
        rids,
        |rid| (observed_at, *rid),
    )
}

/// Runs the statement `sql` once for each of `rows`, with the parameters
/// `params` makes of it (straight on the writer's handle: see
/// [`super::on_handle`]).
fn execute_each<T, P: rusqlite::Params>(
    conn: &rusqlite::Connection,
    sql: &str,
    rows: &[T],
    params: impl Fn(&T) -> P,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut statement = conn.prepare_cached(sql).map_err(direct_error)?;
    for row in rows {
        statement.execute(params(row)).map_err(direct_error)?;
    }
    Ok(())
}

/// The provider answered 404 for this resource.
pub async fn mark_not_found(
    tx: &mut Tx<'_>,
    rid: i64,
    observed_at: &str,
    next_reconcile_at: Option<&str>,
) -> Result<(), StoreError> {
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
pub async fn set_cancel_requested(tx: &mut Tx<'_>, rid: i64, at: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE resources SET cancel_requested_at = ? WHERE rid = ?")
        .bind(at)
        .bind(rid)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
