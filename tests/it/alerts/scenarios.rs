//! End to end: the simulator's scenarios played against a real daemon raise
//! the alerts they expect, and those reach a sink.

use std::path::PathBuf;
use std::time::Duration;

use cancelwatch::config::SinkConfig;
use serde_json::{json, Value};

use crate::support::db;
use crate::support::sim::{
    app_with_simulator, unknown_outbound_transfer, wait_step, DeliveryOptions, Simulator,
};
use crate::support::{both_engines, wait_until, Engine, TestApp, TestConfig};

/// A daemon with a simulator in front of it, and a command sink appending
/// each alert as a line to `alerts.jsonl`.
struct SimPair {
    sim: Simulator,
    app: TestApp,
    out: PathBuf,
}

impl SimPair {
    async fn start(engine: Engine, tune: impl FnOnce(&mut cancelwatch::Config)) -> SimPair {
        let config = TestConfig::on(engine).await.quick_alerts().with(|c| {
            c.workers.poll_interval_ms = 50;
            c.workers.backoff_base_ms = 50;
            c.workers.backoff_max_secs = 1;
            c.reconcile.interval_secs = 3_600;
        });
        let out = config.dir().join("alerts.jsonl");
        let append = format!("cat >> '{}'; echo >> '{}'", out.display(), out.display());
        let config = config
            .with(|c| {
                c.alerts.sinks = vec![SinkConfig {
                    name: "cmd".into(),
                    kind: "command".into(),
                    command: vec!["sh".into(), "-c".into(), append],
                    ..SinkConfig::default()
                }]
            })
            .with(tune);
        let (sim, app) = app_with_simulator(config).await;
        SimPair { sim, app, out }
    }

    /// Waits until every outbox row is delivered, stops the daemon and
    /// returns what the command sink received.
    async fn finish(self) -> Vec<Value> {
        wait_until(
            "every alert is delivered",
            Duration::from_secs(10),
            || async { db::outbox_count(self.app.db(), "pending").await == 0 },
        )
        .await;
        // The folder goes with the configuration: kept until read.
        let _config = self.app.stop().await;
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

both_engines! {
    /// Every simulator scenario played against a real daemon raises exactly the
    /// alerts the scenario expects, and they reach a command sink.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn simulator_scenarios_raise_exactly_their_expected_alerts(engine) {
        let pair = SimPair::start(engine, |_| {}).await;
        let (sim, app) = (&pair.sim, &pair.app);

        let mut expected = Vec::new();
        for name in Simulator::scenario_names() {
            let scenario = sim.scenario(name).unwrap();
            for step in &scenario.steps {
                sim.play_step(step, &DeliveryOptions::default())
                    .await
                    .unwrap();
                wait_step(app.db(), step).await;
            }
            assert!(sim.wait_background(Duration::from_secs(10)).await);
            expected.extend(scenario.expect.alerts.clone());
        }
        expected.sort();
        let raised: Vec<(String, String)> = db::alerts(app.db())
            .await
            .into_iter()
            .map(|a| (a.rule, a.resource_id))
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(raised, expected);
        let received = pair.finish().await;
        for (rule, id) in &expected {
            assert!(
                received
                    .iter()
                    .any(|p| p["type"] == rule.as_str() && p["resource"]["id"] == id.as_str()),
                "{rule} about {id} not received: {received:?}"
            );
        }
    }
}

/// Waits until the replayed delivery `key` is processed: by the replay
/// itself, or by the running daemon when its poll took the requeued
/// delivery before the replay's own claim could.
async fn processed_here_or_beside(app: &TestApp, key: &str) {
    wait_until(
        &format!("{key} is processed"),
        Duration::from_secs(10),
        || async { db::delivery(app.db(), key).await.unwrap().state == "processed" },
    )
    .await;
}

both_engines! {
    /// A dead letter replayed once the provider answers again is processed,
    /// and its `dead_letter` alert is resolved (the sink gets the resolved
    /// version too).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_replayed_dead_letter_resolves_its_alert(engine) {
        let pair = SimPair::start(engine, |c| c.workers.max_attempts = 2).await;
        let scenario = pair.sim.scenario("outbound_transfer_canceled").unwrap();
        for step in &scenario.steps {
            pair.sim.apply_step(step);
        }
        let last = scenario.steps.last().unwrap().deliveries.last().unwrap();
        let key = last.event_id().unwrap().to_string();
        pair.sim.faults().fail_next(1_000, 500);
        pair.sim.deliver(last).await.unwrap();
        let alert_state = || async {
            db::alerts(pair.app.db())
                .await
                .into_iter()
                .find(|a| a.rule == "dead_letter")
                .map(|a| a.state)
        };
        wait_until(
            "the dead_letter alert is open",
            Duration::from_secs(10),
            || async { alert_state().await.as_deref() == Some("open") },
        )
        .await;

        pair.sim.faults().clear();
        let ctx = pair.app.test_config().context().await;
        let report = cancelwatch::pipeline::replay(&ctx, &key, true)
            .await
            .unwrap();
        assert_eq!(report.previous_state, "dead");
        processed_here_or_beside(&pair.app, &key).await;
        wait_until("the dead_letter alert is resolved", Duration::from_secs(10), || async {
            alert_state().await.as_deref() == Some("resolved")
        })
        .await;
        ctx.store.close().await;
        let received = pair.finish().await;
        let states: Vec<&str> = received
            .iter()
            .filter(|p| p["type"] == "dead_letter")
            .filter_map(|p| p["state"].as_str())
            .collect();
        assert_eq!(states, ["open", "resolved"], "{received:?}");
    }
}

both_engines! {
    /// A delivery about an object the provider never had goes dead in the
    /// worker, and that raises a `dead_letter` alert about its resource.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_dead_delivery_raises_dead_letter(engine) {
        let pair = SimPair::start(engine, |c| c.workers.max_attempts = 2).await;
        let ghost = "obt_alerts_does_not_exist";
        pair.sim
            .deliver(&unknown_outbound_transfer(ghost))
            .await
            .unwrap();
        wait_until(
            "the dead_letter alert is raised",
            Duration::from_secs(10),
            || async {
                let alerts = db::alerts(pair.app.db()).await;
                let about = |a: &&cancelwatch::store::model::Alert| {
                    a.rule == "dead_letter" && a.resource_id == ghost
                };
                alerts.iter().filter(about).count() == 1
            },
        )
        .await;
        let received = pair.finish().await;
        assert_eq!(received.len(), 1, "{received:?}");
        assert_eq!(received[0]["type"], "dead_letter");
        assert_eq!(
            received[0]["resource"],
            json!({"provider": "stripe", "kind": "stripe.outbound_transfer", "id": ghost})
        );
        assert!(received[0]["details"]["error"]
            .as_str()
            .unwrap()
            .contains("does not exist"));
    }
}

both_engines! {
    /// Replaying every delivery of a batch job that finished cancelled in part
    /// observes it again with nothing new but when its counts were seen: the
    /// `partial_cancellation` alert keeps its version and no sink is paged again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replaying_a_finished_resource_pages_no_one_again(engine) {
        let pair = SimPair::start(engine, |_| {}).await;
        let scenario = pair.sim.scenario("batch_job_canceled_midway").unwrap();
        for step in &scenario.steps {
            pair.sim
                .play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
            wait_step(pair.app.db(), step).await;
        }
        assert!(pair.sim.wait_background(Duration::from_secs(10)).await);
        let partial = || async {
            db::alerts(pair.app.db())
                .await
                .into_iter()
                .find(|a| a.rule == "partial_cancellation")
        };
        let before = partial()
            .await
            .expect("the scenario raises partial_cancellation");

        let ctx = pair.app.test_config().context().await;
        let keys: Vec<String> = db::deliveries(pair.app.db())
            .await
            .into_iter()
            .map(|d| d.dedupe_key)
            .collect();
        assert!(keys.len() >= 2, "{keys:?}");
        for key in &keys {
            cancelwatch::pipeline::replay(&ctx, key, true)
                .await
                .unwrap();
            processed_here_or_beside(&pair.app, key).await;
        }
        ctx.store.close().await;

        let after = partial().await.unwrap();
        assert_eq!(after.version, before.version, "{after:?}");
        assert_eq!(after.updated_at, before.updated_at);
        let received = pair.finish().await;
        let paged = received
            .iter()
            .filter(|p| p["type"] == "partial_cancellation")
            .count();
        assert_eq!(paged, 1, "{received:?}");
    }
}
