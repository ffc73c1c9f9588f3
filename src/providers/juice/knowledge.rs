//! What cancelwatch knows of Juice's resources and events.

use std::time::Duration;

use super::event::{self, BULK_TRANSFER, TRANSFER};
use super::objects;
use crate::config::Config;
use crate::providers::knowledge::{EventFacts, KindInfo, Knowledge, PartialRule, Plan};
use crate::providers::{Observation, StatusClass, Target};

/// Juice's entry in the registry.
pub struct Juice;

pub const JUICE: Juice = Juice;

const KINDS: [KindInfo; 2] = [
    KindInfo {
        kind: BULK_TRANSFER,
        title: "Juice bulk transfer",
        cancellable: true,
        statuses: &[
            "created",
            "executing",
            "cancelling",
            "cancelled",
            "completed",
            "expired",
            "failed",
            "partially_completed",
        ],
        transitional: &["created", "executing", "cancelling"],
        settled_otherwise: &["completed", "expired", "failed", "partially_completed"],
        parent_kind: None,
        partial: PartialRule::Items {
            item_kind: TRANSFER,
        },
    },
    KindInfo {
        kind: TRANSFER,
        title: "Juice transfer",
        cancellable: false,
        // `reversed` and `refunded`: the default `juice.reversed_statuses`.
        statuses: &[
            "pending",
            "processing",
            "completed",
            "cancelled",
            "failed",
            "reversed",
            "refunded",
        ],
        transitional: &["pending", "processing"],
        settled_otherwise: &["completed", "failed"],
        parent_kind: Some(BULK_TRANSFER),
        partial: PartialRule::None,
    },
];

impl Knowledge for Juice {
    fn name(&self) -> &'static str {
        super::NAME
    }

    fn kinds(&self) -> &'static [KindInfo] {
        &KINDS
    }

    fn classify(&self, kind: &str, status: &str, reversed: &[String]) -> StatusClass {
        objects::classify(kind, status, reversed)
    }

    fn rank(&self, kind: &str, status: &str, reversed: &[String]) -> Option<u8> {
        objects::rank(kind, status, reversed)
    }

    /// `cancelled`, and the statuses of a cancelled item whose money came
    /// back (`juice.reversed_statuses`).
    fn is_cancelled(&self, config: &Config, status: &str) -> bool {
        matches!(status, "canceled" | "cancelled")
            || config.juice.reversed_statuses.iter().any(|s| s == status)
    }

    /// Every event about a bulk transfer fetches it; a reversal event
    /// (`juice.reversal_events`) also completes its item's refund, and one
    /// that names only the item completes that refund alone.
    fn plan(&self, config: &Config, e: &EventFacts<'_>) -> Plan {
        let reversal = if config
            .juice
            .reversal_events
            .iter()
            .any(|t| t == e.event_type)
        {
            e.body
                .and_then(|b| b.get("data"))
                .and_then(|data| event::transfer_id(e.event_type, data))
                .map(|id| Target {
                    kind: TRANSFER.into(),
                    id,
                    ..Target::default()
                })
        } else {
            None
        };
        match (e.resource_kind, e.resource_id, reversal) {
            (Some(kind), Some(id), reversal) => Plan::Fetch {
                target: Target {
                    kind: kind.to_string(),
                    id: id.to_string(),
                    ..Target::default()
                },
                reversal,
            },
            (_, _, Some(item)) => Plan::Reversal(item),
            _ => Plan::Ignore(format!("event {} names no bulk transfer", e.event_type)),
        }
    }

    /// Juice retries a webhook for up to 48 hours.
    fn retry_window(&self) -> Duration {
        Duration::from_secs(48 * 3_600)
    }

    fn webhook_secrets(&self, config: &Config) -> (&'static str, bool) {
        ("juice.checksum_keys", config.juice_enabled())
    }

    /// Juice documents no reversal signal: the refund of a cancelled item
    /// completes on one configured here, which may never come.
    fn refund_awaits(&self, config: &Config, kind: &str) -> Option<String> {
        (kind == TRANSFER).then(|| {
            format!(
                "an item status in juice.reversed_statuses ({}) or an event in \
                 juice.reversal_events ({}); Juice documents neither, so it may never come",
                config.juice.reversed_statuses.join(", "),
                config.juice.reversal_events.join(", "),
            )
        })
    }

    /// An item answered with both an id and a reference is also known as
    /// `<bulk id>:<reference>`, the key it has in answers without its id.
    fn other_keys(&self, obs: &Observation) -> Vec<String> {
        if obs.kind != TRANSFER {
            return Vec::new();
        }
        let (Some(bulk_id), Ok(item)) = (
            obs.parent_id.as_deref(),
            serde_json::from_str::<serde_json::Value>(&obs.snapshot),
        ) else {
            return Vec::new();
        };
        objects::item_keys(bulk_id, &item)
            .map(|(key, other)| std::iter::once(key).chain(other))
            .into_iter()
            .flatten()
            .filter(|k| *k != obs.id)
            .collect()
    }
}
