//! Time-based alert rules, evaluated as of a given time in one short write
//! transaction: `stuck`, `refund_overdue` and `verification_failures`. Each
//! scan raises what holds now and resolves the open alerts whose condition
//! no longer holds.

use crate::store::StoreError;
use std::collections::{BTreeMap, HashSet};

use serde_json::json;

use super::rules::{raise, resolve};
use super::AlertRows;
use crate::config::Config;
use crate::domain::alerts::{
    money, still_stuck_in, Changes, REFUND_OVERDUE, STUCK, UNKNOWN_CURRENCY, VERIFICATION_FAILURES,
    WEBHOOK_KIND,
};
use crate::providers::knowledge::{is_transitional, refund_awaits};
use crate::store::model::{AlertKey, NewAlert};
use crate::time::{self, Timestamp};

/// Evaluates the time-based rules as of `now` inside the caller's
/// transaction (one short one: the engine begins and commits it).
pub async fn scan(
    tx: &mut dyn AlertRows,
    config: &Config,
    now: Timestamp,
) -> Result<Changes, StoreError> {
    let now_s = time::fmt(now);
    let mut changes = Changes::new();
    if config.alerts.stuck.enabled {
        stuck(tx, config, now, &now_s, &mut changes).await?;
    }
    if config.alerts.refund_overdue.enabled {
        refund_overdue(tx, config, now, &now_s, &mut changes).await?;
    }
    if config.alerts.verification_failures.enabled {
        verification_failures(tx, config, now, &now_s, &mut changes).await?;
    }
    Ok(changes)
}

fn ago(now: Timestamp, secs: u64) -> String {
    time::fmt(now - chrono::Duration::seconds(secs.min(i64::MAX as u64) as i64))
}

fn key(rule: &str, provider: &str, kind: &str, id: &str) -> AlertKey {
    AlertKey {
        rule: rule.into(),
        provider: provider.into(),
        kind: kind.into(),
        resource_id: id.into(),
    }
}

/// Resolves the open alerts of `rule` whose key is not in `holding`.
async fn resolve_others(
    tx: &mut dyn AlertRows,
    config: &Config,
    rule: &str,
    holding: &HashSet<(String, String, String)>,
    now: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    for alert in tx.open_alerts_of_rule(rule).await? {
        let k = (
            alert.provider.clone(),
            alert.kind.clone(),
            alert.resource_id.clone(),
        );
        if !holding.contains(&k) {
            let key = key(rule, &alert.provider, &alert.kind, &alert.resource_id);
            resolve(tx, config, &key, now, changes).await?;
        }
    }
    Ok(())
}

/// Resources in a transitional status for longer than its limit
/// (`alerts.stuck.limits[status]`, else `alerts.stuck.after_secs`).
async fn stuck(
    tx: &mut dyn AlertRows,
    config: &Config,
    now: Timestamp,
    now_s: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let rule = &config.alerts.stuck;
    let mut holding = HashSet::new();
    for r in tx.unsettled_resources().await? {
        let (Some(status), Some(since)) = (r.status.as_deref(), r.status_since.as_deref()) else {
            continue;
        };
        if !is_transitional(&r.kind, status) {
            continue;
        }
        let limit = rule.limits.get(status).copied().unwrap_or(rule.after_secs);
        if since >= ago(now, limit).as_str() {
            continue;
        }
        holding.insert((r.provider.clone(), r.kind.clone(), r.id.clone()));
        // An alert about an earlier stay in this status stays as it is.
        if let Some(open) = tx
            .find_alert(&key(STUCK, &r.provider, &r.kind, &r.id))
            .await?
        {
            if open.state == "open" && still_stuck_in(&open.details, &r) {
                continue;
            }
        }
        let alert = NewAlert {
            rule: STUCK.into(),
            severity: rule.severity.clone(),
            provider: r.provider.clone(),
            kind: r.kind.clone(),
            resource_id: r.id.clone(),
            summary: format!(
                "{} {} has been {status} since {since} (limit {limit} s)",
                r.kind, r.id
            ),
            details: json!({
                "status": status,
                "status_since": since,
                "limit_secs": limit,
                "parent_id": r.parent_id,
                "cancel_requested_at": r.cancel_requested_at,
            }),
        };
        raise(tx, config, &alert, now_s, changes).await?;
    }
    resolve_others(tx, config, STUCK, &holding, now_s, changes).await
}

/// Refunds pending for longer than `alerts.refund_overdue.after_secs`, with
/// what is known: the status of the transfer as last fetched, what would
/// complete the refund, and how often it is still looked at. Only what
/// rarely changes goes in: each change is a new version of the alert.
async fn refund_overdue(
    tx: &mut dyn AlertRows,
    config: &Config,
    now: Timestamp,
    now_s: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let rule = &config.alerts.refund_overdue;
    let cutoff = ago(now, rule.after_secs);
    let mut holding = HashSet::new();
    for f in tx.pending_refunds_opened_before(&cutoff).await? {
        holding.insert((f.provider.clone(), f.kind.clone(), f.resource_id.clone()));
        let amount = f
            .amount
            .map(|a| format!(" of {}", money(a, f.currency.as_deref())))
            .unwrap_or_default();
        let awaits = refund_awaits(config, &f.kind);
        let mut summary = format!(
            "refund{amount} for {} {} ({}) pending since {}",
            f.kind, f.resource_id, f.reason, f.opened_at
        );
        if let Some(status) = &f.resource_status {
            summary.push_str(&format!("; still {status} when last fetched"));
        }
        if let Some(awaits) = &awaits {
            summary.push_str(&format!("; completes on {awaits}"));
        }
        let alert = NewAlert {
            rule: REFUND_OVERDUE.into(),
            severity: rule.severity.clone(),
            provider: f.provider.clone(),
            kind: f.kind.clone(),
            resource_id: f.resource_id.clone(),
            summary,
            details: json!({
                "resource_status": f.resource_status,
                "awaiting": awaits,
                "still_fetched": f.next_reconcile_at.is_some(),
                "fetched_at_most_every_secs": config.reconcile.max_interval_secs,
                "refund_status": f.status,
                "reason": f.reason,
                "amount": f.amount,
                "currency": f.currency.as_deref().unwrap_or(UNKNOWN_CURRENCY),
                "opened_at": f.opened_at,
                "parent_id": f.parent_id,
                "limit_secs": rule.after_secs,
            }),
        };
        raise(tx, config, &alert, now_s, changes).await?;
    }
    resolve_others(tx, config, REFUND_OVERDUE, &holding, now_s, changes).await
}

/// More than `threshold` refused deliveries per provider in the last
/// `window_secs`. An open alert is left as first raised while the burst lasts.
async fn verification_failures(
    tx: &mut dyn AlertRows,
    config: &Config,
    now: Timestamp,
    now_s: &str,
    changes: &mut Changes,
) -> Result<(), StoreError> {
    let rule = &config.alerts.verification_failures;
    let mut per_provider: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for (provider, reason, count) in tx.refusals_since(&ago(now, rule.window_secs)).await? {
        per_provider
            .entry(provider)
            .or_default()
            .insert(reason, count);
    }
    let mut holding = HashSet::new();
    for (provider, reasons) in &per_provider {
        let total: i64 = reasons.values().sum();
        if total <= rule.threshold.min(i64::MAX as u64) as i64 {
            continue;
        }
        holding.insert((provider.clone(), WEBHOOK_KIND.to_string(), provider.clone()));
        let k = key(VERIFICATION_FAILURES, provider, WEBHOOK_KIND, provider);
        if tx.find_alert(&k).await?.is_some_and(|a| a.state == "open") {
            continue;
        }
        let alert = NewAlert {
            rule: VERIFICATION_FAILURES.into(),
            severity: rule.severity.clone(),
            provider: provider.clone(),
            kind: WEBHOOK_KIND.into(),
            resource_id: provider.clone(),
            summary: format!(
                "{total} deliveries to /webhooks/{provider} refused in the last {} s (threshold {})",
                rule.window_secs, rule.threshold
            ),
            details: json!({
                "refused": total,
                "by_reason": reasons,
                "window_secs": rule.window_secs,
                "threshold": rule.threshold,
            }),
        };
        raise(tx, config, &alert, now_s, changes).await?;
    }
    resolve_others(tx, config, VERIFICATION_FAILURES, &holding, now_s, changes).await
}
