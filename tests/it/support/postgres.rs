//! A PostgreSQL database of a test's own, on the server that
//! `CANCELWATCH_TEST_POSTGRES_URL` names (e.g.
//! `postgres://postgres@127.0.0.1:5432/postgres`); created empty, dropped
//! when the last configuration holding it goes. Without the variable the
//! PostgreSQL tests say they were skipped and pass: `.ci/run` sets it, and
//! fails when the server is not there.

use sqlx::{Connection, PgConnection};

pub const ENV: &str = "CANCELWATCH_TEST_POSTGRES_URL";

/// The server tests may create databases on, if one is configured.
pub fn server() -> Option<String> {
    std::env::var(ENV).ok().filter(|url| !url.is_empty())
}

#[derive(Debug)]
pub struct PgDatabase {
    admin: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    /// A new empty database for `test`, or `None` (said, as every skipped
    /// PostgreSQL test says it) when no server is configured: for tests
    /// that need a database of their own beside their configuration's.
    pub async fn for_test(test: &str) -> Option<PgDatabase> {
        if !super::Engine::Postgres.available(test) {
            return None;
        }
        Some(PgDatabase::create().await)
    }

    /// `config` on this database (which the caller keeps until the end).
    pub fn config(&self, config: super::TestConfig) -> super::TestConfig {
        let url = self.url.clone();
        config.with(move |c| c.database.url = url)
    }

    /// A new empty database on the configured server (which a test checks
    /// is there first: see [`super::Engine::available`]).
    pub async fn create() -> PgDatabase {
        let admin = server().unwrap_or_else(|| panic!("{ENV} is not set"));
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
        PgDatabase {
            admin,
            name,
            url: url.to_string(),
        }
    }
}

/// Drops the database, ending every connection to it first (a daemon the
/// test left running included). `Drop` cannot await, and may run on a
/// runtime's only thread: the statement runs on a thread and a runtime of
/// its own, which this waits for.
impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                anyhow::Ok(())
            })
        })
        .join();
        // Never a panic here: this may run while a failed test unwinds.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test database {} not dropped: {e:#}", self.name),
            Err(_) => eprintln!("test database {} not dropped", self.name),
        }
    }
}

/// A TCP proxy on loopback in front of the PostgreSQL server, which a test
/// can cut (every connection through it dropped, new ones refused) and
/// mend: the server lost and back, without stopping it for everyone.
pub struct Proxy {
    pub port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    /// A proxy to the server of `url`, and `url` through it.
    pub async fn start(url: &str) -> (Proxy, String) {
        let mut through = url::Url::parse(url).unwrap();
        let server = format!(
            "{}:{}",
            through.host_str().unwrap(),
            through.port().unwrap_or(5432)
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let accepting = open.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let server = server.clone();
                let mut cuts = cuts.clone();
                // Only a cut from now on ends this connection.
                cuts.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&server).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        through.set_port(Some(port)).unwrap();
        through.set_host(Some("127.0.0.1")).unwrap();
        (Proxy { port, open, cut }, through.to_string())
    }

    /// The server is lost: connections dropped, new ones refused.
    pub fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// The server is back.
    pub fn mend(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
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
