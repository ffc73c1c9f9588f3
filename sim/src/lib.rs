//! The provider simulator: a local stand-in for the Stripe and Juice APIs
//! (same JSON shapes and error bodies as the real ones), scripted cancel
//! scenarios, and correctly signed deliveries to a cancelwatch daemon. Used by
//! `cancelwatch simulate`, `demo` and the integration tests.
//!
//! What it serves (one port for both providers):
//! - Stripe (`Authorization: Bearer <key>` and `Stripe-Version` required):
//!   `GET|POST(cancel) /v2/money_management/outbound_transfers/{id}`,
//!   `GET|POST(cancel) /v2/core/batch_jobs/{id}`, `GET /v2/core/events/{id}` and
//!   `GET /v2/core/events?created[gte]=&types[0]=&object_id=&limit=` (newest
//!   first, `next_page_url` until null). Cancels honour `Idempotency-Key`.
//!   A transfer cancel sends `…outbound_transfer.canceled`; a batch-job cancel
//!   answers `cancelling`, sends `…batch_job.updated`, and ~300 ms later moves
//!   the job to `canceled` and sends `…batch_job.canceled`.
//! - Juice (`Authorization: <key>` or `Bearer <key>`): `GET /bulk-transfers`,
//!   `GET /bulk-transfers/{id}`, `POST /bulk-transfers/{id}/cancel` (422
//!   `partial_cancellation` when some items could not be cancelled; the state
//!   changed anyway). ~300 ms after a cancel, in-flight items complete and
//!   cancelled ones are reversed, each with its webhook. Items come in the
//!   documented shape, without an `id`, unless
//!   [`Simulator::serve_juice_item_ids`] is on.
//! - [`Faults`] inject errors, 429s, hangs, outages and latency into API
//!   answers, and errors or hangs after a cancel was applied (a lost answer).
//! - [`Simulator::overlapping_fetches`] names the fetches of one resource
//!   that were answered at the same time.
//! - Scenarios ([`Simulator::scenario`]) script a resource's life step by
//!   step; [`Simulator::play_step`] applies a step and sends its deliveries,
//!   [`Simulator::apply_step`] applies it without sending (a lost delivery).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use cancelwatch_sim::{DeliveryOptions, SimConfig, Simulator};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let sim = Simulator::start(listener, SimConfig {
//!     target: Some("http://127.0.0.1:8080".into()),
//!     ..SimConfig::default()
//! }).await?;
//! let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
//! for step in &scenario.steps {
//!     sim.play_step(step, &DeliveryOptions::default()).await?;
//! }
//! # Ok(()) }
//! ```

pub mod deliver;
pub mod faults;
mod juice_api;
mod overlap;
pub mod scenarios;
pub mod signing;
pub mod state;
mod stripe_api;
mod time;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use rand::seq::SliceRandom;

pub use deliver::{Delivery, DeliveryOptions, Provider};
pub use faults::Faults;
pub use scenarios::{Expectation, ExpectedHistory, ExpectedRefund, Scenario, Step};

use deliver::Signer;
use state::World;

/// What the simulator expects and signs with. Match it to the daemon's
/// configuration (api keys, first webhook secret, first checksum key).
/// Its `Debug` form hides the secrets.
#[derive(Clone, Default)]
pub struct SimConfig {
    /// Expected as `Authorization: Bearer <key>` on the Stripe API.
    pub stripe_api_key: String,
    /// Expected as `Authorization: <key>` or `Bearer <key>` on the Juice API.
    pub juice_api_key: String,
    /// Signs the `Stripe-Signature` of every Stripe delivery.
    pub stripe_webhook_secret: String,
    /// Signs the checksum of every Juice delivery (the business id).
    pub juice_checksum_key: String,
    /// The daemon's base URL; deliveries go to `{target}/webhooks/stripe|juice`.
    /// Without one, steps change the state but nothing is sent.
    pub target: Option<String>,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |s: &str| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("SimConfig")
            .field("stripe_api_key", &hidden(&self.stripe_api_key))
            .field("juice_api_key", &hidden(&self.juice_api_key))
            .field(
                "stripe_webhook_secret",
                &hidden(&self.stripe_webhook_secret),
            )
            .field("juice_checksum_key", &hidden(&self.juice_checksum_key))
            .field("target", &self.target)
            .finish()
    }
}

/// How many of the latest API requests the simulator keeps for
/// [`Simulator::requests`].
pub const REQUESTS_KEPT: usize = 10_000;

/// Adds `request` to the end of `log`, dropping the oldest beyond `keep`.
fn remember(
    log: &mut std::collections::VecDeque<RecordedRequest>,
    request: RecordedRequest,
    keep: usize,
) {
    while log.len() >= keep.max(1) {
        log.pop_front();
    }
    log.push_back(request);
}

/// One API request the simulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// Lowercased names; the `authorization` value is replaced by `present`.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The value of a header (name in any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// State shared by the API server, background senders and every handle.
pub(crate) struct Shared {
    pub(crate) cfg: SimConfig,
    world: Mutex<World>,
    pub(crate) faults: Faults,
    /// The most recent API requests, at most [`REQUESTS_KEPT`].
    pub(crate) requests: Mutex<std::collections::VecDeque<RecordedRequest>>,
    client: reqwest::Client,
    signer: Signer,
    /// Background tasks (follow-ups and their sends) not yet finished.
    in_flight: AtomicUsize,
    /// API requests being answered now, and the most there ever were.
    pub(crate) api_calls: AtomicUsize,
    pub(crate) api_calls_peak: AtomicUsize,
    background_errors: Mutex<Vec<String>>,
    /// Juice items are served with their `id` (off: the documented shape).
    juice_item_ids: AtomicBool,
    /// Fetches of one resource answered at the same time.
    pub(crate) overlaps: Arc<Mutex<overlap::Overlaps>>,
}

impl Shared {
    pub(crate) fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn juice_item_ids(&self) -> bool {
        self.juice_item_ids.load(Ordering::SeqCst)
    }

    /// Sends deliveries caused by an API call, in order, in a spawned task.
    pub(crate) fn send_in_background(self: &Arc<Self>, deliveries: Vec<Delivery>) {
        let Some(target) = self.cfg.target.clone() else {
            return;
        };
        if deliveries.is_empty() {
            return;
        }
        let shared = self.clone();
        self.spawn(async move {
            for d in &deliveries {
                if let Err(e) = deliver::send(&shared.client, &target, &shared.signer, d).await {
                    tracing::warn!(error = %format!("{e:#}"), "simulator: a delivery was not accepted");
                    shared
                        .background_errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!("{e:#}"));
                }
            }
        });
    }

    /// Spawns a background task counted by [`Simulator::wait_background`].
    pub(crate) fn spawn(
        self: &Arc<Self>,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let shared = self.clone();
        tokio::spawn(async move {
            task.await;
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A running simulator; cheap to clone.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Simulator {
    /// Serves the simulated APIs on `listener` in a spawned task.
    pub async fn start(
        listener: tokio::net::TcpListener,
        cfg: SimConfig,
    ) -> anyhow::Result<Simulator> {
        let addr = listener
            .local_addr()
            .context("simulator: reading the listener's address")?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("simulator: building the HTTP client")?;
        let signer = Signer {
            stripe_webhook_secret: cfg.stripe_webhook_secret.clone(),
            juice_checksum_key: cfg.juice_checksum_key.clone(),
        };
        let shared = Arc::new(Shared {
            cfg,
            world: Mutex::new(World::default()),
            faults: Faults::default(),
            requests: Mutex::new(std::collections::VecDeque::new()),
            client,
            signer,
            in_flight: AtomicUsize::new(0),
            api_calls: AtomicUsize::new(0),
            api_calls_peak: AtomicUsize::new(0),
            background_errors: Mutex::new(Vec::new()),
            juice_item_ids: AtomicBool::new(false),
            overlaps: Arc::default(),
        });
        let router = router(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::error!(error = %e, "simulator API stopped");
            }
        });
        Ok(Simulator { shared, addr })
    }

    /// `http://127.0.0.1:PORT`: use it as `stripe.api_base` and `juice.api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every scenario name, in the order `simulate` plays them.
    pub fn scenario_names() -> &'static [&'static str] {
        scenarios::NAMES
    }

    /// A fresh instance of the named scenario, with ids never used before.
    /// Its Juice items are shaped (and expected) as the API serves them now.
    pub fn scenario(&self, name: &str) -> Option<Scenario> {
        scenarios::build(
            name,
            &self.shared.cfg.juice_checksum_key,
            self.shared.juice_item_ids(),
        )
    }

    /// Serves Juice items with their `id` (on) or in the documented shape,
    /// without one (off, the default). Answers, deliveries and scenarios
    /// built from then on follow it.
    pub fn serve_juice_item_ids(&self, on: bool) {
        self.shared.juice_item_ids.store(on, Ordering::SeqCst);
    }

    /// Puts a bulk transfer in place as it is (for tests that need a shape
    /// no scenario has). Nothing is sent.
    pub fn add_juice_bulk(&self, bulk: state::BulkTransfer) {
        self.shared.world().apply(&state::Change::NewBulk(bulk));
    }

    /// The id cancelwatch records a Juice item under, as the API serves it now.
    pub fn juice_item_key(&self, bulk_id: &str, item: &state::BulkItem) -> String {
        juice_api::item_key(bulk_id, item, self.shared.juice_item_ids())
    }

    /// Applies the step's state change and records its events (the events API
    /// lists them) without sending anything: a lost delivery, for backfill and
    /// reconcile tests.
    pub fn apply_step(&self, step: &Step) {
        let mut world = self.shared.world();
        for change in &step.changes {
            world.apply(change);
        }
        for d in &step.deliveries {
            world.record_delivery(d);
        }
    }

    /// Applies the step's state change, then sends its deliveries to the
    /// target (if one is configured). Fails if the daemon never accepts one.
    pub async fn play_step(&self, step: &Step, opts: &DeliveryOptions) -> anyhow::Result<()> {
        self.apply_step(step);
        if self.shared.cfg.target.is_none() {
            return Ok(());
        }
        let mut order: Vec<&Delivery> = step.deliveries.iter().collect();
        if opts.shuffle {
            order.shuffle(&mut rand::thread_rng());
        }
        let copies = if opts.duplicate { 2 } else { 1 };
        let mut first = true;
        for d in order {
            for _ in 0..copies {
                if !first && !opts.delay.is_zero() {
                    tokio::time::sleep(opts.delay).await;
                }
                first = false;
                self.deliver(d).await?;
            }
        }
        Ok(())
    }

    /// Plays every step of a scenario in order.
    pub async fn play(&self, scenario: &Scenario, opts: &DeliveryOptions) -> anyhow::Result<()> {
        for step in &scenario.steps {
            self.play_step(step, opts)
                .await
                .with_context(|| format!("{} / {}", scenario.name, step.label))?;
        }
        Ok(())
    }

    /// Sends one delivery to the target now (signed now), with retries.
    pub async fn deliver(&self, d: &Delivery) -> anyhow::Result<()> {
        let target = self
            .shared
            .cfg
            .target
            .as_deref()
            .context("simulator: no target configured")?;
        deliver::send(&self.shared.client, target, &self.shared.signer, d).await
    }

    /// The handle to inject API faults.
    pub fn faults(&self) -> Faults {
        self.shared.faults.clone()
    }

    /// The API requests received so far, oldest first: the most recent
    /// [`REQUESTS_KEPT`], so that a simulator left running (`demo`,
    /// `simulate`, a benchmark) does not grow without bound.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The most API requests it was ever answering at once (a hang counts
    /// for as long as it lasts).
    pub fn peak_concurrent_requests(&self) -> usize {
        self.shared.api_calls_peak.load(Ordering::SeqCst)
    }

    /// The resources (their API paths) of every fetch that began while
    /// another fetch of the same resource was still being answered, once
    /// per such fetch. Listings, events and cancels are not fetches.
    pub fn overlapping_fetches(&self) -> Vec<String> {
        self.overlapping_fetches_at()
            .into_iter()
            .map(|(path, _)| path)
            .collect()
    }

    /// [`Simulator::overlapping_fetches`], each with when it began. A fetch
    /// whose caller died goes on being answered (through its latency) until
    /// the simulator writes to the closed connection: a caller's crash test
    /// tells those apart by the time.
    pub fn overlapping_fetches_at(&self) -> Vec<(String, std::time::Instant)> {
        self.shared
            .overlaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .seen()
    }

    /// Events generated so far: Stripe events (as listed by the events API)
    /// plus distinct Juice deliveries.
    pub fn event_count(&self) -> usize {
        let world = self.shared.world();
        world.events.len() + world.juice_events.len()
    }

    /// Waits until the follow-ups of API calls (e.g. a batch job leaving
    /// `cancelling`, Juice reversals) and their deliveries are done, up to
    /// `max`. Returns whether everything finished.
    pub async fn wait_background(&self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Deliveries sent after API calls that the daemon never accepted.
    pub fn background_errors(&self) -> Vec<String> {
        self.shared
            .background_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An error answer of a simulated API, in the provider's own error shape.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: axum::http::StatusCode,
    pub(crate) body: serde_json::Value,
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// A 404 in the shape of the provider whose path prefix was asked for.
async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    let status = axum::http::StatusCode::NOT_FOUND;
    let message = format!("Unrecognized request URL: {}", uri.path());
    if uri.path().starts_with("/v2/") {
        stripe_api::error(status, "invalid_request_error", "not_found", &message)
    } else {
        juice_api::error(
            status,
            "not_found",
            &message,
            "invalid_request_error",
            serde_json::json!({}),
        )
    }
}

fn router(shared: Arc<Shared>) -> Router {
    stripe_api::routes()
        .merge(juice_api::routes())
        .fallback(unknown_route)
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            faults::middleware,
        ))
        .with_state(shared)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request log keeps the latest ones, oldest first, and no more.
    #[test]
    fn the_request_log_keeps_the_latest_only() {
        let request = |n: usize| RecordedRequest {
            method: "GET".into(),
            path: format!("/v2/x/{n}"),
            headers: Vec::new(),
        };
        let mut log = std::collections::VecDeque::new();
        for n in 0..5 {
            remember(&mut log, request(n), 3);
        }
        let paths: Vec<&str> = log.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/v2/x/2", "/v2/x/3", "/v2/x/4"]);
    }

    #[test]
    fn debug_hides_secrets() {
        let cfg = SimConfig {
            stripe_api_key: "sk_test_secret_key".into(),
            juice_api_key: "juice_secret_key".into(),
            stripe_webhook_secret: "whsec_secret".into(),
            juice_checksum_key: "business-secret".into(),
            target: Some("http://127.0.0.1:1".into()),
        };
        let shown = format!("{cfg:?}");
        for secret in [
            "sk_test_secret_key",
            "juice_secret_key",
            "whsec_secret",
            "business-secret",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("127.0.0.1:1"));
    }
}
