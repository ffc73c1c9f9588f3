//! Scripted cancel scenarios. Each build makes fresh ids, so one scenario can
//! be played many times against the same daemon.

use serde_json::Value;

use super::deliver::Delivery;
use super::juice_api::{
    bulk_json, completed_delivery, item_event_data, item_key, reversed_delivery,
};
use super::state::{
    batch_job_path, outbound_transfer_path, thin_event, BatchJob, BulkItem, BulkTransfer, Change,
    OutboundTransfer, BATCH_JOB_OBJECT, OUTBOUND_TRANSFER_OBJECT,
};

// The resource kinds cancelwatch records (its SPEC), as expectations name them.
const OUTBOUND_TRANSFER: &str = "stripe.outbound_transfer";
const BATCH_JOB: &str = "stripe.batch_job";
const BULK_TRANSFER: &str = "juice.bulk_transfer";
const TRANSFER: &str = "juice.transfer";

/// Every scenario, in the order `simulate` plays them.
pub const NAMES: &[&str] = &[
    "outbound_transfer_canceled",
    "outbound_transfer_posted_before_cancel",
    "outbound_transfer_returned",
    "batch_job_canceled_midway",
    "batch_job_canceled_clean",
    "juice_partial_cancellation",
    "juice_clean_cancellation",
];

/// A scripted story about one resource.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub steps: Vec<Step>,
    /// What cancelwatch should have recorded once every step is processed.
    pub expect: Expectation,
}

/// One step: a state change in the simulated provider, then its deliveries.
#[derive(Debug, Clone)]
pub struct Step {
    pub label: String,
    pub(crate) changes: Vec<Change>,
    pub deliveries: Vec<Delivery>,
    /// (resource id, its status after this step).
    pub expect_status: Vec<(String, String)>,
}

/// What cancelwatch must record for a scenario.
#[derive(Debug, Clone, Default)]
pub struct Expectation {
    pub histories: Vec<ExpectedHistory>,
    pub refunds: Vec<ExpectedRefund>,
    /// (rule, resource id) that must fire; empty means none may fire.
    pub alerts: Vec<(String, String)>,
}

/// The exact `to_status` sequence of one resource when each step is processed
/// before the next.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedHistory {
    pub kind: String,
    pub id: String,
    pub parent_id: Option<String>,
    pub statuses: Vec<String>,
}

/// A refund cancelwatch must have recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedRefund {
    pub resource_id: String,
    /// `completed`, `pending` or `failed`.
    pub status: String,
    pub amount: i64,
    pub currency: String,
}

/// Builds a fresh instance of the named scenario; Juice deliveries are
/// checksummed with `juice_key`, and their items carry an `id` when
/// `item_ids` (else they are expected under `<bulk id>:<reference>`).
pub(crate) fn build(name: &str, juice_key: &str, item_ids: bool) -> Option<Scenario> {
    Some(match name {
        "outbound_transfer_canceled" => outbound_transfer_canceled(),
        "outbound_transfer_posted_before_cancel" => outbound_transfer_posted_before_cancel(),
        "outbound_transfer_returned" => outbound_transfer_returned(),
        "batch_job_canceled_midway" => batch_job_canceled_midway(),
        "batch_job_canceled_clean" => batch_job_canceled_clean(),
        "juice_partial_cancellation" => juice_partial_cancellation(juice_key, item_ids),
        "juice_clean_cancellation" => juice_clean_cancellation(juice_key, item_ids),
        _ => return None,
    })
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

fn history(kind: &str, id: &str, parent: Option<&str>, statuses: &[&str]) -> ExpectedHistory {
    ExpectedHistory {
        kind: kind.into(),
        id: id.into(),
        parent_id: parent.map(str::to_string),
        statuses: strings(statuses),
    }
}

fn refund(id: &str, amount: i64, currency: &str) -> ExpectedRefund {
    ExpectedRefund {
        resource_id: id.into(),
        status: "completed".into(),
        amount,
        currency: currency.into(),
    }
}

fn transfer_step(label: &str, change: Change, id: &str, event: &str, status: &str) -> Step {
    Step {
        label: label.into(),
        changes: vec![change],
        deliveries: vec![Delivery::stripe(thin_event(
            &format!("{OUTBOUND_TRANSFER_OBJECT}.{event}"),
            OUTBOUND_TRANSFER_OBJECT,
            id,
            &outbound_transfer_path(id),
        ))],
        expect_status: vec![(id.into(), status.into())],
    }
}

fn move_transfer(id: &str, status: &str, reason: Option<&str>) -> Change {
    Change::Transfer {
        id: id.into(),
        status: status.into(),
        reason: reason.map(str::to_string),
    }
}

fn outbound_transfer_canceled() -> Scenario {
    let t = OutboundTransfer::new(12_500, "usd");
    let id = t.id.clone();
    Scenario {
        name: "outbound_transfer_canceled".into(),
        description: "An outbound transfer is canceled while processing; the debit is voided."
            .into(),
        steps: vec![
            transfer_step(
                "created",
                Change::NewTransfer(t),
                &id,
                "created",
                "processing",
            ),
            transfer_step(
                "canceled",
                move_transfer(&id, "canceled", None),
                &id,
                "canceled",
                "canceled",
            ),
        ],
        expect: Expectation {
            histories: vec![history(
                OUTBOUND_TRANSFER,
                &id,
                None,
                &["processing", "canceled"],
            )],
            refunds: vec![refund(&id, 12_500, "usd")],
            alerts: Vec::new(),
        },
    }
}

fn outbound_transfer_posted_before_cancel() -> Scenario {
    let mut t = OutboundTransfer::new(5_000, "usd");
    t.posts_on_cancel = true;
    let id = t.id.clone();
    Scenario {
        name: "outbound_transfer_posted_before_cancel".into(),
        description: "Lost race: the transfer posts before a cancel reaches it; a cancel \
                      through the API posts it first and is refused as not cancelable."
            .into(),
        steps: vec![
            transfer_step(
                "created",
                Change::NewTransfer(t),
                &id,
                "created",
                "processing",
            ),
            transfer_step(
                "posted",
                move_transfer(&id, "posted", None),
                &id,
                "posted",
                "posted",
            ),
        ],
        expect: Expectation {
            histories: vec![history(
                OUTBOUND_TRANSFER,
                &id,
                None,
                &["processing", "posted"],
            )],
            refunds: Vec::new(),
            alerts: Vec::new(),
        },
    }
}

fn outbound_transfer_returned() -> Scenario {
    // Presented in euros, paid from a dollar financial account: what comes
    // back is what left the account.
    let mut t = OutboundTransfer::new(8_000, "eur");
    t.debited = Some((8_640, "usd".into()));
    let id = t.id.clone();
    Scenario {
        name: "outbound_transfer_returned".into(),
        description: "An outbound transfer of 80.00 EUR, paid with 86.40 USD, posts, then comes \
                      back returned; the 86.40 USD are credited back."
            .into(),
        steps: vec![
            transfer_step(
                "created",
                Change::NewTransfer(t),
                &id,
                "created",
                "processing",
            ),
            transfer_step(
                "posted",
                move_transfer(&id, "posted", None),
                &id,
                "posted",
                "posted",
            ),
            transfer_step(
                "returned",
                move_transfer(&id, "returned", Some("recipient_account_closed")),
                &id,
                "returned",
                "returned",
            ),
        ],
        expect: Expectation {
            histories: vec![history(
                OUTBOUND_TRANSFER,
                &id,
                None,
                &["processing", "posted", "returned"],
            )],
            refunds: vec![refund(&id, 8_640, "usd")],
            alerts: Vec::new(),
        },
    }
}

fn batch_step(label: &str, change: Change, id: &str, event: &str, status: &str) -> Step {
    Step {
        label: label.into(),
        changes: vec![change],
        deliveries: vec![Delivery::stripe(thin_event(
            &format!("{BATCH_JOB_OBJECT}.{event}"),
            BATCH_JOB_OBJECT,
            id,
            &batch_job_path(id),
        ))],
        expect_status: vec![(id.into(), status.into())],
    }
}

fn move_batch(id: &str, status: &str, counts: Option<(i64, i64)>) -> Change {
    Change::BatchJob {
        id: id.into(),
        status: status.into(),
        counts,
    }
}

fn batch_job_canceled_midway() -> Scenario {
    let mut job = BatchJob::new("in_progress");
    job.success_count = 30;
    job.failure_count = 2;
    let id = job.id.clone();
    Scenario {
        name: "batch_job_canceled_midway".into(),
        description:
            "A batch job is canceled after 32 of its records were applied: a partial cancellation."
                .into(),
        steps: vec![
            batch_step(
                "in_progress",
                Change::NewBatchJob(job),
                &id,
                "updated",
                "in_progress",
            ),
            batch_step(
                "cancelling",
                move_batch(&id, "cancelling", None),
                &id,
                "updated",
                "cancelling",
            ),
            batch_step(
                "canceled",
                move_batch(&id, "canceled", Some((30, 2))),
                &id,
                "canceled",
                "canceled",
            ),
        ],
        expect: Expectation {
            histories: vec![history(
                BATCH_JOB,
                &id,
                None,
                &["in_progress", "cancelling", "canceled"],
            )],
            refunds: Vec::new(),
            alerts: vec![("partial_cancellation".into(), id.clone())],
        },
    }
}

fn batch_job_canceled_clean() -> Scenario {
    let job = BatchJob::new("validating");
    let id = job.id.clone();
    Scenario {
        name: "batch_job_canceled_clean".into(),
        description: "A batch job is canceled while validating, before any record was applied."
            .into(),
        steps: vec![
            batch_step(
                "validating",
                Change::NewBatchJob(job),
                &id,
                "validating",
                "validating",
            ),
            batch_step(
                "cancelling",
                move_batch(&id, "cancelling", None),
                &id,
                "updated",
                "cancelling",
            ),
            batch_step(
                "canceled",
                move_batch(&id, "canceled", Some((0, 0))),
                &id,
                "canceled",
                "canceled",
            ),
        ],
        expect: Expectation {
            histories: vec![history(
                BATCH_JOB,
                &id,
                None,
                &["validating", "cancelling", "canceled"],
            )],
            refunds: Vec::new(),
            alerts: Vec::new(),
        },
    }
}

/// Plays Juice steps on a local copy of the bulk transfer, so each delivery
/// carries the object as it is after its step.
struct JuiceScript<'a> {
    key: &'a str,
    /// Items are served with their `id`.
    ids: bool,
    bulk: BulkTransfer,
    steps: Vec<Step>,
}

impl<'a> JuiceScript<'a> {
    fn new(key: &'a str, ids: bool, bulk: BulkTransfer) -> Self {
        let data = bulk_json(&bulk, ids);
        let first = Step {
            label: String::new(),
            changes: vec![Change::NewBulk(bulk.clone())],
            deliveries: vec![Delivery::juice(key, "bulk_transfer.created", data)],
            expect_status: Vec::new(),
        };
        let mut script = Self {
            key,
            ids,
            bulk,
            steps: Vec::new(),
        };
        script.push(first, "");
        script
    }

    /// Ends a step: records every status as it now is.
    fn push(&mut self, mut step: Step, label: &str) {
        step.label = label.into();
        step.expect_status = std::iter::once((self.bulk.id.clone(), self.bulk.status.clone()))
            .chain(
                self.bulk
                    .items
                    .iter()
                    .map(|i| (self.key_of(&i.id), i.status.clone())),
            )
            .collect();
        self.steps.push(step);
    }

    /// The id cancelwatch records the item `id` under.
    fn key_of(&self, id: &str) -> String {
        let item = self.bulk.item(id).expect("an item of this bulk transfer");
        item_key(&self.bulk.id, item, self.ids)
    }

    fn step(&mut self, label: &str, status: Option<&str>, items: &[(String, &str)]) {
        let moves: Vec<(String, String)> = items
            .iter()
            .map(|(id, to)| (id.clone(), to.to_string()))
            .collect();
        self.bulk.apply(status, &moves);
        let mut deliveries = Vec::new();
        if status == Some("cancelled") {
            deliveries.push(Delivery::juice(
                self.key,
                "bulk_transfer.cancelled",
                bulk_json(&self.bulk, self.ids),
            ));
        }
        for (id, to) in &moves {
            let Some(item) = self.bulk.item(id) else {
                continue;
            };
            deliveries.push(match to.as_str() {
                "cancelled" => Delivery::juice(
                    self.key,
                    "bulk_transfer.transfer.cancelled",
                    item_event_data(&self.bulk.id, item, self.ids),
                ),
                "completed" => completed_delivery(self.key, &self.bulk.id, item, self.ids),
                _ => reversed_delivery(self.key, &self.bulk.id, item, self.ids),
            });
        }
        let change = Change::Bulk {
            id: self.bulk.id.clone(),
            status: status.map(str::to_string),
            items: moves,
        };
        let step = Step {
            label: String::new(),
            changes: vec![change],
            deliveries,
            expect_status: Vec::new(),
        };
        self.push(step, label);
    }
}

fn item_history(bulk: &str, item: &str, statuses: &[&str]) -> ExpectedHistory {
    history(TRANSFER, item, Some(bulk), statuses)
}

fn ids(bulk: &BulkTransfer) -> Vec<String> {
    bulk.items.iter().map(|i| i.id.clone()).collect()
}

fn juice_partial_cancellation(key: &str, item_ids: bool) -> Scenario {
    let bulk = BulkTransfer::new(
        "executing",
        vec![
            BulkItem::new(1_000, "NGN", "pending", 1),
            BulkItem::new(2_000, "NGN", "pending", 2),
            BulkItem::new(3_000, "NGN", "processing", 3),
            BulkItem::new(4_000, "NGN", "completed", 4),
        ],
    );
    let bulk_id = bulk.id.clone();
    let [a, b, c, d] = <[String; 4]>::try_from(ids(&bulk)).expect("four items");
    let mut script = JuiceScript::new(key, item_ids, bulk);
    let [ka, kb, kc, kd] = [&a, &b, &c, &d].map(|i| script.key_of(i));
    script.steps[0].label = "executing".into();
    script.step(
        "cancel",
        Some("cancelled"),
        &[(a.clone(), "cancelled"), (b.clone(), "cancelled")],
    );
    script.step("in-flight settles", None, &[(c.clone(), "completed")]);
    script.step(
        "reversals",
        None,
        &[(a.clone(), "reversed"), (b.clone(), "reversed")],
    );
    Scenario {
        name: "juice_partial_cancellation".into(),
        description: "A Juice bulk transfer is cancelled while one transfer is in flight and one \
                      is done: two are cancelled and reversed, two pay out."
            .into(),
        steps: script.steps,
        expect: Expectation {
            histories: vec![
                history(BULK_TRANSFER, &bulk_id, None, &["executing", "cancelled"]),
                item_history(&bulk_id, &ka, &["pending", "cancelled", "reversed"]),
                item_history(&bulk_id, &kb, &["pending", "cancelled", "reversed"]),
                item_history(&bulk_id, &kc, &["processing", "completed"]),
                item_history(&bulk_id, &kd, &["completed"]),
            ],
            refunds: vec![refund(&ka, 1_000, "NGN"), refund(&kb, 2_000, "NGN")],
            alerts: vec![("partial_cancellation".into(), bulk_id)],
        },
    }
}

fn juice_clean_cancellation(key: &str, item_ids: bool) -> Scenario {
    let bulk = BulkTransfer::new(
        "created",
        vec![
            BulkItem::new(1_500, "USD", "pending", 1),
            BulkItem::new(2_500, "USD", "pending", 2),
            BulkItem::new(3_500, "USD", "pending", 3),
        ],
    );
    let bulk_id = bulk.id.clone();
    let items = ids(&bulk);
    let amounts: Vec<i64> = bulk.items.iter().map(|i| i.amount).collect();
    let mut script = JuiceScript::new(key, item_ids, bulk);
    let keys: Vec<String> = items.iter().map(|i| script.key_of(i)).collect();
    script.steps[0].label = "created".into();
    let cancel: Vec<(String, &str)> = items.iter().map(|i| (i.clone(), "cancelled")).collect();
    script.step("cancel", Some("cancelled"), &cancel);
    let reverse: Vec<(String, &str)> = items.iter().map(|i| (i.clone(), "reversed")).collect();
    script.step("reversals", None, &reverse);
    let mut histories = vec![history(
        BULK_TRANSFER,
        &bulk_id,
        None,
        &["created", "cancelled"],
    )];
    histories.extend(
        keys.iter()
            .map(|i| item_history(&bulk_id, i, &["pending", "cancelled", "reversed"])),
    );
    Scenario {
        name: "juice_clean_cancellation".into(),
        description: "A Juice bulk transfer is cancelled before any transfer started: every \
                      transfer is cancelled and reversed."
            .into(),
        steps: script.steps,
        expect: Expectation {
            histories,
            refunds: keys
                .iter()
                .zip(amounts)
                .map(|(i, amount)| refund(i, amount, "USD"))
                .collect(),
            alerts: Vec::new(),
        },
    }
}

/// The event types a scenario's deliveries carry, for display.
pub fn event_types(step: &Step) -> Vec<String> {
    step.deliveries
        .iter()
        .map(|d| d.event_type().to_string())
        .collect()
}

/// The data of a Juice delivery, or the thin event of a Stripe one.
pub fn payload(d: &Delivery) -> &Value {
    match d.provider {
        super::deliver::Provider::Stripe => &d.body,
        super::deliver::Provider::Juice => &d.body["data"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_builds_with_unique_ids() {
        for (name, ids) in NAMES.iter().flat_map(|n| [(n, false), (n, true)]) {
            let a = build(name, "biz", ids).unwrap();
            let b = build(name, "biz", ids).unwrap();
            assert_eq!(a.name, *name);
            assert!(!a.steps.is_empty());
            assert_ne!(a.expect.histories[0].id, b.expect.histories[0].id);
            let last = a.steps.last().unwrap();
            for h in &a.expect.histories {
                let (_, status) = last
                    .expect_status
                    .iter()
                    .find(|(id, _)| id == &h.id)
                    .unwrap();
                assert_eq!(Some(status), h.statuses.last(), "{name} {}", h.id);
            }
        }
        assert!(build("nope", "biz", false).is_none());
    }

    #[test]
    fn juice_partial_steps() {
        let s = build("juice_partial_cancellation", "biz", false).unwrap();
        let labels: Vec<&str> = s.steps.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(
            labels,
            vec!["executing", "cancel", "in-flight settles", "reversals"]
        );
        assert_eq!(
            event_types(&s.steps[1]),
            vec![
                "bulk_transfer.cancelled",
                "bulk_transfer.transfer.cancelled",
                "bulk_transfer.transfer.cancelled"
            ]
        );
        let bulk = payload(&s.steps[1].deliveries[0]);
        assert_eq!(bulk["status"], "cancelled");
        assert_eq!(bulk["items"][2]["status"], "processing");
        let item = payload(&s.steps[1].deliveries[1]);
        assert_eq!(item["bulk_transfer_id"], bulk["id"]);
        // The documented shape: items have a reference and no id.
        assert!(item.get("id").is_none());
        assert!(bulk["items"][0].get("id").is_none());
        let reference = bulk["items"][0]["reference"].as_str().unwrap();
        let key = format!("{}:{reference}", bulk["id"].as_str().unwrap());
        assert_eq!(s.expect.histories[1].id, key);
        let with_ids = build("juice_partial_cancellation", "biz", true).unwrap();
        let bulk = payload(&with_ids.steps[1].deliveries[0]);
        assert_eq!(with_ids.expect.histories[1].id, bulk["items"][0]["id"]);
        assert_eq!(event_types(&s.steps[3]).len(), 2);
        assert_eq!(s.expect.alerts[0].0, "partial_cancellation");
    }
}
