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
