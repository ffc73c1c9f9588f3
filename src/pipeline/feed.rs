//! The feeder: keeps a queue of leased deliveries (twice
//! `workers.concurrency`) ahead of the worker slots and starts each at the
//! next free slot. A new delivery that arrives while a slot or a place in
//! that queue is free is leased by the very commit that stores it and handed
//! over ([`Handoff`], the inbox's [`HandOver`]); the feeder claims the rest
//! (those that found no room, retries, lapsed leases) in batches. Either way
//! never two of one resource at once, and no more than `workers.concurrency`
//! being decided at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::decide::decide_and_send;
use super::recorder::record_outcomes;
use super::Context;
use crate::config::Config;
use crate::domain::outcome::Decided;
use crate::inbox::{HandOver, Reservation};
use crate::store::model::Delivery;
use crate::store::StoreError;
use crate::time;

/// Most deliveries claimed in one statement.
const CLAIM_BATCH: usize = 128;

/// The recorder's queue, in slots (`workers.concurrency`): decided
/// outcomes wait there for their turn at the writer. A slot comes back
/// once its outcome is queued, so with a queue only as long as the slots,
/// deciding tasks would hold their slots while a turn is written and turns
/// would stay small; four times as long, turns gather more outcomes and the
/// writer's time per delivery falls. The provider still sees no more than
/// the slots at once.
const RECORDER_QUEUE_PER_SLOT: usize = 4;
/// The long-running tasks [`spawn`] starts: the feeder and the recorder.
pub const TASKS: usize = 2;

/// The lease end of a claim made now.
pub fn lease_until(config: &Config) -> String {
    time::fmt(time::now() + chrono::Duration::seconds(config.workers.lease_secs as i64))
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
    // A quarter of the slots, at least one, per provider: see decide_and_send.
    let slow_lanes = crate::providers::knowledge::names()
        .into_iter()
        .map(|name| (name, Arc::new(Semaphore::new(concurrency.div_ceil(4)))))
        .collect();
    let handoff = Arc::new(Handoff {
        ctx: ctx.clone(),
        slots: Arc::new(Semaphore::new(concurrency)),
        slow_lanes,
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
    /// Per provider, where its slow calls wait without holding a slot.
    slow_lanes: std::collections::HashMap<&'static str, Arc<Semaphore>>,
    /// `None` once the feeder has stopped: nothing more is handed over.
    open: std::sync::Mutex<Option<Open>>,
}

/// Where handed-over deliveries go while the pipeline runs.
struct Open {
    recorder: mpsc::Sender<Decided>,
    /// The feeder's queue of claimed deliveries, waiting for a slot.
    queue: mpsc::Sender<Claimed>,
}

/// The room a [`Reservation`] holds: free slots first, then places in
/// the feeder's queue.
struct Held {
    slots: Vec<OwnedSemaphorePermit>,
    places: Vec<mpsc::OwnedPermit<Claimed>>,
}

impl HandOver for Handoff {
    /// Takes up to `wanted` slots, then places in the feeder's queue, that
    /// are free right now (none while the feeder waits for them, or after
    /// shutdown).
    fn reserve(&self, wanted: usize) -> Reservation {
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
        Reservation {
            room: slots.len() + places.len(),
            lease_until: lease_until(&self.ctx.config),
            held: Box::new(Held { slots, places }),
        }
    }

    /// Starts a task for each delivery leased with `reserved`'s slots, and
    /// queues the rest for the feeder's next free slot; what is left over
    /// is free again. After shutdown the deliveries stay leased until their
    /// lease runs out, and are claimed then.
    fn start(&self, leased: Vec<Delivery>, reservation: Reservation) {
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
        let Reservation {
            lease_until, held, ..
        } = reservation;
        let Ok(held) = held.downcast::<Held>() else {
            return;
        };
        let Held { slots, places } = *held;
        let mut leased = leased.into_iter();
        // Slots first in the zip: once they run out, no delivery is taken
        // from `leased` and dropped.
        for (slot, delivery) in slots.into_iter().zip(leased.by_ref()) {
            let lane = self.slow_lane(&delivery);
            tokio::spawn(decide_and_send(
                self.ctx.clone(),
                delivery,
                lease_until.clone(),
                slot,
                lane,
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
}

impl Handoff {
    /// The slow lane of `d`'s provider (a lane of its own for a provider
    /// the daemon does not know, which the pipeline ignores anyway).
    fn slow_lane(&self, d: &Delivery) -> Arc<Semaphore> {
        self.slow_lanes
            .get(d.provider.as_str())
            .cloned()
            .unwrap_or_else(|| Arc::new(Semaphore::new(1)))
    }

    /// Hands nothing over from now on; tasks already started finish.
    fn close(&self) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Decrements the live-task count however the task ends (panics too).
pub(super) struct AliveGuard(Arc<AtomicUsize>);

impl AliveGuard {
    pub(super) fn new(alive: Arc<AtomicUsize>) -> AliveGuard {
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
            let lane = handoff.slow_lane(&next.delivery);
            running.spawn(decide_and_send(
                ctx.clone(),
                next.delivery,
                next.lease,
                slot,
                lane,
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
            // The store logs a database that cannot take writes once.
            if e.unavailable().is_some() {
                tracing::debug!(error = %e, "claiming deliveries failed");
            } else {
                tracing::error!(error = %e, "claiming deliveries failed");
            }
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
    let given_back = ctx.store.unclaim(&claims).await;
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

async fn claim(ctx: &Context, lease: &str, limit: usize) -> Result<Vec<Delivery>, StoreError> {
    ctx.store.claim(&time::now_str(), lease, limit).await
}
