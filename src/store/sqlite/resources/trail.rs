//! The trail of resources' observations: transition and progress rows.

use crate::store::StoreError;
use sqlx::{FromRow, SqlitePool};

use super::execute_each;
use crate::store::sqlite::bool_int;

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

/// Inserts transition rows in the order given.
pub fn insert_transitions(
    conn: &rusqlite::Connection,
    transitions: &[NewTransition<'_>],
) -> Result<(), StoreError> {
    execute_each(
        conn,
        "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status, to_status,
                                  observed_at, provider_at, trigger_type, trigger_id, livemode, snapshot)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        transitions,
        |t| {
            (
                t.rid,
                t.provider,
                t.kind,
                t.resource_id,
                t.parent_id,
                t.from_status,
                t.to_status,
                t.observed_at,
                t.provider_at,
                t.trigger_type,
                t.trigger_id,
                bool_int(t.livemode),
                t.snapshot,
            )
        },
    )
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

/// Inserts progress rows.
pub fn insert_progress(
    conn: &rusqlite::Connection,
    rows: &[NewProgress<'_>],
) -> Result<(), StoreError> {
    execute_each(
        conn,
        "INSERT INTO progress (rid, observed_at, status, success_count, failure_count, validated_count,
                               trigger_type, trigger_id)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        rows,
        |p| {
            (
                p.rid,
                p.observed_at,
                p.status,
                p.success,
                p.failure,
                p.validated,
                p.trigger_type,
                p.trigger_id,
            )
        },
    )
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
) -> Result<Vec<Transition>, StoreError> {
    sqlx::query_as::<_, Transition>(
        "SELECT id, provider, kind, resource_id, parent_id, from_status, to_status, observed_at,
                provider_at, trigger_type, trigger_id, livemode
         FROM transitions WHERE rid IN (SELECT rid FROM resources WHERE id = ?) ORDER BY id",
    )
    .bind(resource_id)
    .fetch_all(pool)
    .await
    .map_err(StoreError::from)
}
