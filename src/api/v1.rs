//! `/v1`: the operator's HTTP API. JSON only, behind
//! `Authorization: Bearer <server.admin_token>`; the whole tree answers 404
//! `api_disabled` while no token is configured. Lists are keyset pages:
//! `limit` and `cursor` in, `{"data":[…],"next_cursor":…}` out.
//!
//! The routes are registered from their annotations ([`utoipa`]), so the
//! OpenAPI description served at `/v1/openapi.json` is made from the same
//! handlers, parameters and bodies that answer.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::guesses::Guesses;
use crate::ingress::{error_body, unavailable_body, LogLimiter};
use crate::pipeline::cancel::CancelReport;
use crate::pipeline::ReplayReport;
use crate::pipeline::{self, PipelineError};
use crate::store::model::{
    AlertFilter, AlertView, Event, EventFilter, History, Page, PageRequest, TransitionFilter,
    TransitionView, MAX_LIMIT,
};
use crate::store::{QueryError, Unavailable};
use crate::App;

/// Lines about /v1 requests answered 503: at most one a second.
static UNAVAILABLE_LOG: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(std::time::Duration::from_secs(1)));

/// The OpenAPI description's frame; the paths come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "cancelwatch /v1",
        description = "The operator's API of cancelwatch: the audit trail of cancellations, \
                       replays and cancels. Every request needs \
                       `Authorization: Bearer <server.admin_token>`; the whole tree answers \
                       404 `api_disabled` while no token is configured. Lists are keyset \
                       pages, newest first."
    ),
    servers((url = "/v1", description = "this daemon's admin address")),
    modifiers(&BearerToken),
    security(("admin_token" = []))
)]
struct ApiDoc;

struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "admin_token",
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .description(Some("server.admin_token"))
                        .build(),
                ),
            );
    }
}

/// The OpenAPI description of `/v1`, made from its handlers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().1
}

fn documented() -> (Router<Arc<App>>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(resource))
        .routes(routes!(transitions))
        .routes(routes!(alerts))
        .routes(routes!(events))
        .routes(routes!(replay))
        .routes(routes!(cancellation))
        .split_for_parts()
}

/// The `/v1` routes, guarded by the admin token.
pub fn routes(app: Arc<App>) -> Router<Arc<App>> {
    let (v1, doc) = documented();
    let doc = Arc::new(doc);
    let v1 = v1
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(
            Arc::new(Guard {
                guesses: Guesses::new(app.config.server.admin_auth_failures_per_minute),
                app,
            }),
            guard,
        ));
    Router::new().nest("/v1", v1)
}

/// Every error's body: a stable code and a sentence.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `unauthorized`, `api_disabled`, `not_found`,
    /// `invalid_parameter`, `invalid_cursor`, `invalid_body`, `unknown_kind`,
    /// `invalid_id`, `invalid_argument`, `provider_not_configured`,
    /// `provider_error`, `method_not_allowed`, `internal`.
    pub code: String,
    /// For people.
    pub message: String,
}

/// Errors of the API layer, each with its HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the /v1 API is off (server.admin_token is empty)")]
    Disabled,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// Too many failed authentications from this source lately.
    #[error("too many failed authentications from this address; try again later")]
    Throttled { retry_after: std::time::Duration },
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    /// A replay or cancel that could not be done; carries its own status.
    #[error("{0}")]
    Pipeline(PipelineError),
    /// The database is full or locked.
    #[error("the database is unavailable")]
    Unavailable(Unavailable),
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
            ApiError::Throttled { retry_after } => {
                let mut r =
                    error_body(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts", &message);
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    header::HeaderValue::from(retry_after.as_secs().max(1)),
                );
                r
            }
            ApiError::BadRequest { code, .. } => {
                error_body(StatusCode::BAD_REQUEST, code, &message)
            }
            ApiError::NotFound(_) => error_body(StatusCode::NOT_FOUND, "not_found", &message),
            ApiError::Pipeline(PipelineError::Store(e)) => match e.unavailable() {
                Some(cause) => ApiError::Unavailable(cause).into_response(),
                None => ApiError::Internal(format!("replay or cancel: {e}")).into_response(),
            },
            ApiError::Unavailable(cause) => {
                if let Some(left_out) = UNAVAILABLE_LOG.admit(std::time::Instant::now()) {
                    tracing::warn!(
                        cause = cause.code(),
                        left_out,
                        "/v1 request answered 503: the database is unavailable"
                    );
                }
                unavailable_body(cause)
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
            QueryError::Store(e) => match e.unavailable() {
                Some(cause) => ApiError::Unavailable(cause),
                None => ApiError::Internal(format!("query: {e}")),
            },
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

/// The admin token's check, with the failures of each source held back.
struct Guard {
    app: Arc<App>,
    guesses: Guesses,
}

async fn guard(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    let expected = guard.app.config.server.admin_token.as_str();
    if expected.is_empty() {
        return ApiError::Disabled.into_response();
    }
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let now = std::time::Instant::now();
    if let Some(retry_after) = guard.guesses.held_back(source, now) {
        guard.guesses.failed(source, now, true);
        return ApiError::Throttled { retry_after }.into_response();
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(token) if token_matches(token, expected) => next.run(request).await,
        _ => {
            guard.guesses.failed(source, now, false);
            ApiError::Unauthorized.into_response()
        }
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

/// One resource's state and whole trail: transitions, progress, refunds,
/// alerts, cancel requests and, for a bulk transfer, its items. An id shared
/// by two kinds or providers lists each; a Juice item is found by its id or
/// its reference.
#[utoipa::path(
    get,
    path = "/resources/{id}",
    tag = "resources",
    params(("id" = String, Path, description = "The provider's id of the resource (or another id it is known by)")),
    responses(
        (status = 200, description = "Everything recorded about the id", body = History),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No resource with this id (`not_found`), or the API is off (`api_disabled`)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct TransitionsParams {
    /// `stripe` or `juice`.
    provider: Option<String>,
    /// A resource kind, e.g. `stripe.outbound_transfer`.
    kind: Option<String>,
    /// The status changed to (also accepted as `to`).
    #[serde(alias = "to")]
    to_status: Option<String>,
    /// Observed at or after: RFC 3339, or a duration back from now (`2h`).
    since: Option<String>,
    /// Observed before: RFC 3339, or a duration back from now.
    until: Option<String>,
    resource_id: Option<String>,
    /// Rows per page, 1 to 1000 (100 when absent).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The answers every listing shares beside its page.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only described, never built: the errors build their bodies
enum ListErrors {
    /// A parameter is not valid (`invalid_parameter`, `invalid_cursor`).
    #[response(status = 400)]
    BadRequest(#[to_schema] ErrorBody),
    /// Missing or wrong bearer token.
    #[response(status = 401)]
    Unauthorized(#[to_schema] ErrorBody),
    /// The API is off (`api_disabled`).
    #[response(status = 404)]
    Off(#[to_schema] ErrorBody),
    /// Internal error.
    #[response(status = 500)]
    Internal(#[to_schema] ErrorBody),
}

/// Status changes, newest first, filtered.
#[utoipa::path(
    get,
    path = "/transitions",
    tag = "transitions",
    params(TransitionsParams),
    responses(
        (status = 200, description = "A page of transitions", body = Page<TransitionView>),
        ListErrors,
    )
)]
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AlertsParams {
    /// The rule (also accepted as `rule`): partial_cancellation,
    /// cancel_not_effective, stuck, refund_overdue, dead_letter,
    /// verification_failures.
    #[serde(rename = "type", alias = "rule")]
    rule: Option<String>,
    /// Raised at or after: RFC 3339, or a duration back from now (`2h`).
    since: Option<String>,
    /// `open` or `resolved`.
    state: Option<String>,
    /// Rows per page, 1 to 1000 (100 when absent).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Alerts, newest first, with their delivery state per sink.
#[utoipa::path(
    get,
    path = "/alerts",
    tag = "alerts",
    params(AlertsParams),
    responses(
        (status = 200, description = "A page of alerts", body = Page<AlertView>),
        ListErrors,
    )
)]
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

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct EventsParams {
    /// pending, processing, processed, ignored, failed, dead.
    state: Option<String>,
    /// `stripe` or `juice`.
    provider: Option<String>,
    /// Rows per page, 1 to 1000 (100 when absent).
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Inbox deliveries, newest first, without their bodies.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(EventsParams),
    responses(
        (status = 200, description = "A page of deliveries", body = Page<Event>),
        ListErrors,
    )
)]
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
#[utoipa::path(
    post,
    path = "/events/{key}/replay",
    tag = "events",
    params(("key" = String, Path, description = "The delivery's dedupe key (`key` in /events)")),
    responses(
        (status = 202, description = "Back in line; the workers take it", body = ReplayReport),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "No delivery with this key (`not_found`), or the API is off (`api_disabled`)", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    )
)]
async fn replay(
    State(app): State<Arc<App>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    let report = pipeline::replay(&app.pipeline, &key, false).await?;
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    /// A cancellable kind: `stripe.outbound_transfer`, `stripe.batch_job`,
    /// `juice.bulk_transfer`.
    kind: String,
    /// The provider's id of the resource.
    id: String,
}

/// A cancel's answer where the status alone does not tell: the provider's
/// answer as a report, or an error of cancelwatch's own.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only described, never built
enum CancelAnswer {
    Report(CancelReport),
    Error(ErrorBody),
}

/// Cancels a resource at its provider: 201 with what the provider answered
/// and the status fetched after it.
#[utoipa::path(
    post,
    path = "/cancellations",
    tag = "cancellations",
    request_body = CancelBody,
    responses(
        (status = 201, description = "Accepted: the cancel took effect", body = CancelReport),
        (status = 200, description = "Already cancelled, or cancelled in part (`partial_cancellation`)", body = CancelReport),
        (status = 400, description = "Unknown kind, invalid id or body (`unknown_kind`, `invalid_id`, `invalid_body`)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "The provider does not know the resource (a report), or the API is off (`api_disabled`)", body = CancelAnswer),
        (status = 409, description = "Not cancellable or an idempotency conflict (a report), or no API key for the provider (`provider_not_configured`)", body = CancelAnswer),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 502, description = "The provider failed (a report with outcome `error`, or `provider_error`)", body = CancelAnswer),
        (status = 504, description = "Sent, but the answer was lost: outcome `unknown`, see `effect`", body = CancelReport),
    )
)]
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
