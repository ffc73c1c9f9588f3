//! Backfill: list Stripe events since a time and take into the inbox the ones
//! it lacks (source `backfill`), to be processed like any delivery (trigger
//! `backfill`).

use super::{Context, PipelineError};
use crate::providers::stripe::api::{StripeApi, PAGE_LIMIT};
use crate::providers::stripe::event::ThinEvent;
use crate::providers::stripe::NAME;
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

/// Lists Stripe events created at or after `since` (RFC 3339) and stores the
/// missing ones; the dedupe key is the event id, as for webhooks.
pub async fn stripe(ctx: &Context, since: &str) -> Result<BackfillReport, PipelineError> {
    let since = time::parse_lenient(since)
        .filter(|_| chrono::DateTime::parse_from_rfc3339(since).is_ok())
        .ok_or_else(|| {
            PipelineError::InvalidArgument(format!(
                "--since {since:?} is not an RFC 3339 time (e.g. 2026-10-30T00:00:00Z)"
            ))
        })?;
    if ctx.config.stripe.api_key.is_empty() {
        return Err(PipelineError::NotConfigured(NAME.into()));
    }
    let api = StripeApi::new(&ctx.config.stripe, &ctx.config.workers);
    let events = api.list_events(&time::fmt(since), PAGE_LIMIT).await?;
    let mut report = BackfillReport {
        listed: events.len(),
        ..BackfillReport::default()
    };
    let received_at = time::now_str();
    let mut found = Vec::new();
    for event in events {
        let raw_body = serde_json::to_vec(&event).unwrap_or_default();
        let thin = match ThinEvent::decode(&raw_body) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "backfill: skipping a listed object that is not a v2 event");
                report.skipped += 1;
                continue;
            }
        };
        let resource = thin.resource();
        let delivery = NewDelivery {
            provider: NAME.into(),
            dedupe_key: thin.id.clone(),
            event_type: thin.event_type.clone(),
            event_id: Some(thin.id.clone()),
            resource_kind: resource.as_ref().map(|r| r.kind.clone()),
            resource_id: resource.as_ref().map(|r| r.id.clone()),
            context: thin.context.clone(),
            livemode: thin.livemode,
            raw_body,
            source: "backfill",
            received_at: received_at.clone(),
        };
        found.push(delivery);
    }
    report.new = ctx.store.insert_deliveries(&found).await?;
    metrics::counter!("cancelwatch_backfill_events_total", "provider" => NAME)
        .increment(report.new as u64);
    if report.new > 0 {
        ctx.ring();
    }
    tracing::info!(
        listed = report.listed,
        new = report.new,
        "stripe backfill done"
    );
    Ok(report)
}
