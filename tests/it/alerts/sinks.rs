//! The outbox of a real daemon: each sink gets each alert at least once,
//! signed, retried, across a restart, independently of the others.

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use cancelwatch::config::SinkConfig;
use cancelwatch::store::model::{Alert, NewAlert};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::support::db::{self, TestDb};
use crate::support::receiver::TestReceiver;
use crate::support::{both_engines, wait_until, Engine, TestApp, TestConfig};

const SECRET_KEY: &[u8] = b"a test key of 32 bytes, no more.";

/// Deliveries are seen within this.
const WAIT: Duration = Duration::from_secs(10);

fn webhook_sink(name: &str, url: &str) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind: "webhook".into(),
        url: url.into(),
        secret: format!("whsec_{}", STANDARD.encode(SECRET_KEY)),
        ..SinkConfig::default()
    }
}

fn command_sink(name: &str, out: &Path) -> SinkConfig {
    SinkConfig {
        name: name.into(),
        kind: "command".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("cat > '{}'", out.display()),
        ],
        ..SinkConfig::default()
    }
}

/// A configuration with these sinks, its outbox quick.
async fn with_sinks(engine: Engine, sinks: impl FnOnce(&Path) -> Vec<SinkConfig>) -> TestConfig {
    let config = TestConfig::on(engine).await.quick_alerts();
    let sinks = sinks(config.dir());
    config.with(|c| c.alerts.sinks = sinks)
}

/// Raises one alert as a rule would (its database closed again after).
async fn raise_one(config: &TestConfig, resource_id: &str) -> Alert {
    let store = config.open_store().await;
    let alert = NewAlert {
        rule: "partial_cancellation".into(),
        severity: "critical".into(),
        provider: "juice".into(),
        kind: "juice.bulk_transfer".into(),
        resource_id: resource_id.into(),
        summary: "1 of 2 items cancelled".into(),
        details: json!({"cancelled": {"count": 1, "amount": 100}}),
    };
    let raised = db::raise_alert(&store, config.config(), &alert).await;
    store.close().await;
    raised
}

/// Waits until `alert` is delivered to `sink`.
async fn wait_delivered(db: &TestDb, alert: &Alert, sink: &str) {
    wait_until(
        &format!("{} is delivered to {sink}", alert.resource_id),
        WAIT,
        || async { db::outbox_entry(db, &alert.id, sink).await.state == "delivered" },
    )
    .await;
}

both_engines! {
    /// Alerts queued for a sink that was then removed from the configuration
    /// are kept (pending) and named at start, with how many wait.
    #[tokio::test]
    async fn alerts_waiting_for_a_removed_sink_are_kept_and_named(engine) {
        let config = with_sinks(engine, |dir| {
            vec![
                command_sink("kept", &dir.join("kept.json")),
                command_sink("gone", &dir.join("gone.json")),
            ]
        }).await;
        raise_one(&config, "bulk_orphan_1").await;
        raise_one(&config, "bulk_orphan_2").await;
        let config = config.with(|c| c.alerts.sinks.truncate(1));
        let db = config.open_store().await;
        let orphaned = cancelwatch::jobs::outbox::orphaned(&db, config.config())
            .await
            .unwrap();
        assert_eq!(orphaned, vec![("gone".to_string(), 2)]);
        db.close().await;
    }
}

/// Verifies a Standard Webhooks signature from first principles.
fn standard_webhooks_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET_KEY).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

both_engines! {
    #[tokio::test]
    async fn webhook_sink_gets_a_standard_webhooks_signed_alert(engine) {
        let receiver = TestReceiver::start().await;
        let url = format!("{}/alerts", receiver.url());
        let config = with_sinks(engine, |_| vec![webhook_sink("hook", &url)]).await;
        let alert = raise_one(&config, "bulk-sig").await;
        let app = TestApp::start(config.clone()).await;
        wait_delivered(app.db(), &alert, "hook").await;
        let db = TestDb::of(&app.stop().await);

        let requests = receiver.received();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        let header = |name: &str| request.header(name).unwrap().to_string();
        assert_eq!(header("webhook-id"), format!("{}_v1", alert.id));
        assert_eq!(header("content-type"), "application/json");
        let timestamp = header("webhook-timestamp");
        assert!(timestamp.parse::<i64>().unwrap() > 1_700_000_000);
        let expected = standard_webhooks_signature(&header("webhook-id"), &timestamp, &request.body);
        assert_eq!(header("webhook-signature"), expected);
        let tampered = standard_webhooks_signature(&header("webhook-id"), &timestamp, b"{}");
        assert_ne!(header("webhook-signature"), tampered);

        let payload = request.json();
        for field in [
            "id",
            "type",
            "severity",
            "resource",
            "summary",
            "details",
            "created_at",
        ] {
            assert!(
                payload.get(field).is_some(),
                "payload lacks {field}: {payload}"
            );
        }
        assert_eq!(payload["id"], alert.id.as_str());
        assert_eq!(payload["type"], "partial_cancellation");
        assert_eq!(
            payload["resource"],
            json!({"provider": "juice", "kind": "juice.bulk_transfer", "id": "bulk-sig"})
        );
        assert_eq!(payload["details"]["cancelled"]["count"], 1);
        assert_eq!(
            db::alert_attempts(&db, &alert.id, "hook").await,
            vec![(Some(200), None)]
        );
    }
}

both_engines! {
    #[tokio::test]
    async fn failing_receiver_is_retried_until_delivered_exactly_once(engine) {
        let receiver = TestReceiver::start().await;
        receiver.answer_first(&[500, 500]);
        let url = format!("{}/alerts", receiver.url());
        let config = with_sinks(engine, |_| vec![webhook_sink("hook", &url)]).await;
        let alert = raise_one(&config, "bulk-retry").await;
        let app = TestApp::start(config.clone()).await;
        wait_delivered(app.db(), &alert, "hook").await;
        // A later alert delivered too: the outbox has run again since, and had
        // it repeated the first, that would show.
        let later = raise_one(&config, "bulk-retry-later").await;
        wait_delivered(app.db(), &later, "hook").await;
        let db = TestDb::of(&app.stop().await);

        let later_id = format!("{}_v1", later.id);
        let requests: Vec<_> = receiver
            .received()
            .into_iter()
            .filter(|r| r.header("webhook-id") != Some(later_id.as_str()))
            .collect();
        let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![500, 500, 200]);
        let ids: Vec<&str> = requests
            .iter()
            .map(|r| r.header("webhook-id").unwrap())
            .collect();
        assert!(ids.iter().all(|id| *id == format!("{}_v1", alert.id)));
        let entry = db::outbox_entry(&db, &alert.id, "hook").await;
        assert_eq!((entry.state.as_str(), entry.attempts), ("delivered", 3));
        let recorded = db::alert_attempts(&db, &alert.id, "hook").await;
        let codes: Vec<Option<i64>> = recorded.iter().map(|a| a.0).collect();
        assert_eq!(codes, vec![Some(500), Some(500), Some(200)]);
        assert!(recorded[0].1.as_deref().unwrap().contains("500"));
        assert_eq!(recorded[2].1, None);
    }
}

both_engines! {
    #[tokio::test]
    async fn pending_alert_survives_a_restart_and_is_delivered(engine) {
        let receiver = TestReceiver::start().await;
        receiver.set_down(true);
        let url = format!("{}/alerts", receiver.url());
        let config = with_sinks(engine, |_| vec![webhook_sink("hook", &url)]).await;
        let alert = raise_one(&config, "bulk-restart").await;
        let db = TestDb::of(&config);

        let first = TestApp::start(config.clone()).await;
        wait_until("a failed attempt", WAIT, || async {
            !db::alert_attempts(&db, &alert.id, "hook").await.is_empty()
        })
        .await;
        first.stop().await;
        assert_eq!(
            db::outbox_entry(&db, &alert.id, "hook").await.state,
            "pending"
        );

        receiver.set_down(false);
        let second = TestApp::start(config.clone()).await;
        wait_delivered(&db, &alert, "hook").await;
        second.stop().await;
        let tried = db::alert_attempts(&db, &alert.id, "hook").await;
        assert_eq!(tried.first().unwrap().0, Some(503));
        assert_eq!(tried.last().unwrap().0, Some(200));
        let delivered: Vec<_> = receiver
            .received()
            .into_iter()
            .filter(|r| r.status == 200)
            .collect();
        assert_eq!(delivered.len(), 1);
    }
}

both_engines! {
    #[tokio::test]
    async fn command_sink_gets_the_alert_json_on_stdin(engine) {
        let config = with_sinks(engine, |dir| vec![command_sink("cmd", &dir.join("alert.json"))]).await;
        let out = config.dir().join("alert.json");
        let alert = raise_one(&config, "bulk-cmd").await;
        let app = TestApp::start(config.clone()).await;
        wait_delivered(app.db(), &alert, "cmd").await;
        app.stop().await;
        let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got, alert.payload());
    }
}

both_engines! {
    #[tokio::test]
    async fn failing_command_is_recorded_and_retried(engine) {
        let config = with_sinks(engine, |_| {
            vec![SinkConfig {
                name: "broken".into(),
                kind: "command".into(),
                command: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
                ..SinkConfig::default()
            }]
        })
        .await;
        let alert = raise_one(&config, "bulk-broken").await;
        let app = TestApp::start(config.clone()).await;
        wait_until("two failed attempts", WAIT, || async {
            db::alert_attempts(app.db(), &alert.id, "broken")
                .await
                .len()
                >= 2
        })
        .await;
        let db = TestDb::of(&app.stop().await);
        let entry = db::outbox_entry(&db, &alert.id, "broken").await;
        assert_eq!(entry.state, "pending");
        assert!(entry.attempts >= 2);
        let error = db::alert_attempts(&db, &alert.id, "broken").await[0]
            .1
            .clone()
            .unwrap();
        assert!(error.contains("nope"), "{error}");
    }
}

both_engines! {
    #[tokio::test]
    async fn a_hanging_sink_does_not_hold_up_another(engine) {
        let hanging = TestReceiver::start().await;
        hanging.hang();
        let url = format!("{}/alerts", hanging.url());
        let config = with_sinks(engine, |dir| {
            vec![
                webhook_sink("hanging", &url),
                webhook_sink("refused", "http://127.0.0.1:9/alerts"),
                command_sink("cmd", &dir.join("alert.json")),
            ]
        })
        .await
        // Long enough that the hanging sink is still waiting when the test ends.
        .with(|c| c.alerts.delivery.timeout_secs = 120);
        let out = config.dir().join("alert.json");
        let alert = raise_one(&config, "bulk-indep").await;
        let app = TestApp::start(config.clone()).await;
        wait_until("the hanging sink is called", WAIT, || async {
            !hanging.received().is_empty()
        })
        .await;
        wait_delivered(app.db(), &alert, "cmd").await;
        let stuck = db::outbox_entry(app.db(), &alert.id, "hanging").await;
        assert_eq!((stuck.state.as_str(), stuck.attempts), ("pending", 0));
        assert_eq!(
            db::outbox_entry(app.db(), &alert.id, "refused").await.state,
            "pending"
        );
        app.stop().await;
        assert!(out.exists());
    }
}

both_engines! {
    #[tokio::test]
    async fn refused_deliveries_raise_an_alert_in_the_running_daemon(engine) {
        let config = with_sinks(engine, |dir| {
            vec![
                command_sink("cmd", &dir.join("alert.json")),
                SinkConfig::default(),
            ]
        })
        .await
        .with(|c| c.alerts.verification_failures.threshold = 1);
        let out = config.dir().join("alert.json");
        let app = TestApp::start(config.clone()).await;
        for _ in 0..2 {
            let (status, _) = app
                .post_stripe_with(br#"{"id":"evt_1"}"#, Some("t=1,v1=00"))
                .await;
            assert_eq!(status, 401);
        }
        wait_until("the alert file is written", WAIT, || async { out.exists() }).await;
        let metrics = app.metrics().await;
        assert!(
            metrics.contains("cancelwatch_alerts_raised_total{rule=\"verification_failures\"}"),
            "{metrics}"
        );
        wait_until("the alert is delivered to both sinks", WAIT, || async {
            db::outbox_count(app.db(), "delivered").await == 2
        })
        .await;
        app.stop().await;
        let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(got["type"], "verification_failures");
        assert_eq!(
            got["resource"],
            json!({"provider": "stripe", "kind": "webhook", "id": "stripe"})
        );
        assert_eq!(got["details"]["refused"], 2);
    }
}

both_engines! {
    #[tokio::test]
    async fn slack_sink_gets_one_readable_line(engine) {
        let receiver = TestReceiver::start().await;
        let url = format!("{}/alerts", receiver.url());
        let config = with_sinks(engine, |_| {
            vec![SinkConfig {
                name: "chat".into(),
                kind: "slack".into(),
                url,
                ..SinkConfig::default()
            }]
        }).await;
        let alert = raise_one(&config, "bulk-slack").await;
        let app = TestApp::start(config.clone()).await;
        wait_delivered(app.db(), &alert, "chat").await;
        app.stop().await;
        let requests = receiver.received();
        assert_eq!(requests.len(), 1);
        assert_eq!(
            requests[0].json(),
            json!({"text": "[CRITICAL] partial_cancellation: juice.bulk_transfer bulk-slack (juice): 1 of 2 items cancelled"})
        );
    }
}

both_engines! {
    #[tokio::test]
    async fn command_sink_is_killed_at_its_timeout(engine) {
        let config = with_sinks(engine, |_| {
            vec![SinkConfig {
                name: "slow".into(),
                kind: "command".into(),
                // A command that outlasts the sink's timeout.
                command: vec!["sleep".into(), "30".into()],
                ..SinkConfig::default()
            }]
        })
        .await
        .with(|c| c.alerts.delivery.timeout_secs = 1);
        let alert = raise_one(&config, "bulk-slow").await;
        let app = TestApp::start(config.clone()).await;
        wait_until("a timed-out attempt", WAIT, || async {
            !db::alert_attempts(app.db(), &alert.id, "slow")
                .await
                .is_empty()
        })
        .await;
        let db = TestDb::of(&app.stop().await);
        let error = db::alert_attempts(&db, &alert.id, "slow").await[0]
            .1
            .clone()
            .unwrap();
        assert!(error.contains("did not finish within 1 s"), "{error}");
        assert_eq!(
            db::outbox_entry(&db, &alert.id, "slow").await.state,
            "pending"
        );
    }
}

/// True while process `pid` runs (a zombie, dead but not yet reaped, does
/// not count).
fn running(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// A command sink that times out is ended with everything it started: a
/// shell's background child does not outlive it.
#[tokio::test]
async fn a_command_sink_timing_out_ends_its_children_too() {
    let config = with_sinks(Engine::Sqlite, |dir: &Path| {
        let pid_file = dir.join("child.pid");
        vec![SinkConfig {
            name: "spawner".into(),
            kind: "command".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("sleep 300 & echo $! > '{}'; wait", pid_file.display()),
            ],
            ..SinkConfig::default()
        }]
    })
    .await
    .with(|c| c.alerts.delivery.timeout_secs = 1);
    let pid_file = config.dir().join("child.pid");
    let alert = raise_one(&config, "bulk-spawner").await;
    let app = TestApp::start(config.clone()).await;
    wait_until("a timed-out attempt", WAIT, || async {
        !db::alert_attempts(app.db(), &alert.id, "spawner")
            .await
            .is_empty()
    })
    .await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_string();
    wait_until("the command's child has ended", WAIT, || async {
        !running(&pid)
    })
    .await;
    app.stop().await;
}
