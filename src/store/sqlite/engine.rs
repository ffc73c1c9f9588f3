//! [`Storage`] on SQLite: each operation is one of this folder's functions
//! on the writer or the readers, with the writer's turn taken the way the
//! rest of the engine takes it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::Sqlite;

use super::{alerts, cancels, inbox, outcomes, prune, record, refusals, resources};
use super::{transaction_on_handle, Db, WriterHold};
use crate::config::{Config, DatabaseConfig};
use crate::domain::alerts::Changes;
use crate::domain::observe::{Recorded, Trigger};
use crate::domain::outcome::{Decided, Written};
use crate::providers::Observation;
use crate::store::model::*;
use crate::store::queries;
use crate::store::{
    Added, CancelRecord, KeyFor, OpenedCancel, QueryError, Storage, StoreError, WriterTurn,
};
use crate::time::Timestamp;

/// The SQLite engine behind [`Storage`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    db: Db,
    /// When the leases of processes that are gone were last looked for.
    holders_checked: Arc<Mutex<Option<Instant>>>,
}

/// How often a claim first looks for leases whose holder is gone.
const HOLDERS_EVERY: Duration = Duration::from_secs(1);

impl SqliteStore {
    /// Opens (creating and migrating) the database file at `path`.
    pub async fn open(path: &Path, cfg: &DatabaseConfig) -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore {
            db: Db::open(path, cfg).await?,
            holders_checked: Arc::default(),
        })
    }

    /// Opens an existing database for reading only (see [`Db::open_read_only`]).
    pub async fn open_read_only(
        path: &Path,
        cfg: &DatabaseConfig,
    ) -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore {
            db: Db::open_read_only(path, cfg).await?,
            holders_checked: Arc::default(),
        })
    }

    /// True at most once every [`HOLDERS_EVERY`]: time to look for leases
    /// whose holder is gone.
    fn holders_due(&self) -> bool {
        let mut checked = self
            .holders_checked
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let due = checked.map_or(true, |at| at.elapsed() >= HOLDERS_EVERY);
        if due {
            *checked = Some(Instant::now());
        }
        due
    }

    /// The engine's own handle, for this engine's tests.
    pub fn db(&self) -> &Db {
        &self.db
    }
}

/// The writer connection, held from before a group commit gathers its
/// batch until it has committed.
struct Turn {
    conn: PoolConnection<Sqlite>,
    _hold: WriterHold,
}

#[async_trait::async_trait]
impl Storage for SqliteStore {
    async fn ping(&self) -> bool {
        self.db.ping().await
    }

    fn sync_failed(&self) -> bool {
        self.db.sync_failed()
    }

    async fn write_trouble(&self) -> Option<crate::store::Unavailable> {
        self.db.write_trouble().await
    }

    async fn close(&self) {
        self.db.close().await
    }

    fn engine(&self) -> &dyn std::any::Any {
        self
    }

    async fn backup(&self, to: &Path) -> Result<(), StoreError> {
        backup_into(&self.db, to).await
    }

    fn migrations(&self) -> Vec<i64> {
        super::MIGRATOR.iter().map(|m| m.version).collect()
    }

    async fn writer_turn(&self) -> Result<WriterTurn, StoreError> {
        let conn = {
            // Recorder batches yield to an acknowledgement that waits.
            let _waiting = self.db.ack_waiting();
            self.db.write.acquire().await?
        };
        Ok(WriterTurn(Box::new(Turn {
            conn,
            _hold: WriterHold::start("acknowledge"),
        })))
    }

    async fn accept(
        &self,
        turn: WriterTurn,
        deliveries: &[(&NewDelivery, Option<&str>)],
        refusals: &[&Refusal],
    ) -> Result<Vec<Option<Added>>, StoreError> {
        let mut turn = turn
            .0
            .downcast::<Turn>()
            .map_err(|_| StoreError::Invariant("a writer turn of another engine"))?;
        let added = self
            .db
            .watch(insert_batch(&mut turn.conn, deliveries, refusals).await)?;
        // The writer back first: the probe of write_trouble takes it.
        drop(turn);
        self.db.write_trouble().await;
        Ok(added
            .into_iter()
            .map(|a| {
                a.map(|row| Added {
                    id: row.id,
                    leased: row.leased,
                })
            })
            .collect())
    }

    async fn make_durable(&self) -> Result<(), StoreError> {
        self.db.watch(self.db.sync_commits().await)
    }

    async fn insert_deliveries(&self, deliveries: &[NewDelivery]) -> Result<usize, StoreError> {
        let new = self.db.watch(
            async {
                let mut tx = self.db.begin().await?;
                let mut new = 0;
                for d in deliveries {
                    if inbox::insert(&mut tx, d).await? {
                        new += 1;
                    }
                }
                tx.commit().await?;
                Ok(new)
            }
            .await,
        )?;
        self.db.write_trouble().await;
        Ok(new)
    }

    // A claim that succeeds says little about the disk (it changes rows in
    // place): only writes that store something new end the trouble.
    async fn claim(
        &self,
        now: &str,
        lease_until: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        self.db.watch(
            async {
                let mut conn = self.db.acquire_for("claim").await?;
                if self.holders_due() {
                    inbox::release_gone_holders(&mut conn).await?;
                }
                inbox::claim_batch(&mut conn, now, lease_until, limit).await
            }
            .await,
        )
    }

    async fn claim_one(
        &self,
        id: i64,
        now: &str,
        lease_until: &str,
    ) -> Result<Option<Delivery>, StoreError> {
        let claimed = inbox::claim_one(&self.db.write, id, now, lease_until).await;
        self.db.watch(claimed)
    }

    async fn unclaim(&self, claims: &[(i64, &str)]) -> Result<u64, StoreError> {
        self.db.watch(
            async {
                let mut tx = self.db.begin().await?;
                let n = inbox::unclaim(&mut tx, claims).await?;
                tx.commit().await?;
                Ok(n)
            }
            .await,
        )
    }

    async fn requeue(&self, id: i64, now: &str) -> Result<bool, StoreError> {
        let requeued = inbox::requeue(&self.db.write, id, now).await;
        self.db.watch(requeued)
    }

    async fn delivery(&self, id: i64) -> Result<Option<Delivery>, StoreError> {
        Ok(inbox::get(&self.db.write, id).await?)
    }

    async fn delivery_by_key(&self, key: &str) -> Result<Option<Delivery>, StoreError> {
        Ok(inbox::by_key(&self.db.write, key).await?)
    }

    async fn inbox_depth(&self) -> Result<(i64, Option<String>), StoreError> {
        Ok(inbox::depth(&self.db.read).await?)
    }

    async fn newest_received(
        &self,
        provider: &str,
        since: &str,
    ) -> Result<Vec<(Option<String>, String)>, StoreError> {
        Ok(inbox::newest_received(&self.db.read, provider, since).await?)
    }

    async fn inbox_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(inbox::count_by_state(&self.db.read).await?)
    }

    async fn record_outcomes(
        &self,
        config: &Config,
        batch: &[Decided],
    ) -> Result<(Vec<Option<Written>>, Changes), StoreError> {
        let written = self
            .db
            .watch(outcomes::write_batch(&self.db, config, batch).await)?;
        self.db.write_trouble().await;
        Ok(written)
    }

    async fn record_observation(
        &self,
        config: &Config,
        obs: &Observation,
        trigger: &Trigger,
        context: Option<&str>,
        now: Timestamp,
    ) -> Result<(Recorded, Changes), StoreError> {
        self.db.watch(
            async {
                let mut tx = self.db.begin().await?;
                let mut changes = Changes::new();
                let recorded =
                    record::record(&mut tx, config, obs, trigger, context, now, &mut changes)
                        .await?;
                tx.commit().await?;
                Ok((recorded, changes))
            }
            .await,
        )
    }

    async fn due_for_reconcile(&self, now: &str, limit: i64) -> Result<Vec<Resource>, StoreError> {
        Ok(resources::due_for_reconcile(&self.db.read, now, limit).await?)
    }

    async fn mark_not_found(&self, found: &[&Resource], now: &str) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for r in found {
            resources::mark_not_found(&mut tx, r.rid, now, r.next_reconcile_at.as_deref()).await?;
        }
        Ok(tx.commit().await?)
    }

    async fn reconcile_failed(&self, next: &[(i64, String)]) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        for (rid, at) in next {
            resources::reconcile_failed(&mut tx, *rid, at).await?;
        }
        Ok(tx.commit().await?)
    }

    async fn mark_reconciled(&self, rid: i64, next: Option<&str>) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        resources::mark_reconciled(&mut tx, rid, next).await?;
        Ok(tx.commit().await?)
    }

    async fn open_cancel(
        &self,
        (provider, kind, id): (&str, &str, &str),
        requested_by: &str,
        now: &str,
        key_for: KeyFor<'_>,
    ) -> Result<OpenedCancel, StoreError> {
        let mut tx = self.db.begin().await?;
        let rid = resources::ensure(&mut tx, provider, kind, id, None, None, now)
            .await?
            .rid;
        let (context, status) = resources::get(&mut tx, provider, kind, id)
            .await?
            .map(|r| (r.context, r.status))
            .unwrap_or_default();
        let key = key_for(cancels::burnt_keys(&mut tx, provider, kind, id).await?);
        let request_id =
            cancels::insert(&mut tx, provider, kind, id, &key, requested_by, now).await?;
        resources::set_cancel_requested(&mut tx, rid, now).await?;
        tx.commit().await?;
        Ok(OpenedCancel {
            request_id,
            rid,
            idempotency_key: key,
            context,
            status,
        })
    }

    async fn answer_cancel(
        &self,
        request_id: i64,
        answer: &CancelRecord<'_>,
        now: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.db.begin().await?;
        cancels::answer(
            &mut tx,
            request_id,
            answer.http_status,
            answer.outcome,
            answer.error_code,
            answer.body,
            now,
        )
        .await?;
        Ok(tx.commit().await?)
    }

    async fn scan_alerts(&self, config: &Config, now: Timestamp) -> Result<Changes, StoreError> {
        let scanned = async {
            let mut tx = self.db.begin().await?;
            let changes = crate::store::alerting::scan::scan(&mut *tx, config, now).await?;
            tx.commit().await?;
            Ok(changes)
        }
        .await;
        self.db.watch(scanned)
    }

    async fn outbox_pending(&self) -> Result<Vec<Backlog>, StoreError> {
        Ok(alerts::pending_by_sink(&self.db.read).await?)
    }

    async fn open_alerts_by_rule(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(alerts::open_by_rule(&self.db.read).await?)
    }

    async fn outbox_due(
        &self,
        sink: &str,
        now: &str,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        Ok(alerts::due(&self.db.read, sink, now, limit).await?)
    }

    async fn outbox_delivered(&self, row: i64, attempt: &Attempt) -> Result<(), StoreError> {
        let _slot = self.db.write_slot().await;
        Ok(alerts::mark_delivered(&self.db.write, row, attempt).await?)
    }

    async fn outbox_retry(
        &self,
        row: i64,
        attempt: &Attempt,
        next_attempt_at: &str,
    ) -> Result<(), StoreError> {
        let _slot = self.db.write_slot().await;
        Ok(alerts::reschedule(&self.db.write, row, attempt, next_attempt_at).await?)
    }

    async fn prune_deliveries(&self, provider: &str, cutoff: &str) -> Result<u64, StoreError> {
        Ok(prune::delete_deliveries(&self.db.write, provider, cutoff).await?)
    }

    async fn prune_bodies(&self, cutoff: &str) -> Result<u64, StoreError> {
        Ok(prune::drop_bodies(&self.db.write, cutoff).await?)
    }

    async fn prune_refusals(&self, cutoff: &str) -> Result<u64, StoreError> {
        Ok(prune::delete_refusals(&self.db.write, cutoff).await?)
    }

    async fn history(&self, resource_id: &str) -> Result<Option<History>, QueryError> {
        queries::history(&self.db.read, resource_id).await
    }

    async fn transitions(
        &self,
        filter: &TransitionFilter,
        page: &PageRequest,
    ) -> Result<Page<TransitionView>, QueryError> {
        queries::transitions(&self.db.read, filter, page).await
    }

    async fn explain_transitions(
        &self,
        filter: &TransitionFilter,
        page: &PageRequest,
    ) -> Result<Vec<String>, QueryError> {
        queries::explain_transitions(&self.db.read, filter, page).await
    }

    async fn alerts(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> Result<Page<AlertView>, QueryError> {
        queries::alerts(&self.db.read, filter, page).await
    }

    async fn events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, QueryError> {
        queries::events(&self.db.read, filter, page).await
    }

    async fn unsettled_since(&self, before: &str, limit: i64) -> Result<Vec<Resource>, QueryError> {
        queries::unsettled_since(&self.db.read, before, limit).await
    }

    async fn deliveries_of(&self, resource_id: &str, limit: i64) -> Result<Vec<Event>, QueryError> {
        queries::deliveries_of(&self.db.read, resource_id, limit).await
    }
}

/// One group commit of deliveries and refusal records.
///
/// A batch that fits in one statement (most do) runs it alone: SQLite
/// commits a lone statement by itself, all of it or nothing, and `BEGIN`
/// and `COMMIT` would be two more round trips to the connection's thread
/// while the writer is held. One with more deliveries than a statement
/// takes runs whole on the writer's handle ([`transaction_on_handle`]):
/// `BEGIN`, a prepared one-row insert stepped per row, and `COMMIT`, for one
/// round trip however large the batch. Smaller batches keep the statements
/// sqlx has cached: preparing the one-row insert anew costs more than the
/// round trip it saves, and a flood's refusals go faster many to a
/// statement than one at a time.
async fn insert_batch(
    conn: &mut sqlx::SqliteConnection,
    rows: &[(&NewDelivery, Option<&str>)],
    refusals: &[&Refusal],
) -> Result<Vec<Option<inbox::Inserted>>, StoreError> {
    let now = crate::time::now_str();
    let statements = rows.len().div_ceil(inbox::ROWS_PER_INSERT) + refusals::statements(refusals);
    if rows.len() > inbox::ROWS_PER_INSERT {
        transaction_on_handle(conn, |conn| {
            let added = inbox::insert_rows(conn, rows, &now)?;
            refusals::insert_rows(conn, refusals)?;
            Ok(added)
        })
        .await
    } else if statements <= 1 {
        // At most one of the two runs a statement.
        let added = inbox::insert_many(conn, rows, &now).await?;
        refusals::insert_many(conn, refusals).await?;
        Ok(added)
    } else {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let added = inbox::insert_many(&mut tx, rows, &now).await?;
        refusals::insert_many(&mut tx, refusals).await?;
        tx.commit().await?;
        Ok(added)
    }
}

/// `VACUUM INTO` a new file, made here first and empty (SQLite writes into
/// an empty file), so that an existing one is refused by the operating
/// system at creation rather than by a check a moment before. SQLite copies
/// one snapshot (a read transaction on a reader: the writer and the
/// checkpoints go on meanwhile) and does not sync what it wrote: the file and
/// its folder are synced here before the backup counts as made. A failed
/// backup leaves no file behind.
async fn backup_into(db: &Db, to: &Path) -> Result<(), StoreError> {
    let failed = |source| StoreError::Backup {
        path: to.display().to_string(),
        source,
    };
    let target = to.to_str().ok_or_else(|| {
        failed(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the path is not valid UTF-8",
        ))
    })?;
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => failed(std::io::Error::new(
                e.kind(),
                "it exists already, and a backup never overwrites a file",
            )),
            _ => failed(e),
        })?;
    let copied = async {
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&db.read)
            .await?;
        file.sync_all().await.map_err(failed)?;
        let folder = to.parent().filter(|d| !d.as_os_str().is_empty());
        let folder = folder.unwrap_or(Path::new("."));
        let folder = tokio::fs::File::open(folder).await.map_err(failed)?;
        folder.sync_all().await.map_err(failed)?;
        Ok(())
    }
    .await;
    if copied.is_err() {
        let _ = tokio::fs::remove_file(to).await;
    }
    copied
}
