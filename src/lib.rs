//! cancelwatch: the webhook consumer that follows payment cancellations to
//! their end. The life of one delivery, module by module:
//!
//! `ingress` → `providers::<p>::verify` → `inbox` (committed, 2xx) →
//! `pipeline::feed` claims it → `pipeline::decide` (`providers::<p>::fetch`)
//! → `pipeline::recorder` → `store` records it (`domain` decides the
//! transitions, refunds and alerts; one transaction) → `jobs::outbox`
//! delivers the alerts → `api` / `cli` read.
//!
//! This file wires the parts and owns start-up and shutdown.

pub mod alerts;
pub mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod domain;
pub mod inbox;
pub mod ingress;
pub mod jobs;
pub mod metrics;
pub mod pipeline;
pub mod providers;
pub mod server;
pub mod store;
pub mod time;

use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// What every part of the running daemon shares.
pub struct App {
    pub config: Arc<Config>,
    pub store: store::Store,
    pub providers: providers::Providers,
    pub inbox: inbox::Inbox,
    pub metrics: PrometheusHandle,
    /// Cancelled when the daemon shuts down; background tasks watch it.
    pub shutdown: CancellationToken,
    /// What workers, reconciler, cancel and replay share (config, db, provider clients).
    pub pipeline: Arc<pipeline::Context>,
    /// Workers running now; `/readyz` fails at zero.
    pub workers_alive: Arc<AtomicUsize>,
    /// Set at the shutdown signal: `/readyz` fails from then on, while the
    /// daemon still serves for `server.drain_secs`.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl App {
    /// The shared parts, before any background task has started.
    pub fn new(
        config: Arc<Config>,
        store: store::Store,
        providers: providers::Providers,
        inbox: inbox::Inbox,
    ) -> App {
        let pipeline = Arc::new(pipeline::Context::new(
            config.clone(),
            store.clone(),
            providers.clone(),
            inbox.wake.clone(),
        ));
        App {
            config,
            store,
            providers,
            inbox,
            metrics: metrics::handle(),
            shutdown: CancellationToken::new(),
            pipeline,
            workers_alive: Arc::new(AtomicUsize::new(0)),
            draining: Arc::default(),
        }
    }
}

/// Opens the database named by the configuration (creating it), migrated.
pub async fn open_store(config: &Config) -> anyhow::Result<store::Store> {
    let url = config.database_url()?;
    store::open(&config.database, &url)
        .await
        .with_context(|| format!("opening the database at {}", config.database_display()))
}

/// Opens the configured database for reading only (the read commands).
pub async fn open_store_read_only(config: &Config) -> anyhow::Result<store::Store> {
    let url = config.database_url()?;
    Ok(store::open_read_only(&config.database, &url).await?)
}

/// Runs the daemon on an already-bound listener until SIGINT or SIGTERM.
pub async fn run(config: Config, listener: TcpListener) -> anyhow::Result<()> {
    run_until(config, listener, shutdown_signal()).await
}

/// Runs the daemon until `shutdown` resolves: stops accepting, finishes
/// in-flight requests, stops the background tasks, commits what is queued and
/// closes the database. The admin surface is bound here when
/// `server.admin_listen` names an address of its own.
pub async fn run_until(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let admin = match config.admin_listen_addr()? {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("server.admin_listen: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    run_with_admin(config, listener, admin, shutdown).await
}

/// [`run_until`] with the admin surface's listener bound by the caller
/// (`None`: everything on `listener`), as tests bind `127.0.0.1:0`.
pub async fn run_with_admin(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    // Watched from now, not once the database is open: a signal that comes
    // while migrations run is a stop asked for, not a kill.
    let stop_asked = CancellationToken::new();
    let asked = stop_asked.clone();
    let watching = tokio::spawn(async move {
        shutdown.await;
        asked.cancel();
    });
    let ran = match while_starting(listener, open_store(&config)).await {
        Ok((listener, Ok(store))) => {
            let stop = async move { stop_asked.cancelled().await };
            run_on(config, store, listener, admin, stop).await
        }
        Ok((_, Err(e))) | Err(e) => Err(e),
    };
    watching.abort();
    ran
}

/// Runs `opening` (opening and migrating the database, which can take
/// minutes on a large one) while a stand-in answers on `listener`:
/// `/healthz` 200 and `/readyz` 503, so an orchestrator neither routes work
/// to the daemon nor kills it as dead meanwhile. The stand-in accepts on a
/// copy of the listening socket and stops once `opening` is done; the
/// daemon then serves on the socket itself, whose queue of connections was
/// never closed.
async fn while_starting<T>(
    listener: TcpListener,
    opening: impl Future<Output = T>,
) -> anyhow::Result<(TcpListener, T)> {
    let socket = listener.into_std()?;
    let copy = TcpListener::from_std(socket.try_clone()?)?;
    let listener = TcpListener::from_std(socket)?;
    let (opened, stand_in_done) = tokio::sync::oneshot::channel::<()>();
    let mut stand_in = tokio::spawn(async move {
        axum::serve(copy, api::health::starting_router())
            .with_graceful_shutdown(async {
                let _ = stand_in_done.await;
            })
            .await
    });
    let out = opening.await;
    let _ = opened.send(());
    // Requests in flight on the stand-in get their answer; a client that
    // keeps its connection open is not waited for long.
    if tokio::time::timeout(Duration::from_secs(1), &mut stand_in)
        .await
        .is_err()
    {
        tracing::debug!("the start-up stand-in did not finish within a second; dropped");
        stand_in.abort();
    }
    Ok((listener, out))
}

/// [`run_until`] on a store already opened (and migrated) for `config`,
/// and listeners bound by the caller: `admin`, when given, serves `/ui/`,
/// `/v1` and `/metrics`, and `listener` only the webhooks and the health
/// checks; without it `listener` serves everything.
pub async fn run_on(
    config: Config,
    store: store::Store,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (inbox, writer) = inbox::Inbox::start(&store, &config.database);
    let providers = providers::Providers::from_config(&config);
    for name in providers::knowledge::names() {
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
    let app = Arc::new(App::new(config, store.clone(), providers, inbox));
    metrics::start_at_zero(&app.config);

    let mut tasks = tokio::task::JoinSet::<()>::new();
    let handoff = pipeline::feed::spawn(
        app.pipeline.clone(),
        &mut tasks,
        app.shutdown.clone(),
        app.workers_alive.clone(),
    );
    app.inbox.hand_to(handoff);
    jobs::spawn(&app.pipeline, &app.shutdown, &mut tasks);
    tasks.spawn(share_budgets(app.clone()));
    let (router, admin_router) = match &admin {
        Some(_) => {
            let (public, admin) = api::split_router(app.clone());
            (public, Some(admin))
        }
        None => (api::router(app.clone()), None),
    };
    let addr = listener.local_addr()?;
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(
        version = VERSION,
        %addr,
        admin = %admin_addr.map_or_else(|| "the same".to_string(), |a| a.to_string()),
        database = %app.config.database_display(),
        "cancelwatch listening"
    );

    let stop = app.shutdown.clone();
    let signal_stop = stop.clone();
    let (draining, drain) = (
        app.draining.clone(),
        Duration::from_secs(app.config.server.drain_secs),
    );
    tokio::spawn(async move {
        shutdown.await;
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        if !drain.is_zero() {
            tracing::info!(
                secs = drain.as_secs(),
                "draining: /readyz fails, still serving"
            );
            tokio::time::sleep(drain).await;
        }
        signal_stop.cancel();
    });
    // The database and its WAL, the readers, one connection a worker to a
    // provider, the sinks, the log: what is not a client's.
    let reserved =
        64 + app.config.workers.concurrency + 2 * app.config.database.read_connections as usize;
    let serve_opts = server::ServeOptions {
        max_connections: server::fit_to_descriptors(app.config.server.max_connections, reserved),
        max_connections_per_ip: app.config.server.max_connections_per_ip,
        header_read_timeout: Duration::from_secs(app.config.server.header_read_timeout_secs),
        write_timeout: Duration::from_secs(app.config.server.write_timeout_secs),
        grace,
    };
    match (admin, admin_router) {
        (Some(admin), Some(admin_router)) => {
            let admin_opts = serve_opts.clone();
            tokio::join!(
                server::serve(listener, router, serve_opts, stop.clone()),
                server::serve(admin, admin_router, admin_opts, stop.clone()),
            );
        }
        _ => server::serve(listener, router, serve_opts, stop.clone()).await,
    }
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
    store.close().await;
    tracing::info!("cancelwatch stopped");
    Ok(())
}

/// Keeps each provider's request budget divided among the replicas alive,
/// so that together they spend what the provider allows, not a multiple.
async fn share_budgets(app: Arc<App>) {
    let mut shared = 1;
    loop {
        match app.store.live_replicas().await {
            Ok(n) if n != shared => {
                tracing::info!(
                    replicas = n,
                    "provider request budgets shared among the replicas alive"
                );
                app.providers.share_budget(n);
                shared = n;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "counting the replicas alive failed"),
        }
        tokio::select! {
            _ = app.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// An error and its causes on one line, each cause said once: a cause
/// whose text its parent already quotes (a database error quoting the I/O
/// error under it) is not repeated.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !line.ends_with(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
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
    #[cfg(unix)]
    ignore_hangups();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        _ = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// SIGHUP (a closed terminal, a log rotation's reload) would end the process
/// by default; the daemon has nothing to reopen (it logs to stderr), so it
/// notes the signal and goes on.
#[cfg(unix)]
fn ignore_hangups() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                while hangups.recv().await.is_some() {
                    tracing::info!(
                        "SIGHUP received and ignored: logs go to stderr, nothing to reopen"
                    );
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP; it would stop the daemon"),
    }
}

/// The version and the commit it was built from, as `--version` and the
/// start-up line say them.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("GIT_COMMIT_OF_CANCELWATCH"),
    ")"
);

/// Sets up logging as configured (`RUST_LOG` overrides the level).
/// Colours only when stderr is a terminal: journald and log files get none.
pub fn init_logging(config: &config::LogConfig) {
    use std::io::IsTerminal;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    let ansi = std::io::stderr().is_terminal();
    let _ = log_subscriber(config, filter, ansi, std::io::stderr).try_init();
}

/// The log as `config.format` says, to `writer`. In JSON each line holds the
/// event's name as `fields.message` and each field as a plain value (a
/// string, a number), which is why fields are recorded with `%` or as
/// values, never with `?` (an `Option` would read `Some("processing")`).
fn log_subscriber<W>(
    config: &config::LogConfig,
    filter: tracing_subscriber::EnvFilter,
    ansi: bool,
    writer: W,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if config.format == "json" {
        Box::new(builder.json().finish())
    } else {
        Box::new(builder.finish())
    }
}

#[cfg(test)]
mod tests {

    /// Each cause once, even where a message quotes the one under it.
    #[test]
    fn an_error_line_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = anyhow::Error::new(crate::store::StoreError::Sql(sqlx::Error::Io(io)))
            .context("opening the database");
        assert_eq!(
            super::error_line(&e),
            "opening the database: database: error communicating with database: refused"
        );
    }
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a log writes, kept for the test to read.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A JSON log line of a transition names the event and gives each field
    /// as a plain value: `"from":"processing"`, not `Some(\"processing\")`;
    /// a transition from nothing leaves `from` out.
    #[test]
    fn json_logs_hold_the_event_name_and_plain_values() {
        let kept = Kept::default();
        let config = config::LogConfig {
            format: "json".into(),
            level: "info".into(),
        };
        let writer = kept.clone();
        let filter = tracing_subscriber::EnvFilter::new(&config.level);
        let log = log_subscriber(&config, filter, false, move || writer.clone());
        let moved = |from: Option<&str>| domain::observe::Moved {
            kind: "stripe.outbound_transfer".into(),
            resource_id: "obt_1".into(),
            from: from.map(str::to_string),
            to: "canceled".into(),
            trigger: "event",
        };
        tracing::subscriber::with_default(log, || {
            domain::observe::report(&[moved(Some("processing")), moved(None)]);
        });
        let text = String::from_utf8(kept.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let fields = &lines[0]["fields"];
        assert_eq!(fields["message"], "transition", "{text}");
        assert_eq!(fields["from"], "processing", "{text}");
        assert_eq!(fields["to"], "canceled", "{text}");
        assert_eq!(fields["resource"], "obt_1", "{text}");
        assert_eq!(lines[0]["level"], "INFO", "{text}");
        assert!(lines[1]["fields"].get("from").is_none(), "{text}");
        assert!(!text.contains("Some("), "{text}");
    }
}
