//! The schema version a database was left at, against the migrations this
//! binary knows.

use sqlx::SqlitePool;

use super::MIGRATOR;
use crate::store::StoreError;

/// A database that a newer release migrated further than this binary
/// knows is refused, naming both versions; sqlx's migrator would stop on it
/// too, but with "migration N was previously applied but is missing in the
/// resolved migrations", which reads like a damaged install.
pub(super) async fn refuse_a_newer_one(write: &SqlitePool) -> Result<(), StoreError> {
    let migrated_before: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(write)
    .await?;
    if !migrated_before {
        return Ok(());
    }
    let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(write)
        .await?;
    let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    match newest {
        Some(database) if database > known => Err(StoreError::SchemaTooNew {
            database,
            binary: known,
            binary_version: env!("CARGO_PKG_VERSION"),
        }),
        _ => Ok(()),
    }
}

/// A database opened read-only must be at exactly this binary's schema: a
/// newer one may hold what this binary cannot read, an older one lacks what
/// it reads (and a read-only open cannot migrate it).
pub(super) async fn exactly_this_one(read: &SqlitePool) -> Result<(), StoreError> {
    let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
    let applied: Option<i64> =
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(read)
            .await
            .map_err(|_| StoreError::NotOurs)?;
    match applied.unwrap_or(0) {
        database if database > known => Err(StoreError::SchemaTooNew {
            database,
            binary: known,
            binary_version: env!("CARGO_PKG_VERSION"),
        }),
        database if database < known => Err(StoreError::SchemaOlder {
            database,
            binary: known,
        }),
        _ => Ok(()),
    }
}
