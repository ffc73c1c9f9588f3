//! The catch-up on its own: a daemon that was down takes in, from Stripe's
//! event list, what it missed; an event Stripe failed to generate is
//! fetched once Stripe says so; a provider unreachable at start delays the
//! catch-up, never the webhooks.

use super::WAIT;
use crate::support::both_engines;
use crate::support::db::{self, Database};
use crate::support::sim::{
    app_with_simulator, wait_step, DeliveryOptions, Simulator, STRIPE_CONTEXT,
};
use crate::support::Engine;
use crate::support::{wait_until, TestApp, TestConfig};

/// Quick workers, with the catch-up on (once at start: its interval is
/// longer than any test).
async fn catching_up(engine: Engine) -> TestConfig {
    TestConfig::on(engine).await.quick_workers().with(|c| {
        c.backfill.enabled = true;
        c.backfill.interval_secs = 3_600;
    })
}

/// Waits until the resource `id` is in `status`, then returns the trigger
/// of its last transition.
async fn last_trigger_once(db: &impl Database, id: &str, status: &str) -> (String, Option<String>) {
    wait_until(&format!("{id} is {status}"), WAIT, || async {
        db::status_of(db, id).await.as_deref() == Some(status)
    })
    .await;
    let last = db::transitions_of(db, id).await.pop().unwrap();
    (last.trigger_type, last.trigger_id)
}

both_engines! {
    /// While the daemon is down, an outbound transfer posts and comes back; no
    /// one runs a backfill. Started again, the daemon lists the events it
    /// missed in the account context it knows and records where they led.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_daemon_that_was_down_catches_up_on_its_own(engine) {
        let (sim, app) = app_with_simulator(catching_up(engine).await).await;
        let scenario = sim.scenario("outbound_transfer_returned").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), &scenario.steps[0]).await;
        let config = app.stop().await;

        for step in &scenario.steps[1..] {
            sim.apply_step(step);
        }
        let app = TestApp::start(config).await;
        let id = &scenario.expect.histories[0].id;
        let (trigger, _) = last_trigger_once(app.db(), id, "returned").await;
        assert_eq!(trigger, "backfill");
        let missed: Vec<String> = scenario.steps[1..]
            .iter()
            .map(|s| s.deliveries[0].event_id().unwrap().to_string())
            .collect();
        for key in &missed {
            let d = db::delivery(app.db(), key).await.expect("taken in");
            assert_eq!(d.source, "backfill");
        }
        let refunds = db::refunds_under(app.db(), id).await;
        assert_eq!(refunds[0].status, "completed");
        // Listed in the account context the first delivery came from.
        assert!(listings(&sim, Some(STRIPE_CONTEXT)) > 0);
        app.stop().await;
    }
}

both_engines! {
    /// Stripe failed to generate the event of a batch job's cancel; later it
    /// says so with `v2.core.health.event_generation_failure.resolved`, whose
    /// `data.impact` names the job: the daemon fetches the job.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_event_stripe_failed_to_generate_is_made_up_for(engine) {
        let (sim, app) = app_with_simulator(TestConfig::on(engine).await.quick_workers()).await;
        let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
        for step in &scenario.steps[..2] {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
            wait_step(app.db(), step).await;
        }
        let notice = sim.fail_event_generation(&scenario.steps[2]);
        sim.deliver(&notice).await.unwrap();
        let id = &scenario.expect.histories[0].id;
        let (trigger, trigger_id) = last_trigger_once(app.db(), id, "canceled").await;
        assert_eq!(trigger, "event");
        assert_eq!(trigger_id.as_deref(), notice.event_id());
        let looked_up = sim.requests().into_iter().any(|r| {
            r.method == "GET" && r.path == format!("/v2/core/events/{}", notice.event_id().unwrap())
        });
        assert!(looked_up, "the notice was fetched for its data");
        let alerts = db::alerts(app.db()).await;
        assert!(
            alerts
                .iter()
                .any(|a| a.rule == "partial_cancellation" && a.resource_id == *id),
            "the job was cancelled after 32 records: {alerts:?}"
        );
        app.stop().await;
    }
}

both_engines! {
    /// The provider refuses every call when the daemon starts: webhooks are
    /// still taken in at once, and once the provider answers again, the
    /// catch-up (tried again with backoff) takes in what was missed meanwhile
    /// in the account context the webhook came from.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_unreachable_provider_delays_the_catch_up_not_the_webhooks(engine) {
        let sim = crate::support::sim::simulator(None).await;
        sim.faults().refuse_all(true);
        let app = TestApp::start(catching_up(engine).await.provider_apis(&sim.base_url())).await;
        wait_until("a catch-up was refused", WAIT, || async {
            listings(&sim, None) > 0
        })
        .await;
        let (delivered, missed) = (
            sim.scenario("outbound_transfer_canceled").unwrap(),
            sim.scenario("batch_job_canceled_clean").unwrap(),
        );
        apply_all(&sim, &missed);
        let started = tokio::time::Instant::now();
        assert!(
            post(&app, &delivered.steps[0].deliveries[0]).await,
            "a webhook is acknowledged while the provider is down"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        apply_all(&sim, &delivered);
        // The catch-up, tried again, now lists the webhook's context too.
        wait_until("a catch-up in the webhook's context", WAIT, || async {
            listings(&sim, Some(STRIPE_CONTEXT)) > 0
        })
        .await;
        assert_eq!(
            db::status_of(app.db(), &missed.expect.histories[0].id).await,
            None
        );

        sim.faults().refuse_all(false);
        let job = &missed.expect.histories[0].id;
        let (trigger, _) = last_trigger_once(app.db(), job, "canceled").await;
        assert_eq!(trigger, "backfill");
        let transfer = &delivered.expect.histories[0].id;
        wait_until("the delivered transfer is recorded", WAIT, || async {
            db::status_of(app.db(), transfer).await.is_some()
        })
        .await;
        app.stop().await;
    }
}

/// The event listings the simulator was asked for in `context`.
fn listings(sim: &Simulator, context: Option<&str>) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.path.starts_with("/v2/core/events?") && r.header("stripe-context") == context)
        .count()
}

/// Posts one delivery to the daemon as its provider would; true on a 2xx.
async fn post(app: &TestApp, d: &crate::support::sim::Delivery) -> bool {
    crate::support::sim::post_delivery(app.client(), &app.url, d).await
}

/// Applies every step of a scenario in the simulator, sending nothing.
fn apply_all(sim: &Simulator, scenario: &crate::support::sim::Scenario) {
    for step in &scenario.steps {
        sim.apply_step(step);
    }
}
