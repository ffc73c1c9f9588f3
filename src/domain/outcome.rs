//! What deciding a delivery came to, and what writing it did: the values
//! that pass from the deciding tasks to the recorder and the store.

use std::time::Duration;

use super::observe::{Moved, Trigger};
use crate::config::Config;
use crate::providers::http::backoff;
use crate::providers::{Observation, Target};
use crate::store::model::Delivery;

/// The trigger recorded for a delivery's observations.
pub fn trigger_of(d: &Delivery) -> Trigger {
    let id = d.event_id.clone().unwrap_or_else(|| d.dedupe_key.clone());
    if d.source == "backfill" {
        Trigger::backfill(id)
    } else {
        Trigger::event(id)
    }
}

/// What deciding a delivery learned, for the recorder to write.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to fetch: the delivery ends `ignored`.
    Ignore(String),
    /// The resource as the provider has it now; with `reversal`, also
    /// complete that transfer's refund.
    Observed {
        obs: Box<Observation>,
        context: Option<String>,
        reversal: Option<Target>,
    },
    /// A reversal event naming only a transfer: complete its refund.
    Reversal(Target),
    /// What the delivery names can never be fetched (an id that forms no
    /// valid API path): the delivery is dead at once, since every attempt
    /// would fail the same way.
    Unusable(String),
    /// The provider says the resource does not exist: the delivery is dead.
    NotFound { target: Target, detail: String },
    /// The attempt failed: retried with backoff (at least `retry_after`),
    /// or `dead` after the last attempt.
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Our credentials were refused or are missing: the attempt is given
    /// back uncounted, and the delivery waits for a working key.
    Released(String),
    /// The provider rate-limits us (429): the attempt is given back
    /// uncounted, and the delivery waits what the provider asked for (or
    /// else the backoff its next attempt would have had). A rate limit that
    /// lasts (Juice allows 120 reads a minute) must not turn deliveries
    /// into dead letters.
    RateLimited {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// What writing an outcome did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Ignored(String),
    Processed {
        status: String,
        transitions: Vec<Moved>,
        stale: bool,
    },
    Reversal(String),
    Retry {
        error: String,
        next_attempt_at: String,
    },
    Dead(String),
    Released {
        error: String,
        next_attempt_at: String,
    },
    RateLimited {
        error: String,
        next_attempt_at: String,
    },
    /// The lease ran out first and another worker owns the delivery now:
    /// nothing of this attempt was kept.
    LeaseLost,
}

/// A decided delivery on its way to the recorder.
pub struct Decided {
    pub delivery: Delivery,
    pub lease_until: String,
    pub outcome: Outcome,
}

/// The wait before a delivery's next attempt, after `d.attempts` of them.
pub fn next_backoff(config: &Config, d: &Delivery) -> Duration {
    let w = &config.workers;
    backoff(
        Duration::from_millis(w.backoff_base_ms.max(1)),
        Duration::from_secs(w.backoff_max_secs.max(1)),
        d.attempts.max(1) as u32,
    )
}

pub fn delivery_span(d: &Delivery) -> tracing::Span {
    tracing::info_span!(
        "delivery",
        key = %d.dedupe_key,
        resource = %d.resource_id.as_deref().unwrap_or("-"),
        provider = %d.provider,
        event_type = %d.event_type,
        attempt = d.attempts,
    )
}
