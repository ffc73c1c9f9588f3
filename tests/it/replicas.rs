//! Three replicas of the real binary on one PostgreSQL database, each
//! SIGKILLed at random moments while deliveries and their duplicates arrive
//! at all of them, and started again: nothing acknowledged is lost, nothing
//! is processed twice or at once, the history equals an undisturbed run's,
//! every alert reaches its sink, and a killed replica's leases are taken up
//! by the others (how fast is reported, not asserted). Without
//! `CANCELWATCH_TEST_POSTGRES_URL` it says it was skipped.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cancelwatch::config::SinkConfig;
use rand::Rng;
use tokio::task::JoinSet;

use crate::support::binary::BinaryDaemon;
use crate::support::postgres::{PgDatabase, PgLook};
use crate::support::receiver::TestReceiver;
use crate::support::sim::{acknowledge, dedupe_key, final_states, simulator, Delivery, Simulator};
use crate::support::{wait_for, wait_until, TestApp, TestConfig};

const REPLICAS: usize = 3;
/// Rounds of load, each with one SIGKILL at a random moment in it.
const KILLS: usize = 12;
/// The rounds whose kill is aimed at the leader (the others pick a replica
/// at random, the leader among them).
const LEADER_ROUNDS: [usize; 3] = [1, 5, 9];
/// Instances of every simulator scenario in the load.
const COPIES: usize = 16;
/// How long a round's deliveries take to arrive.
const ROUND_MS: u64 = 600;
/// The log line of a lease refused by the backstop index: the lease lock
/// let two deliveries of one resource through.
const BACKSTOP: &str = "inbox_one_lease_per_resource";

/// A replica's configuration: the simulator as provider, `sink` (when
/// given) as the one alert sink, leases far longer than the test waits for
/// a take-up, so that only the replicas' liveness can explain a fast one.
fn config(sim: &Simulator, pg: &PgDatabase, sink: Option<&TestReceiver>) -> TestConfig {
    let sinks: Vec<SinkConfig> = sink
        .map(|r| SinkConfig {
            name: "hook".into(),
            kind: "webhook".into(),
            url: r.url().into(),
            secret: format!("whsec_{}", STANDARD.encode([7u8; 32])),
            ..SinkConfig::default()
        })
        .into_iter()
        .collect();
    pg.config(
        TestConfig::new()
            .quick_workers()
            .quick_alerts()
            .provider_apis(&sim.base_url())
            .with(|c| {
                c.workers.lease_secs = 30;
                c.workers.max_attempts = 50;
                // The simulator does not limit its callers (Juice does).
                c.juice.rate_limit_per_second = 0.0;
                c.alerts.sinks = sinks;
            }),
    )
}

/// What a run recorded, without times and trigger ids (which differ
/// between runs): the transitions as a set and in order, the refunds, the
/// alerts (rule, resource id).
type Recorded = (
    BTreeSet<crate::support::postgres::HistoryRow>,
    Vec<crate::support::postgres::HistoryRow>,
    BTreeSet<crate::support::postgres::RefundRow>,
    BTreeSet<(String, String)>,
);

async fn recorded(look: &PgLook) -> Recorded {
    let rows = look.history_rows().await;
    (
        rows.iter().cloned().collect(),
        rows,
        look.refunds().await.into_iter().collect(),
        look.alerts().await.into_iter().collect(),
    )
}

async fn wait_drained(look: &PgLook) {
    wait_until("the inbox is drained", Duration::from_secs(90), || async {
        look.unfinished().await == 0
    })
    .await;
}

/// The answers each dedupe key got: `duplicate` of every acknowledgement.
type Answers = Arc<Mutex<HashMap<String, Vec<bool>>>>;

/// Sends `d` until a replica acknowledges it, starting with `urls[first]`
/// and moving on to the next on a failure, as a provider retries
/// (bounded: 60 s); records the answer.
async fn send(
    client: reqwest::Client,
    urls: Arc<Vec<String>>,
    first: usize,
    d: Delivery,
    answers: Answers,
    after: Duration,
) {
    // When the provider sends it: the load's pace, part of the scenario.
    tokio::time::sleep(after).await;
    for attempt in 0..1200 {
        let url = &urls[(first + attempt) % urls.len()];
        if let Some(answer) = acknowledge(&client, url, &d).await {
            let duplicate = answer["duplicate"].as_bool().expect("an acknowledgement");
            answers
                .lock()
                .unwrap()
                .entry(dedupe_key(&d))
                .or_default()
                .push(duplicate);
            return;
        }
        // A provider's pause before it sends again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} was never acknowledged", dedupe_key(&d));
}

/// Which replica says it leads (`/readyz`), if one does.
async fn leader(client: &reqwest::Client, urls: &[String]) -> Option<usize> {
    for (i, url) in urls.iter().enumerate() {
        let ready = client.get(format!("{url}/readyz")).send().await;
        if let Ok(r) = ready {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            if body["leader"].as_bool() == Some(true) {
                return Some(i);
            }
        }
    }
    None
}

/// The longest the simulator takes to answer.
const LATENCY_MAX: Duration = Duration::from_millis(120);

/// One kill as measured: whether it hit the leader, the leases the killed
/// replica held, and how long until the others held them (and, for the
/// leader, until another replica led).
struct Kill {
    at: Instant,
    leader: bool,
    held: usize,
    taken_up: Duration,
    new_leader: Option<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_sigkilled_at_random_lose_nothing_and_double_nothing() {
    let test = "three_replicas_sigkilled_at_random_lose_nothing_and_double_nothing";
    let Some(reference) = PgDatabase::for_test(test).await else {
        return;
    };
    let pg = PgDatabase::for_test(test).await.unwrap();
    let sim = simulator(None).await;
    // Answers take a while, as a remote provider's do: fetches that were
    // let run at once would overlap, and leases are held when a kill lands.
    sim.faults()
        .latency(Some((Duration::from_millis(20), LATENCY_MAX)));
    let (_scenarios, deliveries) = final_states(&sim, COPIES);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();

    // Reference: the same deliveries, one replica, undisturbed.
    let expected = {
        let app = TestApp::start(config(&sim, &reference, None)).await;
        let answers = Answers::default();
        let urls = Arc::new(vec![app.url.clone()]);
        let mut sends = JoinSet::new();
        for d in &deliveries {
            let d = d.clone();
            sends.spawn(send(
                client.clone(),
                urls.clone(),
                0,
                d,
                answers.clone(),
                Duration::ZERO,
            ));
        }
        while let Some(r) = sends.join_next().await {
            r.unwrap();
        }
        let look = reference.look().await;
        wait_drained(&look).await;
        let expected = recorded(&look).await;
        look.close().await;
        app.stop().await;
        expected
    };
    drop(reference);
    assert!(
        !expected.0.is_empty() && !expected.3.is_empty(),
        "the load records transitions and raises alerts"
    );

    // Three replicas on one database, the load spread over them.
    let receiver = TestReceiver::start().await;
    let configs: Vec<TestConfig> = (0..REPLICAS)
        .map(|_| config(&sim, &pg, Some(&receiver)).on_a_fixed_port())
        .collect();
    let mut replicas = Vec::new();
    for c in &configs {
        replicas.push(BinaryDaemon::start(c).await);
    }
    let urls = Arc::new(replicas.iter().map(|r| r.url.clone()).collect::<Vec<_>>());
    let look = pg.look().await;
    let answers = Answers::default();
    let mut logs = Vec::new();
    let mut kills = Vec::new();
    let chunk = deliveries.len().div_ceil(KILLS);
    for (round, load) in deliveries.chunks(chunk).enumerate() {
        // The round's deliveries spread over it, each twice: the copies to
        // two replicas at about the same time, so that either may get the
        // first.
        let mut sends = JoinSet::new();
        for (i, d) in load.iter().enumerate() {
            let at = rand::thread_rng().gen_range(0..ROUND_MS);
            for copy in 0..2 {
                let first = round + i + copy;
                let after = Duration::from_millis(at + copy as u64 * 5);
                let (d, answers) = (d.clone(), answers.clone());
                sends.spawn(send(client.clone(), urls.clone(), first, d, answers, after));
            }
        }
        // A random moment in the round: the scenario of this test.
        let pause = rand::thread_rng().gen_range(ROUND_MS / 4..ROUND_MS);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let leading = leader(&client, &urls).await;
        let target = match leading {
            Some(l) if LEADER_ROUNDS.contains(&round) => l,
            _ => rand::thread_rng().gen_range(0..REPLICAS),
        };
        let gone_before: HashSet<uuid::Uuid> = look.gone_replicas().await.into_iter().collect();
        let leases_before = look.leases().await;
        let killed_at = Instant::now();
        replicas[target].kill();
        logs.push(replicas[target].log_text());
        // Which replica that was: the one whose own connection ended.
        let owner = wait_for(
            "the killed replica's connection to end",
            Duration::from_secs(10),
            || async {
                look.gone_replicas()
                    .await
                    .into_iter()
                    .find(|o| !gone_before.contains(o))
            },
        )
        .await;
        let held: HashSet<i64> = leases_before
            .iter()
            .chain(&look.leases().await)
            .filter(|l| l.1 == owner)
            .map(|l| l.0)
            .collect();
        wait_until(
            "the killed replica's leases are taken up",
            Duration::from_secs(60),
            || async { look.leases().await.iter().all(|l| l.1 != owner) },
        )
        .await;
        let taken_up = killed_at.elapsed();
        let new_leader = if leading == Some(target) {
            let survivors: Vec<String> = (0..REPLICAS)
                .filter(|i| *i != target)
                .map(|i| urls[i].clone())
                .collect();
            wait_until("another replica leads", Duration::from_secs(30), || async {
                leader(&client, &survivors).await.is_some()
            })
            .await;
            Some(killed_at.elapsed())
        } else {
            None
        };
        kills.push(Kill {
            at: killed_at,
            leader: leading == Some(target),
            held: held.len(),
            taken_up,
            new_leader,
        });
        replicas[target] = BinaryDaemon::start(&configs[target]).await;
        while let Some(r) = sends.join_next().await {
            r.unwrap();
        }
    }
    wait_drained(&look).await;
    wait_until(
        "every alert is delivered",
        Duration::from_secs(30),
        || async { look.undelivered_alerts().await == 0 },
    )
    .await;

    eprintln!(
        "crash test: {} deliveries, each sent twice, {REPLICAS} replicas, {} SIGKILLs",
        deliveries.len(),
        kills.len()
    );
    for (n, k) in kills.iter().enumerate() {
        eprintln!(
            "crash test, kill {}: {}{}{}",
            n + 1,
            if k.leader { "the leader, " } else { "" },
            match k.held {
                0 => "no lease held".to_string(),
                n => format!(
                    "{n} lease(s) held, taken up {} ms after the kill",
                    k.taken_up.as_millis()
                ),
            },
            k.new_leader
                .map(|d| format!(", another replica led {} ms after it", d.as_millis()))
                .unwrap_or_default()
        );
    }
    assert!(kills.len() >= 10, "{} kills", kills.len());
    assert!(
        kills.iter().any(|k| k.leader),
        "the leader was never killed"
    );
    assert!(
        kills.iter().any(|k| k.held > 0),
        "no kill landed while the killed replica held a lease"
    );

    // Every acknowledged delivery is stored once and processed, and a
    // delivery is new to one replica only, whichever got the first copy.
    let answers = answers.lock().unwrap().clone();
    let stored = look.deliveries().await;
    let mut keys: HashMap<&str, usize> = HashMap::new();
    for (key, _) in &stored {
        *keys.entry(key).or_default() += 1;
    }
    for d in &deliveries {
        let key = dedupe_key(d);
        assert_eq!(keys.get(key.as_str()), Some(&1), "{key} stored once");
        let firsts = answers[&key].iter().filter(|dup| !**dup).count();
        assert!(firsts <= 1, "{key} answered new {firsts} times");
    }
    assert_eq!(keys.len(), answers.len(), "only what was sent is stored");
    let unprocessed: Vec<_> = stored
        .iter()
        .filter(|(_, state)| state != "processed" && state != "ignored")
        .collect();
    assert!(unprocessed.is_empty(), "{unprocessed:?}");

    // The history equals the undisturbed one, nothing doubled or missing.
    let got = recorded(&look).await;
    assert_eq!(got.1.len(), got.0.len(), "a transition was recorded twice");
    assert_eq!(
        got.0, expected.0,
        "transitions differ from the undisturbed run"
    );
    assert_eq!(got.2, expected.2, "refunds differ from the undisturbed run");
    assert_eq!(got.3, expected.3, "alerts differ from the undisturbed run");

    // Every alert reached the sink at least once.
    let received: Vec<serde_json::Value> = receiver.received().iter().map(|r| r.json()).collect();
    for (rule, id) in &got.3 {
        assert!(
            received
                .iter()
                .any(|p| p["type"] == rule.as_str() && p["resource"]["id"] == id.as_str()),
            "{rule} about {id} never reached the sink"
        );
    }

    // No two fetches of one resource at once, whichever replicas held them.
    // A killed replica's last fetch is still being answered by the
    // simulator (its latency) after the kill, when a survivor may already
    // hold the lease and fetch again: only overlaps beginning within that
    // latency of a kill are the dead replica's.
    let (after_kill, overlaps): (Vec<_>, Vec<_>) = sim
        .overlapping_fetches_at()
        .into_iter()
        .partition(|(_, began)| {
            kills.iter().any(|k| {
                *began >= k.at && began.duration_since(k.at) <= LATENCY_MAX + LATENCY_MAX / 2
            })
        });
    println!(
        "crash test: {} fetch(es) began while a killed replica's last one was still answered",
        after_kill.len()
    );
    let overlaps: Vec<String> = overlaps.into_iter().map(|(path, _)| path).collect();
    assert_eq!(overlaps, Vec::<String>::new());

    // One leader at the end; the backstop never had to refuse a lease.
    wait_until("one replica leads", Duration::from_secs(10), || async {
        leader(&client, &urls).await.is_some()
    })
    .await;
    for r in &mut replicas {
        logs.push(r.log_text());
        assert!(
            r.terminate().await.is_some_and(|s| s.success()),
            "{}",
            r.log_text()
        );
        logs.push(r.log_text());
    }
    for log in &logs {
        assert!(
            !log.contains(BACKSTOP),
            "the backstop index refused a lease: {log}"
        );
    }
    look.close().await;
    drop(pg);
}
