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
    let path = config.database_path()?;
    store::open(&config.database, &path)
        .await
        .with_context(|| format!("opening the database at {}", path.display()))
}

/// Opens the configured database for reading only (the read commands).
pub async fn open_store_read_only(config: &Config) -> anyhow::Result<store::Store> {
    let path = config.database_path()?;
    Ok(store::open_read_only(&config.database, &path).await?)
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
    run_on(config, listener, admin, shutdown).await
}

/// [`run_until`] on listeners bound by the caller: `admin`, when given,
/// serves `/ui/`, `/v1` and `/metrics`, and `listener` only the webhooks
/// and the health checks; without it `listener` serves everything.
pub async fn run_on(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let store = open_store(&config).await?;
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

    let mut tasks = tokio::task::JoinSet::<()>::new();
    let handoff = pipeline::feed::spawn(
        app.pipeline.clone(),
        &mut tasks,
        app.shutdown.clone(),
        app.workers_alive.clone(),
    );
    app.inbox.hand_to(handoff);
    jobs::spawn(&app.pipeline, &app.shutdown, &mut tasks);
    let (router, admin_router) = match &admin {
        Some(_) => (
            api::public_router(app.clone()),
            Some(api::admin_router(app.clone())),
        ),
        None => (api::router(app.clone()), None),
    };
    let addr = listener.local_addr()?;
    let admin_addr = admin.as_ref().map(|l| l.local_addr()).transpose()?;
    tracing::info!(
        version = VERSION,
        %addr,
        admin = %admin_addr.map_or_else(|| "the same".to_string(), |a| a.to_string()),
        database = %app.config.database_path()?.display(),
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
    let serve_opts = server::ServeOptions {
        max_connections: app.config.server.max_connections,
        header_read_timeout: Duration::from_secs(app.config.server.header_read_timeout_secs),
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if config.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
