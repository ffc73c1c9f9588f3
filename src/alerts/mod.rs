//! Alerts leave the daemon through sinks: `sinks` sends one version of an
//! alert to one sink (log, webhook, Slack, command), `signing` signs webhook
//! sinks' requests. Rules decide in [`crate::domain::alerts`]; the outbox
//! that retries each (version, sink) until it is delivered runs in
//! [`crate::jobs::outbox`].

pub mod signing;
pub mod sinks;

pub use crate::domain::alerts::{Changed, Changes};

/// Counts (`cancelwatch_alerts_raised_total`) and logs alerts raised or
/// resolved in a transaction that committed: counted before, a transaction
/// rolled back (or written again after a failure) would count them though
/// they were not kept, or twice.
pub fn report(changes: &[Changed]) {
    for c in changes {
        if c.resolved {
            tracing::info!(alert = %c.id, rule = %c.rule, resource = %c.resource_id, "alert resolved");
        } else {
            metrics::counter!("cancelwatch_alerts_raised_total", "rule" => c.rule.clone())
                .increment(1);
            tracing::info!(alert = %c.id, rule = %c.rule, version = c.version, resource = %c.resource_id, "alert raised");
        }
    }
}
