//! Writes a batch of decided outcomes in one transaction on the writer: an
//! observation, the delivery's end and its alerts commit together or not at
//! all. When one outcome's write fails or panics, the batch is written again
//! with a savepoint for each, so that outcome costs only itself.

use crate::store::StoreError;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use super::record::{self};
use super::{inbox, resources, Db, GatedTx, Tx};
use crate::config::Config;
use crate::domain::alerts::Changes;
use crate::domain::observe::{Recorded, ToRecord, Trigger};
use crate::domain::outcome::{delivery_span, next_backoff, trigger_of, Decided, Outcome, Written};
use crate::providers::{Observation, Target};
use crate::store::model::Delivery;
use crate::time::{self, Timestamp};

/// How long an acknowledgement commit may wait for a batch of the
/// recorder's to let it through (plus the one outcome being written).
const ACK_WAIT: Duration = Duration::from_millis(3);
/// Most plain observations recorded together (a run of `record_all`).
const RECORD_RUN: usize = 64;

/// One transaction for the batch, or for its start; per delivery written
/// what was written, or `None` when it could not be (logged here).
///
/// First the outcomes are written straight into the transaction; that
/// costs a handful of statements a delivery. Only when something goes wrong
/// there (a database error, a panic: a bug) is it rolled back and the batch
/// written again with a savepoint for each outcome, so one outcome's
/// failure costs only that one.
pub(super) async fn write_batch(
    db: &Db,
    config: &Config,
    batch: &[Decided],
) -> Result<(Vec<Option<Written>>, Changes), StoreError> {
    let mut tx = db.begin_for("record").await?;
    let mut changes = Changes::new();
    if let Some(results) = write_straight(&mut tx, db, config, batch, &mut changes).await? {
        tx.commit().await?;
        return Ok((results, changes));
    }
    tx.rollback().await?;
    let mut tx = db.begin_for("record").await?;
    let mut changes = Changes::new();
    let mut results = Vec::with_capacity(batch.len());
    for decided in batch {
        let result = match write_one(&mut tx, config, decided, &decided.outcome, &mut changes).await
        {
            Ok(Ok(written)) => Some(written),
            // A full disk (or the like) may have ended the whole transaction
            // in SQLite: no outcome of the batch is kept, and each comes
            // back when its lease runs out.
            Ok(Err(e)) if e.unavailable().is_some() => return Err(e),
            Ok(Err(e)) => {
                let _span = delivery_span(&decided.delivery).entered();
                tracing::error!(error = %e, "writing a delivery's outcome failed");
                None
            }
            Err(Panicked) => {
                // A bug in recording this outcome: the attempt fails instead
                // (and in the end the delivery is dead), the rest go on.
                let failed = Outcome::Failed {
                    error: "recording panicked (a bug): see the log".into(),
                    retry_after: None,
                };
                match write_one(&mut tx, config, decided, &failed, &mut changes).await {
                    Ok(Ok(written)) => Some(written),
                    _ => None,
                }
            }
        };
        results.push(result);
    }
    tx.commit().await?;
    Ok((results, changes))
}

/// Writes the outcomes into `tx` with no savepoint, in order, until an
/// acknowledgement commit has waited for the writer long enough (at least
/// one is written).
/// `None` at the first error or panic: `tx` then holds part of the batch
/// and must be rolled back. An error of the database's surroundings (a
/// full disk) is returned as it is: SQLite may have ended the transaction
/// already, and writing the batch again, outcome by outcome, would fail
/// the same way.
async fn write_straight(
    tx: &mut GatedTx,
    db: &Db,
    config: &Config,
    batch: &[Decided],
    changes: &mut Changes,
) -> Result<Option<Vec<Option<Written>>>, StoreError> {
    let started = std::time::Instant::now();
    let mut results = Vec::with_capacity(batch.len());
    while results.len() < batch.len() {
        if !results.is_empty() && db.acks_waiting() && started.elapsed() >= ACK_WAIT {
            break;
        }
        let rest = &batch[results.len()..];
        // Plain observations (the bulk of the work) are recorded together.
        let run = rest
            .iter()
            .take(RECORD_RUN)
            .take_while(|d| plain_observation(d).is_some())
            .count();
        if run > 0 {
            let written = AssertUnwindSafe(write_observations(tx, config, &rest[..run], changes))
                .catch_unwind()
                .await;
            match written {
                Ok(Ok(written)) => results.extend(written.into_iter().map(Some)),
                Ok(Err(e)) if e.unavailable().is_some() => return Err(e),
                _ => return Ok(None),
            }
            continue;
        }
        let decided = &rest[0];
        let d = &decided.delivery;
        let outcome = &decided.outcome;
        let written =
            AssertUnwindSafe(write(tx, config, d, &decided.lease_until, outcome, changes))
                .catch_unwind()
                .await;
        match written {
            // A lost lease is rare: the batch is written again, each
            // outcome in a savepoint, and only that one is dropped.
            Ok(Ok(written)) if written != Written::LeaseLost => results.push(Some(written)),
            Ok(Err(e)) if e.unavailable().is_some() => return Err(e),
            _ => return Ok(None),
        }
    }
    Ok(Some(results))
}

/// The observation of an `Observed` outcome with no reversal to complete.
fn plain_observation(d: &Decided) -> Option<(&Observation, Option<&str>)> {
    match &d.outcome {
        Outcome::Observed {
            obs,
            context,
            reversal: None,
        } => Some((&**obs, context.as_deref())),
        _ => None,
    }
}

/// Ends the deliveries of plain observations `processed` with one statement
/// and records the observations of those it ended together
/// ([`record::record_all`]); a delivery whose lease was lost meanwhile (its
/// end did not take) records nothing.
async fn write_observations(
    tx: &mut Tx<'static>,
    config: &Config,
    run: &[Decided],
    changes: &mut Changes,
) -> Result<Vec<Written>, StoreError> {
    let now = time::now();
    let ends: Vec<(i64, &str, &str)> = run
        .iter()
        .map(|d| (d.delivery.id, d.lease_until.as_str(), "processed"))
        .collect();
    let ended = inbox::finish_many(tx, &ends, &time::fmt(now)).await?;
    let live: Vec<&Decided> = run
        .iter()
        .filter(|d| ended.contains(&d.delivery.id))
        .collect();
    let triggers: Vec<Trigger> = live.iter().map(|d| trigger_of(&d.delivery)).collect();
    let items: Vec<ToRecord> = live
        .iter()
        .zip(&triggers)
        .filter_map(|(d, trigger)| {
            plain_observation(d).map(|(obs, context)| ToRecord {
                obs,
                trigger,
                context,
            })
        })
        .collect();
    let mut recorded = record::record_all(tx, config, &items, now, changes)
        .await?
        .into_iter()
        .zip(&items);
    for d in &live {
        recovered(tx, config, &d.delivery, changes).await?;
    }
    let written = run
        .iter()
        .map(|d| {
            if !ended.contains(&d.delivery.id) {
                return Written::LeaseLost;
            }
            match recorded.next() {
                Some((r, item)) => Written::Processed {
                    status: item.obs.status.clone(),
                    transitions: r.transitions,
                    stale: r.stale,
                },
                None => Written::LeaseLost,
            }
        })
        .collect();
    Ok(written)
}

struct Panicked;

/// Writes one outcome in a savepoint, kept unless the lease was lost, the
/// database refused or the code panicked.
async fn write_one(
    tx: &mut Tx<'static>,
    config: &Config,
    decided: &Decided,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Result<Written, StoreError>, Panicked> {
    let mut savepoint = match sqlx::Connection::begin(&mut **tx).await {
        Ok(savepoint) => savepoint,
        Err(e) => return Ok(Err(e.into())),
    };
    // What this outcome raised or resolved counts only if its savepoint is kept.
    let mut its_changes = Changes::new();
    let written = AssertUnwindSafe(write(
        &mut savepoint,
        config,
        &decided.delivery,
        &decided.lease_until,
        outcome,
        &mut its_changes,
    ))
    .catch_unwind()
    .await;
    let keep = matches!(&written, Ok(Ok(w)) if *w != Written::LeaseLost);
    let ended = if keep {
        savepoint.commit().await
    } else {
        savepoint.rollback().await
    };
    if keep && ended.is_ok() {
        changes.append(&mut its_changes);
    }
    match (written, ended) {
        (Err(_), _) => {
            let _span = delivery_span(&decided.delivery).entered();
            tracing::error!("recording panicked (a bug)");
            Err(Panicked)
        }
        (Ok(written), Ok(())) => Ok(written),
        (Ok(_), Err(e)) => Ok(Err(e.into())),
    }
}

/// Writes what an outcome means for its delivery, in `tx`.
async fn write(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let written = write_outcome(tx, config, d, lease_until, outcome, changes).await?;
    if matches!(
        written,
        Written::Ignored(_) | Written::Processed { .. } | Written::Reversal(_)
    ) {
        recovered(tx, config, d, changes).await?;
    }
    Ok(written)
}

/// After a delivery ended well: when it had failed before (a replayed dead
/// letter carries its last error), its `dead_letter` alert is resolved.
async fn recovered(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    if d.last_error.is_some() {
        crate::store::alerting::rules::on_delivery_recovered(
            tx,
            config,
            d,
            &time::now_str(),
            changes,
        )
        .await?;
    }
    Ok(())
}

async fn write_outcome(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let now = time::now();
    let now_s = time::fmt(now);
    let trigger = trigger_of(d);
    let finished = |done: bool, written: Written| if done { written } else { Written::LeaseLost };
    match outcome {
        Outcome::Ignore(reason) => {
            let done = inbox::ignore(tx, d.id, lease_until, reason, &now_s).await?;
            Ok(finished(done, Written::Ignored(reason.clone())))
        }
        Outcome::Reversal(item) => {
            if !record::record_reversal(tx, config, item, &trigger, now, changes).await? {
                let error = format!(
                    "reversal of {} {}, which is not known yet",
                    item.kind, item.id
                );
                return write_failure(tx, config, d, lease_until, &error, None, changes).await;
            }
            let done = inbox::finish(tx, d.id, lease_until, "processed", &now_s).await?;
            Ok(finished(done, Written::Reversal(item.id.clone())))
        }
        Outcome::Observed {
            obs,
            context,
            reversal,
        } => {
            let item = ToRecord {
                obs,
                trigger: &trigger,
                context: context.as_deref(),
            };
            let recorded =
                record_observed(tx, config, &item, reversal.as_ref(), now, changes).await?;
            let recorded = match recorded {
                Ok(recorded) => recorded,
                Err(error) => {
                    return write_failure(tx, config, d, lease_until, &error, None, changes).await
                }
            };
            let done = inbox::finish(tx, d.id, lease_until, "processed", &now_s).await?;
            Ok(finished(
                done,
                Written::Processed {
                    status: obs.status.clone(),
                    transitions: recorded.transitions,
                    stale: recorded.stale,
                },
            ))
        }
        Outcome::NotFound { target, detail } => {
            mark_missing(tx, &d.provider, target, &now_s).await?;
            let error = format!("the resource does not exist: {detail}");
            dead_at_once(tx, config, d, lease_until, &error, changes).await
        }
        Outcome::Failed { error, retry_after } => {
            write_failure(tx, config, d, lease_until, error, *retry_after, changes).await
        }
        Outcome::Unusable(error) => dead_at_once(tx, config, d, lease_until, error, changes).await,
        Outcome::Released(error) => {
            let wait = Duration::from_secs(config.workers.backoff_max_secs.clamp(1, 60));
            let next = release(tx, d, lease_until, error, wait).await?;
            Ok(
                next.map_or(Written::LeaseLost, |next_attempt_at| Written::Released {
                    error: error.clone(),
                    next_attempt_at,
                }),
            )
        }
        Outcome::RateLimited { error, retry_after } => {
            let wait = retry_after.unwrap_or_else(|| next_backoff(config, d));
            let next = release(tx, d, lease_until, error, wait).await?;
            Ok(
                next.map_or(Written::LeaseLost, |next_attempt_at| Written::RateLimited {
                    error: error.clone(),
                    next_attempt_at,
                }),
            )
        }
    }
}

/// Records an observation and the reversal it carries, if any: the two
/// stand or fall together. `Err` says why nothing was recorded: the
/// reversal's transfer is not one the observation lists.
async fn record_observed(
    tx: &mut Tx<'_>,
    config: &Config,
    item: &ToRecord<'_>,
    reversal: Option<&Target>,
    now: Timestamp,
    changes: &mut Changes,
) -> Result<Result<Recorded, String>, StoreError> {
    let Some(reversed) = reversal else {
        let (obs, trigger, context) = (item.obs, item.trigger, item.context);
        let recorded = record::record(tx, config, obs, trigger, context, now, changes).await?;
        return Ok(Ok(recorded));
    };
    let mut both = sqlx::Connection::begin(&mut **tx).await?;
    let mut both_changes = Changes::new();
    let recorded = record::record(
        &mut both,
        config,
        item.obs,
        item.trigger,
        item.context,
        now,
        &mut both_changes,
    )
    .await?;
    if !record::record_reversal(
        &mut both,
        config,
        reversed,
        item.trigger,
        now,
        &mut both_changes,
    )
    .await?
    {
        both.rollback().await?;
        return Ok(Err(format!(
            "reversal of {} {}, which {} {} does not list",
            reversed.kind, reversed.id, item.obs.kind, item.obs.id
        )));
    }
    both.commit().await?;
    changes.append(&mut both_changes);
    Ok(Ok(recorded))
}

/// Stores that the provider does not have `target` (adding the resource
/// when it is not stored yet).
async fn mark_missing(
    tx: &mut Tx<'_>,
    provider: &str,
    target: &Target,
    now_s: &str,
) -> Result<(), StoreError> {
    let resource = resources::ensure(
        tx,
        provider,
        &target.kind,
        &target.id,
        None,
        target.context.as_deref(),
        now_s,
    )
    .await?;
    resources::mark_not_found(tx, resource.rid, now_s, None).await
}

/// Gives the attempt back uncounted: the delivery is pending again, due
/// after `wait`. The time it is due, or `None` when the lease was lost.
async fn release(
    tx: &mut Tx<'_>,
    d: &Delivery,
    lease_until: &str,
    error: &str,
    wait: Duration,
) -> Result<Option<String>, StoreError> {
    let next = time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default());
    let done = inbox::release(tx, d.id, lease_until, error, &next).await?;
    Ok(done.then_some(next))
}

/// A failed attempt: retry later with backoff (at least what the provider
/// asked for), or `dead` once `workers.max_attempts` is reached.
/// Ends the delivery `dead` now, whatever attempts it has left, with its
/// dead-letter alert.
async fn dead_at_once(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    error: &str,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let now = time::now_str();
    if !inbox::fail(tx, d.id, lease_until, error, &now, true).await? {
        return Ok(Written::LeaseLost);
    }
    crate::store::alerting::rules::on_dead_letter(tx, config, d.id, error, &now, changes).await?;
    Ok(Written::Dead(error.to_string()))
}

async fn write_failure(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    error: &str,
    retry_after: Option<Duration>,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let w = &config.workers;
    let dead = d.attempts >= i64::from(w.max_attempts);
    let wait = next_backoff(config, d).max(retry_after.unwrap_or_default());
    let next = time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default());
    if !inbox::fail(tx, d.id, lease_until, error, &next, dead).await? {
        return Ok(Written::LeaseLost);
    }
    if dead {
        let now = time::now_str();
        crate::store::alerting::rules::on_dead_letter(tx, config, d.id, error, &now, changes)
            .await?;
        return Ok(Written::Dead(error.to_string()));
    }
    Ok(Written::Retry {
        error: error.to_string(),
        next_attempt_at: next,
    })
}
