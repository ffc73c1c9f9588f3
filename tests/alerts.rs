//! Alerts: each rule fires exactly when it should (seeded database state, rules
//! called directly), and the outbox of a real daemon delivers at least once,
//! signed, with retries, across a restart, per sink independently.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use cancelwatch::alerts::{rules, scan};
use cancelwatch::config::SinkConfig;
use cancelwatch::store::alerts::{Alert, NewAlert};
use cancelwatch::store::Db;
use cancelwatch::Config;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::SqlitePool;

const NOW: &str = "2026-10-30T12:00:00.000Z";

fn now() -> cancelwatch::time::Timestamp {
    cancelwatch::time::parse_lenient(NOW).unwrap()
}

/// `NOW` minus `secs`, as stored.
fn ago(secs: i64) -> String {
    cancelwatch::time::fmt(now() - chrono::Duration::seconds(secs))
}

fn config_in(dir: &Path) -> Config {
    let mut config = Config::default();
    config.database.url = format!("sqlite://{}/cw.db", dir.display());
    config.alerts.scan_interval_secs = 1;
    config.alerts.delivery.poll_interval_ms = 20;
    config.alerts.delivery.backoff_base_ms = 20;
    config.alerts.delivery.backoff_max_secs = 1;
    config
}

async fn setup() -> (tempfile::TempDir, Config, Db) {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let db = cancelwatch::open_db(&config).await.unwrap();
    (dir, config, db)
}

/// A resource row as the pipeline would have recorded it.
#[derive(Clone)]
struct Res<'a> {
    provider: &'a str,
    kind: &'a str,
    id: &'a str,
    parent_id: Option<&'a str>,
    status: &'a str,
    terminal: bool,
    amount: Option<i64>,
    status_since: String,
    cancel_requested_at: Option<String>,
}

impl<'a> Res<'a> {
    fn new(kind: &'a str, id: &'a str, status: &'a str) -> Self {
        Res {
            provider: if kind.starts_with("juice") {
                "juice"
            } else {
                "stripe"
            },
            kind,
            id,
            parent_id: None,
            status,
            terminal: false,
            amount: None,
            status_since: ago(60),
            cancel_requested_at: None,
        }
    }

    fn item(bulk: &'a str, id: &'a str, status: &'a str, amount: i64) -> Self {
        Res {
            parent_id: Some(bulk),
            amount: Some(amount),
            ..Res::new("juice.transfer", id, status)
        }
    }

    fn terminal(mut self) -> Self {
        self.terminal = true;
        self
    }

    async fn insert(&self, db: &Db) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO resources (provider, kind, id, parent_id, status, terminal, amount, currency,
                                    status_since, first_seen_at, cancel_requested_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, 'USD', ?, ?, ?)
             ON CONFLICT (provider, kind, id) DO UPDATE SET status = excluded.status,
                 terminal = excluded.terminal, status_since = excluded.status_since,
                 cancel_requested_at = excluded.cancel_requested_at
             RETURNING rid",
        )
        .bind(self.provider)
        .bind(self.kind)
        .bind(self.id)
        .bind(self.parent_id)
        .bind(self.status)
        .bind(self.terminal)
        .bind(self.amount)
        .bind(&self.status_since)
        .bind(ago(86_400))
        .bind(&self.cancel_requested_at)
        .fetch_one(&db.write)
        .await
        .unwrap()
    }
}

async fn recorded(db: &Db, config: &Config, rid: i64) {
    let mut tx = db.write.begin().await.unwrap();
    rules::on_resource_recorded(&mut tx, config, rid, NOW, &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

async fn scan_at(db: &Db, config: &Config, at: cancelwatch::time::Timestamp) {
    scan::scan_once(db, config, at).await.unwrap();
}

/// Every alert, by rule and resource id.
async fn alerts(db: &Db) -> Vec<Alert> {
    sqlx::query_as::<_, Alert>(
        "SELECT id, rule, severity, provider, kind, resource_id, summary, details, state, version,
                created_at, updated_at, resolved_at
         FROM alerts ORDER BY rule, resource_id",
    )
    .fetch_all(&db.read)
    .await
    .unwrap()
}

async fn alert_of(db: &Db, rule: &str, resource_id: &str) -> Option<Alert> {
    alerts(db)
        .await
        .into_iter()
        .find(|a| a.rule == rule && a.resource_id == resource_id)
}

fn details(a: &Alert) -> Value {
    serde_json::from_str(&a.details).unwrap()
}

async fn outbox_rows(db: &Db, alert_id: &str) -> Vec<(i64, String, String)> {
    sqlx::query_as(
        "SELECT alert_version, sink, payload FROM alert_outbox WHERE alert_id = ? ORDER BY id",
    )
    .bind(alert_id)
    .fetch_all(&db.read)
    .await
    .unwrap()
}

// ---- Rules ---------------------------------------------------------------

#[tokio::test]
async fn juice_partial_cancellation_fires_counts_items_and_updates() {
    let (_dir, config, db) = setup().await;
    let bulk = Res::new("juice.bulk_transfer", "bulk-1", "cancelled")
        .terminal()
        .insert(&db)
        .await;
    Res::item("bulk-1", "t1", "cancelled", 1_000)
        .insert(&db)
        .await;
    Res::item("bulk-1", "t2", "reversed", 500).insert(&db).await;
    Res::item("bulk-1", "t3", "completed", 2_000)
        .insert(&db)
        .await;
    let t4 = Res::item("bulk-1", "t4", "processing", 700)
        .insert(&db)
        .await;
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
    assert_eq!(d["cancelled"], json!({"count": 2, "amount": 1_500}));
    assert_eq!(d["not_cancelled"], json!({"count": 2, "amount": 2_700}));
    assert_eq!(
        d["by_status"]["completed"],
        json!({"count": 1, "amount": 2_000})
    );
    assert_eq!(
        d["by_status"]["processing"],
        json!({"count": 1, "amount": 700})
    );
    assert_eq!(d["items_total"], 4);
    assert_eq!(d["not_cancelled_items"].as_array().unwrap().len(), 2);
    assert!(
        a.summary.contains("2 of 4 items cancelled"),
        "{}",
        a.summary
    );
    let rows = outbox_rows(&db, &a.id).await;
    assert_eq!(rows.len(), 1, "one row for the default log sink");
    let payload: Value = serde_json::from_str(&rows[0].2).unwrap();
    assert_eq!(payload["type"], "partial_cancellation");
    assert_eq!(payload["resource"]["id"], "bulk-1");
    assert_eq!(payload["details"], d);

    // The same state again: nothing new.
    recorded(&db, &config, bulk).await;
    let again = alert_of(&db, "partial_cancellation", "bulk-1")
        .await
        .unwrap();
    assert_eq!(again, a);
    assert_eq!(outbox_rows(&db, &a.id).await.len(), 1);

    // The in-flight item settles: recording the item updates its bulk's alert.
    Res::item("bulk-1", "t4", "completed", 700)
        .insert(&db)
        .await;
    recorded(&db, &config, t4).await;
    let updated = alert_of(&db, "partial_cancellation", "bulk-1")
        .await
        .unwrap();
    assert_eq!(updated.id, a.id);
    assert_eq!(updated.version, 2);
    assert_eq!(
        details(&updated)["by_status"]["completed"],
        json!({"count": 2, "amount": 2_700})
    );
    assert_eq!(details(&updated)["by_status"].get("processing"), None);
    let rows = outbox_rows(&db, &a.id).await;
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(alerts(&db).await.len(), 1);
}

#[tokio::test]
async fn juice_partial_alert_resolves_when_the_late_item_is_seen_cancelled() {
    let (_dir, config, db) = setup().await;
    let bulk = Res::new("juice.bulk_transfer", "bulk-late", "cancelled")
        .terminal()
        .insert(&db)
        .await;
    Res::item("bulk-late", "l1", "cancelled", 100)
        .insert(&db)
        .await;
    let l2 = Res::item("bulk-late", "l2", "pending", 200)
        .insert(&db)
        .await;
    recorded(&db, &config, bulk).await;
    let a = alert_of(&db, "partial_cancellation", "bulk-late")
        .await
        .unwrap();
    assert_eq!(
        details(&a)["not_cancelled"],
        json!({"count": 1, "amount": 200})
    );
    Res::item("bulk-late", "l2", "cancelled", 200)
        .insert(&db)
        .await;
    recorded(&db, &config, l2).await;
    let r = alert_of(&db, "partial_cancellation", "bulk-late")
        .await
        .unwrap();
    assert_eq!((r.state.as_str(), r.version), ("resolved", 2));
}

#[tokio::test]
async fn juice_clean_cancel_and_running_bulk_raise_nothing() {
    let (_dir, config, db) = setup().await;
    let clean = Res::new("juice.bulk_transfer", "bulk-clean", "cancelled")
        .terminal()
        .insert(&db)
        .await;
    Res::item("bulk-clean", "c1", "cancelled", 100)
        .insert(&db)
        .await;
    Res::item("bulk-clean", "c2", "refunded", 200)
        .insert(&db)
        .await;
    let running = Res::new("juice.bulk_transfer", "bulk-run", "executing")
        .insert(&db)
        .await;
    Res::item("bulk-run", "r1", "completed", 100)
        .insert(&db)
        .await;
    Res::item("bulk-run", "r2", "pending", 100)
        .insert(&db)
        .await;
    recorded(&db, &config, clean).await;
    recorded(&db, &config, running).await;
    assert!(alerts(&db).await.is_empty());
}

#[tokio::test]
async fn juice_cancel_answered_partial_fires_even_before_items_are_known() {
    let (_dir, config, db) = setup().await;
    let bulk = Res::new("juice.bulk_transfer", "bulk-2", "executing")
        .insert(&db)
        .await;
    sqlx::query(
        "INSERT INTO cancel_requests (provider, kind, resource_id, idempotency_key, requested_by,
                                      requested_at, http_status, outcome, error_code, answered_at)
         VALUES ('juice', 'juice.bulk_transfer', 'bulk-2', 'idem-1', 'cli', ?, 400,
                 'partial_cancellation', 'partial_cancellation', ?)",
    )
    .bind(ago(5))
    .bind(ago(4))
    .execute(&db.write)
    .await
    .unwrap();
    recorded(&db, &config, bulk).await;
    let a = alert_of(&db, "partial_cancellation", "bulk-2")
        .await
        .unwrap();
    let d = details(&a);
    assert_eq!(d["cancel_request"]["outcome"], "partial_cancellation");
    assert_eq!(d["items_total"], 0);

    // A disabled rule raises nothing.
    let (_dir2, mut off, db2) = setup().await;
    off.alerts.partial_cancellation.enabled = false;
    let b = Res::new("juice.bulk_transfer", "bulk-3", "cancelled")
        .terminal()
        .insert(&db2)
        .await;
    Res::item("bulk-3", "x1", "completed", 100)
        .insert(&db2)
        .await;
    recorded(&db2, &off, b).await;
    assert!(alerts(&db2).await.is_empty());
}

async fn progress(db: &Db, rid: i64, status: &str, success: i64, failure: i64) {
    sqlx::query(
        "INSERT INTO progress (rid, observed_at, status, success_count, failure_count, trigger_type)
         VALUES (?, ?, ?, ?, ?, 'event')",
    )
    .bind(rid)
    .bind(NOW)
    .bind(status)
    .bind(success)
    .bind(failure)
    .execute(&db.write)
    .await
    .unwrap();
}

#[tokio::test]
async fn batch_job_canceled_with_applied_records_fires_and_without_does_not() {
    let (_dir, config, db) = setup().await;
    let applied = Res::new("stripe.batch_job", "batchv2_applied", "canceled")
        .terminal()
        .insert(&db)
        .await;
    progress(&db, applied, "in_progress", 10, 0).await;
    progress(&db, applied, "canceled", 30, 2).await;
    let failed_only = Res::new("stripe.batch_job", "batchv2_failed", "canceled")
        .terminal()
        .insert(&db)
        .await;
    progress(&db, failed_only, "canceled", 0, 1).await;
    let clean = Res::new("stripe.batch_job", "batchv2_clean", "canceled")
        .terminal()
        .insert(&db)
        .await;
    progress(&db, clean, "canceled", 0, 0).await;
    let running = Res::new("stripe.batch_job", "batchv2_running", "in_progress")
        .insert(&db)
        .await;
    progress(&db, running, "in_progress", 5, 5).await;
    for rid in [applied, failed_only, clean, running] {
        recorded(&db, &config, rid).await;
    }
    let fired: Vec<String> = alerts(&db)
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

#[tokio::test]
async fn cancel_not_effective_on_posted_not_on_canceled() {
    let (_dir, config, db) = setup().await;
    let mut posted = Res::new("stripe.outbound_transfer", "obt_posted", "posted");
    posted.cancel_requested_at = Some(ago(30));
    let posted = posted.insert(&db).await;
    let mut canceled = Res::new("stripe.outbound_transfer", "obt_canceled", "canceled").terminal();
    canceled.cancel_requested_at = Some(ago(30));
    let canceled = canceled.insert(&db).await;
    let mut processing = Res::new("stripe.outbound_transfer", "obt_wait", "processing");
    processing.cancel_requested_at = Some(ago(30));
    let processing = processing.insert(&db).await;
    let unrequested = Res::new("stripe.outbound_transfer", "obt_plain", "posted")
        .insert(&db)
        .await;
    for rid in [posted, canceled, processing, unrequested] {
        recorded(&db, &config, rid).await;
    }
    let all = alerts(&db).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(
        (all[0].rule.as_str(), all[0].resource_id.as_str()),
        ("cancel_not_effective", "obt_posted")
    );
    assert_eq!(details(&all[0])["status"], "posted");
    assert_eq!(all[0].severity, "critical");
}

#[tokio::test]
async fn stuck_fires_past_its_limit_and_resolves_when_the_status_moves() {
    let (_dir, config, db) = setup().await;
    // Default limits: 6 h, `cancelling` 1 h.
    let mut old = Res::new("stripe.outbound_transfer", "obt_old", "processing");
    old.status_since = ago(7 * 3_600);
    let old_rid = old.insert(&db).await;
    let mut young = Res::new("stripe.outbound_transfer", "obt_young", "processing");
    young.status_since = ago(5 * 3_600);
    young.insert(&db).await;
    let mut cancelling = Res::new("stripe.batch_job", "batchv2_c", "cancelling");
    cancelling.status_since = ago(3_601);
    cancelling.insert(&db).await;
    let mut settled = Res::new("stripe.outbound_transfer", "obt_done", "posted");
    settled.status_since = ago(30 * 3_600);
    settled.insert(&db).await;

    scan_at(&db, &config, now()).await;
    let stuck: Vec<String> = alerts(&db)
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
    old.status = "posted";
    old.status_since = ago(0);
    old.insert(&db).await;
    recorded(&db, &config, old_rid).await;
    let resolved = alert_of(&db, "stuck", "obt_old").await.unwrap();
    assert_eq!((resolved.state.as_str(), resolved.version), ("resolved", 2));
    assert_eq!(resolved.resolved_at.as_deref(), Some(NOW));

    // The batch job reaches `canceled` without anyone recording it: the scan resolves it.
    cancelling.status = "canceled";
    cancelling.terminal = true;
    cancelling.insert(&db).await;
    scan_at(&db, &config, now()).await;
    assert_eq!(
        alert_of(&db, "stuck", "batchv2_c").await.unwrap().state,
        "resolved"
    );
    assert_eq!(alert_of(&db, "stuck", "obt_old").await.unwrap().version, 2);
}

/// The pipeline's path: recording a fetched observation of a resource that
/// moved on resolves its open `stuck` alert (the open alerts are read with
/// the recorded rows).
#[tokio::test]
async fn a_recorded_observation_resolves_the_stuck_alert_it_ends() {
    use cancelwatch::pipeline::record::{record_all, ToRecord, Trigger};
    use cancelwatch::providers::{Observation, StatusClass};
    let (_dir, config, db) = setup().await;
    let mut old = Res::new("stripe.outbound_transfer", "obt_old", "processing");
    old.status_since = ago(7 * 3_600);
    old.insert(&db).await;
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
    let item = ToRecord {
        obs: &posted,
        trigger: &trigger,
        context: None,
    };
    let mut tx = db.write.begin().await.unwrap();
    record_all(&mut tx, &config, &[item], now(), &mut Vec::new())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let resolved = alert_of(&db, "stuck", "obt_old").await.unwrap();
    assert_eq!((resolved.state.as_str(), resolved.version), ("resolved", 2));
}

async fn refund(db: &Db, rid: i64, id: &str, status: &str, opened_secs_ago: i64) {
    sqlx::query(
        "INSERT INTO refunds (rid, provider, kind, resource_id, parent_id, status, reason, amount,
                              currency, opened_at, updated_at, trigger_type)
         VALUES (?, 'juice', 'juice.transfer', ?, 'bulk-r', ?, 'cancelled', 1500, 'USD', ?, ?, 'event')
         ON CONFLICT (rid) DO UPDATE SET status = excluded.status",
    )
    .bind(rid)
    .bind(id)
    .bind(status)
    .bind(ago(opened_secs_ago))
    .bind(NOW)
    .execute(&db.write)
    .await
    .unwrap();
}

#[tokio::test]
async fn refund_overdue_fires_after_its_limit_and_resolves_when_completed() {
    let (_dir, config, db) = setup().await;
    let late = Res::item("bulk-r", "late", "cancelled", 1_500)
        .insert(&db)
        .await;
    let fresh = Res::item("bulk-r", "fresh", "cancelled", 1_500)
        .insert(&db)
        .await;
    let done = Res::item("bulk-r", "done", "reversed", 1_500)
        .insert(&db)
        .await;
    refund(&db, late, "late", "pending", 3 * 86_400 + 1).await;
    refund(&db, fresh, "fresh", "pending", 86_400).await;
    refund(&db, done, "done", "completed", 10 * 86_400).await;
    scan_at(&db, &config, now()).await;
    let fired: Vec<String> = alerts(&db)
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

#[tokio::test]
async fn dead_letter_names_the_resource_or_the_delivery() {
    let (_dir, config, db) = setup().await;
    let insert = |key: &'static str, kind: Option<&'static str>, id: Option<&'static str>| {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "INSERT INTO inbox (provider, dedupe_key, event_type, resource_kind, resource_id,
                                    body_size, received_at, state, attempts, next_attempt_at)
                 VALUES ('stripe', ?, 'v2.money_management.outbound_transfer.posted', ?, ?, 10, ?,
                         'dead', 12, ?)
                 RETURNING id",
            )
            .bind(key)
            .bind(kind)
            .bind(id)
            .bind(NOW)
            .bind(NOW)
            .fetch_one(&db.write)
            .await
            .unwrap()
        }
    };
    let with_resource = insert("evt_1", Some("stripe.outbound_transfer"), Some("obt_9")).await;
    let without = insert("evt_2", None, None).await;
    for id in [with_resource, without] {
        let mut tx = db.write.begin().await.unwrap();
        rules::on_dead_letter(
            &mut tx,
            &config,
            id,
            "fetch failed: HTTP 500",
            NOW,
            &mut Vec::new(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
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
    assert_eq!(alerts(&db).await.len(), 2);
}

async fn refusal(db: &Db, provider: &str, secs_ago: i64) {
    sqlx::query(
        "INSERT INTO refusals (provider, reason, message, http_status, received_at)
         VALUES (?, 'invalid_signature', 'no match', 401, ?)",
    )
    .bind(provider)
    .bind(ago(secs_ago))
    .execute(&db.write)
    .await
    .unwrap();
}

#[tokio::test]
async fn verification_failures_fire_above_the_threshold_only() {
    let (_dir, mut config, db) = setup().await;
    config.alerts.verification_failures.threshold = 3;
    config.alerts.verification_failures.window_secs = 300;
    for _ in 0..3 {
        refusal(&db, "stripe", 10).await;
    }
    refusal(&db, "stripe", 301).await; // outside the window
    refusal(&db, "juice", 10).await;
    scan_at(&db, &config, now()).await;
    assert!(
        alerts(&db).await.is_empty(),
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
    assert_eq!(alerts(&db).await.len(), 1);

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

// ---- Delivery ------------------------------------------------------------

/// A sink receiver on 127.0.0.1: records requests, answers from a script.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<ReceiverState>>);

#[derive(Default)]
struct ReceiverState {
    requests: Vec<(HeaderMap, Bytes, u16)>,
    /// Statuses answered first, in order; then 200.
    script: VecDeque<u16>,
    /// While true, every request is answered 503.
    down: bool,
    /// Never answer (until the test ends).
    hang: bool,
}

impl Receiver {
    async fn start(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/alerts", listener.local_addr().unwrap());
        let app = axum::Router::new()
            .route("/alerts", post(receive))
            .with_state(self);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    fn requests(&self) -> Vec<(HeaderMap, Bytes, u16)> {
        self.0.lock().unwrap().requests.clone()
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let (status, hang) = {
        let mut s = r.0.lock().unwrap();
        let status = if s.down {
            503
        } else {
            s.script.pop_front().unwrap_or(200)
        };
        s.requests.push((headers, body, status));
        (status, s.hang)
    };
    if hang {
        tokio::time::sleep(Duration::from_secs(300)).await;
    }
    StatusCode::from_u16(status).unwrap()
}

const SECRET_KEY: &[u8] = b"a test key of 32 bytes, no more.";

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

/// Raises one alert straight into the database (as a rule would) and closes it.
async fn raise_one(config: &Config, resource_id: &str) -> Alert {
    let db = cancelwatch::open_db(config).await.unwrap();
    let mut tx = db.write.begin().await.unwrap();
    let outcome = cancelwatch::alerts::raise(
        &mut tx,
        config,
        &NewAlert {
            rule: "partial_cancellation".into(),
            severity: "critical".into(),
            provider: "juice".into(),
            kind: "juice.bulk_transfer".into(),
            resource_id: resource_id.into(),
            summary: "1 of 2 items cancelled".into(),
            details: json!({"cancelled": {"count": 1, "amount": 100}}),
        },
        &cancelwatch::time::now_str(),
        &mut Vec::new(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    db.close().await;
    outcome.alert().clone()
}

/// Alerts queued for a sink that was then removed from the configuration
/// are kept (pending) and named at start, with how many wait.
#[tokio::test]
async fn alerts_waiting_for_a_removed_sink_are_kept_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![
        command_sink("kept", &dir.path().join("kept.json")),
        command_sink("gone", &dir.path().join("gone.json")),
    ];
    raise_one(&config, "bulk_orphan_1").await;
    raise_one(&config, "bulk_orphan_2").await;
    config.alerts.sinks.truncate(1);
    let db = cancelwatch::open_db(&config).await.unwrap();
    let orphaned = cancelwatch::alerts::outbox::orphaned(&db, &config)
        .await
        .unwrap();
    assert_eq!(orphaned, vec![("gone".to_string(), 2)]);
    db.close().await;
}

/// A running daemon; dropping the sender stops it.
struct Daemon {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    async fn start(config: &Config) -> Daemon {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(cancelwatch::run_until(config.clone(), listener, async {
            let _ = rx.await;
        }));
        Daemon { stop, handle }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
    }
}

/// A read-only view of the daemon's database.
async fn reader(config: &Config) -> SqlitePool {
    let path: PathBuf = config.database_path().unwrap();
    SqlitePool::connect_with(SqliteConnectOptions::new().filename(path).read_only(true))
        .await
        .unwrap()
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn outbox_state(pool: &SqlitePool, alert_id: &str, sink: &str) -> (String, i64) {
    sqlx::query_as("SELECT state, attempts FROM alert_outbox WHERE alert_id = ? AND sink = ?")
        .bind(alert_id)
        .bind(sink)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn attempts(
    pool: &SqlitePool,
    alert_id: &str,
    sink: &str,
) -> Vec<(Option<i64>, Option<String>)> {
    sqlx::query_as(
        "SELECT a.status_code, a.error FROM alert_attempts a JOIN alert_outbox o ON o.id = a.outbox_id
         WHERE o.alert_id = ? AND o.sink = ? ORDER BY a.id",
    )
    .bind(alert_id)
    .bind(sink)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Verifies a Standard Webhooks signature from first principles.
fn standard_webhooks_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET_KEY).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn webhook_sink_gets_a_standard_webhooks_signed_alert() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let url = receiver.clone().start().await;
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![webhook_sink("hook", &url)];
    let alert = raise_one(&config, "bulk-sig").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("delivery", || async {
        outbox_state(&db, &alert.id, "hook").await.0 == "delivered"
    })
    .await;
    daemon.stop().await;

    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let (headers, body, _) = &requests[0];
    let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_string();
    assert_eq!(header("webhook-id"), format!("{}_v1", alert.id));
    assert_eq!(header("content-type"), "application/json");
    let timestamp = header("webhook-timestamp");
    assert!(timestamp.parse::<i64>().unwrap() > 1_700_000_000);
    let expected = standard_webhooks_signature(&header("webhook-id"), &timestamp, body);
    assert_eq!(header("webhook-signature"), expected);
    let tampered = standard_webhooks_signature(&header("webhook-id"), &timestamp, b"{}");
    assert_ne!(header("webhook-signature"), tampered);

    let payload: Value = serde_json::from_slice(body).unwrap();
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
        attempts(&db, &alert.id, "hook").await,
        vec![(Some(200), None)]
    );
}

#[tokio::test]
async fn failing_receiver_is_retried_until_delivered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    receiver.0.lock().unwrap().script = VecDeque::from([500, 500]);
    let url = receiver.clone().start().await;
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![webhook_sink("hook", &url)];
    let alert = raise_one(&config, "bulk-retry").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("delivery after retries", || async {
        outbox_state(&db, &alert.id, "hook").await.0 == "delivered"
    })
    .await;
    // Give a wrongly repeating loop the chance to show itself, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    daemon.stop().await;

    let requests = receiver.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.2).collect();
    assert_eq!(statuses, vec![500, 500, 200]);
    let ids: Vec<&str> = requests
        .iter()
        .map(|r| r.0.get("webhook-id").unwrap().to_str().unwrap())
        .collect();
    assert!(ids.iter().all(|id| *id == format!("{}_v1", alert.id)));
    assert_eq!(
        outbox_state(&db, &alert.id, "hook").await,
        ("delivered".into(), 3)
    );
    let recorded = attempts(&db, &alert.id, "hook").await;
    let codes: Vec<Option<i64>> = recorded.iter().map(|a| a.0).collect();
    assert_eq!(codes, vec![Some(500), Some(500), Some(200)]);
    assert!(recorded[0].1.as_deref().unwrap().contains("500"));
    assert_eq!(recorded[2].1, None);
}

#[tokio::test]
async fn pending_alert_survives_a_restart_and_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    receiver.0.lock().unwrap().down = true;
    let url = receiver.clone().start().await;
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![webhook_sink("hook", &url)];
    let alert = raise_one(&config, "bulk-restart").await;

    let first = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("a failed attempt", || async {
        !attempts(&db, &alert.id, "hook").await.is_empty()
    })
    .await;
    first.stop().await;
    let (state, _) = outbox_state(&db, &alert.id, "hook").await;
    assert_eq!(state, "pending");

    receiver.0.lock().unwrap().down = false;
    let second = Daemon::start(&config).await;
    wait_for("delivery after the restart", || async {
        outbox_state(&db, &alert.id, "hook").await.0 == "delivered"
    })
    .await;
    second.stop().await;
    let tried = attempts(&db, &alert.id, "hook").await;
    assert_eq!(tried.first().unwrap().0, Some(503));
    assert_eq!(tried.last().unwrap().0, Some(200));
    let delivered: Vec<_> = receiver
        .requests()
        .into_iter()
        .filter(|r| r.2 == 200)
        .collect();
    assert_eq!(delivered.len(), 1);
}

#[tokio::test]
async fn command_sink_gets_the_alert_json_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alert.json");
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![command_sink("cmd", &out)];
    let alert = raise_one(&config, "bulk-cmd").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("command delivery", || async {
        outbox_state(&db, &alert.id, "cmd").await.0 == "delivered"
    })
    .await;
    daemon.stop().await;
    let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(got, alert.payload());
}

#[tokio::test]
async fn failing_command_is_recorded_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![SinkConfig {
        name: "broken".into(),
        kind: "command".into(),
        command: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()],
        ..SinkConfig::default()
    }];
    let alert = raise_one(&config, "bulk-broken").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("two failed attempts", || async {
        attempts(&db, &alert.id, "broken").await.len() >= 2
    })
    .await;
    daemon.stop().await;
    let (state, count) = outbox_state(&db, &alert.id, "broken").await;
    assert_eq!(state, "pending");
    assert!(count >= 2);
    let error = attempts(&db, &alert.id, "broken").await[0]
        .1
        .clone()
        .unwrap();
    assert!(error.contains("nope"), "{error}");
}

#[tokio::test]
async fn a_hanging_sink_does_not_hold_up_another() {
    let dir = tempfile::tempdir().unwrap();
    let hanging = Receiver::default();
    hanging.0.lock().unwrap().hang = true;
    let url = hanging.clone().start().await;
    let out = dir.path().join("alert.json");
    let mut config = config_in(dir.path());
    // Long enough that the hanging sink is still waiting when the test ends.
    config.alerts.delivery.timeout_secs = 120;
    config.alerts.sinks = vec![
        webhook_sink("hanging", &url),
        webhook_sink("refused", "http://127.0.0.1:9/alerts"),
        command_sink("cmd", &out),
    ];
    let alert = raise_one(&config, "bulk-indep").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("the hanging sink to be called", || async {
        !hanging.requests().is_empty()
    })
    .await;
    wait_for("the command sink's delivery", || async {
        outbox_state(&db, &alert.id, "cmd").await.0 == "delivered"
    })
    .await;
    assert_eq!(
        outbox_state(&db, &alert.id, "hanging").await,
        ("pending".into(), 0)
    );
    assert_eq!(outbox_state(&db, &alert.id, "refused").await.0, "pending");
    daemon.stop().await;
    assert!(out.exists());
}

#[tokio::test]
async fn refused_deliveries_raise_an_alert_in_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alert.json");
    let mut config = config_in(dir.path());
    config.stripe.webhook_secrets = vec!["whsec_test_secret".into()];
    config.alerts.verification_failures.threshold = 1;
    config.alerts.sinks = vec![command_sink("cmd", &out), SinkConfig::default()];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(cancelwatch::run_until(config.clone(), listener, async {
        let _ = rx.await;
    }));
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let resp = http
            .post(format!("{base}/webhooks/stripe"))
            .header("stripe-signature", "t=1,v1=00")
            .body(r#"{"id":"evt_1"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    wait_for("the alert file", || async { out.exists() }).await;
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("cancelwatch_alerts_raised_total{rule=\"verification_failures\"}"),
        "{metrics}"
    );
    let db = reader(&config).await;
    wait_for("delivery to both sinks", || async {
        let delivered: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM alert_outbox WHERE state = 'delivered'")
                .fetch_one(&db)
                .await
                .unwrap();
        delivered == 2
    })
    .await;
    let _ = stop.send(());
    handle.await.unwrap().unwrap();
    let got: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(got["type"], "verification_failures");
    assert_eq!(
        got["resource"],
        json!({"provider": "stripe", "kind": "webhook", "id": "stripe"})
    );
    assert_eq!(got["details"]["refused"], 2);
}

#[tokio::test]
async fn slack_sink_gets_one_readable_line() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let url = receiver.clone().start().await;
    let mut config = config_in(dir.path());
    config.alerts.sinks = vec![SinkConfig {
        name: "chat".into(),
        kind: "slack".into(),
        url,
        ..SinkConfig::default()
    }];
    let alert = raise_one(&config, "bulk-slack").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("slack delivery", || async {
        outbox_state(&db, &alert.id, "chat").await.0 == "delivered"
    })
    .await;
    daemon.stop().await;
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    let body: Value = serde_json::from_slice(&requests[0].1).unwrap();
    assert_eq!(
        body,
        json!({"text": "[CRITICAL] partial_cancellation: juice.bulk_transfer bulk-slack (juice): 1 of 2 items cancelled"})
    );
}

#[tokio::test]
async fn command_sink_is_killed_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_in(dir.path());
    config.alerts.delivery.timeout_secs = 1;
    config.alerts.sinks = vec![SinkConfig {
        name: "slow".into(),
        kind: "command".into(),
        command: vec!["sleep".into(), "30".into()],
        ..SinkConfig::default()
    }];
    let alert = raise_one(&config, "bulk-slow").await;
    let daemon = Daemon::start(&config).await;
    let db = reader(&config).await;
    wait_for("a timed-out attempt", || async {
        !attempts(&db, &alert.id, "slow").await.is_empty()
    })
    .await;
    daemon.stop().await;
    let error = attempts(&db, &alert.id, "slow").await[0].1.clone().unwrap();
    assert!(error.contains("did not finish within 1 s"), "{error}");
    assert_eq!(outbox_state(&db, &alert.id, "slow").await.0, "pending");
}

// ---- End to end with the pipeline and the simulator ------------------------

/// A daemon with a simulator in front of it, and a command sink appending
/// each alert as a line to `alerts.jsonl` in `dir`.
struct SimPair {
    sim: cancelwatch_sim::Simulator,
    db: SqlitePool,
    out: PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl SimPair {
    async fn start(dir: &Path, tune: impl FnOnce(&mut Config)) -> SimPair {
        use cancelwatch_sim::{SimConfig, Simulator};
        const STRIPE_KEY: &str = "sk_test_alerts";
        const JUICE_KEY: &str = "juice_key_alerts";
        const WEBHOOK_SECRET: &str = "whsec_alerts_test";
        const BUSINESS_ID: &str = "alerts-business-id";

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let daemon_url = format!("http://{}", listener.local_addr().unwrap());
        let ready_url = format!("{daemon_url}/readyz");
        let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim = Simulator::start(
            sim_listener,
            SimConfig {
                stripe_api_key: STRIPE_KEY.into(),
                juice_api_key: JUICE_KEY.into(),
                stripe_webhook_secret: WEBHOOK_SECRET.into(),
                juice_checksum_key: BUSINESS_ID.into(),
                target: Some(daemon_url),
            },
        )
        .await
        .unwrap();
        let out = dir.join("alerts.jsonl");
        let mut config = config_in(dir);
        config.stripe.api_base = sim.base_url();
        config.stripe.api_key = STRIPE_KEY.into();
        config.stripe.webhook_secrets = vec![WEBHOOK_SECRET.into()];
        config.juice.api_base = sim.base_url();
        config.juice.api_key = JUICE_KEY.into();
        config.juice.checksum_keys = vec![BUSINESS_ID.into()];
        config.workers.poll_interval_ms = 50;
        config.workers.backoff_base_ms = 50;
        config.workers.backoff_max_secs = 1;
        config.reconcile.interval_secs = 3_600;
        config.alerts.sinks = vec![SinkConfig {
            name: "cmd".into(),
            kind: "command".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("cat >> '{}'; echo >> '{}'", out.display(), out.display()),
            ],
            ..SinkConfig::default()
        }];
        tune(&mut config);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(cancelwatch::run_until(config.clone(), listener, async {
            let _ = rx.await;
        }));
        wait_for("the daemon to be ready", || async {
            reqwest::get(&ready_url)
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        let db = reader(&config).await;
        SimPair {
            sim,
            db,
            out,
            stop,
            handle,
        }
    }

    /// Waits until every outbox row is delivered, stops the daemon and
    /// returns what the command sink received.
    async fn finish(self) -> Vec<Value> {
        let db = self.db.clone();
        wait_for("every alert delivered", || async {
            let pending: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM alert_outbox WHERE state = 'pending'")
                    .fetch_one(&db)
                    .await
                    .unwrap();
            pending == 0
        })
        .await;
        let _ = self.stop.send(());
        self.handle.await.unwrap().unwrap();
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// Every simulator scenario played against a real daemon raises exactly the
/// alerts the scenario expects, and they reach a command sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulator_scenarios_raise_exactly_their_expected_alerts() {
    use cancelwatch_sim::{DeliveryOptions, Simulator};
    let dir = tempfile::tempdir().unwrap();
    let pair = SimPair::start(dir.path(), |_| {}).await;
    let (sim, db) = (&pair.sim, pair.db.clone());

    let mut expected = Vec::new();
    for name in Simulator::scenario_names() {
        let scenario = sim.scenario(name).unwrap();
        for step in &scenario.steps {
            sim.play_step(step, &DeliveryOptions::default())
                .await
                .unwrap();
            wait_for(&format!("{name}: {}", step.label), || async {
                let unfinished: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM inbox WHERE state IN ('pending', 'processing', 'failed')",
                )
                .fetch_one(&db)
                .await
                .unwrap();
                let mut reached = unfinished == 0;
                for (id, want) in &step.expect_status {
                    let status: Option<String> =
                        sqlx::query_scalar("SELECT status FROM resources WHERE id = ?")
                            .bind(id)
                            .fetch_optional(&db)
                            .await
                            .unwrap()
                            .flatten();
                    reached &= status.as_deref() == Some(want.as_str());
                }
                reached
            })
            .await;
        }
        assert!(sim.wait_background(Duration::from_secs(10)).await);
        expected.extend(scenario.expect.alerts.clone());
    }
    expected.sort();
    let raised: Vec<(String, String)> =
        sqlx::query_as("SELECT rule, resource_id FROM alerts ORDER BY rule, resource_id")
            .fetch_all(&db)
            .await
            .unwrap();
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

/// A dead letter replayed once the provider answers again is processed,
/// and its `dead_letter` alert is resolved (the sink gets the resolved
/// version too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replayed_dead_letter_resolves_its_alert() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = None;
    let pair = SimPair::start(dir.path(), |c| {
        c.workers.max_attempts = 2;
        config = Some(c.clone());
    })
    .await;
    let config = config.unwrap();
    let scenario = pair.sim.scenario("outbound_transfer_canceled").unwrap();
    for step in &scenario.steps {
        pair.sim.apply_step(step);
    }
    let last = scenario.steps.last().unwrap().deliveries.last().unwrap();
    let key = last.event_id().unwrap().to_string();
    pair.sim.faults().fail_next(1_000, 500);
    pair.sim.deliver(last).await.unwrap();
    let db = pair.db.clone();
    let alert_state = || async {
        sqlx::query_scalar::<_, String>("SELECT state FROM alerts WHERE rule = 'dead_letter'")
            .fetch_optional(&db)
            .await
            .unwrap()
    };
    wait_for("the dead_letter alert", || async {
        alert_state().await.as_deref() == Some("open")
    })
    .await;

    pair.sim.faults().clear();
    let ctx = cancelwatch::pipeline::Context::open(config).await.unwrap();
    let report = cancelwatch::pipeline::replay(&ctx, &key, true)
        .await
        .unwrap();
    assert_eq!(report.previous_state, "dead");
    assert_eq!(report.state, "processed");
    assert_eq!(alert_state().await.as_deref(), Some("resolved"));
    ctx.db.close().await;
    let received = pair.finish().await;
    let states: Vec<&str> = received
        .iter()
        .filter(|p| p["type"] == "dead_letter")
        .filter_map(|p| p["state"].as_str())
        .collect();
    assert_eq!(states, ["open", "resolved"], "{received:?}");
}

/// A delivery about an object the provider never had goes dead in the
/// worker, and that raises a `dead_letter` alert about its resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_delivery_raises_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let pair = SimPair::start(dir.path(), |c| c.workers.max_attempts = 2).await;
    let ghost = "obt_alerts_does_not_exist";
    let event = cancelwatch_sim::state::thin_event(
        "v2.money_management.outbound_transfer.updated",
        "v2.money_management.outbound_transfer",
        ghost,
        &cancelwatch_sim::state::outbound_transfer_path(ghost),
    );
    pair.sim
        .deliver(&cancelwatch_sim::Delivery::stripe(event))
        .await
        .unwrap();
    let db = pair.db.clone();
    wait_for("the dead_letter alert", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COUNT(*) FROM alerts WHERE rule = 'dead_letter' AND resource_id = ?",
        )
        .bind(ghost)
        .fetch_one(&db)
        .await
        .unwrap()
            == 1
    })
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
