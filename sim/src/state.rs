//! The simulated providers' objects, their state machines and their JSON
//! shapes (Stripe's and Juice's API references), plus the world that holds them.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

use crate::time::fmt;

pub const OUTBOUND_TRANSFER_OBJECT: &str = "v2.money_management.outbound_transfer";
pub const BATCH_JOB_OBJECT: &str = "v2.core.batch_job";
/// The account context every simulated Stripe event carries.
pub const STRIPE_CONTEXT: &str = "acct_sim";

/// A fresh id: `prefix` + 24 random hex characters.
pub fn new_id(prefix: &str) -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &hex[..24])
}

/// A fresh UUID, as Juice uses for bulk transfers and their items.
pub fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Juice's zone-less timestamp form: `2024-10-02T17:39:26.049258`.
pub fn juice_time(t: DateTime<Utc>) -> String {
    t.naive_utc().format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// The GET path of an outbound transfer.
pub fn outbound_transfer_path(id: &str) -> String {
    format!("/v2/money_management/outbound_transfers/{id}")
}

/// The GET path of a batch job.
pub fn batch_job_path(id: &str) -> String {
    format!("/v2/core/batch_jobs/{id}")
}

/// A Stripe thin event notification (Stripe's v2 API reference) about one object.
pub fn thin_event(event_type: &str, object_type: &str, object_id: &str, url: &str) -> Value {
    json!({
        "id": new_id("evt_sim_"),
        "object": "v2.core.event",
        "type": event_type,
        "created": fmt(Utc::now()),
        "livemode": false,
        "context": STRIPE_CONTEXT,
        "related_object": {"id": object_id, "type": object_type, "url": url},
    })
}

/// Adds the `reason` of an event caused by an API request.
pub fn with_request_reason(mut event: Value, idempotency_key: Option<&str>) -> Value {
    event["reason"] = json!({
        "type": "request",
        "request": {"id": new_id("req_sim_"), "idempotency_key": idempotency_key},
    });
    event
}

/// A Stripe v2 OutboundTransfer.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboundTransfer {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub cancelable: bool,
    pub created: DateTime<Utc>,
    pub canceled_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub posted_at: Option<DateTime<Utc>>,
    pub returned_at: Option<DateTime<Utc>>,
    /// `status_details.<status>.reason` for `returned` and `failed`.
    pub reason: Option<String>,
    /// The lost race: a cancel request through the API posts the transfer first
    /// and is then refused as not cancelable.
    pub posts_on_cancel: bool,
    /// `from.debited` when the financial account pays in another currency
    /// than `amount` is presented in; otherwise it equals `amount`.
    pub debited: Option<(i64, String)>,
}

impl OutboundTransfer {
    /// A new transfer in `processing`, cancelable.
    pub fn new(amount: i64, currency: &str) -> Self {
        Self {
            id: new_id("obt_sim_"),
            amount,
            currency: currency.to_string(),
            status: "processing".into(),
            cancelable: true,
            created: Utc::now(),
            canceled_at: None,
            failed_at: None,
            posted_at: None,
            returned_at: None,
            reason: None,
            posts_on_cancel: false,
            debited: None,
        }
    }

    /// Whether Stripe moves an outbound transfer from `from` to `to`.
    pub fn allowed(from: &str, to: &str) -> bool {
        matches!(
            (from, to),
            ("processing", "posted" | "failed" | "canceled") | ("posted", "returned")
        )
    }

    /// Moves to `to` when that is a legal step, stamping its transition time.
    /// Returns whether anything changed.
    pub fn advance(&mut self, to: &str, reason: Option<&str>) -> bool {
        if !Self::allowed(&self.status, to) {
            return false;
        }
        let now = Some(Utc::now());
        match to {
            "posted" => self.posted_at = now,
            "failed" => self.failed_at = now,
            "canceled" => self.canceled_at = now,
            "returned" => self.returned_at = now,
            _ => {}
        }
        self.status = to.to_string();
        self.cancelable = false;
        self.reason = reason.map(str::to_string);
        true
    }

    /// The object as `GET /v2/money_management/outbound_transfers/{id}` answers.
    pub fn to_json(&self) -> Value {
        let money = json!({"value": self.amount, "currency": self.currency});
        let debited = match &self.debited {
            Some((value, currency)) => json!({"value": value, "currency": currency}),
            None => money.clone(),
        };
        let details = match (self.status.as_str(), &self.reason) {
            (status @ ("returned" | "failed"), Some(reason)) => {
                json!({ status: {"reason": reason} })
            }
            _ => json!({}),
        };
        let trace_status = if self.status == "posted" || self.status == "returned" {
            "supported"
        } else {
            "pending"
        };
        json!({
            "id": self.id,
            "object": OUTBOUND_TRANSFER_OBJECT,
            "amount": money,
            "cancelable": self.cancelable,
            "created": fmt(self.created),
            "delivery_options": {"bank_account": "automatic"},
            "description": "cancelwatch simulator transfer",
            "expected_arrival_date": fmt(self.created + Duration::days(2)),
            "from": {"financial_account": "fa_sim_main", "debited": debited},
            "to": {"payout_method": "usba_sim_payee", "credited": money},
            "livemode": false,
            "metadata": {},
            "receipt_url": format!("https://payments.stripe.com/sim/receipts/{}", self.id),
            "statement_descriptor": "CANCELWATCH SIM",
            "status": self.status,
            "status_details": details,
            "status_transitions": {
                "canceled_at": self.canceled_at.map(fmt),
                "failed_at": self.failed_at.map(fmt),
                "posted_at": self.posted_at.map(fmt),
                "returned_at": self.returned_at.map(fmt),
            },
            "trace_id": {"status": trace_status, "value": null},
        })
    }
}

/// A Stripe v2 BatchJob.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchJob {
    pub id: String,
    pub status: String,
    pub success_count: i64,
    pub failure_count: i64,
    pub validated_count: i64,
    pub created: DateTime<Utc>,
}

impl BatchJob {
    /// A new job in `status` with no records processed yet.
    pub fn new(status: &str) -> Self {
        Self {
            id: new_id("batchv2_sim_"),
            status: status.to_string(),
            success_count: 0,
            failure_count: 0,
            validated_count: 0,
            created: Utc::now(),
        }
    }

    fn rank(status: &str) -> u8 {
        match status {
            "ready_for_upload" => 0,
            "validating" => 1,
            "in_progress" => 2,
            "cancelling" => 3,
            _ => 4,
        }
    }

    /// Whether a job can be cancelled in its current status.
    pub fn cancellable(&self) -> bool {
        matches!(
            self.status.as_str(),
            "ready_for_upload" | "validating" | "in_progress"
        )
    }

    /// Moves forward to `to` (never backwards, never out of a final status),
    /// taking the given (success, failure) counts. Returns whether it moved.
    pub fn advance(&mut self, to: &str, counts: Option<(i64, i64)>) -> bool {
        if Self::rank(to) <= Self::rank(&self.status) {
            return false;
        }
        if Self::rank(&self.status) == 3 && to != "canceled" {
            return false;
        }
        self.status = to.to_string();
        if let Some((success, failure)) = counts {
            self.success_count = success;
            self.failure_count = failure;
        }
        true
    }

    /// The object as `GET /v2/core/batch_jobs/{id}` answers; counts are strings.
    pub fn to_json(&self) -> Value {
        let counts = json!({
            "success_count": self.success_count.to_string(),
            "failure_count": self.failure_count.to_string(),
        });
        let detail = match self.status.as_str() {
            "ready_for_upload" => json!({"upload_url": {
                "url": format!("https://files.stripe.com/sim/upload/{}", self.id),
                "expires_at": fmt(self.created + Duration::hours(1)),
            }}),
            "validating" => json!({"validated_count": self.validated_count.to_string()}),
            "batch_failed" => json!({"error": "the simulated batch failed"}),
            _ => counts,
        };
        json!({
            "id": self.id,
            "object": BATCH_JOB_OBJECT,
            "created": fmt(self.created),
            "livemode": false,
            "metadata": {},
            "maximum_rps": 10,
            "skip_validation": false,
            "status": self.status,
            "status_details": { self.status.clone(): detail },
        })
    }
}

/// One transfer (item) of a Juice bulk transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkItem {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub reference: String,
    pub created_at: DateTime<Utc>,
}

impl BulkItem {
    /// A new item in `status`.
    pub fn new(amount: i64, currency: &str, status: &str, n: usize) -> Self {
        Self {
            id: new_uuid(),
            amount,
            currency: currency.to_string(),
            status: status.to_string(),
            reference: format!("sim-item-{n}-{}", &new_uuid()[..8]),
            created_at: Utc::now(),
        }
    }

    /// Whether an item moves from `from` to `to`.
    pub fn allowed(from: &str, to: &str) -> bool {
        matches!(
            (from, to),
            (
                "pending",
                "processing" | "cancelled" | "completed" | "failed"
            ) | ("processing", "completed" | "failed")
                | ("cancelled", "reversed" | "refunded")
        )
    }

    /// The item as it appears in `items`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "amount": self.amount,
            "currency": self.currency,
            "beneficiary": {
                "type": "bank_account",
                "account_name": "Sim Payee",
                "account_number": "0000000000",
                "bank_code": "000",
            },
            "reference": self.reference,
            "status": self.status,
            "created_at": juice_time(self.created_at),
        })
    }

    /// The item with its bulk transfer's id, as per-transfer events carry it.
    pub fn event_data(&self, bulk_id: &str) -> Value {
        let mut v = self.to_json();
        v["bulk_transfer_id"] = json!(bulk_id);
        v
    }
}

/// What a cancel request did to a bulk transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkCancel {
    pub cancelled: Vec<String>,
    pub not_cancelled: Vec<String>,
}

/// A cancel of a bulk transfer that is not in a cancellable status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCancellable;

/// A Juice bulk transfer with its items.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkTransfer {
    pub id: String,
    pub reference: String,
    pub status: String,
    pub items: Vec<BulkItem>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl BulkTransfer {
    /// A new bulk transfer in `status` with the given items.
    pub fn new(status: &str, items: Vec<BulkItem>) -> Self {
        let now = Utc::now();
        Self {
            id: new_uuid(),
            reference: format!("sim-bulk-{}", &new_uuid()[..8]),
            status: status.to_string(),
            items,
            created_at: now,
            updated_at: now,
        }
    }

    fn bulk_allowed(from: &str, to: &str) -> bool {
        match from {
            "created" => to != "created",
            "executing" => to != "created" && to != "executing",
            _ => false,
        }
    }

    fn touch(&mut self) {
        let now = Utc::now();
        self.updated_at = if now > self.updated_at {
            now
        } else {
            self.updated_at + Duration::microseconds(1)
        };
    }

    /// The item with this id.
    pub fn item(&self, id: &str) -> Option<&BulkItem> {
        self.items.iter().find(|i| i.id == id)
    }

    /// Applies a scripted change: the bulk status (if given and legal) and
    /// item statuses (each if legal). Returns whether anything changed.
    pub fn apply(&mut self, status: Option<&str>, items: &[(String, String)]) -> bool {
        let mut changed = false;
        if let Some(to) = status {
            if Self::bulk_allowed(&self.status, to) {
                self.status = to.to_string();
                changed = true;
            }
        }
        for (id, to) in items {
            if let Some(item) = self.items.iter_mut().find(|i| &i.id == id) {
                if BulkItem::allowed(&item.status, to) {
                    item.status = to.clone();
                    changed = true;
                }
            }
        }
        if changed {
            self.touch();
        }
        changed
    }

    /// The cancel endpoint's semantics (Juice's API reference): the batch becomes
    /// `cancelled`, pending items `cancelled`; the others stay as they are.
    /// Fails when the bulk transfer is not in a cancellable status.
    pub fn cancel(&mut self) -> Result<BulkCancel, NotCancellable> {
        if !matches!(self.status.as_str(), "created" | "executing") {
            return Err(NotCancellable);
        }
        self.status = "cancelled".into();
        let mut outcome = BulkCancel {
            cancelled: Vec::new(),
            not_cancelled: Vec::new(),
        };
        for item in &mut self.items {
            if item.status == "pending" {
                item.status = "cancelled".into();
                outcome.cancelled.push(item.id.clone());
            } else {
                outcome.not_cancelled.push(item.id.clone());
            }
        }
        self.touch();
        Ok(outcome)
    }

    fn count(&self, status: &str) -> usize {
        self.items.iter().filter(|i| i.status == status).count()
    }

    /// The object as `GET /bulk-transfers/{id}` answers inside `data`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "reference": self.reference,
            "description": "cancelwatch simulator bulk transfer",
            "status": self.status,
            "total_transfer_count": self.items.len(),
            "successful_transfer_count": self.count("completed"),
            "failed_transfer_count": self.count("failed"),
            "items": self.items.iter().map(BulkItem::to_json).collect::<Vec<_>>(),
            "metadata": {},
            "owner": {"id": "sim-business", "type": "business"},
            "created_at": juice_time(self.created_at),
            "updated_at": juice_time(self.updated_at),
            "expires_at": juice_time(self.created_at + Duration::days(1)),
        })
    }
}

/// A scripted state change of one step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    /// Put a new outbound transfer in place (no-op when it exists).
    NewTransfer(OutboundTransfer),
    /// Move an outbound transfer to a status (no-op when illegal).
    Transfer {
        id: String,
        status: String,
        reason: Option<String>,
    },
    NewBatchJob(BatchJob),
    BatchJob {
        id: String,
        status: String,
        counts: Option<(i64, i64)>,
    },
    NewBulk(BulkTransfer),
    Bulk {
        id: String,
        status: Option<String>,
        items: Vec<(String, String)>,
    },
}

/// A Stripe event as stored for `GET /v2/core/events`.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub created: DateTime<Utc>,
    pub body: Value,
}

/// A remembered answer to an `Idempotency-Key`.
#[derive(Debug, Clone)]
pub struct IdempotentAnswer {
    pub path: String,
    pub status: u16,
    pub body: Value,
}

/// Everything the simulated providers hold.
#[derive(Debug, Default)]
pub struct World {
    pub transfers: HashMap<String, OutboundTransfer>,
    pub batch_jobs: HashMap<String, BatchJob>,
    /// In creation order (the list endpoint pages through it).
    pub bulks: Vec<BulkTransfer>,
    /// Every Stripe event ever generated, oldest first.
    pub events: Vec<StoredEvent>,
    /// Their ids, to record each once without a scan.
    pub event_ids: HashSet<String>,
    /// Juice deliveries generated (event + checksum), to count them once.
    pub juice_events: HashSet<String>,
    pub idempotency: HashMap<String, IdempotentAnswer>,
}

impl World {
    /// Applies a scripted change; returns whether the state changed.
    pub(crate) fn apply(&mut self, change: &Change) -> bool {
        match change {
            Change::NewTransfer(t) => {
                if self.transfers.contains_key(&t.id) {
                    return false;
                }
                self.transfers.insert(t.id.clone(), t.clone());
                true
            }
            Change::Transfer { id, status, reason } => self
                .transfers
                .get_mut(id)
                .is_some_and(|t| t.advance(status, reason.as_deref())),
            Change::NewBatchJob(j) => {
                if self.batch_jobs.contains_key(&j.id) {
                    return false;
                }
                self.batch_jobs.insert(j.id.clone(), j.clone());
                true
            }
            Change::BatchJob { id, status, counts } => self
                .batch_jobs
                .get_mut(id)
                .is_some_and(|j| j.advance(status, *counts)),
            Change::NewBulk(b) => {
                if self.bulk(&b.id).is_some() {
                    return false;
                }
                let mut b = b.clone();
                b.touch();
                self.bulks.push(b);
                true
            }
            Change::Bulk { id, status, items } => self
                .bulk_mut(id)
                .is_some_and(|b| b.apply(status.as_deref(), items)),
        }
    }

    pub fn bulk(&self, id: &str) -> Option<&BulkTransfer> {
        self.bulks.iter().find(|b| b.id == id)
    }

    pub fn bulk_mut(&mut self, id: &str) -> Option<&mut BulkTransfer> {
        self.bulks.iter_mut().find(|b| b.id == id)
    }

    /// Stores a Stripe event for the events API (once per id).
    pub fn record_stripe_event(&mut self, body: &Value) {
        let id = body["id"].as_str().unwrap_or_default();
        if !self.event_ids.insert(id.to_string()) {
            return;
        }
        let created = body["created"]
            .as_str()
            .and_then(crate::time::parse)
            .unwrap_or_else(Utc::now);
        self.events.push(StoredEvent {
            created,
            body: body.clone(),
        });
    }

    /// Counts a Juice delivery (once per event + data).
    pub fn record_juice_event(&mut self, event: &str, data: &Value) {
        self.juice_events
            .insert(crate::signing::juice_message(event, data));
    }

    /// The Stripe event with this id.
    pub fn event(&self, id: &str) -> Option<&Value> {
        self.events
            .iter()
            .find(|e| e.body["id"] == id)
            .map(|e| &e.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_transfer_state_machine() {
        let mut t = OutboundTransfer::new(12_500, "usd");
        assert!(t.cancelable);
        assert!(!t.advance("returned", None), "processing cannot return");
        assert!(t.advance("posted", None));
        assert!(!t.cancelable);
        assert!(t.posted_at.is_some());
        assert!(!t.advance("canceled", None), "posted cannot be canceled");
        assert!(t.advance("returned", Some("account_closed")));
        let v = t.to_json();
        assert_eq!(v["status"], "returned");
        assert_eq!(v["status_details"]["returned"]["reason"], "account_closed");
        assert!(v["status_transitions"]["returned_at"].is_string());
        assert!(v["status_transitions"]["canceled_at"].is_null());
        assert_eq!(v["amount"], json!({"value": 12_500, "currency": "usd"}));
        assert!(!t.advance("posted", None), "returned is final");
    }

    #[test]
    fn batch_job_only_moves_forward() {
        let mut j = BatchJob::new("in_progress");
        assert!(j.cancellable());
        assert!(!j.advance("validating", None));
        assert!(j.advance("cancelling", Some((30, 2))));
        assert!(!j.cancellable());
        assert!(
            !j.advance("complete", None),
            "cancelling only ends canceled"
        );
        assert!(j.advance("canceled", None));
        let v = j.to_json();
        assert_eq!(v["status_details"]["canceled"]["success_count"], "30");
        assert_eq!(v["status_details"]["canceled"]["failure_count"], "2");
        assert_eq!(v["status_details"].as_object().unwrap().len(), 1);
        assert!(!j.advance("cancelling", None));
    }

    #[test]
    fn bulk_cancel_semantics() {
        let items = vec![
            BulkItem::new(1000, "NGN", "pending", 1),
            BulkItem::new(3000, "NGN", "processing", 2),
            BulkItem::new(4000, "NGN", "completed", 3),
        ];
        let mut b = BulkTransfer::new("executing", items);
        let before = b.updated_at;
        let outcome = b.cancel().unwrap();
        assert_eq!(outcome.cancelled, vec![b.items[0].id.clone()]);
        assert_eq!(outcome.not_cancelled.len(), 2);
        assert_eq!(b.status, "cancelled");
        assert_eq!(b.items[1].status, "processing");
        assert!(b.updated_at > before);
        assert_eq!(b.cancel(), Err(NotCancellable));
        let second = b.items[1].id.clone();
        let first = b.items[0].id.clone();
        assert!(b.apply(
            None,
            &[
                (second.clone(), "completed".into()),
                (first.clone(), "reversed".into())
            ]
        ));
        assert!(!b.apply(Some("executing"), &[(first, "pending".into())]));
        let v = b.to_json();
        assert_eq!(v["successful_transfer_count"], 2);
        assert_eq!(v["items"][0]["status"], "reversed");
        assert!(!v["updated_at"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn world_records_each_event_once() {
        let mut w = World::default();
        let e = thin_event("t", "o", "obj", "/v2/x");
        w.record_stripe_event(&e);
        w.record_stripe_event(&e);
        assert_eq!(w.events.len(), 1);
        assert!(w.event(e["id"].as_str().unwrap()).is_some());
    }
}
