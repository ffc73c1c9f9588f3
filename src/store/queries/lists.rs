//! Filtered pages of transitions, alerts and inbox deliveries.

use std::collections::HashMap;

use sqlx::{Pool, QueryBuilder};

use super::engine::{PushParam, ReadEngine};
use super::rows::{
    Alert, AlertDelivery, Event, Transition, ALERT_COLUMNS, EVENT_COLUMNS, TRANSITION_COLUMNS,
};
use super::{
    encode_cursor, invalid, non_empty, one_of, page, parse_time, Page, PageRequest, QueryError,
    ALERT_STATES, ALERT_TYPES, EVENT_STATES,
};

/// Filters of a transitions listing; every one optional, all must match.
#[derive(Debug, Clone, Default)]
pub struct TransitionFilter {
    /// `stripe` or `juice`.
    pub provider: Option<String>,
    /// e.g. `stripe.outbound_transfer`.
    pub kind: Option<String>,
    /// The status changed to.
    pub to_status: Option<String>,
    /// Observed at or after (RFC 3339).
    pub since: Option<String>,
    /// Observed before (RFC 3339).
    pub until: Option<String>,
    pub resource_id: Option<String>,
}

/// A page of transitions, newest first.
pub async fn transitions<DB: ReadEngine>(
    pool: &Pool<DB>,
    filter: &TransitionFilter,
    page_req: &PageRequest,
) -> Result<Page<Transition>, QueryError> {
    let limit = page_req.limit()?;
    check_known(pool, filter).await?;
    let q = transitions_query("", filter, page_req)?;
    let rows: Vec<Transition> = DB::fetch_all(pool, q).await?;
    Ok(page(rows, limit, |t| encode_cursor("t", &t.id.to_string())))
}

/// Refuses a kind or a status that no provider documents and that nothing
/// recorded has: a typo answers with the accepted values, not with an empty
/// page. (One that was recorded is accepted: providers add statuses.)
async fn check_known<DB: ReadEngine>(
    pool: &Pool<DB>,
    filter: &TransitionFilter,
) -> Result<(), QueryError> {
    use crate::providers::knowledge;
    let checks = [
        ("kind", &filter.kind, knowledge::kinds(), "kind"),
        ("to", &filter.to_status, knowledge::statuses(), "to_status"),
    ];
    for (field, value, documented, column) in checks {
        let Some(value) = value else { continue };
        if documented.contains(&value.as_str()) {
            continue;
        }
        // The id, not a constant: a literal's type is the engine's own
        // (PostgreSQL's `1` is a 32-bit integer), a column's is the schema's.
        let mut q = QueryBuilder::new(format!("SELECT id FROM transitions WHERE {column} = "));
        q.param(value.clone()).push(" LIMIT 1");
        let recorded: Vec<(i64,)> = DB::fetch_all(pool, q).await?;
        if recorded.is_empty() {
            return Err(invalid(
                field,
                format!("{value:?} is not one of {}", documented.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The engine's plan for the query `transitions` runs (SQLite's `EXPLAIN
/// QUERY PLAN`, PostgreSQL's `EXPLAIN`), one line per step, to check that
/// listings use an index.
pub async fn explain_transitions<DB: ReadEngine>(
    pool: &Pool<DB>,
    filter: &TransitionFilter,
    page_req: &PageRequest,
) -> Result<Vec<String>, QueryError> {
    let q = transitions_query(DB::EXPLAIN, filter, page_req)?;
    let rows: Vec<DB::PlanRow> = DB::fetch_all(pool, q).await?;
    Ok(rows.into_iter().map(DB::plan_step).collect())
}

fn transitions_query<'a, DB: ReadEngine>(
    prefix: &str,
    filter: &TransitionFilter,
    page_req: &PageRequest,
) -> Result<QueryBuilder<'a, DB>, QueryError> {
    let limit = page_req.limit()?;
    let cursor = page_req.id_cursor("t")?;
    let mut q: QueryBuilder<DB> = QueryBuilder::new(prefix);
    let source = match &filter.resource_id {
        // One resource has a handful of transitions: take them first, by rid
        // through `resources`, then filter those. Left to itself the planner
        // would rather walk, say, every transition of a kind by `id`.
        // (`MATERIALIZED` is the same word on SQLite and PostgreSQL 12+.)
        Some(r) => {
            q.push(
                "WITH of_resource AS MATERIALIZED (SELECT * FROM transitions \
                 WHERE rid IN (SELECT rid FROM resources WHERE id = ",
            )
            .param(non_empty("resource_id", r)?)
            .push(")) ");
            "of_resource"
        }
        None => "transitions",
    };
    q.push(format!(
        "SELECT {TRANSITION_COLUMNS} FROM {source} WHERE 1 = 1"
    ));
    if let Some(p) = &filter.provider {
        q.push(" AND provider = ").param(one_of(
            "provider",
            p,
            &crate::providers::knowledge::names(),
        )?);
    }
    if let Some(k) = &filter.kind {
        q.push(" AND kind = ").param(non_empty("kind", k)?);
    }
    if let Some(s) = &filter.to_status {
        q.push(" AND to_status = ").param(non_empty("to", s)?);
    }
    if let Some(t) = &filter.since {
        q.push(" AND observed_at >= ")
            .param(parse_time("since", t)?);
    }
    if let Some(t) = &filter.until {
        q.push(" AND observed_at < ").param(parse_time("until", t)?);
    }
    if let Some(c) = cursor {
        q.push(" AND id < ").param(c);
    }
    q.push(" ORDER BY id DESC LIMIT ").param(limit + 1);
    Ok(q)
}

/// Filters of an alerts listing.
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    /// The rule (`type`), e.g. `partial_cancellation`.
    pub rule: Option<String>,
    /// Raised or updated at or after (RFC 3339).
    pub since: Option<String>,
    /// `open` or `resolved`.
    pub state: Option<String>,
}

/// A page of alerts, newest first (by creation), each with its delivery state per sink.
pub async fn alerts<DB: ReadEngine>(
    pool: &Pool<DB>,
    filter: &AlertFilter,
    page_req: &PageRequest,
) -> Result<Page<Alert>, QueryError> {
    let limit = page_req.limit()?;
    let cursor = match page_req.cursor("a")? {
        None => None,
        Some(p) => {
            let (created_at, id) = p.split_once('|').ok_or_else(|| {
                invalid(
                    "cursor",
                    format!(
                        "{:?} is not a cursor of this listing",
                        page_req.cursor.as_deref().unwrap_or_default()
                    ),
                )
            })?;
            Some((created_at.to_string(), id.to_string()))
        }
    };
    let mut q: QueryBuilder<DB> =
        QueryBuilder::new(format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE 1 = 1"));
    if let Some(r) = &filter.rule {
        q.push(" AND rule = ")
            .param(one_of("type", r, &ALERT_TYPES)?);
    }
    if let Some(s) = &filter.state {
        q.push(" AND state = ")
            .param(one_of("state", s, &ALERT_STATES)?);
    }
    if let Some(t) = &filter.since {
        q.push(" AND updated_at >= ").param(parse_time("since", t)?);
    }
    if let Some((created_at, id)) = cursor {
        q.push(" AND (created_at < ")
            .param(created_at.clone())
            .push(" OR (created_at = ")
            .param(created_at)
            .push(" AND id < ")
            .param(id)
            .push("))");
    }
    q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .param(limit + 1);
    let rows: Vec<Alert> = DB::fetch_all(pool, q).await?;
    let mut p = page(rows, limit, |a| {
        encode_cursor("a", &format!("{}|{}", a.created_at, a.id))
    });
    attach_deliveries(pool, &mut p.data).await?;
    Ok(p)
}

/// Fills each alert's `deliveries`: per sink, the outbox row of its latest version.
pub(super) async fn attach_deliveries<DB: ReadEngine>(
    pool: &Pool<DB>,
    alerts: &mut [Alert],
) -> Result<(), QueryError> {
    if alerts.is_empty() {
        return Ok(());
    }
    let mut q: QueryBuilder<DB> = QueryBuilder::new(
        "SELECT alert_id, sink, alert_version, state, attempts, last_error, delivered_at
         FROM alert_outbox WHERE alert_id IN (",
    );
    for (i, a) in alerts.iter().enumerate() {
        if i > 0 {
            q.push(", ");
        }
        q.param(a.id.clone());
    }
    q.push(") ORDER BY alert_id, sink, alert_version DESC");
    let rows: Vec<AlertDelivery> = DB::fetch_all(pool, q).await?;
    let mut by_alert: HashMap<String, Vec<AlertDelivery>> = HashMap::new();
    for row in rows {
        let list = by_alert.entry(row.alert_id.clone()).or_default();
        // Rows come newest version first within a sink: keep the first.
        if list.last().map(|d| d.sink.as_str()) != Some(row.sink.as_str()) {
            list.push(row);
        }
    }
    for a in alerts.iter_mut() {
        a.deliveries = by_alert.remove(&a.id).unwrap_or_default();
    }
    Ok(())
}

/// Filters of an inbox listing.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// pending, processing, processed, ignored, failed or dead.
    pub state: Option<String>,
    /// `stripe` or `juice`.
    pub provider: Option<String>,
}

/// A page of inbox deliveries (no raw bodies), newest first.
pub async fn events<DB: ReadEngine>(
    pool: &Pool<DB>,
    filter: &EventFilter,
    page_req: &PageRequest,
) -> Result<Page<Event>, QueryError> {
    let limit = page_req.limit()?;
    let cursor = page_req.id_cursor("e")?;
    let mut q: QueryBuilder<DB> =
        QueryBuilder::new(format!("SELECT {EVENT_COLUMNS} FROM inbox WHERE 1 = 1"));
    if let Some(s) = &filter.state {
        q.push(" AND state = ")
            .param(one_of("state", s, &EVENT_STATES)?);
    }
    if let Some(p) = &filter.provider {
        q.push(" AND provider = ").param(one_of(
            "provider",
            p,
            &crate::providers::knowledge::names(),
        )?);
    }
    if let Some(c) = cursor {
        q.push(" AND id < ").param(c);
    }
    q.push(" ORDER BY id DESC LIMIT ").param(limit + 1);
    let rows: Vec<Event> = DB::fetch_all(pool, q).await?;
    Ok(page(rows, limit, |e| encode_cursor("e", &e.id.to_string())))
}
