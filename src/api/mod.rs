//! The daemon's HTTP surface: the webhook routes ([`crate::ingress`]), the
//! operator's `/v1` API ([`v1`]), health and metrics ([`health`]), under the
//! server's limits.

pub mod health;
pub mod v1;

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::App;

/// Every HTTP route of the daemon.
pub fn router(app: Arc<App>) -> Router {
    let limits = tower::ServiceBuilder::new()
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(app.config.server.request_timeout_secs),
        ))
        .layer(tower::limit::ConcurrencyLimitLayer::new(
            app.config.server.max_concurrent_requests,
        ));
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::render_metrics))
        .merge(crate::ingress::routes())
        .merge(v1::routes(app.clone()))
        .layer(limits)
        .with_state(app)
}
