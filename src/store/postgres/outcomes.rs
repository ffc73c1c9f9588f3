//! Writes a batch of decided outcomes on PostgreSQL, in one transaction.
//!
//! First the whole batch together, in a savepoint, with a few statements
//! for all of it: the attempts ended in one statement (each fenced by its
//! lease), the observations of those that ended recorded by one
//! [`record::record_all`]; a round trip costs far more than a row. Only
//! when that fails (a database error, a deadlock with another replica, a
//! panic: a bug) is it rolled back and the batch written again with a
//! savepoint for each outcome, so one that fails costs only itself and its
//! delivery is tried again once its lease runs out.
//!
//! The pipeline's commits are not waited for on disk
//! (`synchronous_commit = off`): one lost in a crash is a delivery processed
//! again, and the acknowledgement's own commit, which is waited for, has
//! already kept the delivery.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::inbox::{self, End};
use super::record;
use crate::config::Config;
use crate::domain::alerts::Changes;
use crate::domain::observe::ToRecord;
use crate::domain::outcome::{delivery_span, next_backoff, trigger_of, Decided, Outcome, Written};
use crate::providers::Target;
use crate::store::alerting::rules;
use crate::store::model::Delivery;
use crate::store::StoreError;
use crate::time;

pub async fn write_batch(
    conn: &mut PgConnection,
    owner: Uuid,
    config: &Config,
    batch: &[Decided],
) -> Result<(Vec<Option<Written>>, Changes), StoreError> {
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    let attempts: Vec<Attempt> = batch
        .iter()
        .map(|d| Attempt {
            d: &d.delivery,
            lease_until: &d.lease_until,
            outcome: &d.outcome,
        })
        .collect();
    if let Some((written, changes)) = write_together(&mut tx, owner, config, &attempts).await? {
        tx.commit().await?;
        return Ok((written.into_iter().map(Some).collect(), changes));
    }
    let mut changes = Changes::new();
    let mut results = Vec::with_capacity(batch.len());
    for attempt in &attempts {
        let mut written = write_one(&mut tx, owner, config, attempt).await;
        if let Err(Panicked) = written {
            // A bug in recording this outcome: the attempt fails instead
            // (in the end the delivery is dead), the rest go on.
            let failed = Outcome::Failed {
                error: "recording panicked (a bug): see the log".into(),
                retry_after: None,
            };
            let instead = Attempt {
                outcome: &failed,
                ..*attempt
            };
            written = write_one(&mut tx, owner, config, &instead).await;
        }
        results.push(match written {
            Ok(Ok((written, mut its))) => {
                changes.append(&mut its);
                Some(written)
            }
            Ok(Err(e)) => {
                let _span = delivery_span(attempt.d).entered();
                tracing::error!(error = %e, "writing a delivery's outcome failed");
                None
            }
            Err(Panicked) => None,
        });
    }
    tx.commit().await?;
    Ok((results, changes))
}

/// One attempt at a delivery and what it came to.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    d: &'a Delivery,
    /// The lease the attempt holds: with the replica, the fence of its end.
    lease_until: &'a str,
    outcome: &'a Outcome,
}

struct Panicked;

/// The whole batch in a savepoint; `None` when any of it failed, nothing
/// of it then kept.
async fn write_together(
    conn: &mut PgConnection,
    owner: Uuid,
    config: &Config,
    attempts: &[Attempt<'_>],
) -> Result<Option<(Vec<Written>, Changes)>, StoreError> {
    let mut savepoint = conn.begin().await?;
    let mut changes = Changes::new();
    let written = AssertUnwindSafe(write_all(
        &mut savepoint,
        owner,
        config,
        attempts,
        &mut changes,
    ))
    .catch_unwind()
    .await;
    match written {
        Ok(Ok(written)) => {
            savepoint.commit().await?;
            Ok(Some((written, changes)))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, deliveries = attempts.len(), "writing the batch together failed; writing it one outcome at a time");
            savepoint.rollback().await?;
            Ok(None)
        }
        Err(_) => {
            savepoint.rollback().await?;
            Ok(None)
        }
    }
}

/// Writes one outcome in a savepoint, kept unless the lease was lost, the
/// database refused or the code panicked; with the alert changes it made.
async fn write_one(
    conn: &mut PgConnection,
    owner: Uuid,
    config: &Config,
    attempt: &Attempt<'_>,
) -> Result<Result<(Written, Changes), StoreError>, Panicked> {
    let mut savepoint = match conn.begin().await {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.into())),
    };
    let mut changes = Changes::new();
    let written = AssertUnwindSafe(async {
        if alone(attempt.outcome) {
            write_alone(&mut savepoint, owner, config, attempt, &mut changes).await
        } else {
            let written = write_all(
                &mut savepoint,
                owner,
                config,
                std::slice::from_ref(attempt),
                &mut changes,
            )
            .await?;
            written
                .into_iter()
                .next()
                .ok_or(StoreError::Invariant("an outcome written came to nothing"))
        }
    })
    .catch_unwind()
    .await;
    let keep = matches!(&written, Ok(Ok(w)) if *w != Written::LeaseLost);
    let ended = if keep {
        savepoint.commit().await
    } else {
        savepoint.rollback().await
    };
    match (written, ended) {
        (Err(_), _) => {
            let _span = delivery_span(attempt.d).entered();
            tracing::error!("recording panicked (a bug)");
            Err(Panicked)
        }
        // What a lost attempt raised or resolved was rolled back with it.
        (Ok(Ok(Written::LeaseLost)), Ok(())) => Ok(Ok((Written::LeaseLost, Changes::new()))),
        (Ok(Ok(written)), Ok(())) => Ok(Ok((written, changes))),
        (Ok(Err(e)), _) => Ok(Err(e)),
        (Ok(Ok(_)), Err(e)) => Ok(Err(e.into())),
    }
}

/// Outcomes written each on its own ([`write_alone`]): what they record
/// first decides how their attempt ends.
fn alone(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Reversal(_)
            | Outcome::Observed {
                reversal: Some(_),
                ..
            }
    )
}

/// Writes `attempts` with a few statements for all of them: their ends in
/// the inbox (each fenced by its lease) in one, then, for those that ended,
/// the observations in one [`record::record_all`] and the alerts their ends
/// call for; an outcome written [`alone`] is written in a savepoint of its
/// own, dropped when its lease was lost. What each came to, in their order.
async fn write_all(
    conn: &mut PgConnection,
    owner: Uuid,
    config: &Config,
    attempts: &[Attempt<'_>],
    changes: &mut Changes,
) -> Result<Vec<Written>, StoreError> {
    let now = time::now();
    let now_s = time::fmt(now);
    let mut written: Vec<Option<Written>> = attempts.iter().map(|_| None).collect();
    let mut ends = Vec::with_capacity(attempts.len());
    for (i, a) in attempts.iter().enumerate() {
        if let Some((end, w)) = ending(config, a, &now_s) {
            ends.push(end);
            written[i] = Some(w);
        }
    }
    let ended = inbox::end_many(conn, owner, &ends).await?;
    let took = |a: &Attempt| ended.contains(&(a.d.id, a.lease_until.to_string()));
    for (a, w) in attempts.iter().zip(&mut written) {
        if w.is_some() && !took(a) {
            *w = Some(Written::LeaseLost);
        }
    }

    // The plain observations of the attempts that ended, recorded together.
    let triggers: Vec<_> = attempts.iter().map(|a| trigger_of(a.d)).collect();
    let mut observed = Vec::new();
    let mut items = Vec::new();
    for (i, (a, trigger)) in attempts.iter().zip(&triggers).enumerate() {
        if let (
            Some(Written::Processed { .. }),
            Outcome::Observed {
                obs,
                context,
                reversal: None,
            },
        ) = (&written[i], a.outcome)
        {
            observed.push(i);
            items.push(ToRecord {
                obs,
                trigger,
                context: context.as_deref(),
            });
        }
    }
    if !items.is_empty() {
        let recorded = record::record_all(conn, config, &items, now, changes).await?;
        for (i, r) in observed.into_iter().zip(recorded) {
            if let Some(Written::Processed {
                transitions, stale, ..
            }) = &mut written[i]
            {
                *transitions = r.transitions;
                *stale = r.stale;
            }
        }
    }

    for (a, w) in attempts.iter().zip(&written) {
        let Some(w) = w else { continue };
        if *w == Written::LeaseLost {
            continue;
        }
        if let Outcome::NotFound { target, .. } = a.outcome {
            mark_missing(conn, &a.d.provider, target, &now_s).await?;
        }
        after_end(conn, config, a.d, w, changes).await?;
    }

    for (a, w) in attempts.iter().zip(&mut written) {
        if w.is_some() {
            continue;
        }
        let mut savepoint = conn.begin().await?;
        let mut its = Changes::new();
        let its_written = write_alone(&mut savepoint, owner, config, a, &mut its).await?;
        if its_written == Written::LeaseLost {
            savepoint.rollback().await?;
        } else {
            savepoint.commit().await?;
            changes.append(&mut its);
        }
        *w = Some(its_written);
    }
    written
        .into_iter()
        .map(|w| w.ok_or(StoreError::Invariant("an outcome was not written")))
        .collect()
}

/// How an attempt ends in the inbox and what it then came to, unless its
/// outcome is written [`alone`]. An observation's transitions are filled
/// in once it is recorded.
fn ending<'a>(config: &Config, a: &Attempt<'a>, now_s: &str) -> Option<(End<'a>, Written)> {
    let done = |state: &'static str, last_error: Option<&str>| End {
        id: a.d.id,
        lease_until: a.lease_until,
        state,
        processed_at: Some(now_s.to_string()),
        next_attempt_at: None,
        last_error: last_error.map(str::to_string),
        give_back: false,
    };
    Some(match a.outcome {
        Outcome::Ignore(reason) => (
            done("ignored", Some(reason)),
            Written::Ignored(reason.clone()),
        ),
        Outcome::Observed {
            obs,
            reversal: None,
            ..
        } => (
            done("processed", None),
            Written::Processed {
                status: obs.status.clone(),
                transitions: Vec::new(),
                stale: false,
            },
        ),
        Outcome::Reversal(_) | Outcome::Observed { .. } => return None,
        Outcome::NotFound { detail, .. } => {
            let error = format!("the resource does not exist: {detail}");
            dead_at_once(a, &error)
        }
        Outcome::Unusable(error) => dead_at_once(a, error),
        Outcome::Failed { error, retry_after } => failure(config, a, error, *retry_after),
        Outcome::Released(error) => {
            let wait = Duration::from_secs(config.workers.backoff_max_secs.clamp(1, 60));
            let (end, next) = given_back(a, error, wait);
            let written = Written::Released {
                error: error.clone(),
                next_attempt_at: next,
            };
            (end, written)
        }
        Outcome::RateLimited { error, retry_after } => {
            let wait = retry_after.unwrap_or_else(|| next_backoff(config, a.d));
            let (end, next) = given_back(a, error, wait);
            let written = Written::RateLimited {
                error: error.clone(),
                next_attempt_at: next,
            };
            (end, written)
        }
    })
}

/// The attempt is given back uncounted: the delivery is pending again, due
/// after `wait`; with the time it is due.
fn given_back<'a>(a: &Attempt<'a>, error: &str, wait: Duration) -> (End<'a>, String) {
    let next = later(wait);
    let end = End {
        id: a.d.id,
        lease_until: a.lease_until,
        state: "pending",
        processed_at: None,
        next_attempt_at: Some(next.clone()),
        last_error: Some(error.to_string()),
        give_back: true,
    };
    (end, next)
}

/// An attempt that every other would fail the same way: the delivery is
/// dead at once (its alert raised once the end took, by [`after_end`]).
fn dead_at_once<'a>(a: &Attempt<'a>, error: &str) -> (End<'a>, Written) {
    let end = End {
        id: a.d.id,
        lease_until: a.lease_until,
        state: "dead",
        processed_at: None,
        next_attempt_at: Some(time::now_str()),
        last_error: Some(error.to_string()),
        give_back: false,
    };
    (end, Written::Dead(error.to_string()))
}

/// A failed attempt: retry later with backoff (at least what the provider
/// asked for), or `dead` once `workers.max_attempts` is reached.
fn failure<'a>(
    config: &Config,
    a: &Attempt<'a>,
    error: &str,
    retry_after: Option<Duration>,
) -> (End<'a>, Written) {
    let dead = a.d.attempts >= i64::from(config.workers.max_attempts);
    let next = later(next_backoff(config, a.d).max(retry_after.unwrap_or_default()));
    let end = End {
        id: a.d.id,
        lease_until: a.lease_until,
        state: if dead { "dead" } else { "failed" },
        processed_at: None,
        next_attempt_at: Some(next.clone()),
        last_error: Some(error.to_string()),
        give_back: false,
    };
    let written = if dead {
        Written::Dead(error.to_string())
    } else {
        Written::Retry {
            error: error.to_string(),
            next_attempt_at: next,
        }
    };
    (end, written)
}

/// The alerts an attempt's end calls for, once it took: a dead letter's
/// own; after a delivery that had failed before ended well, its
/// `dead_letter` alert resolved.
async fn after_end(
    conn: &mut PgConnection,
    config: &Config,
    d: &Delivery,
    written: &Written,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    match written {
        Written::Dead(error) => {
            rules::on_dead_letter(conn, config, d.id, error, &time::now_str(), changes).await
        }
        Written::Ignored(_) | Written::Processed { .. } | Written::Reversal(_)
            if d.last_error.is_some() =>
        {
            rules::on_delivery_recovered(conn, config, d, &time::now_str(), changes).await
        }
        _ => Ok(()),
    }
}

/// Writes an outcome whose recording decides how its attempt ends (see
/// [`alone`]), then ends it.
async fn write_alone(
    conn: &mut PgConnection,
    owner: Uuid,
    config: &Config,
    a: &Attempt<'_>,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let now = time::now();
    let now_s = time::fmt(now);
    let trigger = trigger_of(a.d);
    let processed = |written: Written| {
        let end = End {
            id: a.d.id,
            lease_until: a.lease_until,
            state: "processed",
            processed_at: Some(now_s.clone()),
            next_attempt_at: None,
            last_error: None,
            give_back: false,
        };
        (end, written)
    };
    let (end, written) = match a.outcome {
        Outcome::Reversal(item) => {
            if record::record_reversal(conn, config, item, &trigger, now, changes).await? {
                processed(Written::Reversal(item.id.clone()))
            } else {
                let error = format!(
                    "reversal of {} {}, which is not known yet",
                    item.kind, item.id
                );
                failure(config, a, &error, None)
            }
        }
        Outcome::Observed {
            obs,
            context,
            reversal: Some(reversed),
        } => {
            let item = ToRecord {
                obs,
                trigger: &trigger,
                context: context.as_deref(),
            };
            // The observation and the reversal it carries stand or fall together.
            let mut both = conn.begin().await?;
            let mut both_changes = Changes::new();
            let recorded = record::record_all(&mut both, config, &[item], now, &mut both_changes)
                .await?
                .pop()
                .unwrap_or_default();
            let known = record::record_reversal(
                &mut both,
                config,
                reversed,
                &trigger,
                now,
                &mut both_changes,
            )
            .await?;
            if known {
                both.commit().await?;
                changes.append(&mut both_changes);
                processed(Written::Processed {
                    status: obs.status.clone(),
                    transitions: recorded.transitions,
                    stale: recorded.stale,
                })
            } else {
                both.rollback().await?;
                let error = format!(
                    "reversal of {} {}, which {} {} does not list",
                    reversed.kind, reversed.id, obs.kind, obs.id
                );
                failure(config, a, &error, None)
            }
        }
        _ => return Err(StoreError::Invariant("an outcome not written alone")),
    };
    let ended = inbox::end_many(conn, owner, std::slice::from_ref(&end)).await?;
    if ended.is_empty() {
        return Ok(Written::LeaseLost);
    }
    after_end(conn, config, a.d, &written, changes).await?;
    Ok(written)
}

fn later(wait: Duration) -> String {
    time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default())
}

async fn mark_missing(
    conn: &mut PgConnection,
    provider: &str,
    target: &Target,
    now_s: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO resources (provider, kind, id, context, first_seen_at, not_found, last_observed_at)
         VALUES ($1, $2, $3, $4, $5, true, $5)
         ON CONFLICT (id, provider, kind) DO UPDATE
             SET not_found = true, last_observed_at = $5, next_reconcile_at = NULL",
    )
    .bind(provider)
    .bind(&target.kind)
    .bind(&target.id)
    .bind(target.context.as_deref())
    .bind(now_s)
    .execute(conn)
    .await?;
    Ok(())
}
