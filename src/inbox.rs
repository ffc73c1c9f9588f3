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

use sqlx::SqliteConnection;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::DatabaseConfig;
use crate::pipeline::worker::{Handoff, Reserved};
use crate::store::inbox::{Delivery, NewDelivery};
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
    handoff: Arc<OnceLock<Arc<Handoff>>>,
}

impl Inbox {
    pub fn start(db: &Db, cfg: &DatabaseConfig) -> (Inbox, JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(cfg.max_batch.max(1) * 8);
        let wake = Arc::new(Notify::new());
        let max_batch = if cfg.group_commit { cfg.max_batch } else { 1 };
        let handoff = Arc::new(OnceLock::new());
        let writer = tokio::spawn(write_loop(
            db.clone(),
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
            },
            writer,
        )
    }

    /// From now on new deliveries go straight to the pipeline when it has room.
    pub fn hand_to(&self, handoff: Arc<Handoff>) {
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

    /// Records a refusal in the next group commit. Under a flood the record may
    /// be dropped (counted in metrics) rather than slow good deliveries down.
    pub fn record_refusal(&self, refusal: Refusal) {
        if self.jobs.try_send(Job::Refusal(refusal)).is_err() {
            metrics::counter!("cancelwatch_refusal_records_dropped_total").increment(1);
        }
    }
}

async fn write_loop(
    db: Db,
    mut rx: mpsc::Receiver<Job>,
    max_batch: usize,
    wake: Arc<Notify>,
    handoff: Arc<OnceLock<Arc<Handoff>>>,
) {
    let mut batch = Vec::with_capacity(max_batch);
    // Syncs under way, each answering the requests of one commit.
    let mut syncing = tokio::task::JoinSet::new();
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        while syncing.try_join_next().is_some() {}
        let waited = Instant::now();
        let conn = {
            let _waiting = db.ack_waiting();
            db.write.acquire().await
        };
        let hold = conn
            .is_ok()
            .then(|| store::WriterHold::start("acknowledge"));
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
        let result = match conn {
            Ok(mut conn) => commit(&mut conn, &batch, reserved.as_ref()).await,
            Err(e) => Err(e),
        };
        drop(hold);
        metrics::histogram!("cancelwatch_inbox_batch_size").record(size as f64);
        let (inserted, leased) = match result {
            Ok(committed) => committed,
            Err(e) => {
                tracing::error!(error = %e, batch = size, "inbox commit failed; the deliveries are refused");
                for job in batch.drain(..) {
                    if let Job::Delivery(_, reply, _) = job {
                        let _ = reply.send(Err(InboxError::Write(e.to_string())));
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
        let answer = answer_when_durable(db.clone(), replies);
        if max_batch > 1 {
            syncing.spawn(answer);
        } else {
            answer.await;
        }
    }
    while syncing.join_next().await.is_some() {}
}

/// The answer to a request: whether its delivery was new, and when the
/// answer was sent.
type Reply = oneshot::Sender<Result<(bool, Instant), InboxError>>;

/// Syncs what was committed to disk, then answers each request (whether
/// its delivery was new), or refuses them all when the sync failed.
async fn answer_when_durable(db: Db, replies: Vec<(Reply, bool)>) {
    let started = Instant::now();
    let synced = db.sync_commits().await;
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

/// One transaction for the whole batch; per job, whether a row was added,
/// and the new deliveries it leased with `reserved` slots (at most one a
/// resource). Durable once [`Db::sync_commits`] returned after it.
///
/// A batch that fits in one statement (most do) runs it alone: SQLite
/// commits a lone statement by itself, all of it or nothing, and `BEGIN`
/// and `COMMIT` would be two more round trips to the connection's thread
/// while the writer is held. One with more deliveries than a statement
/// takes runs whole on the writer's handle ([`store::transaction_on_handle`]):
/// `BEGIN`, a prepared one-row insert stepped per row, and `COMMIT`, for one
/// round trip however large the batch. Smaller batches keep the statements
/// sqlx has cached: preparing the one-row insert anew costs more than the
/// round trip it saves, and a flood's refusals go faster many to a
/// statement than one at a time (README, Performance, item 28).
async fn commit(
    conn: &mut SqliteConnection,
    batch: &[Job],
    reserved: Option<&Reserved>,
) -> Result<(Vec<bool>, Vec<Delivery>), sqlx::Error> {
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
    let offered = match reserved {
        Some(reserved) => to_offer(&deliveries, reserved.len(), &reserved.lease_until),
        None => vec![None; deliveries.len()],
    };
    let rows: Vec<(&NewDelivery, Option<&str>)> = deliveries.iter().copied().zip(offered).collect();
    let now = crate::time::now_str();
    let statements = deliveries.len().div_ceil(store::inbox::ROWS_PER_INSERT)
        + refusals.len().div_ceil(store::refusals::ROWS_PER_INSERT);
    let added = if deliveries.len() > store::inbox::ROWS_PER_INSERT {
        store::transaction_on_handle(conn, |conn| {
            let added = store::inbox::insert_rows(conn, &rows, &now)?;
            store::refusals::insert_rows(conn, &refusals)?;
            Ok(added)
        })
        .await?
    } else if statements <= 1 {
        // At most one of the two runs a statement.
        let added = store::inbox::insert_many(conn, &rows, &now).await?;
        store::refusals::insert_many(conn, &refusals).await?;
        added
    } else {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let added = store::inbox::insert_many(&mut tx, &rows, &now).await?;
        store::refusals::insert_many(&mut tx, &refusals).await?;
        tx.commit().await?;
        added
    };
    ack_step("insert", started.elapsed(), deliveries.len());
    let leased: Vec<Delivery> = deliveries
        .iter()
        .zip(&added)
        .filter_map(|(d, added)| match added {
            Some(row) if row.leased => Some(Delivery::inserted_leased(row.id, d)),
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

/// Which deliveries of a batch are offered to the pipeline: per delivery,
/// the lease to insert it with, or `None` to put it in line. At most
/// `slots`, in order, the first of each resource and of each key; the
/// insert itself leaves in line those whose resource a live lease holds.
fn to_offer<'l>(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(key: &str, resource: Option<&str>) -> NewDelivery {
        NewDelivery {
            provider: "stripe".into(),
            dedupe_key: key.into(),
            event_type: "v2.core.batch_job.updated".into(),
            event_id: Some(key.into()),
            resource_kind: resource.map(|_| "stripe.batch_job".to_string()),
            resource_id: resource.map(str::to_string),
            context: None,
            livemode: Some(false),
            raw_body: b"{}".to_vec(),
            source: "webhook",
            received_at: crate::time::now_str(),
        }
    }

    /// A batch too large for one statement (150 deliveries, 10 of them a
    /// key again, and 100 refusals, all queued before the writer runs) is
    /// committed whole, on the writer's handle: each request learns whether
    /// its delivery was new, each key is stored once, each refusal recorded.
    #[tokio::test]
    async fn a_batch_too_large_for_one_statement_commits_whole() {
        batch_commits_whole(150, 10, 100).await;
    }

    /// [`a_batch_too_large_for_one_statement_commits_whole`] where the
    /// refusals make it too large (a transaction of sqlx's statements).
    #[tokio::test]
    async fn a_batch_of_mostly_refusals_commits_whole() {
        batch_commits_whole(30, 5, 200).await;
    }

    /// `deliveries` deliveries, the last `again` of them keys already
    /// given, and `refusals` refusals, queued together.
    async fn batch_commits_whole(deliveries: usize, again: usize, refusals: usize) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DatabaseConfig::default();
        let db = Db::open(&dir.path().join("x.db"), &cfg).await.unwrap();
        let (inbox, writer) = Inbox::start(&db, &cfg);
        for i in 0..refusals {
            inbox.record_refusal(Refusal {
                provider: "stripe".into(),
                reason: "bad_signature".into(),
                message: format!("forged {i}"),
                http_status: 401,
                body_size: Some(2),
                remote_addr: None,
                received_at: crate::time::now_str(),
            });
        }
        let distinct = deliveries - again;
        let keys: Vec<String> = (0..deliveries)
            .map(|i| format!("k{}", i % distinct))
            .collect();
        let accepts = keys.iter().enumerate().map(|(i, key)| {
            let resource = format!("r_{i}");
            inbox.accept(delivery(key, Some(&resource)))
        });
        let answers = futures_util::future::join_all(accepts).await;
        let duplicates: Vec<bool> = answers.into_iter().map(|a| a.unwrap().duplicate).collect();
        let expected: Vec<bool> = (0..deliveries).map(|i| i >= distinct).collect();
        assert_eq!(duplicates, expected);
        drop(inbox);
        writer.await.unwrap();
        let count = |sql| sqlx::query_scalar::<_, i64>(sql).fetch_one(&db.read);
        let stored = count("SELECT COUNT(*) FROM inbox").await.unwrap();
        assert_eq!(stored, distinct as i64);
        let keys = count("SELECT COUNT(DISTINCT dedupe_key) FROM inbox");
        assert_eq!(keys.await.unwrap(), distinct as i64);
        let recorded = count("SELECT COUNT(*) FROM refusals").await.unwrap();
        assert_eq!(recorded, refusals as i64);
        db.close().await;
    }

    /// Offered: in order, as many as there are slots, the first of each
    /// resource and key. Leased by the insert: those whose resource no live
    /// lease holds; the rest wait in line.
    #[tokio::test]
    async fn hand_over_follows_the_claims_rules() {
        hand_over_follows_the_claims_rules_with(Insert::Statement).await;
    }

    /// [`hand_over_follows_the_claims_rules`] with the insert of batches too
    /// large for one statement (one row at a time, on the handle).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_over_follows_the_claims_rules_in_large_batches() {
        hand_over_follows_the_claims_rules_with(Insert::RowsOnHandle).await;
    }

    enum Insert {
        Statement,
        RowsOnHandle,
    }

    async fn hand_over_follows_the_claims_rules_with(insert: Insert) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("x.db"), &DatabaseConfig::default())
            .await
            .unwrap();
        let now = crate::time::now_str();
        let far = "2999-01-01T00:00:00.000Z";
        let past = "2000-01-01T00:00:00.000Z";
        let mut tx = db.write.begin().await.unwrap();
        let held = delivery("held", Some("r_held"));
        let lapsed = delivery("lapsed", Some("r_lapsed"));
        let before = [(&held, Some(far)), (&lapsed, Some(past))];
        let added = store::inbox::insert_many(&mut tx, &before, &now)
            .await
            .unwrap();
        assert!(added.iter().all(|a| a.is_some_and(|a| a.leased)));

        let batch = [
            delivery("a", Some("r_held")),   // a live lease holds it
            delivery("b", Some("r_1")),      // first of r_1
            delivery("c", Some("r_1")),      // r_1 again
            delivery("b", Some("r_2")),      // key b again
            delivery("d", None),             // names no resource
            delivery("e", Some("r_lapsed")), // its lease ran out
            delivery("f", Some("r_3")),      // no slot left
        ];
        let refs: Vec<&NewDelivery> = batch.iter().collect();
        let offered = to_offer(&refs, 4, far);
        let keys = |flags: &[bool]| -> Vec<&str> {
            refs.iter()
                .zip(flags)
                .filter(|(_, f)| **f)
                .map(|(d, _)| d.dedupe_key.as_str())
                .collect()
        };
        let flags: Vec<bool> = offered.iter().map(Option::is_some).collect();
        assert_eq!(keys(&flags), ["a", "b", "d", "e"]);

        let rows: Vec<(&NewDelivery, Option<&str>)> = refs.iter().copied().zip(offered).collect();
        let added = match insert {
            Insert::Statement => store::inbox::insert_many(&mut tx, &rows, &now).await,
            Insert::RowsOnHandle => {
                store::on_handle(&mut tx, |c| store::inbox::insert_rows(c, &rows, &now)).await
            }
        }
        .unwrap();
        let flags: Vec<bool> = added.iter().map(|a| a.is_some_and(|a| a.leased)).collect();
        assert_eq!(keys(&flags), ["b", "d", "e"]);
        assert_eq!(added.iter().filter(|a| a.is_some()).count(), 6);
        let stored: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT dedupe_key, state, attempts, lease_until FROM inbox
             WHERE dedupe_key NOT IN ('held', 'lapsed') ORDER BY id",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let leased = |key: &str| {
            (
                key.to_string(),
                "processing".to_string(),
                1,
                Some(far.to_string()),
            )
        };
        let waiting = |key: &str| (key.to_string(), "pending".to_string(), 0, None);
        assert_eq!(
            stored,
            [
                waiting("a"),
                leased("b"),
                waiting("c"),
                leased("d"),
                leased("e"),
                waiting("f")
            ]
        );
        tx.commit().await.unwrap();
        db.close().await;
    }
}
