//! The durable inbox. Every verified delivery is committed here before its 2xx.
//!
//! Group commit: requests hand their row to one writer task and wait. The
//! writer takes whatever is waiting (up to `database.max_batch`), inserts it in
//! one transaction and commits once, so one fsync covers many deliveries; each
//! request is answered only after the commit that holds its row. With
//! `database.group_commit = false` every delivery gets a transaction of its
//! own (the baseline the benchmark compares against).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::DatabaseConfig;
use crate::store::inbox::NewDelivery;
use crate::store::refusals::Refusal;
use crate::store::{self, Db};

#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("inbox write failed: {0}")]
    Write(String),
    #[error("inbox writer has stopped")]
    Stopped,
}

/// The outcome of an accept: committed now, or already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub duplicate: bool,
}

enum Job {
    Delivery(Box<NewDelivery>, Reply),
    Refusal(Refusal),
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
    /// Woken after each commit that added deliveries, so workers start at once.
    pub wake: Arc<Notify>,
}

impl Inbox {
    pub fn start(db: &Db, cfg: &DatabaseConfig) -> (Inbox, JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(cfg.max_batch.max(1) * 8);
        let wake = Arc::new(Notify::new());
        let max_batch = if cfg.group_commit { cfg.max_batch } else { 1 };
        let writer = tokio::spawn(write_loop(db.clone(), rx, max_batch, wake.clone()));
        (
            Inbox {
                jobs,
                recent: Arc::default(),
                wake,
            },
            writer,
        )
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
            .send(Job::Delivery(Box::new(delivery), reply))
            .await
            .map_err(|_| InboxError::Stopped)?;
        let inserted = answer.await.map_err(|_| InboxError::Stopped)??;
        self.recent.remember(key);
        Ok(Accepted {
            duplicate: !inserted,
        })
    }

    /// Records a refusal in the next group commit. Under a flood the record may
    /// be dropped (counted in metrics) rather than slow good deliveries down.
    pub fn record_refusal(&self, refusal: Refusal) {
        if self.jobs.try_send(Job::Refusal(refusal)).is_err() {
            metrics::counter!("cancelwatch_refusal_records_dropped_total").increment(1);
        }
    }
}

async fn write_loop(db: Db, mut rx: mpsc::Receiver<Job>, max_batch: usize, wake: Arc<Notify>) {
    let mut batch = Vec::with_capacity(max_batch);
    // Syncs under way, each answering the requests of one commit.
    let mut syncing = tokio::task::JoinSet::new();
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        while syncing.try_join_next().is_some() {}
        let size = batch.len();
        let result = commit(&db, &batch).await;
        metrics::histogram!("cancelwatch_inbox_batch_size").record(size as f64);
        let replies: Vec<(Reply, bool)> = match result {
            Ok(inserted) => batch
                .drain(..)
                .zip(inserted)
                .filter_map(|(job, new)| match job {
                    Job::Delivery(_, reply) => Some((reply, new)),
                    Job::Refusal(_) => None,
                })
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, batch = size, "inbox commit failed; the deliveries are refused");
                for job in batch.drain(..) {
                    if let Job::Delivery(_, reply) = job {
                        let _ = reply.send(Err(InboxError::Write(e.to_string())));
                    }
                }
                continue;
            }
        };
        if replies.is_empty() {
            // Only refusal records: nobody waits for them to be on disk.
            continue;
        }
        if replies.iter().any(|(_, new)| *new) {
            wake.notify_waiters();
            wake.notify_one();
        }
        // Answered once on disk. With group commit the next batch is
        // inserted while this one syncs; one commit per request (the
        // benchmark's baseline) waits for its sync before the next.
        let answer = answer_when_durable(db.clone(), replies);
        if max_batch > 1 {
            syncing.spawn(answer);
        } else {
            answer.await;
        }
    }
    while syncing.join_next().await.is_some() {}
}

type Reply = oneshot::Sender<Result<bool, InboxError>>;

/// Syncs what was committed to disk, then answers each request (whether
/// its delivery was new), or refuses them all when the sync failed.
async fn answer_when_durable(db: Db, replies: Vec<(Reply, bool)>) {
    match db.sync_commits().await {
        Ok(()) => {
            for (reply, new) in replies {
                let _ = reply.send(Ok(new));
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

/// One transaction for the whole batch; per job, whether a row was added.
/// Durable once [`Db::sync_commits`] returned after it.
async fn commit(db: &Db, batch: &[Job]) -> Result<Vec<bool>, sqlx::Error> {
    let mut conn = {
        let _waiting = db.ack_waiting();
        db.write.acquire().await?
    };
    let _hold = store::WriterHold::start("acknowledge");
    let result = async {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let deliveries: Vec<&NewDelivery> = batch
            .iter()
            .filter_map(|job| match job {
                Job::Delivery(d, _) => Some(&**d),
                Job::Refusal(_) => None,
            })
            .collect();
        let mut new = store::inbox::insert_many(&mut tx, &deliveries)
            .await?
            .into_iter();
        let refusals: Vec<&Refusal> = batch
            .iter()
            .filter_map(|job| match job {
                Job::Refusal(r) => Some(r),
                Job::Delivery(..) => None,
            })
            .collect();
        if !refusals.is_empty() {
            store::refusals::insert_many(&mut tx, &refusals).await?;
        }
        let inserted: Vec<bool> = batch
            .iter()
            .map(|job| match job {
                Job::Delivery(..) => new.next().unwrap_or(false),
                Job::Refusal(_) => false,
            })
            .collect();
        tx.commit().await?;
        Ok(inserted)
    }
    .await;
    result
}
