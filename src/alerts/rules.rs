//! Rules evaluated inside the write transaction that recorded an observation
//! (`on_resource_recorded`) or sent a delivery to the dead letters
//! (`on_dead_letter`). They read the state just written, so what they raise
//! commits (or rolls back) together with it.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{
    Changes, CANCEL_NOT_EFFECTIVE, DEAD_LETTER, PARTIAL_CANCELLATION, REFUND_OVERDUE, STUCK,
};
use crate::config::Config;
use crate::store::alerts::{self as sql, AlertKey, NewAlert, ResourceRow};
use crate::store::Tx;

pub const JUICE_BULK: &str = "juice.bulk_transfer";
pub const JUICE_TRANSFER: &str = "juice.transfer";
pub const STRIPE_BATCH: &str = "stripe.batch_job";
pub const STRIPE_OUTBOUND: &str = "stripe.outbound_transfer";

/// Most not-cancelled items listed one by one in a partial-cancellation alert.
const MAX_LISTED_ITEMS: usize = 100;

/// True for a status in which a resource of `kind` is still on its way
/// somewhere (the statuses the `stuck` rule watches).
pub fn is_transitional(kind: &str, status: &str) -> bool {
    let statuses: &[&str] = match kind {
        STRIPE_OUTBOUND => &["processing"],
        STRIPE_BATCH => &[
            "ready_for_upload",
            "validating",
            "in_progress",
            "cancelling",
        ],
        JUICE_BULK => &["created", "executing", "cancelling"],
        JUICE_TRANSFER => &["pending", "processing"],
        _ => &[
            "processing",
            "cancelling",
            "in_progress",
            "validating",
            "ready_for_upload",
            "created",
            "executing",
            "pending",
        ],
    };
    statuses.contains(&status)
}

/// True for a status that means a cancel took effect (`reversed` statuses of
/// Juice items count: the item was cancelled and its money came back).
fn is_cancelled(config: &Config, status: &str) -> bool {
    matches!(status, "canceled" | "cancelled")
        || config.juice.reversed_statuses.iter().any(|s| s == status)
}

/// Statuses in which a resource of `kind` has settled some other way than
/// cancelled: once there, a cancel can no longer take effect.
fn is_settled_otherwise(kind: &str, status: &str, terminal: bool) -> bool {
    let settled: &[&str] = match kind {
        STRIPE_OUTBOUND => &["posted", "failed", "returned"],
        STRIPE_BATCH => &[
            "complete",
            "batch_failed",
            "timeout",
            "upload_timeout",
            "validation_failed",
        ],
        JUICE_BULK => &["completed", "expired", "failed", "partially_completed"],
        JUICE_TRANSFER => &["completed", "failed"],
        _ => &[],
    };
    settled.contains(&status) || (terminal && !is_transitional(kind, status))
}

/// Evaluates the observation-driven rules for resource `rid` after it (and,
/// for a Juice bulk transfer, its items) was recorded in `tx`: raises or
/// updates `partial_cancellation` and `cancel_not_effective`, and resolves a
/// `partial_cancellation` / `stuck` / `refund_overdue` alert whose condition
/// no longer holds. For a
/// Juice item, its bulk transfer is evaluated again too.
pub async fn on_resource_recorded(
    tx: &mut Tx<'_>,
    config: &Config,
    rid: i64,
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let Some(resource) = sql::resource(tx, rid).await? else {
        return Ok(());
    };
    evaluate_alone(tx, config, &resource, now, changes).await?;
    if resource.kind == JUICE_TRANSFER {
        if let Some(parent_id) = &resource.parent_id {
            if let Some(bulk) =
                crate::store::resources::get(tx, &resource.provider, JUICE_BULK, parent_id).await?
            {
                evaluate_alone(tx, config, &bulk, now, changes).await?;
            }
        }
    }
    Ok(())
}

/// [`on_resource_recorded`] for every resource one observation wrote (a
/// bulk transfer and its items), given as they are now: each is evaluated
/// once, and a Juice item's bulk transfer once however many of its items
/// are in `resources`.
///
/// `open` holds their open alerts, read by [`open_alerts`] in the same
/// transaction.
pub async fn on_observation_recorded(
    tx: &mut Tx<'_>,
    config: &Config,
    resources: &[ResourceRow],
    open: &[sql::Alert],
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let mut seen = std::collections::HashSet::new();
    let mut parents = Vec::new();
    for resource in resources {
        if !seen.insert(resource.rid) {
            continue;
        }
        let about: Vec<&sql::Alert> = open.iter().filter(|a| is_about(a, resource)).collect();
        evaluate(tx, config, resource, &about, now, changes).await?;
        if resource.kind == JUICE_TRANSFER {
            if let Some(parent_id) = &resource.parent_id {
                let key = (resource.provider.clone(), parent_id.clone());
                if !parents.contains(&key) {
                    parents.push(key);
                }
            }
        }
    }
    for (provider, parent_id) in parents {
        if let Some(bulk) =
            crate::store::resources::get(tx, &provider, JUICE_BULK, &parent_id).await?
        {
            if !seen.contains(&bulk.rid) {
                evaluate_alone(tx, config, &bulk, now, changes).await?;
            }
        }
    }
    Ok(())
}

/// The open alerts about `resources`, in one go (most have none), for
/// [`on_observation_recorded`]; straight on the writer's handle.
pub fn open_alerts(
    conn: &rusqlite::Connection,
    resources: &[ResourceRow],
) -> Result<Vec<sql::Alert>, sqlx::Error> {
    let keys: Vec<(&str, &str, &str)> = resources
        .iter()
        .map(|r| (r.provider.as_str(), r.kind.as_str(), r.id.as_str()))
        .collect();
    sql::open_about_many(conn, &keys)
}

fn is_about(alert: &sql::Alert, r: &ResourceRow) -> bool {
    alert.provider == r.provider && alert.kind == r.kind && alert.resource_id == r.id
}

/// [`evaluate`], reading the resource's open alerts first.
async fn evaluate_alone(
    tx: &mut Tx<'_>,
    config: &Config,
    resource: &ResourceRow,
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let open = sql::open_about(tx, &resource.provider, &resource.kind, &resource.id).await?;
    let about: Vec<&sql::Alert> = open.iter().collect();
    evaluate(tx, config, resource, &about, now, changes).await
}

/// Runs every rule on a resource as it is now; `open` holds its open alerts.
async fn evaluate(
    tx: &mut Tx<'_>,
    config: &Config,
    resource: &ResourceRow,
    open: &[&sql::Alert],
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let open_of = |rule: &str| open.iter().copied().find(|a| a.rule == rule);
    if config.alerts.partial_cancellation.enabled {
        let found = match resource.kind.as_str() {
            JUICE_BULK => juice_partial(tx, config, resource).await?,
            STRIPE_BATCH => batch_partial(tx, resource).await?,
            _ => None,
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
                super::raise(tx, config, &alert, now, changes).await?;
            }
            // E.g. an item seen `pending` in a cancelled bulk was then seen cancelled.
            None if open_of(PARTIAL_CANCELLATION).is_some() => {
                super::resolve(
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
            super::raise(tx, config, &alert, now, changes).await?;
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

fn alert_key(rule: &str, r: &ResourceRow) -> AlertKey {
    AlertKey {
        rule: rule.into(),
        provider: r.provider.clone(),
        kind: r.kind.clone(),
        resource_id: r.id.clone(),
    }
}

fn new_alert(
    rule: &str,
    severity: &str,
    r: &ResourceRow,
    summary: String,
    details: Value,
) -> NewAlert {
    NewAlert {
        rule: rule.into(),
        severity: severity.into(),
        provider: r.provider.clone(),
        kind: r.kind.clone(),
        resource_id: r.id.clone(),
        summary,
        details,
    }
}

/// Count and amount of a group of items.
#[derive(Default)]
struct Tally {
    count: i64,
    amount: i64,
}

impl Tally {
    fn add(&mut self, amount: Option<i64>) {
        self.count += 1;
        self.amount += amount.unwrap_or(0);
    }

    fn json(&self) -> Value {
        json!({"count": self.count, "amount": self.amount})
    }
}

/// Juice: the cancel call answered `partial_cancellation`, or the bulk
/// transfer is `cancelled` while some of its items ended otherwise.
async fn juice_partial(
    tx: &mut Tx<'_>,
    config: &Config,
    bulk: &ResourceRow,
) -> Result<Option<(String, Value)>, sqlx::Error> {
    let answer =
        sql::latest_cancel_with_outcome(tx, &bulk.provider, &bulk.id, "partial_cancellation")
            .await?;
    let bulk_cancelled = bulk.status.as_deref() == Some("cancelled");
    let items = sql::children(tx, &bulk.provider, JUICE_TRANSFER, &bulk.id).await?;
    let mut cancelled = Tally::default();
    let mut not_cancelled = Tally::default();
    let mut by_status: BTreeMap<String, Tally> = BTreeMap::new();
    let mut listed = Vec::new();
    for item in &items {
        let status = item.status.clone().unwrap_or_else(|| "unknown".into());
        by_status
            .entry(status.clone())
            .or_default()
            .add(item.amount);
        if is_cancelled(config, &status) {
            cancelled.add(item.amount);
        } else {
            not_cancelled.add(item.amount);
            if listed.len() < MAX_LISTED_ITEMS {
                listed.push(json!({"id": item.id, "status": status, "amount": item.amount}));
            }
        }
    }
    if answer.is_none() && !(bulk_cancelled && not_cancelled.count > 0) {
        return Ok(None);
    }
    let currency = bulk
        .currency
        .clone()
        .or_else(|| items.iter().find_map(|i| i.currency.clone()));
    let others: Vec<String> = by_status
        .iter()
        .filter(|(s, _)| !is_cancelled(config, s))
        .map(|(s, t)| format!("{s}: {}", t.count))
        .collect();
    let summary = if items.is_empty() {
        format!(
            "Juice bulk transfer {} was cancelled only in part (the cancel answered partial_cancellation)",
            bulk.id
        )
    } else {
        format!(
            "Juice bulk transfer {} was cancelled only in part: {} of {} items cancelled ({} {}), {} not cancelled ({} {}; {})",
            bulk.id,
            cancelled.count,
            items.len(),
            cancelled.amount,
            currency.as_deref().unwrap_or(""),
            not_cancelled.count,
            not_cancelled.amount,
            currency.as_deref().unwrap_or(""),
            others.join(", "),
        )
    };
    let details = json!({
        "bulk_status": bulk.status,
        "cancel_request": answer.map(|a| json!({
            "id": a.id,
            "requested_at": a.requested_at,
            "http_status": a.http_status,
            "outcome": a.outcome,
            "error_code": a.error_code,
        })),
        "currency": currency,
        "items_total": items.len(),
        "cancelled": cancelled.json(),
        "not_cancelled": not_cancelled.json(),
        "by_status": by_status.iter().map(|(s, t)| (s.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
        "not_cancelled_items": listed,
    });
    Ok(Some((summary, details)))
}

/// Stripe batch job: `canceled` with records already applied or failed.
async fn batch_partial(
    tx: &mut Tx<'_>,
    job: &ResourceRow,
) -> Result<Option<(String, Value)>, sqlx::Error> {
    if job.status.as_deref() != Some("canceled") {
        return Ok(None);
    }
    let Some(progress) = sql::latest_progress(tx, job.rid).await? else {
        return Ok(None);
    };
    let success = progress.success_count.unwrap_or(0);
    let failure = progress.failure_count.unwrap_or(0);
    if success == 0 && failure == 0 {
        return Ok(None);
    }
    let summary = format!(
        "Stripe batch job {} was canceled after {success} records succeeded and {failure} failed",
        job.id
    );
    let details = json!({
        "status": job.status,
        "success_count": success,
        "failure_count": failure,
        "validated_count": progress.validated_count,
        "counts_observed_at": progress.observed_at,
    });
    Ok(Some((summary, details)))
}

/// A cancel went out through cancelwatch, yet the resource settled otherwise.
fn not_effective(r: &ResourceRow) -> Option<(String, Value)> {
    let requested_at = r.cancel_requested_at.as_deref()?;
    let status = r.status.as_deref()?;
    if matches!(status, "canceled" | "cancelled")
        || !is_settled_otherwise(&r.kind, status, r.terminal)
    {
        return None;
    }
    let summary = format!(
        "cancel of {} {} requested at {requested_at} did not take effect: it is {status}",
        r.kind, r.id
    );
    let details = json!({
        "status": status,
        "cancel_requested_at": requested_at,
        "status_since": r.status_since,
        "amount": r.amount,
        "currency": r.currency,
    });
    Some((summary, details))
}

/// Resolves an open `stuck` alert once the resource left the status it was
/// stuck in, and an open `refund_overdue` alert once the refund is no longer
/// pending.
async fn resolve_stale(
    tx: &mut Tx<'_>,
    config: &Config,
    r: &ResourceRow,
    stuck: Option<&sql::Alert>,
    overdue: Option<&sql::Alert>,
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    if let Some(alert) = stuck {
        if !still_stuck_in(&alert.details, r) {
            super::resolve(tx, config, &alert_key(STUCK, r), now, changes).await?;
        }
    }
    if overdue.is_some() {
        let refund = crate::store::resources::refund_of(tx, r.rid).await?;
        if !matches!(refund, Some(f) if f.status == "pending") {
            super::resolve(tx, config, &alert_key(REFUND_OVERDUE, r), now, changes).await?;
        }
    }
    Ok(())
}

/// True while the resource is still in the status a `stuck` alert names.
pub(crate) fn still_stuck_in(details: &str, r: &ResourceRow) -> bool {
    let named = serde_json::from_str::<Value>(details)
        .ok()
        .and_then(|d| d.get("status").and_then(Value::as_str).map(str::to_owned));
    match (&r.status, named) {
        (Some(status), Some(named)) => {
            !r.terminal && *status == named && is_transitional(&r.kind, status)
        }
        _ => false,
    }
}

/// Raises `dead_letter` for delivery `delivery_id` of the inbox, which gave
/// up after its retries with `error`. The alert is about the delivery's
/// resource when known, else about `(provider, "delivery", dedupe key)`.
pub async fn on_dead_letter(
    tx: &mut Tx<'_>,
    config: &Config,
    delivery_id: i64,
    error: &str,
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let rule = &config.alerts.dead_letter;
    if !rule.enabled {
        return Ok(());
    }
    let Some(d) = sql::delivery(tx, delivery_id).await? else {
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
    super::raise(tx, config, &alert, now, changes).await?;
    Ok(())
}

/// What a `dead_letter` alert is about: the delivery's resource when
/// known, else `("delivery", dedupe key)`.
fn dead_letter_subject(
    kind: Option<&str>,
    resource_id: Option<&str>,
    dedupe_key: &str,
) -> (String, String) {
    match (kind, resource_id) {
        (Some(kind), Some(id)) => (kind.to_string(), id.to_string()),
        _ => ("delivery".to_string(), dedupe_key.to_string()),
    }
}

/// A delivery that had failed before was processed after all (a replay of
/// a dead letter, or a retry): the open `dead_letter` alert raised for this
/// very delivery, if any, is resolved. An alert that names another delivery
/// of the same resource stays open.
pub async fn on_delivery_recovered(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &crate::store::inbox::Delivery,
    now: &str,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
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
    let Some(open) = sql::find(tx, &key).await?.filter(|a| a.state == "open") else {
        return Ok(());
    };
    let names_this_one = serde_json::from_str::<Value>(&open.details)
        .ok()
        .and_then(|details| details.get("delivery_id").and_then(Value::as_i64))
        == Some(d.id);
    if names_this_one {
        super::resolve(tx, config, &key, now, changes).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitional_statuses_per_kind() {
        assert!(is_transitional(STRIPE_OUTBOUND, "processing"));
        assert!(!is_transitional(STRIPE_OUTBOUND, "posted"));
        assert!(is_transitional(STRIPE_BATCH, "cancelling"));
        assert!(!is_transitional(STRIPE_BATCH, "canceled"));
        assert!(is_transitional(JUICE_BULK, "executing"));
        assert!(!is_transitional(JUICE_BULK, "cancelled"));
        assert!(is_transitional(JUICE_TRANSFER, "pending"));
    }

    #[test]
    fn settled_otherwise() {
        assert!(is_settled_otherwise(STRIPE_OUTBOUND, "posted", false));
        assert!(!is_settled_otherwise(STRIPE_OUTBOUND, "processing", false));
        assert!(is_settled_otherwise(JUICE_BULK, "completed", true));
        assert!(!is_settled_otherwise(JUICE_BULK, "executing", false));
        assert!(is_settled_otherwise("other.kind", "done", true));
    }
}
