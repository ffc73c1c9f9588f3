//! Every look into a test's database, and every fixture no operation of the
//! product can make: the one file that knows the tables. Test bodies call
//! these by name and hold no SQL; a switch to the store's read interface,
//! or to another database engine, changes only this file.

use std::time::Duration;

use cancelwatch::store::sqlite::inbox::Delivery;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Sqlite, SqlitePool};

use super::config::TestConfig;
use super::daemon::TestApp;

/// Connections to the database file of a test, opened on first use.
#[derive(Clone)]
pub struct TestDb {
    pool: SqlitePool,
    /// Keeps the folder (and so the file) as long as this.
    _config: TestConfig,
}

impl TestDb {
    /// The database of `config` (the daemon's, while it runs, or after).
    pub fn of(config: &TestConfig) -> TestDb {
        let options = SqliteConnectOptions::new()
            .filename(config.database_path())
            .busy_timeout(Duration::from_secs(5));
        TestDb {
            pool: SqlitePoolOptions::new()
                .max_connections(2)
                .connect_lazy_with(options),
            _config: config.clone(),
        }
    }
}

/// What these functions run on: a test's own connections, or the store
/// handle of the library code under test.
pub trait Database {
    fn reader(&self) -> &SqlitePool;
    fn writer(&self) -> &SqlitePool;
}

impl Database for TestDb {
    fn reader(&self) -> &SqlitePool {
        &self.pool
    }
    fn writer(&self) -> &SqlitePool {
        &self.pool
    }
}

impl Database for TestApp {
    fn reader(&self) -> &SqlitePool {
        self.db().reader()
    }
    fn writer(&self) -> &SqlitePool {
        self.db().writer()
    }
}

impl Database for cancelwatch::store::sqlite::Db {
    fn reader(&self) -> &SqlitePool {
        &self.read
    }
    fn writer(&self) -> &SqlitePool {
        &self.write
    }
}

impl Database for cancelwatch::store::Store {
    fn reader(&self) -> &SqlitePool {
        &engine(self).read
    }
    fn writer(&self) -> &SqlitePool {
        &engine(self).write
    }
}

impl Database for cancelwatch::pipeline::Context {
    fn reader(&self) -> &SqlitePool {
        &engine(&self.store).read
    }
    fn writer(&self) -> &SqlitePool {
        &engine(&self.store).write
    }
}

/// The SQLite engine's own handle behind a store, for what these tests
/// check or seed directly in its tables.
pub fn engine(store: &cancelwatch::store::Store) -> &cancelwatch::store::sqlite::Db {
    store
        .engine()
        .downcast_ref::<cancelwatch::store::sqlite::SqliteStore>()
        .expect("the tests run on the SQLite engine")
        .db()
}

// ---- Deliveries (the inbox) ------------------------------------------------

/// Every stored delivery, in arrival order.
pub async fn deliveries(db: &impl Database) -> Vec<Delivery> {
    sqlx::query_as(
        "SELECT id, provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                context, livemode, raw_body, body_size, source, received_at, state, attempts,
                next_attempt_at, last_error, processed_at
         FROM inbox ORDER BY id",
    )
    .fetch_all(db.reader())
    .await
    .unwrap()
}

/// The delivery stored under `key`, if any.
pub async fn delivery(db: &impl Database, key: &str) -> Option<Delivery> {
    cancelwatch::store::sqlite::inbox::by_key(db.reader(), key)
        .await
        .unwrap()
}

pub async fn delivery_count(db: &impl Database) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(db.reader())
        .await
        .unwrap()
}

/// Deliveries waiting for, or in, processing (pending, processing, failed).
pub async fn unfinished_deliveries(db: &impl Database) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
    )
    .fetch_one(db.reader())
    .await
    .unwrap()
}

/// Deliveries in `state`.
pub async fn count_in_state(db: &impl Database, state: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = ?")
        .bind(state)
        .fetch_one(db.reader())
        .await
        .unwrap()
}

/// Stored deliveries, as a transaction sees them.
pub async fn delivery_count_in(tx: &mut cancelwatch::store::sqlite::Tx<'_>) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(&mut **tx)
        .await
        .unwrap()
}

/// Stores, all new and due now, a `v2.core.batch_job.updated` delivery
/// (body `{}`) for each key, about the batch job named beside it if any
/// (no claim is woken: only a poll finds them).
pub async fn store_deliveries(db: &impl Database, deliveries: &[(&str, Option<&str>)]) {
    use cancelwatch::store::sqlite::inbox::{insert, NewDelivery};
    let mut tx = db.writer().begin().await.unwrap();
    for (key, resource) in deliveries {
        let by_hand = NewDelivery {
            provider: "stripe".into(),
            dedupe_key: key.to_string(),
            event_type: "v2.core.batch_job.updated".into(),
            event_id: Some(key.to_string()),
            resource_kind: resource.map(|_| "stripe.batch_job".to_string()),
            resource_id: resource.map(str::to_string),
            context: None,
            livemode: Some(false),
            raw_body: b"{}".to_vec(),
            source: "webhook",
            received_at: cancelwatch::time::now_str(),
        };
        assert!(insert(&mut tx, &by_hand).await.unwrap(), "{key} is new");
    }
    tx.commit().await.unwrap();
}

/// Leases the stored delivery `key` until `lease_until`, as a claim
/// would (its first attempt).
pub async fn lease(db: &impl Database, key: &str, lease_until: &str) {
    sqlx::query(
        "UPDATE inbox SET state = 'processing', attempts = 1, lease_until = ?
         WHERE dedupe_key = ?",
    )
    .bind(lease_until)
    .bind(key)
    .execute(db.writer())
    .await
    .unwrap();
}

/// A delivery about the batch job `resource_id`, held by another
/// process's worker until `lease_until`.
pub async fn seed_leased_delivery(
    db: &impl Database,
    key: &str,
    resource_id: &str,
    lease_until: &str,
) {
    store_deliveries(db, &[(key, Some(resource_id))]).await;
    lease(db, key, lease_until).await;
}

/// The delivery `key` ends processed (its worker is done, its lease over).
pub async fn mark_processed(db: &impl Database, key: &str) {
    sqlx::query("UPDATE inbox SET state = 'processed' WHERE dedupe_key = ?")
        .bind(key)
        .execute(db.writer())
        .await
        .unwrap();
}

/// Notes `error` on the delivery `key`, as a command beside the daemon
/// would write; the driver's answer.
pub async fn try_note_error(db: &impl Database, key: &str, error: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE inbox SET last_error = ? WHERE dedupe_key = ?")
        .bind(error)
        .bind(key)
        .execute(db.writer())
        .await
        .map(|_| ())
}

/// A delivery as a fixture: stored in whatever state, with no operation
/// of the product behind it.
pub struct DeliverySeed<'a> {
    pub provider: &'a str,
    pub key: &'a str,
    pub event_type: &'a str,
    pub event_id: Option<&'a str>,
    pub resource_kind: Option<&'a str>,
    pub resource_id: Option<&'a str>,
    pub raw_body: Option<&'a [u8]>,
    pub received_at: &'a str,
    pub state: &'a str,
    pub attempts: i64,
    pub next_attempt_at: &'a str,
}

/// Stores `d`; its row id.
pub async fn seed_delivery(db: &impl Database, d: &DeliverySeed<'_>) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                            raw_body, body_size, received_at, state, attempts, next_attempt_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         RETURNING id",
    )
    .bind(d.provider)
    .bind(d.key)
    .bind(d.event_type)
    .bind(d.event_id)
    .bind(d.resource_kind)
    .bind(d.resource_id)
    .bind(d.raw_body)
    .bind(d.raw_body.map_or(0, |b| b.len() as i64))
    .bind(d.received_at)
    .bind(d.state)
    .bind(d.attempts)
    .bind(d.next_attempt_at)
    .fetch_one(db.writer())
    .await
    .unwrap()
}

// ---- Resources and what is recorded about them -----------------------------

/// The current status of the resource with provider id `id`, once fetched.
pub async fn status_of(db: &impl Database, id: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>("SELECT status FROM resources WHERE id = ?")
        .bind(id)
        .fetch_optional(db.reader())
        .await
        .unwrap()
        .flatten()
}

/// The transitions of the resource(s) with provider id `id`, oldest first.
pub async fn transitions_of(
    db: &impl Database,
    id: &str,
) -> Vec<cancelwatch::store::sqlite::resources::Transition> {
    cancelwatch::store::sqlite::resources::transitions_of(db.reader(), id)
        .await
        .unwrap()
}

/// The refunds of a resource or of its children.
pub async fn refunds_under(
    db: &impl Database,
    id: &str,
) -> Vec<cancelwatch::store::sqlite::resources::Refund> {
    cancelwatch::store::sqlite::resources::refunds_under(db.reader(), id)
        .await
        .unwrap()
}

/// Every refund, by resource id.
pub async fn refunds(db: &impl Database) -> Vec<cancelwatch::store::sqlite::resources::Refund> {
    sqlx::query_as(&format!(
        "SELECT {} FROM refunds ORDER BY resource_id",
        cancelwatch::store::sqlite::resources::REFUND_COLUMNS
    ))
    .fetch_all(db.reader())
    .await
    .unwrap()
}

/// Every progress observation in order: resource id, status, success
/// count, trigger id.
pub async fn progress_rows(db: &impl Database) -> Vec<(String, String, Option<i64>, String)> {
    sqlx::query_as(
        "SELECT r.id, p.status, p.success_count, p.trigger_id
         FROM progress p JOIN resources r ON r.rid = p.rid ORDER BY p.id",
    )
    .fetch_all(db.reader())
    .await
    .unwrap()
}

/// From now on the database refuses to store a transition of `resource_id`
/// (a trigger standing in for a failing statement).
pub async fn refuse_transitions_of(db: &impl Database, resource_id: &str) {
    sqlx::query(&format!(
        "CREATE TRIGGER refuse_{resource_id} BEFORE INSERT ON transitions
         WHEN NEW.resource_id = '{resource_id}'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    ))
    .execute(db.writer())
    .await
    .unwrap();
}

/// A resource as a fixture, as the pipeline would have recorded it.
#[derive(Clone)]
pub struct ResourceSeed {
    pub provider: String,
    pub kind: String,
    pub id: String,
    pub parent_id: Option<String>,
    pub status: String,
    pub terminal: bool,
    pub amount: Option<i64>,
    pub currency: Option<String>,
    pub livemode: Option<bool>,
    pub snapshot: Option<String>,
    pub status_since: Option<String>,
    pub first_seen_at: String,
    pub last_observed_at: Option<String>,
    pub cancel_requested_at: Option<String>,
}

impl ResourceSeed {
    /// A resource of `kind` (its provider is the prefix of the kind).
    pub fn new(kind: &str, id: &str, status: &str) -> ResourceSeed {
        ResourceSeed {
            provider: kind.split('.').next().unwrap().into(),
            kind: kind.into(),
            id: id.into(),
            parent_id: None,
            status: status.into(),
            terminal: false,
            amount: None,
            currency: None,
            livemode: None,
            snapshot: None,
            status_since: None,
            first_seen_at: "2026-01-01T00:00:00.000Z".into(),
            last_observed_at: None,
            cancel_requested_at: None,
        }
    }

    pub fn terminal(mut self) -> Self {
        self.terminal = true;
        self
    }

    pub fn parent(mut self, id: &str) -> Self {
        self.parent_id = Some(id.into());
        self
    }

    pub fn amount(mut self, amount: i64) -> Self {
        self.amount = Some(amount);
        self
    }

    pub fn currency(mut self, currency: &str) -> Self {
        self.currency = Some(currency.into());
        self
    }

    /// In its status since `at`.
    pub fn since(mut self, at: &str) -> Self {
        self.status_since = Some(at.into());
        self
    }

    pub fn first_seen(mut self, at: &str) -> Self {
        self.first_seen_at = at.into();
        self
    }

    /// Fetched last at `at`, in live mode or not, as `{"id", "status"}`.
    pub fn observed(mut self, at: &str, livemode: bool) -> Self {
        self.last_observed_at = Some(at.into());
        self.livemode = Some(livemode);
        self.snapshot = Some(serde_json::json!({"id": self.id, "status": self.status}).to_string());
        self
    }

    /// Asked to cancel through cancelwatch at `at`.
    pub fn cancel_requested(mut self, at: &str) -> Self {
        self.cancel_requested_at = Some(at.into());
        self
    }
}

/// Stores `r`, or moves the stored one to its status, terminal state, time
/// in status and cancel request; its rid.
pub async fn seed_resource(db: &impl Database, r: &ResourceSeed) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO resources (provider, kind, id, parent_id, status, terminal, amount, currency,
                                livemode, snapshot, status_since, first_seen_at, last_observed_at,
                                cancel_requested_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (provider, kind, id) DO UPDATE SET status = excluded.status,
             terminal = excluded.terminal, status_since = excluded.status_since,
             cancel_requested_at = excluded.cancel_requested_at
         RETURNING rid",
    )
    .bind(&r.provider)
    .bind(&r.kind)
    .bind(&r.id)
    .bind(&r.parent_id)
    .bind(&r.status)
    .bind(r.terminal)
    .bind(r.amount)
    .bind(&r.currency)
    .bind(r.livemode)
    .bind(&r.snapshot)
    .bind(&r.status_since)
    .bind(&r.first_seen_at)
    .bind(&r.last_observed_at)
    .bind(&r.cancel_requested_at)
    .fetch_one(db.writer())
    .await
    .unwrap()
}

/// The stored resource of `kind` with provider id `id`.
pub async fn resource(
    db: &impl Database,
    kind: &str,
    id: &str,
) -> Option<cancelwatch::store::sqlite::resources::Resource> {
    cancelwatch::store::sqlite::resources::find(db.reader(), kind, id)
        .await
        .unwrap()
}

/// A transition of the resource `rid` as a fixture, triggered by the event
/// `evt_<observed_at>`, with the resource's snapshot; its id.
pub async fn seed_transition(
    db: &impl Database,
    rid: i64,
    from: Option<&str>,
    to: &str,
    observed_at: &str,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status,
                                  to_status, observed_at, provider_at, trigger_type, trigger_id,
                                  livemode, snapshot)
         SELECT rid, provider, kind, id, parent_id, ?, ?, ?, NULL, 'event', 'evt_' || ?, 0, snapshot
         FROM resources WHERE rid = ?
         RETURNING id",
    )
    .bind(from)
    .bind(to)
    .bind(observed_at)
    .bind(observed_at)
    .bind(rid)
    .fetch_one(db.writer())
    .await
    .unwrap()
}

pub async fn transition_count(db: &impl Database) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM transitions")
        .fetch_one(db.reader())
        .await
        .unwrap()
}

/// How many rows each table of the audit trail holds: transitions,
/// refunds, alerts, alert outbox, cancel requests, resources.
pub async fn audit_trail_counts(db: &impl Database) -> [i64; 6] {
    let mut counts = [0; 6];
    for (n, table) in [
        "transitions",
        "refunds",
        "alerts",
        "alert_outbox",
        "cancel_requests",
        "resources",
    ]
    .into_iter()
    .enumerate()
    {
        counts[n] = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(db.reader())
            .await
            .unwrap();
    }
    counts
}

/// A transition without its times and trigger: kind, resource id, parent
/// id, from status, to status.
pub type HistoryRow = (String, String, Option<String>, Option<String>, String);

/// Every transition, in the order recorded.
pub async fn history_rows(db: &impl Database) -> Vec<HistoryRow> {
    sqlx::query_as(
        "SELECT kind, resource_id, parent_id, from_status, to_status FROM transitions ORDER BY id",
    )
    .fetch_all(db.reader())
    .await
    .unwrap()
}

/// Progress counts of a batch job as a fixture.
pub struct ProgressSeed<'a> {
    pub rid: i64,
    pub observed_at: &'a str,
    pub status: &'a str,
    pub success: i64,
    pub failure: i64,
    pub validated: Option<i64>,
    pub trigger_type: &'a str,
}

pub async fn seed_progress(db: &impl Database, p: &ProgressSeed<'_>) {
    sqlx::query(
        "INSERT INTO progress (rid, observed_at, status, success_count, failure_count,
                               validated_count, trigger_type)
         VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(p.rid)
    .bind(p.observed_at)
    .bind(p.status)
    .bind(p.success)
    .bind(p.failure)
    .bind(p.validated)
    .bind(p.trigger_type)
    .execute(db.writer())
    .await
    .unwrap();
}

/// The refund of a resource as a fixture (opened by an event).
pub struct RefundSeed<'a> {
    pub rid: i64,
    pub provider: &'a str,
    pub kind: &'a str,
    pub resource_id: &'a str,
    pub parent_id: Option<&'a str>,
    pub status: &'a str,
    pub reason: &'a str,
    pub amount: i64,
    pub currency: &'a str,
    pub opened_at: &'a str,
    pub updated_at: &'a str,
}

/// Stores `r`, or moves the resource's stored refund to its status.
pub async fn seed_refund(db: &impl Database, r: &RefundSeed<'_>) {
    sqlx::query(
        "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                              currency, opened_at, updated_at, trigger_type)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'event')
         ON CONFLICT (rid) DO UPDATE SET status = excluded.status",
    )
    .bind(r.rid)
    .bind(r.provider)
    .bind(r.kind)
    .bind(r.resource_id)
    .bind(r.parent_id)
    .bind(r.status)
    .bind(r.reason)
    .bind(r.amount)
    .bind(r.currency)
    .bind(r.opened_at)
    .bind(r.updated_at)
    .execute(db.writer())
    .await
    .unwrap();
}

/// A cancel request and the provider's answer, as a fixture.
pub struct CancelSeed<'a> {
    pub provider: &'a str,
    pub kind: &'a str,
    pub resource_id: &'a str,
    pub idempotency_key: &'a str,
    pub requested_by: &'a str,
    pub requested_at: &'a str,
    pub http_status: i64,
    pub outcome: &'a str,
    pub error_code: Option<&'a str>,
    pub response_body: Option<&'a str>,
    pub answered_at: &'a str,
}

pub async fn seed_cancel_request(db: &impl Database, c: &CancelSeed<'_>) {
    sqlx::query(
        "INSERT INTO cancel_requests (provider, kind, resource_id, idempotency_key, requested_by,
                                      requested_at, http_status, outcome, error_code,
                                      response_body, answered_at)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(c.provider)
    .bind(c.kind)
    .bind(c.resource_id)
    .bind(c.idempotency_key)
    .bind(c.requested_by)
    .bind(c.requested_at)
    .bind(c.http_status)
    .bind(c.outcome)
    .bind(c.error_code)
    .bind(c.response_body)
    .bind(c.answered_at)
    .execute(db.writer())
    .await
    .unwrap();
}

/// Every cancel request about one resource, oldest first.
pub async fn cancel_requests(
    db: &impl Database,
    kind: &str,
    resource_id: &str,
) -> Vec<cancelwatch::store::sqlite::cancels::CancelRequest> {
    cancelwatch::store::sqlite::cancels::of_resource(db.reader(), kind, resource_id)
        .await
        .unwrap()
}

// ---- Alerts and their outbox -------------------------------------------------

/// Every alert, by rule and resource id.
pub async fn alerts(db: &impl Database) -> Vec<cancelwatch::store::sqlite::alerts::Alert> {
    sqlx::query_as(
        "SELECT id, rule, severity, provider, kind, resource_id, summary, details, state, version,
                created_at, updated_at, resolved_at
         FROM alerts ORDER BY rule, resource_id",
    )
    .fetch_all(db.reader())
    .await
    .unwrap()
}

/// A critical alert about a Juice bulk transfer as a fixture.
pub struct AlertSeed<'a> {
    pub id: &'a str,
    pub rule: &'a str,
    pub resource_id: &'a str,
    pub summary: &'a str,
    /// When it was raised and last updated.
    pub at: &'a str,
}

/// Stores `a` open at version 2 (details `{"items": 2}`), with its outbox:
/// delivered to the sink `hooks` at version 1, pending there at version 2
/// after 3 attempts (`HTTP 503`), and delivered to the sink `log`.
pub async fn seed_alert(db: &impl Database, a: &AlertSeed<'_>) {
    sqlx::query(
        "INSERT INTO alerts (id, rule, severity, provider, kind, resource_id, summary, details,
                             state, version, created_at, updated_at)
         VALUES (?, ?, 'critical', 'juice', 'juice.bulk_transfer', ?, ?, '{\"items\":2}', 'open', 2, ?, ?)",
    )
    .bind(a.id)
    .bind(a.rule)
    .bind(a.resource_id)
    .bind(a.summary)
    .bind(a.at)
    .bind(a.at)
    .execute(db.writer())
    .await
    .unwrap();
    for (version, sink, state, attempts, error) in [
        (1, "hooks", "delivered", 1, None),
        (2, "hooks", "pending", 3, Some("HTTP 503")),
        (2, "log", "delivered", 1, None),
    ] {
        sqlx::query(
            "INSERT INTO alert_outbox (alert_id, alert_version, sink, payload, state, attempts,
                                       next_attempt_at, last_error, created_at, delivered_at)
             VALUES (?, ?, ?, '{}', ?, ?, '2099-01-01T00:00:00.000Z', ?, ?,
                     CASE WHEN ? = 'delivered' THEN ? END)",
        )
        .bind(a.id)
        .bind(version)
        .bind(sink)
        .bind(state)
        .bind(attempts)
        .bind(error)
        .bind(a.at)
        .bind(state)
        .bind(a.at)
        .execute(db.writer())
        .await
        .unwrap();
    }
}

/// What is to reach one sink about one version of an alert.
#[derive(Debug, sqlx::FromRow)]
pub struct OutboxEntry {
    pub alert_version: i64,
    pub sink: String,
    pub payload: String,
    pub state: String,
    pub attempts: i64,
}

/// The outbox rows of `alert_id`, in order.
pub async fn outbox(db: &impl Database, alert_id: &str) -> Vec<OutboxEntry> {
    sqlx::query_as(
        "SELECT alert_version, sink, payload, state, attempts FROM alert_outbox
         WHERE alert_id = ? ORDER BY id",
    )
    .bind(alert_id)
    .fetch_all(db.reader())
    .await
    .unwrap()
}

/// The one outbox row of `alert_id` for `sink`.
pub async fn outbox_entry(db: &impl Database, alert_id: &str, sink: &str) -> OutboxEntry {
    let mut rows: Vec<OutboxEntry> = outbox(db, alert_id)
        .await
        .into_iter()
        .filter(|r| r.sink == sink)
        .collect();
    assert_eq!(rows.len(), 1, "outbox rows of {alert_id} for {sink}");
    rows.remove(0)
}

/// Outbox rows in `state` (pending or delivered), over every alert.
pub async fn outbox_count(db: &impl Database, state: &str) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM alert_outbox WHERE state = ?")
        .bind(state)
        .fetch_one(db.reader())
        .await
        .unwrap()
}

/// Each attempt to deliver `alert_id` to `sink`: the status answered and
/// the error, in order.
pub async fn alert_attempts(
    db: &impl Database,
    alert_id: &str,
    sink: &str,
) -> Vec<(Option<i64>, Option<String>)> {
    sqlx::query_as(
        "SELECT a.status_code, a.error FROM alert_attempts a JOIN alert_outbox o ON o.id = a.outbox_id
         WHERE o.alert_id = ? AND o.sink = ? ORDER BY a.id",
    )
    .bind(alert_id)
    .bind(sink)
    .fetch_all(db.reader())
    .await
    .unwrap()
}

// ---- Refusals ----------------------------------------------------------------

/// A refused delivery as recorded.
#[derive(Debug, sqlx::FromRow)]
pub struct Refusal {
    pub provider: String,
    pub reason: String,
    pub http_status: i64,
}

/// Every recorded refusal, in order.
pub async fn refusals(db: &impl Database) -> Vec<Refusal> {
    sqlx::query_as("SELECT provider, reason, http_status FROM refusals ORDER BY id")
        .fetch_all(db.reader())
        .await
        .unwrap()
}

/// Refusals counted in summaries (not kept as rows), and the summaries.
pub async fn refusal_summaries(db: &impl Database) -> (i64, i64) {
    sqlx::query_as("SELECT COALESCE(SUM(count), 0), COUNT(*) FROM refusal_summaries")
        .fetch_one(db.reader())
        .await
        .unwrap()
}

/// A refusal as a fixture (`http_status` 401).
pub async fn seed_refusal(db: &impl Database, provider: &str, reason: &str, received_at: &str) {
    sqlx::query(
        "INSERT INTO refusals (provider, reason, message, http_status, received_at)
         VALUES (?, ?, 'no match', 401, ?)",
    )
    .bind(provider)
    .bind(reason)
    .bind(received_at)
    .execute(db.writer())
    .await
    .unwrap();
}

// ---- The database itself ---------------------------------------------------

/// The columns of `table`.
pub async fn column_names(db: &impl Database, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
        .bind(table)
        .fetch_all(db.reader())
        .await
        .unwrap()
}

/// The indexes of `table`, by name.
pub async fn index_names(db: &impl Database, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM pragma_index_list(?) ORDER BY name")
        .bind(table)
        .fetch_all(db.reader())
        .await
        .unwrap()
}

/// Opens a connection of its own to the database of `config`, reads from
/// it and closes it (what a late reader beside the daemon does).
pub async fn read_on_a_new_connection(config: &TestConfig) {
    let late = TestDb::of(config);
    let _ = sqlx::query("SELECT COUNT(*) FROM inbox")
        .fetch_one(&late.pool)
        .await;
    late.pool.close().await;
}

/// SQLite's count of the commits other connections made, as one
/// connection of its own sees it (`PRAGMA data_version`).
pub struct ChangeCounter(PoolConnection<Sqlite>);

impl ChangeCounter {
    pub async fn open(db: &impl Database) -> ChangeCounter {
        ChangeCounter(db.reader().acquire().await.unwrap())
    }

    pub async fn read(&mut self) -> i64 {
        sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(&mut *self.0)
            .await
            .unwrap()
    }
}

// ---- Schema versions -------------------------------------------------------

/// The migrations recorded as applied, in order.
pub async fn applied_migrations(db: &impl Database) -> Vec<i64> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
        .fetch_all(db.reader())
        .await
        .unwrap()
}

/// Records migration `version` as applied, as a newer release that knows
/// it would have left the database.
pub async fn fake_newer_migration(db: &impl Database, version: i64) {
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (?, 'from a newer release', 1, x'00', 0)",
    )
    .bind(version)
    .execute(db.writer())
    .await
    .unwrap();
}

/// Creates the database of `config` as a release that knew migrations up
/// to `version` left it: this binary's migration files up to there, applied
/// by sqlx's migrator.
pub async fn create_at_version(config: &TestConfig, version: i64) {
    let old = config.dir().join(format!("migrations-{version}"));
    std::fs::create_dir(&old).unwrap();
    let migrator = &cancelwatch::store::sqlite::MIGRATOR;
    for m in migrator.iter().filter(|m| m.version <= version) {
        let name = format!("{:04}_{}.sql", m.version, m.description.replace(' ', "_"));
        std::fs::write(old.join(name), m.sql.as_bytes()).unwrap();
    }
    let options = SqliteConnectOptions::new()
        .filename(config.database_path())
        .create_if_missing(true);
    let pool = SqlitePool::connect_with(options).await.unwrap();
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    pool.close().await;
}

/// In a database at schema version 8 (resources keyed by provider, kind and
/// id): the Stripe outbound transfer `id`, seen processing, then canceled.
pub async fn seed_canceled_transfer_at_version_8(db: &impl Database, id: &str) {
    let mut tx = db.writer().begin().await.unwrap();
    let rid: i64 = sqlx::query_scalar(
        "INSERT INTO resources (provider, kind, id, status, terminal, first_seen_at)
         VALUES ('stripe', 'stripe.outbound_transfer', ?, 'canceled', 1, '2026-01-05T10:00:00.000Z')
         RETURNING rid",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO transitions (rid, provider, kind, resource_id, from_status, to_status,
                                  observed_at, trigger_type, trigger_id)
         VALUES (?1, 'stripe', 'stripe.outbound_transfer', ?2, NULL, 'processing',
                 '2026-01-05T10:00:00.000Z', 'event', 'evt_old_1'),
                (?1, 'stripe', 'stripe.outbound_transfer', ?2, 'processing', 'canceled',
                 '2026-01-05T10:05:00.000Z', 'event', 'evt_old_2')",
    )
    .bind(rid)
    .bind(id)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
}
