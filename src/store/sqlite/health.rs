//! Whether the writer can write now, and keeping its connection usable
//! after a write failed in a way that ends SQLite's transaction on its own.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::{Connection, SqliteConnection, TransactionManager};

use crate::store::{StoreError, Unavailable};

/// How often, at most, [`WriteHealth::probe_due`] lets a probe write run
/// while writes fail.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Writes failing for a cause outside the daemon (see [`Unavailable`]),
/// since when; logged once when it starts and once when it ends, not once
/// per failed write (a full disk fails thousands of them a minute).
#[derive(Debug, Default)]
pub(super) struct WriteHealth {
    trouble: Mutex<Option<Trouble>>,
}

#[derive(Debug, Clone, Copy)]
struct Trouble {
    cause: Unavailable,
    since: Instant,
    probed: Option<Instant>,
}

impl WriteHealth {
    /// Notes a write's result: a failure for a cause outside the daemon
    /// starts (or keeps) the trouble; a success says nothing, since a write
    /// that needed no new space can succeed on a full disk.
    pub(super) fn note<T>(&self, result: &Result<T, StoreError>) {
        let Err(e) = result else { return };
        let Some(cause) = e.unavailable() else {
            return;
        };
        metrics::counter!("cancelwatch_database_write_failures_total", "cause" => cause.as_str())
            .increment(1);
        let mut trouble = self.trouble.lock().expect("never poisoned");
        match trouble.as_mut() {
            Some(t) => t.cause = cause,
            None => {
                tracing::error!(
                    cause = cause.as_str(),
                    error = %e,
                    "{}; deliveries wait (acknowledged ones are kept) until it can write again",
                    cause.describe()
                );
                metrics::gauge!("cancelwatch_database_writable").set(0.0);
                *trouble = Some(Trouble {
                    cause,
                    since: Instant::now(),
                    probed: None,
                });
            }
        }
    }

    /// The probe write succeeded: the trouble, if any, is over.
    pub(super) fn wrote(&self) {
        let mut trouble = self.trouble.lock().expect("never poisoned");
        if let Some(t) = trouble.take() {
            tracing::warn!(
                cause = t.cause.as_str(),
                after_secs = t.since.elapsed().as_secs(),
                "the database takes writes again; processing resumes"
            );
            metrics::gauge!("cancelwatch_database_writable").set(1.0);
        }
    }

    /// The trouble now, if any.
    pub(super) fn current(&self) -> Option<Unavailable> {
        self.trouble
            .lock()
            .expect("never poisoned")
            .map(|t| t.cause)
    }

    /// True when writes fail and no probe ran for [`PROBE_EVERY`]; the
    /// probe is counted as run.
    pub(super) fn probe_due(&self) -> bool {
        let mut trouble = self.trouble.lock().expect("never poisoned");
        match trouble.as_mut() {
            Some(t) if !t.probed.is_some_and(|at| at.elapsed() < PROBE_EVERY) => {
                t.probed = Some(Instant::now());
                true
            }
            _ => false,
        }
    }
}

/// The write probe, run in a transaction of its own on the writer's
/// handle: stores a row that needs pages of its own (a 64 KiB value: new
/// pages, not room left on an existing one) and takes it out again; the
/// commit then writes the pages it touched to the WAL. Readers never see
/// the row; what it proves is that the database can grow and its WAL be
/// written, as a real write needs.
pub(super) fn probe(handle: &rusqlite::Connection) -> Result<(), StoreError> {
    handle
        .execute_batch(
            "INSERT INTO refusals (provider, reason, message, http_status, received_at)
                 VALUES ('', 'write_probe', zeroblob(65536), 0, '');
             DELETE FROM refusals WHERE rowid = last_insert_rowid();",
        )
        .map_err(super::direct_error)
}

/// Called by the pool as the writer connection comes back to it. SQLite
/// ends a transaction on its own when a statement or the `COMMIT` fails on
/// a full disk, an I/O error or lack of memory; sqlx does not know that and
/// still counts the connection as inside it, its `ROLLBACK` then fails, and
/// every later `BEGIN` would be refused ("attempted to call begin_with at
/// non-zero transaction depth"). Here the two are brought back in line: a
/// transaction SQLite ended is opened again just for sqlx's `ROLLBACK` to
/// end it, which resets sqlx's count. A connection left in any other state
/// sqlx cannot end is closed (`false`) and the pool opens a new one.
pub(super) async fn settle(conn: &mut SqliteConnection) -> Result<bool, sqlx::Error> {
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    // The rollback of a transaction dropped without commit is queued on the
    // connection's thread: let it run first.
    conn.ping().await?;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    let depth = <sqlx::Sqlite as sqlx::Database>::TransactionManager::get_transaction_depth(conn);
    let reopened = {
        let mut locked = conn.lock_handle().await?;
        // SAFETY: the handle is open and ours alone while `locked` lives, and
        // `handle` (which does not close it) is dropped before it.
        let handle = unsafe { rusqlite::Connection::from_handle(locked.as_raw_handle().as_ptr()) };
        let reopened = handle.is_ok_and(|handle| {
            // Only a transaction SQLite ended on its own (the handle is in
            // autocommit) at sqlx's first level is opened again; savepoints
            // sqlx thinks open are not worth the care.
            depth == 1 && handle.is_autocommit() && handle.execute_batch("BEGIN").is_ok()
        });
        drop(locked);
        reopened
    };
    if !reopened {
        tracing::warn!(
            depth,
            "the writer connection was left inside a transaction; opening a new one"
        );
        return Ok(false);
    }
    <sqlx::Sqlite as sqlx::Database>::TransactionManager::rollback(conn).await?;
    tracing::debug!("the writer connection is back outside any transaction");
    Ok(!conn.is_in_transaction())
}

#[cfg(test)]
mod tests {
    use crate::store::sqlite::Db;

    /// A write transaction that fails on a full disk (SQLite's page limit
    /// on the writer) leaves the writer usable: the next transaction
    /// begins, and once there is room again it commits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_failed_on_a_full_disk_leaves_the_writer_usable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db"), &Default::default())
            .await
            .unwrap();
        let limit = |pages: &'static str| {
            let db = db.clone();
            async move {
                let mut writer = db.write.acquire().await.unwrap();
                sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
                    .execute(&mut *writer)
                    .await
                    .unwrap();
            }
        };
        let insert = "INSERT INTO refusals (provider, reason, message, http_status, received_at)
                      VALUES ('p', 'r', zeroblob(3000), 400, 'now')";
        limit("40").await;
        for round in 0..3 {
            let mut tx = db
                .begin()
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            let mut failed = None;
            for _ in 0..1_000 {
                if let Err(e) = sqlx::query(insert).execute(&mut **tx).await {
                    failed = Some(e);
                    break;
                }
            }
            let failed = crate::store::StoreError::from(failed.expect("the page limit is reached"));
            assert_eq!(failed.unavailable(), Some(crate::store::Unavailable::Full));
            let _ = tx.rollback().await;
        }
        limit("1073741823").await;
        let mut tx = db.begin().await.unwrap();
        sqlx::query(insert).execute(&mut **tx).await.unwrap();
        tx.commit().await.unwrap();
        db.close().await;
    }
}
