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

/// Asks the same of both engines and answers what both answered, which
/// must be equal: either one read written once for every engine, with
/// `$pool` standing for each engine's pool in turn, or each engine's own
/// function, each on what it is given first and the same arguments after.
macro_rules! same {
    ($both:expr, |$pool:ident| $read:expr) => {{
        let both: &$crate::store::queries::parity::Both = &$both;
        both.same(
            async {
                let $pool = &both.sqlite;
                $read
            },
            async {
                let $pool = &both.pg;
                $read
            },
        )
        .await
    }};
    ($both:expr; $lite:path, $lite_on:expr; $pg:path, $pg_on:expr; $($arg:expr),*) => {
        $both.same($lite($lite_on, $($arg),*), $pg($pg_on, $($arg),*)).await
    };
}
pub(crate) use same;

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

fn req(limit: Option<i64>, cursor: Option<&String>) -> PageRequest {
    PageRequest {
        limit,
        cursor: cursor.cloned(),
    }
}

/// The `field` of each row of a JSON list.
fn each(rows: &serde_json::Value, field: &str) -> Vec<String> {
    let text = |v: &serde_json::Value| v.as_str().map_or_else(|| v.to_string(), str::to_string);
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| text(&r[field]))
        .collect()
}

/// A page as served: its rows as JSON, and its cursor.
fn served<T: Serialize>(page: Result<Page<T>, QueryError>) -> (serde_json::Value, Option<String>) {
    let page = page.unwrap();
    (json(&page.data), page.next_cursor)
}

#[tokio::test]
async fn history_reads_alike_on_both_engines() {
    with_both(|b| async move {
        // By an alias: the bulk transfer, with its items, progress and alerts.
        let h = same!(b, |pool| json(&history(pool, "batch-ref").await.unwrap()));
        assert_eq!(h["id"], "batch-ref");
        assert_eq!(h["resources"].as_array().unwrap().len(), 1);
        let r = &h["resources"][0];
        assert_eq!(r["id"], "bt_1");
        assert_eq!(
            each(&r["transitions"], "to_status"),
            ["executing", "partially_completed"]
        );
        assert_eq!(r["progress"][0]["success_count"], 1);
        let children = &r["children"];
        assert_eq!(each(children, "id"), ["tr_1", "tr_2"]);
        assert_eq!(children[0]["refunds"][0]["amount"], 1250);
        assert_eq!(each(&children[1]["transitions"], "id"), ["5", "7"]);
        let alert = &r["alerts"][0];
        assert_eq!(alert["id"], "alrt_a");
        assert_eq!(alert["details"]["cancelled"], 1);
        // Per sink, its latest version only.
        assert_eq!(each(&alert["deliveries"], "sink"), ["Pager", "ops"]);
        assert_eq!(each(&alert["deliveries"], "alert_version"), ["2", "2"]);

        // By its own id: the Stripe transfer, with its cancel requests.
        let h = same!(b, |pool| json(&history(pool, "obt_1").await.unwrap()));
        let r = &h["resources"][0];
        assert_eq!(r["snapshot"]["status"], "canceled");
        assert_eq!(r["livemode"], false);
        assert_eq!(
            r["cancel_requests"][1]["response_body"]["status"],
            "canceled"
        );
        assert_eq!(each(&r["alerts"], "state"), ["resolved"]);

        let none = same!(b, |pool| history(pool, "nobody").await.unwrap().is_none());
        assert!(none);
    })
    .await;
}

#[tokio::test]
async fn transition_pages_and_filters_read_alike_on_both_engines() {
    with_both(|b| async move {
        let page = |filter: TransitionFilter, page: PageRequest| {
            let b = &b;
            async move {
                let (rows, cursor) =
                    same!(b, |pool| served(transitions(pool, &filter, &page).await));
                (each(&rows, "id"), cursor)
            }
        };
        let all = TransitionFilter::default;
        let (first, cursor) = page(all(), req(Some(3), None)).await;
        assert_eq!(first, ["7", "6", "5"]);
        let (second, cursor) = page(all(), req(Some(3), cursor.as_ref())).await;
        assert_eq!(second, ["4", "3", "2"]);
        let (last, cursor) = page(all(), req(Some(3), cursor.as_ref())).await;
        assert_eq!((last, cursor), (vec!["1".to_string()], None));

        let with = |f: fn(&mut TransitionFilter)| {
            let mut filter = TransitionFilter::default();
            f(&mut filter);
            filter
        };
        let cases: [(TransitionFilter, &[&str]); 6] = [
            (
                with(|f| {
                    f.provider = Some("juice".into());
                    f.kind = Some("juice.transfer".into());
                }),
                &["7", "5", "4"],
            ),
            (with(|f| f.to_status = Some("cancelled".into())), &["4"]),
            // Recorded though no provider documents it.
            (with(|f| f.to_status = Some("on_hold".into())), &["7"]),
            (
                with(|f| {
                    f.since = Some(at(1));
                    f.until = Some(at(4));
                }),
                &["4", "3", "2"],
            ),
            (with(|f| f.resource_id = Some("bt_1".into())), &["6", "3"]),
            (
                with(|f| {
                    f.resource_id = Some("tr_2".into());
                    f.to_status = Some("completed".into());
                }),
                &["5"],
            ),
        ];
        for (filter, want) in cases {
            let (got, _) = page(filter.clone(), PageRequest::default()).await;
            assert_eq!(got, want, "{filter:?}");
            let planned = same!(b, |pool| {
                let plan = explain_transitions(pool, &filter, &req(None, None)).await;
                !plan.unwrap().is_empty()
            });
            assert!(planned, "{filter:?}");
        }

        // Refused alike: a kind nobody documents or recorded, a foreign cursor.
        let typo = with(|f| f.kind = Some("juice.tranfser".into()));
        let foreign = req(None, Some(&encode_cursor("e", "3")));
        for (filter, page, field) in [(typo, req(None, None), "kind"), (all(), foreign, "cursor")] {
            let refused = same!(b, |pool| match transitions(pool, &filter, &page).await {
                Err(QueryError::Invalid { field, .. }) => field,
                Ok(p) => panic!("not refused: {:?}", p.data),
                Err(e) => panic!("not refused: {e}"),
            });
            assert_eq!(refused, field);
        }
    })
    .await;
}

#[tokio::test]
async fn alert_and_event_pages_read_alike_on_both_engines() {
    with_both(|b| async move {
        let alert_page = |filter: AlertFilter, page: PageRequest| {
            let b = &b;
            async move { same!(b, |pool| served(alerts(pool, &filter, &page).await)) }
        };
        let (first, cursor) = alert_page(AlertFilter::default(), req(Some(2), None)).await;
        // Newest first; of two raised at once, the greater id first.
        assert_eq!(each(&first, "id"), ["alrt_c", "alrt_a"]);
        assert_eq!(first[0]["details"], "not json");
        assert_eq!(first[0]["deliveries"][0]["state"], "pending");
        let (rest, cursor) =
            alert_page(AlertFilter::default(), req(Some(2), cursor.as_ref())).await;
        assert_eq!(
            (each(&rest, "id"), cursor),
            (vec!["alrt_b".to_string()], None)
        );
        let resolved = AlertFilter {
            state: Some("resolved".into()),
            ..AlertFilter::default()
        };
        assert_eq!(
            each(&alert_page(resolved, req(None, None)).await.0, "id"),
            ["alrt_b"]
        );
        let recent_partial = AlertFilter {
            rule: Some("partial_cancellation".into()),
            since: Some(at(6)),
            ..AlertFilter::default()
        };
        let (recent, _) = alert_page(recent_partial, req(None, None)).await;
        assert_eq!(each(&recent, "id"), ["alrt_a"]);

        let event_page = |filter: EventFilter, page: PageRequest| {
            let b = &b;
            async move { same!(b, |pool| served(events(pool, &filter, &page).await)) }
        };
        let juice = EventFilter {
            provider: Some("juice".into()),
            ..EventFilter::default()
        };
        let (first, cursor) = event_page(juice.clone(), req(Some(1), None)).await;
        assert_eq!(each(&first, "key"), ["jc_2"]);
        assert_eq!(first[0]["body_kept"], true);
        let (rest, cursor) = event_page(juice, req(Some(1), cursor.as_ref())).await;
        assert_eq!(each(&rest, "key"), ["jc_1"]);
        assert_eq!(rest[0]["body_kept"], false);
        assert!(cursor.is_none());
        let pending = EventFilter {
            state: Some("pending".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            each(&event_page(pending, req(None, None)).await.0, "key"),
            ["evt_2"]
        );
    })
    .await;
}
