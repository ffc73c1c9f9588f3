//! The daemon's front door, driven over real HTTP: verification, durable
//! accept, duplicates, refusals, restarts, and a kill right after the 2xx.

use std::path::Path;
use std::time::Duration;

use cancelwatch::providers::{juice::checksum, stripe::signature};
use cancelwatch::Config;
use serde_json::{json, Value};
use sqlx::sqlite::SqlitePoolOptions;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

mod support;
use support::BinaryDaemon;

const STRIPE_SECRET: &str = "whsec_ingress_test";
const OLD_STRIPE_SECRET: &str = "whsec_ingress_old";
const JUICE_KEY: &str = "juice-business-ingress";
const FIXTURE: &[u8] = include_bytes!("fixtures/stripe/thin_outbound_transfer_posted.json");

fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.database.url = format!("sqlite://{}/cw.db", dir.display());
    c.stripe.webhook_secrets = vec![STRIPE_SECRET.into(), OLD_STRIPE_SECRET.into()];
    c.juice.checksum_keys = vec![JUICE_KEY.into()];
    // Nothing in these tests may leave the machine: provider APIs point at a closed port.
    c.stripe.api_base = "http://127.0.0.1:9".into();
    c.juice.api_base = "http://127.0.0.1:9".into();
    c.server.max_body_bytes = 64 * 1024;
    c
}

struct Daemon {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Daemon {
    async fn start(config: Config) -> Daemon {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(cancelwatch::run_until(config, listener, async {
            let _ = stopped.await;
        }));
        let d = Daemon {
            url,
            stop: Some(stop),
            task,
        };
        d.wait_healthy().await;
        d
    }

    async fn wait_healthy(&self) {
        let client = reqwest::Client::new();
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{}/healthz", self.url)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("daemon at {} never became healthy", self.url);
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("daemon stops within 20 s")
            .unwrap()
            .unwrap();
    }
}

async fn post_stripe(url: &str, body: &[u8], header: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/webhooks/stripe"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(h) = header {
        req = req.header("Stripe-Signature", h);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn signed_now(secret: &str, body: &[u8]) -> String {
    signature::sign_header(secret, chrono::Utc::now().timestamp(), body)
}

fn thin_event(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "object": "v2.core.event",
        "type": "v2.money_management.outbound_transfer.canceled",
        "created": "2026-10-30T12:00:00.000Z",
        "livemode": false,
        "context": "acct_123",
        "related_object": {"id": "obt_1", "type": "v2.money_management.outbound_transfer",
                           "url": "/v2/money_management/outbound_transfers/obt_1"}
    }))
    .unwrap()
}

fn juice_body(event: &str, data: Value, key: &str) -> Vec<u8> {
    let sum = checksum::sign(key, event, &data);
    serde_json::to_vec(&json!({"checksum": sum, "event": event, "data": data})).unwrap()
}

async fn read_pool(dir: &Path) -> sqlx::SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}/cw.db", dir.display()))
        .await
        .unwrap()
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn stripe_delivery_is_stored_exactly_and_duplicates_are_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;

    let header = signed_now(STRIPE_SECRET, FIXTURE);
    let (status, body) = post_stripe(&d.url, FIXTURE, Some(&header)).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"received": true, "duplicate": false}))
    );

    // A provider retry is re-signed with a fresh timestamp and the other secret.
    let again = signature::sign_header(
        OLD_STRIPE_SECRET,
        chrono::Utc::now().timestamp() + 1,
        FIXTURE,
    );
    let (status, body) = post_stripe(&d.url, FIXTURE, Some(&again)).await;
    assert_eq!(
        (status, &body),
        (200, &json!({"received": true, "duplicate": true}))
    );

    let pool = read_pool(dir.path()).await;
    type Row = (
        String,
        String,
        String,
        Option<String>,
        Option<String>,
        Option<String>,
        Vec<u8>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT provider, dedupe_key, event_type, resource_kind, resource_id, context, raw_body FROM inbox",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1);
    let r = &rows[0];
    assert_eq!(r.0, "stripe");
    assert_eq!(r.1, "evt_test_65R9Ijk8zWs5ZqJ2Wnv16R9Ijk8zWs5ZqJ2W");
    assert_eq!(r.2, "v2.money_management.outbound_transfer.posted");
    assert_eq!(r.3.as_deref(), Some("stripe.outbound_transfer"));
    assert_eq!(r.4.as_deref(), Some("obt_test_61R9Ijk"));
    assert_eq!(r.5.as_deref(), Some("acct_1Nv0FGQ9RKHgCVdK"));
    assert_eq!(r.6, FIXTURE, "the exact bytes received are kept");
    pool.close().await;
    d.stop().await;
}

#[tokio::test]
async fn stripe_refusals_answer_with_codes_and_are_recorded_without_body() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let body = thin_event("evt_refused");
    let now = chrono::Utc::now().timestamp();
    let good = signed_now(STRIPE_SECRET, &body);

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
            Some(signature::sign_header(STRIPE_SECRET, now - 301, &body)),
            401,
            "timestamp_out_of_tolerance",
        ),
        (
            "v1 snapshot event",
            v1_snapshot.to_vec(),
            Some(signed_now(STRIPE_SECRET, v1_snapshot)),
            400,
            "unexpected_object",
        ),
        (
            "not json",
            not_json.to_vec(),
            Some(signed_now(STRIPE_SECRET, not_json)),
            400,
            "malformed_payload",
        ),
        (
            "json array",
            array.to_vec(),
            Some(signed_now(STRIPE_SECRET, array)),
            400,
            "malformed_payload",
        ),
        (
            "missing type",
            missing_type.to_vec(),
            Some(signed_now(STRIPE_SECRET, missing_type)),
            400,
            "malformed_payload",
        ),
        (
            "empty body",
            Vec::new(),
            Some(signed_now(STRIPE_SECRET, b"")),
            400,
            "malformed_payload",
        ),
        (
            "invalid utf-8",
            b"\xff\xfe{}".to_vec(),
            Some(signed_now(STRIPE_SECRET, b"\xff\xfe{}")),
            400,
            "malformed_payload",
        ),
    ];
    for (name, body, header, want_status, want_code) in &cases {
        let (status, answer) = post_stripe(&d.url, body, header.as_deref()).await;
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
    let resp = reqwest::Client::new()
        .post(format!("{}/webhooks/stripe", d.url))
        .header("Stripe-Signature", &good)
        .header("Stripe-Signature", &good)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);

    // Too large: refused with 413 before the body is read in full.
    let big = vec![b' '; 64 * 1024 + 1];
    let (status, answer) = post_stripe(&d.url, &big, Some(&signed_now(STRIPE_SECRET, &big))).await;
    assert_eq!((status, error_code(&answer)), (413, "payload_too_large"));

    // The daemon keeps serving good deliveries.
    let (status, _) = post_stripe(&d.url, &body, Some(&good)).await;
    assert_eq!(status, 200);

    d.stop().await; // the refusal records are flushed by the writer before it stops
    let pool = read_pool(dir.path()).await;
    let reasons: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT reason, provider, http_status FROM refusals ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(reasons.len(), cases.len() + 2);
    assert!(reasons.iter().all(|(_, p, _)| p == "stripe"));
    assert!(reasons
        .iter()
        .any(|(r, _, s)| r == "payload_too_large" && *s == 413));
    let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info('refusals')")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!columns
        .iter()
        .any(|c| c.contains("body") && c != "body_size"));
    let inbox: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(inbox, 1, "only the good delivery reached the inbox");
}

#[tokio::test]
async fn juice_checksums_verify_and_dedupe_on_event_and_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let client = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        let client = client.clone();
        let url = format!("{}/webhooks/juice", d.url);
        async move {
            let r = client.post(url).body(body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let data = json!({"id": "6f1c1e9a-0000-4000-8000-000000000001", "status": "cancelled",
                      "reference": "payroll/nov", "note": "Zoë – €"});
    let body = juice_body("bulk_transfer.cancelled", data.clone(), JUICE_KEY);
    assert_eq!(
        post(body.clone()).await,
        (200, json!({"received": true, "duplicate": false}))
    );
    assert_eq!(
        post(body).await,
        (200, json!({"received": true, "duplicate": true}))
    );

    // Lowercase hex is the same checksum: still a duplicate.
    let lower = json!({"checksum": checksum::sign(JUICE_KEY, "bulk_transfer.cancelled", &data).to_lowercase(),
                       "event": "bulk_transfer.cancelled", "data": data});
    assert_eq!(
        post(serde_json::to_vec(&lower).unwrap()).await.1["duplicate"],
        true
    );

    let wrong = juice_body(
        "bulk_transfer.cancelled",
        json!({"id": "x"}),
        "another-business",
    );
    let (status, answer) = post(wrong).await;
    assert_eq!((status, error_code(&answer)), (401, "invalid_signature"));
    let (status, answer) = post(br#"{"event":"bulk_transfer.cancelled","data":{}}"#.to_vec()).await;
    assert_eq!((status, error_code(&answer)), (401, "missing_signature"));
    let (status, answer) = post(b"nope".to_vec()).await;
    assert_eq!((status, error_code(&answer)), (400, "malformed_payload"));

    let pool = read_pool(dir.path()).await;
    let (key, rid): (String, Option<String>) =
        sqlx::query_as("SELECT dedupe_key, resource_id FROM inbox WHERE provider = 'juice'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(key.starts_with("bulk_transfer.cancelled:"));
    assert_eq!(key, key.to_lowercase());
    assert_eq!(rid.as_deref(), Some("6f1c1e9a-0000-4000-8000-000000000001"));
    d.stop().await;
}

#[tokio::test]
async fn unconfigured_provider_answers_404_and_health_endpoints_answer() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.juice.checksum_keys.clear();
    let d = Daemon::start(c).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/webhooks/juice", d.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = client
        .post(format!("{}/webhooks/paypal", d.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = client
        .get(format!("{}/readyz", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let r = client
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("cancelwatch_inbox_depth"));
    d.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let mut bodies = Vec::new();
    for i in 0..20 {
        let body = thin_event(&format!("evt_restart_{i}"));
        let (status, _) = post_stripe(&d.url, &body, Some(&signed_now(STRIPE_SECRET, &body))).await;
        assert_eq!(status, 200);
        bodies.push(body);
    }
    d.stop().await;

    let d = Daemon::start(config(dir.path())).await;
    for body in &bodies {
        let (status, answer) =
            post_stripe(&d.url, body, Some(&signed_now(STRIPE_SECRET, body))).await;
        assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    }
    d.stop().await;
}

/// A 2xx means the write-ahead log was synced to disk after the commit:
/// when the WAL cannot be synced (here: its file moved away under SQLite,
/// and a connection opened since has started a new, empty one at its path,
/// which the writer does not commit to), the delivery is refused, and its
/// retry is acknowledged once it can.
#[tokio::test]
async fn no_acknowledgement_without_the_wal_synced() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let wal = dir.path().join("cw.db-wal");
    let moved = dir.path().join("cw.db-wal.moved");

    let first = thin_event("evt_wal_first");
    let (status, _) = post_stripe(&d.url, &first, Some(&signed_now(STRIPE_SECRET, &first))).await;
    assert_eq!(status, 200);

    std::fs::rename(&wal, &moved).unwrap();
    let late = read_pool(dir.path()).await;
    let _ = sqlx::query("SELECT COUNT(*) FROM inbox")
        .fetch_one(&late)
        .await;
    late.close().await;
    assert!(wal.exists(), "the late connection started a new WAL file");
    let body = thin_event("evt_wal_unsynced");
    let (status, answer) =
        post_stripe(&d.url, &body, Some(&signed_now(STRIPE_SECRET, &body))).await;
    assert_eq!(status, 500, "{answer}");
    let text = answer.to_string();
    assert!(
        !text.contains("cw.db"),
        "no internals in the answer: {text}"
    );

    std::fs::rename(&moved, &wal).unwrap();
    let (status, answer) =
        post_stripe(&d.url, &body, Some(&signed_now(STRIPE_SECRET, &body))).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    d.stop().await;
}

/// The case that matters most: the real binary answers 2xx to many concurrent
/// deliveries, is killed with SIGKILL right after, and every acknowledged
/// delivery is in the database.
#[tokio::test]
async fn acknowledged_deliveries_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = BinaryDaemon::start(
        dir.path(),
        &[(
            "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
            format!("[\"{STRIPE_SECRET}\"]"),
        )],
    )
    .await;
    let url = daemon.url.clone();
    let client = reqwest::Client::new();

    let mut sends = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        let url = url.clone();
        sends.spawn(async move {
            let id = format!("evt_kill_{i}");
            let body = thin_event(&id);
            let header = signed_now(STRIPE_SECRET, &body);
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
    assert!(acked.len() >= 100);

    let pool = read_pool(dir.path()).await;
    for id in &acked {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM inbox WHERE dedupe_key = ?")
            .bind(id)
            .fetch_optional(&pool)
            .await
            .unwrap();
        assert!(
            found.is_some(),
            "{id} was acknowledged but is not in the inbox"
        );
    }
}

/// `serve` stops cleanly on SIGTERM: exit 0, and says so.
#[tokio::test]
async fn sigterm_shuts_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/db/cw.db", dir.path().display());
    let mut daemon = BinaryDaemon::start(dir.path(), &[("CANCELWATCH_DATABASE__URL", db)]).await;
    let status = daemon
        .terminate()
        .await
        .expect("stops within 20 s of SIGTERM");
    let text = daemon.log_text();
    assert!(status.success(), "exit {status:?}: {text}");
    assert!(text.contains("SIGTERM received"), "{text}");
    assert!(text.contains("cancelwatch stopped"), "{text}");
    assert!(
        dir.path().join("db/cw.db").exists(),
        "the database folder is created"
    );
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
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cancelwatch"))
            .arg("check-config")
            .env_clear()
            .env(var, value)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(key), "{var}: {err}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cancelwatch"))
        .arg("check-config")
        .env_clear()
        .env(
            "CANCELWATCH_STRIPE__WEBHOOK_SECRETS",
            "[\"whsec_s3cr3t_a\",\"whsec_s3cr3t_b\"]",
        )
        .env("CANCELWATCH_STRIPE__API_KEY", "sk_test_s3cr3t")
        .env("CANCELWATCH_SERVER__ADMIN_TOKEN", "adm_s3cr3t")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains("s3cr3t"), "{shown}");
    assert!(shown.contains("stripe: mounted"), "{shown}");
    assert!(shown.contains("juice: NOT mounted"), "{shown}");
}

/// Slow clients cannot hold the front door: a client that never finishes its
/// headers is cut off, and with every connection slot taken by such clients a
/// good delivery still gets through once their deadline passes.
#[tokio::test]
async fn slow_clients_are_cut_off_and_good_deliveries_get_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.server.max_connections = 4;
    c.server.header_read_timeout_secs = 1;
    let d = Daemon::start(c).await;
    let addr = d.url.trim_start_matches("http://").to_string();

    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        s.write_all(b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    let body = thin_event("evt_after_slowloris");
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(15),
        post_stripe(&d.url, &body, Some(&signed_now(STRIPE_SECRET, &body))),
    )
    .await
    .expect("a good delivery gets through within 15 s");
    assert_eq!(status, 200);

    // Each slow client was disconnected (EOF or reset), not left hanging.
    for mut s in slow {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(read.is_ok(), "a slow client is still connected");
    }
    d.stop().await;
}

/// The same event posted many times at once (a provider retrying while the
/// first attempt is in flight): exactly one is new, one row is stored.
#[tokio::test]
async fn concurrent_duplicates_store_one_row() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let body = thin_event("evt_concurrent_dup");
    let mut posts = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let url = d.url.clone();
        let body = body.clone();
        posts.spawn(async move {
            let header = signed_now(STRIPE_SECRET, &body);
            post_stripe(&url, &body, Some(&header)).await
        });
    }
    let mut fresh = 0;
    while let Some(r) = posts.join_next().await {
        let (status, answer) = r.unwrap();
        assert_eq!(status, 200);
        if answer["duplicate"] == false {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one delivery is new");
    let pool = read_pool(dir.path()).await;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    d.stop().await;
}

/// A flood of badly signed deliveries does not keep good ones out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_signatures_does_not_keep_good_deliveries_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let client = reqwest::Client::new();
    let mut flood = tokio::task::JoinSet::new();
    for worker in 0..32 {
        let client = client.clone();
        let url = format!("{}/webhooks/stripe", d.url);
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
        let (status, _) = post_stripe(&d.url, &body, Some(&signed_now(STRIPE_SECRET, &body))).await;
        assert_eq!(status, 200, "a good delivery was refused during the flood");
    }
    let mut refused = 0;
    while let Some(r) = flood.join_next().await {
        refused += r.unwrap();
    }
    assert_eq!(refused, 32 * 60, "every forged delivery is refused");
    let pool = read_pool(dir.path()).await;
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM inbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 50, "only the good deliveries are stored");
    d.stop().await;
    // Recorded many to a statement, each one (the queue never filled here).
    let recorded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM refusals")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(recorded, 32 * 60, "every refusal is recorded");
}

/// Oversized headers are refused by the HTTP layer and the daemon serves on.
#[tokio::test]
async fn oversized_headers_are_refused_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let huge = "a".repeat(512 * 1024);
    let r = reqwest::Client::new()
        .post(format!("{}/webhooks/stripe", d.url))
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
    let (status, _) = post_stripe(&d.url, &body, Some(&signed_now(STRIPE_SECRET, &body))).await;
    assert_eq!(status, 200);
    d.stop().await;
}

/// A duplicate is answered without a write: a key this daemon took in
/// lately from memory, any other stored one by `ON CONFLICT DO NOTHING`,
/// which commits no page. Another connection's `PRAGMA data_version` moves
/// at every commit that changes the database; it stays put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_answered_without_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(config(dir.path())).await;
    let watch = read_pool(dir.path()).await;

    // A key stored before this daemon saw it (so not in its memory) …
    let stored = thin_event("evt_dup_stored");
    let mut tx = watch.begin().await.unwrap();
    let by_hand = cancelwatch::store::inbox::NewDelivery {
        provider: "stripe".into(),
        dedupe_key: "evt_dup_stored".into(),
        event_type: "v2.money_management.outbound_transfer.canceled".into(),
        event_id: Some("evt_dup_stored".into()),
        resource_kind: None,
        resource_id: None,
        context: None,
        livemode: Some(false),
        raw_body: stored.clone(),
        source: "webhook",
        received_at: cancelwatch::time::now_str(),
    };
    assert!(cancelwatch::store::inbox::insert(&mut tx, &by_hand)
        .await
        .unwrap());
    sqlx::query("UPDATE inbox SET state = 'processed' WHERE dedupe_key = 'evt_dup_stored'")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    // … and one it takes in now (and remembers).
    let fresh = thin_event("evt_dup_fresh");
    let (status, answer) =
        post_stripe(&d.url, &fresh, Some(&signed_now(STRIPE_SECRET, &fresh))).await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(false)));
    // Its attempt (no API key here: given back, due in a minute) is written.
    for _ in 0..200 {
        let attempted: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM inbox WHERE dedupe_key = 'evt_dup_fresh'")
                .fetch_one(&watch)
                .await
                .unwrap();
        if attempted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut conn = watch.acquire().await.unwrap();
    let before = data_version(&mut conn).await;
    for body in [&fresh, &stored, &fresh, &stored] {
        let (status, answer) =
            post_stripe(&d.url, body, Some(&signed_now(STRIPE_SECRET, body))).await;
        assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    }
    assert_eq!(
        data_version(&mut conn).await,
        before,
        "a duplicate changed the database"
    );
    // The check can fail: a new delivery does move it.
    let new = thin_event("evt_dup_new");
    let (status, _) = post_stripe(&d.url, &new, Some(&signed_now(STRIPE_SECRET, &new))).await;
    assert_eq!(status, 200);
    assert_ne!(data_version(&mut conn).await, before);
    drop(conn);
    d.stop().await;
}

/// SQLite's count of changes committed by other connections, as this one sees it.
async fn data_version(conn: &mut sqlx::SqliteConnection) -> i64 {
    sqlx::query_scalar("PRAGMA data_version")
        .fetch_one(conn)
        .await
        .unwrap()
}
