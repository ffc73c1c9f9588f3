//! Keeps a long-running daemon from growing without bound: drops raw bodies
//! of finished deliveries and old refusal records, and deletes finished
//! deliveries once the provider can no longer retry them (their dedupe keys
//! must outlive the retries). Never transitions, refunds, alerts or cancel requests.

use std::sync::Arc;
use std::time::Duration;

use crate::store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::time::Timestamp;

/// What one prune removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// Cutoff used for bodies and refusals (RFC 3339).
    pub cutoff: String,
    pub bodies_dropped: u64,
    pub refusals_deleted: u64,
    pub deliveries_deleted: u64,
}

impl std::fmt::Display for PruneReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pruned records older than {}: {} raw bodies dropped, {} refusal records deleted, \
             {} finished deliveries deleted",
            self.cutoff, self.bodies_dropped, self.refusals_deleted, self.deliveries_deleted
        )
    }
}

fn before(now: Timestamp, age: Duration) -> String {
    let age = chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX);
    crate::time::fmt(
        now.checked_sub_signed(age)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC),
    )
}

/// Prunes what is older than `older_than` at `now` (see the module docs).
pub async fn prune(
    store: &Store,
    older_than: Duration,
    now: Timestamp,
) -> Result<PruneReport, StoreError> {
    let cutoff = before(now, older_than);
    let mut deliveries_deleted = 0;
    for provider in crate::providers::knowledge::all() {
        let provider_cutoff = before(now, older_than.max(provider.retry_window()));
        deliveries_deleted += store
            .prune_deliveries(provider.name(), &provider_cutoff)
            .await?;
    }
    let bodies_dropped = store.prune_bodies(&cutoff).await?;
    let refusals_deleted = store.prune_refusals(&cutoff).await?;
    Ok(PruneReport {
        cutoff,
        bodies_dropped,
        refusals_deleted,
        deliveries_deleted,
    })
}

/// Prunes at start and then every `prune.interval_secs` until shutdown.
pub async fn run_scheduled(store: Store, config: Arc<Config>, shutdown: CancellationToken) {
    let Ok(older_than) = crate::time::parse_duration(&config.prune.older_than) else {
        // Validated at start; nothing sensible to do otherwise.
        tracing::error!("prune.older_than is not a duration; scheduled prune is off");
        return;
    };
    let every = Duration::from_secs(config.prune.interval_secs.max(1));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if !store.is_leader() {
            continue;
        }
        let pruned = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = prune(&store, older_than, crate::time::now()) => r,
        };
        match pruned {
            Ok(report) => tracing::info!(
                cutoff = %report.cutoff,
                bodies_dropped = report.bodies_dropped,
                refusals_deleted = report.refusals_deleted,
                deliveries_deleted = report.deliveries_deleted,
                "scheduled prune done"
            ),
            Err(e) => tracing::error!(error = %e, "scheduled prune failed; will try again"),
        }
    }
}
