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
