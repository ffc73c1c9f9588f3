//! Webhook bodies and signatures as the providers make them.

use cancelwatch::providers::{juice::checksum, stripe::signature};
use serde_json::{json, Value};

/// A real Stripe thin event (`v2.money_management.outbound_transfer.posted`).
pub const STRIPE_FIXTURE: &[u8] =
    include_bytes!("../../fixtures/stripe/thin_outbound_transfer_posted.json");

/// A `Stripe-Signature` header for `body`, made now with `secret`.
pub fn signed_now(secret: &str, body: &[u8]) -> String {
    signature::sign_header(secret, chrono::Utc::now().timestamp(), body)
}

/// A Stripe thin event `id` announcing that `obt_1` was canceled.
pub fn thin_event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "object": "v2.core.event",
        "type": "v2.money_management.outbound_transfer.canceled",
        "created": "2026-10-30T12:00:00.000Z",
        "livemode": false,
        "context": "acct_123",
        "related_object": {"id": "obt_1", "type": "v2.money_management.outbound_transfer",
                           "url": "/v2/money_management/outbound_transfers/obt_1"}
    }))
    .unwrap()
}

/// A Juice delivery of `event` about `data`, its checksum made with `key`.
pub fn juice_body(event: &str, data: Value, key: &str) -> Vec<u8> {
    let sum = checksum::sign(key, event, &data);
    serde_json::to_vec(&json!({"checksum": sum, "event": event, "data": data})).unwrap()
}
