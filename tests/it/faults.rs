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
    dedupe_key, final_states, post_delivery, simulator, Delivery, Simulator,
};
use crate::support::{wait_until, TestApp, TestConfig};

/// A daemon fetching from `sim`, retrying quickly and long.
fn config(sim: &Simulator) -> TestConfig {
    TestConfig::new().provider_apis(&sim.base_url()).with(|c| {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_doubles_nothing() {
    let sim = simulator(None).await;
    let (_scenarios, deliveries) = final_states(&sim, 6);

    // Reference: one undisturbed run.
    let mut calm = BinaryDaemon::start(&config(&sim)).await;
    send_all(&calm.url, &deliveries, 8, Duration::ZERO).await;
    wait_drained(calm.db()).await;
    let expected = recorded(calm.db()).await;
    assert!(calm.terminate().await.is_some_and(|s| s.success()));

    // The same deliveries while the daemon is killed three times.
    let config = config(&sim).on_a_fixed_port();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_delays_but_loses_nothing() {
    let sim = simulator(None).await;
    let (scenarios, deliveries) = final_states(&sim, 1);
    let app = TestApp::start(TestConfig::new().provider_apis(&sim.base_url()).with(|c| {
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
    for s in &scenarios {
        for h in &s.expect.histories {
            let status = db::resource(app.db(), &h.kind, &h.id)
                .await
                .and_then(|r| r.status);
            assert_eq!(status.as_ref(), h.statuses.last(), "{} {}", s.name, h.id);
        }
    }
    app.stop().await;
}
