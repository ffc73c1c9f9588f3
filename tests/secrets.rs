//! Secrets never reach the logs or `check-config`: a full run of the real
//! binary at debug level (deliveries, refusals, fetches, cancels' neighbours)
//! and every configured secret is searched for in everything it printed.

use std::time::Duration;

use cancelwatch_sim::{DeliveryOptions, SimConfig, Simulator};

mod support;
use support::{free_port, BinaryDaemon};

const STRIPE_KEY: &str = "sk_test_SECRETstripekey0001";
const JUICE_KEY: &str = "juice_SECRETapikey0002";
const WEBHOOK_SECRETS: [&str; 2] = ["whsec_SECRETcurrent0003", "whsec_SECRETold0004"];
const BUSINESS_ID: &str = "biz_SECRETchecksum0005";
const ADMIN_TOKEN: &str = "adm_SECRETtoken0006";
const SINK_SECRET: &str = "whsec_U0VDUkVUc2lua3NlY3JldDAwMDc=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_or_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let sim = Simulator::start(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        SimConfig {
            stripe_api_key: STRIPE_KEY.into(),
            juice_api_key: JUICE_KEY.into(),
            stripe_webhook_secret: WEBHOOK_SECRETS[0].into(),
            juice_checksum_key: BUSINESS_ID.into(),
            target: Some(format!("http://127.0.0.1:{port}")),
        },
    )
    .await
    .unwrap();
    let config_path = dir.path().join("cancelwatch.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
admin_token = "{ADMIN_TOKEN}"
[log]
level = "debug"
[database]
url = "sqlite://{db}/cw.db"
[stripe]
api_base = "{api}"
api_key = "{STRIPE_KEY}"
webhook_secrets = ["{s0}", "{s1}"]
[juice]
api_base = "{api}"
api_key = "{JUICE_KEY}"
checksum_keys = ["{BUSINESS_ID}"]
[[alerts.sinks]]
kind = "webhook"
url = "http://127.0.0.1:9/alerts"
secret = "{SINK_SECRET}"
[[alerts.sinks]]
kind = "log"
"#,
            db = dir.path().display(),
            api = sim.base_url(),
            s0 = WEBHOOK_SECRETS[0],
            s1 = WEBHOOK_SECRETS[1],
        ),
    )
    .unwrap();
    let env = [("CANCELWATCH_CONFIG", config_path.display().to_string())];
    let mut daemon = BinaryDaemon::start_on(dir.path(), port, &env).await;

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
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = daemon.terminate().await.expect("stops on SIGTERM");
    assert!(status.success());

    let check = std::process::Command::new(env!("CARGO_BIN_EXE_cancelwatch"))
        .arg("check-config")
        .env_clear()
        .env("CANCELWATCH_CONFIG", &config_path)
        .output()
        .unwrap();
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
