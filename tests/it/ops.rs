//! The operator's side: read commands, the `/v1` API, prune, metrics.
//! Each test seeds a temporary database with an audit trail, then drives
//! the library functions the commands call, the built binary, or the real
//! daemon on 127.0.0.1:0.

use std::time::Duration;

use cancelwatch::cli::output::OutputArgs;
use cancelwatch::cli::read::{
    self, AlertsArgs, EventsArgs, HistoryArgs, PageArgs, TransitionsArgs,
};
use cancelwatch::store::model::{PageRequest, TransitionFilter};
use cancelwatch::store::Store;
use serde_json::Value;

use crate::support::binary;
use crate::support::db::{
    self, AlertSeed, CancelSeed, DeliverySeed, ProgressSeed, RefundSeed, ResourceSeed,
};
use crate::support::sim::{simulator, Simulator};
use crate::support::webhooks::thin_event;
use crate::support::{both_engines, wait_until, Engine, TestApp, TestConfig};

const TOKEN: &str = "test-admin-token-0123456789abcdef-1234";
const FAR: &str = "2099-01-01T00:00:00.000Z";
const BULK: &str = "7f1c2d3e-0000-4000-8000-000000000001";

async fn config(engine: Engine) -> TestConfig {
    TestConfig::on(engine).await.with(|c| {
        c.database.synchronous = "normal".into();
        // These tests seed resources and alerts by hand; the daemon's own
        // time-based rules (a seeded resource "stuck" since its seeding)
        // would add alerts of their own to the listings under test.
        c.alerts.stuck.enabled = false;
        c.alerts.refund_overdue.enabled = false;
        c.alerts.verification_failures.enabled = false;
    })
}

/// A resource seen on 2026-11-01 (1500 USD), fetched last at noon.
async fn resource(db: &Store, kind: &str, id: &str, parent: Option<&str>, status: &str) -> i64 {
    let mut seed = ResourceSeed::new(kind, id, status)
        .amount(1_500)
        .currency("usd")
        .first_seen("2026-11-01T10:00:00.000Z")
        .observed("2026-11-01T12:00:00.000Z", false);
    seed.parent_id = parent.map(str::to_string);
    db::seed_resource(db, &seed).await
}

/// A delivery of an `outbound_transfer.updated` event about `obt_1`.
async fn delivery(db: &Store, provider: &str, key: &str, state: &str, received_at: &str) {
    db::seed_delivery(
        db,
        &DeliverySeed {
            provider,
            key,
            event_type: "v2.money_management.outbound_transfer.updated",
            event_id: Some(key),
            resource_kind: Some("stripe.outbound_transfer"),
            resource_id: Some("obt_1"),
            raw_body: Some(b"{}"),
            received_at,
            state,
            attempts: 0,
            next_attempt_at: FAR,
        },
    )
    .await;
}

/// An open alert at version 2 with its outbox: delivered to `hooks` at
/// version 1, pending there at version 2 (3 attempts, HTTP 503), and
/// delivered to `log`.
async fn alert(
    db: &impl db::Database,
    id: &str,
    rule: &str,
    resource_id: &str,
    summary: &str,
    at: &str,
) {
    db::seed_alert(
        db,
        &AlertSeed {
            id,
            rule,
            resource_id,
            summary,
            at,
        },
    )
    .await;
}

/// A small but complete audit trail: an outbound transfer, a bulk transfer
/// with two items (one refunded), an alert, a cancel request, deliveries.
async fn seed(db: &Store) {
    let obt = resource(db, "stripe.outbound_transfer", "obt_1", None, "canceled").await;
    db::seed_transition(db, obt, None, "processing", "2026-11-01T10:00:00.000Z").await;
    db::seed_transition(
        db,
        obt,
        Some("processing"),
        "canceled",
        "2026-11-01T10:05:00.000Z",
    )
    .await;

    let job = resource(db, "stripe.batch_job", "batchv2_1", None, "canceled").await;
    db::seed_transition(db, job, None, "in_progress", "2026-11-01T09:00:00.000Z").await;
    db::seed_transition(
        db,
        job,
        Some("in_progress"),
        "canceled",
        "2026-11-01T09:30:00.000Z",
    )
    .await;
    for (at, status, ok) in [
        ("2026-11-01T09:00:00.000Z", "in_progress", 10),
        ("2026-11-01T09:30:00.000Z", "canceled", 40),
    ] {
        db::seed_progress(
            db,
            &ProgressSeed {
                rid: job,
                observed_at: at,
                status,
                success: ok,
                failure: 2,
                validated: Some(100),
                trigger_type: "reconcile",
            },
        )
        .await;
    }

    let b = resource(db, "juice.bulk_transfer", BULK, None, "cancelled").await;
    db::seed_transition(db, b, None, "executing", "2026-11-01T11:00:00.000Z").await;
    db::seed_transition(
        db,
        b,
        Some("executing"),
        "cancelled",
        "2026-11-01T11:10:00.000Z",
    )
    .await;
    for (item, status) in [("trf_a", "cancelled"), ("trf_b", "completed")] {
        let rid = resource(db, "juice.transfer", item, Some(BULK), status).await;
        db::seed_transition(db, rid, None, "pending", "2026-11-01T11:01:00.000Z").await;
        db::seed_transition(db, rid, Some("pending"), status, "2026-11-01T11:11:00.000Z").await;
        if status == "cancelled" {
            db::seed_refund(
                db,
                &RefundSeed {
                    rid,
                    provider: "juice",
                    kind: "juice.transfer",
                    resource_id: item,
                    parent_id: Some(BULK),
                    status: "pending",
                    reason: "cancelled",
                    amount: 1_500,
                    currency: "usd",
                    opened_at: "2026-11-01T11:11:00.000Z",
                    updated_at: "2026-11-01T11:11:00.000Z",
                },
            )
            .await;
        }
    }
    alert(
        db,
        "alrt_1",
        "partial_cancellation",
        BULK,
        "bulk transfer cancelled, but 1 item \"completed\", see items",
        "2026-11-01T11:12:00.000Z",
    )
    .await;
    db::seed_cancel_request(
        db,
        &CancelSeed {
            provider: "juice",
            kind: "juice.bulk_transfer",
            resource_id: BULK,
            idempotency_key: "idem-1",
            requested_by: "cli",
            requested_at: "2026-11-01T11:09:00.000Z",
            http_status: 200,
            outcome: "partial_cancellation",
            error_code: None,
            response_body: Some("{\"status\":\"partial\"}"),
            answered_at: "2026-11-01T11:09:01.000Z",
        },
    )
    .await;
    delivery(
        db,
        "stripe",
        "evt_p1",
        "processed",
        "2026-11-01T10:00:00.000Z",
    )
    .await;
    delivery(db, "stripe", "evt_d1", "dead", "2026-11-01T10:01:00.000Z").await;
    delivery(
        db,
        "juice",
        "bulk_transfer.cancelled:abc",
        "ignored",
        "2026-11-01T10:02:00.000Z",
    )
    .await;
}

/// A seeded database on its own (for the CLI functions).
async fn seeded_db(engine: Engine) -> (TestConfig, Store) {
    let config = config(engine).await;
    let db = config.open_store().await;
    seed(&db).await;
    (config, db)
}

fn out(json: bool, csv: bool) -> OutputArgs {
    OutputArgs { json, csv }
}

fn page(limit: i64) -> PageArgs {
    PageArgs {
        limit,
        cursor: None,
    }
}

both_engines! {
    #[tokio::test]
    async fn history_shows_the_resource_its_items_and_trail(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let bulk = "7f1c2d3e-0000-4000-8000-000000000001";
        let args = |o| HistoryArgs {
            resource_id: bulk.into(),
            output: o,
        };
        let json: Value =
            serde_json::from_str(&read::history(&db, &args(out(true, false))).await.unwrap()).unwrap();
        let r = &json["resources"][0];
        assert_eq!(r["status"], "cancelled");
        assert_eq!(r["snapshot"]["id"], bulk, "snapshot is embedded JSON");
        assert_eq!(r["transitions"].as_array().unwrap().len(), 2);
        assert_eq!(
            r["transitions"][0]["from_status"],
            Value::Null,
            "oldest first"
        );
        assert_eq!(r["transitions"][1]["to_status"], "cancelled");
        assert_eq!(r["transitions"][1]["trigger"]["type"], "event");
        let children = r["children"].as_array().unwrap();
        assert_eq!(children.len(), 2);
        assert_eq!(children[0]["id"], "trf_a");
        assert_eq!(children[0]["transitions"].as_array().unwrap().len(), 2);
        assert_eq!(children[0]["refunds"][0]["status"], "pending");
        assert_eq!(children[1]["refunds"].as_array().unwrap().len(), 0);
        assert_eq!(r["alerts"][0]["type"], "partial_cancellation");
        let deliveries = r["alerts"][0]["deliveries"].as_array().unwrap();
        assert_eq!(deliveries.len(), 2, "one per sink, its latest version");
        assert_eq!(deliveries[0]["sink"], "hooks");
        assert_eq!(deliveries[0]["alert_version"], 2);
        assert_eq!(deliveries[0]["state"], "pending");
        assert_eq!(deliveries[0]["last_error"], "HTTP 503");
        assert_eq!(r["cancel_requests"][0]["outcome"], "partial_cancellation");
        assert_eq!(
            r["cancel_requests"][0]["response_body"]["status"],
            "partial"
        );

        let table = read::history(&db, &args(out(false, false))).await.unwrap();
        let status_line = table.lines().find(|l| l.starts_with("status ")).unwrap();
        assert!(status_line.ends_with(" cancelled"), "{table}");
        assert!(table.contains("ITEMS (2)"), "{table}");
        assert!(table.contains("trf_b"), "{table}");
        assert!(table.contains("hooks:pending(3 attempts)"), "{table}");

        let csv = read::history(&db, &args(out(false, true))).await.unwrap();
        assert_eq!(csv.lines().count(), 1 + 2 + 4, "{csv}");
    }
}

both_engines! {
    #[tokio::test]
    async fn batch_job_history_shows_progress_counts(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let args = |o| HistoryArgs {
            resource_id: "batchv2_1".into(),
            output: o,
        };
        let json: Value =
            serde_json::from_str(&read::history(&db, &args(out(true, false))).await.unwrap()).unwrap();
        let progress = json["resources"][0]["progress"].as_array().unwrap();
        assert_eq!(progress.len(), 2);
        assert_eq!(progress[1]["success_count"], 40);
        assert_eq!(progress[1]["trigger"]["type"], "reconcile");
        let table = read::history(&db, &args(out(false, false))).await.unwrap();
        let section = table.split("PROGRESS\n").nth(1).unwrap();
        let row = section.lines().nth(2).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "2026-11-01T09:30:00.000Z",
                "canceled",
                "40",
                "2",
                "100",
                "reconcile"
            ]
        );
    }
}

both_engines! {
    #[tokio::test]
    async fn unknown_resource_and_bad_filters_are_errors(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let err = read::history(
            &db,
            &HistoryArgs {
                resource_id: "obt_nope".into(),
                output: out(false, false),
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no resource with id \"obt_nope\""));

        let bad_time = TransitionsArgs {
            since: Some("last tuesday".into()),
            page: page(10),
            ..Default::default()
        };
        let err = read::transitions(&db, &bad_time).await.unwrap_err();
        assert!(err.to_string().contains("since"), "{err}");
        let bad_limit = TransitionsArgs {
            page: page(0),
            ..Default::default()
        };
        let err = read::transitions(&db, &bad_limit).await.unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        let bad_state = EventsArgs {
            state: Some("done".into()),
            page: page(10),
            ..Default::default()
        };
        let err = read::events(&db, &bad_state).await.unwrap_err();
        assert!(err.to_string().contains("pending, processing"), "{err}");
        let bad_type = AlertsArgs {
            rule: Some("partial".into()),
            page: page(10),
            ..Default::default()
        };
        assert!(read::alerts(&db, &bad_type).await.is_err());
    }
}

both_engines! {
    #[tokio::test]
    async fn listings_filter_and_render(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let canceled = TransitionsArgs {
            provider: Some("stripe".into()),
            to_status: Some("canceled".into()),
            since: Some("2026-11-01T10:00:00Z".into()),
            page: page(10),
            output: out(true, false),
            ..Default::default()
        };
        let json: Value =
            serde_json::from_str(&read::transitions(&db, &canceled).await.unwrap()).unwrap();
        let data = json["data"].as_array().unwrap();
        assert_eq!(data.len(), 1);
        let t = &data[0];
        for key in [
            "provider",
            "kind",
            "resource_id",
            "parent_id",
            "from_status",
            "to_status",
            "observed_at",
            "provider_at",
            "trigger",
            "livemode",
        ] {
            assert!(t.get(key).is_some(), "transition JSON lacks {key}: {t}");
        }
        assert_eq!(t["resource_id"], "obt_1");
        assert_eq!(t["livemode"], false);
        assert_eq!(json["next_cursor"], Value::Null);

        let one = TransitionsArgs {
            resource_id: Some("trf_b".into()),
            page: page(10),
            output: out(false, true),
            ..Default::default()
        };
        let csv = read::transitions(&db, &one).await.unwrap();
        assert_eq!(csv.lines().count(), 3, "{csv}");
        assert!(csv.lines().skip(1).all(|l| l.contains(",trf_b,")), "{csv}");

        let juice_items = TransitionsArgs {
            kind: Some("juice.transfer".into()),
            until: Some("2026-11-01T11:05:00Z".into()),
            page: page(10),
            ..Default::default()
        };
        let table = read::transitions(&db, &juice_items).await.unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("ID"), "{table}");
        assert_eq!(
            lines.len(),
            3,
            "header and the two items' first transitions: {table}"
        );
        // Columns line up: every row's OBSERVED_AT starts where the header's does.
        let col = lines[0].find("OBSERVED_AT").unwrap();
        for l in &lines[1..] {
            assert_eq!(&l[col..col + 4], "2026", "{table}");
        }

        let events = EventsArgs {
            state: Some("dead".into()),
            page: page(10),
            output: out(false, true),
            ..Default::default()
        };
        let csv = read::events(&db, &events).await.unwrap();
        assert!(csv.starts_with("id,provider,key,"), "{csv}");
        assert_eq!(csv.lines().count(), 2, "{csv}");
        assert!(csv.contains("evt_d1"));
        assert!(!csv.contains("{}"), "no raw bodies");

        let open = AlertsArgs {
            state: Some("open".into()),
            since: Some("2026-11-01T00:00:00Z".into()),
            page: page(10),
            ..Default::default()
        };
        let table = read::alerts(&db, &open).await.unwrap();
        assert!(table.contains("partial_cancellation"), "{table}");
    }
}

both_engines! {
    #[tokio::test]
    async fn one_resources_transitions_are_found_through_its_rid(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let filter = TransitionFilter {
            kind: Some("juice.transfer".into()),
            resource_id: Some("trf_b".into()),
            ..Default::default()
        };
        let page = db
            .transitions(&filter, &PageRequest::default())
            .await
            .unwrap();
        assert_eq!(page.data.len(), 2);
        assert!(page.data.iter().all(|t| t.resource_id == "trf_b"));
        assert!(page.data[0].id > page.data[1].id, "newest first");
        // Whatever else is filtered, the one resource's rows are looked up by
        // rid, never found by walking every transition of a kind.
        let plan = db
            .explain_transitions(&filter, &PageRequest::default())
            .await
            .unwrap()
            .join("\n");
        assert!(plan.contains("transitions_rid"), "{plan}");
        assert!(!plan.contains("transitions_kind"), "{plan}");
        let nobody = TransitionFilter {
            resource_id: Some("trf_nobody".into()),
            ..Default::default()
        };
        let page = db
            .transitions(&nobody, &PageRequest::default())
            .await
            .unwrap();
        assert!(page.data.is_empty());
    }
}

/// A listing filtered by kind, status or provider walks that column's
/// `(column, id)` index newest first, with or without a time range: the
/// reason migration 10 could drop the `(column, observed_at)` ones.
#[tokio::test]
async fn filtered_listings_walk_the_id_ordered_indexes() {
    let (_dir, db) = seeded_db(Engine::Sqlite).await;
    let since = Some("2026-10-01T00:00:00Z".to_string());
    let until = Some("2026-12-01T00:00:00Z".to_string());
    let cases = [
        (
            TransitionFilter {
                kind: Some("juice.transfer".into()),
                until: until.clone(),
                ..Default::default()
            },
            "transitions_kind_id",
        ),
        (
            TransitionFilter {
                to_status: Some("canceled".into()),
                since: since.clone(),
                until,
                ..Default::default()
            },
            "transitions_to_id",
        ),
        (
            TransitionFilter {
                provider: Some("stripe".into()),
                since,
                ..Default::default()
            },
            "transitions_provider_id",
        ),
    ];
    for (filter, index) in cases {
        let plan = db
            .explain_transitions(&filter, &PageRequest::default())
            .await
            .unwrap()
            .join("\n");
        assert!(plan.contains(index), "{filter:?}: {plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{filter:?} sorts: {plan}");
    }
    assert_eq!(
        db::index_names(&db, "transitions").await,
        [
            "transitions_kind_id",
            "transitions_observed",
            "transitions_provider_id",
            "transitions_rid",
            "transitions_to_id"
        ]
    );
}

both_engines! {
    #[tokio::test]
    async fn csv_fields_are_quoted(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let args = AlertsArgs {
            page: page(10),
            output: out(false, true),
            ..Default::default()
        };
        let csv = read::alerts(&db, &args).await.unwrap();
        assert!(
            csv.contains(r#","bulk transfer cancelled, but 1 item ""completed"", see items","#),
            "{csv}"
        );
        assert!(
            csv.contains(",hooks:pending(3 attempts) log:delivered\r\n"),
            "{csv}"
        );
    }
}

both_engines! {
    #[tokio::test]
    async fn the_binary_fails_clearly_on_unknown_resource_and_bad_filter(engine) {
        let (config, db) = seeded_db(engine).await;
        db.close().await;
        let run = |args: &[&str]| binary::run(&config, args);
        let o = run(&["history", "obt_missing"]);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("no resource with id \"obt_missing\""),
            "{stderr}"
        );
        let o = run(&["events", "--state", "finished"]);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("state: \"finished\" is not one of"),
            "{stderr}"
        );
        let o = run(&["cancel", "stripe.refund", "re_1"]);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("unknown resource kind"), "{stderr}");
        let o = run(&["replay", "evt_nope"]);
        assert!(!o.status.success());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("no stored delivery"), "{stderr}");
        let o = run(&["history", "obt_1", "--json"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let doc: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(doc["resources"][0]["id"], "obt_1");
    }
}

both_engines! {
    #[tokio::test]
    async fn prune_drops_bodies_and_old_rows_but_keeps_the_trail_and_dedupe_keys(engine) {
        let (_dir, db) = seeded_db(engine).await;
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let ago = |hours: i64| cancelwatch::time::fmt(now - chrono::Duration::hours(hours));
        // Seeded deliveries are from 2026-11-01 (30 days before `now`).
        delivery(&db, "stripe", "evt_2d", "processed", &ago(48)).await;
        delivery(&db, "stripe", "evt_4d", "processed", &ago(96)).await;
        delivery(&db, "stripe", "evt_4d_pending", "pending", &ago(96)).await;
        delivery(&db, "stripe", "evt_4d_failed", "failed", &ago(96)).await;
        delivery(&db, "juice", "j:40h", "processed", &ago(40)).await;
        delivery(&db, "juice", "j:50h", "ignored", &ago(50)).await;
        delivery(&db, "stripe", "evt_1h", "processed", &ago(1)).await;
        for (hours, reason) in [(30, "invalid_signature"), (2, "missing_signature")] {
            db::seed_refusal(&db, "stripe", reason, &ago(hours)).await;
        }
        let before = db::audit_trail_counts(&db).await;

        let report = cancelwatch::jobs::prune::prune(&db, Duration::from_secs(86_400), now)
            .await
            .unwrap();
        let text = report.to_string();
        assert!(text.contains("raw bodies dropped"), "{text}");

        let rows = db::deliveries(&db).await;
        let find = |k: &str| {
            rows.iter()
                .find(|r| r.dedupe_key == k)
                .map(|r| (r.state.as_str(), r.raw_body.is_some()))
        };
        // Older than a Stripe retry window (3 days) and finished: gone.
        assert_eq!(find("evt_4d"), None);
        assert_eq!(find("evt_p1"), None);
        assert_eq!(find("evt_d1"), None);
        // Within 3 days: the dedupe key stays, the body goes.
        assert_eq!(find("evt_2d"), Some(("processed", false)));
        // Unfinished deliveries are never touched.
        assert_eq!(find("evt_4d_pending"), Some(("pending", true)));
        assert_eq!(find("evt_4d_failed"), Some(("failed", true)));
        // Juice retries for 48 hours.
        assert_eq!(find("j:50h"), None);
        assert_eq!(find("j:40h"), Some(("processed", false)));
        // Younger than the cutoff: untouched.
        assert_eq!(find("evt_1h"), Some(("processed", true)));
        assert_eq!(
            report,
            cancelwatch::jobs::prune::PruneReport {
                cutoff: ago(24),
                bodies_dropped: 2,
                refusals_deleted: 1,
                deliveries_deleted: 5,
            }
        );
        let refusals: Vec<String> = db::refusals(&db)
            .await
            .into_iter()
            .map(|r| r.reason)
            .collect();
        assert_eq!(refusals, vec!["missing_signature".to_string()]);
        assert_eq!(
            db::audit_trail_counts(&db).await,
            before,
            "the audit trail is never pruned"
        );
    }
}

/// The real daemon on a seeded database, its API behind [`TOKEN`].
async fn seeded_app(engine: Engine, tune: impl FnOnce(TestConfig) -> TestConfig) -> TestApp {
    let (config, db) = seeded_db(engine).await;
    db.close().await;
    TestApp::start(tune(config.with(|c| c.server.admin_token = TOKEN.into()))).await
}

both_engines! {
    #[tokio::test]
    async fn api_requires_the_admin_token_and_is_off_without_one(engine) {
        let app = seeded_app(engine, |c| c).await;
        let (status, body) = app.get("/v1/transitions", None).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"]["code"], "unauthorized");
        let (status, _) = app.get("/v1/transitions", Some("wrong-token")).await;
        assert_eq!(status, 401);
        let (status, _) = app.get("/v1/resources/obt_1", Some(&TOKEN[..5])).await;
        assert_eq!(status, 401);
        let (status, body) = app.get("/v1/transitions", Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"].as_array().unwrap().len(), 10);
        let (status, body) = app.get("/v1/nothing-here", Some(TOKEN)).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "not_found");
        let r = app
            .client()
            .delete(format!("{}/v1/transitions", app.url))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed");
        // Webhooks and health are not behind the token.
        let (status, _) = app.get("/healthz", None).await;
        assert_eq!(status, 200);
        app.stop().await;

        let off = seeded_app(engine, |c| c.with(|c| c.server.admin_token.clear())).await;
        for path in ["/v1/transitions", "/v1/resources/obt_1", "/v1/anything"] {
            let (status, body) = off.get(path, Some("")).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(body["error"]["code"], "api_disabled", "{path}");
        }
        off.stop().await;
    }
}

both_engines! {
    #[tokio::test]
    async fn api_answers_resources_and_listings_and_rejects_bad_params(engine) {
        let app = seeded_app(engine, |c| c).await;
        let (status, body) = app.get(&format!("/v1/resources/{BULK}"), Some(TOKEN)).await;
        assert_eq!(status, 200);
        let r = &body["resources"][0];
        assert_eq!(r["kind"], "juice.bulk_transfer");
        assert_eq!(r["children"].as_array().unwrap().len(), 2);
        assert_eq!(r["alerts"][0]["deliveries"].as_array().unwrap().len(), 2);
        assert_eq!(r["refunds"].as_array().unwrap().len(), 0);
        assert_eq!(r["children"][0]["refunds"][0]["amount"], 1500);

        let (status, body) = app.get("/v1/resources/obt_unknown", Some(TOKEN)).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "not_found");

        let (status, body) = app
            .get(
                "/v1/transitions?kind=juice.transfer&to=cancelled",
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["data"].as_array().unwrap().len(), 1);
        assert_eq!(body["data"][0]["resource_id"], "trf_a");
        assert_eq!(body["data"][0]["parent_id"], BULK);

        let (status, body) = app.get("/v1/events?state=dead", Some(TOKEN)).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"][0]["key"], "evt_d1");
        assert!(body["data"][0].get("raw_body").is_none());
        let (status, body) = app
            .get(
                "/v1/alerts?type=partial_cancellation&state=open",
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["data"][0]["resource"]["id"], BULK);
        assert_eq!(body["data"][0]["details"]["items"], 2);

        for (path, code) in [
            ("/v1/transitions?since=yesterday", "invalid_parameter"),
            (
                "/v1/transitions?until=2026-13-01T00:00:00Z",
                "invalid_parameter",
            ),
            ("/v1/transitions?provider=paypal", "invalid_parameter"),
            ("/v1/transitions?limit=0", "invalid_parameter"),
            ("/v1/transitions?limit=1001", "invalid_parameter"),
            ("/v1/transitions?limit=ten", "invalid_parameter"),
            ("/v1/transitions?cursor=garbage", "invalid_cursor"),
            ("/v1/transitions?colour=red", "invalid_parameter"),
            ("/v1/events?state=finished", "invalid_parameter"),
            ("/v1/alerts?state=closed", "invalid_parameter"),
            ("/v1/alerts?cursor=dDoxMg", "invalid_cursor"),
        ] {
            let (status, body) = app.get(path, Some(TOKEN)).await;
            assert_eq!(status, 400, "{path}: {body}");
            assert_eq!(body["error"]["code"], code, "{path}: {body}");
            assert!(body["error"]["message"].as_str().unwrap().len() > 5);
        }
        app.stop().await;
    }
}

/// Walks a listing page by page; returns the ids met, in order.
/// `during` runs once, after the first page.
async fn walk(
    app: &TestApp,
    path: &str,
    id_key: &str,
    during: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    let mut during = Some(during);
    for _ in 0..100 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit=3&cursor={c}"),
            None => format!("{path}{sep}limit=3"),
        };
        let (status, body) = app.get(&url, Some(TOKEN)).await;
        assert_eq!(status, 200, "{url}: {body}");
        for row in body["data"].as_array().unwrap() {
            ids.push(match &row[id_key] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            });
        }
        if let Some(f) = during.take() {
            f.await;
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return ids,
        }
    }
    panic!("listing did not end");
}

both_engines! {
    #[tokio::test]
    async fn pages_stay_correct_while_rows_arrive(engine) {
        let app = seeded_app(engine, |c| c).await;
        let (_, all) = app.get("/v1/transitions?limit=1000", Some(TOKEN)).await;
        let expected: Vec<String> = all["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].to_string())
            .collect();
        assert_eq!(expected.len(), 10);
        let obt = db::resource(app.db(), "stripe.outbound_transfer", "obt_1")
            .await
            .unwrap();
        let got = walk(&app, "/v1/transitions", "id", async {
            for i in 0..5 {
                db::seed_transition(
                    app.db(),
                    obt.rid,
                    Some("canceled"),
                    "returned",
                    &format!("2026-11-02T00:00:0{i}.000Z"),
                )
                .await;
            }
        })
        .await;
        assert_eq!(
            got, expected,
            "no row repeated or skipped, new rows not mixed in"
        );
        let (_, now_all) = app.get("/v1/transitions?limit=1000", Some(TOKEN)).await;
        assert_eq!(now_all["data"].as_array().unwrap().len(), 15);

        let got = walk(&app, "/v1/events", "key", async {
            let (status, _) = app.post_stripe(&thin_event("evt_new")).await;
            assert_eq!(status, 200);
        })
        .await;
        assert_eq!(got, vec!["bulk_transfer.cancelled:abc", "evt_d1", "evt_p1"]);

        for i in 0..4 {
            alert(
                app.db(),
                &format!("alrt_x{i}"),
                "stuck",
                &format!("obt_x{i}"),
                "stuck",
                "2026-11-01T11:12:00.000Z",
            )
            .await;
        }
        let got = walk(&app, "/v1/alerts", "id", async {
            alert(
                app.db(),
                "alrt_late",
                "stuck",
                "obt_2",
                "stuck",
                "2026-11-05T00:00:00.000Z",
            )
            .await;
        })
        .await;
        assert_eq!(
            got,
            vec!["alrt_x3", "alrt_x2", "alrt_x1", "alrt_x0", "alrt_1"]
        );
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test]
    async fn metrics_count_deliveries_by_state_and_dead_ones(engine) {
        let app = seeded_app(engine, |c| c).await;
        let text = app.metrics().await;
        assert!(text.contains("cancelwatch_deliveries_dead"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("cancelwatch_inbox_deliveries{state=\"processed\"}")),
            "{text}"
        );
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test]
    async fn serve_prunes_on_schedule_when_enabled(engine) {
        let app = seeded_app(engine, |c| {
            c.with(|c| {
                c.prune.enabled = true;
                c.prune.older_than = "10d".into();
                c.prune.interval_secs = 3_600;
            })
        })
        .await;
        // The seeded finished deliveries are from 2026-11-01; prune runs at start.
        wait_until(
            "the scheduled prune removes every delivery",
            Duration::from_secs(10),
            || async { db::delivery_count(app.db()).await == 0 },
        )
        .await;
        assert_eq!(db::transition_count(app.db()).await, 10);
        app.stop().await;
    }
}

/// A simulated Stripe holding two processing outbound transfers; their ids.
async fn sim_with_transfers() -> (Simulator, Vec<String>) {
    let sim = simulator(None).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let scenario = sim.scenario("outbound_transfer_canceled").unwrap();
        // Only the first step: the transfer exists and is processing.
        sim.play_step(&scenario.steps[0], &Default::default())
            .await
            .unwrap();
        ids.push(scenario.expect.histories[0].id.clone());
    }
    (sim, ids)
}

both_engines! {
    #[tokio::test]
    async fn cancel_and_replay_over_the_api_and_the_cli(engine) {
        let (sim, ids) = sim_with_transfers().await;
        let app = seeded_app(engine, |c| c.provider_apis(&sim.base_url())).await;

        let cancel = serde_json::json!({"kind": "stripe.outbound_transfer", "id": ids[0]});
        let (status, _) = app
            .post("/v1/cancellations", Some(cancel.clone()), None)
            .await;
        assert_eq!(status, 401);
        let (status, body) = app
            .post(
                "/v1/cancellations",
                Some(serde_json::json!({"kind": "stripe.refund", "id": "re_1"})),
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "unknown_kind");
        let (status, body) = app
            .post(
                "/v1/cancellations",
                Some(serde_json::json!({"kind": "stripe.outbound_transfer"})),
                Some(TOKEN),
            )
            .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_body");

        let (status, body) = app
            .post("/v1/cancellations", Some(cancel), Some(TOKEN))
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["outcome"], "accepted", "{body}");
        assert_eq!(body["status"], "canceled", "{body}");
        let (status, history) = app
            .get(&format!("/v1/resources/{}", ids[0]), Some(TOKEN))
            .await;
        assert_eq!(status, 200);
        let r = &history["resources"][0];
        assert_eq!(r["status"], "canceled");
        assert_eq!(r["cancel_requests"][0]["requested_by"], "api");
        let last = r["transitions"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["to_status"], "canceled");
        assert_eq!(last["trigger"]["type"], "cancel");

        let (status, body) = app
            .post("/v1/events/evt_nope/replay", None, Some(TOKEN))
            .await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "not_found");
        let (status, body) = app
            .post("/v1/events/evt_d1/replay", None, Some(TOKEN))
            .await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["key"], "evt_d1");
        assert_eq!(body["previous_state"], "dead");
        // Seeded with no attempts: the daemon's workers take it up again.
        wait_until(
            "the replayed delivery is processed again",
            Duration::from_secs(10),
            || async { db::delivery(app.db(), "evt_d1").await.unwrap().attempts > 0 },
        )
        .await;

        // The CLI functions, on the same database.
        let ctx = app.test_config().context().await;
        let out = cancelwatch::cli::actions::cancel(
            &ctx,
            &cancelwatch::cli::actions::CancelArgs {
                kind: "stripe.outbound_transfer".into(),
                id: ids[1].clone(),
                json: false,
            },
        )
        .await
        .unwrap();
        let outcome = out.lines().find(|l| l.starts_with("outcome")).unwrap();
        assert!(outcome.ends_with(" accepted"), "{out}");
        let requests = db::cancel_requests(app.db(), "stripe.outbound_transfer", &ids[1]).await;
        assert_eq!(requests[0].requested_by, "cli");
        let err = cancelwatch::cli::actions::replay(
            &ctx,
            &cancelwatch::cli::actions::ReplayArgs {
                event_key: "evt_nope".into(),
                json: false,
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no stored delivery"), "{err}");
        ctx.store.close().await;
        app.stop().await;
    }
}

/// The read commands open the database read-only: in a folder without one
/// they create nothing and say where they looked; against a database a
/// newer binary migrated they refuse and say which versions differ.
#[tokio::test]
async fn read_commands_never_create_or_migrate_a_database() {
    let config = TestConfig::new();
    let path = config.database_path();
    for command in ["transitions", "alerts", "events"] {
        let o = binary::run(&config, &[command]);
        assert_eq!(o.status.code(), Some(1), "{command}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("no database at"), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(!path.exists(), "{command} created {}", path.display());
    }

    let store = config.open_store().await;
    let newest = store.migrations().into_iter().max().unwrap();
    db::fake_newer_migration(&store, newest + 1).await;
    store.close().await;
    let o = binary::run(&config, &["transitions"]);
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("newer than this cancelwatch"), "{stderr}");
}

both_engines! {
    /// Filters are checked: a kind or status nobody documents or recorded is
    /// an error naming the accepted values; times may be a date or a time back
    /// from now; a prune age too large to be a duration is refused, not wrapped.
    #[tokio::test]
    async fn filters_are_checked_and_times_read_as_people_write_them(engine) {
        let (config, db) = seeded_db(engine).await;
        db.close().await;
        let fails_with = |args: &[&str], needle: &str| {
            let o = binary::run(&config, args);
            let stderr = String::from_utf8_lossy(&o.stderr).to_string();
            // 1 for a refused filter, 2 for an argument clap refuses.
            assert!(matches!(o.status.code(), Some(1 | 2)), "{args:?}: {stderr}");
            assert!(stderr.contains(needle), "{args:?}: {stderr}");
        };
        fails_with(
            &["transitions", "--kind", "stripe.refund"],
            "is not one of stripe.outbound_transfer",
        );
        fails_with(&["transitions", "--to", "cancelld"], "is not one of ");
        fails_with(&["transitions", "--since", "last tuesday"], "is not a time");
        fails_with(&["prune", "--older-than", "213503982334602d"], "older-than");

        let rows = |args: &[&str]| {
            let o = binary::run(&config, args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            serde_json::from_slice::<Value>(&o.stdout).unwrap()["data"]
                .as_array()
                .unwrap()
                .len()
        };
        let all = rows(&["transitions", "--json"]);
        assert!(all > 0);
        assert_eq!(
            rows(&["transitions", "--json", "--since", "2026-10-01"]),
            all
        );
        assert_eq!(rows(&["transitions", "--json", "--since", "1d"]), 0);
        assert!(rows(&["transitions", "--json", "--kind", "juice.transfer"]) > 0);
    }
}

/// Relative paths in a configuration file are relative to its folder,
/// whatever folder the command runs in, and `check-config` prints them
/// resolved; a relative path from the environment stays relative to the
/// working directory.
#[test]
fn relative_paths_in_the_file_follow_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for folder in ["etc", "elsewhere"] {
        std::fs::create_dir(root.join(folder)).unwrap();
    }
    std::fs::write(
        root.join("etc/cancelwatch.toml"),
        r#"
[database]
url = "sqlite://state/cw.db"

[[alerts.sinks]]
name = "script"
kind = "command"
command = ["bin/page", "--team", "payments"]

[[alerts.sinks]]
name = "onpath"
kind = "command"
command = ["page-oncall"]
"#,
    )
    .unwrap();
    let run = |cwd: &str, config: &str, env: &[(&str, &str)], args: &[&str]| {
        let o = binary::command(&root.join(cwd))
            .args(args)
            .env("CANCELWATCH_CONFIG", config)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };

    // The file named relative to the working directory, as a person types it.
    let shown = run(".", "etc/cancelwatch.toml", &[], &["check-config"]);
    let etc = root.join("etc");
    let database = format!("# database: {}\n", etc.join("state/cw.db").display());
    assert!(shown.contains(&database), "{shown}");
    let script = format!("# sink script runs: {}\n", etc.join("bin/page").display());
    assert!(shown.contains(&script), "{shown}");
    assert!(
        shown.contains("# sink onpath runs: page-oncall (looked up on PATH)"),
        "{shown}"
    );

    // From another folder the same file names the same database.
    let config = etc.join("cancelwatch.toml");
    run("elsewhere", config.to_str().unwrap(), &[], &["migrate"]);
    assert!(etc.join("state/cw.db").exists());
    assert!(!root.join("elsewhere/state").exists());

    // A value from the environment is not the file's: the working directory.
    let env = [("CANCELWATCH_DATABASE__URL", "sqlite://mine/cw.db")];
    let shown = run(
        "elsewhere",
        config.to_str().unwrap(),
        &env,
        &["check-config"],
    );
    let database = format!(
        "# database: {}\n",
        root.join("elsewhere/mine/cw.db").display()
    );
    assert!(shown.contains(&database), "{shown}");
}

/// `prune` (like `backfill` and a slow `cancel`) shows what it is doing on
/// a terminal, and writes nothing of it to a stderr that is a pipe; stdout
/// carries only the result either way.
#[tokio::test]
async fn long_commands_show_progress_on_a_terminal_only() {
    let config = config(Engine::Sqlite).await;
    let piped = binary::run(&config, &["prune", "--older-than", "30d"]);
    assert!(piped.status.success());
    assert_eq!(String::from_utf8_lossy(&piped.stderr), "");
    let result = String::from_utf8(piped.stdout).unwrap();
    assert!(result.starts_with("pruned records older than"), "{result}");

    // `script` runs the command on a pseudo-terminal and copies the
    // terminal's output (stdout and stderr, as drawn) to its stdout.
    let command = format!(
        "{} prune --older-than 30d",
        env!("CARGO_BIN_EXE_cancelwatch")
    );
    let on_a_terminal = std::process::Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_clear()
        // A terminal that can redraw a line (without TERM, or with
        // TERM=dumb, nothing is drawn either).
        .env("TERM", "xterm")
        .env("CANCELWATCH_CONFIG", config.write_toml())
        .current_dir(config.dir())
        .output()
        .unwrap();
    assert!(on_a_terminal.status.success());
    let screen = String::from_utf8_lossy(&on_a_terminal.stdout);
    assert!(
        screen.contains("pruning records older than 30days"),
        "{screen}"
    );
    assert!(screen.contains("pruned records older than"), "{screen}");
}

/// Shell completions and manual pages come from the command line's own
/// definitions, and need no configuration (here: one that does not exist).
#[test]
fn completions_and_manual_pages_are_generated() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let o = binary::command(dir.path())
            .args(args)
            .env("CANCELWATCH_CONFIG", "/nonexistent/cancelwatch.toml")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(bash.contains("_cancelwatch()"), "{bash}");
    for word in ["transitions", "backfill", "--older-than", "--config"] {
        assert!(bash.contains(word), "no {word} in the bash completions");
    }
    assert!(run(&["completions", "zsh"]).starts_with("#compdef cancelwatch"));
    assert!(run(&["completions", "fish"]).contains("complete -c cancelwatch"));

    let page = run(&["man"]);
    assert!(page.contains(".TH cancelwatch 1"), "{page}");
    assert!(page.contains("check\\-config"), "{page}");
    let pages = dir.path().join("man1");
    std::fs::create_dir(&pages).unwrap();
    run(&["man", "--dir", pages.to_str().unwrap()]);
    let prune = std::fs::read_to_string(pages.join("cancelwatch-prune.1")).unwrap();
    assert!(prune.contains("older\\-than"), "{prune}");
    assert!(pages.join("cancelwatch.1").exists());
}

/// `--version` names the commit it was built from; a log level that is no
/// level stops `check-config` (and start-up) instead of silencing the log.
#[tokio::test]
async fn version_names_its_commit_and_log_levels_are_checked() {
    let config = TestConfig::new();
    let o = binary::run(&config, &["--version"]);
    let version = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success());
    assert!(
        version.trim_end().ends_with(')') && version.contains(" ("),
        "{version}"
    );
    let loud = config.with(|c| c.log.level = "loud".into());
    let o = binary::run(&loud, &["check-config"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("log.level"));
}

/// A fresh daemon's `/metrics`: its counters at zero before anything
/// happened, the process's own series, the alert outbox's backlog and the
/// age of its oldest row per sink, open alerts by rule, and answers by route
/// pattern and status class (a path no route matches counted as `other`).
#[tokio::test]
async fn metrics_start_at_zero_and_show_process_outbox_alerts_and_answers() {
    let config = config(Engine::Sqlite).await.with(|c| {
        c.alerts.sinks = vec![cancelwatch::config::SinkConfig {
            name: "hooks".into(),
            kind: "log".into(),
            ..Default::default()
        }];
    });
    let daemon = binary::BinaryDaemon::start(&config).await;
    let client = reqwest::Client::new();
    let scrape = || async {
        let r = client.get(format!("{}/metrics", daemon.url)).send().await;
        r.unwrap().text().await.unwrap()
    };
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
    };

    let first = scrape().await;
    for series in [
        r#"cancelwatch_deliveries_received_total{provider="stripe"}"#,
        r#"cancelwatch_deliveries_refused_total{provider="juice",reason="invalid_signature"}"#,
        r#"cancelwatch_fetch_errors_total{provider="stripe",reason="timeout"}"#,
        r#"cancelwatch_transitions_total{kind="juice.bulk_transfer",to_status="cancelled"}"#,
        r#"cancelwatch_alerts_raised_total{rule="partial_cancellation"}"#,
        r#"cancelwatch_alert_delivery_failures_total{sink="hooks"}"#,
        r#"cancelwatch_http_responses_total{route="/webhooks/{provider}",class="5xx"}"#,
        r#"cancelwatch_alert_outbox_pending{sink="hooks"}"#,
        r#"cancelwatch_alerts_open{rule="stuck"}"#,
    ] {
        assert_eq!(value(&first, series), Some(0.0), "{series} in:\n{first}");
    }
    // CPU time counts whole seconds (a counter): a fresh process may show 0.
    assert!(
        value(&first, "process_cpu_seconds_total").is_some(),
        "{first}"
    );
    for series in [
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(
            value(&first, series).unwrap() > 0.0,
            "{series} in:\n{first}"
        );
    }

    // An open alert whose second version still waits for `hooks` (not due
    // before 2099, so nothing delivers it meanwhile).
    alert(
        daemon.db(),
        "alrt_m",
        "partial_cancellation",
        BULK,
        "partial",
        "2026-11-01T10:00:00.000Z",
    )
    .await;
    let unsigned = client
        .post(format!("{}/webhooks/stripe", daemon.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    let nowhere = client
        .get(format!("{}/no/such/path/123", daemon.url))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);

    let text = scrape().await;
    let waiting = r#"cancelwatch_alert_outbox_pending{sink="hooks"}"#;
    assert_eq!(value(&text, waiting), Some(1.0), "{text}");
    let oldest = r#"cancelwatch_alert_outbox_oldest_pending_seconds{sink="hooks"}"#;
    // Written on 2026-11-01: over a month old by any clock that reads after it.
    assert!(value(&text, oldest).unwrap() > 30.0 * 86_400.0, "{text}");
    let open = r#"cancelwatch_alerts_open{rule="partial_cancellation"}"#;
    assert_eq!(value(&text, open), Some(1.0), "{text}");
    let refused = r#"cancelwatch_http_responses_total{route="/webhooks/{provider}",class="4xx"}"#;
    assert_eq!(value(&text, refused), Some(1.0), "{text}");
    let other = r#"cancelwatch_http_responses_total{route="other",class="4xx"}"#;
    assert_eq!(value(&text, other), Some(1.0), "{text}");
    assert!(!text.contains("/no/such/path"), "{text}");
    let scraped = r#"cancelwatch_http_responses_total{route="/metrics",class="2xx"}"#;
    assert!(value(&text, scraped).unwrap() >= 1.0, "{text}");
}

/// The variable naming the test suite's PostgreSQL server shares the
/// configuration's prefix but is no setting: where it is exported (a
/// developer's shell, CI), the daemon's configuration loads as without it.
#[test]
fn the_test_servers_variable_is_not_a_setting() {
    let config = TestConfig::new();
    let o = binary::command(config.dir())
        .arg("check-config")
        .env("CANCELWATCH_CONFIG", config.write_toml())
        .env(
            crate::support::postgres::ENV,
            "postgres://nobody@127.0.0.1:9/none",
        )
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `/metrics` says which build answers (`cancelwatch_build_info`) and gives
/// every series it renders a `# HELP` line.
#[tokio::test]
async fn metrics_name_the_build_and_explain_every_series() {
    let app = TestApp::start(TestConfig::new()).await;
    let (status, _) = app.post_stripe(&thin_event("evt_metrics_help")).await;
    assert_eq!(status, 200);
    let text = app.metrics().await;
    assert!(text.contains("cancelwatch_build_info{"), "{text}");
    let series: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("cancelwatch_") || l.starts_with("process_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(n, |n, suffix| n.strip_suffix(suffix).unwrap_or(n))
        })
        .collect();
    for name in [
        "cancelwatch_deliveries_received_total",
        "cancelwatch_http_responses_total",
        "cancelwatch_alert_outbox_pending",
        "cancelwatch_alerts_open",
        "process_resident_memory_bytes",
    ] {
        assert!(series.contains(name), "no {name} in:\n{text}");
    }
    for name in series {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP line"
        );
    }
    app.stop().await;
}

/// While the database is opened and migrated (here: held up by another
/// process's write lock on an older schema), the daemon already answers:
/// `/healthz` 200, `/readyz` 503, a webhook 503 with `Retry-After`; once
/// the migration is done, `/readyz` answers 200 on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_while_migrations_run() {
    let config = TestConfig::new().with(|c| c.database.busy_timeout_ms = 2_000);
    crate::support::db::create_at_version(&config, 8).await;
    let lock = crate::support::db::hold_write_lock(&config).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(cancelwatch::run_until(
        config.config().clone(),
        listener,
        async {
            let _ = stopped.await;
        },
    ));
    let client = reqwest::Client::new();
    let status = |path: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .get(format!("{url}{path}"))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    wait_until("/readyz answers 503", Duration::from_secs(10), || async {
        status("/readyz").await == 503
    })
    .await;
    assert_eq!(status("/healthz").await, 200);
    let webhook = client
        .post(format!("{url}/webhooks/stripe"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(webhook.status().as_u16(), 503);
    assert!(webhook.headers().contains_key("retry-after"));

    lock.release().await;
    wait_until("/readyz answers 200", Duration::from_secs(30), || async {
        status("/readyz").await == 200
    })
    .await;
    let _ = stop.send(());
    daemon.await.unwrap().unwrap();
}
