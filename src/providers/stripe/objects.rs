//! Stripe v2 objects as fetched (Stripe's v2 API reference), decoded defensively
//! into an [`Observation`]: open status strings, counts as strings or numbers.

use serde_json::Value;

use super::event::{BATCH_JOB, OUTBOUND_TRANSFER};
use super::NAME;
use crate::providers::{
    lenient_i64, lenient_time, Observation, Progress, RefundSignal, RefundStatus, StatusClass,
};

const OUTBOUND_TERMINAL: [&str; 3] = ["canceled", "failed", "returned"];
const BATCH_TERMINAL: [&str; 6] = [
    "complete",
    "canceled",
    "batch_failed",
    "timeout",
    "upload_timeout",
    "validation_failed",
];

/// Outbound transfer: `posted` is settled (final unless returned); the others
/// are terminal. Batch job: the terminal list of SPEC; anything else moves.
/// Objects of other kinds (followed through `stripe.follow_event_types`) are
/// recorded as they come but never reconciled: settled.
pub fn classify(kind: &str, status: &str) -> StatusClass {
    match kind {
        OUTBOUND_TRANSFER if OUTBOUND_TERMINAL.contains(&status) => StatusClass::Terminal,
        OUTBOUND_TRANSFER if status == "posted" => StatusClass::Settled,
        BATCH_JOB if BATCH_TERMINAL.contains(&status) => StatusClass::Terminal,
        OUTBOUND_TRANSFER | BATCH_JOB => StatusClass::Transitional,
        _ => StatusClass::Settled,
    }
}

/// Order of statuses: `processing` → `posted` → `returned`; `processing` →
/// `canceled`/`failed`. Batch job: upload → validating → in progress →
/// cancelling → any terminal.
pub fn rank(kind: &str, status: &str) -> Option<u8> {
    match (kind, status) {
        (OUTBOUND_TRANSFER, "processing") => Some(1),
        (OUTBOUND_TRANSFER, "posted") => Some(2),
        (OUTBOUND_TRANSFER, s) if OUTBOUND_TERMINAL.contains(&s) => Some(3),
        (BATCH_JOB, "ready_for_upload") => Some(1),
        (BATCH_JOB, "validating") => Some(2),
        (BATCH_JOB, "in_progress") => Some(3),
        (BATCH_JOB, "cancelling") => Some(4),
        (BATCH_JOB, s) if BATCH_TERMINAL.contains(&s) => Some(5),
        _ => None,
    }
}

/// Decodes a fetched object of `kind`. An object without a `status` string is
/// refused (it cannot be recorded).
pub fn decode(kind: &str, id: &str, object: Value) -> Result<Observation, String> {
    let status = object
        .get("status")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("{kind} {id}: the object has no status"))?
        .to_string();
    let object_id = object
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or(id)
        .to_string();
    // An answer about another object, or another type of object, is not
    // recorded under the one asked for (a singleton fetched by its url has
    // no id of its own to compare).
    if object_id != id && !id.starts_with('/') {
        return Err(format!(
            "{kind} {id}: the answer is about another object ({object_id}); not recorded"
        ));
    }
    if let Some(other) = object
        .get("object")
        .and_then(Value::as_str)
        .filter(|o| super::event::kind_of(o) != kind)
    {
        return Err(format!(
            "{kind} {id}: the answer is a {other}, not a {kind}; not recorded"
        ));
    }
    let livemode = object.get("livemode").and_then(Value::as_bool);
    let mut obs = Observation {
        provider: NAME,
        kind: kind.to_string(),
        id: object_id,
        parent_id: None,
        class: classify(kind, &status),
        provider_at: None,
        amount: None,
        currency: None,
        livemode,
        snapshot: String::new(),
        progress: None,
        children: Vec::new(),
        refund: None,
        status,
    };
    match kind {
        OUTBOUND_TRANSFER => {
            obs.provider_at = lenient_time(
                object
                    .get("status_transitions")
                    .and_then(|t| t.get(format!("{}_at", obs.status))),
            );
            let amount = object.get("amount");
            obs.amount = lenient_i64(amount.and_then(|a| a.get("value")));
            obs.currency = amount
                .and_then(|a| a.get("currency"))
                .and_then(Value::as_str)
                .map(str::to_string);
            if OUTBOUND_TERMINAL.contains(&obs.status.as_str()) {
                let (amount, currency) = debited(&object, &obs);
                obs.refund = Some(RefundSignal {
                    status: RefundStatus::Completed,
                    reason: obs.status.clone(),
                    amount,
                    currency,
                });
            }
        }
        BATCH_JOB => {
            let details = object
                .get("status_details")
                .and_then(|d| d.get(&obs.status))
                .unwrap_or(&Value::Null);
            obs.progress = Some(Progress {
                success: lenient_i64(details.get("success_count")),
                failure: lenient_i64(details.get("failure_count")),
                validated: lenient_i64(details.get("validated_count")),
            });
            obs.provider_at = lenient_time(
                object
                    .get("status_transitions")
                    .and_then(|t| t.get(format!("{}_at", obs.status))),
            );
        }
        _ => {}
    }
    obs.snapshot = object.to_string();
    Ok(obs)
}

/// A batch job carries no time of its status (no `status_transitions`):
/// the provider's time of the state fetched is that of the event that
/// caused the fetch. Other objects keep the time they carry.
pub fn timed_by_event(mut obs: Observation, event_created: Option<&str>) -> Observation {
    if obs.kind == BATCH_JOB && obs.provider_at.is_none() {
        obs.provider_at = event_created
            .and_then(crate::time::parse_lenient)
            .map(crate::time::fmt);
    }
    obs
}

/// The money that comes back: `from.debited`, what left the financial
/// account, not the presentment `amount` (they differ when the account pays
/// in another currency). An answer without it is refunded at `amount`, the
/// only figure it gives, and the log says so.
fn debited(object: &Value, obs: &Observation) -> (Option<i64>, Option<String>) {
    let debited = object.pointer("/from/debited");
    let amount = lenient_i64(debited.and_then(|d| d.get("value")));
    let currency = debited
        .and_then(|d| d.get("currency"))
        .and_then(Value::as_str);
    match (amount, currency) {
        (Some(amount), Some(currency)) => (Some(amount), Some(currency.to_string())),
        _ => {
            tracing::warn!(resource = %obs.id, "outbound transfer without from.debited: its refund is recorded at the presentment amount");
            (obs.amount, obs.currency.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An answer whose id is another object's, or whose type is another
    /// kind's, is refused rather than recorded under the one asked for.
    #[test]
    fn an_answer_about_another_object_is_refused() {
        let transfer = |id: &str, object: &str| json!({"id": id, "object": object, "status": "processing", "livemode": false});
        let ot = "v2.money_management.outbound_transfer";
        assert!(decode(OUTBOUND_TRANSFER, "obt_1", transfer("obt_1", ot)).is_ok());
        let other = decode(OUTBOUND_TRANSFER, "obt_1", transfer("obt_2", ot)).unwrap_err();
        assert!(other.contains("another object (obt_2)"), "{other}");
        let batch = decode(
            OUTBOUND_TRANSFER,
            "obt_1",
            transfer("obt_1", "v2.core.batch_job"),
        );
        assert!(batch.unwrap_err().contains("is a v2.core.batch_job"));
    }

    #[test]
    fn outbound_transfer_canceled() {
        let o = json!({
            "id": "obt_1", "object": "v2.money_management.outbound_transfer",
            "amount": {"value": 1500, "currency": "usd"}, "cancelable": false,
            "from": {"financial_account": "fa_1", "debited": {"value": 1500, "currency": "usd"}},
            "livemode": false, "status": "canceled",
            "status_transitions": {"canceled_at": "2026-10-30T12:01:00.000Z", "posted_at": null},
            "brand_new_field": {"x": 1}
        });
        let obs = decode(OUTBOUND_TRANSFER, "obt_1", o).unwrap();
        assert_eq!(obs.status, "canceled");
        assert_eq!(obs.class, StatusClass::Terminal);
        assert_eq!(obs.provider_at.as_deref(), Some("2026-10-30T12:01:00.000Z"));
        assert_eq!(obs.amount, Some(1500));
        assert_eq!(obs.currency.as_deref(), Some("usd"));
        assert_eq!(obs.livemode, Some(false));
        let refund = obs.refund.unwrap();
        assert_eq!(refund.status, RefundStatus::Completed);
        assert_eq!(refund.reason, "canceled");
        assert_eq!(refund.amount, Some(1500));
        let snapshot: Value = serde_json::from_str(&obs.snapshot).unwrap();
        assert_eq!(snapshot["brand_new_field"]["x"], 1);
    }

    #[test]
    fn the_refund_is_what_left_the_account() {
        let o = json!({
            "id": "obt_3", "status": "returned",
            "amount": {"value": 8000, "currency": "eur"},
            "from": {"financial_account": "fa_1", "debited": {"value": "8640", "currency": "usd"}},
        });
        let obs = decode(OUTBOUND_TRANSFER, "obt_3", o).unwrap();
        assert_eq!(
            (obs.amount, obs.currency.as_deref()),
            (Some(8000), Some("eur"))
        );
        let refund = obs.refund.unwrap();
        assert_eq!(
            (refund.amount, refund.currency.as_deref()),
            (Some(8640), Some("usd"))
        );
        let o =
            json!({"id": "obt_4", "status": "failed", "amount": {"value": 10, "currency": "eur"}});
        let refund = decode(OUTBOUND_TRANSFER, "obt_4", o)
            .unwrap()
            .refund
            .unwrap();
        assert_eq!(
            (refund.amount, refund.currency.as_deref()),
            (Some(10), Some("eur"))
        );
    }

    #[test]
    fn outbound_transfer_posted_is_settled_and_unknown_is_open() {
        let obs = decode(
            OUTBOUND_TRANSFER,
            "obt_2",
            json!({"id": "obt_2", "status": "posted", "amount": {"value": 10, "currency": "eur"},
                   "status_transitions": {"posted_at": "2026-10-30T12:00:00Z"}}),
        )
        .unwrap();
        assert_eq!(obs.class, StatusClass::Settled);
        assert!(obs.refund.is_none());
        assert_eq!(obs.provider_at.as_deref(), Some("2026-10-30T12:00:00.000Z"));
        let obs = decode(
            OUTBOUND_TRANSFER,
            "obt_2",
            json!({"id": "obt_2", "status": "on_hold_new"}),
        )
        .unwrap();
        assert_eq!(obs.class, StatusClass::Transitional);
        assert_eq!(rank(OUTBOUND_TRANSFER, "on_hold_new"), None);
    }

    #[test]
    fn batch_job_counts_as_strings_or_numbers() {
        let o = json!({
            "id": "batchv2_1", "object": "v2.core.batch_job", "status": "canceled",
            "status_details": {"canceled": {"success_count": "30", "failure_count": 2}}
        });
        let obs = decode(BATCH_JOB, "batchv2_1", o).unwrap();
        assert_eq!(obs.class, StatusClass::Terminal);
        assert_eq!(
            obs.progress,
            Some(Progress {
                success: Some(30),
                failure: Some(2),
                validated: None
            })
        );
        let o = json!({"id": "batchv2_1", "status": "validating",
                       "status_details": {"validating": {"validated_count": "7"}}});
        let obs = decode(BATCH_JOB, "batchv2_1", o).unwrap();
        assert_eq!(obs.class, StatusClass::Transitional);
        assert_eq!(obs.progress.unwrap().validated, Some(7));
        assert!(obs.refund.is_none());
    }

    #[test]
    fn a_batch_job_takes_its_time_from_the_event() {
        let job = json!({"id": "batchv2_1", "status": "in_progress"});
        let obs = decode(BATCH_JOB, "batchv2_1", job).unwrap();
        let obs = timed_by_event(obs, Some("2026-10-30T12:00:05Z"));
        assert_eq!(obs.provider_at.as_deref(), Some("2026-10-30T12:00:05.000Z"));
        let transfer = json!({"id": "obt_1", "status": "processing"});
        let obs = decode(OUTBOUND_TRANSFER, "obt_1", transfer).unwrap();
        assert_eq!(
            timed_by_event(obs, Some("2026-10-30T12:00:05Z")).provider_at,
            None
        );
    }

    #[test]
    fn other_kinds_are_recorded_but_settled() {
        let obs = decode(
            "stripe.account",
            "acct_1",
            json!({"id": "acct_1", "status": "active"}),
        )
        .unwrap();
        assert_eq!(obs.class, StatusClass::Settled);
        assert!(obs.progress.is_none());
    }

    #[test]
    fn no_status_is_refused() {
        assert!(decode(BATCH_JOB, "b", json!({"id": "b"})).is_err());
        assert!(decode(BATCH_JOB, "b", json!({"id": "b", "status": 5})).is_err());
    }

    #[test]
    fn ranks() {
        assert!(rank(BATCH_JOB, "cancelling") < rank(BATCH_JOB, "canceled"));
        assert!(rank(BATCH_JOB, "in_progress") < rank(BATCH_JOB, "cancelling"));
        assert!(rank(OUTBOUND_TRANSFER, "posted") < rank(OUTBOUND_TRANSFER, "returned"));
        assert!(rank(OUTBOUND_TRANSFER, "processing") < rank(OUTBOUND_TRANSFER, "posted"));
    }
}
