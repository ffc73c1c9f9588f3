//! `/v1`: the operator's HTTP API. JSON only, behind
//! `Authorization: Bearer <server.admin_token>`; the whole tree answers 404
//! `api_disabled` while no token is configured. Lists are keyset pages:
//! `limit` and `cursor` in, `{"data":[…],"next_cursor":…}` out.

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ingress::error_body;
use crate::pipeline::{self, PipelineError};
use crate::store::model::{AlertFilter, EventFilter, PageRequest, TransitionFilter, MAX_LIMIT};
use crate::store::QueryError;
use crate::App;

/// The `/v1` routes, guarded by the admin token.
pub fn routes(app: Arc<App>) -> Router<Arc<App>> {
    let v1 = Router::new()
        .route("/resources/{id}", get(resource))
        .route("/transitions", get(transitions))
        .route("/alerts", get(alerts))
        .route("/events", get(events))
        .route("/events/{key}/replay", post(replay))
        .route("/cancellations", post(cancellation))
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(app, guard));
    Router::new().nest("/v1", v1)
}

/// Errors of the API layer, each with its HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the /v1 API is off (server.admin_token is empty)")]
    Disabled,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    /// A replay or cancel that could not be done; carries its own status.
    #[error("{0}")]
    Pipeline(PipelineError),
    #[error("internal: {0}")]
    Internal(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            ApiError::Disabled => error_body(StatusCode::NOT_FOUND, "api_disabled", &message),
            ApiError::Unauthorized => {
                let mut r = error_body(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "send Authorization: Bearer <server.admin_token>",
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
                r
            }
            ApiError::BadRequest { code, .. } => {
                error_body(StatusCode::BAD_REQUEST, code, &message)
            }
            ApiError::NotFound(_) => error_body(StatusCode::NOT_FOUND, "not_found", &message),
            ApiError::Pipeline(PipelineError::Store(e)) => {
                ApiError::Internal(format!("replay or cancel: {e}")).into_response()
            }
            ApiError::Pipeline(e) => {
                let (status, code) = pipeline_answer(&e);
                error_body(status, code, &message)
            }
            ApiError::Internal(detail) => {
                tracing::error!(%detail, "/v1 request failed inside cancelwatch");
                error_body(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error",
                )
            }
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid { field, .. } => ApiError::BadRequest {
                code: if field == "cursor" {
                    "invalid_cursor"
                } else {
                    "invalid_parameter"
                },
                message: e.to_string(),
            },
            QueryError::Store(e) => ApiError::Internal(format!("query: {e}")),
        }
    }
}

/// The status and stable code a replay or cancel that could not be done is
/// answered with.
fn pipeline_answer(e: &PipelineError) -> (StatusCode, &'static str) {
    match e {
        PipelineError::UnknownKind(_) => (StatusCode::BAD_REQUEST, "unknown_kind"),
        PipelineError::InvalidId(_) => (StatusCode::BAD_REQUEST, "invalid_id"),
        PipelineError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
        PipelineError::NotConfigured(_) => (StatusCode::CONFLICT, "provider_not_configured"),
        PipelineError::NoSuchDelivery(_) => (StatusCode::NOT_FOUND, "not_found"),
        PipelineError::Provider(_) => (StatusCode::BAD_GATEWAY, "provider_error"),
        PipelineError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<PipelineError> for ApiError {
    fn from(e: PipelineError) -> Self {
        ApiError::Pipeline(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::BadRequest {
            code: "invalid_body",
            message: e.body_text(),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::BadRequest {
            code: "invalid_parameter",
            message: e.body_text(),
        }
    }
}

/// True when `given` is the configured token; the comparison takes the same
/// time wherever they differ (both are hashed first, so length leaks nothing).
pub(crate) fn token_matches(given: &str, expected: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    given.ct_eq(&expected).into()
}

async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let expected = app.config.server.admin_token.as_str();
    if expected.is_empty() {
        return ApiError::Disabled.into_response();
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if token_matches(token, expected) => next.run(request).await,
        _ => ApiError::Unauthorized.into_response(),
    }
}

async fn unknown_path() -> ApiError {
    ApiError::NotFound("no such /v1 endpoint".into())
}

async fn wrong_method() -> Response {
    error_body(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this /v1 endpoint does not take that method",
    )
}

/// `limit` arrives as text so that a bad one gets a clear JSON 400.
fn parse_limit(limit: Option<&str>) -> Result<Option<i64>, ApiError> {
    limit
        .map(|l| {
            l.trim().parse::<i64>().map_err(|_| ApiError::BadRequest {
                code: "invalid_parameter",
                message: format!(
                    "limit: {l:?} is not a whole number between 1 and {}",
                    MAX_LIMIT
                ),
            })
        })
        .transpose()
}

fn page_request(limit: Option<&str>, cursor: Option<String>) -> Result<PageRequest, ApiError> {
    Ok(PageRequest {
        limit: parse_limit(limit)?,
        cursor,
    })
}

async fn resource(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match app.store.history(&id).await? {
        Some(history) => Ok(Json(history).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no resource with id {id:?} is recorded"
        ))),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TransitionsParams {
    provider: Option<String>,
    kind: Option<String>,
    #[serde(alias = "to")]
    to_status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    resource_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn transitions(
    State(app): State<Arc<App>>,
    params: Result<Query<TransitionsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let page = page_request(p.limit.as_deref(), p.cursor)?;
    let filter = TransitionFilter {
        provider: p.provider,
        kind: p.kind,
        to_status: p.to_status,
        since: p.since,
        until: p.until,
        resource_id: p.resource_id,
    };
    let found = app.store.transitions(&filter, &page).await?;
    Ok(Json(found).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsParams {
    #[serde(rename = "type", alias = "rule")]
    rule: Option<String>,
    since: Option<String>,
    state: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn alerts(
    State(app): State<Arc<App>>,
    params: Result<Query<AlertsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let page = page_request(p.limit.as_deref(), p.cursor)?;
    let filter = AlertFilter {
        rule: p.rule,
        since: p.since,
        state: p.state,
    };
    let found = app.store.alerts(&filter, &page).await?;
    Ok(Json(found).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsParams {
    state: Option<String>,
    provider: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn events(
    State(app): State<Arc<App>>,
    params: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(p) = params?;
    let page = page_request(p.limit.as_deref(), p.cursor)?;
    let filter = EventFilter {
        state: p.state,
        provider: p.provider,
    };
    let found = app.store.events(&filter, &page).await?;
    Ok(Json(found).into_response())
}

/// Puts a stored delivery back in line for the daemon's workers: 202 with
/// the replay report.
async fn replay(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let report = pipeline::replay(&app.pipeline, &key, false).await?;
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    kind: String,
    id: String,
}

/// Cancels a resource at its provider: 201 with what the provider answered
/// and the status fetched after it.
async fn cancellation(
    State(app): State<Arc<App>>,
    body: Result<Json<CancelBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let report = pipeline::cancel::request(&app.pipeline, &body.kind, &body.id, "api").await?;
    Ok((cancel_status(&report.outcome), Json(report)).into_response())
}

/// The status of a cancel's answer, by its outcome: a success only when the
/// cancel took effect (201) or had already (200); the body says the rest.
fn cancel_status(outcome: &str) -> StatusCode {
    match outcome {
        "accepted" => StatusCode::CREATED,
        "already_cancelled" | "partial_cancellation" => StatusCode::OK,
        "not_cancellable" | "idempotency_conflict" => StatusCode::CONFLICT,
        "not_found" => StatusCode::NOT_FOUND,
        "unknown" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_by_value() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cret", "s3cres"));
        assert!(!token_matches("", "s3cret"));
        assert!(!token_matches("s3cret-longer", "s3cret"));
    }

    #[test]
    fn limits_must_be_numbers() {
        assert_eq!(parse_limit(Some("25")).unwrap(), Some(25));
        assert_eq!(parse_limit(None).unwrap(), None);
        assert!(parse_limit(Some("ten")).is_err());
    }
}
