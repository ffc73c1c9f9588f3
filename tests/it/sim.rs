//! The provider simulator over real HTTP on 127.0.0.1: API shapes, cancel
//! error codes, idempotency, auth, faults, event pagination, and that the
//! deliveries it sends verify with cancelwatch's own verification code.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use cancelwatch::providers::{juice, stripe};
use serde_json::{json, Value};

use crate::support::config::{BUSINESS_ID, JUICE_KEY, STRIPE_KEY, WEBHOOK_SECRET};
use crate::support::db::{self, TestDb};
use crate::support::receiver::TestReceiver;
use crate::support::sim::{
    app_with_simulator, simulator as sim, DeliveryOptions, Provider, Scenario, Simulator,
};
use crate::support::{both_engines, wait_until, TestConfig};

/// A stand-in daemon for the simulator to deliver to; its URL.
async fn receiver() -> (Option<String>, TestReceiver) {
    let r = TestReceiver::start().await;
    (Some(r.url().to_string()), r)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn stripe_call(
    sim: &Simulator,
    method: reqwest::Method,
    path: &str,
    idempotency_key: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut req = http()
        .request(method, format!("{}{path}", sim.base_url()))
        .bearer_auth(STRIPE_KEY)
        .header("Stripe-Version", "2026-10-14.preview")
        .header("Stripe-Context", "acct_sim");
    if let Some(k) = idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap())
}

async fn stripe_get(sim: &Simulator, path: &str) -> (StatusCode, Value) {
    let (s, _, v) = stripe_call(sim, reqwest::Method::GET, path, None).await;
    (s, v)
}

async fn stripe_post(sim: &Simulator, path: &str, key: Option<&str>) -> (StatusCode, Value) {
    let (s, _, v) = stripe_call(sim, reqwest::Method::POST, path, key).await;
    (s, v)
}

async fn juice_call(
    sim: &Simulator,
    method: reqwest::Method,
    path: &str,
    auth: &str,
) -> (StatusCode, Value) {
    let resp = http()
        .request(method, format!("{}{path}", sim.base_url()))
        .header("Authorization", auth)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap())
}

/// Plays the first `n` steps of a fresh scenario; returns it.
async fn play_first(sim: &Simulator, name: &str, n: usize) -> Scenario {
    let scenario = sim.scenario(name).unwrap();
    for step in scenario.steps.iter().take(n) {
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
    }
    scenario
}

fn first_id(s: &Scenario) -> String {
    s.expect.histories[0].id.clone()
}

#[tokio::test]
async fn outbound_transfer_shape_and_auth() {
    let sim = sim(None).await;
    let s = play_first(&sim, "outbound_transfer_canceled", 1).await;
    let id = first_id(&s);
    let path = format!("/v2/money_management/outbound_transfers/{id}");
    let (status, t) = stripe_get(&sim, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(t["id"], id.as_str());
    assert_eq!(t["object"], "v2.money_management.outbound_transfer");
    assert_eq!(t["status"], "processing");
    assert_eq!(t["cancelable"], true);
    assert_eq!(t["amount"], json!({"value": 12_500, "currency": "usd"}));
    for field in [
        "created",
        "delivery_options",
        "description",
        "expected_arrival_date",
        "from",
        "to",
        "livemode",
        "metadata",
        "receipt_url",
        "statement_descriptor",
        "status_details",
        "trace_id",
    ] {
        assert!(t.get(field).is_some(), "missing {field}");
    }
    for field in ["canceled_at", "failed_at", "posted_at", "returned_at"] {
        assert!(t["status_transitions"][field].is_null(), "{field}");
    }

    let url = format!("{}{path}", sim.base_url());
    let no_auth = http()
        .get(&url)
        .header("Stripe-Version", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status(), StatusCode::UNAUTHORIZED);
    let body: Value = no_auth.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let wrong = http()
        .get(&url)
        .bearer_auth("sk_test_wrong")
        .header("Stripe-Version", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let no_version = http()
        .get(&url)
        .bearer_auth(STRIPE_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(no_version.status(), StatusCode::BAD_REQUEST);

    let (status, body) =
        stripe_get(&sim, "/v2/money_management/outbound_transfers/obt_missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "not_found");

    // Requests are recorded with the Authorization value hidden.
    let recorded = sim.requests();
    let first = recorded.iter().find(|r| r.path == path).unwrap();
    assert_eq!(first.method, "GET");
    assert_eq!(first.header("Authorization"), Some("present"));
    assert_eq!(first.header("stripe-version"), Some("2026-10-14.preview"));
    assert_eq!(first.header("stripe-context"), Some("acct_sim"));
}

#[tokio::test]
async fn outbound_transfer_cancel_codes_and_idempotency() {
    let (target, rx) = receiver().await;
    let sim = sim(target).await;
    let s = play_first(&sim, "outbound_transfer_canceled", 1).await;
    let id = first_id(&s);
    let cancel = format!("/v2/money_management/outbound_transfers/{id}/cancel");

    let (status, t) = stripe_post(&sim, &cancel, Some("ik-1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(t["status"], "canceled");
    assert_eq!(t["cancelable"], false);
    assert!(t["status_transitions"]["canceled_at"].is_string());

    let (status, replay) = stripe_post(&sim, &cancel, Some("ik-1")).await;
    assert_eq!(status, StatusCode::OK, "same key, same path replays");
    assert_eq!(replay, t);

    let (status, again) = stripe_post(&sim, &cancel, Some("ik-2")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(again["error"]["code"], "outbound_transfer_already_canceled");

    let other = play_first(&sim, "outbound_transfer_canceled", 1).await;
    let other_cancel = format!(
        "/v2/money_management/outbound_transfers/{}/cancel",
        first_id(&other)
    );
    let (status, conflict) = stripe_post(&sim, &other_cancel, Some("ik-1")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(conflict["error"]["code"], "idempotency_error");

    let (status, missing) = stripe_post(
        &sim,
        "/v2/money_management/outbound_transfers/obt_missing/cancel",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "not_found");

    // The cancel sent a signed `canceled` thin event to the target.
    wait_until(
        "the canceled event arrives",
        Duration::from_secs(10),
        || async {
            rx.received().iter().any(|c| {
                let v = c.json();
                v["type"] == "v2.money_management.outbound_transfer.canceled"
                    && v["related_object"]["id"] == id.as_str()
            })
        },
    )
    .await;
    assert!(sim.wait_background(Duration::from_secs(10)).await);
    assert!(sim.background_errors().is_empty());
}

#[tokio::test]
async fn lost_race_posts_and_refuses_the_cancel() {
    let sim = sim(None).await;
    let s = play_first(&sim, "outbound_transfer_posted_before_cancel", 1).await;
    let id = first_id(&s);
    let (status, body) = stripe_post(
        &sim,
        &format!("/v2/money_management/outbound_transfers/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "outbound_transfer_not_cancelable");
    let (_, t) = stripe_get(
        &sim,
        &format!("/v2/money_management/outbound_transfers/{id}"),
    )
    .await;
    assert_eq!(t["status"], "posted");
    assert!(t["status_transitions"]["posted_at"].is_string());
    // The scripted "posted" step is then a no-op on the state.
    sim.play_step(&s.steps[1], &DeliveryOptions::default())
        .await
        .unwrap();
    let (_, after) = stripe_get(
        &sim,
        &format!("/v2/money_management/outbound_transfers/{id}"),
    )
    .await;
    assert_eq!(after["status_transitions"], t["status_transitions"]);
}

#[tokio::test]
async fn batch_job_cancel_goes_through_cancelling() {
    let (target, rx) = receiver().await;
    let sim = sim(target).await;
    let s = play_first(&sim, "batch_job_canceled_midway", 1).await;
    let id = first_id(&s);
    let path = format!("/v2/core/batch_jobs/{id}");
    let (status, job) = stripe_get(&sim, &path).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["object"], "v2.core.batch_job");
    assert_eq!(job["status"], "in_progress");
    assert_eq!(job["status_details"]["in_progress"]["success_count"], "30");
    assert_eq!(job["status_details"]["in_progress"]["failure_count"], "2");

    let (status, job) = stripe_post(&sim, &format!("{path}/cancel"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["status"], "cancelling");
    let (status, again) = stripe_post(&sim, &format!("{path}/cancel"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(again["error"]["code"], "batch_api_non_cancellable_job");

    wait_until(
        "the job reaches canceled",
        Duration::from_secs(10),
        || async { stripe_get(&sim, &path).await.1["status"] == "canceled" },
    )
    .await;
    let (_, job) = stripe_get(&sim, &path).await;
    assert_eq!(job["status_details"]["canceled"]["success_count"], "30");
    assert_eq!(job["status_details"]["canceled"]["failure_count"], "2");

    assert!(sim.wait_background(Duration::from_secs(10)).await);
    let types: Vec<String> = rx
        .received()
        .iter()
        .map(|c| c.json()["type"].to_string())
        .collect();
    let count = |t: &str| types.iter().filter(|x| x.as_str() == t).count();
    // One `updated` from the scripted step, then `updated` and `canceled` from the cancel.
    assert_eq!(count("\"v2.core.batch_job.updated\""), 2);
    assert_eq!(count("\"v2.core.batch_job.canceled\""), 1);

    let (status, missing) =
        stripe_post(&sim, "/v2/core/batch_jobs/batchv2_nope/cancel", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "batch_job_not_found");
}

#[tokio::test]
async fn juice_partial_cancellation_over_the_api() {
    let (target, rx) = receiver().await;
    let sim = sim(target).await;
    let s = play_first(&sim, "juice_partial_cancellation", 1).await;
    let id = first_id(&s);
    let path = format!("/bulk-transfers/{id}");
    for auth in [JUICE_KEY.to_string(), format!("Bearer {JUICE_KEY}")] {
        let (status, body) = juice_call(&sim, reqwest::Method::GET, &path, &auth).await;
        assert_eq!(status, StatusCode::OK);
        let bulk = &body["data"];
        assert_eq!(bulk["id"], id.as_str());
        assert_eq!(bulk["status"], "executing");
        assert_eq!(bulk["total_transfer_count"], 4);
        let statuses: Vec<&str> = bulk["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["status"].as_str().unwrap())
            .collect();
        assert_eq!(
            statuses,
            vec!["pending", "pending", "processing", "completed"]
        );
        let updated = bulk["updated_at"].as_str().unwrap();
        assert!(!updated.ends_with('Z') && !updated.contains('+'));
        for field in [
            "reference",
            "description",
            "owner",
            "created_at",
            "expires_at",
        ] {
            assert!(bulk.get(field).is_some(), "missing {field}");
        }
    }
    let (status, body) = juice_call(&sim, reqwest::Method::GET, &path, "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["code"].is_string());

    let (status, body) = juice_call(
        &sim,
        reqwest::Method::POST,
        &format!("{path}/cancel"),
        JUICE_KEY,
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["code"], "partial_cancellation");
    assert!(body["error"]["details"].is_object());
    let (_, now) = juice_call(&sim, reqwest::Method::GET, &path, JUICE_KEY).await;
    assert_eq!(now["data"]["status"], "cancelled", "the state did change");
    assert_eq!(now["data"]["items"][0]["status"], "cancelled");

    let (status, body) = juice_call(
        &sim,
        reqwest::Method::POST,
        &format!("{path}/cancel"),
        JUICE_KEY,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "invalid_state");
    let (status, body) = juice_call(
        &sim,
        reqwest::Method::POST,
        "/bulk-transfers/00000000-0000-0000-0000-000000000000/cancel",
        JUICE_KEY,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "bulk_transfer_not_found");

    // Later the in-flight transfer completes and the cancelled ones are reversed.
    assert!(sim.wait_background(Duration::from_secs(10)).await);
    let (_, settled) = juice_call(&sim, reqwest::Method::GET, &path, JUICE_KEY).await;
    let statuses: Vec<&str> = settled["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        vec!["reversed", "reversed", "completed", "completed"]
    );
    assert!(
        settled["data"]["updated_at"].as_str().unwrap()
            > now["data"]["updated_at"].as_str().unwrap()
    );
    let events: Vec<String> = rx
        .received()
        .iter()
        .map(|c| {
            let v = c.json();
            let keys = vec![BUSINESS_ID.to_string()];
            assert!(juice::checksum::verify(
                v["checksum"].as_str().unwrap(),
                v["event"].as_str().unwrap(),
                &v["data"],
                &keys
            ));
            v["event"].as_str().unwrap().to_string()
        })
        .collect();
    let count = |e: &str| events.iter().filter(|x| *x == e).count();
    assert_eq!(count("bulk_transfer.cancelled"), 1);
    assert_eq!(count("bulk_transfer.transfer.cancelled"), 2);
    assert_eq!(count("bulk_transfer.transfer.reversed"), 2);
    assert_eq!(count("bulk_transfer.transfer.completed"), 1);

    let (status, list) = juice_call(
        &sim,
        reqwest::Method::GET,
        "/bulk-transfers?status=cancelled&limit=10",
        JUICE_KEY,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], id.as_str());
}

#[tokio::test]
async fn faults_errors_rate_limits_hangs_and_outages() {
    let sim = sim(None).await;
    let s = play_first(&sim, "outbound_transfer_canceled", 1).await;
    let path = format!("/v2/money_management/outbound_transfers/{}", first_id(&s));
    let faults = sim.faults();

    faults.fail_next(1, 500);
    let (status, body) = stripe_get(&sim, &path).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(stripe_get(&sim, &path).await.0, StatusCode::OK);

    faults.rate_limit_next(1, 7);
    let (status, headers, body) = stripe_call(&sim, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["retry-after"], "7");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let j = play_first(&sim, "juice_clean_cancellation", 1).await;
    let juice_path = format!("/bulk-transfers/{}", first_id(&j));
    faults.rate_limit_next(1, 3);
    let (status, body) = juice_call(&sim, reqwest::Method::GET, &juice_path, JUICE_KEY).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(body["retry_after"], 3);
    assert!(body["error"]["code"].is_string());

    // A hang longer than the client's timeout makes the request time out.
    faults.hang_next(1, Duration::from_secs(3));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let hung = impatient
        .get(format!("{}{juice_path}", sim.base_url()))
        .header("Authorization", JUICE_KEY)
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    assert_eq!(
        juice_call(&sim, reqwest::Method::GET, &juice_path, JUICE_KEY)
            .await
            .0,
        StatusCode::OK
    );

    faults.refuse_all(true);
    for _ in 0..3 {
        assert_eq!(
            stripe_get(&sim, &path).await.0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let (status, body) = juice_call(&sim, reqwest::Method::GET, &juice_path, JUICE_KEY).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"]["code"].is_string());
    faults.clear();
    assert_eq!(stripe_get(&sim, &path).await.0, StatusCode::OK);
}

#[tokio::test]
async fn event_listing_pages_and_filters() {
    let sim = sim(None).await;
    let since = cancelwatch::time::fmt(chrono::Utc::now() - chrono::Duration::seconds(5));
    let returned = sim.scenario("outbound_transfer_returned").unwrap();
    for step in &returned.steps {
        sim.apply_step(step);
    }
    let canceled = play_first(&sim, "outbound_transfer_canceled", 2).await;
    assert_eq!(sim.event_count(), 5);

    let mut url = format!("/v2/core/events?created%5Bgte%5D={since}&limit=2");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let (status, page) = stripe_get(&sim, &url).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        assert!(page["previous_page_url"].is_null());
        for e in page["data"].as_array().unwrap() {
            assert_eq!(e["object"], "v2.core.event");
            assert!(e["related_object"]["url"]
                .as_str()
                .unwrap()
                .starts_with("/v2/"));
            seen.push(e["id"].as_str().unwrap().to_string());
        }
        match page["next_page_url"].as_str() {
            Some(next) => url = next.to_string(),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(pages, 3);
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5);

    let (_, filtered) = stripe_get(
        &sim,
        &format!(
            "/v2/core/events?object_id={}&types%5B0%5D=v2.money_management.outbound_transfer.returned",
            first_id(&returned)
        ),
    )
    .await;
    let data = filtered["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    let event_id = data[0]["id"].as_str().unwrap();
    let (status, one) = stripe_get(&sim, &format!("/v2/core/events/{event_id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(one, data[0]);

    let future = cancelwatch::time::fmt(chrono::Utc::now() + chrono::Duration::hours(1));
    let (_, none) = stripe_get(&sim, &format!("/v2/core/events?created%5Bgte%5D={future}")).await;
    assert!(none["data"].as_array().unwrap().is_empty());
    assert!(none["next_page_url"].is_null());
    let (status, _) = stripe_get(&sim, "/v2/core/events/evt_missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = stripe_get(&sim, "/v2/core/no_such_thing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    drop(canceled);
}

#[tokio::test]
async fn every_scenario_sends_deliveries_that_verify() {
    let (target, rx) = receiver().await;
    let sim = sim(target).await;
    let opts = DeliveryOptions {
        duplicate: true,
        shuffle: true,
        delay: Duration::ZERO,
    };
    let mut expected = 0;
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).unwrap();
        assert_eq!(scenario.name, *name);
        expected += 2 * scenario
            .steps
            .iter()
            .map(|s| s.deliveries.len())
            .sum::<usize>();
        sim.play(&scenario, &opts).await.unwrap();
        // Each step's state is what the API now shows for its resources.
        let last = scenario.steps.last().unwrap();
        for (id, status) in &last.expect_status {
            let kind = &scenario
                .expect
                .histories
                .iter()
                .find(|h| &h.id == id)
                .unwrap()
                .kind;
            let shown = match kind.as_str() {
                "stripe.outbound_transfer" => stripe_get(
                    &sim,
                    &format!("/v2/money_management/outbound_transfers/{id}"),
                )
                .await
                .1["status"]
                    .clone(),
                "stripe.batch_job" => stripe_get(&sim, &format!("/v2/core/batch_jobs/{id}"))
                    .await
                    .1["status"]
                    .clone(),
                "juice.bulk_transfer" => juice_call(
                    &sim,
                    reqwest::Method::GET,
                    &format!("/bulk-transfers/{id}"),
                    JUICE_KEY,
                )
                .await
                .1["data"]["status"]
                    .clone(),
                _ => continue,
            };
            assert_eq!(shown, status.as_str(), "{name} {id}");
        }
    }
    let captured = rx.received();
    assert_eq!(captured.len(), expected);
    let now = chrono::Utc::now().timestamp();
    for c in &captured {
        match c.provider() {
            "stripe" => {
                let header = c.header("stripe-signature").expect("Stripe-Signature");
                stripe::signature::verify(header, &c.body, &[WEBHOOK_SECRET.into()], 300, now)
                    .unwrap();
                assert!(stripe::signature::verify(
                    header,
                    &c.body,
                    &["whsec_other".into()],
                    300,
                    now
                )
                .is_err());
                let v: Value = serde_json::from_slice(&c.body).unwrap();
                assert_eq!(v["context"], "acct_sim");
            }
            "juice" => {
                let v: Value = serde_json::from_slice(&c.body).unwrap();
                let checksum = v["checksum"].as_str().unwrap();
                assert!(juice::checksum::verify(
                    checksum,
                    v["event"].as_str().unwrap(),
                    &v["data"],
                    &[BUSINESS_ID.into()]
                ));
                assert!(!juice::checksum::verify(
                    checksum,
                    v["event"].as_str().unwrap(),
                    &v["data"],
                    &["other".into()]
                ));
            }
            other => panic!("unexpected provider {other}"),
        }
    }
    // Every Stripe event of the scenarios can be fetched back.
    for c in captured.iter().filter(|c| c.provider() == "stripe") {
        let v: Value = serde_json::from_slice(&c.body).unwrap();
        let (status, _) = stripe_get(
            &sim,
            &format!("/v2/core/events/{}", v["id"].as_str().unwrap()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test]
async fn deliveries_are_retried_and_refusals_reported() {
    let (target, rx) = receiver().await;
    rx.answer_first(&[503, 503]);
    let sim = sim(target).await;
    let s = sim.scenario("outbound_transfer_canceled").unwrap();
    sim.play_step(&s.steps[0], &DeliveryOptions::default())
        .await
        .unwrap();
    let captured = rx.received();
    assert_eq!(captured.len(), 3, "two 503s, then accepted");
    assert!(captured.iter().all(|c| c.body == captured[0].body));
    let now = chrono::Utc::now().timestamp();
    for c in &captured {
        stripe::signature::verify(
            c.header("stripe-signature").unwrap(),
            &c.body,
            &[WEBHOOK_SECRET.into()],
            300,
            now,
        )
        .unwrap();
    }

    let (refusing, rx) = receiver().await;
    rx.answer_then(401);
    let sim = self::sim(refusing).await;
    let s = sim.scenario("juice_clean_cancellation").unwrap();
    assert_eq!(s.steps[0].deliveries[0].provider, Provider::Juice);
    let err = sim
        .play_step(&s.steps[0], &DeliveryOptions::default())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("401"), "{err:#}");
}

both_engines! {
    /// The real daemon's ingress accepts every delivery the simulator sends, and
    /// takes each in exactly once even when sent twice.
    #[tokio::test]
    async fn real_daemon_accepts_every_delivery_once(engine) {
        let (sim, app) = app_with_simulator(TestConfig::on(engine).await).await;
        let opts = DeliveryOptions {
            duplicate: true,
            ..DeliveryOptions::default()
        };
        for name in Simulator::scenario_names() {
            let scenario = sim.scenario(name).unwrap();
            sim.play(&scenario, &opts).await.unwrap();
        }
        let generated = sim.event_count();

        let stopped = TestDb::of(&app.stop().await);
        assert_eq!(db::refusals(&stopped).await.len(), 0);
        assert_eq!(db::delivery_count(&stopped).await as usize, generated);
    }
}
