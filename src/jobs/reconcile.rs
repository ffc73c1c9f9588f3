//! The reconciler: every `reconcile.interval_secs`, fetches again the
//! resources whose `next_reconcile_at` has come (those still moving, Juice
//! items whose refund is pending, fetched through their bulk transfer, less
//! often the longer it has been pending, and settled ones their provider may
//! still move, such as posted Stripe outbound transfers during their return
//! watch; see `domain::observe::next_reconcile`) and records them with
//! trigger `reconcile`. A failed fetch pushes that resource back, doubling
//! up to `reconcile.max_interval_secs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::observe::Trigger;
use crate::pipeline::Context;
use crate::providers::{knowledge, provider_of, ProviderError, Target};
use crate::store::model::Resource;
use crate::store::StoreError;
use crate::time;

/// Most resources looked at in one run.
const BATCH: i64 = 200;

/// Runs until `shutdown`: one pass per interval.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let interval = Duration::from_secs(ctx.config.reconcile.interval_secs.max(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
        if !ctx.store.is_leader() {
            continue;
        }
        match run_once(&ctx).await {
            Ok(n) if n > 0 => tracing::debug!(fetched = n, "reconcile pass done"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "reconcile pass failed"),
        }
    }
}

/// The fetch target that brings news of a resource: Juice items come with their bulk transfer.
pub fn target_of(r: &Resource) -> Option<Target> {
    knowledge::reconcile_target(&r.kind, &r.id, r.parent_id.as_deref(), r.context.as_deref())
}

/// The wait after `failures` failed fetches in a row: interval·2^failures, capped.
pub fn backoff_after(failures: i64, interval_secs: u64, max_secs: u64) -> Duration {
    let exp = failures.clamp(0, 20) as u32;
    let secs = interval_secs.max(1).saturating_mul(1u64 << exp);
    Duration::from_secs(secs.min(max_secs.max(interval_secs.max(1))))
}

/// One pass; returns how many fetches were made.
pub async fn run_once(ctx: &Context) -> Result<usize, StoreError> {
    metrics::counter!("cancelwatch_reconcile_runs_total").increment(1);
    let due = ctx.store.due_for_reconcile(&time::now_str(), BATCH).await?;
    // One fetch per target, however many due resources it covers.
    let mut targets: BTreeMap<(String, String), (Target, Vec<Resource>)> = BTreeMap::new();
    for r in due {
        match target_of(&r) {
            Some(t) => targets
                .entry((t.kind.clone(), t.id.clone()))
                .or_insert_with(|| (t, Vec::new()))
                .1
                .push(r),
            None => {
                tracing::warn!(resource = %r.id, kind = %r.kind, "cannot reconcile: no parent known");
                push_back(ctx, &[r]).await?;
            }
        }
    }
    let mut fetched = 0;
    for (target, covered) in targets.into_values() {
        let span = tracing::info_span!("reconcile", resource = %target.id, kind = %target.kind);
        fetched += 1;
        reconcile_one(ctx, target, covered).instrument(span).await?;
    }
    Ok(fetched)
}

async fn reconcile_one(
    ctx: &Context,
    target: Target,
    covered: Vec<Resource>,
) -> Result<(), StoreError> {
    let Some(provider) = ctx.providers.api(provider_of(&target.kind)).cloned() else {
        tracing::warn!("cannot reconcile: no API key for this provider");
        return push_back(ctx, &covered).await;
    };
    match provider.fetch(&target).await {
        Ok(obs) => {
            let (recorded, changes) = ctx
                .store
                .record_observation(
                    &ctx.config,
                    &obs,
                    &Trigger::reconcile(),
                    target.context.as_deref(),
                    time::now(),
                )
                .await?;
            recorded.report();
            crate::alerts::report(&changes);
            // A due resource the answer did not mention (an item gone from its
            // bulk transfer) is pushed back rather than fetched every pass.
            let missing: Vec<Resource> = covered
                .into_iter()
                .filter(|r| !recorded.rids.contains(&r.rid))
                .collect();
            push_back(ctx, &missing).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "reconcile fetch failed");
            if let ProviderError::NotFound(_) = e {
                let covered: Vec<&Resource> = covered.iter().collect();
                ctx.store.mark_not_found(&covered, &time::now_str()).await?;
            }
            push_back(ctx, &covered).await
        }
    }
}

/// Counts a failure for each resource and moves its next fetch back.
async fn push_back(ctx: &Context, rs: &[Resource]) -> Result<(), StoreError> {
    if rs.is_empty() {
        return Ok(());
    }
    let cfg = &ctx.config.reconcile;
    let next: Vec<(i64, String)> = rs
        .iter()
        .map(|r| {
            let wait = backoff_after(
                r.reconcile_failures + 1,
                cfg.interval_secs,
                cfg.max_interval_secs,
            );
            let at = time::now() + chrono::Duration::from_std(wait).unwrap_or_default();
            (r.rid, time::fmt(at))
        })
        .collect();
    ctx.store.reconcile_failed(&next).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff_after(0, 60, 3600), Duration::from_secs(60));
        assert_eq!(backoff_after(1, 60, 3600), Duration::from_secs(120));
        assert_eq!(backoff_after(3, 60, 3600), Duration::from_secs(480));
        assert_eq!(backoff_after(10, 60, 3600), Duration::from_secs(3600));
        assert_eq!(backoff_after(1000, 60, 3600), Duration::from_secs(3600));
    }
}
