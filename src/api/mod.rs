//! The daemon's HTTP surface: the webhook routes ([`crate::ingress`]), the
//! operator's `/v1` API ([`v1`]), health and metrics ([`health`]), under the
//! server's limits ([`edge`]).

pub mod edge;
pub mod guesses;
pub mod health;
pub mod v1;

use std::sync::Arc;

use axum::extract::{MatchedPath, Request};
use axum::middleware;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::App;

/// Routes whose answers are counted from the start, at zero, in each
/// class of [`STATUS_CLASSES`]: those an alert watches. Others' series
/// appear with their first answer.
pub const COUNTED_ROUTES: [&str; 4] = [crate::ingress::ROUTE, "/healthz", "/readyz", "/metrics"];

/// The status classes answers are counted by.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The route label of a request that matched no route: the path itself
/// would let anyone create series without bound.
const UNMATCHED: &str = "other";

/// Every HTTP route of the daemon.
pub fn router(app: Arc<App>) -> Router {
    let limits = Arc::new(edge::Limits::new(app.clone()));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::render_metrics))
        .merge(crate::ingress::routes())
        .merge(v1::routes(app.clone()))
        // `Router::layer` wraps each route on its own; the limiter inside is
        // one for them all because it is shared through this state.
        .layer(middleware::from_fn_with_state(limits, edge::limit))
        // Outside the limits, so that an answer they give (408 after the
        // request deadline) is counted too.
        .layer(axum::middleware::from_fn(count_answer))
        .with_state(app)
}

/// Counts each answer by route pattern and status class
/// (`cancelwatch_http_responses_total`).
async fn count_answer(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED.to_string(), |p| p.as_str().to_string());
    let response = next.run(request).await;
    // 100–599 are the classes; hyper accepts codes up to 999.
    let class = usize::from(response.status().as_u16() / 100)
        .checked_sub(1)
        .and_then(|i| STATUS_CLASSES.get(i))
        .copied()
        .unwrap_or(UNMATCHED);
    metrics::counter!("cancelwatch_http_responses_total", "route" => route, "class" => class)
        .increment(1);
    response
}
