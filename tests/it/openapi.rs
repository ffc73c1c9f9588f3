//! `/v1/openapi.json` against the live API: every documented operation
//! answers, and what it answers (successes and errors) is what the
//! description says, checked with a JSON Schema validator.

use serde_json::{json, Value};

use crate::support::sim::{app_with_simulator, wait_step, DeliveryOptions};
use crate::support::{TestApp, TestConfig};

const TOKEN: &str = "openapi-admin-token-0123456789abcdef";

/// The schema of the JSON answer `status` of `method path`, standing alone
/// (the description's components beside it, for its references).
fn schema_for(doc: &Value, path: &str, method: &str, status: u16) -> Value {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let answer = &op["responses"][status.to_string()];
    assert!(
        answer.is_object(),
        "{method} {path} answered {status}, which is not documented"
    );
    let mut schema = answer["content"]["application/json"]["schema"].clone();
    assert!(
        schema.is_object(),
        "{method} {path} {status} has no JSON schema"
    );
    schema["components"] = doc["components"].clone();
    schema
}

/// Asserts that `body` is what the description says `method path` answers
/// with `status`.
fn conforms(doc: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let schema = schema_for(doc, path, method, status);
    let validator = jsonschema::validator_for(&schema)
        .unwrap_or_else(|e| panic!("the schema of {method} {path} {status}: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {path} {status} does not match its description: {errors:#?}\n{body:#}"
    );
}

/// The validator's complaints about `body` as answer `status` of
/// `method path`.
fn complaints(doc: &Value, path: &str, method: &str, status: u16, body: &Value) -> usize {
    let schema = schema_for(doc, path, method, status);
    jsonschema::validator_for(&schema)
        .unwrap()
        .iter_errors(body)
        .count()
}

/// A call expected to fail: the documented path and method, the URL, the
/// body, the token and the status.
type ErrorCase<'a> = (
    &'a str,
    &'a str,
    String,
    Option<Value>,
    Option<&'a str>,
    u16,
);

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, Value) {
    let url = format!("/v1{path}");
    match method {
        "get" => app.get(&url, token).await,
        _ => app.post(&url, body, token).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_live_api_answers_as_its_description_says() {
    let config = TestConfig::new()
        .quick_workers()
        .with(|c| c.server.admin_token = TOKEN.into());
    let (sim, app) = app_with_simulator(config).await;
    // A bulk transfer cancelled in part (items, refunds, an alert) and an
    // outbound transfer still processing (to cancel).
    let bulk_story = sim.scenario("juice_partial_cancellation").unwrap();
    for step in &bulk_story.steps {
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), step).await;
    }
    let transfer_story = sim.scenario("outbound_transfer_canceled").unwrap();
    sim.play_step(&transfer_story.steps[0], &DeliveryOptions::default())
        .await
        .unwrap();
    wait_step(app.db(), &transfer_story.steps[0]).await;
    let bulk = bulk_story.expect.histories[0].id.clone();
    let transfer = transfer_story.expect.histories[0].id.clone();

    let (status, doc) = app.get("/v1/openapi.json", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{doc}");
    assert_eq!(doc["servers"][0]["url"], "/v1");
    let documented: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .filter(|m| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
                .map(move |m| (path.clone(), m.clone()))
        })
        .collect();
    let mut want = vec![
        ("/alerts", "get"),
        ("/cancellations", "post"),
        ("/events", "get"),
        ("/events/{key}/replay", "post"),
        ("/resources/{id}", "get"),
        ("/transitions", "get"),
    ];
    want.sort();
    let mut got: Vec<(&str, &str)> = documented
        .iter()
        .map(|(p, m)| (p.as_str(), m.as_str()))
        .collect();
    got.sort();
    assert_eq!(got, want);
    // Every parameter and answer says what it is.
    for (path, method) in &documented {
        let op = &doc["paths"][path][method];
        for p in op["parameters"].as_array().into_iter().flatten() {
            assert!(p["schema"].is_object(), "{method} {path}: {p}");
        }
        for (status, answer) in op["responses"].as_object().unwrap() {
            assert!(
                answer["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{method} {path} {status}"
            );
            assert!(
                answer["content"]["application/json"]["schema"].is_object(),
                "{method} {path} {status} has no body schema"
            );
        }
    }

    // Successes, each on real data.
    let (_, events) = app.get("/v1/events?limit=1", Some(TOKEN)).await;
    let key = events["data"][0]["key"].as_str().unwrap().to_string();
    let successes: Vec<(&str, &str, String, Option<Value>)> = vec![
        ("/resources/{id}", "get", format!("/resources/{bulk}"), None),
        (
            "/resources/{id}",
            "get",
            format!("/resources/{transfer}"),
            None,
        ),
        ("/transitions", "get", "/transitions?limit=2".into(), None),
        (
            "/transitions",
            "get",
            format!("/transitions?resource_id={bulk}"),
            None,
        ),
        ("/alerts", "get", "/alerts?state=open".into(), None),
        ("/events", "get", "/events".into(), None),
        (
            "/events/{key}/replay",
            "post",
            format!("/events/{key}/replay"),
            None,
        ),
        (
            "/cancellations",
            "post",
            "/cancellations".into(),
            Some(json!({"kind": "stripe.outbound_transfer", "id": transfer})),
        ),
        (
            "/cancellations",
            "post",
            "/cancellations".into(),
            Some(json!({"kind": "stripe.outbound_transfer", "id": transfer})),
        ),
    ];
    let mut seen = std::collections::BTreeSet::new();
    for (path, method, url, body) in successes {
        let (status, answer) = call(&app, method, &url, body, Some(TOKEN)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {url}: {status} {answer}"
        );
        conforms(&doc, path, method, status, &answer);
        seen.insert((path, method));
    }
    assert_eq!(seen.len(), documented.len(), "every operation was called");
    // The schemas are strict enough to tell a wrong answer.
    let (_, history) = app.get(&format!("/v1/resources/{bulk}"), Some(TOKEN)).await;
    let mut broken = history.clone();
    broken["resources"][0]["transitions"][0]
        .as_object_mut()
        .unwrap()
        .remove("to_status");
    assert!(complaints(&doc, "/resources/{id}", "get", 200, &broken) > 0);
    let mut broken = history.clone();
    broken["resources"][0]["children"][0]["refunds"] = json!("none");
    assert!(complaints(&doc, "/resources/{id}", "get", 200, &broken) > 0);
    assert!(complaints(&doc, "/transitions", "get", 200, &json!({"data": [{}]})) > 0);
    assert!(complaints(&doc, "/alerts", "get", 400, &json!({"error": "bad"})) > 0);

    // The second cancel found the transfer cancelled already.
    let (_, history) = app
        .get(&format!("/v1/resources/{transfer}"), Some(TOKEN))
        .await;
    assert_eq!(history["resources"][0]["status"], "canceled");

    // Errors, each as documented.
    let errors: Vec<ErrorCase> = vec![
        (
            "/resources/{id}",
            "get",
            "/resources/obt_nowhere".into(),
            None,
            Some(TOKEN),
            404,
        ),
        (
            "/resources/{id}",
            "get",
            format!("/resources/{bulk}"),
            None,
            None,
            401,
        ),
        (
            "/transitions",
            "get",
            "/transitions?limit=ten".into(),
            None,
            Some(TOKEN),
            400,
        ),
        (
            "/transitions",
            "get",
            "/transitions?cursor=zz".into(),
            None,
            Some(TOKEN),
            400,
        ),
        (
            "/alerts",
            "get",
            "/alerts?state=asleep".into(),
            None,
            Some(TOKEN),
            400,
        ),
        (
            "/events",
            "get",
            "/events?state=lost".into(),
            None,
            Some(TOKEN),
            400,
        ),
        ("/events", "get", "/events".into(), None, Some("wrong"), 401),
        (
            "/events/{key}/replay",
            "post",
            "/events/evt_nowhere/replay".into(),
            None,
            Some(TOKEN),
            404,
        ),
        (
            "/cancellations",
            "post",
            "/cancellations".into(),
            Some(json!({"kind": "stripe.charge", "id": "ch_1"})),
            Some(TOKEN),
            400,
        ),
        (
            "/cancellations",
            "post",
            "/cancellations".into(),
            Some(json!({"kind": "stripe.outbound_transfer"})),
            Some(TOKEN),
            400,
        ),
        (
            "/cancellations",
            "post",
            "/cancellations".into(),
            Some(json!({"kind": "stripe.outbound_transfer", "id": "obt_nowhere"})),
            Some(TOKEN),
            404,
        ),
    ];
    for (path, method, url, body, token, want) in errors {
        let (status, answer) = call(&app, method, &url, body, token).await;
        assert_eq!(status, want, "{method} {url}: {answer}");
        conforms(&doc, path, method, status, &answer);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_description_is_off_with_the_api() {
    let app = TestApp::start(TestConfig::new()).await;
    let (status, body) = app.get("/v1/openapi.json", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "api_disabled");
    app.stop().await;
}
