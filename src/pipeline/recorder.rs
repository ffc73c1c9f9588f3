//! The recorder: writes decided outcomes as they come, as many as are
//! waiting in one turn at the store (when few wait, it waits up to
//! [`LINGER`] for more), then logs and counts what was committed.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument;

use super::decide::decide;
use super::feed::AliveGuard;
use super::Context;
use crate::domain::observe;
use crate::domain::outcome::{delivery_span, Decided, Written};
use crate::providers::knowledge;
use crate::store::model::Delivery;

/// How long the recorder waits for more outcomes when fewer than half of
/// `workers.concurrency` are waiting. Each transaction has fixed costs (its
/// turn at the writer, `BEGIN`, preparing its statements, the pages of its
/// commit, many of them index pages it shares with the next one); at 1,000
/// deliveries a second, writing them one or two at a time held the writer
/// over half of the time, and gathering them for this long halved that, for
/// a millisecond or two more from delivery to record.
const LINGER: Duration = Duration::from_millis(2);
/// Most outcomes written in one transaction. A batch holds the writer
/// connection while it runs, and an acknowledgement may wait behind one, so
/// this bounds that wait (a few milliseconds) as well.
const WRITE_BATCH: usize = 256;

/// The recorder: writes what is waiting, many outcomes a transaction, until
/// every sender is gone.
pub(super) async fn record_outcomes(
    ctx: Arc<Context>,
    mut outcomes: mpsc::Receiver<Decided>,
    alive: Arc<AtomicUsize>,
) {
    let _alive = AliveGuard::new(alive);
    let linger_below = ctx.config.workers.concurrency / 2;
    // What a batch that ended early (to let an acknowledgement through) left.
    let mut waiting = Vec::new();
    loop {
        if waiting.is_empty() {
            match outcomes.recv().await {
                Some(decided) => waiting.push(decided),
                None => break,
            }
        }
        gather(&mut outcomes, &mut waiting, linger_below, LINGER).await;
        waiting = write_and_report(&ctx, waiting).await;
    }
    tracing::debug!("recorder stopped");
}

/// Adds to `waiting` what comes next from `outcomes`, up to [`WRITE_BATCH`]:
/// whatever is there already, and, while fewer than `linger_below` wait,
/// what arrives within `linger`. Returns early when every sender is gone.
async fn gather<T>(
    outcomes: &mut mpsc::Receiver<T>,
    waiting: &mut Vec<T>,
    linger_below: usize,
    linger: Duration,
) {
    let until = tokio::time::Instant::now() + linger;
    while waiting.len() < WRITE_BATCH {
        let next = match outcomes.try_recv() {
            Ok(next) => next,
            Err(_) if waiting.len() >= linger_below => break,
            Err(_) => match tokio::time::timeout_at(until, outcomes.recv()).await {
                Ok(Some(next)) => next,
                Ok(None) | Err(_) => break,
            },
        };
        waiting.push(next);
    }
}

/// Processes one claimed delivery to its end for this attempt, here and now
/// (replay, tests): decide, then write in a transaction of its own. Errors
/// are handled and logged here (retry, dead letter, release).
pub async fn process(ctx: &Context, d: Delivery, lease_until: &str) {
    let outcome = decide(ctx, &d).instrument(delivery_span(&d)).await;
    let mut batch = vec![Decided {
        delivery: d,
        lease_until: lease_until.to_string(),
        outcome,
    }];
    while !batch.is_empty() {
        batch = write_and_report(ctx, batch).await;
    }
}

/// Writes decided deliveries in one transaction, then logs what each came
/// to, and returns those it left for the next transaction: a batch ends
/// early when an acknowledgement commit is waiting for the writer. When the
/// transaction itself fails, nothing of the batch is kept: the leases run
/// out and the deliveries come back.
pub async fn write_and_report(ctx: &Context, mut batch: Vec<Decided>) -> Vec<Decided> {
    match ctx.store.record_outcomes(&ctx.config, &batch).await {
        Ok((written, changes)) => {
            crate::alerts::report(&changes);
            let left = batch.split_off(written.len());
            for (decided, written) in batch.iter().zip(written) {
                let _span = delivery_span(&decided.delivery).entered();
                match written {
                    Some(written) => report(&decided.delivery, &written),
                    None => tracing::error!(
                        "recording the delivery failed on the database (see above); it is retried when its lease runs out"
                    ),
                }
            }
            left
        }
        // A database that cannot take writes (a full disk) is logged once
        // by the store, when it starts and when it ends: not once a batch.
        Err(e) if e.unavailable().is_some() => {
            tracing::debug!(
                error = %e,
                deliveries = batch.len(),
                "recording deliveries failed on the database; they are retried when their leases run out"
            );
            Vec::new()
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                deliveries = batch.len(),
                "recording deliveries failed on the database; they are retried when their leases run out"
            );
            Vec::new()
        }
    }
}

/// Logs (and counts) what a delivery's attempt came to, once it is committed.
fn report(d: &Delivery, written: &Written) {
    match written {
        Written::Ignored(reason) => tracing::debug!(%reason, "delivery ignored"),
        Written::Processed {
            status,
            transitions,
            stale,
        } => {
            observe::report(transitions);
            tracing::debug!(%status, transitions = transitions.len(), stale, "delivery processed");
        }
        Written::Reversal(transfer) => tracing::info!(%transfer, "reversal recorded"),
        Written::Retry {
            error,
            next_attempt_at,
        } => {
            tracing::warn!(%error, attempts = d.attempts, %next_attempt_at, "delivery attempt failed; will retry")
        }
        Written::Dead(error) => {
            metrics::counter!("cancelwatch_deliveries_dead_total", "provider" => provider_name(d))
                .increment(1);
            tracing::error!(%error, attempts = d.attempts, "delivery dead");
        }
        Written::Released {
            error,
            next_attempt_at,
        } => {
            tracing::error!(%error, %next_attempt_at, "PROVIDER CREDENTIALS REFUSED OR MISSING: the delivery stays pending until the API key works")
        }
        Written::RateLimited {
            error,
            next_attempt_at,
        } => {
            metrics::counter!("cancelwatch_deliveries_rate_limited_total", "provider" => provider_name(d))
                .increment(1);
            tracing::warn!(%error, %next_attempt_at, "the provider rate-limits us: the delivery waits, its attempt not counted")
        }
        Written::LeaseLost => tracing::warn!(
            "the lease ran out before the delivery was finished; this attempt is dropped"
        ),
    }
}

pub(super) fn provider_name(d: &Delivery) -> &'static str {
    knowledge::of_provider(&d.provider).map_or("unknown", |k| k.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recorder takes what waits at once; with few waiting, it waits
    /// up to the linger for more, and no longer.
    #[tokio::test(start_paused = true)]
    async fn the_recorder_gathers_what_arrives_within_its_linger() {
        let linger = Duration::from_millis(2);
        let (tx, mut rx) = mpsc::channel(300);
        let mut waiting = Vec::new();
        for n in 0..3 {
            tx.send(n).await.unwrap();
        }
        // Enough waiting: no wait.
        let started = tokio::time::Instant::now();
        gather(&mut rx, &mut waiting, 2, linger).await;
        assert_eq!(
            (waiting.as_slice(), started.elapsed()),
            (&[0, 1, 2][..], Duration::ZERO)
        );

        // Few waiting: what comes within the linger rides along, what comes after does not.
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            late.send(3).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            late.send(4).await.unwrap();
        });
        let started = tokio::time::Instant::now();
        gather(&mut rx, &mut waiting, 10, linger).await;
        assert_eq!(waiting, [0, 1, 2, 3]);
        assert_eq!(started.elapsed(), linger);

        // No more than a transaction's worth, and no wait once every sender is gone.
        waiting.clear();
        for n in 0..WRITE_BATCH + 5 {
            tx.send(n).await.unwrap();
        }
        drop(tx);
        gather(&mut rx, &mut waiting, WRITE_BATCH, linger).await;
        assert_eq!(waiting.len(), WRITE_BATCH);
        waiting.clear();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = tokio::time::Instant::now();
        gather(&mut rx, &mut waiting, 100, linger).await;
        assert_eq!(
            waiting,
            [
                WRITE_BATCH,
                WRITE_BATCH + 1,
                WRITE_BATCH + 2,
                WRITE_BATCH + 3,
                WRITE_BATCH + 4,
                4
            ]
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
