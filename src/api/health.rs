//! Health and metrics: `/healthz` (the process answers), `/readyz` (it can
//! do its job: workers running, the database usable, commits durable) and
//! `/metrics` (Prometheus text).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use crate::{pipeline, store, time, App};

/// Liveness: the process answers, and has not reached a state only a
/// restart leaves (a failed sync of the WAL: from then on every delivery is
/// refused), so an orchestrator restarts it then.
pub async fn healthz(State(app): State<Arc<App>>) -> impl IntoResponse {
    if app.store.sync_failed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "failed", "reason": "a sync of the WAL to disk failed: restart the daemon"}),
            ),
        );
    }
    (StatusCode::OK, Json(json!({"status": "ok"})))
}

/// What answers while the database is opened and migrated, before the
/// daemon runs: alive, not ready, and every other request 503 (a provider
/// sends its delivery again later).
pub fn starting_router() -> axum::Router {
    const REASON: &str = "starting: opening and migrating the database";
    let unavailable = || async {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "5")],
            Json(json!({"status": "unavailable", "reason": REASON})),
        )
    };
    axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { Json(json!({"status": "starting"})) }),
        )
        .route("/readyz", axum::routing::get(unavailable))
        .fallback(unavailable)
}

pub async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    match unready(&app).await {
        // `leader`: this replica runs the one-at-a-time work (always so
        // on SQLite); for an operator of several replicas.
        None => (
            StatusCode::OK,
            Json(json!({"status": "ready", "leader": app.store.is_leader()})),
        ),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "unavailable", "reason": reason, "leader": app.store.is_leader()}),
            ),
        ),
    }
}

/// Why the daemon cannot do its work now, if it cannot (`/readyz`, and the
/// gauge `cancelwatch_ready` for alerting where nothing probes `/readyz`).
async fn unready(app: &App) -> Option<&'static str> {
    if app.draining.load(Ordering::SeqCst) {
        return Some("shutting down");
    }
    if app.workers_alive.load(Ordering::SeqCst) < pipeline::feed::TASKS {
        return Some("workers not running");
    }
    if app.store.sync_failed() {
        return Some("a sync of the WAL to disk failed: restart the daemon");
    }
    if !app.store.ping().await {
        return Some("database not usable");
    }
    if let Some(cause) = app.store.write_trouble().await {
        return Some(cause.describe());
    }
    None
}

pub async fn render_metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    let ready = unready(&app).await.is_none();
    ::metrics::gauge!("cancelwatch_ready").set(if ready { 1.0 } else { 0.0 });
    let leader = app.store.is_leader();
    ::metrics::gauge!("cancelwatch_leader").set(if leader { 1.0 } else { 0.0 });
    if let Ok((depth, oldest)) = app.store.inbox_depth().await {
        ::metrics::gauge!("cancelwatch_inbox_depth").set(depth as f64);
        ::metrics::gauge!("cancelwatch_inbox_oldest_pending_seconds").set(age(oldest));
    }
    if let Ok(backlog) = app.store.outbox_pending().await {
        // Every configured sink, so that one that caught up reads 0 rather
        // than its last backlog; and any other that rows still wait for.
        let configured = (0..app.config.alerts.sinks.len()).map(|i| app.config.sink_name(i));
        let others = backlog.iter().map(|b| b.sink.clone());
        let sinks: std::collections::BTreeSet<String> = configured.chain(others).collect();
        for sink in sinks {
            let waiting = backlog.iter().find(|b| b.sink == sink);
            let (n, oldest) = waiting.map_or((0, None), |b| (b.waiting, b.oldest.clone()));
            ::metrics::gauge!("cancelwatch_alert_outbox_pending", "sink" => sink.clone())
                .set(n as f64);
            ::metrics::gauge!("cancelwatch_alert_outbox_oldest_pending_seconds", "sink" => sink)
                .set(age(oldest));
        }
    }
    if let Ok(open) = app.store.open_alerts_by_rule().await {
        let known = store::model::ALERT_TYPES.iter().map(|r| r.to_string());
        let rules: std::collections::BTreeSet<String> =
            known.chain(open.iter().map(|(r, _)| r.clone())).collect();
        for rule in rules {
            let n = open.iter().find(|(r, _)| *r == rule).map_or(0, |(_, n)| *n);
            ::metrics::gauge!("cancelwatch_alerts_open", "rule" => rule).set(n as f64);
        }
    }
    crate::metrics::collect_process();
    if let Ok(counts) = app.store.inbox_by_state().await {
        for state in store::model::EVENT_STATES {
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

/// Seconds since `at` (a stored time), 0 for none.
fn age(at: Option<String>) -> f64 {
    at.and_then(|t| time::parse_lenient(&t))
        .map(|t| (time::now() - t).num_milliseconds() as f64 / 1000.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::{inbox, providers};

    /// An app on a fresh database in `dir`, its workers counted as running;
    /// the engine's handle beside it.
    async fn ready_app(dir: &std::path::Path) -> (Arc<App>, store::sqlite::Db) {
        let mut config = Config::default();
        config.database.url = format!("sqlite://{}", dir.join("x.db").display());
        let path = config.database_path().unwrap();
        let engine = store::sqlite::SqliteStore::open(&path, &config.database)
            .await
            .unwrap();
        let db = engine.db().clone();
        let store: store::Store = Arc::new(engine);
        let (inbox, _writer) = inbox::Inbox::start(&store, &config.database);
        let providers = providers::Providers::from_config(&config);
        let app = App::new(Arc::new(config), store, providers, inbox);
        app.workers_alive
            .store(pipeline::feed::TASKS, Ordering::SeqCst);
        (Arc::new(app), db)
    }

    /// The gauge `cancelwatch_ready` says what `/readyz` says, for alerting:
    /// 1, then 0 from a failed sync of the WAL on.
    #[test]
    fn the_ready_gauge_follows_readyz() {
        crate::metrics::with_local_metrics(|counted| async move {
            let dir = tempfile::tempdir().unwrap();
            let (app, db) = ready_app(dir.path()).await;
            let scrape = || async {
                let _ = render_metrics(State(app.clone())).await.into_response();
                counted.render()
            };
            assert!(scrape().await.contains("cancelwatch_ready 1\n"));
            db.fail_sync();
            assert!(scrape().await.contains("cancelwatch_ready 0\n"));
        });
    }

    /// `/readyz` turns red once a sync of the WAL failed and stays red: every
    /// delivery is refused until the daemon restarts.
    #[tokio::test]
    async fn readyz_fails_after_a_failed_wal_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (app, db) = ready_app(dir.path()).await;
        let status = |app: &Arc<App>| {
            let app = app.clone();
            async move { readyz(State(app)).await.into_response().status() }
        };
        let live = |app: &Arc<App>| {
            let app = app.clone();
            async move { healthz(State(app)).await.into_response().status() }
        };
        assert_eq!(status(&app).await, StatusCode::OK);
        assert_eq!(live(&app).await, StatusCode::OK);
        db.fail_sync();
        assert_eq!(status(&app).await, StatusCode::SERVICE_UNAVAILABLE);
        // Only a restart helps now: liveness fails too.
        assert_eq!(live(&app).await, StatusCode::SERVICE_UNAVAILABLE);
    }
}
