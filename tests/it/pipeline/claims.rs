//! Claims, the feeder's hand-over, and the writing of a batch of outcomes,
//! one step at a time on a database of their own.

use std::time::Duration;

use cancelwatch::inbox::HandOver;
use cancelwatch::pipeline::{self, Context};
use cancelwatch::store;
use cancelwatch::store::model::Delivery;

use super::record::observation;
use super::{config_for, offline_context, WAIT};
use crate::support::config::CLOSED_PORT;
use crate::support::db::{self, sqlite_engine};
use crate::support::{both_engines, Engine};
use crate::support::{wait_for, wait_until};

/// Claims what is ready (at most ten), as the feeder does.
async fn claim_up_to_ten(ctx: &Context, lease: &str) -> Vec<Delivery> {
    ctx.store
        .claim(&cancelwatch::time::now_str(), lease, 10)
        .await
        .unwrap()
}

/// Claims go in arrival order and never hand out two deliveries of one
/// resource at once; a lapsed lease frees the resource again.
#[tokio::test]
async fn claims_keep_one_resource_to_one_worker() {
    let (_config, ctx) = offline_context(Engine::Sqlite).await;
    db::store_deliveries(
        &ctx,
        &[
            ("evt_a1", Some("batchv2_a")),
            ("evt_a2", Some("batchv2_a")),
            ("evt_b1", Some("batchv2_b")),
            ("evt_none", None),
        ],
    )
    .await;
    let now = cancelwatch::time::now();
    let now_s = cancelwatch::time::fmt(now);
    let short = cancelwatch::time::fmt(now + chrono::Duration::seconds(30));
    let mut keys = Vec::new();
    while let Some(d) =
        store::sqlite::inbox::claim(&sqlite_engine(&ctx.store).write, &now_s, &short)
            .await
            .unwrap()
    {
        keys.push(d.dedupe_key);
    }
    assert_eq!(
        keys,
        vec!["evt_a1", "evt_b1", "evt_none"],
        "evt_a2 waits for evt_a1"
    );
    // Later, evt_a1's lease has lapsed: it comes back first, and evt_a2 still waits.
    let later = cancelwatch::time::fmt(now + chrono::Duration::seconds(31));
    let lease = cancelwatch::time::fmt(now + chrono::Duration::seconds(90));
    let d = store::sqlite::inbox::claim(&sqlite_engine(&ctx.store).write, &later, &lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.dedupe_key.as_str(), d.attempts), ("evt_a1", 2));
    let next = store::sqlite::inbox::claim(&sqlite_engine(&ctx.store).write, &later, &lease)
        .await
        .unwrap();
    assert!(
        next.as_ref().map_or(true, |n| n.dedupe_key != "evt_a2"),
        "two deliveries of batchv2_a at once"
    );
    ctx.store.close().await;
}

both_engines! {
    #[tokio::test]
    async fn a_batch_claim_takes_one_delivery_per_resource_in_arrival_order(engine) {
        let (_config, ctx) = offline_context(engine).await;
        db::store_deliveries(
            &ctx,
            &[
                ("evt_a1", Some("batchv2_a")),
                ("evt_a2", Some("batchv2_a")),
                ("evt_b1", Some("batchv2_b")),
                ("evt_none1", None),
                ("evt_c1", Some("batchv2_c")),
                ("evt_none2", None),
                ("evt_d1", Some("batchv2_d")),
            ],
        )
        .await;
        let now = cancelwatch::time::now();
        let now_s = cancelwatch::time::fmt(now);
        let lease = cancelwatch::time::fmt(now + chrono::Duration::seconds(30));
        let claim = |limit: usize| {
            let (store, now_s, lease) = (ctx.store.clone(), now_s.clone(), lease.clone());
            async move {
                let claimed = store.claim(&now_s, &lease, limit).await.unwrap();
                claimed
                    .into_iter()
                    .map(|d| d.dedupe_key)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            claim(4).await,
            vec!["evt_a1", "evt_b1", "evt_none1", "evt_c1"],
            "the limit holds, and evt_a2 waits for evt_a1 even inside one batch"
        );
        assert_eq!(
            claim(10).await,
            vec!["evt_none2", "evt_d1"],
            "batchv2_a is leased, so evt_a2 still waits"
        );
        assert!(claim(10).await.is_empty());
        ctx.store.close().await;
    }
}

both_engines! {
    /// Outcomes written together: each delivery ends as its own outcome says,
    /// and one whose lease was lost meanwhile is left to its new holder.
    #[tokio::test]
    async fn a_batch_of_outcomes_is_written_together_and_a_lost_lease_is_left_alone(engine) {
        use cancelwatch::domain::outcome::{Decided, Outcome};
        let (_config, ctx) = offline_context(engine).await;
        db::store_deliveries(
            &ctx,
            &[
                ("evt_ignore", Some("batchv2_ignore")),
                ("evt_fail", Some("batchv2_fail")),
                ("evt_lost", Some("batchv2_lost")),
                ("evt_released", Some("batchv2_released")),
            ],
        )
        .await;
        let lease = pipeline::feed::lease_until(&ctx.config);
        let claimed = claim_up_to_ten(&ctx, &lease).await;
        assert_eq!(claimed.len(), 4);
        let batch: Vec<Decided> = claimed
            .into_iter()
            .map(|d| {
                let (outcome, lease_until) = match d.dedupe_key.as_str() {
                    "evt_ignore" => (Outcome::Ignore("not followed".into()), lease.clone()),
                    "evt_fail" => (
                        Outcome::Failed {
                            error: "provider answered 503".into(),
                            retry_after: None,
                        },
                        lease.clone(),
                    ),
                    // A worker whose lease ran out: another one holds it now.
                    "evt_lost" => (
                        Outcome::Ignore("too late".into()),
                        "2000-01-01T00:00:00.000Z".to_string(),
                    ),
                    _ => (
                        Outcome::Released("401 from the provider".into()),
                        lease.clone(),
                    ),
                };
                Decided {
                    delivery: d,
                    lease_until,
                    outcome,
                }
            })
            .collect();
        let left = pipeline::recorder::write_and_report(&ctx, batch).await;
        assert!(left.is_empty(), "no acknowledgement was waiting");
        let states: Vec<(String, String, i64)> = db::deliveries(&ctx)
            .await
            .into_iter()
            .map(|d| (d.dedupe_key, d.state, d.attempts))
            .collect();
        assert_eq!(
            states,
            vec![
                ("evt_ignore".into(), "ignored".into(), 1),
                ("evt_fail".into(), "failed".into(), 1),
                ("evt_lost".into(), "processing".into(), 1),
                ("evt_released".into(), "pending".into(), 0),
            ]
        );
        ctx.store.close().await;
    }
}

both_engines! {
    /// When one outcome's SQL fails inside a batch, the batch is written again
    /// with a savepoint per outcome: the others are kept, and the failing one
    /// costs only itself (its delivery stays leased, to come back when the
    /// lease runs out). A trigger stands in for the failure.
    #[tokio::test]
    async fn one_failing_outcome_in_a_batch_costs_only_itself(engine) {
        let (_config, ctx) = offline_context(engine).await;
        db::refuse_transitions_of(&ctx, "batchv2_bad").await;
        let (states, recorded) = write_observed_batch(&ctx, &["ok_1", "bad", "ok_2"], None).await;
        assert_eq!(
            states,
            vec![
                ("evt_ok_1".into(), "processed".into()),
                ("evt_bad".into(), "processing".into()),
                ("evt_ok_2".into(), "processed".into()),
            ]
        );
        assert_eq!(recorded, ["batchv2_ok_1", "batchv2_ok_2"]);
        ctx.store.close().await;
    }
}

both_engines! {
    /// Observations recorded together: one whose lease was lost meanwhile
    /// (another worker holds the delivery now) records nothing and leaves the
    /// delivery to its holder; the others are recorded and end `processed`.
    #[tokio::test]
    async fn an_observation_whose_lease_was_lost_records_nothing(engine) {
        let (_config, ctx) = offline_context(engine).await;
        let (states, recorded) =
            write_observed_batch(&ctx, &["ok_1", "lost", "ok_2"], Some("lost")).await;
        assert_eq!(
            states,
            vec![
                ("evt_ok_1".into(), "processed".into()),
                ("evt_lost".into(), "processing".into()),
                ("evt_ok_2".into(), "processed".into()),
            ]
        );
        assert_eq!(recorded, ["batchv2_ok_1", "batchv2_ok_2"]);
        ctx.store.close().await;
    }
}

/// Stores a delivery `evt_<name>` for each of `names` (resource
/// `batchv2_<name>`), claims them, and writes one batch of their outcomes:
/// each batch job observed `canceled`, the one named `lost` with a lease
/// that ran out. Then each delivery's (event, state), and the resources
/// given a transition, in order.
async fn write_observed_batch(
    ctx: &Context,
    names: &[&str],
    lost: Option<&str>,
) -> (Vec<(String, String)>, Vec<String>) {
    use cancelwatch::domain::outcome::{Decided, Outcome};
    let keys: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("evt_{n}"), format!("batchv2_{n}")))
        .collect();
    let by_name: Vec<(&str, Option<&str>)> = keys
        .iter()
        .map(|(event, resource)| (event.as_str(), Some(resource.as_str())))
        .collect();
    db::store_deliveries(ctx, &by_name).await;
    let lease = pipeline::feed::lease_until(&ctx.config);
    let claimed = claim_up_to_ten(ctx, &lease).await;
    assert_eq!(claimed.len(), names.len());
    let lost_key = lost.map(|n| format!("evt_{n}"));
    let batch: Vec<Decided> = claimed
        .into_iter()
        .map(|d| {
            let id = d.resource_id.clone().unwrap();
            let lease_until = if Some(&d.dedupe_key) == lost_key.as_ref() {
                "2000-01-01T00:00:00.000Z".to_string()
            } else {
                lease.clone()
            };
            Decided {
                delivery: d,
                lease_until,
                outcome: Outcome::Observed {
                    obs: Box::new(observation("stripe.batch_job", &id, "canceled", vec![])),
                    context: None,
                    reversal: None,
                },
            }
        })
        .collect();
    let left = pipeline::recorder::write_and_report(ctx, batch).await;
    assert!(left.is_empty());
    let states = db::deliveries(ctx)
        .await
        .into_iter()
        .map(|d| (d.dedupe_key, d.state))
        .collect();
    let recorded = db::history_rows(ctx)
        .await
        .into_iter()
        .map(|(_, resource_id, ..)| resource_id)
        .collect();
    (states, recorded)
}

/// A command run beside the daemon (its own writer connection) writes while
/// the daemon's claim has read but not yet written: the claim must wait its
/// turn, not fail with SQLITE_BUSY_SNAPSHOT.
#[tokio::test]
async fn a_claim_and_a_command_beside_the_daemon_take_turns() {
    let (config, daemon) = offline_context(Engine::Sqlite).await;
    db::store_deliveries(
        &daemon,
        &[("evt_x", Some("batchv2_x")), ("evt_y", Some("batchv2_y"))],
    )
    .await;
    let command = config.context().await;

    let mut tx = sqlite_engine(&daemon.store).begin().await.unwrap();
    assert_eq!(db::delivery_count_in(&mut tx).await, 2);
    let mut write =
        tokio::spawn(
            async move { db::try_note_error(&command, "evt_y", "noted by a command").await },
        );
    // The command's write goes now, or waits for the commit (the daemon's
    // transaction may hold the write lock): it is given up to 300 ms to
    // be under way while the claim's transaction is open.
    let written_early = tokio::time::timeout(Duration::from_millis(300), &mut write).await;
    let lease = pipeline::feed::lease_until(&daemon.config);
    let claimed =
        store::sqlite::inbox::claim_batch(&mut tx, &cancelwatch::time::now_str(), &lease, 10)
            .await
            .expect("the claim is not refused for a write beside it");
    tx.commit().await.unwrap();
    assert_eq!(claimed.len(), 2);
    let written = match written_early {
        Ok(written) => written,
        Err(_) => write.await,
    };
    written
        .unwrap()
        .expect("the command's write went through after the claim");
    daemon.store.close().await;
}

both_engines! {
    /// New deliveries beyond the free slots are leased by the commit that
    /// stores them and queued for the feeder's next free slot, as far as its
    /// queue (twice the slots) has room; every one of them is decided, none is
    /// left leased until its lease runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn deliveries_beyond_the_free_slots_wait_in_the_feeders_queue(engine) {
        let config = config_for(engine, CLOSED_PORT).await.with(|c| {
            c.workers.concurrency = 1;
            c.workers.lease_secs = 60;
            // The feeder claims only when woken: nothing here wakes it.
            c.workers.poll_interval_ms = 60_000;
        });
        let ctx = std::sync::Arc::new(config.context().await);
        let mut tasks = tokio::task::JoinSet::new();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handoff = pipeline::feed::spawn(
            ctx.clone(),
            &mut tasks,
            shutdown.clone(),
            std::sync::Arc::default(),
        );
        // One slot and a queue of two: of five wanted, three are reserved
        // once the feeder's first claim (of an empty inbox) has given back the
        // room it took in the queue; then nothing is free.
        let reserved = wait_for("three places to be free", WAIT, || async {
            Some(handoff.reserve(5)).filter(|r| r.room == 3)
        })
        .await;
        assert_eq!(handoff.reserve(5).room, 0);

        let keys = ["q-1", "q-2", "q-3"];
        db::store_deliveries(
            &*ctx,
            &keys.map(|k| (k, Some(k))), // one resource each
        )
        .await;
        let mut leased = Vec::new();
        for key in keys {
            db::lease(&*ctx, key, &reserved.lease_until).await;
            leased.push(db::delivery(&*ctx, key).await.unwrap());
        }
        handoff.start(leased, reserved);

        // Each is decided (the provider's port is closed: each attempt fails
        // and waits for a retry), well before a lease could run out.
        wait_until("every handed-over delivery is decided", WAIT, || async {
            db::count_in_state(&*ctx, "processing").await == 0
        })
        .await;
        shutdown.cancel();
        while tasks.join_next().await.is_some() {}
    }
}
