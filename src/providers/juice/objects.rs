//! Juice bulk transfers as fetched (Juice's API reference), decoded defensively:
//! open statuses, counts as strings or numbers, zone-less times read as UTC.
//! Each item becomes a `juice.transfer` observation of its own, keyed by its
//! `id` when it has one, else by `<bulk transfer id>:<reference>` (see
//! [`item_keys`]).

use serde_json::Value;

use super::event::{BULK_TRANSFER, TRANSFER};
use super::NAME;
use crate::providers::{
    lenient_i64, lenient_time, Observation, Progress, RefundSignal, RefundStatus, StatusClass,
};

const BULK_TERMINAL: [&str; 5] = [
    "completed",
    "cancelled",
    "expired",
    "failed",
    "partially_completed",
];

/// Bulk: SPEC's terminal list. Item: `failed` and the reversed statuses are
/// terminal; `completed` and `cancelled` are settled (a cancelled item still
/// awaits its reversal); anything else moves.
pub fn classify(kind: &str, status: &str, reversed: &[String]) -> StatusClass {
    match kind {
        BULK_TRANSFER if BULK_TERMINAL.contains(&status) => StatusClass::Terminal,
        TRANSFER if status == "failed" || reversed.iter().any(|r| r == status) => {
            StatusClass::Terminal
        }
        TRANSFER if status == "completed" || status == "cancelled" => StatusClass::Settled,
        _ => StatusClass::Transitional,
    }
}

/// Bulk: created → executing → terminal. Item: pending → processing →
/// completed/cancelled/failed → reversed.
pub fn rank(kind: &str, status: &str, reversed: &[String]) -> Option<u8> {
    match (kind, status) {
        (BULK_TRANSFER, "created") => Some(1),
        (BULK_TRANSFER, "executing") => Some(2),
        (BULK_TRANSFER, s) if BULK_TERMINAL.contains(&s) => Some(3),
        (TRANSFER, "pending") => Some(1),
        (TRANSFER, "processing") => Some(2),
        (TRANSFER, "completed" | "cancelled" | "failed") => Some(3),
        (TRANSFER, s) if reversed.iter().any(|r| r == s) => Some(4),
        _ => None,
    }
}

/// What an item's status says about its refund.
pub fn item_refund(
    status: &str,
    amount: Option<i64>,
    currency: Option<String>,
    reversed: &[String],
) -> Option<RefundSignal> {
    let refund_status = if status == "cancelled" {
        RefundStatus::Pending
    } else if reversed.iter().any(|r| r == status) {
        RefundStatus::Completed
    } else if status == "failed" {
        RefundStatus::Failed
    } else {
        return None;
    };
    Some(RefundSignal {
        status: refund_status,
        reason: status.to_string(),
        amount,
        currency,
    })
}

/// The keys of an item of bulk transfer `bulk_id`: the one it is recorded
/// under (its `id`, else `<bulk_id>:<reference>`, a reference being unique
/// only within its bulk transfer), and the other one when it has both, under
/// which it may have been recorded before. `None` for an item with neither.
pub fn item_keys(bulk_id: &str, item: &Value) -> Option<(String, Option<String>)> {
    let text = |field: &str| {
        item.get(field)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let by_reference = text("reference").map(|r| format!("{bulk_id}:{r}"));
    match text("id") {
        Some(id) => Some((id.to_string(), by_reference)),
        None => by_reference.map(|key| (key, None)),
    }
}

/// Items of a bulk transfer that could not be recorded as transfers of
/// their own; they stay in the bulk transfer's snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unrecorded {
    /// With neither an `id` nor a `reference`.
    pub unkeyed: usize,
    /// Keyed, but with no status.
    pub without_status: usize,
}

/// The item fields read for its currency, first found first: Juice
/// documents none on items and no currency on the bulk transfer; answers
/// may carry `source_currency` (what leaves the balance, and what a
/// reversal gives back) and `destination_currency` (what the beneficiary
/// gets). `juice.item_currency_fields` in the configuration.
pub const CURRENCY_FIELDS: [&str; 3] = ["source_currency", "currency", "destination_currency"];

/// How answers are read: `juice.reversed_statuses` and
/// `juice.item_currency_fields`.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub reversed: &'a [String],
    pub currency_fields: &'a [String],
}

/// The currency of an item: the first of `fields` it carries, else the
/// bulk transfer's own `currency` (none is documented); `None`: unknown.
fn item_currency(item: &Value, fields: &[String], bulk: Option<&String>) -> Option<String> {
    fields
        .iter()
        .find_map(|f| {
            item.get(f)
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
        })
        .map(str::to_string)
        .or_else(|| bulk.cloned())
}

/// Decodes `GET /bulk-transfers/{id}` (`{"data": bulk}`, or the bulk
/// itself), the item currency read from [`CURRENCY_FIELDS`].
pub fn decode_bulk(id: &str, body: Value, reversed: &[String]) -> Result<Observation, String> {
    let currency_fields = CURRENCY_FIELDS.map(String::from);
    let reading = Reading {
        reversed,
        currency_fields: &currency_fields,
    };
    decode_bulk_counted(id, body, &reading).map(|(obs, _)| obs)
}

/// [`decode_bulk`] read as `reading` says, with the items it could not record.
pub fn decode_bulk_counted(
    id: &str,
    body: Value,
    reading: &Reading<'_>,
) -> Result<(Observation, Unrecorded), String> {
    let reversed = reading.reversed;
    let mut bulk = match body {
        Value::Object(mut map) if map.get("data").is_some_and(Value::is_object) => {
            map.remove("data").expect("checked just above")
        }
        other => other,
    };
    let status = bulk
        .get("status")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("bulk transfer {id}: the object has no status"))?
        .to_string();
    let bulk_id = bulk
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or(id)
        .to_string();
    // An answer about another bulk transfer is not recorded under this one.
    if bulk_id != id {
        return Err(format!(
            "bulk transfer {id}: the answer is about another one ({bulk_id}); not recorded"
        ));
    }
    let bulk_currency = bulk
        .get("currency")
        .and_then(Value::as_str)
        .map(str::to_string);
    let livemode = bulk.get("livemode").and_then(Value::as_bool);
    // The bulk transfer's snapshot keeps only the items that are not
    // resources of their own: each of the others is stored in its own row,
    // and a large bulk transfer is not written again whole each time it is
    // fetched for one item that moved.
    let items = match bulk.get_mut("items") {
        Some(Value::Array(items)) => Some(std::mem::take(items)),
        _ => None,
    };
    let listed = items.is_some();
    let mut children = Vec::new();
    let mut kept = Vec::new();
    let mut unrecorded = Unrecorded::default();
    for item in items.into_iter().flatten() {
        let Some((item_id, _)) = item_keys(&bulk_id, &item) else {
            unrecorded.unkeyed += 1;
            kept.push(item);
            continue;
        };
        let Some(item_status) = item
            .get("status")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
        else {
            unrecorded.without_status += 1;
            kept.push(item);
            continue;
        };
        let amount = lenient_i64(item.get("amount"));
        let currency = item_currency(&item, reading.currency_fields, bulk_currency.as_ref());
        children.push(Observation {
            provider: NAME,
            kind: TRANSFER.to_string(),
            id: item_id,
            parent_id: Some(bulk_id.clone()),
            class: classify(TRANSFER, &item_status, reversed),
            provider_at: lenient_time(item.get("updated_at")),
            refund: item_refund(&item_status, amount, currency.clone(), reversed),
            amount,
            currency,
            livemode,
            progress: None,
            children: Vec::new(),
            status: item_status,
            snapshot: item.to_string(),
        });
    }
    if listed {
        bulk["items"] = Value::Array(kept);
    }
    let obs = Observation {
        provider: NAME,
        kind: BULK_TRANSFER.to_string(),
        id: bulk_id,
        parent_id: None,
        class: classify(BULK_TRANSFER, &status, reversed),
        provider_at: lenient_time(bulk.get("updated_at")),
        amount: lenient_i64(bulk.get("amount")).or_else(|| lenient_i64(bulk.get("total_amount"))),
        currency: bulk_currency,
        livemode,
        progress: Some(Progress {
            success: lenient_i64(bulk.get("successful_transfer_count")),
            failure: lenient_i64(bulk.get("failed_transfer_count")),
            validated: None,
        }),
        children,
        refund: None,
        status,
        snapshot: bulk.to_string(),
    };
    Ok((obs, unrecorded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reversed() -> Vec<String> {
        vec!["reversed".into(), "refunded".into()]
    }

    /// An answer about another bulk transfer is refused, not recorded
    /// under the one asked for.
    #[test]
    fn an_answer_about_another_bulk_transfer_is_refused() {
        let body = json!({"data": {"id": "bulk_2", "status": "completed", "items": []}});
        let refused = decode_bulk("bulk_1", body, &reversed()).unwrap_err();
        assert!(refused.contains("another one (bulk_2)"), "{refused}");
    }

    #[test]
    fn partial_cancellation_bulk() {
        let body = json!({"data": {
            "id": "6f1c1e9a-0000-4000-8000-000000000001", "reference": "payroll-1",
            "status": "cancelled", "total_transfer_count": "3",
            "successful_transfer_count": 1, "failed_transfer_count": "0",
            "created_at": "2024-10-02T17:39:26.049258", "updated_at": "2024-10-02T17:45:00.5",
            "items": [
                {"id": "it_1", "amount": 1000, "status": "cancelled", "reference": "a", "beneficiary": {}},
                {"id": "it_2", "amount": "2500", "status": "completed", "reference": "b"},
                {"id": "it_3", "amount": 300, "status": "on_hold", "currency": "NGN"},
                {"status": "cancelled"},
                {"reference": "e", "amount": 50},
                {"amount": 70, "status": "cancelled", "reference": "f"}
            ]
        }});
        let fields = CURRENCY_FIELDS.map(String::from);
        let reading = Reading {
            reversed: &reversed(),
            currency_fields: &fields,
        };
        let (obs, unrecorded) =
            decode_bulk_counted("6f1c1e9a-0000-4000-8000-000000000001", body, &reading).unwrap();
        assert_eq!(
            unrecorded,
            Unrecorded {
                unkeyed: 1,
                without_status: 1
            }
        );
        assert_eq!(obs.status, "cancelled");
        assert_eq!(obs.class, StatusClass::Terminal);
        assert_eq!(obs.provider_at.as_deref(), Some("2024-10-02T17:45:00.500Z"));
        assert_eq!(obs.progress.unwrap().success, Some(1));
        assert_eq!(obs.progress.unwrap().failure, Some(0));
        assert_eq!(
            obs.children.len(),
            4,
            "an item without an id is keyed by its reference"
        );
        assert_eq!(obs.children[3].id, "6f1c1e9a-0000-4000-8000-000000000001:f");
        assert_eq!(obs.children[3].refund.as_ref().unwrap().amount, Some(70));
        let it1 = &obs.children[0];
        assert_eq!(it1.kind, TRANSFER);
        assert_eq!(it1.parent_id.as_deref(), Some(obs.id.as_str()));
        assert_eq!(it1.class, StatusClass::Settled);
        let refund = it1.refund.as_ref().unwrap();
        assert_eq!(refund.status, RefundStatus::Pending);
        assert_eq!(refund.amount, Some(1000));
        let it2 = &obs.children[1];
        assert_eq!(it2.amount, Some(2500));
        assert!(it2.refund.is_none());
        let it3 = &obs.children[2];
        assert_eq!(it3.class, StatusClass::Transitional);
        assert_eq!(it3.currency.as_deref(), Some("NGN"));
    }

    #[test]
    fn an_item_currency_is_read_from_the_first_field_it_has() {
        let fields = CURRENCY_FIELDS.map(String::from);
        let bulk = Some("EUR".to_string());
        let item = json!({"source_currency": "USD", "destination_currency": "NGN"});
        assert_eq!(item_currency(&item, &fields, None).as_deref(), Some("USD"));
        let item = json!({"destination_currency": "NGN"});
        assert_eq!(item_currency(&item, &fields, None).as_deref(), Some("NGN"));
        assert_eq!(
            item_currency(&json!({}), &fields, bulk.as_ref()).as_deref(),
            Some("EUR")
        );
        assert_eq!(item_currency(&json!({"currency": ""}), &fields, None), None);
        let only_source = ["source_currency".to_string()];
        assert_eq!(
            item_currency(&json!({"currency": "NGN"}), &only_source, None),
            None
        );
    }

    #[test]
    fn items_are_keyed_by_id_else_by_reference() {
        assert_eq!(
            item_keys("b1", &json!({"id": "u1", "reference": "r1"})),
            Some(("u1".into(), Some("b1:r1".into())))
        );
        assert_eq!(
            item_keys("b1", &json!({"id": "u1"})),
            Some(("u1".into(), None))
        );
        assert_eq!(
            item_keys("b1", &json!({"id": "", "reference": "r1"})),
            Some(("b1:r1".into(), None))
        );
        assert_eq!(item_keys("b1", &json!({"reference": 5})), None);
    }

    #[test]
    fn item_refund_signals() {
        let r = reversed();
        assert_eq!(
            item_refund("reversed", Some(5), None, &r).unwrap().status,
            RefundStatus::Completed
        );
        assert_eq!(
            item_refund("refunded", Some(5), None, &r).unwrap().status,
            RefundStatus::Completed
        );
        assert_eq!(
            item_refund("failed", Some(5), None, &r).unwrap().status,
            RefundStatus::Failed
        );
        assert!(item_refund("pending", Some(5), None, &r).is_none());
        assert_eq!(classify(TRANSFER, "reversed", &r), StatusClass::Terminal);
        assert!(rank(TRANSFER, "cancelled", &r) < rank(TRANSFER, "reversed", &r));
        assert_eq!(rank(BULK_TRANSFER, "weird", &r), None);
    }

    #[test]
    fn bare_object_and_missing_status() {
        let obs = decode_bulk("b1", json!({"id": "b1", "status": "executing"}), &[]).unwrap();
        assert_eq!(obs.class, StatusClass::Transitional);
        assert!(obs.children.is_empty());
        assert!(decode_bulk("b1", json!({"data": {"id": "b1"}}), &[]).is_err());
    }
}
