//! [`Storage`] on PostgreSQL.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgPool, Postgres};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::keeper::{self, Standing};
use super::{alerting, inbox, outcomes, reads, record};
use crate::config::{Config, DatabaseConfig};
use crate::domain::alerts::Changes;
use crate::domain::observe::{Recorded, Trigger};
use crate::domain::outcome::{Decided, Written};
use crate::providers::Observation;
use crate::store::model::*;
use crate::store::{
    Added, CancelRecord, KeyFor, OpenedCancel, QueryError, Storage, StoreError, WriterTurn,
};
use crate::time::Timestamp;

/// The PostgreSQL engine behind [`Storage`]: one pool, and the replica's
/// own connection ([`keeper`]).
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// This replica, as lease holder and in `replicas`.
    owner: Uuid,
    standing: Arc<Standing>,
    /// One acknowledgement commit at a time from this replica: what arrives
    /// while one commits gathers into the next (the group commit).
    ack_turn: Arc<Mutex<()>>,
    stop: CancellationToken,
    /// The keeper's task, awaited at close: the registration is gone and
    /// the connection closed before `close` returns.
    keeper: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// Opened read-only: the keeper is not started, nothing is written.
    read_only: bool,
}

impl PgStore {
    /// Connects, migrates, and starts the replica's keeper.
    pub async fn open(url: &str, cfg: &DatabaseConfig) -> Result<PgStore, StoreError> {
        let pool = super::connect(url, cfg).await?;
        super::migrate(&pool).await?;
        let store = PgStore::new(pool, false);
        let keeper = tokio::spawn(keeper::run(
            url.to_string(),
            store.owner,
            store.standing.clone(),
            store.stop.clone(),
        ));
        *store.keeper.lock().unwrap_or_else(|e| e.into_inner()) = Some(keeper);
        // Registered before the first lease is taken, so no other replica
        // mistakes this one's leases for a dead one's.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.connect_timeout_secs);
        while !store.standing.registered.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() > deadline {
                store.close().await;
                return Err(StoreError::Invariant(
                    "the replica's own connection could not be registered in time",
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(store)
    }

    /// Connects and migrates, and no more: a database being filled by a
    /// tool (`migrate --from`), not served.
    pub async fn open_schema_only(url: &str, cfg: &DatabaseConfig) -> Result<PgStore, StoreError> {
        let pool = super::connect(url, cfg).await?;
        super::migrate(&pool).await?;
        Ok(PgStore::new(pool, true))
    }

    /// Connects to an existing database for reading only: a schema this
    /// binary does not match is refused.
    pub async fn open_read_only(url: &str, cfg: &DatabaseConfig) -> Result<PgStore, StoreError> {
        let pool = super::connect(url, cfg).await?;
        if let Err(e) = super::exactly_this_one(&pool).await {
            pool.close().await;
            return Err(e);
        }
        Ok(PgStore::new(pool, true))
    }

    fn new(pool: PgPool, read_only: bool) -> PgStore {
        PgStore {
            pool,
            owner: Uuid::new_v4(),
            standing: Arc::default(),
            ack_turn: Arc::default(),
            stop: CancellationToken::new(),
            keeper: Arc::default(),
            read_only,
        }
    }

    /// The pool, for this engine's tests and tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// This replica's id, as it holds leases.
    pub fn owner(&self) -> Uuid {
        self.owner
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, Postgres>, StoreError> {
        Ok(self.pool.begin().await?)
    }
}

/// A connection of the pool and this replica's acknowledgement turn.
struct Turn {
    conn: PoolConnection<Postgres>,
    _turn: OwnedMutexGuard<()>,
}

#[async_trait::async_trait]
impl Storage for PgStore {
    async fn ping(&self) -> bool {
        let ping = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(
            tokio::time::timeout(Duration::from_secs(2), ping).await,
            Ok(Ok(_))
        ) && (self.read_only || self.standing.registered.load(Ordering::SeqCst))
    }

    fn sync_failed(&self) -> bool {
        // The server makes commits durable; a failure there is its own
        // (it stops rather than acknowledge a commit it could not sync).
        false
    }

    async fn write_trouble(&self) -> Option<crate::store::Unavailable> {
        // The server reports its own trouble: every commit's error is
        // classified where it is answered (`StoreError::unavailable`), and
        // readiness fails through `ping` while the server cannot be reached.
        None
    }

    fn is_leader(&self) -> bool {
        self.standing.leader.load(Ordering::SeqCst)
    }

    async fn live_replicas(&self) -> Result<u32, StoreError> {
        let alive: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM replicas r WHERE {}",
            keeper::alive("r")
        ))
        .fetch_one(&self.pool)
        .await?;
        Ok(u32::try_from(alive).unwrap_or(u32::MAX).max(1))
    }

    async fn close(&self) {
        self.stop.cancel();
        let keeper = self.keeper.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(keeper) = keeper {
            // The keeper gives up its registration and leadership as it ends.
            let _ = keeper.await;
        }
        self.pool.close().await;
    }

    fn migrations(&self) -> Vec<i64> {
        super::MIGRATOR.iter().map(|m| m.version).collect()
    }

    async fn backup(&self, _to: &Path) -> Result<(), StoreError> {
        Err(StoreError::Unsupported(
            "`cancelwatch backup` copies a SQLite file; back a PostgreSQL database up with pg_dump or the server's own backups",
        ))
    }

    fn engine(&self) -> &dyn std::any::Any {
        self
    }

    async fn writer_turn(&self) -> Result<WriterTurn, StoreError> {
        let turn = self.ack_turn.clone().lock_owned().await;
        let conn = self.pool.acquire().await?;
        Ok(WriterTurn(Box::new(Turn { conn, _turn: turn })))
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
        // Acknowledged only once on disk: the connection's commits wait for
        // their WAL flush (`synchronous_commit = on`, see `options`).
        let mut tx = turn.conn.begin().await?;
        let added = if deliveries.is_empty() {
            Vec::new()
        } else {
            inbox::insert_batch(&mut tx, deliveries, self.owner).await?
        };
        inbox::insert_refusals(&mut tx, refusals).await?;
        tx.commit().await?;
        Ok(added)
    }

    async fn make_durable(&self) -> Result<(), StoreError> {
        // Each acknowledgement commit was durable when it returned.
        Ok(())
    }

    async fn insert_deliveries(&self, deliveries: &[NewDelivery]) -> Result<usize, StoreError> {
        let mut tx = self.begin().await?;
        let rows: Vec<(&NewDelivery, Option<&str>)> =
            deliveries.iter().map(|d| (d, None)).collect();
        let added = inbox::insert_batch(&mut tx, &rows, self.owner).await?;
        tx.commit().await?;
        Ok(added.iter().filter(|a| a.is_some()).count())
    }

    async fn claim(
        &self,
        now: &str,
        lease_until: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut tx = self.begin().await?;
        let claimed = inbox::claim(&mut tx, now, lease_until, limit, self.owner, None).await?;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn claim_one(
        &self,
        id: i64,
        now: &str,
        lease_until: &str,
    ) -> Result<Option<Delivery>, StoreError> {
        let mut tx = self.begin().await?;
        let claimed = inbox::claim(&mut tx, now, lease_until, 1, self.owner, Some(id)).await?;
        tx.commit().await?;
        Ok(claimed.into_iter().next())
    }

    async fn unclaim(&self, claims: &[(i64, &str)]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let mut given_back = 0;
        for (id, lease) in claims {
            if inbox::release(&mut tx, *id, lease, self.owner, None, None).await? {
                given_back += 1;
            }
        }
        tx.commit().await?;
        Ok(given_back)
    }

    async fn requeue(&self, id: i64, now: &str) -> Result<bool, StoreError> {
        let mut conn = self.pool.acquire().await?;
        inbox::requeue(&mut conn, id, now).await
    }

    async fn delivery(&self, id: i64) -> Result<Option<Delivery>, StoreError> {
        reads::get(&self.pool, id).await
    }

    async fn delivery_by_key(&self, key: &str) -> Result<Option<Delivery>, StoreError> {
        reads::by_key(&self.pool, key).await
    }

    async fn inbox_depth(&self) -> Result<(i64, Option<String>), StoreError> {
        reads::depth(&self.pool).await
    }

    async fn newest_received(
        &self,
        provider: &str,
        since: &str,
    ) -> Result<Vec<(Option<String>, String)>, StoreError> {
        reads::newest_received(&self.pool, provider, since).await
    }

    async fn inbox_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        reads::count_by_state(&self.pool).await
    }

    async fn record_outcomes(
        &self,
        config: &Config,
        batch: &[Decided],
    ) -> Result<(Vec<Option<Written>>, Changes), StoreError> {
        let mut conn = self.pool.acquire().await?;
        outcomes::write_batch(&mut conn, self.owner, config, batch).await
    }

    async fn record_observation(
        &self,
        config: &Config,
        obs: &Observation,
        trigger: &Trigger,
        context: Option<&str>,
        now: Timestamp,
    ) -> Result<(Recorded, Changes), StoreError> {
        let mut tx = self.begin().await?;
        let mut changes = Changes::new();
        let recorded =
            record::record(&mut tx, config, obs, trigger, context, now, &mut changes).await?;
        tx.commit().await?;
        Ok((recorded, changes))
    }

    async fn due_for_reconcile(&self, now: &str, limit: i64) -> Result<Vec<Resource>, StoreError> {
        reads::due_for_reconcile(&self.pool, now, limit).await
    }

    async fn mark_not_found(&self, found: &[&Resource], now: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        for r in found {
            sqlx::query(
                "UPDATE resources SET not_found = true, last_observed_at = $1, next_reconcile_at = $2
                 WHERE rid = $3",
            )
            .bind(now)
            .bind(r.next_reconcile_at.as_deref())
            .bind(r.rid)
            .execute(&mut *tx)
            .await?;
        }
        Ok(tx.commit().await?)
    }

    async fn reconcile_failed(&self, next: &[(i64, String)]) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        for (rid, at) in next {
            sqlx::query(
                "UPDATE resources SET reconcile_failures = reconcile_failures + 1,
                        next_reconcile_at = $1
                 WHERE rid = $2",
            )
            .bind(at)
            .bind(rid)
            .execute(&mut *tx)
            .await?;
        }
        Ok(tx.commit().await?)
    }

    async fn mark_reconciled(&self, rid: i64, next: Option<&str>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE resources SET next_reconcile_at = $1, reconcile_failures = 0 WHERE rid = $2",
        )
        .bind(next)
        .bind(rid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn open_cancel(
        &self,
        (provider, kind, id): (&str, &str, &str),
        requested_by: &str,
        now: &str,
        key_for: KeyFor<'_>,
    ) -> Result<OpenedCancel, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO resources (provider, kind, id, first_seen_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id, provider, kind) DO NOTHING",
        )
        .bind(provider)
        .bind(kind)
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        // Locked: two cancels of one resource take their keys in turn.
        let (rid, context, status): (i64, Option<String>, Option<String>) = sqlx::query_as(
            "SELECT rid, context, status FROM resources
             WHERE id = $3 AND provider = $1 AND kind = $2 FOR UPDATE",
        )
        .bind(provider)
        .bind(kind)
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        let key = key_for(reads::burnt_keys(&mut tx, provider, kind, id).await?);
        let request_id =
            reads::insert(&mut tx, provider, kind, id, &key, requested_by, now).await?;
        sqlx::query("UPDATE resources SET cancel_requested_at = $1 WHERE rid = $2")
            .bind(now)
            .bind(rid)
            .execute(&mut *tx)
            .await?;
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
        let mut conn = self.pool.acquire().await?;
        reads::answer(
            &mut conn,
            request_id,
            answer.http_status,
            answer.outcome,
            answer.error_code,
            answer.body,
            now,
        )
        .await
    }

    async fn scan_alerts(&self, config: &Config, now: Timestamp) -> Result<Changes, StoreError> {
        let mut tx = self.begin().await?;
        let changes = crate::store::alerting::scan::scan(&mut *tx, config, now).await?;
        tx.commit().await?;
        Ok(changes)
    }

    async fn outbox_pending(&self) -> Result<Vec<Backlog>, StoreError> {
        reads::pending_by_sink(&self.pool).await
    }

    async fn open_alerts_by_rule(&self) -> Result<Vec<(String, i64)>, StoreError> {
        reads::open_by_rule(&self.pool).await
    }

    async fn outbox_due(
        &self,
        sink: &str,
        now: &str,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        reads::due(&self.pool, sink, now, limit).await
    }

    async fn outbox_delivered(&self, row: i64, attempt: &Attempt) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        alerting::outbox_attempted(&mut tx, row, attempt, None).await?;
        Ok(tx.commit().await?)
    }

    async fn outbox_retry(
        &self,
        row: i64,
        attempt: &Attempt,
        next_attempt_at: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        alerting::outbox_attempted(&mut tx, row, attempt, Some(next_attempt_at)).await?;
        Ok(tx.commit().await?)
    }

    async fn prune_deliveries(&self, provider: &str, cutoff: &str) -> Result<u64, StoreError> {
        reads::delete_deliveries(&self.pool, provider, cutoff).await
    }

    async fn prune_bodies(&self, cutoff: &str) -> Result<u64, StoreError> {
        reads::drop_bodies(&self.pool, cutoff).await
    }

    async fn prune_refusals(&self, cutoff: &str) -> Result<u64, StoreError> {
        reads::delete_refusals(&self.pool, cutoff).await
    }

    async fn history(&self, resource_id: &str) -> Result<Option<History>, QueryError> {
        crate::store::queries::history(&self.pool, resource_id).await
    }

    async fn transitions(
        &self,
        filter: &TransitionFilter,
        page: &PageRequest,
    ) -> Result<Page<TransitionView>, QueryError> {
        crate::store::queries::transitions(&self.pool, filter, page).await
    }

    async fn explain_transitions(
        &self,
        filter: &TransitionFilter,
        page: &PageRequest,
    ) -> Result<Vec<String>, QueryError> {
        crate::store::queries::explain_transitions(&self.pool, filter, page).await
    }

    async fn alerts(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> Result<Page<AlertView>, QueryError> {
        crate::store::queries::alerts(&self.pool, filter, page).await
    }

    async fn events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, QueryError> {
        crate::store::queries::events(&self.pool, filter, page).await
    }

    async fn unsettled_since(&self, before: &str, limit: i64) -> Result<Vec<Resource>, QueryError> {
        crate::store::queries::unsettled_since(&self.pool, before, limit).await
    }

    async fn deliveries_of(&self, resource_id: &str, limit: i64) -> Result<Vec<Event>, QueryError> {
        crate::store::queries::deliveries_of(&self.pool, resource_id, limit).await
    }
}
