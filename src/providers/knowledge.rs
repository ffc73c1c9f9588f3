//! What cancelwatch knows of each provider, whether or not it is configured:
//! its kinds of resource and what their statuses mean, which of its events
//! are followed and what they ask for, how long it retries a delivery. The
//! generic code (pipeline, store, alert rules, jobs) asks here and never
//! names a provider.

use std::time::Duration;

use serde_json::Value;

use super::{juice, stripe, StatusClass, Target};
use crate::config::Config;

/// Every known provider. Adding a provider adds its entry here.
const ALL: [&dyn Knowledge; 2] = [&stripe::knowledge::STRIPE, &juice::knowledge::JUICE];

/// One kind of resource and what its statuses mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    /// `provider.kind`, as stored (`stripe.outbound_transfer`).
    pub kind: &'static str,
    /// How alerts name it (`Juice bulk transfer`).
    pub title: &'static str,
    /// True when `cancel` may be asked for it.
    pub cancellable: bool,
    /// Every status the provider documents for it (filters accept these).
    pub statuses: &'static [&'static str],
    /// Statuses in which it is still on its way somewhere (`stuck` watches them).
    pub transitional: &'static [&'static str],
    /// Statuses in which it settled some other way than cancelled: once
    /// there, a cancel can no longer take effect.
    pub settled_otherwise: &'static [&'static str],
    /// For an item whose state comes with its parent's answer: the
    /// parent's kind, fetched to see the item again.
    pub parent_kind: Option<&'static str>,
    /// How a cancel that took effect only in part shows.
    pub partial: PartialRule,
}

/// How a partial cancellation of a kind shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartialRule {
    /// It cannot be cancelled in part.
    None,
    /// Some of its items (of `item_kind`) ended otherwise than cancelled, or
    /// the cancel call answered `partial_cancellation`.
    Items { item_kind: &'static str },
    /// It was cancelled after some of its records were already applied or
    /// failed (its progress counts).
    Progress,
}

/// What a stored delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to fetch: the delivery is marked `ignored`.
    Ignore(String),
    /// Fetch this resource; with `reversal`, also complete that item's refund.
    Fetch {
        target: Target,
        reversal: Option<Target>,
    },
    /// A reversal event naming only an item: complete its refund.
    Reversal(Target),
}

/// How a resource at rest is still watched, because its provider may move
/// it again and the delivery that says so may be lost: fetched every
/// `every` until `window` has passed since it came to rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    pub window: Duration,
    pub every: Duration,
}

/// A stored delivery, as much of it as [`Knowledge::plan`] reads.
#[derive(Debug, Clone, Copy)]
pub struct EventFacts<'a> {
    pub event_type: &'a str,
    pub event_id: Option<&'a str>,
    pub resource_kind: Option<&'a str>,
    pub resource_id: Option<&'a str>,
    pub context: Option<&'a str>,
    pub body: Option<&'a Value>,
}

/// One provider's knowledge.
pub trait Knowledge: Send + Sync {
    /// `stripe`, `juice`: the `provider` column and the `/webhooks/` segment.
    fn name(&self) -> &'static str;
    fn kinds(&self) -> &'static [KindInfo];
    /// How settled a status is. `reversed` are the statuses configured to
    /// mean that an item's money came back.
    fn classify(&self, kind: &str, status: &str, reversed: &[String]) -> StatusClass;
    /// Where a status stands in its kind's order (higher is later).
    fn rank(&self, kind: &str, status: &str, reversed: &[String]) -> Option<u8>;
    /// True for a status that means a cancel took effect.
    fn is_cancelled(&self, config: &Config, status: &str) -> bool;
    /// What a stored delivery of this provider asks for (pure).
    fn plan(&self, config: &Config, event: &EventFacts<'_>) -> Plan;
    /// How long the provider retries a delivery: its dedupe key outlives that.
    fn retry_window(&self) -> Duration;
    /// How a resource settled in `status` is still watched, when the
    /// provider may move it on from there (none by default).
    fn watch_after_settle(&self, config: &Config, kind: &str, status: &str) -> Option<Watch> {
        let _ = (config, kind, status);
        None
    }
    /// The configuration key of its webhook secrets, and whether it holds any.
    fn webhook_secrets(&self, config: &Config) -> (&'static str, bool);
    /// Other ids under which the resource `obs` is known or was recorded
    /// before (a Juice item: by its id and by its reference), so that it
    /// stays one resource whichever of them an answer carries.
    fn other_keys(&self, obs: &super::Observation) -> Vec<String> {
        let _ = obs;
        Vec::new()
    }
    /// What completes a pending refund of `kind`, for people, when the
    /// provider leaves it open for a while (`None`: nothing to say).
    fn refund_awaits(&self, config: &Config, kind: &str) -> Option<String> {
        let _ = (config, kind);
        None
    }
}

/// Every known provider.
pub fn all() -> &'static [&'static dyn Knowledge] {
    &ALL
}

/// The known provider named `name`.
pub fn of_provider(name: &str) -> Option<&'static dyn Knowledge> {
    ALL.iter().copied().find(|k| k.name() == name)
}

/// The provider a kind (`provider.kind`) belongs to.
pub fn of_kind(kind: &str) -> Option<&'static dyn Knowledge> {
    of_provider(kind.split('.').next().unwrap_or(kind))
}

/// What is known of a kind.
pub fn kind_info(kind: &str) -> Option<&'static KindInfo> {
    of_kind(kind)?.kinds().iter().find(|k| k.kind == kind)
}

/// The names of the known providers.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|k| k.name()).collect()
}

/// Every kind the known providers document.
pub fn kinds() -> Vec<&'static str> {
    ALL.iter().flat_map(|k| k.kinds()).map(|k| k.kind).collect()
}

/// Every status the known providers document, of any kind, each once.
pub fn statuses() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = ALL
        .iter()
        .flat_map(|k| k.kinds())
        .flat_map(|k| k.statuses.iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The label a status of `kind` is counted under in metrics: the status
/// itself when its provider documents it, else `other`. A provider that
/// starts sending new statuses must not create series without bound.
pub fn status_label(kind: &str, status: &str) -> &'static str {
    let documented = match kind_info(kind) {
        Some(info) => info.statuses.iter().copied().find(|s| *s == status),
        None => statuses().into_iter().find(|s| *s == status),
    };
    documented.unwrap_or(OTHER_STATUS)
}

/// The label of a status no provider documents ([`status_label`]).
pub const OTHER_STATUS: &str = "other";

/// The kinds `cancel` accepts.
pub fn cancellable_kinds() -> Vec<&'static str> {
    ALL.iter()
        .flat_map(|k| k.kinds())
        .filter(|k| k.cancellable)
        .map(|k| k.kind)
        .collect()
}

/// True for a status in which a resource of `kind` is still on its way
/// somewhere. A kind no provider knows (followed through configuration)
/// counts every known transitional status.
pub fn is_transitional(kind: &str, status: &str) -> bool {
    match kind_info(kind) {
        Some(info) => info.transitional.contains(&status),
        None => ALL
            .iter()
            .flat_map(|k| k.kinds())
            .any(|k| k.transitional.contains(&status)),
    }
}

/// Statuses in which a resource of `kind` has settled some other way than
/// cancelled; a terminal status that is not transitional counts too.
pub fn is_settled_otherwise(kind: &str, status: &str, terminal: bool) -> bool {
    let settled = kind_info(kind).map_or(&[][..], |k| k.settled_otherwise);
    settled.contains(&status) || (terminal && !is_transitional(kind, status))
}

/// True for a status of `kind` that means a cancel took effect.
pub fn is_cancelled(config: &Config, kind: &str, status: &str) -> bool {
    match of_kind(kind) {
        Some(k) => k.is_cancelled(config, status),
        None => matches!(status, "canceled" | "cancelled"),
    }
}

/// How settled a status is; a kind no provider knows is settled on arrival.
pub fn classify(kind: &str, status: &str, reversed: &[String]) -> StatusClass {
    of_kind(kind).map_or(StatusClass::Settled, |k| k.classify(kind, status, reversed))
}

/// Where a status stands in its kind's order, when the kind has one.
pub fn rank(kind: &str, status: &str, reversed: &[String]) -> Option<u8> {
    of_kind(kind)?.rank(kind, status, reversed)
}

/// What completes a pending refund of `kind` (see [`Knowledge::refund_awaits`]).
pub fn refund_awaits(config: &Config, kind: &str) -> Option<String> {
    of_kind(kind)?.refund_awaits(config, kind)
}

/// Other ids of the resource `obs` (see [`Knowledge::other_keys`]).
pub fn other_keys(obs: &super::Observation) -> Vec<String> {
    of_provider(obs.provider).map_or_else(Vec::new, |k| k.other_keys(obs))
}

/// How a resource of `kind` settled in `status` is still watched, if at all.
pub fn watch_after_settle(config: &Config, kind: &str, status: &str) -> Option<Watch> {
    of_kind(kind)?.watch_after_settle(config, kind, status)
}

/// What a stored delivery asks for.
pub fn plan(config: &Config, provider: &str, event: &EventFacts<'_>) -> Plan {
    match of_provider(provider) {
        Some(k) => k.plan(config, event),
        None => Plan::Ignore(format!("unknown provider {provider}")),
    }
}

/// What to fetch to see a resource again: itself, or the parent whose
/// answer carries it.
pub fn reconcile_target(
    kind: &str,
    id: &str,
    parent_id: Option<&str>,
    context: Option<&str>,
) -> Option<Target> {
    match kind_info(kind).and_then(|k| k.parent_kind) {
        Some(parent_kind) => parent_id.map(|parent| Target {
            kind: parent_kind.into(),
            id: parent.into(),
            ..Target::default()
        }),
        None => Some(Target {
            kind: kind.into(),
            id: id.into(),
            context: context.map(str::to_string),
            ..Target::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitional_statuses_per_kind() {
        assert!(is_transitional("stripe.outbound_transfer", "processing"));
        assert!(!is_transitional("stripe.outbound_transfer", "posted"));
        assert!(is_transitional("stripe.batch_job", "cancelling"));
        assert!(!is_transitional("stripe.batch_job", "canceled"));
        assert!(is_transitional("juice.bulk_transfer", "executing"));
        assert!(!is_transitional("juice.bulk_transfer", "cancelled"));
        assert!(is_transitional("juice.transfer", "pending"));
        assert!(is_transitional("other.kind", "pending"));
    }

    #[test]
    fn status_labels_are_documented_statuses_or_other() {
        assert_eq!(
            status_label("stripe.outbound_transfer", "processing"),
            "processing"
        );
        assert_eq!(
            status_label("stripe.outbound_transfer", "teleported"),
            "other"
        );
        // A status documented for another kind only is `other` here too.
        assert_eq!(
            status_label("stripe.outbound_transfer", "executing"),
            "other"
        );
        assert_eq!(
            status_label("juice.bulk_transfer", "executing"),
            "executing"
        );
    }

    #[test]
    fn settled_otherwise() {
        assert!(is_settled_otherwise(
            "stripe.outbound_transfer",
            "posted",
            false
        ));
        assert!(!is_settled_otherwise(
            "stripe.outbound_transfer",
            "processing",
            false
        ));
        assert!(is_settled_otherwise(
            "juice.bulk_transfer",
            "completed",
            true
        ));
        assert!(!is_settled_otherwise(
            "juice.bulk_transfer",
            "executing",
            false
        ));
        assert!(is_settled_otherwise("other.kind", "done", true));
    }

    #[test]
    fn cancellable_kinds_are_the_three_cancels() {
        assert_eq!(
            cancellable_kinds(),
            [
                "stripe.outbound_transfer",
                "stripe.batch_job",
                "juice.bulk_transfer"
            ]
        );
    }

    #[test]
    fn an_item_is_seen_again_through_its_parent() {
        let t = reconcile_target("juice.transfer", "it_1", Some("b1"), None).unwrap();
        assert_eq!(
            (t.kind.as_str(), t.id.as_str()),
            ("juice.bulk_transfer", "b1")
        );
        assert!(reconcile_target("juice.transfer", "it_1", None, None).is_none());
        let t = reconcile_target("stripe.batch_job", "bj_1", None, Some("acct_1")).unwrap();
        assert_eq!(t.context.as_deref(), Some("acct_1"));
    }
}
