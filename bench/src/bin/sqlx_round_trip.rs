//! What one statement costs through sqlx's SQLite driver on this machine:
//! every statement is a round trip to the connection's own thread, and that
//! hand-off, not SQLite, is what the pipeline pays per statement (see the
//! README's Performance section).
//!
//! `cargo run --release -p cancelwatch-bench --bin sqlx_round_trip`

use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

const N: usize = 20_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let options = SqliteConnectOptions::new()
        .filename(dir.path().join("probe.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, k TEXT UNIQUE, v TEXT)")
        .execute(&pool)
        .await?;
    let mut conn = pool.acquire().await?;

    let started = Instant::now();
    for _ in 0..N {
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
    }
    report("SELECT 1", started);

    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let started = Instant::now();
    for i in 0..N {
        sqlx::query("INSERT INTO t (k, v) VALUES (?, ?)")
            .bind(format!("k{i}"))
            .bind("a value")
            .execute(&mut *tx)
            .await?;
    }
    report("INSERT one row (in one transaction)", started);
    tx.commit().await?;

    let started = Instant::now();
    for i in 0..N {
        let _: Option<(i64,)> = sqlx::query_as("SELECT id FROM t WHERE k = ?")
            .bind(format!("k{i}"))
            .fetch_optional(&mut *conn)
            .await?;
    }
    report("SELECT one row by key", started);

    let started = Instant::now();
    let rows: Vec<(i64,)> = sqlx::query_as("SELECT id FROM t")
        .fetch_all(&mut *conn)
        .await?;
    println!(
        "{:<40} {:>8.2} us a row ({} rows in one statement)",
        "SELECT every row",
        started.elapsed().as_secs_f64() * 1e6 / rows.len() as f64,
        rows.len()
    );
    Ok(())
}

fn report(what: &str, started: Instant) {
    println!(
        "{what:<40} {:>8.1} us a statement",
        started.elapsed().as_secs_f64() * 1e6 / N as f64
    );
}
