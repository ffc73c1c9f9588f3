//! Secrets never reach the logs or `check-config`: a full run of the real
//! binary at debug level (deliveries, refusals, fetches, cancels' neighbours)
//! and every configured secret is searched for in everything it printed.

use std::time::Duration;

use cancelwatch::config::SinkConfig;

use crate::support::binary::{self, BinaryDaemon};
use crate::support::db;
use crate::support::sim::{simulator_with, DeliveryOptions, SimConfig, Simulator};
use crate::support::{wait_until, TestConfig};

const STRIPE_KEY: &str = "sk_test_SECRETstripekey0001";
const JUICE_KEY: &str = "juice_SECRETapikey0002";
const WEBHOOK_SECRETS: [&str; 2] = ["whsec_SECRETcurrent0003", "whsec_SECRETold0004"];
const BUSINESS_ID: &str = "biz_SECRETchecksum0005";
const ADMIN_TOKEN: &str = "adm_SECRETtoken0006_0123456789abcdef";
const SINK_SECRET: &str = "whsec_U0VDUkVUc2lua3NlY3JldDAwMDc=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_or_check_config() {
    let config = TestConfig::new().on_a_fixed_port();
    let sim = simulator_with(SimConfig {
        stripe_api_key: STRIPE_KEY.into(),
        juice_api_key: JUICE_KEY.into(),
        stripe_webhook_secret: WEBHOOK_SECRETS[0].into(),
        juice_checksum_key: BUSINESS_ID.into(),
        target: Some(format!("http://{}", config.config().server.listen)),
    })
    .await;
    let api = sim.base_url();
    let config = config.with(|c| {
        c.server.admin_token = ADMIN_TOKEN.into();
        c.log.level = "debug".into();
        c.stripe.api_base = api.clone();
        c.stripe.api_key = STRIPE_KEY.into();
        c.stripe.webhook_secrets = WEBHOOK_SECRETS.map(String::from).to_vec();
        c.juice.api_base = api;
        c.juice.api_key = JUICE_KEY.into();
        c.juice.checksum_keys = vec![BUSINESS_ID.into()];
        c.alerts.sinks = vec![
            SinkConfig {
                kind: "webhook".into(),
                url: "http://127.0.0.1:9/alerts".into(),
                secret: SINK_SECRET.into(),
                ..SinkConfig::default()
            },
            SinkConfig {
                kind: "log".into(),
                ..SinkConfig::default()
            },
        ];
    });
    let mut daemon = BinaryDaemon::start(&config).await;

    // Everything a day brings: every scenario, twice and shuffled, ...
    let opts = DeliveryOptions {
        duplicate: true,
        shuffle: true,
        ..DeliveryOptions::default()
    };
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).unwrap();
        sim.play(&scenario, &opts).await.unwrap();
    }
    // ... refusals of every kind, a wrong admin token, metrics.
    let client = reqwest::Client::new();
    let url = &daemon.url;
    for (path, header) in [
        ("stripe", Some("t=1,v1=00")),
        ("stripe", None),
        ("juice", None),
    ] {
        let mut req = client
            .post(format!("{url}/webhooks/{path}"))
            .body(r#"{"checksum":"00","event":"x","data":{}}"#);
        if let Some(h) = header {
            req = req.header("Stripe-Signature", h);
        }
        assert!(req.send().await.unwrap().status().is_client_error());
    }
    let _ = client
        .get(format!("{url}/v1/alerts"))
        .bearer_auth("adm_wrong")
        .send()
        .await
        .unwrap();
    let _ = client.get(format!("{url}/metrics")).send().await.unwrap();
    sim.wait_background(Duration::from_secs(5)).await;
    // The daemon's work is done (and logged): every delivery processed,
    // every refusal recorded.
    wait_until(
        "the daemon has processed every delivery and refusal",
        Duration::from_secs(30),
        || async {
            db::unfinished_deliveries(daemon.db()).await == 0
                && db::refusals(daemon.db()).await.len() == 3
        },
    )
    .await;
    let status = daemon.terminate().await.expect("stops on SIGTERM");
    assert!(status.success());

    let check = binary::run(&config, &["check-config"]);
    assert!(check.status.success());
    let log = daemon.log_text();
    assert!(log.contains("DEBUG"), "the run logged at debug level");
    assert!(log.lines().count() > 50, "the run logged what it did");
    let printed = format!(
        "{log}\n{}\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    for secret in [STRIPE_KEY, JUICE_KEY, BUSINESS_ID, ADMIN_TOKEN, SINK_SECRET]
        .into_iter()
        .chain(WEBHOOK_SECRETS)
    {
        assert!(!printed.contains(secret), "{secret} was printed");
        // Nor its distinctive middle (a secret cut or quoted differently).
        let core = &secret[secret.len() / 4..secret.len() * 3 / 4];
        assert!(!printed.contains(core), "part of {secret} was printed");
    }
}

/// A secret in the wrong form stops start-up with the key and the form it
/// should have, never with the secret itself: a webhook secret without its
/// list brackets, an all-digit admin token, a Slack URL without a scheme.
#[test]
fn configuration_errors_name_the_key_not_the_secret() {
    let config = TestConfig::new();
    for (var, value, key) in [
        (
            "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
            "whsec_leak_me_please",
            "stripe.webhook_secrets",
        ),
        (
            "CANCELWATCH_SERVER__ADMIN_TOKEN",
            "918273645546372819",
            "server.admin_token",
        ),
        (
            "CANCELWATCH_JUICE__API_KEY",
            "[\"not\", \"a string\"]",
            "juice.api_key",
        ),
    ] {
        let o = binary::command(config.dir())
            .arg("check-config")
            .env("CANCELWATCH_CONFIG", config.write_toml())
            .env(var, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(key), "{var}: {stderr}");
        assert!(!stderr.contains(value), "{var} leaked: {stderr}");
    }
    let slack = config.with(|c| {
        c.alerts.sinks = vec![SinkConfig {
            kind: "slack".into(),
            url: "hooks.slack.test/services/T000/B000/leakedsecretpath".into(),
            ..SinkConfig::default()
        }]
    });
    let o = binary::run(&slack, &["check-config"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("alerts.sinks[0].url"), "{stderr}");
    assert!(!stderr.contains("leakedsecretpath"), "{stderr}");
}
