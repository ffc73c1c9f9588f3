//! Cancels issued through cancelwatch: record the request, call the
//! provider's cancel endpoint with an idempotency key, store its answer, then
//! fetch the resource at once and record it with trigger `cancel`.

use super::{Context, PipelineError};
use crate::domain::observe::Trigger;
use crate::providers::{
    knowledge, limit, provider_of, safe_id, CancelAnswer, CancelOutcome, Provider, ProviderError,
    Target,
};
use crate::store::CancelRecord;
use crate::time;

/// What a cancel request came to.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct CancelReport {
    /// The `cancel_requests` row (also the transitions' trigger id).
    pub request_id: i64,
    pub provider: String,
    pub kind: String,
    pub id: String,
    pub idempotency_key: String,
    /// accepted, already_cancelled, not_cancellable, not_found,
    /// partial_cancellation, idempotency_conflict, unknown (sent, but the
    /// answer was lost: see `effect`) or error.
    pub outcome: String,
    pub http_status: Option<u16>,
    pub error_code: Option<String>,
    /// The status fetched right after the answer, when the fetch worked.
    pub status: Option<String>,
    /// Why the fetch after the answer failed, if it did.
    pub fetch_error: Option<String>,
    /// When the outcome is unknown, what the state fetched after it says:
    /// `cancelled` (the cancel took effect, in full or in part: the alerts
    /// say which), `not_cancelled` (nothing was sent again: cancel again to
    /// retry) or `unknown` (the fetch failed too; the reconciler looks again).
    pub effect: Option<String>,
}

/// The idempotency key of the `attempt`-th key for a resource: the same
/// resource gets the same key again (a repeated cancel doubles nothing) until
/// the provider reports the key burnt (`idempotency_conflict`).
pub fn idempotency_key(kind: &str, id: &str, attempt: i64) -> String {
    format!("cancelwatch-{kind}-{id}-{attempt}")
}

/// Requests a cancel of `kind`/`id`; `requested_by` is `cli` or `api`.
pub async fn request(
    ctx: &Context,
    kind: &str,
    id: &str,
    requested_by: &str,
) -> Result<CancelReport, PipelineError> {
    if !knowledge::cancellable_kinds().contains(&kind) {
        return Err(PipelineError::UnknownKind(kind.to_string()));
    }
    if !safe_id(id) {
        return Err(PipelineError::InvalidId(id.to_string()));
    }
    let provider_name = provider_of(kind).to_string();
    let provider = ctx
        .providers
        .api(&provider_name)
        .cloned()
        .ok_or_else(|| PipelineError::NotConfigured(provider_name.clone()))?;

    let key_for = |attempt: i64| idempotency_key(kind, id, attempt);
    let opened = ctx
        .store
        .open_cancel(
            (&provider_name, kind, id),
            requested_by,
            &time::now_str(),
            &key_for,
        )
        .await?;
    let (request_id, rid, key, context) = (
        opened.request_id,
        opened.rid,
        opened.idempotency_key,
        opened.context,
    );
    let was_cancelled = opened
        .status
        .is_some_and(|s| knowledge::is_cancelled(&ctx.config, kind, &s));

    let target = Target {
        kind: kind.to_string(),
        id: id.to_string(),
        context,
        ..Target::default()
    };
    // A cancel and the fetch that follows it go ahead of other calls in the
    // provider's request budget: no reconcile or delivery traffic starves them.
    let answer = limit::urgent(provider.cancel(&target, &key))
        .await
        .map(|a| already_done(a, was_cancelled));
    let (outcome, http_status, error_code) = store_answer(ctx, request_id, id, &answer).await?;

    // Whatever the answer, the state may have changed (partial cancellation,
    // or a cancel applied whose answer was lost): fetch now.
    let (status, fetch_error) = limit::urgent(fetch_after_cancel(
        ctx, &*provider, &target, request_id, rid,
    ))
    .await?;
    let effect = (outcome == CancelOutcome::Unknown).then(|| {
        let effect = match status.as_deref() {
            Some(s) if knowledge::is_cancelled(&ctx.config, kind, s) => "cancelled",
            Some(_) => "not_cancelled",
            None => "unknown",
        };
        tracing::warn!(resource = %id, status = status.as_deref(), effect, "the cancel's answer was lost; decided from the state fetched after it, and not sent again");
        effect.to_string()
    });
    Ok(CancelReport {
        request_id,
        provider: provider_name,
        kind: kind.to_string(),
        id: id.to_string(),
        idempotency_key: key,
        outcome: outcome.as_str().to_string(),
        http_status,
        error_code,
        status,
        fetch_error,
        effect,
    })
}

/// A cancel of a resource already seen cancelled changes nothing, whatever
/// the provider says: a repeated idempotency key gets the first answer
/// again (accepted), and some providers refuse to cancel what is cancelled.
fn already_done(mut answer: CancelAnswer, was_cancelled: bool) -> CancelAnswer {
    if was_cancelled
        && matches!(
            answer.outcome,
            CancelOutcome::Accepted | CancelOutcome::NotCancellable
        )
    {
        answer.outcome = CancelOutcome::AlreadyCancelled;
    }
    answer
}

/// Stores the provider's answer to a cancel (or why there was none) and
/// logs it; the outcome, HTTP status and error code it came to.
async fn store_answer(
    ctx: &Context,
    request_id: i64,
    id: &str,
    answer: &Result<CancelAnswer, ProviderError>,
) -> Result<(CancelOutcome, Option<u16>, Option<String>), PipelineError> {
    let (outcome, http_status, error_code, body) = match answer {
        Ok(a) => (
            a.outcome,
            Some(a.http_status),
            a.error_code.clone(),
            Some(a.body.clone()),
        ),
        Err(e) => (
            match e {
                ProviderError::Unanswered(_) => CancelOutcome::Unknown,
                _ => CancelOutcome::Error,
            },
            None,
            Some(e.label().to_string()),
            Some(e.to_string()),
        ),
    };
    let record = CancelRecord {
        http_status,
        outcome: outcome.as_str(),
        error_code: error_code.as_deref(),
        body: body.as_deref(),
    };
    ctx.store
        .answer_cancel(request_id, &record, &time::now_str())
        .await?;
    match answer {
        Ok(a) => {
            tracing::info!(resource = %id, outcome = outcome.as_str(), http_status = a.http_status, "cancel answered")
        }
        Err(e @ ProviderError::Unauthorized(_)) => {
            tracing::error!(resource = %id, error = %e, "cancel refused: the API key was not accepted")
        }
        Err(e) => tracing::warn!(resource = %id, error = %e, "cancel call failed"),
    }
    Ok((outcome, http_status, error_code))
}

/// Fetches the resource right after its cancel was answered and records it
/// with trigger `cancel`; when the fetch fails, the reconciler is due to look
/// again. The status fetched, or why the fetch failed.
async fn fetch_after_cancel(
    ctx: &Context,
    provider: &dyn Provider,
    target: &Target,
    request_id: i64,
    rid: i64,
) -> Result<(Option<String>, Option<String>), PipelineError> {
    let id = &target.id;
    match provider.fetch(target).await {
        Ok(obs) => {
            let (recorded, changes) = ctx
                .store
                .record_observation(
                    &ctx.config,
                    &obs,
                    &Trigger::cancel(request_id),
                    target.context.as_deref(),
                    time::now(),
                )
                .await?;
            recorded.report();
            crate::alerts::report(&changes);
            Ok((Some(obs.status), None))
        }
        Err(e) => {
            tracing::warn!(resource = %id, error = %e, "fetch after cancel failed; the reconciler will look again");
            let next = time::fmt(
                time::now() + chrono::Duration::seconds(ctx.config.reconcile.interval_secs as i64),
            );
            ctx.store.mark_reconciled(rid, Some(&next)).await?;
            Ok((None, Some(e.to_string())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH_JOB: &str = "stripe.batch_job";

    #[test]
    fn a_resource_seen_cancelled_is_already_cancelled() {
        let answer = |outcome| CancelAnswer {
            outcome,
            http_status: 200,
            error_code: None,
            body: String::new(),
        };
        let after = |outcome, was| already_done(answer(outcome), was).outcome;
        use CancelOutcome::*;
        assert_eq!(after(Accepted, true), AlreadyCancelled);
        assert_eq!(after(NotCancellable, true), AlreadyCancelled);
        assert_eq!(after(Accepted, false), Accepted);
        assert_eq!(after(NotCancellable, false), NotCancellable);
        assert_eq!(after(Error, true), Error);
        assert_eq!(after(NotFound, true), NotFound);
    }

    #[test]
    fn keys_are_stable_per_resource_and_attempt() {
        assert_eq!(
            idempotency_key(BATCH_JOB, "batchv2_1", 0),
            idempotency_key(BATCH_JOB, "batchv2_1", 0)
        );
        assert_ne!(
            idempotency_key(BATCH_JOB, "batchv2_1", 0),
            idempotency_key(BATCH_JOB, "batchv2_1", 1)
        );
        assert_ne!(
            idempotency_key(BATCH_JOB, "batchv2_1", 0),
            idempotency_key(BATCH_JOB, "batchv2_2", 0)
        );
    }
}
