//! Cancel, backfill, replay and reconcile, driven through their library
//! functions (as the commands beside the daemon call them).

use cancelwatch::jobs;
use cancelwatch::pipeline::{self, Context};

use super::{config_for, WAIT};
use crate::support::both_engines;
use crate::support::db;
use crate::support::sim::STRIPE_CONTEXT;
use crate::support::sim::{simulator, wait_step, DeliveryOptions};
use crate::support::{wait_for, wait_until, TestApp};

/// The account context of the simulator's Stripe events, which a backfill
/// on a database that has seen none of them is told to list.
fn sim_context() -> [String; 1] {
    [STRIPE_CONTEXT.to_string()]
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cancel_records_request_answer_and_state(engine) {
        // No daemon: cancel is a library call on a Context.
        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await;
        let ctx = config.context().await;

        // Stripe: a processing transfer is canceled; its refund completes.
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let id = scenario.expect.histories[0].id.clone();
        let report = pipeline::cancel::request(&ctx, "stripe.outbound_transfer", &id, "cli")
            .await
            .unwrap();
        assert_eq!(report.outcome, "accepted");
        assert_eq!(report.status.as_deref(), Some("canceled"));
        let ts = db::transitions_of(&ctx, &id).await;
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].trigger_type, "cancel");
        assert_eq!(ts[0].trigger_id, Some(report.request_id.to_string()));
        let refunds = db::refunds_under(&ctx, &id).await;
        assert_eq!(refunds.len(), 1);
        assert_eq!(refunds[0].status, "completed");

        let cancel_call = sim
            .requests()
            .into_iter()
            .find(|r| r.method == "POST" && r.path.ends_with(&format!("{id}/cancel")))
            .expect("the cancel endpoint was called");
        assert_eq!(
            cancel_call.header("idempotency-key"),
            Some(report.idempotency_key.as_str())
        );

        // Again: the same key, the answer says so, nothing doubles.
        let again = pipeline::cancel::request(&ctx, "stripe.outbound_transfer", &id, "api")
            .await
            .unwrap();
        assert_eq!(again.idempotency_key, report.idempotency_key);
        assert_ne!(again.request_id, report.request_id);
        assert!(
            matches!(again.outcome.as_str(), "accepted" | "already_cancelled"),
            "{}",
            again.outcome
        );
        assert_eq!(db::transitions_of(&ctx, &id).await.len(), 1);
        let requests = db::cancel_requests(&ctx, "stripe.outbound_transfer", &id).await;
        assert_eq!(requests.len(), 2);
        assert!(requests
            .iter()
            .all(|r| r.answered_at.is_some() && r.http_status.is_some()));
        let resource = db::resource(&ctx, "stripe.outbound_transfer", &id)
            .await
            .unwrap();
        assert!(resource.cancel_requested_at.is_some());

        // Juice: a bulk transfer with work in flight cancels only in part.
        let scenario = sim.scenario("juice_partial_cancellation").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let bulk = scenario.expect.histories[0].id.clone();
        let report = pipeline::cancel::request(&ctx, "juice.bulk_transfer", &bulk, "cli")
            .await
            .unwrap();
        assert_eq!(report.outcome, "partial_cancellation", "{report:?}");
        assert_eq!(report.status.as_deref(), Some("cancelled"));
        let refunds = db::refunds_under(&ctx, &bulk).await;
        assert_eq!(refunds.len(), 2, "the two pending transfers were cancelled");
        assert!(refunds.iter().all(|r| r.status == "pending"));

        // Unknown kinds and unsafe ids are refused before any call.
        assert!(matches!(
            pipeline::cancel::request(&ctx, "stripe.charge", "ch_1", "cli").await,
            Err(pipeline::PipelineError::UnknownKind(_))
        ));
        assert!(matches!(
            pipeline::cancel::request(&ctx, "juice.bulk_transfer", "../x", "cli").await,
            Err(pipeline::PipelineError::InvalidId(_))
        ));
        ctx.store.close().await;
    }
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn backfill_takes_in_missing_events_and_replay_changes_nothing(engine) {
        // Events happen while cancelwatch is not listening (no target).
        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await;
        let since = cancelwatch::time::now_str();
        let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
        for step in &scenario.steps {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
        }
        let ctx = config.context().await;
        let report = pipeline::backfill::events(&ctx, "stripe", &since, &sim_context())
            .await
            .unwrap();
        assert_eq!(report.new, scenario.steps.len());
        assert_eq!(report.listed, report.new);
        let again = pipeline::backfill::events(&ctx, "stripe", &since, &sim_context())
            .await
            .unwrap();
        assert_eq!(again.new, 0, "nothing is taken in twice");
        assert!(matches!(
            pipeline::backfill::events(&ctx, "stripe", "last tuesday", &[]).await,
            Err(pipeline::PipelineError::InvalidArgument(_))
        ));
        ctx.store.close().await;

        // The daemon processes them: the current state, triggered by backfill.
        let app = TestApp::start(config.clone()).await;
        wait_step(app.db(), scenario.steps.last().unwrap()).await;
        let id = &scenario.expect.histories[0].id;
        let ts = db::transitions_of(app.db(), id).await;
        assert_eq!(ts.len(), 1, "only the current state was there to fetch");
        assert_eq!(ts[0].to_status, "canceled");
        assert_eq!(ts[0].trigger_type, "backfill");
        assert_eq!(
            db::progress_rows(app.db()).await.len() as i64,
            scenario.steps.len() as i64,
            "counts at each observation"
        );

        // Replay of a processed delivery: processed again (here, or by the
        // daemon's workers when they take it first), no new transition.
        let ctx = config.context().await;
        let key = ts[0].trigger_id.clone().unwrap();
        let replayed = pipeline::replay(&ctx, &key, true).await.unwrap();
        assert_eq!(replayed.previous_state, "processed");
        if replayed.processed_inline {
            assert_eq!(replayed.state, "processed");
        }
        let processed = wait_for("the replayed delivery to be processed", WAIT, || async {
            db::delivery(app.db(), &key)
                .await
                .filter(|d| d.state == "processed")
        })
        .await;
        assert_eq!(processed.attempts, 1, "replay starts the count again");
        assert_eq!(db::transitions_of(app.db(), id).await.len(), 1);
        assert!(matches!(
            pipeline::replay(&ctx, "evt_nope", true).await,
            Err(pipeline::PipelineError::NoSuchDelivery(_))
        ));
        ctx.store.close().await;
        app.stop().await;
    }
}

/// Runs reconcile passes until `done` holds (bounded).
async fn reconcile_until(
    ctx: &Context,
    what: &str,
    done: impl Fn(&[String]) -> bool,
    ids: &[&str],
) {
    wait_until(what, WAIT, || async {
        jobs::reconcile::run_once(ctx).await.unwrap();
        let refunds = db::refunds(ctx).await;
        let mut statuses = Vec::new();
        for id in ids {
            let refund = refunds.iter().find(|r| r.resource_id == *id);
            statuses.push(format!(
                "{}/{}",
                db::status_of(ctx, id).await.unwrap_or_default(),
                refund.map(|r| r.status.as_str()).unwrap_or_default()
            ));
        }
        done(&statuses)
    })
    .await;
}

both_engines! {
    /// The reconciler fetches again what still moves (and items whose refund is
    /// pending, through their bulk transfer), backing off on failures.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reconcile_follows_what_no_event_announced(engine) {
        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await.with(|c| {
            c.reconcile.interval_secs = 1;
            c.reconcile.max_interval_secs = 2;
        });
        let ctx = config.context().await;

        // A batch job is seen in progress (taken in by backfill, processed inline
        // by replay), then moves on with no event sent.
        let since = cancelwatch::time::now_str();
        let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        assert_eq!(
            pipeline::backfill::events(&ctx, "stripe", &since, &sim_context())
                .await
                .unwrap()
                .new,
            1
        );
        let key = scenario.steps[0].deliveries[0]
            .event_id()
            .unwrap()
            .to_string();
        let replayed = pipeline::replay(&ctx, &key, true).await.unwrap();
        assert_eq!(replayed.state, "processed");
        let job = scenario.expect.histories[0].id.clone();
        for step in &scenario.steps[1..] {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
        }

        // A failed pass pushes it back and counts the failure.
        sim.faults().refuse_all(true);
        let failed = wait_for("a failed reconcile pass", WAIT, || async {
            jobs::reconcile::run_once(&ctx).await.unwrap();
            db::resource(&ctx, "stripe.batch_job", &job)
                .await
                .filter(|r| r.reconcile_failures > 0)
        })
        .await;
        assert!(failed.next_reconcile_at.unwrap() > cancelwatch::time::now_str());
        sim.faults().refuse_all(false);
        reconcile_until(&ctx, "batch job", |s| s[0] == "canceled/", &[&job]).await;
        let ts = db::transitions_of(&ctx, &job).await;
        let to: Vec<&str> = ts.iter().map(|t| t.to_status.as_str()).collect();
        assert_eq!(to, vec!["in_progress", "canceled"]);
        assert_eq!(ts[1].trigger_type, "reconcile");
        let r = db::resource(&ctx, "stripe.batch_job", &job).await.unwrap();
        assert_eq!(r.reconcile_failures, 0);
        assert!(r.next_reconcile_at.is_none(), "terminal: no more fetches");

        // Juice: cancelled items wait for their reversal; the reconciler sees it.
        let scenario = sim.scenario("juice_clean_cancellation").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let bulk = scenario.expect.histories[0].id.clone();
        let report = pipeline::cancel::request(&ctx, "juice.bulk_transfer", &bulk, "cli")
            .await
            .unwrap();
        assert_eq!(report.status.as_deref(), Some("cancelled"));
        let items: Vec<String> = scenario.expect.histories[1..]
            .iter()
            .map(|h| h.id.clone())
            .collect();
        let item_ids: Vec<&str> = items.iter().map(String::as_str).collect();
        for step in &scenario.steps[1..] {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
        }
        reconcile_until(
            &ctx,
            "juice items",
            |s| s.iter().all(|s| s == "reversed/completed"),
            &item_ids,
        )
        .await;
        for item in &items {
            let ts = db::transitions_of(&ctx, item).await;
            let to: Vec<&str> = ts.iter().map(|t| t.to_status.as_str()).collect();
            assert_eq!(to, vec!["cancelled", "reversed"], "{item}");
            assert_eq!(ts[0].trigger_type, "cancel");
            assert_eq!(ts[1].trigger_type, "reconcile");
        }
        ctx.store.close().await;
    }
}

both_engines! {
    /// A delivery whose workers keep vanishing (each lease runs out) is given up
    /// after `workers.max_attempts`, not retried forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_delivery_whose_workers_keep_dying_goes_dead(engine) {
        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await.with(|c| c.workers.max_attempts = 2);
        let since = cancelwatch::time::now_str();
        let scenario = sim.scenario("outbound_transfer_returned").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let ctx = config.context().await;
        assert_eq!(
            pipeline::backfill::events(&ctx, "stripe", &since, &sim_context())
                .await
                .unwrap()
                .new,
            1
        );
        // Two claims whose leases are over at once (on PostgreSQL, a lease
        // lasts at least a second by the database's clock): two workers that
        // died. Each next claim takes the delivery up once that has lapsed.
        let claim_once_lapsed = |lease: String| {
            let store = ctx.store.clone();
            wait_for("the delivery to be claimable again", WAIT, move || {
                let (store, lease) = (store.clone(), lease.clone());
                async move {
                    let now = cancelwatch::time::now_str();
                    store.claim(&now, &lease, 1).await.unwrap().pop()
                }
            })
        };
        for _ in 0..2 {
            let now = cancelwatch::time::now();
            let gone = cancelwatch::time::fmt(now - chrono::Duration::milliseconds(1));
            let d = claim_once_lapsed(gone).await;
            assert_eq!(d.state, "processing");
        }
        let lease = pipeline::feed::lease_until(&ctx.config);
        let d = claim_once_lapsed(lease.clone()).await;
        assert_eq!(d.attempts, 3);
        let key = d.dedupe_key.clone();
        pipeline::recorder::process(&ctx, d, &lease).await;
        let dead = db::delivery(&ctx, &key).await.unwrap();
        assert_eq!(dead.state, "dead");
        assert!(dead.last_error.unwrap().contains("never finished"));
        let id = &scenario.expect.histories[0].id;
        assert!(db::transitions_of(&ctx, id).await.is_empty());
        ctx.store.close().await;
    }
}

both_engines! {
    /// Event listing follows `next_page_url` to the end, page by page.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn listing_events_follows_every_page(engine) {
        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await;
        let config = config.config();
        let since = cancelwatch::time::now_str();
        let mut ids = Vec::new();
        for _ in 0..2 {
            let scenario = sim.scenario("batch_job_canceled_clean").unwrap();
            for step in &scenario.steps {
                sim.play_step(step, &DeliveryOptions::default())
                    .await
                    .unwrap();
                ids.push(step.deliveries[0].event_id().unwrap().to_string());
            }
        }
        let api = cancelwatch::providers::stripe::api::StripeApi::new(&config.stripe, &config.workers);
        let events = api
            .list_events(&since, 2, Some(STRIPE_CONTEXT))
            .await
            .unwrap();
        let mut listed: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect();
        listed.sort();
        ids.sort();
        assert_eq!(listed, ids);
        let pages = sim
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/v2/core/events"))
            .count();
        assert_eq!(pages, 3, "six events, two per page");
    }
}

both_engines! {
    /// `cancel` exits 0 only when the cancel took effect; a cancel the provider
    /// refused, one of a resource it does not have, and one that could not reach
    /// it each exit with their own code; `/v1/cancellations` answers a matching
    /// status.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cancel_exit_codes_and_statuses_follow_the_outcome(engine) {
        use crate::support::binary;

        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await;
        let posted = sim
            .scenario("outbound_transfer_posted_before_cancel")
            .unwrap();
        for step in &posted.steps {
            sim.apply_step(step);
        }
        let posted_id = posted.expect.histories[0].id.clone();
        let live = sim.scenario("outbound_transfer_canceled").unwrap();
        sim.apply_step(&live.steps[0]);
        let live_id = live.expect.histories[0].id.clone();

        let exit = |args: &[&str], config: &crate::support::TestConfig| {
            let o = binary::run(config, args);
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stdout).to_string(),
            )
        };
        let (code, out) = exit(&["cancel", "stripe.outbound_transfer", &live_id], &config);
        assert_eq!(code, Some(0), "{out}");
        let (code, out) = exit(&["cancel", "stripe.outbound_transfer", &posted_id], &config);
        assert_eq!(code, Some(4), "{out}");
        assert!(out.contains("not_cancellable"), "{out}");
        let (code, out) = exit(
            &["cancel", "stripe.outbound_transfer", "obt_nobody"],
            &config,
        );
        assert_eq!(code, Some(5), "{out}");
        let offline = config_for(engine, crate::support::config::CLOSED_PORT).await;
        let (code, out) = exit(&["cancel", "stripe.outbound_transfer", &live_id], &offline);
        assert_eq!(code, Some(8), "{out}");

        let token = "cancel-statuses-admin-token-0001";
        let app = TestApp::start(config.with(|c| c.server.admin_token = token.into())).await;
        let post = |id: &str| {
            let body = serde_json::json!({"kind": "stripe.outbound_transfer", "id": id});
            app.post("/v1/cancellations", Some(body), Some(token))
        };
        let (status, body) = post(&posted_id).await;
        assert_eq!(
            (status, body["outcome"].as_str()),
            (409, Some("not_cancellable"))
        );
        let (status, body) = post("obt_nobody").await;
        assert_eq!((status, body["outcome"].as_str()), (404, Some("not_found")));
        app.stop().await;
    }
}

both_engines! {
    /// A command logs to stderr at the level its flags ask for: warnings by
    /// default, `-v` info, `-q` errors only; `RUST_LOG` overrides them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commands_log_at_the_level_their_flags_ask_for(engine) {
        use crate::support::binary;

        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await;
        let stderr_of = |args: &[&str], rust_log: Option<&str>| {
            let mut cmd = binary::command(config.dir());
            cmd.args(args)
                .env("CANCELWATCH_CONFIG", config.write_toml());
            if let Some(filter) = rust_log {
                cmd.env("RUST_LOG", filter);
            }
            let o = cmd.output().unwrap();
            String::from_utf8_lossy(&o.stderr).to_string()
        };
        let cancel = ["cancel", "stripe.outbound_transfer", "obt_nobody"];
        let answered = "cancel answered";
        assert!(!stderr_of(&cancel, None).contains(answered));
        let verbose: Vec<&str> = std::iter::once("-v").chain(cancel).collect();
        assert!(stderr_of(&verbose, None).contains(answered));
        assert!(stderr_of(&cancel, Some("info")).contains(answered));
    }
}
