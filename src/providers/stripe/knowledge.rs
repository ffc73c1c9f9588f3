//! What cancelwatch knows of Stripe's resources and events.

use std::time::Duration;

use serde_json::Value;

use super::event::{
    kind_of, BATCH_JOB, EVENT_GENERATION_FAILURE_RESOLVED, EVENT_LOOKUP, OUTBOUND_TRANSFER,
};
use super::objects;
use crate::config::{Config, StripeConfig};
use crate::providers::knowledge::{EventFacts, KindInfo, Knowledge, PartialRule, Plan, Watch};
use crate::providers::{StatusClass, Target};

/// An event Stripe failed to generate is looked up through the event that
/// says so ([`super::event::impacted`]); the object it was about is fetched.
fn lost_event_plan(event: &EventFacts<'_>) -> Plan {
    let Some(id) = event.event_id else {
        return Plan::Ignore("the event has no id to look it up by".into());
    };
    // An event that names no object keeps its account context in its body only.
    let context = event.context.or_else(|| {
        event
            .body
            .and_then(|b| b.get("context"))
            .and_then(Value::as_str)
    });
    Plan::Fetch {
        target: Target {
            kind: EVENT_LOOKUP.into(),
            id: id.to_string(),
            context: context.map(str::to_string),
            trigger_event: Some(id.to_string()),
            ..Target::default()
        },
        reversal: None,
    }
}

/// Stripe's entry in the registry.
pub struct Stripe;

pub const STRIPE: Stripe = Stripe;

const KINDS: [KindInfo; 2] = [
    KindInfo {
        kind: OUTBOUND_TRANSFER,
        title: "Stripe outbound transfer",
        cancellable: true,
        statuses: &["processing", "posted", "canceled", "failed", "returned"],
        transitional: &["processing"],
        settled_otherwise: &["posted", "failed", "returned"],
        parent_kind: None,
        partial: PartialRule::None,
    },
    KindInfo {
        kind: BATCH_JOB,
        title: "Stripe batch job",
        cancellable: true,
        statuses: &[
            "ready_for_upload",
            "validating",
            "in_progress",
            "cancelling",
            "canceled",
            "complete",
            "batch_failed",
            "timeout",
            "upload_timeout",
            "validation_failed",
        ],
        transitional: &[
            "ready_for_upload",
            "validating",
            "in_progress",
            "cancelling",
        ],
        settled_otherwise: &[
            "complete",
            "batch_failed",
            "timeout",
            "upload_timeout",
            "validation_failed",
        ],
        parent_kind: None,
        partial: PartialRule::Progress,
    },
];

/// Event types followed whatever the configuration says.
const FOLLOWED_PREFIXES: [&str; 2] = [
    "v2.money_management.outbound_transfer.",
    "v2.core.batch_job.",
];

/// True for an event type whose object is fetched: outbound transfer and
/// batch job events, and those `stripe.follow_event_types` names.
pub fn follows(config: &StripeConfig, event_type: &str) -> bool {
    FOLLOWED_PREFIXES.iter().any(|p| event_type.starts_with(p))
        || config.follow_event_types.iter().any(|t| t == event_type)
}

impl Knowledge for Stripe {
    fn name(&self) -> &'static str {
        super::NAME
    }

    fn kinds(&self) -> &'static [KindInfo] {
        &KINDS
    }

    fn classify(&self, kind: &str, status: &str, _reversed: &[String]) -> StatusClass {
        objects::classify(kind, status)
    }

    fn rank(&self, kind: &str, status: &str, _reversed: &[String]) -> Option<u8> {
        objects::rank(kind, status)
    }

    fn is_cancelled(&self, _config: &Config, status: &str) -> bool {
        status == "canceled"
    }

    /// Outbound transfer and batch job events are followed, and those
    /// `stripe.follow_event_types` names; the fetch goes to the related
    /// object, by the URL the event gives when it gives one. An object in
    /// the singleton form `{type, url}` has no id: its URL names it.
    fn plan(&self, config: &Config, event: &EventFacts<'_>) -> Plan {
        if event.event_type == EVENT_GENERATION_FAILURE_RESOLVED {
            return lost_event_plan(event);
        }
        if !follows(&config.stripe, event.event_type) {
            return Plan::Ignore(format!("event type {} is not followed", event.event_type));
        }
        let related = event.body.and_then(|b| b.get("related_object"));
        let url = related
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let object_type = related.and_then(|r| r.get("type")).and_then(Value::as_str);
        let (kind, id) = match (event.resource_kind, event.resource_id, object_type, &url) {
            (Some(kind), Some(id), _, _) => (kind.to_string(), id.to_string()),
            (_, None, Some(object_type), Some(url)) => (kind_of(object_type), url.clone()),
            _ => return Plan::Ignore("the event names no related object".into()),
        };
        Plan::Fetch {
            target: Target {
                kind,
                id,
                context: event.context.map(str::to_string),
                url,
                trigger_event: event.event_id.map(str::to_string),
                trigger_created: event
                    .body
                    .and_then(|b| b.get("created"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
            },
            reversal: None,
        }
    }

    /// Stripe retries a webhook for up to three days.
    fn retry_window(&self) -> Duration {
        Duration::from_secs(3 * 86_400)
    }

    /// A posted outbound transfer may still come back `returned`, days
    /// later, and that webhook can be lost: it is fetched again every
    /// `stripe.return_watch_interval_secs` for `stripe.return_watch_days`.
    fn watch_after_settle(&self, config: &Config, kind: &str, status: &str) -> Option<Watch> {
        let stripe = &config.stripe;
        (kind == OUTBOUND_TRANSFER && status == "posted" && stripe.return_watch_days > 0).then(
            || Watch {
                window: Duration::from_secs(stripe.return_watch_days.saturating_mul(86_400)),
                every: Duration::from_secs(stripe.return_watch_interval_secs),
            },
        )
    }

    fn webhook_secrets(&self, config: &Config) -> (&'static str, bool) {
        ("stripe.webhook_secrets", config.stripe_enabled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn singleton(event_type: &str) -> (Value, String) {
        let body = json!({"id": "evt_1", "type": event_type, "created": "2026-10-30T12:00:00Z",
                          "related_object": {"type": "v2.core.workspace", "url": "/v2/core/workspace"}});
        (body, event_type.to_string())
    }

    fn facts<'a>(body: &'a Value, event_type: &'a str) -> EventFacts<'a> {
        EventFacts {
            event_type,
            event_id: Some("evt_1"),
            resource_kind: None,
            resource_id: None,
            context: Some("acct_1"),
            body: Some(body),
        }
    }

    #[test]
    fn a_singleton_is_fetched_by_its_url_when_followed() {
        let (body, event_type) = singleton("v2.core.workspace.updated");
        let mut config = Config::default();
        assert_eq!(
            STRIPE.plan(&config, &facts(&body, &event_type)),
            Plan::Ignore("event type v2.core.workspace.updated is not followed".into())
        );
        config.stripe.follow_event_types.push(event_type.clone());
        let Plan::Fetch { target, .. } = STRIPE.plan(&config, &facts(&body, &event_type)) else {
            panic!("a followed singleton is fetched");
        };
        assert_eq!(target.kind, "stripe.workspace");
        assert_eq!(target.id, "/v2/core/workspace");
        assert_eq!(target.url.as_deref(), Some("/v2/core/workspace"));
        assert_eq!(target.context.as_deref(), Some("acct_1"));
        assert_eq!(
            target.trigger_created.as_deref(),
            Some("2026-10-30T12:00:00Z")
        );
    }
}
