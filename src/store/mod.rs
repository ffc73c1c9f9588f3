//! All SQL lives under `store/`: one file per area, one place (this file) for
//! SQLite specifics such as pragmas. Queries are written in the SQL that
//! SQLite and PostgreSQL share where that costs nothing (`ON CONFLICT … DO
//! NOTHING`, `RETURNING`, text timestamps).
//!
//! There is one writer path: a pool of exactly one connection. Every write in
//! the daemon goes through it, so writes never fight over SQLite's lock inside
//! the process; reads use their own pool and WAL lets them run beside the writer.

pub mod cancels;
pub mod inbox;
pub mod prune;
pub mod queries;
pub mod refusals;
pub mod resources;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use crate::config::DatabaseConfig;

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: cannot create {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct Db {
    /// The one writer connection.
    pub write: SqlitePool,
    /// Readers.
    pub read: SqlitePool,
}

impl Db {
    /// Opens (creating the file and its folder if needed) and migrates.
    pub async fn open(path: &Path, cfg: &DatabaseConfig) -> Result<Db, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let sync = match cfg.synchronous.as_str() {
            "normal" => SqliteSynchronous::Normal,
            _ => SqliteSynchronous::Full,
        };
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sync)
            .foreign_keys(true)
            .busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))
            // Statements are cached per connection; WAL checkpoints stay automatic.
            .statement_cache_capacity(256);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(cfg.read_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Db { write, read })
    }

    /// True when both pools answer a trivial query.
    pub async fn ping(&self) -> bool {
        let w = sqlx::query("SELECT 1").execute(&self.write);
        let r = sqlx::query("SELECT 1").execute(&self.read);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(w, r) }).await,
            Ok((Ok(_), Ok(_)))
        )
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

/// SQLite stores booleans as 0/1.
pub fn bool_int(b: Option<bool>) -> Option<i64> {
    b.map(i64::from)
}
