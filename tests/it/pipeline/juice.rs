//! Juice where it leaves the happy path, a real daemon against the
//! simulator: items in the documented shape (no `id`), in both shapes, and
//! with no key at all; cancels whose answer is lost; partial cancellations
//! only the counters show; currencies; refunds that never resolve; cancels
//! in a booked request budget.

use std::time::Duration;

use serde_json::{json, Value};

use super::{play, WAIT};
use crate::support::both_engines;
use crate::support::config::{BUSINESS_ID, JUICE_KEY};
use crate::support::db::{self, items_of};
use crate::support::sim::{app_with_simulator, wait_step, Delivery, DeliveryOptions, Simulator};
use crate::support::Engine;
use crate::support::{wait_until, TestApp, TestConfig};

const TOKEN: &str = "juice-test-admin-token-0123456789abcdef";

/// A daemon with quick workers and the `/v1` API on, and its simulator.
async fn start_pair(engine: Engine) -> (Simulator, TestApp) {
    let config = TestConfig::on(engine)
        .await
        .quick_workers()
        .with(|c| c.server.admin_token = TOKEN.into());
    app_with_simulator(config).await
}

/// Sends a Juice delivery naming bulk transfer `bulk` and waits until the
/// daemon has processed everything it holds.
async fn announce(sim: &Simulator, app: &TestApp, event: &str, bulk: &str) {
    let d = Delivery::juice(BUSINESS_ID, event, json!({"id": bulk}));
    sim.deliver(&d).await.unwrap();
    wait_until("every delivery is processed", WAIT, || async {
        db::unfinished_deliveries(app.db()).await == 0
    })
    .await;
}

/// The bulk transfer as the simulator serves it now.
async fn served(sim: &Simulator, bulk: &str) -> Value {
    let answer: Value = reqwest::Client::new()
        .get(format!("{}/bulk-transfers/{bulk}", sim.base_url()))
        .header("authorization", JUICE_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["data"].clone()
}

/// The resource id `/v1/resources/{key}` finds.
async fn resource_known_as(app: &TestApp, key: &str) -> Option<String> {
    let (status, body) = app.get(&format!("/v1/resources/{key}"), Some(TOKEN)).await;
    (status == 200).then(|| body["resources"][0]["id"].as_str().unwrap().to_string())
}

both_engines! {
    /// Juice documents bulk-transfer items without an `id`: each is recorded
    /// under `<bulk id>:<reference>`, with its transitions, refund and its part
    /// in the partial-cancellation alert; served later with its id, it stays the
    /// same resource (and is found by either key), and the other way round.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn items_without_an_id_are_recorded_and_stay_one_resource_in_either_shape(engine) {
        let (sim, app) = start_pair(engine).await;

        // The documented shape: `play` checks every history and refund exactly.
        let scenario = sim.scenario("juice_partial_cancellation").unwrap();
        play(&sim, app.db(), &scenario, &DeliveryOptions::default()).await;
        let bulk = scenario.expect.histories[0].id.clone();
        let items: Vec<String> = scenario.expect.histories[1..]
            .iter()
            .map(|h| h.id.clone())
            .collect();
        for item in &items {
            assert!(item.starts_with(&format!("{bulk}:")), "{item}");
        }
        let alert = db::alerts(app.db())
            .await
            .into_iter()
            .find(|a| a.rule == "partial_cancellation" && a.resource_id == bulk)
            .expect("a partial-cancellation alert");
        let details: Value = serde_json::from_str(&alert.details).unwrap();
        assert_eq!(details["items_total"], 4, "{details}");
        assert_eq!(details["not_cancelled"]["count"], 2, "{details}");

        // Served with their ids now: the same four resources, nothing moves.
        sim.serve_juice_item_ids(true);
        let transitions = db::transition_count(app.db()).await;
        announce(&sim, &app, "bulk_transfer.updated", &bulk).await;
        let mut sorted = items.clone();
        sorted.sort();
        assert_eq!(items_of(app.db(), &bulk).await, sorted);
        assert_eq!(db::transition_count(app.db()).await, transitions);
        let first = &served(&sim, &bulk).await["items"][0];
        let uuid = first["id"].as_str().unwrap();
        let by_reference = format!("{bulk}:{}", first["reference"].as_str().unwrap());
        assert_eq!(resource_known_as(&app, uuid).await, Some(by_reference));

        // The other way round: first seen with ids, then without.
        let scenario = sim.scenario("juice_clean_cancellation").unwrap();
        play(&sim, app.db(), &scenario, &DeliveryOptions::default()).await;
        let bulk = scenario.expect.histories[0].id.clone();
        let mut uuids: Vec<String> = scenario.expect.histories[1..]
            .iter()
            .map(|h| h.id.clone())
            .collect();
        uuids.sort();
        assert!(uuids.iter().all(|id| !id.contains(':')));
        sim.serve_juice_item_ids(false);
        let transitions = db::transition_count(app.db()).await;
        announce(&sim, &app, "bulk_transfer.updated", &bulk).await;
        assert_eq!(items_of(app.db(), &bulk).await, uuids);
        assert_eq!(db::transition_count(app.db()).await, transitions);
        let first = &served(&sim, &bulk).await["items"][0];
        assert!(first.get("id").is_none());
        let by_reference = format!("{bulk}:{}", first["reference"].as_str().unwrap());
        let known = resource_known_as(&app, &by_reference).await.unwrap();
        assert!(uuids.contains(&known), "{known}");
        app.stop().await;
    }
}

both_engines! {
    /// An item with neither an id nor a reference cannot be a resource of its
    /// own: it stays in its bulk transfer's snapshot (the only item there),
    /// and is counted and logged
    /// once per bulk transfer, however often the bulk transfer is fetched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_item_with_no_key_is_kept_in_the_snapshot_and_counted_once(engine) {
        use cancelwatch_sim::state::{BulkItem, BulkTransfer};
        let (sim, app) = start_pair(engine).await;
        let series = r#"cancelwatch_unkeyed_items_total{provider="juice"}"#;
        let before = app.metric(series).await;
        let mut unkeyed = BulkItem::new(700, "NGN", "pending", 2);
        unkeyed.reference.clear();
        let bulk = BulkTransfer::new(
            "executing",
            vec![BulkItem::new(500, "NGN", "pending", 1), unkeyed],
        );
        sim.add_juice_bulk(bulk.clone());
        announce(&sim, &app, "bulk_transfer.created", &bulk.id).await;
        announce(&sim, &app, "bulk_transfer.updated", &bulk.id).await;

        assert_eq!(items_of(app.db(), &bulk.id).await.len(), 1);
        let stored = db::resource(app.db(), "juice.bulk_transfer", &bulk.id)
            .await
            .unwrap();
        let snapshot: Value = serde_json::from_str(stored.snapshot.as_deref().unwrap()).unwrap();
        // The keyed item is stored on its own, not repeated in the snapshot.
        let kept = snapshot["items"].as_array().unwrap();
        assert_eq!(kept.len(), 1, "{snapshot}");
        assert!(kept
            .iter()
            .any(|i| i["amount"] == 700 && i.get("reference").is_none()));
        // At least once: the counter is the process's, which this test's
        // run on the other engine, beside it, may count too.
        assert!(app.metric(series).await > before);
        app.stop().await;
    }
}

both_engines! {
    /// A bulk transfer that moves is fetched again every reconcile pass;
    /// its items that rest are not written again each time: their rows
    /// keep the time they were last written, and they have no fetch time
    /// of their own (their bulk transfer's stands for them).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_moving_bulk_transfer_fetched_again_rewrites_none_of_its_resting_items(engine) {
        use cancelwatch_sim::state::{BulkItem, BulkTransfer};
        let config = TestConfig::on(engine)
            .await
            .quick_workers()
            .with(|c| c.reconcile.interval_secs = 1);
        let (sim, app) = app_with_simulator(config).await;
        let items = (0..200)
            .map(|n| BulkItem::new(100 + n as i64, "NGN", "processing", n))
            .collect();
        let bulk = BulkTransfer::new("executing", items);
        sim.add_juice_bulk(bulk.clone());
        announce(&sim, &app, "bulk_transfer.created", &bulk.id).await;
        assert_eq!(items_of(app.db(), &bulk.id).await.len(), 200);

        let observed = || async {
            let parent = db::resource(app.db(), "juice.bulk_transfer", &bulk.id).await;
            parent.unwrap().last_observed_at.unwrap()
        };
        let written: Vec<_> = written_items(app.db(), &bulk.id).await;
        assert!(written.iter().all(|(_, next)| next.is_none()), "{written:?}");
        let transitions = db::transition_count(app.db()).await;
        // Two reconcile passes, each of which fetched and recorded the bulk.
        for _ in 0..2 {
            let before = observed().await;
            wait_until("the reconciler fetched the bulk again", WAIT, || async {
                observed().await > before
            })
            .await;
        }
        assert_eq!(written_items(app.db(), &bulk.id).await, written);
        assert_eq!(db::transition_count(app.db()).await, transitions);
        app.stop().await;
    }
}

/// When each item of `bulk` was last written, and its own next fetch.
async fn written_items(
    db: &impl db::Database,
    bulk: &str,
) -> Vec<(Option<String>, Option<String>)> {
    let mut rows = Vec::new();
    for id in items_of(db, bulk).await {
        let item = db::resource(db, "juice.transfer", &id).await.unwrap();
        rows.push((item.last_observed_at, item.next_reconcile_at));
    }
    rows
}

/// Cancels `bulk` through `/v1/cancellations`; the report.
async fn cancel(app: &TestApp, bulk: &str) -> Value {
    let body = json!({"kind": "juice.bulk_transfer", "id": bulk});
    let (status, report) = app.post("/v1/cancellations", Some(body), Some(TOKEN)).await;
    // 201 accepted, 200 partial, 409 refused, 504 unknown: the report says which.
    assert!(
        matches!(status, 200 | 201 | 409 | 504),
        "{status}: {report}"
    );
    report
}

/// How many cancel requests for `bulk` reached the simulator.
fn cancels_sent(sim: &Simulator, bulk: &str) -> usize {
    let path = format!("/bulk-transfers/{bulk}/cancel");
    sim.requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .count()
}

/// The open alerts of `rule` about `id`.
async fn open_alerts(app: &TestApp, rule: &str, id: &str) -> usize {
    db::alerts(app.db())
        .await
        .iter()
        .filter(|a| a.rule == rule && a.resource_id == id && a.state == "open")
        .count()
}

both_engines! {
    /// Juice documents no idempotency for a cancel: one applied whose answer is
    /// lost (a 5xx on the way back, or no answer before the timeout) is never
    /// sent again on its own. It is recorded `unknown`, the state fetched at
    /// once decides (here: cancelled, in part, which raises the alert), and a
    /// cancel sent again by hand, answered `invalid_state`, hides none of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancel_whose_answer_is_lost_is_not_sent_again(engine) {
        let (sim, app) = start_pair(engine).await;
        let faults = sim.faults();
        // The daemon's calls time out after 1 s (`quick_workers`).
        let lost: [(&str, Value); 2] = [("server error", json!(503)), ("timeout", Value::Null)];
        for (how, http_status) in lost {
            let scenario = sim.scenario("juice_partial_cancellation").unwrap();
            let first = &scenario.steps[0];
            sim.play_step(first, &DeliveryOptions::default())
                .await
                .unwrap();
            wait_step(app.db(), first).await;
            let bulk = scenario.expect.histories[0].id.clone();
            if http_status.is_null() {
                faults.hang_after_applying_next_cancels(1, Duration::from_secs(3));
            } else {
                faults.fail_after_applying_next_cancels(1, 503);
            }

            let report = cancel(&app, &bulk).await;
            assert_eq!(report["outcome"], "unknown", "{how}: {report}");
            assert_eq!(report["http_status"], http_status, "{how}");
            assert_eq!(report["status"], "cancelled", "{how}");
            assert_eq!(report["effect"], "cancelled", "{how}");
            assert_eq!(cancels_sent(&sim, &bulk), 1, "{how}: sent once");
            wait_until("the partial cancellation is raised", WAIT, || async {
                open_alerts(&app, "partial_cancellation", &bulk).await == 1
            })
            .await;

            // Juice refuses a second cancel (`invalid_state`); the bulk transfer
            // was seen cancelled, so the request is recorded as already done,
            // and the partial cancellation stays raised.
            let again = cancel(&app, &bulk).await;
            assert_eq!(again["outcome"], "already_cancelled", "{how}: {again}");
            assert_eq!(again["error_code"], "invalid_state", "{how}");
            let outcomes: Vec<Option<String>> =
                db::cancel_requests(app.db(), "juice.bulk_transfer", &bulk)
                    .await
                    .into_iter()
                    .map(|c| c.outcome)
                    .collect();
            assert_eq!(
                outcomes,
                [Some("unknown".into()), Some("already_cancelled".into())],
                "{how}"
            );
            assert_eq!(open_alerts(&app, "partial_cancellation", &bulk).await, 1);
        }
        app.stop().await;
    }
}

both_engines! {
    /// A cancelled bulk transfer whose counters show transfers that went
    /// through (or failed) was cancelled only in part, whatever its items show.
    /// Here no item can be told apart (neither id nor reference) and the cancel
    /// came from elsewhere (the payments app sharing the key): only the
    /// counters tell.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn counters_show_a_partial_cancellation_the_items_cannot(engine) {
        use cancelwatch_sim::state::{BulkItem, BulkTransfer};
        let (sim, app) = start_pair(engine).await;
        let unkeyed = |amount, status, n| {
            let mut item = BulkItem::new(amount, "NGN", status, n);
            item.reference.clear();
            item
        };
        let bulk = BulkTransfer::new(
            "executing",
            vec![
                unkeyed(1_000, "pending", 1),
                unkeyed(2_000, "processing", 2),
                unkeyed(3_000, "completed", 3),
            ],
        );
        sim.add_juice_bulk(bulk.clone());
        announce(&sim, &app, "bulk_transfer.created", &bulk.id).await;

        // The payments app cancels it; Juice's webhooks follow.
        let answer = reqwest::Client::new()
            .post(format!(
                "{}/bulk-transfers/{}/cancel",
                sim.base_url(),
                bulk.id
            ))
            .header("authorization", JUICE_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 422, "partial_cancellation, to the app");
        let alert = crate::support::wait_for("the partial cancellation", WAIT, || async {
            db::alerts(app.db())
                .await
                .into_iter()
                .find(|a| a.rule == "partial_cancellation" && a.resource_id == bulk.id)
        })
        .await;
        assert!(items_of(app.db(), &bulk.id).await.is_empty());
        let details: Value = serde_json::from_str(&alert.details).unwrap();
        assert_eq!(details["bulk_status"], "cancelled");
        assert_eq!(details["successful_transfer_count"], 1, "{details}");
        assert_eq!(details["failed_transfer_count"], 0, "{details}");
        assert!(details["cancel_request"].is_null(), "{details}");
        assert!(
            alert
                .summary
                .contains("its counters show 1 transfers succeeded and 0 failed"),
            "{}",
            alert.summary
        );
        app.stop().await;
    }
}

both_engines! {
    /// Each item's currency is recorded from the fields Juice may send
    /// (`source_currency`, …), an item with none is of an unknown currency, and
    /// amounts of different currencies are never added up in an alert.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn currencies_are_recorded_per_item_and_never_added_together(engine) {
        use cancelwatch_sim::state::{BulkItem, BulkTransfer};
        let (sim, app) = start_pair(engine).await;
        let bulk = BulkTransfer::new(
            "executing",
            vec![
                BulkItem::new(1_000, "NGN", "pending", 1),
                BulkItem::new(500, "USD", "pending", 2),
                BulkItem::new(2_000, "NGN", "processing", 3),
                BulkItem::new(300, "", "completed", 4),
            ],
        );
        sim.add_juice_bulk(bulk.clone());
        announce(&sim, &app, "bulk_transfer.created", &bulk.id).await;
        let report = cancel(&app, &bulk.id).await;
        assert_eq!(report["outcome"], "partial_cancellation", "{report}");

        let alert = db::alerts(app.db())
            .await
            .into_iter()
            .find(|a| a.rule == "partial_cancellation" && a.resource_id == bulk.id)
            .expect("raised with the state fetched after the cancel");
        let details: Value = serde_json::from_str(&alert.details).unwrap();
        assert_eq!(
            details["cancelled"]["amounts"],
            json!({"NGN": 1_000, "USD": 500}),
            "{details}"
        );
        assert_eq!(
            details["not_cancelled"]["amounts"],
            json!({"NGN": 2_000, "unknown": 300}),
            "{details}"
        );
        assert_eq!(details["currencies"], json!(["NGN", "USD", "unknown"]));
        assert!(
            alert.summary.contains(
                "2 of 4 items cancelled (1000 NGN + 500 USD), \
                 2 not cancelled (2000 NGN + 300 (currency unknown);"
            ),
            "{}",
            alert.summary
        );
        let refunds = db::refunds_under(app.db(), &bulk.id).await;
        let currency_of = |item: &BulkItem| {
            let key = sim.juice_item_key(&bulk.id, item);
            let refund = refunds.iter().find(|r| r.resource_id == key).unwrap();
            (refund.amount, refund.currency.clone())
        };
        assert_eq!(
            currency_of(&bulk.items[0]),
            (Some(1_000), Some("NGN".into()))
        );
        assert_eq!(currency_of(&bulk.items[1]), (Some(500), Some("USD".into())));
        let key = sim.juice_item_key(&bulk.id, &bulk.items[3]);
        let unknown = db::resource(app.db(), "juice.transfer", &key)
            .await
            .unwrap();
        assert_eq!((unknown.amount, unknown.currency), (Some(300), None));
        app.stop().await;
    }
}

/// How long the reconciler waits before it looks at `id` again, as stored.
async fn reconcile_gap(app: &TestApp, id: &str) -> Option<chrono::Duration> {
    let r = db::resource(app.db(), "juice.transfer", id).await?;
    let last = cancelwatch::time::parse_lenient(r.last_observed_at.as_deref()?)?;
    let next = cancelwatch::time::parse_lenient(r.next_reconcile_at.as_deref()?)?;
    Some(next - last)
}

/// The GETs of bulk transfer `bulk` the simulator answered.
fn fetches_of(sim: &Simulator, bulk: &str) -> usize {
    let path = format!("/bulk-transfers/{bulk}");
    sim.requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path == path)
        .count()
}

both_engines! {
    /// Juice documents no reversal signal, so a cancelled item's refund may
    /// stay pending for good: the reconciler looks at its bulk transfer less
    /// and less often (the wait grows with how long the refund has been
    /// pending), and the `refund_overdue` alert says what is known.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_refund_that_never_resolves_is_looked_at_less_and_less_often(engine) {
        let config = TestConfig::on(engine).await.quick_workers().quick_alerts().with(|c| {
            c.reconcile.interval_secs = 1;
            c.reconcile.max_interval_secs = 60;
            c.alerts.refund_overdue.after_secs = 1;
        });
        let (sim, app) = app_with_simulator(config).await;
        // Created, then cancelled; the reversals never come.
        let scenario = sim.scenario("juice_clean_cancellation").unwrap();
        for step in &scenario.steps[..2] {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
            wait_step(app.db(), step).await;
        }
        let bulk = scenario.expect.histories[0].id.clone();
        let item = scenario.expect.histories[1].id.clone();
        let before = fetches_of(&sim, &bulk);

        let four_secs = chrono::Duration::seconds(4);
        wait_until(
            "the wait between two looks has grown to 4 s",
            WAIT,
            || async {
                reconcile_gap(&app, &item)
                    .await
                    .is_some_and(|gap| gap >= four_secs)
            },
        )
        .await;
        // Looked at after about 1, 2 and 4 s: not at every 1 s pass.
        let looks = fetches_of(&sim, &bulk) - before;
        assert!((2..=5).contains(&looks), "{looks} fetches");

        let alert = crate::support::wait_for("the refund_overdue alert", WAIT, || async {
            db::alerts(app.db())
                .await
                .into_iter()
                .find(|a| a.rule == "refund_overdue" && a.resource_id == item)
        })
        .await;
        let details: Value = serde_json::from_str(&alert.details).unwrap();
        assert_eq!(details["resource_status"], "cancelled", "{details}");
        assert_eq!(details["currency"], "USD", "{details}");
        assert_eq!(details["still_fetched"], true, "{details}");
        assert_eq!(details["fetched_at_most_every_secs"], 60, "{details}");
        assert!(
            details["awaiting"]
                .as_str()
                .is_some_and(|a| a.contains("juice.reversed_statuses (reversed, refunded)")),
            "{details}"
        );
        assert!(
            alert.summary.contains("still cancelled when last fetched")
                && alert.summary.contains("Juice documents neither"),
            "{}",
            alert.summary
        );
        app.stop().await;
    }
}

both_engines! {
    /// A cancel issued through cancelwatch goes ahead of the other calls in the
    /// provider's request budget: with the budget booked past what a call may
    /// wait (here by deliveries, as reconcile passes would), it is still sent,
    /// and so is the fetch after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cancel_goes_ahead_of_the_calls_booked_in_the_budget(engine) {
        use cancelwatch_sim::state::{BulkItem, BulkTransfer};
        // One call every 2 s; a call waits at most 5 s for its turn.
        let config = TestConfig::on(engine).await.quick_workers().with(|c| {
            c.server.admin_token = TOKEN.into();
            c.juice.rate_limit_per_second = 0.5;
            c.juice.rate_limit_burst = 1;
            c.workers.fetch_timeout_secs = 5;
        });
        let (sim, app) = app_with_simulator(config).await;
        let new_bulk =
            |n| BulkTransfer::new("executing", vec![BulkItem::new(100, "NGN", "pending", n)]);
        let target = new_bulk(0);
        sim.add_juice_bulk(target.clone());
        let others: Vec<BulkTransfer> = (1..=6).map(new_bulk).collect();
        for bulk in &others {
            sim.add_juice_bulk(bulk.clone());
        }

        // Four workers book 0, 2 and 4 s; the fourth call would wait 6 s and is
        // not made, its delivery kept waiting: the budget is booked.
        let series = r#"cancelwatch_deliveries_rate_limited_total{provider="juice"}"#;
        let refused = app.metric(series).await;
        let traffic = others.iter().map(|b| {
            let d = Delivery::juice(BUSINESS_ID, "bulk_transfer.updated", json!({"id": b.id}));
            let sim = sim.clone();
            async move { sim.deliver(&d).await }
        });
        futures_util::future::try_join_all(traffic).await.unwrap();
        wait_until("the request budget is booked", WAIT, || async {
            app.metric(series).await > refused
        })
        .await;

        let report = cancel(&app, &target.id).await;
        assert_eq!(report["outcome"], "accepted", "{report}");
        assert_eq!(report["status"], "cancelled", "{report}");
        assert_eq!(cancels_sent(&sim, &target.id), 1);
        app.stop().await;
    }
}
