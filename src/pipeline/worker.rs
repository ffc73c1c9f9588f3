//! Workers: claim a delivery (lease, arrival order, one per resource at a
//! time), decide what it is about, fetch that resource, and record the
//! observation and the delivery's end in ONE write transaction. A failed
//! attempt is retried with backoff; after `workers.max_attempts` the delivery
//! goes `dead` and the others go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::record::{self, Trigger};
use super::Context;
use crate::config::{Config, JuiceConfig, StripeConfig};
use crate::providers::http::backoff;
use crate::providers::juice::event as juice_event;
use crate::providers::{juice, stripe, ApiError, Target};
use crate::store::inbox::Delivery;
use crate::store::{self, resources};
use crate::time;

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to fetch: the delivery is marked `ignored`.
    Ignore(String),
    /// Fetch this resource; with `reversal`, also complete that transfer's refund.
    Fetch {
        target: Target,
        reversal: Option<String>,
    },
    /// A reversal event naming only a transfer: complete its refund.
    Reversal(String),
}

/// Decides what a stored delivery is about (pure: from its columns and body).
pub fn plan(stripe_cfg: &StripeConfig, juice_cfg: &JuiceConfig, d: &Delivery) -> Plan {
    let body: Option<Value> = d
        .raw_body
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok());
    match d.provider.as_str() {
        stripe::NAME => {
            let followed = d
                .event_type
                .starts_with("v2.money_management.outbound_transfer.")
                || d.event_type.starts_with("v2.core.batch_job.")
                || stripe_cfg.follow_event_types.contains(&d.event_type);
            let (Some(kind), Some(id)) = (&d.resource_kind, &d.resource_id) else {
                return Plan::Ignore("the event names no related object".into());
            };
            if !followed {
                return Plan::Ignore(format!("event type {} is not followed", d.event_type));
            }
            let url = body
                .as_ref()
                .and_then(|b| b.pointer("/related_object/url"))
                .and_then(Value::as_str)
                .map(str::to_string);
            Plan::Fetch {
                target: Target {
                    kind: kind.clone(),
                    id: id.clone(),
                    context: d.context.clone(),
                    url,
                    trigger_event: d.event_id.clone(),
                },
                reversal: None,
            }
        }
        juice::NAME => {
            let reversal = if juice_cfg.reversal_events.contains(&d.event_type) {
                body.as_ref()
                    .and_then(|b| b.get("data"))
                    .and_then(|data| juice_event::transfer_id(&d.event_type, data))
            } else {
                None
            };
            match (&d.resource_kind, &d.resource_id, reversal) {
                (Some(kind), Some(id), reversal) => Plan::Fetch {
                    target: Target {
                        kind: kind.clone(),
                        id: id.clone(),
                        ..Target::default()
                    },
                    reversal,
                },
                (_, _, Some(transfer)) => Plan::Reversal(transfer),
                _ => Plan::Ignore(format!("event {} names no bulk transfer", d.event_type)),
            }
        }
        other => Plan::Ignore(format!("unknown provider {other}")),
    }
}

/// The trigger recorded for a delivery's observations.
pub fn trigger_of(d: &Delivery) -> Trigger {
    let id = d.event_id.clone().unwrap_or_else(|| d.dedupe_key.clone());
    if d.source == "backfill" {
        Trigger::backfill(id)
    } else {
        Trigger::event(id)
    }
}

/// The lease end of a claim made now.
pub fn lease_until(config: &Config) -> String {
    time::fmt(time::now() + chrono::Duration::seconds(config.workers.lease_secs as i64))
}

/// Starts `workers.concurrency` workers into `tasks`; they stop when
/// `shutdown` fires. `alive` counts the running ones (readiness).
pub fn spawn(
    ctx: Arc<Context>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: CancellationToken,
    alive: Arc<AtomicUsize>,
) {
    for n in 0..ctx.config.workers.concurrency {
        tasks.spawn(run(ctx.clone(), n, shutdown.clone(), alive.clone()));
    }
}

/// Decrements the live-worker count however the worker ends (panics too).
struct AliveGuard(Arc<AtomicUsize>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One worker: claim, process, repeat; idle until woken or the poll interval.
pub async fn run(
    ctx: Arc<Context>,
    n: usize,
    shutdown: CancellationToken,
    alive: Arc<AtomicUsize>,
) {
    alive.fetch_add(1, Ordering::SeqCst);
    let _guard = AliveGuard(alive);
    let poll = Duration::from_millis(ctx.config.workers.poll_interval_ms.max(10));
    tracing::debug!(worker = n, "worker started");
    while !shutdown.is_cancelled() {
        // Registered before the claim so a delivery arriving in between still wakes us.
        let woken = ctx.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let lease = lease_until(&ctx.config);
        match store::inbox::claim(&ctx.db.write, &time::now_str(), &lease).await {
            Ok(Some(d)) => {
                process_guarded(&ctx, d, lease).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(worker = n, error = %e, "claiming a delivery failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut woken => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
    tracing::debug!(worker = n, "worker stopped");
}

/// Processes a delivery in a task of its own, so a panic in one event's
/// processing costs that attempt (and in the end dead-letters the event),
/// never the worker.
async fn process_guarded(ctx: &Arc<Context>, d: Delivery, lease: String) {
    let task = tokio::spawn({
        let ctx = ctx.clone();
        let d = d.clone();
        let lease = lease.clone();
        async move { process(&ctx, d, &lease).await }
    });
    if let Err(e) = task.await {
        let span = tracing::error_span!("delivery", key = %d.dedupe_key, resource = %d.resource_id.as_deref().unwrap_or("-"));
        async {
            let error = if e.is_panic() {
                "processing panicked (a bug): see the log"
            } else {
                "processing was cancelled"
            };
            tracing::error!(error = %e, "{error}");
            if let Err(e) = fail(ctx, &d, &lease, error, None).await {
                tracing::error!(error = %e, "recording the failed attempt failed; the lease will run out");
            }
        }
        .instrument(span)
        .await
    }
}

/// Processes one claimed delivery to its end for this attempt. Errors are
/// handled here (retry, dead letter, release); nothing is returned.
pub async fn process(ctx: &Context, d: Delivery, lease_until: &str) {
    let span = tracing::info_span!(
        "delivery",
        key = %d.dedupe_key,
        resource = %d.resource_id.as_deref().unwrap_or("-"),
        provider = %d.provider,
        event_type = %d.event_type,
        attempt = d.attempts,
    );
    async {
        if let Err(e) = process_inner(ctx, &d, lease_until).await {
            // Only database errors reach here; the lease runs out and the delivery comes back.
            tracing::error!(error = %e, "processing a delivery failed on the database; it will be retried when its lease runs out");
        }
    }
    .instrument(span)
    .await
}

async fn process_inner(ctx: &Context, d: &Delivery, lease_until: &str) -> Result<(), sqlx::Error> {
    let config = &ctx.config;
    if d.attempts > i64::from(config.workers.max_attempts) {
        // Earlier holders never finished (the process died, or hung past its
        // lease): after the last attempt the delivery is given up, not retried forever.
        let error = format!(
            "{} attempts whose worker never finished (lease ran out each time)",
            d.attempts - 1
        );
        return fail(ctx, d, lease_until, &error, None).await;
    }
    let trigger = trigger_of(d);
    match plan(&config.stripe, &config.juice, d) {
        Plan::Ignore(reason) => {
            let mut tx = ctx.db.write.begin().await?;
            if store::inbox::finish(&mut tx, d.id, lease_until, "ignored", &time::now_str()).await?
            {
                tx.commit().await?;
                tracing::debug!(%reason, "delivery ignored");
            } else {
                lease_lost(tx).await?;
            }
            Ok(())
        }
        Plan::Reversal(transfer) => {
            let now = time::now();
            let mut tx = ctx.db.write.begin().await?;
            if !record::record_reversal(&mut tx, config, &transfer, &trigger, now).await? {
                tx.rollback().await?;
                let error = format!("reversal of transfer {transfer}, which is not known yet");
                return fail(ctx, d, lease_until, &error, None).await;
            }
            if store::inbox::finish(&mut tx, d.id, lease_until, "processed", &time::fmt(now))
                .await?
            {
                tx.commit().await?;
                tracing::info!(%transfer, "reversal recorded");
            } else {
                lease_lost(tx).await?;
            }
            Ok(())
        }
        Plan::Fetch { target, reversal } => {
            let Some(provider) = ctx.providers.api(&d.provider).cloned() else {
                return release(
                    ctx,
                    d,
                    lease_until,
                    &ApiError::NotConfigured(provider_name(d)),
                )
                .await;
            };
            match provider.fetch(&target).await {
                Ok(obs) => {
                    let now = time::now();
                    let mut tx = ctx.db.write.begin().await?;
                    let recorded = record::record(
                        &mut tx,
                        config,
                        &obs,
                        &trigger,
                        target.context.as_deref(),
                        now,
                    )
                    .await?;
                    if let Some(transfer) = &reversal {
                        if !record::record_reversal(&mut tx, config, transfer, &trigger, now)
                            .await?
                        {
                            tx.rollback().await?;
                            let error = format!("reversal of transfer {transfer}, which bulk transfer {} does not list", target.id);
                            return fail(ctx, d, lease_until, &error, None).await;
                        }
                    }
                    if store::inbox::finish(
                        &mut tx,
                        d.id,
                        lease_until,
                        "processed",
                        &time::fmt(now),
                    )
                    .await?
                    {
                        tx.commit().await?;
                        tracing::debug!(status = %obs.status, transitions = recorded.transitions, stale = recorded.stale, "delivery processed");
                    } else {
                        lease_lost(tx).await?;
                    }
                    Ok(())
                }
                Err(e @ (ApiError::Unauthorized(_) | ApiError::NotConfigured(_))) => {
                    release(ctx, d, lease_until, &e).await
                }
                Err(ApiError::NotFound(detail)) => {
                    let now = time::now_str();
                    let mut tx = ctx.db.write.begin().await?;
                    let rid = resources::ensure(
                        &mut tx,
                        &d.provider,
                        &target.kind,
                        &target.id,
                        None,
                        target.context.as_deref(),
                        &now,
                    )
                    .await?;
                    resources::mark_not_found(&mut tx, rid, &now, None).await?;
                    let error = format!("the resource does not exist: {detail}");
                    if store::inbox::fail(&mut tx, d.id, lease_until, &error, &now, true).await? {
                        // ALERTS HOOK: crate::alerts::rules::on_dead_letter(&mut tx, config, d.id, &error, &now).await?;
                        tx.commit().await?;
                        metrics::counter!("cancelwatch_deliveries_dead_total", "provider" => provider_name(d)).increment(1);
                        tracing::error!(%error, "delivery dead: its resource is not found");
                    } else {
                        lease_lost(tx).await?;
                    }
                    Ok(())
                }
                Err(e @ ApiError::Retryable { .. }) | Err(e @ ApiError::Permanent(_)) => {
                    let retry_after = match &e {
                        ApiError::Retryable { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    fail(ctx, d, lease_until, &e.to_string(), retry_after).await
                }
            }
        }
    }
}

fn provider_name(d: &Delivery) -> &'static str {
    match d.provider.as_str() {
        stripe::NAME => stripe::NAME,
        juice::NAME => juice::NAME,
        _ => "unknown",
    }
}

/// Our lease ran out while we worked: another worker owns the delivery now,
/// so nothing of this attempt is kept.
async fn lease_lost(tx: store::Tx<'_>) -> Result<(), sqlx::Error> {
    tx.rollback().await?;
    tracing::warn!("the lease ran out before the delivery was finished; this attempt is dropped");
    Ok(())
}

/// A failed attempt: retry later with backoff (at least what the provider
/// asked for), or `dead` once `workers.max_attempts` is reached.
async fn fail(
    ctx: &Context,
    d: &Delivery,
    lease_until: &str,
    error: &str,
    retry_after: Option<Duration>,
) -> Result<(), sqlx::Error> {
    let w = &ctx.config.workers;
    let dead = d.attempts >= i64::from(w.max_attempts);
    let wait = backoff(
        Duration::from_millis(w.backoff_base_ms.max(1)),
        Duration::from_secs(w.backoff_max_secs.max(1)),
        d.attempts.max(1) as u32,
    )
    .max(retry_after.unwrap_or_default());
    let next = time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default());
    let mut tx = ctx.db.write.begin().await?;
    if !store::inbox::fail(&mut tx, d.id, lease_until, error, &next, dead).await? {
        return lease_lost(tx).await;
    }
    // ALERTS HOOK (only when `dead`): crate::alerts::rules::on_dead_letter(&mut tx, &ctx.config, d.id, error, &time::now_str()).await?;
    tx.commit().await?;
    if dead {
        metrics::counter!("cancelwatch_deliveries_dead_total", "provider" => provider_name(d))
            .increment(1);
        tracing::error!(%error, attempts = d.attempts, "delivery dead after its last attempt");
    } else {
        tracing::warn!(%error, attempts = d.attempts, next_attempt_at = %next, "delivery attempt failed; will retry");
    }
    Ok(())
}

/// The provider refused our credentials (or has none): the delivery waits,
/// its attempt not counted, so a fixed key loses nothing.
async fn release(
    ctx: &Context,
    d: &Delivery,
    lease_until: &str,
    e: &ApiError,
) -> Result<(), sqlx::Error> {
    let wait = Duration::from_secs(ctx.config.workers.backoff_max_secs.clamp(1, 60));
    let next = time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default());
    tracing::error!(error = %e, next_attempt_at = %next, "PROVIDER CREDENTIALS REFUSED OR MISSING: the delivery stays pending until the API key works");
    store::inbox::release(&ctx.db.write, d.id, lease_until, &e.to_string(), &next).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::stripe::event as stripe_event;
    use serde_json::json;

    fn delivery(
        provider: &str,
        event_type: &str,
        kind: Option<&str>,
        id: Option<&str>,
        body: Value,
    ) -> Delivery {
        Delivery {
            id: 1,
            provider: provider.into(),
            dedupe_key: "k1".into(),
            event_type: event_type.into(),
            event_id: (provider == "stripe").then(|| "evt_1".to_string()),
            resource_kind: kind.map(str::to_string),
            resource_id: id.map(str::to_string),
            context: None,
            livemode: None,
            raw_body: Some(body.to_string().into_bytes()),
            body_size: 0,
            source: "webhook".into(),
            received_at: String::new(),
            state: "processing".into(),
            attempts: 1,
            next_attempt_at: String::new(),
            last_error: None,
            processed_at: None,
        }
    }

    #[test]
    fn stripe_plans() {
        let s = StripeConfig::default();
        let j = JuiceConfig::default();
        let body =
            json!({"related_object": {"url": "/v2/money_management/outbound_transfers/obt_1"}});
        let d = delivery(
            "stripe",
            "v2.money_management.outbound_transfer.canceled",
            Some(stripe_event::OUTBOUND_TRANSFER),
            Some("obt_1"),
            body,
        );
        match plan(&s, &j, &d) {
            Plan::Fetch { target, reversal } => {
                assert_eq!(
                    target.url.as_deref(),
                    Some("/v2/money_management/outbound_transfers/obt_1")
                );
                assert_eq!(target.trigger_event.as_deref(), Some("evt_1"));
                assert!(reversal.is_none());
            }
            other => panic!("{other:?}"),
        }
        let d = delivery(
            "stripe",
            "v2.core.account.updated",
            Some("stripe.account"),
            Some("acct_1"),
            json!({}),
        );
        assert!(matches!(plan(&s, &j, &d), Plan::Ignore(_)));
        let mut followed = StripeConfig::default();
        assert!(followed.follow_event_types.is_empty());
        followed
            .follow_event_types
            .push("v2.core.account.updated".into());
        assert!(matches!(plan(&followed, &j, &d), Plan::Fetch { .. }));
        let d = delivery(
            "stripe",
            "v2.core.batch_job.completed",
            None,
            None,
            json!({}),
        );
        assert!(matches!(plan(&s, &j, &d), Plan::Ignore(_)));
    }

    #[test]
    fn juice_plans() {
        let s = StripeConfig::default();
        let j = JuiceConfig::default();
        let d = delivery(
            "juice",
            "bulk_transfer.cancelled",
            Some(juice_event::BULK_TRANSFER),
            Some("b1"),
            json!({"data": {"id": "b1"}}),
        );
        assert!(matches!(
            plan(&s, &j, &d),
            Plan::Fetch { reversal: None, .. }
        ));
        let d = delivery(
            "juice",
            "card.transaction",
            None,
            None,
            json!({"data": {"id": "x"}}),
        );
        assert!(matches!(plan(&s, &j, &d), Plan::Ignore(_)));
        let d = delivery(
            "juice",
            "bulk_transfer.transfer.reversed",
            None,
            None,
            json!({"data": {"id": "it_1"}}),
        );
        assert_eq!(plan(&s, &j, &d), Plan::Reversal("it_1".into()));
        let d = delivery(
            "juice",
            "bulk_transfer.transfer.reversed",
            Some(juice_event::BULK_TRANSFER),
            Some("b1"),
            json!({"data": {"id": "it_1", "bulk_transfer_id": "b1"}}),
        );
        match plan(&s, &j, &d) {
            Plan::Fetch { target, reversal } => {
                assert_eq!(target.id, "b1");
                assert_eq!(reversal.as_deref(), Some("it_1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(trigger_of(&d), Trigger::event("k1"));
    }
}
