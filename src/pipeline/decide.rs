//! Deciding one leased delivery, in a task of its own: what it asks for
//! ([`plan`]) and what the provider answers ([`Outcome`]). Nothing is
//! written and no transaction is open across the HTTP call; the recorder
//! writes the outcome.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde_json::Value;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::Context;
use crate::config::Config;
use crate::domain::outcome::{delivery_span, Decided, Outcome};
use crate::providers::knowledge::{self, EventFacts, Plan};
use crate::providers::{http, Provider, ProviderError, Resolved, Target};
use crate::store::model::Delivery;

/// What a stored delivery asks for (pure: from its columns and body); the
/// provider it came from decides ([`knowledge::plan`]).
pub fn plan(config: &Config, d: &Delivery) -> Plan {
    let body: Option<Value> = d
        .raw_body
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok());
    let event = EventFacts {
        event_type: &d.event_type,
        event_id: d.event_id.as_deref(),
        resource_kind: d.resource_kind.as_deref(),
        resource_id: d.resource_id.as_deref(),
        context: d.context.as_deref(),
        body: body.as_ref(),
    };
    knowledge::plan(config, &d.provider, &event)
}

/// One claimed delivery: decide it, then queue it for the recorder. The
/// slot comes back once the outcome is in the recorder's queue, not once it
/// is written: a slot bounds the calls to the provider, and the queue
/// ([`RECORDER_QUEUE_PER_SLOT`]) bounds what waits for the writer. Holding
/// slots through the write kept the recorder's batches below the slots'
/// number, and its per-turn cost weighed on each delivery. The lease, not
/// the slot, keeps a resource's next delivery back until this one is written.
///
/// The provider calls stay within the lease ([`http::within`]): a call that
/// outlived it would be taken up again by another worker meanwhile, and
/// the attempt would end as "never finished" instead of with its real
/// error. A call still running after `workers.slow_call_secs` gives its
/// slot back and waits in its provider's slow lane (a quarter of the slots)
/// instead; when that lane is full, the attempt ends there, failed. So
/// calls that hang, however many, hold at most a quarter of the slots per
/// provider, and the rest keep serving healthy deliveries.
pub(super) async fn decide_and_send(
    ctx: Arc<Context>,
    delivery: Delivery,
    lease_until: String,
    slot: OwnedSemaphorePermit,
    slow_lane: Arc<Semaphore>,
    recorder: mpsc::Sender<Decided>,
) {
    let deadline = call_deadline(&ctx.config, &lease_until);
    let call = http::within(deadline, decide(&ctx, &delivery)).instrument(delivery_span(&delivery));
    // Held until the outcome is queued: the slot, or the slow lane's place.
    let (outcome, _held) =
        hold_while_slow(&ctx.config, &delivery, call, slot, &slow_lane, deadline).await;
    let decided = Decided {
        delivery,
        lease_until,
        outcome,
    };
    if recorder.send(decided).await.is_err() {
        // Only when the daemon is being stopped; the lease runs out and the
        // delivery is processed again after the restart.
        tracing::warn!("the recorder is gone; this attempt is dropped");
    }
}

/// When the provider calls of an attempt leased until `lease_until` must be
/// over: a quarter of the lease is kept for writing the outcome.
fn call_deadline(config: &Config, lease_until: &str) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let lease = Duration::from_secs(config.workers.lease_secs);
    let left = crate::time::parse_lenient(lease_until)
        .and_then(|until| (until - crate::time::now()).to_std().ok())
        .unwrap_or(lease);
    now + left.saturating_sub(lease / 4)
}

/// Runs `call` holding `slot`; past `workers.slow_call_secs` moves it to
/// `slow_lane` (see [`decide_and_send`]), or ends the attempt when that is
/// full. Past `deadline` the attempt ends, whatever the call does. Returns
/// the outcome and what it holds (the slot or the lane's place).
async fn hold_while_slow(
    config: &Config,
    d: &Delivery,
    call: impl std::future::Future<Output = Outcome>,
    slot: OwnedSemaphorePermit,
    slow_lane: &Arc<Semaphore>,
    deadline: tokio::time::Instant,
) -> (Outcome, OwnedSemaphorePermit) {
    tokio::pin!(call);
    let slow_after = Duration::from_secs(config.workers.slow_call_secs);
    let ran_out = || {
        let _span = delivery_span(d).entered();
        tracing::warn!(
            "the provider call did not end within the delivery's lease; the attempt fails"
        );
        Outcome::Failed {
            error: format!(
                "{} gave no answer within the delivery's lease ({} s)",
                provider_label(d),
                config.workers.lease_secs
            ),
            retry_after: None,
        }
    };
    let slow_at = (tokio::time::Instant::now() + slow_after).min(deadline);
    if let Ok(outcome) = tokio::time::timeout_at(slow_at, &mut call).await {
        return (outcome, slot);
    }
    if slow_at >= deadline {
        return (ran_out(), slot);
    }
    let Ok(lane) = slow_lane.clone().try_acquire_owned() else {
        metrics::counter!("cancelwatch_slow_calls_cut_total", "provider" => provider_label(d))
            .increment(1);
        let _span = delivery_span(d).entered();
        tracing::warn!(
            secs = slow_after.as_secs(),
            "the provider call is slow and its provider's slow lane is full; the attempt fails"
        );
        let cut = Outcome::Failed {
            error: format!(
                "{} gave no answer within {} s, while a quarter of the worker slots already waited on its slow calls (workers.slow_call_secs)",
                provider_label(d),
                slow_after.as_secs()
            ),
            retry_after: None,
        };
        return (cut, slot);
    };
    // A healthy delivery can take the slot while this one waits in the lane.
    drop(slot);
    match tokio::time::timeout_at(deadline, &mut call).await {
        Ok(outcome) => (outcome, lane),
        Err(_) => (ran_out(), lane),
    }
}

/// The provider's name as the metrics and errors spell it.
fn provider_label(d: &Delivery) -> &'static str {
    knowledge::names()
        .iter()
        .copied()
        .find(|n| *n == d.provider)
        .unwrap_or("other")
}

/// Decides a delivery: plan, then fetch. A panic in here (a bug) costs this
/// attempt only: it becomes a failure, and in the end a dead letter.
pub async fn decide(ctx: &Context, d: &Delivery) -> Outcome {
    match AssertUnwindSafe(decide_inner(ctx, d)).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::error!("processing panicked (a bug): the attempt fails");
            Outcome::Failed {
                error: "processing panicked (a bug): see the log".into(),
                retry_after: None,
            }
        }
    }
}

async fn decide_inner(ctx: &Context, d: &Delivery) -> Outcome {
    let config = &ctx.config;
    if d.attempts > i64::from(config.workers.max_attempts) {
        // Earlier holders never finished (the process died, or hung past its
        // lease): after the last attempt the delivery is given up, not retried forever.
        return Outcome::Failed {
            error: format!(
                "{} attempts whose worker never finished (lease ran out each time)",
                d.attempts - 1
            ),
            retry_after: None,
        };
    }
    match plan(config, d) {
        Plan::Ignore(reason) => Outcome::Ignore(reason),
        Plan::Reversal(transfer) => Outcome::Reversal(transfer),
        Plan::Fetch { target, reversal } => {
            let Some(provider) = ctx.providers.api(&d.provider).cloned() else {
                return Outcome::Released(
                    ProviderError::NotConfigured(super::recorder::provider_name(d)).to_string(),
                );
            };
            fetch(&*provider, target, reversal).await
        }
    }
}

/// Looks up what the target names when the delivery could not say it
/// ([`Provider::resolve`]), then fetches it.
async fn fetch(provider: &dyn Provider, target: Target, reversal: Option<Target>) -> Outcome {
    let target = match provider.resolve(target).await {
        Ok(Resolved::Fetch(target)) => target,
        Ok(Resolved::Nothing(reason)) => return Outcome::Ignore(reason),
        // What names the object (a delivered event) must exist: its absence
        // is a failure to retry, not an object that does not exist.
        Err(ProviderError::NotFound(detail)) => {
            return failed(ProviderError::Permanent(format!("not found: {detail}")))
        }
        Err(e) => return failed(e),
    };
    match provider.fetch(&target).await {
        Ok(obs) => Outcome::Observed {
            obs: Box::new(obs),
            context: target.context,
            reversal,
        },
        Err(ProviderError::NotFound(detail)) => Outcome::NotFound { target, detail },
        Err(e) => failed(e),
    }
}

/// What a provider call that gave no answer to use comes to.
fn failed(e: ProviderError) -> Outcome {
    match e {
        ProviderError::Unauthorized(_) | ProviderError::NotConfigured(_) => {
            Outcome::Released(e.to_string())
        }
        ProviderError::Unusable(error) => Outcome::Unusable(error),
        ProviderError::RateLimited { retry_after, .. } => Outcome::RateLimited {
            retry_after,
            error: e.to_string(),
        },
        ProviderError::Retryable { retry_after, .. } => Outcome::Failed {
            retry_after,
            error: e.to_string(),
        },
        ProviderError::NotFound(_) | ProviderError::Permanent(_) | ProviderError::Unanswered(_) => {
            Outcome::Failed {
                retry_after: None,
                error: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::observe::Trigger;
    use crate::domain::outcome::trigger_of;
    use crate::providers::juice::event as juice_event;
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
        let c = Config::default();
        let body =
            json!({"related_object": {"url": "/v2/money_management/outbound_transfers/obt_1"}});
        let d = delivery(
            "stripe",
            "v2.money_management.outbound_transfer.canceled",
            Some(stripe_event::OUTBOUND_TRANSFER),
            Some("obt_1"),
            body,
        );
        match plan(&c, &d) {
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
        assert!(matches!(plan(&c, &d), Plan::Ignore(_)));
        let mut followed = Config::default();
        assert!(followed.stripe.follow_event_types.is_empty());
        followed
            .stripe
            .follow_event_types
            .push("v2.core.account.updated".into());
        assert!(matches!(plan(&followed, &d), Plan::Fetch { .. }));
        let d = delivery(
            "stripe",
            "v2.core.batch_job.completed",
            None,
            None,
            json!({}),
        );
        assert!(matches!(plan(&c, &d), Plan::Ignore(_)));
    }

    #[test]
    fn juice_plans() {
        let c = Config::default();
        let d = delivery(
            "juice",
            "bulk_transfer.cancelled",
            Some(juice_event::BULK_TRANSFER),
            Some("b1"),
            json!({"data": {"id": "b1"}}),
        );
        assert!(matches!(plan(&c, &d), Plan::Fetch { reversal: None, .. }));
        let d = delivery(
            "juice",
            "card.transaction",
            None,
            None,
            json!({"data": {"id": "x"}}),
        );
        assert!(matches!(plan(&c, &d), Plan::Ignore(_)));
        let d = delivery(
            "juice",
            "bulk_transfer.transfer.reversed",
            None,
            None,
            json!({"data": {"id": "it_1"}}),
        );
        let item = |id: &str| crate::providers::Target {
            kind: juice_event::TRANSFER.into(),
            id: id.into(),
            ..Default::default()
        };
        assert_eq!(plan(&c, &d), Plan::Reversal(item("it_1")));
        let d = delivery(
            "juice",
            "bulk_transfer.transfer.reversed",
            Some(juice_event::BULK_TRANSFER),
            Some("b1"),
            json!({"data": {"id": "it_1", "bulk_transfer_id": "b1"}}),
        );
        match plan(&c, &d) {
            Plan::Fetch { target, reversal } => {
                assert_eq!(target.id, "b1");
                assert_eq!(reversal, Some(item("it_1")));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(trigger_of(&d), Trigger::event("k1"));
    }
}
