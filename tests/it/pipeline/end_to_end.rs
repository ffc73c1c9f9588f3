//! A real daemon fetching from the simulator that delivers to it.

use std::time::Duration;

use cancelwatch::pipeline;
use cancelwatch::Config;

use super::{check, config_for, play, WAIT};
use crate::support::both_engines;
use crate::support::db::{self, Database, TestDb};
use crate::support::sim::{
    app_with_simulator, simulator, unknown_outbound_transfer, wait_step, DeliveryOptions,
    Expectation, ExpectedHistory, Simulator,
};
use crate::support::Engine;
use crate::support::{wait_for, wait_until, TestApp, TestConfig};

/// A simulator and a daemon that know each other.
async fn start_pair(engine: Engine) -> (Simulator, TestApp) {
    start_pair_with(engine, |_| {}).await
}

/// [`start_pair`], the daemon's configuration changed by `adjust`.
async fn start_pair_with(engine: Engine, adjust: impl FnOnce(&mut Config)) -> (Simulator, TestApp) {
    app_with_simulator(TestConfig::on(engine).await.quick_workers().with(adjust)).await
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_scenario_records_its_exact_history(engine) {
        let (sim, app) = start_pair(engine).await;
        for name in Simulator::scenario_names() {
            let scenario = sim.scenario(name).unwrap();
            play(&sim, app.db(), &scenario, &DeliveryOptions::default()).await;
        }
        // Every processed delivery that named a resource was fetched with the
        // right headers; the Stripe ones with the event as trigger.
        let requests = sim.requests();
        let stripe: Vec<_> = requests
            .iter()
            .filter(|r| r.path.starts_with("/v2/"))
            .collect();
        assert!(!stripe.is_empty());
        for r in &stripe {
            assert_eq!(r.header("authorization"), Some("present"));
            assert_eq!(
                r.header("stripe-version"),
                Some(app.config().stripe.api_version.as_str())
            );
            assert!(r.header("stripe-context").is_some(), "{}", r.path);
            assert!(r
                .header("stripe-request-trigger")
                .is_some_and(|t| t.starts_with("event=evt_")));
        }
        assert!(requests
            .iter()
            .any(|r| r.path.starts_with("/bulk-transfers/")));
        assert_eq!(db::count_in_state(app.db(), "dead").await, 0);
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn duplicates_and_shuffled_order_yield_the_same_history(engine) {
        let (sim, app) = start_pair(engine).await;
        let opts = DeliveryOptions {
            duplicate: true,
            shuffle: true,
            ..DeliveryOptions::default()
        };
        for name in Simulator::scenario_names() {
            let scenario = sim.scenario(name).unwrap();
            play(&sim, app.db(), &scenario, &opts).await;
        }
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn api_faults_are_survived(engine) {
        let (sim, app) = start_pair(engine).await;
        let faults = sim.faults();
        for (i, name) in [
            "outbound_transfer_returned",
            "batch_job_canceled_midway",
            "juice_partial_cancellation",
        ]
        .iter()
        .enumerate()
        {
            let scenario = sim.scenario(name).unwrap();
            for (j, step) in scenario.steps.iter().enumerate() {
                match (i + j) % 3 {
                    0 => faults.fail_next(4, 500),
                    1 => faults.rate_limit_next(2, 1),
                    _ => faults.hang_next(1, Duration::from_secs(3)),
                }
                sim.play_step(step, &DeliveryOptions::default())
                    .await
                    .unwrap();
                wait_step(app.db(), step).await;
            }
            faults.clear();
            check(app.db(), name, &scenario.expect).await;
        }
        assert_eq!(db::count_in_state(app.db(), "dead").await, 0);
        app.stop().await;
    }
}

both_engines! {
    /// `workers.concurrency` bounds the calls to the provider at once, even
    /// though a slot comes back as soon as its outcome is queued for the
    /// recorder (before it is written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_more_provider_calls_at_once_than_workers(engine) {
        let (sim, app) = start_pair(engine).await;
        // Every fetch hangs a moment, so the calls overlap as much as the
        // daemon lets them.
        let expected = announce_transfers(&sim, 24, Duration::from_millis(150)).await;
        wait_all_processed(app.db(), &expected).await;
        // Reached (so the check below can fail), never passed.
        assert_eq!(
            sim.peak_concurrent_requests(),
            4,
            "workers.concurrency is 4"
        );
        app.stop().await;
    }
}

both_engines! {
    /// With a request budget, calls to the provider are spaced at its rate; a
    /// call whose turn lies further off than a call may wait is not made, and
    /// its delivery waits for that turn without using up an attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_request_budget_spaces_the_calls_and_costs_no_attempt(engine) {
        // Two calls a second, one at a time: of the four workers' first calls,
        // the fourth would start 1.5 s on, past the 1 s a call may wait.
        let (sim, app) = start_pair_with(engine, one_at_a_time(2.0, 1)).await;
        let started = tokio::time::Instant::now();
        let expected = announce_transfers(&sim, 8, Duration::ZERO).await;
        wait_all_processed(app.db(), &expected).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(3_400),
            "8 calls at 2 a second took only {took:?}"
        );
        let gets = api_gets(&sim);
        assert_eq!(gets, 8, "one call a transfer, none refused by the provider");
        assert_eq!(
            db::count_in_state(app.db(), "dead").await,
            0,
            "waiting for the budget used up no attempt"
        );
        let not_sent = app
            .metric(r#"cancelwatch_fetch_errors_total{provider="stripe",reason="budget"}"#)
            .await;
        assert!(not_sent > 0, "no call had to wait past its limit");
        app.stop().await;
    }
}

/// A Stripe request budget of `per_second`, one call at a time, and
/// `max_attempts` attempts a delivery.
fn one_at_a_time(per_second: f64, max_attempts: u32) -> impl FnOnce(&mut Config) {
    move |config| {
        config.stripe.rate_limit_per_second = per_second;
        config.stripe.rate_limit_burst = 1;
        config.workers.max_attempts = max_attempts;
    }
}

/// The GETs the simulator's APIs received.
fn api_gets(sim: &Simulator) -> usize {
    sim.requests().iter().filter(|r| r.method == "GET").count()
}

/// The one stored delivery once it is in `state`.
async fn wait_for_the_delivery_in(
    app: &TestApp,
    state: &str,
) -> cancelwatch::store::model::Delivery {
    wait_for(&format!("the delivery to be {state}"), WAIT, || async {
        db::deliveries(app.db())
            .await
            .into_iter()
            .next()
            .filter(|d| d.state == state)
    })
    .await
}

both_engines! {
    /// Within one call, a retry goes only if the request budget has room at
    /// once: against a failing provider and an empty budget each attempt makes
    /// one call, and its failure counts, so the delivery still ends dead
    /// rather than waiting forever as if only rate limited.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn retries_within_a_call_wait_for_no_budget_and_failures_still_count(engine) {
        let (sim, app) = start_pair_with(engine, one_at_a_time(1.0, 2)).await;
        sim.faults().fail_next(1_000, 500);
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        let step = &scenario.steps[0];
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        let dead = wait_for_the_delivery_in(&app, "dead").await;
        assert_eq!(dead.attempts, 2);
        let error = dead.last_error.unwrap_or_default();
        assert!(error.contains("500"), "{error}");
        let gets = api_gets(&sim);
        assert_eq!(
            gets, 2,
            "one call an attempt: no retry waited for the budget"
        );
        app.stop().await;
    }
}

both_engines! {
    /// The feeder claims deliveries ahead of the free workers (twice as many as
    /// there are workers); at shutdown those no worker started are given back:
    /// pending again with their attempt uncounted, not left leased until their
    /// lease runs out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn claims_no_worker_started_are_given_back_at_shutdown(engine) {
        let (sim, app) = start_pair(engine).await;
        // The 4 workers' fetches hang a while: the rest wait, some claimed.
        announce_transfers(&sim, 16, Duration::from_millis(600)).await;
        wait_until(
            "4 started and 8 claimed ahead show",
            Duration::from_secs(5),
            || async { db::count_in_state(app.db(), "processing").await >= 12 },
        )
        .await;
        let db = TestDb::of(&app.stop().await);
        let states: Vec<(String, i64)> = db::deliveries(&db)
            .await
            .into_iter()
            .map(|d| (d.state, d.attempts))
            .collect();
        // At most 4 were started when 12 were leased: at least 8 waited,
        // claimed, and none of those stays leased. Each delivery is pending
        // with no attempt counted (given back, or never claimed), or ended its
        // one started attempt (a slow machine may time its fetch out: failed).
        assert_eq!(db::count_in_state(&db, "processing").await, 0, "{states:?}");
        assert!(
            states.iter().all(|(state, attempts)| match state.as_str() {
                "pending" => *attempts == 0,
                "processed" | "failed" => *attempts == 1,
                _ => false,
            }),
            "{states:?}"
        );
    }
}

both_engines! {
    /// A claim that waited for a worker past half its lease is given back
    /// rather than started (its lease could run out before it is written, and
    /// the delivery be taken twice); claimed afresh, every delivery ends
    /// processed in one counted attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_claim_that_waited_past_half_its_lease_is_given_back(engine) {
        let (sim, app) = start_pair_with(engine, |config| {
            config.workers.lease_secs = 4;
            config.workers.fetch_timeout_secs = 10;
        })
        .await;
        // Each fetch takes 2.5 s: those claimed behind the 4 busy workers wait
        // that long, past half the 4 s lease (a started one ends 1.5 s before
        // its lease does).
        let expected = announce_transfers(&sim, 12, Duration::from_millis(2_500)).await;
        wait_all_processed(app.db(), &expected).await;
        let attempts: Vec<i64> = db::deliveries(app.db())
            .await
            .into_iter()
            .map(|d| d.attempts)
            .collect();
        assert_eq!(attempts, [1; 12]);
        app.stop().await;
    }
}

/// Moves `n` new outbound transfers to canceled in the simulator and
/// delivers the last event of each at once, after making each of the next
/// `n` fetches hang `hang`. The statuses each transfer should end with.
async fn announce_transfers(sim: &Simulator, n: u32, hang: Duration) -> Vec<(String, String)> {
    let mut last_events = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..n {
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        for step in &scenario.steps {
            sim.apply_step(step);
        }
        let step = scenario.steps.last().unwrap();
        last_events.push(step.deliveries.last().unwrap().clone());
        expected.extend(step.expect_status.clone());
    }
    sim.faults().hang_next(n, hang);
    futures_util::future::try_join_all(last_events.iter().map(|d| sim.deliver(d)))
        .await
        .unwrap();
    expected
}

/// Waits (at most [`WAIT`]) until no delivery is unfinished and every
/// resource has its expected status.
async fn wait_all_processed(db: &impl Database, expected: &[(String, String)]) {
    wait_until("every delivery is processed", WAIT, || async {
        let mut done = db::unfinished_deliveries(db).await == 0;
        for (id, want) in expected {
            done &= db::status_of(db, id).await.as_deref() == Some(want.as_str());
        }
        done
    })
    .await;
}

both_engines! {
    /// A delivery claimed by a worker that died (its lease runs out) is processed
    /// once by another; the dead worker's late finish changes nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_interrupted_delivery_is_processed_exactly_once(engine) {
        use cancelwatch::store::model::NewDelivery;
        // The simulator changes state but sends nothing: the delivery goes into
        // the inbox by hand, claimed by a "worker" that then vanishes.
        let sim = simulator(None).await;
        let config = config_for(engine, &sim.base_url()).await;
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        let step = &scenario.steps[0];
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        let body = serde_json::to_vec(&step.deliveries[0].body).unwrap();
        let event = cancelwatch::providers::stripe::event::ThinEvent::decode(&body).unwrap();
        let resource = event.resource().unwrap();

        let ctx = config.context().await;
        let now = cancelwatch::time::now();
        let new = ctx
            .store
            .insert_deliveries(&[NewDelivery {
                provider: "stripe".into(),
                dedupe_key: event.id.clone(),
                event_type: event.event_type.clone(),
                event_id: Some(event.id.clone()),
                resource_kind: Some(resource.kind.clone()),
                resource_id: Some(resource.id.clone()),
                context: resource.context.clone(),
                livemode: event.livemode,
                raw_body: body.clone(),
                source: "webhook",
                received_at: cancelwatch::time::fmt(now),
            }])
            .await
            .unwrap();
        assert_eq!(new, 1);
        let short_lease = cancelwatch::time::fmt(now + chrono::Duration::milliseconds(1_500));
        let claimed = ctx
            .store
            .claim(&cancelwatch::time::fmt(now), &short_lease, 1)
            .await
            .unwrap()
            .pop()
            .expect("the delivery is ready");
        assert_eq!(claimed.attempts, 1);

        // The daemon's workers may take it only once the lease has run out.
        let app = TestApp::start(config).await;
        wait_step(app.db(), step).await;
        let processed = db::delivery(app.db(), &event.id).await.unwrap();
        assert_eq!(processed.state, "processed");
        assert_eq!(
            processed.attempts, 2,
            "claimed once by hand, once by the daemon"
        );

        // The vanished worker comes back late and finishes: nothing changes.
        pipeline::recorder::process(&ctx, claimed, &short_lease).await;
        let after = db::delivery(app.db(), &event.id).await.unwrap();
        assert_eq!(
            (after.state, after.attempts, after.processed_at),
            (processed.state, processed.attempts, processed.processed_at)
        );
        let ts = db::transitions_of(app.db(), &resource.id).await;
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].to_status, "processing");
        assert_eq!(ts[0].trigger_id.as_deref(), Some(event.id.as_str()));
        ctx.store.close().await;
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_refused_api_key_keeps_deliveries_pending(engine) {
        let (sim, app) = start_pair_with(engine, |config| {
            config.stripe.api_key = "sk_test_wrong".into();
            config.workers.max_attempts = 1;
        })
        .await;
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let given_back = wait_for("the delivery to be attempted", WAIT, || async {
            db::deliveries(app.db())
                .await
                .into_iter()
                .next()
                .filter(|d| d.state == "pending" && d.last_error.is_some())
        })
        .await;
        let error = given_back.last_error.unwrap();
        assert_eq!(given_back.state, "pending", "{error}");
        assert_eq!(
            given_back.attempts, 0,
            "a refused key does not use up attempts"
        );
        assert!(error.contains("unauthorized"), "{error}");
        app.stop().await;
    }
}

both_engines! {
    /// A delivery that arrives while a worker is free goes to it in the commit
    /// that stores it (no claim of its own), but never while a live lease of
    /// another worker (here: another process's) holds its resource; it waits in
    /// line for a claim once that lease ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn new_deliveries_go_straight_to_free_workers_but_never_past_a_lease(engine) {
        let (sim, app) = start_pair(engine).await;
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        let resource = scenario.steps[0].expect_status[0].0.clone();
        // Another worker holds the resource for an hour.
        let in_an_hour = cancelwatch::time::fmt(cancelwatch::time::now() + chrono::Duration::hours(1));
        db::seed_leased_delivery(app.db(), "held-elsewhere", &resource, &in_an_hour).await;
        let others = |d: &cancelwatch::store::model::Delivery| d.dedupe_key != "held-elsewhere";

        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let stored: Vec<_> = db::deliveries(app.db()).await;
        assert!(
            stored.iter().any(others),
            "the delivery is stored before its 2xx"
        );
        // A delivery stored after it, by hand (so only a claim can take it),
        // is decided: a claim has run since, and passed the held one by.
        db::store_deliveries(app.db(), &[("claim-probe", None)]).await;
        wait_until("a later claim takes the probe", WAIT, || async {
            db::delivery(app.db(), "claim-probe")
                .await
                .is_some_and(|d| d.state != "pending" && d.state != "processing")
        })
        .await;
        let waiting: Vec<(String, i64)> = db::deliveries(app.db())
            .await
            .into_iter()
            .filter(|d| others(d) && d.dedupe_key != "claim-probe")
            .map(|d| (d.state, d.attempts))
            .collect();
        assert!(
            waiting
                .iter()
                .all(|(state, attempts)| state == "pending" && *attempts == 0),
            "processed past the other worker's lease: {waiting:?}"
        );
        assert_eq!(db::status_of(app.db(), &resource).await, None);

        // The lease ends: the delivery is claimed and processed.
        db::mark_processed(app.db(), "held-elsewhere").await;
        wait_step(app.db(), &scenario.steps[0]).await;
        let handed_before = handed_over(&app).await;

        // Nothing holds the resource now: the next delivery goes straight to a
        // free worker, in its first attempt.
        sim.play_step(&scenario.steps[1], &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), &scenario.steps[1]).await;
        let handed_after = handed_over(&app).await;
        assert!(
            handed_after > handed_before,
            "no delivery was handed over ({handed_before} then {handed_after})"
        );
        let attempts: Vec<i64> = db::deliveries(app.db())
            .await
            .into_iter()
            .filter(|d| others(d) && d.dedupe_key != "claim-probe")
            .map(|d| d.attempts)
            .collect();
        assert!(attempts.iter().all(|a| *a == 1), "{attempts:?}");
        app.stop().await;
    }
}

/// The daemon's count of deliveries handed to a worker by their own commit.
async fn handed_over(app: &TestApp) -> u64 {
    app.metric("cancelwatch_inbox_handed_over_total").await
}

both_engines! {
    /// After `workers.max_attempts` a delivery goes dead with its last error, and
    /// the others go on; a resource the provider does not know is dead at once
    /// and marked not found.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn failing_deliveries_go_dead_and_the_rest_go_on(engine) {
        let (sim, app) = start_pair_with(engine, |config| {
            config.workers.max_attempts = 2;
            config.workers.http_retries = 1;
        })
        .await;

        // The provider is down for this one.
        sim.faults().refuse_all(true);
        let doomed = sim.scenario("outbound_transfer_canceled").unwrap();
        sim.play_step(&doomed.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        let doomed_key = doomed.steps[0].deliveries[0]
            .event_id()
            .unwrap()
            .to_string();
        let dead = wait_for("the failing delivery to go dead", WAIT, || async {
            db::delivery(app.db(), &doomed_key)
                .await
                .filter(|d| d.state == "dead")
        })
        .await;
        assert_eq!(dead.attempts, 2);
        assert!(dead.last_error.unwrap().contains("503"));
        sim.faults().refuse_all(false);

        // An event about an object the provider never had.
        let ghost = "obt_sim_does_not_exist";
        sim.deliver(&unknown_outbound_transfer(ghost))
            .await
            .unwrap();

        // The rest goes on.
        let scenario = sim.scenario("batch_job_canceled_clean").unwrap();
        play(&sim, app.db(), &scenario, &DeliveryOptions::default()).await;
        let not_found = db::resource(app.db(), "stripe.outbound_transfer", ghost)
            .await
            .unwrap()
            .not_found;
        assert!(not_found);
        assert_eq!(db::count_in_state(app.db(), "dead").await, 2);

        let metrics = app.metrics().await;
        for name in [
            "cancelwatch_deliveries_dead_total",
            "cancelwatch_transitions_total",
            "cancelwatch_fetch_seconds",
            "cancelwatch_fetch_errors_total",
        ] {
            assert!(metrics.contains(name), "{name} missing from /metrics");
        }
        // Acknowledgement times, in finer buckets of their own (7.5 ms is not
        // among the other histograms' buckets).
        let ack_bucket = "cancelwatch_ack_seconds_bucket{provider=\"stripe\",le=\"0.0075\"}";
        assert!(
            metrics.contains(ack_bucket),
            "{ack_bucket} missing from /metrics"
        );
        // And the steps of the group commit that make them up.
        for step in ["queued", "writer", "insert", "sync", "answer"] {
            let bucket =
                format!("cancelwatch_ack_step_seconds_bucket{{step=\"{step}\",le=\"0.0075\"}}");
            assert!(metrics.contains(&bucket), "{bucket} missing from /metrics");
        }
        // How long each use held the writer connection (SQLite's one; on
        // PostgreSQL every use has a connection of its own).
        let uses: &[&str] = match engine {
            Engine::Sqlite => &["acknowledge", "claim", "record"],
            Engine::Postgres => &[],
        };
        for what in uses {
            let count = format!("cancelwatch_writer_hold_seconds_count{{use=\"{what}\"}}");
            assert!(metrics.contains(&count), "{count} missing from /metrics");
        }
        app.stop().await;
    }
}

both_engines! {
    /// A provider asking for a longer pause than a call waits inline gets it:
    /// the delivery is retried no earlier than its `Retry-After`. A rate limit
    /// (429) is the provider asking us to slow down, not a fault of the
    /// delivery: the wait uses up no attempt, so even a delivery allowed a
    /// single attempt comes through.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_long_retry_after_is_honoured_between_attempts(engine) {
        let (sim, app) = start_pair_with(engine, |config| config.workers.max_attempts = 1).await;
        // Every call of the first attempt is rate limited for 3 s (over the 1 s inline cap).
        sim.faults().rate_limit_next(1, 3);
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        let step = &scenario.steps[0];
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        let key = step.deliveries[0].event_id().unwrap().to_string();
        let limited = wait_for("the rate-limited attempt", WAIT, || async {
            let d = db::delivery(app.db(), &key).await.unwrap();
            assert_ne!(d.state, "processed", "the rate limit was not seen");
            d.last_error.is_some().then_some(d)
        })
        .await;
        let error = limited.last_error.as_deref().unwrap();
        assert_eq!(limited.state, "pending", "{error}");
        assert_eq!(
            limited.attempts, 0,
            "a rate limit does not use up an attempt"
        );
        assert!(error.contains("rate limited"), "{error}");
        let received = cancelwatch::time::parse_lenient(&limited.received_at).unwrap();
        let next = cancelwatch::time::parse_lenient(&limited.next_attempt_at).unwrap();
        assert!(
            next - received >= chrono::Duration::milliseconds(2_900),
            "retry scheduled {} ms after receipt",
            (next - received).num_milliseconds()
        );
        wait_step(app.db(), step).await;
        check(
            app.db(),
            "after the pause",
            &Expectation {
                histories: vec![ExpectedHistory {
                    statuses: vec!["processing".into()],
                    ..scenario.expect.histories[0].clone()
                }],
                ..Expectation::default()
            },
        )
        .await;
        app.stop().await;
    }
}
