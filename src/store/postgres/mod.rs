//! The PostgreSQL engine: several replicas of cancelwatch on one database.
//!
//! On SQLite one writer connection orders every write; here several
//! processes write at once, and each rule that rested on that order is
//! stated explicitly:
//!
//! - an acknowledgement commits with `synchronous_commit = on` (durable
//!   before the 2xx), a group commit's deliveries in one multi-row insert;
//!   the pipeline's own commits are not waited for (`off`): losing the last
//!   of them in a crash only means their deliveries are processed again;
//! - a lease is granted only under one transaction-scoped advisory lock
//!   ([`LEASE_LOCK`]), so "no two deliveries of one resource at once" holds
//!   across replicas, with the unique index `inbox_one_lease_per_resource`
//!   as its backstop; candidates are picked `FOR UPDATE SKIP LOCKED`;
//! - lease expiry is on the database's clock, never a replica's; the lease
//!   end the holder was given and the holder's id fence every finish, so a
//!   replica that lost its lease changes nothing;
//! - every replica keeps one connection of its own open while it lives
//!   ([`keeper`]): the others see from `pg_stat_activity` when it is gone and
//!   take its leases up at once, and the one holding the session advisory
//!   lock [`LEADER_LOCK`] on it runs the reconciler, the scans, the outbox
//!   and the pruner;
//! - recording locks the resource rows it judges (`FOR UPDATE`), so a
//!   reconcile and a delivery of one resource on two replicas are judged
//!   one after the other; a statement locks its rows in the order of their
//!   rid, so two replicas recording the same resources wait for each other
//!   rather than deadlock.

mod alerting;
mod engine;
mod inbox;
mod keeper;
mod outcomes;
pub mod reads;
mod record;

pub use engine::PgStore;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::DatabaseConfig;
use crate::store::StoreError;

pub type PgTx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

/// The migrations of this engine.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Transaction-scoped advisory lock under which leases are granted.
pub const LEASE_LOCK: i64 = 0x0063_776c_6561_7365; // "cwlease"
/// Session advisory lock held by the leader replica.
pub const LEADER_LOCK: i64 = 0x0063_776c_6561_6472; // "cwleadr"

/// The database's clock now, as the text every time is stored in.
pub const DB_NOW: &str =
    "to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";

/// Connection options from the URL and the configuration.
fn options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)?
        .application_name("cancelwatch")
        // Every commit waits for its WAL flush unless it says otherwise (the
        // pipeline's do), whatever the server's own default: an
        // acknowledgement is durable before its 2xx.
        .options([("synchronous_commit", "on")])
        // Statements are built from a handful of fixed texts.
        .statement_cache_capacity(256))
}

/// A pool on `url`, checked with a first connection: an unreachable
/// server is one clear error at start, not a hang.
pub async fn connect(url: &str, cfg: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let options = options(url)?;
    let wait = Duration::from_secs(cfg.connect_timeout_secs);
    // One connection first, for the server's own answer (refused, unknown
    // database, authentication) rather than the pool's "timed out".
    let first = tokio::time::timeout(
        wait,
        <sqlx::PgConnection as sqlx::Connection>::connect_with(&options),
    )
    .await
    .map_err(|_| StoreError::Unreachable {
        secs: cfg.connect_timeout_secs,
    })??;
    sqlx::Connection::close(first).await?;
    let pool = PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .min_connections(1)
        .acquire_timeout(wait)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies the migrations not yet applied. sqlx takes PostgreSQL's
/// migration advisory lock around them, so replicas that start together
/// apply each once; a schema newer than this binary is refused first.
pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    refuse_a_newer_one(pool).await?;
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// The highest applied migration, when any (`None`: not a cancelwatch
/// database yet, or an empty one).
async fn applied_version(pool: &PgPool) -> Result<Option<i64>, StoreError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    Ok(
        sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await?,
    )
}

fn newest_known() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

async fn refuse_a_newer_one(pool: &PgPool) -> Result<(), StoreError> {
    let binary = newest_known();
    match applied_version(pool).await? {
        Some(database) if database > binary => Err(StoreError::SchemaTooNew {
            database,
            binary,
            binary_version: env!("CARGO_PKG_VERSION"),
        }),
        _ => Ok(()),
    }
}

/// For the read commands: the schema must be exactly this binary's.
async fn exactly_this_one(pool: &PgPool) -> Result<(), StoreError> {
    let binary = newest_known();
    match applied_version(pool).await? {
        None => Err(StoreError::NotOurs),
        Some(database) if database > binary => Err(StoreError::SchemaTooNew {
            database,
            binary,
            binary_version: env!("CARGO_PKG_VERSION"),
        }),
        Some(database) if database < binary => Err(StoreError::SchemaOlder { database, binary }),
        Some(_) => Ok(()),
    }
}
