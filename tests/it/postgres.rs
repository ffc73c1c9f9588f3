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

use cancelwatch_sim::{DeliveryOptions, Simulator};

use crate::support::config::WEBHOOK_SECRET;
use crate::support::postgres::PgDatabase;
use crate::support::sim::app_with_simulator;
use crate::support::webhooks::{signed_now, thin_event};
use crate::support::{wait_for, wait_until, Engine, TestApp, TestConfig};

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

/// Plays scenario `name`, each step processed before the next, and checks
/// what `store` then holds against what the scenario expects.
async fn play(sim: &Simulator, store: &Store, name: &str) {
    let scenario = sim.scenario(name).unwrap();
    for step in &scenario.steps {
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        let what = format!("{name}: step {:?} is reached", step.label);
        wait_until(&what, Duration::from_secs(20), || async {
            let mut done = unfinished(store).await == 0;
            for (id, want) in &step.expect_status {
                done &= status_of(store, id).await.as_deref() == Some(want.as_str());
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
    first
        .insert_deliveries(&[delivery("evt_1", "obt_1"), delivery("evt_2", "obt_1")])
        .await
        .unwrap();
    // Taken after the deliveries' own times: both are due at it.
    let now = cancelwatch::time::now_str();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_database_moves_to_postgres_whole() {
    if !Engine::Postgres.available(module_path!()) {
        return;
    }
    let moved = TestConfig::on(Engine::Postgres).await.quick_workers();
    let target = moved.config().database.url.clone();
    let sqlite = TestConfig::new().quick_workers();
    let (sim, app) = app_with_simulator(sqlite.clone()).await;
    let before = reader(&sqlite).await;
    let names = Simulator::scenario_names();
    for name in &names[..3] {
        play(&sim, &before, name).await;
    }
    app.stop().await;

    let args = cancelwatch::cli::MigrateArgs {
        from: Some(sqlite.config().database.url.clone()),
        to: Some(target),
    };
    cancelwatch::cli::migrate(sqlite.config().clone(), args.clone())
        .await
        .unwrap();
    let after = reader(&moved).await;
    assert_eq!(
        after.inbox_by_state().await.unwrap(),
        before.inbox_by_state().await.unwrap()
    );
    let all = cancelwatch::store::model::PageRequest {
        limit: Some(1000),
        cursor: None,
    };
    let listed = |store: Store, page: cancelwatch::store::model::PageRequest| async move {
        let page = store.transitions(&Default::default(), &page).await.unwrap();
        serde_json::to_value(&page.data).unwrap()
    };
    assert_eq!(
        listed(after.clone(), all.clone()).await,
        listed(before.clone(), all.clone()).await
    );
    for id in after
        .transitions(&Default::default(), &all)
        .await
        .unwrap()
        .data
        .iter()
        .map(|t| t.resource_id.clone())
    {
        let a = serde_json::to_value(after.history(&id).await.unwrap()).unwrap();
        let b = serde_json::to_value(before.history(&id).await.unwrap()).unwrap();
        assert_eq!(a, b, "history of {id}");
    }
    // Copying twice is refused: the target is no longer empty.
    let again = cancelwatch::cli::migrate(sqlite.config().clone(), args).await;
    assert!(format!("{:#}", again.unwrap_err()).contains("not empty"));

    // The daemon goes on from there on PostgreSQL: new rows after the old.
    before.close().await;
    after.close().await;
    let (sim, app) = app_with_simulator(moved.clone()).await;
    let store = reader(&moved).await;
    for name in &names[3..5] {
        play(&sim, &store, name).await;
    }
    store.close().await;
    app.stop().await;
}

/// A server that cannot be reached at start: one line naming it, the
/// password left out, and a non-zero exit.
#[tokio::test]
async fn an_unreachable_server_at_start_is_one_line_without_the_password() {
    let config = TestConfig::new().with(|c| {
        c.database.url = "postgres://cw:hunter2-secret@127.0.0.1:9/cw".into();
        c.database.connect_timeout_secs = 2;
    });
    let out = crate::support::binary::run(&config, &["serve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("127.0.0.1:9") && err.contains("refused"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
    let shown = crate::support::binary::run(&config, &["check-config"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("postgres://cw:<redacted>@127.0.0.1:9/cw"),
        "{shown}"
    );
    assert!(!shown.contains("hunter2"));
}

/// The server lost while the daemon runs: `/readyz` fails and webhooks are
/// answered 503 (never a 2xx for what was not committed); when the server
/// is back, the daemon is ready again on its own and takes deliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_server_makes_the_daemon_unready_until_it_is_back() {
    if !Engine::Postgres.available(module_path!()) {
        return;
    }
    let pg = TestConfig::on(Engine::Postgres).await;
    let (proxy, through) = crate::support::postgres::Proxy::start(&pg.config().database.url).await;
    let config = pg.quick_workers().with(move |c| {
        c.database.url = through;
        c.database.connect_timeout_secs = 1;
    });
    let app = TestApp::start(config).await;
    let post = |id: &str| {
        let body = thin_event(id);
        let header = signed_now(WEBHOOK_SECRET, &body);
        let app = &app;
        async move { app.post_stripe_with(&body, Some(&header)).await }
    };
    assert_eq!(post("evt_before").await.0, 200);

    proxy.cut();
    wait_until("/readyz fails", Duration::from_secs(10), || async {
        app.get("/readyz", None).await.0 == 503
    })
    .await;
    let (status, answer) = post("evt_while_lost").await;
    assert_eq!(status, 503, "{answer}");

    proxy.mend();
    wait_until("/readyz passes again", Duration::from_secs(20), || async {
        app.get("/readyz", None).await.0 == 200
    })
    .await;
    wait_until(
        "a delivery is taken again",
        Duration::from_secs(20),
        || async { post("evt_after").await.0 == 200 },
    )
    .await;
    let _ = proxy.port;
    app.stop().await;
}

/// With a backlog the planner has no statistics of yet (an inbox that grew
/// fast since it was last analyzed), a claim still reads the due
/// deliveries in order and stops at its limit, rather than reading every
/// one of them to sort them, under the lock every replica's claims wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_reads_only_what_it_takes_from_a_backlog() {
    let Some(pg) = PgDatabase::for_test(module_path!()).await else {
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
    drop(pg);
}

/// Two replicas recording the same resources, listed in opposite orders,
/// wait for each other rather than deadlock: every recording locks the rows
/// it judges in one order (their rid), whatever order its answer lists them
/// in. Here two bulk transfers list the same two items, one each way; a
/// third transaction holds the items until both recordings wait for them,
/// so that both go on at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_recording_the_same_resources_in_opposite_orders_do_not_deadlock() {
    use cancelwatch::domain::observe::Trigger;
    use cancelwatch::providers::juice::objects::decode_bulk;
    use sqlx::Connection;

    let Some(pg) = PgDatabase::for_test(module_path!()).await else {
        return;
    };
    let config = pg.config(TestConfig::new());
    let (a, b) = (
        cancelwatch::open_store(config.config()).await.unwrap(),
        cancelwatch::open_store(config.config()).await.unwrap(),
    );
    let reversed = &config.config().juice.reversed_statuses;
    let bulk = |id: &str, status: &str, items: [&str; 2]| {
        let items: Vec<_> = items
            .iter()
            .map(|i| serde_json::json!({"id": i, "amount": 100, "status": status}))
            .collect();
        let at = if status == "pending" {
            "2024-10-02T17:00:00"
        } else {
            "2024-10-02T17:05:00"
        };
        decode_bulk(
            id,
            serde_json::json!({"data": {"id": id, "status": "executing",
                                        "updated_at": at, "items": items}}),
            reversed,
        )
        .unwrap()
    };
    let now = cancelwatch::time::now;
    a.record_observation(
        config.config(),
        &bulk("bt_first", "pending", ["it_1", "it_2"]),
        &Trigger::event("evt_0"),
        None,
        now(),
    )
    .await
    .unwrap();

    let mut holder = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query("SELECT rid FROM resources WHERE kind = 'juice.transfer' FOR UPDATE")
        .execute(&mut *held)
        .await
        .unwrap();
    let (one_way, other_way) = (
        bulk("bt_a", "processing", ["it_1", "it_2"]),
        bulk("bt_b", "processing", ["it_2", "it_1"]),
    );
    let (trigger_a, trigger_b) = (Trigger::event("evt_a"), Trigger::event("evt_b"));
    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let look = &pool;
    let (by_a, by_b, ()) = tokio::join!(
        a.record_observation(config.config(), &one_way, &trigger_a, None, now()),
        b.record_observation(config.config(), &other_way, &trigger_b, None, now()),
        async {
            wait_until(
                "both recordings wait for the items",
                Duration::from_secs(20),
                || async move {
                    let waiting: i64 = sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pg_stat_activity
                         WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    )
                    .fetch_one(look)
                    .await
                    .unwrap();
                    waiting == 2
                },
            )
            .await;
            held.commit().await.unwrap();
        }
    );
    by_a.unwrap();
    by_b.unwrap();
    let moves: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM transitions WHERE kind = 'juice.transfer' AND to_status = 'processing'",
    )
    .fetch_one(look)
    .await
    .unwrap();
    assert_eq!(moves, 2, "each item moved once, by whichever came first");
    pool.close().await;
    holder.close().await.unwrap();
    a.close().await;
    b.close().await;
    drop(pg);
}
