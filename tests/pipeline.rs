//! End to end: the simulator plays cancel scenarios against a real daemon
//! (both on 127.0.0.1:0); the transitions and refunds recorded must match each
//! scenario's expectation exactly, with duplicates, shuffled order, API
//! faults and interrupted processing. Cancel, replay and backfill are driven
//! through their library functions.

use std::path::PathBuf;
use std::time::Duration;

use cancelwatch::pipeline::{self, Context};
use cancelwatch::store::{self, resources};
use cancelwatch::Config;
use cancelwatch_sim::{DeliveryOptions, Expectation, Scenario, SimConfig, Simulator, Step};
use sqlx::SqlitePool;
use tokio::task::JoinHandle;

const STRIPE_KEY: &str = "sk_test_pipeline";
const JUICE_KEY: &str = "juice_key_pipeline";
const WEBHOOK_SECRET: &str = "whsec_pipeline_test";
const BUSINESS_ID: &str = "pipeline-business-id";
const WAIT: Duration = Duration::from_secs(20);

struct Daemon {
    url: String,
    db_path: PathBuf,
    config: Config,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    dir: tempfile::TempDir,
}

impl Daemon {
    /// Stops the daemon; its folder (and database) lives on in what is returned.
    async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.unwrap().unwrap();
        }
        self.dir
    }

    async fn reader(&self) -> SqlitePool {
        sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(
                sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&self.db_path)
                    .read_only(true),
            )
            .await
            .unwrap()
    }
}

fn config_for(dir: &std::path::Path, api_base: &str) -> Config {
    let mut c = Config::default();
    c.database.url = format!("sqlite://{}/cw.db", dir.display());
    c.stripe.api_base = api_base.into();
    c.stripe.api_key = STRIPE_KEY.into();
    c.stripe.webhook_secrets = vec![WEBHOOK_SECRET.into()];
    c.juice.api_base = api_base.into();
    c.juice.api_key = JUICE_KEY.into();
    c.juice.checksum_keys = vec![BUSINESS_ID.into()];
    c.workers.concurrency = 4;
    c.workers.lease_secs = 10;
    c.workers.poll_interval_ms = 50;
    c.workers.fetch_timeout_secs = 1;
    c.workers.http_retries = 3;
    c.workers.backoff_base_ms = 50;
    c.workers.backoff_max_secs = 1;
    // Reconcile stays out of the way: histories come from deliveries.
    c.reconcile.interval_secs = 3_600;
    c
}

/// A simulator aimed at a daemon that is about to listen on `listener`.
async fn sim_for(target: Option<String>) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        listener,
        SimConfig {
            stripe_api_key: STRIPE_KEY.into(),
            juice_api_key: JUICE_KEY.into(),
            stripe_webhook_secret: WEBHOOK_SECRET.into(),
            juice_checksum_key: BUSINESS_ID.into(),
            target,
        },
    )
    .await
    .unwrap()
}

/// Starts the daemon on `listener` with `config`.
fn start_daemon(
    listener: tokio::net::TcpListener,
    config: Config,
    dir: tempfile::TempDir,
) -> Daemon {
    let url = format!("http://{}", listener.local_addr().unwrap());
    let db_path = config.database_path().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(cancelwatch::run_until(
        config.clone(),
        listener,
        async move {
            let _ = stopped.await;
        },
    ));
    Daemon {
        url,
        db_path,
        config,
        stop: Some(stop),
        handle: Some(handle),
        dir,
    }
}

/// A simulator and a daemon that know each other.
async fn start_pair() -> (Simulator, Daemon) {
    start_pair_with(|_| {}).await
}

/// [`start_pair`], the daemon's configuration changed by `adjust`.
async fn start_pair_with(adjust: impl FnOnce(&mut Config)) -> (Simulator, Daemon) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sim = sim_for(Some(url)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), &sim.base_url());
    adjust(&mut config);
    let daemon = start_daemon(listener, config, dir);
    wait_ready(&daemon.url).await;
    (sim, daemon)
}

async fn wait_ready(url: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/readyz")).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "daemon never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn unfinished(pool: &SqlitePool) -> i64 {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn status_of(pool: &SqlitePool, id: &str) -> Option<String> {
    sqlx::query_scalar::<_, Option<String>>("SELECT status FROM resources WHERE id = ?")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
}

/// Waits (bounded) until nothing is left to process and every status of the
/// step is reached.
async fn wait_step(pool: &SqlitePool, step: &Step) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut done = unfinished(pool).await == 0;
        for (id, want) in &step.expect_status {
            done &= status_of(pool, id).await.as_deref() == Some(want.as_str());
        }
        if done {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            let states: Vec<(String, String, Option<String>)> =
                sqlx::query_as("SELECT dedupe_key, state, last_error FROM inbox ORDER BY id")
                    .fetch_all(pool)
                    .await
                    .unwrap();
            let mut got = Vec::new();
            for (id, want) in &step.expect_status {
                got.push((id.clone(), want.clone(), status_of(pool, id).await));
            }
            panic!(
                "step {:?} not reached: statuses {got:?}; inbox {states:?}",
                step.label
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Compares what was recorded with the scenario's expectation, exactly.
async fn check(pool: &SqlitePool, name: &str, expect: &Expectation) {
    let mut all_ids = Vec::new();
    for h in &expect.histories {
        all_ids.push(h.id.clone());
        let ts = resources::transitions_of(pool, &h.id).await.unwrap();
        let to: Vec<String> = ts.iter().map(|t| t.to_status.clone()).collect();
        assert_eq!(to, h.statuses, "{name}: history of {} ({})", h.id, h.kind);
        let mut previous: Option<String> = None;
        for t in &ts {
            assert_eq!(t.kind, h.kind, "{name}: {}", h.id);
            assert_eq!(t.parent_id, h.parent_id, "{name}: parent of {}", h.id);
            assert_eq!(t.from_status, previous, "{name}: from_status of {}", h.id);
            assert!(
                matches!(
                    t.trigger_type.as_str(),
                    "event" | "cancel" | "backfill" | "reconcile"
                ),
                "{name}: trigger {}",
                t.trigger_type
            );
            previous = Some(t.to_status.clone());
        }
    }
    let mut refund_count = 0;
    for id in &all_ids {
        let rs: Vec<(String, String, Option<i64>, Option<String>)> = sqlx::query_as(
            "SELECT resource_id, status, amount, currency FROM refunds WHERE resource_id = ?",
        )
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap();
        refund_count += rs.len();
        for (rid, status, amount, currency) in rs {
            let want = expect
                .refunds
                .iter()
                .find(|r| r.resource_id == rid)
                .unwrap_or_else(|| panic!("{name}: unexpected refund for {rid}"));
            assert_eq!(status, want.status, "{name}: refund status of {rid}");
            assert_eq!(amount, Some(want.amount), "{name}: refund amount of {rid}");
            assert_eq!(
                currency.as_deref(),
                Some(want.currency.as_str()),
                "{name}: refund currency of {rid}"
            );
        }
    }
    assert_eq!(refund_count, expect.refunds.len(), "{name}: refunds");
}

async fn play(sim: &Simulator, pool: &SqlitePool, scenario: &Scenario, opts: &DeliveryOptions) {
    for step in &scenario.steps {
        sim.play_step(step, opts).await.unwrap();
        wait_step(pool, step).await;
    }
    assert!(sim.wait_background(WAIT).await);
    check(pool, &scenario.name, &scenario.expect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_records_its_exact_history() {
    let (sim, daemon) = start_pair().await;
    let pool = daemon.reader().await;
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).unwrap();
        play(&sim, &pool, &scenario, &DeliveryOptions::default()).await;
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
            Some(daemon.config.stripe.api_version.as_str())
        );
        assert!(r.header("stripe-context").is_some(), "{}", r.path);
        assert!(r
            .header("stripe-request-trigger")
            .is_some_and(|t| t.starts_with("event=evt_")));
    }
    assert!(requests
        .iter()
        .any(|r| r.path.starts_with("/bulk-transfers/")));
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_and_shuffled_order_yield_the_same_history() {
    let (sim, daemon) = start_pair().await;
    let pool = daemon.reader().await;
    let opts = DeliveryOptions {
        duplicate: true,
        shuffle: true,
        ..DeliveryOptions::default()
    };
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).unwrap();
        play(&sim, &pool, &scenario, &opts).await;
    }
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_faults_are_survived() {
    let (sim, daemon) = start_pair().await;
    let pool = daemon.reader().await;
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
            wait_step(&pool, step).await;
        }
        faults.clear();
        check(&pool, name, &scenario.expect).await;
    }
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    daemon.stop().await;
}

/// `workers.concurrency` bounds the calls to the provider at once, even
/// though a slot comes back as soon as its outcome is queued for the
/// recorder (before it is written).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_more_provider_calls_at_once_than_workers() {
    let (sim, daemon) = start_pair().await;
    let pool = daemon.reader().await;
    // Every fetch hangs a moment, so the calls overlap as much as the
    // daemon lets them.
    let expected = announce_transfers(&sim, 24, Duration::from_millis(150)).await;
    wait_all_processed(&pool, &expected).await;
    // Reached (so the check below can fail), never passed.
    assert_eq!(
        sim.peak_concurrent_requests(),
        4,
        "workers.concurrency is 4"
    );
    daemon.stop().await;
}

/// With a request budget, calls to the provider are spaced at its rate; a
/// call whose turn lies further off than a call may wait is not made, and
/// its delivery waits for that turn without using up an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_budget_spaces_the_calls_and_costs_no_attempt() {
    // Two calls a second, one at a time: of the four workers' first calls,
    // the fourth would start 1.5 s on, past the 1 s a call may wait.
    let (sim, daemon) = start_pair_with(one_at_a_time(2.0, 1)).await;
    let pool = daemon.reader().await;
    let started = tokio::time::Instant::now();
    let expected = announce_transfers(&sim, 8, Duration::ZERO).await;
    wait_all_processed(&pool, &expected).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(3_400),
        "8 calls at 2 a second took only {took:?}"
    );
    let gets = api_gets(&sim);
    assert_eq!(gets, 8, "one call a transfer, none refused by the provider");
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0, "waiting for the budget used up no attempt");
    let not_sent = metric(
        &daemon.url,
        r#"cancelwatch_fetch_errors_total{provider="stripe",reason="budget"}"#,
    )
    .await;
    assert!(not_sent > 0, "no call had to wait past its limit");
    daemon.stop().await;
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

/// Within one call, a retry goes only if the request budget has room at
/// once: against a failing provider and an empty budget each attempt makes
/// one call, and its failure counts, so the delivery still ends dead
/// rather than waiting forever as if only rate limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_within_a_call_wait_for_no_budget_and_failures_still_count() {
    let (sim, daemon) = start_pair_with(one_at_a_time(1.0, 2)).await;
    let pool = daemon.reader().await;
    sim.faults().fail_next(1_000, 500);
    let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
    let step = &scenario.steps[0];
    sim.play_step(step, &DeliveryOptions::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (attempts, error) = loop {
        let row: Option<(String, i64, Option<String>)> =
            sqlx::query_as("SELECT state, attempts, last_error FROM inbox")
                .fetch_optional(&pool)
                .await
                .unwrap();
        if let Some(("dead", attempts, error)) = row.as_ref().map(|(s, a, e)| (s.as_str(), *a, e)) {
            break (attempts, error.clone().unwrap_or_default());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never went dead: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(attempts, 2);
    assert!(error.contains("500"), "{error}");
    let gets = api_gets(&sim);
    assert_eq!(
        gets, 2,
        "one call an attempt: no retry waited for the budget"
    );
    daemon.stop().await;
}

/// The feeder claims deliveries ahead of the free workers (twice as many as
/// there are workers); at shutdown those no worker started are given back:
/// pending again with their attempt uncounted, not left leased until their
/// lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_no_worker_started_are_given_back_at_shutdown() {
    let (sim, daemon) = start_pair().await;
    let pool = daemon.reader().await;
    // The 4 workers' fetches hang a while: the rest wait, some claimed.
    announce_transfers(&sim, 16, Duration::from_millis(600)).await;
    let count = |state: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM inbox WHERE state = ?")
                .bind(state)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count("processing").await < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "4 started and 8 claimed ahead never showed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _dir = daemon.stop().await;
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, attempts FROM inbox ORDER BY state")
            .fetch_all(&pool)
            .await
            .unwrap();
    // At most 4 were started when 12 were leased: at least 8 waited,
    // claimed, and none of those stays leased. Each delivery is pending
    // with no attempt counted (given back, or never claimed), or ended its
    // one started attempt (a slow machine may time its fetch out: failed).
    assert_eq!(count("processing").await, 0, "{states:?}");
    assert!(
        states.iter().all(|(state, attempts)| match state.as_str() {
            "pending" => *attempts == 0,
            "processed" | "failed" => *attempts == 1,
            _ => false,
        }),
        "{states:?}"
    );
}

/// A claim that waited for a worker past half its lease is given back
/// rather than started (its lease could run out before it is written, and
/// the delivery be taken twice); claimed afresh, every delivery ends
/// processed in one counted attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_that_waited_past_half_its_lease_is_given_back() {
    let (sim, daemon) = start_pair_with(|config| {
        config.workers.lease_secs = 4;
        config.workers.fetch_timeout_secs = 10;
    })
    .await;
    let pool = daemon.reader().await;
    // Each fetch takes 2.5 s: those claimed behind the 4 busy workers wait
    // that long, past half the 4 s lease (a started one ends 1.5 s before
    // its lease does).
    let expected = announce_transfers(&sim, 12, Duration::from_millis(2_500)).await;
    wait_all_processed(&pool, &expected).await;
    let attempts: Vec<i64> = sqlx::query_scalar("SELECT attempts FROM inbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(attempts, [1; 12]);
    daemon.stop().await;
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
async fn wait_all_processed(pool: &SqlitePool, expected: &[(String, String)]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut done = unfinished(pool).await == 0;
        for (id, want) in expected {
            done &= status_of(pool, id).await.as_deref() == Some(want.as_str());
        }
        if done {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not all processed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A delivery claimed by a worker that died (its lease runs out) is processed
/// once by another; the dead worker's late finish changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_delivery_is_processed_exactly_once() {
    // The simulator changes state but sends nothing: the delivery goes into
    // the inbox by hand, claimed by a "worker" that then vanishes.
    let sim = sim_for(None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), &sim.base_url());
    let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
    let step = &scenario.steps[0];
    sim.play_step(step, &DeliveryOptions::default())
        .await
        .unwrap();
    let body = serde_json::to_vec(&step.deliveries[0].body).unwrap();
    let event = cancelwatch::providers::stripe::event::ThinEvent::decode(&body).unwrap();
    let resource = event.resource().unwrap();

    let ctx = Context::open(config.clone()).await.unwrap();
    let now = cancelwatch::time::now();
    let mut tx = ctx.db.write.begin().await.unwrap();
    let new = store::inbox::insert(
        &mut tx,
        &store::inbox::NewDelivery {
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
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(new);
    let short_lease = cancelwatch::time::fmt(now + chrono::Duration::milliseconds(1_500));
    let claimed = store::inbox::claim(&ctx.db.write, &cancelwatch::time::fmt(now), &short_lease)
        .await
        .unwrap()
        .expect("the delivery is ready");
    assert_eq!(claimed.attempts, 1);

    // The daemon's workers may take it only once the lease has run out.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let daemon = start_daemon(listener, config, dir);
    let pool = daemon.reader().await;
    wait_step(&pool, step).await;
    let (state, attempts, processed_at): (String, i64, Option<String>) =
        sqlx::query_as("SELECT state, attempts, processed_at FROM inbox WHERE dedupe_key = ?")
            .bind(&event.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(state, "processed");
    assert_eq!(attempts, 2, "claimed once by hand, once by the daemon");

    // The vanished worker comes back late and finishes: nothing changes.
    pipeline::worker::process(&ctx, claimed, &short_lease).await;
    let after: (String, i64, Option<String>) =
        sqlx::query_as("SELECT state, attempts, processed_at FROM inbox WHERE dedupe_key = ?")
            .bind(&event.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(after, (state, attempts, processed_at));
    let ts = resources::transitions_of(&pool, &resource.id)
        .await
        .unwrap();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].to_status, "processing");
    assert_eq!(ts[0].trigger_id.as_deref(), Some(event.id.as_str()));
    ctx.db.close().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_records_request_answer_and_state() {
    // No daemon: cancel is a library call on a Context.
    let sim = sim_for(None).await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::open(config_for(dir.path(), &sim.base_url()))
        .await
        .unwrap();

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
    let ts = resources::transitions_of(&ctx.db.read, &id).await.unwrap();
    assert_eq!(ts.len(), 1);
    assert_eq!(ts[0].trigger_type, "cancel");
    assert_eq!(ts[0].trigger_id, Some(report.request_id.to_string()));
    let refunds = resources::refunds_under(&ctx.db.read, &id).await.unwrap();
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
    assert_eq!(
        resources::transitions_of(&ctx.db.read, &id)
            .await
            .unwrap()
            .len(),
        1
    );
    let requests = store::cancels::of_resource(&ctx.db.read, "stripe.outbound_transfer", &id)
        .await
        .unwrap();
    assert_eq!(requests.len(), 2);
    assert!(requests
        .iter()
        .all(|r| r.answered_at.is_some() && r.http_status.is_some()));
    let resource = resources::find(&ctx.db.read, "stripe.outbound_transfer", &id)
        .await
        .unwrap()
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
    let refunds = resources::refunds_under(&ctx.db.read, &bulk).await.unwrap();
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
    ctx.db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_takes_in_missing_events_and_replay_changes_nothing() {
    // Events happen while cancelwatch is not listening (no target).
    let sim = sim_for(None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), &sim.base_url());
    let since = cancelwatch::time::now_str();
    let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
    for step in &scenario.steps {
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
    }
    let ctx = Context::open(config.clone()).await.unwrap();
    let report = pipeline::backfill::stripe(&ctx, &since).await.unwrap();
    assert_eq!(report.new, scenario.steps.len());
    assert_eq!(report.listed, report.new);
    let again = pipeline::backfill::stripe(&ctx, &since).await.unwrap();
    assert_eq!(again.new, 0, "nothing is taken in twice");
    assert!(matches!(
        pipeline::backfill::stripe(&ctx, "last tuesday").await,
        Err(pipeline::PipelineError::InvalidArgument(_))
    ));
    ctx.db.close().await;

    // The daemon processes them: the current state, triggered by backfill.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let daemon = start_daemon(listener, config.clone(), dir);
    let pool = daemon.reader().await;
    wait_step(&pool, scenario.steps.last().unwrap()).await;
    let id = &scenario.expect.histories[0].id;
    let ts = resources::transitions_of(&pool, id).await.unwrap();
    assert_eq!(ts.len(), 1, "only the current state was there to fetch");
    assert_eq!(ts[0].to_status, "canceled");
    assert_eq!(ts[0].trigger_type, "backfill");
    let progress: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM progress")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        progress,
        scenario.steps.len() as i64,
        "counts at each observation"
    );

    // Replay of a processed delivery: processed again (here, or by the
    // daemon's workers when they take it first), no new transition.
    let ctx = Context::open(config).await.unwrap();
    let key = ts[0].trigger_id.clone().unwrap();
    let replayed = pipeline::replay(&ctx, &key, true).await.unwrap();
    assert_eq!(replayed.previous_state, "processed");
    if replayed.processed_inline {
        assert_eq!(replayed.state, "processed");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (state, attempts): (String, i64) =
            sqlx::query_as("SELECT state, attempts FROM inbox WHERE dedupe_key = ?")
                .bind(&key)
                .fetch_one(&pool)
                .await
                .unwrap();
        if state == "processed" {
            assert_eq!(attempts, 1, "replay starts the count again");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replay never processed: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(resources::transitions_of(&pool, id).await.unwrap().len(), 1);
    assert!(matches!(
        pipeline::replay(&ctx, "evt_nope", true).await,
        Err(pipeline::PipelineError::NoSuchDelivery(_))
    ));
    ctx.db.close().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_api_key_keeps_deliveries_pending() {
    let (sim, daemon) = start_pair_with(|config| {
        config.stripe.api_key = "sk_test_wrong".into();
        config.workers.max_attempts = 1;
    })
    .await;
    let pool = daemon.reader().await;
    let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
    sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let row: Option<(String, i64, Option<String>)> =
            sqlx::query_as("SELECT state, attempts, last_error FROM inbox")
                .fetch_optional(&pool)
                .await
                .unwrap();
        if let Some((state, attempts, Some(error))) = row.filter(|r| r.0 == "pending") {
            assert_eq!(state, "pending", "{error}");
            assert_eq!(attempts, 0, "a refused key does not use up attempts");
            assert!(error.contains("unauthorized"), "{error}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.stop().await;
}

/// A delivery that arrives while a worker is free goes to it in the commit
/// that stores it (no claim of its own), but never while a live lease of
/// another worker (here: another process's) holds its resource; it waits in
/// line for a claim once that lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_deliveries_go_straight_to_free_workers_but_never_past_a_lease() {
    let (sim, daemon) = start_pair().await;
    let pool = daemon.reader().await;
    let writer = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&daemon.db_path)
                .busy_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
    let resource = scenario.steps[0].expect_status[0].0.clone();
    // Another worker holds the resource for an hour.
    let mut tx = writer.begin().await.unwrap();
    assert!(
        store::inbox::insert(&mut tx, &by_hand("held-elsewhere", Some(&resource)))
            .await
            .unwrap()
    );
    sqlx::query(
        "UPDATE inbox SET state = 'processing', attempts = 1,
                lease_until = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+1 hour')
         WHERE dedupe_key = 'held-elsewhere'",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
        .await
        .unwrap();
    let states = || async {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT state, attempts FROM inbox WHERE dedupe_key <> 'held-elsewhere'",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    let stored = states().await;
    assert!(!stored.is_empty(), "the delivery is stored before its 2xx");
    // Ten poll intervals: the delivery is neither handed over nor claimed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = states().await;
    assert!(
        waiting
            .iter()
            .all(|(state, attempts)| state == "pending" && *attempts == 0),
        "processed past the other worker's lease: {waiting:?}"
    );
    assert_eq!(status_of(&pool, &resource).await, None);

    // The lease ends: the delivery is claimed and processed.
    sqlx::query("UPDATE inbox SET state = 'processed' WHERE dedupe_key = 'held-elsewhere'")
        .execute(&writer)
        .await
        .unwrap();
    wait_step(&pool, &scenario.steps[0]).await;
    let handed_before = handed_over(&daemon.url).await;

    // Nothing holds the resource now: the next delivery goes straight to a
    // free worker, in its first attempt.
    sim.play_step(&scenario.steps[1], &DeliveryOptions::default())
        .await
        .unwrap();
    wait_step(&pool, &scenario.steps[1]).await;
    let handed_after = handed_over(&daemon.url).await;
    assert!(
        handed_after > handed_before,
        "no delivery was handed over ({handed_before} then {handed_after})"
    );
    let attempts: Vec<i64> =
        sqlx::query_scalar("SELECT attempts FROM inbox WHERE dedupe_key <> 'held-elsewhere'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(attempts.iter().all(|a| *a == 1), "{attempts:?}");
    writer.close().await;
    daemon.stop().await;
}

/// The daemon's count of deliveries handed to a worker by their own commit.
async fn handed_over(url: &str) -> u64 {
    metric(url, "cancelwatch_inbox_handed_over_total").await
}

/// One series of the daemon's `/metrics` (0 when it is not there yet).
async fn metric(url: &str, series: &str) -> u64 {
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// After `workers.max_attempts` a delivery goes dead with its last error, and
/// the others go on; a resource the provider does not know is dead at once
/// and marked not found.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_deliveries_go_dead_and_the_rest_go_on() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sim = sim_for(Some(url)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), &sim.base_url());
    config.workers.max_attempts = 2;
    config.workers.http_retries = 1;
    let daemon = start_daemon(listener, config, dir);
    wait_ready(&daemon.url).await;
    let pool = daemon.reader().await;

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
    let deadline = tokio::time::Instant::now() + WAIT;
    let (attempts, error) = loop {
        let row: (String, i64, Option<String>) =
            sqlx::query_as("SELECT state, attempts, last_error FROM inbox WHERE dedupe_key = ?")
                .bind(&doomed_key)
                .fetch_one(&pool)
                .await
                .unwrap();
        if row.0 == "dead" {
            break (row.1, row.2);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(attempts, 2);
    assert!(error.unwrap().contains("503"));
    sim.faults().refuse_all(false);

    // An event about an object the provider never had.
    let ghost = "obt_sim_does_not_exist";
    let event = cancelwatch_sim::state::thin_event(
        "v2.money_management.outbound_transfer.updated",
        "v2.money_management.outbound_transfer",
        ghost,
        &cancelwatch_sim::state::outbound_transfer_path(ghost),
    );
    sim.deliver(&cancelwatch_sim::Delivery::stripe(event))
        .await
        .unwrap();

    // The rest goes on.
    let scenario = sim.scenario("batch_job_canceled_clean").unwrap();
    play(&sim, &pool, &scenario, &DeliveryOptions::default()).await;
    let not_found: bool = sqlx::query_scalar("SELECT not_found FROM resources WHERE id = ?")
        .bind(ghost)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(not_found);
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 2);

    let metrics = reqwest::get(format!("{}/metrics", daemon.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
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
    for step in cancelwatch::inbox::ACK_STEPS {
        let bucket =
            format!("cancelwatch_ack_step_seconds_bucket{{step=\"{step}\",le=\"0.0075\"}}");
        assert!(metrics.contains(&bucket), "{bucket} missing from /metrics");
    }
    // How long each use held the writer connection.
    for what in ["acknowledge", "claim", "record"] {
        let count = format!("cancelwatch_writer_hold_seconds_count{{use=\"{what}\"}}");
        assert!(metrics.contains(&count), "{count} missing from /metrics");
    }
    daemon.stop().await;
}

/// Runs reconcile passes until `done` holds (bounded).
async fn reconcile_until(
    ctx: &Context,
    what: &str,
    done: impl Fn(&[String]) -> bool,
    ids: &[&str],
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        pipeline::reconcile::run_once(ctx).await.unwrap();
        let mut statuses = Vec::new();
        for id in ids {
            let refund: Option<String> =
                sqlx::query_scalar("SELECT status FROM refunds WHERE resource_id = ?")
                    .bind(id)
                    .fetch_optional(&ctx.db.read)
                    .await
                    .unwrap();
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM resources WHERE id = ?")
                    .bind(id)
                    .fetch_one(&ctx.db.read)
                    .await
                    .unwrap();
            statuses.push(format!(
                "{}/{}",
                status.unwrap_or_default(),
                refund.unwrap_or_default()
            ));
        }
        if done(&statuses) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The reconciler fetches again what still moves (and items whose refund is
/// pending, through their bulk transfer), backing off on failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_follows_what_no_event_announced() {
    let sim = sim_for(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), &sim.base_url());
    config.reconcile.interval_secs = 1;
    config.reconcile.max_interval_secs = 2;
    let ctx = Context::open(config).await.unwrap();

    // A batch job is seen in progress (taken in by backfill, processed inline
    // by replay), then moves on with no event sent.
    let since = cancelwatch::time::now_str();
    let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
    sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
        .await
        .unwrap();
    assert_eq!(
        pipeline::backfill::stripe(&ctx, &since).await.unwrap().new,
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
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        pipeline::reconcile::run_once(&ctx).await.unwrap();
        let r = resources::find(&ctx.db.read, "stripe.batch_job", &job)
            .await
            .unwrap()
            .unwrap();
        if r.reconcile_failures > 0 {
            assert!(r.next_reconcile_at.unwrap() > cancelwatch::time::now_str());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sim.faults().refuse_all(false);
    reconcile_until(&ctx, "batch job", |s| s[0] == "canceled/", &[&job]).await;
    let ts = resources::transitions_of(&ctx.db.read, &job).await.unwrap();
    let to: Vec<&str> = ts.iter().map(|t| t.to_status.as_str()).collect();
    assert_eq!(to, vec!["in_progress", "canceled"]);
    assert_eq!(ts[1].trigger_type, "reconcile");
    let r = resources::find(&ctx.db.read, "stripe.batch_job", &job)
        .await
        .unwrap()
        .unwrap();
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
        let ts = resources::transitions_of(&ctx.db.read, item).await.unwrap();
        let to: Vec<&str> = ts.iter().map(|t| t.to_status.as_str()).collect();
        assert_eq!(to, vec!["cancelled", "reversed"], "{item}");
        assert_eq!(ts[0].trigger_type, "cancel");
        assert_eq!(ts[1].trigger_type, "reconcile");
    }
    ctx.db.close().await;
}

/// A delivery whose workers keep vanishing (each lease runs out) is given up
/// after `workers.max_attempts`, not retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_delivery_whose_workers_keep_dying_goes_dead() {
    let sim = sim_for(None).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), &sim.base_url());
    config.workers.max_attempts = 2;
    let since = cancelwatch::time::now_str();
    let scenario = sim.scenario("outbound_transfer_returned").unwrap();
    sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
        .await
        .unwrap();
    let ctx = Context::open(config).await.unwrap();
    assert_eq!(
        pipeline::backfill::stripe(&ctx, &since).await.unwrap().new,
        1
    );
    // Two claims whose leases are already over: two workers that died.
    for _ in 0..2 {
        let now = cancelwatch::time::now();
        let gone = cancelwatch::time::fmt(now - chrono::Duration::milliseconds(1));
        let d = store::inbox::claim(&ctx.db.write, &cancelwatch::time::fmt(now), &gone)
            .await
            .unwrap()
            .expect("claimable again once the lease is over");
        assert_eq!(d.state, "processing");
    }
    let lease = pipeline::worker::lease_until(&ctx.config);
    let d = store::inbox::claim(&ctx.db.write, &cancelwatch::time::now_str(), &lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.attempts, 3);
    let key = d.dedupe_key.clone();
    pipeline::worker::process(&ctx, d, &lease).await;
    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM inbox WHERE dedupe_key = ?")
            .bind(&key)
            .fetch_one(&ctx.db.read)
            .await
            .unwrap();
    assert_eq!(state, "dead");
    assert!(error.unwrap().contains("never finished"));
    let id = &scenario.expect.histories[0].id;
    assert!(resources::transitions_of(&ctx.db.read, id)
        .await
        .unwrap()
        .is_empty());
    ctx.db.close().await;
}

/// Event listing follows `next_page_url` to the end, page by page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_events_follows_every_page() {
    let sim = sim_for(None).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), &sim.base_url());
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
    let events = api.list_events(&since, 2).await.unwrap();
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

/// A provider asking for a longer pause than a call waits inline gets it:
/// the delivery is retried no earlier than its `Retry-After`. A rate limit
/// (429) is the provider asking us to slow down, not a fault of the
/// delivery: the wait uses up no attempt, so even a delivery allowed a
/// single attempt comes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_retry_after_is_honoured_between_attempts() {
    let (sim, daemon) = start_pair_with(|config| config.workers.max_attempts = 1).await;
    let pool = daemon.reader().await;
    // Every call of the first attempt is rate limited for 3 s (over the 1 s inline cap).
    sim.faults().rate_limit_next(1, 3);
    let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
    let step = &scenario.steps[0];
    sim.play_step(step, &DeliveryOptions::default())
        .await
        .unwrap();
    let key = step.deliveries[0].event_id().unwrap().to_string();
    let deadline = tokio::time::Instant::now() + WAIT;
    let (received, next): (String, String) = loop {
        let row: (String, String, String, i64, Option<String>) = sqlx::query_as(
            "SELECT state, received_at, next_attempt_at, attempts, last_error
             FROM inbox WHERE dedupe_key = ?",
        )
        .bind(&key)
        .fetch_one(&pool)
        .await
        .unwrap();
        if let Some(error) = row.4.as_deref() {
            assert_eq!(row.0, "pending", "{error}");
            assert_eq!(row.3, 0, "a rate limit does not use up an attempt");
            assert!(error.contains("rate limited"), "{error}");
            break (row.1, row.2);
        }
        assert_ne!(row.0, "processed", "the rate limit was not seen");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never failed: {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let received = cancelwatch::time::parse_lenient(&received).unwrap();
    let next = cancelwatch::time::parse_lenient(&next).unwrap();
    assert!(
        next - received >= chrono::Duration::milliseconds(2_900),
        "retry scheduled {} ms after receipt",
        (next - received).num_milliseconds()
    );
    wait_step(&pool, step).await;
    check(
        &pool,
        "after the pause",
        &Expectation {
            histories: vec![cancelwatch_sim::ExpectedHistory {
                statuses: vec!["processing".into()],
                ..scenario.expect.histories[0].clone()
            }],
            ..Expectation::default()
        },
    )
    .await;
    daemon.stop().await;
}

fn by_hand(key: &str, resource: Option<&str>) -> store::inbox::NewDelivery {
    store::inbox::NewDelivery {
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
        received_at: cancelwatch::time::now_str(),
    }
}

/// Stores deliveries made [`by_hand`], all new.
/// A pipeline context on a fresh database whose provider APIs are a closed
/// port (nothing is fetched); the folder lives as long as the guard.
async fn offline_context() -> (tempfile::TempDir, Context) {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::open(config_for(dir.path(), "http://127.0.0.1:9"))
        .await
        .unwrap();
    (dir, ctx)
}

/// Claims what is ready (at most ten) in a transaction of its own.
async fn claim_up_to_ten(ctx: &Context, lease: &str) -> Vec<store::inbox::Delivery> {
    let mut tx = ctx.db.write.begin().await.unwrap();
    let claimed = store::inbox::claim_batch(&mut tx, &cancelwatch::time::now_str(), lease, 10)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    claimed
}

async fn insert_by_hand(ctx: &Context, deliveries: &[(&str, Option<&str>)]) {
    let mut tx = ctx.db.write.begin().await.unwrap();
    for (key, resource) in deliveries {
        assert!(store::inbox::insert(&mut tx, &by_hand(key, *resource))
            .await
            .unwrap());
    }
    tx.commit().await.unwrap();
}

/// Claims go in arrival order and never hand out two deliveries of one
/// resource at once; a lapsed lease frees the resource again.
#[tokio::test]
async fn claims_keep_one_resource_to_one_worker() {
    let (_dir, ctx) = offline_context().await;
    insert_by_hand(
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
    while let Some(d) = store::inbox::claim(&ctx.db.write, &now_s, &short)
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
    let d = store::inbox::claim(&ctx.db.write, &later, &lease)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((d.dedupe_key.as_str(), d.attempts), ("evt_a1", 2));
    let next = store::inbox::claim(&ctx.db.write, &later, &lease)
        .await
        .unwrap();
    assert!(
        next.as_ref().map_or(true, |n| n.dedupe_key != "evt_a2"),
        "two deliveries of batchv2_a at once"
    );
    ctx.db.close().await;
}

#[tokio::test]
async fn a_batch_claim_takes_one_delivery_per_resource_in_arrival_order() {
    let (_dir, ctx) = offline_context().await;
    insert_by_hand(
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
        let (db, now_s, lease) = (ctx.db.clone(), now_s.clone(), lease.clone());
        async move {
            let mut tx = db.write.begin().await.unwrap();
            let claimed = store::inbox::claim_batch(&mut tx, &now_s, &lease, limit)
                .await
                .unwrap();
            tx.commit().await.unwrap();
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
    ctx.db.close().await;
}

/// Outcomes written together: each delivery ends as its own outcome says,
/// and one whose lease was lost meanwhile is left to its new holder.
#[tokio::test]
async fn a_batch_of_outcomes_is_written_together_and_a_lost_lease_is_left_alone() {
    use cancelwatch::pipeline::worker::{Decided, Outcome};
    let (_dir, ctx) = offline_context().await;
    insert_by_hand(
        &ctx,
        &[
            ("evt_ignore", Some("batchv2_ignore")),
            ("evt_fail", Some("batchv2_fail")),
            ("evt_lost", Some("batchv2_lost")),
            ("evt_released", Some("batchv2_released")),
        ],
    )
    .await;
    let lease = pipeline::worker::lease_until(&ctx.config);
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
    let left = pipeline::worker::write_and_report(&ctx, batch).await;
    assert!(left.is_empty(), "no acknowledgement was waiting");
    let states: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT dedupe_key, state, attempts FROM inbox ORDER BY id")
            .fetch_all(&ctx.db.read)
            .await
            .unwrap();
    assert_eq!(
        states,
        vec![
            ("evt_ignore".into(), "ignored".into(), 1),
            ("evt_fail".into(), "failed".into(), 1),
            ("evt_lost".into(), "processing".into(), 1),
            ("evt_released".into(), "pending".into(), 0),
        ]
    );
    ctx.db.close().await;
}

/// When one outcome's SQL fails inside a batch, the batch is written again
/// with a savepoint per outcome: the others are kept, and the failing one
/// costs only itself (its delivery stays leased, to come back when the
/// lease runs out). A trigger stands in for the failure.
#[tokio::test]
async fn one_failing_outcome_in_a_batch_costs_only_itself() {
    let (_dir, ctx) = offline_context().await;
    sqlx::query(
        "CREATE TRIGGER refuse_bad BEFORE INSERT ON transitions
         WHEN NEW.resource_id = 'batchv2_bad'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(&ctx.db.write)
    .await
    .unwrap();
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
    ctx.db.close().await;
}

/// Observations recorded together: one whose lease was lost meanwhile
/// (another worker holds the delivery now) records nothing and leaves the
/// delivery to its holder; the others are recorded and end `processed`.
#[tokio::test]
async fn an_observation_whose_lease_was_lost_records_nothing() {
    let (_dir, ctx) = offline_context().await;
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
    ctx.db.close().await;
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
    use cancelwatch::pipeline::worker::{Decided, Outcome};
    let keys: Vec<(String, String)> = names
        .iter()
        .map(|n| (format!("evt_{n}"), format!("batchv2_{n}")))
        .collect();
    let by_name: Vec<(&str, Option<&str>)> = keys
        .iter()
        .map(|(event, resource)| (event.as_str(), Some(resource.as_str())))
        .collect();
    insert_by_hand(ctx, &by_name).await;
    let lease = pipeline::worker::lease_until(&ctx.config);
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
    let left = pipeline::worker::write_and_report(ctx, batch).await;
    assert!(left.is_empty());
    let states = sqlx::query_as("SELECT dedupe_key, state FROM inbox ORDER BY id")
        .fetch_all(&ctx.db.read)
        .await
        .unwrap();
    let recorded = sqlx::query_scalar("SELECT resource_id FROM transitions ORDER BY id")
        .fetch_all(&ctx.db.read)
        .await
        .unwrap();
    (states, recorded)
}

fn observation(
    kind: &str,
    id: &str,
    status: &str,
    children: Vec<cancelwatch::providers::Observation>,
) -> cancelwatch::providers::Observation {
    use cancelwatch::providers::{classify, Observation};
    let provider = if kind.starts_with("juice.") {
        "juice"
    } else {
        "stripe"
    };
    Observation {
        provider,
        kind: kind.into(),
        id: id.into(),
        parent_id: None,
        status: status.into(),
        class: classify(kind, status, &[]),
        provider_at: None,
        amount: Some(100),
        currency: Some("usd".into()),
        livemode: Some(false),
        snapshot: serde_json::json!({"id": id, "status": status}).to_string(),
        progress: None,
        children,
        refund: None,
    }
}

/// Records the observations in one call of `record_all` and commits; the
/// n-th is triggered by the event `{prefix}_{n}`.
async fn record_together(
    ctx: &Context,
    observations: &[cancelwatch::providers::Observation],
    prefix: &str,
) -> Vec<pipeline::record::Recorded> {
    use pipeline::record::{self, ToRecord, Trigger};
    let triggers: Vec<Trigger> = (0..observations.len())
        .map(|n| Trigger::event(format!("{prefix}_{n}")))
        .collect();
    let items: Vec<ToRecord> = observations
        .iter()
        .zip(&triggers)
        .map(|(obs, trigger)| ToRecord {
            obs,
            trigger,
            context: None,
        })
        .collect();
    let mut tx = ctx.db.write.begin().await.unwrap();
    let now = cancelwatch::time::now();
    let recorded = record::record_all(&mut tx, &ctx.config, &items, now, &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    recorded
}

/// Many observations recorded together: each resource's transitions are
/// those it would get one observation at a time, also when two observations
/// of one resource share a call (they are recorded in turn), and a stale
/// one moves nothing.
#[tokio::test]
async fn observations_recorded_together_match_one_at_a_time() {
    use pipeline::record::{self, ToRecord, Trigger};
    let (_dir, ctx) = offline_context().await;
    let obt = "stripe.outbound_transfer";
    let mut item = observation("juice.transfer", "it_1", "cancelled", vec![]);
    item.parent_id = Some("bulk_1".into());
    let observations = [
        observation(obt, "obt_a", "processing", vec![]),
        observation(obt, "obt_b", "processing", vec![]),
        // obt_a again, later: recorded after the first, in the same call.
        observation(obt, "obt_a", "canceled", vec![]),
        observation("juice.bulk_transfer", "bulk_1", "cancelled", vec![item]),
    ];
    let recorded = record_together(&ctx, &observations, "evt").await;
    let counts: Vec<(usize, bool, usize)> = recorded
        .iter()
        .map(|r| (r.transitions.len(), r.stale, r.rids.len()))
        .collect();
    assert_eq!(
        counts,
        vec![(1, false, 1), (1, false, 1), (1, false, 1), (2, false, 2)]
    );
    let history = |id: &'static str| {
        let pool = ctx.db.read.clone();
        async move {
            resources::transitions_of(&pool, id)
                .await
                .unwrap()
                .into_iter()
                .map(|t| (t.from_status, t.to_status, t.trigger_id))
                .collect::<Vec<_>>()
        }
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        history("obt_a").await,
        vec![
            (None, "processing".into(), some("evt_0")),
            (some("processing"), "canceled".into(), some("evt_2")),
        ]
    );
    assert_eq!(
        history("it_1").await,
        vec![(None, "cancelled".into(), some("evt_3"))]
    );
    let item_row = resources::find(&ctx.db.read, "juice.transfer", "it_1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(item_row.parent_id.as_deref(), Some("bulk_1"));

    // A late `processing` of obt_a is stale: canceled is final.
    let late = observation(obt, "obt_a", "processing", vec![]);
    let trigger = Trigger::event("evt_late");
    let mut tx = ctx.db.write.begin().await.unwrap();
    let recorded = record::record_all(
        &mut tx,
        &ctx.config,
        &[ToRecord {
            obs: &late,
            trigger: &trigger,
            context: None,
        }],
        cancelwatch::time::now(),
        &mut Vec::new(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    assert!(recorded[0].stale);
    assert!(recorded[0].transitions.is_empty());
    assert_eq!(history("obt_a").await.len(), 2);
    let row = resources::find(&ctx.db.read, obt, "obt_a")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status.as_deref(), Some("canceled"));
    ctx.db.close().await;
}

/// Refunds and progress of many observations are written together: each
/// resource gets the refund and progress rows it would get on its own,
/// opened in one call and settled in the next.
#[tokio::test]
async fn refunds_and_progress_recorded_together() {
    use cancelwatch::providers::{Progress, RefundSignal, RefundStatus};
    let (_dir, ctx) = offline_context().await;
    let obt = "stripe.outbound_transfer";
    let with_refund = |id: &str, status: &str, refund: RefundStatus| {
        let mut obs = observation(obt, id, status, vec![]);
        obs.refund = Some(RefundSignal {
            status: refund,
            reason: status.into(),
            amount: Some(100),
            currency: Some("usd".into()),
        });
        obs
    };
    let with_progress = |id: &str, status: &str, success: i64| {
        let mut obs = observation("stripe.batch_job", id, status, vec![]);
        obs.progress = Some(Progress {
            success: Some(success),
            failure: Some(0),
            validated: None,
        });
        obs
    };
    record_together(
        &ctx,
        &[
            with_refund("obt_p", "canceled", RefundStatus::Pending),
            with_refund("obt_q", "canceled", RefundStatus::Pending),
            with_refund("obt_r", "returned", RefundStatus::Completed),
            with_progress("batchv2_1", "cancelling", 3),
            with_progress("batchv2_2", "processing", 5),
        ],
        "evt_1",
    )
    .await;
    record_together(
        &ctx,
        &[
            with_refund("obt_p", "canceled", RefundStatus::Completed),
            with_refund("obt_q", "canceled", RefundStatus::Failed),
            with_progress("batchv2_1", "canceled", 4),
        ],
        "evt_2",
    )
    .await;
    let refunds: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT resource_id, status, trigger_id, CASE WHEN completed_at IS NULL THEN NULL ELSE 'set' END
         FROM refunds ORDER BY resource_id",
    )
    .fetch_all(&ctx.db.read)
    .await
    .unwrap();
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        refunds,
        vec![
            (
                "obt_p".into(),
                "completed".into(),
                some("evt_2_0"),
                some("set")
            ),
            ("obt_q".into(), "failed".into(), some("evt_2_1"), None),
            (
                "obt_r".into(),
                "completed".into(),
                some("evt_1_2"),
                some("set")
            ),
        ]
    );
    let progress: Vec<(String, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT r.id, p.status, p.success_count, p.trigger_id
         FROM progress p JOIN resources r ON r.rid = p.rid ORDER BY p.id",
    )
    .fetch_all(&ctx.db.read)
    .await
    .unwrap();
    assert_eq!(
        progress,
        vec![
            (
                "batchv2_1".into(),
                "cancelling".into(),
                Some(3),
                "evt_1_3".into()
            ),
            (
                "batchv2_2".into(),
                "processing".into(),
                Some(5),
                "evt_1_4".into()
            ),
            (
                "batchv2_1".into(),
                "canceled".into(),
                Some(4),
                "evt_2_2".into()
            ),
        ]
    );
    ctx.db.close().await;
}

/// A command run beside the daemon (its own writer connection) writes while
/// the daemon's claim has read but not yet written: the claim must wait its
/// turn, not fail with SQLITE_BUSY_SNAPSHOT.
#[tokio::test]
async fn a_claim_and_a_command_beside_the_daemon_take_turns() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_for(dir.path(), "http://127.0.0.1:9");
    let daemon = Context::open(config.clone()).await.unwrap();
    insert_by_hand(
        &daemon,
        &[("evt_x", Some("batchv2_x")), ("evt_y", Some("batchv2_y"))],
    )
    .await;
    let command = Context::open(config).await.unwrap();

    let mut tx = daemon.db.begin().await.unwrap();
    let (waiting,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM inbox")
        .fetch_one(&mut **tx)
        .await
        .unwrap();
    assert_eq!(waiting, 2);
    let write = tokio::spawn(async move {
        sqlx::query("UPDATE inbox SET last_error = 'noted by a command' WHERE dedupe_key = 'evt_y'")
            .execute(&command.db.write)
            .await
    });
    // Give the command the chance to write now (it may not: the daemon's
    // transaction holds the write lock, and then it waits for the commit).
    let _ = tokio::time::timeout(Duration::from_millis(300), async {
        while !write.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let lease = pipeline::worker::lease_until(&daemon.config);
    let claimed = store::inbox::claim_batch(&mut tx, &cancelwatch::time::now_str(), &lease, 10)
        .await
        .expect("the claim is not refused for a write beside it");
    tx.commit().await.unwrap();
    assert_eq!(claimed.len(), 2);
    write
        .await
        .unwrap()
        .expect("the command's write went through after the claim");
    daemon.db.close().await;
}

/// New deliveries beyond the free slots are leased by the commit that
/// stores them and queued for the feeder's next free slot, as far as its
/// queue (twice the slots) has room; every one of them is decided, none is
/// left leased until its lease runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_beyond_the_free_slots_wait_in_the_feeders_queue() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_for(dir.path(), "http://127.0.0.1:9");
    config.workers.concurrency = 1;
    config.workers.lease_secs = 60;
    // The feeder claims only when woken: nothing here wakes it.
    config.workers.poll_interval_ms = 60_000;
    let ctx = std::sync::Arc::new(Context::open(config).await.unwrap());
    let mut tasks = tokio::task::JoinSet::new();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let handoff = pipeline::worker::spawn(
        ctx.clone(),
        &mut tasks,
        shutdown.clone(),
        std::sync::Arc::default(),
    );
    // Let the feeder's first claim (of an empty inbox) pass.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // One slot and a queue of two: of five wanted, three are reserved, and
    // then nothing is free.
    let reserved = handoff.reserve(5);
    assert_eq!(reserved.len(), 3);
    assert_eq!(handoff.reserve(5).len(), 0);

    let keys = ["q-1", "q-2", "q-3"];
    insert_by_hand(
        &ctx,
        &keys.map(|k| (k, Some(k))), // one resource each
    )
    .await;
    let mut leased = Vec::new();
    for key in keys {
        sqlx::query(
            "UPDATE inbox SET state = 'processing', attempts = 1, lease_until = ?
             WHERE dedupe_key = ?",
        )
        .bind(&reserved.lease_until)
        .bind(key)
        .execute(&ctx.db.write)
        .await
        .unwrap();
        leased.push(
            store::inbox::by_key(&ctx.db.read, key)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    handoff.start(leased, reserved);

    // Each is decided (the provider's port is closed: each attempt fails
    // and waits for a retry), well before a lease could run out.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let still_leased: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = 'processing'")
                .fetch_one(&ctx.db.read)
                .await
                .unwrap();
        if still_leased == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{still_leased} handed-over deliveries were never decided"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
}
