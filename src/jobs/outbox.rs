//! Delivery of the alert outbox: one loop per sink, so a sink that keeps
//! failing (or hangs until its timeout) holds up neither the other sinks nor
//! the pipeline. At least once: a row is marked delivered only after its sink
//! accepted it; a failed attempt is recorded and retried with exponential
//! backoff and jitter, capped, forever. Everything lives in the database, so
//! a restart picks up where it stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alerts::sinks::{self, Sink};
use crate::config::{AlertDeliveryConfig, Config};
use crate::store::model::{Attempt, OutboxRow};
use crate::store::{Store, StoreError};
use crate::time;

/// Rows taken per look at the outbox.
const BATCH: i64 = 32;

/// The wait before the next attempt after `failures` failed attempts (≥ 1):
/// `base · 2^(failures-1)`, capped at `backoff_max_secs`, then jittered into
/// its upper half by `jitter` (0 ≤ jitter < 1).
pub fn backoff(cfg: &AlertDeliveryConfig, failures: i64, jitter: f64) -> Duration {
    let cap_ms = cfg.backoff_max_secs.saturating_mul(1000).max(1);
    let exp = u32::try_from(failures.saturating_sub(1).clamp(0, 62)).unwrap_or(62);
    let full_ms = cfg
        .backoff_base_ms
        .max(1)
        .saturating_mul(2u64.saturating_pow(exp))
        .min(cap_ms);
    let half = full_ms as f64 / 2.0;
    Duration::from_millis((half + half * jitter.clamp(0.0, 1.0)) as u64)
}

/// Spawns one delivery loop per configured sink into `tasks`, and warns
/// once about alerts waiting for a sink that is no longer configured.
pub fn spawn(
    store: &Store,
    config: &Arc<Config>,
    shutdown: &CancellationToken,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    let http = sinks::http_client(config);
    for sink in sinks::from_config(config, &http) {
        tasks.spawn(run_sink(
            store.clone(),
            config.clone(),
            sink,
            shutdown.clone(),
        ));
    }
    let (store, config) = (store.clone(), config.clone());
    tasks.spawn(async move {
        match orphaned(&store, &config).await {
            Ok(orphaned) => {
                for (sink, waiting) in orphaned {
                    tracing::warn!(
                        %sink,
                        waiting,
                        "alert deliveries wait for a sink that is no longer configured; they stay pending (nothing is dropped) and go out if a sink of that name comes back"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "alert outbox: database error"),
        }
    });
}

/// Sinks that are not configured (any more) with how many alert deliveries
/// wait for them.
pub async fn orphaned(store: &Store, config: &Config) -> Result<Vec<(String, i64)>, StoreError> {
    let configured: Vec<String> = (0..config.alerts.sinks.len())
        .map(|i| config.sink_name(i))
        .collect();
    Ok(store
        .outbox_pending()
        .await?
        .into_iter()
        .filter(|b| !configured.contains(&b.sink))
        .map(|b| (b.sink, b.waiting))
        .collect())
}

/// Delivers the due rows of one sink until `shutdown`.
pub async fn run_sink(store: Store, config: Arc<Config>, sink: Sink, shutdown: CancellationToken) {
    let poll = Duration::from_millis(config.alerts.delivery.poll_interval_ms.max(10));
    while !shutdown.is_cancelled() {
        // One replica at a time sends (the leader): each version in order,
        // at least once.
        let busy = store.is_leader()
            && match deliver_due(&store, &config.alerts.delivery, &sink, &shutdown).await {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::error!(sink = %sink.name, error = %e, "alert outbox: database error");
                    false
                }
            };
        if !busy {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }
}

/// One pass over the due rows of `sink`: one attempt each, recorded.
/// Returns how many rows were attempted.
pub async fn deliver_due(
    store: &Store,
    cfg: &AlertDeliveryConfig,
    sink: &Sink,
    shutdown: &CancellationToken,
) -> Result<usize, StoreError> {
    let rows = store
        .outbox_due(&sink.name, &time::now_str(), BATCH)
        .await?;
    for row in &rows {
        let outcome = tokio::select! {
            // Not recorded: the row stays pending and goes out after a restart.
            _ = shutdown.cancelled() => return Ok(0),
            o = sink.deliver(row) => o,
        };
        record(store, cfg, sink, row, &outcome).await?;
    }
    Ok(rows.len())
}

async fn record(
    store: &Store,
    cfg: &AlertDeliveryConfig,
    sink: &Sink,
    row: &OutboxRow,
    outcome: &sinks::Outcome,
) -> Result<(), StoreError> {
    let now = time::now();
    let attempt = Attempt {
        attempted_at: time::fmt(now),
        status_code: outcome.status_code.map(i64::from),
        error: outcome.error.clone(),
    };
    if outcome.is_delivered() {
        tracing::debug!(sink = %sink.name, alert = %row.alert_id, version = row.alert_version, "alert delivered");
        return store.outbox_delivered(row.id, &attempt).await;
    }
    metrics::counter!("cancelwatch_alert_delivery_failures_total", "sink" => sink.name.clone())
        .increment(1);
    let wait = backoff(cfg, row.attempts + 1, rand::random::<f64>());
    let next = now + chrono::Duration::milliseconds(wait.as_millis().min(i64::MAX as u128) as i64);
    tracing::warn!(
        sink = %sink.name,
        alert = %row.alert_id,
        version = row.alert_version,
        attempts = row.attempts + 1,
        retry_in_ms = wait.as_millis() as u64,
        error = attempt.error.as_deref().unwrap_or(""),
        "alert delivery failed; will retry"
    );
    store.outbox_retry(row.id, &attempt, &time::fmt(next)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(base_ms: u64, max_secs: u64) -> AlertDeliveryConfig {
        AlertDeliveryConfig {
            backoff_base_ms: base_ms,
            backoff_max_secs: max_secs,
            ..AlertDeliveryConfig::default()
        }
    }

    #[test]
    fn backoff_doubles_within_its_jitter_band() {
        let c = cfg(1_000, 900);
        assert_eq!(backoff(&c, 1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(&c, 1, 1.0), Duration::from_millis(1_000));
        assert_eq!(backoff(&c, 2, 0.0), Duration::from_millis(1_000));
        assert_eq!(backoff(&c, 3, 0.5), Duration::from_millis(3_000));
        for n in 1..10 {
            let lo = backoff(&c, n, 0.0);
            let hi = backoff(&c, n, 0.999);
            let mid = backoff(&c, n, 0.3);
            assert!(lo <= mid && mid <= hi);
            assert!(backoff(&c, n + 1, 0.0) >= lo);
        }
    }

    #[test]
    fn backoff_is_capped_and_never_stops() {
        let c = cfg(1_000, 900);
        for n in [11, 20, 63, 1_000, i64::MAX] {
            let d = backoff(&c, n, 0.999);
            assert!(d <= Duration::from_secs(900), "{n}: {d:?}");
            assert!(backoff(&c, n, 0.0) >= Duration::from_secs(450), "{n}");
        }
    }
}
