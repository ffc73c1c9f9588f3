//! A PostgreSQL database of a run's own on the server `--database-url`
//! names: created empty before the run, dropped after it, so that runs
//! never measure each other's rows.

use anyhow::Context;
use sqlx::{Connection, PgConnection};

pub struct RunDatabase {
    server: String,
    name: String,
    /// The URL the daemons are given.
    pub url: String,
}

impl RunDatabase {
    pub async fn create(server: &str) -> anyhow::Result<RunDatabase> {
        let name = format!("cw_bench_{}_{}", std::process::id(), rand::random::<u32>());
        let mut conn = PgConnection::connect(server)
            .await
            .with_context(|| format!("--database-url: connecting to {}", redacted(server)))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .context("creating the run's database")?;
        let _ = conn.close().await;
        let mut url = url::Url::parse(server).context("--database-url is not a URL")?;
        url.set_path(&name);
        Ok(RunDatabase {
            server: server.to_string(),
            name,
            url: url.to_string(),
        })
    }

    /// Drops it (its connections ended first); a failure is only said.
    pub async fn drop(self) {
        let dropped = async {
            let mut conn = PgConnection::connect(&self.server).await?;
            sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut conn)
            .await?;
            conn.close().await
        };
        if let Err(e) = dropped.await {
            eprintln!(
                "cancelwatch-bench: could not drop database {}: {e}",
                self.name
            );
        }
    }
}

/// The URL without its password, to name it in an error.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}
