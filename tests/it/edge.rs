//! The HTTP edge under hostile clients, over real sockets: one request limit
//! for the whole process inside the request deadline, answers a client never
//! takes, the connection cap with idle connections dropped first and a share
//! per address, failed admin authentications.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::config::WEBHOOK_SECRET;
use crate::support::db::{self, Database, TestDb};
use crate::support::webhooks::{signed_now, thin_event};
use crate::support::{TestApp, TestConfig};

/// The daemon's `host:port`.
fn address(app: &TestApp) -> String {
    app.url.trim_start_matches("http://").to_string()
}

/// A connection to `addr` from the loopback address `local` (127.0.0.x).
async fn connect_from(local: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// True once the daemon has closed `stream` (EOF or reset), reading away
/// whatever it answered before; false if it is still open after `bound`.
async fn closed_within(stream: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(bound, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Reads from `stream` until `needle` has arrived (within 10 s).
async fn read_until(stream: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&seen).contains(needle) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {needle:?}: {seen:?}");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{needle:?} did not arrive"));
    String::from_utf8_lossy(&seen).into_owned()
}

/// A webhook request whose body is announced and never sent; once the 100
/// Continue is back, the request is inside the handler.
const UNSENT_BODY: &[u8] =
    b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\nExpect: 100-continue\r\n\r\n";

/// Posts a signed delivery `id` on a connection of its own (not one a
/// client keeps idle, which the cap may close meanwhile); its status.
async fn deliver_afresh(app: &TestApp, id: &str) -> u16 {
    let body = thin_event(id);
    reqwest::Client::new()
        .post(format!("{}/webhooks/stripe", app.url))
        .header("Stripe-Signature", signed_now(WEBHOOK_SECRET, &body))
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// `max_concurrent_requests` holds for the whole process: while a slow
/// upload to the webhook route holds the only slot, `/healthz` waits for it
/// too; the upload's wait and work end at its deadline with a 408 that is
/// counted and recorded as a refusal of that provider.
#[tokio::test]
async fn one_request_limit_for_the_process_and_every_408_counted_and_recorded() {
    let app = TestApp::start(TestConfig::new().with(|c| {
        c.server.max_concurrent_requests = 1;
        c.server.request_timeout_secs = 2;
    }))
    .await;
    let queued_before = app.metric("cancelwatch_http_requests_queued_total").await;
    let refused_before = app
        .metric("cancelwatch_http_refusals_total{status=\"408\"}")
        .await;

    // A body announced and never sent; the 100 Continue says the request is
    // inside the handler, holding the slot.
    let mut upload = TcpStream::connect(address(&app)).await.unwrap();
    upload.write_all(UNSENT_BODY).await.unwrap();
    read_until(&mut upload, "100 Continue").await;

    let (status, _) = app.get("/healthz", None).await;
    assert_eq!(status, 200);
    let answer = read_until(&mut upload, "\r\n\r\n").await;
    assert!(answer.contains("408"), "{answer}");

    assert!(
        app.metric("cancelwatch_http_requests_queued_total").await > queued_before,
        "/healthz did not wait behind the upload"
    );
    assert!(
        app.metric("cancelwatch_http_refusals_total{status=\"408\"}")
            .await
            > refused_before
    );
    let stopped = TestDb::of(&app.stop().await);
    let refusals = db::refusals(&stopped).await;
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert_eq!(
        (
            refusals[0].provider.as_str(),
            refusals[0].reason.as_str(),
            refusals[0].http_status
        ),
        ("stripe", "request_timeout", 408)
    );
}

/// Pipelines requests on `stream` without ever reading an answer, until
/// the daemon stops taking them (a write stays blocked for 2 s) or the
/// connection ends; at most 200,000 requests.
async fn pipeline_without_reading(stream: &mut TcpStream) {
    let burst = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".repeat(100);
    for _ in 0..2_000 {
        match tokio::time::timeout(Duration::from_secs(2), stream.write_all(&burst)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// Clients that pipeline requests and never read the answers are cut off
/// once their answers have waited `server.write_timeout_secs`, and a
/// delivery gets in meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_their_answers_are_cut_off() {
    let app = TestApp::start(TestConfig::new().with(|c| {
        c.server.write_timeout_secs = 1;
    }))
    .await;
    let cut = "cancelwatch_connections_cut_total{reason=\"write_timeout\"}";
    let cut_before = app.metric(cut).await;
    let addr = address(&app);
    let mut hostile = Vec::new();
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small window fills sooner.
        socket.set_recv_buffer_size(4096).unwrap();
        hostile.push(socket.connect(addr.parse().unwrap()).await.unwrap());
    }
    for stream in &mut hostile {
        pipeline_without_reading(stream).await;
    }
    let body = thin_event("evt_after_unread_answers");
    let (status, _) = tokio::time::timeout(Duration::from_secs(20), app.post_stripe(&body))
        .await
        .expect("a delivery gets in within 20 s");
    assert_eq!(status, 200);
    // Cut by the write deadline (before, they were held for good).
    let cut_off = crate::support::wait::poll_until(Duration::from_secs(20), || async {
        app.metric(cut).await >= cut_before + 2
    })
    .await;
    assert!(cut_off, "not cut off within 20 s");
    for mut stream in hostile {
        assert!(closed_within(&mut stream, Duration::from_secs(10)).await);
    }
    app.stop().await;
}

/// At the connection cap, idle connections make room: a delivery gets in
/// at once, not after their header deadline, and the idle keep-alive
/// connection (the oldest idle one) is the one closed.
#[tokio::test]
async fn at_the_connection_cap_idle_connections_are_dropped_first() {
    let app = TestApp::start(TestConfig::new().with(|c| {
        c.server.max_connections = 2;
        c.server.header_read_timeout_secs = 120;
    }))
    .await;
    let addr = address(&app);
    // One answered request, then kept open and idle …
    let mut kept_alive = TcpStream::connect(&addr).await.unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut kept_alive, "\"ok\"").await;
    // … and one that never sends anything.
    let _silent = TcpStream::connect(&addr).await.unwrap();

    let status = tokio::time::timeout(
        Duration::from_secs(20),
        deliver_afresh(&app, "evt_at_the_cap"),
    )
    .await
    .expect("a delivery gets in while the header deadline is far");
    assert_eq!(status, 200);
    assert!(closed_within(&mut kept_alive, Duration::from_secs(10)).await);
    app.stop().await;
}

/// One address holds at most `server.max_connections_per_ip`: past it (none
/// of its connections idle) its new connections are closed at once, and
/// another address still gets in.
#[tokio::test]
async fn one_address_holds_at_most_its_share_of_the_connections() {
    let app = TestApp::start(TestConfig::new().with(|c| {
        c.server.max_connections = 4;
        c.server.max_connections_per_ip = 2;
        c.server.request_timeout_secs = 120;
    }))
    .await;
    let addr = address(&app);
    let mut busy = Vec::new();
    for _ in 0..2 {
        // Requests inside the handler, waiting for their bodies: busy.
        let mut s = connect_from("127.0.0.2", &addr).await;
        s.write_all(UNSENT_BODY).await.unwrap();
        read_until(&mut s, "100 Continue").await;
        busy.push(s);
    }
    let mut third = connect_from("127.0.0.2", &addr).await;
    assert!(
        closed_within(&mut third, Duration::from_secs(10)).await,
        "a third connection from one address was kept"
    );
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        deliver_afresh(&app, "evt_other_address"),
    )
    .await
    .expect("another address gets in");
    assert_eq!(status, 200);
    app.stop().await;
}

/// Wrong admin tokens are counted, and past
/// `server.admin_auth_failures_per_minute` from one address its tries are
/// answered 429 with a `Retry-After`, the right token too, without being
/// looked at.
#[tokio::test]
async fn failed_admin_authentications_are_counted_and_held_back_per_address() {
    const TOKEN: &str = "edge-admin-token-0123456789abcdef0123";
    let app = TestApp::start(TestConfig::new().with(|c| {
        c.server.admin_token = TOKEN.into();
        c.server.admin_auth_failures_per_minute = 3;
    }))
    .await;
    let failures = "cancelwatch_admin_auth_failures_total{result=\"refused\"}";
    let before = app.metric(failures).await;
    assert_eq!(app.get("/v1/alerts", Some(TOKEN)).await.0, 200);
    for guess in ["a", "b", "c"] {
        assert_eq!(app.get("/v1/alerts", Some(guess)).await.0, 401);
    }
    assert!(app.metric(failures).await >= before + 3);

    let held = app
        .client()
        .get(format!("{}/v1/alerts", app.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status().as_u16(), 429);
    let retry_after: u64 = held.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // Webhooks and health are not held back.
    assert_eq!(app.get("/healthz", None).await.0, 200);
    app.stop().await;
}

/// A short admin token stops start-up with the key, without the value, and
/// with a fresh random token to use instead.
#[test]
fn a_short_admin_token_is_refused_at_start_with_a_fresh_one_offered() {
    let config = TestConfig::new();
    let out = crate::support::binary::command(config.dir())
        .arg("check-config")
        .env("CANCELWATCH_CONFIG", config.write_toml())
        .env("CANCELWATCH_SERVER__ADMIN_TOKEN", "tooShort-x9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("server.admin_token"), "{err}");
    assert!(!err.contains("tooShort-x9"), "the token leaked: {err}");
    let offered = err
        .split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .unwrap_or_else(|| panic!("no fresh token offered: {err}"));
    let valid = crate::support::binary::command(config.dir())
        .arg("check-config")
        .env("CANCELWATCH_CONFIG", config.write_toml())
        .env("CANCELWATCH_SERVER__ADMIN_TOKEN", offered)
        .output()
        .unwrap();
    assert!(
        valid.status.success(),
        "{}",
        String::from_utf8_lossy(&valid.stderr)
    );
}

/// A database locked by another process past `database.busy_timeout_ms` is
/// answered 503 with a `Retry-After` and a code saying so, not 500; the
/// daemon logs the first refusal and the recovery once each, and takes
/// deliveries again as soon as the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_is_answered_503_and_logged_once_each_way() {
    let config = TestConfig::new().with(|c| c.database.busy_timeout_ms = 100);
    let daemon = crate::support::binary::BinaryDaemon::start(&config).await;
    let client = reqwest::Client::new();
    let post = |id: String| {
        let body = thin_event(&id);
        client
            .post(format!("{}/webhooks/stripe", daemon.url))
            .header("Stripe-Signature", signed_now(WEBHOOK_SECRET, &body))
            .body(body)
            .send()
    };
    assert_eq!(post("evt_before_lock".into()).await.unwrap().status(), 200);

    // An operator's write transaction, held.
    let mut holder = daemon.db().writer().sqlite().acquire().await.unwrap();
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    for i in 0..20 {
        let r = post(format!("evt_while_locked_{i}")).await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "5");
        let answer: serde_json::Value = r.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "storage_locked", "{answer}");
    }
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut *holder)
        .await
        .unwrap();
    drop(holder);
    assert_eq!(post("evt_after_lock".into()).await.unwrap().status(), 200);

    let log = daemon.log_text();
    let count = |line: &str| log.lines().filter(|l| l.contains(line)).count();
    assert_eq!(count("the database cannot take deliveries"), 1, "{log}");
    assert_eq!(count("the database takes deliveries again"), 1, "{log}");
    assert_eq!(
        count("webhook delivery failed inside cancelwatch"),
        0,
        "{log}"
    );
}

/// Under a low open-file limit (hard and soft 256) and more idle
/// connections than it allows, `/healthz` still gets in: the connection cap
/// is fitted under the limit at start (said once in the log), so the daemon
/// closes idle connections rather than failing every accept, and the log is
/// not flooded with accept errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_does_not_starve_health_checks() {
    use std::os::unix::process::CommandExt;
    let config = TestConfig::new().with(|c| c.server.header_read_timeout_secs = 120);
    let daemon = crate::support::binary::BinaryDaemon::start_with(&config, |cmd| {
        // SAFETY: only setrlimit runs in the child before exec, which is
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(|| rlimit::setrlimit(rlimit::Resource::NOFILE, 256, 256));
        }
    })
    .await;
    let addr = daemon.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(TcpStream::connect(&addr).await.unwrap());
    }
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        reqwest::Client::new()
            .get(format!("{}/healthz", daemon.url))
            .send()
            .await
            .unwrap()
            .status()
    })
    .await
    .expect("/healthz gets in within 20 s");
    assert_eq!(status, 200);
    let log = daemon.log_text();
    let lines = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    assert_eq!(
        lines("more than the open-file limit leaves room for"),
        1,
        "{log}"
    );
    assert!(lines("accept") <= 1, "{log}");
    drop(idle);
}
