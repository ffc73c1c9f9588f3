//! Juice where it leaves the happy path, a real daemon against the
//! simulator: items in the documented shape (no `id`), in both shapes, and
//! with no key at all.

use serde_json::{json, Value};

use super::{play, WAIT};
use crate::support::config::{BUSINESS_ID, JUICE_KEY};
use crate::support::db::{self, Database};
use crate::support::sim::{app_with_simulator, Delivery, DeliveryOptions, Simulator};
use crate::support::{wait_until, TestApp, TestConfig};

const TOKEN: &str = "juice-test-admin-token";

/// A daemon with quick workers and the `/v1` API on, and its simulator.
async fn start_pair() -> (Simulator, TestApp) {
    let config = TestConfig::new()
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

/// The ids of the transfers recorded under bulk transfer `bulk`.
async fn items_of(db: &impl Database, bulk: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT id FROM resources WHERE kind = 'juice.transfer' AND parent_id = ? ORDER BY id",
    )
    .bind(bulk)
    .fetch_all(db.reader())
    .await
    .unwrap()
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

/// Juice documents bulk-transfer items without an `id`: each is recorded
/// under `<bulk id>:<reference>`, with its transitions, refund and its part
/// in the partial-cancellation alert; served later with its id, it stays the
/// same resource (and is found by either key), and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn items_without_an_id_are_recorded_and_stay_one_resource_in_either_shape() {
    let (sim, app) = start_pair().await;

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

/// An item with neither an id nor a reference cannot be a resource of its
/// own: it stays in its bulk transfer's snapshot, and is counted and logged
/// once per bulk transfer, however often the bulk transfer is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_item_with_no_key_is_kept_in_the_snapshot_and_counted_once() {
    use cancelwatch_sim::state::{BulkItem, BulkTransfer};
    let (sim, app) = start_pair().await;
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
    let kept = snapshot["items"].as_array().unwrap();
    assert_eq!(kept.len(), 2, "{snapshot}");
    assert!(kept
        .iter()
        .any(|i| i["amount"] == 700 && i.get("reference").is_none()));
    assert_eq!(app.metric(series).await, before + 1);
    app.stop().await;
}
