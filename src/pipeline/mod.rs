//! From stored delivery to audit trail: workers claim deliveries from the
//! inbox, fetch the resource each is about, and record what changed
//! ([`record`]); the reconciler fetches again what still moves; cancel,
//! replay and backfill are library functions the CLI and HTTP API call.
//!
//! Everything here needs only a [`Context`] (configuration, database,
//! provider clients), so commands can run without the HTTP server.

pub mod backfill;
pub mod cancel;
pub mod decide;
pub mod feed;
pub mod recorder;

use std::sync::Arc;

use tokio::sync::Notify;

use crate::config::Config;
use crate::providers::{ProviderError, Providers};
use crate::store::{Store, StoreError};

/// What the pipeline needs: configuration, database, provider clients, and
/// the bell that wakes workers when deliveries arrive.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub store: Store,
    pub providers: Providers,
    /// Rung after deliveries are added (the inbox's own bell inside the daemon).
    pub wake: Arc<Notify>,
}

impl Context {
    pub fn new(
        config: Arc<Config>,
        store: Store,
        providers: Providers,
        wake: Arc<Notify>,
    ) -> Context {
        Context {
            config,
            store,
            providers,
            wake,
        }
    }

    /// Opens the configured database (migrated) and builds the provider
    /// clients: what a command needs without the daemon.
    pub async fn open(config: Config) -> anyhow::Result<Context> {
        config.validate()?;
        let store = crate::open_store(&config).await?;
        let providers = Providers::from_config(&config);
        Ok(Context::new(
            Arc::new(config),
            store,
            providers,
            Arc::new(Notify::new()),
        ))
    }

    /// Wakes idle workers.
    pub fn ring(&self) {
        self.wake.notify_waiters();
        self.wake.notify_one();
    }
}

/// Errors of the pipeline's library functions, each with its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(
        "unknown resource kind {0:?} (one of {kinds})",
        kinds = crate::providers::knowledge::cancellable_kinds().join(", ")
    )]
    UnknownKind(String),
    #[error("invalid id {0:?}")]
    InvalidId(String),
    #[error("no API key configured for {0}")]
    NotConfigured(String),
    #[error("no stored delivery with key {0:?}")]
    NoSuchDelivery(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("provider: {0}")]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The outcome of a replay.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ReplayReport {
    pub key: String,
    pub previous_state: String,
    /// The delivery's state after the replay (`pending` when a daemon will take it).
    pub state: String,
    /// True when this call processed it; false when it was left to the workers.
    pub processed_inline: bool,
}

/// Re-processes a stored delivery, whatever its state: puts it back in line
/// and, with `inline`, processes it at once in this process (a CLI without a
/// running daemon). A daemon's worker may take it first; the lease keeps it
/// to one. Only changed state yields new transitions.
pub async fn replay(ctx: &Context, key: &str, inline: bool) -> Result<ReplayReport, PipelineError> {
    let delivery = ctx
        .store
        .delivery_by_key(key)
        .await?
        .ok_or_else(|| PipelineError::NoSuchDelivery(key.to_string()))?;
    let previous_state = delivery.state.clone();
    let now = crate::time::now_str();
    let requeued = ctx.store.requeue(delivery.id, &now).await?;
    if !requeued {
        tracing::info!(key = %key, "replay: the delivery is being processed right now");
    }
    let mut processed_inline = false;
    if requeued && inline {
        let lease_until = feed::lease_until(&ctx.config);
        if let Some(d) = ctx.store.claim_one(delivery.id, &now, &lease_until).await? {
            recorder::process(ctx, d, &lease_until).await;
            processed_inline = true;
        }
    } else if requeued {
        ctx.ring();
    }
    let state = ctx
        .store
        .delivery(delivery.id)
        .await?
        .map(|d| d.state)
        .unwrap_or_default();
    Ok(ReplayReport {
        key: key.to_string(),
        previous_state,
        state,
        processed_inline,
    })
}
