//! One resource's history: its state and everything recorded about it and
//! its items.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{FromRow, Pool, QueryBuilder};

use super::engine::{PushParam, ReadEngine};
use super::lists::attach_deliveries;
use super::rows::{
    Alert, CancelRequest, Progress, Refund, Transition, ALERT_COLUMNS, REFUND_COLUMNS,
    TRANSITION_COLUMNS,
};
use super::QueryError;
use crate::store::sqlite::resources::{Resource, RESOURCE_COLUMNS};

/// Everything recorded about the resources with one id.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct History {
    pub id: String,
    /// Usually one; an id shared by two kinds or providers lists each.
    pub resources: Vec<ResourceHistory>,
}

/// One resource's state and trail.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ResourceHistory {
    #[serde(flatten)]
    pub resource: Resource,
    /// Oldest first.
    pub transitions: Vec<Transition>,
    pub progress: Vec<Progress>,
    pub refunds: Vec<Refund>,
    pub alerts: Vec<Alert>,
    pub cancel_requests: Vec<CancelRequest>,
    /// The items of a bulk transfer.
    pub children: Vec<ChildHistory>,
}

/// One item of a bulk transfer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ChildHistory {
    #[serde(flatten)]
    pub resource: Resource,
    /// Oldest first.
    pub transitions: Vec<Transition>,
    pub refunds: Vec<Refund>,
}

/// The history of every resource with this provider id; `None` when there is none.
pub async fn history<DB: ReadEngine>(
    pool: &Pool<DB>,
    resource_id: &str,
) -> Result<Option<History>, QueryError> {
    // Also by another id it is known by (a Juice item by its id or its reference).
    let mut q = QueryBuilder::new(format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE id = "
    ));
    q.param(resource_id.to_string())
        .push(" OR rid IN (SELECT rid FROM resource_aliases WHERE alias = ")
        .param(resource_id.to_string())
        .push(") ORDER BY rid");
    let resources: Vec<Resource> = DB::fetch_all(pool, q).await?;
    if resources.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(resources.len());
    for resource in resources {
        out.push(resource_history(pool, resource).await?);
    }
    Ok(Some(History {
        id: resource_id.to_string(),
        resources: out,
    }))
}

/// `SELECT {select} WHERE rid = <rid> ORDER BY id`: one resource's rows of a table.
fn of_rid<'a, DB: ReadEngine>(select: &str, rid: i64) -> QueryBuilder<'a, DB> {
    let mut q = QueryBuilder::new(format!("SELECT {select} WHERE rid = "));
    q.param(rid).push(" ORDER BY id");
    q
}

/// `SELECT {select} WHERE resource_id = .. AND provider = .. AND kind = ..
/// ORDER BY {order}`: the rows of a table that name `resource` by its key.
fn of_key<'a, DB: ReadEngine>(
    select: &str,
    resource: &Resource,
    order: &str,
) -> QueryBuilder<'a, DB> {
    let mut q = QueryBuilder::new(format!("SELECT {select} WHERE resource_id = "));
    q.param(resource.id.clone())
        .push(" AND provider = ")
        .param(resource.provider.clone())
        .push(" AND kind = ")
        .param(resource.kind.clone())
        .push(format!(" ORDER BY {order}"));
    q
}

async fn resource_history<DB: ReadEngine>(
    pool: &Pool<DB>,
    resource: Resource,
) -> Result<ResourceHistory, QueryError> {
    let rid = resource.rid;
    let transitions: Vec<Transition> = DB::fetch_all(
        pool,
        of_rid(&format!("{TRANSITION_COLUMNS} FROM transitions"), rid),
    )
    .await?;
    let progress: Vec<Progress> = DB::fetch_all(
        pool,
        of_rid(
            "id, observed_at, status, success_count, failure_count, validated_count,
                trigger_type, trigger_id
             FROM progress",
            rid,
        ),
    )
    .await?;
    let refunds: Vec<Refund> =
        DB::fetch_all(pool, of_rid(&format!("{REFUND_COLUMNS} FROM refunds"), rid)).await?;
    let mut alerts: Vec<Alert> = DB::fetch_all(
        pool,
        of_key(
            &format!("{ALERT_COLUMNS} FROM alerts"),
            &resource,
            "created_at, id",
        ),
    )
    .await?;
    attach_deliveries(pool, &mut alerts).await?;
    let cancel_requests: Vec<CancelRequest> = DB::fetch_all(
        pool,
        of_key(
            "id, provider, kind, resource_id, idempotency_key, requested_by, requested_at,
                http_status, outcome, error_code, response_body, answered_at
             FROM cancel_requests",
            &resource,
            "id",
        ),
    )
    .await?;
    let children = children(pool, &resource).await?;
    Ok(ResourceHistory {
        resource,
        transitions,
        progress,
        refunds,
        alerts,
        cancel_requests,
        children,
    })
}

/// `SELECT {select} WHERE rid IN (the items of `parent`) ORDER BY rid, id`.
fn of_children<'a, DB: ReadEngine>(select: &str, parent: &Resource) -> QueryBuilder<'a, DB> {
    let mut q = QueryBuilder::new(format!(
        "SELECT {select} WHERE rid IN (SELECT rid FROM resources WHERE parent_id = "
    ));
    q.param(parent.id.clone())
        .push(" AND provider = ")
        .param(parent.provider.clone())
        .push(") ORDER BY rid, id");
    q
}

/// The items whose parent is this resource, each with its transitions and refunds.
async fn children<DB: ReadEngine>(
    pool: &Pool<DB>,
    parent: &Resource,
) -> Result<Vec<ChildHistory>, QueryError> {
    let mut q = QueryBuilder::new(format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources WHERE parent_id = "
    ));
    q.param(parent.id.clone())
        .push(" AND provider = ")
        .param(parent.provider.clone())
        .push(" ORDER BY rid");
    let items: Vec<Resource> = DB::fetch_all(pool, q).await?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let transitions: Vec<(i64, Transition)> = DB::fetch_all::<RidTransition>(
        pool,
        of_children(
            &format!("rid, {TRANSITION_COLUMNS} FROM transitions"),
            parent,
        ),
    )
    .await?
    .into_iter()
    .map(|r| (r.rid, r.transition))
    .collect();
    let refunds: Vec<Refund> = DB::fetch_all(
        pool,
        of_children(&format!("{REFUND_COLUMNS} FROM refunds"), parent),
    )
    .await?;

    let mut by_rid: HashMap<i64, ChildHistory> = HashMap::new();
    let order: Vec<i64> = items.iter().map(|r| r.rid).collect();
    for resource in items {
        by_rid.insert(
            resource.rid,
            ChildHistory {
                resource,
                transitions: Vec::new(),
                refunds: Vec::new(),
            },
        );
    }
    for (rid, t) in transitions {
        if let Some(c) = by_rid.get_mut(&rid) {
            c.transitions.push(t);
        }
    }
    for r in refunds {
        if let Some(c) = by_rid.get_mut(&r.rid) {
            c.refunds.push(r);
        }
    }
    Ok(order
        .into_iter()
        .filter_map(|rid| by_rid.remove(&rid))
        .collect())
}

#[derive(FromRow)]
struct RidTransition {
    rid: i64,
    #[sqlx(flatten)]
    transition: Transition,
}
