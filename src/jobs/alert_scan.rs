//! Time-based rules, evaluated every `alerts.scan_interval_secs`: `stuck`,
//! `refund_overdue` and `verification_failures` (decided in
//! [`crate::domain::alerts`], evaluated by the store in one transaction).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::store::Store;
use crate::time;

/// Scans every `alerts.scan_interval_secs` until `shutdown`.
pub async fn run(store: Store, config: Arc<Config>, shutdown: CancellationToken) {
    let every = Duration::from_secs(config.alerts.scan_interval_secs.max(1));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if !store.is_leader() {
            continue;
        }
        match store.scan_alerts(&config, time::now()).await {
            Ok(changes) => crate::alerts::report(&changes),
            Err(e) => {
                tracing::error!(error = %e, "alert scan failed; retrying at the next interval")
            }
        }
    }
}
