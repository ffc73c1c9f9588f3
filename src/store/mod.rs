//! All SQL lives under `store/`: one file per area, one place (this file) for
//! SQLite specifics such as pragmas. Queries are written in the SQL that
//! SQLite and PostgreSQL share where that costs nothing (`ON CONFLICT … DO
//! NOTHING`, `RETURNING`, text timestamps).
//!
//! There is one writer path: a pool of exactly one connection. Every write in
//! the daemon goes through it, so writes never fight over SQLite's lock inside
//! the process; reads use their own pool and WAL lets them run beside the writer.

pub mod alerts;
pub mod cancels;
pub mod inbox;
pub mod prune;
pub mod queries;
pub mod refusals;
pub mod resources;

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::DatabaseConfig;

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: cannot create the folder {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// WAL pages past which the writer checkpoints (SQLite's default: 1,000).
const WAL_CHECKPOINT_PAGES: u32 = 10_000;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone, Debug)]
pub struct Db {
    /// The one writer connection.
    pub write: SqlitePool,
    /// Readers.
    pub read: SqlitePool,
    /// `database.synchronous = "full"`: acknowledgement commits sync to disk.
    ack_full: bool,
    /// Writers other than the inbox's group commit take this one slot before
    /// they queue for the writer connection, so an acknowledgement never waits
    /// behind more than one of their transactions however many workers run.
    background_writers: Arc<Semaphore>,
    /// Acknowledgement commits waiting for the writer connection: a batch
    /// of the pipeline's that sees one ends early and lets it through.
    acks_waiting: Arc<AtomicUsize>,
}

/// Counts an acknowledgement commit as waiting while it lives.
pub struct AckWaiting(Arc<AtomicUsize>);

impl Drop for AckWaiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Measures how long a use holds the one writer connection, into the
/// histogram `cancelwatch_writer_hold_seconds{use}`: its rate of sum is the
/// share of time the writer is busy (near 1, writes queue up).
pub struct WriterHold {
    started: std::time::Instant,
    what: &'static str,
}

impl WriterHold {
    /// From now until dropped, for `what`: `acknowledge`, `claim`, `record`
    /// or `other`.
    pub fn start(what: &'static str) -> WriterHold {
        WriterHold {
            started: std::time::Instant::now(),
            what,
        }
    }
}

impl Drop for WriterHold {
    fn drop(&mut self) {
        metrics::histogram!("cancelwatch_writer_hold_seconds", "use" => self.what)
            .record(self.started.elapsed().as_secs_f64());
    }
}

/// A write transaction of the pipeline, alerts or a command, holding the
/// background writers' slot until it ends.
pub struct GatedTx {
    tx: Tx<'static>,
    _hold: WriterHold,
    _slot: OwnedSemaphorePermit,
}

impl GatedTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for GatedTx {
    type Target = Tx<'static>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for GatedTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
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
        // The connection runs at NORMAL: in WAL mode a commit is then written
        // but not synced, and the next synced commit (or checkpoint) makes it
        // durable along with everything before it. Only the commits behind an
        // acknowledgement need the sync (see `acknowledge_durably`); the
        // pipeline's commits ride on the next one. Losing one of those on
        // power loss means its delivery is processed again, never lost.
        let ack_full = cfg.synchronous != "normal";
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_millis(cfg.busy_timeout_ms))
            // Statements are cached per connection.
            .statement_cache_capacity(256)
            // A statement that changes many rows inside a transaction keeps a
            // journal of its own (to undo just itself on a constraint error);
            // in memory rather than in a temporary file that is created,
            // written and deleted for each such statement.
            .pragma("temp_store", "memory")
            // The writer copies the WAL into the database file (a checkpoint)
            // once the WAL holds this many pages: 40 MiB rather than SQLite's
            // 4 MiB, so pages written again and again (index pages, the
            // inbox's newest rows) are copied once instead of many times.
            .pragma("wal_autocheckpoint", WAL_CHECKPOINT_PAGES.to_string());
        // The pools' connections live in this process, beside it: a
        // liveness ping before each use (sqlx's default) would be one more
        // round trip to the connection's thread per transaction.
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(cfg.read_connections)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Db {
            write,
            read,
            ack_full,
            background_writers: Arc::new(Semaphore::new(1)),
            acks_waiting: Arc::default(),
        })
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

    /// A write transaction for anything but the inbox's group commit.
    pub async fn begin(&self) -> Result<GatedTx, sqlx::Error> {
        self.begin_for("other").await
    }

    /// [`Db::begin`], its writer time counted for `what` (see [`WriterHold`]).
    pub async fn begin_for(&self, what: &'static str) -> Result<GatedTx, sqlx::Error> {
        let slot = self.write_slot().await;
        let tx = begin_immediate(&self.write).await?;
        Ok(GatedTx {
            tx,
            _hold: WriterHold::start(what),
            _slot: slot,
        })
    }

    /// The background writers' slot, for a single write statement outside
    /// [`Db::begin`] (claims and the like).
    pub async fn write_slot(&self) -> OwnedSemaphorePermit {
        self.background_writers
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Marks an acknowledgement commit as waiting for the writer connection
    /// until the guard is dropped.
    pub fn ack_waiting(&self) -> AckWaiting {
        self.acks_waiting.fetch_add(1, Ordering::SeqCst);
        AckWaiting(self.acks_waiting.clone())
    }

    /// True while an acknowledgement commit waits for the writer connection.
    pub fn acks_waiting(&self) -> bool {
        self.acks_waiting.load(Ordering::SeqCst) > 0
    }

    /// Switches the writer connection to syncing every commit (before an
    /// acknowledgement commit) or back to NORMAL. A no-op when configured
    /// `normal`.
    pub async fn acknowledge_durably(
        &self,
        conn: &mut sqlx::SqliteConnection,
        on: bool,
    ) -> Result<(), sqlx::Error> {
        if self.ack_full {
            let pragma = if on {
                "PRAGMA synchronous = FULL"
            } else {
                "PRAGMA synchronous = NORMAL"
            };
            sqlx::query(pragma).execute(&mut *conn).await?;
        }
        Ok(())
    }

    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }
}

/// A write transaction that takes the write lock at its start. One that
/// reads first and writes later could find, when it comes to write, that
/// another connection (a command run beside the daemon) wrote in between,
/// and fail with SQLITE_BUSY_SNAPSHOT instead of waiting its turn.
pub async fn begin_immediate(pool: &SqlitePool) -> Result<Tx<'static>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// SQLite stores booleans as 0/1.
pub fn bool_int(b: Option<bool>) -> Option<i64> {
    b.map(i64::from)
}
