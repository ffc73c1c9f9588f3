//! Every look into a test's database, and every fixture no operation of the
//! product can make: the one file that knows the tables. Test bodies call
//! these by name and hold no SQL. Each query is written once, with `$1`
//! placeholders both drivers take, and runs on whichever engine the test's
//! database is ([`on!`]); the few that only mean something on SQLite (its
//! pragmas, its migration files) say so and refuse PostgreSQL.

use std::time::Duration;

use cancelwatch::store::alerting::{rules, AlertRows};
use cancelwatch::store::model::{Alert, Delivery, NewAlert};
use cancelwatch::store::postgres::PgStore;
use cancelwatch::store::sqlite::SqliteStore;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{PgPool, Sqlite, SqlitePool};

use super::config::TestConfig;
use super::daemon::TestApp;

/// Connections to one engine's database.
#[derive(Clone, Copy)]
pub enum Pool<'a> {
    Sqlite(&'a SqlitePool),
    Postgres(&'a PgPool),
}

impl<'a> Pool<'a> {
    /// The SQLite pool, for what only means something on SQLite.
    pub fn sqlite(self) -> &'a SqlitePool {
        match self {
            Pool::Sqlite(p) => p,
            Pool::Postgres(_) => panic!("a SQLite-only helper was called on PostgreSQL"),
        }
    }
}

/// Runs `$body` with `$p` bound to the pool of whichever engine `$pool`
/// is: the one text of a query, compiled once per driver.
macro_rules! on {
    ($pool:expr, |$p:ident| $body:expr) => {
        match $pool {
            Pool::Sqlite($p) => $body,
            Pool::Postgres($p) => $body,
        }
    };
}

#[derive(Clone)]
enum Owned {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Connections to the database of a test, opened on first use.
#[derive(Clone)]
pub struct TestDb {
    pool: Owned,
    /// Keeps the folder (and so the file), or the PostgreSQL database, as
    /// long as this.
    _config: TestConfig,
}

impl TestDb {
    /// The database of `config` (the daemon's, while it runs, or after).
    pub fn of(config: &TestConfig) -> TestDb {
        let pool = match config.postgres_url() {
            Some(url) => Owned::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect_lazy(url)
                    .unwrap(),
            ),
            None => {
                let options = SqliteConnectOptions::new()
                    .filename(config.database_path())
                    .busy_timeout(Duration::from_secs(5));
                Owned::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(2)
                        .connect_lazy_with(options),
                )
            }
        };
        TestDb {
            pool,
            _config: config.clone(),
        }
    }

    fn pool(&self) -> Pool<'_> {
        match &self.pool {
            Owned::Sqlite(p) => Pool::Sqlite(p),
            Owned::Postgres(p) => Pool::Postgres(p),
        }
    }

    async fn close(&self) {
        on!(self.pool(), |p| p.close().await)
    }
}

/// What these functions run on: a test's own connections, or the store
/// handle of the library code under test.
pub trait Database {
    fn reader(&self) -> Pool<'_>;
    fn writer(&self) -> Pool<'_>;
    /// On PostgreSQL, the replica this is (a store's own handle): what it
    /// leases is held by it. `None`: a test's own connections.
    fn replica(&self) -> Option<uuid::Uuid> {
        None
    }
}

impl Database for TestDb {
    fn reader(&self) -> Pool<'_> {
        self.pool()
    }
    fn writer(&self) -> Pool<'_> {
        self.pool()
    }
}

impl Database for TestApp {
    fn reader(&self) -> Pool<'_> {
        self.db().reader()
    }
    fn writer(&self) -> Pool<'_> {
        self.db().writer()
    }
}

impl Database for cancelwatch::store::sqlite::Db {
    fn reader(&self) -> Pool<'_> {
        Pool::Sqlite(&self.read)
    }
    fn writer(&self) -> Pool<'_> {
        Pool::Sqlite(&self.write)
    }
}

impl Database for cancelwatch::store::Store {
    fn reader(&self) -> Pool<'_> {
        store_pool(self, |db| &db.read)
    }
    fn writer(&self) -> Pool<'_> {
        store_pool(self, |db| &db.write)
    }
    fn replica(&self) -> Option<uuid::Uuid> {
        self.engine().downcast_ref::<PgStore>().map(PgStore::owner)
    }
}

impl Database for cancelwatch::pipeline::Context {
    fn reader(&self) -> Pool<'_> {
        self.store.reader()
    }
    fn writer(&self) -> Pool<'_> {
        self.store.writer()
    }
    fn replica(&self) -> Option<uuid::Uuid> {
        self.store.replica()
    }
}

/// The pool behind a store: on SQLite the one `which` picks of its
/// handle, on PostgreSQL its only one.
fn store_pool<'a>(
    store: &'a cancelwatch::store::Store,
    which: impl FnOnce(&'a cancelwatch::store::sqlite::Db) -> &'a SqlitePool,
) -> Pool<'a> {
    let engine = store.engine();
    if let Some(pg) = engine.downcast_ref::<PgStore>() {
        return Pool::Postgres(pg.pool());
    }
    Pool::Sqlite(which(
        engine
            .downcast_ref::<SqliteStore>()
            .expect("a store of a known engine")
            .db(),
    ))
}

/// The SQLite engine's own handle behind a store, for the tests of that
/// engine's own functions.
pub fn sqlite_engine(store: &cancelwatch::store::Store) -> &cancelwatch::store::sqlite::Db {
    store
        .engine()
        .downcast_ref::<SqliteStore>()
        .expect("a SQLite-only test runs on the SQLite engine")
        .db()
}

// ---- Deliveries (the inbox) ------------------------------------------------

const DELIVERY_COLUMNS: &str =
    "id, provider, dedupe_key, event_type, event_id, resource_kind, resource_id, context,
     livemode, raw_body, body_size, source, received_at, state, attempts, next_attempt_at,
     last_error, processed_at";

/// Every stored delivery, in arrival order.
pub async fn deliveries(db: &impl Database) -> Vec<Delivery> {
    let sql = format!("SELECT {DELIVERY_COLUMNS} FROM inbox ORDER BY id");
    on!(db.reader(), |p| sqlx::query_as(&sql)
        .fetch_all(p)
        .await
        .unwrap())
}

/// The delivery stored under `key`, if any.
pub async fn delivery(db: &impl Database, key: &str) -> Option<Delivery> {
    let sql =
        format!("SELECT {DELIVERY_COLUMNS} FROM inbox WHERE dedupe_key = $1 ORDER BY id LIMIT 1");
    on!(db.reader(), |p| sqlx::query_as(&sql)
        .bind(key)
        .fetch_optional(p)
        .await
        .unwrap())
}

/// `SELECT COUNT(*)` (or another one-number query) with one text bound, if any.
async fn count(db: Pool<'_>, sql: &str, arg: Option<&str>) -> i64 {
    on!(db, |p| {
        let mut q = sqlx::query_scalar(sql);
        if let Some(a) = arg {
            q = q.bind(a);
        }
        q.fetch_one(p).await.unwrap()
    })
}

pub async fn delivery_count(db: &impl Database) -> i64 {
    count(db.reader(), "SELECT COUNT(*) FROM inbox", None).await
}

/// Deliveries waiting for, or in, processing (pending, processing, failed).
pub async fn unfinished_deliveries(db: &impl Database) -> i64 {
    count(
        db.reader(),
        "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
        None,
    )
    .await
}

/// Deliveries in `state`.
pub async fn count_in_state(db: &impl Database, state: &str) -> i64 {
    count(
        db.reader(),
        "SELECT COUNT(*) FROM inbox WHERE state = $1",
        Some(state),
    )
    .await
}

/// Stored deliveries, as a SQLite transaction sees them.
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
    let now = cancelwatch::time::now_str();
    on!(db.writer(), |p| {
        let mut tx = p.begin().await.unwrap();
        for (key, resource) in deliveries {
            let new: Option<i64> = sqlx::query_scalar(
                "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind,
                                    resource_id, livemode, raw_body, body_size, source,
                                    received_at, next_attempt_at)
                 VALUES ('stripe', $1, 'v2.core.batch_job.updated', $1, $2, $3, false, $4, 2,
                         'webhook', $5, $5)
                 ON CONFLICT (provider, dedupe_key) DO NOTHING
                 RETURNING id",
            )
            .bind(key)
            .bind(resource.map(|_| "stripe.batch_job"))
            .bind(resource)
            .bind(b"{}".as_slice())
            .bind(&now)
            .fetch_optional(&mut *tx)
            .await
            .unwrap();
            assert!(new.is_some(), "{key} is new");
        }
        tx.commit().await.unwrap();
    })
}

/// Runs `sql` with the texts `args` bound in order, on the writer.
async fn execute(db: Pool<'_>, sql: &str, args: &[Option<&str>]) -> Result<(), sqlx::Error> {
    on!(db, |p| {
        let mut q = sqlx::query(sql);
        for a in args {
            q = q.bind(*a);
        }
        q.execute(p).await.map(|_| ())
    })
}

/// Leases the stored delivery `key` until `lease_until`, as a claim of
/// `db` would (its first attempt).
pub async fn lease(db: &impl Database, key: &str, lease_until: &str) {
    execute(
        db.writer(),
        "UPDATE inbox SET state = 'processing', attempts = 1, lease_until = $1
         WHERE dedupe_key = $2",
        &[Some(lease_until), Some(key)],
    )
    .await
    .unwrap();
    // On PostgreSQL a lease also has an end by the database's clock and a
    // holder, and holds only while that holder is alive: the store's own
    // replica, or for a test's own connections another process, registered
    // as a replica on this connection (which the pool keeps open).
    if let Pool::Postgres(p) = db.writer() {
        sqlx::query(
            "WITH holder AS (
                 INSERT INTO replicas (owner, backend_pid, backend_start)
                 SELECT gen_random_uuid(), pid, backend_start FROM pg_stat_activity
                 WHERE pid = pg_backend_pid() AND $3::uuid IS NULL
                 RETURNING owner)
             UPDATE inbox SET lease_owner = COALESCE($3, (SELECT owner FROM holder)),
                              lease_expires_at = $1::timestamptz
             WHERE dedupe_key = $2",
        )
        .bind(lease_until)
        .bind(key)
        .bind(db.replica())
        .execute(p)
        .await
        .unwrap();
    }
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
    execute(
        db.writer(),
        "UPDATE inbox SET state = 'processed' WHERE dedupe_key = $1",
        &[Some(key)],
    )
    .await
    .unwrap();
}

/// Notes `error` on the delivery `key`, as a command beside the daemon
/// would write; the driver's answer.
pub async fn try_note_error(db: &impl Database, key: &str, error: &str) -> Result<(), sqlx::Error> {
    execute(
        db.writer(),
        "UPDATE inbox SET last_error = $1 WHERE dedupe_key = $2",
        &[Some(error), Some(key)],
    )
    .await
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
    on!(db.writer(), |p| sqlx::query_scalar(
        "INSERT INTO inbox (provider, dedupe_key, event_type, event_id, resource_kind, resource_id,
                            raw_body, body_size, received_at, state, attempts, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
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
    .fetch_one(p)
    .await
    .unwrap())
}

// ---- Resources and what is recorded about them -----------------------------

/// The current status of the resource with provider id `id`, once fetched.
pub async fn status_of(db: &impl Database, id: &str) -> Option<String> {
    on!(db.reader(), |p| sqlx::query_scalar::<_, Option<String>>(
        "SELECT status FROM resources WHERE id = $1"
    )
    .bind(id)
    .fetch_optional(p)
    .await
    .unwrap()
    .flatten())
}

/// The transitions of the resource(s) with provider id `id`, oldest first.
pub async fn transitions_of(
    db: &impl Database,
    id: &str,
) -> Vec<cancelwatch::store::sqlite::resources::Transition> {
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT id, provider, kind, resource_id, parent_id, from_status, to_status, observed_at,
                provider_at, trigger_type, trigger_id, livemode
         FROM transitions WHERE rid IN (SELECT rid FROM resources WHERE id = $1) ORDER BY id",
    )
    .bind(id)
    .fetch_all(p)
    .await
    .unwrap())
}

/// The ids of the transfers recorded under the Juice bulk transfer `bulk`.
pub async fn items_of(db: &impl Database, bulk: &str) -> Vec<String> {
    on!(db.reader(), |p| sqlx::query_scalar(
        "SELECT id FROM resources WHERE kind = 'juice.transfer' AND parent_id = $1 ORDER BY id",
    )
    .bind(bulk)
    .fetch_all(p)
    .await
    .unwrap())
}

/// The refunds of a resource or of its children.
pub async fn refunds_under(
    db: &impl Database,
    id: &str,
) -> Vec<cancelwatch::store::sqlite::resources::Refund> {
    let sql = format!(
        "SELECT {} FROM refunds WHERE resource_id = $1 OR parent_id = $1 ORDER BY id",
        cancelwatch::store::sqlite::resources::REFUND_COLUMNS
    );
    on!(db.reader(), |p| sqlx::query_as(&sql)
        .bind(id)
        .fetch_all(p)
        .await
        .unwrap())
}

/// Every refund, by resource id.
pub async fn refunds(db: &impl Database) -> Vec<cancelwatch::store::sqlite::resources::Refund> {
    let sql = format!(
        "SELECT {} FROM refunds ORDER BY resource_id",
        cancelwatch::store::sqlite::resources::REFUND_COLUMNS
    );
    on!(db.reader(), |p| sqlx::query_as(&sql)
        .fetch_all(p)
        .await
        .unwrap())
}

/// Every progress observation in order: resource id, status, success
/// count, trigger id.
pub async fn progress_rows(db: &impl Database) -> Vec<(String, String, Option<i64>, String)> {
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT r.id, p.status, p.success_count, p.trigger_id
         FROM progress p JOIN resources r ON r.rid = p.rid ORDER BY p.id",
    )
    .fetch_all(p)
    .await
    .unwrap())
}

/// From now on the database refuses to store a transition of `resource_id`
/// (a trigger standing in for a failing statement; each engine writes
/// triggers its own way).
pub async fn refuse_transitions_of(db: &impl Database, resource_id: &str) {
    let statements = match db.writer() {
        Pool::Sqlite(_) => vec![format!(
            "CREATE TRIGGER refuse_{resource_id} BEFORE INSERT ON transitions
             WHEN NEW.resource_id = '{resource_id}'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )],
        Pool::Postgres(_) => vec![
            format!(
                "CREATE FUNCTION refuse_{resource_id}() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"
            ),
            format!(
                "CREATE TRIGGER refuse_{resource_id} BEFORE INSERT ON transitions
                 FOR EACH ROW WHEN (NEW.resource_id = '{resource_id}')
                 EXECUTE FUNCTION refuse_{resource_id}()"
            ),
        ],
    };
    for sql in statements {
        execute(db.writer(), &sql, &[]).await.unwrap();
    }
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
    on!(db.writer(), |p| sqlx::query_scalar(
        "INSERT INTO resources (provider, kind, id, parent_id, status, terminal, amount, currency,
                                livemode, snapshot, status_since, first_seen_at, last_observed_at,
                                cancel_requested_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
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
    .fetch_one(p)
    .await
    .unwrap())
}

const RESOURCE_COLUMNS: &str =
    "rid, provider, kind, id, parent_id, status, terminal, livemode, context, amount, currency,
     snapshot, provider_updated_at, status_since, first_seen_at, last_observed_at, not_found,
     cancel_requested_at, next_reconcile_at, reconcile_failures";

/// The stored resource of `kind` with provider id `id`.
pub async fn resource(
    db: &impl Database,
    kind: &str,
    id: &str,
) -> Option<cancelwatch::store::sqlite::resources::Resource> {
    let sql = format!("SELECT {RESOURCE_COLUMNS} FROM resources WHERE kind = $1 AND id = $2");
    on!(db.reader(), |p| sqlx::query_as(&sql)
        .bind(kind)
        .bind(id)
        .fetch_optional(p)
        .await
        .unwrap())
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
    on!(db.writer(), |p| {
        sqlx::query_scalar(
            "INSERT INTO transitions (rid, provider, kind, resource_id, parent_id, from_status,
                                  to_status, observed_at, provider_at, trigger_type, trigger_id,
                                  livemode, snapshot)
         SELECT rid, provider, kind, id, parent_id, $1, $2, $3, NULL, 'event', 'evt_' || $4,
                false, snapshot
         FROM resources WHERE rid = $5
         RETURNING id",
        )
        .bind(from)
        .bind(to)
        .bind(observed_at)
        .bind(observed_at)
        .bind(rid)
        .fetch_one(p)
        .await
        .unwrap()
    })
}

pub async fn transition_count(db: &impl Database) -> i64 {
    count(db.reader(), "SELECT COUNT(*) FROM transitions", None).await
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
        counts[n] = count(db.reader(), &format!("SELECT COUNT(*) FROM {table}"), None).await;
    }
    counts
}

/// A transition without its times and trigger: kind, resource id, parent
/// id, from status, to status.
pub type HistoryRow = (String, String, Option<String>, Option<String>, String);

/// Every transition, in the order recorded.
pub async fn history_rows(db: &impl Database) -> Vec<HistoryRow> {
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT kind, resource_id, parent_id, from_status, to_status FROM transitions ORDER BY id",
    )
    .fetch_all(p)
    .await
    .unwrap())
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

pub async fn seed_progress(db: &impl Database, seed: &ProgressSeed<'_>) {
    let p = seed;
    on!(db.writer(), |pool| sqlx::query(
        "INSERT INTO progress (rid, observed_at, status, success_count, failure_count,
                               validated_count, trigger_type)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(p.rid)
    .bind(p.observed_at)
    .bind(p.status)
    .bind(p.success)
    .bind(p.failure)
    .bind(p.validated)
    .bind(p.trigger_type)
    .execute(pool)
    .await
    .map(drop)
    .unwrap());
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
    on!(db.writer(), |p| sqlx::query(
        "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                              currency, opened_at, updated_at, trigger_type)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 'event')
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
    .execute(p)
    .await
    .map(drop)
    .unwrap());
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
    on!(db.writer(), |p| sqlx::query(
        "INSERT INTO cancel_requests (provider, kind, resource_id, idempotency_key, requested_by,
                                      requested_at, http_status, outcome, error_code,
                                      response_body, answered_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
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
    .execute(p)
    .await
    .map(drop)
    .unwrap());
}

/// Every cancel request about one resource, oldest first.
pub async fn cancel_requests(
    db: &impl Database,
    kind: &str,
    resource_id: &str,
) -> Vec<cancelwatch::store::sqlite::cancels::CancelRequest> {
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT id, provider, kind, resource_id, idempotency_key, requested_by, requested_at,
                http_status, outcome, error_code, response_body, answered_at
         FROM cancel_requests WHERE kind = $1 AND resource_id = $2 ORDER BY id",
    )
    .bind(kind)
    .bind(resource_id)
    .fetch_all(p)
    .await
    .unwrap())
}

// ---- Alerts and their outbox -------------------------------------------------

/// Every alert, by rule and resource id.
pub async fn alerts(db: &impl Database) -> Vec<Alert> {
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT id, rule, severity, provider, kind, resource_id, summary, details, state, version,
                created_at, updated_at, resolved_at
         FROM alerts ORDER BY rule, resource_id",
    )
    .fetch_all(p)
    .await
    .unwrap())
}

/// An engine's own transaction as the rows the alert rules run on.
trait AsAlertRows {
    fn rows(&mut self) -> &mut dyn AlertRows;
}

impl AsAlertRows for sqlx::Transaction<'static, Sqlite> {
    fn rows(&mut self) -> &mut dyn AlertRows {
        self
    }
}

impl AsAlertRows for sqlx::Transaction<'static, sqlx::Postgres> {
    fn rows(&mut self) -> &mut dyn AlertRows {
        &mut **self
    }
}

/// Runs `$call` with `$rows` bound to the alert rows of a new transaction
/// on `$db`'s writer, and commits; its answer (unwrapped).
macro_rules! in_alert_rows {
    ($db:expr, |$rows:ident| $call:expr) => {
        on!($db.writer(), |p| {
            let mut tx = p.begin().await.unwrap();
            let $rows = tx.rows();
            let answer = $call.await.unwrap();
            tx.commit().await.unwrap();
            answer
        })
    };
}

/// Raises `alert` now as a rule would, in a transaction of its own.
pub async fn raise_alert(
    db: &impl Database,
    config: &cancelwatch::Config,
    alert: &NewAlert,
) -> Alert {
    let now = cancelwatch::time::now_str();
    let outcome = in_alert_rows!(db, |rows| rules::raise(
        rows,
        config,
        alert,
        &now,
        &mut Vec::new()
    ));
    outcome.alert().clone()
}

/// The rules that run once resource `rid` is recorded, at `now`.
pub async fn on_resource_recorded(
    db: &impl Database,
    config: &cancelwatch::Config,
    rid: i64,
    now: &str,
) {
    in_alert_rows!(db, |rows| rules::on_resource_recorded(
        rows,
        config,
        rid,
        now,
        &mut Vec::new()
    ))
}

/// The rules that run once delivery `id` goes to the dead letters.
pub async fn on_dead_letter(
    db: &impl Database,
    config: &cancelwatch::Config,
    id: i64,
    error: &str,
    now: &str,
) {
    in_alert_rows!(db, |rows| rules::on_dead_letter(
        rows,
        config,
        id,
        error,
        now,
        &mut Vec::new()
    ))
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
    on!(db.writer(), |p| {
        sqlx::query(
        "INSERT INTO alerts (id, rule, severity, provider, kind, resource_id, summary, details,
                             state, version, created_at, updated_at)
         VALUES ($1, $2, 'critical', 'juice', 'juice.bulk_transfer', $3, $4, '{\"items\":2}', 'open', 2, $5, $6)",
    )
    .bind(a.id)
    .bind(a.rule)
    .bind(a.resource_id)
    .bind(a.summary)
    .bind(a.at)
    .bind(a.at)
    .execute(p)
    .await
    .map(drop)
    .unwrap()
    });
    for (version, sink, state, attempts, error) in [
        (1_i64, "hooks", "delivered", 1_i64, None),
        (2, "hooks", "pending", 3, Some("HTTP 503")),
        (2, "log", "delivered", 1, None),
    ] {
        on!(db.writer(), |p| sqlx::query(
            "INSERT INTO alert_outbox (alert_id, alert_version, sink, payload, state, attempts,
                                       next_attempt_at, last_error, created_at, delivered_at)
             VALUES ($1, $2, $3, '{}', $4, $5, '2099-01-01T00:00:00.000Z', $6, $7, $8)",
        )
        .bind(a.id)
        .bind(version)
        .bind(sink)
        .bind(state)
        .bind(attempts)
        .bind(error)
        .bind(a.at)
        .bind((state == "delivered").then_some(a.at))
        .execute(p)
        .await
        .map(drop)
        .unwrap());
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
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT alert_version, sink, payload, state, attempts FROM alert_outbox
         WHERE alert_id = $1 ORDER BY id",
    )
    .bind(alert_id)
    .fetch_all(p)
    .await
    .unwrap())
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
    on!(db.reader(), |p| sqlx::query_scalar(
        "SELECT COUNT(*) FROM alert_outbox WHERE state = $1"
    )
    .bind(state)
    .fetch_one(p)
    .await
    .unwrap())
}

/// Each attempt to deliver `alert_id` to `sink`: the status answered and
/// the error, in order.
pub async fn alert_attempts(
    db: &impl Database,
    alert_id: &str,
    sink: &str,
) -> Vec<(Option<i64>, Option<String>)> {
    on!(db.reader(), |p| {
        sqlx::query_as(
        "SELECT a.status_code, a.error FROM alert_attempts a JOIN alert_outbox o ON o.id = a.outbox_id
         WHERE o.alert_id = $1 AND o.sink = $2 ORDER BY a.id",
    )
    .bind(alert_id)
    .bind(sink)
    .fetch_all(p)
    .await
    .unwrap()
    })
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
    on!(db.reader(), |p| sqlx::query_as(
        "SELECT provider, reason, http_status FROM refusals ORDER BY id"
    )
    .fetch_all(p)
    .await
    .unwrap())
}

/// Refusals counted in summaries (not kept as rows), and the summaries.
pub async fn refusal_summaries(db: &impl Database) -> (i64, i64) {
    let sql = "SELECT COALESCE(SUM(count), 0)::bigint, COUNT(*)::bigint FROM refusal_summaries";
    let sql = match db.reader() {
        // SQLite has no `::` casts; its integers are 64-bit already.
        Pool::Sqlite(_) => "SELECT COALESCE(SUM(count), 0), COUNT(*) FROM refusal_summaries",
        Pool::Postgres(_) => sql,
    };
    on!(db.reader(), |p| sqlx::query_as(sql)
        .fetch_one(p)
        .await
        .unwrap())
}

/// A refusal as a fixture (`http_status` 401).
pub async fn seed_refusal(db: &impl Database, provider: &str, reason: &str, received_at: &str) {
    on!(db.writer(), |p| sqlx::query(
        "INSERT INTO refusals (provider, reason, message, http_status, received_at)
         VALUES ($1, $2, 'no match', 401, $3)",
    )
    .bind(provider)
    .bind(reason)
    .bind(received_at)
    .execute(p)
    .await
    .map(drop)
    .unwrap());
}

// ---- The database itself ---------------------------------------------------

/// The columns of `table` (each engine lists them its own way).
pub async fn column_names(db: &impl Database, table: &str) -> Vec<String> {
    let sql = match db.reader() {
        Pool::Sqlite(_) => "SELECT name FROM pragma_table_info($1)",
        Pool::Postgres(_) => {
            "SELECT column_name::text FROM information_schema.columns
             WHERE table_name = $1 ORDER BY ordinal_position"
        }
    };
    on!(db.reader(), |p| sqlx::query_scalar(sql)
        .bind(table)
        .fetch_all(p)
        .await
        .unwrap())
}

/// The indexes of `table`, by name (SQLite only: its own pragma).
pub async fn index_names(db: &impl Database, table: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT name FROM pragma_index_list(?) ORDER BY name")
        .bind(table)
        .fetch_all(db.reader().sqlite())
        .await
        .unwrap()
}

/// Opens a connection of its own to the database of `config`, reads from
/// it and closes it (what a late reader beside the daemon does).
pub async fn read_on_a_new_connection(config: &TestConfig) {
    let late = TestDb::of(config);
    // Whatever it answers: only the opening matters.
    let _ = on!(late.reader(), |p| sqlx::query("SELECT COUNT(*) FROM inbox")
        .fetch_one(p)
        .await
        .map(drop));
    late.close().await;
}

/// SQLite's count of the commits other connections made, as one
/// connection of its own sees it (`PRAGMA data_version`; SQLite only).
pub struct ChangeCounter(PoolConnection<Sqlite>);

impl ChangeCounter {
    pub async fn open(db: &impl Database) -> ChangeCounter {
        ChangeCounter(db.reader().sqlite().acquire().await.unwrap())
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
    on!(db.reader(), |p| sqlx::query_scalar(
        "SELECT version FROM _sqlx_migrations ORDER BY version"
    )
    .fetch_all(p)
    .await
    .unwrap())
}

/// Records migration `version` as applied, as a newer release that knows
/// it would have left the database.
pub async fn fake_newer_migration(db: &impl Database, version: i64) {
    on!(db.writer(), |p| sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES ($1, 'from a newer release', true, $2, 0)",
    )
    .bind(version)
    .bind(vec![0_u8])
    .execute(p)
    .await
    .map(drop)
    .unwrap());
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
    let mut tx = db.writer().sqlite().begin().await.unwrap();
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

/// Fills the database as a full disk would, for the daemon's one writer
/// connection: SQLite's page limit on that connection set just above the
/// file's size, and a table of the test's own grown until no page is left
/// (the free pages used first). Every write of the daemon that needs a new
/// page then fails with SQLITE_FULL, as on a full disk.
pub async fn fill_the_disk(store: &cancelwatch::store::Store) {
    let mut writer = sqlite_engine(store).write.acquire().await.unwrap();
    let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    sqlx::query(&format!("PRAGMA max_page_count = {}", pages + 16))
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE IF NOT EXISTS filler (b BLOB)")
        .execute(&mut *writer)
        .await
        .unwrap();
    for _ in 0..100_000 {
        let filled = sqlx::query("INSERT INTO filler VALUES (zeroblob(1000))")
            .execute(&mut *writer)
            .await;
        if let Err(e) = filled {
            assert!(e.to_string().contains("full"), "{e}");
            return;
        }
    }
    panic!("the database never filled up");
}

/// Ends [`fill_the_disk`]: room again, as when space is freed.
pub async fn free_the_disk(store: &cancelwatch::store::Store) {
    let mut writer = sqlite_engine(store).write.acquire().await.unwrap();
    sqlx::query("PRAGMA max_page_count = 1073741823")
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::query("DROP TABLE filler")
        .execute(&mut *writer)
        .await
        .unwrap();
}

/// A write transaction held on the database of `config`, as another
/// process (an `sqlite3` shell) would hold one, until released.
pub struct WriteLock(PoolConnection<Sqlite>);

/// Takes [`WriteLock`] on the database of `config`.
pub async fn hold_write_lock(config: &TestConfig) -> WriteLock {
    let pool =
        SqlitePool::connect_with(SqliteConnectOptions::new().filename(config.database_path()))
            .await
            .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .unwrap();
    WriteLock(conn)
}

impl WriteLock {
    pub async fn release(mut self) {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *self.0)
            .await
            .unwrap();
    }
}
