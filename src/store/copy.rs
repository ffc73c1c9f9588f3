//! Moving a SQLite database to PostgreSQL (`cancelwatch migrate --from
//! sqlite://… --to postgres://…`): every row of every table, ids kept (the
//! trail, the aliases and the outbox refer to them), in one PostgreSQL
//! transaction, into a database that holds no cancelwatch data yet.
//!
//! Columns are copied by name as the PostgreSQL schema lists them, each
//! read from SQLite as the PostgreSQL type it becomes (SQLite's 0/1 flags
//! become booleans); the columns only PostgreSQL has (who holds a lease)
//! stay empty, so a delivery that was being processed is taken up at once.

use std::path::Path;

use sqlx::postgres::PgArguments;
use sqlx::sqlite::SqliteRow;
use sqlx::{Arguments, Connection, Row};

use super::postgres::PgStore;
use super::sqlite::SqliteStore;
use super::{Storage, StoreError};
use crate::config::DatabaseConfig;

/// Tables in an order that puts every row after those it refers to.
const TABLES: [&str; 11] = [
    "inbox",
    "refusals",
    "resources",
    "resource_aliases",
    "transitions",
    "progress",
    "refunds",
    "cancel_requests",
    "alerts",
    "alert_outbox",
    "alert_attempts",
];

/// Rows per insert (PostgreSQL takes at most 65,535 bound values).
const ROWS_PER_INSERT: usize = 500;

/// Copies the SQLite database at `from` into the PostgreSQL database at
/// `to` (migrated first); how many rows each table got.
pub async fn sqlite_to_postgres(
    from: &Path,
    to: &str,
    cfg: &DatabaseConfig,
) -> Result<Vec<(&'static str, u64)>, StoreError> {
    let source = SqliteStore::open_read_only(from, cfg).await?;
    let target = PgStore::open_schema_only(to, cfg).await?;
    let copied = copy(&source, &target).await;
    source.close().await;
    target.pool().close().await;
    copied
}

async fn copy(
    source: &SqliteStore,
    target: &PgStore,
) -> Result<Vec<(&'static str, u64)>, StoreError> {
    let read = &source.db().read;
    let mut conn = target.pool().acquire().await?;
    let mut tx = conn.begin().await?;
    for table in TABLES {
        let taken: bool = sqlx::query_scalar(&format!("SELECT EXISTS (SELECT 1 FROM {table})"))
            .fetch_one(&mut *tx)
            .await?;
        if taken {
            return Err(StoreError::NotEmpty(table));
        }
    }
    let mut counts = Vec::new();
    for table in TABLES {
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT column_name::text, data_type::text FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1
               AND column_name NOT IN ('lease_expires_at', 'lease_owner')
             ORDER BY ordinal_position",
        )
        .bind(table)
        .fetch_all(&mut *tx)
        .await?;
        let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
        let list = names.join(", ");
        let rows: Vec<SqliteRow> = sqlx::query(&format!("SELECT {list} FROM {table} ORDER BY 1"))
            .fetch_all(read)
            .await?;
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut args = PgArguments::default();
            let mut values = Vec::with_capacity(chunk.len());
            let mut n = 0;
            for row in chunk {
                let mut slots = Vec::with_capacity(columns.len());
                for (i, (_, ty)) in columns.iter().enumerate() {
                    n += 1;
                    slots.push(format!("${n}"));
                    bind(&mut args, row, i, ty)?;
                }
                values.push(format!("({})", slots.join(", ")));
            }
            sqlx::query_with(
                &format!("INSERT INTO {table} ({list}) VALUES {}", values.join(", ")),
                args,
            )
            .execute(&mut *tx)
            .await?;
        }
        if let Some(key) = serial_key(table) {
            // New rows carry on after the copied ones.
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{key}'),
                               GREATEST((SELECT MAX({key}) FROM {table}), 1))"
            ))
            .execute(&mut *tx)
            .await?;
        }
        counts.push((table, rows.len() as u64));
    }
    tx.commit().await?;
    Ok(counts)
}

/// The column a table's own sequence numbers, if it has one.
fn serial_key(table: &str) -> Option<&'static str> {
    match table {
        "resources" => Some("rid"),
        "resource_aliases" | "alerts" => None,
        _ => Some("id"),
    }
}

/// Binds column `i` of a SQLite row as the PostgreSQL type `ty` wants.
fn bind(args: &mut PgArguments, row: &SqliteRow, i: usize, ty: &str) -> Result<(), StoreError> {
    let added = match ty {
        "bigint" | "integer" => args.add(row.try_get::<Option<i64>, _>(i)?),
        "boolean" => args.add(row.try_get::<Option<i64>, _>(i)?.map(|v| v != 0)),
        "bytea" => args.add(row.try_get::<Option<Vec<u8>>, _>(i)?),
        _ => args.add(row.try_get::<Option<String>, _>(i)?),
    };
    added.map_err(|e| StoreError::Sql(sqlx::Error::Encode(e)))
}
