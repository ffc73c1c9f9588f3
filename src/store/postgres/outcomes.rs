//! Writes a batch of decided outcomes on PostgreSQL: one transaction, a
//! savepoint for each outcome, so one that fails (a database error, a
//! deadlock with another replica, a panic: a bug) costs only itself and its
//! delivery is tried again once its lease runs out. The pipeline's commits
//! are not waited for on disk (`synchronous_commit = off`): one lost in a
//! crash is a delivery processed again, and the acknowledgement's own
//! commit, which is waited for, has already kept the delivery.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use super::{inbox, record};
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
    let mut changes = Changes::new();
    let mut results = Vec::with_capacity(batch.len());
    for decided in batch {
        let mut written = write_one(&mut tx, owner, config, decided, &decided.outcome).await;
        if let Err(Panicked) = written {
            // A bug in recording this outcome: the attempt fails instead
            // (in the end the delivery is dead), the rest go on.
            let failed = Outcome::Failed {
                error: "recording panicked (a bug): see the log".into(),
                retry_after: None,
            };
            written = write_one(&mut tx, owner, config, decided, &failed).await;
        }
        results.push(match written {
            Ok(Ok((written, mut its))) => {
                changes.append(&mut its);
                Some(written)
            }
            Ok(Err(e)) => {
                let _span = delivery_span(&decided.delivery).entered();
                tracing::error!(error = %e, "writing a delivery's outcome failed");
                None
            }
            Err(Panicked) => None,
        });
    }
    tx.commit().await?;
    Ok((results, changes))
}

struct Panicked;

/// Writes one outcome in a savepoint, kept unless the lease was lost, the
/// database refused or the code panicked.
async fn write_one(
    conn: &mut PgConnection,
    owner: Uuid,
    config: &Config,
    decided: &Decided,
    outcome: &Outcome,
) -> Result<Result<(Written, Changes), StoreError>, Panicked> {
    let mut savepoint = match conn.begin().await {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.into())),
    };
    let mut changes = Changes::new();
    let d = &decided.delivery;
    let fence = Fence {
        owner,
        lease_until: &decided.lease_until,
    };
    let written = AssertUnwindSafe(write(
        &mut savepoint,
        fence,
        config,
        d,
        outcome,
        &mut changes,
    ))
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
            let _span = delivery_span(d).entered();
            tracing::error!("recording panicked (a bug)");
            Err(Panicked)
        }
        (Ok(Ok(written)), Ok(())) => Ok(Ok((written, changes))),
        (Ok(Err(e)), _) => Ok(Err(e)),
        (Ok(Ok(_)), Err(e)) => Ok(Err(e.into())),
    }
}

/// What ends an attempt: the lease it holds.
#[derive(Clone, Copy)]
struct Fence<'a> {
    owner: Uuid,
    lease_until: &'a str,
}

async fn write(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    config: &Config,
    d: &Delivery,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let now = time::now();
    let now_s = time::fmt(now);
    let trigger = trigger_of(d);
    let (lease, owner) = (fence.lease_until, fence.owner);
    let finished = |done: bool, written: Written| if done { written } else { Written::LeaseLost };
    let written = match outcome {
        Outcome::Ignore(reason) => {
            let done = inbox::ignore(conn, d.id, lease, owner, reason, &now_s).await?;
            finished(done, Written::Ignored(reason.clone()))
        }
        Outcome::Reversal(item) => {
            if !record::record_reversal(conn, config, item, &trigger, now, changes).await? {
                let error = format!(
                    "reversal of {} {}, which is not known yet",
                    item.kind, item.id
                );
                return failure(conn, fence, config, d, &error, None, changes).await;
            }
            let done = inbox::finish(conn, d.id, lease, owner, "processed", &now_s).await?;
            finished(done, Written::Reversal(item.id.clone()))
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
            // The observation and the reversal it carries stand or fall together.
            let mut both = conn.begin().await?;
            let mut both_changes = Changes::new();
            let recorded = record::record_all(&mut both, config, &[item], now, &mut both_changes)
                .await?
                .pop()
                .unwrap_or_default();
            if let Some(reversed) = reversal {
                let known = record::record_reversal(
                    &mut both,
                    config,
                    reversed,
                    &trigger,
                    now,
                    &mut both_changes,
                )
                .await?;
                if !known {
                    both.rollback().await?;
                    let error = format!(
                        "reversal of {} {}, which {} {} does not list",
                        reversed.kind, reversed.id, obs.kind, obs.id
                    );
                    return failure(conn, fence, config, d, &error, None, changes).await;
                }
            }
            both.commit().await?;
            changes.append(&mut both_changes);
            let done = inbox::finish(conn, d.id, lease, owner, "processed", &now_s).await?;
            finished(
                done,
                Written::Processed {
                    status: obs.status.clone(),
                    transitions: recorded.transitions,
                    stale: recorded.stale,
                },
            )
        }
        Outcome::NotFound { target, detail } => {
            mark_missing(conn, &d.provider, target, &now_s).await?;
            let error = format!("the resource does not exist: {detail}");
            return dead_at_once(conn, fence, config, d, &error, changes).await;
        }
        Outcome::Unusable(error) => {
            return dead_at_once(conn, fence, config, d, error, changes).await
        }
        Outcome::Failed { error, retry_after } => {
            return failure(conn, fence, config, d, error, *retry_after, changes).await
        }
        Outcome::Released(error) => {
            let wait = Duration::from_secs(config.workers.backoff_max_secs.clamp(1, 60));
            let next = later(wait);
            let done = inbox::release(conn, d.id, lease, owner, Some(error), Some(&next)).await?;
            finished(
                done,
                Written::Released {
                    error: error.clone(),
                    next_attempt_at: next,
                },
            )
        }
        Outcome::RateLimited { error, retry_after } => {
            let next = later(retry_after.unwrap_or_else(|| next_backoff(config, d)));
            let done = inbox::release(conn, d.id, lease, owner, Some(error), Some(&next)).await?;
            finished(
                done,
                Written::RateLimited {
                    error: error.clone(),
                    next_attempt_at: next,
                },
            )
        }
    };
    if matches!(
        written,
        Written::Ignored(_) | Written::Processed { .. } | Written::Reversal(_)
    ) && d.last_error.is_some()
    {
        rules::on_delivery_recovered(conn, config, d, &time::now_str(), changes).await?;
    }
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

/// An attempt that every other would fail the same way: the delivery is
/// dead at once, with its alert.
async fn dead_at_once(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    config: &Config,
    d: &Delivery,
    error: &str,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let now_s = time::now_str();
    if !inbox::fail(
        conn,
        d.id,
        fence.lease_until,
        fence.owner,
        error,
        &now_s,
        true,
    )
    .await?
    {
        return Ok(Written::LeaseLost);
    }
    rules::on_dead_letter(conn, config, d.id, error, &now_s, changes).await?;
    Ok(Written::Dead(error.to_string()))
}

/// A failed attempt: retry later with backoff (at least what the provider
/// asked for), or `dead` once `workers.max_attempts` is reached.
async fn failure(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    config: &Config,
    d: &Delivery,
    error: &str,
    retry_after: Option<Duration>,
    changes: &mut Changes,
) -> Result<Written, StoreError> {
    let dead = d.attempts >= i64::from(config.workers.max_attempts);
    let next = later(next_backoff(config, d).max(retry_after.unwrap_or_default()));
    let (lease, owner) = (fence.lease_until, fence.owner);
    if !inbox::fail(conn, d.id, lease, owner, error, &next, dead).await? {
        return Ok(Written::LeaseLost);
    }
    if dead {
        rules::on_dead_letter(conn, config, d.id, error, &time::now_str(), changes).await?;
        return Ok(Written::Dead(error.to_string()));
    }
    Ok(Written::Retry {
        error: error.to_string(),
        next_attempt_at: next,
    })
}
