//! Stripe off the happy path, with the real daemon against the simulator:
//! a return whose webhook is lost, money that comes back in another
//! currency than it was presented in, errors named by their type, a
//! repeated cancel, `Retry-After` as a date, an object named without an
//! id, a batch job's time.

use std::time::Duration;

use serde_json::{json, Value};

use super::{play, WAIT};
use crate::support::both_engines;
use crate::support::db;
use crate::support::sim::{
    app_with_simulator, singleton_event, wait_step, DeliveryOptions, Simulator,
};
use crate::support::Engine;
use crate::support::{wait_for, wait_until, TestApp, TestConfig};

/// The admin token of the daemons whose `/v1` a test reads.
const TOKEN: &str = "adm-stripe-trail-0123456789abcdef0123";

both_engines! {
    /// An outbound transfer presented in euros and paid from a dollar account
    /// comes back returned: the refund is the dollars that left the account,
    /// and the presented euros are kept beside it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_return_gives_back_what_left_the_account(engine) {
        let config = TestConfig::on(engine).await
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
}

both_engines! {
    /// A posted outbound transfer is still watched for a return: when it comes
    /// back `returned` and that webhook is lost, the reconciler finds it, with
    /// its refund.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_return_whose_webhook_is_lost_is_still_recorded(engine) {
        let config = TestConfig::on(engine).await.quick_workers().with(|c| {
            c.reconcile.interval_secs = 1;
            c.stripe.return_watch_interval_secs = 1;
        });
        let (sim, app) = app_with_simulator(config).await;
        let scenario = sim.scenario("outbound_transfer_returned").unwrap();
        let (created, posted, returned) = (&scenario.steps[0], &scenario.steps[1], &scenario.steps[2]);
        for step in [created, posted] {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
            wait_step(app.db(), step).await;
        }
        // The transfer comes back; its webhook never arrives.
        sim.apply_step(returned);
        let id = &scenario.expect.histories[0].id;
        wait_until("the return is recorded with its refund", WAIT, || async {
            let refunds = db::refunds_under(app.db(), id).await;
            db::status_of(app.db(), id).await.as_deref() == Some("returned")
                && refunds.iter().any(|r| r.status == "completed")
        })
        .await;
        let ts = db::transitions_of(app.db(), id).await;
        let to: Vec<&str> = ts.iter().map(|t| t.to_status.as_str()).collect();
        assert_eq!(to, ["processing", "posted", "returned"]);
        assert_eq!(ts[2].trigger_type, "reconcile");
        let refund = &db::refunds_under(app.db(), id).await[0];
        assert_eq!(
            (
                refund.reason.as_str(),
                refund.amount,
                refund.currency.as_deref()
            ),
            ("returned", Some(8_640), Some("usd"))
        );
        let resource = db::resource(app.db(), "stripe.outbound_transfer", id)
            .await
            .unwrap();
        assert!(resource.next_reconcile_at.is_none(), "returned is final");
        app.stop().await;
    }
}

/// A daemon whose `/v1` answers [`TOKEN`], with the simulator.
async fn start_with_api(engine: Engine) -> (Simulator, TestApp) {
    let config = TestConfig::on(engine)
        .await
        .quick_workers()
        .with(|c| c.server.admin_token = TOKEN.into());
    app_with_simulator(config).await
}

/// `POST /v1/cancellations` of `kind`/`id`: the cancel report.
async fn cancel(app: &TestApp, kind: &str, id: &str) -> Value {
    let body = json!({"kind": kind, "id": id});
    let (status, report) = app.post("/v1/cancellations", Some(body), Some(TOKEN)).await;
    // 201 accepted, 200 already done, 409 refused: the report says which.
    assert!(matches!(status, 200 | 201 | 409), "{status}: {report}");
    report
}

both_engines! {
    /// A batch job cancelled again once it is `canceled` is already cancelled;
    /// Stripe answers such a cancel with the job as it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_batch_job_cancelled_twice_is_already_cancelled(engine) {
        let (sim, app) = start_with_api(engine).await;
        let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), &scenario.steps[0]).await;
        let id = &scenario.expect.histories[0].id;
        let first = cancel(&app, "stripe.batch_job", id).await;
        assert_eq!(first["outcome"], "accepted", "{first}");
        assert!(sim.wait_background(WAIT).await);
        wait_until("the job is canceled", WAIT, || async {
            db::status_of(app.db(), id).await.as_deref() == Some("canceled")
        })
        .await;
        let again = cancel(&app, "stripe.batch_job", id).await;
        assert_eq!(again["outcome"], "already_cancelled", "{again}");
        assert_eq!(again["status"], "canceled");
        let requests = db::cancel_requests(app.db(), "stripe.batch_job", id).await;
        let outcomes: Vec<_> = requests.iter().map(|r| r.outcome.clone()).collect();
        assert_eq!(
            outcomes,
            [Some("accepted".into()), Some("already_cancelled".into())]
        );
        app.stop().await;
    }
}

both_engines! {
    /// Stripe's v2 errors may be named by their type alone: a reused
    /// idempotency key (400, type `idempotency_error`, no code) is a burnt key,
    /// and the next cancel goes with a new one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_error_named_by_its_type_alone_is_understood(engine) {
        let (sim, app) = start_with_api(engine).await;
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        sim.play_step(&scenario.steps[0], &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), &scenario.steps[0]).await;
        let id = &scenario.expect.histories[0].id;
        sim.faults().idempotency_conflict_next(1);
        let refused = cancel(&app, "stripe.outbound_transfer", id).await;
        assert_eq!(refused["outcome"], "idempotency_conflict", "{refused}");
        assert_eq!(refused["error_code"], "idempotency_error");
        let again = cancel(&app, "stripe.outbound_transfer", id).await;
        assert_eq!(again["outcome"], "accepted", "{again}");
        assert_eq!(again["status"], "canceled");
        assert_ne!(again["idempotency_key"], refused["idempotency_key"]);
        app.stop().await;
    }
}

both_engines! {
    /// A 429 whose `Retry-After` is an HTTP date is waited out: the delivery is
    /// fetched again no sooner than that date, and the wait costs no attempt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn retry_after_as_a_date_is_honoured(engine) {
        let (sim, app) = app_with_simulator(TestConfig::on(engine).await.quick_workers()).await;
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        let step = &scenario.steps[0];
        // Dates have whole seconds: three seconds ahead is more than two away
        // (less a millisecond the due time may be rounded down by).
        sim.faults().rate_limit_next_until_date(1, 3);
        let started = tokio::time::Instant::now();
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), step).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1_990),
            "fetched again after {took:?}"
        );
        let delivery = &db::deliveries(app.db()).await[0];
        assert_eq!(delivery.attempts, 1, "the wait used up no attempt");
        app.stop().await;
    }
}

both_engines! {
    /// A correctly signed event whose `related_object` has no id (the singleton
    /// form `{type, url}`) is taken in, and ignored with the reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_event_about_a_singleton_is_stored_and_ignored_with_the_reason(engine) {
        let (sim, app) = app_with_simulator(TestConfig::on(engine).await.quick_workers()).await;
        let event = singleton_event(
            "v2.core.workspace.updated",
            "v2.core.workspace",
            "/v2/core/workspace",
        );
        sim.deliver(&event).await.unwrap();
        let key = event.event_id().unwrap().to_string();
        let ignored = wait_for("the event to be ignored", WAIT, || async {
            db::delivery(app.db(), &key)
                .await
                .filter(|d| d.state == "ignored")
        })
        .await;
        assert_eq!(ignored.resource_id, None);
        assert_eq!(
            ignored.last_error.as_deref(),
            Some("event type v2.core.workspace.updated is not followed")
        );
        app.stop().await;
    }
}

both_engines! {
    /// A batch job carries no time of its status: each transition takes the
    /// time of the event that caused its fetch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_batch_job_transition_has_the_time_of_its_event(engine) {
        let (sim, app) = app_with_simulator(TestConfig::on(engine).await.quick_workers()).await;
        let scenario = sim.scenario("batch_job_canceled_midway").unwrap();
        play(&sim, app.db(), &scenario, &DeliveryOptions::default()).await;
        let id = &scenario.expect.histories[0].id;
        let transitions = db::transitions_of(app.db(), id).await;
        assert_eq!(transitions.len(), scenario.steps.len());
        for t in transitions {
            let event = scenario
                .steps
                .iter()
                .flat_map(|step| &step.deliveries)
                .find(|d| d.event_id() == t.trigger_id.as_deref())
                .expect("each transition was caused by an event of the scenario");
            let created = event.body["created"].as_str().unwrap();
            let created = cancelwatch::time::parse_lenient(created).map(cancelwatch::time::fmt);
            assert_eq!(t.provider_at, created, "{}", t.to_status);
        }
        app.stop().await;
    }
}

both_engines! {
    /// A signed event whose `related_object.url` would leave `/v2/` once the
    /// server decodes it, or names another object, is fetched at its own
    /// object's path instead: the provider never sees the tampered path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_related_object_url_is_followed_only_to_its_own_object(engine) {
        let (sim, app) = app_with_simulator(TestConfig::on(engine).await.quick_workers()).await;
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        sim.apply_step(&scenario.steps[0]);
        let id = scenario.expect.histories[0].id.clone();
        for (n, url) in [
            "/v2/%2e%2e/v1/charges".to_string(),
            "/v2/money_management/outbound_transfers/obt_someone_else".to_string(),
        ]
        .iter()
        .enumerate()
        {
            let body = serde_json::to_vec(&json!({
                "id": format!("evt_tampered_{n}"),
                "object": "v2.core.event",
                "type": "v2.money_management.outbound_transfer.updated",
                "created": "2026-10-30T12:00:00.000Z",
                "livemode": false,
                "related_object": {"id": id, "type": "v2.money_management.outbound_transfer", "url": url},
            }))
            .unwrap();
            let (status, _) = app.post_stripe(&body).await;
            assert_eq!(status, 200);
        }
        let own = format!("/v2/money_management/outbound_transfers/{id}");
        wait_until("both deliveries are fetched", WAIT, || async {
            sim.requests()
                .iter()
                .filter(|r| r.method == "GET" && r.path == own)
                .count()
                >= 2
        })
        .await;
        let strays: Vec<String> = sim
            .requests()
            .into_iter()
            .map(|r| r.path)
            .filter(|p| p.contains("%2e") || p.starts_with("/v1") || p.contains("someone_else"))
            .collect();
        assert!(strays.is_empty(), "{strays:?}");
        app.stop().await;
    }
}
