//! The durable inbox. Every verified delivery is committed here before its 2xx.
//!
//! Group commit: requests hand their row to one writer task and wait. Once
//! a request waits, the writer task takes the writer connection, then
//! whatever is waiting by then (up to `database.max_batch`: what came while
//! the connection was busy rides along), inserts it in one transaction and
//! commits once, so one fsync covers many deliveries; each request is
//! answered only after the commit that holds its row. With
//! `database.group_commit = false` every delivery gets a transaction of its
//! own (the baseline the benchmark compares against).
//!
//! When the pipeline has room (a free slot, or a free place in the queue
//! ahead of the slots), the same commit leases the new deliveries it
//! stores and hands them over ([`Handoff`]): they need no claim
//! transaction of their own.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::DatabaseConfig;
use crate::store::model::{Delivery, NewDelivery, Refusal};
use crate::store::{Added, Store, StoreError, Unavailable, WriterTurn};

/// Where the inbox hands the deliveries its commits leased: the pipeline.
/// The inbox asks for room before a commit and hands over what it leased
/// after it, so a new delivery needs no claim of its own.
pub trait HandOver: Send + Sync {
    /// Room for up to `wanted` deliveries, held until [`HandOver::start`].
    fn reserve(&self, wanted: usize) -> Reservation;
    /// Starts the deliveries leased under `reservation`.
    fn start(&self, leased: Vec<Delivery>, reservation: Reservation);
}

/// Room the pipeline holds for deliveries an acknowledgement commit leases.
pub struct Reservation {
    /// How many the commit may lease.
    pub room: usize,
    /// The lease end they are leased until.
    pub lease_until: String,
    /// The pipeline's own hold on that room, given back with it.
    pub held: Box<dyn std::any::Any + Send>,
}

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox write failed: {0}")]
    Write(String),
    #[error("inbox writer has stopped")]
    Stopped,
    /// The database is full or locked; nothing was stored.
    #[error("the database is unavailable ({})", .0.code())]
    Unavailable(Unavailable),
}

/// The outcome of an accept: committed now, or already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub duplicate: bool,
}

enum Job {
    /// A delivery, the request waiting for it, and when it was queued.
    Delivery(Box<NewDelivery>, Reply, Instant),
    Refusal(Refusal),
}

/// The steps of an acknowledgement in the group commit, in order: see
/// [`ack_step`].
pub const ACK_STEPS: [&str; 5] = ["queued", "writer", "insert", "sync", "answer"];

/// Records how long `count` acknowledgements spent in one step of the group
/// commit (`cancelwatch_ack_step_seconds{step}`): `queued` for the writer
/// task, waiting for the `writer` connection, the `insert`, the `sync` to
/// disk, and the `answer` reaching the request's task. Together with the
/// request's own work they make up `cancelwatch_ack_seconds`.
fn ack_step(step: &'static str, took: Duration, count: usize) {
    metrics::histogram!("cancelwatch_ack_step_seconds", "step" => step)
        .record_many(took.as_secs_f64(), count);
}

/// The keys of the deliveries committed most recently, bounded, so that a
/// provider's retry is answered without touching the database.
/// (provider, dedupe key).
type Key = (String, String);

#[derive(Default)]
struct RecentKeys {
    inner: std::sync::Mutex<(HashSet<Key>, VecDeque<Key>)>,
}

impl RecentKeys {
    const CAPACITY: usize = 65_536;

    fn contains(&self, key: &Key) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .contains(key)
    }

    fn remember(&self, key: Key) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (set, order) = &mut *guard;
        if set.insert(key.clone()) {
            order.push_back(key);
            if order.len() > Self::CAPACITY {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }
}

#[derive(Clone)]
pub struct Inbox {
    jobs: mpsc::Sender<Job>,
    recent: Arc<RecentKeys>,
    /// Woken after each commit that added deliveries it did not hand over,
    /// so workers claim them at once.
    pub wake: Arc<Notify>,
    /// The pipeline's slots, once it runs in this process.
    handoff: Arc<OnceLock<Arc<dyn HandOver>>>,
    /// Refusal rows left this minute.
    refusal_rows: Arc<RowBudget>,
}

/// How many refusals of the current minute may still be kept as rows of
/// their own (`database.refusal_rows_per_minute`).
struct RowBudget {
    per_minute: u32,
    /// The minute (since the epoch) and the rows given out in it.
    used: std::sync::Mutex<(u64, u32)>,
}

impl RowBudget {
    /// True when one more refusal may be a row of its own.
    fn take(&self) -> bool {
        let minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 60);
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        if used.0 != minute {
            *used = (minute, 0);
        }
        if used.1 < self.per_minute {
            used.1 += 1;
            true
        } else {
            false
        }
    }
}

impl Inbox {
    pub fn start(store: &Store, cfg: &DatabaseConfig) -> (Inbox, JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(cfg.max_batch.max(1) * 8);
        let wake = Arc::new(Notify::new());
        let max_batch = if cfg.group_commit { cfg.max_batch } else { 1 };
        let handoff = Arc::new(OnceLock::new());
        let writer = tokio::spawn(write_loop(
            store.clone(),
            rx,
            max_batch,
            wake.clone(),
            handoff.clone(),
        ));
        (
            Inbox {
                jobs,
                recent: Arc::default(),
                wake,
                handoff,
                refusal_rows: Arc::new(RowBudget {
                    per_minute: cfg.refusal_rows_per_minute,
                    used: Default::default(),
                }),
            },
            writer,
        )
    }

    /// From now on new deliveries go straight to the pipeline when it has room.
    pub fn hand_to(&self, handoff: Arc<dyn HandOver>) {
        if self.handoff.set(handoff).is_err() {
            tracing::warn!("the inbox already hands its deliveries to a pipeline");
        }
    }

    /// Commits a delivery durably, or tells that it is a duplicate. A key
    /// committed recently (a provider retry) is answered from memory; any other
    /// duplicate by the group commit's `ON CONFLICT DO NOTHING`, which changes
    /// no page. Neither writes anything.
    pub async fn accept(&self, delivery: NewDelivery) -> Result<Accepted, InboxError> {
        let key = (delivery.provider.clone(), delivery.dedupe_key.clone());
        if self.recent.contains(&key) {
            return Ok(Accepted { duplicate: true });
        }
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job::Delivery(Box::new(delivery), reply, Instant::now()))
            .await
            .map_err(|_| InboxError::Stopped)?;
        let (inserted, answered_at) = answer.await.map_err(|_| InboxError::Stopped)??;
        ack_step("answer", answered_at.elapsed(), 1);
        self.recent.remember(key);
        Ok(Accepted {
            duplicate: !inserted,
        })
    }

    /// Records a refusal in the next group commit: as a row of its own
    /// within `database.refusal_rows_per_minute`, else counted in its
    /// minute's summary. Under a flood the record may be dropped (counted in
    /// metrics) rather than slow good deliveries down.
    pub fn record_refusal(&self, mut refusal: Refusal) {
        refusal.summarized = !self.refusal_rows.take();
        if self.jobs.try_send(Job::Refusal(refusal)).is_err() {
            metrics::counter!("cancelwatch_refusal_records_dropped_total").increment(1);
        }
    }
}

async fn write_loop(
    store: Store,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    wake: Arc<Notify>,
    handoff: Arc<OnceLock<Arc<dyn HandOver>>>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // Syncs under way, each answering the requests of one commit.
    let mut syncing = tokio::task::JoinSet::new();
    let mut outage = Outage::default();
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        while syncing.try_join_next().is_some() {}
        let waited = Instant::now();
        let turn = store.writer_turn().await;
        // What arrived while the writer was busy rides in this commit
        // rather than waiting for the next one.
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let taken = Instant::now();
        for job in &batch {
            if let Job::Delivery(_, _, queued_at) = job {
                let writer_from = (*queued_at).max(waited);
                ack_step("queued", writer_from.duration_since(*queued_at), 1);
                ack_step("writer", taken.duration_since(writer_from), 1);
            }
        }
        let size = batch.len();
        let reserved = handoff.get().map(|h| {
            let deliveries = batch
                .iter()
                .filter(|job| matches!(job, Job::Delivery(..)))
                .count();
            h.reserve(deliveries)
        });
        let result = match turn {
            Ok(turn) => {
                let offer = reserved.as_ref().map(|r| (r.room, r.lease_until.clone()));
                commit(&store, turn, &batch, offer).await
            }
            Err(e) => Err(e),
        };
        metrics::histogram!("cancelwatch_inbox_batch_size").record(size as f64);
        let (inserted, leased) = match result {
            Ok(committed) => {
                outage.over();
                committed
            }
            Err(e) => {
                let cause = e.unavailable();
                match cause {
                    Some(cause) => outage.failed(cause, &e, size),
                    None => {
                        tracing::error!(error = %e, batch = size, "inbox commit failed; the deliveries are refused")
                    }
                }
                for job in batch.drain(..) {
                    if let Job::Delivery(_, reply, _) = job {
                        let _ = reply.send(Err(match cause {
                            Some(cause) => InboxError::Unavailable(cause),
                            None => InboxError::Write(e.to_string()),
                        }));
                    }
                }
                continue;
            }
        };
        let left_in_line = inserted.iter().filter(|new| **new).count() > leased.len();
        if let (Some(h), Some(reserved)) = (handoff.get(), reserved) {
            metrics::counter!("cancelwatch_inbox_handed_over_total").increment(leased.len() as u64);
            h.start(leased, reserved);
        }
        let replies: Vec<(Reply, bool)> = batch
            .drain(..)
            .zip(inserted)
            .filter_map(|(job, new)| match job {
                Job::Delivery(_, reply, _) => Some((reply, new)),
                Job::Refusal(_) => None,
            })
            .collect();
        if replies.is_empty() {
            // Only refusal records: nobody waits for them to be on disk.
            continue;
        }
        if left_in_line {
            wake.notify_waiters();
            wake.notify_one();
        }
        // Answered once on disk. With group commit the next batch is
        // inserted while this one syncs; one commit per request (the
        // benchmark's baseline) waits for its sync before the next.
        let answer = answer_when_durable(store.clone(), replies);
        if max_batch > 1 {
            syncing.spawn(answer);
        } else {
            answer.await;
        }
    }
    while syncing.join_next().await.is_some() {}
}

/// Commits failing because the database is full or locked: logged when it
/// begins and when it ends, with how many jobs were refused meanwhile, not at
/// every failed commit (a flood of retried deliveries would make as many
/// lines).
#[derive(Default)]
struct Outage {
    /// Since when, why, and how many jobs were refused since.
    since: Option<(Instant, Unavailable, u64)>,
}

impl Outage {
    fn failed(&mut self, cause: Unavailable, e: &StoreError, jobs: usize) {
        match &mut self.since {
            Some((_, _, refused)) => *refused += jobs as u64,
            None => {
                tracing::error!(error = %e, cause = cause.code(), "the database cannot take deliveries; they are answered 503 until it can");
                self.since = Some((Instant::now(), cause, jobs as u64));
            }
        }
    }

    fn over(&mut self) {
        if let Some((since, cause, refused)) = self.since.take() {
            tracing::info!(
                cause = cause.code(),
                refused,
                secs = since.elapsed().as_secs(),
                "the database takes deliveries again"
            );
        }
    }
}

/// The answer to a request: whether its delivery was new, and when the
/// answer was sent.
type Reply = oneshot::Sender<Result<(bool, Instant), InboxError>>;

/// Syncs what was committed to disk, then answers each request (whether
/// its delivery was new), or refuses them all when the sync failed.
async fn answer_when_durable(store: Store, replies: Vec<(Reply, bool)>) {
    let started = Instant::now();
    let synced = store.make_durable().await;
    ack_step("sync", started.elapsed(), replies.len());
    match synced {
        Ok(()) => {
            let now = Instant::now();
            for (reply, new) in replies {
                let _ = reply.send(Ok((new, now)));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, deliveries = replies.len(), "the commit could not be made durable; the deliveries are refused");
            for (reply, _) in replies {
                let _ = reply.send(Err(InboxError::Write(e.to_string())));
            }
        }
    }
}

/// One commit for the whole batch; per job, whether a row was added, and
/// the new deliveries it leased with the `offer`ed room (at most one a
/// resource). Durable once [`crate::store::Storage::make_durable`] returned
/// after it.
async fn commit(
    store: &Store,
    turn: WriterTurn,
    batch: &[Job],
    offer: Option<(usize, String)>,
) -> Result<(Vec<bool>, Vec<Delivery>), StoreError> {
    let started = Instant::now();
    let deliveries: Vec<&NewDelivery> = batch
        .iter()
        .filter_map(|job| match job {
            Job::Delivery(d, ..) => Some(&**d),
            Job::Refusal(_) => None,
        })
        .collect();
    let refusals: Vec<&Refusal> = batch
        .iter()
        .filter_map(|job| match job {
            Job::Refusal(r) => Some(r),
            Job::Delivery(..) => None,
        })
        .collect();
    let offered = match &offer {
        Some((room, lease_until)) => to_offer(&deliveries, *room, lease_until),
        None => vec![None; deliveries.len()],
    };
    let rows: Vec<(&NewDelivery, Option<&str>)> = deliveries.iter().copied().zip(offered).collect();
    let added = store.accept(turn, &rows, &refusals).await?;
    ack_step("insert", started.elapsed(), deliveries.len());
    let leased: Vec<Delivery> = deliveries
        .iter()
        .zip(&added)
        .filter_map(|(d, added)| match added {
            Some(Added { id, leased: true }) => Some(Delivery::inserted_leased(*id, d)),
            _ => None,
        })
        .collect();
    let mut new = added.iter().map(Option::is_some);
    let inserted: Vec<bool> = batch
        .iter()
        .map(|job| match job {
            Job::Delivery(..) => new.next().unwrap_or(false),
            Job::Refusal(_) => false,
        })
        .collect();
    Ok((inserted, leased))
}

pub(crate) fn to_offer<'l>(
    deliveries: &[&NewDelivery],
    slots: usize,
    lease_until: &'l str,
) -> Vec<Option<&'l str>> {
    let mut resources = HashSet::new();
    let mut keys = HashSet::new();
    let mut left = slots;
    deliveries
        .iter()
        .map(|d| {
            // A key twice in one batch is stored once: only its first may go.
            let first_key = keys.insert((d.provider.as_str(), d.dedupe_key.as_str()));
            let first_of_resource = match &d.resource_id {
                Some(resource) => !resources.contains(resource.as_str()),
                None => true,
            };
            if left == 0 || !first_key || !first_of_resource {
                return None;
            }
            if let Some(resource) = &d.resource_id {
                resources.insert(resource.as_str());
            }
            left -= 1;
            Some(lease_until)
        })
        .collect()
}
