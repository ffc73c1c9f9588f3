//! The catch-up: at start and every `backfill.interval_secs`, lists the
//! events of each provider whose API lists them, in its own account and in
//! every account context a delivery came from, since the newest event
//! received there (never further back than the provider keeps them), and
//! takes in those the inbox lacks (trigger `backfill`). Webhooks get lost,
//! and a daemon that was down missed some: this finds them without anyone
//! running `cancelwatch backfill`. A provider that cannot be reached delays
//! the catch-up (tried again with backoff); it never delays the webhooks,
//! which this task does not hold up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pipeline::{backfill, Context, PipelineError};
use crate::providers::{http, Provider};
use crate::time::{self, Timestamp};

/// Runs until `shutdown`: a pass at once, then one per interval; after a
/// failed pass, another sooner, backing off.
pub async fn run(ctx: Arc<Context>, shutdown: CancellationToken) {
    let interval = Duration::from_secs(ctx.config.backfill.interval_secs.max(1));
    let mut marks = Marks::default();
    let mut failures = 0;
    loop {
        if !ctx.store.is_leader() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
            }
        }
        let passed = tokio::select! {
            _ = shutdown.cancelled() => break,
            passed = run_once(&ctx, &mut marks) => passed,
        };
        let wait = match passed {
            Ok(new) => {
                failures = 0;
                if new > 0 {
                    tracing::info!(new, "catch-up took in missed events");
                }
                interval
            }
            Err(e) => {
                failures += 1;
                let wait = retry_wait(&ctx, failures, interval);
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "catch-up failed; trying again");
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The wait before the next pass after `failures` failed ones in a row:
/// the workers' backoff, never longer than the interval.
fn retry_wait(ctx: &Context, failures: u32, interval: Duration) -> Duration {
    let w = &ctx.config.workers;
    let max = Duration::from_secs(w.backoff_max_secs.max(1)).min(interval);
    http::backoff(
        Duration::from_millis(w.backoff_base_ms.max(1)),
        max,
        failures,
    )
}

/// Where the next listing of each account context starts, per provider,
/// and up to when deliveries were looked at for contexts not seen before.
#[derive(Debug, Default)]
pub struct Marks {
    from: HashMap<(&'static str, Option<String>), Timestamp>,
    looked: HashMap<&'static str, Timestamp>,
}

/// One pass over every provider whose API lists its events; how many
/// events were new. A context whose listing fails is listed from the same
/// point next time; the first failure is returned once the rest are done.
pub async fn run_once(ctx: &Context, marks: &mut Marks) -> Result<usize, PipelineError> {
    let mut new = 0;
    let mut failed = None;
    for provider in ctx.providers.all.iter().filter(|p| p.api_enabled()) {
        match catch_up(ctx, &**provider, marks).await {
            Ok(n) => new += n,
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(new), Err)
}

/// Lists one provider's events in each of its account contexts.
async fn catch_up(
    ctx: &Context,
    provider: &dyn Provider,
    marks: &mut Marks,
) -> Result<usize, PipelineError> {
    let Some(kept) = provider.events_listed_for() else {
        return Ok(0);
    };
    let name = provider.name();
    let started = time::now();
    let overlap = chrono::Duration::seconds(ctx.config.backfill.overlap_secs as i64);
    let oldest = started - chrono::Duration::from_std(kept).unwrap_or_default();
    // Contexts deliveries came from, since they were last looked at: a new
    // one is listed from its newest event received.
    let looked = marks.looked.get(name).copied().unwrap_or(oldest);
    let seen = ctx
        .store
        .newest_received(name, &time::fmt(looked - overlap))
        .await?;
    marks.looked.insert(name, started);
    for (context, newest) in seen {
        let newest = time::parse_lenient(&newest).unwrap_or(started);
        marks
            .from
            .entry((name, context))
            .or_insert(newest - overlap);
    }
    // Its own account is listed even when nothing came from it yet.
    marks.from.entry((name, None)).or_insert(started - overlap);

    let mut contexts: Vec<(Option<String>, Timestamp)> = marks
        .from
        .iter()
        .filter(|((p, _), _)| *p == name)
        .map(|((_, c), from)| (c.clone(), *from))
        .collect();
    contexts.sort();
    let (mut new, mut failed) = (0, None);
    for (context, from) in contexts {
        match backfill::in_context(ctx, provider, from.max(oldest), context.as_deref()).await {
            Ok(report) => {
                new += report.new;
                marks.from.insert((name, context), started - overlap);
            }
            Err(e) => {
                tracing::warn!(provider = name, context = context.as_deref().unwrap_or("(own account)"), error = %e, "catch-up listing failed");
                failed.get_or_insert(e);
            }
        }
    }
    failed.map_or(Ok(new), Err)
}
