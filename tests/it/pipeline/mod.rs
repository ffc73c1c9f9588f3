//! The pipeline: the simulator plays cancel scenarios against a real daemon
//! (both on 127.0.0.1:0), and the transitions and refunds recorded must
//! match each scenario's expectation exactly, with duplicates, shuffled
//! order, API faults and interrupted processing; cancel, replay, backfill
//! and reconcile through their library functions; claims and the writing
//! of outcomes and observations, one step at a time.

mod catch_up;
mod claims;
mod commands;
mod end_to_end;
mod juice;
mod record;
mod stripe_trail;

use std::time::Duration;

use cancelwatch::pipeline::Context;

use crate::support::config::CLOSED_PORT;
use crate::support::db::{self, Database};
use crate::support::sim::{DeliveryOptions, Expectation, Scenario, Simulator};
use crate::support::{Engine, TestConfig};

/// How long a step of a scenario may take to be processed.
const WAIT: Duration = Duration::from_secs(20);

/// A daemon's configuration whose provider APIs are at `api_base`, its
/// workers quick.
async fn config_for(engine: Engine, api_base: &str) -> TestConfig {
    TestConfig::on(engine)
        .await
        .provider_apis(api_base)
        .quick_workers()
}

/// A pipeline context on a fresh database whose provider APIs are a closed
/// port (nothing is fetched); the folder lives as long as the configuration.
async fn offline_context(engine: Engine) -> (TestConfig, Context) {
    let config = config_for(engine, CLOSED_PORT).await;
    let ctx = config.context().await;
    (config, ctx)
}

/// Compares what was recorded with the scenario's expectation, exactly.
async fn check(db: &impl Database, name: &str, expect: &Expectation) {
    let mut all_ids = Vec::new();
    for h in &expect.histories {
        all_ids.push(h.id.clone());
        let ts = db::transitions_of(db, &h.id).await;
        let to: Vec<String> = ts.iter().map(|t| t.to_status.clone()).collect();
        assert_eq!(to, h.statuses, "{name}: history of {} ({})", h.id, h.kind);
        let mut previous: Option<String> = None;
        for t in &ts {
            assert_eq!(t.kind, h.kind, "{name}: {}", h.id);
            assert_eq!(t.parent_id, h.parent_id, "{name}: parent of {}", h.id);
            assert_eq!(t.from_status, previous, "{name}: from_status of {}", h.id);
            assert!(
                matches!(
                    t.trigger_type.as_str(),
                    "event" | "cancel" | "backfill" | "reconcile"
                ),
                "{name}: trigger {}",
                t.trigger_type
            );
            previous = Some(t.to_status.clone());
        }
    }
    let refunds = db::refunds(db).await;
    let mut refund_count = 0;
    for r in refunds.iter().filter(|r| all_ids.contains(&r.resource_id)) {
        refund_count += 1;
        let rid = &r.resource_id;
        let want = expect
            .refunds
            .iter()
            .find(|w| &w.resource_id == rid)
            .unwrap_or_else(|| panic!("{name}: unexpected refund for {rid}"));
        assert_eq!(r.status, want.status, "{name}: refund status of {rid}");
        assert_eq!(
            r.amount,
            Some(want.amount),
            "{name}: refund amount of {rid}"
        );
        assert_eq!(
            r.currency.as_deref(),
            Some(want.currency.as_str()),
            "{name}: refund currency of {rid}"
        );
    }
    assert_eq!(refund_count, expect.refunds.len(), "{name}: refunds");
}

/// Plays every step of `scenario`, each once the last is processed, then
/// checks what was recorded.
async fn play(sim: &Simulator, db: &impl Database, scenario: &Scenario, opts: &DeliveryOptions) {
    for step in &scenario.steps {
        sim.play_step(step, opts).await.unwrap();
        crate::support::sim::wait_step(db, step).await;
    }
    assert!(sim.wait_background(WAIT).await);
    check(db, &scenario.name, &scenario.expect).await;
}
