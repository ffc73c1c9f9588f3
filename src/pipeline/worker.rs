//! Workers, in three parts, so that the one writer connection is shared the
//! way the inbox's group commit shares its sync to disk:
//!
//! - the **feeder** keeps a queue of leased deliveries (twice
//!   `workers.concurrency`) ahead of the slots, each started at the next
//!   free slot. A new delivery that arrives while a slot or a place in that
//!   queue is free (and the feeder is not waiting for it) is leased by the
//!   very commit that stores it and handed over ([`Handoff`]); the feeder
//!   claims the rest (those that found no room, retries, lapsed leases) in
//!   batches, one statement a batch (lapsed leases first, then in arrival
//!   order). Either way never two of one resource at once, and no more
//!   than `workers.concurrency` being decided at once;
//! - each claimed delivery is **decided** in a task of its own: what it asks
//!   for ([`plan`]) and what the provider answers ([`Outcome`]). Nothing is
//!   written and no transaction is open across the HTTP call;
//! - the **recorder** writes the outcomes as they come, as many as are
//!   waiting in one transaction (when few wait, it waits up to [`LINGER`]
//!   for more): an observation, the delivery's end and its
//!   alerts commit together or not at all. When one outcome's write fails
//!   or panics, the batch is written again with a savepoint for each, so
//!   that outcome costs only itself.
//!
//! A failed attempt is retried with backoff; after `workers.max_attempts` the
//! delivery goes `dead` and the others go on.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::record::{self, Trigger};
use super::Context;
use crate::alerts::Changes;
use crate::config::{Config, JuiceConfig, StripeConfig};
use crate::providers::http::backoff;
use crate::providers::juice::event as juice_event;
use crate::providers::{juice, stripe, ApiError, Observation, Target};
use crate::store::inbox::Delivery;
use crate::store::{self, resources, Tx};
use crate::time;

/// Most deliveries claimed in one statement.
const CLAIM_BATCH: usize = 128;
/// How long an acknowledgement commit may wait for a batch of the
/// recorder's to let it through (plus the one outcome being written).
const ACK_WAIT: Duration = Duration::from_millis(3);
/// Most plain observations recorded together (a run of `record_all`).
const RECORD_RUN: usize = 64;
/// How long the recorder waits for more outcomes when fewer than half of
/// `workers.concurrency` are waiting. Each transaction has fixed costs (its
/// turn at the writer, `BEGIN`, preparing its statements, the pages of its
/// commit, many of them index pages it shares with the next one); at 1,000
/// deliveries a second, writing them one or two at a time held the writer
/// over half of the time, and gathering them for this long halved that, for
/// a millisecond or two more from delivery to record.
const LINGER: Duration = Duration::from_millis(2);
/// Most outcomes written in one transaction. A batch holds the writer
/// connection while it runs, and an acknowledgement may wait behind one, so
/// this bounds that wait (a few milliseconds) as well.
const WRITE_BATCH: usize = 256;
/// The recorder's queue, in slots (`workers.concurrency`): decided
/// outcomes wait there for their turn at the writer. A slot comes back
/// once its outcome is queued, so a queue as long as the slots held slots
/// while a turn was written, and turns stayed at about half the slots (33
/// deliveries at 32 slots); four times as long, turns gather about 57 and
/// the writer's time a delivery falls by a fifth (README, Performance,
/// item 32). The provider still sees no more than the slots at once.
const RECORDER_QUEUE_PER_SLOT: usize = 4;
/// The long-running tasks [`spawn`] starts: the feeder and the recorder.
pub const TASKS: usize = 2;

/// What a delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to fetch: the delivery is marked `ignored`.
    Ignore(String),
    /// Fetch this resource; with `reversal`, also complete that transfer's refund.
    Fetch {
        target: Target,
        reversal: Option<String>,
    },
    /// A reversal event naming only a transfer: complete its refund.
    Reversal(String),
}

/// Decides what a stored delivery is about (pure: from its columns and body).
pub fn plan(stripe_cfg: &StripeConfig, juice_cfg: &JuiceConfig, d: &Delivery) -> Plan {
    let body: Option<Value> = d
        .raw_body
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok());
    match d.provider.as_str() {
        stripe::NAME => {
            let followed = d
                .event_type
                .starts_with("v2.money_management.outbound_transfer.")
                || d.event_type.starts_with("v2.core.batch_job.")
                || stripe_cfg.follow_event_types.contains(&d.event_type);
            let (Some(kind), Some(id)) = (&d.resource_kind, &d.resource_id) else {
                return Plan::Ignore("the event names no related object".into());
            };
            if !followed {
                return Plan::Ignore(format!("event type {} is not followed", d.event_type));
            }
            let url = body
                .as_ref()
                .and_then(|b| b.pointer("/related_object/url"))
                .and_then(Value::as_str)
                .map(str::to_string);
            Plan::Fetch {
                target: Target {
                    kind: kind.clone(),
                    id: id.clone(),
                    context: d.context.clone(),
                    url,
                    trigger_event: d.event_id.clone(),
                },
                reversal: None,
            }
        }
        juice::NAME => {
            let reversal = if juice_cfg.reversal_events.contains(&d.event_type) {
                body.as_ref()
                    .and_then(|b| b.get("data"))
                    .and_then(|data| juice_event::transfer_id(&d.event_type, data))
            } else {
                None
            };
            match (&d.resource_kind, &d.resource_id, reversal) {
                (Some(kind), Some(id), reversal) => Plan::Fetch {
                    target: Target {
                        kind: kind.clone(),
                        id: id.clone(),
                        ..Target::default()
                    },
                    reversal,
                },
                (_, _, Some(transfer)) => Plan::Reversal(transfer),
                _ => Plan::Ignore(format!("event {} names no bulk transfer", d.event_type)),
            }
        }
        other => Plan::Ignore(format!("unknown provider {other}")),
    }
}

/// The trigger recorded for a delivery's observations.
pub fn trigger_of(d: &Delivery) -> Trigger {
    let id = d.event_id.clone().unwrap_or_else(|| d.dedupe_key.clone());
    if d.source == "backfill" {
        Trigger::backfill(id)
    } else {
        Trigger::event(id)
    }
}

/// The lease end of a claim made now.
pub fn lease_until(config: &Config) -> String {
    time::fmt(time::now() + chrono::Duration::seconds(config.workers.lease_secs as i64))
}

/// What deciding a delivery learned, for the recorder to write.
#[derive(Debug)]
pub enum Outcome {
    /// Nothing to fetch: the delivery ends `ignored`.
    Ignore(String),
    /// The resource as the provider has it now; with `reversal`, also
    /// complete that transfer's refund.
    Observed {
        obs: Box<Observation>,
        context: Option<String>,
        reversal: Option<String>,
    },
    /// A reversal event naming only a transfer: complete its refund.
    Reversal(String),
    /// The provider says the resource does not exist: the delivery is dead.
    NotFound { target: Target, detail: String },
    /// The attempt failed: retried with backoff (at least `retry_after`),
    /// or `dead` after the last attempt.
    Failed {
        error: String,
        retry_after: Option<Duration>,
    },
    /// Our credentials were refused or are missing: the attempt is given
    /// back uncounted, and the delivery waits for a working key.
    Released(String),
    /// The provider rate-limits us (429): the attempt is given back
    /// uncounted, and the delivery waits what the provider asked for (or
    /// else the backoff its next attempt would have had). A rate limit that
    /// lasts (Juice allows 120 reads a minute) must not turn deliveries
    /// into dead letters.
    RateLimited {
        error: String,
        retry_after: Option<Duration>,
    },
}

/// What writing an outcome did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    Ignored(String),
    Processed {
        status: String,
        transitions: Vec<record::Moved>,
        stale: bool,
    },
    Reversal(String),
    Retry {
        error: String,
        next_attempt_at: String,
    },
    Dead(String),
    Released {
        error: String,
        next_attempt_at: String,
    },
    RateLimited {
        error: String,
        next_attempt_at: String,
    },
    /// The lease ran out first and another worker owns the delivery now:
    /// nothing of this attempt was kept.
    LeaseLost,
}

/// A decided delivery on its way to the recorder.
pub struct Decided {
    pub delivery: Delivery,
    pub lease_until: String,
    pub outcome: Outcome,
}

/// Starts the feeder and the recorder into `tasks`; they stop when
/// `shutdown` fires (the recorder once the last decided delivery is
/// written). `alive` counts the running ones (readiness wants [`TASKS`]).
///
/// Returns the [`Handoff`] through which the inbox's group commit gives new
/// deliveries to free slots, or the feeder's queue, directly.
pub fn spawn(
    ctx: Arc<Context>,
    tasks: &mut JoinSet<()>,
    shutdown: CancellationToken,
    alive: Arc<AtomicUsize>,
) -> Arc<Handoff> {
    let concurrency = ctx.config.workers.concurrency.max(1);
    let (decided, outcomes) = mpsc::channel(RECORDER_QUEUE_PER_SLOT * concurrency);
    let (queue, claimed) = mpsc::channel::<Claimed>(2 * concurrency);
    let handoff = Arc::new(Handoff {
        ctx: ctx.clone(),
        slots: Arc::new(Semaphore::new(concurrency)),
        open: std::sync::Mutex::new(Some(Open {
            recorder: decided.clone(),
            queue: queue.clone(),
        })),
    });
    tasks.spawn(record_outcomes(ctx.clone(), outcomes, alive.clone()));
    tasks.spawn(feed(
        ctx,
        handoff.clone(),
        (queue, claimed),
        decided,
        shutdown,
        alive,
    ));
    handoff
}

/// The pipeline's slots (`workers.concurrency`) and the feeder's queue of
/// claimed deliveries, shared by the feeder and the inbox's group commit.
/// When a slot, or else a place in that queue, is free as new deliveries
/// are stored, the commit that stores them also leases them
/// ([`store::inbox::lease_new`]) and hands them over here: no claim
/// transaction of their own, and no wait for the feeder. Under load the
/// feeder, queued for the slots and for room in its queue, gets them first
/// (a reservation never jumps either line), so a backlog is still taken in
/// arrival order; what was not handed over waits in the inbox for a claim.
pub struct Handoff {
    ctx: Arc<Context>,
    slots: Arc<Semaphore>,
    /// `None` once the feeder has stopped: nothing more is handed over.
    open: std::sync::Mutex<Option<Open>>,
}

/// Where handed-over deliveries go while the pipeline runs.
struct Open {
    recorder: mpsc::Sender<Decided>,
    /// The feeder's queue of claimed deliveries, waiting for a slot.
    queue: mpsc::Sender<Claimed>,
}

/// Slots, and places in the feeder's queue, reserved for deliveries about
/// to be stored, and the lease they get.
pub struct Reserved {
    slots: Vec<OwnedSemaphorePermit>,
    places: Vec<mpsc::OwnedPermit<Claimed>>,
    pub lease_until: String,
}

impl Reserved {
    pub fn len(&self) -> usize {
        self.slots.len() + self.places.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Handoff {
    /// Takes up to `wanted` slots, then places in the feeder's queue, that
    /// are free right now (none while the feeder waits for them, or after
    /// shutdown).
    pub fn reserve(&self, wanted: usize) -> Reserved {
        let wanted = wanted.min(CLAIM_BATCH);
        let mut slots = Vec::new();
        let mut places = Vec::new();
        if let Some(open) = &*self.open.lock().unwrap_or_else(|e| e.into_inner()) {
            while slots.len() < wanted {
                match self.slots.clone().try_acquire_owned() {
                    Ok(slot) => slots.push(slot),
                    Err(_) => break,
                }
            }
            while slots.len() + places.len() < wanted {
                match open.queue.clone().try_reserve_owned() {
                    Ok(place) => places.push(place),
                    Err(_) => break,
                }
            }
        }
        Reserved {
            slots,
            places,
            lease_until: lease_until(&self.ctx.config),
        }
    }

    /// Starts a task for each delivery leased with `reserved`'s slots, and
    /// queues the rest for the feeder's next free slot; what is left over
    /// is free again. After shutdown the deliveries stay leased until their
    /// lease runs out, and are claimed then.
    pub fn start(&self, leased: Vec<Delivery>, reserved: Reserved) {
        // Held while handing over, so the feeder, which closes this before
        // it gives back what is left in its queue, finds all of it there.
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let Some(open) = &*open else {
            if !leased.is_empty() {
                tracing::warn!(
                    deliveries = leased.len(),
                    "the pipeline stopped as deliveries were handed to it; they are processed once their lease runs out"
                );
            }
            return;
        };
        let Reserved {
            slots,
            places,
            lease_until,
        } = reserved;
        let mut leased = leased.into_iter();
        // Slots first in the zip: once they run out, no delivery is taken
        // from `leased` and dropped.
        for (slot, delivery) in slots.into_iter().zip(leased.by_ref()) {
            tokio::spawn(decide_and_send(
                self.ctx.clone(),
                delivery,
                lease_until.clone(),
                slot,
                open.recorder.clone(),
            ));
        }
        let at = tokio::time::Instant::now();
        for (delivery, place) in leased.zip(places) {
            place.send(Claimed {
                delivery,
                lease: lease_until.clone(),
                at,
            });
        }
    }

    /// Hands nothing over from now on; tasks already started finish.
    fn close(&self) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Decrements the live-task count however the task ends (panics too).
struct AliveGuard(Arc<AtomicUsize>);

impl AliveGuard {
    fn new(alive: Arc<AtomicUsize>) -> AliveGuard {
        alive.fetch_add(1, Ordering::SeqCst);
        AliveGuard(alive)
    }
}

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The feeder, in two halves run together: the claimer keeps a queue of
/// leased deliveries (twice `workers.concurrency`) topped up, and the
/// starter gives each the next free slot. The inbox's group commit fills
/// the same queue with new deliveries whenever it has room and the claimer
/// is not waiting for it ([`Handoff`]). Leased ahead of the slots, the next
/// delivery starts the moment a slot comes back, rather than after a claim
/// has had its turn at the writer. On shutdown both stop, the closed
/// [`Handoff`] adds nothing more, what no slot took is given back, and the
/// feeder waits for its tasks.
async fn feed(
    ctx: Arc<Context>,
    handoff: Arc<Handoff>,
    (queue, mut claimed): (mpsc::Sender<Claimed>, mpsc::Receiver<Claimed>),
    decided: mpsc::Sender<Decided>,
    shutdown: CancellationToken,
    alive: Arc<AtomicUsize>,
) {
    let _alive = AliveGuard::new(alive);
    // A claim that waited this long for a slot is given back rather than
    // started: its lease could run out before it is written.
    let too_long = Duration::from_secs(ctx.config.workers.lease_secs) / 2;
    let mut running = JoinSet::new();
    tracing::debug!("feeder started");
    let starter = async {
        loop {
            while running.try_join_next().is_some() {}
            // None at shutdown: nothing taken from the queue.
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => None,
                next = claimed.recv() => next,
            }?;
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Some(next),
                slot = handoff.slots.clone().acquire_owned() => {
                    slot.expect("the semaphore is never closed")
                }
            };
            if next.at.elapsed() >= too_long {
                give_back(&ctx, &[next]).await;
                continue;
            }
            running.spawn(decide_and_send(
                ctx.clone(),
                next.delivery,
                next.lease,
                slot,
                decided.clone(),
            ));
        }
    };
    let ((), held) = tokio::join!(claim_ahead(&ctx, queue, &shutdown), starter);
    handoff.close();
    // The claimer is gone: what is in the queue now is all it left.
    let mut unstarted: Vec<Claimed> = held.into_iter().collect();
    while let Ok(c) = claimed.try_recv() {
        unstarted.push(c);
    }
    give_back(&ctx, &unstarted).await;
    while running.join_next().await.is_some() {}
    tracing::debug!("feeder stopped");
}

/// A delivery the feeder claimed, waiting for a slot.
struct Claimed {
    delivery: Delivery,
    lease: String,
    /// When it was claimed.
    at: tokio::time::Instant,
}

/// The feeder's claimer: whenever half of the queue is free, claims that
/// many deliveries in one statement (lapsed leases first, then in arrival
/// order) and queues them; idle until woken or the poll interval when
/// nothing more is due. Returns on shutdown.
async fn claim_ahead(ctx: &Context, queue: mpsc::Sender<Claimed>, shutdown: &CancellationToken) {
    let batch = (queue.max_capacity() / 2).clamp(1, CLAIM_BATCH);
    let poll = Duration::from_millis(ctx.config.workers.poll_interval_ms.max(10));
    loop {
        // Registered before the claim so a delivery arriving in between still wakes us.
        let woken = ctx.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let room = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            room = queue.reserve_many(batch) => match room {
                Ok(room) => room,
                Err(_) => return,
            },
        };
        let lease = lease_until(&ctx.config);
        let at = tokio::time::Instant::now();
        let claimed = claim(ctx, &lease, batch).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "claiming deliveries failed");
            Vec::new()
        });
        let full = claimed.len() == batch;
        for (delivery, place) in claimed.into_iter().zip(room) {
            place.send(Claimed {
                delivery,
                lease: lease.clone(),
                at,
            });
        }
        if full {
            continue;
        }
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = &mut woken => {}
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Gives back claims no slot took: at shutdown, so that they are processed
/// at once after a restart rather than when their lease runs out, or after
/// a long wait for a slot.
async fn give_back(ctx: &Context, unstarted: &[Claimed]) {
    if unstarted.is_empty() {
        return;
    }
    let claims: Vec<(i64, &str)> = unstarted
        .iter()
        .map(|c| (c.delivery.id, c.lease.as_str()))
        .collect();
    let given_back = async {
        let mut tx = ctx.db.begin().await?;
        let n = store::inbox::unclaim(&mut tx, &claims).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(n)
    }
    .await;
    match given_back {
        Ok(n) => tracing::debug!(
            deliveries = n,
            "claimed deliveries no worker started were given back"
        ),
        Err(e) => {
            tracing::warn!(error = %e, deliveries = claims.len(), "giving back claimed deliveries failed; they are processed once their lease runs out")
        }
    }
}

async fn claim(ctx: &Context, lease: &str, limit: usize) -> Result<Vec<Delivery>, sqlx::Error> {
    let mut conn = ctx.db.acquire_for("claim").await?;
    store::inbox::claim_batch(&mut conn, &time::now_str(), lease, limit).await
}

fn delivery_span(d: &Delivery) -> tracing::Span {
    tracing::info_span!(
        "delivery",
        key = %d.dedupe_key,
        resource = %d.resource_id.as_deref().unwrap_or("-"),
        provider = %d.provider,
        event_type = %d.event_type,
        attempt = d.attempts,
    )
}

/// One claimed delivery: decide it, then queue it for the recorder. The
/// slot comes back once the outcome is in the recorder's queue, not once it
/// is written: a slot bounds the calls to the provider, and the queue
/// ([`RECORDER_QUEUE_PER_SLOT`]) bounds what waits for the writer. Holding
/// slots through the write kept the recorder's batches below the slots'
/// number, and its per-turn cost weighed on each delivery. The lease, not
/// the slot, keeps a resource's next delivery back until this one is written.
async fn decide_and_send(
    ctx: Arc<Context>,
    delivery: Delivery,
    lease_until: String,
    slot: OwnedSemaphorePermit,
    recorder: mpsc::Sender<Decided>,
) {
    let outcome = decide(&ctx, &delivery)
        .instrument(delivery_span(&delivery))
        .await;
    let decided = Decided {
        delivery,
        lease_until,
        outcome,
    };
    if recorder.send(decided).await.is_err() {
        // Only when the daemon is being stopped; the lease runs out and the
        // delivery is processed again after the restart.
        tracing::warn!("the recorder is gone; this attempt is dropped");
    }
    drop(slot);
}

/// The recorder: writes what is waiting, many outcomes a transaction, until
/// every sender is gone.
async fn record_outcomes(
    ctx: Arc<Context>,
    mut outcomes: mpsc::Receiver<Decided>,
    alive: Arc<AtomicUsize>,
) {
    let _alive = AliveGuard::new(alive);
    let linger_below = ctx.config.workers.concurrency / 2;
    // What a batch that ended early (to let an acknowledgement through) left.
    let mut waiting = Vec::new();
    loop {
        if waiting.is_empty() {
            match outcomes.recv().await {
                Some(decided) => waiting.push(decided),
                None => break,
            }
        }
        gather(&mut outcomes, &mut waiting, linger_below, LINGER).await;
        waiting = write_and_report(&ctx, waiting).await;
    }
    tracing::debug!("recorder stopped");
}

/// Adds to `waiting` what comes next from `outcomes`, up to [`WRITE_BATCH`]:
/// whatever is there already, and, while fewer than `linger_below` wait,
/// what arrives within `linger`. Returns early when every sender is gone.
async fn gather<T>(
    outcomes: &mut mpsc::Receiver<T>,
    waiting: &mut Vec<T>,
    linger_below: usize,
    linger: Duration,
) {
    let until = tokio::time::Instant::now() + linger;
    while waiting.len() < WRITE_BATCH {
        let next = match outcomes.try_recv() {
            Ok(next) => next,
            Err(_) if waiting.len() >= linger_below => break,
            Err(_) => match tokio::time::timeout_at(until, outcomes.recv()).await {
                Ok(Some(next)) => next,
                Ok(None) | Err(_) => break,
            },
        };
        waiting.push(next);
    }
}

/// Processes one claimed delivery to its end for this attempt, here and now
/// (replay, tests): decide, then write in a transaction of its own. Errors
/// are handled and logged here (retry, dead letter, release).
pub async fn process(ctx: &Context, d: Delivery, lease_until: &str) {
    let outcome = decide(ctx, &d).instrument(delivery_span(&d)).await;
    let mut batch = vec![Decided {
        delivery: d,
        lease_until: lease_until.to_string(),
        outcome,
    }];
    while !batch.is_empty() {
        batch = write_and_report(ctx, batch).await;
    }
}

/// Decides a delivery: plan, then fetch. A panic in here (a bug) costs this
/// attempt only: it becomes a failure, and in the end a dead letter.
pub async fn decide(ctx: &Context, d: &Delivery) -> Outcome {
    match AssertUnwindSafe(decide_inner(ctx, d)).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(_) => {
            tracing::error!("processing panicked (a bug): the attempt fails");
            Outcome::Failed {
                error: "processing panicked (a bug): see the log".into(),
                retry_after: None,
            }
        }
    }
}

async fn decide_inner(ctx: &Context, d: &Delivery) -> Outcome {
    let config = &ctx.config;
    if d.attempts > i64::from(config.workers.max_attempts) {
        // Earlier holders never finished (the process died, or hung past its
        // lease): after the last attempt the delivery is given up, not retried forever.
        return Outcome::Failed {
            error: format!(
                "{} attempts whose worker never finished (lease ran out each time)",
                d.attempts - 1
            ),
            retry_after: None,
        };
    }
    match plan(&config.stripe, &config.juice, d) {
        Plan::Ignore(reason) => Outcome::Ignore(reason),
        Plan::Reversal(transfer) => Outcome::Reversal(transfer),
        Plan::Fetch { target, reversal } => {
            let Some(provider) = ctx.providers.api(&d.provider).cloned() else {
                return Outcome::Released(ApiError::NotConfigured(provider_name(d)).to_string());
            };
            match provider.fetch(&target).await {
                Ok(obs) => Outcome::Observed {
                    obs: Box::new(obs),
                    context: target.context,
                    reversal,
                },
                Err(e @ (ApiError::Unauthorized(_) | ApiError::NotConfigured(_))) => {
                    Outcome::Released(e.to_string())
                }
                Err(ApiError::NotFound(detail)) => Outcome::NotFound { target, detail },
                Err(e @ ApiError::RateLimited { retry_after, .. }) => Outcome::RateLimited {
                    retry_after,
                    error: e.to_string(),
                },
                Err(e) => Outcome::Failed {
                    retry_after: match &e {
                        ApiError::Retryable { retry_after, .. } => *retry_after,
                        _ => None,
                    },
                    error: e.to_string(),
                },
            }
        }
    }
}

/// Writes decided deliveries in one transaction, then logs what each came
/// to, and returns those it left for the next transaction: a batch ends
/// early when an acknowledgement commit is waiting for the writer. When the
/// transaction itself fails, nothing of the batch is kept: the leases run
/// out and the deliveries come back.
pub async fn write_and_report(ctx: &Context, mut batch: Vec<Decided>) -> Vec<Decided> {
    match write_batch(ctx, &batch).await {
        Ok((written, changes)) => {
            crate::alerts::report(&changes);
            let left = batch.split_off(written.len());
            for (decided, written) in batch.iter().zip(written) {
                let _span = delivery_span(&decided.delivery).entered();
                match written {
                    Some(written) => report(&decided.delivery, &written),
                    None => tracing::error!(
                        "recording the delivery failed on the database (see above); it is retried when its lease runs out"
                    ),
                }
            }
            left
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                deliveries = batch.len(),
                "recording deliveries failed on the database; they are retried when their leases run out"
            );
            Vec::new()
        }
    }
}

/// One transaction for the batch, or for its start; per delivery written
/// what was written, or `None` when it could not be (logged here).
///
/// First the outcomes are written straight into the transaction; that
/// costs a handful of statements a delivery. Only when something goes wrong
/// there (a database error, a panic: a bug) is it rolled back and the batch
/// written again with a savepoint for each outcome, so one outcome's
/// failure costs only that one.
async fn write_batch(
    ctx: &Context,
    batch: &[Decided],
) -> Result<(Vec<Option<Written>>, Changes), sqlx::Error> {
    let mut tx = ctx.db.begin_for("record").await?;
    let mut changes = Changes::new();
    if let Some(results) = write_straight(&mut tx, ctx, batch, &mut changes).await? {
        tx.commit().await?;
        return Ok((results, changes));
    }
    tx.rollback().await?;
    let mut tx = ctx.db.begin_for("record").await?;
    let mut changes = Changes::new();
    let mut results = Vec::with_capacity(batch.len());
    for decided in batch {
        let result = match write_one(
            &mut tx,
            &ctx.config,
            decided,
            &decided.outcome,
            &mut changes,
        )
        .await
        {
            Ok(Ok(written)) => Some(written),
            Ok(Err(e)) => {
                let _span = delivery_span(&decided.delivery).entered();
                tracing::error!(error = %e, "writing a delivery's outcome failed");
                None
            }
            Err(Panicked) => {
                // A bug in recording this outcome: the attempt fails instead
                // (and in the end the delivery is dead), the rest go on.
                let failed = Outcome::Failed {
                    error: "recording panicked (a bug): see the log".into(),
                    retry_after: None,
                };
                match write_one(&mut tx, &ctx.config, decided, &failed, &mut changes).await {
                    Ok(Ok(written)) => Some(written),
                    _ => None,
                }
            }
        };
        results.push(result);
    }
    tx.commit().await?;
    Ok((results, changes))
}

/// Writes the outcomes into `tx` with no savepoint, in order, until an
/// acknowledgement commit has waited for the writer long enough (at least
/// one is written).
/// `None` at the first error or panic: `tx` then holds part of the batch
/// and must be rolled back.
async fn write_straight(
    tx: &mut store::GatedTx,
    ctx: &Context,
    batch: &[Decided],
    changes: &mut Changes,
) -> Result<Option<Vec<Option<Written>>>, sqlx::Error> {
    let started = std::time::Instant::now();
    let mut results = Vec::with_capacity(batch.len());
    while results.len() < batch.len() {
        if !results.is_empty() && ctx.db.acks_waiting() && started.elapsed() >= ACK_WAIT {
            break;
        }
        let rest = &batch[results.len()..];
        // Plain observations (the bulk of the work) are recorded together.
        let run = rest
            .iter()
            .take(RECORD_RUN)
            .take_while(|d| plain_observation(d).is_some())
            .count();
        if run > 0 {
            let written =
                AssertUnwindSafe(write_observations(tx, &ctx.config, &rest[..run], changes))
                    .catch_unwind()
                    .await;
            match written {
                Ok(Ok(written)) => results.extend(written.into_iter().map(Some)),
                _ => return Ok(None),
            }
            continue;
        }
        let decided = &rest[0];
        let d = &decided.delivery;
        let outcome = &decided.outcome;
        let written = AssertUnwindSafe(write(
            tx,
            &ctx.config,
            d,
            &decided.lease_until,
            outcome,
            changes,
        ))
        .catch_unwind()
        .await;
        match written {
            // A lost lease is rare: the batch is written again, each
            // outcome in a savepoint, and only that one is dropped.
            Ok(Ok(written)) if written != Written::LeaseLost => results.push(Some(written)),
            _ => return Ok(None),
        }
    }
    Ok(Some(results))
}

/// The observation of an `Observed` outcome with no reversal to complete.
fn plain_observation(d: &Decided) -> Option<(&Observation, Option<&str>)> {
    match &d.outcome {
        Outcome::Observed {
            obs,
            context,
            reversal: None,
        } => Some((&**obs, context.as_deref())),
        _ => None,
    }
}

/// Ends the deliveries of plain observations `processed` with one statement
/// and records the observations of those it ended together
/// ([`record::record_all`]); a delivery whose lease was lost meanwhile (its
/// end did not take) records nothing.
async fn write_observations(
    tx: &mut Tx<'static>,
    config: &Config,
    run: &[Decided],
    changes: &mut Changes,
) -> Result<Vec<Written>, sqlx::Error> {
    let now = time::now();
    let ends: Vec<(i64, &str, &str)> = run
        .iter()
        .map(|d| (d.delivery.id, d.lease_until.as_str(), "processed"))
        .collect();
    let ended = store::inbox::finish_many(tx, &ends, &time::fmt(now)).await?;
    let live: Vec<&Decided> = run
        .iter()
        .filter(|d| ended.contains(&d.delivery.id))
        .collect();
    let triggers: Vec<Trigger> = live.iter().map(|d| trigger_of(&d.delivery)).collect();
    let items: Vec<record::ToRecord> = live
        .iter()
        .zip(&triggers)
        .filter_map(|(d, trigger)| {
            plain_observation(d).map(|(obs, context)| record::ToRecord {
                obs,
                trigger,
                context,
            })
        })
        .collect();
    let mut recorded = record::record_all(tx, config, &items, now, changes)
        .await?
        .into_iter()
        .zip(&items);
    for d in &live {
        recovered(tx, config, &d.delivery, changes).await?;
    }
    let written = run
        .iter()
        .map(|d| {
            if !ended.contains(&d.delivery.id) {
                return Written::LeaseLost;
            }
            match recorded.next() {
                Some((r, item)) => Written::Processed {
                    status: item.obs.status.clone(),
                    transitions: r.transitions,
                    stale: r.stale,
                },
                None => Written::LeaseLost,
            }
        })
        .collect();
    Ok(written)
}

struct Panicked;

/// Writes one outcome in a savepoint, kept unless the lease was lost, the
/// database refused or the code panicked.
async fn write_one(
    tx: &mut Tx<'static>,
    config: &Config,
    decided: &Decided,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Result<Written, sqlx::Error>, Panicked> {
    let mut savepoint = match sqlx::Connection::begin(&mut **tx).await {
        Ok(savepoint) => savepoint,
        Err(e) => return Ok(Err(e)),
    };
    // What this outcome raised or resolved counts only if its savepoint is kept.
    let mut its_changes = Changes::new();
    let written = AssertUnwindSafe(write(
        &mut savepoint,
        config,
        &decided.delivery,
        &decided.lease_until,
        outcome,
        &mut its_changes,
    ))
    .catch_unwind()
    .await;
    let keep = matches!(&written, Ok(Ok(w)) if *w != Written::LeaseLost);
    let ended = if keep {
        savepoint.commit().await
    } else {
        savepoint.rollback().await
    };
    if keep && ended.is_ok() {
        changes.append(&mut its_changes);
    }
    match (written, ended) {
        (Err(_), _) => {
            let _span = delivery_span(&decided.delivery).entered();
            tracing::error!("recording panicked (a bug)");
            Err(Panicked)
        }
        (Ok(written), Ok(())) => Ok(written),
        (Ok(_), Err(e)) => Ok(Err(e)),
    }
}

/// Writes what an outcome means for its delivery, in `tx`.
async fn write(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Written, sqlx::Error> {
    let written = write_outcome(tx, config, d, lease_until, outcome, changes).await?;
    if matches!(
        written,
        Written::Ignored(_) | Written::Processed { .. } | Written::Reversal(_)
    ) {
        recovered(tx, config, d, changes).await?;
    }
    Ok(written)
}

/// After a delivery ended well: when it had failed before (a replayed dead
/// letter carries its last error), its `dead_letter` alert is resolved.
async fn recovered(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    if d.last_error.is_some() {
        crate::alerts::rules::on_delivery_recovered(tx, config, d, &time::now_str(), changes)
            .await?;
    }
    Ok(())
}

async fn write_outcome(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    outcome: &Outcome,
    changes: &mut Changes,
) -> Result<Written, sqlx::Error> {
    let now = time::now();
    let now_s = time::fmt(now);
    let trigger = trigger_of(d);
    let finished = |done: bool, written: Written| if done { written } else { Written::LeaseLost };
    match outcome {
        Outcome::Ignore(reason) => {
            let done = store::inbox::finish(tx, d.id, lease_until, "ignored", &now_s).await?;
            Ok(finished(done, Written::Ignored(reason.clone())))
        }
        Outcome::Reversal(transfer) => {
            if !record::record_reversal(tx, config, transfer, &trigger, now, changes).await? {
                let error = format!("reversal of transfer {transfer}, which is not known yet");
                return write_failure(tx, config, d, lease_until, &error, None, changes).await;
            }
            let done = store::inbox::finish(tx, d.id, lease_until, "processed", &now_s).await?;
            Ok(finished(done, Written::Reversal(transfer.clone())))
        }
        Outcome::Observed {
            obs,
            context,
            reversal,
        } => {
            let recorded = match reversal {
                None => {
                    let context = context.as_deref();
                    record::record(tx, config, obs, &trigger, context, now, changes).await?
                }
                Some(transfer) => {
                    // The observation and the reversal stand or fall together.
                    let mut both = sqlx::Connection::begin(&mut **tx).await?;
                    let mut both_changes = Changes::new();
                    let context = context.as_deref();
                    let recorded = record::record(
                        &mut both,
                        config,
                        obs,
                        &trigger,
                        context,
                        now,
                        &mut both_changes,
                    )
                    .await?;
                    if !record::record_reversal(
                        &mut both,
                        config,
                        transfer,
                        &trigger,
                        now,
                        &mut both_changes,
                    )
                    .await?
                    {
                        both.rollback().await?;
                        let error = format!(
                            "reversal of transfer {transfer}, which bulk transfer {} does not list",
                            obs.id
                        );
                        return write_failure(tx, config, d, lease_until, &error, None, changes)
                            .await;
                    }
                    both.commit().await?;
                    changes.append(&mut both_changes);
                    recorded
                }
            };
            let done = store::inbox::finish(tx, d.id, lease_until, "processed", &now_s).await?;
            Ok(finished(
                done,
                Written::Processed {
                    status: obs.status.clone(),
                    transitions: recorded.transitions,
                    stale: recorded.stale,
                },
            ))
        }
        Outcome::NotFound { target, detail } => {
            let resource = resources::ensure(
                tx,
                &d.provider,
                &target.kind,
                &target.id,
                None,
                target.context.as_deref(),
                &now_s,
            )
            .await?;
            resources::mark_not_found(tx, resource.rid, &now_s, None).await?;
            let error = format!("the resource does not exist: {detail}");
            if !store::inbox::fail(tx, d.id, lease_until, &error, &now_s, true).await? {
                return Ok(Written::LeaseLost);
            }
            crate::alerts::rules::on_dead_letter(tx, config, d.id, &error, &now_s, changes).await?;
            Ok(Written::Dead(error))
        }
        Outcome::Failed { error, retry_after } => {
            write_failure(tx, config, d, lease_until, error, *retry_after, changes).await
        }
        Outcome::Released(error) => {
            let wait = Duration::from_secs(config.workers.backoff_max_secs.clamp(1, 60));
            let next = release(tx, d, lease_until, error, wait).await?;
            Ok(
                next.map_or(Written::LeaseLost, |next_attempt_at| Written::Released {
                    error: error.clone(),
                    next_attempt_at,
                }),
            )
        }
        Outcome::RateLimited { error, retry_after } => {
            let wait = retry_after.unwrap_or_else(|| next_backoff(config, d));
            let next = release(tx, d, lease_until, error, wait).await?;
            Ok(
                next.map_or(Written::LeaseLost, |next_attempt_at| Written::RateLimited {
                    error: error.clone(),
                    next_attempt_at,
                }),
            )
        }
    }
}

/// Gives the attempt back uncounted: the delivery is pending again, due
/// after `wait`. The time it is due, or `None` when the lease was lost.
async fn release(
    tx: &mut Tx<'_>,
    d: &Delivery,
    lease_until: &str,
    error: &str,
    wait: Duration,
) -> Result<Option<String>, sqlx::Error> {
    let next = time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default());
    let done = store::inbox::release(tx, d.id, lease_until, error, &next).await?;
    Ok(done.then_some(next))
}

/// The wait before a delivery's next attempt, after `d.attempts` of them.
fn next_backoff(config: &Config, d: &Delivery) -> Duration {
    let w = &config.workers;
    backoff(
        Duration::from_millis(w.backoff_base_ms.max(1)),
        Duration::from_secs(w.backoff_max_secs.max(1)),
        d.attempts.max(1) as u32,
    )
}

/// A failed attempt: retry later with backoff (at least what the provider
/// asked for), or `dead` once `workers.max_attempts` is reached.
async fn write_failure(
    tx: &mut Tx<'_>,
    config: &Config,
    d: &Delivery,
    lease_until: &str,
    error: &str,
    retry_after: Option<Duration>,
    changes: &mut Changes,
) -> Result<Written, sqlx::Error> {
    let w = &config.workers;
    let dead = d.attempts >= i64::from(w.max_attempts);
    let wait = next_backoff(config, d).max(retry_after.unwrap_or_default());
    let next = time::fmt(time::now() + chrono::Duration::from_std(wait).unwrap_or_default());
    if !store::inbox::fail(tx, d.id, lease_until, error, &next, dead).await? {
        return Ok(Written::LeaseLost);
    }
    if dead {
        let now = time::now_str();
        crate::alerts::rules::on_dead_letter(tx, config, d.id, error, &now, changes).await?;
        return Ok(Written::Dead(error.to_string()));
    }
    Ok(Written::Retry {
        error: error.to_string(),
        next_attempt_at: next,
    })
}

/// Logs (and counts) what a delivery's attempt came to, once it is committed.
fn report(d: &Delivery, written: &Written) {
    match written {
        Written::Ignored(reason) => tracing::debug!(%reason, "delivery ignored"),
        Written::Processed {
            status,
            transitions,
            stale,
        } => {
            record::report(transitions);
            tracing::debug!(%status, transitions = transitions.len(), stale, "delivery processed");
        }
        Written::Reversal(transfer) => tracing::info!(%transfer, "reversal recorded"),
        Written::Retry {
            error,
            next_attempt_at,
        } => {
            tracing::warn!(%error, attempts = d.attempts, %next_attempt_at, "delivery attempt failed; will retry")
        }
        Written::Dead(error) => {
            metrics::counter!("cancelwatch_deliveries_dead_total", "provider" => provider_name(d))
                .increment(1);
            tracing::error!(%error, attempts = d.attempts, "delivery dead");
        }
        Written::Released {
            error,
            next_attempt_at,
        } => {
            tracing::error!(%error, %next_attempt_at, "PROVIDER CREDENTIALS REFUSED OR MISSING: the delivery stays pending until the API key works")
        }
        Written::RateLimited {
            error,
            next_attempt_at,
        } => {
            metrics::counter!("cancelwatch_deliveries_rate_limited_total", "provider" => provider_name(d))
                .increment(1);
            tracing::warn!(%error, %next_attempt_at, "the provider rate-limits us: the delivery waits, its attempt not counted")
        }
        Written::LeaseLost => tracing::warn!(
            "the lease ran out before the delivery was finished; this attempt is dropped"
        ),
    }
}

fn provider_name(d: &Delivery) -> &'static str {
    match d.provider.as_str() {
        stripe::NAME => stripe::NAME,
        juice::NAME => juice::NAME,
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::stripe::event as stripe_event;
    use serde_json::json;

    fn delivery(
        provider: &str,
        event_type: &str,
        kind: Option<&str>,
        id: Option<&str>,
        body: Value,
    ) -> Delivery {
        Delivery {
            id: 1,
            provider: provider.into(),
            dedupe_key: "k1".into(),
            event_type: event_type.into(),
            event_id: (provider == "stripe").then(|| "evt_1".to_string()),
            resource_kind: kind.map(str::to_string),
            resource_id: id.map(str::to_string),
            context: None,
            livemode: None,
            raw_body: Some(body.to_string().into_bytes()),
            body_size: 0,
            source: "webhook".into(),
            received_at: String::new(),
            state: "processing".into(),
            attempts: 1,
            next_attempt_at: String::new(),
            last_error: None,
            processed_at: None,
        }
    }

    /// The recorder takes what waits at once; with few waiting, it waits
    /// up to the linger for more, and no longer.
    #[tokio::test(start_paused = true)]
    async fn the_recorder_gathers_what_arrives_within_its_linger() {
        let linger = Duration::from_millis(2);
        let (tx, mut rx) = mpsc::channel(300);
        let mut waiting = Vec::new();
        for n in 0..3 {
            tx.send(n).await.unwrap();
        }
        // Enough waiting: no wait.
        let started = tokio::time::Instant::now();
        gather(&mut rx, &mut waiting, 2, linger).await;
        assert_eq!(
            (waiting.as_slice(), started.elapsed()),
            (&[0, 1, 2][..], Duration::ZERO)
        );

        // Few waiting: what comes within the linger rides along, what comes after does not.
        let late = tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            late.send(3).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            late.send(4).await.unwrap();
        });
        let started = tokio::time::Instant::now();
        gather(&mut rx, &mut waiting, 10, linger).await;
        assert_eq!(waiting, [0, 1, 2, 3]);
        assert_eq!(started.elapsed(), linger);

        // No more than a transaction's worth, and no wait once every sender is gone.
        waiting.clear();
        for n in 0..WRITE_BATCH + 5 {
            tx.send(n).await.unwrap();
        }
        drop(tx);
        gather(&mut rx, &mut waiting, WRITE_BATCH, linger).await;
        assert_eq!(waiting.len(), WRITE_BATCH);
        waiting.clear();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let started = tokio::time::Instant::now();
        gather(&mut rx, &mut waiting, 100, linger).await;
        assert_eq!(
            waiting,
            [
                WRITE_BATCH,
                WRITE_BATCH + 1,
                WRITE_BATCH + 2,
                WRITE_BATCH + 3,
                WRITE_BATCH + 4,
                4
            ]
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn stripe_plans() {
        let s = StripeConfig::default();
        let j = JuiceConfig::default();
        let body =
            json!({"related_object": {"url": "/v2/money_management/outbound_transfers/obt_1"}});
        let d = delivery(
            "stripe",
            "v2.money_management.outbound_transfer.canceled",
            Some(stripe_event::OUTBOUND_TRANSFER),
            Some("obt_1"),
            body,
        );
        match plan(&s, &j, &d) {
            Plan::Fetch { target, reversal } => {
                assert_eq!(
                    target.url.as_deref(),
                    Some("/v2/money_management/outbound_transfers/obt_1")
                );
                assert_eq!(target.trigger_event.as_deref(), Some("evt_1"));
                assert!(reversal.is_none());
            }
            other => panic!("{other:?}"),
        }
        let d = delivery(
            "stripe",
            "v2.core.account.updated",
            Some("stripe.account"),
            Some("acct_1"),
            json!({}),
        );
        assert!(matches!(plan(&s, &j, &d), Plan::Ignore(_)));
        let mut followed = StripeConfig::default();
        assert!(followed.follow_event_types.is_empty());
        followed
            .follow_event_types
            .push("v2.core.account.updated".into());
        assert!(matches!(plan(&followed, &j, &d), Plan::Fetch { .. }));
        let d = delivery(
            "stripe",
            "v2.core.batch_job.completed",
            None,
            None,
            json!({}),
        );
        assert!(matches!(plan(&s, &j, &d), Plan::Ignore(_)));
    }

    #[test]
    fn juice_plans() {
        let s = StripeConfig::default();
        let j = JuiceConfig::default();
        let d = delivery(
            "juice",
            "bulk_transfer.cancelled",
            Some(juice_event::BULK_TRANSFER),
            Some("b1"),
            json!({"data": {"id": "b1"}}),
        );
        assert!(matches!(
            plan(&s, &j, &d),
            Plan::Fetch { reversal: None, .. }
        ));
        let d = delivery(
            "juice",
            "card.transaction",
            None,
            None,
            json!({"data": {"id": "x"}}),
        );
        assert!(matches!(plan(&s, &j, &d), Plan::Ignore(_)));
        let d = delivery(
            "juice",
            "bulk_transfer.transfer.reversed",
            None,
            None,
            json!({"data": {"id": "it_1"}}),
        );
        assert_eq!(plan(&s, &j, &d), Plan::Reversal("it_1".into()));
        let d = delivery(
            "juice",
            "bulk_transfer.transfer.reversed",
            Some(juice_event::BULK_TRANSFER),
            Some("b1"),
            json!({"data": {"id": "it_1", "bulk_transfer_id": "b1"}}),
        );
        match plan(&s, &j, &d) {
            Plan::Fetch { target, reversal } => {
                assert_eq!(target.id, "b1");
                assert_eq!(reversal.as_deref(), Some("it_1"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(trigger_of(&d), Trigger::event("k1"));
    }
}
