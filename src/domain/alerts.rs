//! The alert rules' decisions, made on rows already read: which rule holds
//! for a resource, what its alert says, where it goes. Storage engines read
//! the rows, call these, and write what they return, so every engine raises
//! the same alerts.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::config::Config;
use crate::providers::knowledge::{self, is_cancelled, is_settled_otherwise, is_transitional};
use crate::store::model::{Alert, AlertKey, CancelRequest, NewAlert, ProgressRow, Resource};

/// Rule names, as stored in `alerts.rule` and sent as `type`.
pub const PARTIAL_CANCELLATION: &str = "partial_cancellation";
pub const CANCEL_NOT_EFFECTIVE: &str = "cancel_not_effective";
pub const STUCK: &str = "stuck";
pub const REFUND_OVERDUE: &str = "refund_overdue";
pub const DEAD_LETTER: &str = "dead_letter";
pub const VERIFICATION_FAILURES: &str = "verification_failures";

/// Most not-cancelled items listed one by one in a partial-cancellation alert.
const MAX_LISTED_ITEMS: usize = 100;

/// Rank of a severity: info < warning < critical (unknown ranks lowest).
pub fn severity_rank(severity: &str) -> u8 {
    match severity {
        "critical" => 2,
        "warning" => 1,
        _ => 0,
    }
}

/// Names of the sinks an alert of `rule` at `severity` goes to: those whose
/// `rules` list is empty or names the rule, and whose `min_severity` it meets.
pub fn route(config: &Config, rule: &str, severity: &str) -> Vec<String> {
    config
        .alerts
        .sinks
        .iter()
        .enumerate()
        .filter(|(_, s)| s.rules.is_empty() || s.rules.iter().any(|r| r == rule))
        .filter(|(_, s)| severity_rank(severity) >= severity_rank(&s.min_severity))
        .map(|(i, _)| config.sink_name(i))
        .collect()
}

/// An alert raised (a new version) or resolved inside a transaction, noted
/// in the transaction's [`Changes`] for whoever commits it to [`report`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub id: String,
    pub rule: String,
    pub version: i64,
    pub resource_id: String,
    /// Resolved, rather than raised.
    pub resolved: bool,
}

impl Changed {
    pub fn of(a: &Alert, resolved: bool) -> Changed {
        Changed {
            id: a.id.clone(),
            rule: a.rule.clone(),
            version: a.version,
            resource_id: a.resource_id.clone(),
            resolved,
        }
    }
}

/// The alerts one transaction raised or resolved so far.
pub type Changes = Vec<Changed>;

pub fn alert_key(rule: &str, r: &Resource) -> AlertKey {
    AlertKey {
        rule: rule.into(),
        provider: r.provider.clone(),
        kind: r.kind.clone(),
        resource_id: r.id.clone(),
    }
}

pub fn new_alert(
    rule: &str,
    severity: &str,
    r: &Resource,
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

/// How alerts name the currency of an amount whose provider gave none.
pub const UNKNOWN_CURRENCY: &str = "unknown";

/// An amount with its currency, for people: `1000 NGN`, `1000 (currency unknown)`.
pub fn money(amount: i64, currency: Option<&str>) -> String {
    match currency {
        Some(c) if c != UNKNOWN_CURRENCY => format!("{amount} {c}"),
        _ => format!("{amount} (currency {UNKNOWN_CURRENCY})"),
    }
}

/// Count of a group of items, and their amounts per currency: amounts of
/// different currencies are never added together.
#[derive(Default)]
struct Tally {
    count: i64,
    /// Currency (or [`UNKNOWN_CURRENCY`]) → the sum of its amounts.
    amounts: BTreeMap<String, i64>,
    /// Items whose amount is not known.
    without_amount: i64,
}

impl Tally {
    fn add(&mut self, amount: Option<i64>, currency: Option<&str>) {
        self.count += 1;
        match amount {
            Some(a) => {
                let currency = currency.unwrap_or(UNKNOWN_CURRENCY).to_string();
                *self.amounts.entry(currency).or_default() += a;
            }
            None => self.without_amount += 1,
        }
    }

    fn json(&self) -> Value {
        let mut v = json!({"count": self.count, "amounts": self.amounts});
        if self.without_amount > 0 {
            v["without_amount"] = json!(self.without_amount);
        }
        v
    }

    /// `1000 NGN + 500 USD`, or `no amount`.
    fn text(&self) -> String {
        let mut parts: Vec<String> = self
            .amounts
            .iter()
            .map(|(c, a)| money(*a, Some(c)))
            .collect();
        if self.without_amount > 0 {
            parts.push(format!("{} without an amount", self.without_amount));
        }
        if parts.is_empty() {
            "no amount".into()
        } else {
            parts.join(" + ")
        }
    }
}

/// A resource with items ([`knowledge::PartialRule::Items`]): the cancel call answered
/// `partial_cancellation`, or the resource is cancelled while some of its
/// items ended otherwise, or while its counters (`counters`: the success and
/// failure counts of its latest observation) show transfers that went
/// through or failed, whatever its items say (they may be missing,
/// paginated or unkeyed).
pub fn partial_by_items(
    config: &Config,
    bulk: &Resource,
    answer: Option<&CancelRequest>,
    items: &[Resource],
    counters: Option<&ProgressRow>,
) -> Option<(String, Value)> {
    let bulk_cancelled = bulk
        .status
        .as_deref()
        .is_some_and(|s| is_cancelled(config, &bulk.kind, s));
    let seen = ItemsSeen::of(config, items);
    let (success, failure) = counters.map_or((0, 0), |c| {
        (c.success_count.unwrap_or(0), c.failure_count.unwrap_or(0))
    });
    let by_counters = bulk_cancelled && (success > 0 || failure > 0);
    if answer.is_none() && !(bulk_cancelled && seen.not_cancelled.count > 0) && !by_counters {
        return None;
    }
    let title = title_of(&bulk.kind);
    let mut summary = if items.is_empty() && !by_counters {
        format!(
            "{title} {} was cancelled only in part (the cancel answered partial_cancellation)",
            bulk.id
        )
    } else {
        format!("{title} {} was cancelled only in part", bulk.id)
    };
    if by_counters {
        summary.push_str(&format!(
            ": its counters show {success} transfers succeeded and {failure} failed"
        ));
    }
    if !items.is_empty() {
        summary.push_str(if by_counters { "; " } else { ": " });
        summary.push_str(&seen.summary(config, items));
    }
    let mut details = seen.details(items);
    details["bulk_status"] = json!(bulk.status);
    details["cancel_request"] = json!(answer.map(|a| json!({
        "id": a.id,
        "requested_at": a.requested_at,
        "http_status": a.http_status,
        "outcome": a.outcome,
        "error_code": a.error_code,
    })));
    details["currencies"] = json!(seen.currencies());
    details["successful_transfer_count"] = json!(counters.and_then(|c| c.success_count));
    details["failed_transfer_count"] = json!(counters.and_then(|c| c.failure_count));
    details["counts_observed_at"] = json!(counters.map(|c| &c.observed_at));
    Some((summary, details))
}

/// What the items of a resource show: how many (and how much) were
/// cancelled and not, by status, and the first not cancelled.
struct ItemsSeen {
    cancelled: Tally,
    not_cancelled: Tally,
    by_status: BTreeMap<String, Tally>,
    listed: Vec<Value>,
}

impl ItemsSeen {
    fn of(config: &Config, items: &[Resource]) -> ItemsSeen {
        let mut seen = ItemsSeen {
            cancelled: Tally::default(),
            not_cancelled: Tally::default(),
            by_status: BTreeMap::new(),
            listed: Vec::new(),
        };
        for item in items {
            let status = item.status.clone().unwrap_or_else(|| "unknown".into());
            let currency = item.currency.as_deref();
            seen.by_status
                .entry(status.clone())
                .or_default()
                .add(item.amount, currency);
            if is_cancelled(config, &item.kind, &status) {
                seen.cancelled.add(item.amount, currency);
            } else {
                seen.not_cancelled.add(item.amount, currency);
                if seen.listed.len() < MAX_LISTED_ITEMS {
                    seen.listed.push(json!({
                        "id": item.id,
                        "status": status,
                        "amount": item.amount,
                        "currency": currency.unwrap_or(UNKNOWN_CURRENCY),
                    }));
                }
            }
        }
        seen
    }

    /// `2 of 4 items cancelled (1000 NGN + 500 USD), 2 not cancelled (…;
    /// processing: 1, …)`.
    fn summary(&self, config: &Config, items: &[Resource]) -> String {
        let others: Vec<String> = self
            .by_status
            .iter()
            .filter(|(s, _)| !items.iter().any(|i| is_cancelled(config, &i.kind, s)))
            .map(|(s, t)| format!("{s}: {}", t.count))
            .collect();
        format!(
            "{} of {} items cancelled ({}), {} not cancelled ({}; {})",
            self.cancelled.count,
            items.len(),
            self.cancelled.text(),
            self.not_cancelled.count,
            self.not_cancelled.text(),
            others.join(", "),
        )
    }

    /// Every currency the items are in ([`UNKNOWN_CURRENCY`] for those with none).
    fn currencies(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self
            .by_status
            .values()
            .flat_map(|t| t.amounts.keys().map(String::as_str))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    fn details(&self, items: &[Resource]) -> Value {
        json!({
            "items_total": items.len(),
            "cancelled": self.cancelled.json(),
            "not_cancelled": self.not_cancelled.json(),
            "by_status": self.by_status.iter().map(|(s, t)| (s.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
            "not_cancelled_items": self.listed,
        })
    }
}

/// A resource whose progress is counted ([`knowledge::PartialRule::Progress`]):
/// cancelled with records already applied or failed.
pub fn partial_by_progress(
    config: &Config,
    job: &Resource,
    progress: Option<&ProgressRow>,
) -> Option<(String, Value)> {
    if !job
        .status
        .as_deref()
        .is_some_and(|s| is_cancelled(config, &job.kind, s))
    {
        return None;
    }
    let progress = progress?;
    let success = progress.success_count.unwrap_or(0);
    let failure = progress.failure_count.unwrap_or(0);
    if success == 0 && failure == 0 {
        return None;
    }
    let summary = format!(
        "{} {} was canceled after {success} records succeeded and {failure} failed",
        title_of(&job.kind),
        job.id
    );
    let details = json!({
        "status": job.status,
        "success_count": success,
        "failure_count": failure,
        "validated_count": progress.validated_count,
        "counts_observed_at": progress.observed_at,
    });
    Some((summary, details))
}

/// Detail fields that only say when something was last seen: a change in
/// them alone is no news, so it makes no new version (and pages no one).
const VOLATILE_DETAILS: [&str; 1] = ["counts_observed_at"];

/// True when `new` says what the stored alert already says: the same
/// severity, summary and details, timestamps of observation aside. An open
/// alert raised again with the same message is not sent again.
pub fn says_the_same(old: &Alert, new: &NewAlert) -> bool {
    let stable = |details: &Value| {
        let mut details = details.clone();
        if let Some(map) = details.as_object_mut() {
            for key in VOLATILE_DETAILS {
                map.remove(key);
            }
        }
        details
    };
    let old_details = serde_json::from_str::<Value>(&old.details).ok();
    old.severity == new.severity
        && old.summary == new.summary
        && old_details.map(|d| stable(&d)) == Some(stable(&new.details))
}

/// How alerts name a kind (`Juice bulk transfer`); the kind itself when
/// no provider knows it.
fn title_of(kind: &str) -> &str {
    knowledge::kind_info(kind).map_or(kind, |k| k.title)
}

/// A cancel went out through cancelwatch, yet the resource settled otherwise.
pub fn not_effective(r: &Resource) -> Option<(String, Value)> {
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

/// True while the resource is still in the status a `stuck` alert names.
pub fn still_stuck_in(details: &str, r: &Resource) -> bool {
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

/// What a `dead_letter` alert is about: the delivery's resource when
/// known, else `("delivery", dedupe key)`.
pub fn dead_letter_subject(
    kind: Option<&str>,
    resource_id: Option<&str>,
    dedupe_key: &str,
) -> (String, String) {
    match (kind, resource_id) {
        (Some(kind), Some(id)) => (kind.to_string(), id.to_string()),
        _ => ("delivery".to_string(), dedupe_key.to_string()),
    }
}

/// The `(provider, kind, id)` under which webhook-wide alerts are raised.
pub const WEBHOOK_KIND: &str = "webhook";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SinkConfig;

    fn sink(name: &str, rules: &[&str], min: &str) -> SinkConfig {
        SinkConfig {
            name: name.into(),
            kind: "log".into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
            min_severity: min.into(),
            ..SinkConfig::default()
        }
    }

    #[test]
    fn routing_by_rule_and_severity() {
        let mut config = Config::default();
        config.alerts.sinks = vec![
            sink("all", &[], "info"),
            sink("partial-only", &[PARTIAL_CANCELLATION], "info"),
            sink("critical", &[], "critical"),
            SinkConfig {
                kind: "log".into(),
                min_severity: "warning".into(),
                ..SinkConfig::default()
            },
        ];
        assert_eq!(
            route(&config, PARTIAL_CANCELLATION, "critical"),
            vec!["all", "partial-only", "critical", "log-3"]
        );
        assert_eq!(route(&config, STUCK, "warning"), vec!["all", "log-3"]);
        assert_eq!(route(&config, STUCK, "info"), vec!["all"]);
        config.alerts.sinks.clear();
        assert!(route(&config, STUCK, "critical").is_empty());
    }

    #[test]
    fn amounts_of_different_currencies_are_never_added() {
        let mut t = Tally::default();
        t.add(Some(1_000), Some("NGN"));
        t.add(Some(500), Some("USD"));
        t.add(Some(250), Some("NGN"));
        t.add(Some(70), None);
        t.add(None, Some("NGN"));
        assert_eq!(
            t.json(),
            json!({"count": 5, "amounts": {"NGN": 1_250, "USD": 500, "unknown": 70},
                   "without_amount": 1})
        );
        assert_eq!(
            t.text(),
            "1250 NGN + 500 USD + 70 (currency unknown) + 1 without an amount"
        );
        assert_eq!(Tally::default().text(), "no amount");
    }

    #[test]
    fn severity_order() {
        assert!(severity_rank("critical") > severity_rank("warning"));
        assert!(severity_rank("warning") > severity_rank("info"));
    }

    #[test]
    fn payload_has_the_contract_fields() {
        let alert = Alert {
            id: "alrt_1".into(),
            rule: STUCK.into(),
            severity: "warning".into(),
            provider: "stripe".into(),
            kind: "stripe.outbound_transfer".into(),
            resource_id: "obt_1".into(),
            summary: "stuck".into(),
            details: r#"{"status":"processing"}"#.into(),
            state: "open".into(),
            version: 2,
            created_at: "2026-10-30T12:00:00.000Z".into(),
            updated_at: "2026-10-30T12:05:00.000Z".into(),
            resolved_at: None,
        };
        let p = alert.payload();
        assert_eq!(p["id"], "alrt_1");
        assert_eq!(p["type"], "stuck");
        assert_eq!(p["severity"], "warning");
        assert_eq!(
            p["resource"],
            serde_json::json!({"provider": "stripe", "kind": "stripe.outbound_transfer", "id": "obt_1"})
        );
        assert_eq!(p["summary"], "stuck");
        assert_eq!(p["details"]["status"], "processing");
        assert_eq!(p["created_at"], "2026-10-30T12:00:00.000Z");
        assert_eq!(p["updated_at"], "2026-10-30T12:05:00.000Z");
        assert_eq!(p["state"], "open");
        assert_eq!(p["version"], 2);
    }
}
