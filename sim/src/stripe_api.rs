//! The simulated Stripe v2 API: outbound transfers, batch jobs and events
//! (Stripe's v2 API reference), with `Idempotency-Key` on the cancel calls.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::state::{
    batch_job_path, outbound_transfer_path, thin_event, with_request_reason, IdempotentAnswer,
    World, BATCH_JOB_OBJECT, OUTBOUND_TRANSFER_OBJECT,
};
use super::{ApiError, Delivery, Shared};

/// How long a cancelled batch job stays `cancelling` before it is `canceled`.
const BATCH_CANCEL_DELAY: Duration = Duration::from_millis(300);
const DEFAULT_PAGE: usize = 20;
const MAX_PAGE: usize = 100;

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/v2/money_management/outbound_transfers/{id}",
            get(get_transfer),
        )
        .route(
            "/v2/money_management/outbound_transfers/{id}/cancel",
            post(cancel_transfer),
        )
        .route("/v2/core/batch_jobs/{id}", get(get_batch_job))
        .route("/v2/core/batch_jobs/{id}/cancel", post(cancel_batch_job))
        .route("/v2/core/events", get(list_events))
        .route("/v2/core/events/{id}", get(get_event))
}

/// A Stripe error: `{"error":{"type","code","message"}}`.
pub(crate) fn error(status: StatusCode, kind: &str, code: &str, message: &str) -> ApiError {
    ApiError {
        status,
        body: json!({"error": {"type": kind, "code": code, "message": message}}),
    }
}

/// A Stripe v2 error named by its type alone (no `code`), as v2 names some.
pub(crate) fn typed_error(status: StatusCode, kind: &str, message: &str) -> ApiError {
    ApiError {
        status,
        body: json!({"error": {"type": kind, "message": message}}),
    }
}

fn invalid(status: StatusCode, code: &str, message: &str) -> ApiError {
    error(status, "invalid_request_error", code, message)
}

/// Checks the Bearer key and the `Stripe-Version` header.
fn check(shared: &Shared, headers: &HeaderMap) -> Result<(), ApiError> {
    let expected = format!("Bearer {}", shared.cfg.stripe_api_key);
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given.is_empty() || given != expected {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "Invalid API Key provided",
        ));
    }
    if headers.get("stripe-version").is_none() {
        return Err(invalid(
            StatusCode::BAD_REQUEST,
            "missing_stripe_version",
            "This preview API requires a Stripe-Version header",
        ));
    }
    Ok(())
}

/// Answers a GET of one object: its JSON, or Stripe's 404 naming `what`.
fn object_or_404(
    s: &Shared,
    headers: &HeaderMap,
    what: &str,
    id: &str,
    lookup: impl FnOnce(&World) -> Option<Value>,
) -> Response {
    if let Err(r) = check(s, headers) {
        return r.into_response();
    }
    match lookup(&s.world()) {
        Some(object) => Json(object).into_response(),
        None => invalid(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No such {what}: {id}"),
        )
        .into_response(),
    }
}

async fn get_transfer(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    object_or_404(&s, &headers, "outbound transfer", &id, |w| {
        w.transfers.get(&id).map(|t| t.to_json())
    })
}

async fn get_batch_job(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    object_or_404(&s, &headers, "batch job", &id, |w| {
        w.batch_jobs.get(&id).map(|j| j.to_json())
    })
}

async fn get_event(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let context = stripe_context(&headers);
    object_or_404(&s, &headers, "event", &id, |w| {
        w.event(&id)
            .filter(|e| in_context(e, context.as_deref()))
            .cloned()
    })
}

/// The account context a request asks for (`Stripe-Context`).
fn stripe_context(headers: &HeaderMap) -> Option<String> {
    headers
        .get("stripe-context")
        .and_then(|v| v.to_str().ok())
        .filter(|c| !c.is_empty())
        .map(str::to_string)
}

/// Whether an event belongs to the account context asked for: a connected
/// account's events are seen only with its `Stripe-Context`, the platform's
/// only without one.
fn in_context(event: &Value, context: Option<&str>) -> bool {
    event.get("context").and_then(Value::as_str) == context
}

/// The answer of one cancel call, and what it set in motion.
struct Outcome {
    status: StatusCode,
    body: Value,
    events: Vec<Value>,
    finish_batch_job: Option<String>,
}

impl Outcome {
    fn ok(body: Value, events: Vec<Value>) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            events,
            finish_batch_job: None,
        }
    }

    fn refused(status: StatusCode, code: &str, message: &str) -> Self {
        Self::refused_as(status, "invalid_request_error", code, message)
    }

    /// A refusal whose v2 error type names it (`already_canceled`, …).
    fn refused_as(status: StatusCode, kind: &str, code: &str, message: &str) -> Self {
        Self {
            status,
            body: json!({"error": {"type": kind, "code": code, "message": message}}),
            events: Vec::new(),
            finish_batch_job: None,
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty())
        .map(str::to_string)
}

/// Runs a cancel under the world lock, honouring `Idempotency-Key`: the same
/// key on the same path replays the first answer; on another path it is a 409.
async fn idempotent_cancel(
    s: Arc<Shared>,
    headers: HeaderMap,
    path: &str,
    run: impl FnOnce(&mut World, Option<&str>) -> Outcome,
) -> Response {
    if let Err(r) = check(&s, &headers) {
        return r.into_response();
    }
    let key = idempotency_key(&headers);
    let outcome = {
        let mut world = s.world();
        if let Some(k) = &key {
            if let Some(prior) = world.idempotency.get(k) {
                if prior.path != path {
                    return error(
                        StatusCode::CONFLICT,
                        "idempotency_error",
                        "idempotency_error",
                        "Keys for idempotent requests can only be used with the same parameters they were first used with",
                    )
                    .into_response();
                }
                let status = StatusCode::from_u16(prior.status).unwrap_or(StatusCode::OK);
                return (status, Json(prior.body.clone())).into_response();
            }
        }
        let outcome = run(&mut world, key.as_deref());
        if let Some(k) = key {
            world.idempotency.insert(
                k,
                IdempotentAnswer {
                    path: path.to_string(),
                    status: outcome.status.as_u16(),
                    body: outcome.body.clone(),
                },
            );
        }
        outcome
    };
    s.send_in_background(outcome.events.into_iter().map(Delivery::stripe).collect());
    if let Some(id) = outcome.finish_batch_job {
        let shared = s.clone();
        s.spawn(async move {
            tokio::time::sleep(BATCH_CANCEL_DELAY).await;
            let event = {
                let mut world = shared.world();
                finish_batch_cancel(&mut world, &id)
            };
            if let Some(event) = event {
                shared.send_in_background(vec![Delivery::stripe(event)]);
            }
        });
    }
    (outcome.status, Json(outcome.body)).into_response()
}

async fn cancel_transfer(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    idempotent_cancel(s, headers, uri.path(), |world, key| {
        cancel_transfer_in(world, &id, key)
    })
    .await
}

async fn cancel_batch_job(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    idempotent_cancel(s, headers, uri.path(), |world, key| {
        cancel_batch_job_in(world, &id, key)
    })
    .await
}

fn transfer_event(world: &mut World, kind: &str, id: &str, key: Option<&str>) -> Value {
    let event = with_request_reason(
        thin_event(
            &format!("{OUTBOUND_TRANSFER_OBJECT}.{kind}"),
            OUTBOUND_TRANSFER_OBJECT,
            id,
            &outbound_transfer_path(id),
        ),
        key,
    );
    world.record_stripe_event(&event);
    event
}

fn cancel_transfer_in(world: &mut World, id: &str, key: Option<&str>) -> Outcome {
    let Some(t) = world.transfers.get_mut(id) else {
        return Outcome::refused(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("No such outbound transfer: {id}"),
        );
    };
    if t.status == "canceled" {
        return Outcome::refused_as(
            StatusCode::BAD_REQUEST,
            "already_canceled",
            "outbound_transfer_already_canceled",
            "The outbound transfer has already been canceled",
        );
    }
    if t.status == "processing" && t.posts_on_cancel {
        // The lost race: the transfer posts before the cancel reaches it.
        t.advance("posted", None);
        let mut outcome = Outcome::refused_as(
            StatusCode::BAD_REQUEST,
            "not_cancelable",
            "outbound_transfer_not_cancelable",
            "The outbound transfer can no longer be canceled",
        );
        outcome.events = vec![transfer_event(world, "posted", id, key)];
        return outcome;
    }
    if t.status != "processing" || !t.cancelable {
        return Outcome::refused_as(
            StatusCode::BAD_REQUEST,
            "not_cancelable",
            "outbound_transfer_not_cancelable",
            "The outbound transfer can no longer be canceled",
        );
    }
    t.advance("canceled", None);
    let body = t.to_json();
    let event = transfer_event(world, "canceled", id, key);
    Outcome::ok(body, vec![event])
}

fn batch_event(world: &mut World, kind: &str, id: &str, key: Option<&str>) -> Value {
    let event = thin_event(
        &format!("{BATCH_JOB_OBJECT}.{kind}"),
        BATCH_JOB_OBJECT,
        id,
        &batch_job_path(id),
    );
    let event = match key {
        Some(_) => with_request_reason(event, key),
        None => event,
    };
    world.record_stripe_event(&event);
    event
}

fn cancel_batch_job_in(world: &mut World, id: &str, key: Option<&str>) -> Outcome {
    let Some(job) = world.batch_jobs.get_mut(id) else {
        return Outcome::refused(
            StatusCode::NOT_FOUND,
            "batch_job_not_found",
            &format!("No such batch job: {id}"),
        );
    };
    if job.status == "canceled" {
        // Cancelling a canceled job again changes nothing: the job as it is.
        return Outcome::ok(job.to_json(), Vec::new());
    }
    if !job.cancellable() {
        return Outcome::refused(
            StatusCode::BAD_REQUEST,
            "batch_api_non_cancellable_job",
            &format!("A batch job in status {} cannot be canceled", job.status),
        );
    }
    job.advance("cancelling", None);
    let body = job.to_json();
    let event = batch_event(world, "updated", id, key);
    let mut outcome = Outcome::ok(body, vec![event]);
    outcome.finish_batch_job = Some(id.to_string());
    outcome
}

/// Ends a cancel: `cancelling` → `canceled`, counts kept. Returns the event.
fn finish_batch_cancel(world: &mut World, id: &str) -> Option<Value> {
    let moved = world
        .batch_jobs
        .get_mut(id)
        .is_some_and(|j| j.advance("canceled", None));
    moved.then(|| batch_event(world, "canceled", id, None))
}

/// The filters of `GET /v2/core/events`.
#[derive(Debug, Default)]
struct EventFilter {
    gte: Option<chrono::DateTime<chrono::Utc>>,
    gt: Option<chrono::DateTime<chrono::Utc>>,
    lte: Option<chrono::DateTime<chrono::Utc>>,
    lt: Option<chrono::DateTime<chrono::Utc>>,
    types: Vec<String>,
    object_id: Option<String>,
    limit: usize,
    /// Only events older than this position (the page token).
    before: Option<usize>,
}

fn parse_filter(params: &[(String, String)]) -> Result<EventFilter, ApiError> {
    let mut f = EventFilter {
        limit: DEFAULT_PAGE,
        ..EventFilter::default()
    };
    let bad = |code: &str, message: String| invalid(StatusCode::BAD_REQUEST, code, &message);
    for (k, v) in params {
        let time = || {
            crate::time::parse(v)
                .ok_or_else(|| bad("invalid_created", format!("{k} is not an RFC 3339 time")))
        };
        match k.as_str() {
            "created[gte]" => f.gte = Some(time()?),
            "created[gt]" => f.gt = Some(time()?),
            "created[lte]" => f.lte = Some(time()?),
            "created[lt]" => f.lt = Some(time()?),
            "object_id" => f.object_id = Some(v.clone()),
            "limit" => {
                f.limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| bad("invalid_limit", format!("limit must be 1 to {MAX_PAGE}")))?
            }
            "page" => {
                f.before = Some(
                    v.strip_prefix("evp_")
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| bad("invalid_page", "unknown page token".into()))?,
                )
            }
            _ if k.starts_with("types[") || k == "types" => f.types.push(v.clone()),
            _ => {}
        }
    }
    Ok(f)
}

impl EventFilter {
    fn matches(&self, created: chrono::DateTime<chrono::Utc>, body: &Value) -> bool {
        self.gte.map_or(true, |t| created >= t)
            && self.gt.map_or(true, |t| created > t)
            && self.lte.map_or(true, |t| created <= t)
            && self.lt.map_or(true, |t| created < t)
            && (self.types.is_empty() || self.types.iter().any(|t| body["type"] == t.as_str()))
            && self
                .object_id
                .as_ref()
                .map_or(true, |id| body["related_object"]["id"] == id.as_str())
    }
}

/// The event Stripe sends once it could generate again an event it had
/// failed to: about the platform (no context), naming in `data.impact` the
/// object (and account context) the lost event was about.
pub const EVENT_GENERATION_FAILURE_RESOLVED: &str =
    "v2.core.health.event_generation_failure.resolved";

impl crate::Simulator {
    /// Applies `step` as if Stripe failed to generate its events: the state
    /// changes, no event of it is ever listed or sent. Returns the
    /// notification Stripe sends later about the failure (listed and
    /// fetchable with its `data`, which the notification itself lacks).
    pub fn fail_event_generation(&self, step: &crate::Step) -> Delivery {
        let mut world = self.shared.world();
        for change in &step.changes {
            world.apply(change);
        }
        let lost = &step.deliveries[0].body;
        let mut event = json!({
            "id": super::state::new_id("evt_sim_"),
            "object": "v2.core.event",
            "type": EVENT_GENERATION_FAILURE_RESOLVED,
            "created": crate::time::fmt(chrono::Utc::now()),
            "livemode": false,
            "data": {
                "grouping_key": super::state::new_id("grp_sim_"),
                "impact": {
                    "context": lost["context"],
                    "event_type": lost["type"],
                    "related_object": lost["related_object"],
                },
            },
        });
        world.record_stripe_event(&event);
        event.as_object_mut().map(|e| e.remove("data"));
        Delivery::stripe(event)
    }
}

/// Lists events newest first, `limit` per page; `next_page_url` repeats the
/// filters with a `page` token and is null on the last page.
async fn list_events(
    State(s): State<Arc<Shared>>,
    Query(params): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = check(&s, &headers) {
        return r.into_response();
    }
    let filter = match parse_filter(&params) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let context = stripe_context(&headers);
    let world = s.world();
    let upper = filter.before.unwrap_or(world.events.len());
    let mut page: Vec<(usize, Value)> = world
        .events
        .iter()
        .enumerate()
        .take(upper)
        .rev()
        .filter(|(_, e)| {
            in_context(&e.body, context.as_deref()) && filter.matches(e.created, &e.body)
        })
        .take(filter.limit + 1)
        .map(|(i, e)| (i, e.body.clone()))
        .collect();
    let next = if page.len() > filter.limit {
        page.truncate(filter.limit);
        let last = page.last().map(|(i, _)| *i).unwrap_or_default();
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in params.iter().filter(|(k, _)| k != "page") {
            q.append_pair(k, v);
        }
        q.append_pair("page", &format!("evp_{last}"));
        Value::String(format!("/v2/core/events?{}", q.finish()))
    } else {
        Value::Null
    };
    let data: Vec<Value> = page.into_iter().map(|(_, e)| e).collect();
    Json(json!({"data": data, "next_page_url": next, "previous_page_url": null})).into_response()
}

#[cfg(test)]
mod tests {
    use super::super::state::{BatchJob, OutboundTransfer};
    use super::*;

    #[test]
    fn transfer_cancel_codes() {
        let mut w = World::default();
        let t = OutboundTransfer::new(100, "usd");
        let id = t.id.clone();
        w.transfers.insert(id.clone(), t);
        let ok = cancel_transfer_in(&mut w, &id, Some("k"));
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.body["status"], "canceled");
        assert_eq!(ok.body["cancelable"], false);
        assert!(ok.body["status_transitions"]["canceled_at"].is_string());
        assert_eq!(ok.events[0]["reason"]["request"]["idempotency_key"], "k");
        assert_eq!(w.events.len(), 1);
        let again = cancel_transfer_in(&mut w, &id, None);
        assert_eq!(
            again.body["error"]["code"],
            "outbound_transfer_already_canceled"
        );
        assert_eq!(again.body["error"]["type"], "already_canceled");
        let missing = cancel_transfer_in(&mut w, "obt_nope", None);
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        assert_eq!(missing.body["error"]["code"], "not_found");
    }

    #[test]
    fn lost_race_posts_then_refuses() {
        let mut w = World::default();
        let mut t = OutboundTransfer::new(100, "usd");
        t.posts_on_cancel = true;
        let id = t.id.clone();
        w.transfers.insert(id.clone(), t);
        let r = cancel_transfer_in(&mut w, &id, None);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body["error"]["code"], "outbound_transfer_not_cancelable");
        assert_eq!(w.transfers[&id].status, "posted");
        assert_eq!(
            r.events[0]["type"],
            "v2.money_management.outbound_transfer.posted"
        );
    }

    #[test]
    fn batch_cancel_then_finish() {
        let mut w = World::default();
        let mut j = BatchJob::new("in_progress");
        j.success_count = 30;
        j.failure_count = 2;
        let id = j.id.clone();
        w.batch_jobs.insert(id.clone(), j);
        let r = cancel_batch_job_in(&mut w, &id, None);
        assert_eq!(r.body["status"], "cancelling");
        assert_eq!(r.finish_batch_job.as_deref(), Some(id.as_str()));
        let again = cancel_batch_job_in(&mut w, &id, None);
        assert_eq!(again.body["error"]["code"], "batch_api_non_cancellable_job");
        let event = finish_batch_cancel(&mut w, &id).unwrap();
        let once_more = cancel_batch_job_in(&mut w, &id, None);
        assert_eq!(once_more.status, StatusCode::OK);
        assert_eq!(once_more.body["status"], "canceled");
        assert!(once_more.events.is_empty() && once_more.finish_batch_job.is_none());
        assert_eq!(event["type"], "v2.core.batch_job.canceled");
        assert_eq!(
            w.batch_jobs[&id].to_json()["status_details"]["canceled"]["success_count"],
            "30"
        );
        assert!(finish_batch_cancel(&mut w, &id).is_none());
        let missing = cancel_batch_job_in(&mut w, "batchv2_nope", None);
        assert_eq!(missing.body["error"]["code"], "batch_job_not_found");
    }

    #[test]
    fn event_filter_parsing() {
        let params = vec![
            (
                "created[gte]".to_string(),
                "2026-01-01T00:00:00Z".to_string(),
            ),
            ("types[0]".to_string(), "a".to_string()),
            ("types[1]".to_string(), "b".to_string()),
            ("limit".to_string(), "5".to_string()),
            ("page".to_string(), "evp_7".to_string()),
        ];
        let f = parse_filter(&params).unwrap();
        assert_eq!(f.types, vec!["a", "b"]);
        assert_eq!(f.limit, 5);
        assert_eq!(f.before, Some(7));
        assert!(f.matches(chrono::Utc::now(), &json!({"type": "b"})));
        assert!(!f.matches(chrono::Utc::now(), &json!({"type": "c"})));
        assert!(parse_filter(&[("limit".into(), "0".into())]).is_err());
        assert!(parse_filter(&[("created[gte]".into(), "soon".into())]).is_err());
    }
}
