//! The daemon's HTTP surface: the webhook routes ([`crate::ingress`]), the
//! operator's `/v1` API ([`v1`]) and console ([`crate::console`]), health and
//! metrics ([`health`]), under the server's limits; on one address, or the
//! admin surface apart (`server.admin_listen`).

pub mod health;
pub mod v1;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::App;

/// Every HTTP route of the daemon, on one address.
pub fn router(app: Arc<App>) -> Router {
    with_limits(public_routes().merge(admin_routes(&app)), app)
}

/// What faces the providers when the admin surface has an address of its
/// own (`server.admin_listen`): the webhooks and the health checks only.
pub fn public_router(app: Arc<App>) -> Router {
    with_limits(public_routes(), app)
}

/// The admin surface on its own address: the console, `/v1`, `/metrics`.
pub fn admin_router(app: Arc<App>) -> Router {
    with_limits(admin_routes(&app), app)
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

fn with_limits(routes: Router<Arc<App>>, app: Arc<App>) -> Router {
    let limits = tower::ServiceBuilder::new()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(app.config.server.request_timeout_secs),
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            app.config.server.max_concurrent_requests,
        ));
    routes.layer(limits).with_state(app)
}
