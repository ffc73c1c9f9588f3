//! The operator's console (`/ui/`): in headless Chromium against the real
//! daemon fed by the simulator, its sign-in and forgery checks over plain
//! HTTP, and the admin surface on an address of its own.

use std::path::PathBuf;

use reqwest::header;
use reqwest::redirect::Policy;

use crate::support::browser::Browser;
use crate::support::db::{self, DeliverySeed, ResourceSeed};
use crate::support::sim::{app_with_simulator, dedupe_key, wait_step, DeliveryOptions};
use crate::support::{wait_until, TestApp, TestConfig};

const TOKEN: &str = "console-admin-token-7f3k-0123456789abcdef";

fn console_config() -> TestConfig {
    TestConfig::new()
        .quick_workers()
        .quick_alerts()
        .with(|c| c.server.admin_token = TOKEN.into())
}

/// Where the screenshots of a run go (the test target's scratch folder).
fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

/// A client that shows redirects instead of following them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_follows_an_alert_to_its_timeline_replays_cancels_and_signs_out() {
    let Some(browser) = Browser::start("console::an_operator_follows_an_alert").await else {
        return;
    };
    let shots = screenshots();
    let config = console_config().with(|c| c.server.admin_listen = "127.0.0.1:0".into());
    let (sim, app) = app_with_simulator(config).await;
    let scenario = sim.scenario("juice_partial_cancellation").unwrap();
    for step in &scenario.steps {
        sim.play_step(step, &DeliveryOptions::default())
            .await
            .unwrap();
        wait_step(app.db(), step).await;
    }
    let bulk = scenario.expect.histories[0].id.clone();
    assert!(scenario
        .expect
        .alerts
        .iter()
        .any(|(rule, id)| rule == "partial_cancellation" && *id == bulk));

    // A delivery whose retries ran out: a real event of another story,
    // stored dead (its transfer exists at the provider).
    let lost = sim.scenario("outbound_transfer_canceled").unwrap();
    sim.apply_step(&lost.steps[0]);
    let delivery = &lost.steps[0].deliveries[0];
    let key = dedupe_key(delivery);
    let transfer = lost.expect.histories[0].id.clone();
    let body = serde_json::to_vec(&delivery.body).unwrap();
    let now = cancelwatch::time::now_str();
    db::seed_delivery(
        app.db(),
        &DeliverySeed {
            provider: "stripe",
            key: &key,
            event_type: delivery.event_type(),
            event_id: delivery.event_id(),
            resource_kind: Some("stripe.outbound_transfer"),
            resource_id: Some(&transfer),
            raw_body: Some(&body),
            received_at: &now,
            state: "dead",
            attempts: 8,
            next_attempt_at: &now,
        },
    )
    .await;
    db::try_note_error(app.db(), &key, "provider: 503 from the API")
        .await
        .unwrap();

    let ui = format!("{}/ui/", app.admin_url);
    // Signed out, the console asks for the token, and refuses a wrong one.
    browser.goto(&ui).await;
    assert_eq!(browser.path().await, "/ui/sign-in");
    browser.screenshot(&shots, "1-sign-in").await;
    let field = browser.find("#token").await;
    assert_eq!(
        field.attr("type").await.unwrap().as_deref(),
        Some("password")
    );
    field.send_keys("not-the-token").await.unwrap();
    browser.click("#sign-in").await;
    assert!(browser
        .text("#sign-in-error")
        .await
        .contains("not the admin token"));
    browser.find("#token").await.send_keys(TOKEN).await.unwrap();
    browser.click("#sign-in").await;
    browser.find("#alerts").await;
    assert_eq!(browser.path().await, "/ui/");
    let url = browser.client.current_url().await.unwrap();
    assert!(!url.as_str().contains(TOKEN), "{url}");

    // The overview: the open alert, the inbox with its dead delivery.
    let alert_link = "tr.alert[data-rule=\"partial_cancellation\"] a.resource";
    assert_eq!(browser.text(alert_link).await, bulk);
    assert_eq!(
        browser.text("#inbox tr[data-state=\"dead\"] td.num").await,
        "1"
    );
    assert!(browser.count("#latest tbody tr").await >= 3);
    assert!(
        browser.count("span.local").await > 0,
        "times in the browser's zone"
    );
    browser.screenshot(&shots, "2-overview").await;
    assert!(!browser.client.source().await.unwrap().contains(TOKEN));

    // Follow the alert: the timeline shows every transition of the story,
    // in order, on its resource's lane, and every refund it opened.
    browser.click(alert_link).await;
    browser.find("svg.timeline").await;
    assert_eq!(browser.path().await, format!("/ui/resources/{bulk}"));
    for h in &scenario.expect.histories {
        let css = format!("svg.timeline g.mark.transition[data-resource=\"{}\"]", h.id);
        let marks = browser
            .client
            .find_all(fantoccini::Locator::Css(&css))
            .await
            .unwrap();
        let mut statuses = Vec::new();
        for m in marks {
            statuses.push(m.attr("data-status").await.unwrap().unwrap_or_default());
        }
        assert_eq!(statuses, h.statuses, "the marks of {}", h.id);
        assert_eq!(
            browser
                .count(&format!("svg.timeline g.lane[data-resource=\"{}\"]", h.id))
                .await,
            1,
            "one lane for {}",
            h.id
        );
    }
    assert!(!scenario.expect.refunds.is_empty());
    for r in &scenario.expect.refunds {
        let opened = format!(
            "svg.timeline g.mark.refund-opened[data-resource=\"{}\"]",
            r.resource_id
        );
        assert_eq!(browser.count(&opened).await, 1, "{opened}");
        if r.status == "completed" {
            let done = format!(
                "svg.timeline g.mark.refund-completed[data-resource=\"{}\"]",
                r.resource_id
            );
            assert_eq!(browser.count(&done).await, 1, "{done}");
        }
    }
    assert_eq!(
        browser.count("svg.timeline g.mark.alert-raised").await,
        1,
        "the partial cancellation alert"
    );
    let refunds = browser.text("#refunds").await;
    let currency = scenario.expect.refunds[0].currency.to_uppercase();
    assert!(refunds.contains(&currency), "{refunds}");
    assert!(browser.count("details.snapshot").await == 1);
    assert_eq!(
        browser.count("#cancel").await,
        0,
        "a cancelled transfer is not cancellable"
    );
    browser.screenshot(&shots, "3-resource").await;
    // The drawing alone, for the documentation.
    let drawing = browser
        .find("article.resource")
        .await
        .screenshot()
        .await
        .unwrap();
    std::fs::write(shots.join("resource-article.png"), drawing).unwrap();

    // Item lanes link to the item, and the item back to its parent.
    let item = &scenario.expect.histories[1].id;
    browser
        .goto(&format!("{}/ui/resources/{item}", app.admin_url))
        .await;
    assert_eq!(browser.text("p.parent a.resource").await, bulk);

    // The dead delivery, replayed from the console, is processed again.
    browser
        .click("nav a[href=\"/ui/deliveries?state=dead\"]")
        .await;
    let row = format!("tr.delivery[data-key=\"{key}\"]");
    assert!(browser.text(&row).await.contains("503 from the API"));
    browser.screenshot(&shots, "4-dead").await;
    browser
        .click(&format!("button.replay[data-key=\"{key}\"]"))
        .await;
    let message = browser.text("#message").await;
    assert!(message.contains("was dead"), "{message}");
    wait_until(
        "the replayed delivery is processed",
        std::time::Duration::from_secs(20),
        || async { db::delivery(app.db(), &key).await.unwrap().state == "processed" },
    )
    .await;
    assert_eq!(
        db::status_of(app.db(), &transfer).await.as_deref(),
        Some("processing")
    );

    // Now a cancellable transfer: the confirmation names it, then it goes.
    browser
        .goto(&format!("{}/ui/resources/{transfer}", app.admin_url))
        .await;
    browser.click("#cancel").await;
    let confirm = browser.text("#confirm-text").await;
    assert!(
        confirm.contains(&format!("stripe.outbound_transfer {transfer}"))
            && confirm.contains("125.00 USD"),
        "{confirm}"
    );
    browser.screenshot(&shots, "5-confirm").await;
    browser.click("#confirm-cancel").await;
    let message = browser.text("#message").await;
    assert!(message.contains("accepted"), "{message}");
    assert_eq!(
        db::status_of(app.db(), &transfer).await.as_deref(),
        Some("canceled")
    );
    let requests = db::cancel_requests(app.db(), "stripe.outbound_transfer", &transfer).await;
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].requested_by, "console");

    // Signing out ends the sign-in.
    browser.click("#sign-out").await;
    browser.find("#token").await;
    assert_eq!(browser.path().await, "/ui/sign-in");
    browser.goto(&ui).await;
    browser.find("#token").await;
    assert_eq!(browser.path().await, "/ui/sign-in");
    browser.close().await;
    app.stop().await;
}

/// The value of the hidden `csrf` field of a page.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf field")
        + "name=\"csrf\" value=\"".len();
    page[at..].split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_is_a_signed_expiring_cookie_and_actions_need_its_token() {
    let app = TestApp::start(console_config()).await;
    let http = http();
    let ui = |p: &str| format!("{}/ui{p}", app.admin_url);

    let wrong = http
        .post(ui("/sign-in"))
        .form(&[("token", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get(header::SET_COOKIE).is_none());

    let right = http
        .post(ui("/sign-in"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 303);
    assert_eq!(right.headers()[header::LOCATION], "/ui/");
    let set = right.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_string();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age="] {
        assert!(set.contains(part), "{set}");
    }
    assert!(!set.contains(TOKEN), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();

    let page = http
        .get(ui("/"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()[header::CACHE_CONTROL], "no-store");
    let csp = page.headers()[header::CONTENT_SECURITY_POLICY]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let page = page.text().await.unwrap();
    assert!(!page.contains(TOKEN));
    let csrf = csrf_of(&page);

    // An action without the page's token, from another site, or with a
    // cookie changed by hand is refused; with all of it, it is carried out
    // (here: no such delivery).
    let replay = |cookie: String, form: Vec<(&'static str, String)>, origin: Option<&str>| {
        let mut req = http
            .post(ui("/replay"))
            .header(header::COOKIE, cookie)
            .form(&form);
        if let Some(o) = origin {
            req = req.header(header::ORIGIN, o);
        }
        req.send()
    };
    let key = || ("key", "evt_none".to_string());
    let r = replay(cookie.clone(), vec![key()], None).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = replay(
        cookie.clone(),
        vec![key(), ("csrf", csrf.clone())],
        Some("http://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let forged = format!(
        "{}0",
        cookie.trim_end_matches(|c: char| c.is_ascii_hexdigit())
    );
    let r = replay(forged, vec![key(), ("csrf", csrf.clone())], None)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = replay(
        cookie.clone(),
        vec![key(), ("csrf", csrf.clone())],
        Some(&app.admin_url),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 404, "checks passed; no such delivery");

    // A search for nothing says so.
    let r = http
        .get(ui("/search?q=obt_nowhere"))
        .header(header::COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Signing out clears the cookie; without one, pages ask to sign in.
    let out = http
        .post(ui("/sign-out"))
        .header(header::COOKIE, &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 303);
    assert!(out.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let r = http.get(ui("/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()[header::LOCATION], "/ui/sign-in");
    app.stop().await;
}

/// The overview's list of what is held too long follows the `stuck`
/// limits as of now, before any scan raised an alert; a search finds a
/// resource by its id or by the key of a delivery about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_names_what_is_held_too_long_and_search_finds_it() {
    let config = console_config().with(|c| {
        c.alerts.scan_interval_secs = 3_600;
        c.alerts.stuck.after_secs = 3_600;
        c.alerts.stuck.limits = [("cancelling".to_string(), 60)].into_iter().collect();
    });
    let app = TestApp::start(config).await;
    let long_ago = cancelwatch::time::fmt(chrono::Utc::now() - chrono::Duration::hours(2));
    let minutes_ago = cancelwatch::time::fmt(chrono::Utc::now() - chrono::Duration::minutes(5));
    for seed in [
        // Past the default limit, and past its status's own.
        ResourceSeed::new("stripe.outbound_transfer", "obt_held", "processing").since(&long_ago),
        ResourceSeed::new("stripe.batch_job", "batch_held", "cancelling").since(&minutes_ago),
        // Within the default limit; settled; final.
        ResourceSeed::new("stripe.outbound_transfer", "obt_fresh", "processing")
            .since(&minutes_ago),
        ResourceSeed::new("stripe.outbound_transfer", "obt_posted", "posted").since(&long_ago),
        ResourceSeed::new("stripe.outbound_transfer", "obt_done", "canceled")
            .since(&long_ago)
            .terminal(),
    ] {
        db::seed_resource(app.db(), &seed).await;
    }
    let now = cancelwatch::time::now_str();
    db::seed_delivery(
        app.db(),
        &DeliverySeed {
            provider: "stripe",
            key: "evt_about_held",
            event_type: "v2.money_management.outbound_transfer.updated",
            event_id: Some("evt_about_held"),
            resource_kind: Some("stripe.outbound_transfer"),
            resource_id: Some("obt_held"),
            raw_body: None,
            received_at: &now,
            state: "processed",
            attempts: 1,
            next_attempt_at: &now,
        },
    )
    .await;

    let http = http();
    let ui = |p: &str| format!("{}/ui{p}", app.admin_url);
    let signed = http
        .post(ui("/sign-in"))
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    let cookie = signed.headers()[header::SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let get = |path: String| {
        http.get(ui(&path))
            .header(header::COOKIE, cookie.clone())
            .send()
    };
    let page = get("/".into()).await.unwrap().text().await.unwrap();
    let held = page
        .split("<section id=\"held\">")
        .nth(1)
        .and_then(|s| s.split("</section>").next())
        .unwrap();
    for id in ["obt_held", "batch_held"] {
        assert!(
            held.contains(&format!("/ui/resources/{id}\"")),
            "{id}: {held}"
        );
    }
    for id in ["obt_fresh", "obt_posted", "obt_done"] {
        assert!(!held.contains(id), "{id}: {held}");
    }

    for q in ["obt_held", "evt_about_held", "%20obt_held%20"] {
        let r = get(format!("/search?q={q}")).await.unwrap();
        assert_eq!(r.status(), 303, "{q}");
        assert_eq!(
            r.headers()[header::LOCATION],
            "/ui/resources/obt_held",
            "{q}"
        );
    }
    let page = get("/resources/obt_held".into()).await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(
        page.contains("data-key=\"evt_about_held\""),
        "its deliveries"
    );
    assert!(
        page.contains("id=\"cancel\""),
        "a transfer in flight can be cancelled"
    );
    let done = get("/resources/obt_done".into())
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!done.contains("id=\"cancel\""), "a final one cannot");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_off_without_an_admin_token() {
    let app = TestApp::start(TestConfig::new()).await;
    let http = http();
    for path in [
        "/ui/",
        "/ui/sign-in",
        "/ui/assets/console.css",
        "/ui/resources/x",
    ] {
        let r = http
            .get(format!("{}{path}", app.admin_url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = http
        .post(format!("{}/ui/sign-in", app.admin_url))
        .form(&[("token", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    app.stop().await;
}

/// The status of `method path` at `base`.
async fn status_at(http: &reqwest::Client, method: &str, base: &str, path: &str) -> u16 {
    let url = format!("{base}{path}");
    let req = match method {
        "POST" => http.post(url).body("{}"),
        _ => http.get(url),
    };
    req.bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_surface_stands_apart_when_it_has_its_own_address() {
    let http = http();
    // Apart: the providers' address answers webhooks and health only.
    let app = TestApp::start(console_config().with(|c| {
        c.server.admin_listen = "127.0.0.1:0".into();
    }))
    .await;
    assert_ne!(app.url, app.admin_url);
    let (public, admin) = (app.url.clone(), app.admin_url.clone());
    assert_eq!(status_at(&http, "GET", &public, "/healthz").await, 200);
    assert_eq!(status_at(&http, "GET", &public, "/readyz").await, 200);
    assert_eq!(
        status_at(&http, "POST", &public, "/webhooks/stripe").await,
        401
    );
    for path in [
        "/ui/",
        "/ui/sign-in",
        "/v1/alerts",
        "/v1/openapi.json",
        "/metrics",
    ] {
        assert_eq!(
            status_at(&http, "GET", &public, path).await,
            404,
            "public {path}"
        );
    }
    assert_eq!(status_at(&http, "GET", &admin, "/v1/alerts").await, 200);
    assert_eq!(
        status_at(&http, "GET", &admin, "/v1/openapi.json").await,
        200
    );
    assert_eq!(status_at(&http, "GET", &admin, "/metrics").await, 200);
    assert_eq!(status_at(&http, "GET", &admin, "/ui/sign-in").await, 200);
    assert_eq!(status_at(&http, "GET", &admin, "/ui/").await, 303);
    assert_eq!(
        status_at(&http, "POST", &admin, "/webhooks/stripe").await,
        404
    );
    app.stop().await;

    // Together (the default): one address answers everything.
    let app = TestApp::start(console_config()).await;
    assert_eq!(app.url, app.admin_url);
    let one = app.url.clone();
    assert_eq!(status_at(&http, "GET", &one, "/healthz").await, 200);
    assert_eq!(
        status_at(&http, "POST", &one, "/webhooks/stripe").await,
        401
    );
    assert_eq!(status_at(&http, "GET", &one, "/v1/alerts").await, 200);
    assert_eq!(status_at(&http, "GET", &one, "/metrics").await, 200);
    assert_eq!(status_at(&http, "GET", &one, "/ui/sign-in").await, 200);
    app.stop().await;
}
