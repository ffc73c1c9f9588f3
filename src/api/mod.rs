//! The daemon's HTTP surface: the webhook routes ([`crate::ingress`]), the
//! operator's `/v1` API ([`v1`]), health and metrics ([`health`]), under the
//! server's limits ([`edge`]).

pub mod edge;
pub mod guesses;
pub mod health;
pub mod v1;

use std::sync::Arc;

use axum::middleware;
use axum::routing::get;
use axum::Router;

use crate::App;

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
        .with_state(app)
}
