//! The alert rules evaluated inside the write transaction that recorded an
//! observation or sent a delivery to the dead letters: the rows they need
//! are read here, [`crate::domain::alerts`] decides, and what it raises
//! commits (or rolls back) with the rest.

use crate::store::StoreError;
use serde_json::{json, Value};

use super::AlertRows;
use crate::config::Config;
use crate::domain::alerts::{
    self, alert_key, dead_letter_subject, new_alert, not_effective, route, still_stuck_in, Changed,
    Changes, CANCEL_NOT_EFFECTIVE, DEAD_LETTER, PARTIAL_CANCELLATION, REFUND_OVERDUE, STUCK,
};
use crate::providers::knowledge::{kind_info, PartialRule};
use crate::store::model::{
    Alert, AlertKey, Delivery, NewAlert, RaiseOutcome, Resource as ResourceRow,
};

/// Evaluates the observation-driven rules for resource `rid` after it (and,
/// for a Juice bulk transfer, its items) was recorded in `tx`: raises or
/// updates `partial_cancellation` and `cancel_not_effective`, and resolves a
/// `partial_cancellation` / `stuck` / `refund_overdue` alert whose condition
/// no longer holds. For a
/// Juice item, its bulk transfer is evaluated again too.
pub async fn on_resource_recorded(
    tx: &mut dyn AlertRows,
    config: &Config,
    rid: i64,
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let Some(resource) = tx.resource(rid).await? else {
        return Ok(());
    };
    evaluate_alone(tx, config, &resource, now, changes).await?;
    if let Some((parent_kind, parent_id)) = parent_of(&resource) {
        if let Some(parent) = tx
            .resource_by_key(&resource.provider, parent_kind, parent_id)
            .await?
        {
            evaluate_alone(tx, config, &parent, now, changes).await?;
        }
    }
    Ok(())
}

/// An item's parent, whose rules read its items: `(kind, id)`.
fn parent_of(r: &ResourceRow) -> Option<(&'static str, &str)> {
    let parent_kind = kind_info(&r.kind)?.parent_kind?;
    Some((parent_kind, r.parent_id.as_deref()?))
}

/// [`on_resource_recorded`] for every resource one observation wrote (a
/// bulk transfer and its items), given as they are now: each is evaluated
/// once, and a Juice item's bulk transfer once however many of its items
/// are in `resources`.
///
/// `open` holds their open alerts, read by [`open_alerts`] in the same
/// transaction.
pub async fn on_observation_recorded(
    tx: &mut dyn AlertRows,
    config: &Config,
    resources: &[ResourceRow],
    open: &[Alert],
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let mut seen = std::collections::HashSet::new();
    let mut parents = Vec::new();
    for resource in resources {
        if !seen.insert(resource.rid) {
            continue;
        }
        let about: Vec<&Alert> = open.iter().filter(|a| is_about(a, resource)).collect();
        evaluate(tx, config, resource, &about, now, changes).await?;
        if let Some((parent_kind, parent_id)) = parent_of(resource) {
            let key = (
                resource.provider.clone(),
                parent_kind,
                parent_id.to_string(),
            );
            if !parents.contains(&key) {
                parents.push(key);
            }
        }
    }
    for (provider, parent_kind, parent_id) in parents {
        if let Some(parent) = tx
            .resource_by_key(&provider, parent_kind, &parent_id)
            .await?
        {
            if !seen.contains(&parent.rid) {
                evaluate_alone(tx, config, &parent, now, changes).await?;
            }
        }
    }
    Ok(())
}

fn is_about(alert: &Alert, r: &ResourceRow) -> bool {
    alert.provider == r.provider && alert.kind == r.kind && alert.resource_id == r.id
}

/// [`evaluate`], reading the resource's open alerts first.
async fn evaluate_alone(
    tx: &mut dyn AlertRows,
    config: &Config,
    resource: &ResourceRow,
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let open = tx
        .open_alerts_about(&resource.provider, &resource.kind, &resource.id)
        .await?;
    let about: Vec<&Alert> = open.iter().collect();
    evaluate(tx, config, resource, &about, now, changes).await
}

/// Runs every rule on a resource as it is now; `open` holds its open alerts.
async fn evaluate(
    tx: &mut dyn AlertRows,
    config: &Config,
    resource: &ResourceRow,
    open: &[&Alert],
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let open_of = |rule: &str| open.iter().copied().find(|a| a.rule == rule);
    if config.alerts.partial_cancellation.enabled {
        let rule = kind_info(&resource.kind).map_or(PartialRule::None, |k| k.partial);
        let found = match rule {
            PartialRule::Items { item_kind } => {
                partial_by_items(tx, config, resource, item_kind).await?
            }
            PartialRule::Progress => partial_by_progress(tx, config, resource).await?,
            PartialRule::None => None,
        };
        match found {
            Some((summary, details)) => {
                let alert = new_alert(
                    PARTIAL_CANCELLATION,
                    &config.alerts.partial_cancellation.severity,
                    resource,
                    summary,
                    details,
                );
                raise(tx, config, &alert, now, changes).await?;
            }
            // E.g. an item seen `pending` in a cancelled bulk was then seen cancelled.
            None if open_of(PARTIAL_CANCELLATION).is_some() => {
                resolve(
                    tx,
                    config,
                    &alert_key(PARTIAL_CANCELLATION, resource),
                    now,
                    changes,
                )
                .await?;
            }
            None => {}
        }
    }
    if config.alerts.cancel_not_effective.enabled {
        if let Some((summary, details)) = not_effective(resource) {
            let alert = new_alert(
                CANCEL_NOT_EFFECTIVE,
                &config.alerts.cancel_not_effective.severity,
                resource,
                summary,
                details,
            );
            raise(tx, config, &alert, now, changes).await?;
        }
    }
    resolve_stale(
        tx,
        config,
        resource,
        open_of(STUCK),
        open_of(REFUND_OVERDUE),
        now,
        changes,
    )
    .await
}

/// The rows [`alerts::partial_by_items`] decides on.
async fn partial_by_items(
    tx: &mut dyn AlertRows,
    config: &Config,
    bulk: &ResourceRow,
    item_kind: &str,
) -> Result<Option<(String, Value)>, StoreError> {
    let answer = tx
        .latest_cancel_with_outcome(&bulk.provider, &bulk.id, "partial_cancellation")
        .await?;
    let cancelled = bulk
        .status
        .as_deref()
        .is_some_and(|s| crate::providers::knowledge::is_cancelled(config, &bulk.kind, s));
    if answer.is_none() && !cancelled {
        // Neither cancelled nor answered in part: nothing to find, and the
        // items of a large bulk transfer that moves are not read again at
        // each of its fetches.
        return Ok(None);
    }
    let items = tx.children(&bulk.provider, item_kind, &bulk.id).await?;
    // Only a cancelled one can be shown cancelled in part by its counters.
    let counters = match cancelled {
        true => tx.latest_progress(bulk.rid).await?,
        false => None,
    };
    Ok(alerts::partial_by_items(
        config,
        bulk,
        answer.as_ref(),
        &items,
        counters.as_ref(),
    ))
}

/// The rows [`alerts::partial_by_progress`] decides on.
async fn partial_by_progress(
    tx: &mut dyn AlertRows,
    config: &Config,
    job: &ResourceRow,
) -> Result<Option<(String, Value)>, StoreError> {
    let cancelled = job
        .status
        .as_deref()
        .is_some_and(|s| crate::providers::knowledge::is_cancelled(config, &job.kind, s));
    if !cancelled {
        // Nothing to read: only a cancelled one was cancelled in part.
        return Ok(None);
    }
    let progress = tx.latest_progress(job.rid).await?;
    Ok(alerts::partial_by_progress(config, job, progress.as_ref()))
}

/// Resolves an open `stuck` alert once the resource left the status it was
/// stuck in, and an open `refund_overdue` alert once the refund is no longer
/// pending.
async fn resolve_stale(
    tx: &mut dyn AlertRows,
    config: &Config,
    r: &ResourceRow,
    stuck: Option<&Alert>,
    overdue: Option<&Alert>,
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    if let Some(alert) = stuck {
        if !still_stuck_in(&alert.details, r) {
            resolve(tx, config, &alert_key(STUCK, r), now, changes).await?;
        }
    }
    if overdue.is_some() {
        let refund = tx.refund_of(r.rid).await?;
        if !matches!(refund, Some(f) if f.status == "pending") {
            resolve(tx, config, &alert_key(REFUND_OVERDUE, r), now, changes).await?;
        }
    }
    Ok(())
}

/// Raises `dead_letter` for delivery `delivery_id` of the inbox, which gave
/// up after its retries with `error`. The alert is about the delivery's
/// resource when known, else about `(provider, "delivery", dedupe key)`.
pub async fn on_dead_letter(
    tx: &mut dyn AlertRows,
    config: &Config,
    delivery_id: i64,
    error: &str,
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let rule = &config.alerts.dead_letter;
    if !rule.enabled {
        return Ok(());
    }
    let Some(d) = tx.delivery(delivery_id).await? else {
        return Ok(());
    };
    let (kind, resource_id) = dead_letter_subject(
        d.resource_kind.as_deref(),
        d.resource_id.as_deref(),
        &d.dedupe_key,
    );
    let alert = NewAlert {
        rule: DEAD_LETTER.into(),
        severity: rule.severity.clone(),
        provider: d.provider.clone(),
        kind,
        resource_id,
        summary: format!(
            "{} delivery {} ({}) gave up after {} attempts: {error}",
            d.provider, d.dedupe_key, d.event_type, d.attempts
        ),
        details: json!({
            "delivery_id": d.id,
            "dedupe_key": d.dedupe_key,
            "event_type": d.event_type,
            "attempts": d.attempts,
            "received_at": d.received_at,
            "error": error,
        }),
    };
    raise(tx, config, &alert, now, changes).await?;
    Ok(())
}

/// A delivery that had failed before was processed after all (a replay of
/// a dead letter, or a retry): the open `dead_letter` alert raised for this
/// very delivery, if any, is resolved. An alert that names another delivery
/// of the same resource stays open.
pub async fn on_delivery_recovered(
    tx: &mut dyn AlertRows,
    config: &Config,
    d: &Delivery,
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let (kind, resource_id) = dead_letter_subject(
        d.resource_kind.as_deref(),
        d.resource_id.as_deref(),
        &d.dedupe_key,
    );
    let key = AlertKey {
        rule: DEAD_LETTER.into(),
        provider: d.provider.clone(),
        kind,
        resource_id,
    };
    let Some(open) = tx.find_alert(&key).await?.filter(|a| a.state == "open") else {
        return Ok(());
    };
    let names_this_one = serde_json::from_str::<Value>(&open.details)
        .ok()
        .and_then(|details| details.get("delivery_id").and_then(Value::as_i64))
        == Some(d.id);
    if names_this_one {
        resolve(tx, config, &key, now, changes).await?;
    }
    Ok(())
}

/// Raises (creates or updates) an alert and queues each new version for its
/// sinks, inside the caller's transaction; a new version is noted in `changes`.
pub async fn raise(
    tx: &mut dyn AlertRows,
    config: &Config,
    alert: &NewAlert,
    now: &str,
    changes: &mut Changes,
) -> Result<RaiseOutcome, StoreError> {
    let sinks = route(config, &alert.rule, &alert.severity);
    let outcome = tx.raise_alert(alert, &sinks, now).await?;
    if !matches!(outcome, RaiseOutcome::Unchanged(_)) {
        changes.push(Changed::of(outcome.alert(), false));
    }
    Ok(outcome)
}

/// Resolves the open alert of `key`, if any, and queues the resolved
/// version; noted in `changes`.
pub async fn resolve(
    tx: &mut dyn AlertRows,
    config: &Config,
    key: &AlertKey,
    now: &str,
    changes: &mut Changes,
) -> Result<Option<Alert>, StoreError> {
    let Some(open) = tx.find_alert(key).await?.filter(|a| a.state == "open") else {
        return Ok(None);
    };
    let sinks = route(config, &key.rule, &open.severity);
    let resolved = tx.resolve_alert(key, &sinks, now).await?;
    if let Some(a) = &resolved {
        changes.push(Changed::of(a, true));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::report;

    /// Raising and resolving count and log nothing: they are noted in the
    /// transaction's changes, which whoever commits reports ([`report`]), so
    /// a transaction rolled back, or a batch written again after a
    /// failure, is not counted.
    #[test]
    fn alerts_are_counted_only_when_reported() {
        crate::metrics::with_local_metrics(|counted| async move {
            let dir = tempfile::tempdir().unwrap();
            let config = Config::default();
            let db = crate::store::sqlite::Db::open(&dir.path().join("cw.db"), &config.database)
                .await
                .unwrap();
            let alert = NewAlert {
                rule: PARTIAL_CANCELLATION.into(),
                severity: "critical".into(),
                provider: "juice".into(),
                kind: "juice.bulk_transfer".into(),
                resource_id: "bt_1".into(),
                summary: "1 of 2 items cancelled".into(),
                details: serde_json::json!({}),
            };
            let mut changes = Changes::new();
            let mut tx = db.write.begin().await.unwrap();
            raise(
                &mut tx,
                &config,
                &alert,
                "2026-11-23T00:00:00Z",
                &mut changes,
            )
            .await
            .unwrap();
            resolve(
                &mut tx,
                &config,
                &alert.key(),
                "2026-11-23T00:01:00Z",
                &mut changes,
            )
            .await
            .unwrap();
            tx.rollback().await.unwrap();
            let noted: Vec<(&str, i64, bool)> = changes
                .iter()
                .map(|c| (c.rule.as_str(), c.version, c.resolved))
                .collect();
            assert_eq!(
                noted,
                [
                    (PARTIAL_CANCELLATION, 1, false),
                    (PARTIAL_CANCELLATION, 2, true)
                ]
            );
            assert!(!counted.render().contains("cancelwatch_alerts_raised_total"));
            report(&changes);
            let line = r#"cancelwatch_alerts_raised_total{rule="partial_cancellation"} 1"#;
            assert!(counted.render().contains(line), "{}", counted.render());
            db.close().await;
        });
    }
}
