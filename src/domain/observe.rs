//! What an observation changes, decided without a database: whether a
//! status may replace the stored one (the kind's ranks, the provider's
//! times, terminal statuses), what happens to a refund, when to look again.
//! Every storage engine records through these functions, so both agree.

use chrono::Duration;

use crate::providers::knowledge::{self, Watch};
use crate::providers::{self, Observation, RefundSignal, RefundStatus, StatusClass};
use crate::time::{self, Timestamp};

/// What caused an observation (the `trigger_type` / `trigger_id` columns).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// `event`, `reconcile`, `cancel` or `backfill`.
    pub kind: &'static str,
    /// Event id (Juice: dedupe key), cancel request id; none for reconcile.
    pub id: Option<String>,
}

impl Trigger {
    pub fn event(id: impl Into<String>) -> Trigger {
        Trigger {
            kind: "event",
            id: Some(id.into()),
        }
    }
    pub fn backfill(id: impl Into<String>) -> Trigger {
        Trigger {
            kind: "backfill",
            id: Some(id.into()),
        }
    }
    pub fn cancel(request_id: i64) -> Trigger {
        Trigger {
            kind: "cancel",
            id: Some(request_id.to_string()),
        }
    }
    pub fn reconcile() -> Trigger {
        Trigger {
            kind: "reconcile",
            id: None,
        }
    }
}

/// What is known of a resource before an observation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub status: Option<String>,
    pub terminal: bool,
    pub provider_at: Option<String>,
}

/// The verdict on one observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First status ever seen: a transition from nothing.
    First,
    /// A newer status: one transition.
    Changed,
    /// Same status: the snapshot is refreshed, no transition.
    Same,
    /// Older than what is stored: nothing moves.
    Stale,
}

/// Decides whether an observed status may replace the stored one. A stale
/// fetch never moves a resource backwards: a terminal status is final; the
/// provider's own timestamps decide when both sides have one; otherwise the
/// kind's status ranks do; an unknown status is accepted only while the
/// stored one is not terminal.
pub fn judge(
    stored: &Stored,
    kind: &str,
    status: &str,
    provider_at: Option<&str>,
    reversed: &[String],
) -> Verdict {
    let Some(old) = stored.status.as_deref() else {
        return Verdict::First;
    };
    let older_than_stored = match (provider_at, stored.provider_at.as_deref()) {
        (Some(new), Some(old)) => Some(new < old),
        _ => None,
    };
    if old == status {
        return if older_than_stored == Some(true) {
            Verdict::Stale
        } else {
            Verdict::Same
        };
    }
    if stored.terminal {
        return Verdict::Stale;
    }
    if let (Some(new), Some(old_at)) = (provider_at, stored.provider_at.as_deref()) {
        if new != old_at {
            return if new > old_at {
                Verdict::Changed
            } else {
                Verdict::Stale
            };
        }
    }
    match (
        providers::rank(kind, status, reversed),
        providers::rank(kind, old, reversed),
    ) {
        (Some(new), Some(old)) if new < old => Verdict::Stale,
        _ => Verdict::Changed,
    }
}

/// What to do with a resource's refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefundChange {
    /// Open one (pending, or completed at once).
    Open(RefundStatus),
    /// Move the pending one to completed or failed.
    Settle(RefundStatus),
}

/// A refund is opened by the first signal that money is coming back (pending)
/// or came back (completed); a pending one moves once to completed or failed;
/// completed and failed are final. A failure with no refund open opens none
/// (a transfer that failed on its own has nothing to give back).
pub fn refund_change(existing: Option<&str>, signal: RefundStatus) -> Option<RefundChange> {
    match (existing, signal) {
        (None, RefundStatus::Failed) => None,
        (None, s) => Some(RefundChange::Open(s)),
        (Some("pending"), RefundStatus::Completed | RefundStatus::Failed) => {
            Some(RefundChange::Settle(signal))
        }
        _ => None,
    }
}

/// The transfer's own amount and currency, kept beside its refund when the
/// refund is counted otherwise (a Stripe outbound transfer gives back what
/// left the account, which may differ from what it was presented in).
pub fn presentment<'a>(
    obs: &'a Observation,
    signal: &RefundSignal,
) -> Option<(Option<i64>, Option<&'a str>)> {
    let own = (obs.amount, obs.currency.as_deref());
    (own != (signal.amount, signal.currency.as_deref())).then_some(own)
}

/// A settled resource its provider may still move: since when it rests,
/// and how it is watched meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    pub since: Timestamp,
    pub watch: Watch,
}

impl Watched {
    /// It rests since the provider's time of its status when it gives one,
    /// else since its status was first observed.
    pub fn new(watch: Watch, provider_at: Option<&str>, status_since: Timestamp) -> Watched {
        let since = provider_at
            .and_then(time::parse_lenient)
            .unwrap_or(status_since);
        Watched { since, watch }
    }
}

/// When to fetch a resource again: after `interval_secs` while it moves;
/// while it rests but its refund is pending (`refund_pending_since`: since
/// when its status has been the one that opened the refund), after as long
/// as that has lasted, between `interval_secs` and `max_interval_secs`, so
/// the wait doubles from one look to the next: a reversal whose signal may
/// never come is not polled at the pace of a transfer in flight; at the
/// watch's pace while a settled one its provider may still move is watched,
/// the last time when its window closes. Never once it rests.
pub fn next_reconcile(
    class: StatusClass,
    refund_pending_since: Option<Timestamp>,
    now: Timestamp,
    interval_secs: u64,
    max_interval_secs: u64,
    watched: Option<Watched>,
) -> Option<String> {
    let interval = interval_secs.max(1) as i64;
    if class == StatusClass::Transitional {
        return Some(time::fmt(now + Duration::seconds(interval)));
    }
    if let Some(since) = refund_pending_since {
        let pending_for = (now - since).num_seconds();
        let wait = pending_for.clamp(interval, (max_interval_secs as i64).max(interval));
        return Some(time::fmt(now + Duration::seconds(wait)));
    }
    let w = watched.filter(|_| class == StatusClass::Settled)?;
    let until = w.since + Duration::from_std(w.watch.window).ok()?;
    let next = now + Duration::from_std(w.watch.every).ok()?;
    (now < until).then(|| time::fmt(next.min(until)))
}

/// What one call of [`record`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Every resource looked at: the observed one first, then its children.
    pub rids: Vec<i64>,
    /// Transition rows written (the observed resource's and its children's).
    pub transitions: Vec<Moved>,
    /// True when the observed resource itself (not a child) was stale.
    pub stale: bool,
}

impl Recorded {
    /// Counts and logs the transitions written; call it once the
    /// transaction that wrote them has committed.
    pub fn report(&self) {
        report(&self.transitions);
    }
}

/// A transition written, as it is counted and logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub kind: String,
    pub resource_id: String,
    pub from: Option<String>,
    pub to: String,
    /// The trigger's kind (`event`, `reconcile`, …).
    pub trigger: &'static str,
}

/// Counts (`cancelwatch_transitions_total`) and logs transitions that are
/// committed: counted before, a transaction rolled back (or written again
/// after a failure) would count them though they were not kept, or twice.
///
/// Up to [`LOGGED_EACH`] transitions are logged a line each; more at once
/// (a bulk transfer's items) are logged one line per kind, status and
/// trigger with their number: a bulk of 100,000 items must not write
/// 100,000 lines. `cancelwatch history` has each of them.
pub fn report(transitions: &[Moved]) {
    let mut counted: std::collections::BTreeMap<(&str, &str, &'static str), u64> =
        std::collections::BTreeMap::new();
    for t in transitions {
        *counted.entry((&t.kind, &t.to, t.trigger)).or_default() += 1;
    }
    for ((kind, to, _), n) in &counted {
        let to_status = knowledge::status_label(kind, to);
        metrics::counter!("cancelwatch_transitions_total", "kind" => kind.to_string(), "to_status" => to_status)
            .increment(*n);
    }
    if transitions.len() <= LOGGED_EACH {
        for t in transitions {
            tracing::info!(resource = %t.resource_id, kind = %t.kind, from = t.from.as_deref(), to = %t.to, trigger = t.trigger, "transition");
        }
        return;
    }
    for ((kind, to, trigger), n) in counted {
        tracing::info!(
            kind,
            to,
            trigger,
            transitions = n,
            "transitions (many at once: one line per kind and status)"
        );
    }
}

/// Most transitions [`report`] logs a line each.
pub const LOGGED_EACH: usize = 20;

/// An observation to record, with what caused it.
#[derive(Debug, Clone, Copy)]
pub struct ToRecord<'a> {
    pub obs: &'a Observation,
    pub trigger: &'a Trigger,
    /// Stripe account context, kept on the resource.
    pub context: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::juice::event::{BULK_TRANSFER, TRANSFER};

    /// A status its provider does not document is counted as `other`: the
    /// label's values stay the documented ones, whatever a provider sends.
    #[test]
    fn transitions_to_undocumented_statuses_are_counted_as_other() {
        crate::metrics::with_local_metrics(|counted| async move {
            let moved = |to: &str| Moved {
                kind: OUTBOUND_TRANSFER.into(),
                resource_id: "obt_1".into(),
                from: Some("processing".into()),
                to: to.into(),
                trigger: "event",
            };
            report(&[moved("canceled"), moved("teleported_9f2"), moved("lost")]);
            let text = counted.render();
            let series = |status: &str| {
                format!(
                    "cancelwatch_transitions_total{{kind=\"{OUTBOUND_TRANSFER}\",to_status=\"{status}\"}}"
                )
            };
            assert!(
                text.contains(&format!("{} 1\n", series("canceled"))),
                "{text}"
            );
            assert!(text.contains(&format!("{} 2\n", series("other"))), "{text}");
            assert!(!text.contains("teleported"), "{text}");
        });
    }
    use crate::providers::stripe::event::{BATCH_JOB, OUTBOUND_TRANSFER};

    fn stored(status: &str, terminal: bool, at: Option<&str>) -> Stored {
        Stored {
            status: Some(status.into()),
            terminal,
            provider_at: at.map(str::to_string),
        }
    }

    fn rev() -> Vec<String> {
        vec!["reversed".into(), "refunded".into()]
    }

    #[test]
    fn first_observation() {
        assert_eq!(
            judge(&Stored::default(), BATCH_JOB, "in_progress", None, &[]),
            Verdict::First
        );
    }

    #[test]
    fn terminal_never_goes_back() {
        let s = stored("canceled", true, Some("2026-10-30T12:01:00.000Z"));
        assert_eq!(
            judge(&s, OUTBOUND_TRANSFER, "processing", None, &[]),
            Verdict::Stale
        );
        // Not even with a newer provider time, nor to an unknown status.
        assert_eq!(
            judge(
                &s,
                OUTBOUND_TRANSFER,
                "posted",
                Some("2026-10-30T13:00:00.000Z"),
                &[]
            ),
            Verdict::Stale
        );
        assert_eq!(
            judge(&s, OUTBOUND_TRANSFER, "brand_new", None, &[]),
            Verdict::Stale
        );
        assert_eq!(
            judge(&s, OUTBOUND_TRANSFER, "canceled", None, &[]),
            Verdict::Same
        );
    }

    #[test]
    fn ranks_decide_without_timestamps() {
        let s = stored("cancelling", false, None);
        assert_eq!(
            judge(&s, BATCH_JOB, "in_progress", None, &[]),
            Verdict::Stale
        );
        assert_eq!(
            judge(&s, BATCH_JOB, "canceled", None, &[]),
            Verdict::Changed
        );
        let s = stored("posted", false, Some("2026-10-30T12:00:00.000Z"));
        assert_eq!(
            judge(&s, OUTBOUND_TRANSFER, "processing", None, &[]),
            Verdict::Stale
        );
        assert_eq!(
            judge(
                &s,
                OUTBOUND_TRANSFER,
                "returned",
                Some("2026-10-31T12:00:00.000Z"),
                &[]
            ),
            Verdict::Changed
        );
        let s = stored("cancelled", false, None);
        assert_eq!(
            judge(&s, TRANSFER, "reversed", None, &rev()),
            Verdict::Changed
        );
        assert_eq!(judge(&s, TRANSFER, "pending", None, &rev()), Verdict::Stale);
    }

    #[test]
    fn provider_timestamps_win() {
        let s = stored("executing", false, Some("2026-10-30T12:00:05.000Z"));
        assert_eq!(
            judge(
                &s,
                BULK_TRANSFER,
                "created",
                Some("2026-10-30T12:00:01.000Z"),
                &[]
            ),
            Verdict::Stale
        );
        assert_eq!(
            judge(
                &s,
                BULK_TRANSFER,
                "cancelled",
                Some("2026-10-30T12:00:09.000Z"),
                &[]
            ),
            Verdict::Changed
        );
        // An older copy of the same status is stale too (its snapshot is not kept).
        assert_eq!(
            judge(
                &s,
                BULK_TRANSFER,
                "executing",
                Some("2026-10-30T12:00:01.000Z"),
                &[]
            ),
            Verdict::Stale
        );
    }

    #[test]
    fn unknown_statuses_only_while_not_terminal() {
        let s = stored("in_progress", false, None);
        assert_eq!(
            judge(&s, BATCH_JOB, "paused_new", None, &[]),
            Verdict::Changed
        );
        let s = stored("paused_new", false, None);
        assert_eq!(
            judge(&s, BATCH_JOB, "in_progress", None, &[]),
            Verdict::Changed
        );
        let s = stored("complete", true, None);
        assert_eq!(
            judge(&s, BATCH_JOB, "paused_new", None, &[]),
            Verdict::Stale
        );
    }

    #[test]
    fn refund_moves_once() {
        use RefundStatus::*;
        assert_eq!(
            refund_change(None, Pending),
            Some(RefundChange::Open(Pending))
        );
        assert_eq!(
            refund_change(None, Completed),
            Some(RefundChange::Open(Completed))
        );
        assert_eq!(refund_change(None, Failed), None);
        assert_eq!(refund_change(Some("pending"), Pending), None);
        assert_eq!(
            refund_change(Some("pending"), Completed),
            Some(RefundChange::Settle(Completed))
        );
        assert_eq!(
            refund_change(Some("pending"), Failed),
            Some(RefundChange::Settle(Failed))
        );
        assert_eq!(refund_change(Some("completed"), Failed), None);
        assert_eq!(refund_change(Some("failed"), Completed), None);
    }

    #[test]
    fn reconcile_schedule() {
        let now = time::parse_lenient("2026-10-30T12:00:00Z").unwrap();
        let ago = |secs| Some(now - Duration::seconds(secs));
        let next =
            |class, pending_since| next_reconcile(class, pending_since, now, 60, 3_600, None);
        assert_eq!(
            next(StatusClass::Transitional, None).as_deref(),
            Some("2026-10-30T12:01:00.000Z")
        );
        assert_eq!(
            next(StatusClass::Transitional, ago(7_200)).as_deref(),
            Some("2026-10-30T12:01:00.000Z"),
            "what moves is looked at again at the interval"
        );
        assert_eq!(next(StatusClass::Terminal, None), None);
        assert_eq!(next(StatusClass::Settled, None), None);
        // A pending refund: the wait grows with how long it has been pending.
        assert_eq!(
            next(StatusClass::Settled, ago(0)).as_deref(),
            Some("2026-10-30T12:01:00.000Z")
        );
        assert_eq!(
            next(StatusClass::Settled, ago(600)).as_deref(),
            Some("2026-10-30T12:10:00.000Z")
        );
        assert_eq!(
            next(StatusClass::Settled, ago(86_400)).as_deref(),
            Some("2026-10-30T13:00:00.000Z")
        );
        assert_eq!(
            next(StatusClass::Terminal, ago(86_400)).as_deref(),
            Some("2026-10-30T13:00:00.000Z"),
            "a terminal status with a pending refund is still looked at"
        );
    }

    #[test]
    fn a_watched_settled_resource_is_fetched_until_its_window_closes() {
        let watch = Watch {
            window: std::time::Duration::from_secs(86_400),
            every: std::time::Duration::from_secs(6 * 3_600),
        };
        let at = |s: &str| time::parse_lenient(s).unwrap();
        // Posted at noon (the provider's time wins over when it was seen).
        let w = Watched::new(
            watch,
            Some("2026-10-30T12:00:00.000Z"),
            at("2026-10-30T13:00:00Z"),
        );
        let next = |now: &str, class| next_reconcile(class, None, at(now), 60, 3_600, Some(w));
        assert_eq!(
            next("2026-10-30T12:05:00Z", StatusClass::Settled).as_deref(),
            Some("2026-10-30T18:05:00.000Z")
        );
        // The last look is when the window closes; after it, none.
        assert_eq!(
            next("2026-10-31T09:00:00Z", StatusClass::Settled).as_deref(),
            Some("2026-10-31T12:00:00.000Z")
        );
        assert_eq!(next("2026-10-31T12:00:00Z", StatusClass::Settled), None);
        // Once final, never.
        assert_eq!(next("2026-10-30T12:05:00Z", StatusClass::Terminal), None);
        // No provider time: from when the status was first seen.
        let w = Watched::new(watch, None, at("2026-10-30T13:00:00Z"));
        assert_eq!(w.since, at("2026-10-30T13:00:00Z"));
    }
}
