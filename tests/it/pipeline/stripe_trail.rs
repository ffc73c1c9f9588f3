//! Stripe off the happy path, with the real daemon against the simulator:
//! money that comes back in another currency than it was presented in.

use serde_json::json;

use super::play;
use crate::support::db;
use crate::support::sim::{app_with_simulator, DeliveryOptions};
use crate::support::TestConfig;

/// The admin token of the daemons whose `/v1` a test reads.
const TOKEN: &str = "adm-stripe-trail";

/// An outbound transfer presented in euros and paid from a dollar account
/// comes back returned: the refund is the dollars that left the account,
/// and the presented euros are kept beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_return_gives_back_what_left_the_account() {
    let config = TestConfig::new()
        .quick_workers()
        .with(|c| c.server.admin_token = TOKEN.into());
    let (sim, app) = app_with_simulator(config).await;
    let scenario = sim.scenario("outbound_transfer_returned").unwrap();
    play(&sim, app.db(), &scenario, &DeliveryOptions::default()).await;
    let id = &scenario.expect.histories[0].id;
    let refunds = db::refunds_under(app.db(), id).await;
    assert_eq!(refunds.len(), 1);
    let refund = &refunds[0];
    assert_eq!(refund.status, "completed");
    assert_eq!(refund.reason, "returned");
    assert_eq!(
        (refund.amount, refund.currency.as_deref()),
        (Some(8_640), Some("usd"))
    );
    assert_eq!(
        (
            refund.presentment_amount,
            refund.presentment_currency.as_deref()
        ),
        (Some(8_000), Some("eur"))
    );
    // The resource keeps the amount it was presented in; the API shows both.
    let resource = db::resource(app.db(), "stripe.outbound_transfer", id)
        .await
        .unwrap();
    assert_eq!(
        (resource.amount, resource.currency.as_deref()),
        (Some(8_000), Some("eur"))
    );
    let (status, shown) = app.get(&format!("/v1/resources/{id}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{shown}");
    let shown = &shown["resources"][0]["refunds"][0];
    assert_eq!(
        (&shown["amount"], &shown["currency"]),
        (&json!(8_640), &json!("usd"))
    );
    assert_eq!(
        (&shown["presentment_amount"], &shown["presentment_currency"]),
        (&json!(8_000), &json!("eur"))
    );
    app.stop().await;
}
