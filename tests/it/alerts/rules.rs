//! Each rule, called as the pipeline and the scanner call it, on seeded
//! state at a fixed time.

use cancelwatch::store::model::Alert;
use cancelwatch::store::Store;
use cancelwatch::Config;
use serde_json::{json, Value};

use crate::support::db::{self, CancelSeed, DeliverySeed, ProgressSeed, RefundSeed, ResourceSeed};
use crate::support::{both_engines, Engine, TestConfig};

const NOW: &str = "2026-10-30T12:00:00.000Z";

fn now() -> cancelwatch::time::Timestamp {
    cancelwatch::time::parse_lenient(NOW).unwrap()
}

/// `NOW` minus `secs`, as stored.
fn ago(secs: i64) -> String {
    cancelwatch::time::fmt(now() - chrono::Duration::seconds(secs))
}

/// A fresh database (in the folder that the first lives as long as) and the
/// configuration its rules run with.
async fn setup(engine: Engine) -> (TestConfig, Config, Store) {
    let dir = TestConfig::on(engine).await.quick_alerts();
    let db = dir.open_store().await;
    (dir.clone(), dir.config().clone(), db)
}

/// A resource as the pipeline would have recorded it: seen a day ago, in
/// its status for a minute.
fn res(kind: &str, id: &str, status: &str) -> ResourceSeed {
    ResourceSeed::new(kind, id, status)
        .first_seen(&ago(86_400))
        .since(&ago(60))
        .currency("USD")
}

/// An item of the Juice bulk transfer `bulk`.
fn item(bulk: &str, id: &str, status: &str, amount: i64) -> ResourceSeed {
    res("juice.transfer", id, status)
        .parent(bulk)
        .amount(amount)
}

async fn recorded(db: &Store, config: &Config, rid: i64) {
    db::on_resource_recorded(db, config, rid, NOW).await;
}

async fn scan_at(db: &Store, config: &Config, at: cancelwatch::time::Timestamp) {
    db.scan_alerts(config, at).await.unwrap();
}

async fn alert_of(db: &Store, rule: &str, resource_id: &str) -> Option<Alert> {
    db::alerts(db)
        .await
        .into_iter()
        .find(|a| a.rule == rule && a.resource_id == resource_id)
}

fn details(a: &Alert) -> Value {
    serde_json::from_str(&a.details).unwrap()
}

both_engines! {
    #[tokio::test]
    async fn juice_partial_cancellation_fires_counts_items_and_updates(engine) {
        let (_dir, config, db) = setup(engine).await;
        let bulk = db::seed_resource(
            &db,
            &res("juice.bulk_transfer", "bulk-1", "cancelled").terminal(),
        )
        .await;
        db::seed_resource(&db, &item("bulk-1", "t1", "cancelled", 1_000)).await;
        db::seed_resource(&db, &item("bulk-1", "t2", "reversed", 500)).await;
        db::seed_resource(&db, &item("bulk-1", "t3", "completed", 2_000)).await;
        let t4 = db::seed_resource(&db, &item("bulk-1", "t4", "processing", 700)).await;
        recorded(&db, &config, bulk).await;

        let a = alert_of(&db, "partial_cancellation", "bulk-1")
            .await
            .unwrap();
        assert_eq!((a.version, a.state.as_str()), (1, "open"));
        assert_eq!(a.severity, "critical");
        assert_eq!(
            (a.provider.as_str(), a.kind.as_str()),
            ("juice", "juice.bulk_transfer")
        );
        let d = details(&a);
        assert_eq!(
            d["cancelled"],
            json!({"count": 2, "amounts": {"USD": 1_500}})
        );
        assert_eq!(
            d["not_cancelled"],
            json!({"count": 2, "amounts": {"USD": 2_700}})
        );
        assert_eq!(
            d["by_status"]["completed"],
            json!({"count": 1, "amounts": {"USD": 2_000}})
        );
        assert_eq!(
            d["by_status"]["processing"],
            json!({"count": 1, "amounts": {"USD": 700}})
        );
        assert_eq!(d["items_total"], 4);
        assert_eq!(d["not_cancelled_items"].as_array().unwrap().len(), 2);
        assert!(
            a.summary.contains("2 of 4 items cancelled"),
            "{}",
            a.summary
        );
        let rows = db::outbox(&db, &a.id).await;
        assert_eq!(rows.len(), 1, "one row for the default log sink");
        let payload: Value = serde_json::from_str(&rows[0].payload).unwrap();
        assert_eq!(payload["type"], "partial_cancellation");
        assert_eq!(payload["resource"]["id"], "bulk-1");
        assert_eq!(payload["details"], d);

        // The same state again: nothing new.
        recorded(&db, &config, bulk).await;
        let again = alert_of(&db, "partial_cancellation", "bulk-1")
            .await
            .unwrap();
        assert_eq!(again, a);
        assert_eq!(db::outbox(&db, &a.id).await.len(), 1);

        // The in-flight item settles: recording the item updates its bulk's alert.
        db::seed_resource(&db, &item("bulk-1", "t4", "completed", 700)).await;
        recorded(&db, &config, t4).await;
        let updated = alert_of(&db, "partial_cancellation", "bulk-1")
            .await
            .unwrap();
        assert_eq!(updated.id, a.id);
        assert_eq!(updated.version, 2);
        assert_eq!(
            details(&updated)["by_status"]["completed"],
            json!({"count": 2, "amounts": {"USD": 2_700}})
        );
        assert_eq!(details(&updated)["by_status"].get("processing"), None);
        let rows = db::outbox(&db, &a.id).await;
        assert_eq!(
            rows.iter().map(|r| r.alert_version).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(db::alerts(&db).await.len(), 1);
    }
}

both_engines! {
    #[tokio::test]
    async fn juice_partial_alert_resolves_when_the_late_item_is_seen_cancelled(engine) {
        let (_dir, config, db) = setup(engine).await;
        let bulk = db::seed_resource(
            &db,
            &res("juice.bulk_transfer", "bulk-late", "cancelled").terminal(),
        )
        .await;
        db::seed_resource(&db, &item("bulk-late", "l1", "cancelled", 100)).await;
        let l2 = db::seed_resource(&db, &item("bulk-late", "l2", "pending", 200)).await;
        recorded(&db, &config, bulk).await;
        let a = alert_of(&db, "partial_cancellation", "bulk-late")
            .await
            .unwrap();
        assert_eq!(
            details(&a)["not_cancelled"],
            json!({"count": 1, "amounts": {"USD": 200}})
        );
        db::seed_resource(&db, &item("bulk-late", "l2", "cancelled", 200)).await;
        recorded(&db, &config, l2).await;
        let r = alert_of(&db, "partial_cancellation", "bulk-late")
            .await
            .unwrap();
        assert_eq!((r.state.as_str(), r.version), ("resolved", 2));
    }
}

both_engines! {
    #[tokio::test]
    async fn juice_clean_cancel_and_running_bulk_raise_nothing(engine) {
        let (_dir, config, db) = setup(engine).await;
        let clean = db::seed_resource(
            &db,
            &res("juice.bulk_transfer", "bulk-clean", "cancelled").terminal(),
        )
        .await;
        db::seed_resource(&db, &item("bulk-clean", "c1", "cancelled", 100)).await;
        db::seed_resource(&db, &item("bulk-clean", "c2", "refunded", 200)).await;
        let running =
            db::seed_resource(&db, &res("juice.bulk_transfer", "bulk-run", "executing")).await;
        db::seed_resource(&db, &item("bulk-run", "r1", "completed", 100)).await;
        db::seed_resource(&db, &item("bulk-run", "r2", "pending", 100)).await;
        recorded(&db, &config, clean).await;
        recorded(&db, &config, running).await;
        assert!(db::alerts(&db).await.is_empty());
    }
}

both_engines! {
    #[tokio::test]
    async fn juice_cancel_answered_partial_fires_even_before_items_are_known(engine) {
        let (_dir, config, db) = setup(engine).await;
        let bulk = db::seed_resource(&db, &res("juice.bulk_transfer", "bulk-2", "executing")).await;
        db::seed_cancel_request(
            &db,
            &CancelSeed {
                provider: "juice",
                kind: "juice.bulk_transfer",
                resource_id: "bulk-2",
                idempotency_key: "idem-1",
                requested_by: "cli",
                requested_at: &ago(5),
                http_status: 400,
                outcome: "partial_cancellation",
                error_code: Some("partial_cancellation"),
                response_body: None,
                answered_at: &ago(4),
            },
        )
        .await;
        recorded(&db, &config, bulk).await;
        let a = alert_of(&db, "partial_cancellation", "bulk-2")
            .await
            .unwrap();
        let d = details(&a);
        assert_eq!(d["cancel_request"]["outcome"], "partial_cancellation");
        assert_eq!(d["items_total"], 0);

        // A disabled rule raises nothing.
        let (_dir2, mut off, db2) = setup(engine).await;
        off.alerts.partial_cancellation.enabled = false;
        let b = db::seed_resource(
            &db2,
            &res("juice.bulk_transfer", "bulk-3", "cancelled").terminal(),
        )
        .await;
        db::seed_resource(&db2, &item("bulk-3", "x1", "completed", 100)).await;
        recorded(&db2, &off, b).await;
        assert!(db::alerts(&db2).await.is_empty());
    }
}

/// Batch job progress counts observed now by an event.
async fn progress(db: &Store, rid: i64, status: &str, success: i64, failure: i64) {
    db::seed_progress(
        db,
        &ProgressSeed {
            rid,
            observed_at: NOW,
            status,
            success,
            failure,
            validated: None,
            trigger_type: "event",
        },
    )
    .await;
}

both_engines! {
    #[tokio::test]
    async fn batch_job_canceled_with_applied_records_fires_and_without_does_not(engine) {
        let (_dir, config, db) = setup(engine).await;
        let job = |id: &str, status: &str| res("stripe.batch_job", id, status);
        let applied = db::seed_resource(&db, &job("batchv2_applied", "canceled").terminal()).await;
        progress(&db, applied, "in_progress", 10, 0).await;
        progress(&db, applied, "canceled", 30, 2).await;
        let failed_only = db::seed_resource(&db, &job("batchv2_failed", "canceled").terminal()).await;
        progress(&db, failed_only, "canceled", 0, 1).await;
        let clean = db::seed_resource(&db, &job("batchv2_clean", "canceled").terminal()).await;
        progress(&db, clean, "canceled", 0, 0).await;
        let running = db::seed_resource(&db, &job("batchv2_running", "in_progress")).await;
        progress(&db, running, "in_progress", 5, 5).await;
        for rid in [applied, failed_only, clean, running] {
            recorded(&db, &config, rid).await;
        }
        let fired: Vec<String> = db::alerts(&db)
            .await
            .into_iter()
            .map(|a| format!("{}:{}", a.rule, a.resource_id))
            .collect();
        assert_eq!(
            fired,
            vec![
                "partial_cancellation:batchv2_applied",
                "partial_cancellation:batchv2_failed"
            ]
        );
        let a = alert_of(&db, "partial_cancellation", "batchv2_applied")
            .await
            .unwrap();
        assert_eq!(details(&a)["success_count"], 30);
        assert_eq!(details(&a)["failure_count"], 2);
    }
}

both_engines! {
    #[tokio::test]
    async fn cancel_not_effective_on_posted_not_on_canceled(engine) {
        let (_dir, config, db) = setup(engine).await;
        let obt = |id: &str, status: &str| res("stripe.outbound_transfer", id, status);
        let posted =
            db::seed_resource(&db, &obt("obt_posted", "posted").cancel_requested(&ago(30))).await;
        let canceled = db::seed_resource(
            &db,
            &obt("obt_canceled", "canceled")
                .terminal()
                .cancel_requested(&ago(30)),
        )
        .await;
        let processing = db::seed_resource(
            &db,
            &obt("obt_wait", "processing").cancel_requested(&ago(30)),
        )
        .await;
        let unrequested = db::seed_resource(&db, &obt("obt_plain", "posted")).await;
        for rid in [posted, canceled, processing, unrequested] {
            recorded(&db, &config, rid).await;
        }
        let all = db::alerts(&db).await;
        assert_eq!(all.len(), 1, "{all:?}");
        assert_eq!(
            (all[0].rule.as_str(), all[0].resource_id.as_str()),
            ("cancel_not_effective", "obt_posted")
        );
        assert_eq!(details(&all[0])["status"], "posted");
        assert_eq!(all[0].severity, "critical");
    }
}

both_engines! {
    #[tokio::test]
    async fn stuck_fires_past_its_limit_and_resolves_when_the_status_moves(engine) {
        let (_dir, config, db) = setup(engine).await;
        // Default limits: 6 h, `cancelling` 1 h.
        let mut old = res("stripe.outbound_transfer", "obt_old", "processing").since(&ago(7 * 3_600));
        let old_rid = db::seed_resource(&db, &old).await;
        db::seed_resource(
            &db,
            &res("stripe.outbound_transfer", "obt_young", "processing").since(&ago(5 * 3_600)),
        )
        .await;
        let mut cancelling = res("stripe.batch_job", "batchv2_c", "cancelling").since(&ago(3_601));
        db::seed_resource(&db, &cancelling).await;
        db::seed_resource(
            &db,
            &res("stripe.outbound_transfer", "obt_done", "posted").since(&ago(30 * 3_600)),
        )
        .await;

        scan_at(&db, &config, now()).await;
        let stuck: Vec<String> = db::alerts(&db)
            .await
            .into_iter()
            .map(|a| a.resource_id)
            .collect();
        assert_eq!(stuck, vec!["batchv2_c", "obt_old"]);
        let a = alert_of(&db, "stuck", "obt_old").await.unwrap();
        assert_eq!(details(&a)["status"], "processing");
        assert_eq!(details(&a)["limit_secs"], 21_600);

        // Scanning again later changes nothing while it stays stuck.
        scan_at(&db, &config, now() + chrono::Duration::seconds(600)).await;
        assert_eq!(alert_of(&db, "stuck", "obt_old").await.unwrap(), a);

        // It posts: recording it resolves the alert.
        old.status = "posted".into();
        old.status_since = Some(ago(0));
        db::seed_resource(&db, &old).await;
        recorded(&db, &config, old_rid).await;
        let resolved = alert_of(&db, "stuck", "obt_old").await.unwrap();
        assert_eq!((resolved.state.as_str(), resolved.version), ("resolved", 2));
        assert_eq!(resolved.resolved_at.as_deref(), Some(NOW));

        // The batch job reaches `canceled` without anyone recording it: the scan resolves it.
        cancelling.status = "canceled".into();
        cancelling.terminal = true;
        db::seed_resource(&db, &cancelling).await;
        scan_at(&db, &config, now()).await;
        assert_eq!(
            alert_of(&db, "stuck", "batchv2_c").await.unwrap().state,
            "resolved"
        );
        assert_eq!(alert_of(&db, "stuck", "obt_old").await.unwrap().version, 2);
    }
}

both_engines! {
    /// The pipeline's path: recording a fetched observation of a resource that
    /// moved on resolves its open `stuck` alert (the open alerts are read with
    /// the recorded rows).
    #[tokio::test]
    async fn a_recorded_observation_resolves_the_stuck_alert_it_ends(engine) {
        use cancelwatch::domain::observe::Trigger;
        use cancelwatch::providers::{Observation, StatusClass};
        let (_dir, config, db) = setup(engine).await;
        db::seed_resource(
            &db,
            &res("stripe.outbound_transfer", "obt_old", "processing").since(&ago(7 * 3_600)),
        )
        .await;
        scan_at(&db, &config, now()).await;
        assert_eq!(
            alert_of(&db, "stuck", "obt_old").await.unwrap().state,
            "open"
        );

        let posted = Observation {
            provider: "stripe",
            kind: "stripe.outbound_transfer".into(),
            id: "obt_old".into(),
            parent_id: None,
            status: "posted".into(),
            class: StatusClass::Settled,
            provider_at: None,
            amount: Some(100),
            currency: Some("usd".into()),
            livemode: Some(false),
            snapshot: json!({"id": "obt_old", "status": "posted"}).to_string(),
            progress: None,
            children: Vec::new(),
            refund: None,
        };
        let trigger = Trigger::event("evt_posted");
        db.record_observation(&config, &posted, &trigger, None, now())
            .await
            .unwrap();
        let resolved = alert_of(&db, "stuck", "obt_old").await.unwrap();
        assert_eq!((resolved.state.as_str(), resolved.version), ("resolved", 2));
    }
}

/// The refund of the cancelled Juice item `id` (1500 USD), opened
/// `opened_secs_ago`.
async fn refund(db: &Store, rid: i64, id: &str, status: &str, opened_secs_ago: i64) {
    db::seed_refund(
        db,
        &RefundSeed {
            rid,
            provider: "juice",
            kind: "juice.transfer",
            resource_id: id,
            parent_id: Some("bulk-r"),
            status,
            reason: "cancelled",
            amount: 1_500,
            currency: "USD",
            opened_at: &ago(opened_secs_ago),
            updated_at: NOW,
        },
    )
    .await;
}

both_engines! {
    #[tokio::test]
    async fn refund_overdue_fires_after_its_limit_and_resolves_when_completed(engine) {
        let (_dir, config, db) = setup(engine).await;
        let late = db::seed_resource(&db, &item("bulk-r", "late", "cancelled", 1_500)).await;
        let fresh = db::seed_resource(&db, &item("bulk-r", "fresh", "cancelled", 1_500)).await;
        let done = db::seed_resource(&db, &item("bulk-r", "done", "reversed", 1_500)).await;
        refund(&db, late, "late", "pending", 3 * 86_400 + 1).await;
        refund(&db, fresh, "fresh", "pending", 86_400).await;
        refund(&db, done, "done", "completed", 10 * 86_400).await;
        scan_at(&db, &config, now()).await;
        let fired: Vec<String> = db::alerts(&db)
            .await
            .into_iter()
            .map(|a| a.resource_id)
            .collect();
        assert_eq!(fired, vec!["late"]);
        let a = alert_of(&db, "refund_overdue", "late").await.unwrap();
        assert_eq!(details(&a)["amount"], 1_500);
        assert!(a.summary.contains("1500 USD"), "{}", a.summary);

        refund(&db, late, "late", "completed", 0).await;
        scan_at(&db, &config, now()).await;
        assert_eq!(
            alert_of(&db, "refund_overdue", "late").await.unwrap().state,
            "resolved"
        );
    }
}

both_engines! {
    #[tokio::test]
    async fn dead_letter_names_the_resource_or_the_delivery(engine) {
        let (_dir, config, db) = setup(engine).await;
        let dead = |key, kind, id| DeliverySeed {
            provider: "stripe",
            key,
            event_type: "v2.money_management.outbound_transfer.posted",
            event_id: None,
            resource_kind: kind,
            resource_id: id,
            raw_body: None,
            received_at: NOW,
            state: "dead",
            attempts: 12,
            next_attempt_at: NOW,
        };
        let with_resource = db::seed_delivery(
            &db,
            &dead("evt_1", Some("stripe.outbound_transfer"), Some("obt_9")),
        )
        .await;
        let without = db::seed_delivery(&db, &dead("evt_2", None, None)).await;
        for id in [with_resource, without] {
            db::on_dead_letter(&db, &config, id, "fetch failed: HTTP 500", NOW).await;
        }
        let a = alert_of(&db, "dead_letter", "obt_9").await.unwrap();
        assert_eq!(a.kind, "stripe.outbound_transfer");
        assert_eq!(details(&a)["error"], "fetch failed: HTTP 500");
        assert_eq!(details(&a)["attempts"], 12);
        let b = alert_of(&db, "dead_letter", "evt_2").await.unwrap();
        assert_eq!(
            (b.provider.as_str(), b.kind.as_str()),
            ("stripe", "delivery")
        );
        assert_eq!(db::alerts(&db).await.len(), 2);
    }
}

/// A Stripe-style refusal (a signature that does not match) `secs_ago`.
async fn refusal(db: &Store, provider: &str, secs_ago: i64) {
    db::seed_refusal(db, provider, "invalid_signature", &ago(secs_ago)).await;
}

both_engines! {
    #[tokio::test]
    async fn verification_failures_fire_above_the_threshold_only(engine) {
        let (_dir, mut config, db) = setup(engine).await;
        config.alerts.verification_failures.threshold = 3;
        config.alerts.verification_failures.window_secs = 300;
        for _ in 0..3 {
            refusal(&db, "stripe", 10).await;
        }
        refusal(&db, "stripe", 301).await; // outside the window
        refusal(&db, "juice", 10).await;
        scan_at(&db, &config, now()).await;
        assert!(
            db::alerts(&db).await.is_empty(),
            "3 in the window is not more than 3"
        );

        refusal(&db, "stripe", 5).await;
        scan_at(&db, &config, now()).await;
        let a = alert_of(&db, "verification_failures", "stripe")
            .await
            .unwrap();
        assert_eq!(
            (a.provider.as_str(), a.kind.as_str()),
            ("stripe", "webhook")
        );
        assert_eq!(details(&a)["refused"], 4);
        assert_eq!(details(&a)["by_reason"]["invalid_signature"], 4);
        assert_eq!(db::alerts(&db).await.len(), 1);

        // More refusals while it is open: left as raised.
        refusal(&db, "stripe", 1).await;
        scan_at(&db, &config, now()).await;
        assert_eq!(
            alert_of(&db, "verification_failures", "stripe")
                .await
                .unwrap()
                .version,
            1
        );

        // Ten minutes on, the window is clean: resolved.
        scan_at(&db, &config, now() + chrono::Duration::seconds(600)).await;
        let r = alert_of(&db, "verification_failures", "stripe")
            .await
            .unwrap();
        assert_eq!((r.state.as_str(), r.version), ("resolved", 2));
    }
}
