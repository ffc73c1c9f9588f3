//! Backfill: list a provider's events since a time and take into the inbox
//! the ones it lacks (source `backfill`), to be processed like any delivery
//! (trigger `backfill`).

use super::{Context, PipelineError};
use crate::store::model::NewDelivery;
use crate::time;

/// What a backfill found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackfillReport {
    /// Events the provider listed.
    pub listed: usize,
    /// Events the inbox did not have: now stored.
    pub new: usize,
    /// Listed objects that are not decodable events (logged, skipped).
    pub skipped: usize,
}

/// Lists `provider`'s events created at or after `since` (RFC 3339) and
/// stores the missing ones, with the dedupe key a webhook of it would have.
pub async fn events(
    ctx: &Context,
    provider: &str,
    since: &str,
) -> Result<BackfillReport, PipelineError> {
    let since = time::parse_lenient(since)
        .filter(|_| chrono::DateTime::parse_from_rfc3339(since).is_ok())
        .ok_or_else(|| {
            PipelineError::InvalidArgument(format!(
                "--since {since:?} is not an RFC 3339 time (e.g. 2026-10-30T00:00:00Z)"
            ))
        })?;
    let api = ctx
        .providers
        .api(provider)
        .ok_or_else(|| PipelineError::NotConfigured(provider.to_string()))?;
    let listing = api.list_events(&time::fmt(since)).await?;
    let mut report = BackfillReport {
        listed: listing.events.len() + listing.skipped,
        skipped: listing.skipped,
        ..BackfillReport::default()
    };
    let received_at = time::now_str();
    let found: Vec<NewDelivery> = listing
        .events
        .into_iter()
        .map(|(event, raw_body)| NewDelivery {
            provider: event.provider.into(),
            dedupe_key: event.dedupe_key,
            event_type: event.event_type,
            event_id: event.event_id,
            resource_kind: event.resource.as_ref().map(|r| r.kind.clone()),
            resource_id: event.resource.as_ref().map(|r| r.id.clone()),
            context: event.resource.and_then(|r| r.context),
            livemode: event.livemode,
            raw_body,
            source: "backfill",
            received_at: received_at.clone(),
        })
        .collect();
    report.new = ctx.store.insert_deliveries(&found).await?;
    metrics::counter!("cancelwatch_backfill_events_total", "provider" => api.name())
        .increment(report.new as u64);
    if report.new > 0 {
        ctx.ring();
    }
    tracing::info!(
        listed = report.listed,
        new = report.new,
        provider = api.name(),
        "backfill done"
    );
    Ok(report)
}
