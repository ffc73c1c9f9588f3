//! Proof under faults: the real binary killed with SIGKILL at random moments
//! under load, and a provider outage. Nothing acknowledged is lost, nothing is
//! processed twice, and the history equals the one of an undisturbed run.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;

use crate::support::binary::BinaryDaemon;
use crate::support::db::{self, Database, HistoryRow};
use crate::support::sim::{
    dedupe_key, final_states, post_delivery, simulator, Delivery, Scenario, Simulator,
};
use crate::support::{both_engines, wait_until, Engine, TestApp, TestConfig};

/// A daemon fetching from `sim`, retrying quickly and long.
async fn config(engine: Engine, sim: &Simulator) -> TestConfig {
    TestConfig::on(engine)
        .await
        .provider_apis(&sim.base_url())
        .with(|c| {
            c.workers.poll_interval_ms = 50;
            c.workers.lease_secs = 2;
            c.workers.backoff_base_ms = 50;
            c.workers.backoff_max_secs = 1;
            c.workers.max_attempts = 50;
            c.reconcile.interval_secs = 3_600;
            // The simulator does not limit its callers (Juice does: 2 a second).
            c.juice.rate_limit_per_second = 0.0;
        })
}

/// Every resource of `scenarios` is at its final status.
async fn assert_final_states(db: &impl Database, scenarios: &[Scenario]) {
    for s in scenarios {
        for h in &s.expect.histories {
            let status = db::resource(db, &h.kind, &h.id)
                .await
                .and_then(|r| r.status);
            assert_eq!(status.as_ref(), h.statuses.last(), "{} {}", s.name, h.id);
        }
    }
}

/// Waits (up to 60 s) until no delivery is waiting or being processed.
async fn wait_drained(db: &impl Database) {
    wait_until("the inbox is drained", Duration::from_secs(60), || async {
        db::unfinished_deliveries(db).await == 0
    })
    .await;
}

/// A refund without its times and trigger: resource id, status, amount,
/// currency.
type RefundRow = (String, String, Option<i64>, Option<String>);

/// What a run recorded, without times and trigger ids (which differ
/// between runs): the transitions as a set and in order, the refunds.
async fn recorded(
    db: &impl Database,
) -> (BTreeSet<HistoryRow>, Vec<HistoryRow>, BTreeSet<RefundRow>) {
    let rows = db::history_rows(db).await;
    let refunds = db::refunds(db)
        .await
        .into_iter()
        .map(|r| (r.resource_id, r.status, r.amount, r.currency));
    (rows.iter().cloned().collect(), rows, refunds.collect())
}

/// Sends every delivery until it is acknowledged, retrying like a provider
/// (bounded: 60 s per delivery); returns the keys acknowledged.
async fn send_all(
    url: &str,
    deliveries: &[Delivery],
    workers: usize,
    pace: Duration,
) -> Vec<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let queue = Arc::new(Mutex::new(deliveries.to_vec()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let queue = queue.clone();
        let client = client.clone();
        let url = url.to_string();
        tasks.spawn(async move {
            let mut acked = Vec::new();
            loop {
                let Some(d) = queue.lock().unwrap().pop() else {
                    return acked;
                };
                let mut ok = false;
                for _ in 0..1200 {
                    if post_delivery(&client, &url, &d).await {
                        ok = true;
                        break;
                    }
                    // A provider's pause before it sends again.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                assert!(ok, "a delivery was never acknowledged");
                acked.push(dedupe_key(&d));
                // The load's pace, part of the scenario.
                tokio::time::sleep(pace).await;
            }
        });
    }
    let mut acked = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acked.extend(r.unwrap());
    }
    acked
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing(engine) {
        let sim = simulator(None).await;
        let (_scenarios, deliveries) = final_states(&sim, 6);

        // Reference: one undisturbed run.
        let mut calm = BinaryDaemon::start(&config(engine, &sim).await).await;
        send_all(&calm.url, &deliveries, 8, Duration::ZERO).await;
        wait_drained(calm.db()).await;
        let expected = recorded(calm.db()).await;
        assert!(calm.terminate().await.is_some_and(|s| s.success()));

        // The same deliveries while the daemon is killed three times.
        let config = config(engine, &sim).await.on_a_fixed_port();
        let first = BinaryDaemon::start(&config).await;
        let url = first.url.clone();
        let daemon = Arc::new(tokio::sync::Mutex::new(first));
        let sending = Arc::new(AtomicBool::new(true));
        let killer = {
            let daemon = daemon.clone();
            let config = config.clone();
            let sending = sending.clone();
            tokio::spawn(async move {
                let mut while_sending = 0;
                for _ in 0..3 {
                    // A random moment: the scenario of this test.
                    let pause = rand::thread_rng().gen_range(100..500);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    let mut d = daemon.lock().await;
                    d.kill();
                    if sending.load(Ordering::SeqCst) {
                        while_sending += 1;
                    }
                    *d = BinaryDaemon::start(&config).await;
                }
                while_sending
            })
        };
        // Paced so that the load spans the kills (about 2 s of sending).
        let acked = send_all(&url, &deliveries, 4, Duration::from_millis(15)).await;
        sending.store(false, Ordering::SeqCst);
        let kills_while_sending = killer.await.unwrap();
        assert!(
            kills_while_sending >= 1,
            "no kill landed while deliveries were being sent"
        );
        eprintln!(
            "crash test: {} deliveries acknowledged, {kills_while_sending} of 3 SIGKILLs while sending",
            acked.len()
        );
        let mut d = daemon.lock().await;
        wait_drained(d.db()).await;

        // Every acknowledged delivery is there, once, processed.
        let stored = db::deliveries(d.db()).await;
        let keys: BTreeSet<&str> = stored.iter().map(|r| r.dedupe_key.as_str()).collect();
        for key in &acked {
            assert!(
                keys.contains(key.as_str()),
                "{key} was acknowledged but is not in the inbox"
            );
        }
        let not_processed = stored
            .iter()
            .filter(|r| r.state != "processed" && r.state != "ignored")
            .count();
        assert_eq!(not_processed, 0);

        // The history equals the undisturbed one, with no transition doubled.
        let got = recorded(d.db()).await;
        assert_eq!(got.1.len(), got.0.len(), "a transition was recorded twice");
        assert_eq!(
            got.0, expected.0,
            "transitions differ from the undisturbed run"
        );
        assert_eq!(got.2, expected.2, "refunds differ from the undisturbed run");
        assert!(!got.0.is_empty());
        assert!(
            d.terminate().await.is_some_and(|s| s.success()),
            "{}",
            d.log_text()
        );
    }
}

both_engines! {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provider_outage_delays_but_loses_nothing(engine) {
        let sim = simulator(None).await;
        let (scenarios, deliveries) = final_states(&sim, 1);
        let app = TestApp::start(TestConfig::on(engine).await.provider_apis(&sim.base_url()).with(|c| {
            c.workers.poll_interval_ms = 50;
            c.workers.http_retries = 1;
            c.workers.fetch_timeout_secs = 1;
            c.workers.backoff_base_ms = 100;
            c.workers.backoff_max_secs = 1;
            c.workers.max_attempts = 40; // a retry window well past the outage
            c.reconcile.interval_secs = 3_600;
        }))
        .await;

        // The provider is down: every API call answers 503.
        sim.faults().refuse_all(true);
        let acked = send_all(&app.url, &deliveries, 4, Duration::ZERO).await;
        assert_eq!(
            acked.len(),
            deliveries.len(),
            "deliveries keep being accepted"
        );
        // Every delivery to fetch has been attempted and failed at least once:
        // the work that would have processed it (or given it up) has run.
        wait_until(
            "every delivery is attempted during the outage",
            Duration::from_secs(30),
            || async {
                db::deliveries(app.db())
                    .await
                    .iter()
                    .all(|d| d.last_error.is_some() || d.state == "ignored")
            },
        )
        .await;
        let states = db::deliveries(app.db()).await;
        let count = |state: &str| states.iter().filter(|d| d.state == state).count();
        assert_eq!(
            (count("processed"), count("dead")),
            (0, 0),
            "nothing is processed or dead during the outage"
        );

        // Back up: everything catches up to the provider's final state.
        sim.faults().refuse_all(false);
        wait_drained(app.db()).await;
        let dead = db::deliveries(app.db())
            .await
            .iter()
            .filter(|d| d.state == "dead")
            .count();
        assert_eq!(dead, 0);
        assert_final_states(app.db(), &scenarios).await;
        app.stop().await;
    }
}

/// A full disk stops processing only while it lasts: the writes that fail
/// leave the writer usable, `/readyz` answers 503 (naming the full disk)
/// while writes fail, and once there is room again every acknowledged
/// delivery is processed and `/readyz` answers 200, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_resumes_on_its_own_after_the_disk_was_full() {
    let sim = simulator(None).await;
    let (scenarios, deliveries) = final_states(&sim, 1);
    let config = config(Engine::Sqlite, &sim).await;
    let store = config.open_store().await;
    let app = TestApp::start_on(config, store.clone()).await;

    // Acknowledged while the provider is down, so they wait for processing.
    sim.faults().refuse_all(true);
    let acked = send_all(&app.url, &deliveries, 4, Duration::ZERO).await;
    assert_eq!(acked.len(), deliveries.len());
    let pending = db::unfinished_deliveries(app.db()).await;
    assert!(pending > 0);

    db::fill_the_disk(&store).await;
    sim.faults().refuse_all(false);
    wait_until(
        "/readyz says the disk is full",
        Duration::from_secs(30),
        || async {
            let (status, body) = app.get("/readyz", None).await;
            status == 503 && body["reason"].as_str().is_some_and(|r| r.contains("full"))
        },
    )
    .await;
    assert!(db::unfinished_deliveries(app.db()).await > 0);

    db::free_the_disk(&store).await;
    wait_drained(app.db()).await;
    wait_until("/readyz answers 200", Duration::from_secs(10), || async {
        app.get("/readyz", None).await.0 == 200
    })
    .await;
    assert_eq!(db::count_in_state(app.db(), "dead").await, 0);
    assert_final_states(app.db(), &scenarios).await;
    app.stop().await;
}

/// Eight deliveries about objects whose every API call hangs, with four
/// worker slots: the hung calls hold at most their provider's slow lane (a
/// quarter of the slots) past `workers.slow_call_secs`, so healthy
/// deliveries sent after them are processed while they still hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_provider_calls_leave_slots_for_healthy_deliveries() {
    let sim = simulator(None).await;
    let (scenarios, healthy) = final_states(&sim, 1);
    let app = TestApp::start(config(Engine::Sqlite, &sim).await.with(|c| {
        c.workers.concurrency = 4;
        c.workers.slow_call_secs = 1;
        c.workers.fetch_timeout_secs = 60;
        c.workers.lease_secs = 120;
        c.workers.http_retries = 1;
    }))
    .await;
    let hung: Vec<Delivery> = (0..8)
        .map(|i| {
            let id = format!("obt_hangs_{i}");
            sim.faults()
                .hang_paths_containing(&id, Duration::from_secs(600));
            crate::support::sim::unknown_outbound_transfer(&id)
        })
        .collect();
    send_all(&app.url, &hung, 4, Duration::ZERO).await;
    wait_until(
        "the hung calls reach the provider",
        Duration::from_secs(10),
        || async {
            let requests = sim.requests();
            requests
                .iter()
                .filter(|r| r.path.contains("obt_hangs_"))
                .count()
                >= 4
        },
    )
    .await;

    send_all(&app.url, &healthy, 4, Duration::ZERO).await;
    let keys: Vec<String> = healthy.iter().map(dedupe_key).collect();
    // Well within the 60 s one hung call could hold its slot.
    wait_until(
        "every healthy delivery is processed while the others hang",
        Duration::from_secs(30),
        || async {
            for key in &keys {
                let state = db::delivery(app.db(), key).await.map(|d| d.state);
                if !matches!(state.as_deref(), Some("processed" | "ignored")) {
                    return false;
                }
            }
            true
        },
    )
    .await;
    assert_final_states(app.db(), &scenarios).await;
    for d in &hung {
        let state = db::delivery(app.db(), &dedupe_key(d)).await.unwrap().state;
        assert_ne!(state, "processed");
    }
    sim.faults().clear();
    app.stop().await;
}

/// A call whose tries keep timing out ends within its delivery's lease,
/// with the real error: the delivery goes `dead` after its attempts saying
/// it timed out, not "attempts whose worker never finished".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_keeps_timing_out_ends_within_its_lease_with_the_real_error() {
    let sim = simulator(None).await;
    let app = TestApp::start(config(Engine::Sqlite, &sim).await.with(|c| {
        c.workers.lease_secs = 4;
        c.workers.fetch_timeout_secs = 1;
        c.workers.http_retries = 10;
        c.workers.max_attempts = 2;
        c.workers.slow_call_secs = 60;
    }))
    .await;
    sim.faults()
        .hang_paths_containing("obt_times_out", Duration::from_secs(600));
    let d = crate::support::sim::unknown_outbound_transfer("obt_times_out");
    send_all(&app.url, std::slice::from_ref(&d), 1, Duration::ZERO).await;
    let key = dedupe_key(&d);
    wait_until("the delivery is dead", Duration::from_secs(60), || async {
        db::delivery(app.db(), &key)
            .await
            .is_some_and(|d| d.state == "dead")
    })
    .await;
    let dead = db::delivery(app.db(), &key).await.unwrap();
    let error = dead.last_error.unwrap_or_default();
    assert!(error.contains("timeout"), "{error}");
    assert!(!error.contains("never finished"), "{error}");
    sim.faults().clear();
    app.stop().await;
}

/// A provider answer longer than `<provider>.max_response_bytes` fails its
/// attempt with an error naming the key; the other provider's deliveries
/// go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_the_size_cap_fails_its_attempt() {
    let sim = simulator(None).await;
    let (_scenarios, deliveries) = final_states(&sim, 1);
    let app = TestApp::start(config(Engine::Sqlite, &sim).await.with(|c| {
        c.juice.max_response_bytes = 1_024;
        c.workers.max_attempts = 1;
    }))
    .await;
    send_all(&app.url, &deliveries, 4, Duration::ZERO).await;
    wait_drained(app.db()).await;
    let all = db::deliveries(app.db()).await;
    let (juice, stripe): (Vec<_>, Vec<_>) = all.iter().partition(|d| d.provider == "juice");
    let refused: Vec<_> = juice
        .iter()
        .filter(|d| d.state == "dead")
        .filter_map(|d| d.last_error.as_deref())
        .collect();
    assert!(!refused.is_empty(), "no Juice answer was over the cap");
    for error in &refused {
        assert!(error.contains("juice.max_response_bytes"), "{error}");
    }
    assert!(stripe.iter().all(|d| d.state != "dead"));
    app.stop().await;
}

/// A delivery whose id can never form a valid API path goes `dead` at its
/// first attempt, nothing sent, not `failed` over and over until its
/// attempts run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_id_forms_no_valid_path_is_dead_at_once() {
    let sim = simulator(None).await;
    let app = TestApp::start(config(Engine::Sqlite, &sim).await).await;
    let d = crate::support::sim::unknown_outbound_transfer("obt_bad%2e1");
    send_all(&app.url, std::slice::from_ref(&d), 1, Duration::ZERO).await;
    let key = dedupe_key(&d);
    wait_until("the delivery is dead", Duration::from_secs(20), || async {
        db::delivery(app.db(), &key)
            .await
            .is_some_and(|d| d.state == "dead")
    })
    .await;
    let dead = db::delivery(app.db(), &key).await.unwrap();
    assert_eq!(dead.attempts, 1);
    let error = dead.last_error.unwrap_or_default();
    assert!(error.contains("forms no valid API path"), "{error}");
    assert!(sim.requests().iter().all(|r| !r.path.contains("obt_bad")));
    app.stop().await;
}

/// A daemon killed while its workers wait on a provider that hangs: the
/// daemon started again sees that the holder of those leases is gone and
/// processes the deliveries at once, not when the 60 s leases run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_daemons_leases_are_taken_up_when_it_starts_again() {
    let sim = simulator(None).await;
    let (_, deliveries) = final_states(&sim, 1);
    let deliveries: Vec<Delivery> = deliveries.into_iter().take(4).collect();
    sim.faults().hang_next(1_000, Duration::from_secs(120));
    let config = config(Engine::Sqlite, &sim)
        .await
        .on_a_fixed_port()
        .with(|c| {
            c.workers.lease_secs = 60;
            c.workers.fetch_timeout_secs = 120;
        });
    let mut first = BinaryDaemon::start(&config).await;
    send_all(&first.url, &deliveries, 4, Duration::ZERO).await;
    wait_until(
        "the deliveries are leased",
        Duration::from_secs(20),
        || async { db::count_in_state(first.db(), "processing").await > 0 },
    )
    .await;
    first.kill();
    sim.faults().clear();

    let started = std::time::Instant::now();
    let second = BinaryDaemon::start(&config).await;
    wait_until(
        "the killed daemon's deliveries are processed",
        Duration::from_secs(15),
        || async { db::unfinished_deliveries(second.db()).await == 0 },
    )
    .await;
    eprintln!(
        "leases of the killed daemon taken up {:?} after the restart began",
        started.elapsed()
    );
    assert!(second
        .log_text()
        .contains("leases of a process that is gone taken up at once"));
}
