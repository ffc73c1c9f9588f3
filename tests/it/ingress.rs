//! The daemon's front door, driven over real HTTP: verification, durable
//! accept, duplicates, refusals, restarts, and a kill right after the 2xx.

use std::time::Duration;

use cancelwatch::providers::{juice::checksum, stripe::signature};
use serde_json::{json, Value};

use crate::support::binary::{self, BinaryDaemon};
use crate::support::config::{BUSINESS_ID, OLD_WEBHOOK_SECRET, WEBHOOK_SECRET};
use crate::support::db::{self, TestDb};
use crate::support::webhooks::{juice_body, signed_now, thin_event, STRIPE_FIXTURE};
use crate::support::{both_engines, wait_until, Engine, TestApp, TestConfig};

/// Bodies of at most 64 KiB.
async fn config(engine: Engine) -> TestConfig {
    TestConfig::on(engine)
        .await
        .with(|c| c.server.max_body_bytes = 64 * 1024)
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

both_engines! {
    #[tokio::test]
    async fn stripe_delivery_is_stored_exactly_and_duplicates_are_acknowledged(engine) {
        let app = TestApp::start(config(engine).await).await;

        let (status, body) = app.post_stripe(STRIPE_FIXTURE).await;
        assert_eq!(
            (status, &body),
            (200, &json!({"received": true, "duplicate": false}))
        );

        // A provider retry is re-signed with a fresh timestamp and the other secret.
        let again = signature::sign_header(
            OLD_WEBHOOK_SECRET,
            chrono::Utc::now().timestamp() + 1,
            STRIPE_FIXTURE,
        );
        let (status, body) = app.post_stripe_with(STRIPE_FIXTURE, Some(&again)).await;
        assert_eq!(
            (status, &body),
            (200, &json!({"received": true, "duplicate": true}))
        );

        let rows = db::deliveries(app.db()).await;
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.provider, "stripe");
        assert_eq!(
            r.dedupe_key,
            "evt_test_65R9Ijk8zWs5ZqJ2Wnv16R9Ijk8zWs5ZqJ2W"
        );
        assert_eq!(r.event_type, "v2.money_management.outbound_transfer.posted");
        assert_eq!(r.resource_kind.as_deref(), Some("stripe.outbound_transfer"));
        assert_eq!(r.resource_id.as_deref(), Some("obt_test_61R9Ijk"));
        assert_eq!(r.context.as_deref(), Some("acct_1Nv0FGQ9RKHgCVdK"));
        assert_eq!(
            r.raw_body.as_deref(),
            Some(STRIPE_FIXTURE),
            "the exact bytes received are kept"
        );
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test]
    async fn stripe_refusals_answer_with_codes_and_are_recorded_without_body(engine) {
        let app = TestApp::start(config(engine).await).await;
        let body = thin_event("evt_refused");
        let now = chrono::Utc::now().timestamp();
        let good = signed_now(WEBHOOK_SECRET, &body);

        let v1_snapshot = br#"{"id":"evt_v1","object":"event","type":"payout.canceled","created":1700000000,"data":{"object":{}}}"#;
        let not_json = b"this is not json";
        let array = b"[1,2,3]";
        let missing_type =
            br#"{"id":"evt_x","object":"v2.core.event","created":"2026-10-30T12:00:00Z"}"#;
        // (what, body, Stripe-Signature, status, error code)
        type Case = (&'static str, Vec<u8>, Option<String>, u16, &'static str);
        let cases: Vec<Case> = vec![
            ("no header", body.clone(), None, 401, "missing_signature"),
            (
                "empty header",
                body.clone(),
                Some(String::new()),
                401,
                "missing_signature",
            ),
            (
                "wrong secret",
                body.clone(),
                Some(signed_now("whsec_wrong", &body)),
                401,
                "invalid_signature",
            ),
            (
                "tampered body",
                thin_event("evt_other"),
                Some(good.clone()),
                401,
                "invalid_signature",
            ),
            (
                "too old",
                body.clone(),
                Some(signature::sign_header(WEBHOOK_SECRET, now - 301, &body)),
                401,
                "timestamp_out_of_tolerance",
            ),
            (
                "v1 snapshot event",
                v1_snapshot.to_vec(),
                Some(signed_now(WEBHOOK_SECRET, v1_snapshot)),
                400,
                "unexpected_object",
            ),
            (
                "not json",
                not_json.to_vec(),
                Some(signed_now(WEBHOOK_SECRET, not_json)),
                400,
                "malformed_payload",
            ),
            (
                "json array",
                array.to_vec(),
                Some(signed_now(WEBHOOK_SECRET, array)),
                400,
                "malformed_payload",
            ),
            (
                "missing type",
                missing_type.to_vec(),
                Some(signed_now(WEBHOOK_SECRET, missing_type)),
                400,
                "malformed_payload",
            ),
            (
                "empty body",
                Vec::new(),
                Some(signed_now(WEBHOOK_SECRET, b"")),
                400,
                "malformed_payload",
            ),
            (
                "invalid utf-8",
                b"\xff\xfe{}".to_vec(),
                Some(signed_now(WEBHOOK_SECRET, b"\xff\xfe{}")),
                400,
                "malformed_payload",
            ),
        ];
        for (name, body, header, want_status, want_code) in &cases {
            let (status, answer) = app.post_stripe_with(body, header.as_deref()).await;
            assert_eq!(status, *want_status, "{name}: {answer}");
            assert_eq!(error_code(&answer), *want_code, "{name}: {answer}");
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{name}"
            );
        }

        // A repeated signature header is refused too.
        let resp = app
            .client()
            .post(format!("{}/webhooks/stripe", app.url))
            .header("Stripe-Signature", &good)
            .header("Stripe-Signature", &good)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);

        // Too large: refused with 413 before the body is read in full.
        let big = vec![b' '; 64 * 1024 + 1];
        let (status, answer) = app.post_stripe(&big).await;
        assert_eq!((status, error_code(&answer)), (413, "payload_too_large"));

        // The daemon keeps serving good deliveries.
        let (status, _) = app.post_stripe_with(&body, Some(&good)).await;
        assert_eq!(status, 200);

        // The refusal records are flushed by the writer before it stops.
        let stopped = TestDb::of(&app.stop().await);
        let refusals = db::refusals(&stopped).await;
        assert_eq!(refusals.len(), cases.len() + 2);
        assert!(refusals.iter().all(|r| r.provider == "stripe"));
        assert!(refusals
            .iter()
            .any(|r| r.reason == "payload_too_large" && r.http_status == 413));
        let columns = db::column_names(&stopped, "refusals").await;
        assert!(!columns
            .iter()
            .any(|c| c.contains("body") && c != "body_size"));
        assert_eq!(
            db::delivery_count(&stopped).await,
            1,
            "only the good delivery reached the inbox"
        );
    }
}

both_engines! {
    #[tokio::test]
    async fn juice_checksums_verify_and_dedupe_on_event_and_checksum(engine) {
        let app = TestApp::start(config(engine).await).await;
        let data = json!({"id": "6f1c1e9a-0000-4000-8000-000000000001", "status": "cancelled",
                          "reference": "payroll/nov", "note": "Zoë – €"});
        let body = juice_body("bulk_transfer.cancelled", data.clone(), BUSINESS_ID);
        assert_eq!(
            app.post_juice(body.clone()).await,
            (200, json!({"received": true, "duplicate": false}))
        );
        assert_eq!(
            app.post_juice(body).await,
            (200, json!({"received": true, "duplicate": true}))
        );

        // Lowercase hex is the same checksum: still a duplicate.
        let lower = json!({"checksum": checksum::sign(BUSINESS_ID, "bulk_transfer.cancelled", &data).to_lowercase(),
                           "event": "bulk_transfer.cancelled", "data": data});
        assert_eq!(
            app.post_juice(serde_json::to_vec(&lower).unwrap()).await.1["duplicate"],
            true
        );

        let wrong = juice_body(
            "bulk_transfer.cancelled",
            json!({"id": "x"}),
            "another-business",
        );
        let (status, answer) = app.post_juice(wrong).await;
        assert_eq!((status, error_code(&answer)), (401, "invalid_signature"));
        let (status, answer) = app
            .post_juice(br#"{"event":"bulk_transfer.cancelled","data":{}}"#.to_vec())
            .await;
        assert_eq!((status, error_code(&answer)), (401, "missing_signature"));
        let (status, answer) = app.post_juice(b"nope".to_vec()).await;
        assert_eq!((status, error_code(&answer)), (400, "malformed_payload"));

        let stored = db::deliveries(app.db()).await;
        let juice: Vec<_> = stored.iter().filter(|d| d.provider == "juice").collect();
        assert_eq!(juice.len(), 1);
        let key = &juice[0].dedupe_key;
        assert!(key.starts_with("bulk_transfer.cancelled:"));
        assert_eq!(key, &key.to_lowercase());
        assert_eq!(
            juice[0].resource_id.as_deref(),
            Some("6f1c1e9a-0000-4000-8000-000000000001")
        );
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test]
    async fn unconfigured_provider_answers_404_and_health_endpoints_answer(engine) {
        let app = TestApp::start(config(engine).await.with(|c| c.juice.checksum_keys.clear())).await;
        let (status, _) = app.post_juice(b"{}".to_vec()).await;
        assert_eq!(status, 404);
        let (status, _) = app.post("/webhooks/paypal", Some(json!({})), None).await;
        assert_eq!(status, 404);
        let (status, _) = app.get("/readyz", None).await;
        assert_eq!(status, 200);
        assert!(app.metrics().await.contains("cancelwatch_inbox_depth"));
        app.stop().await;
    }
}

both_engines! {
    #[tokio::test]
    async fn a_restart_keeps_what_was_acknowledged(engine) {
        let app = TestApp::start(config(engine).await).await;
        let mut bodies = Vec::new();
        for i in 0..20 {
            let body = thin_event(&format!("evt_restart_{i}"));
            let (status, _) = app.post_stripe(&body).await;
            assert_eq!(status, 200);
            bodies.push(body);
        }

        let app = TestApp::start(app.stop().await).await;
        for body in &bodies {
            let (status, answer) = app.post_stripe(body).await;
            assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
        }
        app.stop().await;
    }
}

/// A 2xx means the write-ahead log was synced to disk after the commit:
/// when the WAL cannot be synced (here: its file moved away under SQLite,
/// and a connection opened since has started a new, empty one at its path,
/// which the writer does not commit to), the delivery is refused, and its
/// retry is acknowledged once it can.
#[tokio::test]
async fn no_acknowledgement_without_the_wal_synced() {
    let app = TestApp::start(config(Engine::Sqlite).await).await;
    let wal = app.test_config().dir().join("cw.db-wal");
    let moved = app.test_config().dir().join("cw.db-wal.moved");

    let first = thin_event("evt_wal_first");
    let (status, _) = app.post_stripe(&first).await;
    assert_eq!(status, 200);

    std::fs::rename(&wal, &moved).unwrap();
    db::read_on_a_new_connection(app.test_config()).await;
    assert!(wal.exists(), "the late connection started a new WAL file");
    let body = thin_event("evt_wal_unsynced");
    let (status, answer) = app.post_stripe(&body).await;
    assert_eq!(status, 500, "{answer}");
    let text = answer.to_string();
    assert!(
        !text.contains("cw.db"),
        "no internals in the answer: {text}"
    );

    std::fs::rename(&moved, &wal).unwrap();
    let (status, answer) = app.post_stripe(&body).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    app.stop().await;
}

both_engines! {
    /// The case that matters most: the real binary answers 2xx to many concurrent
    /// deliveries, is killed with SIGKILL right after, and every acknowledged
    /// delivery is in the database.
    #[tokio::test]
    async fn acknowledged_deliveries_survive_sigkill(engine) {
        let mut daemon = BinaryDaemon::start(&TestConfig::on(engine).await).await;
        let client = reqwest::Client::new();

        let mut sends = tokio::task::JoinSet::new();
        for i in 0..200 {
            let client = client.clone();
            let url = daemon.url.clone();
            sends.spawn(async move {
                let id = format!("evt_kill_{i}");
                let body = thin_event(&id);
                let header = signed_now(WEBHOOK_SECRET, &body);
                let r = client
                    .post(format!("{url}/webhooks/stripe"))
                    .header("Stripe-Signature", header)
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => Some(id),
                    _ => None,
                }
            });
        }
        // Kill as soon as the first half is acknowledged, with the rest in flight.
        let mut acked = Vec::new();
        while let Some(res) = sends.join_next().await {
            if let Some(id) = res.unwrap() {
                acked.push(id);
            }
            if acked.len() == 100 {
                daemon.kill();
                break;
            }
        }
        while let Some(res) = sends.join_next().await {
            if let Some(id) = res.unwrap() {
                acked.push(id);
            }
        }
        assert!(acked.len() >= 100, "{}", daemon.log_text());

        for id in &acked {
            assert!(
                db::delivery(daemon.db(), id).await.is_some(),
                "{id} was acknowledged but is not in the inbox"
            );
        }
    }
}

/// `serve` stops cleanly on SIGTERM: exit 0, and says so.
#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let config = TestConfig::new();
    let in_a_folder = format!("sqlite://{}/db/cw.db", config.dir().display());
    let config = config.with(|c| c.database.url = in_a_folder);
    let mut daemon = BinaryDaemon::start(&config).await;
    let status = daemon
        .terminate()
        .await
        .expect("stops within 20 s of SIGTERM");
    let text = daemon.log_text();
    assert!(status.success(), "exit {status:?}: {text}");
    assert!(text.contains("SIGTERM received"), "{text}");
    assert!(text.contains("cancelwatch stopped"), "{text}");
    assert!(
        config.dir().join("db/cw.db").exists(),
        "the database folder is created"
    );
}

/// SIGHUP does not stop the daemon: it is noted and ignored, and the daemon
/// goes on answering until SIGTERM.
#[tokio::test]
async fn sighup_is_ignored() {
    let config = TestConfig::new();
    let mut daemon = BinaryDaemon::start(&config).await;
    daemon.signal("HUP");
    wait_until("the SIGHUP is noted", Duration::from_secs(10), || {
        std::future::ready(daemon.log_text().contains("SIGHUP received and ignored"))
    })
    .await;
    assert!(daemon.is_running(), "{}", daemon.log_text());
    let health = reqwest::get(format!("{}/healthz", daemon.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let status = daemon.terminate().await.expect("stops on SIGTERM");
    assert!(status.success());
}

/// From the first moment of a SIGTERM, `/readyz` fails while the daemon
/// still answers for `server.drain_secs`, so a load balancer can take it
/// out before it stops accepting.
#[tokio::test]
async fn readiness_fails_from_sigterm_through_the_drain() {
    let config = TestConfig::new().with(|c| c.server.drain_secs = 3);
    let mut daemon = BinaryDaemon::start(&config).await;
    let readyz = || async {
        reqwest::get(format!("{}/readyz", daemon.url))
            .await
            .map(|r| r.status().as_u16())
            .ok()
    };
    assert_eq!(readyz().await, Some(200));
    daemon.signal("TERM");
    wait_until(
        "/readyz fails while draining",
        Duration::from_secs(3),
        || async { readyz().await == Some(503) },
    )
    .await;
    let health = reqwest::get(format!("{}/healthz", daemon.url))
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "still serving while draining");
    let stopped = daemon.terminate().await.expect("stops after the drain");
    assert!(stopped.success());
}

both_engines! {
    /// A correctly signed body that holds a key twice is refused (400): a
    /// parser keeps one of the two, and the stored body and what the daemon
    /// decided from it could disagree.
    #[tokio::test]
    async fn a_signed_body_with_a_key_twice_is_refused(engine) {
        let app = TestApp::start(TestConfig::on(engine).await).await;
        let body = br#"{"id":"evt_dup_1","object":"v2.core.event","type":"v2.money_management.outbound_transfer.canceled","created":"2026-10-30T12:00:00.000Z","livemode":false,"related_object":{"id":"obt_1","id":"obt_2","type":"v2.money_management.outbound_transfer","url":"/v2/money_management/outbound_transfers/obt_1"}}"#;
        let (status, answer) = app.post_stripe(body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "malformed_payload", "{answer}");
        assert!(db::delivery(app.db(), "evt_dup_1").await.is_none());
        app.stop().await;
    }
}

/// Bad configuration stops start-up with one line naming the key.
#[test]
fn bad_configuration_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, key) in [
        (
            "CANCELWATCH_SERVER__LISTEN",
            "not-an-address",
            "server.listen",
        ),
        (
            "CANCELWATCH_STRIPE__TOLERANCE_SECS",
            "soon",
            "stripe.tolerance_secs",
        ),
        ("CANCELWATCH_SERVER__LISTN", "127.0.0.1:1", "server.listn"),
        (
            "CANCELWATCH_JUICE__AUTH_SCHEME",
            "basic",
            "juice.auth_scheme",
        ),
    ] {
        let out = binary::command(dir.path())
            .arg("check-config")
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(key), "{var}: {err}");
    }
    let out = binary::command(dir.path())
        .arg("check-config")
        .env(
            "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
            "[\"whsec_s3cr3t_a\",\"whsec_s3cr3t_b\"]",
        )
        .env("CANCELWATCH_STRIPE__API_KEY", "sk_test_s3cr3t")
        .env(
            "CANCELWATCH_SERVER__ADMIN_TOKEN",
            "adm_s3cr3t_0123456789abcdef0123456789",
        )
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("stripe: mounted"), "{shown}");
    assert!(shown.contains("juice: NOT mounted"), "{shown}");
}

both_engines! {
    /// Slow clients cannot hold the front door: a client that never finishes its
    /// headers is cut off, and with every connection slot taken by such clients a
    /// good delivery still gets through once their deadline passes.
    #[tokio::test]
    async fn slow_clients_are_cut_off_and_good_deliveries_get_through(engine) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = TestApp::start(config(engine).await.with(|c| {
            c.server.max_connections = 4;
            c.server.header_read_timeout_secs = 1;
        }))
        .await;
        let addr = app.url.trim_start_matches("http://").to_string();

        let mut slow = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            s.write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
            slow.push(s);
        }
        let body = thin_event("evt_after_slowloris");
        let (status, _) = tokio::time::timeout(Duration::from_secs(15), app.post_stripe(&body))
            .await
            .expect("a good delivery gets through within 15 s");
        assert_eq!(status, 200);

        // Each slow client was disconnected (EOF or reset), not left hanging.
        for mut s in slow {
            let mut buf = [0u8; 256];
            let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            assert!(read.is_ok(), "a slow client is still connected");
        }
        app.stop().await;
    }
}

both_engines! {
    /// The same event posted many times at once (a provider retrying while the
    /// first attempt is in flight): exactly one is new, one row is stored.
    #[tokio::test]
    async fn concurrent_duplicates_store_one_row(engine) {
        let app = TestApp::start(config(engine).await).await;
        let body = thin_event("evt_concurrent_dup");
        let answers = futures_util::future::join_all((0..40).map(|_| app.post_stripe(&body))).await;
        let mut fresh = 0;
        for (status, answer) in answers {
            assert_eq!(status, 200);
            if answer["duplicate"] == false {
                fresh += 1;
            }
        }
        assert_eq!(fresh, 1, "exactly one delivery is new");
        assert_eq!(db::delivery_count(app.db()).await, 1);
        app.stop().await;
    }
}

both_engines! {
    /// A flood of badly signed deliveries does not keep good ones out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_bad_signatures_does_not_keep_good_deliveries_out(engine) {
        let app = TestApp::start(
            config(engine)
                .await
                .with(|c| c.database.refusal_rows_per_minute = 100),
        )
        .await;
        let mut flood = tokio::task::JoinSet::new();
        for worker in 0..32 {
            let client = app.client().clone();
            let url = format!("{}/webhooks/stripe", app.url);
            flood.spawn(async move {
                let mut refused = 0;
                for i in 0..60 {
                    let body = thin_event(&format!("evt_forged_{worker}_{i}"));
                    let forged = signed_now("whsec_attacker_guess", &body);
                    let r = client
                        .post(&url)
                        .header("Stripe-Signature", forged)
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    if r.status().as_u16() == 401 {
                        refused += 1;
                    }
                }
                refused
            });
        }
        for i in 0..50 {
            let body = thin_event(&format!("evt_during_flood_{i}"));
            let (status, _) = app.post_stripe(&body).await;
            assert_eq!(status, 200, "a good delivery was refused during the flood");
        }
        let mut refused = 0;
        while let Some(r) = flood.join_next().await {
            refused += r.unwrap();
        }
        assert_eq!(refused, 32 * 60, "every forged delivery is refused");
        assert_eq!(
            db::delivery_count(app.db()).await,
            50,
            "only the good deliveries are stored"
        );
        // Each one recorded (the queue never filled here): the first of each
        // minute as rows, the rest counted in few summaries.
        let stopped = TestDb::of(&app.stop().await);
        let rows = db::refusals(&stopped).await.len() as i64;
        let (counted, summaries) = db::refusal_summaries(&stopped).await;
        assert_eq!(rows + counted, 32 * 60, "every refusal is recorded");
        assert!(rows <= 2 * 100, "{rows} rows: more than two minutes' worth");
        assert!((1..=2).contains(&summaries), "{summaries} summaries");
    }
}

both_engines! {
    /// Oversized headers are refused by the HTTP layer and the daemon serves on.
    #[tokio::test]
    async fn oversized_headers_are_refused_and_serving_goes_on(engine) {
        let app = TestApp::start(config(engine).await).await;
        let huge = "a".repeat(512 * 1024);
        let r = app
            .client()
            .post(format!("{}/webhooks/stripe", app.url))
            .header("Stripe-Signature", &huge)
            .body("{}")
            .send()
            .await;
        match r {
            Ok(r) => assert!(r.status().is_client_error(), "{}", r.status()),
            // hyper may close the connection instead of answering.
            Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
        }
        let body = thin_event("evt_after_huge_header");
        let (status, _) = app.post_stripe(&body).await;
        assert_eq!(status, 200);
        app.stop().await;
    }
}

/// A duplicate is answered without a write: a key this daemon took in
/// lately from memory, any other stored one by `ON CONFLICT DO NOTHING`,
/// which commits no page. Another connection's `PRAGMA data_version` moves
/// at every commit that changes the database; it stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_answered_without_a_write() {
    // A key stored by an earlier run (so not in this daemon's memory) …
    let earlier = TestApp::start(config(Engine::Sqlite).await).await;
    let stored = thin_event("evt_dup_stored");
    assert_eq!(earlier.post_stripe(&stored).await.0, 200);
    let app = TestApp::start(earlier.stop().await).await;
    // … and one it takes in now (and remembers).
    let fresh = thin_event("evt_dup_fresh");
    let (status, answer) = app.post_stripe(&fresh).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(false)));
    // Their attempts (no API key here: given back, due in a minute) are
    // written: the last writes of this daemon.
    wait_until(
        "both deliveries are given back",
        Duration::from_secs(10),
        || async {
            let stored = db::deliveries(app.db()).await;
            stored.len() == 2
                && stored
                    .iter()
                    .all(|d| d.state == "pending" && d.last_error.is_some())
        },
    )
    .await;

    let mut changes = db::ChangeCounter::open(app.db()).await;
    let before = changes.read().await;
    for body in [&fresh, &stored, &fresh, &stored] {
        let (status, answer) = app.post_stripe(body).await;
        assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    }
    assert_eq!(
        changes.read().await,
        before,
        "a duplicate changed the database"
    );
    // The check can fail: a new delivery does move it.
    let new = thin_event("evt_dup_new");
    let (status, _) = app.post_stripe(&new).await;
    assert_eq!(status, 200);
    assert_ne!(changes.read().await, before);
    drop(changes);
    app.stop().await;
}

/// A Juice body whose `data` would cost much to canonicalise (more values
/// than the bound, well within the body size limit) is refused as malformed
/// before its checksum is computed; a large body within the bounds is
/// checked (off the async workers) and accepted when its checksum is right.
#[tokio::test]
async fn a_juice_body_too_costly_to_check_is_refused_before_its_checksum() {
    let app = TestApp::start(TestConfig::new()).await;
    let many = vec![json!(0); checksum::MAX_VALUES + 1];
    let forged = json!({"event": "bulk_transfer.cancelled", "checksum": "00", "data": {"id": "b", "items": many}});
    let (status, body) = app.post_juice(serde_json::to_vec(&forged).unwrap()).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "malformed_payload", "{body}");

    let data = json!({"id": "bulk_large", "items": vec![json!({"status": "cancelled", "amount": 1}); 4_000]});
    let large = juice_body("bulk_transfer.cancelled", data, BUSINESS_ID);
    assert!(large.len() > 64 << 10);
    let (status, body) = app.post_juice(large).await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}
