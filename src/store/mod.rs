//! Everything the daemon asks of its database, as operations on one
//! interface, [`Storage`]; one implementation per engine (`sqlite/`, `postgres/`), the
//! audit reads written once for every engine (`queries/`). No SQL, driver
//! type, pragma or transaction leaves this folder: callers hand over plain
//! values and get plain values back.
//!
//! What an observation changes (the diff, the status ranks, refunds, which
//! alert rules fire) is decided by the pure code of [`crate::domain`]; an
//! engine reads the rows those decisions need, calls them, and writes what
//! they return, inside one transaction of its own.

pub mod alerting;
pub mod copy;
mod error;
pub mod model;
pub mod postgres;
pub mod queries;
pub mod sqlite;

use std::sync::Arc;

use crate::config::{Config, DatabaseConfig, DatabaseUrl};
use crate::domain::alerts::Changes;
use crate::domain::observe::{Recorded, Trigger};
use crate::domain::outcome::{Decided, Written};
use crate::providers::Observation;
use crate::time::Timestamp;

pub use error::{QueryError, StoreError, Unavailable};
use model::*;

/// The storage interface the daemon, its commands and its API run on.
pub type Store = Arc<dyn Storage>;

/// Opens the database `url` names (creating and migrating it).
pub async fn open(cfg: &DatabaseConfig, url: &DatabaseUrl) -> Result<Store, StoreError> {
    Ok(match url {
        DatabaseUrl::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(path, cfg).await?),
        DatabaseUrl::Postgres(url) => Arc::new(postgres::PgStore::open(url, cfg).await?),
    })
}

/// Opens an existing database for reading only: nothing is created,
/// migrated or written, and a schema this binary does not match is refused.
pub async fn open_read_only(cfg: &DatabaseConfig, url: &DatabaseUrl) -> Result<Store, StoreError> {
    Ok(match url {
        DatabaseUrl::Sqlite(path) => {
            Arc::new(sqlite::SqliteStore::open_read_only(path, cfg).await?)
        }
        DatabaseUrl::Postgres(url) => Arc::new(postgres::PgStore::open_read_only(url, cfg).await?),
    })
}

/// One turn at the writer, taken before a group commit gathers its batch:
/// what arrives while the turn is awaited rides in the same commit.
pub struct WriterTurn(pub(crate) Box<dyn std::any::Any + Send>);

/// A delivery an acknowledgement commit stored, by position in its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Added {
    pub id: i64,
    /// True when the same commit leased it (it was offered a lease).
    pub leased: bool,
}

/// The key a cancel request is sent with, made from how many keys of the
/// resource were used before.
pub type KeyFor<'a> = &'a (dyn Fn(i64) -> String + Send + Sync);

/// A cancel request as stored before it is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedCancel {
    pub request_id: i64,
    pub rid: i64,
    pub idempotency_key: String,
    /// The Stripe account context the resource was seen in.
    pub context: Option<String>,
    /// Its status as last observed before this request.
    pub status: Option<String>,
}

/// The provider's answer to a cancel, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRecord<'a> {
    pub http_status: Option<u16>,
    pub outcome: &'a str,
    pub error_code: Option<&'a str>,
    pub body: Option<&'a str>,
}

#[async_trait::async_trait]
pub trait Storage: Send + Sync + std::fmt::Debug {
    // ---- health -------------------------------------------------------

    /// True when both the writer and the readers answer within 2 s.
    async fn ping(&self) -> bool;
    /// True once making a commit durable failed: acknowledgements stop.
    fn sync_failed(&self) -> bool;
    /// True while this process should run the work that one process at a
    /// time does (the reconciler, the scans, the outbox, the pruner): always
    /// on an engine that one process owns, only on the leader where several
    /// replicas share the database.
    fn is_leader(&self) -> bool {
        true
    }
    /// How many processes serve from this database now (one on an engine
    /// that one process owns): they share the providers' request budgets.
    async fn live_replicas(&self) -> Result<u32, StoreError> {
        Ok(1)
    }
    /// Why writes fail now, if they do: set when a write fails for a cause
    /// outside the daemon ([`StoreError::unavailable`]: the disk full, the
    /// files unwritable, the lock held elsewhere), cleared once a write
    /// succeeds again. While it is set, a call also tries a small write of
    /// its own (at most about once a second), so that the state clears when
    /// the cause goes even if nothing else writes.
    async fn write_trouble(&self) -> Option<Unavailable>;
    /// Stops background work and closes every connection.
    async fn close(&self);
    /// The migrations this binary applies, by version.
    fn migrations(&self) -> Vec<i64>;
    /// Writes a consistent copy of the database, as of one moment, to the
    /// new file `to` (never overwriting one), while the daemon keeps
    /// writing; synced to disk before it returns.
    async fn backup(&self, to: &std::path::Path) -> Result<(), StoreError>;
    /// The engine behind the interface, for that engine's own tests and tools.
    fn engine(&self) -> &dyn std::any::Any;

    // ---- the inbox ----------------------------------------------------

    /// Waits for the writer; see [`WriterTurn`].
    async fn writer_turn(&self) -> Result<WriterTurn, StoreError>;
    /// Stores a batch of deliveries (each at most once per provider and
    /// dedupe key; a lease offered is taken with the row) and refusal
    /// records in one commit. `None` where a delivery was already stored.
    async fn accept(
        &self,
        turn: WriterTurn,
        deliveries: &[(&NewDelivery, Option<&str>)],
        refusals: &[&Refusal],
    ) -> Result<Vec<Option<Added>>, StoreError>;
    /// Returns once every commit made so far is on disk.
    async fn make_durable(&self) -> Result<(), StoreError>;
    /// Stores deliveries found by a backfill, in one transaction; how many were new.
    async fn insert_deliveries(&self, deliveries: &[NewDelivery]) -> Result<usize, StoreError>;
    /// Leases up to `limit` due deliveries until `lease_until`: lapsed leases
    /// first, then in arrival order, never two of one resource at once.
    async fn claim(
        &self,
        now: &str,
        lease_until: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError>;
    /// Leases one delivery by id, when it is due.
    async fn claim_one(
        &self,
        id: i64,
        now: &str,
        lease_until: &str,
    ) -> Result<Option<Delivery>, StoreError>;
    /// Gives back leases no worker started; how many were given back.
    async fn unclaim(&self, claims: &[(i64, &str)]) -> Result<u64, StoreError>;
    /// Puts a delivery back in line, whatever its state (false while leased).
    async fn requeue(&self, id: i64, now: &str) -> Result<bool, StoreError>;
    async fn delivery(&self, id: i64) -> Result<Option<Delivery>, StoreError>;
    async fn delivery_by_key(&self, key: &str) -> Result<Option<Delivery>, StoreError>;
    /// Pending deliveries and the oldest one's arrival.
    async fn inbox_depth(&self) -> Result<(i64, Option<String>), StoreError>;
    /// Per account context (none: the provider's own account), when the
    /// latest delivery of `provider` received at or after `since` arrived.
    async fn newest_received(
        &self,
        provider: &str,
        since: &str,
    ) -> Result<Vec<(Option<String>, String)>, StoreError>;
    async fn inbox_by_state(&self) -> Result<Vec<(String, i64)>, StoreError>;

    // ---- recording ----------------------------------------------------

    /// Writes what was decided for a batch of leased deliveries: each
    /// observation with its transitions, refunds, progress and alerts, and
    /// the delivery's end, atomically per delivery. `None` where a
    /// delivery's write failed (it is retried when its lease runs out).
    async fn record_outcomes(
        &self,
        config: &Config,
        batch: &[Decided],
    ) -> Result<(Vec<Option<Written>>, Changes), StoreError>;
    /// Records one observation made outside a delivery (reconcile, cancel).
    async fn record_observation(
        &self,
        config: &Config,
        obs: &Observation,
        trigger: &Trigger,
        context: Option<&str>,
        now: Timestamp,
    ) -> Result<(Recorded, Changes), StoreError>;

    // ---- reconcile ----------------------------------------------------

    async fn due_for_reconcile(&self, now: &str, limit: i64) -> Result<Vec<Resource>, StoreError>;
    /// The provider says these resources do not exist.
    async fn mark_not_found(&self, resources: &[&Resource], now: &str) -> Result<(), StoreError>;
    /// Fetching failed: look again at each `(rid, next time)`.
    async fn reconcile_failed(&self, next: &[(i64, String)]) -> Result<(), StoreError>;
    async fn mark_reconciled(&self, rid: i64, next: Option<&str>) -> Result<(), StoreError>;

    // ---- cancels ------------------------------------------------------

    /// Stores a cancel request before it is sent, with the next unused key.
    async fn open_cancel(
        &self,
        resource: (&str, &str, &str),
        requested_by: &str,
        now: &str,
        key_for: KeyFor<'_>,
    ) -> Result<OpenedCancel, StoreError>;
    async fn answer_cancel(
        &self,
        request_id: i64,
        answer: &CancelRecord<'_>,
        now: &str,
    ) -> Result<(), StoreError>;

    // ---- alerts -------------------------------------------------------

    /// Evaluates the time-based rules as of `now`.
    async fn scan_alerts(&self, config: &Config, now: Timestamp) -> Result<Changes, StoreError>;
    /// Outbox rows waiting, per sink, with the oldest one's time.
    async fn outbox_pending(&self) -> Result<Vec<Backlog>, StoreError>;
    /// Open alerts, per rule.
    async fn open_alerts_by_rule(&self) -> Result<Vec<(String, i64)>, StoreError>;
    async fn outbox_due(
        &self,
        sink: &str,
        now: &str,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError>;
    async fn outbox_delivered(&self, row: i64, attempt: &Attempt) -> Result<(), StoreError>;
    async fn outbox_retry(
        &self,
        row: i64,
        attempt: &Attempt,
        next_attempt_at: &str,
    ) -> Result<(), StoreError>;

    // ---- prune --------------------------------------------------------

    /// Deletes finished deliveries of `provider` received before `cutoff`.
    async fn prune_deliveries(&self, provider: &str, cutoff: &str) -> Result<u64, StoreError>;
    /// Drops raw bodies of finished deliveries received before `cutoff`.
    async fn prune_bodies(&self, cutoff: &str) -> Result<u64, StoreError>;
    async fn prune_refusals(&self, cutoff: &str) -> Result<u64, StoreError>;

    // ---- reads (CLI, /v1) ---------------------------------------------

    async fn history(&self, resource_id: &str) -> Result<Option<History>, QueryError>;
    async fn transitions(
        &self,
        filter: &TransitionFilter,
        page: &PageRequest,
    ) -> Result<Page<TransitionView>, QueryError>;
    async fn explain_transitions(
        &self,
        filter: &TransitionFilter,
        page: &PageRequest,
    ) -> Result<Vec<String>, QueryError>;
    async fn alerts(
        &self,
        filter: &AlertFilter,
        page: &PageRequest,
    ) -> Result<Page<AlertView>, QueryError>;
    async fn events(
        &self,
        filter: &EventFilter,
        page: &PageRequest,
    ) -> Result<Page<Event>, QueryError>;
    /// Resources not in a terminal status whose current status began
    /// before `before`, longest-held first, at most `limit`, without their
    /// snapshot.
    async fn unsettled_since(&self, before: &str, limit: i64) -> Result<Vec<Resource>, QueryError>;
    /// The deliveries about the resource with this provider id, newest
    /// first, at most `limit`.
    async fn deliveries_of(&self, resource_id: &str, limit: i64) -> Result<Vec<Event>, QueryError>;
}
