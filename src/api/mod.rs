//! The daemon's HTTP surface: the webhook routes ([`crate::ingress`]), the
//! operator's `/v1` API ([`v1`]) and console ([`crate::console`]), health and
//! metrics ([`health`]), under the server's limits ([`edge`]); on one
//! address, or the admin surface apart (`server.admin_listen`).

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

/// Every HTTP route of the daemon, on one address.
pub fn router(app: Arc<App>) -> Router {
    let limits = Arc::new(edge::Limits::new(app.clone()));
    with_limits(public_routes().merge(admin_routes(&app)), app, limits)
}

/// The routes on two addresses (`server.admin_listen`): what faces the
/// providers (the webhooks and the health checks only), and the admin
/// surface (the console, `/v1`, `/metrics`); under one limit for both, as
/// they share the process.
pub fn split_router(app: Arc<App>) -> (Router, Router) {
    let limits = Arc::new(edge::Limits::new(app.clone()));
    let admin = with_limits(admin_routes(&app), app.clone(), limits.clone());
    (with_limits(public_routes(), app, limits), admin)
}

fn public_routes() -> Router<Arc<App>> {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .merge(crate::ingress::routes())
}

fn admin_routes(app: &Arc<App>) -> Router<Arc<App>> {
    Router::new()
        .route("/metrics", get(health::render_metrics))
        .merge(v1::routes(app.clone()))
        .merge(crate::console::routes(app.clone()))
}

/// The process-wide `limits` around `routes`, and the answers counted.
fn with_limits(routes: Router<Arc<App>>, app: Arc<App>, limits: Arc<edge::Limits>) -> Router {
    routes
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
