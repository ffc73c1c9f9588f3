//! Both engines answer the reads alike: the same rows go into a fresh
//! SQLite database and a fresh PostgreSQL database, every read is asked of
//! both, and the answers must be equal and be what the rows say.
//!
//! PostgreSQL is the server `CANCELWATCH_TEST_POSTGRES_URL` names (whose
//! user may create databases, e.g. postgres://postgres@127.0.0.1:5432/postgres);
//! each run makes its own database there and drops it after. Without the
//! variable these tests say they were skipped and pass: the SQLite side is
//! covered by the rest of the suite.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::str::FromStr;

use futures_util::FutureExt;
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Pool, QueryBuilder, SqlitePool};

use super::engine::{PushParam, ReadEngine};
use super::*;
use crate::store::sqlite::Db;

/// The two databases, holding the same rows.
pub(crate) struct Both {
    /// The SQLite engine's writer pool (prune writes through it).
    pub sqlite_write: SqlitePool,
    pub sqlite: SqlitePool,
    pub pg: PgPool,
}

impl Both {
    /// Runs one read on both engines; its answers, which must be equal.
    pub(crate) async fn same<T, FS, FP>(&self, sqlite: FS, pg: FP) -> T
    where
        T: std::fmt::Debug,
        FS: Future<Output = T>,
        FP: Future<Output = T>,
    {
        let (s, p) = (sqlite.await, pg.await);
        assert_eq!(
            format!("{s:?}"),
            format!("{p:?}"),
            "SQLite and PostgreSQL differ"
        );
        s
    }
}

/// The variable naming the PostgreSQL server of these tests.
const URL_VAR: &str = "CANCELWATCH_TEST_POSTGRES_URL";

/// Runs `test` on a fresh pair of seeded databases; skipped (with a line on
/// stderr) when no PostgreSQL server is named. The PostgreSQL database is
/// dropped whether `test` passes or panics.
pub(crate) async fn with_both<Fut: Future<Output = ()>>(test: impl FnOnce(Both) -> Fut) {
    let Ok(url) = std::env::var(URL_VAR) else {
        eprintln!("skipped: {URL_VAR} is not set, so nothing is compared with PostgreSQL");
        return;
    };
    let server = PgConnectOptions::from_str(&url).expect("a PostgreSQL url");
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(server.clone())
        .await
        .expect("connect to the PostgreSQL server");
    let name = format!("cw_pgread_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create a scratch database");
    let run = AssertUnwindSafe(async {
        let pg = PgPoolOptions::new()
            .max_connections(2)
            .connect_with(server.database(&name))
            .await
            .expect("connect to the scratch database");
        sqlx::migrate!("./migrations/postgres")
            .run(&pg)
            .await
            .expect("migrate");
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(
            &dir.path().join("parity.db"),
            &crate::config::DatabaseConfig::default(),
        )
        .await
        .unwrap();
        seed(&db.write).await;
        seed(&pg).await;
        // The seeded rows name their ids; PostgreSQL's sequences did not
        // hand those out, so they are moved past them, as SQLite's rowids are.
        for (table, key) in [
            ("inbox", "id"),
            ("refusals", "id"),
            ("resources", "rid"),
            ("transitions", "id"),
            ("progress", "id"),
            ("refunds", "id"),
            ("cancel_requests", "id"),
            ("alert_outbox", "id"),
        ] {
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{key}'), MAX({key})) FROM {table}"
            ))
            .execute(&pg)
            .await
            .expect("move a sequence past the seeded ids");
        }
        test(Both {
            sqlite_write: db.write.clone(),
            sqlite: db.read.clone(),
            pg: pg.clone(),
        })
        .await;
        pg.close().await;
        db.close().await;
    })
    .catch_unwind()
    .await;
    // FORCE: a panic above leaves the scratch pool's connections open.
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .expect("drop the scratch database");
    admin.close().await;
    if let Err(panic) = run {
        std::panic::resume_unwind(panic);
    }
}

/// A value of a seeded row.
enum V {
    T(&'static str),
    S(String),
    I(i64),
    B(bool),
    Null,
    /// NULL in a boolean column: PostgreSQL checks a parameter's type even when it is NULL.
    NullFlag,
}

/// The time `minutes` after the seeded rows' first moment, as stored.
pub(crate) fn at(minutes: i64) -> String {
    let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-02T09:00:00.000Z").unwrap();
    (t0 + chrono::Duration::minutes(minutes))
        .with_timezone(&chrono::Utc)
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// Inserts one row, every key given (both engines then hold the same ids).
async fn insert<DB: ReadEngine>(pool: &Pool<DB>, table: &str, columns: &str, values: Vec<V>) {
    let mut q = QueryBuilder::new(format!("INSERT INTO {table} ({columns}) VALUES ("));
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        match v {
            V::T(s) => q.param(s.to_string()),
            V::S(s) => q.param(s),
            V::I(n) => q.param(n),
            V::B(b) => q.param(b),
            V::Null => q.param(None::<String>),
            V::NullFlag => q.param(None::<bool>),
        };
    }
    // Rows are read back through the one thing every engine does here:
    // fetching. A constant of a stated type keeps both drivers' decoders happy.
    q.push(") RETURNING CAST(0 AS BIGINT)");
    let done: Vec<(i64,)> = DB::fetch_all(pool, q).await.expect("seed a row");
    assert_eq!(done.len(), 1);
}

/// Two Stripe and Juice histories, with aliases, items, refunds, progress,
/// alerts with outbox rows, cancel requests, deliveries and refusals.
#[rustfmt::skip]
async fn seed<DB: ReadEngine>(pool: &Pool<DB>) {
    use V::*;
    let t = |m| S(at(m));
    let resources = "rid, provider, kind, id, parent_id, status, terminal, livemode, \
                     snapshot, first_seen_at, last_observed_at, next_reconcile_at";
    let obt = r#"{"id":"obt_1","status":"canceled"}"#;
    for row in [
        vec![I(1), T("stripe"), T("stripe.outbound_transfer"), T("obt_1"), Null,
             T("canceled"), B(true), B(false), T(obt), t(0), t(1), t(60)],
        vec![I(2), T("juice"), T("juice.bulk_transfer"), T("bt_1"), Null,
             T("partially_completed"), B(true), NullFlag, Null, t(2), t(5), t(30)],
        vec![I(3), T("juice"), T("juice.transfer"), T("tr_1"), T("bt_1"),
             T("cancelled"), B(true), NullFlag, Null, t(3), t(3), Null],
        vec![I(4), T("juice"), T("juice.transfer"), T("tr_2"), T("bt_1"),
             T("on_hold"), B(false), NullFlag, Null, t(4), t(6), Null],
    ] {
        insert(pool, "resources", resources, row).await;
    }
    insert(pool, "resource_aliases", "alias, provider, kind, rid",
        vec![T("batch-ref"), T("juice"), T("juice.bulk_transfer"), I(2)]).await;
    let transitions = "id, rid, provider, kind, resource_id, parent_id, from_status, \
                       to_status, observed_at, trigger_type, trigger_id, livemode";
    for row in [
        vec![I(1), I(1), T("stripe"), T("stripe.outbound_transfer"), T("obt_1"), Null, Null,
             T("processing"), t(0), T("event"), T("evt_1"), B(false)],
        vec![I(2), I(1), T("stripe"), T("stripe.outbound_transfer"), T("obt_1"), Null,
             T("processing"), T("canceled"), t(1), T("cancel"), Null, B(false)],
        vec![I(3), I(2), T("juice"), T("juice.bulk_transfer"), T("bt_1"), Null, Null,
             T("executing"), t(2), T("event"), T("jev_1"), NullFlag],
        vec![I(4), I(3), T("juice"), T("juice.transfer"), T("tr_1"), T("bt_1"), Null,
             T("cancelled"), t(3), T("event"), T("jev_2"), NullFlag],
        vec![I(5), I(4), T("juice"), T("juice.transfer"), T("tr_2"), T("bt_1"), Null,
             T("completed"), t(4), T("reconcile"), Null, NullFlag],
        vec![I(6), I(2), T("juice"), T("juice.bulk_transfer"), T("bt_1"), Null,
             T("executing"), T("partially_completed"), t(5), T("event"), T("jev_3"), NullFlag],
        // A status no provider documents, recorded: a filter on it is accepted.
        vec![I(7), I(4), T("juice"), T("juice.transfer"), T("tr_2"), T("bt_1"),
             T("completed"), T("on_hold"), t(6), T("reconcile"), Null, NullFlag],
    ] {
        insert(pool, "transitions", transitions, row).await;
    }
    insert(pool, "progress",
        "id, rid, observed_at, status, success_count, failure_count, validated_count, trigger_type",
        vec![I(1), I(2), t(5), T("partially_completed"), I(1), I(1), I(2), T("event")]).await;
    insert(pool, "refunds",
        "id, rid, provider, kind, resource_id, parent_id, status, reason, amount, currency, \
         opened_at, updated_at, trigger_type",
        vec![I(1), I(3), T("juice"), T("juice.transfer"), T("tr_1"), T("bt_1"), T("pending"),
             T("cancelled"), I(1250), T("eur"), t(3), t(3), T("event")]).await;
    let alerts = "id, rule, severity, provider, kind, resource_id, summary, details, state, \
                  version, created_at, updated_at, resolved_at";
    for row in [
        vec![T("alrt_a"), T("partial_cancellation"), T("warning"), T("juice"),
             T("juice.bulk_transfer"), T("bt_1"), T("1 of 2 items cancelled"),
             T(r#"{"cancelled":1}"#), T("open"), I(2), t(5), t(6), Null],
        vec![T("alrt_b"), T("stuck"), T("warning"), T("stripe"), T("stripe.outbound_transfer"),
             T("obt_1"), T("processing too long"), T("{}"), T("resolved"), I(1), t(1),
             t(2), t(2)],
        // Raised at the same moment as alrt_a: the cursor's id breaks the tie.
        vec![T("alrt_c"), T("dead_letter"), T("critical"), T("juice"), T("juice.transfer"),
             T("tr_2"), T("a delivery died"), T("not json"), T("open"), I(1), t(5), t(5),
             Null],
    ] {
        insert(pool, "alerts", alerts, row).await;
    }
    let outbox = "id, alert_id, alert_version, sink, payload, state, attempts, \
                  next_attempt_at, created_at, delivered_at";
    for row in [
        vec![I(1), T("alrt_a"), I(1), T("ops"), T("{}"), T("delivered"), I(1), t(5),
             t(5), t(5)],
        vec![I(2), T("alrt_a"), I(2), T("ops"), T("{}"), T("pending"), I(2), t(9),
             t(6), Null],
        vec![I(3), T("alrt_a"), I(2), T("Pager"), T("{}"), T("pending"), I(0), t(6),
             t(6), Null],
        vec![I(4), T("alrt_c"), I(1), T("ops"), T("{}"), T("pending"), I(0), t(5),
             t(5), Null],
    ] {
        insert(pool, "alert_outbox", outbox, row).await;
    }
    let cancels = "id, provider, kind, resource_id, idempotency_key, requested_by, \
                   requested_at, http_status, outcome, response_body, answered_at";
    for row in [
        vec![I(1), T("stripe"), T("stripe.outbound_transfer"), T("obt_1"), T("k-0"),
             T("cli"), t(0), I(400), T("idempotency_conflict"), T(r#"{"error":{}}"#),
             t(0)],
        vec![I(2), T("stripe"), T("stripe.outbound_transfer"), T("obt_1"), T("k-1"),
             T("cli"), t(1), I(200), T("canceled"), T(r#"{"status":"canceled"}"#),
             t(1)],
    ] {
        insert(pool, "cancel_requests", cancels, row).await;
    }
    let inbox = "id, provider, dedupe_key, event_type, event_id, resource_kind, resource_id, \
                 context, livemode, body_size, received_at, state, next_attempt_at";
    for (row, body) in [
        (vec![I(1), T("stripe"), T("evt_1"), T("v2.money_management.outbound_transfer.created"),
              T("evt_1"), T("stripe.outbound_transfer"), T("obt_1"), Null, B(false), I(2),
              t(0), T("processed"), t(0)], true),
        (vec![I(2), T("stripe"), T("evt_2"), T("v2.money_management.outbound_transfer.canceled"),
              T("evt_2"), T("stripe.outbound_transfer"), T("obt_1"), T("acct_1"), B(false), I(2),
              t(1), T("pending"), t(1)], true),
        // Its body pruned already.
        (vec![I(3), T("juice"), T("jc_1"), T("transfer.cancelled"), Null, T("juice.transfer"),
              T("tr_1"), Null, NullFlag, I(2), t(3), T("dead"), t(3)], false),
        (vec![I(4), T("juice"), T("jc_2"), T("bulk_transfer.updated"), Null,
              T("juice.bulk_transfer"), T("bt_1"), Null, NullFlag, I(2), t(5), T("failed"),
              t(8)], true),
    ] {
        insert(pool, "inbox", inbox, row).await;
        if body {
            let mut q = QueryBuilder::new("UPDATE inbox SET raw_body = ");
            q.param(b"{}".to_vec())
                .push(" WHERE id = (SELECT MAX(id) FROM inbox) RETURNING CAST(0 AS BIGINT)");
            let done: Vec<(i64,)> = DB::fetch_all(pool, q).await.unwrap();
            assert_eq!(done.len(), 1);
        }
    }
    let refusals = "id, provider, reason, message, http_status, received_at";
    for (id, m) in [(1, 0), (2, 10)] {
        insert(pool, "refusals", refusals,
            vec![I(id), T("stripe"), T("signature"), T("bad signature"), I(401), t(m)]).await;
    }
}

/// The JSON an answer is served as.
fn json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn ids<T>(page: &Page<T>, id: impl Fn(&T) -> String) -> Vec<String> {
    page.data.iter().map(id).collect()
}

fn req(limit: Option<i64>, cursor: Option<&String>) -> PageRequest {
    PageRequest {
        limit,
        cursor: cursor.cloned(),
    }
}

#[tokio::test]
async fn history_reads_alike_on_both_engines() {
    with_both(|b| async move {
        // By an alias: the bulk transfer, with its items, progress and alerts.
        let h = b
            .same(
                async { json(&history(&b.sqlite, "batch-ref").await.unwrap()) },
                async { json(&history(&b.pg, "batch-ref").await.unwrap()) },
            )
            .await;
        assert_eq!(h["id"], "batch-ref");
        let r = &h["resources"][0];
        assert_eq!(h["resources"].as_array().unwrap().len(), 1);
        assert_eq!(r["id"], "bt_1");
        assert_eq!(r["transitions"].as_array().unwrap().len(), 2);
        assert_eq!(r["progress"][0]["success_count"], 1);
        let children = r["children"].as_array().unwrap();
        assert_eq!(children.len(), 2);
        assert_eq!(children[0]["id"], "tr_1");
        assert_eq!(children[0]["refunds"][0]["amount"], 1250);
        assert_eq!(children[1]["transitions"].as_array().unwrap().len(), 2);
        // Per sink, the latest version only.
        let alert = &r["alerts"][0];
        assert_eq!(alert["id"], "alrt_a");
        assert_eq!(alert["details"]["cancelled"], 1);
        let sinks: Vec<(String, i64)> = alert["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["sink"].as_str().unwrap().to_string(),
                    d["alert_version"].as_i64().unwrap(),
                )
            })
            .collect();
        assert_eq!(sinks, [("Pager".to_string(), 2), ("ops".to_string(), 2)]);

        // By its own id: the Stripe transfer, with its cancel requests.
        let h = b
            .same(
                async { json(&history(&b.sqlite, "obt_1").await.unwrap()) },
                async { json(&history(&b.pg, "obt_1").await.unwrap()) },
            )
            .await;
        let r = &h["resources"][0];
        assert_eq!(r["snapshot"]["status"], "canceled");
        assert_eq!(
            r["cancel_requests"][1]["response_body"]["status"],
            "canceled"
        );
        assert_eq!(r["alerts"][0]["state"], "resolved");
        assert_eq!(r["livemode"], false);

        let none = b
            .same(
                async { history(&b.sqlite, "nobody").await.unwrap().is_none() },
                async { history(&b.pg, "nobody").await.unwrap().is_none() },
            )
            .await;
        assert!(none);
    })
    .await;
}

/// The ids of a transitions page and its cursor, on both engines.
async fn transition_page(
    b: &Both,
    filter: &TransitionFilter,
    page: &PageRequest,
) -> (Vec<String>, Option<String>) {
    let on = |p: Page<Transition>| (ids(&p, |t| t.id.to_string()), p.next_cursor);
    b.same(
        async { on(transitions(&b.sqlite, filter, page).await.unwrap()) },
        async { on(transitions(&b.pg, filter, page).await.unwrap()) },
    )
    .await
}

#[tokio::test]
async fn transition_pages_and_filters_read_alike_on_both_engines() {
    with_both(|b| async move {
        let all = TransitionFilter::default();
        let (first, cursor) = transition_page(&b, &all, &req(Some(3), None)).await;
        assert_eq!(first, ["7", "6", "5"]);
        let (second, cursor) = transition_page(&b, &all, &req(Some(3), cursor.as_ref())).await;
        assert_eq!(second, ["4", "3", "2"]);
        let (last, cursor) = transition_page(&b, &all, &req(Some(3), cursor.as_ref())).await;
        assert_eq!((last, cursor), (vec!["1".to_string()], None));

        let f = |f: fn(&mut TransitionFilter)| {
            let mut filter = TransitionFilter::default();
            f(&mut filter);
            filter
        };
        let cases: [(TransitionFilter, &[&str]); 6] = [
            (
                f(|f| {
                    f.provider = Some("juice".into());
                    f.kind = Some("juice.transfer".into());
                }),
                &["7", "5", "4"],
            ),
            (f(|f| f.to_status = Some("cancelled".into())), &["4"]),
            // Recorded though no provider documents it.
            (f(|f| f.to_status = Some("on_hold".into())), &["7"]),
            (
                f(|f| {
                    f.since = Some(at(1));
                    f.until = Some(at(4));
                }),
                &["4", "3", "2"],
            ),
            (f(|f| f.resource_id = Some("bt_1".into())), &["6", "3"]),
            (
                f(|f| {
                    f.resource_id = Some("tr_2".into());
                    f.to_status = Some("completed".into());
                }),
                &["5"],
            ),
        ];
        for (filter, want) in cases {
            let (got, _) = transition_page(&b, &filter, &PageRequest::default()).await;
            assert_eq!(got, want, "{filter:?}");
            let plan = |p: Vec<String>| !p.is_empty();
            let planned = b
                .same(
                    async {
                        plan(
                            explain_transitions(&b.sqlite, &filter, &req(None, None))
                                .await
                                .unwrap(),
                        )
                    },
                    async {
                        plan(
                            explain_transitions(&b.pg, &filter, &req(None, None))
                                .await
                                .unwrap(),
                        )
                    },
                )
                .await;
            assert!(planned);
        }

        // Refused alike: a kind nobody documents or recorded, a foreign cursor.
        let refused = |r: Result<Page<Transition>, QueryError>| match r {
            Err(QueryError::Invalid { field, .. }) => field,
            other => panic!("not refused: {other:?}"),
        };
        let typo = f(|f| f.kind = Some("juice.tranfser".into()));
        let field = b
            .same(
                async { refused(transitions(&b.sqlite, &typo, &req(None, None)).await) },
                async { refused(transitions(&b.pg, &typo, &req(None, None)).await) },
            )
            .await;
        assert_eq!(field, "kind");
        let events_cursor = Some(encode_cursor("e", "3"));
        let field = b
            .same(
                async {
                    refused(transitions(&b.sqlite, &all, &req(None, events_cursor.as_ref())).await)
                },
                async {
                    refused(transitions(&b.pg, &all, &req(None, events_cursor.as_ref())).await)
                },
            )
            .await;
        assert_eq!(field, "cursor");
    })
    .await;
}

#[tokio::test]
async fn alert_and_event_pages_read_alike_on_both_engines() {
    with_both(|b| async move {
        let alert_page = |filter: AlertFilter, page: PageRequest| {
            let b = &b;
            async move {
                let on = |p: Page<Alert>| (json(&p.data), p.next_cursor);
                b.same(
                    async { on(alerts(&b.sqlite, &filter, &page).await.unwrap()) },
                    async { on(alerts(&b.pg, &filter, &page).await.unwrap()) },
                )
                .await
            }
        };
        let id_list = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_string())
                .collect()
        };
        let (first, cursor) = alert_page(AlertFilter::default(), req(Some(2), None)).await;
        // Newest first; of two raised at once, the greater id first.
        assert_eq!(id_list(&first), ["alrt_c", "alrt_a"]);
        assert_eq!(first[0]["details"], "not json");
        assert_eq!(first[0]["deliveries"][0]["state"], "pending");
        let (rest, cursor) =
            alert_page(AlertFilter::default(), req(Some(2), cursor.as_ref())).await;
        assert_eq!((id_list(&rest), cursor), (vec!["alrt_b".to_string()], None));
        let resolved = AlertFilter {
            state: Some("resolved".into()),
            ..AlertFilter::default()
        };
        assert_eq!(
            id_list(&alert_page(resolved, req(None, None)).await.0),
            ["alrt_b"]
        );
        let recent_partial = AlertFilter {
            rule: Some("partial_cancellation".into()),
            since: Some(at(6)),
            ..AlertFilter::default()
        };
        assert_eq!(
            id_list(&alert_page(recent_partial, req(None, None)).await.0),
            ["alrt_a"]
        );

        let event_page = |filter: EventFilter, page: PageRequest| {
            let b = &b;
            async move {
                let on = |p: Page<Event>| (json(&p.data), p.next_cursor);
                b.same(
                    async { on(events(&b.sqlite, &filter, &page).await.unwrap()) },
                    async { on(events(&b.pg, &filter, &page).await.unwrap()) },
                )
                .await
            }
        };
        let juice = EventFilter {
            provider: Some("juice".into()),
            ..EventFilter::default()
        };
        let (first, cursor) = event_page(juice.clone(), req(Some(1), None)).await;
        assert_eq!(first[0]["key"], "jc_2");
        assert_eq!(first[0]["body_kept"], true);
        let (rest, cursor) = event_page(juice, req(Some(1), cursor.as_ref())).await;
        assert_eq!(rest[0]["key"], "jc_1");
        assert_eq!(rest[0]["body_kept"], false);
        assert!(cursor.is_none());
        let pending = EventFilter {
            state: Some("pending".into()),
            ..EventFilter::default()
        };
        let (page, _) = event_page(pending, req(None, None)).await;
        assert_eq!(page[0]["key"], "evt_2");
        assert_eq!(page.as_array().unwrap().len(), 1);
    })
    .await;
}
