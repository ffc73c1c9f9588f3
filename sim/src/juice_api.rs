//! The simulated Juice bulk-transfers API (Juice's API reference).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::state::{BulkItem, BulkTransfer, World};
use super::{ApiError, Delivery, Shared};

/// How long after a cancel the in-flight items settle and the cancelled ones
/// are reversed.
const SETTLE_DELAY: Duration = Duration::from_millis(300);
const DEFAULT_PAGE: usize = 20;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/bulk-transfers", get(list))
        .route("/bulk-transfers/{id}", get(get_one))
        .route("/bulk-transfers/{id}/cancel", post(cancel))
}

/// An item as Juice's API reference shows it: `amount`, `beneficiary`,
/// `status`, `created_at`, `reference` and no `id`, its currency (none is
/// documented) as `source_currency` and `destination_currency`, which
/// answers may carry. With `ids`, the item's UUID (by which Juice addresses
/// it elsewhere) is served too. An item whose reference or currency is
/// empty is served without it.
pub(crate) fn item_json(item: &BulkItem, ids: bool) -> Value {
    let mut v = item.to_json();
    if let Some(fields) = v.as_object_mut() {
        fields.remove("currency");
        if !item.currency.is_empty() {
            fields.insert("source_currency".into(), json!(item.currency));
            fields.insert("destination_currency".into(), json!(item.currency));
        }
        if !ids {
            fields.remove("id");
        }
        if item.reference.is_empty() {
            fields.remove("reference");
        }
    }
    v
}

/// A bulk transfer as `GET /bulk-transfers/{id}` answers inside `data`,
/// its items shaped by [`item_json`].
pub(crate) fn bulk_json(bulk: &BulkTransfer, ids: bool) -> Value {
    let mut v = bulk.to_json();
    v["items"] = bulk.items.iter().map(|i| item_json(i, ids)).collect();
    v
}

/// What a per-transfer event carries: the item as served, with its bulk
/// transfer's id.
pub(crate) fn item_event_data(bulk_id: &str, item: &BulkItem, ids: bool) -> Value {
    let mut v = item_json(item, ids);
    v["bulk_transfer_id"] = json!(bulk_id);
    v
}

/// The id cancelwatch records an item under: its `id` when Juice serves
/// one, else `<bulk transfer id>:<reference>`.
pub fn item_key(bulk_id: &str, item: &BulkItem, ids: bool) -> String {
    if ids {
        item.id.clone()
    } else {
        format!("{bulk_id}:{}", item.reference)
    }
}

/// A Juice error: `{"error":{"code","message","type","details"}}`.
pub(crate) fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    kind: &str,
    details: Value,
) -> ApiError {
    ApiError {
        status,
        body: json!({"error": {"code": code, "message": message, "type": kind, "details": details}}),
    }
}

/// A Juice 429, with `retry_after` in the body.
pub(crate) fn rate_limited(retry_after_secs: u64) -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        Json(json!({
            "error": {
                "code": "rate_limit_exceeded",
                "message": "Too many requests",
                "type": "rate_limit_error",
                "details": {"retry_after": retry_after_secs},
            },
            "retry_after": retry_after_secs,
        })),
    )
        .into_response()
}

/// Accepts `Authorization: <key>` and `Authorization: Bearer <key>`.
fn check(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let key = &shared.cfg.juice_api_key;
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let raw = given.strip_prefix("Bearer ").unwrap_or(given);
    if given.is_empty() || raw != key {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Invalid or missing API key",
            "authentication_error",
            json!({}),
        ));
    }
    Ok(())
}

fn not_found(id: &str) -> ApiError {
    error(
        StatusCode::NOT_FOUND,
        "bulk_transfer_not_found",
        &format!("Bulk transfer {id} not found"),
        "invalid_request_error",
        json!({}),
    )
}

async fn get_one(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&s, &headers) {
        return r.into_response();
    }
    let ids = s.juice_item_ids();
    match s.world().bulk(&id) {
        Some(b) => Json(json!({"data": bulk_json(b, ids)})).into_response(),
        None => not_found(&id).into_response(),
    }
}

/// `GET /bulk-transfers?status=&after=&limit=`, oldest first; `after` is the
/// id of the last bulk transfer of the previous page.
async fn list(
    State(s): State<Arc<Shared>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&s, &headers) {
        return r.into_response();
    }
    let limit = match params.get("limit").map(|l| l.parse::<usize>()) {
        None => DEFAULT_PAGE,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "validation_error",
                "limit must be 1 to 100",
                "invalid_request_error",
                json!({"field": "limit"}),
            )
            .into_response()
        }
    };
    let status = params.get("status").filter(|s| !s.is_empty());
    let world = s.world();
    let start = match params.get("after").filter(|a| !a.is_empty()) {
        Some(after) => match world.bulks.iter().position(|b| &b.id == after) {
            Some(i) => i + 1,
            None => return not_found(after).into_response(),
        },
        None => 0,
    };
    let mut page: Vec<_> = world.bulks[start..]
        .iter()
        .filter(|b| status.map_or(true, |s| &b.status == s))
        .take(limit + 1)
        .collect();
    let has_more = page.len() > limit;
    page.truncate(limit);
    let after = page.last().filter(|_| has_more).map(|b| b.id.clone());
    let ids = s.juice_item_ids();
    let data: Vec<Value> = page.iter().map(|b| bulk_json(b, ids)).collect();
    Json(json!({"data": data, "pagination": {"after": after, "has_more": has_more}}))
        .into_response()
}

async fn cancel(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&s, &headers) {
        return r.into_response();
    }
    let key = s.cfg.juice_checksum_key.clone();
    let ids = s.juice_item_ids();
    let (response, deliveries) = {
        let mut world = s.world();
        match cancel_in(&mut world, &id, &key, ids) {
            Ok(done) => done,
            Err(r) => return r.into_response(),
        }
    };
    s.send_in_background(deliveries);
    let shared = s.clone();
    s.spawn(async move {
        tokio::time::sleep(SETTLE_DELAY).await;
        let deliveries = {
            let mut world = shared.world();
            settle_in(&mut world, &id, &key, ids)
        };
        shared.send_in_background(deliveries);
    });
    response
}

/// Cancels under the lock: the answer and the deliveries it causes.
fn cancel_in(
    world: &mut World,
    id: &str,
    key: &str,
    ids: bool,
) -> Result<(Response, Vec<Delivery>), ApiError> {
    let Some(bulk) = world.bulk_mut(id) else {
        return Err(not_found(id));
    };
    let Ok(outcome) = bulk.cancel() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_state",
            &format!(
                "Bulk transfer in status {} cannot be cancelled",
                bulk.status
            ),
            "invalid_request_error",
            json!({"status": bulk.status}),
        ));
    };
    let bulk = bulk.clone();
    let not_cancelled: Vec<String> = outcome
        .not_cancelled
        .iter()
        .filter_map(|i| bulk.item(i))
        .map(|i| {
            if ids {
                i.id.clone()
            } else {
                i.reference.clone()
            }
        })
        .collect();
    let mut deliveries = vec![Delivery::juice(
        key,
        "bulk_transfer.cancelled",
        bulk_json(&bulk, ids),
    )];
    for item_id in &outcome.cancelled {
        if let Some(item) = bulk.item(item_id) {
            deliveries.push(Delivery::juice(
                key,
                "bulk_transfer.transfer.cancelled",
                item_event_data(&bulk.id, item, ids),
            ));
        }
    }
    for d in &deliveries {
        world.record_delivery(d);
    }
    let response = if outcome.not_cancelled.is_empty() {
        Json(json!({"data": bulk_json(&bulk, ids)})).into_response()
    } else {
        error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "partial_cancellation",
            "Some transfers could not be cancelled; the others were",
            "invalid_request_error",
            json!({"bulk_transfer_id": bulk.id, "not_cancelled": not_cancelled}),
        )
        .into_response()
    };
    Ok((response, deliveries))
}

/// After a cancel: in-flight items complete, cancelled ones are reversed.
fn settle_in(world: &mut World, id: &str, key: &str, ids: bool) -> Vec<Delivery> {
    let Some(bulk) = world.bulk_mut(id) else {
        return Vec::new();
    };
    let mut moves = Vec::new();
    for item in &bulk.items {
        match item.status.as_str() {
            "processing" => moves.push((item.id.clone(), "completed".to_string())),
            "cancelled" => moves.push((item.id.clone(), "reversed".to_string())),
            _ => {}
        }
    }
    bulk.apply(None, &moves);
    let bulk = bulk.clone();
    let deliveries: Vec<Delivery> = moves
        .iter()
        .filter_map(|(item_id, to)| {
            let item = bulk.item(item_id)?;
            Some(if to == "completed" {
                completed_delivery(key, &bulk.id, item, ids)
            } else {
                reversed_delivery(key, &bulk.id, item, ids)
            })
        })
        .collect();
    for d in &deliveries {
        world.record_delivery(d);
    }
    deliveries
}

/// `bulk_transfer.transfer.completed` for one item.
pub(crate) fn completed_delivery(key: &str, bulk_id: &str, item: &BulkItem, ids: bool) -> Delivery {
    Delivery::juice(
        key,
        "bulk_transfer.transfer.completed",
        item_event_data(bulk_id, item, ids),
    )
}

/// `bulk_transfer.transfer.reversed` for one item.
pub(crate) fn reversed_delivery(key: &str, bulk_id: &str, item: &BulkItem, ids: bool) -> Delivery {
    Delivery::juice(
        key,
        "bulk_transfer.transfer.reversed",
        item_event_data(bulk_id, item, ids),
    )
}

#[cfg(test)]
mod tests {
    use super::super::state::{BulkItem, BulkTransfer};
    use super::*;

    #[test]
    fn partial_cancel_then_settle() {
        let mut w = World::default();
        let b = BulkTransfer::new(
            "executing",
            vec![
                BulkItem::new(1000, "NGN", "pending", 1),
                BulkItem::new(3000, "NGN", "processing", 2),
            ],
        );
        let id = b.id.clone();
        w.bulks.push(b);
        let (response, deliveries) = cancel_in(&mut w, &id, "biz", false).unwrap();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let events: Vec<&str> = deliveries.iter().map(|d| d.event_type()).collect();
        assert_eq!(
            events,
            vec![
                "bulk_transfer.cancelled",
                "bulk_transfer.transfer.cancelled"
            ]
        );
        assert_eq!(w.bulk(&id).unwrap().status, "cancelled");
        let again = cancel_in(&mut w, &id, "biz", false).err().unwrap();
        assert_eq!(again.status, StatusCode::BAD_REQUEST);
        let settled = settle_in(&mut w, &id, "biz", false);
        assert_eq!(settled.len(), 2);
        let statuses: Vec<&str> = w
            .bulk(&id)
            .unwrap()
            .items
            .iter()
            .map(|i| i.status.as_str())
            .collect();
        assert_eq!(statuses, vec!["reversed", "completed"]);
        assert_eq!(w.juice_events.len(), 4);
        assert!(cancel_in(&mut w, "nope", "biz", false).is_err());
    }
}
