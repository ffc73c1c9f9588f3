//! A PostgreSQL database of a test's own, on the server that
//! `CANCELWATCH_TEST_POSTGRES_URL` names (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`); created empty, dropped
//! at the end. Without the variable the PostgreSQL tests say they were
//! skipped and pass: `.ci/run` sets it, and fails when the server is not
//! there.

use sqlx::{Connection, PgConnection};

use super::TestConfig;

pub const ENV: &str = "CANCELWATCH_TEST_POSTGRES_URL";

pub struct PgDatabase {
    admin: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    /// A new empty database, or `None` (said on stderr) when no server is
    /// configured for tests.
    pub async fn create(test: &str) -> Option<PgDatabase> {
        let Ok(admin) = std::env::var(ENV) else {
            eprintln!("skipped {test}: {ENV} is not set (it names a PostgreSQL server for tests)");
            return None;
        };
        let name = format!("cw_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("{ENV}: cannot connect: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let mut url = url::Url::parse(&admin).unwrap();
        url.set_path(&name);
        Some(PgDatabase {
            admin,
            name,
            url: url.to_string(),
        })
    }

    /// `config` on this database.
    pub fn config(&self, config: TestConfig) -> TestConfig {
        let url = self.url.clone();
        config.with(move |c| c.database.url = url)
    }

    /// Drops the database (every connection to it is ended first).
    pub async fn drop(self) {
        let mut conn = PgConnection::connect(&self.admin).await.unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
    }
}

/// Connections of a test's own to its PostgreSQL database, for what it
/// checks there: the one place these tests hold PostgreSQL SQL.
#[derive(Clone)]
pub struct PgLook {
    pool: sqlx::PgPool,
}

/// A transition without its times and trigger, as
/// [`super::db::HistoryRow`] is on SQLite.
pub type HistoryRow = super::db::HistoryRow;

/// A refund without its times and trigger: resource id, status, amount,
/// currency.
pub type RefundRow = (String, String, Option<i64>, Option<String>);

/// A delivery's lease: its id and the replica holding it.
pub type Lease = (i64, uuid::Uuid);

impl PgDatabase {
    /// A look into this database (two connections at most).
    pub async fn look(&self) -> PgLook {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.url)
            .await
            .unwrap();
        PgLook { pool }
    }
}

impl PgLook {
    /// Every stored delivery's dedupe key and state, in arrival order.
    pub async fn deliveries(&self) -> Vec<(String, String)> {
        sqlx::query_as("SELECT dedupe_key, state FROM inbox ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Deliveries waiting for, or in, processing.
    pub async fn unfinished(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// The leases held now.
    pub async fn leases(&self) -> Vec<Lease> {
        sqlx::query_as(
            "SELECT id, lease_owner FROM inbox
             WHERE state = 'processing' AND lease_owner IS NOT NULL ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// The registered replicas whose own connection is gone.
    pub async fn gone_replicas(&self) -> Vec<uuid::Uuid> {
        sqlx::query_scalar(
            "SELECT owner FROM replicas r WHERE NOT EXISTS (
                 SELECT 1 FROM pg_stat_activity a
                 WHERE a.pid = r.backend_pid AND a.backend_start = r.backend_start)",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Every transition, in the order recorded.
    pub async fn history_rows(&self) -> Vec<HistoryRow> {
        sqlx::query_as(
            "SELECT kind, resource_id, parent_id, from_status, to_status
             FROM transitions ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Every refund, by resource id.
    pub async fn refunds(&self) -> Vec<RefundRow> {
        sqlx::query_as(
            "SELECT resource_id, status, amount, currency FROM refunds ORDER BY resource_id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Every alert's rule and resource id, in that order.
    pub async fn alerts(&self) -> Vec<(String, String)> {
        sqlx::query_as("SELECT rule, resource_id FROM alerts ORDER BY rule, resource_id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Outbox rows not yet delivered.
    pub async fn undelivered_alerts(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM alert_outbox WHERE state <> 'delivered'")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// How often the index `name` was scanned and how many entries those
    /// scans read, as the statistics collector has them now.
    pub async fn index_reads(&self, name: &str) -> (i64, i64) {
        let mut conn = self.pool.acquire().await.unwrap();
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query_as(
            "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = $1",
        )
        .bind(name)
        .fetch_one(&mut *conn)
        .await
        .unwrap()
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}
