//! cancelwatch: the webhook consumer that follows payment cancellations to
//! their end. The life of one delivery, module by module:
//!
//! `ingress` → `providers::<p>::verify` → `inbox::accept` (committed, 2xx) →
//! `pipeline::worker` claims it → `providers::<p>::fetch` → `pipeline::record`
//! (transitions, refunds, alerts in one transaction) → `alerts::outbox`
//! delivers → `api` / `cli` read.

pub mod alerts;
pub mod api;
pub mod cli;
pub mod config;
pub mod inbox;
pub mod ingress;
pub mod metrics;
pub mod pipeline;
pub mod providers;
pub mod prune;
pub mod server;
pub mod store;
pub mod time;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What every part of the running daemon shares.
pub struct App {
    pub config: Arc<Config>,
    pub db: store::Db,
    pub providers: providers::Providers,
    pub inbox: inbox::Inbox,
    pub metrics: PrometheusHandle,
    /// Cancelled when the daemon shuts down; background tasks watch it.
    pub shutdown: CancellationToken,
    /// What workers, reconciler, cancel and replay share (config, db, provider clients).
    pub pipeline: Arc<pipeline::Context>,
    /// Workers running now; `/readyz` fails at zero.
    pub workers_alive: Arc<AtomicUsize>,
}

impl App {
    /// The shared parts, before any background task has started.
    pub fn new(
        config: Arc<Config>,
        db: store::Db,
        providers: providers::Providers,
        inbox: inbox::Inbox,
    ) -> App {
        let pipeline = Arc::new(pipeline::Context::new(
            config.clone(),
            db.clone(),
            providers.clone(),
            inbox.wake.clone(),
        ));
        App {
            config,
            db,
            providers,
            inbox,
            metrics: metrics::handle(),
            shutdown: CancellationToken::new(),
            pipeline,
            workers_alive: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// Opens the database named by the configuration (creating it), migrated.
pub async fn open_db(config: &Config) -> anyhow::Result<store::Db> {
    let path = config.database_path()?;
    store::Db::open(&path, &config.database)
        .await
        .with_context(|| format!("opening the database at {}", path.display()))
}

/// Runs the daemon on an already-bound listener until SIGINT or SIGTERM.
pub async fn run(config: Config, listener: TcpListener) -> anyhow::Result<()> {
    run_until(config, listener, shutdown_signal()).await
}

/// Runs the daemon until `shutdown` resolves: stops accepting, finishes
/// in-flight requests, stops the background tasks, commits what is queued and
/// closes the database.
pub async fn run_until(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let db = open_db(&config).await?;
    let (inbox, writer) = inbox::Inbox::start(&db, &config.database);
    let providers = providers::Providers::from_config(&config);
    for name in ["stripe", "juice"] {
        if providers.get(name).is_none() {
            tracing::warn!(
                provider = name,
                "no webhook secrets configured: /webhooks/{name} answers 404"
            );
        }
        if providers.get(name).is_some() && providers.api(name).is_none() {
            tracing::warn!(
                provider = name,
                "no API key configured: {name} deliveries are stored but wait until one is set"
            );
        }
    }
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let config = Arc::new(config);
    let app = Arc::new(App::new(config, db.clone(), providers, inbox));

    let mut tasks = tokio::task::JoinSet::<()>::new();
    alerts::spawn(&app, &mut tasks);
    let handoff = pipeline::worker::spawn(
        app.pipeline.clone(),
        &mut tasks,
        app.shutdown.clone(),
        app.workers_alive.clone(),
    );
    app.inbox.hand_to(handoff);
    if app.config.reconcile.enabled {
        tasks.spawn(pipeline::reconcile::run(
            app.pipeline.clone(),
            app.shutdown.clone(),
        ));
    }
    if app.config.prune.enabled {
        tasks.spawn(prune::run_scheduled(app.clone()));
    }
    let router = router(app.clone());
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "cancelwatch listening");

    let stop = app.shutdown.clone();
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        signal_stop.cancel();
    });
    let serve_opts = server::ServeOptions {
        max_connections: app.config.server.max_connections,
        header_read_timeout: Duration::from_secs(app.config.server.header_read_timeout_secs),
        grace,
    };
    server::serve(listener, router, serve_opts, stop.clone()).await;
    tracing::info!("stopped accepting; waiting for background tasks");

    stop.cancel();
    if tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop within the grace period; aborting them");
        tasks.abort_all();
    }
    // The writer ends once every handle to the inbox is gone.
    drop(app);
    if tokio::time::timeout(grace, writer).await.is_err() {
        tracing::warn!("inbox writer did not finish within the grace period");
    }
    db.close().await;
    tracing::info!("cancelwatch stopped");
    Ok(())
}

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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .merge(ingress::routes())
        .merge(api::routes(app.clone()))
        .layer(limits)
        .with_state(app)
}

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    if app.workers_alive.load(Ordering::SeqCst) < pipeline::worker::TASKS {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": "workers not running"})),
        );
    }
    if app.db.sync_failed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "unavailable", "reason": "a sync of the WAL to disk failed: restart the daemon"}),
            ),
        );
    }
    if app.db.ping().await {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "reason": "database not usable"})),
        )
    }
}

async fn render_metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    if let Ok((depth, oldest)) = store::inbox::depth(&app.db.read).await {
        ::metrics::gauge!("cancelwatch_inbox_depth").set(depth as f64);
        let age = oldest
            .and_then(|t| time::parse_lenient(&t))
            .map(|t| (time::now() - t).num_milliseconds() as f64 / 1000.0)
            .unwrap_or(0.0);
        ::metrics::gauge!("cancelwatch_inbox_oldest_pending_seconds").set(age);
    }
    if let Ok(counts) = store::inbox::count_by_state(&app.db.read).await {
        for state in store::queries::EVENT_STATES {
            let n = counts
                .iter()
                .find(|(s, _)| s == state)
                .map_or(0, |(_, n)| *n);
            ::metrics::gauge!("cancelwatch_inbox_deliveries", "state" => state).set(n as f64);
            if state == "dead" {
                ::metrics::gauge!("cancelwatch_deliveries_dead").set(n as f64);
            }
        }
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        app.metrics.render(),
    )
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        _ = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// Sets up logging as configured (`RUST_LOG` overrides the level).
pub fn init_logging(config: &config::LogConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if config.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `/readyz` turns red once a sync of the WAL failed and stays red: every
    /// delivery is refused until the daemon restarts.
    #[tokio::test]
    async fn readyz_fails_after_a_failed_wal_sync() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.database.url = format!("sqlite://{}", dir.path().join("x.db").display());
        let db = open_db(&config).await.unwrap();
        let (inbox, _writer) = inbox::Inbox::start(&db, &config.database);
        let providers = providers::Providers::from_config(&config);
        let app = App::new(Arc::new(config), db.clone(), providers, inbox);
        app.workers_alive
            .store(pipeline::worker::TASKS, Ordering::SeqCst);
        let app = Arc::new(app);
        let status = |app: &Arc<App>| {
            let app = app.clone();
            async move { readyz(State(app)).await.into_response().status() }
        };
        assert_eq!(status(&app).await, StatusCode::OK);
        db.fail_sync();
        assert_eq!(status(&app).await, StatusCode::SERVICE_UNAVAILABLE);
    }
}
