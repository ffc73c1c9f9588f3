//! The provider simulator (Stripe and Juice APIs that deliver signed
//! webhooks): the one place the tests take it from.

pub use cancelwatch_sim::state::STRIPE_CONTEXT;
pub use cancelwatch_sim::{
    Delivery, DeliveryOptions, Expectation, ExpectedHistory, Provider, Scenario, SimConfig,
    Simulator, Step,
};

use std::time::Duration;

use cancelwatch::providers::{juice, stripe};

use super::config::{TestConfig, BUSINESS_ID, JUICE_KEY, STRIPE_KEY, WEBHOOK_SECRET};
use super::daemon::{Address, TestApp};
use super::db::{self, Database};
use super::wait::poll_until;

/// A simulator's settings with the test keys, delivering to `target` (or
/// to nobody: the test sends its deliveries itself).
pub fn sim_config(target: Option<String>) -> SimConfig {
    SimConfig {
        stripe_api_key: STRIPE_KEY.into(),
        juice_api_key: JUICE_KEY.into(),
        stripe_webhook_secret: WEBHOOK_SECRET.into(),
        juice_checksum_key: BUSINESS_ID.into(),
        target,
    }
}

/// A simulator on a free loopback port with the test keys.
pub async fn simulator(target: Option<String>) -> Simulator {
    simulator_with(sim_config(target)).await
}

pub async fn simulator_with(config: SimConfig) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(listener, config).await.unwrap()
}

/// A daemon whose provider APIs are a simulator that delivers to it, ready.
pub async fn app_with_simulator(config: TestConfig) -> (Simulator, TestApp) {
    let address = Address::bind().await;
    let sim = simulator(Some(address.url.clone())).await;
    let app = address.start(config.provider_apis(&sim.base_url())).await;
    (sim, app)
}

/// `copies` instances of every scenario, moved to their final state in the
/// simulator without sending anything; their deliveries, to be sent by the test.
pub fn final_states(sim: &Simulator, copies: usize) -> (Vec<Scenario>, Vec<Delivery>) {
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

/// A Stripe event about an outbound transfer the provider never had.
pub fn unknown_outbound_transfer(id: &str) -> Delivery {
    Delivery::stripe(cancelwatch_sim::state::thin_event(
        "v2.money_management.outbound_transfer.updated",
        "v2.money_management.outbound_transfer",
        id,
        &cancelwatch_sim::state::outbound_transfer_path(id),
    ))
}

/// A Stripe event about a singleton object: its `related_object` is
/// `{type, url}`, with no id.
pub fn singleton_event(event_type: &str, object_type: &str, url: &str) -> Delivery {
    let mut event = cancelwatch_sim::state::thin_event(event_type, object_type, "", url);
    event["related_object"]
        .as_object_mut()
        .unwrap()
        .remove("id");
    Delivery::stripe(event)
}

/// The daemon's dedupe key of a delivery.
pub fn dedupe_key(d: &Delivery) -> String {
    match d.provider {
        Provider::Stripe => d.event_id().unwrap().to_string(),
        Provider::Juice => format!(
            "{}:{}",
            d.event_type(),
            d.body["checksum"].as_str().unwrap().to_lowercase()
        ),
    }
}

/// Posts a delivery to the daemon at `url` as its provider would, signed
/// now; true on a 2xx.
pub async fn post_delivery(client: &reqwest::Client, url: &str, d: &Delivery) -> bool {
    acknowledge(client, url, d).await.is_some()
}

/// Posts a delivery as [`post_delivery`] does; on a 2xx, the answer
/// (`{"received": true, "duplicate": …}`).
pub async fn acknowledge(
    client: &reqwest::Client,
    url: &str,
    d: &Delivery,
) -> Option<serde_json::Value> {
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
    let answer = req.body(body).send().await.ok()?;
    if !answer.status().is_success() {
        return None;
    }
    answer.json().await.ok()
}

/// Waits (up to 20 s) until the daemon has nothing left to process and
/// every status `step` expects is reached.
pub async fn wait_step(db: &impl Database, step: &Step) {
    let reached = poll_until(Duration::from_secs(20), || async {
        let mut done = db::unfinished_deliveries(db).await == 0;
        for (id, want) in &step.expect_status {
            done &= db::status_of(db, id).await.as_deref() == Some(want.as_str());
        }
        done
    })
    .await;
    if !reached {
        let mut statuses = Vec::new();
        for (id, want) in &step.expect_status {
            statuses.push((id.clone(), want.clone(), db::status_of(db, id).await));
        }
        let inbox: Vec<_> = db::deliveries(db)
            .await
            .into_iter()
            .map(|d| (d.dedupe_key, d.state, d.last_error))
            .collect();
        panic!(
            "step {:?} not reached: statuses {statuses:?}; inbox {inbox:?}",
            step.label
        );
    }
}
