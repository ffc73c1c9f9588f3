//! A large Juice bulk transfer fetched again and again while it moves, as
//! the reconciler does every `reconcile.interval_secs`: what each recording
//! of the same answer costs, and what one with a single item changed costs.
//!
//! ```text
//! cargo run --release -p cancelwatch-bench --bin bulk_refetch -- --items 100000
//! ```
//!
//! Records the answer (a bulk transfer `executing` with every item
//! `processing`) into a fresh SQLite database through the store, as the
//! pipeline does; then the same answer three more times, a minute apart on
//! the recording clock; then the answer with one item `completed`. Prints,
//! per recording, its time, the item rows it wrote (those whose
//! `last_observed_at` is that recording's time), the transitions written,
//! how much the WAL and the database file grew, and the peak RSS so far.

use std::time::Instant;

use anyhow::Context;
use cancelwatch::config::{Config, DatabaseUrl};
use cancelwatch::domain::observe::Trigger;
use cancelwatch::providers::juice::objects::decode_bulk;
use serde_json::json;

fn items_arg() -> anyhow::Result<usize> {
    let mut items = 100_000;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--items" => items = value.parse().with_context(|| format!("--items {value}"))?,
            _ => anyhow::bail!("unknown flag {flag} (--items)"),
        }
    }
    Ok(items)
}

/// Bulk transfer `bt_bench` as the provider answers it: `items` items, the
/// one numbered 0 in status `status_of_zero`, every other `processing`.
fn answer(items: usize, status_of_zero: &str) -> serde_json::Value {
    let items: Vec<serde_json::Value> = (0..items)
        .map(|n| {
            json!({"id": format!("it_{n:06}"), "amount": 1000 + n, "currency": "NGN",
                   "status": if n == 0 { status_of_zero } else { "processing" },
                   "beneficiary": {"account_number": "0000000000", "bank_code": "000"}})
        })
        .collect();
    json!({"data": {"id": "bt_bench", "status": "executing", "currency": "NGN",
                    "total_transfer_count": items.len(), "items": items}})
}

fn file_len(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let items = items_arg()?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bulk.db");
    let wal = dir.path().join("bulk.db-wal");
    let config = Config::default();
    let store =
        cancelwatch::store::open(&config.database, &DatabaseUrl::Sqlite(path.clone())).await?;
    let reader = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display())).await?;
    let reversed = &config.juice.reversed_statuses;
    let body = answer(items, "processing").to_string();
    println!(
        "bulk transfer of {items} items, an answer of {:.1} MB",
        body.len() as f64 / 1e6
    );
    let start = chrono::Utc::now();
    let rounds = [
        ("new", "processing"),
        ("same answer", "processing"),
        ("same answer", "processing"),
        ("same answer", "processing"),
        ("one item moved", "completed"),
    ];
    for (n, (what, status_of_zero)) in rounds.into_iter().enumerate() {
        let obs = decode_bulk("bt_bench", answer(items, status_of_zero), reversed)
            .map_err(anyhow::Error::msg)?;
        let now = start + chrono::Duration::seconds(60 * n as i64);
        let (wal_before, db_before) = (file_len(&wal), file_len(&path));
        let took = Instant::now();
        let (recorded, _) = store
            .record_observation(&config, &obs, &Trigger::reconcile(), None, now)
            .await?;
        let took = took.elapsed();
        let written: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM resources WHERE kind = 'juice.transfer' AND last_observed_at = ?",
        )
        .bind(cancelwatch::time::fmt(now))
        .fetch_one(&reader)
        .await?;
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        println!(
            "{what}: {:.0} ms; {written} item rows written, {} transitions; WAL +{:.1} MiB, database +{:.1} MiB; peak RSS {:.0} MiB",
            took.as_secs_f64() * 1000.0,
            recorded.transitions.len(),
            file_len(&wal).saturating_sub(wal_before) as f64 / 1048576.0,
            file_len(&path).saturating_sub(db_before) as f64 / 1048576.0,
            rss as f64 / 1024.0
        );
    }
    reader.close().await;
    store.close().await;
    Ok(())
}
