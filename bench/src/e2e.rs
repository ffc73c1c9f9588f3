//! End to end: deliveries about resources a simulator knows, and how long
//! the daemon took to record each.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cancelwatch_sim::{SimConfig, Simulator};

use crate::report::E2eReport;
use crate::{BenchArgs, API_KEY, SECRET};

/// A simulator started in this process and, for each delivery to send, a
/// thin event about an outbound transfer already canceled there.
pub struct E2eWorld {
    pub sim: Simulator,
    /// (event id, body)
    pub bodies: Arc<Vec<(String, Vec<u8>)>>,
}

impl E2eWorld {
    pub async fn prepare(args: &BenchArgs) -> anyhow::Result<E2eWorld> {
        let count = args.e2e_events.unwrap_or(if args.rate > 0 {
            (args.rate * args.duration) as usize
        } else {
            40_000
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim = Simulator::start(
            listener,
            SimConfig {
                stripe_api_key: API_KEY.into(),
                stripe_webhook_secret: SECRET.into(),
                ..SimConfig::default()
            },
        )
        .await?;
        let mut bodies = Vec::with_capacity(count);
        for _ in 0..count {
            let scenario = sim
                .scenario("outbound_transfer_canceled")
                .context("the simulator has the outbound_transfer_canceled scenario")?;
            for step in &scenario.steps {
                sim.apply_step(step);
            }
            let last = scenario
                .steps
                .last()
                .and_then(|s| s.deliveries.last())
                .context("the scenario ends with a delivery")?;
            let id = last
                .event_id()
                .context("a Stripe event has an id")?
                .to_string();
            bodies.push((id, serde_json::to_vec(&last.body)?));
        }
        Ok(E2eWorld {
            sim,
            bodies: Arc::new(bodies),
        })
    }
}

/// Where the daemon under test keeps its data.
#[derive(Debug, Clone)]
pub enum DatabaseAt {
    /// Its SQLite file.
    Sqlite(PathBuf),
    /// Its PostgreSQL database, shared by every replica.
    Postgres(String),
}

/// Waits (up to 60 s) until the daemon has processed every accepted delivery, then measures
/// send-to-record times from the daemon's own database.
pub async fn e2e_report(db: &DatabaseAt, sent: &[(String, i64)]) -> anyhow::Result<E2eReport> {
    let recorded = transitions_triggered_by_events(db).await?;
    let sent_at: std::collections::HashMap<&str, i64> =
        sent.iter().map(|(id, t)| (id.as_str(), *t)).collect();
    let mut latencies_ms = Vec::new();
    let mut last = i64::MIN;
    for (trigger, observed) in &recorded {
        let (Some(&t0), Some(t1)) = (
            sent_at.get(trigger.as_str()),
            chrono::DateTime::parse_from_rfc3339(observed).ok(),
        ) else {
            continue;
        };
        let t1 = t1.timestamp_millis();
        last = last.max(t1);
        latencies_ms.push((t1 - t0).max(0) as u64);
    }
    let first = sent.iter().map(|(_, t)| *t).min().unwrap_or(0);
    let per_second = if latencies_ms.is_empty() {
        0.0
    } else {
        latencies_ms.len() as f64 / ((last - first) as f64 / 1000.0).max(0.001)
    };
    Ok(E2eReport {
        recorded: latencies_ms.len(),
        per_second,
        latencies_ms,
    })
}

/// Asking what is left is a few index range scans (counting the
/// transitions would read every row, snapshots and all, ten times a
/// second, beside the daemon still at work); the rows are read once.
const UNFINISHED: &str =
    "SELECT count(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')";
const RECORDED: &str = "SELECT trigger_id, observed_at FROM transitions
     WHERE trigger_type = 'event' AND trigger_id IS NOT NULL ORDER BY id";

/// A connection to the daemon's database, of either engine.
enum Reader {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Reader {
    async fn open(db: &DatabaseAt) -> anyhow::Result<Reader> {
        Ok(match db {
            DatabaseAt::Sqlite(path) => Reader::Sqlite(
                sqlx::sqlite::SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(
                        sqlx::sqlite::SqliteConnectOptions::new()
                            .filename(path)
                            .read_only(true),
                    )
                    .await
                    .context("opening the daemon's database")?,
            ),
            DatabaseAt::Postgres(url) => Reader::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(1)
                    .connect(url)
                    .await
                    .context("connecting to the daemons' database")?,
            ),
        })
    }

    async fn unfinished(&self) -> Result<i64, sqlx::Error> {
        match self {
            Reader::Sqlite(p) => sqlx::query_scalar(UNFINISHED).fetch_one(p).await,
            Reader::Postgres(p) => sqlx::query_scalar(UNFINISHED).fetch_one(p).await,
        }
    }

    async fn recorded(&self) -> Result<Vec<(String, String)>, sqlx::Error> {
        match self {
            Reader::Sqlite(p) => sqlx::query_as(RECORDED).fetch_all(p).await,
            Reader::Postgres(p) => sqlx::query_as(RECORDED).fetch_all(p).await,
        }
    }

    async fn close(self) {
        match self {
            Reader::Sqlite(p) => p.close().await,
            Reader::Postgres(p) => p.close().await,
        }
    }
}

/// (event id, observed at) of every transition an event triggered, read
/// from the daemon's database (read-only) once the daemon has nothing
/// left to process, or after 60 s. The one place the bench reads the
/// daemon's schema: the states of unfinished deliveries in `inbox` and the
/// trigger columns of `transitions`. The daemon's API would page through
/// every transition in the daemon's own process, whose CPU time the run
/// measures.
async fn transitions_triggered_by_events(db: &DatabaseAt) -> anyhow::Result<Vec<(String, String)>> {
    let reader = Reader::open(db).await?;
    for _ in 0..600 {
        let unfinished = reader
            .unfinished()
            .await
            .context("counting the daemon's unfinished deliveries")?;
        if unfinished == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded = reader
        .recorded()
        .await
        .context("reading the daemon's transitions")?;
    reader.close().await;
    Ok(recorded)
}
