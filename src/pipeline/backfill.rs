//! Backfill: list a provider's events since a time, in each account context
//! (the provider's own account and every context seen), and take into the
//! inbox the ones it lacks (source `backfill`), to be processed like any
//! delivery (trigger `backfill`). `cancelwatch backfill` runs it by hand;
//! the catch-up job (`jobs::catch_up`) on a schedule.

use super::{Context, PipelineError};
use crate::providers::{Listing, Provider};
use crate::store::model::NewDelivery;
use crate::time::{self, Timestamp};

/// What a backfill found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackfillReport {
    /// The account contexts listed (null: the provider's own account).
    pub contexts: Vec<Option<String>>,
    /// Events the provider listed.
    pub listed: usize,
    /// Events the inbox did not have: now stored.
    pub new: usize,
    /// Listed objects that are not decodable events (logged, skipped).
    pub skipped: usize,
}

impl BackfillReport {
    fn add(&mut self, context: Option<String>, other: BackfillReport) {
        self.contexts.push(context);
        self.listed += other.listed;
        self.new += other.new;
        self.skipped += other.skipped;
    }
}

/// Lists `provider`'s events created at or after `since` (RFC 3339) in its
/// own account, in every account context a delivery came from (as far back
/// as the provider lists events) and in `contexts`, and stores the missing
/// ones with the dedupe key a webhook of each would have.
pub async fn events(
    ctx: &Context,
    provider: &str,
    since: &str,
    contexts: &[String],
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
    let kept = api.events_listed_for().unwrap_or_default();
    let seen_since = time::now() - chrono::Duration::from_std(kept).unwrap_or_default();
    let seen = ctx
        .store
        .newest_received(provider, &time::fmt(seen_since))
        .await?;
    let mut all: Vec<Option<String>> = vec![None];
    let named = contexts.iter().map(|c| Some(c.clone()));
    for context in seen.into_iter().map(|(c, _)| c).chain(named) {
        if !all.contains(&context) {
            all.push(context);
        }
    }
    let mut report = BackfillReport::default();
    for context in all {
        let found = in_context(ctx, &**api, since, context.as_deref()).await?;
        report.add(context, found);
    }
    Ok(report)
}

/// Lists `provider`'s events of one account `context` (none: its own)
/// created at or after `since`, and stores those the inbox lacks.
pub async fn in_context(
    ctx: &Context,
    provider: &dyn Provider,
    since: Timestamp,
    context: Option<&str>,
) -> Result<BackfillReport, PipelineError> {
    let listing = provider.list_events(&time::fmt(since), context).await?;
    let report = BackfillReport {
        listed: listing.events.len() + listing.skipped,
        skipped: listing.skipped,
        new: take_in(ctx, listing).await?,
        ..BackfillReport::default()
    };
    metrics::counter!("cancelwatch_backfill_events_total", "provider" => provider.name())
        .increment(report.new as u64);
    tracing::info!(
        listed = report.listed,
        new = report.new,
        provider = provider.name(),
        context = context.unwrap_or("(own account)"),
        "backfill done"
    );
    Ok(report)
}

/// Stores the listed events the inbox lacks; how many were new.
async fn take_in(ctx: &Context, listing: Listing) -> Result<usize, PipelineError> {
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
    let new = ctx.store.insert_deliveries(&found).await?;
    if new > 0 {
        ctx.ring();
    }
    Ok(new)
}
