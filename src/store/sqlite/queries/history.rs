//! One resource's history: its state and everything recorded about it and
//! its items.

use std::collections::HashMap;

use serde::Serialize;
use sqlx::{FromRow, SqlitePool};

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
pub async fn history(pool: &SqlitePool, resource_id: &str) -> Result<Option<History>, QueryError> {
    // Also by another id it is known by (a Juice item by its id or its reference).
    let resources: Vec<Resource> = sqlx::query_as(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE id = ?1 OR rid IN (SELECT rid FROM resource_aliases WHERE alias = ?1)
         ORDER BY rid"
    ))
    .bind(resource_id)
    .fetch_all(pool)
    .await?;
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

async fn resource_history(
    pool: &SqlitePool,
    resource: Resource,
) -> Result<ResourceHistory, QueryError> {
    let rid = resource.rid;
    let transitions: Vec<Transition> = sqlx::query_as(&format!(
        "SELECT {TRANSITION_COLUMNS} FROM transitions WHERE rid = ? ORDER BY id"
    ))
    .bind(rid)
    .fetch_all(pool)
    .await?;
    let progress: Vec<Progress> = sqlx::query_as(
        "SELECT id, observed_at, status, success_count, failure_count, validated_count,
                trigger_type, trigger_id
         FROM progress WHERE rid = ? ORDER BY id",
    )
    .bind(rid)
    .fetch_all(pool)
    .await?;
    let refunds: Vec<Refund> = sqlx::query_as(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid = ? ORDER BY id"
    ))
    .bind(rid)
    .fetch_all(pool)
    .await?;
    let mut alerts: Vec<Alert> = sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE resource_id = ? AND provider = ? AND kind = ?
         ORDER BY created_at, id"
    ))
    .bind(&resource.id)
    .bind(&resource.provider)
    .bind(&resource.kind)
    .fetch_all(pool)
    .await?;
    attach_deliveries(pool, &mut alerts).await?;
    let cancel_requests: Vec<CancelRequest> = sqlx::query_as(
        "SELECT id, provider, kind, resource_id, idempotency_key, requested_by, requested_at,
                http_status, outcome, error_code, response_body, answered_at
         FROM cancel_requests WHERE resource_id = ? AND provider = ? AND kind = ?
         ORDER BY id",
    )
    .bind(&resource.id)
    .bind(&resource.provider)
    .bind(&resource.kind)
    .fetch_all(pool)
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

/// The items whose parent is this resource, each with its transitions and refunds.
async fn children(pool: &SqlitePool, parent: &Resource) -> Result<Vec<ChildHistory>, QueryError> {
    let items: Vec<Resource> = sqlx::query_as(&format!(
        "SELECT {RESOURCE_COLUMNS} FROM resources
         WHERE parent_id = ? AND provider = ? ORDER BY rid"
    ))
    .bind(&parent.id)
    .bind(&parent.provider)
    .fetch_all(pool)
    .await?;
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let children_rids = "SELECT rid FROM resources WHERE parent_id = ?1 AND provider = ?2";
    let transitions: Vec<(i64, Transition)> = sqlx::query_as::<_, RidTransition>(&format!(
        "SELECT rid, {TRANSITION_COLUMNS} FROM transitions
         WHERE rid IN ({children_rids}) ORDER BY rid, id"
    ))
    .bind(&parent.id)
    .bind(&parent.provider)
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.rid, r.transition))
    .collect();
    let refunds: Vec<Refund> = sqlx::query_as(&format!(
        "SELECT {REFUND_COLUMNS} FROM refunds WHERE rid IN ({children_rids}) ORDER BY rid, id"
    ))
    .bind(&parent.id)
    .bind(&parent.provider)
    .fetch_all(pool)
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
