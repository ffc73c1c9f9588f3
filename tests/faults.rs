//! Proof under faults: the real binary killed with SIGKILL at random moments
//! under load, and a provider outage. Nothing acknowledged is lost, nothing is
//! processed twice, and the history equals the one of an undisturbed run.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cancelwatch::providers::{juice, stripe};
use cancelwatch::Config;
use cancelwatch_sim::{Delivery, Provider, Scenario, SimConfig, Simulator};
use rand::Rng;
use sqlx::SqlitePool;

mod support;
use support::{free_port, BinaryDaemon};

const STRIPE_KEY: &str = "sk_test_faults";
const JUICE_KEY: &str = "juice_key_faults";
const WEBHOOK_SECRET: &str = "whsec_faults_test";
const BUSINESS_ID: &str = "faults-business-id";

async fn simulator() -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(
        listener,
        SimConfig {
            stripe_api_key: STRIPE_KEY.into(),
            juice_api_key: JUICE_KEY.into(),
            stripe_webhook_secret: WEBHOOK_SECRET.into(),
            juice_checksum_key: BUSINESS_ID.into(),
            // Deliveries are sent by the tests themselves, to know which got a 2xx.
            target: None,
        },
    )
    .await
    .unwrap()
}

/// `copies` instances of every scenario, moved to their final state in the
/// simulator without sending anything; their deliveries, to be sent by the test.
fn final_states(sim: &Simulator, copies: usize) -> (Vec<Scenario>, Vec<Delivery>) {
    let mut scenarios = Vec::new();
    let mut deliveries = Vec::new();
    for _ in 0..copies {
        for name in Simulator::scenario_names() {
            let s = sim.scenario(name).unwrap();
            for step in &s.steps {
                sim.apply_step(step);
                deliveries.extend(step.deliveries.iter().cloned());
            }
            scenarios.push(s);
        }
    }
    (scenarios, deliveries)
}

/// The inbox dedupe key of a delivery.
fn dedupe_key(d: &Delivery) -> String {
    match d.provider {
        Provider::Stripe => d.event_id().unwrap().to_string(),
        Provider::Juice => format!(
            "{}:{}",
            d.event_type(),
            d.body["checksum"].as_str().unwrap().to_lowercase()
        ),
    }
}

/// Posts one delivery, signed now; true on a 2xx.
async fn post(client: &reqwest::Client, url: &str, d: &Delivery) -> bool {
    let body = serde_json::to_vec(&d.body).unwrap();
    let mut req = client.post(format!("{url}/webhooks/{}", d.provider.name()));
    if d.provider == Provider::Stripe {
        let t = chrono::Utc::now().timestamp();
        req = req.header(
            "Stripe-Signature",
            stripe::signature::sign_header(WEBHOOK_SECRET, t, &body),
        );
    } else {
        assert!(juice::checksum::verify(
            d.body["checksum"].as_str().unwrap(),
            d.event_type(),
            &d.body["data"],
            &[BUSINESS_ID.to_string()]
        ));
    }
    matches!(req.body(body).send().await, Ok(r) if r.status().is_success())
}

fn daemon_env(api_base: &str) -> Vec<(&'static str, String)> {
    vec![
        ("CANCELWATCH_STRIPE__API_BASE", api_base.to_string()),
        ("CANCELWATCH_JUICE__API_BASE", api_base.to_string()),
        ("CANCELWATCH_STRIPE__API_KEY", STRIPE_KEY.to_string()),
        ("CANCELWATCH_JUICE__API_KEY", JUICE_KEY.to_string()),
        (
            "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
            format!("[\"{WEBHOOK_SECRET}\"]"),
        ),
        (
            "CANCELWATCH_JUICE__CHECKSUM_KEYS",
            format!("[\"{BUSINESS_ID}\"]"),
        ),
        ("CANCELWATCH_WORKERS__POLL_INTERVAL_MS", "50".into()),
        ("CANCELWATCH_WORKERS__LEASE_SECS", "2".into()),
        ("CANCELWATCH_WORKERS__BACKOFF_BASE_MS", "50".into()),
        ("CANCELWATCH_WORKERS__BACKOFF_MAX_SECS", "1".into()),
        ("CANCELWATCH_WORKERS__MAX_ATTEMPTS", "50".into()),
        ("CANCELWATCH_RECONCILE__INTERVAL_SECS", "3600".into()),
        // The simulator does not limit its callers (Juice does: 2 a second).
        ("CANCELWATCH_JUICE__RATE_LIMIT_PER_SECOND", "0".into()),
    ]
}

async fn reader(dir: &Path) -> SqlitePool {
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.join("cw.db"))
                .read_only(true),
        )
        .await
        .unwrap()
}

/// Waits (up to 60 s) until no delivery is waiting or being processed.
async fn wait_drained(pool: &SqlitePool) {
    for _ in 0..600 {
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if open == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the inbox never drained");
}

type HistoryRow = (String, String, Option<String>, Option<String>, String);
type RefundRow = (String, String, Option<i64>, Option<String>);

/// What a run recorded, without times and trigger ids (which differ between runs).
async fn recorded(
    pool: &SqlitePool,
) -> (BTreeSet<HistoryRow>, Vec<HistoryRow>, BTreeSet<RefundRow>) {
    let rows: Vec<HistoryRow> = sqlx::query_as(
        "SELECT kind, resource_id, parent_id, from_status, to_status FROM transitions ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let refunds: Vec<RefundRow> =
        sqlx::query_as("SELECT resource_id, status, amount, currency FROM refunds")
            .fetch_all(pool)
            .await
            .unwrap();
    (
        rows.iter().cloned().collect(),
        rows,
        refunds.into_iter().collect(),
    )
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
                    if post(&client, &url, &d).await {
                        ok = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                assert!(ok, "a delivery was never acknowledged");
                acked.push(dedupe_key(&d));
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
    let sim = simulator().await;
    let (_scenarios, deliveries) = final_states(&sim, 6);
    let env = daemon_env(&sim.base_url());

    // Reference: one undisturbed run.
    let calm_dir = tempfile::tempdir().unwrap();
    let mut calm = BinaryDaemon::start(calm_dir.path(), &env).await;
    send_all(&calm.url, &deliveries, 8, Duration::ZERO).await;
    let calm_pool = reader(calm_dir.path()).await;
    wait_drained(&calm_pool).await;
    let expected = recorded(&calm_pool).await;
    assert!(calm.terminate().await.is_some_and(|s| s.success()));

    // The same deliveries while the daemon is killed three times.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let daemon = Arc::new(tokio::sync::Mutex::new(
        BinaryDaemon::start_on(dir.path(), port, &env).await,
    ));
    let url = format!("http://127.0.0.1:{port}");
    let sending = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let killer = {
        let daemon = daemon.clone();
        let dir = dir.path().to_path_buf();
        let env = env.clone();
        let sending = sending.clone();
        tokio::spawn(async move {
            let mut while_sending = 0;
            for _ in 0..3 {
                let pause = rand::thread_rng().gen_range(100..500);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let mut d = daemon.lock().await;
                d.kill();
                if sending.load(std::sync::atomic::Ordering::SeqCst) {
                    while_sending += 1;
                }
                *d = BinaryDaemon::start_on(&dir, port, &env).await;
            }
            while_sending
        })
    };
    // Paced so that the load spans the kills (about 2 s of sending).
    let acked = send_all(&url, &deliveries, 4, Duration::from_millis(15)).await;
    sending.store(false, std::sync::atomic::Ordering::SeqCst);
    let kills_while_sending = killer.await.unwrap();
    assert!(
        kills_while_sending >= 1,
        "no kill landed while deliveries were being sent"
    );
    eprintln!(
        "crash test: {} deliveries acknowledged, {kills_while_sending} of 3 SIGKILLs while sending",
        acked.len()
    );
    let pool = reader(dir.path()).await;
    wait_drained(&pool).await;

    // Every acknowledged delivery is there, once, processed.
    let keys: BTreeSet<String> = sqlx::query_scalar("SELECT dedupe_key FROM inbox")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    for key in &acked {
        assert!(
            keys.contains(key),
            "{key} was acknowledged but is not in the inbox"
        );
    }
    let not_processed: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM inbox WHERE state NOT IN ('processed', 'ignored')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(not_processed, 0);

    // The history equals the undisturbed one, with no transition doubled.
    let got = recorded(&pool).await;
    assert_eq!(got.1.len(), got.0.len(), "a transition was recorded twice");
    assert_eq!(
        got.0, expected.0,
        "transitions differ from the undisturbed run"
    );
    assert_eq!(got.2, expected.2, "refunds differ from the undisturbed run");
    assert!(!got.0.is_empty());
    let mut d = daemon.lock().await;
    assert!(
        d.terminate().await.is_some_and(|s| s.success()),
        "{}",
        d.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_delays_but_loses_nothing() {
    let sim = simulator().await;
    let (scenarios, deliveries) = final_states(&sim, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.database.url = format!("sqlite://{}/cw.db", dir.path().display());
    config.stripe.api_base = sim.base_url();
    config.juice.api_base = sim.base_url();
    config.stripe.api_key = STRIPE_KEY.into();
    config.juice.api_key = JUICE_KEY.into();
    config.stripe.webhook_secrets = vec![WEBHOOK_SECRET.into()];
    config.juice.checksum_keys = vec![BUSINESS_ID.into()];
    config.workers.poll_interval_ms = 50;
    config.workers.http_retries = 1;
    config.workers.fetch_timeout_secs = 1;
    config.workers.backoff_base_ms = 100;
    config.workers.backoff_max_secs = 1;
    config.workers.max_attempts = 40; // a retry window well past the outage
    config.reconcile.interval_secs = 3_600;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(cancelwatch::run_until(config, listener, async {
        let _ = stopped.await;
    }));

    // The provider is down: every API call answers 503.
    sim.faults().refuse_all(true);
    let acked = send_all(&url, &deliveries, 4, Duration::ZERO).await;
    assert_eq!(
        acked.len(),
        deliveries.len(),
        "deliveries keep being accepted"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pool = reader(dir.path()).await;
    let (processed, dead): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(state = 'processed'), 0), COALESCE(SUM(state = 'dead'), 0) FROM inbox",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (processed, dead),
        (0, 0),
        "nothing is processed or dead during the outage"
    );

    // Back up: everything catches up to the provider's final state.
    sim.faults().refuse_all(false);
    wait_drained(&pool).await;
    let dead: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox WHERE state = 'dead'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    for s in &scenarios {
        for h in &s.expect.histories {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM resources WHERE id = ? AND kind = ?")
                    .bind(&h.id)
                    .bind(&h.kind)
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
                    .flatten();
            assert_eq!(status.as_ref(), h.statuses.last(), "{} {}", s.name, h.id);
        }
    }
    let _ = stop.send(());
    daemon.await.unwrap().unwrap();
}
