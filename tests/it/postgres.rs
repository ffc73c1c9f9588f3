//! The PostgreSQL engine through the real daemon and the storage interface:
//! every simulator scenario recorded exactly, two replicas on one database
//! (duplicates answered whichever got the first copy, one leader), and a
//! replica's leases taken up at once when it is gone, its late writes
//! fenced off. Each test has a database of its own; without
//! `CANCELWATCH_TEST_POSTGRES_URL` they say they were skipped.

use std::collections::HashMap;
use std::time::Duration;

use cancelwatch::domain::outcome::{Decided, Outcome};
use cancelwatch::store::model::NewDelivery;
use cancelwatch::store::Store;
use cancelwatch_sim::{DeliveryOptions, Simulator};

use crate::support::config::WEBHOOK_SECRET;
use crate::support::postgres::PgDatabase;
use crate::support::sim::app_with_simulator;
use crate::support::webhooks::{signed_now, thin_event};
use crate::support::{wait_for, wait_until, TestApp, TestConfig};

/// The store a test reads the database through, as the read commands do.
async fn reader(config: &TestConfig) -> Store {
    cancelwatch::open_store_read_only(config.config())
        .await
        .unwrap()
}

/// Deliveries not yet at their end.
async fn unfinished(store: &Store) -> i64 {
    store
        .inbox_by_state()
        .await
        .unwrap()
        .into_iter()
        .filter(|(state, _)| ["pending", "processing", "failed"].contains(&state.as_str()))
        .map(|(_, n)| n)
        .sum()
}

async fn status_of(store: &Store, id: &str) -> Option<String> {
    let history = store.history(id).await.unwrap()?;
    history.resources.first()?.resource.status.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_records_its_exact_history_on_postgres() {
    let Some(pg) = PgDatabase::create("every_scenario_records_its_exact_history_on_postgres").await
    else {
        return;
    };
    let config = pg.config(TestConfig::new().quick_workers());
    let (sim, app) = app_with_simulator(config.clone()).await;
    let store = reader(&config).await;
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).unwrap();
        for step in &scenario.steps {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
            let what = format!("{name}: step {:?} is reached", step.label);
            wait_until(&what, Duration::from_secs(20), || async {
                let mut done = unfinished(&store).await == 0;
                for (id, want) in &step.expect_status {
                    done &= status_of(&store, id).await.as_deref() == Some(want.as_str());
                }
                done
            })
            .await;
        }
        assert!(sim.wait_background(Duration::from_secs(20)).await);
        let mut refunds = 0;
        for h in &scenario.expect.histories {
            let history = store.history(&h.id).await.unwrap().expect("recorded");
            let r = history
                .resources
                .iter()
                .find(|r| r.resource.kind == h.kind)
                .unwrap_or_else(|| panic!("{name}: no {} {}", h.kind, h.id));
            let to: Vec<&str> = r.transitions.iter().map(|t| t.to_status.as_str()).collect();
            assert_eq!(to, h.statuses, "{name}: history of {}", h.id);
            assert_eq!(
                r.resource.parent_id, h.parent_id,
                "{name}: parent of {}",
                h.id
            );
            for want in scenario
                .expect
                .refunds
                .iter()
                .filter(|f| f.resource_id == h.id)
            {
                let got = r
                    .refunds
                    .first()
                    .unwrap_or_else(|| panic!("{name}: no refund of {}", h.id));
                assert_eq!(got.status, want.status, "{name}: refund of {}", h.id);
                assert_eq!(got.amount, Some(want.amount), "{name}: refund of {}", h.id);
                refunds += 1;
            }
        }
        assert_eq!(refunds, scenario.expect.refunds.len(), "{name}: refunds");
    }
    store.close().await;
    app.stop().await;
    pg.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_inbox_and_one_leader() {
    let Some(pg) = PgDatabase::create("two_replicas_share_one_inbox_and_one_leader").await else {
        return;
    };
    let config = pg.config(TestConfig::new().quick_workers());
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
    pg.drop().await;
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
    let Some(pg) = PgDatabase::create("a_gone_replicas_leases_are_taken_up_at_once").await else {
        return;
    };
    let config = pg.config(TestConfig::new());
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
    pg.drop().await;
}

/// With a backlog the planner has no statistics of yet (an inbox that grew
/// fast since it was last analyzed), a claim still reads the due
/// deliveries in order and stops at its limit, rather than reading every
/// one of them to sort them, under the lock every replica's claims wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_only_what_it_takes_from_a_backlog() {
    let Some(pg) = PgDatabase::create("a_claim_reads_only_what_it_takes_from_a_backlog").await
    else {
        return;
    };
    let config = pg.config(TestConfig::new());
    let store = cancelwatch::open_store(config.config()).await.unwrap();
    let backlog: Vec<NewDelivery> = (0..3_000)
        .map(|i| delivery(&format!("evt_{i}"), &format!("obt_{i}")))
        .collect();
    store.insert_deliveries(&backlog).await.unwrap();
    let claimed = store
        .claim(&cancelwatch::time::now_str(), &lease(600), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 10);
    // Its backend's statistics are sent when it ends.
    store.close().await;
    let look = pg.look().await;
    let (scans, read) = wait_for(
        "the claim's index reads to be counted",
        Duration::from_secs(10),
        || async {
            let (scans, read) = look.index_reads("inbox_due").await;
            (scans > 0).then_some((scans, read))
        },
    )
    .await;
    assert!(
        read < 100,
        "{scans} scan(s) of inbox_due read {read} entries to claim 10 of 3,000"
    );
    look.close().await;
    pg.drop().await;
}
