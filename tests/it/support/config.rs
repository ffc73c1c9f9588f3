//! One way to configure a daemon under test, in-process or as the binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cancelwatch::Config;

use super::engines::Engine;
use super::postgres::PgDatabase;

/// The Stripe API key the simulator expects.
pub const STRIPE_KEY: &str = "sk_test_cancelwatch";
/// The Juice API key the simulator expects.
pub const JUICE_KEY: &str = "juice_key_cancelwatch";
/// The Stripe webhook secret deliveries are signed with.
pub const WEBHOOK_SECRET: &str = "whsec_cancelwatch_test";
/// A second, older Stripe webhook secret, still accepted.
pub const OLD_WEBHOOK_SECRET: &str = "whsec_cancelwatch_old";
/// The Juice business id that keys delivery checksums.
pub const BUSINESS_ID: &str = "cancelwatch-business-id";
/// Where nothing listens: provider APIs point here unless a test says otherwise.
pub const CLOSED_PORT: &str = "http://127.0.0.1:9";

/// A daemon's configuration in a temporary folder of its own, on a
/// database of its own; both live as long as any clone of this (or a
/// daemon started with it).
#[derive(Clone)]
pub struct TestConfig {
    dir: Arc<tempfile::TempDir>,
    /// On PostgreSQL, the database (dropped with the last clone).
    postgres: Option<Arc<PgDatabase>>,
    config: Config,
}

impl Default for TestConfig {
    fn default() -> TestConfig {
        TestConfig::new()
    }
}

impl TestConfig {
    /// The database `cw.db` in a new temporary folder; webhooks of both providers verified with the test keys; provider
    /// APIs on a closed loopback port, with no API keys.
    pub fn new() -> TestConfig {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.database.url = format!("sqlite://{}/cw.db", dir.path().display());
        config.server.listen = "127.0.0.1:0".into();
        config.stripe.webhook_secrets = vec![WEBHOOK_SECRET.into(), OLD_WEBHOOK_SECRET.into()];
        config.juice.checksum_keys = vec![BUSINESS_ID.into()];
        config.stripe.api_base = CLOSED_PORT.into();
        config.juice.api_base = CLOSED_PORT.into();
        TestConfig {
            dir: Arc::new(dir),
            postgres: None,
            config,
        }
    }

    /// As [`TestConfig::new`], on `engine`: on PostgreSQL a new empty
    /// database of its own on the test server.
    pub async fn on(engine: Engine) -> TestConfig {
        let mut config = TestConfig::new();
        if engine == Engine::Postgres {
            let database = PgDatabase::create().await;
            config.config.database.url = database.url.clone();
            config.postgres = Some(Arc::new(database));
        }
        config
    }

    /// The URL of its PostgreSQL database, when it is on one.
    pub fn postgres_url(&self) -> Option<&str> {
        self.postgres.as_ref().map(|d| d.url.as_str())
    }

    /// Both providers' APIs at `base` (a simulator), with the test API keys
    /// (unless a test has set keys of its own).
    pub fn provider_apis(mut self, base: &str) -> TestConfig {
        let c = &mut self.config;
        c.stripe.api_base = base.into();
        c.juice.api_base = base.into();
        if c.stripe.api_key.is_empty() {
            c.stripe.api_key = STRIPE_KEY.into();
        }
        if c.juice.api_key.is_empty() {
            c.juice.api_key = JUICE_KEY.into();
        }
        self
    }

    /// Workers that poll, time out and back off within a test's patience;
    /// the reconciler and the catch-up out of the way (histories come from
    /// deliveries, and no listing adds calls to the provider).
    pub fn quick_workers(mut self) -> TestConfig {
        let w = &mut self.config.workers;
        w.concurrency = 4;
        w.lease_secs = 10;
        w.poll_interval_ms = 50;
        w.fetch_timeout_secs = 1;
        w.http_retries = 3;
        w.backoff_base_ms = 50;
        w.backoff_max_secs = 1;
        self.config.reconcile.interval_secs = 3_600;
        self.config.backfill.enabled = false;
        self
    }

    /// Alert scans every second, and an outbox that polls and backs off in
    /// milliseconds.
    pub fn quick_alerts(mut self) -> TestConfig {
        let a = &mut self.config.alerts;
        a.scan_interval_secs = 1;
        a.delivery.poll_interval_ms = 20;
        a.delivery.backoff_base_ms = 20;
        a.delivery.backoff_max_secs = 1;
        self
    }

    /// Any other change.
    pub fn with(mut self, change: impl FnOnce(&mut Config)) -> TestConfig {
        change(&mut self.config);
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The temporary folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The SQLite file (on PostgreSQL, where nothing is at this path, the
    /// file the SQLite engine would have used: the SQLite-only helpers
    /// then find nothing there rather than another test's data).
    pub fn database_path(&self) -> PathBuf {
        self.config
            .database_path()
            .unwrap_or_else(|_| self.dir().join("cw.db"))
    }

    /// The binary listens on a free loopback port taken now, and keeps it
    /// when started again with this configuration. (Otherwise each start of
    /// the binary takes a free port of its own; in-process daemons always
    /// do.)
    pub fn on_a_fixed_port(mut self) -> TestConfig {
        self.config.server.listen = format!("127.0.0.1:{}", super::binary::free_port());
        self
    }

    /// The store, opened (and migrated) as the daemon opens it.
    pub async fn open_store(&self) -> cancelwatch::store::Store {
        cancelwatch::open_store(&self.config).await.unwrap()
    }

    /// What the pipeline's library functions (cancel, replay, backfill,
    /// reconcile) run on, as a command beside the daemon would.
    pub async fn context(&self) -> cancelwatch::pipeline::Context {
        cancelwatch::pipeline::Context::open(self.config.clone())
            .await
            .unwrap()
    }

    /// The configuration as a TOML file in the folder, for the binary.
    pub fn write_toml(&self) -> PathBuf {
        write_toml(self.dir(), &self.config)
    }
}

/// `config` as the TOML file `cancelwatch.toml` in `dir`.
pub fn write_toml(dir: &Path, config: &Config) -> PathBuf {
    let path = dir.join("cancelwatch.toml");
    std::fs::write(&path, toml::to_string(config).unwrap()).unwrap();
    path
}
