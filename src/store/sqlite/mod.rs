//! The SQLite engine: the embedded default, for one machine.
//!
//! There is one writer path: a pool of exactly one connection. Every write
//! goes through it, so writes never fight over SQLite's lock inside the
//! process; reads use their own pool and WAL lets them run beside the
//! writer. An acknowledgement is durable once the WAL is synced
//! ([`WalSync`]); a checkpointer thread keeps the WAL short.

pub mod alerting;
pub mod alerts;
pub mod cancels;
mod durability;
mod engine;
mod health;
pub mod inbox;
mod outcomes;
mod owner;
pub mod prune;
pub mod record;
pub mod refusals;
pub mod resources;
mod schema;

use durability::{Checkpointer, WalSync};
pub use engine::SqliteStore;
use health::WriteHealth;

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::DatabaseConfig;
use crate::store::StoreError;

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Sqlite>;

/// Runs `f` on `conn`'s SQLite handle, on this thread, inside whatever
/// transaction `conn` is in.
///
/// Every sqlx statement is a round trip to the connection's own thread:
/// two thread wake-ups, and on a busy machine a wait for a CPU at each. A
/// record turn is many statements, so it runs them here, straight on the
/// handle (through rusqlite, which links the same SQLite), for the price of
/// one round trip to take the handle. sqlx's thread makes no call on the
/// handle until it is given back. `f` must not begin or end transactions
/// (sqlx keeps track of those; [`transaction_on_handle`] runs a whole one
/// outside them), change the connection's settings, or keep a statement
/// past its return (sqlx could not close the connection): hence only this
/// crate's store calls it.
pub(crate) async fn on_handle<T>(
    conn: &mut sqlx::SqliteConnection,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut locked = conn.lock_handle().await?;
    // SAFETY: the handle is open and ours alone while `locked` lives, and
    // `handle` (which does not close it) is dropped before `locked`,
    // finalizing the statements it prepared, also when `f` panics.
    let handle = unsafe { rusqlite::Connection::from_handle(locked.as_raw_handle().as_ptr()) }
        .map_err(direct_error)?;
    // The work may be long (a bulk transfer with thousands of items): on a
    // multi-threaded runtime this worker's other tasks move to another
    // thread meanwhile.
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    let out = if multi_thread {
        tokio::task::block_in_place(|| f(&handle))
    } else {
        f(&handle)
    };
    drop(handle);
    drop(locked);
    out
}

/// Runs `f` on `conn`'s SQLite handle (see [`on_handle`]) as one write
/// transaction of its own, begun and committed there: the whole
/// transaction costs one round trip to the connection's thread instead of
/// three or more. `conn` must not be in a transaction (sqlx's, which it
/// would not know ended). When `f` fails or panics, the transaction is
/// rolled back before the handle goes back to sqlx.
pub(crate) async fn transaction_on_handle<T>(
    conn: &mut sqlx::SqliteConnection,
    f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    on_handle(conn, |handle| {
        if !handle.is_autocommit() {
            return Err(StoreError::Invariant(
                "a transaction on the handle inside another one",
            ));
        }
        handle
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(direct_error)?;
        let done =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(handle))).map(|out| {
                out.and_then(|v| {
                    handle
                        .execute_batch("COMMIT")
                        .map_err(direct_error)
                        .map(|()| v)
                })
            });
        if !handle.is_autocommit() {
            // Failed or panicked (or, rarely, the commit failed): nothing of it stays.
            let _ = handle.execute_batch("ROLLBACK");
        }
        done.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
    .await
}

/// A rusqlite error (from [`on_handle`]) as the sqlx error the rest of the
/// store returns.
pub fn direct_error(e: rusqlite::Error) -> StoreError {
    StoreError::Sql(sqlx::Error::AnyDriverError(Box::new(e)))
}

/// WAL pages past which the writer checkpoints (SQLite's default: 1,000).
const WAL_CHECKPOINT_PAGES: u32 = 10_000;

/// How often the [`Checkpointer`] copies the WAL into the database file
/// while it grows: what a pass leaves is what the writer copies itself,
/// inside a commit, when the WAL reaches [`WAL_CHECKPOINT_PAGES`], so the
/// shorter the wait, the shorter that commit, and the acknowledgements
/// queued behind it (docs/performance.md has the figures).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(10);

/// The longest wait between two passes: the wait doubles, from
/// [`CHECKPOINT_EVERY`], while nothing is written, so an idle daemon does
/// not wake a hundred times a second.
const CHECKPOINT_IDLE_EVERY: Duration = Duration::from_millis(320);

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone, Debug)]
pub struct Db {
    /// The one writer connection.
    pub write: SqlitePool,
    /// Readers.
    pub read: SqlitePool,
    /// `database.synchronous = "full"`: what makes acknowledged commits
    /// durable (`None` at `normal`).
    wal_sync: Option<Arc<WalSync>>,
    /// Held while a sync of the WAL runs: those that come meanwhile wait
    /// here, as tasks, rather than each on a thread of its own (a disk that
    /// stalls for half a second at 1,000 commits a second would otherwise
    /// pile up dozens of threads, each with its own memory). It holds the
    /// number of the last sync done; see [`Db::sync_commits`].
    sync_turn: Arc<tokio::sync::Mutex<u64>>,
    /// Syncs of the WAL begun so far (each numbered by it).
    syncs_begun: Arc<std::sync::atomic::AtomicU64>,
    /// Writers other than the inbox's group commit take this one slot before
    /// they queue for the writer connection, so an acknowledgement never waits
    /// behind more than one of their transactions however many workers run.
    background_writers: Arc<Semaphore>,
    /// Acknowledgement commits waiting for the writer connection: a batch
    /// of the pipeline's that sees one ends early and lets it through.
    acks_waiting: Arc<AtomicUsize>,
    /// None when opened read-only: nothing is written, nothing to copy.
    checkpointer: Option<Arc<Checkpointer>>,
    /// Whether writes fail now for a cause outside the daemon.
    health: Arc<WriteHealth>,
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

/// The writer connection (`T`: a transaction on it, or the connection
/// itself) for the pipeline, alerts or a command, holding the background
/// writers' slot, and counting its hold, until it is dropped.
pub struct Gated<T> {
    inner: T,
    _hold: WriterHold,
    _slot: OwnedSemaphorePermit,
}

/// A write transaction of the pipeline, alerts or a command ([`Db::begin`]).
pub type GatedTx = Gated<Tx<'static>>;

/// The writer connection for statements that each stand alone (SQLite
/// commits a statement outside a transaction on its own, all or nothing):
/// [`Db::acquire_for`].
pub type GatedConn = Gated<sqlx::pool::PoolConnection<sqlx::Sqlite>>;

impl GatedTx {
    pub async fn commit(self) -> Result<(), StoreError> {
        Ok(self.inner.commit().await?)
    }

    pub async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.inner.rollback().await?)
    }
}

impl<T> std::ops::Deref for Gated<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> std::ops::DerefMut for Gated<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
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
        // The connections run at NORMAL: in WAL mode a commit is then
        // written but not synced, and the next sync of the WAL file (or a
        // checkpoint) makes it durable along with everything before it. Only
        // the commits behind an acknowledgement need that sync, and they get
        // it from `WalSync` after the commit, off the writer connection; the
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
            .pragma("wal_autocheckpoint", WAL_CHECKPOINT_PAGES.to_string())
            // A WAL that grew while a reader held checkpoints back (an
            // operator's `sqlite3` left in a read transaction) is cut back
            // to this size when SQLite next starts it over, once the
            // checkpoints have caught up; otherwise the file keeps its
            // largest size until the daemon stops.
            .pragma("journal_size_limit", cfg.wal_size_limit_bytes.to_string());
        // The pools' connections live in this process, beside it: a
        // liveness ping before each use (sqlx's default) would be one more
        // round trip to the connection's thread per transaction.
        let write_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .idle_timeout(None)
            .max_lifetime(None)
            // A write that failed on a full disk must not leave the one
            // writer connection unusable for every write after it.
            .after_release(|conn, _| Box::pin(health::settle(conn)));
        let write =
            while_racing(|| async { Ok(write_pool.clone().connect_with(options.clone()).await?) })
                .await?;
        while_racing(|| migrate(&write)).await?;
        // Migrations wrote through the writer connection, which stays open:
        // the WAL file exists from here on.
        let wal_sync = if ack_full {
            Some(Arc::new(WalSync::open(path)?))
        } else {
            None
        };
        let checkpointer = Some(Arc::new(Checkpointer::start(path, cfg.busy_timeout_ms)?));
        metrics::gauge!("cancelwatch_database_writable").set(1.0);
        let read = SqlitePoolOptions::new()
            .max_connections(cfg.read_connections)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options.read_only(true))
            .await?;
        Ok(Db {
            write,
            read,
            wal_sync,
            background_writers: Arc::new(Semaphore::new(1)),
            acks_waiting: Arc::default(),
            sync_turn: Arc::default(),
            syncs_begun: Arc::default(),
            checkpointer,
            health: Arc::default(),
        })
    }

    /// Opens an existing database for reading only: nothing is created,
    /// migrated or written (the read commands). A missing file, or a schema
    /// this binary does not match, is refused with what to do about it.
    pub async fn open_read_only(path: &Path, cfg: &DatabaseConfig) -> Result<Db, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Missing {
                path: path.display().to_string(),
            });
        }
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .read_only(true)
            .busy_timeout(Duration::from_millis(cfg.busy_timeout_ms));
        let read = SqlitePoolOptions::new()
            .max_connections(cfg.read_connections)
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        if let Err(e) = schema::exactly_this_one(&read).await {
            read.close().await;
            return Err(e);
        }
        Ok(Db {
            // Every connection is read-only: a write through either pool fails.
            write: read.clone(),
            read,
            wal_sync: None,
            background_writers: Arc::new(Semaphore::new(1)),
            acks_waiting: Arc::default(),
            sync_turn: Arc::default(),
            syncs_begun: Arc::default(),
            checkpointer: None,
            health: Arc::default(),
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

    /// True once a sync of the WAL has failed: from then on no delivery is
    /// acknowledged until the daemon restarts (see [`WalSync`]).
    pub fn sync_failed(&self) -> bool {
        self.wal_sync.as_ref().is_some_and(|w| w.failed())
    }

    /// Fails the WAL's sync as a failed `fdatasync` would: every sync after
    /// it fails.
    #[cfg(test)]
    pub(crate) fn fail_sync(&self) {
        let wal = self.wal_sync.as_ref().expect("synchronous = full");
        let _ = wal.sync_with(|_| Err(std::io::Error::from_raw_os_error(5)));
    }

    /// Notes a write's result (see [`WriteHealth::note`]) and hands it on.
    pub(crate) fn watch<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        self.health.note(&result);
        result
    }

    /// Why writes fail now, if they do; while they do, a probe write (at
    /// most about once a second) finds out whether the cause went. Only the
    /// probe ends the trouble: an ordinary write that succeeds may have
    /// needed no new space (a row changed in place), and taking it as the
    /// end would turn readiness on and off while the disk stays full. The
    /// store calls this after its writes succeed, so the end is noticed
    /// (and logged) even when nothing asks for readiness.
    pub async fn write_trouble(&self) -> Option<crate::store::Unavailable> {
        if self.health.probe_due() {
            let probed = tokio::time::timeout(Duration::from_secs(2), async {
                let mut conn = self.acquire_for("other").await?;
                transaction_on_handle(&mut conn, health::probe).await
            })
            .await
            .unwrap_or(Err(StoreError::Sql(sqlx::Error::PoolTimedOut)));
            if self.watch(probed).is_ok() {
                self.health.wrote();
            }
        }
        self.health.current()
    }

    /// A write transaction for anything but the inbox's group commit.
    pub async fn begin(&self) -> Result<GatedTx, StoreError> {
        self.begin_for("other").await
    }

    /// [`Db::begin`], its writer time counted for `what` (see [`WriterHold`]).
    pub async fn begin_for(&self, what: &'static str) -> Result<GatedTx, StoreError> {
        self.gated(what, || begin_immediate(&self.write)).await
    }

    /// The writer connection for statements that each stand alone, its
    /// time counted for `what` (see [`WriterHold`]): one round trip fewer
    /// on each side than a transaction around a single statement.
    pub async fn acquire_for(&self, what: &'static str) -> Result<GatedConn, StoreError> {
        self.gated(what, || async { Ok(self.write.acquire().await?) })
            .await
    }

    /// What `open` gives once the background writers' slot is ours, held
    /// with the slot and its writer time counted for `what`.
    async fn gated<T, F>(
        &self,
        what: &'static str,
        open: impl FnOnce() -> F,
    ) -> Result<Gated<T>, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let slot = self.write_slot().await;
        let inner = open().await?;
        Ok(Gated {
            inner,
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

    /// Makes every commit made so far durable (`synchronous = "full"`; a
    /// no-op at `normal`), without holding the writer connection: see
    /// [`WalSync`].
    ///
    /// One sync covers every commit made before it began. So a caller that
    /// finds, once its turn comes, that a sync began after it was called
    /// (numbered past those begun then) and has succeeded, returns at once:
    /// the groups committed while one sync ran share the next, rather than
    /// each waiting for a sync of its own behind the others.
    pub async fn sync_commits(&self) -> Result<(), StoreError> {
        let Some(wal) = self.wal_sync.clone() else {
            return Ok(());
        };
        // Any sync numbered from `covering` on begins after this call.
        let covering = self.syncs_begun.load(Ordering::SeqCst) + 1;
        let mut done = self.sync_turn.lock().await;
        if *done >= covering {
            metrics::counter!("cancelwatch_wal_syncs_shared_total").increment(1);
            return Ok(());
        }
        let number = self.syncs_begun.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::counter!("cancelwatch_wal_syncs_total").increment(1);
        tokio::task::spawn_blocking(move || {
            #[cfg(test)]
            {
                let now = wal.threads.0.fetch_add(1, Ordering::SeqCst) + 1;
                wal.threads.1.fetch_max(now, Ordering::SeqCst);
            }
            let synced = wal.sync();
            #[cfg(test)]
            wal.threads.0.fetch_sub(1, Ordering::SeqCst);
            synced
        })
        .await
        .map_err(|e| StoreError::Sync(std::io::Error::other(e)))?
        .map_err(StoreError::Sync)?;
        *done = number;
        Ok(())
    }

    pub async fn close(&self) {
        if let Some(checkpointer) = self.checkpointer.clone() {
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
        self.read.close().await;
        self.write.close().await;
    }
}

/// Runs `open` again, a few times after a short pause, when it failed the
/// way a race with another process opening the same brand-new database
/// fails (a command started beside the daemon): SQLite busy while the other
/// switches the file to WAL, or a migration that the other applied first
/// (each migration runs in a transaction of its own, so looking again at
/// what is applied and going on is safe).
async fn while_racing<T, F, Fut>(mut open: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    const ATTEMPTS: u32 = 8;
    let mut attempt = 1;
    loop {
        match open().await {
            Err(e) if attempt < ATTEMPTS && e.is_race() => {
                tracing::debug!(error = %e, attempt, "opening the database raced another process; trying again");
                tokio::time::sleep(Duration::from_millis(25 * u64::from(attempt))).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Applies the migrations not yet applied, through the writer pool's one
/// connection, with foreign keys off: a migration that builds a table again
/// (SQLite cannot change a constraint in place) drops the old one while
/// other tables still refer to its rows, and copies them with the same keys.
/// Each migration commits whole or not at all; foreign keys are on again
/// afterwards, whatever happened.
async fn migrate(write: &SqlitePool) -> Result<(), StoreError> {
    debug_assert_eq!(write.options().get_max_connections(), 1);
    schema::refuse_a_newer_one(write).await?;
    reworded_comments(write).await?;
    sqlx::query("PRAGMA foreign_keys = OFF")
        .execute(write)
        .await?;
    let migrated = MIGRATOR.run(write).await;
    sqlx::query("PRAGMA foreign_keys = ON")
        .execute(write)
        .await?;
    Ok(migrated?)
}

/// Migrations whose comments were reworded after release, with the
/// checksum (SHA-384 of the text) a database that applied the earlier text
/// recorded. sqlx refuses a migration whose text no longer matches what was
/// applied; a changed comment changes no schema, so such a database has its
/// record brought to the current text, and any other mismatch is still
/// refused.
const REWORDED: [(i64, &str); 2] = [
    (
        8,
        "e7b8185cf26c22aec24452e8e073f3eb1bf2586125ef504a443c181d518b28096d7fc072ebcc923d56763e300072c13c",
    ),
    (
        9,
        "d689694112e5723851f1c8aa074c9bac5d01cc7868fa9a303db506fc0d8722d020f922f97e743d2a3d679dbcc9222526",
    ),
];

/// See [`REWORDED`].
async fn reworded_comments(write: &SqlitePool) -> Result<(), StoreError> {
    let recorded: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = '_sqlx_migrations')",
    )
    .fetch_one(write)
    .await?;
    if !recorded {
        return Ok(());
    }
    for (version, earlier) in REWORDED {
        let Some(now) = MIGRATOR.iter().find(|m| m.version == version) else {
            continue;
        };
        let earlier = hex::decode(earlier)
            .map_err(|_| StoreError::Invariant("a reworded checksum is not hex"))?;
        sqlx::query("UPDATE _sqlx_migrations SET checksum = ? WHERE version = ? AND checksum = ?")
            .bind(now.checksum.as_ref())
            .bind(version)
            .bind(earlier)
            .execute(write)
            .await?;
    }
    Ok(())
}

impl StoreError {
    /// See [`while_racing`].
    fn is_race(&self) -> bool {
        use sqlx::migrate::MigrateError;
        match self {
            StoreError::Sql(sqlx::Error::Database(e)) => e
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                // SQLITE_BUSY and its extended codes.
                .is_some_and(|code| code & 0xff == 5),
            StoreError::Migrate(MigrateError::Execute(_) | MigrateError::ExecuteMigration(..)) => {
                true
            }
            _ => false,
        }
    }
}

/// A write transaction that takes the write lock at its start. One that
/// reads first and writes later could find, when it comes to write, that
/// another connection (a command run beside the daemon) wrote in between,
/// and fail with SQLITE_BUSY_SNAPSHOT instead of waiting its turn.
pub async fn begin_immediate(pool: &SqlitePool) -> Result<Tx<'static>, StoreError> {
    pool.begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(StoreError::from)
}

/// SQLite stores booleans as 0/1.
pub fn bool_int(b: Option<bool>) -> Option<i64> {
    b.map(i64::from)
}

#[cfg(test)]
mod tests {

    /// A database that applied migrations 8 and 9 before their comments
    /// were reworded (its recorded checksums those of the earlier text)
    /// opens, and its record now matches the current text; a checksum that
    /// is neither is still refused.
    #[tokio::test]
    async fn a_database_migrated_before_a_comment_was_reworded_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let cfg = crate::config::DatabaseConfig::default();
        Db::open(&path, &cfg).await.unwrap().close().await;
        let set = |version: i64, checksum: Vec<u8>| {
            let path = path.clone();
            async move {
                let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
                    .await
                    .unwrap();
                sqlx::query("UPDATE _sqlx_migrations SET checksum = ? WHERE version = ?")
                    .bind(checksum)
                    .bind(version)
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            }
        };
        for (version, earlier) in super::REWORDED {
            set(version, hex::decode(earlier).unwrap()).await;
        }
        let db = Db::open(&path, &cfg).await.unwrap();
        let recorded: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT checksum FROM _sqlx_migrations WHERE version IN (8, 9) ORDER BY version",
        )
        .fetch_all(&db.read)
        .await
        .unwrap();
        let current: Vec<Vec<u8>> = [8, 9]
            .iter()
            .map(|v| {
                super::MIGRATOR
                    .iter()
                    .find(|m| m.version == *v)
                    .unwrap()
                    .checksum
                    .to_vec()
            })
            .collect();
        assert_eq!(recorded, current);
        db.close().await;

        set(8, vec![0; 48]).await;
        assert!(
            Db::open(&path, &cfg).await.is_err(),
            "another text is refused"
        );
    }
    use super::{Db, WalSync};

    /// After `fdatasync` failed once, no sync succeeds again: the pages it
    /// could not write may be gone while the next `fdatasync` succeeds.
    #[test]
    fn a_failed_fdatasync_fails_every_sync_after_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x.db-wal"), b"frames").unwrap();
        let wal = WalSync::open(&dir.path().join("x.db")).unwrap();
        wal.sync().unwrap();
        let failed = wal.sync_with(|_| Err(std::io::Error::from_raw_os_error(5)));
        assert_eq!(failed.unwrap_err().raw_os_error(), Some(5));
        assert!(wal.sync().is_err(), "a sync after the failure succeeded");
        assert!(wal.sync().is_err());
    }

    /// A database with the default settings in a folder of its own, kept
    /// as long as the returned guard.
    async fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db"), &Default::default())
            .await
            .unwrap();
        (dir, db)
    }

    /// A database written before migration 9 (resources keyed by provider,
    /// kind, id) comes through the table's rebuild whole: every resource with
    /// its rid, so the transitions, progress and refunds that refer to it
    /// still do; foreign keys are enforced again afterwards; and a lookup by
    /// the provider's id alone uses the key's index, `resources_id` gone.
    #[tokio::test]
    async fn resources_keep_their_rids_through_the_rebuild_of_migration_9() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("migrations");
        std::fs::create_dir(&old).unwrap();
        for m in super::MIGRATOR.iter().filter(|m| m.version <= 8) {
            let name = format!("{:04}_{}.sql", m.version, m.description.replace(' ', "_"));
            std::fs::write(old.join(name), m.sql.as_bytes()).unwrap();
        }
        let path = dir.path().join("x.db");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(version, 8);
        sqlx::raw_sql(
            "INSERT INTO resources (rid, provider, kind, id, parent_id, status, first_seen_at) VALUES
                 (7, 'juice', 'juice.bulk_transfer', 'bulk_1', NULL, 'partial_cancellation', 't0'),
                 (9, 'juice', 'juice.transfer', 'it_1', 'bulk_1', 'cancelled', 't0'),
                 (12, 'stripe', 'stripe.outbound_transfer', 'obt_1', NULL, 'canceled', 't0');
             INSERT INTO transitions (rid, provider, kind, resource_id, to_status, observed_at, trigger_type)
                 VALUES (7, 'juice', 'juice.bulk_transfer', 'bulk_1', 'partial_cancellation', 't1', 'event'),
                        (12, 'stripe', 'stripe.outbound_transfer', 'obt_1', 'canceled', 't1', 'event');
             INSERT INTO progress (rid, observed_at, status, trigger_type) VALUES (7, 't1', 'partial_cancellation', 'event');
             INSERT INTO refunds (rid, provider, kind, resource_id, status, reason, opened_at, updated_at, trigger_type)
                 VALUES (9, 'juice', 'juice.transfer', 'it_1', 'pending', 'cancelled', 't1', 't1', 'event');",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let db = Db::open(&path, &Default::default()).await.unwrap();
        let rows: Vec<(i64, String, Option<String>, Option<String>)> =
            sqlx::query_as("SELECT rid, id, parent_id, status FROM resources ORDER BY rid")
                .fetch_all(&db.read)
                .await
                .unwrap();
        let want = [
            (7, "bulk_1", None, Some("partial_cancellation")),
            (9, "it_1", Some("bulk_1"), Some("cancelled")),
            (12, "obt_1", None, Some("canceled")),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(rid, id, parent, status)| {
                (
                    *rid,
                    id.to_string(),
                    parent.map(String::from),
                    status.map(String::from),
                )
            })
            .collect();
        assert_eq!(rows, want);
        let dangling: Vec<(String,)> =
            sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
                .fetch_all(&db.read)
                .await
                .unwrap();
        assert!(dangling.is_empty(), "{dangling:?}");
        let joined: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM transitions JOIN resources USING (rid))
                  + (SELECT COUNT(*) FROM progress JOIN resources USING (rid))
                  + (SELECT COUNT(*) FROM refunds JOIN resources USING (rid))",
        )
        .fetch_one(&db.read)
        .await
        .unwrap();
        assert_eq!(joined, 4);

        let indexes: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_index_list('resources') ORDER BY name")
                .fetch_all(&db.read)
                .await
                .unwrap();
        assert_eq!(
            indexes,
            [
                "resources_parent",
                "resources_reconcile",
                "sqlite_autoindex_resources_1"
            ]
        );
        let plan: Vec<(i64, i64, i64, String)> =
            sqlx::query_as("EXPLAIN QUERY PLAN SELECT rid FROM resources WHERE id = 'obt_1'")
                .fetch_all(&db.read)
                .await
                .unwrap();
        assert!(
            plan[0].3.contains("sqlite_autoindex_resources_1 (id=?)"),
            "{plan:?}"
        );

        // The key still answers upserts: the existing row, not a new one.
        let mut tx = db.write.begin().await.unwrap();
        let r = super::resources::ensure(
            &mut tx,
            "stripe",
            "stripe.outbound_transfer",
            "obt_1",
            None,
            None,
            "t2",
        )
        .await
        .unwrap();
        assert_eq!(r.rid, 12);
        // And foreign keys hold again on the writer.
        let orphan = sqlx::query(
            "INSERT INTO progress (rid, observed_at, status, trigger_type) VALUES (999, 't2', 's', 'event')",
        )
        .execute(&mut *tx)
        .await;
        assert!(
            orphan.is_err(),
            "a row referring to no resource was written"
        );
    }

    /// Inserts resource `id` on the handle.
    fn insert_resource(
        c: &rusqlite::Connection,
        id: &str,
    ) -> Result<usize, crate::store::StoreError> {
        c.execute(
            "INSERT INTO resources (provider, kind, id, first_seen_at) VALUES ('p', 'k', ?1, 'now')",
            [id],
        )
        .map_err(super::direct_error)
    }

    /// How many resources `id` there are.
    fn count_resources(
        id: &str,
    ) -> sqlx::query::QueryScalar<'_, sqlx::Sqlite, i64, sqlx::sqlite::SqliteArguments<'_>> {
        sqlx::query_scalar("SELECT COUNT(*) FROM resources WHERE id = ?").bind(id)
    }

    /// What runs on the handle belongs to the transaction it runs in: sqlx
    /// sees it, a rollback takes it back, an error comes back as an error,
    /// and after a panic in it the connection is there for the next use.
    #[tokio::test]
    async fn on_handle_runs_inside_the_transaction() {
        on_handle_belongs_to_the_transaction().await;
    }

    /// [`on_handle_runs_inside_the_transaction`] where `on_handle` runs its
    /// work in `block_in_place`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_handle_runs_inside_the_transaction_on_many_threads() {
        on_handle_belongs_to_the_transaction().await;
    }

    async fn on_handle_belongs_to_the_transaction() {
        use futures_util::FutureExt;
        let (_dir, db) = temp_db().await;
        let insert = |id: &'static str| move |c: &rusqlite::Connection| insert_resource(c, id);
        let count = count_resources;

        let mut tx = db.begin().await.unwrap();
        assert_eq!(super::on_handle(&mut tx, insert("a")).await.unwrap(), 1);
        assert_eq!(count("a").fetch_one(&mut **tx).await.unwrap(), 1);
        tx.rollback().await.unwrap();
        assert_eq!(count("a").fetch_one(&db.read).await.unwrap(), 0);

        let mut tx = db.begin().await.unwrap();
        super::on_handle(&mut tx, insert("b")).await.unwrap();
        let twice = super::on_handle(&mut tx, insert("b")).await;
        assert!(twice.is_err(), "the unique key holds on the handle too");
        let panicked =
            std::panic::AssertUnwindSafe(super::on_handle(&mut tx, |_| -> Result<(), _> {
                panic!("a bug")
            }))
            .catch_unwind()
            .await;
        assert!(panicked.is_err());
        tx.commit().await.unwrap();
        assert_eq!(count("b").fetch_one(&db.read).await.unwrap(), 1);
        db.close().await;
    }

    /// A transaction on the handle keeps all of its work or none: committed
    /// when the work succeeds, rolled back when it fails or panics, and
    /// refused inside a transaction of sqlx's. Each time the connection is
    /// left outside any transaction, ready for sqlx's next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_on_the_handle_keeps_all_or_nothing() {
        use futures_util::FutureExt;
        let (_dir, db) = temp_db().await;
        let (insert, count) = (insert_resource, count_resources);
        let mut conn = db.write.acquire().await.unwrap();

        let both = super::transaction_on_handle(&mut conn, |c| {
            insert(c, "a")?;
            insert(c, "b")
        });
        assert_eq!(both.await.unwrap(), 1);
        assert_eq!(count("a").fetch_one(&db.read).await.unwrap(), 1);
        assert_eq!(count("b").fetch_one(&db.read).await.unwrap(), 1);

        // The second insert breaks the unique key: the first goes too.
        let failed = super::transaction_on_handle(&mut conn, |c| {
            insert(c, "c")?;
            insert(c, "a")
        });
        assert!(failed.await.is_err());
        assert_eq!(count("c").fetch_one(&mut *conn).await.unwrap(), 0);

        let panicked = std::panic::AssertUnwindSafe(super::transaction_on_handle(
            &mut conn,
            |c| -> Result<(), _> {
                insert(c, "d")?;
                panic!("a bug")
            },
        ))
        .catch_unwind()
        .await;
        assert!(panicked.is_err());
        assert_eq!(count("d").fetch_one(&mut *conn).await.unwrap(), 0);

        // sqlx's transactions go on as before, and one on the handle
        // inside them is refused without harm.
        let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
        let nested = super::transaction_on_handle(&mut tx, |c| insert(c, "e"));
        assert!(nested.await.is_err());
        sqlx::query("INSERT INTO resources (provider, kind, id, first_seen_at) VALUES ('p', 'k', 'f', 'now')")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count("e").fetch_one(&db.read).await.unwrap(), 0);
        assert_eq!(count("f").fetch_one(&db.read).await.unwrap(), 1);
        drop(conn);
        db.close().await;
    }

    /// Syncs asked for while one runs wait their turn as tasks, not each
    /// blocked on a thread of its own: a disk that stalls does not pile up
    /// threads (and their memory).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn syncs_wait_their_turn_without_a_thread_each() {
        let (_dir, db) = temp_db().await;
        let syncs = (0..32).map(|_| db.sync_commits());
        for synced in futures_util::future::join_all(syncs).await {
            synced.unwrap();
        }
        let wal = db.wal_sync.as_ref().unwrap();
        assert_eq!(wal.threads.1.load(std::sync::atomic::Ordering::SeqCst), 1);
        db.close().await;
    }

    /// Syncs asked for while one runs share the next one: it begins after
    /// each of them was asked for, so it covers what each committed before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn syncs_asked_for_while_one_runs_share_the_next() {
        let (_dir, db) = temp_db().await;
        let wal = db.wal_sync.clone().unwrap();
        let before = wal.synced.load(std::sync::atomic::Ordering::SeqCst);
        let syncs = (0..32).map(|_| db.sync_commits());
        for synced in futures_util::future::join_all(syncs).await {
            synced.unwrap();
        }
        let made = wal.synced.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert!((1..=2).contains(&made), "{made} syncs for 32 callers");
        // Asked for after those ended: a sync of its own.
        db.sync_commits().await.unwrap();
        assert_eq!(
            wal.synced.load(std::sync::atomic::Ordering::SeqCst) - before,
            made + 1
        );
        db.close().await;
    }

    /// What is committed reaches the database file well before the WAL
    /// holds enough for the writer to checkpoint on its own (40 MiB): the
    /// checkpointer copies it, within a few of its passes.
    #[tokio::test]
    async fn the_checkpointer_copies_the_wal_into_the_database_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let db = Db::open(&path, &Default::default()).await.unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        // 2 MiB written (500 pages: far below the writer's 10,000), in one
        // transaction.
        let mut tx = db.begin().await.unwrap();
        for i in 0..256 {
            sqlx::query(
                "INSERT INTO resources (provider, kind, id, first_seen_at, snapshot)
                 VALUES ('p', 'k', ?, 'now', ?)",
            )
            .bind(i.to_string())
            .bind("x".repeat(8_192))
            .execute(&mut **tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while size() < 2 << 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file is still {} bytes",
                size()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        db.close().await;
    }

    /// A reader in another process that holds its snapshot (an `sqlite3`
    /// shell left in a read transaction) lets the WAL grow; once it is gone
    /// and the checkpoints catch up, the WAL file is cut back to
    /// `database.wal_size_limit_bytes` instead of keeping its largest size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_cut_back_once_a_long_reader_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let limit = 1 << 20;
        let cfg = crate::config::DatabaseConfig {
            wal_size_limit_bytes: limit,
            ..Default::default()
        };
        let db = Db::open(&path, &cfg).await.unwrap();
        let wal_size = || {
            std::fs::metadata(dir.path().join("x.db-wal"))
                .unwrap()
                .len()
        };
        let reader = rusqlite::Connection::open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT COUNT(*) FROM resources;")
            .unwrap();
        let write = |from: usize, rows: usize| {
            let db = db.clone();
            async move {
                for i in from..from + rows {
                    sqlx::query(
                        "INSERT INTO resources (provider, kind, id, first_seen_at, snapshot)
                         VALUES ('p', 'k', ?, 'now', ?)",
                    )
                    .bind(i.to_string())
                    .bind("x".repeat(64 << 10))
                    .execute(&db.write)
                    .await
                    .unwrap();
                }
            }
        };
        // 8 MiB, each row its own commit, while the reader holds on.
        write(0, 128).await;
        assert!(wal_size() > 4 * limit, "the WAL is {} bytes", wal_size());
        drop(reader);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut next = 128;
        while wal_size() > limit {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL is still {} bytes",
                wal_size()
            );
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            write(next, 1).await;
            next += 1;
        }
        db.close().await;
    }

    /// Several processes (here: pools) opening a brand-new database at once
    /// all get it migrated: none fails on a table another one just created,
    /// nor on the lock another one holds while it switches the file to WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_first_opens_all_succeed() {
        for round in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("fresh.db");
            let opens: Vec<_> = (0..4)
                .map(|_| {
                    let path = path.clone();
                    tokio::spawn(async move {
                        Db::open(&path, &crate::config::DatabaseConfig::default()).await
                    })
                })
                .collect();
            for open in opens {
                let db = open
                    .await
                    .unwrap()
                    .unwrap_or_else(|e| panic!("round {round}: {e}"));
                db.close().await;
            }
        }
    }

    /// The WAL file synced is the one opened first, which the writer
    /// commits to: another file at its path (a new inode) fails the sync
    /// until the first is back, and a missing one is an error, never a
    /// silent success.
    #[test]
    fn wal_sync_keeps_to_the_file_it_opened_first() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("x.db");
        let wal_path = dir.path().join("x.db-wal");
        assert!(WalSync::open(&db).is_err(), "no WAL file yet");

        std::fs::write(&wal_path, b"first").unwrap();
        let wal = WalSync::open(&db).unwrap();
        let inode = |w: &WalSync| w.file.lock().unwrap().as_ref().map(|(_, ino)| *ino);
        let first = inode(&wal);
        assert_eq!(first, Some(std::fs::metadata(&wal_path).unwrap().ino()));

        // The first moved away and a new file in its place (made while the
        // first still exists, so the inode number cannot be reused).
        let moved = dir.path().join("x.db-wal.moved");
        std::fs::rename(&wal_path, &moved).unwrap();
        std::fs::write(&wal_path, b"second").unwrap();
        let replaced = wal.sync().unwrap_err();
        assert_eq!(replaced.kind(), std::io::ErrorKind::Other);
        assert!(!wal.failed(), "no fdatasync failed");
        assert_eq!(inode(&wal), first);

        std::fs::rename(&moved, &wal_path).unwrap();
        wal.sync().unwrap();

        std::fs::remove_file(&wal_path).unwrap();
        assert_eq!(wal.sync().unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }
}
