//! `/ui/`: the operator's console. Server-rendered pages (templates
//! embedded in the binary) over the same store reads and actions as `/v1`
//! and the commands: an overview, a search, one resource's whole life on a
//! time axis, the deliveries that failed, and replay and cancel.
//!
//! Off (404) while `server.admin_token` is empty; otherwise the token signs
//! in once ([`auth`]) and a signed cookie carries the sign-in. Every page is
//! answered `no-store`, may not be framed, and loads nothing but its own
//! stylesheet and script.

mod auth;
pub mod timeline;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use crate::pipeline::{self, PipelineError};
use crate::providers::knowledge;
use crate::store::model::{AlertFilter, AlertView, EventFilter, PageRequest, TransitionFilter};
use crate::store::QueryError;
use crate::App;

pub use auth::{SignedIn, COOKIE};

/// Rows the overview's lists show at most.
const OVERVIEW_ROWS: i64 = 50;
/// Deliveries a resource page lists at most.
const RESOURCE_DELIVERIES: i64 = 100;

/// What the console's handlers share beyond the daemon: the templates and
/// the sign-in key.
struct Console {
    templates: Environment<'static>,
    keys: auth::Keys,
}

/// The `/ui` routes.
pub fn routes(app: Arc<App>) -> Router<Arc<App>> {
    let console = Arc::new(Console {
        templates: templates(),
        keys: auth::Keys::random(),
    });
    let signed_in = Router::new()
        .route("/ui/", get(overview))
        .route("/ui/search", get(search))
        .route("/ui/resources/{id}", get(resource))
        .route("/ui/resources/{id}/cancel", get(confirm_cancel))
        .route("/ui/deliveries", get(deliveries))
        .route("/ui/replay", post(replay))
        .route("/ui/cancel", post(cancel))
        .route("/ui/sign-out", post(sign_out))
        .route_layer(middleware::from_fn(require_sign_in));
    // Route layers only: a path the console does not have is left to the
    // router it is merged into, untouched.
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/sign-in", get(sign_in_page).post(sign_in))
        .route("/ui/assets/{name}", get(asset))
        .merge(signed_in)
        .route_layer(middleware::from_fn_with_state(app, guard))
        .route_layer(Extension(console))
}

fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, source) in [
        ("base.html", include_str!("templates/base.html")),
        ("sign_in.html", include_str!("templates/sign_in.html")),
        ("overview.html", include_str!("templates/overview.html")),
        ("resource.html", include_str!("templates/resource.html")),
        ("deliveries.html", include_str!("templates/deliveries.html")),
        ("confirm.html", include_str!("templates/confirm.html")),
        ("message.html", include_str!("templates/message.html")),
        ("macros.html", include_str!("templates/macros.html")),
    ] {
        env.add_template(name, source)
            .expect("the console's templates are valid");
    }
    env.add_filter("money", |amount: Option<i64>, currency: Option<String>| {
        timeline::money(amount, currency.as_deref())
    });
    env.add_filter("segment", |s: String| path_segment(&s));
    env
}

/// Errors of the console, each with its page.
#[derive(Debug, thiserror::Error)]
enum ConsoleError {
    #[error("not found")]
    Off,
    #[error("{0}")]
    NotFound(String),
    #[error("this form is out of date or comes from another site: reload the page and try again")]
    Forbidden,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Action(PipelineError),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<QueryError> for ConsoleError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::Invalid { .. } => ConsoleError::BadRequest(e.to_string()),
            QueryError::Store(e) => ConsoleError::Internal(format!("query: {e}")),
        }
    }
}

impl From<crate::store::StoreError> for ConsoleError {
    fn from(e: crate::store::StoreError) -> Self {
        ConsoleError::Internal(format!("store: {e}"))
    }
}

impl From<PipelineError> for ConsoleError {
    fn from(e: PipelineError) -> Self {
        match e {
            PipelineError::Store(e) => ConsoleError::Internal(format!("replay or cancel: {e}")),
            e => ConsoleError::Action(e),
        }
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let status = match &self {
            ConsoleError::Off => return StatusCode::NOT_FOUND.into_response(),
            ConsoleError::NotFound(_) => StatusCode::NOT_FOUND,
            ConsoleError::Forbidden => StatusCode::FORBIDDEN,
            ConsoleError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Action(PipelineError::NoSuchDelivery(_)) => StatusCode::NOT_FOUND,
            ConsoleError::Action(PipelineError::Provider(_)) => StatusCode::BAD_GATEWAY,
            ConsoleError::Action(PipelineError::NotConfigured(_)) => StatusCode::CONFLICT,
            ConsoleError::Action(_) => StatusCode::BAD_REQUEST,
            ConsoleError::Internal(detail) => {
                tracing::error!(%detail, "console request failed inside cancelwatch");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let message = match &self {
            ConsoleError::Internal(_) => "internal error".to_string(),
            e => e.to_string(),
        };
        let body = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <title>cancelwatch: {status}</title><link rel=\"stylesheet\" href=\"/ui/assets/console.css\">\
             </head><body><main><h1>{status}</h1><p class=\"error\">{}</p>\
             <p><a href=\"/ui/\">Overview</a></p></main></body></html>",
            minijinja::HtmlEscape(&message)
        );
        (status, page_headers(), axum::response::Html(body)).into_response()
    }
}

/// Headers of every console answer: never cached, never framed, nothing
/// loaded from elsewhere, no referrer to other sites (a resource id stays
/// here; `no-referrer` would make browsers send `Origin: null` on the
/// console's own forms).
fn page_headers() -> [(header::HeaderName, HeaderValue); 5] {
    [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("same-origin"),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
                 form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        ),
    ]
}

impl Console {
    fn render(&self, name: &str, ctx: minijinja::Value) -> Result<Response, ConsoleError> {
        self.render_with(StatusCode::OK, name, ctx)
    }

    fn render_with(
        &self,
        status: StatusCode,
        name: &str,
        ctx: minijinja::Value,
    ) -> Result<Response, ConsoleError> {
        let html = self
            .templates
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map_err(|e| ConsoleError::Internal(format!("template {name}: {e:#}")))?;
        Ok((status, page_headers(), axum::response::Html(html)).into_response())
    }
}

/// A resource id as one path segment: what is not plainly safe is
/// percent-encoded.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The whole console answers 404 while no admin token is configured.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if app.config.server.admin_token.is_empty() {
        return ConsoleError::Off.into_response();
    }
    next.run(request).await
}

/// Pages need a valid sign-in: without one a page sends the browser to
/// sign in, and an action is refused.
async fn require_sign_in(
    Extension(console): Extension<Arc<Console>>,
    mut request: Request,
    next: Next,
) -> Response {
    let signed =
        auth::cookie_value(request.headers()).and_then(|v| console.keys.check(v, now_secs()));
    match signed {
        Some(s) => {
            request.extensions_mut().insert(s);
            next.run(request).await
        }
        None if request.method() == axum::http::Method::GET => {
            Redirect::to("/ui/sign-in").into_response()
        }
        None => ConsoleError::Forbidden.into_response(),
    }
}

/// The checks every action takes: from this site, with this sign-in's token.
fn check_form(headers: &HeaderMap, signed: &SignedIn, csrf: &str) -> Result<(), ConsoleError> {
    if auth::same_origin(headers) && signed.csrf_matches(csrf) {
        Ok(())
    } else {
        tracing::warn!("console action refused: cross-site or without this sign-in's token");
        Err(ConsoleError::Forbidden)
    }
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "console.css" => (
            include_str!("assets/console.css"),
            "text/css; charset=utf-8",
        ),
        "console.js" => (
            include_str!("assets/console.js"),
            "text/javascript; charset=utf-8",
        ),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn sign_in_page(
    Extension(console): Extension<Arc<Console>>,
    headers: HeaderMap,
) -> Result<Response, ConsoleError> {
    if auth::cookie_value(&headers)
        .and_then(|v| console.keys.check(v, now_secs()))
        .is_some()
    {
        return Ok(Redirect::to("/ui/").into_response());
    }
    console.render("sign_in.html", context! { error => false })
}

#[derive(Deserialize)]
struct SignInForm {
    token: String,
}

/// The token comes in a form body (never a URL) and is compared in
/// constant time; neither it nor a wrong one is ever logged.
async fn sign_in(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    headers: HeaderMap,
    Form(form): Form<SignInForm>,
) -> Result<Response, ConsoleError> {
    if !auth::same_origin(&headers) {
        return Err(ConsoleError::Forbidden);
    }
    if !crate::api::v1::token_matches(form.token.trim(), &app.config.server.admin_token) {
        tracing::warn!("console sign-in refused: wrong admin token");
        return console.render_with(
            StatusCode::UNAUTHORIZED,
            "sign_in.html",
            context! { error => true },
        );
    }
    tracing::info!("console signed in");
    let cookie = auth::set_cookie(&console.keys.sign_in(now_secs()));
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/ui/")).into_response())
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    Extension(signed): Extension<SignedIn>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Result<Response, ConsoleError> {
    check_form(&headers, &signed, &form.csrf)?;
    Ok((
        [(header::SET_COOKIE, auth::clear_cookie())],
        Redirect::to("/ui/sign-in"),
    )
        .into_response())
}

/// A resource held in a transitional status longer than its limit.
#[derive(Serialize)]
struct Held {
    provider: String,
    kind: String,
    id: String,
    status: String,
    since: String,
    limit_secs: u64,
    held_secs: i64,
}

async fn overview(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
) -> Result<Response, ConsoleError> {
    let store = &app.store;
    let first = |limit| PageRequest {
        limit: Some(limit),
        cursor: None,
    };
    let open = store
        .alerts(
            &AlertFilter {
                state: Some("open".into()),
                ..AlertFilter::default()
            },
            &first(OVERVIEW_ROWS),
        )
        .await?;
    let mut by_severity: BTreeMap<u8, (String, Vec<AlertView>)> = BTreeMap::new();
    for a in open.data {
        let rank = match a.severity.as_str() {
            "critical" => 0,
            "warning" => 1,
            _ => 2,
        };
        by_severity
            .entry(rank)
            .or_insert_with(|| (a.severity.clone(), Vec::new()))
            .1
            .push(a);
    }
    let severities: Vec<_> = by_severity.into_values().collect();
    let inbox = store.inbox_by_state().await?;
    let (pending, oldest) = store.inbox_depth().await?;
    let now = chrono::Utc::now();
    let oldest_age = oldest
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| human_secs((now - t.with_timezone(&chrono::Utc)).num_seconds()));
    let held = held_too_long(&app, now).await?;
    let latest = store
        .transitions(&TransitionFilter::default(), &first(20))
        .await?;
    console.render(
        "overview.html",
        context! {
            csrf => signed.csrf,
            severities => severities,
            more_alerts => open.next_cursor.is_some(),
            inbox => inbox,
            pending => pending,
            oldest => oldest,
            oldest_age => oldest_age,
            held => held,
            transitions => latest.data,
        },
    )
}

/// The resources the `stuck` rule looks for, as of now: in a transitional
/// status for longer than `alerts.stuck.limits[status]` (else
/// `alerts.stuck.after_secs`).
async fn held_too_long(
    app: &App,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Vec<Held>, ConsoleError> {
    let rule = &app.config.alerts.stuck;
    let shortest = rule
        .limits
        .values()
        .copied()
        .chain([rule.after_secs])
        .min()
        .unwrap_or(rule.after_secs);
    let before = crate::time::fmt(now - chrono::Duration::seconds(shortest as i64));
    let mut held = Vec::new();
    for r in app.store.unsettled_since(&before, 500).await? {
        let (Some(status), Some(since)) = (r.status, r.status_since) else {
            continue;
        };
        if !knowledge::is_transitional(&r.kind, &status) {
            continue;
        }
        let limit = rule.limits.get(&status).copied().unwrap_or(rule.after_secs);
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(&since) else {
            continue;
        };
        let held_secs = (now - at.with_timezone(&chrono::Utc)).num_seconds();
        if held_secs <= limit as i64 {
            continue;
        }
        held.push(Held {
            provider: r.provider,
            kind: r.kind,
            id: r.id,
            status,
            since,
            limit_secs: limit,
            held_secs,
        });
        if held.len() as i64 >= OVERVIEW_ROWS {
            break;
        }
    }
    Ok(held)
}

/// `3d 4h`, `12m 5s`: an age for a person.
fn human_secs(secs: i64) -> String {
    let secs = secs.max(0);
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[derive(Deserialize)]
struct SearchParams {
    #[serde(default)]
    q: String,
}

/// A resource id (or another id it is known by) or a delivery's key.
async fn search(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
    Query(p): Query<SearchParams>,
) -> Result<Response, ConsoleError> {
    let q = p.q.trim();
    if q.is_empty() {
        return Ok(Redirect::to("/ui/").into_response());
    }
    if app.store.history(q).await?.is_some() {
        return Ok(Redirect::to(&format!("/ui/resources/{}", path_segment(q))).into_response());
    }
    if let Some(d) = app.store.delivery_by_key(q).await? {
        if let Some(id) = d.resource_id.filter(|id| !id.is_empty()) {
            return Ok(
                Redirect::to(&format!("/ui/resources/{}", path_segment(&id))).into_response(),
            );
        }
        return console.render(
            "message.html",
            context! {
                csrf => signed.csrf,
                title => "Delivery found",
                message => format!(
                    "Delivery {} ({} {}) names no resource; its state is {}.",
                    d.dedupe_key, d.provider, d.event_type, d.state
                ),
            },
        );
    }
    Err(ConsoleError::NotFound(format!(
        "no resource and no delivery is recorded under {q:?}"
    )))
}

async fn resource(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let history =
        app.store.history(&id).await?.ok_or_else(|| {
            ConsoleError::NotFound(format!("no resource with id {id:?} is recorded"))
        })?;
    let mut views = Vec::with_capacity(history.resources.len());
    for r in &history.resources {
        let deliveries = app
            .store
            .deliveries_of(&r.resource.id, RESOURCE_DELIVERIES)
            .await?;
        let snapshot = r.resource.snapshot.as_deref().map(|s| {
            serde_json::from_str::<serde_json::Value>(s)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or_else(|_| s.to_string())
        });
        let cancellable = !r.resource.terminal
            && !r.resource.not_found
            && knowledge::cancellable_kinds().contains(&r.resource.kind.as_str());
        views.push(context! {
            resource => &r.resource,
            snapshot => snapshot,
            cancellable => cancellable,
            timeline => timeline::layout(r),
            refunds => r.refunds.iter().chain(r.children.iter().flat_map(|c| c.refunds.iter())).collect::<Vec<_>>(),
            alerts => &r.alerts,
            cancel_requests => &r.cancel_requests,
            children => r.children.len(),
            deliveries => deliveries,
        });
    }
    console.render(
        "resource.html",
        context! { csrf => signed.csrf, id => history.id, resources => views },
    )
}

#[derive(Deserialize)]
struct KindParam {
    kind: String,
}

/// What a cancel would cancel, named, before it is sent.
async fn confirm_cancel(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
    Path(id): Path<String>,
    Query(p): Query<KindParam>,
) -> Result<Response, ConsoleError> {
    let history = app.store.history(&id).await?;
    let found = history
        .as_ref()
        .and_then(|h| h.resources.iter().find(|r| r.resource.kind == p.kind))
        .ok_or_else(|| {
            ConsoleError::NotFound(format!("no {} with id {id:?} is recorded", p.kind))
        })?;
    let open_items = found
        .children
        .iter()
        .filter(|c| !c.resource.terminal)
        .count();
    console.render(
        "confirm.html",
        context! {
            csrf => signed.csrf,
            resource => &found.resource,
            items => found.children.len(),
            open_items => open_items,
        },
    )
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(default)]
    csrf: String,
    kind: String,
    id: String,
}

async fn cancel(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
    headers: HeaderMap,
    Form(form): Form<CancelForm>,
) -> Result<Response, ConsoleError> {
    check_form(&headers, &signed, &form.csrf)?;
    let report = pipeline::cancel::request(&app.pipeline, &form.kind, &form.id, "console").await?;
    console.render(
        "message.html",
        context! {
            csrf => signed.csrf,
            title => "Cancel sent",
            message => format!(
                "{} {}: the provider answered {}{}.",
                report.kind,
                report.id,
                report.outcome,
                report.status.as_deref().map(|s| format!("; its status is now {s}")).unwrap_or_default()
            ),
            resource => report.id,
        },
    )
}

#[derive(Deserialize)]
struct StateParam {
    state: Option<String>,
}

/// The deliveries that need a person: `dead` (retries spent) and `failed`
/// (still retrying), with their last error.
async fn deliveries(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
    Query(p): Query<StateParam>,
) -> Result<Response, ConsoleError> {
    let state = p.state.unwrap_or_else(|| "dead".into());
    if state != "dead" && state != "failed" {
        return Err(ConsoleError::BadRequest(format!(
            "state {state:?} is not one of dead, failed"
        )));
    }
    let page = app
        .store
        .events(
            &EventFilter {
                state: Some(state.clone()),
                provider: None,
            },
            &PageRequest {
                limit: Some(200),
                cursor: None,
            },
        )
        .await?;
    console.render(
        "deliveries.html",
        context! { csrf => signed.csrf, state => state, deliveries => page.data, more => page.next_cursor.is_some() },
    )
}

#[derive(Deserialize)]
struct ReplayForm {
    #[serde(default)]
    csrf: String,
    key: String,
}

async fn replay(
    State(app): State<Arc<App>>,
    Extension(console): Extension<Arc<Console>>,
    Extension(signed): Extension<SignedIn>,
    headers: HeaderMap,
    Form(form): Form<ReplayForm>,
) -> Result<Response, ConsoleError> {
    check_form(&headers, &signed, &form.csrf)?;
    let report = pipeline::replay(&app.pipeline, &form.key, false).await?;
    let resource = app
        .store
        .delivery_by_key(&form.key)
        .await?
        .and_then(|d| d.resource_id);
    console.render(
        "message.html",
        context! {
            csrf => signed.csrf,
            title => "Replayed",
            message => format!(
                "Delivery {} was {} and is now {}: the workers take it again.",
                report.key, report.previous_state, report.state
            ),
            resource => resource,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(path_segment("obt_123"), "obt_123");
        assert_eq!(path_segment("bt_1:ref 2"), "bt_1:ref%202");
        assert_eq!(path_segment("../x"), "..%2Fx");
    }

    #[test]
    fn ages_read_for_a_person() {
        assert_eq!(human_secs(5), "5s");
        assert_eq!(human_secs(125), "2m 5s");
        assert_eq!(human_secs(7_260), "2h 1m");
        assert_eq!(human_secs(90_000), "1d 1h");
    }

    #[test]
    fn every_template_renders_from_the_binary() {
        let env = templates();
        let out = env
            .get_template("sign_in.html")
            .unwrap()
            .render(context! { error => true })
            .unwrap();
        assert!(out.contains("type=\"password\""), "{out}");
        assert!(
            !out.contains("http://") && !out.contains("https://"),
            "{out}"
        );
    }
}
