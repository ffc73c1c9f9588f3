//! Background jobs beside the pipeline: the reconciler (fetches again what
//! still moves), the catch-up (takes in events the providers list that no
//! webhook brought), the time-based alert scan, the alert outbox (one loop
//! per sink) and the pruner. Each runs until shutdown.

pub mod alert_scan;
pub mod catch_up;
pub mod outbox;
pub mod prune;
pub mod reconcile;

use std::sync::Arc;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::pipeline::Context;

/// Starts every configured job into `tasks`.
pub fn spawn(ctx: &Arc<Context>, shutdown: &CancellationToken, tasks: &mut JoinSet<()>) {
    let (store, config) = (&ctx.store, &ctx.config);
    tasks.spawn(alert_scan::run(
        store.clone(),
        config.clone(),
        shutdown.clone(),
    ));
    outbox::spawn(store, config, shutdown, tasks);
    if config.reconcile.enabled {
        tasks.spawn(reconcile::run(ctx.clone(), shutdown.clone()));
    }
    if config.backfill.enabled {
        tasks.spawn(catch_up::run(ctx.clone(), shutdown.clone()));
    }
    if config.prune.enabled {
        tasks.spawn(prune::run_scheduled(
            store.clone(),
            config.clone(),
            shutdown.clone(),
        ));
    }
}
