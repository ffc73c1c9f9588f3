//! What only the PostgreSQL engine has, through the real daemon and the
//! storage interface: two replicas on one database (duplicates answered
//! whichever got the first copy, one leader), and a replica's leases taken
//! up at once when it is gone, its late writes fenced off. (Everything both
//! engines do is tested once for both: see `both_engines!`.) Each test has
//! a database of its own; without `CANCELWATCH_TEST_POSTGRES_URL` they say
//! they were skipped.

use std::collections::HashMap;
use std::time::Duration;

use cancelwatch::domain::outcome::{Decided, Outcome};
use cancelwatch::store::model::NewDelivery;
use cancelwatch::store::Store;

use crate::support::config::WEBHOOK_SECRET;
use crate::support::webhooks::{signed_now, thin_event};
use crate::support::{wait_until, Engine, TestApp, TestConfig};

/// The store a test reads the database through, as the read commands do.
async fn reader(config: &TestConfig) -> Store {
    cancelwatch::open_store_read_only(config.config())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_inbox_and_one_leader() {
    if !Engine::Postgres.available(module_path!()) {
        return;
    }
    let config = TestConfig::on(Engine::Postgres).await.quick_workers();
    let a = TestApp::start(config.clone()).await;
    let b = TestApp::start(config.clone()).await;
    let replicas = [&a, &b];
    // Each event twice, the copies to different replicas: one is new, the
    // other a duplicate, whichever arrives first.
    let mut answers: HashMap<String, Vec<bool>> = HashMap::new();
    for i in 0..40 {
        let id = format!("evt_pg_{i}");
        let body = thin_event(&id);
        for copy in 0..2 {
            let app = replicas[(i + copy) % 2];
            let header = signed_now(WEBHOOK_SECRET, &body);
            let (status, answer) = app.post_stripe_with(&body, Some(&header)).await;
            assert_eq!(status, 200, "{answer}");
            answers
                .entry(id.clone())
                .or_default()
                .push(answer["duplicate"].as_bool().unwrap());
        }
    }
    for (id, duplicates) in &answers {
        assert_eq!(duplicates, &[false, true], "{id}");
    }
    let store = reader(&config).await;
    let stored: i64 = store
        .inbox_by_state()
        .await
        .unwrap()
        .iter()
        .map(|s| s.1)
        .sum();
    assert_eq!(stored, 40);
    // One of the two leads, never both.
    wait_until("one replica leads", Duration::from_secs(5), || async {
        leads(&a).await as u8 + leads(&b).await as u8 == 1
    })
    .await;
    // The leader gone, the other takes over within seconds.
    let (leader, other) = if leads(&a).await { (a, b) } else { (b, a) };
    leader.stop().await;
    wait_until(
        "the other replica leads",
        Duration::from_secs(5),
        || async { leads(&other).await },
    )
    .await;
    store.close().await;
    other.stop().await;
}

/// What a replica's `/readyz` says of its leadership.
async fn leads(app: &TestApp) -> bool {
    let (_, ready) = app.get("/readyz", None).await;
    ready["leader"].as_bool().unwrap_or(false)
}

fn delivery(key: &str, resource: &str) -> NewDelivery {
    NewDelivery {
        provider: "stripe".into(),
        dedupe_key: key.into(),
        event_type: "v2.money_management.outbound_transfer.canceled".into(),
        event_id: Some(key.into()),
        resource_kind: Some("stripe.outbound_transfer".into()),
        resource_id: Some(resource.into()),
        context: None,
        livemode: Some(false),
        raw_body: b"{}".to_vec(),
        source: "webhook",
        received_at: cancelwatch::time::now_str(),
    }
}

fn lease(secs: i64) -> String {
    cancelwatch::time::fmt(cancelwatch::time::now() + chrono::Duration::seconds(secs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_replicas_leases_are_taken_up_at_once_and_its_late_writes_fenced() {
    if !Engine::Postgres.available(module_path!()) {
        return;
    }
    let config = TestConfig::on(Engine::Postgres).await;
    let first = cancelwatch::open_store(config.config()).await.unwrap();
    let second = cancelwatch::open_store(config.config()).await.unwrap();
    let now = cancelwatch::time::now_str();
    first
        .insert_deliveries(&[delivery("evt_1", "obt_1"), delivery("evt_2", "obt_1")])
        .await
        .unwrap();
    let long = lease(600);
    let held = first.claim(&now, &long, 10).await.unwrap();
    assert_eq!(held.len(), 1, "one delivery of a resource at a time");
    assert!(
        second
            .claim(&now, &lease(600), 10)
            .await
            .unwrap()
            .is_empty(),
        "a live replica's lease holds"
    );

    // The first replica is gone (its own connection closed, as a killed
    // process's is): its lease is taken up at once, not in ten minutes.
    first.close().await;
    let taken = second
        .claim(&cancelwatch::time::now_str(), &lease(600), 10)
        .await
        .unwrap();
    assert_eq!(taken.iter().map(|d| d.id).collect::<Vec<_>>(), [held[0].id]);

    // A write of the first replica's arriving late changes nothing.
    let late = cancelwatch::open_store(config.config()).await.unwrap();
    let stale = Decided {
        delivery: held[0].clone(),
        lease_until: long.clone(),
        outcome: Outcome::Ignore("late".into()),
    };
    let (written, _) = late
        .record_outcomes(config.config(), &[stale])
        .await
        .unwrap();
    assert!(
        !matches!(
            written[0],
            Some(cancelwatch::domain::outcome::Written::Ignored(_))
        ),
        "{written:?}"
    );
    let d = second.delivery(held[0].id).await.unwrap().unwrap();
    assert_eq!(d.state, "processing");
    late.close().await;
    second.close().await;
}

/// A lone replica leads from the moment its store is open (so the jobs
/// that run at start, on the leader only, do run), and a store closed has
/// let go of the leadership by the time `close` returns (so the next one
/// opened leads at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_replica_leads_once_open_and_lets_go_once_closed() {
    if !Engine::Postgres.available(module_path!()) {
        return;
    }
    let config = TestConfig::on(Engine::Postgres).await;
    for n in 0..20 {
        let store = cancelwatch::open_store(config.config()).await.unwrap();
        assert!(store.is_leader(), "store {n} does not lead once open");
        store.close().await;
    }
}
